//! The fault suite: the faults that production brings (a cut or black-holed connection, the
//! broker closing a connection, a result over the broker's `max_message_size`, a full disk,
//! forged and garbage input, kill -9 of an agent or the scheduler), injected while jobs run,
//! and counted per job as Jepsen does: lost, recorded twice, runs (see `rota_tests::faults`).
//!
//! The bar: 0 lost, 0 recorded twice, at most 1 run on an agent that survived, at most 2 runs
//! when an agent was killed mid-job. The default run makes a few injections of each fault; the
//! soak makes 20 of each (`ROTA_FAULT_SOAK=N` sets the number for every test) and prints the
//! tally table:
//!
//! ```text
//! ROTA_FAULT_SOAK=20 cargo test -p rota-tests --test faults -- --ignored --nocapture soak
//! ```

use std::time::Duration;

use futures::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::{Connection, ConnectionProperties};
use rota_tests::faults::{
    FullDisk, Ledger, MaxMessageSize, Relay, Tally, close_connection_of, injections,
};
use rota_tests::wire::{Job, JobId, JobState, Role};
use rota_tests::{
    Proc, System, alive, amqp_url, bin, dead_letters, dead_reason, free_addrs, http_get,
    probe_within, within,
};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// The flags of an agent whose `process` workers run the tests' runtime (which has
/// `probe.count`), `size` at most, its runs counted in its own folder.
fn counting_pool(ledger: &mut Ledger, sys: &System, id: &str, size: usize) -> Vec<String> {
    let runtime = bin("test-runtime").display().to_string();
    [
        "--worker-location",
        "process",
        "--worker-runtime",
        &runtime,
        "--pool-max-size",
        &size.to_string(),
        "--alias",
        &ledger.runs_alias(sys, id),
    ]
    .map(str::to_owned)
    .to_vec()
}

fn start_agent(sys: &System, id: &str, flags: &[String]) -> Proc {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    sys.agent(id, &flags)
}

/// Which side of the connection ends it.
#[derive(Debug, Clone, Copy)]
enum Break {
    /// The relay resets it (a network blip, a load balancer restarting).
    Cut,
    /// The broker closes it (`DELETE /api/connections/…`: a failover, an operator).
    BrokerClose,
}

/// An agent's connection broken while `process` jobs run on it: each job runs once on that
/// agent (a redelivery after the reconnect joins the run already going) and is recorded once.
async fn agent_connection_broken(how: Break, n: usize) -> Tally {
    let sys = System::new().await;
    let mut ledger = Ledger::new(&sys).await;
    let relay = Relay::to_broker().await;
    let _scheduler = sys.scheduler();
    let mut flags = counting_pool(&mut ledger, &sys, "c1", 4);
    flags.extend(["--amqp-url".to_owned(), relay.url()]);
    let agent = start_agent(&sys, "c1", &flags);
    sys.ready(true, &["c1"]).await;
    let mut tally = Tally::new(match how {
        Break::Cut => "agent connection reset (relay)",
        Break::BrokerClose => "agent connection closed by the broker",
    });
    for i in 0..n {
        // By turns a full pool (redeliveries wait for a worker) and one with room (they can
        // start at once): the two fail in different ways.
        let jobs = if i % 2 == 0 { 4 } else { 2 };
        let ids = ledger.publish_counted(&sys, jobs, 3_000).await;
        ledger.started(&ids, MINUTE).await;
        let before = relay.accepted();
        match how {
            Break::Cut => relay.cut(),
            Break::BrokerClose => assert_eq!(close_connection_of(agent.pid()).await, 1),
        }
        relay.await_accepted(before + 1, MINUTE).await;
        tally.injections += 1;
        if !ledger.recorded(&sys, MINUTE).await {
            break;
        }
    }
    ledger.settle(&sys, &["c1"], MINUTE).await;
    ledger.tally_into(&sys, &mut tally).await;
    tally
}

/// The agent's connection black-holed (no byte, no FIN) while jobs run: its AMQP heartbeat
/// notices and it reconnects; RabbitMQ redelivers the jobs once it notices too, and they join
/// the runs already going.
async fn agent_connection_blackholed(n: usize) -> Tally {
    let sys = System::new().await;
    let mut ledger = Ledger::new(&sys).await;
    let relay = Relay::to_broker().await;
    let _scheduler = sys.scheduler();
    let mut flags = counting_pool(&mut ledger, &sys, "b1", 8);
    flags.extend(["--amqp-url".to_owned(), relay.url()]);
    let _agent = start_agent(&sys, "b1", &flags);
    sys.ready(true, &["b1"]).await;
    let mut tally = Tally::new("agent connection black-holed");
    for _ in 0..n {
        // Long enough to be running still when the broker's heartbeat (2 s) gives up on the
        // old connection and redelivers them.
        let ids = ledger.publish_counted(&sys, 4, 10_000).await;
        ledger.started(&ids, MINUTE).await;
        let before = relay.accepted();
        relay.blackhole(true);
        // A new connection: the agent's heartbeat noticed the silence.
        relay.await_accepted(before + 1, MINUTE).await;
        relay.blackhole(false);
        tally.injections += 1;
        if !ledger.recorded(&sys, 2 * MINUTE).await {
            break;
        }
    }
    ledger.settle(&sys, &["b1"], MINUTE).await;
    ledger.tally_into(&sys, &mut tally).await;
    tally
}

/// The broker closes the scheduler's connection while results come in: each job is recorded
/// once, nothing is lost, nothing runs twice.
async fn scheduler_connection_closed(n: usize) -> Tally {
    let sys = System::new().await;
    let mut ledger = Ledger::new(&sys).await;
    let relay = Relay::to_broker().await;
    let url = relay.url();
    let scheduler = sys.scheduler_with(&["--amqp-url", &url]);
    let flags = counting_pool(&mut ledger, &sys, "s1", 4);
    let _agent = start_agent(&sys, "s1", &flags);
    sys.ready(true, &["s1"]).await;
    let mut tally = Tally::new("scheduler connection closed by the broker");
    for _ in 0..n {
        // Some finish before the close, some while the scheduler is away, some after.
        let mut ids = ledger.publish_counted(&sys, 2, 300).await;
        ids.extend(ledger.publish_counted(&sys, 2, 1_500).await);
        ledger.started(&ids, MINUTE).await;
        let before = relay.accepted();
        assert_eq!(close_connection_of(scheduler.pid()).await, 1);
        relay.await_accepted(before + 1, MINUTE).await;
        tally.injections += 1;
        if !ledger.recorded(&sys, MINUTE).await {
            break;
        }
    }
    ledger.settle(&sys, &["s1"], MINUTE).await;
    ledger.tally_into(&sys, &mut tally).await;
    tally
}

/// Results bigger than the broker's `max_message_size` (lowered to 1 MiB for the agent's
/// channels): each job ends with a final recorded state (failed with an error kind, or
/// succeeded with the overflow moved to a file), and the agent does not reconnect in a loop.
async fn oversized_results(n: usize) -> Tally {
    let sys = System::new().await;
    let mut ledger = Ledger::new(&sys).await;
    // The scheduler's channels open before the limit is lowered: only the agent's publishes
    // meet it.
    let _scheduler = sys.scheduler();
    sys.ready(true, &[]).await;
    let relay = Relay::to_broker().await;
    let [http] = free_addrs::<1>();
    let mut flags = counting_pool(&mut ledger, &sys, "m1", 2);
    flags.extend(
        [
            "--amqp-url",
            &relay.url(),
            "--max-job-bytes",
            "8388608",
            "--http-addr",
            &http,
        ]
        .map(str::to_owned),
    );
    let pad = "x".repeat(1536 * 1024);
    let mut tally = Tally::new("result over max_message_size (1 MiB)");
    let mut ids = Vec::new();
    for _ in 0..n {
        // A result carries the job again (and `demo.echo`'s output is its payload too).
        let mut counted = Ledger::count_job(0);
        counted.payload["pad"] = json!(pad);
        ids.push(ledger.publish(&sys, counted).await);
        ids.push(
            ledger
                .publish(&sys, Job::new("demo.echo", json!({ "pad": pad })))
                .await,
        );
    }
    let limit = MaxMessageSize::lower_to(MaxMessageSize::FLOOR);
    let _agent = start_agent(&sys, "m1", &flags);
    // Kept lowered until the jobs are recorded (or 30 s): the agent's reconnects would
    // otherwise open channels without it.
    let recorded = ledger.recorded(&sys, Duration::from_secs(30)).await;
    drop(limit);
    tally.injections = n;
    let connections = relay.accepted();
    let metrics = http_get(&http, "/metrics").await.map(|(_, b)| b);
    let reconnects = metrics.as_deref().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("rota_broker_reconnects"))
            .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
    });
    let records = Ledger::records(&sys).await;
    for id in &ids {
        let Some(r) = records.get(id) else { continue };
        let error = r.attempts.last().and_then(|a| a.error.as_ref());
        if r.state != JobState::Succeeded
            && r.state.is_final()
            && !error.is_some_and(|e| !e.kind.is_empty() && !e.message.is_empty())
        {
            tally.problem(format!(
                "{id} ended {} without an error that says why: {error:?}",
                r.state
            ));
        }
    }
    if connections > 3 {
        tally.problem(format!(
            "the agent connected {connections} times ({reconnects:?} reconnects in /metrics) for \
             {} oversized results (recorded within 30 s: {recorded}): a reconnect loop",
            ids.len()
        ));
    }
    ledger.settle(&sys, &["m1"], MINUTE).await;
    ledger.tally_into(&sys, &mut tally).await;
    tally
}

/// A full disk under the agent's data folder: `/readyz` answers 503 with a reason, no job runs
/// again and again, the agent resumes by itself once space is freed, nothing is lost.
async fn full_disk(n: usize) -> Tally {
    let sys = System::new().await;
    let mut ledger = Ledger::new(&sys).await;
    let _scheduler = sys.scheduler();
    let disk = FullDisk::mount(&sys.data_dir().join("agent-d1"), 64 * 1024 * 1024);
    let [http] = free_addrs::<1>();
    let mut flags = counting_pool(&mut ledger, &sys, "d1", 2);
    flags.extend(["--http-addr".to_owned(), http.clone()]);
    let agent = start_agent(&sys, "d1", &flags);
    sys.ready(true, &["d1"]).await;
    let mut tally = Tally::new("full disk under the agent's data dir");
    let mut published = 0;
    for _ in 0..n {
        let filled = disk.fill();
        assert!(filled > 0 && disk.available() == 0, "the tmpfs is full");
        for _ in 0..4 {
            // Results of 256 KiB need fresh pages: a few small ones could still fit in pages
            // the outbox's files hold already, and a full disk would not show.
            let mut job = Ledger::count_job(200);
            job.payload["pad"] = json!("x".repeat(256 * 1024));
            ledger.publish(&sys, job).await;
            published += 1;
        }
        let not_ready = probe_within(&http, "/readyz", 503, Duration::from_secs(30)).await;
        let runs: usize = ledger.runs().values().map(Vec::len).sum();
        match not_ready {
            None => tally.problem(format!(
                "/readyz never answered 503 while the disk was full ({runs} runs of {published} \
                 jobs by then; agent alive: {})",
                alive(agent.pid())
            )),
            Some(why) => {
                let why = why.to_lowercase();
                if !["disk", "space", "write", "store", "outbox"]
                    .iter()
                    .any(|w| why.contains(w))
                {
                    tally.problem(format!("/readyz does not say why it is not ready: {why:?}"));
                }
            }
        }
        disk.free();
        tally.injections += 1;
        if probe_within(&http, "/readyz", 200, MINUTE).await.is_none() {
            tally.problem("/readyz not 200 within a minute of the space being freed");
        }
        // Once space is back every job must end, whatever happened while the disk was full.
        if !ledger.recorded(&sys, MINUTE).await || !tally.problems.is_empty() {
            break;
        }
    }
    ledger.settle(&sys, &["d1"], MINUTE).await;
    ledger.tally_into(&sys, &mut tally).await;
    let runs: usize = ledger.runs().values().map(Vec::len).sum();
    // Each job at most once, plus one more run for each of the pool's 2 workers per fill.
    if runs > published + 2 * tally.injections {
        tally.problem(format!(
            "{runs} runs for {published} jobs: jobs ran again and again while the disk was full"
        ));
    }
    tally
}

/// The bar of a full disk: a job whose result could not be stored may run once more after
/// the space is back, on the same agent.
const FULL_DISK_BAR: &str = "no other failure, 0 lost, 0 recorded twice, ≤ 2 runs";

fn full_disk_bar(t: &Tally) -> bool {
    t.problems.is_empty() && t.lost == 0 && t.recorded_twice == 0 && t.max_runs <= 2
}

/// Forged and garbage messages on the agent's own queue and on the jobs queue: the agent stays
/// up, dead-letters the bad jobs with a reason, keeps taking receipts, and runs good jobs after.
async fn forged_input(n: usize) -> Tally {
    let sys = System::new().await;
    let mut ledger = Ledger::new(&sys).await;
    let scheduler = sys.scheduler();
    let flags = counting_pool(&mut ledger, &sys, "f1", 2);
    let agent = start_agent(&sys, "f1", &flags);
    sys.ready(true, &["f1"]).await;
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("a channel");
    let mut dead = dead_letters(&ch, &sys.names).await;
    let publish = async |exchange: &str, key: &str, body: &[u8], id: &str| {
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            rota_tests::admin_props().with_message_id(id.into()),
        )
        .await
        .expect("published")
        .await
        .expect("confirmed");
    };
    let mut tally = Tally::new("forged and garbage input");
    let agent_queue = sys.names.agent_queue("f1");
    let jobs = sys.names.jobs_exchange();
    let runs_file = json!({ "file": "runs/runs.log", "ms": 0 });
    for round in 0..n {
        // On the agent's own queue: receipts and cancels for jobs it never saw, wrong types,
        // garbage, a huge string.
        let u = JobId::random();
        let forged = [
            json!({"kind": "receipt", "uuid": u, "attempt": 1}).to_string(),
            json!({"kind": "receipt", "uuid": u, "attempt": u32::MAX}).to_string(),
            json!({"kind": "receipt", "uuid": u, "attempt": u64::MAX}).to_string(),
            json!({"kind": "cancel", "uuid": JobId::random()}).to_string(),
            json!({"kind": "receipt", "uuid": 12}).to_string(),
            json!({"kind": "receipt"}).to_string(),
            json!({"kind": "explode", "uuid": u}).to_string(),
            // Under the 1 MiB that a parallel fault test may set as the broker's limit.
            json!({"kind": "receipt", "uuid": "a".repeat(512 * 1024), "attempt": 1}).to_string(),
            "\u{0}\u{ff} garbage".to_owned(),
            "[".repeat(10_000),
        ];
        for (i, body) in forged.iter().enumerate() {
            publish(
                "",
                &agent_queue,
                body.as_bytes(),
                &format!("forged-{round}-{i}"),
            )
            .await;
        }
        // On the jobs queue, without a uuid: dead-lettered with a reason.
        let deep = format!(
            r#"{{"type":"probe.count","payload":{}{}}}"#,
            "[".repeat(1_000),
            "]".repeat(1_000)
        );
        let unreadable = [
            b"\x00\xff not json at all".to_vec(),
            br#"{"type": 5}"#.to_vec(),
            br#"[1, 2, 3]"#.to_vec(),
            br#"{"type":"probe.count","attempt":-1}"#.to_vec(),
            br#"{"type":"probe.count","attempt":4294967296}"#.to_vec(),
            br#"{"type":"probe.count","priority":300}"#.to_vec(),
            br#"{"type":"probe.count","timeout_s":18446744073709551616}"#.to_vec(),
            deep.into_bytes(),
        ];
        let mut expect_dead = Vec::new();
        for (i, body) in unreadable.iter().enumerate() {
            let id = format!("bad-{round}-{i}");
            publish(&jobs, "default", body, &id).await;
            expect_dead.push(id);
        }
        // With a uuid, refused: dead-lettered, and the scheduler records them `rejected`.
        let refused = [
            json!({"type": "probe.count", "uuid": JobId::random(), "payload": runs_file,
                   "timeout_s": u64::MAX}),
            json!({"type": "no.such.work", "uuid": JobId::random()}),
        ];
        for (i, job) in refused.iter().enumerate() {
            let id = format!("refused-{round}-{i}");
            publish(&jobs, "default", job.to_string().as_bytes(), &id).await;
            expect_dead.push(id);
            ledger.accept(serde_json::from_value(job["uuid"].clone()).expect("a uuid"));
        }
        // Huge but valid numbers: each job ends recorded, run or refused, and no part falls.
        let huge = [
            json!({"type": "probe.count", "uuid": JobId::random(), "payload": runs_file,
                   "attempt": u32::MAX}),
            json!({"type": "probe.count", "uuid": JobId::random(), "payload": runs_file,
                   "max_attempts": u32::MAX, "backoff_ms": u64::MAX, "priority": 9}),
        ];
        for (i, job) in huge.iter().enumerate() {
            publish(
                &jobs,
                "default",
                job.to_string().as_bytes(),
                &format!("huge-{round}-{i}"),
            )
            .await;
            ledger.accept(serde_json::from_value(job["uuid"].clone()).expect("a uuid"));
        }
        // Retries that would count past u32::MAX or wait u64::MAX ms: the scheduler must not
        // fall (their final state is not asserted: a capped retry may be far off).
        for (i, job) in [
            json!({"type": "demo.fail", "attempt": u32::MAX, "max_attempts": u32::MAX}),
            json!({"type": "demo.fail", "max_attempts": 3, "backoff_ms": u64::MAX}),
        ]
        .iter()
        .enumerate()
        {
            publish(
                &jobs,
                "default",
                job.to_string().as_bytes(),
                &format!("retry-{round}-{i}"),
            )
            .await;
        }
        // And a good job after all that.
        ledger.publish(&sys, Ledger::count_job(0)).await;

        within(MINUTE, "every bad job dead-lettered with a reason", async {
            while !expect_dead.is_empty() {
                let d = dead
                    .next()
                    .await
                    .expect("the dead-letter consumer")
                    .expect("a dead letter");
                let id = d.properties.message_id().as_ref().map(|s| s.to_string());
                let reason = dead_reason(&d);
                let Some(id) = id.filter(|id| expect_dead.contains(id)) else {
                    continue;
                };
                assert!(
                    reason.as_ref().is_some_and(|r| !r.is_empty()),
                    "{id} dead-lettered without a reason: {reason:?}"
                );
                expect_dead.retain(|x| *x != id);
            }
        })
        .await;
        tally.injections += 1;
        if !ledger.recorded(&sys, MINUTE).await {
            break;
        }
    }
    // Still up and still itself: a job submitted now is recorded, receipts still empty the
    // outbox (settle), and neither process fell.
    let record = sys
        .client
        .submit(Ledger::count_job(0))
        .await
        .expect("the scheduler answers");
    ledger.accept(record.uuid);
    assert!(
        ledger.recorded(&sys, MINUTE).await,
        "a good job after the bad ones"
    );
    ledger.settle(&sys, &["f1"], MINUTE).await;
    assert!(alive(agent.pid()), "the agent is up:\n{}", agent.output());
    assert!(
        alive(scheduler.pid()),
        "the scheduler is up:\n{}",
        scheduler.output()
    );
    let _ = conn.close(200, "done".into()).await;
    ledger.tally_into(&sys, &mut tally).await;
    tally
}

/// Forged and garbage messages on what the scheduler consumes: the results queue, the RPC
/// queue, the heartbeats and events exchanges. The scheduler stays up, still answers, still
/// knows its agents, and records good jobs after.
async fn forged_scheduler_input(n: usize) -> Tally {
    let sys = System::new().await;
    let mut ledger = Ledger::new(&sys).await;
    let scheduler = sys.scheduler();
    let flags = counting_pool(&mut ledger, &sys, "g1", 2);
    let agent = start_agent(&sys, "g1", &flags);
    let mut beats = sys.heartbeats().await;
    within(
        MINUTE,
        "the scheduler seeing its agent",
        sys.scheduler_sees(&mut beats, "g1", true),
    )
    .await;
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("a channel");
    let publish = async |exchange: &str, key: &str, body: &[u8], reply_to: Option<&str>| {
        let mut props = rota_tests::admin_props().with_correlation_id("forged".into());
        if let Some(r) = reply_to {
            props = props.with_reply_to(r.into());
        }
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("published")
        .await
        .expect("confirmed");
    };
    let mut tally = Tally::new("forged and garbage input to the scheduler");
    let now = chrono::Utc::now();
    for _ in 0..n {
        let u = JobId::random();
        let job = json!({"type": "probe.count", "uuid": u});
        let result = |attempt: serde_json::Value, status: &str| {
            json!({"uuid": u, "attempt": attempt, "type": "probe.count", "agent": "nobody",
                   "worker": "w", "status": status, "started_at": now, "finished_at": now,
                   "job": job})
            .to_string()
        };
        let results = [
            result(json!(1), "succeeded"),
            result(json!(u32::MAX), "failed"),
            result(json!(-1), "succeeded"),
            result(json!(1), "exploded"),
            json!([result(json!(1), "succeeded"), 7, "x"]).to_string(),
            "\u{0}\u{ff} garbage".to_owned(),
            "[".repeat(10_000),
        ];
        for body in &results {
            publish("", &sys.names.results(), body.as_bytes(), Some("nowhere")).await;
        }
        let rpc = [
            "\u{0} garbage".to_owned(),
            json!({"method": "explode"}).to_string(),
            json!({"method": "list", "limit": u64::MAX}).to_string(),
            json!({"method": "list", "limit": -1}).to_string(),
            json!({"method": "status", "uuid": "not-a-uuid"}).to_string(),
            json!({"method": "logs", "uuid": JobId::random(), "attempt": u32::MAX}).to_string(),
            json!({"method": "submit", "job": {"type": "probe.count", "attempt": u32::MAX,
                   "max_attempts": u32::MAX, "backoff_ms": u64::MAX, "timeout_s": u64::MAX}})
            .to_string(),
        ];
        for body in &rpc {
            // A reply to a queue that does not exist is dropped by the broker: harmless.
            publish(
                "",
                &sys.names.rpc(),
                body.as_bytes(),
                Some("amq.rabbitmq.nowhere"),
            )
            .await;
            publish("", &sys.names.rpc(), body.as_bytes(), None).await;
        }
        let beats = [
            json!({"role": "agent", "id": "forged", "host": "h", "pid": 1, "version": "x",
                   "started_at": now, "seq": u64::MAX, "interval_ms": u64::MAX})
            .to_string(),
            json!({"role": "agent", "id": "forged0", "host": "h", "pid": 1, "version": "x",
                   "started_at": now, "seq": 0, "interval_ms": 0})
            .to_string(),
            json!({"role": "scheduler", "id": 5}).to_string(),
            "\u{0} garbage".to_owned(),
        ];
        for body in &beats {
            publish(&sys.names.heartbeats(), "", body.as_bytes(), None).await;
        }
        let events = [
            json!({"event": "started", "uuid": JobId::random(), "attempt": u32::MAX,
                   "type": "probe.count", "time": now, "job": {"type": "probe.count"}})
            .to_string(),
            json!({"event": "started", "uuid": 1, "attempt": 1}).to_string(),
            "\u{0} garbage".to_owned(),
        ];
        for body in &events {
            publish(
                &sys.names.events(),
                "job.started.probe.count",
                body.as_bytes(),
                None,
            )
            .await;
        }
        // A good job after all that, through RPC: the scheduler answers and records it.
        let record = within(MINUTE, "the scheduler answering a submit", async {
            loop {
                if let Ok(r) = sys.client.submit(Ledger::count_job(0)).await {
                    return r;
                }
            }
        })
        .await;
        ledger.accept(record.uuid);
        tally.injections += 1;
        if !ledger.recorded(&sys, MINUTE).await {
            break;
        }
    }
    match sys.client.call(&rota_tests::wire::RpcRequest::Agents).await {
        Ok(rota_tests::wire::RpcReply::Agents { agents }) => {
            if !agents.iter().any(|a| a.heartbeat.id == "g1" && a.alive) {
                tally.problem("the scheduler no longer sees its agent alive");
            }
        }
        other => tally.problem(format!("`agents` after forged heartbeats: {other:?}")),
    }
    ledger.settle(&sys, &["g1"], MINUTE).await;
    if !alive(scheduler.pid()) {
        tally.problem(format!("the scheduler fell:\n{}", scheduler.output()));
    }
    if !alive(agent.pid()) {
        tally.problem("the agent fell");
    }
    let _ = conn.close(200, "done".into()).await;
    ledger.tally_into(&sys, &mut tally).await;
    tally
}

/// kill -9 of the scheduler while jobs run (at a `started` event, or at a `finished` one),
/// restarted at once: nothing lost, each job recorded once and run once (the agent survives).
async fn scheduler_killed(n: usize) -> Tally {
    let sys = System::new().await;
    let mut ledger = Ledger::new(&sys).await;
    let mut scheduler = sys.scheduler();
    let flags = counting_pool(&mut ledger, &sys, "x1", 4);
    let _agent = start_agent(&sys, "x1", &flags);
    sys.ready(true, &["x1"]).await;
    let mut tally = Tally::new("scheduler kill -9 (mid-run, after a finish)");
    // Killed between announcing a batch and flushing it, it records and announces it again.
    tally.events_may_repeat = true;
    for i in 0..n {
        let ids = ledger
            .publish_counted(&sys, 4, 500 + 500 * (i as u64 % 3))
            .await;
        if i % 2 == 0 {
            ledger.started(&ids, MINUTE).await;
        } else {
            ledger.next_finished_from("x1", MINUTE).await;
        }
        scheduler.kill().await;
        scheduler = sys.scheduler();
        tally.injections += 1;
        if !ledger.recorded(&sys, MINUTE).await {
            break;
        }
    }
    ledger.settle(&sys, &["x1"], MINUTE).await;
    ledger.tally_into(&sys, &mut tally).await;
    tally
}

/// The processes that hold a file under `dir` open (from /proc), for a failure message.
fn holders(dir: &std::path::Path) -> Vec<String> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter(|p| {
            std::fs::read_dir(p.path().join("fd")).is_ok_and(|fds| {
                fds.flatten().any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(dir))
                })
            })
        })
        .map(|p| {
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            format!(
                "{}: {}",
                p.file_name().to_string_lossy(),
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            )
        })
        .collect()
}

/// Where in a job's life the agent is killed.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// As soon as the jobs are published: some are in its prefetch, not started.
    BeforeStart,
    /// While one of its jobs runs.
    MidRun,
    /// Right after the scheduler recorded one of its jobs (its receipt may be in flight).
    AfterFinish,
}

/// kill -9 of an agent at varied points, a second agent beside it, the killed one restarted:
/// nothing lost, each job recorded once, at most 2 runs, at most 1 on the agent that survived.
async fn agent_killed(n: usize) -> Tally {
    let sys = System::new().await;
    let mut ledger = Ledger::new(&sys).await;
    let _scheduler = sys.scheduler();
    let victim = counting_pool(&mut ledger, &sys, "k1", 2);
    let survivor = counting_pool(&mut ledger, &sys, "k2", 2);
    let mut killed = start_agent(&sys, "k1", &victim);
    let _survivor = start_agent(&sys, "k2", &survivor);
    sys.ready(true, &["k1", "k2"]).await;
    ledger.killed("k1");
    let mut tally = Tally::new("agent kill -9 (before start, mid-run, after finish)");
    let points = [
        KillPoint::BeforeStart,
        KillPoint::MidRun,
        KillPoint::AfterFinish,
    ];
    for i in 0..n {
        match points[i % points.len()] {
            KillPoint::BeforeStart => {
                ledger.publish_counted(&sys, 6, 1_000).await;
            }
            KillPoint::MidRun => {
                ledger.publish_counted(&sys, 6, 3_000).await;
                ledger.next_started_on("k1", 1, MINUTE).await;
            }
            KillPoint::AfterFinish => {
                ledger.publish_counted(&sys, 6, 200).await;
                ledger.next_finished_from("k1", MINUTE).await;
            }
        }
        killed.kill().await;
        killed = start_agent(&sys, "k1", &victim);
        tokio::select! {
            _ = sys.ready(false, &["k1"]) => {}
            status = killed.exited() => panic!(
                "the agent restarted after kill -9 exited ({status:?}): {}\nprocesses holding its \
                 data folder open: {:?}",
                killed.output(),
                holders(&sys.data_dir().join("agent-k1"))
            ),
        }
        tally.injections += 1;
        if !ledger.recorded(&sys, 2 * MINUTE).await {
            break;
        }
    }
    ledger.settle(&sys, &["k1", "k2"], MINUTE).await;
    ledger.tally_into(&sys, &mut tally).await;
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_agent_connection_reruns_no_job() {
    agent_connection_broken(Break::Cut, injections(4))
        .await
        .assert_holds(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_connection_closed_by_the_broker_reruns_no_job() {
    agent_connection_broken(Break::BrokerClose, injections(4))
        .await
        .assert_holds(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_agent_connection_is_noticed_and_reruns_no_job() {
    agent_connection_blackholed(injections(2))
        .await
        .assert_holds(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_connection_closed_by_the_broker_loses_nothing() {
    scheduler_connection_closed(injections(3))
        .await
        .assert_holds(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_max_message_size_ends_the_job_without_a_reconnect_loop() {
    oversized_results(injections(1)).await.assert_holds(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_intake_until_space_is_freed() {
    // A job whose result could not be stored may run once more after the space is back.
    let t = full_disk(injections(2)).await;
    t.assert_bar(full_disk_bar(&t), FULL_DISK_BAR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_garbage_input_is_dead_lettered_and_harms_nothing() {
    forged_input(injections(1)).await.assert_holds(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_garbage_input_to_the_scheduler_harms_nothing() {
    forged_scheduler_input(injections(1)).await.assert_holds(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_killed_mid_run_loses_nothing_and_reruns_nothing() {
    scheduler_killed(injections(2)).await.assert_holds(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_at_any_point_loses_nothing_and_runs_a_job_at_most_twice() {
    agent_killed(injections(3)).await.assert_holds(2);
}

/// The soak: 20 injections of each fault (`ROTA_FAULT_SOAK=N` for another number), one fault
/// after the other, then the tally table (for the README). Each fault runs in its own task, so one
/// that fails still leaves its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the soak, minutes long: ROTA_FAULT_SOAK=20 cargo test -p rota-tests --test faults -- --ignored --nocapture soak"]
async fn soak_prints_the_fault_tally() {
    let n = injections(20);
    type Run = std::pin::Pin<Box<dyn std::future::Future<Output = Tally> + Send>>;
    type Bar = fn(&Tally) -> bool;
    // The bar of each fault: the strict one, or at most 2 runs where a job may run again
    // elsewhere (a killed agent) or once more after its result could not be stored (full disk).
    let strict: Bar = |t| t.holds(1);
    let killed: Bar = |t| t.holds(2);
    let disk: Bar =
        |t| t.problems.is_empty() && t.lost == 0 && t.recorded_twice == 0 && t.max_runs <= 2;
    let runs: Vec<(&str, Bar, Run)> = vec![
        (
            "agent connection reset (relay)",
            strict,
            Box::pin(agent_connection_broken(Break::Cut, n)),
        ),
        (
            "agent connection closed by the broker",
            strict,
            Box::pin(agent_connection_broken(Break::BrokerClose, n)),
        ),
        (
            "agent connection black-holed",
            strict,
            Box::pin(agent_connection_blackholed(n)),
        ),
        (
            "scheduler connection closed by the broker",
            strict,
            Box::pin(scheduler_connection_closed(n)),
        ),
        (
            "result over max_message_size (1 MiB)",
            strict,
            Box::pin(oversized_results(n)),
        ),
        (
            "full disk under the agent's data dir",
            disk,
            Box::pin(full_disk(n)),
        ),
        (
            "forged and garbage input",
            strict,
            Box::pin(forged_input(n)),
        ),
        (
            "forged and garbage input to the scheduler",
            strict,
            Box::pin(forged_scheduler_input(n)),
        ),
        (
            "scheduler kill -9 (mid-run, after a finish)",
            strict,
            Box::pin(scheduler_killed(n)),
        ),
        (
            "agent kill -9 (before start, mid-run, after finish)",
            killed,
            Box::pin(agent_killed(n)),
        ),
    ];
    let mut tallies = Vec::new();
    let mut failed = Vec::new();
    for (fault, bar, run) in runs {
        match tokio::spawn(run).await {
            Ok(t) => {
                if !bar(&t) {
                    failed.push(format!("{fault}: {:?} {:?}", t.problems, t.notes));
                }
                tallies.push(t);
            }
            Err(e) => {
                failed.push(format!("{fault}: aborted: {e}"));
                let mut t = Tally::new(&format!("{fault} (aborted)"));
                t.notes.push(e.to_string());
                tallies.push(t);
            }
        }
    }
    println!("\n{}", Tally::table(&tallies));
    assert!(
        failed.is_empty(),
        "the bar does not hold:\n{}",
        failed.join("\n")
    );
}

/// The relay itself: it passes the AMQP connection, counts it, and a cut makes the part
/// reconnect through it (the harness the other tests lean on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_passes_counts_and_cuts_connections() {
    let sys = System::new().await;
    let relay = Relay::to_broker().await;
    relay.delay(Duration::from_millis(5));
    let url = relay.url();
    let _agent = sys.agent("r1", &["--amqp-url", &url]);
    sys.ready(false, &["r1"]).await;
    // The first connection to a node reads its version (and closes), then the AMQP one.
    assert_eq!(relay.accepted(), 2, "two connections, through the relay");
    relay.delay(Duration::ZERO);
    relay.cut();
    relay.await_accepted(3, MINUTE).await;
    let mut beats = sys.heartbeats().await;
    within(
        MINUTE,
        "a heartbeat after the reconnect",
        sys.heartbeat_where(&mut beats, Role::Agent, "r1", |_| true),
    )
    .await;
}
