//! What a take sounds like, measured from its decoded samples as they stream through the
//! measuring thread ([`crate::audio::measure`]): EBU R128 / ITU-R BS.1770 loudness (the
//! `ebur128` crate), leading and trailing silence, samples at full scale, and the stream's
//! format. Samples are fed block by block and never held whole: memory is the loudness meter's
//! history (a few bytes per 100 ms block) whatever the length.

use serde::{Deserialize, Serialize};

/// How the analysis judges silence (`ANALYSIS_SILENCE_THRESHOLD_DBFS`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnalysisSettings {
    /// A frame is silent when every channel's sample is below this level (dBFS, e.g. −60).
    pub silence_threshold_dbfs: f64,
}

impl Default for AnalysisSettings {
    fn default() -> Self {
        Self { silence_threshold_dbfs: -60.0 }
    }
}

/// The analysis of one take, as the document (`analysis`) and the `audio.saved` event carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// EBU R128 loudness.
    pub loudness: Loudness,
    /// Silence at either end, below `threshold_dbfs`.
    pub silence: Silence,
    /// Samples (over all channels) at full scale: the largest magnitude the format can hold, a
    /// sign of clipping.
    pub clipped_samples: u64,
    /// Frames per second of the decoded stream.
    pub sample_rate: u32,
    /// Channels of the decoded stream.
    pub channels: u32,
    /// Bits per sample of the source, where the format has them (PCM, FLAC); `None` for MP3 and
    /// Vorbis.
    pub bits_per_sample: Option<u32>,
    /// The codec, e.g. `pcm_s16le`, `flac`, `mp3`, `vorbis`.
    pub codec: String,
    /// The `QUALITY_RULES` the take passed (each `name=value`), when rules are set: a take that
    /// breaks one is never stored, so a saved take lists them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality_rules_passed: Option<Vec<String>>,
}

/// EBU R128 / ITU-R BS.1770 loudness of a take; `None` where the take is too short or too quiet
/// for the measure to exist (integrated loudness of pure silence is −∞).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Loudness {
    /// Integrated (programme) loudness, LUFS.
    pub integrated_lufs: Option<f64>,
    /// Loudness range, LU (EBU Tech 3342).
    pub range_lu: Option<f64>,
    /// The highest true peak over the channels (4× oversampled), dBTP.
    pub true_peak_dbtp: Option<f64>,
}

/// Silence at the ends of a take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    /// Seconds before the first frame above the threshold (the whole take when it is silent).
    pub leading_s: f64,
    /// Seconds after the last frame above the threshold.
    pub trailing_s: f64,
    /// The threshold used, dBFS.
    pub threshold_dbfs: f64,
}

/// The analysis of a take, or why there is none.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum AnalysisOutcome {
    /// Decoded and measured.
    Done(Analysis),
    /// Not analysed, e.g. Ogg Opus (no Opus decoder is built in): the take is stored anyway.
    Skipped {
        /// Why, e.g. `no decoder for this codec (opus)`.
        skipped: String,
    },
}

/// Feeds decoded samples to the meters.
pub struct Analyser {
    meter: ebur128::EbuR128,
    channels: u32,
    rate: u32,
    settings: AnalysisSettings,
    /// The silence threshold as a linear magnitude.
    threshold: f32,
    /// A sample at or above this is at positive full scale (an integer format's largest code,
    /// e.g. 32767/32768 for 16 bits); at or below −1.0 it is at negative full scale.
    full_scale: f32,
    bits_per_sample: Option<u32>,
    codec: String,
    frames: u64,
    first_loud: Option<u64>,
    last_loud: Option<u64>,
    clipped: u64,
}

impl std::fmt::Debug for Analyser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analyser").field("codec", &self.codec).field("frames", &self.frames).finish()
    }
}

impl Analyser {
    /// An analyser for a stream of `channels` × `rate` Hz, decoded from `codec` with
    /// `bits_per_sample` bits (integer formats: positive full scale is then
    /// `(2^(bits-1) - 1) / 2^(bits-1)` after conversion to float, negative −1.0; without bits
    /// both are ±1.0).
    ///
    /// # Errors
    /// The loudness meter refuses the layout (no channels, a rate it cannot filter).
    pub fn new(
        channels: u32,
        rate: u32,
        bits_per_sample: Option<u32>,
        codec: &str,
        settings: AnalysisSettings,
    ) -> Result<Self, String> {
        use ebur128::{EbuR128, Mode};
        let meter = EbuR128::new(channels, rate, Mode::I | Mode::LRA | Mode::TRUE_PEAK)
            .map_err(|e| format!("the loudness meter refuses {channels} channels at {rate} Hz: {e:?}"))?;
        let full_scale = match bits_per_sample {
            Some(bits @ 2..=32)
                if codec.starts_with("pcm_s") || codec.starts_with("pcm_u") || codec == "flac" =>
            {
                let top = f64::from(bits - 1).exp2();
                ((top - 1.0) / top) as f32
            }
            _ => 1.0,
        };
        Ok(Self {
            meter,
            channels,
            rate,
            settings,
            threshold: 10f64.powf(settings.silence_threshold_dbfs / 20.0) as f32,
            full_scale,
            bits_per_sample,
            codec: codec.to_owned(),
            frames: 0,
            first_loud: None,
            last_loud: None,
            clipped: 0,
        })
    }

    /// Adds interleaved frames (`channels` samples each, in [-1, 1]).
    pub fn add(&mut self, interleaved: &[f32]) {
        let channels = self.channels.max(1) as usize;
        let _ = self.meter.add_frames_f32(interleaved);
        for (i, frame) in interleaved.chunks_exact(channels).enumerate() {
            let mut loud = false;
            for &s in frame {
                loud |= s.abs() >= self.threshold;
                self.clipped += u64::from(s >= self.full_scale || s <= -1.0);
            }
            if loud {
                let at = self.frames + i as u64;
                self.first_loud.get_or_insert(at);
                self.last_loud = Some(at);
            }
        }
        self.frames += (interleaved.len() / channels) as u64;
    }

    /// The analysis of everything added.
    pub fn finish(self) -> Analysis {
        let finite = |v: Result<f64, ebur128::Error>| v.ok().filter(|v| v.is_finite());
        let true_peak = (0..self.channels)
            .filter_map(|c| self.meter.true_peak(c).ok())
            .fold(None, |max: Option<f64>, p| Some(max.map_or(p, |m| m.max(p))))
            .map(|linear| 20.0 * linear.log10())
            .filter(|v| v.is_finite());
        let seconds = |frames: u64| frames as f64 / f64::from(self.rate.max(1));
        let (leading, trailing) = match (self.first_loud, self.last_loud) {
            (Some(first), Some(last)) => (seconds(first), seconds(self.frames - last - 1)),
            _ => (seconds(self.frames), 0.0),
        };
        Analysis {
            loudness: Loudness {
                integrated_lufs: finite(self.meter.loudness_global()),
                range_lu: finite(self.meter.loudness_range()),
                true_peak_dbtp: true_peak,
            },
            silence: Silence {
                leading_s: leading,
                trailing_s: trailing,
                threshold_dbfs: self.settings.silence_threshold_dbfs,
            },
            clipped_samples: self.clipped,
            sample_rate: self.rate,
            channels: self.channels,
            bits_per_sample: self.bits_per_sample,
            codec: self.codec,
            quality_rules_passed: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1 kHz sine at −20 dBFS, mono 48 kHz, with 0.5 s of silence before and 0.25 s after,
    /// and three samples at full scale.
    #[test]
    fn silence_clipping_and_a_sines_loudness() {
        let rate = 48_000;
        let mut samples = vec![0.0f32; rate / 2];
        let amplitude = 10f32.powf(-20.0 / 20.0);
        samples.extend(
            (0..rate * 2)
                .map(|i| amplitude * (i as f32 * 1000.0 * std::f32::consts::TAU / rate as f32).sin()),
        );
        samples.extend(vec![0.0f32; rate / 4]);
        let at = rate;
        samples[at] = 1.0;
        samples[at + 1] = -1.0;
        samples[at + 2] = 32767.0 / 32768.0;
        // One code short of negative full scale is not clipped.
        samples[at + 3] = -32767.0 / 32768.0;
        let mut analyser =
            Analyser::new(1, rate as u32, Some(16), "pcm_s16le", AnalysisSettings::default()).unwrap();
        for block in samples.chunks(1000) {
            analyser.add(block);
        }
        let analysis = analyser.finish();
        assert_eq!(analysis.clipped_samples, 3);
        assert!((analysis.silence.leading_s - 0.5).abs() < 0.001, "{analysis:?}");
        // The sine's last loud sample sits just before its end.
        assert!((analysis.silence.trailing_s - 0.25).abs() < 0.002, "{analysis:?}");
        // A full-scale sine reads −3.01 LUFS at 1 kHz; at −20 dBFS, about −23 LUFS (a little
        // lower: the 400 ms blocks that straddle the silence pass the gates; the integration
        // test checks the figure against pyloudnorm).
        let lufs = analysis.loudness.integrated_lufs.unwrap();
        assert!((lufs - -23.0).abs() < 0.6, "{lufs}");
        let silent = Analyser::new(2, 16_000, Some(16), "pcm_s16le", AnalysisSettings::default()).unwrap();
        let mut silent = silent;
        silent.add(&vec![0.0; 32_000]);
        let analysis = silent.finish();
        assert_eq!(analysis.loudness.integrated_lufs, None, "silence has no integrated loudness");
        assert_eq!(analysis.silence.leading_s, 1.0);
    }
}
