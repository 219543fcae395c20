//! Element counts of an ODM document, without building any record.
//!
//! This is the cheapest full read: every byte is still checked for
//! well-formedness (a broken file never yields counts), but no string is
//! allocated per element.

use std::io::BufRead;

use serde::Serialize;
use tokio::io::AsyncBufRead;

use super::error::OdmError;
use super::reader::OdmReader;

/// Counts of ODM-namespace clinical-data elements in their places (see
/// [`super::reader`] for what is recognised where).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// `SubjectData`.
    pub subjects: u64,
    /// `StudyEventData`.
    pub study_events: u64,
    /// `FormData`.
    pub forms: u64,
    /// `ItemGroupData`.
    pub item_groups: u64,
    /// `ItemData`.
    pub items: u64,
    /// `ItemData` with `IsNull="Yes"`.
    pub null_items: u64,
    /// `OpenClinica:AuditLog` entries inside clinical data (not part of the
    /// `odm stats` output, which counts data only).
    pub audit_logs: u64,
}

impl Stats {
    /// The `ocsync odm stats` line: the six data counts with sorted keys,
    /// formatted as Python's `json.dumps(sort_keys=True)` does.
    pub fn to_json_line(&self) -> String {
        format!(
            "{{\"forms\": {}, \"item_groups\": {}, \"items\": {}, \"null_items\": {}, \"study_events\": {}, \"subjects\": {}}}\n",
            self.forms,
            self.item_groups,
            self.items,
            self.null_items,
            self.study_events,
            self.subjects
        )
    }
}

/// Reads the whole document from a blocking reader and counts.
pub fn count<R: BufRead>(input: R) -> Result<Stats, OdmError> {
    let mut reader = OdmReader::counting(input);
    while reader.next_record()?.is_some() {}
    Ok(reader.stats())
}

/// Reads the whole document from an async byte stream and counts.
pub async fn count_async<R: AsyncBufRead + Unpin>(input: R) -> Result<Stats, OdmError> {
    let mut reader = OdmReader::counting(input);
    while reader.next_record_async().await?.is_some() {}
    Ok(reader.stats())
}
