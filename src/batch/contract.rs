//! The batch message (contract v1, `schemas/save-audio-batch.v1.json`), published to the job
//! exchange with routing key `audio.save.batch`: `batch_id`, the tenant (`customer_id`,
//! `user_id`), optional `folder` and `tags`, and `items`, 1 to `BATCH_MAX_ITEMS` jobs of the v1
//! shape.
//!
//! Each item inherits the batch's tenant (it may repeat it, never change it), and the batch's
//! `folder` and `tags` where it has none of its own; the worker adds `batch_id` and
//! `batch_index`. An item that breaks the job contract (or repeats an earlier item's
//! `asset_id`) is refused on its own, with its reason, and the rest of the batch goes on; a
//! batch whose own fields are wrong is refused whole (dead-lettered).

use std::collections::HashSet;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::job::{KeySegment, SaveAudioJob};
use crate::url_policy::UrlPolicy;

/// Why a batch message is refused whole. Always permanent: the same bytes would fail again.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// Not JSON, or a required field missing or of the wrong type.
    #[error("invalid batch JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A field parsed but its value is not acceptable.
    #[error("invalid batch field {field}: {message}")]
    Field {
        /// The JSON field name.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// The batch as producers send it. Unknown fields are ignored.
#[derive(Debug, Deserialize)]
struct RawBatch {
    batch_id: String,
    customer_id: String,
    user_id: String,
    #[serde(default)]
    folder: Option<String>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    items: Vec<serde_json::Value>,
}

/// A validated batch: what the intake records and fans out.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `batch_id`: the batch's document id, and the namespace of its completion events' ids.
    pub id: Uuid,
    /// The tenant every item is saved under.
    pub customer_id: KeySegment,
    /// The owner within the tenant, for every item.
    pub user_id: KeySegment,
    /// One plan per item, in the message's order (the index is the position).
    pub items: Vec<ItemPlan>,
    /// `sha256:{hex}` of the message body: a second message with the same `batch_id` and the
    /// same bytes is the same batch published twice; other bytes under a known id are refused.
    pub fingerprint: String,
}

/// What becomes of one item of a batch.
#[derive(Debug, Clone)]
pub enum ItemPlan {
    /// A valid job: published to the batch items queue as it is.
    Job {
        /// The item's asset.
        asset_id: Uuid,
        /// The job's JSON (v1, with the inherited fields and `batch_id`/`batch_index`).
        body: Vec<u8>,
    },
    /// Refused at intake: recorded as failed with this reason, never published.
    Refused {
        /// The item's `asset_id` as sent, when it had a string one.
        asset_id: Option<String>,
        /// Why, naming the field.
        reason: String,
    },
}

impl Batch {
    /// Parses and validates a batch message; each item is checked against the job contract and
    /// `policy` (its `audio_url`).
    ///
    /// # Errors
    /// [`BatchError`] when the batch's own fields are unusable: not JSON, `batch_id` not a UUID,
    /// a tenant segment that is not a safe key segment, no items or more than `max_items`.
    pub fn parse(body: &[u8], policy: &UrlPolicy, max_items: usize) -> Result<Self, BatchError> {
        let mut raw: RawBatch = serde_json::from_slice(body)?;
        let field = |field: &'static str, message: String| BatchError::Field { field, message };
        let id = Uuid::parse_str(&raw.batch_id).map_err(|e| field("batch_id", format!("not a UUID: {e}")))?;
        let customer_id = KeySegment::parse(&raw.customer_id).map_err(|m| field("customer_id", m))?;
        let user_id = KeySegment::parse(&raw.user_id).map_err(|m| field("user_id", m))?;
        if raw.items.is_empty() || raw.items.len() > max_items {
            return Err(field(
                "items",
                format!("must hold 1 to {max_items} jobs (BATCH_MAX_ITEMS), got {}", raw.items.len()),
            ));
        }
        let mut seen = HashSet::new();
        let items = std::mem::take(&mut raw.items)
            .into_iter()
            .enumerate()
            .map(|(index, item)| {
                let asset_id = item.get("asset_id").and_then(|a| a.as_str()).map(str::to_owned);
                plan(item, index, &raw, id, policy, &mut seen)
                    .unwrap_or_else(|reason| ItemPlan::Refused { asset_id, reason })
            })
            .collect();
        let fingerprint = format!("sha256:{}", hex::encode(Sha256::digest(body)));
        Ok(Self { id, customer_id, user_id, items, fingerprint })
    }

    /// How many items the batch has: what it waits for.
    pub fn expected(&self) -> usize {
        self.items.len()
    }
}

/// Item `index` of `batch` as a job body, or why it is refused.
fn plan(
    item: serde_json::Value,
    index: usize,
    batch: &RawBatch,
    batch_id: Uuid,
    policy: &UrlPolicy,
    seen: &mut HashSet<Uuid>,
) -> Result<ItemPlan, String> {
    let serde_json::Value::Object(mut fields) = item else {
        return Err(format!("item {index} is not a JSON object"));
    };
    for (name, value) in [("customer_id", &batch.customer_id), ("user_id", &batch.user_id)] {
        match fields.get(name) {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(s)) if s == value => {}
            Some(other) => {
                return Err(format!(
                    "invalid field {name}: an item cannot change the batch's tenant (the batch says \
                     {value:?}, the item {other})"
                ));
            }
        }
        fields.insert(name.into(), value.as_str().into());
    }
    if fields.get("folder").is_none_or(serde_json::Value::is_null)
        && let Some(folder) = &batch.folder
    {
        fields.insert("folder".into(), folder.as_str().into());
    }
    if fields.get("tags").is_none_or(serde_json::Value::is_null)
        && let Some(tags) = &batch.tags
    {
        fields.insert("tags".into(), tags.clone().into());
    }
    fields.insert("batch_id".into(), batch_id.to_string().into());
    fields.insert("batch_index".into(), index.into());
    let body = serde_json::to_vec(&fields).expect("a JSON map serializes");
    let job = SaveAudioJob::parse(&body, policy).map_err(|e| e.to_string())?;
    if !seen.insert(job.asset_id) {
        return Err(format!(
            "invalid field asset_id: {} is an earlier item's too; an asset is saved once per batch",
            job.asset_id
        ));
    }
    Ok(ItemPlan::Job { asset_id: job.asset_id, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> UrlPolicy {
        UrlPolicy::for_base(url::Url::parse("http://h:3000").unwrap())
    }

    fn item(asset: &str) -> serde_json::Value {
        serde_json::json!({
            "asset_id": asset, "audio_url": "/temp/a.wav", "text": "t", "duration": 1,
            "voice": "v", "voice_name": "V", "language": "en", "speed": 1, "model": "m"
        })
    }

    fn batch(items: Vec<serde_json::Value>) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "batch_id": "0d9f7a34-5b1c-4f3e-9a2d-6c8b1e4f7a20", "customer_id": "c1", "user_id": "u1",
            "folder": "book", "tags": ["ch"], "items": items
        }))
        .unwrap()
    }

    const A: &str = "6f1c2a4e-8d3b-4b7a-9a51-2f0e5c7d9b10";
    const B: &str = "7a2d3b5f-9e4c-4c8b-8b62-3f1e6d8e0c21";

    #[test]
    fn items_inherit_the_tenant_folder_and_tags_and_carry_their_index() {
        let mut own = item(B);
        own["folder"] = "own".into();
        own["customer_id"] = "c1".into();
        let batch = Batch::parse(&batch(vec![item(A), own]), &policy(), 10).unwrap();
        assert_eq!(batch.expected(), 2);
        let jobs: Vec<crate::job::Job> = batch
            .items
            .iter()
            .map(|plan| match plan {
                ItemPlan::Job { body, .. } => SaveAudioJob::parse(body, &policy()).unwrap(),
                ItemPlan::Refused { reason, .. } => panic!("{reason}"),
            })
            .collect();
        assert_eq!((jobs[0].customer_id.as_str(), jobs[0].user_id.as_str()), ("c1", "u1"));
        assert_eq!(jobs[0].folder.as_deref(), Some("book"));
        assert_eq!(jobs[0].tags, vec!["ch"]);
        assert_eq!(jobs[1].folder.as_deref(), Some("own"));
        let refs: Vec<_> = jobs.iter().map(|j| j.batch.unwrap()).collect();
        assert_eq!(refs.iter().map(|r| r.index).collect::<Vec<_>>(), [0, 1]);
        assert!(refs.iter().all(|r| r.batch_id == batch.id));
    }

    #[test]
    fn a_bad_item_is_refused_alone_and_a_bad_batch_whole() {
        let mut other_tenant = item(B);
        other_tenant["customer_id"] = "c2".into();
        let mut no_text = item("8b3e4c6a-0f5d-4d9c-9c73-4a2f7e9f1d32");
        no_text.as_object_mut().unwrap().remove("text");
        let parsed =
            Batch::parse(&batch(vec![item(A), other_tenant, no_text, item(A), "x".into()]), &policy(), 10)
                .unwrap();
        let reasons: Vec<String> = parsed
            .items
            .iter()
            .map(|p| match p {
                ItemPlan::Job { .. } => "ok".into(),
                ItemPlan::Refused { reason, .. } => reason.clone(),
            })
            .collect();
        assert_eq!(reasons[0], "ok");
        assert!(reasons[1].contains("cannot change the batch's tenant"), "{}", reasons[1]);
        assert!(reasons[2].contains("text"), "{}", reasons[2]);
        assert!(reasons[3].contains("earlier item"), "{}", reasons[3]);
        assert!(reasons[4].contains("not a JSON object"), "{}", reasons[4]);
        for (body, field) in [
            (batch(vec![]), "items"),
            (batch(vec![item(A), item(B)]), "items"),
            (br#"{"batch_id":"1","customer_id":"c","user_id":"u","items":[]}"#.to_vec(), "batch_id"),
        ] {
            let err = Batch::parse(&body, &policy(), 1).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
        assert!(matches!(Batch::parse(b"[]", &policy(), 1), Err(BatchError::Json(_))));
    }
}
