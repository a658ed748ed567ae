//! The job pipeline end to end: producers → RabbitMQ → pool agent → results → scheduler.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rota_tests::wire::{EventKind, Job, JobId, JobState, RpcReply, RpcRequest, Status};
use rota_tests::{System, amqp_url, dead_letters, dead_reason, messages_in, within};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_jobs_are_each_recorded_exactly_once_with_their_logs() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &["--pool-max-size", "16"]);
    let mut finished = sys.finished_events().await;
    let n = 1000;
    let mut ids = HashSet::new();
    for i in 0..n {
        let mut job = Job::new("demo.log", json!({ "lines": 2 }));
        job.labels.insert("i".into(), i.to_string());
        let record = sys.client.submit(job).await.expect("submitted");
        assert_eq!(record.state, JobState::Queued);
        ids.insert(record.uuid);
    }
    let mut events: HashMap<JobId, u32> = HashMap::new();
    within(2 * MINUTE, "1000 finished events", async {
        while events.len() < n {
            let e = finished.next().await.expect("events");
            if ids.contains(&e.uuid) {
                *events.entry(e.uuid).or_default() += 1;
                assert_eq!(e.status, Some(Status::Succeeded));
            }
        }
    })
    .await;
    let mut beats = sys.heartbeats().await;
    within(
        MINUTE,
        "the agent to settle",
        sys.settled(&mut beats, "a1", &ids),
    )
    .await;

    let jobs = sys.list_all(None).await.expect("list");
    assert_eq!(jobs.len(), n, "one record per job");
    for record in &jobs {
        assert!(ids.contains(&record.uuid));
        assert_eq!(record.state, JobState::Succeeded);
        assert_eq!(
            record.attempts.len(),
            1,
            "exactly one run recorded for {}",
            record.uuid
        );
        assert_eq!(record.attempts[0].log_lines, 2);
        assert!(
            std::path::Path::new(&record.dir)
                .join("attempt-1/logs.txt")
                .exists()
        );
    }
    assert!(
        events.values().all(|&c| c == 1),
        "one finished event per job"
    );
    let some = jobs[0].uuid;
    let RpcReply::Logs { attempts, .. } = sys
        .client
        .call(&RpcRequest::Logs {
            uuid: some,
            cursor: None,
            limit: None,
        })
        .await
        .expect("logs")
    else {
        panic!("wrong reply")
    };
    let lines: Vec<&str> = attempts[0]
        .lines
        .iter()
        .map(|l| l.message.as_str())
        .collect();
    assert_eq!(lines, ["log line 1 of 2", "log line 2 of 2"]);
}

/// Many producers publishing at once to a queue that does not exist yet: every job lands
/// (the first publish declares the queue; the others wait for that, not fail as unroutable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_publishes_to_a_new_queue_all_land() {
    let sys = System::new().await;
    let publishes = (0..200).map(|i| {
        let mut job = Job::new("demo.echo", json!({ "i": i }));
        job.queue = Some("other".into());
        sys.client.publish_job(job)
    });
    let results = futures::future::join_all(publishes).await;
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of 200 publishes failed, the first with: {}",
        failed.len(),
        failed[0]
    );
    assert_eq!(messages_in(&sys.names.jobs_queue("other")).await, 200);
}

/// A busy agent sends several results in one message: 500 queued jobs drained by one agent
/// are all recorded once, in fewer result messages than results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_agent_sends_its_results_in_groups() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let mut finished = sys.finished_events().await;
    let n = 500;
    let publishes = (0..n).map(|i| {
        sys.client
            .publish_job(Job::new("demo.echo", json!({ "i": i })))
    });
    let ids: HashSet<JobId> = futures::future::join_all(publishes)
        .await
        .into_iter()
        .map(|r| r.expect("RabbitMQ confirms the job"))
        .collect();
    let [addr] = rota_tests::free_addrs();
    let _agent = sys.agent("g1", &["--pool-max-size", "16", "--http-addr", &addr]);
    let mut seen = HashSet::new();
    within(2 * MINUTE, "500 finished events", async {
        while seen.len() < n {
            let e = finished.next().await.expect("events");
            if ids.contains(&e.uuid) {
                assert!(seen.insert(e.uuid), "one finished event per job");
            }
        }
    })
    .await;
    let jobs = sys.list_all(None).await.expect("list");
    assert_eq!(jobs.len(), n, "one record per job");
    assert!(jobs.iter().all(|j| j.attempts.len() == 1));
    let (_, text) = rota_tests::http_get(&addr, "/metrics")
        .await
        .expect("the agent's metrics");
    let (results, messages) = (
        rota_tests::metric(&text, "rota_results_sent_total"),
        rota_tests::metric(&text, "rota_result_messages_sent_total"),
    );
    assert!(results >= n as u64, "{results} results sent:\n{text}");
    assert!(
        messages < results,
        "{results} results went in {messages} messages: none in a group"
    );
    println!("{results} results in {messages} messages");
}

/// `scheduler bench`, which the README's figures come from, runs through and prints them,
/// with where the slowest jobs' time went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_prints_throughput_latency_and_memory() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("b1", &["--pool-max-size", "8"]);
    sys.ready(true, &["b1"]).await;
    let out = sys
        .cli(&["bench", "--jobs", "300", "--timeout", "60s"])
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("jobs:        300 via Direct (0 failed)"),
        "{stdout}"
    );
    assert!(stdout.contains("jobs/s end to end"), "{stdout}");
    assert!(stdout.contains("latency:     p50"), "{stdout}");
    // 300 jobs: their slowest 1% are 3, looked up in the scheduler.
    assert!(
        stdout.contains("slowest 1%:  submit → start") && stdout.contains("(medians over 3 jobs)"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("peak RSS:").count(), 2, "{stdout}");
}

/// A watch can race other futures in `select!` without losing an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_watched_in_a_select_loop_are_all_seen() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("w1", &["--pool-max-size", "8"]);
    sys.ready(true, &["w1"]).await;
    let mut finished = sys.finished_events().await;
    let mut ids = HashSet::new();
    for i in 0..500 {
        let job = Job::new("demo.echo", json!({ "i": i }));
        ids.insert(sys.client.publish_job(job).await.expect("published"));
    }
    let mut tick = tokio::time::interval(Duration::from_micros(50));
    within(MINUTE, "a finished event for every job", async {
        while !ids.is_empty() {
            tokio::select! {
                event = finished.next() => { ids.remove(&event.expect("events").uuid); }
                _ = tick.tick() => {}
            }
        }
    })
    .await;
}

/// `job.started` is announced only for a job still running after the agent's
/// `--started-delay`: a short job is recorded from its result alone, with its start time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_jobs_that_run_past_the_started_delay_announce_their_start() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("d1", &["--started-delay", "200ms"]);
    sys.ready(true, &["d1"]).await;
    let mut events = sys
        .client
        .watch(&[EventKind::Started, EventKind::Finished])
        .await
        .expect("watch");
    let short = sys
        .client
        .publish_job(Job::new("demo.echo", json!("short")))
        .await
        .expect("published");
    let long = sys
        .client
        .publish_job(Job::new("demo.sleep", json!({"ms": 1000})))
        .await
        .expect("published");
    let mut started = Vec::new();
    let mut finished = HashSet::new();
    within(MINUTE, "both jobs finished", async {
        // The long job finishes last, long after any start of the short one was announced.
        while !finished.contains(&long) {
            let e = events.next().await.expect("events");
            match e.event {
                EventKind::Started => started.push(e.uuid),
                EventKind::Finished => {
                    finished.insert(e.uuid);
                }
                EventKind::Progress => {}
            }
        }
    })
    .await;
    assert!(finished.contains(&short), "the short job was recorded");
    assert_eq!(started, vec![long], "only the long job announced its start");
    let record = sys.client.status(short).await.expect("status");
    assert_eq!(record.state, JobState::Succeeded);
    assert!(record.attempts[0].started_at.is_some(), "{record:?}");
}

/// A producer in any language: plain AMQP, no Rota code, no uuid, the seed's `classname`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_published_with_plain_amqp_are_run_and_recorded() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    let mut finished = sys.finished_events().await;
    sys.ready(true, &["a1"]).await;

    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    let bodies = [
        r#"{"type":"demo.echo","payload":{"from":"plain amqp"}}"#,
        r#"{"classname":"demo.echo","payload":{"from":"classname"}}"#,
    ];
    for body in bodies {
        ch.basic_publish(
            sys.names.jobs_exchange().as_str().into(),
            "default".into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .expect("publishes");
    }
    let mut seen = Vec::new();
    within(MINUTE, "both jobs finished", async {
        while seen.len() < 2 {
            let e = finished.next().await.expect("events");
            assert_eq!(e.status, Some(Status::Succeeded));
            seen.push(e.uuid);
        }
    })
    .await;
    let mut outputs = HashSet::new();
    for uuid in seen {
        let record = sys.client.status(uuid).await.expect("recorded");
        assert_eq!(record.state, JobState::Succeeded);
        assert_eq!(record.job.work_type, "demo.echo");
        outputs.insert(
            record.attempts[0].output["from"]
                .as_str()
                .expect("echoed")
                .to_owned(),
        );
    }
    assert_eq!(
        outputs,
        HashSet::from(["plain amqp".to_owned(), "classname".to_owned()])
    );
    let _ = conn.close(200, "bye".into()).await;
}

/// Unreadable jobs land in the dead-letter queue with their reason; the agent goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_are_dead_lettered_with_a_reason_and_the_agent_survives() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let agent = sys.agent("a1", &["--max-job-timeout", "1h"]);
    let mut finished = sys.finished_events().await;
    sys.ready(true, &["a1"]).await;

    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    let unknown_uuid = JobId::random();
    let long_uuid = JobId::random();
    let huge = format!(
        r#"{{"type":"demo.echo","payload":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{this is not json".to_vec(), "not a valid job"),
        (br#"{"payload":{"a":1}}"#.to_vec(), "missing field `type`"),
        (
            format!(r#"{{"type":"no.such.work","uuid":"{unknown_uuid}"}}"#).into_bytes(),
            "unknown work type \"no.such.work\"",
        ),
        (
            format!(r#"{{"type":"demo.echo","uuid":"{long_uuid}","timeout_s":7200}}"#).into_bytes(),
            "longer than this agent's limit",
        ),
        (
            huge.into_bytes(),
            "over this agent's limit of 1048576 bytes",
        ),
    ];
    for (body, _) in &cases {
        ch.basic_publish(
            sys.names.jobs_exchange().as_str().into(),
            "default".into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .expect("publishes");
    }
    let mut dead = dead_letters(&ch, &sys.names).await;
    let mut reasons = Vec::new();
    within(MINUTE, "five dead letters", async {
        while reasons.len() < cases.len() {
            let d = dead.next().await.expect("dead letters").expect("delivery");
            reasons.push(dead_reason(&d).expect("a reason header"));
        }
    })
    .await;
    for (_, want) in &cases {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "no dead letter says {want:?}: {reasons:?}"
        );
    }
    // The two with a uuid are also recorded as rejected.
    let mut rejected = HashSet::new();
    within(MINUTE, "two rejected results", async {
        while rejected.len() < 2 {
            let e = finished.next().await.expect("events");
            assert_eq!(e.status, Some(Status::Rejected));
            rejected.insert(e.uuid);
        }
    })
    .await;
    assert_eq!(rejected, HashSet::from([unknown_uuid, long_uuid]));
    let record = sys.client.status(unknown_uuid).await.expect("recorded");
    assert!(
        record.attempts[0]
            .error
            .as_ref()
            .expect("error")
            .message
            .contains("unknown work type")
    );

    // And the agent still works.
    let mut job = Job::new("demo.echo", json!("still alive"));
    job.uuid = Some(JobId::random());
    let uuid = job.uuid.expect("set");
    sys.client.submit(job).await.expect("submits");
    let e = rota_tests::event_of(&mut finished, uuid).await;
    assert_eq!(e.status, Some(Status::Succeeded));
    assert!(
        agent.output().contains("refusing a job"),
        "the agent logs its refusals"
    );
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_with_the_same_id_is_refused_with_a_clear_message() {
    let sys = System::new().await;
    let _first = sys.agent("twin", &[]);
    sys.ready(false, &["twin"]).await;
    // Another data folder, so it is the broker that refuses it (another host, say).
    let other = sys.dir.path().join("other");
    let mut second = sys.agent("twin", &["--data-dir", &other.display().to_string()]);
    let status = within(MINUTE, "the second agent to exit", second.exited())
        .await
        .expect("exits");
    assert!(!status.success());
    let out = second.output();
    assert!(
        out.contains("another pool agent with id \"twin\" is already connected"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_submits_waits_and_shows_status_logs_list_and_agents() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("cli-agent", &[]);

    let (code, record) = sys
        .submit_wait(&["--type", "demo.log", "--payload", r#"{"lines":3}"#])
        .await;
    assert_eq!(code, Some(0));
    assert_eq!(record["state"], "succeeded");
    let uuid = record["uuid"].as_str().expect("uuid").to_owned();

    let out = sys
        .cli(&[
            "submit",
            "--type",
            "demo.fail",
            "--payload",
            r#"{"message":"nope"}"#,
            "--wait",
        ])
        .await;
    assert_eq!(out.status.code(), Some(1), "a failed job exits 1");
    assert!(String::from_utf8_lossy(&out.stdout).contains("nope"));

    let out = sys.cli(&["status", &uuid]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("succeeded") && text.contains("demo.log"),
        "{text}"
    );

    let out = sys.cli(&["logs", &uuid]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("log line 3 of 3"));

    let out = sys.cli(&["list", "--status", "failed", "--json"]).await;
    let jobs: Value = serde_json::from_slice(&out.stdout).expect("JSON list");
    assert_eq!(jobs.as_array().expect("array").len(), 1);

    let out = sys.cli(&["agents", "--json"]).await;
    let agents: Value = serde_json::from_slice(&out.stdout).expect("JSON agents");
    let ids: Vec<&str> = agents
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|a| a["heartbeat"]["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"cli-agent") && ids.contains(&"scheduler"),
        "{ids:?}"
    );

    let out = sys
        .cli(&["status", "00000000-0000-0000-0000-000000000000"])
        .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("no job 00000000-0000-0000-0000-000000000000 is recorded")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_says_what_to_do_when_no_scheduler_answers() {
    let sys = System::new().await;
    let mut client_cmd = tokio::process::Command::new(rota_tests::bin("scheduler"));
    client_cmd
        .args(["list", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/%2f"])
        .env("ROTA_NAMESPACE", sys.names.namespace());
    let out = client_cmd.output().await.expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach RabbitMQ") && err.contains("deploy/setup.sh"),
        "{err}"
    );
}

/// Another service calls the scheduler over RPC with plain AMQP and RabbitMQ's direct
/// reply-to, as a service in any language would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_services_can_submit_over_rpc_with_direct_reply_to() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    sys.ready(true, &["a1"]).await;
    let mut finished = sys.finished_events().await;

    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    let consume = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut replies = ch
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "rpc".into(),
            consume,
            FieldTable::default(),
        )
        .await
        .expect("direct reply-to");
    let request =
        json!({"method": "submit", "job": {"type": "demo.echo", "payload": {"via": "rpc"}}});
    let props = rota_tests::admin_props()
        .with_reply_to("amq.rabbitmq.reply-to".into())
        .with_correlation_id("req-1".into());
    ch.basic_publish(
        "".into(),
        sys.names.rpc().as_str().into(),
        BasicPublishOptions::default(),
        &serde_json::to_vec(&request).expect("json"),
        props,
    )
    .await
    .expect("publishes");
    let reply = within(MINUTE, "the scheduler's reply", replies.next())
        .await
        .expect("stream")
        .expect("delivery");
    assert_eq!(
        reply
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("req-1")
    );
    let reply: Value = serde_json::from_slice(&reply.data).expect("JSON reply");
    assert_eq!(reply["reply"], "job");
    assert_eq!(reply["job"]["state"], "queued");
    let uuid: JobId = reply["job"]["uuid"]
        .as_str()
        .expect("uuid")
        .parse()
        .expect("a uuid");
    let e = rota_tests::event_of(&mut finished, uuid).await;
    assert_eq!(e.status, Some(Status::Succeeded));
    let _ = conn.close(200, "bye".into()).await;
}
