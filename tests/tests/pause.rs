//! Pausing a queue (issue 14, item 5), as a user checks it: `scheduler pause QUEUE` and every
//! agent stops taking its jobs, which wait in RabbitMQ (the management API shows them ready,
//! with no consumer); a job that runs finishes and is recorded; the pause holds across
//! restarts of the agents and the scheduler, and for an agent started while it holds;
//! `scheduler resume QUEUE` and the jobs run.

use std::collections::HashSet;
use std::time::Duration;

use rota_tests::faults::close_connection_of;
use rota_tests::wire::{EventKind, Heartbeat, Job, JobId, JobState, Role};
use rota_tests::{System, amqp_url, free_addrs, http_get, metric, within};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// The consumers and ready messages of `queue`, as the management API (the RabbitMQ UI)
/// shows them; as RabbitMQ counts them over AMQP where the broker keeps no statistics for its
/// UI (`disable_stats`, as the tests' RabbitMQ 4 node).
async fn queue_in_ui(queue: &str) -> (u64, u64) {
    let q = rota_tests::queue_in_management(queue).await;
    match (q["consumers"].as_u64(), q["messages_ready"].as_u64()) {
        (Some(consumers), Some(ready)) => (consumers, ready),
        _ => {
            let q = declared(queue).await;
            (q.consumer_count().into(), q.message_count().into())
        }
    }
}

/// Waits until the management API shows `consumers` consumers and `ready` ready messages on
/// `queue` (its figures are refreshed every few seconds).
async fn ui_shows(queue: &str, consumers: u64, ready: u64) {
    within(
        MINUTE,
        &format!("{consumers} consumer(s) and {ready} ready job(s) on {queue} in the UI"),
        async {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                if queue_in_ui(queue).await == (consumers, ready) {
                    return;
                }
            }
        },
    )
    .await;
}

/// `queue` as RabbitMQ counts it now (a passive declare).
async fn declared(queue: &str) -> lapin::Queue {
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
        .await
        .expect("the queue exists");
    let _ = conn.close(200, "bye".into()).await;
    q
}

/// The consumers of `queue` now, as RabbitMQ counts them (the UI's figure, without its delay).
async fn consumers_now(queue: &str) -> u32 {
    declared(queue).await.consumer_count()
}

fn pauses(hb: &Heartbeat, queue: &str) -> bool {
    hb.paused.as_ref().is_some_and(|p| p.contains(queue))
}

/// Waits for `n` heartbeats of agent `id` in a row that say `queue` is paused.
async fn paused_at(sys: &System, id: &str, queue: &str, n: usize) {
    let mut beats = sys.heartbeats().await;
    within(MINUTE, &format!("{id} pausing {queue}"), async {
        for _ in 0..n {
            sys.heartbeat_where(&mut beats, Role::Agent, id, |hb| pauses(hb, queue))
                .await;
        }
    })
    .await;
}

/// `scheduler pause|resume QUEUE`: what it printed.
async fn cli(sys: &System, verb: &str, queue: &str) -> String {
    let out = sys.cli(&[verb, queue]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{verb} {queue}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Publishes `n` quick jobs straight to the default queue; their ids.
async fn publish(sys: &System, n: usize) -> HashSet<JobId> {
    let mut ids = HashSet::new();
    for i in 0..n {
        let uuid = sys
            .client
            .publish_job(Job::new("demo.echo", json!({ "i": i })))
            .await
            .expect("published");
        ids.insert(uuid);
    }
    ids
}

/// Jobs of `ids` the scheduler has heard of (a job published straight to the queue is
/// recorded when it starts).
async fn recorded(sys: &System, ids: &HashSet<JobId>) -> usize {
    let jobs = sys.list_all(None).await.expect("lists");
    jobs.iter().filter(|j| ids.contains(&j.uuid)).count()
}

/// Checks that the jobs `ids` of the paused `queue` still wait: no consumer of the queue
/// now, and none of them recorded.
async fn still_waiting(sys: &System, queue: &str, ids: &HashSet<JobId>) {
    assert_eq!(
        consumers_now(queue).await,
        0,
        "a consumer of the paused queue"
    );
    assert_eq!(recorded(sys, ids).await, 0, "a job of a paused queue ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_queue_keeps_its_jobs_across_restarts_until_resumed() {
    let sys = System::new().await;
    let [sched_addr, agent_addr] = free_addrs();
    let mut scheduler = sys.scheduler_with(&["--http-addr", &sched_addr]);
    let mut a1 = sys.agent("p1", &["--started-delay", "0s", "--http-addr", &agent_addr]);
    let _a2 = sys.agent("p2", &["--started-delay", "0s"]);
    sys.ready(true, &["p1", "p2"]).await;
    let queue = sys.names.jobs_queue("default");
    let mut events = sys
        .client
        .watch(&[EventKind::Started, EventKind::Finished])
        .await
        .expect("watch");

    // A job that runs when the pause comes finishes, and is recorded.
    let running = sys
        .client
        .publish_job(Job::new("demo.sleep", json!({"ms": 1500})))
        .await
        .expect("published");
    within(MINUTE, "the long job's start", async {
        while events.next().await.expect("events").uuid != running {}
    })
    .await;
    let said = cli(&sys, "pause", "default").await;
    assert!(said.contains("queue default paused"), "{said}");
    assert!(
        cli(&sys, "pause", "default")
            .await
            .contains("was paused already")
    );
    paused_at(&sys, "p1", "default", 1).await;
    paused_at(&sys, "p2", "default", 1).await;
    let ended = within(MINUTE, "the running job's end", async {
        loop {
            let e = events.next().await.expect("events");
            if e.uuid == running && e.event == EventKind::Finished {
                return e;
            }
        }
    })
    .await;
    assert_eq!(ended.state, Some(JobState::Succeeded));

    // Jobs published now wait: ready in the queue, no consumer, none recorded.
    let waiting = publish(&sys, 5).await;
    ui_shows(&queue, 0, 5).await;
    paused_at(&sys, "p1", "default", 5).await;
    still_waiting(&sys, &queue, &waiting).await;
    let (_, text) = http_get(&agent_addr, "/metrics").await.expect("metrics");
    assert_eq!(metric(&text, r#"rota_queue_paused{queue="default"}"#), 1);
    let (_, text) = http_get(&sched_addr, "/metrics").await.expect("metrics");
    assert_eq!(metric(&text, r#"rota_queue_paused{queue="default"}"#), 1);
    let agents = String::from_utf8_lossy(&sys.cli(&["agents"]).await.stdout).into_owned();
    assert!(
        agents.lines().filter(|l| l.contains("default")).count() >= 3,
        "the scheduler and both agents show the pause:\n{agents}"
    );

    // Restarts: an agent killed, and the scheduler, come back paused.
    a1.kill().await;
    scheduler.terminate().await.expect("the scheduler stops");
    let mut a1 = sys.agent("p1", &["--started-delay", "0s"]);
    paused_at(&sys, "p1", "default", 3).await;
    let _scheduler = sys.scheduler();
    sys.ready(true, &[]).await;
    let mut beats = sys.heartbeats().await;
    let hb = sys
        .heartbeat_where(&mut beats, Role::Scheduler, "scheduler", |_| true)
        .await;
    assert!(pauses(&hb, "default"), "the scheduler forgot the pause");
    paused_at(&sys, "p1", "default", 3).await;
    paused_at(&sys, "p2", "default", 3).await;
    ui_shows(&queue, 0, 5).await;
    still_waiting(&sys, &queue, &waiting).await;

    // Resumed: the waiting jobs run.
    assert!(
        cli(&sys, "resume", "default")
            .await
            .contains("queue default resumed")
    );
    let mut left = waiting.clone();
    within(MINUTE, "the waiting jobs' ends", async {
        while !left.is_empty() {
            let e = events.next().await.expect("events");
            if e.event == EventKind::Finished {
                left.remove(&e.uuid);
            }
        }
    })
    .await;
    ui_shows(&queue, 2, 0).await;
    assert!(
        cli(&sys, "resume", "default")
            .await
            .contains("was not paused")
    );
    a1.terminate().await.expect("the agent stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_while_its_queue_is_paused_takes_no_jobs() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    sys.ready(true, &[]).await;
    // Paused before any agent serves the queue: the pause holds for those that come.
    cli(&sys, "pause", "default").await;
    let waiting = publish(&sys, 3).await;
    let mut agent = sys.agent("n1", &[]);
    paused_at(&sys, "n1", "default", 5).await;
    let queue = sys.names.jobs_queue("default");
    ui_shows(&queue, 0, 3).await;
    still_waiting(&sys, &queue, &waiting).await;
    // Stopped while paused, it exits as ever; started again, it still takes nothing.
    let status = agent.terminate().await.expect("the agent stops");
    assert!(status.success(), "{}", agent.output());
    let _agent = sys.agent("n1", &[]);
    paused_at(&sys, "n1", "default", 5).await;
    still_waiting(&sys, &queue, &waiting).await;

    cli(&sys, "resume", "default").await;
    let mut beats = sys.heartbeats().await;
    within(
        MINUTE,
        "the waiting jobs run",
        sys.settled(&mut beats, "n1", &waiting),
    )
    .await;
    let jobs = sys
        .list_all(Some(JobState::Succeeded))
        .await
        .expect("lists");
    assert_eq!(jobs.iter().filter(|j| waiting.contains(&j.uuid)).count(), 3);
}

/// After the broker drops the agent's connection, the agent reconnects and consumes again
/// what it consumed, not the paused queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnected_agent_does_not_consume_a_paused_queue() {
    let sys = System::new().await;
    let [addr] = free_addrs();
    let _scheduler = sys.scheduler();
    let agent = sys.agent("r1", &["--http-addr", &addr]);
    sys.ready(true, &["r1"]).await;
    cli(&sys, "pause", "default").await;
    paused_at(&sys, "r1", "default", 1).await;
    assert_eq!(close_connection_of(agent.pid()).await, 1);
    within(MINUTE, "the agent's reconnect", async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            if let Some((200, text)) = http_get(&addr, "/metrics").await
                && metric(&text, "rota_broker_reconnects_total") >= 1
                && metric(&text, "rota_broker_connected") == 1
            {
                return;
            }
        }
    })
    .await;
    let waiting = publish(&sys, 3).await;
    paused_at(&sys, "r1", "default", 5).await;
    let queue = sys.names.jobs_queue("default");
    ui_shows(&queue, 0, 3).await;
    still_waiting(&sys, &queue, &waiting).await;

    cli(&sys, "resume", "default").await;
    let mut beats = sys.heartbeats().await;
    within(
        MINUTE,
        "the waiting jobs run",
        sys.settled(&mut beats, "r1", &waiting),
    )
    .await;
    ui_shows(&queue, 1, 0).await;
}

/// A job that waits in an agent for a worker (a prefetch above the pool's size) goes back to
/// RabbitMQ as soon as its queue is paused, not once a worker is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_for_a_worker_goes_back_when_its_queue_is_paused() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent(
        "w1",
        &[
            "--started-delay",
            "0s",
            "--pool-max-size",
            "1",
            "--prefetch",
            "2",
        ],
    );
    sys.ready(true, &["w1"]).await;
    let queue = sys.names.jobs_queue("default");
    // The queue's ready jobs, as RabbitMQ counts them now.
    let ready_in_queue = |n: u32, what: &'static str| {
        let queue = queue.clone();
        within(MINUTE, what, async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if declared(&queue).await.message_count() == n {
                    return;
                }
            }
        })
    };
    let mut events = sys
        .client
        .watch(&[EventKind::Started])
        .await
        .expect("watch");
    // The pool's one worker is busy for far longer than the test waits.
    let long = sys
        .client
        .publish_job(Job::new("demo.sleep", json!({"ms": 600_000})))
        .await
        .expect("published");
    within(MINUTE, "the long job's start", async {
        while events.next().await.expect("events").uuid != long {}
    })
    .await;
    let waiting = publish(&sys, 1).await;
    ready_in_queue(0, "the agent holding the second job").await;

    cli(&sys, "pause", "default").await;
    ready_in_queue(1, "the waiting job back in its queue").await;
    // (RabbitMQ 4 counts the paused agent as a consumer of its quorum queue until the long
    // job is acked, so the consumers are not checked here.)
    assert_eq!(recorded(&sys, &waiting).await, 0, "the waiting job ran");
    let jobs = sys.list_all(None).await.expect("lists");
    let long = jobs.iter().find(|j| j.uuid == long).expect("recorded");
    assert_eq!(long.state, JobState::Running, "the long job still runs");
}
