//! The run's input: subjects, one at a time, from whichever documents the
//! mode and the source call for.
//!
//! Two shapes:
//! - one document for the whole study (OC 3.x `all`/`incremental`, extract
//!   files, OC 4.x `all` unless its CP says otherwise), read as a stream,
//!   optionally keeping only listed subjects; for OC 4.x, followed by the
//!   listed participants the document lacked, one request each;
//! - one document per subject (OC 4.x `incremental`, OC 4.x `all` when the
//!   whole study cannot be had, and `subjects` runs against a REST source),
//!   fetched ahead with the source's concurrency limit.
//!
//! A subject that cannot be fetched or parsed on its own becomes an error
//! row and the feed goes on; a failure that stops the whole document (or
//! the whole server) ends the feed with an error the run reports.

use std::collections::{HashMap, HashSet};

use futures::StreamExt;

use crate::mapping::{RecordError, Stage};
use crate::odm::{OdmError, OdmReader, Record, Study, Subject};
use crate::openclinica::{Bodies, Body, OcError, Scope, Source, Subjects, is_transient_io};

use super::engine::{Cursor, SyncError};
use super::mode::Mode;
use super::state::{INCREMENTAL_OVERLAP, Watermark};

/// One step of the feed.
pub(crate) enum Item {
    Subject {
        subject: Box<Subject>,
        /// OC 4.x participant `lastModified`, raw.
        last_modified: Option<String>,
    },
    /// A subject that could not be fetched or read; the feed goes on.
    Failed(Box<RecordError>),
}

pub(crate) struct Feed {
    shape: Shape,
    /// Subjects expected in all (known when the source lists them).
    pub total: Option<u64>,
    /// `subjects` mode over one document: the keys or labels wanted, and
    /// which of them were seen.
    wanted: Option<Wanted>,
    /// The greatest `lastModified` among the listed subjects (4.x).
    pub listed_last_modified: Option<String>,
    /// OC 4.x full runs: whether the study is read as one document
    /// (recorded in the run's cursor, see [`Cursor::whole_study`]).
    pub whole_study: Option<bool>,
    /// A whole-study document read against the participants list: listed
    /// participants the document lacks are fetched one by one after it.
    listed: Option<Listed>,
}

struct Listed {
    source: Source,
    /// The listed participants, in the list's order.
    keys: Vec<String>,
    seen: HashSet<String>,
    last_modified: HashMap<String, String>,
    /// Of those the document lacks, how many an earlier attempt committed.
    skip: u64,
}

enum Shape {
    Document {
        reader: Box<OdmReader<Body>>,
    },
    Each {
        source: Source,
        bodies: Bodies,
        /// The keys asked for, in order: the stream answers in this order,
        /// so the front names the subject of the next answer.
        keys: std::collections::VecDeque<String>,
        /// `lastModified` of each listed subject (4.x).
        last_modified: HashMap<String, String>,
    },
    Done,
}

struct Wanted {
    ids: Vec<String>,
    seen: HashSet<String>,
}

impl Feed {
    /// Opens the feed for `mode`, resuming after `cursor` (the subjects an
    /// earlier attempt of the run committed).
    pub async fn open(
        source: &Source,
        kind: SourceKind,
        mode: &Mode,
        watermark: &Watermark,
        cursor: &Cursor,
    ) -> Result<Self, SyncError> {
        let skip = cursor.subjects_done;
        let mut feed = match (mode, kind) {
            (Mode::Subjects { subjects }, SourceKind::Oc3 | SourceKind::Oc4 { .. }) => {
                let keys: Vec<String> = subjects.iter().skip(skip as usize).cloned().collect();
                Self::each(source, keys, HashMap::new(), Some(subjects.len() as u64))
            }
            (Mode::Subjects { subjects }, SourceKind::Files) => {
                let mut f = Self::document(source).await?;
                f.total = Some(subjects.len() as u64);
                f.wanted = Some(Wanted {
                    ids: subjects.clone(),
                    seen: HashSet::new(),
                });
                f
            }
            (Mode::All | Mode::Incremental, SourceKind::Oc3 | SourceKind::Files) => {
                Self::document(source).await?
            }
            (Mode::All | Mode::Incremental, SourceKind::Oc4 { whole_study }) => {
                match source.subjects().await.map_err(SyncError::Source)? {
                    Subjects::Listed(list) => {
                        let since = match mode {
                            Mode::Incremental => watermark.last_modified.as_deref(),
                            _ => None,
                        };
                        let listed_last_modified =
                            list.iter().filter_map(|l| l.last_modified.clone()).max();
                        let total_listed = list.len() as u64;
                        let mut modified = HashMap::new();
                        let keys: Vec<String> = list
                            .into_iter()
                            .filter(|l| changed_since(l.last_modified.as_deref(), since))
                            .map(|l| {
                                if let Some(m) = l.last_modified {
                                    modified.insert(l.subject_key.clone(), m);
                                }
                                l.subject_key
                            })
                            .collect();
                        let total = keys.len() as u64;
                        tracing::info!(
                            subjects.listed = total_listed,
                            subjects.selected = total,
                            "subject list read"
                        );
                        let whole = match cursor.whole_study {
                            Some(w) => w,
                            None => whole_study && matches!(mode, Mode::All),
                        };
                        // Once an attempt has committed subjects read from
                        // the document, its order is the one to resume in.
                        let resumed = cursor.whole_study == Some(true) && skip > 0;
                        let document = if whole {
                            Self::whole_study(source, resumed).await?
                        } else {
                            None
                        };
                        let mut f = match document {
                            Some(body) => Self {
                                shape: Shape::Document {
                                    reader: Box::new(OdmReader::new(body)),
                                },
                                total: Some(total),
                                wanted: None,
                                listed_last_modified: None,
                                whole_study: Some(true),
                                listed: Some(Listed {
                                    source: source.clone(),
                                    keys,
                                    seen: HashSet::new(),
                                    last_modified: modified,
                                    skip: 0,
                                }),
                            },
                            None => {
                                let keys = keys.into_iter().skip(skip as usize).collect();
                                let mut f = Self::each(source, keys, modified, Some(total));
                                if matches!(mode, Mode::All) {
                                    f.whole_study = Some(false);
                                }
                                f
                            }
                        };
                        f.listed_last_modified = listed_last_modified;
                        f
                    }
                    Subjects::InDocument(body) => Self {
                        shape: Shape::Document {
                            reader: Box::new(OdmReader::new(body)),
                        },
                        total: None,
                        wanted: None,
                        listed_last_modified: None,
                        whole_study: None,
                        listed: None,
                    },
                }
            }
        };
        if matches!(feed.shape, Shape::Document { .. }) {
            for done in 0..skip {
                if feed.next_in_document().await?.is_none() {
                    // The earlier attempt had gone past the document into
                    // the listed subjects it lacked.
                    if let Some(l) = &mut feed.listed {
                        l.skip = skip - done;
                    }
                    feed.after_document();
                    break;
                }
            }
        }
        Ok(feed)
    }

    /// The whole study in one document (OC 4.x full runs). `None` when
    /// OpenClinica refuses or fails it before it starts, so the caller
    /// reads a document per participant instead; with `resumed` (an earlier
    /// attempt read the document, and resuming must read it again) the
    /// failure is the run's.
    async fn whole_study(source: &Source, resumed: bool) -> Result<Option<Body>, SyncError> {
        match first_body(source.clinical_data(Scope::Study)).await {
            Ok(body) => Ok(Some(body)),
            Err(SyncError::Source(e)) if !resumed && !is_auth_failure(&e) => {
                tracing::warn!(
                    error = %e,
                    "the whole-study document failed; reading a document per participant"
                );
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn each(
        source: &Source,
        keys: Vec<String>,
        last_modified: HashMap<String, String>,
        total: Option<u64>,
    ) -> Self {
        Self {
            shape: Shape::Each {
                source: source.clone(),
                bodies: source.clinical_data(Scope::Subjects(keys.clone())),
                keys: keys.into(),
                last_modified,
            },
            total,
            wanted: None,
            listed_last_modified: None,
            whole_study: None,
            listed: None,
        }
    }

    async fn document(source: &Source) -> Result<Self, SyncError> {
        let body = first_body(source.clinical_data(Scope::Study)).await?;
        Ok(Self {
            shape: Shape::Document {
                reader: Box::new(OdmReader::new(body)),
            },
            total: None,
            wanted: None,
            listed_last_modified: None,
            whole_study: None,
            listed: None,
        })
    }

    /// The next subject (or per-subject failure); `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Item>, SyncError> {
        match &mut self.shape {
            Shape::Done => Ok(None),
            Shape::Document { .. } => loop {
                let Some(subject) = self.next_in_document().await? else {
                    if self.listed.is_some() {
                        self.after_document();
                        return Box::pin(self.next()).await;
                    }
                    return Ok(self.missing_wanted());
                };
                if let Some(w) = &mut self.wanted {
                    let hit = w.ids.iter().find(|id| {
                        **id == subject.subject_key
                            || subject.study_subject_id.as_deref() == Some(id.as_str())
                    });
                    match hit {
                        Some(id) => {
                            w.seen.insert(id.clone());
                        }
                        None => continue,
                    }
                }
                let last_modified = self
                    .listed
                    .as_ref()
                    .and_then(|l| l.last_modified.get(&subject.subject_key).cloned());
                return Ok(Some(Item::Subject {
                    subject,
                    last_modified,
                }));
            },
            Shape::Each {
                source,
                bodies,
                keys,
                last_modified,
            } => {
                let Some(fetched) = bodies.next().await else {
                    self.shape = Shape::Done;
                    return Ok(None);
                };
                let key = keys.pop_front().unwrap_or_default();
                let source = source.clone();
                let item = match fetched {
                    Ok(body) => match read_one_subject(&source, body).await? {
                        Ok(subject) => {
                            let lm = last_modified.get(&subject.subject_key).cloned();
                            Item::Subject {
                                subject,
                                last_modified: lm,
                            }
                        }
                        Err(message) => Item::Failed(Box::new(RecordError::subject(
                            &key,
                            None,
                            Stage::Parse,
                            message,
                        ))),
                    },
                    Err(e) if is_run_level(&e) => return Err(SyncError::Source(e)),
                    Err(e) => Item::Failed(Box::new(RecordError::subject(
                        &key,
                        None,
                        Stage::Fetch,
                        e.to_string(),
                    ))),
                };
                Ok(Some(item))
            }
        }
    }

    async fn next_in_document(&mut self) -> Result<Option<Box<Subject>>, SyncError> {
        let Shape::Document { reader, .. } = &mut self.shape else {
            return Ok(None);
        };
        loop {
            match reader.next_record_async().await {
                Ok(Some(Record::Subject(s))) => {
                    if let Some(l) = &mut self.listed {
                        l.seen.insert(s.subject_key.clone());
                    }
                    return Ok(Some(s));
                }
                Ok(Some(Record::Study(_))) => continue,
                Ok(None) => {
                    self.shape = Shape::Done;
                    return Ok(None);
                }
                Err(e) => {
                    self.shape = Shape::Done;
                    return Err(document_error(e));
                }
            }
        }
    }

    /// After a whole-study document: the listed participants it lacked
    /// (added since the list was read, or left out of it), one request
    /// each, as a run without the document would have read them.
    fn after_document(&mut self) {
        let Some(l) = self.listed.take() else {
            self.shape = Shape::Done;
            return;
        };
        let missing: Vec<String> = l
            .keys
            .into_iter()
            .filter(|k| !l.seen.contains(k))
            .skip(l.skip as usize)
            .collect();
        if missing.is_empty() {
            self.shape = Shape::Done;
            return;
        }
        tracing::info!(
            subjects = missing.len(),
            "listed participants not in the whole-study document; reading them one by one"
        );
        self.shape = Shape::Each {
            source: l.source.clone(),
            bodies: l.source.clinical_data(Scope::Subjects(missing.clone())),
            keys: missing.into(),
            last_modified: l.last_modified,
        };
    }

    /// After the document ends: one error row per listed subject that was
    /// not in it.
    fn missing_wanted(&mut self) -> Option<Item> {
        let w = self.wanted.as_mut()?;
        let missing = w.ids.iter().find(|id| !w.seen.contains(*id))?.clone();
        w.seen.insert(missing.clone());
        Some(Item::Failed(Box::new(RecordError::subject(
            &missing,
            None,
            Stage::Fetch,
            "subject not found in the study's data (neither a SubjectKey nor a label there)",
        ))))
    }
}

/// Which family a source belongs to, as far as the feed cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceKind {
    /// OpenClinica 3.x: per-subject requests, but no subject list short of
    /// the whole study.
    Oc3,
    /// OpenClinica 4.x: per-subject requests and a participants list with
    /// `lastModified`; `whole_study`: full runs read one document.
    Oc4 { whole_study: bool },
    /// Extract files: one document holds everything.
    Files,
}

impl SourceKind {
    pub fn of(config: &crate::openclinica::SourceConfig) -> Self {
        use crate::openclinica::SourceConfig as C;
        match config {
            C::Oc3(_) => Self::Oc3,
            C::Oc4(c) => Self::Oc4 {
                whole_study: c.whole_study,
            },
            C::File(_) => Self::Files,
        }
    }
}

/// Reads the study metadata (the first `Study` of the metadata document).
pub(crate) async fn read_metadata(source: &Source) -> Result<Study, SyncError> {
    let body = source.metadata().await.map_err(SyncError::Source)?;
    let mut reader = OdmReader::new(body);
    loop {
        match reader.next_record_async().await {
            Ok(Some(Record::Study(study))) => return Ok(*study),
            Ok(Some(Record::Subject(_))) => continue,
            Ok(None) => {
                return Err(SyncError::Config(format!(
                    "{}: the metadata document holds no Study",
                    source.describe()
                )));
            }
            Err(e) => return Err(document_error(e)),
        }
    }
}

async fn first_body(mut bodies: Bodies) -> Result<Body, SyncError> {
    match bodies.next().await {
        Some(Ok(body)) => Ok(body),
        Some(Err(e)) => Err(SyncError::Source(e)),
        None => Err(SyncError::Config("the source returned no document".into())),
    }
}

/// Reads a one-subject document: `Ok(Ok(subject))`, or `Ok(Err(message))`
/// for a document that holds no subject or is broken (an error row), or
/// `Err` when the body broke off in transit and a fresh fetch also failed
/// (the run retries later).
async fn read_one_subject(
    source: &Source,
    body: Body,
) -> Result<Result<Box<Subject>, String>, SyncError> {
    let key = body.subject().map(str::to_owned);
    match subject_of(body).await {
        Ok(found) => Ok(found),
        Err(e) if is_transient_odm(&e) => {
            // The body broke off in transit: fetch this subject once more
            // before giving the run back to the queue's retry.
            let Some(key) = key else {
                return Err(document_error(e));
            };
            tracing::warn!(error = %e, "subject document broke off; fetching it again");
            let body = first_body(source.clinical_data(Scope::Subject(key))).await?;
            subject_of(body).await.map_err(document_error)
        }
        Err(e) => Ok(Err(format!("the subject's ODM document is not valid: {e}"))),
    }
}

async fn subject_of(body: Body) -> Result<Result<Box<Subject>, String>, OdmError> {
    let key = body.subject().unwrap_or_default().to_owned();
    let mut reader = OdmReader::new(body);
    let mut found = None;
    while let Some(record) = reader.next_record_async().await? {
        if let Record::Subject(s) = record
            && found.is_none()
        {
            found = Some(s);
        }
    }
    Ok(found.ok_or_else(|| {
        format!("OpenClinica returned no data for subject {key:?} (unknown subject, or not in this study)")
    }))
}

fn is_transient_odm(e: &OdmError) -> bool {
    match e {
        OdmError::Io { source, .. } => is_transient_io(source),
        _ => false,
    }
}

fn document_error(e: OdmError) -> SyncError {
    if is_transient_odm(&e) {
        SyncError::Interrupted(e.to_string())
    } else {
        SyncError::Parse(e)
    }
}

/// OpenClinica refused the account: reading another way would not help.
fn is_auth_failure(e: &OcError) -> bool {
    match e {
        OcError::Status { status, .. } => {
            *status == reqwest::StatusCode::UNAUTHORIZED
                || *status == reqwest::StatusCode::FORBIDDEN
        }
        OcError::Config(_)
        | OcError::Credential { .. }
        | OcError::AuthRejected { .. }
        | OcError::SessionLost { .. } => true,
        _ => false,
    }
}

/// A fetch failure that concerns the server, not the subject: the run stops
/// (and the queue retries it when transient) instead of writing one error
/// row per subject.
fn is_run_level(e: &OcError) -> bool {
    e.is_transient()
        || is_auth_failure(e)
        || matches!(e, OcError::NoMatchingFile { .. } | OcError::File { .. })
}

/// Whether a subject modified at `modified` may have changed since `since`
/// minus the overlap window. Unreadable times count as changed.
fn changed_since(modified: Option<&str>, since: Option<&str>) -> bool {
    let Some(since) = since.and_then(parse_oc_time) else {
        return true;
    };
    let Some(modified) = modified.and_then(parse_oc_time) else {
        return true;
    };
    let overlap = chrono::Duration::from_std(INCREMENTAL_OVERLAP).expect("small duration");
    modified >= since - overlap
}

/// OpenClinica's timestamps: ISO 8601 with `T` or a space, optional
/// fraction, optional zone (dropped: OC's are local and unzoned).
pub(crate) fn parse_oc_time(s: &str) -> Option<chrono::NaiveDateTime> {
    let s = s.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.naive_utc());
    }
    for f in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Some(t);
        }
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oc_times_parse_in_their_usual_shapes() {
        for s in [
            "2024-03-01 10:20:30",
            "2024-03-01T10:20:30",
            "2024-03-01 10:20:30.5",
            "2024-03-01T10:20:30.123Z",
        ] {
            assert!(parse_oc_time(s).is_some(), "{s}");
        }
        assert!(parse_oc_time("2024-03-01").is_some());
        assert!(parse_oc_time("yesterday").is_none());
    }

    #[test]
    fn selection_keeps_the_overlap_and_unreadable_times() {
        let since = Some("2024-03-01 12:00:00");
        assert!(changed_since(Some("2024-03-01 12:00:01"), since));
        assert!(
            changed_since(Some("2024-03-01 11:30:00"), since),
            "inside the overlap"
        );
        assert!(!changed_since(Some("2024-03-01 10:59:59"), since));
        assert!(changed_since(Some("garbage"), since));
        assert!(changed_since(None, since));
        assert!(
            changed_since(Some("2020-01-01 00:00:00"), None),
            "no mark yet"
        );
    }
}
