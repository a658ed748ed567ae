//! How much Rota's `chromium.pdf` costs over the floor: the same page rendered to PDF by a
//! bare chromiumoxide program, then by Rota's Work on a worker's browser (the code a `local`
//! worker runs, without the broker), then (with `--through ALIAS_DIR`) end to end: submitted
//! to a running scheduler and agent through RabbitMQ (ROTA_AMQP_URL, ROTA_NAMESPACE), one
//! job at a time, each timed from submit to its `job.finished` event. For each: the first PDF,
//! browser start included, and then the PDF of a warm browser. `deploy/bench.sh chromium`
//! runs all three.
//!
//!   cargo run --release -p rota-worker-runtime --example chromium_bench -- [PDFS] [--through DIR]
//!
//! The page builds a table with JavaScript and calls `window.rotaReady()` at once, so the
//! figures are rendering and overhead, not waiting.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chromiumoxide::cdp::browser_protocol::page::{
    AddScriptToEvaluateOnNewDocumentParams, PrintToPdfParams,
};
use chromiumoxide::{Browser, BrowserConfig};
use futures::StreamExt;
use rota_common::wire::{EventKind, Job, JobId, Role, Status};
use rota_worker_runtime::chromium::{Chromium, ChromiumArgs};
use rota_worker_runtime::context::BufferSink;
use rota_worker_runtime::{Aliases, Context, Registry};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const PAGE: &str = r#"<!doctype html><html><head><title>Bench report</title></head><body>
<h1>Bench report</h1><table id="t"></table><script>
const rows = Array.from({length: 50}, (_, i) => `<tr><td>row ${i}</td><td>${i * i}</td></tr>`);
document.getElementById("t").innerHTML = rows.join("");
setTimeout(() => window.rotaReady({rows: rows.length}), 0);
</script></body></html>"#;

const READY_SCRIPT: &str = r#"(() => { let r; const p = new Promise((x) => { r = x; });
Object.defineProperty(window, "__ready", { value: p }); window.rotaReady = (v) => r(v ?? null); })();"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pdfs: usize = args.first().map(|n| n.parse()).transpose()?.unwrap_or(20);
    let through = args
        .iter()
        .position(|a| a == "--through")
        .and_then(|i| args.get(i + 1));
    let url = rota_worker_runtime::demo::serve_page(PAGE, "127.0.0.1")?;
    let dir = tempfile::tempdir()?;
    println!("{pdfs} PDFs of {url} each way; {}", version());

    match through {
        Some(alias_dir) => {
            let times = broker(&url, pdfs, alias_dir).await?;
            report("Rota end to end", &times);
        }
        None => {
            let times = bare(&url, pdfs, dir.path()).await?;
            report("bare chromiumoxide", &times);
            let times = rota(&url, pdfs, dir.path()).await?;
            report("Rota chromium.pdf", &times);
        }
    }
    Ok(())
}

/// Through a running scheduler and agent (whose `out` alias is `alias_dir`): one job at a
/// time, from submit to the scheduler's `job.finished` event.
async fn broker(url: &str, pdfs: usize, _alias_dir: &str) -> anyhow::Result<Vec<Duration>> {
    let amqp = std::env::var("ROTA_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let ns = std::env::var("ROTA_NAMESPACE").unwrap_or_else(|_| "rota".into());
    let names = rota_common::Names::new(&ns).map_err(anyhow::Error::msg)?;
    let client = rota_common::client::Client::connect(&amqp, names, "chromium-bench").await?;
    let mut events = client.watch(&[EventKind::Finished]).await?;
    // An agent's heartbeat: it is connected and its worker is warm (its browser is not).
    let mut beats = client.heartbeats().await?;
    while beats
        .next()
        .await
        .ok_or_else(|| anyhow::anyhow!("lost the broker"))?
        .role
        != Role::Agent
    {}
    let mut times = Vec::new();
    for i in 0..pdfs {
        let mut job = Job::new(
            "chromium.pdf",
            json!({"url": url, "output": format!("out/e2e-{i}.pdf"), "wait_for_ready": true}),
        );
        let uuid = JobId::random();
        job.uuid = Some(uuid);
        let start = Instant::now();
        client.submit(job).await?;
        loop {
            let event = events
                .next()
                .await
                .ok_or_else(|| anyhow::anyhow!("lost the broker"))?;
            if event.uuid == uuid {
                anyhow::ensure!(
                    event.status == Some(Status::Succeeded),
                    "job {uuid}: {:?}",
                    event.status
                );
                break;
            }
        }
        times.push(start.elapsed());
    }
    client.close().await;
    Ok(times)
}

/// The floor: launch, then per PDF a page, the ready promise, the PDF, the file, close.
async fn bare(url: &str, pdfs: usize, dir: &std::path::Path) -> anyhow::Result<Vec<Duration>> {
    let profile = dir.join("bare-profile");
    let start = Instant::now();
    let config = BrowserConfig::builder()
        .chrome_executable(on_path("chromium")?)
        .no_sandbox()
        .user_data_dir(&profile)
        .args([
            "--disable-gpu",
            "--disable-quic",
            "--disable-component-update",
            "--disable-sync",
        ])
        .build()
        .map_err(anyhow::Error::msg)?;
    let (mut browser, mut handler) = Browser::launch(config).await?;
    let driver = tokio::spawn(async move { while handler.next().await.is_some() {} });
    let mut times = Vec::new();
    let mut from = start;
    for i in 0..pdfs {
        let page = browser.new_page("about:blank").await?;
        page.execute(AddScriptToEvaluateOnNewDocumentParams::new(READY_SCRIPT))
            .await?;
        page.goto(url).await?;
        page.evaluate("window.__ready").await?;
        let pdf = page.pdf(PrintToPdfParams::default()).await?;
        tokio::fs::write(dir.join(format!("bare-{i}.pdf")), pdf).await?;
        page.close().await?;
        times.push(from.elapsed());
        from = Instant::now();
    }
    browser.close().await?;
    browser.wait().await?;
    driver.abort();
    Ok(times)
}

/// Rota's Work, as a `local` worker runs it: the worker's browser slot, a context per job.
async fn rota(url: &str, pdfs: usize, dir: &std::path::Path) -> anyhow::Result<Vec<Duration>> {
    let settings = ChromiumArgs {
        chromium_profile_root: Some(dir.to_owned()),
        // The page is served on this host's loopback.
        chromium_allow_hosts: vec!["127.0.0.1".into()],
        ..ChromiumArgs::default()
    };
    let chromium = Arc::new(Chromium::new(settings));
    let registry = Registry::with_builtins();
    let aliases = Arc::new(Aliases::parse(&[format!("out={}", dir.display())])?);
    let mut times = Vec::new();
    for i in 0..pdfs {
        let start = Instant::now();
        let mut job = Job::new(
            "chromium.pdf",
            json!({"url": url, "output": format!("out/rota-{i}.pdf"), "wait_for_ready": true}),
        );
        job.uuid = Some(JobId::random());
        let sink = Arc::new(BufferSink::new(|_| {}));
        let ctx = Context::new(
            job,
            dir.to_owned(),
            aliases.clone(),
            sink,
            CancellationToken::new(),
        )
        .with_chromium(chromium.clone());
        let outcome = rota_worker_runtime::run(
            &registry,
            ctx,
            Duration::from_secs(60),
            CancellationToken::new(),
        )
        .await;
        anyhow::ensure!(outcome.status == Status::Succeeded, "{outcome:?}");
        times.push(start.elapsed());
    }
    chromium.shutdown().await;
    Ok(times)
}

fn report(what: &str, times: &[Duration]) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut warm: Vec<f64> = times.iter().skip(1).map(|d| ms(*d)).collect();
    warm.sort_by(f64::total_cmp);
    let mean = warm.iter().sum::<f64>() / warm.len().max(1) as f64;
    let median = warm.get(warm.len() / 2).copied().unwrap_or(0.0);
    println!(
        "{what:<20} first PDF (cold browser) {:>7.0} ms   warm: median {median:>5.1} ms, mean {mean:>5.1} ms",
        times.first().map(|d| ms(*d)).unwrap_or(0.0)
    );
}

/// The full path of `program`, found on PATH (chromiumoxide wants one).
fn on_path(program: &str) -> anyhow::Result<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("{program} is not on PATH (deploy/setup.sh installs it)"))
}

fn version() -> String {
    std::process::Command::new("chromium")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
