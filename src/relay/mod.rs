//! The relay: moves tasks from the outbox to the broker, lane by lane,
//! behind the circuit breaker.
//!
//! Invariants:
//! - A lane is always read from its head, so order within a lane holds
//!   across retries and restarts; an entry leaves the outbox only when the
//!   publisher confirmed it, or as a dead letter when the failure is
//!   permanent (so one poison message never blocks its lane).
//! - A window is at most `publish_window` entries of one lane; a window
//!   with any transient failure counts once against the breaker and ends
//!   the round.
//! - Windows are pipelined, at most [`WINDOWS_PER_ROUND`] per lane and
//!   round: while a window is with the broker, the next one is read (after
//!   the last sequence in flight); once every entry of the first is
//!   confirmed (or permanently refused), the next is published while the
//!   first one's results are written to the outbox. The broker thus never
//!   waits for sled, and order holds: a window starts only after the one
//!   before it was accepted in full.
//! - Completions are made durable in groups: before a window is sent, one
//!   flush covers the completion of the window before the previous one
//!   and the lane's sent mark ([`Outbox::mark_sending`]); a round ends
//!   with a flush. A crash therefore re-sends at most two windows per lane
//!   (the one being settled and the one in flight), a failed window at
//!   most itself, and every re-send is counted in
//!   `taskgate_republished_total`.
//! - Once the outbox store has failed ([`Outbox::storage_failure`])
//!   nothing more is sent: a window that could not be completed would be
//!   sent again and again.
//! - While the breaker is open nothing is sent; tasks keep spooling.
//! - Shutdown is observed only between rounds, so a round in flight
//!   finishes (bounded by the publisher's own timeouts).
//! - A round runs under the rounds lock; an operator action that removes
//!   pending entries ([`Relay::hold_rounds`]) takes it first, so the relay
//!   never completes an entry that was removed under it.
//! - An operator's holds (a pause, a forced breaker state) are saved in the
//!   outbox before they take effect and restored when the relay is built,
//!   so a restart never undoes one; a hold that could not be saved changes
//!   nothing.

pub mod breaker;
pub mod meter;

use crate::broker::{PublishError, Publisher};
use crate::config::RelaySettings;
use crate::outbox::{Attempt, Lane, OperatorHolds, Outbox, OutboxError, PendingEntry};
use breaker::{Breaker, Permit};
use meter::{PublishMeter, PublishRate};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long the relay idles between breaker checks while it cannot send.
const BLOCKED_POLL: Duration = Duration::from_millis(100);
/// A safety net: even without a wake-up, look at the outbox this often.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Longest the relay waits at start for the broker's first connection
/// attempt to end before it starts publishing (and counting failures).
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(5);
/// Bounds a round (and so how long shutdown or an operator's hold waits for
/// it) while a deep lane drains.
const WINDOWS_PER_ROUND: usize = 4;

/// A window back from the publisher, with the broker's answer per entry.
type PublishedWindow = (Vec<PendingEntry>, Vec<Result<(), PublishError>>);

pub struct Relay {
    outbox: Arc<Outbox>,
    publisher: Arc<dyn Publisher>,
    breaker: Arc<Breaker>,
    settings: RelaySettings,
    paused: AtomicBool,
    /// The holds as saved; held while one is changed, so two operators'
    /// changes are saved and applied in one order.
    holds: Mutex<OperatorHolds>,
    wake: Notify,
    rounds: tokio::sync::Mutex<()>,
    published: PublishMeter,
}

enum RoundOutcome {
    /// Nothing to do.
    Idle,
    /// Work was done; go again at once.
    Progress,
    /// The breaker is open, paused, or the round failed: wait a little.
    Blocked,
}

impl Relay {
    /// Builds the relay with the operator's holds the outbox kept (a pause
    /// or a forced breaker state from before a restart is in force again).
    pub fn new(
        outbox: Arc<Outbox>,
        publisher: Arc<dyn Publisher>,
        breaker: Arc<Breaker>,
        settings: RelaySettings,
    ) -> Result<Arc<Self>, OutboxError> {
        let holds = outbox.operator_holds()?;
        if holds.relay_paused {
            tracing::warn!("the relay is paused, as an operator left it: tasks spool until it is resumed");
        }
        if let Some(forced) = holds.breaker {
            tracing::warn!(
                ?forced,
                "the breaker is forced, as an operator left it, until it is released"
            );
        }
        breaker.set_override(holds.breaker);
        Ok(Arc::new(Self {
            outbox,
            publisher,
            breaker,
            settings,
            paused: AtomicBool::new(holds.relay_paused),
            holds: Mutex::new(holds),
            wake: Notify::new(),
            rounds: tokio::sync::Mutex::new(()),
            published: PublishMeter::default(),
        }))
    }

    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }

    /// Changes the operator's holds: saved (and flushed) first, then put in
    /// force, so an acknowledged hold survives a crash and one that could
    /// not be saved changes nothing. Blocking: call from `spawn_blocking`.
    pub fn change_holds(&self, change: impl FnOnce(&mut OperatorHolds)) -> Result<OperatorHolds, OutboxError> {
        let mut holds = self.holds.lock().expect("holds lock poisoned");
        let mut wanted = *holds;
        change(&mut wanted);
        if wanted != *holds {
            self.outbox.save_operator_holds(&wanted)?;
            *holds = wanted;
        }
        self.paused.store(wanted.relay_paused, Ordering::SeqCst);
        self.breaker.set_override(wanted.breaker);
        if !wanted.relay_paused {
            self.wake.notify_one();
        }
        Ok(wanted)
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Confirmed publishes since start and the recent rate.
    pub fn publish_rate(&self) -> PublishRate {
        self.published.rate()
    }

    /// Waits for the round in flight (if any) and keeps the relay from
    /// starting another until the guard is dropped.
    pub async fn hold_rounds(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.rounds.lock().await
    }

    /// Probes the broker now, even with the breaker open (operator drain).
    pub fn probe_now(&self) {
        self.breaker.request_probe();
        self.publisher.reconnect_now();
        self.wake.notify_one();
    }

    /// Runs until `shutdown` is cancelled; the round in flight completes.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut broker_status = self.publisher.status();
        // A restart with a backlog would otherwise publish into a connection
        // that is still being opened, count those rounds as failures and
        // open the breaker on every start. The wait is bounded: a broker
        // that cannot be reached is the breaker's business.
        let first_attempt = broker_status.wait_for(|status| !status.is_first_attempt_running());
        tokio::select! {
            _ = tokio::time::timeout(FIRST_CONNECT_WAIT, first_attempt) => {}
            _ = shutdown.cancelled() => {}
        }
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let outcome = {
                let _round = self.rounds.lock().await;
                self.round().await
            };
            let wait = match outcome {
                RoundOutcome::Progress => continue,
                RoundOutcome::Idle => IDLE_POLL,
                RoundOutcome::Blocked => BLOCKED_POLL,
            };
            tokio::select! {
                _ = self.outbox.wait_for_work() => {}
                _ = self.wake.notified() => {}
                changed = broker_status.changed() => {
                    // A fresh connection is the best moment to probe rather
                    // than waiting out the open interval.
                    if changed.is_ok() && broker_status.borrow_and_update().connected {
                        self.breaker.request_probe();
                    }
                }
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        tracing::info!("relay stopped");
    }

    async fn round(&self) -> RoundOutcome {
        if self.is_paused() || self.outbox.storage_failure().is_some() {
            return RoundOutcome::Blocked;
        }
        let lanes = self.outbox.lanes();
        if lanes.is_empty() {
            return RoundOutcome::Idle;
        }
        let mut progressed = false;
        for lane in lanes {
            match self.publish_lane(&lane).await {
                RoundOutcome::Idle => {}
                RoundOutcome::Progress => progressed = true,
                RoundOutcome::Blocked => return RoundOutcome::Blocked,
            }
        }
        if progressed {
            RoundOutcome::Progress
        } else {
            RoundOutcome::Idle
        }
    }

    /// Publishes up to [`WINDOWS_PER_ROUND`] windows of `lane`: while one
    /// window is with the broker the next one is read from the outbox, and
    /// once the first is accepted in full the next is sent while the first
    /// one's results are written.
    async fn publish_lane(&self, lane: &Lane) -> RoundOutcome {
        let permit = self.breaker.permit();
        let limit = match permit {
            Permit::Denied => return RoundOutcome::Blocked,
            Permit::Probe => 1,
            Permit::Normal => self.settings.publish_window,
        };
        let entries = match self.outbox.head(lane, limit) {
            Ok(entries) => entries,
            Err(error) => {
                tracing::error!(%lane, %error, "cannot read the outbox");
                return RoundOutcome::Blocked;
            }
        };
        if entries.is_empty() {
            return RoundOutcome::Idle;
        }
        let mut last_in_flight = entries.last().map(|entry| entry.sequence);
        if let Err(error) = self.prepare_send(lane, &entries).await {
            tracing::error!(%lane, %error, "cannot record the window about to be sent");
            return RoundOutcome::Blocked;
        }
        let mut publishing = self.spawn_publish(lane, entries);
        let mut windows = 1;
        loop {
            // Read ahead while the broker works, so that it does not wait
            // for the outbox between windows. What is read is only sent if
            // this window is accepted in full (order within the lane).
            let read_ahead = matches!(permit, Permit::Normal) && windows < WINDOWS_PER_ROUND && !self.is_paused();
            let next = if read_ahead {
                self.outbox
                    .entries_after(lane, last_in_flight, limit)
                    .unwrap_or_else(|error| {
                        tracing::error!(%lane, %error, "cannot read the outbox");
                        Vec::new()
                    })
            } else {
                Vec::new()
            };
            let (published, results) = match publishing.await {
                Ok(outcome) => outcome,
                Err(join) => {
                    // The window stays in the outbox and is published again.
                    tracing::error!(%lane, %join, "publishing task failed");
                    return RoundOutcome::Blocked;
                }
            };
            let accepted_in_full = results
                .iter()
                .all(|result| !result.as_ref().is_err_and(PublishError::is_retryable));
            let go_on = accepted_in_full
                && !next.is_empty()
                && !self.is_paused()
                && matches!(self.breaker.permit(), Permit::Normal);
            if !go_on || self.prepare_send(lane, &next).await.is_err() {
                let outcome = self.finish_window(lane, permit, &published, results);
                return self.end_round(lane, outcome).await;
            }
            last_in_flight = next.last().map(|entry| entry.sequence);
            publishing = self.spawn_publish(lane, next);
            let settled = self.finish_window(lane, permit, &published, results);
            windows += 1;
            if matches!(settled, RoundOutcome::Blocked) {
                // Record what the broker said about the window in flight
                // too, if the outbox lets us; then wait.
                if let Ok((published, results)) = publishing.await {
                    self.finish_window(lane, permit, &published, results);
                }
                return self.end_round(lane, RoundOutcome::Blocked).await;
            }
        }
    }

    /// Before `entries` are sent: counts re-sends and moves the lane's sent
    /// mark; then one flush makes the mark and every completion settled so
    /// far durable (see the module's invariants).
    async fn prepare_send(&self, lane: &Lane, entries: &[PendingEntry]) -> Result<(), OutboxError> {
        self.outbox.mark_sending(lane, entries)?;
        self.outbox.flush().await
    }

    /// Makes the round's completions durable before the relay waits.
    async fn end_round(&self, lane: &Lane, outcome: RoundOutcome) -> RoundOutcome {
        match self.outbox.flush().await {
            Ok(()) => outcome,
            Err(error) => {
                tracing::error!(%lane, %error, "cannot make the published tasks' completion durable");
                RoundOutcome::Blocked
            }
        }
    }

    /// Publishes a window on a task of its own, so the relay can read and
    /// settle meanwhile.
    fn spawn_publish(&self, lane: &Lane, entries: Vec<PendingEntry>) -> tokio::task::JoinHandle<PublishedWindow> {
        let publisher = self.publisher.clone();
        let lane = lane.clone();
        metrics::histogram!("taskgate_publish_window_size").record(entries.len() as f64);
        tokio::spawn(async move {
            let results = publisher.publish(&lane, &entries).await;
            (entries, results)
        })
    }

    /// Settles one window and tells the breaker how it went.
    fn finish_window(
        &self,
        lane: &Lane,
        permit: Permit,
        entries: &[PendingEntry],
        results: Vec<Result<(), PublishError>>,
    ) -> RoundOutcome {
        match self.settle(entries, results) {
            Ok(None) => {
                self.breaker.on_success(permit);
                RoundOutcome::Progress
            }
            Ok(Some(error)) => {
                self.breaker.on_failure();
                tracing::debug!(%lane, %error, "publish round failed");
                RoundOutcome::Blocked
            }
            Err(error) => {
                tracing::error!(%lane, %error, "cannot update the outbox after publishing");
                RoundOutcome::Blocked
            }
        }
    }

    /// Applies a round's results to the outbox. Returns the first transient
    /// error, if any.
    fn settle(
        &self,
        entries: &[PendingEntry],
        results: Vec<Result<(), PublishError>>,
    ) -> Result<Option<String>, crate::outbox::OutboxError> {
        let mut confirmed = Vec::with_capacity(entries.len());
        let mut failed = Vec::new();
        let mut unsent = Vec::new();
        let mut first_error = None;
        for (entry, result) in entries.iter().zip(results) {
            match result {
                Ok(()) => confirmed.push(entry),
                Err(PublishError::Permanent(reason)) => {
                    metrics::counter!("taskgate_publish_failures_total", "kind" => "permanent").increment(1);
                    self.outbox.dead_letter(entry, &reason)?;
                }
                Err(PublishError::Transient(reason)) => {
                    metrics::counter!("taskgate_publish_failures_total", "kind" => "transient").increment(1);
                    failed.push(entry);
                    first_error.get_or_insert(reason);
                }
                Err(PublishError::Unsent(reason)) => {
                    metrics::counter!("taskgate_publish_failures_total", "kind" => "unsent").increment(1);
                    unsent.push(entry);
                    first_error.get_or_insert(reason);
                }
            }
        }
        metrics::counter!("taskgate_published_total").increment(confirmed.len() as u64);
        self.published.record(confirmed.len() as u64);
        self.outbox.complete(&confirmed)?;
        if let Some(error) = &first_error {
            self.outbox.record_failure(&failed, error, Attempt::Made)?;
            self.outbox.record_failure(&unsent, error, Attempt::NotMade)?;
        }
        Ok(first_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{BrokerStatus, PublishResult};
    use crate::config::BreakerSettings;
    use crate::outbox::{BreakerOverride, FaultyStorage, OutboxSettings, SledStorage};
    use crate::task::{Task, TaskId};
    use breaker::BreakerState;
    use futures_util::future::BoxFuture;
    use serde_json::{json, Map};
    use tokio::sync::watch;

    /// Records every window it is given (as the tasks' first argument) and
    /// refuses one task, once, as a transient failure; while `unreachable`,
    /// sends nothing and answers "not connected" for every task.
    struct ScriptedPublisher {
        windows: Mutex<Vec<Vec<i64>>>,
        refuse_once: Mutex<Option<i64>>,
        unreachable: Mutex<bool>,
        status: watch::Sender<BrokerStatus>,
    }

    impl Publisher for ScriptedPublisher {
        fn lanes_for(&self, _task: &Task) -> Vec<Lane> {
            vec![Lane::new("exchange")]
        }

        fn publish<'a>(&'a self, _lane: &'a Lane, entries: &'a [PendingEntry]) -> BoxFuture<'a, Vec<PublishResult>> {
            Box::pin(async move {
                if *self.unreachable.lock().unwrap() {
                    return entries
                        .iter()
                        .map(|_| Err(PublishError::not_connected(Some("connection refused"))))
                        .collect();
                }
                // Leave the relay time to read ahead while "the broker" works.
                tokio::time::sleep(Duration::from_millis(5)).await;
                let numbers: Vec<i64> = entries
                    .iter()
                    .map(|entry| entry.task.args[0].as_i64().unwrap())
                    .collect();
                self.windows.lock().unwrap().push(numbers.clone());
                let mut refuse = self.refuse_once.lock().unwrap();
                numbers
                    .iter()
                    .map(|number| {
                        if *refuse == Some(*number) {
                            *refuse = None;
                            Err(PublishError::Transient("nacked".into()))
                        } else {
                            Ok(())
                        }
                    })
                    .collect()
            })
        }

        fn status(&self) -> watch::Receiver<BrokerStatus> {
            self.status.subscribe()
        }

        fn reconnect_now(&self) {}

        fn shutdown(&self) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    /// An outbox holding one task per number (its first argument), in one
    /// lane, and a relay (windows of 5) over a scripted publisher.
    struct Scripted {
        _dir: tempfile::TempDir,
        outbox: Arc<Outbox>,
        /// The outbox's storage, for injecting failures.
        storage: Arc<FaultyStorage>,
        publisher: Arc<ScriptedPublisher>,
        relay: Arc<Relay>,
        ids: Vec<TaskId>,
    }

    impl Scripted {
        /// Opens the outbox again over the same store, with a new relay, as
        /// a restart does (a store that failed a write refuses every write
        /// until then).
        fn restart(&mut self) {
            self.outbox =
                Outbox::with_storage(self.storage.clone(), OutboxSettings::for_test(self._dir.path())).unwrap();
            self.relay = self.rebuilt_relay();
        }

        /// Another relay over the same outbox and publisher, as a restart
        /// builds it.
        fn rebuilt_relay(&self) -> Arc<Relay> {
            Relay::new(
                self.outbox.clone(),
                self.publisher.clone(),
                Arc::new(Breaker::new(&BreakerSettings::default())),
                RelaySettings { publish_window: 5 },
            )
            .unwrap()
        }
    }

    async fn scripted(numbers: std::ops::Range<i64>, refuse_once: Option<i64>, unreachable: bool) -> Scripted {
        let dir = tempfile::tempdir().unwrap();
        let settings = OutboxSettings::for_test(dir.path());
        let sled = Arc::new(SledStorage::open(&settings.path, settings.cache_bytes).unwrap());
        let storage = Arc::new(FaultyStorage::new(sled));
        let outbox = Outbox::with_storage(storage.clone(), settings).unwrap();
        let mut ids = Vec::new();
        for number in numbers {
            let task = Task::for_test(
                TaskId::generate(),
                "app.work",
                vec![json!(number)],
                Map::new(),
                "app",
                &["q"],
            );
            ids.push(task.id);
            outbox
                .accept(vec![(task, vec![Lane::new("exchange")])], None)
                .await
                .unwrap();
        }
        let (status, _) = watch::channel(BrokerStatus::disconnected("test".into(), None));
        let publisher = Arc::new(ScriptedPublisher {
            windows: Mutex::new(Vec::new()),
            refuse_once: Mutex::new(refuse_once),
            unreachable: Mutex::new(unreachable),
            status,
        });
        let relay = Relay::new(
            outbox.clone(),
            publisher.clone(),
            Arc::new(Breaker::new(&BreakerSettings::default())),
            RelaySettings { publish_window: 5 },
        )
        .unwrap();
        Scripted {
            _dir: dir,
            outbox,
            storage,
            publisher,
            relay,
            ids,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_window_read_ahead_is_not_sent_until_the_one_before_was_accepted_in_full() {
        let Scripted {
            outbox,
            publisher,
            relay,
            ..
        } = &scripted(0..25, Some(7), false).await;

        // The second window has a transient failure: the round stops there,
        // and the third window, already read, is not sent.
        assert!(matches!(relay.round().await, RoundOutcome::Blocked));
        assert_eq!(
            *publisher.windows.lock().unwrap(),
            vec![vec![0, 1, 2, 3, 4], vec![5, 6, 7, 8, 9]]
        );
        assert_eq!(outbox.depth(), 16);

        // The next round starts from the lane's head: the refused task
        // first, then the rest in order, four windows per round.
        while outbox.depth() > 0 {
            assert!(matches!(relay.round().await, RoundOutcome::Progress));
        }
        let windows = publisher.windows.lock().unwrap().clone();
        assert_eq!(
            windows[2..],
            [
                vec![7, 10, 11, 12, 13],
                vec![14, 15, 16, 17, 18],
                vec![19, 20, 21, 22, 23],
                vec![24],
            ]
        );
        assert!(matches!(relay.round().await, RoundOutcome::Idle));
    }

    /// `attempts` counts what reached the broker: rounds without a
    /// connection (every probe of an outage) leave it alone, a nack counts.
    #[tokio::test]
    async fn rounds_without_a_connection_are_not_counted_as_attempts() {
        let Scripted {
            outbox,
            publisher,
            relay,
            ids,
            ..
        } = &scripted(1..2, Some(1), true).await;
        let id = ids[0];
        for _ in 0..2 {
            assert!(matches!(relay.round().await, RoundOutcome::Blocked));
        }
        let status = outbox.status(&id).unwrap().unwrap();
        assert_eq!(status.attempts, 0);
        assert!(
            status
                .last_error
                .as_deref()
                .unwrap_or_default()
                .contains("not connected"),
            "{status:?}"
        );

        *publisher.unreachable.lock().unwrap() = false;
        relay.breaker().request_probe();
        assert!(matches!(relay.round().await, RoundOutcome::Blocked));
        let status = outbox.status(&id).unwrap().unwrap();
        assert_eq!((status.attempts, status.last_error.as_deref()), (1, Some("nacked")));
        assert_eq!(outbox.depth(), 1);
    }

    /// A pause and a forced breaker state outlive the relay that took them;
    /// one that could not be saved is not taken.
    #[tokio::test]
    async fn operator_holds_are_saved_before_they_take_effect() {
        let mut scripted = scripted(1..4, None, false).await;
        let relay = scripted.relay.clone();
        relay
            .change_holds(|holds| {
                holds.relay_paused = true;
                holds.breaker = Some(BreakerOverride::Open);
            })
            .unwrap();
        assert!(matches!(relay.round().await, RoundOutcome::Blocked));
        assert!(scripted.publisher.windows.lock().unwrap().is_empty());

        let restarted = scripted.rebuilt_relay();
        assert!(restarted.is_paused());
        assert_eq!(restarted.breaker().snapshot().state, BreakerState::ForcedOpen);
        assert!(matches!(restarted.round().await, RoundOutcome::Blocked));

        // The disk refuses: the resume is reported and changes nothing.
        scripted.storage.fail_writes(true);
        let error = restarted.change_holds(|holds| holds.relay_paused = false).unwrap_err();
        assert!(matches!(error, OutboxError::Storage(_)), "{error}");
        assert!(restarted.is_paused());
        scripted.storage.fail_writes(false);
        scripted.restart();
        assert!(scripted.relay.is_paused());

        scripted
            .relay
            .change_holds(|holds| {
                holds.relay_paused = false;
                holds.breaker = None;
            })
            .unwrap();
        let released = scripted.rebuilt_relay();
        assert!(!released.is_paused());
        assert_eq!(released.breaker().snapshot().state, BreakerState::Closed);
        assert!(matches!(released.round().await, RoundOutcome::Progress));
        assert_eq!(scripted.outbox.depth(), 0);
    }
}
