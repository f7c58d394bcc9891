//! Stage 3: upsert the asset's document in MongoDB (collection `audio_assets`).
//!
//! One document per `asset_id` (unique index). The upsert sets `created_at` only on insert and
//! increments `version` each time new bytes are saved, so the first save gives version 1 and
//! each later one with different bytes +1; saving the same bytes again (a redelivery) keeps it.
//! The filter includes the tenant: a job naming another tenant's `asset_id` cannot overwrite its
//! document; it runs into the unique index and fails permanently.

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
        Ok(Self { collection: database.collection(&settings.collection), database })
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

    /// Upserts the document of `job`, stored as `object`. `asset_id` is the idempotency key:
    ///
    /// - same bytes as the stored version (same SHA-256): nothing changes but the presigned URL,
    ///   and the version stays, so a redelivered job reports the same version (and event id);
    /// - new bytes, or no document yet: everything is set and `version` goes up by one;
    /// - two deliveries racing on a first save: one inserts, the other hits the unique index,
    ///   finds the same bytes on the next round and reports the same version.
    ///
    /// # Errors
    /// A [`StageError`] of stage `catalog`: transient for network and server-selection errors;
    /// permanent when the `asset_id` belongs to another tenant or the server rejects the write.
    pub async fn upsert(&self, job: &Job, object: &StoredObject) -> Result<CatalogEntry, StageError> {
        let now = bson::DateTime::from_millis(Utc::now().timestamp_millis());
        let url_expires_at = bson::DateTime::from_millis(object.url_expires_at.timestamp_millis());
        let tenant = doc! {
            "asset_id": job.asset_id.to_string(),
            "customer_id": job.customer_id.as_str(),
            "user_id": job.user_id.as_str(),
        };
        let update = doc! {
            "$set": {
                "status": "saved",
                "storage": {
                    "bucket": &object.bucket,
                    "key": &object.key,
                    "size": i64::try_from(object.size).unwrap_or(i64::MAX),
                    "content_type": &object.content_type,
                    "etag": &object.etag,
                    "url": &object.url,
                    "url_expires_at": url_expires_at,
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
                "duration": job.duration,
                "measured_duration": object.measured_duration,
                "duration_mismatch": object
                    .measured_duration
                    .is_some_and(|m| (m - job.duration).abs() > DURATION_TOLERANCE_SECS),
                "folder": job.folder.clone(),
                "tags": job.tags.clone(),
                "updated_at": now,
            },
            "$setOnInsert": { "created_at": now },
            "$inc": { "version": 1_i64 },
        };
        for _ in 0..3 {
            // New bytes (or a new asset) first: the common case is then one round trip. When the
            // stored bytes are the same, the filter misses and the insert hits the unique index.
            let mut new_bytes = tenant.clone();
            new_bytes.insert("checksum.sha256", doc! { "$ne": &object.sha256 });
            let result = self
                .collection
                .find_one_and_update(new_bytes, update.clone())
                .upsert(true)
                .return_document(ReturnDocument::After)
                .await;
            match result {
                Ok(Some(saved)) => return entry(&saved),
                Ok(None) => {}
                Err(e) if error_code(&e) == Some(DUPLICATE_KEY) => {}
                Err(e) => return Err(classify(e)),
            }
            // Same bytes again (a redelivery): only the presigned URL changes, not the version.
            let mut same_bytes = tenant.clone();
            same_bytes.insert("checksum.sha256", &object.sha256);
            let refreshed = self
                .collection
                .find_one_and_update(
                    same_bytes,
                    doc! { "$set": { "storage.url": &object.url, "storage.url_expires_at": url_expires_at } },
                )
                .return_document(ReturnDocument::After)
                .await
                .map_err(classify)?;
            if let Some(saved) = refreshed {
                return entry(&saved);
            }
            if let Some(conflict) = self.tenant_conflict(job).await? {
                return Err(conflict);
            }
        }
        Err(StageError::transient(
            Stage::Catalog,
            format!("asset {} kept changing under concurrent saves", job.asset_id),
        ))
    }

    /// Fails when `job`'s `asset_id` already belongs to another customer or user: checked before
    /// anything is downloaded or uploaded, so such a job leaves nothing behind. (The upsert's
    /// tenant filter still guards the document if two tenants race.)
    ///
    /// # Errors
    /// A permanent `catalog` error for a foreign asset; network and server errors as usual.
    pub async fn ensure_owner(&self, job: &Job) -> Result<(), StageError> {
        match self.tenant_conflict(job).await? {
            Some(conflict) => Err(conflict),
            None => Ok(()),
        }
    }

    /// The saved object and version of `job`'s asset for the same tenant, if there is one.
    ///
    /// # Errors
    /// Network and server errors, classified like the upsert's.
    pub async fn find_saved(&self, job: &Job) -> Result<Option<(StoredObject, CatalogEntry)>, StageError> {
        let filter = doc! {
            "asset_id": job.asset_id.to_string(),
            "customer_id": job.customer_id.as_str(),
            "user_id": job.user_id.as_str(),
            "status": "saved",
        };
        let Some(saved) = self.collection.find_one(filter).await.map_err(classify)? else { return Ok(None) };
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
        Ok(Some((object, entry(&saved)?)))
    }

    /// A duplicate key on upsert means either a concurrent first save of the same asset (go
    /// round again: the next pass finds the document) or an `asset_id` owned by another tenant
    /// (permanent: never overwrite it).
    async fn tenant_conflict(&self, job: &Job) -> Result<Option<StageError>, StageError> {
        let existing = self
            .collection
            .find_one(doc! { "asset_id": job.asset_id.to_string() })
            .await
            .map_err(classify)?;
        let other_tenant = existing.is_some_and(|d| {
            d.get_str("customer_id").ok() != Some(job.customer_id.as_str())
                || d.get_str("user_id").ok() != Some(job.user_id.as_str())
        });
        Ok(other_tenant.then(|| {
            StageError::permanent(
                Stage::Catalog,
                format!("asset_id {} already belongs to another customer or user", job.asset_id),
            )
        }))
    }
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
