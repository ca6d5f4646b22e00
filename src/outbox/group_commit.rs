//! Group commit: many writers, one write, one flush.
//!
//! An accept hands its prepared request to [`GroupCommitter::accept`] and
//! waits. One committer thread collects every request that arrived while
//! the previous group was written, stages them in arrival order into one
//! all-or-nothing write ([`super::accept`]), applies it, and covers the group with
//! a single blocking `flush()`. [`GroupCommitter::commit`] asks for a flush
//! alone, for writes applied elsewhere. Invariant: a request is answered
//! only after a flush that *started after* its writes were applied, so an
//! `Ok` means on disk.
//!
//! Invariant: nothing is seen before it is durable. sled makes a write
//! visible as soon as it is applied, before the flush that makes it
//! durable; [`Visibility`] hides it until then. Pending and journal entries
//! are read only below the sequence that was allocated when the last
//! successful flush started, and the statuses of a group's tasks are hidden
//! until its flush returned. When a flush fails, the group stays hidden for
//! the life of the process (the store refuses every later write, see
//! [`super::failure`]), so a 503 task is never published, never answered
//! by `GET /v1/tasks/{id}`, never tracked, and its idempotency key is free
//! after the restart.
//!
//! Under concurrent load the committer lingers up to [`LINGER`] after the
//! first request of a group so that more writers join it: every sled flush
//! wakes sled's whole I/O thread pool, so fewer, larger flushes are what
//! let accepts scale. A writer arriving alone (the previous group had no
//! company) is flushed at once, so light traffic pays no added latency.
//!
//! The relay's own flushes (its sent marks and completions,
//! [`GroupCommitter::commit_soon`]) ride with the next accept's group while
//! accepts are arriving: alone they would cost a flush of their own, and a
//! producer sending one task at a time would wait behind it. They wait at
//! most [`LINGER`] for company, and none at all when no accept came in the
//! last [`ACCEPTS_RECENT`] (a drain with nothing arriving is not slowed).
//!
//! The committer also keeps the outbox's [`super::watermark`] (how far
//! accepts are durable) up to date: at most once a second while accepting
//! or idle, and at once for a bare [`GroupCommitter::commit`] (the final
//! flush at shutdown) and when the outbox closes.
//!
//! Why a dedicated thread rather than `spawn_blocking` per flush: the
//! committer blocks on almost every accept, and handing each flush to the
//! blocking pool cost a task hop and extra wake-ups per group, which showed
//! up in the accept profile as context switches. Why not
//! `sled::Db::flush_async` from each writer: with 8 or more concurrent
//! callers it was measured never to complete (see DESIGN.md).

use super::accept::{AcceptWriter, PreparedAccept};
use super::storage::StorageError;
use super::watermark::Watermark;
use super::{AcceptOutcome, OutboxError};
use crate::task::TaskId;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Longest a busy group waits for company before it is flushed.
pub const LINGER: Duration = Duration::from_micros(1000);
/// A group this large is flushed without waiting out the linger.
const MAX_GROUP: usize = 512;
/// A relay flush waits for an accept to share its group only if one came
/// in this recently.
const ACCEPTS_RECENT: Duration = Duration::from_millis(5);

/// What a writer waits for: an accept's outcome, or a bare flush (`None`).
type Answer = Result<Option<AcceptOutcome>, OutboxError>;

struct Request {
    accept: Option<PreparedAccept>,
    /// A bare flush that may wait for the next accept's group.
    may_wait: bool,
    answer: oneshot::Sender<Answer>,
}

/// What readers may see of the store: see the module comment.
pub(super) struct Visibility {
    /// Every sequence below it was applied before a flush that succeeded.
    durable_below: AtomicU64,
    /// Tasks whose group is applied but not (or never) made durable.
    not_yet_durable: Mutex<HashSet<TaskId>>,
}

impl Visibility {
    /// At open everything in the store is durable: it was read from disk.
    pub(super) fn new(next_sequence: u64) -> Self {
        Self {
            durable_below: AtomicU64::new(next_sequence),
            not_yet_durable: Mutex::new(HashSet::new()),
        }
    }

    /// Every sequence below it is durable.
    pub(super) fn durable_below(&self) -> u64 {
        self.durable_below.load(Ordering::Acquire)
    }

    pub(super) fn is_durable(&self, sequence: u64) -> bool {
        sequence < self.durable_below.load(Ordering::Acquire)
    }

    /// Whether the status of `id` must not be shown yet.
    pub(super) fn hides(&self, id: &TaskId) -> bool {
        self.not_yet_durable
            .lock()
            .expect("visibility lock poisoned")
            .contains(id)
    }

    /// Called before a group's batch is applied.
    pub(super) fn hide(&self, ids: &[TaskId]) {
        if !ids.is_empty() {
            self.not_yet_durable
                .lock()
                .expect("visibility lock poisoned")
                .extend(ids.iter().copied());
        }
    }

    fn made_durable(&self, below: u64, ids: &[TaskId]) {
        self.durable_below.fetch_max(below, Ordering::AcqRel);
        if !ids.is_empty() {
            let mut hidden = self.not_yet_durable.lock().expect("visibility lock poisoned");
            for id in ids {
                hidden.remove(id);
            }
        }
    }
}

pub struct GroupCommitter {
    /// `None` only while dropping, so the thread sees the channel close.
    requests: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommitter {
    /// Starts the committer thread. It ends when the committer is dropped.
    pub(super) fn start(writer: AcceptWriter, mut watermark: Watermark) -> Result<Self, StorageError> {
        let (requests, receiver) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("outbox-commit".into())
            .spawn(move || {
                let mut group: Vec<Request> = Vec::new();
                let mut busy = false;
                let mut last_accept: Option<Instant> = None;
                loop {
                    let first = match receiver.recv_timeout(super::watermark::REFRESH_EVERY) {
                        Ok(first) => first,
                        // Idle: let the watermark catch up with the last
                        // groups (it is refreshed at most once a second).
                        Err(RecvTimeoutError::Timeout) => {
                            watermark.refresh(writer.shared.visibility.durable_below(), false);
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    };
                    group.push(first);
                    while let Ok(next) = receiver.try_recv() {
                        group.push(next);
                    }
                    let accepting = last_accept.is_some_and(|at| at.elapsed() < ACCEPTS_RECENT);
                    let only_relay_flushes = group.iter().all(|request| request.may_wait);
                    if busy {
                        let deadline = Instant::now() + LINGER;
                        while group.len() < MAX_GROUP {
                            match receiver.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                                Ok(next) => group.push(next),
                                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                            }
                        }
                    } else if only_relay_flushes && accepting {
                        // Wait for the next accept (or the linger), not longer.
                        let deadline = Instant::now() + LINGER;
                        while group.iter().all(|request| request.may_wait) {
                            match receiver.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                                Ok(next) => group.push(next),
                                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                            }
                        }
                        while let Ok(next) = receiver.try_recv() {
                            group.push(next);
                        }
                    }
                    if group.iter().any(|request| request.accept.is_some()) {
                        last_accept = Some(Instant::now());
                    }
                    // Company that was waited for does not make the next
                    // group linger: only accepts arriving together do.
                    busy = group.iter().filter(|request| !request.may_wait).count() > 1;
                    // A bare flush that does not wait (the final flush at
                    // shutdown, an operator's change) brings the watermark
                    // up to date at once.
                    let explicit_flush = group
                        .iter()
                        .any(|request| request.accept.is_none() && !request.may_wait);
                    write_group(&writer, &mut group);
                    watermark.refresh(writer.shared.visibility.durable_below(), explicit_flush);
                }
                // The channel closed: the outbox is closing.
                watermark.refresh(writer.shared.visibility.durable_below(), true);
            })
            .map_err(|error| StorageError::Io(format!("cannot start the outbox committer thread: {error}")))?;
        Ok(Self {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Stages, writes and flushes one accept with whatever else is waiting.
    pub(super) async fn accept(&self, accept: PreparedAccept) -> Result<AcceptOutcome, OutboxError> {
        let outcome = self.send(Some(accept), false).await?;
        Ok(outcome.expect("an accept is answered with its outcome"))
    }

    /// Waits until everything applied before this call is durable.
    pub async fn commit(&self) -> Result<(), OutboxError> {
        self.send(None, false).await.map(|_| ())
    }

    /// [`GroupCommitter::commit`], but riding with the next accept's group
    /// when accepts are arriving (at most [`LINGER`] later): for the
    /// relay's writes, which no client is waiting for.
    pub async fn commit_soon(&self) -> Result<(), OutboxError> {
        self.send(None, true).await.map(|_| ())
    }

    async fn send(&self, accept: Option<PreparedAccept>, may_wait: bool) -> Answer {
        let stopped = || OutboxError::Storage(StorageError::Io("the outbox committer has stopped".into()));
        let (answer, receiver) = oneshot::channel();
        self.requests
            .as_ref()
            .ok_or_else(stopped)?
            .send(Request {
                accept,
                may_wait,
                answer,
            })
            .map_err(|_| stopped())?;
        receiver.await.map_err(|_| stopped())?
    }
}

/// Writes one group: its accepts as one write, then one flush for all, and
/// makes what the flush covered visible.
fn write_group(writer: &AcceptWriter, group: &mut Vec<Request>) {
    let shared = &writer.shared;
    let accepts: Vec<&PreparedAccept> = group.iter().filter_map(|request| request.accept.as_ref()).collect();
    let started = Instant::now();
    let (outcomes, staged_ids) = writer.write_group(&accepts);
    let mut outcomes = outcomes.into_iter();
    // Sequences are allocated and their batches applied under this lock,
    // so everything below `next` is applied: the flush below covers it.
    let applied_below = shared.insert_lock.lock().expect("insert lock poisoned").next;
    let written = Instant::now();
    let flushed = shared.storage.flush();
    if flushed.is_ok() {
        shared.visibility.made_durable(applied_below, &staged_ids);
    }
    // Accept latency is these two plus the wait for the group before: the
    // flush time is the disk's, and what an operator compares first.
    metrics::histogram!("taskgate_outbox_write_seconds").record(written.duration_since(started).as_secs_f64());
    metrics::histogram!("taskgate_outbox_flush_seconds").record(written.elapsed().as_secs_f64());
    metrics::counter!("taskgate_outbox_flushes_total").increment(1);
    metrics::histogram!("taskgate_outbox_flush_group_size").record(group.len() as f64);
    for request in group.drain(..) {
        let answer = match (&request.accept, &flushed) {
            (_, Err(error)) => Err(OutboxError::Storage(error.clone())),
            (Some(_), Ok(())) => outcomes.next().expect("one outcome per accept").map(Some),
            (None, Ok(())) => Ok(None),
        };
        let _ = request.answer.send(answer);
    }
}

impl Drop for GroupCommitter {
    /// Joins the thread so the store it holds is closed when the outbox is:
    /// a restart in the same process can then reopen the directory at once.
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
