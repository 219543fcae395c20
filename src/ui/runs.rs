//! The Import Logs (`/ui/runs`), one run (`/ui/runs/{id}`), abort, the
//! error report, and the progress the script polls (`/ui/progress`).
//!
//! Reads go through [`crate::queue::runs`] (`list`, `get`, `aborted_by`),
//! the abort through [`crate::queue::abort_as`], the report through
//! [`crate::sync::write_error_report`]: what the JSON API calls.
//!
//! Pages of the Import Logs are cut by run id (ULIDs sort as they were
//! enqueued): "Older runs" lists those before the last one shown,
//! "Newer runs" those after the first, so a page does not shift while new
//! runs arrive.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::{Deserialize, Serialize};

use super::page::{self, Fail, Nav};
use super::session::{self, CsrfForm, Posted, Session};
use super::{UiState, path_segment, query};
use crate::api::tokens::Role;
use crate::queue::runs::{self, RunCounts};
use crate::queue::{AbortError, RunFilter, RunInfo, RunStatus};

/// Runs per page unless `limit` says otherwise.
const PAGE: u32 = 25;

/// Run ids are ULIDs; anything else names no run and costs no query.
fn run_id(id: &str) -> Result<&str, Fail> {
    if id.len() == 26 && id.chars().all(|c| c.is_ascii_alphanumeric()) {
        Ok(id)
    } else {
        Err(Fail::not_found("There is no such run."))
    }
}

async fn one(state: &UiState, id: &str) -> Result<RunInfo, Fail> {
    runs::get(&state.pool, run_id(id)?).await?.ok_or_else(|| {
        Fail::not_found(format!(
            "There is no run {id}; it may have been deleted after the retention period."
        ))
    })
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    cp: Option<String>,
    status: Option<String>,
    before: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

/// The Import Logs.
pub async fn list(
    State(state): State<UiState>,
    session: Session,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, Fail> {
    let Query(q) = q.map_err(|_| Fail::bad_request("The filter could not be read."))?;
    let empty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    let (cp, status_text) = (empty(q.cp), empty(q.status));
    let status = status_text
        .as_deref()
        .map(str::parse::<RunStatus>)
        .transpose()
        .map_err(Fail::bad_request)?;
    let (before, after) = (empty(q.before), empty(q.after));
    for cursor in [&before, &after].into_iter().flatten() {
        run_id(cursor).map_err(|_| Fail::bad_request("That page does not exist."))?;
    }
    let max = state.api.page_limit_max;
    let limit = q.limit.unwrap_or(PAGE.min(max));
    if !(1..=max).contains(&limit) {
        return Err(Fail::bad_request(format!(
            "A page holds between 1 and {max} runs."
        )));
    }
    let filter = RunFilter {
        cp: cp.clone(),
        status,
        limit: Some(limit),
        before: before.clone(),
        after: after.clone(),
    };
    let list = runs::list(&state.pool, &filter).await?;
    // Whether any run (of this filter) lies beyond the page, either way.
    let beyond = |before: Option<String>, after: Option<String>| {
        let filter = RunFilter {
            cp: cp.clone(),
            status,
            limit: Some(1),
            before,
            after,
        };
        let pool = state.pool.clone();
        async move { runs::list(&pool, &filter).await.map(|l| !l.is_empty()) }
    };
    let (newer, older) = match (list.first(), list.last()) {
        (Some(first), Some(last)) => (
            beyond(None, Some(first.id.clone()))
                .await?
                .then(|| first.id.clone()),
            beyond(Some(last.id.clone()), None)
                .await?
                .then(|| last.id.clone()),
        ),
        _ => (None, None),
    };
    let cps = crate::cp::store::ids(&state.pool)
        .await
        .map_err(|e| Fail::internal("listing CPs", &e))?;
    let live = list.iter().any(|r| !r.status.is_terminal());
    let limit_text = q.limit.map(|l| l.to_string());
    let link = |before: Option<&str>, after: Option<&str>| {
        format!(
            "/ui/runs?{}",
            query([
                ("cp", cp.as_deref()),
                ("status", status_text.as_deref()),
                ("limit", limit_text.as_deref()),
                ("before", before),
                ("after", after),
            ])
        )
    };
    let here = link(before.as_deref(), after.as_deref());
    let body = html! {
        h1 { "Import Logs" }
        form.filters method="get" action="/ui/runs" {
            div {
                label for="f-cp" { "CP" }
                select #f-cp name="cp" {
                    option value="" { "All CPs" }
                    @for id in &cps {
                        option value=(id) selected[cp.as_deref() == Some(id.as_str())] { (id) }
                    }
                }
            }
            div {
                label for="f-status" { "Status" }
                select #f-status name="status" {
                    option value="" { "Any status" }
                    @for s in [RunStatus::Queued, RunStatus::InProgress, RunStatus::Success, RunStatus::Failed, RunStatus::Aborted] {
                        option value=(status_param(s)) selected[status == Some(s)] { (s.as_str()) }
                    }
                }
            }
            @if let Some(l) = &limit_text { input type="hidden" name="limit" value=(l); }
            button type="submit" { "Filter" }
            @if cp.is_some() || status.is_some() {
                " " a href="/ui/runs" { "Show all runs" }
            }
        }
        @if list.is_empty() {
            p.empty { "No runs" @if cp.is_some() || status.is_some() { " match this filter" } "." }
        } @else {
            div.scroll {
                table.runs {
                    caption {
                        "Runs, newest first. Record counts read created / updated / unchanged / failed."
                    }
                    thead {
                        tr {
                            th scope="col" { "Run" }
                            th scope="col" { "CP" }
                            th scope="col" { "Mode" }
                            th scope="col" { "Started by" }
                            th scope="col" { "Status" }
                            th scope="col" { "Start" }
                            th scope="col" { "End" }
                            @for (_, name) in page::ENTITIES { th scope="col" { (name) } }
                            th scope="col" { "Errors" }
                            th scope="col" { span.vh { "Actions" } }
                        }
                    }
                    tbody {
                        @for run in &list { (row(run, &session, &here)) }
                    }
                }
            }
        }
        @if newer.is_some() || older.is_some() {
            nav.pager aria-label="Pages of the Import Logs" {
                ul {
                    @if let Some(first) = &newer {
                        li { a rel="prev" href=(link(None, Some(first))) { "← Newer runs" } }
                    }
                    @if let Some(last) = &older {
                        li { a rel="next" href=(link(Some(last), None)) { "Older runs →" } }
                    }
                }
            }
        }
    };
    Ok(page::layout_with("Import Logs", Some(&session), Nav::Runs, live, body).into_response())
}

/// The status as the filter's query value.
fn status_param(s: RunStatus) -> &'static str {
    match s {
        RunStatus::Queued => "queued",
        RunStatus::InProgress => "in_progress",
        RunStatus::Success => "success",
        RunStatus::Failed => "failed",
        RunStatus::Aborted => "aborted",
    }
}

/// Attributes the script reads: which run, its status, whether to poll.
fn live_attr(run: &RunInfo) -> Option<&'static str> {
    (!run.status.is_terminal()).then_some("1")
}

/// One row of the Import Logs.
fn row(run: &RunInfo, session: &Session, here: &str) -> Markup {
    let cp_href = format!("/ui/cps/{}", path_segment(&run.cp));
    html! {
        tr data-run-id=(run.id) data-status=(run.status.as_str()) data-live=[live_attr(run)] {
            th scope="row" { a.mono href=(format!("/ui/runs/{}", run.id)) { (run.id) } }
            td { a href=(cp_href) { (run.cp) } }
            td { (page::mode(&run.mode)) }
            td { (page::started_by(run)) br; span.note { "Trigger: " (page::trigger(&run.trigger)) } }
            td {
                (page::status(run))
                @if run.status == RunStatus::InProgress { (page::progress(run)) }
            }
            td { (page::maybe_time(run.started_at)) }
            td { (page::ended(run)) }
            @for (key, _) in page::ENTITIES { td.num { (page::counts(&page::entity(run, key), key)) } }
            td.num {
                span data-field="errors" { (run.error_count) }
                @if run.error_count > 0 {
                    br;
                    a href=(format!("/ui/runs/{}/errors.csv", run.id)) download {
                        "Error report" span.vh { " of run " (run.id) } " (CSV)"
                    }
                }
            }
            td { @if !run.status.is_terminal() { (abort_form(run, session, here)) } }
        }
    }
}

/// The Abort button, for those who may abort. The script asks for a
/// confirmation in a dialog; without it, the server asks on a page.
fn abort_form(run: &RunInfo, session: &Session, back: &str) -> Markup {
    if session.role < Role::Operator {
        return html! {};
    }
    let question = format!(
        "Abort run {} of CP {}? It stops at its next batch boundary and keeps what it has already written.",
        run.id, run.cp
    );
    html! {
        form.abort method="post" action=(format!("/ui/runs/{}/abort", run.id)) data-confirm=(question) {
            input type="hidden" name="csrf" value=(session.csrf);
            input type="hidden" name="confirmed" value="no";
            input type="hidden" name="back" value=(back);
            button.danger type="submit" { "Abort" span.vh { " run " (run.id) } }
        }
    }
}

/// One run.
pub async fn show(
    State(state): State<UiState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Response, Fail> {
    let run = one(&state, &id).await?;
    let aborted_by = runs::aborted_by(&state.pool, vec![run.id.clone()])
        .await?
        .remove(&run.id);
    let here = format!("/ui/runs/{}", run.id);
    let cp_href = format!("/ui/cps/{}", path_segment(&run.cp));
    let body = html! {
        h1 { "Run " span.mono { (run.id) } }
        section.run data-run-id=(run.id) data-status=(run.status.as_str()) data-live=[live_attr(&run)] {
            dl.facts {
                dt { "CP" } dd { a href=(cp_href) { (run.cp) } }
                dt { "Status" } dd { (page::status(&run)) }
                dt { "Mode" } dd { (page::mode(&run.mode)) }
                dt { "Trigger" } dd { (page::trigger(&run.trigger)) }
                dt { "Started by" } dd { (page::started_by(&run)) }
                @if let Some(by) = &aborted_by { dt { "Aborted by" } dd { (by) } }
                dt { "Queued" } dd { (page::maybe_time(run.enqueued_at)) }
                dt { "Start" } dd { (page::maybe_time(run.started_at)) }
                dt { "End" } dd { (page::ended(&run)) }
                dt { "Attempts" } dd { (run.attempts) " of at most " (run.max_attempts) }
                dt { "Subjects" } dd {
                    @if run.status == RunStatus::InProgress {
                        (page::progress(&run))
                    } @else {
                        (run.subjects_done.unwrap_or(0))
                        @if let Some(t) = run.subjects_total { " of " (t) }
                    }
                }
            }
            (counts_table(&run.counts))
            h2 { "Errors" }
            p {
                span data-field="errors" { (run.error_count) } " error rows."
                @if run.error_count > 0 {
                    " " a href=(format!("/ui/runs/{}/errors.csv", run.id)) download { "Download the error report (CSV)" }
                }
            }
            @if let Some(reason) = &run.last_error {
                @if run.status != RunStatus::Success {
                    p { "Last failure: " (reason) }
                }
            }
            @if !run.status.is_terminal() { (abort_form(&run, &session, &here)) }
        }
        p { a href=(format!("/ui/runs?{}", query([("cp", Some(run.cp.as_str()))]))) { "All runs of " (run.cp) } }
    };
    let live = !run.status.is_terminal();
    Ok(page::layout_with(
        &format!("Run {}", run.id),
        Some(&session),
        Nav::Runs,
        live,
        body,
    )
    .into_response())
}

/// Created / updated / unchanged / failed per entity, as a table.
fn counts_table(c: &RunCounts) -> Markup {
    let rows = [
        ("participants", "Participants", c.participants),
        ("visits", "Visits", c.visits),
        ("specimens", "Specimens", c.specimens),
        ("form_records", "Form records", c.form_records),
    ];
    html! {
        table.counts-table {
            caption { "Records" }
            thead {
                tr {
                    th scope="col" { "Entity" }
                    th scope="col" { "Created" }
                    th scope="col" { "Updated" }
                    th scope="col" { "Unchanged" }
                    th scope="col" { "Failed" }
                }
            }
            tbody {
                @for (key, name, e) in rows {
                    tr {
                        th scope="row" { (name) }
                        td.num data-count=(format!("{key}.created")) { (e.created) }
                        td.num data-count=(format!("{key}.updated")) { (e.updated) }
                        td.num data-count=(format!("{key}.unchanged")) { (e.unchanged) }
                        td.num data-count=(format!("{key}.failed")) { (e.failed) }
                    }
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct AbortForm {
    #[serde(default)]
    csrf: String,
    /// `yes` once the user confirmed (the dialog, or the confirmation page).
    #[serde(default)]
    confirmed: String,
    /// The page to return to.
    #[serde(default)]
    back: String,
}

impl CsrfForm for AbortForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// The confirmation page (also what a browser without JavaScript gets).
fn confirm_page(run: &RunInfo, session: &Session, back: &str) -> Response {
    let body = html! {
        h1 { "Abort run " span.mono { (run.id) } "?" }
        p {
            "Run " (run.id) " of CP " (run.cp) " (" (page::status_word(run.status)) ") "
            "stops at its next batch boundary and keeps what it has already written. "
            "It is not retried."
        }
        form method="post" action=(format!("/ui/runs/{}/abort", run.id)) {
            input type="hidden" name="csrf" value=(session.csrf);
            input type="hidden" name="confirmed" value="yes";
            input type="hidden" name="back" value=(back);
            button.danger type="submit" { "Abort the run" }
            " "
            a href=(back) { "Keep it running" }
        }
    };
    page::layout("Abort a run", Some(session), Nav::Runs, body).into_response()
}

/// `GET /ui/runs/{id}/abort`: asks first.
pub async fn abort_confirm(
    State(state): State<UiState>,
    session: Session,
    Path(id): Path<String>,
) -> Result<Response, Fail> {
    session.require(Role::Operator, "Aborting a run")?;
    let run = one(&state, &id).await?;
    if run.status.is_terminal() {
        return Ok(Redirect::to(&format!("/ui/runs/{}", run.id)).into_response());
    }
    Ok(confirm_page(
        &run,
        &session,
        &format!("/ui/runs/{}", run.id),
    ))
}

/// `POST /ui/runs/{id}/abort` (operator).
pub async fn abort(
    State(state): State<UiState>,
    Path(id): Path<String>,
    Posted(session, form): Posted<AbortForm>,
) -> Result<Response, Fail> {
    session.require(Role::Operator, "Aborting a run")?;
    let id = run_id(&id)?;
    let back = if form.back.is_empty() {
        format!("/ui/runs/{id}")
    } else {
        session::safe_next(Some(&form.back)).to_owned()
    };
    if form.confirmed != "yes" {
        let run = one(&state, id).await?;
        return Ok(confirm_page(&run, &session, &back));
    }
    match crate::queue::abort_as(&state.pool, id, Some(&session.name)).await {
        Ok(_) => Ok(Redirect::to(&back).into_response()),
        Err(AbortError::NoSuchRun(_)) => Err(Fail::not_found("There is no such run.")),
        Err(e) => Err(Fail::internal("abort", &e)),
    }
}

/// A run's error report, as the API serves it.
pub async fn errors_csv(
    State(state): State<UiState>,
    _session: Session,
    Path(id): Path<String>,
) -> Result<Response, Fail> {
    let run = one(&state, &id).await?;
    let mut out = Vec::new();
    crate::sync::write_error_report(&state.pool, &run.id, &mut out)
        .await
        .map_err(|e| Fail::internal("error report", &e))?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"run-{}-errors.csv\"", run.id),
            ),
        ],
        out,
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
pub struct ProgressQuery {
    /// Run ids, separated by commas.
    ids: String,
}

/// What the script needs to update a run in place.
#[derive(Debug, Serialize)]
struct Progress {
    id: String,
    status: RunStatus,
    done: i64,
    total: Option<i64>,
    errors: i64,
    counts: RunCounts,
}

/// The most runs one poll may ask about.
const MAX_POLLED: usize = 100;

/// `GET /ui/progress?ids=A,B`: the progress of those runs, as JSON. A
/// request without a session gets 401 (the script then stops polling).
pub async fn progress(
    State(state): State<UiState>,
    headers: HeaderMap,
    q: Result<Query<ProgressQuery>, QueryRejection>,
) -> Result<Response, Fail> {
    if session::current(&state, &headers).await?.is_none() {
        return Ok((
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"error": "not signed in"})),
        )
            .into_response());
    }
    let Query(q) = q.map_err(|_| Fail::bad_request("ids is missing"))?;
    let mut out = Vec::new();
    for id in q.ids.split(',').map(str::trim).take(MAX_POLLED) {
        let Ok(id) = run_id(id) else { continue };
        if let Some(run) = runs::get(&state.pool, id).await? {
            out.push(Progress {
                status: run.status,
                done: run.subjects_done.unwrap_or(0),
                total: run.subjects_total,
                errors: run.error_count,
                counts: run.counts,
                id: run.id,
            });
        }
    }
    Ok(Json(serde_json::json!({ "runs": out })).into_response())
}
