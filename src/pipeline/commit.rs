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
/// another key (another format). Best effort: a failure is logged (a leftover backup is
/// expired by the bucket's `.backup/` lifecycle rule).
pub async fn tidy(store: &Store, lease: &Lease, backup: Option<&str>) {
    let old_key =
        lease.previous.as_ref().map(|p| p.key.as_str()).filter(|k| *k != lease.target_key && !k.is_empty());
    for key in backup.into_iter().chain(old_key) {
        if let Err(e) = store.delete(key).await {
            tracing::warn!(key, error = %e.reason, "deleting a replaced object failed");
        }
    }
}
