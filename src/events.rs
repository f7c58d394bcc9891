//! The events the worker publishes on the `audio.events` topic exchange. JSON Schemas:
//! `schemas/audio-saved.v1.json` and `schemas/audio-failed.v1.json`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::asset::{CatalogEntry, StoredObject};
use crate::error::{ErrorClass, Stage};
use crate::job::Job;

/// Routing key of [`AudioSaved`].
pub const SAVED_ROUTING_KEY: &str = "audio.saved";
/// Routing key of [`AudioFailed`].
pub const FAILED_ROUTING_KEY: &str = "audio.failed";

/// Published once an asset is stored and catalogued (routing key `audio.saved`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioSaved {
    /// Derived from `asset_id` and `version` (UUID v5), so a redelivered job that saves the
    /// same version publishes the same id and consumers can drop the duplicate.
    pub event_id: Uuid,
    /// Always `audio.saved`.
    pub event_type: String,
    /// The asset saved, as the job named it: what the api-server matches the event with.
    pub asset_id: Uuid,
    /// The job's tenant, so a subscriber can route or check the event without a lookup.
    pub customer_id: String,
    /// The job's user within the tenant, for the same reason.
    pub user_id: String,
    /// Where the audio is and how to fetch it.
    pub storage: EventStorage,
    /// Seconds of audio, from the job.
    pub duration: f64,
    /// The document's version after this save (1 = first save).
    pub version: i64,
    /// When the event was made.
    pub occurred_at: DateTime<Utc>,
    /// What the take sounds like (loudness, silence, clipping, format), so a subscriber can
    /// flag a quiet or clipped take without fetching it; absent with `ANALYSIS=off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<crate::audio::measure::AnalysisOutcome>,
    /// Waveform peaks for a player (audiowaveform JSON v2): key, URL and shape, or
    /// `{skipped}`; absent with `WAVEFORM=off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waveform: Option<crate::asset::WaveformOutcome>,
    /// The renditions stored beside the audio (`RENDITIONS`): each with its key, URL,
    /// Content-Type, size, SHA-256 and the bytes it saves against the original. Absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub renditions: Vec<crate::asset::RenditionObject>,
    /// The renditions asked for that do not apply to this take (`{name, reason}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub renditions_skipped: Vec<crate::audio::rendition::Skipped>,
    /// The batch the job was an item of (absent for single jobs); its `audio.batch.completed`
    /// follows once every item is settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<Uuid>,
    /// With `batch_id`: the item's 0-based index in the batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_index: Option<u32>,
}

/// The `storage` object of [`AudioSaved`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventStorage {
    /// The bucket holding the object (`S3_BUCKET`): with `key`, the object's address for
    /// services holding S3 credentials.
    pub bucket: String,
    /// `{customer_id}/{user_id}/audio/{asset_id}.{ext}`.
    pub key: String,
    /// Object size in bytes.
    pub size: u64,
    /// For clients without S3 credentials: a presigned GET URL, a public CDN URL or a
    /// CloudFront signed URL, as `delivery` says.
    pub url: String,
    /// What kind of URL `url` is (and the waveform's and renditions' are): `presigned`,
    /// `public` or `cloudfront` (`DELIVERY`).
    pub delivery: crate::delivery::DeliveryMode,
    /// When `url` stops working (a presigned one at most 7 days after the save); `null` for a
    /// public URL, which does not.
    pub url_expires_at: Option<DateTime<Utc>>,
    /// From the sniffed format, e.g. `audio/wav`, as the object is served.
    pub content_type: String,
}

impl AudioSaved {
    /// The event for a saved job.
    pub fn new(job: &Job, object: &StoredObject, entry: &CatalogEntry) -> Self {
        Self {
            event_id: Uuid::new_v5(&job.asset_id, format!("audio.saved/{}", entry.version).as_bytes()),
            event_type: SAVED_ROUTING_KEY.into(),
            asset_id: job.asset_id,
            customer_id: job.customer_id.to_string(),
            user_id: job.user_id.to_string(),
            storage: EventStorage {
                bucket: object.bucket.clone(),
                key: object.key.clone(),
                size: object.size,
                url: object.url.clone(),
                delivery: object.delivery,
                url_expires_at: object.url_expires_at,
                content_type: object.content_type.clone(),
            },
            duration: job.duration,
            version: entry.version,
            occurred_at: Utc::now(),
            analysis: object.analysis.clone(),
            waveform: object.waveform.clone(),
            renditions: object.renditions.clone(),
            renditions_skipped: object.renditions_skipped.clone(),
            batch_id: job.batch.map(|b| b.batch_id),
            batch_index: job.batch.map(|b| b.index),
        }
    }
}

/// Published when a job is dead-lettered, or ends superseded by a newer save of its asset
/// (routing key `audio.failed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioFailed {
    /// UUID v5 of the asset, the job's fingerprint and its attempts so far, so the same failure
    /// published twice (a dead letter confirmed but its ack lost) has the same id and consumers
    /// can drop the duplicate.
    pub event_id: Uuid,
    /// Always `audio.failed`.
    pub event_type: String,
    /// The job's `asset_id` as sent (it may not be a UUID when the job was invalid).
    pub asset_id: Option<String>,
    /// Tenant, when the job parsed.
    pub customer_id: Option<String>,
    /// Owner, when the job parsed.
    pub user_id: Option<String>,
    /// Stage that failed: parse, download, upload, catalog or publish.
    pub stage: Stage,
    /// transient (retries exhausted) or permanent.
    pub error_class: ErrorClass,
    /// The cause, as in the dead-letter headers.
    pub reason: String,
    /// Attempts made at the failing stage, all deliveries together.
    pub attempts: u32,
    /// Set when the job was not dead-lettered but superseded: the version of the newer save
    /// that stays (the job's audio was never stored). Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by_version: Option<i64>,
    /// The batch the job was an item of (absent for single jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<Uuid>,
    /// With `batch_id`: the item's 0-based index in the batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_index: Option<u32>,
    /// When the event was made.
    pub occurred_at: DateTime<Utc>,
}

impl AudioFailed {
    /// The event for a job that could not be processed; `job` is `None` when it did not parse.
    /// `fingerprint` is the job's (or [`crate::job::raw_fingerprint`] of a body that did not
    /// parse).
    pub fn new(
        job: Option<&Job>,
        raw_asset_id: Option<String>,
        fingerprint: &str,
        stage: Stage,
        error_class: ErrorClass,
        reason: &str,
        attempts: u32,
    ) -> Self {
        let name = format!("audio.failed/{fingerprint}/{attempts}");
        let event_id = match job.map(|j| j.asset_id).or_else(|| raw_asset_id.as_deref()?.parse().ok()) {
            Some(asset_id) => Uuid::new_v5(&asset_id, name.as_bytes()),
            None => Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                format!("{}/{name}", raw_asset_id.as_deref().unwrap_or_default()).as_bytes(),
            ),
        };
        Self {
            event_id,
            event_type: FAILED_ROUTING_KEY.into(),
            asset_id: job.map(|j| j.asset_id.to_string()).or(raw_asset_id),
            customer_id: job.map(|j| j.customer_id.to_string()),
            user_id: job.map(|j| j.user_id.to_string()),
            stage,
            error_class,
            reason: reason.to_owned(),
            attempts,
            superseded_by_version: None,
            batch_id: job.and_then(|j| j.batch).map(|b| b.batch_id),
            batch_index: job.and_then(|j| j.batch).map(|b| b.index),
            occurred_at: Utc::now(),
        }
    }

    /// Marks the event as a superseded job's: `superseded_by_version` is the newer save's.
    pub fn superseded_by(mut self, version: i64) -> Self {
        self.superseded_by_version = Some(version);
        self
    }

    /// Fills `customer_id`/`user_id` of an event for a job that did not parse from its raw body,
    /// when they are valid key segments there (see [`crate::job::sniff_tenant`]), and its batch
    /// when the body names one.
    pub fn with_tenant_of(mut self, body: &[u8]) -> Self {
        if self.customer_id.is_none() && self.user_id.is_none() {
            (self.customer_id, self.user_id) = crate::job::sniff_tenant(body);
        }
        if self.batch_id.is_none()
            && let Some(item) = crate::job::sniff_batch_item(body)
        {
            (self.batch_id, self.batch_index) = (Some(item.batch_id), Some(item.index));
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(value: &serde_json::Value) -> Vec<String> {
        let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }

    /// The keys the schema lists (its `properties`), after checking that every required one is
    /// among them.
    fn schema_keys(schema: &serde_json::Value) -> Vec<String> {
        let mut keys: Vec<String> = schema["properties"].as_object().unwrap().keys().cloned().collect();
        keys.sort();
        for required in schema["required"].as_array().unwrap() {
            assert!(keys.iter().any(|k| k == required.as_str().unwrap()), "{required} is not a property");
        }
        keys
    }

    /// The keys the schema requires.
    fn required_keys(schema: &serde_json::Value) -> Vec<String> {
        let mut keys: Vec<String> =
            schema["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
        keys.sort();
        keys
    }

    /// The schema files in the repo describe exactly what is published.
    #[test]
    fn events_match_their_schemas() {
        let saved_schema: serde_json::Value =
            serde_json::from_str(include_str!("../schemas/audio-saved.v1.json")).unwrap();
        let failed_schema: serde_json::Value =
            serde_json::from_str(include_str!("../schemas/audio-failed.v1.json")).unwrap();
        let base = crate::url_policy::UrlPolicy::for_base(url::Url::parse("http://h").unwrap());
        // A batch item, so the optional batch fields are there too.
        let mut item = crate::job::tests::job_json();
        item["batch_id"] = "0d9f7a34-5b1c-4f3e-9a2d-6c8b1e4f7a20".into();
        item["batch_index"] = 4.into();
        let job = crate::job::SaveAudioJob::parse(item.to_string().as_bytes(), &base).unwrap();
        let object = StoredObject {
            bucket: "b".into(),
            key: "k".into(),
            size: 3,
            content_type: "audio/wav".into(),
            etag: "e".into(),
            sha256: "s".into(),
            measured_duration: Some(1.5),
            analysis: Some(crate::audio::measure::AnalysisOutcome::Skipped { skipped: "opus".into() }),
            url: "http://u".into(),
            url_expires_at: Some(Utc::now()),
            delivery: crate::delivery::DeliveryMode::Presigned,
            waveform: Some(crate::asset::WaveformOutcome::Skipped { skipped: "opus".into() }),
            renditions: Vec::new(),
            renditions_skipped: vec![crate::audio::rendition::Skipped {
                name: "vorbis".into(),
                reason: "the source is Ogg Vorbis already".into(),
            }],
        };
        let mut object = object;
        object.attach(
            &crate::audio::encoded::EncodedKind::Rendition(crate::audio::encoded::RenditionInfo {
                rendition: crate::audio::rendition::Rendition::Flac,
                bitrate_kbps: None,
            }),
            crate::asset::DerivedObject {
                key: "k.flac.flac".into(),
                content_type: "audio/flac".into(),
                size: 2,
                sha256: "s".into(),
                url: "http://u".into(),
                url_expires_at: Some(Utc::now()),
            },
        );
        let saved = AudioSaved::new(&job, &object, &CatalogEntry { version: 2, created_at: Utc::now() });
        let saved = serde_json::to_value(&saved).unwrap();
        assert_eq!(keys(&saved), schema_keys(&saved_schema));
        assert_eq!(keys(&saved["storage"]), schema_keys(&saved_schema["properties"]["storage"]));
        assert_eq!(saved["event_id"], Uuid::new_v5(&job.asset_id, b"audio.saved/2").to_string());
        let failed =
            AudioFailed::new(Some(&job), None, "fp", Stage::Download, ErrorClass::Permanent, "HTTP 404", 1);
        let failed = serde_json::to_value(&failed).unwrap();
        let mut expected = required_keys(&failed_schema);
        expected.extend(["batch_id".to_owned(), "batch_index".to_owned()]);
        expected.sort();
        assert_eq!(keys(&failed), expected, "superseded_by_version is optional");
        assert_eq!(
            (failed["batch_id"].as_str(), failed["batch_index"].as_u64()),
            (Some(item["batch_id"].as_str().unwrap()), Some(4))
        );
        assert_eq!(failed["stage"], "download");
        assert_eq!(failed["error_class"], "permanent");
        assert_eq!(failed["event_id"], Uuid::new_v5(&job.asset_id, b"audio.failed/fp/1").to_string());
    }

    #[test]
    fn failure_ids_repeat_for_the_same_failure_and_differ_for_another() {
        let id = |asset: Option<&str>, fp: &str, attempts| {
            AudioFailed::new(
                None,
                asset.map(Into::into),
                fp,
                Stage::Parse,
                ErrorClass::Permanent,
                "x",
                attempts,
            )
            .event_id
        };
        let asset = Some("6f1c2a4e-8d3b-4b7a-9a51-2f0e5c7d9b10");
        assert_eq!(id(asset, "m1", 3), id(asset, "m1", 3));
        assert_ne!(id(asset, "m1", 3), id(asset, "m1", 4), "another terminal attempt");
        assert_ne!(id(asset, "m1", 3), id(asset, "m2", 3), "another job");
        assert_eq!(id(Some("not-a-uuid"), "m1", 1), id(Some("not-a-uuid"), "m1", 1));
        assert_ne!(id(Some("not-a-uuid"), "m1", 1), id(None, "m1", 1));
    }

    #[test]
    fn a_failed_event_for_an_unparsed_job_names_its_valid_tenant_ids() {
        let mut body = crate::job::tests::job_json();
        body["audio_url"] = "http://169.254.169.254/".into();
        body["user_id"] = "../x".into();
        let body = serde_json::to_vec(&body).unwrap();
        let event = AudioFailed::new(None, None, "fp", Stage::Parse, ErrorClass::Permanent, "refused", 1)
            .with_tenant_of(&body);
        assert_eq!(event.customer_id.as_deref(), Some("cust_42"));
        assert_eq!(event.user_id, None, "an invalid id is not repeated");
        let none = AudioFailed::new(None, None, "fp", Stage::Parse, ErrorClass::Permanent, "x", 1)
            .with_tenant_of(b"not json");
        assert_eq!((none.customer_id, none.user_id), (None, None));
    }
}
