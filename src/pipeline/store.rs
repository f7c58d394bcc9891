//! Stage 2: put the audio into S3 and make a presigned GET URL for it.
//!
//! The client is set up for S3-compatible stores (MinIO, s3s): path-style addressing, so a host
//! like `minio:9000` never becomes `audio-assets.minio:9000`, and request checksums only when an
//! operation requires them, since several stores reject the SDK's default checksum trailers.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    retry::RetryConfig, timeout::TimeoutConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use chrono::{DateTime, Utc};

use crate::config::S3Settings;
use crate::error::{Stage, StageError};
use crate::job::Job;
use crate::pipeline::download::{AudioFormat, Downloaded};

/// The S3 side of the worker: one client for requests, one for signing URLs for the public host.
#[derive(Debug, Clone)]
pub struct Store {
    /// Talks to `S3_ENDPOINT`.
    client: aws_sdk_s3::Client,
    /// Signs GET URLs for `S3_PUBLIC_ENDPOINT` (or `S3_ENDPOINT`); presigning is local, so this
    /// client never needs to reach that host.
    presigner: aws_sdk_s3::Client,
    /// `S3_BUCKET`.
    bucket: String,
    /// `PRESIGNED_URL_EXPIRY_SECS`.
    expiry: Duration,
}

/// A stored object, as recorded in the catalog and the completion event.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredObject {
    /// The bucket.
    pub bucket: String,
    /// `{customer_id}/{user_id}/audio/{asset_id}.{ext}`.
    pub key: String,
    /// Object size in bytes.
    pub size: u64,
    /// e.g. `audio/wav`.
    pub content_type: String,
    /// The ETag S3 returned (quotes stripped).
    pub etag: String,
    /// Lowercase hex SHA-256 of the bytes, also stored as the object's `sha256` metadata.
    pub sha256: String,
    /// Seconds of audio measured from the stream (see [`crate::pipeline::download::measure`]);
    /// `None` for an object read back from an older document.
    pub measured_duration: Option<f64>,
    /// Presigned GET URL.
    pub url: String,
    /// When the presigned URL stops working.
    pub url_expires_at: DateTime<Utc>,
}

/// The object key of a job's audio: `{customer_id}/{user_id}/audio/{asset_id}.{ext}`. Both
/// tenant segments are [`crate::job::KeySegment`]s, so the key cannot leave the tenant's prefix.
pub fn object_key(job: &Job, format: AudioFormat) -> String {
    format!("{}/{}/audio/{}.{}", job.customer_id, job.user_id, job.asset_id, format.extension())
}

fn client_for(settings: &S3Settings, endpoint: &url::Url) -> aws_sdk_s3::Client {
    let credentials = Credentials::new(
        settings.access_key_id.clone(),
        settings.secret_access_key.clone(),
        None,
        None,
        "audio-worker-env",
    );
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint.as_str().trim_end_matches('/'))
        .region(Region::new(settings.region.clone()))
        .credentials_provider(credentials)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        // Our own backoff retries (and counts) attempts; the SDK's would multiply them.
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(60))
                .build(),
        )
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

impl Store {
    /// Builds the clients; makes no request.
    pub fn new(settings: &S3Settings) -> Self {
        let public = settings.public_endpoint.as_ref().unwrap_or(&settings.endpoint);
        Self {
            client: client_for(settings, &settings.endpoint),
            presigner: client_for(settings, public),
            bucket: settings.bucket.clone(),
            expiry: settings.presigned_url_expiry,
        }
    }

    /// Asks for the bucket (`HeadBucket`) without creating anything: the readiness probe. A 404
    /// is an answer too (start-up creates the bucket, and may not have yet).
    ///
    /// # Errors
    /// The store is unreachable, or refuses the request (e.g. 403).
    pub async fn head_bucket(&self) -> Result<(), StageError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => Ok(()),
            Err(e) => Err(classify(e, &format!("HeadBucket {}", self.bucket))),
        }
    }

    /// Creates the bucket when it does not exist. Safe to run from many replicas at once.
    ///
    /// # Errors
    /// The store is unreachable, or refuses both the check and the creation.
    pub async fn ensure_bucket(&self) -> Result<(), StageError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => return Ok(()),
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => {}
            Err(e) => return Err(classify(e, &format!("HeadBucket {}", self.bucket))),
        }
        match self.client.create_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(e))
                if matches!(e.err().code(), Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")) =>
            {
                Ok(())
            }
            Err(e) => Err(classify(e, &format!("CreateBucket {}", self.bucket))),
        }
    }

    /// Uploads a downloaded file under `key` with the job's metadata, then presigns a GET URL.
    ///
    /// # Errors
    /// A [`StageError`] of stage `upload`: transient for network errors, timeouts, 5xx and
    /// slow-down; permanent for access denied and other 4xx.
    pub async fn put(&self, job: &Job, file: &Downloaded, key: &str) -> Result<StoredObject, StageError> {
        let body = ByteStream::from_path(&file.path)
            .await
            .map_err(|e| StageError::transient(Stage::Upload, format!("reading spool file: {e}")))?;
        let mut metadata = job_metadata(job);
        metadata.insert("sha256".into(), file.sha256.clone());
        metadata.insert("measured_duration".into(), format!("{:.3}", file.measured_duration));
        let content_type = file.format.content_type();
        let output = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(body)
            .content_length(i64::try_from(file.size).unwrap_or(i64::MAX))
            .content_type(content_type)
            .set_metadata(Some(metadata))
            .send()
            .await
            .map_err(|e| classify(e, &format!("PutObject {}/{key}", self.bucket)))?;
        self.stored(key, file, output.e_tag()).await
    }

    /// A presigned GET URL for `key`, valid for `PRESIGNED_URL_EXPIRY_SECS`, signed for the public
    /// endpoint when one is set. Returns the URL and its expiry time.
    ///
    /// # Errors
    /// Permanent `upload` error when the expiry is refused by the signer (it is checked at
    /// start-up, so this does not happen in practice).
    pub async fn presign_get(&self, key: &str) -> Result<(String, DateTime<Utc>), StageError> {
        let signed_at = Utc::now();
        let config = PresigningConfig::expires_in(self.expiry)
            .map_err(|e| StageError::permanent(Stage::Upload, format!("presigning config: {e}")))?;
        let request =
            self.presigner.get_object().bucket(&self.bucket).key(key).presigned(config).await.map_err(
                |e| {
                    StageError::permanent(
                        Stage::Upload,
                        format!("presigning GET {key}: {}", DisplayErrorContext(&e)),
                    )
                },
            )?;
        let expires = signed_at + chrono::Duration::from_std(self.expiry).unwrap_or_default();
        Ok((request.uri().to_owned(), expires))
    }

    /// Starts a multipart upload of `key` with the job's metadata (without `sha256` and
    /// `measured_duration`, unknown until the last byte; the catalog has both). Returns the
    /// upload id.
    ///
    /// # Errors
    /// Any S3 error, classified like uploads.
    pub async fn create_multipart(
        &self,
        job: &Job,
        key: &str,
        format: AudioFormat,
    ) -> Result<String, StageError> {
        let output = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(format.content_type())
            .set_metadata(Some(job_metadata(job)))
            .send()
            .await
            .map_err(|e| classify(e, &format!("CreateMultipartUpload {}/{key}", self.bucket)))?;
        output.upload_id().map(str::to_owned).ok_or_else(|| {
            StageError::transient(Stage::Upload, "CreateMultipartUpload returned no upload id")
        })
    }

    /// Uploads part `number` (from 1) of a multipart upload: `length` bytes of the file at `path`
    /// from `offset`, streamed from the file (never held in memory). Returns the part's ETag.
    ///
    /// # Errors
    /// Any S3 error, classified like uploads; the file cannot be read (transient).
    pub async fn upload_part_from_file(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        path: &std::path::Path,
        offset: u64,
        length: u64,
    ) -> Result<String, StageError> {
        let body = ByteStream::read_from()
            .path(path)
            .offset(offset)
            .length(aws_sdk_s3::primitives::Length::Exact(length))
            .build()
            .await
            .map_err(|e| {
                StageError::transient(
                    Stage::Upload,
                    format!("reading part {number} from the spool file: {e}"),
                )
            })?;
        let output = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .content_length(i64::try_from(length).unwrap_or(i64::MAX))
            .body(body)
            .send()
            .await
            .map_err(|e| classify(e, &format!("UploadPart {number} of {}/{key}", self.bucket)))?;
        Ok(output.e_tag().unwrap_or_default().to_owned())
    }

    /// Completes a multipart upload from its parts' ETags (in part order), then presigns a GET
    /// URL: the stored object.
    ///
    /// # Errors
    /// Any S3 error, classified like uploads.
    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        etags: Vec<String>,
        file: &Downloaded,
    ) -> Result<StoredObject, StageError> {
        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
        let parts = etags
            .into_iter()
            .zip(1..)
            .map(|(etag, number)| CompletedPart::builder().e_tag(etag).part_number(number).build())
            .collect();
        let output = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(|e| classify(e, &format!("CompleteMultipartUpload {}/{key}", self.bucket)))?;
        self.stored(key, file, output.e_tag()).await
    }

    /// The stored object of `file` under `key`, with a fresh presigned GET URL.
    async fn stored(
        &self,
        key: &str,
        file: &Downloaded,
        etag: Option<&str>,
    ) -> Result<StoredObject, StageError> {
        let (url, url_expires_at) = self.presign_get(key).await?;
        Ok(StoredObject {
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            size: file.size,
            content_type: file.format.content_type().to_owned(),
            etag: etag.unwrap_or_default().trim_matches('"').to_owned(),
            sha256: file.sha256.clone(),
            measured_duration: Some(file.measured_duration),
            url,
            url_expires_at,
        })
    }

    /// Aborts a multipart upload so its parts do not linger (best effort: a failure is logged;
    /// an `AbortIncompleteMultipartUpload` lifecycle rule on the bucket is the backstop).
    pub async fn abort_multipart(&self, key: &str, upload_id: &str) {
        let aborted = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await;
        match aborted {
            Ok(_) => tracing::info!(key, "multipart upload aborted"),
            Err(e) => {
                tracing::warn!(key, error = %DisplayErrorContext(&e), "aborting the multipart upload failed")
            }
        }
    }

    /// Reads an object back whole (the tests compare it with what was served).
    ///
    /// # Errors
    /// Any S3 error, classified like uploads.
    pub async fn get_bytes(
        &self,
        key: &str,
    ) -> Result<(Vec<u8>, aws_sdk_s3::operation::get_object::GetObjectOutput), StageError> {
        let mut output = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(e, &format!("GetObject {}/{key}", self.bucket)))?;
        let body = std::mem::replace(&mut output.body, ByteStream::new(Vec::<u8>::new().into()));
        let bytes = body
            .collect()
            .await
            .map_err(|e| StageError::transient(Stage::Upload, format!("reading {key}: {e}")))?;
        Ok((bytes.into_bytes().to_vec(), output))
    }

    /// The keys in the bucket (the first 1000): what tests check nothing was uploaded with.
    ///
    /// # Errors
    /// Any S3 error, classified like uploads.
    pub async fn list_keys(&self) -> Result<Vec<String>, StageError> {
        let output = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| classify(e, &format!("ListObjectsV2 {}", self.bucket)))?;
        Ok(output.contents().iter().filter_map(|o| o.key().map(str::to_owned)).collect())
    }
}

/// The object metadata known before the bytes are: the job's ids and TTS fields.
fn job_metadata(job: &Job) -> HashMap<String, String> {
    [
        ("asset_id", job.asset_id.to_string()),
        ("customer_id", job.customer_id.to_string()),
        ("user_id", job.user_id.to_string()),
        ("voice", header_safe(&job.tts.voice)),
        ("model", header_safe(&job.tts.model)),
        ("language", header_safe(&job.tts.language)),
        ("duration", job.duration.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// S3 user metadata travels in HTTP headers: anything outside printable ASCII is percent-encoded
/// so that a voice name like `Zoë` cannot make the request invalid.
fn header_safe(value: &str) -> String {
    const UNSAFE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');
    percent_encoding::utf8_percent_encode(value, UNSAFE).to_string()
}

/// Sorts an SDK error into transient or permanent, keeping the S3 error code and HTTP status.
fn classify<E>(error: SdkError<E, HttpResponse>, what: &str) -> StageError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let text = format!("{what}: {}", DisplayErrorContext(&error));
    match &error {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            // HEAD responses have no body, so no error code: fall back to the status's name.
            let code = service.err().code().unwrap_or(match status {
                403 => "AccessDenied (check S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY)",
                404 => "NotFound",
                _ => "",
            });
            let transient = status >= 500
                || status == 408
                || status == 429
                || matches!(
                    code,
                    "SlowDown"
                        | "InternalError"
                        | "ServiceUnavailable"
                        | "RequestTimeout"
                        | "RequestTimeTooSkewed"
                );
            let text = format!("{what}: HTTP {status} {code}: {}", service.err().message().unwrap_or(""));
            if transient {
                StageError::transient(Stage::Upload, text)
            } else {
                StageError::permanent(Stage::Upload, text)
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            StageError::transient(Stage::Upload, text)
        }
        _ => StageError::permanent(Stage::Upload, text),
    }
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

    #[test]
    fn metadata_values_are_made_header_safe() {
        assert_eq!(header_safe("Zoë 100%"), "Zo%C3%AB 100%25");
        assert_eq!(header_safe("plain-voice_1"), "plain-voice_1");
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
