//! The operator console (`audio-worker console`): the queues, the dead letters and their
//! replays on server-rendered pages, for operators who would otherwise read RabbitMQ's
//! management UI (which knows nothing of our failure headers, stages or tenants).
//!
//! Its own process (so no worker replica exposes it), listening on `CONSOLE_ADDR`
//! (`127.0.0.1:8090` by default). Every page but `/healthz`, `/login` and the stylesheet needs a
//! session: the operator gives `CONSOLE_TOKEN` once, and holds a random session id in a
//! `Secure`/`HttpOnly`/`SameSite=Strict` cookie ([`auth`]). Every state-changing request is a
//! POST carrying the session's CSRF token. Templates escape every value (askama), and the
//! pages need no JavaScript.
//!
//! - [`overview`]: queue depths and consumers, the last hour's outcomes, the replicas seen.
//! - [`pages`]: the dead letters (paged, filtered) and one dead letter's detail.
//! - [`edit`]: what an edited job must pass before it is replayed.
//! - [`actions`]: replay one, replay a filtered set (a dry-run count first, then a rate),
//!   purge with a typed confirmation, edit then replay. Each runs the code of
//!   `audio-worker dlq …` ([`crate::dlq`]: confirm before ack, nothing lost) and is logged with
//!   the operator's name (target `audio_worker::console::audit`).
//!
//! With `CONSOLE_READ_ONLY=true` the action forms are not shown and every action is refused
//! (403).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::config::{ConfigError, Settings};
use crate::pipeline::catalog::Catalog;
use crate::pipeline::store::Store;

pub mod actions;
pub mod auth;
pub mod edit;
pub mod overview;
pub mod pages;

/// The console's own settings, beside the worker's [`Settings`] (RabbitMQ, S3, MongoDB and the
/// URL policy, read the same way).
#[derive(Clone)]
pub struct ConsoleSettings {
    /// `CONSOLE_ADDR` (default `127.0.0.1:8090`): where the console listens. Loopback by
    /// default, so it is reached through an SSH tunnel or `kubectl port-forward` unless an
    /// operator chooses otherwise.
    pub addr: SocketAddr,
    /// `CONSOLE_TOKEN`, or the content of the file `CONSOLE_TOKEN_FILE` names (a trailing
    /// newline dropped): what an operator gives to log in. At least 16 characters.
    pub token: String,
    /// `CONSOLE_READ_ONLY` (default false): pages only, every action refused.
    pub read_only: bool,
    /// `RABBITMQ_MANAGEMENT_URL` (default unset), e.g. `http://rabbitmq:15672`: when set, queue
    /// depths come from the management API (ready and unacked apart); its credentials are the
    /// URL's own or else the first `AMQP_URL`'s. Unset: from passive queue declarations over
    /// AMQP (ready messages only).
    pub management_url: Option<Url>,
}

impl std::fmt::Debug for ConsoleSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSettings")
            .field("addr", &self.addr)
            .field("token", &"****")
            .field("read_only", &self.read_only)
            .field(
                "management_url",
                &self.management_url.as_ref().map(|u| crate::config::mask_url(u.as_str())),
            )
            .finish()
    }
}

/// The shortest token accepted: a guessable token would be the whole of the console's security.
pub const MIN_TOKEN_CHARS: usize = 16;

impl ConsoleSettings {
    /// Reads the console's settings from the process environment.
    ///
    /// # Errors
    /// The first unusable setting, naming its variable.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`ConsoleSettings::from_env`], reading variables through `lookup`.
    ///
    /// # Errors
    /// The first unusable setting, naming its variable.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |var: &str| lookup(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let error = |var: &'static str, message: &str, value: String| ConfigError {
            var,
            message: message.to_owned(),
            value,
        };
        let addr_raw = get("CONSOLE_ADDR").unwrap_or_else(|| "127.0.0.1:8090".into());
        let addr = addr_raw.parse().map_err(|_| {
            error("CONSOLE_ADDR", "must be an IP address and port, like 127.0.0.1:8090", addr_raw)
        })?;
        let token =
            match (lookup("CONSOLE_TOKEN").filter(|t| !t.trim().is_empty()), get("CONSOLE_TOKEN_FILE")) {
                (Some(_), Some(path)) => {
                    return Err(error(
                        "CONSOLE_TOKEN_FILE",
                        "CONSOLE_TOKEN and CONSOLE_TOKEN_FILE are both set; set one",
                        path,
                    ));
                }
                (Some(token), None) => token,
                (None, Some(path)) => std::fs::read_to_string(&path)
                    .map_err(|e| {
                        error("CONSOLE_TOKEN_FILE", &format!("cannot read the token file ({e})"), path)
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
                (None, None) => {
                    return Err(error(
                        "CONSOLE_TOKEN",
                        "is required (or CONSOLE_TOKEN_FILE): the token operators log in with",
                        String::new(),
                    ));
                }
            };
        if token.chars().count() < MIN_TOKEN_CHARS {
            return Err(error(
                "CONSOLE_TOKEN",
                &format!("must be at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 24`)"),
                "****".into(),
            ));
        }
        let read_only = match get("CONSOLE_READ_ONLY").map(|v| v.to_ascii_lowercase()).as_deref() {
            None | Some("false" | "0" | "no" | "off") => false,
            Some("true" | "1" | "yes" | "on") => true,
            Some(other) => return Err(error("CONSOLE_READ_ONLY", "must be true or false", other.to_owned())),
        };
        let management_url = match get("RABBITMQ_MANAGEMENT_URL") {
            None => None,
            Some(raw) => {
                let url = Url::parse(&raw)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https"))
                    .ok_or_else(|| {
                        error(
                            "RABBITMQ_MANAGEMENT_URL",
                            "must be an http(s) URL like http://rabbitmq:15672",
                            crate::config::mask_url(&raw),
                        )
                    })?;
                Some(url)
            }
        };
        Ok(Self { addr, token, read_only, management_url })
    }
}

/// What every handler shares.
pub struct Console {
    /// The worker's settings: queue names, the URL policy an edited job must pass, S3 and
    /// MongoDB.
    pub settings: Arc<Settings>,
    /// The console's own settings.
    pub console: ConsoleSettings,
    /// The asset catalog (a dead letter's asset in the library) and the activity log.
    pub catalog: Catalog,
    /// Fresh URLs of an asset already in the library.
    pub store: Store,
    /// For the management API (`RABBITMQ_MANAGEMENT_URL`).
    pub http: reqwest::Client,
    /// Logged-in sessions and their CSRF tokens.
    pub sessions: auth::Sessions,
    /// The actions this console ran, newest first, and the lock that keeps scans of the
    /// dead-letter queue one at a time (two scans at once would each miss what the other
    /// holds).
    pub actions: actions::Actions,
}

/// The largest form accepted (an edited job with its fields), bytes.
pub const MAX_FORM_BYTES: usize = 16 << 20;

/// How long a page waits for the dead-letter queue while an action scans it, before it says
/// so instead.
pub const SCAN_WAIT: Duration = Duration::from_secs(10);

impl Console {
    /// Builds the clients (no request is made).
    ///
    /// # Errors
    /// `MONGODB_URI` does not parse, or the HTTP client cannot be built.
    pub async fn build(settings: Settings, console: ConsoleSettings) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        let store = Store::new(&settings.s3);
        let catalog = Catalog::connect(&settings.mongo).await.context("MONGODB_URI")?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        Ok(Arc::new(Self {
            settings: Arc::new(settings),
            console,
            catalog,
            store,
            http,
            sessions: auth::Sessions::default(),
            actions: actions::Actions::default(),
        }))
    }
}

/// The console's routes (see the module docs).
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/console.css", get(stylesheet))
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/", get(overview::page))
        .route("/dead-letters", get(pages::dead_letters))
        .route("/dead-letters/replay", post(actions::replay_filtered))
        .route("/dead-letters/purge", post(actions::purge_filtered))
        .route("/dead-letters/{key}", get(pages::dead_letter))
        .route("/dead-letters/{key}/replay", post(actions::replay_one))
        .route("/dead-letters/{key}/edit", post(actions::edit_and_replay))
        .route("/actions", get(actions::list))
        .route("/actions/{id}", get(actions::show))
        .route("/actions/{id}/cancel", post(actions::cancel))
        .layer(axum::middleware::map_response(security_headers))
        // An edited job may be as large as the dead letter it replaces (axum's default is 2 MiB).
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM_BYTES))
        .with_state(console)
}

/// Serves the console on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// The listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    console: Arc<Console>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let catalog = console.catalog.clone();
    let app = router(console).into_make_service_with_connect_info::<SocketAddr>();
    let served =
        axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
    catalog.shutdown().await;
    served
}

/// Headers on every answer: no caching of pages that show jobs, no framing, no script or
/// resource from anywhere (the pages have none), forms post only to the console.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "max-age=3600")],
        include_str!("../../templates/console/console.css"),
    )
        .into_response()
}

/// A rendered template as a response with `status`; a template error is a 500 (and logged).
pub(crate) fn render(status: StatusCode, page: &impl askama::Template) -> Response {
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering a console page failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered\n").into_response()
        }
    }
}

/// A duration for people: `3h 12m`, `45s`.
pub(crate) fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Result<ConsoleSettings, ConfigError> {
        let map: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        ConsoleSettings::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn the_token_is_required_long_and_from_one_place() {
        assert_eq!(settings(&[]).unwrap_err().var, "CONSOLE_TOKEN");
        assert_eq!(settings(&[("CONSOLE_TOKEN", "short")]).unwrap_err().var, "CONSOLE_TOKEN");
        let ok = settings(&[("CONSOLE_TOKEN", "0123456789abcdef")]).unwrap();
        assert_eq!(ok.addr, "127.0.0.1:8090".parse().unwrap(), "loopback by default");
        assert!(!ok.read_only);
        assert!(!format!("{ok:?}").contains("0123456789abcdef"), "the token is never printed");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-a-file-0123456789\n").unwrap();
        let path = file.to_str().unwrap();
        assert_eq!(settings(&[("CONSOLE_TOKEN_FILE", path)]).unwrap().token, "from-a-file-0123456789");
        let both = settings(&[("CONSOLE_TOKEN_FILE", path), ("CONSOLE_TOKEN", "0123456789abcdef")]);
        assert_eq!(both.unwrap_err().var, "CONSOLE_TOKEN_FILE");
    }

    #[test]
    fn read_only_and_the_management_url_are_checked() {
        let token = ("CONSOLE_TOKEN", "0123456789abcdef");
        assert!(settings(&[token, ("CONSOLE_READ_ONLY", "true")]).unwrap().read_only);
        assert_eq!(settings(&[token, ("CONSOLE_READ_ONLY", "maybe")]).unwrap_err().var, "CONSOLE_READ_ONLY");
        assert_eq!(
            settings(&[token, ("RABBITMQ_MANAGEMENT_URL", "amqp://x")]).unwrap_err().var,
            "RABBITMQ_MANAGEMENT_URL"
        );
        assert_eq!(settings(&[token, ("CONSOLE_ADDR", "nowhere")]).unwrap_err().var, "CONSOLE_ADDR");
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(short_duration(Duration::from_secs(42)), "42s");
        assert_eq!(short_duration(Duration::from_secs(3 * 3600 + 12 * 60 + 5)), "3h 12m");
        assert_eq!(short_duration(Duration::from_secs(2 * 86400 + 3600)), "2d 1h");
    }
}
