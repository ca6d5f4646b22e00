//! The one place that decides whether a publish failure is worth retrying.
//!
//! Transient failures (no connection, timeouts, `nack`, a closed channel,
//! throttling) keep the task at the head of its lane and count against the
//! circuit breaker. A message that never left taskgate (no connection, a
//! blocked connection, or not handed over because one before it failed) is
//! [`PublishError::Unsent`]: retried like any transient failure, but not
//! counted as an attempt on the task. Permanent failures (unroutable with `mandatory`, a message the
//! broker will never take, access denied, a missing queue that we may not
//! create) move the task to the dead letters: retrying cannot help, and it
//! must not block the tasks behind it.
//!
//! SQS errors are sorted into an [`SqsErrorClass`] first ([`classify_sqs_code`],
//! [`SqsFailure::from_sdk`]), because the SQS publisher needs more than
//! retryable-or-not: whether SQS answered at all (connection status), and
//! whether a missing queue may be created. [`SqsFailure::to_publish_error`]
//! then decides retryable or permanent.

use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// The dead-letter reason of a task whose `expires` passed before it could
/// be published (`GET /v1/tasks/{id}`'s `last_error`, `taskgate dead-letters`).
pub const EXPIRED: &str = "expired";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Transient(String),
    /// Transient, and nothing was sent (no connection, or held back).
    #[error("{0}")]
    Unsent(String),
    #[error("{0}")]
    Permanent(String),
    /// The task's `expires` passed before it was encoded: never sent, and
    /// dead-lettered as [`EXPIRED`] without counting an attempt (RabbitMQ
    /// would drop it at once with `expiration: "0"`, and a worker would
    /// discard it).
    #[error("expired")]
    Expired,
}

impl PublishError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, PublishError::Transient(_) | PublishError::Unsent(_))
    }

    pub fn not_connected(detail: Option<&str>) -> Self {
        match detail {
            Some(detail) => Self::Unsent(format!("not connected to the broker: {detail}")),
            None => Self::Unsent("not connected to the broker".into()),
        }
    }

    pub fn timed_out(what: &str, after: std::time::Duration) -> Self {
        Self::Transient(format!("{what} timed out after {} ms", after.as_millis()))
    }

    /// Classifies an AMQP client error. Channel-level 403 (access refused)
    /// and 404 (no such exchange) cannot be cured by retrying the same
    /// message; everything else (I/O, closed connections, protocol hiccups)
    /// can.
    pub fn from_amqp(error: &lapin::Error) -> Self {
        let text = error.to_string();
        let lowered = text.to_ascii_lowercase();
        if lowered.contains("access_refused") || lowered.contains("access-refused") {
            Self::Permanent(format!("access refused by the broker: {text}"))
        } else {
            Self::Transient(format!("AMQP error: {text}"))
        }
    }

    /// A message the broker returned as unroutable (`mandatory`).
    pub fn unroutable(exchange: &str, routing_key: &str, reply: &str) -> Self {
        Self::Permanent(format!(
            "unroutable: exchange {exchange:?} has no queue bound for routing key {routing_key:?} ({reply})"
        ))
    }

    /// Whether `task` expired by `now` and must not be sent.
    /// Less than a millisecond left counts: Celery's `expiration` would
    /// round it to `"0"`. A publisher encodes with the same `now`
    /// ([`crate::celery::encode_at`]), so a task that passes this check is
    /// never sent with `expiration: "0"`.
    pub fn has_expired(task: &crate::task::Task, now: chrono::DateTime<chrono::Utc>) -> bool {
        task.expires
            .is_some_and(|expires| expires < now + chrono::Duration::milliseconds(1))
    }

    /// RabbitMQ's refusal of a message over its `max_message_size`: it
    /// closes the channel with `PRECONDITION_FAILED - message size N is
    /// larger than configured max size M`, so every message in flight on
    /// the channel gets that error. Returns (N, M): only the message whose
    /// body is N bytes is the one refused.
    pub fn broker_refused_size(&self) -> Option<(usize, usize)> {
        let Self::Transient(text) = self else {
            return None;
        };
        let (_, rest) = text.split_once("message size ")?;
        let (size, rest) = rest.split_once(" is larger than configured max size ")?;
        let limit: String = rest.chars().take_while(char::is_ascii_digit).collect();
        Some((size.parse().ok()?, limit.parse().ok()?))
    }

    pub fn too_large(size: usize, limit: usize) -> Self {
        Self::Permanent(format!(
            "message of {size} bytes exceeds the broker's limit of {limit} bytes"
        ))
    }
}

/// What an SQS error means for the tasks it concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqsErrorClass {
    /// No usable answer: refused, reset, timed out, a server error, or a
    /// KMS key that is disabled or missing (queue configuration an operator
    /// can fix). Retried.
    Unavailable,
    /// SQS (or KMS) asked us to slow down. Retried.
    Throttled,
    /// Credentials refused or expired. Retried, never dead-lettered:
    /// credentials rotate (instance roles, STS), and every task would fail
    /// the same way until they do.
    Unauthenticated,
    /// IAM or KMS policy denies the action. Permanent.
    AccessDenied,
    /// The queue does not exist (or its URL is no longer valid). Retried
    /// when taskgate may create queues, else permanent.
    QueueMissing,
    /// SQS refused the request for what it contains (a sender fault such as
    /// a message that is too long or has invalid characters). Permanent:
    /// the same message will be refused again.
    Rejected,
}

/// SQS error codes arrive in two spellings: the JSON protocol's short name
/// and the query protocol's `AWS.SimpleQueueService.` one (SQS sends the
/// latter in `x-amzn-query-error`, which the SDK prefers).
const SQS_CODE_PREFIX: &str = "AWS.SimpleQueueService.";

/// Classifies an SQS error code, as found on a failed call or on one failed
/// entry of `SendMessageBatch`. `sender_fault` is SQS's own verdict (the
/// entry's `SenderFault`, or a 4xx status for a whole call); it decides
/// codes this function does not know.
pub fn classify_sqs_code(code: &str, sender_fault: bool) -> SqsErrorClass {
    let code = code.strip_prefix(SQS_CODE_PREFIX).unwrap_or(code);
    match code {
        "NonExistentQueue" | "QueueDoesNotExist" | "InvalidAddress" => SqsErrorClass::QueueMissing,
        "AccessDenied" | "AccessDeniedException" | "KMS.AccessDeniedException" | "KmsAccessDenied" => {
            SqsErrorClass::AccessDenied
        }
        "RequestThrottled"
        | "ThrottlingException"
        | "Throttling"
        | "ThrottledException"
        | "TooManyRequestsException"
        | "RequestLimitExceeded"
        | "SlowDown"
        | "OverLimit"
        | "KMS.ThrottlingException"
        | "KmsThrottled"
        // CreateQueue within 60 s of deleting a queue of that name.
        | "QueueDeletedRecently" => SqsErrorClass::Throttled,
        "InvalidClientTokenId"
        | "UnrecognizedClientException"
        | "SignatureDoesNotMatch"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "InvalidAccessKeyId"
        | "ExpiredToken"
        | "ExpiredTokenException"
        | "RequestExpired"
        | "InvalidSecurity" => SqsErrorClass::Unauthenticated,
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "RequestTimeout" | "RequestTimeoutException" => {
            SqsErrorClass::Unavailable
        }
        // The queue's KMS key is disabled, missing or misconfigured: every
        // message fails alike until an operator fixes the queue.
        kms if kms.starts_with("KMS.") || kms.starts_with("Kms") => SqsErrorClass::Unavailable,
        _ if sender_fault => SqsErrorClass::Rejected,
        _ => SqsErrorClass::Unavailable,
    }
}

/// One failed SQS call or batch entry: its class and a readable account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqsFailure {
    pub class: SqsErrorClass,
    pub detail: String,
}

impl SqsFailure {
    pub fn new(class: SqsErrorClass, detail: impl Into<String>) -> Self {
        Self {
            class,
            detail: detail.into(),
        }
    }

    /// Classifies a failed SDK call (`operation` names it in the detail).
    /// Anything without an SQS error code (connect refused, reset, timeout,
    /// an unparsable answer) is [`SqsErrorClass::Unavailable`].
    pub fn from_sdk<E>(operation: &str, error: &SdkError<E>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        match error {
            SdkError::ServiceError(_) => {
                let status = error.raw_response().map(|response| response.status().as_u16());
                let code = error.as_service_error().and_then(|service| service.code());
                let message = error
                    .as_service_error()
                    .and_then(|service| service.message())
                    .unwrap_or("");
                let class = match (code, status) {
                    (Some(code), status) => classify_sqs_code(code, status.is_some_and(|s| (400..500).contains(&s))),
                    (None, Some(429)) => SqsErrorClass::Throttled,
                    // No code: not a well-formed SQS answer (a proxy's error
                    // page, say); never grounds to drop a message.
                    (None, _) => SqsErrorClass::Unavailable,
                };
                let status = status.map(|s| format!(" (HTTP {s})")).unwrap_or_default();
                Self::new(
                    class,
                    format!("{operation}: {}: {message}{status}", code.unwrap_or("unknown error")),
                )
            }
            SdkError::TimeoutError(_) => Self::new(SqsErrorClass::Unavailable, format!("{operation} timed out")),
            other => Self::new(
                SqsErrorClass::Unavailable,
                format!("{operation}: {}", DisplayErrorContext(other)),
            ),
        }
    }

    /// Whether this failure says something about reaching SQS (and so
    /// belongs in the connection status). A message SQS refused says the
    /// opposite: SQS is there and answering.
    pub fn affects_connection(&self) -> bool {
        self.class != SqsErrorClass::Rejected
    }

    /// The publish result for a task this failure concerns. `queue` is the
    /// SQS queue name; `may_create_queue` is `broker.create_queues`.
    pub fn to_publish_error(&self, queue: &str, may_create_queue: bool) -> PublishError {
        let detail = &self.detail;
        match self.class {
            SqsErrorClass::Unavailable | SqsErrorClass::Throttled | SqsErrorClass::Unauthenticated => {
                PublishError::Transient(format!("SQS queue {queue}: {detail}"))
            }
            SqsErrorClass::QueueMissing if may_create_queue => PublishError::Transient(format!(
                "SQS queue {queue} does not exist yet (it will be created): {detail}"
            )),
            SqsErrorClass::QueueMissing => PublishError::Permanent(format!(
                "SQS queue {queue} does not exist and broker.create_queues is off: {detail}"
            )),
            SqsErrorClass::AccessDenied => {
                PublishError::Permanent(format!("access denied to SQS queue {queue}: {detail}"))
            }
            SqsErrorClass::Rejected => {
                PublishError::Permanent(format!("SQS queue {queue} refused the message: {detail}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_and_permanent_are_told_apart() {
        assert!(PublishError::not_connected(None).is_retryable());
        assert!(PublishError::timed_out("confirm", std::time::Duration::from_secs(1)).is_retryable());
        assert!(!PublishError::unroutable("x", "y", "312 NO_ROUTE").is_retryable());
        assert!(!PublishError::too_large(2, 1).is_retryable());
    }

    /// The text lapin gives for RabbitMQ's channel close over a message
    /// too large (as captured from RabbitMQ 3.10 with max_message_size
    /// lowered to 1 MiB).
    #[test]
    fn rabbitmq_refusing_a_message_for_its_size_is_recognised() {
        let error = PublishError::Transient(
            "AMQP error: protocol error: AMQP soft error: PRECONDITION-FAILED: PRECONDITION_FAILED - message \
             size 1500094 is larger than configured max size 1048576"
                .into(),
        );
        assert_eq!(error.broker_refused_size(), Some((1_500_094, 1_048_576)));
        assert_eq!(
            PublishError::Transient("AMQP error: connection reset".into()).broker_refused_size(),
            None
        );
        assert_eq!(PublishError::too_large(2, 1).broker_refused_size(), None);
    }

    #[test]
    fn sqs_codes_are_classified_in_both_spellings() {
        use SqsErrorClass::*;
        assert_eq!(
            classify_sqs_code("AWS.SimpleQueueService.NonExistentQueue", true),
            QueueMissing
        );
        assert_eq!(classify_sqs_code("QueueDoesNotExist", true), QueueMissing);
        assert_eq!(classify_sqs_code("RequestThrottled", true), Throttled);
        assert_eq!(classify_sqs_code("KMS.ThrottlingException", true), Throttled);
        assert_eq!(classify_sqs_code("AccessDenied", true), AccessDenied);
        assert_eq!(classify_sqs_code("KMS.AccessDeniedException", true), AccessDenied);
        assert_eq!(classify_sqs_code("InvalidClientTokenId", true), Unauthenticated);
        assert_eq!(classify_sqs_code("KMS.DisabledException", true), Unavailable);
        assert_eq!(classify_sqs_code("InternalError", false), Unavailable);
        assert_eq!(classify_sqs_code("InvalidParameterValue", true), Rejected);
        assert_eq!(
            classify_sqs_code("AWS.SimpleQueueService.BatchRequestTooLong", true),
            Rejected
        );
        assert_eq!(classify_sqs_code("SomethingNew", false), Unavailable);
        assert_eq!(classify_sqs_code("SomethingNew", true), Rejected);
    }

    #[test]
    fn throttling_is_retryable_and_access_denied_and_missing_queues_are_not() {
        use SqsErrorClass::*;
        let retryable = |class, may_create_queue| {
            SqsFailure::new(class, "detail")
                .to_publish_error("q", may_create_queue)
                .is_retryable()
        };
        assert!(retryable(Throttled, false));
        assert!(retryable(Unavailable, false));
        assert!(retryable(Unauthenticated, false));
        assert!(!retryable(AccessDenied, true));
        assert!(!retryable(Rejected, true));
        assert!(!retryable(QueueMissing, false));
        // With create_queues on, the next round creates it.
        assert!(retryable(QueueMissing, true));
        assert!(!SqsFailure::new(Rejected, "bad message").affects_connection());
        assert!(SqsFailure::new(Throttled, "slow down").affects_connection());
    }
}
