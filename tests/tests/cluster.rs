//! A three-node RabbitMQ 4 cluster on this machine (`deploy/rabbitmq/rabbitmq4.sh cluster`:
//! containers on the host's network, nodes with ports of their own and a shared cookie), every
//! queue a quorum queue. The parts are given the nodes' URLs (ROTA_AMQP_URL may list several),
//! connect to the first that answers and move on to the next when theirs fails. Each test runs
//! its own cluster, on ports of its own, removed at the end even after a failure. They need the
//! RabbitMQ 4 image and Docker (`deploy/setup.sh`) and do not depend on the broker the suite
//! runs on, so they are ignored by a plain `cargo test`: `deploy/test.sh` runs them once, with
//! `cargo test -p rota-tests --test cluster -- --ignored`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rota_common::names::QueueType;
use rota_tests::faults::{Ledger, Tally};
use rota_tests::wire::Role;
use rota_tests::{Proc, System, bin, within};

const MINUTE: Duration = Duration::from_secs(60);

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/rabbitmq/rabbitmq4.sh")
}

/// Three nodes, `NAME-1` to `NAME-3`; removed when dropped.
struct Cluster {
    name: String,
    urls: Vec<String>,
}

impl Cluster {
    /// Starts the cluster's nodes (AMQP on ports `port`+1 to `port`+3) and joins them.
    fn up(name: &str, port: u16) -> Cluster {
        let out = Command::new(script())
            .args(["cluster", name, &port.to_string()])
            .output()
            .expect("rabbitmq4.sh runs");
        if !out.status.success() {
            let _ = Command::new(script()).args(["cluster-down", name]).status();
            panic!(
                "the cluster did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let urls: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(',')
            .map(str::to_owned)
            .collect();
        assert_eq!(urls.len(), 3, "three URLs: {urls:?}");
        Cluster {
            name: name.to_owned(),
            urls,
        }
    }

    /// The nodes' URLs for ROTA_AMQP_URL, node `first` (1 to 3) first, then the next ones.
    fn url_from(&self, first: usize) -> String {
        (0..3)
            .map(|i| self.urls[(first - 1 + i) % 3].as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn docker(&self, action: &str, node: usize) {
        let container = format!("{}-{node}", self.name);
        let ok = Command::new("docker")
            .args([action, &container])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "docker {action} {container} failed");
    }

    /// Kills node `node` (SIGKILL: no goodbye to its clients or its peers).
    fn kill(&self, node: usize) {
        self.docker("kill", node);
    }

    /// Starts node `node` again on its data, and waits until it runs (it rejoins by itself).
    fn start(&self, node: usize) {
        let ok = Command::new(script())
            .args(["node-up", &format!("{}-{node}", self.name)])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "node {node} did not start again");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["cluster-down", &self.name])
            .status();
    }
}

/// An agent with a pool of `size` `probe.count` workers, connected to `url`.
fn counting_agent(sys: &System, ledger: &mut Ledger, id: &str, size: usize, url: &str) -> Proc {
    let runtime = bin("test-runtime").display().to_string();
    let alias = ledger.runs_alias(sys, id);
    let size = size.to_string();
    sys.agent(
        id,
        &[
            "--worker-location",
            "process",
            "--worker-runtime",
            &runtime,
            "--pool-max-size",
            &size,
            "--alias",
            &alias,
            "--amqp-url",
            url,
        ],
    )
}

/// Waits until `part`'s log says it connected to another node than its first.
async fn moved_on(sys: &System, part: &Proc, who: &str) {
    let mut beats = sys.heartbeats().await;
    within(MINUTE, &format!("{who} on another node"), async {
        while !part.output().contains("connected to RabbitMQ node 2 of 3") {
            sys.heartbeat_where(&mut beats, Role::Scheduler, "scheduler", |_| true)
                .await;
        }
    })
    .await;
}

/// The node that the scheduler and an agent are connected to is killed while jobs run, then
/// started again: both move on to the next node by themselves, the quorum queues keep every
/// job and result, nothing is lost and nothing is recorded twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a RabbitMQ 4 cluster in Docker: deploy/test.sh runs it (--ignored)"]
async fn a_node_killed_under_the_scheduler_and_an_agent_loses_nothing() {
    let cluster = Cluster::up("rota-cluster-kill", 5700);
    // The test's own client on node 3, which stays up.
    let sys = System::on(&cluster.url_from(3), QueueType::Quorum).await;
    let mut ledger = Ledger::new(&sys).await;
    let on_1 = cluster.url_from(1);
    let scheduler = sys.scheduler_with(&["--amqp-url", &on_1]);
    let agent_1 = counting_agent(&sys, &mut ledger, "n1", 4, &on_1);
    let _agent_2 = counting_agent(&sys, &mut ledger, "n2", 4, &cluster.url_from(2));
    sys.ready(true, &["n1", "n2"]).await;
    let mut tally = Tally::new("the node of the scheduler and an agent killed (3-node cluster)");

    // 10 s of work for 8 workers: jobs run on both agents while the node goes.
    let ids = ledger.publish_counted(&sys, 80, 1_000).await;
    ledger.started(&ids[..8], MINUTE).await;
    cluster.kill(1);
    tally.injections += 1;
    moved_on(&sys, &scheduler, "the scheduler").await;
    moved_on(&sys, &agent_1, "agent n1").await;
    if !ledger.recorded(&sys, 3 * MINUTE).await {
        tally.problem("not every job recorded while node 1 was down");
    }

    // The node comes back; more jobs, with the parts where they moved to.
    cluster.start(1);
    ledger.publish_counted(&sys, 16, 200).await;
    if !ledger.recorded(&sys, 2 * MINUTE).await {
        tally.problem("not every job recorded after node 1 came back");
    }
    ledger.settle(&sys, &["n1", "n2"], MINUTE).await;
    ledger.tally_into(&sys, &mut tally).await;
    println!("{}", Tally::table(std::slice::from_ref(&tally)));
    // A job held by agent n1 when its node died may run again on n2 (RabbitMQ returns it to
    // the queue): two runs at most, never two on one agent, one record.
    tally.assert_holds(2);
}

/// Two agents on different nodes of the cluster share the work of one quorum queue, and the
/// scheduler on a third node records every result once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a RabbitMQ 4 cluster in Docker: deploy/test.sh runs it (--ignored)"]
async fn two_agents_on_different_nodes_share_the_work() {
    let cluster = Cluster::up("rota-cluster-two", 5710);
    let sys = System::on(&cluster.url_from(1), QueueType::Quorum).await;
    let mut ledger = Ledger::new(&sys).await;
    let _scheduler = sys.scheduler_with(&["--amqp-url", &cluster.url_from(3)]);
    let _agent_1 = counting_agent(&sys, &mut ledger, "m1", 2, &cluster.url_from(1));
    let _agent_2 = counting_agent(&sys, &mut ledger, "m2", 2, &cluster.url_from(2));
    sys.ready(true, &["m1", "m2"]).await;
    let mut tally = Tally::new("two agents on two nodes (3-node cluster)");
    ledger.publish_counted(&sys, 40, 300).await;
    if !ledger.recorded(&sys, 2 * MINUTE).await {
        tally.problem("not every job recorded");
    }
    ledger.settle(&sys, &["m1", "m2"], MINUTE).await;
    ledger.tally_into(&sys, &mut tally).await;
    println!("{}", Tally::table(std::slice::from_ref(&tally)));
    tally.assert_holds(1);
    let runs = ledger.runs();
    for agent in ["m1", "m2"] {
        let on_agent = runs
            .values()
            .filter(|r| r.iter().any(|a| a == agent))
            .count();
        assert!(on_agent > 0, "agent {agent} ran none of the jobs: {runs:?}");
    }
}
