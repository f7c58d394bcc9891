//! Spawns a worker in process against the real services (RabbitMQ, s3s-fs, SecantusDB started by
//! `scripts/services.sh`), with its own queue, exchange, bucket and database names per test, and
//! an in-process stand-in for the audio-generation service.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use audio_worker::amqp::topology;
use audio_worker::config::Settings;
use audio_worker::processor::Deps;
use audio_worker::standin::Standin;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use tokio_util::sync::CancellationToken;

/// Generous bound for anything a test waits for; a hang fails the test instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(30);

/// A running worker with its own topology, bucket and database.
pub struct TestApp {
    pub settings: Settings,
    pub deps: Arc<Deps>,
    pub standin: Arc<Standin>,
    /// Publishes jobs and reads the DLQ.
    pub channel: Channel,
    /// Every event the worker publishes (bound to `audio.#`).
    events: Consumer,
    connection: Connection,
    shutdown: CancellationToken,
    worker: tokio::task::JoinHandle<anyhow::Result<()>>,
    _audio_dir: tempfile::TempDir,
}

/// An event as received: routing key, properties and JSON.
#[derive(Debug)]
pub struct ReceivedEvent {
    pub routing_key: String,
    pub properties: BasicProperties,
    pub json: serde_json::Value,
}

pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Spawns a worker with the default test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Spawns a worker; `overrides` are extra environment variables for its settings.
pub async fn spawn_app_with(overrides: &[(&str, &str)]) -> TestApp {
    init_logs();
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let audio_dir = tempfile::tempdir().expect("audio dir");
    let standin = Standin::new(audio_dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind stand-in");
    let standin_base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(audio_worker::standin::serve(listener, standin.clone(), std::future::pending()));

    let mut env: HashMap<String, String> = [
        ("AMQP_URL", env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")),
        ("AMQP_JOB_EXCHANGE", format!("t-{id}.jobs")),
        ("AMQP_JOB_QUEUE", format!("t-{id}.audio.save")),
        ("AMQP_DEAD_LETTER_EXCHANGE", format!("t-{id}.dlx")),
        ("AMQP_DEAD_LETTER_QUEUE", format!("t-{id}.audio.save.dlq")),
        ("AMQP_EVENTS_EXCHANGE", format!("t-{id}.events")),
        ("AMQP_EVENTS_QUEUE", format!("t-{id}.events.all")),
        ("S3_ENDPOINT", env_or("S3_ENDPOINT", "http://127.0.0.1:9000")),
        ("S3_ACCESS_KEY_ID", env_or("S3_ACCESS_KEY_ID", "audioworker")),
        ("S3_SECRET_ACCESS_KEY", env_or("S3_SECRET_ACCESS_KEY", "audioworker-secret")),
        ("S3_BUCKET", format!("t-{id}")),
        ("MONGODB_URI", env_or("MONGODB_URI", "mongodb://127.0.0.1:27017")),
        ("MONGODB_DATABASE", format!("t_{id}")),
        ("AUDIO_GENERATION_SERVICE_URL", standin_base.clone()),
        ("RETRY_INITIAL_DELAY_MS", "20".into()),
        ("DOWNLOAD_READ_TIMEOUT_SECS", "2".into()),
        ("SHUTDOWN_GRACE_SECS", "5".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (k, v) in overrides {
        env.insert((*k).to_owned(), (*v).to_owned());
    }
    let settings = Settings::from_lookup(|k| env.get(k).cloned()).expect("test settings");
    let deps = Arc::new(Deps::new(settings.clone()).await.expect("deps"));

    let connection = Connection::connect(&settings.amqp.url, ConnectionProperties::default())
        .await
        .expect("AMQP (is scripts/services.sh up?)");
    let channel = connection.create_channel().await.unwrap();
    // Declared here too (idempotent) so the events queue exists before the first job.
    topology::declare(&channel, &settings.amqp, &settings.worker.retry_schedule).await.expect("topology");
    let events = channel
        .basic_consume(
            settings.amqp.events_queue.clone().unwrap().as_str().into(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();

    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(audio_worker::amqp::consumer::run(deps.clone(), shutdown.clone()));
    TestApp { settings, deps, standin, channel, events, connection, shutdown, worker, _audio_dir: audio_dir }
}

fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var("TEST_LOG").is_ok() {
            tracing_subscriber::fmt().with_env_filter("info,audio_worker=debug").with_test_writer().init();
        }
    });
}

impl TestApp {
    /// Writes `bytes` as `filename` in the stand-in's folder.
    pub fn add_audio(&self, filename: &str, bytes: &[u8]) {
        std::fs::write(self.standin.dir().join(filename), bytes).unwrap();
    }

    /// Publishes a raw body to the job exchange, as a producer would.
    pub async fn publish_raw(&self, body: &[u8], properties: BasicProperties) {
        self.channel
            .basic_publish(
                self.settings.amqp.job_exchange.as_str().into(),
                self.settings.amqp.job_queue.as_str().into(),
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                body,
                properties.with_content_type("application/json".into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Publishes a job's JSON.
    pub async fn publish(&self, job: &serde_json::Value) {
        self.publish_raw(&serde_json::to_vec(job).unwrap(), BasicProperties::default()).await;
    }

    /// The next event, or a panic after [`WAIT`].
    pub async fn next_event(&mut self) -> ReceivedEvent {
        let delivery = tokio::time::timeout(WAIT, self.events.next())
            .await
            .expect("no event in time")
            .expect("events consumer closed")
            .expect("events delivery");
        ReceivedEvent {
            routing_key: delivery.routing_key.as_str().to_owned(),
            properties: delivery.properties.clone(),
            json: serde_json::from_slice(&delivery.data).expect("event is JSON"),
        }
    }

    /// Takes every message now in the dead-letter queue (they are removed).
    pub async fn drain_dlq(&self) -> Vec<lapin::message::BasicGetMessage> {
        let mut out = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(self.settings.amqp.dead_letter_queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push(message);
        }
        out
    }

    /// The asset's document.
    pub async fn document(&self, asset_id: &str) -> Option<mongodb::bson::Document> {
        self.deps.catalog.collection().find_one(mongodb::bson::doc! { "asset_id": asset_id }).await.unwrap()
    }

    /// Number of documents for the asset.
    pub async fn document_count(&self, asset_id: &str) -> u64 {
        self.deps
            .catalog
            .collection()
            .count_documents(mongodb::bson::doc! { "asset_id": asset_id })
            .await
            .unwrap()
    }

    /// Waits until the stand-in has seen `n` requests of `method` for `filename`.
    pub async fn wait_for_requests(&self, method: &str, filename: &str, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.standin.count(method, filename) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "stand-in never saw {n} {method} {filename}: {:?}",
                self.standin.seen()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the worker, checks it ended cleanly, and deletes the test's queues, database and bucket.
    pub async fn teardown(self) {
        self.shutdown.cancel();
        let result =
            tokio::time::timeout(WAIT, self.worker).await.expect("worker stops").expect("worker task");
        result.expect("worker ended with an error");
        let a = &self.settings.amqp;
        let delay_queues =
            (1..=self.settings.worker.retry_schedule.len()).map(|n| topology::delay_queue(a, n));
        let queues = [a.job_queue.clone(), a.dead_letter_queue.clone(), a.events_queue.clone().unwrap()];
        for q in queues.into_iter().chain(delay_queues) {
            let _ = self.channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
        }
        for e in [&a.job_exchange, &a.dead_letter_exchange, &a.events_exchange] {
            let _ = self.channel.exchange_delete(e.as_str().into(), Default::default()).await;
        }
        let _ = self.deps.catalog.collection().drop().await;
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

/// A real PCM WAV: `seconds` of a 440 Hz tone, 16-bit mono at 16 kHz.
pub fn wav_tone(seconds: f64) -> Vec<u8> {
    let rate: u32 = 16_000;
    let samples = (f64::from(rate) * seconds) as u32;
    let data_len = samples * 2;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for i in 0..samples {
        let t = f64::from(i) / f64::from(rate);
        let v = ((t * 440.0 * std::f64::consts::TAU).sin() * 12_000.0) as i16;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// A complete job for `audio_url`, with a fresh asset id.
pub fn job(audio_url: &str) -> serde_json::Value {
    serde_json::json!({
        "asset_id": uuid::Uuid::new_v4().to_string(),
        "customer_id": "cust_42",
        "user_id": "user-7",
        "audio_url": audio_url,
        "text": "Hello from the test suite",
        "duration": 1.5,
        "voice": "en-US-Neural-A",
        "voice_name": "Zoë",
        "language": "en-US",
        "speed": 1.25,
        "model": "tts-hd",
        "folder": "greetings",
        "tags": ["test", "hello"],
        "producer_extra": "ignored"
    })
}
