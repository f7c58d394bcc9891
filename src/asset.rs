//! What the library holds, apart from how it gets there: the object key of an asset's audio,
//! the audio fetched for it ([`Downloaded`]), the object stored in S3 ([`StoredObject`]) and
//! the catalog's answer ([`CatalogEntry`]). Stages produce and consume these; nothing here
//! talks to a service.

use chrono::{DateTime, Utc};
use tempfile::TempPath;

use crate::audio::AudioFormat;
use crate::job::Job;

/// The object key of a job's audio: `{customer_id}/{user_id}/audio/{asset_id}.{ext}`. Both
/// tenant segments are [`crate::job::KeySegment`]s, so the key cannot leave the tenant's prefix;
/// the extension follows the sniffed format, not the URL.
pub fn object_key(job: &Job, format: AudioFormat) -> String {
    format!("{}/{}/audio/{}.{}", job.customer_id, job.user_id, job.asset_id, format.extension())
}

/// The object key of a file made from a job's audio (its waveform, a rendition), beside the
/// audio: `{customer_id}/{user_id}/audio/{asset_id}.{suffix}`, with `suffix` from
/// [`crate::audio::encoded::Encoded::key_suffix`] (`peaks.json`, `flac.flac`, `vorbis.ogg`). No
/// audio key ends that way (theirs is `{asset_id}.{ext}`), so the two never collide.
pub fn derived_key(job: &Job, suffix: &str) -> String {
    format!("{}/{}/audio/{}.{suffix}", job.customer_id, job.user_id, job.asset_id)
}

/// Where the save holding lease `token` keeps the previous bytes of `key` while it replaces them:
/// `.backup/{key}.{token}`. The leading `.` cannot start a tenant id, so no tenant's key is ever
/// a backup key, and one bucket lifecycle rule on the `.backup/` prefix can expire backups a
/// killed worker left behind.
pub fn backup_key(key: &str, token: &str) -> String {
    format!(".backup/{key}.{token}")
}

/// An asset's audio after the download stage: checked, hashed and measured, in a spool file
/// under `WORKER_TMP_DIR` that is deleted when this is dropped. It exists so the upload can be
/// retried without downloading again.
#[derive(Debug)]
pub struct Downloaded {
    /// The spool file holding the whole body.
    pub path: TempPath,
    /// Body length in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the body, computed while it streamed in.
    pub sha256: String,
    /// The format recognised from the first bytes and confirmed by the demuxer.
    pub format: AudioFormat,
    /// Seconds of audio, measured while the body streamed in (not from the job): from a WAV's
    /// header, from the packets of the other formats.
    pub measured_duration: f64,
    /// What the decoded samples sound like (`None` with `ANALYSIS=off`).
    pub analysis: Option<crate::audio::measure::AnalysisOutcome>,
    /// The waveform and the renditions made from the decoded samples, in spool files of their
    /// own: uploaded beside the audio under the same save lease ([`derived_key`]).
    pub derived: Vec<crate::audio::encoded::Encoded>,
    /// Why there is no waveform although `WAVEFORM=on` (the codec cannot be decoded).
    pub waveform_skipped: Option<String>,
    /// The renditions asked for that do not apply to this take, and why.
    pub renditions_skipped: Vec<crate::audio::rendition::Skipped>,
    /// CRC32C (base64) of each `PART_SIZE` part of the body, the last one partial, when the
    /// download was overlapped with a multipart upload (empty otherwise): sent with the parts,
    /// so the store checks each one without the worker reading the bytes again.
    pub part_checksums: Vec<String>,
}

/// An object in S3, as recorded in the catalog and announced in `audio.saved`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredObject {
    /// `S3_BUCKET` at the time of the save: consumers need it with the key to address the object.
    pub bucket: String,
    /// `{customer_id}/{user_id}/audio/{asset_id}.{ext}` (see [`object_key`]).
    pub key: String,
    /// Object size in bytes.
    pub size: u64,
    /// The Content-Type the object was stored with, from the sniffed format, e.g. `audio/wav`.
    pub content_type: String,
    /// The ETag S3 returned (quotes stripped): what a conditional GET or a CDN compares.
    pub etag: String,
    /// Lowercase hex SHA-256 of the bytes, also stored as the object's `sha256` metadata on
    /// single-part uploads: lets anyone check the bytes against the document.
    pub sha256: String,
    /// Seconds of audio measured from the stream (see [`crate::audio::measure`]); `None` for an
    /// object read back from an older document.
    pub measured_duration: Option<f64>,
    /// The take's analysis (loudness, silence, clipping, format), recorded in the document and
    /// announced; `None` with `ANALYSIS=off` or for an object read back from an older document.
    pub analysis: Option<crate::audio::measure::AnalysisOutcome>,
    /// How a client without S3 credentials fetches the audio: a presigned GET URL, a public
    /// CDN URL or a CloudFront signed URL, as `delivery` says (see [`crate::delivery`]).
    pub url: String,
    /// When `url` stops working; `None` for a public URL, which does not.
    pub url_expires_at: Option<DateTime<Utc>>,
    /// What kind of URL `url` (and every derived object's) is (`DELIVERY`).
    pub delivery: crate::delivery::DeliveryMode,
    /// The waveform file stored beside the audio, or why there is none; `None` with
    /// `WAVEFORM=off`.
    pub waveform: Option<WaveformOutcome>,
    /// The renditions stored beside the audio (`RENDITIONS`), in that order.
    pub renditions: Vec<RenditionObject>,
    /// The renditions asked for that do not apply to this take, and why.
    pub renditions_skipped: Vec<crate::audio::rendition::Skipped>,
}

impl StoredObject {
    /// Every file stored beside the audio (waveform, renditions): what the save lease writes,
    /// backs up and restores with the audio itself.
    pub fn derived(&self) -> Vec<&DerivedObject> {
        let waveform = match &self.waveform {
            Some(WaveformOutcome::Stored { object, .. }) => Some(object),
            _ => None,
        };
        waveform.into_iter().chain(self.renditions.iter().map(|r| &r.object)).collect()
    }

    /// Records `object`, stored from a file that is `what`, under `waveform` or `renditions`.
    pub fn attach(&mut self, what: &crate::audio::encoded::EncodedKind, object: DerivedObject) {
        use crate::audio::encoded::EncodedKind;
        match what {
            EncodedKind::Waveform(info) => {
                self.waveform = Some(WaveformOutcome::Stored { object, info: *info })
            }
            EncodedKind::Rendition(r) => self.renditions.push(RenditionObject {
                name: r.rendition.name().into(),
                bitrate_kbps: r.bitrate_kbps,
                bytes_saved: i64::try_from(self.size).unwrap_or(i64::MAX)
                    - i64::try_from(object.size).unwrap_or(i64::MAX),
                object,
            }),
        }
    }

    /// [`StoredObject::derived`], mutable: a fresh URL goes into each.
    pub fn derived_mut(&mut self) -> Vec<&mut DerivedObject> {
        let waveform = match &mut self.waveform {
            Some(WaveformOutcome::Stored { object, .. }) => Some(object),
            _ => None,
        };
        waveform.into_iter().chain(self.renditions.iter_mut().map(|r| &mut r.object)).collect()
    }
}

/// A file stored beside an asset's audio: where it is, what it holds and how to fetch it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DerivedObject {
    /// `{customer_id}/{user_id}/audio/{asset_id}.{suffix}` (see [`derived_key`]).
    pub key: String,
    /// Its Content-Type, e.g. `application/json`, `audio/flac`, `audio/ogg`.
    pub content_type: String,
    /// Bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes, also the object's `sha256` metadata.
    pub sha256: String,
    /// Its URL, of the audio's kind (`DELIVERY`).
    pub url: String,
    /// When `url` stops working; `null` for a public URL, which does not.
    pub url_expires_at: Option<DateTime<Utc>>,
}

/// The `waveform` of the document and of `audio.saved`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum WaveformOutcome {
    /// The audiowaveform JSON (version 2) file, stored.
    Stored {
        /// The object.
        #[serde(flatten)]
        object: DerivedObject,
        /// Its shape: channels, rate, samples per pixel, bits, length.
        #[serde(flatten)]
        info: crate::audio::encoded::WaveformInfo,
    },
    /// None was made, e.g. for Ogg Opus (no decoder is built in).
    Skipped {
        /// Why.
        skipped: String,
    },
}

/// One entry of `renditions` in the document and in `audio.saved`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RenditionObject {
    /// `flac` or `vorbis` (the `RENDITIONS` entry).
    pub name: String,
    /// The lossy rendition's target bitrate, kbit/s; absent for FLAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitrate_kbps: Option<u32>,
    /// The object.
    #[serde(flatten)]
    pub object: DerivedObject,
    /// The original's size less this one's, in bytes (negative when the rendition is larger):
    /// what storing this rendition instead of the original would save.
    pub bytes_saved: i64,
}

/// What the catalog's upsert reports back about the asset's document.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogEntry {
    /// 1 on the first save of the asset, +1 on each later save with new bytes; part of the
    /// `audio.saved` event id, so a repeated save repeats the id.
    pub version: i64,
    /// When the asset was first saved.
    pub created_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_built_from_the_tenant_and_the_real_format() {
        let base = crate::url_policy::UrlPolicy::for_base(url::Url::parse("http://h").unwrap());
        let body = serde_json::json!({
            "asset_id": "6f1c2a4e-8d3b-4b7a-9a51-2f0e5c7d9b10", "customer_id": "c1", "user_id": "u1",
            "audio_url": "/temp/a.mp3", "text": "t", "duration": 1, "voice": "v", "voice_name": "V",
            "language": "en", "speed": 1, "model": "m"
        });
        let job = crate::job::SaveAudioJob::parse(body.to_string().as_bytes(), &base).unwrap();
        assert_eq!(
            object_key(&job, AudioFormat::Wav),
            "c1/u1/audio/6f1c2a4e-8d3b-4b7a-9a51-2f0e5c7d9b10.wav"
        );
        assert_eq!(
            object_key(&job, AudioFormat::Mp3),
            "c1/u1/audio/6f1c2a4e-8d3b-4b7a-9a51-2f0e5c7d9b10.mp3"
        );
    }

    proptest::proptest! {
        /// Whatever strings a job carries as ids, a job that parses has its object key under
        /// `{customer_id}/{user_id}/audio/`, made of exactly those segments and a UUID file name.
        #[test]
        fn object_keys_never_leave_the_tenant_prefix(
            customer in proptest::prelude::any::<String>(),
            user in "[a-zA-Z0-9_./%-]{0,8}|.{0,12}",
            asset in proptest::prelude::any::<String>(),
            uuid_asset in proptest::prelude::any::<bool>(),
        ) {
            let policy = crate::url_policy::UrlPolicy::for_base(url::Url::parse("http://h").unwrap());
            let asset = if uuid_asset { uuid::Uuid::new_v4().to_string() } else { asset };
            let body = serde_json::json!({
                "asset_id": asset, "customer_id": customer, "user_id": user,
                "audio_url": "/temp/a.wav", "text": "t", "duration": 1, "voice": "v", "voice_name": "V",
                "language": "en", "speed": 1, "model": "m"
            });
            if let Ok(job) = crate::job::SaveAudioJob::parse(body.to_string().as_bytes(), &policy) {
                for format in [AudioFormat::Wav, AudioFormat::Mp3, AudioFormat::Ogg, AudioFormat::Flac] {
                    let key = object_key(&job, format);
                    let segments: Vec<&str> = key.split('/').collect();
                    proptest::prop_assert_eq!(segments.len(), 4, "{}", key);
                    proptest::prop_assert_eq!(segments[0], customer.as_str());
                    proptest::prop_assert_eq!(segments[1], user.as_str());
                    proptest::prop_assert_eq!(segments[2], "audio");
                    proptest::prop_assert!(!segments.iter().any(|s| s.is_empty() || *s == "." || *s == ".."));
                    proptest::prop_assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_-.".contains(&b)));
                    proptest::prop_assert_eq!(segments[3], format!("{}.{}", job.asset_id, format.extension()));
                }
            }
        }
    }
}
