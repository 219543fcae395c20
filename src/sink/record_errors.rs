//! Error rows for records a sink could not write, worded the same way by
//! every sink: the record's kind and key, then why. They name OIDs and keys,
//! never a clinical value.

use crate::mapping::{
    FormRecord, ParticipantRecord, RecordError, SpecimenRecord, Stage, VisitRecord,
};

fn base_error(
    p: &ParticipantRecord,
    event_oid: &str,
    repeat: &str,
    message: String,
) -> RecordError {
    RecordError {
        event_oid: Some(event_oid.to_owned()),
        repeat: Some(repeat.to_owned()),
        ..RecordError::subject(&p.subject_key, Some(&p.ppid), Stage::Write, message)
    }
}

pub(crate) fn participant_error(p: &ParticipantRecord, why: &str) -> RecordError {
    RecordError::subject(
        &p.subject_key,
        Some(&p.ppid),
        Stage::Write,
        format!("participant (PPID {}): {why}", p.ppid),
    )
}

pub(crate) fn visit_error(p: &ParticipantRecord, v: &VisitRecord, why: &str) -> RecordError {
    base_error(
        p,
        &v.event_oid,
        &v.event_repeat_key,
        format!(
            "visit (event {}, repeat '{}'): {why}",
            v.event_oid, v.event_repeat_key
        ),
    )
}

pub(crate) fn specimen_error(p: &ParticipantRecord, s: &SpecimenRecord, why: &str) -> RecordError {
    RecordError {
        form_oid: Some(s.crf_oid.clone()),
        item_group_oid: Some(s.item_group_oid.clone()),
        ..base_error(
            p,
            &s.event_oid,
            &s.event_repeat_key,
            format!(
                "specimen (event {}, repeat '{}', CRF {}, item group {}, repeat '{}'): {why}",
                s.event_oid,
                s.event_repeat_key,
                s.crf_oid,
                s.item_group_oid,
                s.item_group_repeat_key
            ),
        )
    }
}

pub(crate) fn form_record_error(p: &ParticipantRecord, f: &FormRecord, why: &str) -> RecordError {
    RecordError {
        form_oid: Some(f.form_oid.clone()),
        item_group_oid: Some(f.item_group_oid.clone()),
        ..base_error(
            p,
            &f.event_oid,
            &f.event_repeat_key,
            format!(
                "form record (event {}, repeat '{}', CRF {}, item group {}, repeat '{}'): {why}",
                f.event_oid,
                f.event_repeat_key,
                f.crf_oid,
                f.item_group_oid,
                f.item_group_repeat_key
            ),
        )
    }
}
