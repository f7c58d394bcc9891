//! The S3 side of making a new take current, under the asset's save lease
//! ([`crate::pipeline::catalog::Catalog::acquire`]): the object at the asset's key and its
//! document always agree, whatever fails.
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

/// Undoes what a holder that died mid-save may have left: its backup copied back over the key
/// it was writing (then deleted), or, without a backup, the object it wrote under a key the
/// document does not name deleted. `previous` is the save the document holds.
///
/// # Errors
/// Any S3 error: the caller keeps the stale lease's record so the next holder tries again.
pub async fn repair(
    store: &Store,
    stale: &StaleLease,
    previous: Option<&SavedState>,
) -> Result<(), StageError> {
    if stale.target_key.is_empty() {
        return Ok(());
    }
    let backup = backup_key(&stale.target_key, &stale.token);
    if store.exists(&backup).await? {
        store.copy(&backup, &stale.target_key).await?;
        store.delete(&backup).await?;
        tracing::warn!(key = %stale.target_key, "repaired a save a killed worker left half done: previous bytes restored");
    } else if previous.is_none_or(|p| p.key != stale.target_key) {
        store.delete(&stale.target_key).await?;
        tracing::warn!(key = %stale.target_key, "removed an object a killed worker uploaded without committing it");
    }
    Ok(())
}

/// When the new take goes under the key the current save uses, copies the current bytes to
/// the lease's backup key and returns it; `None` when nothing would be replaced.
///
/// # Errors
/// Any S3 error; nothing has changed then.
pub async fn backup(store: &Store, lease: &Lease) -> Result<Option<String>, StageError> {
    match &lease.previous {
        Some(previous) if previous.key == lease.target_key => {
            let backup = backup_key(&lease.target_key, &lease.token);
            store.copy(&lease.target_key, &backup).await?;
            Ok(Some(backup))
        }
        _ => Ok(None),
    }
}

/// After a failed commit: the previous bytes copied back from `backup` (then deleted), or, when
/// nothing was replaced, the uncommitted object deleted. The asset is then as the document says.
///
/// # Errors
/// Any S3 error: the caller keeps the lease (it expires, and the next holder repairs).
pub async fn restore(store: &Store, lease: &Lease, backup: Option<&str>) -> Result<(), StageError> {
    match backup {
        Some(backup) => {
            store.copy(backup, &lease.target_key).await?;
            store.delete(backup).await
        }
        None => store.delete(&lease.target_key).await,
    }
}

/// After a commit: the backup deleted, and the previous save's object when the new take has
/// another key (another format). Best effort: a failure is logged. Returns the backup when it
/// could not be deleted, for [`drop_backup_later`] (its key is this lease's alone, so deleting it
/// later is always safe; the old key is not retried, since a later save may write it again).
pub async fn tidy(store: &Store, lease: &Lease, backup: Option<&str>) -> Option<String> {
    let old_key =
        lease.previous.as_ref().map(|p| p.key.as_str()).filter(|k| *k != lease.target_key && !k.is_empty());
    if let Some(key) = old_key
        && let Err(e) = store.delete(key).await
    {
        tracing::warn!(key, error = %e.reason, "deleting a replaced object failed");
    }
    let backup = backup?;
    match store.delete(backup).await {
        Ok(()) => None,
        Err(e) => {
            tracing::warn!(key = backup, error = %e.reason, "deleting the backup failed; trying again in the background");
            Some(backup.to_owned())
        }
    }
}

/// Deletes a committed save's leftover backup (S3 was out of reach at [`tidy`]), trying every
/// `retry` for up to `give_up`; after that the bucket's `.backup/` lifecycle rule expires it.
pub async fn drop_backup_later(
    store: Store,
    backup: String,
    retry: std::time::Duration,
    give_up: std::time::Duration,
) {
    let until = tokio::time::Instant::now() + give_up;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(retry).await;
        if store.delete(&backup).await.is_ok() {
            tracing::info!(key = %backup, "the leftover backup is deleted");
            return;
        }
    }
    tracing::warn!(key = %backup, "deleting the backup keeps failing; the .backup/ lifecycle rule expires it");
}
