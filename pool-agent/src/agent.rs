//! The agent's life: connect, serve the jobs queues until shutdown, hand back what it cannot
//! finish. One job goes: admit → run on a pooled worker → store the result in the outbox →
//! ack → send the result; the scheduler's receipt then removes it from the outbox.
//! A paused queue (`scheduler pause`) is not consumed: its jobs wait in RabbitMQ.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chrono::Utc;
use futures::StreamExt;
use rota_common::Names;
use rota_common::amqp::{
    Broker, BrokerError, ConsumeSpec, Consumer, Delivery, Props, QueueSpec, Startup, Topology,
};
use rota_common::client::{Client, short_host};
use rota_common::http::{self, Health};
use rota_common::wire::{
    AgentId, AgentMessage, ErrorInfo, Event, EventKind, Heartbeat, Job, JobId, JobResult,
    PausedQueues, Role, RpcReply, RpcRequest, Run, Status,
};
use rota_worker_runtime::context::BufferSink;
use rota_worker_runtime::{Aliases, Context, Registry, WorkEnv};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::{AgentConfig, Location};
use crate::container::{DockerSpec, Engine};
use crate::fit::{self, Sealed};
use crate::intake::{self, Admitted, Limits, Refusal};
use crate::metrics::AgentMetrics;
use crate::outbox::Outbox;
use crate::paused::Paused;
use crate::pool::{Pool, WorkerSpec};
use crate::process::ProcessSpec;
use crate::recent::Recent;
use crate::results::Results;

/// Runs a pool agent until `shutdown` is cancelled, then stops taking jobs, lets running ones
/// finish (for up to `--shutdown-grace`), hands back the rest, and returns.
pub async fn run(
    mut cfg: AgentConfig,
    amqp_url: &str,
    names: Names,
    registry: Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    cfg.check()?;
    // Chromium never loads from the broker's port, wherever it listens.
    cfg.chromium.deny_broker_port(amqp_url);
    // Receipted and cancelled runs are remembered while RabbitMQ may still hand one back.
    let dead_peer_after = rota_common::amqp::dead_peer_after(amqp_url);
    names.roles().warn_if_open();
    let id = AgentId::new(&cfg.id).map_err(anyhow::Error::msg)?;
    let health = Health::default();
    let metrics = Arc::new(AgentMetrics::new());
    let stop_http = CancellationToken::new();
    let _stop_http = stop_http.clone().drop_guard();
    if let Some(addr) = cfg.http_addr {
        http::serve(addr, health.clone(), metrics.shared.clone(), stop_http).await?;
    }
    let aliases = Arc::new(Aliases::parse(&cfg.aliases)?);
    let dir = cfg.agent_dir();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the data folder {}", dir.display()))?;
    let outbox = Outbox::open(&dir.join("outbox"))?;
    let paused = Paused::open(&dir);

    let agent_queue = names.agent_queue(id.as_str());
    let mut topology = Topology::core(&names);
    for q in &cfg.queues {
        topology.jobs_queue(&names, q);
    }
    topology
        .queue(QueueSpec::replicated(agent_queue.clone(), &names))
        .bind(&agent_queue, &names.control(), "");
    let conn_name = format!(
        "rota pool-agent {id} ({}, pid {})",
        short_host(),
        std::process::id()
    );
    let broker = tokio::select! {
        b = Broker::connect(amqp_url, &conn_name, topology, Startup::Retry) => b?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    health.broker(&broker);
    let tag = format!("pool-agent-{id}");
    let receipts = match broker
        .consume(ConsumeSpec {
            queues: vec![agent_queue.clone()],
            tag: tag.clone(),
            prefetch: 256,
            exclusive: true,
            no_ack: false,
        })
        .await
    {
        Err(BrokerError::Locked { .. }) => bail!(
            "another pool agent with id \"{id}\" is already connected to RabbitMQ (namespace {:?}); give this one \
             another --id, or stop the other one. If it just died, RabbitMQ frees its id within about 20 s",
            names.namespace()
        ),
        other => other?,
    };

    let work_root = dir.join("work");
    std::fs::create_dir_all(&work_root)
        .with_context(|| format!("cannot create the folder {}", work_root.display()))?;
    let work_env = cfg.work_env()?;
    let engine = match cfg.worker_location {
        Location::Docker => Some(Arc::new(
            docker_engine(&cfg, &work_env, &names, &id, &aliases, &work_root).await?,
        )),
        _ => None,
    };
    // Child jobs that Work submits go to the scheduler over RPC, on this connection.
    let scheduler =
        Client::attach(broker.clone(), names.clone(), &format!("pool-agent-{id}")).await?;
    let spec = WorkerSpec {
        location: cfg.worker_location,
        process: ProcessSpec {
            program: cfg.worker_runtime_path(),
            aliases: (*aliases).clone(),
            kill_grace: cfg.kill_grace,
            chromium_args: cfg.chromium.to_args(),
            env: work_env,
        },
        engine: engine.clone(),
        chromium: cfg.chromium.clone(),
        max_jobs: cfg.worker_max_jobs,
        max_memory: cfg.worker_max_memory_mib * 1024 * 1024,
    };
    let pool = Pool::start(
        spec,
        cfg.pool_min_size,
        cfg.pool_max_size,
        cfg.queues.clone(),
        Arc::new(registry),
    )
    .await?;
    // Workers in containers run as their own user, and make their job's folder when their
    // Work first asks for it: the folder they make it in is theirs.
    let job_dir_owner = match engine {
        Some(_) if nix::unistd::geteuid().is_root() => Some(cfg.docker.uid_gid()?),
        _ => None,
    };
    if let Some((uid, gid)) = job_dir_owner {
        std::os::unix::fs::chown(&work_root, Some(uid), Some(gid)).with_context(|| {
            format!(
                "cannot give {} to the containers' user {uid}:{gid}",
                work_root.display()
            )
        })?;
    }
    let results = Results::start(
        broker.clone(),
        names.results(),
        agent_queue,
        metrics.clone(),
    );
    let agent = Arc::new(Agent {
        id: id.clone(),
        work_root,
        job_dir_owner,
        names: names.clone(),
        broker: broker.clone(),
        results,
        outbox,
        pool,
        aliases,
        running: Mutex::default(),
        cancelled: Mutex::new(Recent::for_dead_peer_after(dead_peer_after)),
        receipted: Mutex::new(Recent::for_dead_peer_after(dead_peer_after)),
        confirmed: Mutex::default(),
        store_problem: tokio::sync::watch::Sender::new(None),
        stopping: CancellationToken::new(),
        paused: paused.clone(),
        abandon: CancellationToken::new(),
        metrics: metrics.clone(),
        cfg: cfg.clone(),
        scheduler: Arc::new(scheduler),
    });

    // Results left from an earlier run go out first.
    let reconnects = agent.broker.reconnects();
    agent.resend_due(Due::All).await;
    let background = CancellationToken::new();
    let bg = TaskTracker::new();
    bg.spawn(agent.clone().receive_receipts(receipts));
    bg.spawn(agent.clone().resend_loop(reconnects, background.clone()));
    bg.spawn(agent.clone().trim_when_idle(background.clone()));
    tokio::select! {
        _ = agent.first_hearing() => {}
        _ = shutdown.cancelled() => {}
    }
    let queues: Vec<String> = cfg.queues.iter().map(|q| names.jobs_queue(q)).collect();
    let jobs_spec = ConsumeSpec {
        queues,
        tag,
        prefetch: cfg.prefetch(),
        exclusive: false,
        no_ack: false,
    };
    let mut heard = paused.subscribe();
    let mut jobs = broker
        .consume_paused(jobs_spec.clone(), agent.paused_queues())
        .await?;
    agent.say_paused(&agent.paused_queues(), &BTreeSet::new());
    let beat = Heartbeat::starting(Role::Agent, id.as_str(), cfg.heartbeat_interval);
    let hb_agent = agent.clone();
    bg.spawn(rota_common::heartbeat::run(
        broker.clone(),
        names.clone(),
        beat,
        background.clone(),
        move |hb| {
            hb.pools = vec![hb_agent.pool.status()];
            hb.running = hb_agent.running_ids();
            hb.unreceipted = hb_agent.outbox.len() as u64;
            hb.paused = hb_agent.paused.heard().map(|p| PausedQueues {
                queues: hb_agent
                    .cfg
                    .queues
                    .iter()
                    .filter(|q| p.contains(q))
                    .cloned()
                    .collect(),
                ..p
            });
        },
    ));

    metrics.watch(
        agent.pool.clone(),
        agent.outbox.clone(),
        paused,
        cfg.queues.clone(),
    );
    health.started(true);
    info!(agent = %id, queues = ?cfg.queues, location = cfg.worker_location.as_str(), min = cfg.pool_min_size,
        max = cfg.pool_max_size, data_dir = %dir.display(), "pool agent ready");

    let tracker = TaskTracker::new();
    let mut store_problem = agent.store_problem.subscribe();
    'intake: loop {
        let problem = store_problem.borrow_and_update().clone();
        if let Some(why) = problem {
            // The outbox cannot be written: take no more jobs (other agents can), until it can.
            health.unready("outbox", Some(why));
            jobs.stop().await;
            requeue_all(jobs.drain()).await;
            tokio::select! {
                _ = store_problem.wait_for(Option::is_none) => {}
                _ = shutdown.cancelled() => break,
            }
            jobs = loop {
                // Waits for the broker, should it be away too.
                match broker
                    .consume_paused(jobs_spec.clone(), agent.paused_queues())
                    .await
                {
                    Ok(consumer) => break consumer,
                    Err(e) => {
                        warn!(error = %e, "cannot consume the jobs queues again yet; retrying")
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => break 'intake,
                }
            };
            health.unready("outbox", None);
            info!("the outbox can be written again: taking jobs again");
            continue;
        }
        tokio::select! {
            d = jobs.recv() => match d {
                Some(d) => { tracker.spawn(agent.clone().handle(d)); }
                None => break,
            },
            _ = store_problem.changed() => {}
            _ = heard.changed() => agent.follow_pauses(&jobs).await,
            _ = shutdown.cancelled() => break,
        }
    }
    health.started(false);
    agent.stop(&mut jobs, &tracker).await;
    // Workers end what they started (processes, browsers) before the agent exits.
    agent.pool.close().await;
    info!("stopping: workers ended");
    if let Some(engine) = &engine {
        engine.remove_all().await?;
    }
    background.cancel();
    broker.close().await;
    info!("stopping: connection closed");
    bg.close();
    // They end with the broker (receipts) or the token (heartbeats, resends); a wait that
    // long means one is stuck, which must not keep the process from exiting.
    if tokio::time::timeout(Duration::from_secs(10), bg.wait())
        .await
        .is_err()
    {
        warn!("stopping: a background task did not end within 10 s; exiting without it");
    }
    info!(agent = %id, "pool agent stopped");
    Ok(())
}

/// Connects to the Docker engine for `docker` workers, and removes the containers that a
/// previous run of this agent left behind.
async fn docker_engine(
    cfg: &AgentConfig,
    work_env: &WorkEnv,
    names: &Names,
    id: &AgentId,
    aliases: &Aliases,
    work_root: &Path,
) -> anyhow::Result<Engine> {
    const MIB: u64 = 1024 * 1024;
    let d = &cfg.docker;
    let mut mounts: Vec<PathBuf> = aliases.iter().map(|(_, dir)| dir.to_path_buf()).collect();
    mounts.push(work_root.to_owned());
    let engine = Engine::connect(DockerSpec {
        image: d.image.clone(),
        network: d.network.clone(),
        user: d.user.clone(),
        env: work_env.container(),
        memory: d.memory_mib * MIB,
        cpus: d.cpus,
        pids: d.pids_limit,
        tmp_size: d.tmp_mib * MIB,
        mounts,
        owner: format!("{}/{id}", names.namespace()),
        namespace: names.namespace().to_owned(),
        name_prefix: format!("{}-{id}", names.namespace()),
    })
    .await?;
    let left = engine.remove_all().await?;
    if left > 0 {
        info!(
            containers = left,
            "removed worker containers left by a previous run"
        );
    }
    Ok(engine)
}

struct Agent {
    id: AgentId,
    /// Where each job's working folder is made.
    work_root: PathBuf,
    /// Who gets each job's folder (`docker` workers run as another user).
    job_dir_owner: Option<(u32, u32)>,
    names: Names,
    broker: Broker,
    outbox: Outbox,
    /// Publishes results, several in one message when several wait.
    results: Results,
    pool: Pool,
    aliases: Arc<Aliases>,
    /// Jobs held now (received, not yet acked), by job id and attempt.
    running: Mutex<HashMap<(JobId, u32), Running>>,
    /// Jobs cancelled before they arrived here, while a redelivery may still come (see
    /// [`Recent`]).
    cancelled: Mutex<Recent<JobId>>,
    /// Runs whose result the scheduler receipted, while a redelivery may still come (see
    /// [`Recent`]): a late one (its ack was lost with its channel) is acked, not run again.
    receipted: Mutex<Recent<(JobId, u32)>>,
    /// Stored results RabbitMQ confirmed, with when to send each again if no receipt comes.
    /// A stored result missing here was never confirmed: the resend timer tries it again.
    confirmed: Mutex<HashMap<(JobId, u32), Resend>>,
    /// Why the outbox cannot be written now; the agent takes no jobs while this is set.
    store_problem: tokio::sync::watch::Sender<Option<String>>,
    /// Cancelled when the agent starts to stop: a job still waiting for a worker goes back
    /// to RabbitMQ.
    stopping: CancellationToken,
    /// The paused queues: not consumed, and a job of one held here and not started yet goes
    /// back to RabbitMQ.
    paused: Paused,
    /// Cancelled when the shutdown grace is over: running jobs stop and go back to RabbitMQ.
    abandon: CancellationToken,
    metrics: Arc<AgentMetrics>,
    cfg: AgentConfig,
    /// Where the child jobs of Work go (the scheduler records them before they run).
    scheduler: Arc<Client>,
}

/// One job held by this agent.
struct Running {
    cancel: CancellationToken,
    /// Deliveries of the same job and attempt that came while it ran (RabbitMQ gave it back
    /// after a reconnect): settled with this run's result, never run a second time.
    redelivered: Vec<Delivery>,
}

/// When a confirmed result is sent again without a receipt.
#[derive(Clone, Copy)]
struct Resend {
    at: Instant,
    wait: Duration,
}

/// What happens to a job's delivery once its run is over.
enum Disposition {
    /// Store this result, then ack and send it.
    Store(Box<JobResult>),
    /// The result is stored already: ack and send it again.
    Resend(Sealed),
    /// The scheduler has recorded this run already: ack, nothing more.
    Ack,
    /// Hand the job back to RabbitMQ, to run later (here or elsewhere).
    Requeue,
}

/// Which stored results a resend pass sends again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Due {
    /// Those RabbitMQ never confirmed (timer, shutdown).
    Unconfirmed,
    /// Those, and confirmed ones whose receipt is overdue while the scheduler consumes results.
    Overdue,
    /// Every one: at start, and after a reconnect, when receipts (transient) may have been lost
    /// with the broker. One copy each per reconnect.
    All,
}

/// A result RabbitMQ refuses is tried this many times before it is replaced by a failed one.
const MAX_REFUSALS: u32 = 3;
/// How many stored results the resend pass reads at a time.
const RESEND_PAGE: usize = 256;

impl Agent {
    async fn handle(self: Arc<Self>, d: Delivery) {
        let limits = Limits {
            max_bytes: self.cfg.max_job_bytes,
            max_timeout: self.cfg.max_job_timeout,
            default_timeout: self.cfg.default_timeout,
            types: self.pool.types(),
        };
        match intake::admit(&d, &limits) {
            Ok(admitted)
                if (admitted.job.needs_admission(Utc::now())
                    || self.paused.limits(&admitted.job))
                    && !intake::published_by_scheduler(self.names.roles(), &d) =>
            {
                self.hand_over(d, &admitted).await
            }
            Ok(admitted) => {
                let span = info_span!("job", job_id = %admitted.uuid, r#type = %admitted.job.work_type, attempt = admitted.job.attempt);
                async {
                    let key = (admitted.uuid, admitted.job.attempt);
                    let Some(held) = self.hold(key, d) else {
                        return info!(
                            "RabbitMQ delivered this job again while it runs here (after a reconnect): \
                             it is settled with this run's result, not run twice"
                        );
                    };
                    let disposition = self.run_job(&held, admitted).await;
                    self.settle(held, disposition).await
                }
                .instrument(span)
                .await
            }
            Err(refusal) => self.refuse(d, refusal).await,
        }
    }

    /// Hands a job published straight to the jobs exchange with an option that only the
    /// scheduler applies ([`Job::needs_admission`]) to the scheduler's admission queue,
    /// confirmed, then acks it; the scheduler records it as if submitted and publishes it when
    /// it may run. Not confirmed (or no scheduler ever declared the queue), the job goes back
    /// to RabbitMQ. Killed in between, the job comes again and is handed over again: the
    /// scheduler records it once, by its uuid.
    async fn hand_over(&self, d: Delivery, Admitted { job, uuid, .. }: &Admitted) {
        let props = Props {
            message_id: Some(uuid.to_string()),
            ..Props::default()
        };
        let sent = match serde_json::to_vec(job) {
            Ok(body) => self
                .broker
                .publish("", &self.names.admit(), &body, &props)
                .await
                .map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        match sent {
            Ok(()) => {
                info!(job_id = %uuid, "handed over to the scheduler, which applies its run_at, unique_key, ttl_s or limits before it runs");
                d.ack().await;
            }
            Err(e) => {
                warn!(job_id = %uuid, error = %e, "cannot hand the job over to the scheduler (its queue {} exists once a scheduler has started); handing it back to RabbitMQ in a second", self.names.admit());
                // Not at once: the next delivery of it would most likely fail the same way.
                tokio::time::sleep(Duration::from_secs(1)).await;
                d.requeue().await;
            }
        }
    }

    /// Takes hold of a job, or, when the same job and attempt already runs here, adds the
    /// delivery to that run (None).
    fn hold(&self, key: (JobId, u32), d: Delivery) -> Option<Held> {
        let mut running = self.running.lock().ok()?;
        if let Some(run) = running.get_mut(&key) {
            run.redelivered.push(d);
            return None;
        }
        let cancel = self.abandon.child_token();
        running.insert(
            key,
            Running {
                cancel: cancel.clone(),
                redelivered: Vec::new(),
            },
        );
        Some(Held {
            key,
            delivery: d,
            cancel,
        })
    }

    /// Lets go of a job: it no longer counts as running, and every delivery of it is returned.
    fn release(&self, held: Held) -> Vec<Delivery> {
        let mut all = vec![held.delivery];
        if let Ok(mut running) = self.running.lock()
            && let Some(run) = running.remove(&held.key)
        {
            all.extend(run.redelivered);
        }
        all
    }

    async fn run_job(&self, held: &Held, Admitted { job, uuid, timeout }: Admitted) -> Disposition {
        let cancel = held.cancel.clone();
        match self.outbox.get(uuid, job.attempt) {
            Ok(Some(stored)) => {
                info!(
                    "this run already finished here; resending its stored result instead of running it again"
                );
                return Disposition::Resend(stored);
            }
            Ok(None)
                if self
                    .receipted
                    .lock()
                    .is_ok_and(|r| r.contains(&(uuid, job.attempt))) =>
            {
                info!("this run finished here and the scheduler recorded it; not running it again");
                return Disposition::Ack;
            }
            Ok(None) => {}
            Err(e) => {
                error!(error = %e, "cannot read the outbox; handing the job back to RabbitMQ");
                self.store_failed(&e);
                return Disposition::Requeue;
            }
        }
        if self.cancelled.lock().is_ok_and(|c| c.contains(&uuid)) {
            info!("cancelled before it started: not running it");
            let error = ErrorInfo::new("cancelled", "cancelled before it started");
            return self.not_run(uuid, job, Status::Cancelled, error);
        }
        // A job of a queue paused before it started goes back, even while it waits for a
        // worker (a prefetch above the pool's size).
        let mut worker = tokio::select! {
            biased;
            // The routing key of a job is its queue's name.
            () = self.paused.until_paused(&held.delivery.routing_key) => {
                info!(queue = %held.delivery.routing_key, "its queue is paused: handing the job back to RabbitMQ, not running it");
                return Disposition::Requeue;
            }
            got = self.pool.get() => match got {
                Ok(w) => w,
                Err(e) => {
                    error!(error = %e, "no worker available; handing the job back to RabbitMQ");
                    return Disposition::Requeue;
                }
            },
            () = self.stopping.cancelled() => {
                info!("stopping before a worker was free for it; handing the job back to RabbitMQ");
                return Disposition::Requeue;
            }
        };
        // Checked once a worker is free, right before the Work would start.
        let now = Utc::now();
        if let Some(deadline) = job.expires_at.filter(|at| *at <= now) {
            drop(worker);
            let why = format!("not started by its deadline {deadline} (looked at {now}): not run");
            info!(reason = %why, "the job expired");
            return self.not_run(uuid, job, Status::Expired, ErrorInfo::new("expired", why));
        }
        let announcing = self.announce_start(&job, uuid).await;
        let work_dir = self.work_root.join(uuid.to_string());
        let sink = Arc::new(self.progress_sink(&job, uuid));
        let started_at = Utc::now();
        // The folder is made when the Work first asks for it; kept folders (the demo, and
        // debugging) are made up front, so that every job has one.
        let made = if self.cfg.keep_work_dirs {
            self.make_owned_dir(&work_dir)
        } else {
            Ok(())
        };
        let outcome = match made {
            Ok(()) => {
                let ctx = Context::new(
                    job.clone(),
                    work_dir,
                    self.aliases.clone(),
                    sink.clone(),
                    cancel.clone(),
                );
                worker.execute(ctx, timeout, cancel).await
            }
            Err(e) => rota_worker_runtime::Outcome::error(
                Status::Crashed,
                "work_dir",
                format!(
                    "cannot create the job's working folder {}: {e}",
                    work_dir.display()
                ),
            ),
        };
        if let Some(announcing) = announcing {
            announcing.abort();
        }
        let worker_id = worker.id.clone();
        drop(worker);
        if self.abandon.is_cancelled() && outcome.status != Status::Succeeded {
            info!("shutdown grace is over; handing the unfinished job back to RabbitMQ");
            return Disposition::Requeue;
        }
        let (logs, logs_dropped) = sink.take_logs();
        Disposition::Store(Box::new(JobResult {
            uuid,
            attempt: job.attempt,
            work_type: job.work_type.clone(),
            agent: self.id.clone(),
            worker: worker_id,
            status: outcome.status,
            error: outcome.error,
            output: outcome.output,
            logs,
            logs_dropped,
            started_at,
            finished_at: Utc::now(),
            job,
        }))
    }

    /// The result of a job that ends here without running (`status`, for the reason `error`).
    fn not_run(&self, uuid: JobId, job: Job, status: Status, error: ErrorInfo) -> Disposition {
        let now = Utc::now();
        Disposition::Store(Box::new(JobResult {
            uuid,
            attempt: job.attempt,
            work_type: job.work_type.clone(),
            agent: self.id.clone(),
            worker: String::new(),
            status,
            error: Some(error),
            output: serde_json::Value::Null,
            logs: Vec::new(),
            logs_dropped: 0,
            started_at: now,
            finished_at: now,
            job,
        }))
    }

    /// Carries out a disposition for every delivery of the job. A result is stored before
    /// the job stops counting as running here, so that a redelivery finds it either joined
    /// to the run or stored (and is acked with the stored result).
    ///
    /// A new result is sent while it is made durable, not after: the scheduler has it without
    /// waiting for this disk. The job is acked only once the result is durable, so a crash in
    /// between hands the job back to RabbitMQ, and a second result of it is recorded once.
    async fn settle(&self, held: Held, disposition: Disposition) {
        match disposition {
            Disposition::Store(result) => {
                let (result, sealed) = match fit::seal(*result, self.cfg.max_result_bytes) {
                    Ok(sealed) => sealed,
                    Err(e) => {
                        error!(error = %e, "cannot encode the result; handing the job back to RabbitMQ");
                        return requeue_all(self.release(held)).await;
                    }
                };
                let written = self.outbox.write(&sealed).is_ok();
                let stored = if written {
                    let (stored, ()) = tokio::join!(self.store(&sealed, true), self.send(&sealed));
                    stored
                } else {
                    self.store(&sealed, false).await
                };
                if !stored {
                    info!(
                        "shutdown grace is over before the result could be stored; handing the job back to RabbitMQ"
                    );
                    return requeue_all(self.release(held)).await;
                }
                ack_all(self.release(held)).await;
                info!(status = %result.status, worker = %result.worker, "job finished");
                self.metrics.jobs.count(&result);
                if !written {
                    self.send(&sealed).await;
                }
            }
            Disposition::Resend(stored) => {
                ack_all(self.release(held)).await;
                self.send(&stored).await;
            }
            Disposition::Ack => ack_all(self.release(held)).await,
            Disposition::Requeue => requeue_all(self.release(held)).await,
        }
    }

    /// Makes a result durable in the outbox (`written`: it is written already and only needs
    /// the flush), waiting while the outbox cannot be written (a full disk): the agent then
    /// takes no jobs and says why on `/readyz`, and reopens the outbox until a write
    /// succeeds. False if the shutdown grace ended first.
    async fn store(&self, result: &Sealed, mut written: bool) -> bool {
        let mut backoff =
            rota_common::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let stored = if written {
                self.outbox.commit().await
            } else {
                self.outbox.put(result).await
            };
            match stored {
                Ok(()) => {
                    self.store_problem.send_if_modified(|p| p.take().is_some());
                    return true;
                }
                Err(e) => self.store_failed(&e),
            }
            // A failed flush may have lost the write: write it again.
            written = false;
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = self.abandon.cancelled() => return false,
            }
            if !self.outbox.failed() {
                continue; // nothing was written: it waits for room (see Outbox::write)
            }
            match self.outbox.reopen().await {
                Ok(()) => info!("reopened the outbox after a failed write"),
                Err(e) if e.is::<crate::outbox::Stuck>() => {
                    // Unacked jobs go back to RabbitMQ with the connection; stored results
                    // stay on disk and are sent by the next run.
                    error!(error = %e, "exiting: restart the pool agent (Kubernetes does) to reopen its outbox");
                    std::process::exit(75);
                }
                Err(e) => tracing::debug!(error = %e, "the outbox cannot be reopened yet"),
            }
        }
    }

    fn store_failed(&self, e: &anyhow::Error) {
        let why = format!(
            "cannot write the outbox ({e:#}); taking no jobs until it can. Free space in {} \
             (is the disk full?); the agent resumes by itself",
            self.cfg.agent_dir().display()
        );
        self.store_problem.send_if_modified(|p| {
            if p.is_some() {
                return false;
            }
            error!(reason = %why, "the outbox cannot be written: no more jobs until it can");
            *p = Some(why);
            true
        });
    }

    /// Dead-letters a job that cannot run, and tells the scheduler when the job has a uuid.
    async fn refuse(&self, d: Delivery, refusal: Refusal) {
        warn!(reason = %refusal.reason, queue = %d.routing_key, "refusing a job: it goes to the dead-letter queue");
        self.metrics.dead_lettered(refusal.kind);
        let headers = vec![
            ("x-rota-reason".to_owned(), refusal.reason.clone()),
            ("x-rota-agent".to_owned(), self.id.to_string()),
            ("x-rota-queue".to_owned(), d.routing_key.clone()),
        ];
        let props = Props {
            headers,
            message_id: d.message_id.clone(),
            ..Props::default()
        };
        if let Err(e) = self
            .broker
            .publish(&self.names.dead(), &d.routing_key, &d.body, &props)
            .await
        {
            error!(error = %e, "cannot dead-letter the job; handing it back to RabbitMQ");
            d.requeue().await;
            return;
        }
        let error_kind = refusal.error_kind();
        let Some(job) = refusal.job else {
            d.ack().await;
            return;
        };
        let now = Utc::now();
        let result = JobResult {
            uuid: job.uuid.unwrap_or_else(JobId::random),
            attempt: job.attempt,
            work_type: job.work_type.clone(),
            agent: self.id.clone(),
            worker: String::new(),
            status: Status::Rejected,
            error: Some(ErrorInfo::new(error_kind, refusal.reason)),
            output: serde_json::Value::Null,
            logs: Vec::new(),
            logs_dropped: 0,
            started_at: now,
            finished_at: now,
            job: *job,
        };
        let (result, sealed) = match fit::seal(result, self.cfg.max_result_bytes) {
            Ok(sealed) => sealed,
            Err(e) => {
                error!(error = %e, "cannot encode the result of a refused job; handing it back to RabbitMQ");
                d.requeue().await;
                return;
            }
        };
        if !self.store(&sealed, false).await {
            d.requeue().await;
            return;
        }
        d.ack().await;
        self.metrics.jobs.count(&result);
        self.send(&sealed).await;
    }

    /// Publishes a stored result to the results queue (confirmed). When it is not confirmed
    /// it stays in the outbox and the resend timer tries again. A result that RabbitMQ
    /// refuses outright (larger than its `max_message_size`) is tried [`MAX_REFUSALS`]
    /// times, then replaced by a failed result that says why.
    async fn send(&self, result: &Sealed) {
        let key = result.key();
        let mut refusals = 0;
        let refused = loop {
            match self.results.send(result).await {
                Ok(()) => {
                    // The receipt may have come before the confirm: then it is settled.
                    if self.receipted.lock().is_ok_and(|r| r.contains(&key)) {
                        return;
                    }
                    let wait = self.cfg.receipt_timeout;
                    if let Ok(mut c) = self.confirmed.lock() {
                        let next = c.get(&key).map_or(wait, |r| r.wait.saturating_mul(2));
                        let at = Instant::now();
                        c.insert(
                            key,
                            Resend {
                                at,
                                wait: next.min(MAX_RECEIPT_WAIT),
                            },
                        );
                    }
                    return;
                }
                Err(e @ BrokerError::Refused { .. }) => {
                    refusals += 1;
                    warn!(job_id = %result.uuid, error = %e, refusals, "RabbitMQ refused the result");
                    if refusals >= MAX_REFUSALS {
                        break e;
                    }
                    tokio::time::sleep(Duration::from_millis(200) * refusals).await;
                }
                Err(e) => {
                    // Unconfirmed now, so the next resend tick tries again (not only after
                    // the receipt timeout of an earlier confirmed copy).
                    if let Ok(mut c) = self.confirmed.lock() {
                        c.remove(&key);
                    }
                    return warn!(job_id = %result.uuid, error = %e, "result not sent yet; it stays in the outbox and is resent");
                }
            }
        };
        let result = match result.result() {
            Ok(r) if !fit::is_replacement(&r) => r,
            _ => {
                return error!(job_id = %result.uuid, error = %refused, "RabbitMQ refuses even the short failed result; it stays in the outbox. \
                    Raise the broker's max_message_size, or lower --max-job-bytes");
            }
        };
        error!(job_id = %result.uuid, error = %refused, "RabbitMQ refused the result {MAX_REFUSALS} times; replacing it with a failed result that says why");
        let failed = fit::refused(result, &refused.to_string());
        let Ok(sealed) = Sealed::of(&failed) else {
            return;
        };
        if self.store(&sealed, false).await {
            Box::pin(self.send(&sealed)).await;
        }
    }

    /// Sends again the stored results that may have no copy in RabbitMQ (see [`Due`]).
    /// Reads the outbox a page at a time.
    async fn resend_due(&self, due: Due) {
        let overdue = match due {
            Due::All => true,
            Due::Unconfirmed => false,
            // While nobody consumes results, a confirmed copy waits in the queue.
            Due::Overdue => self
                .broker
                .consumers(&self.names.results())
                .await
                .is_ok_and(|n| n > 0),
        };
        let mut after = None;
        let mut count = 0usize;
        loop {
            let (keys, next) = self.outbox.keys(after, RESEND_PAGE);
            let due: Vec<(JobId, u32)> = {
                let confirmed = self.confirmed.lock().map(|c| c.clone()).unwrap_or_default();
                keys.into_iter()
                    .filter(|k| match confirmed.get(k) {
                        None => true,
                        Some(r) => overdue && (due == Due::All || r.at.elapsed() >= r.wait),
                    })
                    .collect()
            };
            count += due.len();
            futures::stream::iter(due)
                .for_each_concurrent(64, |(uuid, attempt)| async move {
                    if let Ok(Some(stored)) = self.outbox.get(uuid, attempt) {
                        self.send(&stored).await;
                    }
                })
                .await;
            match next {
                Some(c) => after = Some(c),
                None => break,
            }
        }
        if count > 0 {
            info!(
                count,
                "sent again results that may have no copy in RabbitMQ"
            );
        }
    }

    /// Every `resend_interval`, the results due ([`Due::Overdue`]); after each reconnect
    /// (beyond the `seen` ones), all of them. A reconnect that comes during a pass (which
    /// waits for the broker while it is away) is made up for right after it: missed, the
    /// receipts lost with the broker would be made up for only after `--receipt-timeout`.
    async fn resend_loop(self: Arc<Self>, mut seen: u64, stop: CancellationToken) {
        let every = self.cfg.resend_interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.broker.reconnected_since(seen) => {}
                _ = stop.cancelled() => return,
            }
            let now = self.broker.reconnects();
            let due = if now > seen { Due::All } else { Due::Overdue };
            seen = now;
            self.resend_due(due).await;
        }
    }

    /// Gives back to the system the memory a burst of jobs left free, once the agent has
    /// sent no result for a while and holds no job: glibc keeps what each thread freed in
    /// that thread's arena for later, and maps keep the room they grew to. Then again each
    /// time it forgets receipted runs that aged (see [`Recent`]).
    async fn trim_when_idle(self: Arc<Self>, stop: CancellationToken) {
        const TICK: Duration = Duration::from_secs(5);
        let sent = || self.metrics.results_sent.get();
        let (mut seen, mut trimmed) = (sent(), true);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.cancelled() => return,
            }
            let now = sent();
            if now != seen {
                (seen, trimmed) = (now, false);
                continue;
            }
            let idle = self.outbox.is_empty() && self.running.lock().is_ok_and(|r| r.is_empty());
            if !idle {
                continue;
            }
            let forgot = self.receipted.lock().is_ok_and(|mut r| r.shrink())
                | self.cancelled.lock().is_ok_and(|mut c| c.shrink());
            if forgot || !trimmed {
                if let Ok(mut r) = self.running.lock() {
                    r.shrink_to_fit();
                }
                if let Ok(mut c) = self.confirmed.lock() {
                    c.shrink_to_fit();
                }
                release_free_memory();
                trimmed = true;
            }
        }
    }

    /// Applies the scheduler's receipts and control messages from this agent's queue.
    async fn receive_receipts(self: Arc<Self>, mut receipts: Consumer) {
        while let Some(d) = receipts.recv().await {
            if let Err(why) = intake::from_scheduler(self.names.roles(), &d) {
                self.metrics.dropped("agent_queue", "forbidden");
                warn!(reason = %why, "ignoring a message on the agent's queue");
                d.ack().await;
                continue;
            }
            match AgentMessage::parse(&d.body) {
                Ok(m @ (AgentMessage::Receipt { .. } | AgentMessage::Receipts { .. })) => {
                    for Run { uuid, attempt } in m.receipted() {
                        self.receipted(uuid, attempt).await;
                    }
                }
                Ok(AgentMessage::Cancel { uuid }) => {
                    let tokens: Vec<CancellationToken> = self
                        .running
                        .lock()
                        .map(|r| {
                            r.iter()
                                .filter(|((id, _), _)| *id == uuid)
                                .map(|(_, run)| run.cancel.clone())
                                .collect()
                        })
                        .unwrap_or_default();
                    for token in tokens {
                        info!(job_id = %uuid, "cancelling a running job");
                        token.cancel();
                    }
                    if let Ok(mut c) = self.cancelled.lock() {
                        c.insert(uuid);
                    }
                }
                Ok(AgentMessage::Paused(paused)) => self.paused.hear(paused),
                Err(e) => {
                    self.metrics.dropped("agent_queue", "unreadable");
                    warn!(error = %e, "ignoring an unreadable message on the agent's queue")
                }
            }
            d.ack().await;
        }
    }

    /// Asks the scheduler for the paused queues before taking jobs, when a scheduler is
    /// running (it consumes the results queue): a change made while this agent was down may
    /// still wait in its queue. With no scheduler, or no answer, the agent goes by the set it
    /// kept; a new agent, which has none, takes jobs from all its queues until the scheduler,
    /// seeing in its heartbeats that it never heard the set, tells it.
    async fn first_hearing(&self) {
        let scheduler_runs = self
            .broker
            .consumers(&self.names.results())
            .await
            .is_ok_and(|n| n > 0);
        let answer = if scheduler_runs {
            self.scheduler.call(&RpcRequest::Paused).await
        } else {
            Err(anyhow::anyhow!("no scheduler is running"))
        };
        match answer {
            Ok(RpcReply::Paused {
                version,
                queues,
                limited,
                ..
            }) => self.paused.hear(PausedQueues {
                version,
                queues,
                limited,
            }),
            Ok(other) => warn!(reply = ?other, "unexpected reply from the scheduler to `paused`"),
            Err(e) if self.paused.heard().is_some() => {
                info!(reason = %e, "cannot ask the scheduler which queues are paused: going by those heard last")
            }
            Err(e) => warn!(reason = %e,
                "cannot ask the scheduler which queues are paused, and this agent never heard them: \
                 taking jobs from all its queues until the scheduler says"),
        }
    }

    /// The jobs queues (their full names) of this agent that are paused.
    fn paused_queues(&self) -> BTreeSet<String> {
        self.cfg
            .queues
            .iter()
            .filter(|q| self.paused.contains(q))
            .map(|q| self.names.jobs_queue(q))
            .collect()
    }

    /// Stops consuming the queues paused now, and consumes those resumed again.
    async fn follow_pauses(&self, jobs: &Consumer) {
        let paused = self.paused_queues();
        let mut now = BTreeSet::new();
        let mut resumed = BTreeSet::new();
        for queue in self.cfg.queues.iter().map(|q| self.names.jobs_queue(q)) {
            if paused.contains(&queue) {
                if jobs.pause(&queue).await {
                    now.insert(queue);
                }
            } else if jobs.resume(&queue) {
                resumed.insert(queue);
            }
        }
        self.say_paused(&now, &resumed);
    }

    fn say_paused(&self, paused: &BTreeSet<String>, resumed: &BTreeSet<String>) {
        for queue in paused {
            info!(queue = %queue, running = self.running_ids().len(),
                "queue paused: taking none of its jobs (running ones finish, the others go back to RabbitMQ)");
        }
        for queue in resumed {
            info!(queue = %queue, "queue resumed: taking its jobs again");
        }
    }

    /// The scheduler recorded this run: forget its result, and its folder unless another
    /// attempt of the job is running here, in the same folder.
    async fn receipted(&self, uuid: JobId, attempt: u32) {
        if let Err(e) = self.outbox.remove(uuid, attempt) {
            error!(job_id = %uuid, error = %e, "cannot remove a receipted result from the outbox");
        }
        if let Ok(mut c) = self.confirmed.lock() {
            c.remove(&(uuid, attempt));
        }
        if let Ok(mut r) = self.receipted.lock() {
            r.insert((uuid, attempt));
        }
        let dir = self.work_root.join(uuid.to_string());
        // Most jobs never made one: a look costs less than a removal on the blocking pool.
        if !self.cfg.keep_work_dirs && !self.runs(uuid) && dir.symlink_metadata().is_ok() {
            let _ = tokio::fs::remove_dir_all(dir).await;
        }
    }

    /// Makes a folder that the job's worker can write (in a container, as its user).
    fn make_owned_dir(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        match self.job_dir_owner {
            Some((uid, gid)) => std::os::unix::fs::chown(dir, Some(uid), Some(gid)),
            None => Ok(()),
        }
    }

    /// Whether some attempt of `uuid` is held here now.
    fn runs(&self, uuid: JobId) -> bool {
        self.running
            .lock()
            .is_ok_and(|r| r.keys().any(|(id, _)| *id == uuid))
    }

    /// A log buffer whose progress reports become `job.progress` events and whose child
    /// jobs are submitted to the scheduler.
    fn progress_sink(&self, job: &Job, uuid: JobId) -> BufferSink {
        let scheduler = self.scheduler.clone();
        // A `thread` worker runs its Work on a runtime of its own: submit on the agent's.
        let runtime = tokio::runtime::Handle::current();
        let submit = move |child: Job| -> rota_worker_runtime::context::Submission {
            let scheduler = scheduler.clone();
            let submitted = runtime.spawn(async move {
                let record = scheduler.submit(child).await?;
                info!(child = %record.uuid, r#type = %record.job.work_type, "child job submitted");
                Ok(record.uuid)
            });
            Box::pin(async move {
                submitted
                    .await
                    .map_err(|e| anyhow::anyhow!("the submission was lost: {e}"))?
            })
        };
        let (broker, names, agent, attempt, work_type) = (
            self.broker.clone(),
            self.names.clone(),
            self.id.clone(),
            job.attempt,
            job.work_type.clone(),
        );
        BufferSink::new(move |progress| {
            let event = Event {
                event: EventKind::Progress,
                uuid,
                attempt,
                work_type: work_type.clone(),
                agent: Some(agent.clone()),
                time: Utc::now(),
                status: None,
                state: None,
                progress: Some(progress),
                job: None,
            };
            let (broker, names) = (broker.clone(), names.clone());
            tokio::spawn(async move { publish_event(&broker, &names, &event).await });
        })
        .with_submit(submit)
    }

    /// Announces `job.started` for a job that starts now: at once with no `--started-delay`,
    /// else only if it still runs after that delay (a result implies the start, so most short
    /// jobs need no event). Drop the returned guard when the run ends.
    async fn announce_start(&self, job: &Job, uuid: JobId) -> Option<tokio::task::JoinHandle<()>> {
        let event = Event {
            event: EventKind::Started,
            uuid,
            attempt: job.attempt,
            work_type: job.work_type.clone(),
            agent: Some(self.id.clone()),
            time: Utc::now(),
            status: None,
            state: None,
            progress: None,
            job: Some(job.clone()),
        };
        let delay = self.cfg.started_delay;
        if delay.is_zero() {
            publish_event(&self.broker, &self.names, &event).await;
            return None;
        }
        let (broker, names) = (self.broker.clone(), self.names.clone());
        Some(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            publish_event(&broker, &names, &event).await;
        }))
    }

    fn running_ids(&self) -> Vec<JobId> {
        self.running
            .lock()
            .map(|r| r.keys().map(|(id, _)| *id).collect())
            .unwrap_or_default()
    }

    /// Stops taking jobs, waits for running ones up to the grace period, then hands back the
    /// rest, and sends what is still unsent.
    async fn stop(&self, jobs: &mut Consumer, tracker: &TaskTracker) {
        info!(
            running = self.running_ids().len(),
            grace_s = self.cfg.shutdown_grace.as_secs(),
            "stopping: taking no more jobs"
        );
        self.stopping.cancel();
        jobs.stop().await;
        requeue_all(jobs.drain()).await;
        tracker.close();
        if tokio::time::timeout(self.cfg.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                running = self.running_ids().len(),
                "shutdown grace is over: handing unfinished jobs back to RabbitMQ"
            );
            self.abandon.cancel();
            tracker.wait().await;
        }
        self.resend_due(Due::Unconfirmed).await;
        if let Err(e) = self.outbox.commit().await {
            error!(error = %e, "cannot flush the outbox");
        }
    }
}

/// The longest wait for a receipt before a confirmed result is sent again.
const MAX_RECEIPT_WAIT: Duration = Duration::from_secs(6 * 3600);

async fn ack_all(deliveries: Vec<Delivery>) {
    for d in deliveries {
        d.ack().await;
    }
}

/// Returns the allocator's free pages to the system.
#[allow(unsafe_code)]
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists, under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn requeue_all(deliveries: Vec<Delivery>) {
    for d in deliveries {
        d.requeue().await;
    }
}

/// A job this agent holds, from its delivery until [`Agent::release`].
struct Held {
    key: (JobId, u32),
    delivery: Delivery,
    cancel: CancellationToken,
}

async fn publish_event(broker: &Broker, names: &Names, event: &Event) {
    if let Ok(body) = serde_json::to_vec(event) {
        let props = Props {
            transient: true,
            ..Props::default()
        };
        broker
            .notify(&names.events(), &event.routing_key(), &body, &props)
            .await;
    }
}
