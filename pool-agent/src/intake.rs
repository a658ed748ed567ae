//! Reading a job delivery: what can run, and why what cannot run is refused. A refused job is
//! never dropped: it goes to the dead-letter queue with its reason, and when it carries a
//! uuid, a `rejected` result tells the scheduler too.

use std::collections::BTreeSet;
use std::time::Duration;

use rota_common::amqp::{DELIVERY_LIMIT, Delivery};
use rota_common::roles::{Roles, UserRole};
use rota_common::wire::{ADMITTED_HEADER, Job, JobId};
use serde_json::Value;

/// Checks that a message on the agent's own queue (a receipt, which makes the agent forget a
/// result, or a cancel) comes from a scheduler's broker user; else why it is ignored.
pub fn from_scheduler(roles: &Roles, d: &Delivery) -> Result<(), String> {
    let what = "message to an agent (receipt or cancel)";
    roles.check(d.user_id.as_deref(), what, &[UserRole::Scheduler])
}

/// Whether the scheduler published this job: it carries [`ADMITTED_HEADER`] and comes from a
/// scheduler's broker user, so the scheduler has applied its options (held it until its
/// `run_at`, deduplicated it, given it its deadline) and it runs as it is.
pub fn published_by_scheduler(roles: &Roles, d: &Delivery) -> bool {
    d.headers.contains_key(ADMITTED_HEADER)
        && roles
            .check(d.user_id.as_deref(), "admitted job", &[UserRole::Scheduler])
            .is_ok()
}

/// The limits a job must fit.
pub struct Limits<'a> {
    pub max_bytes: usize,
    pub max_timeout: Duration,
    pub default_timeout: Duration,
    /// The work types the pool runs.
    pub types: &'a BTreeSet<String>,
}

/// A job that will not run here, and why.
#[derive(Debug)]
pub struct Refusal {
    /// A short name for metrics: `too_large`, `unreadable`, `unknown_type`, `timeout_too_long`,
    /// `delivery_limit`.
    pub kind: &'static str,
    pub reason: String,
    /// The job as far as it could be read, with its uuid, when it has one: the scheduler gets
    /// a `rejected` result for it.
    pub job: Option<Box<Job>>,
}

impl Refusal {
    /// The kind of the `rejected` result's error: `delivery_limit` for a job delivered too
    /// many times, `invalid_job` for one that cannot run here.
    pub fn error_kind(&self) -> &'static str {
        match self.kind {
            "delivery_limit" => "delivery_limit",
            _ => "invalid_job",
        }
    }
}

/// A job ready to run: its uuid is set.
#[derive(Debug)]
pub struct Admitted {
    pub job: Job,
    pub uuid: JobId,
    pub timeout: Duration,
}

/// Reads and checks a delivery. The job's uuid is its own, else the message id (when that is
/// a uuid), else a new one.
pub fn admit(d: &Delivery, limits: &Limits<'_>) -> Result<Admitted, Refusal> {
    if d.body.len() > limits.max_bytes {
        return Err(Refusal {
            kind: "too_large",
            reason: format!(
                "the job is {} bytes, over this agent's limit of {} bytes (--max-job-bytes)",
                d.body.len(),
                limits.max_bytes
            ),
            job: None,
        });
    }
    let mut job = match Job::parse(&d.body) {
        Ok(job) => job,
        Err(reason) => {
            return Err(Refusal {
                kind: "unreadable",
                reason,
                job: salvage(&d.body).map(Box::new),
            });
        }
    };
    let uuid = *job.uuid.get_or_insert_with(|| {
        d.message_id
            .as_deref()
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(JobId::random)
    });
    if d.delivery_count >= DELIVERY_LIMIT {
        return Err(Refusal {
            kind: "delivery_limit",
            reason: format!(
                "delivered {} times before without a result (each time the agent that held it \
                 stopped or lost RabbitMQ before it finished): at the limit of {DELIVERY_LIMIT}, \
                 after which RabbitMQ 4 would drop it from its quorum queue. Look for what stops \
                 the agents that run it (memory, a crash) in their logs",
                d.delivery_count
            ),
            job: Some(Box::new(job)),
        });
    }
    if !limits.types.contains(&job.work_type) {
        let known: Vec<&str> = limits.types.iter().map(String::as_str).collect();
        return Err(Refusal {
            kind: "unknown_type",
            reason: format!(
                "unknown work type {:?}: this pool runs {}",
                job.work_type,
                known.join(", ")
            ),
            job: Some(Box::new(job)),
        });
    }
    let timeout = job
        .timeout_s
        .map(Duration::from_secs)
        .unwrap_or(limits.default_timeout);
    if timeout > limits.max_timeout {
        return Err(Refusal {
            kind: "timeout_too_long",
            reason: format!(
                "timeout_s {} is longer than this agent's limit of {} s (--max-job-timeout, kept below \
                 RabbitMQ's consumer_timeout so a long job is not delivered twice)",
                timeout.as_secs(),
                limits.max_timeout.as_secs()
            ),
            job: Some(Box::new(job)),
        });
    }
    Ok(Admitted { job, uuid, timeout })
}

/// What can be read of an invalid job: enough for a `rejected` result if it has a uuid.
fn salvage(body: &[u8]) -> Option<Job> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let uuid: JobId = value.get("uuid")?.as_str()?.parse().ok()?;
    let work_type = value
        .get("type")
        .or_else(|| value.get("classname"))
        .and_then(Value::as_str)
        .filter(|t| rota_common::names::check_name("work type", t).is_ok())
        .unwrap_or("invalid");
    let mut job = Job::new(
        work_type,
        value.get("payload").cloned().unwrap_or(Value::Null),
    );
    job.uuid = Some(uuid);
    job.attempt = value
        .get("attempt")
        .and_then(Value::as_u64)
        .and_then(|a| u32::try_from(a).ok())
        .unwrap_or(1)
        .clamp(1, rota_common::wire::MAX_ATTEMPT);
    Some(job)
}
