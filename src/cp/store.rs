//! CP configurations in Postgres (`ocsync.cps`).
//!
//! Every edit names the version it started from and bumps it, so two
//! editors cannot overwrite each other unknowingly; edits and deletions
//! are refused while the CP has an active run, as said by the SQL function
//! `ocsync.cp_active_run(cp)` (which the job queue owns).

use serde_json::Value;
use sqlx::PgPool;
use sqlx::types::chrono::{DateTime, Utc};

use super::model::{CpConfig, CpId};

/// A stored configuration with its bookkeeping.
#[derive(Debug, Clone)]
pub struct StoredCp {
    pub config: CpConfig,
    /// Starts at 1, bumped by every [`update`].
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `add` of an id that exists (HTTP 409).
    #[error("CP {0} already exists")]
    AlreadyExists(String),
    /// (HTTP 404)
    #[error("CP {0} does not exist")]
    NotFound(String),
    /// Someone else edited the CP since it was read (HTTP 409).
    #[error(
        "CP {id} was changed by someone else (version {actual}, expected {expected}); reload and edit again"
    )]
    VersionConflict {
        id: String,
        expected: i32,
        actual: i32,
    },
    /// A sync run is queued or running for the CP (HTTP 409).
    #[error(
        "CP {id} has an active run ({run}); edit it when the run has finished or after aborting it"
    )]
    ActiveRun { id: String, run: String },
    /// A stored configuration this build cannot read (written by another
    /// version, or edited by hand in SQL).
    #[error("the stored configuration of CP {id} cannot be read: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Database(e) => matches!(
                e,
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
            ),
            Self::ActiveRun { .. } => true,
            _ => false,
        }
    }
}

type Row = (String, Value, i32, DateTime<Utc>, DateTime<Utc>);

fn stored(row: Row) -> Result<StoredCp, StoreError> {
    let (id, config, version, created_at, updated_at) = row;
    let config: CpConfig = serde_json::from_value(config).map_err(|e| StoreError::Corrupt {
        id: id.clone(),
        reason: e.to_string(),
    })?;
    Ok(StoredCp {
        config,
        version,
        created_at,
        updated_at,
    })
}

fn to_json(config: &CpConfig) -> Result<Value, StoreError> {
    serde_json::to_value(config).map_err(|e| StoreError::Corrupt {
        id: config.id.to_string(),
        reason: e.to_string(),
    })
}

const COLUMNS: &str = "id, config, version, created_at, updated_at";

/// Stores a new CP; [`StoreError::AlreadyExists`] when the id is taken.
pub async fn add(pool: &PgPool, config: &CpConfig) -> Result<StoredCp, StoreError> {
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO ocsync.cps (id, config, enabled) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO NOTHING RETURNING {COLUMNS}"
    )))
    .bind(config.id.as_str())
    .bind(to_json(config)?)
    .bind(config.enabled)
    .fetch_optional(pool)
    .await?;
    match row {
        Some(row) => stored(row),
        None => Err(StoreError::AlreadyExists(config.id.to_string())),
    }
}

/// One CP; [`StoreError::NotFound`] when there is none.
pub async fn get(pool: &PgPool, id: &CpId) -> Result<StoredCp, StoreError> {
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM ocsync.cps WHERE id = $1"
    )))
    .bind(id.as_str())
    .fetch_optional(pool)
    .await?;
    row.map_or_else(|| Err(StoreError::NotFound(id.to_string())), stored)
}

/// Every CP, by id. One unreadable configuration fails the whole list
/// (naming it) rather than hiding a CP.
pub async fn list(pool: &PgPool) -> Result<Vec<StoredCp>, StoreError> {
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM ocsync.cps ORDER BY id"
    )))
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(stored).collect()
}

/// Every CP's id, in order; unlike [`list`], a configuration this build
/// cannot read does not fail it (for pick lists and filters).
pub async fn ids(pool: &PgPool) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar("SELECT id FROM ocsync.cps ORDER BY id")
        .fetch_all(pool)
        .await?)
}

/// Locks the CP's row and checks the version and the active run; the
/// caller then changes the row inside `tx`.
async fn lock_for_edit(
    tx: &mut sqlx::PgConnection,
    id: &CpId,
    expected_version: Option<i32>,
) -> Result<(), StoreError> {
    let version: Option<i32> =
        sqlx::query_scalar("SELECT version FROM ocsync.cps WHERE id = $1 FOR UPDATE")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
    let Some(actual) = version else {
        return Err(StoreError::NotFound(id.to_string()));
    };
    if let Some(expected) = expected_version
        && expected != actual
    {
        return Err(StoreError::VersionConflict {
            id: id.to_string(),
            expected,
            actual,
        });
    }
    let run: Option<String> = sqlx::query_scalar("SELECT ocsync.cp_active_run($1)")
        .bind(id.as_str())
        .fetch_one(&mut *tx)
        .await?;
    if let Some(run) = run {
        return Err(StoreError::ActiveRun {
            id: id.to_string(),
            run,
        });
    }
    Ok(())
}

/// Replaces a CP's configuration, if it is still at `expected_version`
/// and has no active run; returns the new version.
pub async fn update(
    pool: &PgPool,
    config: &CpConfig,
    expected_version: i32,
) -> Result<StoredCp, StoreError> {
    let mut tx = pool.begin().await?;
    lock_for_edit(&mut tx, &config.id, Some(expected_version)).await?;
    let row: Row = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE ocsync.cps SET config = $2, enabled = $3, version = version + 1,
                updated_at = now()
         WHERE id = $1 RETURNING {COLUMNS}"
    )))
    .bind(config.id.as_str())
    .bind(to_json(config)?)
    .bind(config.enabled)
    .fetch_one(&mut *tx)
    .await?;
    let result = stored(row)?;
    tx.commit().await?;
    Ok(result)
}

/// Turns scheduling on or off. Allowed during a run: it only decides
/// whether the scheduler starts the next one. Bumps the version.
pub async fn set_enabled(pool: &PgPool, id: &CpId, enabled: bool) -> Result<StoredCp, StoreError> {
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE ocsync.cps
            SET config = jsonb_set(config, '{{enabled}}', to_jsonb($2::boolean)),
                enabled = $2, version = version + 1, updated_at = now()
          WHERE id = $1 RETURNING {COLUMNS}"
    )))
    .bind(id.as_str())
    .bind(enabled)
    .fetch_optional(pool)
    .await?;
    row.map_or_else(|| Err(StoreError::NotFound(id.to_string())), stored)
}

/// Deletes a CP's configuration (not its synchronised data), refused
/// while it has an active run.
pub async fn delete(pool: &PgPool, id: &CpId) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    lock_for_edit(&mut tx, id, None).await?;
    sqlx::query("DELETE FROM ocsync.cps WHERE id = $1")
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}
