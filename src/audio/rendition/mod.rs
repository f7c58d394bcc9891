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

use crate::audio::encoded::Encoded;
pub use crate::audio::encoded::Rendition;

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
                other => {
                    return Err(format!("unknown rendition {other:?}: the renditions are flac and vorbis"));
                }
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

    /// Why the encoder gave up on a source it applies to (a FLAC larger than its source), if
    /// it did: the rendition is then skipped with this reason, not failed.
    pub fn gave_up(&self) -> Option<&str> {
        match self {
            Self::Flac(w) => w.gave_up(),
            Self::Vorbis(_) => None,
        }
    }

    /// The rendition this encoder makes.
    pub fn rendition(&self) -> Rendition {
        match self {
            Self::Flac(_) => Rendition::Flac,
            Self::Vorbis(_) => Rendition::Vorbis,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a file with symphonia: (rate, channels, interleaved samples as `i32` codes of
    /// `bits` bits).
    fn decode(path: &Path, extension: &str, bits: u32) -> (u32, usize, Vec<i32>) {
        use symphonia::core::formats::probe::Hint;
        use symphonia::core::formats::{FormatOptions, TrackType};
        use symphonia::core::io::MediaSourceStream;
        use symphonia::core::meta::MetadataOptions;
        let file = std::fs::File::open(path).unwrap();
        let mss = MediaSourceStream::new(Box::new(file), Default::default());
        let mut reader = symphonia::default::get_probe()
            .probe(
                Hint::new().with_extension(extension),
                mss,
                FormatOptions::default(),
                MetadataOptions::default(),
            )
            .unwrap();
        let track = reader.default_track(TrackType::Audio).unwrap();
        let params = track.codec_params.as_ref().unwrap().audio().unwrap().clone();
        let mut decoder =
            symphonia::default::get_codecs().make_audio_decoder(&params, &Default::default()).unwrap();
        let (mut out, mut rate, mut channels, mut block) = (Vec::new(), 0, 0, Vec::new());
        while let Ok(Some(packet)) = reader.next_packet() {
            let buffer = decoder.decode(&packet).unwrap();
            rate = buffer.spec().rate();
            channels = buffer.spec().channels().count();
            block.clear();
            buffer.copy_to_vec_interleaved::<i32>(&mut block);
            out.extend(block.iter().map(|s| s >> (32 - bits)));
        }
        (rate, channels, out)
    }

    /// Noise at 16 bits (stereo) and 24 bits (mono), fed in uneven blocks with a partial last
    /// FLAC block: decoded back, every sample is the source's, and STREAMINFO is complete.
    #[test]
    fn flac_decodes_to_the_source_samples_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        for (bits, channels, rate) in [(16u32, 2u32, 22_050u32), (24, 1, 48_000)] {
            let frames = 4096 * 3 + 1000;
            let top = 1i64 << (bits - 1);
            let codes: Vec<i32> = (0..frames * channels as usize)
                .map(|i| {
                    ((fastrand::i64(-top..top) / 3) + if i % 97 == 0 { top - 1 } else { 0 })
                        .clamp(-top, top - 1) as i32
                })
                .collect();
            let Started::Encoding(mut encoder) = Encoder::start(
                Rendition::Flac,
                &RenditionSettings { flac: true, vorbis_kbps: None },
                SourceStream { channels, sample_rate: rate, bits_per_sample: Some(bits), codec: "pcm_s16le" },
                dir.path(),
            )
            .unwrap() else {
                panic!("FLAC applies to PCM")
            };
            let justified: Vec<i32> = codes.iter().map(|c| c << (32 - bits)).collect();
            for block in justified.chunks(channels as usize * 1153) {
                encoder.add(&[], block).unwrap();
            }
            let encoded = encoder.finish().unwrap();
            assert_eq!(encoded.key_suffix(), "flac.flac");
            assert_eq!(encoded.size, std::fs::metadata(&encoded.path).unwrap().len());
            let bytes = std::fs::read(&encoded.path).unwrap();
            assert_eq!(encoded.sha256, hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)));
            // STREAMINFO's 36-bit sample count sits in bytes 21..26 of the file.
            let total = (u64::from(bytes[21] & 0x0f) << 32)
                | u64::from(u32::from_be_bytes([bytes[22], bytes[23], bytes[24], bytes[25]]));
            assert_eq!(total, frames as u64, "{bits} bits");
            let (decoded_rate, decoded_channels, decoded) = decode(&encoded.path, "flac", bits);
            assert_eq!((decoded_rate, decoded_channels), (rate, channels as usize));
            assert!(decoded == codes, "{bits}-bit samples differ after the round trip");
        }
    }

    /// A Vorbis rendition decodes back to the source's length; a Vorbis source is not encoded
    /// again, and FLAC applies only to integer PCM.
    #[test]
    fn vorbis_keeps_the_length_and_renditions_skip_what_does_not_apply() {
        let dir = tempfile::tempdir().unwrap();
        let settings = RenditionSettings::parse("flac, vorbis", 48).unwrap();
        assert_eq!(settings.list(), vec![Rendition::Flac, Rendition::Vorbis]);
        let source =
            SourceStream { channels: 1, sample_rate: 24_000, bits_per_sample: Some(16), codec: "pcm_s16le" };
        let Started::Encoding(mut encoder) =
            Encoder::start(Rendition::Vorbis, &settings, source, dir.path()).unwrap()
        else {
            panic!("Vorbis applies to PCM")
        };
        let tone: Vec<f32> = (0..36_000).map(|i| 0.3 * (i as f32 * 0.05).sin()).collect();
        for block in tone.chunks(1000) {
            encoder.add(block, &[]).unwrap();
        }
        let encoded = encoder.finish().unwrap();
        assert_eq!(encoded.content_type(), "audio/ogg");
        let (rate, _, decoded) = decode(&encoded.path, "ogg", 16);
        assert_eq!(rate, 24_000);
        assert!((decoded.len() as i64 - 36_000).abs() <= 256, "{} frames decoded", decoded.len());

        let mp3 = SourceStream { channels: 1, sample_rate: 24_000, bits_per_sample: None, codec: "mp3" };
        let Started::Skipped(skipped) = Encoder::start(Rendition::Flac, &settings, mp3, dir.path()).unwrap()
        else {
            panic!("no FLAC of an MP3")
        };
        assert!(skipped.reason.contains("integer PCM"), "{}", skipped.reason);
        let vorbis = SourceStream { codec: "vorbis", ..mp3 };
        assert!(matches!(
            Encoder::start(Rendition::Vorbis, &settings, vorbis, dir.path()).unwrap(),
            Started::Skipped(_)
        ));
        assert!(RenditionSettings::parse("flac,opus", 64).unwrap_err().contains("opus"));
    }
}
