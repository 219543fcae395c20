//! Before a sink writes anything: a batch's duplicates and stray records
//! taken out, each as an error row and a `failed` count, so every sink
//! writes each natural key at most once per batch (a bulk upsert cannot
//! touch a row twice; a REST target would create it twice).
//!
//! A subject given twice keeps its last occurrence; within a subject, a
//! record repeating another's natural key keeps the last one; a record
//! whose `subject_key` is not its subject's is refused.

use std::collections::HashMap;
use std::hash::Hash;

use super::Counts;
use super::EntityCounts;
use super::record_errors::{form_record_error, specimen_error, visit_error};
use crate::mapping::{
    FormRecord, ParticipantRecord, RecordError, SpecimenRecord, Stage, SubjectRecords, VisitRecord,
};

/// One subject's records, de-duplicated, ready to write.
pub(crate) struct SubjectPlan<'a> {
    pub(crate) participant: &'a ParticipantRecord,
    pub(crate) visits: Vec<&'a VisitRecord>,
    pub(crate) specimens: Vec<&'a SpecimenRecord>,
    pub(crate) form_records: Vec<&'a FormRecord>,
}

pub(crate) struct Plan<'a> {
    pub(crate) subjects: Vec<SubjectPlan<'a>>,
    pub(crate) errors: Vec<RecordError>,
    /// Records dropped while planning (`failed` only).
    pub(crate) failed: Counts,
}

pub(crate) fn plan(batch: &[SubjectRecords]) -> Plan<'_> {
    let mut out = Plan {
        subjects: Vec::with_capacity(batch.len()),
        errors: Vec::new(),
        failed: Counts::default(),
    };
    let last: HashMap<&str, usize> = batch
        .iter()
        .enumerate()
        .map(|(i, s)| (s.subject_key(), i))
        .collect();
    for (i, subject) in batch.iter().enumerate() {
        let p = &subject.participant;
        if last[subject.subject_key()] != i {
            out.errors.push(RecordError::subject(
                &p.subject_key,
                Some(&p.ppid),
                Stage::Write,
                "the subject appears more than once in the batch; only its last occurrence was written",
            ));
            out.failed.participants.failed += 1;
            out.failed.visits.failed += subject.visits.len() as u64;
            out.failed.specimens.failed += subject.specimens.len() as u64;
            out.failed.form_records.failed += subject.form_records.len() as u64;
            continue;
        }
        let visits = keep(
            p,
            &subject.visits,
            |v| &v.subject_key,
            |v| (v.event_oid.as_str(), v.event_repeat_key.as_str()),
            visit_error,
            &mut out.errors,
            &mut out.failed.visits,
        );
        let specimens = keep(
            p,
            &subject.specimens,
            |s| &s.subject_key,
            |s| {
                (
                    s.event_oid.as_str(),
                    s.event_repeat_key.as_str(),
                    s.crf_oid.as_str(),
                    s.item_group_oid.as_str(),
                    s.item_group_repeat_key.as_str(),
                )
            },
            specimen_error,
            &mut out.errors,
            &mut out.failed.specimens,
        );
        let form_records = keep(
            p,
            &subject.form_records,
            |f| &f.subject_key,
            |f| {
                (
                    f.event_oid.as_str(),
                    f.event_repeat_key.as_str(),
                    f.crf_oid.as_str(),
                    f.item_group_oid.as_str(),
                    f.item_group_repeat_key.as_str(),
                )
            },
            form_record_error,
            &mut out.errors,
            &mut out.failed.form_records,
        );
        out.subjects.push(SubjectPlan {
            participant: p,
            visits,
            specimens,
            form_records,
        });
    }
    out
}

/// The records of one subject that can be written: those of this subject,
/// the last of each natural key. The others become errors.
fn keep<'a, T, K: Hash + Eq>(
    participant: &ParticipantRecord,
    records: &'a [T],
    subject_of: impl Fn(&'a T) -> &'a str,
    key: impl Fn(&'a T) -> K,
    error: impl Fn(&ParticipantRecord, &T, &str) -> RecordError,
    errors: &mut Vec<RecordError>,
    failed: &mut EntityCounts,
) -> Vec<&'a T> {
    let mut last = HashMap::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        if subject_of(r) == participant.subject_key {
            last.insert(key(r), i);
        }
    }
    let mut kept = Vec::with_capacity(last.len());
    for (i, r) in records.iter().enumerate() {
        if subject_of(r) != participant.subject_key {
            errors.push(error(
                participant,
                r,
                "the record's subject key is not its subject's; it was not written",
            ));
            failed.failed += 1;
        } else if last[&key(r)] != i {
            errors.push(error(
                participant,
                r,
                "another record of this subject has the same key in the batch; only the last one was written",
            ));
            failed.failed += 1;
        } else {
            kept.push(r);
        }
    }
    kept
}
