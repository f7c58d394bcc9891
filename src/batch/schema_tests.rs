//! The batch JSON Schemas in `schemas/` against the code: the batch parser requires what
//! `save-audio-batch.v1.json` requires (of the batch and of its items), and a completion
//! serializes exactly the fields `audio-batch-completed.v1.json` lists.

use chrono::Utc;
use serde_json::{Value, json};
use uuid::Uuid;

use super::manifest::{Completion, ManifestFile, ManifestFiles};
use super::{Batch, COMPLETED_ROUTING_KEY, ItemPlan, ItemProgress, ItemState};
use crate::error::Stage;
use crate::job::BatchItem;
use crate::pipeline::catalog::{BatchView, Counts, ReplyTo};
use crate::url_policy::UrlPolicy;

const BATCH_SCHEMA: &str = include_str!("../../schemas/save-audio-batch.v1.json");
const JOB_SCHEMA: &str = include_str!("../../schemas/save-audio-job.v1.json");
const COMPLETED_SCHEMA: &str = include_str!("../../schemas/audio-batch-completed.v1.json");

fn schema(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

fn keys(value: &Value) -> Vec<String> {
    let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

/// The keys the schema lists (its `properties`), after checking that every required one is
/// among them.
fn schema_keys(schema: &Value) -> Vec<String> {
    let keys = keys(&schema["properties"]);
    for required in required_keys(schema) {
        assert!(keys.contains(&required), "{required} is not a property");
    }
    keys
}

/// The keys the schema requires.
fn required_keys(schema: &Value) -> Vec<String> {
    let mut keys: Vec<String> =
        schema["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    keys.sort();
    keys
}

/// Formats (uuid, uri, date-time) checked, as in the contract tests.
fn assert_valid(schema: &Value, instance: &Value, what: &str) {
    let validator = jsonschema::options().should_validate_formats(true).build(schema).unwrap();
    let errors: Vec<String> = validator.iter_errors(instance).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{what} does not validate: {errors:?}\n{instance:#}");
}

fn parse(body: &Value) -> Result<Batch, super::BatchError> {
    let policy = UrlPolicy::for_base(url::Url::parse("http://h").unwrap());
    Batch::parse(&serde_json::to_vec(body).unwrap(), &policy, 10)
}

/// A batch with every field the schema lists; its one item has every item field (its tenant
/// the batch's).
fn full_batch() -> Value {
    json!({
        "batch_id": "0d9f7a34-5b1c-4f3e-9a2d-6c8b1e4f7a20",
        "customer_id": "cust_42",
        "user_id": "user-7",
        "folder": "book",
        "tags": ["chapter"],
        "items": [crate::job::tests::job_json()],
    })
}

/// The JSON Schema in the repo and the parser agree on what a batch, and each of its items,
/// must have.
#[test]
fn the_batch_schema_lists_exactly_the_fields_the_parser_requires() {
    let schema = schema(BATCH_SCHEMA);
    let full = full_batch();
    let batch = parse(&full).expect("every field the schema lists is accepted");
    assert!(matches!(batch.items[0], ItemPlan::Job { .. }), "{:?}", batch.items[0]);
    assert_valid(&schema, &full, "the full batch");
    let required = required_keys(&schema);
    for field in schema_keys(&schema) {
        let mut body = full.clone();
        body.as_object_mut().unwrap().remove(&field);
        assert_eq!(parse(&body).is_err(), required.contains(&field), "{field}");
        assert_eq!(jsonschema::is_valid(&schema, &body), !required.contains(&field), "{field}");
    }
    let mut empty = full.clone();
    empty["items"] = json!([]);
    assert!(parse(&empty).is_err() && !jsonschema::is_valid(&schema, &empty), "no items");

    // An item's own fields never refuse the batch: a required one missing refuses the item, the
    // others are inherited or optional.
    let item_schema = &schema["properties"]["items"]["items"];
    let item_required = required_keys(item_schema);
    for field in schema_keys(item_schema) {
        let mut body = full.clone();
        body["items"][0].as_object_mut().unwrap().remove(&field);
        let batch = parse(&body).unwrap_or_else(|e| panic!("items[].{field}: {e}"));
        let refused = matches!(batch.items[0], ItemPlan::Refused { .. });
        assert_eq!(refused, item_required.contains(&field), "items[].{field}: {:?}", batch.items[0]);
    }

    // The items' fields are the job's, less the two the worker sets, and only the tenant is
    // no longer required.
    let job = self::schema(JOB_SCHEMA);
    let worker_set = ["batch_id", "batch_index"];
    let tenant = ["customer_id", "user_id"];
    let job_fields: Vec<String> =
        schema_keys(&job).into_iter().filter(|f| !worker_set.contains(&f.as_str())).collect();
    assert_eq!(schema_keys(item_schema), job_fields);
    let job_required: Vec<String> =
        required_keys(&job).into_iter().filter(|f| !tenant.contains(&f.as_str())).collect();
    assert_eq!(item_required, job_required);
    let without = |mut property: Value, names: &[&str]| {
        for name in names {
            property.as_object_mut().unwrap().remove(*name);
        }
        property
    };
    for field in &job_fields {
        let (item, job) = (&item_schema["properties"][field], &job["properties"][field]);
        if tenant.contains(&field.as_str()) {
            assert_eq!(item["pattern"], job["pattern"], "items[].{field}");
        } else {
            assert_eq!(
                without(item.clone(), &["description"]),
                without(job.clone(), &["description"]),
                "{field}"
            );
        }
    }
}

/// A completion of two items, one saved and one failed, so every optional item field is there.
fn completion() -> Completion {
    let batch_id = Uuid::new_v4();
    let item = |index| BatchItem { batch_id, index };
    let saved = ItemProgress {
        state: ItemState::Saved,
        version: Some(2),
        key: Some("cust_42/user-7/audio/6f1c2a4e-8d3b-4b7a-9a51-2f0e5c7d9b10.wav".into()),
        url: Some("http://s/a.wav?sig=1".into()),
        url_expires_at: Some(Utc::now()),
        content_type: Some("audio/wav".into()),
        size: Some(44),
        duration: Some(1.5),
        title: Some("Hello".into()),
        stage: None,
        reason: None,
        ..ItemProgress::failed(item(0), Some("6f1c2a4e-8d3b-4b7a-9a51-2f0e5c7d9b10".into()), "", "")
    };
    let failed = ItemProgress::failed(item(1), Some("not-a-uuid".into()), "parse", "invalid field asset_id");
    let view = BatchView {
        customer_id: "cust_42".into(),
        user_id: "user-7".into(),
        reply_to: ReplyTo::default(),
        items: vec![saved, failed],
        counts: Counts { expected: 2, terminal: 2, saved: 1, failed: 1, rev: 2, ..Counts::default() },
        created_at: Utc::now(),
    };
    Completion::new(batch_id, view)
}

/// The schema file in the repo describes exactly what `audio.batch.completed` carries.
#[test]
fn the_completion_event_matches_its_schema() {
    let schema = schema(COMPLETED_SCHEMA);
    let completion = completion();
    let file = |ext: &str| ManifestFile {
        key: completion.key(ext),
        url: format!("http://s/{}?sig=1", completion.key(ext)),
        url_expires_at: Some(Utc::now()),
    };
    let event = completion.event(ManifestFiles { json: file("json"), m3u: file("m3u") });
    let event = serde_json::to_value(&event).unwrap();
    assert_eq!(keys(&event), schema_keys(&schema));
    assert_eq!(keys(&event), required_keys(&schema), "every field of the event is always there");
    assert_eq!(schema["properties"]["event_type"]["const"], COMPLETED_ROUTING_KEY);
    assert_valid(&schema, &event, "the completion");

    let item_schema = &schema["properties"]["items"]["items"];
    let items = event["items"].as_array().unwrap();
    let mut union: Vec<String> = items.iter().flat_map(keys).collect();
    union.sort();
    union.dedup();
    assert_eq!(union, schema_keys(item_schema), "a saved and a failed item show every item field");
    for item in items {
        let keys = keys(item);
        assert!(required_keys(item_schema).iter().all(|k| keys.contains(k)), "{item}");
    }
    assert_eq!((items[0]["status"].as_str(), items[1]["status"].as_str()), (Some("saved"), Some("failed")));
    assert!(items[0].get("reason").is_none() && items[1].get("url").is_none(), "{items:?}");
    let stages: Vec<&str> = Stage::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(item_schema["properties"]["stage"]["enum"], json!(stages));

    let manifest = &schema["properties"]["manifest"];
    assert_eq!(keys(&event["manifest"]), schema_keys(manifest));
    for file in ["json", "m3u"] {
        assert_eq!(keys(&event["manifest"][file]), schema_keys(&manifest["properties"][file]), "{file}");
    }

    // Every status the counts can give is in the enum; this one is partial.
    assert_eq!(event["status"], "partial");
    let statuses = schema["properties"]["status"]["enum"].as_array().unwrap();
    for (saved, failed) in [(2, 0), (1, 1), (0, 2)] {
        let status = Counts { saved, failed, ..Counts::default() }.status();
        assert!(statuses.iter().any(|s| s == status), "{status}");
    }
    // The JSON manifest file lists the same items.
    let document: Value = serde_json::from_slice(&completion.json).unwrap();
    assert_eq!(document["items"], event["items"]);
}
