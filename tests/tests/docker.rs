//! `docker` workers: what the hardened container holds a Work to (user, capabilities,
//! read-only root, network: none, a Docker network, the host's; memory and process limits),
//! and how the agent keeps its containers tidy. Runs the tests' worker runtime
//! (`test-runtime`, with its `probe.*` works) in the image built by
//! `deploy/images/worker/build.sh`.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use rota_tests::{System, containers, within, worker_image};
use serde_json::{Value, json};

/// `scheduler submit --type T --payload P [--queue Q] --wait`: the job's record.
async fn run(sys: &System, work_type: &str, payload: Value, queue: &str) -> Value {
    let payload = payload.to_string();
    sys.submit_wait(&["--type", work_type, "--payload", &payload, "--queue", queue])
        .await
        .1
}

/// A folder the container's user may write, to serve as an alias.
fn shared_folder(sys: &System) -> std::path::PathBuf {
    let dir = sys.dir.path().join("shared");
    std::fs::create_dir_all(&dir).expect("folder");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_work_runs_unprivileged_without_network_on_a_read_only_root() {
    let sys = System::new().await;
    let image = worker_image().await;
    let shared = shared_folder(&sys);
    let alias = format!("shared={}", shared.display());
    let _scheduler = sys.scheduler();
    let _none = sys.agent(
        "sandbox",
        &[
            "--worker-location",
            "docker",
            "--docker-image",
            image,
            "--alias",
            &alias,
        ],
    );
    let _host = sys.agent(
        "hostnet",
        &[
            "--worker-location",
            "docker",
            "--docker-image",
            image,
            "--docker-network",
            "host",
            "--queue",
            "hostnet",
        ],
    );
    let probe = json!({
        "write": ["/probe", "/usr/local/bin/probe", "/tmp/probe", shared.join("probe")],
        "connect": "127.0.0.1:5672",
    });
    let record = run(&sys, "probe.sandbox", probe.clone(), "default").await;
    assert_eq!(record["state"], "succeeded", "{record}");
    let seen = &record["attempts"][0]["output"];
    assert_eq!(seen["uid"], "65534", "not root: {seen}");
    assert_eq!(
        seen["cap_eff"], "0000000000000000",
        "no capabilities: {seen}"
    );
    assert_eq!(seen["no_new_privs"], "1", "{seen}");
    for path in ["/probe", "/usr/local/bin/probe"] {
        let err = seen["write"][path]["Err"].as_str().unwrap_or_default();
        assert!(err.contains("Read-only file system"), "{path}: {seen}");
    }
    assert!(
        seen["write"]["/tmp/probe"]["Ok"].is_null(),
        "/tmp is writable: {seen}"
    );
    assert_eq!(
        std::fs::read_to_string(shared.join("probe")).expect("written through the mount"),
        "probe",
        "the alias folder is the same folder inside and outside"
    );
    assert!(seen["connect"]["Err"].is_string(), "no network: {seen}");
    assert_eq!(
        seen["docker_sock"], false,
        "no Docker socket inside: {seen}"
    );

    let record = run(
        &sys,
        "probe.sandbox",
        json!({"connect": "127.0.0.1:5672"}),
        "hostnet",
    )
    .await;
    assert_eq!(
        record["attempts"][0]["output"]["connect"]["Ok"], "connected",
        "--docker-network host reaches the host's RabbitMQ: {record}"
    );

    // A Docker network of its own: the container's loopback is its own, not the host's.
    let network = "rota-test-work";
    let _ = std::process::Command::new("docker")
        .args(["network", "create", network])
        .output();
    let _named = sys.agent(
        "ownnet",
        &[
            "--worker-location",
            "docker",
            "--docker-image",
            image,
            "--docker-network",
            network,
            "--queue",
            "ownnet",
        ],
    );
    let record = run(
        &sys,
        "probe.sandbox",
        json!({"connect": "127.0.0.1:5672"}),
        "ownnet",
    )
    .await;
    let connect = &record["attempts"][0]["output"]["connect"];
    assert!(
        connect["Err"]
            .as_str()
            .unwrap_or_default()
            .contains("refused"),
        "a Docker network does not reach the host's loopback: {record}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_process_limits_hold_and_the_pool_recovers() {
    let sys = System::new().await;
    let image = worker_image().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent(
        "limits",
        &[
            "--worker-location",
            "docker",
            "--docker-image",
            image,
            "--pool-max-size",
            "1",
            "--docker-memory-mib",
            "64",
            "--docker-pids-limit",
            "32",
        ],
    );
    let record = run(&sys, "probe.alloc", json!({"mib": 256}), "default").await;
    assert_eq!(record["state"], "crashed", "{record}");
    let error = record["attempts"][0]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("memory limit of 64 MiB"), "{error}");

    let record = run(&sys, "probe.fork", json!({"max": 1000}), "default").await;
    assert_eq!(record["state"], "succeeded", "{record}");
    let out = &record["attempts"][0]["output"];
    assert!(
        out["started"].as_u64().expect("count") < 32,
        "a fork bomb stops at the pids limit: {out}"
    );
    assert!(
        out["refused"]
            .as_str()
            .unwrap_or_default()
            .contains("Resource temporarily unavailable"),
        "{out}"
    );

    let record = run(&sys, "demo.echo", json!(1), "default").await;
    assert_eq!(record["state"], "succeeded", "the pool goes on: {record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_removes_its_containers_when_it_stops_and_those_a_killed_run_left() {
    let sys = System::new().await;
    let image = worker_image().await;
    let ns = sys.names.namespace().to_owned();
    let flags = [
        "--worker-location",
        "docker",
        "--docker-image",
        image,
        "--pool-min-size",
        "2",
    ];
    let mut agent = sys.agent("tidy", &flags);
    sys.ready(false, &["tidy"]).await;
    let before = containers(&ns);
    assert_eq!(
        before.len(),
        2,
        "two warm workers, a container each: {before:?}"
    );
    assert!(before.iter().all(|c| c.state == "running"));

    agent.kill().await;
    let mut agent = sys.agent("tidy", &flags);
    // The new run removes what the killed one left, then starts its own two.
    within(Duration::from_secs(60), "the new run's containers", async {
        let mut beats = sys.heartbeats().await;
        loop {
            let now = containers(&ns);
            if now.len() == 2 && now.iter().all(|c| !before.iter().any(|b| b.id == c.id)) {
                return;
            }
            beats.next().await;
        }
    })
    .await;

    let status = agent.terminate().await.expect("stops");
    assert!(status.success());
    assert_eq!(containers(&ns), [], "a stopped agent leaves no container");
}
