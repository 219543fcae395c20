//! The HTTP API (axum).
//!
//! What is mounted, and who may call it:
//! - `GET /healthz`: the process is alive and serving; touches nothing else.
//! - `GET /readyz`: the database answers and its schema is the one this
//!   build expects; 503 with the reason otherwise, so a pod that started
//!   before `ocsync migrate` finished takes no traffic.
//! - `GET /api/openapi.json`: the OpenAPI description ([`openapi`]),
//!   generated from the handlers' attributes.
//! - `/api/v1/…`: the runs API of [`crate::queue::api`] and the CP read
//!   routes of [`cps`], behind a bearer token ([`auth`], [`tokens`]); each
//!   group needs a least role (viewer, operator, admin).
//!
//! - `/ui/…`: the web pages ([`crate::ui`]), signed in with the same
//!   tokens through a session cookie; `/` sends a browser to them.
//!
//! The probes and the document need no token, so orchestrators and client
//! generators can reach them. Every refusal is a problem document
//! ([`problem`]); request bodies are capped at `API_MAX_BODY_BYTES` and
//! parsed strictly ([`json`]). Every request runs in an `http.request`
//! span ([`trace`]), the parent of the spans of the work it starts.
//!
//! Handlers are thin: they parse, call the module that owns the work, and
//! shape the answer. This module knows nothing of ODM or OpenClinica.

pub mod auth;
pub mod cps;
pub mod json;
pub mod openapi;
pub mod problem;
pub mod tokens;
pub mod trace;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::config::{ApiConfig, Config, QueueConfig};
use crate::db;

/// What every handler may reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
}

/// The state of the `/api/v1` routes: the pool and the limits they enforce.
#[derive(Clone)]
pub struct ApiState {
    pub pool: PgPool,
    pub config: Arc<ApiConfig>,
    /// Attempts an enqueued run gets (`RUN_MAX_ATTEMPTS`).
    pub max_attempts: u32,
}

/// The router with every default (tests and the bare API).
pub fn router(state: AppState) -> Router {
    router_with(state, &QueueConfig::defaults())
}

/// The router with the default API limits; enqueued runs get
/// `queue.max_attempts`.
pub fn router_with(state: AppState, queue: &QueueConfig) -> Router {
    router_configured(state, &ApiConfig::defaults(), queue)
}

/// The router with every setting from the configuration.
pub fn router_configured(state: AppState, api: &ApiConfig, queue: &QueueConfig) -> Router {
    let v1 = ApiState {
        pool: state.pool.clone(),
        config: Arc::new(api.clone()),
        max_attempts: queue.max_attempts,
    };
    // Authentication wraps the whole /api/v1 tree (401 before anything
    // else); each group inside adds its least role (403).
    let protected = crate::queue::api::routes(v1.clone())
        .merge(cps::routes(v1))
        .layer(from_fn_with_state(state.pool.clone(), auth::authenticate));
    let ui = crate::ui::routes(crate::ui::UiState::new(state.pool.clone(), api, queue));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/openapi.json", get(openapi::serve))
        .route("/", get(|| async { Redirect::to("/ui/runs") }))
        .with_state(state)
        .merge(protected)
        .merge(ui)
        .fallback(not_found)
        // Above any route's own limit: the cap is the API's, not a handler's.
        .layer(DefaultBodyLimit::max(api.max_body_bytes))
        // Outermost: every request, refused or not, gets its span.
        .layer(axum::middleware::from_fn(trace::request_span))
}

/// Serves the API on `listener` until `shutdown` resolves, then finishes the
/// requests in flight.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "API listening");
    axum::serve(
        listener,
        router_configured(state, &config.api, &config.queue),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

async fn not_found() -> problem::Problem {
    problem::Problem::not_found("no such route")
}

/// Liveness: the process serves requests.
#[utoipa::path(get, path = "/healthz", tag = "probes",
    responses((status = 200, description = "Alive", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the database answers and its schema is current.
#[utoipa::path(get, path = "/readyz", tag = "probes",
    responses(
        (status = 200, description = "Ready", body = openapi::Readiness),
        (status = 503, description = "Not ready, with the reason", body = openapi::Readiness),
    ))]
async fn readyz(State(state): State<AppState>) -> Response {
    match db::schema_status(&state.pool).await {
        Ok(status) if status.is_current() => {
            Json(json!({"status": "ready", "schema_version": status.expected})).into_response()
        }
        Ok(status) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "not ready",
                "reason": "database schema is not at the expected version; run `ocsync migrate`",
                "schema_version": status.applied,
                "expected_version": status.expected,
            })),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "not ready", "reason": "database unreachable"})),
            )
                .into_response()
        }
    }
}
