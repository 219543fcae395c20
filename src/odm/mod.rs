//! ODM reader: streams OpenClinica's CDISC ODM 1.3 exports into typed
//! records, exactly as OpenClinica wrote them.
//!
//! What it does:
//! - reads any [`std::io::BufRead`] (files, stdin) or
//!   [`tokio::io::AsyncBufRead`] (an HTTP body) as a stream, one subject at a
//!   time: memory is bounded by the largest subject (or study metadata), not
//!   by the file;
//! - yields the study metadata ([`Study`]: event, form, item group and item
//!   definitions, code lists, `OpenClinica:FormDetails@ParentFormOID`) and
//!   the clinical data ([`Subject`] with its events, forms, item groups and
//!   items), plus audit-log IDs and timestamps for incremental sync;
//! - enforces XML 1.0 and Namespaces in XML exactly: namespaces by URI
//!   (both OpenClinica extension URIs), the five predefined entities and
//!   character references only, attribute-value normalisation, end-of-line
//!   handling, UTF-8 or US-ASCII only, no DOCTYPE (refused, never expanded);
//! - rejects broken input (truncated, mismatched, invalid UTF-8, not ODM
//!   1.3) with an [`OdmError`] that names line, column and what was
//!   expected, never a clinical value;
//! - counts ([`count`]) without allocating per element, backs the
//!   `ocsync odm stats|dump` commands ([`cli`]) and generates large
//!   OpenClinica-style documents for tests, benchmarks and the simulator
//!   ([`generate`]).
//!
//! What it does not know: no IO of its own (no files, no HTTP, no
//! Postgres), nothing of OpenSpecimen, no mapping. Values stay raw strings:
//! no trimming, no date parsing, no status interpretation; `IsNull="Yes"`
//! and a missing `Value` are `None`, `Value=""` is `Some("")`.

pub mod cli;
mod error;
pub mod generate;
mod model;
mod namespaces;
mod reader;
mod stats;
mod xml;

pub use error::{OdmError, Position};
pub use model::{
    AuditSummary, CodeList, CodeListItem, Form, FormDef, Item, ItemDef, ItemGroup, ItemGroupDef,
    MetaDataVersion, Record, Study, StudyEvent, StudyEventDef, Subject, audit_id_number,
};
pub use namespaces::{OC_EXT_V121, OC_EXT_V130, ODM_13};
pub use reader::{MAX_DEPTH, MAX_TOKEN, OdmReader};
pub use stats::{Stats, count, count_async};
