//! Measuring a spooled file: symphonia's demuxer reads the container (no decoding), which
//! confirms the format the first bytes claimed and gives the seconds of audio it really holds.

use std::path::Path;

use crate::audio::AudioFormat;

/// Reads the spool file with symphonia's demuxer (no decoding) and returns the seconds of audio
/// its packets hold.
///
/// # Errors
/// A message when the container does not parse as `format`, has no audio track, or holds at
/// least 0.1 s less audio than its header declares (a truncated file).
pub fn measure(path: &Path, format: AudioFormat) -> Result<f64, String> {
    use symphonia::core::errors::Error;
    use symphonia::core::formats::probe::Hint;
    use symphonia::core::formats::{FormatOptions, TrackType};
    use symphonia::core::io::MediaSourceStream;
    use symphonia::core::meta::MetadataOptions;

    let file = std::fs::File::open(path).map_err(|e| format!("reopening the spool file: {e}"))?;
    let mss = MediaSourceStream::new(Box::new(file), Default::default());
    let mut hint = Hint::new();
    hint.with_extension(format.extension());
    let mut reader = symphonia::default::get_probe()
        .probe(&hint, mss, FormatOptions::default(), MetadataOptions::default())
        .map_err(|e| match e {
            Error::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                format!("truncated {} file (it ends inside its header)", format.name())
            }
            e => format!("not a readable {} stream ({e})", format.name()),
        })?;
    let track = reader
        .default_track(TrackType::Audio)
        .ok_or_else(|| format!("the {} file has no audio track", format.name()))?;
    let (track_id, time_base, declared) = (track.id, track.time_base, track.duration);
    let time_base = time_base.ok_or_else(|| format!("the {} stream has no time base", format.name()))?;
    let mut counted: u64 = 0;
    loop {
        match reader.next_packet() {
            Ok(Some(packet)) if packet.track_id == track_id => counted += packet.dur.get(),
            Ok(Some(_)) => {}
            Ok(None) => break,
            // A stream cut mid-packet ends here; the comparison below tells whether audio is missing.
            Err(Error::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => {
                return Err(format!("the {} stream is corrupt after {counted} ticks ({e})", format.name()));
            }
        }
    }
    let seconds = |ticks: u64| {
        time_base
            .calc_duration(symphonia::core::units::Duration::new(ticks))
            .map_or(f64::MAX, |t| t.as_secs_f64())
    };
    let mut measured = seconds(counted);
    if let Some(declared) = declared.map(|d| seconds(d.get())) {
        // WAV and FLAC headers state the exact length, so less audio than that is a cut file.
        // An MP3's is an encoder tag or an estimate from the bitrate, and Ogg has none.
        if measured + 0.1 < declared && matches!(format, AudioFormat::Wav | AudioFormat::Flac) {
            return Err(format!(
                "truncated {} file: its header declares {declared:.3} s but it holds {measured:.3} s",
                format.name()
            ));
        }
        // Whole MP3 frames include the encoder's delay and padding; the header's length does not.
        if declared <= measured {
            measured = declared;
        }
    }
    if counted == 0 {
        return Err(format!("the {} stream holds no audio", format.name()));
    }
    Ok(measured)
}

#[cfg(test)]
mod tests {
    use super::measure;
    use crate::audio::AudioFormat;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/audio").join(name)
    }

    /// Real files of each format (made with sox, lame, oggenc, opusenc and flac; see
    /// tests/fixtures/audio/README.md): the sniffed format and the measured duration (1.5 s).
    #[test]
    fn real_files_are_sniffed_and_measured() {
        // MP3s are measured in whole frames (72 ms at 8 kHz), encoder delay and padding included:
        // well inside the 0.5 s that flags a mismatch.
        for (name, format, tolerance) in [
            ("tone.wav", AudioFormat::Wav, 0.01),
            ("tone-extensible.wav", AudioFormat::Wav, 0.01),
            ("tone.mp3", AudioFormat::Mp3, 0.2),
            ("tone-id3.mp3", AudioFormat::Mp3, 0.1),
            ("tone-vorbis.ogg", AudioFormat::Ogg, 0.01),
            ("tone-opus.ogg", AudioFormat::Ogg, 0.01),
            ("tone.flac", AudioFormat::Flac, 0.01),
        ] {
            let bytes = std::fs::read(fixture(name)).unwrap();
            assert_eq!(AudioFormat::sniff(&bytes[..AudioFormat::SNIFF_BYTES]), Some(format), "{name}");
            let seconds = measure(&fixture(name), format).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!((seconds - 1.5).abs() <= tolerance, "{name}: measured {seconds} s");
        }
    }

    #[test]
    fn truncated_and_mislabelled_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let wav = std::fs::read(fixture("tone.wav")).unwrap();
        let cut = dir.path().join("cut.wav");
        std::fs::write(&cut, &wav[..wav.len() / 2]).unwrap();
        let err = measure(&cut, AudioFormat::Wav).unwrap_err();
        assert!(err.contains("truncated WAV"), "{err}");
        let flac = std::fs::read(fixture("tone.flac")).unwrap();
        let cut = dir.path().join("cut.flac");
        std::fs::write(&cut, &flac[..flac.len() / 2]).unwrap();
        let err = measure(&cut, AudioFormat::Flac).unwrap_err();
        assert!(err.contains("truncated FLAC"), "{err}");
        let header_only = dir.path().join("header.wav");
        std::fs::write(&header_only, &wav[..44]).unwrap();
        assert!(measure(&header_only, AudioFormat::Wav).is_err());
        let html = dir.path().join("page.wav");
        std::fs::write(&html, b"RIFF\x24\x00\x00\x00WAVE<html>not really</html>").unwrap();
        assert!(measure(&html, AudioFormat::Wav).is_err());
    }
}
