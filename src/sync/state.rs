//! What runs remember between runs (subject fingerprints, high-water
//! marks) and the error rows they leave.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};

use crate::mapping::{RecordError, SubjectRecords};
use crate::sink::{Counts, EntityCounts};

/// How far before the last high-water mark an incremental run starts
/// looking again. OpenClinica writes `lastModified` without a time zone and
/// its clock is not ours; an hour covers zone confusion at DST changes and
/// ordinary drift. Re-reading a subject that did not change costs a fetch,
/// never a write (its fingerprint matches).
pub const INCREMENTAL_OVERLAP: Duration = Duration::from_secs(3600);

/// A subject's fingerprint as of its last write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubjectState {
    pub content_hash: String,
    /// [`crate::mapping::input_fingerprint`] at the last write, when known.
    pub input_hash: Option<String>,
    pub audit_max_id: Option<i64>,
    pub counts: RecordCounts,
}

/// How many records of each entity a subject had at its last write, so a
/// skipped subject still counts as unchanged records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct RecordCounts {
    pub participants: u64,
    pub visits: u64,
    pub specimens: u64,
    pub form_records: u64,
}

impl RecordCounts {
    pub fn of(records: &SubjectRecords) -> Self {
        Self {
            participants: 1,
            visits: records.visits.len() as u64,
            specimens: records.specimens.len() as u64,
            form_records: records.form_records.len() as u64,
        }
    }

    /// These records, counted as unchanged.
    pub fn unchanged(&self) -> Counts {
        let u = |n| EntityCounts {
            unchanged: n,
            ..EntityCounts::default()
        };
        Counts {
            participants: u(self.participants),
            visits: u(self.visits),
            specimens: u(self.specimens),
            form_records: u(self.form_records),
        }
    }
}

/// Loads the fingerprints of `keys` (those that have one).
pub(crate) async fn load_subject_states(
    pool: &PgPool,
    cp: &str,
    keys: &[String],
) -> Result<HashMap<String, SubjectState>, sqlx::Error> {
    type Row = (
        String,
        String,
        Option<String>,
        Option<i64>,
        sqlx::types::Json<RecordCounts>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT subject_key, content_hash, input_hash, audit_max_id, record_counts \
             FROM ocsync.subject_state WHERE cp_id = $1 AND subject_key = ANY($2)",
    )
    .bind(cp)
    .bind(keys)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(key, content_hash, input_hash, audit_max_id, counts)| {
            (
                key,
                SubjectState {
                    content_hash,
                    input_hash,
                    audit_max_id,
                    counts: counts.0,
                },
            )
        })
        .collect())
}

/// A subject written cleanly in this batch (or found unchanged with a new
/// input fingerprint).
pub(crate) struct Written {
    pub subject_key: String,
    pub content_hash: String,
    pub input_hash: Option<String>,
    pub audit_max_id: Option<i64>,
    pub last_modified: Option<String>,
    pub counts: RecordCounts,
}

/// Records the fingerprints of cleanly written subjects; a row whose
/// fingerprint did not change is not rewritten.
pub(crate) async fn save_subject_states(
    tx: &mut PgConnection,
    cp: &str,
    run_id: &str,
    written: &[Written],
) -> Result<(), sqlx::Error> {
    if written.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = written.iter().map(|w| w.subject_key.as_str()).collect();
    let hashes: Vec<&str> = written.iter().map(|w| w.content_hash.as_str()).collect();
    let inputs: Vec<Option<&str>> = written.iter().map(|w| w.input_hash.as_deref()).collect();
    let audits: Vec<Option<i64>> = written.iter().map(|w| w.audit_max_id).collect();
    let modified: Vec<Option<&str>> = written.iter().map(|w| w.last_modified.as_deref()).collect();
    let counts: Vec<serde_json::Value> = written
        .iter()
        .map(|w| serde_json::to_value(w.counts).expect("counts serialise"))
        .collect();
    sqlx::query(
        "INSERT INTO ocsync.subject_state AS s \
             (cp_id, subject_key, content_hash, audit_max_id, last_modified, record_counts, run_id, \
              input_hash) \
         SELECT $1, k, h, a, m, c, $7, i \
         FROM UNNEST($2::text[], $3::text[], $4::bigint[], $5::text[], $6::jsonb[], $8::text[]) \
              AS t(k, h, a, m, c, i) \
         ON CONFLICT (cp_id, subject_key) DO UPDATE SET \
             content_hash = EXCLUDED.content_hash, audit_max_id = EXCLUDED.audit_max_id, \
             last_modified = EXCLUDED.last_modified, record_counts = EXCLUDED.record_counts, \
             input_hash = EXCLUDED.input_hash, run_id = EXCLUDED.run_id, synced_at = now() \
         WHERE (s.content_hash, s.audit_max_id, s.last_modified, s.input_hash) \
               IS DISTINCT FROM (EXCLUDED.content_hash, EXCLUDED.audit_max_id, \
                                 EXCLUDED.last_modified, EXCLUDED.input_hash)",
    )
    .bind(cp)
    .bind(&keys)
    .bind(&hashes)
    .bind(&audits)
    .bind(&modified)
    .bind(&counts)
    .bind(run_id)
    .bind(&inputs)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Forgets the fingerprints of subjects that failed, so the next
/// incremental run tries them again even if OpenClinica did not change.
pub(crate) async fn forget_subject_states(
    tx: &mut PgConnection,
    cp: &str,
    keys: &[String],
) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM ocsync.subject_state WHERE cp_id = $1 AND subject_key = ANY($2)")
        .bind(cp)
        .bind(keys)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Appends error rows to the run's report.
pub(crate) async fn insert_errors(
    tx: &mut PgConnection,
    run_id: &str,
    cp: &str,
    errors: &[RecordError],
) -> Result<(), sqlx::Error> {
    if errors.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&RecordError) -> Option<&str>| -> Vec<Option<&str>> {
        errors.iter().map(f).collect()
    };
    let stages: Vec<&str> = errors.iter().map(|e| e.stage.as_str()).collect();
    let messages: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
    sqlx::query(
        "INSERT INTO ocsync.run_errors \
             (run_id, cp_id, subject_key, ppid, event_oid, repeat, form_oid, item_group_oid, \
              item_oid, stage, message) \
         SELECT $1, $2, s, p, e, r, f, g, i, st, m \
         FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], \
                     $9::text[], $10::text[], $11::text[]) \
              WITH ORDINALITY AS t(s, p, e, r, f, g, i, st, m, n) \
         ORDER BY n",
    )
    .bind(run_id)
    .bind(cp)
    .bind(col(|e| e.subject_key.as_deref()))
    .bind(col(|e| e.ppid.as_deref()))
    .bind(col(|e| e.event_oid.as_deref()))
    .bind(col(|e| e.repeat.as_deref()))
    .bind(col(|e| e.form_oid.as_deref()))
    .bind(col(|e| e.item_group_oid.as_deref()))
    .bind(col(|e| e.item_oid.as_deref()))
    .bind(&stages)
    .bind(&messages)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The high-water marks of a CP's last successful run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Watermark {
    pub audit_max_id: Option<i64>,
    pub last_modified: Option<String>,
}

pub(crate) async fn load_watermark(pool: &PgPool, cp: &str) -> Result<Watermark, sqlx::Error> {
    let row: Option<(Option<i64>, Option<String>)> = sqlx::query_as(
        "SELECT audit_max_id, last_modified FROM ocsync.cp_watermarks WHERE cp_id = $1",
    )
    .bind(cp)
    .fetch_optional(pool)
    .await?;
    Ok(row
        .map(|(audit_max_id, last_modified)| Watermark {
            audit_max_id,
            last_modified,
        })
        .unwrap_or_default())
}

/// Moves the marks forward (never back) after a successful run.
pub(crate) async fn advance_watermark(
    tx: &mut PgConnection,
    cp: &str,
    run_id: &str,
    mark: &Watermark,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO ocsync.cp_watermarks AS w (cp_id, audit_max_id, last_modified, run_id) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (cp_id) DO UPDATE SET \
             audit_max_id = GREATEST(w.audit_max_id, EXCLUDED.audit_max_id), \
             last_modified = GREATEST(w.last_modified, EXCLUDED.last_modified), \
             run_id = EXCLUDED.run_id, updated_at = now()",
    )
    .bind(cp)
    .bind(mark.audit_max_id)
    .bind(mark.last_modified.as_deref())
    .bind(run_id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
