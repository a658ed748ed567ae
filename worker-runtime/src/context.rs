//! What a running Work can reach: its job, a logger, a progress reporter, its own working
//! directory, the pool's path aliases, a cancellation signal, the scheduler (to submit
//! child jobs) and its worker's Chromium.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use chrono::Utc;
use rota_common::wire::{Job, JobId, Level, LogLine, OnFailure, Progress, WAIT_FOR_CHILDREN};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::chromium::{Browser, Chromium};
use crate::logs::LogBuffer;
use crate::paths::{Access, Aliases};

/// Where a Work's log lines and progress go: the agent's buffer and events when the Work runs
/// in the agent, the stdout protocol when it runs in a worker process.
pub trait Sink: Send + Sync {
    fn log(&self, line: LogLine);
    fn progress(&self, progress: Progress);
    /// Submits a child job (uuid and parent set) to the scheduler; resolves once the
    /// scheduler has recorded it.
    fn submit(&self, job: Job) -> Submission {
        let _ = job;
        Box::pin(async { anyhow::bail!("this worker cannot submit child jobs") })
    }
}

/// A child job on its way to the scheduler: its uuid once recorded.
pub type Submission = Pin<Box<dyn Future<Output = anyhow::Result<JobId>> + Send + 'static>>;

type SubmitFn = Box<dyn Fn(Job) -> Submission + Send + Sync>;

/// A sink that keeps log lines in a capped buffer and forwards progress to a callback.
pub struct BufferSink {
    pub logs: Mutex<LogBuffer>,
    on_progress: Box<dyn Fn(Progress) + Send + Sync>,
    on_submit: Option<SubmitFn>,
}

impl BufferSink {
    pub fn new(on_progress: impl Fn(Progress) + Send + Sync + 'static) -> Self {
        Self {
            logs: Mutex::new(LogBuffer::default()),
            on_progress: Box::new(on_progress),
            on_submit: None,
        }
    }

    /// Child jobs go to `on_submit`.
    pub fn with_submit(
        mut self,
        on_submit: impl Fn(Job) -> Submission + Send + Sync + 'static,
    ) -> Self {
        self.on_submit = Some(Box::new(on_submit));
        self
    }

    /// The lines kept and the number dropped.
    pub fn take_logs(&self) -> (Vec<LogLine>, u64) {
        let buf = self
            .logs
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default();
        buf.finish()
    }
}

impl Sink for BufferSink {
    fn log(&self, line: LogLine) {
        if let Ok(mut logs) = self.logs.lock() {
            logs.push(line);
        }
    }
    fn progress(&self, progress: Progress) {
        (self.on_progress)(progress);
    }
    fn submit(&self, job: Job) -> Submission {
        match &self.on_submit {
            Some(f) => f(job),
            None => Box::pin(async { anyhow::bail!("this worker cannot submit child jobs") }),
        }
    }
}

/// The handle a Work gets on its job and its surroundings.
#[derive(Clone)]
pub struct Context {
    job: Job,
    uuid: JobId,
    work_dir: PathBuf,
    /// Whether `work_dir` was made (it is made the first time the Work asks for it).
    work_dir_made: Arc<std::sync::OnceLock<Result<(), String>>>,
    aliases: Arc<Aliases>,
    sink: Arc<dyn Sink>,
    cancel: CancellationToken,
    /// Child jobs submitted so far (their ids count on it).
    children: Arc<AtomicU32>,
    /// The worker's browser slot (none where the Work runs without a worker, e.g. in tests).
    chromium: Option<Arc<Chromium>>,
}

impl Context {
    /// `job` must carry its uuid (the agent assigns one before running anything).
    pub fn new(
        job: Job,
        work_dir: PathBuf,
        aliases: Arc<Aliases>,
        sink: Arc<dyn Sink>,
        cancel: CancellationToken,
    ) -> Self {
        let uuid = job.uuid.unwrap_or_else(JobId::random);
        Self {
            job,
            uuid,
            work_dir,
            work_dir_made: Arc::default(),
            aliases,
            sink,
            cancel,
            children: Arc::default(),
            chromium: None,
        }
    }

    /// The same context with its worker's Chromium.
    pub fn with_chromium(mut self, chromium: Arc<Chromium>) -> Self {
        self.chromium = Some(chromium);
        self
    }

    /// The worker's Chromium slot, if it has one.
    pub fn chromium(&self) -> Option<&Arc<Chromium>> {
        self.chromium.as_ref()
    }

    /// A browser for this job, connected over the DevTools protocol: the worker's own,
    /// started on first use where the pool's settings say Chromium lives, reused by its later
    /// jobs. Pages opened in it are closed when the job ends.
    pub async fn browser(&self) -> anyhow::Result<Browser> {
        let chromium = self.chromium.as_ref().context(
            "this Work runs without a worker's Chromium (it was not started by a pool or worker-runtime)",
        )?;
        chromium.browser().await
    }

    /// Where this Work's log lines and progress go.
    pub fn sink(&self) -> Arc<dyn Sink> {
        self.sink.clone()
    }

    pub fn job(&self) -> &Job {
        &self.job
    }
    pub fn uuid(&self) -> JobId {
        self.uuid
    }
    pub fn attempt(&self) -> u32 {
        self.job.attempt
    }
    pub fn payload(&self) -> &Value {
        &self.job.payload
    }

    /// The payload read as `T`, with an error that names the work type when it does not fit.
    pub fn payload_as<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        let payload = if self.job.payload.is_null() {
            Value::Object(Default::default())
        } else {
            self.job.payload.clone()
        };
        serde_json::from_value(payload)
            .with_context(|| format!("invalid payload for {}", self.job.work_type))
    }

    pub fn log(&self, level: Level, message: impl Into<String>) {
        self.sink.log(LogLine {
            time: Utc::now(),
            level,
            message: message.into(),
        });
    }
    pub fn debug(&self, message: impl Into<String>) {
        self.log(Level::Debug, message);
    }
    pub fn info(&self, message: impl Into<String>) {
        self.log(Level::Info, message);
    }
    pub fn warn(&self, message: impl Into<String>) {
        self.log(Level::Warn, message);
    }
    pub fn error(&self, message: impl Into<String>) {
        self.log(Level::Error, message);
    }

    /// Reports progress: a fraction from 0 to 1 and/or a message (sent as a `job.progress`
    /// event).
    pub fn progress(&self, fraction: Option<f64>, message: Option<&str>) {
        let fraction = fraction.map(|f| f.clamp(0.0, 1.0));
        self.sink.progress(Progress {
            fraction,
            message: message.map(str::to_owned),
        });
    }

    /// Submits a child job to the scheduler, which records it with this job as its parent
    /// (`scheduler status` of this job lists it) and queues it (or holds it, if it has a
    /// `run_at`). Returns the child's uuid once it is recorded. Unless the job carries a
    /// uuid, the n-th child of a run gets the same uuid each time that run is repeated (a
    /// redelivery after an agent crash), so it is recorded and run once.
    pub async fn submit(&self, mut job: Job) -> anyhow::Result<JobId> {
        let n = self.children.fetch_add(1, Ordering::Relaxed);
        let uuid = *job
            .uuid
            .get_or_insert_with(|| JobId::child_of(self.uuid, self.attempt(), n));
        job.parent = Some(self.uuid);
        job.attempt = 1;
        job.check()
            .map_err(|e| anyhow::anyhow!("invalid child job: {e}"))?;
        self.sink
            .submit(job)
            .await
            .with_context(|| format!("cannot submit child job {uuid}"))
    }

    /// Submits `children` as child jobs (see [`Context::submit`]), then `callback`, a child
    /// too, that the scheduler holds (`waiting`) until every one of them has ended and then
    /// queues with their outcomes in its `inputs` (in their order). `on_failure` says what a
    /// child that ends other than `succeeded` does to the callback (`run` when None). Returns
    /// the children's uuids and the callback's, last. The uuids are those of [`Context::submit`],
    /// so a repeated run records no second group.
    pub async fn submit_group(
        &self,
        children: Vec<Job>,
        mut callback: Job,
        on_failure: Option<OnFailure>,
    ) -> anyhow::Result<Vec<JobId>> {
        let mut ids = Vec::with_capacity(children.len() + 1);
        for child in children {
            ids.push(self.submit(child).await?);
        }
        callback.after = ids.clone();
        callback.on_failure = on_failure;
        ids.push(self.submit(callback).await?);
        Ok(ids)
    }

    /// The output to return for this job to wait for its children: its Work ends (its worker
    /// is free), and the scheduler holds the job (`waiting`) until every child has ended; it
    /// then ends `succeeded` if every child did, else `failed`, with the output
    /// `{"output": output, "children": [{uuid, state, output, error}…]}`.
    pub fn wait_for_children(&self, output: Value) -> Value {
        serde_json::json!({ WAIT_FOR_CHILDREN: true, "output": output })
    }

    /// This job's own folder, empty at start, for scratch files. It is made the first time
    /// a Work asks for it (most jobs need none), and removed once the scheduler has recorded
    /// the job's result.
    pub fn work_dir(&self) -> anyhow::Result<&Path> {
        self.work_dir_made
            .get_or_init(|| std::fs::create_dir_all(&self.work_dir).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot create the job's working folder {}: {e}",
                    self.work_dir.display()
                )
            })?;
        Ok(&self.work_dir)
    }

    /// Where this job's folder is, whether or not it was made (for passing it on to a worker
    /// process, which makes it when its Work asks).
    pub fn work_dir_path(&self) -> &Path {
        &self.work_dir
    }

    /// The real path of `alias/relative/path` (see [`Aliases::resolve`]), to name the file
    /// or hand it to a program; read and write it with [`Context::open`] and
    /// [`Context::create_file`], which cannot be led out of the alias's folder.
    pub fn resolve(&self, path: &str) -> anyhow::Result<PathBuf> {
        Ok(self.aliases.resolve(path)?)
    }

    /// Opens the file at `alias/relative/path` beneath its alias's folder (see
    /// [`Aliases::open`]).
    pub fn open(&self, path: &str, access: Access) -> anyhow::Result<std::fs::File> {
        Ok(self.aliases.open(path, access)?)
    }

    /// Opens the file at `alias/relative/path` beneath its alias's folder, making the
    /// folders above it first (see [`Aliases::create_file`]).
    pub fn create_file(&self, path: &str, access: Access) -> anyhow::Result<std::fs::File> {
        Ok(self.aliases.create_file(path, access)?)
    }

    /// Resolves when the job is cancelled or timed out; long-running Work should select on it
    /// at its await points (in-process workers cannot be stopped otherwise).
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}
