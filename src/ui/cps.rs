//! The CPs (`/ui/cps`) and one CP (`/ui/cps/{cp}`): its last run, when
//! the schedule runs it next, the Synchronize Records form (operator) and
//! its configuration (admins edit it).
//!
//! Starting a run parses the form into the JSON API's
//! [`EnqueueBody`](crate::queue::api::EnqueueBody) and checks it with the
//! same `into_mode` (so `API_MAX_SUBJECTS` and the subject rules hold
//! here too), then calls [`crate::queue::enqueue`]. An edit is read with
//! [`CpConfig::from_toml`] and stored with [`store::update`], which
//! refuses it while the CP has an active run. A refusal is shown on the CP
//! page itself, with what the user typed kept, and names the run in the
//! way with a link to it.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use maud::{Markup, html};
use serde::Deserialize;

use super::page::{self, Fail, Nav};
use super::session::{CsrfForm, Posted, Session};
use super::{UiState, path_segment, query};
use crate::api::tokens::Role;
use crate::cp::{CpConfig, CpId, StoreError, StoredCp, store};
use crate::openclinica::SourceConfig;
use crate::queue::api::{EnqueueBody, ModeParam, SubjectsParam};
use crate::queue::runs::{self, RunInfo};
use crate::queue::{EnqueueError, EnqueueRequest, Trigger};
use crate::schedule;

fn cp_id(text: String) -> Result<CpId, Fail> {
    CpId::parse(text).map_err(|_| Fail::not_found("There is no such CP."))
}

async fn stored(state: &UiState, id: &CpId) -> Result<StoredCp, Fail> {
    match store::get(&state.pool, id).await {
        Ok(cp) => Ok(cp),
        Err(StoreError::NotFound(_)) => Err(Fail::not_found(format!("There is no CP {id}."))),
        Err(e) => Err(Fail::internal("reading a CP", &e)),
    }
}

fn cp_href(id: &str) -> String {
    format!("/ui/cps/{}", path_segment(id))
}

/// Where the CP's data comes from, in words.
fn source(cp: &CpConfig) -> String {
    let kind = match &cp.source {
        SourceConfig::Oc3(_) => "OpenClinica 3.x",
        SourceConfig::Oc4(_) => "OpenClinica 4.x",
        SourceConfig::File(_) => "ODM extract file",
    };
    match cp.study_oid() {
        Some(study) => format!("{kind}, study {study}"),
        None => kind.to_owned(),
    }
}

fn target(cp: &CpConfig) -> &'static str {
    match cp.target.kind() {
        "openspecimen" => "OpenSpecimen",
        _ => "Postgres tables",
    }
}

/// The schedule in words: the CP's own, or the default.
fn schedule_text(cp: &CpConfig, state: &UiState) -> Markup {
    html! {
        @if !cp.enabled {
            "Disabled (runs only on demand)"
        } @else if let Some(own) = &cp.schedule {
            code { (own.as_str()) } " (UTC)"
        } @else {
            code { (state.schedule_cron.as_str()) } " (UTC, the default)"
        }
    }
}

/// The last run, in a line: status, link, time.
fn last_run(run: Option<&RunInfo>) -> Markup {
    html! {
        @match run {
            None => span.note { "Never run" },
            Some(r) => {
                (page::status(r)) " "
                a.mono href=(format!("/ui/runs/{}", r.id)) { (r.id) } br;
                @if let Some(t) = r.finished_at.or(r.started_at).or(r.enqueued_at) { (page::time(t)) }
            }
        }
    }
}

fn next_run(cp: &CpConfig, state: &UiState) -> Markup {
    match schedule::next_run(cp, &state.default_cron, Utc::now()) {
        Some(t) => page::time(t),
        None if !cp.enabled => html! { span.note { "Not scheduled (disabled)" } },
        None => html! { span.note { "Never (the schedule names no date that exists)" } },
    }
}

/// `GET /ui/cps`.
pub async fn list(State(state): State<UiState>, session: Session) -> Result<Response, Fail> {
    let cps = store::list(&state.pool)
        .await
        .map_err(|e| Fail::internal("listing CPs", &e))?;
    let latest = runs::latest_per_cp(&state.pool).await?;
    let body = html! {
        h1 { "CPs" }
        @if cps.is_empty() {
            p.empty { "No CPs are configured. Add one with " code { "ocsync cp add FILE" } "." }
        } @else {
            div.scroll {
                table.cps {
                    caption { "Collection protocols, by id" }
                    thead {
                        tr {
                            th scope="col" { "CP" }
                            th scope="col" { "Source" }
                            th scope="col" { "Target" }
                            th scope="col" { "Last run" }
                            th scope="col" { "Next scheduled run" }
                        }
                    }
                    tbody {
                        @for cp in &cps {
                            @let id = cp.config.id.as_str();
                            tr {
                                th scope="row" { a href=(cp_href(id)) { (id) } }
                                td { (source(&cp.config)) }
                                td { (target(&cp.config)) }
                                td { (last_run(latest.get(id))) }
                                td { (next_run(&cp.config, &state)) }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(page::layout("CPs", Some(&session), Nav::Cps, body).into_response())
}

/// What the CP page says above its forms, and what it keeps of a refused
/// form.
#[derive(Default)]
struct Shown {
    status: Option<StatusCode>,
    /// An error (`role="alert"`) or a confirmation.
    notice: Option<(bool, Markup)>,
    /// The start form as it was sent.
    mode: Option<String>,
    subjects: Option<String>,
    /// The configuration as it was sent, and the version it was edited
    /// from (kept, so that sending it again cannot overwrite a change the
    /// user has not seen).
    config: Option<String>,
    version: Option<i32>,
}

#[derive(Debug, Deserialize)]
pub struct ShowQuery {
    /// After a successful edit: the new version.
    saved: Option<i32>,
}

/// `GET /ui/cps/{cp}`.
pub async fn show(
    State(state): State<UiState>,
    session: Session,
    Path(cp): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Result<Response, Fail> {
    let id = cp_id(cp)?;
    let shown = Shown {
        notice: q.saved.map(|v| {
            (
                false,
                html! { "The configuration was saved as version " (v) "." },
            )
        }),
        ..Shown::default()
    };
    render(&state, &session, &id, shown).await
}

/// The CP page.
async fn render(
    state: &UiState,
    session: &Session,
    id: &CpId,
    shown: Shown,
) -> Result<Response, Fail> {
    let cp = stored(state, id).await?;
    let latest = runs::list(
        &state.pool,
        &crate::queue::RunFilter {
            cp: Some(id.to_string()),
            limit: Some(1),
            ..Default::default()
        },
    )
    .await?;
    let last = latest.first();
    let active = last.filter(|r| !r.status.is_terminal());
    let config = &cp.config;
    let mode = shown.mode.as_deref().unwrap_or("incremental");
    let body = html! {
        h1 { "CP " (id) }
        @if let Some(d) = &config.description { p { (d) } }
        @if let Some((error, text)) = &shown.notice {
            @if *error {
                div.notice.error role="alert" { (text) }
            } @else {
                div.notice role="status" { (text) }
            }
        }
        dl.facts {
            dt { "Source" } dd { (source(config)) }
            dt { "Target" } dd { (target(config)) }
            dt { "Batch size" } dd { (config.batch_size) " subjects" }
            dt { "Schedule" } dd { (schedule_text(config, state)) }
            dt { "Last run" } dd { (last_run(last)) }
            dt { "Next scheduled run" } dd { (next_run(config, state)) }
        }
        @if let Some(run) = active {
            p.notice role="status" {
                "A run of this CP is " (run.status.as_str()) ": "
                a href=(format!("/ui/runs/{}", run.id)) { "run " span.mono { (run.id) } }
                ". Another run, or an edit of the configuration, waits until it ends."
            }
        }
        section aria-labelledby="sync-h" {
            h2 #sync-h { "Synchronize Records" }
            @if session.role >= Role::Operator {
                form.sync method="post" action=(format!("{}/runs", cp_href(id.as_str()))) {
                    input type="hidden" name="csrf" value=(session.csrf);
                    fieldset {
                        legend { "What to synchronize" }
                        div {
                            input #mode-incremental type="radio" name="mode" value="incremental" checked[mode == "incremental"];
                            label for="mode-incremental" { "Incremental" }
                            span.hint { " — only what changed since the last successful run" }
                        }
                        div {
                            input #mode-all type="radio" name="mode" value="all" checked[mode == "all"];
                            label for="mode-all" { "All CRF records" }
                            span.hint { " — every subject" }
                        }
                        div {
                            input #mode-subjects type="radio" name="mode" value="subjects" checked[mode == "subjects"];
                            label for="mode-subjects" { "Selected subjects" }
                        }
                        div.subjects {
                            label for="subjects" { "Subject ids (separated by commas, tabs or new lines)" }
                            textarea #subjects name="subjects" rows="4" cols="40" spellcheck="false" {
                                (shown.subjects.as_deref().unwrap_or(""))
                            }
                        }
                    }
                    button type="submit" { "Synchronize Records" }
                }
            } @else {
                p.note { "Starting a run needs the operator role; you are signed in as a " (session.role) "." }
            }
        }
        section aria-labelledby="config-h" {
            h2 #config-h { "Configuration" }
            p.note {
                "Version " (cp.version) ", last changed " (page::time(cp.updated_at))
                ". Credentials appear only as references to an environment variable or a file."
            }
            @if session.role >= Role::Admin {
                form.config method="post" action=(format!("{}/config", cp_href(id.as_str()))) {
                    input type="hidden" name="csrf" value=(session.csrf);
                    input type="hidden" name="expected_version" value=(shown.version.unwrap_or(cp.version));
                    label for="config" { "Configuration (TOML)" }
                    textarea #config name="config" rows="24" spellcheck="false" {
                        (shown.config.clone().unwrap_or_else(|| config.to_toml()))
                    }
                    @if active.is_some() {
                        p.note { "An edit is refused while a run of this CP is queued or in progress." }
                    }
                    button type="submit" { "Save configuration" }
                }
            } @else {
                pre.config { code { (config.to_toml()) } }
            }
        }
        p { a href=(format!("/ui/runs?{}", query([("cp", Some(id.as_str()))]))) { "All runs of " (id) } }
    };
    let status = shown.status.unwrap_or(StatusCode::OK);
    Ok((
        status,
        page::layout(&format!("CP {id}"), Some(session), Nav::Cps, body),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
pub struct StartForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    mode: String,
    #[serde(default)]
    subjects: String,
}

impl CsrfForm for StartForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// A refusal that names the run in the way and links to it.
fn run_in_the_way(what: &str, cp: &CpId, run: &str, status: &str) -> Markup {
    html! {
        (what) ": CP " (cp) " already has a run that is " (status) ", "
        a href=(format!("/ui/runs/{run}")) { "run " span.mono { (run) } }
        ". Wait for it to end, or abort it, then try again."
    }
}

/// `POST /ui/cps/{cp}/runs` (operator): Synchronize Records.
pub async fn start(
    State(state): State<UiState>,
    Path(cp): Path<String>,
    Posted(session, form): Posted<StartForm>,
) -> Result<Response, Fail> {
    session.require(Role::Operator, "Starting a run")?;
    let id = cp_id(cp)?;
    let refused = |status: StatusCode, text: Markup| Shown {
        status: Some(status),
        notice: Some((true, text)),
        mode: Some(form.mode.clone()),
        subjects: Some(form.subjects.clone()),
        ..Shown::default()
    };
    let (mode, subjects) = match form.mode.as_str() {
        "incremental" => (ModeParam::Incremental, None),
        "all" => (ModeParam::All, None),
        "subjects" => (
            ModeParam::Subjects,
            Some(SubjectsParam::Text(form.subjects.clone())),
        ),
        _ => {
            let shown = refused(
                StatusCode::UNPROCESSABLE_ENTITY,
                html! { "Choose what to synchronize: Incremental, All CRF records or Selected subjects." },
            );
            return render(&state, &session, &id, shown).await;
        }
    };
    let mode = match (EnqueueBody { mode, subjects }).into_mode(state.api.max_subjects) {
        Ok(mode) => mode,
        Err(problem) => {
            let shown = refused(
                StatusCode::UNPROCESSABLE_ENTITY,
                html! { "Not started: " (problem.detail) },
            );
            return render(&state, &session, &id, shown).await;
        }
    };
    let req = EnqueueRequest {
        cp: id.to_string(),
        mode,
        trigger: Trigger::User,
        requested_by: Some(session.name.clone()),
        max_attempts: state.max_attempts,
    };
    match crate::queue::enqueue(&state.pool, &req).await {
        Ok(run) => Ok(Redirect::to(&format!("/ui/runs/{run}")).into_response()),
        Err(EnqueueError::ActiveRun { cp, run, status }) => {
            let cp = CpId::parse(cp).unwrap_or(id.clone());
            let shown = refused(
                StatusCode::CONFLICT,
                run_in_the_way("Not started", &cp, &run, &status),
            );
            render(&state, &session, &id, shown).await
        }
        Err(EnqueueError::NoSuchCp(_)) => Err(Fail::not_found(format!("There is no CP {id}."))),
        Err(EnqueueError::Invalid(msg)) => {
            let shown = refused(
                StatusCode::UNPROCESSABLE_ENTITY,
                html! { "Not started: " (msg) },
            );
            render(&state, &session, &id, shown).await
        }
        Err(e) => Err(Fail::internal("enqueue", &e)),
    }
}

#[derive(Debug, Deserialize)]
pub struct ConfigForm {
    #[serde(default)]
    csrf: String,
    expected_version: i32,
    config: String,
}

impl CsrfForm for ConfigForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /ui/cps/{cp}/config` (admin): replace the configuration.
pub async fn edit(
    State(state): State<UiState>,
    Path(cp): Path<String>,
    Posted(session, form): Posted<ConfigForm>,
) -> Result<Response, Fail> {
    session.require(Role::Admin, "Editing a CP's configuration")?;
    let id = cp_id(cp)?;
    let refused = |status: StatusCode, text: Markup| Shown {
        status: Some(status),
        notice: Some((true, text)),
        config: Some(form.config.clone()),
        version: Some(form.expected_version),
        ..Shown::default()
    };
    // The message names line, column and key; the model accepts only
    // references for credentials, so it never echoes a secret.
    let config = match CpConfig::from_toml(&form.config, "configuration") {
        Ok(c) => c,
        Err(e) => {
            let shown = refused(
                StatusCode::UNPROCESSABLE_ENTITY,
                html! { "Not saved: " (e.to_string()) },
            );
            return render(&state, &session, &id, shown).await;
        }
    };
    if config.id != id {
        let shown = refused(
            StatusCode::UNPROCESSABLE_ENTITY,
            html! { "Not saved: the configuration's id is " (config.id) ", not " (id) "." },
        );
        return render(&state, &session, &id, shown).await;
    }
    match store::update(&state.pool, &config, form.expected_version).await {
        Ok(saved) => {
            tracing::info!(cp.id = %id, version = saved.version, by = %session.name, "CP configuration edited");
            Ok(Redirect::to(&format!(
                "{}?{}",
                cp_href(id.as_str()),
                query([("saved", Some(saved.version.to_string().as_str()))])
            ))
            .into_response())
        }
        Err(StoreError::ActiveRun { run, .. }) => {
            let status = runs::get(&state.pool, &run)
                .await?
                .map(|r| r.status.as_str().to_owned())
                .unwrap_or_else(|| "ending".to_owned());
            let shown = refused(
                StatusCode::CONFLICT,
                run_in_the_way("Not saved", &id, &run, &status),
            );
            render(&state, &session, &id, shown).await
        }
        Err(StoreError::VersionConflict { actual, .. }) => {
            let shown = refused(
                StatusCode::CONFLICT,
                html! {
                    "Not saved: someone else changed this configuration since you opened it (it is now version "
                    (actual) "). Your text is kept below; "
                    a href=(cp_href(id.as_str())) { "reload the page" }
                    " to see theirs, then edit again."
                },
            );
            render(&state, &session, &id, shown).await
        }
        Err(StoreError::NotFound(_)) => Err(Fail::not_found(format!("There is no CP {id}."))),
        Err(e) => Err(Fail::internal("updating a CP", &e)),
    }
}
