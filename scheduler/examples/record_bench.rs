//! The scheduler alone: preloads N no-op results into the results queue of a namespace of its
//! own, starts `scheduler run` with nothing else running, and reports how fast it records them
//! (start-up included, until the last receipt), its memory and its store's bytes per job.
//! Each `--scheduler` given is measured in turn, in the order given, so that two builds are
//! compared side by side in one run.
//!
//! ```text
//! cargo run --release -p rota-scheduler --example record_bench -- \
//!     --scheduler old/scheduler --scheduler target/release/scheduler --results 1000000
//! ```

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::Utc;
use clap::Parser;
use futures::StreamExt;
use rota_common::Names;
use rota_common::amqp::{Broker, ConsumeSpec, Props, QueueSpec, Startup, Topology};
use rota_common::wire::{AgentId, AgentMessage, Job, JobId, JobResult, LogLine, Status};
use serde_json::Value;
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
struct Args {
    /// A `scheduler` binary to measure (several: each in turn).
    #[arg(long, required = true)]
    scheduler: Vec<PathBuf>,
    /// How many results to preload.
    #[arg(long, default_value_t = 10_000)]
    results: usize,
    /// At most this many results wait in RabbitMQ: the rest are published as the first ones
    /// are receipted (so a run of a million does not load the broker with all of them).
    #[arg(long, default_value_t = 50_000)]
    window: usize,
    /// Debug log lines per result (a no-op `demo.echo` logs one).
    #[arg(long, default_value_t = 1)]
    logs: usize,
    /// Keep the scheduler's data folder here (with one `--scheduler`), e.g. to time a restart
    /// on a large store; otherwise it is a temporary folder, removed after the run.
    #[arg(long)]
    keep_data: Option<PathBuf>,
    /// Where the scheduler's log goes (nowhere unless set).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Extra arguments for `scheduler run` (e.g. `--store-cache-mib=16`).
    #[arg(long, allow_hyphen_values = true)]
    extra: Vec<String>,
    #[arg(
        long,
        env = "ROTA_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for (i, scheduler) in args.scheduler.iter().enumerate() {
        eprintln!("measuring {}", scheduler.display());
        run(&args, scheduler, i).await?;
    }
    Ok(())
}

/// Measures one `scheduler` binary in a namespace of its own (the `i`th of this run).
async fn run(args: &Args, scheduler: &Path, i: usize) -> anyhow::Result<()> {
    let namespace = format!("recbench{}x{i}", std::process::id());
    let names = Names::new(&namespace).map_err(anyhow::Error::msg)?;
    let receipts = names.private_queue("bench.receipts", "agent");
    let mut topology = Topology::core(&names);
    topology.queue(QueueSpec::private(receipts.clone()));
    let broker =
        Broker::connect(&args.amqp_url, "record_bench", topology, Startup::FailFast).await?;
    let outcome = measure(args, scheduler, &names, &broker, &receipts).await;
    // Everything the scheduler declares (the receipts queue is auto-deleted).
    let shared = Topology::scheduler(&names);
    for queue in shared.queue_names() {
        let _ = broker.delete_queue(queue).await;
    }
    for exchange in shared.exchange_names() {
        let _ = broker.delete_exchange(exchange).await;
    }
    broker.close().await;
    outcome
}

/// Publishes `n` no-op results whose receipts go to `receipts`, one per permit of `room`.
async fn publish(
    broker: Broker,
    names: Names,
    receipts: String,
    n: usize,
    logs: usize,
    room: Arc<Semaphore>,
) -> anyhow::Result<()> {
    let queue = names.results();
    let mut sending = futures::stream::FuturesUnordered::new();
    for _ in 0..n {
        room.acquire().await?.forget();
        let body = serde_json::to_vec(&no_op_result(logs))?;
        let props = Props {
            reply_to: Some(receipts.clone()),
            ..Props::default()
        };
        let (broker, queue) = (broker.clone(), queue.clone());
        sending.push(async move { broker.publish("", &queue, &body, &props).await });
        while sending.len() >= 1024 {
            sending.next().await.transpose()?;
        }
    }
    while let Some(sent) = sending.next().await {
        sent?;
    }
    Ok(())
}

async fn measure(
    args: &Args,
    scheduler: &Path,
    names: &Names,
    broker: &Broker,
    receipts: &str,
) -> anyhow::Result<()> {
    let loaded = Instant::now();
    let preload = args.results.min(args.window);
    let room = Arc::new(Semaphore::new(preload));
    let (logs, receipts_queue) = (args.logs, receipts.to_owned());
    publish(
        broker.clone(),
        names.clone(),
        receipts_queue.clone(),
        preload,
        logs,
        room.clone(),
    )
    .await?;
    eprintln!(
        "preloaded {preload} results in {:.1} s",
        loaded.elapsed().as_secs_f64()
    );
    let rest = tokio::spawn(publish(
        broker.clone(),
        names.clone(),
        receipts_queue,
        args.results - preload,
        logs,
        room.clone(),
    ));

    // Removed when dropped, at the end of the run (unless the data is kept).
    let temporary;
    let data = match &args.keep_data {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temporary = tempfile::tempdir()?;
            temporary.path().to_owned()
        }
    };
    let mut receipted = broker
        .consume(ConsumeSpec {
            queues: vec![receipts.to_owned()],
            tag: "record-bench".into(),
            prefetch: 1000,
            exclusive: true,
            no_ack: false,
        })
        .await?;
    let start = Instant::now();
    let mut child = tokio::process::Command::new(scheduler)
        .arg("run")
        .arg("--data-dir")
        .arg(&data)
        .arg("--retention=0s")
        .args(&args.extra)
        .env("ROTA_NAMESPACE", names.namespace())
        .env("ROTA_AMQP_URL", &args.amqp_url)
        // The preloaded results come from this program's user, not an agent's: one user for
        // every part, as `deploy/bench.sh` runs them.
        .env("ROTA_TRUST_ANY_USER", "1")
        // Its own default logging, as deployed.
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(match &args.log {
            Some(path) => std::fs::File::create(path)?.into(),
            None => Stdio::null(),
        })
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", scheduler.display()))?;
    let pid = child.id().context("the scheduler has no pid")?;
    let (mut runs, mut first) = (0usize, None);
    let mut peak_rss = 0;
    let mut last_report = Instant::now();
    while runs < args.results {
        let d = tokio::select! {
            d = tokio::time::timeout(Duration::from_secs(60), receipted.recv()) => d,
            status = child.wait() => bail!("the scheduler ended early: {status:?}"),
        };
        let Ok(Some(d)) = d else {
            bail!("no receipt for 60 s after {runs} of {}", args.results);
        };
        let message = AgentMessage::parse(&d.body).map_err(anyhow::Error::msg)?;
        let n = message.receipted().len();
        runs += n;
        room.add_permits(n);
        first.get_or_insert_with(Instant::now);
        d.ack().await;
        if last_report.elapsed() > Duration::from_secs(1) {
            peak_rss = peak_rss.max(rss_kib(pid));
            last_report = Instant::now();
            if args.results >= 100_000 {
                eprintln!(
                    "{runs} receipted, {:.0}/s, RSS {} MiB",
                    runs as f64 / start.elapsed().as_secs_f64(),
                    rss_kib(pid) / 1024
                );
            }
        }
    }
    let took = start.elapsed();
    rest.await??;
    let from_first = first.map_or(took, |f| f.elapsed());
    let rss = rss_kib(pid);
    peak_rss = peak_rss.max(rss);
    // SIGTERM: the scheduler stops cleanly and its store is complete on disk.
    let _ = nix_kill(pid);
    let _ = child.wait().await;
    let store = dir_bytes(&data.join("scheduler/store"));
    let work = dir_bytes(&data.join("scheduler/work"));
    println!(
        "{}: {} results: {:.0} results/s from start ({:.2} s), {:.0}/s from the first receipt; \
         RSS {} MiB at the end (peak seen {} MiB); store {} bytes/job, job folders {} bytes/job",
        scheduler.display(),
        args.results,
        args.results as f64 / took.as_secs_f64(),
        took.as_secs_f64(),
        args.results as f64 / from_first.as_secs_f64(),
        rss / 1024,
        peak_rss / 1024,
        store / args.results as u64,
        work / args.results as u64,
    );
    Ok(())
}

fn no_op_result(logs: usize) -> JobResult {
    let uuid = JobId::random();
    let mut job = Job::new("demo.echo", Value::Null);
    job.uuid = Some(uuid);
    let now = Utc::now();
    JobResult {
        uuid,
        attempt: 1,
        work_type: job.work_type.clone(),
        agent: AgentId::new("bench-agent").expect("a valid id"),
        worker: "local-0".into(),
        status: Status::Succeeded,
        error: None,
        output: Value::Null,
        logs: (0..logs)
            .map(|i| LogLine {
                time: now,
                level: rota_common::wire::Level::Debug,
                message: format!("line {i}"),
            })
            .collect(),
        logs_dropped: 0,
        started_at: now,
        finished_at: now,
        job,
    }
}

/// The resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn nix_kill(pid: u32) -> std::io::Result<std::process::ExitStatus> {
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
}

/// The bytes on disk of everything under `dir` (allocated blocks, as `du` counts).
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => m.blocks() * 512 + dir_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}
