//! What a Work can reach, tried as a Work would: its environment (the pool's, never the
//! agent's credentials), files outside its alias folders through a symlink, and the host's
//! loopback from a container.

use std::collections::BTreeMap;

use rota_tests::{System, bin, worker_location_flags};
use serde_json::json;

/// The environment a `probe.env` job saw, at `location`.
async fn environment_at(sys: &System, location: &'static str) -> BTreeMap<String, String> {
    let runtime = bin("test-runtime").display().to_string();
    let mut flags = worker_location_flags(location).await;
    flags.extend([
        "--worker-runtime",
        &runtime,
        "--queue",
        location,
        "--work-env",
        "GREETING=hello world",
        "--work-env-pass",
        "RUST_BACKTRACE",
    ]);
    let _agent = sys.agent(location, &flags);
    let (_, record) = sys
        .submit_wait(&["--type", "probe.env", "--queue", location])
        .await;
    assert_eq!(record["state"], "succeeded", "{record}");
    serde_json::from_value(record["attempts"][0]["output"].clone()).expect("name → value")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_gets_the_allow_list_and_the_pools_variables_never_the_agents_credentials() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    // The agents run with ROTA_AMQP_URL, ROTA_NAMESPACE, RUST_LOG and RUST_BACKTRACE set (see
    // `rota_tests::Proc`); only the one passed on may reach Work.
    for location in ["process", "docker"] {
        let env = environment_at(&sys, location).await;
        assert_eq!(
            env.get("GREETING").map(String::as_str),
            Some("hello world"),
            "{location}: {env:?}"
        );
        assert_eq!(
            env.get("RUST_BACKTRACE").map(String::as_str),
            Some("0"),
            "{location}"
        );
        for never in ["ROTA_AMQP_URL", "ROTA_NAMESPACE", "RUST_LOG"] {
            assert!(!env.contains_key(never), "{location} sees {never}: {env:?}");
        }
        // Docker sets HOSTNAME in every container.
        let expected = |k: &str| {
            rota_worker_runtime::work_env::allowed(k)
                || ["GREETING", "RUST_BACKTRACE"].contains(&k)
                || (location == "docker" && k == "HOSTNAME")
        };
        assert!(env.keys().all(|k| expected(k)), "{location}: {env:?}");
        assert!(env.contains_key("PATH"), "{location}: {env:?}");
        if location == "docker" {
            assert_eq!(env["HOME"], "/tmp", "the container's HOME, not the host's");
        } else {
            assert_eq!(env.get("HOME"), std::env::var("HOME").ok().as_ref());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_never_hands_its_broker_url_to_work() {
    let sys = System::new().await;
    let out = tokio::process::Command::new(bin("pool-agent"))
        .args(["run", "--id", "leaky", "--work-env-pass", "ROTA_AMQP_URL"])
        .env("ROTA_AMQP_URL", &sys.url)
        .env("ROTA_NAMESPACE", sys.names.namespace())
        .output()
        .await
        .expect("pool-agent runs");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("ROTA_AMQP_URL: the agent's broker settings are never given to Work"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_dangling_symlink_out_of_an_alias_is_refused_and_creates_nothing() {
    let sys = System::new().await;
    let alias_dir = sys.dir.path().join("alias");
    let outside = sys.dir.path().join("outside");
    std::fs::create_dir_all(&alias_dir).expect("folder");
    std::fs::create_dir_all(&outside).expect("folder");
    let target = outside.join("planted");
    std::os::unix::fs::symlink(&target, alias_dir.join("link")).expect("symlink");
    std::os::unix::fs::symlink(&outside, alias_dir.join("dir-link")).expect("symlink");
    let _scheduler = sys.scheduler();
    let runtime = bin("test-runtime").display().to_string();
    let alias = format!("data={}", alias_dir.display());
    let _agent = sys.agent(
        "symlinks",
        &[
            "--worker-location",
            "process",
            "--worker-runtime",
            &runtime,
            "--alias",
            &alias,
        ],
    );
    for path in ["data/link", "data/dir-link/planted"] {
        let payload = json!({"file": path}).to_string();
        let (_, record) = sys
            .submit_wait(&["--type", "probe.count", "--payload", &payload])
            .await;
        assert_eq!(record["state"], "failed", "{path}: {record}");
        let error = record["attempts"][0]["error"]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            error.contains("leaves its alias's folder"),
            "{path}: {error}"
        );
    }
    assert!(!target.exists(), "nothing was created outside the alias");
    assert_eq!(std::fs::read_dir(&outside).expect("listed").count(), 0);
    // The alias still works for what is inside it.
    let payload = json!({"file": "data/inside"}).to_string();
    let (_, record) = sys
        .submit_wait(&["--type", "probe.count", "--payload", &payload])
        .await;
    assert_eq!(record["state"], "succeeded", "{record}");
    assert!(alias_dir.join("inside").is_file());
}
