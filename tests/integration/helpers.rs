//! Spawns a worker in process against the real services (RabbitMQ, s3s-fs, SecantusDB started by
//! `scripts/services.sh`), with its own queue, exchange, bucket and database names per test, and
//! an in-process stand-in for the audio-generation service. The worker is built and run by
//! `startup::Application`, as `audio-worker run` does; the test reads S3 and MongoDB with
//! clients of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use audio_worker::amqp::topology;
use audio_worker::config::{S3Settings, Settings};
use audio_worker::processor::Deps;
use audio_worker::standin::Standin;
use audio_worker::startup::Application;
use aws_sdk_s3::operation::get_object::GetObjectOutput;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use mongodb::bson::Document;
use tokio_util::sync::CancellationToken;

/// Generous bound for anything a test waits for; a hang fails the test instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(30);

/// The worker's clients and the services' side of a test, without any broker: its own bucket,
/// database and stand-in, and the worker's `Deps` built by `Application::build`. Enough to run
/// `processor::handle` on a job.
pub struct Stages {
    pub settings: Settings,
    /// The worker's environment: what a worker process is started with.
    pub env: HashMap<String, String>,
    /// The worker's clients, from `Application::build`.
    pub deps: Arc<Deps>,
    pub standin: Arc<Standin>,
    /// The test's own S3 client, for reading back what the worker stored.
    s3: aws_sdk_s3::Client,
    /// The test's own handle on the worker's collection.
    collection: mongodb::Collection<Document>,
    _audio_dir: tempfile::TempDir,
}

/// A running worker with its own topology, bucket and database.
pub struct TestApp {
    stages: Stages,
    /// Publishes jobs and reads the DLQ.
    pub channel: Channel,
    /// Every event the worker publishes (bound to `audio.#`).
    events: Consumer,
    connection: Connection,
    shutdown: CancellationToken,
    /// The in-process worker, when the test did not ask for none.
    worker: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl std::ops::Deref for TestApp {
    type Target = Stages;

    fn deref(&self) -> &Stages {
        &self.stages
    }
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
    spawn(overrides, true).await
}

/// Everything but the worker: the test starts worker processes itself.
pub async fn spawn_app_without_worker(overrides: &[(&str, &str)]) -> TestApp {
    spawn(overrides, false).await
}

async fn spawn(overrides: &[(&str, &str)], in_process_worker: bool) -> TestApp {
    let (stages, app) = build(overrides).await;
    let shutdown = app.shutdown_token();
    let (connection, channel, events) = connect(&stages.settings).await;
    let worker = in_process_worker.then(|| tokio::spawn(app.run_until_stopped()));
    TestApp { stages, channel, events, connection, shutdown, worker }
}

/// The stages and their services, no broker: `processor::handle` can run on a job. The bucket and
/// the catalog index are made here, as start-up would.
pub async fn spawn_stages(overrides: &[(&str, &str)]) -> Stages {
    let (stages, _app) = build(overrides).await;
    stages.deps.store.ensure_bucket().await.expect("bucket");
    stages.deps.catalog.ensure_indexes().await.expect("index");
    stages
}

/// The stand-in, the settings and the worker built by `Application::build` (not running).
async fn build(overrides: &[(&str, &str)]) -> (Stages, Application) {
    init_logs();
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let audio_dir = tempfile::tempdir().expect("audio dir");
    let standin = Standin::new(audio_dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind stand-in");
    let standin_base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(audio_worker::standin::serve(listener, standin.clone(), std::future::pending()));

    // Every setting the worker reads, so a worker process does not depend on the test's
    // environment.
    let mut env: HashMap<String, String> = [
        ("AMQP_URL", env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")),
        ("AMQP_JOB_EXCHANGE", format!("t-{id}.jobs")),
        ("AMQP_JOB_QUEUE", format!("t-{id}.audio.save")),
        ("AMQP_DEAD_LETTER_EXCHANGE", format!("t-{id}.dlx")),
        ("AMQP_DEAD_LETTER_QUEUE", format!("t-{id}.audio.save.dlq")),
        ("AMQP_EVENTS_EXCHANGE", format!("t-{id}.events")),
        ("AMQP_EVENTS_QUEUE", format!("t-{id}.events.all")),
        ("AMQP_URL_REFRESH_QUEUE", format!("t-{id}.url.refresh")),
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
        ("WORKER_TMP_DIR", std::env::temp_dir().display().to_string()),
        // Worker processes of one test must not fight over :9090.
        ("METRICS_ADDR", "127.0.0.1:0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    // `{standin}` in an override stands for the stand-in's `host:port`, known only from here.
    let standin_authority = standin_base.trim_start_matches("http://").to_owned();
    for (k, v) in overrides {
        env.insert((*k).to_owned(), v.replace("{standin}", &standin_authority));
    }
    let settings = Settings::from_lookup(|k| env.get(k).cloned()).expect("test settings");
    let app = Application::build(settings.clone()).await.expect("build the worker");
    let deps = app.deps().clone();
    let s3 = s3_client(&settings.s3);
    let mongo = mongodb::Client::with_uri_str(&settings.mongo.uri).await.expect("MongoDB client");
    let collection = mongo.database(&settings.mongo.database).collection(&settings.mongo.collection);
    (Stages { settings, env, deps, standin, s3, collection, _audio_dir: audio_dir }, app)
}

/// An S3 client like the worker's (path-style, the test's credentials), made here so that reading
/// objects back is the test's business, not the worker's.
fn s3_client(settings: &S3Settings) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let credentials = Credentials::new(
        settings.access_key_id.clone(),
        settings.secret_access_key.clone(),
        None,
        None,
        "tests",
    );
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(settings.endpoint.as_str().trim_end_matches('/'))
        .region(Region::new(settings.region.clone()))
        .credentials_provider(credentials)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// The test's own connection: a channel for publishing and reading the DLQ, and a consumer of
/// the events queue. The topology is declared here too (idempotent) so the events queue exists
/// before the first job.
async fn connect(settings: &Settings) -> (Connection, Channel, Consumer) {
    let connection = Connection::connect(&settings.amqp.nodes[0], ConnectionProperties::default())
        .await
        .expect("AMQP (is scripts/services.sh up?)");
    let channel = connection.create_channel().await.unwrap();
    topology::declare(&connection, &settings.amqp, &settings.worker.retry_schedule).await.expect("topology");
    let events = channel
        .basic_consume(
            settings.amqp.events_queue.clone().unwrap().as_str().into(),
            "".into(),
            // Acked one by one as the test reads them: deliveries still buffered when the
            // connection drops go back to the queue instead of vanishing.
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (connection, channel, events)
}

/// A worker running as its own process (`audio-worker run`), killed when dropped.
pub struct WorkerProcess {
    pub child: std::process::Child,
}

impl WorkerProcess {
    /// Sends SIGTERM.
    pub fn terminate(&self) {
        signal(self.child.id(), "TERM");
    }

    /// Sends SIGKILL: no chance to ack, nack or close anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `limit` for the process to exit; its exit status.
    pub async fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "worker process did not exit within {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, name: &str) {
    let status =
        std::process::Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill -{name} {pid}");
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
    /// Starts `audio-worker run` as a process with the test's environment plus `extra`.
    pub fn start_worker_process(&self, extra: &[(&str, &str)]) -> WorkerProcess {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_audio-worker"));
        command.arg("run").env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
        command.envs(&self.env).envs(extra.iter().copied());
        command.env("RUST_LOG", std::env::var("WORKER_LOG").unwrap_or_else(|_| "warn".into()));
        command.stdout(std::process::Stdio::null());
        if std::env::var("WORKER_LOG").is_err() {
            command.stderr(std::process::Stdio::null());
        }
        WorkerProcess { child: command.spawn().expect("start audio-worker") }
    }

    /// Like [`TestApp::start_worker_process`], with the worker's log (JSON lines at `level`)
    /// written to `log`.
    pub fn start_worker_process_logging(
        &self,
        extra: &[(&str, &str)],
        level: &str,
        log: &std::path::Path,
    ) -> WorkerProcess {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_audio-worker"));
        command.arg("run").env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
        command.envs(&self.env).envs(extra.iter().copied()).env("RUST_LOG", level);
        command.stdout(std::process::Stdio::null()).stderr(std::fs::File::create(log).unwrap());
        WorkerProcess { child: command.spawn().expect("start audio-worker") }
    }

    /// Opens the test's connection again (after a broker restart).
    pub async fn reconnect(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut node = 0;
        loop {
            // Each attempt starts at the next node of AMQP_URL, as the worker does.
            node += 1;
            let attempt = tokio::time::timeout(Duration::from_secs(12), async {
                let (connection, _) = audio_worker::amqp::connect(&self.settings.amqp.nodes, "tests", node)
                    .await
                    .map_err(|e| lapin::Error::from(std::io::Error::other(e.to_string())))?;
                let channel = connection.create_channel().await?;
                let events = channel
                    .basic_consume(
                        self.settings.amqp.events_queue.clone().unwrap().as_str().into(),
                        "".into(),
                        // Acked one by one as the test reads them: deliveries still buffered when the
                        // connection drops go back to the queue instead of vanishing.
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                Ok::<_, lapin::Error>((connection, channel, events))
            })
            .await;
            if let Ok(Ok((connection, channel, events))) = attempt {
                (self.connection, self.channel, self.events) = (connection, channel, events);
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "could not reconnect to the broker");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Messages ready in `queue` (0 when it does not exist).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.unwrap();
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let depth = match channel.queue_declare(queue.into(), passive, FieldTable::default()).await {
            Ok(q) => q.message_count(),
            Err(_) => 0,
        };
        let _ = channel.close(200, "".into()).await;
        depth
    }

    /// Publishes a raw body to the job exchange, as a producer would.
    pub async fn publish_raw(&self, body: &[u8], properties: BasicProperties) {
        self.publish_to(&self.settings.amqp.job_queue.clone(), body, properties).await;
    }

    /// Publishes `body` to the job exchange with `routing_key` (a batch, a URL refresh
    /// request), confirmed.
    pub async fn publish_to(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        self.channel
            .basic_publish(
                self.settings.amqp.job_exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                body,
                properties.with_content_type("application/json".into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Publishes a persistent message straight into `queue` (the default exchange), as the
    /// broker's own dead-lettering would put it there: no failure headers.
    pub async fn publish_to_queue(&self, queue: &str, body: &[u8]) {
        let properties = BasicProperties::default().with_delivery_mode(2);
        self.channel
            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, properties)
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// A private queue (exclusive, deleted with the connection) to name as `reply_to`, and a
    /// consumer of it.
    pub async fn reply_queue(&self) -> (String, Consumer) {
        let exclusive =
            lapin::options::QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let queue = self.channel.queue_declare("".into(), exclusive, FieldTable::default()).await.unwrap();
        let no_ack = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
        let consumer = self
            .channel
            .basic_consume(queue.name().clone(), "".into(), no_ack, FieldTable::default())
            .await
            .unwrap();
        (queue.name().as_str().to_owned(), consumer)
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
        delivery.ack(lapin::options::BasicAckOptions::default()).await.expect("ack event");
        ReceivedEvent {
            routing_key: delivery.routing_key.as_str().to_owned(),
            properties: delivery.properties.clone(),
            json: serde_json::from_slice(&delivery.data).expect("event is JSON"),
        }
    }

    /// Collects events until `assets` distinct asset ids have one, reconnecting when the broker
    /// went away. Returns every event per asset id (duplicates included).
    pub async fn outcomes(&mut self, assets: usize, limit: Duration) -> HashMap<String, Vec<ReceivedEvent>> {
        self.outcomes_by(|e| e.json["asset_id"].as_str().unwrap_or_default().to_owned(), assets, limit).await
    }

    /// Collects events until `count` distinct keys (`key` of each event) have one, reconnecting
    /// when the broker went away. Returns every event per key (duplicates included).
    pub async fn outcomes_by(
        &mut self,
        key: impl Fn(&ReceivedEvent) -> String,
        count: usize,
        limit: Duration,
    ) -> HashMap<String, Vec<ReceivedEvent>> {
        let mut out: HashMap<String, Vec<ReceivedEvent>> = HashMap::new();
        let deadline = tokio::time::Instant::now() + limit;
        while out.len() < count {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "only {} of {count} had an outcome", out.len());
            match tokio::time::timeout(left.min(Duration::from_secs(5)), self.events.next()).await {
                Ok(Some(Ok(delivery))) => {
                    if delivery.ack(lapin::options::BasicAckOptions::default()).await.is_err() {
                        // Not acked: it is delivered again after the reconnect.
                        continue;
                    }
                    let event = ReceivedEvent {
                        routing_key: delivery.routing_key.as_str().to_owned(),
                        properties: delivery.properties.clone(),
                        json: serde_json::from_slice(&delivery.data).expect("event is JSON"),
                    };
                    out.entry(key(&event)).or_default().push(event);
                }
                Ok(Some(Err(_)) | None) => self.reconnect().await,
                Err(_) => {}
            }
        }
        out
    }

    /// Every further event until none has come for `quiet` (late duplicates).
    pub async fn more_events(&mut self, quiet: Duration) -> Vec<ReceivedEvent> {
        let mut out = Vec::new();
        while let Ok(Some(Ok(delivery))) = tokio::time::timeout(quiet, self.events.next()).await {
            let _ = delivery.ack(lapin::options::BasicAckOptions::default()).await;
            out.push(ReceivedEvent {
                routing_key: delivery.routing_key.as_str().to_owned(),
                properties: delivery.properties.clone(),
                json: serde_json::from_slice(&delivery.data).expect("event is JSON"),
            });
        }
        out
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

    /// Stops the worker, checks it ended cleanly, and deletes the test's queues, database and bucket.
    pub async fn teardown(self) {
        let Self { stages, channel, connection, shutdown, worker, .. } = self;
        shutdown.cancel();
        if let Some(worker) = worker {
            let result =
                tokio::time::timeout(WAIT, worker).await.expect("worker stops").expect("worker task");
            result.expect("worker ended with an error");
        }
        let a = &stages.settings.amqp;
        let delay_queues = (1..=stages.settings.worker.retry_schedule.len())
            .flat_map(|n| [topology::delay_queue(a, n), topology::delay_queue_of(&a.batch_items_queue(), n)]);
        let queues = [
            a.job_queue.clone(),
            a.dead_letter_queue.clone(),
            a.events_queue.clone().unwrap(),
            a.batch_queue(),
            a.batch_items_queue(),
            a.batch_progress_queue(),
            a.url_refresh_queue.clone(),
        ];
        for q in queues.into_iter().chain(delay_queues) {
            let _ = channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
        }
        for e in [&a.job_exchange, &a.dead_letter_exchange, &a.events_exchange] {
            let _ = channel.exchange_delete(e.as_str().into(), Default::default()).await;
        }
        stages.teardown().await;
        let _ = connection.close(200, "test done".into()).await;
    }
}

impl Stages {
    /// Writes `bytes` as `filename` in the stand-in's folder.
    pub fn add_audio(&self, filename: &str, bytes: &[u8]) {
        std::fs::write(self.standin.dir().join(filename), bytes).unwrap();
    }

    /// The asset's document.
    pub async fn document(&self, asset_id: &str) -> Option<Document> {
        self.collection.find_one(mongodb::bson::doc! { "asset_id": asset_id }).await.unwrap()
    }

    /// The worker's batches collection (`audio_batches`, beside the assets).
    pub async fn batches(&self) -> mongodb::Collection<Document> {
        let mongo = mongodb::Client::with_uri_str(&self.settings.mongo.uri).await.expect("MongoDB client");
        mongo.database(&self.settings.mongo.database).collection("audio_batches")
    }

    /// Number of documents for the asset.
    pub async fn document_count(&self, asset_id: &str) -> u64 {
        self.collection.count_documents(mongodb::bson::doc! { "asset_id": asset_id }).await.unwrap()
    }

    /// The worker's collection, read with the test's own client.
    pub fn collection(&self) -> &mongodb::Collection<Document> {
        &self.collection
    }

    /// Reads an object of the test's bucket back whole: its bytes and the response (content
    /// type, metadata). An error names the S3 failure (e.g. `NoSuchKey`).
    pub async fn get_object(&self, key: &str) -> Result<(Vec<u8>, GetObjectOutput), String> {
        let mut output = self
            .s3
            .get_object()
            .bucket(&self.settings.s3.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| aws_sdk_s3::error::DisplayErrorContext(e).to_string())?;
        let body = std::mem::replace(&mut output.body, aws_sdk_s3::primitives::ByteStream::from_static(b""));
        let bytes = body.collect().await.map_err(|e| e.to_string())?;
        Ok((bytes.into_bytes().to_vec(), output))
    }

    /// Every key in the test's bucket, all pages.
    pub async fn list_all_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let output = self
                .s3
                .list_objects_v2()
                .bucket(&self.settings.s3.bucket)
                .set_continuation_token(token)
                .send()
                .await
                .unwrap();
            keys.extend(output.contents().iter().filter_map(|o| o.key().map(str::to_owned)));
            match output.next_continuation_token() {
                Some(next) if output.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => return keys,
            }
        }
    }

    /// Writes `bytes` at `key` in the test's bucket with `metadata`, as something other than the
    /// worker would (a stray upload, a changed object).
    pub async fn put_object(&self, key: &str, bytes: &[u8], metadata: HashMap<String, String>) {
        self.s3
            .put_object()
            .bucket(&self.settings.s3.bucket)
            .key(key)
            .body(bytes.to_vec().into())
            .set_metadata(Some(metadata))
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {key}: {}", aws_sdk_s3::error::DisplayErrorContext(e)));
    }

    /// Deletes the object at `key` of the test's bucket.
    pub async fn delete_object(&self, key: &str) {
        self.s3
            .delete_object()
            .bucket(&self.settings.s3.bucket)
            .key(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("DELETE {key}: {}", aws_sdk_s3::error::DisplayErrorContext(e)));
    }

    /// The keys in the test's bucket (the first 1000): what tests check nothing was left with.
    pub async fn list_keys(&self) -> Result<Vec<String>, String> {
        let output = self
            .s3
            .list_objects_v2()
            .bucket(&self.settings.s3.bucket)
            .send()
            .await
            .map_err(|e| aws_sdk_s3::error::DisplayErrorContext(e).to_string())?;
        Ok(output.contents().iter().filter_map(|o| o.key().map(str::to_owned)).collect())
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

    /// Deletes the test's database (the bucket stays: s3s-fs keeps it in its folder).
    pub async fn teardown(self) {
        let _ = self.collection.drop().await;
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
