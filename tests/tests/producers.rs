//! The producer examples in `examples/`, in Python (pika) and Node.js (amqplib), run as a
//! newcomer runs them, against the real broker, a real scheduler and a real pool agent: each
//! gets a job run, published straight to the jobs exchange or submitted over RPC, sees its
//! `job.finished` event, and the scheduler has recorded it. Their libraries come from
//! `deploy/setup.sh tools` (pika in `./.venv`, amqplib in `examples/node/node_modules`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rota_common::roles::UserRole;
use rota_tests::wire::{JobId, JobState};
use rota_tests::{System, within};
use serde_json::json;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// How to run one example: the interpreter and the script.
enum Example {
    Python,
    Node,
}

impl Example {
    fn command(&self) -> tokio::process::Command {
        match self {
            Example::Python => {
                // The venv's python, which has pika (deploy/setup.sh tools).
                let mut c = tokio::process::Command::new(rota_tests::tool("python"));
                c.arg(examples().join("python/submit.py"));
                c
            }
            Example::Node => {
                let dir = examples().join("node");
                assert!(
                    dir.join("node_modules/amqplib").exists(),
                    "amqplib is missing in {}: run deploy/setup.sh tools (npm ci there)",
                    dir.display()
                );
                let mut c = tokio::process::Command::new("node");
                c.arg(dir.join("submit.js"));
                c
            }
        }
    }

    /// Runs the example with `args` in the namespace of `sys`: exit code, stdout, stderr.
    async fn run(&self, sys: &System, args: &[&str]) -> (Option<i32>, String, String) {
        let out = within(Duration::from_secs(90), "the example to exit", async {
            self.command()
                .args(args)
                .envs(sys.part_env(UserRole::Producer))
                .kill_on_drop(true)
                .output()
                .await
                .expect("the example starts")
        })
        .await;
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The job id the example printed (`… job <uuid> …`).
fn job_id(stdout: &str) -> JobId {
    stdout
        .split_whitespace()
        .find_map(|word| word.parse().ok())
        .unwrap_or_else(|| panic!("no job id in the example's output: {stdout}"))
}

/// A scheduler and an agent, ready; then the example runs a job `how` (no flag: published to
/// the jobs exchange; `--rpc`: through the scheduler) and must see it succeed.
async fn runs_a_job(example: Example, how: &[&str]) {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    sys.ready(true, &["a1"]).await;

    let mut args = vec![
        "--type",
        "demo.echo",
        "--payload",
        r#"{"n": 42}"#,
        "--timeout",
        "60",
    ];
    args.extend_from_slice(how);
    let (code, stdout, stderr) = example.run(&sys, &args).await;
    assert_eq!(code, Some(0), "the example failed:\n{stdout}\n{stderr}");
    let uuid = job_id(&stdout);
    assert!(
        stdout.contains(&format!("job {uuid} finished: succeeded")),
        "{stdout}"
    );
    if how.contains(&"--rpc") {
        // The record it read back over RPC carries the Work's output.
        let output = stdout
            .lines()
            .find_map(|l| l.strip_prefix("output: "))
            .and_then(|o| serde_json::from_str::<serde_json::Value>(o).ok());
        assert_eq!(output, Some(json!({"n": 42})), "{stdout}");
    }
    // What a user would check next: the scheduler has the job, with its output.
    let record = sys.client.status(uuid).await.expect("the job is recorded");
    assert_eq!(record.state, JobState::Succeeded);
    assert_eq!(record.attempts.len(), 1);
    assert_eq!(record.attempts[0].output, json!({"n": 42}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_publishes_a_job_and_sees_it_finished() {
    runs_a_job(Example::Python, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_submits_over_rpc_and_reads_the_record() {
    runs_a_job(Example::Python, &["--rpc"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_publishes_a_job_and_sees_it_finished() {
    runs_a_job(Example::Node, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_submits_over_rpc_and_reads_the_record() {
    runs_a_job(Example::Node, &["--rpc"]).await;
}

/// A job for a queue that no agent serves is refused by the broker (published as mandatory),
/// and the example says what to do, instead of leaving the job nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_say_when_no_agent_serves_the_queue() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    sys.ready(true, &[]).await;
    for example in [Example::Python, Example::Node] {
        let (code, stdout, stderr) = example
            .run(&sys, &["--queue", "nobody-serves-this", "--timeout", "10"])
            .await;
        assert_eq!(code, Some(2), "{stdout}\n{stderr}");
        assert!(
            stderr.contains("takes the job: start a pool agent that serves it"),
            "{stderr}"
        );
    }
}
