//! Retention: finished runs (Success, Failed, Aborted) and their error
//! rows are deleted `RETENTION_DAYS` after they ended (apalis keeps rows
//! forever). Runs in every worker once an hour; concurrent prunes are
//! harmless (a row is deleted once).
//!
//! It also sweeps poison pills the handler has not met yet: a Pending run
//! whose attempts are spent (apalis re-enqueues a dead worker's job with
//! one more attempt but never checks it against `max_attempts`).

use std::time::Duration;

use sqlx::PgPool;
use sqlx::types::chrono::{DateTime, Utc};

use super::job::QUEUE;

/// Deletes runs that ended before `older_than`; returns how many.
pub async fn prune(pool: &PgPool, older_than: DateTime<Utc>) -> Result<i64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar("SELECT ocsync.prune_runs($1)")
        .bind(older_than)
        .fetch_one(pool)
        .await?;
    if n > 0 {
        tracing::info!(runs = n, "pruned finished runs");
    }
    Ok(n)
}

/// Ends as Failed every Pending run whose attempts are spent; returns how many.
pub async fn fail_exhausted(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE apalis.jobs SET status = 'Failed', done_at = now(), \
                metadata = metadata || hstore('error', 'gave up: the run kept losing its worker (crash or kill) before finishing') \
         WHERE job_type = $1 AND status = 'Pending' AND attempts >= max_attempts",
    )
    .bind(QUEUE)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Prunes once an hour (first at start) until `stop` is cancelled.
pub async fn run_periodically(
    pool: PgPool,
    keep: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cutoff =
            Utc::now() - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::days(30));
        if let Err(e) = prune(&pool, cutoff).await {
            tracing::warn!(error = %e, "pruning finished runs failed; will try again");
        }
        if let Err(e) = fail_exhausted(&pool).await {
            tracing::warn!(error = %e, "sweeping exhausted runs failed; will try again");
        }
    }
}
