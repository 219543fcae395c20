//! Collection protocol (CP) configuration: what links one OpenSpecimen CP
//! to one OpenClinica study, and how the study maps onto it.
//!
//! What it does: the typed configuration [`CpConfig`] and its TOML file
//! format ([`model`]); storage in Postgres (`ocsync.cps`, with a version
//! bumped on every edit for optimistic concurrency) ([`store`]); checking
//! every OID a configuration names against the study's metadata
//! ([`validate()`]); the `ocsync cp` commands ([`cli`]).
//!
//! What it does not know: how data is fetched, mapped or written (it only
//! describes it: the source and target sections are the `openclinica` and
//! OpenSpecimen sink's own configuration types), OpenSpecimen's API, the job queue beyond one SQL function,
//! `ocsync.cp_active_run(cp)`, which says whether a run is going (editing
//! is refused while one is).

pub mod cli;
pub mod model;
pub mod store;
mod validate;

pub use model::{
    CpConfig, CpId, CrfImport, CrfSelection, CronSchedule, ItemRef, LoadError, Placeholder,
    PpidSource, SpecimenMapping, TargetConfig, VisitNameTemplate,
};
pub use store::{StoreError, StoredCp};
pub use validate::{ConfigProblem, Severity, validate, validate_with_sites};
