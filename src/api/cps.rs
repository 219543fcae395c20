//! CP routes: reading (viewer) `GET /api/v1/cps` and `GET /api/v1/cps/{cp}`;
//! editing (admin) `PUT /api/v1/cps/{cp}?expected_version=N`, whose body is
//! the configuration as TOML (`Content-Type: application/toml`), exactly
//! what `ocsync cp show` prints and `ocsync cp edit` reads.
//!
//! A configuration is shown as `ocsync cp show` would write it, so
//! credentials appear only as references (`{"env": "…"}` or `{"file":
//! "…"}`): [`crate::cp::CpConfig`] cannot hold a clear-text password in the
//! first place, and its serializer writes the reference, never a value.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::ApiState;
use super::auth::{Role, require};
use super::problem::{Problem, ProblemDoc};
use crate::cp::{CpConfig, CpId, StoreError, StoredCp, store};

pub fn routes(state: ApiState) -> Router {
    let read = Router::new()
        .route("/api/v1/cps", get(list))
        .route("/api/v1/cps/{cp}", get(show))
        .route_layer(from_fn_with_state(Role::Viewer, require))
        .with_state(state.clone());
    let edit = Router::new()
        .route("/api/v1/cps/{cp}", put(update))
        .route_layer(from_fn_with_state(Role::Admin, require))
        .with_state(state);
    read.merge(edit)
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

/// The version the edit started from (optimistic concurrency).
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EditQuery {
    /// The `version` the configuration had when it was read (as `GET`
    /// shows it); a different current version is refused with 409.
    #[param(minimum = 1)]
    expected_version: i32,
}

/// Whether the content type is TOML: `application/toml`, or `text/plain`
/// for clients that know no better (a missing one is tolerated).
fn is_toml(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .map(|v| {
            let essence = v
                .to_str()
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            essence == "application/toml" || essence == "text/plain"
        })
        .unwrap_or(true)
}

/// The status of the run in the way, read afresh (it may have ended since).
async fn run_status(api: &ApiState, run: &str) -> String {
    sqlx::query_scalar("SELECT status FROM ocsync.import_logs WHERE run_id = $1")
        .bind(run)
        .fetch_optional(&api.pool)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| "ended".to_owned())
}

/// Replaces a CP's configuration (admin).
///
/// The body is the whole configuration as TOML, as `ocsync cp show`
/// prints it; credentials must be references (`{ env = "…" }` or
/// `{ file = "…" }`). Its `id` must be the one in the path. Refused while
/// the CP has a queued or running run.
#[utoipa::path(put, path = "/api/v1/cps/{cp}", tag = "cps",
    params(("cp" = String, Path, description = "The CP's id"), EditQuery),
    request_body(
        description = "The CP configuration as TOML (credentials as references only); `text/plain` is taken as TOML too",
        content((String = "application/toml"), (String = "text/plain")),
    ),
    responses(
        (status = 200, description = "The stored CP, with its new version", body = Cp),
        (status = 400, description = "The body could not be read (not UTF-8)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such CP", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "The CP was changed since `expected_version` (`version-conflict`, with `current_version`) or has an active run (`active-run`, with `run_id` and `run_status`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 415, description = "Body is neither application/toml nor text/plain", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Bad TOML (line, column and key named), an id other than the path's, a bad CP id or a missing `expected_version`", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
async fn update(
    State(api): State<ApiState>,
    CpPath(id): CpPath,
    query: Result<Query<EditQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let Query(EditQuery { expected_version }) = query?;
    if !is_toml(&headers) {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Expected application/toml",
            "send the configuration as application/toml",
        ));
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::too_large("the request body is larger than the server accepts")
        } else {
            Problem::bad_request("the request body could not be read")
        }
    })?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| Problem::bad_request("the configuration is not UTF-8 text"))?;
    // The message names line, column and key; the model never echoes a
    // credential value (it only accepts references).
    let config = CpConfig::from_toml(text, "body")
        .map_err(|e| Problem::invalid(format!("bad configuration: {e}")))?;
    if config.id != id {
        return Err(Problem::invalid(format!(
            "the configuration's id {} is not the CP in the path ({id})",
            config.id
        )));
    }
    match store::update(&api.pool, &config, expected_version).await {
        Ok(stored) => Ok(Json(cp(stored)?).into_response()),
        Err(StoreError::NotFound(id)) => Err(Problem::not_found(format!("CP {id} does not exist"))),
        Err(StoreError::VersionConflict {
            id,
            expected,
            actual,
        }) => Err(Problem::version_conflict(&id, expected, actual)),
        Err(StoreError::ActiveRun { id, run }) => {
            let status = run_status(&api, &run).await;
            Err(Problem::active_run(&id, &run, &status))
        }
        Err(e) => Err(Problem::internal("updating a CP", &e)),
    }
}
