//! `audio-worker audit`: does the library hold what its catalog says, and only that?
//!
//! Two passes, both streaming, so memory is bounded by a page of the listing and the number of
//! checks at once, never by the size of the bucket or of the catalog:
//! 1. **Documents → objects.** A cursor over every saved document (of one customer with
//!    `customer_id`): the audio (`storage.key`) and every file listed beside it
//!    (`storage.derived`, `waveform`, `renditions`) must exist with the size and the SHA-256
//!    the document records. The SHA-256 is computed from the bytes (a streamed `GetObject`),
//!    not read from the object's metadata, which a changed object may keep; [`AuditOptions::quick`]
//!    trusts the size and the `sha256` metadata where there is some. A few documents are
//!    checked at once ([`AuditOptions::concurrency`]).
//! 2. **Objects → documents.** The bucket's listing, a page ([`PAGE_KEYS`]) at a time, under
//!    `{customer_id}/` or the whole bucket: each key `{customer_id}/{user_id}/audio/{asset_id}.…`
//!    must be listed by the saved document of that asset and tenant (one `$in` look-up per
//!    page). `.backup/` and keys outside an `audio/` folder are skipped (counted, not judged).
//!
//! # Saves in flight
//! A save writes its objects under its lease before it commits the document, so a document with
//! a `lease`, or one not `saved` yet, is a save in flight: an object it does not list yet, or a
//! difference in one it lists, is reported [`Kind::InFlight`], which is not a problem and is
//! never fixed. A difference found under a document without a lease is checked against the
//! document read again (a save may have begun or committed meanwhile) before it counts.
//! [`AuditOptions::fix_orphans`] deletes only orphans older than [`AuditOptions::min_age`], and
//! looks their asset up once more just before each deletion.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::Utc;
use futures_util::{StreamExt, TryStreamExt};
use mongodb::Collection;
use mongodb::bson::{Bson, Document, doc};

use crate::error::{StageError, chain};
use crate::pipeline::catalog::Catalog;
use crate::pipeline::store::{ListedObject, Store};

/// Keys per page of the listing (S3's largest page): the pass over the objects holds one page
/// and its documents at a time.
pub const PAGE_KEYS: i32 = 1000;

/// Documents per batch of the catalog's cursor: the projected documents are a few KiB, so a
/// batch stays well under a MiB (MongoDB's own default fills batches up to 16 MiB).
const CURSOR_BATCH: u32 = 500;

/// What to audit and how.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Only this customer's documents and keys (`{customer_id}/…`); `None`: the whole library.
    pub customer_id: Option<String>,
    /// Compare the size and the object's `sha256` metadata instead of reading its bytes (an
    /// object without that metadata, i.e. a multipart upload, is still read). Blind to bytes
    /// changed under unchanged metadata.
    pub quick: bool,
    /// Documents checked at once, and orphans deleted at once (at least 1).
    pub concurrency: usize,
    /// Delete the orphans found (older than `min_age`).
    pub fix_orphans: bool,
    /// Orphans younger than this are reported and never deleted: a save in flight may have
    /// written them a moment ago.
    pub min_age: Duration,
    /// At most this many findings kept for the report, so that memory stays bounded whatever
    /// the library holds; the counts in [`Summary`] cover every one.
    pub max_listed: usize,
}

/// What is wrong with one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A saved document lists the key and there is no object.
    Missing,
    /// The object's size or SHA-256 is not the one its document records.
    Mismatched,
    /// An object under `…/audio/` that no saved document of its tenant lists.
    Orphan,
    /// A save in flight (a document with a lease, or not saved yet) is writing or replacing
    /// it: not a problem, never fixed.
    InFlight,
}

impl Kind {
    /// `missing`, `mismatched`, `orphan`, `in_flight`: as in the JSON and the report's lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Missing => "missing",
            Kind::Mismatched => "mismatched",
            Kind::Orphan => "orphan",
            Kind::InFlight => "in_flight",
        }
    }
}

/// One key that is not as its document says.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Finding {
    /// What is wrong.
    pub kind: Kind,
    /// The object key.
    pub key: String,
    /// The asset it is (or would be) part of; `None` for a key that names no asset.
    pub asset_id: Option<String>,
    /// Why, in words: the sizes or SHA-256s compared, whose document, the lease.
    pub detail: String,
    /// True when `--fix-orphans` deleted the object.
    pub deleted: bool,
}

/// The counts of an audit. Every check ends in exactly one of `ok`, `missing`, `mismatched`,
/// `orphans` or `in_flight`, so `checked` is their sum.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Keys checked: those the saved documents list, and those the bucket holds under
    /// `…/audio/` that no saved document lists.
    pub checked: u64,
    /// Keys whose object is there with the recorded size and SHA-256.
    pub ok: u64,
    /// Keys listed by a saved document without an object.
    pub missing: u64,
    /// Objects whose size or SHA-256 differ from their document's.
    pub mismatched: u64,
    /// Objects no saved document lists.
    pub orphans: u64,
    /// Keys of saves in flight (not problems).
    pub in_flight: u64,
    /// Orphans deleted by `--fix-orphans`.
    pub deleted: u64,
    /// Saved documents read.
    pub documents: u64,
    /// Objects the listing showed.
    pub listed: u64,
    /// Listed objects that are not an asset's (`.backup/`, keys outside `…/audio/`).
    pub skipped: u64,
}

impl Summary {
    /// Problems still there: missing, mismatched, and orphans not deleted. The exit status is 1
    /// when this is not 0.
    pub fn problems_left(&self) -> u64 {
        self.missing + self.mismatched + self.orphans.saturating_sub(self.deleted)
    }

    /// `checked N, ok N, missing N, mismatched N, orphans N`: the report's last line.
    pub fn line(&self) -> String {
        format!(
            "checked {}, ok {}, missing {}, mismatched {}, orphans {}",
            self.checked, self.ok, self.missing, self.mismatched, self.orphans
        )
    }
}

/// An audit's result: the counts, and the findings (at most `max_listed`, by kind then key).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// The counts.
    pub summary: Summary,
    /// The findings kept, problems and saves in flight, sorted by kind then key.
    pub problems: Vec<Finding>,
    /// Findings counted but not kept (past `max_listed`).
    pub unlisted: u64,
}

/// Which pass a progress report is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Documents → objects, `total` saved documents to read.
    Documents {
        /// The saved documents counted when the pass began.
        total: u64,
    },
    /// Objects → documents (the listing's length is not known in advance).
    Objects,
}

/// Why an audit could not finish: a store did not answer or refused. The report would be
/// incomplete, so there is none (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// S3 failed (after a few tries for a transient error).
    #[error("S3: {0}")]
    S3(String),
    /// MongoDB failed or did not answer within `MONGODB_OPERATION_TIMEOUT_SECS`.
    #[error("MongoDB: {0}")]
    Mongo(String),
}

/// Audits the library in `store` against `catalog`, calling `progress` after each document and
/// each page of the listing. `timeout` bounds each MongoDB operation (one cursor batch, one
/// look-up): `MONGODB_OPERATION_TIMEOUT_SECS`.
///
/// # Errors
/// S3 or MongoDB could not be read (or an orphan not deleted): [`AuditError`].
pub async fn run(
    store: &Store,
    catalog: &Catalog,
    timeout: Duration,
    options: &AuditOptions,
    mut progress: impl FnMut(Pass, &Summary),
) -> Result<Report, AuditError> {
    let auditor = Auditor { store, documents: catalog.documents(), timeout, options };
    let mut tally = Tally { report: Report::default(), max_listed: options.max_listed };
    auditor.documents_pass(&mut tally, &mut progress).await?;
    auditor.objects_pass(&mut tally, &mut progress).await?;
    let mut report = tally.report;
    report.problems.sort_by(|a, b| (a.kind, &a.key).cmp(&(b.kind, &b.key)));
    Ok(report)
}

/// The counts and the findings kept so far.
struct Tally {
    report: Report,
    max_listed: usize,
}

impl Tally {
    /// Counts one check: `None` is a key found as its document says.
    fn record(&mut self, outcome: Option<Finding>) {
        let summary = &mut self.report.summary;
        summary.checked += 1;
        let Some(finding) = outcome else {
            summary.ok += 1;
            return;
        };
        match finding.kind {
            Kind::Missing => summary.missing += 1,
            Kind::Mismatched => summary.mismatched += 1,
            Kind::Orphan => summary.orphans += 1,
            Kind::InFlight => summary.in_flight += 1,
        }
        summary.deleted += u64::from(finding.deleted);
        if self.report.problems.len() < self.max_listed {
            self.report.problems.push(finding);
        } else {
            self.report.unlisted += 1;
        }
    }
}

/// The clients and options of one audit.
struct Auditor<'a> {
    store: &'a Store,
    documents: &'a Collection<Document>,
    timeout: Duration,
    options: &'a AuditOptions,
}

impl Auditor<'_> {
    /// Pass 1: every saved document's objects, `concurrency` documents at a time.
    async fn documents_pass(
        &self,
        tally: &mut Tally,
        progress: &mut impl FnMut(Pass, &Summary),
    ) -> Result<(), AuditError> {
        let mut filter = doc! { "status": "saved" };
        if let Some(customer) = &self.options.customer_id {
            filter.insert("customer_id", customer);
        }
        let total = self.mongo(self.documents.count_documents(filter.clone())).await?;
        let cursor = self
            .mongo(self.documents.find(filter).projection(owner_fields()).batch_size(CURSOR_BATCH))
            .await?;
        // Each batch of the cursor bounded in time like any other operation; the first error
        // ends the stream.
        let timeout = self.timeout;
        let documents = futures_util::stream::unfold(Some(cursor), move |cursor| async move {
            let mut cursor = cursor?;
            match tokio::time::timeout(timeout, cursor.next()).await {
                Ok(None) => None,
                Ok(Some(Ok(document))) => Some((Ok(document), Some(cursor))),
                Ok(Some(Err(e))) => Some((Err(AuditError::Mongo(chain(&e))), None)),
                Err(_) => Some((Err(mongo_timeout(timeout)), None)),
            }
        });
        let checks = documents
            .map(|document| async move { self.check_document(&Owner::of(&document?)).await })
            .buffer_unordered(self.options.concurrency.max(1));
        let mut checks = std::pin::pin!(checks);
        while let Some(outcomes) = checks.next().await {
            tally.report.summary.documents += 1;
            for outcome in outcomes? {
                tally.record(outcome);
            }
            progress(Pass::Documents { total }, &tally.report.summary);
        }
        Ok(())
    }

    /// The outcome of each key `owner` lists (`None`: as recorded).
    async fn check_document(&self, owner: &Owner) -> Result<Vec<Option<Finding>>, AuditError> {
        let mut outcomes = Vec::with_capacity(owner.objects.len());
        for expected in &owner.objects {
            let problem = self.check_object(expected).await?;
            outcomes.push(problem.map(|(kind, detail)| Finding {
                kind,
                key: expected.key.clone(),
                asset_id: Some(owner.asset_id.clone()),
                detail,
                deleted: false,
            }));
        }
        if outcomes.iter().all(Option::is_none) {
            return Ok(outcomes);
        }
        // A save may be replacing these bytes: under a lease, or (read again) one that began
        // or committed since the cursor read the document.
        let why = match &owner.lease {
            Some(lease) => Some(lease.clone()),
            None => {
                let now = self.owners(std::slice::from_ref(&owner.asset_id)).await?;
                match now.get(&owner.asset_id) {
                    Some(now) if now.lease.is_some() => now.lease.clone(),
                    Some(now) if now.version == owner.version && now.saved => None,
                    _ => Some("the document changed during the audit".into()),
                }
            }
        };
        if let Some(why) = why {
            for finding in outcomes.iter_mut().flatten() {
                finding.kind = Kind::InFlight;
                finding.detail = format!("{why}: {}", finding.detail);
            }
        }
        Ok(outcomes)
    }

    /// What is wrong with the object at `expected.key`, if anything.
    async fn check_object(&self, expected: &Expected) -> Result<Option<(Kind, String)>, AuditError> {
        let key = expected.key.as_str();
        let size_differs = |size: u64| {
            expected
                .size
                .filter(|&recorded| recorded != size)
                .map(|recorded| (Kind::Mismatched, format!("{size} bytes, the document says {recorded}")))
        };
        let missing = || Some((Kind::Missing, "no object at this key".to_owned()));
        if self.options.quick {
            let Some(head) = s3(|| self.store.head(key)).await? else {
                return Ok(missing());
            };
            if let Some(problem) = size_differs(head.size) {
                return Ok(Some(problem));
            }
            if let Some(sha256) = head.sha256 {
                return Ok(sha256_differs(&sha256, &expected.sha256, "its sha256 metadata"));
            }
        }
        let Some((size, sha256)) = s3(|| self.store.hash(key)).await? else {
            return Ok(missing());
        };
        Ok(size_differs(size).or_else(|| sha256_differs(&sha256, &expected.sha256, "its bytes' SHA-256")))
    }

    /// Pass 2: every object of the listing that no saved document lists.
    async fn objects_pass(
        &self,
        tally: &mut Tally,
        progress: &mut impl FnMut(Pass, &Summary),
    ) -> Result<(), AuditError> {
        let prefix = self.options.customer_id.as_ref().map(|c| format!("{c}/"));
        let mut continuation = None;
        loop {
            let page =
                s3(|| self.store.list_page(prefix.as_deref(), continuation.clone(), PAGE_KEYS)).await?;
            tally.report.summary.listed += page.objects.len() as u64;
            let mut assets = Vec::with_capacity(page.objects.len());
            for object in page.objects {
                match AssetKey::parse(&object.key) {
                    Some(key) => assets.push((object, key)),
                    None => tally.report.summary.skipped += 1,
                }
            }
            let ids: BTreeSet<&String> = assets.iter().filter_map(|(_, key)| key.asset_id.as_ref()).collect();
            let owners = self.owners(&ids.into_iter().cloned().collect::<Vec<_>>()).await?;
            let mut to_delete = Vec::new();
            for (object, key) in assets {
                let Some(finding) =
                    judge(&object, &key, owners.get(key.asset_id.as_deref().unwrap_or_default()))
                else {
                    continue;
                };
                match (finding.kind, self.old_enough(&object)) {
                    (Kind::Orphan, Ok(())) if self.options.fix_orphans => to_delete.push((object, key)),
                    (Kind::Orphan, Err(young)) if self.options.fix_orphans => tally
                        .record(Some(Finding { detail: format!("{}; {young}", finding.detail), ..finding })),
                    _ => tally.record(Some(finding)),
                }
            }
            let mut deletions = futures_util::stream::iter(to_delete)
                .map(|(object, key)| async move { self.delete_orphan(object, key).await })
                .buffer_unordered(self.options.concurrency.max(1));
            while let Some(outcome) = deletions.next().await {
                if let Some(finding) = outcome? {
                    tally.record(Some(finding));
                }
            }
            progress(Pass::Objects, &tally.report.summary);
            match page.next {
                Some(next) => continuation = Some(next),
                None => return Ok(()),
            }
        }
    }

    /// `Ok` when `object` is older than `min_age`; why not otherwise.
    fn old_enough(&self, object: &ListedObject) -> Result<(), String> {
        let min_age = chrono::Duration::from_std(self.options.min_age).unwrap_or(chrono::Duration::MAX);
        match object.last_modified {
            Some(at) if Utc::now() - at >= min_age => Ok(()),
            _ => Err(format!(
                "not deleted: written less than --min-age {} ago",
                humantime::format_duration(self.options.min_age)
            )),
        }
    }

    /// Deletes an orphan after looking its asset up once more (a save may have begun since the
    /// page was judged); the finding as it then stands (`None`: a saved document lists it now).
    async fn delete_orphan(
        &self,
        object: ListedObject,
        key: AssetKey,
    ) -> Result<Option<Finding>, AuditError> {
        let owners = match &key.asset_id {
            Some(id) => self.owners(std::slice::from_ref(id)).await?,
            None => HashMap::new(),
        };
        let owner = key.asset_id.as_ref().and_then(|id| owners.get(id));
        let Some(mut finding) = judge(&object, &key, owner) else {
            return Ok(None);
        };
        if finding.kind == Kind::Orphan {
            s3(|| self.store.delete(&object.key)).await?;
            tracing::info!(key = object.key, "audit: orphan deleted");
            finding.deleted = true;
            finding.detail.push_str("; deleted");
        }
        Ok(Some(finding))
    }

    /// The documents of these assets, whatever their status, by `asset_id`.
    async fn owners(&self, asset_ids: &[String]) -> Result<HashMap<String, Owner>, AuditError> {
        if asset_ids.is_empty() {
            return Ok(HashMap::new());
        }
        let filter = doc! { "asset_id": { "$in": asset_ids } };
        let cursor = self.mongo(self.documents.find(filter).projection(owner_fields())).await?;
        let documents: Vec<Document> = self.mongo(cursor.try_collect()).await?;
        Ok(documents.iter().map(Owner::of).map(|o| (o.asset_id.clone(), o)).collect())
    }

    /// A MongoDB operation bounded by `timeout`.
    async fn mongo<T>(
        &self,
        operation: impl IntoFuture<Output = mongodb::error::Result<T>>,
    ) -> Result<T, AuditError> {
        match tokio::time::timeout(self.timeout, operation.into_future()).await {
            Ok(result) => result.map_err(|e| AuditError::Mongo(chain(&e))),
            Err(_) => Err(mongo_timeout(self.timeout)),
        }
    }
}

fn mongo_timeout(limit: Duration) -> AuditError {
    AuditError::Mongo(format!("no answer within MONGODB_OPERATION_TIMEOUT_SECS={} s", limit.as_secs()))
}

/// An S3 request, tried up to 4 times while its error is transient (the client's own retries
/// are off: the worker counts its attempts itself).
async fn s3<T, F: Future<Output = Result<T, StageError>>>(
    request: impl FnMut() -> F,
) -> Result<T, AuditError> {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_times(3)
        .with_jitter();
    request
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .when(StageError::is_transient)
        .await
        .map_err(|e| AuditError::S3(e.reason))
}

/// A mismatch when `found` (from `source`) is not the document's `recorded` SHA-256.
fn sha256_differs(found: &str, recorded: &str, source: &str) -> Option<(Kind, String)> {
    (found != recorded)
        .then(|| (Kind::Mismatched, format!("{source} is {found}, the document says {recorded}")))
}

/// The finding for a listed object under `…/audio/`, given the document of its asset (`None`:
/// a saved document of its tenant lists it).
fn judge(object: &ListedObject, key: &AssetKey, owner: Option<&Owner>) -> Option<Finding> {
    let finding = |kind, detail: String| {
        Some(Finding {
            kind,
            key: object.key.clone(),
            asset_id: key.asset_id.clone(),
            detail,
            deleted: false,
        })
    };
    if key.asset_id.is_none() {
        return finding(Kind::Orphan, "names no asset: not `{asset_id}.{extension}`".into());
    }
    let Some(owner) = owner else {
        return finding(Kind::Orphan, "no document for this asset".into());
    };
    if owner.customer_id != key.customer_id || owner.user_id != key.user_id {
        return finding(Kind::Orphan, "the asset's document is another customer's or user's".into());
    }
    if owner.saved && owner.objects.iter().any(|e| e.key == object.key) {
        return None;
    }
    match &owner.lease {
        Some(lease) => finding(Kind::InFlight, lease.clone()),
        None if !owner.saved => finding(Kind::InFlight, "the asset's first save has not committed".into()),
        None => {
            finding(Kind::Orphan, format!("the saved document (version {}) does not list it", owner.version))
        }
    }
}

/// The tenant and asset of a key under `{customer_id}/{user_id}/audio/`.
#[derive(Debug, Clone, PartialEq)]
struct AssetKey {
    customer_id: String,
    user_id: String,
    /// The UUID before the file name's first `.`, as the worker writes it (lowercase,
    /// hyphenated); `None` when the name does not start with one (or sits deeper).
    asset_id: Option<String>,
}

impl AssetKey {
    /// `None` for a key that is not under an `audio/` folder of a tenant, `.backup/` included.
    fn parse(key: &str) -> Option<Self> {
        let mut segments = key.splitn(4, '/');
        let (customer_id, user_id, folder, name) =
            (segments.next()?, segments.next()?, segments.next()?, segments.next()?);
        if folder != "audio" || customer_id.is_empty() || customer_id.starts_with('.') || user_id.is_empty() {
            return None;
        }
        let asset_id = (!name.contains('/'))
            .then(|| name.split('.').next())
            .flatten()
            .and_then(|stem| uuid::Uuid::parse_str(stem).ok())
            .map(|id| id.to_string());
        Some(Self { customer_id: customer_id.into(), user_id: user_id.into(), asset_id })
    }
}

/// One object a saved document records: where, how large (when recorded), its SHA-256.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    key: String,
    size: Option<u64>,
    sha256: String,
}

/// What an asset's document says it holds.
#[derive(Debug, Clone)]
struct Owner {
    asset_id: String,
    customer_id: String,
    user_id: String,
    /// `status: "saved"`.
    saved: bool,
    /// The document's version: a save committed since it was read changes it.
    version: i64,
    /// The lease of a save in flight, described (`None`: no save in flight).
    lease: Option<String>,
    /// The audio first, then the files beside it; empty unless saved.
    objects: Vec<Expected>,
}

/// The fields an audit reads: a projection, so neither the job's text nor its tags come along.
fn owner_fields() -> Document {
    doc! {
        "asset_id": 1, "customer_id": 1, "user_id": 1, "status": 1, "version": 1, "lease": 1,
        "checksum": 1, "storage": 1, "waveform": 1, "renditions": 1,
    }
}

impl Owner {
    fn of(document: &Document) -> Self {
        let text = |d: &Document, field: &str| d.get_str(field).unwrap_or_default().to_owned();
        let saved = document.get_str("status") == Ok("saved");
        let storage = document.get_document("storage").ok();
        let mut objects = Vec::new();
        if let Some(storage) = storage.filter(|s| saved && !text(s, "key").is_empty()) {
            let checksum = document.get_document("checksum").map(|c| text(c, "sha256")).unwrap_or_default();
            objects.push(Expected {
                key: text(storage, "key"),
                size: number(storage, "size"),
                sha256: checksum,
            });
            // `storage.derived` lists key and SHA-256; `waveform` and `renditions` the sizes.
            let described: Vec<&Document> = document
                .get_document("waveform")
                .into_iter()
                .chain(document.get_array("renditions").into_iter().flatten().filter_map(Bson::as_document))
                .filter(|d| d.contains_key("key"))
                .collect();
            let listed = storage.get_array("derived").into_iter().flatten().filter_map(Bson::as_document);
            for derived in listed.chain(described.iter().copied()) {
                let key = text(derived, "key");
                if key.is_empty() || objects.iter().any(|o| o.key == key) {
                    continue;
                }
                let size =
                    described.iter().find(|d| d.get_str("key") == Ok(&key)).and_then(|d| number(d, "size"));
                objects.push(Expected { key, size, sha256: text(derived, "sha256") });
            }
        }
        let lease = document.get_document("lease").ok().map(|lease| {
            let until = lease.get_datetime("until").map(|u| u.to_string()).unwrap_or_else(|_| "?".into());
            format!("a save holds the asset's lease (until {until})")
        });
        Self {
            asset_id: text(document, "asset_id"),
            customer_id: text(document, "customer_id"),
            user_id: text(document, "user_id"),
            saved,
            version: number(document, "version").and_then(|v| i64::try_from(v).ok()).unwrap_or_default(),
            lease,
            objects,
        }
    }
}

/// A non-negative integer field, however BSON stored it.
fn number(document: &Document, field: &str) -> Option<u64> {
    match document.get(field)? {
        Bson::Int64(n) => u64::try_from(*n).ok(),
        Bson::Int32(n) => u64::try_from(*n).ok(),
        Bson::Double(n) if *n >= 0.0 && n.fract() == 0.0 => Some(*n as u64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ASSET: &str = "6f1c2a4e-8d3b-4b7a-9a51-2f0e5c7d9b10";

    fn listed(key: &str) -> ListedObject {
        ListedObject { key: key.into(), size: 1, last_modified: None }
    }

    #[test]
    fn only_keys_under_a_tenants_audio_folder_are_judged() {
        let key = AssetKey::parse(&format!("c1/u1/audio/{ASSET}.peaks.json")).unwrap();
        assert_eq!(key.asset_id.as_deref(), Some(ASSET));
        assert_eq!((key.customer_id.as_str(), key.user_id.as_str()), ("c1", "u1"));
        assert_eq!(AssetKey::parse("c1/u1/audio/notes.txt").unwrap().asset_id, None);
        assert_eq!(AssetKey::parse(&format!("c1/u1/audio/x/{ASSET}.wav")).unwrap().asset_id, None);
        for other in [
            format!(".backup/c1/u1/audio/{ASSET}.wav.token"),
            format!("c1/u1/{ASSET}.wav"),
            format!("c1/u1/images/{ASSET}.wav"),
            "c1/u1/audio".into(),
        ] {
            assert_eq!(AssetKey::parse(&other), None, "{other}");
        }
    }

    fn saved_document() -> Document {
        doc! {
            "asset_id": ASSET, "customer_id": "c1", "user_id": "u1", "status": "saved", "version": 2_i64,
            "checksum": { "sha256": "aa" },
            "storage": {
                "key": format!("c1/u1/audio/{ASSET}.wav"), "size": 10_i64,
                "derived": [{ "key": format!("c1/u1/audio/{ASSET}.peaks.json"), "sha256": "bb" }],
            },
            "waveform": { "key": format!("c1/u1/audio/{ASSET}.peaks.json"), "size": 3, "sha256": "bb" },
            "renditions": [{ "key": format!("c1/u1/audio/{ASSET}.flac.flac"), "size": 7_i64, "sha256": "cc" }],
        }
    }

    #[test]
    fn a_document_lists_its_audio_then_every_derived_file_with_its_size() {
        let owner = Owner::of(&saved_document());
        let keys: Vec<(&str, Option<u64>, &str)> =
            owner.objects.iter().map(|o| (o.key.as_str(), o.size, o.sha256.as_str())).collect();
        assert_eq!(
            keys,
            [
                (format!("c1/u1/audio/{ASSET}.wav").as_str(), Some(10), "aa"),
                (format!("c1/u1/audio/{ASSET}.peaks.json").as_str(), Some(3), "bb"),
                (format!("c1/u1/audio/{ASSET}.flac.flac").as_str(), Some(7), "cc"),
            ]
        );
        assert!(owner.saved && owner.lease.is_none());
    }

    #[test]
    fn an_object_is_an_orphan_unless_its_tenants_saved_document_lists_it_or_a_save_is_in_flight() {
        let owner = Owner::of(&saved_document());
        let judged = |key: &str, owner: Option<&Owner>| {
            judge(&listed(key), &AssetKey::parse(key).unwrap(), owner).map(|f| f.kind)
        };
        assert_eq!(judged(&format!("c1/u1/audio/{ASSET}.wav"), Some(&owner)), None);
        assert_eq!(judged(&format!("c1/u1/audio/{ASSET}.mp3"), Some(&owner)), Some(Kind::Orphan));
        assert_eq!(judged(&format!("c2/u1/audio/{ASSET}.wav"), Some(&owner)), Some(Kind::Orphan));
        assert_eq!(judged(&format!("c1/u1/audio/{ASSET}.wav"), None), Some(Kind::Orphan));
        let mut leased = saved_document();
        leased.insert("lease", doc! { "token": "t", "until": mongodb::bson::DateTime::now() });
        let leased = Owner::of(&leased);
        assert_eq!(judged(&format!("c1/u1/audio/{ASSET}.mp3"), Some(&leased)), Some(Kind::InFlight));
        let pending = Owner::of(&doc! { "asset_id": ASSET, "customer_id": "c1", "user_id": "u1" });
        assert_eq!(judged(&format!("c1/u1/audio/{ASSET}.wav"), Some(&pending)), Some(Kind::InFlight));
    }

    #[test]
    fn the_summary_counts_each_check_once_and_problems_left_exclude_deleted_orphans() {
        let mut tally = Tally { report: Report::default(), max_listed: 1 };
        let finding =
            |kind, deleted| Finding { kind, key: "k".into(), asset_id: None, detail: "d".into(), deleted };
        tally.record(None);
        tally.record(Some(finding(Kind::Missing, false)));
        tally.record(Some(finding(Kind::Orphan, true)));
        tally.record(Some(finding(Kind::InFlight, false)));
        let s = &tally.report.summary;
        assert_eq!(s.line(), "checked 4, ok 1, missing 1, mismatched 0, orphans 1");
        assert_eq!((s.in_flight, s.deleted, s.problems_left()), (1, 1, 1));
        assert_eq!((tally.report.problems.len(), tally.report.unlisted), (1, 2));
    }
}
