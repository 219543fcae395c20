//! The [`RunContext`] a queued run gets: progress, counts and cursor go
//! into the job's apalis metadata inside the batch's own transaction, and
//! the same statement reads the abort marker.
//!
//! It knows the job row (id, the worker that holds it) and nothing of the
//! run's content. It does not decide what a stop means: the handler in
//! [`super::worker`] reads [`JobContext::stop_reason`] afterwards.

use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::sync::{Control, Progress, RunContext};

/// Why a run stopped before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Someone aborted it (marker in the row, or the NOTIFY).
    Abort,
    /// This process is shutting down (SIGTERM): the run goes back to the queue.
    Shutdown,
    /// The row is no longer ours (`lock_by` changed: the heartbeat was
    /// lost and another worker took it over). The batch is rolled back.
    Lost,
}

/// The per-attempt context of a run held by one worker.
pub struct JobContext {
    run_id: String,
    worker: String,
    resume: Option<Progress>,
    abort: CancellationToken,
    shutdown: CancellationToken,
    stop: Option<StopReason>,
}

impl JobContext {
    /// `abort` is cancelled when an abort arrives by NOTIFY; `shutdown`
    /// when the process drains.
    pub fn new(
        run_id: String,
        worker: String,
        resume: Option<Progress>,
        abort: CancellationToken,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            run_id,
            worker,
            resume,
            abort,
            shutdown,
            stop: None,
        }
    }

    /// Why the run stopped early, if it did.
    pub fn stop_reason(&self) -> Option<StopReason> {
        if self.abort.is_cancelled() {
            return Some(StopReason::Abort);
        }
        self.stop
    }

    /// The progress an earlier attempt checkpointed, from the job's metadata.
    pub async fn load_progress(
        pool: &PgPool,
        run_id: &str,
    ) -> Result<Option<Progress>, sqlx::Error> {
        let raw: Option<Option<String>> =
            sqlx::query_scalar("SELECT metadata -> 'progress' FROM apalis.jobs WHERE id = $1")
                .bind(run_id)
                .fetch_optional(pool)
                .await?;
        Ok(raw
            .flatten()
            .and_then(|json| serde_json::from_str(&json).ok()))
    }
}

impl RunContext for JobContext {
    fn run_id(&self) -> &str {
        &self.run_id
    }

    fn resume(&self) -> Option<Progress> {
        self.resume.clone()
    }

    async fn checkpoint(
        &mut self,
        tx: &mut PgConnection,
        progress: &Progress,
    ) -> Result<Control, sqlx::Error> {
        let json = serde_json::to_string(progress).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        // One statement: write progress and read the abort marker. No row
        // means another worker holds the job now: fail the batch so it
        // rolls back rather than write next to the new holder.
        let abort: Option<bool> = sqlx::query_scalar(
            "UPDATE apalis.jobs SET metadata = metadata || hstore('progress', $3) \
             WHERE id = $1 AND lock_by = $2 RETURNING metadata ? 'abort'",
        )
        .bind(&self.run_id)
        .bind(&self.worker)
        .bind(json)
        .fetch_optional(&mut *tx)
        .await?;
        match abort {
            None => {
                self.stop = Some(StopReason::Lost);
                Err(sqlx::Error::RowNotFound)
            }
            Some(true) => {
                self.stop = Some(StopReason::Abort);
                Ok(Control::Stop)
            }
            Some(false) if self.shutdown.is_cancelled() => {
                self.stop = Some(StopReason::Shutdown);
                Ok(Control::Stop)
            }
            Some(false) => Ok(Control::Continue),
        }
    }

    fn cancellation(&self) -> CancellationToken {
        self.abort.clone()
    }
}
