//! A RabbitMQ cluster that loses nodes: three nodes of the test's own on this machine, the
//! queues quorum queues with a member on each, two worker processes whose `AMQP_URL` lists all
//! three (each starting at another node). In the middle of the run the node holding the job
//! queue's leader is stopped, and later the node a worker is connected to; each is started
//! again afterwards. Every job must end saved, once: one document per asset, nothing
//! dead-lettered, every queue empty.
//!
//! `CLUSTER_JOBS` jobs (default 90 in `./scripts/test.sh`; `scripts/cluster.sh --jobs N` by hand,
//! which prints the figures quoted in `docs/reliability.md`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use audio_worker::standin::Fault;

use crate::helpers::{ReceivedEvent, TestApp, job, spawn_app_without_worker, wav_tone};
use crate::services::OwnCluster;

/// Collects events until `done` assets have one (duplicates kept).
async fn until(
    app: &mut TestApp,
    seen: &mut HashMap<String, Vec<ReceivedEvent>>,
    done: usize,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    while seen.len() < done {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "only {} of {done} jobs had an outcome", seen.len());
        for (asset, events) in app.outcomes(1, left).await {
            seen.entry(asset).or_default().extend(events);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_loses_its_leader_and_a_workers_node_loses_no_job() {
    let jobs: usize = std::env::var("CLUSTER_JOBS").ok().and_then(|n| n.parse().ok()).unwrap_or(90);
    let started = Instant::now();
    let mut cluster = OwnCluster::start().await;
    let formed = started.elapsed();
    let urls = cluster.url_from(0);
    let mut app = spawn_app_without_worker(&[
        ("AMQP_URL", urls.as_str()),
        ("CLEANUP_TEMP_AUDIO", "false"),
        ("WORKER_PREFETCH", "2"),
        ("RETRY_INITIAL_DELAY_MS", "200"),
    ])
    .await;
    let wav = wav_tone(0.1);
    let mut published = Vec::new();
    for i in 0..jobs {
        let name = format!("c{i}.wav");
        app.add_audio(&name, &wav);
        // Each download takes a while, so the run spans the outages.
        app.standin.script(&name, [Fault::Hang(Duration::from_millis(400))]);
        let j = job(&format!("/temp/{name}"));
        app.publish(&j).await;
        published.push(j["asset_id"].as_str().unwrap().to_owned());
    }
    let first = app.start_worker_process(&[("AMQP_URL", cluster.url_from(0).as_str())]);
    let second = app.start_worker_process(&[("AMQP_URL", cluster.url_from(1).as_str())]);
    let run = Instant::now();
    let mut seen = HashMap::new();
    let limit = Duration::from_secs(120 + jobs as u64 / 2);

    until(&mut app, &mut seen, jobs / 3, limit).await;
    let leader = cluster.leader_of(&app.settings.amqp.job_queue).expect("the job queue has a leader");
    cluster.nodes[leader].stop().await;
    let leader_stopped_at = seen.len();
    until(&mut app, &mut seen, 2 * jobs / 3, limit).await;
    cluster.nodes[leader].restart().await;
    let worker_node = cluster
        .node_of_worker(second.child.id())
        .or_else(|| cluster.node_of_worker(first.child.id()))
        .expect("a worker is connected");
    cluster.nodes[worker_node].stop().await;
    let worker_node_stopped_at = seen.len();
    until(&mut app, &mut seen, jobs, limit).await;
    cluster.nodes[worker_node].restart().await;
    let took = run.elapsed();
    // Late duplicates (a save redelivered after its node went away) arrive with the same id.
    for event in app.more_events(Duration::from_secs(3)).await {
        seen.entry(event.json["asset_id"].as_str().unwrap_or_default().to_owned()).or_default().push(event);
    }

    let mut duplicates = 0;
    for asset in &published {
        let events = seen.get(asset).unwrap_or_else(|| panic!("{asset}: no outcome"));
        assert!(events.iter().all(|e| e.routing_key == "audio.saved"), "{asset}: {:?}", events[0].json);
        let ids: std::collections::BTreeSet<_> =
            events.iter().map(|e| e.json["event_id"].to_string()).collect();
        assert_eq!(ids.len(), 1, "{asset}: one save, however often announced");
        duplicates += events.len() - 1;
        assert_eq!(app.document_count(asset).await, 1, "{asset}: one document");
        assert_eq!(app.document(asset).await.unwrap().get_i64("version").unwrap(), 1, "{asset}");
    }
    // The test's own channel may have been on a stopped node.
    app.reconnect().await;
    assert!(app.drain_dlq().await.is_empty(), "nothing dead-lettered");
    assert_eq!(app.queue_depth(&app.settings.amqp.job_queue).await, 0, "the job queue is empty");
    println!(
        "cluster: {jobs} jobs through 2 workers on 3 nodes (formed in {:.0} s); node {leader} (job queue \
         leader) stopped after {leader_stopped_at} outcomes and started again, node {worker_node} (a \
         worker's) stopped after {worker_node_stopped_at}; {} saved, 0 lost, 0 dead-lettered, {duplicates} \
         duplicate events (same event id), 1 document per asset; {:.1} s",
        formed.as_secs_f64(),
        published.len(),
        took.as_secs_f64()
    );
    drop((first, second));
    app.teardown().await;
}
