//! Abort a run: the Rust face of `ocsync.abort_run`.
//!
//! A waiting run ends at once as Aborted. A running one gets an abort
//! marker in its metadata and a NOTIFY on [`ABORT_CHANNEL`]; its worker
//! cancels the run's token at once (in-flight OpenClinica requests are
//! dropped) and, failing the notification, sees the marker at its next
//! checkpoint. The worker then ends the job Killed, which users see as
//! Aborted; a Killed job is never retried.

use sqlx::PgPool;

/// The LISTEN/NOTIFY channel that carries the id of a run to abort.
pub const ABORT_CHANNEL: &str = "ocsync_run_abort";

#[derive(Debug, thiserror::Error)]
pub enum AbortError {
    #[error("run {0} does not exist")]
    NoSuchRun(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// What an abort request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AbortOutcome {
    /// The run was waiting and is now Aborted.
    Aborted,
    /// The run is in a worker's hands and stops at its next batch boundary.
    Aborting,
    /// The run had already ended with this status; nothing changed.
    AlreadyEnded(String),
}

/// Asks run `id` to stop.
pub async fn abort(pool: &PgPool, id: &str) -> Result<AbortOutcome, AbortError> {
    abort_as(pool, id, None).await
}

/// Asks run `id` to stop on behalf of `by` (an API token's name), which
/// the run records as `aborted_by`; `None` records the database user.
pub async fn abort_as(
    pool: &PgPool,
    id: &str,
    by: Option<&str>,
) -> Result<AbortOutcome, AbortError> {
    // The two-argument form records who asked; the one-argument form is
    // the same rule without the audit (for SQL clients).
    let query = match by {
        Some(by) => sqlx::query_scalar("SELECT ocsync.abort_run($1, $2)")
            .bind(id)
            .bind(by),
        None => sqlx::query_scalar("SELECT ocsync.abort_run($1)").bind(id),
    };
    let status: String = query.fetch_one(pool).await.map_err(|e| {
        match e.as_database_error().and_then(|d| d.code()) {
            Some(code) if code == "P0002" => AbortError::NoSuchRun(id.to_owned()),
            _ => AbortError::Database(e),
        }
    })?;
    match by {
        Some(by) => {
            tracing::info!(run.id = %id, outcome = %status, aborted_by = %by, "abort requested")
        }
        None => tracing::info!(run.id = %id, outcome = %status, "abort requested"),
    }
    Ok(match status.as_str() {
        "Aborted" => AbortOutcome::Aborted,
        "Aborting" => AbortOutcome::Aborting,
        _ => AbortOutcome::AlreadyEnded(status),
    })
}
