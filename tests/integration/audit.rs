//! `audio-worker audit`, the real binary, against a library the worker saved and the test then
//! damaged: an orphan, a missing object, a changed object (same size, same metadata), a missing
//! waveform, a save in flight, another customer's orphan, MongoDB out of reach.

use std::collections::{BTreeSet, HashMap};
use std::process::Output;

use mongodb::bson::doc;

use crate::helpers::{TestApp, WAIT, job, spawn_app, wav_tone};

/// Runs `audio-worker audit args…` with the test's worker environment plus `extra`.
fn audit(app: &TestApp, args: &[&str], extra: &[(&str, &str)]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_audio-worker"))
        .arg("audit")
        .args(args)
        .env_clear()
        .envs(&app.env)
        .envs(extra.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run audio-worker audit")
}

/// The exit code, checked, and the standard output.
fn expect_exit(output: &Output, code: i32) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(code), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

/// `--json`'s summary and its problems as `(kind, key, asset_id)`.
fn parse(stdout: &str) -> (serde_json::Value, BTreeSet<(String, String, String)>) {
    let report: serde_json::Value =
        serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: not JSON: {stdout}"));
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let problems = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (text(&p["kind"]), text(&p["key"]), text(&p["asset_id"])));
    (report["summary"].clone(), problems.collect())
}

/// The summary's counts named, for an `assert_eq!` that prints them all.
fn counts(summary: &serde_json::Value, names: &[&str]) -> Vec<(String, u64)> {
    names.iter().map(|n| ((*n).to_owned(), summary[*n].as_u64().unwrap_or(u64::MAX))).collect()
}

fn expected(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    pairs.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect()
}

fn asset(job: &serde_json::Value) -> String {
    job["asset_id"].as_str().unwrap().to_owned()
}

/// The audio's key and the waveform's of a saved WAV take.
fn keys(job: &serde_json::Value) -> (String, String) {
    let base = format!("cust_42/user-7/audio/{}", asset(job));
    (format!("{base}.wav"), format!("{base}.peaks.json"))
}

/// Saves `n` WAV takes through the worker (each with its waveform, `WAVEFORM=on` by default).
async fn save(app: &mut TestApp, n: usize) -> Vec<serde_json::Value> {
    let mut jobs = Vec::new();
    for i in 0..n {
        let name = format!("take{i}.wav");
        app.add_audio(&name, &wav_tone(0.2 + 0.1 * i as f64));
        let j = job(&format!("/temp/{name}"));
        app.publish(&j).await;
        jobs.push(j);
    }
    let outcomes = app.outcomes(n, WAIT * 2).await;
    for j in &jobs {
        assert_eq!(outcomes[&asset(j)][0].routing_key, "audio.saved", "{}", outcomes[&asset(j)][0].json);
    }
    jobs
}

async fn sorted_keys(app: &TestApp) -> Vec<String> {
    let mut keys = app.list_all_keys().await;
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_finds_the_planted_orphan_missing_and_changed_objects_and_fixes_only_the_orphan() {
    let mut app = spawn_app().await;
    let jobs = save(&mut app, 3).await;

    let clean = expect_exit(&audit(&app, &[], &[]), 0);
    assert_eq!(clean.lines().last(), Some("checked 6, ok 6, missing 0, mismatched 0, orphans 0"), "{clean}");

    let orphan_id = uuid::Uuid::new_v4().to_string();
    let orphan = format!("cust_42/user-7/audio/{orphan_id}.wav");
    app.put_object(&orphan, &wav_tone(0.1), HashMap::new()).await;
    // A backup is not an asset's object: listed, skipped, never an orphan.
    let backup = format!(".backup/{}.lease-token", keys(&jobs[2]).0);
    app.put_object(&backup, b"previous bytes", HashMap::new()).await;
    let missing = keys(&jobs[0]).0;
    app.delete_object(&missing).await;
    // Other bytes of the same size under the same metadata (its `sha256` included): only
    // reading the bytes tells.
    let changed = keys(&jobs[1]).0;
    let (mut bytes, output) = app.get_object(&changed).await.unwrap();
    *bytes.last_mut().unwrap() ^= 0xff;
    app.put_object(&changed, &bytes, output.metadata().cloned().unwrap_or_default()).await;
    let before = sorted_keys(&app).await;

    let found = expect_exit(&audit(&app, &["--json", "--min-age", "0s"], &[]), 1);
    let (summary, problems) = parse(&found);
    assert_eq!(
        counts(&summary, &["checked", "ok", "missing", "mismatched", "orphans", "in_flight", "deleted"]),
        expected(&[
            ("checked", 7),
            ("ok", 4),
            ("missing", 1),
            ("mismatched", 1),
            ("orphans", 1),
            ("in_flight", 0),
            ("deleted", 0)
        ]),
        "{found}"
    );
    assert_eq!(
        counts(&summary, &["documents", "listed", "skipped"]),
        expected(&[("documents", 3), ("listed", 7), ("skipped", 1)])
    );
    let want: BTreeSet<_> = [
        ("missing".to_owned(), missing.clone(), asset(&jobs[0])),
        ("mismatched".to_owned(), changed.clone(), asset(&jobs[1])),
        ("orphan".to_owned(), orphan.clone(), orphan_id.clone()),
    ]
    .into();
    assert_eq!(problems, want, "{found}");
    assert!(found.contains("its bytes' SHA-256 is"), "{found}");

    // The human report: one line per problem, the summary last.
    let human = expect_exit(&audit(&app, &["--min-age", "0s"], &[]), 1);
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(lines.last(), Some(&"checked 7, ok 4, missing 1, mismatched 1, orphans 1"), "{human}");
    for (kind, key, asset_id) in &want {
        assert!(
            lines.iter().any(|l| l.starts_with(kind.as_str())
                && l.contains(key.as_str())
                && l.contains(asset_id.as_str())),
            "no line for {kind} {key}: {human}"
        );
    }

    // --quick trusts the metadata, so the changed object passes: why it is not the default.
    let quick = expect_exit(&audit(&app, &["--json", "--quick"], &[]), 1);
    let (summary, _) = parse(&quick);
    assert_eq!(
        counts(&summary, &["missing", "mismatched", "orphans"]),
        expected(&[("missing", 1), ("mismatched", 0), ("orphans", 1)])
    );

    // --fix-orphans without --yes: refused, nothing deleted.
    let refused = audit(&app, &["--fix-orphans", "--min-age", "0s"], &[]);
    expect_exit(&refused, 2);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("add --yes"), "{refused:?}");
    assert_eq!(sorted_keys(&app).await, before);

    // With --yes under the default 10 minute grace: the orphan is too new to delete.
    let young = expect_exit(&audit(&app, &["--fix-orphans", "--yes"], &[]), 1);
    assert!(young.contains("not deleted: written less than --min-age 10m ago"), "{young}");
    assert!(young.contains("deleted 0 of 1 orphans"), "{young}");
    assert_eq!(sorted_keys(&app).await, before);

    // With no grace: the orphan alone goes; the missing and changed keys are still problems.
    let fixed = expect_exit(&audit(&app, &["--fix-orphans", "--yes", "--min-age", "0s", "--json"], &[]), 1);
    let (summary, _) = parse(&fixed);
    assert_eq!(
        counts(&summary, &["orphans", "deleted", "missing", "mismatched"]),
        expected(&[("orphans", 1), ("deleted", 1), ("missing", 1), ("mismatched", 1)])
    );
    let report: serde_json::Value = serde_json::from_str(&fixed).unwrap();
    let deleted: Vec<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["deleted"] == true)
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    assert_eq!(deleted, [orphan.as_str()]);
    let after = sorted_keys(&app).await;
    let mut expected_after = before.clone();
    expected_after.retain(|k| *k != orphan);
    assert_eq!(after, expected_after);
    assert!(after.contains(&changed) && after.contains(&backup) && !after.contains(&missing));

    let again = expect_exit(&audit(&app, &["--min-age", "0s"], &[]), 1);
    assert_eq!(again.lines().last(), Some("checked 6, ok 4, missing 1, mismatched 1, orphans 0"), "{again}");
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_a_gone_waveform_tells_saves_in_flight_from_orphans_and_keeps_to_the_customer() {
    let mut app = spawn_app().await;
    let jobs = save(&mut app, 2).await;
    let waveform = keys(&jobs[0]).1;
    app.delete_object(&waveform).await;
    // A save in flight for the second asset: its lease taken, its new object (another format)
    // written, nothing committed yet.
    let in_flight = format!("cust_42/user-7/audio/{}.mp3", asset(&jobs[1]));
    let until = mongodb::bson::DateTime::from_millis(chrono::Utc::now().timestamp_millis() + 3_600_000);
    app.collection()
        .update_one(
            doc! { "asset_id": asset(&jobs[1]) },
            doc! { "$set": { "lease": { "token": "t-1", "until": until, "target_key": &in_flight } } },
        )
        .await
        .unwrap();
    app.put_object(&in_flight, b"ID3 half a take", HashMap::new()).await;
    // Another customer's orphan, outside `--customer-id cust_42`.
    let elsewhere = format!("cust_43/user-1/audio/{}.wav", uuid::Uuid::new_v4());
    app.put_object(&elsewhere, b"RIFF", HashMap::new()).await;

    let mine = expect_exit(&audit(&app, &["--json", "--min-age", "0s", "--customer-id", "cust_42"], &[]), 1);
    let (summary, problems) = parse(&mine);
    assert_eq!(
        counts(&summary, &["checked", "ok", "missing", "mismatched", "orphans", "in_flight"]),
        expected(&[
            ("checked", 5),
            ("ok", 3),
            ("missing", 1),
            ("mismatched", 0),
            ("orphans", 0),
            ("in_flight", 1)
        ]),
        "{mine}"
    );
    let want: BTreeSet<_> = [
        ("missing".to_owned(), waveform.clone(), asset(&jobs[0])),
        ("in_flight".to_owned(), in_flight.clone(), asset(&jobs[1])),
    ]
    .into();
    assert_eq!(problems, want, "{mine}");

    // Fixing deletes neither the save in flight's object nor, out of scope, the other
    // customer's orphan.
    let before = sorted_keys(&app).await;
    expect_exit(
        &audit(&app, &["--fix-orphans", "--yes", "--min-age", "0s", "--customer-id", "cust_42"], &[]),
        1,
    );
    assert_eq!(sorted_keys(&app).await, before);

    // The whole bucket: the other customer's orphan is there.
    let all = expect_exit(&audit(&app, &["--min-age", "0s"], &[]), 1);
    assert!(all.lines().any(|l| l.starts_with("orphan") && l.contains(&elsewhere)), "{all}");
    assert!(all.contains("in flight 1 (saves not committed yet"), "{all}");
    assert_eq!(all.lines().last(), Some("checked 6, ok 3, missing 1, mismatched 0, orphans 1"), "{all}");

    // MongoDB out of reach: no report, exit 2.
    let unreachable = audit(
        &app,
        &[],
        &[("MONGODB_URI", "mongodb://127.0.0.1:1"), ("MONGODB_SERVER_SELECTION_TIMEOUT_SECS", "1")],
    );
    expect_exit(&unreachable, 2);
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("MongoDB"), "{unreachable:?}");
    app.teardown().await;
}
