//! What the worker knows about audio itself, apart from where it comes from or goes:
//! [`format`] (recognising WAV, MP3, Ogg and FLAC from their first bytes), [`measure`]
//! (confirming the container and the seconds of audio it holds, while it downloads) and
//! [`wav`] (a WAV's header, which gives its length) and [`analysis`] (loudness, silence and
//! clipping of the decoded samples, in the same pass), with [`quality`] (the rules a take must
//! pass to be stored).

pub mod analysis;
pub mod format;
pub mod measure;
pub mod quality;
pub mod wav;

pub use format::AudioFormat;
pub use measure::Measure;
