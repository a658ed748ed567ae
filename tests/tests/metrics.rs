//! `--http-addr`: `/healthz`, `/readyz` and the Prometheus `/metrics` of the scheduler and a
//! pool agent, read the way Kubernetes and Prometheus read them. (`/readyz` while the broker is
//! down is in `broker_restart.rs`, which alone may stop the broker.)

use rota_tests::wire::Job;
use rota_tests::{System, free_addrs, http_get, probe_until, within};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_serve_health_and_the_metrics_of_the_jobs_that_ran() {
    let sys = System::new().await;
    let [sched_addr, agent_addr] = free_addrs();
    let _scheduler = sys.scheduler_with(&["--http-addr", &sched_addr]);
    let _agent = sys.agent("m1", &["--http-addr", &agent_addr, "--pool-max-size", "3"]);
    sys.ready(true, &["m1"]).await;
    for addr in [&sched_addr, &agent_addr] {
        assert_eq!(http_get(addr, "/healthz").await.map(|r| r.0), Some(200));
        probe_until(addr, "/readyz", 200).await;
    }

    let mut finished = sys.finished_events().await;
    for (work_type, payload) in [("demo.echo", "1"), ("demo.echo", "2"), ("demo.fail", "{}")] {
        sys.submit_wait(&["--type", work_type, "--payload", payload])
            .await;
    }
    let unknown = sys
        .client
        .publish_job(Job::new("no.such.work", json!(null)))
        .await
        .expect("published");
    rota_tests::event_of(&mut finished, unknown).await;
    // A schedule that fires every second, removed after its first job.
    let out = sys
        .cli(&[
            "schedule",
            "add",
            "tick",
            "--cron",
            "* * * * * *",
            "--type",
            "demo.sleep",
            "--payload",
            r#"{"ms":1}"#,
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    within(
        std::time::Duration::from_secs(30),
        "the schedule's first job",
        async { while finished.next().await.expect("events").work_type != "demo.sleep" {} },
    )
    .await;
    sys.cli(&["schedule", "remove", "tick"]).await;

    let (status, scheduler) = http_get(&sched_addr, "/metrics").await.expect("answers");
    assert_eq!(status, 200);
    let (_, agent) = http_get(&agent_addr, "/metrics").await.expect("answers");
    for (text, who) in [(&scheduler, "scheduler"), (&agent, "agent")] {
        let jobs = if who == "agent" {
            "rota_jobs_run_total"
        } else {
            "rota_jobs_recorded_total"
        };
        for line in [
            format!(r#"{jobs}{{type="demo.echo",status="succeeded"}} 2"#),
            format!(r#"{jobs}{{type="demo.fail",status="failed"}} 1"#),
            format!(r#"{jobs}{{type="no.such.work",status="rejected"}} 1"#),
            "rota_broker_connected 1".into(),
            "rota_broker_reconnects_total 0".into(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{who} lacks {line}:\n{text}"
            );
        }
    }
    assert!(
        scheduler.lines().any(|l| l == "rota_agents_alive 1"),
        "the scheduler counts the live agent:\n{scheduler}"
    );
    assert!(
        scheduler
            .lines()
            .any(|l| l.starts_with(r#"rota_schedule_fires_total{schedule="tick"} "#)),
        "the scheduler counts the schedule's fires:\n{scheduler}"
    );
    for line in [
        r#"rota_job_run_seconds_count{type="demo.echo"} 2"#,
        r#"rota_dead_lettered_total{reason="unknown_type"} 1"#,
        "rota_pool_max_workers 3",
        "rota_outbox_results 0",
    ] {
        assert!(
            agent.lines().any(|l| l == line),
            "agent lacks {line}:\n{agent}"
        );
    }
    for state in ["busy", "idle"] {
        let gauge = format!(r#"rota_pool_workers{{state="{state}"}} "#);
        assert!(
            agent.lines().any(|l| l.starts_with(&gauge)),
            "agent lacks {gauge}:\n{agent}"
        );
    }
    assert_eq!(
        http_get(&agent_addr, "/nope").await.map(|r| r.0),
        Some(404),
        "an unknown path says so"
    );
    // Every metric the Grafana dashboard charts is one the daemons serve.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/rota.json"),
    )
    .expect("the dashboard");
    let served = |name: &str| {
        [&scheduler, &agent].iter().any(|text| {
            text.lines().any(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
        })
    };
    let charted: Vec<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("rota_"))
        .collect();
    assert!(charted.len() > 10, "{charted:?}");
    for name in charted {
        assert!(
            served(name),
            "the dashboard charts {name}, which no daemon serves"
        );
    }
}
