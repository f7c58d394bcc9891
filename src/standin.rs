//! A stand-in for the audio-generation service: serves the files of a folder at
//! `GET /temp/{filename}` and deletes them on `DELETE /api/cleanup/temp/{filename}`.
//!
//! The demo and docker compose run it as the `audio-gen-standin` binary. Tests run it in
//! process and script faults per file name (HTTP statuses, a hang, a connection closed
//! mid-body) and read back every request it saw.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};

/// A scripted misbehaviour for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Answer with this HTTP status and no audio.
    Status(u16),
    /// Wait this long before answering (normally).
    Hang(Duration),
    /// Send the headers and half of the body, then close the connection.
    CloseEarly,
    /// Send the headers (the whole Content-Length), then the body one byte at a time with this
    /// pause between bytes: a peer that never stalls long enough for a read timeout but would
    /// take hours to finish.
    Drip(Duration),
}

/// A request the stand-in received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    /// `GET` or `DELETE`.
    pub method: String,
    /// The decoded file name.
    pub filename: String,
}

/// Shared state: the folder, the scripted faults and the request log.
#[derive(Debug, Default)]
pub struct Standin {
    /// Folder whose files are served.
    dir: PathBuf,
    /// Faults to apply, in order, to the next requests for a file name.
    faults: Mutex<HashMap<String, VecDeque<Fault>>>,
    /// Every request, in arrival order.
    seen: Mutex<Vec<SeenRequest>>,
}

impl Standin {
    /// A stand-in serving `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Arc<Self> {
        Arc::new(Self { dir: dir.into(), ..Self::default() })
    }

    /// The served folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queues faults for the next GETs of `filename`; once they are used up it is served normally.
    pub fn script(&self, filename: &str, faults: impl IntoIterator<Item = Fault>) {
        self.faults.lock().expect("lock").entry(filename.to_owned()).or_default().extend(faults);
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().expect("lock").clone()
    }

    /// How many requests with `method` for `filename` were seen.
    pub fn count(&self, method: &str, filename: &str) -> usize {
        self.seen().iter().filter(|r| r.method == method && r.filename == filename).count()
    }

    fn record(&self, method: &str, filename: &str) {
        self.seen
            .lock()
            .expect("lock")
            .push(SeenRequest { method: method.into(), filename: filename.into() });
    }

    fn next_fault(&self, filename: &str) -> Option<Fault> {
        self.faults.lock().expect("lock").get_mut(filename).and_then(VecDeque::pop_front)
    }

    /// The file for a name taken from a URL, refusing anything that could leave the folder.
    fn file(&self, filename: &str) -> Option<PathBuf> {
        let safe =
            !filename.is_empty() && !filename.starts_with('.') && !filename.contains(['/', '\\', '\0']);
        safe.then(|| self.dir.join(filename))
    }
}

/// The routes, with `/healthz` for container healthchecks.
pub fn router(state: Arc<Standin>) -> Router {
    Router::new()
        .route("/temp/{filename}", get(serve_file))
        .route("/api/cleanup/temp/{filename}", delete(delete_file))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// Serves on `listener` until `shutdown` resolves.
///
/// # Errors
/// The listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<Standin>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // TCP_NODELAY: without it a reused connection waits out the client's delayed ACK (~40 ms)
    // before the last segment of each response.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

async fn serve_file(State(state): State<Arc<Standin>>, UrlPath(filename): UrlPath<String>) -> Response {
    state.record("GET", &filename);
    let fault = state.next_fault(&filename);
    match &fault {
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (status, format!("scripted {code}\n")).into_response();
        }
        Some(Fault::Hang(pause)) => tokio::time::sleep(*pause).await,
        _ => {}
    }
    let Some(path) = state.file(&filename) else {
        return (StatusCode::BAD_REQUEST, "bad file name\n").into_response();
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(_) => return (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = if let Some(Fault::Drip(pause)) = fault {
        let bytes = tokio::fs::read(&path).await.unwrap_or_default();
        let drip = futures_util::stream::unfold((bytes, 0usize), move |(bytes, at)| async move {
            if at >= bytes.len() {
                return None;
            }
            if at > 0 {
                tokio::time::sleep(pause).await;
            }
            let byte = axum::body::Bytes::copy_from_slice(&bytes[at..=at]);
            Some((Ok::<_, std::io::Error>(byte), (bytes, at + 1)))
        });
        Body::from_stream(drip)
    } else if fault == Some(Fault::CloseEarly) {
        let half = tokio_util::io::ReaderStream::new(tokio::io::AsyncReadExt::take(file, len / 2));
        let broken = futures_util::stream::iter([Err(std::io::Error::other("scripted early close"))]);
        Body::from_stream(futures_util::StreamExt::chain(half, broken))
    } else {
        Body::from_stream(tokio_util::io::ReaderStream::new(file))
    };
    let content_type = match path.extension().and_then(|e| e.to_str()) {
        Some("wav") => "audio/wav",
        Some("mp3") => "audio/mpeg",
        _ => "application/octet-stream",
    };
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, len)
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn delete_file(State(state): State<Arc<Standin>>, UrlPath(filename): UrlPath<String>) -> StatusCode {
    state.record("DELETE", &filename);
    let Some(path) = state.file(&filename) else {
        return StatusCode::BAD_REQUEST;
    };
    match tokio::fs::remove_file(&path).await {
        Ok(()) => StatusCode::NO_CONTENT,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => StatusCode::NOT_FOUND,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}
