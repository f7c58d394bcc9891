//! Files the decoding pass writes beside the take ([`Encoded`]): its waveform
//! ([`crate::audio::waveform`]) and its renditions ([`crate::audio::rendition`]). Each is written
//! to a spool file as it is made ([`SpoolFile`]), hashed on the way, and uploaded next to the
//! audio under the same save lease.

use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};
use tempfile::TempPath;

/// A file made from the decoded samples, ready to upload.
#[derive(Debug)]
pub struct Encoded {
    /// What it is: the waveform or a rendition, with the facts the document records about it.
    pub what: EncodedKind,
    /// The spool file (deleted when this is dropped).
    pub path: TempPath,
    /// Bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the file, computed as it was written.
    pub sha256: String,
}

impl Encoded {
    /// What follows `{asset_id}.` in its object key: `peaks.json`, `flac.flac`, `vorbis.ogg`.
    pub fn key_suffix(&self) -> String {
        self.what.key_suffix()
    }

    /// The Content-Type it is stored and served with.
    pub fn content_type(&self) -> &'static str {
        self.what.content_type()
    }
}

/// What an [`Encoded`] file is.
#[derive(Debug, Clone, PartialEq)]
pub enum EncodedKind {
    /// Waveform peaks in the audiowaveform JSON format, version 2.
    Waveform(WaveformInfo),
    /// A rendition of the take in another codec.
    Rendition(RenditionInfo),
}

impl EncodedKind {
    /// See [`Encoded::key_suffix`].
    pub fn key_suffix(&self) -> String {
        match self {
            Self::Waveform(_) => "peaks.json".into(),
            Self::Rendition(r) => format!("{}.{}", r.rendition.name(), r.rendition.extension()),
        }
    }

    /// See [`Encoded::content_type`].
    pub fn content_type(&self) -> &'static str {
        match self {
            Self::Waveform(_) => "application/json",
            Self::Rendition(r) => r.rendition.content_type(),
        }
    }
}

/// The shape of a waveform file, as its JSON header states it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WaveformInfo {
    /// Channels in `data` (each pixel holds a min/max pair per channel).
    pub channels: u32,
    /// Frames per second of the decoded audio.
    pub sample_rate: u32,
    /// Frames summarised by each min/max pair (`WAVEFORM_SAMPLES_PER_PIXEL`).
    pub samples_per_pixel: u32,
    /// 8 or 16: the range of the values (`WAVEFORM_BITS`).
    pub bits: u32,
    /// Pixels (min/max pairs per channel).
    pub length: u64,
}

/// What a rendition is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenditionInfo {
    /// Which rendition.
    pub rendition: Rendition,
    /// The lossy rendition's target bitrate, kbit/s (`None` for FLAC).
    pub bitrate_kbps: Option<u32>,
}

/// One kind of rendition (an entry of `RENDITIONS`; made by [`crate::audio::rendition`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rendition {
    /// Lossless FLAC of a PCM WAV.
    Flac,
    /// Lossy Ogg Vorbis.
    Vorbis,
}

impl Rendition {
    /// Its name in `RENDITIONS`, the document and the object key.
    pub fn name(self) -> &'static str {
        match self {
            Self::Flac => "flac",
            Self::Vorbis => "vorbis",
        }
    }

    /// The file extension of its object key.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Flac => "flac",
            Self::Vorbis => "ogg",
        }
    }

    /// The Content-Type it is stored and served with.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Flac => "audio/flac",
            Self::Vorbis => "audio/ogg",
        }
    }
}

/// A spool file being written: buffered, hashed and counted as the bytes go in.
pub struct SpoolFile {
    file: BufWriter<std::fs::File>,
    path: TempPath,
    hasher: Sha256,
    size: u64,
}

impl std::fmt::Debug for SpoolFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpoolFile").field("path", &self.path).field("size", &self.size).finish()
    }
}

impl SpoolFile {
    /// A new file in `dir` (`WORKER_TMP_DIR`), deleted when it is dropped unfinished.
    ///
    /// # Errors
    /// The file cannot be created.
    pub fn create(dir: &Path, prefix: &str) -> std::io::Result<Self> {
        let (file, path) = tempfile::Builder::new().prefix(prefix).tempfile_in(dir)?.into_parts();
        Ok(Self { file: BufWriter::with_capacity(64 << 10, file), path, hasher: Sha256::new(), size: 0 })
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file, flushed: its path, size and SHA-256.
    ///
    /// # Errors
    /// The last bytes cannot be written.
    pub fn finish(mut self) -> std::io::Result<(TempPath, u64, String)> {
        self.file.flush()?;
        Ok((self.path, self.size, hex::encode(self.hasher.finalize())))
    }

    /// The file with `bytes` written over its start at `offset` (a header whose figures are known
    /// only at the end, like FLAC's STREAMINFO), then hashed again from the start: the running
    /// hash no longer describes the file.
    ///
    /// # Errors
    /// The file cannot be written or read back.
    pub fn finish_rewriting(mut self, offset: u64, bytes: &[u8]) -> std::io::Result<(TempPath, u64, String)> {
        self.file.flush()?;
        let mut file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(bytes)?;
        file.seek(SeekFrom::Start(0))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 128 << 10];
        loop {
            match file.read(&mut buffer)? {
                0 => break,
                n => hasher.update(&buffer[..n]),
            }
        }
        Ok((self.path, self.size, hex::encode(hasher.finalize())))
    }
}

impl Write for SpoolFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}
