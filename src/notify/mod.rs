//! Notifications: when a run ends Failed or Aborted (and, when its CP asks,
//! Success), the CP's email recipients and webhook hear about it.
//!
//! How a run's end becomes messages, whoever ended it (a worker, an abort
//! of a queued run in SQL, spent retries, the poison-pill sweep):
//!
//! 1. **Outbox, filled by the database.** An `AFTER UPDATE` trigger on
//!    `apalis.jobs` (`migrations/20261129000700_notifications.sql`) sees
//!    the row's status word (`ocsync.run_status`) become terminal and, in
//!    the same transaction, inserts one row per recipient into
//!    `ocsync.notifications` from the CP's `[notify]` section
//!    ([`CpNotify`]), then NOTIFYs [`CHANNEL`]. A unique key (run,
//!    channel, target) makes the rows exactly once per run. The trigger's
//!    `WHEN` clause only lets through status changes into Done, Failed or
//!    Killed, so claims, heartbeats and progress writes never call it; a
//!    problem inside it is a Postgres warning, never a failed run.
//! 2. **Dispatchers deliver.** Every `ocsync worker` and `ocsync serve`
//!    runs a [`Dispatcher`] ([`dispatch`]): woken by the NOTIFY, and by its
//!    own timer for retries, it claims due rows (`FOR UPDATE SKIP LOCKED`,
//!    leasing them for longer than a delivery may take, so two dispatchers
//!    never send one row at once), builds the message ([`message`]) from
//!    the run's Import Logs row at the first attempt and keeps it with the
//!    row (retries send the same bytes), and sends it: [`email`] over SMTP,
//!    [`webhook`] as a signed JSON POST.
//! 3. **Recorded on the run.** Sent, or the error and a retry after an
//!    exponential backoff with jitter; after `NOTIFY_MAX_ATTEMPTS`, or at
//!    once for a permanent refusal, the row is failed. The rows show on
//!    `GET /api/v1/runs/{id}` and `ocsync runs show ID` ([`outbox`]).
//!
//! Delivery is at least once: a dispatcher that dies between sending and
//! recording leaves the row to be sent again when its lease ends. Webhook
//! receivers can drop repeats by the `X-Ocsync-Id` header.
//!
//! What it does not do: change a run (it never writes `apalis.jobs`), send
//! an error message, a subject or any study value ([`message`] says what a
//! message holds), or read a secret before it sends (the CP holds only a
//! reference to its webhook secret).

pub mod dispatch;
pub mod email;
pub mod message;
pub mod outbox;
pub mod settings;
pub mod webhook;

use std::fmt;

pub use dispatch::Dispatcher;
pub use message::RunEnded;
pub use outbox::{Delivery, DeliveryStatus};
pub use settings::CpNotify;

/// The LISTEN/NOTIFY channel on which the database announces new
/// notifications (the payload is the run's id).
pub const CHANNEL: &str = "ocsync_notify";

/// How a notification travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Email,
    Webhook,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Webhook => "webhook",
        }
    }

    /// The channel named `text` in the outbox.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "email" => Some(Self::Email),
            "webhook" => Some(Self::Webhook),
            _ => None,
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one delivery attempt failed, and whether trying again may help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// For the record on the run: names the server or the status, never a
    /// secret or the message's content.
    pub reason: String,
    /// Trying again cannot help (a refusal, not an outage).
    pub permanent: bool,
}

impl Failure {
    pub fn retry(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            permanent: false,
        }
    }

    pub fn permanent(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            permanent: true,
        }
    }
}
