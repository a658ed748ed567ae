//! `scheduler demo`: the whole system in one process (scheduler, pool agent, workers), talking
//! through RabbitMQ as it would across machines. It pushes a mix of the demo works, shows each
//! as it finishes, and prints a summary. Everything it writes goes under `./temp`: the
//! scheduler's folder, the pool's folder (with a folder per Work while it runs, kept
//! afterwards here), and `demodata`, the alias the `demo.write-file` jobs write to. With
//! `--chromium` it also serves a report page on 127.0.0.1 and has the pool render it to
//! `demodata/report.pdf` and `demodata/report.png` once the page says it is ready.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use rota_common::client::Client;
use rota_common::config::{BrokerArgs, parse_duration};
use rota_common::roles::Roles;
use rota_common::wire::{EventKind, Job, JobId, JobRecord, JobState};
use rota_pool_agent::AgentConfig;
use rota_pool_agent::config::{DockerConfig, Location, Network};
use rota_worker_runtime::chromium::{ChromiumArgs, Mode, host_address};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::SchedulerConfig;
use crate::archive::JobFolders;

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Where the pool's Workers run.
    #[arg(long, value_enum, default_value_t = Location::Local)]
    pub worker_location: Location,
    #[arg(long, default_value_t = 1)]
    pub pool_min_size: usize,
    #[arg(long, default_value_t = 2)]
    pub pool_max_size: usize,
    /// Empties the demo's folder first.
    #[arg(long)]
    pub clean: bool,
    /// How many jobs to push (a mix of every demo work type).
    #[arg(long, default_value_t = 12)]
    pub jobs: usize,
    /// The demo's folder.
    #[arg(long, default_value = "temp")]
    pub dir: PathBuf,
    /// Gives up when the jobs have not all finished by then.
    #[arg(long, value_parser = parse_duration, default_value = "2m")]
    pub timeout: Duration,
    /// The containers of `--worker-location docker`.
    #[command(flatten)]
    pub docker: DockerConfig,
    /// Also render a report page to PDF and PNG with Chromium (where Chromium lives: the
    /// --chromium-* settings).
    #[arg(long)]
    pub chromium: bool,
    #[command(flatten)]
    pub chromium_settings: ChromiumArgs,
}

/// The demo's report page: its content is built by JavaScript after a delay (as a report
/// that queries its data would), then it calls `window.rotaReady`.
const REPORT_PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Rota demo report</title>
<style>body { font-family: sans-serif; margin: 2em } td, th { border: 1px solid #999; padding: 4px 12px }
table { border-collapse: collapse }</style></head>
<body><h1>Rota demo report</h1><p id="status">Running the report...</p><table id="rows"></table>
<script>
setTimeout(() => {
  const rows = [["North", 120], ["South", 95], ["East", 143], ["West", 88]];
  document.getElementById("rows").innerHTML = "<tr><th>Region</th><th>Orders</th></tr>" +
    rows.map(([region, n]) => `<tr><td>${region}</td><td>${n}</td></tr>`).join("");
  const total = rows.reduce((sum, [, n]) => sum + n, 0);
  document.getElementById("status").textContent =
    `Report complete: ${total} orders in ${rows.length} regions.`;
  window.rotaReady({ regions: rows.length, orders: total });
}, 500);
</script></body></html>"#;

/// One demo job and how it should end.
struct Planned {
    job: Job,
    expect: JobState,
    /// A file that must exist afterwards, and what it must hold.
    file: Option<(PathBuf, Holds)>,
}

/// What a file written by a demo job must hold.
enum Holds {
    Text(String),
    /// A file that starts with these bytes (a PDF, a PNG).
    Magic(&'static [u8]),
}

impl Holds {
    fn found_in(&self, path: &std::path::Path) -> bool {
        let Ok(bytes) = std::fs::read(path) else {
            return false;
        };
        match self {
            Holds::Text(text) => bytes == text.as_bytes(),
            Holds::Magic(magic) => bytes.starts_with(magic),
        }
    }
}

/// The Chromium jobs: the report page as a PDF and as a PNG, each once it says it is ready.
fn plan_chromium(url: &str, demodata: &std::path::Path) -> Vec<Planned> {
    let pdf = json!({"url": url, "output": "demodata/report.pdf", "wait_for_ready": true});
    let png = json!({"url": url, "output": "demodata/report.png", "wait_for_ready": true,
        "width": 800, "height": 600});
    [
        ("chromium.pdf", pdf, "report.pdf", Holds::Magic(b"%PDF-")),
        (
            "chromium.screenshot",
            png,
            "report.png",
            Holds::Magic(b"\x89PNG"),
        ),
    ]
    .into_iter()
    .map(|(work_type, payload, file, holds)| {
        let mut job = Job::new(work_type, payload);
        job.uuid = Some(JobId::random());
        job.labels.insert("source".into(), "demo".into());
        Planned {
            job,
            expect: JobState::Succeeded,
            file: Some((demodata.join(file), holds)),
        }
    })
    .collect()
}

fn plan(n: usize, demodata: &std::path::Path) -> Vec<Planned> {
    (0..n)
        .map(|i| {
            let (work_type, payload, expect) = match i % 6 {
                0 => ("demo.echo", json!({"hello": "world", "n": i}), JobState::Succeeded),
                1 => ("demo.log", json!({"lines": 5}), JobState::Succeeded),
                2 => ("demo.sleep", json!({"ms": 300}), JobState::Succeeded),
                3 => ("demo.write-file", json!({"path": format!("demodata/hello-{i}.txt"), "text": format!("hello from job {i}\n")}), JobState::Succeeded),
                4 => ("demo.fail", json!({"message": format!("job {i} fails on purpose")}), JobState::Failed),
                _ => ("demo.panic", json!({"message": format!("job {i} panics on purpose")}), JobState::Crashed),
            };
            let file = (work_type == "demo.write-file").then(|| (demodata.join(format!("hello-{i}.txt")), Holds::Text(format!("hello from job {i}\n"))));
            let mut job = Job::new(work_type, payload);
            job.uuid = Some(JobId::random());
            job.labels.insert("source".into(), "demo".into());
            Planned { job, expect, file }
        })
        .collect()
}

pub async fn run(broker: &BrokerArgs, args: DemoArgs) -> anyhow::Result<ExitCode> {
    if args.clean && args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("cannot empty {}", args.dir.display()))?;
    }
    let dir = std::path::absolute(&args.dir)?;
    let demodata = dir.join("demodata");
    std::fs::create_dir_all(&demodata)?;
    // Every part runs in this process, as the one user of the URL: it trusts itself.
    let names = broker.names()?.with_roles(Roles::trust_any());

    let stop = CancellationToken::new();
    let sched_cfg = SchedulerConfig {
        data_dir: dir.clone(),
        heartbeat_interval: Duration::from_secs(2),
        http_addr: None,
        // The demo shows a folder for each Work, as the design describes.
        job_folders: JobFolders::Always,
        ..SchedulerConfig::default()
    };
    // Where the browser reaches the report page this process serves: on this host's
    // loopback, or at its address on the Docker network the browser is on.
    let network = match (&args.worker_location, &args.docker.network) {
        (Location::Docker, Network::Named(name)) => Some(name.clone()),
        (Location::Docker, _) => None,
        _ => (args.chromium_settings.chromium_mode == Mode::Docker)
            .then(|| args.chromium_settings.chromium_docker_network.clone()),
    };
    let page_host = match network {
        Some(name) if args.chromium => host_address(&name).await?,
        _ => "127.0.0.1".to_owned(),
    };
    let agent_cfg = AgentConfig {
        id: "demo".into(),
        worker_location: args.worker_location,
        pool_min_size: args.pool_min_size,
        pool_max_size: args.pool_max_size,
        prefetch: None,
        queues: vec!["default".into()],
        aliases: vec![format!("demodata={}", demodata.display())],
        data_dir: dir.clone(),
        default_timeout: Duration::from_secs(60),
        max_job_timeout: Duration::from_secs(3600),
        max_job_bytes: 1024 * 1024,
        heartbeat_interval: Duration::from_secs(2),
        http_addr: None,
        resend_interval: Duration::from_secs(10),
        receipt_timeout: Duration::from_secs(300),
        started_delay: Duration::from_millis(100),
        max_result_bytes: 8 * 1024 * 1024,
        shutdown_grace: Duration::from_secs(10),
        keep_work_dirs: true,
        worker_runtime: None,
        worker_max_jobs: 1000,
        worker_max_memory_mib: 1024,
        kill_grace: Duration::from_secs(5),
        docker: args.docker.clone(),
        work_env: Vec::new(),
        work_env_pass: Vec::new(),
        chromium: ChromiumArgs {
            // The demo's own report page.
            chromium_allow_hosts: vec![page_host.clone()],
            ..args.chromium_settings.clone()
        },
    };
    if args.worker_location == Location::Docker {
        // The containers run as another user, who writes the demo's files.
        let (uid, gid) = args.docker.uid_gid()?;
        if let Err(e) = std::os::unix::fs::chown(&demodata, Some(uid), Some(gid)) {
            eprintln!(
                "note: cannot give {} to the containers' user {uid}:{gid} ({e}); the demo.write-file jobs will fail",
                demodata.display()
            );
        }
    }
    let scheduler = tokio::spawn({
        let (url, names, stop) = (broker.amqp_url(), names.clone(), stop.clone());
        async move { crate::run(sched_cfg, &url, names, stop).await }
    });
    let agent = tokio::spawn({
        let (url, names, stop) = (broker.amqp_url(), names.clone(), stop.clone());
        async move {
            rota_pool_agent::run(
                agent_cfg,
                &url,
                names,
                rota_worker_runtime::Registry::with_builtins(),
                stop,
            )
            .await
        }
    });

    let outcome = drive(broker, &args, &page_host, &demodata, &dir).await;
    stop.cancel();
    let sched_result = scheduler.await.context("the scheduler task failed")?;
    let agent_result = agent.await.context("the pool agent task failed")?;
    sched_result.context("the scheduler stopped with an error")?;
    agent_result.context("the pool agent stopped with an error")?;
    outcome
}

async fn drive(
    broker: &BrokerArgs,
    args: &DemoArgs,
    page_host: &str,
    demodata: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let client = Client::connect(&broker.amqp_url(), broker.names()?, "demo").await?;
    let mut planned = plan(args.jobs, demodata);
    if args.chromium {
        let url = rota_worker_runtime::demo::serve_page(REPORT_PAGE, page_host)
            .context("cannot serve the demo's report page")?;
        planned.extend(plan_chromium(&url, demodata));
    }
    println!(
        "Rota demo: {} jobs through RabbitMQ at {} (namespace {:?}), pool of {}..{} {} workers; files under {}",
        planned.len(),
        client.broker().display_url(),
        client.names().namespace(),
        args.pool_min_size,
        args.pool_max_size,
        args.worker_location.as_str(),
        dir.display()
    );
    let mut events = client.watch(&[EventKind::Finished]).await?;
    let start = Instant::now();
    for p in &planned {
        client
            .submit(p.job.clone())
            .await
            .context("the scheduler refused a demo job")?;
    }
    let mut pending: HashMap<JobId, &Planned> = planned
        .iter()
        .filter_map(|p| Some((p.job.uuid?, p)))
        .collect();
    let total = planned.len();
    let deadline = tokio::time::sleep(args.timeout);
    tokio::pin!(deadline);
    while !pending.is_empty() {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { bail!("lost the connection to RabbitMQ") };
                if let Some(p) = pending.remove(&event.uuid) {
                    let status = event.status.map(|s| s.as_str()).unwrap_or("?");
                    println!("[{:>3}/{total}] {:<19} {:<10} on {}", total - pending.len(), p.job.work_type, status,
                        event.agent.map(|a| a.to_string()).unwrap_or_default());
                }
            }
            _ = &mut deadline => bail!("{} jobs did not finish within {:?}; is the pool agent stuck?", pending.len(), args.timeout),
        }
    }
    let elapsed = start.elapsed();
    let mut records: Vec<(&Planned, JobRecord)> = Vec::new();
    for p in &planned {
        let uuid = p.job.uuid.context("demo jobs have uuids")?;
        records.push((p, client.status(uuid).await?));
    }
    client.close().await;

    println!();
    println!(
        "{:<8}  {:<19}  {:<10}  {:<8}  {:>8}  {:<9}  FOLDER",
        "JOB", "TYPE", "STATUS", "EXPECTED", "SECONDS", "WORKER"
    );
    let mut ok = true;
    for (p, r) in &records {
        let file_ok = p
            .file
            .as_ref()
            .is_none_or(|(path, holds)| holds.found_in(path));
        let as_expected = r.state == p.expect && file_ok;
        ok &= as_expected;
        let worker = r
            .attempts
            .last()
            .and_then(|a| a.worker.clone())
            .unwrap_or_default();
        println!(
            "{:<8}  {:<19}  {:<10}  {:<8}  {:>8}  {:<9}  {}",
            &r.uuid.to_string()[..8],
            r.job.work_type,
            r.state.as_str(),
            if as_expected { "yes" } else { "NO" },
            r.duration_s()
                .map(|d| format!("{d:.3}"))
                .unwrap_or_default(),
            worker,
            r.dir
        );
    }
    println!();
    println!(
        "{} jobs in {:.2} s; pool folders under {}, files written through the alias in {}",
        records.len(),
        elapsed.as_secs_f64(),
        dir.join("agent-demo").join("work").display(),
        demodata.display()
    );
    if args.chromium {
        println!(
            "Chromium ({}) rendered the report page to {} and {}",
            args.chromium_settings.chromium_mode.as_str(),
            demodata.join("report.pdf").display(),
            demodata.join("report.png").display()
        );
    }
    if ok {
        println!("Every job ended as expected.");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("Some jobs did NOT end as expected (see the EXPECTED column).");
        Ok(ExitCode::FAILURE)
    }
}
