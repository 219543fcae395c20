//! `make bench`: a whole sync, OpenClinica simulator → Postgres sink.
//!
//! Starts the OpenClinica simulator in-process with a generated study of
//! `SYNC_BENCH_SUBJECTS` subjects (default 10,000), creates a database of its
//! own on the test server (`OCSYNC_TEST_DATABASE_URL`), and measures in one
//! run, once through each OpenClinica API (the CP's default query flags):
//!
//! 1. a full sync (mode `all`): subjects/s and rows/s. OC 3.x reads one
//!    whole-study document; OC 4.x lists the participants and reads one
//!    whole-study document too (the CP's default, `whole_study = true`);
//! 2. the ceiling: a bare `COPY … FROM STDIN` of exactly the rows that sync
//!    wrote, into the same tables (emptied first), rows/s;
//! 3. an incremental sync with nothing changed, and a second full sync with
//!    nothing changed, each as a fraction of the full sync's time.
//!
//! Steps 1 to 3 (but the second full sync) run three times each, the
//! tables emptied before each full sync; the figures are the medians (one
//! `COPY` can take half again as long as the next on this disk). OC 4.x
//!    lists participants with `lastModified`, so its incremental run reads
//!    only the list; OC 3.x has no "changed since" filter, so its
//!    incremental run reads the whole study again and skips unchanged
//!    subjects by fingerprint.
//!
//! `SYNC_BENCH_APIS=oc3` (or `oc4`) measures one API only.
//!
//! Without the `--bench` argument (`cargo test --all-targets`) it runs the
//! same steps on 40 subjects as a smoke test.

use std::time::{Duration, Instant};

use ocsync::config::{DatabaseConfig, Env};
use ocsync::cp::CpConfig;
use ocsync::db;
use ocsync::odm::generate::GeneratorConfig;
use ocsync::openclinica::sim::{SimConfig, Simulator};
use ocsync::openclinica::{Scope, SourceRegistry};
use ocsync::sink::postgres::PostgresSink;
use ocsync::sync::{self, Control, Mode, Progress, RunContext, RunResult};
use secrecy::SecretString;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

const TABLES: [&str; 4] = ["participants", "visits", "specimens", "form_records"];

struct BenchRun(String, CancellationToken);

impl RunContext for BenchRun {
    fn run_id(&self) -> &str {
        &self.0
    }
    fn resume(&self) -> Option<Progress> {
        None
    }
    async fn checkpoint(
        &mut self,
        _tx: &mut PgConnection,
        _progress: &Progress,
    ) -> Result<Control, sqlx::Error> {
        Ok(Control::Continue)
    }
    fn cancellation(&self) -> CancellationToken {
        self.1.clone()
    }
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let subjects: u32 = std::env::var("SYNC_BENCH_SUBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if measuring { 10_000 } else { 40 });
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(bench(subjects, measuring));
}

/// Empties the data tables and what runs remember.
async fn empty(pool: &PgPool) {
    for table in TABLES {
        sqlx::query(sqlx::AssertSqlSafe(format!("TRUNCATE ocsync_data.{table}")))
            .execute(pool)
            .await
            .unwrap();
    }
    sqlx::raw_sql("TRUNCATE ocsync.subject_state, ocsync.cp_watermarks")
        .execute(pool)
        .await
        .unwrap();
}

/// The median of some timings.
fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

async fn bench(subjects: u32, measuring: bool) {
    let server = std::env::var("OCSYNC_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin =
        DatabaseConfig::from_lookup(&Env::from_pairs([("DATABASE_URL", server.as_str())])).unwrap();
    let name = format!("ocsync_bench_sync_{}", std::process::id());
    let mut conn = db::connect_one(&admin).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let config = admin.with_database(&name);
    let pool = db::connect(&config).await.unwrap();
    db::migrate(&pool).await.unwrap();

    let mut results = Vec::new();
    // SYNC_BENCH_APIS=oc3 or oc4 measures one of them only.
    let only = std::env::var("SYNC_BENCH_APIS").unwrap_or_default();
    for api in [Api::Oc3, Api::Oc4] {
        if !only.is_empty() && !only.eq_ignore_ascii_case(&format!("{api:?}")) {
            continue;
        }
        let reps = if measuring { 3 } else { 1 };
        results.push(measure(&pool, subjects, api, reps).await);
        empty(&pool).await;
    }
    pool.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    for r in &results {
        r.report();
    }
    println!("targets: full sync rows/s ≥ 0.5 of COPY; incremental ≤ 0.1 of the full sync's time");
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Api {
    Oc3,
    Oc4,
}

struct Figures {
    api: Api,
    subjects: u32,
    reps: usize,
    rows: u64,
    full: Duration,
    copy: Duration,
    incremental: Duration,
    /// The whole-study document alone.
    document: Duration,
    second_full: Duration,
}

impl Figures {
    fn report(&self) {
        let per_s = |n: f64, d: Duration| n / d.as_secs_f64();
        let full_rows = per_s(self.rows as f64, self.full);
        let copy_rows = per_s(self.rows as f64, self.copy);
        println!(
            "\nSync, OpenClinica {} simulator → Postgres sink ({} subjects, {} rows; one process; median of {})",
            match self.api {
                Api::Oc3 => "3.x (one whole-study document)",
                Api::Oc4 => "4.x (participant list, one whole-study document)",
            },
            self.subjects,
            self.rows,
            self.reps
        );
        println!(
            "{:<52}{:>10}{:>14}{:>12}",
            "step", "seconds", "rows/s", "ratio"
        );
        println!(
            "{:<52}{:>10.2}{:>14.0}{:>12}",
            "bare COPY of the same rows (ceiling)",
            self.copy.as_secs_f64(),
            copy_rows,
            "1.00"
        );
        println!(
            "{:<52}{:>10.2}{:>14.0}{:>12.2}",
            format!(
                "full sync ({:.0} subjects/s)",
                per_s(f64::from(self.subjects), self.full)
            ),
            self.full.as_secs_f64(),
            full_rows,
            full_rows / copy_rows
        );
        println!("{:<52}{:>10}{:>14}{:>12}", "", "", "", "vs full");
        for (what, d) in [
            ("incremental sync, nothing changed", self.incremental),
            (
                "the whole-study document alone (read, discarded)",
                self.document,
            ),
            ("second full sync, nothing changed", self.second_full),
        ] {
            println!(
                "{:<52}{:>10.2}{:>14}{:>12.3}",
                what,
                d.as_secs_f64(),
                "",
                d.as_secs_f64() / self.full.as_secs_f64()
            );
        }
    }
}

async fn measure(pool: &PgPool, subjects: u32, api: Api, reps: usize) -> Figures {
    let study = GeneratorConfig {
        seed: 42,
        subjects,
        sites: 4,
        oc4_dates: api == Api::Oc4,
        ..GeneratorConfig::default()
    };
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("oc-password");
    std::fs::write(&secret, "bench-password").unwrap();
    let sim = Simulator::start(SimConfig::new(
        study.clone(),
        "ocsync",
        SecretString::from("bench-password"),
    ))
    .await
    .unwrap();
    let source = match api {
        Api::Oc3 => format!("kind = \"oc3\"\nbase_url = \"{}\"", sim.base_url_oc3()),
        Api::Oc4 => format!(
            "kind = \"oc4\"\nbase_url = \"{}\"\nauth_url = \"{}\"",
            sim.base_url_oc4(),
            sim.auth_url()
        ),
    };
    let toml = format!(
        r#"
id = "BENCH"
default_site = "Main"

[source]
{source}
study_oid = "{study}"
username = "ocsync"
password = {{ file = {secret:?} }}

[[specimens]]
item_group_oid = "IG_SPECI_SAMPLES"
label_item = "I_SPECI_BARCODE"
type_item = "I_SPECI_TYPE"
quantity_item = "I_SPECI_QTY"
collection_time_item = "I_SPECI_COLLECTED"
"#,
        study = study.study_oid,
        secret = secret.display().to_string(),
    );
    let cp = CpConfig::from_toml(&toml, "bench.toml").unwrap();
    let sources = SourceRegistry::new();
    let sink = PostgresSink::new();
    let cancel = CancellationToken::new();

    let (mut fulls, mut copies, mut rows) = (Vec::new(), Vec::new(), 0);
    for rep in 0..reps {
        if rep > 0 {
            empty(pool).await;
        }
        let mut ctx = BenchRun(format!("full-{rep}"), cancel.clone());
        let started = Instant::now();
        let out = sync::run(pool, &sources, &cp, &Mode::All, &sink, &mut ctx)
            .await
            .unwrap();
        fulls.push(started.elapsed());
        assert_eq!(out.result, RunResult::Success);
        let c = out.progress.counts;
        assert_eq!(c.participants.created, u64::from(subjects), "{c:?}");
        rows = c.participants.created
            + c.visits.created
            + c.specimens.created
            + c.form_records.created;
        copies.push(copy_ceiling(pool).await);
    }
    let (full, copy) = (median(fulls), median(copies));

    let mut incrementals = Vec::new();
    for rep in 0..reps {
        let mut ctx = BenchRun(format!("incremental-{rep}"), cancel.clone());
        let started = Instant::now();
        let out = sync::run(pool, &sources, &cp, &Mode::Incremental, &sink, &mut ctx)
            .await
            .unwrap();
        incrementals.push(started.elapsed());
        // Nothing written (OC 4.x does not even fetch most subjects).
        let c = out.progress.counts;
        let written = [c.participants, c.visits, c.specimens, c.form_records]
            .iter()
            .map(|e| e.created + e.updated + e.failed)
            .sum::<u64>();
        assert_eq!(written, 0, "{c:?}");
    }
    let incremental = median(incrementals);

    // The floor of an OC 3.x incremental run: the whole-study document
    // alone, read to its end and thrown away.
    let source = sources.source(&cp.source).unwrap();
    let mut reads = Vec::new();
    for _ in 0..reps {
        use futures::StreamExt;
        let started = Instant::now();
        let mut body = source
            .clinical_data(Scope::Study)
            .next()
            .await
            .unwrap()
            .unwrap();
        tokio::io::copy(&mut body, &mut tokio::io::sink())
            .await
            .unwrap();
        reads.push(started.elapsed());
    }
    let document = median(reads);

    let mut ctx = BenchRun("second".into(), cancel);
    let started = Instant::now();
    sync::run(pool, &sources, &cp, &Mode::All, &sink, &mut ctx)
        .await
        .unwrap();
    let second_full = started.elapsed();

    Figures {
        api,
        subjects,
        reps,
        rows,
        full,
        copy,
        incremental,
        document,
        second_full,
    }
}

/// Copies the rows the sync wrote out as text, empties the tables, and
/// times `COPY … FROM STDIN` of those rows back in. Leaves the tables as
/// they were.
async fn copy_ceiling(pool: &PgPool) -> Duration {
    use futures::TryStreamExt;
    let mut dumps = Vec::new();
    let mut conn = pool.acquire().await.unwrap();
    for table in TABLES {
        let mut out = conn
            .copy_out_raw(&format!("COPY ocsync_data.{table} TO STDOUT"))
            .await
            .unwrap();
        let mut bytes = Vec::new();
        while let Some(chunk) = out.try_next().await.unwrap() {
            bytes.extend_from_slice(&chunk);
        }
        dumps.push(bytes);
    }
    for table in TABLES {
        sqlx::query(sqlx::AssertSqlSafe(format!("TRUNCATE ocsync_data.{table}")))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let started = Instant::now();
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    for (table, bytes) in TABLES.iter().zip(&dumps) {
        let mut copy = tx
            .copy_in_raw(&format!("COPY ocsync_data.{table} FROM STDIN"))
            .await
            .unwrap();
        for chunk in bytes.chunks(1 << 20) {
            copy.send(chunk).await.unwrap();
        }
        copy.finish().await.unwrap();
    }
    tx.commit().await.unwrap();
    started.elapsed()
}
