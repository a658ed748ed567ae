//! The scheduler under the faults production brings (issue 10, the scheduler's part):
//! forged and garbage messages on every queue and exchange it consumes, and a full disk
//! under its data dir. It stays up, counts and dead-letters what it does not take, stops
//! taking what it cannot store, and records everything exactly once when it can again.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{Connection, ConnectionProperties};
use rota_common::wire::{Heartbeat, JobId, Role, RpcReply, RpcRequest};
use rota_tests::{
    System, alive, amqp_url, dead_letters, dead_reason, free_addrs, http_get, metric, probe_until,
    results_in, within,
};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// A raw AMQP channel, to publish what no Rota part would.
async fn raw_channel() -> (Connection, lapin::Channel) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("connects");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

async fn publish(ch: &lapin::Channel, exchange: &str, key: &str, body: &[u8]) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        rota_tests::admin_props(),
    )
    .await
    .expect("publishes")
    .await
    .expect("confirmed or not asked");
}

/// Waits until `/metrics` shows every `(series, value)`; returns the text.
async fn metrics_reach(addr: &str, want: &[(String, u64)]) -> String {
    within(MINUTE, "the scheduler's counts", async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            if let Some((200, text)) = http_get(addr, "/metrics").await
                && want.iter().all(|(s, v)| metric(&text, s) >= *v)
            {
                return text;
            }
        }
    })
    .await
}

fn dropped(input: &str, reason: &str) -> String {
    format!(r#"rota_scheduler_dropped_total{{input="{input}",reason="{reason}"}}"#)
}

fn result_body(uuid: JobId, job_uuid: JobId, attempt: &str, status: &str) -> Vec<u8> {
    let now = chrono::Utc::now().to_rfc3339();
    format!(
        r#"{{"uuid":"{uuid}","attempt":{attempt},"type":"demo.echo","agent":"forger","worker":"w",
        "status":"{status}","started_at":"{now}","finished_at":"{now}",
        "job":{{"type":"demo.echo","uuid":"{job_uuid}"}}}}"#
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_garbage_input_is_counted_and_dead_lettered_and_the_scheduler_carries_on() {
    let sys = System::new().await;
    let [addr] = free_addrs();
    let scheduler = sys.scheduler_with(&["--http-addr", &addr]);
    sys.ready(true, &[]).await;
    probe_until(&addr, "/readyz", 200).await;
    let (conn, ch) = raw_channel().await;
    let results = sys.names.results();
    let rpc = sys.names.rpc();
    let events = sys.names.events();
    let beats = sys.names.heartbeats();

    // Results: garbage, wrong types, an attempt past u32, a result that names another job
    // than the one it carries; and one at attempt u32::MAX, past the wire's MAX_ATTEMPT.
    let forged = JobId::random();
    let at_max = JobId::random();
    let bad_results: Vec<Vec<u8>> = vec![
        b"\xff\xfe garbage".to_vec(),
        br#"{"uuid":"not-a-uuid","attempt":"one"}"#.to_vec(),
        result_body(forged, forged, "4294967296", "succeeded"),
        result_body(forged, JobId::random(), "1", "succeeded"),
        b"[]".to_vec(),
    ];
    for body in &bad_results {
        publish(&ch, "", &results, body).await;
    }
    publish(
        &ch,
        "",
        &results,
        &result_body(at_max, at_max, "4294967295", "failed"),
    )
    .await;
    // A group of results (as a busy agent sends them) with one bad entry: the good one is
    // recorded, the bad one dead-lettered alone.
    let (grouped, bad_entry) = (JobId::random(), JobId::random());
    let mut group = b"[".to_vec();
    group.extend(result_body(grouped, grouped, "1", "succeeded"));
    group.push(b',');
    group.extend(result_body(bad_entry, bad_entry, "4294967295", "failed"));
    group.push(b']');
    publish(&ch, "", &results, &group).await;
    // RPC: garbage and wrong types, without a reply queue.
    let bad_rpc: Vec<&[u8]> = vec![
        b"{not json",
        br#"{"method":"list","limit":-1}"#,
        br#"{"method":"no_such_method"}"#,
    ];
    for body in &bad_rpc {
        publish(&ch, "", &rpc, body).await;
    }
    // Started events: garbage, a forged kind, a job no one could submit.
    let now = chrono::Utc::now().to_rfc3339();
    let e = JobId::random();
    for body in [
        b"garbage".to_vec(),
        format!(r#"{{"event":"finished","uuid":"{e}","attempt":1,"type":"x","time":"{now}","job":{{"type":"x"}}}}"#).into_bytes(),
        format!(r#"{{"event":"started","uuid":"{e}","attempt":1,"type":"x","time":"{now}","job":{{"type":"../../etc"}}}}"#).into_bytes(),
    ] {
        publish(&ch, &events, "job.started.x", &body).await;
    }
    // Heartbeats: garbage, a huge one, and a valid one with an interval of u64::MAX ms.
    let mut hb = serde_json::to_value(Heartbeat::starting(
        Role::Agent,
        "forger",
        Duration::from_secs(1),
    ))
    .expect("serializes");
    hb["interval_ms"] = json!(u64::MAX);
    hb["seq"] = json!(-1);
    publish(&ch, &beats, "", b"garbage").await;
    publish(&ch, &beats, "", &vec![b' '; 512 * 1024]).await;
    publish(&ch, &beats, "", hb.to_string().as_bytes()).await;
    hb["seq"] = json!(1);
    publish(&ch, &beats, "", hb.to_string().as_bytes()).await;

    let text = metrics_reach(
        &addr,
        &[
            (dropped("result", "unreadable"), 4),
            (dropped("result", "invalid"), 3),
            (dropped("rpc", "unreadable"), 3),
            (dropped("event", "unreadable"), 1),
            (dropped("event", "invalid"), 2),
            (dropped("heartbeat", "unreadable"), 2),
            (dropped("heartbeat", "too_large"), 1),
        ],
    )
    .await;
    assert!(alive(scheduler.pid()), "the scheduler is up:\n{text}");

    // What can be dead-lettered is, with its reason.
    let mut dead = dead_letters(&ch, &sys.names).await;
    let mut reasons = Vec::new();
    let mut bodies = Vec::new();
    let want = bad_results.len() + 1 + 1 + bad_rpc.len();
    within(MINUTE, "the dead letters", async {
        while reasons.len() < want {
            use futures::StreamExt;
            let d = dead.next().await.expect("dead letters").expect("delivery");
            reasons.push(dead_reason(&d).expect("a reason header"));
            bodies.push(serde_json::from_slice(&d.data).unwrap_or(serde_json::Value::Null));
        }
    })
    .await;
    assert!(
        bodies.iter().any(|b| b["uuid"] == json!(bad_entry)),
        "the group's bad entry is dead-lettered alone: {bodies:?}"
    );
    let record = sys
        .client
        .status(grouped)
        .await
        .expect("the group's good result");
    assert_eq!(record.state.to_string(), "succeeded");
    for want in [
        "unreadable: not a valid result",
        "invalid: the result names job",
        "unreadable: not a valid request",
    ] {
        assert!(
            reasons.iter().any(|r| r.starts_with(want)),
            "no dead letter says {want:?}: {reasons:?}"
        );
    }

    // The forged heartbeat is listed; listing it does not overflow.
    let RpcReply::Agents { agents } = sys.client.call(&RpcRequest::Agents).await.expect("answers")
    else {
        panic!("agents");
    };
    assert!(agents.iter().any(|a| a.heartbeat.id == "forger"));

    // And a normal job still runs and is recorded.
    let _agent = sys.agent("a1", &[]);
    sys.ready(false, &["a1"]).await;
    let (code, record) = sys
        .submit_wait(&[
            "--type",
            "demo.echo",
            "--payload",
            r#"{"after":"forgeries"}"#,
        ])
        .await;
    assert_eq!(code, Some(0), "{record}");
    assert_eq!(record["state"], "succeeded");
    assert!(alive(scheduler.pid()));
    probe_until(&addr, "/readyz", 200).await;
    let _ = conn.close(200, "done".into()).await;
}

/// A small tmpfs mounted on a folder (we run as root), unmounted when dropped, even after a
/// failed assertion. `fill` leaves it with no free byte; `free` gives the room back.
struct SmallDisk {
    dir: std::path::PathBuf,
    ballast: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).expect("mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount runs");
        assert!(status.success(), "mount a tmpfs on {}", dir.display());
        SmallDisk {
            dir: dir.to_owned(),
            ballast: dir.join("ballast"),
        }
    }

    fn fill(&self) {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&self.ballast).expect("ballast");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        // The last partial chunk: byte by byte until the disk refuses.
        while f.write_all(&[0]).is_ok() {}
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(&self.ballast).expect("ballast removed");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: a process still holding files there (a scheduler being killed) cannot stop it.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_intake_and_the_scheduler_resumes_by_itself() {
    let sys = System::new().await;
    let disk = SmallDisk::mount(&sys.data_dir(), "24m");
    let [addr] = free_addrs();
    let scheduler = sys.scheduler_with(&["--http-addr", &addr]);
    let agent_data = sys.dir.path().join("agent-data").display().to_string();
    let _agent = sys.agent("a1", &["--data-dir", &agent_data]);
    sys.ready(true, &["a1"]).await;
    probe_until(&addr, "/readyz", 200).await;
    let (conn, _ch) = raw_channel().await;
    let mut finished = sys
        .client
        .watch(&[rota_common::wire::EventKind::Finished])
        .await
        .expect("watch");

    disk.fill();
    // Jobs straight to RabbitMQ: they run, and their results cannot be stored.
    let mut ids = std::collections::HashSet::new();
    for n in 0..5 {
        let job = rota_common::wire::Job::new("demo.echo", json!({ "n": n }));
        ids.insert(sys.client.publish_job(job).await.expect("published"));
    }
    let why = probe_until(&addr, "/readyz", 503).await;
    assert!(why.contains("store cannot write"), "{why}");
    // A submission is refused with a reason, not half-taken.
    let refused = sys
        .client
        .submit(rota_common::wire::Job::new("demo.echo", json!("late")))
        .await
        .expect_err("the store cannot write");
    assert!(refused.to_string().contains("cannot"), "{refused:#}");
    // No loop: the results wait, ready, in their queue (the agent resends some meanwhile).
    within(MINUTE, "the results back in their queue", async {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            if results_in(&sys.names.results()).await >= 5 {
                return;
            }
        }
    })
    .await;
    let log = scheduler.output();
    let failed_batches = log.matches("the results go back to the queue").count();
    assert!(
        failed_batches <= 2,
        "the scheduler retries the store in a loop:\n{}",
        scheduler.output()
    );
    let (_, text) = http_get(&addr, "/metrics").await.expect("metrics");
    assert_eq!(
        metric(
            &text,
            r#"rota_jobs_recorded_total{type="demo.echo",status="succeeded"}"#
        ),
        0
    );
    assert!(alive(scheduler.pid()));

    disk.free();
    probe_until(&addr, "/readyz", 200).await;
    let mut seen = std::collections::HashMap::new();
    within(MINUTE, "every job recorded", async {
        while seen.len() < ids.len() {
            let e = finished.next().await.expect("events");
            if ids.contains(&e.uuid) {
                *seen.entry(e.uuid).or_insert(0) += 1;
            }
        }
    })
    .await;
    // Once each: the resent copies are recognized.
    let text = metrics_reach(
        &addr,
        &[(
            r#"rota_jobs_recorded_total{type="demo.echo",status="succeeded"}"#.to_owned(),
            5,
        )],
    )
    .await;
    assert_eq!(
        metric(
            &text,
            r#"rota_jobs_recorded_total{type="demo.echo",status="succeeded"}"#
        ),
        5,
        "recorded once each:\n{text}"
    );
    for uuid in &ids {
        let record = sys.client.status(*uuid).await.expect("recorded");
        assert_eq!(record.state, rota_common::wire::JobState::Succeeded);
        assert_eq!(record.attempts.len(), 1);
    }
    // And new submissions are taken again.
    let (code, record) = sys
        .submit_wait(&["--type", "demo.echo", "--payload", r#""after""#])
        .await;
    assert_eq!(code, Some(0), "{record}");
    let _ = conn.close(200, "done".into()).await;
}

/// A succeeded result of a new job, as an agent would send it.
fn forged_result(
    output: serde_json::Value,
    logs: Vec<rota_common::wire::LogLine>,
) -> rota_common::wire::JobResult {
    let uuid = JobId::random();
    let mut job = rota_common::wire::Job::new("demo.echo", json!(null));
    job.uuid = Some(uuid);
    let now = chrono::Utc::now();
    rota_common::wire::JobResult {
        uuid,
        attempt: 1,
        work_type: "demo.echo".into(),
        agent: rota_common::wire::AgentId::new("forger").expect("valid"),
        worker: "w".into(),
        status: rota_common::wire::Status::Succeeded,
        error: None,
        output,
        logs,
        logs_dropped: 0,
        started_at: now,
        finished_at: now,
        job,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_logs_answer_in_pages_under_the_reply_budget_and_the_cli_shows_everything() {
    const BUDGET: usize = 512 * 1024;
    let sys = System::new().await;
    let [addr] = free_addrs();
    let _scheduler = sys.scheduler_with(&["--http-addr", &addr]);
    sys.ready(true, &[]).await;
    let (conn, ch) = raw_channel().await;
    // One job with 3 MB of logs, and 300 with 4 KB outputs: 1.3 MB of records.
    let lines: Vec<_> = (0..30_000)
        .map(|i| rota_common::wire::LogLine {
            time: chrono::Utc::now(),
            level: rota_common::wire::Level::Info,
            message: format!("line {i:06} {}", "z".repeat(80)),
        })
        .collect();
    let talkative = forged_result(json!(null), lines);
    let uuid = talkative.uuid;
    let body = serde_json::to_vec(&talkative).expect("json");
    publish(&ch, "", &sys.names.results(), &body).await;
    for _ in 0..300 {
        let r = forged_result(json!("y".repeat(4000)), Vec::new());
        let body = serde_json::to_vec(&r).expect("json");
        publish(&ch, "", &sys.names.results(), &body).await;
    }
    metrics_reach(
        &addr,
        &[(
            r#"rota_jobs_recorded_total{type="demo.echo",status="succeeded"}"#.to_owned(),
            301,
        )],
    )
    .await;

    // A client that does not follow pages gets the first page, bounded, and told where the
    // rest is.
    let size = |r: &RpcReply| serde_json::to_vec(r).expect("json").len();
    let old_logs = RpcRequest::Logs {
        uuid,
        cursor: None,
        limit: None,
    };
    let reply = sys.client.call(&old_logs).await.expect("logs");
    assert!(size(&reply) <= BUDGET, "a reply of {} bytes", size(&reply));
    let RpcReply::Logs { attempts, next, .. } = reply else {
        panic!("logs");
    };
    assert!(next.is_some(), "more lines follow");
    let last = attempts
        .last()
        .and_then(|a| a.lines.last())
        .expect("a line");
    assert!(
        last.message.contains(&format!("scheduler logs {uuid}")),
        "{}",
        last.message
    );
    let old_list = RpcRequest::List {
        state: None,
        limit: Some(100_000),
        cursor: None,
    };
    let reply = sys.client.call(&old_list).await.expect("list");
    assert!(size(&reply) <= BUDGET, "a reply of {} bytes", size(&reply));
    let RpcReply::Jobs { jobs, next } = reply else {
        panic!("jobs");
    };
    assert!(jobs.len() < 301 && next.is_some(), "{} jobs", jobs.len());

    // The CLI follows the pages: every line once, in order; every job once.
    let out = sys.cli(&["logs", &uuid.to_string(), "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let attempts: Vec<rota_common::wire::AttemptLogs> =
        serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        attempts[0].lines, talkative.logs,
        "every line once, in order"
    );
    let out = sys.cli(&["list", "--limit", "1000", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jobs: Vec<rota_common::wire::JobRecord> =
        serde_json::from_slice(&out.stdout).expect("json");
    let distinct: std::collections::HashSet<_> = jobs.iter().map(|j| j.uuid).collect();
    assert_eq!((jobs.len(), distinct.len()), (301, 301));
    // The human form too.
    let out = sys.cli(&["logs", &uuid.to_string()]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| l.contains(" line ")).count(),
        30_000
    );
    let _ = conn.close(200, "done".into()).await;
}
