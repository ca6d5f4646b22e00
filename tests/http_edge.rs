//! The HTTP edge as a client meets it, against the real app on port 0:
//!
//! - browsers and DNS rebinding: a cross-site `text/plain` POST is 415 and
//!   writes nothing; a foreign `Host` is 421 and changes nothing, also on
//!   the admin API without a token; cross-site `Origin` and
//!   `Sec-Fetch-Site` are 403 on state changes, a same-origin page passes;
//! - bounded clients: 200 connections holding half a header are closed
//!   within the header timeout while a POST still answers 202 in under
//!   100 ms; past `max_connections` a new connection gets 503 at once;
//!   idle keep-alive connections close after the idle timeout (not the
//!   header timeout); a stalled body gets 408 and writes nothing, and a
//!   request timeout never hides an accepted task; the event-stream cap
//!   answers 503 and frees a slot when a subscriber leaves;
//! - `http.submit_token`: 401 without or with a wrong token, 202 with it;
//! - the OpenAPI document lists these answers where they happen.
//!
//! Malformed and half requests are written with raw `TcpStream`s; normal
//! ones with reqwest. The tests of this file run one at a time ([`SERIAL`]):
//! the timing bounds are about the gateway, not about competing with the
//! other tests of this binary for two cores.

mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::app::{spawn_app, test_settings, unique, TestApp};
use taskgate::config::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Nothing listens there: tasks stay queued in the outbox, where a test
/// can count them.
const NO_BROKER: &str = "amqp://127.0.0.1:1/%2f";

fn settings(dir: &std::path::Path) -> Settings {
    test_settings(dir, NO_BROKER, &[(&unique("tg-edge"), "#")])
}

/// One HTTP answer as read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    fn problem(&self) -> Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        serde_json::from_str(&self.body).unwrap_or_else(|error| panic!("{error}: {self:?}"))
    }
}

/// Reads one response (head and `Content-Length` body) from `stream`.
async fn read_answer(stream: &mut TcpStream) -> Answer {
    let mut received = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head, body_start) = loop {
        if let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") {
            break (String::from_utf8_lossy(&received[..end]).into_owned(), end + 4);
        }
        let read = stream.read(&mut chunk).await.expect("read an answer");
        assert!(
            read > 0,
            "connection closed before a whole answer: {:?}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&chunk[..read]);
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"));
    let mut answer = Answer {
        status,
        head,
        body: String::new(),
    };
    let length: usize = answer
        .header("content-length")
        .map(|length| length.parse().unwrap())
        .unwrap_or(0);
    while received.len() < body_start + length {
        let read = stream.read(&mut chunk).await.expect("read a body");
        assert!(read > 0, "connection closed inside a body");
        received.extend_from_slice(&chunk[..read]);
    }
    answer.body = String::from_utf8_lossy(&received[body_start..body_start + length]).into_owned();
    answer
}

/// Sends `request` on a new connection and reads the answer.
async fn exchange(address: SocketAddr, request: &str) -> Answer {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream))
        .await
        .expect("an answer within 10 s")
}

/// Waits for the server to close `stream`; returns when it did, and
/// whatever it sent first.
async fn closed(stream: &mut TcpStream, within: Duration) -> Result<(Instant, Vec<u8>), &'static str> {
    let mut received = Vec::new();
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Err("still open"),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok((Instant::now(), received)),
            Ok(Ok(read)) => received.extend_from_slice(&chunk[..read]),
        }
    }
}

fn task(n: usize) -> Value {
    json!({"task": "edge.test", "args": [n]})
}

/// Pending tasks, as the admin API (development, loopback) reports them.
async fn outbox_depth(app: &TestApp) -> u64 {
    let report = app.get_json("/v1/outbox").await;
    let depth = report["depth"].as_u64().unwrap();
    assert_eq!(depth, app.outbox_depth().await, "admin report and health agree");
    depth
}

async fn relay_paused(app: &TestApp) -> bool {
    let report = app.get_json("/v1/outbox").await;
    report["paused"].as_bool().unwrap()
}

#[tokio::test]
async fn a_cross_site_text_plain_post_is_refused_and_writes_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(settings(dir.path())).await;
    let body = task(1).to_string();
    // What a form or `fetch(…, {mode: "no-cors"})` on evil.example sends:
    // no preflight, text/plain, the page's origin.
    for path in ["/v1/tasks", "/v1/tasks/batch"] {
        let body = if path == "/v1/tasks" {
            body.clone()
        } else {
            json!({"tasks": [task(1)]}).to_string()
        };
        let response = app
            .client
            .post(app.url(path))
            .header("content-type", "text/plain;charset=UTF-8")
            .header("origin", "http://evil.example")
            .header("sec-fetch-site", "cross-site")
            .header("sec-fetch-mode", "no-cors")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 415, "{path}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["type"], "urn:taskgate:problem:unsupported-media-type");
        assert_eq!(problem["field"], "Content-Type");
    }
    // Form encodings and a missing Content-Type are no better.
    for content_type in [
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let mut request = app.client.post(app.url("/v1/tasks")).body(body.clone());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        assert_eq!(request.send().await.unwrap().status(), 415, "{content_type:?}");
    }
    // JSON from that origin (a browser would preflight it, and taskgate
    // answers no preflight) is refused for its origin.
    let response = app
        .client
        .post(app.url("/v1/tasks"))
        .header("origin", "http://evil.example")
        .json(&task(1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(
        response.json::<Value>().await.unwrap()["type"],
        "urn:taskgate:problem:cross-site-request"
    );
    assert_eq!(outbox_depth(&app).await, 0, "no refused request wrote anything");
    // The same task as the Python client sends it is accepted and counted,
    // so the zero above is a real zero.
    let response = app.post_task(&task(1)).await;
    assert_eq!(response.status(), 202);
    assert_eq!(outbox_depth(&app).await, 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_foreign_host_is_misdirected_and_changes_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    settings.http.allowed_hosts = vec!["Taskgate.Test".into()];
    // Development without an admin token: loopback callers may pause.
    assert!(settings.http.admin_token.is_empty());
    let app = spawn_app(settings).await;
    let address = app.address;
    let port = address.port();
    let body = task(1).to_string();
    let post_task = |host: &str| {
        format!(
            "POST /v1/tasks HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let pause = |host: &str| {
        format!("POST /v1/outbox/pause HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    };
    // A rebinding page: evil.example resolves to 127.0.0.1, so the peer is
    // loopback, but the browser sends the page's host name.
    for host in [
        "evil.example",
        &format!("evil.example:{port}"),
        "localhost.evil.example",
    ] {
        let answer = exchange(address, &post_task(host)).await;
        assert_eq!(answer.status, 421, "{host}: {answer:?}");
        assert_eq!(answer.problem()["type"], "urn:taskgate:problem:host-not-allowed");
        let answer = exchange(address, &pause(host)).await;
        assert_eq!(answer.status, 421, "{host}: {answer:?}");
        assert_eq!(answer.problem()["status"], 421);
        // Reads too: a rebinding page must not read the outbox either.
        let answer = exchange(
            address,
            &format!("GET /v1/outbox HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(answer.status, 421, "{host}: {answer:?}");
    }
    // No Host at all (HTTP/1.0), and an absolute target naming another host.
    let answer = exchange(address, "GET /healthz HTTP/1.0\r\n\r\n").await;
    assert_eq!(answer.status, 421, "{answer:?}");
    let answer = exchange(
        address,
        &format!("GET http://evil.example/healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(answer.status, 421, "{answer:?}");
    assert_eq!(outbox_depth(&app).await, 0, "no task written");
    assert!(!relay_paused(&app).await, "the foreign Host did not pause the relay");

    // The names that are served: loopback ones and http.allowed_hosts.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("taskgate.test:{port}"),
    ] {
        let answer = exchange(address, &post_task(&host)).await;
        assert_eq!(answer.status, 202, "{host}: {answer:?}");
    }
    assert_eq!(outbox_depth(&app).await, 3);
    // The status page works under an allowed name too: the page, and the
    // health stream it opens from its own origin.
    let allowed = format!("taskgate.test:{port}");
    let page = exchange(
        address,
        &format!("GET / HTTP/1.1\r\nHost: {allowed}\r\nAccept: text/html\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("id=\"status\""), "the status page: {page:?}");
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /v1/health/stream HTTP/1.1\r\nHost: {allowed}\r\nOrigin: http://{allowed}\r\n\
                 Sec-Fetch-Site: same-origin\r\nAccept: text/event-stream\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = vec![0_u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut head))
        .await
        .expect("the stream answers at once")
        .unwrap();
    let head = String::from_utf8_lossy(&head[..read]);
    assert!(
        head.starts_with("HTTP/1.1 200") && head.to_ascii_lowercase().contains("text/event-stream"),
        "{head}"
    );
    drop(stream);
    let answer = exchange(address, &pause(&format!("127.0.0.1:{port}"))).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(relay_paused(&app).await, "the same request with a loopback Host pauses");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn admin_routes_refuse_cross_site_requests_and_admit_their_own_origin() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(settings(dir.path())).await;
    let pause = || app.client.post(app.url("/v1/outbox/pause"));
    let refusals = [
        pause().header("origin", "http://evil.example"),
        pause().header("origin", format!("http://evil.example:{}", app.address.port())),
        // Another local page (a dev server on another port) is not this origin.
        pause().header("origin", "http://127.0.0.1:3000"),
        pause().header("origin", "null"),
        pause().header("sec-fetch-site", "cross-site"),
        pause()
            .header("origin", app.base_url.clone())
            .header("sec-fetch-site", "cross-site"),
    ];
    for request in refusals {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 403);
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["type"], "urn:taskgate:problem:cross-site-request", "{problem}");
    }
    // A body that is not JSON is refused before anything else.
    let response = pause()
        .header("origin", "http://evil.example")
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert!(!relay_paused(&app).await, "no refused request paused the relay");
    let response = app
        .client
        .delete(app.url("/v1/outbox/tasks"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403, "DELETE is a state change too");

    // A page of this gateway's own origin (what a browser sends from it).
    let response = pause()
        .header("origin", app.base_url.clone())
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(relay_paused(&app).await);
    // Reads from elsewhere are not refused (their answers are unreadable
    // cross-site: no CORS headers).
    let response = app
        .client
        .get(app.url("/v1/health"))
        .header("origin", "http://evil.example")
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("access-control-allow-origin").is_none());
    app.stop().await.unwrap();
}

/// POSTs a task on a new connection; returns how long the 202 took.
async fn timed_post(client: &reqwest::Client, url: &str, n: usize) -> Duration {
    let started = Instant::now();
    let response = client.post(url).json(&task(n)).send().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 202);
    elapsed
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_headers_are_cut_at_the_header_timeout_while_posts_still_answer_at_once() {
    let _serial = SERIAL.lock().await;
    const HOLDERS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    settings.http.header_read_timeout_ms = 1_000;
    assert!(settings.http.max_connections > HOLDERS + 10);
    let app = spawn_app(settings).await;
    // Every POST on a connection of its own: the accept loop is what the
    // holders would block.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = app.url("/v1/tasks");
    let mut before = Vec::new();
    for n in 0..5 {
        before.push(timed_post(&client, &url, n).await);
    }

    let opening = Instant::now();
    let mut holders = Vec::new();
    for _ in 0..HOLDERS {
        let connected = Instant::now();
        let mut stream = TcpStream::connect(app.address).await.unwrap();
        stream
            .write_all(b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
            .await
            .unwrap();
        holders.push((connected, stream));
    }
    let all_held = Instant::now();
    let mut during = Vec::new();
    for n in 0..5 {
        during.push(timed_post(&client, &url, 100 + n).await);
    }
    let posted = Instant::now();
    let watchers: Vec<_> = holders
        .into_iter()
        .map(|(connected, mut stream)| {
            tokio::spawn(async move {
                let outcome = closed(&mut stream, Duration::from_secs(5)).await;
                (connected, outcome)
            })
        })
        .collect();
    let mut first_close = None::<Instant>;
    for watcher in watchers {
        let (connected, outcome) = watcher.await.unwrap();
        let (at, sent) = outcome.expect("a half header was still open after 5 s");
        assert!(
            sent.is_empty(),
            "closed without an answer, got {:?}",
            String::from_utf8_lossy(&sent)
        );
        let open_for = at - connected;
        assert!(
            open_for >= Duration::from_millis(900) && open_for <= Duration::from_millis(2_000),
            "a half header was closed after {open_for:?}, not within the 1 s header timeout (+1 s)"
        );
        first_close = Some(first_close.map_or(at, |first| first.min(at)));
    }
    eprintln!(
        "POST /v1/tasks: before {before:?}; with {HOLDERS} half headers open {during:?} (median {:?}); \
         holders opened in {:?}",
        median(during.clone()),
        all_held - opening,
    );
    assert!(
        posted <= first_close.unwrap(),
        "the POSTs ran while every half header was still open"
    );
    let slowest = *during.iter().max().unwrap();
    assert!(
        median(during) < Duration::from_millis(100),
        "POST /v1/tasks with {HOLDERS} half headers open must answer 202 in under 100 ms"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "no POST waited on the holders: {slowest:?}"
    );
    assert_eq!(outbox_depth(&app).await, 10, "the half requests wrote nothing");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn past_max_connections_a_new_connection_gets_503_at_once() {
    let _serial = SERIAL.lock().await;
    const MAX: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    settings.http.max_connections = MAX;
    settings.http.header_read_timeout_ms = 20_000;
    settings.http.idle_timeout_ms = 30_000;
    let app = spawn_app(settings).await;
    let request = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    // Keep-alive connections that were answered once, so the server holds
    // each of them (a connect alone may still wait in the backlog).
    let mut held = Vec::new();
    for _ in 0..MAX {
        let mut stream = TcpStream::connect(app.address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        assert_eq!(read_answer(&mut stream).await.status, 200);
        held.push(stream);
    }
    for _ in 0..3 {
        let started = Instant::now();
        let answer = exchange(app.address, request).await;
        let took = started.elapsed();
        assert_eq!(answer.status, 503, "{answer:?}");
        assert_eq!(answer.header("connection"), Some("close"));
        assert_eq!(answer.problem()["type"], "urn:taskgate:problem:too-many-connections");
        assert!(took < Duration::from_secs(1), "the refusal took {took:?}");
    }
    // A task cannot be posted past the cap either; it is refused, not queued.
    let response = app.client.post(app.url("/v1/tasks")).json(&task(1)).send().await;
    assert_eq!(response.map(|response| response.status().as_u16()).ok(), Some(503));
    // The held connections still work, and one leaving frees its slot.
    held[0].write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_answer(&mut held[0]).await.status, 200);
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = exchange(app.address, request).await;
        if answer.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never freed: {answer:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn idle_keep_alive_connections_close_after_the_idle_timeout_not_the_header_timeout() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    settings.http.header_read_timeout_ms = 1_000;
    settings.http.idle_timeout_ms = 3_000;
    let app = spawn_app(settings).await;
    let request = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_answer(&mut stream).await.status, 200);
    // Idle past the header timeout: still open, and still serving.
    assert_eq!(
        closed(&mut stream, Duration::from_millis(1_500)).await,
        Err("still open")
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(read_answer(&mut stream).await.status, 200);
    let answered = Instant::now();
    let (at, sent) = closed(&mut stream, Duration::from_secs(8))
        .await
        .expect("an idle keep-alive connection stays open");
    assert!(sent.is_empty());
    let idle_for = at - answered;
    assert!(
        idle_for >= Duration::from_millis(2_500) && idle_for <= Duration::from_millis(5_000),
        "closed after {idle_for:?} idle, not after the 3 s idle timeout"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_stalled_body_gets_408_and_writes_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    settings.http.request_timeout_ms = 1_000;
    let app = spawn_app(settings).await;
    let body = task(1).to_string();
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(
            format!(
                "POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{}",
                body.len(),
                &body[..body.len() - 3]
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut stream))
        .await
        .expect("an answer to a stalled body");
    let took = started.elapsed();
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(answer.problem()["type"], "urn:taskgate:problem:request-timeout");
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(3_000),
        "408 after {took:?}, not after the 1 s request timeout"
    );
    // The rest of the body now changes nothing: the connection is closed.
    let _ = stream.write_all(&body.as_bytes()[body.len() - 3..]).await;
    assert!(closed(&mut stream, Duration::from_secs(3)).await.is_ok());
    assert_eq!(outbox_depth(&app).await, 0);
    app.stop().await.unwrap();
}

/// A request timeout shorter than a group commit: every answer must still
/// tell the truth. A 202 is a task in the outbox; a 408 is no task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_timeout_never_hides_an_accepted_task() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    settings.http.request_timeout_ms = 2;
    let app = spawn_app(settings.clone()).await;
    let client = reqwest::Client::new();
    let url = app.url("/v1/tasks");
    let mut posts = Vec::new();
    for n in 0..64 {
        let id = uuid::Uuid::new_v4().to_string();
        let request = client
            .post(&url)
            .json(&json!({"task": "edge.test", "args": [n], "id": id}));
        posts.push(tokio::spawn(async move {
            let started = Instant::now();
            let status = request.send().await.unwrap().status().as_u16();
            (id, status, started.elapsed())
        }));
    }
    let mut answers = Vec::new();
    let mut late = 0;
    for post in posts {
        let (id, status, took) = post.await.unwrap();
        // Waited for a group commit past the timeout, and still got its 202.
        late += usize::from(status == 202 && took > Duration::from_millis(2));
        answers.push((id, status));
    }
    app.stop().await.unwrap();
    let accepted: Vec<_> = answers.iter().filter(|(_, status)| *status == 202).collect();
    let timed_out: Vec<_> = answers.iter().filter(|(_, status)| *status == 408).collect();
    eprintln!(
        "with a 2 ms request timeout: {} answered 202 ({late} of them after more than 2 ms), {} answered 408",
        accepted.len(),
        timed_out.len()
    );
    assert_eq!(accepted.len() + timed_out.len(), answers.len(), "{answers:?}");

    // Read back with ordinary timeouts, from what is durable.
    settings.http.request_timeout_ms = 30_000;
    let app = spawn_app(settings).await;
    assert_eq!(
        outbox_depth(&app).await,
        accepted.len() as u64,
        "the outbox holds exactly the tasks answered 202"
    );
    for (id, status) in &answers {
        let response = app
            .client
            .get(app.url(&format!("/v1/tasks/{id}")))
            .send()
            .await
            .unwrap();
        match status {
            202 => assert_eq!(response.json::<Value>().await.unwrap()["state"], "queued", "{id}"),
            _ => assert_eq!(response.status(), 404, "a 408'd task {id} must not exist"),
        }
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_event_stream_cap_answers_503_and_a_leaving_subscriber_frees_its_slot() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    settings.http.max_event_subscribers = 2;
    let app = spawn_app(settings).await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let subscribe = || client.get(app.url("/v1/health/stream")).send();
    let mut subscribers = Vec::new();
    for _ in 0..2 {
        let mut response = subscribe().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let first = tokio::time::timeout(Duration::from_secs(5), response.chunk())
            .await
            .expect("the first event at once")
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&first).contains("event: health"));
        subscribers.push(response);
    }
    let started = Instant::now();
    let refused = subscribe().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once");
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["content-type"], "application/problem+json");
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(
        refused.json::<Value>().await.unwrap()["type"],
        "urn:taskgate:problem:too-many-subscribers"
    );
    // Everything else still answers.
    assert_eq!(
        app.client.get(app.url("/v1/health")).send().await.unwrap().status(),
        200
    );

    drop(subscribers.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut response = loop {
        let response = subscribe().await.unwrap();
        if response.status() == 200 {
            break response;
        }
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(response.chunk().await.unwrap().is_some());
    // And the cap holds again.
    assert_eq!(subscribe().await.unwrap().status(), 503);

    // Task event streams have a cap of their own: full health slots do not
    // refuse a progress bar, and past two task streams the next is 503.
    let follow = |id: &str| client.get(app.url(&format!("/v1/tasks/{id}/events"))).send();
    let mut followers = Vec::new();
    for n in 0..2 {
        let mut response = follow(&format!("task-{n}")).await.unwrap();
        assert_eq!(response.status(), 200);
        let first = tokio::time::timeout(Duration::from_secs(5), response.chunk())
            .await
            .expect("the task's state at once")
            .unwrap()
            .unwrap();
        let first = String::from_utf8_lossy(&first).into_owned();
        assert!(first.contains("event: state") && first.contains("PENDING"), "{first}");
        followers.push(response);
    }
    let refused = follow("task-2").await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(
        refused.json::<Value>().await.unwrap()["type"],
        "urn:taskgate:problem:too-many-subscribers"
    );
    drop(followers);
    drop(response);
    drop(subscribers);
    app.stop().await.unwrap();
}

const SUBMIT_TOKEN: &str = "submit-0123456789abcdef0123456789abcdef";
const ADMIN_TOKEN: &str = "admin-0123456789abcdef0123456789abcdef";

#[tokio::test]
async fn a_submit_token_is_required_to_post_tasks_when_set() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    settings.http.submit_token = SUBMIT_TOKEN.into();
    settings.http.admin_token = ADMIN_TOKEN.into();
    let app = spawn_app(settings).await;
    let batch = json!({"tasks": [task(1), task(2)]});
    for path in ["/v1/tasks", "/v1/tasks/batch"] {
        let body = if path == "/v1/tasks" { task(1) } else { batch.clone() };
        let wrong = format!("{SUBMIT_TOKEN}x");
        let prefix = &SUBMIT_TOKEN[..SUBMIT_TOKEN.len() - 1];
        for token in [None, Some(wrong.as_str()), Some(prefix), Some("")] {
            let mut request = app.client.post(app.url(path)).json(&body);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{path} with {token:?}");
            assert!(response.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer"));
            assert_eq!(response.headers()["content-type"], "application/problem+json");
            let problem: Value = response.json().await.unwrap();
            assert_eq!(problem["type"], "urn:taskgate:problem:submit-token-required");
        }
        let response = app
            .client
            .post(app.url(path))
            .basic_auth("taskgate", Some(SUBMIT_TOKEN))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path}: Basic is not Bearer");
    }
    assert_eq!(app.outbox_depth().await, 0, "no refused submission wrote anything");
    // The token is checked before the body is read: a request whose body
    // never comes is refused at once.
    let mut stream = TcpStream::connect(app.address).await.unwrap();
    stream
        .write_all(
            b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
              Content-Length: 5000\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(3), read_answer(&mut stream))
        .await
        .expect("refused without waiting for the body");
    assert_eq!(answer.status, 401);
    drop(stream);

    for token in [SUBMIT_TOKEN, ADMIN_TOKEN] {
        let response = app
            .client
            .post(app.url("/v1/tasks"))
            .bearer_auth(token)
            .json(&task(1))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let response = app
            .client
            .post(app.url("/v1/tasks/batch"))
            .bearer_auth(token)
            .json(&batch)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    assert_eq!(app.outbox_depth().await, 6);
    // Reads stay open.
    let response = app.client.get(app.url("/v1/tasks?limit=1")).send().await.unwrap();
    assert_ne!(response.status(), 401);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn without_a_submit_token_tasks_need_none() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(dir.path());
    // An admin token alone does not guard submissions.
    settings.http.admin_token = ADMIN_TOKEN.into();
    let app = spawn_app(settings).await;
    assert_eq!(app.post_task(&task(1)).await.status(), 202);
    let response = app
        .client
        .post(app.url("/v1/tasks"))
        .bearer_auth("anything")
        .json(&task(2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_openapi_document_lists_the_edge_answers_where_they_happen() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_app(settings(dir.path())).await;
    let document = app.get_json("/openapi.json").await;
    let statuses = |method: &str, path: &str| -> Vec<String> {
        let responses = document["paths"][path][method]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path} is not documented"));
        responses.keys().cloned().collect()
    };
    let expect = |method: &str, path: &str, wanted: &[&str], absent: &[&str]| {
        let documented = statuses(method, path);
        for status in wanted {
            assert!(
                documented.iter().any(|s| s == status),
                "{method} {path} does not document {status}: {documented:?}"
            );
        }
        for status in absent {
            assert!(
                !documented.iter().any(|s| s == status),
                "{method} {path} documents {status}, which it never answers: {documented:?}"
            );
        }
    };
    for path in ["/v1/tasks", "/v1/tasks/batch"] {
        expect("post", path, &["401", "403", "408", "415", "421"], &[]);
    }
    for path in ["/v1/outbox/pause", "/v1/outbox/import", "/v1/breaker/open"] {
        expect("post", path, &["401", "403", "408", "415", "421"], &[]);
    }
    expect("delete", "/v1/outbox/tasks", &["403", "408", "415", "421"], &[]);
    for path in ["/healthz", "/v1/tasks/{id}", "/v1/outbox"] {
        expect("get", path, &["408", "421"], &["415"]);
    }
    expect("get", "/v1/health/stream", &["421", "503"], &["408", "415"]);
    let cross_site = &document["paths"]["/v1/outbox/pause"]["post"]["responses"]["403"]["description"];
    assert!(
        cross_site.as_str().unwrap().contains("token") && cross_site.as_str().unwrap().contains("cross-site"),
        "the admin 403 names both reasons: {cross_site}"
    );
    let schemes = &document["components"]["securitySchemes"];
    assert_eq!(schemes["submit_token"]["scheme"], "bearer");
    app.stop().await.unwrap();
}
