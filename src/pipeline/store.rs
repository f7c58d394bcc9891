//! Stage 2: put the audio into S3 and make the URL clients fetch it by: a presigned GET URL, or
//! a CDN URL (see [`crate::delivery`]).
//!
//! The client is set up for S3-compatible stores (MinIO, s3s): path-style addressing, so a host
//! like `minio:9000` never becomes `audio-assets.minio:9000`, and request checksums only when an
//! operation requires them, since several stores reject the SDK's default checksum trailers.
//!
//! # One hash per byte
//! The bytes are hashed once, while they download. A body is sent with the checksum computed
//! then, which the store checks before it keeps the object, and without SigV4's payload hash
//! (`UNSIGNED-PAYLOAD`: the SDK would otherwise hash every byte again to sign it):
//! - `PutObject` carries `x-amz-checksum-sha256`, the same SHA-256 the document records, so the
//!   store refuses (`BadDigest`) bytes that are not the ones the document will name;
//! - each `UploadPart` carries `x-amz-checksum-crc32c` of its part (the upload is created with
//!   `ChecksumAlgorithm=CRC32C`, and the completion lists every part's), so AWS and MinIO check
//!   each part; the whole object's SHA-256 is in the document.
//!
//! The signature still covers every header, the checksums included, so they cannot be changed
//! on the way; TLS (`https://` endpoints) protects the body from anyone but the store.

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

use crate::asset::{DerivedObject, Downloaded, StoredObject, WaveformOutcome};
use crate::audio::AudioFormat;
use crate::audio::encoded::Encoded;
use crate::config::S3Settings;
use crate::delivery::{Delivery, DeliveryMode};
use crate::error::{Stage, StageError};
use crate::job::Job;

/// The S3 side of the worker: one client for requests, one for signing URLs for the public host.
#[derive(Debug, Clone)]
pub struct Store {
    /// Talks to `S3_ENDPOINT`.
    client: aws_sdk_s3::Client,
    /// Signs GET URLs for `S3_PUBLIC_ENDPOINT` (or `S3_ENDPOINT`); presigning is local, so this
    /// client never needs to reach that host.
    presigner: aws_sdk_s3::Client,
    /// Where every object goes (`S3_BUCKET`); one bucket holds all tenants, separated by key prefix.
    bucket: String,
    /// How long presigned GET URLs work (`PRESIGNED_URL_EXPIRY_SECS`, at most 7 days: SigV4's limit).
    expiry: Duration,
    /// What kind of URL is handed out (`DELIVERY`): presigned by `presigner`, or a CDN's.
    delivery: Delivery,
}

fn client_for(settings: &S3Settings, endpoint: &url::Url) -> aws_sdk_s3::Client {
    // The expiry is not handed to the SDK: a static provider cannot renew, and the warning
    // about URLs outliving the credentials is the worker's (`S3Settings::credential_warnings`).
    let credentials = Credentials::new(
        settings.access_key_id.clone(),
        settings.secret_access_key.clone(),
        settings.session_token.clone(),
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
                .read_timeout(READ_TIMEOUT)
                .build(),
        )
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// A spool file to upload: where it is, its size and its lowercase hex SHA-256.
#[derive(Debug, Clone, Copy)]
struct Spooled<'a> {
    path: &'a std::path::Path,
    size: u64,
    sha256: &'a str,
}

/// Bytes read from the spool file at a time while a body is sent: each read is a hand-off to a
/// blocking thread, so 128 KiB makes eight per MiB where the SDK's default 64 KiB makes sixteen,
/// while 16 large uploads with two parts in flight hold only 4 MiB of read buffers.
const UPLOAD_READ_BYTES: usize = 128 << 10;

/// The wait for the first byte of S3's answer to a request without a body to speak of, and the
/// base of a body's: S3 answers a PutObject or UploadPart only once it has the whole body, and
/// the SDK's read timeout counts from the start of the request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The slowest upload rate that counts as progress: a body's read timeout grows by a second per
/// this many bytes, so a 500 MiB fallback upload gets 60 s + 500 s instead of failing at 60 s
/// whatever the link, while a stalled one still ends.
pub const MIN_UPLOAD_BYTES_PER_SEC: u64 = 1 << 20;

/// Timeouts for a request that sends `bytes`: [`READ_TIMEOUT`] plus the time the body takes at
/// [`MIN_UPLOAD_BYTES_PER_SEC`].
fn sized_timeouts(bytes: u64) -> aws_sdk_s3::config::Builder {
    let read = READ_TIMEOUT + Duration::from_secs(bytes.div_ceil(MIN_UPLOAD_BYTES_PER_SEC));
    aws_sdk_s3::config::Builder::default().timeout_config(
        TimeoutConfig::builder().connect_timeout(Duration::from_secs(10)).read_timeout(read).build(),
    )
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
            delivery: settings.delivery.clone(),
        }
    }

    /// What kind of URL [`Store::delivery_url`] makes (`DELIVERY`).
    pub fn delivery(&self) -> DeliveryMode {
        self.delivery.mode()
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

    /// Uploads a downloaded file under `key` with the job's metadata, then makes its URL
    /// ([`Store::delivery_url`]).
    ///
    /// # Errors
    /// A [`StageError`] of stage `upload`: transient for network errors, timeouts, 5xx and
    /// slow-down; permanent for access denied and other 4xx.
    pub async fn put(&self, job: &Job, file: &Downloaded, key: &str) -> Result<StoredObject, StageError> {
        let mut metadata = job_metadata(job);
        metadata.insert("measured_duration".into(), format!("{:.3}", file.measured_duration));
        let spooled = Spooled { path: &file.path, size: file.size, sha256: &file.sha256 };
        let etag = self.put_spooled(key, spooled, file.format.content_type(), metadata).await?;
        self.stored(key, file, etag.as_deref()).await
    }

    /// One `PutObject` of a spool file, streamed from disk, its SHA-256 (with `sha256` added to
    /// `metadata`) sent for the store to check, the payload unsigned (the checksum covers it).
    /// Returns the ETag.
    async fn put_spooled(
        &self,
        key: &str,
        file: Spooled<'_>,
        content_type: &str,
        mut metadata: HashMap<String, String>,
    ) -> Result<Option<String>, StageError> {
        let sha256 = hex::decode(file.sha256)
            .map(aws_smithy_types::base64::encode)
            .map_err(|e| StageError::permanent(Stage::Upload, format!("the SHA-256 of {key}: {e}")))?;
        let body =
            ByteStream::read_from().path(file.path).buffer_size(UPLOAD_READ_BYTES).build().await.map_err(
                |e| StageError::transient(Stage::Upload, format!("reading the spool file of {key}: {e}")),
            )?;
        metadata.insert("sha256".into(), file.sha256.to_owned());
        let output = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(body)
            .content_length(i64::try_from(file.size).unwrap_or(i64::MAX))
            .content_type(content_type)
            .set_metadata(Some(metadata))
            .checksum_sha256(sha256)
            .customize()
            .disable_payload_signing()
            .config_override(sized_timeouts(file.size))
            .send()
            .await
            .map_err(|e| classify(e, &format!("PutObject {}/{key}", self.bucket)))?;
        Ok(output.e_tag().map(str::to_owned))
    }

    /// The URL clients fetch `key` by, as `DELIVERY` says, and when it stops working:
    /// - `presigned`: a presigned GET URL, valid for `PRESIGNED_URL_EXPIRY_SECS`, signed for the
    ///   public endpoint when one is set;
    /// - `public`: `{PUBLIC_BASE_URL}/{key}`, which does not expire (`None`);
    /// - `cloudfront`: a CloudFront signed URL, valid for `DELIVERY_URL_EXPIRY_SECS`.
    ///
    /// # Errors
    /// Permanent `upload` error when the expiry is refused by the signer (it is checked at
    /// start-up, so this does not happen in practice); transient when the CloudFront signature
    /// cannot be made (the key was tried at start-up: the system's RNG failed).
    pub async fn delivery_url(&self, key: &str) -> Result<(String, Option<DateTime<Utc>>), StageError> {
        match &self.delivery {
            Delivery::Presigned => self.presigned(key).await.map(|(url, expires)| (url, Some(expires))),
            Delivery::Public(base) => Ok((base.url_for(key), None)),
            Delivery::CloudFront { signer, .. } => {
                // An RSA signature is milliseconds of CPU: not on the runtime's threads.
                let (signer, owned) = (signer.clone(), key.to_owned());
                let signed = tokio::task::spawn_blocking(move || signer.signed_url(&owned, Utc::now()))
                    .await
                    .map_err(|e| {
                        StageError::transient(Stage::Upload, format!("signing the URL of {key}: {e}"))
                    })?;
                signed
                    .map(|(url, expires)| (url, Some(expires)))
                    .map_err(|e| StageError::transient(Stage::Upload, format!("the URL of {key}: {e}")))
            }
        }
    }

    /// A presigned GET URL for `key` and its expiry time.
    async fn presigned(&self, key: &str) -> Result<(String, DateTime<Utc>), StageError> {
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

    /// Uploads a small file held in memory (a batch's manifest) under `key`, its SHA-256 sent
    /// for the store to check and kept as the `sha256` metadata, then makes its delivery URL
    /// (and expiry) like every object's.
    ///
    /// # Errors
    /// A [`StageError`] of stage `upload`, classified like every upload.
    pub async fn put_bytes(
        &self,
        key: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<(String, Option<DateTime<Utc>>), StageError> {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(&bytes);
        let size = bytes.len() as u64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .content_length(i64::try_from(size).unwrap_or(i64::MAX))
            .metadata("sha256", hex::encode(digest))
            .checksum_sha256(aws_smithy_types::base64::encode(digest))
            .body(ByteStream::from(bytes))
            .customize()
            .disable_payload_signing()
            .config_override(sized_timeouts(size))
            .send()
            .await
            .map_err(|e| classify(e, &format!("PutObject {}/{key}", self.bucket)))?;
        self.delivery_url(key).await
    }

    /// Starts a multipart upload of `key` with the job's metadata (without `sha256` and
    /// `measured_duration`, unknown until the last byte; the catalog has both), each part to be
    /// checked by its CRC32C. Returns the upload id.
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
            .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc32C)
            .send()
            .await
            .map_err(|e| classify(e, &format!("CreateMultipartUpload {}/{key}", self.bucket)))?;
        output.upload_id().map(str::to_owned).ok_or_else(|| {
            StageError::transient(Stage::Upload, "CreateMultipartUpload returned no upload id")
        })
    }

    /// Uploads part `number` (from 1) of a multipart upload: `length` bytes of the file at `path`
    /// from `offset`, streamed from the file (never held in memory), with `crc32c` (base64, from
    /// the download) for the store to check. Returns the part's ETag.
    ///
    /// # Errors
    /// Any S3 error, classified like uploads; the file cannot be read (transient).
    #[allow(clippy::too_many_arguments)] // the part's address: upload, number, file, range, checksum
    pub async fn upload_part_from_file(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        path: &std::path::Path,
        offset: u64,
        length: u64,
        crc32c: &str,
    ) -> Result<String, StageError> {
        let body = ByteStream::read_from()
            .path(path)
            .buffer_size(UPLOAD_READ_BYTES)
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
            .checksum_crc32_c(crc32c)
            .body(body)
            .customize()
            .disable_payload_signing()
            .config_override(sized_timeouts(length))
            .send()
            .await
            .map_err(|e| classify(e, &format!("UploadPart {number} of {}/{key}", self.bucket)))?;
        Ok(output.e_tag().unwrap_or_default().to_owned())
    }

    /// Completes a multipart upload from its parts' ETags (in part order) and CRC32Cs (`file`'s
    /// [`Downloaded::part_checksums`]), then makes its URL: the stored object.
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
        if etags.len() != file.part_checksums.len() {
            return Err(StageError::transient(
                Stage::Upload,
                format!("{} parts sent but {} part checksums known", etags.len(), file.part_checksums.len()),
            ));
        }
        let parts = etags
            .into_iter()
            .zip(&file.part_checksums)
            .zip(1..)
            .map(|((etag, crc32c), number)| {
                CompletedPart::builder().e_tag(etag).checksum_crc32_c(crc32c).part_number(number).build()
            })
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

    /// The stored object of `file`, whose bytes are already at `key` (the same take saved
    /// again): nothing is sent, a fresh URL is made. The ETag is left empty (the
    /// document keeps the stored one).
    ///
    /// # Errors
    /// As [`Store::delivery_url`].
    pub async fn stored_again(&self, key: &str, file: &Downloaded) -> Result<StoredObject, StageError> {
        self.stored(key, file, None).await
    }

    /// The stored object of `file` under `key`, with a fresh URL.
    async fn stored(
        &self,
        key: &str,
        file: &Downloaded,
        etag: Option<&str>,
    ) -> Result<StoredObject, StageError> {
        let (url, url_expires_at) = self.delivery_url(key).await?;
        Ok(StoredObject {
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            size: file.size,
            content_type: file.format.content_type().to_owned(),
            etag: etag.unwrap_or_default().trim_matches('"').to_owned(),
            sha256: file.sha256.clone(),
            measured_duration: Some(file.measured_duration),
            analysis: file.analysis.clone(),
            url,
            url_expires_at,
            delivery: self.delivery(),
            waveform: file.waveform_skipped.clone().map(|skipped| WaveformOutcome::Skipped { skipped }),
            renditions: Vec::new(),
            renditions_skipped: file.renditions_skipped.clone(),
        })
    }

    /// Uploads a file made from the job's audio (waveform, rendition) under `key`, with the
    /// job's metadata and its SHA-256 (checked by the store, as for the audio), then makes its
    /// URL.
    ///
    /// # Errors
    /// As [`Store::put`].
    pub async fn put_derived(
        &self,
        job: &Job,
        file: &Encoded,
        key: &str,
    ) -> Result<DerivedObject, StageError> {
        let spooled = Spooled { path: &file.path, size: file.size, sha256: &file.sha256 };
        self.put_spooled(key, spooled, file.content_type(), job_metadata(job)).await?;
        self.derived_again(file, key).await
    }

    /// The stored object of `file`, whose bytes are already at `key` (the same take saved
    /// again): nothing is sent, a fresh URL is made.
    ///
    /// # Errors
    /// As [`Store::delivery_url`].
    pub async fn derived_again(&self, file: &Encoded, key: &str) -> Result<DerivedObject, StageError> {
        let (url, url_expires_at) = self.delivery_url(key).await?;
        Ok(DerivedObject {
            key: key.to_owned(),
            content_type: file.content_type().to_owned(),
            size: file.size,
            sha256: file.sha256.clone(),
            url,
            url_expires_at,
        })
    }

    /// Copies the object at `from` to `to` inside the bucket (server-side: no byte passes
    /// through the worker), metadata and Content-Type included.
    ///
    /// # Errors
    /// Any S3 error, classified like uploads (`NoSuchKey` is permanent).
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), StageError> {
        self.client
            .copy_object()
            .bucket(&self.bucket)
            .copy_source(format!("{}/{from}", self.bucket))
            .key(to)
            .send()
            .await
            .map_err(|e| classify(e, &format!("CopyObject {}/{from} to {to}", self.bucket)))?;
        Ok(())
    }

    /// Deletes the object at `key`; deleting one that is not there succeeds (as S3 does).
    ///
    /// # Errors
    /// Any S3 error, classified like uploads.
    pub async fn delete(&self, key: &str) -> Result<(), StageError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(e, &format!("DeleteObject {}/{key}", self.bucket)))?;
        Ok(())
    }

    /// Whether an object exists at `key` (`HeadObject`).
    ///
    /// # Errors
    /// Any S3 error but 404, classified like uploads.
    pub async fn exists(&self, key: &str) -> Result<bool, StageError> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => Ok(false),
            Err(e) => Err(classify(e, &format!("HeadObject {}/{key}", self.bucket))),
        }
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

    /// One page of the bucket's listing (`ListObjectsV2`, at most `max_keys`, S3's limit being
    /// 1000) of the keys under `prefix` (all keys with `None`), from `continuation` (`None`:
    /// the first page). Pages, not the whole listing, so that a walk over the bucket holds one
    /// page in memory whatever the bucket's size.
    ///
    /// # Errors
    /// Any S3 error, classified like uploads.
    pub async fn list_page(
        &self,
        prefix: Option<&str>,
        continuation: Option<String>,
        max_keys: i32,
    ) -> Result<ListPage, StageError> {
        let output = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .set_prefix(prefix.map(str::to_owned))
            .set_continuation_token(continuation)
            .max_keys(max_keys)
            .send()
            .await
            .map_err(|e| classify(e, &format!("ListObjectsV2 {}", self.bucket)))?;
        let objects = output
            .contents()
            .iter()
            .filter_map(|o| {
                Some(ListedObject {
                    key: o.key()?.to_owned(),
                    size: o.size().and_then(|s| u64::try_from(s).ok()).unwrap_or_default(),
                    last_modified: o.last_modified().and_then(chrono_time),
                })
            })
            .collect();
        let next = match output.next_continuation_token() {
            Some(token) if output.is_truncated() == Some(true) => Some(token.to_owned()),
            _ => None,
        };
        Ok(ListPage { objects, next })
    }

    /// The object at `key` as `HeadObject` describes it (size, the `sha256` metadata of a
    /// single-part upload), `None` when there is none. Says nothing of the bytes themselves:
    /// see [`Store::hash`].
    ///
    /// # Errors
    /// Any S3 error but 404, classified like uploads.
    pub async fn head(&self, key: &str) -> Result<Option<ObjectHead>, StageError> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(output) => Ok(Some(ObjectHead {
                size: output.content_length().and_then(|s| u64::try_from(s).ok()).unwrap_or_default(),
                sha256: output.metadata().and_then(|m| m.get("sha256")).cloned(),
            })),
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => Ok(None),
            Err(e) => Err(classify(e, &format!("HeadObject {}/{key}", self.bucket))),
        }
    }

    /// Reads the object at `key` whole (`GetObject`, streamed: one chunk of the body in memory
    /// at a time) and returns its length in bytes and its lowercase hex SHA-256, computed from
    /// the bytes as they arrive; `None` when there is no object. What an audit compares with
    /// the document, since an object's metadata can outlive a change of its bytes.
    ///
    /// # Errors
    /// Any S3 error but 404, classified like uploads; the body breaking off (transient).
    pub async fn hash(&self, key: &str) -> Result<Option<(u64, String)>, StageError> {
        use sha2::Digest;
        let output = match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(output) => output,
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => return Ok(None),
            Err(e) => return Err(classify(e, &format!("GetObject {}/{key}", self.bucket))),
        };
        let mut body = output.body;
        let mut hasher = sha2::Sha256::new();
        let mut size = 0_u64;
        while let Some(chunk) = body.try_next().await.map_err(|e| {
            StageError::transient(
                Stage::Upload,
                format!("GetObject {}/{key}: reading the body: {e}", self.bucket),
            )
        })? {
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok(Some((size, hex::encode(hasher.finalize()))))
    }
}

/// One page of [`Store::list_page`].
#[derive(Debug, Clone)]
pub struct ListPage {
    /// The objects of the page, in key order.
    pub objects: Vec<ListedObject>,
    /// The continuation token of the next page; `None` on the last one.
    pub next: Option<String>,
}

/// An object as the bucket's listing shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedObject {
    /// Its key.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// When it was last written; an audit leaves objects younger than its grace alone, since
    /// a save may be writing them.
    pub last_modified: Option<DateTime<Utc>>,
}

/// An object as [`Store::head`] describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectHead {
    /// Bytes.
    pub size: u64,
    /// The `sha256` user metadata (lowercase hex), set on single-part uploads only.
    pub sha256: Option<String>,
}

/// An S3 timestamp as a chrono one (`None` out of chrono's range).
fn chrono_time(t: &aws_smithy_types::DateTime) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos())
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
                        // The bytes changed on the way (or the checksum did not match them):
                        // sending the spool file again may well succeed.
                        | "BadDigest"
                        | "XAmzContentChecksumMismatch"
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
    fn metadata_values_are_made_header_safe() {
        assert_eq!(header_safe("Zoë 100%"), "Zo%C3%AB 100%25");
        assert_eq!(header_safe("plain-voice_1"), "plain-voice_1");
    }
}
