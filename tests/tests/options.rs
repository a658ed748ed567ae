//! Job options honoured however a job arrives (issue 14, items 1, 6 and 7): retries, `run_at`
//! and unique keys for jobs published straight to the jobs exchange (the agent hands those it
//! may not run as they are to the scheduler); deadlines (`expires_at`, `ttl_s`); unique-key
//! windows (`unique_for_s`) and debounce (`debounce_s`).

use std::time::Duration;

use chrono::Utc;
use rota_tests::wire::{Event, Job, JobId, JobState, Status};
use rota_tests::{System, all_ended, within};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// The `job.finished` event that ends job `uuid` (a final state), within a minute.
async fn ended(events: &mut rota_common::client::Events, uuid: JobId) -> Event {
    let mut ended = all_ended(events, &[uuid], MINUTE).await;
    ended.remove(&uuid).expect("the job's end")
}

fn sleep_job(ms: u64) -> Job {
    Job::new("demo.sleep", json!({ "ms": ms }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_published_directly_is_retried_as_its_max_attempts_say() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    let mut finished = sys.finished_events().await;
    let mut job = Job::new("demo.fail", json!({ "message": "boom" }));
    job.max_attempts = Some(3);
    job.backoff_ms = Some(50);
    let uuid = sys.client.publish_job(job).await.expect("published");
    let last = ended(&mut finished, uuid).await;
    assert_eq!(last.attempt, 3);
    let record = sys.status(uuid).await;
    assert_eq!(
        record.state,
        JobState::Dead,
        "failed on each of its 3 attempts"
    );
    let statuses: Vec<_> = record.attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [Some(Status::Failed); 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_job_with_a_later_run_at_does_not_run_before_its_time() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    let mut finished = sys.finished_events().await;
    let at = Utc::now() + chrono::Duration::seconds(2);
    let mut job = Job::new("demo.echo", json!({}));
    job.run_at = Some(at);
    let uuid = sys.client.publish_job(job).await.expect("published");
    let event = ended(&mut finished, uuid).await;
    assert_eq!(event.state, Some(JobState::Succeeded));
    let record = sys.status(uuid).await;
    let started = record.attempts[0].started_at.expect("started");
    assert!(
        started >= at,
        "started at {started}, before its run_at {at}"
    );
}

/// Two jobs with one unique key published straight to the jobs exchange at once: one is
/// recorded and runs (for two seconds, long after the other was handed over), the other is
/// deduplicated as over RPC; once the first is over, the key is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_duplicate_of_a_unique_key_is_deduplicated_as_over_rpc() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let mut finished = sys.finished_events().await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut job = sleep_job(2000);
        job.unique_key = Some("report-7".into());
        ids.push(sys.client.publish_job(job).await.expect("published"));
    }
    let _agent = sys.agent("a1", &[]);
    let first = within(MINUTE, "one of them to end", async {
        loop {
            let e = finished.next().await.expect("events");
            if ids.contains(&e.uuid) && e.state.is_some_and(JobState::is_final) {
                return e;
            }
        }
    })
    .await;
    assert_eq!(first.state, Some(JobState::Succeeded));
    let jobs = sys.list_all(None).await.expect("list");
    assert_eq!(jobs.len(), 1, "one of the two is recorded: {jobs:?}");
    let mut again = sleep_job(1);
    again.unique_key = Some("report-7".into());
    let again = sys.client.publish_job(again).await.expect("published");
    let event = ended(&mut finished, again).await;
    assert_eq!(
        event.state,
        Some(JobState::Succeeded),
        "the key is free once the job ended"
    );
}

/// A job that waited in its queue past its deadline ends `expired` without running, with
/// when it was due and when it was looked at; one still in time runs. `ttl_s` is a deadline
/// counted from when the scheduler accepts the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_queued_job_ends_expired_without_running_and_one_in_time_runs() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    let mut finished = sys.finished_events().await;
    let mut late = Job::new("demo.echo", json!({}));
    late.expires_at = Some(Utc::now() - chrono::Duration::seconds(1));
    let late = sys.client.publish_job(late).await.expect("published");
    let mut in_time = Job::new("demo.echo", json!({}));
    in_time.expires_at = Some(Utc::now() + chrono::Duration::hours(1));
    let in_time = sys.client.publish_job(in_time).await.expect("published");

    let events = all_ended(&mut finished, &[late, in_time], MINUTE).await;
    assert_eq!(
        (events[&late].status, events[&late].state),
        (Some(Status::Expired), Some(JobState::Expired))
    );
    assert_eq!(events[&in_time].state, Some(JobState::Succeeded));
    let record = sys.status(late).await;
    let error = record.attempts[0].error.clone().expect("a reason");
    assert_eq!(error.kind, "expired");
    assert!(
        error.message.contains("not started by its deadline")
            && error.message.contains("looked at"),
        "{}",
        error.message
    );

    let before = Utc::now();
    let mut ttl = Job::new("demo.echo", json!({}));
    ttl.ttl_s = Some(3600);
    let record = sys.client.submit(ttl).await.expect("submitted");
    let deadline = record
        .job
        .expires_at
        .expect("the scheduler sets the deadline");
    assert!(deadline >= before + chrono::Duration::seconds(3600));
    let event = ended(&mut finished, record.uuid).await;
    assert_eq!(event.state, Some(JobState::Succeeded));
}

/// A held job that cannot start by its deadline ends `expired` (a `run_at` after it, over
/// RPC or published directly), and so does a job whose retry would be due after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_job_whose_deadline_passes_ends_expired() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    let mut finished = sys.finished_events().await;
    let held = || {
        let mut job = Job::new("demo.echo", json!({}));
        job.run_at = Some(Utc::now() + chrono::Duration::seconds(5));
        job.expires_at = Some(Utc::now() + chrono::Duration::seconds(2));
        job
    };
    let record = sys.client.submit(held()).await.expect("submitted");
    assert_eq!(record.state, JobState::Expired);
    let reason = record.reason.expect("a reason");
    assert!(reason.contains("not before its deadline"), "{reason}");

    let direct = sys.client.publish_job(held()).await.expect("published");
    let event = ended(&mut finished, direct).await;
    assert_eq!(event.state, Some(JobState::Expired));
    assert!(sys.status(direct).await.attempts.is_empty(), "never ran");

    let mut flaky = Job::new("demo.fail", json!({ "message": "boom" }));
    flaky.max_attempts = Some(3);
    flaky.backoff_ms = Some(10_000);
    flaky.expires_at = Some(Utc::now() + chrono::Duration::seconds(5));
    let record = sys.client.submit(flaky).await.expect("submitted");
    let event = ended(&mut finished, record.uuid).await;
    assert_eq!(
        (event.attempt, event.status, event.state),
        (1, Some(Status::Failed), Some(JobState::Expired))
    );
    let reason = sys.status(record.uuid).await.reason.expect("a reason");
    assert!(reason.contains("attempt 2 would be due"), "{reason}");
}

/// `unique_for_s`: the key stays held after the job ended, for its window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedupe_window_refuses_a_second_job_after_the_first_finished_then_admits() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    let mut finished = sys.finished_events().await;
    let hourly = || {
        let mut job = Job::new("demo.echo", json!({}));
        job.unique_key = Some("digest".into());
        job.unique_for_s = Some(2);
        job
    };
    let first = sys.client.submit(hourly()).await.expect("submitted");
    ended(&mut finished, first.uuid).await;
    let ended_at = sys.status(first.uuid).await.updated_at;
    let second = sys.client.submit(hourly()).await.expect("submitted");
    assert_eq!(
        second.uuid, first.uuid,
        "the window holds the key: the first job"
    );
    assert_eq!(second.state, JobState::Succeeded);
    // The window is a time: wait for it to pass.
    let left = (ended_at + chrono::Duration::seconds(2) - Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(50)).await;
    let third = sys.client.submit(hourly()).await.expect("submitted");
    assert_ne!(third.uuid, first.uuid, "after the window, a new job");
    let event = ended(&mut finished, third.uuid).await;
    assert_eq!(event.state, Some(JobState::Succeeded));
}

/// `debounce_s`: of three quick submissions with one key, only the last runs; the others
/// end `superseded`, each naming the job that replaced it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debounce_runs_only_the_last_of_three_quick_submissions() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    let mut finished = sys.finished_events().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let mut job = Job::new("demo.echo", json!({ "i": i }));
        job.unique_key = Some("reindex".into());
        job.debounce_s = Some(2);
        let record = sys.client.submit(job).await.expect("submitted");
        assert_eq!(record.state, JobState::Scheduled);
        ids.push(record.uuid);
    }
    let events = all_ended(&mut finished, &ids, MINUTE).await;
    for (i, uuid) in ids.iter().take(2).enumerate() {
        let event = &events[uuid];
        assert_eq!(
            (event.status, event.state),
            (None, Some(JobState::Superseded))
        );
        let record = sys.status(*uuid).await;
        assert_eq!(record.superseded_by, Some(ids[i + 1]));
        assert!(record.attempts.is_empty(), "never ran");
    }
    assert_eq!(events[&ids[2]].state, Some(JobState::Succeeded));
    let record = sys.status(ids[2]).await;
    assert_eq!(record.attempts[0].output, json!({ "i": 2 }));
}

/// A job held for its debounce survives a scheduler restart (kill -9): it runs once after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debounced_job_held_across_a_scheduler_restart_runs() {
    let sys = System::new().await;
    let mut scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    let mut finished = sys.finished_events().await;
    let mut job = Job::new("demo.echo", json!({}));
    job.unique_key = Some("sync".into());
    job.debounce_s = Some(3);
    let record = sys.client.submit(job).await.expect("submitted");
    assert_eq!(record.state, JobState::Scheduled);
    scheduler.kill().await;
    let _scheduler = sys.scheduler();
    let event = ended(&mut finished, record.uuid).await;
    assert_eq!(event.state, Some(JobState::Succeeded));
    let record = sys.status(record.uuid).await;
    assert_eq!(record.attempts.len(), 1);
}

/// A job handed over while no scheduler runs waits in `rota.admit` (which the first scheduler
/// declared) and is held, then run once, by the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_handed_over_while_the_scheduler_is_down_runs_once_it_is_back() {
    let sys = System::new().await;
    let mut scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    sys.ready(true, &["a1"]).await;
    scheduler.kill().await;
    let mut finished = sys.finished_events().await;
    let at = Utc::now() + chrono::Duration::seconds(1);
    let mut job = Job::new("demo.echo", json!({}));
    job.run_at = Some(at);
    job.unique_key = Some("nightly".into());
    let uuid = sys.client.publish_job(job).await.expect("published");
    let _scheduler = sys.scheduler();
    let event = ended(&mut finished, uuid).await;
    assert_eq!(event.state, Some(JobState::Succeeded));
    let record = sys.status(uuid).await;
    assert_eq!(record.attempts.len(), 1, "run once");
    assert!(record.attempts[0].started_at.expect("started") >= at);
}
