//! Operator commands: `send`, `health`, `outbox …`, `dead-letters …`,
//! `breaker …` and `verify-workers`. They talk to the running server's API (address and admin
//! token from the same configuration the server reads); `outbox` and
//! `dead-letters` can also work `--offline` on a stopped server's data
//! directory.
//!
//! Exit statuses: 0 success; 1 the operation failed (server unreachable,
//! refused, bad input), with a message on stderr; `health` answers 0 pass,
//! 1 warn, 2 fail (an unreachable server is a fail); `verify-workers` exits
//! 1 when any check of any queue failed (the report says which); `outbox drain` exits
//! [`EXIT_DRAIN_TIMED_OUT`] when tasks were still waiting at `--timeout`;
//! `outbox salvage` exits [`EXIT_SALVAGE_INCOMPLETE`] when some records
//! could not be read; an `--offline` command on a damaged outbox exits
//! [`crate::config::DAMAGED_OUTBOX_EXIT_CODE`] (65).

pub use super::command::{
    describe_breaker, CommandError, ServerArgs, EXIT_DRAIN_TIMED_OUT, EXIT_FAILED, EXIT_HEALTH_FAIL, EXIT_HEALTH_WARN,
    EXIT_SALVAGE_INCOMPLETE,
};
use super::output::{self, print_json};
use super::{dead_letters, outbox};
use crate::config::Settings;
use crate::http::admin::BreakerView;
use crate::relay::breaker::BreakerState;
use crate::verify::{VerifyReport, VerifyRequest};
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Enqueue one task through the running server (POST /v1/tasks).
    Send(Box<SendArgs>),
    /// The server's health; exits 0 for pass, 1 for warn, 2 for fail.
    Health(HealthArgs),
    /// Inspect and manage the outbox: stats, list, drain, export, import, purge.
    Outbox(outbox::OutboxArgs),
    /// Inspect, requeue and purge dead letters.
    DeadLetters(dead_letters::DeadLetterArgs),
    /// The circuit breaker: status, forced open or closed, release.
    Breaker(BreakerArgs),
    /// Send a probe task to each queue and check, per queue, that a worker
    /// consumed it, its result reached celery_taskmeta, a task it scheduled
    /// itself was tracked, and its declarations match the topology
    /// (POST /v1/verify-workers). Exits 1 on any failure.
    VerifyWorkers(VerifyWorkersArgs),
}

#[derive(Debug, Args)]
pub struct VerifyWorkersArgs {
    /// Seconds to wait for the workers' answers (1 to 300).
    #[arg(long, value_name = "SECONDS", default_value_t = crate::verify::DEFAULT_TIMEOUT_SECONDS)]
    pub timeout: u64,
    /// Verify only this queue (repeatable) [default: every configured queue].
    #[arg(long = "queue", value_name = "QUEUE")]
    pub queues: Vec<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Celery task name, e.g. export.project.
    pub task: String,
    /// Positional arguments as a JSON array.
    #[arg(long, value_name = "JSON", default_value = "[]")]
    pub args: String,
    /// Keyword arguments as a JSON object.
    #[arg(long, value_name = "JSON", default_value = "{}")]
    pub kwargs: String,
    /// Task id (a UUID) instead of a generated one.
    #[arg(long)]
    pub id: Option<String>,
    /// Routing key instead of the configured or default one.
    #[arg(long)]
    pub routing_key: Option<String>,
    /// Seconds from now before a worker may run it.
    #[arg(long, conflicts_with = "eta")]
    pub countdown: Option<f64>,
    /// RFC 3339 time before which a worker does not run it.
    #[arg(long, value_name = "TIME")]
    pub eta: Option<String>,
    /// Seconds from now, or an RFC 3339 time, after which it is not run.
    #[arg(long, value_name = "SECONDS|TIME")]
    pub expires: Option<String>,
    /// A configured queue to send it to (routed by that queue's binding key).
    #[arg(long, conflicts_with = "routing_key")]
    pub queue: Option<String>,
    /// A task the worker runs with the result on success, repeatable
    /// (Celery's link=TASK.s()).
    #[arg(long = "link", value_name = "TASK")]
    pub links: Vec<String>,
    /// Message priority (the queue must support priorities to honour it).
    #[arg(long)]
    pub priority: Option<u8>,
    /// Makes a retried `send` safe: the server answers a repeat with the first answer.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Message property, repeatable: --property creator_id=u1.
    #[arg(long = "property", value_name = "KEY=VALUE")]
    pub properties: Vec<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct BreakerArgs {
    #[command(subcommand)]
    pub command: BreakerCommand,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Subcommand)]
pub enum BreakerCommand {
    /// State, since when, and when the next probe is due.
    Status,
    /// Force the breaker open: nothing is published, tasks spool (maintenance).
    Open,
    /// Force the breaker closed: failures no longer open it.
    Close,
    /// Back to automatic operation (starting closed).
    Release,
}

/// Runs one operator command and reports its outcome as an exit status.
pub fn run(settings: &Settings, json: bool, command: OperatorCommand) -> ExitCode {
    let outcome = match command {
        OperatorCommand::Send(args) => send(settings, json, &args),
        OperatorCommand::Health(args) => return health(settings, json, &args),
        OperatorCommand::Outbox(args) => outbox::run(settings, json, args),
        OperatorCommand::DeadLetters(args) => dead_letters::run(settings, json, args),
        OperatorCommand::Breaker(args) => breaker(settings, json, &args),
        OperatorCommand::VerifyWorkers(args) => return verify_workers(settings, json, &args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("taskgate: {error}");
            error.exit_code()
        }
    }
}

fn parse_json(flag: &str, text: &str) -> Result<Value, CommandError> {
    serde_json::from_str(text).map_err(|error| CommandError::Invalid(format!("{flag} is not valid JSON: {error}")))
}

/// `--expires 10` is seconds (a number in the request), anything else a
/// time the server parses (and refuses, naming `expires`, if it is not one).
fn expires_value(text: &str) -> Value {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() => Value::from(seconds),
        _ => Value::String(text.to_owned()),
    }
}

fn send(settings: &Settings, json: bool, args: &SendArgs) -> Result<(), CommandError> {
    let positional = parse_json("--args", &args.args)?;
    if !positional.is_array() {
        return Err(CommandError::Invalid(format!(
            "--args must be a JSON array, like '[\"org\", 1]', not {positional}"
        )));
    }
    let keywords = parse_json("--kwargs", &args.kwargs)?;
    if !keywords.is_object() {
        return Err(CommandError::Invalid(format!(
            "--kwargs must be a JSON object, like '{{\"output_type\": \"xls\"}}', not {keywords}"
        )));
    }
    let mut properties = Map::new();
    for property in &args.properties {
        let (key, value) = property
            .split_once('=')
            .ok_or_else(|| CommandError::Invalid(format!("--property {property:?} is not KEY=VALUE")))?;
        properties.insert(key.to_owned(), Value::String(value.to_owned()));
    }
    let mut body = json!({"task": args.task, "args": positional, "kwargs": keywords});
    let optional = [
        ("id", args.id.clone().map(Value::from)),
        ("routing_key", args.routing_key.clone().map(Value::from)),
        ("countdown", args.countdown.map(Value::from)),
        ("eta", args.eta.clone().map(Value::from)),
        ("expires", args.expires.as_deref().map(expires_value)),
        ("queue", args.queue.clone().map(Value::from)),
        ("priority", args.priority.map(Value::from)),
        (
            "link",
            (!args.links.is_empty())
                .then(|| Value::Array(args.links.iter().map(|task| json!({"task": task})).collect())),
        ),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            body[key] = value;
        }
    }
    if !properties.is_empty() {
        body["properties"] = Value::Object(properties);
    }
    let client = args.server.client(settings)?;
    let headers: Vec<(&str, &str)> = args
        .idempotency_key
        .as_deref()
        .map(|key| vec![("idempotency-key", key)])
        .unwrap_or_default();
    let accepted: Value = client.post_json("/v1/tasks", &body, &headers)?;
    if json {
        print_json(&accepted);
    } else {
        let queues: Vec<&str> = accepted["queues"]
            .as_array()
            .map(|queues| queues.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!(
            "accepted {} ({}, routing key {:?} -> {})",
            accepted["id"].as_str().unwrap_or("?"),
            accepted["task"].as_str().unwrap_or(&args.task),
            accepted["routing_key"].as_str().unwrap_or(""),
            queues.join(", ")
        );
    }
    Ok(())
}

fn health(settings: &Settings, json: bool, args: &HealthArgs) -> ExitCode {
    let answer = args
        .server
        .client(settings)
        .and_then(|client| client.get_with_status("/v1/health"));
    let report = match answer {
        Ok((_, report)) => report,
        Err(error) => {
            // No answer is the worst health there is.
            eprintln!("taskgate: {error}");
            if json {
                print_json(&json!({"status": "fail", "error": error.to_string()}));
            }
            return ExitCode::from(EXIT_HEALTH_FAIL);
        }
    };
    let status = report["status"].as_str().unwrap_or("fail").to_owned();
    if json {
        print_json(&report);
    } else {
        println!(
            "{status}: async work is {}",
            if report["async_available"].as_bool() == Some(true) {
                "available"
            } else {
                "unavailable (tasks spool in the outbox)"
            }
        );
        let mut rows = Vec::new();
        if let Some(checks) = report["checks"].as_object() {
            for (name, list) in checks {
                let check = &list[0];
                let observed = match &check["observedValue"] {
                    Value::String(text) => text.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                let unit = check["observedUnit"].as_str().unwrap_or("");
                rows.push(vec![
                    name.clone(),
                    check["status"].as_str().unwrap_or("?").to_owned(),
                    format!("{observed} {unit}").trim().to_owned(),
                    output::truncate(check["output"].as_str().unwrap_or(""), 60),
                ]);
            }
        }
        print!("{}", output::table(&["CHECK", "STATUS", "VALUE", "OUTPUT"], &rows));
    }
    match status.as_str() {
        "pass" => ExitCode::SUCCESS,
        "warn" => ExitCode::from(EXIT_HEALTH_WARN),
        _ => ExitCode::from(EXIT_HEALTH_FAIL),
    }
}

fn breaker(settings: &Settings, json: bool, args: &BreakerArgs) -> Result<(), CommandError> {
    let client = args.server.client(settings)?;
    let view: BreakerView = match args.command {
        BreakerCommand::Status => client.get("/v1/breaker")?,
        BreakerCommand::Open => client.post("/v1/breaker/open")?,
        BreakerCommand::Close => client.post("/v1/breaker/close")?,
        BreakerCommand::Release => client.post("/v1/breaker/release")?,
    };
    if json {
        print_json(&view);
        return Ok(());
    }
    println!("{}", describe_breaker(&view));
    match view.state {
        BreakerState::ForcedOpen => {
            println!("nothing is published until `taskgate breaker release` (or `close`)")
        }
        BreakerState::ForcedClosed => println!("failures do not open it until `taskgate breaker release`"),
        _ => {}
    }
    Ok(())
}

fn verify_workers(settings: &Settings, json: bool, args: &VerifyWorkersArgs) -> ExitCode {
    let request = VerifyRequest {
        timeout_seconds: Some(args.timeout),
        queues: (!args.queues.is_empty()).then(|| args.queues.clone()),
    };
    let answer = args
        .server
        .client_for_held_call(settings, std::time::Duration::from_secs(args.timeout))
        .and_then(|client| client.post_json::<VerifyReport>("/v1/verify-workers", &request, &[]));
    let report = match answer {
        Ok(report) => report,
        Err(error) => {
            eprintln!("taskgate: {error}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    if json {
        print_json(&report);
    } else {
        print!("{}", report.render_text());
    }
    if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}
