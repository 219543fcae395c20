//! Enqueue a run: the Rust face of `ocsync.enqueue_sync`, so the API, the
//! CLI, the schedule and any SQL client share one implementation and one
//! uniqueness rule (the partial unique index, never check-then-insert).

use sqlx::PgPool;

use super::job::Trigger;
use crate::sync::Mode;

/// What to enqueue.
#[derive(Debug, Clone)]
pub struct EnqueueRequest {
    pub cp: String,
    pub mode: Mode,
    pub trigger: Trigger,
    /// Who asked (a user name, `scheduler`); the database user when `None`.
    pub requested_by: Option<String>,
    pub max_attempts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("CP {0} does not exist")]
    NoSuchCp(String),
    #[error("{0}")]
    Invalid(String),
    /// The CP already has a queued, running or retrying run (HTTP 409).
    #[error("CP {cp} already has an active run {run} ({status})")]
    ActiveRun {
        cp: String,
        run: String,
        status: String,
    },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Enqueues a run; returns its id. The run carries this span's trace
/// context in its metadata, so its spans join the caller's trace.
#[tracing::instrument(name = "queue.enqueue", skip_all, fields(cp.id = %req.cp))]
pub async fn enqueue(pool: &PgPool, req: &EnqueueRequest) -> Result<String, EnqueueError> {
    let subjects = match &req.mode {
        Mode::Subjects { subjects } => Some(subjects.clone()),
        _ => None,
    };
    // One transaction, so no worker can take the run before its trace
    // context is stored (the NOTIFY that wakes workers fires at commit).
    let mut tx = pool.begin().await?;
    let result: Result<String, sqlx::Error> =
        sqlx::query_scalar("SELECT ocsync.enqueue_sync($1, $2, $3, $4, $5, $6)")
            .bind(&req.cp)
            .bind(req.mode.name())
            .bind(subjects)
            .bind(req.trigger.as_str())
            .bind(&req.requested_by)
            .bind(req.max_attempts as i32)
            .fetch_one(&mut *tx)
            .await;
    let result = match result {
        Ok(id) => store_trace_context(tx, id).await,
        Err(e) => {
            // Give the connection back before `classify` asks for another:
            // under many concurrent refusals the pool would run dry.
            drop(tx);
            Err(e)
        }
    };
    match result {
        Ok(id) => {
            tracing::info!(run.id = %id, cp.id = %req.cp, mode = %req.mode, trigger = %req.trigger, "run enqueued");
            Ok(id)
        }
        Err(e) => Err(classify(pool, &req.cp, e).await),
    }
}

/// Stores the current span's trace context with the new run and commits.
async fn store_trace_context(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    id: String,
) -> Result<String, sqlx::Error> {
    if let Some(carrier) = crate::telemetry::trace_carrier() {
        sqlx::query("UPDATE apalis.jobs SET metadata = metadata || hstore($2, $3) WHERE id = $1")
            .bind(&id)
            .bind(crate::telemetry::TRACE_CONTEXT_KEY)
            .bind(carrier)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(id)
}

/// Turns the SQL function's errors into ours.
async fn classify(pool: &PgPool, cp: &str, e: sqlx::Error) -> EnqueueError {
    let Some(db) = e.as_database_error() else {
        return e.into();
    };
    match db.code().as_deref() {
        Some("P0002") => EnqueueError::NoSuchCp(cp.to_owned()),
        Some("22023") => EnqueueError::Invalid(db.message().to_owned()),
        Some("23505") => {
            // The message names the run; read its id and status afresh (it
            // may have ended since, which the caller may then retry).
            let row: Option<(String, String)> = sqlx::query_as(
                "SELECT run_id, status FROM ocsync.import_logs \
                 WHERE run_id = ocsync.cp_active_run($1)",
            )
            .bind(cp)
            .fetch_optional(pool)
            .await
            .ok()
            .flatten();
            let (run, status) = row.unwrap_or_else(|| {
                let msg = db.message();
                let run = msg
                    .split_whitespace()
                    .find(|w| w.len() == 26 && w.chars().all(|c| c.is_ascii_alphanumeric()))
                    .unwrap_or("")
                    .to_owned();
                (run, "ended".to_owned())
            });
            EnqueueError::ActiveRun {
                cp: cp.to_owned(),
                run,
                status,
            }
        }
        _ => e.into(),
    }
}
