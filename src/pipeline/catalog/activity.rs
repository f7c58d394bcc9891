//! What the worker replicas did lately, for the operator console: one heartbeat document per
//! replica (collection `audio_workers`, `_id` = the replica's id) and its settled deliveries per
//! minute (collection `audio_worker_activity`, `_id` = `{replica}/{minute}`), each written with
//! one upsert per flush ([`crate::activity::report`]), never on a job's path.

use chrono::{DateTime, Duration, DurationRound, Utc};
use mongodb::IndexModel;
use mongodb::bson::{Document, doc};
use mongodb::options::{IndexOptions, UpdateOptions};
use serde::Serialize;

use super::{Bounded, Catalog, bson_time};
use crate::error::StageError;

/// The two activity collections, on the catalog's client and database.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    /// `{MONGODB_DATABASE}.audio_workers`: one heartbeat per replica.
    workers: mongodb::Collection<Document>,
    /// `{MONGODB_DATABASE}.audio_worker_activity`: per replica and minute, the outcomes counted.
    minutes: mongodb::Collection<Document>,
    /// `MONGODB_OPERATION_TIMEOUT_SECS`, as for the assets.
    timeout: std::time::Duration,
}

/// Settled deliveries, by outcome (the `outcome` label of `audio_worker_jobs_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OutcomeCounts {
    /// Saved (`audio.saved` confirmed, delivery acked).
    pub saved: u64,
    /// Parked in a delay queue for a later attempt.
    pub retried: u64,
    /// Sent to the dead-letter queue.
    pub dead_lettered: u64,
    /// Ended superseded by a newer save of the asset.
    pub superseded: u64,
}

impl OutcomeCounts {
    /// Whether nothing was counted (a flush with nothing to add writes nothing).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A worker replica as its last heartbeat described it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replica {
    /// `{host}/{pid}`: the pod name in Kubernetes (`HOSTNAME`) and the process id.
    pub id: String,
    /// The crate version the replica runs (`CARGO_PKG_VERSION`), to spot a rollout half done.
    pub version: String,
    /// When the replica started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat; one older than a few flush intervals means it is gone.
    pub last_seen: DateTime<Utc>,
    /// Whether it was consuming at its last heartbeat (false while it reconnects).
    pub consuming: bool,
}

impl Catalog {
    /// The replicas' heartbeats and per-minute outcomes, beside the assets.
    pub fn activity(&self) -> ActivityLog {
        ActivityLog {
            workers: self.database.collection("audio_workers"),
            minutes: self.database.collection("audio_worker_activity"),
            timeout: self.timeout,
        }
    }
}

/// The start of the minute `t` falls in: the bucket its outcomes are added to.
fn minute_of(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::minutes(1)).unwrap_or(t)
}

/// How long heartbeats and minute buckets are kept: MongoDB's TTL monitor removes older ones,
/// so the collections stay small (the console reads the last hour).
pub const ACTIVITY_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

impl ActivityLog {
    /// TTL indexes on `minute` and `last_seen` ([`ACTIVITY_TTL`]), so old buckets and gone
    /// replicas' heartbeats expire.
    ///
    /// # Errors
    /// MongoDB refused (a server without TTL indexes) or did not answer.
    pub async fn ensure_indexes(&self) -> Result<(), StageError> {
        let ttl = |field: &str| {
            IndexModel::builder()
                .keys(doc! { field: 1 })
                .options(
                    IndexOptions::builder().expire_after(ACTIVITY_TTL).name(format!("{field}_ttl")).build(),
                )
                .build()
        };
        self.minutes.create_index(ttl("minute")).within(self.timeout).await?;
        self.workers.create_index(ttl("last_seen")).within(self.timeout).await?;
        Ok(())
    }

    /// Records `replica`'s heartbeat and adds `counts` to its bucket of the minute `at` (one
    /// upsert each; nothing is added when `counts` is empty).
    ///
    /// # Errors
    /// MongoDB refused or did not answer within the operation timeout.
    pub async fn record(
        &self,
        replica: &Replica,
        counts: OutcomeCounts,
        at: DateTime<Utc>,
    ) -> Result<(), StageError> {
        let upsert = UpdateOptions::builder().upsert(true).build();
        let heartbeat = doc! {
            "$set": {
                "version": &replica.version,
                "started_at": bson_time(replica.started_at),
                "last_seen": bson_time(replica.last_seen),
                "consuming": replica.consuming,
            },
        };
        self.workers
            .update_one(doc! { "_id": &replica.id }, heartbeat)
            .with_options(upsert.clone())
            .within(self.timeout)
            .await?;
        if counts.is_empty() {
            return Ok(());
        }
        let minute = minute_of(at);
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let add = doc! {
            "$set": { "replica": &replica.id, "minute": bson_time(minute) },
            "$inc": {
                "saved": to_i64(counts.saved),
                "retried": to_i64(counts.retried),
                "dead_lettered": to_i64(counts.dead_lettered),
                "superseded": to_i64(counts.superseded),
            },
        };
        let id = format!("{}/{}", replica.id, minute.format("%Y-%m-%dT%H:%MZ"));
        self.minutes.update_one(doc! { "_id": id }, add).with_options(upsert).within(self.timeout).await?;
        Ok(())
    }

    /// Every replica's outcomes from the minute buckets that start at or after `since`.
    ///
    /// # Errors
    /// MongoDB refused or did not answer within the operation timeout.
    pub async fn outcomes_since(&self, since: DateTime<Utc>) -> Result<OutcomeCounts, StageError> {
        let filter = doc! { "minute": { "$gte": bson_time(minute_of(since)) } };
        let mut cursor = self.minutes.find(filter).within(self.timeout).await?;
        let mut total = OutcomeCounts::default();
        let count = |d: &Document, field: &str| {
            d.get(field).and_then(|v| v.as_i64().or_else(|| v.as_i32().map(i64::from))).unwrap_or(0)
        };
        let as_u64 = |n: i64| u64::try_from(n).unwrap_or(0);
        while cursor.advance().await.map_err(super::classify)? {
            let d = cursor.deserialize_current().map_err(super::classify)?;
            total.saved += as_u64(count(&d, "saved"));
            total.retried += as_u64(count(&d, "retried"));
            total.dead_lettered += as_u64(count(&d, "dead_lettered"));
            total.superseded += as_u64(count(&d, "superseded"));
        }
        Ok(total)
    }

    /// The replicas whose last heartbeat is at or after `since`, most recently seen first.
    ///
    /// # Errors
    /// MongoDB refused or did not answer within the operation timeout.
    pub async fn replicas_since(&self, since: DateTime<Utc>) -> Result<Vec<Replica>, StageError> {
        let filter = doc! { "last_seen": { "$gte": bson_time(since) } };
        let mut cursor = self.workers.find(filter).within(self.timeout).await?;
        let time = |d: &Document, field: &str| {
            d.get_datetime(field)
                .ok()
                .and_then(|t| DateTime::from_timestamp_millis(t.timestamp_millis()))
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        };
        let mut replicas = Vec::new();
        while cursor.advance().await.map_err(super::classify)? {
            let d = cursor.deserialize_current().map_err(super::classify)?;
            replicas.push(Replica {
                id: d.get_str("_id").unwrap_or_default().to_owned(),
                version: d.get_str("version").unwrap_or_default().to_owned(),
                started_at: time(&d, "started_at"),
                last_seen: time(&d, "last_seen"),
                consuming: d.get_bool("consuming").unwrap_or(false),
            });
        }
        replicas.sort_by_key(|r| std::cmp::Reverse(r.last_seen));
        Ok(replicas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_go_to_the_minute_they_happened_in() {
        let t: DateTime<Utc> = "2026-12-06T23:41:59.999Z".parse().unwrap();
        assert_eq!(minute_of(t), "2026-12-06T23:41:00Z".parse::<DateTime<Utc>>().unwrap());
    }
}
