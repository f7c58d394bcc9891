//! The dead-letter pages: a paged, filtered table, and one dead letter's detail (its job, every
//! header, the source URL, the asset in the library, the `audio.failed` event, and the
//! action forms). Both read the queue with [`crate::dlq::page`], which leaves it as it was.

use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;
use serde::Deserialize;

use super::auth::Operator;
use super::{Console, render, short_duration};
use crate::dlq::{self, DeadLetter, Filter};
use crate::error::Stage;
use crate::job::SaveAudioJob;
use crate::refresh::{RefreshRequest, answer};

/// Dead letters per page.
pub const PAGE_SIZE: usize = 50;

/// The highest page number asked for that is taken as it is (a larger one shows that page:
/// empty, as any page past the end).
pub const MAX_PAGE: usize = 1_000_000;

/// `text` with the characters that would not show as themselves written as `\u{…}`: control
/// characters (but newlines and tabs) and the bidirectional overrides and isolates, which
/// could make a reason or an id read as something else.
pub fn visible(text: &str) -> String {
    text.chars()
        .map(|c| {
            let hidden = (c.is_control() && c != '\n' && c != '\t')
                || matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
            if hidden { c.escape_unicode().to_string() } else { c.to_string() }
        })
        .collect()
}

/// The filters of the dead-letter table, as the query string (and the action forms) carry them;
/// every field is optional and an empty one is unset.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct FilterForm {
    /// A stage name (`parse`, `download`, `upload`, `catalog`, `publish`, `delivery`).
    #[serde(default)]
    pub stage: String,
    /// Text the reason contains (case-insensitive).
    #[serde(default)]
    pub reason: String,
    /// Exactly this tenant.
    #[serde(default)]
    pub customer_id: String,
    /// Exactly this user.
    #[serde(default)]
    pub user_id: String,
    /// Exactly this asset.
    #[serde(default)]
    pub asset_id: String,
    /// Failed at least this long ago (`10m`, `2h`).
    #[serde(default)]
    pub older_than: String,
    /// Failed at most this long ago.
    #[serde(default)]
    pub newer_than: String,
    /// 1-based page number.
    #[serde(default)]
    pub page: Option<usize>,
}

impl FilterForm {
    /// The filter these fields describe, or what is wrong with them.
    ///
    /// # Errors
    /// A stage that does not exist, or an age that is not a duration.
    pub fn filter(&self) -> Result<Filter, String> {
        let text = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        let age = |name: &str, s: &str| -> Result<Option<Duration>, String> {
            text(s)
                .map(|s| humantime::parse_duration(&s).map_err(|e| format!("{name}: {e} (e.g. 10m, 2h)")))
                .transpose()
        };
        let stage = text(&self.stage)
            .map(|s| s.parse::<Stage>().map_err(|_| format!("stage: no stage is called {s:?}")))
            .transpose()?;
        Ok(Filter {
            asset_id: text(&self.asset_id),
            stage,
            reason_contains: text(&self.reason),
            older_than: age("older than", &self.older_than)?,
            newer_than: age("newer than", &self.newer_than)?,
            customer_id: text(&self.customer_id),
            user_id: text(&self.user_id),
            key: None,
        })
    }

    /// The set fields as (name, value) pairs: hidden inputs of the action forms and the query
    /// of the paging links (the page itself left out).
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        [
            ("stage", &self.stage),
            ("reason", &self.reason),
            ("customer_id", &self.customer_id),
            ("user_id", &self.user_id),
            ("asset_id", &self.asset_id),
            ("older_than", &self.older_than),
            ("newer_than", &self.newer_than),
        ]
        .into_iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| (k, v.trim().to_owned()))
        .collect()
    }

    /// The set fields as a query string (`stage=download&reason=404`), percent-encoded.
    pub fn query(&self) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in self.pairs() {
            query.append_pair(k, &v);
        }
        query.finish()
    }

    /// In words, for the action log: `stage=download reason~"404"`, or `all`.
    pub fn describe(&self) -> String {
        let pairs = self.pairs();
        if pairs.is_empty() {
            return "all".into();
        }
        pairs.iter().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join(" ")
    }
}

/// A dead letter as a table row.
#[derive(Debug, Clone)]
pub struct Row {
    /// [`DeadLetter::key`].
    pub key: String,
    /// The asset, or `-`.
    pub asset_id: String,
    /// `customer_id/user_id`, or `-`.
    pub tenant: String,
    /// The failing stage, or `-`.
    pub stage: String,
    /// `transient` or `permanent`, or `-`.
    pub error_class: String,
    /// Attempts made, or `-`.
    pub attempts: String,
    /// Time since the failure, or `-`.
    pub age: String,
    /// The reason (at most 200 characters), or `-` (the broker dead-lettered it).
    pub reason: String,
}

impl Row {
    fn new(dead: &DeadLetter) -> Self {
        let dash = |s: Option<&str>| visible(s.unwrap_or("-"));
        let now = Utc::now();
        Self {
            key: dead.key.clone(),
            asset_id: dash(dead.asset_id.as_deref()),
            tenant: match (&dead.customer_id, &dead.user_id) {
                (None, None) => "-".into(),
                (c, u) => {
                    visible(&format!("{}/{}", c.as_deref().unwrap_or("?"), u.as_deref().unwrap_or("?")))
                }
            },
            stage: dash(dead.failure.stage.as_deref()),
            error_class: dash(dead.failure.error_class.as_deref()),
            attempts: dead.failure.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
            age: dead.age(now).map_or_else(|| "-".into(), short_duration),
            reason: dead
                .failure
                .reason
                .as_deref()
                .map_or_else(|| "-".into(), |r| r.chars().take(200).collect()),
        }
    }
}

#[derive(Template)]
#[template(path = "console/dead_letters.html")]
struct DeadLettersPage {
    operator: Operator,
    read_only: bool,
    form: FilterForm,
    stages: Vec<&'static str>,
    rows: Vec<Row>,
    matched: usize,
    total: usize,
    page: usize,
    pages: usize,
    query: String,
    problem: Option<String>,
}

/// Every stage a dead letter can name, for the filter's choice.
fn stage_names() -> Vec<&'static str> {
    Stage::ALL.iter().map(|s| s.as_str()).collect()
}

/// `GET /dead-letters`: the dead letters the filters select, [`PAGE_SIZE`] a page, oldest
/// first.
pub async fn dead_letters(
    State(console): State<Arc<Console>>,
    operator: Operator,
    Query(form): Query<FilterForm>,
) -> Response {
    let page = form.page.unwrap_or(1).clamp(1, MAX_PAGE);
    let mut view = DeadLettersPage {
        read_only: console.console.read_only,
        operator,
        stages: stage_names(),
        rows: Vec::new(),
        matched: 0,
        total: 0,
        page,
        pages: 1,
        query: form.query(),
        problem: None,
        form,
    };
    let filter = match view.form.filter() {
        Ok(filter) => filter,
        Err(problem) => {
            view.problem = Some(problem);
            return render(StatusCode::BAD_REQUEST, &view);
        }
    };
    let Some(_scan) = console.actions.scan_lock(super::SCAN_WAIT).await else {
        view.problem = Some(console.actions.busy_note());
        return render(StatusCode::SERVICE_UNAVAILABLE, &view);
    };
    match dlq::page(&console.settings.amqp, &filter, (page - 1) * PAGE_SIZE, PAGE_SIZE).await {
        Ok(found) => {
            view.rows = found.items.iter().map(Row::new).collect();
            view.matched = found.matched;
            view.total = found.total;
            view.pages = found.matched.div_ceil(PAGE_SIZE).max(1);
            render(StatusCode::OK, &view)
        }
        Err(e) => {
            view.problem = Some(format!("reading the dead-letter queue failed: {e:#}"));
            render(StatusCode::BAD_GATEWAY, &view)
        }
    }
}

/// What the detail page shows of one dead letter.
#[derive(Debug, Clone)]
pub struct Detail {
    /// The table row's fields.
    pub row: Row,
    /// The message id, or `-`.
    pub message_id: String,
    /// When it first failed, or `-`.
    pub first_failed_at: String,
    /// When it last failed, or `-`.
    pub failed_at: String,
    /// The job, pretty-printed JSON (or the body as text when it is not JSON).
    pub job: String,
    /// Every header, name and value, in name order.
    pub headers: Vec<(String, String)>,
    /// Where the worker downloads the audio from (`audio_url` resolved under the URL policy),
    /// or why the job does not parse now.
    pub source: Result<String, String>,
    /// The asset in the library (version and a fresh URL), when its tenant has it saved.
    pub library: Option<(i64, String)>,
    /// The `audio.failed` event published when the job was dead-lettered, pretty-printed.
    pub failed_event: Option<String>,
}

impl Detail {
    async fn new(console: &Console, dead: &DeadLetter) -> Self {
        let policy = &console.settings.audio_gen.url_policy;
        let parsed = SaveAudioJob::parse(&dead.body, policy);
        let library = match &parsed {
            Ok(job) => {
                let request = RefreshRequest {
                    asset_id: job.asset_id.to_string(),
                    customer_id: job.customer_id.to_string(),
                    user_id: job.user_id.to_string(),
                };
                let reply = answer(&console.catalog, &console.store, &request).await;
                reply.version.zip(reply.storage.map(|s| s.url))
            }
            Err(_) => None,
        };
        let mut headers: Vec<(String, String)> = dead
            .headers
            .iter()
            .map(|(k, v)| (visible(k), visible(&v.as_str().map_or_else(|| v.to_string(), str::to_owned))))
            .collect();
        headers.sort();
        let time = |t: Option<chrono::DateTime<Utc>>| t.map_or_else(|| "-".into(), |t| t.to_rfc3339());
        Self {
            row: Row::new(dead),
            message_id: visible(dead.message_id.as_deref().unwrap_or("-")),
            first_failed_at: time(dead.failure.first_failed_at),
            failed_at: time(dead.failure.failed_at),
            job: visible(&pretty_job(dead)),
            headers,
            source: parsed.as_ref().map(|job| job.source.url.to_string()).map_err(ToString::to_string),
            library,
            failed_event: dead.failed_event(policy).and_then(|e| serde_json::to_string_pretty(&e).ok()),
        }
    }
}

/// The job as the edit form starts it: pretty JSON, or the body as text.
pub fn pretty_job(dead: &DeadLetter) -> String {
    match &dead.job {
        serde_json::Value::String(text) => text.clone(),
        value => serde_json::to_string_pretty(value).unwrap_or_default(),
    }
}

#[derive(Template)]
#[template(path = "console/dead_letter.html")]
pub(crate) struct DeadLetterPage {
    pub(crate) operator: Operator,
    pub(crate) read_only: bool,
    pub(crate) key: String,
    pub(crate) detail: Option<Detail>,
    /// The edit form's text (the job, or what the operator typed when it was refused).
    pub(crate) edit: String,
    /// The job's identity fields as JSON, carried back by the edit form
    /// ([`super::edit::identity_of`]).
    pub(crate) identity: String,
    /// Why the edit was refused, each reason a line.
    pub(crate) edit_errors: Vec<String>,
    pub(crate) problem: Option<String>,
}

/// Reads dead letter `key` and its detail; `Err` is the page to answer instead (not found,
/// busy, broker unreachable).
pub(crate) async fn load(
    console: &Console,
    operator: &Operator,
    key: &str,
) -> Result<(DeadLetter, Detail), Response> {
    let mut view = DeadLetterPage {
        operator: operator.clone(),
        read_only: console.console.read_only,
        key: key.to_owned(),
        detail: None,
        edit: String::new(),
        identity: String::new(),
        edit_errors: Vec::new(),
        problem: None,
    };
    let found = {
        let Some(_scan) = console.actions.scan_lock(super::SCAN_WAIT).await else {
            view.problem = Some(console.actions.busy_note());
            return Err(render(StatusCode::SERVICE_UNAVAILABLE, &view));
        };
        let filter = Filter { key: Some(key.to_owned()), ..Filter::default() };
        dlq::page(&console.settings.amqp, &filter, 0, 1).await
    };
    match found.map(|p| p.items.into_iter().next()) {
        Ok(Some(dead)) => {
            let detail = Detail::new(console, &dead).await;
            Ok((dead, detail))
        }
        Ok(None) => {
            view.problem = Some("No such dead letter: it was replayed or purged, or never was.".into());
            Err(render(StatusCode::NOT_FOUND, &view))
        }
        Err(e) => {
            view.problem = Some(format!("reading the dead-letter queue failed: {e:#}"));
            Err(render(StatusCode::BAD_GATEWAY, &view))
        }
    }
}

/// `GET /dead-letters/{key}`.
pub async fn dead_letter(
    State(console): State<Arc<Console>>,
    operator: Operator,
    Path(key): Path<String>,
) -> Response {
    match load(&console, &operator, &key).await {
        Ok((dead, detail)) => render(
            StatusCode::OK,
            &DeadLetterPage {
                read_only: console.console.read_only,
                operator,
                key,
                edit: pretty_job(&dead),
                identity: super::edit::identity_of(&dead.job),
                detail: Some(detail),
                edit_errors: Vec::new(),
                problem: None,
            },
        ),
        Err(page) => page,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_fields_parse_and_round_trip() {
        let form = FilterForm {
            stage: "download".into(),
            reason: " 404 & more ".into(),
            older_than: "10m".into(),
            ..FilterForm::default()
        };
        let filter = form.filter().unwrap();
        assert_eq!(filter.stage, Some(Stage::Download));
        assert_eq!(filter.reason_contains.as_deref(), Some("404 & more"));
        assert_eq!(filter.older_than, Some(Duration::from_secs(600)));
        assert_eq!(form.query(), "stage=download&reason=404+%26+more&older_than=10m");
        assert_eq!(form.describe(), r#"stage="download" reason="404 & more" older_than="10m""#);
        assert!(FilterForm { stage: "downlaod".into(), ..FilterForm::default() }.filter().is_err());
        assert!(FilterForm { newer_than: "soon".into(), ..FilterForm::default() }.filter().is_err());
        assert_eq!(FilterForm::default().describe(), "all");
    }

    #[test]
    fn hidden_characters_are_shown_escaped() {
        assert_eq!(visible("a\u{202E}gpj.exe"), "a\\u{202e}gpj.exe");
        assert_eq!(visible("nul\0 esc\u{1b}[31m"), "nul\\u{0} esc\\u{1b}[31m");
        assert_eq!(visible("line\n\tindented é"), "line\n\tindented é");
    }
}
