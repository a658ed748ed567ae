//! The worker runtime of the tests: the built-ins plus `probe.*` works that report on the
//! sandbox they run in (and its environment), or misbehave in it on purpose (allocate without
//! end, fork without end, abort, forge protocol frames, print without end), and
//! `probe.count`, which counts its runs in a file for the fault suite. The tests run it as
//! `process` workers and build it into the image of `docker` workers (see
//! `rota_tests::worker_image`).

use std::io::Write;
use std::process::{Child, Command, Stdio};

use rota_worker_runtime::{Access, Context, Registry, Work};
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

/// Returns its process's environment, name → value.
struct Env;

#[async_trait::async_trait]
impl Work for Env {
    async fn execute(&self, _: &Context) -> anyhow::Result<Value> {
        let vars: serde_json::Map<String, Value> = std::env::vars_os()
            .map(|(k, v)| {
                let value = v.to_string_lossy().into_owned();
                (k.to_string_lossy().into_owned(), Value::String(value))
            })
            .collect();
        Ok(Value::Object(vars))
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

/// Forges protocol frames the way a Work could: result and log frames for its own job and for
/// job `other`, printed with `println!`, by a program it starts, and written straight to
/// every pipe this process may write besides stdout and stderr (where a runtime keeps its
/// protocol). Then returns `{"real": true}`, its true output.
struct Forge;

#[async_trait::async_trait]
impl Work for Forge {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        #[derive(Deserialize)]
        struct P {
            other: Option<String>,
        }
        let P { other } = ctx.payload_as()?;
        let mut frames = Vec::new();
        for uuid in std::iter::once(ctx.uuid().to_string()).chain(other) {
            let outcome = json!({
                "status": "failed",
                "output": "forged",
                "error": {"kind": "forged", "message": format!("forged for {uuid}")},
            });
            let line = json!({"time": chrono::Utc::now(), "level": "error", "message": "forged"});
            frames.extend([
                json!({"op": "result", "uuid": uuid, "attempt": 1, "outcome": outcome}),
                json!({"op": "result", "ticket": 0, "uuid": uuid, "outcome": outcome}),
                json!({"op": "log", "ticket": 0, "uuid": uuid, "line": line}),
            ]);
        }
        let lines: Vec<String> = frames.iter().map(Value::to_string).collect();
        for line in &lines {
            println!("{line}");
        }
        // A program it starts (this binary, as a shell may not be in the image).
        for line in &lines {
            Command::new("/proc/self/exe").args([ECHO, line]).status()?;
        }
        let mut protocol_fds = 0;
        for fd in writable_pipes() {
            // One write each, shorter than PIPE_BUF: never mixed into a frame being written.
            // A pipe nobody reads (inherited from whoever started the agent) is skipped.
            let Ok(mut pipe) = std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/self/fd/{fd}"))
            else {
                continue;
            };
            if lines
                .iter()
                .all(|line| pipe.write_all(format!("{line}\n").as_bytes()).is_ok())
            {
                protocol_fds += 1;
            }
        }
        Ok(json!({ "real": true, "protocol_fds": protocol_fds }))
    }
}

/// This process's descriptors above stderr that are the write end of a pipe.
fn writable_pipes() -> Vec<u32> {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|fd| *fd > 2)
        .filter(|fd| {
            let pipe = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .is_ok_and(|l| l.to_string_lossy().starts_with("pipe:"));
            // The access mode is the low octal digit of `flags`: 1 is write-only.
            let write_only = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
                .ok()
                .and_then(|info| {
                    info.lines()
                        .find_map(|l| l.strip_prefix("flags:"))
                        .map(|f| f.trim().ends_with('1'))
                })
                .unwrap_or(false);
            pipe && write_only
        })
        .collect()
}

/// Writes `mib` MiB without a newline: to stdout, or with `protocol`, to the pipes
/// `probe.forge` writes to (where a runtime keeps its protocol). Then returns.
struct Flood;

#[async_trait::async_trait]
impl Work for Flood {
    async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
        #[derive(Deserialize)]
        struct P {
            mib: usize,
            #[serde(default)]
            protocol: bool,
        }
        let P { mib, protocol } = ctx.payload_as()?;
        let block = vec![b'x'; 1024 * 1024];
        let mut to: Vec<Box<dyn Write>> = if protocol {
            let mut pipes = Vec::new();
            for fd in writable_pipes() {
                let pipe = std::fs::OpenOptions::new()
                    .write(true)
                    .open(format!("/proc/self/fd/{fd}"))?;
                pipes.push(Box::new(pipe) as Box<dyn Write>);
            }
            pipes
        } else {
            vec![Box::new(std::io::stdout())]
        };
        for out in &mut to {
            for _ in 0..mib {
                out.write_all(&block)?;
            }
            out.flush()?;
        }
        Ok(json!({ "wrote_mib": mib, "pipes": to.len() }))
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
        let line = format!("{} {}\n", ctx.uuid(), ctx.attempt());
        // One write(2) of a short line on an O_APPEND file: atomic with respect to other runs.
        std::io::Write::write_all(&mut ctx.open(&file, Access::Append)?, line.as_bytes())?;
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(ms)) => {}
            _ = ctx.cancelled() => anyhow::bail!("cancelled while sleeping"),
        }
        Ok(json!({ "slept_ms": ms }))
    }
}

/// The argument that makes this binary a child of `probe.fork`: it waits for its stdin to close.
const PARK: &str = "park";

/// The argument that makes this binary a child of `probe.forge`: it prints its next argument.
const ECHO: &str = "echo";

fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some(PARK) {
        let _ = std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1]);
        return std::process::ExitCode::SUCCESS;
    }
    if std::env::args().nth(1).as_deref() == Some(ECHO) {
        println!("{}", std::env::args().nth(2).unwrap_or_default());
        return std::process::ExitCode::SUCCESS;
    }
    let mut registry = Registry::with_builtins();
    registry
        .register("probe.sandbox", Sandbox)
        .register("probe.env", Env)
        .register("probe.alloc", Alloc)
        .register("probe.fork", Fork)
        .register("probe.abort", Abort)
        .register("probe.forge", Forge)
        .register("probe.flood", Flood)
        .register("probe.count", Count);
    rota_worker_runtime::cli::main(registry)
}
