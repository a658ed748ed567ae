//! The `worker-runtime` command line, as a library entry point: a crate with its own work
//! types builds its runtime with `rota_worker_runtime::cli::main(registry)`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rota_common::wire::{Job, JobId};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::chromium::{Chromium, ChromiumArgs};
use crate::context::BufferSink;
use crate::{Aliases, Context, Registry, run};

/// Rota's worker runtime: runs Work of the registered types.
#[derive(Debug, Parser)]
#[command(name = "worker-runtime", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Lists the registered work types.
    List,
    /// Serves a pool agent on stdin/stdout (the agent starts this; see `protocol`).
    Serve {
        /// Path alias NAME=DIR (repeatable).
        #[arg(long)]
        alias: Vec<String>,
        #[command(flatten)]
        chromium: ChromiumArgs,
    },
    /// Runs one Work here, without a broker, and prints its result as JSON (for trying out
    /// and debugging a work type). Exits non-zero unless it succeeded.
    Run {
        /// The work type, e.g. demo.echo.
        #[arg(long = "type")]
        work_type: String,
        /// The payload, as JSON.
        #[arg(long, default_value = "null")]
        payload: String,
        /// Path alias NAME=DIR (repeatable).
        #[arg(long)]
        alias: Vec<String>,
        /// How long the Work may run.
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
        /// The Work's working directory (default: a new temporary one).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        #[command(flatten)]
        chromium: ChromiumArgs,
    },
}

/// Runs the `worker-runtime` command line with `registry`; returns the exit code.
pub fn main(registry: Registry) -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("worker-runtime: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = runtime.block_on(execute(cli, registry));
    // A blocking read of stdin may still be waiting (after SIGTERM): do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("worker-runtime: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn execute(cli: Cli, registry: Registry) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::List => {
            for name in registry.names() {
                println!("{name}");
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Serve { alias, chromium } => {
            chromium.check()?;
            let chromium = Arc::new(Chromium::new(chromium));
            crate::protocol::serve(registry, Aliases::parse(&alias)?, chromium).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Run {
            work_type,
            payload,
            alias,
            timeout_s,
            work_dir,
            chromium,
        } => {
            chromium.check()?;
            let chromium = Arc::new(Chromium::new(chromium));
            let payload: Value = serde_json::from_str(&payload)
                .map_err(|e| anyhow::anyhow!("--payload is not JSON: {e}"))?;
            let aliases = Aliases::parse(&alias)?;
            let temp;
            let work_dir = match work_dir {
                Some(d) => d,
                None => {
                    temp = std::env::temp_dir().join(format!("rota-work-{}", std::process::id()));
                    temp.clone()
                }
            };
            std::fs::create_dir_all(&work_dir)?;
            let mut job = Job::new(work_type, payload);
            job.uuid = Some(JobId::random());
            let sink = Arc::new(BufferSink::new(|p| eprintln!("progress: {p:?}")));
            let ctx = Context::new(
                job,
                work_dir,
                Arc::new(aliases),
                sink.clone(),
                CancellationToken::new(),
            )
            .with_chromium(chromium.clone());
            let outcome = run(
                &registry,
                ctx,
                Duration::from_secs(timeout_s),
                CancellationToken::new(),
            )
            .await;
            chromium.shutdown().await;
            let (logs, _) = sink.take_logs();
            let report = json!({ "status": outcome.status, "output": outcome.output, "error": outcome.error, "logs": logs });
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if outcome.status == rota_common::wire::Status::Succeeded {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
    }
}
