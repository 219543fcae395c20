//! Mapping: pure functions from an ODM subject to OpenSpecimen-shaped
//! records, driven by a CP's configuration.
//!
//! No IO: it knows nothing of HTTP, Postgres or the queue.

mod records;

pub use records::{
    FormRecord, ParticipantRecord, RecordError, RecordStatus, SpecimenRecord, Stage,
    SubjectRecords, VisitRecord,
};
