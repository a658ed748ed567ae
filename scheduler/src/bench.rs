//! `scheduler bench`: pushes N no-op jobs (`demo.echo`) through a running scheduler and pool
//! agent and prints jobs/s end to end (first publish to last result recorded), the latency
//! from submitting a job to its `job.finished` event (which the scheduler publishes once the
//! result is recorded), and the peak memory of each Rota process on this host. The jobs go
//! all at once (by default), at a set rate (`--rate`), one at a time (`--one-at-a-time`), or
//! are queued first and drained once told to start (`--drain`). All at once and paced, it
//! then asks the scheduler about the slowest 1% of the jobs and says where their time went.
//! `deploy/bench.sh compare` runs each mode beside Celery and the broker alone, reading the
//! `--json` line.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, ValueEnum};
use futures::StreamExt;
use rota_common::client::{Client, Events, short_host};
use rota_common::config::{BrokerArgs, parse_duration};
use rota_common::wire::{EventKind, Job, JobId, RpcReply, RpcRequest, Status};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// Publish straight to the jobs exchange, as services do.
    Direct,
    /// Submit through the scheduler's RPC (recorded before it is queued).
    Rpc,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// How many jobs.
    #[arg(long, default_value_t = 10_000)]
    pub jobs: usize,
    /// Jobs being submitted at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    #[arg(long, value_enum, default_value_t = Via::Direct)]
    pub via: Via,
    /// Submits at this many jobs per second instead of all at once, to measure latency
    /// without a backlog.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Submits each job once the one before has finished: the round trip of a lone job.
    #[arg(long, conflicts_with_all = ["rate", "drain"])]
    pub one_at_a_time: bool,
    /// Queues every job first, then waits for a line on standard input (sent once a pool
    /// agent is started) and times the drain from that line to the last result recorded.
    #[arg(long, conflicts_with = "rate")]
    pub drain: bool,
    /// Jobs run one at a time before the measure, and not counted.
    #[arg(long, default_value_t = 0, conflicts_with = "drain")]
    pub warm_up: usize,
    /// Prints the figures as one line of JSON.
    #[arg(long)]
    pub json: bool,
    /// Gives up when the jobs have not all finished by then.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    pub timeout: Duration,
}

/// The jobs submitted and not finished yet, with when each was submitted (and by the clock).
type Sent = Arc<Mutex<HashMap<JobId, (Instant, DateTime<Utc>)>>>;

/// What one measure gives.
struct Measured {
    /// From the first submit (or the start line of `--drain`) to the last result recorded.
    elapsed: Duration,
    /// Sorted.
    latencies: Vec<Duration>,
    failed: usize,
    /// The slowest 1% of the jobs (up to [`SLOWEST`]) when each was submitted and when its
    /// `job.finished` came (none for the one-at-a-time and drain measures).
    slowest: Vec<Timed>,
}

/// A job's submit and `job.finished`, by the clock.
struct Timed {
    uuid: JobId,
    submitted: DateTime<Utc>,
    seen: DateTime<Utc>,
}

/// At most this many of the slowest jobs are looked up.
const SLOWEST: usize = 100;

pub async fn run(broker: &BrokerArgs, args: BenchArgs) -> anyhow::Result<ExitCode> {
    let client = Arc::new(Client::connect(&broker.amqp_url(), broker.names()?, "bench").await?);
    let mut events = client.watch(&[EventKind::Finished]).await?;
    let sent: Sent = Arc::default();
    let measured = tokio::time::timeout(args.timeout, measure(&client, &mut events, &sent, &args));
    let Ok(measured) = measured.await else {
        let missing: Vec<String> = sent
            .lock()
            .map(|s| s.keys().take(3).map(|id| id.to_string()).collect())
            .unwrap_or_default();
        bail!(
            "{} of {} jobs did not finish within {:?} (for example {}); `scheduler status UUID` \
             tells where one is",
            sent.lock().map(|s| s.len()).unwrap_or(0),
            args.jobs,
            args.timeout,
            missing.join(", ")
        );
    };
    let Measured {
        elapsed,
        latencies,
        failed,
        slowest,
    } = measured?;
    let stages = stages(&client, &slowest).await.unwrap_or_else(|e| {
        eprintln!("cannot look up the slowest jobs' records, so no breakdown of them: {e:#}");
        None
    });

    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).max(1) - 1;
        latencies.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    let jobs_per_s = args.jobs as f64 / elapsed.as_secs_f64();
    let peaks = peak_rss(&client).await;
    let mode = if args.one_at_a_time {
        "one_at_a_time"
    } else if args.drain {
        "drain"
    } else if args.rate.is_some() {
        "paced"
    } else {
        "at_once"
    };
    if args.json {
        let peaks: Vec<_> = peaks
            .iter()
            .map(|(what, pid, kib)| json!({ "part": what, "pid": pid, "peak_rss_kib": kib }))
            .collect();
        println!(
            "{}",
            json!({
                "mode": mode,
                "via": format!("{:?}", args.via).to_lowercase(),
                "jobs": args.jobs,
                "failed": failed,
                "seconds": elapsed.as_secs_f64(),
                "jobs_per_s": jobs_per_s,
                "p50_ms": pct(0.50),
                "p99_ms": pct(0.99),
                "max_ms": pct(1.0),
                "slowest_1pct_median_ms": stages.map(|[to_start, run, to_stored, to_seen]| json!({
                    "submit_to_start": to_start,
                    "run": run,
                    "finish_to_stored": to_stored,
                    "stored_to_seen": to_seen,
                })),
                "peak_rss": peaks,
            })
        );
    } else {
        let how = match mode {
            "at_once" => String::new(),
            other => format!(", {}", other.replace('_', " ")),
        };
        println!(
            "jobs:        {} via {:?} ({} failed){how}",
            args.jobs, args.via, failed
        );
        let from = if args.drain {
            "the start line"
        } else {
            "first submit"
        };
        println!(
            "throughput:  {jobs_per_s:.0} jobs/s end to end ({:.2} s from {from} to last result \
             recorded)",
            elapsed.as_secs_f64()
        );
        println!(
            "latency:     p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (submit → result recorded)",
            pct(0.50),
            pct(0.99),
            pct(1.0)
        );
        if let Some([to_start, run, to_stored, to_seen]) = stages {
            println!(
                "slowest 1%:  submit → start {to_start:.1} ms, run {run:.1}, finish → stored \
                 {to_stored:.1}, stored → synced and seen here {to_seen:.1} (medians over {} \
                 jobs)",
                slowest.len()
            );
        }
        for (what, pid, kib) in &peaks {
            match kib {
                Some(kib) => println!(
                    "peak RSS:    {:>7.1} MiB  {what} (pid {pid})",
                    *kib as f64 / 1024.0
                ),
                None => println!("peak RSS:    unknown for {what} (pid {pid})"),
            }
        }
    }
    client.close().await;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs the warm-up, then the measure `args` asks for.
async fn measure(
    client: &Arc<Client>,
    events: &mut Events,
    sent: &Sent,
    args: &BenchArgs,
) -> anyhow::Result<Measured> {
    for i in 0..args.warm_up {
        round_trip(client, events, args.via, i).await?;
    }
    if args.one_at_a_time {
        let start = Instant::now();
        let mut latencies = Vec::with_capacity(args.jobs);
        let mut failed = 0;
        for i in 0..args.jobs {
            let (latency, succeeded) = round_trip(client, events, args.via, i).await?;
            latencies.push(latency);
            failed += usize::from(!succeeded);
        }
        latencies.sort();
        return Ok(Measured {
            elapsed: start.elapsed(),
            latencies,
            failed,
            slowest: Vec::new(),
        });
    }

    let mut start = Instant::now();
    let mut submitter = Some(tokio::spawn(submit_all(
        client.clone(),
        sent.clone(),
        args.clone(),
    )));
    if args.drain {
        if let Some(queued) = submitter.take() {
            queued
                .await
                .context("the submitter panicked")?
                .context("a job could not be queued")?;
        }
        eprintln!(
            "queued {} jobs; the drain is timed from the next line on standard input",
            args.jobs
        );
        let mut line = String::new();
        tokio::io::BufReader::new(tokio::io::stdin())
            .read_line(&mut line)
            .await
            .context("cannot read standard input")?;
        start = Instant::now();
        if let Ok(mut s) = sent.lock() {
            s.values_mut().for_each(|t| *t = (start, Utc::now()));
        }
    }

    let mut timed: Vec<(Duration, Timed)> = Vec::with_capacity(args.jobs);
    let mut failed = 0usize;
    // A job that could not be submitted never finishes: stop at the first such error.
    while timed.len() < args.jobs {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { bail!("lost the connection to RabbitMQ") };
                let Some((t0, submitted)) = sent.lock().ok().and_then(|mut s| s.remove(&event.uuid)) else {
                    continue;
                };
                let seen = Utc::now();
                timed.push((t0.elapsed(), Timed { uuid: event.uuid, submitted, seen }));
                failed += usize::from(event.status != Some(Status::Succeeded));
            }
            done = async { submitter.as_mut().expect("checked").await }, if submitter.is_some() => {
                submitter = None;
                done.context("the submitter panicked")?.context("a job could not be submitted")?;
            }
        }
    }
    let elapsed = start.elapsed();
    timed.sort_by_key(|(latency, _)| *latency);
    let latencies = timed.iter().map(|(latency, _)| *latency).collect();
    let slowest = if args.drain {
        Vec::new()
    } else {
        let n = timed.len().div_ceil(100).min(SLOWEST);
        timed.drain(..).rev().take(n).map(|(_, t)| t).collect()
    };
    Ok(Measured {
        elapsed,
        latencies,
        failed,
        slowest,
    })
}

/// Where the time of the slowest jobs went, from their records: the median over them of each
/// stage, in ms: submitted → started by a worker → finished → written into the scheduler's
/// store (its `updated_at`) → `job.finished` seen here (the store's group commit, then the
/// event's way back). By this host's clock and the agent's and the scheduler's (one clock
/// when all run here). None when there is nothing to look up.
async fn stages(client: &Client, slowest: &[Timed]) -> anyhow::Result<Option<[f64; 4]>> {
    let mut by_stage: [Vec<f64>; 4] = Default::default();
    for t in slowest {
        let record = client.status(t.uuid).await?;
        let Some(attempt) = record.attempts.last() else {
            continue;
        };
        let (Some(started), Some(finished)) = (attempt.started_at, attempt.finished_at) else {
            continue;
        };
        let ms = |from: DateTime<Utc>, to: DateTime<Utc>| {
            (to - from).num_microseconds().unwrap_or(0) as f64 / 1e3
        };
        let times = [
            ms(t.submitted, started),
            ms(started, finished),
            ms(finished, record.updated_at),
            ms(record.updated_at, t.seen),
        ];
        for (stage, v) in by_stage.iter_mut().zip(times) {
            stage.push(v);
        }
    }
    if by_stage[0].is_empty() {
        return Ok(None);
    }
    Ok(Some(by_stage.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    })))
}

/// Submits `args.jobs` jobs, `args.concurrency` at once (paced by `args.rate`), noting in
/// `sent` when each went.
async fn submit_all(client: Arc<Client>, sent: Sent, args: BenchArgs) -> anyhow::Result<()> {
    let paced_start = tokio::time::Instant::now();
    futures::stream::iter(0..args.jobs)
        .map(|i| {
            let (client, sent) = (client.clone(), sent.clone());
            async move {
                if let Some(rate) = args.rate.filter(|r| *r > 0.0) {
                    tokio::time::sleep_until(
                        paced_start + Duration::from_secs_f64(i as f64 / rate),
                    )
                    .await;
                }
                let (uuid, job) = no_op(i);
                if let Ok(mut s) = sent.lock() {
                    s.insert(uuid, (Instant::now(), Utc::now()));
                }
                submit(&client, args.via, job).await
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .fold(
            Ok(()),
            |acc: anyhow::Result<()>, r| async move { acc.and(r) },
        )
        .await
}

/// Submits one job and waits for its `job.finished` event: the time it took, and whether
/// the job succeeded.
async fn round_trip(
    client: &Client,
    events: &mut Events,
    via: Via,
    i: usize,
) -> anyhow::Result<(Duration, bool)> {
    let (uuid, job) = no_op(i);
    let t0 = Instant::now();
    submit(client, via, job).await?;
    loop {
        let Some(event) = events.next().await else {
            bail!("lost the connection to RabbitMQ")
        };
        if event.uuid == uuid {
            return Ok((t0.elapsed(), event.status == Some(Status::Succeeded)));
        }
    }
}

/// The `i`-th no-op job, with its id.
fn no_op(i: usize) -> (JobId, Job) {
    let mut job = Job::new("demo.echo", json!({ "i": i }));
    let uuid = JobId::random();
    job.uuid = Some(uuid);
    (uuid, job)
}

async fn submit(client: &Client, via: Via, job: Job) -> anyhow::Result<()> {
    match via {
        Via::Direct => client
            .publish_job(job)
            .await
            .map(|_| ())
            .map_err(Into::into),
        Via::Rpc => client.submit(job).await.map(|_| ()),
    }
}

/// Each live Rota process on this host (as "Role id"), with its pid and peak resident set
/// size in KiB (None when unreadable).
async fn peak_rss(client: &Client) -> Vec<(String, u32, Option<u64>)> {
    let Ok(RpcReply::Agents { agents }) = client.call(&RpcRequest::Agents).await else {
        return Vec::new();
    };
    let host = short_host();
    agents
        .iter()
        .filter(|a| a.alive && a.heartbeat.host == host)
        .map(|a| {
            let hb = &a.heartbeat;
            (
                format!("{:?} {}", hb.role, hb.id),
                hb.pid,
                peak_rss_kib(hb.pid),
            )
        })
        .collect()
}

/// The peak resident set size of a process (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
