//! What differs between the brokers Rota runs on (`deploy/test.sh` runs the suite on RabbitMQ 3
//! and on RabbitMQ 4 with every deprecated feature refused), each checked on the broker at
//! hand: the kind of the jobs queues, a prefetch that is the pool's size whatever the queues (or
//! `--prefetch`),
//! priorities, the delivery limit, and a consumer cancelled by the broker.

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicNackOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use rota_common::amqp::{DELIVERY_LIMIT, announced_major};
use rota_common::names::QueueType;
use rota_tests::wire::{EventKind, Job, JobId, JobState, Role, Status};
use rota_tests::{System, amqp_url, messages_in, within};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// The major version of the tests' broker.
async fn major() -> u32 {
    announced_major(&amqp_url())
        .await
        .expect("the tests' broker announces its version")
}

/// The kind of queue `queue` is, from the management API (`classic` or `quorum`).
async fn queue_kind(queue: &str) -> String {
    let q = rota_tests::queue_in_management(queue).await;
    q["type"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_queues_are_quorum_queues_on_rabbitmq_4_and_classic_before() {
    let auto = if major().await >= 4 {
        "quorum"
    } else {
        "classic"
    };
    for (kind, want) in [
        (QueueType::Auto, auto),
        (QueueType::Classic, "classic"),
        (QueueType::Quorum, "quorum"),
    ] {
        let sys = System::on(&amqp_url(), kind).await;
        let _agent = sys.agent("k1", &[]);
        sys.ready(false, &["k1"]).await;
        for queue in [
            sys.names.jobs_queue("default"),
            sys.names.results(),
            sys.names.agent_queue("k1"),
        ] {
            assert_eq!(queue_kind(&queue).await, want, "{kind:?}: {queue}");
        }
    }
}

/// A pool of 2 serving two queues holds 2 jobs unacked, not 2 per queue: RabbitMQ 4 applies
/// a prefetch to each consumer (global QoS refused, or quorum queues), so the agent splits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_holds_no_more_jobs_than_its_workers_whatever_its_queues() {
    for kind in [QueueType::Classic, QueueType::Quorum] {
        let sys = System::on(&amqp_url(), kind).await;
        let _scheduler = sys.scheduler();
        let _agent = sys.agent(
            "h1",
            &[
                "--pool-max-size",
                "2",
                "--queue",
                "default",
                "--queue",
                "other",
            ],
        );
        sys.ready(true, &["h1"]).await;
        let mut events = sys
            .client
            .watch(&[EventKind::Started])
            .await
            .expect("watch");
        let mut ids = std::collections::HashSet::new();
        for queue in ["default", "other"] {
            for _ in 0..3 {
                let mut job = Job::new("demo.sleep", json!({ "ms": 4000 }));
                job.queue = Some(queue.to_owned());
                ids.insert(sys.client.publish_job(job).await.expect("published"));
            }
        }
        within(MINUTE, "two jobs started", async {
            for _ in 0..2 {
                events.next().await.expect("events");
            }
        })
        .await;
        // The two run for 4 s: whatever left the queues meanwhile is held by the agent.
        let ready = messages_in(&sys.names.jobs_queue("default")).await
            + messages_in(&sys.names.jobs_queue("other")).await;
        assert_eq!(
            6 - ready,
            2,
            "{kind:?} queues: the agent holds {} jobs with 2 workers",
            6 - ready
        );
        let mut beats = sys.heartbeats().await;
        within(
            Duration::from_secs(120),
            "every job recorded",
            sys.settled(&mut beats, "h1", &ids),
        )
        .await;
    }
}

/// `--prefetch` above the pool's size: the agent holds that many jobs, the ones without a
/// worker waiting here; when it stops, those go back to RabbitMQ without running, and another
/// agent runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_above_the_pool_holds_jobs_and_hands_back_the_unstarted_on_stop() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let mut first = sys.agent("h1", &["--pool-max-size", "2", "--prefetch", "4"]);
    sys.ready(true, &["h1"]).await;
    let mut events = sys
        .client
        .watch(&[EventKind::Started])
        .await
        .expect("watch");
    let mut ids = std::collections::HashSet::new();
    for _ in 0..6 {
        let job = Job::new("demo.sleep", json!({ "ms": 3000 }));
        ids.insert(sys.client.publish_job(job).await.expect("published"));
    }
    within(MINUTE, "two jobs started", async {
        for _ in 0..2 {
            events.next().await.expect("events");
        }
    })
    .await;
    let queue = sys.names.jobs_queue("default");
    assert_eq!(6 - messages_in(&queue).await, 4, "h1 holds 4 jobs");
    first.terminate().await.expect("h1 stops");
    assert_eq!(
        messages_in(&queue).await,
        4,
        "the two running finished, the two waiting went back"
    );
    let _second = sys.agent("h2", &["--pool-max-size", "4"]);
    let mut beats = sys.heartbeats().await;
    within(
        Duration::from_secs(120),
        "every job recorded",
        sys.settled(&mut beats, "h2", &ids),
    )
    .await;
    let mut ran_on_h1 = 0;
    for job in sys.list_all(None).await.expect("list") {
        if ids.contains(&job.uuid) {
            assert_eq!(job.state, JobState::Succeeded, "{job:?}");
            let agents: Vec<_> = job
                .attempts
                .iter()
                .filter_map(|a| a.agent.as_ref())
                .collect();
            assert_eq!(agents.len(), 1, "each job ran once: {job:?}");
            ran_on_h1 += usize::from(agents[0].as_str() == "h1");
        }
    }
    assert_eq!(ran_on_h1, 2, "h1 ran only the jobs it had workers for");
}

/// Classic queues order jobs by priority, 0 to 9, on every broker. Quorum queues refuse
/// `x-max-priority`: RabbitMQ 4.0 gives them two levels (5-9 before 0-4, two for one, so the
/// lower level is never starved), RabbitMQ 3's none (first in, first out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_are_what_each_queue_type_offers() {
    let v4 = major().await >= 4;
    for (kind, want) in [
        (QueueType::Classic, [9, 9, 9, 0, 0, 0]),
        (
            QueueType::Quorum,
            if v4 {
                [9, 9, 0, 9, 0, 0]
            } else {
                [0, 0, 0, 9, 9, 9]
            },
        ),
    ] {
        let sys = System::on(&amqp_url(), kind).await;
        let mut priority = std::collections::HashMap::new();
        for p in [0, 0, 0, 9, 9, 9] {
            let mut job = Job::new("demo.echo", json!({}));
            job.priority = Some(p);
            priority.insert(sys.client.publish_job(job).await.expect("published"), p);
        }
        // One worker: the jobs end in the order they were delivered in.
        let mut events = sys.finished_events().await;
        let _scheduler = sys.scheduler();
        let _agent = sys.agent("p1", &["--pool-max-size", "1"]);
        let mut order = Vec::new();
        within(MINUTE, "six jobs finished", async {
            while order.len() < 6 {
                let e = events.next().await.expect("events");
                order.push(priority[&e.uuid]);
            }
        })
        .await;
        assert_eq!(
            order, want,
            "{kind:?} queues: the order jobs of priority 0 and 9 ran in"
        );
    }
}

/// A job delivered [`DELIVERY_LIMIT`] times before (its agents kept dying) is not run again:
/// it is dead-lettered with a reason, and its uuid gets a `rejected` result, before RabbitMQ 4
/// would drop it from its quorum queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_at_the_delivery_limit_is_dead_lettered_with_a_rejected_result() {
    let sys = System::on(&amqp_url(), QueueType::Quorum).await;
    let mut job = Job::new("demo.echo", json!({}));
    let uuid = JobId::random();
    job.uuid = Some(uuid);
    sys.client.publish_job(job).await.expect("published");
    // Each return counts as a failed delivery, as a dying agent's would.
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    let queue = sys.names.jobs_queue("default");
    for _ in 0..DELIVERY_LIMIT {
        let got = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get")
            .expect("the job is in its queue");
        got.delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .expect("returned");
    }
    let _ = conn.close(200, "bye".into()).await;
    let _scheduler = sys.scheduler();
    let agent = sys.agent("d1", &[]);
    let mut beats = sys.heartbeats().await;
    let record = within(MINUTE, "the job recorded", async {
        loop {
            if let Ok(r) = sys.client.status(uuid).await
                && r.state.is_final()
            {
                return r;
            }
            sys.heartbeat_where(&mut beats, Role::Agent, "d1", |_| true)
                .await;
        }
    })
    .await;
    assert_eq!(record.state, JobState::Rejected, "{record:?}");
    let attempt = &record.attempts[0];
    assert_eq!(attempt.status, Some(Status::Rejected));
    let error = attempt.error.as_ref().expect("a reason");
    assert_eq!(error.kind, "delivery_limit");
    assert!(
        error.message.contains("delivered 20 times"),
        "{}",
        error.message
    );
    assert_eq!(messages_in(&sys.names.dead()).await, 1, "dead-lettered");
    assert!(
        agent.output().contains("refusing a job"),
        "{}",
        agent.output()
    );
}

/// RabbitMQ cancels a consumer (`basic.cancel`) when its queue is deleted, when a quorum
/// consumer exceeds its timeout (4.3) or when a queue's leader moves: the agent says so and
/// consumes the queue again, on the same channel (or, should that fail, on a new connection:
/// a quorum queue being deleted may still accept the declaration that precedes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_cancelled_by_the_broker_is_made_again() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let agent = sys.agent("c1", &[]);
    sys.ready(true, &["c1"]).await;
    let queue = sys.names.jobs_queue("default");
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("the jobs queue deleted");
    let _ = conn.close(200, "bye".into()).await;
    let mut beats = sys.heartbeats().await;
    within(MINUTE, "the agent consuming its queue again", async {
        loop {
            let log = agent.output();
            if log.contains(&format!("consuming queue {queue} again"))
                || log.contains("reconnected to RabbitMQ")
            {
                break;
            }
            sys.heartbeat_where(&mut beats, Role::Agent, "c1", |_| true)
                .await;
        }
    })
    .await;
    let log = agent.output();
    assert!(
        log.contains(&format!("RabbitMQ cancelled the consumer of queue {queue}")),
        "{log}"
    );
    let (code, rec) = sys
        .submit_wait(&["--type", "demo.echo", "--payload", "{\"again\": 1}"])
        .await;
    assert_eq!(code, Some(0), "{rec}");
}
