//! The v1 wire contract: one serde type per message that crosses RabbitMQ. Unknown fields are
//! ignored (so newer producers can add fields); a missing or malformed required field is a
//! rejection with a readable reason, never a panic.
//!
//! Every message a part reads is read with its type's `parse` ([`Job::parse`],
//! [`JobResult::parse`], [`AgentMessage::parse`], [`Event::parse`], [`Heartbeat::parse`],
//! [`RpcRequest::parse`]): serde's checks, then the ranges that keep the parts' arithmetic
//! safe. Numbers that feed durations or counters are bounded ([`MAX_ATTEMPT`],
//! [`MAX_TIMEOUT_S`], [`MAX_BACKOFF_MS`]), so `attempt + 1` or `now + timeout` cannot
//! overflow on anything a parse let through; a heartbeat's interval is clamped instead, since
//! a heartbeat is only ever observed. Strings are bounded by the size of the message (the
//! agent's `--max-job-bytes`, RabbitMQ's `max_message_size`), names by [`check_name`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::names::{DEFAULT_QUEUE, check_name};

/// The header the scheduler sets on each job it publishes: the job was accepted by the
/// scheduler (held, deduplicated, given its deadline), and runs as it is. Believed only from
/// a scheduler's broker user.
pub const ADMITTED_HEADER: &str = "x-rota-admitted";

/// The largest priority a job may carry (the jobs queues are declared with it).
pub const MAX_PRIORITY: u8 = 9;

/// The largest attempt number (and `max_attempts`) a message may carry: far above any retry
/// policy, and far enough below `u32::MAX` that counting up never overflows.
pub const MAX_ATTEMPT: u32 = 1_000_000;

/// The longest `timeout_s` a job may ask for: a year. Agents have a lower limit of their own
/// (`--max-job-timeout`); this one keeps `Instant + timeout` from overflowing anywhere.
pub const MAX_TIMEOUT_S: u64 = 366 * 24 * 3600;

/// The longest first retry delay (`backoff_ms`) a job may ask for: a year.
pub const MAX_BACKOFF_MS: u64 = MAX_TIMEOUT_S * 1000;

/// The range a heartbeat's `interval_ms` is clamped to when read: from a millisecond to an
/// hour (a part that says it beats once in 500 million years would otherwise never be missed).
pub const HEARTBEAT_INTERVAL_MS: std::ops::RangeInclusive<u64> = 1..=3_600_000;

/// The longest reason a parse gives: it travels in a header (`x-rota-reason`) and in logs,
/// and serde quotes the offending value whole.
pub const MAX_REASON_BYTES: usize = 500;

/// `reason`, cut to [`MAX_REASON_BYTES`] at a character boundary.
fn bounded(mut reason: String) -> String {
    if reason.len() > MAX_REASON_BYTES {
        let mut at = MAX_REASON_BYTES - "…".len();
        while !reason.is_char_boundary(at) {
            at -= 1;
        }
        reason.truncate(at);
        reason.push('…');
    }
    reason
}

/// Reads a message of type `T` from a body, with an error that names what it should be.
fn decode<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| bounded(format!("not a valid {what}: {e}")))
}

/// [`check_name`], without quoting a name far too long to be one.
fn check_name_field(what: &str, name: &str) -> Result<(), String> {
    if name.len() > 64 {
        return Err(format!(
            "invalid {what}: {} bytes long, where a name has at most 64",
            name.len()
        ));
    }
    check_name(what, name)
}

/// Refuses an attempt number out of 1..=[`MAX_ATTEMPT`].
fn check_attempt(attempt: u32) -> Result<(), String> {
    if attempt == 0 {
        return Err("attempt must be 1 or more".into());
    }
    if attempt > MAX_ATTEMPT {
        return Err(format!(
            "attempt {attempt} is out of range: at most {MAX_ATTEMPT}"
        ));
    }
    Ok(())
}

/// The identity of one job. It names the job's folders, so it must be a real UUID.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    pub fn random() -> Self {
        Self(Uuid::new_v4())
    }
    /// The id of the `n`-th child job that run `attempt` of `parent` submits: the same each
    /// time that run is repeated (a redelivery after an agent crash), so the scheduler records
    /// the child once.
    pub fn child_of(parent: JobId, attempt: u32, n: u32) -> Self {
        Self(Uuid::new_v5(
            &parent.0,
            format!("child/{attempt}/{n}").as_bytes(),
        ))
    }
    /// 16 bytes that sort like the id; used as a key in the stores.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s.trim())
            .map(Self)
            .map_err(|e| format!("{s:?} is not a job uuid: {e}"))
    }
}

/// The identity of one pool agent; part of its queue name, so a valid name part.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct AgentId(String);

impl AgentId {
    pub fn new(id: &str) -> Result<Self, String> {
        check_name("agent id", id)?;
        Ok(Self(id.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A piece of Work to run, as published to the jobs exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Job {
    /// The registered work type that runs it; `classname` is accepted as an alias.
    #[serde(rename = "type", alias = "classname")]
    pub work_type: String,
    /// Assigned by the first Rota part that sees the job when the producer gave none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<JobId>,
    /// The Work's input; any JSON.
    #[serde(default)]
    pub payload: Value,
    /// The named queue (routing key); `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// 0 (default) to 9: higher runs first among queued jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// How long the Work may run; the agent's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// How many attempts the scheduler allows (retries), however the job arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Held by the scheduler until this time (a job published straight to the jobs exchange
    /// is handed to the scheduler by the agent that receives it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
    /// 1 for the first run, counted up by retries.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// The job whose Work submitted this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<JobId>,
    /// Free-form labels for people and dashboards.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// While a job with this key is scheduled, queued or running (and for its `unique_for_s`
    /// after), another one with the same key is not recorded: `submit` returns that job
    /// instead (enforced by the scheduler, which sees a job published straight to the jobs
    /// exchange with a key before it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_key: Option<String>,
    /// The delay before the first retry, in milliseconds; it doubles with each attempt
    /// (the scheduler's default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
    /// The schedule that fired this job (its `run_at` is the instant it fired for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The job's deadline: not started by then, it ends `expired` without running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// A deadline this many seconds after the scheduler accepts the job (its `submit`, or
    /// the hand-over of a job published straight to the jobs exchange); the earlier of the
    /// two when `expires_at` is given too. The scheduler writes the deadline in `expires_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
    /// With `unique_key`: the key stays held this many seconds after the job ends, so that
    /// another job with it is not accepted before ("not more than once per hour").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_for_s: Option<u64>,
    /// With `unique_key`: the job is held this many seconds; a newer job with the same key
    /// submitted meanwhile replaces it (it ends `superseded`) and is held in turn, so only
    /// the last of a burst runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debounce_s: Option<u64>,
    /// Held by the scheduler (`waiting`) until every one of these jobs has ended; then queued
    /// with their outcomes in `inputs`, in this order (a group's callback, a chain's next
    /// link). The jobs must be recorded before this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<JobId>,
    /// With `after`: what a job of `after` that ends other than `succeeded` does to this one
    /// (`run` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<OnFailure>,
    /// Written by the scheduler when it queues a job that waited (`after`): how each job it
    /// waited for ended, in the order of `after`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<JobOutcome>,
}

/// What a job that waits for others (`after`) does when one of them ends other than
/// `succeeded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Runs anyway once all have ended, with their states in `inputs`.
    #[default]
    Run,
    /// Ends `failed` at once, without running; the others go on.
    Fail,
    /// Ends `cancelled` at once, without running (a chain's later links).
    Cancel,
}

impl OnFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Run => "run",
            OnFailure::Fail => "fail",
            OnFailure::Cancel => "cancel",
        }
    }
}

impl FromStr for OnFailure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(Value::String(s.to_owned()))
            .map_err(|_| format!("unknown failure policy {s:?}: use run, fail or cancel"))
    }
}

/// How a job that another waited for ended: one entry of the waiting job's `inputs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobOutcome {
    pub uuid: JobId,
    /// Its final state.
    pub state: JobState,
    /// The output of its last run (null when it did not run or did not succeed).
    #[serde(default)]
    pub output: Value,
    /// Why it did not succeed: its last run's error, or why the scheduler ended it unrun.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

/// The output a Work returns to have its job wait for its children: `{WAIT_FOR_CHILDREN:
/// true, "output": …}` (see `Context::wait_for_children`). The scheduler holds the job
/// (`waiting`) until every child has ended; it then ends `succeeded` when every child did,
/// else `failed`, with the output `{"output": …, "children": [JobOutcome…]}`.
pub const WAIT_FOR_CHILDREN: &str = "rota.wait_for_children";

/// The most jobs one `after` (a group, a chain) may name.
pub const MAX_AFTER: usize = 10_000;

fn first_attempt() -> u32 {
    1
}

impl Job {
    /// A job of `work_type` with `payload` and every option at its default.
    pub fn new(work_type: impl Into<String>, payload: Value) -> Self {
        Self {
            work_type: work_type.into(),
            uuid: None,
            payload,
            queue: None,
            priority: None,
            timeout_s: None,
            max_attempts: None,
            run_at: None,
            attempt: 1,
            parent: None,
            labels: BTreeMap::new(),
            unique_key: None,
            backoff_ms: None,
            schedule: None,
            expires_at: None,
            ttl_s: None,
            unique_for_s: None,
            debounce_s: None,
            after: Vec::new(),
            on_failure: None,
            inputs: Vec::new(),
        }
    }

    /// Reads and checks a job from a message body.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let job: Job = decode("job", body)?;
        job.check()?;
        Ok(job)
    }

    /// The checks that serde's types do not make.
    pub fn check(&self) -> Result<(), String> {
        check_name_field("work type", &self.work_type)?;
        if let Some(q) = &self.queue {
            check_name_field("queue", q)?;
        }
        if let Some(p) = self.priority
            && p > MAX_PRIORITY
        {
            return Err(format!(
                "priority {p} is out of range: use 0 to {MAX_PRIORITY}"
            ));
        }
        check_attempt(self.attempt)?;
        match self.timeout_s {
            Some(0) => return Err("timeout_s must be 1 or more".into()),
            Some(t) if t > MAX_TIMEOUT_S => {
                return Err(format!(
                    "timeout_s {t} is out of range: at most {MAX_TIMEOUT_S} (a year)"
                ));
            }
            _ => {}
        }
        match self.max_attempts {
            Some(0) => return Err("max_attempts must be 1 or more".into()),
            Some(m) if m > MAX_ATTEMPT => {
                return Err(format!(
                    "max_attempts {m} is out of range: at most {MAX_ATTEMPT}"
                ));
            }
            _ => {}
        }
        if let Some(b) = self.backoff_ms
            && b > MAX_BACKOFF_MS
        {
            return Err(format!(
                "backoff_ms {b} is out of range: at most {MAX_BACKOFF_MS} (a year)"
            ));
        }
        if let Some(key) = &self.unique_key
            && (key.is_empty() || key.len() > 256)
        {
            return Err("unique_key must be 1 to 256 characters".into());
        }
        for (field, value) in [
            ("ttl_s", self.ttl_s),
            ("unique_for_s", self.unique_for_s),
            ("debounce_s", self.debounce_s),
        ] {
            match value {
                Some(0) => return Err(format!("{field} must be 1 or more")),
                Some(s) if s > MAX_TIMEOUT_S => {
                    return Err(format!(
                        "{field} {s} is out of range: at most {MAX_TIMEOUT_S} (a year)"
                    ));
                }
                Some(_) if field != "ttl_s" && self.unique_key.is_none() => {
                    return Err(format!(
                        "{field} needs a unique_key: the key that the window applies to"
                    ));
                }
                _ => {}
            }
        }
        if self.after.len() > MAX_AFTER {
            return Err(format!(
                "after names {} jobs: at most {MAX_AFTER}; split the group",
                self.after.len()
            ));
        }
        let mut named = std::collections::HashSet::new();
        if let Some(twice) = self.after.iter().find(|u| !named.insert(**u)) {
            return Err(format!("after names job {twice} twice"));
        }
        if self.on_failure.is_some() && self.after.is_empty() {
            return Err("on_failure needs after: the jobs whose failure it applies to".into());
        }
        if self.unique_for_s.is_some() && self.debounce_s.is_some() {
            return Err(
                "unique_for_s and debounce_s contradict each other: the first keeps the first \
                 job of a window, the second the last; use one"
                    .into(),
            );
        }
        Ok(())
    }

    /// Whether the scheduler must see this job before it runs (at `now`): it is held until a
    /// later `run_at`, deduplicated by its `unique_key`, given its deadline by `ttl_s`, or
    /// held until the jobs it names in `after` have ended. An
    /// agent hands such a job, published straight to the jobs exchange, to the scheduler
    /// unless the scheduler published it (header [`ADMITTED_HEADER`]).
    pub fn needs_admission(&self, now: DateTime<Utc>) -> bool {
        self.run_at.is_some_and(|at| at > now)
            || self.unique_key.is_some()
            || self.ttl_s.is_some()
            || !self.after.is_empty()
    }

    pub fn queue_name(&self) -> &str {
        self.queue.as_deref().unwrap_or(DEFAULT_QUEUE)
    }
}

/// How a run of a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Succeeded,
    Failed,
    Crashed,
    TimedOut,
    Cancelled,
    Rejected,
    /// Not started by its deadline (`expires_at`): it did not run.
    Expired,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Crashed => "crashed",
            Status::TimedOut => "timed_out",
            Status::Cancelled => "cancelled",
            Status::Rejected => "rejected",
            Status::Expired => "expired",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a run did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorInfo {
    /// A short machine-readable class: `work`, `panic`, `timeout`, `invalid_job`, …
    pub kind: String,
    pub message: String,
}

impl ErrorInfo {
    pub fn new(kind: &str, message: impl Into<String>) -> Self {
        Self {
            kind: kind.to_owned(),
            message: message.into(),
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        })
    }
}

/// One line a Work logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LogLine {
    pub time: DateTime<Utc>,
    pub level: Level,
    pub message: String,
}

impl fmt::Display for LogLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:5} {}",
            self.time.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            self.level,
            self.message
        )
    }
}

/// The outcome of one run of a job, sent by the pool agent to the results queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobResult {
    pub uuid: JobId,
    pub attempt: u32,
    #[serde(rename = "type")]
    pub work_type: String,
    pub agent: AgentId,
    /// Which worker of the agent's pool ran it (`local-0`, …).
    pub worker: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    #[serde(default)]
    pub output: Value,
    /// The Work's log lines, capped; when lines were dropped the last line says how many.
    #[serde(default)]
    pub logs: Vec<LogLine>,
    /// How many log lines were dropped to respect the cap.
    #[serde(default)]
    pub logs_dropped: u64,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// The job as the agent received it (with its uuid filled in).
    pub job: Job,
}

impl JobResult {
    /// Reads and checks a result (or one of a group's) from a message body.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let result: JobResult = decode("result", body)?;
        result.check()?;
        Ok(result)
    }

    /// The checks that serde's types do not make. The job it carries is the job as received,
    /// which may be the very reason it was rejected: it is not checked.
    pub fn check(&self) -> Result<(), String> {
        check_attempt(self.attempt)
    }
}

/// A message on the results queue: one result, or a group of results that an agent sends
/// together (a JSON array) when several finished while its last message was being confirmed.
/// Only the scheduler reads this queue; the type exists for the JSON Schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ResultsMessage {
    One(Box<JobResult>),
    Group(Vec<JobResult>),
}

/// The most results one message on the results queue may carry.
pub const MAX_RESULT_GROUP: usize = 512;

/// Messages to one pool agent on its own queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentMessage {
    /// The scheduler recorded this result: the agent may forget it.
    Receipt { uuid: JobId, attempt: u32 },
    /// The scheduler recorded these results (one message for the results of one batch).
    Receipts { runs: Vec<Run> },
    /// Stop this job if it runs here, and do not run it if it arrives later.
    Cancel { uuid: JobId },
    /// The queues paused now (`scheduler pause`): take no job from them.
    Paused(PausedQueues),
}

/// The queues whose jobs no agent takes (`scheduler pause`), as of one change. Each change
/// has a higher `version` (the time of the change in milliseconds, or one more than the
/// last), so an agent that hears the set more than once (announced, repeated, asked for)
/// keeps the newest, whichever came first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PausedQueues {
    pub version: u64,
    pub queues: Vec<String>,
    /// What the limits set at the scheduler apply to (`scheduler limit`): a job in one of
    /// them that was published straight to the jobs exchange is handed to the scheduler, which
    /// publishes it when its limits allow. Changes with the same `version`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limited: Vec<LimitScope>,
}

/// The most queues a paused set may name.
pub const MAX_PAUSED: usize = 10_000;

impl PausedQueues {
    /// The checks that serde's types do not make.
    pub fn check(&self) -> Result<(), String> {
        if self.queues.len() > MAX_PAUSED {
            return Err(format!(
                "{} paused queues; at most {MAX_PAUSED}",
                self.queues.len()
            ));
        }
        if self.limited.len() > MAX_LIMITS {
            return Err(format!(
                "{} limits; at most {MAX_LIMITS}",
                self.limited.len()
            ));
        }
        self.limited.iter().try_for_each(LimitScope::check)?;
        self.queues
            .iter()
            .try_for_each(|q| check_name_field("paused queue", q))
    }

    pub fn contains(&self, queue: &str) -> bool {
        self.queues.iter().any(|q| q == queue)
    }

    /// Whether a limit applies to `job`: the scheduler must admit it.
    pub fn limits(&self, job: &Job) -> bool {
        self.limited
            .iter()
            .any(|scope| scope.value_of(job).is_some())
    }
}

/// What a limit applies to: the jobs of one work type, or the jobs with one label key, each
/// value of the label on its own (a limit on `customer` holds for each customer).
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LimitScope {
    WorkType(String),
    Label(String),
}

impl LimitScope {
    /// The value of the scope for `job` (its work type, or its label's value): the jobs of
    /// one value share the limit. None when the limit does not apply to it.
    pub fn value_of<'a>(&self, job: &'a Job) -> Option<&'a str> {
        match self {
            LimitScope::WorkType(t) => (*t == job.work_type).then_some(job.work_type.as_str()),
            LimitScope::Label(key) => job.labels.get(key).map(String::as_str),
        }
    }

    /// The scope with one of its values, as a person reads it: `work_type=pdf.render`,
    /// `customer=acme`.
    pub fn with_value(&self, value: &str) -> String {
        match self {
            LimitScope::WorkType(_) => format!("work_type={value}"),
            LimitScope::Label(key) => format!("{key}={value}"),
        }
    }

    pub fn check(&self) -> Result<(), String> {
        match self {
            LimitScope::WorkType(t) => check_name_field("work type", t),
            LimitScope::Label(key) => check_name_field("label key", key),
        }
    }
}

impl std::fmt::Display for LimitScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitScope::WorkType(t) => write!(f, "work_type={t}"),
            LimitScope::Label(key) => write!(f, "label={key}"),
        }
    }
}

/// A rate: at most `count` jobs started (published by the scheduler) in any `interval_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Rate {
    pub count: u32,
    pub interval_ms: u64,
}

/// The most jobs a rate may allow per interval: the scheduler keeps the time of each in its
/// window, rewritten at each admission (8 bytes a time). A higher rate takes a shorter
/// interval: `1000/100ms` rather than `10000/1s`.
pub const MAX_RATE_COUNT: u32 = 1_000;

impl Rate {
    pub fn check(&self) -> Result<(), String> {
        if self.count == 0 || self.count > MAX_RATE_COUNT {
            return Err(format!(
                "a rate of {} jobs per interval: use 1 to {MAX_RATE_COUNT} (for more, a shorter \
                 interval: 1000/100ms rather than 10000/1s)",
                self.count
            ));
        }
        if self.interval_ms == 0 || self.interval_ms > 86_400_000 {
            return Err(format!(
                "a rate interval of {} ms: use 1 ms to a day",
                self.interval_ms
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.interval_ms;
        match ms {
            _ if ms.is_multiple_of(3_600_000) => write!(f, "{}/{}h", self.count, ms / 3_600_000),
            _ if ms.is_multiple_of(60_000) => write!(f, "{}/{}m", self.count, ms / 60_000),
            _ if ms.is_multiple_of(1_000) => write!(f, "{}/{}s", self.count, ms / 1_000),
            _ => write!(f, "{}/{}ms", self.count, ms),
        }
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    /// Reads `N/INTERVAL`: `10/1s`, `100/1m`, `5/500ms`, `1000/1h`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid rate {s:?}: write N/INTERVAL, e.g. 10/1s, 100/1m, 5/500ms");
        let (count, interval) = s.split_once('/').ok_or_else(bad)?;
        let count = count.trim().parse().map_err(|_| bad())?;
        let interval = interval.trim();
        let split = interval
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(bad)?;
        let (n, unit) = interval.split_at(split);
        let n: u64 = if n.is_empty() {
            1
        } else {
            n.parse().map_err(|_| bad())?
        };
        let per = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad()),
        };
        let rate = Rate {
            count,
            interval_ms: n.checked_mul(per).ok_or_else(bad)?,
        };
        rate.check()?;
        Ok(rate)
    }
}

/// The most limits there may be (scopes with a rate, a concurrency or both).
pub const MAX_LIMITS: usize = 1_000;

/// The most jobs of one value a concurrency limit may let run at once.
pub const MAX_CONCURRENCY: u32 = 1_000_000;

/// The limits on one scope: a rate, a concurrency (at most this many running at once), or
/// both; each value of the scope has them on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Limit {
    pub scope: LimitScope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
}

impl Limit {
    pub fn check(&self) -> Result<(), String> {
        self.scope.check()?;
        if let Some(rate) = &self.rate {
            rate.check()?;
        }
        if let Some(n) = self.concurrency
            && !(1..=MAX_CONCURRENCY).contains(&n)
        {
            return Err(format!(
                "a concurrency of {n}: use 1 to {MAX_CONCURRENCY} (clear the limit to lift it)"
            ));
        }
        Ok(())
    }
}

/// A limit with the values it holds jobs for now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LimitInfo {
    #[serde(flatten)]
    pub limit: Limit,
    /// The values with jobs waiting or running under the limit.
    pub values: Vec<LimitUsage>,
}

/// The jobs of one value of a limit's scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LimitUsage {
    pub value: String,
    /// Jobs held `throttled`, waiting their turn.
    pub waiting: u64,
    /// Jobs published and not over, counted by the concurrency limit (0 without one).
    pub running: u64,
}

/// Which limit of a scope to clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    Rate,
    Concurrency,
}

/// One run of a job: the job and its attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub struct Run {
    pub uuid: JobId,
    pub attempt: u32,
}

/// The most runs one `receipts` message may carry.
pub const MAX_RECEIPTS: usize = 10_000;

impl AgentMessage {
    /// Reads and checks a message to an agent from a message body.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let message: AgentMessage = decode("message to an agent", body)?;
        match &message {
            AgentMessage::Receipt { attempt, .. } => check_attempt(*attempt)?,
            AgentMessage::Receipts { runs } => {
                if runs.len() > MAX_RECEIPTS {
                    return Err(format!(
                        "a receipts message carries {} runs; at most {MAX_RECEIPTS}",
                        runs.len()
                    ));
                }
                for r in runs {
                    check_attempt(r.attempt)?;
                }
            }
            AgentMessage::Cancel { .. } => {}
            AgentMessage::Paused(paused) => paused.check()?,
        }
        Ok(message)
    }

    /// The runs this message receipts (none for a cancel or a pause).
    pub fn receipted(&self) -> Vec<Run> {
        match self {
            AgentMessage::Receipt { uuid, attempt } => vec![Run {
                uuid: *uuid,
                attempt: *attempt,
            }],
            AgentMessage::Receipts { runs } => runs.clone(),
            AgentMessage::Cancel { .. } | AgentMessage::Paused(_) => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Started,
    Progress,
    Finished,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Started => "started",
            EventKind::Progress => "progress",
            EventKind::Finished => "finished",
        }
    }
}

/// A job event on the topic exchange, routing key `job.<event>.<type>`. `started` and
/// `progress` come from the agent that runs the job; `finished` from the scheduler once it has
/// recorded the outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    pub event: EventKind,
    pub uuid: JobId,
    pub attempt: u32,
    #[serde(rename = "type")]
    pub work_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentId>,
    pub time: DateTime<Utc>,
    /// For `finished`: how the run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// For `finished`: the job's state once this run was recorded (`scheduled` when a retry
    /// follows); the job is over when this state is final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
    /// For `progress`: a fraction from 0 to 1 and/or a message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// For `started`: the job, so a job published straight to the jobs exchange gets recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
}

impl Event {
    /// Reads and checks an event from a message body; a progress fraction is clamped to 0..=1.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let mut event: Event = decode("event", body)?;
        event.check()?;
        Ok(event)
    }

    /// The checks that serde's types do not make; a progress fraction is clamped to 0..=1.
    pub fn check(&mut self) -> Result<(), String> {
        check_attempt(self.attempt)?;
        if let Some(job) = &self.job {
            job.check().map_err(|e| format!("the event's job: {e}"))?;
        }
        if let Some(fraction) = self.progress.as_mut().and_then(|p| p.fraction.as_mut()) {
            *fraction = fraction.clamp(0.0, 1.0);
        }
        Ok(())
    }

    pub fn routing_key(&self) -> String {
        format!("job.{}.{}", self.event.as_str(), self.work_type)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Progress {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Scheduler,
    Agent,
}

/// Sent by every part on the heartbeats fanout exchange every `interval_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Heartbeat {
    pub role: Role,
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    pub started_at: DateTime<Utc>,
    /// Counts up by one per heartbeat; a gap means lost heartbeats, a reset a restart.
    pub seq: u64,
    pub interval_ms: u64,
    #[serde(default)]
    pub pools: Vec<PoolStatus>,
    #[serde(default)]
    pub running: Vec<JobId>,
    /// Results kept in the agent's outbox, not yet receipted by the scheduler.
    #[serde(default)]
    pub unreceipted: u64,
    /// The scheduler's: every paused queue. An agent's: those of its queues it takes no job
    /// from, with the version of the set it heard last (the scheduler tells an agent that is
    /// behind the set again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<PausedQueues>,
}

impl Heartbeat {
    /// Reads a heartbeat from a message body; its `interval_ms` is clamped to
    /// [`HEARTBEAT_INTERVAL_MS`].
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let mut beat: Heartbeat = decode("heartbeat", body)?;
        if let Some(paused) = &beat.paused {
            paused.check()?;
        }
        beat.clamp();
        Ok(beat)
    }

    /// Brings `interval_ms` into [`HEARTBEAT_INTERVAL_MS`].
    pub fn clamp(&mut self) {
        self.interval_ms = self
            .interval_ms
            .clamp(*HEARTBEAT_INTERVAL_MS.start(), *HEARTBEAT_INTERVAL_MS.end());
    }
}

/// The state of one worker pool, as reported in heartbeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PoolStatus {
    pub queues: Vec<String>,
    pub location: String,
    pub min: usize,
    pub max: usize,
    pub busy: usize,
    pub idle: usize,
}

/// Where a job stands, as the scheduler records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Held by the scheduler until its time: a delayed job, or a retry waiting for its backoff.
    Scheduled,
    /// Held by the scheduler for a rate or concurrency limit (`scheduler limit`); `reason`
    /// says which.
    Throttled,
    /// Recorded and published; waiting in RabbitMQ for a worker.
    Queued,
    Running,
    Succeeded,
    Failed,
    Crashed,
    TimedOut,
    Cancelled,
    Rejected,
    /// Failed on every one of its `max_attempts` (more than one) attempts.
    Dead,
    /// Not started by its deadline (`expires_at`); `reason` or its last attempt says when it
    /// was due and when it was looked at.
    Expired,
    /// Replaced, while held for its `debounce_s`, by a newer job with its unique key
    /// (`superseded_by`).
    Superseded,
    /// Held until other jobs end: a group's callback or a chain's next link (until the jobs of
    /// its `after` end; `waiting_for` lists those not ended yet), or a job whose Work ended and
    /// waits for its children.
    Waiting,
}

impl JobState {
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            JobState::Scheduled
                | JobState::Throttled
                | JobState::Queued
                | JobState::Running
                | JobState::Waiting
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Throttled => "throttled",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Crashed => "crashed",
            JobState::TimedOut => "timed_out",
            JobState::Cancelled => "cancelled",
            JobState::Rejected => "rejected",
            JobState::Dead => "dead",
            JobState::Expired => "expired",
            JobState::Superseded => "superseded",
            JobState::Waiting => "waiting",
        }
    }
}

impl From<Status> for JobState {
    fn from(s: Status) -> Self {
        match s {
            Status::Succeeded => JobState::Succeeded,
            Status::Failed => JobState::Failed,
            Status::Crashed => JobState::Crashed,
            Status::TimedOut => JobState::TimedOut,
            Status::Cancelled => JobState::Cancelled,
            Status::Rejected => JobState::Rejected,
            Status::Expired => JobState::Expired,
        }
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(Value::String(s.to_owned())).map_err(|_| {
            format!(
                "unknown job state {s:?}: use scheduled, throttled, waiting, queued, running, \
                 succeeded, failed, crashed, timed_out, cancelled, rejected, dead, expired or \
                 superseded"
            )
        })
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One run of a job, as the scheduler records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Attempt {
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// None while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    #[serde(default)]
    pub output: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub log_lines: usize,
}

/// Everything the scheduler knows of one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobRecord {
    pub uuid: JobId,
    pub state: JobState,
    pub job: Job,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// The job's folder under the scheduler's data directory.
    pub dir: String,
    /// `scheduler cancel` was asked for while the job had not ended.
    #[serde(default)]
    pub cancel_requested: bool,
    /// While `scheduled`: when the scheduler queues it (its `run_at`, or its next retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run_at: Option<DateTime<Utc>>,
    /// The jobs its Work submitted (filled in by `status`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<JobId>,
    /// Why the scheduler ended the job without running it (`expired`, `superseded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For `superseded`: the newer job with its unique key that replaced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<JobId>,
    /// While `waiting`: the jobs it still waits for (of its `after`, or its children).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<JobId>,
}

impl JobRecord {
    /// Seconds from the first start to the last finish, when both are known.
    pub fn duration_s(&self) -> Option<f64> {
        let start = self.attempts.first()?.started_at?;
        let end = self.attempts.last()?.finished_at?;
        Some((end - start).num_milliseconds() as f64 / 1000.0)
    }
}

/// A request to the scheduler on the RPC queue (`reply_to` and `correlation_id` set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum RpcRequest {
    /// Record a job and queue it; replies with its record. Submitting a uuid that is already
    /// recorded returns the existing record and queues nothing.
    Submit {
        job: Job,
    },
    /// Record a group: `jobs` queued as by `submit`, and `callback` held (`waiting`) until
    /// every one of them has ended, then queued with their outcomes in its `inputs` (its
    /// `after` is set to them). All are recorded at once; replies with `jobs` (their records
    /// in order, the callback last). Submitting it again (the same uuids) records nothing new.
    SubmitGroup {
        jobs: Vec<Job>,
        callback: Job,
        /// What a member that ends other than `succeeded` does to the callback (`run` when
        /// absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        on_failure: Option<OnFailure>,
    },
    /// Record a chain: the first job queued, each next one held (`waiting`) until the one
    /// before it ends, then queued with its outcome in `inputs`; when one ends other than
    /// `succeeded`, the rest end `cancelled` without running. Replies with `jobs` in order.
    SubmitChain {
        jobs: Vec<Job>,
    },
    Status {
        uuid: JobId,
    },
    /// The job's log lines, a page at a time (see `cursor`).
    Logs {
        uuid: JobId,
        /// The `next` of the previous page; absent for the first page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<String>,
        /// At most this many lines in the page. A request without `cursor` and `limit` (from
        /// a client that does not follow pages) gets the first page with a last line saying
        /// where the rest is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
    /// Jobs, newest first, a page at a time (see `cursor`).
    List {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<JobState>,
        /// At most this many jobs in the page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
        /// The `next` of the previous page; absent for the first page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<String>,
    },
    Agents,
    /// Stop a job: a running one ends `cancelled`, a queued or scheduled one is not run.
    Cancel {
        uuid: JobId,
    },
    /// Run a job that ended without success once more (a new attempt).
    Retry {
        uuid: JobId,
    },
    ScheduleAdd {
        schedule: ScheduleSpec,
    },
    ScheduleList,
    SchedulePause {
        name: String,
    },
    ScheduleResume {
        name: String,
    },
    ScheduleRemove {
        name: String,
    },
    /// Submit the schedule's job now (its fire times do not change).
    ScheduleRunNow {
        name: String,
    },
    /// Every agent stops taking jobs from the queue (running ones finish), until `resume`.
    Pause {
        queue: String,
    },
    /// Agents take jobs from the paused queue again.
    Resume {
        queue: String,
    },
    /// The paused queues (a new pool agent asks, before it takes jobs).
    Paused,
    /// Sets the rate, the concurrency, or both, of the limit on `scope` (what is not given
    /// stays as it was). Replies with the limits.
    SetLimit {
        #[serde(flatten)]
        limit: Limit,
    },
    /// Clears the limit on `scope` (only its `kind` when given); the jobs it held go on.
    ClearLimit {
        scope: LimitScope,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<LimitKind>,
    },
    /// The limits, with the jobs each holds.
    Limits,
}

impl RpcRequest {
    /// Reads and checks a request from a message body: a job it carries (to submit, or the
    /// job of a schedule) passes [`Job::check`].
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let request: RpcRequest = decode("request", body)?;
        match &request {
            RpcRequest::Submit { job } => job.check()?,
            RpcRequest::SubmitGroup { jobs, callback, .. } => {
                check_jobs("group", jobs)?;
                callback
                    .check()
                    .map_err(|e| format!("the group's callback: {e}"))?;
            }
            RpcRequest::SubmitChain { jobs } => check_jobs("chain", jobs)?,
            RpcRequest::ScheduleAdd { schedule } => schedule
                .job()
                .check()
                .map_err(|e| format!("the schedule's job: {e}"))?,
            RpcRequest::Pause { queue } | RpcRequest::Resume { queue } => {
                check_name_field("queue", queue)?
            }
            RpcRequest::SetLimit { limit } => {
                limit.check()?;
                if limit.rate.is_none() && limit.concurrency.is_none() {
                    return Err("set_limit needs a rate, a concurrency or both".into());
                }
            }
            RpcRequest::ClearLimit { scope, .. } => scope.check()?,
            _ => {}
        }
        Ok(request)
    }
}

/// Checks the jobs of a group or a chain: 1 to [`MAX_AFTER`] of them, each valid.
fn check_jobs(what: &str, jobs: &[Job]) -> Result<(), String> {
    if jobs.is_empty() || jobs.len() > MAX_AFTER {
        return Err(format!(
            "a {what} has 1 to {MAX_AFTER} jobs, not {}",
            jobs.len()
        ));
    }
    for (i, job) in jobs.iter().enumerate() {
        job.check()
            .map_err(|e| format!("job {} of the {what}: {e}", i + 1))?;
    }
    Ok(())
}

/// The scheduler's reply to an [`RpcRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum RpcReply {
    Job {
        job: Box<JobRecord>,
    },
    /// A page of log lines (every reply stays under the scheduler's byte budget).
    Logs {
        uuid: JobId,
        attempts: Vec<AttemptLogs>,
        /// Present when more lines follow: ask again with this as `cursor`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    /// A page of jobs (every reply stays under the scheduler's byte budget).
    Jobs {
        jobs: Vec<JobRecord>,
        /// Present when more jobs follow: ask again with this as `cursor`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    Agents {
        agents: Vec<AgentInfo>,
    },
    /// The answer to `pause`, `resume` and `paused`.
    Paused {
        /// The version of the paused queues (see [`PausedQueues`]).
        version: u64,
        /// The queues paused now.
        queues: Vec<String>,
        /// False when the queue already was paused (`pause`) or was not (`resume`), and for
        /// `paused`.
        changed: bool,
        /// What the limits apply to (see [`PausedQueues::limited`]).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        limited: Vec<LimitScope>,
    },
    /// The answer to `set_limit`, `clear_limit` and `limits`.
    Limits {
        limits: Vec<LimitInfo>,
    },
    Schedule {
        schedule: Box<ScheduleInfo>,
    },
    Schedules {
        schedules: Vec<ScheduleInfo>,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AttemptLogs {
    pub attempt: u32,
    pub lines: Vec<LogLine>,
}

/// A part seen through its heartbeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentInfo {
    pub alive: bool,
    pub last_seen: DateTime<Utc>,
    pub heartbeat: Heartbeat,
}

/// What to do with the fire times a schedule missed while the scheduler was down (or more than
/// its grace period late).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MissedPolicy {
    /// Missed fire times are dropped; the schedule goes on from now.
    #[default]
    Skip,
    /// However many were missed, the job runs once, for the latest missed time.
    RunOnce,
}

impl MissedPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            MissedPolicy::Skip => "skip",
            MissedPolicy::RunOnce => "run-once",
        }
    }
}

impl FromStr for MissedPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "skip" => Ok(MissedPolicy::Skip),
            "run-once" | "run_once" => Ok(MissedPolicy::RunOnce),
            _ => Err(format!(
                "unknown missed-run policy {s:?}: use skip or run-once"
            )),
        }
    }
}

fn utc() -> String {
    "UTC".into()
}

/// A time-based schedule: fires a job of `type` at each time its cron expression names, in
/// its time zone. Declared in the scheduler's config file (`[[schedule]]`) or over RPC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Its name: unique, a valid name part.
    pub name: String,
    /// Five fields (minute hour day-of-month month day-of-week), or six with seconds first.
    pub cron: String,
    /// An IANA time zone (`Europe/London`); `UTC` when absent.
    #[serde(default = "utc")]
    pub tz: String,
    #[serde(default)]
    pub missed: MissedPolicy,
    /// The job each fire submits.
    #[serde(rename = "type")]
    pub work_type: String,
    #[serde(default)]
    pub payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// A fire does not start another job while the previous one with this key is not over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_key: Option<String>,
}

impl ScheduleSpec {
    /// The job one fire submits (without uuid and time).
    pub fn job(&self) -> Job {
        let mut job = Job::new(self.work_type.clone(), self.payload.clone());
        job.queue = self.queue.clone();
        job.priority = self.priority;
        job.timeout_s = self.timeout_s;
        job.max_attempts = self.max_attempts;
        job.unique_key = self.unique_key.clone();
        job.schedule = Some(self.name.clone());
        job
    }
}

/// A schedule and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScheduleInfo {
    pub spec: ScheduleSpec,
    pub paused: bool,
    /// Declared in the config file (which wins at each start) rather than over RPC.
    #[serde(default)]
    pub from_config: bool,
    /// The last fire time handled (fired, or skipped as missed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fire: Option<DateTime<Utc>>,
    /// The job of the last fire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_job: Option<JobId>,
    /// The next fire time (none while paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_fire: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn receipts_are_read_one_or_many_and_bounded() {
        let u = JobId::random();
        let one = json!({"kind": "receipt", "uuid": u, "attempt": 2}).to_string();
        let many = json!({"kind": "receipts", "runs": [{"uuid": u, "attempt": 1}, {"uuid": u, "attempt": 2}]});
        let run = |attempt| Run { uuid: u, attempt };
        assert_eq!(
            AgentMessage::parse(one.as_bytes())
                .expect("valid")
                .receipted(),
            vec![run(2)]
        );
        assert_eq!(
            AgentMessage::parse(many.to_string().as_bytes())
                .expect("valid")
                .receipted(),
            vec![run(1), run(2)]
        );
        let too_many = AgentMessage::Receipts {
            runs: vec![run(1); MAX_RECEIPTS + 1],
        };
        let err = AgentMessage::parse(&serde_json::to_vec(&too_many).expect("valid"))
            .expect_err("refused");
        assert!(err.contains("at most"), "{err}");
        let bad = json!({"kind": "receipts", "runs": [{"uuid": u, "attempt": u32::MAX}]});
        assert!(AgentMessage::parse(bad.to_string().as_bytes()).is_err());
    }

    #[test]
    fn a_minimal_job_gets_defaults() {
        let job = Job::parse(br#"{"type":"demo.echo"}"#).expect("valid");
        assert_eq!(job.work_type, "demo.echo");
        assert_eq!(job.attempt, 1);
        assert_eq!(job.payload, Value::Null);
        assert_eq!(job.queue_name(), "default");
    }

    #[test]
    fn classname_is_an_alias_and_unknown_fields_are_ignored() {
        let job = Job::parse(br#"{"classname":"demo.echo","extra":{"x":1}}"#).expect("valid");
        assert_eq!(job.work_type, "demo.echo");
    }

    #[test]
    fn bad_jobs_are_refused_with_a_reason() {
        let cases: [(&[u8], &str); 6] = [
            (b"{not json", "not a valid job"),
            (br#"{"payload":{}}"#, "missing field `type`"),
            (br#"{"type":"a b"}"#, "invalid work type"),
            (br#"{"type":"x","uuid":"nope"}"#, "not a valid job"),
            (
                br#"{"type":"x","priority":12}"#,
                "priority 12 is out of range",
            ),
            (br#"{"type":"x","queue":"../etc"}"#, "invalid queue"),
        ];
        for (body, want) in cases {
            let err = Job::parse(body).expect_err("must be refused");
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn windows_need_a_unique_key_and_exclude_each_other() {
        let job = |extra: Value| {
            let mut v = json!({"type": "demo.echo"});
            v.as_object_mut()
                .expect("object")
                .extend(extra.as_object().expect("object").clone());
            Job::parse(&serde_json::to_vec(&v).expect("json"))
        };
        assert!(job(json!({"unique_key": "k", "debounce_s": 5})).is_ok());
        assert!(job(json!({"ttl_s": 5})).is_ok(), "a deadline needs no key");
        for (extra, want) in [
            (json!({"debounce_s": 5}), "debounce_s needs a unique_key"),
            (
                json!({"unique_for_s": 5}),
                "unique_for_s needs a unique_key",
            ),
            (json!({"ttl_s": 0}), "ttl_s must be 1 or more"),
            (
                json!({"unique_key": "k", "unique_for_s": u64::MAX}),
                "unique_for_s 18446744073709551615 is out of range",
            ),
            (
                json!({"unique_key": "k", "unique_for_s": 5, "debounce_s": 5}),
                "contradict each other",
            ),
        ] {
            let err = job(extra.clone()).expect_err(&format!("{extra} must be refused"));
            assert!(err.contains(want), "{extra}: {err:?} should say {want:?}");
        }
    }

    #[test]
    fn only_options_the_scheduler_applies_need_admission() {
        let now = Utc::now();
        let mut job = Job::new("demo.echo", Value::Null);
        job.max_attempts = Some(3);
        job.expires_at = Some(now);
        assert!(
            !job.needs_admission(now),
            "retries and deadlines apply as it runs"
        );
        job.run_at = Some(now - chrono::Duration::seconds(1));
        assert!(!job.needs_admission(now), "a run_at passed already");
        for set in [
            |j: &mut Job| j.run_at = Some(Utc::now() + chrono::Duration::hours(1)),
            |j: &mut Job| j.unique_key = Some("k".into()),
            |j: &mut Job| j.ttl_s = Some(60),
        ] {
            let mut held = job.clone();
            set(&mut held);
            assert!(held.needs_admission(now));
        }
    }

    #[test]
    fn limit_requests_read_as_the_readme_writes_them() {
        let set = RpcRequest::parse(
            br#"{"method": "set_limit", "scope": {"label": "customer"}, "concurrency": 2}"#,
        )
        .expect("valid");
        let RpcRequest::SetLimit { limit } = &set else {
            panic!("not set_limit: {set:?}");
        };
        assert_eq!(limit.scope, LimitScope::Label("customer".into()));
        assert_eq!((limit.rate, limit.concurrency), (None, Some(2)));
        let rate = br#"{"method": "set_limit", "scope": {"work_type": "pdf.render"}, "rate": {"count": 10, "interval_ms": 1000}}"#;
        assert!(RpcRequest::parse(rate).is_ok());
        let clear = br#"{"method": "clear_limit", "scope": {"label": "customer"}, "kind": "rate"}"#;
        assert!(RpcRequest::parse(clear).is_ok());
        assert_eq!(
            RpcRequest::parse(br#"{"method": "limits"}"#),
            Ok(RpcRequest::Limits)
        );
        for bad in [
            &br#"{"method": "set_limit", "scope": {"label": "customer"}}"#[..],
            br#"{"method": "set_limit", "scope": {"label": "customer"}, "concurrency": 0}"#,
            br#"{"method": "set_limit", "scope": {"work_type": "x"}, "rate": {"count": 5, "interval_ms": 0}}"#,
        ] {
            assert!(RpcRequest::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let job = Job::new("pdf.render", json!({}));
        let paused = PausedQueues {
            version: 1,
            queues: Vec::new(),
            limited: vec![LimitScope::Label("customer".into())],
        };
        assert!(!paused.limits(&job), "no customer label: no limit");
        let mut labelled = job.clone();
        labelled.labels.insert("customer".into(), "acme".into());
        assert!(paused.limits(&labelled));
    }

    #[test]
    fn a_job_round_trips() {
        let mut job = Job::new("demo.echo", json!({"a": [1, 2]}));
        job.uuid = Some(JobId::random());
        job.priority = Some(3);
        job.labels.insert("team".into(), "billing".into());
        let back = Job::parse(&serde_json::to_vec(&job).expect("serializes")).expect("parses");
        assert_eq!(back, job);
    }

    #[test]
    fn a_result_round_trips_with_the_wire_names() {
        let now = Utc::now();
        let result = JobResult {
            uuid: JobId::random(),
            attempt: 1,
            work_type: "demo.fail".into(),
            agent: AgentId::new("a1").expect("valid"),
            worker: "local-0".into(),
            status: Status::TimedOut,
            error: Some(ErrorInfo::new("timeout", "ran longer than 1 s")),
            output: Value::Null,
            logs: vec![LogLine {
                time: now,
                level: Level::Warn,
                message: "hi".into(),
            }],
            logs_dropped: 0,
            started_at: now,
            finished_at: now,
            job: Job::new("demo.fail", Value::Null),
        };
        let text = serde_json::to_value(&result).expect("serializes");
        assert_eq!(text["status"], "timed_out");
        assert_eq!(text["type"], "demo.fail");
        assert_eq!(text["logs"][0]["level"], "warn");
        let back: JobResult = serde_json::from_value(text).expect("parses");
        assert_eq!(back, result);
    }

    #[test]
    fn rpc_messages_are_tagged() {
        let req = RpcRequest::List {
            state: Some(JobState::TimedOut),
            limit: Some(5),
            cursor: None,
        };
        let v = serde_json::to_value(&req).expect("serializes");
        assert_eq!(
            v,
            json!({"method": "list", "state": "timed_out", "limit": 5})
        );
        let receipt = AgentMessage::Receipt {
            uuid: JobId::random(),
            attempt: 2,
        };
        let v = serde_json::to_value(&receipt).expect("serializes");
        assert_eq!(v["kind"], "receipt");
        assert!("bogus".parse::<JobState>().is_err());
    }

    /// A job with every field, as JSON.
    fn full_job() -> Value {
        json!({
            "type": "demo.echo", "uuid": JobId::random(), "payload": {"a": [1, 2.5, "x"]},
            "queue": "default", "priority": 3, "timeout_s": 30, "max_attempts": 3,
            "run_at": "2026-11-23T05:00:00Z", "attempt": 1, "parent": JobId::random(),
            "labels": {"team": "billing"}, "unique_key": "k", "backoff_ms": 100,
            "schedule": "nightly", "expires_at": "2026-11-23T06:00:00Z", "ttl_s": 60,
            "unique_for_s": 3600
        })
    }

    fn with(mut base: Value, field: &str, value: Value) -> Vec<u8> {
        base[field] = value;
        serde_json::to_vec(&base).expect("serializes")
    }

    #[test]
    fn numbers_that_would_overflow_are_refused_with_a_reason() {
        let cases = [
            (
                "attempt",
                json!(u32::MAX),
                "attempt 4294967295 is out of range",
            ),
            ("attempt", json!(u64::from(u32::MAX) + 1), "not a valid job"),
            ("attempt", json!(-1), "not a valid job"),
            ("attempt", json!(0), "attempt must be 1 or more"),
            (
                "timeout_s",
                json!(u64::MAX),
                "timeout_s 18446744073709551615 is out of range",
            ),
            ("timeout_s", json!(1e300), "not a valid job"),
            (
                "max_attempts",
                json!(u32::MAX),
                "max_attempts 4294967295 is out of range",
            ),
            (
                "backoff_ms",
                json!(u64::MAX),
                "backoff_ms 18446744073709551615 is out of range",
            ),
            ("priority", json!(256), "not a valid job"),
            (
                "run_at",
                json!("+999999-01-01T00:00:00Z"),
                "not a valid job",
            ),
        ];
        for (field, value, want) in cases {
            let err = Job::parse(&with(full_job(), field, value.clone()))
                .expect_err(&format!("{field} = {value} must be refused"));
            assert!(
                err.contains(want),
                "{field} = {value}: {err:?} should say {want:?}"
            );
        }
        // At the bounds, a job is fine, and counting up or adding its timeout is safe.
        let mut job = full_job();
        job["attempt"] = json!(MAX_ATTEMPT);
        job["timeout_s"] = json!(MAX_TIMEOUT_S);
        job["backoff_ms"] = json!(MAX_BACKOFF_MS);
        let job = Job::parse(&serde_json::to_vec(&job).expect("serializes")).expect("valid");
        assert!(job.attempt.checked_add(1).is_some());
        let timeout = std::time::Duration::from_secs(job.timeout_s.expect("set"));
        assert!(std::time::Instant::now().checked_add(timeout).is_some());
    }

    #[test]
    fn wrong_types_and_huge_or_deep_values_are_serde_errors() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let bodies: Vec<Vec<u8>> = vec![
            with(full_job(), "attempt", json!("1")),
            with(full_job(), "labels", json!(["a"])),
            with(full_job(), "uuid", json!(5)),
            with(full_job(), "type", json!({"a": 1})),
            with(full_job(), "type", json!("t".repeat(1 << 20))),
            with(full_job(), "queue", json!("q".repeat(1 << 20))),
            with(full_job(), "unique_key", json!("k".repeat(1 << 20))),
            with(full_job(), "attempt", json!("9".repeat(1 << 20))),
            with(full_job(), "priority", json!("p".repeat(1 << 20))),
            format!(r#"{{"type":"demo.echo","payload":{deep}}}"#).into_bytes(),
            b"[]".to_vec(),
            b"null".to_vec(),
            b"\xff\xfe".to_vec(),
            Vec::new(),
        ];
        for body in bodies {
            let err = Job::parse(&body).expect_err("must be refused");
            assert!(
                err.len() < 1000,
                "a readable reason, not the input: {}",
                err.len()
            );
        }
    }

    #[test]
    fn the_other_messages_are_checked_or_clamped() {
        let beat = json!({
            "role": "agent", "id": "a1", "host": "h", "pid": 1, "version": "0",
            "started_at": "2026-11-23T05:00:00Z", "seq": u64::MAX, "interval_ms": u64::MAX
        });
        let hb =
            Heartbeat::parse(&with(beat.clone(), "interval_ms", json!(u64::MAX))).expect("valid");
        assert_eq!(hb.interval_ms, *HEARTBEAT_INTERVAL_MS.end());
        let hb = Heartbeat::parse(&with(beat.clone(), "interval_ms", json!(0))).expect("valid");
        assert_eq!(hb.interval_ms, 1);
        assert!(Heartbeat::parse(&with(beat, "pid", json!(-1))).is_err());

        let receipt = json!({"kind": "receipt", "uuid": JobId::random(), "attempt": 1});
        assert!(AgentMessage::parse(&with(receipt.clone(), "attempt", json!(1))).is_ok());
        let err = AgentMessage::parse(&with(receipt.clone(), "attempt", json!(u32::MAX)))
            .expect_err("refused");
        assert!(err.contains("out of range"), "{err}");
        assert!(AgentMessage::parse(&with(receipt, "kind", json!("explode"))).is_err());

        let event = json!({
            "event": "progress", "uuid": JobId::random(), "attempt": 1, "type": "demo.echo",
            "time": "2026-11-23T05:00:00Z", "progress": {"fraction": 7.5}
        });
        let e = Event::parse(&serde_json::to_vec(&event).expect("json")).expect("valid");
        assert_eq!(e.progress.and_then(|p| p.fraction), Some(1.0));
        assert!(Event::parse(&with(event.clone(), "attempt", json!(u32::MAX))).is_err());
        let bad_job = with(full_job(), "timeout_s", json!(u64::MAX));
        let bad_job: Value = serde_json::from_slice(&bad_job).expect("json");
        let err = Event::parse(&with(event, "job", bad_job.clone())).expect_err("refused");
        assert!(err.contains("the event's job: timeout_s"), "{err}");

        let err = RpcRequest::parse(
            &serde_json::to_vec(&json!({"method": "submit", "job": bad_job})).expect("json"),
        )
        .expect_err("refused");
        assert!(err.contains("timeout_s"), "{err}");
        let schedule = json!({"method": "schedule_add", "schedule": {
            "name": "n", "cron": "* * * * *", "type": "demo.echo", "max_attempts": u32::MAX}});
        let err =
            RpcRequest::parse(&serde_json::to_vec(&schedule).expect("json")).expect_err("refused");
        assert!(err.contains("the schedule's job: max_attempts"), "{err}");

        let mut result = sample_result();
        result["attempt"] = json!(u32::MAX);
        let err = JobResult::parse(&serde_json::to_vec(&result).expect("json")).expect_err("no");
        assert!(err.contains("out of range"), "{err}");
    }

    fn sample_result() -> Value {
        let now = Utc::now();
        json!({
            "uuid": JobId::random(), "attempt": 1, "type": "demo.echo", "agent": "a1",
            "worker": "process-0", "status": "failed", "error": {"kind": "work", "message": "m"},
            "output": {"x": 1}, "logs": [{"time": now, "level": "info", "message": "hi"}],
            "logs_dropped": 0, "started_at": now, "finished_at": now, "job": full_job()
        })
    }

    /// A small deterministic random source (xorshift64*): the same cases on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// A value meant to break whoever reads it.
    fn extreme(rng: &mut Rng) -> Value {
        match rng.below(16) {
            0 => json!(u64::MAX),
            1 => json!(i64::MIN),
            2 => json!(-1),
            3 => json!(0),
            4 => json!(u32::MAX),
            5 => json!(u64::from(u32::MAX) + 1),
            6 => json!(1e308),
            7 => json!(-0.5),
            8 => json!(""),
            9 => json!("x".repeat(70_000)),
            10 => json!("\u{0}🦀\u{1e}"),
            11 => Value::Null,
            12 => json!(true),
            13 => json!([]),
            14 => json!({}),
            _ => (0..200).fold(json!(1), |v, _| json!([v])),
        }
    }

    /// Every place in `v`, as a JSON pointer.
    fn places(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    places(x, format!("{at}/{k}"), out);
                }
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    places(x, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
        out.push(at);
    }

    /// `v` with one to three of its places changed: set to an extreme value, deleted, or made
    /// a string of itself.
    fn mutate(mut v: Value, rng: &mut Rng) -> Value {
        for _ in 0..=rng.below(3) {
            let mut all = Vec::new();
            places(&v, String::new(), &mut all);
            let at = all[rng.below(all.len())].clone();
            let (parent, key) = at.rsplit_once('/').unwrap_or(("", ""));
            match rng.below(3) {
                0 if !key.is_empty() => {
                    if let Some(Value::Object(m)) = v.pointer_mut(parent) {
                        m.remove(key);
                    }
                }
                1 => {
                    if let Some(x) = v.pointer_mut(&at) {
                        *x = Value::String(x.to_string());
                    }
                }
                _ => {
                    if let Some(x) = v.pointer_mut(&at) {
                        *x = extreme(rng);
                    }
                }
            }
        }
        v
    }

    /// Thousands of mutated copies of valid messages, and of their bytes: every parse
    /// returns, and what it accepts is within the bounds that keep arithmetic safe.
    #[test]
    fn mutated_messages_never_panic_and_what_passes_is_bounded() {
        let now = "2026-11-23T05:00:00Z";
        let bases = [
            full_job(),
            sample_result(),
            json!({"role": "agent", "id": "a1", "host": "h", "pid": 1, "version": "0",
                "started_at": now, "seq": 1, "interval_ms": 200,
                "pools": [{"queues": ["default"], "location": "process", "min": 1, "max": 4,
                    "busy": 1, "idle": 0}],
                "running": [JobId::random()], "unreceipted": 2,
                "paused": {"version": 3, "queues": ["default"]}}),
            json!({"event": "started", "uuid": JobId::random(), "attempt": 1, "type": "t",
                "agent": "a1", "time": now, "status": "failed", "state": "running",
                "progress": {"fraction": 0.5, "message": "m"}, "job": full_job()}),
            json!({"kind": "receipt", "uuid": JobId::random(), "attempt": 2}),
            json!({"kind": "paused", "version": 7, "queues": ["default", "mail"]}),
            json!({"method": "pause", "queue": "mail"}),
            json!({"method": "submit", "job": full_job()}),
            json!({"method": "list", "state": "failed", "limit": 10}),
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut accepted = 0;
        for i in 0..6000 {
            let base = bases[i % bases.len()].clone();
            let mut body = serde_json::to_vec(&mutate(base, &mut rng)).expect("serializes");
            if rng.below(4) == 0 {
                // Damage the bytes too: cut them short, or change one.
                let at = rng.below(body.len());
                if rng.below(2) == 0 {
                    body.truncate(at);
                } else {
                    body[at] = rng.next() as u8;
                }
            }
            if let Ok(job) = Job::parse(&body) {
                accepted += 1;
                assert!((1..=MAX_ATTEMPT).contains(&job.attempt));
                assert!(job.timeout_s.unwrap_or(1) <= MAX_TIMEOUT_S);
                assert!(job.backoff_ms.unwrap_or(0) <= MAX_BACKOFF_MS);
            }
            if let Ok(r) = JobResult::parse(&body) {
                accepted += 1;
                assert!(r.attempt.checked_add(1).is_some());
            }
            if let Ok(hb) = Heartbeat::parse(&body) {
                accepted += 1;
                assert!(HEARTBEAT_INTERVAL_MS.contains(&hb.interval_ms));
            }
            if let Ok(e) = Event::parse(&body) {
                accepted += 1;
                assert!(e.attempt <= MAX_ATTEMPT);
            }
            match AgentMessage::parse(&body) {
                Ok(AgentMessage::Paused(p)) => {
                    accepted += 1;
                    assert!(p.queues.len() <= MAX_PAUSED);
                    assert!(p.queues.iter().all(|q| check_name("queue", q).is_ok()));
                }
                Ok(_) => accepted += 1,
                Err(_) => {}
            }
            accepted += usize::from(RpcRequest::parse(&body).is_ok());
        }
        // The mutations leave many messages valid: the checks above did run.
        assert!(accepted > 500, "only {accepted} accepted");
    }
}
