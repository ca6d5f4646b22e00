//! `GET /v1/topology`: what Celery workers must match ([`crate::topology`]),
//! for `taskgate_client.worker.configure`. `?format=celery` answers the
//! Celery settings instead of the topology document.
//!
//! Not behind the admin token: it holds no secret (passwords are masked or
//! left out) and changes nothing, like the health document.

use super::problem::Problem;
use super::AppState;
use crate::topology::Topology;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyQuery {
    #[serde(default)]
    format: TopologyFormat,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum TopologyFormat {
    #[default]
    Topology,
    Celery,
}

pub async fn topology(
    State(state): State<AppState>,
    query: Result<Query<TopologyQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    let Query(query) = query.map_err(|rejection| {
        Problem::invalid_field(Some("format".into()), format!("{rejection}: use topology or celery"))
    })?;
    let topology = Topology::from_settings(&state.settings);
    Ok(Json(match query.format {
        TopologyFormat::Topology => serde_json::to_value(&topology).expect("the topology serializes"),
        TopologyFormat::Celery => topology.celery_settings(),
    }))
}
