//! The operator status page, `GET /`: broker connection, breaker state and
//! next probe, outbox depth and oldest age per queue, publish rate, dead
//! letters, tracking.
//!
//! Invariants: the page is complete without JavaScript (every value is
//! rendered on the server, and a `<noscript>` refresh keeps it current);
//! the inline script only enhances it, applying each event of
//! `/v1/health/stream` at once and re-reading the page for the figures that
//! change without a health event (depth, rate). No external assets: the
//! Content-Security-Policy allows nothing from elsewhere. Every value is
//! HTML-escaped.

use super::AppState;
use crate::outbox::operations::OutboxReport;
use crate::relay::breaker::{BreakerSnapshot, BreakerState};
use crate::relay::meter::{PublishRate, WINDOW_SECONDS};
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use std::fmt::Write;

/// Everything the page shows, gathered once per request.
pub struct StatusView {
    pub overall: &'static str,
    pub async_available: bool,
    pub broker_connected: bool,
    pub broker_endpoint: String,
    pub broker_error: Option<String>,
    pub broker_since: DateTime<Utc>,
    pub breaker: BreakerSnapshot,
    /// `None` when the outbox could not be read; the error is shown instead.
    pub outbox: Result<OutboxReport, String>,
    pub publishing: PublishRate,
    /// Health checks named `tracking:*`, once a tracking store reports them.
    pub tracking: Vec<(String, Value)>,
    pub now: DateTime<Utc>,
}

pub async fn status_page(State(state): State<AppState>) -> Response {
    let health = super::health::current_report(&state);
    let broker = state.publisher.status().borrow().clone();
    let paused = state.relay.is_paused();
    let outbox = state.outbox.clone();
    let report = tokio::task::spawn_blocking(move || outbox.report(paused))
        .await
        .map_err(|error| error.to_string())
        .and_then(|report| report.map_err(|error| error.to_string()));
    let view = StatusView {
        overall: match health.status {
            crate::health::HealthStatus::Pass => "pass",
            crate::health::HealthStatus::Warn => "warn",
            crate::health::HealthStatus::Fail => "fail",
        },
        async_available: health.async_available,
        broker_connected: broker.connected,
        broker_endpoint: broker.endpoint,
        broker_error: broker.last_error,
        broker_since: broker.changed_at,
        breaker: state.breaker.snapshot(),
        outbox: report,
        publishing: state.relay.publish_rate(),
        tracking: health
            .checks
            .iter()
            .filter(|(name, _)| name.starts_with("tracking:"))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
        now: Utc::now(),
    };
    let mut response = Html(render(&view)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    response
}

/// Escapes text for HTML element content and quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}

fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// `12.3 s`, `4 min 05 s`, `2 h 03 min`: ages an operator reads at a glance.
pub fn duration_text(seconds: f64) -> String {
    let seconds = seconds.max(0.0);
    if seconds < 60.0 {
        format!("{seconds:.1} s")
    } else if seconds < 3600.0 {
        let whole = seconds as u64;
        format!("{} min {:02} s", whole / 60, whole % 60)
    } else {
        let whole = seconds as u64;
        format!("{} h {:02} min", whole / 3600, (whole % 3600) / 60)
    }
}

fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn next_probe_text(breaker: &BreakerSnapshot, now: DateTime<Utc>) -> String {
    match breaker.state {
        BreakerState::Closed | BreakerState::ForcedClosed => "none needed: tasks flow".into(),
        BreakerState::HalfOpen => "probing now".into(),
        BreakerState::ForcedOpen => "none: forced open by an operator (release it to resume)".into(),
        BreakerState::Open => match breaker.next_probe_at {
            Some(at) if at > now => format!(
                "in {} (at {})",
                duration_text((at - now).num_milliseconds() as f64 / 1000.0),
                timestamp(at)
            ),
            _ => "due: with the next task, or now with `taskgate outbox drain`".into(),
        },
    }
}

fn row(out: &mut String, label: &str, field: &str, value: &str) {
    let _ = write!(
        out,
        "<tr><th scope=\"row\">{}</th><td data-field=\"{}\">{}</td></tr>",
        escape(label),
        escape(field),
        escape(value)
    );
}

/// Tracking rows from its health checks: the lag (age and depth of what
/// waits to be recorded) and each check's status, or "not configured".
fn render_tracking(out: &mut String, checks: &[(String, Value)]) {
    if checks.is_empty() {
        row(out, "Lag", "tracking-lag", "not configured");
        return;
    }
    for (name, check) in checks {
        let first = check.get(0).unwrap_or(check);
        let status = first.get("status").and_then(Value::as_str).unwrap_or("unknown");
        let observed = match first.get("observedValue") {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        };
        let unit = first.get("observedUnit").and_then(Value::as_str).unwrap_or("");
        if let Some(age) = first.get("journalOldestAgeSeconds").and_then(Value::as_f64) {
            let lag = format!("{} ({observed} {unit} not yet recorded)", duration_text(age));
            row(out, "Lag", "tracking-lag", &lag);
        }
        let mut text = format!("{status}: {observed} {unit}").trim().to_owned();
        if let Some(output) = first.get("output").and_then(Value::as_str) {
            text.push_str(&format!(" ({output})"));
        }
        row(out, name, &name.replace(':', "-"), &text);
    }
}

/// The whole page. `main#status` is what the script swaps on refresh.
pub fn render(view: &StatusView) -> String {
    let mut main = String::with_capacity(8 * 1024);
    let _ = write!(
        main,
        "<main id=\"status\"><p class=\"summary\">Overall health: <strong data-field=\"status\" \
         data-state=\"{overall}\">{overall}</strong>; async work is <span data-field=\"async-available\">{available}</span>. \
         Rendered at <span data-field=\"rendered-at\">{now}</span>.</p>",
        overall = escape(view.overall),
        available = if view.async_available { "available" } else { "unavailable (spooling)" },
        now = timestamp(view.now),
    );

    main.push_str("<section><h2>Broker</h2><table>");
    row(
        &mut main,
        "Connection",
        "broker-connection",
        if view.broker_connected {
            "connected"
        } else {
            "disconnected"
        },
    );
    row(&mut main, "Endpoint", "broker-endpoint", &view.broker_endpoint);
    row(&mut main, "Since", "broker-since", &timestamp(view.broker_since));
    row(
        &mut main,
        "Last error",
        "broker-error",
        view.broker_error.as_deref().unwrap_or("none"),
    );
    main.push_str("</table></section>");

    main.push_str("<section><h2>Circuit breaker</h2><table>");
    row(&mut main, "State", "breaker-state", view.breaker.state.as_str());
    row(&mut main, "Since", "breaker-since", &timestamp(view.breaker.changed_at));
    row(
        &mut main,
        "Next probe",
        "breaker-next-probe",
        &next_probe_text(&view.breaker, view.now),
    );
    row(
        &mut main,
        "Times opened",
        "breaker-opened-count",
        &view.breaker.opened_count.to_string(),
    );
    main.push_str("</table></section>");

    main.push_str("<section><h2>Outbox</h2>");
    match &view.outbox {
        Ok(report) => {
            main.push_str("<table>");
            row(&mut main, "Depth", "outbox-depth", &format!("{} tasks", report.depth));
            row(
                &mut main,
                "Oldest",
                "outbox-oldest-age",
                &report
                    .oldest_age_seconds
                    .map_or_else(|| "empty".to_owned(), duration_text),
            );
            row(
                &mut main,
                "Size",
                "outbox-bytes",
                &format!("{} of {}", bytes_text(report.bytes), bytes_text(report.max_bytes)),
            );
            row(
                &mut main,
                "Relay",
                "relay-paused",
                if report.paused {
                    "paused by an operator"
                } else {
                    "running"
                },
            );
            main.push_str("</table>");
            if report.queues.is_empty() {
                main.push_str("<p data-field=\"queues\">No queue has tasks waiting.</p>");
            } else {
                main.push_str(
                    "<table class=\"queues\" data-field=\"queues\"><thead><tr><th scope=\"col\">Queue</th>\
                     <th scope=\"col\">Waiting</th><th scope=\"col\">Oldest</th></tr></thead><tbody>",
                );
                for (name, queue) in &report.queues {
                    let _ = write!(
                        main,
                        "<tr data-queue=\"{name}\"><td>{name}</td><td>{depth}</td><td>{oldest}</td></tr>",
                        name = escape(name),
                        depth = queue.depth,
                        oldest = escape(&queue.oldest_age_seconds.map_or_else(|| "-".to_owned(), duration_text)),
                    );
                }
                main.push_str("</tbody></table>");
            }
        }
        Err(error) => {
            let _ = write!(
                main,
                "<p class=\"error\" data-field=\"outbox-error\">The outbox cannot be read: {}</p>",
                escape(error)
            );
        }
    }
    main.push_str("</section>");

    main.push_str("<section><h2>Publishing</h2><table>");
    row(
        &mut main,
        "Rate",
        "publish-rate",
        &format!("{:.1} tasks/s (last {WINDOW_SECONDS} s)", view.publishing.per_second),
    );
    row(
        &mut main,
        "Published since start",
        "published-total",
        &view.publishing.published_total.to_string(),
    );
    main.push_str("</table></section>");

    main.push_str("<section><h2>Dead letters</h2><table>");
    let dead = match &view.outbox {
        Ok(report) if report.dead_letters == 0 => "none".to_owned(),
        Ok(report) => format!("{} (see `taskgate dead-letters list`)", report.dead_letters),
        Err(_) => "unknown".to_owned(),
    };
    row(&mut main, "Dead letters", "dead-letters", &dead);
    main.push_str("</table></section>");

    main.push_str("<section><h2>Tracking</h2><table>");
    render_tracking(&mut main, &view.tracking);
    main.push_str("</table></section></main>");

    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>taskgate status</title>\
         <noscript><meta http-equiv=\"refresh\" content=\"10\"></noscript>\
         <style>{STYLE}</style></head><body>\
         <header><h1>taskgate</h1><p>Broker gateway status. <span id=\"live\" data-field=\"live\">\
         Values as of page load; reload for current ones.</span></p></header>\
         {main}<script>{SCRIPT}</script></body></html>\n"
    )
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5rem auto;max-width:60rem;padding:0 1rem;\
color:#1b1b1b;background:#fafafa}h1{margin:0}h2{font-size:1.1rem;margin:1.2rem 0 .4rem}\
table{border-collapse:collapse;min-width:24rem}th,td{text-align:left;padding:.2rem .8rem .2rem 0;\
border-bottom:1px solid #ddd}th[scope=row]{font-weight:600;width:12rem}\
[data-state=pass]{color:#1a7f37}[data-state=warn]{color:#9a6700}[data-state=fail]{color:#cf222e}\
.error{color:#cf222e}#live{color:#57606a;font-size:.9rem}";

/// Applies health events at once, then re-reads the page for the rest.
const SCRIPT: &str = r#"(function () {
  "use strict";
  if (!window.EventSource || !window.fetch || !window.DOMParser) { return; }
  function set(name, text) {
    var element = document.querySelector('[data-field="' + name + '"]');
    if (element) { element.textContent = text; }
    return element;
  }
  function check(report, name) {
    var list = report.checks && report.checks[name];
    return list && list[0];
  }
  function apply(report) {
    var status = set("status", report.status);
    if (status) { status.setAttribute("data-state", report.status); }
    set("async-available", report.async_available ? "available" : "unavailable (spooling)");
    var broker = check(report, "broker:connection");
    if (broker) {
      set("broker-connection", broker.observedValue ? "connected" : "disconnected");
      set("broker-error", broker.output || "none");
    }
    var breaker = check(report, "breaker:state");
    if (breaker) { set("breaker-state", breaker.observedValue); }
    var depth = check(report, "outbox:depth");
    if (depth) { set("outbox-depth", depth.observedValue + " tasks"); }
  }
  var refreshing = false;
  function refresh() {
    if (refreshing) { return; }
    refreshing = true;
    fetch("/", { headers: { "Accept": "text/html" }, cache: "no-store" })
      .then(function (response) { return response.ok ? response.text() : Promise.reject(response.status); })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("status");
        var current = document.getElementById("status");
        if (fresh && current) { current.replaceWith(document.importNode(fresh, true)); }
      })
      .catch(function () {})
      .then(function () { refreshing = false; });
  }
  var source = new EventSource("/v1/health/stream");
  source.addEventListener("health", function (event) {
    try { apply(JSON.parse(event.data)); } catch (ignored) {}
    set("live", "Live: updated " + new Date().toISOString().replace(/\.\d+Z$/, "Z") + ".");
    refresh();
  });
  source.onerror = function () { set("live", "Connection to the gateway lost; retrying."); };
  setInterval(refresh, 3000);
})();"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::operations::QueueReport;

    fn view() -> StatusView {
        let now = Utc::now();
        StatusView {
            overall: "warn",
            async_available: false,
            broker_connected: false,
            broker_endpoint: "amqp://guest:****@127.0.0.1:5672/%2f".into(),
            broker_error: Some("connection refused <&>".into()),
            broker_since: now,
            breaker: BreakerSnapshot {
                state: BreakerState::Open,
                changed_at: now,
                opened_count: 2,
                next_probe_at: Some(now + chrono::Duration::seconds(4)),
            },
            outbox: Ok(OutboxReport {
                depth: 3,
                bytes: 2048,
                max_bytes: 1 << 30,
                oldest_age_seconds: Some(75.0),
                dead_letters: 1,
                paused: false,
                queues: [(
                    "export<script>".to_owned(),
                    QueueReport {
                        depth: 3,
                        oldest_age_seconds: Some(75.0),
                    },
                )]
                .into_iter()
                .collect(),
            }),
            publishing: PublishRate {
                published_total: 10,
                per_second: 2.5,
            },
            tracking: Vec::new(),
            now,
        }
    }

    #[test]
    fn renders_every_value_escaped_without_external_assets() {
        let html = render(&view());
        assert!(html.contains(r#"<td data-field="breaker-state">open</td>"#), "{html}");
        assert!(html.contains(r#"<td data-field="broker-connection">disconnected</td>"#));
        assert!(html.contains("connection refused &lt;&amp;&gt;"));
        assert!(html.contains("export&lt;script&gt;"));
        assert!(!html.contains("export<script>"));
        assert!(html.contains("1 min 15 s"));
        assert!(html.contains("2.5 tasks/s"));
        assert!(html.contains(r#"<td data-field="tracking-lag">not configured</td>"#));
        assert!(html.contains("in 4.0 s") || html.contains("in 3.9 s"), "{html}");

        let mut tracked = view();
        tracked.tracking = vec![(
            "tracking:database".to_owned(),
            serde_json::json!([{"status": "warn", "observedValue": 12, "observedUnit": "tasks",
                                "journalOldestAgeSeconds": 90.0, "output": "database unreachable"}]),
        )];
        let html = render(&tracked);
        assert!(
            html.contains(r#"<td data-field="tracking-lag">1 min 30 s (12 tasks not yet recorded)</td>"#),
            "{html}"
        );
        assert!(html.contains(r#"<td data-field="tracking-database">warn: 12 tasks (database unreachable)</td>"#));
        for external in ["http://", "https://", "src=", "href="] {
            assert!(!html.contains(external), "external asset reference {external:?}");
        }
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration_text(0.24), "0.2 s");
        assert_eq!(duration_text(125.0), "2 min 05 s");
        assert_eq!(duration_text(7380.0), "2 h 03 min");
        assert_eq!(bytes_text(512), "512 B");
        assert_eq!(bytes_text(3 << 20), "3.0 MiB");
    }
}
