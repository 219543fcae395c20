//! Mapping: pure functions from an ODM subject to OpenSpecimen-shaped
//! records, driven by a CP's configuration.
//!
//! What it does: [`MetadataIndex::new`] indexes a study's design once per
//! run; [`map_subject`] turns one [`crate::odm::Subject`] into a
//! registration with its participant, visits, specimens and form records
//! ([`SubjectRecords`]) plus error rows ([`RecordError`]) for whatever could
//! not be mapped; [`content_hash`] fingerprints the result for incremental
//! sync.
//!
//! Rules (the CP configuration in [`crate::cp`] names the choices):
//! - PPID: `StudySubjectID` by default (or `SubjectKey`,
//!   `UniqueIdentifier`); missing → one error row, the subject is skipped.
//! - Site: the subject's `ClinicalData@StudyOID` through the site map, else
//!   `default_site`, else an error row (once per subject) and no site.
//! - Gender: `m`/`male` → `Male`, `f`/`female` → `Female` (any case);
//!   `"null"`, empty or absent → none; anything else → an error row, the
//!   participant is kept without a gender.
//! - Birth date: `DateOfBirth`, else `YearOfBirth`; `"Not Used"` → none.
//! - Status: [`REMOVED_STATUSES`] on the subject, event or form flag it and
//!   everything under it [`RecordStatus::Removed`]: written, never dropped,
//!   so that removed data never looks live downstream.
//! - Visits: one per study event occurrence; event label through the event
//!   map, else `StudyEventDef@Name`, else the OID; name by the CP's visit
//!   name template.
//! - Form records: one per item group repeat of a form whose CRF passes the
//!   include/exclude lists and, with `import = "completed"`, whose status is
//!   one of [`COMPLETED_STATUSES`] (removed forms always pass, flagged);
//!   values raw, keyed by item OID, `ItemDef@Name` alongside.
//! - Specimens: an item group repeat matching a specimen mapping becomes a
//!   specimen (value maps applied; quantity must be a non-negative number)
//!   and, unless `also_as_form_record`, no form record. Specimen mappings
//!   and participant fields name their items explicitly and are not subject
//!   to the CRF filters, which govern form records only.
//! - Absent repeat keys are `""`. Duplicate natural keys keep the first
//!   occurrence and add an error row.
//!
//! What it does not know: no IO at all (no HTTP, files, Postgres or queue),
//! no logging. Error messages name fields and OIDs, never clinical values.

mod hash;
mod index;
mod records;
mod subject;

pub use hash::{InputKey, content_hash, input_fingerprint};
pub use index::{EventInfo, FormInfo, GroupInfo, ItemInfo, MetadataIndex, strip_version_suffix};
pub use records::{
    FormRecord, ParticipantRecord, RecordError, RecordStatus, SpecimenRecord, Stage,
    SubjectRecords, VisitRecord,
};
pub use subject::{
    COMPLETED_STATUSES, Mapped, REMOVED_STATUSES, is_completed, is_removed, map_subject,
};

#[cfg(test)]
mod tests;
