//! The command line: argument parsing and dispatch.
//!
//! `--config` is global, so it works before or after the subcommand.
//! Configuration errors exit with status 64 and name the key.

use crate::app::{shutdown_signal, Application};
use crate::config::{self, ConfigError, CONFIG_ERROR_EXIT_CODE};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "taskgate", version, about = "A resilient broker gateway for Celery tasks")]
pub struct Cli {
    /// TOML configuration file, layered over the built-in defaults and
    /// under TASKGATE_<SECTION>__<KEY> environment variables.
    #[arg(long, short = 'c', global = true, env = "TASKGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (HTTP API, outbox relay, health).
    Serve,
    /// Validate the configuration and print the effective settings, secrets masked.
    CheckConfig,
}

fn config_failure(error: &ConfigError) -> ExitCode {
    eprintln!("taskgate: {error}");
    ExitCode::from(CONFIG_ERROR_EXIT_CODE as u8)
}

pub fn run(cli: Cli) -> ExitCode {
    let settings = match config::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => return config_failure(&error),
    };
    match cli.command {
        Command::CheckConfig => {
            if cli.json {
                let masked = settings.masked();
                println!("{}", serde_json::to_string_pretty(&masked).expect("settings serialize"));
            } else {
                println!("# configuration is valid; effective settings (secrets masked):");
                print!("{}", settings.to_masked_toml());
            }
            ExitCode::SUCCESS
        }
        Command::Serve => {
            init_tracing();
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("taskgate: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let outcome = runtime.block_on(async move {
                let application = Application::build(settings).await?;
                application.run_until_stopped(shutdown_signal()).await
            });
            match outcome {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("taskgate: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
