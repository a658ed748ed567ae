//! The protocol between a pool agent and a `worker-runtime serve` process: one JSON object per
//! line, the agent's on the worker's stdin, the worker's on its stdout.
//!
//! ```text
//! worker: {"op":"ready","protocol":2,"pid":1234,"types":["demo.echo",…]}
//! agent:  {"op":"execute","ticket":8231…,"job":{…},"work_dir":"/data/agent-a1/work/<uuid>"}
//! worker: {"op":"log","ticket":8231…,"line":{…}}   {"op":"progress","ticket":8231…,"progress":{…}}
//! worker: {"op":"submit","ticket":8231…,"id":1,"job":{…}}   (a child job; any number)
//! agent:  {"op":"submitted","id":1,"uuid":"…"}   (or "error": "…": the scheduler's answer)
//! worker: {"op":"result","ticket":8231…,"outcome":{"status":"succeeded","output":…}}
//! agent:  {"op":"cancel"}  (the job in hand stops at its next await point)
//! agent:  {"op":"shutdown"} (or closes stdin): the worker exits
//! ```
//!
//! **The Work cannot speak the protocol.** Before it serves, the runtime keeps its stdin and
//! stdout for the protocol on descriptors of its own, closed on exec, and points descriptor 0
//! at `/dev/null` and descriptor 1 at stderr ([`serve`]). Whatever a Work prints, with
//! `println!` or through a program it starts, goes to stderr, which the agent keeps as the
//! job's log lines; a Work reading stdin reads nothing. This holds alike for `process` and
//! `docker` workers: it is the runtime process that moves its own descriptors.
//!
//! **Each frame is tied to the execute it answers.** The agent gives each `execute` a fresh
//! random [`Ticket`]; the runtime echoes it in every `log`, `progress`, `submit` and `result`
//! frame of that job, and in the end-of-job line on stderr. The agent takes a frame only with
//! the ticket of the job in hand; any other frame becomes a warning log line of that job.
//! So a result that comes late, or a frame a Work managed to write on the protocol's
//! descriptor, can neither end another job nor be taken for its result. (Work code that reads
//! its own process's memory could still learn its ticket; it could then only speak for its
//! own job, whose output it chooses anyway.)
//!
//! **Frames are bounded.** The agent reads the protocol in lines of at most
//! [`MAX_FRAME_BYTES`]: a longer one is never buffered whole; the agent ends the worker and the
//! job is `crashed` with kind `frame_too_large`. The runtime keeps within the bound: a log line
//! or progress message is cut to [`MAX_LOG_LINE_BYTES`] (with a mark), a result whose output
//! is too large is replaced by a `failed` outcome of kind `output_too_large`, a child job too
//! large is refused to its Work. Lines on stderr are cut to [`MAX_LOG_LINE_BYTES`] (the rest of
//! such a line is skipped, not buffered), so a Work that prints gigabytes without a newline
//! costs the agent no memory.
//!
//! Timeouts are the agent's: it ends an overrunning worker with SIGTERM, then SIGKILL. On
//! SIGTERM, as at the end of stdin, the worker ends its Chromium (process and profile folder,
//! or container) before it exits.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use rota_common::wire::{Job, JobId, LogLine, Progress, Status};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::chromium::Chromium;
use crate::context::Submission;
use crate::{Aliases, Context, Outcome, Registry, Sink};

/// The version of this protocol, said in `ready`: an agent refuses a runtime that speaks
/// another one (a runtime built against an older `rota-worker-runtime`) with a clear error.
/// Version 1 had no tickets and kept the protocol on the Work's own stdout.
pub const PROTOCOL_VERSION: u32 = 2;

/// The longest frame (one line, without its newline) a runtime may send; the agent ends a
/// runtime that sends a longer one. Above what a result can carry to the broker anyway.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// The longest log line, from a `log` frame or a line on stderr; longer ones are cut, with a
/// mark. (The agent's log buffer keeps less of each line still.)
pub const MAX_LOG_LINE_BYTES: usize = 16 * 1024;

/// The line a runtime writes to stderr after a job, before its `result`, followed by a space
/// and the job's ticket: stdout and stderr are separate pipes, so the agent reads stderr up to
/// this line to have all of the job's log lines. The runtime writes a newline before it, in
/// case the Work left a line unfinished; the agent drops the empty line this may make.
pub const END_OF_JOB: &str = "\u{1e}rota:end-of-job";

/// The agent's name for one `execute`, random, so that only the runtime it was handed to can
/// answer for that job (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ticket(u64);

impl Ticket {
    /// A fresh random ticket (from the random bits of a v4 uuid).
    pub fn fresh() -> Self {
        let (high, low) = JobId::random().0.as_u64_pair();
        Self(high ^ low.rotate_left(17))
    }

    /// The end-of-job line for this ticket, as the runtime writes it to stderr.
    pub fn end_of_job_line(self) -> String {
        format!("{END_OF_JOB} {}", self.0)
    }

    /// The ticket of an end-of-job line, if `line` is one.
    pub fn of_end_of_job_line(line: &str) -> Option<Self> {
        let rest = line.strip_prefix(END_OF_JOB)?.strip_prefix(' ')?;
        rest.parse().ok().map(Self)
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A message from the agent to a worker process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToWorker {
    Execute {
        /// Echoed in every frame about this job.
        ticket: Ticket,
        job: Box<Job>,
        work_dir: PathBuf,
    },
    Cancel,
    Shutdown,
    /// The answer to a `submit`: the child's uuid, or why it was not recorded.
    Submitted {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uuid: Option<JobId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// A message from a worker process to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FromWorker {
    Ready {
        /// [`PROTOCOL_VERSION`] of the runtime; absent (1) from runtimes before it.
        #[serde(default = "first_version")]
        protocol: u32,
        pid: u32,
        types: Vec<String>,
    },
    Log {
        ticket: Ticket,
        line: LogLine,
    },
    Progress {
        ticket: Ticket,
        progress: Progress,
    },
    Result {
        ticket: Ticket,
        outcome: Outcome,
    },
    /// A child job for the scheduler; answered by `submitted` with the same id.
    Submit {
        ticket: Ticket,
        id: u64,
        job: Box<Job>,
    },
}

fn first_version() -> u32 {
    1
}

impl FromWorker {
    /// The ticket of the execute the frame answers (none for `ready`).
    pub fn ticket(&self) -> Option<Ticket> {
        match self {
            FromWorker::Ready { .. } => None,
            FromWorker::Log { ticket, .. }
            | FromWorker::Progress { ticket, .. }
            | FromWorker::Result { ticket, .. }
            | FromWorker::Submit { ticket, .. } => Some(*ticket),
        }
    }

    /// Its `op`, for messages.
    pub fn op(&self) -> &'static str {
        match self {
            FromWorker::Ready { .. } => "ready",
            FromWorker::Log { .. } => "log",
            FromWorker::Progress { .. } => "progress",
            FromWorker::Result { .. } => "result",
            FromWorker::Submit { .. } => "submit",
        }
    }
}

/// A piece of a byte stream cut into lines by a [`LineSplitter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A whole line, without its newline.
    Line(String),
    /// The first `cap` bytes of a longer line; the rest of it, up to its newline, is skipped.
    Cut(String),
}

/// Splits a stream of chunks into lines of at most `cap` bytes, keeping a partial line until
/// its end arrives. A line that grows past `cap` is given out as [`Piece::Cut`] at once and
/// the rest of it is dropped as it comes: memory stays within `cap` whatever is written.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    cap: usize,
    /// Inside the tail of a line that was cut.
    skipping: bool,
}

impl LineSplitter {
    pub fn new(cap: usize) -> Self {
        Self {
            buf: Vec::new(),
            cap,
            skipping: false,
        }
    }

    /// Takes the next chunk of the stream; `each` gets the pieces it completes.
    pub fn push(&mut self, mut chunk: &[u8], mut each: impl FnMut(Piece)) {
        while !chunk.is_empty() {
            let newline = chunk.iter().position(|b| *b == b'\n');
            if self.skipping {
                let Some(at) = newline else { return };
                chunk = &chunk[at + 1..];
                self.skipping = false;
                continue;
            }
            let room = self.cap.saturating_sub(self.buf.len());
            match newline {
                Some(at) if at <= room => {
                    self.buf.extend_from_slice(&chunk[..at]);
                    each(Piece::Line(self.take()));
                    chunk = &chunk[at + 1..];
                }
                None if chunk.len() <= room => {
                    self.buf.extend_from_slice(chunk);
                    return;
                }
                // The line goes past the cap.
                _ => {
                    self.buf.extend_from_slice(&chunk[..room]);
                    each(Piece::Cut(self.take()));
                    self.skipping = true;
                    chunk = &chunk[room..];
                }
            }
        }
    }

    /// The end of the stream: an unfinished last line, if any.
    pub fn finish(&mut self) -> Option<String> {
        let skipped = std::mem::take(&mut self.skipping);
        (!skipped && !self.buf.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        // Moved out, not copied: a line near the cap is not held twice, nor kept after.
        String::from_utf8(std::mem::take(&mut self.buf))
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

/// Cuts `text` to at most `max` bytes (at a character boundary), with a mark that says so.
pub fn cut_to(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    const MARK: &str = " […]";
    let mut at = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    text.truncate(at);
    text.push_str(MARK);
}

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<JobId, String>>>>>;

/// Sends one job's log lines, progress and child jobs up the protocol, with its ticket.
struct FrameSink {
    ticket: Ticket,
    out: mpsc::UnboundedSender<FromWorker>,
    /// Child jobs sent, waiting for the agent's answer.
    waiting: Waiting,
    next_id: Arc<AtomicU64>,
}

impl Sink for FrameSink {
    fn log(&self, mut line: LogLine) {
        cut_to(&mut line.message, MAX_LOG_LINE_BYTES);
        let _ = self.out.send(FromWorker::Log {
            ticket: self.ticket,
            line,
        });
    }
    fn progress(&self, mut progress: Progress) {
        if let Some(message) = &mut progress.message {
            cut_to(message, MAX_LOG_LINE_BYTES);
        }
        let _ = self.out.send(FromWorker::Progress {
            ticket: self.ticket,
            progress,
        });
    }
    fn submit(&self, job: Job) -> Submission {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(id, tx);
        }
        let sent = self.out.send(FromWorker::Submit {
            ticket: self.ticket,
            id,
            job: Box::new(job),
        });
        Box::pin(async move {
            anyhow::ensure!(sent.is_ok(), "the worker's output is closed");
            match rx.await {
                Ok(Ok(uuid)) => Ok(uuid),
                Ok(Err(message)) => Err(anyhow::anyhow!(message)),
                Err(_) => Err(anyhow::anyhow!("the agent gave no answer")),
            }
        })
    }
}

/// `frame` as one line within [`MAX_FRAME_BYTES`], or nothing to send: a result too large
/// (or that cannot be written as JSON) is replaced by a failure that says why; a child job
/// too large is refused to the Work that submitted it.
fn encode(frame: FromWorker, waiting: &Waiting) -> Option<Vec<u8>> {
    let too_large = match serde_json::to_vec(&frame) {
        Ok(mut line) if line.len() <= MAX_FRAME_BYTES => {
            line.push(b'\n');
            return Some(line);
        }
        Ok(line) => format!(
            "is {} bytes as JSON, over the {MAX_FRAME_BYTES} bytes a worker may send",
            line.len()
        ),
        Err(e) => format!("cannot be written as JSON: {e}"),
    };
    let replacement = match frame {
        FromWorker::Result { ticket, .. } => FromWorker::Result {
            ticket,
            outcome: Outcome::error(
                Status::Failed,
                "output_too_large",
                format!("the Work's output {too_large}"),
            ),
        },
        FromWorker::Submit { id, .. } => {
            let waiter = waiting.lock().ok().and_then(|mut w| w.remove(&id));
            if let Some(tx) = waiter {
                let _ = tx.send(Err(format!("the child job {too_large}")));
            }
            return None;
        }
        // Log lines and progress are cut before they get here; a ready is small.
        other => {
            eprintln!(
                "worker-runtime: dropping a {} frame that {too_large}",
                other.op()
            );
            return None;
        }
    };
    let mut line = serde_json::to_vec(&replacement).ok()?;
    line.push(b'\n');
    Some(line)
}

/// Serves the protocol on stdin/stdout until the end of stdin, `shutdown` or SIGTERM. First
/// it takes stdin and stdout away from the Work (see the module's doc), so this is for the
/// `worker-runtime serve` process only.
pub async fn serve(
    registry: Registry,
    aliases: Aliases,
    chromium: Arc<Chromium>,
) -> anyhow::Result<()> {
    let (input, output) = take_stdio()?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        terminate.recv().await;
        on_signal.cancel();
    });
    serve_on(registry, aliases, chromium, input, output, stop).await
}

/// Moves the protocol off descriptors 0 and 1: returns copies of them (closed on exec, so
/// programs the Work starts do not get them) and points 0 at `/dev/null`, 1 at stderr.
fn take_stdio() -> anyhow::Result<(tokio::fs::File, tokio::fs::File)> {
    use std::os::fd::AsFd;
    let input = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("cannot keep stdin for the protocol")?;
    let output = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .context("cannot keep stdout for the protocol")?;
    let null = std::fs::File::open("/dev/null").context("cannot open /dev/null")?;
    nix::unistd::dup2_stdin(&null).context("cannot point stdin at /dev/null")?;
    nix::unistd::dup2_stdout(std::io::stderr()).context("cannot point stdout at stderr")?;
    Ok((
        tokio::fs::File::from_std(input.into()),
        tokio::fs::File::from_std(output.into()),
    ))
}

/// Serves the protocol on `input`/`output` until the end of `input`, `shutdown` or `stop`;
/// every job gets the worker's `chromium`, which is shut down at the end.
pub async fn serve_on(
    registry: Registry,
    aliases: Aliases,
    chromium: Arc<Chromium>,
    input: impl AsyncRead + Unpin + Send + 'static,
    mut output: impl AsyncWrite + Unpin + Send + 'static,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let waiting: Waiting = Arc::default();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<FromWorker>();
    let refuse = waiting.clone();
    let writer = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            let Some(line) = encode(frame, &refuse) else {
                continue;
            };
            if output.write_all(&line).await.is_err() || output.flush().await.is_err() {
                break;
            }
        }
    });
    let registry = Arc::new(registry);
    let aliases = Arc::new(aliases);
    let types = registry.names().map(str::to_owned).collect();
    let _ = out_tx.send(FromWorker::Ready {
        protocol: PROTOCOL_VERSION,
        pid: std::process::id(),
        types,
    });

    let mut lines = BufReader::new(input).lines();
    let mut current: Option<CancellationToken> = None;
    let next_id = Arc::new(AtomicU64::new(1));
    loop {
        let line = tokio::select! {
            line = lines.next_line() => match line? {
                Some(line) => line,
                None => break,
            },
            _ = stop.cancelled() => break,
        };
        match serde_json::from_str::<ToWorker>(&line) {
            Ok(ToWorker::Execute {
                ticket,
                job,
                work_dir,
            }) => {
                let job = *job;
                let cancel = CancellationToken::new();
                current = Some(cancel.clone());
                let sink = Arc::new(FrameSink {
                    ticket,
                    out: out_tx.clone(),
                    waiting: waiting.clone(),
                    next_id: next_id.clone(),
                });
                let ctx = Context::new(job, work_dir, aliases.clone(), sink, cancel.clone())
                    .with_chromium(chromium.clone());
                let (registry, out) = (registry.clone(), out_tx.clone());
                tokio::spawn(async move {
                    // The agent enforces the timeout (hard); this one only bounds a lost agent.
                    let outcome =
                        crate::run(&registry, ctx, Duration::from_secs(7 * 24 * 3600), cancel)
                            .await;
                    // After whatever the Work wrote to stderr (or stdout, the same pipe): the
                    // agent waits for this line before it closes the job's logs. The newline
                    // first ends a line the Work may have left unfinished.
                    eprintln!("\n{}", ticket.end_of_job_line());
                    let _ = out.send(FromWorker::Result { ticket, outcome });
                });
            }
            Ok(ToWorker::Cancel) => {
                if let Some(c) = &current {
                    c.cancel();
                }
            }
            Ok(ToWorker::Shutdown) => break,
            Ok(ToWorker::Submitted { id, uuid, error }) => {
                let waiter = waiting.lock().ok().and_then(|mut w| w.remove(&id));
                if let Some(tx) = waiter {
                    let _ = tx.send(match (uuid, error) {
                        (Some(uuid), None) => Ok(uuid),
                        (_, error) => Err(error.unwrap_or_else(|| "no answer".into())),
                    });
                }
            }
            Err(e) => eprintln!("worker-runtime: ignoring an unreadable message: {e}"),
        }
    }
    if let Some(c) = &current {
        c.cancel();
    }
    chromium.shutdown().await;
    drop(out_tx);
    let _ = writer.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::{Value, json};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, Lines};

    use super::*;
    use crate::chromium::ChromiumArgs;

    #[test]
    fn chunks_become_whole_lines() {
        let mut split = LineSplitter::new(100);
        let mut lines = Vec::new();
        for chunk in ["{\"a\":", "1}\nsecond", " line\n", "\nnot yet"] {
            split.push(chunk.as_bytes(), |p| lines.push(p));
        }
        let want = ["{\"a\":1}", "second line", ""].map(|l| Piece::Line(l.into()));
        assert_eq!(lines, want);
        assert_eq!(split.finish().as_deref(), Some("not yet"));
        assert_eq!(split.finish(), None);
    }

    #[test]
    fn a_line_over_the_cap_is_cut_and_its_rest_skipped() {
        let mut split = LineSplitter::new(4);
        let mut pieces = Vec::new();
        // Exactly the cap, then over it across chunks, then over it within one chunk.
        for chunk in ["abcd\nefg", "hij", "klm\nnop\n", "qrstuvw\nxy"] {
            split.push(chunk.as_bytes(), |p| pieces.push(p));
        }
        assert_eq!(
            pieces,
            [
                Piece::Line("abcd".into()),
                Piece::Cut("efgh".into()),
                Piece::Line("nop".into()),
                Piece::Cut("qrst".into()),
            ]
        );
        assert_eq!(split.finish().as_deref(), Some("xy"));
        // An unfinished line that was cut has no last piece.
        split.push(b"123456", |p| pieces.push(p));
        assert_eq!(split.finish(), None);
    }

    #[test]
    fn a_stream_without_newlines_costs_no_more_than_the_cap() {
        let mut split = LineSplitter::new(1024);
        let mut pieces = 0;
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..1024 {
            split.push(&chunk, |_| pieces += 1);
            assert!(split.buf.capacity() <= 2 * 1024, "{}", split.buf.capacity());
        }
        assert_eq!(pieces, 1, "one cut line for 64 MiB");
    }

    #[test]
    fn only_a_well_formed_end_of_job_line_names_a_ticket() {
        let ticket = Ticket::fresh();
        assert_ne!(ticket, Ticket::fresh());
        assert_eq!(
            Ticket::of_end_of_job_line(&ticket.end_of_job_line()),
            Some(ticket)
        );
        for forged in [
            END_OF_JOB.to_owned(),
            format!("{END_OF_JOB} "),
            format!("{END_OF_JOB} x1"),
            format!("{END_OF_JOB}1"),
            format!("say {}", ticket.end_of_job_line()),
        ] {
            assert_eq!(Ticket::of_end_of_job_line(&forged), None, "{forged:?}");
        }
    }

    #[test]
    fn text_is_cut_at_a_character_boundary_with_a_mark() {
        let mut text = "é".repeat(100);
        cut_to(&mut text, 51);
        assert!(text.len() <= 51 && text.ends_with(" […]"), "{text}");
        let mut short = "short".to_owned();
        cut_to(&mut short, 51);
        assert_eq!(short, "short");
    }

    /// Logs a line of `bytes` bytes.
    struct BigLog;

    #[async_trait::async_trait]
    impl crate::Work for BigLog {
        async fn execute(&self, ctx: &Context) -> anyhow::Result<Value> {
            let bytes: usize = serde_json::from_value(ctx.payload().clone())?;
            ctx.info("y".repeat(bytes));
            Ok(Value::Null)
        }
    }

    /// A runtime served on in-memory pipes: the agent's end of them.
    struct Agent {
        to: DuplexStream,
        from: Lines<BufReader<DuplexStream>>,
    }

    impl Agent {
        fn start() -> Agent {
            #[derive(Parser)]
            struct Args {
                #[command(flatten)]
                chromium: ChromiumArgs,
            }
            let chromium = Arc::new(Chromium::new(Args::parse_from(["t"]).chromium));
            let (to, input) = tokio::io::duplex(1024 * 1024);
            let (output, from) = tokio::io::duplex(1024 * 1024);
            let mut registry = Registry::with_builtins();
            registry.register("test.big-log", BigLog);
            tokio::spawn(serve_on(
                registry,
                Aliases::default(),
                chromium,
                input,
                output,
                CancellationToken::new(),
            ));
            Agent {
                to,
                from: BufReader::new(from).lines(),
            }
        }

        async fn send(&mut self, message: &ToWorker) {
            let mut line = serde_json::to_vec(message).expect("serializes");
            line.push(b'\n');
            self.to.write_all(&line).await.expect("sent");
        }

        async fn next(&mut self) -> (FromWorker, usize) {
            let line = self
                .from
                .next_line()
                .await
                .expect("reads")
                .expect("a frame");
            (serde_json::from_str(&line).expect("a frame"), line.len())
        }

        /// Runs a job; returns its frames up to its result, and the longest line.
        async fn run(
            &mut self,
            ticket: Ticket,
            work_type: &str,
            payload: Value,
        ) -> Vec<FromWorker> {
            let mut job = Job::new(work_type, payload);
            job.uuid = Some(JobId::random());
            let dir = std::env::temp_dir();
            self.send(&ToWorker::Execute {
                ticket,
                job: Box::new(job),
                work_dir: dir,
            })
            .await;
            let mut frames = Vec::new();
            loop {
                let (frame, len) = self.next().await;
                assert!(len <= MAX_FRAME_BYTES, "a frame of {len} bytes");
                let last = matches!(frame, FromWorker::Result { .. });
                frames.push(frame);
                if last {
                    return frames;
                }
            }
        }
    }

    #[tokio::test]
    async fn every_frame_of_a_job_carries_its_ticket() {
        let mut agent = Agent::start();
        let (ready, _) = agent.next().await;
        assert!(matches!(
            ready,
            FromWorker::Ready {
                protocol: PROTOCOL_VERSION,
                ..
            }
        ));
        for _ in 0..2 {
            let ticket = Ticket::fresh();
            let frames = agent.run(ticket, "demo.log", json!({"lines": 3})).await;
            assert_eq!(frames.len(), 4, "{frames:?}");
            assert!(frames.iter().all(|f| f.ticket() == Some(ticket)));
        }
    }

    #[tokio::test]
    async fn frames_stay_within_the_bound() {
        let mut agent = Agent::start();
        agent.next().await;
        let ticket = Ticket::fresh();
        // An output over the bound: the job fails and says why.
        let big = "x".repeat(MAX_FRAME_BYTES + 1);
        let frames = agent.run(ticket, "demo.echo", json!(big)).await;
        let Some(FromWorker::Result { outcome, .. }) = frames.last() else {
            panic!("{frames:?}")
        };
        assert_eq!(outcome.status, Status::Failed);
        let error = outcome.error.as_ref().expect("an error");
        assert_eq!(error.kind, "output_too_large");
        // A log line over the bound is cut.
        let frames = agent.run(ticket, "test.big-log", json!(big.len())).await;
        let FromWorker::Log { line, .. } = &frames[0] else {
            panic!("{frames:?}")
        };
        assert!(line.message.len() <= MAX_LOG_LINE_BYTES);
        assert!(line.message.ends_with(" […]"));
    }
}
