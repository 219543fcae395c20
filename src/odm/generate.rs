//! A seeded generator of OpenClinica-style ODM 1.3, for tests, benchmarks
//! and the OpenClinica simulator.
//!
//! The document looks like what OpenClinica 3.x writes (and, with
//! [`GeneratorConfig::oc4_dates`], 4.x): one `ClinicalData` block per site,
//! subjects with `OpenClinica:` attributes, a repeating visit, a repeating
//! specimen item group (sample type, quantity, unit, collection time,
//! barcode), audit logs with monotonic IDs and timestamps, discrepancy
//! notes, and the quirks real exports carry: the literal string `"null"`,
//! untrimmed values, partial dates, comma-separated multi-select answers,
//! `Value=""`, `IsNull="Yes"` with `OpenClinica:ReasonForNull`, removed
//! subjects, invalid forms, and values that need escaping (`&`, `<`, `"`,
//! tabs and line breaks as character references, non-ASCII text).
//!
//! Every subject is drawn from its own random stream (seed and subject
//! index), so a subject reads the same whether the whole study is written
//! or only a [`GeneratorConfig::subject_range`]: the simulator can serve a
//! per-subject call that agrees with the full extract.
//!
//! [`GeneratorConfig::edits`] marks subjects as changed since the first
//! snapshot (the simulator's "edit K subjects"): such a subject keeps its
//! structure but some of its values change, its audit-log IDs and
//! timestamps move beyond those of every unedited subject, and its 4.x
//! `UpdatedDate` follows. Unedited subjects are written byte for byte as
//! before.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::ops::Range;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::namespaces::{OC_EXT_V121, OC_EXT_V130, ODM_13};
use super::stats::Stats;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    pub seed: u64,
    /// The parent study OID (`S_…`).
    pub study_oid: String,
    pub subjects: u32,
    /// Number of sites; subjects are spread over them in order, one
    /// `ClinicalData` block per site. 0 puts every subject in one block of
    /// the parent study.
    pub sites: u32,
    /// The repeating visit occurs 1 to this many times per subject.
    pub max_visit_repeats: u32,
    /// The specimen item group repeats 1 to this many times per visit.
    pub max_specimens: u32,
    /// Share of items written as `IsNull="Yes"`.
    pub null_rate: f64,
    /// Audit logs in items, forms and subjects (×3 the size, as in real
    /// extracts).
    pub audit_logs: bool,
    /// Discrepancy notes on some items.
    pub discrepancy_notes: bool,
    /// Write the `Study` metadata before the clinical data.
    pub include_metadata: bool,
    /// OpenClinica 4.x: `OpenClinica:CreatedDate`/`UpdatedDate` on forms,
    /// form OIDs without the version suffix.
    pub oc4_dates: bool,
    /// Use the older `odm_ext_v121` extension namespace URI.
    pub legacy_extension: bool,
    /// Prefix for ODM elements (`None`: the default namespace, as
    /// OpenClinica writes it).
    pub odm_prefix: Option<String>,
    /// Prefix for the extension namespace (OpenClinica writes
    /// `OpenClinica`).
    pub ext_prefix: String,
    /// Write CRLF line ends.
    pub crlf: bool,
    /// Write only these subjects (by index), e.g. one subject for a
    /// per-subject REST call. `None`: all.
    pub subject_range: Option<Range<u32>>,
    /// Subjects changed since the first snapshot: subject index → edit
    /// number (1, 2, … in the order the edits happened, across the study).
    /// An edited subject draws some new values from a stream of its own
    /// (seed, index, edit number), and its audit IDs and timestamps start
    /// from a base that grows with the edit number and lies beyond those of
    /// every unedited subject (for studies under 10 million subjects for
    /// IDs, 80,000 for timestamps); see [`last_modified`].
    pub edits: BTreeMap<u32, u32>,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            seed: 1,
            study_oid: "S_GEN".to_owned(),
            subjects: 10,
            sites: 2,
            max_visit_repeats: 3,
            max_specimens: 3,
            null_rate: 0.05,
            audit_logs: true,
            discrepancy_notes: true,
            include_metadata: true,
            oc4_dates: false,
            legacy_extension: false,
            odm_prefix: None,
            ext_prefix: "OpenClinica".to_owned(),
            crlf: false,
            subject_range: None,
            edits: BTreeMap::new(),
        }
    }
}

/// What was written: the counts a reader must find, and the size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Generated {
    pub stats: Stats,
    pub bytes: u64,
}

/// The OID of site `index` of a study.
pub fn site_oid(config: &GeneratorConfig, index: u32) -> String {
    format!("{}_SITE{}", config.study_oid, index + 1)
}

/// The subjects (by index) of site `index`: the study's subjects spread
/// over its sites in order. Empty when the study has no sites.
pub fn site_range(config: &GeneratorConfig, index: u32) -> Range<u32> {
    if config.sites == 0 || index >= config.sites {
        return 0..0;
    }
    let (n, sites) = (u64::from(config.subjects), u64::from(config.sites));
    let at = |s: u64| (n * s / sites) as u32;
    at(u64::from(index))..at(u64::from(index) + 1)
}

/// The `SubjectKey` of subject `index`.
pub fn subject_key(index: u32) -> String {
    format!("SS_GEN{:06}", index + 1)
}

/// The `OpenClinica:StudySubjectID` (label) of subject `index`.
pub fn subject_label(index: u32) -> String {
    format!("GEN-{:05}", index + 1)
}

/// The `OpenClinica:Status` of subject `index` (`available`, `signed` or
/// `removed`), as the document writes it.
pub fn subject_status(config: &GeneratorConfig, index: u32) -> &'static str {
    status_of(&mut subject_rng(config, index))
}

/// When subject `index` last changed, `yyyy-MM-dd HH:mm:ss` without a time
/// zone (as OC 4.x writes dates): its creation for an unedited subject, its
/// latest edit otherwise. Edited subjects' 4.x `UpdatedDate` carries it.
pub fn last_modified(config: &GeneratorConfig, index: u32) -> String {
    render_time(time_base(config, index), ' ')
}

/// Audit IDs of unedited subjects are below this (subject index × 100,000);
/// edit `n` numbers its entries from `EDITED_AUDIT_BASE + n × 100,000`.
const EDITED_AUDIT_BASE: u64 = 1_000_000_000_000;
/// Timestamps of edits start in the generator's year 2030, after those of
/// every unedited subject of a study under 80,000 subjects.
const EDITED_TIME_BASE: u64 = 10 * 336 * 86_400;

fn audit_base(config: &GeneratorConfig, index: u32) -> u64 {
    match config.edits.get(&index) {
        Some(&n) => EDITED_AUDIT_BASE + u64::from(n) * 100_000,
        None => u64::from(index) * 100_000,
    }
}

fn time_base(config: &GeneratorConfig, index: u32) -> u64 {
    match config.edits.get(&index) {
        Some(&n) => EDITED_TIME_BASE + u64::from(n) * 3_600,
        None => u64::from(index) * 3_600,
    }
}

fn subject_rng(config: &GeneratorConfig, index: u32) -> SmallRng {
    SmallRng::seed_from_u64(
        config.seed ^ (u64::from(index) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    )
}

fn status_of(rng: &mut SmallRng) -> &'static str {
    match rng.random_range(0..20) {
        0 => "removed",
        1 => "signed",
        _ => "available",
    }
}

/// Seconds since the generator's epoch as a date and time; `sep` between
/// them (`T` in audit logs, a space in 4.x dates).
fn render_time(t: u64, sep: char) -> String {
    let (days, rem) = (t / 86_400, t % 86_400);
    let (y, m, d) = (2020 + days / 336, 1 + (days / 28) % 12, 1 + days % 28);
    format!(
        "{y:04}-{m:02}-{d:02}{sep}{:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// How many subjects make a document of about `target_bytes` with this
/// configuration (measured on a sample, so it tracks the configuration).
pub fn subjects_for_size(config: &GeneratorConfig, target_bytes: u64) -> io::Result<u32> {
    let sample = 200;
    let mut probe = GeneratorConfig {
        subjects: sample,
        subject_range: None,
        ..config.clone()
    };
    let with = generate(&probe, io::sink())?.bytes;
    probe.subjects = 0;
    let without = generate(&probe, io::sink())?.bytes;
    let per_subject = (with - without).div_ceil(u64::from(sample)).max(1);
    // A little over, so the document is at least the size asked for.
    let n = (target_bytes.saturating_sub(without) + target_bytes / 32).div_ceil(per_subject);
    Ok(u32::try_from(n).unwrap_or(u32::MAX).max(1))
}

/// Writes the document to `out` (buffered here; pass the raw writer).
pub fn generate<W: Write>(config: &GeneratorConfig, out: W) -> io::Result<Generated> {
    let mut g = Gen {
        out: Counting {
            inner: io::BufWriter::with_capacity(1 << 16, out),
            bytes: 0,
        },
        config,
        stats: Stats::default(),
        nl: if config.crlf { "\r\n" } else { "\n" },
        p: config
            .odm_prefix
            .as_ref()
            .map_or(String::new(), |p| format!("{p}:")),
        x: config.ext_prefix.clone(),
        audit_id: 0,
        audit_time: 0,
        edit: None,
    };
    g.document()?;
    g.out.inner.flush()?;
    Ok(Generated {
        stats: g.stats,
        bytes: g.out.bytes,
    })
}

struct Counting<W: Write> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Escapes an attribute value so that a conforming reader gets `raw` back
/// exactly (whitespace other than space as character references, since
/// literal tabs and line breaks would be normalised to spaces).
fn esc(raw: &str) -> std::borrow::Cow<'_, str> {
    if !raw
        .bytes()
        .any(|b| matches!(b, b'&' | b'<' | b'>' | b'"' | b'\t' | b'\n' | b'\r'))
    {
        return raw.into();
    }
    let mut s = String::with_capacity(raw.len() + 16);
    for c in raw.chars() {
        match c {
            '&' => s.push_str("&amp;"),
            '<' => s.push_str("&lt;"),
            '>' => s.push_str("&gt;"),
            '"' => s.push_str("&quot;"),
            '\t' => s.push_str("&#9;"),
            '\n' => s.push_str("&#10;"),
            '\r' => s.push_str("&#13;"),
            c => s.push(c),
        }
    }
    s.into()
}

/// The study design: events, forms, groups and items, fixed so that the
/// metadata and the data agree.
struct ItemSpec {
    oid: &'static str,
    name: &'static str,
    data_type: &'static str,
    code_list: Option<&'static str>,
}

struct GroupSpec {
    oid: &'static str,
    name: &'static str,
    repeating: bool,
    items: &'static [ItemSpec],
}

struct FormSpec {
    crf: &'static str,
    name: &'static str,
    version: &'static str,
    groups: &'static [GroupSpec],
}

struct EventSpec {
    oid: &'static str,
    name: &'static str,
    repeating: bool,
    forms: &'static [FormSpec],
}

const fn item(
    oid: &'static str,
    name: &'static str,
    data_type: &'static str,
    code_list: Option<&'static str>,
) -> ItemSpec {
    ItemSpec {
        oid,
        name,
        data_type,
        code_list,
    }
}

const DEMOG: &[ItemSpec] = &[
    item("I_DEMOG_INITIALS", "INITIALS", "text", None),
    item("I_DEMOG_AGE", "AGE", "integer", None),
    item("I_DEMOG_DOB", "DOB", "partialDate", None),
    item("I_DEMOG_RACE", "RACE", "text", Some("CL_RACE")),
    item("I_DEMOG_COMMENT", "COMMENT", "text", None),
];
const CONSENT: &[ItemSpec] = &[
    item("I_CONSE_DATE", "CONSENT_DATE", "date", None),
    item("I_CONSE_SIGNED", "SIGNED", "text", Some("CL_YESNO")),
];
const VITALS: &[ItemSpec] = &[
    item("I_VITAL_WEIGHT", "WEIGHT", "float", None),
    item("I_VITAL_HEIGHT", "HEIGHT", "float", None),
    item("I_VITAL_SBP", "SBP", "integer", None),
    item("I_VITAL_DBP", "DBP", "integer", None),
    item("I_VITAL_PULSE", "PULSE", "integer", None),
];
const SPECIMEN: &[ItemSpec] = &[
    item("I_SPECI_TYPE", "SAMPLE_TYPE", "text", Some("CL_SAMPLE")),
    item("I_SPECI_QTY", "QUANTITY", "float", None),
    item("I_SPECI_UNIT", "UNIT", "text", None),
    item("I_SPECI_COLLECTED", "COLLECTION_TIME", "text", None),
    item("I_SPECI_BARCODE", "BARCODE", "text", None),
];
const LABS: &[ItemSpec] = &[
    item("I_LABS_HB", "HB", "float", None),
    item("I_LABS_WBC", "WBC", "float", None),
    item("I_LABS_PLT", "PLT", "integer", None),
    item("I_LABS_NA", "NA", "float", None),
    item("I_LABS_K", "K", "float", None),
    item("I_LABS_CREA", "CREA", "float", None),
    item("I_LABS_ALT", "ALT", "integer", None),
    item("I_LABS_AST", "AST", "integer", None),
];
const AE: &[ItemSpec] = &[
    item("I_AE_TERM", "AE_TERM", "text", None),
    item("I_AE_GRADE", "AE_GRADE", "integer", Some("CL_GRADE")),
    item("I_AE_START", "AE_START", "date", None),
];

const EVENTS: &[EventSpec] = &[
    EventSpec {
        oid: "SE_SCREENING",
        name: "Screening",
        repeating: false,
        forms: &[
            FormSpec {
                crf: "F_DEMOG",
                name: "Demographics",
                version: "1",
                groups: &[GroupSpec {
                    oid: "IG_DEMOG_DEMOGRAPHICS",
                    name: "DEMOGRAPHICS",
                    repeating: false,
                    items: DEMOG,
                }],
            },
            FormSpec {
                crf: "F_CONSENT",
                name: "Consent",
                version: "2",
                groups: &[GroupSpec {
                    oid: "IG_CONSE_CONSENT",
                    name: "CONSENT",
                    repeating: false,
                    items: CONSENT,
                }],
            },
        ],
    },
    EventSpec {
        oid: "SE_VISIT",
        name: "Visit",
        repeating: true,
        forms: &[
            FormSpec {
                crf: "F_VITALS",
                name: "Vital signs",
                version: "3",
                groups: &[GroupSpec {
                    oid: "IG_VITAL_VITALS",
                    name: "VITALS",
                    repeating: false,
                    items: VITALS,
                }],
            },
            FormSpec {
                crf: "F_SPECIMEN",
                name: "Specimen collection",
                version: "1",
                groups: &[GroupSpec {
                    oid: "IG_SPECI_SAMPLES",
                    name: "SAMPLES",
                    repeating: true,
                    items: SPECIMEN,
                }],
            },
            FormSpec {
                crf: "F_LABS",
                name: "Laboratory",
                version: "1",
                groups: &[GroupSpec {
                    oid: "IG_LABS_LABS",
                    name: "LABS",
                    repeating: false,
                    items: LABS,
                }],
            },
        ],
    },
    EventSpec {
        oid: "SE_FOLLOWUP",
        name: "Follow-up",
        repeating: false,
        forms: &[FormSpec {
            crf: "F_AE",
            name: "Adverse events",
            version: "1",
            groups: &[GroupSpec {
                oid: "IG_AE_EVENTS",
                name: "EVENTS",
                repeating: true,
                items: AE,
            }],
        }],
    },
];

/// A code list: OID, data type, (coded value, decode) pairs.
type CodeListSpec = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

const CODE_LISTS: &[CodeListSpec] = &[
    (
        "CL_RACE",
        "text",
        &[
            ("1", "White"),
            ("2", "Black"),
            ("3", "Asian"),
            ("4", "Other"),
        ],
    ),
    ("CL_YESNO", "text", &[("Yes", "Yes"), ("No", "No")]),
    (
        "CL_SAMPLE",
        "text",
        &[
            ("BLOOD", "Whole blood"),
            ("SERUM", "Serum"),
            ("PLASMA", "Plasma"),
            ("URINE", "Urine"),
        ],
    ),
    (
        "CL_GRADE",
        "integer",
        &[("1", "Mild"), ("2", "Moderate"), ("3", "Severe & <life>")],
    ),
];

struct Gen<'c, W: Write> {
    out: Counting<io::BufWriter<W>>,
    config: &'c GeneratorConfig,
    stats: Stats,
    nl: &'static str,
    /// ODM element prefix with its colon, or empty.
    p: String,
    /// Extension prefix, without colon.
    x: String,
    audit_id: u64,
    audit_time: u64,
    /// The current subject's edit stream and last-modified date, when it
    /// is edited. Kept apart from the subject's own stream so that the
    /// structure (events, repeats, nulls) stays as it was.
    edit: Option<(SmallRng, String)>,
}

impl<W: Write> Gen<'_, W> {
    fn form_oid(&self, form: &FormSpec) -> String {
        if self.config.oc4_dates {
            form.crf.to_owned()
        } else {
            format!("{}_V{}", form.crf, form.version)
        }
    }

    fn document(&mut self) -> io::Result<()> {
        let (p, x, nl) = (self.p.clone(), self.x.clone(), self.nl);
        let ext = if self.config.legacy_extension {
            OC_EXT_V121
        } else {
            OC_EXT_V130
        };
        let odm_ns = match &self.config.odm_prefix {
            None => format!("xmlns=\"{ODM_13}\""),
            Some(prefix) => format!("xmlns:{prefix}=\"{ODM_13}\""),
        };
        write!(
            self.out,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>{nl}<{p}ODM {odm_ns} xmlns:{x}=\"{ext}\" \
             xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" FileOID=\"GEN{seed}\" \
             Description=\"Generated\" CreationDateTime=\"2024-01-01T00:00:00+00:00\" \
             FileType=\"Snapshot\" ODMVersion=\"1.3\">{nl}",
            seed = self.config.seed
        )?;
        if self.config.include_metadata {
            self.metadata()?;
        }
        let n = self.config.subjects;
        let blocks: Vec<(String, Range<u32>)> = if self.config.sites == 0 {
            vec![(self.config.study_oid.clone(), 0..n)]
        } else {
            (0..self.config.sites)
                .map(|s| (site_oid(self.config, s), site_range(self.config, s)))
                .collect()
        };
        for (oid, range) in blocks {
            let wanted: Vec<u32> = range
                .filter(|i| {
                    self.config
                        .subject_range
                        .as_ref()
                        .is_none_or(|r| r.contains(i))
                })
                .collect();
            if wanted.is_empty() && self.config.subject_range.is_some() {
                continue;
            }
            write!(
                self.out,
                "  <{p}ClinicalData StudyOID=\"{oid}\" MetaDataVersionOID=\"v1.0.0\">{nl}"
            )?;
            for i in wanted {
                self.subject(i)?;
            }
            write!(self.out, "  </{p}ClinicalData>{nl}")?;
        }
        write!(self.out, "</{p}ODM>{nl}")?;
        Ok(())
    }

    fn metadata(&mut self) -> io::Result<()> {
        let (p, x, nl) = (self.p.clone(), self.x.clone(), self.nl);
        let s = &self.config.study_oid;
        write!(
            self.out,
            "  <{p}Study OID=\"{s}\">{nl}    <{p}GlobalVariables>{nl}      <{p}StudyName>Generated study &amp; co</{p}StudyName>{nl}\
             \x20     <{p}StudyDescription>Synthetic OpenClinica-style study</{p}StudyDescription>{nl}\
             \x20     <{p}ProtocolName>GEN-PROTOCOL</{p}ProtocolName>{nl}    </{p}GlobalVariables>{nl}\
             \x20   <{p}BasicDefinitions/>{nl}    <{p}MetaDataVersion OID=\"v1.0.0\" Name=\"MetaDataVersion_v1.0.0\">{nl}\
             \x20     <{p}Protocol>{nl}"
        )?;
        for (i, e) in EVENTS.iter().enumerate() {
            write!(
                self.out,
                "        <{p}StudyEventRef StudyEventOID=\"{}\" OrderNumber=\"{}\" Mandatory=\"Yes\"/>{nl}",
                e.oid,
                i + 1
            )?;
        }
        write!(self.out, "      </{p}Protocol>{nl}")?;
        for e in EVENTS {
            write!(
                self.out,
                "      <{p}StudyEventDef OID=\"{}\" Name=\"{}\" Repeating=\"{}\" Type=\"Scheduled\">{nl}",
                e.oid,
                e.name,
                if e.repeating { "Yes" } else { "No" }
            )?;
            for f in e.forms {
                let oid = self.form_oid(f);
                write!(
                    self.out,
                    "        <{p}FormRef FormOID=\"{oid}\" Mandatory=\"Yes\"/>{nl}"
                )?;
            }
            write!(self.out, "      </{p}StudyEventDef>{nl}")?;
        }
        for f in EVENTS.iter().flat_map(|e| e.forms) {
            let oid = self.form_oid(f);
            write!(
                self.out,
                "      <{p}FormDef OID=\"{oid}\" Name=\"{} - v{}\" Repeating=\"No\">{nl}",
                f.name, f.version
            )?;
            for g in f.groups {
                write!(
                    self.out,
                    "        <{p}ItemGroupRef ItemGroupOID=\"{}\" Mandatory=\"No\"/>{nl}",
                    g.oid
                )?;
            }
            write!(
                self.out,
                "        <{x}:FormDetails FormOID=\"{oid}\" ParentFormOID=\"{}\">{nl}\
                 \x20         <{x}:PresentInEventDefinition StudyEventOID=\"SE_X\" IsDefaultVersion=\"Yes\"/>{nl}\
                 \x20       </{x}:FormDetails>{nl}      </{p}FormDef>{nl}",
                f.crf
            )?;
        }
        for g in EVENTS.iter().flat_map(|e| e.forms).flat_map(|f| f.groups) {
            write!(
                self.out,
                "      <{p}ItemGroupDef OID=\"{}\" Name=\"{}\" Repeating=\"{}\" SASDatasetName=\"{}\">{nl}",
                g.oid,
                g.name,
                if g.repeating { "Yes" } else { "No" },
                g.name
            )?;
            for it in g.items {
                write!(
                    self.out,
                    "        <{p}ItemRef ItemOID=\"{}\" Mandatory=\"No\"/>{nl}",
                    it.oid
                )?;
            }
            write!(self.out, "      </{p}ItemGroupDef>{nl}")?;
        }
        for it in EVENTS
            .iter()
            .flat_map(|e| e.forms)
            .flat_map(|f| f.groups)
            .flat_map(|g| g.items)
        {
            write!(
                self.out,
                "      <{p}ItemDef OID=\"{}\" Name=\"{}\" DataType=\"{}\" Length=\"20\" SASFieldName=\"{}\" Comment=\"{}\">{nl}",
                it.oid, it.name, it.data_type, it.name, it.name
            )?;
            if let Some(cl) = it.code_list {
                write!(
                    self.out,
                    "        <{p}CodeListRef CodeListOID=\"{cl}\"/>{nl}"
                )?;
            }
            write!(self.out, "      </{p}ItemDef>{nl}")?;
        }
        for (oid, data_type, items) in CODE_LISTS {
            write!(
                self.out,
                "      <{p}CodeList OID=\"{oid}\" Name=\"{oid}\" DataType=\"{data_type}\">{nl}"
            )?;
            for (code, decode) in *items {
                write!(
                    self.out,
                    "        <{p}CodeListItem CodedValue=\"{code}\">{nl}          <{p}Decode><{p}TranslatedText>{}</{p}TranslatedText></{p}Decode>{nl}        </{p}CodeListItem>{nl}",
                    esc(decode)
                )?;
            }
            write!(self.out, "      </{p}CodeList>{nl}")?;
        }
        write!(self.out, "    </{p}MetaDataVersion>{nl}  </{p}Study>{nl}")
    }

    fn timestamp(&mut self) -> String {
        // Monotonic: a few seconds to a few hours after the previous one.
        self.audit_time += 17;
        render_time(self.audit_time, 'T')
    }

    fn audit(
        &mut self,
        indent: &str,
        entity: &str,
        kinds: &[(&str, Option<&str>)],
    ) -> io::Result<()> {
        if !self.config.audit_logs {
            return Ok(());
        }
        let (x, nl) = (self.x.clone(), self.nl);
        write!(
            self.out,
            "{indent}<{x}:AuditLogs EntityID=\"{}\">{nl}",
            esc(entity)
        )?;
        for (kind, new_value) in kinds {
            self.audit_id += 1;
            self.stats.audit_logs += 1;
            let ts = self.timestamp();
            write!(
                self.out,
                "{indent}  <{x}:AuditLog ID=\"AL_{}\" UserID=\"USR_3\" UserName=\"dm\" Name=\"Data Manager\" DateTimeStamp=\"{ts}\" AuditType=\"{kind}\"",
                self.audit_id
            )?;
            if let Some(v) = new_value {
                write!(
                    self.out,
                    " ReasonForChange=\"initial value\" NewValue=\"{}\"",
                    esc(v)
                )?;
            }
            write!(self.out, "/>{nl}")?;
        }
        write!(self.out, "{indent}</{x}:AuditLogs>{nl}")
    }

    fn subject(&mut self, index: u32) -> io::Result<()> {
        let (p, x, nl) = (self.p.clone(), self.x.clone(), self.nl);
        let mut rng = subject_rng(self.config, index);
        // Audit IDs and times continue from the subject's own base so that a
        // subject written alone carries the same IDs as in the full file.
        self.audit_id = audit_base(self.config, index);
        self.audit_time = time_base(self.config, index);
        self.edit = self.config.edits.get(&index).map(|&n| {
            let stream = SmallRng::seed_from_u64(
                self.config.seed
                    ^ (u64::from(index) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ u64::from(n).wrapping_mul(0xD1B5_4A32_D192_ED03),
            );
            (stream, last_modified(self.config, index))
        });
        self.stats.subjects += 1;
        let key = subject_key(index);
        let label = subject_label(index);
        let status = status_of(&mut rng);
        let sex = ["m", "f", "null"][rng.random_range(0..3)];
        write!(
            self.out,
            "    <{p}SubjectData SubjectKey=\"{key}\" {x}:StudySubjectID=\"{label}\""
        )?;
        if rng.random_bool(0.5) {
            write!(
                self.out,
                " {x}:UniqueIdentifier=\"PID{:07}\"",
                rng.random_range(0..10_000_000)
            )?;
        }
        write!(self.out, " {x}:Status=\"{status}\" {x}:Sex=\"{sex}\"")?;
        match rng.random_range(0..3) {
            0 => write!(
                self.out,
                " {x}:DateOfBirth=\"{}-{:02}-{:02}\"",
                rng.random_range(1930..2005),
                rng.random_range(1..13),
                rng.random_range(1..29)
            )?,
            1 => write!(
                self.out,
                " {x}:YearOfBirth=\"{}\"",
                rng.random_range(1930..2005)
            )?,
            _ => write!(self.out, " {x}:YearOfBirth=\"Not Used\"")?,
        }
        write!(
            self.out,
            " {x}:EnrollmentDate=\"2021-{:02}-{:02}\">{nl}",
            rng.random_range(1..13),
            rng.random_range(1..29)
        )?;
        for event in EVENTS {
            let repeats = if event.repeating {
                rng.random_range(1..=self.config.max_visit_repeats.max(1))
            } else if event.oid == "SE_FOLLOWUP" && rng.random_bool(0.3) {
                0
            } else {
                1
            };
            for r in 1..=repeats {
                self.event(&mut rng, event, r)?;
            }
        }
        self.audit(
            "      ",
            &key,
            &[
                ("Study subject created", None),
                ("Subject status changed", Some(status)),
            ],
        )?;
        write!(self.out, "    </{p}SubjectData>{nl}")
    }

    fn event(&mut self, rng: &mut SmallRng, event: &EventSpec, repeat: u32) -> io::Result<()> {
        let (p, x, nl) = (self.p.clone(), self.x.clone(), self.nl);
        self.stats.study_events += 1;
        write!(
            self.out,
            "      <{p}StudyEventData StudyEventOID=\"{}\"",
            event.oid
        )?;
        if event.repeating {
            write!(self.out, " StudyEventRepeatKey=\"{repeat}\"")?;
        }
        let day = rng.random_range(1..29);
        let month = rng.random_range(1..13);
        if rng.random_bool(0.3) {
            write!(
                self.out,
                " {x}:StartDate=\"2022-{month:02}-{day:02} 09:30:00.0\""
            )?;
        } else {
            write!(self.out, " {x}:StartDate=\"2022-{month:02}-{day:02}\"")?;
        }
        if rng.random_bool(0.5) {
            write!(self.out, " {x}:EndDate=\"2022-{month:02}-{day:02}\"")?;
        }
        let status = [
            "scheduled",
            "data entry started",
            "completed",
            "signed",
            "stopped",
        ][rng.random_range(0..5)];
        write!(self.out, " {x}:Status=\"{status}\">{nl}")?;
        for form in event.forms {
            self.form(rng, form)?;
        }
        write!(self.out, "      </{p}StudyEventData>{nl}")
    }

    fn form(&mut self, rng: &mut SmallRng, form: &FormSpec) -> io::Result<()> {
        let (p, x, nl) = (self.p.clone(), self.x.clone(), self.nl);
        self.stats.forms += 1;
        let oid = self.form_oid(form);
        let status = match rng.random_range(0..12) {
            0 => "invalid",
            1 => "initial data entry",
            2 => "signed",
            _ => "data entry complete",
        };
        write!(
            self.out,
            "        <{p}FormData FormOID=\"{oid}\" {x}:Version=\"{}\" {x}:InterviewerName=\"dm\" {x}:InterviewDate=\"2022-{:02}-{:02}\" {x}:Status=\"{status}\"",
            form.version,
            rng.random_range(1..13),
            rng.random_range(1..29)
        )?;
        if self.config.oc4_dates {
            let created = rng.random_range(1..29);
            let updated = format!("2022-04-{:02} 11:22:33", rng.random_range(1..29));
            // An edit touches the subject's forms: their UpdatedDate moves
            // to the edit's time.
            let updated = match &self.edit {
                Some((_, date)) => date.clone(),
                None => updated,
            };
            write!(
                self.out,
                " {x}:CreatedDate=\"2022-03-{created:02} 10:00:00\" {x}:UpdatedDate=\"{updated}\""
            )?;
        }
        write!(self.out, ">{nl}")?;
        for group in form.groups {
            let repeats = if group.repeating {
                let max = if group.oid == "IG_SPECI_SAMPLES" {
                    self.config.max_specimens.max(1)
                } else {
                    3
                };
                rng.random_range(1..=max)
            } else {
                1
            };
            for r in 1..=repeats {
                self.group(rng, group, r)?;
            }
        }
        self.audit(
            "          ",
            &oid,
            &[("Event CRF marked complete", Some("unavailable"))],
        )?;
        write!(self.out, "        </{p}FormData>{nl}")
    }

    fn group(&mut self, rng: &mut SmallRng, group: &GroupSpec, repeat: u32) -> io::Result<()> {
        let (p, nl) = (self.p.clone(), self.nl);
        self.stats.item_groups += 1;
        write!(
            self.out,
            "          <{p}ItemGroupData ItemGroupOID=\"{}\" ItemGroupRepeatKey=\"{repeat}\" TransactionType=\"Insert\">{nl}",
            group.oid
        )?;
        for spec in group.items {
            self.item(rng, spec)?;
        }
        write!(self.out, "          </{p}ItemGroupData>{nl}")
    }

    fn value(rng: &mut SmallRng, spec: &ItemSpec) -> String {
        match spec.oid {
            "I_DEMOG_INITIALS" => {
                ["AB", "CD", "EF", "ÅÖ", "null"][rng.random_range(0..5)].to_owned()
            }
            // Untrimmed numbers, as real exports have them.
            "I_DEMOG_AGE" => {
                let age = rng.random_range(18..90);
                if rng.random_bool(0.2) {
                    format!("{age} ")
                } else {
                    age.to_string()
                }
            }
            // Partial dates.
            "I_DEMOG_DOB" => match rng.random_range(0..3) {
                0 => rng.random_range(1930..2005).to_string(),
                1 => format!(
                    "{}-{:02}",
                    rng.random_range(1930..2005),
                    rng.random_range(1..13)
                ),
                _ => format!(
                    "{}-{:02}-{:02}",
                    rng.random_range(1930..2005),
                    rng.random_range(1..13),
                    rng.random_range(1..29)
                ),
            },
            // Multi-select answers are comma lists.
            "I_DEMOG_RACE" => ["1", "2", "1,2", "3,4", "1,2,3"][rng.random_range(0..5)].to_owned(),
            "I_DEMOG_COMMENT" => [
                "",
                "null",
                "Tom & Jerry <\"quoted\"> 'single'",
                "line one\nline two\ttabbed\r\nwindows",
                "  leading and trailing  ",
                "Größe – 175 cm ≥ normal",
                "no comment",
            ][rng.random_range(0..7)]
            .to_owned(),
            "I_CONSE_SIGNED" => ["Yes", "No"][rng.random_range(0..2)].to_owned(),
            "I_SPECI_TYPE" => {
                ["BLOOD", "SERUM", "PLASMA", "URINE"][rng.random_range(0..4)].to_owned()
            }
            "I_SPECI_QTY" => format!("{}.{}", rng.random_range(0..20), rng.random_range(0..10)),
            "I_SPECI_UNIT" => ["ml", "µl", "ml "][rng.random_range(0..3)].to_owned(),
            "I_SPECI_COLLECTED" => format!(
                "2022-{:02}-{:02} {:02}:{:02}",
                rng.random_range(1..13),
                rng.random_range(1..29),
                rng.random_range(0..24),
                rng.random_range(0..60)
            ),
            "I_SPECI_BARCODE" => format!("BC{:010}", rng.random_range(0..10_000_000_000u64)),
            "I_AE_TERM" => {
                ["Headache", "Nausea", "Rash", "Fatigue"][rng.random_range(0..4)].to_owned()
            }
            "I_AE_GRADE" => rng.random_range(1..4).to_string(),
            _ => match spec.data_type {
                "integer" => rng.random_range(40..200).to_string(),
                "float" => format!(
                    "{}.{:02}",
                    rng.random_range(0..300),
                    rng.random_range(0..100)
                ),
                "date" => format!(
                    "2022-{:02}-{:02}",
                    rng.random_range(1..13),
                    rng.random_range(1..29)
                ),
                _ => "text".to_owned(),
            },
        }
    }

    fn item(&mut self, rng: &mut SmallRng, spec: &ItemSpec) -> io::Result<()> {
        let (p, x, nl) = (self.p.clone(), self.x.clone(), self.nl);
        self.stats.items += 1;
        let null = rng.random_bool(self.config.null_rate.clamp(0.0, 1.0));
        let mut value = Self::value(rng, spec);
        // An edited subject has about a quarter of its values changed; the
        // subject's own stream is not touched, so nothing else moves.
        if let Some((stream, _)) = &mut self.edit
            && stream.random_bool(0.25)
        {
            value = Self::value(stream, spec);
        }
        let indent = "            ";
        if null {
            self.stats.null_items += 1;
            let reason = ["NI", "NA", "UNK", "NASK"][rng.random_range(0..4)];
            write!(
                self.out,
                "{indent}<{p}ItemData ItemOID=\"{}\" IsNull=\"Yes\" {x}:ReasonForNull=\"{reason}\"",
                spec.oid
            )?;
        } else {
            write!(
                self.out,
                "{indent}<{p}ItemData ItemOID=\"{}\" Value=\"{}\"",
                spec.oid,
                esc(&value)
            )?;
        }
        let audited = self.config.audit_logs;
        let noted = self.config.discrepancy_notes && rng.random_bool(0.02);
        if !audited && !noted {
            return write!(self.out, "/>{nl}");
        }
        write!(self.out, ">{nl}")?;
        let shown = if null { None } else { Some(value.as_str()) };
        self.audit(
            "              ",
            spec.oid,
            &[("Item data value updated", shown)],
        )?;
        if noted {
            write!(
                self.out,
                "              <{x}:DiscrepancyNotes EntityID=\"{oid}\">{nl}\
                 \x20               <{x}:DiscrepancyNote ID=\"DN_{id}\" Status=\"New\" NoteType=\"Query\" DateUpdated=\"2022-05-01\" EntityName=\"value\" NumberOfChildNotes=\"1\">{nl}\
                 \x20                 <{x}:ChildNote ID=\"CDN_{id}\" Status=\"New\" DateCreated=\"2022-05-01\" UserRef=\"dm\">{nl}\
                 \x20                   <{x}:Description>Please check &lt;value&gt;</{x}:Description>{nl}\
                 \x20                   <{x}:DetailedNote>Looks odd</{x}:DetailedNote>{nl}\
                 \x20                 </{x}:ChildNote>{nl}\
                 \x20               </{x}:DiscrepancyNote>{nl}\
                 \x20             </{x}:DiscrepancyNotes>{nl}",
                oid = spec.oid,
                id = self.audit_id
            )?;
        }
        write!(self.out, "{indent}</{p}ItemData>{nl}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subjects_of(config: &GeneratorConfig) -> Vec<String> {
        let mut out = Vec::new();
        generate(config, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        text.split("<SubjectData ")
            .skip(1)
            .map(|s| s.split("</SubjectData>").next().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn an_edit_changes_its_subject_only_and_moves_its_audits_past_all_others() {
        let base = GeneratorConfig {
            subjects: 4,
            oc4_dates: true,
            ..GeneratorConfig::default()
        };
        let mut edited = base.clone();
        edited.edits.insert(2, 1);
        let (before, after) = (subjects_of(&base), subjects_of(&edited));
        for i in [0, 1, 3] {
            assert_eq!(before[i], after[i], "subject {i}");
        }
        assert_ne!(before[2], after[2]);
        assert!(after[2].contains(&format!("UpdatedDate=\"{}\"", last_modified(&edited, 2))));
        assert!(after[2].contains("ID=\"AL_1000000100001\""));
        assert!(last_modified(&edited, 2) > last_modified(&base, 3));
        assert_eq!(subject_status(&edited, 2), subject_status(&base, 2));
    }

    #[test]
    fn site_ranges_cover_the_subjects_in_order() {
        let c = GeneratorConfig {
            subjects: 10,
            sites: 3,
            ..GeneratorConfig::default()
        };
        let ranges: Vec<Range<u32>> = (0..4).map(|s| site_range(&c, s)).collect();
        assert_eq!(ranges, [0..3, 3..6, 6..10, 0..0]);
    }
}
