//! Worker locations: the same Work at each isolation level the agent offers.

use rota_tests::{System, amqp_url};
use serde_json::Value;

/// Runs `scheduler demo` with workers at `location`: every demo work ends as expected,
/// including a panic (`crashed`) followed by jobs that succeed on the same pool.
async fn demo_at(location: &str) {
    let sys = System::new().await;
    sys.owns_agent("demo");
    let out = tokio::process::Command::new(rota_tests::bin("scheduler"))
        .args([
            "demo",
            "--clean",
            "--jobs",
            "12",
            "--worker-location",
            location,
            "--pool-max-size",
            "3",
        ])
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
}

/// A Work that sleeps past its timeout ends `timed_out`, and the pool serves the next job.
async fn timeout_at(location: &str) {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent(
        "loc",
        &["--worker-location", location, "--pool-max-size", "1"],
    );
    let out = sys
        .cli(&[
            "submit",
            "--type",
            "demo.sleep",
            "--payload",
            r#"{"ms":60000}"#,
            "--timeout-s",
            "1",
            "--wait",
            "--json",
        ])
        .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record: Value = serde_json::from_slice(&out.stdout).expect("JSON record");
    assert_eq!(record["state"], "timed_out");
    assert!(
        record["attempts"][0]["worker"]
            .as_str()
            .expect("worker")
            .starts_with(location)
    );
    let out = sys
        .cli(&["submit", "--type", "demo.echo", "--payload", "1", "--wait"])
        .await;
    assert!(
        out.status.success(),
        "the next job runs: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_workers_run_the_demo_works() {
    demo_at("thread").await;
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
    let out = sys
        .cli(&[
            "submit",
            "--type",
            "demo.spin",
            "--payload",
            r#"{"ms":20000}"#,
            "--timeout-s",
            "1",
            "--wait",
            "--json",
        ])
        .await;
    let record: Value = serde_json::from_slice(&out.stdout).expect("JSON record");
    assert_eq!(record["state"], "timed_out");
    let error = record["attempts"][0]["error"]["message"]
        .as_str()
        .expect("message");
    assert!(error.contains("abandoned and replaced"), "{error}");
    assert_eq!(record["attempts"][0]["worker"], "thread-0");
    let out = sys
        .cli(&[
            "submit",
            "--type",
            "demo.echo",
            "--payload",
            "1",
            "--wait",
            "--json",
        ])
        .await;
    let record: Value = serde_json::from_slice(&out.stdout).expect("JSON record");
    assert_eq!(record["state"], "succeeded");
    assert_eq!(record["attempts"][0]["worker"], "thread-1", "a new thread");
}
