//! The sync run: the one place that joins source, reader, mapping and sink.
//!
//! A run reads a CP's study from its source as a stream of subjects, maps
//! each subject to OpenSpecimen-shaped records and writes them in batches.
//! The unit of work is one subject; a batch is `batch_size` subjects. For
//! each batch, in one transaction: the sink's writes, the subjects'
//! fingerprints, the batch's error rows and the run's checkpoint (through
//! [`RunContext`]). A subject that cannot be fetched, parsed, mapped or
//! written becomes error rows and the run goes on; a run with error rows
//! ends Failed, otherwise Success.
//!
//! Reading and writing overlap: a producer task fetches, parses and maps
//! the next batch while the current one is written (a channel of one
//! batch), so a run's time is about the slower of the two, not their sum.
//!
//! # Modes
//! - [`Mode::All`]: every subject, each written through the sink (which
//!   reports unchanged records and writes nothing for them).
//! - [`Mode::Subjects`]: only the listed subjects (by `SubjectKey` or label).
//! - [`Mode::Incremental`]: only what changed since the last successful run.
//!
//! # What incremental sync can and cannot see
//! OpenClinica offers no "changed since" query, so incremental sync narrows
//! the work where the source allows and then compares fingerprints:
//! - OC 4.x: the participants list's `lastModified` selects the subjects
//!   changed since the last successful run's high-water mark, minus an
//!   overlap window (`INCREMENTAL_OVERLAP`, because OC writes times without a
//!   zone and clocks drift); only those are fetched. A subject whose
//!   `lastModified` cannot be read is always fetched.
//! - OC 3.x and extract files: the whole study is read (one document);
//!   subjects whose greatest audit-log ID is the one recorded at their last
//!   write (when the document carries audit logs) are skipped without
//!   mapping. So an incremental run of an OC 3.x CP costs at least a read
//!   of the whole study: `make bench` measures it at about half of a full
//!   sync's time, against about a hundredth for OC 4.x.
//! - Every fetched subject is mapped and its records' sha-256 compared with
//!   the one stored at its last write; an unchanged subject is never
//!   rewritten. Because the fingerprint covers the mapped records, a change
//!   in the CP's mapping also counts as a change.
//!
//! It cannot see: a subject deleted outright from OpenClinica or missing
//! from a newer extract (OC removes rather than deletes; a full run flags
//! vanished visits and forms per subject, not vanished subjects); in OC 4.x,
//! a change that does not move `lastModified` (such as a metadata-only
//! edit) until the next full run; in OC 3.x with audit logs in the document,
//! a change that writes no audit-log entry (OpenClinica audits every data
//! change; metadata edits are not data changes) is caught only by a run
//! whose document lacks audit logs, or by a full run.
//!
//! # Where records go
//! [`for_cp`] turns a CP's `[target]` into an [`crate::sink::AnySink`]
//! (the Postgres tables, or OpenSpecimen's REST API); [`run`] takes any
//! [`crate::sink::Sink`].
//!
//! # What it does not know
//! Nothing of apalis or the job queue: the runner implements
//! [`RunContext`] (checkpoint, progress, stop). Nothing of HTTP details,
//! XML or SQL beyond its own bookkeeping tables: it calls `openclinica`,
//! `odm`, `mapping` and `sink`.

mod engine;
mod feed;
mod mode;
mod report;
mod state;
mod target;

pub use engine::{Control, Cursor, Progress, RunContext, RunOutcome, RunResult, SyncError, run};
pub use mode::{Mode, ModeName, parse_subject_list};
pub use report::{CSV_HEADER, ReportError, write_error_report};
pub use state::INCREMENTAL_OVERLAP;
pub use target::for_cp;
