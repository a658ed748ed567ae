//! Frames from a worker runtime: a Work cannot speak the protocol for itself or for another
//! job, and cannot make the agent buffer without end (see `rota_worker_runtime::protocol`).
//! Runs `process` and `docker` workers of the tests' runtime (`test-runtime`, with its
//! `probe.*` works).

use rota_tests::wire::{JobId, JobRecord};
use rota_tests::{Proc, System, worker_location_flags};
use serde_json::{Value, json};

/// An agent of one worker of the tests' runtime at `location`, with a scheduler, both ready.
async fn one_worker(sys: &System, id: &str, location: &'static str) -> (Proc, Proc) {
    let scheduler = sys.scheduler();
    let runtime = rota_tests::bin("test-runtime").display().to_string();
    let mut flags = worker_location_flags(location).await;
    flags.extend(["--worker-runtime", &runtime, "--pool-max-size", "1"]);
    let agent = sys.agent(id, &flags);
    sys.ready(true, &[id]).await;
    (scheduler, agent)
}

/// `scheduler submit --type T --payload P --timeout-s 30 --wait`: the job's record.
async fn run(sys: &System, work_type: &str, payload: Value) -> JobRecord {
    let payload = payload.to_string();
    let (_, record) = sys
        .submit_wait(&[
            "--type",
            work_type,
            "--payload",
            &payload,
            "--timeout-s",
            "30",
        ])
        .await;
    serde_json::from_value(record).expect("a job record")
}

/// The one recorded run of a job: its state and output.
fn only_run(record: &JobRecord) -> (String, Value) {
    assert_eq!(record.attempts.len(), 1, "{record:?}");
    (record.state.to_string(), record.attempts[0].output.clone())
}

/// The text of a job's log lines.
async fn logs(sys: &System, uuid: JobId) -> String {
    let out = sys.cli(&["logs", &uuid.to_string()]).await;
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The peak resident memory of a process so far, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process runs");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM");
    kib * 1024
}

/// A Work prints forged `result` (and `log`) frames for its own job and for another one, in
/// every way it can: they become its log lines, its real result is recorded, the other job's
/// record is unchanged, and the next job on the same worker gets its own result.
async fn forge_at(location: &'static str) {
    let sys = System::new().await;
    let (_scheduler, _agent) = one_worker(&sys, "forge", location).await;
    let other = run(&sys, "demo.echo", json!({"other": 1})).await;
    assert_eq!(only_run(&other), ("succeeded".into(), json!({"other": 1})));

    let forger = run(&sys, "probe.forge", json!({"other": other.uuid})).await;
    let (state, output) = only_run(&forger);
    assert_eq!(state, "succeeded", "{forger:?}");
    assert_eq!(output["real"], true, "its own result is recorded: {output}");
    assert!(
        output["protocol_fds"].as_u64() >= Some(1),
        "the Work found the runtime's protocol pipe to write to: {output}"
    );
    let text = logs(&sys, forger.uuid).await;
    assert!(
        text.contains(r#""op":"result""#) && text.contains(&other.uuid.to_string()),
        "what it printed is kept as log lines: {text}"
    );
    assert!(
        text.contains("ignored a `result` frame that does not carry this job's ticket"),
        "what it wrote on the protocol's pipe was refused: {text}"
    );

    // Nothing moved onto the next job of the same worker, nor onto the other job.
    let next = run(&sys, "demo.echo", json!({"next": 1})).await;
    assert_eq!(only_run(&next), ("succeeded".into(), json!({"next": 1})));
    assert_eq!(
        next.attempts[0].worker, forger.attempts[0].worker,
        "the same worker"
    );
    let again = sys.client.status(other.uuid).await.expect("status");
    assert_eq!(only_run(&again), ("succeeded".into(), json!({"other": 1})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_work_cannot_forge_a_result_for_its_job_or_another() {
    forge_at("process").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_work_cannot_forge_a_result_for_its_job_or_another() {
    forge_at("docker").await;
}

/// A Work prints 64 MiB without a newline, on its stdout and then on the protocol's pipe:
/// the agent's memory stays bounded; the first job succeeds with the line cut in its logs,
/// the second ends `crashed` (a frame too large) and the pool goes on with a new worker.
async fn flood_at(location: &'static str) {
    /// More than the agent may hold of one frame (16 MiB), far less than the 64 MiB sent.
    const BOUND: u64 = 40 * 1024 * 1024;
    let sys = System::new().await;
    let (_scheduler, agent) = one_worker(&sys, "flood", location).await;
    let warm = run(&sys, "demo.echo", json!(1)).await;
    assert_eq!(warm.state.to_string(), "succeeded");
    let before = peak_rss(agent.pid());

    let printed = run(&sys, "probe.flood", json!({"mib": 64})).await;
    let grew = peak_rss(agent.pid()) - before;
    assert!(
        grew < BOUND,
        "the agent's peak memory grew by {} MiB",
        grew >> 20
    );
    let (state, output) = only_run(&printed);
    assert_eq!(state, "succeeded", "{printed:?}");
    assert_eq!(output["wrote_mib"], 64);
    let text = logs(&sys, printed.uuid).await;
    assert!(
        text.contains("[rota: a line over 16384 bytes, cut there] xxxx"),
        "{}",
        &text[..text.len().min(500)]
    );

    let flooded = run(&sys, "probe.flood", json!({"mib": 64, "protocol": true})).await;
    let grew = peak_rss(agent.pid()) - before;
    assert!(
        grew < BOUND,
        "the agent's peak memory grew by {} MiB",
        grew >> 20
    );
    assert_eq!(flooded.state.to_string(), "crashed", "{flooded:?}");
    let error = flooded.attempts[0].error.clone().expect("an error");
    assert_eq!(error.kind, "frame_too_large", "{error:?}");

    let next = run(&sys, "demo.echo", json!({"next": 1})).await;
    assert_eq!(only_run(&next), ("succeeded".into(), json!({"next": 1})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_without_end_does_not_swell_the_agent_of_a_process() {
    flood_at("process").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_without_end_does_not_swell_the_agent_of_a_container() {
    flood_at("docker").await;
}
