//! The lossy delivery rendition: Ogg Vorbis by libvorbis (aoTuV), at a target bitrate, written
//! page by page to a spool file.

use std::num::{NonZeroU8, NonZeroU32};
use std::path::Path;

use vorbis_rs::{VorbisBitrateManagementStrategy, VorbisEncoder, VorbisEncoderBuilder};

use crate::audio::encoded::Rendition;
use crate::audio::encoded::{Encoded, EncodedKind, RenditionInfo, SpoolFile};

/// The Ogg stream serial: fixed, so the same take always encodes to the same bytes (and a
/// redelivery finds its rendition unchanged). A file holds one stream, so any serial is unique.
const SERIAL: i32 = 0x4157_4b52;

/// Encodes one stream to Ogg Vorbis.
pub struct VorbisWriter {
    encoder: VorbisEncoder<SpoolFile>,
    channels: usize,
    planar: Vec<Vec<f32>>,
    kbps: u32,
}

impl VorbisWriter {
    /// Starts an Ogg Vorbis file in `dir` for `channels` × `sample_rate` Hz at `kbps` kbit/s,
    /// or, where libvorbis has no mode for that bitrate at this rate and layout (64 kbit/s of
    /// 8 kHz mono, 16 kbit/s of 44.1 kHz stereo), at the nearest bitrate it has a mode for:
    /// lower ones first, then higher. The bitrate used is the one recorded.
    ///
    /// # Errors
    /// libvorbis has no mode for this layout at any bitrate, or the spool file cannot be made.
    pub fn new(dir: &Path, channels: u32, sample_rate: u32, kbps: u32) -> Result<Self, String> {
        let refused = |e: &dyn std::fmt::Display| {
            format!("libvorbis refuses {channels} channels at {sample_rate} Hz, {kbps} kbit/s: {e}")
        };
        let rate = NonZeroU32::new(sample_rate).ok_or_else(|| refused(&"no sample rate"))?;
        let count =
            u8::try_from(channels).ok().and_then(NonZeroU8::new).ok_or_else(|| refused(&"channels"))?;
        let lower = [256, 192, 160, 128, 112, 96, 80, 64, 56, 48, 40, 32, 24, 16, 12, 8]
            .into_iter()
            .filter(|&k| k < kbps);
        let higher = [16, 24, 32, 48, 64, 96, 128, 192, 256, 320].into_iter().filter(|&k| k > kbps);
        let mut last_error = String::new();
        for candidate in std::iter::once(kbps).chain(lower).chain(higher) {
            let bitrate =
                NonZeroU32::new(candidate.saturating_mul(1000)).ok_or_else(|| refused(&"no bitrate"))?;
            let out = SpoolFile::create(dir, "vorbis-")
                .map_err(|e| format!("creating the Vorbis spool file: {e}"))?;
            match VorbisEncoderBuilder::new_with_serial(rate, count, out, SERIAL)
                .bitrate_management_strategy(VorbisBitrateManagementStrategy::Vbr { target_bitrate: bitrate })
                .build()
            {
                Ok(encoder) => {
                    if candidate != kbps {
                        tracing::debug!(
                            kbps,
                            used = candidate,
                            sample_rate,
                            channels,
                            "libvorbis has no mode for the configured bitrate here"
                        );
                    }
                    return Ok(Self {
                        encoder,
                        channels: channels as usize,
                        planar: vec![Vec::new(); channels as usize],
                        kbps: candidate,
                    });
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(refused(&format!("{last_error} (at every bitrate from 8 to 320 kbit/s)")))
    }

    /// Adds interleaved frames in [-1, 1].
    ///
    /// # Errors
    /// libvorbis or the spool file failed.
    pub fn add(&mut self, floats: &[f32]) -> Result<(), String> {
        for plane in &mut self.planar {
            plane.clear();
        }
        for frame in floats.chunks_exact(self.channels) {
            for (plane, &s) in self.planar.iter_mut().zip(frame) {
                plane.push(s);
            }
        }
        if self.planar.first().is_none_or(Vec::is_empty) {
            return Ok(());
        }
        self.encoder.encode_audio_block(&self.planar).map_err(|e| format!("encoding Vorbis: {e}"))
    }

    /// The finished file.
    ///
    /// # Errors
    /// libvorbis or the spool file failed.
    pub fn finish(self) -> Result<Encoded, String> {
        let out = self.encoder.finish().map_err(|e| format!("finishing Vorbis: {e}"))?;
        let (path, size, sha256) =
            out.finish().map_err(|e| format!("finishing the Vorbis spool file: {e}"))?;
        Ok(Encoded {
            what: EncodedKind::Rendition(RenditionInfo {
                rendition: Rendition::Vorbis,
                bitrate_kbps: Some(self.kbps),
            }),
            path,
            size,
            sha256,
        })
    }
}
