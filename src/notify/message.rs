//! What a notification says: the webhook's JSON body and the email's
//! subject and text, both from one [`RunEnded`].
//!
//! A notification carries only what describes the run: the CP, the run's
//! id, status, mode, trigger, who started it, its times, counts per entity,
//! the number of error rows and a link to the run's page. It is built field
//! by field from [`RunInfo`], never by copying the whole row, so that a
//! field added to the Import Logs later does not slip into messages. It
//! never carries an error message (those may name subjects), a subject
//! list or any value from the study.
//!
//! The webhook body (`event` is always `run.ended`; times are RFC 3339 UTC;
//! a time the run never reached is `null`):
//!
//! ```json
//! {"event": "run.ended", "cp": "DEMO-CP", "run_id": "01J…", "status": "Failed",
//!  "mode": "incremental", "trigger": "schedule", "requested_by": "scheduler",
//!  "enqueued_at": "…", "started_at": "…", "finished_at": "…",
//!  "subjects_done": 480, "subjects_total": 500,
//!  "counts": {"participants": {"created": 3, "updated": 1, "unchanged": 476, "failed": 20},
//!             "visits": {…}, "specimens": {…}, "form_records": {…}},
//!  "error_count": 20, "url": "https://ocsync.example.org/ui/runs/01J…"}
//! ```

use std::fmt::Write as _;

use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};
use sqlx::types::chrono::{DateTime, Utc};

use crate::queue::RunInfo;
use crate::queue::runs::{EntityCounts, RunCounts};

/// The `event` of every notification.
pub const EVENT: &str = "run.ended";

/// Created / updated / unchanged / failed of one entity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub failed: i64,
}

impl From<&EntityCounts> for Counts {
    fn from(c: &EntityCounts) -> Self {
        Self {
            created: c.created,
            updated: c.updated,
            unchanged: c.unchanged,
            failed: c.failed,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityTotals {
    pub participants: Counts,
    pub visits: Counts,
    pub specimens: Counts,
    pub form_records: Counts,
}

impl From<&RunCounts> for EntityTotals {
    fn from(c: &RunCounts) -> Self {
        Self {
            participants: (&c.participants).into(),
            visits: (&c.visits).into(),
            specimens: (&c.specimens).into(),
            form_records: (&c.form_records).into(),
        }
    }
}

/// One run's end, as every channel tells it. Stored with the notification
/// at its first attempt, so that every retry sends the same content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEnded {
    pub event: String,
    pub cp: String,
    pub run_id: String,
    /// Success, Failed or Aborted.
    pub status: String,
    pub mode: String,
    pub trigger: String,
    pub requested_by: Option<String>,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub subjects_done: Option<i64>,
    pub subjects_total: Option<i64>,
    pub counts: EntityTotals,
    pub error_count: i64,
    /// The run's page: `{PUBLIC_URL}/ui/runs/{run_id}`.
    pub url: String,
}

impl RunEnded {
    /// The message for `run`, linking to `url`.
    pub fn new(run: &RunInfo, url: String) -> Self {
        Self {
            event: EVENT.to_owned(),
            cp: run.cp.clone(),
            run_id: run.id.clone(),
            status: run.status.as_str().to_owned(),
            mode: run.mode.clone(),
            trigger: run.trigger.clone(),
            requested_by: run.requested_by.clone(),
            enqueued_at: run.enqueued_at,
            started_at: run.started_at,
            finished_at: run.finished_at,
            subjects_done: run.subjects_done,
            subjects_total: run.subjects_total,
            counts: (&run.counts).into(),
            error_count: run.error_count,
            url,
        }
    }

    /// The webhook's body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a RunEnded always serialises")
    }

    /// `[ocsync] CP1 run 01J… Failed`.
    pub fn subject(&self) -> String {
        format!("[ocsync] {} run {} {}", self.cp, self.run_id, self.status)
    }

    /// The email's plain text.
    pub fn text(&self) -> String {
        let time = |t: Option<DateTime<Utc>>| {
            t.map_or_else(
                || "-".to_owned(),
                |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
            )
        };
        let n = |v: Option<i64>| v.map_or_else(|| "?".to_owned(), |v| v.to_string());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Run {} of CP {} ended {}.\n",
            self.run_id, self.cp, self.status
        );
        for (label, value) in [
            ("CP", self.cp.clone()),
            ("Run", self.run_id.clone()),
            ("Status", self.status.clone()),
            ("Mode", self.mode.clone()),
            ("Trigger", self.trigger.clone()),
            (
                "Requested by",
                self.requested_by.clone().unwrap_or_else(|| "-".to_owned()),
            ),
            ("Queued", time(self.enqueued_at)),
            ("Started", time(self.started_at)),
            ("Finished", time(self.finished_at)),
            (
                "Subjects",
                format!("{} of {}", n(self.subjects_done), n(self.subjects_total)),
            ),
            ("Error rows", self.error_count.to_string()),
        ] {
            let _ = writeln!(out, "{:<14}{value}", format!("{label}:"));
        }
        let _ = writeln!(
            out,
            "\n{:<14}{:>9} {:>9} {:>9} {:>9}",
            "", "created", "updated", "unchanged", "failed"
        );
        let c = &self.counts;
        for (label, e) in [
            ("participants", &c.participants),
            ("visits", &c.visits),
            ("specimens", &c.specimens),
            ("form records", &c.form_records),
        ] {
            let _ = writeln!(
                out,
                "{label:<14}{:>9} {:>9} {:>9} {:>9}",
                e.created, e.updated, e.unchanged, e.failed
            );
        }
        if self.error_count > 0 {
            let _ = writeln!(
                out,
                "\nThe error report ({} rows) is on the run's page.",
                self.error_count
            );
        }
        let _ = writeln!(out, "\nRun page: {}", self.url);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::RunStatus;

    fn run() -> RunInfo {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        RunInfo {
            id: "01J00000000000000000000000".into(),
            cp: "CP1".into(),
            status: RunStatus::Failed,
            retrying: false,
            mode: "subjects".into(),
            trigger: "user".into(),
            requested_by: Some("alice".into()),
            enqueued_at: Some(t("2026-01-02T03:04:05Z")),
            started_at: Some(t("2026-01-02T03:04:06Z")),
            finished_at: Some(t("2026-01-02T03:05:00Z")),
            attempts: 1,
            max_attempts: 5,
            subjects_done: Some(3),
            subjects_total: Some(3),
            counts: RunCounts {
                participants: EntityCounts {
                    created: 2,
                    updated: 0,
                    unchanged: 0,
                    failed: 1,
                },
                ..RunCounts::default()
            },
            error_count: 1,
            last_error: Some("subject SS_SECRET not found".into()),
        }
    }

    #[test]
    fn the_json_has_every_field_and_nothing_else() {
        let m = RunEnded::new(
            &run(),
            "https://o.example.org/ui/runs/01J00000000000000000000000".into(),
        );
        let json: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "event": "run.ended",
                "cp": "CP1",
                "run_id": "01J00000000000000000000000",
                "status": "Failed",
                "mode": "subjects",
                "trigger": "user",
                "requested_by": "alice",
                "enqueued_at": "2026-01-02T03:04:05Z",
                "started_at": "2026-01-02T03:04:06Z",
                "finished_at": "2026-01-02T03:05:00Z",
                "subjects_done": 3,
                "subjects_total": 3,
                "counts": {
                    "participants": {"created": 2, "updated": 0, "unchanged": 0, "failed": 1},
                    "visits": {"created": 0, "updated": 0, "unchanged": 0, "failed": 0},
                    "specimens": {"created": 0, "updated": 0, "unchanged": 0, "failed": 0},
                    "form_records": {"created": 0, "updated": 0, "unchanged": 0, "failed": 0},
                },
                "error_count": 1,
                "url": "https://o.example.org/ui/runs/01J00000000000000000000000",
            })
        );
        // The stored snapshot reads back as it was.
        let back: RunEnded = serde_json::from_value(json).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn the_email_says_the_same_and_never_the_error_message() {
        let m = RunEnded::new(
            &run(),
            "https://o.example.org/ui/runs/01J00000000000000000000000".into(),
        );
        assert_eq!(
            m.subject(),
            "[ocsync] CP1 run 01J00000000000000000000000 Failed"
        );
        let text = m.text();
        for want in [
            "Run 01J00000000000000000000000 of CP CP1 ended Failed.",
            "Mode:         subjects",
            "Trigger:      user",
            "Requested by: alice",
            "Started:      2026-01-02T03:04:06Z",
            "Finished:     2026-01-02T03:05:00Z",
            "Subjects:     3 of 3",
            "Error rows:   1",
            "participants          2         0         0         1",
            "Run page: https://o.example.org/ui/runs/01J00000000000000000000000",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        assert!(!text.contains("SS_SECRET"));
        assert!(
            !String::from_utf8(m.to_json())
                .unwrap()
                .contains("SS_SECRET")
        );
        // Short ASCII lines: the mail goes out as 7bit text, readable as is.
        assert!(text.lines().all(|l| l.len() < 78 && l.is_ascii()), "{text}");
    }
}
