//! The worker runtime of the tests: the built-ins plus `probe.*` works that report on the
//! sandbox they run in, or misbehave in it on purpose (allocate without end, fork without end,
//! abort). The tests run it as `process` workers and build it into the image of `docker`
//! workers (see `rota_tests::worker_image`).

use std::process::{Child, Command, Stdio};

use rota_worker_runtime::{Context, Registry, Work};
use serde::Deserialize;
use serde_json::{Value, json};

/// Reports who and where the Work is: its uid, capabilities, `no_new_privs`, which paths it
/// can write, whether the Docker socket is there, whether it reaches an address.
struct Sandbox;

#[derive(Deserialize)]
struct SandboxPayload {
    /// Files to try to create.
    #[serde(default)]
    write: Vec<String>,
    /// host:port to try to connect to.
    connect: Option<String>,
}

#[async_trait::async_trait]
impl Work for Sandbox {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        let p: SandboxPayload = ctx.payload_as()?;
        let status = std::fs::read_to_string("/proc/self/status")?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().next().unwrap_or_default().to_owned())
        };
        let writes: serde_json::Map<String, Value> = p
            .write
            .iter()
            .map(|path| {
                let r = std::fs::write(path, b"probe");
                (path.clone(), json!(r.map_err(|e| e.to_string())))
            })
            .collect();
        let connect = match &p.connect {
            Some(addr) => json!(
                tokio::net::TcpStream::connect(addr)
                    .await
                    .map(|_| "connected".to_owned())
                    .map_err(|e| e.to_string())
            ),
            None => Value::Null,
        };
        Ok(json!({
            "uid": field("Uid:"),
            "cap_eff": field("CapEff:"),
            "no_new_privs": field("NoNewPrivs:"),
            "write": writes,
            "connect": connect,
            "docker_sock": std::path::Path::new("/var/run/docker.sock").exists(),
        }))
    }
}

/// Allocates and touches `mib` MiB, then returns.
struct Alloc;

#[async_trait::async_trait]
impl Work for Alloc {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        #[derive(Deserialize)]
        struct P {
            mib: usize,
        }
        let P { mib } = ctx.payload_as()?;
        let mut blocks = Vec::new();
        for i in 0..mib {
            // Every page written, so the memory is really used.
            blocks.push(vec![(i % 251) as u8 + 1; 1024 * 1024]);
        }
        Ok(json!({ "mib": blocks.len() }))
    }
}

/// Starts processes that stay alive, until the system refuses one or `max` run; reports how
/// many it got and why it stopped, then ends them.
struct Fork;

#[async_trait::async_trait]
impl Work for Fork {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        #[derive(Deserialize)]
        struct P {
            max: usize,
        }
        let P { max } = ctx.payload_as()?;
        let mut children: Vec<Child> = Vec::new();
        let mut refused = None;
        while children.len() < max {
            match Command::new("/proc/self/exe")
                .arg(PARK)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
            {
                Ok(c) => children.push(c),
                Err(e) => {
                    refused = Some(e.to_string());
                    break;
                }
            }
        }
        let started = children.len();
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(json!({ "started": started, "refused": refused }))
    }
}

/// Aborts the whole runtime process.
struct Abort;

#[async_trait::async_trait]
impl Work for Abort {
    async fn execute(&self, _: &Context) -> anyhow::Result<Value> {
        std::process::abort()
    }
}

/// Counts its runs for the fault suite's tally: appends `<uuid> <attempt>` to `file` (an alias
/// path) as its first act, with O_APPEND so that concurrent runs never interleave, then sleeps
/// `ms` (stopping early when cancelled). A line is a run that began, whatever happens next.
struct Count;

#[async_trait::async_trait]
impl Work for Count {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        #[derive(Deserialize)]
        struct P {
            file: String,
            #[serde(default)]
            ms: u64,
        }
        let P { file, ms } = ctx.payload_as()?;
        let real = ctx.resolve(&file)?;
        let line = format!("{} {}\n", ctx.uuid(), ctx.attempt());
        // One write(2) of a short line on an O_APPEND file: atomic with respect to other runs.
        std::io::Write::write_all(
            &mut std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&real)?,
            line.as_bytes(),
        )?;
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(ms)) => {}
            _ = ctx.cancelled() => anyhow::bail!("cancelled while sleeping"),
        }
        Ok(json!({ "slept_ms": ms }))
    }
}

/// The argument that makes this binary a child of `probe.fork`: it waits for its stdin to close.
const PARK: &str = "park";

fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some(PARK) {
        let _ = std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1]);
        return std::process::ExitCode::SUCCESS;
    }
    let mut registry = Registry::with_builtins();
    registry
        .register("probe.sandbox", Sandbox)
        .register("probe.alloc", Alloc)
        .register("probe.fork", Fork)
        .register("probe.abort", Abort)
        .register("probe.count", Count);
    rota_worker_runtime::cli::main(registry)
}
