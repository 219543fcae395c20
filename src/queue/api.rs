//! The runs API (axum), mounted by `crate::api` behind its token check:
//!
//! | route | least role | answer |
//! | --- | --- | --- |
//! | `POST /api/v1/cps/{cp}/runs` | operator | 201 with the run; 409 `active-run` problem naming the run in the way; 404 unknown CP; 422 bad CP id, mode or subjects |
//! | `GET /api/v1/runs?cp=&status=&limit=` | viewer | the Import Logs, newest first (`limit` 1..=`API_PAGE_LIMIT_MAX`) |
//! | `GET /api/v1/runs/{id}` | viewer | one run: mode, trigger, who started and aborted it, timings, progress, counts, error count, notifications (channel, target, status, attempts, last error, sent at) |
//! | `POST /api/v1/runs/{id}/abort` | operator | 200 with the run (Aborted, or still In Progress while it stops); 404 |
//! | `GET /api/v1/runs/{id}/errors.csv` | viewer | the error report (`text/csv`) |
//!
//! Enqueue body: `{"mode": "incremental" | "all" | "subjects", "subjects":
//! ["SS_1", …] or "SS_1, SS_2"}`, both optional (incremental by default);
//! unknown fields are refused. Who started a run is the caller's token name,
//! never a field of the body, so the Import Logs cannot be told a lie.
//!
//! Handlers parse into types, call [`super`], and shape the answer; errors
//! are [`Problem`]s. The `#[utoipa::path]` attributes are the OpenAPI
//! description of these routes (`GET /api/openapi.json`).

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{
    AbortError, EnqueueError, EnqueueRequest, RunFilter, RunInfo, RunStatus, Trigger, runs,
};
use crate::api::auth::{Caller, Role, require};
use crate::api::json::JsonBody;
use crate::api::problem::{Problem, ProblemDoc};
use crate::api::{ApiState, openapi as doc};
use crate::cp::CpId;
use crate::sync::{Mode, parse_subject_list};

/// The runs routes, each group behind the least role it needs.
pub fn routes(state: ApiState) -> Router {
    let read = Router::new()
        .route("/api/v1/runs", get(list))
        .route("/api/v1/runs/{id}", get(show))
        .route("/api/v1/runs/{id}/errors.csv", get(errors_csv))
        .route_layer(from_fn_with_state(Role::Viewer, require));
    let operate = Router::new()
        .route("/api/v1/cps/{cp}/runs", post(enqueue))
        .route("/api/v1/runs/{id}/abort", post(abort))
        .route_layer(from_fn_with_state(Role::Operator, require));
    read.merge(operate).with_state(state)
}

/// Which runs to sync.
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModeParam {
    /// Only what changed since the last successful run.
    #[default]
    Incremental,
    /// Every subject.
    All,
    /// The subjects listed in `subjects`.
    Subjects,
}

/// A subject list: an array of subject keys or labels, or one string with
/// them separated by commas, tabs or line breaks.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum SubjectsParam {
    List(Vec<String>),
    Text(String),
}

/// Body of `POST /api/v1/cps/{cp}/runs`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueBody {
    #[serde(default)]
    pub mode: ModeParam,
    /// Required with mode `subjects`, refused with the others.
    pub subjects: Option<SubjectsParam>,
}

/// The longest subject key or label accepted (OpenSpecimen's PPID width).
const MAX_SUBJECT_CHARS: usize = 255;

impl EnqueueBody {
    /// The mode this body asks for, or why it is not acceptable (the web
    /// pages' Synchronize Records form is checked by the same rules).
    pub fn into_mode(self, max_subjects: usize) -> Result<Mode, Problem> {
        let subjects = match self.subjects {
            None => None,
            Some(SubjectsParam::Text(s)) => Some(parse_subject_list(&s)),
            Some(SubjectsParam::List(list)) => {
                // The same rules as a pasted list: trimmed, blanks and
                // duplicates dropped, the user's order kept.
                let mut seen = std::collections::HashSet::new();
                Some(
                    list.iter()
                        .map(|s| s.trim())
                        .filter(|s| !s.is_empty() && seen.insert(*s))
                        .map(str::to_owned)
                        .collect(),
                )
            }
        };
        match (self.mode, subjects) {
            (ModeParam::Incremental, None) => Ok(Mode::Incremental),
            (ModeParam::All, None) => Ok(Mode::All),
            (ModeParam::Incremental | ModeParam::All, Some(_)) => Err(Problem::invalid(
                "subjects may only be given with mode \"subjects\"",
            )),
            (ModeParam::Subjects, None) => Err(Problem::invalid(
                "mode \"subjects\" needs a non-empty subjects list",
            )),
            (ModeParam::Subjects, Some(list)) => {
                if list.is_empty() {
                    return Err(Problem::invalid(
                        "mode \"subjects\" needs a non-empty subjects list",
                    ));
                }
                if list.len() > max_subjects {
                    return Err(Problem::invalid(format!(
                        "{} subjects listed; at most {max_subjects} per run (API_MAX_SUBJECTS)",
                        list.len()
                    )));
                }
                if let Some(i) = list.iter().position(|s| {
                    s.chars().count() > MAX_SUBJECT_CHARS || s.chars().any(char::is_control)
                }) {
                    // The position, not the value: subject keys are study data.
                    return Err(Problem::invalid(format!(
                        "subject #{} is longer than {MAX_SUBJECT_CHARS} characters or contains control characters",
                        i + 1
                    )));
                }
                Ok(Mode::Subjects { subjects: list })
            }
        }
    }
}

fn parse_cp(cp: String) -> Result<CpId, Problem> {
    CpId::parse(cp).map_err(|e| Problem::invalid(format!("bad CP id: {e}")))
}

/// The `{cp}` of a path, parsed (422 when it cannot be a CP id).
struct CpPath(CpId);

impl<S: Send + Sync> FromRequestParts<S> for CpPath {
    type Rejection = Problem;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let Path(cp) = Path::<String>::from_request_parts(parts, state).await?;
        parse_cp(cp).map(Self)
    }
}

/// The `{id}` of a run's path. Run ids are ULIDs; anything else names no
/// run (404) and costs no query.
struct RunId(String);

impl<S: Send + Sync> FromRequestParts<S> for RunId {
    type Rejection = Problem;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let Path(id) = Path::<String>::from_request_parts(parts, state).await?;
        if id.len() == 26 && id.chars().all(|c| c.is_ascii_alphanumeric()) {
            Ok(Self(id))
        } else {
            Err(Problem::not_found("no such run"))
        }
    }
}

/// A run as the API shows it: the Import Logs row, who aborted it, and
/// its notifications.
#[derive(Debug, Serialize)]
struct RunView {
    #[serde(flatten)]
    run: RunInfo,
    aborted_by: Option<String>,
    notifications: Vec<crate::notify::Delivery>,
}

async fn view(pool: &sqlx::PgPool, runs: Vec<RunInfo>) -> Result<Vec<RunView>, Problem> {
    let ids: Vec<String> = runs.iter().map(|r| r.id.clone()).collect();
    let mut by = runs::aborted_by(pool, ids.clone())
        .await
        .map_err(|e| Problem::internal("reading runs", &e))?;
    let mut notified = crate::notify::outbox::for_runs(pool, &ids)
        .await
        .map_err(|e| Problem::internal("reading notifications", &e))?;
    Ok(runs
        .into_iter()
        .map(|run| RunView {
            aborted_by: by.remove(&run.id),
            notifications: notified.remove(&run.id).unwrap_or_default(),
            run,
        })
        .collect())
}

async fn one(pool: &sqlx::PgPool, id: &str) -> Result<RunView, Problem> {
    let run = runs::get(pool, id)
        .await
        .map_err(|e| Problem::internal("reading a run", &e))?
        .ok_or_else(|| Problem::not_found(format!("run {id} does not exist")))?;
    Ok(view(pool, vec![run]).await?.remove(0))
}

/// Start a sync run of a CP.
#[utoipa::path(
    post, path = "/api/v1/cps/{cp}/runs", tag = "runs",
    params(("cp" = String, Path, description = "The CP's id (OpenSpecimen short title)")),
    request_body(content = Option<EnqueueBody>, content_type = "application/json",
        description = "Optional; an empty body starts an incremental run"),
    responses(
        (status = 201, description = "Enqueued", body = doc::Run),
        (status = 409, description = "The CP already has an active run (`run_id`, `run_status`)",
            body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such CP", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Bad CP id, mode or subject list, unknown field", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn enqueue(
    State(api): State<ApiState>,
    Extension(caller): Extension<Caller>,
    CpPath(cp): CpPath,
    JsonBody(body): JsonBody<EnqueueBody>,
) -> Result<Response, Problem> {
    let mode = body.into_mode(api.config.max_subjects)?;
    let req = EnqueueRequest {
        cp: cp.as_str().to_owned(),
        mode,
        trigger: Trigger::User,
        requested_by: Some(caller.name),
        max_attempts: api.max_attempts,
    };
    match super::enqueue(&api.pool, &req).await {
        Ok(id) => Ok((StatusCode::CREATED, Json(one(&api.pool, &id).await?)).into_response()),
        Err(EnqueueError::ActiveRun { cp, run, status }) => {
            Err(Problem::active_run(&cp, &run, &status))
        }
        Err(EnqueueError::NoSuchCp(cp)) => {
            Err(Problem::not_found(format!("CP {cp} does not exist")))
        }
        // The SQL function's own refusals are written for users (22023).
        Err(EnqueueError::Invalid(msg)) => Err(Problem::invalid(msg)),
        Err(e) => Err(Problem::internal("enqueue", &e)),
    }
}

/// A run status, as a filter.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusParam {
    Queued,
    InProgress,
    Success,
    Failed,
    Aborted,
}

impl From<StatusParam> for RunStatus {
    fn from(s: StatusParam) -> Self {
        match s {
            StatusParam::Queued => Self::Queued,
            StatusParam::InProgress => Self::InProgress,
            StatusParam::Success => Self::Success,
            StatusParam::Failed => Self::Failed,
            StatusParam::Aborted => Self::Aborted,
        }
    }
}

/// Filters of the Import Logs.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this CP's runs.
    cp: Option<String>,
    /// Only runs with this status.
    status: Option<StatusParam>,
    /// At most this many (default 50; at most API_PAGE_LIMIT_MAX).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// The Import Logs, newest first.
#[utoipa::path(
    get, path = "/api/v1/runs", tag = "runs",
    params(ListQuery),
    responses(
        (status = 200, description = "Runs, newest first", body = doc::RunList),
        (status = 422, description = "Bad filter or limit", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn list(
    State(api): State<ApiState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = query?;
    let max = api.config.page_limit_max;
    if let Some(limit) = q.limit
        && !(1..=max).contains(&limit)
    {
        return Err(Problem::invalid(format!(
            "limit must be between 1 and {max}"
        )));
    }
    let cp = q.cp.map(parse_cp).transpose()?;
    let filter = RunFilter {
        cp: cp.map(String::from),
        status: q.status.map(RunStatus::from),
        limit: q.limit,
        ..RunFilter::default()
    };
    let list = runs::list(&api.pool, &filter)
        .await
        .map_err(|e| Problem::internal("listing runs", &e))?;
    Ok(Json(serde_json::json!({"runs": view(&api.pool, list).await?})).into_response())
}

/// One run.
#[utoipa::path(
    get, path = "/api/v1/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "The run's id (a ULID)")),
    responses(
        (status = 200, description = "The run", body = doc::Run),
        (status = 404, description = "No such run", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn show(State(api): State<ApiState>, RunId(id): RunId) -> Result<Response, Problem> {
    Ok(Json(one(&api.pool, &id).await?).into_response())
}

/// Abort a run: a waiting one ends at once, a running one at its next batch
/// boundary. Idempotent; an ended run is returned unchanged.
#[utoipa::path(
    post, path = "/api/v1/runs/{id}/abort", tag = "runs",
    params(("id" = String, Path, description = "The run's id (a ULID)")),
    responses(
        (status = 200, description = "The run after the request", body = doc::Run),
        (status = 404, description = "No such run", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn abort(
    State(api): State<ApiState>,
    Extension(caller): Extension<Caller>,
    RunId(id): RunId,
) -> Result<Response, Problem> {
    match super::abort_as(&api.pool, &id, Some(&caller.name)).await {
        Ok(_) => Ok(Json(one(&api.pool, &id).await?).into_response()),
        Err(AbortError::NoSuchRun(_)) => {
            Err(Problem::not_found(format!("run {id} does not exist")))
        }
        Err(e) => Err(Problem::internal("abort", &e)),
    }
}

/// A run's error report.
#[utoipa::path(
    get, path = "/api/v1/runs/{id}/errors.csv", tag = "runs",
    params(("id" = String, Path, description = "The run's id (a ULID)")),
    responses(
        (status = 200, description = "One line per failed record", body = String, content_type = "text/csv"),
        (status = 404, description = "No such run", body = ProblemDoc, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn errors_csv(State(api): State<ApiState>, RunId(id): RunId) -> Result<Response, Problem> {
    one(&api.pool, &id).await?;
    let mut out = Vec::new();
    crate::sync::write_error_report(&api.pool, &id, &mut out)
        .await
        .map_err(|e| Problem::internal("error report", &e))?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"run-{id}-errors.csv\""),
            ),
        ],
        out,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> Result<Mode, String> {
        let b: EnqueueBody = serde_json::from_str(json).map_err(|e| e.to_string())?;
        b.into_mode(3).map_err(|p| p.detail)
    }

    #[test]
    fn enqueue_bodies_parse_into_modes() {
        assert_eq!(body("{}"), Ok(Mode::Incremental));
        assert_eq!(body(r#"{"mode":"all"}"#), Ok(Mode::All));
        let subjects = |v: &[&str]| Mode::Subjects {
            subjects: v.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            body(r#"{"mode":"subjects","subjects":"SS_1, SS_2\nSS_1"}"#),
            Ok(subjects(&["SS_1", "SS_2"]))
        );
        assert_eq!(
            body(r#"{"mode":"subjects","subjects":[" SS_1","SS_1",""]}"#),
            Ok(subjects(&["SS_1"]))
        );
        for bad in [
            r#"{"mode":"subjects"}"#,
            r#"{"mode":"subjects","subjects":[]}"#,
            r#"{"mode":"all","subjects":["SS_1"]}"#,
            r#"{"mode":"subjects","subjects":["a","b","c","d"]}"#,
            r#"{"mode":"everything"}"#,
            r#"{"mode":"all","requested_by":"someone else"}"#,
            r#"{"subjects":[1]}"#,
        ] {
            assert!(body(bad).is_err(), "{bad} was accepted");
        }
    }
}
