//! The OpenSpecimen sink: mapped records written to OpenSpecimen's REST API
//! (`{os}/rest/ng`), with exact created / updated / unchanged / failed
//! counts and OpenSpecimen's own messages in the error report. A CP
//! chooses it with `[target] kind = "openspecimen"`; `crate::sync::for_cp`
//! builds it from there.
//!
//! | file | responsibility |
//! | --- | --- |
//! | `config.rs` | [`OpenSpecimenConfig`]: server, account, network, forms (a CP's `[target]`) |
//! | `client.rs` | [`OsClient`]: session token, re-login on 401, retries |
//! | `error.rs` | [`OsError`] and which errors are transient |
//! | `writer.rs` | [`OpenSpecimenSink`]: create-or-update by lookup, bookkeeping in `ocsync.os_ids` |
//! | `sim.rs` | [`sim::OsSim`]: an OpenSpecimen simulator for tests, the demo and benchmarks |
//!
//! The invariant that makes a second sync cheap: every record written is
//! remembered in `ocsync.os_ids` with its OpenSpecimen id and the hash of the
//! JSON sent, in the caller's transaction. An unchanged record costs no
//! request at all; a changed one costs one `PUT`.
//!
//! Known limits: OpenSpecimen offers no natural-key lookup for form
//! records, so a form record is created whenever it is unknown in
//! `ocsync.os_ids`. If a batch fails after OpenSpecimen accepted some of its
//! form records (the bookkeeping rolls back with the batch), the retry
//! creates them again. Registrations, visits and specimens (with a label)
//! are looked up first and are not duplicated.
//!
//! A birth date known only to the year (OpenClinica's `YearOfBirth`, or a
//! partial date) is sent to OpenSpecimen as no birth date: OpenSpecimen
//! keeps full dates only, and a refused birth date would fail the
//! registration on every run. The Postgres sink keeps the raw value. See
//! `writer.rs`, "Dates".
//!
//! What it does NOT know: ODM, OpenClinica, the job queue, runs or
//! checkpoints (the caller commits those in the same transaction).

mod client;
mod config;
mod error;
pub mod sim;
mod writer;

pub use client::{OsClient, TOKEN_HEADER};
pub use config::{CredentialRef, FormLevel, FormTarget, OpenSpecimenConfig, RetryPolicy};
pub use error::OsError;
pub use writer::{ACTIVE, DISABLED, OpenSpecimenSink};
