//! The worker pool: `min` workers kept warm, up to `max` at once, lent to one job at a time.
//! deadpool does the lending; this module decides what a worker is at each location.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use rota_common::wire::{PoolStatus, Status};
use rota_worker_runtime::chromium::{Chromium, ChromiumArgs};
use rota_worker_runtime::{Context, Outcome, Registry};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Location;
use crate::container::Engine;
use crate::process::{Process, ProcessSpec};

/// How long a `thread` worker may overrun its job's timeout (or a cancel) before the agent
/// stops waiting for it and replaces the thread.
const THREAD_GRACE: Duration = Duration::from_secs(5);

/// One worker: runs one job at a time.
pub struct Worker {
    /// Shown in results and the demo's summary (`local-0`, `thread-3`, …).
    pub id: String,
    registry: Arc<Registry>,
    /// The worker's own thread, for the `thread` location.
    thread: Option<mpsc::UnboundedSender<Request>>,
    /// The worker's own process, for the `process` location.
    process: Option<Process>,
    /// The worker's browser, for in-process locations (a worker process has its own).
    chromium: Option<Arc<Chromium>>,
    /// Jobs run so far (workers are recycled after a number of jobs).
    jobs: u64,
    /// Set when the worker cannot be trusted with another job: the pool replaces it.
    broken: bool,
}

/// A job handed to a worker thread.
struct Request {
    ctx: Context,
    timeout: Duration,
    cancel: CancellationToken,
    reply: oneshot::Sender<Outcome>,
}

impl Worker {
    /// Runs the job of `ctx` to its outcome (see [`rota_worker_runtime::run`]).
    pub async fn execute(
        &mut self,
        ctx: Context,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> Outcome {
        self.jobs += 1;
        let ctx = match &self.chromium {
            Some(chromium) => ctx.with_chromium(chromium.clone()),
            None => ctx,
        };
        if let Some(process) = &mut self.process {
            let (outcome, reusable) = process.execute(ctx, timeout, cancel).await;
            self.broken |= !reusable;
            return outcome;
        }
        let Some(thread) = &self.thread else {
            return rota_worker_runtime::run(&self.registry, ctx, timeout, cancel).await;
        };
        let (reply, outcome) = oneshot::channel();
        let request = Request {
            ctx,
            timeout,
            cancel: cancel.clone(),
            reply,
        };
        if thread.send(request).is_err() {
            self.broken = true;
            return Outcome::error(
                Status::Crashed,
                "worker",
                format!("worker {} has no thread any more", self.id),
            );
        }
        // The thread applies the timeout and the cancel itself, at the Work's await points. A
        // Work that blocks its thread cannot be stopped: past a grace period the thread is
        // abandoned (it ends when the Work returns) and the pool starts a new one.
        let overrun = async {
            tokio::select! {
                _ = tokio::time::sleep(timeout) => {}
                _ = cancel.cancelled() => {}
            }
            tokio::time::sleep(THREAD_GRACE).await;
        };
        tokio::select! {
            out = outcome => out.unwrap_or_else(|_| {
                self.broken = true;
                Outcome::error(Status::Crashed, "worker", format!("worker thread {} ended unexpectedly", self.id))
            }),
            _ = overrun => {
                self.broken = true;
                let status = if cancel.is_cancelled() { Status::Cancelled } else { Status::TimedOut };
                Outcome::error(status, "abandoned", format!(
                    "the Work did not stop within {} s of its {}; its thread {} is abandoned and replaced",
                    THREAD_GRACE.as_secs(), if cancel.is_cancelled() { "cancel" } else { "timeout" }, self.id
                ))
            }
        }
    }

    /// Ends what the worker started: its process (whole group), its browser.
    async fn shut_down(&mut self) {
        if let Some(p) = self.process.as_mut() {
            p.terminate().await;
        }
        if let Some(chromium) = &self.chromium {
            chromium.shutdown().await;
        }
    }
}

/// Starts a worker thread with a runtime of its own, serving requests until its worker is
/// dropped.
fn start_thread(
    name: &str,
    registry: Arc<Registry>,
) -> anyhow::Result<mpsc::UnboundedSender<Request>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                while let Some(req) = rx.recv().await {
                    let out =
                        rota_worker_runtime::run(&registry, req.ctx, req.timeout, req.cancel).await;
                    let _ = req.reply.send(out);
                }
            });
        })?;
    Ok(tx)
}

/// What the workers of a pool are and when they are replaced.
#[derive(Clone)]
pub struct WorkerSpec {
    pub location: Location,
    /// For `process` and `docker` workers.
    pub process: ProcessSpec,
    /// For `docker` workers.
    pub engine: Option<Arc<Engine>>,
    /// Replace a worker after this many jobs (0: never).
    pub max_jobs: u64,
    /// Replace a `process` worker above this resident memory, in bytes (0: no limit).
    pub max_memory: u64,
    /// Where in-process workers' Chromium lives.
    pub chromium: ChromiumArgs,
}

/// Makes and checks workers for deadpool.
pub struct Manager {
    spec: WorkerSpec,
    registry: Arc<Registry>,
    next_id: AtomicUsize,
}

impl managed::Manager for Manager {
    type Type = Worker;
    type Error = anyhow::Error;

    async fn create(&self) -> Result<Worker, anyhow::Error> {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", self.spec.location.as_str());
        let (mut thread, mut process) = (None, None);
        // In the agent's process, the browser gets the pool's environment, not the agent's.
        let in_process = || {
            let settings = ChromiumArgs {
                env: Some(self.spec.process.env.clone()),
                ..self.spec.chromium.clone()
            };
            Some(Arc::new(Chromium::new(settings)))
        };
        let chromium = match self.spec.location {
            Location::Local => in_process(),
            Location::Thread => {
                thread = Some(start_thread(&id, self.registry.clone())?);
                in_process()
            }
            Location::Process => {
                process = Some(Process::start(&self.spec.process, &id).await?);
                None
            }
            Location::Docker => {
                let engine = self
                    .spec
                    .engine
                    .as_ref()
                    .context("docker workers need an engine")?;
                process = Some(Process::start_in(engine, &self.spec.process, &id).await?);
                None
            }
        };
        tracing::debug!(worker = %id, "worker started");
        Ok(Worker {
            id,
            registry: self.registry.clone(),
            thread,
            process,
            chromium,
            jobs: 0,
            broken: false,
        })
    }

    async fn recycle(&self, worker: &mut Worker, _: &Metrics) -> RecycleResult<anyhow::Error> {
        let worn_out = self.spec.max_jobs > 0 && worker.jobs >= self.spec.max_jobs;
        let too_big = self.spec.max_memory > 0
            && worker
                .process
                .as_ref()
                .and_then(Process::rss_bytes)
                .is_some_and(|rss| rss > self.spec.max_memory);
        if worker.broken || worn_out || too_big {
            tracing::info!(worker = %worker.id, jobs = worker.jobs, broken = worker.broken, worn_out, too_big,
                "replacing a worker");
            worker.shut_down().await;
            return Err(RecycleError::message(format!(
                "worker {} is replaced",
                worker.id
            )));
        }
        Ok(())
    }
}

/// A worker lent to one job; it goes back to the pool when dropped.
pub type PooledWorker = managed::Object<Manager>;

/// The pool of one agent.
#[derive(Clone)]
pub struct Pool {
    inner: managed::Pool<Manager>,
    /// The work types this pool's workers run.
    types: Arc<BTreeSet<String>>,
    location: Location,
    min: usize,
    queues: Vec<String>,
}

impl Pool {
    /// Builds the pool and starts its `min` warm workers.
    pub async fn start(
        spec: WorkerSpec,
        min: usize,
        max: usize,
        queues: Vec<String>,
        registry: Arc<Registry>,
    ) -> anyhow::Result<Self> {
        let location = spec.location;
        let mut types: BTreeSet<String> = registry.names().map(str::to_owned).collect();
        let manager = Manager {
            spec,
            registry,
            next_id: AtomicUsize::new(0),
        };
        let inner = managed::Pool::builder(manager).max_size(max).build()?;
        // Worker processes run their runtime's types, which they name at start: ask one.
        let warm_up = if matches!(location, Location::Process | Location::Docker) {
            min.max(1)
        } else {
            min
        };
        let warm: Vec<PooledWorker> =
            futures::future::try_join_all((0..warm_up).map(|_| inner.get()))
                .await
                .map_err(|e| anyhow::anyhow!("cannot start the pool's warm workers: {e}"))?;
        if let Some(process) = warm.first().and_then(|w| w.process.as_ref()) {
            types = process.types.iter().cloned().collect();
        }
        drop(warm);
        Ok(Self {
            inner,
            types: Arc::new(types),
            location,
            min,
            queues,
        })
    }

    /// The work types this pool's workers run.
    pub fn types(&self) -> &BTreeSet<String> {
        &self.types
    }

    /// Stops lending workers and shuts down the idle ones (all of them once every job has
    /// ended), so that their processes, browsers and containers end with the agent.
    pub async fn close(&self) {
        let idle = self.inner.retain(|_, _| false).removed;
        self.inner.close();
        for mut worker in idle {
            worker.shut_down().await;
        }
    }

    /// Waits for a free worker.
    pub async fn get(&self) -> anyhow::Result<PooledWorker> {
        self.inner
            .get()
            .await
            .map_err(|e| anyhow::anyhow!("no worker: {e}"))
    }

    pub fn status(&self) -> PoolStatus {
        let s = self.inner.status();
        PoolStatus {
            queues: self.queues.clone(),
            location: self.location.as_str().to_owned(),
            min: self.min,
            max: s.max_size,
            busy: s.size.saturating_sub(s.available),
            idle: s.available,
        }
    }
}
