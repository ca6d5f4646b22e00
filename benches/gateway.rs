//! `scripts/bench`: taskgate's throughput, latency and memory, measured side
//! by side with the broker's own limit, in one run on one machine.
//!
//! (a) raw lapin publishing with confirms to a durable queue (the broker's
//!     limit): the same Celery message taskgate sends (body, headers and
//!     properties), encoded once, through a durable topic exchange, with a
//!     sliding window of as many unconfirmed messages as taskgate's relay
//!     may have (`relay.publish_window`), one more sent as each confirm
//!     arrives; beside it the stop-and-go variant (a whole window confirmed
//!     before the next) and the bare body to the default exchange;
//! (b) taskgate end to end: HTTP POST → confirmed in the queue;
//! (c) taskgate accept rate with the broker down (outbox only), p50/p99;
//! (d) drain rate of a 100,000-task backlog when the broker returns;
//! (e) peak RSS of the taskgate process in each;
//! (f) one sequential producer, as a Django view sends: one keep-alive
//!     HTTP/1.1 connection, one `POST /v1/tasks` at a time, broker up,
//!     p50/p99/mean of the 202; beside it (f-celery) stock Celery's
//!     `send_task` with `confirm_publish` to the same RabbitMQ, the same task
//!     one at a time (`benches/celery_send.py`, run by the virtualenv's
//!     python), and (f-fsync) this filesystem's 1 KiB append + `fdatasync`
//!     (`File::sync_data`) beside the outboxes. Target: (f) p50 ≤ 3 × the
//!     (f-fsync) p50. Sizes: `BENCH_SEQUENTIAL_TASKS` (2,000) measured after
//!     `BENCH_SEQUENTIAL_WARMUP` (200); each row stops after 120 s;
//! and the CPU time taskgate and RabbitMQ spent per task in each, steadier
//! than rates when the three share two cores. (a) and (b) run in
//! `BENCH_PAIRS` (3) alternated pairs, reported as medians with every run.
//!
//! Prints a table and writes `docs/benchmarks.md`. Not a test: it asserts
//! nothing about speed; it reports.
//!
//! For side-by-side comparisons while working on a change,
//! `BENCH_ONLY=a,b` runs only the named measurements (a, b, c, d, f; (d)
//! brings (c), the backlog it drains) and `TASKGATE_BIN=path` measures another build; such
//! partial runs print their rows and leave `docs/benchmarks.md` alone.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const CONNECTIONS: usize = 64;

fn count(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn sample_task(n: usize) -> Value {
    json!({
        "task": "bench.export",
        "args": ["org-slug", format!("project-{n}")],
        "kwargs": {"output_type": "xls", "note": "x".repeat(160)},
        "properties": {"creator_id": "u1"}
    })
}

struct Gateway {
    child: Child,
    base_url: String,
}

impl Gateway {
    fn start(config: &Path) -> Gateway {
        let binary = std::env::var("TASKGATE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_taskgate").to_owned());
        let mut child = Command::new(binary)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn,taskgate=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn taskgate");
        let stderr = child.stderr.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(rest) = line.split("address=").nth(1) {
                        let _ = sender.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                        sent = true;
                    }
                }
            }
        });
        let address = receiver
            .recv_timeout(Duration::from_secs(60))
            .expect("taskgate listening");
        Gateway {
            child,
            base_url: format!("http://{address}"),
        }
    }

    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(f64::NAN)
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bench that fails mid-measurement (a panic unwinds through `main`)
/// must not leave its taskgate running, publishing into the bench's
/// exchange: kill it. After [`Gateway::stop`] it has exited already.
impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU seconds (user and system) process `pid` has used so far, from
/// `/proc/{pid}/stat`; NaN when it cannot be read.
fn cpu_seconds(pid: u32) -> f64 {
    static TICKS_PER_SECOND: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let ticks = *TICKS_PER_SECOND.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
            .unwrap_or(f64::NAN)
    });
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: count fields after its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    match (fields.get(11), fields.get(12)) {
        (Some(user), Some(system)) => match (user.parse::<f64>(), system.parse::<f64>()) {
            (Ok(user), Ok(system)) => (user + system) / ticks,
            _ => f64::NAN,
        },
        _ => f64::NAN,
    }
}

/// The RabbitMQ server's process (the Erlang VM, `beam.smp`), to read its CPU.
fn rabbitmq_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// Waits (30 s at most) until RabbitMQ is idle. Deleting a queue of
/// persistent messages leaves it compacting its message store for seconds
/// afterwards, on the cores the next measurement needs: without this wait
/// its CPU per message in (d) varied from 100 to 150 µs between runs.
async fn wait_for_idle_broker() {
    let Some(pid) = rabbitmq_pid() else { return };
    let deadline = Instant::now() + Duration::from_secs(30);
    let interval = Duration::from_millis(500);
    loop {
        let before = cpu_seconds(pid);
        tokio::time::sleep(interval).await;
        let share_of_a_core = (cpu_seconds(pid) - before) / interval.as_secs_f64();
        let busy = share_of_a_core.is_finite() && share_of_a_core >= 0.05;
        if !busy || Instant::now() > deadline {
            return;
        }
    }
}

/// CPU used by taskgate and by RabbitMQ over one measurement, per task.
struct CpuMeter {
    rabbitmq: Option<u32>,
    rabbitmq_start: f64,
    /// taskgate's CPU seconds before the measurement: 0 when its whole
    /// life counts.
    taskgate_start: f64,
}

impl CpuMeter {
    fn start() -> Self {
        let rabbitmq = rabbitmq_pid();
        Self {
            rabbitmq,
            rabbitmq_start: rabbitmq.map_or(f64::NAN, cpu_seconds),
            taskgate_start: 0.0,
        }
    }

    /// As [`CpuMeter::start`], leaving out what `gateway` used so far (its
    /// start-up): for the short (f) rows, where it would weigh.
    fn start_after_startup(gateway: &Gateway) -> Self {
        Self {
            taskgate_start: cpu_seconds(gateway.child.id()),
            ..Self::start()
        }
    }

    /// "taskgate X µs, RabbitMQ Y µs" per task; taskgate's CPU is its whole
    /// life so far (`gateway` is started for the measurement) unless the
    /// meter started after its start-up.
    fn per_task(&self, gateway: Option<&Gateway>, tasks: usize) -> String {
        let micros = |seconds: f64| seconds / tasks as f64 * 1e6;
        let rabbitmq = self
            .rabbitmq
            .map_or(f64::NAN, |pid| micros(cpu_seconds(pid) - self.rabbitmq_start));
        match gateway {
            Some(gateway) => format!(
                "{:.0} / {rabbitmq:.0} µs",
                micros(cpu_seconds(gateway.child.id()) - self.taskgate_start)
            ),
            None => format!("n/a / {rabbitmq:.0} µs"),
        }
    }
}

fn write_config(dir: &Path, broker_url: &str, queue: &str, exchange: &str) -> PathBuf {
    let path = dir.join(format!("{queue}.toml"));
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n\n[broker]\nurl = \"{broker_url}\"\nconnect_timeout_ms = 1000\n\n\
         [routing]\nexchange = \"{exchange}\"\n\n[[routing.queues]]\nname = \"{queue}\"\nbinding_key = \"#\"\n\n\
         [outbox]\npath = \"{}\"\nmax_bytes = 4294967296\n\n[breaker]\nopen_min_ms = 200\nopen_max_ms = 1000\n\n\
         [tracking]\ndatabase_url = \"sqlite://{}\"\n",
        dir.join("outbox").display(),
        dir.join("tracking.db").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Messages ready in `queue`, or 0 while it does not exist yet. A passive
/// declare of a missing queue closes its channel, so each look uses a fresh one.
async fn queue_depth(connection: &Connection, queue: &str) -> u32 {
    let Ok(channel) = connection.create_channel().await else {
        return 0;
    };
    let depth = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
        .unwrap_or(0);
    let _ = channel.close(200, "looked".into()).await;
    depth
}

async fn wait_for_depth(connection: &Connection, queue: &str, target: u32, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if queue_depth(connection, queue).await >= target {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "queue {queue} never reached {target}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the raw publisher sends in (a).
#[derive(Clone, Copy, PartialEq)]
enum RawMessage {
    /// taskgate's Celery message (headers and properties included) through
    /// a durable topic exchange bound with `#`: what the relay asks of the
    /// broker, so the ratio compares like with like.
    Celery,
    /// The body alone, content type and persistence only, to the default
    /// exchange: the figure earlier runs reported as (a).
    BareBody,
}

/// How (a) waits for confirms.
#[derive(Clone, Copy, PartialEq)]
enum ConfirmWindow {
    /// Up to `window` unconfirmed at all times: one more is sent as each
    /// confirm arrives. The strongest publisher of the message we could
    /// write (pre-encoded, one channel), so the broker's real limit.
    Sliding,
    /// Send `window`, wait for all their confirms, send the next: how the
    /// relay published before the sliding window (kept for comparison).
    StopAndGo,
}

/// (a): the broker's limit with the relay's default confirm window.
async fn raw_lapin(total: usize, shape: RawMessage, mode: ConfirmWindow) -> f64 {
    let window = taskgate::config::RelaySettings::default().publish_window;
    let connection = Connection::connect(RABBITMQ, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let queue = format!("bench-raw-{}", std::process::id());
    let exchange = format!("bench-raw-exchange-{}", std::process::id());
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let task: taskgate::task::Task = {
        let request: taskgate::task::TaskRequest = serde_json::from_value(sample_task(0)).unwrap();
        let router = taskgate::task::routing::TopicRouter::from_settings(&Default::default()).unwrap();
        taskgate::task::intake::accept(request, &Default::default(), &router, chrono::Utc::now()).unwrap()
    };
    let message = taskgate::celery::encode(&task, "bench@host");
    let (exchange_name, routing_key, properties) = match shape {
        RawMessage::Celery => {
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            (
                exchange.as_str(),
                task.routing_key.as_str(),
                taskgate::broker::amqp::basic_properties(&message),
            )
        }
        RawMessage::BareBody => (
            "",
            queue.as_str(),
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        ),
    };
    let publish = || {
        channel.basic_publish(
            exchange_name.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &message.body,
            properties.clone(),
        )
    };
    let started = Instant::now();
    match mode {
        ConfirmWindow::Sliding => {
            let mut unconfirmed: std::collections::VecDeque<lapin::PublisherConfirm> =
                std::collections::VecDeque::with_capacity(window);
            for _ in 0..total {
                if unconfirmed.len() == window {
                    let confirm = unconfirmed.pop_front().unwrap();
                    let confirmation = confirm.await.unwrap();
                    assert!(confirmation.is_ack() && confirmation.take_message().is_none());
                }
                unconfirmed.push_back(publish().await.unwrap());
            }
            for confirm in unconfirmed {
                let confirmation = confirm.await.unwrap();
                assert!(confirmation.is_ack() && confirmation.take_message().is_none());
            }
        }
        ConfirmWindow::StopAndGo => {
            let mut sent = 0;
            while sent < total {
                let batch = window.min(total - sent);
                let mut confirms = Vec::with_capacity(batch);
                for _ in 0..batch {
                    confirms.push(publish().await.unwrap());
                }
                for confirm in confirms {
                    let confirmation = confirm.await.unwrap();
                    assert!(confirmation.is_ack() && confirmation.take_message().is_none());
                }
                sent += batch;
            }
        }
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    if shape == RawMessage::Celery {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "bench done".into()).await;
    rate
}

struct LoadResult {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    started: Instant,
}

/// Posts `total` tasks over `CONNECTIONS` concurrent keep-alive
/// connections. A bare hyper HTTP/1.1 connection per client, not a pooled
/// high-level client: the generator shares the two cores with taskgate and
/// RabbitMQ, and every cycle it spends is one taskgate does not get.
async fn http_load(base_url: &str, total: usize) -> LoadResult {
    let address = base_url.trim_start_matches("http://").to_owned();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..CONNECTIONS {
        let next = next.clone();
        let address = address.clone();
        workers.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(&address)
                .await
                .expect("connect to taskgate");
            stream.set_nodelay(true).unwrap();
            let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("HTTP handshake");
            tokio::spawn(connection);
            let mut latencies = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return latencies;
                }
                let body = serde_json::to_vec(&sample_task(n)).unwrap();
                let request = hyper::Request::post("/v1/tasks")
                    .header("host", address.as_str())
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
                    .unwrap();
                let sent = Instant::now();
                let response = sender.send_request(request).await.expect("POST");
                let status = response.status();
                let body = http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .expect("response body")
                    .to_bytes();
                assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
                latencies.push(sent.elapsed());
            }
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    for worker in workers {
        latencies.extend(worker.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let percentile =
        |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1000.0;
    LoadResult {
        rate: total as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        started,
    }
}

/// One (b) run: taskgate end to end.
struct EndToEnd {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mib: f64,
    cpu: String,
}

/// (b): a gateway on its own queue, `total` tasks posted over
/// `CONNECTIONS` connections, timed until the last is confirmed in the
/// queue; the gateway is stopped and the queue deleted after it.
async fn end_to_end(dir: &Path, inspector: &Connection, inspect: &Channel, total: usize, run: usize) -> EndToEnd {
    let e2e_dir = dir.join(format!("e2e-{run}"));
    std::fs::create_dir_all(&e2e_dir).unwrap();
    let e2e_queue = format!("bench-e2e-{}-{run}", std::process::id());
    wait_for_idle_broker().await;
    let gateway = Gateway::start(&write_config(&e2e_dir, RABBITMQ, &e2e_queue, "bench_exchange"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = CpuMeter::start();
    let load = http_load(&gateway.base_url, total).await;
    let confirmed_at = wait_for_depth(inspector, &e2e_queue, total as u32, Duration::from_secs(600)).await;
    let cpu = cpu.per_task(Some(&gateway), total);
    let rate = total as f64 / confirmed_at.duration_since(load.started).as_secs_f64();
    let rss_mib = gateway.peak_rss_mib();
    gateway.stop();
    let _ = inspect
        .queue_delete(e2e_queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    EndToEnd {
        rate,
        p50_ms: load.p50_ms,
        p99_ms: load.p99_ms,
        rss_mib,
        cpu,
    }
}

/// The index of the median of `values` (the lower middle one of an even
/// count; NaN sorts last).
fn median_index(values: &[f64]) -> usize {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|a, b| values[*a].total_cmp(&values[*b]));
    order[(values.len() - 1) / 2]
}

fn median(values: &[f64]) -> f64 {
    values[median_index(values)]
}

/// "0.78, 0.82, 0.74": each value, in run order.
fn listed(values: &[f64], decimals: usize) -> String {
    values
        .iter()
        .map(|value| format!("{value:.decimals$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn met(target_met: bool) -> &'static str {
    if target_met {
        "met"
    } else {
        "NOT met"
    }
}

fn refused_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    format!("amqp://guest:guest@{address}/%2f")
}

/// Latencies of one sequential measurement, in milliseconds.
struct Latencies {
    count: usize,
    p50_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
}

impl Latencies {
    fn of(mut samples: Vec<Duration>) -> Latencies {
        assert!(!samples.is_empty(), "no samples");
        samples.sort();
        let count = samples.len();
        let percentile = |p: f64| samples[((count as f64 * p) as usize).min(count - 1)].as_secs_f64() * 1000.0;
        Latencies {
            count,
            p50_ms: percentile(0.50),
            p99_ms: percentile(0.99),
            mean_ms: samples.iter().sum::<Duration>().as_secs_f64() * 1000.0 / count as f64,
        }
    }

    fn summary(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, mean {:.2} ms",
            self.p50_ms, self.p99_ms, self.mean_ms
        )
    }
}

/// How long the measured part of each (f) row may take before it stops
/// and reports the samples it has (the row shows the count).
const SEQUENTIAL_LIMIT: Duration = Duration::from_secs(120);

/// (f-fsync): what one durable append costs on this filesystem. Appends a
/// 1 KiB record to a new file in `dir` and `fdatasync`s it (std's
/// `File::sync_data`), `warmup` times unmeasured, then up to `total` times
/// measured (bounded by [`SEQUENTIAL_LIMIT`]). Each append grows the file,
/// so each `fdatasync` also commits the new size, as a log's append does.
fn fdatasync_latency(dir: &Path, warmup: usize, total: usize) -> Latencies {
    use std::io::Write;
    let path = dir.join("fdatasync-probe");
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .expect("create the fdatasync probe file");
    let record = [b'x'; 1024];
    let mut samples = Vec::with_capacity(total);
    let deadline = Instant::now() + SEQUENTIAL_LIMIT;
    for n in 0..warmup + total {
        let started = Instant::now();
        file.write_all(&record).expect("append to the probe file");
        file.sync_data().expect("fdatasync the probe file");
        if n >= warmup {
            samples.push(started.elapsed());
            if Instant::now() > deadline {
                break;
            }
        }
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    Latencies::of(samples)
}

/// The filesystem `path` is on ("ext4 on /dev/vda", from /proc/mounts: the
/// longest mount point that contains it).
fn filesystem_of(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (device, mount_point, kind) = (fields.first()?, fields.get(1)?, fields.get(2)?);
            path.starts_with(mount_point)
                .then(|| (mount_point.len(), format!("{kind} on {device}")))
        })
        .max_by_key(|(length, _)| *length)
        .map_or_else(|| "unknown filesystem".to_owned(), |(_, description)| description)
}

/// (f): one producer as a Django view sends: one keep-alive HTTP/1.1
/// connection, one `POST /v1/tasks` at a time, the next sent once the 202
/// is read. `warmup` requests first, unmeasured; then up to `total`
/// (bounded by [`SEQUENTIAL_LIMIT`]), each given 10 s. `between_warmup`
/// runs after the warm-up (to wait for the broker to have it).
async fn sequential_posts<F: std::future::Future<Output = ()>>(
    base_url: &str,
    warmup: usize,
    total: usize,
    between_warmup: F,
) -> Latencies {
    let address = base_url.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect to taskgate");
    stream.set_nodelay(true).unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("HTTP handshake");
    tokio::spawn(connection);
    let mut post = async |n: usize| {
        let body = serde_json::to_vec(&sample_task(n)).unwrap();
        let request = hyper::Request::post("/v1/tasks")
            .header("host", address.as_str())
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
            .unwrap();
        // The connection takes the next request once its task has seen the
        // last response end (immediate on a keep-alive connection; an error
        // if taskgate closed it).
        sender
            .ready()
            .await
            .unwrap_or_else(|error| panic!("the keep-alive connection closed before request {n}: {error}"));
        let started = Instant::now();
        let exchange = async {
            let response = sender
                .send_request(request)
                .await
                .unwrap_or_else(|error| panic!("POST {n}: {error}"));
            let status = response.status();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .expect("response body")
                .to_bytes();
            assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("a sequential POST took over 10 s");
        started.elapsed()
    };
    for n in 0..warmup {
        post(n).await;
    }
    between_warmup.await;
    let mut samples = Vec::with_capacity(total);
    let deadline = Instant::now() + SEQUENTIAL_LIMIT;
    for n in warmup..warmup + total {
        samples.push(post(n).await);
        if Instant::now() > deadline {
            break;
        }
    }
    Latencies::of(samples)
}

/// The virtualenv's python (`TASKGATE_VENV`, as `scripts/test` makes it).
fn venv_python() -> PathBuf {
    let venv = std::env::var("TASKGATE_VENV").unwrap_or_else(|_| "/var/tmp/taskgate-venv".to_owned());
    Path::new(&venv).join("bin/python")
}

/// (f-celery): stock Celery's `send_task` with `confirm_publish`, one at a
/// time, through `benches/celery_send.py` (the JSON it prints). The same
/// task as (f) (name, args, kwargs; `{n}` numbered as (f) numbers them),
/// the same routing key, a durable topic exchange bound with `#` to a
/// durable queue, as taskgate's relay publishes. The script's own deadline
/// is [`SEQUENTIAL_LIMIT`] plus start-up; the process is killed 30 s after.
/// Returns the latencies, the Celery version and what reached the queue.
async fn celery_send(warmup: usize, total: usize) -> Result<(Latencies, String, u64), String> {
    let mut request = sample_task(0);
    request["args"][1] = json!("project-{n}");
    let routing_key = {
        let parsed: taskgate::task::TaskRequest = serde_json::from_value(sample_task(0)).unwrap();
        let router = taskgate::task::routing::TopicRouter::from_settings(&Default::default()).unwrap();
        taskgate::task::intake::accept(parsed, &Default::default(), &router, chrono::Utc::now())
            .unwrap()
            .routing_key
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/celery_send.py");
    let deadline = SEQUENTIAL_LIMIT + Duration::from_secs(30);
    let python = venv_python();
    let child = tokio::process::Command::new(&python)
        .arg(&script)
        .args(["--broker", "amqp://guest:guest@127.0.0.1:5672//"])
        .args(["--queue", &format!("bench-celery-{}", std::process::id())])
        .args(["--exchange", &format!("bench-celery-exchange-{}", std::process::id())])
        .args(["--routing-key", &routing_key])
        .args(["--count", &total.to_string(), "--warmup", &warmup.to_string()])
        .args(["--request", &request.to_string()])
        .args(["--deadline", &deadline.as_secs().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| {
            format!(
                "cannot run {}: {error} (run scripts/test --setup-only)",
                python.display()
            )
        })?;
    let output = tokio::time::timeout(deadline + Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| "celery_send.py did not finish in time (killed)".to_owned())?
        .map_err(|error| format!("celery_send.py: {error}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        let last = stderr.lines().last().unwrap_or("").to_owned();
        return Err(format!("celery_send.py exited with {}: {last}", output.status));
    }
    let report: Value = serde_json::from_slice(&output.stdout)
        .map_err(|error| format!("celery_send.py printed no JSON ({error}): {stderr}"))?;
    let field = |name: &str| report[name].as_f64().unwrap_or(f64::NAN);
    let latencies = Latencies {
        count: report["count"].as_u64().unwrap_or(0) as usize,
        p50_ms: field("p50_ms"),
        p99_ms: field("p99_ms"),
        mean_ms: field("mean_ms"),
    };
    let version = report["celery"].as_str().unwrap_or("?").to_owned();
    Ok((latencies, version, report["in_queue"].as_u64().unwrap_or(0)))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
        })
        .and_then(|kib| kib.parse::<f64>().ok())
        .map(|kib| format!("{:.0} GiB", kib / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {memory} RAM")
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // target without it, and a benchmark is no test: do nothing then.
    if !std::env::args().any(|arg| arg == "--bench") {
        eprintln!("benches/gateway.rs measures, it does not test: run scripts/bench");
        return;
    }
    let e2e_total = count("BENCH_E2E_TASKS", 50_000);
    let accept_total = count("BENCH_ACCEPT_TASKS", 100_000);
    let seq_total = count("BENCH_SEQUENTIAL_TASKS", 2_000).max(1);
    let seq_warmup = count("BENCH_SEQUENTIAL_WARMUP", 200);
    let only = std::env::var("BENCH_ONLY").ok();
    let runs = |step: &str| {
        only.as_deref().is_none_or(|list| {
            list.split(',')
                .any(|s| s.trim() == step || (step == "c" && s.trim() == "d"))
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let inspector = Connection::connect(RABBITMQ, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672");
    let inspect = inspector.create_channel().await.unwrap();

    let window = taskgate::config::RelaySettings::default().publish_window;
    let mut rows = Vec::new();
    // Ratios are to (a); a run without (a) prints them as NaN.
    let mut raw_rate = f64::NAN;
    // (a) and (b) swing by ±10 % between identical runs on a shared
    // machine: they run in alternated pairs, and the table gives the
    // medians (the ratio is the median of the pairs' ratios) and every run.
    let pairs = if runs("a") && runs("b") {
        count("BENCH_PAIRS", 3).max(1)
    } else {
        1
    };
    let mut raw_runs: Vec<(f64, String)> = Vec::new();
    let mut e2e_runs: Vec<EndToEnd> = Vec::new();
    for pair in 0..pairs {
        if runs("a") {
            eprintln!(
                "(a) raw lapin, {e2e_total} messages, confirm window {window} (pair {} of {pairs})…",
                pair + 1
            );
            wait_for_idle_broker().await;
            let cpu = CpuMeter::start();
            let rate = raw_lapin(e2e_total, RawMessage::Celery, ConfirmWindow::Sliding).await;
            raw_runs.push((rate, cpu.per_task(None, e2e_total)));
        }
        if runs("b") {
            eprintln!(
                "(b) taskgate end to end, {e2e_total} tasks over {CONNECTIONS} connections (pair {} of {pairs})…",
                pair + 1
            );
            e2e_runs.push(end_to_end(dir.path(), &inspector, &inspect, e2e_total, pair).await);
        }
    }
    if runs("a") {
        let rates: Vec<f64> = raw_runs.iter().map(|(rate, _)| *rate).collect();
        raw_rate = median(&rates);
        let raw_cpu = raw_runs[median_index(&rates)].1.clone();
        wait_for_idle_broker().await;
        let cpu = CpuMeter::start();
        let stop_and_go_rate = raw_lapin(e2e_total, RawMessage::Celery, ConfirmWindow::StopAndGo).await;
        let stop_and_go_cpu = cpu.per_task(None, e2e_total);
        wait_for_idle_broker().await;
        let cpu = CpuMeter::start();
        let bare_rate = raw_lapin(e2e_total, RawMessage::BareBody, ConfirmWindow::Sliding).await;
        let bare_cpu = cpu.per_task(None, e2e_total);
        rows.push(format!(
            "| (a) raw lapin publish + confirm, sliding window of {window} unconfirmed, taskgate's Celery message (pre-encoded) via a topic exchange | {raw_rate:.0} msg/s (median of {}: {}) | 1.00 | broker limit | n/a | {raw_cpu} |",
            rates.len(),
            listed(&rates, 0)
        ));
        rows.push(format!(
            "| (a, stop-and-go) the same in batches of {window}, each confirmed in full before the next | {stop_and_go_rate:.0} msg/s | {:.2} | n/a | n/a | {stop_and_go_cpu} |",
            stop_and_go_rate / raw_rate
        ));
        rows.push(format!(
            "| (a, bare) the body alone to the default exchange, sliding window | {bare_rate:.0} msg/s | {:.2} | n/a | n/a | {bare_cpu} |",
            bare_rate / raw_rate
        ));
    }
    if runs("b") {
        let rates: Vec<f64> = e2e_runs.iter().map(|run| run.rate).collect();
        let middle = &e2e_runs[median_index(&rates)];
        // Each pair's (b) against its own (a); NaN without (a).
        let ratios: Vec<f64> = e2e_runs
            .iter()
            .enumerate()
            .map(|(pair, run)| run.rate / raw_runs.get(pair).map_or(f64::NAN, |(rate, _)| *rate))
            .collect();
        let ratio = median(&ratios);
        let ratio_met = met(ratio >= 0.80);
        eprintln!(
            "(b) ratio to (a) {ratio:.2} (pairs: {}): target (≥ 0.80) {ratio_met}",
            listed(&ratios, 2)
        );
        rows.push(format!(
            "| (b) taskgate HTTP POST → confirmed in queue ({CONNECTIONS} connections) | {:.0} tasks/s (median of {}: {}; that run's p50 {:.2} ms, p99 {:.2} ms) | {ratio:.2} (pairs: {}) | ≥ 0.80: {ratio_met} | {:.1} MiB | {} |",
            middle.rate,
            rates.len(),
            listed(&rates, 0),
            middle.p50_ms,
            middle.p99_ms,
            listed(&ratios, 2),
            middle.rss_mib,
            middle.cpu
        ));
    }

    if runs("c") {
        eprintln!("(c) accept with the broker down, {accept_total} tasks over {CONNECTIONS} connections…");
        let spool_dir = dir.path().join("spool");
        std::fs::create_dir_all(&spool_dir).unwrap();
        let spool_queue = format!("bench-drain-{}", std::process::id());
        wait_for_idle_broker().await;
        let gateway = Gateway::start(&write_config(
            &spool_dir,
            &refused_url(),
            &spool_queue,
            "bench_exchange",
        ));
        let cpu = CpuMeter::start();
        let accept = http_load(&gateway.base_url, accept_total).await;
        let accept_cpu = cpu.per_task(Some(&gateway), accept_total);
        let accept_rss = gateway.peak_rss_mib();
        gateway.stop();
        let accept_met = met(accept.rate >= 10_000.0 && accept.p99_ms < 10.0);
        eprintln!(
            "(c) {:.0} tasks/s, p50 {:.2} ms, p99 {:.2} ms: target (≥ 10,000/s, p99 < 10 ms) {accept_met}",
            accept.rate, accept.p50_ms, accept.p99_ms
        );
        rows.push(format!(
            "| (c) taskgate accept, broker down ({CONNECTIONS} connections) | {:.0} tasks/s (p50 {:.2} ms, p99 {:.2} ms) | {:.2} | ≥ 10,000/s, p99 < 10 ms: {accept_met} | {accept_rss:.1} MiB | {accept_cpu} |",
            accept.rate,
            accept.p50_ms,
            accept.p99_ms,
            accept.rate / raw_rate
        ));

        if runs("d") {
            eprintln!("(d) drain the {accept_total}-task backlog into RabbitMQ…");
            wait_for_idle_broker().await;
            let started = Instant::now();
            let cpu = CpuMeter::start();
            let gateway = Gateway::start(&write_config(&spool_dir, RABBITMQ, &spool_queue, "bench_exchange"));
            // The queue is declared by taskgate on connect; wait for it to
            // appear. The rate counts from the first task in the queue (the
            // backlog flowing); the restart before it (opening the outbox,
            // connecting) is reported beside it.
            let flowing_at = wait_for_depth(&inspector, &spool_queue, 1, Duration::from_secs(120)).await;
            let drained_at =
                wait_for_depth(&inspector, &spool_queue, accept_total as u32, Duration::from_secs(900)).await;
            let drain_rate = (accept_total - 1) as f64 / drained_at.duration_since(flowing_at).as_secs_f64();
            let restart_seconds = flowing_at.duration_since(started).as_secs_f64();
            let drain_rate_with_restart = accept_total as f64 / drained_at.duration_since(started).as_secs_f64();
            let drain_cpu = cpu.per_task(Some(&gateway), accept_total);
            let drain_rss = gateway.peak_rss_mib();
            gateway.stop();
            let drain_rss_met = met(drain_rss < 64.0);
            eprintln!("(d) peak RSS {drain_rss:.2} MiB: target (< 64 MiB) {drain_rss_met}");
            rows.push(format!(
                "| (d) drain of a {accept_total}-task backlog, from the first task in the queue to the last | {drain_rate:.0} tasks/s ({drain_rate_with_restart:.0}/s counting the {restart_seconds:.1} s restart before it) | {:.2} | ≥ 0.90 | {drain_rss:.2} MiB (< 64 MiB: {drain_rss_met}) | {drain_cpu} |",
                drain_rate / raw_rate
            ));
        }
        let _ = inspect
            .queue_delete(spool_queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    if runs("f") {
        eprintln!("(f-fsync) {seq_total} appends of 1 KiB + fdatasync beside the outboxes…");
        let fsync = fdatasync_latency(dir.path(), seq_warmup, seq_total);
        let filesystem = filesystem_of(dir.path());
        let fsync_target_ms = 3.0 * fsync.p50_ms;

        eprintln!("(f) taskgate, one sequential producer, {seq_total} POSTs after {seq_warmup}, broker up…");
        let seq_dir = dir.path().join("sequential");
        std::fs::create_dir_all(&seq_dir).unwrap();
        let seq_queue = format!("bench-sequential-{}", std::process::id());
        wait_for_idle_broker().await;
        // Its own exchange, deleted with the queue: a queue left by a failed
        // run, bound with `#`, would otherwise collect every later run's tasks.
        let seq_exchange = format!("bench-sequential-exchange-{}", std::process::id());
        let gateway = Gateway::start(&write_config(&seq_dir, RABBITMQ, &seq_queue, &seq_exchange));
        // The warm-up is measured out: a connection, then until the relay
        // has the broker (the warm-up tasks confirmed in the queue).
        let cpu = CpuMeter::start_after_startup(&gateway);
        let sequential = sequential_posts(&gateway.base_url, seq_warmup, seq_total, async {
            wait_for_depth(&inspector, &seq_queue, seq_warmup as u32, Duration::from_secs(60)).await;
        })
        .await;
        let sequential_cpu = cpu.per_task(Some(&gateway), seq_warmup + sequential.count);
        wait_for_depth(
            &inspector,
            &seq_queue,
            (seq_warmup + sequential.count) as u32,
            Duration::from_secs(60),
        )
        .await;
        let sequential_rss = gateway.peak_rss_mib();
        gateway.stop();
        let _ = inspect
            .queue_delete(seq_queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = inspect
            .exchange_delete(seq_exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
        let sequential_met = met(sequential.p50_ms <= fsync_target_ms);
        eprintln!(
            "(f) {}; (f-fsync) p50 {:.2} ms: target (f) p50 ≤ {fsync_target_ms:.2} ms {sequential_met}",
            sequential.summary(),
            fsync.p50_ms
        );

        eprintln!("(f-celery) stock Celery send_task with confirm_publish, {seq_total} after {seq_warmup}…");
        wait_for_idle_broker().await;
        let cpu = CpuMeter::start();
        let celery = celery_send(seq_warmup, seq_total).await;
        let celery_row = match celery {
            Ok((latencies, version, in_queue)) => {
                let celery_cpu = cpu.per_task(None, seq_warmup + latencies.count);
                assert_eq!(
                    in_queue,
                    (seq_warmup + latencies.count) as u64,
                    "(f-celery): confirmed messages missing from the queue"
                );
                eprintln!("(f-celery) {}", latencies.summary());
                format!(
                    "| (f-celery) stock Celery {version} `send_task`, `confirm_publish`, same RabbitMQ, one at a time, {} tasks | {} | n/a | for comparison | n/a | {celery_cpu} |",
                    latencies.count,
                    latencies.summary()
                )
            }
            Err(error) => {
                eprintln!("(f-celery) not measured: {error}");
                format!("| (f-celery) stock Celery `send_task`, `confirm_publish` | not measured: {error} | n/a | for comparison | n/a | n/a |")
            }
        };
        rows.push(format!(
            "| (f) taskgate, one sequential producer (one keep-alive connection, one POST at a time, broker up), {} tasks | {} | n/a | p50 ≤ 3 × (f-fsync) p50 = {fsync_target_ms:.2} ms: {sequential_met} | {sequential_rss:.1} MiB | {sequential_cpu} |",
            sequential.count,
            sequential.summary()
        ));

        // The same producer with the broker refused: nothing is published
        // or settled (the relay only retries behind its breaker), so this
        // is HTTP, intake and the outbox's write and flush, plus those
        // retries. Not a target; it helps tell (f)'s time apart.
        eprintln!("(f, broker down) the same {seq_total} sequential POSTs, broker refused…");
        let down_dir = dir.path().join("sequential-down");
        std::fs::create_dir_all(&down_dir).unwrap();
        wait_for_idle_broker().await;
        let gateway = Gateway::start(&write_config(
            &down_dir,
            &refused_url(),
            "bench-sequential-down",
            "bench_exchange",
        ));
        let cpu = CpuMeter::start_after_startup(&gateway);
        let down = sequential_posts(&gateway.base_url, seq_warmup, seq_total, async {}).await;
        let down_cpu = cpu.per_task(Some(&gateway), seq_warmup + down.count);
        let down_rss = gateway.peak_rss_mib();
        gateway.stop();
        eprintln!("(f, broker down) {}", down.summary());
        rows.push(format!(
            "| (f, broker down) the same producer, broker refused (nothing published; the relay retries behind its breaker), {} tasks | {} | n/a | n/a (helps tell (f) apart) | {down_rss:.1} MiB | {down_cpu} |",
            down.count,
            down.summary()
        ));
        rows.push(celery_row);
        rows.push(format!(
            "| (f-fsync) append 1 KiB + `fdatasync` (`File::sync_data`), {} times, beside the outboxes ({filesystem}) | {} | n/a | n/a | n/a | n/a |",
            fsync.count,
            fsync.summary()
        ));
    }
    let _ = inspector.close(200, "bench done".into()).await;

    let table = format!(
        "| measurement | result | ratio to (a) | target | peak RSS of taskgate | CPU per task: taskgate / RabbitMQ |\n|---|---|---|---|---|---|\n{}\n",
        rows.join("\n")
    );
    println!("{table}");
    if only.is_some() {
        eprintln!("BENCH_ONLY set: docs/benchmarks.md left as it is");
        return;
    }
    let report = format!(
        "# Benchmarks\n\nProduced by `scripts/bench` on {}, {}.\n\nMachine: {}. RabbitMQ on the same machine \
         (127.0.0.1:5672); the HTTP load generator runs on the same cores as taskgate and the broker. Message: the same \
         Celery task (≈ 0.9 KiB with headers) in every row but \"(a, bare)\". (a) keeps as many messages \
         unconfirmed as taskgate's relay may (`relay.publish_window`), topping up as each confirm arrives, with the \
         message encoded once beforehand, the same properties and headers, and a durable topic exchange like \
         taskgate's: the broker's real limit. \"(a, stop-and-go)\" waits for a whole window before the next. CPU per task is user and system time from `/proc` over the measurement, divided by its \
         tasks: taskgate's whole process, and RabbitMQ's Erlang VM (the load generator's share is neither). \
         (f) is one producer sending one task at a time over one keep-alive connection (latency of each 202); \
         (f-celery) the same task sent by stock Celery with `confirm_publish`, from the virtualenv; (f-fsync) a \
         1 KiB append + `fdatasync` on the outbox's filesystem, the floor a durable 202 cannot go under \
         (method: \"Sequential producer (f)\" below).\n\n{table}\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        format_args!(
            "{e2e_total} tasks for (a)/(b), {accept_total} for (c)/(d), {seq_total} after {seq_warmup} unmeasured for (f)"
        ),
        machine()
    );
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks.md");
    // Keep the hand-written analysis that follows the measured table.
    let analysis = std::fs::read_to_string(&out)
        .ok()
        .and_then(|text| text.find("\n## ").map(|at| text[at..].to_owned()))
        .unwrap_or_default();
    std::fs::write(&out, format!("{report}{analysis}")).unwrap();
    eprintln!("wrote {}", out.display());
}
