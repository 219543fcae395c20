//! Choosing a CP's sink from its `[target]` section.
//!
//! This lives in `sync`, not in `sink`, because `cp` reads the OpenSpecimen
//! sink's configuration type for its `[target]` section: a `sink` function
//! taking a [`CpConfig`] would make `cp` and `sink` depend on each other.
//! `sync` already joins both.

use crate::cp::{CpConfig, TargetConfig};
use crate::sink::{AnySink, OpenSpecimenSink, PostgresSink, SinkError};

/// The sink that writes `cp`'s records, ready to use.
///
/// For OpenSpecimen the password reference is resolved here, so that a
/// missing variable or unreadable secret file fails before the run reads
/// anything from OpenClinica. That failure is [`SinkError::Refused`] (a
/// person must act); its message names the CP and the reference, never the
/// secret. No request is sent: the login happens at the first write.
pub fn for_cp(cp: &CpConfig) -> Result<AnySink, SinkError> {
    match &cp.target {
        TargetConfig::Postgres => Ok(AnySink::Postgres(PostgresSink::new())),
        TargetConfig::OpenSpecimen(config) => OpenSpecimenSink::from_config(config)
            .map(AnySink::OpenSpecimen)
            .map_err(|e| SinkError::Refused(format!("CP {}: target: {e}", cp.id))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(target: &str) -> CpConfig {
        CpConfig::from_toml(
            &format!("id = \"X\"\nsource = {{ kind = \"file\", path = \"/d\" }}\n{target}"),
            "x.toml",
        )
        .unwrap()
    }

    #[test]
    fn no_target_is_postgres() {
        assert_eq!(for_cp(&cp("")).unwrap().kind(), "postgres");
        assert_eq!(
            for_cp(&cp("[target]\nkind = \"postgres\"\n"))
                .unwrap()
                .kind(),
            "postgres"
        );
    }

    #[test]
    fn a_bad_password_reference_fails_before_any_request() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-secret");
        let e = for_cp(&cp(&format!(
            "[target]\nkind = \"openspecimen\"\nbase_url = \"http://127.0.0.1:9/os\"\n\
             login_name = \"u\"\npassword = {{ file = {:?} }}\n",
            missing.display().to_string()
        )))
        .unwrap_err();
        assert!(!e.is_transient(), "{e}");
        let text = e.to_string();
        assert!(text.starts_with("CP X: target: "), "{text}");
        assert!(
            text.contains("no-such-secret"),
            "names the reference: {text}"
        );

        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let sink = for_cp(&cp(&format!(
            "[target]\nkind = \"openspecimen\"\nbase_url = \"http://127.0.0.1:9/os\"\n\
             login_name = \"u\"\npassword = {{ file = {:?} }}\n",
            secret.display().to_string()
        )))
        .unwrap();
        assert_eq!(sink.kind(), "openspecimen");
        assert!(!format!("{sink:?}").contains("s3cret"), "Debug hides it");
    }
}
