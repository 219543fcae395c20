//! Typed records read from an ODM document.
//!
//! Values are kept exactly as OpenClinica wrote them (after XML 1.0
//! attribute-value normalisation): no trimming, no date parsing, no case
//! folding. An absent attribute is `None`; an attribute present but empty is
//! `Some("")`. Interpreting them (status words, partial dates, "null"
//! strings) is the mapping's job, which knows what each field is for.

use serde::Serialize;

/// One record of the stream, in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A `Study` element with its metadata, yielded at `</Study>`.
    Study(Box<Study>),
    /// A `SubjectData` element with everything under it, yielded at
    /// `</SubjectData>`.
    Subject(Box<Subject>),
}

/// `Study`: the study design.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Study {
    /// `Study@OID` (the parent study or a site).
    pub oid: String,
    /// `GlobalVariables/StudyName` text.
    pub name: Option<String>,
    /// `GlobalVariables/ProtocolName` text.
    pub protocol_name: Option<String>,
    pub metadata_versions: Vec<MetaDataVersion>,
}

/// `MetaDataVersion`: the definitions the clinical data refers to by OID.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct MetaDataVersion {
    pub oid: String,
    pub name: Option<String>,
    pub study_event_defs: Vec<StudyEventDef>,
    pub form_defs: Vec<FormDef>,
    pub item_group_defs: Vec<ItemGroupDef>,
    pub item_defs: Vec<ItemDef>,
    pub code_lists: Vec<CodeList>,
}

/// `StudyEventDef`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct StudyEventDef {
    pub oid: String,
    pub name: Option<String>,
    /// `Repeating="Yes"`.
    pub repeating: bool,
    /// `Type` (Scheduled, Unscheduled, Common).
    pub event_type: Option<String>,
    /// `FormRef@FormOID`, in order.
    pub form_oids: Vec<String>,
}

/// `FormDef`. In OpenClinica 3.x a FormDef is a CRF *version*; the CRF it
/// belongs to is `OpenClinica:FormDetails@ParentFormOID`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct FormDef {
    pub oid: String,
    pub name: Option<String>,
    pub repeating: bool,
    /// `OpenClinica:FormDetails@ParentFormOID`.
    pub parent_form_oid: Option<String>,
    /// `ItemGroupRef@ItemGroupOID`, in order.
    pub item_group_oids: Vec<String>,
}

/// `ItemGroupDef`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ItemGroupDef {
    pub oid: String,
    pub name: Option<String>,
    pub repeating: bool,
    /// `ItemRef@ItemOID`, in order.
    pub item_oids: Vec<String>,
}

/// `ItemDef`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ItemDef {
    pub oid: String,
    pub name: Option<String>,
    /// `DataType` (text, integer, float, date, partialDate, …).
    pub data_type: Option<String>,
    pub length: Option<String>,
    /// `CodeListRef@CodeListOID`.
    pub code_list_oid: Option<String>,
}

/// `CodeList`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct CodeList {
    pub oid: String,
    pub name: Option<String>,
    pub data_type: Option<String>,
    pub items: Vec<CodeListItem>,
}

/// `CodeListItem` (or `EnumeratedItem`, which has no decode).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct CodeListItem {
    pub coded_value: String,
    /// The first `Decode/TranslatedText`.
    pub decode: Option<String>,
}

/// `SubjectData` with its events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Subject {
    /// `StudyOID` of the enclosing `ClinicalData`: the study, or the site
    /// when OpenClinica writes one block per site.
    pub study_oid: String,
    /// `MetaDataVersionOID` of the enclosing `ClinicalData`.
    pub metadata_version_oid: Option<String>,
    /// `SubjectKey`: the `SS_` OID, stable across label edits.
    pub subject_key: String,
    /// `OpenClinica:StudySubjectID`: the label (OpenSpecimen PPID).
    pub study_subject_id: Option<String>,
    pub unique_identifier: Option<String>,
    pub secondary_id: Option<String>,
    pub status: Option<String>,
    /// `m`, `f`, or the literal string `null`.
    pub sex: Option<String>,
    pub date_of_birth: Option<String>,
    pub year_of_birth: Option<String>,
    pub enrollment_date: Option<String>,
    pub events: Vec<StudyEvent>,
    /// What the subject's audit logs say about when it last changed.
    pub audit: AuditSummary,
}

/// `StudyEventData`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct StudyEvent {
    pub oid: String,
    /// `StudyEventRepeatKey`, absent for non-repeating events.
    pub repeat_key: Option<String>,
    pub start_date: Option<String>,
    pub end_date: Option<String>,
    pub status: Option<String>,
    pub forms: Vec<Form>,
}

/// `FormData`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Form {
    /// 3.x: the CRF version OID; 4.x: the form OID.
    pub oid: String,
    pub version: Option<String>,
    /// `invalid` marks a removed CRF.
    pub status: Option<String>,
    pub interview_date: Option<String>,
    pub interviewer_name: Option<String>,
    /// 4.x `OpenClinica:CreatedDate` (no time zone).
    pub created_date: Option<String>,
    /// 4.x `OpenClinica:UpdatedDate` (no time zone).
    pub updated_date: Option<String>,
    pub item_groups: Vec<ItemGroup>,
}

/// `ItemGroupData`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ItemGroup {
    pub oid: String,
    pub repeat_key: Option<String>,
    pub transaction_type: Option<String>,
    pub items: Vec<Item>,
}

/// `ItemData`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Item {
    pub oid: String,
    /// `None` when `IsNull="Yes"` or when there is no `Value` attribute;
    /// `Some("")` for `Value=""`.
    pub value: Option<String>,
    /// `OpenClinica:ReasonForNull`.
    pub reason_for_null: Option<String>,
}

/// The audit trail of one subject reduced to what incremental sync needs:
/// `AuditLog@ID` is monotonic (`AL_<number>`), `@DateTimeStamp` has no time
/// zone and sorts as text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct AuditSummary {
    /// Number of `OpenClinica:AuditLog` entries anywhere under the subject.
    pub entries: u64,
    /// The `ID` with the largest number (`AL_555401`).
    pub max_id: Option<String>,
    /// That number.
    pub max_id_number: Option<u64>,
    /// The greatest `DateTimeStamp`.
    pub latest_timestamp: Option<String>,
}

impl AuditSummary {
    /// Folds one `AuditLog` entry in.
    pub(crate) fn record(&mut self, id: Option<String>, timestamp: Option<String>) {
        self.entries += 1;
        if let Some(id) = id
            && let Some(number) = audit_id_number(&id)
            && self.max_id_number.is_none_or(|max| number > max)
        {
            self.max_id_number = Some(number);
            self.max_id = Some(id);
        }
        if let Some(ts) = timestamp
            && self
                .latest_timestamp
                .as_deref()
                .is_none_or(|t| ts.as_str() > t)
        {
            self.latest_timestamp = Some(ts);
        }
    }
}

/// The number in an audit-log ID: the trailing digits of `AL_38028`.
pub fn audit_id_number(id: &str) -> Option<u64> {
    let digits = id.len() - id.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    id[id.len() - digits..].parse().ok()
}

impl Subject {
    /// Every item of the subject with its place, in document order.
    pub fn items(&self) -> impl Iterator<Item = (&StudyEvent, &Form, &ItemGroup, &Item)> {
        self.events.iter().flat_map(|event| {
            event.forms.iter().flat_map(move |form| {
                form.item_groups.iter().flat_map(move |group| {
                    group
                        .items
                        .iter()
                        .map(move |item| (event, form, group, item))
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_ids_compare_by_number_and_timestamps_as_text() {
        assert_eq!(audit_id_number("AL_38028"), Some(38028));
        assert_eq!(audit_id_number("AL_"), None);
        assert_eq!(audit_id_number(""), None);
        let mut audit = AuditSummary::default();
        audit.record(Some("AL_9".into()), Some("2020-01-02T00:00:00".into()));
        audit.record(Some("AL_10".into()), Some("2020-01-01T00:00:00".into()));
        audit.record(Some("bogus".into()), None);
        assert_eq!(audit.entries, 3);
        assert_eq!(audit.max_id.as_deref(), Some("AL_10"));
        assert_eq!(audit.max_id_number, Some(10));
        assert_eq!(
            audit.latest_timestamp.as_deref(),
            Some("2020-01-02T00:00:00")
        );
    }
}
