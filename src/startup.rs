//! The one place that wires the worker: [`Application::build`] makes the clients, the readiness
//! state and the metrics listener from the settings; [`Application::run_until_stopped`]
//! prepares S3 and MongoDB, serves `/metrics`, `/healthz` and `/readyz`, probes the stores and
//! consumes jobs until its shutdown token is cancelled. `main.rs` and the integration tests
//! both start the worker through here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::health::{self, Health};
use crate::pipeline::catalog::Catalog;
use crate::pipeline::download::{http_client, remove_stale_spool_files};
use crate::pipeline::store::Store;
use crate::processor::Deps;
use crate::retry::{RetryBudget, RetryPolicy};

/// Spool files older than this, at start-up, were left by a worker that was killed.
const STALE_SPOOL_AGE: Duration = Duration::from_secs(6 * 3600);

/// A worker, built and not yet running.
pub struct Application {
    /// The clients every job shares.
    deps: Arc<Deps>,
    /// The bound metrics listener and the Prometheus handle it renders; `None` with
    /// `METRICS_ADDR=off`. Bound in `build` so a port already taken fails start-up, and so a
    /// test asking for port 0 learns the real one before the worker runs.
    metrics: Option<(TcpListener, PrometheusHandle)>,
    /// Cancelled to stop: by SIGTERM/SIGINT in `main`, by the test at teardown.
    shutdown: CancellationToken,
}

/// Builds every client a job needs from the settings; makes no request (the check-config
/// command uses this too).
///
/// # Errors
/// The TLS backend fails to start or `MONGODB_URI` does not parse.
pub async fn build_deps(settings: Settings) -> anyhow::Result<Deps> {
    let audio_gen = &settings.audio_gen;
    let http = http_client(audio_gen.connect_timeout, audio_gen.read_timeout, &audio_gen.url_policy)
        .context("building the HTTP client")?;
    let store = Store::new(&settings.s3);
    let catalog = Catalog::connect(&settings.mongo).await.context("MONGODB_URI")?;
    Ok(Deps {
        http,
        store,
        catalog,
        settings: Arc::new(settings),
        health: Health::new(),
        activity: Arc::default(),
    })
}

impl Application {
    /// Builds the clients and binds `METRICS_ADDR`; connects to nothing yet.
    ///
    /// # Errors
    /// A client cannot be built, or the metrics address cannot be bound.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let metrics_addr = settings.worker.metrics_addr;
        let deps = Arc::new(build_deps(settings).await?);
        let metrics = match metrics_addr {
            Some(addr) => {
                let handle = health::install_metrics()?;
                let listener =
                    TcpListener::bind(addr).await.with_context(|| format!("METRICS_ADDR: binding {addr}"))?;
                Some((listener, handle))
            }
            None => None,
        };
        Ok(Self { deps, metrics, shutdown: CancellationToken::new() })
    }

    /// The clients the worker's jobs share (tests run the processor on them directly).
    pub fn deps(&self) -> &Arc<Deps> {
        &self.deps
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, once bound.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// The token that stops the worker: cancel it for a graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled: serves metrics and health, probes the stores,
    /// prepares the bucket and the catalog index (retrying for about a minute while the services
    /// come up), then consumes jobs. Closes the MongoDB client before returning.
    ///
    /// # Errors
    /// S3 or MongoDB could not be prepared at start-up.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self { deps, metrics, shutdown } = self;
        for warning in deps.settings.s3.credential_warnings(chrono::Utc::now()) {
            tracing::warn!("{warning}");
        }
        if let Some((listener, handle)) = metrics {
            tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
            let (health, stop) = (deps.health.clone(), shutdown.clone());
            tokio::spawn(async move {
                if let Err(e) = health::serve(listener, handle, health, stop).await {
                    tracing::error!(error = %e, "metrics listener failed");
                }
            });
            tokio::spawn(health::probe_dependencies(
                deps.store.clone(),
                deps.catalog.clone(),
                deps.health.clone(),
                shutdown.clone(),
            ));
        }
        let mut reporter = tokio::spawn(crate::activity::report(
            deps.activity.clone(),
            deps.catalog.activity(),
            deps.health.clone(),
            shutdown.clone(),
        ));
        let result = tokio::select! {
            prepared = prepare(&deps) => prepared,
            () = shutdown.cancelled() => Ok(()),
        };
        if result.is_ok() && !shutdown.is_cancelled() {
            crate::amqp::consumer::run(deps.clone(), shutdown.clone()).await;
        }
        // After a stop, the reporter's last flush goes out before the MongoDB client closes.
        if shutdown.is_cancelled() {
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut reporter).await;
        }
        reporter.abort();
        deps.catalog.shutdown().await;
        result
    }
}

/// Removes stale spool files, then creates the bucket and the catalog index, waiting for the
/// services to come up, and the activity collections' TTL indexes.
async fn prepare(deps: &Deps) -> anyhow::Result<()> {
    let stale = remove_stale_spool_files(&deps.settings.worker.tmp_dir, STALE_SPOOL_AGE);
    if stale > 0 {
        tracing::info!(removed = stale, "removed stale spool files");
    }
    let policy = RetryPolicy {
        max_attempts: 15,
        initial_delay: Duration::from_millis(500),
        max_elapsed: Duration::from_secs(60),
    };
    RetryBudget::new(policy).run(|| deps.store.ensure_bucket()).await.context("preparing the S3 bucket")?;
    RetryBudget::new(policy)
        .run(|| deps.catalog.ensure_indexes())
        .await
        .context("preparing the MongoDB index")?;
    // Best effort: without their TTL indexes the console's activity collections only grow; the
    // jobs are not affected.
    if let Err(e) = deps.catalog.activity().ensure_indexes().await {
        tracing::warn!(error = %e, "the TTL indexes of the activity collections could not be made; old entries stay");
    }
    Ok(())
}
