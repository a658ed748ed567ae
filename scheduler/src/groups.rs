//! Fan-in: jobs held (`waiting`) until other jobs end. A group's callback and a chain's next
//! link name the jobs they wait for in their `after`; a job whose Work returned
//! [`WAIT_FOR_CHILDREN`] waits for its children.
//!
//! A waiting job's record lists the jobs it still waits for (`waiting_for`), and the
//! `awaited` keyspace maps each of them to it (awaited uuid + waiting uuid → ()). Everything
//! here runs inside the store transaction that ends the awaited job (its result recorded, its
//! deadline passed, its cancel): the progress is durable exactly when that end is, and an end
//! recorded twice finds its `awaited` entry gone the second time, so it counts once.

use chrono::{DateTime, Utc};
use fjall::Readable;
use rota_common::wire::{
    ErrorInfo, JobId, JobOutcome, JobRecord, JobState, OnFailure, WAIT_FOR_CHILDREN,
};
use serde_json::{Value, json};

use crate::store::{self, EMPTY, Trees, WriteTx};

/// How `record`, a job that ended, ended: for the `inputs` of the jobs that waited for it.
pub fn outcome(record: &JobRecord) -> JobOutcome {
    let last = record.attempts.last();
    let error = match last.and_then(|a| a.error.clone()) {
        Some(error) => Some(error),
        None if record.state != JobState::Succeeded => Some(ErrorInfo::new(
            record.state.as_str(),
            record
                .reason
                .clone()
                .unwrap_or_else(|| format!("it ended {}", record.state)),
        )),
        None => None,
    };
    JobOutcome {
        uuid: record.uuid,
        state: record.state,
        output: last.map(|a| a.output.clone()).unwrap_or_default(),
        error,
    }
}

/// Holds `fresh`, a new job with an `after`, until the jobs it names end: `waiting`, with an
/// `awaited` entry for each job not ended yet; the outcomes of those that ended are in its
/// `inputs` already. Ends it at once (unrun) when one of them did not succeed and its
/// `on_failure` says so. Returns false when nothing holds it (every job ended): it is then
/// placed as any new job.
pub fn hold(tx: &mut WriteTx, t: &Trees, fresh: &mut JobRecord) -> anyhow::Result<bool> {
    if fresh.job.after.is_empty() {
        return Ok(false);
    }
    let mut inputs = Vec::new();
    let mut waiting_for = Vec::new();
    for &uuid in &fresh.job.after {
        let member = store::read(tx, t, uuid)?.ok_or_else(|| {
            anyhow::anyhow!(
                "job {uuid} (named in after) is not recorded: submit the jobs to wait for first"
            )
        })?;
        if member.state.is_final() {
            inputs.push(outcome(&member));
        } else {
            waiting_for.push(uuid);
        }
    }
    fresh.job.inputs = inputs;
    if let Some(failed) = fresh
        .job
        .inputs
        .iter()
        .find(|i| i.state != JobState::Succeeded)
        .map(|i| (i.uuid, i.state))
        && end_early(fresh, failed)
    {
        return Ok(true);
    }
    if waiting_for.is_empty() {
        sort_inputs(fresh);
        return Ok(false);
    }
    wait_for(tx, t, fresh, waiting_for);
    Ok(true)
}

/// Holds `record` (`waiting`) until the jobs `waiting_for` have ended: each gets an
/// `awaited` entry that leads back to it (see [`stop_waiting`] for the reverse).
fn wait_for(tx: &mut WriteTx, t: &Trees, record: &mut JobRecord, waiting_for: Vec<JobId>) {
    for &uuid in &waiting_for {
        tx.insert(
            &t.awaited,
            store::pair_key(uuid, record.uuid).as_slice(),
            EMPTY,
        );
    }
    record.state = JobState::Waiting;
    record.waiting_for = waiting_for;
}

/// Ends `waiter` without running it, when its `on_failure` says so for `failed` (a job it
/// waited for, and how that ended); false when it runs anyway.
fn end_early(waiter: &mut JobRecord, (uuid, state): (JobId, JobState)) -> bool {
    let (ended, reason) = match waiter.job.on_failure.unwrap_or_default() {
        OnFailure::Run => return false,
        OnFailure::Fail => (
            JobState::Failed,
            format!(
                "group member {uuid} ended {state}: the callback is not run (on_failure: fail)"
            ),
        ),
        OnFailure::Cancel => (
            JobState::Cancelled,
            format!("the chain's link {uuid} ended {state}"),
        ),
    };
    waiter.state = ended;
    waiter.reason = Some(reason);
    true
}

/// Puts `inputs` in the order of `after`.
fn sort_inputs(waiter: &mut JobRecord) {
    let after = &waiter.job.after;
    waiter
        .job
        .inputs
        .sort_by_key(|i| after.iter().position(|u| *u == i.uuid));
}

/// Whether `output` is a Work's request to wait for its children; then its own output.
fn wants_children(output: &Value) -> Option<Value> {
    let object = output.as_object()?;
    (object.get(WAIT_FOR_CHILDREN) == Some(&Value::Bool(true)))
        .then(|| object.get("output").cloned().unwrap_or_default())
}

/// After a run of `record` was recorded and made it `succeeded`: when its Work asked to wait
/// for its children ([`WAIT_FOR_CHILDREN`]), holds it (`waiting`) until they have ended, or
/// ends it now if they have. Its last run's output becomes the Work's own output. Returns
/// whether it changed `record`.
pub fn after_run(tx: &mut WriteTx, t: &Trees, record: &mut JobRecord) -> anyhow::Result<bool> {
    if record.state != JobState::Succeeded {
        return Ok(false);
    }
    let Some(last) = record.attempts.last_mut() else {
        return Ok(false);
    };
    let Some(own) = wants_children(&last.output) else {
        return Ok(false);
    };
    last.output = own;
    let mut waiting_for = Vec::new();
    for child in store::children(tx, t, record.uuid)? {
        if store::read(tx, t, child)?.is_some_and(|c| !c.state.is_final()) {
            waiting_for.push(child);
        }
    }
    if waiting_for.is_empty() {
        finish_parent(tx, t, record)?;
        return Ok(true);
    }
    wait_for(tx, t, record, waiting_for);
    Ok(true)
}

/// Ends `parent`, whose Work ended and whose children all have: `succeeded` when every child
/// did, else `failed` naming those that did not; its last run's output becomes
/// `{"output": …, "children": [outcome…]}`.
fn finish_parent(tx: &mut WriteTx, t: &Trees, parent: &mut JobRecord) -> anyhow::Result<()> {
    let mut children = Vec::new();
    for child in store::children(tx, t, parent.uuid)? {
        // A child removed by the retention purge meanwhile has no outcome left to give.
        if let Some(record) = store::read(tx, t, child)? {
            children.push(outcome(&record));
        }
    }
    let unsuccessful: Vec<String> = children
        .iter()
        .filter(|c| c.state != JobState::Succeeded)
        .map(|c| format!("{} ({})", c.uuid, c.state))
        .collect();
    if unsuccessful.is_empty() {
        parent.state = JobState::Succeeded;
    } else {
        parent.state = JobState::Failed;
        parent.reason = Some(format!(
            "its Work succeeded, but not every child did: {}",
            unsuccessful.join(", ")
        ));
    }
    if let Some(last) = parent.attempts.last_mut() {
        last.output = json!({ "output": last.output.take(), "children": children });
    }
    parent.waiting_for.clear();
    Ok(())
}

/// Moves on the jobs that wait for `ended`, a job that just ended, in `tx`: each notes its
/// outcome, and is queued (or ends) once it waits for nothing more; a job this ends moves on
/// those that wait for it in turn. Returns the waiting jobs it changed, as they are now.
pub fn ended(
    tx: &mut WriteTx,
    t: &Trees,
    ended: &JobRecord,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<JobRecord>> {
    let mut changed = Vec::new();
    let mut over = vec![ended.clone()];
    while let Some(member) = over.pop() {
        let mut waiters = Vec::new();
        for item in tx.prefix(&t.awaited, member.uuid.as_bytes()) {
            waiters.extend(store::id_from(&item.key()?[16..]));
        }
        for uuid in waiters {
            tx.remove(&t.awaited, store::pair_key(member.uuid, uuid).as_slice());
            let Some(mut waiter) = store::read(tx, t, uuid)? else {
                continue;
            };
            if waiter.state != JobState::Waiting || !waiter.waiting_for.contains(&member.uuid) {
                continue;
            }
            waiter.waiting_for.retain(|u| *u != member.uuid);
            if !waiter.attempts.is_empty() {
                // A parent whose Work ended.
                if waiter.waiting_for.is_empty() {
                    finish_parent(tx, t, &mut waiter)?;
                }
            } else {
                let outcome = outcome(&member);
                let failed = (outcome.uuid, outcome.state);
                waiter.job.inputs.push(outcome);
                if failed.1 != JobState::Succeeded && end_early(&mut waiter, failed) {
                    for other in std::mem::take(&mut waiter.waiting_for) {
                        tx.remove(&t.awaited, store::pair_key(other, uuid).as_slice());
                    }
                } else if waiter.waiting_for.is_empty() {
                    sort_inputs(&mut waiter);
                    store::place(tx, t, &mut waiter, now)?;
                }
            }
            waiter.updated_at = now;
            store::write(tx, t, &waiter)?;
            if waiter.state.is_final() {
                store::free_key(tx, t, &waiter)?;
                over.push(waiter.clone());
            }
            changed.push(waiter);
        }
    }
    Ok(changed)
}

/// Stops `record`, a waiting job being cancelled, from waiting: its `awaited` entries go.
pub fn stop_waiting(tx: &mut WriteTx, t: &Trees, record: &mut JobRecord) {
    for other in std::mem::take(&mut record.waiting_for) {
        tx.remove(&t.awaited, store::pair_key(other, record.uuid).as_slice());
    }
}

#[cfg(test)]
mod tests {
    use rota_common::wire::{AgentId, Job, JobResult, Status};

    use super::*;
    use crate::retries::RetryPolicy;
    use crate::store::{Recorded, Store};

    fn job(work_type: &str) -> Job {
        let mut job = Job::new(work_type, Value::Null);
        job.uuid = Some(JobId::random());
        job
    }

    fn result(record: &JobRecord, status: Status, output: Value) -> JobResult {
        JobResult {
            uuid: record.uuid,
            attempt: record.job.attempt,
            work_type: record.job.work_type.clone(),
            agent: AgentId::new("a").expect("valid"),
            worker: "local-0".into(),
            status,
            error: None,
            output,
            logs: Vec::new(),
            logs_dropped: 0,
            started_at: Utc::now(),
            finished_at: Utc::now(),
            job: record.job.clone(),
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), RetryPolicy::default(), 8 << 20).expect("opens");
        (dir, store)
    }

    /// Records a group of `n` and its callback with `policy`; returns the records, callback
    /// last.
    async fn group(store: &Store, n: usize, policy: Option<OnFailure>) -> Vec<JobRecord> {
        let mut jobs: Vec<Job> = (0..n).map(|_| job("demo.echo")).collect();
        jobs.push(job("demo.callback"));
        let inserted = store
            .submit_all(jobs, |done, job| {
                if done.len() == n {
                    job.after = done.iter().map(|i| i.record.uuid).collect();
                    job.on_failure = policy;
                }
            })
            .await
            .expect("recorded");
        inserted.into_iter().map(|i| i.record).collect()
    }

    fn get(store: &Store, uuid: JobId) -> JobRecord {
        store.get(uuid).expect("reads").expect("recorded")
    }

    #[tokio::test]
    async fn a_callback_is_queued_once_after_every_member_with_their_outcomes_in_order() {
        let (_dir, store) = open();
        let records = group(&store, 3, None).await;
        let callback = records[3].uuid;
        assert_eq!(get(&store, callback).state, JobState::Waiting);
        // Members end out of order; the second one's result comes twice.
        for (i, status) in [
            (2, Status::Succeeded),
            (1, Status::Failed),
            (1, Status::Failed),
        ] {
            let r = result(&records[i], status, json!({ "n": i }));
            store.record(&r).expect("recorded");
            assert_eq!(get(&store, callback).state, JobState::Waiting);
        }
        assert_eq!(store.take_moved().len(), 2);
        assert!(matches!(
            store.record(&result(&records[0], Status::Succeeded, json!(0))),
            Ok(Recorded::New(_))
        ));
        let moved = store.take_moved();
        assert_eq!(moved.len(), 1);
        let released = get(&store, callback);
        assert_eq!(
            (moved[0].uuid, released.state),
            (callback, JobState::Queued)
        );
        let states: Vec<_> = released
            .job
            .inputs
            .iter()
            .map(|i| (i.uuid, i.state))
            .collect();
        assert_eq!(
            states,
            [
                (records[0].uuid, JobState::Succeeded),
                (records[1].uuid, JobState::Failed),
                (records[2].uuid, JobState::Succeeded)
            ]
        );
        assert_eq!(released.job.inputs[2].output, json!({ "n": 2 }));
        // Queued through the same path as any job: it waits to be published (the members ran).
        let unpublished: Vec<JobId> = store
            .unpublished()
            .expect("reads")
            .iter()
            .map(|r| r.uuid)
            .collect();
        assert_eq!(unpublished, [callback]);
        // Recorded again, a member moves nothing.
        store
            .record(&result(&records[0], Status::Succeeded, json!(0)))
            .expect("recorded");
        assert!(store.take_moved().is_empty());
    }

    #[tokio::test]
    async fn policy_fail_ends_the_callback_at_once_and_the_members_go_on() {
        let (_dir, store) = open();
        let records = group(&store, 2, Some(OnFailure::Fail)).await;
        let callback = records[2].uuid;
        store
            .record(&result(&records[1], Status::Crashed, Value::Null))
            .expect("recorded");
        let ended = get(&store, callback);
        assert_eq!(ended.state, JobState::Failed);
        let reason = ended.reason.expect("a reason");
        assert!(reason.contains(&records[1].uuid.to_string()) && reason.contains("crashed"));
        store
            .record(&result(&records[0], Status::Succeeded, Value::Null))
            .expect("recorded");
        assert_eq!(get(&store, callback).state, JobState::Failed);
        assert_eq!(get(&store, records[0].uuid).state, JobState::Succeeded);
    }

    /// Three `demo.echo` jobs, each after the one before (as `submit_chain` makes them).
    async fn chain_of_three(store: &Store) -> Vec<JobRecord> {
        let jobs: Vec<Job> = (0..3).map(|_| job("demo.echo")).collect();
        store
            .submit_all(jobs, |done, job| {
                if let Some(before) = done.last() {
                    job.after = vec![before.record.uuid];
                    job.on_failure = Some(OnFailure::Cancel);
                }
            })
            .await
            .expect("recorded")
            .into_iter()
            .map(|i| i.record)
            .collect()
    }

    #[tokio::test]
    async fn a_chain_link_that_fails_cancels_the_rest() {
        let (_dir, store) = open();
        let records = chain_of_three(&store).await;
        store
            .record(&result(&records[0], Status::Failed, Value::Null))
            .expect("recorded");
        for r in &records[1..] {
            assert_eq!(get(&store, r.uuid).state, JobState::Cancelled);
        }
        let reason = get(&store, records[2].uuid).reason.expect("a reason");
        assert_eq!(
            reason,
            format!("the chain's link {} ended cancelled", records[1].uuid)
        );
    }

    #[tokio::test]
    async fn a_parent_waits_for_its_children_and_fails_naming_those_that_did() {
        let (_dir, store) = open();
        let parent = store
            .submit(job("demo.spawn"))
            .await
            .expect("recorded")
            .record;
        let mut children = Vec::new();
        for _ in 0..2 {
            let mut child = job("demo.echo");
            child.parent = Some(parent.uuid);
            children.push(store.submit(child).await.expect("recorded").record);
        }
        let marker = json!({ WAIT_FOR_CHILDREN: true, "output": "mine" });
        store
            .record(&result(&parent, Status::Succeeded, marker))
            .expect("recorded");
        assert_eq!(get(&store, parent.uuid).state, JobState::Waiting);
        store
            .record(&result(&children[0], Status::Succeeded, json!(1)))
            .expect("recorded");
        store
            .record(&result(&children[1], Status::Failed, Value::Null))
            .expect("recorded");
        let ended = get(&store, parent.uuid);
        assert_eq!(ended.state, JobState::Failed);
        assert!(
            ended
                .reason
                .expect("a reason")
                .contains(&children[1].uuid.to_string())
        );
        let output = &ended.attempts[0].output;
        assert_eq!(output["output"], json!("mine"));
        assert_eq!(output["children"].as_array().map(Vec::len), Some(2));
    }

    #[tokio::test]
    async fn a_waiting_job_cancelled_stops_waiting_and_cancels_the_links_after_it() {
        let (_dir, store) = open();
        let records = chain_of_three(&store).await;
        let cancelled = store
            .cancel_scheduled(records[1].uuid)
            .await
            .expect("cancels")
            .expect("it was held");
        assert_eq!(cancelled.state, JobState::Cancelled);
        assert!(cancelled.waiting_for.is_empty());
        assert_eq!(get(&store, records[2].uuid).state, JobState::Cancelled);
        assert_eq!(store.take_moved().len(), 1);
        // The first link ends later: nothing waits for it any more.
        store
            .record(&result(&records[0], Status::Succeeded, Value::Null))
            .expect("recorded");
        assert!(store.take_moved().is_empty());
    }

    #[tokio::test]
    async fn a_callback_names_only_recorded_jobs() {
        let (_dir, store) = open();
        let mut callback = job("demo.callback");
        callback.after = vec![JobId::random()];
        let err = store.submit(callback).await.expect_err("refused");
        assert!(format!("{err:#}").contains("is not recorded"));
    }
}
