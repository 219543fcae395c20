//! What every integration test stands on: a database of its own on the real
//! Postgres, dropped when the test ends, and the `ocsync` binary.
//!
//! The server comes from `OCSYNC_TEST_DATABASE_URL` (any database on it; the
//! default is the local development server's `postgres` database), which
//! `make test` sets after making sure the server is up.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use ocsync::config::{DatabaseConfig, Env};
use ocsync::db;
use secrecy::ExposeSecret;
use sqlx::PgPool;

const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The maintenance connection settings for the test server.
pub fn server_config() -> DatabaseConfig {
    let url = std::env::var("OCSYNC_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
    DatabaseConfig::from_lookup(&Env::from_pairs([("DATABASE_URL", url.as_str())]))
        .expect("OCSYNC_TEST_DATABASE_URL is a valid postgres URL")
}

/// A database that exists for one test.
pub struct TestDb {
    pub pool: PgPool,
    pub config: DatabaseConfig,
    name: String,
}

impl TestDb {
    /// A new, empty database (not migrated).
    pub async fn empty() -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ocsync_test_{}_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let server = server_config();
        let mut admin = db::connect_one(&server.with_database("postgres"))
            .await
            .expect("the test Postgres server answers (run `make pg`)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let config = server.with_database(&name);
        let pool = db::connect(&config)
            .await
            .expect("connect to test database");
        Self { pool, config, name }
    }

    /// A new database with every migration applied.
    pub async fn migrated() -> Self {
        let t = Self::empty().await;
        db::migrate(&t.pool).await.expect("migrate");
        t
    }

    /// The URL a child process should use (`DATABASE_URL`).
    pub fn url(&self) -> String {
        self.config.url().expose_secret().to_owned()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime may be the one blocked
        // here: do the cleanup on a thread with a runtime of its own. The
        // pool is not closed from there (its tasks live on the test's
        // runtime); `WITH (FORCE)` ends its connections server-side.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(mut admin) =
                    db::connect_one(&server_config().with_database("postgres")).await
                {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut admin)
                    .await;
                }
            });
        })
        .join();
    }
}

/// The `ocsync` binary with a clean environment: only what the test sets,
/// plus PATH and HOME.
pub fn ocsync() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocsync"));
    cmd.env_clear();
    for var in ["PATH", "HOME"] {
        if let Ok(v) = std::env::var(var) {
            cmd.env(var, v);
        }
    }
    cmd
}

/// Runs a prepared command off the async runtime's threads.
pub async fn output(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("spawn ocsync"))
        .await
        .expect("join")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A tracing `MakeWriter` that appends to a shared buffer, for tests that
/// read what was logged (never a secret, never a clinical value).
#[derive(Clone, Default)]
pub struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
