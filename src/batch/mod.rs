//! Batches: many jobs of one tenant sent as one message, answered by one event.
//!
//! ```text
//! producer ─audio.save.batch─► intake ─records the batch (expected items counted)─► audio_batches
//!                                 ├─ each valid item ─► audio.save.items (an ordinary v1 job
//!                                 │                      with batch_id, batch_index)
//!                                 └─ each refused item ─┐
//! worker settles an item (saved / dead-lettered) ───────┴─► {job_queue}.batch.progress
//!                                                                 │
//! tracker ─ item state into audio_batches ─ last item? ─ manifest (.json, .m3u) to S3 ─►
//!     audio.batch.completed (events exchange, and the batch's reply_to)
//! ```
//! - [`contract`]: the batch message (`schemas/save-audio-batch.v1.json`), parsed into the
//!   items' job bodies (tenant, folder and tags inherited) or each item's refusal.
//! - [`progress`]: an item's terminal state, as the worker that settled it reports it.
//! - [`crate::pipeline::catalog::Batches`]: the batch's document in MongoDB (`audio_batches`):
//!   the expected count, each item's state, and which completion version was published.
//! - [`manifest`]: the JSON manifest, the M3U playlist and the `audio.batch.completed` event.
//!
//! An item's terminal state is reported before its delivery is acked (after `audio.saved` is
//! confirmed; before the dead letter is copied), on a durable queue, so a batch never waits for
//! an item whose worker died after settling it. The tracker applies each report once per state
//! change (an item's `at` orders them), so redelivered reports change nothing, and the report
//! that leaves every item terminal publishes the completion: version 1, then a corrected
//! version each time a replayed item changes its state.

pub mod contract;
pub mod manifest;
pub mod progress;

pub use contract::{Batch, BatchError, ItemPlan};
pub use progress::{ItemProgress, ItemState};

/// Routing key and message `type` of the completion event.
pub const COMPLETED_ROUTING_KEY: &str = "audio.batch.completed";

#[cfg(test)]
mod schema_tests;
