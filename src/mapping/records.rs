//! OpenSpecimen-shaped records: what one OpenClinica subject becomes.
//!
//! These types are the contract between [`crate::mapping`] (which builds
//! them), [`crate::sink`] (which writes them) and [`crate::sync`] (which
//! moves them in batches). They carry natural keys only: the OpenClinica
//! identifiers a record is found by again on the next run, never an id of a
//! database or of OpenSpecimen.
//!
//! Natural keys (within one CP):
//! - participant: `subject_key`
//! - visit: `subject_key, event_oid, event_repeat_key`
//! - specimen: `subject_key, event_oid, event_repeat_key, crf_oid,
//!   item_group_oid, item_group_repeat_key`
//! - form record: the same as a specimen (one record per item group repeat)
//!
//! Repeat keys are the raw ODM strings; an absent repeat key (a
//! non-repeating event or item group) is the empty string, so every key part
//! is a plain, comparable `String`.
//!
//! Values stay as OpenClinica wrote them unless the CP's mapping asks for a
//! normalisation (gender `m` → `Male`, a value map for a specimen type, …).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Whether a record is live in OpenClinica. Removed, auto-removed or invalid
/// data is written with its status, so it never looks live downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordStatus {
    Active,
    /// Removed, auto-removed, archived or invalid in OpenClinica.
    Removed,
}

impl RecordStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Removed => "removed",
        }
    }
}

/// Everything one subject maps to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectRecords {
    pub participant: ParticipantRecord,
    pub visits: Vec<VisitRecord>,
    pub specimens: Vec<SpecimenRecord>,
    pub form_records: Vec<FormRecord>,
}

impl SubjectRecords {
    pub fn subject_key(&self) -> &str {
        &self.participant.subject_key
    }
}

/// A CP registration with its participant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantRecord {
    /// `SubjectKey` (`SS_…`): stable even when the label is edited.
    pub subject_key: String,
    /// OpenSpecimen PPID: `StudySubjectID` unless the CP maps another field.
    pub ppid: String,
    /// `ClinicalData@StudyOID` the subject came from (study or site OID).
    pub study_oid: String,
    /// OpenSpecimen site, through the CP's site map; `None` when unmapped.
    pub site: Option<String>,
    /// `OpenClinica:UniqueIdentifier`.
    pub uid: Option<String>,
    /// `DateOfBirth`, or `YearOfBirth` when only the year is collected.
    pub birth_date: Option<String>,
    /// `Male`, `Female`, or `None` (OpenClinica's `"null"` and absent).
    pub gender: Option<String>,
    /// `OpenClinica:EnrollmentDate`.
    pub registration_date: Option<String>,
    /// OpenClinica's status word, raw.
    pub oc_status: Option<String>,
    pub status: RecordStatus,
    /// Further participant fields from the CP's participant field mapping
    /// (OpenSpecimen field name → value).
    pub fields: BTreeMap<String, Option<String>>,
}

/// A visit: one study event occurrence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisitRecord {
    pub subject_key: String,
    pub event_oid: String,
    pub event_repeat_key: String,
    /// OpenSpecimen event label, through the CP's event map.
    pub event_label: String,
    /// Visit name, from the CP's visit naming rule.
    pub name: String,
    /// `OpenClinica:StartDate`, raw.
    pub visit_date: Option<String>,
    pub end_date: Option<String>,
    pub site: Option<String>,
    pub oc_status: Option<String>,
    pub status: RecordStatus,
}

/// A specimen described by an item group repeat that the CP maps as one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecimenRecord {
    pub subject_key: String,
    pub event_oid: String,
    pub event_repeat_key: String,
    /// The CRF (not the CRF version): 3.x `ParentFormOID` or the FormOID
    /// without its `_V…` suffix; 4.x the FormOID.
    pub crf_oid: String,
    pub item_group_oid: String,
    pub item_group_repeat_key: String,
    pub label: Option<String>,
    pub specimen_type: Option<String>,
    /// Quantity as written (after the CP's value map), not parsed.
    pub quantity: Option<String>,
    pub collection_time: Option<String>,
    /// Further mapped specimen fields (OpenSpecimen field name → value).
    pub fields: BTreeMap<String, Option<String>>,
    pub status: RecordStatus,
}

/// One item group repeat of a CRF, values raw and keyed by item OID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormRecord {
    pub subject_key: String,
    pub event_oid: String,
    pub event_repeat_key: String,
    pub crf_oid: String,
    /// `FormData@FormOID` (3.x: the CRF version OID).
    pub form_oid: String,
    pub form_version: Option<String>,
    pub item_group_oid: String,
    pub item_group_repeat_key: String,
    /// OpenClinica's form status word, raw (`invalid` marks a removed CRF).
    pub form_status: Option<String>,
    pub status: RecordStatus,
    /// Item OID → value (`None` for null).
    pub values: BTreeMap<String, Option<String>>,
    /// Item OID → `ItemDef@Name`, for OpenSpecimen's field names.
    pub item_names: BTreeMap<String, String>,
}

/// Where a record failed, for the error report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Getting the document from OpenClinica or a file.
    Fetch,
    /// Reading the ODM.
    Parse,
    /// Turning the subject into records.
    Map,
    /// Writing to the sink.
    Write,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fetch => "fetch",
            Self::Parse => "parse",
            Self::Map => "map",
            Self::Write => "write",
        }
    }
}

/// One row of a run's error report: a record that could not be synced and
/// a message a data manager can act on. Columns of the CSV, in order:
/// `subject_key, ppid, event_oid, repeat, form_oid, item_group_oid,
/// item_oid, stage, message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordError {
    pub subject_key: Option<String>,
    pub ppid: Option<String>,
    pub event_oid: Option<String>,
    /// The event repeat key (or item group repeat key where that is what
    /// failed).
    pub repeat: Option<String>,
    pub form_oid: Option<String>,
    pub item_group_oid: Option<String>,
    pub item_oid: Option<String>,
    pub stage: Stage,
    pub message: String,
}

impl RecordError {
    /// An error about a whole subject.
    pub fn subject(
        subject_key: &str,
        ppid: Option<&str>,
        stage: Stage,
        message: impl Into<String>,
    ) -> Self {
        Self {
            subject_key: Some(subject_key.to_owned()),
            ppid: ppid.map(str::to_owned),
            event_oid: None,
            repeat: None,
            form_oid: None,
            item_group_oid: None,
            item_oid: None,
            stage,
            message: message.into(),
        }
    }
}
