//! [`map_subject`]: one ODM subject → its OpenSpecimen-shaped records and
//! the error rows of whatever could not be mapped.

use std::collections::{BTreeMap, BTreeSet};

use super::index::MetadataIndex;
use super::records::{
    FormRecord, ParticipantRecord, RecordError, RecordStatus, SpecimenRecord, Stage,
    SubjectRecords, VisitRecord,
};
use crate::cp::{CpConfig, CrfImport, ItemRef, Placeholder, PpidSource, SpecimenMapping};
use crate::odm::{Form, ItemGroup, StudyEvent, Subject};

/// What one subject maps to. `records` is `None` only when the subject
/// cannot be registered at all (no SubjectKey, no PPID); `errors` then says
/// why. Otherwise every good record is there, and `errors` holds one row per
/// field or record that could not be mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub records: Option<SubjectRecords>,
    pub errors: Vec<RecordError>,
}

/// Status words (any case; `_`, `-` and spaces alike) that mark a subject,
/// event or form as no longer live: OpenClinica 3.x `removed`,
/// `auto-removed`, `invalid` (a removed CRF), and the `deleted`,
/// `auto-deleted`, `archived` words of other versions.
pub const REMOVED_STATUSES: &[&str] = &[
    "removed",
    "auto removed",
    "invalid",
    "deleted",
    "auto deleted",
    "archived",
];

/// Form status words (any case; `_`, `-` and spaces alike) that count as
/// finished data entry for `import = "completed"`: 3.x `data entry
/// complete`, `signed`, `locked`; 4.x `completed`, `signed`, `locked`.
/// Initial data entry (`initial data entry`, `data entry started`, 3.x
/// `initial data entry completed` awaiting double data entry) does not.
pub const COMPLETED_STATUSES: &[&str] = &[
    "data entry complete",
    "data entry completed",
    "complete",
    "completed",
    "signed",
    "locked",
];

/// Lower case, `_`/`-` as spaces, runs of spaces collapsed.
fn normalise_status(status: &str) -> String {
    status
        .to_lowercase()
        .replace(['_', '-'], " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether an OpenClinica status word marks removed or invalid data.
pub fn is_removed(status: Option<&str>) -> bool {
    status.is_some_and(|s| REMOVED_STATUSES.contains(&normalise_status(s).as_str()))
}

/// Whether a form status word says data entry is finished.
pub fn is_completed(status: Option<&str>) -> bool {
    status.is_some_and(|s| COMPLETED_STATUSES.contains(&normalise_status(s).as_str()))
}

fn status_of(removed: bool) -> RecordStatus {
    if removed {
        RecordStatus::Removed
    } else {
        RecordStatus::Active
    }
}

/// Where an error happened, to fill a [`RecordError`].
#[derive(Clone, Copy, Default)]
struct Place<'a> {
    event_oid: Option<&'a str>,
    repeat: Option<&'a str>,
    form_oid: Option<&'a str>,
    item_group_oid: Option<&'a str>,
    item_oid: Option<&'a str>,
}

struct Ctx<'a> {
    subject_key: &'a str,
    ppid: Option<&'a str>,
    errors: Vec<RecordError>,
}

impl Ctx<'_> {
    fn error(&mut self, place: Place<'_>, message: impl Into<String>) {
        let own = |s: Option<&str>| s.map(str::to_owned);
        self.errors.push(RecordError {
            subject_key: Some(self.subject_key.to_owned()),
            ppid: own(self.ppid),
            event_oid: own(place.event_oid),
            repeat: own(place.repeat),
            form_oid: own(place.form_oid),
            item_group_oid: own(place.item_group_oid),
            item_oid: own(place.item_oid),
            stage: Stage::Map,
            message: message.into(),
        });
    }
}

/// Maps one subject. Pure and total: no IO, never panics, and a bad value
/// costs only its own field or record (plus an error row), never the rest
/// of the subject. Error messages name fields and OIDs, never clinical
/// values.
pub fn map_subject(cp: &CpConfig, meta: &MetadataIndex, subject: &Subject) -> Mapped {
    let key = subject.subject_key.as_str();
    let ppid = match cp.ppid {
        PpidSource::StudySubjectId => non_empty(&subject.study_subject_id),
        PpidSource::SubjectKey => Some(key).filter(|k| !k.trim().is_empty()),
        PpidSource::UniqueIdentifier => non_empty(&subject.unique_identifier),
    };
    let mut ctx = Ctx {
        subject_key: key,
        ppid,
        errors: Vec::new(),
    };
    if key.trim().is_empty() {
        ctx.error(
            Place::default(),
            "SubjectData has no SubjectKey; subject skipped",
        );
        return Mapped {
            records: None,
            errors: ctx.errors,
        };
    }
    let Some(ppid) = ppid else {
        let field = match cp.ppid {
            PpidSource::StudySubjectId => "OpenClinica:StudySubjectID",
            PpidSource::SubjectKey => "SubjectKey",
            PpidSource::UniqueIdentifier => "OpenClinica:UniqueIdentifier",
        };
        ctx.error(
            Place::default(),
            format!("no PPID: {field} is missing or empty; subject skipped"),
        );
        return Mapped {
            records: None,
            errors: ctx.errors,
        };
    };

    let subject_removed = is_removed(subject.status.as_deref());
    let site = match cp.site_map.get(&subject.study_oid) {
        Some(site) => Some(site.clone()),
        None => {
            if cp.default_site.is_none() {
                ctx.error(
                    Place::default(),
                    format!(
                        "study/site OID {} is not in the CP's site_map and there is no \
                         default_site; the participant has no site",
                        subject.study_oid
                    ),
                );
            }
            cp.default_site.clone()
        }
    };

    let gender = match subject.sex.as_deref().map(|s| s.trim().to_lowercase()) {
        None => None,
        Some(s) if s.is_empty() || s == "null" => None,
        Some(s) if s == "m" || s == "male" => Some("Male".to_owned()),
        Some(s) if s == "f" || s == "female" => Some("Female".to_owned()),
        Some(_) => {
            if !subject_removed {
                ctx.error(
                    Place::default(),
                    "OpenClinica:Sex is neither m, f nor null; gender left empty",
                );
            }
            None
        }
    };

    let participant = ParticipantRecord {
        subject_key: key.to_owned(),
        ppid: ppid.to_owned(),
        study_oid: subject.study_oid.clone(),
        site: site.clone(),
        uid: non_empty(&subject.unique_identifier).map(str::to_owned),
        birth_date: birth_date(subject),
        gender,
        registration_date: non_empty(&subject.enrollment_date).map(str::to_owned),
        oc_status: subject.status.clone(),
        status: status_of(subject_removed),
        fields: cp
            .participant_fields
            .iter()
            .map(|(field, item)| (field.clone(), participant_field(meta, subject, item)))
            .collect(),
    };

    let mut records = SubjectRecords {
        participant,
        visits: Vec::new(),
        specimens: Vec::new(),
        form_records: Vec::new(),
    };
    let mut visit_keys = BTreeSet::new();
    let mut form_keys = BTreeSet::new();
    let mut specimen_keys = BTreeSet::new();

    for event in &subject.events {
        let repeat = event.repeat_key.clone().unwrap_or_default();
        let event_place = Place {
            event_oid: Some(&event.oid),
            repeat: Some(&repeat),
            ..Place::default()
        };
        if !visit_keys.insert((event.oid.as_str(), repeat.clone())) {
            ctx.error(
                event_place,
                "the same study event and repeat key appear twice; the second is skipped",
            );
            continue;
        }
        let event_removed = subject_removed || is_removed(event.status.as_deref());
        let event_label = cp
            .event_map
            .get(&event.oid)
            .cloned()
            .or_else(|| meta.event_name(&event.oid).map(str::to_owned))
            .unwrap_or_else(|| event.oid.clone());
        let name = cp.visit_name.render(|p| match p {
            Placeholder::Ppid => ppid.to_owned(),
            Placeholder::SubjectKey => key.to_owned(),
            Placeholder::StudySubjectId => subject.study_subject_id.clone().unwrap_or_default(),
            Placeholder::EventOid => event.oid.clone(),
            Placeholder::EventLabel => event_label.clone(),
            Placeholder::Repeat => event
                .repeat_key
                .clone()
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "1".to_owned()),
            Placeholder::Site => site.clone().unwrap_or_default(),
        });
        records.visits.push(VisitRecord {
            subject_key: key.to_owned(),
            event_oid: event.oid.clone(),
            event_repeat_key: repeat.clone(),
            event_label,
            name,
            visit_date: event.start_date.clone(),
            end_date: event.end_date.clone(),
            site: site.clone(),
            oc_status: event.status.clone(),
            status: status_of(event_removed),
        });

        for form in &event.forms {
            let crf = meta.crf_of(&form.oid);
            let form_removed = event_removed || is_removed(form.status.as_deref());
            let as_records = crf_selected(cp, crf)
                && (cp.crfs.import == CrfImport::All
                    || form_removed
                    || is_completed(form.status.as_deref()));
            for group in &form.item_groups {
                let group_repeat = group.repeat_key.clone().unwrap_or_default();
                let natural_key = (
                    event.oid.as_str(),
                    repeat.clone(),
                    crf.to_owned(),
                    group.oid.as_str(),
                    group_repeat.clone(),
                );
                let group_place = Place {
                    event_oid: Some(&event.oid),
                    repeat: Some(&group_repeat),
                    form_oid: Some(&form.oid),
                    item_group_oid: Some(&group.oid),
                    item_oid: None,
                };
                let mapping = cp.specimens.iter().find(|m| {
                    m.item_group_oid == group.oid && m.crf_oid.as_deref().is_none_or(|c| c == crf)
                });
                if let Some(mapping) = mapping {
                    if specimen_keys.insert(natural_key.clone()) {
                        let spec = Occurrence {
                            event,
                            repeat: &repeat,
                            form,
                            crf,
                            group,
                            group_repeat: &group_repeat,
                            removed: form_removed,
                        };
                        records
                            .specimens
                            .push(specimen(&mut ctx, key, mapping, &spec));
                    } else {
                        ctx.error(
                            group_place,
                            "the same item group repeat appears twice in one event and CRF; \
                             the second is skipped",
                        );
                        continue;
                    }
                }
                let wanted = mapping.is_none_or(|m| m.also_as_form_record);
                if !(as_records && wanted) {
                    continue;
                }
                if !form_keys.insert(natural_key) {
                    if mapping.is_none() {
                        ctx.error(
                            group_place,
                            "the same item group repeat appears twice in one event and CRF; \
                             the second is skipped",
                        );
                    }
                    continue;
                }
                records.form_records.push(form_record(
                    &mut ctx,
                    meta,
                    key,
                    &Occurrence {
                        event,
                        repeat: &repeat,
                        form,
                        crf,
                        group,
                        group_repeat: &group_repeat,
                        removed: form_removed,
                    },
                ));
            }
        }
    }
    Mapped {
        records: Some(records),
        errors: ctx.errors,
    }
}

/// The value unless it is absent or blank.
fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.trim().is_empty())
}

/// `DateOfBirth`, else `YearOfBirth`; `"Not Used"`, `"null"` and empty
/// values count as absent. Partial dates stay as written.
fn birth_date(subject: &Subject) -> Option<String> {
    let usable = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|v| {
                !v.is_empty()
                    && !v.eq_ignore_ascii_case("not used")
                    && !v.eq_ignore_ascii_case("null")
            })
            .map(str::to_owned)
    };
    usable(&subject.date_of_birth).or_else(|| usable(&subject.year_of_birth))
}

/// Whether a CRF passes the include and exclude lists.
fn crf_selected(cp: &CpConfig, crf: &str) -> bool {
    (cp.crfs.include.is_empty() || cp.crfs.include.iter().any(|c| c == crf))
        && !cp.crfs.exclude.iter().any(|c| c == crf)
}

/// The first non-null value of a participant field's item, in document
/// order, in a form that is live and matches the field's qualifiers.
fn participant_field(meta: &MetadataIndex, subject: &Subject, item: &ItemRef) -> Option<String> {
    subject
        .events
        .iter()
        .filter(|e| item.event.as_deref().is_none_or(|q| q == e.oid))
        .filter(|e| !is_removed(e.status.as_deref()))
        .flat_map(|e| e.forms.iter())
        .filter(|f| !is_removed(f.status.as_deref()))
        .filter(|f| item.crf.as_deref().is_none_or(|q| q == meta.crf_of(&f.oid)))
        .flat_map(|f| f.item_groups.iter())
        .flat_map(|g| g.items.iter())
        .filter(|i| i.oid == item.item)
        .find_map(|i| i.value.clone())
        .map(|v| lookup(&item.values, &v).map(str::to_owned).unwrap_or(v))
}

/// A value map lookup: the raw value, else the value trimmed.
fn lookup<'m>(map: &'m BTreeMap<String, String>, raw: &str) -> Option<&'m str> {
    map.get(raw)
        .or_else(|| map.get(raw.trim()))
        .map(String::as_str)
}

/// One item group repeat and where it sits.
struct Occurrence<'a> {
    event: &'a StudyEvent,
    repeat: &'a str,
    form: &'a Form,
    crf: &'a str,
    group: &'a ItemGroup,
    group_repeat: &'a str,
    /// The form, its event or its subject is removed.
    removed: bool,
}

impl Occurrence<'_> {
    fn place<'p>(&'p self, item_oid: Option<&'p str>) -> Place<'p> {
        Place {
            event_oid: Some(&self.event.oid),
            repeat: Some(self.group_repeat),
            form_oid: Some(&self.form.oid),
            item_group_oid: Some(&self.group.oid),
            item_oid,
        }
    }

    /// The value of an item in this repeat (`None` when null or absent).
    fn value(&self, item_oid: &str) -> Option<&str> {
        self.group
            .items
            .iter()
            .find(|i| i.oid == item_oid)
            .and_then(|i| i.value.as_deref())
    }
}

fn specimen(
    ctx: &mut Ctx<'_>,
    subject_key: &str,
    mapping: &SpecimenMapping,
    at: &Occurrence<'_>,
) -> SpecimenRecord {
    // A mapped value, or an error row when a strict value map lacks it.
    let mapped = |ctx: &mut Ctx<'_>, item_oid: &str, what: &str| -> Option<String> {
        let raw = at.value(item_oid)?;
        match mapping.value_maps.get(item_oid) {
            None => Some(raw.to_owned()),
            Some(map) => match lookup(map, raw) {
                Some(v) => Some(v.to_owned()),
                None if mapping.strict_value_maps => {
                    if !at.removed {
                        ctx.error(
                            at.place(Some(item_oid)),
                            format!(
                                "specimen {what}: the value is not in the value map of {item_oid} \
                                 (event repeat {}); {what} left empty",
                                display_repeat(at.repeat)
                            ),
                        );
                    }
                    None
                }
                None => Some(raw.to_owned()),
            },
        }
    };
    let label = mapping
        .label_item
        .as_deref()
        .and_then(|i| mapped(ctx, i, "label"));
    let specimen_type = mapping
        .type_item
        .as_deref()
        .and_then(|i| mapped(ctx, i, "type"));
    let quantity = mapping.quantity_item.as_deref().and_then(|item_oid| {
        let value = mapped(ctx, item_oid, "quantity")?;
        let value = value.trim();
        if value.is_empty() {
            return None;
        }
        match value.parse::<f64>() {
            Ok(q) if q.is_finite() && q >= 0.0 => Some(value.to_owned()),
            _ => {
                if !at.removed {
                    ctx.error(
                        at.place(Some(item_oid)),
                        format!(
                            "specimen quantity is not a non-negative number (event repeat {}); \
                             quantity left empty",
                            display_repeat(at.repeat)
                        ),
                    );
                }
                None
            }
        }
    });
    let collection_time = mapping
        .collection_time_item
        .as_deref()
        .and_then(|i| mapped(ctx, i, "collection time"));
    let fields = mapping
        .fields
        .iter()
        .map(|(field, item_oid)| (field.clone(), mapped(ctx, item_oid, field)))
        .collect();
    SpecimenRecord {
        subject_key: subject_key.to_owned(),
        event_oid: at.event.oid.clone(),
        event_repeat_key: at.repeat.to_owned(),
        crf_oid: at.crf.to_owned(),
        item_group_oid: at.group.oid.clone(),
        item_group_repeat_key: at.group_repeat.to_owned(),
        label,
        specimen_type,
        quantity,
        collection_time,
        fields,
        status: status_of(at.removed),
    }
}

fn display_repeat(repeat: &str) -> &str {
    if repeat.is_empty() { "none" } else { repeat }
}

fn form_record(
    ctx: &mut Ctx<'_>,
    meta: &MetadataIndex,
    subject_key: &str,
    at: &Occurrence<'_>,
) -> FormRecord {
    let mut values = BTreeMap::new();
    let mut item_names = BTreeMap::new();
    for item in &at.group.items {
        if values.contains_key(&item.oid) {
            if !at.removed {
                ctx.error(
                    at.place(Some(&item.oid)),
                    "the item appears twice in one item group repeat; the first value is kept",
                );
            }
            continue;
        }
        values.insert(item.oid.clone(), item.value.clone());
        // OpenSpecimen needs a field name; an item the metadata does not
        // define is named by its OID.
        item_names.insert(
            item.oid.clone(),
            meta.item_name(&item.oid).unwrap_or(&item.oid).to_owned(),
        );
    }
    FormRecord {
        subject_key: subject_key.to_owned(),
        event_oid: at.event.oid.clone(),
        event_repeat_key: at.repeat.to_owned(),
        crf_oid: at.crf.to_owned(),
        form_oid: at.form.oid.clone(),
        form_version: at.form.version.clone(),
        item_group_oid: at.group.oid.clone(),
        item_group_repeat_key: at.group_repeat.to_owned(),
        form_status: at.form.status.clone(),
        status: status_of(at.removed),
        values,
        item_names,
    }
}
