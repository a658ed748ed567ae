//! The pool agent's settings (flags, `ROTA_…` environment variables, or the config file).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use rota_common::config::parse_duration;
use rota_worker_runtime::WorkEnv;
use rota_worker_runtime::chromium::ChromiumArgs;

pub use crate::container::Network;

/// Where a pool's Workers run (see the README's isolation table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Location {
    /// A task in the agent's own runtime: cheapest, no isolation, cooperative cancel only.
    Local,
    /// A dedicated OS thread per worker: CPU-bound Work does not stall the agent. Cancel and
    /// timeouts are cooperative; a thread that does not return is abandoned and replaced.
    Thread,
    /// A `worker-runtime` child process per worker, reused for many jobs: a timeout or cancel
    /// ends its whole process group (SIGTERM, then SIGKILL).
    Process,
    /// That process inside a container per worker (hardened: no network, non-root, no
    /// capabilities, read-only root, memory/CPU/pids limits); a timeout or cancel kills and
    /// removes the container.
    Docker,
}

impl Location {
    pub fn as_str(self) -> &'static str {
        match self {
            Location::Local => "local",
            Location::Thread => "thread",
            Location::Process => "process",
            Location::Docker => "docker",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct AgentConfig {
    /// This agent's stable id: names its queue and its data folder. Two agents with one id
    /// are refused (the second one exits).
    #[arg(long, env = "ROTA_AGENT_ID")]
    pub id: String,

    /// Where the Workers run.
    #[arg(long, env = "ROTA_WORKER_LOCATION", value_enum, default_value_t = Location::Local)]
    pub worker_location: Location,

    /// Workers kept warm when idle.
    #[arg(long, env = "ROTA_POOL_MIN_SIZE", default_value_t = 1)]
    pub pool_min_size: usize,

    /// The most jobs run at once.
    #[arg(long, env = "ROTA_POOL_MAX_SIZE", default_value_t = 4)]
    pub pool_max_size: usize,

    /// The most jobs this agent holds from RabbitMQ at once (its prefetch): those running,
    /// and those waiting here for a worker or for their result to reach the disk (a job is
    /// acked once its result is durable). Default: --pool-max-size, so that a job waits in
    /// RabbitMQ, where any agent can take it, and never here behind a long one. Short jobs
    /// flow faster with more (4 × the pool's size is Celery's default); see the README's
    /// "Prefetch".
    #[arg(long, env = "ROTA_PREFETCH")]
    pub prefetch: Option<usize>,

    /// A jobs queue to serve (repeatable, or comma-separated in the environment).
    #[arg(
        long = "queue",
        env = "ROTA_QUEUES",
        value_delimiter = ',',
        default_value = "default"
    )]
    pub queues: Vec<String>,

    /// A path alias NAME=DIR that Work can use as `NAME/relative/path` (repeatable).
    #[arg(long = "alias", env = "ROTA_ALIASES", value_delimiter = ',')]
    pub aliases: Vec<String>,

    /// Root of the data folders; this agent uses `<data-dir>/agent-<id>` (outbox, job folders).
    #[arg(long, env = "ROTA_DATA_DIR", default_value = "rota-data")]
    pub data_dir: PathBuf,

    /// Timeout of a job that names none.
    #[arg(long, env = "ROTA_DEFAULT_TIMEOUT", value_parser = parse_duration, default_value = "5m")]
    pub default_timeout: Duration,

    /// The longest timeout a job may ask for; longer ones are rejected. Keep it below
    /// RabbitMQ's consumer_timeout (24 h in deploy/rabbitmq/rabbitmq.conf), or the broker
    /// takes the job back while it runs and it runs twice.
    #[arg(long, env = "ROTA_MAX_JOB_TIMEOUT", value_parser = parse_duration, default_value = "6h")]
    pub max_job_timeout: Duration,

    /// The largest job message accepted, in bytes; larger ones are dead-lettered.
    #[arg(long, env = "ROTA_MAX_JOB_BYTES", default_value_t = 1024 * 1024)]
    pub max_job_bytes: usize,

    /// Serve /healthz, /readyz and /metrics on this address (e.g. 0.0.0.0:9090); off unless set.
    #[arg(long, env = "ROTA_HTTP_ADDR")]
    pub http_addr: Option<std::net::SocketAddr>,

    /// How often to publish a heartbeat.
    #[arg(long, env = "ROTA_HEARTBEAT_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub heartbeat_interval: Duration,

    /// How often to try again to send a result RabbitMQ has not confirmed yet (it was down,
    /// or refused it). A confirmed result is not sent again on this timer.
    #[arg(long, env = "ROTA_RESEND_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    pub resend_interval: Duration,

    /// `job.started` is announced only for a job still running after this long: a result
    /// implies the start, so short jobs cost no event. 0 announces every start at once.
    #[arg(long, env = "ROTA_STARTED_DELAY", value_parser = parse_duration, default_value = "100ms")]
    pub started_delay: Duration,

    /// A confirmed result with no receipt after this long is sent again, but only while the
    /// scheduler consumes results (while it is down, the copy waits in the results queue);
    /// the wait doubles with each resend.
    #[arg(long, env = "ROTA_RECEIPT_TIMEOUT", value_parser = parse_duration, default_value = "5m")]
    pub receipt_timeout: Duration,

    /// The largest result sent, in bytes, kept below RabbitMQ's max_message_size (16 MiB by
    /// default on 4.x): logs are cut to fit, and a larger output fails the job with the error
    /// kind `result_too_large`.
    #[arg(long, env = "ROTA_MAX_RESULT_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_result_bytes: usize,

    /// On SIGTERM, how long running jobs may finish before they are handed back to RabbitMQ.
    #[arg(long, env = "ROTA_SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "30s")]
    pub shutdown_grace: Duration,

    /// The `worker-runtime` binary for `process` workers (default: the one beside this binary).
    #[arg(long, env = "ROTA_WORKER_RUNTIME")]
    pub worker_runtime: Option<PathBuf>,

    /// A worker is replaced after this many jobs (`process` workers; 0: never).
    #[arg(long, env = "ROTA_WORKER_MAX_JOBS", default_value_t = 1000)]
    pub worker_max_jobs: u64,

    /// A worker is replaced once its memory exceeds this many MiB (`process` workers; 0: no limit).
    #[arg(long, env = "ROTA_WORKER_MAX_MEMORY_MIB", default_value_t = 1024)]
    pub worker_max_memory_mib: u64,

    /// Between SIGTERM and SIGKILL when a worker process is ended.
    #[arg(long, env = "ROTA_KILL_GRACE", value_parser = parse_duration, default_value = "5s")]
    pub kill_grace: Duration,

    /// Keep each job's working folder after the scheduler's receipt (default: remove it).
    #[arg(long, env = "ROTA_KEEP_WORK_DIRS")]
    pub keep_work_dirs: bool,

    /// A variable KEY=VALUE in the environment of Work (repeatable; comma-separated in the
    /// environment). Work never inherits the agent's environment: `process` and `docker`
    /// workers and Chromium get only PATH, HOME, USER, LOGNAME, LANG, LANGUAGE, LC_*, TZ and
    /// TMPDIR from it (in a container, PATH is the image's and HOME and TMPDIR are /tmp),
    /// plus these.
    #[arg(long = "work-env", env = "ROTA_WORK_ENV", value_delimiter = ',')]
    pub work_env: Vec<String>,

    /// A variable of the agent's own environment that Work gets too, with its value here
    /// (repeatable; comma-separated in the environment). ROTA_AMQP_* never.
    #[arg(
        long = "work-env-pass",
        env = "ROTA_WORK_ENV_PASS",
        value_delimiter = ','
    )]
    pub work_env_pass: Vec<String>,

    /// Where the workers' Chromium lives (passed on to worker processes and containers).
    #[command(flatten)]
    pub chromium: ChromiumArgs,

    #[command(flatten)]
    pub docker: DockerConfig,
}

/// The containers of `docker` workers. The defaults are the hardened ones.
#[derive(Debug, Clone, Args)]
pub struct DockerConfig {
    /// The worker image (built by deploy/images/worker/build.sh); its entrypoint is a worker runtime.
    #[arg(
        long = "docker-image",
        env = "ROTA_DOCKER_IMAGE",
        default_value = "rota-worker:latest"
    )]
    pub image: String,

    /// The containers' network. `none` (the default): no network at all. The name of a Docker
    /// network (`docker network create …`): Work reaches what it routes to, the host's services
    /// that listen on every address among them (through its gateway). `host`: the host's own
    /// network, loopback included; Work then reaches the broker as the host does (on the
    /// set-up's broker, guest is an administrator), every local service, and the DevTools
    /// ports of other workers' Chromiums: only for Work you trust as much as the agent.
    #[arg(long = "docker-network", env = "ROTA_DOCKER_NETWORK", value_parser = Network::parse, default_value = "none")]
    pub network: Network,

    /// The user the runtime runs as in the container (uid:gid). When the agent runs as root
    /// it gives each job's folder to this user; alias folders must be writable by it.
    #[arg(
        long = "docker-user",
        env = "ROTA_DOCKER_USER",
        default_value = "65534:65534"
    )]
    pub user: String,

    /// Memory of a container in MiB, swap included (0: no limit).
    #[arg(
        long = "docker-memory-mib",
        env = "ROTA_DOCKER_MEMORY_MIB",
        default_value_t = 512
    )]
    pub memory_mib: u64,

    /// CPUs a container may use, e.g. 0.5 or 2 (0: no limit).
    #[arg(long = "docker-cpus", env = "ROTA_DOCKER_CPUS", default_value_t = 1.0)]
    pub cpus: f64,

    /// Processes and threads a container may have at once (0: no limit).
    #[arg(
        long = "docker-pids-limit",
        env = "ROTA_DOCKER_PIDS_LIMIT",
        default_value_t = 256
    )]
    pub pids_limit: u32,

    /// Size of the container's writable /tmp (a tmpfs), in MiB.
    #[arg(
        long = "docker-tmp-mib",
        env = "ROTA_DOCKER_TMP_MIB",
        default_value_t = 64
    )]
    pub tmp_mib: u64,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            image: "rota-worker:latest".into(),
            network: Network::None,
            user: "65534:65534".into(),
            memory_mib: 512,
            cpus: 1.0,
            pids_limit: 256,
            tmp_mib: 64,
        }
    }
}

impl DockerConfig {
    /// The uid and gid of `--docker-user`.
    pub fn uid_gid(&self) -> anyhow::Result<(u32, u32)> {
        let ids = self
            .user
            .split_once(':')
            .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
        ids.ok_or_else(|| {
            anyhow::anyhow!(
                "--docker-user must be a numeric uid:gid (e.g. 65534:65534), not {:?}",
                self.user
            )
        })
    }
}

impl AgentConfig {
    /// The `worker-runtime` to start: the configured one, else the one beside this program.
    pub fn worker_runtime_path(&self) -> PathBuf {
        self.worker_runtime.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join("worker-runtime")))
                .unwrap_or_else(|| PathBuf::from("worker-runtime"))
        })
    }

    /// This agent's own data folder.
    /// The most jobs held from RabbitMQ at once (see `--prefetch`).
    pub fn prefetch(&self) -> u16 {
        let held = self.prefetch.unwrap_or(self.pool_max_size);
        u16::try_from(held).unwrap_or(u16::MAX)
    }

    pub fn agent_dir(&self) -> PathBuf {
        self.data_dir.join(format!("agent-{}", self.id))
    }

    /// Checks what clap cannot; the message says what to change.
    pub fn check(&self) -> anyhow::Result<()> {
        rota_common::wire::AgentId::new(&self.id).map_err(anyhow::Error::msg)?;
        for q in &self.queues {
            rota_common::names::check_name("queue", q).map_err(anyhow::Error::msg)?;
        }
        if self.pool_max_size == 0 || self.pool_max_size > u16::MAX as usize {
            anyhow::bail!("--pool-max-size must be between 1 and {}", u16::MAX);
        }
        if let Some(prefetch) = self.prefetch
            && !(self.pool_max_size..=u16::MAX as usize).contains(&prefetch)
        {
            anyhow::bail!(
                "--prefetch ({prefetch}) must be between --pool-max-size ({}) and {}: with fewer, \
                 workers would wait for jobs that RabbitMQ holds back",
                self.pool_max_size,
                u16::MAX
            );
        }
        if self.pool_min_size > self.pool_max_size {
            anyhow::bail!(
                "--pool-min-size ({}) is larger than --pool-max-size ({})",
                self.pool_min_size,
                self.pool_max_size
            );
        }
        if self.worker_location == Location::Docker {
            self.docker.uid_gid()?;
        }
        if self.default_timeout > self.max_job_timeout {
            anyhow::bail!("--default-timeout is longer than --max-job-timeout");
        }
        WorkEnv::check(&self.work_env, &self.work_env_pass)?;
        self.chromium.check()
    }

    /// The environment of this pool's Work (see `--work-env`).
    pub fn work_env(&self) -> anyhow::Result<WorkEnv> {
        WorkEnv::build(&self.work_env, &self.work_env_pass)
    }
}
