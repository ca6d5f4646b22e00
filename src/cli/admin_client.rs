//! The CLI's HTTP client for a running taskgate: finds the server and its
//! admin token in the same settings the server reads, and turns every
//! failure into a [`ClientError`] an operator can act on.
//!
//! Invariant: no call waits forever. Connecting, waiting for response
//! headers and every read of a body are each bounded by the client's
//! timeout (reqwest's blocking client applies it per read), so a long
//! export streams as long as data keeps coming but a silent server fails.

use crate::config::Settings;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// Default for `--request-timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the taskgate server at {url}: {reason}\n\
         (is `taskgate serve` running with this configuration? With the server stopped, \
         --offline reads its data directory directly)"
    )]
    Unreachable { url: String, reason: String },
    #[error("the taskgate server at {url} did not answer within {seconds} s")]
    TimedOut { url: String, seconds: u64 },
    #[error(
        "the server refused the request (401 Unauthorized): {detail}\n\
         (set http.admin_token in the --config file or TASKGATE_HTTP__ADMIN_TOKEN to the server's token)"
    )]
    Unauthorized { detail: String },
    #[error("the server refused the request (403 Forbidden): {detail}")]
    Forbidden { detail: String },
    #[error("{}", describe_problem(.0))]
    Problem(Box<ProblemAnswer>),
    #[error("unexpected answer from {url}: {reason}")]
    Decode { url: String, reason: String },
}

/// `Invalid field (422), field expires: ...`: the field is named because a
/// detail from the JSON decoder does not always say which option it is about.
fn describe_problem(problem: &ProblemAnswer) -> String {
    match &problem.field {
        Some(field) => format!(
            "{} ({}), field {field}: {}",
            problem.title, problem.status, problem.detail
        ),
        None => format!("{} ({}): {}", problem.title, problem.status, problem.detail),
    }
}

/// A refusal the server explained with a problem+json body (boxed: it is
/// the large, rare case).
#[derive(Debug)]
pub struct ProblemAnswer {
    pub status: u16,
    pub title: String,
    pub detail: String,
    pub field: Option<String>,
    /// The whole body, for callers that read more than the message.
    pub body: Value,
}

/// Where the CLI reaches the server: `http.listen`, with an unspecified
/// address (`0.0.0.0`, `::`) replaced by loopback.
pub fn server_url(settings: &Settings) -> String {
    let listen = settings.http.listen;
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

pub struct AdminClient {
    base_url: String,
    token: Option<String>,
    timeout: Duration,
    http: reqwest::blocking::Client,
}

impl AdminClient {
    /// A client for the server `settings` describe, or for `server` when
    /// given (a base URL such as `http://10.0.0.5:7439`).
    pub fn new(settings: &Settings, server: Option<&str>, timeout: Duration) -> Result<Self, ClientError> {
        let base_url = server
            .map(|url| url.trim_end_matches('/').to_owned())
            .unwrap_or_else(|| server_url(settings));
        let token = Some(settings.http.admin_token.trim().to_owned()).filter(|token| !token.is_empty());
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .timeout(timeout)
            .user_agent(concat!("taskgate-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| ClientError::Unreachable {
                url: base_url.clone(),
                reason: format!("cannot build an HTTP client: {error}"),
            })?;
        Ok(Self {
            base_url,
            token,
            timeout,
            http,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        let builder = self.http.request(method, self.url(path));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    fn transport_error(&self, path: &str, error: reqwest::Error) -> ClientError {
        let url = self.url(path);
        if error.is_timeout() {
            ClientError::TimedOut {
                url,
                seconds: self.timeout.as_secs(),
            }
        } else {
            // The innermost cause says what happened (connection refused).
            let mut reason = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                reason = cause.to_string();
                source = cause.source();
            }
            ClientError::Unreachable { url, reason }
        }
    }

    /// Sends, and turns a non-success status into the problem it carries.
    fn send(
        &self,
        path: &str,
        request: reqwest::blocking::RequestBuilder,
    ) -> Result<reqwest::blocking::Response, ClientError> {
        let response = request.send().map_err(|error| self.transport_error(path, error))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body: Value = response
            .text()
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok().or(Some(Value::String(text))))
            .unwrap_or(Value::Null);
        let text = |key: &str| body.get(key).and_then(Value::as_str).map(str::to_owned);
        let detail = text("detail")
            .or_else(|| body.as_str().map(str::to_owned))
            .unwrap_or_default();
        Err(match status {
            401 => ClientError::Unauthorized { detail },
            403 => ClientError::Forbidden { detail },
            _ => ClientError::Problem(Box::new(ProblemAnswer {
                status,
                title: text("title").unwrap_or_else(|| format!("HTTP {status}")),
                detail,
                field: text("field"),
                body,
            })),
        })
    }

    fn decode<T: DeserializeOwned>(&self, path: &str, response: reqwest::blocking::Response) -> Result<T, ClientError> {
        let text = response.text().map_err(|error| self.transport_error(path, error))?;
        serde_json::from_str(&text).map_err(|error| ClientError::Decode {
            url: self.url(path),
            reason: error.to_string(),
        })
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self.send(path, self.request(reqwest::Method::GET, path))?;
        self.decode(path, response)
    }

    /// GET that also hands back non-success answers that carry a JSON body
    /// (`/v1/health` answers 503 with the report when failing).
    pub fn get_with_status(&self, path: &str) -> Result<(u16, Value), ClientError> {
        match self.get::<Value>(path) {
            Ok(body) => Ok((200, body)),
            Err(ClientError::Problem(answer)) if answer.body.is_object() => Ok((answer.status, answer.body)),
            Err(other) => Err(other),
        }
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self.send(path, self.request(reqwest::Method::POST, path))?;
        self.decode(path, response)
    }

    pub fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
        headers: &[(&str, &str)],
    ) -> Result<T, ClientError> {
        let mut request = self.request(reqwest::Method::POST, path).json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = self.send(path, request)?;
        self.decode(path, response)
    }

    pub fn post_ndjson<T: DeserializeOwned>(&self, path: &str, body: Vec<u8>) -> Result<T, ClientError> {
        let request = self
            .request(reqwest::Method::POST, path)
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .body(body);
        let response = self.send(path, request)?;
        self.decode(path, response)
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self.send(path, self.request(reqwest::Method::DELETE, path))?;
        self.decode(path, response)
    }

    /// A streaming GET: the caller reads the body (each read bounded by
    /// the timeout).
    pub fn get_stream(&self, path: &str) -> Result<reqwest::blocking::Response, ClientError> {
        self.send(path, self.request(reqwest::Method::GET, path))
    }

    /// Turns a read error of a streamed body into a client error.
    pub fn stream_error(&self, path: &str, error: std::io::Error) -> ClientError {
        ClientError::Unreachable {
            url: self.url(path),
            reason: format!("the stream broke off: {error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_listen_addresses_are_reached_over_loopback() {
        let mut settings = Settings::default();
        assert_eq!(server_url(&settings), "http://127.0.0.1:7439");
        settings.http.listen = "0.0.0.0:9000".parse().unwrap();
        assert_eq!(server_url(&settings), "http://127.0.0.1:9000");
        settings.http.listen = "[::]:9000".parse().unwrap();
        assert_eq!(server_url(&settings), "http://[::1]:9000");
        settings.http.listen = "10.1.2.3:9000".parse().unwrap();
        assert_eq!(server_url(&settings), "http://10.1.2.3:9000");
    }

    #[test]
    fn an_unreachable_server_is_named_with_a_hint() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let mut settings = Settings::default();
        settings.http.listen = address;
        let client = AdminClient::new(&settings, None, Duration::from_secs(2)).unwrap();
        let error = client.get::<Value>("/v1/outbox").unwrap_err();
        assert!(matches!(error, ClientError::Unreachable { .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains(&address.to_string()) && message.contains("--offline"),
            "{message}"
        );
    }
}
