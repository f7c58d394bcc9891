//! The error every stage returns: which stage failed, whether retrying can help, and why.

use std::fmt;

/// The pipeline stage an error comes from; named in logs, dead-letter headers and
/// `audio.failed` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The broker's delivery of the job, before any stage: a job delivered again and again
    /// without finishing (its worker died each time) is refused here.
    Delivery,
    /// Reading the job's JSON and validating its fields.
    Parse,
    /// Fetching the audio from the generation service.
    Download,
    /// Putting the object into S3 and presigning its URL.
    Upload,
    /// Upserting the asset's document in MongoDB.
    Catalog,
    /// Publishing the completion event (with publisher confirms).
    Publish,
}

impl Stage {
    /// The stage's name as used in headers and events (`download`, `upload`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Delivery => "delivery",
            Stage::Parse => "parse",
            Stage::Download => "download",
            Stage::Upload => "upload",
            Stage::Catalog => "catalog",
            Stage::Publish => "publish",
        }
    }
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Self; 6] =
        [Self::Delivery, Self::Parse, Self::Download, Self::Upload, Self::Catalog, Self::Publish];
}

impl std::str::FromStr for Stage {
    type Err = String;

    /// Parses a stage name as [`Stage::as_str`] writes it; an unknown name is an error that
    /// lists the valid ones (so `--stage dowload` is refused, not an empty match).
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|s| s.as_str() == name).ok_or_else(|| {
            let valid: Vec<&str> = Self::ALL.iter().map(|s| s.as_str()).collect();
            format!("unknown stage {name:?}: expected one of {}", valid.join(", "))
        })
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether an error is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The same request may succeed later: connect or read timeouts, HTTP 5xx/408/429, S3
    /// slow-down, MongoDB network or server-selection errors.
    Transient,
    /// Retrying cannot help: an invalid job, HTTP 404 and other 4xx, access denied.
    Permanent,
}

impl ErrorClass {
    /// `transient` or `permanent`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// A failed stage: what failed, whether to retry, and the cause in words (HTTP status and URL
/// without its query, S3 error code, MongoDB error). Never holds a secret or a presigned query.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{stage} failed ({}): {reason}", class.as_str())]
pub struct StageError {
    /// Where it failed.
    pub stage: Stage,
    /// Retry or not.
    pub class: ErrorClass,
    /// The cause, whole.
    pub reason: String,
    /// The source answered that the thing is not there (HTTP 404/410): for a download, the
    /// temporary audio may already have been saved and cleaned up.
    pub not_found: bool,
}

impl StageError {
    /// A transient error of `stage`.
    pub fn transient(stage: Stage, reason: impl Into<String>) -> Self {
        Self { stage, class: ErrorClass::Transient, reason: reason.into(), not_found: false }
    }

    /// A permanent error of `stage`.
    pub fn permanent(stage: Stage, reason: impl Into<String>) -> Self {
        Self { stage, class: ErrorClass::Permanent, reason: reason.into(), not_found: false }
    }

    /// True when a retry may succeed.
    pub fn is_transient(&self) -> bool {
        self.class == ErrorClass::Transient
    }
}

/// Formats an error with its whole `source()` chain, `outer: inner: innermost`, because the
/// useful part of a client error (connection refused, timed out) is usually at the bottom.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = e.source();
    }
    out
}

/// A URL as safe to log: scheme, host, port and path, no credentials, no query (a presigned
/// URL's query is a credential).
pub fn redact_url(url: &url::Url) -> String {
    let mut clean = url.clone();
    clean.set_query(None);
    clean.set_fragment(None);
    let _ = clean.set_username("");
    let _ = clean.set_password(None);
    clean.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_names_round_trip_and_typos_are_refused() {
        for stage in Stage::ALL {
            assert_eq!(stage.as_str().parse::<Stage>(), Ok(stage));
        }
        assert_eq!(
            "dowload".parse::<Stage>(),
            Err("unknown stage \"dowload\": expected one of delivery, parse, download, upload, catalog, publish".into())
        );
    }
}
