//! Stage 1: download the audio into a spool file, hashing it on the way.
//!
//! The body is streamed chunk by chunk to a temporary file under `WORKER_TMP_DIR`, so memory per
//! job stays at one chunk whatever the file size, and the upload can be retried without
//! downloading again. The SHA-256 and the real format are known when the download ends.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use url::Url;

use crate::asset::Downloaded;
use crate::audio::decode::DecodeSettings;
use crate::audio::measure::{MeasureError, Measured};
use crate::audio::{AudioFormat, Measure};
use crate::config::AudioGenSettings;
use crate::error::{Stage, StageError, chain, redact_url};
use crate::pipeline::spool::SpoolWriter;
use crate::url_policy::{UrlPolicy, find_refusal};

/// How far a download has got in its spool file, published while it runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Spooled {
    /// The spool file, once it exists.
    pub path: Option<std::path::PathBuf>,
    /// Bytes written and flushed, so another handle on the file reads them.
    pub flushed: u64,
    /// The format its first bytes were recognised as (published once known).
    pub format: Option<AudioFormat>,
    /// CRC32C (base64, as S3's `x-amz-checksum-crc32c` wants it) of each complete `step`-byte
    /// part flushed so far, in order: the multipart upload sends each part with its checksum,
    /// computed here in the one pass over the bytes.
    pub part_checksums: Vec<String>,
}

/// CRC32C of consecutive `size`-byte parts of a stream.
struct PartChecksums {
    size: u64,
    done: Vec<String>,
    current: Box<dyn aws_smithy_checksums::http::HttpChecksum>,
    filled: u64,
}

impl PartChecksums {
    fn new(size: u64) -> Self {
        Self { size, done: Vec::new(), current: Self::fresh(), filled: 0 }
    }

    fn fresh() -> Box<dyn aws_smithy_checksums::http::HttpChecksum> {
        aws_smithy_checksums::ChecksumAlgorithm::Crc32c.into_impl()
    }

    fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let take = (self.size - self.filled).min(bytes.len() as u64) as usize;
            self.current.update(&bytes[..take]);
            self.filled += take as u64;
            bytes = &bytes[take..];
            if self.filled == self.size {
                self.close_part();
            }
        }
    }

    fn close_part(&mut self) {
        let part = std::mem::replace(&mut self.current, Self::fresh());
        self.done.push(part.header_value().to_str().unwrap_or_default().to_owned());
        self.filled = 0;
    }

    /// Every part's checksum, the last (partial) one included.
    fn finish(mut self) -> Vec<String> {
        if self.filled > 0 {
            self.close_part();
        }
        self.done
    }
}

/// Deletes spool files (`audio-*.part`) in `dir` last written more than `older_than` ago: what
/// a worker killed mid-download left behind. Returns how many were removed.
pub fn remove_stale_spool_files(dir: &Path, older_than: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let now = std::time::SystemTime::now();
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("audio-") && name.ends_with(".part")
        })
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > older_than)
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// Builds the HTTP client for downloads and cleanups: connect and read timeouts (no
/// whole-request deadline, since a large file served slowly is fine as long as bytes keep
/// coming), the URL policy's DNS resolver and redirect policy, and no proxy from the
/// environment (a proxy would resolve names where the policy cannot see them).
///
/// # Errors
/// When the TLS backend cannot be initialised.
pub fn http_client(
    connect_timeout: Duration,
    read_timeout: Duration,
    policy: &UrlPolicy,
) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .read_timeout(read_timeout)
        .user_agent(concat!("audio-worker/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(policy.resolver())
        .redirect(policy.redirect_policy())
        .no_proxy()
        .build()
}

/// The stage error for a failed request: permanent when the URL policy refused it (by its
/// resolver or its redirect policy), transient otherwise (connect/read failures).
fn request_error(shown: &str, what: &str, error: reqwest::Error) -> StageError {
    match find_refusal(&error) {
        Some(refused) => StageError::permanent(Stage::Download, format!("GET {shown}: {refused}")),
        None => StageError::transient(
            Stage::Download,
            format!("GET {shown}: {what}{}", chain(&error.without_url())),
        ),
    }
}

/// What a download may take: its size, and how slowly its body may arrive.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `MAX_AUDIO_BYTES`: a larger body is a permanent error.
    pub max_bytes: u64,
    /// `DOWNLOAD_MIN_BYTES_PER_SEC` (0: no floor): a body arriving slower, measured over
    /// `rate_window`, is a transient error.
    pub min_bytes_per_sec: u64,
    /// `DOWNLOAD_RATE_WINDOW_SECS`: the sliding window of the rate floor.
    pub rate_window: Duration,
    /// `ANALYSIS`, `WAVEFORM`, `RENDITIONS`: what the decoded samples are for as they stream in
    /// (nothing: the take is only measured).
    pub decode: DecodeSettings,
}

impl Limits {
    /// The limits `settings` configure.
    pub fn of(settings: &AudioGenSettings) -> Self {
        Self {
            max_bytes: settings.max_audio_bytes,
            min_bytes_per_sec: settings.min_bytes_per_sec,
            rate_window: settings.rate_window,
            decode: DecodeSettings {
                analysis: settings.analysis,
                waveform: settings.waveform,
                renditions: settings.renditions,
            },
        }
    }
}

/// The rate floor over a sliding window: samples of the bytes received so far, at least a second
/// apart, keeping the newest one at least a window old, so the rate is always measured over a
/// window or a little more. The first window of a body is never judged (a connection warming up).
struct RateFloor {
    limits: Limits,
    started: Instant,
    /// `(when, bytes received by then)`, oldest first; starts with `(started, 0)`.
    samples: VecDeque<(Instant, u64)>,
}

impl RateFloor {
    fn new(limits: Limits) -> Self {
        let started = Instant::now();
        Self { limits, started, samples: VecDeque::from([(started, 0)]) }
    }

    /// `Err((bytes, over))` when the last window brought fewer bytes than the floor allows.
    fn check(&mut self, received: u64) -> Result<(), (u64, Duration)> {
        let Limits { min_bytes_per_sec: min, rate_window: window, .. } = self.limits;
        let now = Instant::now();
        if min == 0 {
            return Ok(());
        }
        if self.samples.back().is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_secs(1)) {
            self.samples.push_back((now, received));
        }
        if now.duration_since(self.started) < window {
            return Ok(());
        }
        let cut = now - window;
        while self.samples.get(1).is_some_and(|(t, _)| *t <= cut) {
            self.samples.pop_front();
        }
        let (since, base) = self.samples[0];
        let over = now.duration_since(since);
        let bytes = received - base;
        if (bytes as f64) < (min as f64) * over.as_secs_f64() { Err((bytes, over)) } else { Ok(()) }
    }
}

/// Downloads `url` into a new spool file in `dir`, checks that it is audio and measures it, in
/// one pass over the bytes: each chunk is hashed (SHA-256, and CRC32C per part when uploading
/// in parts), written to the spool file and measured ([`Measure`]) as it arrives.
///
/// # Errors
/// A [`StageError`] of stage `download`: transient for connect/read failures (a body cut short
/// of its Content-Length included) and HTTP 5xx/408/429; permanent for a URL the policy refuses,
/// other HTTP statuses, an empty body, a body over `limits.max_bytes` (stopped as soon as it
/// passes the limit), a body arriving slower than `limits.min_bytes_per_sec` over the rate
/// window (transient: the peer may recover), a body longer than its Content-Length, bytes that are not WAV, MP3, Ogg or FLAC (an
/// HTML or JSON error page served with 200 is refused at its first bytes), or a stream the
/// demuxer cannot read or that is shorter than its own header says. A spool file that cannot be
/// written is transient (the disk may free up).
///
/// With `progress`, the spool file's path and how many bytes of it are flushed (readable by
/// another file handle) are published every `step` bytes and at the end (see
/// [`crate::pipeline::transfer`]); nothing is published for a body whose Content-Length says it
/// is smaller than `step`. The sender is dropped when the download ends, either way. With
/// `progress` the CRC32C of each `step`-byte part is computed too ([`Downloaded::part_checksums`]).
pub async fn download(
    client: &reqwest::Client,
    url: &Url,
    dir: &Path,
    limits: Limits,
    mut progress: Option<(tokio::sync::watch::Sender<Spooled>, u64)>,
) -> Result<Downloaded, StageError> {
    let max_bytes = limits.max_bytes;
    let shown = redact_url(url);
    let response = client.get(url.clone()).send().await.map_err(|e| request_error(&shown, "", e))?;
    let status = response.status();
    if !status.is_success() {
        let reason = format!("GET {shown}: HTTP {status}");
        let retry = status.is_server_error()
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
        return Err(if retry {
            StageError::transient(Stage::Download, reason)
        } else {
            StageError {
                not_found: matches!(status.as_u16(), 404 | 410),
                ..StageError::permanent(Stage::Download, reason)
            }
        });
    }
    let declared = response.content_length();
    if declared.is_some_and(|len| progress.as_ref().is_some_and(|(_, step)| len < *step)) {
        progress = None;
    }
    if let Some(len) = declared.filter(|len| *len > max_bytes) {
        return Err(StageError::permanent(
            Stage::Download,
            format!("GET {shown}: body of {len} bytes exceeds MAX_AUDIO_BYTES={max_bytes}"),
        ));
    }

    let spool_error = |e: std::io::Error| {
        StageError::transient(Stage::Download, format!("spool file in {}: {e}", dir.display()))
    };
    let (file, path) = tempfile::Builder::new()
        .prefix("audio-")
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(spool_error)?
        .into_parts();
    let mut file = SpoolWriter::new(file);
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut head = Vec::with_capacity(AudioFormat::SNIFF_BYTES);
    let mut format = None;
    // Chunks that came before the format was known, then the measurement they start.
    let mut early: Vec<bytes::Bytes> = Vec::new();
    let mut measure: Option<Measure> = None;
    let mut parts = progress.as_ref().map(|(_, step)| PartChecksums::new(*step));
    let mut body = response.bytes_stream();
    let mut floor = RateFloor::new(limits);
    let too_slow = |size: u64, (bytes, over): (u64, Duration)| {
        StageError::transient(
            Stage::Download,
            format!(
                "GET {shown}: body too slow: {bytes} bytes in the last {:.0} s, under \
                 DOWNLOAD_MIN_BYTES_PER_SEC={} (over DOWNLOAD_RATE_WINDOW_SECS={}); stopped at {size} bytes",
                over.as_secs_f64(),
                limits.min_bytes_per_sec,
                limits.rate_window.as_secs()
            ),
        )
    };
    loop {
        // Wake at least every second, so the rate floor is judged while nothing arrives too.
        let chunk = match tokio::time::timeout(Duration::from_secs(1), body.next()).await {
            Err(_) => {
                floor.check(size).map_err(|slow| too_slow(size, slow))?;
                continue;
            }
            Ok(None) => break,
            Ok(Some(chunk)) => chunk,
        };
        let chunk = chunk.map_err(|e| request_error(&shown, &format!("body after {size} bytes: "), e))?;
        size += chunk.len() as u64;
        floor.check(size).map_err(|slow| too_slow(size, slow))?;
        if size > max_bytes {
            return Err(StageError::permanent(
                Stage::Download,
                format!("GET {shown}: body exceeds MAX_AUDIO_BYTES={max_bytes}; stopped at {size} bytes"),
            ));
        }
        if format.is_none() {
            let take = (AudioFormat::SNIFF_BYTES - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
            early.push(chunk.clone());
            if head.len() == AudioFormat::SNIFF_BYTES {
                let sniffed = sniff(&shown, &head)?;
                format = Some(sniffed);
                measure = Some(start_measure(sniffed, limits.decode, dir, std::mem::take(&mut early)).await);
            }
        } else if let Some(measure) = measure.as_mut() {
            measure.feed(&chunk).await;
        }
        hasher.update(&chunk);
        if let Some(parts) = parts.as_mut() {
            parts.update(&chunk);
        }
        file.push(chunk).await.map_err(spool_error)?;
        if let Some((sender, step)) = &progress
            && file.written() / step > sender.borrow().flushed / step
        {
            let part_checksums = parts.as_ref().map(|p| p.done.clone()).unwrap_or_default();
            let flushed = file.written();
            let spooled = Spooled { path: Some(path.to_path_buf()), flushed, format, part_checksums };
            if sender.send(spooled).is_err() {
                progress = None;
            }
        }
    }
    if size == 0 {
        return Err(StageError::permanent(Stage::Download, format!("GET {shown}: empty body")));
    }
    if let Some(len) = declared.filter(|len| *len != size) {
        return Err(StageError::permanent(
            Stage::Download,
            format!("GET {shown}: body of {size} bytes does not match its Content-Length of {len}"),
        ));
    }
    let (format, measure) = match (format, measure) {
        (Some(format), Some(measure)) => (format, measure),
        _ => {
            let format = sniff(&shown, &head)?;
            (format, start_measure(format, limits.decode, dir, early).await)
        }
    };
    // Flushed to the OS, not synced to the disk: the spool file is scratch space, and a crash
    // loses the job's attempt, not data (the broker redelivers it).
    file.flush().await.map_err(spool_error)?;
    drop(progress);
    drop(file);
    let measured = judge_measure(&shown, measure.finish(size).await)?;
    Ok(Downloaded {
        path,
        size,
        sha256: hex::encode(hasher.finalize()),
        format,
        measured_duration: measured.seconds,
        analysis: measured.decoded.analysis,
        derived: measured.decoded.encoded,
        waveform_skipped: measured.decoded.waveform_skipped,
        renditions_skipped: measured.decoded.renditions_skipped,
        part_checksums: parts.map(PartChecksums::finish).unwrap_or_default(),
    })
}

/// Starts measuring a body of `format` with the chunks that came before it was recognised.
async fn start_measure(
    format: AudioFormat,
    decode: DecodeSettings,
    dir: &Path,
    early: Vec<bytes::Bytes>,
) -> Measure {
    let mut measure = Measure::start(format, decode, dir.to_path_buf());
    for chunk in &early {
        measure.feed(chunk).await;
    }
    measure
}

/// The measuring task's result as the download's: a demuxer that panics on these bytes panics on
/// them every time, so that is a permanent error like a stream it refuses (downloading the file
/// again cannot help); a waveform or rendition file that cannot be written, or a task that was
/// cancelled (shutdown), is transient.
fn judge_measure(
    shown: &str,
    joined: Result<Result<Measured, MeasureError>, tokio::task::JoinError>,
) -> Result<Measured, StageError> {
    match joined {
        Ok(Ok(measured)) => Ok(measured),
        Ok(Err(MeasureError::Refused(m))) => {
            Err(StageError::permanent(Stage::Download, format!("GET {shown}: {m}")))
        }
        Ok(Err(MeasureError::Spool(m))) => {
            Err(StageError::transient(Stage::Download, format!("GET {shown}: {m}")))
        }
        Err(e) if e.is_panic() => Err(StageError::permanent(
            Stage::Download,
            format!("GET {shown}: the demuxer failed on this file (it panicked)"),
        )),
        Err(e) => Err(StageError::transient(Stage::Download, format!("measuring the audio: {e}"))),
    }
}

/// [`AudioFormat::sniff`], as a permanent error that shows what the bytes look like instead.
fn sniff(shown: &str, head: &[u8]) -> Result<AudioFormat, StageError> {
    AudioFormat::sniff(head).ok_or_else(|| {
        let text = String::from_utf8_lossy(&head[..head.len().min(24)]);
        let looks_like = match text.trim_start().chars().next() {
            Some('<') => "an HTML or XML page",
            Some('{' | '[') => "JSON",
            _ => "unknown bytes",
        };
        StageError::permanent(
            Stage::Download,
            format!(
                "GET {shown}: not a WAV, MP3, Ogg or FLAC file: the body is {looks_like} (first bytes {:?})",
                text.chars().map(|c| if c.is_control() { '.' } else { c }).collect::<String>()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_demuxer_panic_is_permanent() {
        let panicked =
            tokio::task::spawn_blocking(|| -> Result<Measured, MeasureError> { panic!("demuxer bug") }).await;
        let error = judge_measure("http://gen/temp/x.wav", panicked).unwrap_err();
        assert!(!error.is_transient(), "downloading the same bytes again cannot help");
        assert_eq!(error.reason, "GET http://gen/temp/x.wav: the demuxer failed on this file (it panicked)");
        let refused = judge_measure("u", Ok(Err(MeasureError::Refused("truncated".into())))).unwrap_err();
        assert!(!refused.is_transient());
        let full = judge_measure("u", Ok(Err(MeasureError::Spool("disk full".into())))).unwrap_err();
        assert!(full.is_transient(), "the disk may free up");
        let measured = Measured { seconds: 1.5, decoded: Default::default() };
        assert_eq!(judge_measure("u", Ok(Ok(measured))).unwrap().seconds, 1.5);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_floor_judges_a_sliding_window_after_the_first() {
        let limits = Limits {
            max_bytes: 1 << 20,
            min_bytes_per_sec: 100,
            rate_window: Duration::from_secs(10),
            decode: DecodeSettings::default(),
        };
        let mut floor = RateFloor::new(limits);
        let mut received = 0;
        // 150 B/s for 20 s: fine.
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(1)).await;
            received += 150;
            assert!(floor.check(received).is_ok());
        }
        // Then one byte a second: judged once the slow part fills most of a window.
        let mut failed_after = None;
        for second in 1..=20 {
            tokio::time::advance(Duration::from_secs(1)).await;
            received += 1;
            if let Err((bytes, over)) = floor.check(received) {
                assert!(over >= Duration::from_secs(10), "{over:?}");
                assert!((bytes as f64) < 100.0 * over.as_secs_f64());
                failed_after = Some(second);
                break;
            }
        }
        let second = failed_after.expect("the drip was caught");
        assert!((4..=10).contains(&second), "caught {second} s into the drip");
        // The first window is never judged, however slow.
        let mut fresh = RateFloor::new(limits);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(fresh.check(0).is_ok());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(fresh.check(0).is_err());
    }
}
