//! The worker pool: `min` workers kept warm, up to `max` at once, lent to one job at a time.
//! deadpool does the lending; this module decides what a worker is at each location.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadpool::managed::{self, Metrics, RecycleResult};
use rota_common::wire::PoolStatus;
use rota_worker_runtime::{Context, Outcome, Registry};
use tokio_util::sync::CancellationToken;

use crate::config::Location;

/// One worker: runs one job at a time.
pub struct Worker {
    /// Shown in results and the demo's summary (`local-0`, …).
    pub id: String,
    registry: Arc<Registry>,
}

impl Worker {
    /// Runs the job of `ctx` to its outcome (see [`rota_worker_runtime::run`]).
    pub async fn execute(
        &self,
        ctx: Context,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> Outcome {
        rota_worker_runtime::run(&self.registry, ctx, timeout, cancel).await
    }
}

/// Makes and checks workers for deadpool.
pub struct Manager {
    location: Location,
    registry: Arc<Registry>,
    next_id: AtomicUsize,
}

impl managed::Manager for Manager {
    type Type = Worker;
    type Error = anyhow::Error;

    async fn create(&self) -> Result<Worker, anyhow::Error> {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        Ok(Worker {
            id: format!("{}-{n}", self.location.as_str()),
            registry: self.registry.clone(),
        })
    }

    async fn recycle(&self, _worker: &mut Worker, _: &Metrics) -> RecycleResult<anyhow::Error> {
        Ok(())
    }
}

/// A worker lent to one job; it goes back to the pool when dropped.
pub type PooledWorker = managed::Object<Manager>;

/// The pool of one agent.
#[derive(Clone)]
pub struct Pool {
    inner: managed::Pool<Manager>,
    location: Location,
    min: usize,
    queues: Vec<String>,
}

impl Pool {
    /// Builds the pool and starts its `min` warm workers.
    pub async fn start(
        location: Location,
        min: usize,
        max: usize,
        queues: Vec<String>,
        registry: Arc<Registry>,
    ) -> anyhow::Result<Self> {
        let manager = Manager {
            location,
            registry,
            next_id: AtomicUsize::new(0),
        };
        let inner = managed::Pool::builder(manager).max_size(max).build()?;
        let warm: Vec<PooledWorker> = futures::future::try_join_all((0..min).map(|_| inner.get()))
            .await
            .map_err(|e| anyhow::anyhow!("cannot start the pool's warm workers: {e}"))?;
        drop(warm);
        Ok(Self {
            inner,
            location,
            min,
            queues,
        })
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
