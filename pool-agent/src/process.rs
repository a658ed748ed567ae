//! Worker runtimes the agent talks to: a `worker-runtime serve` child per worker (`process`),
//! leader of a process group of its own, or the same inside a container (`docker`, see
//! [`crate::container`]). Either is spoken to over stdin/stdout (see
//! `rota_worker_runtime::protocol`); its stderr becomes the current job's log lines. A job that
//! overruns its timeout, or is cancelled, ends the runtime: SIGTERM, then SIGKILL after the
//! grace period, to the whole process group, or to the container, which is then removed.

use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use rota_common::wire::{Level, LogLine, Status};
use rota_worker_runtime::protocol::{END_OF_JOB, FromWorker, ToWorker};
use rota_worker_runtime::{Aliases, Context, Outcome, Sink};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::container::{Container, Engine};

/// How to start and bound the worker runtimes of a pool.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// The `worker-runtime` binary (for `process` workers; a `docker` image has its own).
    pub program: PathBuf,
    pub aliases: Aliases,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// More `serve` arguments: the Chromium settings.
    pub chromium_args: Vec<String>,
}

impl ProcessSpec {
    /// The arguments of `worker-runtime` for a worker.
    fn serve_args(&self) -> Vec<String> {
        let mut args = vec!["serve".to_owned()];
        for (alias, dir) in self.aliases.iter() {
            args.push("--alias".into());
            args.push(format!("{alias}={}", dir.display()));
        }
        args.extend(self.chromium_args.iter().cloned());
        args
    }
}

type CurrentSink = Arc<Mutex<Option<Arc<dyn Sink>>>>;

/// Where a worker runtime lives.
enum Host {
    /// A child process, leader of its own process group.
    Child(Child),
    /// A container of its own.
    Container(Container),
}

/// One running worker runtime (`worker-runtime serve`), as a child process or in a container.
pub struct Process {
    host: Host,
    /// The runtime's pid on this host, when it can be seen from here.
    pub pid: Option<u32>,
    /// Names it in results and messages: `worker process 1234`, `worker container rota-a1-docker-0`.
    what: String,
    /// The work types the runtime said it runs.
    pub types: Vec<String>,
    stdin: Pin<Box<dyn AsyncWrite + Send>>,
    inbox: Inbox,
    kill_grace: Duration,
}

/// What the runtime's output brings: the [`Lines`] of its pipes, read.
struct Inbox {
    frames: mpsc::UnboundedReceiver<FromWorker>,
    ends: mpsc::UnboundedReceiver<()>,
    /// The sink of the job in hand, where stderr lines go.
    current: CurrentSink,
}

/// Turns the runtime's output lines into protocol frames (stdout) and log lines of the job in
/// hand (stderr).
#[derive(Clone)]
struct Lines {
    frames: mpsc::UnboundedSender<FromWorker>,
    /// Each job's end, as seen on stderr.
    ends: mpsc::UnboundedSender<()>,
    current: CurrentSink,
    worker: String,
}

impl Lines {
    fn stdout(&self, line: String) {
        let frame = serde_json::from_str(&line).unwrap_or_else(|_| FromWorker::Log {
            line: LogLine {
                time: Utc::now(),
                level: Level::Info,
                message: line,
            },
        });
        let _ = self.frames.send(frame);
    }

    fn stderr(&self, line: String) {
        if line == END_OF_JOB {
            let _ = self.ends.send(());
            return;
        }
        let sink = self.current.lock().ok().and_then(|s| s.clone());
        match sink {
            Some(sink) => sink.log(LogLine {
                time: Utc::now(),
                level: Level::Warn,
                message: line,
            }),
            None => tracing::info!(worker = %self.worker, "stderr: {line}"),
        }
    }

    /// Reads a pipe line by line.
    fn read(self, pipe: impl AsyncRead + Unpin + Send + 'static, to: fn(&Lines, String)) {
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                to(&self, line);
            }
        });
    }
}

/// Splits a stream of chunks into lines, keeping a partial line until its end arrives.
#[derive(Default)]
struct LineBuffer(Vec<u8>);

impl LineBuffer {
    fn push(&mut self, chunk: &Bytes, mut each: impl FnMut(String)) {
        self.0.extend_from_slice(chunk);
        while let Some(at) = self.0.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.0.drain(..=at).collect();
            each(String::from_utf8_lossy(&line[..at]).into_owned());
        }
    }
}

impl Process {
    /// Starts a worker process and waits for its `ready`.
    pub async fn start(spec: &ProcessSpec, name: &str) -> anyhow::Result<Process> {
        let mut child = Command::new(&spec.program)
            .args(spec.serve_args())
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
        let (lines, inbox) = Self::channels(name);
        lines.clone().read(stdout, Lines::stdout);
        lines.read(stderr, Lines::stderr);
        let what = format!("worker process {pid}");
        Self::handshake(
            Host::Child(child),
            Some(pid),
            what,
            Box::pin(stdin),
            inbox,
            spec,
        )
        .await
    }

    /// Starts a worker runtime in a container of its own and waits for its `ready`.
    pub async fn start_in(
        engine: &Engine,
        spec: &ProcessSpec,
        name: &str,
    ) -> anyhow::Result<Process> {
        let attached = engine.start(name, spec.serve_args()).await?;
        let (lines, inbox) = Self::channels(name);
        let mut output = attached.output;
        tokio::spawn(async move {
            let (mut out, mut err) = (LineBuffer::default(), LineBuffer::default());
            while let Some(Ok(chunk)) = output.next().await {
                match chunk {
                    bollard::container::LogOutput::StdOut { message } => {
                        out.push(&message, |l| lines.stdout(l))
                    }
                    bollard::container::LogOutput::StdErr { message } => {
                        err.push(&message, |l| lines.stderr(l))
                    }
                    _ => {}
                }
            }
        });
        let container = attached.container;
        let what = format!("worker container {}", container.name);
        let mut process = Self::handshake(
            Host::Container(container),
            None,
            what,
            attached.stdin,
            inbox,
            spec,
        )
        .await?;
        // Once it said ready, the runtime surely runs: find it, for its memory.
        if let Host::Container(c) = &process.host {
            process.pid = c.runtime_pid().await;
        }
        Ok(process)
    }

    fn channels(name: &str) -> (Lines, Inbox) {
        let current: CurrentSink = Arc::default();
        let (frames_tx, frames) = mpsc::unbounded_channel();
        let (ends_tx, ends) = mpsc::unbounded_channel();
        let lines = Lines {
            frames: frames_tx,
            ends: ends_tx,
            current: current.clone(),
            worker: name.to_owned(),
        };
        let inbox = Inbox {
            frames,
            ends,
            current,
        };
        (lines, inbox)
    }

    async fn handshake(
        host: Host,
        pid: Option<u32>,
        what: String,
        stdin: Pin<Box<dyn AsyncWrite + Send>>,
        mut inbox: Inbox,
        spec: &ProcessSpec,
    ) -> anyhow::Result<Process> {
        let types = match tokio::time::timeout(Duration::from_secs(30), inbox.frames.recv()).await {
            Ok(Some(FromWorker::Ready { types, .. })) => types,
            Ok(Some(other)) => bail!("the {what} did not say ready (it said {other:?})"),
            Ok(None) => {
                bail!("the {what} ended before it said ready; is it a Rota worker runtime?")
            }
            Err(_) => bail!("the {what} did not say ready within 30 s"),
        };
        Ok(Process {
            host,
            pid,
            what,
            types,
            stdin,
            inbox,
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
        if let Ok(mut c) = self.inbox.current.lock() {
            *c = Some(sink.clone());
        }
        let out = self.exchange(&ctx, sink, timeout, cancel).await;
        if let Ok(mut c) = self.inbox.current.lock() {
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
        // An end that came too late for its own job is not this one's.
        while self.inbox.ends.try_recv().is_ok() {}
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
        // Answers to the Work's child jobs, as the scheduler gives them.
        let (answers_tx, mut answers) = mpsc::unbounded_channel::<ToWorker>();
        loop {
            tokio::select! {
                Some(answer) = answers.recv() => {
                    if let Err(e) = self.send(&answer).await {
                        return (self.died(&format!("could not answer it: {e}")).await, false);
                    }
                }
                frame = self.inbox.frames.recv() => match frame {
                    Some(FromWorker::Log { line }) => sink.log(line),
                    Some(FromWorker::Progress { progress }) => sink.progress(progress),
                    Some(FromWorker::Submit { id, job }) => {
                        let submission = sink.submit(*job);
                        let answers = answers_tx.clone();
                        tokio::spawn(async move {
                            let (uuid, error) = match submission.await {
                                Ok(uuid) => (Some(uuid), None),
                                Err(e) => (None, Some(format!("{e:#}"))),
                            };
                            let _ = answers.send(ToWorker::Submitted { id, uuid, error });
                        });
                    }
                    Some(FromWorker::Result { outcome }) => {
                        // Its stderr lines are the job's logs: read them up to the job's end.
                        let _ = tokio::time::timeout(Duration::from_secs(2), self.inbox.ends.recv()).await;
                        return (outcome, true);
                    }
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

    /// The outcome of a job whose runtime died under it: how it ended.
    async fn died(&mut self, what: &str) -> Outcome {
        let how = match &mut self.host {
            Host::Child(child) => {
                use std::os::unix::process::ExitStatusExt;
                match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                    Ok(Ok(s)) => match (s.code(), s.signal()) {
                        (_, Some(sig)) => format!(
                            "killed by signal {sig} ({})",
                            Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("?")
                        ),
                        (Some(code), _) => format!("exit status {code}"),
                        _ => s.to_string(),
                    },
                    _ => "no exit status".to_owned(),
                }
            }
            Host::Container(c) => c.how_it_ended(Duration::from_secs(5)).await,
        };
        self.terminate().await;
        Outcome::error(
            Status::Crashed,
            "worker_died",
            format!("the {} {what}: {how}", self.what),
        )
    }

    /// Ends the runtime: SIGTERM, then SIGKILL after the grace period. A child's whole
    /// process group is ended and reaped; a container is removed.
    pub async fn terminate(&mut self) {
        match &mut self.host {
            Host::Child(child) => {
                let Some(pid) = self.pid else { return };
                let group = Pid::from_raw(pid as i32);
                let _ = killpg(group, Signal::SIGTERM);
                if tokio::time::timeout(self.kill_grace, child.wait())
                    .await
                    .is_err()
                {
                    let _ = killpg(group, Signal::SIGKILL);
                    let _ = child.wait().await;
                }
                // Anything of the group still alive after its leader exited.
                let _ = killpg(group, Signal::SIGKILL);
            }
            Host::Container(c) => c.stop(self.kill_grace).await,
        }
    }

    /// Resident memory of the runtime process, in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
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
        // A child: kill_on_drop ends the leader; this ends whatever it started too. A
        // container removes itself when dropped.
        if let (Host::Child(_), Some(pid)) = (&self.host, self.pid) {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_become_whole_lines() {
        let mut buf = LineBuffer::default();
        let mut lines = Vec::new();
        for chunk in ["{\"a\":", "1}\nsecond", " line\n", "\nnot yet"] {
            buf.push(&Bytes::from(chunk), |l| lines.push(l));
        }
        assert_eq!(lines, ["{\"a\":1}", "second line", ""]);
        assert_eq!(buf.0, b"not yet");
    }
}
