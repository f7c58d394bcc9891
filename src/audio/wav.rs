//! The RIFF/WAVE header, read as the bytes stream in: a WAV's length is in its header (the
//! `fmt ` chunk's block size and rate, the `data` chunk's size), so it is measured without
//! reading its samples a second time, and a file cut short of its `data` chunk is caught from
//! the file's size alone.
//!
//! Chunks before `data` (`LIST`, `fact`, `bext`, …) are skipped by their sizes without being
//! buffered, so a large tag chunk costs no memory. Anything the header says that cannot be a WAV
//! (no `fmt ` before `data`, a zero rate or block size) is refused.

/// What a WAV's header says about its audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavHeader {
    /// `wFormatTag`: 1 PCM, 3 IEEE float, 6 A-law, 7 µ-law, 0xFFFE extensible, others (ADPCM…).
    pub format_tag: u16,
    /// Interleaved channels.
    pub channels: u16,
    /// Frames per second.
    pub sample_rate: u32,
    /// `nAvgBytesPerSec`: how compressed formats (ADPCM) give their length.
    pub byte_rate: u32,
    /// Bytes per frame (all channels); 0 never passes the header check.
    pub block_align: u16,
    /// `wBitsPerSample` (0 for some compressed formats).
    pub bits_per_sample: u16,
    /// Where the samples start: the byte after the `data` chunk's header.
    pub data_offset: u64,
    /// The `data` chunk's declared size; `None` when it is 0 or 0xFFFFFFFF (a streamed WAV
    /// written before its length was known: the samples run to the end of the file).
    pub data_len: Option<u64>,
}

impl WavHeader {
    /// Seconds of audio in `bytes` bytes of samples.
    pub fn seconds(&self, bytes: u64) -> f64 {
        match self.format_tag {
            1 | 3 | 6 | 7 | 0xFFFE => {
                (bytes / u64::from(self.block_align)) as f64 / f64::from(self.sample_rate)
            }
            _ => bytes as f64 / f64::from(self.byte_rate.max(1)),
        }
    }

    /// The seconds of audio a file of `total` bytes holds, checked against the header.
    ///
    /// # Errors
    /// A message when the file holds at least 0.1 s less audio than the header declares (a cut
    /// file), or none at all.
    pub fn measure(&self, total: u64) -> Result<f64, String> {
        let available = total.saturating_sub(self.data_offset);
        let held = self.data_len.map_or(available, |declared| declared.min(available));
        if let Some(declared) = self.data_len
            && self.seconds(declared) > self.seconds(available) + 0.1
        {
            return Err(format!(
                "truncated WAV file: its header declares {:.3} s but it holds {:.3} s",
                self.seconds(declared),
                self.seconds(available)
            ));
        }
        if self.seconds(held) <= 0.0 {
            return Err("the WAV stream holds no audio".into());
        }
        Ok(self.seconds(held))
    }
}

/// Where the scan is in the header.
#[derive(Debug, Clone)]
enum Step {
    /// Collecting `want` bytes into the buffer: the 12-byte RIFF header, a chunk header or
    /// the `fmt ` chunk's body.
    Collect { want: usize, then: Then },
    /// Skipping the body of a chunk we do not read.
    Skip(u64),
    /// The `data` chunk was reached.
    Done(WavHeader),
    /// The header cannot be a WAV's.
    Failed(String),
}

#[derive(Debug, Clone, Copy)]
enum Then {
    Riff,
    ChunkHeader,
    Fmt { padded: bool },
}

/// Reads a WAV header from a byte stream fed in pieces ([`WavScan::feed`]).
#[derive(Debug, Clone)]
pub struct WavScan {
    step: Step,
    buf: Vec<u8>,
    /// Bytes of the stream consumed so far.
    offset: u64,
    /// The `fmt ` chunk, once read.
    fmt: Option<(u16, u16, u32, u32, u16, u16)>,
}

impl Default for WavScan {
    fn default() -> Self {
        Self::new()
    }
}

/// The largest `fmt ` chunk read (a WAVE_FORMAT_EXTENSIBLE one is 40 bytes).
const MAX_FMT_BYTES: u32 = 1024;

impl WavScan {
    /// A scan at the start of a file.
    pub fn new() -> Self {
        Self { step: Step::Collect { want: 12, then: Then::Riff }, buf: Vec::new(), offset: 0, fmt: None }
    }

    /// The header, once the `data` chunk is reached.
    pub fn header(&self) -> Option<&WavHeader> {
        match &self.step {
            Step::Done(header) => Some(header),
            _ => None,
        }
    }

    /// Feeds the next bytes of the file; bytes after the `data` chunk's header are ignored.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.step {
                Step::Done(_) | Step::Failed(_) => return,
                Step::Skip(left) => {
                    let n = (*left).min(bytes.len() as u64);
                    *left -= n;
                    self.offset += n;
                    bytes = &bytes[n as usize..];
                    if *left == 0 {
                        self.step = Step::Collect { want: 8, then: Then::ChunkHeader };
                    }
                }
                Step::Collect { want, then } => {
                    let (want, then) = (*want, *then);
                    let n = (want - self.buf.len()).min(bytes.len());
                    self.buf.extend_from_slice(&bytes[..n]);
                    self.offset += n as u64;
                    bytes = &bytes[n..];
                    if self.buf.len() == want {
                        let collected = std::mem::take(&mut self.buf);
                        self.step = self.next(then, &collected);
                    }
                }
            }
        }
    }

    /// The header, or why there is none, once the whole file was fed.
    ///
    /// # Errors
    /// The file ended inside its header, or the header is not a WAV's.
    pub fn finish(&self) -> Result<WavHeader, String> {
        match &self.step {
            Step::Done(header) => Ok(*header),
            Step::Failed(why) => Err(why.clone()),
            Step::Collect { .. } | Step::Skip(_) => {
                Err("truncated WAV file (it ends inside its header)".into())
            }
        }
    }

    fn next(&mut self, then: Then, bytes: &[u8]) -> Step {
        let le16 = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let le32 = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        match then {
            Then::Riff if &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WAVE" => {
                Step::Collect { want: 8, then: Then::ChunkHeader }
            }
            Then::Riff => Step::Failed("not a readable WAV stream (no RIFF/WAVE header)".into()),
            Then::ChunkHeader => {
                let (id, size) = (&bytes[0..4], le32(4));
                match id {
                    b"fmt " if (16..=MAX_FMT_BYTES).contains(&size) => {
                        Step::Collect { want: size as usize, then: Then::Fmt { padded: size % 2 == 1 } }
                    }
                    b"fmt " => {
                        Step::Failed(format!("not a readable WAV stream (a fmt chunk of {size} bytes)"))
                    }
                    b"data" => self.data(size),
                    _ => Step::Skip(u64::from(size) + u64::from(size % 2)),
                }
            }
            Then::Fmt { padded } => {
                let fmt = (le16(0), le16(2), le32(4), le32(8), le16(12), le16(14));
                let (_, channels, rate, _, block_align, _) = fmt;
                if channels == 0 || rate == 0 || block_align == 0 {
                    return Step::Failed(format!(
                        "not a readable WAV stream (fmt: {channels} channels, {rate} Hz, {block_align}-byte frames)"
                    ));
                }
                self.fmt = Some(fmt);
                if padded { Step::Skip(1) } else { Step::Collect { want: 8, then: Then::ChunkHeader } }
            }
        }
    }

    fn data(&self, size: u32) -> Step {
        let Some((format_tag, channels, sample_rate, byte_rate, block_align, bits_per_sample)) = self.fmt
        else {
            return Step::Failed(
                "not a readable WAV stream (its data chunk comes before any fmt chunk)".into(),
            );
        };
        Step::Done(WavHeader {
            format_tag,
            channels,
            sample_rate,
            byte_rate,
            block_align,
            bits_per_sample,
            data_offset: self.offset,
            data_len: (size != 0 && size != u32::MAX).then_some(u64::from(size)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PCM WAV header with a LIST chunk before `data`, fed one byte at a time and whole.
    #[test]
    fn the_header_is_read_in_any_pieces_and_skips_other_chunks() {
        let mut wav = b"RIFF\0\0\0\0WAVE".to_vec();
        wav.extend_from_slice(b"fmt \x10\0\0\0");
        wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
        wav.extend_from_slice(&2u16.to_le_bytes()); // stereo
        wav.extend_from_slice(&8000u32.to_le_bytes());
        wav.extend_from_slice(&32000u32.to_le_bytes());
        wav.extend_from_slice(&4u16.to_le_bytes());
        wav.extend_from_slice(&16u16.to_le_bytes());
        wav.extend_from_slice(b"LIST\x05\0\0\0abcde\0"); // odd size: one pad byte
        wav.extend_from_slice(b"data");
        wav.extend_from_slice(&16000u32.to_le_bytes()); // 0.5 s
        let offset = wav.len() as u64;
        wav.extend(std::iter::repeat_n(0u8, 16000));
        let mut whole = WavScan::new();
        whole.feed(&wav);
        let mut bytewise = WavScan::new();
        for b in &wav {
            bytewise.feed(std::slice::from_ref(b));
        }
        let header = whole.finish().unwrap();
        assert_eq!(bytewise.finish().unwrap(), header);
        assert_eq!((header.channels, header.sample_rate, header.block_align), (2, 8000, 4));
        assert_eq!((header.data_offset, header.data_len), (offset, Some(16000)));
        assert_eq!(header.measure(wav.len() as u64).unwrap(), 0.5);
        // Cut at 0.25 s: refused; cut by less than 0.1 s: measured as held.
        let err = header.measure(offset + 8000).unwrap_err();
        assert_eq!(err, "truncated WAV file: its header declares 0.500 s but it holds 0.250 s");
        assert!((header.measure(offset + 15000).unwrap() - 0.46875).abs() < 1e-9);
        assert!(header.measure(offset).unwrap_err().contains("holds 0.000 s"), "a header alone");
        let streamed = WavHeader { data_len: None, ..header };
        assert_eq!(streamed.measure(wav.len() as u64).unwrap(), 0.5, "a streamed WAV runs to the end");
        assert_eq!(streamed.measure(offset).unwrap_err(), "the WAV stream holds no audio");
    }

    #[test]
    fn headers_that_are_not_a_wavs_are_refused() {
        let mut scan = WavScan::new();
        scan.feed(b"RIFF\x24\x00\x00\x00WAVE<html>not really</html>");
        assert!(scan.finish().is_err());
        let mut scan = WavScan::new();
        scan.feed(b"RIFF\0\0\0\0WAVEdata\x10\0\0\0");
        assert!(scan.finish().unwrap_err().contains("before any fmt chunk"));
        let mut scan = WavScan::new();
        scan.feed(b"RIFF\0\0\0\0WA");
        assert!(scan.finish().unwrap_err().contains("ends inside its header"));
    }
}
