//! The `scheduler` command line: `run` the scheduler, the `demo`, the `bench`mark, and the
//! client commands that talk to a running scheduler over RPC (each with `--json`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use rota_common::amqp::host_and_vhost;
use rota_common::client::Client;
use rota_common::config::{BrokerArgs, parse_duration};
use rota_common::roles::UserRole;
use rota_common::users::{self, Management, UserSpec};
use rota_common::wire::{
    AgentInfo, AttemptLogs, EventKind, Job, JobId, JobRecord, JobState, Limit, LimitInfo,
    LimitKind, LimitScope, MissedPolicy, OnFailure, Rate, Role, RpcReply, RpcRequest, ScheduleInfo,
    ScheduleSpec, Status,
};
use serde_json::Value;

use crate::SchedulerConfig;
use crate::bench::BenchArgs;
use crate::demo::DemoArgs;

/// Rota's scheduler, and the command line to talk to it.
///
/// Every flag can also be set in the environment (ROTA_…) or in a TOML file given with
/// --config (keys are the flag names).
#[derive(Debug, Parser)]
#[command(name = "scheduler", version)]
pub struct Cli {
    /// A TOML file of settings (flags and environment variables take precedence).
    #[arg(long, env = "ROTA_CONFIG", global = true)]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the scheduler until SIGINT or SIGTERM.
    Run(SchedulerConfig),
    /// Runs a scheduler and a pool agent in this process and pushes a mix of demo Work
    /// through them; exits 0 if every job ended as expected.
    Demo(Box<DemoArgs>),
    /// Pushes N no-op jobs through a running scheduler and agent and prints throughput,
    /// latency and memory figures.
    Bench(BenchArgs),
    /// Submits a job to the running scheduler.
    Submit(SubmitArgs),
    /// Submits a group: its jobs run as usual, and its callback once every one of them has
    /// ended, with their outcomes in its `inputs`. Prints the uuids, the callback's last.
    SubmitGroup {
        /// The callback, as TYPE or TYPE:JSON (its payload).
        #[arg(long, value_parser = job_spec)]
        callback: Job,
        /// What a member that ends other than succeeded does to the callback: run it anyway
        /// (with the member's state in its inputs), or fail it without running it.
        #[arg(long, default_value = "run")]
        on_failure: OnFailure,
        /// The members, each as TYPE or TYPE:JSON.
        #[arg(required = true, value_parser = job_spec)]
        jobs: Vec<Job>,
        #[arg(long)]
        json: bool,
    },
    /// Submits a chain: each job runs once the one before it succeeded, with its outcome in
    /// its `inputs`; when one ends otherwise, the rest end cancelled. Prints the uuids.
    SubmitChain {
        /// The jobs in order, each as TYPE or TYPE:JSON.
        #[arg(required = true, value_parser = job_spec)]
        jobs: Vec<Job>,
        #[arg(long)]
        json: bool,
    },
    /// Shows what the scheduler knows of a job.
    Status {
        uuid: JobId,
        #[arg(long)]
        json: bool,
    },
    /// Cancels a job: a running one is stopped (`cancelled`), a queued or scheduled one is
    /// not run.
    Cancel {
        uuid: JobId,
        #[arg(long)]
        json: bool,
    },
    /// Prints the log lines of every run of a job.
    Logs {
        uuid: JobId,
        #[arg(long)]
        json: bool,
    },
    /// Lists jobs, newest first.
    List {
        /// Only jobs in this state (scheduled, throttled, queued, running, succeeded, failed,
        /// crashed, timed_out, cancelled, rejected, dead, expired, superseded).
        #[arg(long)]
        status: Option<JobState>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Lists the scheduler and the pool agents seen through their heartbeats.
    Agents {
        #[arg(long)]
        json: bool,
    },
    /// Pauses a queue: every pool agent stops taking its jobs (running ones finish), which
    /// wait in RabbitMQ until `resume`. Survives restarts; pausing a paused queue is no error.
    Pause {
        queue: String,
        #[arg(long)]
        json: bool,
    },
    /// Resumes a paused queue: agents take its jobs again.
    Resume {
        queue: String,
        #[arg(long)]
        json: bool,
    },
    /// Runs a job that ended without success (dead, failed, …) once more, as a new attempt.
    Retry {
        uuid: JobId,
        #[arg(long)]
        json: bool,
    },
    /// Time-based schedules: add, list, pause, resume, remove, run-now.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Rate and concurrency limits across every agent: set, clear. A job a limit applies to
    /// is published by the scheduler when the limit allows, and waits `throttled` until then.
    #[command(subcommand)]
    Limit(LimitCommand),
    /// Lists the limits, with the jobs each one holds waiting and running, by value.
    Limits {
        #[arg(long)]
        json: bool,
    },
    /// Creates (or brings up to date) one broker user per role, producer, scheduler, agent
    /// and viewer, with the permissions of its role over the namespace, through RabbitMQ's
    /// management API. Idempotent: an existing user keeps its password unless one is given; a
    /// new one without a given password gets a generated one, printed once.
    SetupUsers(SetupUsersArgs),
}

#[derive(Debug, Subcommand)]
pub enum LimitCommand {
    /// Sets a limit (what is not given stays as it was; survives restarts). A rate holds
    /// per work type or per value of a label (each customer its own); a concurrency is the
    /// most jobs of one value running at once.
    Set {
        #[command(flatten)]
        scope: ScopeArgs,
        /// At most N jobs started per interval: `10/1s`, `100/1m`, `5/500ms`.
        #[arg(long)]
        rate: Option<Rate>,
        /// At most N jobs running at once.
        #[arg(long)]
        concurrency: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Clears a limit (only its rate or its concurrency, when given); the jobs it holds go on.
    Clear {
        #[command(flatten)]
        scope: ScopeArgs,
        /// Only the rate.
        #[arg(long, conflicts_with = "concurrency")]
        rate: bool,
        /// Only the concurrency.
        #[arg(long)]
        concurrency: bool,
        #[arg(long)]
        json: bool,
    },
}

/// What a limit applies to.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ScopeArgs {
    /// The jobs of this work type.
    #[arg(long)]
    work_type: Option<String>,
    /// The jobs with this label key, each value on its own (e.g. `customer`).
    #[arg(long)]
    label: Option<String>,
}

impl ScopeArgs {
    fn scope(self) -> LimitScope {
        match (self.work_type, self.label) {
            (Some(t), _) => LimitScope::WorkType(t),
            (None, Some(key)) => LimitScope::Label(key),
            (None, None) => unreachable!("clap requires one of them"),
        }
    }
}

#[derive(Debug, Args)]
pub struct SetupUsersArgs {
    /// RabbitMQ's management API (default: http://HOST:15672, with the host of --amqp-url).
    #[arg(long, env = "ROTA_MANAGEMENT_URL")]
    pub management_url: Option<String>,
    /// An administrator of the broker.
    #[arg(long, env = "ROTA_ADMIN_USER", default_value = "rota-admin")]
    pub admin_user: String,
    /// The administrator's password (better in the environment than on a command line).
    #[arg(long, env = "ROTA_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: String,
    /// Only these roles (default: all four).
    #[arg(long = "role", value_enum)]
    pub roles: Vec<UserRole>,
    /// The viewer's user name (the others are the first of --producer-users,
    /// --scheduler-users and --agent-users).
    #[arg(long, env = "ROTA_VIEWER_USER", default_value = "rota-viewer")]
    pub viewer_user: String,
    #[arg(long, env = "ROTA_PRODUCER_PASSWORD", hide_env_values = true)]
    pub producer_password: Option<String>,
    #[arg(long, env = "ROTA_SCHEDULER_PASSWORD", hide_env_values = true)]
    pub scheduler_password: Option<String>,
    #[arg(long, env = "ROTA_AGENT_PASSWORD", hide_env_values = true)]
    pub agent_password: Option<String>,
    #[arg(long, env = "ROTA_VIEWER_PASSWORD", hide_env_values = true)]
    pub viewer_password: Option<String>,
    /// Grant the permissions over every namespace this regular expression matches, not
    /// --namespace alone (e.g. "t-[0-9a-f]{10}" for the tests' namespaces).
    #[arg(long)]
    pub namespaces: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Adds a schedule that submits a job at each time its cron expression names.
    Add(ScheduleAddArgs),
    /// Lists the schedules with their last and next fire times.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stops firing the schedule until it is resumed.
    Pause {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Fires the schedule again from now on (what came due while paused does not run).
    Resume {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Removes the schedule (one of the config file comes back at the next start, unless it is
    /// removed from the file too).
    Remove {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Submits the schedule's job now; prints its uuid.
    RunNow {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct ScheduleAddArgs {
    /// The schedule's name.
    pub name: String,
    /// Five fields (minute hour day-of-month month day-of-week), or six with seconds first,
    /// e.g. "0 5 * * Mon-Fri".
    #[arg(long)]
    pub cron: String,
    /// The time zone the expression is read in (an IANA name).
    #[arg(long, default_value = "UTC")]
    pub tz: String,
    /// The work type of the jobs it submits.
    #[arg(long = "type")]
    pub work_type: String,
    /// The jobs' payload, as JSON.
    #[arg(long)]
    pub payload: Option<String>,
    #[arg(long)]
    pub queue: Option<String>,
    #[arg(long)]
    pub priority: Option<u8>,
    #[arg(long)]
    pub timeout_s: Option<u64>,
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Fire times missed while the scheduler was down: skip them, or run-once for them all.
    #[arg(long, default_value = "skip")]
    pub missed: MissedPolicy,
    /// Do not start a job while the previous one with this key is not over.
    #[arg(long)]
    pub unique_key: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The work type, e.g. demo.echo.
    #[arg(long = "type")]
    pub work_type: String,
    /// The payload, as JSON.
    #[arg(long)]
    pub payload: Option<String>,
    /// The job's uuid (default: a new one). Submitting a uuid again returns the first job.
    #[arg(long)]
    pub uuid: Option<JobId>,
    /// The jobs queue (default: default).
    #[arg(long)]
    pub queue: Option<String>,
    /// 0 to 9; higher runs first.
    #[arg(long)]
    pub priority: Option<u8>,
    /// How long the Work may run, in seconds (default: the agent's).
    #[arg(long)]
    pub timeout_s: Option<u64>,
    /// Runs it this long from now (the scheduler holds it as `scheduled` until then).
    #[arg(long, value_parser = parse_duration, conflicts_with = "at")]
    pub delay: Option<Duration>,
    /// Runs it at this time (RFC 3339, e.g. 2026-11-23T05:00:00Z or 2026-11-23T06:00:00+01:00).
    #[arg(long, value_parser = parse_time)]
    pub at: Option<DateTime<Utc>>,
    /// Attempts in all: a run that fails, crashes or times out is retried until then
    /// (default: the scheduler's).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// The wait before the first retry; it doubles with each one (default: the scheduler's).
    #[arg(long, value_parser = parse_duration)]
    pub backoff: Option<Duration>,
    /// While a job with this key is scheduled, queued or running, returns that job instead of
    /// submitting another.
    #[arg(long)]
    pub unique_key: Option<String>,
    /// With --unique-key: the key stays held this long after the job ends (e.g. 1h: not more
    /// than once an hour).
    #[arg(long, value_parser = parse_duration, conflicts_with = "debounce")]
    pub unique_for: Option<Duration>,
    /// With --unique-key: holds the job this long; a newer one with the key submitted
    /// meanwhile replaces it (it ends `superseded`), so only the last of a burst runs.
    #[arg(long, value_parser = parse_duration)]
    pub debounce: Option<Duration>,
    /// Not started by this time (RFC 3339), the job ends `expired` without running.
    #[arg(long, value_parser = parse_time)]
    pub expires_at: Option<DateTime<Utc>>,
    /// Not started this long after the scheduler accepts it, the job ends `expired`.
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Waits until the job is over (retries included) and prints it; exits non-zero unless it
    /// succeeded.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub wait_timeout: Duration,
    #[arg(long)]
    pub json: bool,
}

/// `scheduler setup-users`: makes the users and prints what it made.
pub async fn setup_users(broker: &BrokerArgs, args: SetupUsersArgs) -> anyhow::Result<ExitCode> {
    let first = broker.amqp_url();
    let first = first.split(',').next().unwrap_or_default();
    let (host, vhost) = host_and_vhost(first).map_err(anyhow::Error::msg)?;
    let management = args
        .management_url
        .clone()
        .unwrap_or_else(|| format!("http://{host}:15672"));
    let api = Management::new(&management, &args.admin_user, &args.admin_password)?;
    let names = broker.names()?;
    let namespaces = args
        .namespaces
        .clone()
        .unwrap_or_else(|| users::exactly(names.namespace()));
    let roles = &broker.roles;
    let first_of = |list: &[String], role: UserRole| {
        list.first().cloned().unwrap_or_else(|| role.default_user())
    };
    let specs: Vec<UserSpec> = UserRole::ALL
        .into_iter()
        .filter(|r| args.roles.is_empty() || args.roles.contains(r))
        .map(|role| {
            let (name, password) = match role {
                UserRole::Producer => (
                    first_of(&roles.producer_users, role),
                    &args.producer_password,
                ),
                UserRole::Scheduler => (
                    first_of(&roles.scheduler_users, role),
                    &args.scheduler_password,
                ),
                UserRole::Agent => (first_of(&roles.agent_users, role), &args.agent_password),
                UserRole::Viewer => (args.viewer_user.clone(), &args.viewer_password),
            };
            UserSpec {
                role,
                name,
                password: password.clone(),
            }
        })
        .collect();
    let made = users::setup(&api, &vhost, &namespaces, &specs).await?;
    let json: Vec<Value> = made
        .iter()
        .map(|m| {
            serde_json::json!({
                "role": m.role.as_str(),
                "user": m.name,
                "created": m.created,
                "password": m.generated,
                "configure": m.permissions.configure,
                "write": m.permissions.write,
                "read": m.permissions.read,
            })
        })
        .collect();
    print(args.json, &json, || {
        println!(
            "users of namespace {namespaces:?} in virtual host {:?} (management API {management}):",
            vhost
        );
        for m in &made {
            let what = match (&m.generated, m.created) {
                (Some(password), _) => {
                    format!("created, password {password} (shown once: keep it)")
                }
                (None, true) => "created with the given password".to_owned(),
                (None, false)
                    if specs
                        .iter()
                        .any(|s| s.name == m.name && s.password.is_some()) =>
                {
                    "updated, password set".to_owned()
                }
                (None, false) => "updated, password kept".to_owned(),
            };
            println!("  {:<9} {:<16} {what}", m.role.as_str(), m.name);
            println!(
                "            configure {}\n            write     {}\n            read      {}",
                m.permissions.configure, m.permissions.write, m.permissions.read
            );
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Runs a client command; returns the process exit code.
pub async fn client_command(broker: &BrokerArgs, command: Command) -> anyhow::Result<ExitCode> {
    let client = Client::connect(&broker.amqp_url(), broker.names()?, "scheduler-cli").await?;
    let code = match command {
        Command::Submit(args) => submit(&client, args).await?,
        Command::SubmitGroup {
            callback,
            on_failure,
            jobs,
            json,
        } => {
            let records = client
                .submit_group(jobs, callback, Some(on_failure))
                .await?;
            print_uuids(json, &records)?;
            ExitCode::SUCCESS
        }
        Command::SubmitChain { jobs, json } => {
            let records = client.submit_chain(jobs).await?;
            print_uuids(json, &records)?;
            ExitCode::SUCCESS
        }
        Command::Status { uuid, json } => {
            let record = client.status(uuid).await?;
            print(json, &record, || print_record(&record))?;
            ExitCode::SUCCESS
        }
        Command::Cancel { uuid, json } => {
            let RpcReply::Job { job } = client.call(&RpcRequest::Cancel { uuid }).await? else {
                bail!("unexpected reply from the scheduler");
            };
            print(json, &job, || {
                println!("cancel requested for job {uuid} ({})", job.state)
            })?;
            ExitCode::SUCCESS
        }
        Command::Logs { uuid, json } => {
            let attempts = all_logs(&client, uuid).await?;
            print(json, &attempts, || {
                for a in &attempts {
                    println!("--- attempt {} ---", a.attempt);
                    a.lines.iter().for_each(|l| println!("{l}"));
                }
            })?;
            ExitCode::SUCCESS
        }
        Command::List {
            status,
            limit,
            json,
        } => {
            let jobs = list(&client, status, limit).await?;
            print(json, &jobs, || print_jobs(&jobs))?;
            ExitCode::SUCCESS
        }
        Command::Agents { json } => {
            let RpcReply::Agents { agents } = client.call(&RpcRequest::Agents).await? else {
                bail!("unexpected reply from the scheduler");
            };
            print(json, &agents, || print_agents(&agents))?;
            ExitCode::SUCCESS
        }
        Command::Pause { queue, json } => pause(&client, queue, true, json).await?,
        Command::Resume { queue, json } => pause(&client, queue, false, json).await?,
        Command::Retry { uuid, json } => {
            let RpcReply::Job { job } = client.call(&RpcRequest::Retry { uuid }).await? else {
                bail!("unexpected reply from the scheduler");
            };
            print(json, &job, || {
                println!("job {uuid} queued again as attempt {}", job.job.attempt)
            })?;
            ExitCode::SUCCESS
        }
        Command::Schedule(command) => schedule(&client, command).await?,
        Command::Limit(command) => limit(&client, command).await?,
        Command::Limits { json } => {
            let limits = expect_limits(client.call(&RpcRequest::Limits).await?)?;
            print(json, &limits, || print_limits(&limits))?;
            ExitCode::SUCCESS
        }
        Command::Run(_) | Command::Demo(_) | Command::Bench(_) | Command::SetupUsers(_) => {
            unreachable!("not a client command")
        }
    };
    client.close().await;
    Ok(code)
}

/// Pauses or resumes a queue, and says what changed.
async fn pause(
    client: &Client,
    queue: String,
    pause: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let request = if pause {
        RpcRequest::Pause {
            queue: queue.clone(),
        }
    } else {
        RpcRequest::Resume {
            queue: queue.clone(),
        }
    };
    let RpcReply::Paused {
        queues, changed, ..
    } = client.call(&request).await?
    else {
        bail!("unexpected reply from the scheduler");
    };
    let reply = serde_json::json!({"queue": queue, "paused": pause, "changed": changed, "paused_queues": queues});
    print(json, &reply, || {
        match (pause, changed) {
            (true, true) => println!(
                "queue {queue} paused: agents take none of its jobs until `scheduler resume {queue}`"
            ),
            (true, false) => println!("queue {queue} was paused already"),
            (false, true) => println!("queue {queue} resumed"),
            (false, false) => println!("queue {queue} was not paused"),
        }
        println!("paused queues: {}", listed(&queues));
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Sets or clears a limit, and prints the limits.
async fn limit(client: &Client, command: LimitCommand) -> anyhow::Result<ExitCode> {
    let (request, json) = match command {
        LimitCommand::Set {
            scope,
            rate,
            concurrency,
            json,
        } => {
            if rate.is_none() && concurrency.is_none() {
                bail!("give --rate N/INTERVAL, --concurrency N or both");
            }
            let limit = Limit {
                scope: scope.scope(),
                rate,
                concurrency,
            };
            (RpcRequest::SetLimit { limit }, json)
        }
        LimitCommand::Clear {
            scope,
            rate,
            concurrency,
            json,
        } => {
            let kind = match (rate, concurrency) {
                (true, _) => Some(LimitKind::Rate),
                (_, true) => Some(LimitKind::Concurrency),
                _ => None,
            };
            let scope = scope.scope();
            (RpcRequest::ClearLimit { scope, kind }, json)
        }
    };
    let limits = expect_limits(client.call(&request).await?)?;
    print(json, &limits, || print_limits(&limits))?;
    Ok(ExitCode::SUCCESS)
}

fn expect_limits(reply: RpcReply) -> anyhow::Result<Vec<LimitInfo>> {
    match reply {
        RpcReply::Limits { limits } => Ok(limits),
        _ => bail!("unexpected reply from the scheduler"),
    }
}

/// One row per limit and kind, and per value holding jobs.
fn print_limits(limits: &[LimitInfo]) {
    if limits.is_empty() {
        return println!("no limits are set");
    }
    println!(
        "{:<32}  {:<11}  {:<10}  {:<24}  {:>7}  {:>7}",
        "LIMIT", "KIND", "VALUE", "FOR", "WAITING", "RUNNING"
    );
    for info in limits {
        let kinds = [
            info.limit.rate.map(|r| ("rate", r.to_string())),
            info.limit
                .concurrency
                .map(|n| ("concurrency", n.to_string())),
        ];
        for (kind, value) in kinds.into_iter().flatten() {
            let scope = info.limit.scope.to_string();
            if info.values.is_empty() {
                println!(
                    "{scope:<32}  {kind:<11}  {value:<10}  {:<24}  {:>7}  {:>7}",
                    "-", 0, 0
                );
            }
            for usage in &info.values {
                let running = if kind == "concurrency" {
                    usage.running.to_string()
                } else {
                    "-".into()
                };
                println!(
                    "{scope:<32}  {kind:<11}  {value:<10}  {:<24}  {:>7}  {running:>7}",
                    info.limit.scope.with_value(&usage.value),
                    usage.waiting
                );
            }
        }
    }
}

/// Names separated by commas, or `none`.
fn listed(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(",")
    }
}

/// Log lines asked for per page (the scheduler also keeps each page under its byte budget).
const LOG_PAGE: usize = 10_000;

/// Every log line of job `uuid`, read page by page.
async fn all_logs(client: &Client, uuid: JobId) -> anyhow::Result<Vec<AttemptLogs>> {
    let mut all: Vec<AttemptLogs> = Vec::new();
    let mut cursor = None;
    loop {
        let request = RpcRequest::Logs {
            uuid,
            cursor: cursor.take(),
            limit: Some(LOG_PAGE),
        };
        let RpcReply::Logs { attempts, next, .. } = client.call(&request).await? else {
            bail!("unexpected reply from the scheduler");
        };
        for page in attempts {
            match all.last_mut() {
                // An attempt whose lines span two pages.
                Some(last) if last.attempt == page.attempt => last.lines.extend(page.lines),
                _ => all.push(page),
            }
        }
        match next {
            Some(next) => cursor = Some(next),
            None => return Ok(all),
        }
    }
}

/// Up to `limit` jobs, newest first, read page by page.
async fn list(
    client: &Client,
    state: Option<JobState>,
    limit: usize,
) -> anyhow::Result<Vec<JobRecord>> {
    let mut all = Vec::new();
    let mut cursor = None;
    while all.len() < limit {
        let request = RpcRequest::List {
            state,
            limit: Some(limit - all.len()),
            cursor: cursor.take(),
        };
        let RpcReply::Jobs { jobs, next } = client.call(&request).await? else {
            bail!("unexpected reply from the scheduler");
        };
        all.extend(jobs);
        match next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(all)
}

async fn submit(client: &Client, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let mut job = Job::new(args.work_type, payload(args.payload.as_deref())?);
    let uuid = args.uuid.unwrap_or_else(JobId::random);
    job.uuid = Some(uuid);
    job.queue = args.queue;
    job.priority = args.priority;
    job.timeout_s = args.timeout_s;
    job.max_attempts = args.max_attempts;
    job.backoff_ms = args.backoff.map(|b| b.as_millis() as u64);
    job.unique_key = args.unique_key;
    job.unique_for_s = args.unique_for.map(whole_seconds);
    job.debounce_s = args.debounce.map(whole_seconds);
    job.expires_at = args.expires_at;
    job.ttl_s = args.ttl.map(whole_seconds);
    job.run_at = match (args.delay, args.at) {
        (Some(delay), _) => Some(Utc::now() + chrono::Duration::from_std(delay)?),
        (None, at) => at,
    };
    // Listen before submitting, so the finished event cannot slip past.
    let mut events = if args.wait {
        Some(client.watch(&[EventKind::Finished]).await?)
    } else {
        None
    };
    let mut record = client.submit(job).await?;
    // A unique key may have returned another job: follow that one.
    let uuid = record.uuid;
    if let Some(events) = events.as_mut()
        && !record.state.is_final()
    {
        let wait = async {
            while let Some(event) = events.next().await {
                // Over unless a retry follows (`state` is absent from older schedulers).
                if event.uuid == uuid && event.state.is_none_or(JobState::is_final) {
                    return true;
                }
            }
            false
        };
        match tokio::time::timeout(args.wait_timeout, wait).await {
            Ok(true) => record = client.status(uuid).await?,
            _ => bail!(
                "job {uuid} did not finish within {:?}; `scheduler status {uuid}` shows where it is",
                args.wait_timeout
            ),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else if args.wait {
        print_record(&record);
    } else {
        println!("{uuid}");
    }
    Ok(if !args.wait || record.state == JobState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A job of a group or a chain on the command line: `TYPE` or `TYPE:JSON` (its payload);
/// its uuid is chosen here, so that the command can be repeated safely.
fn job_spec(text: &str) -> Result<Job, String> {
    let (work_type, payload) = match text.split_once(':') {
        Some((t, json)) => (
            t,
            serde_json::from_str(json)
                .map_err(|e| format!("the payload of {t:?} is not valid JSON: {e}"))?,
        ),
        None => (text, Value::Null),
    };
    let mut job = Job::new(work_type, payload);
    job.uuid = Some(JobId::random());
    job.check()?;
    Ok(job)
}

/// Prints the records of a group or a chain: their uuids, one a line, or the records.
fn print_uuids(json: bool, records: &[JobRecord]) -> anyhow::Result<()> {
    print(json, &records, || {
        for r in records {
            println!("{}  {}  {}", r.uuid, r.job.work_type, r.state);
        }
    })
}

/// A duration option in whole seconds, as the job carries it (rounded up: at least 1).
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The `--payload` of a job or schedule: JSON, or null when not given.
fn payload(text: Option<&str>) -> anyhow::Result<Value> {
    text.map_or(Ok(Value::Null), |text| {
        serde_json::from_str(text).map_err(|e| anyhow::anyhow!("--payload is not valid JSON: {e}"))
    })
}

async fn schedule(client: &Client, command: ScheduleCommand) -> anyhow::Result<ExitCode> {
    let (request, json) = match command {
        ScheduleCommand::Add(args) => {
            let spec = ScheduleSpec {
                name: args.name,
                cron: args.cron,
                tz: args.tz,
                missed: args.missed,
                work_type: args.work_type,
                payload: payload(args.payload.as_deref())?,
                queue: args.queue,
                priority: args.priority,
                timeout_s: args.timeout_s,
                max_attempts: args.max_attempts,
                unique_key: args.unique_key,
            };
            (RpcRequest::ScheduleAdd { schedule: spec }, args.json)
        }
        ScheduleCommand::List { json } => (RpcRequest::ScheduleList, json),
        ScheduleCommand::Pause { name, json } => (RpcRequest::SchedulePause { name }, json),
        ScheduleCommand::Resume { name, json } => (RpcRequest::ScheduleResume { name }, json),
        ScheduleCommand::Remove { name, json } => (RpcRequest::ScheduleRemove { name }, json),
        ScheduleCommand::RunNow { name, json } => (RpcRequest::ScheduleRunNow { name }, json),
    };
    let removing = matches!(request, RpcRequest::ScheduleRemove { .. });
    match client.call(&request).await? {
        RpcReply::Schedules { schedules } => {
            print(json, &schedules, || print_schedules(&schedules))?
        }
        RpcReply::Schedule { schedule } if removing => print(json, &schedule, || {
            println!("schedule {} removed", schedule.spec.name)
        })?,
        RpcReply::Schedule { schedule } => print(json, &schedule, || {
            print_schedules(std::slice::from_ref(&schedule))
        })?,
        RpcReply::Job { job } => print(json, &job, || println!("{}", job.uuid))?,
        other => bail!("unexpected reply from the scheduler: {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Parses an RFC 3339 time for `--at`.
fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            format!("{e}: write the time as RFC 3339, e.g. 2026-11-23T05:00:00Z or 2026-11-23T06:00:00+01:00")
        })
}

fn print_schedules(schedules: &[ScheduleInfo]) {
    println!(
        "{:<20}  {:<18}  {:<16}  {:<18}  {:<8}  {:<8}  {:<20}  NEXT FIRE",
        "NAME", "CRON", "TZ", "TYPE", "MISSED", "STATE", "LAST FIRE"
    );
    let time = |t: Option<DateTime<Utc>>| {
        t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "-".into())
    };
    for s in schedules {
        println!(
            "{:<20}  {:<18}  {:<16}  {:<18}  {:<8}  {:<8}  {:<20}  {}",
            s.spec.name,
            s.spec.cron,
            s.spec.tz,
            s.spec.work_type,
            s.spec.missed.as_str(),
            if s.paused { "paused" } else { "active" },
            time(s.last_job.and(s.last_fire)),
            time(s.next_fire)
        );
    }
}

fn print<T: serde::Serialize>(json: bool, value: &T, human: impl FnOnce()) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        human();
    }
    Ok(())
}

fn print_record(r: &JobRecord) {
    println!("job {}  {}  {}", r.uuid, r.job.work_type, r.state);
    println!(
        "  queue {}, priority {}, created {}, {} attempt(s) of {}",
        r.job.queue_name(),
        r.job.priority.unwrap_or(0),
        r.created_at.format("%Y-%m-%d %H:%M:%S%.3f"),
        r.attempts.len(),
        r.job
            .max_attempts
            .map_or_else(|| "the default".to_owned(), |m| m.to_string())
    );
    if let Some(at) = r.next_run_at {
        println!("  runs at {}", at.format("%Y-%m-%d %H:%M:%S%.3f UTC"));
    }
    if let Some(schedule) = &r.job.schedule {
        let at = r.job.run_at.map(|t| t.to_rfc3339()).unwrap_or_default();
        println!("  fired by schedule {schedule} for {at}");
    }
    if let Some(parent) = r.job.parent {
        println!("  parent: {parent}");
    }
    if let Some(key) = &r.job.unique_key {
        println!("  unique key: {key}");
    }
    if let Some(at) = r.job.expires_at {
        println!("  deadline {}", at.format("%Y-%m-%d %H:%M:%S%.3f UTC"));
    }
    if let Some(reason) = &r.reason {
        println!("  {}: {reason}", r.state);
    }
    if !r.job.after.is_empty() {
        let policy = r.job.on_failure.unwrap_or_default().as_str();
        println!(
            "  waits for {} job(s) (on failure: {policy}); {} ended:",
            r.job.after.len(),
            r.job.inputs.len()
        );
        for u in &r.job.after {
            match r.job.inputs.iter().find(|i| i.uuid == *u) {
                Some(i) => println!("    {u}  {}", i.state),
                None if r.waiting_for.contains(u) => println!("    {u}  (not ended)"),
                None => println!("    {u}"),
            }
        }
    } else if !r.waiting_for.is_empty() {
        println!(
            "  its Work ended; waits for {} of its children: {}",
            r.waiting_for.len(),
            r.waiting_for
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for a in &r.attempts {
        let status = a.status.map(Status::as_str).unwrap_or("running");
        let took = match (a.started_at, a.finished_at) {
            (Some(s), Some(f)) => format!(", {:.3} s", (f - s).num_milliseconds() as f64 / 1000.0),
            _ => String::new(),
        };
        let agent = a.agent.as_ref().map(|x| x.to_string()).unwrap_or_default();
        println!(
            "  attempt {}: {status} on {agent} {}{took}, {} log line(s)",
            a.attempt,
            a.worker.as_deref().unwrap_or(""),
            a.log_lines
        );
        if let Some(e) = &a.error {
            println!("    error ({}): {}", e.kind, e.message);
        }
        if !a.output.is_null() {
            println!("    output: {}", a.output);
        }
    }
    if !r.children.is_empty() {
        println!("  children ({}):", r.children.len());
        for c in &r.children {
            println!("    {c}");
        }
    }
    println!("  folder: {}", r.dir);
}

fn print_jobs(jobs: &[JobRecord]) {
    println!(
        "{:<36}  {:<18}  {:<10}  {:>8}  UPDATED",
        "UUID", "TYPE", "STATE", "ATTEMPTS"
    );
    for j in jobs {
        println!(
            "{:<36}  {:<18}  {:<10}  {:>8}  {}",
            j.uuid.to_string(),
            j.job.work_type,
            j.state.as_str(),
            j.attempts.len(),
            j.updated_at.format("%Y-%m-%d %H:%M:%S")
        );
    }
}

/// The parts, and the queues each one pauses: for the scheduler every paused queue, for an
/// agent those of its queues it takes no job from.
fn print_agents(agents: &[AgentInfo]) {
    println!(
        "{:<9}  {:<20}  {:<16}  {:>7}  {:<5}  {:<20}  {:<16}  {:>7}  {:>11}  PAUSED",
        "ROLE", "ID", "HOST", "PID", "ALIVE", "LAST SEEN", "POOL", "RUNNING", "UNRECEIPTED"
    );
    for a in agents {
        let hb = &a.heartbeat;
        let pool = hb
            .pools
            .iter()
            .map(|p| format!("{} {}/{}", p.location, p.busy, p.max))
            .collect::<Vec<_>>()
            .join(" ");
        let paused = hb.paused.as_ref().map_or(&[][..], |p| &p.queues[..]);
        println!(
            "{:<9}  {:<20}  {:<16}  {:>7}  {:<5}  {:<20}  {:<16}  {:>7}  {:>11}  {}",
            if hb.role == Role::Scheduler {
                "scheduler"
            } else {
                "agent"
            },
            hb.id,
            hb.host,
            hb.pid,
            if a.alive { "yes" } else { "LOST" },
            a.last_seen.format("%Y-%m-%d %H:%M:%S"),
            pool,
            hb.running.len(),
            hb.unreceipted,
            listed(paused)
        );
    }
}
