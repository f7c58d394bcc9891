//! Decoding a take on the measuring thread ([`crate::audio::measure`]) and feeding its samples,
//! block by block, to what was asked for: the analysis ([`crate::audio::analysis`]), the
//! waveform ([`crate::audio::waveform`]) and the renditions ([`crate::audio::rendition`]).
//! Nothing holds the decoded samples beyond one packet.

use std::path::PathBuf;

use crate::audio::AudioFormat;
use crate::audio::analysis::{Analyser, AnalysisOutcome, AnalysisSettings};
use crate::audio::encoded::Encoded;
use crate::audio::rendition::{Encoder, RenditionSettings, Skipped, SourceStream, Started};
use crate::audio::waveform::{WaveformSettings, WaveformWriter};

/// What the decoded samples are for (`ANALYSIS`, `WAVEFORM`, `RENDITIONS`); with none of them
/// a WAV is only read from its header and the other formats only demuxed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DecodeSettings {
    /// The analysis, when on.
    pub analysis: Option<AnalysisSettings>,
    /// The waveform file, when on.
    pub waveform: Option<WaveformSettings>,
    /// The renditions asked for.
    pub renditions: RenditionSettings,
}

impl DecodeSettings {
    /// True when anything needs the decoded samples.
    pub fn decodes(&self) -> bool {
        self.analysis.is_some() || self.waveform.is_some() || !self.renditions.is_empty()
    }
}

/// Why a body could not be measured.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MeasureError {
    /// The bytes are not what they claim (cut, corrupt, undecodable), or an encoder refuses
    /// them: the same bytes fail the same way every time (a permanent error).
    #[error("{0}")]
    Refused(String),
    /// A file made from the samples (waveform, rendition) could not be written: the disk, not
    /// the take (a transient error).
    #[error("{0}")]
    Spool(String),
}

/// What the decoding made of a stream.
#[derive(Debug, Default)]
pub struct Decoded {
    /// The analysis (`None` when off).
    pub analysis: Option<AnalysisOutcome>,
    /// The waveform file, then the renditions, in `RENDITIONS` order.
    pub encoded: Vec<Encoded>,
    /// Why there is no waveform although it is on (the codec cannot be decoded).
    pub waveform_skipped: Option<String>,
    /// The renditions asked for that do not apply to this source.
    pub renditions_skipped: Vec<Skipped>,
}

/// The decoder of a stream and its outputs, made from its track's codec parameters.
pub enum Decoding {
    /// Decoding.
    Running(Box<Running>),
    /// No decoder for this codec (Opus) or for these parameters.
    Skipped(String, DecodeSettings),
}

/// A decoder at work.
pub struct Running {
    decoder: Box<dyn symphonia::core::codecs::audio::AudioDecoder>,
    settings: DecodeSettings,
    dir: PathBuf,
    bits_per_sample: Option<u32>,
    /// Made at the first decoded buffer, which gives the rate and the channels for sure.
    outputs: Option<Outputs>,
    floats: Vec<f32>,
    ints: Vec<i32>,
    failed: u64,
    last_error: Option<String>,
    /// The first output that failed: the take fails with it.
    output_failed: Option<MeasureError>,
}

/// What the samples go to.
struct Outputs {
    analyser: Option<Analyser>,
    waveform: Option<WaveformWriter>,
    encoders: Vec<Encoder>,
    skipped: Vec<Skipped>,
    wants_ints: bool,
}

impl Decoding {
    /// A decoder for the track described by `params`, writing its files to `dir`.
    pub fn new(
        params: Option<&symphonia::core::codecs::CodecParameters>,
        settings: DecodeSettings,
        dir: PathBuf,
    ) -> Self {
        let Some(params) = params.and_then(|p| p.audio()) else {
            return Self::Skipped("the track has no audio codec parameters".into(), settings);
        };
        match symphonia::default::get_codecs().make_audio_decoder(params, &Default::default()) {
            Ok(decoder) => Self::Running(Box::new(Running {
                decoder,
                settings,
                dir,
                bits_per_sample: params.bits_per_sample,
                outputs: None,
                floats: Vec::new(),
                ints: Vec::new(),
                failed: 0,
                last_error: None,
                output_failed: None,
            })),
            Err(e) => Self::Skipped(format!("no decoder for this codec ({:?}: {e})", params.codec), settings),
        }
    }

    /// Decodes one packet into the outputs. A packet that does not decode is skipped, as
    /// players do (an MP3's first frames may need the bit reservoir of frames before them).
    pub fn decode(&mut self, packet: &symphonia::core::packet::Packet) {
        let Self::Running(running) = self else { return };
        if running.output_failed.is_some() {
            return;
        }
        let Running {
            decoder,
            settings,
            dir,
            bits_per_sample,
            outputs,
            floats,
            ints,
            failed,
            last_error,
            output_failed,
        } = &mut **running;
        let codec = decoder.codec_info().short_name;
        let buffer = match decoder.decode(packet) {
            Ok(buffer) => buffer,
            Err(e) => {
                *failed += 1;
                *last_error = Some(e.to_string());
                return;
            }
        };
        let spec = buffer.spec();
        if outputs.is_none() {
            let source = SourceStream {
                channels: u32::try_from(spec.channels().count()).unwrap_or(0),
                sample_rate: spec.rate(),
                bits_per_sample: *bits_per_sample,
                codec,
            };
            match Outputs::start(settings, source, dir) {
                Ok(made) => *outputs = Some(made),
                Err(Refusal::Analysis(why)) => {
                    // The meter refuses the layout: nothing can be measured from these samples.
                    let settings = *settings;
                    *self = Self::Skipped(why, settings);
                    return;
                }
                Err(Refusal::Output(e)) => {
                    *output_failed = Some(e);
                    return;
                }
            }
        }
        let Some(outputs) = outputs.as_mut() else { return };
        floats.clear();
        buffer.copy_to_vec_interleaved::<f32>(floats);
        if outputs.wants_ints {
            ints.clear();
            buffer.copy_to_vec_interleaved::<i32>(ints);
        }
        if let Err(e) = outputs.add(floats, ints) {
            *output_failed = Some(e);
        }
    }

    /// What the decoding made, once every packet went through.
    ///
    /// # Errors
    /// Packets came but none decoded (the stream is corrupt), or an output failed.
    pub fn finish(self, format: AudioFormat) -> Result<Decoded, MeasureError> {
        match self {
            Self::Skipped(why, settings) => Ok(Decoded {
                analysis: settings.analysis.map(|_| AnalysisOutcome::Skipped { skipped: why.clone() }),
                encoded: Vec::new(),
                waveform_skipped: settings.waveform.map(|_| why.clone()),
                renditions_skipped: settings
                    .renditions
                    .list()
                    .into_iter()
                    .map(|r| Skipped { name: r.name().into(), reason: why.clone() })
                    .collect(),
            }),
            Self::Running(running) => {
                let Running { outputs, failed, last_error, output_failed, .. } = *running;
                if let Some(e) = output_failed {
                    return Err(e);
                }
                match outputs {
                    Some(outputs) => outputs.finish(),
                    None => Err(MeasureError::Refused(format!(
                        "the {} stream does not decode: none of its {failed} packets did ({})",
                        format.name(),
                        last_error.unwrap_or_default()
                    ))),
                }
            }
        }
    }
}

/// Why the outputs could not start.
enum Refusal {
    /// The loudness meter refuses the layout: the analysis (and everything else) is skipped.
    Analysis(String),
    /// A file could not be started: the job fails.
    Output(MeasureError),
}

impl Outputs {
    fn start(
        settings: &DecodeSettings,
        source: SourceStream<'_>,
        dir: &std::path::Path,
    ) -> Result<Self, Refusal> {
        let analyser = settings
            .analysis
            .map(|a| {
                Analyser::new(source.channels, source.sample_rate, source.bits_per_sample, source.codec, a)
            })
            .transpose()
            .map_err(Refusal::Analysis)?;
        let waveform = settings
            .waveform
            .map(|w| WaveformWriter::new(dir, source.channels, source.sample_rate, w))
            .transpose()
            .map_err(|e| Refusal::Output(MeasureError::Spool(format!("creating the waveform file: {e}"))))?;
        let (mut encoders, mut skipped) = (Vec::new(), Vec::new());
        for rendition in settings.renditions.list() {
            match Encoder::start(rendition, &settings.renditions, source, dir)
                .map_err(|e| Refusal::Output(MeasureError::Refused(e)))?
            {
                Started::Encoding(encoder) => encoders.push(encoder),
                Started::Skipped(why) => skipped.push(why),
            }
        }
        let wants_ints = encoders.iter().any(Encoder::wants_ints);
        Ok(Self { analyser, waveform, encoders, skipped, wants_ints })
    }

    fn add(&mut self, floats: &[f32], ints: &[i32]) -> Result<(), MeasureError> {
        if let Some(analyser) = self.analyser.as_mut() {
            analyser.add(floats);
        }
        if let Some(waveform) = self.waveform.as_mut() {
            waveform
                .add(floats)
                .map_err(|e| MeasureError::Spool(format!("writing the waveform file: {e}")))?;
        }
        for encoder in &mut self.encoders {
            encoder.add(floats, ints).map_err(MeasureError::Spool)?;
        }
        if let Some(at) = self.encoders.iter().position(|e| e.gave_up().is_some()) {
            let encoder = self.encoders.remove(at);
            let reason = encoder.gave_up().unwrap_or_default().to_owned();
            self.skipped.push(Skipped { name: encoder.rendition().name().into(), reason });
        }
        Ok(())
    }

    fn finish(self) -> Result<Decoded, MeasureError> {
        let mut encoded = Vec::new();
        if let Some(waveform) = self.waveform {
            encoded.push(
                waveform
                    .finish()
                    .map_err(|e| MeasureError::Spool(format!("finishing the waveform file: {e}")))?,
            );
        }
        for encoder in self.encoders {
            encoded.push(encoder.finish().map_err(MeasureError::Spool)?);
        }
        Ok(Decoded {
            analysis: self.analyser.map(|a| AnalysisOutcome::Done(a.finish())),
            encoded,
            waveform_skipped: None,
            renditions_skipped: self.skipped,
        })
    }
}
