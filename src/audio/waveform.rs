//! Waveform peaks for players, in the BBC audiowaveform JSON format, version 2: what
//! wavesurfer.js and peaks.js load to draw a take without downloading it.
//!
//! ```json
//! {"version":2,"channels":1,"sample_rate":24000,"samples_per_pixel":256,"bits":16,
//!  "data":[-1024,998,-2010,2202,...],"length":94}
//! ```
//! Each pixel summarises `samples_per_pixel` frames as a min/max pair per channel (channel by
//! channel within a pixel); the last pixel holds the frames left over. A sample's value is its
//! top 16 bits (`floor(x · 32768)` of the decoded float, the stored code itself for 16-bit PCM),
//! or its top 8 with `bits: 8` (`floor(x · 128)`). The pairs are written to a spool file as they
//! are made (`length` comes after `data`, which JSON allows), so memory stays flat for any length.

use std::io::Write;
use std::path::Path;

use crate::audio::encoded::{Encoded, EncodedKind, SpoolFile, WaveformInfo};

/// `WAVEFORM`, `WAVEFORM_SAMPLES_PER_PIXEL` and `WAVEFORM_BITS`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WaveformSettings {
    /// Frames per min/max pair (default 256, audiowaveform's default zoom).
    pub samples_per_pixel: u32,
    /// 8 or 16 (default 16): 8 halves the file, for players that draw small.
    pub bits: u32,
}

impl Default for WaveformSettings {
    fn default() -> Self {
        Self { samples_per_pixel: 256, bits: 16 }
    }
}

/// Makes the waveform file of one stream, fed its decoded frames in order.
#[derive(Debug)]
pub struct WaveformWriter {
    out: SpoolFile,
    info: WaveformInfo,
    /// Min and max of the pixel being filled, per channel.
    current: Vec<(i32, i32)>,
    /// Frames in the pixel being filled.
    filled: u32,
    /// The formatting buffer for one pixel's values.
    text: String,
}

impl WaveformWriter {
    /// Starts the file in `dir` for `channels` × `sample_rate` Hz audio.
    ///
    /// # Errors
    /// The spool file cannot be created or written.
    pub fn new(
        dir: &Path,
        channels: u32,
        sample_rate: u32,
        settings: WaveformSettings,
    ) -> std::io::Result<Self> {
        let mut out = SpoolFile::create(dir, "peaks-")?;
        let info = WaveformInfo {
            channels,
            sample_rate,
            samples_per_pixel: settings.samples_per_pixel.max(1),
            bits: if settings.bits == 8 { 8 } else { 16 },
            length: 0,
        };
        write!(
            out,
            r#"{{"version":2,"channels":{},"sample_rate":{},"samples_per_pixel":{},"bits":{},"data":["#,
            info.channels, info.sample_rate, info.samples_per_pixel, info.bits
        )?;
        Ok(Self {
            out,
            info,
            current: vec![(i32::MAX, i32::MIN); channels.max(1) as usize],
            filled: 0,
            text: String::new(),
        })
    }

    /// Adds interleaved frames (`channels` samples each, in [-1, 1]).
    ///
    /// # Errors
    /// The spool file cannot be written.
    pub fn add(&mut self, interleaved: &[f32]) -> std::io::Result<()> {
        let scale = if self.info.bits == 8 { 128.0 } else { 32768.0 };
        let top = if self.info.bits == 8 { 127 } else { 32767 };
        for frame in interleaved.chunks_exact(self.current.len()) {
            for (range, &sample) in self.current.iter_mut().zip(frame) {
                let value = ((sample * scale).floor() as i32).clamp(-top - 1, top);
                range.0 = range.0.min(value);
                range.1 = range.1.max(value);
            }
            self.filled += 1;
            if self.filled == self.info.samples_per_pixel {
                self.flush_pixel()?;
            }
        }
        Ok(())
    }

    /// Writes the pixel being filled and starts the next.
    fn flush_pixel(&mut self) -> std::io::Result<()> {
        use std::fmt::Write as _;
        self.text.clear();
        for range in &mut self.current {
            let sep = if self.info.length == 0 && self.text.is_empty() { "" } else { "," };
            let _ = write!(self.text, "{sep}{},{}", range.0, range.1);
            *range = (i32::MAX, i32::MIN);
        }
        self.out.write_all(self.text.as_bytes())?;
        self.info.length += 1;
        self.filled = 0;
        Ok(())
    }

    /// The finished file: the last, partial pixel written, then `length`.
    ///
    /// # Errors
    /// The spool file cannot be written.
    pub fn finish(mut self) -> std::io::Result<Encoded> {
        if self.filled > 0 {
            self.flush_pixel()?;
        }
        write!(self.out, r#"],"length":{}}}"#, self.info.length)?;
        let (path, size, sha256) = self.out.finish()?;
        Ok(Encoded { what: EncodedKind::Waveform(self.info), path, size, sha256 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Five frames of stereo at 2 frames per pixel: three pixels, the last one partial, each a
    /// min/max pair per channel, in a file that parses as audiowaveform's JSON.
    #[test]
    fn pairs_per_pixel_and_channel_with_a_partial_last_pixel() {
        let dir = tempfile::tempdir().unwrap();
        let settings = WaveformSettings { samples_per_pixel: 2, bits: 16 };
        let mut writer = WaveformWriter::new(dir.path(), 2, 8000, settings).unwrap();
        let s = |code: i32| code as f32 / 32768.0;
        writer.add(&[s(10), s(-5), s(-20), s(7)]).unwrap();
        writer.add(&[s(3), s(1), s(4), s(-32768), s(32767), s(0)]).unwrap();
        let encoded = writer.finish().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&encoded.path).unwrap()).unwrap();
        assert_eq!(json["version"], 2);
        assert_eq!(json["channels"], 2);
        assert_eq!(json["sample_rate"], 8000);
        assert_eq!(json["samples_per_pixel"], 2);
        assert_eq!(json["bits"], 16);
        assert_eq!(json["length"], 3);
        let data: Vec<i64> = serde_json::from_value(json["data"].clone()).unwrap();
        assert_eq!(data, vec![-20, 10, -5, 7, 3, 4, -32768, 1, 32767, 32767, 0, 0]);
        assert_eq!(encoded.size, std::fs::metadata(&encoded.path).unwrap().len());
        assert_eq!(encoded.key_suffix(), "peaks.json");
    }

    #[test]
    fn eight_bits_keep_the_top_byte() {
        let dir = tempfile::tempdir().unwrap();
        let settings = WaveformSettings { samples_per_pixel: 4, bits: 8 };
        let mut writer = WaveformWriter::new(dir.path(), 1, 8000, settings).unwrap();
        writer.add(&[-1.0, 0.999, 300.0 / 32768.0, -300.0 / 32768.0]).unwrap();
        let encoded = writer.finish().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&encoded.path).unwrap()).unwrap();
        assert_eq!(json["data"], serde_json::json!([-128, 127]));
        assert_eq!(json["bits"], 8);
    }
}
