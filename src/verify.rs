//! `taskgate verify-workers` (and `POST /v1/verify-workers`): proves, per
//! configured queue, that a real worker consumes it, that its results reach
//! `celery_taskmeta`, that the tasks it schedules itself reach the tracking
//! queue and the tracking table, and that its exchange and queue
//! declarations match the [`Topology`].
//!
//! How: for each queue a probe task, `taskgate.probe` (registered in the
//! worker by `taskgate_client.worker.register_probe`, which `configure`
//! calls), is accepted through the normal outbox path with a routing key
//! that reaches that queue ([`probe_routing_key`]). The probe schedules
//! `taskgate.probe.scheduled` with `apply_async` from inside the worker,
//! routed by the worker's own routing, and returns a description of the
//! worker ([`WorkerDescription`]: where it publishes, what it consumes,
//! its result backend). The child carries the same description as its
//! argument, so whichever of the two paths works tells taskgate about the
//! worker. The gateway then waits, bounded by the timeout, for the probe's
//! result (via tracking) and for a tracked row whose `parent_id` is the
//! probe, and [`evaluate`] turns what arrived into four checks.
//!
//! Invariants:
//! - the registry is bypassed for the built-in probe only (a strict
//!   registry need not list it); routing, the outbox and publishing are the
//!   ones every task goes through, so a probe proves the real path;
//! - the wait is bounded by `timeout_seconds` (at most
//!   [`MAX_TIMEOUT_SECONDS`]) for all queues together, and ends early once
//!   every outcome is known (an answer that rules out the missing piece,
//!   e.g. a worker publishing to another exchange, ends it too);
//! - every failing check says what an operator can change, and a check
//!   that could not be made because an earlier one failed says so instead
//!   of guessing;
//! - probes expire after the timeout: a worker that shows up hours later
//!   drops them (Celery revokes expired tasks) rather than running them.

use crate::broker::Publisher;
use crate::config::Settings;
use crate::outbox::TaskState;
use crate::outbox::{Outbox, OutboxError};
use crate::task::intake::{self, IntakeError};
use crate::task::registry::{Registry, RegistrySettings};
use crate::task::routing::{topic_matches, validate_routing_key, TopicRouter};
use crate::task::{TaskId, TaskRequest};
use crate::topology::{BrokerTopology, QueueTopology, Topology};
use crate::tracking::result::TaskResult;
use crate::tracking::store::{TaskFilter, TrackedTask};
use crate::tracking::{ConsumerStatus, Tracking};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::time::Duration;
use utoipa::ToSchema;

/// The probe task `taskgate_client.worker.register_probe` registers.
pub const PROBE_TASK: &str = "taskgate.probe";
/// The task the probe schedules from inside the worker.
pub const PROBE_SCHEDULED_TASK: &str = "taskgate.probe.scheduled";
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 30;
/// The longest verification asked for: the HTTP request is held that long
/// (a state-changing request is never cut by `http.request_timeout_ms`
/// once its body is read, see `http/server.rs`).
pub const MAX_TIMEOUT_SECONDS: u64 = 300;
/// How often tracking is asked whether the probes' traces arrived.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Words put in place of a binding's wildcards to build a probe's routing key.
const HASH_WORD: &str = "taskgate-probe";
const STAR_WORD: &str = "probe";

/// The body of `POST /v1/verify-workers`; every field optional (an empty
/// body verifies every queue with the default timeout).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// Seconds to wait for the workers, 1 to 300 (default 30).
    pub timeout_seconds: Option<u64>,
    /// Queues to verify (default: every configured queue).
    pub queues: Option<Vec<String>>,
}

/// The answer of `POST /v1/verify-workers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VerifyReport {
    /// Every check of every queue passed.
    pub passed: bool,
    /// How long the workers were given.
    pub timeout_seconds: u64,
    pub queues: Vec<QueueVerification>,
}

/// The checks of one queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueueVerification {
    pub queue: String,
    /// The probe task sent to it.
    pub probe_id: String,
    /// The routing key the probe was published with.
    pub routing_key: String,
    /// Other configured queues that routing key also reaches.
    pub also_reaches: Vec<String>,
    pub passed: bool,
    pub checks: Vec<CheckReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CheckReport {
    pub check: Check,
    pub passed: bool,
    /// What was seen, or why it failed and what to change.
    pub detail: String,
}

/// The four checks, in the order they are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// A worker consumed the probe (its result or its scheduled task arrived).
    Consumed,
    /// The probe's result reached `celery_taskmeta`.
    ResultStored,
    /// The task the probe scheduled reached the tracking queue and table.
    ScheduledTaskTracked,
    /// The worker's exchange and queue declarations match the topology.
    TopologyMatches,
}

impl Check {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Consumed => "consumed",
            Self::ResultStored => "result_stored",
            Self::ScheduledTaskTracked => "scheduled_task_tracked",
            Self::TopologyMatches => "topology_matches",
        }
    }
}

/// Why a verification could not even start (a 4xx or 503, not a report).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("timeout_seconds must be 1 to {MAX_TIMEOUT_SECONDS}, not {0}")]
    Timeout(u64),
    #[error("queue {queue:?} is not configured (configured: {})", configured.join(", "))]
    UnknownQueue { queue: String, configured: Vec<String> },
    #[error("no routing key the probe could use reaches queue {queue:?} (binding {binding_key:?})")]
    Unroutable { queue: String, binding_key: String },
    #[error("the probe for queue {queue:?} was refused: {source}")]
    Intake { queue: String, source: IntakeError },
    #[error("the probes could not be accepted into the outbox: {0}")]
    Outbox(#[from] OutboxError),
}

/// What a probe says about the worker that ran it (`describe_worker` in
/// `taskgate_client/worker.py`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct WorkerDescription {
    pub hostname: Option<String>,
    pub publishes_to: Option<Destination>,
    #[serde(default)]
    pub queues: Vec<DeclaredQueue>,
    pub result_backend: Option<String>,
    pub scheduled_id: Option<String>,
}

/// Where the worker publishes the tasks it schedules.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Destination {
    pub exchange: String,
    #[serde(rename = "type")]
    pub exchange_type: String,
    pub routing_key: Option<String>,
}

/// A queue the worker consumes, as it declares it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DeclaredQueue {
    pub name: String,
    pub exchange: String,
    #[serde(rename = "type")]
    pub exchange_type: String,
    pub routing_key: Option<String>,
    pub durable: Option<bool>,
    #[serde(default)]
    pub queue_arguments: Map<String, Value>,
}

/// What arrived for one probe by the end of the wait.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub probe_id: String,
    /// The probe's final result row, if one arrived.
    pub result: Option<TaskResult>,
    /// The tracked row of the task the probe scheduled.
    pub scheduled: Option<TrackedTask>,
    /// The probe's state in the outbox (still queued: never published).
    pub outbox_state: Option<(TaskState, Option<String>)>,
    /// The last tracking read that failed, if any.
    pub tracking_error: Option<String>,
}

impl Observation {
    /// The worker's description, from its result or else from the
    /// argument of the task it scheduled.
    pub fn description(&self) -> Option<WorkerDescription> {
        let from_result = self
            .result
            .as_ref()
            .filter(|result| result.status == "SUCCESS")
            .and_then(|result| serde_json::from_value(result.result.clone()).ok());
        from_result.or_else(|| {
            let argument = self.scheduled.as_ref()?.input.get("args")?.get(0)?.clone();
            serde_json::from_value(argument).ok()
        })
    }

    /// Whether waiting longer could change the outcome.
    fn settled(&self, topology: &Topology) -> bool {
        let description = self.description();
        let result_done = self.result.is_some()
            || description
                .as_ref()
                .is_some_and(|worker| self.scheduled.is_some() && worker.result_backend.is_none());
        let scheduled_done = self.scheduled.is_some()
            || topology.tracking_queue.is_none()
            || description
                .as_ref()
                .and_then(|worker| worker.publishes_to.as_ref())
                .is_some_and(|to| !publishes_to_topology(to, topology));
        result_done && scheduled_done
    }
}

fn publishes_to_topology(destination: &Destination, topology: &Topology) -> bool {
    destination.exchange == topology.exchange.name && destination.exchange_type == topology.exchange.exchange_type
}

/// An exchange as an operator reads it: the default exchange has no name.
fn exchange_label(name: &str, exchange_type: &str) -> String {
    if name.is_empty() {
        format!("the default exchange '' ({exchange_type})")
    } else {
        format!("exchange '{name}' ({exchange_type})")
    }
}

/// A routing key that reaches the queue bound with `binding_key`: its
/// wildcards replaced by words (`#` by `taskgate-probe` or by nothing, `*`
/// by `probe`), preferring the candidate that reaches the fewest of the
/// `other_bindings`, so the probe lands on the queue being verified.
pub fn probe_routing_key(binding_key: &str, other_bindings: &[&str]) -> Option<String> {
    let words: Vec<&str> = binding_key.split('.').collect();
    let replaced = |hash: Option<&str>| -> String {
        words
            .iter()
            .filter_map(|word| match *word {
                "#" => hash,
                "*" => Some(STAR_WORD),
                word => Some(word),
            })
            .collect::<Vec<_>>()
            .join(".")
    };
    let candidates = [replaced(Some(HASH_WORD)), replaced(None)];
    candidates
        .into_iter()
        .filter(|key| !key.is_empty() && validate_routing_key(key).is_ok() && topic_matches(binding_key, key))
        .min_by_key(|key| other_bindings.iter().filter(|other| topic_matches(other, key)).count())
}

/// The four checks of one queue from what arrived.
pub fn evaluate(
    queue: &QueueTopology,
    topology: &Topology,
    observed: &Observation,
    timeout_seconds: u64,
    consumer: Option<&ConsumerStatus>,
) -> Vec<CheckReport> {
    let description = observed.description();
    let consumed = observed.result.is_some() || observed.scheduled.is_some();
    let check = |check, passed, detail: String| CheckReport { check, passed, detail };
    let not_checked = |check| CheckReport {
        check,
        passed: false,
        detail: "not checked: no worker consumed the probe".into(),
    };
    let worker = description
        .as_ref()
        .and_then(|worker| worker.hostname.clone())
        .unwrap_or_else(|| "a worker".into());

    let consumed_check = if consumed {
        check(
            Check::Consumed,
            true,
            format!(
                "{worker} consumed probe {} from queue '{}'",
                observed.probe_id, queue.name
            ),
        )
    } else {
        check(
            Check::Consumed,
            false,
            unconsumed_detail(queue, observed, timeout_seconds),
        )
    };
    if !consumed {
        return vec![
            consumed_check,
            not_checked(Check::ResultStored),
            not_checked(Check::ScheduledTaskTracked),
            not_checked(Check::TopologyMatches),
        ];
    }

    let result_check = match &observed.result {
        Some(result) if result.status == "SUCCESS" => check(
            Check::ResultStored,
            true,
            format!("the probe's result reached {}", topology.result_backend.table),
        ),
        Some(result) => {
            let reason = result
                .exception
                .as_ref()
                .map(|exception| format!("{}: {}", exception.exception_type, exception.message))
                .unwrap_or_else(|| "no exception recorded".into());
            check(
                Check::ResultStored,
                false,
                format!(
                    "the probe's result arrived as {} ({reason}): is taskgate_client up to date in the worker?",
                    result.status
                ),
            )
        }
        None => {
            let backend = description.as_ref().and_then(|worker| worker.result_backend.clone());
            let detail = match backend {
                None => format!(
                    "the worker stores no result: its result_backend is not set; set it to {} \
                     (taskgate_client.worker.configure does)",
                    topology.result_backend.url
                ),
                Some(backend) => format!(
                    "the worker stores no result where taskgate reads it within {timeout_seconds} s: its \
                     result_backend is {backend}, taskgate reads {} (table {})",
                    topology.result_backend.url, topology.result_backend.table
                ),
            };
            check(Check::ResultStored, false, detail)
        }
    };

    let tracking_check = match (&topology.tracking_queue, &observed.scheduled) {
        (None, _) => check(
            Check::ScheduledTaskTracked,
            false,
            "tracking.sync_queue is not set: taskgate does not read the tasks workers schedule themselves".into(),
        ),
        (Some(tracking), Some(row)) => check(
            Check::ScheduledTaskTracked,
            true,
            format!(
                "the task the probe scheduled ({}) reached the tracking queue '{}' and the tracking table",
                row.task_id, tracking.name
            ),
        ),
        (Some(tracking), None) => check(
            Check::ScheduledTaskTracked,
            false,
            untracked_detail(tracking, topology, description.as_ref(), consumer, timeout_seconds),
        ),
    };

    let topology_check = match &description {
        None => check(
            Check::TopologyMatches,
            false,
            "the worker did not describe itself (its probe answered without a description): \
             is taskgate_client up to date in the worker?"
                .into(),
        ),
        Some(worker) => {
            let mismatches = topology_mismatches(worker, topology);
            if mismatches.is_empty() {
                check(
                    Check::TopologyMatches,
                    true,
                    format!(
                        "{worker_name} publishes to {} and declares {}, as the topology says",
                        exchange_label(&topology.exchange.name, topology.exchange.exchange_type),
                        declared_summary(worker),
                        worker_name = worker.hostname.as_deref().unwrap_or("the worker"),
                    ),
                )
            } else {
                check(Check::TopologyMatches, false, mismatches.join("; "))
            }
        }
    };
    vec![consumed_check, result_check, tracking_check, topology_check]
}

fn unconsumed_detail(queue: &QueueTopology, observed: &Observation, timeout_seconds: u64) -> String {
    match &observed.outbox_state {
        Some((TaskState::Queued, last_error)) => {
            return format!(
                "the probe {} was never published: it is still in the outbox{} (is the broker reachable? \
                 see `taskgate health`)",
                observed.probe_id,
                last_error
                    .as_deref()
                    .map(|error| format!(", last error: {error}"))
                    .unwrap_or_default()
            )
        }
        Some((TaskState::DeadLetter, last_error)) => {
            return format!(
                "the probe {} was dead-lettered: {}",
                observed.probe_id,
                last_error.as_deref().unwrap_or("no error recorded")
            )
        }
        _ => {}
    }
    let mut detail = format!(
        "no worker consumed the probe on queue '{}' within {timeout_seconds} s: is a worker consuming '{}', \
         with taskgate_client.worker.register_probe(app) (configure calls it)? \
         (a worker with neither the result backend nor the topic exchange looks the same)",
        queue.name, queue.name
    );
    if let Some(error) = &observed.tracking_error {
        detail.push_str(&format!("; the tracking database did not answer: {error}"));
    }
    detail
}

fn untracked_detail(
    tracking: &QueueTopology,
    topology: &Topology,
    worker: Option<&WorkerDescription>,
    consumer: Option<&ConsumerStatus>,
    timeout_seconds: u64,
) -> String {
    let scheduled = worker
        .and_then(|worker| worker.scheduled_id.as_deref())
        .map(|id| format!(" ({id})"))
        .unwrap_or_default();
    let exchange = exchange_label(&topology.exchange.name, topology.exchange.exchange_type);
    if let Some(to) = worker.and_then(|worker| worker.publishes_to.as_ref()) {
        if !publishes_to_topology(to, topology) {
            return format!(
                "the task the probe scheduled{scheduled} never reached the tracking queue: the worker \
                 publishes to {}, not the topic {exchange} (taskgate_client.worker.configure sets \
                 task_default_exchange and the router)",
                exchange_label(&to.exchange, &to.exchange_type)
            );
        }
    }
    if let Some(consumer) = consumer.filter(|consumer| !consumer.connected) {
        return format!(
            "the task the probe scheduled{scheduled} was not tracked: taskgate's tracking-queue consumer \
             on '{}' is not connected ({})",
            consumer.queue,
            consumer.last_error.as_deref().unwrap_or("no error recorded")
        );
    }
    format!(
        "the task the probe scheduled{scheduled} did not reach the tracking table within {timeout_seconds} s, \
         though the worker publishes to {exchange}: is the tracking queue '{}' bound to it with '#'?",
        tracking.name
    )
}

/// Everything in the worker's description that differs from the topology.
pub fn topology_mismatches(worker: &WorkerDescription, topology: &Topology) -> Vec<String> {
    let mut mismatches = Vec::new();
    let exchange = exchange_label(&topology.exchange.name, topology.exchange.exchange_type);
    match &worker.publishes_to {
        Some(to) if publishes_to_topology(to, topology) => {}
        Some(to) => mismatches.push(format!(
            "the worker publishes the tasks it schedules to {}, not {exchange}",
            exchange_label(&to.exchange, &to.exchange_type)
        )),
        None => mismatches.push("the worker did not say where it publishes".into()),
    }
    let quorum = matches!(
        topology.broker,
        BrokerTopology::Amqp {
            quorum_queues: true,
            ..
        }
    );
    for wanted in &topology.queues {
        let Some(declared) = worker.queues.iter().find(|queue| queue.name == wanted.name) else {
            continue;
        };
        let mut differences = Vec::new();
        if declared.exchange != topology.exchange.name || declared.exchange_type != topology.exchange.exchange_type {
            differences.push(format!(
                "on {}, not {exchange}",
                exchange_label(&declared.exchange, &declared.exchange_type)
            ));
        }
        if declared.routing_key.as_deref() != Some(wanted.binding_key.as_str()) {
            differences.push(format!(
                "with routing key {}, not '{}'",
                declared
                    .routing_key
                    .as_deref()
                    .map(|key| format!("'{key}'"))
                    .unwrap_or_else(|| "none".into()),
                wanted.binding_key
            ));
        }
        if declared.durable.is_some_and(|durable| durable != wanted.durable) {
            differences.push(format!("durable={}, not {}", !wanted.durable, wanted.durable));
        }
        let declared_quorum = declared.queue_arguments.get("x-queue-type") == Some(&json!("quorum"));
        if quorum != declared_quorum {
            differences.push(if quorum {
                "as a classic queue, not a quorum queue".to_owned()
            } else {
                "as a quorum queue, the topology's are classic".to_owned()
            });
        }
        if !differences.is_empty() {
            mismatches.push(format!(
                "queue '{}' is declared {}",
                wanted.name,
                differences.join(", ")
            ));
        }
    }
    mismatches
}

fn declared_summary(worker: &WorkerDescription) -> String {
    if worker.queues.is_empty() {
        return "no queue".into();
    }
    worker
        .queues
        .iter()
        .map(|queue| {
            format!(
                "'{}' bound with '{}'",
                queue.name,
                queue.routing_key.as_deref().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl VerifyReport {
    /// One line per check (`PASS`/`FAIL`), grouped by queue, and a summary.
    pub fn render_text(&self) -> String {
        let mut text = String::new();
        for queue in &self.queues {
            text.push_str(&format!(
                "queue {} (probe {}, routing key '{}'{})\n",
                queue.queue,
                queue.probe_id,
                queue.routing_key,
                if queue.also_reaches.is_empty() {
                    String::new()
                } else {
                    format!(", also reaches {}", queue.also_reaches.join(", "))
                }
            ));
            for check in &queue.checks {
                text.push_str(&format!(
                    "  {} {}: {}\n",
                    if check.passed { "PASS" } else { "FAIL" },
                    check.check.as_str(),
                    check.detail
                ));
            }
        }
        let failed: usize = self
            .queues
            .iter()
            .map(|queue| queue.checks.iter().filter(|check| !check.passed).count())
            .sum();
        let total: usize = self.queues.iter().map(|queue| queue.checks.len()).sum();
        if failed == 0 {
            text.push_str(&format!("PASS: {total} checks on {} queue(s)\n", self.queues.len()));
        } else {
            text.push_str(&format!(
                "FAIL: {failed} of {total} checks on {} queue(s) failed\n",
                self.queues.len()
            ));
        }
        text
    }
}

/// What a verification reads and writes: the gateway's own pieces.
pub struct Gateway<'a> {
    pub settings: &'a Settings,
    pub router: &'a TopicRouter,
    pub outbox: &'a Outbox,
    pub publisher: &'a dyn Publisher,
    pub tracking: &'a Tracking,
}

/// One probe on its way.
struct Probe {
    queue: QueueTopology,
    routing_key: String,
    also_reaches: Vec<String>,
    observed: Observation,
}

/// Sends a probe to each asked queue, waits for the traces (bounded) and
/// reports.
pub async fn verify_workers(gateway: Gateway<'_>, request: VerifyRequest) -> Result<VerifyReport, VerifyError> {
    let timeout_seconds = request.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECONDS);
    if !(1..=MAX_TIMEOUT_SECONDS).contains(&timeout_seconds) {
        return Err(VerifyError::Timeout(timeout_seconds));
    }
    let topology = Topology::from_settings(gateway.settings);
    let selected = select_queues(&topology, request.queues.as_deref())?;
    let now = chrono::Utc::now();
    let expires = now + chrono::Duration::seconds(timeout_seconds as i64);
    // Only for the built-in probe: a strict registry need not list it.
    let lenient = Registry::from_settings(&RegistrySettings {
        strict: false,
        tasks: Vec::new(),
    })
    .expect("an empty registry is valid");
    let mut probes = Vec::new();
    let mut tasks = Vec::new();
    for queue in selected {
        let others: Vec<&str> = topology
            .queues
            .iter()
            .filter(|other| other.name != queue.name)
            .map(|other| other.binding_key.as_str())
            .collect();
        let routing_key = probe_routing_key(&queue.binding_key, &others).ok_or_else(|| VerifyError::Unroutable {
            queue: queue.name.clone(),
            binding_key: queue.binding_key.clone(),
        })?;
        let request: TaskRequest = serde_json::from_value(json!({
            "task": PROBE_TASK,
            "kwargs": {"queue": queue.name},
            "routing_key": routing_key,
            "expires": expires,
        }))
        .expect("the probe request is well-formed");
        let task = intake::accept(request, &lenient, gateway.router, now).map_err(|source| VerifyError::Intake {
            queue: queue.name.clone(),
            source,
        })?;
        let also_reaches = task
            .queues
            .iter()
            .map(|name| name.as_str().to_owned())
            .filter(|name| *name != queue.name)
            .collect();
        probes.push(Probe {
            queue,
            routing_key,
            also_reaches,
            observed: Observation {
                probe_id: task.id.to_string(),
                ..Observation::default()
            },
        });
        let lanes = gateway.publisher.lanes_for(&task);
        tasks.push((task, lanes));
    }
    gateway.outbox.accept(tasks, None).await?;
    tracing::info!(
        queues = probes.len(),
        timeout_seconds,
        "verify-workers: probes accepted"
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_seconds);
    loop {
        for probe in probes.iter_mut().filter(|probe| !probe.observed.settled(&topology)) {
            observe(gateway.tracking, &mut probe.observed).await;
        }
        if probes.iter().all(|probe| probe.observed.settled(&topology)) || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }

    let consumer = gateway.tracking.health().consumer;
    let queues: Vec<QueueVerification> = probes
        .into_iter()
        .map(|mut probe| {
            if probe.observed.result.is_none() && probe.observed.scheduled.is_none() {
                probe.observed.outbox_state = TaskId::parse(&probe.observed.probe_id)
                    .ok()
                    .and_then(|id| gateway.outbox.status(&id).ok().flatten())
                    .map(|status| (status.state, status.last_error));
            }
            let checks = evaluate(
                &probe.queue,
                &topology,
                &probe.observed,
                timeout_seconds,
                consumer.as_ref(),
            );
            QueueVerification {
                passed: checks.iter().all(|check| check.passed),
                queue: probe.queue.name,
                probe_id: probe.observed.probe_id,
                routing_key: probe.routing_key,
                also_reaches: probe.also_reaches,
                checks,
            }
        })
        .collect();
    let report = VerifyReport {
        passed: queues.iter().all(|queue| queue.passed),
        timeout_seconds,
        queues,
    };
    tracing::info!(passed = report.passed, "verify-workers finished");
    Ok(report)
}

fn select_queues(topology: &Topology, asked: Option<&[String]>) -> Result<Vec<QueueTopology>, VerifyError> {
    let Some(asked) = asked.filter(|asked| !asked.is_empty()) else {
        return Ok(topology.queues.clone());
    };
    asked
        .iter()
        .map(|name| {
            topology
                .queues
                .iter()
                .find(|queue| &queue.name == name)
                .cloned()
                .ok_or_else(|| VerifyError::UnknownQueue {
                    queue: name.clone(),
                    configured: topology.queues.iter().map(|queue| queue.name.clone()).collect(),
                })
        })
        .collect()
}

/// One look at tracking for what is still missing; a failed read is kept
/// for the report and retried at the next look.
async fn observe(tracking: &Tracking, observed: &mut Observation) {
    if observed.result.is_none() {
        match tracking.result(&observed.probe_id).await {
            Ok(Some(result)) if crate::tracking::progress::is_final(&result.status) => observed.result = Some(result),
            Ok(_) => {}
            Err(error) => observed.tracking_error = Some(error.to_string()),
        }
    }
    if observed.scheduled.is_none() {
        let filter = TaskFilter {
            parent_id: Some(observed.probe_id.clone()),
            task_type: Some(PROBE_SCHEDULED_TASK.into()),
            ..TaskFilter::default()
        };
        match tracking.list(&filter, None, 10).await {
            Ok(page) => observed.scheduled = page.tasks.into_iter().next(),
            Err(error) => observed.tracking_error = Some(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::routing::QueueBindingSettings;

    fn topology() -> Topology {
        let mut settings = Settings::default();
        settings.routing.exchange = "tasks".into();
        settings.routing.queues = vec![QueueBindingSettings {
            name: "export".into(),
            binding_key: "#".into(),
        }];
        settings.tracking.sync_queue = Some("tracking".into());
        settings.tracking.database_url = "sqlite:///var/lib/taskgate/tracking.db".into();
        Topology::from_settings(&settings)
    }

    fn matching_worker() -> Value {
        json!({
            "hostname": "w1@host",
            "publishes_to": {"exchange": "tasks", "type": "topic", "routing_key": "taskgate"},
            "queues": [{"name": "export", "exchange": "tasks", "type": "topic", "routing_key": "#",
                        "durable": true, "queue_arguments": {}}],
            "result_backend": "db+sqlite:////var/lib/taskgate/tracking.db",
            "scheduled_id": "child-1",
        })
    }

    fn success(result: Value) -> TaskResult {
        TaskResult {
            status: "SUCCESS".into(),
            result,
            date_done: None,
            traceback: None,
            exception: None,
            result_error: None,
        }
    }

    fn scheduled(description: Value) -> TrackedTask {
        TrackedTask {
            public_id: "p".into(),
            task_id: "child-1".into(),
            task_type: PROBE_SCHEDULED_TASK.into(),
            input: json!({"args": [description], "kwargs": {}}),
            options: json!({}),
            creator_id: None,
            related_content_type: None,
            related_object_id: None,
            parent_id: Some("probe-1".into()),
            root_id: Some("probe-1".into()),
            status: "SENT".into(),
            created_date: chrono::Utc::now(),
            last_updated: chrono::Utc::now(),
        }
    }

    fn checks(observed: &Observation) -> Vec<(Check, bool, String)> {
        let topology = topology();
        evaluate(&topology.queues[0], &topology, observed, 10, None)
            .into_iter()
            .map(|check| (check.check, check.passed, check.detail))
            .collect()
    }

    #[test]
    fn routing_keys_reach_their_queue_and_prefer_the_fewest_others() {
        assert_eq!(probe_routing_key("#", &[]).as_deref(), Some("taskgate-probe"));
        assert_eq!(probe_routing_key("*", &[]).as_deref(), Some("probe"));
        assert_eq!(probe_routing_key("export", &[]).as_deref(), Some("export"));
        assert_eq!(
            probe_routing_key("export.#", &[]).as_deref(),
            Some("export.taskgate-probe")
        );
        assert_eq!(
            probe_routing_key("*.report.#", &[]).as_deref(),
            Some("probe.report.taskgate-probe")
        );
        // `export.*` also binds the longer key; `#` as no word avoids it.
        assert_eq!(probe_routing_key("export.#", &["export.*"]).as_deref(), Some("export"));
        for binding in ["#", "*", "a.#.b", "#.x", "a.*.#"] {
            let key = probe_routing_key(binding, &[]).unwrap();
            assert!(topic_matches(binding, &key), "{binding} -> {key}");
        }
    }

    #[test]
    fn a_worker_matching_the_topology_passes_every_check() {
        let observed = Observation {
            probe_id: "probe-1".into(),
            result: Some(success(matching_worker())),
            scheduled: Some(scheduled(matching_worker())),
            ..Observation::default()
        };
        let checks = checks(&observed);
        assert!(checks.iter().all(|(_, passed, _)| *passed), "{checks:?}");
        assert!(observed.settled(&topology()));
    }

    #[test]
    fn nothing_back_fails_consumed_and_says_the_rest_was_not_checked() {
        let observed = Observation {
            probe_id: "probe-1".into(),
            ..Observation::default()
        };
        let checks = checks(&observed);
        assert!(
            !checks[0].1 && checks[0].2.contains("is a worker consuming 'export'"),
            "{checks:?}"
        );
        assert!(checks[1..]
            .iter()
            .all(|(_, passed, detail)| !passed && detail.starts_with("not checked")));
        assert!(!observed.settled(&topology()), "worth waiting for");
    }

    #[test]
    fn a_worker_without_result_backend_fails_only_the_result() {
        let mut worker = matching_worker();
        worker["result_backend"] = Value::Null;
        let observed = Observation {
            probe_id: "probe-1".into(),
            scheduled: Some(scheduled(worker)),
            ..Observation::default()
        };
        let checks = checks(&observed);
        let passed: Vec<bool> = checks.iter().map(|(_, passed, _)| *passed).collect();
        assert_eq!(passed, [true, false, true, true], "{checks:?}");
        assert!(checks[1].2.contains("result_backend is not set"), "{}", checks[1].2);
        assert!(observed.settled(&topology()), "no result will ever come");
    }

    #[test]
    fn a_worker_on_the_default_exchange_fails_tracking_and_topology() {
        let mut worker = matching_worker();
        worker["publishes_to"] = json!({"exchange": "", "type": "direct", "routing_key": "celery"});
        worker["queues"][0]["exchange"] = json!("export");
        worker["queues"][0]["type"] = json!("direct");
        worker["queues"][0]["routing_key"] = json!("export");
        let observed = Observation {
            probe_id: "probe-1".into(),
            result: Some(success(worker)),
            ..Observation::default()
        };
        let checks = checks(&observed);
        let passed: Vec<bool> = checks.iter().map(|(_, passed, _)| *passed).collect();
        assert_eq!(passed, [true, true, false, false], "{checks:?}");
        assert!(
            checks[2]
                .2
                .contains("publishes to the default exchange '' (direct), not the topic exchange 'tasks' (topic)"),
            "{}",
            checks[2].2
        );
        assert!(
            checks[3]
                .2
                .contains("queue 'export' is declared on exchange 'export' (direct)")
                && checks[3].2.contains("with routing key 'export', not '#'"),
            "{}",
            checks[3].2
        );
        assert!(observed.settled(&topology()), "the child can never arrive");
    }

    #[test]
    fn without_a_sync_queue_the_tracking_check_names_the_setting() {
        let mut topology = topology();
        topology.tracking_queue = None;
        let observed = Observation {
            probe_id: "probe-1".into(),
            result: Some(success(matching_worker())),
            ..Observation::default()
        };
        let checks = evaluate(&topology.queues[0], &topology, &observed, 10, None);
        assert!(!checks[2].passed && checks[2].detail.contains("tracking.sync_queue is not set"));
    }

    #[test]
    fn the_report_renders_one_line_per_check_and_a_verdict() {
        let topology = topology();
        let observed = Observation {
            probe_id: "probe-1".into(),
            ..Observation::default()
        };
        let checks = evaluate(&topology.queues[0], &topology, &observed, 10, None);
        let report = VerifyReport {
            passed: false,
            timeout_seconds: 10,
            queues: vec![QueueVerification {
                queue: "export".into(),
                probe_id: "probe-1".into(),
                routing_key: "taskgate-probe".into(),
                also_reaches: vec![],
                passed: false,
                checks,
            }],
        };
        let text = report.render_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "queue export (probe probe-1, routing key 'taskgate-probe')");
        assert!(lines[1].starts_with("  FAIL consumed: no worker consumed the probe on queue 'export' within 10 s"));
        assert!(lines[2].starts_with("  FAIL result_stored: not checked"));
        assert!(lines[3].starts_with("  FAIL scheduled_task_tracked: "));
        assert!(lines[4].starts_with("  FAIL topology_matches: "));
        assert_eq!(lines[5], "FAIL: 4 of 4 checks on 1 queue(s) failed");
    }
}
