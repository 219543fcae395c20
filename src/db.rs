//! The database: one pool per process and the schema it expects.
//!
//! Two migration histories live side by side: the job queue's own
//! (`apalis._sqlx_migrations`, shipped by apalis-postgres) and ours
//! (`ocsync._sqlx_migrations`, from `migrations/`). [`migrate`] applies both,
//! queue first, on one connection under one advisory lock, so any number of
//! pods may run `ocsync migrate` at once: one applies, the others wait and
//! find nothing left to do.
//!
//! This module knows nothing of what the tables mean.

use apalis_postgres::PostgresStorage;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};

use crate::config::DatabaseConfig;

/// Our own migrations, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Key of the advisory lock that serialises `migrate` across processes
/// (an arbitrary constant: "ocsync" in ASCII).
const MIGRATE_LOCK: i64 = 0x6f63_7379_6e63;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to the database {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrating the job queue schema failed: {0}")]
    QueueMigration(#[from] apalis_postgres::Error),
    #[error("migrating the ocsync schema failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
}

/// Where a connection goes, for messages: host, port and database, never
/// the user's password.
pub fn describe(config: &DatabaseConfig) -> String {
    let o = &config.options;
    format!(
        "{}:{}/{}",
        o.get_host(),
        o.get_port(),
        o.get_database().unwrap_or("")
    )
}

/// Opens the pool and proves the server answers, so start-up fails fast.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, DbError> {
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.connect_timeout)
        .connect_with(config.options.clone())
        .await
        .map_err(|source| DbError::Connect {
            target: describe(config),
            source,
        })
}

/// One connection outside any pool (for `migrate` and the test harness).
pub async fn connect_one(config: &DatabaseConfig) -> Result<PgConnection, DbError> {
    tokio::time::timeout(
        config.connect_timeout,
        PgConnection::connect_with(&config.options),
    )
    .await
    .unwrap_or(Err(sqlx::Error::PoolTimedOut))
    .map_err(|source| DbError::Connect {
        target: describe(config),
        source,
    })
}

/// Creates the configured database when it does not exist yet (the demo and
/// fresh development machines; production databases are provisioned by
/// their owners). Safe against a concurrent creator.
pub async fn create_database_if_missing(config: &DatabaseConfig) -> Result<bool, DbError> {
    let Some(name) = config.database_name().map(str::to_owned) else {
        return Ok(false);
    };
    let mut conn = connect_one(&config.with_database("postgres")).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await?;
    if exists {
        return Ok(false);
    }
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    // Identifiers cannot be bound as parameters; the name is quoted above.
    match sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
        .execute(&mut conn)
        .await
    {
        Ok(_) => Ok(true),
        // Another process created it between our check and our CREATE.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Applies the queue's and our migrations. Idempotent and safe to run from
/// several processes at once.
#[tracing::instrument(name = "db.migrate", skip_all)]
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATE_LOCK)
        .execute(&mut *conn)
        .await?;
    let result = async {
        PostgresStorage::<()>::migrations()
            .run(&mut *conn)
            .await
            .map_err(|e| DbError::QueueMigration(apalis_postgres::Error::Database(e.into())))?;
        MIGRATOR.run(&mut *conn).await?;
        // apalis's setup may rewrite apalis.jobs and drop the queue's
        // one-active-run-per-CP index with it: re-assert it after every
        // migrate (the function is idempotent; see src/queue).
        sqlx::query("SELECT ocsync.ensure_queue_guards()")
            .execute(&mut *conn)
            .await?;
        Ok::<_, DbError>(())
    }
    .await;
    // Unlock even after a failure, so the pooled connection returns clean.
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATE_LOCK)
        .execute(&mut *conn)
        .await?;
    result
}

/// How far the database's schema is from what this build expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaStatus {
    /// The newest of our migrations applied successfully, if any.
    pub applied: Option<i64>,
    /// The newest migration this build carries.
    pub expected: i64,
}

impl SchemaStatus {
    pub fn is_current(&self) -> bool {
        self.applied == Some(self.expected)
    }
}

/// Reads our migration history; a database never migrated reports `None`.
pub async fn schema_status(pool: &PgPool) -> Result<SchemaStatus, DbError> {
    let expected = MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .expect("at least one migration is embedded");
    let exists: bool =
        sqlx::query_scalar("SELECT to_regclass('ocsync._sqlx_migrations') IS NOT NULL")
            .fetch_one(pool)
            .await?;
    let applied = if exists {
        sqlx::query_scalar("SELECT max(version) FROM ocsync._sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await?
    } else {
        None
    };
    Ok(SchemaStatus { applied, expected })
}
