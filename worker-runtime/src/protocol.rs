//! The protocol between a pool agent and a `worker-runtime serve` process: one JSON object per
//! line, the agent's on the worker's stdin, the worker's on its stdout. What the Work writes
//! to stderr is captured by the agent as log lines; a stdout line that is not a message is
//! kept as a log line too, so a stray `println!` cannot break the conversation.
//!
//! ```text
//! worker: {"op":"ready","pid":1234,"types":["demo.echo",…]}
//! agent:  {"op":"execute","job":{…},"work_dir":"/data/agent-a1/work/<uuid>"}
//! worker: {"op":"log","line":{…}}   {"op":"progress","progress":{…}}   (any number)
//! worker: {"op":"result","outcome":{"status":"succeeded","output":…}}
//! agent:  {"op":"cancel"}  (the job in hand stops at its next await point)
//! agent:  {"op":"shutdown"} (or closes stdin): the worker exits
//! ```
//! Timeouts are the agent's: it ends an overrunning worker with SIGTERM, then SIGKILL.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rota_common::wire::{Job, LogLine, Progress};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{Aliases, Context, Outcome, Registry, Sink};

/// A message from the agent to a worker process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToWorker {
    Execute { job: Box<Job>, work_dir: PathBuf },
    Cancel,
    Shutdown,
}

/// A message from a worker process to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FromWorker {
    Ready { pid: u32, types: Vec<String> },
    Log { line: LogLine },
    Progress { progress: Progress },
    Result { outcome: Outcome },
}

/// Sends a Work's log lines and progress up the protocol.
struct FrameSink(mpsc::UnboundedSender<FromWorker>);

impl Sink for FrameSink {
    fn log(&self, line: LogLine) {
        let _ = self.0.send(FromWorker::Log { line });
    }
    fn progress(&self, progress: Progress) {
        let _ = self.0.send(FromWorker::Progress { progress });
    }
}

/// Serves the protocol on stdin/stdout until `shutdown` or the end of stdin.
pub async fn serve(registry: Registry, aliases: Aliases) -> anyhow::Result<()> {
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
    while let Some(line) = lines.next_line().await? {
        match serde_json::from_str::<ToWorker>(&line) {
            Ok(ToWorker::Execute { job, work_dir }) => {
                let job = *job;
                let cancel = CancellationToken::new();
                current = Some(cancel.clone());
                let sink = Arc::new(FrameSink(out_tx.clone()));
                let ctx = Context::new(job, work_dir, aliases.clone(), sink, cancel.clone());
                let (registry, out) = (registry.clone(), out_tx.clone());
                tokio::spawn(async move {
                    // The agent enforces the timeout (hard); this one only bounds a lost agent.
                    let outcome =
                        crate::run(&registry, ctx, Duration::from_secs(7 * 24 * 3600), cancel)
                            .await;
                    let _ = out.send(FromWorker::Result { outcome });
                });
            }
            Ok(ToWorker::Cancel) => {
                if let Some(c) = &current {
                    c.cancel();
                }
            }
            Ok(ToWorker::Shutdown) => break,
            Err(e) => eprintln!("worker-runtime: ignoring an unreadable message: {e}"),
        }
    }
    drop(out_tx);
    let _ = writer.await;
    Ok(())
}
