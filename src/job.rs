//! The `audio.save` job contract (v1) and the domain types a job is parsed into.
//!
//! Parsing is where bad input stops: once a [`Job`] exists, its tenant segments are safe object
//! key segments and its audio URL is absolute, so no later stage validates again. The JSON Schema
//! of the contract is `schemas/save-audio-job.v1.json`.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use url::Url;
use uuid::Uuid;

use crate::url_policy::UrlPolicy;

/// Why a job cannot be processed. Always permanent: the same bytes would fail again.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Not JSON, or a required field missing or of the wrong type.
    #[error("invalid job JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A field parsed but its value is not acceptable.
    #[error("invalid field {field}: {message}")]
    Field {
        /// The JSON field name.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// The job as producers send it (contract v1). Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct SaveAudioJob {
    /// The asset's UUID: the object key's file name and the idempotency key of every side effect.
    pub asset_id: String,
    /// Tenant: first segment of the object key.
    pub customer_id: String,
    /// Owner within the tenant: second segment of the object key.
    pub user_id: String,
    /// Where to download the audio: relative (`/temp/x.wav`, resolved against
    /// `AUDIO_GENERATION_SERVICE_URL`) or absolute `http(s)://`.
    pub audio_url: String,
    /// The spoken text.
    pub text: String,
    /// Length of the audio in seconds.
    pub duration: f64,
    /// TTS voice identifier.
    pub voice: String,
    /// Human-readable voice name.
    pub voice_name: String,
    /// Language tag, e.g. `en-US`.
    pub language: String,
    /// Speaking rate multiplier (1.0 = normal).
    pub speed: f64,
    /// TTS model identifier.
    pub model: String,
    /// Library folder the asset is filed in.
    #[serde(default)]
    pub folder: Option<String>,
    /// Free-form tags.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Set by the worker on the items it publishes for a batch (`audio.save.batch`, see
    /// [`crate::batch`]): the batch's UUID. Absent on single jobs, and then left out of the
    /// canonical JSON, so the fingerprints of single jobs are what they were before batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// With `batch_id`: the item's 0-based position in the batch's `items`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_index: Option<u32>,
}

/// A validated job: what every pipeline stage works from.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The asset's UUID.
    pub asset_id: Uuid,
    /// Tenant, safe as an object key segment.
    pub customer_id: KeySegment,
    /// Owner, safe as an object key segment.
    pub user_id: KeySegment,
    /// Where the audio is downloaded from.
    pub source: AudioSource,
    /// The TTS fields, stored as they came.
    pub tts: Tts,
    /// Seconds of audio, finite and non-negative.
    pub duration: f64,
    /// Library folder, if any.
    pub folder: Option<String>,
    /// Tags (empty when the job had none).
    pub tags: Vec<String>,
    /// Which job this is and when it was asked for: decides whether a stored save is this
    /// job's own, and which of two saves of the asset is newer.
    pub provenance: Provenance,
    /// The batch this job is an item of, when it is one: its terminal state is reported to the
    /// batch's tracker before the delivery is acked.
    pub batch: Option<BatchItem>,
}

/// Which batch a job belongs to, and where in it: from the job's `batch_id` and `batch_index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchItem {
    /// The batch's `batch_id`.
    pub batch_id: Uuid,
    /// The item's 0-based index in the batch's `items`.
    pub index: u32,
}

/// Who asked for a save and when. Stored in the document with the save it produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance {
    /// The job's identity: the producer's `message_id` when it set one, otherwise
    /// `sha256:{hex}` of the job's canonical JSON (the contract's fields in a fixed order,
    /// unknown fields dropped). The same job published twice, redelivered or replayed has the
    /// same fingerprint; a new take of the asset (other text, other audio URL) has another.
    pub fingerprint: String,
    /// When the producer asked: the message's AMQP `timestamp` when set, else the first time a
    /// worker saw it (kept in the `audio-worker-generation` header across delay queues, dead
    /// letters and replays). A save older than the stored one never overwrites it.
    pub generation: DateTime<Utc>,
}

/// What the transport knows about a job besides its body (see [`Provenance`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Envelope {
    /// The message's `message_id`, if the producer set a non-empty one.
    pub message_id: Option<String>,
    /// When the job was published or first seen; `None` means now.
    pub generation: Option<DateTime<Utc>>,
}

/// TTS fields of a job, stored on the document under `tts`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Tts {
    /// The spoken text.
    pub text: String,
    /// Voice identifier.
    pub voice: String,
    /// Voice display name.
    pub voice_name: String,
    /// Language tag.
    pub language: String,
    /// Speaking rate multiplier.
    pub speed: f64,
    /// Model identifier.
    pub model: String,
}

/// A customer or user id that is safe as one object key segment: 1-128 ASCII letters, digits,
/// `-` or `_`. No `/`, `..` or empty value can reach a key, so no job writes under another
/// tenant's prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeySegment(String);

impl KeySegment {
    /// Parses a segment.
    ///
    /// # Errors
    /// A message saying which rule the value breaks.
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.is_empty() || value.len() > 128 {
            return Err(format!("must be 1-128 characters, got {}", value.chars().count()));
        }
        if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
            return Err(format!("may hold only letters, digits, '-' and '_', found {bad:?}"));
        }
        Ok(Self(value.to_owned()))
    }

    /// The segment as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for KeySegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a job's audio comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioSource {
    /// Absolute URL, percent-encoded exactly once.
    pub url: Url,
    /// When the audio is a temporary file of the generation service: its cleanup URL,
    /// `{AUDIO_GENERATION_SERVICE_URL}/api/cleanup/temp/{filename}`.
    pub cleanup_url: Option<Url>,
}

impl SaveAudioJob {
    /// Parses a job's JSON body and validates it, its `audio_url` under the URL policy.
    ///
    /// # Errors
    /// [`JobError`]: always permanent.
    /// The job's provenance is its canonical fingerprint, generated now; see
    /// [`SaveAudioJob::parse_delivered`] for a job that came with an [`Envelope`].
    ///
    /// # Errors
    /// [`JobError`]: always permanent.
    pub fn parse(body: &[u8], policy: &UrlPolicy) -> Result<Job, JobError> {
        Self::parse_delivered(body, policy, &Envelope::default())
    }

    /// [`SaveAudioJob::parse`] for a delivered message: its `message_id` is the fingerprint and
    /// its generation the envelope's, when they are known.
    ///
    /// # Errors
    /// [`JobError`]: always permanent.
    pub fn parse_delivered(body: &[u8], policy: &UrlPolicy, envelope: &Envelope) -> Result<Job, JobError> {
        let raw: SaveAudioJob = serde_json::from_slice(body)?;
        let fingerprint = match &envelope.message_id {
            Some(id) => id.clone(),
            None => raw.canonical_fingerprint(),
        };
        let generation = envelope.generation.unwrap_or_else(Utc::now);
        raw.validate(policy, Provenance { fingerprint, generation })
    }

    /// `sha256:{hex}` of the job's canonical JSON: the contract's fields, serialized in their
    /// declared order (unknown fields were dropped by the parser).
    pub fn canonical_fingerprint(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("a parsed job serializes");
        format!("sha256:{}", hex::encode(Sha256::digest(canonical)))
    }

    /// Turns the wire form into a [`Job`] with its `provenance`.
    ///
    /// # Errors
    /// The first field whose value is unacceptable.
    pub fn validate(self, policy: &UrlPolicy, provenance: Provenance) -> Result<Job, JobError> {
        let field = |field: &'static str, message: String| JobError::Field { field, message };
        let asset_id =
            Uuid::parse_str(&self.asset_id).map_err(|e| field("asset_id", format!("not a UUID: {e}")))?;
        let customer_id = KeySegment::parse(&self.customer_id).map_err(|m| field("customer_id", m))?;
        let user_id = KeySegment::parse(&self.user_id).map_err(|m| field("user_id", m))?;
        if !self.duration.is_finite() || self.duration < 0.0 {
            return Err(field("duration", "must be a non-negative number of seconds".into()));
        }
        if !self.speed.is_finite() || self.speed <= 0.0 {
            return Err(field("speed", "must be a positive number".into()));
        }
        let source = resolve_audio_source(policy, &self.audio_url).map_err(|m| field("audio_url", m))?;
        let batch = match (&self.batch_id, self.batch_index) {
            (None, None) => None,
            (Some(id), Some(index)) => Some(BatchItem {
                batch_id: Uuid::parse_str(id).map_err(|e| field("batch_id", format!("not a UUID: {e}")))?,
                index,
            }),
            _ => return Err(field("batch_id", "batch_id and batch_index come together".into())),
        };
        Ok(Job {
            asset_id,
            customer_id,
            user_id,
            source,
            tts: Tts {
                text: self.text,
                voice: self.voice,
                voice_name: self.voice_name,
                language: self.language,
                speed: self.speed,
                model: self.model,
            },
            duration: self.duration,
            folder: self.folder,
            tags: self.tags.unwrap_or_default(),
            provenance,
            batch,
        })
    }
}

/// Resolves a job's `audio_url` under the URL policy: relative URLs keep the base's path (with
/// base `http://h:3000/api`, both `temp/x.wav` and `/temp/x.wav` become
/// `http://h:3000/api/temp/x.wav`); spaces and non-ASCII letters are percent-encoded and an
/// existing `%XX` is kept, so nothing is encoded twice. Audio under `{base}/temp/` gets a cleanup
/// URL.
///
/// # Errors
/// The policy's refusal as a message: empty, traversal, scheme, credentials, host not allowed,
/// non-public address.
pub fn resolve_audio_source(policy: &UrlPolicy, audio_url: &str) -> Result<AudioSource, String> {
    let url = policy.resolve(audio_url).map_err(|refused| refused.to_string())?;
    let cleanup_url = policy.cleanup_url(&url);
    Ok(AudioSource { url, cleanup_url })
}

/// Best effort: the `customer_id` and `user_id` of a body that did not parse as a job (refused
/// `audio_url`, bad `asset_id`…), each only when it is a valid [`KeySegment`], for the failure
/// event: the api-server can still tell whose job failed.
pub fn sniff_tenant(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else { return (None, None) };
    let segment = |field: &str| {
        value.get(field)?.as_str().and_then(|s| KeySegment::parse(s).ok()).map(|s| s.as_str().to_owned())
    };
    (segment("customer_id"), segment("user_id"))
}

/// The fingerprint of a body that did not parse as a job: its `message_id` when set, else
/// `sha256:{hex}` of the raw bytes. Names the failure in its deterministic `event_id`.
pub fn raw_fingerprint(body: &[u8], envelope: &Envelope) -> String {
    envelope.message_id.clone().unwrap_or_else(|| format!("sha256:{}", hex::encode(Sha256::digest(body))))
}

/// Best effort: the batch item a body that did not parse as a job claims to be (its
/// `batch_id` and `batch_index`), so its failure still reaches the batch.
pub fn sniff_batch_item(body: &[u8]) -> Option<BatchItem> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let batch_id = Uuid::parse_str(value.get("batch_id")?.as_str()?).ok()?;
    let index = u32::try_from(value.get("batch_index")?.as_u64()?).ok()?;
    Some(BatchItem { batch_id, index })
}

/// Best effort: the `asset_id` of a body that did not parse as a job, for the failure event and
/// the dead-letter headers.
pub fn sniff_asset_id(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("asset_id")?.as_str().map(|s| s.chars().take(64).collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn base(s: &str) -> UrlPolicy {
        UrlPolicy::for_base(Url::parse(s).unwrap())
    }

    pub(crate) fn job_json() -> serde_json::Value {
        serde_json::json!({
            "asset_id": "6f1c2a4e-8d3b-4b7a-9a51-2f0e5c7d9b10",
            "customer_id": "cust_42",
            "user_id": "user-7",
            "audio_url": "/temp/x.wav",
            "text": "Hello",
            "duration": 1.5,
            "voice": "en-US-1",
            "voice_name": "Ada",
            "language": "en-US",
            "speed": 1.0,
            "model": "tts-1",
            "folder": "greetings",
            "tags": ["a", "b"],
            "unknown_field": {"ignored": true}
        })
    }

    #[test]
    fn the_fingerprint_is_the_message_id_or_the_canonical_json() {
        let policy = base("http://h");
        let body = job_json();
        let fp = |json: &serde_json::Value, envelope: &Envelope| {
            SaveAudioJob::parse_delivered(json.to_string().as_bytes(), &policy, envelope)
                .unwrap()
                .provenance
                .fingerprint
        };
        let plain = fp(&body, &Envelope::default());
        assert!(plain.starts_with("sha256:") && plain.len() == 7 + 64, "{plain}");
        // Field order, whitespace and unknown fields do not change it; the text does.
        let mut reordered: serde_json::Map<String, serde_json::Value> =
            body.as_object().unwrap().clone().into_iter().rev().collect();
        reordered.insert("another_unknown".into(), 1.into());
        assert_eq!(fp(&serde_json::Value::Object(reordered), &Envelope::default()), plain);
        let mut second_take = body.clone();
        second_take["text"] = "second take".into();
        assert_ne!(fp(&second_take, &Envelope::default()), plain);
        let with_id = Envelope { message_id: Some("job-17".into()), generation: None };
        assert_eq!(fp(&body, &with_id), "job-17");
        let at = "2026-01-02T03:04:05.678Z".parse().unwrap();
        let job = SaveAudioJob::parse_delivered(
            body.to_string().as_bytes(),
            &policy,
            &Envelope { message_id: None, generation: Some(at) },
        )
        .unwrap();
        assert_eq!(job.provenance.generation, at);
        assert_eq!(raw_fingerprint(b"not json", &with_id), "job-17");
        assert!(raw_fingerprint(b"not json", &Envelope::default()).starts_with("sha256:"));
    }

    #[test]
    fn relative_urls_keep_the_base_path() {
        for b in ["http://h:3000/api", "http://h:3000/api/"] {
            for rel in ["temp/x.wav", "/temp/x.wav"] {
                let src = resolve_audio_source(&base(b), rel).unwrap();
                assert_eq!(src.url.as_str(), "http://h:3000/api/temp/x.wav", "{b} + {rel}");
            }
        }
        let src = resolve_audio_source(&base("http://h:3000"), "/temp/x.wav").unwrap();
        assert_eq!(src.url.as_str(), "http://h:3000/temp/x.wav");
    }

    #[test]
    fn names_are_percent_encoded_exactly_once() {
        let b = base("http://h:3000/api");
        let src = resolve_audio_source(&b, "/temp/my file é.wav").unwrap();
        assert_eq!(src.url.as_str(), "http://h:3000/api/temp/my%20file%20%C3%A9.wav");
        let again = resolve_audio_source(&b, "/temp/my%20file%20%C3%A9.wav").unwrap();
        assert_eq!(again.url, src.url);
        let abs = resolve_audio_source(&b, "http://h:3000/api/temp/my file é.wav").unwrap();
        assert_eq!(abs.url, src.url);
    }

    #[test]
    fn cleanup_url_only_for_the_generation_service() {
        let b = base("http://h:3000");
        let src = resolve_audio_source(&b, "/temp/my file.wav").unwrap();
        assert_eq!(src.cleanup_url.unwrap().as_str(), "http://h:3000/api/cleanup/temp/my%20file.wav");
        let other = resolve_audio_source(&b, "https://cdn.example/temp/x.wav").unwrap_err();
        assert!(other.contains("AUDIO_URL_ALLOWED_HOSTS"), "{other}");
        for not_temp in ["/other/x.wav", "/temp/sub/x.wav", "/temp/"] {
            let src = resolve_audio_source(&b, not_temp).unwrap();
            assert_eq!(src.cleanup_url, None, "{not_temp} -> {}", src.url);
        }
        let nested = resolve_audio_source(&base("http://h:3000/api/"), "temp/a%20b.wav").unwrap();
        assert_eq!(nested.cleanup_url.unwrap().as_str(), "http://h:3000/api/api/cleanup/temp/a%20b.wav");
    }

    #[test]
    fn bad_audio_urls_are_rejected() {
        let b = base("http://h:3000");
        for bad in ["", "  ", "ftp://h/x.wav", "file:///etc/passwd", "//evil/x.wav"] {
            assert!(resolve_audio_source(&b, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_full_job_parses_and_ignores_unknown_fields() {
        let body = serde_json::to_vec(&job_json()).unwrap();
        let job = SaveAudioJob::parse(&body, &base("http://h:3000")).unwrap();
        assert_eq!(job.asset_id.to_string(), "6f1c2a4e-8d3b-4b7a-9a51-2f0e5c7d9b10");
        assert_eq!(job.customer_id.as_str(), "cust_42");
        assert_eq!(job.user_id.as_str(), "user-7");
        assert_eq!(job.source.url.as_str(), "http://h:3000/temp/x.wav");
        assert_eq!(job.tts.voice_name, "Ada");
        assert_eq!(job.tags, vec!["a", "b"]);
        assert_eq!(job.folder.as_deref(), Some("greetings"));
        assert!((job.duration - 1.5).abs() < f64::EPSILON);
    }

    #[test]
    fn optional_fields_may_be_missing_or_null() {
        let mut v = job_json();
        v.as_object_mut().unwrap().remove("folder");
        v["tags"] = serde_json::Value::Null;
        let job = SaveAudioJob::parse(&serde_json::to_vec(&v).unwrap(), &base("http://h")).unwrap();
        assert_eq!(job.folder, None);
        assert!(job.tags.is_empty());
    }

    #[test]
    fn missing_or_ill_typed_required_fields_are_errors() {
        for (field, value) in [
            ("asset_id", None),
            ("text", None),
            ("duration", Some(serde_json::json!("long"))),
            ("speed", Some(serde_json::json!(null))),
            ("tags", Some(serde_json::json!("a,b"))),
        ] {
            let mut v = job_json();
            match value {
                None => {
                    v.as_object_mut().unwrap().remove(field);
                }
                Some(x) => v[field] = x,
            }
            let err = SaveAudioJob::parse(&serde_json::to_vec(&v).unwrap(), &base("http://h")).unwrap_err();
            assert!(matches!(err, JobError::Json(_)), "{field}: {err}");
        }
        assert!(SaveAudioJob::parse(b"not json", &base("http://h")).is_err());
    }

    #[test]
    fn tenant_segments_cannot_escape_their_prefix() {
        for bad in ["", "../other", "a/b", "cust 1", "ü", &"x".repeat(129)] {
            assert!(KeySegment::parse(bad).is_err(), "{bad:?}");
            let mut v = job_json();
            v["customer_id"] = serde_json::json!(bad);
            let err = SaveAudioJob::parse(&serde_json::to_vec(&v).unwrap(), &base("http://h")).unwrap_err();
            assert!(err.to_string().contains("customer_id"), "{err}");
        }
        assert!(KeySegment::parse(&"x".repeat(128)).is_ok());
        assert!(KeySegment::parse("Cust_9-a").is_ok());
    }

    #[test]
    fn asset_id_must_be_a_uuid() {
        let mut v = job_json();
        v["asset_id"] = serde_json::json!("123");
        let err = SaveAudioJob::parse(&serde_json::to_vec(&v).unwrap(), &base("http://h")).unwrap_err();
        assert!(err.to_string().contains("asset_id"), "{err}");
        assert_eq!(sniff_asset_id(&serde_json::to_vec(&v).unwrap()).as_deref(), Some("123"));
    }
}

#[cfg(test)]
mod schema_tests {
    use super::tests::job_json;
    use super::*;

    /// The JSON Schema in the repo and the parser agree on what is required.
    #[test]
    fn the_schema_lists_exactly_the_fields_the_parser_requires() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../schemas/save-audio-job.v1.json")).unwrap();
        let required: Vec<&str> =
            schema["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let base = UrlPolicy::for_base(Url::parse("http://h").unwrap());
        for field in schema["properties"].as_object().unwrap().keys() {
            let mut job = job_json();
            job.as_object_mut().unwrap().remove(field);
            let parsed = SaveAudioJob::parse(&serde_json::to_vec(&job).unwrap(), &base);
            assert_eq!(parsed.is_err(), required.contains(&field.as_str()), "{field}");
        }
    }
}
