//! Stage 3: the asset's document in MongoDB (collection `audio_assets`), the record of what the
//! library holds.
//!
//! One document per `asset_id` (unique index); every filter includes the tenant, so a job naming
//! another tenant's `asset_id` cannot touch its document (it runs into the unique index and fails
//! permanently). A save takes two round trips: [`Catalog::acquire`] of the asset's save lease
//! after the download (the tenant and a newer save are checked in the same update; saves of one
//! asset never interleave), the upload, then [`Catalog::commit`], which records the save and
//! gives the lease up in one update ([`Catalog::check_fits`] checks the document's size before
//! the download, without MongoDB). `version` is 1 on the first save and +1 on each save of new bytes; saving the same
//! bytes again (a redelivery) keeps it. The document also records the job's fingerprint and
//! generation (`job.fingerprint`, `job.generation`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use mongodb::bson::{self, Document, doc};
use mongodb::error::ErrorKind;
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Collection, IndexModel};

use crate::asset::{CatalogEntry, StoredObject};

mod activity;
mod batches;
mod lease;

use crate::config::MongoSettings;
use crate::delivery::DeliveryMode;
use crate::error::{Stage, StageError, chain};
use crate::job::Job;
pub use activity::{ActivityLog, OutcomeCounts, Replica};
pub use batches::{BatchView, Batches, Counts, Opened, ReplyTo};
pub use lease::{CommitOutcome, Lease, RELEASE_GIVE_UP, RELEASE_RETRY, StaleLease};

/// A job's `duration` further than this from the measured one (seconds) sets the document's
/// `duration_mismatch`: the producer's metadata is wrong, or the file is not the one it described.
pub const DURATION_TOLERANCE_SECS: f64 = 0.5;

/// The asset catalog.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// The asset documents (`MONGODB_DATABASE`.`MONGODB_COLLECTION`), one per `asset_id`.
    collection: Collection<Document>,
    /// The database the collection lives in: `ping` (readiness) and the client's shutdown go
    /// through it.
    database: mongodb::Database,
    /// How long a save lease lasts unrenewed (`SAVE_LEASE_SECS`).
    lease: Duration,
    /// The longest one operation may take (`MONGODB_OPERATION_TIMEOUT_SECS`): the driver has no
    /// socket timeout, so a hung server or a lost reply would otherwise hold the job forever.
    timeout: Duration,
}

const DUPLICATE_KEY: i32 = 11000;

impl Catalog {
    /// Builds the client (connections are made lazily) with the configured server-selection
    /// timeout.
    ///
    /// # Errors
    /// `MONGODB_URI` does not parse.
    pub async fn connect(settings: &MongoSettings) -> Result<Self, mongodb::error::Error> {
        let mut options = ClientOptions::parse(&settings.uri).await?;
        options.server_selection_timeout = Some(settings.server_selection_timeout);
        options.connect_timeout = Some(settings.server_selection_timeout.max(Duration::from_secs(1)));
        options.app_name.get_or_insert_with(|| "audio-worker".into());
        let client = mongodb::Client::with_options(options)?;
        let database = client.database(&settings.database);
        Ok(Self {
            collection: database.collection(&settings.collection),
            database,
            lease: settings.save_lease,
            timeout: settings.operation_timeout,
        })
    }

    /// Closes the client's connections and stops its background tasks; call before the runtime
    /// ends, or a task of the driver may panic on a closed channel while it shuts down.
    pub async fn shutdown(&self) {
        self.database.client().clone().shutdown().await;
    }

    /// Asks the server for `ping`: the readiness probe.
    ///
    /// # Errors
    /// The server is unreachable (transient).
    pub async fn ping(&self) -> Result<(), StageError> {
        self.database.run_command(doc! { "ping": 1 }).within(self.timeout).await?;
        Ok(())
    }

    /// Creates the unique index on `asset_id` (a no-op when it exists).
    ///
    /// # Errors
    /// The server is unreachable or refuses the index.
    pub async fn ensure_indexes(&self) -> Result<(), StageError> {
        let index = IndexModel::builder()
            .keys(doc! { "asset_id": 1 })
            .options(IndexOptions::builder().unique(true).name("asset_id_unique".to_owned()).build())
            .build();
        self.collection.create_index(index).within(self.timeout).await?;
        Ok(())
    }

    /// Checks, before anything is downloaded and without asking MongoDB, that `job`'s own
    /// fields fit in a document. The tenant and a newer save are checked by
    /// [`Catalog::acquire`], in the same operation that takes the save lease, before any byte
    /// is stored: one round trip less per job than a separate read.
    ///
    /// # Errors
    /// A permanent `catalog` error when the job's fields alone would make the document larger
    /// than MongoDB's 16 MiB limit (so such a job is refused before its audio is fetched).
    pub fn check_fits(job: &Job) -> Result<(), StageError> {
        let size = document_size(job);
        if size > MAX_DOCUMENT_BYTES {
            return Err(StageError::permanent(
                Stage::Catalog,
                format!(
                    "the asset's document would be at least {size} bytes, over MongoDB's limit of \
                     {MAX_DOCUMENT_BYTES} (the job's text or tags are too large)"
                ),
            ));
        }
        Ok(())
    }

    /// The saved object and version of `job`'s asset when that save came from this very job
    /// (same fingerprint): a redelivery after the temporary audio was cleaned up reports it.
    /// [`FoundSave::Other`] when the asset holds another job's save.
    ///
    /// # Errors
    /// Network and server errors, classified like the rest.
    pub async fn find_saved(&self, job: &Job) -> Result<FoundSave, StageError> {
        let mut filter = self.tenant(job);
        filter.insert("status", "saved");
        let Some(saved) = self.collection.find_one(filter).within(self.timeout).await? else {
            return Ok(FoundSave::None);
        };
        let fingerprint = saved.get_document("job").and_then(|j| j.get_str("fingerprint")).ok();
        if fingerprint != Some(job.provenance.fingerprint.as_str()) {
            return Ok(FoundSave::Other { version: entry(&saved)?.version });
        }
        let storage = saved
            .get_document("storage")
            .map_err(|e| StageError::permanent(Stage::Catalog, e.to_string()))?;
        let text = |field: &str| storage.get_str(field).unwrap_or_default().to_owned();
        let object = StoredObject {
            bucket: text("bucket"),
            key: text("key"),
            size: storage.get_i64("size").ok().and_then(|s| u64::try_from(s).ok()).unwrap_or_default(),
            content_type: text("content_type"),
            etag: text("etag"),
            sha256: saved
                .get_document("checksum")
                .and_then(|c| c.get_str("sha256"))
                .unwrap_or_default()
                .to_owned(),
            measured_duration: saved.get_f64("measured_duration").ok(),
            analysis: saved.get("analysis").and_then(|a| bson::from_bson(a.clone()).ok()),
            url: text("url"),
            // Read back only to be reported again, with fresh URLs (see processor::gone).
            url_expires_at: None,
            delivery: storage.get_str("delivery").ok().and_then(DeliveryMode::parse).unwrap_or_default(),
            waveform: saved.get("waveform").and_then(from_json_bson),
            renditions: saved.get("renditions").and_then(from_json_bson).unwrap_or_default(),
            renditions_skipped: saved.get("renditions_skipped").and_then(from_json_bson).unwrap_or_default(),
        };
        Ok(FoundSave::Mine(object, entry(&saved)?))
    }

    /// The saved asset `asset_id` of tenant `customer_id`/`user_id`: its version and the keys
    /// it holds (the audio, the waveform, the renditions), for fresh URLs. `None` when the
    /// tenant has no saved asset of that id, including when another tenant has: nothing tells
    /// the two apart.
    ///
    /// # Errors
    /// Network and server errors, classified like the rest.
    pub async fn saved_asset(
        &self,
        asset_id: uuid::Uuid,
        customer_id: &crate::job::KeySegment,
        user_id: &crate::job::KeySegment,
    ) -> Result<Option<SavedAsset>, StageError> {
        let filter = doc! {
            "asset_id": asset_id.to_string(),
            "customer_id": customer_id.as_str(),
            "user_id": user_id.as_str(),
            "status": "saved",
        };
        let projection = doc! {
            "version": 1, "created_at": 1, "storage.key": 1, "storage.content_type": 1,
            "waveform": 1, "renditions": 1,
        };
        let Some(saved) =
            self.collection.find_one(filter).projection(projection).within(self.timeout).await?
        else {
            return Ok(None);
        };
        let storage = saved.get_document("storage").ok();
        let text = |field: &str| storage.and_then(|s| s.get_str(field).ok()).unwrap_or_default().to_owned();
        let renditions = saved
            .get_array("renditions")
            .map(|list| {
                list.iter()
                    .filter_map(|r| r.as_document())
                    .filter_map(|r| {
                        Some((r.get_str("name").ok()?.to_owned(), r.get_str("key").ok()?.to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(SavedAsset {
            version: entry(&saved)?.version,
            key: text("key"),
            content_type: text("content_type"),
            waveform_key: saved
                .get_document("waveform")
                .ok()
                .and_then(|w| w.get_str("key").ok())
                .map(str::to_owned),
            renditions,
        }))
    }

    /// The filter naming `job`'s asset for its own tenant.
    fn tenant(&self, job: &Job) -> Document {
        doc! {
            "asset_id": job.asset_id.to_string(),
            "customer_id": job.customer_id.as_str(),
            "user_id": job.user_id.as_str(),
        }
    }

    /// After a duplicate key: the asset's document belongs to another tenant (permanent), or
    /// not (the caller's filter missed for another reason).
    async fn tenant_conflict(&self, job: &Job) -> Result<Option<StageError>, StageError> {
        let existing = self
            .collection
            .find_one(doc! { "asset_id": job.asset_id.to_string() })
            .within(self.timeout)
            .await?;
        Ok(existing.and_then(|d| other_tenant(job, &d)))
    }

    /// The asset documents themselves, for `audio-worker audit`, which only reads them (its
    /// cursor over every saved document and its look-ups by `asset_id` are its own).
    pub fn documents(&self) -> &Collection<Document> {
        &self.collection
    }
}

/// The fields a save needs back from the asset's document when it takes the lease
/// ([`SavedState`], the lease itself): a projection, so the server does not send back the
/// whole document (its text, URLs and tags) with every update.
fn save_state_fields() -> Document {
    doc! {
        "status": 1, "version": 1, "created_at": 1, "checksum.sha256": 1, "storage.key": 1,
        "storage.derived": 1, "job": 1, "lease": 1,
    }
}

/// MongoDB's largest document, less room for the fields the worker adds after this check.
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024 - 64 * 1024;

/// The save an asset holds, as far as the next save needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedState {
    /// The document's version.
    pub version: i64,
    /// When the asset was first saved: a commit of the next save reports it without reading
    /// the document back.
    pub created_at: DateTime<Utc>,
    /// SHA-256 of the bytes at `key`.
    pub sha256: String,
    /// Where those bytes are: the object key (its extension is the saved format's).
    pub key: String,
    /// The files stored beside it (waveform, renditions) as `(key, sha256)`, from the
    /// document's `storage.derived`.
    pub derived: Vec<(String, String)>,
    /// The generation of the job that saved it; `None` for a save older than generations.
    pub generation: Option<DateTime<Utc>>,
    /// The fingerprint of the job that saved it; `None` for a save older than fingerprints.
    pub fingerprint: Option<String>,
}

impl SavedState {
    /// The saved state of a document, `None` when it holds no save (a pending first save).
    fn of(document: &Document) -> Option<Self> {
        if document.get_str("status").ok() != Some("saved") {
            return None;
        }
        let provenance = document.get_document("job").ok();
        let generation = provenance
            .and_then(|j| j.get_datetime("generation").ok())
            .and_then(|d| DateTime::<Utc>::from_timestamp_millis(d.timestamp_millis()));
        let fingerprint = provenance.and_then(|j| j.get_str("fingerprint").ok()).map(str::to_owned);
        let saved_entry = entry(document).ok()?;
        Some(Self {
            version: saved_entry.version,
            created_at: saved_entry.created_at,
            sha256: document
                .get_document("checksum")
                .and_then(|c| c.get_str("sha256"))
                .unwrap_or_default()
                .to_owned(),
            key: document
                .get_document("storage")
                .and_then(|s| s.get_str("key"))
                .unwrap_or_default()
                .to_owned(),
            derived: document
                .get_document("storage")
                .and_then(|s| s.get_array("derived"))
                .map(|list| {
                    list.iter()
                        .filter_map(|d| d.as_document())
                        .map(|d| {
                            let text = |f| d.get_str(f).unwrap_or_default().to_owned();
                            (text("key"), text("sha256"))
                        })
                        .collect()
                })
                .unwrap_or_default(),
            generation,
            fingerprint,
        })
    }

    /// Every key this save holds: the audio's, then the derived ones.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.key.as_str()).chain(self.derived.iter().map(|(k, _)| k.as_str()))
    }

    /// True when this save is the take `sha256` at `key` with exactly the files `derived`
    /// (`(key, sha256)`) beside it: saving it again changes no byte.
    pub fn is_same_take(&self, sha256: &str, key: &str, derived: &[(String, String)]) -> bool {
        self.sha256 == sha256 && self.key == key && self.derived == derived
    }

    /// [`SavedState::is_same_take`] of a stored object.
    pub fn holds(&self, object: &StoredObject) -> bool {
        let derived: Vec<(String, String)> =
            object.derived().into_iter().map(|d| (d.key.clone(), d.sha256.clone())).collect();
        self.is_same_take(&object.sha256, &object.key, &derived)
    }

    /// True when this save is another job's, asked for after `job` was: `job` must not replace
    /// it. A save by the same job (a redelivery, a copy published twice) never supersedes it.
    pub fn supersedes(&self, job: &Job) -> bool {
        self.fingerprint.as_deref() != Some(job.provenance.fingerprint.as_str())
            && self.generation.is_some_and(|g| g > job.provenance.generation)
    }
}

/// A saved asset's keys, as [`Catalog::saved_asset`] reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedAsset {
    /// The document's version.
    pub version: i64,
    /// The audio's object key.
    pub key: String,
    /// The audio's Content-Type.
    pub content_type: String,
    /// The waveform file's key, when one is stored.
    pub waveform_key: Option<String>,
    /// Each stored rendition as `(name, key)`, in the document's order.
    pub renditions: Vec<(String, String)>,
}

/// What [`Catalog::find_saved`] found.
#[allow(clippy::large_enum_variant)] // made once per job whose audio is gone, and moved once
#[derive(Debug, Clone)]
pub enum FoundSave {
    /// No save for the asset (or only a pending one).
    None,
    /// This job's own save: the object and the catalog's entry.
    Mine(StoredObject, CatalogEntry),
    /// Another job's save, at this version.
    Other {
        /// Its version.
        version: i64,
    },
}

/// The permanent error for a document of another customer or user, if `existing` is one.
fn other_tenant(job: &Job, existing: &Document) -> Option<StageError> {
    let other = existing.get_str("customer_id").ok() != Some(job.customer_id.as_str())
        || existing.get_str("user_id").ok() != Some(job.user_id.as_str());
    other.then(|| {
        StageError::permanent(
            Stage::Catalog,
            format!("asset_id {} already belongs to another customer or user", job.asset_id),
        )
    })
}

/// A field written by [`derived_fields`], read back.
fn from_json_bson<T: serde::de::DeserializeOwned>(value: &bson::Bson) -> Option<T> {
    let json = value.clone().into_relaxed_extjson();
    serde_json::from_value(json).ok()
}

fn bson_time(t: DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(t.timestamp_millis())
}

/// The update of a save with new bytes: everything set, `version` + 1.
fn save_update(job: &Job, object: &StoredObject) -> Document {
    let now = bson_time(Utc::now());
    let mut update = doc! {
        "$set": {
            "status": "saved",
            "storage": {
                "bucket": &object.bucket,
                "key": &object.key,
                "size": i64::try_from(object.size).unwrap_or(i64::MAX),
                "content_type": &object.content_type,
                "etag": &object.etag,
                "url": &object.url,
                "url_expires_at": object.url_expires_at.map(bson_time),
                "delivery": object.delivery.as_str(),
                "derived": object
                    .derived()
                    .into_iter()
                    .map(|d| doc! { "key": &d.key, "sha256": &d.sha256 })
                    .collect::<Vec<_>>(),
            },
            "checksum": { "sha256": &object.sha256 },
            "tts": {
                "text": &job.tts.text,
                "voice": &job.tts.voice,
                "voice_name": &job.tts.voice_name,
                "language": &job.tts.language,
                "speed": job.tts.speed,
                "model": &job.tts.model,
            },
            "job": {
                "fingerprint": &job.provenance.fingerprint,
                "generation": bson_time(job.provenance.generation),
            },
            "duration": job.duration,
            "measured_duration": object.measured_duration,
            "duration_mismatch": object
                .measured_duration
                .is_some_and(|m| (m - job.duration).abs() > DURATION_TOLERANCE_SECS),
            "analysis": object.analysis.as_ref().and_then(|a| bson::to_bson(a).ok()),
            "folder": job.folder.clone(),
            "tags": job.tags.clone(),
            "updated_at": now,
        },
        "$inc": { "version": 1_i64 },
    };
    if let Ok(set) = update.get_document_mut("$set") {
        set.extend(derived_fields(object));
    }
    update
}

/// The document's `waveform`, `renditions` and `renditions_skipped`, as `audio.saved` carries
/// them (JSON turned into BSON: times as RFC 3339 strings, sizes as integers).
fn derived_fields(object: &StoredObject) -> Document {
    let bson_of = |v: serde_json::Value| bson::to_bson(&v).unwrap_or(bson::Bson::Null);
    let mut fields = Document::new();
    fields.insert("waveform", object.waveform.as_ref().map_or(bson::Bson::Null, |w| bson_of(json(w))));
    fields.insert("renditions", bson_of(json(&object.renditions)));
    fields.insert("renditions_skipped", bson_of(json(&object.renditions_skipped)));
    fields
}

fn json(value: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// The BSON size of `job`'s document with the largest object fields the worker writes (keys,
/// URLs and ETags of a few KiB): checked before the download, so a job whose own fields do not
/// fit is refused before its audio replaces anything.
fn document_size(job: &Job) -> usize {
    let long = "x".repeat(4096);
    let placeholder = StoredObject {
        bucket: long.clone(),
        key: long.clone(),
        size: u64::MAX,
        content_type: long.clone(),
        etag: long.clone(),
        sha256: "0".repeat(64),
        measured_duration: Some(0.0),
        analysis: None,
        url: long,
        url_expires_at: Some(Utc::now()),
        delivery: DeliveryMode::CloudFront,
        waveform: None,
        renditions: Vec::new(),
        renditions_skipped: Vec::new(),
    };
    let update = save_update(job, &placeholder);
    update.get_document("$set").ok().and_then(|set| bson::to_vec(set).ok()).map_or(usize::MAX, |b| b.len())
}

/// The version and creation time of a saved document.
fn entry(saved: &Document) -> Result<CatalogEntry, StageError> {
    let version = match saved.get("version") {
        Some(bson::Bson::Int64(v)) => *v,
        Some(bson::Bson::Int32(v)) => i64::from(*v),
        other => {
            return Err(StageError::permanent(
                Stage::Catalog,
                format!("document has no integer version: {other:?}"),
            ));
        }
    };
    let created_at = saved
        .get_datetime("created_at")
        .ok()
        .and_then(|d| DateTime::<Utc>::from_timestamp_millis(d.timestamp_millis()))
        .unwrap_or_else(Utc::now);
    Ok(CatalogEntry { version, created_at })
}

/// A MongoDB operation bounded in time: past `limit` it is dropped (the driver closes its
/// connection) and fails as a transient error naming `MONGODB_OPERATION_TIMEOUT_SECS`.
trait Bounded<T>: IntoFuture<Output = mongodb::error::Result<T>> + Sized {
    /// The operation's result, its error classified ([`classify`]).
    fn within(self, limit: Duration) -> impl Future<Output = Result<T, StageError>> + Send
    where
        Self::IntoFuture: Send,
    {
        let operation = self.within_raw(limit);
        async move { operation.await?.map_err(classify) }
    }

    /// The driver's own result, or the timeout's error: for callers that branch on the
    /// driver's error (a duplicate key).
    fn within_raw(
        self,
        limit: Duration,
    ) -> impl Future<Output = Result<mongodb::error::Result<T>, StageError>> + Send
    where
        Self::IntoFuture: Send,
    {
        let operation = self.into_future();
        async move {
            tokio::time::timeout(limit, operation).await.map_err(|_| {
                StageError::transient(
                    Stage::Catalog,
                    format!(
                        "MongoDB did not answer within MONGODB_OPERATION_TIMEOUT_SECS={} s",
                        limit.as_secs()
                    ),
                )
            })
        }
    }
}

impl<T, F: IntoFuture<Output = mongodb::error::Result<T>>> Bounded<T> for F {}

fn error_code(error: &mongodb::error::Error) -> Option<i32> {
    match error.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => Some(w.code),
        _ => None,
    }
}

/// Network, pool and server-selection errors and anything the driver labels retryable are
/// transient; the rest (bad command, validation, auth) are permanent.
fn classify(error: mongodb::error::Error) -> StageError {
    let text = chain(&error);
    let transient = matches!(
        error.kind.as_ref(),
        ErrorKind::Io(_) | ErrorKind::ServerSelection { .. } | ErrorKind::ConnectionPoolCleared { .. }
    ) || error.contains_label("RetryableWriteError")
        || error.contains_label("TransientTransactionError")
        || error.contains_label("ResetPool")
        || matches!(
            error_code(&error),
            Some(6 | 7 | 89 | 91 | 189 | 262 | 9001 | 10107 | 11600 | 11602 | 13435 | 13436)
        );
    if transient {
        StageError::transient(Stage::Catalog, text)
    } else {
        StageError::permanent(Stage::Catalog, text)
    }
}
