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
    /// Recognises a format from the first (at least 12) bytes of a file.
    pub fn sniff(head: &[u8]) -> Option<Self> {
        match head {
            [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'A', b'V', b'E', ..] => Some(Self::Wav),
            [b'I', b'D', b'3', ..] => Some(Self::Mp3),
            // An MPEG frame header: 11 sync bits, a real version (not 01) and layer III (01),
            // and a bitrate index that is not 1111; this keeps out e.g. UTF-16 text (FF FE).
            [0xFF, second, third, ..]
                if second & 0xE0 == 0xE0
                    && second & 0x18 != 0x08
                    && second & 0x06 == 0x02
                    && third & 0xF0 != 0xF0 =>
            {
                Some(Self::Mp3)
            }
            [b'O', b'g', b'g', b'S', ..] => Some(Self::Ogg),
            [b'f', b'L', b'a', b'C', ..] => Some(Self::Flac),
            _ => None,
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

/// A finished download: the spool file is deleted when this is dropped.
#[derive(Debug)]
pub struct Downloaded {
    /// The spool file holding the whole body.
    pub path: TempPath,
    /// Body length in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the body.
    pub sha256: String,
    /// The format recognised from the first bytes.
    pub format: AudioFormat,
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

/// Builds the HTTP client for downloads: connect and read timeouts, no whole-request deadline,
/// since a large file served slowly is fine as long as bytes keep coming.
///
/// # Errors
/// When the TLS backend cannot be initialised.
pub fn http_client(connect_timeout: Duration, read_timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .read_timeout(read_timeout)
        .user_agent(concat!("audio-worker/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Downloads `url` into a new spool file in `dir`.
///
/// # Errors
/// A [`StageError`] of stage `download`: transient for connect/read failures and HTTP
/// 5xx/408/429; permanent for other HTTP statuses, an empty body, a body over `max_bytes`, or
/// bytes that are not a recognised audio format. A spool file that cannot be written is
/// transient (the disk may free up).
pub async fn download(
    client: &reqwest::Client,
    url: &Url,
    dir: &Path,
    max_bytes: u64,
) -> Result<Downloaded, StageError> {
    let shown = redact_url(url);
    let response = client.get(url.clone()).send().await.map_err(|e| {
        StageError::transient(Stage::Download, format!("GET {shown}: {}", chain(&e.without_url())))
    })?;
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
    if let Some(len) = response.content_length().filter(|len| *len > max_bytes) {
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
    let mut head = Vec::with_capacity(16);
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            StageError::transient(
                Stage::Download,
                format!("GET {shown}: body after {size} bytes: {}", chain(&e.without_url())),
            )
        })?;
        size += chunk.len() as u64;
        if size > max_bytes {
            return Err(StageError::permanent(
                Stage::Download,
                format!("GET {shown}: body exceeds MAX_AUDIO_BYTES={max_bytes}"),
            ));
        }
        if head.len() < 16 {
            let take = (16 - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(spool_error)?;
    }
    file.flush().await.map_err(spool_error)?;
    file.sync_data().await.map_err(spool_error)?;
    if size == 0 {
        return Err(StageError::permanent(Stage::Download, format!("GET {shown}: empty body")));
    }
    let format = AudioFormat::sniff(&head).ok_or_else(|| {
        StageError::permanent(
            Stage::Download,
            format!(
                "GET {shown}: not a WAV, MP3, Ogg or FLAC file (first bytes {})",
                hex::encode(&head[..head.len().min(12)])
            ),
        )
    })?;
    Ok(Downloaded { path, size, sha256: hex::encode(hasher.finalize()), format })
}

#[cfg(test)]
mod tests {
    use super::AudioFormat;

    #[test]
    fn formats_are_recognised_from_their_magic_bytes() {
        assert_eq!(AudioFormat::sniff(b"RIFF\x24\x00\x00\x00WAVEfmt "), Some(AudioFormat::Wav));
        assert_eq!(AudioFormat::sniff(b"ID3\x04\x00\x00\x00\x00\x00\x00\x00\x00"), Some(AudioFormat::Mp3));
        assert_eq!(AudioFormat::sniff(&[0xFF, 0xFB, 0x90, 0x00]), Some(AudioFormat::Mp3));
        assert_eq!(AudioFormat::sniff(b"OggS\x00\x02"), Some(AudioFormat::Ogg));
        assert_eq!(AudioFormat::sniff(b"fLaC\x00\x00"), Some(AudioFormat::Flac));
        assert_eq!(AudioFormat::sniff(b"<html><body>"), None);
        assert_eq!(AudioFormat::sniff(&[0xFF, 0xFE, b'h', 0, b'i', 0]), None, "UTF-16 text");
        assert_eq!(AudioFormat::sniff(b"RIFF\x24\x00\x00\x00AVI LIST"), None);
        assert_eq!(AudioFormat::Wav.extension(), "wav");
        assert_eq!(AudioFormat::Wav.content_type(), "audio/wav");
    }
}
