//! The S3 side of making a new take current, under the asset's save lease
//! ([`crate::pipeline::catalog::Catalog::acquire`]): the object at the asset's key and its
//! document always agree, whatever fails.
//!
//! Every step works key by key over what the save writes: the audio, then the files made from
//! it (waveform, renditions), so they agree with the document as the audio does.
//!
//! ```text
//! lease ─► repair (a dead holder's leftovers) ─► backup (same key: copy the current bytes aside)
//!       ─► upload to the key ─► commit the document ─┬─ ok ─► tidy (drop the backup, the old key)
//!                                                     └─ failed ─► restore (backup back, or the
//!                                                                  uncommitted object deleted)
//! ```
//! The key keeps the seed's shape, `{customer_id}/{user_id}/audio/{asset_id}.{ext}`, so that is
//! where the current audio is read. The backup is a server-side copy (no byte passes through the
//! worker, memory stays flat for any size) at [`backup_key`], made only when the new take
//! replaces bytes under the same key; a first save or a change of format needs none. Each step
//! returns a [`StageError`]; the processor retries and sequences them.

use crate::asset::backup_key;
use crate::error::StageError;
use crate::pipeline::catalog::{Lease, SavedState, StaleLease};
use crate::pipeline::store::Store;

/// Undoes what a holder that died mid-save may have left, key by key (the audio, then its
/// waveform and renditions): its backup copied back over the key it was writing (then deleted),
/// or, without a backup, the object it wrote under a key the document does not name deleted.
/// `previous` is the save the document holds.
///
/// # Errors
/// Any S3 error: the caller keeps the stale lease's record so the next holder tries again.
pub async fn repair(
    store: &Store,
    stale: &StaleLease,
    previous: Option<&SavedState>,
) -> Result<(), StageError> {
    for key in stale.keys() {
        let backup = backup_key(key, &stale.token);
        if store.exists(&backup).await? {
            store.copy(&backup, key).await?;
            store.delete(&backup).await?;
            tracing::warn!(key, "repaired a save a killed worker left half done: previous bytes restored");
        } else if previous.is_none_or(|p| !p.keys().any(|k| k == key)) {
            store.delete(key).await?;
            tracing::warn!(key, "removed an object a killed worker uploaded without committing it");
        }
    }
    Ok(())
}

/// Copies the current bytes of each key the new take replaces (a key the current save holds
/// too) to the lease's backup key, and returns the keys backed up; none when nothing would be
/// replaced.
///
/// # Errors
/// Any S3 error; the backups made so far are this lease's alone (see [`backups_of`]).
pub async fn backup(store: &Store, lease: &Lease) -> Result<Vec<String>, StageError> {
    let Some(previous) = &lease.previous else { return Ok(Vec::new()) };
    let mut backed_up = Vec::new();
    for key in lease.keys().filter(|k| previous.keys().any(|p| p == *k)) {
        store.copy(key, &backup_key(key, &lease.token)).await?;
        backed_up.push(key.to_owned());
    }
    Ok(backed_up)
}

/// The backup keys `lease` may have made: what to delete when a backup's answer was lost.
pub fn backups_of(lease: &Lease) -> Vec<String> {
    lease.keys().map(|k| backup_key(k, &lease.token)).collect()
}

/// After a failed upload or commit, key by key: the previous bytes copied back from the backup
/// of each key in `backed_up` (then deleted), the other keys' uncommitted objects deleted. The
/// asset is then as the document says.
///
/// # Errors
/// Any S3 error: the caller keeps the lease (it expires, and the next holder repairs).
pub async fn restore(store: &Store, lease: &Lease, backed_up: &[String]) -> Result<(), StageError> {
    for key in lease.keys() {
        if backed_up.iter().any(|b| b == key) {
            let backup = backup_key(key, &lease.token);
            store.copy(&backup, key).await?;
            store.delete(&backup).await?;
        } else {
            store.delete(key).await?;
        }
    }
    Ok(())
}

/// After a commit: the backups deleted, and the previous save's objects under keys the new
/// take does not write (another format, a rendition no longer made). Best effort: a failure is
/// logged. Returns the backups that could not be deleted, for [`drop_backup_later`] (their keys
/// are this lease's alone, so deleting them later is always safe; the old keys are not retried,
/// since a later save may write them again).
pub async fn tidy(store: &Store, lease: &Lease, backed_up: &[String]) -> Vec<String> {
    if let Some(previous) = &lease.previous {
        for key in previous.keys().filter(|k| !k.is_empty() && !lease.keys().any(|n| n == *k)) {
            if let Err(e) = store.delete(key).await {
                tracing::warn!(key, error = %e.reason, "deleting a replaced object failed");
            }
        }
    }
    let mut left = Vec::new();
    for key in backed_up {
        let backup = backup_key(key, &lease.token);
        if let Err(e) = store.delete(&backup).await {
            tracing::warn!(key = backup, error = %e.reason, "deleting the backup failed; trying again in the background");
            left.push(backup);
        }
    }
    left
}

/// Deletes a committed save's leftover backups (S3 was out of reach at [`tidy`]), trying every
/// `retry` for up to `give_up`; after that the bucket's `.backup/` lifecycle rule expires them.
pub async fn drop_backup_later(
    store: Store,
    mut backups: Vec<String>,
    retry: std::time::Duration,
    give_up: std::time::Duration,
) {
    let until = tokio::time::Instant::now() + give_up;
    while tokio::time::Instant::now() < until && !backups.is_empty() {
        tokio::time::sleep(retry).await;
        let mut left = Vec::new();
        for backup in backups {
            if store.delete(&backup).await.is_ok() {
                tracing::info!(key = %backup, "the leftover backup is deleted");
            } else {
                left.push(backup);
            }
        }
        backups = left;
    }
    for backup in backups {
        tracing::warn!(key = %backup, "deleting the backup keeps failing; the .backup/ lifecycle rule expires it");
    }
}
