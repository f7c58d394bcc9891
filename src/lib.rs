//! audio-worker: takes audio produced by the text-to-speech service and files it into a
//! customer's audio library.
//!
//! A job (JSON, on the `audio.save` quorum queue) names an asset and where its audio is. The
//! worker downloads the audio, puts it in S3 under `{customer_id}/{user_id}/audio/{asset_id}.wav`,
//! upserts the asset's document in MongoDB, publishes `audio.saved` with publisher confirms,
//! acks, and asks the generation service to delete its temporary file. Failures are retried with
//! backoff; what cannot succeed goes to `audio.save.dlq` with its reason, and `audio.failed` is
//! published.
//!
//! # Layout
//! - [`config`]: settings from the environment, validated once at start-up.
//! - [`telemetry`]: JSON logs.
//! - [`health`]: Prometheus metrics, `/healthz` and `/readyz` on `METRICS_ADDR`.
//! - [`url_policy`]: which URLs may be requested (relative under the base, allowed hosts,
//!   public addresses, redirects): the guard against server-side request forgery.
//! - [`startup`]: `Application::build` / `run_until_stopped`, the one place that wires clients,
//!   health, metrics and the consumer (`main` and the tests both use it).
//! - [`job`]: the job contract and its domain types (`KeySegment`, `AudioSource`).
//! - [`asset`]: what the library holds: object key, downloaded file, stored object, catalog entry.
//! - [`audio`]: format sniffing and measuring.
//! - [`delivery`]: the URL handed out for each object (`DELIVERY`): presigned, public (a CDN
//!   in front of the bucket) or CloudFront-signed.
//! - [`pipeline`]: one module per stage: download, store (S3), catalog (MongoDB), cleanup; a
//!   stage returns a result or a `StageError` and never decides retry or dead-letter.
//! - [`retry`]: in-process backoff budget and the delay-queue schedule.
//! - [`processor`]: `handle(job, deps, attempt, announcer) -> Outcome` (saved, retry later,
//!   dead letter); no AMQP types.
//! - [`events`]: `audio.saved` and `audio.failed`.
//! - [`batch`]: batches of jobs: the batch contract, item reports, manifest and
//!   `audio.batch.completed`.
//! - [`refresh`]: fresh URLs for a saved asset (`audio.url.refresh` and `audio-worker url`).
//! - [`amqp`]: connecting to a node of the cluster, topology, confirming publisher (one publish
//!   in flight per channel), consumer (delivery → job → outcome → ack), the
//!   header contract, W3C trace context.
//! - [`dlq`]: list, show, replay and purge dead-lettered jobs.
//! - [`console`]: the operator console (`audio-worker console`): queues, dead letters and
//!   their replays on server-rendered pages, behind a token, a session cookie and CSRF tokens.
//! - [`activity`]: this replica's outcomes and heartbeat, flushed to MongoDB for the console.
//! - [`audit`]: the library against its catalog: missing, changed and orphaned objects (the
//!   `audit` command), in bounded memory whatever the bucket's size.
//! - [`producer`]: publishing jobs (the `publish` command) and waiting for their events.
//! - [`standin`]: a stand-in audio-generation service for the demo and tests.
//! - [`error`]: the stage error every stage returns.

// The job's future (a delivery's task: the processor's stages inside the job deadline inside the
// consumer's span) is deeper than the default limit of 128 lets clippy's layout queries go.
#![recursion_limit = "256"]

pub mod activity;
pub mod amqp;
pub mod asset;
pub mod audio;
pub mod audit;
pub mod batch;
pub mod config;
pub mod console;
pub mod delivery;
pub mod dlq;
pub mod error;
pub mod events;
pub mod health;
pub mod job;
pub mod pipeline;
pub mod processor;
pub mod producer;
pub mod refresh;
pub mod retry;
pub mod standin;
pub mod startup;
pub mod telemetry;
pub mod url_policy;
