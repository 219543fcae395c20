//! The HTTP API (axum).
//!
//! It answers the two probes an orchestrator needs, and mounts the runs
//! API of [`crate::queue::api`] (enqueue, Import Logs, abort, error report):
//! - `GET /healthz`: the process is alive and serving; touches nothing else.
//! - `GET /readyz`: the database answers and its schema is the one this
//!   build expects; 503 with the reason otherwise, so a pod that started
//!   before `ocsync migrate` finished takes no traffic.
//!
//! Handlers are thin: they parse, call the module that owns the work, and
//! shape the answer. This module knows nothing of ODM or OpenClinica.

use std::future::Future;
use std::net::SocketAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::db;

/// What every handler may reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
}

/// The router with the queue's defaults (tests and the bare API).
pub fn router(state: AppState) -> Router {
    router_with(state, &crate::config::QueueConfig::defaults())
}

/// The router; enqueued runs get `queue.max_attempts`.
pub fn router_with(state: AppState, queue: &crate::config::QueueConfig) -> Router {
    let runs = crate::queue::api::routes(state.pool.clone(), queue.max_attempts);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
        .merge(runs)
}

/// Serves the API on `listener` until `shutdown` resolves, then finishes the
/// requests in flight.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    queue: &crate::config::QueueConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    tracing::info!(%addr, "API listening");
    axum::serve(listener, router_with(state, queue))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn healthz() -> &'static str {
    "ok"
}

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
