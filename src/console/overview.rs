//! The overview page: each queue's depth and consumers (the job queue, the batch queues, each
//! delay queue, the dead-letter queue), the last hour's outcomes summed over the replicas'
//! activity in MongoDB, the replicas seen, and the console's recent actions.

use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{Duration as ChronoDuration, Utc};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Deserialize;

use super::actions::ActionView;
use super::auth::Operator;
use super::{Console, render, short_duration};
use crate::activity::GONE_AFTER;
use crate::amqp::topology::{delay_queue, delay_queue_of};
use crate::pipeline::catalog::OutcomeCounts;

/// One queue's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueRow {
    /// The queue's name.
    pub name: String,
    /// What it is for, in a few words.
    pub role: &'static str,
    /// Messages ready for delivery; `None` when the queue could not be read (the error is in
    /// `problem`).
    pub ready: Option<u64>,
    /// Messages delivered and not yet acked (management API only).
    pub unacked: Option<u64>,
    /// Consumers attached.
    pub consumers: Option<u64>,
    /// Why the figures are missing.
    pub problem: Option<String>,
}

impl QueueRow {
    /// A queue whose figures could not be read, and why.
    fn unread(name: String, role: &'static str, problem: String) -> Self {
        Self { name, role, ready: None, unacked: None, consumers: None, problem: Some(problem) }
    }
}

/// The queues the overview shows, with their roles, in reading order.
pub fn watched_queues(console: &Console) -> Vec<(String, &'static str)> {
    let names = &console.settings.amqp;
    let schedule = console.settings.worker.retry_schedule.len();
    let mut queues = vec![(names.job_queue.clone(), "jobs")];
    queues.extend((1..=schedule).map(|n| (delay_queue(names, n), "delay (jobs)")));
    queues.push((names.batch_queue(), "batches"));
    queues.push((names.batch_items_queue(), "batch items"));
    queues.extend(
        (1..=schedule).map(|n| (delay_queue_of(&names.batch_items_queue(), n), "delay (batch items)")),
    );
    queues.push((names.dead_letter_queue.clone(), "dead letters"));
    queues
}

/// How long the overview waits for the queues' figures before it shows them as unanswered (a
/// hung broker or management API must not hold the page).
pub const QUEUES_WAIT: Duration = Duration::from_secs(5);

/// Each watched queue's figures: from the management API when `RABBITMQ_MANAGEMENT_URL` is set
/// (all queues asked at once), else from passive declarations over AMQP (one channel per
/// queue, since a missing queue closes the channel that asked); within [`QUEUES_WAIT`].
pub async fn queue_rows(console: &Console) -> (Vec<QueueRow>, &'static str) {
    let queues = watched_queues(console);
    let (read, source) = match &console.console.management_url {
        Some(base) => {
            let rows =
                tokio::time::timeout(QUEUES_WAIT, management_rows(console, base, queues.clone())).await;
            (rows, "RabbitMQ management API")
        }
        None => (
            tokio::time::timeout(QUEUES_WAIT, amqp_rows(console, queues.clone())).await,
            "AMQP (passive queue declarations)",
        ),
    };
    let rows = read.unwrap_or_else(|_| {
        let problem = format!("no answer within {} s", QUEUES_WAIT.as_secs());
        queues.into_iter().map(|(name, role)| QueueRow::unread(name, role, problem.clone())).collect()
    });
    (rows, source)
}

async fn amqp_rows(console: &Console, queues: Vec<(String, &'static str)>) -> Vec<QueueRow> {
    let unread = QueueRow::unread;
    let connection = match crate::amqp::connect(&console.settings.amqp.nodes, "audio-worker console", 0).await
    {
        Ok((connection, _)) => connection,
        Err(e) => return queues.into_iter().map(|(n, r)| unread(n, r, format!("RabbitMQ: {e:#}"))).collect(),
    };
    let mut rows = Vec::with_capacity(queues.len());
    for (name, role) in queues {
        let declared = async {
            let channel = connection.create_channel().await?;
            let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
            let queue = channel.queue_declare(name.as_str().into(), passive, FieldTable::default()).await?;
            let _ = channel.close(200, "read".into()).await;
            lapin::Result::Ok(queue)
        };
        rows.push(match declared.await {
            Ok(q) => QueueRow {
                name,
                role,
                ready: Some(u64::from(q.message_count())),
                unacked: None,
                consumers: Some(u64::from(q.consumer_count())),
                problem: None,
            },
            Err(e) => unread(name, role, format!("not declared yet, or not readable: {e}")),
        });
    }
    let _ = connection.close(200, "overview read".into()).await;
    rows
}

/// A queue as `GET /api/queues/{vhost}/{name}` describes it (the fields used).
#[derive(Debug, Deserialize)]
struct ManagedQueue {
    #[serde(default)]
    messages_ready: u64,
    #[serde(default)]
    messages_unacknowledged: u64,
    #[serde(default)]
    consumers: u64,
}

async fn management_rows(
    console: &Console,
    base: &url::Url,
    queues: Vec<(String, &'static str)>,
) -> Vec<QueueRow> {
    // The vhost and the credentials of the first AMQP node, unless the URL has its own.
    let amqp = console.settings.amqp.nodes.first().and_then(|n| url::Url::parse(n).ok());
    let vhost = amqp
        .as_ref()
        .map(|u| {
            percent_encoding::percent_decode_str(u.path().trim_start_matches('/'))
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "/".into());
    let (user, password) = if base.username().is_empty() {
        amqp.as_ref().map_or(("guest".to_owned(), Some("guest".to_owned())), |u| {
            (u.username().to_owned(), u.password().map(str::to_owned))
        })
    } else {
        (base.username().to_owned(), base.password().map(str::to_owned))
    };
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    let (user, password) = (decode(&user), password.as_deref().map(decode));
    let fetches = queues.into_iter().map(|(name, role)| {
        let (user, password, vhost) = (&user, &password, &vhost);
        async move {
            let mut url = base.clone();
            let _ = url.set_username("");
            let _ = url.set_password(None);
            let fetched = async {
                url.path_segments_mut()
                    .map_err(|()| "the management URL cannot take a path".to_owned())?
                    .pop_if_empty()
                    .extend(["api", "queues", vhost, &name]);
                let response = console
                    .http
                    .get(url.clone())
                    .basic_auth(user, password.as_deref())
                    .send()
                    .await
                    .map_err(|e| crate::error::chain(&e))?;
                let status = response.status();
                if !status.is_success() {
                    return Err(format!("management API: HTTP {status}"));
                }
                let body = response.bytes().await.map_err(|e| format!("management API: {e}"))?;
                serde_json::from_slice::<ManagedQueue>(&body).map_err(|e| format!("management API: {e}"))
            };
            match fetched.await {
                Ok(q) => QueueRow {
                    name,
                    role,
                    ready: Some(q.messages_ready),
                    unacked: Some(q.messages_unacknowledged),
                    consumers: Some(q.consumers),
                    problem: None,
                },
                Err(problem) => QueueRow::unread(name, role, problem),
            }
        }
    });
    futures_util::future::join_all(fetches).await
}

/// A replica as the overview lists it.
#[derive(Debug, Clone)]
pub struct ReplicaRow {
    /// `{host}/{pid}`.
    pub id: String,
    /// The version it runs.
    pub version: String,
    /// How long ago its last heartbeat was.
    pub seen_ago: String,
    /// How long it has been up.
    pub up_for: String,
    /// `consuming`, `not consuming` (starting, or reconnecting to RabbitMQ) or `gone` (no
    /// heartbeat for [`GONE_AFTER`]).
    pub state: &'static str,
}

#[derive(Template)]
#[template(path = "console/overview.html")]
struct OverviewPage {
    operator: Operator,
    read_only: bool,
    queues: Vec<QueueRow>,
    queue_source: &'static str,
    outcomes: Option<OutcomeCounts>,
    replicas: Vec<ReplicaRow>,
    activity_problem: Option<String>,
    actions: Vec<ActionView>,
}

/// `GET /`.
pub async fn page(State(console): State<Arc<Console>>, operator: Operator) -> Response {
    let ((queues, queue_source), activity) = tokio::join!(queue_rows(&console), async {
        let log = console.catalog.activity();
        let since = Utc::now() - ChronoDuration::hours(1);
        tokio::try_join!(log.outcomes_since(since), log.replicas_since(since))
    });
    let now = Utc::now();
    let ago = |t: chrono::DateTime<Utc>| short_duration((now - t).to_std().unwrap_or_default());
    let (outcomes, replicas, activity_problem) = match activity {
        Ok((outcomes, replicas)) => {
            let rows = replicas
                .into_iter()
                .map(|r| ReplicaRow {
                    state: if (now - r.last_seen).to_std().unwrap_or_default() > GONE_AFTER {
                        "gone"
                    } else if r.consuming {
                        "consuming"
                    } else {
                        "not consuming"
                    },
                    seen_ago: ago(r.last_seen),
                    up_for: ago(r.started_at),
                    id: r.id,
                    version: r.version,
                })
                .collect();
            (Some(outcomes), rows, None)
        }
        Err(e) => (None, Vec::new(), Some(format!("MongoDB: {e}"))),
    };
    let actions = console.actions.recent(10);
    render(
        StatusCode::OK,
        &OverviewPage {
            read_only: console.console.read_only,
            operator,
            queues,
            queue_source,
            outcomes,
            replicas,
            activity_problem,
            actions,
        },
    )
}
