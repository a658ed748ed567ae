//! Fan-in (issue 14, item 2): a group's callback runs once after every member ended, with
//! their outcomes; the failure policies; chains; a parent that waits for its children; a Work
//! that submits a group; and a group half done when the scheduler is killed.

use std::time::Duration;

use rota_tests::wire::{Job, JobId, JobRecord, JobState, OnFailure};
use rota_tests::{System, all_ended, within};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

fn echo(payload: Value) -> Job {
    Job::new("demo.echo", payload)
}

/// When the last of `records` finished.
fn last_finish(records: &[JobRecord]) -> chrono::DateTime<chrono::Utc> {
    records
        .iter()
        .filter_map(|r| r.attempts.last()?.finished_at)
        .max()
        .expect("they ran")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_three_runs_its_callback_once_after_all_with_their_outcomes() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    let mut finished = sys.finished_events().await;
    let members = vec![
        Job::new("demo.sleep", json!({ "ms": 600 })),
        echo(json!({ "n": 2 })),
        echo(json!({ "n": 3 })),
    ];
    let records = sys
        .client
        .submit_group(members, echo(json!({ "callback": true })), None)
        .await
        .expect("submitted");
    let ids: Vec<JobId> = records.iter().map(|r| r.uuid).collect();
    let callback = ids[3];
    assert_eq!(records[3].state, JobState::Waiting);
    assert_eq!(records[3].job.after, ids[..3]);
    all_ended(&mut finished, &ids, MINUTE).await;
    let done = sys.status(callback).await;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.attempts.len(), 1, "the callback ran once");
    let mut members = Vec::new();
    for uuid in &ids[..3] {
        members.push(sys.status(*uuid).await);
    }
    let started = done.attempts[0].started_at.expect("started");
    assert!(
        started >= last_finish(&members),
        "the callback started at {started}, before the last member ended"
    );
    let inputs: Vec<(JobId, JobState, Value)> = done
        .job
        .inputs
        .iter()
        .map(|i| (i.uuid, i.state, i.output.clone()))
        .collect();
    assert_eq!(
        inputs,
        [
            (
                ids[0],
                JobState::Succeeded,
                members[0].attempts[0].output.clone()
            ),
            (ids[1], JobState::Succeeded, json!({ "n": 2 })),
            (ids[2], JobState::Succeeded, json!({ "n": 3 })),
        ]
    );
    // Submitted again, the same group records nothing new and runs nothing more.
    let again: Vec<Job> = records.iter().map(|r| r.job.clone()).collect();
    let (members, callback_job) = again.split_at(3);
    let mut callback_job = callback_job[0].clone();
    callback_job.after.clear();
    callback_job.inputs.clear();
    let twice = sys
        .client
        .submit_group(members.to_vec(), callback_job, None)
        .await
        .expect("submitted");
    assert_eq!(twice[3].state, JobState::Succeeded);
    assert_eq!(sys.status(callback).await.attempts.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_run_runs_the_callback_with_the_failure_and_policy_fail_does_not_run_it() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    let mut finished = sys.finished_events().await;
    let group = |policy| {
        sys.client.submit_group(
            vec![
                echo(json!(1)),
                Job::new("demo.fail", json!({ "message": "boom" })),
            ],
            echo(json!({})),
            policy,
        )
    };
    let run = group(None).await.expect("submitted");
    let fail = group(Some(OnFailure::Fail)).await.expect("submitted");
    let ids: Vec<JobId> = run.iter().chain(&fail).map(|r| r.uuid).collect();
    all_ended(&mut finished, &ids, MINUTE).await;

    let ran = sys.status(run[2].uuid).await;
    assert_eq!(ran.state, JobState::Succeeded);
    assert_eq!(ran.attempts.len(), 1);
    let failed = &ran.job.inputs[1];
    assert_eq!((failed.uuid, failed.state), (run[1].uuid, JobState::Failed));
    assert_eq!(
        failed.error.as_ref().map(|e| e.message.as_str()),
        Some("boom")
    );

    let not_run = sys.status(fail[2].uuid).await;
    assert_eq!(not_run.state, JobState::Failed);
    assert!(not_run.attempts.is_empty(), "the callback did not run");
    let reason = not_run.reason.expect("a reason");
    assert!(
        reason.contains(&fail[1].uuid.to_string()) && reason.contains("failed"),
        "{reason}"
    );
    // The other member went on.
    assert_eq!(sys.status(fail[0].uuid).await.state, JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_submits_a_group_and_shows_its_progress() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    // No agent yet: the group stays half way, as `status` shows.
    let out = sys
        .cli(&[
            "submit-group",
            "--callback",
            "demo.echo:{\"done\": true}",
            "--on-failure",
            "fail",
            "demo.echo:{\"a\": 1}",
            "demo.echo",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let ids: Vec<JobId> = text
        .lines()
        .map(|l| {
            l.split_whitespace()
                .next()
                .expect("a uuid")
                .parse()
                .expect("a uuid")
        })
        .collect();
    assert_eq!(ids.len(), 3);
    let out = sys.cli(&["status", &ids[2].to_string()]).await;
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("waiting")
            && shown.contains("waits for 2 job(s) (on failure: fail); 0 ended"),
        "{shown}"
    );
    let mut finished = sys.finished_events().await;
    let _agent = sys.agent("a1", &[]);
    all_ended(&mut finished, &ids, MINUTE).await;
    let done = sys.status(ids[2]).await;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.job.inputs[0].output, json!({ "a": 1 }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_passes_each_output_on_and_a_failing_link_cancels_the_rest() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    let mut finished = sys.finished_events().await;
    let chain = sys
        .client
        .submit_chain(vec![echo(json!(1)), echo(json!(2)), echo(json!(3))])
        .await
        .expect("submitted");
    let broken = sys
        .client
        .submit_chain(vec![
            echo(json!(1)),
            Job::new("demo.fail", json!({ "message": "broken" })),
            echo(json!(3)),
            echo(json!(4)),
        ])
        .await
        .expect("submitted");
    let ids: Vec<JobId> = chain.iter().chain(&broken).map(|r| r.uuid).collect();
    all_ended(&mut finished, &ids, MINUTE).await;

    let mut links = Vec::new();
    for r in &chain {
        links.push(sys.status(r.uuid).await);
    }
    for pair in links.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        assert_eq!(after.state, JobState::Succeeded);
        assert_eq!(after.job.inputs.len(), 1);
        assert_eq!(after.job.inputs[0].uuid, before.uuid);
        assert_eq!(after.job.inputs[0].output, before.attempts[0].output);
        assert!(after.attempts[0].started_at >= before.attempts[0].finished_at);
    }

    assert_eq!(sys.status(broken[1].uuid).await.state, JobState::Failed);
    let third = sys.status(broken[2].uuid).await;
    assert_eq!(third.state, JobState::Cancelled);
    assert!(third.attempts.is_empty());
    assert_eq!(
        third.reason.as_deref(),
        Some(format!("the chain's link {} ended failed", broken[1].uuid).as_str())
    );
    let fourth = sys.status(broken[3].uuid).await;
    assert_eq!(fourth.state, JobState::Cancelled);
    assert!(fourth.attempts.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_waits_for_its_children_and_ends_after_them() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    let mut finished = sys.finished_events().await;
    let payload = json!({
        "children": [
            { "type": "demo.sleep", "payload": { "ms": 800 } },
            { "type": "demo.echo", "payload": { "child": 2 } },
        ],
        "wait": true,
    });
    let parent = sys
        .client
        .submit(Job::new("demo.spawn", payload))
        .await
        .expect("submitted")
        .uuid;
    // The parent's run ends before its children: `waiting`, not over.
    within(MINUTE, "the parent's run to end", async {
        loop {
            let e = finished.next().await.expect("events keep coming");
            if e.uuid == parent {
                assert_eq!(e.state, Some(JobState::Waiting));
                return;
            }
        }
    })
    .await;
    all_ended(&mut finished, &[parent], MINUTE).await;
    let done = sys.status(parent).await;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.children.len(), 2);
    let mut children = Vec::new();
    for c in &done.children {
        children.push(sys.status(*c).await);
    }
    assert!(children.iter().all(|c| c.state == JobState::Succeeded));
    assert!(done.updated_at >= last_finish(&children));
    let output = &done.attempts[0].output;
    assert_eq!(
        output["output"]["children"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(output["children"].as_array().map(Vec::len), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_submits_its_children_as_a_group_with_a_callback() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &["--worker-location", "process"]);
    let mut finished = sys.finished_events().await;
    let payload = json!({
        "children": [
            { "type": "demo.echo", "payload": { "part": 1 } },
            { "type": "demo.echo", "payload": { "part": 2 } },
        ],
        "callback": { "type": "demo.echo", "payload": { "joined": true } },
    });
    let parent = sys
        .client
        .submit(Job::new("demo.spawn", payload))
        .await
        .expect("submitted")
        .uuid;
    all_ended(&mut finished, &[parent], MINUTE).await;
    let ids: Vec<JobId> =
        serde_json::from_value(sys.status(parent).await.attempts[0].output["children"].clone())
            .expect("the uuids");
    assert_eq!(ids.len(), 3);
    // The children may have ended before the parent (their events gone by): the record says.
    if !sys.status(ids[2]).await.state.is_final() {
        all_ended(&mut finished, &ids[2..], MINUTE).await;
    }
    let callback = sys.status(ids[2]).await;
    assert_eq!(callback.state, JobState::Succeeded);
    assert_eq!(callback.job.parent, Some(parent));
    assert_eq!(callback.attempts.len(), 1);
    let outputs: Vec<&Value> = callback.job.inputs.iter().map(|i| &i.output).collect();
    assert_eq!(outputs, [&json!({ "part": 1 }), &json!({ "part": 2 })]);
}

/// The scheduler is killed (SIGKILL) with a group half done, its last member still running,
/// and started again: the callback runs once, with every member's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_killed_with_a_group_half_done_still_runs_the_callback_once() {
    let sys = System::new().await;
    let mut scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    let mut finished = sys.finished_events().await;
    let records = sys
        .client
        .submit_group(
            vec![
                echo(json!(1)),
                echo(json!(2)),
                Job::new("demo.sleep", json!({ "ms": 3000 })),
            ],
            echo(json!({ "callback": true })),
            None,
        )
        .await
        .expect("submitted");
    let ids: Vec<JobId> = records.iter().map(|r| r.uuid).collect();
    all_ended(&mut finished, &ids[..2], MINUTE).await;
    scheduler.kill().await;
    let _scheduler = sys.scheduler();
    let ended = all_ended(&mut finished, &ids[2..], MINUTE).await;
    assert_eq!(ended[&ids[3]].state, Some(JobState::Succeeded));
    let callback = sys.status(ids[3]).await;
    assert_eq!(callback.attempts.len(), 1, "the callback ran once");
    let states: Vec<JobState> = callback.job.inputs.iter().map(|i| i.state).collect();
    assert_eq!(states, [JobState::Succeeded; 3]);
    assert_eq!(callback.job.inputs[1].output, json!(2));
}

/// A job published straight to the jobs exchange with an `after` is handed to the scheduler,
/// which holds it like a callback: it runs once the job it names has ended, not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_job_with_after_waits_for_the_jobs_it_names() {
    let sys = System::new().await;
    let _scheduler = sys.scheduler();
    let _agent = sys.agent("a1", &[]);
    let mut finished = sys.finished_events().await;
    let first = sys
        .client
        .submit(Job::new("demo.sleep", json!({ "ms": 500 })))
        .await
        .expect("submitted")
        .uuid;
    let mut then = echo(json!({}));
    then.after = vec![first];
    let then = sys.client.publish_job(then).await.expect("published");
    all_ended(&mut finished, &[first, then], MINUTE).await;
    let (first, then) = (sys.status(first).await, sys.status(then).await);
    assert_eq!(then.state, JobState::Succeeded);
    assert_eq!(then.job.inputs[0].uuid, first.uuid);
    assert!(then.attempts[0].started_at >= first.attempts[0].finished_at);
}
