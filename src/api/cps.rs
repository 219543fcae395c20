//! CP read routes (viewer): `GET /api/v1/cps` and `GET /api/v1/cps/{cp}`.
//!
//! A configuration is shown as `ocsync cp show` would write it, so
//! credentials appear only as references (`{"env": "…"}` or `{"file":
//! "…"}`): [`crate::cp::CpConfig`] cannot hold a clear-text password in the
//! first place, and its serializer writes the reference, never a value.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::ApiState;
use super::auth::{Role, require};
use super::problem::{Problem, ProblemDoc};
use crate::cp::{CpId, StoreError, StoredCp, store};

pub fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/cps", get(list))
        .route("/api/v1/cps/{cp}", get(show))
        .route_layer(from_fn_with_state(Role::Viewer, require))
        .with_state(state)
}

/// A CP: its configuration (credentials as references) and bookkeeping.
#[derive(Debug, Serialize, ToSchema)]
pub struct Cp {
    pub id: String,
    pub enabled: bool,
    /// Bumped by every edit (optimistic concurrency).
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The configuration, as `ocsync cp show` prints it.
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
}

/// The CPs, by id.
#[derive(Debug, Serialize, ToSchema)]
pub struct CpList {
    pub cps: Vec<Cp>,
}

fn cp(s: StoredCp) -> Result<Cp, Problem> {
    Ok(Cp {
        id: s.config.id.to_string(),
        enabled: s.config.enabled,
        version: s.version,
        created_at: s.created_at,
        updated_at: s.updated_at,
        config: serde_json::to_value(&s.config)
            .map_err(|e| Problem::internal("showing a CP", &e))?,
    })
}

fn store_problem(e: StoreError) -> Problem {
    match e {
        StoreError::NotFound(id) => Problem::not_found(format!("CP {id} does not exist")),
        e => Problem::internal("reading CPs", &e),
    }
}

struct CpPath(CpId);

impl<S: Send + Sync> FromRequestParts<S> for CpPath {
    type Rejection = Problem;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let Path(cp) = Path::<String>::from_request_parts(parts, state).await?;
        CpId::parse(cp)
            .map(Self)
            .map_err(|e| Problem::invalid(format!("bad CP id: {e}")))
    }
}

/// Every CP.
#[utoipa::path(get, path = "/api/v1/cps", tag = "cps",
    responses((status = 200, description = "The CPs, by id", body = CpList)),
    security(("bearer" = [])))]
async fn list(State(api): State<ApiState>) -> Result<Response, Problem> {
    let cps = store::list(&api.pool).await.map_err(store_problem)?;
    let cps = cps.into_iter().map(cp).collect::<Result<Vec<_>, _>>()?;
    Ok(Json(CpList { cps }).into_response())
}

/// One CP.
#[utoipa::path(get, path = "/api/v1/cps/{cp}", tag = "cps",
    params(("cp" = String, Path, description = "The CP's id")),
    responses(
        (status = 200, description = "The CP", body = Cp),
        (status = 404, description = "No such CP", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Not a CP id", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
async fn show(State(api): State<ApiState>, CpPath(id): CpPath) -> Result<Response, Problem> {
    let stored = store::get(&api.pool, &id).await.map_err(store_problem)?;
    Ok(Json(cp(stored)?).into_response())
}
