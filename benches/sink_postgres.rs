//! `make bench`: the Postgres sink's throughput against the physical
//! ceiling, a bare `COPY` of the same rows into the same tables.
//!
//! Creates a database of its own on `OCSYNC_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), migrates it, generates a
//! study of `SINK_BENCH_SUBJECTS` subjects (default 10,000; no audit logs),
//! reads it with the ODM reader and maps every subject with
//! `ocsync::mapping::map_subject` (the CP configuration below), then
//! measures, on one connection:
//!
//! - (a) the ceiling: `COPY … FROM STDIN` (text format) of every row into
//!   the four tables, in one transaction, the COPY text built beforehand
//!   (so the ceiling is the database's ingest alone);
//! - (b) a full sync: `PostgresSink::write_batch` over batches of
//!   `SINK_BENCH_BATCH` subjects (default 200, as a CP's `batch_size`), one transaction per batch;
//! - (c) a second full sync with nothing changed (the writes it avoids).
//!
//! Tables are truncated before (a) and (b). It prints subjects/s, rows/s
//! and the ratios (targets: (b)/(a) ≥ 0.5, (c)/(b) ≤ 0.1 in time), and
//! drops its database at the end. Without `--bench` (`cargo test
//! --all-targets`) it does a smoke run on 20 subjects.

use std::time::{Duration, Instant};

use ocsync::config::{DatabaseConfig, Env};
use ocsync::cp::CpConfig;
use ocsync::db;
use ocsync::mapping::{MetadataIndex, SubjectRecords, map_subject};
use ocsync::odm::generate::{self, GeneratorConfig};
use ocsync::odm::{OdmReader, Record};
use ocsync::sink::postgres::copy::CopyRows;
use ocsync::sink::{Counts, EntityCounts, PostgresSink, Sink};
use sqlx::{Connection, PgConnection};

const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const CP: &str = "CP-BENCH";

const CP_TOML: &str = r#"
id = "CP-BENCH"
default_site = "Main"

[source]
kind = "file"
path = "/dev/null"

[site_map]
S_GEN_SITE1 = "Site one"
S_GEN_SITE2 = "Site two"

[event_map]
SE_VISIT = "Visit"

[[specimens]]
item_group_oid = "IG_SPECI_SAMPLES"
label_item = "I_SPECI_BARCODE"
type_item = "I_SPECI_TYPE"
quantity_item = "I_SPECI_QTY"
collection_time_item = "I_SPECI_COLLECTED"
fields = { unit = "I_SPECI_UNIT" }
"#;

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let subjects: u32 = env_or("SINK_BENCH_SUBJECTS", if measuring { 10_000 } else { 20 });
    let batch: usize = env_or("SINK_BENCH_BATCH", 200);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(subjects, batch.max(1)));
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn server() -> DatabaseConfig {
    let url = std::env::var("OCSYNC_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
    DatabaseConfig::from_lookup(&Env::from_pairs([("DATABASE_URL", url.as_str())]))
        .expect("OCSYNC_TEST_DATABASE_URL is a valid postgres URL")
}

async fn run(subjects: u32, batch: usize) {
    let t = Instant::now();
    let records = study(subjects);
    let rows = rows_of(&records);
    eprintln!(
        "generated, read and mapped {subjects} subjects ({rows} rows) in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let name = format!("ocsync_bench_sink_{}", std::process::id());
    let server = server();
    let mut admin = db::connect_one(&server.with_database("postgres"))
        .await
        .expect("the Postgres server answers (run `make pg`)");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let config = server.with_database(&name);
    let result = async {
        let pool = db::connect(&config).await.unwrap();
        db::migrate(&pool).await.unwrap();
        pool.close().await;
        let mut conn = db::connect_one(&config).await.unwrap();
        measure(&mut conn, &records, rows, batch).await;
        conn.close().await.unwrap();
    };
    result.await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
}

/// The generated study, read and mapped as a sync run would.
fn study(subjects: u32) -> Vec<SubjectRecords> {
    let config = GeneratorConfig {
        seed: 7,
        subjects,
        sites: 2,
        audit_logs: false,
        discrepancy_notes: false,
        ..GeneratorConfig::default()
    };
    let mut xml = Vec::new();
    generate::generate(&config, &mut xml).unwrap();
    let cp = CpConfig::from_toml(CP_TOML, "bench.toml").unwrap();
    let mut meta = None;
    let mut out = Vec::with_capacity(subjects as usize);
    for record in OdmReader::new(&xml[..]) {
        match record.unwrap() {
            Record::Study(study) => meta = Some(MetadataIndex::new(&study)),
            Record::Subject(subject) => {
                let meta = meta.as_ref().expect("the metadata comes first");
                if let Some(records) = map_subject(&cp, meta, &subject).records {
                    out.push(records);
                }
            }
        }
    }
    out
}

fn rows_of(records: &[SubjectRecords]) -> u64 {
    records
        .iter()
        .map(|s| 1 + s.visits.len() + s.specimens.len() + s.form_records.len())
        .sum::<usize>() as u64
}

async fn truncate(conn: &mut PgConnection) {
    sqlx::raw_sql(
        "TRUNCATE ocsync_data.participants, ocsync_data.visits, ocsync_data.specimens,
                  ocsync_data.form_records;
         CHECKPOINT",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
}

async fn measure(conn: &mut PgConnection, records: &[SubjectRecords], rows: u64, batch: usize) {
    let n = records.len() as f64;
    let rows_f = rows as f64;

    // (a) The ceiling.
    truncate(conn).await;
    let copy = copy_text(records);
    let t = Instant::now();
    let mut tx = conn.begin().await.unwrap();
    let mut copied = 0;
    for (sql, text) in &copy {
        let mut copy_in = tx.copy_in_raw(sql).await.unwrap();
        copy_in.send(text.as_slice()).await.unwrap();
        copied += copy_in.finish().await.unwrap();
    }
    tx.commit().await.unwrap();
    let ceiling = t.elapsed();
    assert_eq!(copied, rows, "COPY wrote every row");

    // (b) A full sync into empty tables.
    truncate(conn).await;
    let (full, counts) = sync(conn, records, batch).await;
    let created = |c: EntityCounts| c.created == c.total();
    assert!(
        created(counts.participants)
            && created(counts.visits)
            && created(counts.specimens)
            && created(counts.form_records),
        "a first sync creates everything: {counts:?}"
    );
    assert_eq!(total(&counts), rows);

    // (c) The same study again: nothing changed.
    let (again, counts) = sync(conn, records, batch).await;
    let unchanged = |c: EntityCounts| c.unchanged == c.total();
    assert!(
        unchanged(counts.participants)
            && unchanged(counts.visits)
            && unchanged(counts.specimens)
            && unchanged(counts.form_records),
        "a second sync changes nothing: {counts:?}"
    );

    let rate = |d: Duration| (n / d.as_secs_f64(), rows_f / d.as_secs_f64());
    let (cs, cr) = rate(ceiling);
    let (fs, fr) = rate(full);
    let (as_, ar) = rate(again);
    println!();
    println!(
        "Postgres sink: {} subjects, {rows} rows ({} participants, {} visits, {} specimens, {} form records), batches of {batch} subjects",
        records.len(),
        records.len(),
        records.iter().map(|s| s.visits.len()).sum::<usize>(),
        records.iter().map(|s| s.specimens.len()).sum::<usize>(),
        records.iter().map(|s| s.form_records.len()).sum::<usize>(),
    );
    println!(
        "{:<44} {:>9} {:>11} {:>11} {:>9}",
        "mode", "seconds", "subjects/s", "rows/s", "ratio"
    );
    println!(
        "{:<44} {:>9.2} {:>11.0} {:>11.0} {:>9}",
        "(a) bare COPY, one transaction (ceiling)",
        ceiling.as_secs_f64(),
        cs,
        cr,
        "1.00"
    );
    println!(
        "{:<44} {:>9.2} {:>11.0} {:>11.0} {:>9.2}",
        "(b) sink, full sync (vs a, target >= 0.5)",
        full.as_secs_f64(),
        fs,
        fr,
        fr / cr
    );
    println!(
        "{:<44} {:>9.2} {:>11.0} {:>11.0} {:>9.2}",
        "(c) sink, unchanged (time vs b, <= 0.1)",
        again.as_secs_f64(),
        as_,
        ar,
        again.as_secs_f64() / full.as_secs_f64()
    );
}

fn total(c: &Counts) -> u64 {
    c.participants.total() + c.visits.total() + c.specimens.total() + c.form_records.total()
}

/// Every record through the sink, one transaction per batch.
async fn sync(
    conn: &mut PgConnection,
    records: &[SubjectRecords],
    batch: usize,
) -> (Duration, Counts) {
    let sink = PostgresSink::new();
    let mut counts = Counts::default();
    let t = Instant::now();
    for chunk in records.chunks(batch) {
        let mut tx = conn.begin().await.unwrap();
        let out = sink.write_batch(&mut tx, CP, chunk).await.unwrap();
        assert_eq!(out.errors, vec![]);
        counts.add(&out.counts);
        tx.commit().await.unwrap();
    }
    (t.elapsed(), counts)
}

// --- COPY text format: tab-separated, `\N` for NULL, backslash escapes.

/// One `(COPY statement, data)` per table: the sink's own encoding of the
/// same rows, so the ceiling sends exactly the bytes the sink would.
fn copy_text(records: &[SubjectRecords]) -> Vec<(&'static str, Vec<u8>)> {
    let mut rows = CopyRows::default();
    for r in records {
        rows.add(CP, &r.participant, &r.visits, &r.specimens, &r.form_records);
    }
    rows.into_statements()
        .into_iter()
        .map(|(_, statement, buf)| (statement, buf))
        .collect()
}
