//! Settings from the environment, validated once at start-up.
//!
//! A setting that cannot be used stops the worker before it consumes anything, with a
//! [`ConfigError`] naming the variable: a bad value is an operator's mistake, never a per-job
//! error that would send every job to the dead-letter queue.

use std::time::Duration;

use url::Url;

use crate::delivery::{
    CloudFrontSigner, Delivery, DeliveryMode, KeyError, MAX_DELIVERY_URL_EXPIRY_SECS, PublicBase,
};
use crate::url_policy::{HostRule, UrlPolicy};

/// Settings that may hold credentials. Each can also be read from a file named by `{VAR}_FILE`
/// (the Docker and Kubernetes secret convention), so the secret never sits in the environment.
pub const SECRET_VARS: [&str; 4] = ["AMQP_URL", "MONGODB_URI", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"];

/// The longest presigned URL lifetime S3 (SigV4) accepts: 7 days, in seconds.
pub const MAX_PRESIGNED_URL_EXPIRY_SECS: u64 = 604_800;

/// The time a delivery needs after `JOB_DEADLINE_SECS` to carry out its outcome (the copy's
/// confirms, the event, the ack) before the broker's `consumer_timeout`.
pub const SETTLE_MARGIN: Duration = Duration::from_secs(120);

/// A setting that cannot be used, naming the environment variable it came from.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message} (got {value:?})")]
pub struct ConfigError {
    /// The environment variable, e.g. `PRESIGNED_URL_EXPIRY_SECS`.
    pub var: &'static str,
    /// What is wrong with the value.
    pub message: String,
    /// The value as read (secrets are never put here).
    pub value: String,
}

/// Everything the worker needs, read from the environment by [`Settings::from_env`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// RabbitMQ connection and the names of the queues and exchanges.
    pub amqp: AmqpSettings,
    /// Where audio is stored and how presigned URLs are made.
    pub s3: S3Settings,
    /// Where the asset catalog lives.
    pub mongo: MongoSettings,
    /// Where audio is downloaded from and how.
    pub audio_gen: AudioGenSettings,
    /// Concurrency, retries and shutdown.
    pub worker: WorkerSettings,
}

/// RabbitMQ settings. Every name is configurable so that tests (and several deployments on one
/// broker) can use their own topology.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// `AMQP_URL`: one node, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`, or a comma-separated
    /// list of the nodes of one cluster (`amqp://u:p@rabbit-0:5672/%2f,amqp://u:p@rabbit-1:5672/%2f`),
    /// tried in turn when a connection fails or is lost (see [`crate::amqp::connect`]). Each entry
    /// is checked at start-up. Holds a password: log it only through [`mask_url`].
    pub nodes: Vec<String>,
    /// `AMQP_CONSUMER_TIMEOUT_SECS` (default 1800, RabbitMQ's default `consumer_timeout`): what the
    /// broker is configured with. A delivery unacked for longer makes the broker close the
    /// channel, so `JOB_DEADLINE_SECS` must leave room below it (checked at start-up), and the
    /// `dlq` commands never hold a dead letter for more than a third of it.
    pub consumer_timeout: Duration,
    /// `AMQP_CONFIRM_TIMEOUT_SECS` (default 30): the longest wait for the broker's publisher
    /// confirm of one publish; past it the publish counts as failed (transient).
    pub confirm_timeout: Duration,
    /// `AMQP_DELIVERY_LIMIT` (default 5): a job delivered this many times more without finishing
    /// (its worker died, its channel closed: the quorum queue's `x-delivery-count`) is
    /// dead-lettered by the worker with `reason: redelivered N times without finishing`. The job
    /// queue's own `x-delivery-limit` is set 2 higher, as the broker's backstop.
    pub delivery_limit: u32,
    /// `AMQP_JOB_EXCHANGE` (default `audio.jobs`): durable direct exchange producers publish to.
    pub job_exchange: String,
    /// `AMQP_JOB_QUEUE` (default `audio.save`): the quorum queue the worker consumes; also the
    /// routing key that binds it to the job exchange.
    pub job_queue: String,
    /// `AMQP_DEAD_LETTER_EXCHANGE` (default `audio.save.dlx`): fanout exchange for failed jobs.
    pub dead_letter_exchange: String,
    /// `AMQP_DEAD_LETTER_QUEUE` (default `audio.save.dlq`): where failed jobs wait for an operator.
    pub dead_letter_queue: String,
    /// `AMQP_EVENTS_EXCHANGE` (default `audio.events`): topic exchange for `audio.saved` and
    /// `audio.failed` events.
    pub events_exchange: String,
    /// `AMQP_EVENTS_QUEUE` (default unset): when set, a durable queue of that name is declared and
    /// bound to every event, so that events are routable (they are published `mandatory`) before
    /// any other consumer has bound its own queue.
    pub events_queue: Option<String>,
    /// `AMQP_URL_REFRESH_QUEUE` (default `audio.url.refresh`): the quorum queue of URL refresh
    /// requests ([`crate::refresh`]), bound to the job exchange with its own name as the
    /// routing key; each request is answered on its `reply_to`.
    pub url_refresh_queue: String,
}

impl AmqpSettings {
    /// `{AMQP_JOB_QUEUE}.batch` (`audio.save.batch`): the queue of batch messages, bound to the
    /// job exchange with its own name as the routing key, consumed one at a time per worker.
    pub fn batch_queue(&self) -> String {
        format!("{}.batch", self.job_queue)
    }

    /// `{AMQP_JOB_QUEUE}.items` (`audio.save.items`): where the worker publishes the items of
    /// batches (ordinary v1 jobs), bound to the job exchange with its own name. Consumed beside
    /// the job queue with `BATCH_PREFETCH` slots of their own, so a large batch never stands in
    /// front of single jobs.
    pub fn batch_items_queue(&self) -> String {
        format!("{}.items", self.job_queue)
    }

    /// `{AMQP_JOB_QUEUE}.batch.progress`: each batch item's terminal state (saved or failed),
    /// published by the worker that settled it before its delivery is acked, read by the batch
    /// tracker ([`crate::amqp::batches::track`]). Reached through the default exchange.
    pub fn batch_progress_queue(&self) -> String {
        format!("{}.batch.progress", self.job_queue)
    }
}

/// S3 (or MinIO, or any S3-compatible store) settings.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// `S3_ENDPOINT`, e.g. `http://minio:9000`. Addressed path-style, always.
    pub endpoint: Url,
    /// `S3_PUBLIC_ENDPOINT` (optional): the host presigned URLs are signed for, when clients reach
    /// the store through another name than the worker does.
    pub public_endpoint: Option<Url>,
    /// `S3_REGION` (default `us-east-1`): part of every signature.
    pub region: String,
    /// `S3_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `S3_SECRET_ACCESS_KEY`. Never logged.
    pub secret_access_key: String,
    /// `S3_BUCKET` (default `audio-assets`), created at start-up when missing.
    pub bucket: String,
    /// `PRESIGNED_URL_EXPIRY_SECS` (default and maximum 604800 = 7 days).
    pub presigned_url_expiry: Duration,
    /// `DELIVERY` (default `presigned`; `public`, `cloudfront`) with `PUBLIC_BASE_URL`,
    /// `CLOUDFRONT_KEY_PAIR_ID`, `CLOUDFRONT_PRIVATE_KEY_FILE` and `DELIVERY_URL_EXPIRY_SECS`:
    /// what kind of URL is handed out for each object (see [`crate::delivery`]). The key is read
    /// and tried at start-up.
    pub delivery: crate::delivery::Delivery,
    /// `S3_SESSION_TOKEN` (optional): set when the keys are temporary credentials (STS, an IAM
    /// role for a Kubernetes service account). A presigned URL stops working when the session
    /// that signed it ends, whatever its own expiry.
    pub session_token: Option<String>,
    /// `S3_CREDENTIALS_EXPIRE_AT` (optional, RFC 3339): when the temporary credentials end (the
    /// `Expiration` STS returns), so start-up and `check-config` can warn that URLs die sooner
    /// than `PRESIGNED_URL_EXPIRY_SECS` says.
    pub credentials_expire_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl S3Settings {
    /// Warnings about URLs that stop working before the expiry they announce: the credentials
    /// are temporary and end (or may end) before `PRESIGNED_URL_EXPIRY_SECS` from `now`. Empty
    /// for long-lived keys. Logged at start-up and printed by `check-config`.
    pub fn credential_warnings(&self, now: chrono::DateTime<chrono::Utc>) -> Vec<String> {
        let expiry = chrono::Duration::from_std(self.presigned_url_expiry).unwrap_or_default();
        let signed_until = now + expiry;
        match (&self.session_token, self.credentials_expire_at) {
            (_, Some(end)) if end < signed_until => vec![format!(
                "the S3 credentials are temporary and expire at {}, before the presigned URLs signed \
                 now would ({}, PRESIGNED_URL_EXPIRY_SECS={}): those URLs stop working when the \
                 credentials do; use long-lived keys for signing, lower PRESIGNED_URL_EXPIRY_SECS, \
                 or ask for fresh URLs (audio.url.refresh)",
                end.to_rfc3339(),
                signed_until.to_rfc3339(),
                self.presigned_url_expiry.as_secs()
            )],
            (Some(_), None) => vec![format!(
                "the S3 credentials are temporary (S3_SESSION_TOKEN is set) and their expiry is not \
                 known (set S3_CREDENTIALS_EXPIRE_AT): presigned URLs stop working when the session \
                 ends, which may be before PRESIGNED_URL_EXPIRY_SECS={} s",
                self.presigned_url_expiry.as_secs()
            )],
            _ => Vec::new(),
        }
    }
}

/// MongoDB settings.
#[derive(Debug, Clone)]
pub struct MongoSettings {
    /// `MONGODB_URI`, e.g. `mongodb://127.0.0.1:27017`. May hold a password: log it only through
    /// [`mask_url`].
    pub uri: String,
    /// `MONGODB_DATABASE` (default `audio_library`).
    pub database: String,
    /// `MONGODB_COLLECTION` (default `audio_assets`).
    pub collection: String,
    /// `MONGODB_SERVER_SELECTION_TIMEOUT_SECS` (default 5): how long an operation waits for a
    /// reachable server before failing (a transient error).
    pub server_selection_timeout: Duration,
    /// `MONGODB_OPERATION_TIMEOUT_SECS` (default 30): the longest one catalog operation may take
    /// (a hung server or a lost reply), after which it fails as a transient error.
    pub operation_timeout: Duration,
    /// `SAVE_LEASE_SECS` (default 30, at least 3): how long a save lease on an asset lasts
    /// without being renewed. Its holder renews it every third of that while it uploads and
    /// commits; a worker killed mid-save holds the asset no longer than this.
    pub save_lease: Duration,
}

/// Settings of the audio-generation service the audio comes from.
#[derive(Debug, Clone)]
pub struct AudioGenSettings {
    /// `AUDIO_GENERATION_SERVICE_URL` (default `http://audio-generation-factory:3000`): base that
    /// relative `audio_url`s are resolved against, keeping its path.
    pub base_url: Url,
    /// `CLEANUP_TEMP_AUDIO` (default `true`): delete the temporary file on the service after the
    /// job completed.
    pub cleanup_temp_audio: bool,
    /// `DOWNLOAD_CONNECT_TIMEOUT_SECS` (default 10).
    pub connect_timeout: Duration,
    /// `DOWNLOAD_READ_TIMEOUT_SECS` (default 30): longest wait for the next bytes of a body, so a
    /// large file served slowly still completes while a stalled one fails.
    pub read_timeout: Duration,
    /// `DOWNLOAD_MIN_BYTES_PER_SEC` (default 1024; 0 turns it off) over any
    /// `DOWNLOAD_RATE_WINDOW_SECS` (default 30): a body that arrives slower (a peer dripping one
    /// byte every few seconds, under the read timeout) fails as a transient error naming the
    /// limit, instead of holding its consumer slot until the broker's `consumer_timeout`.
    pub min_bytes_per_sec: u64,
    /// `DOWNLOAD_RATE_WINDOW_SECS` (default 30, at least 1): the sliding window the rate is
    /// measured over; the first window of a body is never judged.
    pub rate_window: Duration,
    /// `MAX_AUDIO_BYTES` (default 524288000 = 500 MiB): a larger download is a permanent error,
    /// stopped while streaming, so that a runaway body cannot fill the disk.
    pub max_audio_bytes: u64,
    /// `ANALYSIS` (default `on`; `off`) with `ANALYSIS_SILENCE_THRESHOLD_DBFS` (default −60):
    /// decode each take while it downloads and record its loudness, silence, clipping and
    /// format (`analysis` in the document and `audio.saved`). `None` when off.
    pub analysis: Option<crate::audio::analysis::AnalysisSettings>,
    /// `QUALITY_RULES` (default none), e.g.
    /// `max_leading_silence_s=2,max_clipped_samples=0,min_integrated_lufs=-35`: a take that
    /// breaks one is refused before anything is stored (see [`crate::audio::quality`]). Needs
    /// `ANALYSIS=on`.
    pub quality_rules: crate::audio::quality::QualityRules,
    /// `WAVEFORM` (default `on`; `off`) with `WAVEFORM_SAMPLES_PER_PIXEL` (default 256) and
    /// `WAVEFORM_BITS` (16 or 8, default 16): store waveform peaks (audiowaveform JSON v2) beside
    /// each take, for players. `None` when off.
    pub waveform: Option<crate::audio::waveform::WaveformSettings>,
    /// `RENDITIONS` (comma list of `flac`, `vorbis`; default none) with `RENDITION_VORBIS_KBPS`
    /// (default 64): the copies of each take stored beside it (see [`crate::audio::rendition`]).
    pub renditions: crate::audio::rendition::RenditionSettings,
    /// Which URLs may be requested: `AUDIO_GENERATION_SERVICE_URL` for relative URLs,
    /// `AUDIO_URL_ALLOWED_HOSTS` (comma-separated `host` or `host:port`; default the generation
    /// service's `host:port`) for absolute ones, `AUDIO_URL_PRIVATE_HOSTS` (same form; default
    /// the generation service's `host:port`) for those that may be loopback or private addresses.
    pub url_policy: UrlPolicy,
}

/// How the worker consumes and retries.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// `WORKER_PREFETCH` (default 16): unacked deliveries per worker, all processed concurrently.
    pub prefetch: u16,
    /// `RETRY_MAX_ATTEMPTS` (default 5): in-process attempts of one stage within one delivery,
    /// for blips; then the job goes to a delay queue (or the dead-letter queue).
    pub retry_max_attempts: u32,
    /// `RETRY_INITIAL_DELAY_MS` (default 200): first in-process backoff delay; it doubles, with
    /// jitter.
    pub retry_initial_delay: Duration,
    /// `RETRY_MAX_ELAPSED_SECS` (default 120): the most one stage of one delivery spends sleeping
    /// between in-process retries (each stage has its own allowance, so a slow download leaves
    /// the upload and the catalog their retries).
    pub retry_max_elapsed: Duration,
    /// `RETRY_SCHEDULE` (default `5s,30s,2m,10m,30m`; `none` for no delay queues): the wait
    /// before each redelivery after a transient failure, one delay queue per entry. A job gets
    /// `len + 1` deliveries before it is dead-lettered.
    pub retry_schedule: Vec<Duration>,
    /// `JOB_DEADLINE_SECS` (default 1500 = 25 min): the longest one delivery may run, all stages
    /// together. Past it the job fails as a transient error naming the limit (a delay queue, in
    /// the end the dead-letter queue), so no peer, however slow, holds a delivery until the
    /// broker's `consumer_timeout` returns it. At least 120 s below `AMQP_CONSUMER_TIMEOUT_SECS`
    /// (checked at start-up), which leaves the outcome time to be confirmed and acked.
    pub job_deadline: Duration,
    /// `SHUTDOWN_GRACE_SECS` (default 30): how long in-flight jobs may run after SIGTERM.
    pub shutdown_grace: Duration,
    /// `METRICS_ADDR` (default `0.0.0.0:9090`; `off` to disable): where `/metrics`, `/healthz`
    /// and `/readyz` are served.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `WORKER_TMP_DIR` (default the system temp dir): downloads are spooled here, one file per
    /// job, so memory does not grow with the file size.
    pub tmp_dir: std::path::PathBuf,
    /// `BATCH_MAX_ITEMS` (default 1000, at most 5000): the most items one batch message may
    /// carry; a larger batch is dead-lettered whole. Bounded so the batch's record (one
    /// document holding every item's state and URL) stays far below MongoDB's 16 MiB.
    pub batch_max_items: usize,
    /// `BATCH_PREFETCH` (default a quarter of `WORKER_PREFETCH`, at least 1): the unacked batch
    /// items a worker processes at once, beside (not out of) the `WORKER_PREFETCH` slots of the
    /// job queue. However large a batch, single jobs keep their own slots.
    pub batch_prefetch: u16,
}

impl Settings {
    /// Reads and validates every setting from the process environment.
    ///
    /// # Errors
    /// The first unusable setting, naming its variable.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`Settings::from_env`], reading variables through `lookup` (tests pass a map).
    ///
    /// # Errors
    /// The first unusable setting, naming its variable.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let lookup = with_secret_files(lookup)?;
        let env = Env(&lookup);
        let expiry = env.parse_u64("PRESIGNED_URL_EXPIRY_SECS", MAX_PRESIGNED_URL_EXPIRY_SECS)?;
        if expiry == 0 || expiry > MAX_PRESIGNED_URL_EXPIRY_SECS {
            return Err(env.error(
                "PRESIGNED_URL_EXPIRY_SECS",
                format!("must be between 1 and {MAX_PRESIGNED_URL_EXPIRY_SECS} seconds (7 days)"),
            ));
        }
        let url_policy = url_policy(&env)?;
        let prefetch = env.parse_u64("WORKER_PREFETCH", 16)?;
        if prefetch == 0 || prefetch > u64::from(u16::MAX) {
            return Err(env.error("WORKER_PREFETCH", "must be between 1 and 65535".into()));
        }
        let attempts = env.parse_u64("RETRY_MAX_ATTEMPTS", 5)?;
        if attempts == 0 || attempts > 100 {
            return Err(env.error("RETRY_MAX_ATTEMPTS", "must be between 1 and 100".into()));
        }
        let amqp = amqp_settings(&env)?;
        let job_deadline = Duration::from_secs(env.parse_u64("JOB_DEADLINE_SECS", 1500)?.max(1));
        if job_deadline + SETTLE_MARGIN > amqp.consumer_timeout {
            return Err(env.error(
                "JOB_DEADLINE_SECS",
                format!(
                    "must be at least {} s below AMQP_CONSUMER_TIMEOUT_SECS ({} s), so a job settles \
                     before the broker takes its delivery back",
                    SETTLE_MARGIN.as_secs(),
                    amqp.consumer_timeout.as_secs()
                ),
            ));
        }
        Ok(Settings {
            amqp,
            s3: S3Settings {
                endpoint: env.url("S3_ENDPOINT", Some("http://127.0.0.1:9000"))?,
                public_endpoint: match env.get("S3_PUBLIC_ENDPOINT") {
                    Some(_) => Some(env.url("S3_PUBLIC_ENDPOINT", None)?),
                    None => None,
                },
                region: env.string("S3_REGION", "us-east-1"),
                access_key_id: env.required("S3_ACCESS_KEY_ID")?,
                secret_access_key: env.required("S3_SECRET_ACCESS_KEY")?,
                bucket: env.bucket("S3_BUCKET", "audio-assets")?,
                presigned_url_expiry: Duration::from_secs(expiry),
                session_token: env.get("S3_SESSION_TOKEN").filter(|t| !t.trim().is_empty()),
                credentials_expire_at: match env.get("S3_CREDENTIALS_EXPIRE_AT") {
                    Some(at) if !at.trim().is_empty() => Some(
                        chrono::DateTime::parse_from_rfc3339(at.trim())
                            .map_err(|e| {
                                env.error(
                                    "S3_CREDENTIALS_EXPIRE_AT",
                                    format!("must be an RFC 3339 time such as 2026-12-02T18:00:00Z ({e})"),
                                )
                            })?
                            .with_timezone(&chrono::Utc),
                    ),
                    _ => None,
                },
                delivery: delivery(&env)?,
            },
            mongo: MongoSettings {
                uri: env.mongodb_uri("MONGODB_URI", "mongodb://127.0.0.1:27017")?,
                database: env.name("MONGODB_DATABASE", "audio_library")?,
                collection: env.name("MONGODB_COLLECTION", "audio_assets")?,
                server_selection_timeout: Duration::from_secs(
                    env.parse_u64("MONGODB_SERVER_SELECTION_TIMEOUT_SECS", 5)?.max(1),
                ),
                operation_timeout: Duration::from_secs(
                    env.parse_u64("MONGODB_OPERATION_TIMEOUT_SECS", 30)?.max(1),
                ),
                save_lease: Duration::from_secs(env.parse_u64("SAVE_LEASE_SECS", 30)?.max(3)),
            },
            audio_gen: AudioGenSettings {
                base_url: url_policy.base().clone(),
                cleanup_temp_audio: env.bool("CLEANUP_TEMP_AUDIO", true)?,
                connect_timeout: Duration::from_secs(
                    env.parse_u64("DOWNLOAD_CONNECT_TIMEOUT_SECS", 10)?.max(1),
                ),
                read_timeout: Duration::from_secs(env.parse_u64("DOWNLOAD_READ_TIMEOUT_SECS", 30)?.max(1)),
                min_bytes_per_sec: env.parse_u64("DOWNLOAD_MIN_BYTES_PER_SEC", 1024)?,
                rate_window: Duration::from_secs(env.parse_u64("DOWNLOAD_RATE_WINDOW_SECS", 30)?.max(1)),
                max_audio_bytes: match env.parse_u64("MAX_AUDIO_BYTES", 500 << 20)? {
                    0 => return Err(env.error("MAX_AUDIO_BYTES", "must be at least 1".into())),
                    n => n,
                },
                analysis: match env.string("ANALYSIS", "on").as_str() {
                    "on" | "true" => Some(crate::audio::analysis::AnalysisSettings {
                        silence_threshold_dbfs: match env
                            .string("ANALYSIS_SILENCE_THRESHOLD_DBFS", "-60")
                            .parse::<f64>()
                        {
                            Ok(v) if v.is_finite() && v < 0.0 => v,
                            _ => {
                                return Err(env.error(
                                    "ANALYSIS_SILENCE_THRESHOLD_DBFS",
                                    "must be a level below 0 dBFS, e.g. -60".into(),
                                ));
                            }
                        },
                    }),
                    "off" | "false" => None,
                    _ => return Err(env.error("ANALYSIS", "must be on or off".into())),
                },
                quality_rules: {
                    let rules = crate::audio::quality::QualityRules::parse(&env.string("QUALITY_RULES", ""))
                        .map_err(|why| env.error("QUALITY_RULES", why))?;
                    if !rules.is_empty() && matches!(env.string("ANALYSIS", "on").as_str(), "off" | "false") {
                        return Err(env.error(
                            "QUALITY_RULES",
                            "needs ANALYSIS=on: the rules judge the analysis".into(),
                        ));
                    }
                    rules
                },
                waveform: match env.string("WAVEFORM", "on").as_str() {
                    "on" | "true" => Some(crate::audio::waveform::WaveformSettings {
                        samples_per_pixel: match env.parse_u64("WAVEFORM_SAMPLES_PER_PIXEL", 256)? {
                            n @ 2..=1_000_000 => n as u32,
                            _ => {
                                return Err(env.error(
                                    "WAVEFORM_SAMPLES_PER_PIXEL",
                                    "must be 2 to 1000000 frames per pixel".into(),
                                ));
                            }
                        },
                        bits: match env.parse_u64("WAVEFORM_BITS", 16)? {
                            b @ (8 | 16) => b as u32,
                            _ => return Err(env.error("WAVEFORM_BITS", "must be 8 or 16".into())),
                        },
                    }),
                    "off" | "false" => None,
                    _ => return Err(env.error("WAVEFORM", "must be on or off".into())),
                },
                renditions: {
                    let kbps = match env.parse_u64("RENDITION_VORBIS_KBPS", 64)? {
                        k @ 16..=320 => k as u32,
                        _ => {
                            return Err(env.error("RENDITION_VORBIS_KBPS", "must be 16 to 320 kbit/s".into()));
                        }
                    };
                    crate::audio::rendition::RenditionSettings::parse(&env.string("RENDITIONS", ""), kbps)
                        .map_err(|why| env.error("RENDITIONS", why))?
                },
                url_policy,
            },
            worker: WorkerSettings {
                prefetch: u16::try_from(prefetch).expect("range checked above"),
                retry_max_attempts: u32::try_from(attempts).expect("range checked above"),
                retry_initial_delay: Duration::from_millis(env.parse_u64("RETRY_INITIAL_DELAY_MS", 200)?),
                retry_schedule: env.schedule("RETRY_SCHEDULE", "5s,30s,2m,10m,30m")?,
                retry_max_elapsed: Duration::from_secs(env.parse_u64("RETRY_MAX_ELAPSED_SECS", 120)?),
                job_deadline,
                shutdown_grace: Duration::from_secs(env.parse_u64("SHUTDOWN_GRACE_SECS", 30)?),
                tmp_dir: env.writable_dir("WORKER_TMP_DIR")?,
                batch_max_items: match env.parse_u64("BATCH_MAX_ITEMS", 1000)? {
                    n @ 1..=5000 => n as usize,
                    _ => return Err(env.error("BATCH_MAX_ITEMS", "must be between 1 and 5000".into())),
                },
                batch_prefetch: match env.parse_u64("BATCH_PREFETCH", (prefetch / 4).max(1))? {
                    n @ 1..=65535 => n as u16,
                    _ => return Err(env.error("BATCH_PREFETCH", "must be between 1 and 65535".into())),
                },
                metrics_addr: match env.string("METRICS_ADDR", "0.0.0.0:9090").as_str() {
                    "off" => None,
                    addr => Some(addr.parse().map_err(|_| {
                        env.error("METRICS_ADDR", "must be ip:port (e.g. 0.0.0.0:9090) or off".into())
                    })?),
                },
            },
        })
    }

    /// The effective configuration as `(variable, value)` rows, secrets masked: what
    /// `audio-worker check-config` prints.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let secs = |d: Duration| d.as_secs().to_string();
        vec![
            ("AMQP_URL", self.amqp.nodes.iter().map(|n| mask_url(n)).collect::<Vec<_>>().join(",")),
            ("AMQP_CONSUMER_TIMEOUT_SECS", secs(self.amqp.consumer_timeout)),
            ("AMQP_CONFIRM_TIMEOUT_SECS", secs(self.amqp.confirm_timeout)),
            ("AMQP_DELIVERY_LIMIT", self.amqp.delivery_limit.to_string()),
            ("AMQP_JOB_EXCHANGE", self.amqp.job_exchange.clone()),
            ("AMQP_JOB_QUEUE", self.amqp.job_queue.clone()),
            ("AMQP_DEAD_LETTER_EXCHANGE", self.amqp.dead_letter_exchange.clone()),
            ("AMQP_DEAD_LETTER_QUEUE", self.amqp.dead_letter_queue.clone()),
            ("AMQP_EVENTS_EXCHANGE", self.amqp.events_exchange.clone()),
            ("AMQP_EVENTS_QUEUE", self.amqp.events_queue.clone().unwrap_or_default()),
            ("S3_ENDPOINT", self.s3.endpoint.to_string()),
            ("S3_PUBLIC_ENDPOINT", self.s3.public_endpoint.as_ref().map(Url::to_string).unwrap_or_default()),
            ("S3_REGION", self.s3.region.clone()),
            ("S3_ACCESS_KEY_ID", self.s3.access_key_id.clone()),
            ("S3_SECRET_ACCESS_KEY", "****".into()),
            ("S3_BUCKET", self.s3.bucket.clone()),
            ("PRESIGNED_URL_EXPIRY_SECS", secs(self.s3.presigned_url_expiry)),
            ("S3_SESSION_TOKEN", if self.s3.session_token.is_some() { "****" } else { "" }.into()),
            (
                "S3_CREDENTIALS_EXPIRE_AT",
                self.s3.credentials_expire_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
            ),
            ("DELIVERY", self.s3.delivery.mode().to_string()),
            (
                "PUBLIC_BASE_URL",
                match &self.s3.delivery {
                    Delivery::Presigned => String::new(),
                    Delivery::Public(base) => base.to_string(),
                    Delivery::CloudFront { signer, .. } => signer.base().to_string(),
                },
            ),
            (
                "CLOUDFRONT_KEY_PAIR_ID",
                self.cloudfront().map(|(s, _)| s.key_pair_id().to_owned()).unwrap_or_default(),
            ),
            (
                "CLOUDFRONT_PRIVATE_KEY_FILE",
                self.cloudfront().map(|(_, file)| file.display().to_string()).unwrap_or_default(),
            ),
            (
                "DELIVERY_URL_EXPIRY_SECS",
                self.cloudfront().map(|(s, _)| secs(s.expiry())).unwrap_or_default(),
            ),
            ("MONGODB_URI", mask_url(&self.mongo.uri)),
            ("MONGODB_DATABASE", self.mongo.database.clone()),
            ("MONGODB_COLLECTION", self.mongo.collection.clone()),
            ("MONGODB_SERVER_SELECTION_TIMEOUT_SECS", secs(self.mongo.server_selection_timeout)),
            ("MONGODB_OPERATION_TIMEOUT_SECS", secs(self.mongo.operation_timeout)),
            ("SAVE_LEASE_SECS", secs(self.mongo.save_lease)),
            ("AUDIO_GENERATION_SERVICE_URL", self.audio_gen.base_url.to_string()),
            ("CLEANUP_TEMP_AUDIO", self.audio_gen.cleanup_temp_audio.to_string()),
            ("DOWNLOAD_CONNECT_TIMEOUT_SECS", secs(self.audio_gen.connect_timeout)),
            ("DOWNLOAD_READ_TIMEOUT_SECS", secs(self.audio_gen.read_timeout)),
            ("DOWNLOAD_MIN_BYTES_PER_SEC", self.audio_gen.min_bytes_per_sec.to_string()),
            ("ANALYSIS", if self.audio_gen.analysis.is_some() { "on" } else { "off" }.to_string()),
            (
                "QUALITY_RULES",
                self.audio_gen.quality_rules.0.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            ),
            (
                "ANALYSIS_SILENCE_THRESHOLD_DBFS",
                self.audio_gen
                    .analysis
                    .map_or_else(|| "-60".into(), |a| a.silence_threshold_dbfs.to_string()),
            ),
            ("WAVEFORM", if self.audio_gen.waveform.is_some() { "on" } else { "off" }.to_string()),
            (
                "WAVEFORM_SAMPLES_PER_PIXEL",
                self.audio_gen.waveform.map_or(256, |w| w.samples_per_pixel).to_string(),
            ),
            ("WAVEFORM_BITS", self.audio_gen.waveform.map_or(16, |w| w.bits).to_string()),
            (
                "RENDITIONS",
                self.audio_gen.renditions.list().iter().map(|r| r.name()).collect::<Vec<_>>().join(","),
            ),
            ("RENDITION_VORBIS_KBPS", self.audio_gen.renditions.vorbis_kbps.unwrap_or(64).to_string()),
            ("DOWNLOAD_RATE_WINDOW_SECS", secs(self.audio_gen.rate_window)),
            ("MAX_AUDIO_BYTES", self.audio_gen.max_audio_bytes.to_string()),
            ("AUDIO_URL_ALLOWED_HOSTS", join_hosts(self.audio_gen.url_policy.allowed_hosts())),
            ("AUDIO_URL_PRIVATE_HOSTS", join_hosts(self.audio_gen.url_policy.private_hosts())),
            ("WORKER_PREFETCH", self.worker.prefetch.to_string()),
            ("RETRY_MAX_ATTEMPTS", self.worker.retry_max_attempts.to_string()),
            ("RETRY_INITIAL_DELAY_MS", self.worker.retry_initial_delay.as_millis().to_string()),
            ("RETRY_MAX_ELAPSED_SECS", secs(self.worker.retry_max_elapsed)),
            (
                "RETRY_SCHEDULE",
                match self.worker.retry_schedule.as_slice() {
                    [] => "none".into(),
                    delays => delays
                        .iter()
                        .map(|d| humantime::format_duration(*d).to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                },
            ),
            ("JOB_DEADLINE_SECS", secs(self.worker.job_deadline)),
            ("SHUTDOWN_GRACE_SECS", secs(self.worker.shutdown_grace)),
            ("WORKER_TMP_DIR", self.worker.tmp_dir.display().to_string()),
            ("METRICS_ADDR", self.worker.metrics_addr.map_or_else(|| "off".into(), |a| a.to_string())),
            ("BATCH_MAX_ITEMS", self.worker.batch_max_items.to_string()),
            ("BATCH_PREFETCH", self.worker.batch_prefetch.to_string()),
            ("AMQP_URL_REFRESH_QUEUE", self.amqp.url_refresh_queue.clone()),
        ]
    }
}

impl Settings {
    /// The CloudFront signer and the file its key came from, with `DELIVERY=cloudfront`.
    fn cloudfront(&self) -> Option<(&CloudFrontSigner, &std::path::Path)> {
        match &self.s3.delivery {
            Delivery::CloudFront { signer, key_file } => Some((signer, key_file)),
            _ => None,
        }
    }
}

impl AmqpSettings {
    /// Reads only the RabbitMQ settings: what `audio-worker publish` and `dlq` need, so that
    /// they run without S3 or MongoDB credentials.
    ///
    /// # Errors
    /// The first unusable setting, naming its variable.
    pub fn from_env() -> Result<Self, ConfigError> {
        let lookup = with_secret_files(|name: &str| std::env::var(name).ok())?;
        amqp_settings(&Env(&lookup))
    }
}

fn amqp_settings<F: Fn(&str) -> Option<String>>(env: &Env<'_, F>) -> Result<AmqpSettings, ConfigError> {
    Ok(AmqpSettings {
        nodes: env.amqp_nodes("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")?,
        consumer_timeout: Duration::from_secs(env.parse_u64("AMQP_CONSUMER_TIMEOUT_SECS", 1800)?.max(1)),
        confirm_timeout: Duration::from_secs(env.parse_u64("AMQP_CONFIRM_TIMEOUT_SECS", 30)?.max(1)),
        delivery_limit: match env.parse_u64("AMQP_DELIVERY_LIMIT", 5)? {
            n @ 1..=1000 => u32::try_from(n).expect("range checked"),
            _ => return Err(env.error("AMQP_DELIVERY_LIMIT", "must be between 1 and 1000".into())),
        },
        job_exchange: env.name("AMQP_JOB_EXCHANGE", "audio.jobs")?,
        job_queue: env.name("AMQP_JOB_QUEUE", "audio.save")?,
        dead_letter_exchange: env.name("AMQP_DEAD_LETTER_EXCHANGE", "audio.save.dlx")?,
        dead_letter_queue: env.name("AMQP_DEAD_LETTER_QUEUE", "audio.save.dlq")?,
        events_exchange: env.name("AMQP_EVENTS_EXCHANGE", "audio.events")?,
        events_queue: match env.get("AMQP_EVENTS_QUEUE") {
            Some(_) => Some(env.name("AMQP_EVENTS_QUEUE", "")?),
            None => None,
        },
        url_refresh_queue: env.name("AMQP_URL_REFRESH_QUEUE", "audio.url.refresh")?,
    })
}

/// The URL policy alone, from `AUDIO_GENERATION_SERVICE_URL`, `AUDIO_URL_ALLOWED_HOSTS` and
/// `AUDIO_URL_PRIVATE_HOSTS`: what `dlq replay` checks jobs against without S3 or MongoDB settings.
///
/// # Errors
/// An unusable value, naming its variable.
pub fn url_policy_from_env() -> Result<UrlPolicy, ConfigError> {
    let lookup = |name: &str| std::env::var(name).ok();
    url_policy(&Env(&lookup))
}

fn url_policy<F: Fn(&str) -> Option<String>>(env: &Env<'_, F>) -> Result<UrlPolicy, ConfigError> {
    let base = env.url("AUDIO_GENERATION_SERVICE_URL", Some("http://audio-generation-factory:3000"))?;
    Ok(UrlPolicy::new(
        base.clone(),
        env.hosts("AUDIO_URL_ALLOWED_HOSTS", &base)?,
        env.hosts("AUDIO_URL_PRIVATE_HOSTS", &base)?,
    ))
}

/// `DELIVERY` and the settings of its mode. A setting of another mode is an error rather than
/// ignored, so that a CloudFront key set without `DELIVERY=cloudfront` does not quietly leave
/// presigned URLs in place; the CloudFront key is read, parsed and tried on a policy here.
fn delivery<F: Fn(&str) -> Option<String>>(env: &Env<'_, F>) -> Result<Delivery, ConfigError> {
    const CLOUDFRONT_VARS: [&str; 3] =
        ["CLOUDFRONT_KEY_PAIR_ID", "CLOUDFRONT_PRIVATE_KEY_FILE", "DELIVERY_URL_EXPIRY_SECS"];
    let mode = match env.get("DELIVERY") {
        None => DeliveryMode::Presigned,
        Some(value) => DeliveryMode::parse(&value)
            .ok_or_else(|| env.error("DELIVERY", "must be presigned, public or cloudfront".into()))?,
    };
    let unused = match mode {
        DeliveryMode::Presigned => {
            &["PUBLIC_BASE_URL", CLOUDFRONT_VARS[0], CLOUDFRONT_VARS[1], CLOUDFRONT_VARS[2]][..]
        }
        DeliveryMode::Public => &CLOUDFRONT_VARS[..],
        DeliveryMode::CloudFront => &[],
    };
    if let Some(&var) = unused.iter().find(|var| env.get(var).is_some()) {
        return Err(env.error(var, format!("is not used with DELIVERY={mode}; unset it or change DELIVERY")));
    }
    let required = |var: &'static str| {
        env.get(var).ok_or_else(|| env.error(var, format!("is required with DELIVERY={mode}")))
    };
    let base =
        || PublicBase::parse(&required("PUBLIC_BASE_URL")?).map_err(|why| env.error("PUBLIC_BASE_URL", why));
    match mode {
        DeliveryMode::Presigned => Ok(Delivery::Presigned),
        DeliveryMode::Public => Ok(Delivery::Public(base()?)),
        DeliveryMode::CloudFront => {
            let base = base()?;
            let expiry = env.parse_u64("DELIVERY_URL_EXPIRY_SECS", MAX_PRESIGNED_URL_EXPIRY_SECS)?;
            if expiry == 0 || expiry > MAX_DELIVERY_URL_EXPIRY_SECS {
                return Err(env.error(
                    "DELIVERY_URL_EXPIRY_SECS",
                    format!("must be between 1 and {MAX_DELIVERY_URL_EXPIRY_SECS} seconds (365 days)"),
                ));
            }
            let key_pair_id = required("CLOUDFRONT_KEY_PAIR_ID")?;
            let key_file = std::path::PathBuf::from(required("CLOUDFRONT_PRIVATE_KEY_FILE")?);
            let pem = std::fs::read_to_string(&key_file).map_err(|e| {
                env.error("CLOUDFRONT_PRIVATE_KEY_FILE", format!("cannot read the key file ({e})"))
            })?;
            let signer = CloudFrontSigner::new(base, &key_pair_id, &pem, Duration::from_secs(expiry))
                .map_err(|e| match e {
                    KeyError::BadKeyPairId => env.error("CLOUDFRONT_KEY_PAIR_ID", e.to_string()),
                    e => env.error("CLOUDFRONT_PRIVATE_KEY_FILE", e.to_string()),
                })?;
            Ok(Delivery::CloudFront { signer, key_file })
        }
    }
}

/// Wraps `lookup` so that each of [`SECRET_VARS`] is read from the file `{VAR}_FILE` names, when
/// set. A trailing newline (as `echo` and editors leave) is dropped.
fn with_secret_files(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<impl Fn(&str) -> Option<String>, ConfigError> {
    const FILE_VARS: [&str; 4] =
        ["AMQP_URL_FILE", "MONGODB_URI_FILE", "S3_ACCESS_KEY_ID_FILE", "S3_SECRET_ACCESS_KEY_FILE"];
    let mut from_files = std::collections::HashMap::new();
    for (var, file_var) in SECRET_VARS.into_iter().zip(FILE_VARS) {
        let Some(path) = lookup(file_var).filter(|p| !p.trim().is_empty()) else { continue };
        if lookup(var).is_some_and(|v| !v.trim().is_empty()) {
            return Err(ConfigError {
                var: file_var,
                message: format!("{var} and {file_var} are both set; set one"),
                value: path,
            });
        }
        let content = std::fs::read_to_string(path.trim()).map_err(|e| ConfigError {
            var: file_var,
            message: format!("cannot read the secret file ({e})"),
            value: path.clone(),
        })?;
        let content = content.trim_end_matches(['\n', '\r']);
        if content.trim().is_empty() {
            return Err(ConfigError {
                var: file_var,
                message: "the secret file is empty".into(),
                value: path,
            });
        }
        from_files.insert(var, content.to_owned());
    }
    Ok(move |name: &str| from_files.get(name).cloned().or_else(|| lookup(name)))
}

fn join_hosts(hosts: &[HostRule]) -> String {
    hosts.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// Replaces the password of a URL (`scheme://user:password@host`) with `****`; anything that
/// does not parse as a URL is masked whole, since it might be a secret.
pub fn mask_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("****"));
            }
            url.to_string()
        }
        Err(_) => "****".into(),
    }
}

/// Typed access to the variables, each error naming its variable.
struct Env<'a, F: Fn(&str) -> Option<String>>(&'a F);

impl<F: Fn(&str) -> Option<String>> Env<'_, F> {
    /// An unset or empty variable counts as unset, as docker compose writes `VAR=` for blanks.
    fn get(&self, var: &str) -> Option<String> {
        (self.0)(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    }

    fn error(&self, var: &'static str, message: String) -> ConfigError {
        let value = if var.contains("SECRET") { "****".into() } else { self.get(var).unwrap_or_default() };
        ConfigError { var, message, value }
    }

    fn string(&self, var: &'static str, default: &str) -> String {
        self.get(var).unwrap_or_else(|| default.to_owned())
    }

    fn required(&self, var: &'static str) -> Result<String, ConfigError> {
        self.get(var).ok_or_else(|| self.error(var, "is required".into()))
    }

    fn parse_u64(&self, var: &'static str, default: u64) -> Result<u64, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| self.error(var, "must be a whole non-negative number".into())),
        }
    }

    /// A comma-separated list of `amqp://` or `amqps://` URLs that lapin can parse, the nodes
    /// of one cluster; each entry is checked on its own, so a list is never read as one URL.
    fn amqp_nodes(&self, var: &'static str, default: &str) -> Result<Vec<String>, ConfigError> {
        let raw = self.string(var, default);
        let mut nodes = Vec::new();
        for (i, node) in raw.split(',').map(str::trim).enumerate() {
            let which = |what: &str| format!("entry {} {what}", i + 1);
            match node.parse::<lapin::uri::AMQPUri>() {
                _ if node.is_empty() => {
                    return Err(self.masked_error(var, which("is empty (a stray comma?)"), &raw));
                }
                Ok(_) if node.starts_with("amqp://") || node.starts_with("amqps://") => {
                    nodes.push(node.to_owned());
                }
                Ok(_) => {
                    return Err(self.masked_error(var, which("must start with amqp:// or amqps://"), node));
                }
                Err(e) => {
                    return Err(self.masked_error(var, which(&format!("is not an AMQP URL ({e})")), node));
                }
            }
        }
        Ok(nodes)
    }

    /// A `mongodb://` URI (`mongodb+srv://` needs a DNS resolver that is not built in).
    fn mongodb_uri(&self, var: &'static str, default: &str) -> Result<String, ConfigError> {
        let raw = self.string(var, default);
        if raw.starts_with("mongodb+srv://") {
            return Err(self.masked_error(
                var,
                "mongodb+srv:// is not supported: list the hosts, mongodb://host1:27017,host2:27017/".into(),
                &raw,
            ));
        }
        if !raw.starts_with("mongodb://") {
            return Err(self.masked_error(var, "must start with mongodb://".into(), &raw));
        }
        Ok(raw)
    }

    /// A directory this process can create files in (checked by creating one).
    fn writable_dir(&self, var: &'static str) -> Result<std::path::PathBuf, ConfigError> {
        let dir = self.get(var).map_or_else(std::env::temp_dir, std::path::PathBuf::from);
        tempfile::tempfile_in(&dir).map(|_| dir.clone()).map_err(|e| ConfigError {
            var,
            message: format!("must be a writable directory ({e})"),
            value: dir.display().to_string(),
        })
    }

    fn masked_error(&self, var: &'static str, message: String, raw: &str) -> ConfigError {
        ConfigError { var, message, value: mask_url(raw) }
    }

    /// A comma-separated list of durations (`5s,30s,2m`), each 1 ms to 1 day; `none` is empty.
    fn schedule(&self, var: &'static str, default: &str) -> Result<Vec<Duration>, ConfigError> {
        let raw = self.string(var, default);
        if raw.eq_ignore_ascii_case("none") {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for part in raw.split(',').map(str::trim) {
            let d = humantime::parse_duration(part)
                .map_err(|e| self.error(var, format!("{part:?} is not a duration like 30s or 2m ({e})")))?;
            if d < Duration::from_millis(1) || d > Duration::from_secs(86_400) {
                return Err(self.error(var, "each delay must be between 1ms and 1 day".into()));
            }
            out.push(d);
        }
        if out.len() > 20 {
            return Err(self.error(var, "at most 20 delays".into()));
        }
        Ok(out)
    }

    /// A comma-separated list of `host` or `host:port`; unset means the origin of `default`.
    fn hosts(&self, var: &'static str, default: &Url) -> Result<Vec<HostRule>, ConfigError> {
        match self.get(var) {
            None => Ok(HostRule::of_url(default).into_iter().collect()),
            Some(raw) => raw
                .split(',')
                .filter(|h| !h.trim().is_empty())
                .map(|h| HostRule::parse(h).map_err(|m| self.error(var, m)))
                .collect(),
        }
    }

    fn bool(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(var).map(|v| v.to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if matches!(v.as_str(), "true" | "1" | "yes" | "on") => Ok(true),
            Some(v) if matches!(v.as_str(), "false" | "0" | "no" | "off") => Ok(false),
            Some(_) => Err(self.error(var, "must be true or false".into())),
        }
    }

    fn url(&self, var: &'static str, default: Option<&str>) -> Result<Url, ConfigError> {
        let raw = match (self.get(var), default) {
            (Some(v), _) => v,
            (None, Some(d)) => d.to_owned(),
            (None, None) => return Err(self.error(var, "is required".into())),
        };
        let url = Url::parse(&raw).map_err(|e| self.error(var, format!("is not an absolute URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(self.error(var, "must be an http:// or https:// URL with a host".into()));
        }
        Ok(url)
    }

    /// A queue, exchange or database name: printable ASCII without spaces, at most 255 bytes
    /// (AMQP short strings) and not starting with `amq.` (reserved by the broker).
    fn name(&self, var: &'static str, default: &str) -> Result<String, ConfigError> {
        let v = self.string(var, default);
        let ok = !v.is_empty()
            && v.len() <= 255
            && !v.starts_with("amq.")
            && v.chars().all(|c| c.is_ascii_graphic());
        if ok {
            Ok(v)
        } else {
            Err(self.error(
                var,
                "must be 1-255 printable ASCII characters without spaces, not starting with amq.".into(),
            ))
        }
    }

    /// S3 bucket naming rules: 3-63 lowercase letters, digits, `-` and `.`.
    fn bucket(&self, var: &'static str, default: &str) -> Result<String, ConfigError> {
        let v = self.string(var, default);
        let ok = (3..=63).contains(&v.len())
            && v.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric());
        if ok {
            Ok(v)
        } else {
            Err(self.error(
                var,
                "must be a valid S3 bucket name (3-63 lowercase letters, digits, '-', '.')".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut map: HashMap<String, String> =
            [("S3_ACCESS_KEY_ID", "key"), ("S3_SECRET_ACCESS_KEY", "secret")]
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
        for (k, v) in pairs {
            map.insert((*k).to_owned(), (*v).to_owned());
        }
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_documented_table() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.audio_gen.base_url.as_str(), "http://audio-generation-factory:3000/");
        assert!(s.audio_gen.cleanup_temp_audio);
        assert_eq!(s.s3.bucket, "audio-assets");
        assert_eq!(s.s3.presigned_url_expiry, Duration::from_secs(604_800));
        assert_eq!(s.worker.prefetch, 16);
        assert_eq!(s.worker.retry_max_attempts, 5);
        assert_eq!(s.worker.retry_max_elapsed, Duration::from_secs(120));
        let minutes = |m: u64| Duration::from_secs(60 * m);
        assert_eq!(
            s.worker.retry_schedule,
            [Duration::from_secs(5), Duration::from_secs(30), minutes(2), minutes(10), minutes(30)]
        );
        assert_eq!(s.mongo.server_selection_timeout, Duration::from_secs(5));
        assert_eq!(s.mongo.collection, "audio_assets");
        assert_eq!(s.amqp.job_queue, "audio.save");
        assert_eq!(s.amqp.dead_letter_queue, "audio.save.dlq");
        assert_eq!(s.amqp.events_exchange, "audio.events");
        assert_eq!(s.amqp.consumer_timeout, Duration::from_secs(1800));
        assert_eq!(s.amqp.delivery_limit, 5);
        assert_eq!(s.worker.job_deadline, Duration::from_secs(1500));
        assert_eq!(s.audio_gen.min_bytes_per_sec, 1024);
        assert_eq!(s.mongo.operation_timeout, Duration::from_secs(30));
    }

    #[test]
    fn amqp_url_takes_a_list_of_nodes_and_checks_each() {
        let s =
            settings(&[("AMQP_URL", "amqp://u:p@rabbit-0:5672/%2f, amqp://u:p@rabbit-1:5673/%2f")]).unwrap();
        assert_eq!(s.amqp.nodes, ["amqp://u:p@rabbit-0:5672/%2f", "amqp://u:p@rabbit-1:5673/%2f"]);
        for bad in
            ["amqp://u:p@a:5672/%2f,", "amqp://u:p@a:5672/%2f,http://b", "amqp://u:p@a:5672/%2f,amqp://b:x"]
        {
            let err = settings(&[("AMQP_URL", bad)]).unwrap_err();
            assert_eq!(err.var, "AMQP_URL", "{bad}");
            assert!(err.message.starts_with("entry 2"), "{bad}: {err}");
            assert!(!err.to_string().contains(":p@"), "password shown: {err}");
        }
    }

    #[test]
    fn the_job_deadline_must_fit_under_the_consumer_timeout() {
        let err = settings(&[("JOB_DEADLINE_SECS", "1700")]).unwrap_err();
        assert_eq!(err.var, "JOB_DEADLINE_SECS");
        assert!(err.message.contains("AMQP_CONSUMER_TIMEOUT_SECS (1800 s)"), "{err}");
        let err = settings(&[("AMQP_CONSUMER_TIMEOUT_SECS", "600")]).unwrap_err();
        assert_eq!(err.var, "JOB_DEADLINE_SECS", "the default deadline does not fit a 10 min timeout");
        let s = settings(&[("AMQP_CONSUMER_TIMEOUT_SECS", "600"), ("JOB_DEADLINE_SECS", "480")]).unwrap();
        assert_eq!(s.worker.job_deadline, Duration::from_secs(480));
    }

    #[test]
    fn expiry_above_seven_days_is_a_start_up_error() {
        let err = settings(&[("PRESIGNED_URL_EXPIRY_SECS", "604801")]).unwrap_err();
        assert_eq!(err.var, "PRESIGNED_URL_EXPIRY_SECS");
        assert!(err.to_string().contains("604800"), "{err}");
        assert_eq!(
            settings(&[("PRESIGNED_URL_EXPIRY_SECS", "3600")]).unwrap().s3.presigned_url_expiry,
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        for (var, value) in [
            ("WORKER_PREFETCH", "0"),
            ("WORKER_PREFETCH", "lots"),
            ("CLEANUP_TEMP_AUDIO", "maybe"),
            ("AUDIO_GENERATION_SERVICE_URL", "not a url"),
            ("S3_ENDPOINT", "ftp://x"),
            ("S3_BUCKET", "Audio_Assets"),
            ("AMQP_JOB_QUEUE", "amq.reserved"),
            ("RETRY_SCHEDULE", "5s,soon"),
            ("RETRY_SCHEDULE", "0s"),
            ("AMQP_URL", "http://rabbit:5672"),
            ("MONGODB_URI", "mongodb+srv://cluster.example"),
            ("WORKER_TMP_DIR", "/nonexistent/spool"),
        ] {
            let err = settings(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var, "{value}");
        }
        let mut map = HashMap::new();
        map.insert("S3_ACCESS_KEY_ID".to_owned(), "k".to_owned());
        let err = Settings::from_lookup(|k| map.get(k).cloned()).unwrap_err();
        assert_eq!(err.var, "S3_SECRET_ACCESS_KEY");
    }

    #[test]
    fn the_retry_schedule_can_be_changed_or_turned_off() {
        let s = settings(&[("RETRY_SCHEDULE", "100ms, 1s")]).unwrap();
        assert_eq!(s.worker.retry_schedule, [Duration::from_millis(100), Duration::from_secs(1)]);
        assert!(settings(&[("RETRY_SCHEDULE", "none")]).unwrap().worker.retry_schedule.is_empty());
    }

    #[test]
    fn cleanup_can_be_turned_off() {
        assert!(!settings(&[("CLEANUP_TEMP_AUDIO", "false")]).unwrap().audio_gen.cleanup_temp_audio);
    }

    #[test]
    fn describe_masks_secrets() {
        let s = settings(&[
            ("AMQP_URL", "amqp://user:hunter2@rabbit:5672/%2f"),
            ("MONGODB_URI", "mongodb://admin:hunter2@mongo:27017"),
        ])
        .unwrap();
        let text = format!("{:?}", s.describe());
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("\"secret\""), "{text}");
        assert!(text.contains("amqp://user:****@rabbit:5672/%2f"), "{text}");
    }

    #[test]
    fn credentials_can_come_from_secret_files_and_are_masked() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, content: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            path.display().to_string()
        };
        let amqp = write("amqp", "amqp://app:amqp-pass@rabbit:5672/%2f\n");
        let mongo = write("mongo", "mongodb://app:mongo-pass@mongo:27017\n");
        let secret = write("s3", "s3-secret-value\r\n");
        let lookup = |name: &str| match name {
            "AMQP_URL_FILE" => Some(amqp.clone()),
            "MONGODB_URI_FILE" => Some(mongo.clone()),
            "S3_SECRET_ACCESS_KEY_FILE" => Some(secret.clone()),
            "S3_ACCESS_KEY_ID" => Some("key".into()),
            _ => None,
        };
        let s = Settings::from_lookup(lookup).unwrap();
        assert_eq!(s.amqp.nodes, ["amqp://app:amqp-pass@rabbit:5672/%2f"]);
        assert_eq!(s.mongo.uri, "mongodb://app:mongo-pass@mongo:27017");
        assert_eq!(s.s3.secret_access_key, "s3-secret-value");
        let shown = format!("{:?}", s.describe());
        for secret in ["amqp-pass", "mongo-pass", "s3-secret-value"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }

        let both = |name: &str| match name {
            "S3_SECRET_ACCESS_KEY" => Some("inline".into()),
            "S3_SECRET_ACCESS_KEY_FILE" => Some(secret.clone()),
            "S3_ACCESS_KEY_ID" => Some("key".into()),
            _ => None,
        };
        let err = Settings::from_lookup(both).unwrap_err();
        assert_eq!(err.var, "S3_SECRET_ACCESS_KEY_FILE");
        let missing = |name: &str| match name {
            "AMQP_URL_FILE" => Some("/nonexistent/amqp".into()),
            _ => None,
        };
        let err = Settings::from_lookup(missing).unwrap_err();
        assert_eq!(err.var, "AMQP_URL_FILE");
        assert!(err.to_string().contains("cannot read"), "{err}");
    }

    #[test]
    fn delivery_is_presigned_unless_set_and_each_mode_takes_only_its_settings() {
        let s = settings(&[]).unwrap();
        assert!(matches!(s.s3.delivery, Delivery::Presigned));
        assert!(s.describe().contains(&("DELIVERY", "presigned".into())));
        let s =
            settings(&[("DELIVERY", "public"), ("PUBLIC_BASE_URL", "https://cdn.example.com/a/")]).unwrap();
        assert!(
            matches!(&s.s3.delivery, Delivery::Public(base) if base.to_string() == "https://cdn.example.com/a")
        );
        for (pairs, var) in [
            (&[("DELIVERY", "s3")][..], "DELIVERY"),
            (&[("DELIVERY", "public")][..], "PUBLIC_BASE_URL"),
            (&[("DELIVERY", "public"), ("PUBLIC_BASE_URL", "cdn.example.com")][..], "PUBLIC_BASE_URL"),
            (&[("PUBLIC_BASE_URL", "https://cdn.example.com")][..], "PUBLIC_BASE_URL"),
            (
                &[
                    ("DELIVERY", "public"),
                    ("PUBLIC_BASE_URL", "https://c.example"),
                    ("DELIVERY_URL_EXPIRY_SECS", "60"),
                ][..],
                "DELIVERY_URL_EXPIRY_SECS",
            ),
            (&[("CLOUDFRONT_KEY_PAIR_ID", "K1")][..], "CLOUDFRONT_KEY_PAIR_ID"),
        ] {
            let err = settings(pairs).unwrap_err();
            assert_eq!(err.var, var, "{pairs:?}: {err}");
        }
    }

    #[test]
    fn a_cloudfront_key_that_cannot_be_used_stops_start_up_naming_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_key = dir.path().join("not-a-key.pem");
        std::fs::write(&not_a_key, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").unwrap();
        let cloudfront = |file: Option<&str>, expiry: &str| {
            let mut pairs = vec![
                ("DELIVERY", "cloudfront"),
                ("PUBLIC_BASE_URL", "https://d111111abcdef8.cloudfront.net"),
                ("CLOUDFRONT_KEY_PAIR_ID", "K2JCJMDEHXQW5F"),
                ("DELIVERY_URL_EXPIRY_SECS", expiry),
            ];
            pairs.extend(file.map(|f| ("CLOUDFRONT_PRIVATE_KEY_FILE", f)));
            settings(&pairs).unwrap_err()
        };
        let err = cloudfront(None, "600");
        assert_eq!(err.var, "CLOUDFRONT_PRIVATE_KEY_FILE");
        assert!(err.message.contains("required with DELIVERY=cloudfront"), "{err}");
        let err = cloudfront(Some("/nonexistent/cloudfront.pem"), "600");
        assert_eq!(err.var, "CLOUDFRONT_PRIVATE_KEY_FILE");
        assert!(err.message.contains("cannot read the key file"), "{err}");
        let err = cloudfront(Some(not_a_key.to_str().unwrap()), "600");
        assert_eq!(err.var, "CLOUDFRONT_PRIVATE_KEY_FILE");
        assert!(err.message.contains("does not hold an RSA private key"), "{err}");
        for expiry in ["0", "31536001"] {
            assert_eq!(cloudfront(Some(not_a_key.to_str().unwrap()), expiry).var, "DELIVERY_URL_EXPIRY_SECS");
        }
    }

    #[test]
    fn url_policy_hosts_are_read_and_default_to_the_generation_service() {
        let s = settings(&[("AUDIO_GENERATION_SERVICE_URL", "http://gen:3000/api")]).unwrap();
        let hosts = |h: &[HostRule]| h.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(hosts(s.audio_gen.url_policy.allowed_hosts()), ["gen:3000"]);
        assert_eq!(hosts(s.audio_gen.url_policy.private_hosts()), ["gen:3000"]);
        let s = settings(&[
            ("AUDIO_URL_ALLOWED_HOSTS", "gen:3000, cdn.example.com"),
            ("AUDIO_URL_PRIVATE_HOSTS", ""),
        ])
        .unwrap();
        assert_eq!(hosts(s.audio_gen.url_policy.allowed_hosts()), ["gen:3000", "cdn.example.com"]);
        let err = settings(&[("AUDIO_URL_ALLOWED_HOSTS", "http://x/")]).unwrap_err();
        assert_eq!(err.var, "AUDIO_URL_ALLOWED_HOSTS");
        assert_eq!(s.audio_gen.max_audio_bytes, 500 * 1024 * 1024);
    }
}
