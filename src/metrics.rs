//! Metrics: Prometheus text on `/metrics`, beside `/healthz` and `/readyz`,
//! on a port of its own (`METRICS_LISTEN`) in every long-running process.
//!
//! Two kinds of series:
//!
//! - **Events** (run outcomes and durations, records written, batch
//!   durations, OpenClinica and OpenSpecimen requests, abort latency,
//!   notification deliveries) are counted where they happen through the
//!   `metrics` facade and rendered by `metrics-exporter-prometheus`. They
//!   are per process; Prometheus sums them across pods.
//! - **State** (runs by status and CP, progress of runs in progress, queue
//!   depth and the age of the oldest queued run, live workers, the last
//!   successful sync and the schedule of each CP) is read from the database
//!   at scrape time, because the queue is shared: a gauge kept in one
//!   process's memory would be wrong as soon as another process touched the
//!   queue. When the database does not answer within [`STATE_TIMEOUT`], the
//!   event series are still served and `ocsync_up{component="database"}`
//!   says 0.
//!
//! Labels come from closed sets (status, mode, trigger, entity, outcome,
//! upstream, status class, channel) plus the CP id; never run ids, subject
//! keys or values. Every series has help text, registered by [`install`].

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;

use crate::cp::CronSchedule;
use crate::sink::Counts;

/// The Import Logs' status words (`ocsync.run_status`).
const RUN_STATUSES: [&str; 5] = ["Queued", "In Progress", "Success", "Failed", "Aborted"];

/// How long one scrape waits for the database before serving without the
/// state series.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(3);

/// Run outcomes (terminal only): `cp`, `mode`, `trigger`, `status`.
pub const RUNS_FINISHED: &str = "ocsync_runs_finished_total";
/// Seconds from a run's first start to its end: `cp`, `status`.
pub const RUN_DURATION: &str = "ocsync_run_duration_seconds";
/// Records written: `cp`, `entity`, `outcome`.
pub const RECORDS: &str = "ocsync_records_total";
/// Subjects a batch handled: `cp`.
pub const SUBJECTS: &str = "ocsync_subjects_processed_total";
/// Seconds to map, write and checkpoint one batch: `cp`.
pub const BATCH_DURATION: &str = "ocsync_batch_duration_seconds";
/// Upstream request latency: `upstream`, `status_class`.
pub const REQUEST_DURATION: &str = "ocsync_upstream_request_duration_seconds";
/// Upstream requests that failed: `upstream`, `status_class`.
pub const REQUEST_ERRORS: &str = "ocsync_upstream_request_errors_total";
/// Seconds from an abort request to the run's end: `cp`.
pub const ABORT_LATENCY: &str = "ocsync_abort_latency_seconds";
/// Notification delivery attempts: `cp`, `channel`, `outcome`.
pub const NOTIFICATIONS: &str = "ocsync_notifications_total";

/// Which upstream a request went to (the `upstream` label).
#[derive(Debug, Clone, Copy)]
pub enum Upstream {
    OpenClinica,
    OpenSpecimen,
}

impl Upstream {
    fn label(self) -> &'static str {
        match self {
            Self::OpenClinica => "openclinica",
            Self::OpenSpecimen => "openspecimen",
        }
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once) and describes every series.
/// Later calls return the same handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            // Histograms as buckets (aggregatable across pods), not summaries.
            let fast = &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ];
            let slow = &[
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(RUN_DURATION.into()), slow)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(ABORT_LATENCY.into()), fast))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_DURATION.into()), fast))
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), fast)
                })
                .expect("bucket lists are not empty")
                .install_recorder()
                .unwrap_or_else(|_| {
                    // Another recorder owns the process (a test harness):
                    // keep a private one so /metrics still answers.
                    PrometheusBuilder::new().build_recorder().handle()
                });
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        RUNS_FINISHED,
        "Sync runs that ended, by CP, mode (incremental|all|subjects), trigger (schedule|user|sql) and status (success|failed|aborted)."
    );
    describe_histogram!(
        RUN_DURATION,
        Unit::Seconds,
        "Duration of ended sync runs from their first start to their end, by CP and status."
    );
    describe_counter!(
        RECORDS,
        "Records handled by sync runs, by CP, entity (participant|visit|specimen|form_record) and outcome (created|updated|unchanged|failed)."
    );
    describe_counter!(SUBJECTS, "Subjects handled by committed batches, by CP.");
    describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "Time to map, write and checkpoint one batch, by CP."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Latency of single HTTP requests to OpenClinica and OpenSpecimen (each retry counts), by upstream and status class (2xx|3xx|4xx|5xx|timeout|network)."
    );
    describe_counter!(
        REQUEST_ERRORS,
        "HTTP requests to OpenClinica and OpenSpecimen that failed (5xx, 429, timeout, network), by upstream and status class."
    );
    describe_counter!(
        NOTIFICATIONS,
        "Notification delivery attempts, by CP, channel (email|webhook) and outcome (sent|retry|failed: given up)."
    );
    describe_histogram!(
        ABORT_LATENCY,
        Unit::Seconds,
        "Time from an abort request to the end of the running run it stopped, by CP."
    );
}

/// The status class label of one upstream exchange.
pub fn status_class(status: Option<u16>, timed_out: bool) -> &'static str {
    match (status, timed_out) {
        (_, true) => "timeout",
        (None, false) => "network",
        (Some(s), _) => match s / 100 {
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            5 => "5xx",
            _ => "network",
        },
    }
}

/// Records one upstream exchange (one attempt, retries counted apart).
pub fn upstream_request(
    upstream: Upstream,
    elapsed: Duration,
    status: Option<u16>,
    timed_out: bool,
) {
    let class = status_class(status, timed_out);
    let labels = [("upstream", upstream.label()), ("status_class", class)];
    histogram!(REQUEST_DURATION, &labels).record(elapsed.as_secs_f64());
    // 4xx other than 429 are answers the clients interpret (the 3.x login
    // page, an expired session), not failures of the upstream.
    let failed = matches!(class, "5xx" | "timeout" | "network") || status == Some(429);
    if failed {
        counter!(REQUEST_ERRORS, &labels).increment(1);
    }
}

/// Records one notification delivery attempt (`outcome`: sent, retry or
/// failed).
pub fn notification_attempt(cp: &str, channel: &'static str, outcome: &'static str) {
    counter!(NOTIFICATIONS, "cp" => cp.to_owned(), "channel" => channel, "outcome" => outcome)
        .increment(1);
}

/// Records one committed batch: its duration, subjects and record counts.
pub fn batch_committed(cp: &str, subjects: u64, counts: &Counts, elapsed: Duration) {
    let cp = cp.to_owned();
    histogram!(BATCH_DURATION, "cp" => cp.clone()).record(elapsed.as_secs_f64());
    counter!(SUBJECTS, "cp" => cp.clone()).increment(subjects);
    for (entity, c) in [
        ("participant", &counts.participants),
        ("visit", &counts.visits),
        ("specimen", &counts.specimens),
        ("form_record", &counts.form_records),
    ] {
        for (outcome, n) in [
            ("created", c.created),
            ("updated", c.updated),
            ("unchanged", c.unchanged),
            ("failed", c.failed),
        ] {
            // Touch zero counts too, so every series exists from the first
            // batch on and rate() has a starting point.
            counter!(RECORDS, "cp" => cp.clone(), "entity" => entity, "outcome" => outcome)
                .increment(n);
        }
    }
}

/// Records how an attempt of a run ended, when it ended the run: reads the
/// row once (mode, trigger, first start, abort request) so the labels come
/// from what enqueue validated, not from the payload.
///
/// `ok` is whether the handler returned `Ok`; `attempt` its attempt number.
pub async fn run_attempt_ended(pool: &PgPool, run_id: &str, ok: bool, attempt: i32) {
    type Row = (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        i32,
        Option<f64>,
        Option<f64>,
    );
    let row: Result<Option<Row>, sqlx::Error> = sqlx::query_as(
        "SELECT metadata -> 'cp', metadata -> 'mode', metadata -> 'trigger', \
                metadata -> 'result', max_attempts, \
                extract(epoch FROM clock_timestamp() - (metadata -> 'started_at')::timestamptz)::float8, \
                extract(epoch FROM clock_timestamp() - (metadata -> 'abort')::timestamptz)::float8 \
           FROM apalis.jobs WHERE id = $1",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await;
    let Ok(Some((Some(cp), mode, trigger, result, max_attempts, ran, abort))) = row else {
        return;
    };
    let status = match (ok, abort, result.as_deref()) {
        (false, Some(_), _) => "aborted",
        (true, _, Some("success")) => "success",
        (true, _, Some("failed")) => "failed",
        // `fail` spends the remaining attempts: the run is over.
        (false, None, _) if attempt >= max_attempts => "failed",
        // Released at shutdown, lost to another worker, or a retry to come.
        _ => return,
    };
    let mode = closed(mode.as_deref(), &["incremental", "all", "subjects"]);
    let trigger = closed(trigger.as_deref(), &["schedule", "user", "sql"]);
    // The other statuses are touched with 0, so "failed" exists (and
    // increase() works) before the first failure.
    for s in ["success", "failed", "aborted"] {
        counter!(RUNS_FINISHED, "cp" => cp.clone(), "mode" => mode, "trigger" => trigger, "status" => s)
            .increment(u64::from(s == status));
    }
    if let Some(secs) = ran {
        histogram!(RUN_DURATION, "cp" => cp.clone(), "status" => status).record(secs.max(0.0));
    }
    if let (Some(secs), "aborted") = (abort, status) {
        histogram!(ABORT_LATENCY, "cp" => cp).record(secs.max(0.0));
    }
}

/// `value` when it is one of `allowed`, else `other`: labels stay a closed
/// set even if a row was edited by hand.
fn closed(value: Option<&str>, allowed: &[&'static str]) -> &'static str {
    value
        .and_then(|v| allowed.iter().find(|a| **a == v).copied())
        .unwrap_or("other")
}

/// What the metrics server needs.
#[derive(Clone)]
pub struct MetricsState {
    pub pool: PgPool,
    pub handle: PrometheusHandle,
    /// The schedule of CPs without one of their own (`SCHEDULE_CRON`).
    pub default_schedule: CronSchedule,
}

/// `/metrics`, `/healthz` and `/readyz`. The probes answer as the API's
/// do, so a worker pod is probed like an API pod.
pub fn router(state: MetricsState) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Ready when the database answers and its schema is the expected one.
async fn readyz(State(state): State<MetricsState>) -> Response {
    match crate::db::schema_status(&state.pool).await {
        Ok(status) if status.is_current() => (StatusCode::OK, "ready").into_response(),
        Ok(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: database schema is not at the expected version; run `ocsync migrate`",
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: database unreachable",
            )
                .into_response()
        }
    }
}

/// Serves the metrics router on `listen` until `shutdown` resolves.
pub async fn serve(
    listen: SocketAddr,
    state: MetricsState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind METRICS_LISTEN={listen}: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Starts the metrics server in the background; its failure to bind is
/// logged, not fatal, so a port clash cannot stop the sync itself.
pub fn spawn(
    config: &crate::config::Config,
    pool: PgPool,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let state = MetricsState {
        pool,
        handle: install(),
        default_schedule: config.queue.schedule_cron.clone(),
    };
    let listen = config.metrics.listen;
    tokio::spawn(async move {
        if let Err(e) = serve(listen, state, async move { stop.cancelled().await }).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    })
}

async fn scrape(State(state): State<MetricsState>) -> Response {
    state.handle.run_upkeep();
    let mut body = state.handle.render();
    let db = tokio::time::timeout(STATE_TIMEOUT, render_state(&state)).await;
    let up = match db {
        Ok(Ok(text)) => {
            body.push_str(&text);
            1
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics: reading queue state failed");
            0
        }
        Err(_) => {
            tracing::warn!("metrics: reading queue state timed out");
            0
        }
    };
    gauge_family(
        &mut body,
        "ocsync_up",
        "Whether a dependency answered this scrape (1) or not (0), by component.",
        &[(vec![("component", "database".to_owned())], f64::from(up))],
    );
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

type Series = Vec<(Vec<(&'static str, String)>, f64)>;

/// The database-derived series, read in one transaction so they agree.
async fn render_state(state: &MetricsState) -> Result<String, sqlx::Error> {
    let started = Instant::now();
    let mut tx = state.pool.begin().await?;
    let runs: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT coalesce(cp, ''), status, count(*) FROM ocsync.import_logs GROUP BY 1, 2",
    )
    .fetch_all(&mut *tx)
    .await?;
    // One active run per CP, so the CP alone names it.
    let progress: Vec<(String, Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT coalesce(cp, ''), subjects_done, subjects_total FROM ocsync.import_logs \
          WHERE status = 'In Progress'",
    )
    .fetch_all(&mut *tx)
    .await?;
    // Due now: waiting for a retry's backoff is not queue depth.
    let (depth, oldest): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM now() - min(run_at))::float8 FROM apalis.jobs \
          WHERE job_type = 'ocsync.sync' AND status IN ('Pending', 'Queued') AND run_at <= now()",
    )
    .fetch_one(&mut *tx)
    .await?;
    let workers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM apalis.workers \
          WHERE worker_type = $1 AND last_seen > now() - interval '2 minutes'",
    )
    .bind(crate::queue::QUEUE)
    .fetch_one(&mut *tx)
    .await?;
    let cps: Vec<(String, bool, Option<String>, Option<f64>)> = sqlx::query_as(
        "SELECT c.id, c.enabled, c.config ->> 'schedule', \
                (SELECT extract(epoch FROM max(l.finished_at))::float8 FROM ocsync.import_logs l \
                  WHERE l.cp = c.id AND l.status = 'Success') \
           FROM ocsync.cps c ORDER BY c.id",
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;

    let mut out = String::new();
    // Every status of every CP, zero included, so a status that empties
    // goes to 0 instead of vanishing.
    let mut by_status: std::collections::BTreeMap<(String, &'static str), f64> = cps
        .iter()
        .flat_map(|(cp, ..)| RUN_STATUSES.map(|s| ((cp.clone(), s), 0.0)))
        .collect();
    for (cp, status, n) in runs {
        let s = closed(Some(&status), &RUN_STATUSES);
        *by_status.entry((cp, s)).or_default() += n as f64;
    }
    gauge_family(
        &mut out,
        "ocsync_runs",
        "Sync runs kept in the Import Logs, by CP and status (Queued|In Progress|Success|Failed|Aborted); read from the database at scrape time.",
        &by_status
            .into_iter()
            .map(|((cp, s), n)| (vec![("cp", cp), ("status", s.to_owned())], n))
            .collect::<Series>(),
    );
    // Every CP, 0 when it has no run in progress, so the progress panel
    // lists idle CPs too.
    let mut active: std::collections::BTreeMap<String, (f64, f64)> = cps
        .iter()
        .map(|(cp, ..)| (cp.clone(), (0.0, 0.0)))
        .collect();
    for (cp, d, t) in progress {
        active.insert(cp, (d.unwrap_or(0) as f64, t.unwrap_or(0) as f64));
    }
    let done: Series = active
        .iter()
        .map(|(cp, (d, _))| (vec![("cp", cp.clone())], *d))
        .collect();
    let total: Series = active
        .iter()
        .map(|(cp, (_, t))| (vec![("cp", cp.clone())], *t))
        .collect();
    gauge_family(
        &mut out,
        "ocsync_run_subjects_done",
        "Subjects done so far by the CP's run in progress (0 when none runs).",
        &done,
    );
    gauge_family(
        &mut out,
        "ocsync_run_subjects_total",
        "Subjects the CP's run in progress has to do (0 when unknown or none runs).",
        &total,
    );
    gauge_family(
        &mut out,
        "ocsync_queue_depth",
        "Sync runs due and waiting for a worker.",
        &[(vec![], depth as f64)],
    );
    gauge_family(
        &mut out,
        "ocsync_queue_oldest_age_seconds",
        "How long the oldest due run has waited for a worker (0 when none waits).",
        &[(vec![], oldest.unwrap_or(0.0).max(0.0))],
    );
    gauge_family(
        &mut out,
        "ocsync_workers_live",
        "Workers whose heartbeat was seen in the last two minutes.",
        &[(vec![], workers as f64)],
    );
    let mut last = Series::new();
    let mut interval = Series::new();
    let mut enabled = Series::new();
    for (cp, on, schedule, success) in cps {
        if let Some(t) = success {
            last.push((vec![("cp", cp.clone())], t));
        }
        let schedule = schedule
            .and_then(|s| CronSchedule::parse(s).ok())
            .unwrap_or_else(|| state.default_schedule.clone());
        if let Some(secs) = schedule_interval(&schedule) {
            interval.push((vec![("cp", cp.clone())], secs));
        }
        enabled.push((vec![("cp", cp)], if on { 1.0 } else { 0.0 }));
    }
    gauge_family(
        &mut out,
        "ocsync_cp_last_success_timestamp_seconds",
        "Unix time the CP's last successful run ended (absent until one has).",
        &last,
    );
    gauge_family(
        &mut out,
        "ocsync_cp_schedule_interval_seconds",
        "Longest gap between two ticks of the CP's schedule in the coming week.",
        &interval,
    );
    gauge_family(
        &mut out,
        "ocsync_cp_enabled",
        "Whether the CP takes part in the schedule (1) or not (0).",
        &enabled,
    );
    gauge_family(
        &mut out,
        "ocsync_state_scrape_duration_seconds",
        "Time the database took to answer this scrape's state queries.",
        &[(vec![], started.elapsed().as_secs_f64())],
    );
    Ok(out)
}

/// The longest gap between ticks over the next eight days, in seconds; so
/// "no success for two intervals" holds for weekly and weekday schedules.
fn schedule_interval(schedule: &CronSchedule) -> Option<f64> {
    let cron = crate::schedule::Cron::new(schedule).ok()?;
    let start = chrono::Utc::now();
    let start = start - Duration::from_secs(u64::from(chrono::Timelike::second(&start)));
    let mut prev = None;
    let mut longest = 0i64;
    for minute in 0..(8 * 24 * 60) {
        let t = start + chrono::Duration::minutes(minute);
        if cron.matches(t) {
            if let Some(p) = prev {
                longest = longest.max(minute - p);
            }
            prev = Some(minute);
        }
    }
    prev.map(|_| (longest.max(1) * 60) as f64)
}

/// Appends one gauge family in Prometheus text format.
fn gauge_family(
    out: &mut String,
    name: &str,
    help: &str,
    series: &[(Vec<(&'static str, String)>, f64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    for (labels, value) in series {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
        }
    }
}

/// Label value escaping of the text format: backslash, quote, newline.
fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes_are_a_closed_set() {
        assert_eq!(status_class(Some(200), false), "2xx");
        assert_eq!(status_class(Some(302), false), "3xx");
        assert_eq!(status_class(Some(429), false), "4xx");
        assert_eq!(status_class(Some(503), false), "5xx");
        assert_eq!(status_class(None, false), "network");
        assert_eq!(status_class(None, true), "timeout");
    }

    #[test]
    fn labels_outside_the_set_become_other() {
        assert_eq!(closed(Some("all"), &["all"]), "all");
        assert_eq!(closed(Some("x"), &["all"]), "other");
        assert_eq!(closed(None, &["all"]), "other");
    }

    #[test]
    fn gauges_render_with_help_and_escaped_labels() {
        let mut out = String::new();
        gauge_family(
            &mut out,
            "g",
            "Help.",
            &[(vec![("cp", "a\"b".to_owned())], 2.0)],
        );
        assert_eq!(out, "# HELP g Help.\n# TYPE g gauge\ng{cp=\"a\\\"b\"} 2\n");
    }

    #[test]
    fn hourly_schedules_have_an_hour_between_ticks() {
        let s = CronSchedule::parse("0 * * * *".to_owned()).unwrap();
        assert_eq!(schedule_interval(&s), Some(3600.0));
        let d = CronSchedule::parse("30 2 * * 1-5".to_owned()).unwrap();
        assert_eq!(schedule_interval(&d), Some(3.0 * 86400.0));
    }
}
