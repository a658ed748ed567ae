//! `scheduler run`: records results exactly once and receipts them, answers RPC, notes
//! started jobs, tracks the other parts by their heartbeats, and publishes the jobs it was
//! asked to run: at once, or when their time comes (delayed jobs, retries, schedules).
//! Input is read defensively (see `intake`); while the store cannot write, nothing that
//! needs a write is taken (results and started events stay in their queues, write RPCs are
//! refused, `/readyz` says why) until a probe finds the store writing again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::Utc;
use clap::Args;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rota_common::Names;
use rota_common::amqp::{
    Broker, BrokerError, ConsumeSpec, Consumer, Delivery, Props, QueueSpec, Startup, Topology,
};
use rota_common::backoff::Backoff;
use rota_common::client::short_host;
use rota_common::config::parse_duration;
use rota_common::http::{self, Health};
use rota_common::metrics::{JobCounter, Metrics};
use rota_common::roles::UserRole;
use rota_common::wire::{
    ADMITTED_HEADER, AgentId, AgentMessage, AttemptLogs, Event, EventKind, Heartbeat, Job, JobId,
    JobRecord, JobResult, JobState, LimitInfo, LimitScope, LimitUsage, MAX_RECEIPTS, MAX_TIMEOUT_S,
    OnFailure, PausedQueues, Role, RpcReply, RpcRequest, Run, ScheduleInfo, ScheduleSpec, Status,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::agents::Agents;
use crate::archive::{self, JobFolders};
use crate::cron::CronExpr;
use crate::intake::{self, Dropped, Input, Reason, Refused};
use crate::pages;
use crate::retries::RetryPolicy;
use crate::schedules::{self, Plan};
use crate::store::{self, Inserted, Recorded, Store};

#[derive(Debug, Clone, Args)]
pub struct SchedulerConfig {
    /// Root of the data folders; the scheduler uses `<data-dir>/scheduler` (store, job folders).
    #[arg(long, env = "ROTA_DATA_DIR", default_value = "rota-data")]
    pub data_dir: PathBuf,

    /// Serve /healthz, /readyz and /metrics on this address (e.g. 0.0.0.0:9090); off unless set.
    #[arg(long, env = "ROTA_HTTP_ADDR")]
    pub http_addr: Option<std::net::SocketAddr>,

    /// How often to publish a heartbeat.
    #[arg(long, env = "ROTA_HEARTBEAT_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub heartbeat_interval: Duration,

    /// How many results may wait to be recorded at once (they are recorded in batches of up
    /// to half of this, so that one batch is read while the one before is flushed).
    #[arg(long, env = "ROTA_RESULTS_PREFETCH", default_value_t = 1024)]
    pub results_prefetch: u16,

    /// The store's memory, in MiB: a quarter is fjall's block cache, a quarter at most what
    /// was written and is not yet in its tables on disk, the rest what its flushes and
    /// compactions hold meanwhile (the memory the store uses does not grow with the number
    /// of jobs).
    #[arg(long, env = "ROTA_STORE_CACHE_MIB", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub store_cache_mib: u64,

    /// Which runs get a folder under `<data-dir>/scheduler/work/<uuid>/` (`result.json` and
    /// `logs.txt`): `used` writes it only for a run with something worth a file (a failure,
    /// log lines above debug, a large output or payload); `always` for every run. The store
    /// holds every result and log line either way (`scheduler status`, `scheduler logs`).
    #[arg(long, env = "ROTA_JOB_FOLDERS", value_enum, default_value_t = JobFolders::Used)]
    pub job_folders: JobFolders,

    /// Attempts of a job that does not say (`max_attempts`); 1 means no retries.
    #[arg(long, env = "ROTA_DEFAULT_MAX_ATTEMPTS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub default_max_attempts: u32,

    /// The wait before the first retry of a job that does not say (`backoff_ms`); it doubles
    /// with each retry, with jitter.
    #[arg(long, env = "ROTA_DEFAULT_BACKOFF", value_parser = parse_duration, default_value = "1s")]
    pub default_backoff: Duration,

    /// The longest wait between two attempts.
    #[arg(long, env = "ROTA_MAX_BACKOFF", value_parser = parse_duration, default_value = "1h")]
    pub max_backoff: Duration,

    /// How late a schedule's fire time may be and still run; older ones count as missed and
    /// follow the schedule's `missed` policy (skip or run-once).
    #[arg(long, env = "ROTA_SCHEDULE_GRACE", value_parser = parse_duration, default_value = "10s")]
    pub schedule_grace: Duration,

    /// Finished jobs (records, results, folders) are removed this long after they ended;
    /// 0s keeps them for ever.
    #[arg(long, env = "ROTA_RETENTION", value_parser = parse_duration, default_value = "30days")]
    pub retention: Duration,

    /// How often the removal of old finished jobs runs.
    #[arg(long, env = "ROTA_PURGE_INTERVAL", value_parser = parse_duration, default_value = "1h")]
    pub purge_interval: Duration,

    /// The largest RPC reply, in bytes: `list` and `logs` answer in pages under it, and a
    /// larger answer is cut (with a mark saying where the rest is) or refused.
    #[arg(long, env = "ROTA_RPC_REPLY_BUDGET", default_value_t = pages::DEFAULT_REPLY_BUDGET, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(16 * 1024..))]
    pub rpc_reply_budget: usize,

    /// The schedules of the config file (`[[schedule]]` tables); the file wins over what was
    /// changed over RPC at each start.
    #[arg(skip)]
    pub schedules: Vec<ScheduleSpec>,
}

impl Default for SchedulerConfig {
    /// The flags' defaults.
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("rota-data"),
            heartbeat_interval: Duration::from_secs(5),
            http_addr: None,
            results_prefetch: 1024,
            store_cache_mib: 32,
            job_folders: JobFolders::Used,
            default_max_attempts: 1,
            default_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(3600),
            schedule_grace: Duration::from_secs(10),
            retention: Duration::from_secs(30 * 24 * 3600),
            purge_interval: Duration::from_secs(3600),
            rpc_reply_budget: pages::DEFAULT_REPLY_BUDGET,
            schedules: Vec::new(),
        }
    }
}

impl SchedulerConfig {
    pub fn scheduler_dir(&self) -> PathBuf {
        self.data_dir.join("scheduler")
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.default_max_attempts,
            backoff: self.default_backoff,
            max_backoff: self.max_backoff,
        }
    }
}

/// Runs the scheduler until `shutdown`, then finishes what it holds and returns.
pub async fn run(
    cfg: SchedulerConfig,
    amqp_url: &str,
    names: Names,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    names.roles().warn_if_open();
    let health = Health::default();
    let metrics = Arc::new(Metrics::new());
    let jobs = JobCounter::register(
        &metrics,
        "jobs_recorded",
        "Jobs whose result the scheduler recorded, by work type and status",
        false,
    );
    let dropped = Dropped::register(&metrics);
    let fires = Family::<ScheduleLabel, Counter>::default();
    metrics.register(
        "schedule_fires",
        "Jobs submitted by each cron schedule",
        fires.clone(),
    );
    let paused = Family::<QueueLabel, Gauge>::default();
    metrics.register(
        "queue_paused",
        "1 while the queue is paused (scheduler pause), 0 once resumed",
        paused.clone(),
    );
    let unrun = Family::<UnrunLabel, Counter>::default();
    metrics.register(
        "scheduler_jobs_unrun",
        "Jobs the scheduler ended without running them (expired while held, superseded by a \
         newer job with their debounce key), by work type and state",
        unrun.clone(),
    );
    let stop_http = CancellationToken::new();
    let _stop_http = stop_http.clone().drop_guard();
    if let Some(addr) = cfg.http_addr {
        http::serve(addr, health.clone(), metrics.clone(), stop_http).await?;
    }
    for spec in &cfg.schedules {
        schedules::check(spec)
            .map_err(|e| anyhow::anyhow!("in the config file's schedules: {e}"))?;
    }
    let dir = cfg.scheduler_dir();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the data folder {}", dir.display()))?;
    let store = Store::open(&dir, cfg.retry_policy(), cfg.store_cache_mib * 1024 * 1024)?;

    let events_queue = names.scheduler_events();
    let beats_queue = names.private_queue(
        "scheduler.heartbeats",
        &uuid::Uuid::new_v4().simple().to_string(),
    );
    let mut topology = Topology::scheduler(&names);
    topology
        .queue(QueueSpec::private(beats_queue.clone()))
        .bind(&beats_queue, &names.heartbeats(), "");
    let conn_name = format!(
        "rota scheduler ({}, pid {})",
        short_host(),
        std::process::id()
    );
    let broker = tokio::select! {
        b = Broker::connect(amqp_url, &conn_name, topology, Startup::Retry) => b?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    health.broker(&broker);
    let results_spec = ConsumeSpec {
        queues: vec![names.results()],
        tag: "scheduler-results".into(),
        prefetch: cfg.results_prefetch,
        exclusive: true,
        no_ack: false,
    };
    let results = match broker.consume(results_spec.clone()).await {
        Err(BrokerError::Locked { .. }) => bail!(
            "another scheduler is already running against namespace {:?} on this broker; stop it first \
             (one scheduler records the results of a namespace)",
            names.namespace()
        ),
        other => other?,
    };
    let sched = Arc::new(Scheduler {
        names: names.clone(),
        broker: broker.clone(),
        store,
        agents: Agents::default(),
        jobs,
        fires,
        paused,
        unrun,
        dropped,
        clock: tokio::sync::Notify::new(),
        grace: cfg.schedule_grace,
        writable: tokio::sync::watch::Sender::new(true),
        health: health.clone(),
        stop: CancellationToken::new(),
        reply_budget: cfg.rpc_reply_budget,
        job_folders: cfg.job_folders,
    });
    let alive = Gauge::<i64>::default();
    metrics.register(
        "agents_alive",
        "Pool agents whose heartbeats arrive",
        alive.clone(),
    );
    let throttled = Family::<LimitLabel, Gauge>::default();
    metrics.register(
        "scheduler_jobs_throttled",
        "Jobs held throttled by each limit (scheduler limit), waiting their turn",
        throttled.clone(),
    );
    let limited_running = Family::<LimitLabel, Gauge>::default();
    metrics.register(
        "scheduler_limit_running",
        "Jobs published and not over, counted by each concurrency limit",
        limited_running.clone(),
    );
    let seen = sched.clone();
    metrics.before_scrape(move || {
        let agents = seen.agents.list();
        let alive_agents = agents
            .iter()
            .filter(|a| a.alive && a.heartbeat.role == Role::Agent);
        alive.set(alive_agents.count() as i64);
        throttled.clear();
        limited_running.clear();
        for info in seen.store.limits().unwrap_or_default() {
            let label = LimitLabel {
                limit: info.limit.scope.to_string(),
            };
            let sum = |f: fn(&LimitUsage) -> u64| info.values.iter().map(f).sum::<u64>() as i64;
            throttled.get_or_create(&label).set(sum(|u| u.waiting));
            if info.limit.concurrency.is_some() {
                limited_running
                    .get_or_create(&label)
                    .set(sum(|u| u.running));
            }
        }
    });
    for queue in sched.store.paused()?.queues {
        sched.paused.get_or_create(&QueueLabel { queue }).set(1);
    }
    sched.declare_schedules(&cfg.schedules).await?;
    // Before taking new submissions: what an earlier run recorded but could not queue.
    sched.publish_unpublished(Duration::ZERO).await;
    let rpc = broker
        .consume(ConsumeSpec {
            queues: vec![names.rpc()],
            tag: "scheduler-rpc".into(),
            prefetch: 64,
            exclusive: false,
            no_ack: false,
        })
        .await?;
    let started_spec = ConsumeSpec {
        queues: vec![events_queue],
        tag: "scheduler-events".into(),
        prefetch: 256,
        exclusive: false,
        no_ack: false,
    };
    let started = broker.consume(started_spec.clone()).await?;
    let admit_spec = ConsumeSpec {
        queues: vec![names.admit()],
        tag: "scheduler-admit".into(),
        prefetch: 64,
        exclusive: false,
        no_ack: false,
    };
    let admit = broker.consume(admit_spec.clone()).await?;
    let beats = broker
        .consume(ConsumeSpec {
            queues: vec![beats_queue],
            tag: "scheduler-heartbeats".into(),
            prefetch: 64,
            exclusive: true,
            no_ack: false,
        })
        .await?;

    let stop = sched.stop.clone();
    let tasks = TaskTracker::new();
    let work = TaskTracker::new();
    tasks.spawn(sched.clone().serve_results(results, results_spec));
    tasks.spawn(sched.clone().serve(rpc, work.clone(), Kind::Rpc));
    tasks.spawn(
        sched
            .clone()
            .serve_writes(started, started_spec, work.clone(), Writes::Started),
    );
    tasks.spawn(
        sched
            .clone()
            .serve_writes(admit, admit_spec, work.clone(), Writes::Admit),
    );
    tasks.spawn(sched.clone().serve(beats, work.clone(), Kind::Heartbeat));
    tasks.spawn(sched.clone().recover());
    tasks.spawn(
        sched
            .clone()
            .housekeeping(stop.clone(), cfg.retention, cfg.purge_interval),
    );
    tasks.spawn(sched.clone().clock(stop.clone()));
    let beat = Heartbeat::starting(Role::Scheduler, "scheduler", cfg.heartbeat_interval);
    let beating = sched.clone();
    tasks.spawn(rota_common::heartbeat::run(
        broker.clone(),
        names.clone(),
        beat,
        stop.clone(),
        // For `scheduler agents`, beside what each agent heard.
        move |hb| hb.paused = beating.store.paused().ok(),
    ));
    health.started(true);
    info!(namespace = names.namespace(), data_dir = %dir.display(), jobs = sched.store.len(), "scheduler ready");

    shutdown.cancelled().await;
    health.started(false);
    info!("scheduler stopping");
    stop.cancel();
    broker.close().await;
    work.close();
    work.wait().await;
    tasks.close();
    tasks.wait().await;
    sched.store.flush().await?;
    info!("scheduler stopped");
    Ok(())
}

/// Whether answering `request` writes to the store (and so waits while it cannot).
fn writes(request: &RpcRequest) -> bool {
    !matches!(
        request,
        RpcRequest::Status { .. }
            | RpcRequest::Logs { .. }
            | RpcRequest::List { .. }
            | RpcRequest::Agents
            | RpcRequest::ScheduleList
            | RpcRequest::Paused
            | RpcRequest::Limits
    )
}

/// The label of `rota_queue_paused`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

/// The label of the limits' gauges: the limit's scope (`work_type=pdf.render`,
/// `label=customer`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: String,
}

/// The label of `rota_schedule_fires_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScheduleLabel {
    schedule: String,
}

/// The labels of `rota_scheduler_jobs_unrun_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnrunLabel {
    r#type: String,
    state: &'static str,
}

/// A result recorded but not yet durable: the delivery that brought it (a group of results
/// shares one), the result and what recording did.
type RecordedResult = (Arc<Delivery>, JobResult, Recorded);

/// The most bytes of messages recorded in one batch (besides `--results-prefetch / 2`
/// messages): a message may carry a group of results.
const BATCH_BYTES: usize = 4 << 20;

/// Each delivery once (several results of a group share theirs), in order.
fn distinct(deliveries: impl IntoIterator<Item = Arc<Delivery>>) -> Vec<Arc<Delivery>> {
    let mut seen = std::collections::HashSet::new();
    deliveries
        .into_iter()
        .filter(|d| seen.insert(Arc::as_ptr(d)))
        .collect()
}

/// How long a submission may take to be confirmed before the periodic pass queues it again.
const IN_FLIGHT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy)]
enum Kind {
    Rpc,
    Heartbeat,
}

/// The inputs that need a write (see [`Scheduler::serve_writes`]).
#[derive(Clone, Copy)]
enum Writes {
    Started,
    Admit,
}

struct Scheduler {
    names: Names,
    broker: Broker,
    store: Store,
    agents: Agents,
    /// Recorded jobs, for the metrics.
    jobs: JobCounter,
    /// Jobs submitted by each schedule, for the metrics.
    fires: Family<ScheduleLabel, Counter>,
    /// Whether each queue paused once is paused now, for the metrics.
    paused: Family<QueueLabel, Gauge>,
    /// Jobs ended without a run, for the metrics.
    unrun: Family<UnrunLabel, Counter>,
    /// Messages not taken, for the metrics.
    dropped: Dropped,
    /// Wakes the clock: something was scheduled that may be due before its next wake-up.
    clock: tokio::sync::Notify,
    /// See `--schedule-grace`.
    grace: Duration,
    /// Whether the store writes. While it does not, the inputs that need a write wait in
    /// their queues (see [`Scheduler::halt`]) until a probe finds it writing again.
    writable: tokio::sync::watch::Sender<bool>,
    /// Says why `/readyz` fails while the store does not write.
    health: Health,
    /// Cancelled when the scheduler stops.
    stop: CancellationToken,
    /// See `--rpc-reply-budget`.
    reply_budget: usize,
    /// See `--job-folders`.
    job_folders: JobFolders,
}

impl Scheduler {
    /// Handles each delivery of `consumer` in its own task, so a slow one does not hold up
    /// the rest (the consumer's prefetch bounds how many run at once).
    async fn serve(self: Arc<Self>, mut consumer: Consumer, work: TaskTracker, kind: Kind) {
        while let Some(d) = consumer.recv().await {
            let me = self.clone();
            work.spawn(async move {
                match kind {
                    Kind::Rpc => me.on_rpc(d).await,
                    Kind::Heartbeat => me.on_heartbeat(d).await,
                }
            });
        }
    }

    /// Like [`Scheduler::serve`] for started events and jobs handed over for admission, which
    /// need a write: consumes them only while the store writes.
    async fn serve_writes(
        self: Arc<Self>,
        mut consumer: Consumer,
        spec: ConsumeSpec,
        work: TaskTracker,
        kind: Writes,
    ) {
        loop {
            loop {
                let d = tokio::select! {
                    d = consumer.recv() => d,
                    _ = self.until(false) => break,
                };
                let Some(d) = d else { return };
                let me = self.clone();
                work.spawn(async move {
                    match kind {
                        Writes::Started => me.on_started(d).await,
                        Writes::Admit => me.on_admit(d).await,
                    }
                });
            }
            let Some(again) = self.pause_intake(consumer, Vec::new(), &spec).await else {
                return;
            };
            consumer = again;
        }
    }

    /// Records results in batches: each result in its own transaction on the store's writer
    /// thread (a message may bring one result or a group), the events, one flush for the batch,
    /// then the folders, receipts (one message per agent) and acks. A flush costs the same for one result as for hundreds, so batching is
    /// what makes recording fast; while one batch is flushed and receipted, the next one is
    /// read and recorded. Takes none while the store does not write.
    async fn serve_results(self: Arc<Self>, mut consumer: Consumer, spec: ConsumeSpec) {
        let most = usize::from(spec.prefetch / 2).max(1);
        loop {
            let mut finishing: Option<tokio::task::JoinHandle<Vec<Arc<Delivery>>>> = None;
            let unstored = loop {
                let first = tokio::select! {
                    d = consumer.recv() => d,
                    _ = self.until(false) => break Vec::new(),
                };
                let Some(first) = first else {
                    if let Some(f) = finishing {
                        let _ = f.await;
                    }
                    return;
                };
                let mut bytes = first.body.len();
                let mut batch = vec![first];
                while batch.len() < most
                    && bytes < BATCH_BYTES
                    && let Some(d) = consumer.try_recv()
                {
                    bytes += d.body.len();
                    batch.push(d);
                }
                let (messages, took) = (batch.len(), std::time::Instant::now());
                let (recorded, mut unstored) = self.record_batch(batch).await;
                let written = took.elapsed();
                self.announce(&recorded).await;
                debug!(
                    messages,
                    results = recorded.len(),
                    written_ms = written.as_secs_f64() * 1e3,
                    announced_ms = took.elapsed().as_secs_f64() * 1e3,
                    "recorded and announced a batch"
                );
                // The batch before is flushed and receipted first: its flush also covers
                // what was just recorded, and acks keep their order.
                if let Some(f) = finishing.take() {
                    unstored.extend(f.await.unwrap_or_default());
                }
                if !unstored.is_empty() {
                    // Not flushed: the store failed.
                    unstored.extend(recorded.into_iter().map(|(d, _, _)| d));
                    break unstored;
                }
                finishing = Some(tokio::spawn(self.clone().finish_batch(recorded)));
            };
            let mut unstored = unstored;
            if let Some(f) = finishing.take() {
                unstored.extend(f.await.unwrap_or_default());
            }
            let Some(again) = self.pause_intake(consumer, unstored, &spec).await else {
                return;
            };
            consumer = again;
        }
    }

    /// Stops `consumer` while the store does not write: the broker is told to send no more,
    /// then `unstored` and whatever still arrives go back to the queue (after the stop, or
    /// RabbitMQ would hand them straight back), and once the store writes again, consuming
    /// starts anew. None when the scheduler stops meanwhile.
    async fn pause_intake(
        &self,
        mut consumer: Consumer,
        unstored: Vec<Arc<Delivery>>,
        spec: &ConsumeSpec,
    ) -> Option<Consumer> {
        consumer.stop().await;
        for d in distinct(unstored) {
            d.requeue().await;
        }
        info!(queues = ?spec.queues, "not consuming until the store writes again");
        loop {
            tokio::select! {
                d = consumer.recv() => match d {
                    Some(d) => { d.requeue().await; }
                    None => return None,
                },
                _ = self.until(true) => break,
                _ = self.stop.cancelled() => return None,
            }
        }
        let mut backoff = Backoff::for_connections();
        loop {
            match self.broker.consume(spec.clone()).await {
                Ok(c) => {
                    info!(queues = ?spec.queues, "consuming again");
                    return Some(c);
                }
                Err(e) => {
                    warn!(queues = ?spec.queues, error = %e, "cannot consume again; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = self.stop.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// Returns once the store's writability is `writable` (never, once the flag is gone).
    async fn until(&self, writable: bool) {
        let mut rx = self.writable.subscribe();
        if rx.wait_for(|w| *w == writable).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    fn is_writable(&self) -> bool {
        *self.writable.borrow()
    }

    /// Takes note of a store error; true when it is the store failing to write, which halts
    /// intake (see [`Scheduler::halt`]).
    fn store_failed(&self, e: &anyhow::Error) -> bool {
        let unwritable = store::is_unwritable(e);
        if unwritable {
            self.halt(&format!("{e:#}"));
        }
        unwritable
    }

    /// The store cannot write: results, started events, submissions and the clock wait
    /// (nothing is acked that is not stored), `/readyz` says why, and [`Scheduler::recover`]
    /// probes the store until it writes again.
    fn halt(&self, reason: &str) {
        let halted = self
            .writable
            .send_if_modified(|w| std::mem::replace(w, false));
        if halted {
            error!(
                error = reason,
                "the store cannot write: taking no results, submissions or started events until it can"
            );
            self.health.unready(
                "store",
                Some(format!(
                    "the store cannot write ({reason}); results, submissions and started events wait in RabbitMQ until it can"
                )),
            );
        }
    }

    /// While intake is halted, probes the store with a capped backoff and resumes intake
    /// once it writes again.
    async fn recover(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.until(false) => {}
                _ = self.stop.cancelled() => return,
            }
            let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = self.stop.cancelled() => return,
                }
                match self.store.probe().await {
                    Ok(()) => break,
                    Err(e) => {
                        warn!(error = %e, attempt = backoff.attempts(), "the store still cannot write")
                    }
                }
            }
            self.health.unready("store", None);
            self.writable.send_replace(true);
            info!("the store writes again: taking results, submissions and started events");
            self.clock.notify_one();
        }
    }

    /// Records a batch (not yet durable): returns what was recorded and the deliveries it
    /// could not store because the store does not write (not acked: they go back to the queue
    /// once intake is paused). A bad entry of a group is dead-lettered alone; a delivery
    /// whose entries were all dead-lettered is acked here, and one whose bad entry could not
    /// be dead-lettered goes back to its queue whole.
    async fn record_batch(
        &self,
        batch: Vec<Delivery>,
    ) -> (Vec<RecordedResult>, Vec<Arc<Delivery>>) {
        /// What becomes of a delivery of the batch.
        #[derive(PartialEq)]
        enum Fate {
            Record,
            Requeue,
            Unstored,
        }
        let mut deliveries: Vec<(Arc<Delivery>, Fate)> = Vec::with_capacity(batch.len());
        let mut taken: Vec<(usize, JobResult)> = Vec::with_capacity(batch.len());
        for d in batch {
            if !self.is_writable() {
                deliveries.push((Arc::new(d), Fate::Unstored));
                continue;
            }
            if let Err(refused) = self.sent_by(&d, "result", &[UserRole::Agent]) {
                self.refuse(&d, Input::Result, refused).await;
                continue;
            }
            let entries = match intake::results(&d.body) {
                Ok(entries) => entries,
                Err(refused) => {
                    self.refuse(&d, Input::Result, refused).await;
                    continue;
                }
            };
            let i = deliveries.len();
            let mut fate = Fate::Record;
            for entry in entries {
                match entry {
                    Ok(r) => taken.push((i, r)),
                    Err(bad) => {
                        if !self.refuse_entry(&d, bad).await {
                            fate = Fate::Requeue;
                        }
                    }
                }
            }
            deliveries.push((Arc::new(d), fate));
        }
        let (owners, results): (Vec<usize>, Vec<JobResult>) = taken.into_iter().unzip();
        let outcomes = self.store.write(move |store| {
            // After a write that failed for want of disk, the rest are not tried.
            let mut failed = false;
            results
                .into_iter()
                .map(|result| {
                    let outcome = (!failed).then(|| store.record(&result));
                    failed |= outcome
                        .as_ref()
                        .is_some_and(|o| o.as_ref().is_err_and(store::is_unwritable));
                    (result, outcome)
                })
                .collect::<Vec<_>>()
        });
        let outcomes = match outcomes.await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                error!(error = %e, "cannot record results; they go back to the queue");
                self.halt(&format!("{e:#}"));
                let unstored = deliveries.into_iter().map(|(d, _)| d).collect();
                return (Vec::new(), unstored);
            }
        };
        let mut recorded = Vec::with_capacity(outcomes.len());
        for (i, (result, outcome)) in owners.into_iter().zip(outcomes) {
            let (d, fate) = &mut deliveries[i];
            match outcome {
                Some(Ok(r)) => recorded.push((i, result, r)),
                Some(Err(e)) if self.store_failed(&e) => {
                    warn!(job_id = %result.uuid, error = %e, "cannot record the result; it goes back to the queue");
                    *fate = Fate::Unstored;
                }
                Some(Err(e)) => {
                    let bad = intake::RefusedEntry {
                        refused: Refused::new(Reason::Unrecordable, format!("{e:#}")),
                        body: serde_json::to_vec(&result).unwrap_or_default(),
                    };
                    if !self.refuse_entry(d, bad).await {
                        *fate = Fate::Requeue;
                    }
                }
                None => *fate = Fate::Unstored,
            }
        }
        // Whether a delivery has a recorded result, to settle once it is durable.
        let mut pending = vec![false; deliveries.len()];
        for (i, _, _) in &recorded {
            pending[*i] = true;
        }
        let mut unstored = Vec::new();
        for ((d, fate), pending) in deliveries.iter().zip(pending) {
            match fate {
                Fate::Unstored => unstored.push(d.clone()),
                Fate::Requeue => {
                    d.requeue().await;
                }
                Fate::Record if !pending => {
                    d.ack().await; // every entry was dead-lettered
                }
                Fate::Record => {} // by finish_batch, once durable
            }
        }
        let recorded = recorded
            .into_iter()
            .filter(|(i, _, _)| deliveries[*i].1 == Fate::Record)
            .map(|(i, result, r)| (deliveries[i].0.clone(), result, r))
            .collect();
        (recorded, unstored)
    }

    /// Announces the runs of a batch as soon as it is recorded: a watcher can read the records
    /// at once, and neither the batch's flush nor that of the batch before is on its path.
    /// Should the flush fail, or the scheduler die before it, the results are still in their
    /// queue, and are recorded and announced again, with the same outcome.
    async fn announce(&self, recorded: &[RecordedResult]) {
        let announce = recorded.iter().filter_map(|(_, result, recorded)| {
            let Recorded::New(record) = recorded else {
                debug!(job_id = %result.uuid, attempt = result.attempt, "result already recorded; receipted it again");
                return None;
            };
            debug!(job_id = %result.uuid, r#type = %result.work_type, attempt = result.attempt, status = %result.status, agent = %result.agent, state = %record.state, "result recorded");
            Some(self.finished(
                record,
                result.attempt,
                Some(result.status),
                Some(result.agent.clone()),
            ))
        });
        futures::future::join_all(announce).await;
    }

    /// Makes an announced batch durable, then writes its folders, receipts it and acks it.
    /// Returns the deliveries whose results the flush did not make durable.
    async fn finish_batch(self: Arc<Self>, recorded: Vec<RecordedResult>) -> Vec<Arc<Delivery>> {
        if recorded.is_empty() {
            return Vec::new();
        }
        if let Err(e) = self.store.flush().await {
            error!(error = %e, "cannot flush the store; the results go back to the queue");
            self.store_failed(&e);
            return distinct(recorded.into_iter().map(|(d, _, _)| d));
        }
        self.write_folders(&recorded).await;
        self.receipt_and_ack(&recorded).await;
        for (_, result, recorded) in &recorded {
            if let Recorded::New(record) = recorded {
                self.jobs.count(result);
                if record.state == JobState::Scheduled {
                    self.clock.notify_one(); // a retry, now durable
                }
            }
        }
        self.move_on().await;
        if self.store.throttling() {
            self.clock.notify_one(); // slots given back
        }
        Vec::new()
    }

    /// Writes the folders of the recorded runs that get one (see `--job-folders`). The folder
    /// of a result that comes again may be missing if the scheduler died after recording it:
    /// it is written from the stored result.
    async fn write_folders(&self, recorded: &[RecordedResult]) {
        let wanted: Vec<(JobResult, bool)> = recorded
            .iter()
            .filter(|(_, result, _)| self.job_folders.wanted(result))
            .map(|(_, result, r)| (result.clone(), matches!(r, Recorded::New(_))))
            .collect();
        if wanted.is_empty() {
            return;
        }
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || {
            for (result, new) in wanted {
                let job_dir = store.job_dir(result.uuid);
                let first = if new {
                    Some(result)
                } else if archive::exists(&job_dir, result.attempt) {
                    None
                } else {
                    store.result(result.uuid, result.attempt).ok().flatten()
                };
                if let Some(first) = first
                    && let Err(e) = archive::write(&job_dir, &first)
                {
                    error!(job_id = %first.uuid, error = %e, "cannot write the job's folder (the result is recorded)");
                }
            }
        });
        let _ = written.await;
    }

    /// Receipts recorded results to the agents that sent them, one message per agent (at
    /// most [`MAX_RECEIPTS`] runs each), then acks them. A receipt that surely did not leave
    /// (no connection, a broken channel) requeues its results instead: they are receipted
    /// when they come again, rather than the agent waiting for its receipt timeout. The
    /// receipt before the ack: killed in between, a result comes back and is receipted again;
    /// the other way round, the agent would wait for a receipt that never comes.
    async fn receipt_and_ack(&self, recorded: &[RecordedResult]) {
        let mut by_agent: BTreeMap<&str, Vec<&RecordedResult>> = BTreeMap::new();
        for r in recorded {
            if let Some(reply_to) = r.0.reply_to.as_deref() {
                by_agent.entry(reply_to).or_default().push(r);
            }
        }
        let mut unsent = std::collections::HashSet::new();
        for (reply_to, results) in by_agent {
            for chunk in results.chunks(MAX_RECEIPTS) {
                let runs = chunk
                    .iter()
                    .map(|(_, result, _)| Run {
                        uuid: result.uuid,
                        attempt: result.attempt,
                    })
                    .collect();
                if !self.receipt(reply_to, runs).await {
                    unsent.extend(chunk.iter().map(|(d, _, _)| Arc::as_ptr(d) as usize));
                }
            }
        }
        // Each delivery once (a group's results share one): acked when every receipt of it
        // left.
        let deliveries = distinct(recorded.iter().map(|(d, _, _)| d.clone()));
        let settled = deliveries.into_iter().map(|d| {
            let sent = !unsent.contains(&(Arc::as_ptr(&d) as usize));
            async move {
                if sent {
                    d.ack().await;
                } else {
                    d.requeue().await;
                }
            }
        });
        futures::future::join_all(settled).await;
    }

    /// Sends one receipts message to an agent's queue. False when it surely did not leave.
    async fn receipt(&self, reply_to: &str, runs: Vec<Run>) -> bool {
        let Ok(body) = serde_json::to_vec(&AgentMessage::Receipts { runs }) else {
            return true;
        };
        // Unconfirmed and transient: a lost receipt only means the agent resends the result,
        // which is then receipted again.
        let props = Props {
            transient: true,
            ..Props::default()
        };
        self.broker.notify("", reply_to, &body, &props).await
    }

    /// Announces that a run ended (`job.finished`), with the job's state after it; a job that
    /// the scheduler ended without a run (superseded) has no status.
    async fn finished(
        &self,
        record: &JobRecord,
        attempt: u32,
        status: Option<Status>,
        agent: Option<AgentId>,
    ) {
        let event = Event {
            event: EventKind::Finished,
            uuid: record.uuid,
            attempt,
            work_type: record.job.work_type.clone(),
            agent,
            time: Utc::now(),
            status,
            state: Some(record.state),
            progress: None,
            job: None,
        };
        if let Ok(body) = serde_json::to_vec(&event) {
            let props = Props {
                transient: true,
                ..Props::default()
            };
            self.broker
                .notify(&self.names.events(), &event.routing_key(), &body, &props)
                .await;
        }
    }

    async fn on_started(&self, d: Delivery) {
        let event = self
            .sent_by(&d, "job.started event", &[UserRole::Agent])
            .and_then(|()| intake::started(&d.body));
        let event = match event {
            Ok(event) => event,
            Err(refused) => {
                // A notification: counted and dropped (the job's result still records it).
                warn!(reason = %refused, "ignoring an event");
                self.dropped.count(Input::Event, refused.reason);
                d.ack().await;
                return;
            }
        };
        let cancel = loop {
            if !self.is_writable() {
                // Held unacked until the store writes again; when the scheduler stops first,
                // it goes back to its queue with the connection.
                tokio::select! {
                    _ = self.until(true) => continue,
                    _ = self.stop.cancelled() => return,
                }
            }
            let noted = self.store.write({
                let event = event.clone();
                move |store| store.started(&event)
            });
            match noted.await.and_then(|noted| noted) {
                Ok(record) => {
                    break record.is_some_and(|r| r.cancel_requested && !r.state.is_final());
                }
                Err(e) if self.store_failed(&e) => {}
                Err(e) => {
                    error!(job_id = %event.uuid, error = %e, "cannot note a started job");
                    break false;
                }
            }
        };
        if cancel
            && let Err(e) = self
                .tell_agents(&AgentMessage::Cancel { uuid: event.uuid })
                .await
        {
            warn!(job_id = %event.uuid, error = %e, "cannot repeat a cancel request");
        }
        d.ack().await;
    }

    async fn on_heartbeat(&self, d: Delivery) {
        let heard = intake::heartbeat(&d.body).and_then(|hb| {
            let senders = intake::heartbeat_senders(hb.role);
            self.sent_by(&d, "heartbeat", senders).map(|()| hb)
        });
        match heard {
            Ok(hb) => {
                self.tell_if_behind(&hb).await;
                self.agents.heard(hb);
            }
            Err(refused) => {
                warn!(reason = %refused, "ignoring a heartbeat");
                self.dropped.count(Input::Heartbeat, refused.reason);
            }
        }
        d.ack().await;
    }

    /// Tells an agent whose heartbeat shows an older set of paused queues than the store's
    /// (it missed a change) the set again, on its own queue; and one that never heard any
    /// (none was paused when it started, or no scheduler ran) once some queue is paused. An
    /// agent of a version before pauses, which says nothing of them, is told too: it logs the
    /// message it cannot read, at each heartbeat while a queue is paused.
    async fn tell_if_behind(&self, hb: &Heartbeat) {
        if hb.role != Role::Agent || AgentId::new(&hb.id).is_err() {
            return;
        }
        let Ok(paused) = self.store.paused() else {
            return;
        };
        let behind = match &hb.paused {
            Some(heard) => heard.version < paused.version,
            None => !paused.queues.is_empty() || !paused.limited.is_empty(),
        };
        if !behind {
            return;
        }
        debug!(agent = %hb.id, version = paused.version, "telling an agent the paused queues again");
        if let Ok(body) = serde_json::to_vec(&AgentMessage::Paused(paused)) {
            let queue = self.names.agent_queue(&hb.id);
            self.broker
                .notify("", &queue, &body, &Props::default())
                .await;
        }
    }

    async fn on_rpc(&self, d: Delivery) {
        let request = intake::rpc(&d.body).and_then(|request| {
            let senders = intake::rpc_senders(&request);
            self.sent_by(&d, "request", senders).map(|()| request)
        });
        let request = match request {
            Ok(request) => request,
            Err(refused) => {
                // The caller hears why at once; the request is kept in the dead-letter queue.
                let reply = RpcReply::Error {
                    message: refused.to_string(),
                };
                self.reply(&d, &reply).await;
                return self.refuse(&d, Input::Rpc, refused).await;
            }
        };
        let reply = if writes(&request) && !self.is_writable() {
            RpcReply::Error {
                message: "the scheduler's store cannot write (is its disk full?): nothing was \
                          changed; try again once its /readyz answers 200"
                    .into(),
            }
        } else {
            self.answer(request).await.unwrap_or_else(|e| {
                self.store_failed(&e);
                RpcReply::Error {
                    message: format!("{e:#}"),
                }
            })
        };
        d.ack().await;
        self.reply(&d, &reply).await;
    }

    async fn reply(&self, d: &Delivery, reply: &RpcReply) {
        let (Some(reply_to), Ok(mut body)) = (d.reply_to.as_deref(), serde_json::to_vec(reply))
        else {
            return;
        };
        if body.len() > self.reply_budget {
            // The pages and cuts keep replies small; this is the guarantee behind them.
            let too_big = RpcReply::Error {
                message: format!(
                    "the reply would be {} bytes, over the scheduler's --rpc-reply-budget of {} bytes",
                    body.len(),
                    self.reply_budget
                ),
            };
            let Ok(small) = serde_json::to_vec(&too_big) else {
                return;
            };
            body = small;
        }
        let props = Props {
            correlation_id: d.correlation_id.clone(),
            transient: true,
            ..Props::default()
        };
        self.broker.notify("", reply_to, &body, &props).await;
    }

    async fn answer(&self, request: RpcRequest) -> anyhow::Result<RpcReply> {
        Ok(match request {
            RpcRequest::Submit { job } => RpcReply::Job {
                job: Box::new(self.submit(job).await?),
            },
            RpcRequest::SubmitGroup {
                jobs,
                callback,
                on_failure,
            } => {
                let members = jobs.len();
                let mut all = jobs;
                all.push(callback);
                let jobs = self
                    .submit_all(all, |done, job| {
                        if done.len() == members {
                            job.after = done.iter().map(|i| i.record.uuid).collect();
                            job.on_failure = on_failure;
                        }
                    })
                    .await?;
                RpcReply::Jobs { jobs, next: None }
            }
            RpcRequest::SubmitChain { jobs } => {
                let jobs = self
                    .submit_all(jobs, |done, job| {
                        if let Some(before) = done.last() {
                            job.after = vec![before.record.uuid];
                            job.on_failure = Some(OnFailure::Cancel);
                        }
                    })
                    .await?;
                RpcReply::Jobs { jobs, next: None }
            }
            RpcRequest::Status { uuid } => {
                let mut record = self.record_of(uuid)?;
                record.children = self.store.children_of(uuid)?;
                let budget = pages::content_budget(self.reply_budget);
                RpcReply::Job {
                    job: Box::new(pages::fit_record(record, budget)),
                }
            }
            RpcRequest::Logs {
                uuid,
                cursor,
                limit,
            } => {
                self.record_of(uuid)?;
                let follows_pages = cursor.is_some() || limit.is_some();
                let from = match &cursor {
                    Some(c) => pages::parse_logs_cursor(c)?,
                    None => (0, 0),
                };
                let budget = pages::content_budget(self.reply_budget);
                let (pages, next) =
                    self.store
                        .logs_page(uuid, from, limit.unwrap_or(usize::MAX), budget)?;
                let mut attempts: Vec<AttemptLogs> = pages
                    .into_iter()
                    .map(|(attempt, lines)| AttemptLogs { attempt, lines })
                    .collect();
                if next.is_some()
                    && !follows_pages
                    && let Some(last) = attempts.last_mut()
                {
                    let dir = self.store.job_dir(uuid);
                    last.lines
                        .push(pages::more_logs_line(uuid, self.reply_budget, &dir));
                }
                RpcReply::Logs {
                    uuid,
                    attempts,
                    next: next.map(pages::logs_cursor),
                }
            }
            RpcRequest::List {
                state,
                limit,
                cursor,
            } => {
                let before = cursor
                    .as_deref()
                    .map(pages::parse_list_cursor)
                    .transpose()?;
                let budget = pages::content_budget(self.reply_budget);
                let (jobs, next) =
                    self.store
                        .list_page(state, limit.unwrap_or(50), before.as_deref(), budget)?;
                // One record alone may be most of a page: its large parts stay in its files.
                let jobs = jobs
                    .into_iter()
                    .map(|r| pages::fit_record(r, budget / 8))
                    .collect();
                RpcReply::Jobs {
                    jobs,
                    next: next.as_deref().map(pages::list_cursor),
                }
            }
            RpcRequest::Cancel { uuid } => RpcReply::Job {
                job: Box::new(self.cancel(uuid).await?),
            },
            RpcRequest::Agents => RpcReply::Agents {
                agents: self.agents.list(),
            },
            RpcRequest::Retry { uuid } => {
                let record = self.store.retry(uuid).await?;
                if record.state == JobState::Throttled {
                    self.clock.notify_one();
                }
                self.publish(&record).await.with_context(|| {
                    format!("job {uuid} is recorded for another attempt but not queued yet; the scheduler keeps trying")
                })?;
                info!(job_id = %uuid, attempt = record.job.attempt, "job retried by hand");
                RpcReply::Job {
                    job: Box::new(record),
                }
            }
            RpcRequest::ScheduleAdd { schedule } => {
                let expr = schedules::check(&schedule).map_err(anyhow::Error::msg)?;
                let name = schedule.name.clone();
                let info = self
                    .store
                    .update_schedule(&name, |old| match old {
                        Some(_) => Err(format!(
                            "a schedule named {name:?} exists already: remove it first \
                             (scheduler schedule remove {name}) or choose another name"
                        )),
                        None => Ok(Some(schedules::new_info(
                            schedule.clone(),
                            &expr,
                            Utc::now(),
                            false,
                        ))),
                    })
                    .await?;
                self.clock.notify_one();
                info!(schedule = %name, cron = %schedule.cron, tz = %schedule.tz, "schedule added");
                self.schedule_reply(info)?
            }
            RpcRequest::ScheduleList => RpcReply::Schedules {
                schedules: self
                    .store
                    .schedules()?
                    .into_iter()
                    .map(|info| self.with_next_fire(info))
                    .collect(),
            },
            RpcRequest::SchedulePause { name } => {
                let info = self
                    .change_schedule(&name, |info| info.paused = true)
                    .await?;
                info!(schedule = %name, "schedule paused");
                self.schedule_reply(info)?
            }
            RpcRequest::ScheduleResume { name } => {
                // What came due while paused is not missed: the schedule goes on from now.
                let now = Utc::now();
                let info = self
                    .change_schedule(&name, |info| {
                        if info.paused {
                            info.paused = false;
                            info.last_fire = Some(info.last_fire.map_or(now, |t| t.max(now)));
                        }
                    })
                    .await?;
                self.clock.notify_one();
                info!(schedule = %name, "schedule resumed");
                self.schedule_reply(info)?
            }
            RpcRequest::ScheduleRemove { name } => {
                let info = self.schedule_of(&name)?;
                self.store.update_schedule(&name, |_| Ok(None)).await?;
                info!(schedule = %name, "schedule removed");
                RpcReply::Schedule {
                    schedule: Box::new(ScheduleInfo {
                        next_fire: None,
                        ..info
                    }),
                }
            }
            RpcRequest::ScheduleRunNow { name } => {
                let info = self.schedule_of(&name)?;
                let record = self.submit(info.spec.job()).await?;
                info!(schedule = %name, job_id = %record.uuid, "schedule run by hand");
                RpcReply::Job {
                    job: Box::new(record),
                }
            }
            RpcRequest::Pause { queue } => self.pause(queue, true).await?,
            RpcRequest::Resume { queue } => self.pause(queue, false).await?,
            RpcRequest::Paused => {
                let PausedQueues {
                    version,
                    queues,
                    limited,
                } = self.store.paused()?;
                RpcReply::Paused {
                    version,
                    queues,
                    changed: false,
                    limited,
                }
            }
            RpcRequest::SetLimit { limit } => {
                let scope = limit.scope.clone();
                let changed = self.store.set_limit(limit).await?;
                self.limit_changed(&scope, changed, "set").await
            }
            RpcRequest::ClearLimit { scope, kind } => {
                let changed = self.store.clear_limit(&scope, kind).await?;
                self.limit_changed(&scope, changed, "cleared").await
            }
            RpcRequest::Limits => RpcReply::Limits {
                limits: self.store.limits()?,
            },
        })
    }

    /// After the limit on `scope` was set or cleared (`what`): the clock looks at the jobs it
    /// held, and agents hear what the limits apply to, when that changed.
    async fn limit_changed(
        &self,
        scope: &LimitScope,
        (limits, changed): (Vec<LimitInfo>, bool),
        what: &str,
    ) -> RpcReply {
        if changed {
            let limit = limits.iter().find(|l| l.limit.scope == *scope);
            info!(scope = %scope, rate = ?limit.and_then(|l| l.limit.rate.map(|r| r.to_string())),
                concurrency = ?limit.and_then(|l| l.limit.concurrency), "limit {what}");
            self.clock.notify_one();
            match self.store.paused() {
                Ok(paused) => {
                    if let Err(e) = self.tell_agents(&AgentMessage::Paused(paused)).await {
                        warn!(error = %e, "cannot tell the agents the limits now; each is told at its next heartbeat");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot read what the limits apply to; agents are told at their next heartbeat")
                }
            }
        }
        RpcReply::Limits { limits }
    }

    /// Pauses `queue` (or resumes it): stores it, then tells every agent. An agent that does
    /// not hear it (not started yet, its queue gone) is told again when its heartbeat shows it
    /// behind (see [`Scheduler::on_heartbeat`]).
    async fn pause(&self, queue: String, pause: bool) -> anyhow::Result<RpcReply> {
        let (paused, changed) = self.store.set_paused(&queue, pause).await?;
        self.paused
            .get_or_create(&QueueLabel {
                queue: queue.clone(),
            })
            .set(i64::from(pause));
        if changed {
            info!(queue = %queue, version = paused.version, "queue {}", if pause { "paused" } else { "resumed" });
            if let Err(e) = self
                .tell_agents(&AgentMessage::Paused(paused.clone()))
                .await
            {
                warn!(queue = %queue, error = %e, "cannot tell the agents now; each is told at its next heartbeat");
            }
        }
        Ok(RpcReply::Paused {
            version: paused.version,
            queues: paused.queues,
            changed,
            limited: paused.limited,
        })
    }

    fn schedule_of(&self, name: &str) -> anyhow::Result<ScheduleInfo> {
        self.store.schedule(name)?.ok_or_else(|| {
            anyhow::anyhow!("no schedule is named {name:?} (scheduler schedule list shows them)")
        })
    }

    async fn change_schedule(
        &self,
        name: &str,
        change: impl Fn(&mut ScheduleInfo),
    ) -> anyhow::Result<Option<ScheduleInfo>> {
        self.store
            .update_schedule(name, |old| {
                let mut info = old.ok_or_else(|| {
                    format!("no schedule is named {name:?} (scheduler schedule list shows them)")
                })?;
                change(&mut info);
                Ok(Some(info))
            })
            .await
    }

    fn schedule_reply(&self, info: Option<ScheduleInfo>) -> anyhow::Result<RpcReply> {
        let info = info.context("the schedule vanished")?;
        Ok(RpcReply::Schedule {
            schedule: Box::new(self.with_next_fire(info)),
        })
    }

    /// The schedule with its next fire time as of now (none while paused).
    fn with_next_fire(&self, mut info: ScheduleInfo) -> ScheduleInfo {
        info.next_fire = if info.paused {
            None
        } else {
            CronExpr::parse(&info.spec.cron, &info.spec.tz)
                .ok()
                .and_then(|e| e.next_after(info.last_fire.unwrap_or_else(Utc::now)))
        };
        info
    }

    /// Brings the stored schedules in line with the config file's: those of the file are
    /// added or updated (keeping their fire times), those the file no longer has are removed.
    async fn declare_schedules(&self, specs: &[ScheduleSpec]) -> anyhow::Result<()> {
        let now = Utc::now();
        for spec in specs {
            let expr = schedules::check(spec).map_err(anyhow::Error::msg)?;
            self.store
                .update_schedule(&spec.name, |old| {
                    Ok(Some(match old {
                        Some(info) => ScheduleInfo {
                            spec: spec.clone(),
                            from_config: true,
                            ..info
                        },
                        None => schedules::new_info(spec.clone(), &expr, now, true),
                    }))
                })
                .await?;
        }
        for info in self.store.schedules()? {
            if info.from_config && !specs.iter().any(|s| s.name == info.spec.name) {
                self.store
                    .update_schedule(&info.spec.name, |_| Ok(None))
                    .await?;
                info!(schedule = %info.spec.name, "schedule removed: the config file no longer has it");
            }
        }
        Ok(())
    }

    /// The scheduler's clock: queues held jobs whose time has come and fires schedules, then
    /// sleeps until the next of them is due (or something new is scheduled).
    async fn clock(self: Arc<Self>, stop: CancellationToken) {
        const LONGEST_NAP: Duration = Duration::from_secs(60);
        loop {
            if !self.is_writable() {
                // Releasing and firing write to the store: they wait until it can.
                tokio::select! {
                    _ = self.until(true) => {}
                    _ = stop.cancelled() => return,
                }
            }
            let now = Utc::now();
            let mut wake = match self.release_due(now).await {
                Ok(next) => next,
                Err(e) => {
                    self.store_failed(&e);
                    error!(error = %e, "cannot queue the jobs whose time has come; trying again soon");
                    Some(now + chrono::Duration::seconds(1))
                }
            };
            if let Some(next) = self.fire_schedules(now).await {
                wake = Some(wake.map_or(next, |w| w.min(next)));
            }
            match self.admit_throttled().await {
                Ok(Some(next)) => wake = Some(wake.map_or(next, |w| w.min(next))),
                Ok(None) => {}
                Err(e) => {
                    self.store_failed(&e);
                    error!(error = %e, "cannot release the throttled jobs; trying again soon");
                    wake = Some(now + chrono::Duration::seconds(1));
                }
            }
            // A wake-up already past (the pass took longer than what was left) is now.
            let nap = wake.map_or(LONGEST_NAP, |w| {
                let left = (w - Utc::now()).to_std().unwrap_or_default();
                (left + Duration::from_millis(1)).min(LONGEST_NAP)
            });
            tokio::select! {
                _ = tokio::time::sleep(nap) => {}
                _ = self.clock.notified() => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Queues the held jobs that are due; returns when the next one is.
    async fn release_due(
        &self,
        now: chrono::DateTime<Utc>,
    ) -> anyhow::Result<Option<chrono::DateTime<Utc>>> {
        loop {
            let due = self.store.due(now, 256)?;
            if due.is_empty() {
                return self.store.next_due();
            }
            for uuid in due {
                let Some(record) = self.store.release(uuid, now).await? else {
                    continue;
                };
                if record.state == JobState::Expired {
                    self.ended_unrun(&record).await;
                    self.move_on().await;
                } else if record.state == JobState::Throttled {
                    debug!(job_id = %uuid, reason = record.reason.as_deref().unwrap_or_default(), "its time has come: throttled");
                } else {
                    info!(job_id = %uuid, attempt = record.job.attempt, "its time has come: queueing it");
                    if let Err(e) = self.publish(&record).await {
                        self.store_failed(&e);
                        warn!(job_id = %uuid, error = %e, "job not queued yet; trying again later");
                    }
                }
            }
        }
    }

    /// Publishes the throttled jobs that their limits allow now; returns when a rate allows
    /// the next (a concurrency slot given back wakes the clock).
    async fn admit_throttled(&self) -> anyhow::Result<Option<chrono::DateTime<Utc>>> {
        loop {
            let (admitted, wake) = self.store.admit_throttled(256).await?;
            let more = admitted.len() == 256;
            for record in admitted {
                debug!(job_id = %record.uuid, attempt = record.job.attempt, "its limits allow it now: queueing it");
                if let Err(e) = self.publish(&record).await {
                    self.store_failed(&e);
                    warn!(job_id = %record.uuid, error = %e, "job not queued yet; trying again later");
                }
            }
            if !more {
                return Ok(wake);
            }
        }
    }

    /// Fires the schedules that are due; returns the next fire time of any.
    async fn fire_schedules(&self, now: chrono::DateTime<Utc>) -> Option<chrono::DateTime<Utc>> {
        let all = match self.store.schedules() {
            Ok(all) => all,
            Err(e) => {
                error!(error = %e, "cannot read the schedules");
                return Some(now + chrono::Duration::seconds(1));
            }
        };
        let mut earliest: Option<chrono::DateTime<Utc>> = None;
        for info in all.into_iter().filter(|i| !i.paused) {
            let name = info.spec.name.clone();
            let expr = match CronExpr::parse(&info.spec.cron, &info.spec.tz) {
                Ok(e) => e,
                Err(e) => {
                    error!(schedule = %name, error = %e, "a stored schedule cannot be read");
                    continue;
                }
            };
            let after = info.last_fire.unwrap_or(now);
            let Plan {
                fire,
                missed,
                through,
                next,
            } = schedules::plan(&expr, info.spec.missed, after, now, self.grace);
            if through > after {
                if missed {
                    warn!(schedule = %name, policy = info.spec.missed.as_str(), "fire times were missed (the scheduler was down or late)");
                }
                match self.store.fire(&name, &fire, through, next).await {
                    Ok(records) => {
                        for record in records {
                            info!(schedule = %name, job_id = %record.uuid, fire_time = ?record.job.run_at, "schedule fired");
                            self.fires
                                .get_or_create(&ScheduleLabel {
                                    schedule: name.clone(),
                                })
                                .inc();
                            if record.state == JobState::Queued
                                && let Err(e) = self.publish(&record).await
                            {
                                self.store_failed(&e);
                                warn!(job_id = %record.uuid, error = %e, "job not queued yet; trying again later");
                            }
                        }
                    }
                    Err(e) => {
                        self.store_failed(&e);
                        error!(schedule = %name, error = %e, "cannot fire the schedule; trying again soon");
                        earliest = Some(now + chrono::Duration::seconds(1));
                        continue;
                    }
                }
            }
            if let Some(next) = next {
                earliest = Some(earliest.map_or(next, |e| e.min(next)));
            }
        }
        earliest
    }

    /// Asks every agent to stop the job (or not to start it), and notes it: should the job
    /// start later somewhere that did not hear it, its `started` event repeats the request.
    async fn cancel(&self, uuid: JobId) -> anyhow::Result<JobRecord> {
        // Held by the scheduler: it never reaches an agent.
        if let Some(record) = self.store.cancel_scheduled(uuid).await? {
            info!(job_id = %uuid, "held job cancelled");
            self.finished(&record, record.job.attempt, Some(Status::Cancelled), None)
                .await;
            self.move_on().await;
            return Ok(record);
        }
        let record = self.record_of(uuid)?;
        if record.state.is_final() {
            bail!(
                "job {uuid} already ended ({}); there is nothing to cancel",
                record.state
            );
        }
        let record = self.store.request_cancel(uuid, &record)?;
        self.store.flush().await?;
        self.tell_agents(&AgentMessage::Cancel { uuid }).await?;
        info!(job_id = %uuid, "cancel requested");
        Ok(record)
    }

    /// Publishes `message` to every agent's queue (the control exchange).
    async fn tell_agents(&self, message: &AgentMessage) -> anyhow::Result<()> {
        let body = serde_json::to_vec(message)?;
        match self
            .broker
            .publish(&self.names.control(), "", &body, &Props::default())
            .await
        {
            // No agent has ever bound its queue: a cancelled job's start repeats the cancel, and
            // a new agent asks for the paused queues.
            Ok(()) | Err(BrokerError::Unroutable { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn record_of(&self, uuid: JobId) -> anyhow::Result<JobRecord> {
        self.store
            .get(uuid)?
            .ok_or_else(|| anyhow::anyhow!("no job {uuid} is recorded"))
    }

    /// Records the job, then publishes it (or holds it until its time). A job already
    /// recorded, or one whose unique key is held, is returned as it is.
    async fn submit(&self, job: Job) -> anyhow::Result<JobRecord> {
        let (record, new) = self.accept(job).await?;
        self.queue_new(&record, new).await?;
        Ok(record)
    }

    /// Publishes `record`, a job just accepted, when it is new and `queued`.
    async fn queue_new(&self, record: &JobRecord, new: bool) -> anyhow::Result<()> {
        if new && record.state == JobState::Queued {
            let uuid = record.uuid;
            self.publish(record).await.with_context(|| {
                format!("job {uuid} is recorded but not queued yet; the scheduler keeps trying to queue it")
            })?;
            info!(job_id = %uuid, r#type = %record.job.work_type, queue = record.job.queue_name(), "job submitted");
        }
        Ok(())
    }

    /// Records jobs at once (see [`Store::submit_all`]: a group, a chain), each made ready
    /// as by `submit`, then publishes the new ones that are `queued`. Returns their records.
    async fn submit_all(
        &self,
        jobs: Vec<Job>,
        link: impl Fn(&[Inserted], &mut Job),
    ) -> anyhow::Result<Vec<JobRecord>> {
        let jobs = jobs
            .into_iter()
            .enumerate()
            .map(|(i, job)| self.ready(job).with_context(|| format!("job {}", i + 1)))
            .collect::<anyhow::Result<Vec<Job>>>()?;
        let inserted = self.store.submit_all(jobs, link).await?;
        let mut records = Vec::with_capacity(inserted.len());
        for i in inserted {
            let uuid = i.record.uuid;
            let (record, new) = self.accepted(uuid, i).await;
            self.queue_new(&record, new).await?;
            records.push(record);
        }
        self.move_on().await;
        Ok(records)
    }

    /// Checks a job to record and makes it ready: its uuid set, its `ttl_s` made a deadline
    /// from now.
    fn ready(&self, mut job: Job) -> anyhow::Result<Job> {
        job.check().map_err(anyhow::Error::msg)?;
        // The timers count nanoseconds in an i64: 1677 to 2262.
        if let Some(at) = job.run_at
            && at.timestamp_nanos_opt().is_none()
        {
            bail!("run_at {at} is out of range: use a time between the years 1678 and 2261");
        }
        if let Some(ttl) = job.ttl_s {
            // At most a year (Job::check).
            let deadline = Utc::now() + chrono::Duration::seconds(ttl.min(MAX_TIMEOUT_S) as i64);
            job.expires_at = Some(job.expires_at.map_or(deadline, |at| at.min(deadline)));
        }
        job.uuid.get_or_insert_with(JobId::random);
        Ok(job)
    }

    /// Publishes (or holds, or announces as ended) the waiting jobs that recent writes moved
    /// on, once those writes are durable: a job released before its release is on disk could
    /// run, and then be released again after a crash.
    async fn move_on(&self) {
        let moved = self.store.take_moved();
        if moved.is_empty() {
            return;
        }
        if let Err(e) = self.store.flush().await {
            // They stay in the store: queued ones are published by the republish pass.
            self.store_failed(&e);
            return warn!(error = %e, "cannot flush the store; jobs released from waiting are queued later");
        }
        for record in moved {
            match record.state {
                JobState::Queued => {
                    info!(job_id = %record.uuid, r#type = %record.job.work_type, "the jobs it waited for have ended: queueing it");
                    if let Err(e) = self.publish(&record).await {
                        self.store_failed(&e);
                        warn!(job_id = %record.uuid, error = %e, "job not queued yet; trying again later");
                    }
                }
                JobState::Scheduled => self.clock.notify_one(),
                JobState::Waiting => {}
                _ if record.attempts.is_empty() => self.ended_unrun(&record).await,
                _ => {
                    info!(job_id = %record.uuid, state = %record.state, "its children have ended: job over");
                    self.finished(&record, record.job.attempt, None, None).await;
                }
            }
        }
    }

    /// Records a job as submitted (see [`Store::submit`]), its `ttl_s` made a deadline from
    /// now, and announces the jobs that this ended without a run (the held job it superseded;
    /// itself, when it cannot start by its deadline). Returns its record (or the job that
    /// holds its unique key) and whether it is new: a new `queued` one is to be published.
    async fn accept(&self, job: Job) -> anyhow::Result<(JobRecord, bool)> {
        let job = self.ready(job)?;
        let uuid = job.uuid.context("a ready job has its uuid")?;
        let inserted = self.store.submit(job).await?;
        let accepted = self.accepted(uuid, inserted).await;
        self.move_on().await;
        Ok(accepted)
    }

    /// Announces what recording the job `uuid` did (see [`Store::submit`]) and returns its
    /// record (or the job that holds its unique key) and whether it is new.
    async fn accepted(&self, uuid: JobId, inserted: Inserted) -> (JobRecord, bool) {
        let Inserted {
            record,
            new,
            superseded,
            ..
        } = inserted;
        if let Some(old) = superseded {
            self.ended_unrun(&old).await;
        }
        if new && record.state == JobState::Scheduled {
            info!(job_id = %uuid, r#type = %record.job.work_type, run_at = ?record.next_run_at, "job held until its time");
            self.clock.notify_one();
        } else if new && record.state == JobState::Waiting {
            info!(job_id = %uuid, r#type = %record.job.work_type, waiting_for = record.waiting_for.len(), "job held until the jobs it waits for end");
        } else if new && record.state == JobState::Throttled {
            debug!(job_id = %uuid, r#type = %record.job.work_type, reason = record.reason.as_deref().unwrap_or_default(), "job throttled");
            self.clock.notify_one();
        } else if new && record.state.is_final() {
            self.ended_unrun(&record).await;
        } else if !new && record.uuid != uuid {
            info!(job_id = %uuid, holder = %record.uuid, "not recorded: another job holds its unique key");
        }
        (record, new)
    }

    /// Announces and counts a job that the scheduler ended without running it (expired while
    /// held, superseded by a newer job with its debounce key, a callback or a chain's link
    /// ended by the failure of a job it waited for).
    async fn ended_unrun(&self, record: &JobRecord) {
        let reason = record.reason.as_deref().unwrap_or_default();
        info!(job_id = %record.uuid, state = %record.state, reason, "job ended without running");
        self.unrun
            .get_or_create(&UnrunLabel {
                r#type: record.job.work_type.clone(),
                state: record.state.as_str(),
            })
            .inc();
        let status = (record.state == JobState::Expired).then_some(Status::Expired);
        self.finished(record, record.job.attempt, status, None)
            .await;
    }

    /// Takes a job that an agent handed over (it was published straight to the jobs exchange
    /// with an option only the scheduler applies, see [`Job::needs_admission`]) and accepts
    /// it as if submitted over RPC; acked once recorded. A job handed over twice (the agent
    /// died before its ack) is recorded once, by its uuid.
    async fn on_admit(&self, d: Delivery) {
        let job = self
            .sent_by(
                &d,
                "job handed over for admission",
                &[UserRole::Agent, UserRole::Scheduler],
            )
            .and_then(|()| intake::admission(&d.body));
        let job = match job {
            Ok(job) => job,
            Err(refused) => return self.refuse(&d, Input::Admit, refused).await,
        };
        loop {
            if !self.is_writable() {
                // Held unacked until the store writes again; when the scheduler stops first,
                // it goes back to its queue with the connection.
                tokio::select! {
                    _ = self.until(true) => continue,
                    _ = self.stop.cancelled() => return,
                }
            }
            match self.accept(job.clone()).await {
                Ok((record, new)) => {
                    if new && record.state == JobState::Queued {
                        info!(job_id = %record.uuid, r#type = %record.job.work_type, "job handed over by an agent: queueing it");
                        if let Err(e) = self.publish(&record).await {
                            warn!(job_id = %record.uuid, error = %e, "job recorded but not queued yet; trying again later");
                        }
                    }
                    break;
                }
                Err(e) if self.store_failed(&e) => {}
                Err(e) => {
                    let refused = Refused::new(Reason::Unrecordable, format!("{e:#}"));
                    return self.refuse(&d, Input::Admit, refused).await;
                }
            }
        }
        d.ack().await;
    }

    /// Publishes a recorded job to its queue (declaring the queue the first time), confirmed.
    /// Only the pass that claims the attempt publishes it: returns false, publishing nothing,
    /// when another pass holds it or it was published meanwhile.
    async fn publish(&self, record: &JobRecord) -> anyhow::Result<bool> {
        let Some(claim) = self.store.claim(record.uuid, record.job.attempt)? else {
            return Ok(false);
        };
        let queue = record.job.queue_name();
        let mut t = Topology::default();
        t.jobs_queue(&self.names, queue);
        self.broker.declare(t).await?;
        let body = serde_json::to_vec(&record.job)?;
        let props = Props {
            message_id: Some(record.uuid.to_string()),
            priority: record.job.priority,
            headers: vec![(ADMITTED_HEADER.into(), "1".into())],
            ..Props::default()
        };
        self.broker
            .publish(&self.names.jobs_exchange(), queue, &body, &props)
            .await?;
        self.store.published(&claim)?;
        Ok(true)
    }

    /// Publishes the jobs recorded but never confirmed (after a crash or outage) that were
    /// handed over to be published at least `min_age` ago (younger ones may still be on their
    /// way) and that no other pass is publishing.
    async fn publish_unpublished(&self, min_age: Duration) {
        let cutoff = Utc::now() - chrono::Duration::from_std(min_age).unwrap_or_default();
        let pending = match self.store.republishable(cutoff) {
            Ok(p) => p,
            Err(e) => return error!(error = %e, "cannot read the jobs waiting to be queued"),
        };
        if pending.is_empty() {
            return;
        }
        info!(
            count = pending.len(),
            "queueing jobs recorded but not yet confirmed by RabbitMQ"
        );
        for record in pending {
            if let Err(e) = self.publish(&record).await {
                self.store_failed(&e);
                warn!(job_id = %record.uuid, error = %e, "job not queued yet; trying again later");
            }
        }
    }

    /// Every second: report lost parts; every 30 s and after a reconnect: queue what waits;
    /// every `purge_interval`: remove the jobs that ended longer than `retention` ago.
    async fn housekeeping(
        self: Arc<Self>,
        stop: CancellationToken,
        retention: Duration,
        purge_interval: Duration,
    ) {
        let mut check = tokio::time::interval(Duration::from_secs(1));
        let mut requeue = tokio::time::interval(Duration::from_secs(30));
        let mut purge = tokio::time::interval(purge_interval.max(Duration::from_millis(100)));
        // The reconnects acted on: one that comes while another branch runs is seen after it.
        let mut seen = self.broker.reconnects();
        loop {
            tokio::select! {
                _ = check.tick() => self.agents.check(),
                _ = requeue.tick() => self.publish_unpublished(IN_FLIGHT).await,
                _ = self.broker.reconnected_since(seen) => {
                    seen = self.broker.reconnects();
                    self.publish_unpublished(IN_FLIGHT).await
                }
                _ = purge.tick(), if !retention.is_zero() && self.is_writable() => {
                    if let Err(e) = self.purge(retention).await {
                        self.store_failed(&e);
                        error!(error = %e, "cannot remove old finished jobs; trying again at the next purge");
                    }
                }
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Removes the jobs (records, results, folders) that ended longer than `retention` ago.
    async fn purge(&self, retention: Duration) -> anyhow::Result<()> {
        let cutoff = Utc::now() - chrono::Duration::from_std(retention)?;
        loop {
            let dirs = self.store.purge(cutoff, 1000)?;
            if dirs.is_empty() {
                return Ok(());
            }
            self.store.flush().await?;
            for dir in &dirs {
                match tokio::fs::remove_dir_all(dir).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        warn!(folder = %dir.display(), error = %e, "cannot remove a purged job's folder")
                    }
                }
            }
            info!(
                count = dirs.len(),
                "removed finished jobs past their retention"
            );
        }
    }

    /// Refuses `d` unless its sender has one of the roles `allowed` (see [`rota_common::roles`]).
    fn sent_by(&self, d: &Delivery, what: &str, allowed: &[UserRole]) -> Result<(), Refused> {
        intake::sender(self.names.roles(), d.user_id.as_deref(), what, allowed)
    }

    /// A message not taken: counted, and kept in the dead-letter queue with its reason.
    async fn refuse(&self, d: &Delivery, input: Input, refused: Refused) {
        self.dropped.count(input, refused.reason);
        self.dead_letter(d, &refused.to_string()).await;
    }

    async fn dead_letter(&self, d: &Delivery, reason: &str) {
        warn!(reason, queue = %d.routing_key, "a message refused: it goes to the dead-letter queue");
        if self.publish_dead(&d.routing_key, &d.body, reason).await {
            d.ack().await;
        } else {
            d.requeue().await;
        }
    }

    /// Dead-letters one result of a group (its delivery is settled with the rest); false when
    /// it could not be, and the delivery should go back to its queue.
    async fn refuse_entry(&self, d: &Delivery, bad: intake::RefusedEntry) -> bool {
        self.dropped.count(Input::Result, bad.refused.reason);
        let reason = bad.refused.to_string();
        warn!(reason, queue = %d.routing_key, "unreadable result: it goes to the dead-letter queue");
        self.publish_dead(&d.routing_key, &bad.body, &reason).await
    }

    async fn publish_dead(&self, key: &str, body: &[u8], reason: &str) -> bool {
        let props = Props {
            headers: vec![("x-rota-reason".into(), reason.into())],
            ..Props::default()
        };
        match self
            .broker
            .publish(&self.names.dead(), key, body, &props)
            .await
        {
            Ok(()) => true,
            Err(e) => {
                error!(error = %e, "cannot dead-letter it; leaving it in its queue");
                false
            }
        }
    }
}
