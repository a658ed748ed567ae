//! The protocol between a pool agent and a `worker-runtime serve` process: one JSON object per
//! line, the agent's on the worker's stdin, the worker's on its stdout. What the Work writes
//! to stderr is captured by the agent as log lines; a stdout line that is not a message is
//! kept as a log line too, so a stray `println!` cannot break the conversation.
//!
//! ```text
//! worker: {"op":"ready","pid":1234,"types":["demo.echo",…]}
//! agent:  {"op":"execute","job":{…},"work_dir":"/data/agent-a1/work/<uuid>"}
//! worker: {"op":"log","line":{…}}   {"op":"progress","progress":{…}}   (any number)
//! worker: {"op":"submit","id":1,"job":{…}}   (a child job; any number)
//! agent:  {"op":"submitted","id":1,"uuid":"…"}   (or "error": "…": the scheduler's answer)
//! worker: {"op":"result","outcome":{"status":"succeeded","output":…}}
//! agent:  {"op":"cancel"}  (the job in hand stops at its next await point)
//! agent:  {"op":"shutdown"} (or closes stdin): the worker exits
//! ```
//! Timeouts are the agent's: it ends an overrunning worker with SIGTERM, then SIGKILL. On
//! SIGTERM, as at the end of stdin, the worker ends its Chromium (process and profile folder,
//! or container) before it exits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rota_common::wire::{Job, JobId, LogLine, Progress};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::chromium::Chromium;
use crate::context::Submission;
use crate::{Aliases, Context, Outcome, Registry, Sink};

/// A message from the agent to a worker process.
/// The line a runtime writes to stderr after a job, before its `result`: stdout and stderr
/// are separate pipes, so the agent reads stderr up to this line to have all of the job's
/// log lines.
pub const END_OF_JOB: &str = "\u{1e}rota:end-of-job";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToWorker {
    Execute {
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
        pid: u32,
        types: Vec<String>,
    },
    Log {
        line: LogLine,
    },
    Progress {
        progress: Progress,
    },
    Result {
        outcome: Outcome,
    },
    /// A child job for the scheduler; answered by `submitted` with the same id.
    Submit {
        id: u64,
        job: Box<Job>,
    },
}

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<JobId, String>>>>>;

/// Sends a Work's log lines, progress and child jobs up the protocol.
struct FrameSink {
    out: mpsc::UnboundedSender<FromWorker>,
    /// Child jobs sent, waiting for the agent's answer.
    waiting: Waiting,
    next_id: Arc<AtomicU64>,
}

impl Sink for FrameSink {
    fn log(&self, line: LogLine) {
        let _ = self.out.send(FromWorker::Log { line });
    }
    fn progress(&self, progress: Progress) {
        let _ = self.out.send(FromWorker::Progress { progress });
    }
    fn submit(&self, job: Job) -> Submission {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(id, tx);
        }
        let sent = self.out.send(FromWorker::Submit {
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

/// Serves the protocol on stdin/stdout until `shutdown`, the end of stdin or SIGTERM; every
/// job gets the worker's `chromium`, which is shut down at the end.
pub async fn serve(
    registry: Registry,
    aliases: Aliases,
    chromium: Arc<Chromium>,
) -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<FromWorker>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(frame) = out_rx.recv().await {
            let Ok(mut line) = serde_json::to_vec(&frame) else {
                continue;
            };
            line.push(b'\n');
            if stdout.write_all(&line).await.is_err() || stdout.flush().await.is_err() {
                break;
            }
        }
    });
    let registry = Arc::new(registry);
    let aliases = Arc::new(aliases);
    let types = registry.names().map(str::to_owned).collect();
    let _ = out_tx.send(FromWorker::Ready {
        pid: std::process::id(),
        types,
    });

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut current: Option<CancellationToken> = None;
    let waiting: Waiting = Arc::default();
    let next_id = Arc::new(AtomicU64::new(1));
    loop {
        let line = tokio::select! {
            line = lines.next_line() => match line? {
                Some(line) => line,
                None => break,
            },
            _ = terminate.recv() => break,
        };
        match serde_json::from_str::<ToWorker>(&line) {
            Ok(ToWorker::Execute { job, work_dir }) => {
                let job = *job;
                let cancel = CancellationToken::new();
                current = Some(cancel.clone());
                let sink = Arc::new(FrameSink {
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
                    // After whatever the Work wrote to stderr: the agent waits for this line
                    // before it closes the job's logs.
                    eprintln!("{END_OF_JOB}");
                    let _ = out.send(FromWorker::Result { outcome });
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
