//! What the worker knows about audio itself, apart from where it comes from or goes:
//! [`format`] (recognising WAV, MP3, Ogg and FLAC from their first bytes) and [`measure`]
//! (confirming the container and the seconds of audio it holds).

pub mod format;
pub mod measure;

pub use format::AudioFormat;
pub use measure::measure;
