//! Errors as RFC 9457 problem documents (`application/problem+json`).
//!
//! The error policy of the API: every refusal is a [`Problem`] with a
//! stable `type` URI, a short `title` and a `detail` meant for people.
//! Details are written here, from typed errors; nothing from the database
//! or a library is echoed, because such text can carry SQL, hostnames or
//! clinical values. An unexpected failure is logged once, where it is
//! turned into a problem ([`Problem::internal`]), and the caller gets a
//! generic 500.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Where the problem types live; the URIs identify, they need not resolve.
const BASE: &str = "https://ocsync.dev/problems/";

/// An RFC 9457 problem document (documented as [`ProblemDoc`]).
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// A URI that names the kind of problem (stable; match on this).
    #[serde(rename = "type", serialize_with = "type_uri")]
    pub kind: &'static str,
    /// A short, fixed summary of the kind.
    pub title: &'static str,
    /// The HTTP status, repeated for clients that lose it.
    pub status: u16,
    /// What went wrong this time, for people.
    pub detail: String,
    /// 409 `active-run`: the run in the way and its status (boxed: most
    /// problems have none, and a small error keeps `Result`s cheap).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub run: Option<Box<RunInTheWay>>,
    /// 409 `version-conflict`: the version the CP is at now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<i32>,
}

/// The schema of [`Problem`], flat as clients see it (the boxed, flattened
/// 409 fields would otherwise be documented as a nullable sub-schema).
#[derive(ToSchema)]
#[schema(as = Problem)]
#[allow(dead_code)] // A schema only.
pub struct ProblemDoc {
    /// A URI that names the kind of problem (stable; match on this).
    #[schema(example = "https://ocsync.dev/problems/active-run")]
    #[schema(rename = "type")]
    pub kind: String,
    /// A short, fixed summary of the kind.
    pub title: String,
    /// The HTTP status, repeated for clients that lose it.
    pub status: u16,
    /// What went wrong this time, for people.
    pub detail: String,
    /// 409 `active-run` only: the id of the run in the way.
    #[schema(required = false)]
    pub run_id: String,
    /// 409 `active-run` only: its status (Queued or In Progress).
    #[schema(required = false)]
    pub run_status: String,
    /// 409 `version-conflict` only: the version the CP is at now.
    #[schema(required = false)]
    pub current_version: i32,
}

/// What a 409 `active-run` problem adds.
#[derive(Debug, Clone, Serialize)]
pub struct RunInTheWay {
    /// The id of the run in the way.
    pub run_id: String,
    /// Its status (Queued or In Progress).
    pub run_status: String,
}

fn type_uri<S: serde::Serializer>(kind: &&'static str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{BASE}{kind}"))
}

impl Problem {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            title,
            status: status.as_u16(),
            detail: detail.into(),
            run: None,
            current_version: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// 400: the request cannot be read at all (malformed JSON, bad encoding).
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Malformed request",
            detail,
        )
    }

    /// 401: no token, or one that is unknown or revoked.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Authentication required",
            detail,
        )
    }

    /// 403: a valid token whose role is too low for the route.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Role too low", detail)
    }

    /// 404: the thing named in the path does not exist.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 409: the CP already has a run in Queued or In Progress.
    pub fn active_run(cp: &str, run: &str, status: &str) -> Self {
        Self {
            run: Some(Box::new(RunInTheWay {
                run_id: run.to_owned(),
                run_status: status.to_owned(),
            })),
            ..Self::new(
                StatusCode::CONFLICT,
                "active-run",
                "The CP already has an active run",
                format!(
                    "CP {cp} already has an active run {run} ({status}); wait for it or abort it"
                ),
            )
        }
    }

    /// 409: the CP was edited since the caller read it.
    pub fn version_conflict(cp: &str, expected: i32, current: i32) -> Self {
        Self {
            current_version: Some(current),
            ..Self::new(
                StatusCode::CONFLICT,
                "version-conflict",
                "The CP was changed by someone else",
                format!(
                    "CP {cp} is at version {current}, not {expected}; reload it and edit again"
                ),
            )
        }
    }

    /// 413: the body is larger than `API_MAX_BODY_BYTES`.
    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
            detail,
        )
    }

    /// 415: a body that is not JSON.
    pub fn unsupported_media_type(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Expected application/json",
            detail,
        )
    }

    /// 422: well-formed, but a value is not acceptable (unknown field, bad
    /// CP id, mode, subject list, limit …).
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
            "Invalid request",
            detail,
        )
    }

    /// 500: logs `error` once, here, and hides it from the caller.
    pub fn internal(what: &str, error: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %error, "{what} failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the request could not be completed; the server log has the details",
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = (status, axum::Json(&self)).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ocsync\""),
            );
        }
        resp
    }
}

impl From<axum::extract::rejection::PathRejection> for Problem {
    fn from(e: axum::extract::rejection::PathRejection) -> Self {
        Problem::invalid(format!("bad path parameter: {}", e.body_text()))
    }
}

impl From<axum::extract::rejection::QueryRejection> for Problem {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        Problem::invalid(format!("bad query: {}", e.body_text()))
    }
}
