//! `GET /v1/tasks/{id}/events`: a task's Celery state as server-sent
//! events, so a page can draw a progress bar from a worker's
//! `self.update_state(state="PROGRESS", meta={...})`.
//!
//! Each event is `event: state`, its `data` the task's `result` object as
//! `GET /v1/tasks/{id}` shows it (`status`, `result` — the meta while in
//! progress —, `date_done`, ...): one at once, then one per change, until
//! the task reaches `SUCCESS`, `FAILURE` or `REVOKED`, after which the
//! stream ends.
//!
//! Bounded: at most `http.max_event_subscribers` streams at a time (past
//! it, 503 at once), and a stream whose task has not changed for
//! [`IDLE_LIMIT`] ends (the page can reconnect); keep-alive comments keep
//! a quiet but live stream open. The states come from one poller for every
//! follower ([`crate::tracking::progress`]).

use super::health::{keep_alive_interval, EventSubscribers, REFUSED_SUBSCRIBERS_METRIC};
use super::problem::Problem;
use super::AppState;
use crate::tracking::progress::is_final;
use crate::tracking::progress::Observed;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit};

/// One stream's state: the task's states, and its subscriber slot, held as
/// long as the stream (the response body) lives.
struct Following {
    states: watch::Receiver<Observed>,
    _slot: OwnedSemaphorePermit,
    finished: bool,
}

/// A stream whose task has not changed for this long ends.
pub const IDLE_LIMIT: Duration = Duration::from_secs(600);

pub async fn task_events(
    State(state): State<AppState>,
    Extension(subscribers): Extension<EventSubscribers>,
    Path(id): Path<String>,
) -> Response {
    let Some(slot) = subscribers.try_acquire() else {
        metrics::counter!(REFUSED_SUBSCRIBERS_METRIC).increment(1);
        let max = state.settings.http.max_event_subscribers;
        return Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too-many-subscribers",
            "Too many event-stream subscribers",
            format!("{max} clients already follow event streams (http.max_event_subscribers); retry later"),
        )
        .retry_after(5)
        .into_response();
    };
    let mut states = state.tracking.follow_result(&id);
    // A state read before this stream joined is sent too.
    states.mark_changed();
    let following = Following {
        states,
        _slot: slot,
        finished: false,
    };
    let stream = futures_util::stream::unfold(following, |mut following| async move {
        if following.finished {
            return None;
        }
        loop {
            let changed = tokio::time::timeout(IDLE_LIMIT, following.states.changed()).await;
            if !matches!(changed, Ok(Ok(()))) {
                return None;
            }
            let Some(current) = following.states.borrow_and_update().clone() else {
                continue;
            };
            following.finished = current["status"].as_str().is_some_and(is_final);
            let event = Event::default().event("state").data(current.to_string());
            return Some((Ok::<_, Infallible>(event), following));
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(keep_alive_interval(state.settings.http.idle_timeout_ms)))
        .into_response()
}
