//! The asset's save lease: one job at a time writes an asset's object and commits its
//! document, so S3's last writer and MongoDB's last writer are always the same job. The lease is
//! a `lease` field of the document (`token`, `until`, `target_key`), taken and given up with
//! single atomic updates and renewed by its holder while it works.

use std::time::Duration;

use chrono::Utc;
use mongodb::bson::{self, Document, doc};
use mongodb::options::ReturnDocument;

use super::{
    Bounded, Catalog, DUPLICATE_KEY, SavedState, bson_time, classify, entry, error_code, save_state_fields,
    save_update,
};
use crate::asset::{CatalogEntry, StoredObject};
use crate::error::{Stage, StageError};
use crate::job::Job;

impl Catalog {
    /// Takes the asset's save lease for `job`, which will write `target_key` and `derived_keys`
    /// (the waveform and renditions beside the audio): only the holder
    /// writes the asset's object or commits its document, so saves of one asset never
    /// interleave. Creates a pending document (no `status`) for a first save. A lease left by a
    /// holder that died is taken over once expired and returned as [`Lease::stale`], to be
    /// repaired before anything else.
    ///
    /// # Errors
    /// Transient while another job holds the lease (the job waits and tries again); permanent
    /// for another tenant's `asset_id`; network and server errors as usual.
    pub async fn acquire(
        &self,
        job: &Job,
        target_key: &str,
        derived_keys: &[String],
    ) -> Result<Lease, StageError> {
        let now = Utc::now();
        let token = uuid::Uuid::new_v4().to_string();
        let mut lease = doc! {
            "token": &token,
            "until": bson_time(now + chrono::Duration::from_std(self.lease).unwrap_or_default()),
            "target_key": target_key,
        };
        if !derived_keys.is_empty() {
            lease.insert("derived_keys", derived_keys);
        }
        let taken = |previous: Option<SavedState>, stale| Lease {
            token: token.clone(),
            target_key: target_key.to_owned(),
            derived_keys: derived_keys.to_vec(),
            previous,
            stale,
        };
        // The common case, one round trip: no lease on the document (or no document yet).
        let mut free = self.tenant(job);
        free.insert("lease", doc! { "$exists": false });
        match self
            .collection
            .find_one_and_update(free, doc! { "$set": { "lease": lease.clone() } })
            .upsert(true)
            .projection(save_state_fields())
            .return_document(ReturnDocument::After)
            .within_raw(self.timeout)
            .await?
        {
            Ok(Some(after)) if after.get_document("lease").and_then(|l| l.get_str("token")) == Ok(&token) => {
                return Ok(taken(SavedState::of(&after), None));
            }
            Ok(_) => {
                // MongoDB always returns the document it upserted; SecantusDB, under concurrent
                // upserts, sometimes returns none: read it back.
                let mut mine = self.tenant(job);
                mine.insert("lease.token", &token);
                let after = self
                    .collection
                    .find_one(mine)
                    .projection(save_state_fields())
                    .within(self.timeout)
                    .await?;
                return Ok(taken(after.as_ref().and_then(SavedState::of), None));
            }
            Err(e) if error_code(&e) == Some(DUPLICATE_KEY) => {}
            Err(e) => return Err(classify(e)),
        }
        // A lease is there: take it over only once it has expired, keeping what it said.
        let mut expired = self.tenant(job);
        expired.insert("lease.until", doc! { "$lt": bson_time(now) });
        let before = self
            .collection
            .find_one_and_update(expired, doc! { "$set": { "lease": lease } })
            .projection(save_state_fields())
            .return_document(ReturnDocument::Before)
            .within(self.timeout)
            .await?;
        if let Some(before) = before {
            let stale = before.get_document("lease").ok().map(|l| StaleLease {
                token: l.get_str("token").unwrap_or_default().to_owned(),
                target_key: l.get_str("target_key").unwrap_or_default().to_owned(),
                derived_keys: l
                    .get_array("derived_keys")
                    .map(|keys| keys.iter().filter_map(|k| k.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default(),
            });
            return Ok(taken(SavedState::of(&before), stale));
        }
        Err(match self.tenant_conflict(job).await? {
            Some(conflict) => conflict,
            None => StageError::transient(
                Stage::Catalog,
                format!("asset {} is being saved by another job (its save lease is held)", job.asset_id),
            ),
        })
    }

    /// Commits a save under `lease`: sets the storage, checksum, TTS fields and provenance, bumps
    /// `version` (new bytes), and gives the lease up, in one update. With the same bytes as the
    /// stored save only the URLs change (the version and its event id stay).
    ///
    /// # Errors
    /// Transient when the lease was lost (it expired and another job took it) or for network and
    /// server errors; permanent when the server rejects the write.
    pub async fn commit(
        &self,
        job: &Job,
        lease: &Lease,
        object: &StoredObject,
    ) -> Result<CatalogEntry, StageError> {
        let mut filter = self.tenant(job);
        filter.insert("lease.token", &lease.token);
        let same_bytes = lease.previous.as_ref().is_some_and(|p| p.holds(object));
        let update = if same_bytes {
            let mut set = doc! {
                "storage.url": &object.url,
                "storage.url_expires_at": object.url_expires_at.map(bson_time),
                "storage.delivery": object.delivery.as_str(),
                "committed_lease": &lease.token,
            };
            // The same files beside it too (their bytes are in `storage.derived`): fresh URLs.
            set.extend(super::derived_fields(object));
            doc! { "$set": set, "$unset": { "lease": "" } }
        } else {
            let mut update = save_update(job, object);
            if lease.previous.is_none()
                && let Ok(set) = update.get_document_mut("$set")
            {
                // A first save: created when it is committed, not when its lease was taken.
                let updated_at = set.get("updated_at").cloned().unwrap_or(bson::Bson::Null);
                set.insert("created_at", updated_at);
            }
            if let Ok(set) = update.get_document_mut("$set") {
                set.insert("committed_lease", &lease.token);
            }
            update.insert("$unset", doc! { "lease": "" });
            update
        };
        // While the lease is held nobody else changes the document, so the entry the commit
        // makes is known from what the lease saw: an update that returns nothing back (a
        // findAndModify costs the server more, and its reply is the whole document).
        let committed = match (&lease.previous, same_bytes) {
            (Some(previous), true) => {
                CatalogEntry { version: previous.version, created_at: previous.created_at }
            }
            (Some(previous), false) => {
                CatalogEntry { version: previous.version + 1, created_at: previous.created_at }
            }
            (None, _) => {
                let created_at = update
                    .get_document("$set")
                    .and_then(|set| set.get_datetime("created_at"))
                    .ok()
                    .and_then(|d| chrono::DateTime::from_timestamp_millis(d.timestamp_millis()))
                    .unwrap_or_else(Utc::now);
                CatalogEntry { version: 1, created_at }
            }
        };
        let result = self.collection.update_one(filter, update).within(self.timeout).await?;
        match result.matched_count {
            1 => Ok(committed),
            _ => Err(StageError::transient(
                Stage::Catalog,
                format!("the save lease of asset {} expired before the commit", job.asset_id),
            )),
        }
    }

    /// What became of a commit under `lease` that returned an error: the error may have come
    /// after MongoDB applied it (the reply lost, a timeout), so the document is asked. The
    /// commit stamps `committed_lease` with the lease's token in the same update that gives the
    /// lease up, so exactly one of "still mine" and "committed by me" can hold, or neither (the
    /// lease expired and another holder took it).
    ///
    /// # Errors
    /// MongoDB does not answer: the outcome is unknown.
    pub async fn commit_outcome(&self, job: &Job, lease: &Lease) -> Result<CommitOutcome, StageError> {
        let mut either = self.tenant(job);
        either.insert(
            "$or",
            vec![doc! { "lease.token": &lease.token }, doc! { "committed_lease": &lease.token }],
        );
        let Some(found) = self.collection.find_one(either).within(self.timeout).await? else {
            return Ok(CommitOutcome::Lost);
        };
        if found.get_document("lease").and_then(|l| l.get_str("token")) == Ok(lease.token.as_str()) {
            return Ok(CommitOutcome::Pending);
        }
        Ok(CommitOutcome::Committed(entry(&found)?))
    }

    /// Extends `lease` by another `SAVE_LEASE_SECS` from now. Its holder calls this every third
    /// of the lease while it works, so only a holder that died loses it.
    ///
    /// # Errors
    /// Transient when the lease is no longer this holder's (it expired and was taken over) or
    /// MongoDB does not answer.
    pub async fn renew(&self, job: &Job, lease: &Lease) -> Result<(), StageError> {
        let mut mine = self.tenant(job);
        mine.insert("lease.token", &lease.token);
        let until = bson_time(Utc::now() + chrono::Duration::from_std(self.lease).unwrap_or_default());
        let renewed = self
            .collection
            .update_one(mine, doc! { "$set": { "lease.until": until } })
            .within(self.timeout)
            .await?;
        if renewed.matched_count == 0 {
            return Err(StageError::transient(
                Stage::Catalog,
                format!("the save lease of asset {} was lost", job.asset_id),
            ));
        }
        Ok(())
    }

    /// How often a lease holder renews its lease.
    pub fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    /// Gives up `lease` without a commit: a pending first-save document goes away with it, a
    /// saved one keeps its save. When MongoDB does not answer, a background task tries again
    /// every [`RELEASE_RETRY`] for up to [`RELEASE_GIVE_UP`], so an outage does not hold the
    /// asset for a whole lease nor leave a first save's pending document behind.
    pub async fn release(&self, job: &Job, lease: &Lease) {
        let mut mine = self.tenant(job);
        mine.insert("lease.token", &lease.token);
        if let Err(e) = self.try_release(&mine).await {
            tracing::warn!(error = %e.reason, "releasing the save lease failed; trying again in the background");
            let this = self.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + RELEASE_GIVE_UP;
                while tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(RELEASE_RETRY).await;
                    if this.try_release(&mine).await.is_ok() {
                        tracing::info!("save lease released after all");
                        return;
                    }
                }
            });
        }
    }

    /// One attempt of [`Catalog::release`] for the lease named by `mine` (tenant and token).
    async fn try_release(&self, mine: &Document) -> Result<(), StageError> {
        let mut pending = mine.clone();
        pending.insert("status", doc! { "$exists": false });
        if self.collection.delete_one(pending).within(self.timeout).await?.deleted_count == 0 {
            let unset = doc! { "$unset": { "lease": "" } };
            self.collection.update_one(mine.clone(), unset).within(self.timeout).await?;
        }
        Ok(())
    }

    /// Ends `lease` at once, keeping its record, when what it wrote could not be put back (S3
    /// down): the next job to take the lease repairs it immediately, instead of waiting for it
    /// to expire. Best effort: otherwise it expires after `SAVE_LEASE_SECS`.
    pub async fn expire(&self, job: &Job, lease: &Lease) {
        self.put_back_stale(job, lease, &lease.as_stale()).await;
    }

    /// Hands `stale`'s record back to the document in place of `lease`, already expired, when
    /// its repair failed: the next job to take the lease repairs it. Best effort.
    pub async fn put_back_stale(&self, job: &Job, lease: &Lease, stale: &StaleLease) {
        let mut mine = self.tenant(job);
        mine.insert("lease.token", &lease.token);
        let mut expired =
            doc! { "token": &stale.token, "until": bson_time(Utc::now()), "target_key": &stale.target_key };
        if !stale.derived_keys.is_empty() {
            expired.insert("derived_keys", &stale.derived_keys);
        }
        let put_back = doc! { "$set": { "lease": expired } };
        if let Err(e) = self.collection.update_one(mine, put_back).within(self.timeout).await {
            tracing::warn!(error = %e.reason, "putting a stale save lease back failed");
        }
    }
}

/// How often a lease that could not be released is tried again (see [`Catalog::release`]).
pub const RELEASE_RETRY: Duration = Duration::from_secs(2);

/// How long a lease that could not be released is tried again: an expired lease no longer holds
/// the asset, but a first save's pending document should not outlive a MongoDB outage.
pub const RELEASE_GIVE_UP: Duration = Duration::from_secs(10 * 60);

/// A save lease held by a job (see [`Catalog::acquire`]).
#[derive(Debug, Clone)]
pub struct Lease {
    /// Names the holder in the document, and the holder's backup object.
    pub token: String,
    /// The object key the holder writes.
    pub target_key: String,
    /// The keys of the files the holder writes beside it (waveform, renditions), recorded in
    /// the lease so that a next holder repairs them too.
    pub derived_keys: Vec<String>,
    /// The asset's save when the lease was taken; `None` for a first save.
    pub previous: Option<SavedState>,
    /// The expired lease this one replaced, if its holder died mid-save: what it may have left
    /// in S3 is repaired before the new save.
    pub stale: Option<StaleLease>,
}

/// The answer of [`Catalog::commit_outcome`].
#[derive(Debug, Clone)]
pub enum CommitOutcome {
    /// The document still holds the lease: the commit did not land; the holder may restore.
    Pending,
    /// The commit landed (its reply was lost): the save stands, with this version.
    Committed(CatalogEntry),
    /// Neither: the lease expired and another holder took it, which repairs what is left.
    Lost,
}

impl Lease {
    /// Every key the holder writes: the audio's, then the derived ones.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.target_key.as_str()).chain(self.derived_keys.iter().map(String::as_str))
    }

    /// This lease as a next holder would find it, for a repair.
    pub fn as_stale(&self) -> StaleLease {
        StaleLease {
            token: self.token.clone(),
            target_key: self.target_key.clone(),
            derived_keys: self.derived_keys.clone(),
        }
    }
}

/// What a dead holder's lease said: its token (its backup objects' name) and the keys it wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct StaleLease {
    /// The dead holder's token.
    pub token: String,
    /// The key the dead holder may have written without committing.
    pub target_key: String,
    /// The derived keys (waveform, renditions) it may have written too.
    pub derived_keys: Vec<String>,
}

impl StaleLease {
    /// Every key the dead holder may have written.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.target_key.as_str())
            .chain(self.derived_keys.iter().map(String::as_str))
            .filter(|k| !k.is_empty())
    }
}
