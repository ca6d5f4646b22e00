//! The edge guard: what a request must look like before any handler runs,
//! so that a web page in a browser on this machine can neither reach the
//! API through DNS rebinding nor make it change anything cross-site; and
//! the optional submit token of `POST /v1/tasks` and `/v1/tasks/batch`.
//!
//! [`edge_guard`] wraps the whole router (routes, 404 and 405 fallbacks)
//! and checks, in this order, each refusal a problem+json:
//!
//! 1. **Host** (421 Misdirected Request): the `Host` header (and the
//!    authority of an absolute-form request target, when there is one)
//!    must name a loopback host (`localhost`, `127.x.y.z`, `[::1]`) or one
//!    of `http.allowed_hosts`, with any port; names compare
//!    case-insensitively. A rebinding page's requests carry its own name
//!    (`Host: evil.example`), whatever address that name resolves to, so
//!    they stop here even though the peer is loopback.
//! 2. **Content-Type** (415) on state-changing methods (everything but GET,
//!    HEAD, OPTIONS and TRACE): `POST /v1/tasks` and `POST /v1/tasks/batch`
//!    must say `application/json`; any other such request that carries a
//!    body or a `Content-Type` must say `application/json`, except
//!    `POST /v1/outbox/import`, whose body is `application/x-ndjson`. A
//!    body-less request without `Content-Type` (`curl -X POST`, the CLI's
//!    pause and resume) passes. Parameters (`; charset=utf-8`) are allowed. A browser sends
//!    a cross-site request without asking first (no CORS preflight) only
//!    with `text/plain`, `multipart/form-data` or form encoding, so none of
//!    those ever reaches a handler; taskgate answers no preflight, so a
//!    browser never sends the others cross-site.
//! 3. **Origin** (403) on state-changing methods: `Sec-Fetch-Site:
//!    cross-site` is refused, and so is an `Origin` that is neither the
//!    request's own origin (same host and port as `Host`) nor a host of
//!    `http.allowed_hosts` (any port); `Origin: null` (sandboxed frames,
//!    some redirects) is refused too. A request without `Origin` (curl, the
//!    Python client, the CLI) passes: only browsers send it.
//!
//! Invariants: the guard reads headers only, never the body, and a refused
//! request never reaches a handler, so it writes nothing. GET, HEAD and
//! OPTIONS are checked for Host only: a cross-site page cannot read their
//! answers (no CORS headers are ever sent), and the status page reads its
//! own origin.
//!
//! [`require_submitter`] guards the task-accepting routes when
//! `http.submit_token` is set: `Authorization: Bearer <token>` with the
//! submit token or the admin token, compared in constant time, else 401
//! with `WWW-Authenticate: Bearer`.

use super::problem::Problem;
use super::AppState;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use subtle::ConstantTimeEq;

pub const JSON: &str = "application/json";
pub const NDJSON: &str = "application/x-ndjson";

/// Routes whose body is JSON and which therefore always need the header.
const JSON_ROUTES: &[&str] = &["/v1/tasks", "/v1/tasks/batch", "/v1/groups"];
/// The one route that takes NDJSON (an outbox export).
const NDJSON_ROUTE: &str = "/v1/outbox/import";

/// What the guard admits besides loopback: `http.allowed_hosts`, as host
/// names in lower case, without port, IPv6 literals in brackets.
#[derive(Debug, Clone, Default)]
pub struct EdgePolicy {
    allowed_hosts: Vec<String>,
}

impl EdgePolicy {
    pub fn new(allowed_hosts: &[String]) -> Self {
        let allowed_hosts = allowed_hosts
            .iter()
            .filter_map(|entry| {
                let entry = entry.trim().to_ascii_lowercase();
                // A bare IPv6 literal (`fe80::1`) is written in brackets in
                // a Host header.
                if entry.parse::<Ipv6Addr>().is_ok() {
                    return Some(format!("[{entry}]"));
                }
                split_host_port(&entry).map(|(host, _)| host.to_owned())
            })
            .collect();
        Self { allowed_hosts }
    }

    fn is_allowed_name(&self, host: &str) -> bool {
        self.allowed_hosts
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(host))
    }

    /// Whether `authority` (a Host header's `host[:port]`) may be served.
    pub fn host_allowed(&self, authority: &str) -> bool {
        match split_host_port(authority) {
            Some((host, _)) => is_loopback_name(host) || self.is_allowed_name(host),
            None => false,
        }
    }

    /// Whether an `Origin` header value may drive a state change on a
    /// request whose `Host` is `host`.
    pub fn origin_allowed(&self, origin: &str, host: &str) -> bool {
        let Some((scheme, authority)) = origin.split_once("://") else {
            return false; // `null`, or not an origin at all
        };
        let default_port = match scheme.to_ascii_lowercase().as_str() {
            "http" => 80,
            "https" => 443,
            _ => return false,
        };
        let Some((origin_host, origin_port)) = split_host_port(authority) else {
            return false;
        };
        if self.is_allowed_name(origin_host) {
            return true;
        }
        let Some((request_host, request_port)) = split_host_port(host) else {
            return false;
        };
        // A Host without a port means the scheme's default port.
        origin_host.eq_ignore_ascii_case(request_host)
            && origin_port.unwrap_or(default_port) == request_port.unwrap_or(default_port)
    }
}

/// `host[:port]` split, IPv6 literals kept in brackets; `None` for
/// anything that is not an authority without user information.
pub fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    if authority.is_empty() || authority.contains(['@', '/', ' ', '\\']) {
        return None;
    }
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']')?;
        let (host, rest) = authority.split_at(end + 1);
        host[1..end].parse::<Ipv6Addr>().ok()?;
        match rest {
            "" => (host, None),
            _ => (host, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(port) => Some(port.parse::<u16>().ok()?),
        None => None,
    };
    Some((host, port))
}

/// `localhost`, any `127.x.y.z`, or `[::1]`.
pub fn is_loopback_name(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback());
    }
    host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// The media type of a `Content-Type` value, without parameters.
fn media_type(value: &HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    Some(text.split(';').next().unwrap_or_default().trim())
}

fn carries_body(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|length| length.trim() != "0")
}

/// Why the guard refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeRefusal {
    /// No Host header, or one naming a host this gateway does not serve.
    Host(Option<String>),
    /// The media type this route needs, and what was sent.
    MediaType {
        wanted: &'static str,
        sent: Option<String>,
    },
    CrossSiteFetch,
    Origin(String),
}

/// The guard's rules as a pure function of the request line and headers.
pub fn check(policy: &EdgePolicy, method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<(), EdgeRefusal> {
    let host = headers.get(header::HOST).and_then(|value| value.to_str().ok());
    let Some(host) = host.filter(|host| policy.host_allowed(host)) else {
        let sent = headers
            .get(header::HOST)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        return Err(EdgeRefusal::Host(sent));
    };
    // An absolute-form target (`POST http://evil.example/v1/tasks`) names
    // the host the client meant; it must pass too.
    if let Some(authority) = uri.authority() {
        if !policy.host_allowed(authority.as_str()) {
            return Err(EdgeRefusal::Host(Some(authority.to_string())));
        }
    }
    if method.is_safe() {
        return Ok(());
    }
    let path = uri.path();
    let content_type = headers.get(header::CONTENT_TYPE);
    let wanted = if JSON_ROUTES.contains(&path) {
        Some(JSON)
    } else if content_type.is_some() || carries_body(headers) {
        Some(if path == NDJSON_ROUTE { NDJSON } else { JSON })
    } else {
        None
    };
    if let Some(wanted) = wanted {
        let sent = content_type.and_then(media_type);
        if !sent.is_some_and(|sent| sent.eq_ignore_ascii_case(wanted)) {
            return Err(EdgeRefusal::MediaType {
                wanted,
                sent: content_type.map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned()),
            });
        }
    }
    let fetch_site = headers.get("sec-fetch-site").and_then(|value| value.to_str().ok());
    if fetch_site.is_some_and(|site| site.trim().eq_ignore_ascii_case("cross-site")) {
        return Err(EdgeRefusal::CrossSiteFetch);
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let text = origin.to_str().unwrap_or_default().trim();
        if !policy.origin_allowed(text, host) {
            return Err(EdgeRefusal::Origin(
                String::from_utf8_lossy(origin.as_bytes()).into_owned(),
            ));
        }
    }
    Ok(())
}

pub fn refusal_problem(refusal: &EdgeRefusal) -> Problem {
    match refusal {
        EdgeRefusal::Host(sent) => Problem::new(
            StatusCode::MISDIRECTED_REQUEST,
            "host-not-allowed",
            "Host not served here",
            match sent {
                Some(host) => format!(
                    "this gateway does not serve the host {host:?}: use a loopback name (localhost, 127.0.0.1, \
                     [::1]) or add the name to http.allowed_hosts"
                ),
                None => "the request has no Host header".to_owned(),
            },
        ),
        EdgeRefusal::MediaType { wanted, sent } => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            match sent {
                Some(sent) => format!("this request must be sent as Content-Type: {wanted}, not {sent:?}"),
                None => format!("this request must be sent with Content-Type: {wanted}"),
            },
        )
        .with_field(Some("Content-Type".into())),
        EdgeRefusal::CrossSiteFetch => Problem::new(
            StatusCode::FORBIDDEN,
            "cross-site-request",
            "Cross-site request refused",
            "a browser sent this request from another site (Sec-Fetch-Site: cross-site); taskgate does not \
             change anything on behalf of other sites",
        ),
        EdgeRefusal::Origin(origin) => Problem::new(
            StatusCode::FORBIDDEN,
            "cross-site-request",
            "Cross-site request refused",
            format!(
                "the request comes from the origin {origin:?}, which is neither this gateway's own nor a host \
                 of http.allowed_hosts"
            ),
        )
        .with_field(Some("Origin".into())),
    }
}

/// The middleware of the module docs, over the whole router.
pub async fn edge_guard(State(policy): State<Arc<EdgePolicy>>, request: Request, next: Next) -> Response {
    match check(&policy, request.method(), request.uri(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            tracing::warn!(
                ?refusal,
                method = %request.method(),
                path = %request.uri().path(),
                "request refused at the edge"
            );
            refusal_problem(&refusal).into_response()
        }
    }
}

/// Whether `authorization` carries one of `tokens` (empty ones never
/// match). Every token is compared, in constant time, whatever matched.
pub fn bearer_matches(authorization: Option<&HeaderValue>, tokens: &[&str]) -> bool {
    let presented = authorization.and_then(|value| value.to_str().ok()).and_then(|value| {
        let (scheme, token) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    let Some(presented) = presented else {
        return false;
    };
    let mut matched = subtle::Choice::from(0);
    for token in tokens.iter().filter(|token| !token.is_empty()) {
        // `ct_eq` on slices of different lengths answers at once; only the
        // length can leak, never a prefix.
        matched |= presented.as_bytes().ct_eq(token.as_bytes());
    }
    bool::from(matched)
}

/// `http.submit_token` on the task-accepting routes (a route layer, so it
/// runs before the body is read).
pub async fn require_submitter(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let http = &state.settings.http;
    if http.submit_token.is_empty() {
        return next.run(request).await;
    }
    let tokens = [http.submit_token.as_str(), http.admin_token.as_str()];
    if bearer_matches(request.headers().get(header::AUTHORIZATION), &tokens) {
        return next.run(request).await;
    }
    let presented = request.headers().contains_key(header::AUTHORIZATION);
    tracing::warn!(presented, path = %request.uri().path(), "task submission refused: no valid submit token");
    let mut response = Problem::new(
        StatusCode::UNAUTHORIZED,
        "submit-token-required",
        "Submit token required",
        if presented {
            "the bearer token is not this gateway's http.submit_token"
        } else {
            "send `Authorization: Bearer <http.submit_token>`: this gateway accepts tasks only with its submit token"
        },
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"taskgate\""),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn run(policy: &EdgePolicy, method: &str, target: &str, pairs: &[(&str, &str)]) -> Result<(), EdgeRefusal> {
        check(
            policy,
            &method.parse().unwrap(),
            &target.parse().unwrap(),
            &headers(pairs),
        )
    }

    #[test]
    fn hosts() {
        let policy = EdgePolicy::new(&["Taskgate.Internal".into(), "fe80::1".into(), "gw:8080".into()]);
        for host in [
            "localhost",
            "LOCALHOST:7439",
            "127.0.0.1",
            "127.0.0.1:1",
            "127.200.3.4:7439",
            "[::1]",
            "[::1]:7439",
            "[0:0:0:0:0:0:0:1]:80",
            "taskgate.internal",
            "TASKGATE.INTERNAL:7439",
            "[fe80::1]:7439",
            "gw:9",
        ] {
            assert!(policy.host_allowed(host), "{host} must be allowed");
        }
        for host in [
            "",
            "evil.example",
            "evil.example:7439",
            "localhost.evil.example",
            "128.0.0.1",
            "10.0.0.5:7439",
            "0.0.0.0:7439",
            "[::2]",
            "::1",
            "user@localhost",
            "localhost:99999",
            "localhost:",
            "taskgate.internal.evil",
        ] {
            assert!(!policy.host_allowed(host), "{host} must be refused");
        }
    }

    #[test]
    fn the_host_is_checked_on_every_method_and_in_absolute_targets() {
        let policy = EdgePolicy::default();
        assert_eq!(run(&policy, "GET", "/healthz", &[("host", "127.0.0.1:7439")]), Ok(()));
        assert!(matches!(
            run(&policy, "GET", "/healthz", &[("host", "evil.example")]),
            Err(EdgeRefusal::Host(Some(_)))
        ));
        assert_eq!(run(&policy, "GET", "/healthz", &[]), Err(EdgeRefusal::Host(None)));
        assert!(matches!(
            run(&policy, "GET", "http://evil.example/healthz", &[("host", "localhost")]),
            Err(EdgeRefusal::Host(Some(_)))
        ));
        assert!(matches!(
            run(&policy, "POST", "/v1/outbox/pause", &[("host", "evil.example:7439")]),
            Err(EdgeRefusal::Host(Some(_)))
        ));
    }

    #[test]
    fn content_types() {
        let policy = EdgePolicy::default();
        let host = ("host", "localhost:7439");
        let ok = |method: &str, path: &str, extra: &[(&str, &str)]| {
            let mut pairs = vec![host];
            pairs.extend_from_slice(extra);
            run(&policy, method, path, &pairs)
        };
        assert_eq!(ok("POST", "/v1/tasks", &[("content-type", "application/json")]), Ok(()));
        assert_eq!(
            ok(
                "POST",
                "/v1/tasks",
                &[("content-type", "Application/JSON; charset=utf-8")]
            ),
            Ok(())
        );
        for sent in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonx",
        ] {
            assert!(
                matches!(
                    ok(
                        "POST",
                        "/v1/tasks/batch",
                        &[("content-type", sent), ("content-length", "2")]
                    ),
                    Err(EdgeRefusal::MediaType { wanted: JSON, .. })
                ),
                "{sent}"
            );
        }
        // JSON routes need the header even without a body.
        assert!(ok("POST", "/v1/tasks", &[]).is_err());
        assert_eq!(ok("POST", "/v1/outbox/import", &[("content-type", NDJSON)]), Ok(()));
        assert!(ok("POST", "/v1/outbox/import", &[("content-type", JSON)]).is_err());
        assert_eq!(ok("POST", "/v1/outbox/import", &[]), Ok(()));
        assert!(ok("POST", "/v1/outbox/import", &[("content-length", "9")]).is_err());
        // Body-less state changes need no Content-Type; a body or a
        // Content-Type must be JSON.
        assert_eq!(ok("POST", "/v1/outbox/pause", &[]), Ok(()));
        assert_eq!(ok("POST", "/v1/outbox/pause", &[("content-length", "0")]), Ok(()));
        assert_eq!(ok("DELETE", "/v1/dead-letters/3", &[]), Ok(()));
        assert!(ok("POST", "/v1/outbox/pause", &[("content-length", "5")]).is_err());
        assert!(ok("POST", "/v1/outbox/pause", &[("transfer-encoding", "chunked")]).is_err());
        assert!(ok("POST", "/v1/outbox/pause", &[("content-type", "text/plain")]).is_err());
        assert_eq!(
            ok(
                "POST",
                "/v1/outbox/pause",
                &[("content-type", "application/json"), ("content-length", "2")]
            ),
            Ok(())
        );
        // Reads are never asked for a media type.
        assert_eq!(ok("GET", "/v1/tasks", &[("content-type", "text/plain")]), Ok(()));
    }

    #[test]
    fn origins() {
        let policy = EdgePolicy::new(&["platform.internal".into()]);
        let post = |host: &str, extra: &[(&str, &str)]| {
            let mut pairs = vec![("host", host)];
            pairs.extend_from_slice(extra);
            run(&policy, "POST", "/v1/breaker/open", &pairs)
        };
        assert_eq!(post("127.0.0.1:7439", &[]), Ok(()));
        assert_eq!(post("127.0.0.1:7439", &[("origin", "http://127.0.0.1:7439")]), Ok(()));
        assert_eq!(post("LOCALHOST:7439", &[("origin", "http://localhost:7439")]), Ok(()));
        assert_eq!(post("localhost", &[("origin", "http://localhost")]), Ok(()));
        assert_eq!(post("localhost:80", &[("origin", "http://localhost")]), Ok(()));
        assert_eq!(post("[::1]:7439", &[("origin", "http://[::1]:7439")]), Ok(()));
        assert_eq!(
            post("127.0.0.1:7439", &[("origin", "https://platform.internal:8443")]),
            Ok(())
        );
        assert_eq!(post("127.0.0.1:7439", &[("sec-fetch-site", "same-origin")]), Ok(()));
        assert_eq!(post("127.0.0.1:7439", &[("sec-fetch-site", "none")]), Ok(()));
        for origin in [
            "http://evil.example",
            "http://evil.example:7439",
            "null",
            "http://127.0.0.1:3000",
            "http://localhost:7439",
            "file://",
            "chrome-extension://abc",
            "https://127.0.0.1:7439:1",
        ] {
            assert!(
                matches!(
                    post("127.0.0.1:7439", &[("origin", origin)]),
                    Err(EdgeRefusal::Origin(_))
                ),
                "{origin}"
            );
        }
        assert_eq!(
            post("127.0.0.1:7439", &[("sec-fetch-site", "cross-site")]),
            Err(EdgeRefusal::CrossSiteFetch)
        );
        // Reads carry Origin too (fetch, EventSource): not a state change.
        assert_eq!(
            run(
                &policy,
                "GET",
                "/v1/health/stream",
                &[("host", "127.0.0.1:7439"), ("origin", "http://evil.example")]
            ),
            Ok(())
        );
    }

    #[test]
    fn the_content_type_is_judged_before_the_origin() {
        // What a cross-site `text/plain` form post gets: 415, the request's
        // own fault whoever sent it.
        let refusal = run(
            &EdgePolicy::default(),
            "POST",
            "/v1/tasks",
            &[
                ("host", "127.0.0.1:7439"),
                ("origin", "http://evil.example"),
                ("content-type", "text/plain"),
                ("content-length", "30"),
            ],
        )
        .unwrap_err();
        assert_eq!(refusal_problem(&refusal).details().status, 415);
    }

    #[test]
    fn bearer_tokens() {
        let value = |text: &str| HeaderValue::from_str(text).unwrap();
        let tokens = ["submit-secret", "admin-secret"];
        assert!(bearer_matches(Some(&value("Bearer submit-secret")), &tokens));
        assert!(bearer_matches(Some(&value("bearer admin-secret")), &tokens));
        assert!(!bearer_matches(Some(&value("Bearer submit-secre")), &tokens));
        assert!(!bearer_matches(Some(&value("Bearer submit-secretX")), &tokens));
        assert!(!bearer_matches(Some(&value("Basic c3VibWl0LXNlY3JldA==")), &tokens));
        assert!(!bearer_matches(None, &tokens));
        // An unset admin token never matches an empty bearer.
        assert!(!bearer_matches(Some(&value("Bearer ")), &["submit-secret", ""]));
    }
}
