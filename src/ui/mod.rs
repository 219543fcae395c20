//! The web pages, served by the API process: server-rendered HTML (maud,
//! compiled in), one stylesheet and one small script embedded in the
//! binary ([`assets`]); no build step, nothing fetched from elsewhere, so
//! they work offline.
//!
//! | page | least role | what |
//! | --- | --- | --- |
//! | `GET /ui/runs?cp=&status=&before=&after=` | viewer | the Import Logs, newest first, filtered, a page at a time; live progress; Abort (operator); error reports |
//! | `GET /ui/runs/{id}` | viewer | one run: details, progress, counts, errors, abort |
//! | `GET /ui/cps`, `GET /ui/cps/{cp}` | viewer | CPs with their last run and next scheduled run; one CP's configuration and the Synchronize Records form |
//! | `POST /ui/cps/{cp}/runs` | operator | start a run (Incremental, All CRF records, Selected subjects) |
//! | `POST /ui/runs/{id}/abort` | operator | abort a run (after a confirmation) |
//! | `POST /ui/cps/{cp}/config` | admin | replace a CP's configuration (TOML), refused during a run |
//! | `GET /ui/signin`, `POST /ui/signin`, `POST /ui/signout` | none | sign in with an API token, sign out ([`session`]) |
//!
//! The pages are a second face of the JSON API, not a second
//! implementation: each handler parses the form, calls the function the
//! API's handler calls (`queue::enqueue` after `EnqueueBody::into_mode`,
//! `queue::abort_as`, `queue::runs`, `cp::store::update`,
//! `sync::write_error_report`) and renders what it returns. Roles decide
//! which buttons a page shows, and every POST checks the role again on the
//! server (a 403 page below it), along with its CSRF token and, when the
//! browser sends one, its `Origin` ([`session`]).
//!
//! Pages work without JavaScript. `assets/ui.js` adds what clearly helps:
//! live progress (it polls `GET /ui/progress?ids=…`, a small JSON answer,
//! and reloads the page when a run changes status) and a confirmation
//! dialog before an abort (without it, the server asks on a page of its
//! own). Every response carries a strict Content-Security-Policy (no
//! inline script or style), `nosniff`, and `Cache-Control: no-store`
//! except the assets.

pub mod assets;
mod cps;
mod page;
mod runs;
pub mod session;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{Redirect, Response};
use axum::routing::{get, post};
use sqlx::PgPool;

use crate::config::{ApiConfig, QueueConfig};
use crate::cp::CronSchedule;
use crate::schedule::Cron;

/// What the pages reach: the pool, the API's limits (the same ones the
/// JSON API enforces) and what the schedule needs to say when a CP runs
/// next.
#[derive(Clone)]
pub struct UiState {
    pub pool: PgPool,
    pub api: Arc<ApiConfig>,
    /// Attempts a started run gets (`RUN_MAX_ATTEMPTS`).
    pub max_attempts: u32,
    /// `SCHEDULE_CRON`, for CPs without a schedule of their own: as
    /// written (to show) and parsed (to compute the next run).
    pub schedule_cron: CronSchedule,
    pub default_cron: Cron,
}

impl UiState {
    pub fn new(pool: PgPool, api: &ApiConfig, queue: &QueueConfig) -> Self {
        Self {
            pool,
            api: Arc::new(api.clone()),
            max_attempts: queue.max_attempts,
            schedule_cron: queue.schedule_cron.clone(),
            // `CronSchedule` was checked with the same grammar at start-up.
            default_cron: Cron::new(&queue.schedule_cron)
                .expect("SCHEDULE_CRON was validated when the configuration was read"),
        }
    }
}

/// The `/ui` routes (mounted by [`crate::api`] beside `/api/v1`).
pub fn routes(state: UiState) -> Router {
    Router::new()
        .route("/ui", get(home))
        .route("/ui/", get(home))
        .route(
            "/ui/signin",
            get(session::signin_form).post(session::signin),
        )
        .route("/ui/signout", post(session::signout))
        .route("/ui/runs", get(runs::list))
        .route("/ui/runs/{id}", get(runs::show))
        .route(
            "/ui/runs/{id}/abort",
            get(runs::abort_confirm).post(runs::abort),
        )
        .route("/ui/runs/{id}/errors.csv", get(runs::errors_csv))
        .route("/ui/progress", get(runs::progress))
        .route("/ui/cps", get(cps::list))
        .route("/ui/cps/{cp}", get(cps::show))
        .route("/ui/cps/{cp}/runs", post(cps::start))
        .route("/ui/cps/{cp}/config", post(cps::edit))
        .route("/ui/assets/{file}", get(assets::serve))
        .route("/ui/{*rest}", get(not_found))
        .with_state(state)
        .layer(axum::middleware::map_response(security_headers))
}

async fn home() -> Redirect {
    Redirect::to("/ui/runs")
}

async fn not_found() -> page::Fail {
    page::Fail::not_found("There is no such page.")
}

/// The policy is strict because nothing on the pages needs more: every
/// script and stylesheet is ours and served from `/ui/assets`.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Pages show live data and who is signed in: never from a cache.
    // The assets set their own.
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    res
}

/// `text` as one URL path segment: everything but RFC 3986's unreserved
/// characters percent-encoded (a CP id may hold `/`, `?`, `#`, spaces).
pub(crate) fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query string (without `?`) from pairs, skipping empty values.
pub(crate) fn query<'a>(pairs: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            q.append_pair(k, v);
        }
    }
    q.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(path_segment("CP-1_a.b~"), "CP-1_a.b~");
        assert_eq!(path_segment("a/b c?#"), "a%2Fb%20c%3F%23");
        assert_eq!(path_segment("é"), "%C3%A9");
    }

    #[test]
    fn queries_skip_empty_values() {
        assert_eq!(
            query([("cp", Some("A B")), ("status", None), ("before", Some(""))]),
            "cp=A+B"
        );
    }
}
