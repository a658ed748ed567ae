//! The broker restarts during a run (`rabbitmqctl stop_app` / `start_app`): every part
//! reconnects by itself and nothing is lost. This stops the shared broker, so it is the only
//! test in its binary (cargo runs test binaries one after another).

use std::collections::HashSet;
use std::time::Duration;

use rota_tests::wire::{Job, JobId, JobState, Role};
use rota_tests::{System, free_addrs, http_get, probe_until, within};
use serde_json::json;

fn rabbitmqctl(args: &[&str]) {
    let status = rota_tests::rabbitmqctl()
        .args(args)
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parts_reconnect_after_a_broker_restart_and_nothing_is_lost() {
    let sys = System::new().await;
    let [sched_addr, agent_addr] = free_addrs();
    let scheduler = sys.scheduler_with(&["--http-addr", &sched_addr]);
    // Results sent before the broker stops and lost with it (results and receipts are
    // transient) are sent again after each reconnect; the resend timer's pass, every second
    // here, waits for the broker while it is away, and the reconnect must not be missed
    // meanwhile: it was, before, and those results then waited for their receipt timeout
    // (5 minutes, longer than this test waits).
    let _agent = sys.agent(
        "r1",
        &[
            "--pool-max-size",
            "8",
            "--http-addr",
            &agent_addr,
            "--resend-interval",
            "1s",
        ],
    );
    sys.ready(true, &["r1"]).await;
    let mut finished = sys.finished_events().await;
    let mut beats = sys.heartbeats().await;
    let mut ids = HashSet::new();
    // 10 s of work for 8 workers, so that jobs surely run while the broker stops (1-3 s).
    for _ in 0..200 {
        let mut job = Job::new("demo.sleep", json!({ "ms": 400 }));
        job.uuid = Some(JobId::random());
        ids.insert(sys.client.publish_job(job).await.expect("published"));
    }
    within(Duration::from_secs(60), "30 jobs finished", async {
        for _ in 0..30 {
            finished.next().await.expect("events");
        }
    })
    .await;
    within(
        Duration::from_secs(60),
        "a heartbeat with jobs running",
        sys.heartbeat_where(&mut beats, Role::Agent, "r1", |hb| !hb.running.is_empty()),
    )
    .await;
    // Results confirmed by RabbitMQ and not yet receipted when it stops: the scheduler is
    // frozen for a moment, so that they wait in the results queue and are lost with it.
    scheduler.signal("STOP");
    within(
        Duration::from_secs(60),
        "results waiting for their receipt",
        sys.heartbeat_where(&mut beats, Role::Agent, "r1", |hb| hb.unreceipted >= 8),
    )
    .await;
    drop(beats);

    rabbitmqctl(&["stop_app"]);
    scheduler.signal("CONT");
    // Not ready while the broker is away (so Kubernetes takes them out of service), though
    // alive (so it does not restart them)…
    for addr in [&sched_addr, &agent_addr] {
        let why = probe_until(addr, "/readyz", 503).await;
        assert!(why.contains("RabbitMQ"), "{why}");
        assert_eq!(http_get(addr, "/healthz").await.map(|r| r.0), Some(200));
    }
    // RabbitMQ 4.0.5 may refuse to start at the first try: it checks whether a refused
    // deprecated feature is in use before its tables are loaded, takes that for "in use"
    // (failed_to_deny_deprecated_features) and stops; a second start finds them.
    let started = (0..5).any(|_| {
        rota_tests::rabbitmqctl()
            .arg("start_app")
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(started, "rabbitmqctl start_app failed five times");
    rabbitmqctl(&["await_startup"]);
    // …and ready again once they have reconnected.
    for addr in [&sched_addr, &agent_addr] {
        probe_until(addr, "/readyz", 200).await;
    }

    // The test's own client reconnects too; the heartbeats prove the parts are back.
    sys.ready(true, &["r1"]).await;
    let mut beats = sys.heartbeats().await;
    within(
        Duration::from_secs(180),
        "every job recorded after the restart",
        sys.settled(&mut beats, "r1", &ids),
    )
    .await;
    let jobs = sys.list_all(None).await.expect("list");
    let recorded: HashSet<JobId> = jobs.iter().map(|j| j.uuid).collect();
    assert_eq!(recorded, ids, "every job recorded, none extra");
    for j in &jobs {
        assert_eq!(j.state, JobState::Succeeded);
        assert_eq!(
            j.attempts.iter().filter(|a| a.status.is_some()).count(),
            1,
            "one recorded run of {}",
            j.uuid
        );
    }
}
