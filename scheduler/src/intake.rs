//! What the scheduler takes in from RabbitMQ (results, RPC requests, started events,
//! heartbeats), read defensively: each body becomes its typed message or a [`Refused`] with a
//! typed [`Reason`], never a panic; each is taken only from a broker user of the role that may
//! send it ([`sender`]); and every refusal is counted per input and reason in
//! `rota_scheduler_dropped_total{input, reason}`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rota_common::metrics::Metrics;
use rota_common::roles::{Roles, UserRole};
use rota_common::wire::{
    Event, EventKind, Heartbeat, Job, JobResult, MAX_RESULT_GROUP, Role, RpcRequest,
};
use serde::de::DeserializeOwned;

/// The largest heartbeat read: a real one is a few KiB (its running list is bounded by the
/// pool sizes); anything bigger is forged or broken.
pub const MAX_HEARTBEAT_BYTES: usize = 256 * 1024;

/// Where a message came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    Result,
    Rpc,
    Event,
    Heartbeat,
    /// Jobs handed over by agents for admission.
    Admit,
}

impl Input {
    pub fn as_str(self) -> &'static str {
        match self {
            Input::Result => "result",
            Input::Rpc => "rpc",
            Input::Event => "event",
            Input::Heartbeat => "heartbeat",
            Input::Admit => "admit",
        }
    }
}

/// Why a message was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not the JSON of the message that this input carries.
    Unreadable,
    /// Readable, but a value is out of range or contradicts another.
    Invalid,
    /// Larger than any real message of this input.
    TooLarge,
    /// Readable, but the store refused it for a reason that retrying does not change.
    Unrecordable,
    /// Sent by a broker user whose role may not send it (or without a `user_id`).
    Forbidden,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unreadable => "unreadable",
            Reason::Invalid => "invalid",
            Reason::TooLarge => "too_large",
            Reason::Unrecordable => "unrecordable",
            Reason::Forbidden => "forbidden",
        }
    }
}

/// A message that is not taken, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", reason.as_str())]
pub struct Refused {
    pub reason: Reason,
    pub message: String,
}

impl Refused {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// The label of `rota_scheduler_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DroppedLabel {
    input: &'static str,
    reason: &'static str,
}

/// Counts the messages the scheduler did not take.
#[derive(Clone, Default)]
pub struct Dropped(Family<DroppedLabel, Counter>);

impl Dropped {
    pub fn register(metrics: &Metrics) -> Self {
        let dropped = Self::default();
        metrics.register(
            "scheduler_dropped",
            "Messages the scheduler did not take (dead-lettered results, RPC requests and jobs \
             handed over for admission, ignored events and heartbeats), by input and reason",
            dropped.0.clone(),
        );
        dropped
    }

    pub fn count(&self, input: Input, reason: Reason) {
        self.0
            .get_or_create(&DroppedLabel {
                input: input.as_str(),
                reason: reason.as_str(),
            })
            .inc();
    }
}

/// Refuses a `what` whose sender, the broker user `user` (its `user_id`), has none of the
/// roles `allowed`.
pub fn sender(
    roles: &Roles,
    user: Option<&str>,
    what: &str,
    allowed: &[UserRole],
) -> Result<(), Refused> {
    roles
        .check(user, what, allowed)
        .map_err(|m| Refused::new(Reason::Forbidden, m))
}

/// Who may send `request`: producers and schedulers; agents too for what their Work does,
/// submitting child jobs and asking about a job, and to ask for the paused queues.
pub fn rpc_senders(request: &RpcRequest) -> &'static [UserRole] {
    match request {
        RpcRequest::Submit { .. } | RpcRequest::Status { .. } | RpcRequest::Paused => {
            &[UserRole::Producer, UserRole::Scheduler, UserRole::Agent]
        }
        _ => &[UserRole::Producer, UserRole::Scheduler],
    }
}

/// Who may send a heartbeat of `role`.
pub fn heartbeat_senders(role: Role) -> &'static [UserRole] {
    match role {
        Role::Agent => &[UserRole::Agent],
        Role::Scheduler => &[UserRole::Scheduler],
    }
}

fn json<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, Refused> {
    serde_json::from_slice(body)
        .map_err(|e| Refused::new(Reason::Unreadable, format!("not a valid {what}: {e}")))
}

/// A result from an agent. Its job may fail the job checks (a `rejected` result carries the
/// job that was refused), but it must be about the job it names.
pub fn result(body: &[u8]) -> Result<JobResult, Refused> {
    let result: JobResult = json(body, "result")?;
    check_result(&result)?;
    Ok(result)
}

fn check_result(result: &JobResult) -> Result<(), Refused> {
    result
        .check()
        .map_err(|e| Refused::new(Reason::Invalid, e))?;
    match result.job.uuid {
        Some(uuid) if uuid != result.uuid => Err(Refused::new(
            Reason::Invalid,
            format!(
                "the result names job {} but carries job {uuid}",
                result.uuid
            ),
        )),
        _ => Ok(()),
    }
}

/// An entry of a group of results that is not taken: why, and its JSON (to dead-letter it
/// alone while the rest of its group is recorded).
pub struct RefusedEntry {
    pub refused: Refused,
    pub body: Vec<u8>,
}

/// A message on the results queue: one result, or a group of them (a JSON array of at most
/// [`MAX_RESULT_GROUP`]). The message is refused as a whole when it cannot be read at all;
/// a bad entry of a readable group is refused alone.
pub fn results(body: &[u8]) -> Result<Vec<Result<JobResult, RefusedEntry>>, Refused> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'[') {
        return result(body).map(|r| vec![Ok(r)]);
    }
    let too_many = |n: usize| {
        Refused::new(
            Reason::TooLarge,
            format!("a group of {n} results; at most {MAX_RESULT_GROUP}"),
        )
    };
    let empty = || Refused::new(Reason::Unreadable, "not a valid result: an empty group");
    // Read as results at once, as agents send them; entry by entry only when that fails.
    if let Ok(group) = serde_json::from_slice::<Vec<JobResult>>(body) {
        if group.len() > MAX_RESULT_GROUP {
            return Err(too_many(group.len()));
        }
        if group.is_empty() {
            return Err(empty());
        }
        return Ok(group
            .into_iter()
            .map(|r| match check_result(&r) {
                Ok(()) => Ok(r),
                Err(refused) => Err(RefusedEntry {
                    refused,
                    body: serde_json::to_vec(&r).unwrap_or_default(),
                }),
            })
            .collect());
    }
    let entries: Vec<serde_json::Value> = json(body, "group of results")?;
    if entries.len() > MAX_RESULT_GROUP {
        return Err(too_many(entries.len()));
    }
    if entries.is_empty() {
        return Err(empty());
    }
    Ok(entries
        .into_iter()
        .map(|entry| {
            let body = entry.to_string().into_bytes();
            serde_json::from_value::<JobResult>(entry)
                .map_err(|e| Refused::new(Reason::Unreadable, format!("not a valid result: {e}")))
                .and_then(|r| check_result(&r).map(|()| r))
                .map_err(|refused| RefusedEntry { refused, body })
        })
        .collect())
}

/// A request on the RPC queue (what it asks is checked where it is answered).
pub fn rpc(body: &[u8]) -> Result<RpcRequest, Refused> {
    json(body, "request")
}

/// A `job.started` event: it may create the job's record, so its job must be one that could
/// have been submitted.
pub fn started(body: &[u8]) -> Result<Event, Refused> {
    let mut event: Event = json(body, "event")?;
    event
        .check()
        .map_err(|e| Refused::new(Reason::Invalid, e))?;
    if event.event != EventKind::Started {
        return Err(Refused::new(
            Reason::Invalid,
            format!(
                "a {} event on the queue of started events",
                event.event.as_str()
            ),
        ));
    }
    if let Some(job) = &event.job {
        job.check()
            .map_err(|e| Refused::new(Reason::Invalid, format!("the event's job: {e}")))?;
        if job.uuid.is_some_and(|u| u != event.uuid) {
            return Err(Refused::new(
                Reason::Invalid,
                "the event names another job than the one it carries",
            ));
        }
    }
    Ok(event)
}

/// A job handed over for admission by the agent that received it: a job that could have been
/// submitted, with the uuid the agent gave it.
pub fn admission(body: &[u8]) -> Result<Job, Refused> {
    let job = Job::parse(body).map_err(|e| Refused::new(Reason::Invalid, e))?;
    if job.uuid.is_none() {
        return Err(Refused::new(
            Reason::Invalid,
            "a job handed over for admission has no uuid (the agent sets one)",
        ));
    }
    Ok(job)
}

/// A heartbeat of any part.
pub fn heartbeat(body: &[u8]) -> Result<Heartbeat, Refused> {
    if body.len() > MAX_HEARTBEAT_BYTES {
        return Err(Refused::new(
            Reason::TooLarge,
            format!(
                "a heartbeat of {} bytes (the limit is {MAX_HEARTBEAT_BYTES})",
                body.len()
            ),
        ));
    }
    let mut beat: Heartbeat = json(body, "heartbeat")?;
    beat.clamp();
    Ok(beat)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-11-29T12:00:00Z";

    /// A result of job `uuid` at `attempt` that carries the job `job_uuid`.
    fn result_of(uuid: uuid::Uuid, job_uuid: uuid::Uuid, attempt: &str) -> String {
        format!(
            r#"{{"uuid":"{uuid}","attempt":{attempt},"type":"demo.echo","agent":"a1","worker":"w",
            "status":"succeeded","started_at":"{NOW}","finished_at":"{NOW}",
            "job":{{"type":"demo.echo","uuid":"{job_uuid}"}}}}"#
        )
    }

    #[test]
    fn garbage_and_forgeries_are_refused_with_their_reason() {
        let uuid = uuid::Uuid::new_v4();
        let other = uuid::Uuid::new_v4();
        let result = |job_uuid: uuid::Uuid, attempt: &str| result_of(uuid, job_uuid, attempt);
        assert_eq!(
            super::result(b"\xff\x00").map_err(|e| e.reason).err(),
            Some(Reason::Unreadable)
        );
        assert_eq!(
            super::result(result(uuid, "4294967296").as_bytes())
                .map_err(|e| e.reason)
                .err(),
            Some(Reason::Unreadable),
            "an attempt past u32"
        );
        assert_eq!(
            super::result(result(other, "1").as_bytes())
                .map_err(|e| e.reason)
                .err(),
            Some(Reason::Invalid)
        );
        assert_eq!(
            super::result(result(uuid, "4294967295").as_bytes())
                .map_err(|e| e.reason)
                .err(),
            Some(Reason::Invalid),
            "an attempt past MAX_ATTEMPT"
        );

        let event = |kind: &str, work_type: &str| {
            format!(
                r#"{{"event":"{kind}","uuid":"{uuid}","attempt":1,"type":"x","time":"{NOW}",
                "job":{{"type":"{work_type}","uuid":"{uuid}"}}}}"#
            )
        };
        assert!(started(event("started", "demo.echo").as_bytes()).is_ok());
        for (body, reason) in [
            (event("finished", "demo.echo"), Reason::Invalid),
            (event("started", "../etc"), Reason::Invalid),
            (event("started", &"x".repeat(100_000)), Reason::Invalid),
            (
                r#"{"event":"started","uuid":7}"#.to_owned(),
                Reason::Unreadable,
            ),
        ] {
            assert_eq!(
                started(body.as_bytes()).map_err(|e| e.reason).err(),
                Some(reason)
            );
        }
        assert_eq!(
            heartbeat(&vec![b' '; MAX_HEARTBEAT_BYTES + 1])
                .map_err(|e| e.reason)
                .err(),
            Some(Reason::TooLarge)
        );
        assert_eq!(
            rpc(br#"{"method":"list","limit":-1}"#)
                .map_err(|e| e.reason)
                .err(),
            Some(Reason::Unreadable)
        );
    }

    #[test]
    fn a_job_handed_over_must_be_valid_and_carry_its_uuid() {
        let uuid = uuid::Uuid::new_v4();
        let ok = format!(r#"{{"type":"demo.echo","uuid":"{uuid}","unique_key":"k"}}"#);
        assert!(admission(ok.as_bytes()).is_ok());
        for body in [
            r#"{"type":"demo.echo","unique_key":"k"}"#.to_owned(),
            format!(r#"{{"type":"demo.echo","uuid":"{uuid}","debounce_s":5}}"#),
            "garbage".to_owned(),
        ] {
            assert_eq!(
                admission(body.as_bytes()).map_err(|e| e.reason).err(),
                Some(Reason::Invalid),
                "{body}"
            );
        }
    }

    #[test]
    fn a_group_of_results_refuses_only_its_bad_entries() {
        let result = |uuid: uuid::Uuid, attempt: &str| result_of(uuid, uuid, attempt);
        let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let reasons = |body: String| -> Vec<Option<Reason>> {
            results(body.as_bytes())
                .expect("a readable group")
                .into_iter()
                .map(|e| e.err().map(|bad| bad.refused.reason))
                .collect()
        };
        let one = results(result(a, "1").as_bytes()).expect("one result");
        assert!(matches!(one.as_slice(), [Ok(r)] if r.uuid.0 == a));
        let good = format!(" [{},{}]", result(a, "1"), result(b, "2"));
        assert_eq!(reasons(good), [None, None]);
        let invalid = format!("[{},{}]", result(a, "1"), result(b, "4294967295"));
        assert_eq!(reasons(invalid), [None, Some(Reason::Invalid)]);
        let garbage = format!("[{}, 7, {{\"uuid\": 1}}]", result(a, "1"));
        assert_eq!(
            reasons(garbage),
            [None, Some(Reason::Unreadable), Some(Reason::Unreadable)]
        );
        for bad in [&b"[1,"[..], b"[]", b" [ ] "] {
            let bad = results(bad).map_err(|e| e.reason).err();
            assert_eq!(bad, Some(Reason::Unreadable));
        }
        let huge = format!("[{}]", vec!["0"; MAX_RESULT_GROUP + 1].join(","));
        let huge = results(huge.as_bytes()).map_err(|e| e.reason).err();
        assert_eq!(huge, Some(Reason::TooLarge));
    }
}
