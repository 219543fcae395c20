//! The runs API (axum), mounted by `crate::api`:
//!
//! | route | answer |
//! | --- | --- |
//! | `POST /api/v1/cps/{cp}/runs` | 201 with the run; 409 `{error, run_id, status}` when the CP has an active run; 404 unknown CP; 422 bad mode or subjects |
//! | `GET /api/v1/runs?cp=&status=&limit=` | the Import Logs, newest first |
//! | `GET /api/v1/runs/{id}` | one run: mode, trigger, requester, timings, progress, counts, error count |
//! | `POST /api/v1/runs/{id}/abort` | 200 with the run (Aborted, or still In Progress while it stops); 404 |
//! | `GET /api/v1/runs/{id}/errors.csv` | the error report (`text/csv`) |
//!
//! Enqueue body: `{"mode": "incremental" | "all" | "subjects", "subjects":
//! ["SS_1", …] or "SS_1, SS_2", "requested_by": "…"}`, all optional
//! (incremental by default).
//!
//! Handlers parse, call [`super`], and shape the answer; no rules here.

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;

use super::{AbortError, EnqueueError, EnqueueRequest, RunFilter, RunStatus, Trigger, runs};
use crate::sync::{Mode, parse_subject_list};

#[derive(Clone)]
struct RunsApi {
    pool: PgPool,
    max_attempts: u32,
}

/// The runs routes, with their own state.
pub fn routes(pool: PgPool, max_attempts: u32) -> Router {
    Router::new()
        .route("/api/v1/cps/{cp}/runs", post(enqueue))
        .route("/api/v1/runs", get(list))
        .route("/api/v1/runs/{id}", get(show))
        .route("/api/v1/runs/{id}/abort", post(abort))
        .route("/api/v1/runs/{id}/errors.csv", get(errors_csv))
        .with_state(RunsApi { pool, max_attempts })
}

fn problem(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "runs API failed");
    problem(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

#[derive(Deserialize, Default)]
struct EnqueueBody {
    mode: Option<String>,
    subjects: Option<Value>,
    requested_by: Option<String>,
}

async fn enqueue(
    State(api): State<RunsApi>,
    Path(cp): Path<String>,
    body: Option<Json<EnqueueBody>>,
) -> Response {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let subjects = match body.subjects {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => parse_subject_list(&s),
        Some(Value::Array(a)) => {
            let mut list = Vec::new();
            for v in a {
                match v {
                    Value::String(s) => list.push(s),
                    _ => {
                        return problem(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "subjects must be strings",
                        );
                    }
                }
            }
            list
        }
        Some(_) => {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "subjects must be a list of strings or one string separated by commas, tabs or newlines",
            );
        }
    };
    let mode = match body.mode.as_deref().unwrap_or("incremental") {
        "incremental" => Mode::Incremental,
        "all" => Mode::All,
        "subjects" => Mode::Subjects { subjects },
        other => {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("unknown mode {other:?}: expected incremental, all or subjects"),
            );
        }
    };
    let req = EnqueueRequest {
        cp: cp.clone(),
        mode,
        trigger: Trigger::User,
        requested_by: Some(body.requested_by.unwrap_or_else(|| "api".to_owned())),
        max_attempts: api.max_attempts,
    };
    match super::enqueue(&api.pool, &req).await {
        Ok(id) => match runs::get(&api.pool, &id).await {
            Ok(Some(run)) => (StatusCode::CREATED, Json(run)).into_response(),
            Ok(None) => (StatusCode::CREATED, Json(json!({"id": id}))).into_response(),
            Err(e) => internal(e),
        },
        Err(EnqueueError::ActiveRun { cp, run, status }) => (
            StatusCode::CONFLICT,
            Json(json!({
                "error": format!("CP {cp} already has an active run {run} ({status})"),
                "run_id": run,
                "status": status,
            })),
        )
            .into_response(),
        Err(e @ EnqueueError::NoSuchCp(_)) => problem(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ EnqueueError::Invalid(_)) => {
            problem(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    cp: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
}

async fn list(State(api): State<RunsApi>, Query(q): Query<ListQuery>) -> Response {
    let status = match q.status.as_deref().map(str::parse::<RunStatus>).transpose() {
        Ok(s) => s,
        Err(e) => return problem(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    let filter = RunFilter {
        cp: q.cp,
        status,
        limit: q.limit,
    };
    match runs::list(&api.pool, &filter).await {
        Ok(list) => Json(json!({"runs": list})).into_response(),
        Err(e) => internal(e),
    }
}

async fn show(State(api): State<RunsApi>, Path(id): Path<String>) -> Response {
    match runs::get(&api.pool, &id).await {
        Ok(Some(run)) => Json(run).into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, format!("run {id} does not exist")),
        Err(e) => internal(e),
    }
}

async fn abort(State(api): State<RunsApi>, Path(id): Path<String>) -> Response {
    match super::abort(&api.pool, &id).await {
        Ok(_) => show(State(api), Path(id)).await,
        Err(e @ AbortError::NoSuchRun(_)) => problem(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => internal(e),
    }
}

async fn errors_csv(State(api): State<RunsApi>, Path(id): Path<String>) -> Response {
    match runs::get(&api.pool, &id).await {
        Ok(Some(_)) => {}
        Ok(None) => return problem(StatusCode::NOT_FOUND, format!("run {id} does not exist")),
        Err(e) => return internal(e),
    }
    let mut out = Vec::new();
    match crate::sync::write_error_report(&api.pool, &id, &mut out).await {
        Ok(_) => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"run-{id}-errors.csv\""),
                ),
            ],
            out,
        )
            .into_response(),
        Err(e) => internal(e),
    }
}
