//! The names of every exchange and queue, built in one place from the namespace, so that
//! several deployments (or test runs) can share one broker without seeing each other.

use crate::roles::Roles;

/// The queue a job goes to when it names none.
pub const DEFAULT_QUEUE: &str = "default";

/// The kind of RabbitMQ queue that holds the jobs (see the README for what each gives up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    /// Quorum on RabbitMQ 4 and later, classic before: what each broker is made for.
    #[default]
    Auto,
    /// One copy on one node; honours job priorities 0 to 9 (`x-max-priority`).
    Classic,
    /// Replicated over the cluster's nodes (Raft); two priority levels on RabbitMQ 4.0
    /// (0-4 and 5-9), none on 3.x.
    Quorum,
}

impl QueueType {
    /// Its name on the command line (`--queue-type`) and in ROTA_QUEUE_TYPE.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Auto => "auto",
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }

    /// Whether queues of this kind are quorum queues on a broker of major version `major`.
    pub fn is_quorum_on(self, major: u32) -> bool {
        match self {
            QueueType::Auto => major >= 4,
            QueueType::Classic => false,
            QueueType::Quorum => true,
        }
    }
}

/// Exchange and queue names of one namespace (`rota` by default), the kind of its jobs
/// queues (and of its other durable queues), which every part that declares them must agree
/// on, and the broker users of each role, whose messages the parts take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    ns: String,
    jobs_queue_type: QueueType,
    roles: Roles,
}

impl Names {
    /// Names under `namespace`; it must be a valid name part (see [`check_name`]).
    pub fn new(namespace: &str) -> Result<Self, String> {
        check_name("namespace", namespace)?;
        Ok(Self {
            ns: namespace.to_owned(),
            jobs_queue_type: QueueType::default(),
            roles: Roles::default(),
        })
    }

    /// The same names, with the broker users of each role `roles`.
    pub fn with_roles(mut self, roles: Roles) -> Self {
        self.roles = roles;
        self
    }

    pub fn roles(&self) -> &Roles {
        &self.roles
    }

    /// The same names, with jobs queues of kind `kind`.
    pub fn with_jobs_queue_type(mut self, kind: QueueType) -> Self {
        self.jobs_queue_type = kind;
        self
    }

    pub fn jobs_queue_type(&self) -> QueueType {
        self.jobs_queue_type
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }
    /// Direct exchange that producers publish jobs to, with the queue name as routing key.
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.ns)
    }
    /// The durable queue that holds the jobs of one named queue.
    pub fn jobs_queue(&self, queue: &str) -> String {
        format!("{}.jobs.{queue}", self.ns)
    }
    /// Fanout exchange and durable queue of messages that could not be read.
    pub fn dead(&self) -> String {
        format!("{}.dead", self.ns)
    }
    /// Durable queue of work results, read by the scheduler.
    pub fn results(&self) -> String {
        format!("{}.results", self.ns)
    }
    /// Fanout exchange of heartbeats from every part.
    pub fn heartbeats(&self) -> String {
        format!("{}.heartbeats", self.ns)
    }
    /// Topic exchange of job events (`job.started.<type>`, …).
    pub fn events(&self) -> String {
        format!("{}.events", self.ns)
    }
    /// Queue of requests to the scheduler.
    pub fn rpc(&self) -> String {
        format!("{}.rpc", self.ns)
    }
    /// Durable queue of jobs handed to the scheduler by the agent that received them: jobs
    /// published straight to the jobs exchange with an option only the scheduler applies
    /// (see [`crate::wire::Job::needs_admission`]). The scheduler declares it; agents publish
    /// to it through the default exchange, which needs no permission on the queue.
    pub fn admit(&self) -> String {
        format!("{}.admit", self.ns)
    }
    /// Durable queue of one pool agent: receipts and control messages.
    pub fn agent_queue(&self, agent: &str) -> String {
        format!("{}.agent.{agent}", self.ns)
    }
    /// Fanout exchange of control messages to every pool agent (each binds its own queue).
    pub fn control(&self) -> String {
        format!("{}.control", self.ns)
    }
    /// The scheduler's durable queue of `job.started` events.
    pub fn scheduler_events(&self) -> String {
        format!("{}.scheduler.events", self.ns)
    }
    /// A private, auto-deleted queue of one process (heartbeat or event listeners).
    pub fn private_queue(&self, purpose: &str, owner: &str) -> String {
        format!("{}.{purpose}.{owner}", self.ns)
    }
}

/// Checks a name that becomes part of an exchange or queue name, a routing key or a folder:
/// 1 to 64 of ASCII letters, digits, `-` and `_` (and `.` inside, not at the ends).
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if name.is_empty()
        || name.len() > 64
        || !ok_chars
        || name.starts_with('.')
        || name.ends_with('.')
    {
        return Err(format!(
            "invalid {what} {name:?}: use 1 to 64 ASCII letters, digits, '-', '_' or inner '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_namespace() {
        let n = Names::new("t1").expect("valid namespace");
        assert_eq!(n.jobs_queue("default"), "t1.jobs.default");
        assert_eq!(n.agent_queue("a-1"), "t1.agent.a-1");
        assert_eq!(n.results(), "t1.results");
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in ["", ".x", "x.", "a b", "a/b", &"x".repeat(65)] {
            assert!(check_name("queue", bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_name("queue", "reports.eu-1_b").is_ok());
    }
}
