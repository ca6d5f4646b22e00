//! The HTTP server's accept loop and connections (hyper HTTP/1.1), with
//! the bounds a slow or hostile client meets: a connection cap, a
//! header-read timeout, a keep-alive idle timeout, a whole-request timeout
//! and graceful shutdown.
//!
//! - **Connections**: at most `http.max_connections` are served at once.
//!   Past it a new connection is answered `503` problem+json with
//!   `Connection: close` as soon as its request header is in (at most
//!   [`REFUSAL_LINGER`] later) and closed, by a task of its own (at most
//!   [`MAX_REFUSING`] at a time; beyond those it is closed unanswered): the
//!   accept loop never waits on a client, and no handler runs. At start the
//!   soft limit of open files is raised towards the cap plus
//!   [`FILE_RESERVE`], so that a full house still leaves descriptors for
//!   the outbox, the broker and the database.
//! - **Header read**: a new connection must deliver its first request
//!   header within `http.header_read_timeout_ms` of being accepted, and a
//!   later request's header within that time of its first byte; else the
//!   connection is closed.
//! - **Idle**: a keep-alive connection with no request for
//!   `http.idle_timeout_ms` is closed; so is one whose response has made no
//!   progress (a client that stopped reading) for as long.
//! - **Whole request**: a request must be answered within
//!   `http.request_timeout_ms` of its header, else it gets 408
//!   problem+json and the connection is closed. The clock stops when the
//!   response starts, so a stream (`GET /v1/health/stream`, an export) is
//!   never cut by it.
//!
//! hyper's own `header_read_timeout` is not used: hyper 1.x restarts that
//! timer as soon as a response is written, which would close every idle
//! keep-alive connection after the header timeout and make
//! `http.idle_timeout_ms` meaningless. Each connection's [`Activity`]
//! tells instead which of the phases above it is in.
//!
//! Invariant: **a timeout never cuts a request that may have changed
//! something.** A state-changing request (any method but GET, HEAD,
//! OPTIONS, TRACE) passes its point of no return when its handler has
//! consumed the body: read it to its end, or dropped it because the route
//! takes none. A task is handed to the outbox only after that (intake needs
//! the whole body), so when the request timeout fires on such a request
//! the handler is left to finish and its answer is sent: a task is never
//! made durable behind a 408, and its 202 is never replaced by one. The
//! handlers past that point are bounded on their own (intake is CPU only,
//! the outbox's group commit answers or fails the store, admin operations
//! are single sled scans, `POST /v1/verify-workers` waits at most its own
//! `timeout_seconds`, 300 at most, which may exceed the request timeout
//! on purpose). Before that point nothing was written, so the
//! 408 is the whole truth. The idle and stall bounds never apply while a
//! handler runs.

use super::problem::Problem;
use crate::config::HttpSettings;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Connections past the cap being answered 503 at one time.
pub const MAX_REFUSING: usize = 64;
/// Open files kept for everything but client connections (sled's files,
/// the broker, the database pool, refused connections).
pub const FILE_RESERVE: u64 = 256;
/// How long a refused connection may take to send its request header, and
/// then to receive its 503.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Open client connections (a gauge).
pub const OPEN_CONNECTIONS_METRIC: &str = "taskgate_http_open_connections";
/// Connections answered 503 (or closed) because `http.max_connections` were open.
pub const REFUSED_CONNECTIONS_METRIC: &str = "taskgate_http_connections_refused_total";
/// Connections closed and requests answered 408 by a timeout, by `kind`.
pub const TIMEOUTS_METRIC: &str = "taskgate_http_timeouts_total";

/// The bounds of the module docs, from `[http]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    pub fn from_settings(http: &HttpSettings) -> Self {
        Self {
            header_read_timeout: Duration::from_millis(http.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(http.idle_timeout_ms),
            request_timeout: Duration::from_millis(http.request_timeout_ms),
            max_connections: http.max_connections.max(1),
        }
    }
}

struct Shared {
    router: Router,
    limits: Limits,
    /// The whole answer to a connection past the cap.
    refusal: Vec<u8>,
}

/// Serves `router` on `listener` until `stop` resolves; then stops
/// accepting, lets every connection finish the request it is in (idle ones
/// close at once) and returns when all are closed. Dropping the returned
/// future closes whatever is still open.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    raise_file_limit(limits.max_connections);
    let shared = Arc::new(Shared {
        router,
        limits,
        refusal: refusal_bytes(limits.max_connections),
    });
    let mut gate = Gate {
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
        closing: CancellationToken::new(),
        shared,
        last_warning: None,
    };
    // Owns every connection task: dropped, it aborts them.
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            biased;
            () = &mut stop => break,
            Some(joined) = connections.join_next() => reap(joined),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => gate.admit(&mut connections, stream, peer),
                Err(error) => accept_failed(error).await,
            },
        }
    }
    drop(listener);
    gate.closing.cancel();
    while let Some(joined) = connections.join_next().await {
        reap(joined);
    }
    Ok(())
}

/// Who gets a connection slot, and the answer for those who do not.
struct Gate {
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    /// Cancelled when the server stops: connections finish and close.
    closing: CancellationToken,
    /// Refusals are logged at most once a second: a flood must not become
    /// a flood of log lines too.
    last_warning: Option<Instant>,
}

impl Gate {
    /// Never waits: the connection gets a task of its own either way.
    fn admit(&mut self, connections: &mut JoinSet<()>, stream: TcpStream, peer: SocketAddr) {
        // Answers are written whole; nothing is gained by delaying them.
        let _ = stream.set_nodelay(true);
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            connections.spawn(connection(
                stream,
                peer,
                self.shared.clone(),
                self.closing.clone(),
                slot,
            ));
            return;
        }
        metrics::counter!(REFUSED_CONNECTIONS_METRIC).increment(1);
        if self
            .last_warning
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            self.last_warning = Some(Instant::now());
            tracing::warn!(
                %peer,
                max = self.shared.limits.max_connections,
                "connection refused: http.max_connections are open"
            );
        }
        match self.refusing.clone().try_acquire_owned() {
            Ok(permit) => {
                connections.spawn(refuse(stream, self.shared.clone(), permit));
            }
            Err(_) => drop(stream),
        }
    }
}

fn reap(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined {
        if error.is_panic() {
            tracing::error!(%error, "an HTTP connection task panicked");
        }
    }
}

async fn accept_failed(error: io::Error) {
    use io::ErrorKind::*;
    // The peer gave up between SYN and accept: nothing to do.
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    ) {
        return;
    }
    // Out of file descriptors, most likely: spinning would not free any.
    tracing::warn!(%error, "accepting a connection failed; retrying in 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Raises the soft `RLIMIT_NOFILE` towards `max_connections` +
/// [`FILE_RESERVE`] (never above the hard limit), so the connection cap,
/// not the process's file table, is what refuses clients.
fn raise_file_limit(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let wanted = max_connections as u64 + FILE_RESERVE;
    let limit = getrlimit(Resource::Nofile);
    let Some(current) = limit.current else {
        return; // unlimited
    };
    if current >= wanted {
        return;
    }
    let target = limit.maximum.map_or(wanted, |maximum| maximum.min(wanted));
    if target > current {
        if let Err(error) = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: limit.maximum,
            },
        ) {
            tracing::warn!(%error, "could not raise the open-file limit");
        }
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    if now < wanted {
        tracing::warn!(
            open_file_limit = now,
            max_connections,
            "the open-file limit is below http.max_connections plus {FILE_RESERVE}: a full house of clients \
             could leave none for the outbox, the broker and the database (raise LimitNOFILE or lower \
             http.max_connections)"
        );
    }
}

fn refusal_bytes(max_connections: usize) -> Vec<u8> {
    let problem = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too-many-connections",
        "Too many connections",
        format!("this gateway already serves {max_connections} connections (http.max_connections); retry shortly"),
    );
    let body = serde_json::to_vec(problem.details()).unwrap_or_default();
    let mut answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    answer
}

/// The 503 of a connection past the cap. It is written once the request
/// header is in (or after [`REFUSAL_LINGER`] without one): HTTP clients
/// treat an answer that arrives before they sent their request as a broken
/// connection, not as an answer.
async fn refuse(mut stream: TcpStream, shared: Arc<Shared>, _permit: OwnedSemaphorePermit) {
    let mut received = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let header = async {
        while !received.windows(4).any(|window| window == b"\r\n\r\n") && received.len() < 16 * 1024 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(read) => received.extend_from_slice(&chunk[..read]),
            }
        }
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, header).await;
    let answer = async {
        stream.write_all(&shared.refusal).await?;
        stream.shutdown().await?;
        // Closing a socket with unread input resets the connection, and a
        // reset can destroy the answer before the client read it: read (and
        // drop) what the client still sends until it closes too.
        let mut drained = 0usize;
        while drained < 64 * 1024 {
            match stream.read(&mut chunk).await? {
                0 => break,
                read => drained += read,
            }
        }
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, answer).await;
}

/// Decrements the open-connections gauge however the task ends.
struct Counted;

impl Counted {
    fn new() -> Self {
        metrics::gauge!(OPEN_CONNECTIONS_METRIC).increment(1.0);
        Self
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        metrics::gauge!(OPEN_CONNECTIONS_METRIC).decrement(1.0);
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    closing: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let _counted = Counted::new();
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Metered {
        stream,
        activity: activity.clone(),
    });
    let service = {
        let shared = shared.clone();
        let activity = activity.clone();
        hyper::service::service_fn(move |request| respond(shared.clone(), activity.clone(), peer, request))
    };
    let connection = http1::Builder::new()
        // See the module docs: Activity does this, phase by phase.
        .header_read_timeout(Option::<Duration>::None)
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            finished = connection.as_mut() => {
                if let Err(error) = finished {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                return;
            }
            expired = activity.expired(&shared.limits) => {
                metrics::counter!(TIMEOUTS_METRIC, "kind" => expired.kind()).increment(1);
                tracing::debug!(%peer, kind = expired.kind(), "closing a connection that timed out");
                return;
            }
            () = closing.cancelled(), if !draining => {
                // Idle: closes now; busy: after the response in progress.
                connection.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

/// One request: the router under the request timeout, with the peer's
/// address for the admin API's loopback rule.
async fn respond(
    shared: Arc<Shared>,
    activity: Arc<Activity>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let handling = activity.enter(Phase::Handler);
    let changes_state = !request.method().is_safe();
    let consumed = Arc::new(AtomicBool::new(false));
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(ConnectInfo(peer));
    let body = RequestBody {
        inner: body,
        consumed: changes_state.then(|| consumed.clone()),
    };
    let handler = shared
        .router
        .clone()
        .oneshot(Request::from_parts(parts, Body::new(body)));
    tokio::pin!(handler);
    let limit = shared.limits.request_timeout;
    let answered = match tokio::time::timeout(limit, handler.as_mut()).await {
        Ok(answered) => answered,
        // Past the point of no return (module docs): the answer must be
        // the handler's own, however long it takes.
        Err(_) if consumed.load(Ordering::Acquire) => handler.await,
        Err(_) => Ok(timed_out(limit)),
    };
    let response = match answered {
        Ok(response) => response,
        Err(never) => match never {},
    };
    // Entered before `handling` ends, so the connection never looks idle
    // between the two phases.
    let streaming = activity.enter(Phase::Body);
    drop(handling);
    Ok(response.map(|inner| ResponseBody {
        inner,
        _streaming: streaming,
    }))
}

fn timed_out(limit: Duration) -> Response<Body> {
    metrics::counter!(TIMEOUTS_METRIC, "kind" => "request").increment(1);
    let mut response = Problem::new(
        StatusCode::REQUEST_TIMEOUT,
        "request-timeout",
        "Request timeout",
        format!(
            "the request was not received and answered within {} ms (http.request_timeout_ms); nothing was \
             changed",
            limit.as_millis()
        ),
    )
    .into_response();
    // The rest of the body may still be on its way: this connection cannot
    // carry another request.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The request body as the handler sees it; for a state-changing request
/// it marks the point of no return when read to its end or dropped.
struct RequestBody {
    inner: Incoming,
    consumed: Option<Arc<AtomicBool>>,
}

impl RequestBody {
    fn mark_consumed(&self) {
        if let Some(consumed) = &self.consumed {
            consumed.store(true, Ordering::Release);
        }
    }
}

impl hyper::body::Body for RequestBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            this.mark_consumed();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.mark_consumed();
    }
}

/// The response body, holding the connection in its body phase until hyper
/// has written it (or given up on it).
struct ResponseBody {
    inner: Body,
    _streaming: PhaseGuard,
}

impl hyper::body::Body for ResponseBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a connection was closed by its watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    Header,
    Idle,
    Stalled,
}

impl Expired {
    fn kind(self) -> &'static str {
        match self {
            Expired::Header => "header",
            Expired::Idle => "idle",
            Expired::Stalled => "stalled",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// From a complete request header until the handler answered.
    Handler,
    /// From the answer until hyper dropped its body (written, or the
    /// connection failed).
    Body,
}

/// What one connection is doing, kept by its IO and its requests, read by
/// its watchdog ([`Activity::expired`]). All of it lives on the
/// connection's task; atomics only make it shareable.
struct Activity {
    born: Instant,
    /// Milliseconds since `born`, plus one, when the first byte of a
    /// request header arrived on an idle connection; 0 while none did.
    head_since: AtomicU64,
    /// Milliseconds since `born` when the last response was written.
    idle_since: AtomicU64,
    /// Milliseconds since `born` of the last byte read or written.
    progress_at: AtomicU64,
    handlers: AtomicUsize,
    bodies: AtomicUsize,
    served: AtomicBool,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            born: Instant::now(),
            head_since: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            progress_at: AtomicU64::new(0),
            handlers: AtomicUsize::new(0),
            bodies: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn busy(&self) -> bool {
        self.handlers.load(Ordering::Relaxed) > 0 || self.bodies.load(Ordering::Relaxed) > 0
    }

    fn read_progress(&self) {
        let now = self.now();
        self.progress_at.store(now, Ordering::Relaxed);
        // Bytes read while a request is in progress are its body (or a
        // pipelined request, which then gets the idle bound instead).
        if !self.busy() && self.head_since.load(Ordering::Relaxed) == 0 {
            self.head_since.store(now + 1, Ordering::Relaxed);
            self.changed.notify_one();
        }
    }

    fn write_progress(&self) {
        self.progress_at.store(self.now(), Ordering::Relaxed);
    }

    fn enter(self: &Arc<Self>, phase: Phase) -> PhaseGuard {
        match phase {
            Phase::Handler => {
                self.handlers.fetch_add(1, Ordering::Relaxed);
                self.head_since.store(0, Ordering::Relaxed);
                self.served.store(true, Ordering::Relaxed);
            }
            Phase::Body => {
                self.bodies.fetch_add(1, Ordering::Relaxed);
                // The stall bound counts from the answer, not from the
                // request's last byte.
                self.write_progress();
            }
        }
        self.changed.notify_one();
        PhaseGuard {
            activity: self.clone(),
            phase,
        }
    }

    /// When the connection must be closed unless something happens first,
    /// and why; `None` while a handler runs (the request timeout's domain).
    fn deadline(&self, limits: &Limits) -> Option<(u64, Expired)> {
        let millis = |duration: Duration| duration.as_millis() as u64;
        if self.handlers.load(Ordering::Relaxed) > 0 {
            return None;
        }
        if self.bodies.load(Ordering::Relaxed) > 0 {
            let progress = self.progress_at.load(Ordering::Relaxed);
            return Some((progress + millis(limits.idle_timeout), Expired::Stalled));
        }
        if !self.served.load(Ordering::Relaxed) {
            // The first header counts from the accept, not its first byte:
            // a byte every few seconds must not hold a connection open.
            return Some((millis(limits.header_read_timeout), Expired::Header));
        }
        match self.head_since.load(Ordering::Relaxed) {
            0 => {
                let idle = self.idle_since.load(Ordering::Relaxed);
                Some((idle + millis(limits.idle_timeout), Expired::Idle))
            }
            since => Some((since - 1 + millis(limits.header_read_timeout), Expired::Header)),
        }
    }

    /// Resolves when the connection's current bound has passed.
    async fn expired(&self, limits: &Limits) -> Expired {
        loop {
            // Registered before the state is read, so no change is missed.
            let changed = self.changed.notified();
            match self.deadline(limits) {
                None => changed.await,
                Some((at, why)) => {
                    let now = self.now();
                    if now >= at {
                        return why;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(at - now)) => {}
                        () = changed => {}
                    }
                }
            }
        }
    }
}

struct PhaseGuard {
    activity: Arc<Activity>,
    phase: Phase,
}

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        let activity = &self.activity;
        match self.phase {
            Phase::Handler => activity.handlers.fetch_sub(1, Ordering::Relaxed),
            Phase::Body => activity.bodies.fetch_sub(1, Ordering::Relaxed),
        };
        if !activity.busy() {
            activity.idle_since.store(activity.now(), Ordering::Relaxed);
        }
        activity.changed.notify_one();
    }
}

/// The client's socket, reporting progress to the connection's
/// [`Activity`].
struct Metered {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Metered {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read_progress();
        }
        polled
    }
}

impl AsyncWrite for Metered {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            this.activity.write_progress();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, buffers);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            this.activity.write_progress();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_millis(1_000),
            idle_timeout: Duration::from_millis(5_000),
            request_timeout: Duration::from_millis(30_000),
            max_connections: 4,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_phase_has_its_bound() {
        let limits = limits();
        let activity = Arc::new(Activity::new());
        // A new connection: the header bound from the accept, bytes or not.
        assert_eq!(activity.deadline(&limits), Some((1_000, Expired::Header)));
        tokio::time::advance(Duration::from_millis(400)).await;
        activity.read_progress();
        assert_eq!(activity.deadline(&limits), Some((1_000, Expired::Header)));
        // A handler runs: no bound here (the request timeout has it).
        let handler = activity.enter(Phase::Handler);
        assert_eq!(activity.deadline(&limits), None);
        tokio::time::advance(Duration::from_millis(10_000)).await;
        assert_eq!(activity.deadline(&limits), None);
        // The answer is being written: the stall bound counts from now.
        let body = activity.enter(Phase::Body);
        drop(handler);
        assert_eq!(activity.deadline(&limits), Some((15_400, Expired::Stalled)));
        tokio::time::advance(Duration::from_millis(100)).await;
        activity.write_progress();
        assert_eq!(activity.deadline(&limits), Some((15_500, Expired::Stalled)));
        drop(body);
        // Idle keep-alive: the idle bound, until a byte of the next header.
        assert_eq!(activity.deadline(&limits), Some((15_500, Expired::Idle)));
        tokio::time::advance(Duration::from_millis(2_000)).await;
        activity.read_progress();
        assert_eq!(activity.deadline(&limits), Some((13_500, Expired::Header)));
        let _next = activity.enter(Phase::Handler);
        assert_eq!(activity.deadline(&limits), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_wakes_for_a_shorter_bound() {
        let limits = limits();
        let activity = Arc::new(Activity::new());
        drop(activity.enter(Phase::Handler));
        // Idle, so the watchdog sleeps towards the 5 s idle bound; the first
        // byte of a header must bring the 1 s header bound forward.
        let watchdog = tokio::spawn({
            let activity = activity.clone();
            async move {
                let expired = activity.expired(&limits).await;
                (expired, activity.now())
            }
        });
        tokio::time::advance(Duration::from_millis(100)).await;
        activity.read_progress();
        let (expired, at) = watchdog.await.unwrap();
        assert_eq!(expired, Expired::Header);
        assert!((1_100..1_200).contains(&at), "closed at {at} ms");
    }

    #[test]
    fn the_refusal_is_a_complete_problem_answer() {
        let answer = String::from_utf8(refusal_bytes(7)).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains("\r\nconnection: close"));
        assert!(head.contains("\r\ncontent-type: application/problem+json"));
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["status"], 503);
        assert!(problem["detail"].as_str().unwrap().contains("7 connections"));
    }
}
