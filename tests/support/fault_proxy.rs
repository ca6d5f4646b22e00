//! Owns the TCP fault-injection proxy used by integration tests to simulate a
//! broker that refuses, drops, blackholes or slows down connections.
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
//!
//! Leaving `Blackhole` for `Pass`/`Slow` resumes frozen connections (like a
//! healed network partition), and connections accepted during the blackhole are
//! connected to the upstream then. Dropping the [`FaultProxy`] stops the thread
//! and closes every socket it holds.

use std::io;
use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
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
}

impl FaultMode {
    fn kills_connections(self) -> bool {
        matches!(self, FaultMode::Refuse | FaultMode::Drop)
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
}

impl FaultProxy {
    /// Starts a proxy in `Pass` mode listening on `127.0.0.1:0`.
    pub fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let (started_tx, started_rx) = std_mpsc::channel::<io::Result<SocketAddr>>();
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
                            supervise(listener, addr, upstream, commands_rx).await;
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
        })
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
    let outcome = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let to_server = pump(client_read, server_write, state.clone(), born_epoch);
        let to_client = pump(server_read, client_write, state.clone(), born_epoch);
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
async fn pump<R, W>(
    mut reader: R,
    mut writer: W,
    mut state: watch::Receiver<ProxyState>,
    born_epoch: u64,
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
        // Hold the chunk while blackholed; never forward it once a mode killed
        // this connection (the kill branch in `forward` resets it).
        let current = match state.wait_for(|state| state.mode != FaultMode::Blackhole).await {
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
