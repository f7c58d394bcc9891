//! `audio-worker`: the worker and its operator commands. Wiring only: telemetry, configuration,
//! then the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use audio_worker::config::{AmqpSettings, Settings};
use audio_worker::error::Stage;
use audio_worker::startup::{Application, build_deps};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Files text-to-speech audio into the customer's audio library (S3 + MongoDB), fed by RabbitMQ.
/// Configuration comes from the environment; see README.md.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume `audio.save` jobs until SIGTERM or SIGINT.
    ///
    /// Configuration comes from environment variables (AMQP_URL, S3_*, MONGODB_*,
    /// AUDIO_GENERATION_SERVICE_URL, WORKER_PREFETCH, RETRY_*, ...): see the Configuration table
    /// in README.md, or `audio-worker check-config` for the effective values.
    Run,
    /// Publish a job (from a JSON file or flags), as the audio-generation service does.
    Publish(Box<PublishArgs>),
    /// Print the effective configuration (secrets masked) and check that RabbitMQ, the
    /// audio-generation service, S3 and MongoDB answer (read-only: nothing is created).
    CheckConfig,
    /// Publish a batch of jobs (`schemas/save-audio-batch.v1.json`) from a JSON file, as the
    /// audio-generation service does; with `--wait`, print its `audio.batch.completed`.
    PublishBatch {
        /// The batch's JSON; `-` reads standard input. A missing `batch_id` gets a new one.
        #[arg(long)]
        file: PathBuf,
        /// Wait up to this many seconds for the batch's `audio.batch.completed` (through
        /// `reply_to`) and print it; exit 1 unless its status is `completed`.
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// Print fresh URLs for a saved asset (its audio, waveform and renditions), as an
    /// `audio.url.refresh` request would answer; exit 1 when the tenant has no such asset.
    Url {
        /// The asset's UUID.
        asset_id: String,
        /// The tenant the asset belongs to: another tenant's asset is not found.
        #[arg(long)]
        customer_id: String,
        /// The owner within the tenant.
        #[arg(long)]
        user_id: String,
    },
    /// Inspect and replay dead-lettered jobs (`audio.save.dlq`).
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Check the library against its catalog: every saved document's audio and derived files
    /// (waveform, renditions) exist with the recorded size and SHA-256 (read from the bytes),
    /// and every object under `{customer_id}/{user_id}/audio/` belongs to a saved document.
    ///
    /// Prints one line per problem (kind, key, asset_id, detail), then
    /// `checked N, ok N, missing N, mismatched N, orphans N`; a progress bar on stderr when it
    /// is a terminal. Saves in flight (a document holding a save lease) are reported as
    /// `in_flight`, not counted as problems, and never fixed. Reads S3 and MongoDB settings
    /// from the environment, like `run`.
    ///
    /// Exit status: 0 when no problem is found (or left: orphans deleted by `--fix-orphans`
    /// no longer count), 1 when a missing, mismatched or orphaned object is, 2 when the audit
    /// could not finish (S3 or MongoDB unreachable or refusing, bad configuration,
    /// `--fix-orphans` without `--yes`).
    Audit(AuditArgs),
    /// Serve the operator console: queue depths, the last hour's outcomes and the replicas
    /// seen, the dead letters (filtered, paged, each with its job, headers and `audio.failed`
    /// event), and their replay, edit-then-replay and purge, on server-rendered pages.
    ///
    /// Listens on CONSOLE_ADDR (default 127.0.0.1:8090); operators log in with CONSOLE_TOKEN (or
    /// CONSOLE_TOKEN_FILE); CONSOLE_READ_ONLY=true refuses every action; RABBITMQ_MANAGEMENT_URL
    /// reads queue depths from the management API. RabbitMQ, S3 and MongoDB come from the same
    /// variables as `run`. Stops on SIGTERM/SIGINT.
    Console,
}

#[derive(Args)]
struct AuditArgs {
    /// Only this customer's documents and objects (keys under `{customer_id}/`).
    #[arg(long)]
    customer_id: Option<String>,
    /// Delete the orphans found that are older than --min-age (needs --yes). Never deletes a
    /// missing or mismatched object's key, nor anything of a save in flight.
    #[arg(long)]
    fix_orphans: bool,
    /// Confirms --fix-orphans: deleted objects cannot be brought back.
    #[arg(long)]
    yes: bool,
    /// Print one JSON object instead: `summary` (every count), `problems` (the findings, at most
    /// --max-listed, each `kind`, `key`, `asset_id`, `detail`, `deleted`) and `unlisted`.
    #[arg(long)]
    json: bool,
    /// Compare sizes and the objects' `sha256` metadata instead of reading every byte (an
    /// object without that metadata, a multipart upload, is still read). Much faster, but blind
    /// to bytes changed under unchanged metadata.
    #[arg(long)]
    quick: bool,
    /// Documents checked (and orphans deleted) at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    concurrency: u16,
    /// Orphans written less than this long ago are reported but never deleted (a save may be
    /// writing them), e.g. `10m`, `1h`, `0s`.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    min_age: Duration,
    /// At most this many problems listed (lines, or the JSON `problems`); the counts cover all,
    /// and memory holds no more than these.
    #[arg(long, default_value_t = 1000)]
    max_listed: usize,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first: asset_id, stage, attempts, age, reason.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter (by asset_id or message_id): the job and every failure header.
    Show {
        /// asset_id or message_id.
        id: String,
    },
    /// Move matching dead letters back to the job queue (attempt counter reset).
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many moved.
        #[arg(long)]
        limit: Option<usize>,
        /// At most this many moved per second, e.g. `10/s` or `10`.
        #[arg(long, value_parser = audio_worker::dlq::parse_rate)]
        rate: Option<f64>,
        /// Show what would move; move nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete matching dead letters for good.
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many deleted.
        #[arg(long)]
        limit: Option<usize>,
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
struct FilterArgs {
    /// Only this asset.
    #[arg(long)]
    asset_id: Option<String>,
    /// Only jobs that failed at this stage (parse, download, upload, catalog, publish).
    #[arg(long, value_parser = str::parse::<Stage>)]
    stage: Option<Stage>,
    /// Only jobs whose reason contains this text (case-insensitive).
    #[arg(long)]
    reason_contains: Option<String>,
    /// Only jobs that failed at least this long ago, e.g. `10m`, `2h`.
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
    /// Only jobs that failed at most this long ago, e.g. `1h`.
    #[arg(long, value_parser = humantime::parse_duration)]
    newer_than: Option<Duration>,
    /// Only this tenant's jobs (`customer_id` in the job).
    #[arg(long)]
    customer_id: Option<String>,
}

impl From<FilterArgs> for audio_worker::dlq::Filter {
    fn from(a: FilterArgs) -> Self {
        Self {
            asset_id: a.asset_id,
            stage: a.stage,
            reason_contains: a.reason_contains,
            older_than: a.older_than,
            newer_than: a.newer_than,
            customer_id: a.customer_id,
            ..Self::default()
        }
    }
}

#[derive(Args)]
struct PublishArgs {
    /// The job's JSON; `-` reads standard input. Flags below override its fields.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Asset UUID (default: a new random one when neither the file nor this sets it).
    #[arg(long)]
    asset_id: Option<String>,
    #[arg(long)]
    customer_id: Option<String>,
    #[arg(long)]
    user_id: Option<String>,
    /// Relative (`/temp/x.wav`) or absolute URL of the audio.
    #[arg(long)]
    audio_url: Option<String>,
    #[arg(long)]
    text: Option<String>,
    /// Seconds.
    #[arg(long)]
    duration: Option<f64>,
    #[arg(long)]
    voice: Option<String>,
    #[arg(long)]
    voice_name: Option<String>,
    #[arg(long)]
    language: Option<String>,
    #[arg(long)]
    speed: Option<f64>,
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    folder: Option<String>,
    /// Repeat for several tags.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Wait up to this many seconds for the job's `audio.saved`/`audio.failed` event (through
    /// `reply_to`) and print it; exit 1 if it is `audio.failed` or does not come.
    #[arg(long, value_name = "SECS")]
    wait: Option<u64>,
}

fn main() -> ExitCode {
    audio_worker::telemetry::init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run => run().await,
            Command::Publish(args) => publish(*args).await,
            Command::CheckConfig => check_config().await,
            Command::PublishBatch { file, wait } => publish_batch(&file, wait).await,
            Command::Url { asset_id, customer_id, user_id } => url(asset_id, customer_id, user_id).await,
            Command::Dlq(command) => dlq(command).await,
            Command::Audit(args) => audit(args).await,
            Command::Console => console().await,
        }
    });
    audio_worker::telemetry::shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "audio-worker failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<ExitCode> {
    let app = Application::build(Settings::from_env()?).await?;
    tokio::spawn(signal_shutdown(app.shutdown_token()));
    app.run_until_stopped().await?;
    Ok(ExitCode::SUCCESS)
}

/// Cancels `token` on SIGTERM or SIGINT.
async fn signal_shutdown(token: CancellationToken) {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    token.cancel();
}

async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let settings = AmqpSettings::from_env()?;
    let mut job = match &args.file {
        Some(path) if path.as_os_str() == "-" => {
            serde_json::from_reader(std::io::stdin()).context("reading the job from standard input")?
        }
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?
        }
        None => serde_json::json!({}),
    };
    let fields = job.as_object_mut().context("the job must be a JSON object")?;
    let mut set = |key: &str, value: Option<serde_json::Value>| {
        if let Some(value) = value {
            fields.insert(key.to_owned(), value);
        }
    };
    set("asset_id", args.asset_id.map(Into::into));
    set("customer_id", args.customer_id.map(Into::into));
    set("user_id", args.user_id.map(Into::into));
    set("audio_url", args.audio_url.map(Into::into));
    set("text", args.text.map(Into::into));
    set("duration", args.duration.map(Into::into));
    set("voice", args.voice.map(Into::into));
    set("voice_name", args.voice_name.map(Into::into));
    set("language", args.language.map(Into::into));
    set("speed", args.speed.map(Into::into));
    set("model", args.model.map(Into::into));
    set("folder", args.folder.map(Into::into));
    if !args.tags.is_empty() {
        set("tags", Some(args.tags.into()));
    }
    fields.entry("asset_id").or_insert_with(|| uuid::Uuid::new_v4().to_string().into());
    let body = serde_json::to_vec(&job)?;
    let reply = audio_worker::producer::publish(&settings, &body, args.wait.map(Duration::from_secs)).await?;
    eprintln!("published job {}", job["asset_id"]);
    match reply {
        None => {
            println!("{}", serde_json::to_string_pretty(&job)?);
            Ok(ExitCode::SUCCESS)
        }
        Some(reply) => {
            println!("{}", serde_json::to_string_pretty(&reply.event)?);
            Ok(if reply.kind == audio_worker::events::SAVED_ROUTING_KEY {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

async fn publish_batch(path: &std::path::Path, wait: Option<u64>) -> anyhow::Result<ExitCode> {
    let settings = AmqpSettings::from_env()?;
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the batch from standard input")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    let mut batch: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let fields = batch.as_object_mut().context("the batch must be a JSON object")?;
    fields.entry("batch_id").or_insert_with(|| uuid::Uuid::new_v4().to_string().into());
    let body = serde_json::to_vec(&batch)?;
    let routing_key = settings.batch_queue();
    let wait = wait.map(Duration::from_secs);
    let reply = audio_worker::producer::publish_to(&settings, &routing_key, &body, wait).await?;
    eprintln!("published batch {}", batch["batch_id"]);
    match reply {
        None => Ok(ExitCode::SUCCESS),
        Some(reply) => {
            println!("{}", serde_json::to_string_pretty(&reply.event)?);
            Ok(if reply.event["status"] == "completed" { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

async fn url(asset_id: String, customer_id: String, user_id: String) -> anyhow::Result<ExitCode> {
    let deps = build_deps(Settings::from_env()?).await?;
    let request = audio_worker::refresh::RefreshRequest { asset_id, customer_id, user_id };
    let reply = audio_worker::refresh::answer(&deps.catalog, &deps.store, &request).await;
    deps.catalog.shutdown().await;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    Ok(if reply.status == "ok" { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn dlq(command: DlqCommand) -> anyhow::Result<ExitCode> {
    use audio_worker::dlq;
    let settings = AmqpSettings::from_env()?;
    match command {
        DlqCommand::List { limit, json } => {
            let dead = dlq::list(&settings, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&dead)?);
            } else {
                let now = chrono::Utc::now();
                println!("{:<36}  {:<8}  {:>8}  {:>8}  REASON", "ASSET_ID", "STAGE", "ATTEMPTS", "AGE");
                for d in &dead {
                    let age = d
                        .age(now)
                        .map(|a| humantime::format_duration(Duration::from_secs(a.as_secs())).to_string());
                    let reason: String =
                        d.failure.reason.as_deref().unwrap_or("-").chars().take(100).collect();
                    println!(
                        "{:<36}  {:<8}  {:>8}  {:>8}  {}",
                        d.asset_id.as_deref().unwrap_or("-"),
                        d.failure.stage.as_deref().unwrap_or("-"),
                        d.failure.attempts.map_or("-".into(), |a| a.to_string()),
                        age.as_deref().unwrap_or("-"),
                        reason
                    );
                }
                eprintln!("{} dead letter(s) shown", dead.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show { id } => match dlq::show(&settings, &id).await? {
            Some(dead) => {
                println!("{}", serde_json::to_string_pretty(&dead)?);
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("no dead letter with asset_id or message_id {id}");
                Ok(ExitCode::FAILURE)
            }
        },
        DlqCommand::Replay { filter, limit, rate, dry_run } => {
            let policy = audio_worker::config::url_policy_from_env()?;
            let options = dlq::ReplayOptions { filter: filter.into(), limit, rate, dry_run, stop: None };
            let bar = indicatif::ProgressBar::new_spinner();
            if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let summary = dlq::replay(&settings, &policy, &options, |seen, s| {
                bar.set_message(format!(
                    "scanned {seen}: moved {}, skipped {}, failed {}",
                    s.moved, s.skipped, s.failed
                ));
                bar.tick();
            })
            .await?;
            bar.finish_and_clear();
            let verb = if dry_run { "would move" } else { "moved" };
            println!("{verb} {}, skipped {}, failed {}", summary.moved, summary.skipped, summary.failed);
            Ok(if summary.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        DlqCommand::Purge { filter, limit, yes } => {
            anyhow::ensure!(yes, "purge deletes dead letters for good: add --yes");
            let summary = dlq::purge(&settings, &filter.into(), limit).await?;
            println!("purged {}, kept {}", summary.moved, summary.skipped);
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn console() -> anyhow::Result<ExitCode> {
    use audio_worker::console::{self, Console, ConsoleSettings};
    let settings = Settings::from_env()?;
    let console_settings = ConsoleSettings::from_env()?;
    let addr = console_settings.addr;
    let read_only = console_settings.read_only;
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("CONSOLE_ADDR: binding {addr}"))?;
    let state = Console::build(settings, console_settings).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));
    tracing::info!(addr = %listener.local_addr()?, read_only, "serving the operator console");
    eprintln!("operator console on http://{}/ (log in with CONSOLE_TOKEN)", listener.local_addr()?);
    console::serve(listener, state, shutdown).await.context("serving the console")?;
    Ok(ExitCode::SUCCESS)
}

/// The `audit` command; its own errors end with status 2 (1 means problems found).
async fn audit(args: AuditArgs) -> anyhow::Result<ExitCode> {
    match run_audit(args).await {
        Ok(code) => Ok(code),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "audit failed");
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

async fn run_audit(args: AuditArgs) -> anyhow::Result<ExitCode> {
    use audio_worker::audit::{self, AuditOptions, Pass};
    anyhow::ensure!(
        !args.fix_orphans || args.yes,
        "--fix-orphans deletes objects for good: add --yes (without --fix-orphans the audit only reports)"
    );
    let settings = Settings::from_env()?;
    let store = audio_worker::pipeline::store::Store::new(&settings.s3);
    let catalog =
        audio_worker::pipeline::catalog::Catalog::connect(&settings.mongo).await.context("MONGODB_URI")?;
    let options = AuditOptions {
        customer_id: args.customer_id,
        quick: args.quick,
        concurrency: usize::from(args.concurrency),
        fix_orphans: args.fix_orphans,
        min_age: args.min_age,
        max_listed: args.max_listed,
    };
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{spinner} {pos}/{len} {msg} [{elapsed}]")
            .expect("a valid template"),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let result = audit::run(&store, &catalog, settings.mongo.operation_timeout, &options, |pass, s| {
        let counts = format!("missing {}, mismatched {}, orphans {}", s.missing, s.mismatched, s.orphans);
        match pass {
            Pass::Documents { total } => {
                bar.set_length(total);
                bar.set_position(s.documents);
                bar.set_message(format!("documents; {counts}"));
            }
            Pass::Objects => {
                bar.set_position(bar.length().unwrap_or_default());
                bar.set_message(format!("documents; {} objects listed; {counts}", s.listed));
                bar.tick();
            }
        }
    })
    .await;
    bar.finish_and_clear();
    catalog.shutdown().await;
    let report = result?;
    let s = &report.summary;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.problems {
            let asset_id = p.asset_id.as_deref().unwrap_or("-");
            println!("{:<10}  {}  {asset_id}  {}", p.kind.as_str(), p.key, p.detail);
        }
        if report.unlisted > 0 {
            println!("({} more not listed: --max-listed {})", report.unlisted, args.max_listed);
        }
        if s.in_flight > 0 {
            println!("in flight {} (saves not committed yet: not problems, never fixed)", s.in_flight);
        }
        if args.fix_orphans {
            println!("deleted {} of {} orphans", s.deleted, s.orphans);
        }
        println!("{}", s.line());
    }
    Ok(if s.problems_left() == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn check_config() -> anyhow::Result<ExitCode> {
    let settings = Settings::from_env()?;
    for (var, value) in settings.describe() {
        println!("{var}={value}");
    }
    for warning in settings.s3.credential_warnings(chrono::Utc::now()) {
        println!("warning: {warning}");
    }
    let mut healthy = true;
    let amqp = audio_worker::amqp::connect(&settings.amqp.nodes, "audio-worker check-config", 0).await;
    healthy &= report("RabbitMQ", amqp.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")));
    let base = settings.audio_gen.base_url.clone();
    let events_queue = settings.amqp.events_queue.clone();
    let deps = build_deps(settings).await?;
    // Any HTTP answer, even 404, shows the generation service is there.
    let probe = tokio::time::timeout(Duration::from_secs(10), deps.http.get(base.clone()).send()).await;
    healthy &= report(
        "audio-generation service",
        match probe {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("{base}: {}", audio_worker::error::chain(&e))),
            Err(_) => Err(format!("{base}: timed out")),
        },
    );
    // Read-only checks: the worker creates the bucket and the index at start-up, not this.
    let s3 = tokio::time::timeout(Duration::from_secs(15), deps.store.head_bucket()).await;
    healthy &= report("S3", flatten(s3));
    let mongo = tokio::time::timeout(Duration::from_secs(15), deps.catalog.ping()).await;
    healthy &= report("MongoDB", flatten(mongo));
    deps.catalog.shutdown().await;
    if events_queue.is_none() {
        println!(
            "note  AMQP_EVENTS_QUEUE is unset: audio.saved events are published `mandatory`, so some queue \
             (the api-server's) must be bound to the events exchange or every job is retried and dead-lettered"
        );
    }
    Ok(if healthy { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn flatten<E: ToString>(r: Result<Result<(), E>, tokio::time::error::Elapsed>) -> Result<(), String> {
    match r {
        Ok(inner) => inner.map_err(|e| e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

fn report(service: &str, result: Result<(), String>) -> bool {
    match result {
        Ok(()) => {
            println!("ok    {service}");
            true
        }
        Err(e) => {
            println!("FAIL  {service}: {e}");
            false
        }
    }
}
