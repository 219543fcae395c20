//! The studies the simulator serves: one [`GeneratorConfig`] each, plus
//! the edits made since start.
//!
//! A study is never held as a document: a request is turned into the
//! generator configuration that writes its answer (the whole study, one
//! site, or one subject through `subject_range`), and the generator writes
//! it while it is sent. Each subject has its own random stream, so a
//! one-subject document holds exactly that subject's `SubjectData` from the
//! whole-study document.
//!
//! What OC does that the simulator decides for itself (OC's behaviour is
//! not documented for these):
//! - an unknown subject answers, in 3.x, 200 with a document that holds no
//!   `ClinicalData` (the metadata only, when asked for); in 4.x, 404;
//! - an unknown study or site answers 404 in both;
//! - `showArchived` is ignored: removed subjects and invalid forms are
//!   always served, with their status;
//! - 3.x documents carry CRF-version form OIDs (`F_DEMOG_V1`), 4.x
//!   documents CRF OIDs and `CreatedDate`/`UpdatedDate`, whatever the
//!   study's own `oc4_dates` says.
//!
//! This module knows nothing of HTTP, authentication or faults.

use std::collections::BTreeMap;

use rand::rngs::SmallRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::SimError;
use crate::odm::generate::{
    GeneratorConfig, last_modified, site_oid, site_range, subject_key, subject_label,
    subject_status,
};

/// Which URL scheme (and document flavour) a request came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Oc3,
    Oc4,
}

/// A clinical data request, as the URL and its flags say.
#[derive(Debug, Clone)]
pub(crate) struct DocRequest<'a> {
    pub scheme: Scheme,
    /// Study or site OID.
    pub study: &'a str,
    /// `SS_…` key or label; `None` for `*`.
    pub subject: Option<&'a str>,
    pub metadata: bool,
    pub audits: bool,
    pub notes: bool,
}

/// One entry of the 4.x participants list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Participant {
    pub subject_key: String,
    /// The label (`OpenClinica:StudySubjectID`).
    pub participant_id: String,
    pub status: String,
    /// When the subject's data last changed (`yyyy-MM-dd HH:mm:ss`).
    pub last_modified: String,
    /// The site the subject belongs to, or the study when it has none.
    pub site_oid: String,
}

struct StudyState {
    config: GeneratorConfig,
    /// Edits made so far; the next edit gets the next number.
    edits_made: u32,
}

pub(crate) struct Studies {
    studies: BTreeMap<String, StudyState>,
    /// Picks the subjects of "edit K subjects" (seeded, for repeatable runs).
    rng: SmallRng,
}

impl Studies {
    pub fn new(configs: Vec<GeneratorConfig>, seed: u64) -> Result<Self, SimError> {
        let mut studies = BTreeMap::new();
        for config in configs {
            let oid = config.study_oid.clone();
            if oid.is_empty() || oid.contains('/') {
                return Err(SimError::Config(format!("study OID {oid:?} is not usable")));
            }
            let edits_made = config.edits.values().copied().max().unwrap_or(0);
            let state = StudyState { config, edits_made };
            if studies.insert(oid.clone(), state).is_some() {
                return Err(SimError::Config(format!("study {oid} is configured twice")));
            }
        }
        Ok(Self {
            studies,
            rng: SmallRng::seed_from_u64(seed ^ 0x0C51_0000),
        })
    }

    /// The study (as configured, with its edits so far).
    pub fn config(&self, oid: &str) -> Option<&GeneratorConfig> {
        self.studies.get(oid).map(|s| &s.config)
    }

    /// The study an OID names and, for a site OID, the site's index.
    fn locate(&self, oid: &str) -> Option<(&GeneratorConfig, Option<u32>)> {
        if let Some(s) = self.studies.get(oid) {
            return Some((&s.config, None));
        }
        self.studies.values().find_map(|s| {
            let number: u32 = oid
                .strip_prefix(s.config.study_oid.as_str())?
                .strip_prefix("_SITE")?
                .parse()
                .ok()?;
            let site = number.checked_sub(1)?;
            (site < s.config.sites && site_oid(&s.config, site) == oid)
                .then_some((&s.config, Some(site)))
        })
    }

    /// The generator configuration that writes the answer to `req`.
    pub fn document(&self, req: &DocRequest<'_>) -> Result<GeneratorConfig, SimError> {
        let (study, site) = self
            .locate(req.study)
            .ok_or_else(|| SimError::UnknownStudy(req.study.to_owned()))?;
        let scope = match site {
            Some(s) => site_range(study, s),
            None => 0..study.subjects,
        };
        let range = match req.subject {
            None => scope,
            Some(key) => match subject_index(study, key).filter(|i| scope.contains(i)) {
                Some(i) => i..i + 1,
                None if req.scheme == Scheme::Oc3 => 0..0,
                None => {
                    return Err(SimError::UnknownSubject {
                        study: req.study.to_owned(),
                        subject: key.to_owned(),
                    });
                }
            },
        };
        Ok(GeneratorConfig {
            subject_range: Some(range),
            include_metadata: req.metadata,
            audit_logs: req.audits,
            discrepancy_notes: req.notes,
            oc4_dates: req.scheme == Scheme::Oc4,
            ..study.clone()
        })
    }

    /// The metadata document: the study without subjects.
    pub fn metadata(&self, oid: &str, scheme: Scheme) -> Result<GeneratorConfig, SimError> {
        let (study, _) = self
            .locate(oid)
            .ok_or_else(|| SimError::UnknownStudy(oid.to_owned()))?;
        Ok(GeneratorConfig {
            subject_range: Some(0..0),
            include_metadata: true,
            oc4_dates: scheme == Scheme::Oc4,
            ..study.clone()
        })
    }

    /// The participants of a study or site, in subject order.
    pub fn participants(&self, oid: &str) -> Result<Vec<Participant>, SimError> {
        let (study, site) = self
            .locate(oid)
            .ok_or_else(|| SimError::UnknownStudy(oid.to_owned()))?;
        let range = match site {
            Some(s) => site_range(study, s),
            None => 0..study.subjects,
        };
        let site_of = |i: u32| {
            (0..study.sites)
                .find(|s| site_range(study, *s).contains(&i))
                .map_or_else(|| study.study_oid.clone(), |s| site_oid(study, s))
        };
        Ok(range
            .map(|i| Participant {
                subject_key: subject_key(i),
                participant_id: subject_label(i),
                status: subject_status(study, i).to_owned(),
                last_modified: last_modified(study, i),
                site_oid: site_of(i),
            })
            .collect())
    }

    /// Edits these subjects (keys or labels), in order; returns their keys.
    /// Nothing changes when one of them is unknown.
    pub fn edit(&mut self, oid: &str, subjects: &[&str]) -> Result<Vec<String>, SimError> {
        let state = self
            .studies
            .get_mut(oid)
            .ok_or_else(|| SimError::UnknownStudy(oid.to_owned()))?;
        let indices = subjects
            .iter()
            .map(|key| {
                subject_index(&state.config, key).ok_or_else(|| SimError::UnknownSubject {
                    study: oid.to_owned(),
                    subject: (*key).to_owned(),
                })
            })
            .collect::<Result<Vec<u32>, _>>()?;
        Ok(indices
            .into_iter()
            .map(|i| {
                state.edits_made += 1;
                state.config.edits.insert(i, state.edits_made);
                subject_key(i)
            })
            .collect())
    }

    /// Edits `k` distinct subjects picked at random (seeded).
    pub fn edit_random(&mut self, oid: &str, k: u32) -> Result<Vec<String>, SimError> {
        let n = self
            .config(oid)
            .ok_or_else(|| SimError::UnknownStudy(oid.to_owned()))?
            .subjects;
        if k > n {
            return Err(SimError::Config(format!(
                "cannot edit {k} subjects of a study of {n}"
            )));
        }
        let seed = self.rng.random();
        let mut picked: Vec<u32> =
            sample(&mut SmallRng::seed_from_u64(seed), n as usize, k as usize)
                .into_iter()
                .map(|i| i as u32)
                .collect();
        picked.sort_unstable();
        let keys: Vec<String> = picked.into_iter().map(subject_key).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.edit(oid, &refs)
    }
}

/// The index of the subject a `SubjectKey` (`SS_GEN000001`) or a label
/// (`GEN-00001`) names, if the study has it.
pub fn subject_index(config: &GeneratorConfig, key: &str) -> Option<u32> {
    let digits = key
        .strip_prefix("SS_GEN")
        .or_else(|| key.strip_prefix("GEN-"))?;
    let index = digits.parse::<u32>().ok()?.checked_sub(1)?;
    (index < config.subjects && (subject_key(index) == key || subject_label(index) == key))
        .then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn studies() -> Studies {
        Studies::new(
            vec![GeneratorConfig {
                study_oid: "S_A".into(),
                subjects: 10,
                sites: 2,
                ..GeneratorConfig::default()
            }],
            1,
        )
        .unwrap()
    }

    fn req<'a>(scheme: Scheme, study: &'a str, subject: Option<&'a str>) -> DocRequest<'a> {
        DocRequest {
            scheme,
            study,
            subject,
            metadata: false,
            audits: false,
            notes: false,
        }
    }

    #[test]
    fn subjects_are_found_by_key_or_label_only() {
        let s = studies();
        let c = s.config("S_A").unwrap();
        assert_eq!(subject_index(c, "SS_GEN000001"), Some(0));
        assert_eq!(subject_index(c, "GEN-00010"), Some(9));
        for bad in ["SS_GEN000011", "SS_GEN1", "GEN-0001", "SS_GEN000000", "x"] {
            assert_eq!(subject_index(c, bad), None, "{bad}");
        }
    }

    #[test]
    fn sites_restrict_and_unknowns_follow_the_scheme() {
        let s = studies();
        let site2 = s.document(&req(Scheme::Oc3, "S_A_SITE2", None)).unwrap();
        assert_eq!(site2.subject_range, Some(5..10));
        let one = s
            .document(&req(Scheme::Oc4, "S_A", Some("GEN-00003")))
            .unwrap();
        assert_eq!(one.subject_range, Some(2..3));
        assert!(one.oc4_dates);
        // Subject 1 is not in site 2.
        let outside = s
            .document(&req(Scheme::Oc3, "S_A_SITE2", Some("SS_GEN000001")))
            .unwrap();
        assert_eq!(outside.subject_range, Some(0..0));
        assert!(matches!(
            s.document(&req(Scheme::Oc4, "S_A_SITE2", Some("SS_GEN000001"))),
            Err(SimError::UnknownSubject { .. })
        ));
        for unknown in ["S_B", "S_A_SITE3", "S_A_SITE0", "S_A_SITE01"] {
            assert!(
                matches!(
                    s.document(&req(Scheme::Oc3, unknown, None)),
                    Err(SimError::UnknownStudy(_))
                ),
                "{unknown}"
            );
        }
    }

    #[test]
    fn edits_are_numbered_across_the_study_and_atomic() {
        let mut s = studies();
        assert_eq!(
            s.edit("S_A", &["SS_GEN000002", "GEN-00004"]).unwrap(),
            ["SS_GEN000002", "SS_GEN000004"]
        );
        assert!(s.edit("S_A", &["SS_GEN000005", "nope"]).is_err());
        s.edit("S_A", &["SS_GEN000002"]).unwrap();
        let edits = &s.config("S_A").unwrap().edits;
        assert_eq!(
            edits.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(),
            [(1, 3), (3, 2)]
        );
        let picked = s.edit_random("S_A", 3).unwrap();
        assert_eq!(picked.len(), 3);
        assert!(s.edit_random("S_A", 11).is_err());
    }

    #[test]
    fn participants_carry_site_status_and_last_modified() {
        let mut s = studies();
        let before = s.participants("S_A").unwrap();
        assert_eq!(before.len(), 10);
        assert_eq!(before[7].site_oid, "S_A_SITE2");
        s.edit("S_A", &["SS_GEN000008"]).unwrap();
        let after = s.participants("S_A_SITE2").unwrap();
        assert_eq!(after.len(), 5);
        assert!(
            after[2].last_modified
                > before
                    .iter()
                    .map(|p| p.last_modified.clone())
                    .max()
                    .unwrap()
        );
        assert_eq!(after[3], before[8]);
    }
}
