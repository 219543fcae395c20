//! The typed configuration of one collection protocol ([`CpConfig`]) and
//! its TOML file format.
//!
//! Every value that can be checked without the study's metadata is checked
//! while the file is read (parse, don't validate): a CP id, the visit name
//! template, the cron schedule, the batch size. What needs the metadata
//! (do the OIDs exist?) is [`super::validate`]'s job.
//!
//! ```toml
//! id = "DEMO-CP"                     # OpenSpecimen CP short title
//! visit_name = "{ppid}-{event_label}-{repeat}"
//! schedule = "0 2 * * *"             # optional, 5-field cron
//!
//! [source]
//! kind = "oc3"
//! base_url = "https://oc.example.org/OpenClinica"
//! study_oid = "S_DEMO"
//! username = "ocsync"
//! password = { env = "OC_DEMO_PASSWORD" }
//!
//! [site_map]
//! S_DEMO_SITE1 = "Main hospital"
//!
//! [event_map]
//! SE_VISIT = "Follow-up visit"
//!
//! [crfs]
//! exclude = ["F_AE"]
//! import = "completed"
//!
//! [[specimens]]
//! item_group_oid = "IG_SPECI_SAMPLES"
//! label_item = "I_SPECI_BARCODE"
//! type_item = "I_SPECI_TYPE"
//! quantity_item = "I_SPECI_QTY"
//! collection_time_item = "I_SPECI_COLLECTED"
//! value_maps = { I_SPECI_TYPE = { BLOOD = "Whole Blood" } }
//!
//! [participant_fields]
//! race = { item = "I_DEMOG_RACE", event = "SE_SCREENING" }
//!
//! [target]                           # optional; absent = kind "postgres"
//! kind = "openspecimen"
//! base_url = "https://os.example.org/openspecimen"
//! login_name = "ocsync"
//! password = { env = "OS_DEMO_PASSWORD" }
//!
//! [target.forms.F_VITALS]            # CRF OID → OpenSpecimen form
//! form_id = 12
//! form_ctxt_id = 34
//! level = "visit"
//!
//! [notify]                           # optional; who hears about runs ending
//! email = ["biobank-team@example.org"]
//! webhook_url = "https://hooks.example.org/ocsync"
//! webhook_secret = { env = "OCSYNC_WEBHOOK_SECRET" }
//! on_success = false                 # Failed and Aborted always notify
//! ```
//!
//! `[target]` says where the CP's records are written: `kind = "postgres"`
//! (the `ocsync_data` tables, the default) or `kind = "openspecimen"` with
//! the settings of [`OpenSpecimenConfig`] (see its module for every key and
//! default).
//!
//! `[notify]` names who is told when a run ends Failed or Aborted (and
//! Success with `on_success = true`): email recipients (sent through the
//! `SMTP_*` server), a webhook URL whose JSON is signed with the secret
//! that `webhook_secret` refers to, or both. Its keys and checks are those
//! of [`CpNotify`].
//!
//! This module knows TOML and serde; nothing of Postgres or of the ODM. It
//! borrows the configuration types of the sources and of the OpenSpecimen
//! sink (plain data), never their behaviour.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use crate::notify::CpNotify;
use crate::openclinica::{
    CredentialRef, FileConfig, NetworkConfig, Oc3Config, Oc4Config, QueryFlags, RetryPolicy,
    SourceConfig,
};
use crate::sink::openspecimen::{FormTarget, OpenSpecimenConfig};

/// The OpenSpecimen short title of a CP: non-empty, at most 255 characters
/// (OpenSpecimen's column width), no control characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CpId(String);

impl CpId {
    pub fn parse(text: impl Into<String>) -> Result<Self, String> {
        let text = text.into();
        if text.trim().is_empty() {
            return Err("a CP id must not be empty".into());
        }
        if text.chars().count() > 255 {
            return Err("a CP id must be at most 255 characters".into());
        }
        if text.chars().any(char::is_control) {
            return Err("a CP id must not contain control characters".into());
        }
        Ok(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CpId {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(text)
    }
}

impl From<CpId> for String {
    fn from(id: CpId) -> String {
        id.0
    }
}

impl fmt::Display for CpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One collection protocol: where its study comes from and how the study
/// maps onto it. Unknown keys are errors, at every level.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpConfig {
    /// The OpenSpecimen CP short title.
    pub id: CpId,
    /// Free text for the people who run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Disabled CPs are skipped by the scheduler; a manual run still works.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where the study's data comes from; the password is a reference.
    #[serde(serialize_with = "serialize_source")]
    pub source: SourceConfig,
    /// OpenClinica site OID (or the study OID, for subjects enrolled at the
    /// parent study) → OpenSpecimen site name.
    #[serde(default)]
    pub site_map: BTreeMap<String, String>,
    /// The site of subjects whose study/site OID is not in `site_map`.
    /// Without one, such a subject gets an error row (and no site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_site: Option<String>,
    /// Study event OID → OpenSpecimen event label. An unmapped event is
    /// labelled with its `StudyEventDef@Name`, or its OID when the metadata
    /// does not name it.
    #[serde(default)]
    pub event_map: BTreeMap<String, String>,
    /// Which CRFs become form records.
    #[serde(default)]
    pub crfs: CrfSelection,
    /// Item groups that describe specimens.
    #[serde(default)]
    pub specimens: Vec<SpecimenMapping>,
    /// OpenSpecimen participant field → the item that fills it.
    #[serde(default, deserialize_with = "participant_fields")]
    pub participant_fields: BTreeMap<String, ItemRef>,
    /// Which OpenClinica identifier becomes the PPID.
    #[serde(default)]
    pub ppid: PpidSource,
    /// How visits are named; see [`VisitNameTemplate`] for placeholders.
    #[serde(default)]
    pub visit_name: VisitNameTemplate,
    /// Subjects written per transaction (1–10,000). A run's progress,
    /// checkpoint and abort check happen between batches.
    #[serde(default = "default_batch_size", deserialize_with = "batch_size")]
    pub batch_size: u32,
    /// When the scheduler runs this CP; `None`: only on demand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<CronSchedule>,
    /// Where the records are written. Left out of the TOML when it is the
    /// default, so configurations written before targets existed read and
    /// print as they did.
    #[serde(default, skip_serializing_if = "TargetConfig::is_postgres")]
    pub target: TargetConfig,
    /// Who hears about this CP's runs ending: email recipients and/or a
    /// signed webhook (`[notify]`, see [`crate::notify::settings`]). Left
    /// out of the TOML when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<CpNotify>,
}

/// Where a CP's records are written (`[target]`).
#[derive(Debug, Clone, Default)]
pub enum TargetConfig {
    /// The `ocsync_data` tables in ocsync's own database.
    #[default]
    Postgres,
    /// An OpenSpecimen server's REST API (boxed: the settings are large
    /// next to the empty default).
    OpenSpecimen(Box<OpenSpecimenConfig>),
}

impl TargetConfig {
    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres)
    }

    /// `postgres` or `openspecimen`, as written in `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::OpenSpecimen(_) => "openspecimen",
        }
    }

    /// The CRF form targets (empty for Postgres, which keeps every CRF).
    pub fn forms(&self) -> Option<&BTreeMap<String, FormTarget>> {
        match self {
            Self::Postgres => None,
            Self::OpenSpecimen(c) => Some(&c.forms),
        }
    }
}

/// `[target]` as written. `Postgres {}` is a struct variant rather than a
/// unit one so that `deny_unknown_fields` also refuses stray keys next to
/// `kind = "postgres"` (an OpenSpecimen key left behind there would
/// otherwise be dropped without a word).
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
enum TargetFile {
    Postgres {},
    OpenSpecimen(Box<OpenSpecimenConfig>),
}

impl<'de> Deserialize<'de> for TargetConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match TargetFile::deserialize(d)? {
            TargetFile::Postgres {} => Ok(Self::Postgres),
            TargetFile::OpenSpecimen(c) => {
                // Parse, don't validate: settings that cannot work are
                // refused while the file is read.
                c.validate().map_err(de::Error::custom)?;
                Ok(Self::OpenSpecimen(c))
            }
        }
    }
}

fn yes() -> bool {
    true
}

fn default_batch_size() -> u32 {
    200
}

fn batch_size<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    if (1..=10_000).contains(&n) {
        Ok(n)
    } else {
        Err(de::Error::custom("batch_size must be between 1 and 10000"))
    }
}

/// CRF filters. A CRF is identified by its CRF OID: OpenClinica 3.x's
/// `ParentFormOID` (the `FormOID` without its `_V…` version suffix),
/// OpenClinica 4.x's `FormOID`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrfSelection {
    /// When not empty, only these CRFs become form records.
    pub include: Vec<String>,
    /// These CRFs never become form records (applied after `include`).
    pub exclude: Vec<String>,
    pub import: CrfImport,
}

/// Which forms of an included CRF are imported as form records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrfImport {
    /// Every form, whatever its data entry status.
    #[default]
    All,
    /// Only forms whose status says data entry is finished (see
    /// [`crate::mapping`] for the status words). Removed or invalid forms
    /// are still passed on, flagged removed, so that a form removed after
    /// completion does not stay live downstream.
    Completed,
}

/// An item group whose repeats are specimens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecimenMapping {
    pub item_group_oid: String,
    /// Only this CRF's occurrences of the group (when the group is used in
    /// several CRFs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crf_oid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_item: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_item: Option<String>,
    /// Must hold a non-negative number (after the value map and trimming).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity_item: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection_time_item: Option<String>,
    /// Further OpenSpecimen specimen field → item OID.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Item OID → (raw OpenClinica value → OpenSpecimen value). A value
    /// matches its key as written, or else with surrounding whitespace
    /// trimmed (OpenClinica keeps untrimmed answers).
    #[serde(default)]
    pub value_maps: BTreeMap<String, BTreeMap<String, String>>,
    /// A value missing from its item's value map is an error row (and the
    /// field is left empty) instead of passing through unchanged.
    #[serde(default)]
    pub strict_value_maps: bool,
    /// Also write each repeat as a form record (by default a specimen
    /// group is a specimen only).
    #[serde(default)]
    pub also_as_form_record: bool,
}

/// An item that fills a participant field: the item OID alone
/// (`"I_DEMOG_RACE"`) or a table naming where to look and how to translate
/// (`{ item = "I_DEMOG_RACE", event = "SE_SCREENING", crf = "F_DEMOG",
/// values = { "1" = "White" } }`). The first non-null value in document
/// order, in a form that is not removed, wins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemRef {
    pub item: String,
    /// Only in this study event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Only in this CRF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crf: Option<String>,
    /// Raw value → OpenSpecimen value; unmapped values pass unchanged.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, String>,
}

impl ItemRef {
    pub fn item(oid: impl Into<String>) -> Self {
        Self {
            item: oid.into(),
            ..Self::default()
        }
    }
}

// `ItemRef` reads from a string or a table; the derive above serves tables
// (and writes every `ItemRef` as one), this wrapper accepts both.
impl ItemRef {
    fn deserialize_either<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = ItemRef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an item OID or a table with `item` (and `event`, `crf`, `values`)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ItemRef, E> {
                Ok(ItemRef::item(v))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<ItemRef, A::Error> {
                ItemRef::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_any(V)
    }
}

/// Which OpenClinica identifier becomes the OpenSpecimen PPID.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PpidSource {
    /// `OpenClinica:StudySubjectID`, the subject label (OpenSpecimen's
    /// usual choice).
    #[default]
    StudySubjectId,
    /// `SubjectKey` (`SS_…`): never changes, even when the label is edited.
    SubjectKey,
    /// `OpenClinica:UniqueIdentifier` (the person id across studies).
    UniqueIdentifier,
}

/// A visit name template. Placeholders:
///
/// | placeholder | value |
/// | --- | --- |
/// | `{ppid}` | the participant's PPID |
/// | `{subject_key}` | `SubjectKey` (`SS_…`) |
/// | `{study_subject_id}` | `OpenClinica:StudySubjectID` (empty when absent) |
/// | `{event_oid}` | `StudyEventOID` |
/// | `{event_label}` | the OpenSpecimen event label (event map or name) |
/// | `{repeat}` | `StudyEventRepeatKey`, or `1` for a non-repeating event |
/// | `{site}` | the OpenSpecimen site (empty when unmapped) |
///
/// `{{` and `}}` write literal braces. Unknown placeholders are refused
/// when the configuration is read. The default is
/// `{ppid}-{event_label}-{repeat}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VisitNameTemplate {
    text: String,
    parts: Vec<TemplatePart>,
}

/// One piece of a parsed template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    Ppid,
    SubjectKey,
    StudySubjectId,
    EventOid,
    EventLabel,
    Repeat,
    Site,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Text(String),
    Field(Placeholder),
}

impl VisitNameTemplate {
    pub const DEFAULT: &'static str = "{ppid}-{event_label}-{repeat}";

    pub fn parse(text: impl Into<String>) -> Result<Self, String> {
        let text = text.into();
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err("unclosed `{` in visit_name".into()),
                        }
                    }
                    let field = match name.as_str() {
                        "ppid" => Placeholder::Ppid,
                        "subject_key" => Placeholder::SubjectKey,
                        "study_subject_id" => Placeholder::StudySubjectId,
                        "event_oid" => Placeholder::EventOid,
                        "event_label" => Placeholder::EventLabel,
                        "repeat" => Placeholder::Repeat,
                        "site" => Placeholder::Site,
                        other => {
                            return Err(format!(
                                "unknown placeholder `{{{other}}}` in visit_name (known: ppid, \
                                 subject_key, study_subject_id, event_oid, event_label, repeat, site)"
                            ));
                        }
                    };
                    if !literal.is_empty() {
                        parts.push(TemplatePart::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(TemplatePart::Field(field));
                }
                '}' => return Err("unmatched `}` in visit_name (write `}}` for a brace)".into()),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(TemplatePart::Text(literal));
        }
        if parts.is_empty() {
            return Err("visit_name must not be empty".into());
        }
        Ok(Self { text, parts })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the template uses `placeholder`.
    pub fn uses(&self, placeholder: Placeholder) -> bool {
        self.parts.contains(&TemplatePart::Field(placeholder))
    }

    /// Fills the template in.
    pub fn render(&self, value: impl Fn(Placeholder) -> String) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                TemplatePart::Text(t) => out.push_str(t),
                TemplatePart::Field(f) => out.push_str(&value(*f)),
            }
        }
        out
    }
}

impl Default for VisitNameTemplate {
    fn default() -> Self {
        Self::parse(Self::DEFAULT).expect("the default template parses")
    }
}

impl TryFrom<String> for VisitNameTemplate {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(text)
    }
}

impl From<VisitNameTemplate> for String {
    fn from(t: VisitNameTemplate) -> String {
        t.text
    }
}

/// A cron schedule: five fields (minute, hour, day of month, month, day of
/// week) with `*`, numbers, ranges `a-b`, steps `*/n` or `a-b/n`, lists
/// `a,b`, month and day names (`jan`, `mon`), or one of `@hourly`,
/// `@daily`, `@weekly`, `@monthly`. Times are UTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CronSchedule(String);

impl CronSchedule {
    pub fn parse(text: impl Into<String>) -> Result<Self, String> {
        let text = text.into();
        let trimmed = text.trim();
        if matches!(
            trimmed,
            "@hourly" | "@daily" | "@midnight" | "@weekly" | "@monthly"
        ) {
            return Ok(Self(trimmed.to_owned()));
        }
        let fields: Vec<&str> = trimmed.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "schedule must have 5 fields (minute hour day-of-month month day-of-week), \
                 found {}",
                fields.len()
            ));
        }
        const MONTHS: &[&str] = &[
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ];
        const DAYS: &[&str] = &["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
        let specs: [(&str, u32, u32, &[&str], u32); 5] = [
            ("minute", 0, 59, &[], 0),
            ("hour", 0, 23, &[], 0),
            ("day of month", 1, 31, &[], 0),
            ("month", 1, 12, MONTHS, 1),
            ("day of week", 0, 7, DAYS, 0),
        ];
        for (field, (name, lo, hi, names, base)) in fields.iter().zip(specs) {
            cron_field(field, lo, hi, names, base)
                .map_err(|e| format!("schedule: {name} field `{field}`: {e}"))?;
        }
        Ok(Self(fields.join(" ")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn cron_field(field: &str, lo: u32, hi: u32, names: &[&str], base: u32) -> Result<(), String> {
    let value = |s: &str| -> Result<u32, String> {
        if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
            return Ok(i as u32 + base);
        }
        let n: u32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
        if (lo..=hi).contains(&n) {
            Ok(n)
        } else {
            Err(format!("{n} is outside {lo}-{hi}"))
        }
    };
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (item, None),
        };
        if let Some(step) = step {
            let n: u32 = step
                .parse()
                .map_err(|_| format!("step `{step}` is not a number"))?;
            if n == 0 || n > hi {
                return Err(format!("step {n} is outside 1-{hi}"));
            }
        }
        if range == "*" {
            continue;
        }
        match range.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (value(a)?, value(b)?);
                if a > b {
                    return Err(format!("range {a}-{b} is backwards"));
                }
            }
            None => {
                value(range)?;
            }
        }
    }
    Ok(())
}

impl TryFrom<String> for CronSchedule {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(text)
    }
}

impl From<CronSchedule> for String {
    fn from(s: CronSchedule) -> String {
        s.0
    }
}

/// Why a CP configuration file could not be read. `Display` gives
/// `file:line:col: message` (the `toml` crate's message names the key).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
}

impl CpConfig {
    /// Reads a CP configuration from a TOML file.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            file: file.clone(),
            source,
        })?;
        Self::from_toml(&text, &file)
    }

    /// Parses TOML text; `file` names it in errors.
    pub fn from_toml(text: &str, file: &str) -> Result<Self, LoadError> {
        toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map_or((1, 1), |span| line_column(text, span.start));
            LoadError::Syntax {
                file: file.to_owned(),
                line,
                column,
                message: e.message().trim_end().to_owned(),
            }
        })
    }

    /// The configuration as TOML (what `ocsync cp show` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render as TOML: {e}\n"))
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

// `participant_fields` values are read with `ItemRef::deserialize_either`;
// serde's derive cannot say that for map values, hence the shim.
impl<'de> Deserialize<'de> for ParticipantFieldsShim {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either(ItemRef);
        impl<'de> Deserialize<'de> for Either {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                ItemRef::deserialize_either(d).map(Either)
            }
        }
        let map = BTreeMap::<String, Either>::deserialize(d)?;
        Ok(Self(map.into_iter().map(|(k, v)| (k, v.0)).collect()))
    }
}

/// The participant field map as read from a file.
struct ParticipantFieldsShim(BTreeMap<String, ItemRef>);

/// Reads `participant_fields`, whose values are item OIDs or tables.
pub(crate) fn participant_fields<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, ItemRef>, D::Error> {
    ParticipantFieldsShim::deserialize(d).map(|s| s.0)
}

/// Writes a [`SourceConfig`] in the shape it is read from. The source
/// types are deserialize-only; the structs are destructured exhaustively
/// here so that a new field there fails to compile until it is written
/// here too.
fn serialize_source<S: Serializer>(source: &SourceConfig, s: S) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(None)?;
    match source {
        SourceConfig::Oc3(Oc3Config {
            base_url,
            study_oid,
            username,
            password,
            query,
            network,
        }) => {
            map.serialize_entry("kind", "oc3")?;
            map.serialize_entry("base_url", base_url.as_str())?;
            map.serialize_entry("study_oid", study_oid)?;
            map.serialize_entry("username", username)?;
            map.serialize_entry("password", &Cred(password))?;
            map.serialize_entry("query", &Query(query))?;
            map.serialize_entry("network", &Net(network))?;
        }
        SourceConfig::Oc4(Oc4Config {
            base_url,
            auth_url,
            study_oid,
            username,
            password,
            query,
            network,
            whole_study,
        }) => {
            map.serialize_entry("kind", "oc4")?;
            map.serialize_entry("base_url", base_url.as_str())?;
            map.serialize_entry("auth_url", auth_url.as_str())?;
            map.serialize_entry("study_oid", study_oid)?;
            map.serialize_entry("username", username)?;
            map.serialize_entry("password", &Cred(password))?;
            map.serialize_entry("query", &Query(query))?;
            map.serialize_entry("network", &Net(network))?;
            map.serialize_entry("whole_study", whole_study)?;
        }
        SourceConfig::File(FileConfig { path, pattern }) => {
            map.serialize_entry("kind", "file")?;
            map.serialize_entry("path", path)?;
            map.serialize_entry("pattern", pattern)?;
        }
    }
    map.end()
}

/// Writes `[target]` in the shape it is read from; as for the source
/// section, the configuration types are destructured
/// exhaustively so that a new field fails to compile until it is written
/// here too.
impl Serialize for TargetConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        match self {
            Self::Postgres => map.serialize_entry("kind", "postgres")?,
            Self::OpenSpecimen(c) => {
                let OpenSpecimenConfig {
                    base_url,
                    login_name,
                    password,
                    domain,
                    connect_timeout_ms,
                    response_timeout_ms,
                    max_concurrency,
                    retry,
                    forms,
                } = &**c;
                map.serialize_entry("kind", "openspecimen")?;
                map.serialize_entry("base_url", base_url.as_str())?;
                map.serialize_entry("login_name", login_name)?;
                map.serialize_entry("password", &Cred(password))?;
                map.serialize_entry("domain", domain)?;
                map.serialize_entry("connect_timeout_ms", connect_timeout_ms)?;
                map.serialize_entry("response_timeout_ms", response_timeout_ms)?;
                map.serialize_entry("max_concurrency", max_concurrency)?;
                map.serialize_entry("retry", &Retry(retry))?;
                let forms: BTreeMap<&str, Form<'_>> =
                    forms.iter().map(|(k, v)| (k.as_str(), Form(v))).collect();
                map.serialize_entry("forms", &forms)?;
            }
        }
        map.end()
    }
}

struct Form<'a>(&'a FormTarget);

impl Serialize for Form<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let FormTarget {
            form_id,
            form_ctxt_id,
            level,
        } = self.0;
        let mut map = s.serialize_map(Some(3))?;
        map.serialize_entry("form_id", form_id)?;
        map.serialize_entry("form_ctxt_id", form_ctxt_id)?;
        map.serialize_entry("level", level.as_str())?;
        map.end()
    }
}

struct Retry<'a>(&'a RetryPolicy);

impl Serialize for Retry<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let RetryPolicy {
            max_attempts,
            base_delay_ms,
            max_delay_ms,
        } = self.0;
        let mut map = s.serialize_map(Some(3))?;
        map.serialize_entry("max_attempts", max_attempts)?;
        map.serialize_entry("base_delay_ms", base_delay_ms)?;
        map.serialize_entry("max_delay_ms", max_delay_ms)?;
        map.end()
    }
}

struct Cred<'a>(&'a CredentialRef);

impl Serialize for Cred<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        match self.0 {
            CredentialRef::Env(name) => map.serialize_entry("env", name)?,
            CredentialRef::File(path) => map.serialize_entry("file", path)?,
        }
        map.end()
    }
}

struct Query<'a>(&'a QueryFlags);

impl Serialize for Query<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let QueryFlags {
            include_metadata,
            include_audits,
            show_archived,
        } = self.0;
        let mut map = s.serialize_map(Some(3))?;
        map.serialize_entry("include_metadata", include_metadata)?;
        map.serialize_entry("include_audits", include_audits)?;
        map.serialize_entry("show_archived", show_archived)?;
        map.end()
    }
}

struct Net<'a>(&'a NetworkConfig);

impl Serialize for Net<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let NetworkConfig {
            connect_timeout_ms,
            response_timeout_ms,
            idle_timeout_ms,
            max_concurrency,
            retry:
                RetryPolicy {
                    max_attempts,
                    base_delay_ms,
                    max_delay_ms,
                },
        } = self.0;
        let mut map = s.serialize_map(Some(5))?;
        map.serialize_entry("connect_timeout_ms", connect_timeout_ms)?;
        map.serialize_entry("response_timeout_ms", response_timeout_ms)?;
        map.serialize_entry("idle_timeout_ms", idle_timeout_ms)?;
        map.serialize_entry("max_concurrency", max_concurrency)?;
        map.serialize_entry(
            "retry",
            &BTreeMap::from([
                ("base_delay_ms", *base_delay_ms),
                ("max_attempts", u64::from(*max_attempts)),
                ("max_delay_ms", *max_delay_ms),
            ]),
        )?;
        map.end()
    }
}

impl CpConfig {
    /// The study (or site) OID the source reads, when it names one (a file
    /// source takes whatever study the extract holds).
    pub fn study_oid(&self) -> Option<&str> {
        match &self.source {
            SourceConfig::Oc3(c) => Some(&c.study_oid),
            SourceConfig::Oc4(c) => Some(&c.study_oid),
            SourceConfig::File(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
id = "DEMO-CP"
description = "Demo"
enabled = false
default_site = "Central"
ppid = "subject_key"
visit_name = "{ppid}/{repeat}"
batch_size = 25
schedule = "*/15 2-4 * jan-mar mon,fri"

[source]
kind = "oc3"
base_url = "https://oc.example.org/OpenClinica"
study_oid = "S_DEMO"
username = "ocsync"
password = { file = "/run/secrets/oc" }

[site_map]
S_DEMO_SITE1 = "Main hospital"

[event_map]
SE_VISIT = "Visit"

[crfs]
include = ["F_A"]
exclude = ["F_B"]
import = "completed"

[[specimens]]
item_group_oid = "IG_S"
quantity_item = "I_Q"
fields = { barcode = "I_B" }
value_maps = { I_T = { BLOOD = "Whole Blood" } }
also_as_form_record = true

[participant_fields]
race = "I_RACE"
ethnicity = { item = "I_ETH", event = "SE_SCREEN", crf = "F_DEM", values = { "1" = "Hispanic" } }

[notify]
email = ["team@example.org"]
webhook_url = "https://hooks.example.org/ocsync"
webhook_secret = { file = "/run/secrets/hook" }
"#;

    #[test]
    fn a_full_file_reads_and_round_trips_through_toml_and_json() {
        let c = CpConfig::from_toml(FULL, "full.toml").unwrap();
        assert_eq!(c.id.as_str(), "DEMO-CP");
        assert!(!c.enabled);
        assert_eq!(c.batch_size, 25);
        assert_eq!(c.ppid, PpidSource::SubjectKey);
        assert_eq!(c.crfs.import, CrfImport::Completed);
        assert_eq!(c.participant_fields["race"], ItemRef::item("I_RACE"));
        assert_eq!(
            c.participant_fields["ethnicity"].crf.as_deref(),
            Some("F_DEM")
        );
        assert_eq!(c.study_oid(), Some("S_DEMO"));
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(
            json["source"]["password"],
            serde_json::json!({"file": "/run/secrets/oc"})
        );
        assert_eq!(
            json["notify"],
            serde_json::json!({
                "email": ["team@example.org"],
                "webhook_url": "https://hooks.example.org/ocsync",
                "webhook_secret": {"file": "/run/secrets/hook"},
                "on_success": false,
            })
        );
        let again = CpConfig::from_toml(&c.to_toml(), "shown.toml").unwrap();
        assert_eq!(serde_json::to_value(&again).unwrap(), json);
        let from_json: CpConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&from_json).unwrap(), json);
    }

    #[test]
    fn defaults() {
        let c = CpConfig::from_toml(
            "id = \"X\"\nsource = { kind = \"file\", path = \"/d\" }\n",
            "x.toml",
        )
        .unwrap();
        assert!(c.enabled);
        assert_eq!(c.batch_size, 200);
        assert_eq!(c.ppid, PpidSource::StudySubjectId);
        assert_eq!(c.visit_name.as_str(), VisitNameTemplate::DEFAULT);
        assert_eq!(c.crfs, CrfSelection::default());
        assert_eq!(c.schedule, None);
        assert_eq!(c.notify, None);
        assert!(!c.to_toml().contains("notify"));
    }

    #[test]
    fn errors_name_file_line_column_and_key() {
        for (text, line, expected) in [
            (
                "id = \"X\"\nsource = { kind = \"file\", path = \"/d\" }\nbatchsize = 3\n",
                3,
                "unknown field `batchsize`",
            ),
            (
                "id = \"\"\nsource = { kind = \"file\", path = \"/d\" }\n",
                1,
                "a CP id must not be empty",
            ),
            (
                "id = \"X\"\nsource = { kind = \"oc3\", base_url = \"https://x/\", study_oid = \"S\", username = \"u\", password = \"pw\" }\n",
                2,
                "",
            ),
            (
                "id = \"X\"\nsource = { kind = \"file\", path = \"/d\" }\nvisit_name = \"{nope}\"\n",
                3,
                "unknown placeholder `{nope}`",
            ),
            (
                "id = \"X\"\nsource = { kind = \"file\", path = \"/d\" }\nschedule = \"61 * * * *\"\n",
                3,
                "minute field `61`: 61 is outside 0-59",
            ),
            (
                "id = \"X\"\nsource = { kind = \"file\", path = \"/d\" }\nbatch_size = 0\n",
                3,
                "batch_size must be between 1 and 10000",
            ),
            (
                "id = \"X\"\nsource = { kind = \"file\", path = \"/d\" }\n[[specimens]]\nitem_group_oid = \"G\"\nquantity = \"I\"\n",
                5,
                "unknown field `quantity`",
            ),
            (
                "id = \"X\"\nsource = { kind = \"file\", path = \"/d\" }\n[participant_fields]\nrace = { item = \"I\", form = \"F\" }\n",
                4,
                "unknown field `form`",
            ),
            (
                "id = \"X\"\n[crfs]\nimport = \"some\"\n",
                3,
                "unknown variant `some`",
            ),
            (
                "id = \"X\"\nsource = { kind = \"file\", path = \"/d\" }\n[notify]\nemail = [\"team\"]\n",
                // A check of the section as a whole points at its header;
                // the message names the key.
                3,
                "notify.email[0]",
            ),
            (
                "id = \"X\"\nsource = { kind = \"file\", path = \"/d\" }\n[notify]\nwebhook_url = \"https://h/\"\nwebhook_secret = \"pw\"\n",
                5,
                "may not be written in the configuration",
            ),
        ] {
            let e = CpConfig::from_toml(text, "cp.toml")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("cp.toml:{line}:")), "{text}\n→ {e}");
            assert!(e.contains(expected), "{text}\n→ {e}");
            assert!(!e.contains("pw\""), "the password is not echoed: {e}");
        }
    }

    const OS_TARGET: &str = r#"
id = "OS-CP"
source = { kind = "file", path = "/d" }

[target]
kind = "openspecimen"
base_url = "https://os.example.org/openspecimen"
login_name = "ocsync"
password = { env = "OS_PASSWORD" }
max_concurrency = 2
retry = { max_attempts = 3 }

[target.forms.F_VITALS]
form_id = 12
form_ctxt_id = 34

[target.forms.F_DEMOG]
form_id = 13
form_ctxt_id = 35
level = "participant"
"#;

    #[test]
    fn an_openspecimen_target_reads_with_defaults_and_round_trips() {
        use crate::sink::openspecimen::FormLevel;
        let c = CpConfig::from_toml(OS_TARGET, "os.toml").unwrap();
        let TargetConfig::OpenSpecimen(os) = &c.target else {
            panic!("not an OpenSpecimen target: {:?}", c.target);
        };
        assert_eq!(c.target.kind(), "openspecimen");
        assert_eq!(os.base_url.as_str(), "https://os.example.org/openspecimen");
        assert_eq!(os.password, CredentialRef::Env("OS_PASSWORD".into()));
        assert_eq!(os.domain, "openspecimen", "the default");
        assert_eq!(os.max_concurrency, 2);
        assert_eq!(os.retry.max_attempts, 3);
        assert_eq!(os.retry.base_delay_ms, 500, "the default");
        assert_eq!(os.forms["F_VITALS"].level, FormLevel::Visit, "the default");
        assert_eq!(os.forms["F_DEMOG"].level, FormLevel::Participant);

        let shown = c.to_toml();
        assert!(shown.contains("[target]"), "{shown}");
        assert!(shown.contains("[target.forms.F_VITALS]"), "{shown}");
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["target"]["kind"], "openspecimen");
        assert_eq!(
            json["target"]["password"],
            serde_json::json!({"env": "OS_PASSWORD"})
        );
        let again = CpConfig::from_toml(&shown, "shown.toml").unwrap();
        assert_eq!(serde_json::to_value(&again).unwrap(), json);
        let from_json: CpConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&from_json).unwrap(), json);
    }

    #[test]
    fn the_target_defaults_to_postgres_and_is_not_printed_then() {
        let base = "id = \"X\"\nsource = { kind = \"file\", path = \"/d\" }\n";
        let absent = CpConfig::from_toml(base, "x.toml").unwrap();
        assert!(absent.target.is_postgres());
        assert!(!absent.to_toml().contains("target"), "{}", absent.to_toml());
        assert!(
            serde_json::to_value(&absent)
                .unwrap()
                .get("target")
                .is_none()
        );
        let explicit =
            CpConfig::from_toml(&format!("{base}[target]\nkind = \"postgres\"\n"), "x.toml")
                .unwrap();
        assert!(explicit.target.is_postgres());
        // The stored JSON of a CP saved before targets existed still reads.
        let old = serde_json::to_value(&absent).unwrap();
        let read: CpConfig = serde_json::from_value(old).unwrap();
        assert!(read.target.is_postgres());
    }

    #[test]
    fn bad_targets_are_refused_with_the_line() {
        let base = "id = \"X\"\nsource = { kind = \"file\", path = \"/d\" }\n[target]\n";
        let os = "kind = \"openspecimen\"\nbase_url = \"https://os/\"\nlogin_name = \"u\"\n";
        for (rest, expected) in [
            (
                "kind = \"postgres\"\nbase_url = \"https://os/\"\n",
                "unknown field `base_url`",
            ),
            ("kind = \"mysql\"\n", "unknown variant `mysql`"),
            ("base_url = \"https://os/\"\n", "missing field `kind`"),
            (
                &format!("{os}password = \"hunter2\"\n"),
                "password must be a reference",
            ),
            (
                &format!("{os}password = {{ env = \"P\" }}\npasword = 1\n"),
                "unknown field `pasword`",
            ),
            (
                &format!("{os}password = {{ env = \"P\" }}\nmax_concurrency = 0\n"),
                "target.max_concurrency must be at least 1",
            ),
            (
                "kind = \"openspecimen\"\nbase_url = \"ftp://os/\"\nlogin_name = \"u\"\npassword = { env = \"P\" }\n",
                "target.base_url must be http(s)",
            ),
            (
                &format!(
                    "{os}password = {{ env = \"P\" }}\n[target.forms.F_A]\nform_id = 1\nform_ctxt_id = 2\nlevel = \"event\"\n"
                ),
                "unknown variant `event`",
            ),
            (
                &format!("{os}password = {{ env = \"P\" }}\n[target.forms.F_A]\nform_id = 1\n"),
                "missing field `form_ctxt_id`",
            ),
        ] {
            let text = format!("{base}{rest}");
            let e = CpConfig::from_toml(&text, "cp.toml")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("cp.toml:"), "{text}\n→ {e}");
            assert!(e.contains(expected), "{text}\n→ {e}");
            assert!(!e.contains("hunter2"), "the password is not echoed: {e}");
        }
    }

    #[test]
    fn cp_ids() {
        assert!(CpId::parse("Breast cancer 2024").is_ok());
        assert!(CpId::parse("x".repeat(255)).is_ok());
        assert!(CpId::parse("x".repeat(256)).is_err());
        assert!(CpId::parse(" ").is_err());
        assert!(CpId::parse("a\tb").is_err());
    }

    #[test]
    fn cron_schedules() {
        for ok in [
            "0 2 * * *",
            "*/5 * * * *",
            "0 0 1 jan,jul *",
            "0 6 * * mon-fri",
            "@daily",
            "0 0 * * 7",
        ] {
            assert!(CronSchedule::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "* * * *",
            "0 24 * * *",
            "0 0 0 * *",
            "*/0 * * * *",
            "5-1 * * * *",
            "x * * * *",
            "@often",
        ] {
            assert!(CronSchedule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates() {
        let t = VisitNameTemplate::parse("{{{ppid}}}-{repeat}").unwrap();
        assert_eq!(t.render(|p| format!("{p:?}")), "{Ppid}-Repeat");
        assert!(t.uses(Placeholder::Repeat) && !t.uses(Placeholder::Site));
        for bad in ["", "{ppid", "ppid}", "{}"] {
            assert!(VisitNameTemplate::parse(bad).is_err(), "{bad}");
        }
    }
}
