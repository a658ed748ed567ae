//! `process` workers: a `worker-runtime serve` child per worker, in a process group of its
//! own, spoken to over stdin/stdout (see `rota_worker_runtime::protocol`). Its stderr becomes
//! the current job's log lines. A job that overruns its timeout, or is cancelled, ends the
//! whole process group: SIGTERM, then SIGKILL after the grace period.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::Utc;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use rota_common::wire::{Level, LogLine, Status};
use rota_worker_runtime::protocol::{FromWorker, ToWorker};
use rota_worker_runtime::{Aliases, Context, Outcome, Sink};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How to start and bound the worker processes of a pool.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// The `worker-runtime` binary.
    pub program: PathBuf,
    pub aliases: Aliases,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
}

type CurrentSink = Arc<Mutex<Option<Arc<dyn Sink>>>>;

/// One running `worker-runtime serve`.
pub struct Process {
    child: Child,
    pub pid: u32,
    /// The work types the runtime said it runs.
    pub types: Vec<String>,
    stdin: ChildStdin,
    frames: mpsc::UnboundedReceiver<FromWorker>,
    /// The sink of the job in hand, where stderr lines go.
    current: CurrentSink,
    kill_grace: Duration,
}

impl Process {
    /// Starts a worker process and waits for its `ready`.
    pub async fn start(spec: &ProcessSpec, name: &str) -> anyhow::Result<Process> {
        let mut cmd = Command::new(&spec.program);
        cmd.arg("serve");
        for (alias, dir) in spec.aliases.iter() {
            cmd.arg("--alias").arg(format!("{alias}={}", dir.display()));
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start the worker runtime {} (set --worker-runtime)",
                    spec.program.display()
                )
            })?;
        let pid = child.id().context("the worker process has no pid")?;
        let (stdin, stdout, stderr) =
            match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
                (Some(i), Some(o), Some(e)) => (i, o, e),
                _ => bail!("the worker process has no pipes"),
            };
        let current: CurrentSink = Arc::default();
        let (tx, mut frames) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let frame = serde_json::from_str(&line).unwrap_or_else(|_| FromWorker::Log {
                    line: LogLine {
                        time: Utc::now(),
                        level: Level::Info,
                        message: line,
                    },
                });
                if tx.send(frame).is_err() {
                    break;
                }
            }
        });
        let to_logs = current.clone();
        let worker = name.to_owned();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let sink = to_logs.lock().ok().and_then(|s| s.clone());
                match sink {
                    Some(sink) => sink.log(LogLine {
                        time: Utc::now(),
                        level: Level::Warn,
                        message: line,
                    }),
                    None => tracing::info!(worker = %worker, "stderr: {line}"),
                }
            }
        });
        let types = match tokio::time::timeout(Duration::from_secs(30), frames.recv()).await {
            Ok(Some(FromWorker::Ready { types, .. })) => types,
            Ok(other) => bail!(
                "the worker runtime {} did not say ready (it said {other:?})",
                spec.program.display()
            ),
            Err(_) => bail!(
                "the worker runtime {} did not say ready within 30 s",
                spec.program.display()
            ),
        };
        Ok(Process {
            child,
            pid,
            types,
            stdin,
            frames,
            current,
            kill_grace: spec.kill_grace,
        })
    }

    /// Runs one job. Returns its outcome and whether the process can take another job.
    pub async fn execute(
        &mut self,
        ctx: Context,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> (Outcome, bool) {
        let sink = ctx.sink();
        if let Ok(mut c) = self.current.lock() {
            *c = Some(sink.clone());
        }
        let out = self.exchange(&ctx, sink, timeout, cancel).await;
        if let Ok(mut c) = self.current.lock() {
            *c = None;
        }
        out
    }

    async fn exchange(
        &mut self,
        ctx: &Context,
        sink: Arc<dyn Sink>,
        timeout: Duration,
        cancel: CancellationToken,
    ) -> (Outcome, bool) {
        let request = ToWorker::Execute {
            job: Box::new(ctx.job().clone()),
            work_dir: ctx.work_dir().to_owned(),
        };
        if let Err(e) = self.send(&request).await {
            return (
                self.died(&format!("could not hand it the job: {e}")).await,
                false,
            );
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                frame = self.frames.recv() => match frame {
                    Some(FromWorker::Log { line }) => sink.log(line),
                    Some(FromWorker::Progress { progress }) => sink.progress(progress),
                    Some(FromWorker::Result { outcome }) => return (outcome, true),
                    Some(FromWorker::Ready { .. }) => {}
                    None => return (self.died("it exited while running the job").await, false),
                },
                _ = &mut deadline => {
                    self.terminate().await;
                    let message = format!("ran longer than its timeout of {} s; its worker process was ended", timeout.as_secs_f64());
                    return (Outcome::error(Status::TimedOut, "timeout", message), false);
                }
                _ = cancel.cancelled() => {
                    self.terminate().await;
                    return (Outcome::error(Status::Cancelled, "cancelled", "cancelled; its worker process was ended"), false);
                }
            }
        }
    }

    async fn send(&mut self, message: &ToWorker) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(message)?;
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// The outcome of a job whose process died under it: how it ended.
    async fn died(&mut self, what: &str) -> Outcome {
        use std::os::unix::process::ExitStatusExt;
        let status = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let how = match status {
            Ok(Ok(s)) => match (s.code(), s.signal()) {
                (_, Some(sig)) => format!(
                    "killed by signal {sig} ({})",
                    Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("?")
                ),
                (Some(code), _) => format!("exit status {code}"),
                _ => s.to_string(),
            },
            _ => "no exit status".to_owned(),
        };
        self.terminate().await;
        Outcome::error(
            Status::Crashed,
            "worker_died",
            format!("the worker process {} {what}: {how}", self.pid),
        )
    }

    /// Ends the whole process group: SIGTERM, then SIGKILL after the grace period; reaps it.
    pub async fn terminate(&mut self) {
        let group = Pid::from_raw(self.pid as i32);
        let _ = killpg(group, Signal::SIGTERM);
        if tokio::time::timeout(self.kill_grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = killpg(group, Signal::SIGKILL);
            let _ = self.child.wait().await;
        }
        // Anything of the group still alive after its leader exited.
        let _ = killpg(group, Signal::SIGKILL);
    }

    /// Resident memory of the worker process, in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let kib: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kib * 1024)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // kill_on_drop ends the leader; this ends whatever it started too.
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
    }
}
