//! Intake: turns a caller's [`TaskRequest`] into an accepted [`Task`].
//!
//! Every check that can refuse a task happens here, before anything is
//! written: field values, the registry's parameter binding, and routing (a
//! task no queue would receive is refused, since nobody would consume it).
//! Each refusal names the field it is about, for the problem body.

use super::registry::{BindError, Registry};
use super::routing::{self, TopicRouter};
use super::{Task, TaskId, TaskName, TaskRequest};
use chrono::{DateTime, Utc};

/// Why a request was refused; always a client error (HTTP 422).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct IntakeError {
    /// JSON path of the offending field (`args`, `kwargs.output_type`).
    pub field: Option<String>,
    pub message: String,
    pub kind: IntakeErrorKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntakeErrorKind {
    InvalidField,
    UnknownTask,
    Binding,
    Unroutable,
}

impl IntakeError {
    fn field(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.to_owned()),
            message: message.into(),
            kind: IntakeErrorKind::InvalidField,
        }
    }
}

impl From<BindError> for IntakeError {
    fn from(error: BindError) -> Self {
        let (kind, field) = match &error {
            BindError::UnknownTask { .. } => (IntakeErrorKind::UnknownTask, Some("task".to_owned())),
            BindError::TooManyPositional { .. } => (IntakeErrorKind::Binding, Some("args".to_owned())),
            BindError::MissingArgument { parameter, .. } => {
                (IntakeErrorKind::Binding, Some(format!("kwargs.{parameter}")))
            }
            BindError::UnexpectedKeyword { parameter, .. } | BindError::MultipleValues { parameter, .. } => {
                (IntakeErrorKind::Binding, Some(format!("kwargs.{parameter}")))
            }
        };
        Self {
            field,
            message: error.to_string(),
            kind,
        }
    }
}

/// Validates, binds and routes one request received at `now`.
pub fn accept(
    request: TaskRequest,
    registry: &Registry,
    router: &TopicRouter,
    now: DateTime<Utc>,
) -> Result<Task, IntakeError> {
    let name = TaskName::parse(&request.task).map_err(|message| IntakeError::field("task", message))?;
    let id = match &request.id {
        Some(text) => TaskId::parse(text).map_err(|_| IntakeError::field("id", format!("{text:?} is not a UUID")))?,
        None => TaskId::generate(),
    };
    let binding = registry.bind(&name, &request.args, &request.kwargs)?;
    let routing_key = match (&request.routing_key, binding.routing_key) {
        (Some(key), _) => {
            routing::validate_routing_key(key).map_err(|message| IntakeError::field("routing_key", message))?;
            key.clone()
        }
        (None, Some(registered)) => registered,
        (None, None) => routing::default_routing_key(&name),
    };
    let queues = router.route(&routing_key);
    if queues.is_empty() {
        return Err(IntakeError {
            field: Some("routing_key".into()),
            message: format!(
                "no configured queue is bound to routing key {routing_key:?} on exchange {:?}, so no worker would receive this task",
                router.exchange()
            ),
            kind: IntakeErrorKind::Unroutable,
        });
    }
    let eta = match (request.eta, request.countdown) {
        (Some(_), Some(_)) => {
            return Err(IntakeError::field(
                "countdown",
                "give either eta or countdown, not both",
            ))
        }
        (Some(eta), None) => Some(eta),
        (None, Some(countdown)) => {
            if !countdown.is_finite() || countdown < 0.0 {
                return Err(IntakeError::field(
                    "countdown",
                    "must be a non-negative number of seconds",
                ));
            }
            // A countdown past chrono's calendar (about 262,000 years) is
            // refused rather than overflowing the clock (a panic).
            let eta = chrono::Duration::try_milliseconds((countdown * 1000.0) as i64)
                .and_then(|delay| now.checked_add_signed(delay))
                .ok_or_else(|| IntakeError::field("countdown", "is too far in the future"))?;
            Some(eta)
        }
        (None, None) => None,
    };
    for (field, value) in [
        ("time_limit", request.time_limit),
        ("soft_time_limit", request.soft_time_limit),
    ] {
        if let Some(value) = value {
            if !value.is_finite() || value <= 0.0 {
                return Err(IntakeError::field(field, "must be a positive number of seconds"));
            }
        }
    }
    for (field, value) in [
        ("parent_id", &request.parent_id),
        ("root_id", &request.root_id),
        ("group", &request.group),
    ] {
        if let Some(value) = value {
            if value.is_empty() || value.len() > 255 {
                return Err(IntakeError::field(field, "must be 1 to 255 bytes"));
            }
        }
    }
    Ok(Task {
        id,
        task: name,
        args: request.args,
        kwargs: request.kwargs,
        routing_key,
        queues,
        eta,
        expires: request.expires,
        priority: request.priority,
        parent_id: request.parent_id,
        root_id: request.root_id,
        group: request.group,
        time_limit: request.time_limit,
        soft_time_limit: request.soft_time_limit,
        properties: request.properties,
        accepted_at: now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::registry::{RegisteredTaskSettings, RegistrySettings};
    use crate::task::routing::{QueueBindingSettings, RoutingSettings};
    use serde_json::json;

    fn router() -> TopicRouter {
        TopicRouter::from_settings(&RoutingSettings {
            exchange: "task_exchange".into(),
            queues: vec![QueueBindingSettings {
                name: "export".into(),
                binding_key: "export".into(),
            }],
        })
        .unwrap()
    }

    fn registry() -> Registry {
        Registry::from_settings(&RegistrySettings {
            strict: true,
            tasks: vec![RegisteredTaskSettings {
                name: "export.project".into(),
                params: vec!["org_slug".into(), "project_slug".into(), "output_type?".into()],
                routing_key: None,
            }],
        })
        .unwrap()
    }

    fn request(value: serde_json::Value) -> TaskRequest {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn routes_by_task_name_prefix() {
        let task = accept(
            request(json!({"task": "export.project", "args": ["o", "p"]})),
            &registry(),
            &router(),
            Utc::now(),
        )
        .unwrap();
        assert_eq!(task.routing_key, "export");
        assert_eq!(task.queues.len(), 1);
    }

    #[test]
    fn binding_errors_name_the_parameter() {
        let error = accept(
            request(json!({"task": "export.project", "args": ["o"]})),
            &registry(),
            &router(),
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!(error.field.as_deref(), Some("kwargs.project_slug"));
        assert_eq!(error.kind, IntakeErrorKind::Binding);
    }

    #[test]
    fn unroutable_and_unknown_are_refused() {
        let error = accept(
            request(json!({"task": "export.project", "args": ["o", "p"], "routing_key": "nowhere"})),
            &registry(),
            &router(),
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!(error.kind, IntakeErrorKind::Unroutable);
        let error = accept(
            request(json!({"task": "other.task"})),
            &registry(),
            &router(),
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!(error.kind, IntakeErrorKind::UnknownTask);
    }

    #[test]
    fn countdown_becomes_eta_and_conflicts_with_eta() {
        let now = Utc::now();
        let task = accept(
            request(json!({"task": "export.project", "args": ["o", "p"], "countdown": 10})),
            &registry(),
            &router(),
            now,
        )
        .unwrap();
        assert_eq!(task.eta, Some(now + chrono::Duration::seconds(10)));
        let error = accept(
            request(
                json!({"task": "export.project", "args": ["o", "p"], "countdown": 1, "eta": "2030-01-01T00:00:00Z"}),
            ),
            &registry(),
            &router(),
            now,
        )
        .unwrap_err();
        assert_eq!(error.field.as_deref(), Some("countdown"));
    }

    #[test]
    fn bad_client_id_is_refused() {
        let error = accept(
            request(json!({"task": "export.project", "args": ["o", "p"], "id": "nope"})),
            &registry(),
            &router(),
            Utc::now(),
        )
        .unwrap_err();
        assert_eq!(error.field.as_deref(), Some("id"));
    }
}
