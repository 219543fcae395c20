//! One span per API request (`http.request`), so whatever a handler does
//! (an enqueue, and through it the run) joins the request's trace.
//!
//! Fields: `http.method`, `http.route` (the matched route template, such as
//! `/api/v1/cps/{cp}/runs`, never the raw path: paths carry CP and run ids,
//! and query strings or bodies may carry study data) and
//! `http.status_code`. Unmatched paths get `http.route` = `unmatched`.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument as _;

/// Runs the request inside an `http.request` span and records its status.
pub async fn request_span(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let span = tracing::info_span!(
        "http.request",
        http.method = %req.method(),
        http.route = %route,
        http.status_code = tracing::field::Empty,
    );
    let response = next.run(req).instrument(span.clone()).await;
    span.record("http.status_code", response.status().as_u16());
    response
}
