//! The job queue: enqueue, one active run per CP, abort, progress, the
//! Import Logs, and the worker that runs syncs. The only place apalis types
//! live.
//!
//! A sync run is one row of `apalis.jobs` (queue [`QUEUE`]); its payload
//! ([`SyncJob`]) carries ids only. The rules live in SQL
//! (`migrations/20261129000400_queue.sql`) so every producer shares them:
//! `ocsync.enqueue_sync` (the API, the CLI, the schedule and any SQL client
//! call it), the partial unique index `ocsync_one_active_run_per_cp` (one
//! run per CP in Queued, In Progress or retrying: a duplicate fails with
//! 23505 naming the run in the way), `ocsync.abort_run`,
//! `ocsync.run_status` and the view `ocsync.import_logs`.
//!
//! What a run keeps in its row's metadata (hstore): `cp`, `mode`,
//! `trigger`, `requested_by`, `enqueued_at` (at enqueue); `started_at`,
//! `worker` (first start, last holder); `progress` (the JSON of
//! `sync::Progress`: subjects done/total, counts per entity, error count,
//! cursor), written by [`JobContext`] in the same transaction as each
//! batch; `result` (`success` | `failed`); `error` (last failure, no
//! clinical values); `abort` (when an abort was asked).
//!
//! The state machine is drawn in ARCHITECTURE.md; [`runs`] has the status
//! table. What it does not know: how a run syncs (that is `sync`, which
//! knows nothing of this module), HTTP (`api` calls it), clocks and cron
//! (that is `schedule`).

pub mod abort;
pub mod api;
pub mod cli;
pub mod context;
pub mod enqueue;
pub mod job;
pub mod retention;
pub mod runs;
pub mod wake;
pub mod worker;

pub use abort::{ABORT_CHANNEL, AbortError, AbortOutcome, abort, abort_as};
pub use context::{JobContext, StopReason};
pub use enqueue::{EnqueueError, EnqueueRequest, enqueue};
pub use job::{QUEUE, SyncJob, Trigger};
pub use runs::{RunFilter, RunInfo, RunStatus};
pub use worker::{ensure_guards, run_worker};
