//! `pool-agent`: wires configuration, logging and signals to [`rota_pool_agent::run`].

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rota_common::config::BrokerArgs;
use rota_pool_agent::AgentConfig;

/// Rota's pool agent: runs Work from RabbitMQ on a pool of Workers.
///
/// Every flag can also be set in the environment (ROTA_…) or in a TOML file given with
/// --config (keys are the flag names).
#[derive(Debug, Parser)]
#[command(name = "pool-agent", version)]
struct Cli {
    /// A TOML file of settings (flags and environment variables take precedence).
    #[arg(long, env = "ROTA_CONFIG", global = true)]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once, at start
enum Command {
    /// Serves the jobs queues until SIGINT or SIGTERM.
    Run(AgentConfig),
    /// Lists the work types this agent can run.
    Types,
}

fn main() -> ExitCode {
    let cli: Cli = match rota_common::config::parse() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("pool-agent: {e:#}");
            return ExitCode::from(2);
        }
    };
    rota_common::telemetry::init(cli.broker.log_format, "info,lapin=off");
    let registry = rota_worker_runtime::Registry::with_builtins();
    let config = match cli.command {
        Command::Types => {
            registry.names().for_each(|n| println!("{n}"));
            return ExitCode::SUCCESS;
        }
        Command::Run(config) => config,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pool-agent: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        let names = cli.broker.names()?;
        let shutdown = rota_common::shutdown::on_signals();
        rota_pool_agent::run(config, &cli.broker.amqp_url(), names, registry, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
