//! The `sd_notify` protocol as systemd sees it: the real binary, started
//! with `$NOTIFY_SOCKET` pointing at a datagram socket this test bound,
//! sends `READY=1` once it serves HTTP (not waiting on the broker),
//! `WATCHDOG=1` every `WATCHDOG_USEC / 2`, and `STOPPING=1` on SIGTERM.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::app::{binary_path, test_settings, unique, write_config};

/// A broker address nothing listens on: readiness must not depend on it.
const NO_BROKER: &str = "amqp://127.0.0.1:1/%2f";

struct Notification {
    text: String,
    at: Instant,
}

/// Starts `taskgate serve` with a clean `TASKGATE_*` environment (the test
/// runner's own `TASKGATE_VENV` would be read as a configuration key) plus `env`.
fn start(dir: &Path, env: &[(&str, &str)]) -> Child {
    let settings = test_settings(dir, NO_BROKER, &[(&unique("tg-systemd"), "#")]);
    let config = dir.join("taskgate.toml");
    write_config(&settings, &config);
    let mut command = Command::new(binary_path());
    command
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("taskgate.log")).unwrap());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TASKGATE_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    command.spawn().expect("spawn taskgate")
}

fn receive_until(socket: &UnixDatagram, timeout: Duration, log: &Path, wanted: &str) -> Vec<Notification> {
    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {wanted:?} within {timeout:?}; got {:?}\ntaskgate log:\n{}",
            received
                .iter()
                .map(|n: &Notification| n.text.as_str())
                .collect::<Vec<_>>(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        socket.set_read_timeout(Some(left)).unwrap();
        if let Ok(n) = socket.recv(&mut buffer) {
            let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
            let done = text.lines().any(|line| line == wanted);
            received.push(Notification {
                text,
                at: Instant::now(),
            });
            if done {
                return received;
            }
        }
    }
}

fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn ready_watchdog_and_stopping_reach_the_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let log = dir.path().join("taskgate.log");
    let mut child = start(
        dir.path(),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );

    let before_ready = receive_until(&socket, Duration::from_secs(20), &log, "READY=1");
    let ready = &before_ready.last().unwrap().text;
    let address = ready
        .lines()
        .find_map(|line| line.strip_prefix("STATUS=listening on "))
        .unwrap_or_else(|| panic!("READY carries the listen address in STATUS: {ready:?}"));
    // READY means serving: the probe answers at once, with no broker at all.
    let healthz = reqwest::blocking::get(format!("http://{address}/healthz")).unwrap();
    assert_eq!(healthz.status(), 200);

    // Pings every 100 ms: count three after READY, and they are paced,
    // not a busy loop.
    let mut pings = Vec::new();
    while pings.len() < 3 {
        let more = receive_until(&socket, Duration::from_secs(5), &log, "WATCHDOG=1");
        pings.push(more.last().unwrap().at);
    }
    let spread = pings[2] - pings[0];
    assert!(
        spread >= Duration::from_millis(150),
        "three pings in {spread:?}: not paced at WATCHDOG_USEC/2"
    );

    terminate(&child);
    let until_stopping = receive_until(&socket, Duration::from_secs(10), &log, "STOPPING=1");
    let stopping = &until_stopping.last().unwrap().text;
    assert!(stopping.contains("STATUS=shutting down"), "{stopping:?}");
    assert_eq!(wait_exit(&mut child, Duration::from_secs(30)), Some(0));
}

#[cfg(target_os = "linux")]
#[test]
fn abstract_socket_and_a_watchdog_meant_for_another_pid() {
    use std::os::linux::net::SocketAddrExt;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("taskgate.log");
    let name = unique("taskgate-notify");
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&address).unwrap();
    // WATCHDOG_PID names another process (as when a wrapper started us):
    // taskgate must not ping on its behalf.
    let mut child = start(
        dir.path(),
        &[
            ("NOTIFY_SOCKET", &format!("@{name}")),
            ("WATCHDOG_USEC", "100000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    let mut seen = receive_until(&socket, Duration::from_secs(20), &log, "READY=1");
    std::thread::sleep(Duration::from_millis(500));
    terminate(&child);
    seen.extend(receive_until(&socket, Duration::from_secs(10), &log, "STOPPING=1"));
    let texts: Vec<&str> = seen.iter().map(|n| n.text.as_str()).collect();
    assert!(!texts.iter().any(|t| t.contains("WATCHDOG=1")), "{texts:?}");
    assert_eq!(wait_exit(&mut child, Duration::from_secs(30)), Some(0));
}
