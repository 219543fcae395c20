//! The Postgres sink against the real server: rows equal to the records
//! (values included), exact counts, a second write that writes nothing,
//! vanished records flagged, duplicates and refused data isolated per
//! subject, CPs apart, and the caller's transaction in charge.

use std::collections::BTreeMap;

use ocsync::mapping::{
    FormRecord, ParticipantRecord, RecordError, RecordStatus, SpecimenRecord, Stage,
    SubjectRecords, VisitRecord,
};
use ocsync::sink::{BatchOutcome, Counts, EntityCounts, PostgresSink, Sink};
use sqlx::types::Json;
use sqlx::{PgPool, Row};

use crate::harness::TestDb;

const CP: &str = "cp-1";

/// Writes `batch` in a transaction of its own and commits it.
async fn write(pool: &PgPool, cp: &str, batch: &[SubjectRecords]) -> BatchOutcome {
    let mut tx = pool.begin().await.unwrap();
    let out = PostgresSink::new()
        .write_batch(&mut tx, cp, batch)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    out
}

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

fn map<const N: usize>(pairs: [(&str, Option<&str>); N]) -> BTreeMap<String, Option<String>> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.map(str::to_owned)))
        .collect()
}

/// A subject with `visits` repeats of a repeating visit, each with one
/// specimen and two form records (a vitals group and the specimen group),
/// plus a non-repeating screening visit with a form record. Values carry
/// the quirks that must round-trip: nulls, empty strings, untrimmed text,
/// non-ASCII, quotes, backslashes, tabs and line breaks.
fn subject(key: &str, visits: u32) -> SubjectRecords {
    let participant = ParticipantRecord {
        subject_key: key.to_owned(),
        ppid: format!("PPID-{key}"),
        study_oid: "S_TEST_SITE1".to_owned(),
        site: s("Site One"),
        uid: None,
        birth_date: s("1987"),
        gender: s("Female"),
        registration_date: s(""),
        oc_status: s("signed"),
        status: RecordStatus::Active,
        fields: map([("ethnicity", Some(" Hispanic ")), ("vitalStatus", None)]),
    };
    let mut out = SubjectRecords {
        participant,
        visits: vec![VisitRecord {
            subject_key: key.to_owned(),
            event_oid: "SE_SCREENING".to_owned(),
            event_repeat_key: String::new(),
            event_label: "Screening".to_owned(),
            name: format!("{key}-screening"),
            visit_date: s("2022-04-12 10:00:00.0"),
            end_date: None,
            site: s("Site One"),
            oc_status: s("completed"),
            status: RecordStatus::Active,
        }],
        specimens: vec![],
        form_records: vec![FormRecord {
            subject_key: key.to_owned(),
            event_oid: "SE_SCREENING".to_owned(),
            event_repeat_key: String::new(),
            crf_oid: "F_DEMOG".to_owned(),
            form_oid: "F_DEMOG_V1".to_owned(),
            form_version: s("v1"),
            item_group_oid: "IG_DEMOG".to_owned(),
            item_group_repeat_key: String::new(),
            form_status: s("data entry complete"),
            status: RecordStatus::Active,
            values: map([
                ("I_AGE", Some("41 ")),
                (
                    "I_COMMENT",
                    Some("line 1\nline\t2 \"quoted\" back\\slash Åsa"),
                ),
                ("I_EMPTY", Some("")),
                ("I_NULL", None),
                ("I_RACE", Some("1,2")),
            ]),
            item_names: [("I_AGE", "age"), ("I_COMMENT", "comment")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        }],
    };
    for r in 1..=visits {
        let repeat = r.to_string();
        out.visits.push(VisitRecord {
            subject_key: key.to_owned(),
            event_oid: "SE_VISIT".to_owned(),
            event_repeat_key: repeat.clone(),
            event_label: "Follow-up".to_owned(),
            name: format!("{key}-visit-{r}"),
            visit_date: s("2022-07"),
            end_date: s(""),
            site: None,
            oc_status: None,
            status: RecordStatus::Active,
        });
        out.specimens.push(SpecimenRecord {
            subject_key: key.to_owned(),
            event_oid: "SE_VISIT".to_owned(),
            event_repeat_key: repeat.clone(),
            crf_oid: "F_SPECIMEN".to_owned(),
            item_group_oid: "IG_SAMPLES".to_owned(),
            item_group_repeat_key: "1".to_owned(),
            label: s(&format!("BC-{key}-{r}")),
            specimen_type: s("Serum"),
            quantity: s("17.60 "),
            collection_time: None,
            fields: map([("unit", Some("ml")), ("comments", Some(""))]),
            status: RecordStatus::Active,
        });
        for (crf, group) in [("F_VITALS", "IG_VITALS"), ("F_SPECIMEN", "IG_SAMPLES")] {
            out.form_records.push(FormRecord {
                subject_key: key.to_owned(),
                event_oid: "SE_VISIT".to_owned(),
                event_repeat_key: repeat.clone(),
                crf_oid: crf.to_owned(),
                form_oid: format!("{crf}_V3"),
                form_version: None,
                item_group_oid: group.to_owned(),
                item_group_repeat_key: "1".to_owned(),
                form_status: s("signed"),
                status: RecordStatus::Active,
                values: map([("I_WEIGHT", Some("181.57")), ("I_PULSE", None)]),
                item_names: BTreeMap::new(),
            });
        }
    }
    out
}

fn status(v: &str) -> RecordStatus {
    match v {
        "active" => RecordStatus::Active,
        "removed" => RecordStatus::Removed,
        other => panic!("unexpected status {other}"),
    }
}

/// Every row of one CP, read back into records, in key order.
async fn read_cp(pool: &PgPool, cp: &str) -> Vec<SubjectRecords> {
    let participants =
        sqlx::query("SELECT * FROM ocsync_data.participants WHERE cp_id = $1 ORDER BY subject_key")
            .bind(cp)
            .fetch_all(pool)
            .await
            .unwrap();
    let mut out = Vec::new();
    for p in participants {
        let key: String = p.get("subject_key");
        let fields: Json<BTreeMap<String, Option<String>>> = p.get("fields");
        let visits = sqlx::query(
            "SELECT * FROM ocsync_data.visits WHERE cp_id = $1 AND subject_key = $2
             ORDER BY event_oid, event_repeat_key",
        )
        .bind(cp)
        .bind(&key)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|v| VisitRecord {
            subject_key: v.get("subject_key"),
            event_oid: v.get("event_oid"),
            event_repeat_key: v.get("event_repeat_key"),
            event_label: v.get("event_label"),
            name: v.get("name"),
            visit_date: v.get("visit_date"),
            end_date: v.get("end_date"),
            site: v.get("site"),
            oc_status: v.get("oc_status"),
            status: status(v.get("status")),
        })
        .collect();
        let specimens = sqlx::query(
            "SELECT * FROM ocsync_data.specimens WHERE cp_id = $1 AND subject_key = $2
             ORDER BY event_oid, event_repeat_key, crf_oid, item_group_oid, item_group_repeat_key",
        )
        .bind(cp)
        .bind(&key)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            let fields: Json<BTreeMap<String, Option<String>>> = r.get("fields");
            SpecimenRecord {
                subject_key: r.get("subject_key"),
                event_oid: r.get("event_oid"),
                event_repeat_key: r.get("event_repeat_key"),
                crf_oid: r.get("crf_oid"),
                item_group_oid: r.get("item_group_oid"),
                item_group_repeat_key: r.get("item_group_repeat_key"),
                label: r.get("label"),
                specimen_type: r.get("specimen_type"),
                quantity: r.get("quantity"),
                collection_time: r.get("collection_time"),
                fields: fields.0,
                status: status(r.get("status")),
            }
        })
        .collect();
        let form_records = sqlx::query(
            "SELECT * FROM ocsync_data.form_records WHERE cp_id = $1 AND subject_key = $2
             ORDER BY event_oid, event_repeat_key, crf_oid, item_group_oid, item_group_repeat_key",
        )
        .bind(cp)
        .bind(&key)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            let values: Json<BTreeMap<String, Option<String>>> = r.get("values");
            let item_names: Json<BTreeMap<String, String>> = r.get("item_names");
            FormRecord {
                subject_key: r.get("subject_key"),
                event_oid: r.get("event_oid"),
                event_repeat_key: r.get("event_repeat_key"),
                crf_oid: r.get("crf_oid"),
                form_oid: r.get("form_oid"),
                form_version: r.get("form_version"),
                item_group_oid: r.get("item_group_oid"),
                item_group_repeat_key: r.get("item_group_repeat_key"),
                form_status: r.get("form_status"),
                status: status(r.get("status")),
                values: values.0,
                item_names: item_names.0,
            }
        })
        .collect();
        out.push(SubjectRecords {
            participant: ParticipantRecord {
                subject_key: key,
                ppid: p.get("ppid"),
                study_oid: p.get("study_oid"),
                site: p.get("site"),
                uid: p.get("uid"),
                birth_date: p.get("birth_date"),
                gender: p.get("gender"),
                registration_date: p.get("registration_date"),
                oc_status: p.get("oc_status"),
                status: status(p.get("status")),
                fields: fields.0,
            },
            visits,
            specimens,
            form_records,
        });
    }
    out
}

/// The records as the tables hold them: subjects and their records in key
/// order.
fn sorted(batch: &[SubjectRecords]) -> Vec<SubjectRecords> {
    let mut out = batch.to_vec();
    out.sort_by(|a, b| a.subject_key().cmp(b.subject_key()));
    for s in &mut out {
        s.visits.sort_by(|a, b| {
            (&a.event_oid, &a.event_repeat_key).cmp(&(&b.event_oid, &b.event_repeat_key))
        });
        s.specimens.sort_by(|a, b| {
            (
                &a.event_oid,
                &a.event_repeat_key,
                &a.crf_oid,
                &a.item_group_oid,
                &a.item_group_repeat_key,
            )
                .cmp(&(
                    &b.event_oid,
                    &b.event_repeat_key,
                    &b.crf_oid,
                    &b.item_group_oid,
                    &b.item_group_repeat_key,
                ))
        });
        s.form_records.sort_by(|a, b| {
            (
                &a.event_oid,
                &a.event_repeat_key,
                &a.crf_oid,
                &a.item_group_oid,
                &a.item_group_repeat_key,
            )
                .cmp(&(
                    &b.event_oid,
                    &b.event_repeat_key,
                    &b.crf_oid,
                    &b.item_group_oid,
                    &b.item_group_repeat_key,
                ))
        });
    }
    out
}

fn ec(created: u64, updated: u64, unchanged: u64, failed: u64) -> EntityCounts {
    EntityCounts {
        created,
        updated,
        unchanged,
        failed,
    }
}

/// Counts with every record of `batch` in one column.
fn all(batch: &[SubjectRecords], f: fn(u64) -> EntityCounts) -> Counts {
    let sum = |g: fn(&SubjectRecords) -> usize| batch.iter().map(g).sum::<usize>() as u64;
    Counts {
        participants: f(batch.len() as u64),
        visits: f(sum(|s| s.visits.len())),
        specimens: f(sum(|s| s.specimens.len())),
        form_records: f(sum(|s| s.form_records.len())),
    }
}

/// `(table, key, xmin)` of every row: xmin changes whenever a row is
/// written, so equal snapshots prove nothing was.
async fn xmins(pool: &PgPool) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT 'p', cp_id || '/' || subject_key, xmin::text FROM ocsync_data.participants
         UNION ALL
         SELECT 'v', concat_ws('/', cp_id, subject_key, event_oid, event_repeat_key), xmin::text
         FROM ocsync_data.visits
         UNION ALL
         SELECT 's', concat_ws('/', cp_id, subject_key, event_oid, event_repeat_key, crf_oid,
                               item_group_oid, item_group_repeat_key), xmin::text
         FROM ocsync_data.specimens
         UNION ALL
         SELECT 'f', concat_ws('/', cp_id, subject_key, event_oid, event_repeat_key, crf_oid,
                               item_group_oid, item_group_repeat_key), xmin::text
         FROM ocsync_data.form_records
         ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_batch_is_written_row_for_row_and_counted_as_created() {
    let t = TestDb::migrated().await;
    let batch = vec![subject("SS_B", 2), subject("SS_A", 1), subject("SS_C", 0)];

    let out = write(&t.pool, CP, &batch).await;

    assert_eq!(out.errors, vec![]);
    assert_eq!(out.counts, all(&batch, |n| ec(n, 0, 0, 0)));
    assert_eq!(out.counts.form_records.created, 3 + 5 + 1);
    assert_eq!(read_cp(&t.pool, CP).await, sorted(&batch));
}

#[tokio::test]
async fn writing_the_same_batch_again_is_unchanged_and_writes_nothing() {
    let t = TestDb::migrated().await;
    let batch = vec![subject("SS_A", 3), subject("SS_B", 1)];
    write(&t.pool, CP, &batch).await;
    let before = xmins(&t.pool).await;

    let mut tx = t.pool.begin().await.unwrap();
    let out = PostgresSink::new()
        .write_batch(&mut tx, CP, &batch)
        .await
        .unwrap();
    // No transaction id was ever needed: not a row written, not a row
    // locked.
    let xid: Option<String> = sqlx::query_scalar("SELECT txid_current_if_assigned()::text")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    assert_eq!(out.errors, vec![]);
    assert_eq!(out.counts, all(&batch, |n| ec(0, 0, n, 0)));
    assert_eq!(xid, None);
    assert_eq!(xmins(&t.pool).await, before);
    assert_eq!(read_cp(&t.pool, CP).await, sorted(&batch));
}

#[tokio::test]
async fn a_changed_value_updates_exactly_that_row() {
    let t = TestDb::migrated().await;
    let mut batch = vec![subject("SS_A", 2), subject("SS_B", 2)];
    write(&t.pool, CP, &batch).await;
    let before = xmins(&t.pool).await;

    // An item value goes from a value to null: a change, whatever the
    // string was.
    batch[1].form_records[2]
        .values
        .insert("I_WEIGHT".to_owned(), None);
    // A trailing space is a change too: values are raw.
    batch[0].participant.ppid.push(' ');
    let out = write(&t.pool, CP, &batch).await;

    assert_eq!(out.errors, vec![]);
    assert_eq!(out.counts.participants, ec(0, 1, 1, 0));
    assert_eq!(out.counts.visits, ec(0, 0, 6, 0));
    assert_eq!(out.counts.specimens, ec(0, 0, 4, 0));
    assert_eq!(out.counts.form_records, ec(0, 1, 9, 0));
    let after = xmins(&t.pool).await;
    let changed: Vec<_> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b != a)
        .map(|(_, a)| a.1.clone())
        .collect();
    let f = &batch[1].form_records[2];
    assert_eq!(
        changed,
        vec![
            format!(
                "{CP}/SS_B/{}/{}/{}/{}/{}",
                f.event_oid,
                f.event_repeat_key,
                f.crf_oid,
                f.item_group_oid,
                f.item_group_repeat_key
            ),
            format!("{CP}/SS_A"),
        ]
    );
    assert_eq!(read_cp(&t.pool, CP).await, sorted(&batch));
    // updated_at moved for the changed row only.
    let moved: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ocsync_data.form_records WHERE updated_at > first_seen_at",
    )
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(moved, 1);
}

#[tokio::test]
async fn vanished_records_are_flagged_removed_and_come_back() {
    let t = TestDb::migrated().await;
    let full = vec![subject("SS_A", 2), subject("SS_B", 2)];
    write(&t.pool, CP, &full).await;

    // Visit 2 of SS_A (with its specimen and two form records) is deleted
    // in OpenClinica; SS_B is not in this batch and must not be touched.
    let fewer = vec![subject("SS_A", 1)];
    let out = write(&t.pool, CP, &fewer).await;

    assert_eq!(out.errors, vec![]);
    assert_eq!(out.counts.participants, ec(0, 0, 1, 0));
    assert_eq!(out.counts.visits, ec(0, 1, 2, 0));
    assert_eq!(out.counts.specimens, ec(0, 1, 1, 0));
    assert_eq!(out.counts.form_records, ec(0, 2, 3, 0));
    let mut expected = sorted(&full);
    for v in &mut expected[0].visits {
        if v.event_repeat_key == "2" {
            v.status = RecordStatus::Removed;
        }
    }
    for s in &mut expected[0].specimens {
        if s.event_repeat_key == "2" {
            s.status = RecordStatus::Removed;
        }
    }
    for f in &mut expected[0].form_records {
        if f.event_repeat_key == "2" {
            f.status = RecordStatus::Removed;
        }
    }
    assert_eq!(read_cp(&t.pool, CP).await, expected);

    // Still gone: nothing to do, and the removed rows are not counted again.
    let before = xmins(&t.pool).await;
    let out = write(&t.pool, CP, &fewer).await;
    assert_eq!(out.counts, all(&fewer, |n| ec(0, 0, n, 0)));
    assert_eq!(xmins(&t.pool).await, before);

    // Back in OpenClinica: active again, counted as updated.
    let out = write(&t.pool, CP, &full[..1]).await;
    assert_eq!(out.counts.visits, ec(0, 1, 2, 0));
    assert_eq!(out.counts.specimens, ec(0, 1, 1, 0));
    assert_eq!(out.counts.form_records, ec(0, 2, 3, 0));
    assert_eq!(read_cp(&t.pool, CP).await, sorted(&full));
}

#[tokio::test]
async fn duplicate_keys_in_a_batch_become_error_rows_and_the_rest_is_written() {
    let t = TestDb::migrated().await;
    // SS_A twice: the last occurrence wins.
    let first_a = subject("SS_A", 1);
    let mut last_a = subject("SS_A", 2);
    last_a.participant.ppid = "PPID-A-RELABELLED".to_owned();
    // SS_B has the same item group repeat twice (and one record that claims
    // another subject).
    let mut b = subject("SS_B", 1);
    let mut dup = b.form_records[1].clone();
    dup.values.insert("I_WEIGHT".to_owned(), s("99"));
    b.form_records.push(dup);
    let mut stray = b.visits[0].clone();
    stray.subject_key = "SS_OTHER".to_owned();
    b.visits.push(stray);
    let batch = vec![first_a.clone(), b.clone(), last_a.clone()];

    let out = write(&t.pool, CP, &batch).await;

    assert_eq!(out.errors.len(), 3, "{:#?}", out.errors);
    assert!(out.errors.iter().all(|e| e.stage == Stage::Write));
    let subject_dup = &out.errors[0];
    assert_eq!(subject_dup.subject_key.as_deref(), Some("SS_A"));
    assert!(
        subject_dup.message.contains("more than once"),
        "{}",
        subject_dup.message
    );
    let stray_err = &out.errors[1];
    assert_eq!(stray_err.subject_key.as_deref(), Some("SS_B"));
    assert!(
        stray_err.message.contains("subject key"),
        "{}",
        stray_err.message
    );
    let group_dup = &out.errors[2];
    assert_eq!(
        (
            group_dup.subject_key.as_deref(),
            group_dup.event_oid.as_deref(),
            group_dup.repeat.as_deref(),
            group_dup.form_oid.as_deref(),
            group_dup.item_group_oid.as_deref(),
        ),
        (
            Some("SS_B"),
            Some("SE_VISIT"),
            Some("1"),
            Some("F_VITALS_V3"),
            Some("IG_VITALS")
        )
    );
    assert!(
        group_dup.message.contains("same key"),
        "{}",
        group_dup.message
    );

    // Created: the last SS_A and SS_B without its dropped copies.
    assert_eq!(out.counts.participants, ec(2, 0, 0, 1));
    assert_eq!(out.counts.visits, ec(3 + 2, 0, 0, 2 + 1));
    assert_eq!(out.counts.specimens, ec(2 + 1, 0, 0, 1));
    assert_eq!(out.counts.form_records, ec(5 + 3, 0, 0, 3 + 1));

    let mut b_written = b;
    b_written.visits.pop();
    // Last wins: the copy (value 99) replaced the original at its key.
    let last = b_written.form_records.pop().unwrap();
    b_written.form_records[1] = last;
    assert_eq!(read_cp(&t.pool, CP).await, sorted(&[last_a, b_written]));
}

#[tokio::test]
async fn a_subject_whose_data_the_database_refuses_fails_alone() {
    let t = TestDb::migrated().await;
    // A NUL byte: PostgreSQL refuses it in text (22021) and in jsonb (22P05).
    let mut bad_text = subject("SS_B", 1);
    bad_text.visits[1].name = "secret\0name".to_owned();
    let mut bad_json = subject("SS_D", 1);
    bad_json.form_records[0]
        .values
        .insert("I_SECRET".to_owned(), s("secret\0value"));
    let good = vec![subject("SS_A", 2), subject("SS_C", 1)];
    let batch = vec![
        good[0].clone(),
        bad_text.clone(),
        good[1].clone(),
        bad_json.clone(),
    ];

    let mut tx = t.pool.begin().await.unwrap();
    let out = PostgresSink::new()
        .write_batch(&mut tx, CP, &batch)
        .await
        .unwrap();
    // The caller's transaction is still usable: its checkpoint commits.
    tx.commit().await.unwrap();

    let keys: Vec<_> = out
        .errors
        .iter()
        .map(|e| (e.subject_key.as_deref(), e.ppid.as_deref(), e.stage))
        .collect();
    assert_eq!(
        keys,
        vec![
            (Some("SS_B"), Some("PPID-SS_B"), Stage::Write),
            (Some("SS_D"), Some("PPID-SS_D"), Stage::Write)
        ]
    );
    let msg = |e: &RecordError| e.message.clone();
    assert!(
        msg(&out.errors[0]).contains("ocsync_data.visits"),
        "{}",
        msg(&out.errors[0])
    );
    assert!(
        msg(&out.errors[1]).contains("ocsync_data.form_records"),
        "{}",
        msg(&out.errors[1])
    );
    for e in &out.errors {
        assert!(
            !e.message.contains("secret"),
            "a value leaked: {}",
            e.message
        );
    }
    let failed = all(&[bad_text, bad_json], |n| ec(0, 0, 0, n));
    let mut expected = all(&good, |n| ec(n, 0, 0, 0));
    expected.add(&failed);
    assert_eq!(out.counts, expected);
    assert_eq!(read_cp(&t.pool, CP).await, sorted(&good));
}

#[tokio::test]
async fn collection_protocols_do_not_see_each_others_rows() {
    let t = TestDb::migrated().await;
    let one = vec![subject("SS_A", 2)];
    let mut two = vec![subject("SS_A", 1)];
    two[0].participant.ppid = "OTHER-PPID".to_owned();

    assert_eq!(
        write(&t.pool, "cp-1", &one).await.counts,
        all(&one, |n| ec(n, 0, 0, 0))
    );
    // Same natural keys in another CP: created, not updated, and the
    // vanished-record check of cp-2 leaves cp-1's second visit alone.
    assert_eq!(
        write(&t.pool, "cp-2", &two).await.counts,
        all(&two, |n| ec(n, 0, 0, 0))
    );

    assert_eq!(read_cp(&t.pool, "cp-1").await, sorted(&one));
    assert_eq!(read_cp(&t.pool, "cp-2").await, sorted(&two));
}

#[tokio::test]
async fn rolling_back_the_callers_transaction_leaves_nothing() {
    let t = TestDb::migrated().await;
    let batch = vec![subject("SS_A", 2), subject("SS_B", 1)];

    let mut tx = t.pool.begin().await.unwrap();
    let out = PostgresSink::new()
        .write_batch(&mut tx, CP, &batch)
        .await
        .unwrap();
    assert_eq!(out.counts, all(&batch, |n| ec(n, 0, 0, 0)));
    tx.rollback().await.unwrap();

    assert_eq!(xmins(&t.pool).await, vec![]);
}

#[tokio::test]
async fn an_empty_batch_does_nothing() {
    let t = TestDb::migrated().await;
    let out = write(&t.pool, CP, &[]).await;
    assert_eq!(out, BatchOutcome::default());
}

#[tokio::test]
async fn a_broken_connection_fails_the_batch_as_transient() {
    let t = TestDb::migrated().await;
    let mut tx = t.pool.begin().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert!(killed);

    let err = PostgresSink::new()
        .write_batch(&mut tx, CP, &[subject("SS_A", 1)])
        .await
        .unwrap_err();

    assert!(err.is_transient(), "{err:?}");
}

#[tokio::test]
async fn a_batch_of_new_and_known_subjects_counts_each_correctly() {
    let t = TestDb::migrated().await;
    let known = vec![subject("SS_A", 2), subject("SS_B", 1)];
    write(&t.pool, CP, &known).await;

    // SS_A unchanged, SS_B with one changed visit and one vanished visit,
    // SS_C and SS_D new (copied in, not upserted).
    let mut b = subject("SS_B", 0);
    b.visits[0].name = "renamed".to_owned();
    let batch = vec![
        subject("SS_C", 1),
        known[0].clone(),
        b.clone(),
        subject("SS_D", 0),
    ];
    let out = write(&t.pool, CP, &batch).await;

    assert_eq!(out.errors, vec![]);
    let mut expected = all(&[subject("SS_C", 1), subject("SS_D", 0)], |n| {
        ec(n, 0, 0, 0)
    });
    expected.add(&all(&known[..1], |n| ec(0, 0, n, 0)));
    // SS_B: its screening visit updated, its follow-up visit flagged
    // removed (an update), its specimen and form records of that visit
    // flagged removed too; participant and screening form unchanged.
    expected.add(&Counts {
        participants: ec(0, 0, 1, 0),
        visits: ec(0, 2, 0, 0),
        specimens: ec(0, 1, 0, 0),
        form_records: ec(0, 2, 1, 0),
    });
    assert_eq!(out.counts, expected);
}

#[tokio::test]
async fn rows_left_behind_by_a_deleted_participant_are_upserted_not_copied() {
    let t = TestDb::migrated().await;
    let first = vec![subject("SS_A", 2), subject("SS_B", 1)];
    write(&t.pool, CP, &first).await;
    // Someone deletes a participant row by hand; its visits, specimens and
    // form records stay. The subject now looks new, but copying its rows
    // would meet their primary keys.
    sqlx::query("DELETE FROM ocsync_data.participants WHERE cp_id = $1 AND subject_key = 'SS_A'")
        .bind(CP)
        .execute(&t.pool)
        .await
        .unwrap();

    let batch = vec![first[0].clone(), first[1].clone(), subject("SS_C", 1)];
    let out = write(&t.pool, CP, &batch).await;

    assert_eq!(out.errors, vec![]);
    // SS_A's participant is created again, its other rows are found
    // unchanged; SS_B is unchanged; SS_C is new.
    let mut expected = all(&[subject("SS_C", 1)], |n| ec(n, 0, 0, 0));
    expected.add(&all(&first, |n| ec(0, 0, n, 0)));
    expected.participants = ec(2, 0, 1, 0);
    assert_eq!(out.counts, expected);
    let mut all_subjects = batch.clone();
    all_subjects.sort_by(|x, y| x.participant.subject_key.cmp(&y.participant.subject_key));
    assert_eq!(read_cp(&t.pool, CP).await, sorted(&all_subjects));
}
