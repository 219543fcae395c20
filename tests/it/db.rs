//! The schema: migrations, their idempotence under concurrency, readiness.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ocsync::api::{AppState, router};
use ocsync::db;
use tower::ServiceExt;

use crate::harness::{TestDb, ocsync, output, stderr};

#[tokio::test]
async fn migrate_creates_both_histories_and_is_idempotent() {
    let t = TestDb::empty().await;
    let before = db::schema_status(&t.pool).await.unwrap();
    assert_eq!(before.applied, None);
    assert!(!before.is_current());

    db::migrate(&t.pool).await.unwrap();
    db::migrate(&t.pool).await.unwrap();

    let after = db::schema_status(&t.pool).await.unwrap();
    assert!(after.is_current(), "{after:?}");
    let ours: i64 = sqlx::query_scalar("SELECT count(*) FROM ocsync._sqlx_migrations")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(ours as usize, db::MIGRATOR.iter().count());
    let queue: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis._sqlx_migrations")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(
        queue as usize,
        apalis_postgres::PostgresStorage::<()>::migrations()
            .iter()
            .count()
    );
    for schema in ["ocsync", "ocsync_data", "apalis"] {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(schema)
                .fetch_one(&t.pool)
                .await
                .unwrap();
        assert!(exists, "schema {schema}");
    }
    // Our history is not mixed into sqlx's default table.
    let default_table: bool =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations') IS NOT NULL")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert!(!default_table);
}

#[tokio::test]
async fn several_processes_migrating_at_once_all_succeed() {
    let t = TestDb::empty().await;
    let children: Vec<_> = (0..4)
        .map(|_| {
            let mut cmd = ocsync();
            cmd.arg("migrate").env("DATABASE_URL", t.url());
            tokio::spawn(output(cmd))
        })
        .collect();
    for child in children {
        let out = child.await.unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert!(db::schema_status(&t.pool).await.unwrap().is_current());
}

#[tokio::test]
async fn migrate_can_create_its_database() {
    let t = TestDb::empty().await;
    let fresh = format!("{}_created", t.config.database_name().unwrap());
    let target = t.config.with_database(&fresh);
    let url = secrecy::ExposeSecret::expose_secret(target.url()).to_owned();
    let mut cmd = ocsync();
    cmd.args(["migrate", "--create-database"])
        .env("DATABASE_URL", &url);
    let out = output(cmd).await;
    let ok = out.status.success();
    let err = stderr(&out);
    let pool = db::connect(&target).await;
    let current = match &pool {
        Ok(p) => db::schema_status(p).await.unwrap().is_current(),
        Err(_) => false,
    };
    if let Ok(p) = pool {
        p.close().await;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {fresh} WITH (FORCE)"
    )))
    .execute(&t.pool)
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert!(current);
}

async fn get(app: axum::Router, path: &str) -> (StatusCode, serde_json::Value) {
    let resp = app
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, body)
}

#[tokio::test]
async fn readiness_follows_the_schema_and_the_database() {
    let t = TestDb::empty().await;
    let app = router(AppState {
        pool: t.pool.clone(),
    });
    assert_eq!(get(app.clone(), "/healthz").await.0, StatusCode::OK);

    let (status, body) = get(app.clone(), "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["schema_version"], serde_json::Value::Null);
    assert!(body["reason"].as_str().unwrap().contains("ocsync migrate"));

    db::migrate(&t.pool).await.unwrap();
    let (status, body) = get(app.clone(), "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ready");

    t.pool.close().await;
    let (status, body) = get(app.clone(), "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["reason"], "database unreachable");
    assert_eq!(get(app, "/healthz").await.0, StatusCode::OK);
}
