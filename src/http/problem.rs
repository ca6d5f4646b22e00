//! RFC 9457 problem details: the only error body the HTTP API sends.
//!
//! Every refusal is built here, so every 4xx/5xx carries
//! `application/problem+json` with a stable `type`, a `title`, a `detail`
//! a person can act on, for input errors the field concerned, and the
//! request's id ([`super::request_id`]) to find it in the log.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// A problem response. Boxed so `Result<_, Problem>` stays small on the
/// success path.
#[derive(Debug, Clone)]
pub struct Problem(Box<ProblemDetails>);

/// RFC 9457 problem details: every 4xx and 5xx body.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(as = Problem)]
pub struct ProblemDetails {
    /// A stable URN, `urn:taskgate:problem:<slug>`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// What went wrong, in words a person can act on.
    pub detail: String,
    /// The request field concerned, as a path (`kwargs.output_type`, `tasks[2].args`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(required = false, inline)]
    pub errors: Vec<FieldError>,
    /// The request's `X-Request-Id`, as in the log lines it caused.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    pub request_id: Option<String>,
    #[serde(skip)]
    pub retry_after_seconds: Option<u64>,
}

impl Problem {
    pub fn new(status: StatusCode, slug: &str, title: &str, detail: impl Into<String>) -> Self {
        Self(Box::new(ProblemDetails {
            kind: format!("urn:taskgate:problem:{slug}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            field: None,
            errors: Vec::new(),
            request_id: None,
            retry_after_seconds: None,
        }))
    }

    pub fn details(&self) -> &ProblemDetails {
        &self.0
    }

    pub fn with_field(mut self, field: Option<String>) -> Self {
        if let Some(field) = &field {
            let message = self.0.detail.clone();
            self.0.errors.push(FieldError {
                field: field.clone(),
                message,
            });
        }
        self.0.field = field;
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.0.retry_after_seconds = Some(seconds);
        self
    }

    pub fn malformed_json(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed-json", "Malformed JSON", detail)
    }

    pub fn invalid_field(field: Option<String>, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-field",
            "Invalid field",
            detail,
        )
        .with_field(field)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut details = self.0;
        details.request_id = super::request_id::current();
        let status = StatusCode::from_u16(details.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = details.retry_after_seconds;
        let body = serde_json::to_vec(&details).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_CONTENT_TYPE));
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
