//! Stage 3: the asset's document in MongoDB (collection `audio_assets`), the record of what the
//! library holds.
//!
//! One document per `asset_id` (unique index); every filter includes the tenant, so a job naming
//! another tenant's `asset_id` cannot touch its document (it runs into the unique index and fails
//! permanently). A save goes: [`Catalog::precheck`] before the download (tenant, size, a newer
//! save), [`Catalog::acquire`] of the asset's save lease (saves of one asset never interleave),
//! the upload, then [`Catalog::commit`], which records the save and gives the lease up in one
//! update. `version` is 1 on the first save and +1 on each save of new bytes; saving the same
//! bytes again (a redelivery) keeps it. The document also records the job's fingerprint and
//! generation (`job.fingerprint`, `job.generation`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use mongodb::bson::{self, Document, doc};
use mongodb::error::ErrorKind;
use mongodb::options::{ClientOptions, IndexOptions, ReturnDocument};
use mongodb::{Collection, IndexModel};

use crate::asset::{CatalogEntry, StoredObject};
use crate::config::MongoSettings;
use crate::error::{Stage, StageError, chain};
use crate::job::Job;

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
        self.database.run_command(doc! { "ping": 1 }).await.map_err(classify)?;
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
        self.collection.create_index(index).await.map_err(classify)?;
        Ok(())
    }

    /// What the catalog says before anything is downloaded: [`Precheck::Superseded`] when the
    /// stored save is newer than `job` (its audio is never fetched).
    ///
    /// # Errors
    /// A permanent `catalog` error when the `asset_id` belongs to another customer or user, or
    /// when the job's fields alone would make the document larger than MongoDB's 16 MiB limit
    /// (so such a job is refused before its bytes replace anything); network and server errors
    /// as usual.
    pub async fn precheck(&self, job: &Job) -> Result<Precheck, StageError> {
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
        let existing = self
            .collection
            .find_one(doc! { "asset_id": job.asset_id.to_string() })
            .await
            .map_err(classify)?;
        let Some(existing) = existing else { return Ok(Precheck::Proceed) };
        if let Some(conflict) = other_tenant(job, &existing) {
            return Err(conflict);
        }
        match SavedState::of(&existing) {
            Some(saved) if saved.supersedes(job) => Ok(Precheck::Superseded { version: saved.version }),
            _ => Ok(Precheck::Proceed),
        }
    }

    /// Takes the asset's save lease for `job`, which will write `target_key`: only the holder
    /// writes the asset's object or commits its document, so saves of one asset never
    /// interleave. Creates a pending document (no `status`) for a first save. A lease left by a
    /// holder that died is taken over once expired and returned as [`Lease::stale`], to be
    /// repaired before anything else.
    ///
    /// # Errors
    /// Transient while another job holds the lease (the job waits and tries again); permanent
    /// for another tenant's `asset_id`; network and server errors as usual.
    pub async fn acquire(&self, job: &Job, target_key: &str) -> Result<Lease, StageError> {
        let now = Utc::now();
        let token = uuid::Uuid::new_v4().to_string();
        let lease = doc! {
            "token": &token,
            "until": bson_time(now + chrono::Duration::from_std(self.lease).unwrap_or_default()),
            "target_key": target_key,
        };
        let taken = |previous: Option<SavedState>, stale| Lease {
            token: token.clone(),
            target_key: target_key.to_owned(),
            previous,
            stale,
        };
        // The common case, one round trip: no lease on the document (or no document yet).
        let mut free = self.tenant(job);
        free.insert("lease", doc! { "$exists": false });
        match self
            .collection
            .find_one_and_update(free, doc! { "$set": { "lease": lease.clone() } })
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await
        {
            Ok(Some(after)) if after.get_document("lease").and_then(|l| l.get_str("token")) == Ok(&token) => {
                return Ok(taken(SavedState::of(&after), None));
            }
            Ok(_) => {
                // MongoDB always returns the document it upserted; SecantusDB, under concurrent
                // upserts, sometimes returns none: read it back.
                let mut mine = self.tenant(job);
                mine.insert("lease.token", &token);
                let after = self.collection.find_one(mine).await.map_err(classify)?;
                return Ok(taken(after.as_ref().and_then(SavedState::of), None));
            }
            Err(e) if error_code(&e) == Some(DUPLICATE_KEY) => {}
            Err(e) => return Err(classify(e)),
        }
        // A lease is there: take it over only once it has expired, keeping what it said.
        let mut expired = self.tenant(job);
        expired.insert("lease.until", doc! { "$lt": bson_time(now) });
        let before = self
            .collection
            .find_one_and_update(expired, doc! { "$set": { "lease": lease } })
            .return_document(ReturnDocument::Before)
            .await
            .map_err(classify)?;
        if let Some(before) = before {
            let stale = before.get_document("lease").ok().map(|l| StaleLease {
                token: l.get_str("token").unwrap_or_default().to_owned(),
                target_key: l.get_str("target_key").unwrap_or_default().to_owned(),
            });
            return Ok(taken(SavedState::of(&before), stale));
        }
        Err(match self.tenant_conflict(job).await? {
            Some(conflict) => conflict,
            None => StageError::transient(
                Stage::Catalog,
                format!("asset {} is being saved by another job (its save lease is held)", job.asset_id),
            ),
        })
    }

    /// Commits a save under `lease`: sets the storage, checksum, TTS fields and provenance, bumps
    /// `version` (new bytes), and gives the lease up, in one update. With the same bytes as the
    /// stored save only the presigned URL changes (the version and its event id stay).
    ///
    /// # Errors
    /// Transient when the lease was lost (it expired and another job took it) or for network and
    /// server errors; permanent when the server rejects the write.
    pub async fn commit(
        &self,
        job: &Job,
        lease: &Lease,
        object: &StoredObject,
    ) -> Result<CatalogEntry, StageError> {
        let mut filter = self.tenant(job);
        filter.insert("lease.token", &lease.token);
        let same_bytes =
            lease.previous.as_ref().is_some_and(|p| p.sha256 == object.sha256 && p.key == object.key);
        let update = if same_bytes {
            doc! {
                "$set": { "storage.url": &object.url, "storage.url_expires_at": bson_time(object.url_expires_at) },
                "$unset": { "lease": "" },
            }
        } else {
            let mut update = save_update(job, object);
            if lease.previous.is_none()
                && let Ok(set) = update.get_document_mut("$set")
            {
                // A first save: created when it is committed, not when its lease was taken.
                let updated_at = set.get("updated_at").cloned().unwrap_or(bson::Bson::Null);
                set.insert("created_at", updated_at);
            }
            update.insert("$unset", doc! { "lease": "" });
            update
        };
        let saved = self
            .collection
            .find_one_and_update(filter, update)
            .return_document(ReturnDocument::After)
            .await
            .map_err(classify)?;
        match saved {
            Some(saved) => entry(&saved),
            None => Err(StageError::transient(
                Stage::Catalog,
                format!("the save lease of asset {} expired before the commit", job.asset_id),
            )),
        }
    }

    /// Extends `lease` by another `SAVE_LEASE_SECS` from now. Its holder calls this every third
    /// of the lease while it works, so only a holder that died loses it.
    ///
    /// # Errors
    /// Transient when the lease is no longer this holder's (it expired and was taken over) or
    /// MongoDB does not answer.
    pub async fn renew(&self, job: &Job, lease: &Lease) -> Result<(), StageError> {
        let mut mine = self.tenant(job);
        mine.insert("lease.token", &lease.token);
        let until = bson_time(Utc::now() + chrono::Duration::from_std(self.lease).unwrap_or_default());
        let renewed = self
            .collection
            .update_one(mine, doc! { "$set": { "lease.until": until } })
            .await
            .map_err(classify)?;
        if renewed.matched_count == 0 {
            return Err(StageError::transient(
                Stage::Catalog,
                format!("the save lease of asset {} was lost", job.asset_id),
            ));
        }
        Ok(())
    }

    /// How often a lease holder renews its lease.
    pub fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    /// Gives up `lease` without a commit: a pending first-save document goes away with it, a
    /// saved one keeps its save. When MongoDB does not answer, a background task tries again
    /// every [`RELEASE_RETRY`] for up to [`RELEASE_GIVE_UP`], so an outage does not hold the
    /// asset for a whole lease nor leave a first save's pending document behind.
    pub async fn release(&self, job: &Job, lease: &Lease) {
        let mut mine = self.tenant(job);
        mine.insert("lease.token", &lease.token);
        if let Err(e) = self.try_release(&mine).await {
            tracing::warn!(error = %chain(&e), "releasing the save lease failed; trying again in the background");
            let this = self.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + RELEASE_GIVE_UP;
                while tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(RELEASE_RETRY).await;
                    if this.try_release(&mine).await.is_ok() {
                        tracing::info!("save lease released after all");
                        return;
                    }
                }
            });
        }
    }

    /// One attempt of [`Catalog::release`] for the lease named by `mine` (tenant and token).
    async fn try_release(&self, mine: &Document) -> Result<(), mongodb::error::Error> {
        let mut pending = mine.clone();
        pending.insert("status", doc! { "$exists": false });
        if self.collection.delete_one(pending).await?.deleted_count == 0 {
            self.collection.update_one(mine.clone(), doc! { "$unset": { "lease": "" } }).await?;
        }
        Ok(())
    }

    /// Hands `stale`'s record back to the document in place of `lease`, already expired, when
    /// its repair failed: the next job to take the lease repairs it. Best effort.
    pub async fn put_back_stale(&self, job: &Job, lease: &Lease, stale: &StaleLease) {
        let mut mine = self.tenant(job);
        mine.insert("lease.token", &lease.token);
        let expired =
            doc! { "token": &stale.token, "until": bson_time(Utc::now()), "target_key": &stale.target_key };
        if let Err(e) = self.collection.update_one(mine, doc! { "$set": { "lease": expired } }).await {
            tracing::warn!(error = %chain(&e), "putting a stale save lease back failed");
        }
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
        let Some(saved) = self.collection.find_one(filter).await.map_err(classify)? else {
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
            url: text("url"),
            url_expires_at: Utc::now(),
        };
        Ok(FoundSave::Mine(object, entry(&saved)?))
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
            .await
            .map_err(classify)?;
        Ok(existing.and_then(|d| other_tenant(job, &d)))
    }
}

/// How often a lease that could not be released is tried again (see [`Catalog::release`]).
pub const RELEASE_RETRY: Duration = Duration::from_secs(2);

/// How long a lease that could not be released is tried again: an expired lease no longer holds
/// the asset, but a first save's pending document should not outlive a MongoDB outage.
pub const RELEASE_GIVE_UP: Duration = Duration::from_secs(10 * 60);

/// MongoDB's largest document, less room for the fields the worker adds after this check.
pub const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024 - 64 * 1024;

/// Whether `job` may go on (see [`Catalog::precheck`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precheck {
    /// No save, or an older one: download and save.
    Proceed,
    /// The stored save is newer than the job; it stays.
    Superseded {
        /// The stored save's version.
        version: i64,
    },
}

/// The save an asset holds, as far as the next save needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedState {
    /// The document's version.
    pub version: i64,
    /// SHA-256 of the bytes at `key`.
    pub sha256: String,
    /// Where those bytes are: the object key (its extension is the saved format's).
    pub key: String,
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
        Some(Self {
            version: entry(document).ok()?.version,
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
            generation,
            fingerprint,
        })
    }

    /// True when this save is another job's, asked for after `job` was: `job` must not replace
    /// it. A save by the same job (a redelivery, a copy published twice) never supersedes it.
    pub fn supersedes(&self, job: &Job) -> bool {
        self.fingerprint.as_deref() != Some(job.provenance.fingerprint.as_str())
            && self.generation.is_some_and(|g| g > job.provenance.generation)
    }
}

/// A save lease held by a job (see [`Catalog::acquire`]).
#[derive(Debug, Clone)]
pub struct Lease {
    /// Names the holder in the document, and the holder's backup object.
    pub token: String,
    /// The object key the holder writes.
    pub target_key: String,
    /// The asset's save when the lease was taken; `None` for a first save.
    pub previous: Option<SavedState>,
    /// The expired lease this one replaced, if its holder died mid-save: what it may have left
    /// in S3 is repaired before the new save.
    pub stale: Option<StaleLease>,
}

/// What a dead holder's lease said: its token (its backup object's name) and the key it wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct StaleLease {
    /// The dead holder's token.
    pub token: String,
    /// The key the dead holder may have written without committing.
    pub target_key: String,
}

/// What [`Catalog::find_saved`] found.
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

fn bson_time(t: DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(t.timestamp_millis())
}

/// The update of a save with new bytes: everything set, `version` + 1.
fn save_update(job: &Job, object: &StoredObject) -> Document {
    let now = bson_time(Utc::now());
    doc! {
        "$set": {
            "status": "saved",
            "storage": {
                "bucket": &object.bucket,
                "key": &object.key,
                "size": i64::try_from(object.size).unwrap_or(i64::MAX),
                "content_type": &object.content_type,
                "etag": &object.etag,
                "url": &object.url,
                "url_expires_at": bson_time(object.url_expires_at),
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
            "folder": job.folder.clone(),
            "tags": job.tags.clone(),
            "updated_at": now,
        },
        "$inc": { "version": 1_i64 },
    }
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
        url: long,
        url_expires_at: Utc::now(),
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
