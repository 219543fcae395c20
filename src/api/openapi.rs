//! The OpenAPI 3.1 description, generated from the handlers' `#[utoipa::path]`
//! attributes and served at `GET /api/openapi.json`.
//!
//! The responses every protected route shares (401, 403, 500, and for
//! bodies 400, 413, 415) are added here by [`SharedResponses`] rather than
//! repeated on each handler. The run's schema is written out as [`Run`]
//! because the Import Logs row (`queue::RunInfo`) is the queue's type; the
//! integration tests compare the two key for key so they cannot drift.

use axum::Json;
use axum::response::IntoResponse;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use super::problem::ProblemDoc;

#[derive(OpenApi)]
#[openapi(
    info(title = "ocsync", description = "Keeps OpenSpecimen collection protocols in step with OpenClinica studies. Authenticate with `Authorization: Bearer <token>` (`ocsync token create NAME --role viewer|operator|admin`)."),
    paths(
        super::healthz,
        super::readyz,
        crate::queue::api::enqueue,
        crate::queue::api::list,
        crate::queue::api::show,
        crate::queue::api::abort,
        crate::queue::api::errors_csv,
        super::cps::list,
        super::cps::show,
        super::cps::update,
    ),
    components(schemas(ProblemDoc, crate::queue::api::StatusParam, Run, RunList, RunCounts, EntityCounts, RunStatus, Readiness, crate::notify::Delivery, crate::notify::DeliveryStatus, crate::notify::Channel)),
    modifiers(&SharedResponses),
)]
pub struct ApiDoc;

/// The document, built once per request (it is small and rarely fetched).
pub async fn serve() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

/// Adds the bearer scheme and the responses shared by protected routes.
struct SharedResponses;

fn problem_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                        "Problem",
                    ))))
                    .build(),
            )
            .build(),
    )
}

fn add(op: &mut Operation, status: &str, description: &str) {
    op.responses
        .responses
        .entry(status.to_owned())
        .or_insert_with(|| problem_response(description));
}

impl Modify for SharedResponses {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        for item in doc.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                if op.security.is_none() {
                    continue;
                }
                add(op, "401", "Missing, unknown or revoked token");
                add(op, "403", "The token's role is too low");
                add(op, "500", "Internal error (details only in the server log)");
                if op.request_body.is_some() {
                    add(op, "400", "Malformed JSON");
                    add(op, "413", "Body larger than API_MAX_BODY_BYTES");
                    add(op, "415", "Body is not application/json");
                    add(op, "422", "Well-formed but not acceptable");
                }
            }
        }
    }
}

/// A run's status, as the Import Logs show it.
#[derive(ToSchema)]
#[allow(dead_code)] // A schema only; `queue::RunStatus` is the real type.
pub enum RunStatus {
    Queued,
    #[schema(rename = "In Progress")]
    InProgress,
    Success,
    Failed,
    Aborted,
}

/// Created / updated / unchanged / failed of one entity.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct EntityCounts {
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub failed: i64,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct RunCounts {
    pub participants: EntityCounts,
    pub visits: EntityCounts,
    pub specimens: EntityCounts,
    pub form_records: EntityCounts,
}

/// One run of the Import Logs.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Run {
    pub id: String,
    pub cp: String,
    pub status: RunStatus,
    /// Failed once, waiting for its backoff (status Queued).
    pub retrying: bool,
    /// incremental, all or subjects.
    pub mode: String,
    /// user, schedule, cli or sql.
    pub trigger: String,
    /// The token name (API), user or `scheduler` that started the run.
    pub requested_by: Option<String>,
    /// The token name (API) or database user that aborted the run.
    pub aborted_by: Option<String>,
    pub enqueued_at: Option<chrono::DateTime<chrono::Utc>>,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub subjects_done: Option<i64>,
    pub subjects_total: Option<i64>,
    pub counts: RunCounts,
    pub error_count: i64,
    /// Why the last attempt failed (no clinical values).
    pub last_error: Option<String>,
    /// The notifications of the run's end (none while it runs, or when its
    /// CP has no `[notify]` section).
    pub notifications: Vec<crate::notify::Delivery>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct RunList {
    pub runs: Vec<Run>,
}

/// The readiness probe's answer.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Readiness {
    /// `ready` or `not ready`.
    pub status: String,
    pub reason: Option<String>,
    pub schema_version: Option<i64>,
    pub expected_version: Option<i64>,
}
