//! The job's payload: which CP, which mode, who asked and how. Ids only,
//! never rows or secrets: the worker loads the CP's configuration when the
//! run starts, so a run always uses the configuration of its start.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::sync::Mode;

/// The apalis queue (`apalis.jobs.job_type`) sync runs live in. The SQL
/// functions of `migrations/*_queue.sql` use the same literal.
pub const QUEUE: &str = "ocsync.sync";

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The Study Data Importer's cron tick.
    Schedule,
    /// A person, through the API or the CLI.
    User,
    /// Any SQL client calling `ocsync.enqueue_sync`.
    Sql,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Schedule => "schedule",
            Self::User => "user",
            Self::Sql => "sql",
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Trigger {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "schedule" => Ok(Self::Schedule),
            "user" => Ok(Self::User),
            "sql" => Ok(Self::Sql),
            other => Err(format!(
                "unknown trigger {other:?}: expected schedule, user or sql"
            )),
        }
    }
}

/// The payload as `ocsync.enqueue_sync` writes it (JSON): flat, so that SQL
/// builds it with `jsonb_build_object` and no Rust enum layout leaks into
/// the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncJob {
    pub cp: String,
    /// `incremental`, `all` or `subjects`.
    pub mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subjects: Option<Vec<String>>,
    pub trigger: String,
    #[serde(default)]
    pub requested_by: Option<String>,
}

impl SyncJob {
    /// The engine's mode; an unknown name is a permanent error of the job.
    pub fn mode(&self) -> Result<Mode, String> {
        match self.mode.as_str() {
            "incremental" => Ok(Mode::Incremental),
            "all" => Ok(Mode::All),
            "subjects" => Ok(Mode::Subjects {
                subjects: self.subjects.clone().unwrap_or_default(),
            }),
            other => Err(format!("unknown mode {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_the_sql_shape() {
        let sql = r#"{"cp":"CP1","mode":"subjects","subjects":["SS_1","SS_2"],"trigger":"sql","requested_by":"postgres"}"#;
        let job: SyncJob = serde_json::from_str(sql).unwrap();
        assert_eq!(
            job.mode().unwrap(),
            Mode::Subjects {
                subjects: vec!["SS_1".into(), "SS_2".into()]
            }
        );
        let inc: SyncJob =
            serde_json::from_str(r#"{"cp":"CP1","mode":"incremental","trigger":"schedule"}"#)
                .unwrap();
        assert_eq!(inc.mode().unwrap(), Mode::Incremental);
        assert_eq!(inc.requested_by, None);
        assert!("bogus".parse::<Trigger>().is_err());
        assert_eq!("user".parse::<Trigger>().unwrap(), Trigger::User);
    }
}
