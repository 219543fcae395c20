//! The worker: apalis wiring and the handler that runs one sync attempt.
//!
//! Wiring (see APALIS.md for why each setting): `PostgresStorage` on queue
//! [`QUEUE`], woken by LISTEN/NOTIFY with a poll interval as fallback
//! ([`super::wake`]: apalis's own combination stops ticking);
//! concurrency and fetch batch size equal; heartbeat interval and missed
//! heartbeats from the configuration; the worker named `<host>-<ulid>` so a
//! restarted process never revives a dead one's name and strands its jobs.
//!
//! The handler (one attempt of one run):
//! 1. claims the row (`lock_by` is this worker), records `started_at` the
//!    first time, reads the abort marker and the attempt count: an aborted
//!    run ends Killed without running; a run past `max_attempts` (a poison
//!    pill that kept killing its workers, which apalis does not check for
//!    Pending rows) ends Failed without running;
//! 2. loads the CP and runs `sync::run` with a [`JobContext`], under the
//!    run timeout (inside the handler: the tower timeout layer would leave
//!    the row Running forever);
//! 3. maps the outcome: Success/Failed → Done with `result` in metadata;
//!    abort → `AbortError` → Killed; shutdown → the row goes back to Pending
//!    by our own UPDATE (which clears `lock_by`, so apalis's ack matches
//!    nothing and no attempt is spent); a transient error → `run_at` moved
//!    forward by the backoff, then a plain error → Failed, picked up again
//!    when due; a permanent error or the last attempt → `max_attempts`
//!    lowered to this attempt, so the Failed row is terminal, and the reason
//!    becomes a row of the error report. Never `RetryAfterError` or
//!    `DeferredError`: they loop hot and ignore `max_attempts`.
//!
//! It does not know what a run does inside: that is `sync`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apalis::prelude::*;
use apalis_core::backend::ext::poll_strategy::PollWith;
use apalis_postgres::{PostgresStorage, Pubsub};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::abort::ABORT_CHANNEL;
use super::context::{JobContext, StopReason};
use super::job::{QUEUE, SyncJob};
use crate::config::QueueConfig;
use crate::cp::{CpId, StoreError, store};
use crate::openclinica::SourceRegistry;
use crate::sync::{self, RunResult, SyncError};

/// Abort tokens of the runs this process is running, by run id.
#[derive(Clone, Default)]
pub struct AbortTokens(Arc<Mutex<HashMap<String, CancellationToken>>>);

impl AbortTokens {
    fn register(&self, id: &str) -> CancellationToken {
        let token = CancellationToken::new();
        self.0
            .lock()
            .expect("abort tokens lock")
            .insert(id.to_owned(), token.clone());
        token
    }

    fn remove(&self, id: &str) {
        self.0.lock().expect("abort tokens lock").remove(id);
    }

    /// Cancels run `id`'s token, if this process runs it.
    pub fn cancel(&self, id: &str) -> bool {
        match self.0.lock().expect("abort tokens lock").get(id) {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    fn len(&self) -> usize {
        self.0.lock().expect("abort tokens lock").len()
    }
}

/// What every handler call shares.
pub struct Deps {
    pub pool: PgPool,
    pub sources: SourceRegistry,
    pub config: QueueConfig,
    pub aborts: AbortTokens,
    /// Cancelled when the process drains: runs stop at their next batch
    /// boundary and go back to the queue.
    pub shutdown: CancellationToken,
}

/// A worker name unique across hosts and restarts: `<host>-<ulid>`.
pub fn worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ocsync".to_owned());
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!("{host}-{}", ulid::Ulid::from_parts(ms, rand::random()))
}

/// Checks (and re-creates when missing) the one-active-run-per-CP index.
pub async fn ensure_guards(pool: &PgPool) -> Result<(), anyhow::Error> {
    let ok: bool = sqlx::query_scalar("SELECT ocsync.ensure_queue_guards()")
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(
        ok,
        "the one-active-run-per-CP index on apalis.jobs is missing and could not be created"
    );
    Ok(())
}

/// Runs a worker until `shutdown` resolves, then drains: every run in
/// progress finishes its current batch, checkpoints and goes back to the
/// queue; the worker then leaves.
pub async fn run_worker(
    pool: PgPool,
    config: QueueConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    ensure_guards(&pool).await?;
    let name = worker_name();
    let deps = Arc::new(Deps {
        pool: pool.clone(),
        sources: SourceRegistry::new(),
        config: config.clone(),
        aborts: AbortTokens::default(),
        shutdown: CancellationToken::new(),
    });
    let listener = tokio::spawn(listen_for_aborts(pool.clone(), deps.aborts.clone()));

    let apalis_config = apalis_postgres::Config::default()
        .queue(QUEUE)
        .batch_size(config.concurrency)
        .heartbeat_interval(config.heartbeat)
        .missed_heartbeats(config.missed_heartbeats);
    let storage = PostgresStorage::<SyncJob>::new(&pool).with_config(apalis_config);
    let strategy = super::wake::Wake::new(
        Pubsub::new(pool.clone(), QUEUE.to_owned()),
        config.poll_interval,
    );
    let backend = PollWith::new(storage, strategy);

    tracing::info!(worker = %name, concurrency = config.concurrency, "worker started");
    let worker = WorkerBuilder::new(name.as_str())
        .backend(backend)
        .concurrency(config.concurrency)
        .data(deps.clone())
        .build(handle);
    let drain = deps.shutdown.clone();
    let signal = async move {
        shutdown.await;
        // Tell the runs first, so they stop at their next batch boundary,
        // then let apalis stop fetching and wait for them.
        drain.cancel();
        Ok::<(), std::io::Error>(())
    };
    let result = worker.run_until(signal).await;
    // apalis waits for its tracked tasks; this is a belt for the braces.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while deps.aborts.len() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    listener.abort();
    tracing::info!(worker = %name, "worker stopped");
    result.map_err(|e| anyhow::anyhow!("worker failed: {e}"))
}

/// Cancels the token of every run this process holds when its abort is
/// NOTIFYed. Notifications are lost across reconnects; the per-batch check
/// of the marker is the fallback.
async fn listen_for_aborts(pool: PgPool, aborts: AbortTokens) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "abort listener cannot connect; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(ABORT_CHANNEL).await {
            tracing::warn!(error = %e, "abort listener cannot LISTEN; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        loop {
            match listener.recv().await {
                Ok(n) => {
                    if aborts.cancel(n.payload()) {
                        tracing::info!(run.id = %n.payload(), "abort received");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "abort listener lost its connection");
                    break;
                }
            }
        }
    }
}

/// The handler's error: apalis only needs to know Failed from Killed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RunFailed(String);

/// One attempt of one run.
async fn handle(
    job: SyncJob,
    id: TaskId,
    attempt: Attempt,
    worker: WorkerContext,
    deps: Data<Arc<Deps>>,
) -> Result<(), BoxDynError> {
    let run_id = id.to_string();
    let me = worker.name().to_owned();
    let attempt = attempt.current() as i32;
    let span = tracing::info_span!("queue.run", run.id = %run_id, cp.id = %job.cp, attempt);
    // Join the trace of the request that enqueued the run.
    if let Ok(Some(carrier)) = sqlx::query_scalar::<_, Option<String>>(
        "SELECT metadata -> $2 FROM apalis.jobs WHERE id = $1",
    )
    .bind(&run_id)
    .bind(crate::telemetry::TRACE_CONTEXT_KEY)
    .fetch_one(&deps.pool)
    .await
    {
        crate::telemetry::set_parent_from(&span, &carrier);
    }
    let _enter = span.enter();
    drop(_enter);
    let deps: &Deps = &deps;
    let token = deps.aborts.register(&run_id);
    let result = tracing::Instrument::instrument(
        attempt_run(deps, &job, &run_id, &me, attempt, token),
        span,
    )
    .await;
    deps.aborts.remove(&run_id);
    crate::metrics::run_attempt_ended(&deps.pool, &run_id, result.is_ok(), attempt).await;
    result
}

async fn attempt_run(
    deps: &Deps,
    job: &SyncJob,
    run_id: &str,
    me: &str,
    attempt: i32,
    abort: CancellationToken,
) -> Result<(), BoxDynError> {
    let pool = &deps.pool;
    let claimed: Option<(bool, i32)> = sqlx::query_as(
        "UPDATE apalis.jobs SET metadata = metadata || hstore(ARRAY[\
             'started_at', coalesce(metadata -> 'started_at', ocsync.utc_text(now())), \
             'worker', $2]) \
         WHERE id = $1 AND lock_by = $2 RETURNING metadata ? 'abort', max_attempts",
    )
    .bind(run_id)
    .bind(me)
    .fetch_optional(pool)
    .await?;
    let Some((aborted, max_attempts)) = claimed else {
        tracing::warn!("the run is no longer this worker's; leaving it");
        return Ok(());
    };
    if aborted {
        return Err(apalis_core::error::AbortError::new(RunFailed("aborted".into())).into());
    }
    if attempt > max_attempts {
        let reason = format!(
            "gave up after {max_attempts} attempts: the run kept losing its worker (crash or kill) before finishing"
        );
        return fail(pool, run_id, me, attempt, &job.cp, &reason, "fetch").await;
    }

    let cp = match CpId::parse(job.cp.clone()) {
        Ok(id) => store::get(pool, &id).await,
        Err(e) => Err(StoreError::Corrupt {
            id: job.cp.clone(),
            reason: e,
        }),
    };
    let cp = match cp {
        Ok(stored) => stored.config,
        Err(e) if e.is_transient() && !matches!(e, StoreError::ActiveRun { .. }) => {
            return retry(
                deps,
                run_id,
                me,
                attempt,
                max_attempts,
                &job.cp,
                &e.to_string(),
                "fetch",
            )
            .await;
        }
        Err(e) => return fail(pool, run_id, me, attempt, &job.cp, &e.to_string(), "fetch").await,
    };
    let mode = match job.mode() {
        Ok(m) => m,
        Err(e) => return fail(pool, run_id, me, attempt, &job.cp, &e, "fetch").await,
    };
    let resume = JobContext::load_progress(pool, run_id).await?;
    let mut ctx = JobContext::new(
        run_id.to_owned(),
        me.to_owned(),
        resume,
        abort,
        deps.shutdown.clone(),
    );
    let sink = match sync::for_cp(&cp) {
        Ok(s) => s,
        Err(e) => return fail(pool, run_id, me, attempt, &job.cp, &e.to_string(), "write").await,
    };
    let outcome = tokio::time::timeout(
        deps.config.run_timeout,
        sync::run(pool, &deps.sources, &cp, &mode, &sink, &mut ctx),
    )
    .await;

    match (outcome, ctx.stop_reason()) {
        (_, Some(StopReason::Lost)) => {
            tracing::warn!("the run was taken over by another worker; this attempt stops");
            Ok(())
        }
        (_, Some(StopReason::Abort)) => {
            tracing::info!("run aborted");
            Err(apalis_core::error::AbortError::new(RunFailed("aborted".into())).into())
        }
        (Ok(Ok(o)), Some(StopReason::Shutdown)) if o.result == RunResult::Aborted => {
            release(pool, run_id, me).await?;
            tracing::info!("run released for another worker (shutdown)");
            Ok(())
        }
        (Ok(Ok(o)), _) => {
            let result = match o.result {
                RunResult::Success => "success",
                RunResult::Failed => "failed",
                // Stopped without an abort marker or a shutdown: the
                // cancellation token alone; treat as aborted.
                RunResult::Aborted => {
                    return Err(
                        apalis_core::error::AbortError::new(RunFailed("aborted".into())).into(),
                    );
                }
            };
            sqlx::query(
                "UPDATE apalis.jobs SET metadata = metadata || hstore('result', $3) \
                 WHERE id = $1 AND lock_by = $2",
            )
            .bind(run_id)
            .bind(me)
            .bind(result)
            .execute(pool)
            .await?;
            tracing::info!(
                result,
                subjects = o.progress.subjects_done,
                errors = o.progress.errors,
                "run ended"
            );
            Ok(())
        }
        (Ok(Err(e)), _) => {
            let stage = stage_of(&e);
            if e.is_transient() {
                retry(
                    deps,
                    run_id,
                    me,
                    attempt,
                    max_attempts,
                    &job.cp,
                    &e.to_string(),
                    stage,
                )
                .await
            } else {
                // The engine already wrote the error row for permanent errors.
                fail(pool, run_id, me, attempt, &job.cp, &e.to_string(), "").await
            }
        }
        (Err(_elapsed), _) => {
            let reason = format!(
                "the attempt took longer than RUN_TIMEOUT_SECS ({} s)",
                deps.config.run_timeout.as_secs()
            );
            retry(
                deps,
                run_id,
                me,
                attempt,
                max_attempts,
                &job.cp,
                &reason,
                "fetch",
            )
            .await
        }
    }
}

fn stage_of(e: &SyncError) -> &'static str {
    match e {
        SyncError::Database(_) | SyncError::Sink(_) => "write",
        SyncError::Parse(_) => "parse",
        _ => "fetch",
    }
}

/// Backoff before attempt `attempt + 1`: base × 2^(attempt−1), at most an hour.
pub fn backoff(base: Duration, attempt: i32) -> Duration {
    let exp = attempt.clamp(1, 20) as u32 - 1;
    base.saturating_mul(1 << exp).min(Duration::from_secs(3600))
}

/// A transient failure: try again after the backoff, from the checkpoint;
/// on the last attempt, fail for good.
#[allow(clippy::too_many_arguments)] // the attempt's parts, passed once
async fn retry(
    deps: &Deps,
    run_id: &str,
    me: &str,
    attempt: i32,
    max_attempts: i32,
    cp: &str,
    reason: &str,
    stage: &str,
) -> Result<(), BoxDynError> {
    if attempt >= max_attempts {
        let reason = format!("gave up after {attempt} attempts; last error: {reason}");
        return fail(&deps.pool, run_id, me, attempt, cp, &reason, stage).await;
    }
    let delay = backoff(deps.config.retry_base, attempt);
    sqlx::query(
        "UPDATE apalis.jobs SET run_at = now() + make_interval(secs => $3), \
                metadata = metadata || hstore('error', $4) \
         WHERE id = $1 AND lock_by = $2",
    )
    .bind(run_id)
    .bind(me)
    .bind(delay.as_secs_f64())
    .bind(reason)
    .execute(&deps.pool)
    .await?;
    tracing::warn!(error = %reason, retry_in_ms = delay.as_millis() as u64, "attempt failed; will retry");
    Err(Box::new(RunFailed(reason.to_owned())))
}

/// A permanent failure: the row ends Failed (no attempts left) and, when
/// `stage` is given, the reason becomes a row of the error report.
async fn fail(
    pool: &PgPool,
    run_id: &str,
    me: &str,
    attempt: i32,
    cp: &str,
    reason: &str,
    stage: &str,
) -> Result<(), BoxDynError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE apalis.jobs SET max_attempts = $3, metadata = metadata || hstore('error', $4) \
         WHERE id = $1 AND lock_by = $2",
    )
    .bind(run_id)
    .bind(me)
    .bind(attempt)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    if !stage.is_empty() {
        sqlx::query(
            "INSERT INTO ocsync.run_errors (run_id, cp_id, stage, message) VALUES ($1, $2, $3, $4)",
        )
        .bind(run_id)
        .bind(cp)
        .bind(stage)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    tracing::error!(error = %reason, "run failed");
    Err(Box::new(RunFailed(reason.to_owned())))
}

/// Gives the run back to the queue without spending an attempt. Clearing
/// `lock_by` makes apalis's own ack of this task match nothing.
async fn release(pool: &PgPool, run_id: &str, me: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE apalis.jobs SET status = 'Pending', lock_by = NULL, lock_at = NULL, \
                run_at = now() \
         WHERE id = $1 AND lock_by = $2",
    )
    .bind(run_id)
    .bind(me)
    .execute(pool)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        let b = Duration::from_secs(30);
        assert_eq!(backoff(b, 1), Duration::from_secs(30));
        assert_eq!(backoff(b, 2), Duration::from_secs(60));
        assert_eq!(backoff(b, 3), Duration::from_secs(120));
        assert_eq!(backoff(b, 12), Duration::from_secs(3600));
        assert_eq!(backoff(Duration::ZERO, 4), Duration::ZERO);
    }

    #[test]
    fn worker_names_are_unique() {
        assert_ne!(worker_name(), worker_name());
    }
}
