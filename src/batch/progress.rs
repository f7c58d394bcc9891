//! An item's terminal state, as reported on `{job_queue}.batch.progress` by the worker that
//! settled it (saved, superseded or dead-lettered) before it acked the delivery, or by the
//! intake for an item it refused. The tracker records it in the batch's document.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::job::{BatchItem, Job};
use crate::processor::Saved;
use crate::retry::Failure;

/// Where an item ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemState {
    /// Stored and catalogued; `audio.saved` was published.
    Saved,
    /// Refused at intake, dead-lettered, or superseded by a newer save of its asset.
    Failed,
}

/// One item's terminal state. The fields of the state it is in are set; the others are absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemProgress {
    /// The batch (its `batch_id`).
    pub batch_id: Uuid,
    /// The item's 0-based index in the batch.
    pub index: u32,
    /// The item's `asset_id` as sent (absent when the item had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_id: Option<String>,
    /// Saved or failed.
    pub state: ItemState,
    /// When the item settled: of two reports of one item that differ, the later one stands (a
    /// replayed item's save after its dead letter).
    pub at: DateTime<Utc>,
    /// The document's version after the save (saved items).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// The audio's object key (saved items).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The URL handed out with the save, as in `audio.saved` (saved items).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// When `url` stops working (saved items; absent for a `public` URL, which does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_expires_at: Option<DateTime<Utc>>,
    /// The object's Content-Type, e.g. `audio/wav` (saved items).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Object size in bytes (saved items).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Seconds of audio, from the job (saved items): the playlist's `#EXTINF` length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<f64>,
    /// The start of the spoken text, one line (saved items): the playlist's title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The failed stage, as in `audio.failed` (failed items).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Why it failed, as in the dead-letter headers (failed items).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The most characters of the spoken text a playlist title keeps.
const TITLE_CHARS: usize = 80;

impl ItemProgress {
    /// The report of a saved item.
    pub fn saved(item: BatchItem, job: &Job, saved: &Saved) -> Self {
        let title: String = job.tts.text.split_whitespace().collect::<Vec<_>>().join(" ");
        Self {
            version: Some(saved.entry.version),
            key: Some(saved.object.key.clone()),
            url: Some(saved.object.url.clone()),
            url_expires_at: saved.object.url_expires_at,
            content_type: Some(saved.object.content_type.clone()),
            size: Some(saved.object.size),
            duration: Some(job.duration),
            title: Some(title.chars().take(TITLE_CHARS).collect()),
            ..Self::empty(item, Some(job.asset_id.to_string()), ItemState::Saved)
        }
    }

    /// The report of an item that failed at `stage` because of `reason`.
    pub fn failed(item: BatchItem, asset_id: Option<String>, stage: &str, reason: &str) -> Self {
        Self {
            stage: Some(stage.to_owned()),
            reason: Some(reason.to_owned()),
            ..Self::empty(item, asset_id, ItemState::Failed)
        }
    }

    /// [`ItemProgress::failed`] from the processor's failure.
    pub fn of_failure(item: BatchItem, asset_id: Option<String>, failure: &Failure) -> Self {
        Self::failed(item, asset_id, failure.error.stage.as_str(), &failure.error.reason)
    }

    fn empty(item: BatchItem, asset_id: Option<String>, state: ItemState) -> Self {
        Self {
            batch_id: item.batch_id,
            index: item.index,
            asset_id,
            state,
            at: Utc::now(),
            version: None,
            key: None,
            url: None,
            url_expires_at: None,
            content_type: None,
            size: None,
            duration: None,
            title: None,
            stage: None,
            reason: None,
        }
    }

    /// Whether `self` and `other` tell the same outcome: the same state with the same version
    /// (saved) or the same stage and reason (failed). A report repeated by a redelivery differs
    /// only in its time and its fresh URL, and changes nothing.
    pub fn same_outcome(&self, other: &Self) -> bool {
        self.state == other.state
            && self.version == other.version
            && self.key == other.key
            && self.stage == other.stage
            && self.reason == other.reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_report_is_the_same_outcome_and_a_replay_is_not() {
        let item = BatchItem { batch_id: Uuid::new_v4(), index: 3 };
        let failed = ItemProgress::failed(item, Some("a".into()), "download", "HTTP 404");
        let again = ItemProgress { at: failed.at + chrono::Duration::seconds(5), ..failed.clone() };
        assert!(failed.same_outcome(&again));
        let other = ItemProgress::failed(item, Some("a".into()), "download", "HTTP 410");
        assert!(!failed.same_outcome(&other));
        let json = serde_json::to_value(&failed).unwrap();
        assert_eq!(json["state"], "failed");
        assert!(json.get("url").is_none(), "{json}");
        assert_eq!(serde_json::from_value::<ItemProgress>(json).unwrap(), failed);
    }
}
