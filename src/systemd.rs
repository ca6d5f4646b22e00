//! systemd integration: the `sd_notify` protocol for `Type=notify` units
//! (`deploy/systemd/taskgate.service`).
//!
//! systemd passes a datagram socket in `$NOTIFY_SOCKET` (a path, or an
//! abstract name written with a leading `@`) and, with `WatchdogSec=`, the
//! watchdog period in `$WATCHDOG_USEC` (and the pid it is meant for in
//! `$WATCHDOG_PID`). taskgate sends:
//!
//! - `READY=1` once the HTTP listener is serving, so units ordered after
//!   taskgate (the platform) start only when tasks can be posted;
//! - `STOPPING=1` when shutdown begins (requests stop being accepted);
//! - `WATCHDOG=1` every `WATCHDOG_USEC / 2` from a tokio task, for as long
//!   as the server runs, shutdown included. A wedged runtime stops the pings
//!   and systemd restarts the service.
//!
//! Invariants: without `$NOTIFY_SOCKET` every call is a no-op. Sending
//! never blocks and never fails the server: the socket is non-blocking and a
//! failed send is only logged, because taskgate must serve whether or not its
//! supervisor listens (guarantee 4: nothing hangs).

use std::ffi::OsStr;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Where notifications go; `None` when not started by systemd.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    /// Linux abstract socket name, without the leading `@`.
    Abstract(Vec<u8>),
}

/// Sends `sd_notify` messages to the socket systemd gave us, if any.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`.
    pub fn from_env() -> Self {
        Self::from_values(
            std::env::var_os("NOTIFY_SOCKET").as_deref(),
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    }

    /// The parsing behind [`Notifier::from_env`], with the values given.
    pub fn from_values(
        notify_socket: Option<&OsStr>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        own_pid: u32,
    ) -> Self {
        use std::os::unix::ffi::OsStrExt;
        let target = notify_socket
            .map(OsStr::as_bytes)
            .filter(|bytes| !bytes.is_empty())
            .map(|bytes| match bytes.strip_prefix(b"@") {
                Some(name) => Target::Abstract(name.to_vec()),
                None => Target::Path(PathBuf::from(OsStr::from_bytes(bytes))),
            });
        // WATCHDOG_PID names the process the watchdog is meant for: when it
        // is someone else (we were started by a wrapper), pinging would keep
        // a dead main process looking alive.
        let for_us = watchdog_pid.is_none_or(|pid| pid.trim().parse::<u32>() == Ok(own_pid));
        let watchdog = watchdog_usec
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0 && for_us && target.is_some())
            // systemd's recommendation: ping at half the period.
            .map(|usec| Duration::from_micros(usec / 2).max(Duration::from_millis(1)));
        Self { target, watchdog }
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often [`Notifier::start_watchdog`] pings; `None` without a watchdog.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one notification (newline-separated `KEY=VALUE` assignments).
    /// `Ok(())` without doing anything when not under systemd.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        let sent = match target {
            Target::Path(path) => socket.send_to(state.as_bytes(), path)?,
            Target::Abstract(name) => send_abstract(&socket, name, state.as_bytes())?,
        };
        if sent != state.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short sd_notify datagram"));
        }
        Ok(())
    }

    fn notify_logged(&self, state: &str) {
        if let Err(error) = self.notify(state) {
            tracing::warn!(%error, state, "sd_notify failed");
        }
    }

    /// `READY=1` with a human-readable `STATUS=` for `systemctl status`.
    pub fn ready(&self, status: &str) {
        self.notify_logged(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self, status: &str) {
        self.notify_logged(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }

    /// Starts pinging `WATCHDOG=1` every half watchdog period, until the
    /// returned guard is dropped. Does nothing without a watchdog.
    pub fn start_watchdog(&self) -> WatchdogGuard {
        let Some(interval) = self.watchdog else {
            return WatchdogGuard(None);
        };
        let notifier = self.clone();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                notifier.notify_logged("WATCHDOG=1");
            }
        });
        WatchdogGuard(Some(task))
    }
}

/// Stops the watchdog pings when dropped.
#[derive(Debug)]
pub struct WatchdogGuard(Option<JoinHandle<()>>);

impl Drop for WatchdogGuard {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// `STATUS=` ends at a newline: keep a status to its first line.
fn one_line(status: &str) -> &str {
    status.lines().next().unwrap_or("")
}

#[cfg(target_os = "linux")]
fn send_abstract(socket: &UnixDatagram, name: &[u8], data: &[u8]) -> io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(data, &address)
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_socket: &UnixDatagram, _name: &[u8], _data: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract NOTIFY_SOCKET names exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_socket_everything_is_a_no_op() {
        let notifier = Notifier::from_values(None, Some("30000000"), None, 1);
        assert!(!notifier.is_enabled());
        assert_eq!(notifier.watchdog_interval(), None);
        notifier.notify("READY=1").unwrap();
        let empty = Notifier::from_values(Some(OsStr::new("")), None, None, 1);
        assert!(!empty.is_enabled());
    }

    #[test]
    fn watchdog_is_half_the_period_and_only_for_our_pid() {
        let socket = Some(OsStr::new("/run/systemd/notify"));
        let notifier = Notifier::from_values(socket, Some("30000000"), Some("42"), 42);
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(15)));
        let other = Notifier::from_values(socket, Some("30000000"), Some("43"), 42);
        assert_eq!(other.watchdog_interval(), None);
        let no_pid = Notifier::from_values(socket, Some("2000000"), None, 42);
        assert_eq!(no_pid.watchdog_interval(), Some(Duration::from_secs(1)));
        for bad in ["0", "", "soon"] {
            assert_eq!(
                Notifier::from_values(socket, Some(bad), None, 42).watchdog_interval(),
                None
            );
        }
    }

    #[test]
    fn sends_datagrams_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::from_values(Some(path.as_os_str()), None, None, 1);
        notifier.ready("listening on 127.0.0.1:1\nsecond line dropped");
        let mut buffer = [0u8; 256];
        let n = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"READY=1\nSTATUS=listening on 127.0.0.1:1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_hang() {
        let notifier = Notifier::from_values(Some(OsStr::new("/nonexistent/notify")), None, None, 1);
        assert!(notifier.notify("READY=1").is_err());
        // The logged variants swallow it.
        notifier.stopping("bye");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_datagrams_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("taskgate-test-{}", uuid::Uuid::new_v4().simple());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&address).unwrap();
        let notifier = Notifier::from_values(Some(OsStr::new(&format!("@{name}"))), None, None, 1);
        notifier.notify("STOPPING=1").unwrap();
        let mut buffer = [0u8; 64];
        let n = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"STOPPING=1");
    }
}
