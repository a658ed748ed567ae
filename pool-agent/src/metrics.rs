//! The pool agent's metrics on `/metrics` (with `--http-addr`): the shared job and connection
//! metrics, plus the pool, the outbox and what was dead-lettered.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rota_common::metrics::{JobCounter, Metrics};

use crate::outbox::Outbox;
use crate::paused::Paused;
use crate::pool::Pool;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Queue {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerState {
    state: &'static str,
}

/// What the agent counts itself; the gauges are read at each scrape.
pub struct AgentMetrics {
    pub shared: Arc<Metrics>,
    pub jobs: JobCounter,
    dead_lettered: Family<Reason, Counter>,
    dropped: Family<Dropped, Counter>,
    /// Results RabbitMQ confirmed, and the messages that carried them (a busy agent sends
    /// several results in one message).
    pub results_sent: Counter,
    pub result_messages_sent: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Dropped {
    input: &'static str,
    reason: &'static str,
}

impl AgentMetrics {
    pub fn new() -> Self {
        let shared = Arc::new(Metrics::new());
        let jobs = JobCounter::register(
            &shared,
            "jobs_run",
            "Jobs this agent ran to a result (or refused), by work type and status",
            true,
        );
        let dead_lettered = Family::<Reason, Counter>::default();
        shared.register(
            "dead_lettered",
            "Jobs sent to the dead-letter queue, by reason",
            dead_lettered.clone(),
        );
        let dropped = Family::<Dropped, Counter>::default();
        shared.register(
            "agent_dropped",
            "Messages this agent received and could not use (logged, then dropped), by input and reason",
            dropped.clone(),
        );
        let results_sent = Counter::default();
        shared.register(
            "results_sent",
            "Results sent to the scheduler and confirmed by RabbitMQ (resends included)",
            results_sent.clone(),
        );
        let result_messages_sent = Counter::default();
        shared.register(
            "result_messages_sent",
            "Messages that carried them: one result each, or a group when several were waiting",
            result_messages_sent.clone(),
        );
        Self {
            shared,
            jobs,
            dead_lettered,
            dropped,
            results_sent,
            result_messages_sent,
        }
    }

    pub fn dropped(&self, input: &'static str, reason: &'static str) {
        self.dropped.get_or_create(&Dropped { input, reason }).inc();
    }

    pub fn dead_lettered(&self, reason: &str) {
        self.dead_lettered
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Registers the gauges of the pool, the outbox and the paused queues among `queues`,
    /// read at each scrape.
    pub fn watch(&self, pool: Pool, outbox: Outbox, paused: Paused, queues: Vec<String>) {
        let paused_queues = Family::<Queue, Gauge>::default();
        self.shared.register(
            "queue_paused",
            "1 while the queue is paused (this agent takes none of its jobs), else 0",
            paused_queues.clone(),
        );
        let workers = Family::<WorkerState, Gauge>::default();
        let max = Gauge::<i64>::default();
        let held = Gauge::<i64>::default();
        let oldest = Gauge::<f64, AtomicU64>::default();
        self.shared.register(
            "pool_workers",
            "Workers of the pool, busy or idle",
            workers.clone(),
        );
        self.shared.register(
            "pool_max_workers",
            "The most workers the pool runs at once",
            max.clone(),
        );
        self.shared.register(
            "outbox_results",
            "Results kept until the scheduler's receipt",
            held.clone(),
        );
        self.shared.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest result waiting for its receipt (0 when none)",
            oldest.clone(),
        );
        self.shared.before_scrape(move || {
            let s = pool.status();
            workers
                .get_or_create(&WorkerState { state: "busy" })
                .set(s.busy as i64);
            workers
                .get_or_create(&WorkerState { state: "idle" })
                .set(s.idle as i64);
            max.set(s.max as i64);
            held.set(outbox.len() as i64);
            let age = outbox
                .oldest()
                .map(|t| (chrono::Utc::now() - t).as_seconds_f64().max(0.0))
                .unwrap_or(0.0);
            oldest.set(age);
            for queue in &queues {
                let gauge = paused_queues.get_or_create(&Queue {
                    queue: queue.clone(),
                });
                gauge.set(i64::from(paused.contains(queue)));
            }
        });
    }
}
