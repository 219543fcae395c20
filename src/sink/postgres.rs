//! The Postgres sink: mapped records upserted into the `ocsync_data`
//! tables (`participants`, `visits`, `specimens`, `form_records`), keyed by
//! CP and natural keys, inside the caller's transaction.
//!
//! What it knows: the record types of [`crate::mapping`], the tables of
//! `migrations/20261129000200_data_tables.sql`, and SQL. What it does NOT
//! know: ODM, OpenClinica, the queue, runs or checkpoints (the caller
//! commits those in the same transaction), or OpenSpecimen ids.
//!
//! # How a batch is written
//!
//! 1. **Plan** (in Rust, no IO). Natural keys must be unique within one
//!    statement (`ON CONFLICT DO UPDATE command cannot affect row a second
//!    time`), so duplicates are removed first, the last occurrence winning:
//!    a subject given twice is written once (from its last occurrence), and
//!    a record whose key repeats within its subject is written once. Every
//!    dropped copy becomes a [`RecordError`] (stage `write`) naming its key
//!    and counts as `failed`. A record whose `subject_key` is not its
//!    subject's is refused the same way (it would escape the vanished-record
//!    check below).
//! 2. **New subjects by `COPY`.** One primary-key probe per batch finds the
//!    subjects the CP has no participant row for; their rows go in by
//!    `COPY … FROM STDIN` into each table ([`copy`]) and all count as
//!    created: there is nothing to compare, update or flag for them.
//! 3. **One bulk statement per table and purpose** for the other subjects:
//!    an upsert from `UNNEST` of one array per column, and, for visits,
//!    specimens and form records, an update that flags vanished rows. That
//!    is seven statements per batch whatever its size.
//! 4. **Change check without writes.** The upsert reads each incoming row's
//!    stored twin first (an index probe on the primary key) and only rows
//!    that are new or differ go into `INSERT … ON CONFLICT DO UPDATE … WHERE
//!    (stored) IS DISTINCT FROM (incoming)`. Passing unchanged rows to
//!    `ON CONFLICT` would not update them, but it would still lock them,
//!    and a row lock dirties the page and is WAL-logged: a second sync of an
//!    unchanged study would write. With the pre-check it assigns no
//!    transaction id at all (the tests prove it).
//! 5. **Counts.** Rows the upsert returns with `xmax = 0` were inserted
//!    (`created`); the other returned rows were updated (`updated`); input
//!    rows not returned were `unchanged`. Vanished rows flagged `removed`
//!    count as `updated` of their entity.
//!
//! # Vanished records
//!
//! When a subject is written, its rows (same CP) in `visits`, `specimens`
//! and `form_records` that are `active` but no longer among its records are
//! set to `status = 'removed'` (never deleted). A subject not in the batch is
//! never touched; a row that comes back later is set `active` again.
//!
//! # Failures
//!
//! The batch runs under a savepoint. When a statement fails for a reason in
//! the data (SQLSTATE classes 21, 22, 23 and 54000: a NUL byte, a
//! constraint, a key too long to index), the savepoint is rolled back and the
//! batch is written again without `COPY`, then, if that fails too, subject
//! by subject, each under its own savepoint:
//! a failing subject becomes one error row naming the table and the cause
//! (never the value) and all its records count as `failed`; the others are
//! written. Any other error (connection lost, serialisation failure, missing
//! table) fails the whole batch with [`SinkError`], whose
//! [`SinkError::is_transient`] tells the caller whether to retry.
//!
//! The caller's connection must be inside a transaction (savepoints need
//! one).
//!
//! # Why `COPY` only for new subjects
//!
//! `COPY` is PostgreSQL's fastest way in, but it cannot upsert. `COPY` into
//! a temporary table then `MERGE` would, but PostgreSQL 15's `MERGE` has no
//! `RETURNING`, so created versus updated would need another pass, and it
//! costs a temporary table and twice the statements per batch. So a
//! subject the CP has never seen (a first sync, or new enrolments) is
//! copied straight into the tables, and a known subject goes through
//! `UNNEST` of binary `text[]` parameters, one round trip per table, which
//! does the change check and the counting in one statement. Should a
//! "new" subject meet rows of its own (left behind by hand after its
//! participant row was deleted), its `COPY` fails on the primary key and
//! the batch is written again through the upsert path alone. `make bench`
//! measures the sink and the whole sync against a bare `COPY` of the same
//! rows (the ceiling).
//!
//! # Plans that do not depend on statistics
//!
//! During a first sync the tables grow from nothing faster than autovacuum
//! analyses them, and without statistics the planner guesses `cp_id = $1`
//! matches 0.5 % of the rows. Plans that trusted that guess scanned the
//! whole CP once per batch (quadratic: 0.03 of the ceiling on 10,000
//! subjects). So every lookup is written so that its only sensible plan is
//! a primary-key probe: `LEFT JOIN LATERAL (… LIMIT 1)` for the change
//! check, `CROSS JOIN LATERAL (… OFFSET 0)` per subject for vanished rows,
//! and no secondary index starts with `cp_id`.

pub mod copy;

use sqlx::PgConnection;

use super::plan::{SubjectPlan, plan};
use super::{BatchOutcome, Counts, EntityCounts, Sink, SinkError};
use crate::mapping::{RecordError, Stage, SubjectRecords};

/// Writes batches into the `ocsync_data` tables. Stateless: every call gets
/// the caller's transaction.
#[derive(Debug, Clone, Copy, Default)]
pub struct PostgresSink;

impl PostgresSink {
    pub fn new() -> Self {
        Self
    }
}

impl Sink for PostgresSink {
    async fn write_batch(
        &self,
        tx: &mut PgConnection,
        cp: &str,
        batch: &[SubjectRecords],
    ) -> Result<BatchOutcome, SinkError> {
        let plan = plan(batch);
        let mut outcome = BatchOutcome {
            counts: plan.failed,
            errors: plan.errors,
        };
        if plan.subjects.is_empty() {
            return Ok(outcome);
        }
        // New subjects go in by COPY; should that meet rows it did not
        // expect, the batch is written again through the upsert path alone.
        let all: Vec<&SubjectPlan<'_>> = plan.subjects.iter().collect();
        for copy_new in [true, false] {
            exec(tx, "SAVEPOINT ocsync_sink_batch").await?;
            match write_subjects(tx, cp, &all, copy_new).await {
                Ok(counts) => {
                    exec(tx, "RELEASE SAVEPOINT ocsync_sink_batch").await?;
                    outcome.counts.add(&counts);
                    return Ok(outcome);
                }
                Err(failure) if failure.is_data_error() => {
                    exec(tx, "ROLLBACK TO SAVEPOINT ocsync_sink_batch").await?;
                    exec(tx, "RELEASE SAVEPOINT ocsync_sink_batch").await?;
                    if !copy_new && plan.subjects.len() == 1 {
                        fail_subject(&plan.subjects[0], &failure, &mut outcome);
                        return Ok(outcome);
                    }
                }
                Err(failure) => return Err(SinkError::Database(failure.error)),
            }
        }
        // Some subject's data is refused: find which, one at a time, so the
        // others are still written.
        for subject in &plan.subjects {
            exec(tx, "SAVEPOINT ocsync_sink_subject").await?;
            match write_subjects(tx, cp, &[subject], false).await {
                Ok(counts) => {
                    exec(tx, "RELEASE SAVEPOINT ocsync_sink_subject").await?;
                    outcome.counts.add(&counts);
                }
                Err(failure) if failure.is_data_error() => {
                    exec(tx, "ROLLBACK TO SAVEPOINT ocsync_sink_subject").await?;
                    exec(tx, "RELEASE SAVEPOINT ocsync_sink_subject").await?;
                    fail_subject(subject, &failure, &mut outcome);
                }
                Err(failure) => return Err(SinkError::Database(failure.error)),
            }
        }
        Ok(outcome)
    }
}

async fn exec(tx: &mut PgConnection, sql: &'static str) -> Result<(), SinkError> {
    sqlx::raw_sql(sql).execute(tx).await?;
    Ok(())
}

/// A subject whose rows the database refused: one error row, every record
/// of it failed.
fn fail_subject(subject: &SubjectPlan<'_>, failure: &WriteFailure, outcome: &mut BatchOutcome) {
    let p = subject.participant;
    outcome.errors.push(RecordError::subject(
        &p.subject_key,
        Some(&p.ppid),
        Stage::Write,
        failure.describe(),
    ));
    let c = &mut outcome.counts;
    c.participants.failed += 1;
    c.visits.failed += subject.visits.len() as u64;
    c.specimens.failed += subject.specimens.len() as u64;
    c.form_records.failed += subject.form_records.len() as u64;
}

// ---------------------------------------------------------------------------
// Write: the bulk statements.

/// A statement that failed, and on which table.
struct WriteFailure {
    table: &'static str,
    error: sqlx::Error,
}

impl WriteFailure {
    fn is_data_error(&self) -> bool {
        match &self.error {
            sqlx::Error::Database(d) => d
                .code()
                .is_some_and(|c| matches!(c.get(..2), Some("21" | "22" | "23")) || c == "54000"),
            // A value the driver could not encode: the data again.
            sqlx::Error::Encode(_) => true,
            _ => false,
        }
    }

    /// A message for the error report, built from the SQLSTATE, the table
    /// and the constraint or column. Never PostgreSQL's own message: some
    /// of those quote the value (`invalid input syntax …: "…"`).
    fn describe(&self) -> String {
        let table = self.table;
        let sqlx::Error::Database(d) = &self.error else {
            return format!("could not write to ocsync_data.{table}: a value could not be encoded");
        };
        let code = d.code().unwrap_or_default();
        let pg = d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
        let constraint = d.constraint().unwrap_or("?");
        let column = pg.and_then(|e| e.column()).unwrap_or("?");
        let cause = match &*code {
            "22021" => "a value contains a byte PostgreSQL cannot store as text (a NUL \\0 or invalid UTF-8)".to_owned(),
            "22P05" => "a value contains a character PostgreSQL cannot store in jsonb (\\u0000)".to_owned(),
            "23514" => format!("check constraint {constraint} failed"),
            "23502" => format!("column {column} must not be empty (NULL)"),
            "22001" => format!("a value is too long for column {column}"),
            "54000" => "a key value is too long to index (key columns hold at most about 2,700 bytes)".to_owned(),
            _ => format!("the database refused the rows (SQLSTATE {code})"),
        };
        format!("could not write to ocsync_data.{table}: {cause}")
    }
}

trait Table {
    const NAME: &'static str;
}

/// Writes `subjects`; with `copy_new`, those the CP has no participant row
/// for yet go in by `COPY` ([`copy`]) and only the others are upserted.
async fn write_subjects(
    tx: &mut PgConnection,
    cp: &str,
    subjects: &[&SubjectPlan<'_>],
    copy_new: bool,
) -> Result<Counts, WriteFailure> {
    let subject_keys: Vec<&str> = subjects
        .iter()
        .map(|s| s.participant.subject_key.as_str())
        .collect();
    let (mut counts, known) = if copy_new {
        let new: std::collections::HashSet<String> = sqlx::query_scalar(NEW_SUBJECTS)
            .bind(cp)
            .bind(&subject_keys)
            .fetch_all(&mut *tx)
            .await
            .map_err(on::<ParticipantCols>)?
            .into_iter()
            .collect();
        let (fresh, known): (Vec<&SubjectPlan<'_>>, Vec<&SubjectPlan<'_>>) = subjects
            .iter()
            .partition(|s| new.contains(&s.participant.subject_key));
        (copy::copy_new(tx, cp, &fresh).await?, known)
    } else {
        (Counts::default(), subjects.to_vec())
    };
    if known.is_empty() {
        return Ok(counts);
    }
    let subjects = known.as_slice();
    let subject_keys: Vec<&str> = subjects
        .iter()
        .map(|s| s.participant.subject_key.as_str())
        .collect();

    let p = ParticipantCols::new(subjects);
    let (created, updated) = p.upsert(tx, cp).await?;
    counts
        .participants
        .add(&counts_of(subjects.len(), created, updated, 0));

    let v = VisitCols::new(subjects);
    let (created, updated) = v.upsert(tx, cp).await?;
    let removed = v.flag_vanished(tx, cp, &subject_keys).await?;
    counts
        .visits
        .add(&counts_of(v.subject_key.len(), created, updated, removed));

    let s = SpecimenCols::new(subjects);
    let (created, updated) = s.upsert(tx, cp).await?;
    let removed = s.flag_vanished(tx, cp, &subject_keys).await?;
    counts
        .specimens
        .add(&counts_of(s.subject_key.len(), created, updated, removed));

    let f = FormRecordCols::new(subjects);
    let (created, updated) = f.upsert(tx, cp).await?;
    let removed = f.flag_vanished(tx, cp, &subject_keys).await?;
    counts
        .form_records
        .add(&counts_of(f.subject_key.len(), created, updated, removed));
    Ok(counts)
}

fn counts_of(input: usize, created: i64, updated: i64, removed: i64) -> EntityCounts {
    let (created, updated, removed) = (created as u64, updated as u64, removed as u64);
    EntityCounts {
        created,
        updated: updated + removed,
        unchanged: input as u64 - created - updated,
        failed: 0,
    }
}

fn on<T: Table>(error: sqlx::Error) -> WriteFailure {
    WriteFailure {
        table: T::NAME,
        error,
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    // Maps of strings always serialise.
    serde_json::to_string(value).expect("a map of strings serialises to JSON")
}

/// Flags the vanished rows of a table keyed like specimens and form
/// records (the record's six key columns after `cp_id`).
async fn flag_vanished_items(
    tx: &mut PgConnection,
    cp: &str,
    subjects: &[&str],
    keys: [&Vec<&str>; 6],
    find: &'static str,
    flag: &'static str,
) -> Result<i64, sqlx::Error> {
    type Key = (String, String, String, String, String, String);
    let mut query = sqlx::query_as::<_, Key>(find).bind(cp).bind(subjects);
    for column in keys {
        query = query.bind(column);
    }
    let gone = query.fetch_all(&mut *tx).await?;
    if gone.is_empty() {
        return Ok(0);
    }
    let mut columns: [Vec<String>; 6] = Default::default();
    for (a, b, c, d, e, f) in gone {
        for (column, value) in columns.iter_mut().zip([a, b, c, d, e, f]) {
            column.push(value);
        }
    }
    let mut query = sqlx::query(flag).bind(cp);
    for column in &columns {
        query = query.bind(column);
    }
    Ok(query.execute(tx).await?.rows_affected() as i64)
}

// One struct of column arrays per table: the UNNEST parameters.

struct ParticipantCols<'a> {
    subject_key: Vec<&'a str>,
    ppid: Vec<&'a str>,
    study_oid: Vec<&'a str>,
    site: Vec<Option<&'a str>>,
    uid: Vec<Option<&'a str>>,
    birth_date: Vec<Option<&'a str>>,
    gender: Vec<Option<&'a str>>,
    registration_date: Vec<Option<&'a str>>,
    oc_status: Vec<Option<&'a str>>,
    status: Vec<&'static str>,
    fields: Vec<String>,
}

impl Table for ParticipantCols<'_> {
    const NAME: &'static str = "participants";
}

impl<'a> ParticipantCols<'a> {
    fn new(subjects: &[&SubjectPlan<'a>]) -> Self {
        let ps = subjects.iter().map(|s| s.participant);
        Self {
            subject_key: ps.clone().map(|p| p.subject_key.as_str()).collect(),
            ppid: ps.clone().map(|p| p.ppid.as_str()).collect(),
            study_oid: ps.clone().map(|p| p.study_oid.as_str()).collect(),
            site: ps.clone().map(|p| p.site.as_deref()).collect(),
            uid: ps.clone().map(|p| p.uid.as_deref()).collect(),
            birth_date: ps.clone().map(|p| p.birth_date.as_deref()).collect(),
            gender: ps.clone().map(|p| p.gender.as_deref()).collect(),
            registration_date: ps.clone().map(|p| p.registration_date.as_deref()).collect(),
            oc_status: ps.clone().map(|p| p.oc_status.as_deref()).collect(),
            status: ps.clone().map(|p| p.status.as_str()).collect(),
            fields: ps.map(|p| json(&p.fields)).collect(),
        }
    }

    async fn upsert(&self, tx: &mut PgConnection, cp: &str) -> Result<(i64, i64), WriteFailure> {
        sqlx::query_as(UPSERT_PARTICIPANTS)
            .bind(cp)
            .bind(&self.subject_key)
            .bind(&self.ppid)
            .bind(&self.study_oid)
            .bind(&self.site)
            .bind(&self.uid)
            .bind(&self.birth_date)
            .bind(&self.gender)
            .bind(&self.registration_date)
            .bind(&self.oc_status)
            .bind(&self.status)
            .bind(&self.fields)
            .fetch_one(tx)
            .await
            .map_err(on::<Self>)
    }
}

struct VisitCols<'a> {
    subject_key: Vec<&'a str>,
    event_oid: Vec<&'a str>,
    event_repeat_key: Vec<&'a str>,
    event_label: Vec<&'a str>,
    name: Vec<&'a str>,
    visit_date: Vec<Option<&'a str>>,
    end_date: Vec<Option<&'a str>>,
    site: Vec<Option<&'a str>>,
    oc_status: Vec<Option<&'a str>>,
    status: Vec<&'static str>,
}

impl Table for VisitCols<'_> {
    const NAME: &'static str = "visits";
}

impl<'a> VisitCols<'a> {
    fn new(subjects: &[&SubjectPlan<'a>]) -> Self {
        let vs = subjects.iter().flat_map(|s| s.visits.iter().copied());
        Self {
            subject_key: vs.clone().map(|v| v.subject_key.as_str()).collect(),
            event_oid: vs.clone().map(|v| v.event_oid.as_str()).collect(),
            event_repeat_key: vs.clone().map(|v| v.event_repeat_key.as_str()).collect(),
            event_label: vs.clone().map(|v| v.event_label.as_str()).collect(),
            name: vs.clone().map(|v| v.name.as_str()).collect(),
            visit_date: vs.clone().map(|v| v.visit_date.as_deref()).collect(),
            end_date: vs.clone().map(|v| v.end_date.as_deref()).collect(),
            site: vs.clone().map(|v| v.site.as_deref()).collect(),
            oc_status: vs.clone().map(|v| v.oc_status.as_deref()).collect(),
            status: vs.map(|v| v.status.as_str()).collect(),
        }
    }

    async fn upsert(&self, tx: &mut PgConnection, cp: &str) -> Result<(i64, i64), WriteFailure> {
        sqlx::query_as(UPSERT_VISITS)
            .bind(cp)
            .bind(&self.subject_key)
            .bind(&self.event_oid)
            .bind(&self.event_repeat_key)
            .bind(&self.event_label)
            .bind(&self.name)
            .bind(&self.visit_date)
            .bind(&self.end_date)
            .bind(&self.site)
            .bind(&self.oc_status)
            .bind(&self.status)
            .fetch_one(tx)
            .await
            .map_err(on::<Self>)
    }

    async fn flag_vanished(
        &self,
        tx: &mut PgConnection,
        cp: &str,
        subjects: &[&str],
    ) -> Result<i64, WriteFailure> {
        let gone: Vec<(String, String, String)> = sqlx::query_as(FIND_VANISHED_VISITS)
            .bind(cp)
            .bind(subjects)
            .bind(&self.subject_key)
            .bind(&self.event_oid)
            .bind(&self.event_repeat_key)
            .fetch_all(&mut *tx)
            .await
            .map_err(on::<Self>)?;
        if gone.is_empty() {
            return Ok(0);
        }
        let mut keys: [Vec<String>; 3] = Default::default();
        for (a, b, c) in gone {
            keys[0].push(a);
            keys[1].push(b);
            keys[2].push(c);
        }
        let done = sqlx::query(FLAG_VANISHED_VISITS)
            .bind(cp)
            .bind(&keys[0])
            .bind(&keys[1])
            .bind(&keys[2])
            .execute(tx)
            .await
            .map_err(on::<Self>)?;
        Ok(done.rows_affected() as i64)
    }
}

struct SpecimenCols<'a> {
    subject_key: Vec<&'a str>,
    event_oid: Vec<&'a str>,
    event_repeat_key: Vec<&'a str>,
    crf_oid: Vec<&'a str>,
    item_group_oid: Vec<&'a str>,
    item_group_repeat_key: Vec<&'a str>,
    label: Vec<Option<&'a str>>,
    specimen_type: Vec<Option<&'a str>>,
    quantity: Vec<Option<&'a str>>,
    collection_time: Vec<Option<&'a str>>,
    fields: Vec<String>,
    status: Vec<&'static str>,
}

impl Table for SpecimenCols<'_> {
    const NAME: &'static str = "specimens";
}

impl<'a> SpecimenCols<'a> {
    fn new(subjects: &[&SubjectPlan<'a>]) -> Self {
        let ss = subjects.iter().flat_map(|s| s.specimens.iter().copied());
        Self {
            subject_key: ss.clone().map(|s| s.subject_key.as_str()).collect(),
            event_oid: ss.clone().map(|s| s.event_oid.as_str()).collect(),
            event_repeat_key: ss.clone().map(|s| s.event_repeat_key.as_str()).collect(),
            crf_oid: ss.clone().map(|s| s.crf_oid.as_str()).collect(),
            item_group_oid: ss.clone().map(|s| s.item_group_oid.as_str()).collect(),
            item_group_repeat_key: ss
                .clone()
                .map(|s| s.item_group_repeat_key.as_str())
                .collect(),
            label: ss.clone().map(|s| s.label.as_deref()).collect(),
            specimen_type: ss.clone().map(|s| s.specimen_type.as_deref()).collect(),
            quantity: ss.clone().map(|s| s.quantity.as_deref()).collect(),
            collection_time: ss.clone().map(|s| s.collection_time.as_deref()).collect(),
            fields: ss.clone().map(|s| json(&s.fields)).collect(),
            status: ss.map(|s| s.status.as_str()).collect(),
        }
    }

    async fn upsert(&self, tx: &mut PgConnection, cp: &str) -> Result<(i64, i64), WriteFailure> {
        sqlx::query_as(UPSERT_SPECIMENS)
            .bind(cp)
            .bind(&self.subject_key)
            .bind(&self.event_oid)
            .bind(&self.event_repeat_key)
            .bind(&self.crf_oid)
            .bind(&self.item_group_oid)
            .bind(&self.item_group_repeat_key)
            .bind(&self.label)
            .bind(&self.specimen_type)
            .bind(&self.quantity)
            .bind(&self.collection_time)
            .bind(&self.fields)
            .bind(&self.status)
            .fetch_one(tx)
            .await
            .map_err(on::<Self>)
    }

    async fn flag_vanished(
        &self,
        tx: &mut PgConnection,
        cp: &str,
        subjects: &[&str],
    ) -> Result<i64, WriteFailure> {
        let keys = [
            &self.subject_key,
            &self.event_oid,
            &self.event_repeat_key,
            &self.crf_oid,
            &self.item_group_oid,
            &self.item_group_repeat_key,
        ];
        flag_vanished_items(
            tx,
            cp,
            subjects,
            keys,
            FIND_VANISHED_SPECIMENS,
            FLAG_VANISHED_SPECIMENS,
        )
        .await
        .map_err(on::<Self>)
    }
}

struct FormRecordCols<'a> {
    subject_key: Vec<&'a str>,
    event_oid: Vec<&'a str>,
    event_repeat_key: Vec<&'a str>,
    crf_oid: Vec<&'a str>,
    item_group_oid: Vec<&'a str>,
    item_group_repeat_key: Vec<&'a str>,
    form_oid: Vec<&'a str>,
    form_version: Vec<Option<&'a str>>,
    form_status: Vec<Option<&'a str>>,
    status: Vec<&'static str>,
    values: Vec<String>,
    item_names: Vec<String>,
}

impl Table for FormRecordCols<'_> {
    const NAME: &'static str = "form_records";
}

impl<'a> FormRecordCols<'a> {
    fn new(subjects: &[&SubjectPlan<'a>]) -> Self {
        let fs = subjects.iter().flat_map(|s| s.form_records.iter().copied());
        Self {
            subject_key: fs.clone().map(|f| f.subject_key.as_str()).collect(),
            event_oid: fs.clone().map(|f| f.event_oid.as_str()).collect(),
            event_repeat_key: fs.clone().map(|f| f.event_repeat_key.as_str()).collect(),
            crf_oid: fs.clone().map(|f| f.crf_oid.as_str()).collect(),
            item_group_oid: fs.clone().map(|f| f.item_group_oid.as_str()).collect(),
            item_group_repeat_key: fs
                .clone()
                .map(|f| f.item_group_repeat_key.as_str())
                .collect(),
            form_oid: fs.clone().map(|f| f.form_oid.as_str()).collect(),
            form_version: fs.clone().map(|f| f.form_version.as_deref()).collect(),
            form_status: fs.clone().map(|f| f.form_status.as_deref()).collect(),
            status: fs.clone().map(|f| f.status.as_str()).collect(),
            values: fs.clone().map(|f| json(&f.values)).collect(),
            item_names: fs.map(|f| json(&f.item_names)).collect(),
        }
    }

    async fn upsert(&self, tx: &mut PgConnection, cp: &str) -> Result<(i64, i64), WriteFailure> {
        sqlx::query_as(UPSERT_FORM_RECORDS)
            .bind(cp)
            .bind(&self.subject_key)
            .bind(&self.event_oid)
            .bind(&self.event_repeat_key)
            .bind(&self.crf_oid)
            .bind(&self.item_group_oid)
            .bind(&self.item_group_repeat_key)
            .bind(&self.form_oid)
            .bind(&self.form_version)
            .bind(&self.form_status)
            .bind(&self.status)
            .bind(&self.values)
            .bind(&self.item_names)
            .fetch_one(tx)
            .await
            .map_err(on::<Self>)
    }

    async fn flag_vanished(
        &self,
        tx: &mut PgConnection,
        cp: &str,
        subjects: &[&str],
    ) -> Result<i64, WriteFailure> {
        let keys = [
            &self.subject_key,
            &self.event_oid,
            &self.event_repeat_key,
            &self.crf_oid,
            &self.item_group_oid,
            &self.item_group_repeat_key,
        ];
        flag_vanished_items(
            tx,
            cp,
            subjects,
            keys,
            FIND_VANISHED_FORM_RECORDS,
            FLAG_VANISHED_FORM_RECORDS,
        )
        .await
        .map_err(on::<Self>)
    }
}

// ---------------------------------------------------------------------------
// SQL. Each upsert: `u` is the batch; rows whose stored twin is identical
// are filtered out by a plain read (no lock, no write); the rest go through
// ON CONFLICT, whose WHERE repeats the check so a row changed meanwhile is
// still compared correctly. The final SELECT returns (created, updated).

const UPSERT_PARTICIPANTS: &str = "
WITH u AS (
    SELECT u.subject_key, u.ppid, u.study_oid, u.site, u.uid, u.birth_date, u.gender,
           u.registration_date, u.oc_status, u.status, u.fields::jsonb AS fields
    FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::text[], $9::text[], $10::text[], $11::text[], $12::text[])
         AS u(subject_key, ppid, study_oid, site, uid, birth_date, gender,
              registration_date, oc_status, status, fields)
), w AS (
    INSERT INTO ocsync_data.participants AS t
        (cp_id, subject_key, ppid, study_oid, site, uid, birth_date, gender,
         registration_date, oc_status, status, fields)
    SELECT $1::text, u.subject_key, u.ppid, u.study_oid, u.site, u.uid, u.birth_date, u.gender,
           u.registration_date, u.oc_status, u.status, u.fields
    FROM u
    LEFT JOIN LATERAL (
        SELECT true AS found, e.ppid, e.study_oid, e.site, e.uid, e.birth_date, e.gender, e.registration_date, e.oc_status, e.status, e.fields
        FROM ocsync_data.participants e
        WHERE e.cp_id = $1::text AND e.subject_key = u.subject_key
        LIMIT 1) e ON true
    WHERE e.found IS NULL
       OR (e.ppid, e.study_oid, e.site, e.uid, e.birth_date, e.gender,
               e.registration_date, e.oc_status, e.status, e.fields)
          IS DISTINCT FROM
          (u.ppid, u.study_oid, u.site, u.uid, u.birth_date, u.gender,
               u.registration_date, u.oc_status, u.status, u.fields)
    ON CONFLICT (cp_id, subject_key) DO UPDATE SET
        ppid = excluded.ppid, study_oid = excluded.study_oid, site = excluded.site,
        uid = excluded.uid, birth_date = excluded.birth_date, gender = excluded.gender,
        registration_date = excluded.registration_date, oc_status = excluded.oc_status,
        status = excluded.status, fields = excluded.fields, updated_at = now()
    WHERE (t.ppid, t.study_oid, t.site, t.uid, t.birth_date, t.gender,
           t.registration_date, t.oc_status, t.status, t.fields)
          IS DISTINCT FROM
          (excluded.ppid, excluded.study_oid, excluded.site, excluded.uid, excluded.birth_date,
           excluded.gender, excluded.registration_date, excluded.oc_status, excluded.status,
           excluded.fields)
    RETURNING t.xmax = 0 AS created
)
SELECT count(*) FILTER (WHERE created), count(*) FILTER (WHERE NOT created) FROM w";

const UPSERT_VISITS: &str = "
WITH u AS (
    SELECT *
    FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::text[], $9::text[], $10::text[], $11::text[])
         AS u(subject_key, event_oid, event_repeat_key, event_label, name, visit_date,
              end_date, site, oc_status, status)
), w AS (
    INSERT INTO ocsync_data.visits AS t
        (cp_id, subject_key, event_oid, event_repeat_key, event_label, name, visit_date,
         end_date, site, oc_status, status)
    SELECT $1::text, u.subject_key, u.event_oid, u.event_repeat_key, u.event_label, u.name,
           u.visit_date, u.end_date, u.site, u.oc_status, u.status
    FROM u
    LEFT JOIN LATERAL (
        SELECT true AS found, e.event_label, e.name, e.visit_date, e.end_date, e.site, e.oc_status, e.status
        FROM ocsync_data.visits e
        WHERE e.cp_id = $1::text AND e.subject_key = u.subject_key
          AND e.event_oid = u.event_oid AND e.event_repeat_key = u.event_repeat_key
        LIMIT 1) e ON true
    WHERE e.found IS NULL
       OR (e.event_label, e.name, e.visit_date, e.end_date, e.site, e.oc_status, e.status)
          IS DISTINCT FROM
          (u.event_label, u.name, u.visit_date, u.end_date, u.site, u.oc_status, u.status)
    ON CONFLICT (cp_id, subject_key, event_oid, event_repeat_key) DO UPDATE SET
        event_label = excluded.event_label, name = excluded.name,
        visit_date = excluded.visit_date, end_date = excluded.end_date, site = excluded.site,
        oc_status = excluded.oc_status, status = excluded.status, updated_at = now()
    WHERE (t.event_label, t.name, t.visit_date, t.end_date, t.site, t.oc_status, t.status)
          IS DISTINCT FROM
          (excluded.event_label, excluded.name, excluded.visit_date, excluded.end_date,
           excluded.site, excluded.oc_status, excluded.status)
    RETURNING t.xmax = 0 AS created
)
SELECT count(*) FILTER (WHERE created), count(*) FILTER (WHERE NOT created) FROM w";

const UPSERT_SPECIMENS: &str = "
WITH u AS (
    SELECT u.subject_key, u.event_oid, u.event_repeat_key, u.crf_oid, u.item_group_oid,
           u.item_group_repeat_key, u.label, u.specimen_type, u.quantity, u.collection_time,
           u.fields::jsonb AS fields, u.status
    FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[])
         AS u(subject_key, event_oid, event_repeat_key, crf_oid, item_group_oid,
              item_group_repeat_key, label, specimen_type, quantity, collection_time,
              fields, status)
), w AS (
    INSERT INTO ocsync_data.specimens AS t
        (cp_id, subject_key, event_oid, event_repeat_key, crf_oid, item_group_oid,
         item_group_repeat_key, label, specimen_type, quantity, collection_time, fields, status)
    SELECT $1::text, u.subject_key, u.event_oid, u.event_repeat_key, u.crf_oid,
           u.item_group_oid, u.item_group_repeat_key, u.label, u.specimen_type, u.quantity,
           u.collection_time, u.fields, u.status
    FROM u
    LEFT JOIN LATERAL (
        SELECT true AS found, e.label, e.specimen_type, e.quantity, e.collection_time, e.fields, e.status
        FROM ocsync_data.specimens e
        WHERE e.cp_id = $1::text AND e.subject_key = u.subject_key
          AND e.event_oid = u.event_oid AND e.event_repeat_key = u.event_repeat_key
          AND e.crf_oid = u.crf_oid AND e.item_group_oid = u.item_group_oid
          AND e.item_group_repeat_key = u.item_group_repeat_key
        LIMIT 1) e ON true
    WHERE e.found IS NULL
       OR (e.label, e.specimen_type, e.quantity, e.collection_time, e.fields, e.status)
          IS DISTINCT FROM
          (u.label, u.specimen_type, u.quantity, u.collection_time, u.fields, u.status)
    ON CONFLICT (cp_id, subject_key, event_oid, event_repeat_key, crf_oid, item_group_oid,
                 item_group_repeat_key) DO UPDATE SET
        label = excluded.label, specimen_type = excluded.specimen_type,
        quantity = excluded.quantity, collection_time = excluded.collection_time,
        fields = excluded.fields, status = excluded.status, updated_at = now()
    WHERE (t.label, t.specimen_type, t.quantity, t.collection_time, t.fields, t.status)
          IS DISTINCT FROM
          (excluded.label, excluded.specimen_type, excluded.quantity, excluded.collection_time,
           excluded.fields, excluded.status)
    RETURNING t.xmax = 0 AS created
)
SELECT count(*) FILTER (WHERE created), count(*) FILTER (WHERE NOT created) FROM w";

const UPSERT_FORM_RECORDS: &str = "
WITH u AS (
    SELECT u.subject_key, u.event_oid, u.event_repeat_key, u.crf_oid, u.item_group_oid,
           u.item_group_repeat_key, u.form_oid, u.form_version, u.form_status, u.status,
           u.values::jsonb AS values, u.item_names::jsonb AS item_names
    FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[])
         AS u(subject_key, event_oid, event_repeat_key, crf_oid, item_group_oid,
              item_group_repeat_key, form_oid, form_version, form_status, status,
              values, item_names)
), w AS (
    INSERT INTO ocsync_data.form_records AS t
        (cp_id, subject_key, event_oid, event_repeat_key, crf_oid, item_group_oid,
         item_group_repeat_key, form_oid, form_version, form_status, status, values, item_names)
    SELECT $1::text, u.subject_key, u.event_oid, u.event_repeat_key, u.crf_oid,
           u.item_group_oid, u.item_group_repeat_key, u.form_oid, u.form_version,
           u.form_status, u.status, u.values, u.item_names
    FROM u
    LEFT JOIN LATERAL (
        SELECT true AS found, e.form_oid, e.form_version, e.form_status, e.status, e.values, e.item_names
        FROM ocsync_data.form_records e
        WHERE e.cp_id = $1::text AND e.subject_key = u.subject_key
          AND e.event_oid = u.event_oid AND e.event_repeat_key = u.event_repeat_key
          AND e.crf_oid = u.crf_oid AND e.item_group_oid = u.item_group_oid
          AND e.item_group_repeat_key = u.item_group_repeat_key
        LIMIT 1) e ON true
    WHERE e.found IS NULL
       OR (e.form_oid, e.form_version, e.form_status, e.status, e.values, e.item_names)
          IS DISTINCT FROM
          (u.form_oid, u.form_version, u.form_status, u.status, u.values, u.item_names)
    ON CONFLICT (cp_id, subject_key, event_oid, event_repeat_key, crf_oid, item_group_oid,
                 item_group_repeat_key) DO UPDATE SET
        form_oid = excluded.form_oid, form_version = excluded.form_version,
        form_status = excluded.form_status, status = excluded.status,
        values = excluded.values, item_names = excluded.item_names, updated_at = now()
    WHERE (t.form_oid, t.form_version, t.form_status, t.status, t.values, t.item_names)
          IS DISTINCT FROM
          (excluded.form_oid, excluded.form_version, excluded.form_status, excluded.status,
           excluded.values, excluded.item_names)
    RETURNING t.xmax = 0 AS created
)
SELECT count(*) FILTER (WHERE created), count(*) FILTER (WHERE NOT created) FROM w";

// The batch's subjects that the CP has no participant row for (probed by
// primary key, whatever the statistics say).
const NEW_SUBJECTS: &str = "
SELECT k.subject_key
FROM UNNEST($2::text[]) AS k(subject_key)
LEFT JOIN LATERAL (
    SELECT true AS found FROM ocsync_data.participants e
    WHERE e.cp_id = $1::text AND e.subject_key = k.subject_key
    LIMIT 1) e ON true
WHERE e.found IS NULL";

// Vanished rows, in two steps. First a read: the active rows of the batch's
// subjects ($2) whose key is not among the batch's records ($3…), found by
// probing the primary key subject by subject (the LATERAL … OFFSET 0 keeps
// the planner from turning it into one scan of the whole CP, which it does
// on freshly filled tables it has no statistics for) and filtered through
// a hashed `NOT IN` (safe: no key column is nullable). Usually that finds
// nothing and nothing is written. Then, for what it found, the update.

const FIND_VANISHED_VISITS: &str = "
SELECT sk.subject_key, t.event_oid, t.event_repeat_key
FROM UNNEST($2::text[]) AS sk(subject_key)
CROSS JOIN LATERAL (
    SELECT t.event_oid, t.event_repeat_key
    FROM ocsync_data.visits t
    WHERE t.cp_id = $1::text AND t.subject_key = sk.subject_key AND t.status = 'active'
    OFFSET 0) t
WHERE (sk.subject_key, t.event_oid, t.event_repeat_key) NOT IN (
    SELECT * FROM UNNEST($3::text[], $4::text[], $5::text[]))";

const FLAG_VANISHED_VISITS: &str = "
UPDATE ocsync_data.visits AS t SET status = 'removed', updated_at = now()
FROM UNNEST($2::text[], $3::text[], $4::text[]) AS k(subject_key, event_oid, event_repeat_key)
WHERE t.cp_id = $1::text AND t.subject_key = k.subject_key AND t.event_oid = k.event_oid
  AND t.event_repeat_key = k.event_repeat_key AND t.status = 'active'";

const FIND_VANISHED_SPECIMENS: &str = "
SELECT sk.subject_key, t.event_oid, t.event_repeat_key, t.crf_oid, t.item_group_oid,
       t.item_group_repeat_key
FROM UNNEST($2::text[]) AS sk(subject_key)
CROSS JOIN LATERAL (
    SELECT t.event_oid, t.event_repeat_key, t.crf_oid, t.item_group_oid, t.item_group_repeat_key
    FROM ocsync_data.specimens t
    WHERE t.cp_id = $1::text AND t.subject_key = sk.subject_key AND t.status = 'active'
    OFFSET 0) t
WHERE (sk.subject_key, t.event_oid, t.event_repeat_key, t.crf_oid, t.item_group_oid,
       t.item_group_repeat_key) NOT IN (
    SELECT * FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[]))";

const FLAG_VANISHED_SPECIMENS: &str = "
UPDATE ocsync_data.specimens AS t SET status = 'removed', updated_at = now()
FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
     AS k(subject_key, event_oid, event_repeat_key, crf_oid, item_group_oid,
          item_group_repeat_key)
WHERE t.cp_id = $1::text AND t.subject_key = k.subject_key AND t.event_oid = k.event_oid
  AND t.event_repeat_key = k.event_repeat_key AND t.crf_oid = k.crf_oid
  AND t.item_group_oid = k.item_group_oid AND t.item_group_repeat_key = k.item_group_repeat_key
  AND t.status = 'active'";

const FIND_VANISHED_FORM_RECORDS: &str = "
SELECT sk.subject_key, t.event_oid, t.event_repeat_key, t.crf_oid, t.item_group_oid,
       t.item_group_repeat_key
FROM UNNEST($2::text[]) AS sk(subject_key)
CROSS JOIN LATERAL (
    SELECT t.event_oid, t.event_repeat_key, t.crf_oid, t.item_group_oid, t.item_group_repeat_key
    FROM ocsync_data.form_records t
    WHERE t.cp_id = $1::text AND t.subject_key = sk.subject_key AND t.status = 'active'
    OFFSET 0) t
WHERE (sk.subject_key, t.event_oid, t.event_repeat_key, t.crf_oid, t.item_group_oid,
       t.item_group_repeat_key) NOT IN (
    SELECT * FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[]))";

const FLAG_VANISHED_FORM_RECORDS: &str = "
UPDATE ocsync_data.form_records AS t SET status = 'removed', updated_at = now()
FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
     AS k(subject_key, event_oid, event_repeat_key, crf_oid, item_group_oid,
          item_group_repeat_key)
WHERE t.cp_id = $1::text AND t.subject_key = k.subject_key AND t.event_oid = k.event_oid
  AND t.event_repeat_key = k.event_repeat_key AND t.crf_oid = k.crf_oid
  AND t.item_group_oid = k.item_group_oid AND t.item_group_repeat_key = k.item_group_repeat_key
  AND t.status = 'active'";
