//! Measuring the audio while it downloads, in the same pass that hashes and spools it: the
//! file is never read back to be measured.
//!
//! - A WAV is measured from its header ([`crate::audio::wav`]): the `data` chunk's size and the
//!   frame size give its length, and the file's size tells whether it was cut.
//! - MP3, Ogg and FLAC go through symphonia's demuxer (no decoding), fed the downloaded chunks
//!   on a blocking thread as they arrive: the packets confirm the container and give the seconds
//!   they hold. The chunks are shared, not copied, and sent in batches so the thread wakes a few
//!   times per MiB, not per chunk.

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinHandle};

use std::path::PathBuf;

use crate::audio::AudioFormat;
pub use crate::audio::analysis::AnalysisOutcome;
pub use crate::audio::decode::MeasureError;
use crate::audio::decode::{DecodeSettings, Decoded, Decoding};
use crate::audio::wav::WavScan;

/// What measuring a body found: its length and, when the samples are decoded, what it sounds
/// like and the files made from it.
#[derive(Debug)]
pub struct Measured {
    /// Seconds of audio.
    pub seconds: f64,
    /// The analysis, the waveform and the renditions (all empty when nothing decodes).
    pub decoded: Decoded,
}

/// Bytes of chunks gathered before they go to the demuxer's thread.
const BATCH_BYTES: usize = 256 << 10;
/// Batches waiting for the demuxer at most: the download waits beyond that, so a slow demuxer
/// holds at most about 1 MiB per job.
const BATCHES_QUEUED: usize = 4;

/// The measurement of one download, fed its chunks in order ([`Measure::feed`]) and read when
/// the body ends ([`Measure::finish`]).
#[derive(Debug)]
pub struct Measure {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    /// WAV: the header scan, on this task.
    Wav(WavScan),
    /// The other formats: the demuxer's thread and what is gathered for it.
    Demux {
        batch: Vec<Bytes>,
        batched: usize,
        /// `None` once the demuxer stopped reading (it failed; [`Measure::finish`] says why).
        sender: Option<mpsc::Sender<Vec<Bytes>>>,
        task: JoinHandle<Result<Measured, MeasureError>>,
    },
}

impl Measure {
    /// Starts measuring a body whose first bytes were recognised as `format` (on a blocking
    /// thread of the current Tokio runtime for the demuxed formats), decoding its samples for
    /// what `decode` asks (a WAV is then decoded too, not only read from its header) and
    /// writing the files made from them to `dir`.
    pub fn start(format: AudioFormat, decode: DecodeSettings, dir: PathBuf) -> Self {
        let inner = match format {
            AudioFormat::Wav if !decode.decodes() => Inner::Wav(WavScan::new()),
            _ => {
                let (sender, receiver) = mpsc::channel(BATCHES_QUEUED);
                let source = symphonia::core::io::ReadOnlySource::new(Batches::new(receiver));
                let task = tokio::task::spawn_blocking(move || demux(Box::new(source), format, decode, dir));
                Inner::Demux { batch: Vec::new(), batched: 0, sender: Some(sender), task }
            }
        };
        Self { inner }
    }

    /// The next chunk of the body (waits only while the demuxer is [`BATCHES_QUEUED`] batches
    /// behind).
    pub async fn feed(&mut self, chunk: &Bytes) {
        match &mut self.inner {
            Inner::Wav(scan) => scan.feed(chunk),
            Inner::Demux { batch, batched, sender, .. } => {
                if sender.is_none() {
                    return;
                }
                batch.push(chunk.clone());
                *batched += chunk.len();
                if *batched >= BATCH_BYTES {
                    *batched = 0;
                    let full = std::mem::take(batch);
                    if let Some(s) = sender.as_ref()
                        && s.send(full).await.is_err()
                    {
                        *sender = None;
                    }
                }
            }
        }
    }

    /// The seconds of audio in the whole body of `total` bytes.
    ///
    /// # Errors
    /// The outer error when the demuxer's thread panicked or was cancelled; the inner one (a
    /// message) when the container does not parse as the format, has no audio track, or holds
    /// at least 0.1 s less audio than its header declares (a cut file).
    pub async fn finish(self, total: u64) -> Result<Result<Measured, MeasureError>, JoinError> {
        match self.inner {
            Inner::Wav(scan) => Ok(scan
                .finish()
                .and_then(|header| header.measure(total))
                .map(|seconds| Measured { seconds, decoded: Decoded::default() })
                .map_err(MeasureError::Refused)),
            Inner::Demux { batch, sender, task, .. } => {
                if let Some(sender) = sender
                    && !batch.is_empty()
                {
                    let _ = sender.send(batch).await;
                }
                // The sender dropped here is the end of the stream for the demuxer.
                task.await
            }
        }
    }
}

/// The demuxer's side of the channel: the batches as one byte stream.
struct Batches {
    receiver: mpsc::Receiver<Vec<Bytes>>,
    chunks: VecDeque<Bytes>,
}

impl Batches {
    fn new(receiver: mpsc::Receiver<Vec<Bytes>>) -> Self {
        Self { receiver, chunks: VecDeque::new() }
    }
}

impl std::io::Read for Batches {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(chunk) = self.chunks.front_mut() {
                let n = chunk.len().min(out.len());
                out[..n].copy_from_slice(&chunk[..n]);
                bytes::Buf::advance(chunk, n);
                if chunk.is_empty() {
                    self.chunks.pop_front();
                }
                return Ok(n);
            }
            match self.receiver.blocking_recv() {
                Some(batch) => self.chunks.extend(batch.into_iter().filter(|c| !c.is_empty())),
                None => return Ok(0),
            }
        }
    }
}

/// Reads `source` with symphonia's demuxer and returns the seconds of audio its packets hold;
/// when `decode` asks, each packet is decoded and its samples sent on as well.
///
/// # Errors
/// As [`Measure::finish`]'s inner error; a stream none of whose packets decode.
fn demux(
    source: Box<dyn symphonia::core::io::MediaSource>,
    format: AudioFormat,
    decode: DecodeSettings,
    dir: PathBuf,
) -> Result<Measured, MeasureError> {
    let refused = MeasureError::Refused;
    use symphonia::core::errors::Error;
    use symphonia::core::formats::probe::Hint;
    use symphonia::core::formats::{FormatOptions, TrackType};
    use symphonia::core::io::MediaSourceStream;
    use symphonia::core::meta::MetadataOptions;

    let mss = MediaSourceStream::new(source, Default::default());
    let mut hint = Hint::new();
    hint.with_extension(format.extension());
    let mut reader = symphonia::default::get_probe()
        .probe(&hint, mss, FormatOptions::default(), MetadataOptions::default())
        .map_err(|e| match e {
            Error::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                format!("truncated {} file (it ends inside its header)", format.name())
            }
            e => format!("not a readable {} stream ({e})", format.name()),
        })
        .map_err(refused)?;
    let track = reader
        .default_track(TrackType::Audio)
        .ok_or_else(|| refused(format!("the {} file has no audio track", format.name())))?;
    let (track_id, time_base, declared) = (track.id, track.time_base, track.duration);
    let time_base =
        time_base.ok_or_else(|| refused(format!("the {} stream has no time base", format.name())))?;
    let mut decoding =
        decode.decodes().then(|| Decoding::new(track.codec_params.as_ref(), decode, dir.clone()));
    let mut counted: u64 = 0;
    loop {
        match reader.next_packet() {
            Ok(Some(packet)) if packet.track_id == track_id => {
                counted += packet.dur.get();
                if let Some(decoding) = decoding.as_mut() {
                    decoding.decode(&packet);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            // A stream cut mid-packet ends here; the comparison below tells whether audio is missing.
            Err(Error::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => {
                return Err(refused(format!(
                    "the {} stream is corrupt after {counted} ticks ({e})",
                    format.name()
                )));
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
            return Err(refused(format!(
                "truncated {} file: its header declares {declared:.3} s but it holds {measured:.3} s",
                format.name()
            )));
        }
        // Whole MP3 frames include the encoder's delay and padding; the header's length does not.
        if declared <= measured {
            measured = declared;
        }
    }
    if counted == 0 {
        return Err(refused(format!("the {} stream holds no audio", format.name())));
    }
    let decoded = decoding.map(|d| d.finish(format)).transpose()?.unwrap_or_default();
    Ok(Measured { seconds: measured, decoded })
}

#[cfg(test)]
mod tests {
    use super::Measure;
    use crate::audio::AudioFormat;
    use bytes::Bytes;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/audio").join(name)
    }

    /// Measures `bytes` as a download does: sniffed from the first bytes, fed in `chunk`-byte
    /// pieces.
    async fn measure(bytes: &[u8], chunk: usize) -> Result<f64, String> {
        let format = AudioFormat::sniff(&bytes[..bytes.len().min(AudioFormat::SNIFF_BYTES)])
            .ok_or_else(|| "not audio".to_owned())?;
        let mut measure = Measure::start(format, Default::default(), std::env::temp_dir());
        for piece in bytes.chunks(chunk) {
            measure.feed(&Bytes::copy_from_slice(piece)).await;
        }
        measure
            .finish(bytes.len() as u64)
            .await
            .expect("the demuxer ran")
            .map(|m| m.seconds)
            .map_err(|e| e.to_string())
    }

    /// Real files of each format (made with sox, lame, oggenc, opusenc and flac; see
    /// tests/fixtures/audio/README.md), fed in small and large pieces: the measured duration
    /// (1.5 s).
    #[tokio::test]
    async fn real_files_are_measured_as_they_stream_in() {
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
            for chunk in [7, 4096, 1 << 20] {
                let seconds = measure(&bytes, chunk).await.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(
                    (seconds - 1.5).abs() <= tolerance,
                    "{name} in {chunk}-byte pieces: measured {seconds} s"
                );
            }
        }
    }

    #[tokio::test]
    async fn truncated_and_mislabelled_files_are_refused() {
        let wav = std::fs::read(fixture("tone.wav")).unwrap();
        let err = measure(&wav[..wav.len() / 2], 4096).await.unwrap_err();
        assert!(err.contains("truncated WAV"), "{err}");
        let flac = std::fs::read(fixture("tone.flac")).unwrap();
        let err = measure(&flac[..flac.len() / 2], 4096).await.unwrap_err();
        assert!(err.contains("truncated FLAC"), "{err}");
        assert!(measure(&wav[..44], 4096).await.is_err(), "a header alone holds no audio");
        let html = b"RIFF\x24\x00\x00\x00WAVE<html>not really</html>, with more bytes after it";
        assert!(measure(html, 4096).await.is_err());
        let mp3 = std::fs::read(fixture("tone.mp3")).unwrap();
        let mut garbled = mp3[..64].to_vec();
        garbled.extend(std::iter::repeat_n(0x55u8, 4000));
        assert!(measure(&garbled, 4096).await.is_err(), "MP3 frames followed by noise");
    }
}
