//! Renditions: the take in another codec, encoded from its decoded samples in the same pass that
//! analyses it, each into a spool file uploaded beside the original
//! (`{customer_id}/{user_id}/audio/{asset_id}.{rendition}.{ext}`).
//!
//! - [`flac`]: lossless FLAC of a PCM WAV (`flacenc`), whose decoded samples are the source's,
//!   bit for bit: about half the bytes of the WAV for speech.
//! - [`vorbis`]: Ogg Vorbis at `RENDITION_VORBIS_KBPS` (libvorbis through `vorbis_rs`), the
//!   delivery rendition a player streams.
//!
//! A rendition that does not apply to a source (FLAC of an MP3, Vorbis of a Vorbis take) is not
//! made, and the document says why ([`Skipped`]); one that applies but fails fails the job.

pub mod flac;
pub mod vorbis;

use std::path::Path;

pub use crate::audio::encoded::Rendition;
use crate::audio::encoded::Encoded;

/// `RENDITIONS` (comma list of `flac`, `vorbis`; default none) and `RENDITION_VORBIS_KBPS`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RenditionSettings {
    /// Make the FLAC rendition of PCM WAV takes.
    pub flac: bool,
    /// Make the Vorbis rendition at this target bitrate (kbit/s), when set.
    pub vorbis_kbps: Option<u32>,
}

impl RenditionSettings {
    /// Parses `RENDITIONS`, with `vorbis_kbps` for the Vorbis rendition's bitrate.
    ///
    /// # Errors
    /// An unknown name, naming the ones there are.
    pub fn parse(list: &str, vorbis_kbps: u32) -> Result<Self, String> {
        let mut settings = Self::default();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "flac" => settings.flac = true,
                "vorbis" => settings.vorbis_kbps = Some(vorbis_kbps),
                other => return Err(format!("unknown rendition {other:?}: the renditions are flac and vorbis")),
            }
        }
        Ok(settings)
    }

    /// True when no rendition is asked for.
    pub fn is_empty(&self) -> bool {
        !self.flac && self.vorbis_kbps.is_none()
    }

    /// The renditions asked for, in a fixed order.
    pub fn list(&self) -> Vec<Rendition> {
        let mut list = Vec::new();
        if self.flac {
            list.push(Rendition::Flac);
        }
        if self.vorbis_kbps.is_some() {
            list.push(Rendition::Vorbis);
        }
        list
    }
}

/// A rendition asked for but not made, because it does not apply to this source.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    /// The rendition's name.
    pub name: String,
    /// Why, e.g. `the source is MP3: only PCM audio has a lossless rendition`.
    pub reason: String,
}

/// The decoded stream a rendition is made from.
#[derive(Debug, Clone, Copy)]
pub struct SourceStream<'a> {
    /// Channels.
    pub channels: u32,
    /// Frames per second.
    pub sample_rate: u32,
    /// Bits per sample where the codec has them.
    pub bits_per_sample: Option<u32>,
    /// symphonia's short name of the codec, e.g. `pcm_s16le`, `mp3`, `vorbis`.
    pub codec: &'a str,
}

/// An encoder at work on one rendition.
pub enum Encoder {
    /// FLAC.
    Flac(flac::FlacWriter),
    /// Vorbis.
    Vorbis(vorbis::VorbisWriter),
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Flac(_) => "Encoder::Flac",
            Self::Vorbis(_) => "Encoder::Vorbis",
        })
    }
}

/// What starting a rendition gave.
pub enum Started {
    /// The encoder, to be fed every decoded block.
    Encoding(Encoder),
    /// It does not apply to this source.
    Skipped(Skipped),
}

impl Encoder {
    /// Starts `rendition` of `source` into a spool file in `dir`.
    ///
    /// # Errors
    /// The encoder refuses a source it applies to (e.g. a layout libvorbis has no mode for), or
    /// the spool file cannot be created: the job fails.
    pub fn start(
        rendition: Rendition,
        settings: &RenditionSettings,
        source: SourceStream<'_>,
        dir: &Path,
    ) -> Result<Started, String> {
        let skip = |reason: String| Ok(Started::Skipped(Skipped { name: rendition.name().into(), reason }));
        match rendition {
            Rendition::Flac => {
                let integer_pcm = source.codec.starts_with("pcm_s") || source.codec.starts_with("pcm_u");
                match source.bits_per_sample {
                    Some(bits @ 4..=24) if integer_pcm => Ok(Started::Encoding(Encoder::Flac(
                        flac::FlacWriter::new(dir, source.channels, source.sample_rate, bits)?,
                    ))),
                    _ if !integer_pcm => skip(format!(
                        "the source is {}: only integer PCM (a PCM WAV) has a lossless FLAC rendition",
                        source.codec
                    )),
                    bits => skip(format!(
                        "the source has {} bits per sample: the FLAC rendition takes 4 to 24",
                        bits.map_or("unknown".into(), |b| b.to_string())
                    )),
                }
            }
            Rendition::Vorbis if source.codec == "vorbis" => {
                skip("the source is Ogg Vorbis already: encoding it again would only lose quality".into())
            }
            Rendition::Vorbis => {
                let kbps = settings.vorbis_kbps.unwrap_or(64);
                Ok(Started::Encoding(Encoder::Vorbis(vorbis::VorbisWriter::new(
                    dir,
                    source.channels,
                    source.sample_rate,
                    kbps,
                )?)))
            }
        }
    }

    /// Encodes one block: `floats` interleaved in [-1, 1] and, for FLAC, `ints` interleaved and
    /// left-justified in an `i32` (symphonia's conversion: a 16-bit code shifted up 16 bits).
    ///
    /// # Errors
    /// The encoder or the spool file failed.
    pub fn add(&mut self, floats: &[f32], ints: &[i32]) -> Result<(), String> {
        match self {
            Self::Flac(w) => w.add(ints),
            Self::Vorbis(w) => w.add(floats),
        }
    }

    /// True when the encoder needs [`Encoder::add`]'s `ints`.
    pub fn wants_ints(&self) -> bool {
        matches!(self, Self::Flac(_))
    }

    /// The finished file.
    ///
    /// # Errors
    /// The encoder or the spool file failed.
    pub fn finish(self) -> Result<Encoded, String> {
        match self {
            Self::Flac(w) => w.finish(),
            Self::Vorbis(w) => w.finish(),
        }
    }
}
