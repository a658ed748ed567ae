//! A job's whole life through the real broker and binaries: delayed jobs, retries until
//! success or death, retries by hand, priorities, child jobs at every worker location,
//! unique keys, cancelling a held job, retention, quorum queues.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rota_tests::wire::{EventKind, Job, JobId, JobRecord, JobState, Role, Status};
use rota_tests::{System, event_of, within};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// `scheduler ARGS… --json`: the exit code and the JSON it printed.
async fn cli_json(sys: &System, args: &[&str]) -> (Option<i32>, Value) {
    let mut all = args.to_vec();
    all.push("--json");
    let out = sys.cli(&all).await;
    let value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON from `scheduler {}` ({e}): {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), value)
}

fn record(value: Value) -> JobRecord {
    serde_json::from_value(value).expect("a job record")
}

fn statuses(r: &JobRecord) -> Vec<Option<Status>> {
    r.attempts.iter().map(|a| a.status).collect()
}

/// Waits until the job is over (the `finished` event that says so), then reads it.
async fn until_over(
    sys: &System,
    events: &mut rota_common::client::Events,
    uuid: JobId,
) -> JobRecord {
    loop {
        let e = event_of(events, uuid).await;
        if e.event == EventKind::Finished && e.state.is_none_or(JobState::is_final) {
            return sys.client.status(uuid).await.expect("status");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_job_is_scheduled_and_runs_no_earlier_than_its_time() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("d1", &[]);
    sys.ready(true, &["d1"]).await;
    let mut events = sys.finished_events().await;

    let at = (Utc::now() + chrono::Duration::seconds(5)).to_rfc3339();
    let (code, by_delay) =
        cli_json(&sys, &["submit", "--type", "demo.echo", "--delay", "2s"]).await;
    assert_eq!(code, Some(0));
    let (_, by_time) = cli_json(&sys, &["submit", "--type", "demo.echo", "--at", &at]).await;
    let submitted = [record(by_delay), record(by_time)];
    // Both checked before waiting for either, while their times are surely still ahead.
    for s in &submitted {
        assert_eq!(s.state, JobState::Scheduled);
        assert_eq!(
            sys.client.status(s.uuid).await.expect("status").state,
            JobState::Scheduled,
            "it shows as scheduled until then"
        );
    }
    for submitted in submitted {
        let run_at = submitted.next_run_at.expect("held until a time");
        let done = within(
            MINUTE,
            "the delayed job",
            until_over(&sys, &mut events, submitted.uuid),
        )
        .await;
        assert_eq!(done.state, JobState::Succeeded);
        let started = done.attempts[0].started_at.expect("started");
        assert!(
            started >= run_at,
            "started {started}, before its time {run_at}"
        );
    }
    let refused = sys
        .cli(&["submit", "--type", "demo.echo", "--at", "tomorrow"])
        .await;
    assert_eq!(
        refused.status.code(),
        Some(2),
        "an unreadable time is refused"
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("RFC 3339"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_twice_then_succeeding_ends_succeeded_with_three_attempts() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("r1", &[]);
    let (code, rec) = sys
        .submit_wait(&[
            "--type",
            "demo.flaky",
            "--payload",
            r#"{"fail_times": 2}"#,
            "--max-attempts",
            "3",
            "--backoff",
            "100ms",
        ])
        .await;
    let rec = record(rec);
    assert_eq!(code, Some(0), "{rec:?}");
    assert_eq!(rec.state, JobState::Succeeded);
    assert_eq!(
        statuses(&rec),
        [
            Some(Status::Failed),
            Some(Status::Failed),
            Some(Status::Succeeded)
        ]
    );
    assert_eq!(rec.attempts[2].output, json!({"attempt": 3}));
    // Each attempt has its own logs and folder.
    let logs = sys.cli(&["logs", &rec.uuid.to_string()]).await;
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(
        text.contains("--- attempt 3 ---") && text.contains("attempt 3 succeeds"),
        "{text}"
    );
    for n in 1..=3 {
        assert!(
            std::path::Path::new(&rec.dir)
                .join(format!("attempt-{n}/result.json"))
                .exists()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_always_failing_is_dead_after_max_attempts_and_a_manual_retry_runs_it_again() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("r2", &[]);
    let (code, rec) = sys
        .submit_wait(&[
            "--type",
            "demo.fail",
            "--max-attempts",
            "3",
            "--backoff",
            "100ms",
        ])
        .await;
    let rec = record(rec);
    assert_eq!(code, Some(1));
    assert_eq!(rec.state, JobState::Dead);
    assert_eq!(statuses(&rec), [Some(Status::Failed); 3]);
    let status = sys.cli(&["status", &rec.uuid.to_string()]).await;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("dead") && text.contains("attempt 3: failed"),
        "{text}"
    );

    let mut events = sys.finished_events().await;
    let (code, again) = cli_json(&sys, &["retry", &rec.uuid.to_string()]).await;
    assert_eq!(code, Some(0));
    let again = record(again);
    assert_eq!((again.state, again.job.attempt), (JobState::Queued, 4));
    let done = within(MINUTE, "the retry", until_over(&sys, &mut events, rec.uuid)).await;
    assert_eq!(done.state, JobState::Dead);
    assert_eq!(done.attempts.len(), 4, "the retry is a fourth attempt");

    let (code, ok) = sys.submit_wait(&["--type", "demo.echo"]).await;
    assert_eq!(code, Some(0));
    let uuid = record(ok).uuid.to_string();
    let refused = sys.cli(&["retry", &uuid]).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("succeeded: there is nothing to retry"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_jobs_queued_behind_lower_ones_run_first() {
    // Priorities 0 to 9 are classic queues' (quorum queues have two levels at most).
    let sys = System::on(
        &rota_tests::amqp_url(),
        rota_common::names::QueueType::Classic,
    )
    .await;
    let _scheduler = sys.scheduler();
    sys.ready(true, &[]).await;
    let mut events = sys.finished_events().await;
    // Queued before any agent runs: low ones first, high ones behind them.
    let mut priority = HashMap::new();
    for p in [0, 0, 0, 0, 9, 9, 9, 9] {
        let mut job = Job::new("demo.echo", Value::Null);
        job.priority = Some(p);
        let rec = sys.client.submit(job).await.expect("submitted");
        priority.insert(rec.uuid, p);
    }
    let _agent = sys.agent("p1", &["--pool-min-size", "1", "--pool-max-size", "1"]);
    let mut done = HashSet::new();
    within(MINUTE, "eight jobs", async {
        while done.len() < priority.len() {
            let e = events.next().await.expect("events");
            if priority.contains_key(&e.uuid) {
                done.insert(e.uuid);
            }
        }
    })
    .await;
    let mut order: Vec<(DateTime<Utc>, u8)> = Vec::new();
    for uuid in priority.keys() {
        let r = sys.client.status(*uuid).await.expect("status");
        order.push((r.attempts[0].started_at.expect("started"), priority[uuid]));
    }
    order.sort();
    let ran: Vec<u8> = order.iter().map(|(_, p)| *p).collect();
    assert_eq!(ran, [9, 9, 9, 9, 0, 0, 0, 0]);
}

async fn a_work_submits_two_children(location: &'static str) {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let mut flags = rota_tests::worker_location_flags(location).await;
    flags.extend(["--pool-max-size", "2"]);
    let _agent = sys.agent("c1", &flags);
    sys.ready(true, &["c1"]).await;
    let mut events = sys.finished_events().await;
    let parent = Job::new(
        "demo.spawn",
        json!({"children": [
            {"type": "demo.echo", "payload": {"n": 1}},
            {"type": "demo.echo", "payload": {"n": 2}},
        ]}),
    );
    let parent = sys.client.submit(parent).await.expect("submitted").uuid;
    let mut finished: HashSet<JobId> = HashSet::new();
    let record = within(MINUTE, "the parent and its children", async {
        loop {
            let e = events.next().await.expect("events");
            finished.insert(e.uuid);
            if !finished.contains(&parent) {
                continue;
            }
            let record = sys.client.status(parent).await.expect("status");
            if record.children.iter().all(|c| finished.contains(c)) {
                return record;
            }
        }
    })
    .await;
    assert_eq!(record.state, JobState::Succeeded, "{record:?}");
    let output: Vec<JobId> =
        serde_json::from_value(record.attempts[0].output["children"].clone()).expect("ids");
    assert_eq!(output.len(), 2);
    let listed: HashSet<JobId> = record.children.iter().copied().collect();
    assert_eq!(
        listed,
        output.iter().copied().collect(),
        "status lists the children"
    );
    for (n, child) in output.iter().enumerate() {
        let c = sys.client.status(*child).await.expect("status");
        assert_eq!(c.job.parent, Some(parent));
        assert_eq!(c.state, JobState::Succeeded);
        assert_eq!(c.attempts[0].output, json!({"n": n + 1}));
    }
    let text = String::from_utf8_lossy(&sys.cli(&["status", &parent.to_string()]).await.stdout)
        .to_string();
    assert!(text.contains("children (2)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_work_submits_two_children_that_run() {
    a_work_submits_two_children("local").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_work_submits_two_children_that_run() {
    a_work_submits_two_children("thread").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_work_submits_two_children_that_run() {
    a_work_submits_two_children("process").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_work_submits_two_children_that_run() {
    a_work_submits_two_children("docker").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_submissions_with_one_unique_key_make_one_job() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    sys.ready(true, &[]).await;
    // No agent yet: the first job stays queued.
    let submit = async |key: &str| {
        let (code, rec) = cli_json(
            &sys,
            &["submit", "--type", "demo.echo", "--unique-key", key],
        )
        .await;
        assert_eq!(code, Some(0));
        record(rec).uuid
    };
    let first = submit("nightly-report").await;
    let second = submit("nightly-report").await;
    assert_eq!(
        first, second,
        "the second submission returns the queued job"
    );
    assert_ne!(submit("other-key").await, first);

    let mut events = sys.finished_events().await;
    let _agent = sys.agent("u1", &[]);
    within(MINUTE, "the job", until_over(&sys, &mut events, first)).await;
    let third = submit("nightly-report").await;
    assert_ne!(third, first, "once it is over the key is free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_job_can_be_cancelled_and_then_never_runs() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    sys.ready(true, &[]).await;
    let (_, rec) = cli_json(&sys, &["submit", "--type", "demo.echo", "--delay", "1h"]).await;
    let uuid = record(rec).uuid.to_string();
    let (code, cancelled) = cli_json(&sys, &["cancel", &uuid]).await;
    assert_eq!(code, Some(0));
    assert_eq!(record(cancelled).state, JobState::Cancelled);
    let (_, scheduled) = cli_json(&sys, &["list", "--status", "scheduled"]).await;
    assert_eq!(scheduled, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_and_their_folders_are_purged_after_the_retention_and_held_ones_stay() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler_with(&[
        "--retention",
        "5s",
        "--purge-interval",
        "200ms",
        "--job-folders",
        "always",
    ]);
    let _agent = sys.agent("g1", &[]);
    let (_, held) = cli_json(&sys, &["submit", "--type", "demo.echo", "--delay", "1h"]).await;
    let held = record(held);
    let (code, done) = sys.submit_wait(&["--type", "demo.echo"]).await;
    assert_eq!(code, Some(0));
    let done = record(done);
    assert!(std::path::Path::new(&done.dir).exists());
    // Checked at each of the scheduler's heartbeats until the purge has run.
    let mut beats = sys.heartbeats().await;
    within(MINUTE, "the purge", async {
        loop {
            sys.heartbeat_where(&mut beats, Role::Scheduler, "scheduler", |_| true)
                .await;
            if sys.client.status(done.uuid).await.is_err() {
                return;
            }
        }
    })
    .await;
    let err = sys.client.status(done.uuid).await.expect_err("purged");
    assert!(err.to_string().contains("no job"), "{err}");
    assert!(
        !std::path::Path::new(&done.dir).exists(),
        "its folder is gone"
    );
    let still = sys
        .client
        .status(held.uuid)
        .await
        .expect("a held job is never purged");
    assert_eq!(still.state, JobState::Scheduled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_through_quorum_queues() {
    // Every durable queue of the namespace is a quorum queue, the test's client's too.
    let sys = System::on(
        &rota_tests::amqp_url(),
        rota_common::names::QueueType::Quorum,
    )
    .await;
    let _scheduler = sys.scheduler_with(&["--queue-type", "quorum"]);
    let _agent = sys.agent("q1", &["--queue-type", "quorum"]);
    let (code, rec) = sys
        .submit_wait(&["--type", "demo.echo", "--payload", "{\"q\": 1}"])
        .await;
    assert_eq!(code, Some(0));
    assert_eq!(record(rec).attempts[0].output, json!({"q": 1}));
}
