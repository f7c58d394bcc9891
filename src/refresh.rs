//! Fresh URLs for a saved asset: the answer to an `audio.url.refresh` request on the bus and to
//! `audio-worker url` in the shell. A URL handed out with a save dies (a presigned URL after at
//! most 7 days, sooner with temporary credentials); the object does not, so whoever holds the
//! asset's id and tenant can ask for a new one at any time.
//!
//! Request (JSON Schema `schemas/url-refresh-request.v1.json`): `{asset_id, customer_id,
//! user_id}`, with `reply_to` and `correlation_id` as message properties. Reply (type
//! `audio.url.refreshed`, `schemas/url-refresh-reply.v1.json`): `status: "ok"` with the current
//! version's URLs and their expiry, or `status: "refused"` with an `error` (`invalid_request`,
//! `not_found`, `unavailable`) and its reason. Another tenant's asset is `not_found`, exactly
//! like an asset that does not exist, so a reply never tells whether another tenant has an id.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::StageError;
use crate::job::KeySegment;
use crate::pipeline::catalog::Catalog;
use crate::pipeline::store::Store;

/// Routing key and message `type` of a reply.
pub const REFRESHED_TYPE: &str = "audio.url.refreshed";

/// A refresh request as sent. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RefreshRequest {
    /// The asset (UUID).
    pub asset_id: String,
    /// The tenant the asker acts for: only its own assets are answered.
    pub customer_id: String,
    /// The owner within the tenant.
    pub user_id: String,
}

/// One fresh URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FreshUrl {
    /// The object key the URL points at.
    pub key: String,
    /// The URL.
    pub url: String,
    /// When it stops working.
    pub url_expires_at: DateTime<Utc>,
}

/// A rendition's fresh URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FreshRendition {
    /// `flac` or `vorbis`.
    pub name: String,
    /// Its key and URL.
    #[serde(flatten)]
    pub url: FreshUrl,
}

/// Why no URLs are given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The request is not JSON or names no valid asset or tenant.
    InvalidRequest,
    /// The tenant has no saved asset of that id (another tenant's asset included).
    NotFound,
    /// MongoDB or S3 did not answer; asking again later may work.
    Unavailable,
}

/// The reply to a refresh request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefreshReply {
    /// Always `audio.url.refreshed`.
    pub event_type: String,
    /// The asset asked for, as sent.
    pub asset_id: String,
    /// `ok` or `refused`.
    pub status: String,
    /// Why it was refused (with `status: refused`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Refusal>,
    /// The reason in words (with `status: refused`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The asset's current version (with `status: ok`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// The audio's fresh URL (with `status: ok`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<FreshUrl>,
    /// The waveform's fresh URL, when the asset has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waveform: Option<FreshUrl>,
    /// Each rendition's fresh URL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub renditions: Vec<FreshRendition>,
    /// When the URLs were made.
    pub refreshed_at: DateTime<Utc>,
}

impl RefreshReply {
    fn refused(asset_id: &str, error: Refusal, reason: impl Into<String>) -> Self {
        Self {
            event_type: REFRESHED_TYPE.into(),
            asset_id: asset_id.to_owned(),
            status: "refused".into(),
            error: Some(error),
            reason: Some(reason.into()),
            version: None,
            storage: None,
            waveform: None,
            renditions: Vec::new(),
            refreshed_at: Utc::now(),
        }
    }
}

/// Answers a request's body (see [`answer`]); a body that is not a request is refused as
/// `invalid_request`.
pub async fn answer_body(catalog: &Catalog, store: &Store, body: &[u8]) -> RefreshReply {
    match serde_json::from_slice::<RefreshRequest>(body) {
        Ok(request) => answer(catalog, store, &request).await,
        Err(e) => {
            let asset_id = crate::job::sniff_asset_id(body).unwrap_or_default();
            RefreshReply::refused(&asset_id, Refusal::InvalidRequest, format!("invalid request JSON: {e}"))
        }
    }
}

/// Fresh URLs for the current version of `request`'s asset, when the tenant it names has it
/// saved.
pub async fn answer(catalog: &Catalog, store: &Store, request: &RefreshRequest) -> RefreshReply {
    let refused = |error, reason: String| RefreshReply::refused(&request.asset_id, error, reason);
    let asset_id = match Uuid::parse_str(&request.asset_id) {
        Ok(id) => id,
        Err(e) => {
            return refused(Refusal::InvalidRequest, format!("invalid field asset_id: not a UUID: {e}"));
        }
    };
    let tenant = KeySegment::parse(&request.customer_id)
        .map_err(|m| format!("invalid field customer_id: {m}"))
        .and_then(|c| {
            KeySegment::parse(&request.user_id)
                .map(|u| (c, u))
                .map_err(|m| format!("invalid field user_id: {m}"))
        });
    let (customer_id, user_id) = match tenant {
        Ok(tenant) => tenant,
        Err(reason) => return refused(Refusal::InvalidRequest, reason),
    };
    let unavailable = |e: StageError| refused(Refusal::Unavailable, e.reason);
    let saved = match catalog.saved_asset(asset_id, &customer_id, &user_id).await {
        Ok(Some(saved)) => saved,
        Ok(None) => {
            return refused(
                Refusal::NotFound,
                format!("no saved asset {asset_id} for customer {customer_id} and user {user_id}"),
            );
        }
        Err(e) => return unavailable(e),
    };
    let fresh = |key: String| async move {
        store.presign_get(&key).await.map(|(url, url_expires_at)| FreshUrl { key, url, url_expires_at })
    };
    let storage = match fresh(saved.key.clone()).await {
        Ok(url) => url,
        Err(e) => return unavailable(e),
    };
    let waveform = match saved.waveform_key.clone() {
        Some(key) => match fresh(key).await {
            Ok(url) => Some(url),
            Err(e) => return unavailable(e),
        },
        None => None,
    };
    let mut renditions = Vec::with_capacity(saved.renditions.len());
    for (name, key) in saved.renditions {
        match fresh(key).await {
            Ok(url) => renditions.push(FreshRendition { name, url }),
            Err(e) => return unavailable(e),
        }
    }
    RefreshReply {
        event_type: REFRESHED_TYPE.into(),
        asset_id: request.asset_id.clone(),
        status: "ok".into(),
        error: None,
        reason: None,
        version: Some(saved.version),
        storage: Some(storage),
        waveform,
        renditions,
        refreshed_at: Utc::now(),
    }
}
