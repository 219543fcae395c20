//! Sinks: where mapped records are written. One interface, two writers:
//! the Postgres tables in `ocsync_data` (the default) and OpenSpecimen's
//! REST API.
//!
//! A sink writes one batch of subjects at a time inside the transaction the
//! sync run also uses for its checkpoint, so a batch's records and the
//! run's progress commit together (the OpenSpecimen writer keeps its
//! bookkeeping of OpenSpecimen ids in that transaction). A sink knows
//! nothing of ODM, OpenClinica, CP configurations or the queue.
//!
//! [`AnySink`] is one value that is either writer, for code that serves
//! CPs with different targets (the [`Sink`] trait returns `impl Future`, so
//! it cannot be a trait object). Choosing it from a CP's `[target]` is
//! `crate::sync::for_cp`'s job: `cp` already reads the OpenSpecimen
//! configuration type from here, so a function here taking a CP would make
//! the two modules depend on each other.

use std::future::Future;

use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use crate::mapping::{RecordError, SubjectRecords};

pub mod openspecimen;
mod plan;
pub mod postgres;
mod record_errors;

pub use openspecimen::OpenSpecimenSink;
pub use postgres::PostgresSink;

/// Created / updated / unchanged / failed counts for one entity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityCounts {
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub failed: u64,
}

impl EntityCounts {
    pub fn add(&mut self, other: &Self) {
        self.created += other.created;
        self.updated += other.updated;
        self.unchanged += other.unchanged;
        self.failed += other.failed;
    }

    pub fn total(&self) -> u64 {
        self.created + self.updated + self.unchanged + self.failed
    }
}

/// Counts for every entity a run writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub participants: EntityCounts,
    pub visits: EntityCounts,
    pub specimens: EntityCounts,
    pub form_records: EntityCounts,
}

impl Counts {
    pub fn add(&mut self, other: &Self) {
        self.participants.add(&other.participants);
        self.visits.add(&other.visits);
        self.specimens.add(&other.specimens);
        self.form_records.add(&other.form_records);
    }
}

/// What writing one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub counts: Counts,
    /// Records that could not be written; the rest of the batch was.
    pub errors: Vec<RecordError>,
}

/// Writes batches of mapped subjects for one CP.
pub trait Sink: Send + Sync {
    /// Writes `batch` for CP `cp` inside `tx`, which the caller commits
    /// together with the run's checkpoint. Per-record failures come back as
    /// [`BatchOutcome::errors`]; an `Err` means the batch as a whole could
    /// not be written (the caller rolls back and may retry it).
    fn write_batch(
        &self,
        tx: &mut PgConnection,
        cp: &str,
        batch: &[SubjectRecords],
    ) -> impl Future<Output = Result<BatchOutcome, SinkError>> + Send;
}

/// Either writer, chosen per CP at run time.
// One value per run, held by reference and never in a collection: the
// size difference between the variants costs nothing worth a `Box`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AnySink {
    Postgres(PostgresSink),
    OpenSpecimen(OpenSpecimenSink),
}

impl AnySink {
    /// `postgres` or `openspecimen`: for logs and span fields.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::OpenSpecimen(_) => "openspecimen",
        }
    }
}

impl From<PostgresSink> for AnySink {
    fn from(s: PostgresSink) -> Self {
        Self::Postgres(s)
    }
}

impl From<OpenSpecimenSink> for AnySink {
    fn from(s: OpenSpecimenSink) -> Self {
        Self::OpenSpecimen(s)
    }
}

impl Sink for AnySink {
    async fn write_batch(
        &self,
        tx: &mut PgConnection,
        cp: &str,
        batch: &[SubjectRecords],
    ) -> Result<BatchOutcome, SinkError> {
        match self {
            Self::Postgres(s) => s.write_batch(tx, cp, batch).await,
            Self::OpenSpecimen(s) => s.write_batch(tx, cp, batch).await,
        }
    }
}

/// A batch that could not be written at all.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("database error while writing the batch: {0}")]
    Database(#[from] sqlx::Error),
    /// The remote system (OpenSpecimen) failed in a way that may pass:
    /// unreachable, overloaded or erroring after the retries.
    #[error("{0}")]
    Remote(String),
    /// The remote system refused the batch for a reason that needs a
    /// person: login rejected, token refused, bad configuration.
    #[error("{0}")]
    Refused(String),
}

impl SinkError {
    /// Whether trying the same batch again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Database(e) => is_transient_sqlx(e),
            Self::Remote(_) => true,
            Self::Refused(_) => false,
        }
    }
}

/// Whether a database error may pass by itself: the connection or the pool
/// failed, or Postgres reported a connection exception (08…), a
/// serialization failure or deadlock (40…), or an administrator shutdown.
pub fn is_transient_sqlx(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_)
    ) || e
        .as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c.starts_with("08") || c.starts_with("40") || c == "57P01")
}
