//! The contract of an edited job (*edit, then replay*): it must validate against
//! `schemas/save-audio-job.v1.json` (formats checked), pass the worker's own parsing with the URL
//! policy, and keep the identity of the dead letter's job ([`IDENTITY_FIELDS`]). The pages
//! carry the identity in the edit form; the actions check both.

use std::sync::LazyLock;

use crate::dlq::normalize_asset_id;
use crate::job::SaveAudioJob;

/// The job schema (`schemas/save-audio-job.v1.json`), formats checked (a UUID must be one).
static JOB_SCHEMA: LazyLock<jsonschema::Validator> = LazyLock::new(|| {
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../../schemas/save-audio-job.v1.json"))
            .expect("the job schema is JSON");
    jsonschema::options().should_validate_formats(true).build(&schema).expect("the job schema compiles")
});

/// The edited job's bytes, or every reason it is refused: not a JSON object, against the
/// schema (each error with its place), or the worker's own parsing (the URL policy included).
pub fn validate_edit(text: &str, policy: &crate::url_policy::UrlPolicy) -> Result<Vec<u8>, Vec<String>> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| vec![format!("not JSON: {e}")])?;
    if !value.is_object() {
        return Err(vec!["the job must be a JSON object".into()]);
    }
    let errors: Vec<String> = JOB_SCHEMA
        .iter_errors(&value)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() { format!("schema: {e}") } else { format!("schema, at {at}: {e}") }
        })
        .collect();
    if !errors.is_empty() {
        return Err(errors);
    }
    let body = serde_json::to_vec(&value).map_err(|e| vec![e.to_string()])?;
    SaveAudioJob::parse(&body, policy).map_err(|e| vec![format!("refused by the worker's checks: {e}")])?;
    Ok(body)
}

/// Fields an edit may not change: the asset and its tenant (an edit fixes a job, it never
/// files it under another tenant or asset) and its place in a batch.
pub const IDENTITY_FIELDS: [&str; 5] = ["asset_id", "customer_id", "user_id", "batch_id", "batch_index"];

/// The [`IDENTITY_FIELDS`] a job has, as a JSON object: what the edit form carries back (as
/// `identity`) so that a changed identity is refused on the form, before anything runs. The
/// dead letter itself is checked again when the edit is carried out.
pub fn identity_of(job: &serde_json::Value) -> String {
    let fields: serde_json::Map<String, serde_json::Value> =
        IDENTITY_FIELDS.iter().filter_map(|f| job.get(*f).map(|v| ((*f).to_owned(), v.clone()))).collect();
    serde_json::Value::Object(fields).to_string()
}

/// Whether `edited` keeps the identity of the `original` job ([`IDENTITY_FIELDS`]; a UUID in
/// any spelling is the same asset).
///
/// # Errors
/// The first field changed, in words.
pub fn keeps_identity(original: &serde_json::Value, edited: &serde_json::Value) -> Result<(), String> {
    for field in IDENTITY_FIELDS {
        let (before, after) = (original.get(field), edited.get(field));
        let same = match (before.and_then(|v| v.as_str()), after.and_then(|v| v.as_str())) {
            (Some(a), Some(b)) if field == "asset_id" => normalize_asset_id(a) == normalize_asset_id(b),
            _ => before == after,
        };
        if !same {
            let show = |v: Option<&serde_json::Value>| v.map_or_else(|| "absent".into(), ToString::to_string);
            return Err(format!(
                "{field} may not change in an edit (was {}, now {})",
                show(before),
                show(after)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::url_policy::UrlPolicy;

    fn policy() -> UrlPolicy {
        let env = |name: &str| match name {
            "S3_ACCESS_KEY_ID" => Some("k".to_owned()),
            "S3_SECRET_ACCESS_KEY" => Some("s".to_owned()),
            _ => None,
        };
        crate::config::Settings::from_lookup(env).unwrap().audio_gen.url_policy
    }

    fn job(audio_url: &str) -> serde_json::Value {
        serde_json::json!({
            "asset_id": "a1000000-0000-4000-8000-00000000000a", "customer_id": "acme", "user_id": "u1",
            "audio_url": audio_url, "text": "hi", "duration": 1.0, "voice": "v", "voice_name": "V",
            "language": "en", "speed": 1.0, "model": "m"
        })
    }

    #[test]
    fn an_edit_must_pass_the_schema_and_the_url_policy() {
        let ok = validate_edit(&job("/temp/fixed.wav").to_string(), &policy());
        assert!(ok.is_ok(), "{ok:?}");
        let mut bad = job("/temp/x.wav");
        bad["asset_id"] = "not-a-uuid".into();
        bad["speed"] = 0.into();
        let errors = validate_edit(&bad.to_string(), &policy()).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("/asset_id")), "{errors:?}");
        let ssrf = validate_edit(&job("http://169.254.169.254/latest/meta-data").to_string(), &policy());
        assert!(ssrf.unwrap_err()[0].contains("refused by the worker's checks"));
        assert!(validate_edit("[1]", &policy()).is_err());
        assert!(validate_edit("{", &policy()).unwrap_err()[0].starts_with("not JSON"));
    }

    #[test]
    fn an_edit_keeps_the_asset_and_its_tenant() {
        let original = job("/temp/x.wav");
        let dead = &original;
        assert!(keeps_identity(dead, &job("/temp/fixed.wav")).is_ok());
        let mut upper = job("/temp/fixed.wav");
        upper["asset_id"] = "A1000000-0000-4000-8000-00000000000A".into();
        assert!(keeps_identity(dead, &upper).is_ok());
        let mut moved = job("/temp/x.wav");
        moved["customer_id"] = "other".into();
        assert!(keeps_identity(dead, &moved).unwrap_err().starts_with("customer_id may not change"));
        let mut batched = job("/temp/x.wav");
        batched["batch_index"] = 3.into();
        assert!(keeps_identity(dead, &batched).is_err());
        let identity: serde_json::Value = serde_json::from_str(&identity_of(dead)).unwrap();
        assert_eq!(
            identity,
            serde_json::json!({"asset_id": dead["asset_id"], "customer_id": "acme", "user_id": "u1"})
        );
    }
}
