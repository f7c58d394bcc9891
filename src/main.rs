//! `audio-worker`: the worker and its operator commands. Wiring only: telemetry, configuration,
//! then the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use audio_worker::config::{AmqpSettings, Settings};
use audio_worker::processor::Deps;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Files text-to-speech audio into the customer's audio library (S3 + MongoDB), fed by RabbitMQ.
/// Configuration comes from the environment; see README.md.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume `audio.save` jobs until SIGTERM or SIGINT.
    Run,
    /// Publish a job (from a JSON file or flags), as the audio-generation service does.
    Publish(Box<PublishArgs>),
    /// Print the effective configuration (secrets masked) and check RabbitMQ, S3 and MongoDB answer.
    CheckConfig,
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run => run().await,
            Command::Publish(args) => publish(*args).await,
            Command::CheckConfig => check_config().await,
        }
    });
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
    let settings = Settings::from_env()?;
    let deps = Arc::new(Deps::new(settings).await?);
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));
    audio_worker::amqp::consumer::run(deps, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Cancels `token` on SIGTERM or SIGINT.
async fn signal_shutdown(token: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    token.cancel();
}

async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let settings = AmqpSettings::from_env()?;
    let mut job = match &args.file {
        Some(path) if path.as_os_str() == "-" => serde_json::from_reader(std::io::stdin())
            .context("reading the job from standard input")?,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?
        }
        None => serde_json::json!({}),
    };
    let fields = job
        .as_object_mut()
        .context("the job must be a JSON object")?;
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
    fields
        .entry("asset_id")
        .or_insert_with(|| uuid::Uuid::new_v4().to_string().into());
    let body = serde_json::to_vec(&job)?;
    let reply =
        audio_worker::producer::publish(&settings, &body, args.wait.map(Duration::from_secs))
            .await?;
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

async fn check_config() -> anyhow::Result<ExitCode> {
    let settings = Settings::from_env()?;
    for (var, value) in settings.describe() {
        println!("{var}={value}");
    }
    let mut healthy = true;
    let amqp =
        lapin::Connection::connect(&settings.amqp.url, lapin::ConnectionProperties::default())
            .await;
    healthy &= report(
        "RabbitMQ",
        amqp.as_ref().map(|_| ()).map_err(ToString::to_string),
    );
    let deps = Deps::new(settings).await?;
    let s3 = tokio::time::timeout(Duration::from_secs(15), deps.store.ensure_bucket()).await;
    healthy &= report("S3", flatten(s3));
    let mongo = tokio::time::timeout(Duration::from_secs(15), deps.catalog.ensure_indexes()).await;
    healthy &= report("MongoDB", flatten(mongo));
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn flatten<E: ToString>(
    r: Result<Result<(), E>, tokio::time::error::Elapsed>,
) -> Result<(), String> {
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
