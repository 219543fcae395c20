//! [`OpenSpecimenSink`]: the [`Sink`] that writes mapped records to
//! OpenSpecimen through [`OsClient`], keeping the OpenSpecimen id and a hash
//! of what was last sent for every record in `ocsync.os_ids` (written in the
//! caller's transaction, so it commits with the run's checkpoint).
//!
//! # Create or update by lookup
//!
//! For each record, in the order participant → visits → specimens → form
//! records (children need their parent's OpenSpecimen id):
//!
//! | known here? | hash of the body | what happens | counted |
//! | --- | --- | --- | --- |
//! | yes | same | nothing, not even a request | unchanged |
//! | yes | different | `PUT` by the stored id (a 404 there: treated as unknown) | updated |
//! | no | — | lookup in OpenSpecimen; found and equal | unchanged |
//! | no | — | lookup; found and different → `PUT` | updated |
//! | no | — | lookup; absent → `POST` | created |
//!
//! Lookups: registration by `GET /collection-protocol-registrations?cpShortTitle=&ppid=`,
//! visit by `GET /visits/byname?visitName=`, specimen by
//! `GET /specimens?label=` (a specimen without a label, and a form record,
//! have no key in OpenSpecimen and are created when unknown here). The
//! lookup protects against duplicates when a batch's bookkeeping was rolled
//! back after OpenSpecimen had accepted some of its records; form records
//! lack that protection (see the module docs of [`super`]).
//!
//! The hash covers the exact JSON body (parents' ids included, so a
//! re-created parent updates its children) and the record's status.
//!
//! # Removed records
//!
//! A record removed in OpenClinica ([`RecordStatus::Removed`]) is sent with
//! `activityStatus: "Disabled"`, OpenSpecimen's soft-delete status, by `PUT`
//! (registrations, visits, specimens), and a form record is deleted with
//! `DELETE /forms/{formId}/data/{recordId}` (OpenSpecimen keeps form
//! records soft-deleted). "Closed" is not used: it means a specimen that was
//! consumed or disposed of, which is not what removal in OpenClinica says.
//! A removed record OpenSpecimen never had is not created (counted
//! unchanged; remembered with no id).
//!
//! # Dates
//!
//! OpenSpecimen takes dates as `yyyy-MM-dd` and times as
//! `yyyy-MM-dd HH:mm:ss`; OpenClinica's timestamps are cut to that (a time
//! without seconds gets `:00`). A participant's birth date goes only when
//! it is a full date: a year alone (`YearOfBirth`, or a partial date such
//! as `1987` or `1992-06`) is sent as *no* birth date, never padded to a
//! made-up day and never sent for OpenSpecimen to refuse (which would fail
//! the registration, and every record under it, on every run). The raw
//! value stays in the mapped record, so the Postgres sink keeps it. Other
//! dates (registration, visit, collection time) are always full in
//! OpenClinica; one that is not is sent as written and OpenSpecimen's
//! refusal lands in the error report.
//!
//! # Failures
//!
//! OpenSpecimen refusing a record (400 with its message, 404, 409, …)
//! becomes one [`RecordError`] (stage `write`, message = OpenSpecimen's)
//! and a `failed` count; the batch goes on. Every record below a failed
//! parent fails too, with a message naming the parent. Anything else (the
//! server unreachable after the retries, the login rejected) fails the whole
//! batch: [`SinkError::Remote`] when a later retry may succeed,
//! [`SinkError::Refused`] when a person must act.
//!
//! Subjects of a batch are written concurrently (up to
//! `max_concurrency`); each subject's records in order.
//!
//! This module knows the record types of [`crate::mapping`] and
//! OpenSpecimen's JSON shapes; it knows nothing of ODM, OpenClinica or the
//! queue.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use futures::{StreamExt, TryStreamExt, stream};
use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use url::Url;

use super::client::OsClient;
use super::config::{FormLevel, FormTarget, OpenSpecimenConfig};
use super::error::OsError;
use crate::mapping::{
    FormRecord, ParticipantRecord, RecordError, RecordStatus, SpecimenRecord, SubjectRecords,
    VisitRecord,
};
use crate::sink::plan::{SubjectPlan, plan};
use crate::sink::record_errors::{
    form_record_error, participant_error, specimen_error, visit_error,
};
use crate::sink::{BatchOutcome, Counts, EntityCounts, Sink, SinkError};

/// OpenSpecimen's status of a live record.
pub const ACTIVE: &str = "Active";
/// OpenSpecimen's soft-delete status, used for records removed in
/// OpenClinica.
pub const DISABLED: &str = "Disabled";

/// Writes batches to one OpenSpecimen server.
#[derive(Debug)]
pub struct OpenSpecimenSink {
    client: OsClient,
    forms: BTreeMap<String, FormTarget>,
    max_concurrency: usize,
}

impl OpenSpecimenSink {
    /// Resolves the password reference and builds the client. Errors name
    /// the variable or file, never the secret.
    pub fn from_config(config: &OpenSpecimenConfig) -> Result<Self, OsError> {
        let password = config
            .password
            .resolve()
            .map_err(|e| OsError::Config(e.to_string()))?;
        Self::with_password(config, password)
    }

    /// Builds the client with an already resolved password.
    pub fn with_password(
        config: &OpenSpecimenConfig,
        password: SecretString,
    ) -> Result<Self, OsError> {
        Ok(Self {
            client: OsClient::new(config, password)?,
            forms: config.forms.clone(),
            max_concurrency: config.max_concurrency.max(1),
        })
    }

    pub fn client(&self) -> &OsClient {
        &self.client
    }
}

impl Sink for OpenSpecimenSink {
    async fn write_batch(
        &self,
        tx: &mut PgConnection,
        cp: &str,
        batch: &[SubjectRecords],
    ) -> Result<BatchOutcome, SinkError> {
        let plan = plan(batch);
        let mut outcome = BatchOutcome {
            counts: plan.failed,
            errors: plan.errors,
        };
        if plan.subjects.is_empty() {
            return Ok(outcome);
        }
        let known = load_known(tx, cp, &plan.subjects).await?;
        // Boxed with an explicit `Send`: without it the compiler cannot
        // prove the stream's futures Send for every lifetime (a known
        // limitation with closures returning futures).
        let writes: Vec<SubjectWrite<'_>> = plan
            .subjects
            .iter()
            .map(|s| Box::pin(self.write_subject(cp, s, &known)) as SubjectWrite<'_>)
            .collect();
        let results: Vec<SubjectOutcome> = stream::iter(writes)
            .buffered(self.max_concurrency)
            .try_collect()
            .await
            .map_err(|e| {
                if e.is_transient() {
                    SinkError::Remote(e.to_string())
                } else {
                    SinkError::Refused(e.to_string())
                }
            })?;
        let mut rows = Vec::new();
        for r in results {
            outcome.counts.add(&r.counts);
            outcome.errors.extend(r.errors);
            rows.extend(r.rows);
        }
        save_rows(tx, cp, &rows).await?;
        Ok(outcome)
    }
}

// ---------------------------------------------------------------------------
// Bookkeeping in `ocsync.os_ids`.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Entity {
    Participant,
    Visit,
    Specimen,
    FormRecord,
}

impl Entity {
    fn as_str(self) -> &'static str {
        match self {
            Self::Participant => "participant",
            Self::Visit => "visit",
            Self::Specimen => "specimen",
            Self::FormRecord => "form_record",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "participant" => Self::Participant,
            "visit" => Self::Visit,
            "specimen" => Self::Specimen,
            "form_record" => Self::FormRecord,
            _ => return None,
        })
    }
}

struct Known {
    os_id: Option<i64>,
    hash: String,
}

type KnownIds = HashMap<(Entity, String), Known>;

/// One row to upsert into `ocsync.os_ids`.
struct IdRow {
    entity: Entity,
    key: String,
    subject_key: String,
    os_id: Option<i64>,
    hash: String,
}

async fn load_known(
    tx: &mut PgConnection,
    cp: &str,
    subjects: &[SubjectPlan<'_>],
) -> Result<KnownIds, sqlx::Error> {
    let keys: Vec<&str> = subjects
        .iter()
        .map(|s| s.participant.subject_key.as_str())
        .collect();
    let rows: Vec<(String, String, Option<i64>, String)> = sqlx::query_as(
        "SELECT entity, natural_key, os_id, content_hash FROM ocsync.os_ids \
         WHERE cp_id = $1 AND subject_key = ANY($2)",
    )
    .bind(cp)
    .bind(&keys)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(entity, key, os_id, hash)| {
            Some(((Entity::parse(&entity)?, key), Known { os_id, hash }))
        })
        .collect())
}

async fn save_rows(tx: &mut PgConnection, cp: &str, rows: &[IdRow]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        // A batch with nothing new writes nothing, not even bookkeeping.
        return Ok(());
    }
    let entity: Vec<&str> = rows.iter().map(|r| r.entity.as_str()).collect();
    let key: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    let subject: Vec<&str> = rows.iter().map(|r| r.subject_key.as_str()).collect();
    let os_id: Vec<Option<i64>> = rows.iter().map(|r| r.os_id).collect();
    let hash: Vec<&str> = rows.iter().map(|r| r.hash.as_str()).collect();
    sqlx::query(
        "INSERT INTO ocsync.os_ids (cp_id, entity, natural_key, subject_key, os_id, content_hash) \
         SELECT $1, e, k, s, i, h FROM UNNEST($2::text[], $3::text[], $4::text[], $5::int8[], $6::text[]) AS t(e, k, s, i, h) \
         ON CONFLICT (cp_id, entity, natural_key) DO UPDATE SET \
           subject_key = EXCLUDED.subject_key, os_id = EXCLUDED.os_id, \
           content_hash = EXCLUDED.content_hash, updated_at = now()",
    )
    .bind(cp)
    .bind(&entity)
    .bind(&key)
    .bind(&subject)
    .bind(&os_id)
    .bind(&hash)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A natural key as text: a JSON array of its parts (unambiguous whatever
/// the parts contain).
fn key_text(parts: &[&str]) -> String {
    serde_json::to_string(parts).expect("strings serialise")
}

fn visit_key(v: &VisitRecord) -> String {
    key_text(&[&v.subject_key, &v.event_oid, &v.event_repeat_key])
}

fn specimen_key(s: &SpecimenRecord) -> String {
    key_text(&[
        &s.subject_key,
        &s.event_oid,
        &s.event_repeat_key,
        &s.crf_oid,
        &s.item_group_oid,
        &s.item_group_repeat_key,
    ])
}

fn form_key(f: &FormRecord) -> String {
    key_text(&[
        &f.subject_key,
        &f.event_oid,
        &f.event_repeat_key,
        &f.crf_oid,
        &f.item_group_oid,
        &f.item_group_repeat_key,
    ])
}

fn hash_of(body: &Value, removed: bool) -> String {
    let mut h = Sha256::new();
    h.update(if removed { b"removed\n" } else { b"active\n\0" });
    h.update(serde_json::to_vec(body).expect("JSON values serialise"));
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Writing one subject.

type SubjectWrite<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<SubjectOutcome, OsError>> + Send + 'a>>;

#[derive(Default)]
struct SubjectOutcome {
    counts: Counts,
    errors: Vec<RecordError>,
    rows: Vec<IdRow>,
}

/// What became of a parent, for its children.
#[derive(Clone)]
enum Parent {
    /// In OpenSpecimen with this id, or (`None`) removed before it ever
    /// reached OpenSpecimen.
    Written(Option<i64>),
    /// Not written; the reason for the children's messages.
    Failed(String),
}

/// One record to create, update or leave.
struct Target<'a> {
    entity: Entity,
    key: String,
    subject_key: &'a str,
    body: Value,
    removed: bool,
    lookup: Option<Url>,
    /// The form for form records (their URLs name it).
    form: Option<&'a FormTarget>,
}

enum Done {
    Created,
    Updated,
    Unchanged,
}

struct Written {
    done: Done,
    os_id: Option<i64>,
    row: Option<IdRow>,
}

impl OpenSpecimenSink {
    /// Writes one subject's records in order. `Err` only for failures that
    /// concern the whole batch; OpenSpecimen refusing a record is an error
    /// row in the outcome.
    async fn write_subject(
        &self,
        cp: &str,
        s: &SubjectPlan<'_>,
        known: &KnownIds,
    ) -> Result<SubjectOutcome, OsError> {
        let mut out = SubjectOutcome::default();
        let p = s.participant;

        // Participant (the registration).
        let target = Target {
            entity: Entity::Participant,
            key: key_text(&[&p.subject_key]),
            subject_key: &p.subject_key,
            body: participant_body(cp, p),
            removed: p.status == RecordStatus::Removed,
            lookup: Some(self.client.url(
                &["collection-protocol-registrations"],
                &[("cpShortTitle", cp), ("ppid", &p.ppid)],
            )),
            form: None,
        };
        let cpr = match self
            .apply(target, known, &mut out, |c| &mut c.participants)
            .await?
        {
            Ok(id) => Parent::Written(id),
            Err(why) => {
                out.errors.push(participant_error(p, &why));
                Parent::Failed(format!("its participant (PPID {}) was not written", p.ppid))
            }
        };

        // Visits, keyed by (event, repeat) for their specimens and forms.
        let mut visits: HashMap<(&str, &str), Parent> = HashMap::new();
        for v in &s.visits {
            let result = match child_of(&cpr, v.status, "participant") {
                Err(why) => {
                    out.counts.visits.failed += 1;
                    Err(why)
                }
                Ok(cpr_id) => {
                    let target = Target {
                        entity: Entity::Visit,
                        key: visit_key(v),
                        subject_key: &p.subject_key,
                        body: visit_body(v, cpr_id),
                        removed: v.status == RecordStatus::Removed,
                        lookup: Some(
                            self.client
                                .url(&["visits", "byname"], &[("visitName", &v.name)]),
                        ),
                        form: None,
                    };
                    self.apply(target, known, &mut out, |c| &mut c.visits)
                        .await?
                }
            };
            let parent = match result {
                Ok(id) => Parent::Written(id),
                Err(why) => {
                    out.errors.push(visit_error(p, v, &why));
                    // Name the root cause too, so a specimen's message
                    // leads the data manager to the participant when that
                    // is what failed.
                    let cause = why
                        .strip_prefix(NOT_WRITTEN)
                        .map(|c| format!(", because {c}"))
                        .unwrap_or_default();
                    Parent::Failed(format!(
                        "its visit (event {}, repeat '{}') was not written{cause}",
                        v.event_oid, v.event_repeat_key
                    ))
                }
            };
            visits.insert((&v.event_oid, &v.event_repeat_key), parent);
        }
        let visit_of = |event: &str, repeat: &str| -> Parent {
            visits.get(&(event, repeat)).cloned().unwrap_or_else(|| {
                Parent::Failed(format!(
                    "the subject has no visit for event {event}, repeat '{repeat}'"
                ))
            })
        };

        // Specimens, keyed by their natural key for specimen-level forms.
        let mut specimens: HashMap<String, Parent> = HashMap::new();
        for sp in &s.specimens {
            let key = specimen_key(sp);
            let visit = visit_of(&sp.event_oid, &sp.event_repeat_key);
            let result = match child_of(&visit, sp.status, "visit") {
                Err(why) => {
                    out.counts.specimens.failed += 1;
                    Err(why)
                }
                Ok(visit_id) => {
                    let target = Target {
                        entity: Entity::Specimen,
                        key: key.clone(),
                        subject_key: &p.subject_key,
                        body: specimen_body(sp, visit_id),
                        removed: sp.status == RecordStatus::Removed,
                        lookup: sp
                            .label
                            .as_deref()
                            .filter(|l| !l.is_empty())
                            .map(|l| self.client.url(&["specimens"], &[("label", l)])),
                        form: None,
                    };
                    self.apply(target, known, &mut out, |c| &mut c.specimens)
                        .await?
                }
            };
            let parent = match result {
                Ok(id) => Parent::Written(id),
                Err(why) => {
                    out.errors.push(specimen_error(p, sp, &why));
                    Parent::Failed("its specimen was not written".to_owned())
                }
            };
            specimens.insert(key, parent);
        }

        // Form records.
        for f in &s.form_records {
            let Some(form) = self.forms.get(&f.crf_oid) else {
                out.counts.form_records.failed += 1;
                out.errors.push(form_record_error(
                    p,
                    f,
                    &format!(
                        "no OpenSpecimen form is configured for CRF {} (target.forms in the CP configuration)",
                        f.crf_oid
                    ),
                ));
                continue;
            };
            let parent = match form.level {
                FormLevel::Participant => cpr.clone(),
                FormLevel::Visit => visit_of(&f.event_oid, &f.event_repeat_key),
                FormLevel::Specimen => specimens.get(&form_key(f)).cloned().unwrap_or_else(|| {
                    Parent::Failed(
                        "the form is attached to specimens, and no specimen has this record's key"
                            .to_owned(),
                    )
                }),
            };
            let result = match child_of(&parent, f.status, form.level.as_str()) {
                Err(why) => {
                    out.counts.form_records.failed += 1;
                    Err(why)
                }
                Ok(object_id) => {
                    let target = Target {
                        entity: Entity::FormRecord,
                        key: form_key(f),
                        subject_key: &p.subject_key,
                        body: form_body(f, form, object_id),
                        removed: f.status == RecordStatus::Removed,
                        lookup: None,
                        form: Some(form),
                    };
                    self.apply(target, known, &mut out, |c| &mut c.form_records)
                        .await?
                }
            };
            if let Err(why) = result {
                out.errors.push(form_record_error(p, f, &why));
            }
        }
        Ok(out)
    }

    /// Writes one record and counts it. `Ok(Err(why))`: this record failed
    /// (counted; the caller adds the error row); `Err`: the batch failed.
    async fn apply(
        &self,
        target: Target<'_>,
        known: &KnownIds,
        out: &mut SubjectOutcome,
        counts: fn(&mut Counts) -> &mut EntityCounts,
    ) -> Result<Result<Option<i64>, String>, OsError> {
        let k = known.get(&(target.entity, target.key.clone()));
        match self.upsert(&target, k).await {
            Ok(w) => {
                let c = counts(&mut out.counts);
                match w.done {
                    Done::Created => c.created += 1,
                    Done::Updated => c.updated += 1,
                    Done::Unchanged => c.unchanged += 1,
                }
                out.rows.extend(w.row);
                Ok(Ok(w.os_id))
            }
            Err(e) if e.is_record_rejection() => {
                counts(&mut out.counts).failed += 1;
                Ok(Err(e.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    async fn upsert(&self, t: &Target<'_>, known: Option<&Known>) -> Result<Written, OsError> {
        let hash = hash_of(&t.body, t.removed);
        let row = |os_id: Option<i64>| IdRow {
            entity: t.entity,
            key: t.key.clone(),
            subject_key: t.subject_key.to_owned(),
            os_id,
            hash: hash.clone(),
        };
        if let Some(k) = known {
            if k.hash == hash {
                return Ok(Written {
                    done: Done::Unchanged,
                    os_id: k.os_id,
                    row: None,
                });
            }
            if let Some(id) = k.os_id {
                match self.update(t, id).await {
                    Ok(()) => {
                        return Ok(Written {
                            done: Done::Updated,
                            os_id: Some(id),
                            row: Some(row(Some(id))),
                        });
                    }
                    // Deleted in OpenSpecimen behind ocsync's back: find it
                    // again or create it anew, as for an unknown record.
                    Err(OsError::Rejected { status, .. }) if status == StatusCode::NOT_FOUND => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if let Some(url) = &t.lookup
            && let Some(found) = self.client.get(url).await?.and_then(first_record)
        {
            let id = self.id_of(&found, url)?;
            if contains(&found, &t.body) {
                return Ok(Written {
                    done: Done::Unchanged,
                    os_id: Some(id),
                    row: Some(row(Some(id))),
                });
            }
            self.update(t, id).await?;
            return Ok(Written {
                done: Done::Updated,
                os_id: Some(id),
                row: Some(row(Some(id))),
            });
        }
        if t.removed {
            // Removed before it ever reached OpenSpecimen: nothing to
            // disable, and creating it only to disable it would be noise.
            return Ok(Written {
                done: Done::Unchanged,
                os_id: None,
                row: Some(row(None)),
            });
        }
        let url = self.create_url(t);
        let created = self.client.post(&url, &t.body).await?;
        let id = self.id_of(&created, &url)?;
        Ok(Written {
            done: Done::Created,
            os_id: Some(id),
            row: Some(row(Some(id))),
        })
    }

    fn create_url(&self, t: &Target<'_>) -> Url {
        match t.entity {
            Entity::Participant => self.client.url(&["collection-protocol-registrations"], &[]),
            Entity::Visit => self.client.url(&["visits"], &[]),
            Entity::Specimen => self.client.url(&["specimens"], &[]),
            Entity::FormRecord => {
                let form_id = t.form.map_or(0, |f| f.form_id).to_string();
                self.client.url(&["forms", &form_id, "data"], &[])
            }
        }
    }

    /// Updates record `id` to `t.body` (or, for a removed form record,
    /// deletes it).
    async fn update(&self, t: &Target<'_>, id: i64) -> Result<(), OsError> {
        let ids = id.to_string();
        let mut body = t.body.clone();
        if let Value::Object(m) = &mut body {
            m.insert("id".to_owned(), json!(id));
        }
        let url = match t.entity {
            Entity::Participant => self
                .client
                .url(&["collection-protocol-registrations", &ids], &[]),
            Entity::Visit => self.client.url(&["visits", &ids], &[]),
            Entity::Specimen => self.client.url(&["specimens", &ids], &[]),
            Entity::FormRecord => {
                let form_id = t.form.map_or(0, |f| f.form_id).to_string();
                if t.removed {
                    let url = self.client.url(&["forms", &form_id, "data", &ids], &[]);
                    return match self.client.delete(&url).await {
                        Ok(_) => Ok(()),
                        // Already gone: what removal wants.
                        Err(OsError::Rejected { status, .. })
                            if status == StatusCode::NOT_FOUND =>
                        {
                            Ok(())
                        }
                        Err(e) => Err(e),
                    };
                }
                self.client.url(&["forms", &form_id, "data"], &[])
            }
        };
        self.client.put(&url, &body).await.map(drop)
    }

    fn id_of(&self, record: &Value, url: &Url) -> Result<i64, OsError> {
        record
            .get("id")
            .and_then(|v| {
                v.as_i64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
            .ok_or_else(|| OsError::Unexpected {
                server: self.client.origin().clone(),
                method: "POST",
                path: url.path().to_owned(),
                detail: "the answer carries no record id".into(),
            })
    }
}

/// How the message of a record failed because of its parent starts.
const NOT_WRITTEN: &str = "not written: ";

/// The parent's id for a child, or why the child cannot be written. A
/// removed child of a parent that never reached OpenSpecimen has nothing to
/// attach to and needs nothing (`Ok(None)`).
fn child_of(parent: &Parent, status: RecordStatus, what: &str) -> Result<Option<i64>, String> {
    match parent {
        Parent::Failed(why) => Err(format!("{NOT_WRITTEN}{why}")),
        Parent::Written(Some(id)) => Ok(Some(*id)),
        Parent::Written(None) if status == RecordStatus::Removed => Ok(None),
        Parent::Written(None) => Err(format!(
            "not written: its {what} is removed in OpenClinica and was never created in OpenSpecimen"
        )),
    }
}

/// The record of a lookup answer: the first element of a list, or the
/// object itself.
fn first_record(v: Value) -> Option<Value> {
    match v {
        Value::Array(items) => items.into_iter().next(),
        Value::Object(_) => Some(v),
        _ => None,
    }
}

/// Whether `have` (OpenSpecimen's record) already holds every value of
/// `want` (what would be sent); a missing field equals `null`.
fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| contains(h.get(k).unwrap_or(&Value::Null), wv)),
        _ => have == want,
    }
}

// ---------------------------------------------------------------------------
// OpenSpecimen's JSON shapes.

fn status_word(status: RecordStatus) -> &'static str {
    match status {
        RecordStatus::Active => ACTIVE,
        RecordStatus::Removed => DISABLED,
    }
}

fn opt(v: &Option<String>) -> Value {
    v.as_ref().map_or(Value::Null, |s| Value::String(s.clone()))
}

/// A date for OpenSpecimen (`yyyy-MM-dd`): the date part of an
/// OpenClinica date or timestamp. Anything else (a partial date such as
/// `1987`) is sent as written, for OpenSpecimen to accept or refuse with a
/// message for the report: guessing a day would invent clinical data. (A
/// birth date has its own rule: [`os_birth_date`].)
fn os_date(v: &Option<String>) -> Value {
    match v.as_deref() {
        None => Value::Null,
        Some(s) if is_full_date(s) => Value::String(s[..10].to_owned()),
        Some(s) => Value::String(s.to_owned()),
    }
}

/// A birth date for OpenSpecimen: a full date as [`os_date`] sends it;
/// anything less (`YearOfBirth`'s `1987`, a partial `1992-06`) is sent as
/// no birth date. OpenSpecimen keeps a birth date only as a full date and
/// refuses the rest; refusing would fail the whole registration on every
/// run of a study that collects the year only, and inventing a day and
/// month would put false clinical data into the biobank. The raw value is
/// still in the record for the Postgres sink and the subject fingerprint.
fn os_birth_date(v: &Option<String>) -> Value {
    match v.as_deref() {
        Some(s) if is_full_date(s) => Value::String(s[..10].to_owned()),
        _ => Value::Null,
    }
}

/// A timestamp for OpenSpecimen (`yyyy-MM-dd HH:mm:ss`): OpenClinica's
/// `yyyy-MM-dd HH:mm:ss.S` without the fraction, and `yyyy-MM-dd HH:mm`
/// (how a time item typed without seconds reads) with `:00`, which says no
/// more than the minute did; a date alone stays a date. Anything else is
/// sent as written, for OpenSpecimen to refuse with a message.
fn os_datetime(v: &Option<String>) -> Value {
    let Some(s) = v.as_deref() else {
        return Value::Null;
    };
    // `HH:mm` or `HH:mm:ss` at `s[11..]`, then nothing or a fraction.
    let time_len = |rest: &[u8]| -> Option<usize> {
        let digits = |i: usize| rest.get(i).is_some_and(u8::is_ascii_digit);
        let hm = digits(0) && digits(1) && rest.get(2) == Some(&b':') && digits(3) && digits(4);
        let hms = hm && rest.get(5) == Some(&b':') && digits(6) && digits(7);
        if hms && rest.get(8).is_none_or(|b| *b == b'.') {
            Some(8)
        } else if hm && rest.len() == 5 {
            Some(5)
        } else {
            None
        }
    };
    if s.len() > 11 && is_full_date(s) && matches!(s.as_bytes()[10], b' ' | b'T') {
        match time_len(&s.as_bytes()[11..]) {
            Some(8) => return Value::String(format!("{} {}", &s[..10], &s[11..19])),
            Some(_) => return Value::String(format!("{} {}:00", &s[..10], &s[11..16])),
            None => {}
        }
    }
    Value::String(s.to_owned())
}

fn is_full_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 10
        && b[..10].iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
        && (b.len() == 10 || !b[10].is_ascii_digit())
}

fn insert_fields(m: &mut Map<String, Value>, fields: &BTreeMap<String, Option<String>>) {
    for (k, v) in fields {
        // The record's own keys win over a mapped field of the same name.
        m.entry(k.clone()).or_insert_with(|| opt(v));
    }
}

/// `POST /collection-protocol-registrations`: the registration with its
/// participant. Further mapped participant fields go into `participant`
/// under their OpenSpecimen names.
fn participant_body(cp: &str, p: &ParticipantRecord) -> Value {
    let status = status_word(p.status);
    let mut participant = Map::new();
    participant.insert("uid".into(), opt(&p.uid));
    participant.insert("birthDate".into(), os_birth_date(&p.birth_date));
    participant.insert("gender".into(), opt(&p.gender));
    participant.insert("activityStatus".into(), json!(status));
    insert_fields(&mut participant, &p.fields);
    json!({
        "cpShortTitle": cp,
        "ppid": p.ppid,
        "registrationDate": os_date(&p.registration_date),
        "activityStatus": status,
        "participant": participant,
    })
}

/// `POST /visits`. `status` is OpenSpecimen's collection status of the
/// visit ("Complete": OpenClinica only has events that happened).
fn visit_body(v: &VisitRecord, cpr_id: Option<i64>) -> Value {
    json!({
        "cprId": cpr_id,
        "eventLabel": v.event_label,
        "name": v.name,
        "site": opt(&v.site),
        "status": "Complete",
        "visitDate": os_date(&v.visit_date),
        "activityStatus": status_word(v.status),
    })
}

/// `POST /specimens`: a primary ("New") specimen, collected, under its
/// visit. The quantity goes as a number when it is one.
fn specimen_body(s: &SpecimenRecord, visit_id: Option<i64>) -> Value {
    let qty = match s.quantity.as_deref() {
        None => Value::Null,
        Some(q) => q
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Value::String(q.to_owned()), Value::Number),
    };
    let mut m = Map::new();
    m.insert("label".into(), opt(&s.label));
    m.insert("type".into(), opt(&s.specimen_type));
    m.insert("initialQty".into(), qty);
    m.insert("visitId".into(), json!(visit_id));
    m.insert("lineage".into(), json!("New"));
    m.insert("status".into(), json!("Collected"));
    m.insert(
        "collectionEvent".into(),
        json!({ "time": os_datetime(&s.collection_time) }),
    );
    m.insert("activityStatus".into(), json!(status_word(s.status)));
    insert_fields(&mut m, &s.fields);
    Value::Object(m)
}

/// `POST /forms/{formId}/data`: the field values by `ItemDef@Name` (the
/// item OID when the name is unknown) and `appData` naming the form context
/// and the record it belongs to.
fn form_body(f: &FormRecord, form: &FormTarget, object_id: Option<i64>) -> Value {
    let mut m = Map::new();
    for (oid, v) in &f.values {
        let name = f.item_names.get(oid).unwrap_or(oid);
        m.insert(name.clone(), opt(v));
    }
    m.insert(
        "appData".into(),
        json!({ "formCtxtId": form.form_ctxt_id, "objectId": object_id }),
    );
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_keep_their_date_and_partial_dates_stay_raw() {
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(os_date(&s("2022-04-12 10:00:00.0")), json!("2022-04-12"));
        assert_eq!(os_date(&s("2022-04-12")), json!("2022-04-12"));
        assert_eq!(os_date(&s("1987")), json!("1987"));
        assert_eq!(os_date(&s("2022-04-123")), json!("2022-04-123"));
        assert_eq!(os_date(&None), Value::Null);
        assert_eq!(
            os_datetime(&s("2022-04-12 10:01:02.0")),
            json!("2022-04-12 10:01:02")
        );
        assert_eq!(
            os_datetime(&s("2022-04-12T10:01:02")),
            json!("2022-04-12 10:01:02")
        );
        assert_eq!(os_datetime(&s("2022-04-12")), json!("2022-04-12"));
        assert_eq!(
            os_datetime(&s("2022-04-12 10:01")),
            json!("2022-04-12 10:01:00")
        );
        // Not a time OpenSpecimen could read: sent as written, refused
        // with OpenSpecimen's message.
        for odd in [
            "2022-04-12 10:0",
            "2022-04-12 10:01:0",
            "2022-04-12 10:01x",
            "1987",
        ] {
            assert_eq!(os_datetime(&s(odd)), json!(odd), "{odd}");
        }
    }

    #[test]
    fn a_birth_date_goes_only_as_a_full_date() {
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(os_birth_date(&s("1980-02-03")), json!("1980-02-03"));
        assert_eq!(
            os_birth_date(&s("1980-02-03 00:00:00.0")),
            json!("1980-02-03")
        );
        for partial in ["1987", "1992-06", "1992-6-1", ""] {
            assert_eq!(os_birth_date(&s(partial)), Value::Null, "{partial}");
        }
        assert_eq!(os_birth_date(&None), Value::Null);
        let mut p = ParticipantRecord {
            subject_key: "SS_1".into(),
            ppid: "P1".into(),
            study_oid: "S".into(),
            site: None,
            uid: None,
            birth_date: s("1987"),
            gender: None,
            registration_date: s("2021-01-05"),
            oc_status: None,
            status: RecordStatus::Active,
            fields: BTreeMap::new(),
        };
        assert_eq!(
            participant_body("CP", &p)["participant"]["birthDate"],
            Value::Null
        );
        p.birth_date = s("1987-05-06");
        assert_eq!(
            participant_body("CP", &p)["participant"]["birthDate"],
            json!("1987-05-06")
        );
    }

    #[test]
    fn contains_treats_missing_as_null_and_recurses() {
        let have = json!({"id": 1, "a": "x", "p": {"b": "y", "c": 2}});
        assert!(contains(
            &have,
            &json!({"a": "x", "p": {"b": "y"}, "z": null})
        ));
        assert!(!contains(&have, &json!({"a": "x", "p": {"b": "n"}})));
        assert!(!contains(&have, &json!({"z": "x"})));
    }

    #[test]
    fn natural_keys_are_unambiguous() {
        assert_ne!(key_text(&["a\",\"b", ""]), key_text(&["a", "b", ""]));
        assert_eq!(key_text(&["SS_1", ""]), r#"["SS_1",""]"#);
    }

    #[test]
    fn the_hash_sees_the_status() {
        let b = json!({"a": 1});
        assert_ne!(hash_of(&b, true), hash_of(&b, false));
        assert_eq!(hash_of(&b, false), hash_of(&json!({"a": 1}), false));
    }
}
