//! The command line: argument parsing and dispatch.
//!
//! `--config` is global, so it works before or after the subcommand.
//! Configuration errors exit with status 64 and name the key; a damaged
//! outbox makes `serve` (and every `--offline` command) exit 65 with its
//! path and the way out.
//!
//! Operator commands (`send`, `health`, `outbox`, `dead-letters`,
//! `breaker`, `verify-workers`) live in [`operator`] and its siblings: [`admin_client`] talks
//! to the running server, [`offline`] opens a stopped server's outbox,
//! [`output`] prints tables, JSON and progress bars.

use crate::app::{shutdown_signal, Application};
use crate::config::{self, ConfigError, CONFIG_ERROR_EXIT_CODE, DAMAGED_OUTBOX_EXIT_CODE};
use crate::outbox::{OutboxError, StorageError};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

pub mod admin_client;
pub mod command;
pub mod dead_letters;
pub mod offline;
pub mod operator;
pub mod outbox;
pub mod output;

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
    /// Apply the tracking database migrations (`serve` also applies them at
    /// start-up, in the background, unless tracking.migrate_on_start is off).
    Migrate,
    /// What Celery workers must match (exchange, queues and bindings, the
    /// tracking queue, routing, result backend), from this configuration;
    /// the same document as `GET /v1/topology`. `--format celery` prints
    /// the Celery settings `taskgate_client.worker.configure` applies.
    Topology {
        #[arg(long, value_enum, default_value_t = TopologyFormat::Topology)]
        format: TopologyFormat,
    },
    #[command(flatten)]
    Operator(operator::OperatorCommand),
}

/// What `taskgate topology` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopologyFormat {
    /// The topology document (JSON), as `GET /v1/topology` serves it.
    Topology,
    /// The Celery settings for a worker (JSON).
    Celery,
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
        Command::Operator(command) => operator::run(&settings, cli.json, command),
        Command::Migrate => migrate(&settings, cli.json),
        Command::Topology { format } => {
            let topology = crate::topology::Topology::from_settings(&settings);
            let document = match format {
                TopologyFormat::Topology => serde_json::to_value(&topology).expect("the topology serializes"),
                TopologyFormat::Celery => topology.celery_settings(),
            };
            println!("{}", serde_json::to_string_pretty(&document).expect("JSON serializes"));
            ExitCode::SUCCESS
        }
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
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .thread_stack_size(THREAD_STACK_BYTES)
                .enable_all()
                .build()
            {
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
                Err(error) if is_damaged_outbox(&error) => {
                    eprintln!("taskgate: {error:#}");
                    ExitCode::from(DAMAGED_OUTBOX_EXIT_CODE as u8)
                }
                Err(error) => {
                    eprintln!("taskgate: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Whether `serve` stopped because its outbox is damaged (exit 65).
fn is_damaged_outbox(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<OutboxError>(),
            Some(OutboxError::Storage(StorageError::Corrupt(_)))
        ) || matches!(cause.downcast_ref::<StorageError>(), Some(StorageError::Corrupt(_)))
    })
}

/// `taskgate migrate`: exit 0 once every migration is applied, 1 with the
/// reason when the database refuses or does not answer in time.
fn migrate(settings: &config::Settings, json: bool) -> ExitCode {
    let endpoint = config::mask_url_password(&settings.tracking.database_url);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("taskgate: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::tracking::migrate(&settings.tracking)) {
        Ok(()) => {
            if json {
                println!("{}", serde_json::json!({"status": "migrated", "database": endpoint}));
            } else {
                println!("tracking database {endpoint} is up to date");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("taskgate: migrating {endpoint} failed: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Stack of every thread of `serve` (tokio's workers, lapin's I/O
/// thread): deeply nested AMQP headers from the broker are parsed and
/// dropped recursively (see `main.rs`).
pub const THREAD_STACK_BYTES: usize = 64 << 20;

/// Without `RUST_LOG`: info, lapin's own chatter at warn, and lapin's
/// returned-message warning (the whole message as bytes) off, since the
/// AMQP publisher logs a returned message as one readable line.
const DEFAULT_LOG_FILTER: &str = "info,lapin=warn,lapin::returned_messages=error";

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
