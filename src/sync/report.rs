//! The error report: one CSV row per record a run could not sync.

use std::io::Write;

use futures::TryStreamExt;
use sqlx::PgPool;

/// The report's columns, in order.
pub const CSV_HEADER: [&str; 9] = [
    "subject_key",
    "ppid",
    "event_oid",
    "repeat",
    "form_oid",
    "item_group_oid",
    "item_oid",
    "stage",
    "message",
];

type Row = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    String,
);

/// Writes run `run_id`'s error report as CSV (RFC 4180, header first) to
/// `out`, streaming the rows in the order they were recorded. Returns the
/// number of rows.
pub async fn write_error_report<W: Write>(
    pool: &PgPool,
    run_id: &str,
    out: W,
) -> Result<u64, ReportError> {
    let mut csv = csv::Writer::from_writer(out);
    csv.write_record(CSV_HEADER)?;
    let mut rows = sqlx::query_as::<_, Row>(
        "SELECT subject_key, ppid, event_oid, repeat, form_oid, item_group_oid, item_oid, \
                stage, message \
         FROM ocsync.run_errors WHERE run_id = $1 ORDER BY seq",
    )
    .bind(run_id)
    .fetch(pool);
    let mut n = 0;
    while let Some(r) = rows.try_next().await? {
        let o = |v: &Option<String>| v.clone().unwrap_or_default();
        csv.write_record([
            o(&r.0),
            o(&r.1),
            o(&r.2),
            o(&r.3),
            o(&r.4),
            o(&r.5),
            o(&r.6),
            r.7,
            r.8,
        ])?;
        n += 1;
    }
    csv.flush()?;
    Ok(n)
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("reading the error report failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("writing the error report failed: {0}")]
    Csv(#[from] csv::Error),
    #[error("writing the error report failed: {0}")]
    Io(#[from] std::io::Error),
}
