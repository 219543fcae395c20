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
//! - OC 3.x and extract files: the whole study is read (one document).
//!   So an incremental run of an OC 3.x CP costs at least the server's
//!   answer for the whole study: `make bench` measures that read alone at
//!   about a tenth of a full sync's time, and the incremental run at about
//!   a third of it, against a thirtieth for OC 4.x.
//! - Every subject read is fingerprinted as read
//!   ([`crate::mapping::input_fingerprint`]: its ODM, keyed by the CP's
//!   configuration, the study's metadata and the ocsync version). One that
//!   matches the fingerprint stored at its last write maps to the same
//!   records and is skipped without mapping.
//! - Any other is mapped and its records' sha-256 compared with the one
//!   stored at its last write; an unchanged subject is never rewritten
//!   (its new input fingerprint is kept, so the next run skips it). A
//!   change in the CP's configuration changes every input fingerprint, so
//!   a new mapping is always applied.
//!
//! It cannot see: a subject deleted outright from OpenClinica or missing
//! from a newer extract (OC removes rather than deletes; a full run flags
//! vanished visits and forms per subject, not vanished subjects); in OC 4.x,
//! a change that does not move `lastModified` (such as a metadata-only
//! edit) until the next full run.
//!
//! # How a full run reads OC 4.x
//! One whole-study document, as for OC 3.x (`whole_study = true`, the
//! default): one request instead of one per participant. When OpenClinica
//! refuses or fails that document before its first subject (large studies
//! can be too large for it to build), the run reads a document per
//! participant instead; participants the list holds and the document lacks
//! are read one by one after it. A resumed attempt reads the way its first
//! attempt did ([`Cursor::whole_study`]).
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
