//! The job queue on the real Postgres with real `ocsync worker` processes:
//! uniqueness under concurrent enqueues, SQL-enqueued runs, abort (queued
//! and running), SIGKILL and SIGTERM of a worker mid-run, the schedule
//! across replicas, retention, retries of transient failures. No sleeps to wait for work: every wait polls
//! the database against a deadline.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ocsync::api::{AppState, router};
use ocsync::cp::{CpConfig, CronSchedule, store};
use ocsync::odm::generate::{GeneratorConfig, generate};
use ocsync::queue::{self, RunStatus};
use ocsync::schedule::{self, Cron};
use sqlx::PgPool;
use tower::ServiceExt;

use crate::harness::{TestDb, ocsync};

const DEADLINE: Duration = Duration::from_secs(45);

fn write_study(dir: &Path, subjects: u32) -> PathBuf {
    let path = dir.join(format!("study-{subjects}.xml"));
    let config = GeneratorConfig {
        seed: 7,
        subjects,
        sites: 2,
        ..GeneratorConfig::default()
    };
    generate(&config, std::fs::File::create(&path).unwrap()).unwrap();
    path
}

fn cp_config(id: &str, study: &Path, batch_size: u32) -> CpConfig {
    let toml = format!(
        r#"
id = "{id}"
batch_size = {batch_size}
default_site = "Main"

[source]
kind = "file"
path = {path:?}

[event_map]
SE_VISIT = "Visit"

[[specimens]]
item_group_oid = "IG_SPECI_SAMPLES"
label_item = "I_SPECI_BARCODE"
type_item = "I_SPECI_TYPE"
quantity_item = "I_SPECI_QTY"
collection_time_item = "I_SPECI_COLLECTED"
"#,
        path = study.display().to_string()
    );
    CpConfig::from_toml(&toml, "test.toml").unwrap()
}

/// A migrated database with CP `id` reading a generated study.
async fn with_cp(id: &str, subjects: u32, batch: u32) -> (TestDb, tempfile::TempDir) {
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let study = write_study(dir.path(), subjects);
    store::add(&t.pool, &cp_config(id, &study, batch))
        .await
        .unwrap();
    (t, dir)
}

/// A worker process, killed (if still alive) when dropped.
pub(crate) struct Worker {
    child: Child,
}

impl Worker {
    fn spawn(t: &TestDb, dir: &Path, label: &str) -> Self {
        Self::spawn_with(t, dir, label, [] as [(&str, &str); 0])
    }

    /// A worker with some settings of its own (`env` wins); its log is
    /// `dir/worker-{label}.log`.
    pub(crate) fn spawn_with<K, V>(
        t: &TestDb,
        dir: &Path,
        label: &str,
        env: impl IntoIterator<Item = (K, V)>,
    ) -> Self
    where
        K: AsRef<std::ffi::OsStr>,
        V: AsRef<std::ffi::OsStr>,
    {
        let log = std::fs::File::create(dir.join(format!("worker-{label}.log"))).unwrap();
        let mut cmd = ocsync();
        cmd.arg("worker")
            .arg("--no-schedule")
            .env("DATABASE_URL", t.url())
            .env("DATABASE_MAX_CONNECTIONS", "6")
            .env("WORKER_CONCURRENCY", "2")
            .env("WORKER_HEARTBEAT_SECS", "1")
            .env("WORKER_MISSED_HEARTBEATS", "2")
            .env("WORKER_POLL_INTERVAL_MS", "200")
            .env("RUN_RETRY_BASE_SECS", "0")
            .env("RUST_LOG", "info")
            .env("METRICS_LISTEN", "127.0.0.1:0")
            .envs(env)
            .stdout(Stdio::null())
            .stderr(log);
        Self {
            child: cmd.spawn().expect("spawn ocsync worker"),
        }
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// Waits for the process to exit; its exit status.
    async fn exited(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(start.elapsed() < DEADLINE, "worker did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn run(pool: &PgPool, id: &str) -> queue::RunInfo {
    queue::runs::get(pool, id)
        .await
        .unwrap()
        .expect("run exists")
}

/// Polls until `pred` holds for the run; panics with the run and the
/// workers' logs at the deadline.
async fn wait_until(
    pool: &PgPool,
    id: &str,
    dir: &Path,
    what: &str,
    pred: impl Fn(&queue::RunInfo) -> bool,
) -> queue::RunInfo {
    let start = Instant::now();
    loop {
        let r = run(pool, id).await;
        if pred(&r) {
            return r;
        }
        if start.elapsed() > DEADLINE {
            let logs = worker_logs(dir);
            panic!("timed out waiting for {what}: {r:#?}{logs}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A run that no NOTIFY announces (one not yet due when it was inserted,
/// like a retry waiting out its backoff) is found by the poll interval
/// (200 ms), not by the next heartbeat (a minute away).
#[tokio::test]
async fn a_run_no_notification_announces_is_found_by_the_poll_interval() {
    let (t, dir) = with_cp("CP1", 3, 10).await;
    let _w = Worker::spawn_with(
        &t,
        dir.path(),
        "w",
        [
            ("WORKER_HEARTBEAT_SECS", "60"),
            ("WORKER_MISSED_HEARTBEATS", "5"),
        ],
    );
    // Registered, and several ticks found nothing to do.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Inserted not yet due: the insert trigger's NOTIFY goes out, but the
    // fetch it causes finds nothing.
    let mut tx = t.pool.begin().await.unwrap();
    let id: String = sqlx::query_scalar("SELECT ocsync.enqueue_sync('CP1', 'all')")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE apalis.jobs SET run_at = now() + interval '1 second' WHERE id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let asked = Instant::now();

    let r = wait_until(&t.pool, &id, dir.path(), "the run to end", |r| {
        r.status.is_terminal()
    })
    .await;
    assert_eq!(r.status, queue::RunStatus::Success);
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "found only after {:?}: the poll interval stopped and the heartbeat found it",
        asked.elapsed()
    );
}

/// Trap: with apalis's own wake-up strategy (`Strategy::new().stream(..)
/// .interval(..)`), workers stopped being woken, and the completions of
/// their last runs sat unrecorded until the next heartbeat (four worker
/// processes fell below a tenth of one process's throughput). Four
/// workers, 300 short runs, heartbeats a minute apart: every run must reach
/// its final status long before a heartbeat could have recorded it. (This
/// test fails with apalis's strategy in place of `queue::wake::Wake`.)
#[tokio::test]
async fn many_short_runs_on_four_workers_all_end_without_waiting_for_a_heartbeat() {
    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let study = write_study(dir.path(), 2);
    let n = 300;
    for i in 0..n {
        store::add(&t.pool, &cp_config(&format!("CP{i:02}"), &study, 10))
            .await
            .unwrap();
    }
    let slow = [
        ("WORKER_HEARTBEAT_SECS", "60"),
        ("WORKER_MISSED_HEARTBEATS", "5"),
        ("WORKER_POLL_INTERVAL_MS", "500"),
    ];
    let _w: Vec<Worker> = (0..4)
        .map(|i| Worker::spawn_with(&t, dir.path(), &format!("w{i}"), slow))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = Instant::now();
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(sql_enqueue(&t.pool, &format!("CP{i:02}")).await.unwrap());
    }
    for id in &ids {
        let r = wait_until(&t.pool, id, dir.path(), "every run to end", |r| {
            r.status.is_terminal()
        })
        .await;
        assert_eq!(r.status, queue::RunStatus::Success);
    }
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "the runs took {:?}: some waited for a heartbeat",
        asked.elapsed()
    );
}

/// The tails of the workers' logs in `dir`, for a failure message.
pub(crate) fn worker_logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().ends_with(".log") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: String = text
                .chars()
                .rev()
                .take(4000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            out += &format!("\n== {:?}\n{tail}", e.file_name());
        }
    }
    out
}

async fn sql_enqueue(pool: &PgPool, cp: &str) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT ocsync.enqueue_sync($1, 'incremental')")
        .bind(cp)
        .fetch_one(pool)
        .await
}

/// The API router with an operator token sent on every request.
async fn operator_api(pool: &PgPool) -> axum::Router {
    let token =
        ocsync::api::tokens::create(pool, "queue-tests", ocsync::api::tokens::Role::Operator)
            .await
            .unwrap();
    let bearer = axum::http::HeaderValue::try_from(format!("Bearer {token}")).unwrap();
    router(AppState { pool: pool.clone() }).layer(axum::middleware::map_request(
        move |mut req: Request<Body>| {
            let bearer = bearer.clone();
            async move {
                req.headers_mut()
                    .insert(axum::http::header::AUTHORIZATION, bearer);
                req
            }
        },
    ))
}

async fn post(app: axum::Router, path: &str, body: &str) -> (StatusCode, serde_json::Value) {
    let req = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// Every synced row, without timestamps and run ids, sorted.
async fn data_rows(pool: &PgPool) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for table in ["participants", "visits", "specimens", "form_records"] {
        let rows: Vec<serde_json::Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT to_jsonb(t) FROM ocsync_data.{table} t"
        )))
        .fetch_all(pool)
        .await
        .unwrap();
        for mut row in rows {
            if let Some(obj) = row.as_object_mut() {
                obj.retain(|k, _| !k.ends_with("_at") && !k.contains("run"));
            }
            all.insert(format!("{table} {row}"));
        }
    }
    all
}

#[tokio::test]
async fn fifty_concurrent_enqueues_for_one_cp_accept_exactly_one() {
    let (t, _dir) = with_cp("CP-U", 3, 10).await;
    let app = operator_api(&t.pool).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let pool = t.pool.clone();
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                match sql_enqueue(&pool, "CP-U").await {
                    Ok(id) => Ok(id),
                    Err(e) => {
                        let db = e.as_database_error().expect("a database error");
                        assert_eq!(db.code().as_deref(), Some("23505"), "{e}");
                        Err(db.message().to_owned())
                    }
                }
            } else {
                let (status, body) =
                    post(app, "/api/v1/cps/CP-U/runs", r#"{"mode":"incremental"}"#).await;
                match status {
                    StatusCode::CREATED => Ok(body["id"].as_str().unwrap().to_owned()),
                    StatusCode::CONFLICT => Err(body["run_id"].as_str().unwrap().to_owned()),
                    other => panic!("unexpected {other}: {body}"),
                }
            }
        }));
    }
    let mut won = Vec::new();
    let mut refusals = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(id) => won.push(id),
            Err(msg) => refusals.push(msg),
        }
    }
    assert_eq!(won.len(), 1, "exactly one enqueue wins: {won:?}");
    assert_eq!(refusals.len(), 49);
    // Every refusal names the run in the way (SQL message, or API run_id).
    for r in &refusals {
        assert!(r.contains(&won[0]), "{r:?} does not name {}", won[0]);
    }
    let active: Option<String> = sqlx::query_scalar("SELECT ocsync.cp_active_run('CP-U')")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(active.as_deref(), Some(won[0].as_str()));
    let (status, body) = post(app.clone(), "/api/v1/cps/CP-U/runs", "{}").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["run_status"], "Queued");
    let (status, _) = post(app, "/api/v1/cps/NOPE/runs", "{}").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The guard index exists and is re-asserted idempotently.
    queue::ensure_guards(&t.pool).await.unwrap();
}

#[tokio::test]
async fn a_queued_run_aborts_at_once_and_frees_the_cp() {
    let (t, _dir) = with_cp("CP-Q", 3, 10).await;
    let id = sql_enqueue(&t.pool, "CP-Q").await.unwrap();
    let r = run(&t.pool, &id).await;
    assert_eq!(r.status, RunStatus::Queued);
    assert_eq!(
        (r.mode.as_str(), r.trigger.as_str()),
        ("incremental", "sql")
    );
    assert_eq!(
        queue::abort(&t.pool, &id).await.unwrap(),
        queue::AbortOutcome::Aborted
    );
    let r = run(&t.pool, &id).await;
    assert_eq!(r.status, RunStatus::Aborted);
    assert!(r.finished_at.is_some());
    // The view says the same; the CP is free again; abort is idempotent.
    let status: String =
        sqlx::query_scalar("SELECT status FROM ocsync.import_logs WHERE run_id = $1")
            .bind(&id)
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!(status, "Aborted");
    let second = sql_enqueue(&t.pool, "CP-Q").await.unwrap();
    // Through the API too.
    let app = operator_api(&t.pool).await;
    let (status, body) = post(app.clone(), &format!("/api/v1/runs/{second}/abort"), "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "Aborted");
    let (status, _) = post(app, "/api/v1/runs/NOPE/abort", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Enqueue with a subject list, and the mode rules.
    let id: String =
        sqlx::query_scalar("SELECT ocsync.enqueue_sync('CP-Q', 'subjects', ARRAY['SS_1','SS_2'])")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!(run(&t.pool, &id).await.mode, "subjects");
    queue::abort(&t.pool, &id).await.unwrap();
    let err = sqlx::query("SELECT ocsync.enqueue_sync('CP-Q', 'subjects')")
        .execute(&t.pool)
        .await
        .unwrap_err();
    assert_eq!(
        err.as_database_error().unwrap().code().as_deref(),
        Some("22023")
    );
}

#[tokio::test]
async fn sql_enqueued_runs_complete_on_two_workers_and_poison_pills_fail() {
    let (t, dir) = with_cp("CP-S", 6, 2).await;
    let study = write_study(dir.path(), 4);
    store::add(&t.pool, &cp_config("CP-T", &study, 2))
        .await
        .unwrap();
    let _a = Worker::spawn(&t, dir.path(), "a");
    let _b = Worker::spawn(&t, dir.path(), "b");
    let s = sql_enqueue(&t.pool, "CP-S").await.unwrap();
    let u = sql_enqueue(&t.pool, "CP-T").await.unwrap();
    for (id, subjects) in [(&s, 6), (&u, 4)] {
        let r = wait_until(&t.pool, id, dir.path(), "success", |r| {
            r.status.is_terminal()
        })
        .await;
        assert_eq!(r.status, RunStatus::Success, "{r:#?}");
        assert!(r.started_at.is_some() && r.finished_at.is_some());
        assert_eq!(r.subjects_done, Some(subjects));
        assert!(r.counts.participants.created > 0);
    }
    // A run whose attempts are spent (it kept killing its workers) is
    // failed, not run again.
    let p = sql_enqueue(&t.pool, "CP-S").await.unwrap();
    // (It may already have been picked up; the guard is for a Pending row.)
    let r = wait_until(&t.pool, &p, dir.path(), "the second run", |r| {
        r.status.is_terminal()
    })
    .await;
    assert_eq!(r.status, RunStatus::Success);
    // Enqueued and marked spent in one transaction, so no worker sees it before.
    let mut tx = t.pool.begin().await.unwrap();
    let q: String = sqlx::query_scalar("SELECT ocsync.enqueue_sync('CP-T', 'all')")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE apalis.jobs SET attempts = 5 WHERE id = $1")
        .bind(&q)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let r = wait_until(&t.pool, &q, dir.path(), "poison pill failed", |r| {
        r.status.is_terminal()
    })
    .await;
    assert_eq!(r.status, RunStatus::Failed);
    assert!(r.last_error.unwrap_or_default().contains("gave up"));
}

/// A run that takes a while: many subjects, one per batch.
async fn slow_cp(id: &str) -> (TestDb, tempfile::TempDir) {
    with_cp(id, 400, 1).await
}

#[tokio::test]
async fn a_running_run_aborts_at_a_batch_boundary_and_keeps_its_batches() {
    let (t, dir) = slow_cp("CP-A").await;
    let _a = Worker::spawn(&t, dir.path(), "a");
    let _b = Worker::spawn(&t, dir.path(), "b");
    let id = sql_enqueue(&t.pool, "CP-A").await.unwrap();
    wait_until(&t.pool, &id, dir.path(), "in progress", |r| {
        r.status == RunStatus::InProgress && r.subjects_done.unwrap_or(0) >= 3
    })
    .await;
    let out = crate::harness::output({
        let mut c = ocsync();
        c.args(["abort", &id]).env("DATABASE_URL", t.url());
        c
    })
    .await;
    assert!(out.status.success(), "{}", crate::harness::stderr(&out));
    let r = wait_until(&t.pool, &id, dir.path(), "aborted", |r| {
        r.status.is_terminal()
    })
    .await;
    assert_eq!(r.status, RunStatus::Aborted);
    assert!(r.finished_at.is_some());
    let done = r.subjects_done.unwrap();
    assert!(done < 400, "{r:#?}");
    let participants: i64 = sqlx::query_scalar("SELECT count(*) FROM ocsync_data.participants")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(participants, done, "committed batches stay, and only they");
    assert_eq!(r.attempts, 1, "an aborted run is never retried");
}

#[tokio::test]
async fn a_worker_killed_mid_run_is_taken_over_and_the_data_matches_a_clean_run() {
    let (t, dir) = slow_cp("CP-K").await;
    let mut a = Worker::spawn(&t, dir.path(), "a");
    let id: String = sqlx::query_scalar("SELECT ocsync.enqueue_sync('CP-K', 'all')")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    wait_until(&t.pool, &id, dir.path(), "in progress", |r| {
        r.status == RunStatus::InProgress && r.subjects_done.unwrap_or(0) >= 5
    })
    .await;
    let _b = Worker::spawn(&t, dir.path(), "b");
    a.signal("KILL");
    a.exited().await;
    let r = wait_until(&t.pool, &id, dir.path(), "resumed to success", |r| {
        r.status.is_terminal()
    })
    .await;
    assert_eq!(r.status, RunStatus::Success, "{r:#?}");
    assert!(r.attempts >= 2, "{r:#?}");
    assert_eq!(r.subjects_done, Some(400));

    // The same study synced in one clean run, in another database.
    let (clean, cdir) = slow_cp("CP-K").await;
    let _c = Worker::spawn(&clean, cdir.path(), "c");
    let cid: String = sqlx::query_scalar("SELECT ocsync.enqueue_sync('CP-K', 'all')")
        .fetch_one(&clean.pool)
        .await
        .unwrap();
    let cr = wait_until(&clean.pool, &cid, cdir.path(), "clean run", |r| {
        r.status.is_terminal()
    })
    .await;
    assert_eq!(cr.status, RunStatus::Success);
    assert_eq!(data_rows(&t.pool).await, data_rows(&clean.pool).await);
}

#[tokio::test]
async fn sigterm_finishes_the_batch_gives_the_run_back_and_exits() {
    let (t, dir) = slow_cp("CP-T").await;
    let mut a = Worker::spawn(&t, dir.path(), "a");
    let id = sql_enqueue(&t.pool, "CP-T").await.unwrap();
    wait_until(&t.pool, &id, dir.path(), "in progress", |r| {
        r.status == RunStatus::InProgress && r.subjects_done.unwrap_or(0) >= 3
    })
    .await;
    a.signal("TERM");
    let status = a.exited().await;
    assert!(status.success(), "{status:?}");
    let r = run(&t.pool, &id).await;
    assert_eq!(r.status, RunStatus::Queued, "{r:#?}");
    let left_at = r.subjects_done.unwrap();
    assert!((3..400).contains(&left_at), "{r:#?}");
    let participants: i64 = sqlx::query_scalar("SELECT count(*) FROM ocsync_data.participants")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert_eq!(
        participants, left_at,
        "the checkpoint matches the committed data"
    );
    let _b = Worker::spawn(&t, dir.path(), "b");
    let r = wait_until(&t.pool, &id, dir.path(), "finished by b", |r| {
        r.status.is_terminal()
    })
    .await;
    assert_eq!(r.status, RunStatus::Success, "{r:#?}");
    assert_eq!(r.subjects_done, Some(400));
}

#[tokio::test]
async fn a_tick_fired_by_three_replicas_enqueues_once_per_cp() {
    let (t, dir) = with_cp("CP-1", 2, 10).await;
    let study = write_study(dir.path(), 2);
    store::add(&t.pool, &cp_config("CP-2", &study, 10))
        .await
        .unwrap();
    let mut busy = cp_config("CP-3", &study, 10);
    busy.schedule = Some(CronSchedule::parse("*/5 * * * *").unwrap());
    store::add(&t.pool, &busy).await.unwrap();
    let mut off = cp_config("CP-4", &study, 10);
    off.enabled = false;
    store::add(&t.pool, &off).await.unwrap();
    let in_the_way = sql_enqueue(&t.pool, "CP-3").await.unwrap();

    let hourly = Cron::new(&CronSchedule::parse("0 * * * *").unwrap()).unwrap();
    let tick = chrono::DateTime::parse_from_rfc3339("2026-11-29T10:00:00Z")
        .unwrap()
        .to_utc();
    let mut replicas = Vec::new();
    for i in 0..3 {
        let pool = t.pool.clone();
        let cron = hourly.clone();
        replicas.push(tokio::spawn(async move {
            schedule::fire_tick(&pool, &cron, tick, &format!("replica-{i}"), 5)
                .await
                .unwrap()
        }));
    }
    let mut outcomes = Vec::new();
    for r in replicas {
        outcomes.push(r.await.unwrap());
    }
    let winners: Vec<_> = outcomes.iter().filter(|o| o.won).collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    assert_eq!((winners[0].enqueued, winners[0].skipped), (2, 1));
    let runs: Vec<(String, String)> =
        sqlx::query_as("SELECT cp, trigger FROM ocsync.import_logs WHERE run_id <> $1 ORDER BY cp")
            .bind(&in_the_way)
            .fetch_all(&t.pool)
            .await
            .unwrap();
    assert_eq!(
        runs,
        vec![
            ("CP-1".into(), "schedule".into()),
            ("CP-2".into(), "schedule".into())
        ]
    );
    // A CP's own schedule overrides the default: CP-3 is due at 10:05, the others are not.
    let at_5 = tick + chrono::Duration::minutes(5);
    assert_eq!(
        schedule::due_cps(&t.pool, &hourly, at_5).await.unwrap(),
        vec!["CP-3".to_owned()]
    );
    let skipped: i32 =
        sqlx::query_scalar("SELECT skipped FROM ocsync.schedule_ticks WHERE tick = $1")
            .bind(tick)
            .fetch_one(&t.pool)
            .await
            .unwrap();
    assert_eq!(skipped, 1);
}

#[tokio::test]
async fn retention_prunes_old_finished_runs_and_their_error_rows() {
    let (t, _dir) = with_cp("CP-R", 2, 10).await;
    let old = sql_enqueue(&t.pool, "CP-R").await.unwrap();
    queue::abort(&t.pool, &old).await.unwrap();
    let recent = sql_enqueue(&t.pool, "CP-R").await.unwrap();
    queue::abort(&t.pool, &recent).await.unwrap();
    let active = sql_enqueue(&t.pool, "CP-R").await.unwrap();
    for id in [&old, &recent] {
        sqlx::query("INSERT INTO ocsync.run_errors (run_id, cp_id, stage, message) VALUES ($1, 'CP-R', 'fetch', 'x')")
            .bind(id)
            .execute(&t.pool)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE apalis.jobs SET done_at = now() - interval '40 days' WHERE id = $1")
        .bind(&old)
        .execute(&t.pool)
        .await
        .unwrap();
    let cutoff = chrono::Utc::now() - chrono::Duration::days(30);
    assert_eq!(queue::retention::prune(&t.pool, cutoff).await.unwrap(), 1);
    assert!(queue::runs::get(&t.pool, &old).await.unwrap().is_none());
    assert!(queue::runs::get(&t.pool, &recent).await.unwrap().is_some());
    assert!(queue::runs::get(&t.pool, &active).await.unwrap().is_some());
    let errors: Vec<String> = sqlx::query_scalar("SELECT run_id FROM ocsync.run_errors")
        .fetch_all(&t.pool)
        .await
        .unwrap();
    assert_eq!(errors, vec![recent.clone()]);
}

/// The study the simulator of [`oc_cp_with`] serves.
pub(crate) fn sim_study() -> GeneratorConfig {
    GeneratorConfig {
        seed: 21,
        subjects: 6,
        sites: 1,
        ..GeneratorConfig::default()
    }
}

/// A CP reading the OpenClinica simulator over OC 3.x REST (quick client
/// retries), with `extra` TOML appended (a `[notify]` section, say); and
/// the simulator.
pub(crate) async fn oc_cp_with(
    t: &TestDb,
    dir: &Path,
    id: &str,
    extra: &str,
) -> ocsync::openclinica::sim::SimHandle {
    use ocsync::openclinica::sim::{SimConfig, Simulator};
    let study = sim_study();
    let sim = Simulator::start(SimConfig::new(
        study.clone(),
        "ocsync",
        secrecy::SecretString::from("oc-pw"),
    ))
    .await
    .unwrap();
    let secret = dir.join("oc-password");
    std::fs::write(&secret, "oc-pw").unwrap();
    let toml = format!(
        r#"
id = "{id}"
batch_size = 2
default_site = "Main"

[source]
kind = "oc3"
base_url = "{base}"
study_oid = "{oid}"
username = "ocsync"
password = {{ file = {secret:?} }}
network = {{ retry = {{ max_attempts = 2, base_delay_ms = 1, max_delay_ms = 5 }} }}
{extra}"#,
        base = sim.base_url_oc3(),
        oid = study.study_oid,
        secret = secret.display().to_string(),
    );
    store::add(&t.pool, &CpConfig::from_toml(&toml, "oc.toml").unwrap())
        .await
        .unwrap();
    sim
}

/// [`oc_cp_with`] on a database of its own.
async fn oc_cp(id: &str, dir: &Path) -> (TestDb, ocsync::openclinica::sim::SimHandle) {
    let t = TestDb::migrated().await;
    let sim = oc_cp_with(&t, dir, id, "").await;
    (t, sim)
}

#[tokio::test]
async fn a_transient_failure_is_retried_and_then_succeeds_or_fails_with_its_reason() {
    use ocsync::openclinica::sim::Faults;
    let dir = tempfile::tempdir().unwrap();
    let (t, sim) = oc_cp("CP-R", dir.path()).await;
    let _w = Worker::spawn(&t, dir.path(), "r");

    // OpenClinica answers 503 to the first two requests: the client's two
    // tries of the first attempt fail, the run goes back to the queue, and
    // its second attempt completes.
    sim.set_faults(Faults {
        error_next: 2,
        error_status: 503,
        ..Faults::default()
    })
    .unwrap();
    let id: String =
        sqlx::query_scalar("SELECT ocsync.enqueue_sync('CP-R', 'all', NULL, 'sql', 'test', 3)")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    let r = wait_until(&t.pool, &id, dir.path(), "the retried run", |r| {
        r.status.is_terminal()
    })
    .await;
    assert_eq!(r.status, RunStatus::Success, "{r:#?}");
    assert_eq!(r.attempts, 2, "one failed attempt, one good one: {r:#?}");
    assert_eq!(r.subjects_done, Some(6));

    // OpenClinica stays down: every attempt fails, then the run ends
    // Failed with the reason (server, path, status) in its error report.
    sim.set_faults(Faults {
        error_every: 1,
        error_status: 503,
        ..Faults::default()
    })
    .unwrap();
    let id: String =
        sqlx::query_scalar("SELECT ocsync.enqueue_sync('CP-R', 'all', NULL, 'sql', 'test', 2)")
            .fetch_one(&t.pool)
            .await
            .unwrap();
    let r = wait_until(&t.pool, &id, dir.path(), "the failing run", |r| {
        r.status.is_terminal()
    })
    .await;
    assert_eq!(r.status, RunStatus::Failed, "{r:#?}");
    assert_eq!(r.attempts, 2, "{r:#?}");
    let mut csv = Vec::new();
    ocsync::sync::write_error_report(&t.pool, &id, &mut csv)
        .await
        .unwrap();
    let csv = String::from_utf8(csv).unwrap();
    assert!(csv.contains("HTTP 503"), "{csv}");
    assert!(csv.contains("/OpenClinica/rest/"), "{csv}");
}
