//! `scheduler bench`: pushes N no-op jobs (`demo.echo`) through a running scheduler and pool
//! agent and prints jobs/s end to end (first publish to last result recorded), the latency
//! from submitting a job to its `job.finished` event (which the scheduler publishes once the
//! result is recorded), and the peak memory of each Rota process on this host.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use futures::StreamExt;
use rota_common::client::{Client, short_host};
use rota_common::config::{BrokerArgs, parse_duration};
use rota_common::wire::{EventKind, Job, JobId, RpcReply, RpcRequest, Status};
use serde_json::json;

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
    /// Gives up when the jobs have not all finished by then.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    pub timeout: Duration,
}

pub async fn run(broker: &BrokerArgs, args: BenchArgs) -> anyhow::Result<ExitCode> {
    let client = Arc::new(Client::connect(&broker.amqp_url, broker.names()?, "bench").await?);
    let mut events = client.watch(&[EventKind::Finished]).await?;
    let sent: Arc<Mutex<HashMap<JobId, Instant>>> = Arc::default();

    let start = Instant::now();
    let paced_start = tokio::time::Instant::now();
    let submitter = {
        let (client, sent) = (client.clone(), sent.clone());
        tokio::spawn(async move {
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
                        let mut job = Job::new("demo.echo", json!({ "i": i }));
                        let uuid = JobId::random();
                        job.uuid = Some(uuid);
                        if let Ok(mut s) = sent.lock() {
                            s.insert(uuid, Instant::now());
                        }
                        match args.via {
                            Via::Direct => client
                                .publish_job(job)
                                .await
                                .map(|_| ())
                                .map_err(anyhow::Error::from),
                            Via::Rpc => client.submit(job).await.map(|_| ()),
                        }
                    }
                })
                .buffer_unordered(args.concurrency.max(1))
                .fold(
                    Ok(()),
                    |acc: anyhow::Result<()>, r| async move { acc.and(r) },
                )
                .await
        })
    };

    let mut latencies: Vec<Duration> = Vec::with_capacity(args.jobs);
    let mut failed = 0usize;
    let wait = async {
        // A job that could not be submitted never finishes: stop at the first such error.
        let mut submitter = Some(submitter);
        while latencies.len() < args.jobs {
            tokio::select! {
                event = events.next() => {
                    let Some(event) = event else { bail!("lost the connection to RabbitMQ") };
                    let Some(t0) = sent.lock().ok().and_then(|mut s| s.remove(&event.uuid)) else {
                        continue;
                    };
                    latencies.push(t0.elapsed());
                    if event.status != Some(Status::Succeeded) {
                        failed += 1;
                    }
                }
                done = async { submitter.as_mut().expect("checked").await }, if submitter.is_some() => {
                    submitter = None;
                    done.context("the submitter panicked")?.context("a job could not be submitted")?;
                }
            }
        }
        Ok(())
    };
    if let Ok(waited) = tokio::time::timeout(args.timeout, wait).await {
        waited?;
    } else {
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
    }
    let elapsed = start.elapsed();

    latencies.sort();
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    println!(
        "jobs:        {} via {:?} ({} failed)",
        args.jobs, args.via, failed
    );
    println!(
        "throughput:  {:.0} jobs/s end to end ({:.2} s from first submit to last result recorded)",
        args.jobs as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "latency:     p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (submit → result recorded)",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        pct(1.0).as_secs_f64() * 1e3
    );
    if let Ok(RpcReply::Agents { agents }) = client.call(&RpcRequest::Agents).await {
        let host = short_host();
        for a in agents
            .iter()
            .filter(|a| a.alive && a.heartbeat.host == host)
        {
            let hb = &a.heartbeat;
            match peak_rss_kib(hb.pid) {
                Some(kib) => println!(
                    "peak RSS:    {:>7.1} MiB  {:?} {} (pid {})",
                    kib as f64 / 1024.0,
                    hb.role,
                    hb.id,
                    hb.pid
                ),
                None => println!(
                    "peak RSS:    unknown for {:?} {} (pid {})",
                    hb.role, hb.id, hb.pid
                ),
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

/// The peak resident set size of a process (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
