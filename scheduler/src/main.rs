//! `scheduler`: wires configuration, logging and signals to the library.

use std::process::ExitCode;

use rota_scheduler::cli::{Cli, Command, client_command};

fn main() -> ExitCode {
    let cli: Cli = match rota_common::config::parse() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("scheduler: {e:#}");
            return ExitCode::from(2);
        }
    };
    // The daemon logs everything but its store's routine (fjall logs each table it opens); the
    // commands a person runs show only what matters.
    let daemon = matches!(cli.command, Command::Run(_));
    let default_filter = if daemon {
        "info,lapin=off,fjall=warn,lsm_tree=warn"
    } else {
        "warn,lapin=off"
    };
    rota_common::telemetry::init(cli.broker.log_format, default_filter);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("scheduler: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let broker = cli.broker;
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(mut config) => {
                if let Some(path) = &cli.config {
                    config.schedules = rota_common::config::section(path, "schedule")?;
                }
                let shutdown = rota_common::shutdown::on_signals();
                rota_scheduler::run(config, &broker.amqp_url(), broker.names()?, shutdown).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Demo(args) => rota_scheduler::demo::run(&broker, *args).await,
            Command::Bench(args) => rota_scheduler::bench::run(&broker, args).await,
            Command::SetupUsers(args) => rota_scheduler::cli::setup_users(&broker, args).await,
            other => client_command(&broker, other).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) if daemon => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("scheduler: {e:#}");
            ExitCode::from(2)
        }
    }
}
