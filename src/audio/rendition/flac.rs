//! The lossless rendition: FLAC frames encoded block by block by `flacenc` and written to a
//! spool file as they are made. STREAMINFO (frame sizes, the sample count and the MD5 of the
//! samples) is known only at the end, so it is written as a placeholder first and over it last.

use std::io::Write;
use std::path::Path;

use flacenc::bitsink::MemSink;
use flacenc::component::{BitRepr, StreamInfo};
use flacenc::error::Verify;
use flacenc::source::{Context, Fill, FrameBuf};

use crate::audio::encoded::Rendition;
use crate::audio::encoded::{Encoded, EncodedKind, RenditionInfo, SpoolFile};

/// Frames per FLAC block: the reference encoder's default.
const BLOCK: usize = 4096;
/// `fLaC`, then the STREAMINFO block header (last-block flag, type 0, length 34).
const MAGIC_AND_HEADER: [u8; 8] = [b'f', b'L', b'a', b'C', 0x80, 0, 0, 34];

/// Encodes one stream to FLAC.
pub struct FlacWriter {
    out: SpoolFile,
    config: flacenc::error::Verified<flacenc::config::Encoder>,
    info: StreamInfo,
    framebuf: FrameBuf,
    /// MD5 and the counts of the samples given so far.
    context: Context,
    channels: usize,
    /// Right shift from symphonia's left-justified `i32` to the source's code.
    shift: u32,
    /// Interleaved codes waiting for a whole block.
    pending: Vec<i32>,
    frames: usize,
    sink: MemSink<u8>,
    /// Bytes of PCM given so far (the source's size without its header).
    pcm_bytes: u64,
    bytes_per_sample: u64,
    /// Set once the file grew past [`OVERSIZE_SLACK`] over the PCM it holds: encoding stops.
    oversized: Option<String>,
}

/// How much larger than its PCM a FLAC rendition may grow before it is given up. flacenc 0.5.1
/// mis-sizes the Rice partitions of loud 24-bit noise: 1.5 s of it (216 kB as WAV) came out at
/// 237 MB, where the reference encoder writes 220 kB. A rendition larger than its source saves
/// nothing, so past this it is skipped with the reason, and the disk and the CPU are safe.
const OVERSIZE_SLACK: u64 = 1 << 20;

impl FlacWriter {
    /// Starts a FLAC file in `dir` for `channels` × `sample_rate` Hz at `bits` bits.
    ///
    /// # Errors
    /// FLAC cannot hold the layout (more than 8 channels, a rate over 655 kHz), or the spool
    /// file cannot be made.
    pub fn new(dir: &Path, channels: u32, sample_rate: u32, bits: u32) -> Result<Self, String> {
        let (channels, bits) = (channels as usize, bits as usize);
        let mut info = StreamInfo::new(sample_rate as usize, channels, bits).map_err(|e| {
            format!("FLAC cannot hold {channels} channels at {sample_rate} Hz, {bits} bits: {e}")
        })?;
        info.set_block_sizes(BLOCK, BLOCK).map_err(|e| format!("FLAC block size: {e}"))?;
        let config = flacenc::config::Encoder::default()
            .into_verified()
            .map_err(|(_, e)| format!("FLAC encoder settings: {e}"))?;
        let framebuf = FrameBuf::with_size(channels, BLOCK)
            .map_err(|e| format!("FLAC cannot hold {channels} channels: {e}"))?;
        let mut out =
            SpoolFile::create(dir, "flac-").map_err(|e| format!("creating the FLAC spool file: {e}"))?;
        let mut placeholder = MAGIC_AND_HEADER.to_vec();
        placeholder.extend(bits_of(&info)?);
        out.write_all(&placeholder).map_err(|e| format!("writing the FLAC spool file: {e}"))?;
        Ok(Self {
            out,
            config,
            info,
            framebuf,
            context: Context::new(bits, channels),
            channels,
            shift: 32 - bits as u32,
            pending: Vec::with_capacity(BLOCK * channels),
            frames: 0,
            sink: MemSink::new(),
            pcm_bytes: 0,
            bytes_per_sample: bits.div_ceil(8) as u64,
            oversized: None,
        })
    }

    /// Adds interleaved samples, left-justified in `i32`.
    ///
    /// # Errors
    /// Encoding or writing a frame failed.
    pub fn add(&mut self, ints: &[i32]) -> Result<(), String> {
        if self.oversized.is_some() {
            return Ok(());
        }
        self.pcm_bytes += ints.len() as u64 * self.bytes_per_sample;
        let whole = BLOCK * self.channels;
        let mut rest = ints;
        while !rest.is_empty() {
            let take = (whole - self.pending.len()).min(rest.len());
            self.pending.extend(rest[..take].iter().map(|s| s >> self.shift));
            rest = &rest[take..];
            if self.pending.len() == whole {
                self.encode_pending()?;
            }
        }
        Ok(())
    }

    fn encode_pending(&mut self) -> Result<(), String> {
        let block = &self.pending[..self.pending.len() - self.pending.len() % self.channels];
        if block.is_empty() {
            return Ok(());
        }
        self.framebuf.fill_interleaved(block).map_err(|e| format!("FLAC samples: {e}"))?;
        self.context.fill_interleaved(block).map_err(|e| format!("FLAC samples: {e}"))?;
        let frame = flacenc::encode_fixed_size_frame(&self.config, &self.framebuf, self.frames, &self.info)
            .map_err(|e| format!("encoding FLAC frame {}: {e}", self.frames))?;
        self.info.update_frame_info(&frame);
        self.sink.clear();
        frame.write(&mut self.sink).map_err(|e| format!("writing FLAC frame {}: {e:?}", self.frames))?;
        self.out.write_all(self.sink.as_slice()).map_err(|e| format!("writing the FLAC spool file: {e}"))?;
        self.frames += 1;
        self.pending.clear();
        if self.out.size() > self.pcm_bytes + OVERSIZE_SLACK {
            self.oversized = Some(format!(
                "the FLAC encoder (flacenc 0.5.1) made {} bytes of {} bytes of PCM: larger than the \
                 source, so it saves nothing",
                self.out.size(),
                self.pcm_bytes
            ));
        }
        Ok(())
    }

    /// Why the rendition was given up (it grew larger than its source), if it was.
    pub fn gave_up(&self) -> Option<&str> {
        self.oversized.as_deref()
    }

    /// The finished file: the last, partial block encoded and STREAMINFO written with the real
    /// figures.
    ///
    /// # Errors
    /// Encoding, writing or hashing failed.
    pub fn finish(mut self) -> Result<Encoded, String> {
        self.encode_pending()?;
        self.info.set_md5_digest(&self.context.md5_digest());
        self.info.set_total_samples(self.context.total_samples());
        // A fixed block size, the last and shorter block not counted, as the reference encoder
        // writes it: with the last block's size as the minimum, symphonia 0.6's reader refused
        // the stream (the round-trip test found it; `flac -t` accepted both).
        self.info.set_block_sizes(BLOCK, BLOCK).map_err(|e| format!("FLAC block size: {e}"))?;
        let header = bits_of(&self.info)?;
        let (path, size, sha256) = self
            .out
            .finish_rewriting(MAGIC_AND_HEADER.len() as u64, &header)
            .map_err(|e| format!("finishing the FLAC spool file: {e}"))?;
        Ok(Encoded {
            what: EncodedKind::Rendition(RenditionInfo { rendition: Rendition::Flac, bitrate_kbps: None }),
            path,
            size,
            sha256,
        })
    }
}

/// STREAMINFO's 34 bytes.
fn bits_of(info: &StreamInfo) -> Result<Vec<u8>, String> {
    let mut sink = MemSink::<u8>::new();
    info.write(&mut sink).map_err(|e| format!("writing FLAC STREAMINFO: {e:?}"))?;
    Ok(sink.into_inner())
}
