//! The taskgate binary: parse arguments and hand over to the library.

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    taskgate::cli::run(taskgate::cli::Cli::parse())
}
