//! What a completed batch hands out: the `audio.batch.completed` event (JSON Schema
//! `schemas/audio-batch-completed.v1.json`), and the manifest beside the batch's audio, as JSON
//! (every item, its key and URL or its reason) and as an M3U playlist of the saved items, in
//! the batch's order.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{COMPLETED_ROUTING_KEY, ItemProgress, ItemState};
use crate::pipeline::catalog::BatchView;

/// The object key of a batch's manifest: `{customer_id}/{user_id}/batches/{batch_id}.{ext}`
/// (`json` or `m3u`). Outside `…/audio/`, so no asset key is ever a manifest's.
pub fn manifest_key(customer_id: &str, user_id: &str, batch_id: Uuid, ext: &str) -> String {
    format!("{customer_id}/{user_id}/batches/{batch_id}.{ext}")
}

/// One item of a completed batch, in the event and in the JSON manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestItem {
    /// The item's 0-based index in the batch.
    pub index: u32,
    /// The item's `asset_id` as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_id: Option<String>,
    /// `saved` or `failed`.
    pub status: ItemState,
    /// The saved audio's object key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The URL handed out with the save (as in its `audio.saved`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// When `url` stops working; ask `audio.url.refresh` for a fresh one after that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_expires_at: Option<DateTime<Utc>>,
    /// The object's Content-Type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Object size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Seconds of audio, from the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<f64>,
    /// The asset document's version after the save.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// The stage a failed item failed at (`parse` for an item refused at intake).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Why a failed item failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl From<&ItemProgress> for ManifestItem {
    fn from(p: &ItemProgress) -> Self {
        Self {
            index: p.index,
            asset_id: p.asset_id.clone(),
            status: p.state,
            key: p.key.clone(),
            url: p.url.clone(),
            url_expires_at: p.url_expires_at,
            content_type: p.content_type.clone(),
            size: p.size,
            duration: p.duration,
            version: p.version,
            stage: p.stage.clone(),
            reason: p.reason.clone(),
        }
    }
}

/// A manifest file as stored: where it is and how to fetch it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// `{customer_id}/{user_id}/batches/{batch_id}.json` or `.m3u`.
    pub key: String,
    /// A URL for it, made like the audio's (`DELIVERY`).
    pub url: String,
    /// When `url` stops working; `null` for a `public` URL, which does not.
    pub url_expires_at: Option<DateTime<Utc>>,
}

/// Both manifest files of a completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestFiles {
    /// Every item (JSON, `application/json`).
    pub json: ManifestFile,
    /// The saved items as a playlist (`audio/x-mpegurl`).
    pub m3u: ManifestFile,
}

/// Published once every item of a batch is terminal (routing key `audio.batch.completed`), and
/// again, with the next `version`, whenever a replayed item changes the batch's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchCompleted {
    /// UUID v5 of the batch and the version: a completion published twice (its publisher died
    /// before recording it) has the same id, and consumers drop the duplicate.
    pub event_id: Uuid,
    /// Always `audio.batch.completed`.
    pub event_type: String,
    /// The batch.
    pub batch_id: Uuid,
    /// The batch's tenant.
    pub customer_id: String,
    /// The batch's owner within the tenant.
    pub user_id: String,
    /// 1 for the first completion, +1 for each correction.
    pub version: i64,
    /// `completed` (every item saved), `partial` (some) or `failed` (none).
    pub status: String,
    /// Items in the batch.
    pub expected: i64,
    /// Items saved.
    pub saved: i64,
    /// Items failed.
    pub failed: i64,
    /// Every item's outcome, in the batch's order.
    pub items: Vec<ManifestItem>,
    /// The manifest files, uploaded before this event was published.
    pub manifest: ManifestFiles,
    /// When the event was made.
    pub occurred_at: DateTime<Utc>,
}

/// The JSON manifest file: the batch, its status and every item.
#[derive(Debug, Clone, Serialize)]
pub struct ManifestDocument<'a> {
    /// The batch.
    pub batch_id: Uuid,
    /// The tenant.
    pub customer_id: &'a str,
    /// The owner within the tenant.
    pub user_id: &'a str,
    /// The completion version this manifest belongs to.
    pub version: i64,
    /// As in the event.
    pub status: &'a str,
    /// Every item, in order.
    pub items: &'a [ManifestItem],
    /// When the batch was first recorded.
    pub created_at: DateTime<Utc>,
}

/// The completion of `batch` as version `version`: its items and status, the manifest files'
/// bodies (JSON, M3U) to upload, and the event once their URLs are known.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The batch.
    pub batch_id: Uuid,
    /// The version being published.
    pub version: i64,
    /// Every item, in order.
    pub items: Vec<ManifestItem>,
    /// The JSON manifest's bytes.
    pub json: Vec<u8>,
    /// The M3U playlist's bytes.
    pub m3u: Vec<u8>,
    view: BatchView,
}

impl Completion {
    /// Builds version `completions + 1` of `batch`'s completion.
    pub fn new(batch_id: Uuid, view: BatchView) -> Self {
        let version = view.counts.completions + 1;
        let items: Vec<ManifestItem> = view.items.iter().map(ManifestItem::from).collect();
        let document = ManifestDocument {
            batch_id,
            customer_id: &view.customer_id,
            user_id: &view.user_id,
            version,
            status: view.counts.status(),
            items: &items,
            created_at: view.created_at,
        };
        let json = serde_json::to_vec_pretty(&document).expect("a manifest serializes");
        let m3u = playlist(&view.items);
        Self { batch_id, version, items, json, m3u, view }
    }

    /// The object key of the manifest file with extension `ext`.
    pub fn key(&self, ext: &str) -> String {
        manifest_key(&self.view.customer_id, &self.view.user_id, self.batch_id, ext)
    }

    /// The batch as read for this completion (counts, reply-to).
    pub fn view(&self) -> &BatchView {
        &self.view
    }

    /// The event, once the manifest files are stored.
    pub fn event(&self, manifest: ManifestFiles) -> BatchCompleted {
        let counts = &self.view.counts;
        BatchCompleted {
            event_id: Uuid::new_v5(
                &self.batch_id,
                format!("{COMPLETED_ROUTING_KEY}/{}", self.version).as_bytes(),
            ),
            event_type: COMPLETED_ROUTING_KEY.into(),
            batch_id: self.batch_id,
            customer_id: self.view.customer_id.clone(),
            user_id: self.view.user_id.clone(),
            version: self.version,
            status: counts.status().into(),
            expected: counts.expected,
            saved: counts.saved,
            failed: counts.failed,
            items: self.items.clone(),
            manifest,
            occurred_at: Utc::now(),
        }
    }
}

/// An extended M3U playlist of the saved items, in order: `#EXTINF:{seconds},{title}` then the
/// URL. Titles are one line, with no comma-free guarantee needed (everything after the first
/// comma is the title).
pub fn playlist(items: &[ItemProgress]) -> Vec<u8> {
    let mut out = String::from("#EXTM3U\n");
    for item in items.iter().filter(|i| i.state == ItemState::Saved) {
        let (Some(url), seconds) = (&item.url, item.duration.unwrap_or(-1.0)) else { continue };
        let title = item.title.as_deref().unwrap_or_default().replace(['\r', '\n'], " ");
        let seconds = if seconds >= 0.0 { format!("{seconds:.3}") } else { "-1".into() };
        out.push_str(&format!("#EXTINF:{seconds},{title}\n{url}\n"));
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::BatchItem;

    #[test]
    fn the_playlist_lists_the_saved_items_in_order_and_one_line_each() {
        let item = |index| BatchItem { batch_id: Uuid::nil(), index };
        let saved = |index: u32, title: &str| ItemProgress {
            url: Some(format!("http://s/{index}.wav?sig=a,b")),
            duration: Some(1.5),
            title: Some(title.into()),
            ..ItemProgress::failed(item(index), None, "", "")
        };
        let mut first = saved(0, "Chapter one,\nthe start");
        first.state = ItemState::Saved;
        let mut third = saved(2, "three");
        third.state = ItemState::Saved;
        let failed = ItemProgress::failed(item(1), None, "download", "HTTP 404");
        let text = String::from_utf8(playlist(&[first, failed, third])).unwrap();
        assert_eq!(
            text,
            "#EXTM3U\n#EXTINF:1.500,Chapter one, the start\nhttp://s/0.wav?sig=a,b\n\
             #EXTINF:1.500,three\nhttp://s/2.wav?sig=a,b\n"
        );
    }
}
