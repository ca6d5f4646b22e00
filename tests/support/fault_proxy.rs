//! Owns the TCP fault-injection proxy used by integration tests to simulate a
//! broker that refuses, drops, blackholes or slows down connections, or one
//! that accepts AMQP connections but never takes a message.
//!
//! ```ignore
//! let proxy = FaultProxy::start(rabbitmq_addr)?;      // listens on 127.0.0.1:0
//! let url = format!("amqp://guest:guest@{}/%2f", proxy.addr());
//! proxy.set_mode(FaultMode::Blackhole);                // broker "hangs"
//! proxy.set_mode(FaultMode::Pass);                     // broker is back
//! ```
//!
//! The proxy runs on its own thread with its own tokio runtime, so it works the
//! same from `#[tokio::test]` (current-thread or multi-thread) and from plain
//! `#[test]` functions, and [`FaultProxy::set_mode`] can be synchronous: when it
//! returns, the mode is in force (in `Refuse` the listener is closed; leaving
//! `Refuse` it listens again on the same port). Connections that must die are
//! reset (RST) by the proxy thread right after the switch.
//!
//! Mode semantics, for new and for existing connections:
//!
//! | mode | new connections | existing connections |
//! |---|---|---|
//! | `Pass` | forwarded to the upstream | forwarded |
//! | `Refuse` | `connect` fails with `ECONNREFUSED` (no listener) | reset |
//! | `Drop` | accepted, then reset at once | reset |
//! | `Blackhole` | accepted, nothing forwarded or answered | frozen: nothing forwarded either way |
//! | `Slow(d)` | forwarded, each chunk delayed by `d` | same |
//! | `FreezeOnPublish` | forwarded until the client's first AMQP `basic.publish`, then frozen both ways | frozen at once if they published before, else as new ones |
//!
//! Leaving `Blackhole` for `Pass`/`Slow` resumes frozen connections (like a
//! healed network partition), and connections accepted during the blackhole are
//! connected to the upstream then; leaving `FreezeOnPublish` resumes its frozen
//! connections the same way (the held publish is forwarded then). Dropping the
//! [`FaultProxy`] stops the thread and closes every socket it holds.
//!
//! `FreezeOnPublish` is the one mode that reads the bytes: a timer cannot tell
//! the handshake, declares and `confirm.select` from a publish sent a
//! millisecond after them, and a broker that "accepts connections but not
//! messages" must let every reconnect succeed and still never confirm
//! anything. Frozen connections stay open (no FIN, no RST), so only the
//! client's own timeouts (publish confirm, heartbeat) notice.
//! [`FaultProxy::accepted_connections`] counts the connections accepted, so a
//! test can tell how often its client reconnected.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};

/// How long `set_mode` waits for the proxy thread to apply a mode.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the proxy retries to listen again on its port when leaving `Refuse`.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout for the proxy's own connection to the upstream.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CHUNK_SIZE: usize = 16 * 1024;

/// The fault the proxy injects; see the module docs for the exact semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// Forward everything unchanged.
    Pass,
    /// No listener: new connections are refused; existing ones are reset.
    Refuse,
    /// Reset all open connections, and new ones right after accept.
    Drop,
    /// Accept TCP but never forward or answer; freeze existing connections.
    Blackhole,
    /// Delay each forwarded chunk (both directions) by the given duration.
    Slow(Duration),
    /// Forward each connection until its client sends an AMQP `basic.publish`,
    /// then forward nothing either way (the publish is held): the handshake,
    /// declares and `confirm.select` of every reconnect succeed, no message
    /// is ever confirmed.
    FreezeOnPublish,
}

impl FaultMode {
    fn kills_connections(self) -> bool {
        matches!(self, FaultMode::Refuse | FaultMode::Drop)
    }

    /// Whether a connection holds its bytes now; `published` says whether its
    /// client has sent a `basic.publish` yet.
    fn freezes(self, published: bool) -> bool {
        match self {
            FaultMode::Blackhole => true,
            FaultMode::FreezeOnPublish => published,
            _ => false,
        }
    }
}

enum Command {
    SetMode {
        mode: FaultMode,
        applied: std_mpsc::Sender<io::Result<()>>,
    },
}

/// A TCP proxy on `127.0.0.1:<random port>` in front of one upstream address.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    commands: Option<mpsc::UnboundedSender<Command>>,
    thread: Option<JoinHandle<()>>,
    accepted: Arc<AtomicU64>,
}

impl FaultProxy {
    /// Starts a proxy in `Pass` mode listening on `127.0.0.1:0`.
    pub fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let (started_tx, started_rx) = std_mpsc::channel::<io::Result<SocketAddr>>();
        let accepted = Arc::new(AtomicU64::new(0));
        let counted = accepted.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{upstream}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = started_tx.send(Err(err));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let bound = listen(SocketAddr::from(([127, 0, 0, 1], 0)))
                        .and_then(|listener| Ok((listener.local_addr()?, listener)));
                    match bound {
                        Ok((addr, listener)) => {
                            let _ = started_tx.send(Ok(addr));
                            supervise(listener, addr, upstream, commands_rx, counted).await;
                        }
                        Err(err) => {
                            let _ = started_tx.send(Err(err));
                        }
                    }
                });
                // Dropping the runtime here cancels every connection task and
                // closes every socket the proxy holds.
            })?;
        let addr = match started_rx.recv() {
            Ok(result) => result?,
            Err(_) => return Err(io::Error::other("fault proxy thread died during start")),
        };
        Ok(FaultProxy {
            addr,
            upstream,
            commands: Some(commands_tx),
            thread: Some(thread),
            accepted,
        })
    }

    /// Connections accepted since start, in every mode (also those `Drop`
    /// resets at once); `Refuse` accepts none.
    pub fn accepted_connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The address clients connect to (stable across mode changes).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Switches the fault mode. Returns once the mode is in force: in `Refuse`
    /// the port refuses connections, and after leaving it the port accepts
    /// again. Panics if the proxy cannot apply the mode (e.g. its port was
    /// taken by someone else while it was closed).
    pub fn set_mode(&self, mode: FaultMode) {
        let (applied_tx, applied_rx) = std_mpsc::channel();
        let commands = self.commands.as_ref().expect("fault proxy is running");
        commands
            .send(Command::SetMode {
                mode,
                applied: applied_tx,
            })
            .expect("fault proxy thread is gone");
        match applied_rx.recv_timeout(APPLY_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(err)) => panic!("fault proxy {} could not switch to {mode:?}: {err}", self.addr),
            Err(err) => panic!("fault proxy {} did not apply {mode:?}: {err}", self.addr),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Closing the command channel ends the supervisor; the thread then drops
        // its runtime, which closes every socket.
        self.commands.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Listens again on the proxy's own port, retrying briefly in case the
/// kernel has not released it yet.
async fn relisten(addr: SocketAddr) -> io::Result<TcpListener> {
    let deadline = tokio::time::Instant::now() + REBIND_TIMEOUT;
    loop {
        match listen(addr) {
            Ok(listener) => return Ok(listener),
            Err(err) if tokio::time::Instant::now() >= deadline => return Err(err),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn accept_on(listener: Option<&TcpListener>) -> io::Result<TcpStream> {
    match listener {
        Some(listener) => listener.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// What every connection task watches: the mode, and a counter that goes up
/// each time a mode kills connections (so a quick `Drop` then `Pass` still
/// kills every connection that was open at the `Drop`).
#[derive(Debug, Clone, Copy)]
struct ProxyState {
    mode: FaultMode,
    kill_epoch: u64,
}

/// Owns the listener and the current mode; runs until the `FaultProxy` is dropped.
async fn supervise(
    listener: TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    mut commands: mpsc::UnboundedReceiver<Command>,
    accepted_count: Arc<AtomicU64>,
) {
    let (state_tx, _) = watch::channel(ProxyState {
        mode: FaultMode::Pass,
        kill_epoch: 0,
    });
    let mut listener = Some(listener);
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(Command::SetMode { mode, applied }) = command else {
                    return;
                };
                state_tx.send_modify(|state| {
                    state.mode = mode;
                    if mode.kills_connections() {
                        state.kill_epoch += 1;
                    }
                });
                let result = if mode == FaultMode::Refuse {
                    listener = None;
                    Ok(())
                } else if listener.is_none() {
                    relisten(addr).await.map(|reopened| listener = Some(reopened))
                } else {
                    Ok(())
                };
                let _ = applied.send(result);
            }
            accepted = accept_on(listener.as_ref()) => {
                let Ok(client) = accepted else { continue };
                accepted_count.fetch_add(1, Ordering::SeqCst);
                let _ = client.set_nodelay(true);
                let state = *state_tx.borrow();
                if state.mode.kills_connections() {
                    reset(client);
                    continue;
                }
                tokio::spawn(run_connection(client, upstream, state_tx.subscribe(), state.kill_epoch));
            }
        }
    }
}

/// Closes the socket with an RST instead of a FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Resolves once a mode killed the connections born in `born_epoch`.
async fn wait_for_kill(mut state: watch::Receiver<ProxyState>, born_epoch: u64) {
    if state.wait_for(|state| state.kill_epoch != born_epoch).await.is_err() {
        // The proxy is shutting down; dropping the runtime ends this task.
        std::future::pending::<()>().await;
    }
}

/// One client connection: waits out a blackhole, connects to the upstream,
/// and forwards both ways until either side closes or a mode kills it.
async fn run_connection(client: TcpStream, upstream: SocketAddr, state: watch::Receiver<ProxyState>, born_epoch: u64) {
    let mut blackhole_watch = state.clone();
    let connect = async move {
        // A connection accepted during a blackhole is held, unanswered.
        blackhole_watch
            .wait_for(|state| state.mode != FaultMode::Blackhole)
            .await
            .ok()?;
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream)).await {
            Ok(Ok(stream)) => Some(stream),
            _ => None,
        }
    };
    let connected = tokio::select! {
        connected = connect => connected,
        () = wait_for_kill(state.clone(), born_epoch) => None,
    };
    let Some(server) = connected else {
        reset(client);
        return;
    };
    let _ = server.set_nodelay(true);
    forward(client, server, state, born_epoch).await;
}

async fn forward(mut client: TcpStream, mut server: TcpStream, state: watch::Receiver<ProxyState>, born_epoch: u64) {
    // Set once the client sent a `basic.publish`; read by both directions, so
    // `FreezeOnPublish` freezes the broker's answers too.
    let published = AtomicBool::new(false);
    let outcome = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        // Only the client's bytes are scanned: it is the one that publishes.
        let to_server = pump(
            client_read,
            server_write,
            state.clone(),
            born_epoch,
            Some(PublishScanner::default()),
            &published,
        );
        let to_client = pump(server_read, client_write, state.clone(), born_epoch, None, &published);
        tokio::select! {
            (a, b) = async { tokio::join!(to_server, to_client) } => {
                if a.is_ok() && b.is_ok() { Outcome::Closed } else { Outcome::Failed }
            }
            () = wait_for_kill(state, born_epoch) => Outcome::Killed,
        }
    };
    match outcome {
        Outcome::Closed => {}
        Outcome::Failed | Outcome::Killed => {
            reset(client);
            reset(server);
        }
    }
}

enum Outcome {
    Closed,
    Failed,
    Killed,
}

/// Copies one direction chunk by chunk, applying the mode to each chunk.
/// On EOF it half-closes the writer, so protocol-level shutdowns pass through.
/// With a `scanner`, every chunk is scanned (in every mode, so frame
/// boundaries are known when `FreezeOnPublish` is switched on later) and
/// `published` is set at the first `basic.publish`.
async fn pump<R, W>(
    mut reader: R,
    mut writer: W,
    mut state: watch::Receiver<ProxyState>,
    born_epoch: u64,
    mut scanner: Option<PublishScanner>,
    published: &AtomicBool,
) -> io::Result<()>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            let _ = writer.shutdown().await;
            return Ok(());
        }
        if scanner.as_mut().is_some_and(|scanner| scanner.feed(&buf[..n])) {
            // Before the chunk is forwarded: the publish in it is held too.
            published.store(true, Ordering::SeqCst);
        }
        // Hold the chunk while frozen; never forward it once a mode killed
        // this connection (the kill branch in `forward` resets it).
        let frozen = |state: &ProxyState| state.mode.freezes(published.load(Ordering::SeqCst));
        let current = match state.wait_for(|state| !frozen(state)).await {
            Ok(current) => *current,
            Err(_) => return Ok(()),
        };
        if current.kill_epoch != born_epoch {
            std::future::pending::<()>().await;
        }
        if let FaultMode::Slow(delay) = current.mode {
            tokio::time::sleep(delay).await;
        }
        writer.write_all(&buf[..n]).await?;
    }
}

/// AMQP 0-9-1 `basic.publish`: class 60, method 40.
const BASIC_PUBLISH: [u8; 4] = [0, 60, 0, 40];
/// What an AMQP 0-9-1 client sends first.
const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// Frame type, channel and payload size.
const FRAME_HEADER_LEN: usize = 7;
const METHOD_FRAME: u8 = 1;

/// Follows the frames a client sends, across chunk boundaries, far enough to
/// see the first `basic.publish`. A stream that does not start with the AMQP
/// 0-9-1 header (the proxy's self-tests echo plain bytes) is never matched.
#[derive(Default)]
struct PublishScanner {
    /// Protocol header bytes matched so far.
    header_seen: usize,
    /// The current frame's header and, for a method frame, its class and
    /// method ids, as far as they arrived.
    frame_start: Vec<u8>,
    /// Bytes of the current frame still to pass over (payload and frame end).
    skip: usize,
    /// Not AMQP 0-9-1, or a frame that makes no sense: stop looking.
    given_up: bool,
    published: bool,
}

impl PublishScanner {
    /// Scans the next bytes of the stream; true once a `basic.publish` was seen.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() && !self.published && !self.given_up {
            if self.header_seen < PROTOCOL_HEADER.len() {
                if bytes[0] != PROTOCOL_HEADER[self.header_seen] {
                    self.given_up = true;
                }
                self.header_seen += 1;
                bytes = &bytes[1..];
            } else if self.skip > 0 {
                let passed = self.skip.min(bytes.len());
                self.skip -= passed;
                bytes = &bytes[passed..];
            } else {
                self.frame_start.push(bytes[0]);
                bytes = &bytes[1..];
                self.frame_started();
            }
        }
        self.published
    }

    /// After one more byte of a frame's start: decides once enough of it
    /// arrived whether it is the publish, and how much of it to pass over.
    fn frame_started(&mut self) {
        let start = &self.frame_start;
        if start.len() < FRAME_HEADER_LEN {
            return;
        }
        let size = u32::from_be_bytes([start[3], start[4], start[5], start[6]]) as usize;
        let ids = BASIC_PUBLISH.len();
        if start[0] == METHOD_FRAME {
            if size < ids {
                self.given_up = true;
                return;
            }
            if start.len() < FRAME_HEADER_LEN + ids {
                return;
            }
            self.published = start[FRAME_HEADER_LEN..] == BASIC_PUBLISH;
            // The rest of the payload and the frame-end octet.
            self.skip = size - ids + 1;
        } else {
            self.skip = size + 1;
        }
        self.frame_start.clear();
    }
}
