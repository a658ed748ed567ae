//! Rate and concurrency limits (issue 14, items 3 and 4), as a user checks them: set with
//! `scheduler limit set`, enforced by the scheduler across every agent, whether the jobs come
//! over RPC or straight to the jobs exchange; the jobs they hold wait `throttled` (in the
//! state, `scheduler limits` and the metrics) and all run; a limit holds across a kill -9 of
//! the scheduler; a limit cleared releases its jobs; a throttled job past its deadline ends
//! `expired`.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rota_tests::wire::{Job, JobId, JobRecord, JobState, LimitInfo, Role, RpcReply, RpcRequest};
use rota_tests::{System, all_ended, free_addrs, http_get, metric, within};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// The most a job's start may lag its admission by more than another's (the store's flush,
/// the publish, the delivery, the worker), on this shared and loaded machine: measured, the
/// 6 starts closest together spanned 932 to 999 ms in 11 runs, and below 900 ms once while
/// the machine was busiest.
const DISPATCH: chrono::Duration = chrono::Duration::milliseconds(250);

/// `scheduler ARGS… --json`, which must succeed: its JSON output.
async fn cli_json(sys: &System, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = sys.cli(&all).await;
    assert!(
        out.status.success(),
        "scheduler {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

/// Waits until agent `id`'s heartbeat shows it heard that limits apply to something: from
/// then on it hands a matching job published straight to RabbitMQ to the scheduler.
async fn agent_heard_limits(sys: &System, id: &str) {
    let mut beats = sys.heartbeats().await;
    within(MINUTE, "the agent to hear the limits", async {
        sys.heartbeat_where(&mut beats, Role::Agent, id, |hb| {
            hb.paused.as_ref().is_some_and(|p| !p.limited.is_empty())
        })
        .await
    })
    .await;
}

/// Waits until every job of `ids` has ended; returns their records.
async fn records_once_ended(
    sys: &System,
    events: &mut rota_common::client::Events,
    ids: &[JobId],
) -> HashMap<JobId, JobRecord> {
    all_ended(events, ids, MINUTE * 3).await;
    let jobs = sys.list_all(None).await.expect("list");
    jobs.into_iter()
        .filter(|j| ids.contains(&j.uuid))
        .map(|j| (j.uuid, j))
        .collect()
}

fn started(record: &JobRecord) -> DateTime<Utc> {
    record.attempts[0].started_at.expect("started")
}

fn finished(record: &JobRecord) -> DateTime<Utc> {
    record.attempts[0].finished_at.expect("finished")
}

/// The most of `intervals` (start, end) that overlap at one instant.
fn most_at_once(intervals: &[(DateTime<Utc>, DateTime<Utc>)]) -> usize {
    let mut edges: Vec<(DateTime<Utc>, i32)> = intervals
        .iter()
        .flat_map(|(s, e)| [(*s, 1), (*e, -1)])
        .collect();
    // An end before a start at the same instant: a slot given back, then taken.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

/// Two agents, a rate of 5/1s on a work type, 20 jobs at once (14 over RPC, 6 published
/// straight to the jobs exchange): all succeed, the ones over the rate showed `throttled`,
/// and no second holds more than 5 starts. The scheduler counts a job as it publishes it; it
/// starts a moment later, a moment that varies (the agent, its worker): the starts are read
/// with that allowance, [`DISPATCH`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_across_two_agents() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _a1 = sys.agent("a1", &["--pool-min-size", "3"]);
    let _a2 = sys.agent("a2", &["--pool-min-size", "3"]);
    sys.ready(true, &["a1", "a2"]).await;
    let limits = cli_json(
        &sys,
        &["limit", "set", "--work-type", "demo.echo", "--rate", "5/1s"],
    )
    .await;
    assert_eq!(limits[0]["scope"], json!({"work_type": "demo.echo"}));
    assert_eq!(limits[0]["rate"], json!({"count": 5, "interval_ms": 1000}));
    agent_heard_limits(&sys, "a1").await;
    agent_heard_limits(&sys, "a2").await;
    let mut events = sys.finished_events().await;
    let mut ids = Vec::new();
    let mut throttled = 0;
    for i in 0..20 {
        let job = Job::new("demo.echo", json!({ "n": i }));
        if i % 3 == 1 && i < 18 {
            ids.push(sys.client.publish_job(job).await.expect("published"));
        } else {
            let record = sys.client.submit(job).await.expect("submitted");
            if record.state == JobState::Throttled {
                let reason = record.reason.as_deref().unwrap_or_default();
                assert!(
                    reason.contains("work_type=demo.echo"),
                    "the reason names the limit: {reason}"
                );
                throttled += 1;
            }
            ids.push(record.uuid);
        }
    }
    assert!(throttled >= 9, "{throttled} of 14 were throttled at once");
    let records = records_once_ended(&sys, &mut events, &ids).await;
    assert_eq!(records.len(), 20);
    let mut starts: Vec<_> = records
        .values()
        .map(|r| {
            assert_eq!(r.state, JobState::Succeeded, "{r:?}");
            assert_eq!(r.attempts.len(), 1, "ran once: {r:?}");
            started(r)
        })
        .collect();
    starts.sort();
    for w in starts.windows(6) {
        assert!(
            w[5] - w[0] >= chrono::Duration::seconds(1) - DISPATCH,
            "6 jobs started within a second (less the dispatch allowance): {w:?}"
        );
    }
    let took = starts[19] - starts[0];
    assert!(
        took >= chrono::Duration::seconds(3),
        "20 jobs at 5/1s take 3 s at least: {took}"
    );
    assert!(
        took < chrono::Duration::seconds(10),
        "the clock releases each job once the rate allows it, not later: {took}"
    );
}

/// A concurrency of 2 per customer, 200 jobs over 3 customers submitted at once to an agent
/// of 8 workers: all succeed, at no instant did 3 jobs of one customer run, and each
/// customer's jobs started in the order they were submitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limit_holds_for_200_jobs_of_3_customers() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent(
        "c1",
        &[
            "--pool-min-size",
            "8",
            "--pool-max-size",
            "8",
            "--prefetch",
            "16",
        ],
    );
    sys.ready(true, &["c1"]).await;
    cli_json(
        &sys,
        &["limit", "set", "--label", "customer", "--concurrency", "2"],
    )
    .await;
    let mut events = sys.finished_events().await;
    let customers = ["acme", "globex", "initech"];
    let mut ids = Vec::new();
    let mut order: HashMap<&str, Vec<JobId>> = HashMap::new();
    for i in 0..200 {
        let mut job = Job::new("demo.sleep", json!({ "ms": 5 }));
        let customer = customers[i % 3];
        job.labels.insert("customer".into(), customer.into());
        let record = sys.client.submit(job).await.expect("submitted");
        ids.push(record.uuid);
        order.entry(customer).or_default().push(record.uuid);
    }
    let records = records_once_ended(&sys, &mut events, &ids).await;
    assert_eq!(records.len(), 200);
    for (customer, jobs) in &order {
        let runs: Vec<&JobRecord> = jobs.iter().map(|id| &records[id]).collect();
        for r in &runs {
            assert_eq!(r.state, JobState::Succeeded, "{r:?}");
            assert_eq!(r.attempts.len(), 1, "ran once: {r:?}");
        }
        let intervals: Vec<_> = runs.iter().map(|r| (started(r), finished(r))).collect();
        assert!(
            most_at_once(&intervals) <= 2,
            "more than 2 jobs of {customer} ran at once"
        );
        for pair in runs.windows(2) {
            assert!(
                started(pair[0]) <= started(pair[1]),
                "{customer}'s jobs started out of order: {} at {}, then {} at {}",
                pair[0].uuid,
                started(pair[0]),
                pair[1].uuid,
                started(pair[1])
            );
        }
    }
    let limits = cli_json(&sys, &["limits"]).await;
    let limits: Vec<LimitInfo> = serde_json::from_value(limits).expect("limits");
    assert_eq!(limits.len(), 1);
    assert!(
        limits[0].values.is_empty(),
        "nothing waits or runs once all ended: {limits:?}"
    );
}

/// A concurrency of 1 for one customer, 6 jobs of 300 ms; the scheduler killed (-9) while
/// most are throttled, then started again: all 6 run, once each, one at a time, and the
/// limit is still set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_survives_a_scheduler_kill() {
    let sys = System::new().await;
    let mut scheduler = sys.scheduler();
    let _agent = sys.agent("k1", &["--pool-max-size", "4"]);
    sys.ready(true, &["k1"]).await;
    cli_json(
        &sys,
        &["limit", "set", "--label", "customer", "--concurrency", "1"],
    )
    .await;
    let mut events = sys.finished_events().await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        let mut job = Job::new("demo.sleep", json!({ "ms": 300 }));
        job.labels.insert("customer".into(), "acme".into());
        ids.push(sys.client.submit(job).await.expect("submitted").uuid);
    }
    let throttled = sys.list_all(Some(JobState::Throttled)).await.expect("list");
    assert!(throttled.len() >= 4, "{} throttled", throttled.len());
    scheduler.kill().await;
    let _scheduler = sys.scheduler();
    let records = records_once_ended(&sys, &mut events, &ids).await;
    let mut intervals = Vec::new();
    for r in records.values() {
        assert_eq!(r.state, JobState::Succeeded, "{r:?}");
        assert_eq!(r.attempts.len(), 1, "ran once: {r:?}");
        intervals.push((started(r), finished(r)));
    }
    assert_eq!(most_at_once(&intervals), 1, "one at a time: {intervals:?}");
    let RpcReply::Limits { limits } = sys.client.call(&RpcRequest::Limits).await.expect("limits")
    else {
        panic!("not the limits");
    };
    assert_eq!(limits.len(), 1, "the limit is still set");
    assert_eq!(limits[0].limit.concurrency, Some(1));
}

/// A rate of 1 per hour: the first job runs, the others wait (the table and the metrics show
/// them), one with a deadline ends `expired` at it; the limit cleared, the others run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleared_limit_releases_the_waiting_jobs_and_a_deadline_ends_one() {
    let sys = System::new().await;
    let [addr] = free_addrs();
    let _scheduler = sys.scheduler_with(&["--http-addr", &addr]);
    let _agent = sys.agent("r1", &[]);
    sys.ready(true, &["r1"]).await;
    cli_json(
        &sys,
        &["limit", "set", "--work-type", "demo.echo", "--rate", "1/1h"],
    )
    .await;
    let mut events = sys.finished_events().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            sys.client
                .submit(Job::new("demo.echo", json!({})))
                .await
                .expect("submitted")
                .uuid,
        );
    }
    let mut late = Job::new("demo.echo", json!({}));
    late.ttl_s = Some(1);
    let late = sys.client.submit(late).await.expect("submitted");
    assert_eq!(late.state, JobState::Throttled);
    let first = records_once_ended(&sys, &mut events, &[ids[0], late.uuid]).await;
    assert_eq!(first[&ids[0]].state, JobState::Succeeded);
    let expired = &first[&late.uuid];
    assert_eq!(expired.state, JobState::Expired, "{expired:?}");
    assert!(expired.attempts.is_empty(), "it never ran");
    let reason = expired.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("rate limit"), "{reason}");
    for id in &ids[1..] {
        let record = sys.client.status(*id).await.expect("recorded");
        assert_eq!(record.state, JobState::Throttled, "{record:?}");
    }
    let table = sys.cli(&["limits"]).await;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.lines().any(|l| l.contains("work_type=demo.echo")
            && l.contains("1/1h")
            && l.split_whitespace().nth(4) == Some("2")),
        "2 waiting in the table:\n{table}"
    );
    let text = http_get(&addr, "/metrics").await.expect("metrics").1;
    let series = r#"rota_scheduler_jobs_throttled{limit="work_type=demo.echo"}"#;
    assert_eq!(metric(&text, series), 2, "{text}");
    cli_json(&sys, &["limit", "clear", "--work-type", "demo.echo"]).await;
    let rest = records_once_ended(&sys, &mut events, &ids[1..]).await;
    for r in rest.values() {
        assert_eq!(r.state, JobState::Succeeded, "{r:?}");
    }
    assert_eq!(cli_json(&sys, &["limits"]).await, json!([]));
}

/// A parent that waits for its children gives its concurrency slot back when its Work ends:
/// with at most 1 running job per customer, its children (the same customer) run one at a
/// time, and it ends after them. Were it to keep its slot, they would wait for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_waiting_for_its_children_does_not_hold_their_slot() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("w1", &["--pool-max-size", "4"]);
    sys.ready(true, &["w1"]).await;
    cli_json(
        &sys,
        &["limit", "set", "--label", "customer", "--concurrency", "1"],
    )
    .await;
    let mut events = sys.finished_events().await;
    let child = json!({
        "type": "demo.sleep",
        "payload": { "ms": 200 },
        "labels": { "customer": "acme" },
    });
    let mut parent = Job::new(
        "demo.spawn",
        json!({ "children": [child.clone(), child], "wait": true }),
    );
    parent.labels.insert("customer".into(), "acme".into());
    let parent = sys.client.submit(parent).await.expect("submitted").uuid;
    all_ended(&mut events, &[parent], MINUTE * 3).await;
    let parent = sys.client.status(parent).await.expect("status");
    assert_eq!(parent.state, JobState::Succeeded, "{parent:?}");
    let mut intervals = Vec::new();
    for child in &parent.children {
        let child = sys.client.status(*child).await.expect("status");
        assert_eq!(child.state, JobState::Succeeded, "{child:?}");
        intervals.push((started(&child), finished(&child)));
    }
    assert_eq!(intervals.len(), 2);
    assert_eq!(most_at_once(&intervals), 1, "one at a time: {intervals:?}");
}
