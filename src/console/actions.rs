//! What an operator can do from the console, each through the code of `audio-worker dlq …`
//! ([`crate::dlq`]: a copy confirmed before its dead letter is acked, nothing lost):
//!
//! - replay one dead letter;
//! - replay the dead letters a filter selects: a dry run counts them first, then the operator
//!   confirms with a rate, and at most the counted number move;
//! - purge the selected ones, after typing `purge N` for the N counted;
//! - edit a dead letter's job, then replay it: the edited job must pass the job schema
//!   (`schemas/save-audio-job.v1.json`), the worker's own parsing with the URL policy, and keep
//!   its identity (asset, tenant, batch): an edit may fix a job, never move it to another
//!   tenant.
//!
//! Every action runs as a task of its own, one scan of the dead-letter queue at a time, and
//! is recorded here (its page shows the progress) and logged with the operator's name and
//! session (target `audio_worker::console::audit`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use askama::Template;
use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::auth::Operator;
use super::edit::{identity_of, keeps_identity, validate_edit};
use super::pages::{DeadLetterPage, FilterForm};
use super::{Console, render};
use crate::dlq::{self, Edited, Filter, ReplayOptions, Summary};

/// The `tracing` target of the console's audit log: who did what, with which filter, and
/// what it moved.
pub const AUDIT: &str = "audio_worker::console::audit";

/// The most actions remembered (the oldest are forgotten; the log keeps them all).
const KEPT_ACTIONS: usize = 200;

/// Where an action is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionState {
    /// Waiting for another action's scan of the dead-letter queue to end.
    Waiting,
    /// Scanning and moving.
    Running,
    /// Finished; the counts are final.
    Done,
    /// Stopped by an error (what moved before it stays moved).
    Failed,
    /// Cancelled by an operator: before it started, or mid-run (what moved stays moved; the
    /// rest stays in the dead-letter queue).
    Cancelled,
}

impl ActionState {
    /// The state's name, as the pages show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// An action as its page shows it.
#[derive(Debug, Clone)]
pub struct ActionView {
    /// Its number in this console's life (from 1).
    pub id: u64,
    /// `replay`, `replay-filtered`, `purge` or `edit-replay`.
    pub kind: &'static str,
    /// Who started it (the name given at login).
    pub operator: String,
    /// What it applies to: a dead letter's key or the filter in words.
    pub target: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it ended, if it has.
    pub finished_at: Option<String>,
    /// Where it is.
    pub state: ActionState,
    /// Moved so far (replayed or purged).
    pub moved: usize,
    /// Left in place: not selected, or past the confirmed count.
    pub skipped: usize,
    /// Selected but left in place: the job does not parse, or its copy was not confirmed.
    pub failed: usize,
    /// A last word: the error, or the edited job's new message id.
    pub note: String,
    /// Whether Cancel can still stop it: while it waits, or while a filtered replay runs (the
    /// other actions are over in moments).
    pub cancellable: bool,
}

/// The actions this console ran, and the lock that keeps its scans of the dead-letter queue
/// one at a time.
#[derive(Debug, Default)]
pub struct Actions {
    /// The last action's id.
    next: AtomicU64,
    /// Newest first, at most [`KEPT_ACTIONS`].
    records: Mutex<VecDeque<ActionView>>,
    /// Held by whatever scans the dead-letter queue: an action for its whole run, a page for
    /// its read.
    scan: Arc<tokio::sync::Mutex<()>>,
    /// What cancels each action that has not ended, by id.
    stops: Mutex<std::collections::HashMap<u64, CancellationToken>>,
}

impl Actions {
    /// The scan lock, waiting at most `wait`; `None` when an action holds it longer.
    pub async fn scan_lock(&self, wait: Duration) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        tokio::time::timeout(wait, self.scan.lock()).await.ok()
    }

    /// What a page says while an action holds the dead-letter queue.
    pub fn busy_note(&self) -> String {
        let running = self
            .records
            .lock()
            .expect("actions lock")
            .iter()
            .find(|a| a.state == ActionState::Running)
            .map(|a| a.id);
        match running {
            Some(id) => format!(
                "Action #{id} is working through the dead-letter queue; this page can read it when that ends (see /actions/{id})."
            ),
            None => "Another read of the dead-letter queue is under way; try again in a moment.".into(),
        }
    }

    /// The `n` newest actions.
    pub fn recent(&self, n: usize) -> Vec<ActionView> {
        self.records.lock().expect("actions lock").iter().take(n).cloned().collect()
    }

    fn get(&self, id: u64) -> Option<ActionView> {
        self.records.lock().expect("actions lock").iter().find(|a| a.id == id).cloned()
    }

    fn update(&self, id: u64, change: impl FnOnce(&mut ActionView)) {
        if let Some(action) = self.records.lock().expect("actions lock").iter_mut().find(|a| a.id == id) {
            change(action);
        }
    }

    fn start(&self, kind: &'static str, operator: &Operator, target: String) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut records = self.records.lock().expect("actions lock");
        records.push_front(ActionView {
            id,
            kind,
            operator: operator.name.clone(),
            target,
            started_at: Utc::now().to_rfc3339(),
            finished_at: None,
            state: ActionState::Waiting,
            moved: 0,
            skipped: 0,
            failed: 0,
            note: String::new(),
            cancellable: true,
        });
        records.truncate(KEPT_ACTIONS);
        id
    }

    /// Cancels action `id`; false when it has ended (or never was).
    fn cancel(&self, id: u64) -> bool {
        self.stops.lock().expect("actions lock").get(&id).map(CancellationToken::cancel).is_some()
    }
}

/// What an action's task does once it holds the scan lock; it reports progress through the
/// callback and ends with the summary and a note, or an error.
type Work = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<(Summary, String)>> + Send>>;

/// Records an action, logs its start, and runs `work` in a task of its own once the scan lock
/// is free; the answer is a redirect to the action's page.
fn spawn(
    console: &Arc<Console>,
    kind: &'static str,
    operator: &Operator,
    target: String,
    work: impl FnOnce(Arc<Console>, u64, CancellationToken) -> Work,
) -> Response {
    let id = console.actions.start(kind, operator, target.clone());
    let (name, session) = (operator.name.clone(), operator.session.clone());
    tracing::info!(target: AUDIT, operator = %name, %session, action = kind, id, %target, "action started");
    let stop = CancellationToken::new();
    console.actions.stops.lock().expect("actions lock").insert(id, stop.clone());
    let work = work(console.clone(), id, stop.clone());
    let console = console.clone();
    tokio::spawn(async move {
        let scan = tokio::select! {
            scan = console.actions.scan.clone().lock_owned() => Some(scan),
            () = stop.cancelled() => None,
        };
        let running = kind == "replay-filtered";
        console.actions.update(id, |a| {
            a.state = ActionState::Running;
            a.cancellable = running;
        });
        let result = match scan {
            Some(_scan) => work.await,
            None => Ok((Summary::default(), "cancelled before it started".into())),
        };
        console.actions.stops.lock().expect("actions lock").remove(&id);
        let cancelled = stop.is_cancelled();
        let finished = Some(Utc::now().to_rfc3339());
        match result {
            Ok((summary, note)) => {
                tracing::info!(target: AUDIT, operator = %name, %session, action = kind, id, %target,
                    moved = summary.moved, skipped = summary.skipped, failed = summary.failed, %note, "action done");
                console.actions.update(id, |a| {
                    (a.moved, a.skipped, a.failed) = (summary.moved, summary.skipped, summary.failed);
                    a.state = if cancelled {
                        ActionState::Cancelled
                    } else if summary.failed == 0 {
                        ActionState::Done
                    } else {
                        ActionState::Failed
                    };
                    a.note = note;
                    a.finished_at = finished;
                    a.cancellable = false;
                });
            }
            Err(e) => {
                let error = format!("{e:#}");
                tracing::error!(target: AUDIT, operator = %name, %session, action = kind, id, %target, %error, "action failed");
                console.actions.update(id, |a| {
                    a.state = ActionState::Failed;
                    a.note = error;
                    a.finished_at = finished;
                    a.cancellable = false;
                });
            }
        }
    });
    Redirect::to(&format!("/actions/{id}")).into_response()
}

/// The refusal (403) of an action: on a read-only console, or without the session's CSRF
/// token; `None` when it may go ahead.
fn refusal(console: &Console, operator: &Operator, csrf: &str) -> Option<Response> {
    if console.console.read_only {
        return Some(
            (StatusCode::FORBIDDEN, "refused: this console is read-only (CONSOLE_READ_ONLY=true)\n")
                .into_response(),
        );
    }
    operator.csrf_refusal(csrf)
}

/// The fields of the action forms (all text, as browsers post them).
#[derive(Debug, Default, Deserialize)]
pub struct ActionForm {
    /// The session's CSRF token.
    #[serde(default)]
    csrf: String,
    /// `preview` (count, move nothing) or `run`.
    #[serde(default)]
    step: String,
    /// Replays per second (`10`, `10/s`); empty: as fast as confirms come.
    #[serde(default)]
    rate: String,
    /// The count the preview found: the most the run moves.
    #[serde(default)]
    expected: String,
    /// The typed confirmation of a purge: `purge N`.
    #[serde(default)]
    confirm: String,
    #[serde(default)]
    stage: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    customer_id: String,
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    asset_id: String,
    #[serde(default)]
    older_than: String,
    #[serde(default)]
    newer_than: String,
}

impl ActionForm {
    /// The count the preview found (`expected`), when the form carries one.
    fn expected(&self) -> Option<usize> {
        self.expected.trim().parse().ok()
    }

    fn filter_form(&self) -> FilterForm {
        FilterForm {
            stage: self.stage.clone(),
            reason: self.reason.clone(),
            customer_id: self.customer_id.clone(),
            user_id: self.user_id.clone(),
            asset_id: self.asset_id.clone(),
            older_than: self.older_than.clone(),
            newer_than: self.newer_than.clone(),
            page: None,
        }
    }
}

#[derive(Template)]
#[template(path = "console/confirm.html")]
struct ConfirmPage {
    operator: Operator,
    read_only: bool,
    /// `replay` or `purge`.
    kind: &'static str,
    form: FilterForm,
    /// Selected (replay: and parsing, so replayable).
    count: usize,
    /// Selected but not replayable (the job does not parse).
    unparsable: usize,
    rate: String,
    problem: Option<String>,
}

impl ConfirmPage {
    /// The confirmation of a `kind` action on the `count` dead letters `form` selects.
    fn new(
        console: &Console,
        operator: Operator,
        kind: &'static str,
        form: FilterForm,
        count: usize,
    ) -> Self {
        Self {
            read_only: console.console.read_only,
            operator,
            kind,
            form,
            count,
            unparsable: 0,
            rate: String::new(),
            problem: None,
        }
    }
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response()
}

/// `POST /dead-letters/replay`: `step=preview` counts what the filter selects (a dry run) and
/// asks for confirmation and a rate; `step=run` replays at most the counted number.
pub async fn replay_filtered(
    State(console): State<Arc<Console>>,
    operator: Operator,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Some(refused) = refusal(&console, &operator, &form.csrf) {
        return refused;
    }
    let filter_form = form.filter_form();
    let filter = match filter_form.filter() {
        Ok(filter) => filter,
        Err(problem) => return bad_request(problem),
    };
    let rate = match form.rate.trim() {
        "" => None,
        raw => match dlq::parse_rate(raw) {
            Ok(rate) => Some(rate),
            Err(problem) => return bad_request(problem),
        },
    };
    if form.step == "run" {
        let Some(expected) = form.expected() else {
            return bad_request("expected: the count from the preview is missing".into());
        };
        let target = format!(
            "{} (at most {expected}{})",
            filter_form.describe(),
            rate.map_or(String::new(), |r| format!(", {r}/s"))
        );
        return spawn(&console, "replay-filtered", &operator, target, move |console, id, stop| {
            Box::pin(async move {
                let policy = console.settings.audio_gen.url_policy.clone();
                let options =
                    ReplayOptions { filter, limit: Some(expected), rate, dry_run: false, stop: Some(stop) };
                let summary = dlq::replay(&console.settings.amqp, &policy, &options, |_, s| {
                    console
                        .actions
                        .update(id, |a| (a.moved, a.skipped, a.failed) = (s.moved, s.skipped, s.failed));
                })
                .await?;
                Ok((summary, String::new()))
            })
        });
    }
    let preview = {
        let Some(_scan) = console.actions.scan_lock(super::SCAN_WAIT).await else {
            return (StatusCode::SERVICE_UNAVAILABLE, console.actions.busy_note()).into_response();
        };
        let policy = &console.settings.audio_gen.url_policy;
        let options = ReplayOptions { filter, dry_run: true, ..ReplayOptions::default() };
        dlq::replay(&console.settings.amqp, policy, &options, |_, _| {}).await
    };
    match preview {
        Ok(summary) => {
            tracing::info!(target: AUDIT, operator = %operator.name, session = %operator.session, action = "replay-preview",
                filter = %filter_form.describe(), would_move = summary.moved, unparsable = summary.failed, "replay previewed");
            render(
                StatusCode::OK,
                &ConfirmPage {
                    unparsable: summary.failed,
                    rate: form.rate,
                    ..ConfirmPage::new(&console, operator, "replay", filter_form, summary.moved)
                },
            )
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("reading the dead-letter queue failed: {e:#}\n"))
            .into_response(),
    }
}

/// `POST /dead-letters/purge`: `step=preview` counts what the filter selects; `step=run` with
/// `confirm` = `purge N` (N the counted number) deletes at most N of them.
pub async fn purge_filtered(
    State(console): State<Arc<Console>>,
    operator: Operator,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Some(refused) = refusal(&console, &operator, &form.csrf) {
        return refused;
    }
    let filter_form = form.filter_form();
    let filter = match filter_form.filter() {
        Ok(filter) => filter,
        Err(problem) => return bad_request(problem),
    };
    if form.step == "run" {
        let Some(expected) = form.expected() else {
            return bad_request("expected: the count from the preview is missing".into());
        };
        if form.confirm.trim() != format!("purge {expected}") {
            return render(
                StatusCode::UNPROCESSABLE_ENTITY,
                &ConfirmPage {
                    problem: Some(format!(
                        "Type exactly \"purge {expected}\" to delete them; nothing was deleted."
                    )),
                    ..ConfirmPage::new(&console, operator, "purge", filter_form, expected)
                },
            );
        }
        let target = format!("{} (at most {expected})", filter_form.describe());
        return spawn(&console, "purge", &operator, target, move |console, _, _| {
            Box::pin(async move {
                let summary = dlq::purge(&console.settings.amqp, &filter, Some(expected)).await?;
                Ok((summary, String::new()))
            })
        });
    }
    let counted = {
        let Some(_scan) = console.actions.scan_lock(super::SCAN_WAIT).await else {
            return (StatusCode::SERVICE_UNAVAILABLE, console.actions.busy_note()).into_response();
        };
        dlq::page(&console.settings.amqp, &filter, 0, 0).await
    };
    match counted {
        Ok(page) => {
            tracing::info!(target: AUDIT, operator = %operator.name, session = %operator.session, action = "purge-preview",
                filter = %filter_form.describe(), would_delete = page.matched, "purge previewed");
            render(StatusCode::OK, &ConfirmPage::new(&console, operator, "purge", filter_form, page.matched))
        }
        Err(e) => (StatusCode::BAD_GATEWAY, format!("reading the dead-letter queue failed: {e:#}\n"))
            .into_response(),
    }
}

/// `POST /dead-letters/{key}/replay`: replays that one dead letter.
pub async fn replay_one(
    State(console): State<Arc<Console>>,
    operator: Operator,
    Path(key): Path<String>,
    Form(form): Form<super::auth::CsrfForm>,
) -> Response {
    if let Some(refused) = refusal(&console, &operator, &form.csrf) {
        return refused;
    }
    spawn(&console, "replay", &operator, key.clone(), move |console, _, _| {
        Box::pin(async move {
            let policy = console.settings.audio_gen.url_policy.clone();
            let filter = Filter { key: Some(key), ..Filter::default() };
            let options = ReplayOptions { filter, limit: Some(1), ..ReplayOptions::default() };
            let summary = dlq::replay(&console.settings.amqp, &policy, &options, |_, _| {}).await?;
            let note = if summary.moved + summary.failed == 0 {
                "no such dead letter any more (replayed or purged meanwhile)".into()
            } else if summary.failed > 0 {
                "the job does not parse (see the log); edit it, then replay".into()
            } else {
                String::new()
            };
            Ok((summary, note))
        })
    })
}

/// The edit form.
#[derive(Debug, Deserialize)]
pub struct EditForm {
    /// The session's CSRF token.
    #[serde(default)]
    csrf: String,
    /// The job's JSON, as edited.
    #[serde(default)]
    job: String,
    /// The original job's identity ([`identity_of`]), as the page showed it.
    #[serde(default)]
    identity: String,
}

/// `POST /dead-letters/{key}/edit`: validates the edited job (422 with the reasons on the
/// dead letter's page when refused), then replaces the dead letter by it on its way back.
pub async fn edit_and_replay(
    State(console): State<Arc<Console>>,
    operator: Operator,
    Path(key): Path<String>,
    Form(form): Form<EditForm>,
) -> Response {
    if let Some(refused) = refusal(&console, &operator, &form.csrf) {
        return refused;
    }
    let checked = validate_edit(&form.job, &console.settings.audio_gen.url_policy).and_then(|body| {
        let edited: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        match serde_json::from_str::<serde_json::Value>(&form.identity) {
            Ok(original) => keeps_identity(&original, &edited).map(|()| body).map_err(|e| vec![e]),
            Err(_) => Ok(body),
        }
    });
    let body = match checked {
        Ok(body) => body,
        Err(errors) => {
            tracing::info!(target: AUDIT, operator = %operator.name, session = %operator.session, action = "edit-replay",
                %key, errors = ?errors, "edit refused");
            let (dead, detail) = match super::pages::load(&console, &operator, &key).await {
                Ok(found) => found,
                Err(page) => return page,
            };
            return render(
                StatusCode::UNPROCESSABLE_ENTITY,
                &DeadLetterPage {
                    read_only: console.console.read_only,
                    operator,
                    key,
                    detail: Some(detail),
                    edit: form.job,
                    identity: identity_of(&dead.job),
                    edit_errors: errors,
                    problem: None,
                },
            );
        }
    };
    let edited: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    spawn(&console, "edit-replay", &operator, key.clone(), move |console, _, _| {
        Box::pin(async move {
            let result = dlq::replay_edited(&console.settings.amqp, &key, &body, |dead| {
                keeps_identity(&dead.job, &edited)
            })
            .await?;
            let mut summary = Summary::default();
            let note = match result {
                Edited::Replayed { message_id } => {
                    summary.moved = 1;
                    format!(
                        "the edited job was published (message id {})",
                        message_id.as_deref().unwrap_or("none")
                    )
                }
                Edited::NotFound => {
                    summary.failed = 1;
                    "no such dead letter any more (replayed or purged meanwhile); nothing published".into()
                }
                Edited::Refused(why) => {
                    summary.failed = 1;
                    format!("refused: {why}; nothing published")
                }
            };
            Ok((summary, note))
        })
    })
}

#[derive(Template)]
#[template(path = "console/action.html")]
struct ActionPage {
    operator: Operator,
    read_only: bool,
    action: ActionView,
}

/// `GET /actions/{id}`: one action's state and counts (the page refreshes itself while it
/// runs).
pub async fn show(State(console): State<Arc<Console>>, operator: Operator, Path(id): Path<u64>) -> Response {
    match console.actions.get(id) {
        Some(action) => {
            render(StatusCode::OK, &ActionPage { read_only: console.console.read_only, operator, action })
        }
        None => (StatusCode::NOT_FOUND, "no such action (the console keeps its last 200)\n").into_response(),
    }
}

/// `POST /actions/{id}/cancel`: stops an action that waits, or a filtered replay mid-run (what
/// moved stays moved; the scan reads on to the end so the queue keeps its order).
pub async fn cancel(
    State(console): State<Arc<Console>>,
    operator: Operator,
    Path(id): Path<u64>,
    Form(form): Form<super::auth::CsrfForm>,
) -> Response {
    if let Some(refused) = refusal(&console, &operator, &form.csrf) {
        return refused;
    }
    if console.actions.cancel(id) {
        tracing::info!(target: AUDIT, operator = %operator.name, session = %operator.session, id, "action cancelled");
    }
    Redirect::to(&format!("/actions/{id}")).into_response()
}

#[derive(Template)]
#[template(path = "console/actions.html")]
struct ActionsPage {
    operator: Operator,
    read_only: bool,
    actions: Vec<ActionView>,
}

/// `GET /actions`: every action this console remembers, newest first.
pub async fn list(State(console): State<Arc<Console>>, operator: Operator) -> Response {
    let actions = console.actions.recent(KEPT_ACTIONS);
    render(StatusCode::OK, &ActionsPage { read_only: console.console.read_only, operator, actions })
}
