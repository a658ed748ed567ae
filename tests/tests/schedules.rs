//! Time-based schedules end to end: a schedule every second fires once per second; pause,
//! resume and remove take effect; a scheduler killed and restarted fires no time twice;
//! schedules come from the config file; bad ones are refused with a reason.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rota_tests::wire::{JobRecord, JobState, ScheduleInfo};
use rota_tests::{System, event_of, within};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

async fn cli_json(sys: &System, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = sys.cli(&all).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "scheduler {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Every recorded job that schedule `name` fired, by fire time.
async fn fired_by(sys: &System, name: &str) -> Vec<JobRecord> {
    let Ok(jobs) = sys.list_all(None).await else {
        panic!("cannot list the jobs");
    };
    let mut jobs: Vec<JobRecord> = jobs
        .into_iter()
        .filter(|j| j.job.schedule.as_deref() == Some(name))
        .collect();
    jobs.sort_by_key(|j| j.job.run_at);
    jobs
}

/// Waits for `n` more finished jobs fired by schedule `name`; returns their fire times.
async fn next_fires(
    sys: &System,
    events: &mut rota_common::client::Events,
    name: &str,
    n: usize,
) -> Vec<DateTime<Utc>> {
    within(MINUTE, "the schedule's jobs", async {
        let mut out = Vec::new();
        while out.len() < n {
            let e = events.next().await.expect("events");
            let r = sys.client.status(e.uuid).await.expect("status");
            if r.job.schedule.as_deref() == Some(name) {
                assert_eq!(r.state, JobState::Succeeded);
                out.push(r.job.run_at.expect("the fire time"));
            }
        }
        out
    })
    .await
}

/// Lets a couple of seconds pass without sleeping: a job delayed by 2 s runs and ends.
async fn two_seconds_pass(sys: &System, events: &mut rota_common::client::Events) {
    let held = cli_json(sys, &["submit", "--type", "demo.echo", "--delay", "2s"]).await;
    let uuid = serde_json::from_value(held["uuid"].clone()).expect("uuid");
    event_of(events, uuid).await;
}

fn assert_each_second_once(times: &[DateTime<Utc>]) {
    for pair in times.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            chrono::Duration::seconds(1),
            "fire times must follow each other by one second, none twice: {times:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_every_second_fires_and_pause_resume_remove_take_effect() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("s1", &["--pool-max-size", "4"]);
    sys.ready(true, &["s1"]).await;
    let mut events = sys.finished_events().await;

    let added: ScheduleInfo = serde_json::from_value(
        cli_json(
            &sys,
            &[
                "schedule",
                "add",
                "tick",
                "--cron",
                "* * * * * *",
                "--type",
                "demo.echo",
                "--payload",
                r#"{"hi": 1}"#,
            ],
        )
        .await,
    )
    .expect("a schedule");
    assert!(added.next_fire.is_some() && !added.paused);
    let first = next_fires(&sys, &mut events, "tick", 3).await;
    let fired = fired_by(&sys, "tick").await;
    assert_each_second_once(
        &fired
            .iter()
            .filter_map(|j| j.job.run_at)
            .collect::<Vec<_>>(),
    );
    assert_eq!(fired[0].job.payload, json!({"hi": 1}));

    let listed: Vec<ScheduleInfo> =
        serde_json::from_value(cli_json(&sys, &["schedule", "list"]).await).expect("schedules");
    assert_eq!(listed.len(), 1);
    let last = listed[0].last_fire.expect("a last fire time");
    assert!(last >= *first.last().expect("fired"));
    assert!(listed[0].next_fire.expect("a next fire time") > last);
    let text = String::from_utf8_lossy(&sys.cli(&["schedule", "list"]).await.stdout).to_string();
    assert!(
        text.contains("tick") && text.contains("* * * * * *") && text.contains("active"),
        "{text}"
    );

    // Paused: no more fires.
    let paused: ScheduleInfo =
        serde_json::from_value(cli_json(&sys, &["schedule", "pause", "tick"]).await)
            .expect("schedule");
    assert!(paused.paused && paused.next_fire.is_none());
    let at_pause = fired_by(&sys, "tick").await.len();
    two_seconds_pass(&sys, &mut events).await;
    assert_eq!(
        fired_by(&sys, "tick").await.len(),
        at_pause,
        "a paused schedule fires nothing"
    );

    // Resumed: fires again, from now on.
    let resumed_at = Utc::now();
    cli_json(&sys, &["schedule", "resume", "tick"]).await;
    let again = next_fires(&sys, &mut events, "tick", 1).await;
    assert!(
        again[0] >= resumed_at - chrono::Duration::seconds(1),
        "{again:?}"
    );

    // Removed: no more fires, and it is gone from the list.
    cli_json(&sys, &["schedule", "remove", "tick"]).await;
    let at_remove = fired_by(&sys, "tick").await.len();
    two_seconds_pass(&sys, &mut events).await;
    assert_eq!(fired_by(&sys, "tick").await.len(), at_remove);
    assert_eq!(cli_json(&sys, &["schedule", "list"]).await, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_killed_and_restarted_fires_no_time_twice() {
    let sys = System::new().await;
    let grace = ["--schedule-grace", "60s"];
    let mut scheduler = sys.scheduler_with(&grace);
    let _agent = sys.agent("s2", &["--pool-max-size", "4"]);
    sys.ready(true, &["s2"]).await;
    let mut events = sys.finished_events().await;
    cli_json(
        &sys,
        &[
            "schedule",
            "add",
            "tick",
            "--cron",
            "* * * * * *",
            "--type",
            "demo.echo",
        ],
    )
    .await;
    next_fires(&sys, &mut events, "tick", 3).await;

    scheduler.kill().await;
    let _scheduler = sys.scheduler_with(&grace);
    next_fires(&sys, &mut events, "tick", 3).await;
    let times: Vec<DateTime<Utc>> = fired_by(&sys, "tick")
        .await
        .iter()
        .filter_map(|j| j.job.run_at)
        .collect();
    assert!(times.len() >= 6);
    // Within the grace period nothing is missed either: one job for every second.
    assert_each_second_once(&times);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_come_from_the_config_file_and_bad_ones_are_refused() {
    let sys = System::new().await;
    let config = sys.dir.path().join("rota.toml");
    std::fs::write(
        &config,
        r#"
default-max-attempts = 2

[[schedule]]
name = "from-file"
cron = "* * * * * *"
tz = "Europe/London"
type = "demo.echo"
payload = { from = "file" }
missed = "run-once"
"#,
    )
    .expect("writes");
    let path = config.display().to_string();
    let _scheduler = sys.scheduler_with(&["--config", &path]);
    let _agent = sys.agent("s3", &[]);
    sys.ready(true, &["s3"]).await;
    let mut events = sys.finished_events().await;
    next_fires(&sys, &mut events, "from-file", 1).await;
    let job = &fired_by(&sys, "from-file").await[0];
    assert_eq!(job.job.payload, json!({"from": "file"}));
    let listed: Vec<ScheduleInfo> =
        serde_json::from_value(cli_json(&sys, &["schedule", "list"]).await).expect("schedules");
    assert!(listed[0].from_config);
    assert_eq!(listed[0].spec.tz, "Europe/London");

    // Refused at the command line, with what to do.
    for (args, want) in [
        (
            vec!["--cron", "0 5 * *", "--type", "demo.echo"],
            "has 4 fields",
        ),
        (
            vec![
                "--cron",
                "0 5 * * Mon-Fri",
                "--tz",
                "Mars/Olympus",
                "--type",
                "demo.echo",
            ],
            "unknown time zone",
        ),
        (
            vec![
                "--cron",
                "0 5 * * *",
                "--type",
                "demo.echo",
                "--priority",
                "12",
            ],
            "priority 12",
        ),
    ] {
        let mut all = vec!["schedule", "add", "bad"];
        all.extend(args);
        let out = sys.cli(&all).await;
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{err} should say {want}");
    }
    let dup = sys
        .cli(&[
            "schedule",
            "add",
            "from-file",
            "--cron",
            "* * * * *",
            "--type",
            "demo.echo",
        ])
        .await;
    assert!(String::from_utf8_lossy(&dup.stderr).contains("exists already"));
    let none = sys.cli(&["schedule", "pause", "nope"]).await;
    assert!(String::from_utf8_lossy(&none.stderr).contains("no schedule is named \"nope\""));

    // And in the config file: the scheduler does not start.
    let other = System::new().await;
    let bad = other.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[schedule]]\nname = \"x\"\ncron = \"0 5 * *\"\ntype = \"demo.echo\"\n",
    )
    .expect("writes");
    let mut refused = other.scheduler_with(&["--config", &bad.display().to_string()]);
    let status = refused.exited().await.expect("exits");
    assert!(!status.success());
    assert!(
        refused.output().contains("has 4 fields"),
        "{}",
        refused.output()
    );
}
