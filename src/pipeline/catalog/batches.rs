//! The batches' documents (collection `audio_batches`, beside the assets): one per `batch_id`,
//! holding the tenant, the expected item count (written before any item is published), each
//! item's terminal state under `items.{index}`, the counts of terminal, saved and failed items,
//! and which completion was published:
//!
//! - `rev` counts the changes of item states;
//! - `published_rev` is the `rev` the last published completion described;
//! - `completions` is how many completion versions were published.
//!
//! Every write is one conditional update, so replicas applying reports of one batch at once
//! never lose a count: an item's state is replaced only where it still is what the writer read.

use chrono::{DateTime, Utc};
use mongodb::bson::{self, Document, doc};
use mongodb::options::ReturnDocument;

use super::{Bounded, Catalog, bson_time, from_json_bson};
use crate::batch::{Batch, ItemProgress, ItemState};
use crate::error::{Stage, StageError};

/// The batches collection, reached through the catalog's client.
#[derive(Debug, Clone)]
pub struct Batches {
    /// `{MONGODB_DATABASE}.audio_batches`.
    collection: mongodb::Collection<Document>,
    /// `MONGODB_OPERATION_TIMEOUT_SECS`, as for the assets.
    timeout: std::time::Duration,
}

/// What recording a batch at intake found.
#[derive(Debug, Clone, PartialEq)]
pub enum Opened {
    /// A batch to fan out: new, or recorded by an earlier delivery of the same message that did
    /// not finish publishing its items. `created_at` is when it was first recorded: the items'
    /// generation, the same on every fan-out.
    ToFanOut {
        /// When the batch was first recorded.
        created_at: DateTime<Utc>,
    },
    /// Its items were all published already: the same batch published again starts nothing.
    AlreadyStarted,
    /// The `batch_id` belongs to another tenant's batch.
    OtherTenant,
    /// The `batch_id` was used by a batch with other contents that is not fully published.
    OtherContent,
}

/// Where to send a batch's completion besides the events exchange: the batch message's
/// `reply_to` and `correlation_id`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplyTo {
    /// The queue named by the batch's `reply_to`.
    pub queue: Option<String>,
    /// The batch's `correlation_id`, copied onto each completion.
    pub correlation_id: Option<String>,
}

/// A batch's counts after a report was applied: enough to tell whether a completion is due.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Items in the batch.
    pub expected: i64,
    /// Items in a terminal state.
    pub terminal: i64,
    /// Items saved.
    pub saved: i64,
    /// Items failed.
    pub failed: i64,
    /// Changes of item states so far.
    pub rev: i64,
    /// The `rev` the last published completion described.
    pub published_rev: i64,
    /// Completion versions published.
    pub completions: i64,
}

impl Counts {
    /// Every item is terminal and the last completion (if any) described an earlier state:
    /// completion version `completions + 1` is due.
    pub fn completion_due(&self) -> bool {
        self.expected > 0 && self.terminal >= self.expected && self.published_rev < self.rev
    }

    /// `completed` (every item saved), `failed` (none saved) or `partial`.
    pub fn status(&self) -> &'static str {
        match (self.saved, self.failed) {
            (_, 0) => "completed",
            (0, _) => "failed",
            _ => "partial",
        }
    }

    fn of(document: &Document) -> Self {
        let n = |field: &str| document.get_i64(field).or_else(|_| document.get_i32(field).map(i64::from));
        Self {
            expected: n("expected").unwrap_or_default(),
            terminal: n("terminal").unwrap_or_default(),
            saved: n("saved").unwrap_or_default(),
            failed: n("failed").unwrap_or_default(),
            rev: n("rev").unwrap_or_default(),
            published_rev: n("published_rev").unwrap_or_default(),
            completions: n("completions").unwrap_or_default(),
        }
    }
}

/// A whole batch, read back for its completion.
#[derive(Debug, Clone)]
pub struct BatchView {
    /// The tenant.
    pub customer_id: String,
    /// The owner within the tenant.
    pub user_id: String,
    /// Where the completion is also sent.
    pub reply_to: ReplyTo,
    /// Every item's terminal state so far, by index.
    pub items: Vec<ItemProgress>,
    /// The counts, as read with the items.
    pub counts: Counts,
    /// When the batch was first recorded.
    pub created_at: DateTime<Utc>,
}

const COUNT_FIELDS: [&str; 7] =
    ["expected", "terminal", "saved", "failed", "rev", "published_rev", "completions"];

fn counts_projection() -> Document {
    COUNT_FIELDS.iter().map(|f| ((*f).to_owned(), bson::Bson::Int32(1))).collect()
}

impl Catalog {
    /// The batches collection, on the same client and database as the assets.
    pub fn batches(&self) -> Batches {
        Batches { collection: self.database.collection("audio_batches"), timeout: self.timeout }
    }
}

impl Batches {
    /// Records `batch` (when new) with its expected count, before any of its items is
    /// published, and says whether to fan it out.
    ///
    /// # Errors
    /// Network and server errors (transient).
    pub async fn open(&self, batch: &Batch, reply_to: &ReplyTo) -> Result<Opened, StageError> {
        let now = Utc::now();
        let id = batch.id.to_string();
        let insert = doc! {
            "customer_id": batch.customer_id.as_str(),
            "user_id": batch.user_id.as_str(),
            "fingerprint": &batch.fingerprint,
            "expected": i64::try_from(batch.expected()).unwrap_or(i64::MAX),
            "reply_to": reply_to.queue.clone(),
            "correlation_id": reply_to.correlation_id.clone(),
            "fanned_out": false,
            "items": {},
            "terminal": 0_i64, "saved": 0_i64, "failed": 0_i64,
            "rev": 0_i64, "published_rev": 0_i64, "completions": 0_i64,
            "status": "open",
            "created_at": bson_time(now),
        };
        let projection =
            doc! { "customer_id": 1, "user_id": 1, "fingerprint": 1, "fanned_out": 1, "created_at": 1 };
        let upserted = self
            .collection
            .find_one_and_update(doc! { "_id": &id }, doc! { "$setOnInsert": insert })
            .upsert(true)
            .projection(projection.clone())
            .return_document(ReturnDocument::After)
            .within(self.timeout)
            .await?;
        // SecantusDB, under concurrent upserts, sometimes returns no document: read it back.
        let recorded = match upserted {
            Some(document) => document,
            None => self
                .collection
                .find_one(doc! { "_id": &id })
                .projection(projection)
                .within(self.timeout)
                .await?
                .ok_or_else(|| StageError::transient(Stage::Catalog, format!("batch {id} vanished")))?,
        };
        if recorded.get_str("customer_id") != Ok(batch.customer_id.as_str())
            || recorded.get_str("user_id") != Ok(batch.user_id.as_str())
        {
            return Ok(Opened::OtherTenant);
        }
        if recorded.get_bool("fanned_out").unwrap_or(false) {
            return Ok(Opened::AlreadyStarted);
        }
        if recorded.get_str("fingerprint") != Ok(batch.fingerprint.as_str()) {
            return Ok(Opened::OtherContent);
        }
        let created_at = recorded
            .get_datetime("created_at")
            .ok()
            .and_then(|d| DateTime::from_timestamp_millis(d.timestamp_millis()))
            .unwrap_or(now);
        Ok(Opened::ToFanOut { created_at })
    }

    /// Notes that every item of batch `id` was published (or reported refused): a later
    /// message with the same `batch_id` starts nothing.
    ///
    /// # Errors
    /// Network and server errors (transient).
    pub async fn fanned_out(&self, id: uuid::Uuid) -> Result<(), StageError> {
        self.collection
            .update_one(doc! { "_id": id.to_string() }, doc! { "$set": { "fanned_out": true } })
            .within(self.timeout)
            .await?;
        Ok(())
    }

    /// Records `report` as its item's state unless the item already holds the same outcome or
    /// a later one, and returns the batch's counts afterwards; `None` when no such batch is
    /// recorded.
    ///
    /// # Errors
    /// Network and server errors (transient); a permanent error for a report that cannot be
    /// stored as BSON.
    pub async fn apply(&self, report: &ItemProgress) -> Result<Option<Counts>, StageError> {
        let id = report.batch_id.to_string();
        let path = format!("items.{}", report.index);
        // Through JSON, as the derived files are: the same types back whatever the driver's
        // mapping of unsigned integers and times.
        let stored = serde_json::to_value(report)
            .map_err(|e| e.to_string())
            .and_then(|json| bson::to_bson(&json).map_err(|e| e.to_string()))
            .map_err(|e| StageError::permanent(Stage::Catalog, format!("the item report as BSON: {e}")))?;
        // The common case, one round trip: the item's first report.
        let first = doc! {
            "$set": { &path: stored.clone() },
            "$inc": {
                "rev": 1_i64,
                "terminal": 1_i64,
                "saved": i64::from(report.state == ItemState::Saved),
                "failed": i64::from(report.state == ItemState::Failed),
            },
        };
        if let Some(after) = self
            .collection
            .find_one_and_update(doc! { "_id": &id, &path: { "$exists": false } }, first)
            .projection(counts_projection())
            .return_document(ReturnDocument::After)
            .within(self.timeout)
            .await?
        {
            return Ok(Some(Counts::of(&after)));
        }
        // The item holds a state already (or the batch is unknown): read it and replace it only
        // where it is still what was read; a lost race (another replica changed the item in
        // between) reads again.
        for _ in 0..32 {
            let mut projection = counts_projection();
            projection.insert(path.clone(), 1);
            let Some(current) = self
                .collection
                .find_one(doc! { "_id": &id })
                .projection(projection)
                .within(self.timeout)
                .await?
            else {
                return Ok(None);
            };
            let held = current
                .get_document("items")
                .ok()
                .and_then(|items| items.get(report.index.to_string()))
                .cloned();
            let before: Option<ItemProgress> = held.as_ref().and_then(from_json_bson);
            if let Some(before) = &before
                && (before.same_outcome(report) || before.at >= report.at)
            {
                return Ok(Some(Counts::of(&current)));
            }
            let delta = |state: ItemState| {
                i64::from(report.state == state)
                    - i64::from(before.as_ref().is_some_and(|b| b.state == state))
            };
            let mut filter = doc! { "_id": &id };
            match held.as_ref().and_then(|h| h.as_document()).and_then(|h| h.get("at")) {
                Some(at) => filter.insert(format!("{path}.at"), at.clone()),
                None => filter.insert(path.clone(), doc! { "$exists": false }),
            };
            let update = doc! {
                "$set": { &path: stored.clone() },
                "$inc": {
                    "rev": 1_i64,
                    "terminal": i64::from(before.is_none()),
                    "saved": delta(ItemState::Saved),
                    "failed": delta(ItemState::Failed),
                },
            };
            let after = self
                .collection
                .find_one_and_update(filter, update)
                .projection(counts_projection())
                .return_document(ReturnDocument::After)
                .within(self.timeout)
                .await?;
            if let Some(after) = after {
                return Ok(Some(Counts::of(&after)));
            }
        }
        Err(StageError::transient(
            Stage::Catalog,
            format!("item {} of batch {id} kept changing under this report", report.index),
        ))
    }

    /// The whole batch `id`, for its completion; `None` when it is not recorded.
    ///
    /// # Errors
    /// Network and server errors (transient).
    pub async fn load(&self, id: uuid::Uuid) -> Result<Option<BatchView>, StageError> {
        let Some(document) =
            self.collection.find_one(doc! { "_id": id.to_string() }).within(self.timeout).await?
        else {
            return Ok(None);
        };
        let text = |field: &str| document.get_str(field).ok().map(str::to_owned);
        let mut items: Vec<ItemProgress> = document
            .get_document("items")
            .map(|items| items.values().filter_map(from_json_bson).collect())
            .unwrap_or_default();
        items.sort_by_key(|item| item.index);
        Ok(Some(BatchView {
            customer_id: text("customer_id").unwrap_or_default(),
            user_id: text("user_id").unwrap_or_default(),
            reply_to: ReplyTo { queue: text("reply_to"), correlation_id: text("correlation_id") },
            items,
            counts: Counts::of(&document),
            created_at: document
                .get_datetime("created_at")
                .ok()
                .and_then(|d| DateTime::from_timestamp_millis(d.timestamp_millis()))
                .unwrap_or_else(Utc::now),
        }))
    }

    /// Records that completion version `counts.completions + 1`, describing `counts.rev`, was
    /// published; false when another replica recorded that version first.
    ///
    /// # Errors
    /// Network and server errors (transient).
    pub async fn published(&self, id: uuid::Uuid, counts: &Counts) -> Result<bool, StageError> {
        let result = self
            .collection
            .update_one(
                doc! { "_id": id.to_string(), "completions": counts.completions },
                doc! { "$set": {
                    "completions": counts.completions + 1,
                    "published_rev": counts.rev,
                    "status": counts.status(),
                    "completed_at": bson_time(Utc::now()),
                } },
            )
            .within(self.timeout)
            .await?;
        Ok(result.matched_count == 1)
    }
}
