//! Stages 1 and 2 overlapped: a large file is uploaded while it downloads.
//!
//! The download streams chunks to its spool file (as [`download`] always does) and, through a
//! bounded channel, to an uploader. Once [`PART_SIZE`] bytes have arrived the uploader starts
//! a multipart upload and sends each full part while the next one fills, at most
//! [`PARTS_IN_FLIGHT`] at a time; when they are all busy it stops reading the channel, which
//! stops the download. Memory per job is therefore bounded by `PARTS_IN_FLIGHT + 1` parts
//! (24 MiB), whatever the file size.
//!
//! The upload is completed only after the download passed every check (length, format, the
//! demuxer's reading); any failure aborts it, so no incomplete upload is left behind. A file
//! smaller than one part, or any S3 failure on the way, leaves the upload to the ordinary
//! upload stage, which reads the spool file (and is retried like any stage).

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::error::StageError;
use crate::job::Job;
use crate::pipeline::download::{self, AudioFormat, Downloaded};
use crate::pipeline::store::{Store, StoredObject, object_key};
use crate::processor::Deps;

/// Part size of multipart uploads, in bytes: 8 MiB (S3's minimum is 5 MiB, and 10,000 parts
/// would allow 78 GiB, far above `MAX_AUDIO_BYTES`). Files smaller than this are uploaded in one
/// `PutObject` after the download.
pub const PART_SIZE: usize = 8 << 20;

/// Parts of one job uploading at the same time.
pub const PARTS_IN_FLIGHT: usize = 2;

/// Chunks (of a few KiB to 16 KiB each) buffered between the download and the uploader.
const CHANNEL_CHUNKS: usize = 64;

/// A multipart upload whose parts are sent or sending, waiting for the download's verdict.
struct Pending {
    key: String,
    upload_id: String,
    /// Part uploads, in part order; each yields the part's ETag.
    parts: Vec<JoinHandle<Result<String, StageError>>>,
    /// The bytes after the last full part: the final part.
    rest: Bytes,
}

/// Downloads `job`'s audio, uploading it at the same time when it is larger than a part.
///
/// Returns the download and, when the overlapped upload completed, the stored object (else
/// the caller uploads the spool file itself).
///
/// # Errors
/// The download's [`StageError`]; the multipart upload, if one started, has been aborted.
pub async fn download_and_upload(
    deps: &Deps,
    job: &Job,
) -> Result<(Downloaded, Option<StoredObject>), StageError> {
    let settings = &deps.settings;
    let (sender, receiver) = mpsc::channel(CHANNEL_CHUNKS);
    let downloading = download::download(
        &deps.http,
        &job.source.url,
        &settings.worker.tmp_dir,
        settings.audio_gen.max_audio_bytes,
        Some((sender, PART_SIZE as u64)),
    );
    let uploading = upload_parts(deps.store.clone(), job.clone(), receiver);
    let (downloaded, pending) = tokio::join!(downloading, uploading);
    let pending = match pending {
        Ok(pending) => pending,
        Err((error, started)) => {
            tracing::warn!(error = %error.reason, "overlapped upload failed; the upload stage will send the spool file");
            if let Some((key, upload_id)) = started {
                deps.store.abort_multipart(&key, &upload_id).await;
            }
            None
        }
    };
    let downloaded = match downloaded {
        Ok(downloaded) => downloaded,
        Err(error) => {
            if let Some(pending) = pending {
                abort(&deps.store, pending).await;
            }
            return Err(error);
        }
    };
    let Some(pending) = pending else { return Ok((downloaded, None)) };
    if pending.key != object_key(job, downloaded.format) {
        abort(&deps.store, pending).await;
        return Ok((downloaded, None));
    }
    match complete(&deps.store, pending, &downloaded).await {
        Ok(object) => Ok((downloaded, Some(object))),
        Err(error) => {
            tracing::warn!(error = %error.reason, "completing the overlapped upload failed; the upload stage will send the spool file");
            Ok((downloaded, None))
        }
    }
}

/// The uploader: reads chunks until the download ends, sending full parts as they fill.
/// `Ok(None)` when the file was smaller than a part (nothing was sent); on an S3 error the
/// error and, when one was started, the upload's `(key, upload_id)` to abort.
#[allow(clippy::type_complexity)]
async fn upload_parts(
    store: Store,
    job: Job,
    mut chunks: mpsc::Receiver<Bytes>,
) -> Result<Option<Pending>, (StageError, Option<(String, String)>)> {
    let mut buffer = BytesMut::new();
    let mut upload: Option<(String, String)> = None;
    let mut parts = Vec::new();
    let slots = Arc::new(Semaphore::new(PARTS_IN_FLIGHT));
    let failed: Arc<Mutex<Option<StageError>>> = Arc::default();
    while let Some(chunk) = chunks.recv().await {
        buffer.extend_from_slice(&chunk);
        while buffer.len() >= PART_SIZE {
            if upload.is_none() {
                // The download refuses what does not sniff as audio; stop following it.
                let Some(format) = AudioFormat::sniff(&buffer[..AudioFormat::SNIFF_BYTES]) else {
                    return Ok(None);
                };
                let key = object_key(&job, format);
                let upload_id = store.create_multipart(&job, &key, format).await.map_err(|e| (e, None))?;
                upload = Some((key, upload_id));
            }
            let (key, upload_id) = upload.clone().expect("started above");
            // A failed part ends the overlap; the parts already sending are aborted with it.
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            if let Some(error) = failed.lock().expect("lock").clone() {
                return Err((error, upload));
            }
            let part = buffer.split_to(PART_SIZE).freeze();
            let number = i32::try_from(parts.len() + 1).unwrap_or(i32::MAX);
            let (store, failed) = (store.clone(), failed.clone());
            parts.push(tokio::spawn(async move {
                let _permit = permit;
                let sent = store.upload_part(&key, &upload_id, number, part).await;
                if let Err(e) = &sent {
                    failed.lock().expect("lock").get_or_insert_with(|| e.clone());
                }
                sent
            }));
        }
    }
    match upload {
        None => Ok(None),
        Some((key, upload_id)) => Ok(Some(Pending { key, upload_id, parts, rest: buffer.freeze() })),
    }
}

/// Sends the last part, waits for every part, and completes the upload; aborts on any error.
async fn complete(store: &Store, pending: Pending, file: &Downloaded) -> Result<StoredObject, StageError> {
    let Pending { key, upload_id, mut parts, rest } = pending;
    if !rest.is_empty() {
        let number = i32::try_from(parts.len() + 1).unwrap_or(i32::MAX);
        let (store, key, upload_id) = (store.clone(), key.clone(), upload_id.clone());
        parts.push(tokio::spawn(async move { store.upload_part(&key, &upload_id, number, rest).await }));
    }
    let mut etags = Vec::with_capacity(parts.len());
    let mut failed = None;
    for part in parts {
        match part.await {
            Ok(Ok(etag)) => etags.push(etag),
            Ok(Err(e)) => failed = failed.or(Some(e)),
            Err(e) => {
                failed = failed.or(Some(StageError::transient(crate::error::Stage::Upload, e.to_string())))
            }
        }
    }
    let result = match failed {
        Some(e) => Err(e),
        None => store.complete_multipart(&key, &upload_id, etags, file).await,
    };
    if result.is_err() {
        store.abort_multipart(&key, &upload_id).await;
    }
    result
}

/// Waits for the parts already sending (so none lands after the abort), then aborts.
async fn abort(store: &Store, pending: Pending) {
    for part in pending.parts {
        let _ = part.await;
    }
    store.abort_multipart(&pending.key, &pending.upload_id).await;
}
