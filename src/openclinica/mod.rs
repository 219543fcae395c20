//! Getting ODM documents out of OpenClinica: the OC 3.x and 4.x REST APIs
//! and OC's extract files, behind one interface, [`Source`].
//!
//! What it does: authenticates (3.x session cookie with transparent
//! re-login, 4.x bearer token cached and paced), sends requests with
//! timeouts, gzip, `Accept-Language: en`, a per-server concurrency limit and
//! retries with backoff, and hands each document over as a [`Body`], an
//! `AsyncBufRead` that streams the response (or the file) without ever
//! holding it whole. A whole study can be close to 1 GB.
//!
//! What it does not know: XML (it yields bytes; the `odm` module parses
//! them), Postgres, the job queue, mapping, OpenSpecimen. It never decides
//! whether to give up a sync: it retries what fails before a body is handed
//! over, and reports the rest as an [`OcError`] whose
//! [`is_transient`](OcError::is_transient) tells the sync job whether a
//! retry later may help. A body that breaks off mid-stream is such a
//! transient error, surfacing from the read as an `io::Error`
//! ([`is_transient_io`]).
//!
//! Secrets: passwords, tokens and session cookies live in `secrecy` types
//! and sensitive headers; no message, log line or `Debug` output carries
//! them.
//!
//! | file | responsibility |
//! | --- | --- |
//! | `config.rs` | [`SourceConfig`] and credential references |
//! | `source.rs` | [`Source`], [`Scope`], [`SourceRegistry`] |
//! | `oc3.rs`, `oc4.rs` | the two REST APIs and their authentication |
//! | `files.rs` | extract files and folders |
//! | `http.rs`, `retry.rs` | client, concurrency limit, retries |
//! | `body.rs` | [`Body`] and the streaming of response bodies |
//! | `error.rs` | [`OcError`] |
//! | `sim/` | [`sim`]: an OC 3.x/4.x simulator for tests, the demo and benchmarks |

mod body;
mod config;
mod error;
mod files;
mod http;
mod oc3;
mod oc4;
// Shared with the OpenSpecimen client, which retries the same way.
pub(crate) mod retry;
pub mod sim;
mod source;

pub use body::Body;
pub use config::{
    CredentialRef, FileConfig, NetworkConfig, Oc3Config, Oc4Config, QueryFlags, RetryPolicy,
    SourceConfig,
};
pub use error::{Attempt, OcError, Origin, is_transient_io};
pub use source::{Bodies, Scope, Source, SourceRegistry, SubjectListing, Subjects};
