//! The status page in a real headless browser (Debian's chromium, which
//! scripts/test installs): it loads, shows the breaker state, follows the
//! health event stream when the broker goes down without a reload, and is
//! complete with JavaScript disabled. A missing browser fails the test.

mod support;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::app::{delete_queues, test_settings, unique};
use support::fault_proxy::{FaultMode, FaultProxy};
use support::operator::{refused_amqp_url, start_gateway};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

fn chromium() -> String {
    std::env::var("TASKGATE_CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

fn chromium_command(profile: &std::path::Path) -> Command {
    let mut command = Command::new(chromium());
    command
        .args(CHROMIUM_FLAGS)
        .arg(format!("--user-data-dir={}", profile.display()));
    command
}

fn missing_browser(error: std::io::Error) -> ! {
    panic!(
        "cannot run {:?} ({error}): the status page tests need Debian's chromium (scripts/test installs it)",
        chromium()
    )
}

/// A headless Chromium driven over the DevTools protocol, one page attached.
struct Browser {
    child: Child,
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = chromium_command(profile.path())
            .args(["--remote-debugging-port=0", "about:blank"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| missing_browser(error));
        let (sender, receiver) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = sender.send(url.trim().to_owned());
                }
            }
        });
        let url = match receiver.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("chromium did not open its DevTools endpoint");
            }
        };
        let (socket, _) = tungstenite::connect(url.as_str()).expect("connect to chromium's DevTools");
        if let MaybeTlsStream::Plain(stream) = socket.get_ref() {
            stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        }
        Browser {
            child,
            socket,
            next_id: 0,
            session: None,
            _profile: profile,
        }
    }

    /// One DevTools command that must succeed.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .unwrap_or_else(|error| panic!("{method} failed: {error}"))
    }

    /// One DevTools command; waits for its answer (events are skipped).
    fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        self.socket
            .send(Message::Text(message.to_string().into()))
            .expect("send to chromium");
        loop {
            let answer = match self.socket.read().expect("read from chromium") {
                Message::Text(text) => serde_json::from_str::<Value>(text.as_str()).unwrap(),
                _ => continue,
            };
            if answer["id"] == id {
                return match answer.get("error") {
                    Some(error) => Err(error.clone()),
                    None => Ok(answer["result"].clone()),
                };
            }
        }
    }

    /// Opens `url` in a new page and attaches to it.
    fn open(&mut self, url: &str) {
        let target = self.call("Target.createTarget", json!({"url": url}));
        let attached = self.call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        self.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
    }

    /// Opens `url` with JavaScript disabled and returns its HTML once the
    /// page has been parsed (read through the DOM domain: page scripts are
    /// off, the inspector is not).
    fn html_without_javascript(&mut self, url: &str) -> String {
        self.open("about:blank");
        self.call("Emulation.setScriptExecutionDisabled", json!({"value": true}));
        self.call("Page.navigate", json!({"url": url}));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // The document may be replaced between the two calls while the
            // navigation commits; then the node is gone and we ask again.
            let document = self.call("DOM.getDocument", json!({"depth": 0}));
            let html = self
                .try_call("DOM.getOuterHTML", json!({"nodeId": document["root"]["nodeId"]}))
                .map(|html| html["outerHTML"].as_str().unwrap_or("").to_owned())
                .unwrap_or_default();
            if html.contains("</main>") {
                return html;
            }
            assert!(Instant::now() < deadline, "the page never loaded: {html}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn evaluate(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        result["result"]["value"].clone()
    }

    fn field(&mut self, name: &str) -> String {
        self.evaluate(&format!(
            "(document.querySelector('[data-field=\"{name}\"]') || {{}}).textContent || ''"
        ))
        .as_str()
        .unwrap_or("")
        .to_owned()
    }

    /// Polls until `predicate` holds on the page, or fails with `what`.
    fn wait_until(&mut self, what: &str, timeout: Duration, mut predicate: impl FnMut(&mut Browser) -> bool) {
        let deadline = Instant::now() + timeout;
        while !predicate(self) {
            if Instant::now() > deadline {
                let text = self.evaluate("document.body ? document.body.innerText : ''");
                panic!(
                    "the page never showed {what}; it shows:\n{}",
                    text.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_breaker_and_follows_the_broker_going_down_live() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("status-page");
    let proxy = FaultProxy::start("127.0.0.1:5672".parse().unwrap()).unwrap();
    let mut settings = test_settings(
        dir.path(),
        &format!("amqp://guest:guest@{}/%2f", proxy.addr()),
        &[(&queue, "#")],
    );
    // Once open, the breaker stays open while the test looks at it.
    settings.breaker.open_min_ms = 60_000;
    settings.breaker.open_max_ms = 60_000;
    let gateway = start_gateway(settings, dir.path()).await;
    gateway
        .wait_for_health(Duration::from_secs(15), |health| health["status"] == "pass")
        .await;

    let page_url = gateway.url("/");
    let mut browser = tokio::task::block_in_place(|| {
        let mut browser = Browser::launch();
        browser.open(&page_url);
        browser.wait_until("a loaded page", Duration::from_secs(20), |b| {
            b.evaluate("document.readyState") == "complete" && !b.field("breaker-state").is_empty()
        });
        browser
    });
    tokio::task::block_in_place(|| {
        assert_eq!(browser.evaluate("document.title"), "taskgate status");
        assert_eq!(browser.field("breaker-state"), "closed");
        assert_eq!(browser.field("broker-connection"), "connected");
        browser.wait_until("the live event stream connected", Duration::from_secs(20), |b| {
            b.field("live").starts_with("Live:")
        });
        // Marks this document: a reload would lose it.
        browser.evaluate("window.loadedOnce = 42");
    });

    proxy.set_mode(FaultMode::Refuse);
    // With no connection each round fails at once; three open the breaker.
    gateway
        .post_accepted(json!({"task": "export.project", "args": ["org", "proj"]}))
        .await;
    tokio::task::block_in_place(|| {
        browser.wait_until(
            "the breaker open and the broker disconnected",
            Duration::from_secs(30),
            |b| b.field("breaker-state") == "open" && b.field("broker-connection") == "disconnected",
        );
        assert_eq!(
            browser.evaluate("window.loadedOnce"),
            42,
            "updated in place, not reloaded"
        );
        // The figures without health events follow on the next refresh.
        browser.wait_until(
            "the spooled task in its queue and the next probe",
            Duration::from_secs(20),
            |b| {
                b.field("outbox-depth") == "1 tasks"
                    && b.evaluate(&format!("!!document.querySelector('[data-queue=\"{queue}\"]')")) == true
                    && b.field("breaker-next-probe").starts_with("in ")
            },
        );
        assert_eq!(browser.field("status"), "warn");
    });
    drop(browser);
    gateway.stop().await;
    drop(proxy);
    delete_queues(&[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_complete_without_javascript() {
    let dir = tempfile::tempdir().unwrap();
    let queue = unique("status-nojs");
    let mut settings = test_settings(dir.path(), &refused_amqp_url(), &[(&queue, "#")]);
    settings.breaker.open_min_ms = 60_000;
    settings.breaker.open_max_ms = 60_000;
    let gateway = start_gateway(settings, dir.path()).await;
    gateway
        .post_accepted(json!({"task": "export.project", "args": ["org", "proj"]}))
        .await;
    gateway
        .wait_for_health(Duration::from_secs(15), |health| {
            health["checks"]["breaker:state"][0]["observedValue"] == "open"
        })
        .await;
    let url = gateway.url("/");
    let dom = tokio::task::block_in_place(|| Browser::launch().html_without_javascript(&url));

    for expected in [
        r#"<td data-field="breaker-state">open</td>"#,
        r#"<td data-field="broker-connection">disconnected</td>"#,
        r#"<td data-field="outbox-depth">1 tasks</td>"#,
        &format!(r#"<tr data-queue="{queue}"><td>{queue}</td><td>1</td>"#),
        r#"data-field="publish-rate""#,
        r#"data-field="dead-letters">none<"#,
        "<h2>Tracking</h2>",
        r#"http-equiv="refresh""#,
        // The script did not run: nothing replaced the load-time note.
        "Values as of page load",
    ] {
        assert!(dom.contains(expected), "{expected:?} missing from\n{dom}");
    }
    assert!(
        !dom.contains("src=\"http") && !dom.contains("href=\"http"),
        "no external assets"
    );

    let response = gateway.client.get(gateway.url("/")).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/html; charset=utf-8");
    let policy = response.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.starts_with("default-src 'none'"), "{policy}");
    gateway.stop().await;
}
