//! The outbox, `ocsync.notifications`: one row per run and recipient,
//! inserted by the database when the run ends, claimed and updated by the
//! dispatchers, read by the runs API and CLI.
//!
//! A row is `pending` until it is `sent` or `failed`. While a dispatcher
//! works on it, its `next_attempt_at` is a lease (the claim moved it past
//! the longest delivery), so no other dispatcher takes it; the attempt is
//! counted at the claim. Each update after a delivery names the attempt it
//! records, so a dispatcher whose lease ran out cannot overwrite the
//! record of the one that took over.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;
use sqlx::types::chrono::{DateTime, Utc};
use utoipa::ToSchema;

use super::Channel;

/// Where a notification stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Not delivered yet: due, being sent, or waiting for its retry.
    Pending,
    /// Accepted by the SMTP server, or answered 2xx by the webhook.
    Sent,
    /// Given up: refused, or every attempt failed. `last_error` says why.
    Failed,
}

impl DeliveryStatus {
    fn parse(text: &str) -> Self {
        match text {
            "sent" => Self::Sent,
            "pending" => Self::Pending,
            _ => Self::Failed,
        }
    }
}

/// One notification of a run, as the API and the CLI show it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Delivery {
    pub channel: Channel,
    /// The email recipient or the webhook URL.
    pub target: String,
    pub status: DeliveryStatus,
    /// Attempts made so far.
    pub attempts: i32,
    /// Why the last attempt failed (names the server or the HTTP status).
    pub last_error: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    /// When it is tried again (pending notifications only).
    pub next_attempt_at: Option<DateTime<Utc>>,
}

type DeliveryRow = (
    String,
    String,
    String,
    String,
    i32,
    Option<String>,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
);

/// The notifications of each of `ids`, by run id (runs without any are
/// absent), each run's in a stable order (channel, then target).
pub async fn for_runs(
    pool: &PgPool,
    ids: &[String],
) -> Result<HashMap<String, Vec<Delivery>>, sqlx::Error> {
    let rows: Vec<DeliveryRow> = sqlx::query_as(
        "SELECT run_id, channel, target, status, attempts, last_error, sent_at, next_attempt_at \
         FROM ocsync.notifications WHERE run_id = ANY($1) \
         ORDER BY run_id, channel, target",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    let mut out: HashMap<String, Vec<Delivery>> = HashMap::new();
    for (run_id, channel, target, status, attempts, last_error, sent_at, next) in rows {
        let Some(channel) = Channel::parse(&channel) else {
            continue;
        };
        let status = DeliveryStatus::parse(&status);
        out.entry(run_id).or_default().push(Delivery {
            channel,
            target,
            status,
            attempts,
            last_error,
            sent_at,
            next_attempt_at: (status == DeliveryStatus::Pending).then_some(next),
        });
    }
    Ok(out)
}

/// The notifications of run `id`.
pub async fn for_run(pool: &PgPool, id: &str) -> Result<Vec<Delivery>, sqlx::Error> {
    Ok(for_runs(pool, &[id.to_owned()])
        .await?
        .remove(id)
        .unwrap_or_default())
}

/// A row a dispatcher has claimed for one attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: i64,
    pub run_id: String,
    pub cp_id: String,
    pub channel: String,
    pub target: String,
    /// The webhook secret's reference (`{"env": …}` or `{"file": …}`).
    pub secret_ref: Option<serde_json::Value>,
    /// This attempt's number (1 for the first).
    pub attempts: i32,
    /// The message, once an earlier attempt built it.
    pub payload: Option<serde_json::Value>,
}

/// Claims up to `limit` due rows for one attempt each, leasing them for
/// `lease`. Rows another dispatcher is claiming at the same moment are
/// skipped, not waited for.
pub async fn claim(
    pool: &PgPool,
    limit: i64,
    lease: Duration,
) -> Result<Vec<Claimed>, sqlx::Error> {
    sqlx::query_as(
        "WITH due AS ( \
             SELECT id FROM ocsync.notifications \
              WHERE status = 'pending' AND next_attempt_at <= now() \
              ORDER BY next_attempt_at, id \
              LIMIT $1 \
                FOR UPDATE SKIP LOCKED) \
         UPDATE ocsync.notifications n \
            SET attempts = n.attempts + 1, \
                next_attempt_at = now() + make_interval(secs => $2) \
           FROM due WHERE n.id = due.id \
         RETURNING n.id, n.run_id, n.cp_id, n.channel, n.target, n.secret_ref, n.attempts, n.payload",
    )
    .bind(limit)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// Keeps the message built at the first attempt, for the retries.
pub async fn keep_payload(
    pool: &PgPool,
    id: i64,
    payload: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE ocsync.notifications SET payload = $2 WHERE id = $1 AND payload IS NULL")
        .bind(id)
        .bind(payload)
        .execute(pool)
        .await?;
    Ok(())
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Sent,
    /// Try again after `after`.
    Retry {
        reason: String,
        after: Duration,
    },
    /// Give up.
    Failed {
        reason: String,
    },
}

/// Records attempt `attempt` of row `id`; false when the row is no longer
/// at that attempt (another dispatcher took it over after the lease).
pub async fn record(
    pool: &PgPool,
    id: i64,
    attempt: i32,
    outcome: &Outcome,
) -> Result<bool, sqlx::Error> {
    let q = match outcome {
        Outcome::Sent => sqlx::query(
            "UPDATE ocsync.notifications \
                SET status = 'sent', sent_at = now(), last_error = NULL \
              WHERE id = $1 AND attempts = $2 AND status = 'pending'",
        )
        .bind(id)
        .bind(attempt),
        Outcome::Retry { reason, after } => sqlx::query(
            "UPDATE ocsync.notifications \
                SET last_error = $3, next_attempt_at = now() + make_interval(secs => $4) \
              WHERE id = $1 AND attempts = $2 AND status = 'pending'",
        )
        .bind(id)
        .bind(attempt)
        .bind(reason)
        .bind(after.as_secs_f64()),
        Outcome::Failed { reason } => sqlx::query(
            "UPDATE ocsync.notifications SET status = 'failed', last_error = $3 \
              WHERE id = $1 AND attempts = $2 AND status = 'pending'",
        )
        .bind(id)
        .bind(attempt)
        .bind(reason),
    };
    Ok(q.execute(pool).await?.rows_affected() == 1)
}

/// How long until the next pending row is due (zero when one is due now);
/// `None` when nothing is pending.
pub async fn next_due_in(pool: &PgPool) -> Result<Option<Duration>, sqlx::Error> {
    let secs: Option<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM min(next_attempt_at) - now())::float8 \
         FROM ocsync.notifications WHERE status = 'pending'",
    )
    .fetch_one(pool)
    .await?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}
