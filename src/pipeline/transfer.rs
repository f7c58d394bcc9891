//! Stages 1 and 2 overlapped: a large file is uploaded while it downloads.
//!
//! The download streams the body into its spool file, as [`download`] always does, and
//! publishes how many bytes are flushed. Once [`PART_SIZE`] bytes are there the uploader starts
//! a multipart upload and sends each full part, read back from the spool file, while the next
//! one downloads, at most [`PARTS_IN_FLIGHT`] at a time. No part is ever held in memory: memory
//! per job is the HTTP and S3 clients' streaming buffers, whatever the file size.
//!
//! The download's caller gets the upload back as a [`Pending`] once the download passed every
//! check (length, format, the demuxer's reading), and completes it only when the asset's object
//! may be replaced (under the asset's save lease), or aborts it; a failed download aborts it
//! here. A file smaller than one part, or any S3 failure on the way, leaves the upload to the
//! ordinary upload stage, which sends the spool file (and is retried like any stage).

use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use std::path::Path;

use crate::asset::{Downloaded, StoredObject, object_key};
use crate::error::{Stage, StageError};
use crate::job::Job;
use crate::pipeline::download::{self, Spooled};
use crate::pipeline::store::Store;

/// Part size of multipart uploads, in bytes: 8 MiB (S3's minimum is 5 MiB, and 10,000 parts
/// would allow 78 GiB, far above `MAX_AUDIO_BYTES`). Files smaller than this are uploaded in one
/// `PutObject` after the download.
pub const PART_SIZE: u64 = 8 << 20;

/// Parts of one job uploading at the same time.
pub const PARTS_IN_FLIGHT: usize = 2;

/// A multipart upload whose full parts are sent or sending, not completed: the object at its
/// key is unchanged until [`Pending::complete`].
#[derive(Debug)]
pub struct Pending {
    key: String,
    upload_id: String,
    /// Part uploads, in part order; each yields the part's ETag.
    parts: Vec<JoinHandle<Result<String, StageError>>>,
    /// Where the next part starts in the spool file.
    next_offset: u64,
}

/// Downloads `job`'s audio with `http` into a spool file in `spool_dir` (within `limits`,
/// as [`download::download`] does), uploading it to `store` at the same time when it is larger
/// than a part.
///
/// Returns the download and, when the overlapped upload went well so far, the pending upload to
/// complete or abort (without one the caller uploads the spool file itself).
///
/// # Errors
/// The download's [`StageError`]; the multipart upload, if one started, has been aborted.
pub async fn download_and_upload(
    http: &reqwest::Client,
    store: &Store,
    job: &Job,
    spool_dir: &Path,
    limits: download::Limits,
) -> Result<(Downloaded, Option<Pending>), StageError> {
    let (progress, spooled) = watch::channel(Spooled::default());
    let downloading =
        download::download(http, &job.source.url, spool_dir, limits, Some((progress, PART_SIZE)));
    let uploading = upload_parts(store.clone(), job.clone(), spooled);
    let (downloaded, pending) = tokio::join!(downloading, uploading);
    let pending = match pending {
        Ok(pending) => pending,
        Err((error, started)) => {
            tracing::warn!(error = %error.reason, "overlapped upload failed; the upload stage will send the spool file");
            if let Some(pending) = started {
                abort(store, pending).await;
            }
            None
        }
    };
    let downloaded = match downloaded {
        Ok(downloaded) => downloaded,
        Err(error) => {
            if let Some(pending) = pending {
                abort(store, pending).await;
            }
            return Err(error);
        }
    };
    let Some(pending) = pending else { return Ok((downloaded, None)) };
    if pending.key != object_key(job, downloaded.format) {
        abort(store, pending).await;
        return Ok((downloaded, None));
    }
    Ok((downloaded, Some(pending)))
}

impl Pending {
    /// Sends the last part, waits for every part and completes the upload: the stored object.
    /// On failure the upload is aborted (the caller can still send the spool file).
    ///
    /// # Errors
    /// Any S3 error of the parts or the completion.
    pub async fn complete(self, store: &Store, file: &Downloaded) -> Result<StoredObject, StageError> {
        complete(store, self, file).await
    }

    /// Aborts the upload: the object at its key stays as it was.
    pub async fn abort(self, store: &Store) {
        abort(store, self).await;
    }
}

/// The uploader: follows the download's progress and sends each full part as soon as it is
/// flushed. `Ok(None)` when the file was smaller than a part (nothing was sent); on an S3 error
/// the error and the upload to abort, if one was started.
async fn upload_parts(
    store: Store,
    job: Job,
    mut spooled: watch::Receiver<Spooled>,
) -> Result<Option<Pending>, (StageError, Option<Pending>)> {
    let mut pending: Option<Pending> = None;
    let slots = Arc::new(Semaphore::new(PARTS_IN_FLIGHT));
    // The first part upload to fail, so the loop stops starting new ones.
    let failed: Arc<Mutex<Option<StageError>>> = Arc::default();
    loop {
        let Spooled { path, flushed, format, part_checksums } = spooled.borrow_and_update().clone();
        let next = pending.as_ref().map_or(0, |p| p.next_offset);
        if let Some(path) = path.filter(|_| flushed >= next + PART_SIZE) {
            if pending.is_none() {
                // Not audio: the download refuses it; there is nothing to follow.
                let Some(format) = format else { return Ok(None) };
                let key = object_key(&job, format);
                let upload_id = store.create_multipart(&job, &key, format).await.map_err(|e| (e, None))?;
                pending = Some(Pending { key, upload_id, parts: Vec::new(), next_offset: 0 });
            }
            let upload = pending.as_mut().expect("started above");
            // Waiting for a slot is the backpressure: the download runs ahead on disk only.
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            if let Some(error) = failed.lock().expect("lock").clone() {
                return Err((error, pending));
            }
            let index = upload.parts.len();
            let number = i32::try_from(index + 1).unwrap_or(i32::MAX);
            let Some(crc32c) = part_checksums.get(index).cloned() else {
                let error = StageError::transient(Stage::Upload, format!("no checksum for part {number}"));
                return Err((error, pending));
            };
            let (store, key, upload_id) = (store.clone(), upload.key.clone(), upload.upload_id.clone());
            let (offset, failed) = (upload.next_offset, failed.clone());
            upload.parts.push(tokio::spawn(async move {
                let _permit = permit;
                let sent = store
                    .upload_part_from_file(&key, &upload_id, number, &path, offset, PART_SIZE, &crc32c)
                    .await;
                if let Err(e) = &sent {
                    failed.lock().expect("lock").get_or_insert_with(|| e.clone());
                }
                sent
            }));
            upload.next_offset += PART_SIZE;
            continue;
        }
        if spooled.changed().await.is_err() {
            // The download ended; the caller decides with its result.
            return Ok(pending);
        }
    }
}

/// Sends the parts not sent yet, waits for every part, and completes the upload; aborts on any
/// error.
async fn complete(store: &Store, pending: Pending, file: &Downloaded) -> Result<StoredObject, StageError> {
    let Pending { key, upload_id, mut parts, next_offset } = pending;
    // The parts the uploader had not started (the spool file is written in batches, so the last
    // full parts may be written only as the download ends), then the last, partial one.
    let mut offset = next_offset;
    while offset < file.size {
        let number = i32::try_from(parts.len() + 1).unwrap_or(i32::MAX);
        let (store, key, upload_id, path) =
            (store.clone(), key.clone(), upload_id.clone(), file.path.to_path_buf());
        let length = (file.size - offset).min(PART_SIZE);
        let crc32c = file.part_checksums.get(parts.len()).cloned().unwrap_or_default();
        let start = offset;
        parts.push(tokio::spawn(async move {
            store.upload_part_from_file(&key, &upload_id, number, &path, start, length, &crc32c).await
        }));
        offset += length;
    }
    let mut etags = Vec::with_capacity(parts.len());
    let mut failed = None;
    for part in parts {
        match part.await {
            Ok(Ok(etag)) => etags.push(etag),
            Ok(Err(e)) => failed = failed.or(Some(e)),
            Err(e) => failed = failed.or(Some(StageError::transient(Stage::Upload, e.to_string()))),
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
