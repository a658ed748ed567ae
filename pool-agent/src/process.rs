//! Worker runtimes the agent talks to: a `worker-runtime serve` child per worker (`process`),
//! leader of a process group of its own, or the same inside a container (`docker`, see
//! [`crate::container`]). Either is spoken to over stdin/stdout (see
//! `rota_worker_runtime::protocol`); its stderr, where a Work's own stdout goes too, becomes
//! the current job's log lines. Both pipes are read in lines of bounded length: a protocol
//! frame over `MAX_FRAME_BYTES` ends the runtime (`crashed`, kind `frame_too_large`), a log
//! line over `MAX_LOG_LINE_BYTES` is cut and the rest of it skipped, never buffered. A frame
//! counts only with the ticket of the job in hand; any other becomes a warning log line. A
//! job that overruns its timeout, or is cancelled, ends the runtime: SIGTERM, then SIGKILL
//! after the grace period, to the whole process group, or to the container, which is then
//! removed.

use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::Utc;
use futures::StreamExt;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use rota_common::wire::{Level, LogLine, Status};
use rota_worker_runtime::protocol::{
    FromWorker, LineSplitter, MAX_FRAME_BYTES, MAX_LOG_LINE_BYTES, PROTOCOL_VERSION, Piece, Ticket,
    ToWorker, cut_to,
};
use rota_worker_runtime::{Aliases, Context, Outcome, Sink, WorkEnv};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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
    /// The whole environment of a `process` worker (a `docker` one's is in the
    /// [`crate::container::DockerSpec`]); never the agent's own.
    pub env: WorkEnv,
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

/// What the runtime's stdout brings, as the agent reads it.
#[derive(Debug)]
enum Incoming {
    Frame(FromWorker),
    /// A line that is not a frame: a runtime's bug, kept as a log line.
    Stray(String),
    /// A line longer than `MAX_FRAME_BYTES`, never buffered whole.
    Overlong,
}

impl Incoming {
    fn describe(&self) -> String {
        match self {
            Incoming::Frame(f) => format!("a `{}` frame", f.op()),
            Incoming::Stray(_) => "a line that is not a frame".into(),
            Incoming::Overlong => format!("a line over {MAX_FRAME_BYTES} bytes"),
        }
    }
}

/// What the runtime's output brings: the [`Lines`] of its pipes, read.
struct Inbox {
    frames: mpsc::UnboundedReceiver<Incoming>,
    /// The tickets of the end-of-job lines seen on stderr.
    ends: mpsc::UnboundedReceiver<Ticket>,
    /// The sink of the job in hand, where stderr lines go.
    current: CurrentSink,
}

/// Turns the runtime's output lines into protocol frames (stdout) and log lines of the job in
/// hand (stderr).
#[derive(Clone)]
struct Lines {
    frames: mpsc::UnboundedSender<Incoming>,
    /// Each job's end, as seen on stderr.
    ends: mpsc::UnboundedSender<Ticket>,
    current: CurrentSink,
    worker: String,
}

impl Lines {
    /// A piece of stdout, the protocol's pipe.
    fn stdout(&self, piece: Piece) {
        let incoming = match piece {
            Piece::Line(line) => match serde_json::from_str(&line) {
                Ok(frame) => Incoming::Frame(frame),
                Err(_) => Incoming::Stray(line),
            },
            Piece::Cut(_) => Incoming::Overlong,
        };
        let _ = self.frames.send(incoming);
    }

    /// A log line of the job in hand (or of the agent, between jobs).
    fn log(&self, level: Level, message: String) {
        let sink = self.current.lock().ok().and_then(|s| s.clone());
        match sink {
            Some(sink) => sink.log(LogLine {
                time: Utc::now(),
                level,
                message,
            }),
            None => tracing::info!(worker = %self.worker, "stderr: {message}"),
        }
    }
}

/// Reads the runtime's stderr: the job's log lines, and its end-of-job lines.
struct Stderr {
    lines: Lines,
    /// An empty line held back: the runtime writes one before each end-of-job line (to end a
    /// line the Work left unfinished), and that one is not the Work's.
    blank: bool,
}

impl Stderr {
    fn new(lines: Lines) -> Self {
        Self {
            lines,
            blank: false,
        }
    }

    fn piece(&mut self, piece: Piece) {
        let line = match piece {
            Piece::Line(line) if line.is_empty() => {
                if std::mem::replace(&mut self.blank, true) {
                    self.lines.log(Level::Warn, String::new());
                }
                return;
            }
            Piece::Line(line) => {
                if let Some(ticket) = Ticket::of_end_of_job_line(&line) {
                    self.blank = false;
                    let _ = self.lines.ends.send(ticket);
                    return;
                }
                line
            }
            // The mark goes first: the log buffer may cut the line shorter still.
            Piece::Cut(line) => {
                format!("[rota: a line over {MAX_LOG_LINE_BYTES} bytes, cut there] {line} […]")
            }
        };
        if std::mem::take(&mut self.blank) {
            self.lines.log(Level::Warn, String::new());
        }
        self.lines.log(Level::Warn, line);
    }
}

/// Reads a pipe in chunks, cut into lines of at most `cap` bytes (see [`LineSplitter`]).
fn read_pipe(
    mut pipe: impl AsyncRead + Unpin + Send + 'static,
    cap: usize,
    mut to: impl FnMut(Piece) + Send + 'static,
) {
    tokio::spawn(async move {
        let mut splitter = LineSplitter::new(cap);
        let mut chunk = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = pipe.read(&mut chunk).await {
            splitter.push(&chunk[..n], &mut to);
        }
        if let Some(line) = splitter.finish() {
            to(Piece::Line(line));
        }
    });
}

/// A log line of the agent's own about the job in hand.
fn warning(message: String) -> LogLine {
    LogLine {
        time: Utc::now(),
        level: Level::Warn,
        message,
    }
}

impl Process {
    /// Starts a worker process and waits for its `ready`.
    pub async fn start(spec: &ProcessSpec, name: &str) -> anyhow::Result<Process> {
        let mut child = Command::new(&spec.program)
            .args(spec.serve_args())
            .env_clear()
            .envs(spec.env.vars())
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
        let mut err = Stderr::new(lines.clone());
        read_pipe(stdout, MAX_FRAME_BYTES, move |p| lines.stdout(p));
        read_pipe(stderr, MAX_LOG_LINE_BYTES, move |p| err.piece(p));
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
            let mut out = LineSplitter::new(MAX_FRAME_BYTES);
            let mut err = LineSplitter::new(MAX_LOG_LINE_BYTES);
            let mut stderr = Stderr::new(lines.clone());
            while let Some(Ok(chunk)) = output.next().await {
                match chunk {
                    bollard::container::LogOutput::StdOut { message } => {
                        out.push(&message, |p| lines.stdout(p))
                    }
                    bollard::container::LogOutput::StdErr { message } => {
                        err.push(&message, |p| stderr.piece(p))
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
            Ok(Some(Incoming::Frame(FromWorker::Ready {
                protocol, types, ..
            }))) => {
                if protocol != PROTOCOL_VERSION {
                    bail!(
                        "the {what} speaks version {protocol} of the worker protocol, this agent \
                         version {PROTOCOL_VERSION}: build the runtime against this release of \
                         rota-worker-runtime"
                    );
                }
                types
            }
            Ok(Some(Incoming::Stray(mut line))) => {
                cut_to(&mut line, 200);
                bail!("the {what} did not say ready (it said {line:?})")
            }
            Ok(Some(other)) => bail!(
                "the {what} did not say ready (it sent {})",
                other.describe()
            ),
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
        let ticket = Ticket::fresh();
        // What came after the previous job's result is no job's: say so, and forget it.
        while let Ok(stale) = self.inbox.frames.try_recv() {
            tracing::warn!(worker = %self.what, "dropped {} that came between jobs", stale.describe());
        }
        while self.inbox.ends.try_recv().is_ok() {}
        let request = ToWorker::Execute {
            ticket,
            job: Box::new(ctx.job().clone()),
            work_dir: ctx.work_dir_path().to_owned(),
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
                incoming = self.inbox.frames.recv() => match incoming {
                    Some(Incoming::Frame(frame)) if frame.ticket() == Some(ticket) => match frame {
                        FromWorker::Log { line, .. } => sink.log(line),
                        FromWorker::Progress { progress, .. } => sink.progress(progress),
                        FromWorker::Submit { id, job, .. } => {
                            // Checked here too: the frame is the runtime's word, not the Work's
                            // `Context::submit`, which checks it first.
                            let submission = match job.check() {
                                Ok(()) => sink.submit(*job),
                                Err(e) => Box::pin(async move { anyhow::bail!("invalid child job: {e}") }),
                            };
                            let answers = answers_tx.clone();
                            tokio::spawn(async move {
                                let (uuid, error) = match submission.await {
                                    Ok(uuid) => (Some(uuid), None),
                                    Err(e) => (None, Some(format!("{e:#}"))),
                                };
                                let _ = answers.send(ToWorker::Submitted { id, uuid, error });
                            });
                        }
                        FromWorker::Result { outcome, .. } => {
                            // Its stderr lines are the job's logs: read them up to the job's end.
                            let ends = &mut self.inbox.ends;
                            let end = async { while ends.recv().await.is_some_and(|t| t != ticket) {} };
                            let _ = tokio::time::timeout(Duration::from_secs(2), end).await;
                            return (outcome, true);
                        }
                        FromWorker::Ready { .. } => {}
                    },
                    Some(Incoming::Frame(FromWorker::Ready { .. })) => {}
                    Some(Incoming::Frame(frame)) => sink.log(warning(format!(
                        "[rota] ignored a `{}` frame that does not carry this job's ticket",
                        frame.op()
                    ))),
                    Some(Incoming::Stray(mut line)) => {
                        cut_to(&mut line, MAX_LOG_LINE_BYTES);
                        sink.log(warning(format!("[rota] not a protocol frame: {line}")));
                    }
                    Some(Incoming::Overlong) => {
                        self.terminate().await;
                        let message = format!(
                            "the {} sent a protocol frame over {MAX_FRAME_BYTES} bytes; it was ended",
                            self.what
                        );
                        return (Outcome::error(Status::Crashed, "frame_too_large", message), false);
                    }
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
    use rota_worker_runtime::context::BufferSink;
    use rota_worker_runtime::protocol::END_OF_JOB;

    use super::*;

    /// Lines of a worker whose job in hand logs into the returned sink.
    fn lines_with_sink() -> (Lines, Inbox, Arc<BufferSink>) {
        let (lines, inbox) = Process::channels("test");
        let sink = Arc::new(BufferSink::new(|_| {}));
        if let Ok(mut c) = inbox.current.lock() {
            *c = Some(sink.clone());
        }
        (lines, inbox, sink)
    }

    fn messages(sink: &BufferSink) -> Vec<String> {
        sink.take_logs().0.into_iter().map(|l| l.message).collect()
    }

    #[test]
    fn stderr_lines_become_logs_and_end_of_job_lines_ends() {
        let (lines, mut inbox, sink) = lines_with_sink();
        let mut err = Stderr::new(lines);
        let ticket = Ticket::fresh();
        let mut split = LineSplitter::new(MAX_LOG_LINE_BYTES);
        let text = format!(
            "one\n\ntwo unfinished\n{end}\n\n{end}\n{END_OF_JOB} forged\n",
            end = ticket.end_of_job_line()
        );
        split.push(text.as_bytes(), |p| err.piece(p));
        // The blank line the runtime writes before its end line is dropped; the Work's own
        // blank line is kept; a forged end line is only a log line.
        assert_eq!(
            messages(&sink),
            ["one", "", "two unfinished", &format!("{END_OF_JOB} forged")]
        );
        assert_eq!(inbox.ends.try_recv().ok(), Some(ticket));
        assert_eq!(inbox.ends.try_recv().ok(), Some(ticket));
        assert!(inbox.ends.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_line_without_end_is_cut_and_never_buffered_whole() {
        let (lines, mut inbox, sink) = lines_with_sink();
        // 64 MiB without a newline on each pipe, then a frame.
        let (mut out_w, out_r) = tokio::io::duplex(64 * 1024);
        let (mut err_w, err_r) = tokio::io::duplex(64 * 1024);
        let mut err = Stderr::new(lines.clone());
        read_pipe(out_r, MAX_FRAME_BYTES, move |p| lines.stdout(p));
        read_pipe(err_r, MAX_LOG_LINE_BYTES, move |p| err.piece(p));
        let block = vec![b'x'; 1024 * 1024];
        for _ in 0..64 {
            out_w.write_all(&block).await.expect("written");
            err_w.write_all(&block).await.expect("written");
        }
        err_w.write_all(b"\nafter\n").await.expect("written");
        drop((out_w, err_w));
        assert!(matches!(
            inbox.frames.recv().await,
            Some(Incoming::Overlong)
        ));
        assert!(inbox.frames.recv().await.is_none(), "the rest was skipped");
        let logs = messages(&sink);
        assert_eq!(logs.len(), 2, "one cut line and the next");
        assert!(
            logs[0].starts_with("[rota: a line over"),
            "{}",
            &logs[0][..100]
        );
        assert_eq!(logs[1], "after");
    }
}
