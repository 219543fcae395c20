//! [`MetadataIndex`]: the study design looked up by OID, built once per run
//! from the `Study` metadata so that mapping a subject never searches.

use std::collections::{BTreeMap, BTreeSet};

use crate::odm::Study;

/// What the mapping (and the CP validator) needs to know about a study's
/// design. Every `MetaDataVersion` of the study is merged; when two
/// versions define the same OID, the first one read wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataIndex {
    /// `Study@OID` the index was built from (empty for [`Self::empty`]).
    pub study_oid: String,
    events: BTreeMap<String, EventInfo>,
    forms: BTreeMap<String, FormInfo>,
    /// CRF OID → the FormOIDs (versions) of that CRF.
    crfs: BTreeMap<String, BTreeSet<String>>,
    item_groups: BTreeMap<String, GroupInfo>,
    items: BTreeMap<String, ItemInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventInfo {
    pub name: Option<String>,
    pub repeating: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FormInfo {
    pub crf_oid: String,
    pub name: Option<String>,
    pub item_group_oids: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: Option<String>,
    pub repeating: bool,
    pub item_oids: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ItemInfo {
    pub name: Option<String>,
    pub data_type: Option<String>,
}

impl MetadataIndex {
    /// Indexes one study's metadata.
    pub fn new(study: &Study) -> Self {
        let mut index = Self {
            study_oid: study.oid.clone(),
            ..Self::default()
        };
        for mdv in &study.metadata_versions {
            for e in &mdv.study_event_defs {
                index
                    .events
                    .entry(e.oid.clone())
                    .or_insert_with(|| EventInfo {
                        name: e.name.clone(),
                        repeating: e.repeating,
                    });
            }
            for f in &mdv.form_defs {
                // 3.x names the CRF of a version; 4.x FormDefs are CRFs.
                let crf = f
                    .parent_form_oid
                    .clone()
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| f.oid.clone());
                index
                    .crfs
                    .entry(crf.clone())
                    .or_default()
                    .insert(f.oid.clone());
                index
                    .forms
                    .entry(f.oid.clone())
                    .or_insert_with(|| FormInfo {
                        crf_oid: crf,
                        name: f.name.clone(),
                        item_group_oids: f.item_group_oids.clone(),
                    });
            }
            for g in &mdv.item_group_defs {
                index
                    .item_groups
                    .entry(g.oid.clone())
                    .or_insert_with(|| GroupInfo {
                        name: g.name.clone(),
                        repeating: g.repeating,
                        item_oids: g.item_oids.clone(),
                    });
            }
            for i in &mdv.item_defs {
                index
                    .items
                    .entry(i.oid.clone())
                    .or_insert_with(|| ItemInfo {
                        name: i.name.clone(),
                        data_type: i.data_type.clone(),
                    });
            }
        }
        index
    }

    /// An index that knows nothing: events are labelled by OID, CRFs are
    /// found by stripping the version suffix, item names are OIDs.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Whether the index has any definitions at all.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.forms.is_empty() && self.item_groups.is_empty()
    }

    /// The CRF a `FormData@FormOID` belongs to: the FormDef's
    /// `ParentFormOID` (3.x), the FormOID itself when the FormDef has none
    /// (4.x), and for a form the metadata does not define, the FormOID
    /// without a `_V<digit>…` suffix (see [`strip_version_suffix`]).
    pub fn crf_of<'a>(&'a self, form_oid: &'a str) -> &'a str {
        match self.forms.get(form_oid) {
            Some(f) => &f.crf_oid,
            None => strip_version_suffix(form_oid),
        }
    }

    pub fn event(&self, oid: &str) -> Option<&EventInfo> {
        self.events.get(oid)
    }

    pub fn form(&self, oid: &str) -> Option<&FormInfo> {
        self.forms.get(oid)
    }

    pub fn item_group(&self, oid: &str) -> Option<&GroupInfo> {
        self.item_groups.get(oid)
    }

    pub fn item(&self, oid: &str) -> Option<&ItemInfo> {
        self.items.get(oid)
    }

    /// `ItemDef@Name`, when defined and not empty.
    pub fn item_name(&self, oid: &str) -> Option<&str> {
        self.items
            .get(oid)
            .and_then(|i| i.name.as_deref())
            .filter(|n| !n.is_empty())
    }

    /// `StudyEventDef@Name`, when defined and not empty.
    pub fn event_name(&self, oid: &str) -> Option<&str> {
        self.events
            .get(oid)
            .and_then(|e| e.name.as_deref())
            .filter(|n| !n.is_empty())
    }

    pub fn event_oids(&self) -> impl Iterator<Item = &str> {
        self.events.keys().map(String::as_str)
    }

    pub fn crf_oids(&self) -> impl Iterator<Item = &str> {
        self.crfs.keys().map(String::as_str)
    }

    pub fn item_group_oids(&self) -> impl Iterator<Item = &str> {
        self.item_groups.keys().map(String::as_str)
    }

    pub fn item_oids(&self) -> impl Iterator<Item = &str> {
        self.items.keys().map(String::as_str)
    }

    pub fn has_crf(&self, crf_oid: &str) -> bool {
        self.crfs.contains_key(crf_oid)
    }

    /// The item groups used by any version of a CRF.
    pub fn crf_item_groups(&self, crf_oid: &str) -> BTreeSet<&str> {
        self.crfs
            .get(crf_oid)
            .into_iter()
            .flatten()
            .filter_map(|f| self.forms.get(f))
            .flat_map(|f| f.item_group_oids.iter().map(String::as_str))
            .collect()
    }

    /// The CRFs whose versions use an item group.
    pub fn crfs_with_group(&self, group_oid: &str) -> BTreeSet<&str> {
        self.forms
            .values()
            .filter(|f| f.item_group_oids.iter().any(|g| g == group_oid))
            .map(|f| f.crf_oid.as_str())
            .collect()
    }

    /// The item groups an item belongs to.
    pub fn groups_of_item(&self, item_oid: &str) -> BTreeSet<&str> {
        self.item_groups
            .iter()
            .filter(|(_, g)| g.item_oids.iter().any(|i| i == item_oid))
            .map(|(oid, _)| oid.as_str())
            .collect()
    }
}

/// A 3.x CRF version OID without its version suffix: `F_DEMOG_V12` →
/// `F_DEMOG`. Only a last `_V` followed by a digit counts, so that 4.x form
/// OIDs such as `F_VITALS` stay whole.
pub fn strip_version_suffix(form_oid: &str) -> &str {
    match form_oid.rfind("_V") {
        Some(i)
            if i > 0
                && form_oid[i + 2..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit()) =>
        {
            &form_oid[..i]
        }
        _ => form_oid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_suffixes_are_stripped_only_when_they_look_like_versions() {
        for (oid, crf) in [
            ("F_DEMOG_V12", "F_DEMOG"),
            ("F_DEMOG_V1_2", "F_DEMOG"),
            ("F_VITALS", "F_VITALS"),
            ("F_VITALS_V3", "F_VITALS"),
            ("F_X_VERSION", "F_X_VERSION"),
            ("_V1", "_V1"),
            ("", ""),
            ("F_Ü_V2", "F_Ü"),
        ] {
            assert_eq!(strip_version_suffix(oid), crf, "{oid}");
        }
    }
}
