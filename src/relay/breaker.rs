//! The circuit breaker in front of the publisher, built on `failsafe`.
//!
//! Opens on `consecutive_failures` failed rounds in a row, or when the
//! success rate over a time window drops below `required_success_rate`.
//! The open interval is taskgate's [`RetryPolicy`] between
//! `open_min_ms` and `open_max_ms` ([`crate::retry`]). Half-open lets exactly one probe through: the
//! relay sends a single message and the outcome closes or reopens.
//!
//! `failsafe` does not expose its state, so an [`Instrument`] mirrors every
//! transition into a `watch` channel that health, metrics and the status
//! page read. Operators may force the breaker open or closed; a forced
//! state overrides the state machine, and outcomes of windows in flight,
//! until released. While the broker blocks the connection
//! (`connection.blocked`) the breaker is held open, without probes, until
//! it unblocks.
//!
//! The open interval failsafe draws is mirrored too (failsafe draws it just
//! before it reports `on_open`), so the snapshot can say when the next
//! probe is due.

pub use super::holds::BreakerOverride;
use crate::config::BreakerSettings;
use crate::retry::{RetryDelays, RetryPolicy};
use chrono::{DateTime, Utc};
use failsafe::failure_policy::{
    consecutive_failures, success_rate_over_time_window, ConsecutiveFailures, OrElse, SuccessRateOverTimeWindow,
};
use failsafe::{FailurePolicy, Instrument, StateMachine};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
    ForcedOpen,
    ForcedClosed,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
            Self::ForcedOpen => "forced_open",
            Self::ForcedClosed => "forced_closed",
        }
    }

    /// Tasks flow normally only in these states.
    pub fn is_closed(self) -> bool {
        matches!(self, Self::Closed | Self::ForcedClosed)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerSnapshot {
    pub state: BreakerState,
    pub changed_at: DateTime<Utc>,
    /// How many times the breaker opened since start.
    pub opened_count: u64,
    /// While automatically open: when the half-open probe becomes due (it
    /// is sent with the next task, or at once on an operator's drain).
    pub next_probe_at: Option<DateTime<Utc>>,
}

/// What the relay may do right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Denied,
    /// Closed: publish a full window.
    Normal,
    /// Half-open or an explicit probe: publish one message.
    Probe,
}

/// Open intervals for `failsafe`: the breaker's [`RetryPolicy`] as an
/// endless iterator (failsafe clones it to reset).
#[derive(Clone)]
pub struct OpenInterval {
    delays: RetryDelays,
    /// The interval drawn last, shared by every clone.
    last_drawn: Arc<Mutex<Option<Duration>>>,
}

impl OpenInterval {
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            delays: policy.delays(),
            last_drawn: Arc::new(Mutex::new(None)),
        }
    }
}

impl Iterator for OpenInterval {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let interval = self.delays.next_delay();
        *self.last_drawn.lock().expect("interval lock") = Some(interval);
        Some(interval)
    }
}

#[derive(Clone)]
struct Observer {
    sender: Arc<watch::Sender<BreakerSnapshot>>,
    last_interval: Arc<Mutex<Option<Duration>>>,
}

impl Observer {
    fn transition(&self, state: BreakerState) {
        self.sender.send_if_modified(|snapshot| {
            if snapshot.state == state {
                return false;
            }
            let now = Utc::now();
            snapshot.next_probe_at = None;
            if state == BreakerState::Open {
                snapshot.opened_count += 1;
                let interval = *self.last_interval.lock().expect("interval lock");
                snapshot.next_probe_at = interval
                    .and_then(|interval| chrono::Duration::from_std(interval).ok())
                    .map(|interval| now + interval);
            }
            snapshot.state = state;
            snapshot.changed_at = now;
            true
        });
        let value = match state {
            BreakerState::Closed | BreakerState::ForcedClosed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open | BreakerState::ForcedOpen => 2.0,
        };
        metrics::gauge!("taskgate_breaker_state").set(value);
    }
}

impl Instrument for Observer {
    fn on_call_rejected(&self) {
        metrics::counter!("taskgate_breaker_rejections_total").increment(1);
    }
    fn on_open(&self) {
        tracing::warn!("circuit breaker opened: tasks spool in the outbox");
        metrics::counter!("taskgate_breaker_opened_total").increment(1);
        self.transition(BreakerState::Open);
    }
    fn on_half_open(&self) {
        tracing::info!("circuit breaker half-open: probing the broker");
        self.transition(BreakerState::HalfOpen);
    }
    fn on_closed(&self) {
        self.transition(BreakerState::Closed);
    }
}

type Policy = OrElse<ConsecutiveFailures<OpenInterval>, SuccessRateOverTimeWindow<OpenInterval>>;

pub struct Breaker {
    machine: StateMachine<Policy, Observer>,
    observer: Observer,
    forced: Mutex<Option<BreakerOverride>>,
    probe_requested: AtomicBool,
    /// Held open while the broker blocks the connection
    /// (`connection.blocked`): no window, no probe, until it unblocks.
    held_by_broker: AtomicBool,
}

impl Breaker {
    pub fn new(settings: &BreakerSettings) -> Self {
        let interval = OpenInterval::new(settings.open_interval());
        let last_drawn = interval.last_drawn.clone();
        let policy = consecutive_failures(settings.consecutive_failures, interval.clone()).or_else(
            success_rate_over_time_window(
                settings.required_success_rate,
                settings.minimum_requests,
                Duration::from_secs(settings.window_seconds),
                interval,
            ),
        );
        let (sender, _) = watch::channel(BreakerSnapshot {
            state: BreakerState::Closed,
            changed_at: Utc::now(),
            opened_count: 0,
            next_probe_at: None,
        });
        let observer = Observer {
            sender: Arc::new(sender),
            last_interval: last_drawn,
        };
        let machine = StateMachine::new(policy, observer.clone());
        Self {
            machine,
            observer,
            forced: Mutex::new(None),
            probe_requested: AtomicBool::new(false),
            held_by_broker: AtomicBool::new(false),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<BreakerSnapshot> {
        self.observer.sender.subscribe()
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        self.observer.sender.borrow().clone()
    }

    pub fn permit(&self) -> Permit {
        match *self.forced.lock().expect("breaker lock") {
            Some(BreakerOverride::Open) => return Permit::Denied,
            Some(BreakerOverride::Closed) => return Permit::Normal,
            None => {}
        }
        if self.held_by_broker.load(Ordering::SeqCst) {
            return Permit::Denied;
        }
        if self.machine.is_call_permitted() {
            if self.snapshot().state == BreakerState::HalfOpen {
                Permit::Probe
            } else {
                Permit::Normal
            }
        } else if self.probe_requested.swap(false, Ordering::SeqCst) {
            Permit::Probe
        } else {
            Permit::Denied
        }
    }

    /// Lets one probe through at the next [`Breaker::permit`] even while
    /// open (the broker came back, or an operator asked to drain).
    pub fn request_probe(&self) {
        self.probe_requested.store(true, Ordering::SeqCst);
    }

    /// An outcome while an operator's forced state is in force is ignored,
    /// also one from a window sent before it was forced: the forced state
    /// wins until released. The lock is held across the state machine's
    /// update, so a force cannot slip in between the check and the update.
    pub fn on_success(&self, permit: Permit) {
        let forced = self.forced.lock().expect("breaker lock");
        if forced.is_some() || self.held_by_broker.load(Ordering::SeqCst) {
            return;
        }
        if permit == Permit::Probe && !self.snapshot().state.is_closed() {
            // A successful probe closes the breaker whether it came from the
            // half-open state or from an explicit request.
            self.machine.reset();
        }
        self.machine.on_success();
    }

    pub fn on_failure(&self) {
        let forced = self.forced.lock().expect("breaker lock");
        if forced.is_some() || self.held_by_broker.load(Ordering::SeqCst) {
            return;
        }
        self.machine.on_error();
        if self.snapshot().state == BreakerState::Open {
            // A probe requested before the breaker opened (a reconnect while
            // it was closed) is stale: it must not cut the open interval short.
            self.probe_requested.store(false, Ordering::SeqCst);
        }
    }

    pub fn force_open(&self) {
        let mut forced = self.forced.lock().expect("breaker lock");
        *forced = Some(BreakerOverride::Open);
        self.observer.transition(BreakerState::ForcedOpen);
    }

    pub fn force_closed(&self) {
        let mut forced = self.forced.lock().expect("breaker lock");
        *forced = Some(BreakerOverride::Closed);
        self.observer.transition(BreakerState::ForcedClosed);
    }

    /// Holds the breaker open while the broker blocks the connection, and
    /// closes it when it unblocks (the broker said it takes messages
    /// again, so no open interval is waited out). An operator's forced
    /// state is shown and obeyed over it.
    pub fn hold_for_broker(&self, blocked: bool) {
        let forced = self.forced.lock().expect("breaker lock");
        if self.held_by_broker.swap(blocked, Ordering::SeqCst) == blocked {
            return;
        }
        if forced.is_some() {
            return;
        }
        if blocked {
            self.observer.transition(BreakerState::Open);
            // No probe is due: the broker says when it takes messages again.
            self.observer
                .sender
                .send_modify(|snapshot| snapshot.next_probe_at = None);
        } else {
            self.machine.reset();
            self.observer.transition(BreakerState::Closed);
        }
    }

    /// The operator's override in force, if any.
    pub fn forced(&self) -> Option<BreakerOverride> {
        *self.forced.lock().expect("breaker lock")
    }

    /// Puts `wanted` in force: an override, or automatic operation.
    pub fn set_override(&self, wanted: Option<BreakerOverride>) {
        if self.forced() == wanted {
            return;
        }
        match wanted {
            Some(BreakerOverride::Open) => self.force_open(),
            Some(BreakerOverride::Closed) => self.force_closed(),
            None => self.release(),
        }
    }

    /// Returns to automatic operation, starting closed.
    pub fn release(&self) {
        let mut forced = self.forced.lock().expect("breaker lock");
        *forced = None;
        self.machine.reset();
        if self.held_by_broker.load(Ordering::SeqCst) {
            self.observer.transition(BreakerState::Open);
        } else {
            self.observer.transition(BreakerState::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 3,
            open_min_ms: 50,
            open_max_ms: 200,
            ..BreakerSettings::default()
        }
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes_once_and_closes() {
        let breaker = Breaker::new(&fast());
        for _ in 0..3 {
            assert_eq!(breaker.permit(), Permit::Normal);
            breaker.on_failure();
        }
        assert_eq!(breaker.snapshot().state, BreakerState::Open);
        let opened = breaker.snapshot();
        let due = opened.next_probe_at.expect("an open breaker knows its next probe") - opened.changed_at;
        assert!(
            due >= chrono::Duration::milliseconds(35) && due <= chrono::Duration::milliseconds(200),
            "{due:?}"
        );
        assert_eq!(breaker.permit(), Permit::Denied);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(breaker.permit(), Permit::Probe);
        assert_eq!(breaker.snapshot().state, BreakerState::HalfOpen);
        assert_eq!(breaker.snapshot().next_probe_at, None);
        breaker.on_success(Permit::Probe);
        assert_eq!(breaker.snapshot().state, BreakerState::Closed);
        assert_eq!(breaker.permit(), Permit::Normal);
        assert_eq!(breaker.snapshot().opened_count, 1);
    }

    #[test]
    fn failed_probe_reopens() {
        let breaker = Breaker::new(&fast());
        for _ in 0..3 {
            breaker.on_failure();
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(breaker.permit(), Permit::Probe);
        breaker.on_failure();
        assert_eq!(breaker.snapshot().state, BreakerState::Open);
        assert_eq!(breaker.permit(), Permit::Denied);
    }

    #[test]
    fn requested_probe_passes_while_open() {
        let breaker = Breaker::new(&BreakerSettings {
            open_min_ms: 60_000,
            open_max_ms: 60_000,
            ..fast()
        });
        for _ in 0..3 {
            breaker.on_failure();
        }
        assert_eq!(breaker.permit(), Permit::Denied);
        breaker.request_probe();
        assert_eq!(breaker.permit(), Permit::Probe);
        assert_eq!(breaker.permit(), Permit::Denied, "one probe only");
        breaker.request_probe();
        let permit = breaker.permit();
        breaker.on_success(permit);
        assert_eq!(breaker.snapshot().state, BreakerState::Closed);
    }

    #[test]
    fn a_probe_requested_while_closed_does_not_shorten_a_later_open_interval() {
        let breaker = Breaker::new(&BreakerSettings {
            open_min_ms: 60_000,
            open_max_ms: 60_000,
            ..fast()
        });
        breaker.request_probe();
        assert_eq!(breaker.permit(), Permit::Normal);
        for _ in 0..3 {
            breaker.on_failure();
        }
        assert_eq!(breaker.permit(), Permit::Denied);
    }

    #[test]
    fn forced_states_override_and_release() {
        let breaker = Breaker::new(&fast());
        breaker.force_open();
        assert_eq!(breaker.permit(), Permit::Denied);
        assert_eq!(breaker.snapshot().state, BreakerState::ForcedOpen);
        breaker.force_closed();
        for _ in 0..5 {
            breaker.on_failure();
        }
        assert_eq!(breaker.permit(), Permit::Normal);
        // Failures while forced leave no trace in the state shown either.
        assert_eq!(breaker.snapshot().state, BreakerState::ForcedClosed);
        breaker.release();
        assert_eq!(breaker.snapshot().state, BreakerState::Closed);
    }

    /// `breaker release` then at once `breaker close`, with failures of
    /// windows already in flight landing in between and after: the forced
    /// state holds every time (they used to reopen it 0.2-0.7 ms later).
    #[test]
    fn a_forced_state_wins_over_outcomes_in_flight() {
        let breaker = Arc::new(Breaker::new(&BreakerSettings {
            consecutive_failures: 1,
            ..fast()
        }));
        let failing = {
            let breaker = breaker.clone();
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    breaker.on_failure();
                }
            })
        };
        for _ in 0..200 {
            breaker.release();
            breaker.force_closed();
            assert_eq!(breaker.snapshot().state, BreakerState::ForcedClosed);
            assert_eq!(breaker.permit(), Permit::Normal);
        }
        failing.join().unwrap();
        assert_eq!(breaker.snapshot().state, BreakerState::ForcedClosed);
        breaker.force_open();
        breaker.on_success(Permit::Probe);
        assert_eq!(breaker.snapshot().state, BreakerState::ForcedOpen);
        assert_eq!(breaker.permit(), Permit::Denied);
    }

    #[test]
    fn open_interval_grows_and_stays_within_bounds() {
        let policy = RetryPolicy::from_millis(100, 1000, RetryPolicy::RETRY_JITTER).unwrap();
        let intervals: Vec<Duration> = OpenInterval::new(policy).take(12).collect();
        assert!(intervals
            .iter()
            .all(|d| *d >= Duration::from_millis(70) && *d <= Duration::from_millis(1000)));
        assert!(intervals[8] > intervals[0]);
    }
}
