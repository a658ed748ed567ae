//! Parts die, nothing is lost: an agent killed mid-run, a scheduler killed mid-run, results
//! held in the outbox until their receipt.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use rota_tests::wire::{AgentMessage, EventKind, Job, JobId, JobRecord, JobResult, JobState, Role};
use rota_tests::{System, amqp_url, within};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

async fn all_records(sys: &System) -> Vec<JobRecord> {
    match sys.list_all(None).await {
        Ok(jobs) => jobs,
        Err(e) => panic!("cannot list the jobs: {e:#}"),
    }
}

/// Every job of `ids` is recorded once, succeeded, with exactly one recorded run.
fn assert_each_once(records: &[JobRecord], ids: &HashSet<JobId>) {
    let seen: HashSet<JobId> = records.iter().map(|r| r.uuid).collect();
    let missing: Vec<_> = ids.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "{} jobs never recorded, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    for r in records.iter().filter(|r| ids.contains(&r.uuid)) {
        assert_eq!(r.state, JobState::Succeeded, "{}", r.uuid);
        assert_eq!(
            r.attempts.len(),
            1,
            "{} recorded {} runs",
            r.uuid,
            r.attempts.len()
        );
    }
}

async fn publish_sleepers(sys: &System, n: usize, ms: u64) -> HashSet<JobId> {
    let mut ids = HashSet::new();
    for _ in 0..n {
        let id = sys
            .client
            .publish_job(Job::new("demo.sleep", json!({ "ms": ms })))
            .await
            .expect("published");
        ids.insert(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_run_and_restarted_loses_nothing() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let mut agent = sys.agent("k1", &["--pool-max-size", "8"]);
    sys.ready(true, &["k1"]).await;
    let mut finished = sys.finished_events().await;
    let mut beats = sys.heartbeats().await;
    // 2.5 s of work for 8 workers: plenty is left once 50 are done.
    let ids = publish_sleepers(&sys, 200, 100).await;

    // Kill it with jobs running, results in flight, receipts pending.
    within(MINUTE, "50 jobs finished", async {
        for _ in 0..50 {
            finished.next().await.expect("events");
        }
    })
    .await;
    within(
        MINUTE,
        "a heartbeat with jobs running",
        sys.heartbeat_where(&mut beats, Role::Agent, "k1", |hb| !hb.running.is_empty()),
    )
    .await;
    agent.kill().await;
    let _agent = sys.agent("k1", &["--pool-max-size", "8"]);

    within(
        2 * MINUTE,
        "every job run and recorded",
        sys.settled(&mut beats, "k1", &ids),
    )
    .await;
    assert_each_once(&all_records(&sys).await, &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_killed_mid_run_loses_nothing() {
    let sys = System::new().await;
    let mut scheduler = sys.scheduler();
    let _agent = sys.agent("s1", &["--pool-max-size", "8"]);
    sys.ready(true, &["s1"]).await;
    let mut started = sys
        .client
        .watch(&[EventKind::Started])
        .await
        .expect("watch");
    let mut beats = sys.heartbeats().await;
    let mut ids = publish_sleepers(&sys, 200, 150).await;

    within(MINUTE, "20 jobs started", async {
        for _ in 0..20 {
            started.next().await.expect("events");
        }
    })
    .await;
    scheduler.kill().await;
    // The first batch may be done by now on a fast machine; the second surely runs while
    // the scheduler is down. The agent goes on; its results wait in the results queue and
    // in its outbox.
    ids.extend(publish_sleepers(&sys, 100, 10).await);
    let hb = within(
        MINUTE,
        "results waiting for the scheduler",
        sys.heartbeat_where(&mut beats, Role::Agent, "s1", |hb| hb.unreceipted >= 100),
    )
    .await;
    assert!(hb.unreceipted >= 100);
    let _scheduler = sys.scheduler();
    within(
        2 * MINUTE,
        "every result recorded",
        sys.settled(&mut beats, "s1", &ids),
    )
    .await;
    assert_each_once(&all_records(&sys).await, &ids);
}

/// The outbox keeps a result until the scheduler's receipt: without one it is sent again;
/// a job delivered again whose result is stored is not run again; the receipt empties it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_resends_until_a_receipt_and_never_reruns_a_stored_job() {
    let sys = System::new().await;
    // No scheduler: the test reads the results queue itself. Every start is announced, as
    // the witness that a job did not run again.
    let _agent = sys.agent(
        "o1",
        &[
            "--resend-interval",
            "1s",
            "--receipt-timeout",
            "1s",
            "--started-delay",
            "0s",
        ],
    );
    sys.ready(false, &["o1"]).await;
    let mut beats = sys.heartbeats().await;
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    let mut results = ch
        .basic_consume(
            sys.names.results().as_str().into(),
            "test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consumes results");
    let mut next_result = async || -> (JobResult, String) {
        let d = within(MINUTE, "a result", results.next())
            .await
            .expect("stream")
            .expect("delivery");
        d.ack(BasicAckOptions::default()).await.expect("acks");
        let reply_to = d
            .properties
            .reply_to()
            .as_ref()
            .expect("reply_to")
            .to_string();
        (serde_json::from_slice(&d.data).expect("a result"), reply_to)
    };

    let mut job = Job::new("demo.echo", json!({"n": 1}));
    job.uuid = Some(JobId::random());
    let uuid = job.uuid.expect("set");
    sys.client
        .publish_job(job.clone())
        .await
        .expect("published");
    let (first, reply_to) = next_result().await;
    assert_eq!(first.uuid, uuid);
    assert_eq!(reply_to, sys.names.agent_queue("o1"));
    let hb = sys
        .heartbeat_where(&mut beats, Role::Agent, "o1", |hb| hb.unreceipted == 1)
        .await;
    assert_eq!(hb.unreceipted, 1, "held until receipted");

    // No receipt: the same stored result comes again.
    let (again, _) = next_result().await;
    assert_eq!(again, first, "the stored result, resent");

    // The job delivered again (same uuid and attempt): not run again, its stored result resent.
    let mut started = sys
        .client
        .watch(&[EventKind::Started])
        .await
        .expect("watch");
    sys.client.publish_job(job).await.expect("published again");
    let (third, _) = next_result().await;
    assert_eq!(third.started_at, first.started_at, "not run a second time");
    let receipt = serde_json::to_vec(&AgentMessage::Receipt { uuid, attempt: 1 }).expect("json");
    ch.basic_publish(
        "".into(),
        reply_to.as_str().into(),
        BasicPublishOptions::default(),
        &receipt,
        rota_tests::admin_props(),
    )
    .await
    .expect("receipt sent");
    within(
        MINUTE,
        "the outbox emptied by the receipt",
        sys.heartbeat_where(&mut beats, Role::Agent, "o1", |hb| hb.unreceipted == 0),
    )
    .await;
    // A probe job proves no started event came for the redelivered one.
    let probe = sys
        .client
        .publish_job(Job::new("demo.echo", json!("probe")))
        .await
        .expect("published");
    let first_start = within(MINUTE, "a started event", started.next())
        .await
        .expect("events");
    assert_eq!(
        first_start.uuid, probe,
        "the redelivered job did not start again"
    );
    let _ = conn.close(200, "bye".into()).await;
}

/// SIGTERM: the agent stops taking jobs, lets running ones finish within its grace period,
/// hands back the rest, and exits cleanly; the next agent runs what was handed back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stopped_with_sigterm_finishes_or_returns_its_jobs() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let mut agent = sys.agent("g1", &["--pool-max-size", "4", "--shutdown-grace", "1s"]);
    sys.ready(true, &["g1"]).await;
    let mut started = sys
        .client
        .watch(&[EventKind::Started])
        .await
        .expect("watch");
    // Two short jobs that finish within the grace, two long ones that do not, and more queued.
    let mut ids = publish_sleepers(&sys, 2, 300).await;
    ids.extend(publish_sleepers(&sys, 6, 5_000).await);
    within(MINUTE, "four jobs running", async {
        for _ in 0..4 {
            started.next().await.expect("events");
        }
    })
    .await;
    let status = agent.terminate().await.expect("exits after SIGTERM");
    assert!(status.success(), "a clean exit: {}", agent.output());
    assert!(
        agent.output().contains("handing unfinished jobs back"),
        "{}",
        agent.output()
    );

    let _agent = sys.agent("g1", &["--pool-max-size", "8"]);
    let mut beats = sys.heartbeats().await;
    within(
        2 * MINUTE,
        "every job recorded",
        sys.settled(&mut beats, "g1", &ids),
    )
    .await;
    assert_each_once(&all_records(&sys).await, &ids);
}

/// An agent that stops sending heartbeats is reported lost after three missed intervals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_is_reported_lost() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let mut agent = sys.agent("l1", &[]);
    let mut beats = sys.heartbeats().await;
    within(
        MINUTE,
        "the agent seen alive",
        sys.scheduler_sees(&mut beats, "l1", true),
    )
    .await;
    agent.kill().await;
    within(
        MINUTE,
        "the agent reported lost",
        sys.scheduler_sees(&mut beats, "l1", false),
    )
    .await;
    let out = sys.cli(&["agents"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("LOST"));
}
