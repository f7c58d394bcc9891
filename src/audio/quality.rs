//! Quality rules (`QUALITY_RULES`): limits on a take's analysis that keep a bad take out of the
//! library. A take that breaks one is a permanent error naming the rule and the measured value
//! (dead letter + `audio.failed`), checked after the download and before anything is stored.
//!
//! The rules, comma-separated `name=value`:
//! `max_leading_silence_s`, `max_trailing_silence_s` (seconds), `max_clipped_samples` (a count),
//! `min_integrated_lufs`, `max_integrated_lufs` (LUFS), `max_true_peak_dbtp` (dBTP). For
//! example `max_leading_silence_s=2,max_clipped_samples=0,min_integrated_lufs=-35`.

use std::fmt;

use crate::audio::analysis::Analysis;

/// One limit on a take's analysis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// `max_leading_silence_s`: seconds of silence before the speech.
    MaxLeadingSilence(f64),
    /// `max_trailing_silence_s`: seconds of silence after it.
    MaxTrailingSilence(f64),
    /// `max_clipped_samples`: samples at full scale.
    MaxClippedSamples(u64),
    /// `min_integrated_lufs`: too quiet below this (a silent take has no loudness and breaks it).
    MinIntegratedLufs(f64),
    /// `max_integrated_lufs`: too loud above this.
    MaxIntegratedLufs(f64),
    /// `max_true_peak_dbtp`: the highest true peak allowed.
    MaxTruePeakDbtp(f64),
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MaxLeadingSilence(v) => write!(f, "max_leading_silence_s={v}"),
            Self::MaxTrailingSilence(v) => write!(f, "max_trailing_silence_s={v}"),
            Self::MaxClippedSamples(v) => write!(f, "max_clipped_samples={v}"),
            Self::MinIntegratedLufs(v) => write!(f, "min_integrated_lufs={v}"),
            Self::MaxIntegratedLufs(v) => write!(f, "max_integrated_lufs={v}"),
            Self::MaxTruePeakDbtp(v) => write!(f, "max_true_peak_dbtp={v}"),
        }
    }
}

impl Rule {
    /// `Err` with what the take measured when it breaks this rule.
    fn check(&self, a: &Analysis) -> Result<(), String> {
        let db = |v: Option<f64>| v.map_or_else(|| "none (silence)".to_owned(), |v| format!("{v:.2}"));
        let broken = match *self {
            Self::MaxLeadingSilence(max) => (a.silence.leading_s > max)
                .then(|| format!("{:.3} s of leading silence", a.silence.leading_s)),
            Self::MaxTrailingSilence(max) => (a.silence.trailing_s > max)
                .then(|| format!("{:.3} s of trailing silence", a.silence.trailing_s)),
            Self::MaxClippedSamples(max) => {
                (a.clipped_samples > max).then(|| format!("{} clipped samples", a.clipped_samples))
            }
            Self::MinIntegratedLufs(min) => a
                .loudness
                .integrated_lufs
                .is_none_or(|v| v < min)
                .then(|| format!("integrated loudness {} LUFS", db(a.loudness.integrated_lufs))),
            Self::MaxIntegratedLufs(max) => a
                .loudness
                .integrated_lufs
                .is_some_and(|v| v > max)
                .then(|| format!("integrated loudness {} LUFS", db(a.loudness.integrated_lufs))),
            Self::MaxTruePeakDbtp(max) => a
                .loudness
                .true_peak_dbtp
                .is_some_and(|v| v > max)
                .then(|| format!("true peak {} dBTP", db(a.loudness.true_peak_dbtp))),
        };
        match broken {
            Some(measured) => Err(format!("quality rule {self} broken: {measured}")),
            None => Ok(()),
        }
    }
}

/// The rules of `QUALITY_RULES`, in the order given (empty: none).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QualityRules(pub Vec<Rule>);

impl QualityRules {
    /// Parses `name=value,name=value`.
    ///
    /// # Errors
    /// An unknown rule name, or a value that is not a number (a count for
    /// `max_clipped_samples`), with the offending item.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        for item in raw.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, value) = item.split_once('=').ok_or_else(|| format!("{item:?} is not name=value"))?;
            let number = || {
                value
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| format!("{item:?}: {value:?} is not a number"))
            };
            rules.push(match name.trim() {
                "max_leading_silence_s" => Rule::MaxLeadingSilence(number()?),
                "max_trailing_silence_s" => Rule::MaxTrailingSilence(number()?),
                "max_clipped_samples" => Rule::MaxClippedSamples(
                    value.trim().parse().map_err(|_| format!("{item:?}: {value:?} is not a count"))?,
                ),
                "min_integrated_lufs" => Rule::MinIntegratedLufs(number()?),
                "max_integrated_lufs" => Rule::MaxIntegratedLufs(number()?),
                "max_true_peak_dbtp" => Rule::MaxTruePeakDbtp(number()?),
                other => {
                    return Err(format!(
                        "unknown rule {other:?}: expected max_leading_silence_s, max_trailing_silence_s, \
                         max_clipped_samples, min_integrated_lufs, max_integrated_lufs or max_true_peak_dbtp"
                    ));
                }
            });
        }
        Ok(Self(rules))
    }

    /// True when no rule is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The rules the take passed (each as `name=value`), or the first one it broke.
    ///
    /// # Errors
    /// `quality rule {rule} broken: {what the take measured}`.
    pub fn judge(&self, analysis: &Analysis) -> Result<Vec<String>, String> {
        self.0.iter().map(|rule| rule.check(analysis).map(|()| rule.to_string())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::analysis::{Loudness, Silence};

    fn take(leading: f64, clipped: u64, lufs: Option<f64>) -> Analysis {
        Analysis {
            loudness: Loudness { integrated_lufs: lufs, range_lu: None, true_peak_dbtp: Some(-1.0) },
            silence: Silence { leading_s: leading, trailing_s: 0.1, threshold_dbfs: -60.0 },
            clipped_samples: clipped,
            sample_rate: 24_000,
            channels: 1,
            bits_per_sample: Some(16),
            codec: "pcm_s16le".into(),
            quality_rules_passed: None,
        }
    }

    #[test]
    fn rules_parse_judge_and_name_what_broke() {
        let rules =
            QualityRules::parse("max_leading_silence_s=2, max_clipped_samples=0,min_integrated_lufs=-35")
                .unwrap();
        assert_eq!(rules.0.len(), 3);
        assert_eq!(
            rules.judge(&take(0.5, 0, Some(-20.0))).unwrap(),
            ["max_leading_silence_s=2", "max_clipped_samples=0", "min_integrated_lufs=-35"]
        );
        assert_eq!(
            rules.judge(&take(0.5, 12, Some(-20.0))).unwrap_err(),
            "quality rule max_clipped_samples=0 broken: 12 clipped samples"
        );
        assert_eq!(
            rules.judge(&take(2.5, 0, Some(-20.0))).unwrap_err(),
            "quality rule max_leading_silence_s=2 broken: 2.500 s of leading silence"
        );
        let silent = rules.judge(&take(0.0, 0, None)).unwrap_err();
        assert!(silent.contains("min_integrated_lufs=-35 broken: integrated loudness none"), "{silent}");
        assert!(QualityRules::parse("").unwrap().is_empty());
        assert!(QualityRules::parse("max_loudness=3").unwrap_err().contains("unknown rule"));
        assert!(QualityRules::parse("max_clipped_samples=-1").unwrap_err().contains("not a count"));
        assert!(QualityRules::parse("min_integrated_lufs").unwrap_err().contains("name=value"));
    }
}
