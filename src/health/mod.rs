//! Health: one computed view of whether async work is available.
//!
//! Inputs are the broker connection, the breaker, the outbox and tracking.
//! Rules:
//! - `fail` (HTTP 503): tasks cannot be accepted (outbox full or failing).
//! - `warn`: still accepting, but spooling: broker disconnected or
//!   blocking the connection (`connection.blocked`), breaker
//!   not closed, the relay paused by an operator (`relay:state`), or a
//!   backlog older than `warn_backlog_age_seconds`.
//! - `pass`: broker connected and breaker closed.
//! - Tracking (`tracking:database`, `tracking:syncQueue`) can only warn,
//!   never fail: a database outage does not stop acceptance (tasks wait in
//!   the outbox journal), so it must not take the gateway out of a load
//!   balancer. It warns while the database is unreachable or its schema is
//!   not ready, while the journal's oldest entry is older than
//!   `tracking.warn_journal_age_seconds`, and while the tracking-queue
//!   consumer is disconnected.
//!
//! `async_available` (what a UI reads to grey out buttons) is true only
//! while the broker is connected and not blocking, the breaker closed and
//! the relay not paused.
//!
//! A monitor task recomputes the report on every broker or breaker change
//! and a few times a second, and publishes it through a `watch` channel
//! whenever the *state* (status, availability, connection, breaker)
//! changes: that is one server-sent event per health change.
//!
//! [`HealthReport`] is also the `application/health+json` body of
//! `GET /v1/health` (and of each event), and its `ToSchema` derive is what
//! the OpenAPI document describes.

use crate::broker::BrokerStatus;
use crate::outbox::failure::RecordedFailure;
use crate::outbox::Outbox;
use crate::relay::breaker::{BreakerSnapshot, BreakerState};
use crate::tracking::{Tracking, TrackingHealth};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// `pass`: broker connected, breaker closed; `warn`: spooling, still
/// accepting; `fail` (HTTP 503): cannot accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Pass,
    Warn,
    Fail,
}

/// `application/health+json` (draft-inadarei-api-health-check).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(as = Health)]
pub struct HealthReport {
    #[schema(inline)]
    pub status: HealthStatus,
    /// Whether work that needs a live broker is available now: what a UI
    /// reads to grey out asynchronous features.
    pub async_available: bool,
    pub version: &'static str,
    #[serde(rename = "releaseId")]
    pub release_id: &'static str,
    pub description: &'static str,
    /// `broker:connection`, `breaker:state`, `outbox:depth`,
    /// `outbox:storage`, `outbox:oldestAge`, ...: arrays of check results.
    // Each check's members vary by check (draft-inadarei-api-health-check
    // lets them), so they stay JSON values.
    #[schema(value_type = std::collections::BTreeMap<String, Vec<Value>>)]
    pub checks: serde_json::Map<String, Value>,
    #[serde(skip)]
    pub broker_connected: bool,
    #[serde(skip)]
    pub breaker_state: BreakerState,
    #[serde(skip)]
    pub outbox_depth: u64,
    /// Tracking's database answers and its journal keeps up.
    #[serde(skip)]
    pub tracking_ok: bool,
}

impl HealthReport {
    /// What one health *change* is: a new event is sent only when this moves.
    fn state_key(&self) -> (HealthStatus, bool, bool, BreakerState, bool) {
        (
            self.status,
            self.async_available,
            self.broker_connected,
            self.breaker_state,
            self.tracking_ok,
        )
    }
}

fn check_status(status: HealthStatus) -> &'static str {
    match status {
        HealthStatus::Pass => "pass",
        HealthStatus::Warn => "warn",
        HealthStatus::Fail => "fail",
    }
}

/// Whether the outbox's store still takes writes. After a failed write or
/// flush it does not until a restart, and this check says why.
fn storage_check(failure: Option<&RecordedFailure>, now: &str) -> serde_json::Value {
    match failure {
        None => json!({
            "componentType": "datastore",
            "status": "pass",
            "observedValue": "writable",
            "time": now,
        }),
        Some(failure) => json!({
            "componentType": "datastore",
            "status": "fail",
            "observedValue": "failed",
            "output": format!(
                "{}; nothing is accepted or published until taskgate is restarted (free disk space or fix \
                 the disk first: every task that got a 202 is kept)",
                failure.error
            ),
            "time": failure.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }),
    }
}

/// Computes the report from its inputs.
pub fn compute(
    broker: &BrokerStatus,
    breaker: &BreakerSnapshot,
    outbox: &Outbox,
    warn_backlog_age_seconds: f64,
) -> HealthReport {
    let now: DateTime<Utc> = Utc::now();
    let time = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let stats = outbox.stats();
    let (depth, bytes, max_bytes, oldest_age, storage_error) = match &stats {
        Ok(stats) => (
            stats.depth,
            stats.bytes,
            stats.max_bytes,
            stats.oldest_age_seconds,
            None,
        ),
        Err(error) => (
            outbox.depth(),
            outbox.bytes(),
            outbox.settings().max_bytes,
            None,
            Some(error.to_string()),
        ),
    };
    let failed_store = outbox.storage_failure();
    // The holds as saved: they are saved before they take effect, and a
    // pause would otherwise show only once the backlog grew old.
    let paused = crate::relay::holds::OperatorHolds::load(outbox).is_ok_and(|holds| holds.relay_paused);
    let has_room = outbox.has_room() && storage_error.is_none();
    let breaker_closed = breaker.state.is_closed();
    let stale_backlog = oldest_age.is_some_and(|age| age > warn_backlog_age_seconds);
    let status = if !has_room {
        HealthStatus::Fail
    } else if !broker.connected
        || broker.blocked.is_some()
        || !broker.queue_errors.is_empty()
        || !breaker_closed
        || stale_backlog
        || paused
    {
        HealthStatus::Warn
    } else {
        HealthStatus::Pass
    };
    let broker_check_status = if broker.connected && broker.blocked.is_none() {
        HealthStatus::Pass
    } else {
        HealthStatus::Warn
    };
    let mut broker_check = json!({
        "componentType": "component",
        "status": check_status(broker_check_status),
        "observedValue": broker.connected,
        "endpoint": broker.endpoint,
        "time": broker.changed_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    if let Some(reason) = &broker.blocked {
        broker_check["output"] = json!(format!(
            "the broker blocked the connection ({reason}): nothing is published until it unblocks; \
             tasks are accepted and kept"
        ));
    } else if let Some(error) = &broker.last_error {
        broker_check["output"] = json!(error);
    }
    let breaker_check_status = if breaker_closed {
        HealthStatus::Pass
    } else {
        HealthStatus::Warn
    };
    let outbox_status = if !has_room {
        HealthStatus::Fail
    } else {
        HealthStatus::Pass
    };
    let mut depth_check = json!({
        "componentType": "datastore",
        "status": check_status(outbox_status),
        "observedValue": depth,
        "observedUnit": "tasks",
        "bytes": bytes,
        "maxBytes": max_bytes,
        "time": time,
    });
    if let Some(error) = &storage_error {
        depth_check["output"] = json!(error);
    } else if failed_store.is_some() {
        depth_check["output"] = json!("the outbox store failed: new tasks are refused (see outbox:storage)");
    } else if !has_room {
        depth_check["output"] = json!("the outbox is full: new tasks are refused");
    }
    let age_status = if stale_backlog {
        HealthStatus::Warn
    } else {
        HealthStatus::Pass
    };
    let mut checks = serde_json::Map::new();
    checks.insert("broker:connection".into(), json!([broker_check]));
    let mut breaker_check = json!({
        "componentType": "component",
        "status": check_status(breaker_check_status),
        "observedValue": breaker.state.as_str(),
        "time": breaker.changed_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    match breaker.state {
        BreakerState::ForcedOpen => {
            breaker_check["output"] =
                json!("forced open by an operator: nothing is published until `taskgate breaker release`");
        }
        BreakerState::ForcedClosed => {
            breaker_check["output"] =
                json!("forced closed by an operator: failures do not open it until `taskgate breaker release`");
        }
        _ => {}
    }
    checks.insert("breaker:state".into(), json!([breaker_check]));
    let mut relay_check = json!({
        "componentType": "component",
        "status": check_status(if paused { HealthStatus::Warn } else { HealthStatus::Pass }),
        "observedValue": if paused { "paused" } else { "running" },
        "time": time,
    });
    if paused {
        relay_check["output"] = json!(
            "paused by an operator: tasks are accepted and kept, nothing is published until \
             `taskgate outbox resume` (POST /v1/outbox/resume)"
        );
    }
    checks.insert("relay:state".into(), json!([relay_check]));
    if !broker.queue_errors.is_empty() {
        checks.insert(
            "broker:topology".into(),
            json!([{
                "componentType": "component",
                "status": "warn",
                "observedValue": broker.queue_errors.len(),
                "output": broker.queue_errors.join("; "),
                "time": time,
            }]),
        );
    }
    checks.insert("outbox:depth".into(), json!([depth_check]));
    checks.insert("outbox:storage".into(), json!([storage_check(failed_store, &time)]));
    checks.insert(
        "outbox:oldestAge".into(),
        json!([{
            "componentType": "datastore",
            "status": check_status(age_status),
            "observedValue": oldest_age.unwrap_or(0.0),
            "observedUnit": "s",
            "time": time,
        }]),
    );
    HealthReport {
        status,
        async_available: broker.connected
            && broker.blocked.is_none()
            && breaker_closed
            && failed_store.is_none()
            && !paused,
        version: env!("CARGO_PKG_VERSION"),
        release_id: env!("CARGO_PKG_VERSION"),
        description: "taskgate broker gateway",
        checks,
        broker_connected: broker.connected,
        breaker_state: breaker.state,
        outbox_depth: depth,
        tracking_ok: true,
    }
}

/// Adds the tracking checks to `report`; a problem there turns `pass` into
/// `warn` and never causes `fail`.
pub fn apply_tracking(report: &mut HealthReport, tracking: &TrackingHealth, warn_journal_age_seconds: f64) {
    let time = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let database = &tracking.database;
    let journal_age = tracking.journal_oldest_age_seconds.unwrap_or(0.0);
    let lagging = journal_age > warn_journal_age_seconds;
    let database_ok = database.schema_ready && database.reachable && !lagging && !tracking.journal_full;
    let mut check = json!({
        "componentType": "datastore",
        "status": check_status(if database_ok { HealthStatus::Pass } else { HealthStatus::Warn }),
        "observedValue": tracking.journal_depth,
        "observedUnit": "tasks",
        "reachable": database.reachable,
        "schemaReady": database.schema_ready,
        "journalOldestAgeSeconds": journal_age,
        "journalFull": tracking.journal_full,
        "endpoint": tracking.endpoint,
        "time": time,
    });
    let output = if tracking.journal_full {
        Some(format!(
            "the tracking journal is full ({} tasks, outbox.max_journal_entries): new tasks are accepted and published \
             but not recorded until it drains{}",
            tracking.journal_depth,
            database
                .last_error
                .as_deref()
                .map(|error| format!("; the database: {error}"))
                .unwrap_or_default()
        ))
    } else if !database.schema_ready || !database.reachable {
        Some(format!(
            "tracking database {}: {}; tasks are still accepted and recorded once it answers",
            if database.reachable {
                "not migrated"
            } else {
                "unreachable"
            },
            database.last_error.as_deref().unwrap_or("no answer yet")
        ))
    } else if lagging {
        Some(format!(
            "the oldest unrecorded task was accepted {journal_age:.0} s ago (warn after {warn_journal_age_seconds} s)"
        ))
    } else {
        None
    };
    if let Some(output) = output {
        check["output"] = json!(output);
    }
    report.checks.insert("tracking:database".into(), json!([check]));
    let mut consumer_ok = true;
    if let Some(consumer) = &tracking.consumer {
        consumer_ok = consumer.connected;
        let mut check = json!({
            "componentType": "component",
            "componentId": consumer.queue,
            "status": check_status(if consumer.connected { HealthStatus::Pass } else { HealthStatus::Warn }),
            "observedValue": consumer.waiting,
            "observedUnit": "messages",
            "time": consumer.changed_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        if let Some(error) = &consumer.last_error {
            check["output"] = json!(error);
        }
        report.checks.insert("tracking:syncQueue".into(), json!([check]));
    }
    report.tracking_ok = database_ok && consumer_ok;
    if !report.tracking_ok && report.status == HealthStatus::Pass {
        report.status = HealthStatus::Warn;
    }
}

/// Keeps a current [`HealthReport`] and announces changes.
pub struct HealthMonitor {
    report: watch::Sender<HealthReport>,
}

impl HealthMonitor {
    pub fn start(
        outbox: Arc<Outbox>,
        mut broker: watch::Receiver<BrokerStatus>,
        mut breaker: watch::Receiver<BreakerSnapshot>,
        warn_backlog_age_seconds: f64,
        tracking: Arc<Tracking>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let with_tracking = move |mut report: HealthReport| {
            apply_tracking(&mut report, &tracking.health(), tracking.warn_journal_age_seconds());
            report
        };
        let initial = with_tracking(compute(
            &broker.borrow(),
            &breaker.borrow(),
            &outbox,
            warn_backlog_age_seconds,
        ));
        let (report, _) = watch::channel(initial);
        let monitor = Arc::new(Self { report });
        let task_monitor = monitor.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = broker.changed() => {}
                    _ = breaker.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = shutdown.cancelled() => return,
                }
                let next = with_tracking(compute(
                    &broker.borrow_and_update(),
                    &breaker.borrow_and_update(),
                    &outbox,
                    warn_backlog_age_seconds,
                ));
                task_monitor.publish(next);
            }
        });
        monitor
    }

    /// Replaces the current report; streams hear of it if the state changed.
    pub fn publish(&self, next: HealthReport) {
        self.report.send_if_modified(|current| {
            let changed = current.state_key() != next.state_key();
            // Keep the latest figures either way; only a state change wakes
            // the event streams.
            *current = next;
            changed
        });
    }

    pub fn subscribe(&self) -> watch::Receiver<HealthReport> {
        self.report.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracking::{ConsumerStatus, DatabaseStatus};

    fn report(status: HealthStatus) -> HealthReport {
        HealthReport {
            status,
            async_available: true,
            version: "test",
            release_id: "test",
            description: "test",
            checks: serde_json::Map::new(),
            broker_connected: true,
            breaker_state: BreakerState::Closed,
            outbox_depth: 0,
            tracking_ok: true,
        }
    }

    fn tracking(reachable: bool, journal_age: Option<f64>) -> TrackingHealth {
        TrackingHealth {
            endpoint: "postgres://db/platform".into(),
            database: DatabaseStatus {
                schema_ready: true,
                reachable,
                first_attempt_done: true,
                last_error: (!reachable).then(|| "connection refused".into()),
                changed_at: Utc::now(),
            },
            journal_depth: 12,
            journal_oldest_age_seconds: journal_age,
            journal_full: false,
            consumer: None,
        }
    }

    #[test]
    fn tracking_problems_warn_and_never_fail() {
        let mut healthy = report(HealthStatus::Pass);
        apply_tracking(&mut healthy, &tracking(true, Some(1.0)), 60.0);
        assert_eq!(healthy.status, HealthStatus::Pass);
        assert_eq!(healthy.checks["tracking:database"][0]["status"], "pass");
        assert_eq!(healthy.checks["tracking:database"][0]["observedValue"], 12);

        let mut down = report(HealthStatus::Pass);
        apply_tracking(&mut down, &tracking(false, Some(1.0)), 60.0);
        assert_eq!(down.status, HealthStatus::Warn);
        assert!(!down.tracking_ok);
        let output = down.checks["tracking:database"][0]["output"].as_str().unwrap();
        assert!(
            output.contains("unreachable") && output.contains("connection refused"),
            "{output}"
        );

        let mut lagging = report(HealthStatus::Pass);
        apply_tracking(&mut lagging, &tracking(true, Some(120.0)), 60.0);
        assert_eq!(lagging.status, HealthStatus::Warn);

        // A full journal warns even before its age does, and says what it means.
        let mut full = report(HealthStatus::Pass);
        let mut journal_full = tracking(false, Some(1.0));
        journal_full.journal_full = true;
        apply_tracking(&mut full, &journal_full, 60.0);
        assert_eq!(full.status, HealthStatus::Warn);
        let check = &full.checks["tracking:database"][0];
        assert_eq!(check["journalFull"], true);
        let output = check["output"].as_str().unwrap();
        assert!(
            output.contains("journal is full")
                && output.contains("not recorded")
                && output.contains("connection refused"),
            "{output}"
        );

        // A failing gateway stays failing; tracking never makes it worse.
        let mut failing = report(HealthStatus::Fail);
        apply_tracking(&mut failing, &tracking(false, None), 60.0);
        assert_eq!(failing.status, HealthStatus::Fail);
    }

    #[test]
    fn a_disconnected_tracking_consumer_warns() {
        let mut with_consumer = tracking(true, None);
        with_consumer.consumer = Some(ConsumerStatus {
            queue: "platform.fifo".into(),
            connected: false,
            last_error: Some("NOT_FOUND - no queue 'platform.fifo'".into()),
            waiting: None,
            changed_at: Utc::now(),
        });
        let mut health = report(HealthStatus::Pass);
        apply_tracking(&mut health, &with_consumer, 60.0);
        assert_eq!(health.status, HealthStatus::Warn);
        let check = &health.checks["tracking:syncQueue"][0];
        assert_eq!(check["componentId"], "platform.fifo");
        assert_eq!(check["status"], "warn");
        assert!(check["output"].as_str().unwrap().contains("NOT_FOUND"));
    }
}
