//! Request ids: every request gets one, and everything it causes names it.
//!
//! [`assign`] runs outermost: it takes the caller's `X-Request-Id` when it
//! is a sane token (a proxy or the platform may have set it, so one id
//! follows a request across services), and otherwise makes a UUID. The id
//! is put on the request (for the trace layer's span, which every log line
//! the request causes sits in), on the response, and in a task-local that
//! [`super::problem::Problem`] reads, so a refusal's body names the id an
//! operator can find in the log.
//!
//! Invariant: a response from the router always carries `X-Request-Id`,
//! and the id is at most [`MAX_LENGTH`] characters of `[A-Za-z0-9._:-]`
//! (a client cannot put arbitrary text into the log through it).

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

pub static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// Longest caller-supplied id kept; a longer one is replaced.
pub const MAX_LENGTH: usize = 128;

tokio::task_local! {
    static CURRENT: String;
}

/// The id of the request being handled on this task, if any.
pub fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Whether a caller's id is kept as it is.
fn acceptable(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LENGTH
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b':' | b'-'))
}

/// Middleware: see the module comment.
pub async fn assign(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|id| acceptable(id))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let value = HeaderValue::from_str(&id).expect("a request id is a valid header value");
    request.headers_mut().insert(REQUEST_ID_HEADER.clone(), value.clone());
    let mut response = CURRENT.scope(id, next.run(request)).await;
    response.headers_mut().insert(REQUEST_ID_HEADER.clone(), value);
    response
}

/// The span every request runs in (the trace layer's `make_span_with`).
pub fn span_for<B>(request: &axum::http::Request<B>) -> tracing::Span {
    let id = request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %id,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_tokens_are_kept() {
        assert!(acceptable("0b6f1c2e-5d4a-4c1b-9a7e-1f2d3c4b5a69"));
        assert!(acceptable("req_01:edge.7"));
        assert!(!acceptable(""));
        assert!(!acceptable("a b"));
        assert!(!acceptable("line\nbreak"));
        assert!(!acceptable("x=\"quoted\""));
        assert!(!acceptable(&"a".repeat(MAX_LENGTH + 1)));
        assert!(acceptable(&"a".repeat(MAX_LENGTH)));
    }
}
