//! What every page shares: the layout (header, navigation, who is signed
//! in, sign-out), the error pages ([`Fail`]), and how runs' words and
//! times are shown.
//!
//! Status is never told by colour alone: each status is a word with a
//! symbol; times are UTC, as `2026-11-29 10:00:05 UTC` in a `<time>`
//! element whose `datetime` is the RFC 3339 form the API returns.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use maud::{DOCTYPE, Markup, html};

use super::assets;
use super::session::Session;
use crate::queue::{RunInfo, RunStatus};

/// Which navigation entry the page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Runs,
    Cps,
    None,
}

/// A whole page: `title` names it in the browser (the body brings its
/// own `<h1>`), then the header with the signed-in user and the sign-out
/// form, then `body` in `<main>`.
pub fn layout(title: &str, who: Option<&Session>, nav: Nav, body: Markup) -> Markup {
    layout_with(title, who, nav, false, body)
}

/// [`layout`] for a page that shows runs still going (`live`): the script
/// updates it in place; without JavaScript it reloads every few seconds.
pub fn layout_with(
    title: &str,
    who: Option<&Session>,
    nav: Nav,
    live: bool,
    body: Markup,
) -> Markup {
    let current = |n: Nav| (nav == n).then_some("page");
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · ocsync" }
                link rel="stylesheet" href=(assets::css_url());
                script src=(assets::js_url()) defer {}
                @if live {
                    noscript { meta http-equiv="refresh" content="5"; }
                }
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    nav aria-label="Main" {
                        a.brand href="/ui/runs" { "ocsync" }
                        @if who.is_some() {
                            ul {
                                li { a href="/ui/runs" aria-current=[current(Nav::Runs)] { "Import Logs" } }
                                li { a href="/ui/cps" aria-current=[current(Nav::Cps)] { "CPs" } }
                            }
                        }
                    }
                    @if let Some(s) = who {
                        div.who {
                            span { "Signed in as " strong { (s.name) } " (" (s.role) ")" }
                            form method="post" action="/ui/signout" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main #main tabindex="-1" { (body) }
            }
        }
    }
}

/// A page that could not be shown, as a page: status, title, what to do.
#[derive(Debug)]
pub struct Fail {
    pub status: StatusCode,
    pub title: &'static str,
    pub detail: String,
}

impl Fail {
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            title,
            detail: detail.into(),
        }
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "Not found", detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "Not allowed", detail)
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Bad request", detail)
    }

    /// An unexpected failure: logged once, here; the page says only that
    /// something went wrong (the error may carry SQL or hostnames).
    pub fn internal(what: &str, error: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %error, "web page: {what} failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Something went wrong",
            "The server could not do this; the failure is in its log. Try again, or tell the people who run ocsync.",
        )
    }
}

impl From<sqlx::Error> for Fail {
    fn from(e: sqlx::Error) -> Self {
        Self::internal("a database query", &e)
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        let body = html! {
            h1 { (self.title) }
            p.notice.error role="alert" { (self.detail) }
            p { a href="/ui/runs" { "Import Logs" } " · " a href="/ui/cps" { "CPs" } }
        };
        (self.status, layout(self.title, None, Nav::None, body)).into_response()
    }
}

/// A time in UTC, readable, with its machine form in `datetime`. A
/// narrow table cell breaks it between the date and the time only.
pub fn time(t: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(t.to_rfc3339_opts(SecondsFormat::Secs, true)) {
            span { (t.format("%Y-%m-%d")) } " " span { (t.format("%H:%M:%S UTC")) }
        }
    }
}

/// An optional time, or a dash (with a name for screen readers).
pub fn maybe_time(t: Option<DateTime<Utc>>) -> Markup {
    match t {
        Some(t) => time(t),
        None => html! { span aria-label="none" { "—" } },
    }
}

/// The symbol shown before a status word (the word carries the meaning).
fn symbol(s: RunStatus) -> &'static str {
    match s {
        RunStatus::Queued => "◷",
        RunStatus::InProgress => "▶",
        RunStatus::Success => "✓",
        RunStatus::Failed => "✗",
        RunStatus::Aborted => "■",
    }
}

/// The CSS class of a status (colour is a second cue, never the only one).
fn status_class(s: RunStatus) -> &'static str {
    match s {
        RunStatus::Queued => "status queued",
        RunStatus::InProgress => "status in-progress",
        RunStatus::Success => "status success",
        RunStatus::Failed => "status failed",
        RunStatus::Aborted => "status aborted",
    }
}

/// A run's status as a badge: symbol and word, and "retrying" when a
/// failed attempt waits for its next one.
pub fn status(run: &RunInfo) -> Markup {
    html! {
        span class=(status_class(run.status)) data-field="status" {
            span aria-hidden="true" { (symbol(run.status)) " " }
            (run.status.as_str())
        }
        @if run.retrying {
            " " span.note { "(retrying: attempt " (run.attempts + 1) " of " (run.max_attempts) ")" }
        }
    }
}

/// A status word alone (for places that have only the word).
pub fn status_word(s: RunStatus) -> Markup {
    html! {
        span class=(status_class(s)) {
            span aria-hidden="true" { (symbol(s)) " " }
            (s.as_str())
        }
    }
}

/// The mode as the Synchronize Records form names it.
pub fn mode(mode: &str) -> &str {
    match mode {
        "incremental" => "Incremental",
        "all" => "All CRF records",
        "subjects" => "Selected subjects",
        other => other,
    }
}

/// What started the run.
pub fn trigger(trigger: &str) -> &str {
    match trigger {
        "user" => "User",
        "schedule" => "Schedule",
        "sql" => "SQL",
        other => other,
    }
}

/// Who started the run: the token's name, or the scheduler.
pub fn started_by(run: &RunInfo) -> String {
    match (&run.requested_by, run.trigger.as_str()) {
        (Some(who), _) => who.clone(),
        (None, "schedule") => "scheduler".to_owned(),
        (None, _) => "—".to_owned(),
    }
}

/// A run's end time, with "(Aborted)" beside it for an aborted run.
pub fn ended(run: &RunInfo) -> Markup {
    html! {
        (maybe_time(run.finished_at))
        @if run.status == RunStatus::Aborted {
            " " strong.aborted { "(Aborted)" }
        }
    }
}

/// The progress of a run in a worker's hands: a `<progress>` bar (without
/// a value while the total is unknown, as for a whole-study document) and
/// the same in words. JavaScript updates both in place.
pub fn progress(run: &RunInfo) -> Markup {
    let done = run.subjects_done.unwrap_or(0);
    let label = format!("progress-{}", run.id);
    html! {
        div.progress {
            @match run.subjects_total {
                Some(total) if total > 0 => {
                    progress aria-labelledby=(label) max=(total) value=(done.min(total)) {
                        (done) " of " (total)
                    }
                }
                _ => {
                    progress aria-labelledby=(label) { (done) " subjects" }
                }
            }
            span id=(label) {
                span data-field="done" { (done) }
                " of "
                span data-field="total" {
                    @match run.subjects_total { Some(t) => (t), None => "?" }
                }
                " subjects"
            }
        }
    }
}

/// Created / updated / unchanged / failed, with the words for screen
/// readers (the table caption says the order for everyone else).
pub fn counts(c: &crate::queue::runs::EntityCounts, entity: &str) -> Markup {
    let n = |v: i64, word: &str, key: &str| {
        html! {
            span data-count=(format!("{entity}.{key}")) { (v) }
            span.vh { " " (word) }
        }
    };
    html! {
        span.counts {
            (n(c.created, "created", "created")) " / "
            (n(c.updated, "updated", "updated")) " / "
            (n(c.unchanged, "unchanged", "unchanged")) " / "
            (n(c.failed, "failed", "failed"))
        }
    }
}

/// The four entities, as the counts name them and as people do.
pub const ENTITIES: [(&str, &str); 4] = [
    ("participants", "Participants"),
    ("visits", "Visits"),
    ("specimens", "Specimens"),
    ("form_records", "Form records"),
];

/// The counts of one entity of a run, by its key in [`ENTITIES`].
pub fn entity(run: &RunInfo, key: &str) -> crate::queue::runs::EntityCounts {
    let c = &run.counts;
    match key {
        "participants" => c.participants,
        "visits" => c.visits,
        "specimens" => c.specimens,
        _ => c.form_records,
    }
}
