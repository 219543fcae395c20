//! Bearer-token authentication and roles.
//!
//! [`authenticate`] runs in front of every `/api/v1` route: it reads
//! `Authorization: Bearer …`, looks the token up by hash, and puts the
//! [`Caller`] in the request's extensions; a missing, unknown or revoked
//! token ends the request with 401 (and `WWW-Authenticate: Bearer`).
//! [`require`] then guards each group of routes with the least role it
//! needs (403 below it). Handlers that record who acted take the caller
//! with `Extension<Caller>`. The probes (`/healthz`, `/readyz`) and the
//! OpenAPI document are mounted outside, so they need no token.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;

use super::problem::Problem;
pub use super::tokens::{Caller, Role};

/// Middleware: 401 unless the request carries a valid token.
pub async fn authenticate(State(pool): State<PgPool>, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    let Some(token) = presented else {
        return Problem::unauthorized("send an API token: Authorization: Bearer <token>")
            .into_response();
    };
    match super::tokens::authenticate(&pool, &token).await {
        Ok(Some(caller)) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Ok(None) => Problem::unauthorized("the token is unknown or revoked").into_response(),
        Err(e) => Problem::internal("token lookup", &e).into_response(),
    }
}

/// Middleware (with the least role as state): 403 below it.
pub async fn require(State(least): State<Role>, req: Request, next: Next) -> Response {
    match req.extensions().get::<Caller>() {
        Some(c) if c.role >= least => next.run(req).await,
        Some(c) => Problem::forbidden(format!(
            "this needs the {least} role; token {:?} has {}",
            c.name, c.role
        ))
        .into_response(),
        // Only reachable if a route was mounted without `authenticate`.
        None => Problem::unauthorized("send an API token").into_response(),
    }
}
