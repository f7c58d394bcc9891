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
    /// The URL, made as `DELIVERY` says.
    pub url: String,
    /// When it stops working; `null` for a `public` URL, which does not.
    pub url_expires_at: Option<DateTime<Utc>>,
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
        store.delivery_url(&key).await.map(|(url, url_expires_at)| FreshUrl { key, url, url_expires_at })
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

#[cfg(test)]
mod schema_tests {
    use super::*;

    fn keys(value: &serde_json::Value) -> Vec<String> {
        let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }

    fn required_keys(schema: &serde_json::Value) -> Vec<String> {
        let mut keys: Vec<String> =
            schema["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
        keys.sort();
        keys
    }

    fn assert_valid(schema: &serde_json::Value, instance: &serde_json::Value, what: &str) {
        let validator = jsonschema::options().should_validate_formats(true).build(schema).unwrap();
        let errors: Vec<String> = validator.iter_errors(instance).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{what} does not validate: {errors:?}\n{instance:#}");
    }

    fn fresh(key: &str) -> FreshUrl {
        FreshUrl { key: key.into(), url: format!("http://s/{key}?sig=1"), url_expires_at: Some(Utc::now()) }
    }

    /// An ok reply (with a waveform and a rendition) and a refused one show, between them, exactly
    /// the fields `schemas/url-refresh-reply.v1.json` lists, and each validates.
    #[test]
    fn replies_match_their_schema() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../schemas/url-refresh-reply.v1.json")).unwrap();
        let asset_id = "6f1c2a4e-8d3b-4b7a-9a51-2f0e5c7d9b10";
        let ok = RefreshReply {
            event_type: REFRESHED_TYPE.into(),
            asset_id: asset_id.into(),
            status: "ok".into(),
            error: None,
            reason: None,
            version: Some(3),
            storage: Some(fresh("c/u/audio/a.wav")),
            waveform: Some(fresh("c/u/audio/a.peaks.json")),
            renditions: vec![FreshRendition { name: "flac".into(), url: fresh("c/u/audio/a.flac.flac") }],
            refreshed_at: Utc::now(),
        };
        let refused = RefreshReply::refused(asset_id, Refusal::NotFound, "no saved asset");
        let (ok, refused) = (serde_json::to_value(&ok).unwrap(), serde_json::to_value(&refused).unwrap());
        let mut union: Vec<String> = keys(&ok).into_iter().chain(keys(&refused)).collect();
        union.sort();
        union.dedup();
        assert_eq!(union, keys(&schema["properties"]));
        for (reply, what) in [(&ok, "ok"), (&refused, "refused")] {
            assert!(required_keys(&schema).iter().all(|k| reply.get(k).is_some()), "{what}: {reply}");
            assert_valid(&schema, reply, what);
        }
        assert_eq!(schema["properties"]["event_type"]["const"], REFRESHED_TYPE);
        assert_eq!(keys(&ok["storage"]), keys(&schema["properties"]["storage"]["properties"]));
        assert_eq!(keys(&ok["waveform"]), keys(&schema["properties"]["waveform"]["properties"]));
        assert_eq!(
            keys(&ok["renditions"][0]),
            keys(&schema["properties"]["renditions"]["items"]["properties"])
        );
        let errors: Vec<serde_json::Value> =
            [Refusal::InvalidRequest, Refusal::NotFound, Refusal::Unavailable]
                .map(|e| serde_json::json!(e))
                .into();
        assert_eq!(schema["properties"]["error"]["enum"], serde_json::Value::from(errors));
        // A reply without what its status promises does not validate.
        let mut no_storage = ok.clone();
        no_storage.as_object_mut().unwrap().remove("storage");
        assert!(!jsonschema::is_valid(&schema, &no_storage), "ok without storage");
    }

    /// The request schema requires exactly the fields a request cannot do without.
    #[test]
    fn the_request_schema_lists_exactly_the_fields_the_request_requires() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../schemas/url-refresh-request.v1.json")).unwrap();
        let request = serde_json::json!({
            "asset_id": "6f1c2a4e-8d3b-4b7a-9a51-2f0e5c7d9b10", "customer_id": "c1", "user_id": "u1"
        });
        let request_keys = keys(
            &serde_json::to_value(serde_json::from_value::<RefreshRequest>(request.clone()).unwrap())
                .unwrap(),
        );
        assert_eq!(request_keys, keys(&schema["properties"]));
        assert_valid(&schema, &request, "the request");
        let required = required_keys(&schema);
        for field in keys(&schema["properties"]) {
            let mut body = request.clone();
            body.as_object_mut().unwrap().remove(&field);
            let parsed = serde_json::from_value::<RefreshRequest>(body);
            assert_eq!(parsed.is_err(), required.contains(&field), "{field}");
        }
    }
}
