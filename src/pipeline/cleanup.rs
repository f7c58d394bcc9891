//! Stage 5: ask the generation service to delete its temporary file, after the completion
//! event is confirmed. Fire-and-forget: its failure is logged and never fails or delays a job.

use tracing::Instrument;
use url::Url;

use crate::error::{chain, redact_url};

/// Spawns `DELETE {cleanup_url}` on the runtime and returns at once. The task is tracked by
/// `tracker` so that a graceful shutdown waits for cleanups already started.
pub fn spawn_cleanup(client: reqwest::Client, cleanup_url: Url, tracker: &tokio_util::task::TaskTracker) {
    let shown = redact_url(&cleanup_url);
    let span = tracing::info_span!("cleanup", url = %shown);
    tracker.spawn(
        async move {
            match client.delete(cleanup_url).send().await {
                Ok(r) if r.status().is_success() || r.status() == reqwest::StatusCode::NOT_FOUND => {
                    tracing::debug!(status = r.status().as_u16(), "temporary audio cleaned up");
                }
                Ok(r) => tracing::warn!(status = r.status().as_u16(), "cleanup of temporary audio refused"),
                Err(e) => {
                    tracing::warn!(error = %chain(&e.without_url()), "cleanup of temporary audio failed")
                }
            }
        }
        .instrument(span),
    );
}
