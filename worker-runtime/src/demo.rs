//! The built-in demo work types, one per thing a Work can do or suffer: return data, take
//! time, fail, panic, log, write a file through an alias, fail only at first, submit
//! child jobs.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Access, Context, Registry, Work};

pub fn register(r: &mut Registry) {
    r.register("demo.echo", Echo)
        .register("demo.sleep", Sleep)
        .register("demo.spin", Spin)
        .register("demo.fail", Fail)
        .register("demo.panic", Panic)
        .register("demo.log", Log)
        .register("demo.write-file", WriteFile)
        .register("demo.flaky", Flaky)
        .register("demo.spawn", Spawn);
}

/// Returns its payload.
struct Echo;

#[async_trait::async_trait]
impl Work for Echo {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        ctx.debug("echoing the payload");
        Ok(ctx.payload().clone())
    }
}

/// Sleeps for `ms` milliseconds, reporting progress, and stops early when cancelled.
struct Sleep;

#[derive(Deserialize)]
struct SleepPayload {
    ms: u64,
}

#[async_trait::async_trait]
impl Work for Sleep {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        let SleepPayload { ms } = ctx.payload_as()?;
        ctx.info(format!("sleeping {ms} ms"));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = ctx.cancelled() => anyhow::bail!("cancelled while sleeping"),
        }
        ctx.progress(Some(1.0), Some("slept"));
        Ok(json!({ "slept_ms": ms }))
    }
}

/// Keeps its thread busy for `ms` milliseconds without ever awaiting: CPU-bound Work, which
/// only a `thread` (or stronger) worker keeps from stalling the agent, and which no cooperative
/// cancel can stop.
struct Spin;

#[async_trait::async_trait]
impl Work for Spin {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        let SleepPayload { ms } = ctx.payload_as()?;
        let end = std::time::Instant::now() + Duration::from_millis(ms);
        let mut turns: u64 = 0;
        while std::time::Instant::now() < end {
            turns = std::hint::black_box(turns.wrapping_add(1));
        }
        Ok(json!({ "spun_ms": ms, "turns": turns }))
    }
}

/// Fails with the payload's `message`.
struct Fail;

#[derive(Deserialize)]
struct MessagePayload {
    #[serde(default = "default_message")]
    message: String,
}

fn default_message() -> String {
    "demo.fail failed, as asked".into()
}

#[async_trait::async_trait]
impl Work for Fail {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        let MessagePayload { message } = ctx.payload_as()?;
        ctx.warn("about to fail");
        anyhow::bail!(message)
    }
}

/// Panics with the payload's `message`: the worker reports `crashed`.
struct Panic;

#[async_trait::async_trait]
impl Work for Panic {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        let MessagePayload { message } = ctx.payload_as()?;
        ctx.error("about to panic");
        panic!("{message}");
    }
}

/// Logs `lines` lines.
struct Log;

#[derive(Deserialize)]
struct LogPayload {
    #[serde(default = "one")]
    lines: u64,
    /// Write the lines to stderr instead: `process` and `docker` workers capture them as the
    /// job's log lines (`local` and `thread` ones leave them on the agent's stderr).
    #[serde(default)]
    stderr: bool,
}

fn one() -> u64 {
    1
}

#[async_trait::async_trait]
impl Work for Log {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        let LogPayload { lines, stderr } = ctx.payload_as()?;
        for i in 1..=lines {
            let line = format!("log line {i} of {lines}");
            if stderr {
                eprintln!("{line}");
            } else {
                ctx.info(line);
            }
        }
        Ok(json!({ "lines": lines }))
    }
}

/// Writes `text` to `path` (an alias path), making folders as needed.
struct WriteFile;

#[derive(Deserialize)]
struct WritePayload {
    path: String,
    text: String,
}

#[async_trait::async_trait]
impl Work for WriteFile {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        let WritePayload { path, text } = ctx.payload_as()?;
        let mut file = ctx.create_file(&path, Access::Create)?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        ctx.info(format!("wrote {} bytes to {path}", text.len()));
        Ok(json!({ "path": path, "bytes": text.len() }))
    }
}

/// Fails on its first `fail_times` attempts, then succeeds: a job that retries mend.
struct Flaky;

#[derive(Deserialize)]
struct FlakyPayload {
    fail_times: u32,
}

#[async_trait::async_trait]
impl Work for Flaky {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        let FlakyPayload { fail_times } = ctx.payload_as()?;
        let attempt = ctx.attempt();
        if attempt <= fail_times {
            anyhow::bail!("attempt {attempt} fails, as asked (the first {fail_times} do)");
        }
        ctx.info(format!("attempt {attempt} succeeds"));
        Ok(json!({ "attempt": attempt }))
    }
}

/// Submits each job of `children` as a child job and returns their uuids; with a `callback`,
/// as a group with that callback (and `on_failure`); with `wait`, its job then waits for its
/// children.
struct Spawn;

#[derive(Deserialize)]
struct SpawnPayload {
    children: Vec<rota_common::wire::Job>,
    #[serde(default)]
    callback: Option<rota_common::wire::Job>,
    #[serde(default)]
    on_failure: Option<rota_common::wire::OnFailure>,
    #[serde(default)]
    wait: bool,
}

#[async_trait::async_trait]
impl Work for Spawn {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        let SpawnPayload {
            children,
            callback,
            on_failure,
            wait,
        } = ctx.payload_as()?;
        let mut ids = Vec::new();
        if let Some(callback) = callback {
            ids = ctx.submit_group(children, callback, on_failure).await?;
            ctx.info(format!(
                "submitted a group of {} and its callback",
                ids.len() - 1
            ));
        } else {
            for child in children {
                let work_type = child.work_type.clone();
                let uuid = ctx.submit(child).await?;
                ctx.info(format!("submitted child {uuid} ({work_type})"));
                ids.push(uuid);
            }
        }
        let output = json!({ "children": ids });
        Ok(if wait {
            ctx.wait_for_children(output)
        } else {
            output
        })
    }
}

/// Serves `html` to every request on this host's address `host` (a port of its own) for as
/// long as the program runs; returns the page's URL. The page that the Chromium demo and
/// benchmark render.
pub fn serve_page(html: &'static str, host: &str) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind((host, 0))?;
    let url = format!("http://{}/report.html", listener.local_addr()?);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                // The request head ends with an empty line.
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let _ = write!(
                    &stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{html}",
                    html.len()
                );
            });
        }
    });
    Ok(url)
}
