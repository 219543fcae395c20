//! `make bench`: the job queue with real `ocsync worker` processes on the
//! real Postgres.
//!
//! Reports: abort latency (request → run Aborted) p50/p99 at the default
//! batch size; enqueue → start latency p50/p99 with idle workers;
//! throughput of no-change incremental runs over many CPs (one run each)
//! with 1, 2 and 4 worker processes, and the scaling ratio. The server
//! comes from `OCSYNC_TEST_DATABASE_URL` (as for the tests); the bench
//! makes and drops a database of its own.
//!
//! Without `--bench` (as under `cargo test --all-targets`) it does a tiny
//! smoke run proving the benchmark still works.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ocsync::config::{DatabaseConfig, Env};
use ocsync::cp::{CpConfig, store};
use ocsync::db;
use ocsync::odm::generate::{GeneratorConfig, generate};
use secrecy::ExposeSecret;
use sqlx::PgPool;

struct Worker(Child);

impl Worker {
    fn spawn(url: &str) -> Self {
        // QUEUE_BENCH_LOG_DIR=dir keeps each worker's log (RUST_LOG as set).
        let log = std::env::var_os("QUEUE_BENCH_LOG_DIR").map(|dir| {
            let path = Path::new(&dir).join(format!("worker-{}.log", rand::random::<u32>()));
            std::fs::File::create(path).expect("create worker log")
        });
        let child = Command::new(env!("CARGO_BIN_EXE_ocsync"))
            .args(["worker", "--no-schedule"])
            .env("DATABASE_URL", url)
            .env("DATABASE_MAX_CONNECTIONS", "6")
            .env("WORKER_CONCURRENCY", "2")
            .env("WORKER_POLL_INTERVAL_MS", "500")
            // Each process would otherwise try the same metrics port.
            .env("METRICS_LISTEN", "127.0.0.1:0")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log.map_or_else(Stdio::null, Stdio::from))
            .spawn()
            .expect("spawn ocsync worker");
        Self(child)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cp(id: &str, study: &Path, batch: Option<u32>) -> CpConfig {
    let batch = batch
        .map(|b| format!("batch_size = {b}\n"))
        .unwrap_or_default();
    CpConfig::from_toml(
        &format!(
            "id = \"{id}\"\n{batch}default_site = \"Main\"\n[source]\nkind = \"file\"\npath = {:?}\n",
            study.display().to_string()
        ),
        "bench.toml",
    )
    .unwrap()
}

fn study(dir: &Path, subjects: u32) -> std::path::PathBuf {
    let path = dir.join(format!("study-{subjects}.xml"));
    let config = GeneratorConfig {
        seed: 3,
        subjects,
        sites: 1,
        ..GeneratorConfig::default()
    };
    generate(&config, std::fs::File::create(&path).unwrap()).unwrap();
    path
}

async fn enqueue(pool: &PgPool, cp: &str, mode: &str) -> String {
    sqlx::query_scalar("SELECT ocsync.enqueue_sync($1, $2)")
        .bind(cp)
        .bind(mode)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn status(pool: &PgPool, id: &str) -> String {
    sqlx::query_scalar("SELECT status FROM ocsync.import_logs WHERE run_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn wait_all_ended(pool: &PgPool) {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM ocsync.import_logs WHERE status IN ('Queued', 'In Progress')",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if active == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "runs did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pct(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

#[tokio::main]
async fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let (cps, samples) = if measuring { (1000, 50) } else { (8, 3) };
    let cps: usize = std::env::var("QUEUE_BENCH_CPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cps);
    let server = std::env::var("OCSYNC_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let server =
        DatabaseConfig::from_lookup(&Env::from_pairs([("DATABASE_URL", server.as_str())])).unwrap();
    let name = format!("ocsync_bench_queue_{}", std::process::id());
    let config = server.with_database(&name);
    db::create_database_if_missing(&config).await.unwrap();
    let pool = db::connect(&config).await.unwrap();
    db::migrate(&pool).await.unwrap();
    let url = config.url().expose_secret().to_owned();
    let dir = tempfile::tempdir().unwrap();

    // Many small CPs, synced once so that the measured incremental runs
    // find nothing changed.
    let small = study(dir.path(), 2);
    for i in 0..cps {
        store::add(&pool, &cp(&format!("CP{i:04}"), &small, None))
            .await
            .unwrap();
    }
    {
        let _w: Vec<Worker> = (0..4).map(|_| Worker::spawn(&url)).collect();
        for i in 0..cps {
            enqueue(&pool, &format!("CP{i:04}"), "all").await;
        }
        wait_all_ended(&pool).await;
    }
    println!("queue bench: {cps} CPs, default batch size, WORKER_CONCURRENCY=2 per process");

    // Throughput: one no-change incremental run per CP.
    let mut rates = Vec::new();
    for procs in [1usize, 2, 4] {
        let _w: Vec<Worker> = (0..procs).map(|_| Worker::spawn(&url)).collect();
        let start = Instant::now();
        for i in 0..cps {
            enqueue(&pool, &format!("CP{i:04}"), "incremental").await;
        }
        wait_all_ended(&pool).await;
        let rate = cps as f64 / start.elapsed().as_secs_f64();
        println!("throughput, {procs} worker process(es): {rate:8.1} runs/s");
        rates.push(rate);
    }
    println!(
        "scaling: 2/1 = {:.2}x, 4/1 = {:.2}x",
        rates[1] / rates[0],
        rates[2] / rates[0]
    );

    let _w: Vec<Worker> = (0..2).map(|_| Worker::spawn(&url)).collect();
    // Let the workers register and go idle.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Enqueue → start with idle workers.
    let mut lat = Vec::new();
    for i in 0..samples {
        let id = enqueue(&pool, &format!("CP{:04}", i % cps), "incremental").await;
        let ms: f64 = loop {
            let v: Option<f64> = sqlx::query_scalar(
                "SELECT (extract(epoch FROM (started_at - enqueued_at)) * 1000)::float8 \
                 FROM ocsync.import_logs WHERE run_id = $1 AND started_at IS NOT NULL",
            )
            .bind(&id)
            .fetch_optional(&pool)
            .await
            .unwrap()
            .flatten();
            if let Some(v) = v {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        lat.push(ms);
        wait_all_ended(&pool).await;
    }
    println!(
        "enqueue → start: p50 {:.1} ms, p99 {:.1} ms ({} runs)",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        lat.len()
    );

    // Abort latency at the default batch size, on a run long enough to be
    // mid-run when asked.
    let big = study(dir.path(), if measuring { 2000 } else { 300 });
    store::add(&pool, &cp("CP-BIG", &big, None)).await.unwrap();
    let mut lat = Vec::new();
    for _ in 0..samples.min(20) {
        let id = enqueue(&pool, "CP-BIG", "all").await;
        loop {
            let done: Option<i64> = sqlx::query_scalar(
                "SELECT subjects_done FROM ocsync.import_logs WHERE run_id = $1",
            )
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
            if done.unwrap_or(0) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let asked = Instant::now();
        sqlx::query("SELECT ocsync.abort_run($1)")
            .bind(&id)
            .execute(&pool)
            .await
            .unwrap();
        while status(&pool, &id).await != "Aborted" {
            assert!(
                asked.elapsed() < Duration::from_secs(120),
                "abort never landed"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lat.push(asked.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "abort (request → Aborted): p50 {:.1} ms, p99 {:.1} ms ({} runs)",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        lat.len()
    );

    drop(_w);
    pool.close().await;
    if let Ok(mut admin) = db::connect_one(&server.with_database("postgres")).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await;
    }
}
