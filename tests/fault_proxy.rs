//! Self-tests of the test-support fault proxy (`tests/support/fault_proxy.rs`):
//! each fault mode is checked against a tiny echo server on loopback.

mod support;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::fault_proxy::{FaultMode, FaultProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// Starts an echo server on 127.0.0.1:0 that lives as long as the test runtime.
async fn start_echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    addr
}

async fn connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect failed")
}

/// Sends `message` and reads exactly as many bytes back.
async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(message).await?;
    let mut reply = vec![0u8; message.len()];
    stream.read_exact(&mut reply).await?;
    Ok(reply)
}

async fn assert_echoes(stream: &mut TcpStream, message: &[u8]) {
    let reply = tokio::time::timeout(IO_TIMEOUT, round_trip(stream, message))
        .await
        .expect("echo timed out")
        .expect("echo failed");
    assert_eq!(reply, message);
}

/// Asserts the peer closed the connection: EOF or a reset, not data or a hang.
async fn assert_closed(stream: &mut TcpStream) {
    let _ = stream.write_all(b"anyone there?").await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(IO_TIMEOUT, stream.read(&mut buf))
        .await
        .expect("connection was not closed");
    match read {
        Ok(0) => {}
        Ok(n) => panic!("expected EOF or reset, got {n} bytes"),
        Err(err) => assert!(is_reset(err.kind()), "expected EOF or reset, got {err}"),
    }
}

fn is_reset(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

/// Asserts a new connection is accepted by TCP and then closed at once. The
/// reset may already show in `connect` itself when it lands before the
/// connecting task looks at the socket.
async fn assert_accepted_then_closed(addr: SocketAddr) {
    match tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
    {
        Ok(mut stream) => assert_closed(&mut stream).await,
        Err(err) => assert!(is_reset(err.kind()), "expected accept then reset, got {err}"),
    }
}

/// Asserts nothing comes back within `window` (the connection stays open).
async fn assert_silent(stream: &mut TcpStream, message: &[u8], window: Duration) {
    stream.write_all(message).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(window, stream.read(&mut buf)).await;
    assert!(read.is_err(), "expected silence, got {read:?}");
}

#[tokio::test]
async fn pass_forwards_both_ways() {
    let proxy = FaultProxy::start(start_echo_server().await).unwrap();
    assert!(proxy.addr().ip().is_loopback());
    let mut stream = connect(proxy.addr()).await;
    assert_echoes(&mut stream, b"hello").await;
    let big = vec![7u8; 256 * 1024];
    assert_echoes(&mut stream, &big).await;
}

#[tokio::test]
async fn pass_forwards_a_half_close() {
    let proxy = FaultProxy::start(start_echo_server().await).unwrap();
    let mut stream = connect(proxy.addr()).await;
    stream.write_all(b"last words").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(IO_TIMEOUT, stream.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"last words");
}

#[tokio::test]
async fn refuse_refuses_new_and_kills_existing_connections_then_pass_reopens_same_port() {
    let proxy = FaultProxy::start(start_echo_server().await).unwrap();
    let addr = proxy.addr();
    let mut existing = connect(addr).await;
    assert_echoes(&mut existing, b"before").await;

    proxy.set_mode(FaultMode::Refuse);
    let err = TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    assert_closed(&mut existing).await;

    proxy.set_mode(FaultMode::Pass);
    assert_eq!(proxy.addr(), addr);
    let mut stream = connect(addr).await;
    assert_echoes(&mut stream, b"after").await;
}

#[tokio::test]
async fn drop_resets_existing_and_new_connections() {
    let proxy = FaultProxy::start(start_echo_server().await).unwrap();
    let mut existing = connect(proxy.addr()).await;
    assert_echoes(&mut existing, b"before").await;

    proxy.set_mode(FaultMode::Drop);
    assert_closed(&mut existing).await;
    // New connections are accepted by TCP, then reset at once.
    assert_accepted_then_closed(proxy.addr()).await;

    proxy.set_mode(FaultMode::Pass);
    let mut stream = connect(proxy.addr()).await;
    assert_echoes(&mut stream, b"after").await;
}

#[tokio::test]
async fn a_quick_drop_then_pass_still_kills_open_connections() {
    let proxy = FaultProxy::start(start_echo_server().await).unwrap();
    let mut existing = connect(proxy.addr()).await;
    assert_echoes(&mut existing, b"before").await;
    proxy.set_mode(FaultMode::Drop);
    proxy.set_mode(FaultMode::Pass);
    assert_closed(&mut existing).await;
}

#[tokio::test]
async fn blackhole_accepts_but_never_answers_and_freezes_existing_connections() {
    let proxy = FaultProxy::start(start_echo_server().await).unwrap();
    let mut existing = connect(proxy.addr()).await;
    assert_echoes(&mut existing, b"before").await;

    proxy.set_mode(FaultMode::Blackhole);
    // TCP connect succeeds (the proxy accepts), but nothing ever comes back.
    let mut fresh = connect(proxy.addr()).await;
    assert_silent(&mut fresh, b"ping", Duration::from_millis(300)).await;
    assert_silent(&mut existing, b"ping", Duration::from_millis(300)).await;

    proxy.set_mode(FaultMode::Pass);
    let mut stream = connect(proxy.addr()).await;
    assert_echoes(&mut stream, b"after").await;
}

#[tokio::test]
async fn blackhole_blocks_a_client_waiting_for_a_greeting() {
    // Like an AMQP client waiting for connection.start: the read hangs.
    let proxy = FaultProxy::start(start_echo_server().await).unwrap();
    proxy.set_mode(FaultMode::Blackhole);
    let mut stream = connect(proxy.addr()).await;
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await;
    assert!(read.is_err(), "expected a hang, got {read:?}");
}

#[tokio::test]
async fn slow_delays_each_chunk_then_pass_is_fast_again() {
    let delay = Duration::from_millis(200);
    let proxy = FaultProxy::start(start_echo_server().await).unwrap();
    let mut existing = connect(proxy.addr()).await;
    assert_echoes(&mut existing, b"warm-up").await;

    proxy.set_mode(FaultMode::Slow(delay));
    let started = Instant::now();
    assert_echoes(&mut existing, b"slow").await;
    let elapsed = started.elapsed();
    // The request and the reply are each delayed.
    assert!(elapsed >= 2 * delay, "round trip took only {elapsed:?}");

    let mut fresh = connect(proxy.addr()).await;
    let started = Instant::now();
    assert_echoes(&mut fresh, b"slow too").await;
    assert!(started.elapsed() >= 2 * delay);

    proxy.set_mode(FaultMode::Pass);
    let started = Instant::now();
    assert_echoes(&mut existing, b"fast").await;
    assert!(started.elapsed() < delay, "pass still slow: {:?}", started.elapsed());
}

#[tokio::test]
async fn modes_can_be_cycled_on_one_proxy() {
    let proxy = FaultProxy::start(start_echo_server().await).unwrap();
    for mode in [
        FaultMode::Refuse,
        FaultMode::Drop,
        FaultMode::Blackhole,
        FaultMode::Slow(Duration::from_millis(5)),
        FaultMode::Refuse,
        FaultMode::Refuse,
    ] {
        proxy.set_mode(mode);
        proxy.set_mode(FaultMode::Pass);
        let mut stream = connect(proxy.addr()).await;
        assert_echoes(&mut stream, format!("after {mode:?}").as_bytes()).await;
    }
}

#[tokio::test]
async fn dropping_the_proxy_closes_everything() {
    let proxy = FaultProxy::start(start_echo_server().await).unwrap();
    let addr = proxy.addr();
    let mut existing = connect(addr).await;
    assert_echoes(&mut existing, b"before").await;

    drop(proxy);
    assert_closed(&mut existing).await;
    let err = TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[tokio::test]
async fn unreachable_upstream_closes_the_client() {
    // Reserve a port, then free it so nothing listens there.
    let upstream = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let proxy = FaultProxy::start(upstream).unwrap();
    assert_accepted_then_closed(proxy.addr()).await;
}

#[test]
fn works_outside_a_tokio_runtime() {
    use std::io::{Read, Write};

    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = upstream.accept().unwrap();
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).unwrap();
        stream.write_all(&buf).unwrap();
    });
    let proxy = FaultProxy::start(upstream_addr).unwrap();
    let mut stream = std::net::TcpStream::connect(proxy.addr()).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.write_all(b"plain").unwrap();
    let mut reply = [0u8; 5];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"plain");
    server.join().unwrap();
}
