//! What a run syncs: the three modes of *Synchronize Records*.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The scope of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Mode {
    /// Only what changed since the last successful run.
    Incremental,
    /// Every subject ("All CRF records").
    All,
    /// The listed subjects, by `SubjectKey` (`SS_…`) or label.
    Subjects { subjects: Vec<String> },
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Incremental => "incremental",
            Self::All => "all",
            Self::Subjects { .. } => "subjects",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A mode name without its subject list (`incremental`, `all`, `subjects`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeName {
    Incremental,
    All,
    Subjects,
}

impl FromStr for ModeName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "incremental" => Ok(Self::Incremental),
            "all" => Ok(Self::All),
            "subjects" => Ok(Self::Subjects),
            other => Err(format!(
                "unknown mode {other:?}: expected incremental, all or subjects"
            )),
        }
    }
}

/// Splits a subject list as users paste it: separated by commas, tabs or
/// line breaks (any mix), blanks ignored, surrounding spaces trimmed,
/// duplicates dropped (first occurrence kept, so the order is the user's).
/// Subject ids are identifiers, not clinical values: trimming them is safe.
pub fn parse_subject_list(text: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    text.split([',', '\t', '\n', '\r'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .filter(|s| seen.insert(s.to_string()))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_lists_split_on_commas_tabs_and_newlines() {
        let cases: &[(&str, &[&str])] = &[
            ("SS_1,SS_2", &["SS_1", "SS_2"]),
            (
                "SS_1\tSS_2\nSS_3\r\nSS_4",
                &["SS_1", "SS_2", "SS_3", "SS_4"],
            ),
            (" SS_1 , ,\n\nSS_2,", &["SS_1", "SS_2"]),
            ("SS_2,SS_1,SS_2", &["SS_2", "SS_1"]),
            ("", &[]),
            ("label with space", &["label with space"]),
        ];
        for (input, want) in cases {
            assert_eq!(parse_subject_list(input), *want, "{input:?}");
        }
    }

    #[test]
    fn mode_names_parse_case_insensitively() {
        assert_eq!("Incremental".parse(), Ok(ModeName::Incremental));
        assert_eq!(" all ".parse(), Ok(ModeName::All));
        assert_eq!("SUBJECTS".parse(), Ok(ModeName::Subjects));
        assert!("everything".parse::<ModeName>().is_err());
    }

    #[test]
    fn modes_serialise_with_their_name() {
        let m = Mode::Subjects {
            subjects: vec!["SS_1".into()],
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"mode":"subjects","subjects":["SS_1"]}"#
        );
        assert_eq!(
            serde_json::to_string(&Mode::All).unwrap(),
            r#"{"mode":"all"}"#
        );
    }
}
