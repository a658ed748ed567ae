//! Worker locations: the same Work at each isolation level the agent offers.

use std::collections::HashSet;
use std::time::Duration;

use rota_tests::wire::{Attempt, EventKind, Job, JobState, Role, Status};
use rota_tests::{System, amqp_url, within, worker_location_flags};
use serde_json::json;

/// Runs `scheduler demo` with workers at `location`: every demo work ends as expected,
/// including a panic (`crashed`) followed by jobs that succeed on the same pool; the folders
/// and the files written through the alias are where the summary says.
async fn demo_at(location: &'static str) {
    let sys = System::new().await;
    sys.owns_agent("demo");
    let out = tokio::process::Command::new(rota_tests::bin("scheduler"))
        .args(["demo", "--clean", "--jobs", "12", "--pool-max-size", "3"])
        .args(worker_location_flags(location).await)
        .current_dir(sys.dir.path())
        .env("ROTA_NAMESPACE", sys.names.namespace())
        .env("ROTA_AMQP_URL", amqp_url())
        .output()
        .await
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Every job ended as expected."));
    assert!(
        text.contains(&format!("{location}-0")),
        "the summary names the {location} workers:\n{text}"
    );
    let temp = sys.dir.path().join("temp");
    let count = |dir: &str| temp.join(dir).read_dir().map(Iterator::count).unwrap_or(0);
    assert_eq!(
        count("scheduler/work"),
        12,
        "a folder per Work on the scheduler's side"
    );
    assert_eq!(
        count("agent-demo/work"),
        12,
        "a folder per Work on the pool's side"
    );
    assert_eq!(
        std::fs::read_to_string(temp.join("demodata/hello-3.txt")).expect("written"),
        "hello from job 3\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_workers_run_the_demo_works() {
    demo_at("local").await;
}

/// A Work that sleeps past its timeout ends `timed_out`, and the pool serves the next job.
async fn timeout_at(location: &'static str) {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let mut flags = worker_location_flags(location).await;
    flags.extend(["--pool-max-size", "1"]);
    let _agent = sys.agent("loc", &flags);
    let (code, record) = sys
        .submit_wait(&[
            "--type",
            "demo.sleep",
            "--payload",
            r#"{"ms":60000}"#,
            "--timeout-s",
            "1",
        ])
        .await;
    assert_eq!(code, Some(1), "a job that did not succeed exits 1");
    assert_eq!(record["state"], "timed_out");
    let attempt: Attempt = serde_json::from_value(record["attempts"][0].clone()).expect("attempt");
    let worker = attempt.worker.expect("worker");
    assert!(worker.starts_with(location), "{worker}");
    let ran = attempt.finished_at.expect("end") - attempt.started_at.expect("start");
    assert!(
        ran < chrono::TimeDelta::seconds(1 + 5 + 2),
        "ended within its timeout and the kill grace (5 s): ran {ran}"
    );
    if location == "docker" {
        let name = format!("{}-loc-{worker}", sys.names.namespace());
        assert!(
            !rota_tests::containers(sys.names.namespace())
                .iter()
                .any(|c| c.name == name),
            "the container {name} that ran it is gone"
        );
    }
    let (_, record) = sys
        .submit_wait(&["--type", "demo.echo", "--payload", "1"])
        .await;
    assert_eq!(record["state"], "succeeded", "the next job runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_workers_run_the_demo_works() {
    demo_at("thread").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_workers_run_the_demo_works() {
    demo_at("process").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_workers_run_the_demo_works() {
    demo_at("docker").await;
}

/// What a `process` or `docker` Work writes to stderr becomes its job's log lines.
async fn stderr_is_logged_at(location: &'static str) {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("err", &worker_location_flags(location).await);
    let (_, record) = sys
        .submit_wait(&[
            "--type",
            "demo.log",
            "--payload",
            r#"{"lines":3,"stderr":true}"#,
        ])
        .await;
    assert_eq!(record["state"], "succeeded", "{record}");
    let uuid = record["uuid"].as_str().expect("uuid");
    let out = sys.cli(&["logs", uuid]).await;
    let logs = String::from_utf8_lossy(&out.stdout);
    for i in 1..=3 {
        assert!(logs.contains(&format!("log line {i} of 3")), "{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_workers_log_their_stderr() {
    stderr_is_logged_at("process").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_workers_log_their_stderr() {
    stderr_is_logged_at("docker").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_workers_time_out_and_their_container_is_removed() {
    timeout_at("docker").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_workers_time_out() {
    timeout_at("local").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_workers_time_out() {
    timeout_at("thread").await;
}

/// CPU-bound Work that never yields cannot be stopped on a thread: past its timeout and a
/// grace period the agent gives up on that thread, reports `timed_out`, and a new thread
/// serves the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_that_does_not_return_is_abandoned_and_replaced() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent(
        "spin",
        &["--worker-location", "thread", "--pool-max-size", "1"],
    );
    let (_, record) = sys
        .submit_wait(&[
            "--type",
            "demo.spin",
            "--payload",
            r#"{"ms":20000}"#,
            "--timeout-s",
            "1",
        ])
        .await;
    assert_eq!(record["state"], "timed_out");
    let error = record["attempts"][0]["error"]["message"]
        .as_str()
        .expect("message");
    assert!(error.contains("abandoned and replaced"), "{error}");
    assert_eq!(record["attempts"][0]["worker"], "thread-0");
    let (_, record) = sys
        .submit_wait(&["--type", "demo.echo", "--payload", "1"])
        .await;
    assert_eq!(record["state"], "succeeded");
    assert_eq!(record["attempts"][0]["worker"], "thread-1", "a new thread");
}

/// A process worker past its timeout is ended, its process gone, and replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_worker_past_its_timeout_is_killed_and_replaced() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let flags = [
        "--worker-location",
        "process",
        "--pool-min-size",
        "1",
        "--pool-max-size",
        "1",
        "--kill-grace",
        "1s",
    ];
    let agent = sys.agent("p1", &flags);
    sys.ready(true, &["p1"]).await;
    let workers = rota_tests::children_of(agent.pid());
    assert_eq!(workers.len(), 1, "one warm worker process: {workers:?}");
    // demo.spin never awaits: only a kill stops it.
    let (_, record) = sys
        .submit_wait(&[
            "--type",
            "demo.spin",
            "--payload",
            r#"{"ms":60000}"#,
            "--timeout-s",
            "1",
        ])
        .await;
    assert_eq!(record["state"], "timed_out");
    assert!(
        !rota_tests::alive(workers[0]),
        "the worker process {} is gone",
        workers[0]
    );
    let (_, record) = sys
        .submit_wait(&["--type", "demo.echo", "--payload", "1"])
        .await;
    assert_eq!(record["state"], "succeeded");
    assert_eq!(
        record["attempts"][0]["worker"], "process-1",
        "a new process"
    );
}

/// A worker process that dies under its job reports `crashed` with the signal, and the pool
/// recovers; workers are also replaced after `--worker-max-jobs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_worker_process_is_reported_crashed_and_workers_are_recycled() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let flags = [
        "--worker-location",
        "process",
        "--pool-min-size",
        "1",
        "--pool-max-size",
        "1",
        "--worker-max-jobs",
        "2",
    ];
    let agent = sys.agent("p2", &flags);
    sys.ready(true, &["p2"]).await;
    let mut started = sys
        .client
        .watch(&[EventKind::Started])
        .await
        .expect("watch");
    let mut finished = sys.finished_events().await;
    let uuid = sys
        .client
        .publish_job(Job::new("demo.sleep", json!({"ms": 60000})))
        .await
        .expect("published");
    within(Duration::from_secs(60), "the job started", started.next()).await;
    let workers = rota_tests::children_of(agent.pid());
    assert_eq!(workers.len(), 1);
    std::process::Command::new("kill")
        .args(["-KILL", &workers[0].to_string()])
        .status()
        .expect("kill runs");
    rota_tests::event_of(&mut finished, uuid).await;
    let record = sys.client.status(uuid).await.expect("status");
    assert_eq!(record.state, JobState::Crashed);
    let error = &record.attempts[0].error.as_ref().expect("error").message;
    assert!(error.contains("signal 9"), "{error}");

    let mut seen = Vec::new();
    for _ in 0..3 {
        let (_, record) = sys
            .submit_wait(&["--type", "demo.echo", "--payload", "1"])
            .await;
        assert_eq!(record["state"], "succeeded");
        seen.push(
            record["attempts"][0]["worker"]
                .as_str()
                .expect("worker")
                .to_owned(),
        );
    }
    assert_eq!(
        seen,
        ["process-1", "process-1", "process-2"],
        "replaced after the crash, then after 2 jobs"
    );
}

/// A Work that aborts its worker runtime: `crashed` with the signal, and a new worker (a new
/// process, or a new container with the old one removed) runs the next job.
async fn abort_at(location: &'static str) {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    // `probe.abort` is a work type of the tests' runtime (in the docker image already).
    let runtime = rota_tests::bin("test-runtime").display().to_string();
    let mut flags = worker_location_flags(location).await;
    flags.extend(["--worker-runtime", &runtime, "--pool-max-size", "1"]);
    let _agent = sys.agent("abort", &flags);
    let (_, record) = sys.submit_wait(&["--type", "probe.abort"]).await;
    assert_eq!(record["state"], "crashed", "{record}");
    let error = record["attempts"][0]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("signal 6 (SIGABRT)"), "{error}");
    let (_, record) = sys
        .submit_wait(&["--type", "demo.echo", "--payload", "1"])
        .await;
    assert_eq!(record["state"], "succeeded");
    assert_eq!(
        record["attempts"][0]["worker"],
        format!("{location}-1"),
        "a new worker"
    );
    if location == "docker" {
        let names: Vec<String> = rota_tests::containers(sys.names.namespace())
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(
            names,
            [format!("{}-abort-docker-1", sys.names.namespace())],
            "the crashed one is removed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_that_aborts_its_process_is_crashed_and_the_pool_recovers() {
    abort_at("process").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_that_aborts_its_container_is_crashed_and_the_container_replaced() {
    abort_at("docker").await;
}

/// A pool of process workers runs the work types of the runtime it starts (here the
/// `custom_runtime` example: the built-ins plus `text.upper`), learnt from its handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_pool_runs_the_work_types_of_its_own_runtime() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let runtime = rota_tests::bin("examples/custom_runtime")
        .display()
        .to_string();
    let _agent = sys.agent(
        "custom",
        &["--worker-location", "process", "--worker-runtime", &runtime],
    );
    let (_, record) = sys
        .submit_wait(&["--type", "text.upper", "--payload", r#"{"text":"hello"}"#])
        .await;
    assert_eq!(record["state"], "succeeded", "{record}");
    assert_eq!(record["attempts"][0]["output"]["text"], "HELLO");
}

/// `scheduler cancel`: a running job ends `cancelled` (for process workers, its process is
/// ended), a queued one is never run, and the pool serves the next job.
async fn cancel_at(location: &'static str, busy_type: &str) {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let mut flags = worker_location_flags(location).await;
    flags.extend(["--pool-max-size", "1", "--kill-grace", "1s"]);
    let _agent = sys.agent("c1", &flags);
    sys.ready(true, &["c1"]).await;
    let mut started = sys
        .client
        .watch(&[EventKind::Started])
        .await
        .expect("watch");
    let mut finished = sys.finished_events().await;
    let running = sys
        .client
        .submit(Job::new(busy_type, json!({"ms": 60000})))
        .await
        .expect("submit")
        .uuid;
    let first = within(Duration::from_secs(60), "the job started", started.next())
        .await
        .expect("events");
    assert_eq!(first.uuid, running);
    let queued = sys
        .client
        .submit(Job::new("demo.echo", json!(1)))
        .await
        .expect("submit")
        .uuid;
    for uuid in [queued, running] {
        let out = sys.cli(&["cancel", &uuid.to_string()]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut done = HashSet::new();
    within(Duration::from_secs(60), "both cancelled", async {
        while done.len() < 2 {
            let e = finished.next().await.expect("events");
            if e.uuid == running || e.uuid == queued {
                assert_eq!(e.status, Some(Status::Cancelled), "{e:?}");
                done.insert(e.uuid);
            }
        }
    })
    .await;
    let record = sys.client.status(queued).await.expect("status");
    assert_eq!(
        record.attempts[0].error.as_ref().expect("error").message,
        "cancelled before it started"
    );
    // A job long enough to be announced (--started-delay)…
    let (_, record) = sys
        .submit_wait(&["--type", "demo.sleep", "--payload", r#"{"ms": 500}"#])
        .await;
    assert_eq!(record["state"], "succeeded", "the pool goes on");
    // …so the next started event is that job's: the queued one never started.
    let next = within(Duration::from_secs(60), "a started event", started.next())
        .await
        .expect("events");
    assert_ne!(next.uuid, queued);
    let out = sys.cli(&["cancel", &running.to_string()]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already ended"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_jobs_can_be_cancelled() {
    cancel_at("local", "demo.sleep").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_jobs_can_be_cancelled() {
    cancel_at("thread", "demo.sleep").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_jobs_can_be_cancelled_even_when_they_never_yield() {
    cancel_at("process", "demo.spin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_jobs_can_be_cancelled_even_when_they_never_yield() {
    cancel_at("docker", "demo.spin").await;
}

/// A pool keeps `min` workers warm and never runs more than `max` at once, as its heartbeats
/// and the operating system show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_keeps_min_warm_and_never_exceeds_max() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let flags = [
        "--worker-location",
        "process",
        "--pool-min-size",
        "2",
        "--pool-max-size",
        "4",
    ];
    let agent = sys.agent("mm", &flags);
    let mut beats = sys.heartbeats().await;
    let idle = sys
        .heartbeat_where(&mut beats, Role::Agent, "mm", |_| true)
        .await;
    let pool = &idle.pools[0];
    assert_eq!(
        (pool.min, pool.max, pool.busy, pool.idle),
        (2, 4, 0, 2),
        "two warm workers at idle"
    );
    assert_eq!(
        rota_tests::children_of(agent.pid()).len(),
        2,
        "two worker processes"
    );

    let mut ids = HashSet::new();
    for _ in 0..16 {
        ids.insert(
            sys.client
                .publish_job(Job::new("demo.sleep", json!({"ms": 400})))
                .await
                .expect("published"),
        );
    }
    let mut busiest = 0;
    within(Duration::from_secs(120), "every job recorded", async {
        loop {
            let hb = sys
                .heartbeat_where(&mut beats, Role::Agent, "mm", |_| true)
                .await;
            let pool = &hb.pools[0];
            assert!(
                pool.busy <= 4 && pool.busy + pool.idle <= 4,
                "over max: {pool:?}"
            );
            assert!(
                rota_tests::children_of(agent.pid()).len() <= 4,
                "more than 4 worker processes"
            );
            busiest = busiest.max(pool.busy);
            if hb.running.is_empty() && hb.unreceipted == 0 && busiest > 0 {
                let done = sys.list_all(Some(JobState::Succeeded)).await;
                if matches!(done, Ok(jobs) if jobs.len() == ids.len()) {
                    break;
                }
            }
        }
    })
    .await;
    assert_eq!(busiest, 4, "the pool grew to its max under load");
}
