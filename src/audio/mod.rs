//! What the worker knows about audio itself, apart from where it comes from or goes:
//! [`format`] (recognising WAV, MP3, Ogg and FLAC from their first bytes), [`measure`]
//! (confirming the container and the seconds of audio it holds, while it downloads), [`wav`] (a
//! WAV's header, which gives its length), [`decode`] (the decoded samples, sent to what asks for
//! them), [`analysis`] (loudness, silence and clipping), [`quality`] (the rules a take must pass
//! to be stored), [`waveform`] (peaks for players), [`rendition`] (FLAC and Vorbis copies) and
//! [`encoded`] (the files those two write, hashed as they are written).

pub mod analysis;
pub mod decode;
pub mod encoded;
pub mod format;
pub mod measure;
pub mod quality;
pub mod rendition;
pub mod wav;
pub mod waveform;

pub use format::AudioFormat;
pub use measure::Measure;
