//! Prometheus metrics shared by the daemons: the registry behind `/metrics` (see
//! [`crate::http`]) with the connection's metrics, and [`JobCounter`], the jobs by type and
//! status that both the scheduler (`rota_jobs_recorded_total`) and the agents
//! (`rota_jobs_run_total`, with `rota_job_run_seconds`) keep. Each daemon adds its own (pool,
//! outbox, agents, schedules).

use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::amqp::Broker;
use crate::wire::JobResult;

/// A job's work type and final status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeStatus {
    pub r#type: String,
    pub status: String,
}

/// A job's work type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

type Durations = Family<TypeLabel, Histogram, fn() -> Histogram>;

/// A daemon's metrics: a registry, plus a hook that brings gauges up to date before each
/// scrape.
pub struct Metrics {
    registry: Mutex<Registry>,
    before_scrape: OnceLock<Box<dyn Fn() + Send + Sync>>,
    reconnects: Counter,
    connected: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// A registry (every name prefixed `rota_`) with the connection's metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("rota");
        let reconnects = Counter::default();
        registry.register(
            "broker_reconnects",
            "Times the connection to RabbitMQ was lost and made again",
            reconnects.clone(),
        );
        let connected = Gauge::default();
        registry.register(
            "broker_connected",
            "1 while connected to RabbitMQ",
            connected.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            before_scrape: OnceLock::new(),
            reconnects,
            connected,
        }
    }

    /// Adds a metric of the daemon's own.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        if let Ok(mut r) = self.registry.lock() {
            r.register(name, help, metric);
        }
    }

    /// Runs `f` before each scrape (to set gauges from the daemon's state).
    pub fn before_scrape(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.before_scrape.set(Box::new(f));
    }

    /// The metrics in the OpenMetrics text format; `broker` is the daemon's connection, once
    /// it has one.
    pub fn encode(&self, out: &mut String, broker: Option<&Broker>) -> std::fmt::Result {
        if let Some(b) = broker {
            self.reconnects
                .inc_by(b.reconnects().saturating_sub(self.reconnects.get()));
            self.connected.set(i64::from(b.is_connected()));
        }
        if let Some(f) = self.before_scrape.get() {
            f();
        }
        let registry = self.registry.lock().map_err(|_| std::fmt::Error)?;
        prometheus_client::encoding::text::encode(out, &registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Finished jobs by work type and status, and (for agents) how long they ran.
pub struct JobCounter {
    jobs: Family<TypeStatus, Counter>,
    durations: Option<Durations>,
}

impl JobCounter {
    /// Registers `rota_<name>_total` (and `rota_job_run_seconds` with `durations`).
    pub fn register(metrics: &Metrics, name: &str, help: &str, durations: bool) -> Self {
        let jobs = Family::<TypeStatus, Counter>::default();
        metrics.register(name, help, jobs.clone());
        let durations = durations.then(|| {
            // 5 ms to about 23 h.
            let d: Durations = Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 4.0, 13))
            });
            metrics.register(
                "job_run_seconds",
                "How long Work ran (started to finished), by work type",
                d.clone(),
            );
            d
        });
        Self { jobs, durations }
    }

    /// Counts a finished job (and how long it ran).
    pub fn count(&self, result: &JobResult) {
        self.jobs
            .get_or_create(&TypeStatus {
                r#type: result.work_type.clone(),
                status: result.status.as_str().to_owned(),
            })
            .inc();
        if let Some(d) = &self.durations {
            let ran = (result.finished_at - result.started_at).as_seconds_f64();
            d.get_or_create(&TypeLabel {
                r#type: result.work_type.clone(),
            })
            .observe(ran.max(0.0));
        }
    }
}
