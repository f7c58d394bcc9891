//! The operator console over HTTP, against real RabbitMQ, S3 and MongoDB: login and CSRF,
//! escaping, replay by filter, edit then replay, purge, read-only mode, and the overview's
//! figures. Each test runs a console in process on its own test topology (`helpers::spawn_app`).

use std::time::Duration;

use audio_worker::console::{Console, ConsoleSettings};
use reqwest::StatusCode;
use reqwest::redirect::Policy;
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, WAIT, job, spawn_app, spawn_app_without_worker, wav_tone};

pub const TOKEN: &str = "test-console-token-0123456789";

/// A console serving the test app's topology on a port of its own.
pub struct ConsoleUnderTest {
    pub base: String,
    /// Follows no redirect, so a test sees each 303 and its `Location`.
    pub http: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for ConsoleUnderTest {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn start_console(app: &TestApp, read_only: bool) -> ConsoleUnderTest {
    start_console_with(app, read_only, None).await
}

pub async fn start_console_with(
    app: &TestApp,
    read_only: bool,
    management_url: Option<url::Url>,
) -> ConsoleUnderTest {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let settings = ConsoleSettings { addr, token: TOKEN.into(), read_only, management_url };
    let console = Console::build(app.settings.clone(), settings).await.expect("console");
    let shutdown = CancellationToken::new();
    tokio::spawn(audio_worker::console::serve(listener, console, shutdown.clone()));
    let http = reqwest::Client::builder().redirect(Policy::none()).build().unwrap();
    ConsoleUnderTest { base: format!("http://{addr}"), http, shutdown }
}

/// A logged-in session: its cookie and CSRF token.
pub struct Session {
    pub cookie: String,
    pub csrf: String,
}

impl ConsoleUnderTest {
    pub async fn login(&self) -> Session {
        let response = self
            .http
            .post(format!("{}/login", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(encode(&[("token", TOKEN), ("operator", "ada")]))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        let set_cookie = response.headers()["set-cookie"].to_str().unwrap().to_owned();
        let cookie = set_cookie.split(';').next().unwrap().to_owned();
        let overview = self.get_page(&cookie, "/").await;
        let csrf =
            between(&overview, "name=\"csrf\" value=\"", "\"").expect("a CSRF field on the page").to_owned();
        Session { cookie, csrf }
    }

    pub async fn get(&self, cookie: Option<&str>, path: &str) -> reqwest::Response {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        request.send().await.unwrap()
    }

    /// A page's HTML, which must be 200.
    pub async fn get_page(&self, cookie: &str, path: &str) -> String {
        let response = self.get(Some(cookie), path).await;
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    pub async fn post(&self, cookie: Option<&str>, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(encode(form));
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        request.send().await.unwrap()
    }

    /// Waits until the action a POST redirected to has ended; its page.
    pub async fn finished_action(&self, session: &Session, response: reqwest::Response) -> String {
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{}", response.text().await.unwrap());
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        assert!(location.starts_with("/actions/"), "{location}");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let page = self.get_page(&session.cookie, &location).await;
            if !page.contains("data-state=\"waiting\"") && !page.contains("data-state=\"running\"") {
                return page;
            }
            assert!(tokio::time::Instant::now() < deadline, "action {location} did not end: {page}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A form as a browser posts it (`application/x-www-form-urlencoded`).
fn encode(form: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish()
}

/// HTML text back to characters (the entities askama writes, named or numbered).
fn unescape(html: &str) -> String {
    [
        ("&#60;", "<"),
        ("&lt;", "<"),
        ("&#62;", ">"),
        ("&gt;", ">"),
        ("&#39;", "'"),
        ("&#x27;", "'"),
        ("&#34;", "\""),
        ("&quot;", "\""),
    ]
    .into_iter()
    .chain([("&#38;", "&"), ("&amp;", "&")])
    .fold(html.to_owned(), |text, (entity, c)| text.replace(entity, c))
}

/// The text between `start` and the next `end`.
pub fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let to = text[from..].find(end)? + from;
    Some(&text[from..to])
}

/// The `data-key`s of the rows of a dead-letter table page.
fn row_keys(page: &str) -> Vec<String> {
    page.split("<tr data-key=\"").skip(1).map(|s| s[..s.find('"').unwrap()].to_owned()).collect()
}

/// Waits until `queue` holds at least `n` messages (the test's publishes are not confirmed).
async fn wait_for_depth(app: &TestApp, queue: &str, n: u32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.queue_depth(queue).await < n {
        assert!(tokio::time::Instant::now() < deadline, "{queue} never held {n} messages");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `data-key` of the table row that shows `asset_id`.
fn row_key_for(page: &str, asset_id: &str) -> String {
    page.split("<tr data-key=\"")
        .skip(1)
        .find(|row| row[..row.find("</tr>").unwrap()].contains(asset_id))
        .map(|row| row[..row.find('"').unwrap()].to_owned())
        .unwrap_or_else(|| panic!("no row shows {asset_id}:\n{page}"))
}

/// Publishes `jobs` to a running worker and waits for an `audio.failed` for each; the events.
pub async fn dead_letter(app: &mut TestApp, jobs: &[serde_json::Value]) -> Vec<serde_json::Value> {
    for job in jobs {
        app.publish(job).await;
    }
    let mut failed = Vec::new();
    while failed.len() < jobs.len() {
        let event = app.next_event().await;
        assert_eq!(event.routing_key, "audio.failed", "{}", event.json);
        failed.push(event.json);
    }
    // The dead letter is confirmed before the event is published, so all are in the queue.
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_need_a_login_and_every_action_its_csrf_token() {
    let app = spawn_app_without_worker(&[]).await;
    let console = start_console(&app, false).await;

    assert_eq!(console.get(None, "/healthz").await.status(), StatusCode::OK);
    for path in ["/", "/dead-letters", "/dead-letters/0123456789abcdef", "/actions", "/actions/1"] {
        let response = console.get(None, path).await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "GET {path} without a session");
        assert_eq!(response.headers()["location"], "/login");
    }
    for path in [
        "/dead-letters/replay",
        "/dead-letters/purge",
        "/dead-letters/k/replay",
        "/dead-letters/k/edit",
        "/logout",
    ] {
        let response = console.post(None, path, &[("step", "run"), ("expected", "1")]).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "POST {path} without a session");
    }
    let session = console.login().await;
    for page in ["18446744073709551615", "369367187582268012", "0"] {
        let response = console.get(Some(&session.cookie), &format!("/dead-letters?page={page}")).await;
        assert_eq!(response.status(), StatusCode::OK, "page={page}");
    }
    let forged = console.get(Some("audio_console_session=00112233445566778899aabbccddeeff"), "/").await;
    assert_eq!(forged.status(), StatusCode::SEE_OTHER, "a made-up session id is no session");

    let wrong = console.post(None, "/login", &[("token", "not-the-token-at-all")]).await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.headers().get("set-cookie").is_none());
    assert!(wrong.text().await.unwrap().contains("That token is not right."));

    let right = console.post(None, "/login", &[("token", TOKEN), ("operator", "ada")]).await;
    assert_eq!(right.status(), StatusCode::SEE_OTHER);
    let set_cookie = right.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{attribute} missing from {set_cookie}");
    }
    let session = console.login().await;
    let overview = console.get_page(&session.cookie, "/").await;
    assert!(overview.contains(&app.settings.amqp.dead_letter_queue), "the overview lists the DLQ");
    assert!(overview.contains(&app.settings.amqp.job_queue));

    // Every state-changing request needs the session's CSRF token, not just the cookie.
    let cookie = Some(session.cookie.as_str());
    for csrf in ["", "0000000000000000000000000000000000000000000000000000000000000000"] {
        for path in ["/dead-letters/replay", "/dead-letters/purge", "/dead-letters/k/replay", "/logout"] {
            let response = console.post(cookie, path, &[("csrf", csrf), ("step", "preview")]).await;
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "POST {path} with csrf {csrf:?}");
        }
        let edit = console.post(cookie, "/dead-letters/k/edit", &[("csrf", csrf), ("job", "{}")]).await;
        assert_eq!(edit.status(), StatusCode::FORBIDDEN);
    }
    // The page is framed by nobody and runs no script from anywhere.
    let headers = console.get(cookie, "/").await.headers().clone();
    assert!(headers["content-security-policy"].to_str().unwrap().contains("default-src 'none'"));
    assert_eq!(headers["x-frame-options"], "DENY");

    // Logging out ends the session on the server, not only in the browser.
    let out = console.post(cookie, "/logout", &[("csrf", &session.csrf)]).await;
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert_eq!(console.get(cookie, "/").await.status(), StatusCode::SEE_OTHER);
    drop(console);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_fields_with_markup_show_as_text() {
    let mut app = spawn_app().await;
    let mut hostile = job("/temp/missing.wav");
    hostile["text"] = "<script>alert('text')</script>".into();
    hostile["voice_name"] = "\"><img src=x onerror=alert(1)>".into();
    // Not a valid job at all: its sniffed asset_id and tenant go into the table as they are.
    let unparsable = serde_json::json!({
        "asset_id": "<script>alert('id')</script>",
        "customer_id": "<b>acme</b>",
        "user_id": "u1\u{202e}fdp.exe"
    });
    dead_letter(&mut app, &[hostile.clone(), unparsable]).await;
    let console = start_console(&app, false).await;
    let session = console.login().await;

    let table = console.get_page(&session.cookie, "/dead-letters").await;
    assert_eq!(row_keys(&table).len(), 2, "{table}");
    assert!(!table.contains('\u{202e}'), "a right-to-left override reached the page");
    assert!(table.contains("u1\\u{202e}fdp.exe"), "it shows escaped:\n{table}");
    for text in ["<script>alert('id')</script>", "<b>acme</b>/u1"] {
        assert!(!table.contains(text), "{text:?} reached the table unescaped:\n{table}");
        assert!(unescape(&table).contains(text), "{text:?} is shown as text:\n{table}");
    }
    for key in row_keys(&table) {
        let page = console.get_page(&session.cookie, &format!("/dead-letters/{key}")).await;
        for raw in ["<script>alert(", "<img src=x", "<b>acme"] {
            assert!(!page.contains(raw), "{raw:?} reached the page unescaped:\n{page}");
        }
        assert!(!page.to_lowercase().contains("<script"), "no script element at all");
    }
    let hostile_key = row_key_for(&table, hostile["asset_id"].as_str().unwrap());
    let page = console.get_page(&session.cookie, &format!("/dead-letters/{hostile_key}")).await;
    for text in ["<script>alert('text')</script>", "\"><img src=x onerror=alert(1)>"] {
        assert!(unescape(&page).contains(text), "{text:?} is shown as text:\n{page}");
    }
    drop(console);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_by_filter_moves_exactly_the_matching_dead_letters_once() {
    let mut app = spawn_app().await;
    let mut for_c1 = Vec::new();
    let mut jobs = Vec::new();
    for i in 0..3 {
        let mut j = job(&format!("/temp/c1-{i}.wav"));
        j["customer_id"] = "c1".into();
        for_c1.push(j["asset_id"].as_str().unwrap().to_owned());
        jobs.push(j);
    }
    for i in 0..2 {
        let mut j = job(&format!("/temp/c2-{i}.wav"));
        j["customer_id"] = "c2".into();
        jobs.push(j);
    }
    let mut unparsable = job("/temp/c1-x.wav");
    unparsable["customer_id"] = "c1".into();
    unparsable["duration"] = "long".into();
    jobs.push(unparsable);
    dead_letter(&mut app, &jobs).await;
    let console = start_console(&app, false).await;
    let session = console.login().await;
    let cookie = Some(session.cookie.as_str());

    let all = console.get_page(&session.cookie, "/dead-letters").await;
    assert_eq!(row_keys(&all).len(), 6);
    let selected = console.get_page(&session.cookie, "/dead-letters?stage=download&customer_id=c1").await;
    let selected_keys = row_keys(&selected);
    assert_eq!(selected_keys.len(), 3, "{selected}");
    assert!(selected.contains("<strong id=\"matched\">3</strong> of 6"), "{selected}");

    // The files appear; the dry run counts and moves nothing.
    for i in 0..3 {
        app.add_audio(&format!("c1-{i}.wav"), &wav_tone(0.2 + f64::from(i) / 10.0));
    }
    let filter = [("stage", "download"), ("customer_id", "c1")];
    let mut preview_form = vec![("csrf", session.csrf.as_str()), ("step", "preview")];
    preview_form.extend(filter);
    let preview = console.post(cookie, "/dead-letters/replay", &preview_form).await;
    assert_eq!(preview.status(), StatusCode::OK);
    let preview = preview.text().await.unwrap();
    assert!(preview.contains("<strong>3</strong> dead letter(s) would be replayed"), "{preview}");
    assert_eq!(app.queue_depth(&app.settings.amqp.dead_letter_queue).await, 6, "a dry run moves nothing");

    let mut run_form =
        vec![("csrf", session.csrf.as_str()), ("step", "run"), ("expected", "3"), ("rate", "20/s")];
    run_form.extend(filter);
    let action = console
        .finished_action(&session, console.post(cookie, "/dead-letters/replay", &run_form).await)
        .await;
    assert!(action.contains("data-state=\"done\""), "{action}");
    assert!(action.contains("<dd id=\"moved\">3</dd>"), "{action}");

    // Each replayed job is saved exactly once; nothing else moves.
    let saved = app.outcomes(3, WAIT).await;
    let mut saved_ids: Vec<&String> = saved.keys().collect();
    saved_ids.sort();
    let mut expected: Vec<&String> = for_c1.iter().collect();
    expected.sort();
    assert_eq!(saved_ids, expected);
    for events in saved.values() {
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].routing_key, "audio.saved");
    }
    assert!(app.more_events(Duration::from_secs(2)).await.is_empty(), "no second delivery of any of them");
    let left = console.get_page(&session.cookie, "/dead-letters").await;
    let mut left_keys = row_keys(&left);
    left_keys.sort();
    let mut expected_left: Vec<String> =
        row_keys(&all).into_iter().filter(|k| !selected_keys.contains(k)).collect();
    expected_left.sort();
    assert_eq!(left_keys, expected_left, "the other dead letters are the same ones, untouched");

    // Purge needs the typed count; then it deletes exactly the selected ones.
    let c2 = [("customer_id", "c2")];
    let mut purge =
        vec![("csrf", session.csrf.as_str()), ("step", "run"), ("expected", "2"), ("confirm", "yes")];
    purge.extend(c2);
    let refused = console.post(cookie, "/dead-letters/purge", &purge).await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.queue_depth(&app.settings.amqp.dead_letter_queue).await, 3);
    let mut purge =
        vec![("csrf", session.csrf.as_str()), ("step", "run"), ("expected", "2"), ("confirm", "purge 2")];
    purge.extend(c2);
    let done =
        console.finished_action(&session, console.post(cookie, "/dead-letters/purge", &purge).await).await;
    assert!(done.contains("<dd id=\"moved\">2</dd>"), "{done}");
    let remaining = app.drain_dlq().await;
    assert_eq!(remaining.len(), 1);
    let body: serde_json::Value = serde_json::from_slice(&remaining[0].delivery.data).unwrap();
    assert_eq!(body["duration"], "long", "only the job that does not parse is left");
    drop(console);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_then_replay_saves_a_job_whose_audio_url_was_wrong() {
    let mut app = spawn_app().await;
    let wrong = job("/temp/wrong-name.wav");
    let asset_id = wrong["asset_id"].as_str().unwrap().to_owned();
    let failed = dead_letter(&mut app, std::slice::from_ref(&wrong)).await.remove(0);
    let wav = wav_tone(0.4);
    app.add_audio("right-name.wav", &wav);
    let console = start_console(&app, false).await;
    let session = console.login().await;
    let cookie = Some(session.cookie.as_str());
    let key = row_keys(&console.get_page(&session.cookie, "/dead-letters").await).remove(0);
    let path = format!("/dead-letters/{key}/edit");
    let detail = console.get_page(&session.cookie, &format!("/dead-letters/{key}")).await;
    assert!(detail.contains("/temp/wrong-name.wav"), "{detail}");
    let shown =
        between(&detail, "<pre id=\"failed-event\">", "</pre>").expect("the audio.failed event is shown");
    let shown: serde_json::Value = serde_json::from_str(&unescape(shown)).unwrap();
    for field in ["event_id", "asset_id", "customer_id", "stage", "error_class", "reason", "attempts"] {
        assert_eq!(shown[field], failed[field], "{field} of the event as published");
    }

    // Refused before anything moves: not the schema, the URL policy, or another tenant.
    let mut bad_schema = wrong.clone();
    bad_schema["speed"] = 0.into();
    let refused =
        console.post(cookie, &path, &[("csrf", &session.csrf), ("job", &bad_schema.to_string())]).await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let refused = refused.text().await.unwrap();
    assert!(refused.contains("schema, at /speed"), "{refused}");
    let mut elsewhere = wrong.clone();
    elsewhere["audio_url"] = "http://169.254.169.254/latest/meta-data/".into();
    let refused =
        console.post(cookie, &path, &[("csrf", &session.csrf), ("job", &elsewhere.to_string())]).await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let mut other_tenant = wrong.clone();
    other_tenant["audio_url"] = "/temp/right-name.wav".into();
    other_tenant["customer_id"] = "someone_else".into();
    // With the identity the page carries, the form refuses it at once (422) ...
    let identity =
        unescape(between(&detail, "name=\"identity\" value=\"", "\"").expect("the identity field"));
    let form = [("csrf", session.csrf.as_str()), ("job", &other_tenant.to_string()), ("identity", &identity)];
    let refused = console.post(cookie, &path, &form).await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(refused.text().await.unwrap().contains("customer_id may not change"));
    // ... and without it (a hand-made request), the edit is refused against the dead letter itself.
    let moved =
        console.post(cookie, &path, &[("csrf", &session.csrf), ("job", &other_tenant.to_string())]).await;
    let action = console.finished_action(&session, moved).await;
    assert!(action.contains("customer_id may not change"), "{action}");
    assert_eq!(app.queue_depth(&app.settings.amqp.dead_letter_queue).await, 1, "refused edits move nothing");

    let mut fixed = wrong.clone();
    fixed["audio_url"] = "/temp/right-name.wav".into();
    let action = console
        .finished_action(
            &session,
            console.post(cookie, &path, &[("csrf", &session.csrf), ("job", &fixed.to_string())]).await,
        )
        .await;
    assert!(action.contains("data-state=\"done\""), "{action}");
    let event = app.next_event().await;
    assert_eq!(event.routing_key, "audio.saved", "{}", event.json);
    assert_eq!(event.json["asset_id"], asset_id.as_str());
    let (bytes, _) = app.get_object(event.json["storage"]["key"].as_str().unwrap()).await.unwrap();
    assert_eq!(bytes, wav, "the object holds the corrected URL's bytes");
    let document = app.document(&asset_id).await.expect("the document");
    assert_eq!(document.get_str("customer_id").unwrap(), "cust_42");
    assert_eq!(app.queue_depth(&app.settings.amqp.dead_letter_queue).await, 0);
    drop(console);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_console_shows_and_refuses_to_act() {
    let mut app = spawn_app().await;
    dead_letter(&mut app, &[job("/temp/missing.wav")]).await;
    let console = start_console(&app, true).await;
    let session = console.login().await;
    let cookie = Some(session.cookie.as_str());
    let table = console.get_page(&session.cookie, "/dead-letters").await;
    let key = row_keys(&table).remove(0);
    assert!(!table.contains("action=\"/dead-letters/replay\""), "no action forms:\n{table}");
    let detail = console.get_page(&session.cookie, &format!("/dead-letters/{key}")).await;
    assert!(!detail.contains("/edit\""), "no edit form");
    let replay =
        console.post(cookie, &format!("/dead-letters/{key}/replay"), &[("csrf", &session.csrf)]).await;
    assert_eq!(replay.status(), StatusCode::FORBIDDEN);
    let purge = console
        .post(
            cookie,
            "/dead-letters/purge",
            &[("csrf", &session.csrf), ("step", "run"), ("expected", "1"), ("confirm", "purge 1")],
        )
        .await;
    assert_eq!(purge.status(), StatusCode::FORBIDDEN);
    assert_eq!(app.queue_depth(&app.settings.amqp.dead_letter_queue).await, 1);
    drop(console);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_counts_the_last_hour_and_lists_the_replicas() {
    let mut app = spawn_app().await;
    app.add_audio("ok.wav", &wav_tone(0.2));
    app.publish(&job("/temp/ok.wav")).await;
    assert_eq!(app.next_event().await.routing_key, "audio.saved");
    dead_letter(&mut app, &[job("/temp/missing-1.wav"), job("/temp/missing-2.wav")]).await;
    let console = start_console(&app, false).await;
    let session = console.login().await;
    // A delivery is counted once acked, just after its event: flush (what the reporter does
    // every 15 s) until the last ack is in.
    let deadline = tokio::time::Instant::now() + WAIT;
    let overview = loop {
        app.deps.activity.flush(&app.deps.catalog.activity(), true).await.unwrap();
        let overview = console.get_page(&session.cookie, "/").await;
        if overview.contains("<dd id=\"dead-lettered\">2</dd>") || tokio::time::Instant::now() > deadline {
            break overview;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(overview.contains("<dd id=\"saved\">1</dd>"), "{overview}");
    assert!(overview.contains("<dd id=\"dead-lettered\">2</dd>"), "{overview}");
    assert!(overview.contains("<dd id=\"retried\">0</dd>"), "{overview}");
    assert!(overview.contains(app.deps.activity.replica_id()), "{overview}");
    // Old buckets and heartbeats expire (TTL indexes made by the worker's reporter).
    let mongo = mongodb::Client::with_uri_str(&app.settings.mongo.uri).await.unwrap();
    let database = mongo.database(&app.settings.mongo.database);
    for (collection, index) in [("audio_worker_activity", "minute_ttl"), ("audio_workers", "last_seen_ttl")] {
        let names =
            database.collection::<mongodb::bson::Document>(collection).list_index_names().await.unwrap();
        assert!(names.contains(&index.to_owned()), "{collection}: {names:?}");
    }
    let dlq_row =
        between(&overview, &format!("<code>{}</code>", app.settings.amqp.dead_letter_queue), "</tr>")
            .unwrap();
    assert!(dlq_row.contains("<td class=\"num\">2</td>"), "{dlq_row}");
    drop(console);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_paged_and_the_queue_keeps_its_order() {
    let app = spawn_app_without_worker(&[]).await;
    let dlq = app.settings.amqp.dead_letter_queue.clone();
    // Dead letters as the broker itself makes them (no failure headers), in a known order.
    for i in 0..57 {
        let body =
            serde_json::json!({"asset_id": format!("paged-{i:02}"), "customer_id": "c", "user_id": "u"});
        app.publish_to_queue(&dlq, &serde_json::to_vec(&body).unwrap()).await;
    }
    wait_for_depth(&app, &dlq, 57).await;
    let console = start_console(&app, false).await;
    let session = console.login().await;
    let first = console.get_page(&session.cookie, "/dead-letters").await;
    let second = console.get_page(&session.cookie, "/dead-letters?page=2").await;
    assert_eq!(row_keys(&first).len(), 50);
    assert_eq!(row_keys(&second).len(), 7);
    assert!(first.contains("page 1 of 2") && second.contains("page 2 of 2"), "{second}");
    assert!(first.contains("page=2\">next</a>") && second.contains("page=1\">previous</a>"));
    let shown: Vec<String> = [&first, &second]
        .iter()
        .flat_map(|page| page.split("<code>paged-").skip(1).map(|s| s[..2].to_owned()))
        .collect();
    let expected: Vec<String> = (0..57).map(|i| format!("{i:02}")).collect();
    assert_eq!(shown, expected, "oldest first, each once");
    // Reading left the queue as it was: every message, in the same order.
    let left: Vec<String> = app
        .drain_dlq()
        .await
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.delivery.data).unwrap()["asset_id"]
                .as_str()
                .unwrap()[6..]
                .to_owned()
        })
        .collect();
    assert_eq!(left, expected);
    drop(console);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_reads_the_management_api_when_given_one() {
    let rabbit = crate::services::OwnRabbit::start_with_management().await;
    let app = spawn_app_without_worker(&[("AMQP_URL", &rabbit.url())]).await;
    let dlq = app.settings.amqp.dead_letter_queue.clone();
    for i in 0..3 {
        app.publish_to_queue(&dlq, format!("{{\"asset_id\": \"m-{i}\"}}").as_bytes()).await;
    }
    // The URL without credentials: the console takes AMQP_URL's (guest:guest).
    let management =
        url::Url::parse(&format!("http://127.0.0.1:{}/", rabbit.management_port.unwrap())).unwrap();
    let console = start_console_with(&app, true, Some(management)).await;
    let session = console.login().await;
    // The management API's figures lag the broker by its stats interval (5 s by default).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let overview = console.get_page(&session.cookie, "/").await;
        assert!(overview.contains("From RabbitMQ management API."), "{overview}");
        let row = between(&overview, &format!("<code>{dlq}</code>"), "</tr>").unwrap().to_owned();
        assert!(!row.contains("problem"), "{row}");
        if row.contains("<td class=\"num\">3</td>\n  <td class=\"num\">0</td>") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the DLQ's 3 ready, 0 unacked never showed: {row}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drop(console);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_dead_letters_keeps_their_order_while_more_arrive() {
    let app = spawn_app_without_worker(&[]).await;
    let dlq = app.settings.amqp.dead_letter_queue.clone();
    let body = |name: String| serde_json::to_vec(&serde_json::json!({"asset_id": name})).unwrap();
    for i in 0..600 {
        app.publish_to_queue(&dlq, &body(format!("old-{i:03}"))).await;
    }
    wait_for_depth(&app, &dlq, 600).await;
    // A page view (the whole queue is read) while 30 new dead letters come in.
    let settings = app.settings.amqp.clone();
    let read = tokio::spawn(async move {
        let page = audio_worker::dlq::page(&settings, &audio_worker::dlq::Filter::default(), 0, 10).await;
        (page, tokio::time::Instant::now())
    });
    // (Connecting and declaring the topology take a few hundred milliseconds.)
    tokio::time::sleep(Duration::from_millis(400)).await;
    for i in 0..30 {
        app.publish_to_queue(&dlq, &body(format!("new-{i:03}"))).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let published = tokio::time::Instant::now();
    let (page, read_ended) = read.await.unwrap();
    assert_eq!(page.unwrap().total, 600, "the read began before the new ones");
    assert!(published < read_ended, "the new ones all came in while the read ran");
    let names: Vec<String> = app
        .drain_dlq()
        .await
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.delivery.data).unwrap()["asset_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let expected: Vec<String> =
        (0..600).map(|i| format!("old-{i:03}")).chain((0..30).map(|i| format!("new-{i:03}"))).collect();
    assert_eq!(names.len(), 630);
    let first_wrong = names.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(
        first_wrong,
        None,
        "the queue's order after the read: {:?}",
        &names[first_wrong.unwrap_or(0)..][..10.min(630 - first_wrong.unwrap_or(0))]
    );
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_management_api_that_never_answers_does_not_hold_the_overview() {
    let app = spawn_app_without_worker(&[]).await;
    // Accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let management = url::Url::parse(&format!("http://{}/", silent.local_addr().unwrap())).unwrap();
    let console = start_console_with(&app, true, Some(management)).await;
    let session = console.login().await;
    let started = std::time::Instant::now();
    let overview = console.get_page(&session.cookie, "/").await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "the overview took {took:?}");
    let dlq_row =
        between(&overview, &format!("<code>{}</code>", app.settings.amqp.dead_letter_queue), "</tr>")
            .unwrap();
    assert!(dlq_row.contains("no answer within 5 s"), "{dlq_row}");
    drop(silent);
    drop(console);
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replay_can_be_cancelled_and_what_it_did_not_move_stays() {
    let app = spawn_app_without_worker(&[]).await;
    let dlq = app.settings.amqp.dead_letter_queue.clone();
    for i in 0..6 {
        let mut j = job(&format!("/temp/slow-{i}.wav"));
        j["customer_id"] = "slow".into();
        app.publish_to_queue(&dlq, &serde_json::to_vec(&j).unwrap()).await;
    }
    let console = start_console(&app, false).await;
    let session = console.login().await;
    let cookie = Some(session.cookie.as_str());
    let form = [
        ("csrf", session.csrf.as_str()),
        ("step", "run"),
        ("expected", "6"),
        ("rate", "1/s"),
        ("customer_id", "slow"),
    ];
    let started = console.post(cookie, "/dead-letters/replay", &form).await;
    assert_eq!(started.status(), StatusCode::SEE_OTHER);
    let location = started.headers()["location"].to_str().unwrap().to_owned();
    // Once the first has moved (a second before the next may), cancel.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !console.get_page(&session.cookie, &location).await.contains("<dd id=\"moved\">1</dd>") {
        assert!(tokio::time::Instant::now() < deadline, "the replay never moved one");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let page = console.get_page(&session.cookie, &location).await;
    assert!(page.contains("/cancel\""), "a running filtered replay offers Cancel:\n{page}");
    let cancel = console.post(cookie, &format!("{location}/cancel"), &[("csrf", &session.csrf)]).await;
    assert_eq!(cancel.status(), StatusCode::SEE_OTHER);
    let mut page = String::new();
    while !page.contains("data-state=\"cancelled\"") {
        assert!(tokio::time::Instant::now() < deadline, "the replay did not end cancelled: {page}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        page = console.get_page(&session.cookie, &location).await;
    }
    let moved: usize = between(&page, "<dd id=\"moved\">", "<").unwrap().parse().unwrap();
    assert!((1..=2).contains(&moved), "{page}");
    assert_eq!(
        app.queue_depth(&app.settings.amqp.job_queue).await as usize,
        moved,
        "the moved ones are in the job queue"
    );
    assert_eq!(app.queue_depth(&dlq).await as usize, 6 - moved, "the rest stayed in the DLQ");
    drop(console);
    app.teardown().await;
}
