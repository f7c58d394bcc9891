//! The container formats the worker accepts, recognised from a file's first bytes (magic
//! numbers), never from its URL or the server's Content-Type.

/// A container format recognised from the first bytes of the file, not from the URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioFormat {
    /// RIFF/WAVE.
    Wav,
    /// MPEG layer III, with or without an ID3 tag.
    Mp3,
    /// Ogg (Vorbis or Opus).
    Ogg,
    /// FLAC.
    Flac,
}

impl AudioFormat {
    /// Bytes [`AudioFormat::sniff`] wants: an Ogg page header and the codec id after it.
    pub const SNIFF_BYTES: usize = 64;

    /// Recognises a format from the first bytes of a file (the `infer` crate's magic numbers),
    /// whatever the server's Content-Type said.
    pub fn sniff(head: &[u8]) -> Option<Self> {
        use infer::audio;
        if audio::is_wav(head) {
            Some(Self::Wav)
        } else if audio::is_flac(head) {
            Some(Self::Flac)
        } else if audio::is_ogg(head) || audio::is_ogg_opus(head) {
            Some(Self::Ogg)
        } else if audio::is_mp3(head) || is_mpeg_layer3_frame(head) {
            Some(Self::Mp3)
        } else {
            None
        }
    }

    /// The format's usual name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Wav => "WAV",
            Self::Mp3 => "MP3",
            Self::Ogg => "Ogg",
            Self::Flac => "FLAC",
        }
    }

    /// The object key's file extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Wav => "wav",
            Self::Mp3 => "mp3",
            Self::Ogg => "ogg",
            Self::Flac => "flac",
        }
    }

    /// The object's Content-Type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Wav => "audio/wav",
            Self::Mp3 => "audio/mpeg",
            Self::Ogg => "audio/ogg",
            Self::Flac => "audio/flac",
        }
    }
}

/// An MPEG audio layer III frame header that `infer` does not list (it knows `FF FB`, `FF F3`
/// and `FF F2` only, so 8 kHz MPEG-2.5 and CRC-protected frames would be refused): 11 sync bits,
/// a real version (not `01`), layer III (`01`), and a bitrate index that is not `1111`. This
/// keeps out e.g. UTF-16 text (`FF FE`); the demuxer then confirms the stream.
fn is_mpeg_layer3_frame(head: &[u8]) -> bool {
    matches!(head, [0xFF, second, third, ..]
        if second & 0xE0 == 0xE0 && second & 0x18 != 0x08 && second & 0x06 == 0x02 && third & 0xF0 != 0xF0)
}

#[cfg(test)]
mod tests {
    use super::AudioFormat;

    #[test]
    fn formats_are_recognised_from_their_magic_bytes() {
        assert_eq!(AudioFormat::sniff(b"RIFF\x24\x00\x00\x00WAVEfmt "), Some(AudioFormat::Wav));
        assert_eq!(AudioFormat::sniff(b"ID3\x04\x00\x00\x00\x00\x00\x00\x00\x00"), Some(AudioFormat::Mp3));
        assert_eq!(AudioFormat::sniff(&[0xFF, 0xFB, 0x90, 0x00]), Some(AudioFormat::Mp3));
        assert_eq!(AudioFormat::sniff(&[0xFF, 0xE3, 0x28, 0xC4]), Some(AudioFormat::Mp3), "MPEG-2.5, 8 kHz");
        assert_eq!(AudioFormat::sniff(b"OggS\x00\x02"), Some(AudioFormat::Ogg));
        assert_eq!(AudioFormat::sniff(b"fLaC\x00\x00"), Some(AudioFormat::Flac));
        assert_eq!(AudioFormat::sniff(b"<html><body>"), None);
        assert_eq!(AudioFormat::sniff(b"{\"error\":\"not found\"}"), None);
        assert_eq!(AudioFormat::sniff(&[0xFF, 0xFE, b'h', 0, b'i', 0]), None, "UTF-16 text");
        assert_eq!(AudioFormat::sniff(b"RIFF\x24\x00\x00\x00AVI LIST"), None);
        assert_eq!(AudioFormat::Wav.extension(), "wav");
        assert_eq!(AudioFormat::Wav.content_type(), "audio/wav");
    }
}
