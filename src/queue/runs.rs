//! Runs as users know them: the Import Logs (`ocsync.import_logs`), one
//! run's details, and the status words.
//!
//! The status is derived in SQL (`ocsync.run_status`) from apalis's row so
//! that the view, the API and the CLI cannot disagree:
//!
//! | apalis row | status |
//! | --- | --- |
//! | Pending, Queued | Queued |
//! | Running | In Progress |
//! | Failed, attempts < max (waiting for its backoff) | Queued (`retrying`) |
//! | Done, result success | Success |
//! | Done, result failed (error rows) | Failed |
//! | Failed, attempts exhausted or permanent error | Failed |
//! | Killed with the abort marker | Aborted |

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use sqlx::PgPool;
use sqlx::types::chrono::{DateTime, Utc};

/// A run's status, as the Import Logs show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RunStatus {
    Queued,
    #[serde(rename = "In Progress")]
    InProgress,
    Success,
    Failed,
    Aborted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "Queued",
            Self::InProgress => "In Progress",
            Self::Success => "Success",
            Self::Failed => "Failed",
            Self::Aborted => "Aborted",
        }
    }

    /// Whether the run has ended (it will not change any more).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Success | Self::Failed | Self::Aborted)
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s
            .trim()
            .to_ascii_lowercase()
            .replace(['_', '-'], " ")
            .as_str()
        {
            "queued" => Ok(Self::Queued),
            "in progress" | "running" => Ok(Self::InProgress),
            "success" => Ok(Self::Success),
            "failed" => Ok(Self::Failed),
            "aborted" => Ok(Self::Aborted),
            other => Err(format!(
                "unknown status {other:?}: expected queued, in_progress, success, failed or aborted"
            )),
        }
    }
}

/// Created / updated / unchanged / failed of one entity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EntityCounts {
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub failed: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunCounts {
    pub participants: EntityCounts,
    pub visits: EntityCounts,
    pub specimens: EntityCounts,
    pub form_records: EntityCounts,
}

/// One row of the Import Logs.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub id: String,
    pub cp: String,
    pub status: RunStatus,
    /// Failed once, waiting for its backoff (status Queued).
    pub retrying: bool,
    pub mode: String,
    pub trigger: String,
    pub requested_by: Option<String>,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub subjects_done: Option<i64>,
    pub subjects_total: Option<i64>,
    pub counts: RunCounts,
    pub error_count: i64,
    /// Why the last attempt failed, when it did (no clinical values).
    pub last_error: Option<String>,
}

#[derive(sqlx::FromRow)]
struct Row {
    run_id: String,
    cp: Option<String>,
    status: String,
    retrying: bool,
    mode: Option<String>,
    trigger: Option<String>,
    requested_by: Option<String>,
    enqueued_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    attempts: i32,
    max_attempts: i32,
    subjects_done: Option<i64>,
    subjects_total: Option<i64>,
    participants_created: Option<i64>,
    participants_updated: Option<i64>,
    participants_unchanged: Option<i64>,
    participants_failed: Option<i64>,
    visits_created: Option<i64>,
    visits_updated: Option<i64>,
    visits_unchanged: Option<i64>,
    visits_failed: Option<i64>,
    specimens_created: Option<i64>,
    specimens_updated: Option<i64>,
    specimens_unchanged: Option<i64>,
    specimens_failed: Option<i64>,
    form_records_created: Option<i64>,
    form_records_updated: Option<i64>,
    form_records_unchanged: Option<i64>,
    form_records_failed: Option<i64>,
    error_count: i64,
    last_error: Option<String>,
}

fn e(c: Option<i64>, u: Option<i64>, n: Option<i64>, f: Option<i64>) -> EntityCounts {
    EntityCounts {
        created: c.unwrap_or(0),
        updated: u.unwrap_or(0),
        unchanged: n.unwrap_or(0),
        failed: f.unwrap_or(0),
    }
}

impl From<Row> for RunInfo {
    fn from(r: Row) -> Self {
        Self {
            status: r.status.parse().unwrap_or(RunStatus::Failed),
            id: r.run_id,
            cp: r.cp.unwrap_or_default(),
            retrying: r.retrying,
            mode: r.mode.unwrap_or_default(),
            trigger: r.trigger.unwrap_or_default(),
            requested_by: r.requested_by,
            enqueued_at: r.enqueued_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            subjects_done: r.subjects_done,
            subjects_total: r.subjects_total,
            counts: RunCounts {
                participants: e(
                    r.participants_created,
                    r.participants_updated,
                    r.participants_unchanged,
                    r.participants_failed,
                ),
                visits: e(
                    r.visits_created,
                    r.visits_updated,
                    r.visits_unchanged,
                    r.visits_failed,
                ),
                specimens: e(
                    r.specimens_created,
                    r.specimens_updated,
                    r.specimens_unchanged,
                    r.specimens_failed,
                ),
                form_records: e(
                    r.form_records_created,
                    r.form_records_updated,
                    r.form_records_unchanged,
                    r.form_records_failed,
                ),
            },
            error_count: r.error_count,
            last_error: r.last_error,
        }
    }
}

/// Which runs to list.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub cp: Option<String>,
    pub status: Option<RunStatus>,
    /// At most this many, newest first (default 50, at most 1000).
    pub limit: Option<u32>,
    /// Only runs older than this run (the next page, going back in time).
    /// Run ids are ULIDs, so their order is the order they were enqueued.
    pub before: Option<String>,
    /// Only runs newer than this run (the page before, going forward in
    /// time): the `limit` oldest of them, still listed newest first.
    pub after: Option<String>,
}

/// The Import Logs, newest first.
pub async fn list(pool: &PgPool, filter: &RunFilter) -> Result<Vec<RunInfo>, sqlx::Error> {
    let limit = i64::from(filter.limit.unwrap_or(50).clamp(1, 1000));
    const WHERE: &str = "WHERE ($1::text IS NULL OR cp = $1) AND ($2::text IS NULL OR status = $2) \
         AND ($4::text IS NULL OR run_id < $4) AND ($5::text IS NULL OR run_id > $5)";
    // Going forward, the page is the oldest runs after the cursor; it is
    // then turned around so every page reads newest first.
    let sql = if filter.after.is_some() {
        format!(
            "SELECT * FROM (SELECT * FROM ocsync.import_logs {WHERE} ORDER BY run_id ASC LIMIT $3) page \
             ORDER BY run_id DESC"
        )
    } else {
        format!("SELECT * FROM ocsync.import_logs {WHERE} ORDER BY run_id DESC LIMIT $3")
    };
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&filter.cp)
        .bind(filter.status.map(RunStatus::as_str))
        .bind(limit)
        .bind(&filter.before)
        .bind(&filter.after)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(RunInfo::from).collect())
}

/// One run, if it exists.
pub async fn get(pool: &PgPool, id: &str) -> Result<Option<RunInfo>, sqlx::Error> {
    let row: Option<Row> = sqlx::query_as("SELECT * FROM ocsync.import_logs WHERE run_id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(RunInfo::from))
}

/// Who aborted each of `ids` that was aborted (read beside [`RunInfo`],
/// which predates the audit).
pub async fn aborted_by(
    pool: &PgPool,
    ids: Vec<String>,
) -> Result<HashMap<String, String>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT run_id, aborted_by FROM ocsync.import_logs \
         WHERE run_id = ANY($1) AND aborted_by IS NOT NULL",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// The newest run of each CP that has one, by CP id.
pub async fn latest_per_cp(pool: &PgPool) -> Result<HashMap<String, RunInfo>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT DISTINCT ON (cp) * FROM ocsync.import_logs \
         WHERE cp IS NOT NULL ORDER BY cp, run_id DESC",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(RunInfo::from)
        .map(|r| (r.cp.clone(), r))
        .collect())
}
