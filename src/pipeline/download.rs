//! Stage 1: download the audio into a spool file, hashing it on the way.
//!
//! The body is streamed chunk by chunk to a temporary file under `WORKER_TMP_DIR`, so memory per
//! job stays at one chunk whatever the file size, and the upload can be retried without
//! downloading again. The SHA-256 and the real format are known when the download ends.

use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tempfile::TempPath;
use tokio::io::AsyncWriteExt;
use url::Url;

use crate::error::{Stage, StageError, chain, redact_url};
use crate::url_policy::{UrlPolicy, find_refusal};

/// A container format recognised from the first bytes of the file, not from the URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioFormat {
    /// RIFF/WAVE.
    Wav,
    /// MPEG layer III, with or without an ID3 tag.
    Mp3,
    /// Ogg (Vorbis or Opus).
    Ogg,
    /// FLAC.
    Flac,
}

impl AudioFormat {
    /// Bytes [`AudioFormat::sniff`] wants: an Ogg page header and the codec id after it.
    pub const SNIFF_BYTES: usize = 64;

    /// Recognises a format from the first bytes of a file (the `infer` crate's magic numbers),
    /// whatever the server's Content-Type said.
    pub fn sniff(head: &[u8]) -> Option<Self> {
        use infer::audio;
        if audio::is_wav(head) {
            Some(Self::Wav)
        } else if audio::is_flac(head) {
            Some(Self::Flac)
        } else if audio::is_ogg(head) || audio::is_ogg_opus(head) {
            Some(Self::Ogg)
        } else if audio::is_mp3(head) || is_mpeg_layer3_frame(head) {
            Some(Self::Mp3)
        } else {
            None
        }
    }

    /// The format's usual name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Wav => "WAV",
            Self::Mp3 => "MP3",
            Self::Ogg => "Ogg",
            Self::Flac => "FLAC",
        }
    }

    /// The object key's file extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Wav => "wav",
            Self::Mp3 => "mp3",
            Self::Ogg => "ogg",
            Self::Flac => "flac",
        }
    }

    /// The object's Content-Type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Wav => "audio/wav",
            Self::Mp3 => "audio/mpeg",
            Self::Ogg => "audio/ogg",
            Self::Flac => "audio/flac",
        }
    }
}

/// An MPEG audio layer III frame header that `infer` does not list (it knows `FF FB`, `FF F3`
/// and `FF F2` only, so 8 kHz MPEG-2.5 and CRC-protected frames would be refused): 11 sync bits,
/// a real version (not `01`), layer III (`01`), and a bitrate index that is not `1111`. This
/// keeps out e.g. UTF-16 text (`FF FE`); the demuxer then confirms the stream.
fn is_mpeg_layer3_frame(head: &[u8]) -> bool {
    matches!(head, [0xFF, second, third, ..]
        if second & 0xE0 == 0xE0 && second & 0x18 != 0x08 && second & 0x06 == 0x02 && third & 0xF0 != 0xF0)
}

/// How far a download has got in its spool file, published while it runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Spooled {
    /// The spool file, once it exists.
    pub path: Option<std::path::PathBuf>,
    /// Bytes written and flushed, so another handle on the file reads them.
    pub flushed: u64,
    /// The format its first bytes were recognised as (published once known).
    pub format: Option<AudioFormat>,
}

/// A finished download: the spool file is deleted when this is dropped.
#[derive(Debug)]
pub struct Downloaded {
    /// The spool file holding the whole body.
    pub path: TempPath,
    /// Body length in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the body.
    pub sha256: String,
    /// The format recognised from the first bytes and confirmed by the demuxer.
    pub format: AudioFormat,
    /// Seconds of audio, measured from the stream's packets (not from the job).
    pub measured_duration: f64,
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

/// Downloads `url` into a new spool file in `dir`, checks that it is audio and measures it.
///
/// # Errors
/// A [`StageError`] of stage `download`: transient for connect/read failures (a body cut short
/// of its Content-Length included) and HTTP 5xx/408/429; permanent for a URL the policy refuses,
/// other HTTP statuses, an empty body, a body over `max_bytes` (stopped as soon as it passes the
/// limit), a body longer than its Content-Length, bytes that are not WAV, MP3, Ogg or FLAC (an
/// HTML or JSON error page served with 200 is refused at its first bytes), or a stream the
/// demuxer cannot read or that is shorter than its own header says. A spool file that cannot be
/// written is transient (the disk may free up).
///
/// With `progress`, the spool file's path and how many bytes of it are flushed (readable by
/// another file handle) are published every `step` bytes and at the end (see
/// [`crate::pipeline::transfer`]); nothing is published for a body whose Content-Length says it
/// is smaller than `step`. The sender is dropped when the download ends, either way.
pub async fn download(
    client: &reqwest::Client,
    url: &Url,
    dir: &Path,
    max_bytes: u64,
    mut progress: Option<(tokio::sync::watch::Sender<Spooled>, u64)>,
) -> Result<Downloaded, StageError> {
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
    let mut file = tokio::fs::File::from_std(file);
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut head = Vec::with_capacity(AudioFormat::SNIFF_BYTES);
    let mut format = None;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| request_error(&shown, &format!("body after {size} bytes: "), e))?;
        size += chunk.len() as u64;
        if size > max_bytes {
            return Err(StageError::permanent(
                Stage::Download,
                format!("GET {shown}: body exceeds MAX_AUDIO_BYTES={max_bytes}; stopped at {size} bytes"),
            ));
        }
        if format.is_none() {
            let take = (AudioFormat::SNIFF_BYTES - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
            if head.len() == AudioFormat::SNIFF_BYTES {
                format = Some(sniff(&shown, &head)?);
            }
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(spool_error)?;
        if let Some((sender, step)) = &progress
            && size / step > sender.borrow().flushed / step
        {
            file.flush().await.map_err(spool_error)?;
            let spooled = Spooled { path: Some(path.to_path_buf()), flushed: size, format };
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
    let format = match format {
        Some(format) => format,
        None => sniff(&shown, &head)?,
    };
    // Flushed to the OS, not synced to the disk: the spool file is scratch space, and a crash
    // loses the job's attempt, not data (the broker redelivers it).
    file.flush().await.map_err(spool_error)?;
    drop(progress);
    drop(file);
    let spool = path.to_path_buf();
    let measured = tokio::task::spawn_blocking(move || measure(&spool, format))
        .await
        .map_err(|e| StageError::transient(Stage::Download, format!("measuring the audio: {e}")))?
        .map_err(|m| StageError::permanent(Stage::Download, format!("GET {shown}: {m}")))?;
    Ok(Downloaded { path, size, sha256: hex::encode(hasher.finalize()), format, measured_duration: measured })
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

/// Reads the spool file with symphonia's demuxer (no decoding) and returns the seconds of audio
/// its packets hold.
///
/// # Errors
/// A message when the container does not parse as `format`, has no audio track, or holds at
/// least 0.1 s less audio than its header declares (a truncated file).
pub fn measure(path: &Path, format: AudioFormat) -> Result<f64, String> {
    use symphonia::core::errors::Error;
    use symphonia::core::formats::probe::Hint;
    use symphonia::core::formats::{FormatOptions, TrackType};
    use symphonia::core::io::MediaSourceStream;
    use symphonia::core::meta::MetadataOptions;

    let file = std::fs::File::open(path).map_err(|e| format!("reopening the spool file: {e}"))?;
    let mss = MediaSourceStream::new(Box::new(file), Default::default());
    let mut hint = Hint::new();
    hint.with_extension(format.extension());
    let mut reader = symphonia::default::get_probe()
        .probe(&hint, mss, FormatOptions::default(), MetadataOptions::default())
        .map_err(|e| match e {
            Error::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                format!("truncated {} file (it ends inside its header)", format.name())
            }
            e => format!("not a readable {} stream ({e})", format.name()),
        })?;
    let track = reader
        .default_track(TrackType::Audio)
        .ok_or_else(|| format!("the {} file has no audio track", format.name()))?;
    let (track_id, time_base, declared) = (track.id, track.time_base, track.duration);
    let time_base = time_base.ok_or_else(|| format!("the {} stream has no time base", format.name()))?;
    let mut counted: u64 = 0;
    loop {
        match reader.next_packet() {
            Ok(Some(packet)) if packet.track_id == track_id => counted += packet.dur.get(),
            Ok(Some(_)) => {}
            Ok(None) => break,
            // A stream cut mid-packet ends here; the comparison below tells whether audio is missing.
            Err(Error::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => {
                return Err(format!("the {} stream is corrupt after {counted} ticks ({e})", format.name()));
            }
        }
    }
    let seconds = |ticks: u64| {
        time_base
            .calc_duration(symphonia::core::units::Duration::new(ticks))
            .map_or(f64::MAX, |t| t.as_secs_f64())
    };
    let mut measured = seconds(counted);
    if let Some(declared) = declared.map(|d| seconds(d.get())) {
        // WAV and FLAC headers state the exact length, so less audio than that is a cut file.
        // An MP3's is an encoder tag or an estimate from the bitrate, and Ogg has none.
        if measured + 0.1 < declared && matches!(format, AudioFormat::Wav | AudioFormat::Flac) {
            return Err(format!(
                "truncated {} file: its header declares {declared:.3} s but it holds {measured:.3} s",
                format.name()
            ));
        }
        // Whole MP3 frames include the encoder's delay and padding; the header's length does not.
        if declared <= measured {
            measured = declared;
        }
    }
    if counted == 0 {
        return Err(format!("the {} stream holds no audio", format.name()));
    }
    Ok(measured)
}

#[cfg(test)]
mod tests {
    use super::{AudioFormat, measure};
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/audio").join(name)
    }

    #[test]
    fn formats_are_recognised_from_their_magic_bytes() {
        assert_eq!(AudioFormat::sniff(b"RIFF\x24\x00\x00\x00WAVEfmt "), Some(AudioFormat::Wav));
        assert_eq!(AudioFormat::sniff(b"ID3\x04\x00\x00\x00\x00\x00\x00\x00\x00"), Some(AudioFormat::Mp3));
        assert_eq!(AudioFormat::sniff(&[0xFF, 0xFB, 0x90, 0x00]), Some(AudioFormat::Mp3));
        assert_eq!(AudioFormat::sniff(&[0xFF, 0xE3, 0x28, 0xC4]), Some(AudioFormat::Mp3), "MPEG-2.5, 8 kHz");
        assert_eq!(AudioFormat::sniff(b"OggS\x00\x02"), Some(AudioFormat::Ogg));
        assert_eq!(AudioFormat::sniff(b"fLaC\x00\x00"), Some(AudioFormat::Flac));
        assert_eq!(AudioFormat::sniff(b"<html><body>"), None);
        assert_eq!(AudioFormat::sniff(b"{\"error\":\"not found\"}"), None);
        assert_eq!(AudioFormat::sniff(&[0xFF, 0xFE, b'h', 0, b'i', 0]), None, "UTF-16 text");
        assert_eq!(AudioFormat::sniff(b"RIFF\x24\x00\x00\x00AVI LIST"), None);
        assert_eq!(AudioFormat::Wav.extension(), "wav");
        assert_eq!(AudioFormat::Wav.content_type(), "audio/wav");
    }

    /// Real files of each format (made with sox, lame, oggenc, opusenc and flac; see
    /// tests/fixtures/audio/README.md): the sniffed format and the measured duration (1.5 s).
    #[test]
    fn real_files_are_sniffed_and_measured() {
        // MP3s are measured in whole frames (72 ms at 8 kHz), encoder delay and padding included:
        // well inside the 0.5 s that flags a mismatch.
        for (name, format, tolerance) in [
            ("tone.wav", AudioFormat::Wav, 0.01),
            ("tone-extensible.wav", AudioFormat::Wav, 0.01),
            ("tone.mp3", AudioFormat::Mp3, 0.2),
            ("tone-id3.mp3", AudioFormat::Mp3, 0.1),
            ("tone-vorbis.ogg", AudioFormat::Ogg, 0.01),
            ("tone-opus.ogg", AudioFormat::Ogg, 0.01),
            ("tone.flac", AudioFormat::Flac, 0.01),
        ] {
            let bytes = std::fs::read(fixture(name)).unwrap();
            assert_eq!(AudioFormat::sniff(&bytes[..AudioFormat::SNIFF_BYTES]), Some(format), "{name}");
            let seconds = measure(&fixture(name), format).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!((seconds - 1.5).abs() <= tolerance, "{name}: measured {seconds} s");
        }
    }

    #[test]
    fn truncated_and_mislabelled_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let wav = std::fs::read(fixture("tone.wav")).unwrap();
        let cut = dir.path().join("cut.wav");
        std::fs::write(&cut, &wav[..wav.len() / 2]).unwrap();
        let err = measure(&cut, AudioFormat::Wav).unwrap_err();
        assert!(err.contains("truncated WAV"), "{err}");
        let flac = std::fs::read(fixture("tone.flac")).unwrap();
        let cut = dir.path().join("cut.flac");
        std::fs::write(&cut, &flac[..flac.len() / 2]).unwrap();
        let err = measure(&cut, AudioFormat::Flac).unwrap_err();
        assert!(err.contains("truncated FLAC"), "{err}");
        let header_only = dir.path().join("header.wav");
        std::fs::write(&header_only, &wav[..44]).unwrap();
        assert!(measure(&header_only, AudioFormat::Wav).is_err());
        let html = dir.path().join("page.wav");
        std::fs::write(&html, b"RIFF\x24\x00\x00\x00WAVE<html>not really</html>").unwrap();
        assert!(measure(&html, AudioFormat::Wav).is_err());
    }
}
