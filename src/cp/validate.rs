//! Checking a CP configuration against the study's metadata: every OID it
//! names must exist, and every item must belong to the item group it is
//! mapped from. With an OpenSpecimen target, every CRF that becomes form
//! records needs a form in `target.forms`. Problems name the configuration key path and the OID, with a
//! "did you mean" when a close OID exists.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use super::model::{CpConfig, Placeholder};
use crate::mapping::MetadataIndex;
use crate::odm::Study;
use crate::sink::openspecimen::{FormLevel, FormTarget};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The configuration would map wrongly or not at all.
    Error,
    /// Could not be checked, or is probably not what was meant.
    Warning,
}

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigProblem {
    pub severity: Severity,
    /// The configuration key, e.g. `specimens[1].quantity_item`.
    pub path: String,
    /// The OID at fault, when there is one.
    pub oid: Option<String>,
    pub message: String,
    /// A defined OID close to the one given.
    pub suggestion: Option<String>,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{severity}: {}: {}", self.path, self.message)?;
        if let Some(s) = &self.suggestion {
            write!(f, " (did you mean {s}?)")?;
        }
        Ok(())
    }
}

/// Checks `cp` against one study's metadata (site OIDs cannot be checked:
/// each is reported as a warning).
pub fn validate(cp: &CpConfig, study: &Study) -> Vec<ConfigProblem> {
    validate_with_sites(cp, std::slice::from_ref(study), &BTreeSet::new())
}

/// Checks `cp` against every `Study` of a metadata document (OpenClinica
/// 3.x full metadata has one per site) and the `ClinicalData@StudyOID`s
/// seen in the same document (`seen_study_oids`, also site OIDs). The
/// parent study is the one whose OID the source names, else the first.
pub fn validate_with_sites(
    cp: &CpConfig,
    studies: &[Study],
    seen_study_oids: &BTreeSet<String>,
) -> Vec<ConfigProblem> {
    let mut v = Validator {
        problems: Vec::new(),
    };
    let parent = cp
        .study_oid()
        .and_then(|oid| studies.iter().find(|s| s.oid == oid))
        .or_else(|| studies.first());
    let Some(parent) = parent else {
        v.error(
            "source",
            None,
            "the metadata holds no Study element: nothing can be checked",
        );
        return v.problems;
    };
    let meta = MetadataIndex::new(parent);
    if meta.is_empty() {
        v.error(
            "source",
            Some(&parent.oid),
            format!(
                "study {} has no MetaDataVersion definitions: nothing can be checked",
                parent.oid
            ),
        );
        return v.problems;
    }

    let study_oids: BTreeSet<&str> = studies
        .iter()
        .map(|s| s.oid.as_str())
        .chain(seen_study_oids.iter().map(String::as_str))
        .collect();
    if let Some(oid) = cp.study_oid()
        && !study_oids.contains(oid)
    {
        v.unknown("source.study_oid", oid, "study", study_oids.iter().copied());
    }
    let knows_sites = study_oids.len() > 1;
    for site in cp.site_map.keys() {
        let path = format!("site_map.{}", key(site));
        if study_oids.contains(site.as_str()) {
            continue;
        }
        if knows_sites {
            v.unknown(&path, site, "study or site", study_oids.iter().copied());
        } else {
            v.warning(
                &path,
                Some(site),
                format!(
                    "the metadata names no sites, so site OID {site} cannot be checked \
                     (validate against OpenClinica 3.x full metadata or an extract)"
                ),
            );
        }
    }

    for event in cp.event_map.keys() {
        if meta.event(event).is_none() {
            v.unknown(
                &format!("event_map.{}", key(event)),
                event,
                "study event",
                meta.event_oids(),
            );
        }
    }

    for (list, oids) in [("include", &cp.crfs.include), ("exclude", &cp.crfs.exclude)] {
        for (i, crf) in oids.iter().enumerate() {
            if !meta.has_crf(crf) {
                v.unknown(&format!("crfs.{list}[{i}]"), crf, "CRF", meta.crf_oids());
            }
        }
    }
    for (i, crf) in cp.crfs.exclude.iter().enumerate() {
        if cp.crfs.include.contains(crf) {
            v.warning(
                &format!("crfs.exclude[{i}]"),
                Some(crf),
                format!("CRF {crf} is both included and excluded: it is excluded"),
            );
        }
    }

    let mut seen_groups = BTreeSet::new();
    for (i, s) in cp.specimens.iter().enumerate() {
        let base = format!("specimens[{i}]");
        if !seen_groups.insert((s.item_group_oid.as_str(), s.crf_oid.as_deref())) {
            v.warning(
                &format!("{base}.item_group_oid"),
                Some(&s.item_group_oid),
                "an earlier specimen mapping already takes this item group: this one is never used",
            );
        }
        let group_known = meta.item_group(&s.item_group_oid).is_some();
        if !group_known {
            v.unknown(
                &format!("{base}.item_group_oid"),
                &s.item_group_oid,
                "item group",
                meta.item_group_oids(),
            );
        }
        if let Some(crf) = &s.crf_oid {
            if !meta.has_crf(crf) {
                v.unknown(&format!("{base}.crf_oid"), crf, "CRF", meta.crf_oids());
            } else if group_known
                && !meta
                    .crf_item_groups(crf)
                    .contains(s.item_group_oid.as_str())
            {
                v.error(
                    &format!("{base}.crf_oid"),
                    Some(crf),
                    format!("CRF {crf} has no item group {}", s.item_group_oid),
                );
            }
        }
        let items = [
            ("label_item", s.label_item.as_ref()),
            ("type_item", s.type_item.as_ref()),
            ("quantity_item", s.quantity_item.as_ref()),
            ("collection_time_item", s.collection_time_item.as_ref()),
        ]
        .into_iter()
        .filter_map(|(k, oid)| oid.map(|o| (format!("{base}.{k}"), o)))
        .chain(
            s.fields
                .iter()
                .map(|(k, oid)| (format!("{base}.fields.{}", key(k)), oid)),
        )
        .chain(
            s.value_maps
                .keys()
                .map(|oid| (format!("{base}.value_maps.{}", key(oid)), oid)),
        );
        for (path, oid) in items {
            v.item_in_group(&meta, &path, oid, group_known.then_some(&s.item_group_oid));
        }
    }

    for (field, item) in &cp.participant_fields {
        let base = format!("participant_fields.{}", key(field));
        if let Some(event) = &item.event
            && meta.event(event).is_none()
        {
            v.unknown(
                &format!("{base}.event"),
                event,
                "study event",
                meta.event_oids(),
            );
        }
        let crf_known = match &item.crf {
            Some(crf) if !meta.has_crf(crf) => {
                v.unknown(&format!("{base}.crf"), crf, "CRF", meta.crf_oids());
                false
            }
            Some(_) => true,
            None => false,
        };
        let path = if item.event.is_some() || item.crf.is_some() || !item.values.is_empty() {
            format!("{base}.item")
        } else {
            base.clone()
        };
        if meta.item(&item.item).is_none() {
            v.unknown(&path, &item.item, "item", meta.item_oids());
        } else if crf_known && let Some(crf) = &item.crf {
            let groups = meta.crf_item_groups(crf);
            let in_crf = meta
                .groups_of_item(&item.item)
                .iter()
                .any(|g| groups.contains(g));
            if !in_crf {
                v.error(
                    &path,
                    Some(&item.item),
                    format!("item {} is not in any item group of CRF {crf}", item.item),
                );
            }
        }
    }

    if let Some(forms) = cp.target.forms() {
        check_form_targets(&mut v, cp, &meta, forms);
    }

    if !cp.visit_name.uses(Placeholder::Repeat)
        && let Some(event) = meta
            .event_oids()
            .find(|e| meta.event(e).is_some_and(|e| e.repeating))
    {
        v.warning(
            "visit_name",
            None,
            format!(
                "event {event} repeats but visit_name has no {{repeat}}: its visits would share \
                 one name"
            ),
        );
    }
    v.problems
}

/// The OpenSpecimen target's form map: every CRF it names exists, is
/// imported, and can be attached where its level says; and every CRF that
/// becomes form records has a form (or each of its records would be an
/// error row on every run).
fn check_form_targets(
    v: &mut Validator,
    cp: &CpConfig,
    meta: &MetadataIndex,
    forms: &BTreeMap<String, FormTarget>,
) {
    // The first specimen mapping that takes a group in a CRF, as mapping
    // picks it.
    let specimen_of = |crf: &str, group: &str| {
        cp.specimens
            .iter()
            .find(|m| m.item_group_oid == group && m.crf_oid.as_deref().is_none_or(|c| c == crf))
    };
    let selected = |crf: &str| {
        (cp.crfs.include.is_empty() || cp.crfs.include.iter().any(|c| c == crf))
            && !cp.crfs.exclude.iter().any(|c| c == crf)
    };
    // Groups of a CRF that become form records.
    let record_groups = |crf: &str| -> Vec<String> {
        meta.crf_item_groups(crf)
            .into_iter()
            .filter(|g| specimen_of(crf, g).is_none_or(|m| m.also_as_form_record))
            .map(str::to_owned)
            .collect()
    };
    for (crf, target) in forms {
        let path = format!("target.forms.{}", key(crf));
        if !meta.has_crf(crf) {
            v.unknown(&path, crf, "CRF", meta.crf_oids());
            continue;
        }
        let groups = record_groups(crf);
        if !selected(crf) || groups.is_empty() {
            v.warning(
                &path,
                Some(crf),
                format!(
                    "CRF {crf} becomes no form records (crfs.include/exclude, or every item \
                     group is a specimen): this form is never written"
                ),
            );
        } else if target.level == FormLevel::Specimen
            && let Some(g) = groups.iter().find(|g| specimen_of(crf, g).is_none())
        {
            v.error(
                &format!("{path}.level"),
                Some(crf),
                format!(
                    "form records of CRF {crf} are attached to specimens, but item group {g} \
                     is not mapped as a specimen: its records would have nothing to attach to"
                ),
            );
        }
    }
    for crf in meta.crf_oids() {
        if forms.contains_key(crf) || !selected(crf) || record_groups(crf).is_empty() {
            continue;
        }
        v.error(
            "target.forms",
            Some(crf),
            format!(
                "CRF {crf} becomes form records but target.forms names no OpenSpecimen form for \
                 it: each of its records would fail (add target.forms.{crf}, or list it in \
                 crfs.exclude)"
            ),
        );
    }
}

/// A map key as it is written in a key path (quoted when it is not bare).
fn key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_owned()
    } else {
        format!("{k:?}")
    }
}

struct Validator {
    problems: Vec<ConfigProblem>,
}

impl Validator {
    fn push(
        &mut self,
        severity: Severity,
        path: &str,
        oid: Option<&str>,
        message: impl Into<String>,
    ) {
        self.problems.push(ConfigProblem {
            severity,
            path: path.to_owned(),
            oid: oid.map(str::to_owned),
            message: message.into(),
            suggestion: None,
        });
    }

    fn error(&mut self, path: &str, oid: Option<&str>, message: impl Into<String>) {
        self.push(Severity::Error, path, oid, message);
    }

    fn warning(&mut self, path: &str, oid: Option<&str>, message: impl Into<String>) {
        self.push(Severity::Warning, path, oid, message);
    }

    fn unknown<'a>(
        &mut self,
        path: &str,
        oid: &str,
        what: &str,
        known: impl Iterator<Item = &'a str>,
    ) {
        self.push(
            Severity::Error,
            path,
            Some(oid),
            format!("{what} {oid} is not defined in the study metadata"),
        );
        if let Some(last) = self.problems.last_mut() {
            last.suggestion = closest(oid, known);
        }
    }

    fn item_in_group(
        &mut self,
        meta: &MetadataIndex,
        path: &str,
        oid: &str,
        group: Option<&String>,
    ) {
        if meta.item(oid).is_none() {
            // Suggest from the group's own items first: that is where the
            // item should be.
            let in_group = group
                .and_then(|g| meta.item_group(g))
                .and_then(|g| closest(oid, g.item_oids.iter().map(String::as_str)));
            self.unknown(path, oid, "item", meta.item_oids());
            if let (Some(s), Some(last)) = (in_group, self.problems.last_mut()) {
                last.suggestion = Some(s);
            }
            return;
        }
        if let Some(group) = group
            && let Some(g) = meta.item_group(group)
            && !g.item_oids.iter().any(|i| i == oid)
        {
            self.error(
                path,
                Some(oid),
                format!("item {oid} is not in item group {group}"),
            );
        }
    }
}

/// The known OID nearest to `oid`, when near enough to be a typo: an edit
/// distance (case-insensitive) of at most a third of the OID's length, and
/// at least 1, at most 4.
fn closest<'a>(oid: &str, known: impl Iterator<Item = &'a str>) -> Option<String> {
    let limit = (oid.chars().count() / 3).clamp(1, 4);
    let wanted = oid.to_lowercase();
    known
        .map(|k| (edit_distance(&wanted, &k.to_lowercase()), k))
        .filter(|(d, k)| *d <= limit && *k != oid)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.to_owned())
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_and_suggestions() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(edit_distance("same", "same"), 0);
        let known = ["I_SPECI_QTY", "I_SPECI_TYPE", "SE_VISIT"];
        assert_eq!(
            closest("I_SPECI_QTX", known.into_iter()).as_deref(),
            Some("I_SPECI_QTY")
        );
        assert_eq!(
            closest("i_speci_qty", known.into_iter()).as_deref(),
            Some("I_SPECI_QTY")
        );
        assert_eq!(closest("COMPLETELY_OTHER", known.into_iter()), None);
    }
}
