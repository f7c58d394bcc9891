//! Throughput bench: the release `audio-worker` against a "floor" that does the same I/O by hand.
//!
//! Run it with `scripts/bench.sh` (it builds, starts the services and writes
//! `docs/benchmarks.md`), or directly: `cargo bench --bench throughput -- [--quick] [--sizes
//! 100K,1M] [--concurrency 1,16] [--jobs N] [--no-big] [--out FILE]`.
//!
//! For every file size × concurrency cell:
//! - **worker**: a fresh `audio-worker run` process (`WORKER_PREFETCH` = concurrency) with its own
//!   queues, exchanges, bucket and database, fed by the `audio-gen-standin` process. First a
//!   closed loop keeps `concurrency` jobs in flight (latency publish → `audio.saved`), then a
//!   backlog of N jobs is published at once (jobs/s from the first publish to the last event,
//!   CPU of the worker process from `/proc/<pid>/stat`, stage means from its `/metrics`).
//! - **floor**: `concurrency` tasks in this process doing what a job needs and nothing more: GET
//!   from the stand-in streamed to a temporary file while hashing (SHA-256), `put_object` from
//!   the file, one `update_one` upsert. Jobs/s, per-job latency, CPU of this process.
//!
//! - **python**: the same jobs through `benches/python_worker.py`, the design's service as a
//!   Python team would write it (pika, requests, boto3, pymongo), `concurrency` processes with
//!   prefetch 1 each: CPU and peak RSS are summed over its processes.
//!
//! Then the scaling run (1, 2 and 4 worker processes on one queue, the same total prefetch),
//! one worker job on a 500 MiB file for the peak RSS, and the cost of the physical limit measured
//! on this machine (one SHA-256 pass plus the copies a job cannot avoid). `cargo test
//! --all-targets` builds this target too and runs it without `--bench`: it then returns at once.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use mongodb::bson::{Document, doc};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

const MIB: u64 = 1 << 20;
/// The worker's default `MAX_AUDIO_BYTES`.
const DEFAULT_MAX_AUDIO_BYTES: u64 = 500 * MIB;
/// The targets of issue 13: jobs/s ÷ floor at 1 MiB × 16 and at 50 MiB × 16, CPU per job ÷ the
/// Python baseline at 1 MiB × 16, CPU per MiB at 50 MiB (ms, and ÷ the hash-plus-copy cost), and
/// peak RSS.
const TARGET_RATIO_1M: f64 = 0.95;
const TARGET_RATIO_50M: f64 = 0.85;
const TARGET_CPU_VS_PYTHON: f64 = 0.15;
const TARGET_CPU_MS_PER_MIB: f64 = 1.5;
const TARGET_CPU_VS_PHYSICAL: f64 = 1.5;
const TARGET_RSS_MIB: f64 = 64.0;
/// A phase fails when no event arrives for this long.
const EVENT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Parser, Debug)]
#[command(about = "audio-worker throughput bench (see scripts/bench.sh)")]
struct Opts {
    /// Passed by `cargo bench`; without it (as under `cargo test`) nothing runs.
    #[arg(long, hide = true)]
    bench: bool,
    /// Fewer jobs per cell (about a quarter).
    #[arg(long)]
    quick: bool,
    /// File sizes (K/M/G = KiB/MiB/GiB).
    #[arg(long, value_delimiter = ',', default_value = "100K,1M,50M", value_parser = parse_size)]
    sizes: Vec<u64>,
    /// Concurrencies: WORKER_PREFETCH for the worker, tasks for the floor.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    concurrency: Vec<usize>,
    /// Jobs per cell (throughput phase and floor), instead of the per-size defaults.
    #[arg(long)]
    jobs: Option<usize>,
    /// Jobs of the worker's closed-loop latency phase per cell (default: max(concurrency, jobs/4)).
    #[arg(long)]
    latency_jobs: Option<usize>,
    /// Size of the single-file run (peak RSS).
    #[arg(long, default_value = "500M", value_parser = parse_size)]
    big_size: u64,
    /// Skip the single-file run.
    #[arg(long)]
    no_big: bool,
    /// Also write the results (Markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where `audio-worker` and `audio-gen-standin` are (default: the directory above this
    /// bench's executable, i.e. target/release).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Folder for the generated WAVs and the spool files (default: the system temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Serve the audio with the `audio-gen-standin` binary as it is. By default the bench serves
    /// it with the same stand-in code (`audio_worker::standin::router`) in a child process of its
    /// own with TCP_NODELAY set: the binary's responses stall ~40 ms on reused connections
    /// (Nagle's algorithm against delayed ACKs), which would swamp small files.
    #[arg(long)]
    standin_binary: bool,
    /// Internal: be that child process, serving this folder.
    #[arg(long, hide = true, requires = "standin_listen")]
    serve_standin: Option<PathBuf>,
    /// Internal: where that child process listens.
    #[arg(long, hide = true)]
    standin_listen: Option<String>,
    /// Skip the Python baseline in each cell.
    #[arg(long)]
    no_python: bool,
    /// The Python that runs `benches/python_worker.py` (with pika, requests, boto3 and pymongo;
    /// scripts/bench.sh installs them in the tools venv).
    #[arg(long, env = "BENCH_PYTHON", default_value = "python3")]
    python: PathBuf,
    /// Worker processes of the scaling run, on one queue with the same total prefetch
    /// (`--scaling-concurrency`). 1 reuses the cell's run when there is one.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    replicas: Vec<usize>,
    /// Skip the scaling run.
    #[arg(long)]
    no_scaling: bool,
    /// Skip the run with `ANALYSIS=on`.
    #[arg(long)]
    no_analysis: bool,
    /// Run the worker of every cell with `ANALYSIS=on` (scripts/profile.sh --analysis).
    #[arg(long)]
    analysis_in_cells: bool,
    /// Skip the runs with the waveform and renditions on (the everything-on row and the big
    /// file's second run).
    #[arg(long)]
    no_renditions: bool,
    /// File size of the scaling run.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    scaling_size: u64,
    /// Total prefetch of the scaling run, split evenly over the replicas.
    #[arg(long, default_value = "16")]
    scaling_concurrency: usize,
}

fn parse_size(raw: &str) -> Result<u64, String> {
    let s = raw.trim().to_ascii_uppercase();
    let s = s.trim_end_matches("IB").trim_end_matches('B');
    let (number, unit) = match s.chars().last() {
        Some('K') => (&s[..s.len() - 1], 1 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    match number.parse::<f64>() {
        Ok(n) if n > 0.0 && (n * unit as f64) >= 1024.0 => Ok((n * unit as f64) as u64),
        _ => Err(format!("{raw:?} is not a size of at least 1K like 100K, 1M, 50M")),
    }
}

fn size_label(size: u64) -> String {
    if size >= MIB && size.is_multiple_of(MIB) {
        format!("{} MiB", size / MIB)
    } else if size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn default_jobs(size: u64, concurrency: usize) -> usize {
    match size {
        s if s <= 256 * 1024 => 300,
        s if s <= 4 * MIB => 200,
        s if s <= 16 * MIB => 40.max(2 * concurrency),
        _ => 6.max(2 * concurrency),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        println!("throughput bench: skipped (not started by `cargo bench`; run scripts/bench.sh)");
        return ExitCode::SUCCESS;
    }
    let opts = Opts::parse();
    if let (Some(dir), Some(listen)) = (&opts.serve_standin, &opts.standin_listen) {
        return match serve_standin(dir, listen).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("stand-in failed: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(opts).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned())
}

/// The shared services, from the same variables (and defaults) as the tests.
#[derive(Debug, Clone)]
struct Services {
    amqp_url: String,
    s3_endpoint: String,
    s3_key: String,
    s3_secret: String,
    mongo_uri: String,
}

impl Services {
    fn from_env() -> Self {
        Self {
            amqp_url: env_or("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            s3_endpoint: env_or("S3_ENDPOINT", "http://127.0.0.1:9000"),
            s3_key: env_or("S3_ACCESS_KEY_ID", "audioworker"),
            s3_secret: env_or("S3_SECRET_ACCESS_KEY", "audioworker-secret"),
            mongo_uri: env_or("MONGODB_URI", "mongodb://127.0.0.1:27017"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /proc

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// A `Vm*` line of /proc/<pid>/status, in MiB.
fn vm_mib(pid: &str, key: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Resets this process's VmHWM to its current RSS (Linux ≥ 4.0).
fn reset_own_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// The services' own processes, found by their command lines, whose CPU time is read around
/// each phase: what the worker costs them compared with the floor.
#[derive(Debug, Default, Clone)]
struct ServicePids {
    rabbitmq: Option<String>,
    mongo: Option<String>,
    s3: Option<String>,
}

fn port_of(url: &str) -> Option<String> {
    let rest = url.split("://").nth(1)?;
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit('@').next()?;
    host_port.rsplit_once(':').map(|(_, p)| p.to_owned())
}

impl ServicePids {
    fn find(services: &Services) -> Self {
        let mongo_port = port_of(&services.mongo_uri).unwrap_or_else(|| "27017".into());
        let s3_port = port_of(&services.s3_endpoint).unwrap_or_else(|| "9000".into());
        let mut found = Self::default();
        let Ok(entries) = std::fs::read_dir("/proc") else { return found };
        for entry in entries.flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else { continue };
            let args: Vec<String> =
                raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let has = |needle: &str| args.iter().any(|a| a.contains(needle));
            let port_arg = |port: &str| args.windows(2).any(|w| w[0] == "--port" && w[1] == port);
            if has("beam.smp") && has("/var/lib/rabbitmq") {
                found.rabbitmq.get_or_insert(pid);
            } else if has("secantus") && port_arg(&mongo_port) {
                found.mongo.get_or_insert(pid);
            } else if has("s3s-fs") && port_arg(&s3_port) {
                found.s3.get_or_insert(pid);
            }
        }
        found
    }

    fn sample(&self) -> [Option<u64>; 3] {
        [&self.rabbitmq, &self.mongo, &self.s3].map(|p| p.as_deref().and_then(cpu_ticks))
    }
}

/// CPU seconds per 1000 jobs between two samples.
fn per_thousand(before: Option<u64>, after: Option<u64>, jobs: usize, tck: f64) -> Option<f64> {
    let (b, a) = (before?, after?);
    Some(a.saturating_sub(b) as f64 / tck / jobs.max(1) as f64 * 1000.0)
}

// ---------------------------------------------------------------------------------------------
// Audio

/// A mono 16 kHz 16-bit PCM WAV of exactly `size` bytes (a 440 Hz tone); returns its duration.
fn write_wav(path: &Path, size: u64) -> anyhow::Result<f64> {
    use std::io::Write;
    let rate: u32 = 16_000;
    let data_len = (size - 44) & !1;
    let data_len32 = u32::try_from(data_len).context("WAV data over 4 GiB")?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    out.write_all(b"RIFF")?;
    out.write_all(&(36 + data_len32).to_le_bytes())?;
    out.write_all(b"WAVEfmt ")?;
    out.write_all(&16u32.to_le_bytes())?;
    out.write_all(&1u16.to_le_bytes())?; // PCM
    out.write_all(&1u16.to_le_bytes())?; // mono
    out.write_all(&rate.to_le_bytes())?;
    out.write_all(&(rate * 2).to_le_bytes())?;
    out.write_all(&2u16.to_le_bytes())?;
    out.write_all(&16u16.to_le_bytes())?;
    out.write_all(b"data")?;
    out.write_all(&data_len32.to_le_bytes())?;
    // One second holds exactly 440 periods: compute it once and repeat it.
    let second: Vec<u8> = (0..rate)
        .flat_map(|i| {
            let t = f64::from(i) / f64::from(rate);
            (((t * 440.0 * std::f64::consts::TAU).sin() * 12_000.0) as i16).to_le_bytes()
        })
        .collect();
    let mut left = data_len as usize;
    while left > 0 {
        let n = left.min(second.len());
        out.write_all(&second[..n])?;
        left -= n;
    }
    // An odd size: one pad byte after the data chunk, as RIFF wants.
    if size - 44 > data_len {
        out.write_all(&[0])?;
    }
    out.flush()?;
    Ok((data_len / 2) as f64 / f64::from(rate))
}

struct AudioFile {
    name: String,
    duration: f64,
}

// ---------------------------------------------------------------------------------------------
// Child processes

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn signal(pid: u32, sig: &str) {
    let _ = tokio::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().await;
}

/// Signals a child we started and waits for it (SIGKILL after `grace`).
async fn stop_child(child: &mut tokio::process::Child, sig: &str, grace: Duration) {
    if let Some(pid) = child.id() {
        signal(pid, sig).await;
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

struct Standin {
    child: tokio::process::Child,
    base: String,
}

/// The stand-in's routes (`audio_worker::standin`) on a listener that sets TCP_NODELAY.
async fn serve_standin(dir: &Path, listen: &str) -> anyhow::Result<()> {
    use axum::serve::ListenerExt;
    let listener = tokio::net::TcpListener::bind(listen).await?.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let state = audio_worker::standin::Standin::new(dir);
    axum::serve(listener, audio_worker::standin::router(state)).await?;
    Ok(())
}

async fn start_standin(opts: &Opts, bin_dir: &Path, dir: &Path, work: &Path) -> anyhow::Result<Standin> {
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let log_path = work.join("standin.log");
    let mut command = if opts.standin_binary {
        let mut c = tokio::process::Command::new(bin_dir.join("audio-gen-standin"));
        c.arg("--dir").arg(dir).arg("--listen").arg(&listen);
        c
    } else {
        let mut c = tokio::process::Command::new(std::env::current_exe()?);
        c.arg("--bench").arg("--serve-standin").arg(dir).arg("--standin-listen").arg(&listen);
        c
    };
    let child = command
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .kill_on_drop(true)
        .spawn()
        .context("starting audio-gen-standin")?;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if http.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(Standin { child, base });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("audio-gen-standin did not answer on {base}: {}", tail(&log_path, 20))
}

/// Everything a worker instance is given its own of.
#[derive(Debug, Clone)]
struct Names {
    job_exchange: String,
    job_queue: String,
    dead_letter_exchange: String,
    dead_letter_queue: String,
    events_exchange: String,
    events_queue: String,
    bucket: String,
    database: String,
}

impl Names {
    fn new(id: &str) -> Self {
        Self {
            job_exchange: format!("{id}.jobs"),
            job_queue: format!("{id}.audio.save"),
            dead_letter_exchange: format!("{id}.dlx"),
            dead_letter_queue: format!("{id}.audio.save.dlq"),
            events_exchange: format!("{id}.events"),
            events_queue: format!("{id}.events.all"),
            bucket: id.to_owned(),
            database: id.replace('-', "_"),
        }
    }
}

struct Worker {
    child: tokio::process::Child,
    pid: String,
    log: PathBuf,
    metrics: String,
}

struct Ctx {
    opts: Opts,
    services: Services,
    bin_dir: PathBuf,
    spool: PathBuf,
    work: PathBuf,
    standin_base: String,
    max_audio_bytes: u64,
    amqp: Connection,
    floor: Arc<Floor>,
    service_pids: ServicePids,
    tck: f64,
}

async fn start_worker(
    ctx: &Ctx,
    names: &Names,
    prefetch: usize,
    decode: Decode,
    tag: &str,
) -> anyhow::Result<Worker> {
    let metrics_port = free_port()?;
    let log = ctx.work.join(format!("worker-{tag}.log"));
    let stderr = std::fs::File::create(&log)?;
    let stdout = stderr.try_clone()?;
    let env: Vec<(&str, String)> = vec![
        ("AMQP_DEAD_LETTER_EXCHANGE", names.dead_letter_exchange.clone()),
        ("AMQP_DEAD_LETTER_QUEUE", names.dead_letter_queue.clone()),
        ("CLEANUP_TEMP_AUDIO", "false".into()),
        ("WORKER_PREFETCH", prefetch.to_string()),
        ("MAX_AUDIO_BYTES", ctx.max_audio_bytes.to_string()),
        ("METRICS_ADDR", format!("127.0.0.1:{metrics_port}")),
        ("SHUTDOWN_GRACE_SECS", "10".into()),
        ("RUST_LOG", env_or("BENCH_WORKER_RUST_LOG", "info")),
        // Off in the cells (the floor and the Python baseline do not decode either); the
        // analysis and everything-on runs turn them on.
        ("ANALYSIS", if decode == Decode::Off { "off" } else { "on" }.into()),
        ("WAVEFORM", if decode == Decode::Everything { "on" } else { "off" }.into()),
        ("RENDITIONS", if decode == Decode::Everything { "flac,vorbis" } else { "" }.into()),
    ];
    let env = service_env(ctx, names).into_iter().chain(env);
    let mut command = tokio::process::Command::new(ctx.bin_dir.join("audio-worker"));
    command.arg("run").env_clear();
    // Allocator tunables pass through, to compare peak RSS under other malloc settings.
    for key in ["PATH", "HOME", "LANG", "TZ", "GLIBC_TUNABLES", "MALLOC_ARENA_MAX"] {
        if let Ok(v) = std::env::var(key) {
            command.env(key, v);
        }
    }
    let mut child = command
        .envs(env)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .context("starting audio-worker run")?;
    let pid = child.id().context("worker pid")?.to_string();
    // scripts/profile.sh attaches `perf record` to this pid.
    self::log(format!("  worker pid {pid} ({tag})"));
    wait_consuming(&mut child, &log).await?;
    Ok(Worker { child, pid, log, metrics: format!("http://127.0.0.1:{metrics_port}/metrics") })
}

/// The variables the worker and the Python baseline share: the services and this run's names.
fn service_env(ctx: &Ctx, names: &Names) -> Vec<(&'static str, String)> {
    let s = &ctx.services;
    vec![
        ("AMQP_URL", s.amqp_url.clone()),
        ("AMQP_JOB_EXCHANGE", names.job_exchange.clone()),
        ("AMQP_JOB_QUEUE", names.job_queue.clone()),
        ("AMQP_EVENTS_EXCHANGE", names.events_exchange.clone()),
        ("AMQP_EVENTS_QUEUE", names.events_queue.clone()),
        ("S3_ENDPOINT", s.s3_endpoint.clone()),
        ("S3_ACCESS_KEY_ID", s.s3_key.clone()),
        ("S3_SECRET_ACCESS_KEY", s.s3_secret.clone()),
        ("S3_BUCKET", names.bucket.clone()),
        ("MONGODB_URI", s.mongo_uri.clone()),
        ("MONGODB_DATABASE", names.database.clone()),
        ("AUDIO_GENERATION_SERVICE_URL", ctx.standin_base.clone()),
        ("WORKER_TMP_DIR", ctx.spool.display().to_string()),
    ]
}

/// Starts process `index` of the Python baseline (benches/python_worker.py) with the worker's
/// variables; it declares the same queues and exchanges itself.
async fn start_python(ctx: &Ctx, names: &Names, tag: &str, index: usize) -> anyhow::Result<Worker> {
    let log = ctx.work.join(format!("python-{tag}-{index}.log"));
    let stderr = std::fs::File::create(&log)?;
    let stdout = stderr.try_clone()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/python_worker.py");
    let mut child = tokio::process::Command::new(&ctx.opts.python)
        .arg(&script)
        .env_clear()
        .envs(["PATH", "HOME", "LANG", "TZ"].into_iter().filter_map(|k| Some((k, std::env::var(k).ok()?))))
        .envs(service_env(ctx, names))
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} {}", ctx.opts.python.display(), script.display()))?;
    let pid = child.id().context("python pid")?.to_string();
    wait_consuming(&mut child, &log).await?;
    Ok(Worker { child, pid, log, metrics: String::new() })
}

/// Waits until the process logs that it is consuming.
async fn wait_consuming(child: &mut tokio::process::Child, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if std::fs::read_to_string(log).unwrap_or_default().contains("consuming") {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{} exited ({status}) before consuming:\n{}", log.display(), tail(log, 30));
        }
        if Instant::now() > deadline {
            bail!("{} did not start consuming within 90 s:\n{}", log.display(), tail(log, 30));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Who runs a phase's jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fleet {
    /// `replicas` `audio-worker run` processes on one queue, `WORKER_PREFETCH` = concurrency /
    /// replicas each, decoding as `decode` says.
    Rust { replicas: usize, decode: Decode },
    /// `concurrency` Python baseline processes, prefetch 1 each.
    Python,
}

/// What the worker decodes each take for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decode {
    /// `ANALYSIS=off WAVEFORM=off`, no renditions: measured only, like the floor.
    Off,
    /// `ANALYSIS=on`, no waveform or renditions.
    Analysis,
    /// `ANALYSIS=on WAVEFORM=on RENDITIONS=flac,vorbis`.
    Everything,
}

// ---------------------------------------------------------------------------------------------
// Jobs and events

fn job_body(asset_id: &str, audio: &AudioFile) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "asset_id": asset_id,
        "customer_id": "bench",
        "user_id": "bench_user",
        "audio_url": format!("/temp/{}", audio.name),
        "text": "A benchmark tone.",
        "duration": audio.duration,
        "voice": "tone",
        "voice_name": "440 Hz",
        "language": "en-US",
        "speed": 1.0,
        "model": "bench",
        "folder": "bench",
        "tags": ["bench"],
    }))
    .expect("json")
}

struct Event {
    asset_id: String,
    kind: String,
    reason: String,
    at: Instant,
}

/// Consumes the events queue on its own channel, timestamping each event as it arrives.
async fn consume_events(
    connection: &Connection,
    queue: &str,
) -> anyhow::Result<(Channel, mpsc::UnboundedReceiver<Event>)> {
    let channel = connection.create_channel().await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
            FieldTable::default(),
        )
        .await
        .context("consuming the events queue")?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let at = Instant::now();
            let value: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
            let text = |k: &str| value.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            let event = Event {
                asset_id: text("asset_id"),
                kind: text("event_type"),
                reason: format!("{} at stage {}", text("reason"), text("stage")),
                at,
            };
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    Ok((channel, rx))
}

struct Feed {
    publish: Channel,
    events: mpsc::UnboundedReceiver<Event>,
    events_channel: Channel,
    names: Names,
    confirms: Vec<lapin::PublisherConfirm>,
    sent: HashMap<String, Instant>,
}

impl Feed {
    async fn open(connection: &Connection, names: &Names) -> anyhow::Result<Self> {
        let publish = connection.create_channel().await?;
        publish.confirm_select(ConfirmSelectOptions::default()).await?;
        let (events_channel, events) = consume_events(connection, &names.events_queue).await?;
        Ok(Self {
            publish,
            events,
            events_channel,
            names: names.clone(),
            confirms: Vec::new(),
            sent: HashMap::new(),
        })
    }

    /// Publishes a job (persistent, mandatory); its confirm is checked in [`Feed::confirmed`].
    async fn publish(&mut self, audio: &AudioFile) -> anyhow::Result<()> {
        let asset_id = uuid::Uuid::new_v4().to_string();
        let body = job_body(&asset_id, audio);
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(asset_id.as_str().into());
        self.sent.insert(asset_id, Instant::now());
        let confirm = self
            .publish
            .basic_publish(
                self.names.job_exchange.as_str().into(),
                self.names.job_queue.as_str().into(),
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                &body,
                properties,
            )
            .await?;
        self.confirms.push(confirm);
        Ok(())
    }

    async fn confirmed(&mut self) -> anyhow::Result<()> {
        for confirm in self.confirms.drain(..) {
            match confirm.await? {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                other => bail!("a job was not accepted by the broker: {other:?}"),
            }
        }
        Ok(())
    }

    /// The next `audio.saved` of a job we published: its latency and arrival time.
    async fn next_saved(&mut self, worker_log: &Path) -> anyhow::Result<(Duration, Instant)> {
        loop {
            let event = tokio::time::timeout(EVENT_TIMEOUT, self.events.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "no event for {} s; worker log tail:\n{}",
                        EVENT_TIMEOUT.as_secs(),
                        tail(worker_log, 20)
                    )
                })?
                .context("the events consumer stopped")?;
            let Some(sent) = self.sent.remove(&event.asset_id) else { continue };
            if event.kind != "audio.saved" {
                bail!("job {} ended in {}: {}", event.asset_id, event.kind, event.reason);
            }
            return Ok((event.at.saturating_duration_since(sent), event.at));
        }
    }

    async fn close(self) {
        let _ = self.events_channel.close(200, "bench done".into()).await;
        let _ = self.publish.close(200, "bench done".into()).await;
    }
}

/// Sums and counts of the worker's stage histograms, by label value.
async fn scrape(http: &reqwest::Client, url: &str) -> HashMap<String, (f64, f64)> {
    let mut out: HashMap<String, (f64, f64)> = HashMap::new();
    let Ok(response) = http.get(url).send().await else { return out };
    let Ok(text) = response.text().await else { return out };
    for line in text.lines() {
        let (metric, is_sum) =
            if let Some(rest) = line.strip_prefix("audio_worker_stage_duration_seconds_sum") {
                (rest, true)
            } else if let Some(rest) = line.strip_prefix("audio_worker_stage_duration_seconds_count") {
                (rest, false)
            } else if let Some(rest) = line.strip_prefix("audio_worker_job_duration_seconds_sum") {
                (rest, true)
            } else if let Some(rest) = line.strip_prefix("audio_worker_job_duration_seconds_count") {
                (rest, false)
            } else {
                continue;
            };
        let label = if line.starts_with("audio_worker_job_") {
            if !metric.contains("outcome=\"saved\"") {
                continue;
            }
            "job".to_owned()
        } else {
            metric.split("stage=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?").to_owned()
        };
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        let entry = out.entry(label).or_default();
        if is_sum {
            entry.0 += value;
        } else {
            entry.1 += value;
        }
    }
    out
}

/// Mean milliseconds per label between two scrapes.
fn stage_means(
    before: &HashMap<String, (f64, f64)>,
    after: &HashMap<String, (f64, f64)>,
) -> HashMap<String, f64> {
    after
        .iter()
        .filter_map(|(k, (sum, count))| {
            let (sum0, count0) = before.get(k).copied().unwrap_or_default();
            let n = count - count0;
            (n > 0.0).then(|| (k.clone(), (sum - sum0) / n * 1000.0))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The floor

struct Floor {
    http: reqwest::Client,
    s3: aws_sdk_s3::Client,
    mongo: mongodb::Client,
    spool: PathBuf,
}

fn s3_client(services: &Services) -> aws_sdk_s3::Client {
    // The worker's settings (src/pipeline/store.rs): path-style, checksums only when required,
    // no SDK retries.
    let credentials =
        Credentials::new(services.s3_key.clone(), services.s3_secret.clone(), None, None, "bench");
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(services.s3_endpoint.trim_end_matches('/'))
        .region(Region::new("us-east-1"))
        .credentials_provider(credentials)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

#[derive(Default, Clone, Copy)]
struct FloorStages {
    download: Duration,
    upload: Duration,
    upsert: Duration,
}

impl Floor {
    /// One job by hand: download + hash to a spool file, put_object from it, upsert a document.
    async fn job(
        &self,
        url: &str,
        bucket: &str,
        collection: &mongodb::Collection<Document>,
    ) -> anyhow::Result<FloorStages> {
        let asset_id = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let response = self.http.get(url).send().await?.error_for_status()?;
        let (file, path) =
            tempfile::Builder::new().prefix("floor-").suffix(".part").tempfile_in(&self.spool)?.into_parts();
        let mut file = tokio::fs::File::from_std(file);
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        drop(file);
        let sha256 = hex::encode(hasher.finalize());
        let downloaded = Instant::now();

        let key = format!("bench/bench_user/audio/{asset_id}.wav");
        let output = self
            .s3
            .put_object()
            .bucket(bucket)
            .key(&key)
            .body(ByteStream::from_path(&path).await?)
            .content_length(i64::try_from(size)?)
            .content_type("audio/wav")
            .metadata("sha256", &sha256)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(&e)))?;
        drop(path);
        let uploaded = Instant::now();

        let now = mongodb::bson::DateTime::now();
        collection
            .update_one(
                doc! { "asset_id": &asset_id, "customer_id": "bench", "user_id": "bench_user" },
                doc! {
                    "$set": {
                        "status": "saved",
                        "storage": {
                            "bucket": bucket, "key": &key, "size": i64::try_from(size)?,
                            "content_type": "audio/wav", "etag": output.e_tag().unwrap_or_default(),
                        },
                        "checksum": { "sha256": &sha256 },
                        "tts": { "text": "A benchmark tone.", "voice": "tone", "voice_name": "440 Hz",
                                 "language": "en-US", "speed": 1.0, "model": "bench" },
                        "folder": "bench", "tags": ["bench"], "updated_at": now,
                    },
                    "$setOnInsert": { "created_at": now },
                    "$inc": { "version": 1_i64 },
                },
            )
            .upsert(true)
            .await?;
        let done = Instant::now();
        Ok(FloorStages {
            download: downloaded - started,
            upload: uploaded - downloaded,
            upsert: done - uploaded,
        })
    }
}

struct FloorRun {
    elapsed: Duration,
    latencies: Vec<Duration>,
    stages: FloorStages,
    cpu_per_1000: Option<f64>,
    peak_rss_mib: Option<f64>,
    services: [Option<f64>; 3],
}

async fn run_floor(
    ctx: &Ctx,
    audio: &AudioFile,
    jobs: usize,
    concurrency: usize,
    tag: &str,
) -> anyhow::Result<FloorRun> {
    let bucket = format!("{tag}-floor");
    let database = bucket.replace('-', "_");
    let floor = ctx.floor.clone();
    floor.s3.create_bucket().bucket(&bucket).send().await.map_err(|e| {
        anyhow::anyhow!("creating bucket {bucket}: {}", aws_sdk_s3::error::DisplayErrorContext(&e))
    })?;
    let collection = floor.mongo.database(&database).collection::<Document>("audio_assets");
    collection
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "asset_id": 1 })
                .options(mongodb::options::IndexOptions::builder().unique(true).build())
                .build(),
        )
        .await?;
    let url = format!("{}/temp/{}", ctx.standin_base, audio.name);
    let result = async {
        let next = Arc::new(AtomicUsize::new(0));
        reset_own_peak_rss();
        let services0 = ctx.service_pids.sample();
        let cpu0 = cpu_ticks("self");
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency.min(jobs) {
            let (floor, next, url, bucket, collection) =
                (floor.clone(), next.clone(), url.clone(), bucket.clone(), collection.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < jobs {
                    let t = Instant::now();
                    let stages = floor.job(&url, &bucket, &collection).await?;
                    out.push((t.elapsed(), stages));
                }
                anyhow::Ok(out)
            }));
        }
        let mut latencies = Vec::new();
        let mut stages = FloorStages::default();
        for task in tasks {
            for (latency, s) in task.await?? {
                latencies.push(latency);
                stages.download += s.download;
                stages.upload += s.upload;
                stages.upsert += s.upsert;
            }
        }
        let elapsed = started.elapsed();
        let cpu1 = cpu_ticks("self");
        let services1 = ctx.service_pids.sample();
        let n = latencies.len().max(1) as u32;
        let stages = FloorStages {
            download: stages.download / n,
            upload: stages.upload / n,
            upsert: stages.upsert / n,
        };
        anyhow::Ok(FloorRun {
            elapsed,
            latencies,
            stages,
            cpu_per_1000: per_thousand(cpu0, cpu1, jobs, ctx.tck),
            peak_rss_mib: vm_mib("self", "VmHWM"),
            services: [0, 1, 2].map(|i| per_thousand(services0[i], services1[i], jobs, ctx.tck)),
        })
    }
    .await;
    empty_bucket(&floor.s3, &bucket, true).await;
    let _ = floor.mongo.database(&database).drop().await;
    result
}

/// Deletes every object of `bucket` (and the bucket): the large cells would fill the disk.
async fn empty_bucket(s3: &aws_sdk_s3::Client, bucket: &str, delete_bucket: bool) {
    let mut token = None;
    loop {
        let Ok(page) = s3.list_objects_v2().bucket(bucket).set_continuation_token(token.take()).send().await
        else {
            break;
        };
        let keys: Vec<String> = page.contents().iter().filter_map(|o| o.key().map(str::to_owned)).collect();
        futures_util::stream::iter(keys)
            .for_each_concurrent(8, |key| async move {
                let _ = s3.delete_object().bucket(bucket).key(key).send().await;
            })
            .await;
        match page.next_continuation_token() {
            Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
            _ => break,
        }
    }
    if delete_bucket {
        let _ = s3.delete_bucket().bucket(bucket).send().await;
    }
}

// ---------------------------------------------------------------------------------------------
// A cell

struct WorkerRun {
    throughput_jobs: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    cpu_per_1000: Option<f64>,
    peak_rss_mib: Option<f64>,
    idle_rss_mib: Option<f64>,
    stages: HashMap<String, f64>,
    services: [Option<f64>; 3],
    warnings: usize,
}

struct Cell {
    size: u64,
    concurrency: usize,
    jobs: usize,
    worker: WorkerRun,
    floor: FloorRun,
    /// The Python baseline on the same jobs (`None` with `--no-python`).
    python: Option<WorkerRun>,
}

/// One row of the scaling run: `replicas` worker processes sharing the total prefetch.
struct ScaleRow {
    replicas: usize,
    jobs: usize,
    jobs_per_s: f64,
    cpu_per_1000: Option<f64>,
    peak_rss_mib: Option<f64>,
}

/// The scaling run: its rows and the floor they are compared with.
struct Scaling {
    size: u64,
    concurrency: usize,
    floor_jobs_per_s: f64,
    rows: Vec<ScaleRow>,
}

/// The physical limit on this machine, in CPU ms per MiB of a job's bytes: one SHA-256 pass (the
/// `sha2` crate, as the worker uses), and the copies no job can avoid: the download's receive and
/// the upload's send over loopback TCP, and the spool file's write and read back (page cache).
#[derive(Debug, Clone, Copy)]
struct Physical {
    sha256: f64,
    tcp: f64,
    file: f64,
}

impl Physical {
    fn total(&self) -> f64 {
        self.sha256 + self.tcp + self.file
    }
}

/// CPU time of the calling thread so far, in ns (`/proc/thread-self/schedstat`).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Measures [`Physical`] on 256 MiB (blocking; run on a blocking thread).
fn measure_physical(dir: &Path) -> anyhow::Result<Physical> {
    use std::io::{Read, Write};
    const MIBS: usize = 256;
    let per_mib = |ns: u64| ns as f64 / 1e6 / MIBS as f64;
    let block: Vec<u8> = (0..MIB as usize).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let t = thread_cpu_ns();
    let mut hasher = Sha256::new();
    for _ in 0..MIBS {
        hasher.update(&block);
    }
    std::hint::black_box(hasher.finalize());
    let sha256 = per_mib(thread_cpu_ns() - t);

    let path = dir.join("physical.bin");
    let mut buf = vec![0u8; 256 << 10];
    let t = thread_cpu_ns();
    {
        let mut file = std::fs::File::create(&path)?;
        for _ in 0..MIBS {
            file.write_all(&block)?;
        }
        let mut file = std::fs::File::open(&path)?;
        while file.read(&mut buf)? > 0 {}
    }
    let file = per_mib(thread_cpu_ns() - t);
    std::fs::remove_file(&path)?;

    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sending = block.clone();
    let sender = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        let t = thread_cpu_ns();
        for _ in 0..MIBS {
            stream.write_all(&sending)?;
        }
        Ok(thread_cpu_ns() - t)
    });
    let (mut stream, _) = listener.accept()?;
    let t = thread_cpu_ns();
    let mut received = 0;
    while received < MIBS * MIB as usize {
        match stream.read(&mut buf)? {
            0 => break,
            n => received += n,
        }
    }
    let receive = thread_cpu_ns() - t;
    let send = sender.join().map_err(|_| anyhow::anyhow!("the sender panicked"))??;
    Ok(Physical { sha256, tcp: per_mib(receive + send), file })
}

async fn run_worker(
    ctx: &Ctx,
    audio: &AudioFile,
    jobs: usize,
    latency_jobs: usize,
    concurrency: usize,
    tag: &str,
) -> anyhow::Result<WorkerRun> {
    let decode = if ctx.opts.analysis_in_cells { Decode::Analysis } else { Decode::Off };
    run_fleet(ctx, audio, jobs, latency_jobs, concurrency, Fleet::Rust { replicas: 1, decode }, tag).await
}

/// Sum of a per-process reading over the fleet (`None` if any process has none).
fn summed(workers: &[Worker], read: impl Fn(&str) -> Option<f64>) -> Option<f64> {
    workers.iter().map(|w| read(&w.pid)).sum()
}

/// The stage histograms of every worker of the fleet, added up.
async fn scrape_all(http: &reqwest::Client, workers: &[Worker]) -> HashMap<String, (f64, f64)> {
    let mut all: HashMap<String, (f64, f64)> = HashMap::new();
    for w in workers.iter().filter(|w| !w.metrics.is_empty()) {
        for (k, (sum, count)) in scrape(http, &w.metrics).await {
            let entry = all.entry(k).or_default();
            entry.0 += sum;
            entry.1 += count;
        }
    }
    all
}

/// One phase on `fleet`: the closed loop (latency), then the backlog (jobs/s, CPU, RSS, stages).
async fn run_fleet(
    ctx: &Ctx,
    audio: &AudioFile,
    jobs: usize,
    latency_jobs: usize,
    concurrency: usize,
    fleet: Fleet,
    tag: &str,
) -> anyhow::Result<WorkerRun> {
    let names = Names::new(tag);
    let mut workers = Vec::new();
    let started = async {
        match fleet {
            Fleet::Rust { replicas, decode } => {
                for i in 0..replicas {
                    let prefetch = concurrency / replicas + usize::from(i < concurrency % replicas);
                    let tag = format!("{tag}-{i}");
                    workers.push(start_worker(ctx, &names, prefetch.max(1), decode, &tag).await?);
                }
            }
            Fleet::Python => {
                for i in 0..concurrency {
                    workers.push(start_python(ctx, &names, tag, i).await?);
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    let idle_rss_mib = summed(&workers, |pid| vm_mib(pid, "VmRSS"));
    let result = async {
        started?;
        let worker = &workers[0];
        let mut feed = Feed::open(&ctx.amqp, &names).await?;
        // Closed loop: `concurrency` jobs in flight, a new one published as each event arrives.
        let mut latencies = Vec::with_capacity(latency_jobs);
        let mut published = 0;
        while published < concurrency.min(latency_jobs) {
            feed.publish(audio).await?;
            published += 1;
        }
        while latencies.len() < latency_jobs {
            let (latency, _) = feed.next_saved(&worker.log).await?;
            latencies.push(latency);
            if published < latency_jobs {
                feed.publish(audio).await?;
                published += 1;
            }
        }
        feed.confirmed().await?;

        // Backlog: every job published at once; jobs/s from the first publish to the last event.
        let http = reqwest::Client::new();
        let metrics0 = scrape_all(&http, &workers).await;
        let services0 = ctx.service_pids.sample();
        let cpu0 = summed(&workers, |pid| cpu_ticks(pid).map(|t| t as f64)).map(|t| t as u64);
        let started = Instant::now();
        for _ in 0..jobs {
            feed.publish(audio).await?;
        }
        feed.confirmed().await?;
        let mut last = started;
        for _ in 0..jobs {
            let (_, at) = feed.next_saved(&worker.log).await?;
            last = last.max(at);
        }
        let cpu1 = summed(&workers, |pid| cpu_ticks(pid).map(|t| t as f64)).map(|t| t as u64);
        let services1 = ctx.service_pids.sample();
        let metrics1 = scrape_all(&http, &workers).await;
        feed.close().await;
        anyhow::Ok(WorkerRun {
            throughput_jobs: jobs,
            elapsed: last - started,
            latencies,
            cpu_per_1000: per_thousand(cpu0, cpu1, jobs, ctx.tck),
            peak_rss_mib: summed(&workers, |pid| vm_mib(pid, "VmHWM")),
            idle_rss_mib,
            stages: stage_means(&metrics0, &metrics1),
            services: [0, 1, 2].map(|i| per_thousand(services0[i], services1[i], jobs, ctx.tck)),
            warnings: 0,
        })
    }
    .await;
    let mut warnings = 0;
    for worker in &mut workers {
        stop_child(&mut worker.child, "TERM", Duration::from_secs(20)).await;
        let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
        let logged = log
            .lines()
            .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
            .count();
        if logged > 0 {
            log_warnings(&worker.log, logged);
        }
        warnings += logged;
    }
    delete_worker_resources(ctx, &names).await;
    result.map(|r| WorkerRun { warnings, ..r })
}

fn log_warnings(path: &Path, count: usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let first: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
        .take(3)
        .collect();
    log(format!(
        "worker logged {count} warnings/errors ({}); first ones:\n{}",
        path.display(),
        first.join("\n")
    ));
}

async fn delete_worker_resources(ctx: &Ctx, names: &Names) {
    if let Ok(channel) = ctx.amqp.create_channel().await {
        let mut queues =
            vec![names.job_queue.clone(), names.dead_letter_queue.clone(), names.events_queue.clone()];
        queues.extend((1..=10).map(|n| format!("{}.retry.{n}", names.job_queue)));
        for queue in queues {
            match channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await {
                Ok(left) if left > 0 && queue == names.dead_letter_queue => {
                    log(format!("WARNING: {left} job(s) were dead-lettered in {queue}"));
                }
                Ok(_) => {}
                // Deleting a queue that does not exist closes the channel on some brokers.
                Err(_) => break,
            }
        }
        if let Ok(channel) = ctx.amqp.create_channel().await {
            for exchange in [&names.job_exchange, &names.dead_letter_exchange, &names.events_exchange] {
                let _ =
                    channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
            }
            let _ = channel.close(200, "bench done".into()).await;
        }
    }
    empty_bucket(&ctx.floor.s3, &names.bucket, true).await;
    let _ = ctx.floor.mongo.database(&names.database).drop().await;
}

// ---------------------------------------------------------------------------------------------
// Statistics and output

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn p50_p99(latencies: &[Duration]) -> (f64, f64) {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    (percentile(&sorted, 50.0).as_secs_f64() * 1000.0, percentile(&sorted, 99.0).as_secs_f64() * 1000.0)
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.digits$}"))
}

fn rate(jobs: usize, elapsed: Duration) -> f64 {
    jobs as f64 / elapsed.as_secs_f64().max(1e-9)
}

struct Big {
    size: u64,
    worker_elapsed: Duration,
    floor_elapsed: Duration,
    worker_peak_rss: Option<f64>,
    worker_idle_rss: Option<f64>,
    worker_cpu: Option<f64>,
    floor_peak_rss: Option<f64>,
    floor_cpu: Option<f64>,
    /// The same file with the analysis, the waveform and both renditions on.
    everything: Option<WorkerRun>,
}

/// Everything the run measured, for [`render`].
struct Report<'a> {
    cells: &'a [Cell],
    big: Option<&'a Big>,
    scaling: Option<&'a Scaling>,
    physical: Physical,
    analysis: Option<AnalysisCost>,
}

/// The worker's cost with `ANALYSIS=on` against the same cell with it off.
struct AnalysisCost {
    size: u64,
    concurrency: usize,
    off_cpu: Option<f64>,
    on_cpu: Option<f64>,
    off_rate: f64,
    on_rate: f64,
    /// The waveform and both renditions on too: (jobs/s, CPU s / 1000 jobs).
    everything: Option<(f64, Option<f64>)>,
}

/// CPU ms per MiB of a run on `size`-byte files, from its s / 1000 jobs.
fn ms_per_mib(cpu_per_1000: Option<f64>, size: u64) -> Option<f64> {
    cpu_per_1000.map(|s| s / (size as f64 / MIB as f64))
}

fn render(report: &Report<'_>, tck: f64, total: Duration) -> String {
    let (cells, big) = (report.cells, report.big);
    let mut md = String::new();
    let _ = writeln!(md, "### Worker vs floor\n");
    let _ = writeln!(
        md,
        "| file | conc. | jobs | worker jobs/s | floor jobs/s | worker ÷ floor | worker MiB/s | worker p50 / p99 ms | floor p50 / p99 ms | p50 / p99 worker ÷ floor | worker CPU s / 1000 jobs | floor CPU s / 1000 jobs | worker peak RSS MiB |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in cells {
        let w_rate = rate(c.worker.throughput_jobs, c.worker.elapsed);
        let f_rate = rate(c.jobs, c.floor.elapsed);
        let (wp50, wp99) = p50_p99(&c.worker.latencies);
        let (fp50, fp99) = p50_p99(&c.floor.latencies);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {:.1} | **{:.2}** | {:.1} | {} / {} | {} / {} | ×{:.2} / ×{:.2} | {} | {} | {} |",
            size_label(c.size),
            c.concurrency,
            c.jobs,
            w_rate,
            f_rate,
            w_rate / f_rate,
            w_rate * c.size as f64 / MIB as f64,
            ms(wp50),
            ms(wp99),
            ms(fp50),
            ms(fp99),
            wp50 / fp50.max(1e-9),
            wp99 / fp99.max(1e-9),
            opt(c.worker.cpu_per_1000, 2),
            opt(c.floor.cpu_per_1000, 2),
            opt(c.worker.peak_rss_mib, 1),
        );
    }
    let _ = writeln!(md, "\n### Where the time goes (mean ms per job, throughput phase)\n");
    let _ = writeln!(
        md,
        "Worker stages are its `audio_worker_stage_duration_seconds` histograms (see src/processor.rs); \
         \"other\" is the job (delivery → ack) minus those stages: parsing, the tenant check before \
         the download, the ack.\n"
    );
    let _ = writeln!(
        md,
        "| file | conc. | worker download | worker upload | worker catalog | worker publish | worker other | worker job | floor download | floor upload | floor upsert | floor job |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in cells {
        let stage = |k: &str| c.worker.stages.get(k).map_or_else(|| "n/a".into(), |v| ms(*v));
        let other = c.worker.stages.get("job").and_then(|job| {
            ["download", "upload", "catalog", "publish"]
                .iter()
                .try_fold(*job, |left, k| Some(left - c.worker.stages.get(*k)?))
        });
        let f = c.floor.stages;
        let floor_job = c.floor.latencies.iter().sum::<Duration>().as_secs_f64() * 1000.0
            / c.floor.latencies.len().max(1) as f64;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            size_label(c.size),
            c.concurrency,
            stage("download"),
            stage("upload"),
            stage("catalog"),
            stage("publish"),
            other.map_or_else(|| "n/a".into(), ms),
            stage("job"),
            ms(f.download.as_secs_f64() * 1000.0),
            ms(f.upload.as_secs_f64() * 1000.0),
            ms(f.upsert.as_secs_f64() * 1000.0),
            ms(floor_job),
        );
    }
    let _ = writeln!(md, "\n### CPU of the services (s / 1000 jobs, worker phase / floor phase)\n");
    let _ = writeln!(md, "| file | conc. | RabbitMQ | SecantusDB (MongoDB) | s3s-fs (S3) |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for c in cells {
        let pair = |i: usize| format!("{} / {}", opt(c.worker.services[i], 2), opt(c.floor.services[i], 2));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            size_label(c.size),
            c.concurrency,
            pair(0),
            pair(1),
            pair(2)
        );
    }
    if let Some(b) = big {
        let _ = writeln!(md, "\n### One {} file (concurrency 1)\n", size_label(b.size));
        let _ = writeln!(md, "| | worker | floor | worker ÷ floor |");
        let _ = writeln!(md, "|---|---:|---:|---:|");
        let (w, f) = (b.worker_elapsed.as_secs_f64(), b.floor_elapsed.as_secs_f64());
        let _ =
            writeln!(md, "| time (s; worker: publish → event) | {w:.2} | {f:.2} | ×{:.2} |", w / f.max(1e-9));
        let _ = writeln!(
            md,
            "| peak RSS MiB (VmHWM) | {} (idle {}) | {} | |",
            opt(b.worker_peak_rss, 1),
            opt(b.worker_idle_rss, 1),
            opt(b.floor_peak_rss, 1)
        );
        let _ = writeln!(md, "| CPU s | {} | {} | |", opt(b.worker_cpu, 2), opt(b.floor_cpu, 2));
        if let Some(all) = &b.everything {
            let _ = writeln!(
                md,
                "| with ANALYSIS=on WAVEFORM=on RENDITIONS=flac,vorbis: time s, peak RSS MiB, CPU s | {:.2}, {}, {} | | |",
                all.elapsed.as_secs_f64(),
                opt(all.peak_rss_mib, 1),
                opt(all.cpu_per_1000.map(|v| v / 1000.0), 2)
            );
        }
    }

    render_python(&mut md, cells);
    if let Some(scaling) = report.scaling {
        render_scaling(&mut md, scaling);
    }
    render_physical(&mut md, cells, &report.physical);
    if let Some(a) = &report.analysis {
        let _ = writeln!(
            md,
            "\n### The analysis (issue 14): ANALYSIS on and off, {} × {}\n",
            size_label(a.size),
            a.concurrency
        );
        let _ = writeln!(
            md,
            "The cells above run the worker with `ANALYSIS=off` (the floor and the baseline decode \
             nothing); this run decodes every take for its loudness, silence and clipping. \
             \"Extra\" is the CPU the analysis adds per job, against one SHA-256 pass of the file \
             measured above.\n"
        );
        let _ = writeln!(md, "| | jobs/s | CPU ms / job |\n|---|---:|---:|");
        let _ = writeln!(md, "| ANALYSIS=off | {:.1} | {} |", a.off_rate, opt(a.off_cpu, 2));
        let _ = writeln!(md, "| ANALYSIS=on | {:.1} | {} |", a.on_rate, opt(a.on_cpu, 2));
        if let Some((rate, cpu)) = a.everything {
            let _ = writeln!(
                md,
                "| ANALYSIS=on WAVEFORM=on RENDITIONS=flac,vorbis | {rate:.1} | {} |",
                opt(cpu, 2)
            );
            let renditions = cpu.zip(a.on_cpu).map(|(all, on)| all - on);
            let _ =
                writeln!(md, "| waveform + renditions, extra over ANALYSIS=on | | {} |", opt(renditions, 2));
        }
        let extra = a.on_cpu.zip(a.off_cpu).map(|(on, off)| on - off);
        let sha = report.physical.sha256 * a.size as f64 / MIB as f64;
        let _ = writeln!(
            md,
            "| extra | | {} ({} × one SHA-256 pass of {:.2} ms) |",
            opt(extra, 2),
            opt(extra.map(|e| e / sha.max(1e-9)), 2),
            sha
        );
    }
    render_targets(&mut md, report);
    let warnings: usize = cells.iter().map(|c| c.worker.warnings).sum();
    let _ = writeln!(
        md,
        "\nWorker warnings/errors logged during the cells: {warnings}. CLK_TCK {tck}. Bench time {:.0} s. \
         Load average at the end: {}.",
        total.as_secs_f64(),
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    );
    md
}

fn render_python(md: &mut String, cells: &[Cell]) {
    if cells.iter().all(|c| c.python.is_none()) {
        return;
    }
    let _ = writeln!(md, "\n### Worker vs the Python baseline\n");
    let _ = writeln!(
        md,
        "The same jobs through `benches/python_worker.py` (pika, requests, boto3, pymongo; *conc.* \
         processes with prefetch 1). Its CPU and peak RSS are summed over its processes; so are \
         the worker's (one process here).\n"
    );
    let _ = writeln!(
        md,
        "| file | conc. | jobs | worker jobs/s | python jobs/s | worker ÷ python | worker CPU ms / job | python CPU ms / job | CPU worker ÷ python | worker peak RSS MiB | python peak RSS MiB | RSS worker ÷ python |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in cells {
        let Some(p) = &c.python else { continue };
        let (w_rate, p_rate) =
            (rate(c.worker.throughput_jobs, c.worker.elapsed), rate(p.throughput_jobs, p.elapsed));
        let ratio = |a: Option<f64>, b: Option<f64>| opt(a.zip(b).map(|(a, b)| a / b.max(1e-9)), 3);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {:.1} | **{:.2}** | {} | {} | **{}** | {} | {} | {} |",
            size_label(c.size),
            c.concurrency,
            c.jobs,
            w_rate,
            p_rate,
            w_rate / p_rate.max(1e-9),
            opt(c.worker.cpu_per_1000, 2),
            opt(p.cpu_per_1000, 2),
            ratio(c.worker.cpu_per_1000, p.cpu_per_1000),
            opt(c.worker.peak_rss_mib, 1),
            opt(p.peak_rss_mib, 1),
            ratio(c.worker.peak_rss_mib, p.peak_rss_mib),
        );
    }
}

fn render_scaling(md: &mut String, scaling: &Scaling) {
    let _ = writeln!(
        md,
        "\n### Scaling out: worker processes on one queue ({} files, total prefetch {})\n",
        size_label(scaling.size),
        scaling.concurrency
    );
    let _ = writeln!(
        md,
        "Each row starts that many `audio-worker run` processes on the same job queue, splitting \
         the prefetch evenly; CPU and peak RSS are summed over them. On 2 cores the services \
         share the CPU, so more processes cannot add throughput here; the rows show that a \
         second replica costs nothing and loses nothing.\n"
    );
    let _ = writeln!(
        md,
        "| replicas | prefetch each | jobs | jobs/s | ÷ floor | CPU ms / job | peak RSS MiB (all) |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|");
    for r in &scaling.rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | **{:.2}** | {} | {} |",
            r.replicas,
            scaling.concurrency / r.replicas.max(1),
            r.jobs,
            r.jobs_per_s,
            r.jobs_per_s / scaling.floor_jobs_per_s.max(1e-9),
            opt(r.cpu_per_1000, 2),
            opt(r.peak_rss_mib, 1),
        );
    }
}

fn render_physical(md: &mut String, cells: &[Cell], physical: &Physical) {
    let _ = writeln!(md, "\n### The physical limit on this machine (CPU ms per MiB)\n");
    let _ = writeln!(
        md,
        "Measured by the bench on 256 MiB: one SHA-256 pass (`sha2`, as the worker) and the copies \
         no job can avoid: the download's receive plus the upload's send over loopback TCP, and the \
         spool file's write plus its read back.\n"
    );
    let _ = writeln!(md, "| SHA-256 | TCP receive + send | file write + read | **hash + copies** |");
    let _ = writeln!(md, "|---:|---:|---:|---:|");
    let _ = writeln!(
        md,
        "| {:.3} | {:.3} | {:.3} | **{:.3}** |\n",
        physical.sha256,
        physical.tcp,
        physical.file,
        physical.total()
    );
    let _ = writeln!(md, "| file | conc. | worker CPU ms / MiB | ÷ hash + copies | floor CPU ms / MiB |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for c in cells.iter().filter(|c| c.size >= MIB) {
        let worker = ms_per_mib(c.worker.cpu_per_1000, c.size);
        let _ = writeln!(
            md,
            "| {} | {} | {} | **{}** | {} |",
            size_label(c.size),
            c.concurrency,
            opt(worker, 3),
            opt(worker.map(|w| w / physical.total()), 2),
            opt(ms_per_mib(c.floor.cpu_per_1000, c.size), 3),
        );
    }
}

fn render_targets(md: &mut String, report: &Report<'_>) {
    let cells = report.cells;
    let verdict = |met: bool| if met { "met" } else { "not met" };
    let _ = writeln!(md, "\n### Targets (issue 13)\n");
    let cell = |size: u64| cells.iter().find(|c| c.size == size && c.concurrency == 16);
    for (size, target) in [(MIB, TARGET_RATIO_1M), (50 * MIB, TARGET_RATIO_50M)] {
        let line = match cell(size) {
            Some(c) => {
                let ratio = rate(c.worker.throughput_jobs, c.worker.elapsed) / rate(c.jobs, c.floor.elapsed);
                format!("**{}** ({ratio:.2} × floor)", verdict(ratio >= target))
            }
            None => "not measured in this run".into(),
        };
        let _ = writeln!(md, "- jobs/s at {} × 16 ≥ {target} × floor: {line}.", size_label(size));
    }
    let line = match cell(MIB).and_then(|c| Some((c.worker.cpu_per_1000?, c.python.as_ref()?.cpu_per_1000?)))
    {
        Some((w, p)) => format!(
            "**{}** ({:.3} × python: {w:.2} vs {p:.2} ms)",
            verdict(w / p <= TARGET_CPU_VS_PYTHON),
            w / p
        ),
        None => "not measured in this run".into(),
    };
    let _ =
        writeln!(md, "- CPU per job at 1 MiB × 16 ≤ {TARGET_CPU_VS_PYTHON} × the Python baseline: {line}.");
    let line = match cell(50 * MIB).and_then(|c| ms_per_mib(c.worker.cpu_per_1000, c.size)) {
        Some(w) => {
            let ratio = w / report.physical.total();
            format!(
                "**{}** ({w:.2} ms per MiB, {ratio:.2} × the hash-plus-copy cost of {:.2} ms)",
                verdict(w <= TARGET_CPU_MS_PER_MIB && ratio <= TARGET_CPU_VS_PHYSICAL),
                report.physical.total()
            )
        }
        None => "not measured in this run".into(),
    };
    let _ = writeln!(
        md,
        "- CPU per MiB at 50 MiB × 16 ≤ {TARGET_CPU_MS_PER_MIB} ms and ≤ {TARGET_CPU_VS_PHYSICAL} × hash + copies: {line}."
    );
    let line = match report.big.and_then(|b| Some((b.size, b.worker_peak_rss?))) {
        Some((size, rss)) => {
            format!("{}: **{}** ({rss:.1} MiB)", size_label(size), verdict(rss < TARGET_RSS_MIB))
        }
        None => "one big file: not measured in this run".into(),
    };
    let line16 = match cell(50 * MIB).and_then(|c| c.worker.peak_rss_mib) {
        Some(rss) => format!("16 × 50 MiB: **{}** ({rss:.1} MiB)", verdict(rss < TARGET_RSS_MIB)),
        None => "16 × 50 MiB: not measured in this run".into(),
    };
    let _ = writeln!(md, "- Peak RSS below {TARGET_RSS_MIB} MiB: {line}; {line16}.");
    // Issue 14: everything on, one big file, below 96 MiB.
    if let Some((size, rss)) = report.big.and_then(|b| Some((b.size, b.everything.as_ref()?.peak_rss_mib?))) {
        let _ = writeln!(
            md,
            "- Peak RSS below 96 MiB with the analysis, waveform and renditions on, {}: **{}** ({rss:.1} MiB).",
            size_label(size),
            verdict(rss < 96.0)
        );
    }
}

// ---------------------------------------------------------------------------------------------

async fn run(opts: Opts) -> anyhow::Result<()> {
    let begun = Instant::now();
    let services = Services::from_env();
    let bin_dir = match &opts.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("no target directory above the bench executable")?
            .to_path_buf(),
    };
    for bin in ["audio-worker", "audio-gen-standin"] {
        if !bin_dir.join(bin).is_file() {
            bail!(
                "{} not found: run `cargo build --release --bins` (or pass --bin-dir)",
                bin_dir.join(bin).display()
            );
        }
    }
    let work = tempfile::Builder::new()
        .prefix("audio-worker-bench-")
        .tempdir_in(opts.work_dir.clone().unwrap_or_else(std::env::temp_dir))?;
    let audio_dir = work.path().join("audio");
    let spool = work.path().join("spool");
    std::fs::create_dir_all(&audio_dir)?;
    std::fs::create_dir_all(&spool)?;

    let mut sizes = opts.sizes.clone();
    if !opts.no_big {
        sizes.push(opts.big_size);
    }
    sizes.push(opts.scaling_size);
    let mut files = HashMap::new();
    for &size in &sizes {
        if files.contains_key(&size) {
            continue;
        }
        let name = format!("tone-{size}.wav");
        let duration = write_wav(&audio_dir.join(&name), size)?;
        files.insert(size, AudioFile { name, duration });
    }
    log(format!("wrote {} WAV file(s) in {}", files.len(), audio_dir.display()));

    let mut standin = start_standin(&opts, &bin_dir, &audio_dir, work.path()).await?;
    let amqp = Connection::connect(
        &services.amqp_url,
        ConnectionProperties::default().with_connection_name("audio-worker-bench".into()),
    )
    .await
    .context("connecting to RabbitMQ (is scripts/services.sh up?)")?;
    let mongo = mongodb::Client::with_uri_str(&services.mongo_uri).await?;
    let floor = Arc::new(Floor {
        http: reqwest::Client::builder().no_proxy().build()?,
        s3: s3_client(&services),
        mongo,
        spool: spool.clone(),
    });
    let service_pids = ServicePids::find(&services);
    log(format!("service pids: {service_pids:?}"));
    let max_audio_bytes = DEFAULT_MAX_AUDIO_BYTES.max(sizes.iter().copied().max().unwrap_or(0));
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let ctx = Ctx {
        standin_base: standin.base.clone(),
        services,
        bin_dir,
        spool,
        work: work.path().to_path_buf(),
        max_audio_bytes,
        amqp,
        floor,
        service_pids,
        tck: clock_ticks_per_second(),
        opts,
    };

    let outcome = async {
        let mut cells = Vec::new();
        for &size in &ctx.opts.sizes {
            for &concurrency in &ctx.opts.concurrency {
                let mut jobs = ctx.opts.jobs.unwrap_or_else(|| default_jobs(size, concurrency));
                if ctx.opts.quick && ctx.opts.jobs.is_none() {
                    jobs = (jobs / 4).max(concurrency).max(2);
                }
                let latency_jobs = ctx.opts.latency_jobs.unwrap_or_else(|| concurrency.max(jobs / 4)).min(jobs).max(1);
                let tag = format!("bench-{run_id}-{}-c{concurrency}", size_label(size).replace(' ', "").to_lowercase());
                let audio = &files[&size];
                log(format!("{}, concurrency {concurrency}: worker ({latency_jobs} closed-loop + {jobs} backlog jobs)", size_label(size)));
                let worker = run_worker(&ctx, audio, jobs, latency_jobs, concurrency, &tag).await?;
                log(format!(
                    "  worker: {:.1} jobs/s, peak RSS {} MiB",
                    rate(jobs, worker.elapsed),
                    opt(worker.peak_rss_mib, 1)
                ));
                let floor = run_floor(&ctx, audio, jobs, concurrency, &tag).await?;
                log(format!("  floor:  {:.1} jobs/s", rate(jobs, floor.elapsed)));
                let python = if ctx.opts.no_python {
                    None
                } else {
                    let tag = format!("{tag}-py");
                    let run = run_fleet(&ctx, audio, jobs, latency_jobs, concurrency, Fleet::Python, &tag).await?;
                    log(format!(
                        "  python: {:.1} jobs/s, peak RSS {} MiB over {concurrency} processes",
                        rate(jobs, run.elapsed),
                        opt(run.peak_rss_mib, 1)
                    ));
                    Some(run)
                };
                cells.push(Cell { size, concurrency, jobs, worker, floor, python });
            }
        }
        let scaling = if ctx.opts.no_scaling || ctx.opts.replicas.is_empty() {
            None
        } else {
            let (size, concurrency) = (ctx.opts.scaling_size, ctx.opts.scaling_concurrency);
            let audio = &files[&size];
            let jobs = ctx.opts.jobs.unwrap_or_else(|| default_jobs(size, concurrency));
            let cell = cells.iter().find(|c| c.size == size && c.concurrency == concurrency && c.jobs == jobs);
            let floor_jobs_per_s = match cell {
                Some(c) => rate(c.jobs, c.floor.elapsed),
                None => {
                    let tag = format!("bench-{run_id}-scaling");
                    rate(jobs, run_floor(&ctx, audio, jobs, concurrency, &tag).await?.elapsed)
                }
            };
            let mut rows = Vec::new();
            for &replicas in &ctx.opts.replicas {
                let row = match cell.filter(|_| replicas == 1) {
                    Some(c) => ScaleRow {
                        replicas,
                        jobs,
                        jobs_per_s: rate(jobs, c.worker.elapsed),
                        cpu_per_1000: c.worker.cpu_per_1000,
                        peak_rss_mib: c.worker.peak_rss_mib,
                    },
                    None => {
                        let tag = format!("bench-{run_id}-scale{replicas}");
                        log(format!("scaling: {replicas} worker(s) sharing prefetch {concurrency}, {}", size_label(size)));
                        let latency_jobs = concurrency.max(jobs / 4).min(jobs);
                        let fleet = Fleet::Rust { replicas: replicas.max(1), decode: Decode::Off };
                        let run = run_fleet(&ctx, audio, jobs, latency_jobs, concurrency, fleet, &tag).await?;
                        ScaleRow {
                            replicas,
                            jobs,
                            jobs_per_s: rate(jobs, run.elapsed),
                            cpu_per_1000: run.cpu_per_1000,
                            peak_rss_mib: run.peak_rss_mib,
                        }
                    }
                };
                log(format!("  {replicas} replica(s): {:.1} jobs/s", row.jobs_per_s));
                rows.push(row);
            }
            Some(Scaling { size, concurrency, floor_jobs_per_s, rows })
        };
        // The cost of the analysis (issue 14): the scaling cell again with ANALYSIS=on.
        let analysis = if ctx.opts.no_analysis {
            None
        } else {
            let (size, concurrency) = (ctx.opts.scaling_size, ctx.opts.scaling_concurrency);
            let jobs = ctx.opts.jobs.unwrap_or_else(|| default_jobs(size, concurrency));
            let off = cells.iter().find(|c| c.size == size && c.concurrency == concurrency && c.jobs == jobs);
            match off {
                None => None,
                Some(off) => {
                    let tag = format!("bench-{run_id}-analysis");
                    log(format!("analysis on: {}, concurrency {concurrency}", size_label(size)));
                    let fleet = Fleet::Rust { replicas: 1, decode: Decode::Analysis };
                    let latency_jobs = concurrency.max(jobs / 4).min(jobs);
                    let on = run_fleet(&ctx, &files[&size], jobs, latency_jobs, concurrency, fleet, &tag).await?;
                    log(format!("  analysis on: {:.1} jobs/s", rate(jobs, on.elapsed)));
                    let everything = if ctx.opts.no_renditions {
                        None
                    } else {
                        let tag = format!("bench-{run_id}-everything");
                        log(format!("analysis, waveform and renditions on: {}", size_label(size)));
                        let fleet = Fleet::Rust { replicas: 1, decode: Decode::Everything };
                        let all = run_fleet(&ctx, &files[&size], jobs, latency_jobs, concurrency, fleet, &tag).await?;
                        log(format!("  everything on: {:.1} jobs/s", rate(jobs, all.elapsed)));
                        Some((rate(jobs, all.elapsed), all.cpu_per_1000))
                    };
                    Some(AnalysisCost {
                        size,
                        concurrency,
                        off_cpu: off.worker.cpu_per_1000,
                        on_cpu: on.cpu_per_1000,
                        off_rate: rate(jobs, off.worker.elapsed),
                        on_rate: rate(jobs, on.elapsed),
                        everything,
                    })
                }
            }
        };
        let big = if ctx.opts.no_big {
            None
        } else {
            let size = ctx.opts.big_size;
            let audio = &files[&size];
            let tag = format!("bench-{run_id}-big");
            log(format!("one {} file: worker", size_label(size)));
            let worker = run_worker(&ctx, audio, 1, 1, 1, &tag).await?;
            log(format!("  worker: {:.2} s, peak RSS {} MiB", worker.elapsed.as_secs_f64(), opt(worker.peak_rss_mib, 1)));
            log(format!("one {} file: floor", size_label(size)));
            let floor = run_floor(&ctx, audio, 1, 1, &tag).await?;
            log(format!("  floor:  {:.2} s", floor.elapsed.as_secs_f64()));
            let everything = if ctx.opts.no_renditions {
                None
            } else {
                log(format!("one {} file: worker with analysis, waveform and renditions on", size_label(size)));
                let fleet = Fleet::Rust { replicas: 1, decode: Decode::Everything };
                let run = run_fleet(&ctx, audio, 1, 1, 1, fleet, &format!("{tag}-everything")).await?;
                log(format!("  everything on: {:.2} s, peak RSS {} MiB", run.elapsed.as_secs_f64(), opt(run.peak_rss_mib, 1)));
                Some(run)
            };
            Some(Big {
                everything,
                size,
                worker_elapsed: worker.elapsed,
                floor_elapsed: floor.elapsed,
                worker_peak_rss: worker.peak_rss_mib,
                worker_idle_rss: worker.idle_rss_mib,
                worker_cpu: worker.cpu_per_1000.map(|v| v / 1000.0),
                floor_peak_rss: floor.peak_rss_mib,
                floor_cpu: floor.cpu_per_1000.map(|v| v / 1000.0),
            })
        };
        anyhow::Ok((cells, big, scaling, analysis))
    }
    .await;
    stop_child(&mut standin.child, "INT", Duration::from_secs(5)).await;
    let _ = ctx.amqp.close(200, "bench done".into()).await;
    let (cells, big, scaling, analysis) = outcome?;
    log("measuring the physical limit (SHA-256, TCP and file copies of 256 MiB)");
    let dir = ctx.spool.clone();
    let physical = tokio::task::spawn_blocking(move || measure_physical(&dir)).await??;

    let report = Report { cells: &cells, big: big.as_ref(), scaling: scaling.as_ref(), physical, analysis };
    let md = render(&report, ctx.tck, begun.elapsed());
    println!("{md}");
    if let Some(out) = &ctx.opts.out {
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
