//! [`OpenSpecimenConfig`]: where the OpenSpecimen server is, how to log in,
//! how to behave on the network, and which OpenSpecimen form receives the
//! records of each OpenClinica CRF. Serde (TOML or JSON alike); a CP's
//! configuration embeds it as its `[target]` with `kind = "openspecimen"`
//! (see [`crate::cp::TargetConfig`]):
//!
//! ```toml
//! [target]
//! kind = "openspecimen"
//! base_url = "https://os.example.org/openspecimen"  # the client adds /rest/ng
//! login_name = "ocsync"
//! password = { env = "OS_PASSWORD" }                # or { file = "/run/secrets/os" }
//! domain = "openspecimen"                           # the default
//! max_concurrency = 4                               # subjects written at once
//! retry = { max_attempts = 5, base_delay_ms = 500, max_delay_ms = 30000 }
//!
//! [target.forms.F_VITALS]                           # CRF OID (not a version OID)
//! form_id = 12                                      # OpenSpecimen form id
//! form_ctxt_id = 34                                 # the form's context in this CP
//! level = "visit"                                   # participant | visit | specimen
//! ```
//!
//! Why form ids are configured rather than looked up by name: a form's
//! context id (its attachment to one CP at one level) is what OpenSpecimen
//! wants in `appData.formCtxtId`, the lookup API for it differs between
//! OpenSpecimen versions, and a form renamed in OpenSpecimen must not
//! silently redirect clinical data. An administrator reads both ids once
//! from OpenSpecimen's form designer.
//!
//! The password is never in the configuration, only a [`CredentialRef`].
//! This module knows nothing of ODM, OpenClinica's API or the queue.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

pub use crate::openclinica::{CredentialRef, RetryPolicy};

/// One OpenSpecimen server and the forms ocsync writes to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenSpecimenConfig {
    /// The application root, e.g. `https://os.example.org/openspecimen`;
    /// requests go to `{base_url}/rest/ng/…`.
    #[serde(deserialize_with = "url_field")]
    pub base_url: Url,
    pub login_name: String,
    #[serde(deserialize_with = "credential_field")]
    pub password: CredentialRef,
    /// OpenSpecimen's authentication domain (`openspecimen` for its own
    /// user accounts; an LDAP domain's name otherwise).
    #[serde(default = "default_domain")]
    pub domain: String,
    /// Time to establish a TCP (and TLS) connection.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time from sending a request to having read its whole (small, JSON)
    /// response.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// Subjects of a batch written at once (each subject's records are
    /// written in order: participant, visits, specimens, form records).
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Retries of connect errors, timeouts, 5xx, 408 and 429.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// CRF OID → the OpenSpecimen form its records go to. A form record of
    /// a CRF not listed here fails with a message naming the CRF.
    #[serde(default)]
    pub forms: BTreeMap<String, FormTarget>,
}

/// Where the records of one CRF go in OpenSpecimen.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormTarget {
    /// OpenSpecimen form id (`/forms/{form_id}/data`).
    pub form_id: i64,
    /// The form's context id in this CP at `level` (`appData.formCtxtId`).
    pub form_ctxt_id: i64,
    /// Which record a form record is attached to (`appData.objectId`).
    #[serde(default)]
    pub level: FormLevel,
}

/// What a form record is attached to in OpenSpecimen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FormLevel {
    /// The subject's registration (`objectId` = registration id).
    Participant,
    /// The visit of the CRF's study event (the usual case).
    #[default]
    Visit,
    /// The specimen with the same natural key (an item group mapped as a
    /// specimen and also kept as a form record).
    Specimen,
}

impl FormLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Participant => "participant",
            Self::Visit => "visit",
            Self::Specimen => "specimen",
        }
    }
}

impl OpenSpecimenConfig {
    /// A configuration with the defaults, for `base_url` and `login_name`.
    pub fn new(base_url: Url, login_name: &str, password: CredentialRef) -> Self {
        Self {
            base_url,
            login_name: login_name.to_owned(),
            password,
            domain: default_domain(),
            connect_timeout_ms: default_connect_timeout_ms(),
            response_timeout_ms: default_response_timeout_ms(),
            max_concurrency: default_max_concurrency(),
            retry: RetryPolicy::default(),
            forms: BTreeMap::new(),
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms)
    }

    /// Refuses settings that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if !matches!(self.base_url.scheme(), "http" | "https")
            || self.base_url.cannot_be_a_base()
            || self.base_url.host_str().is_none()
        {
            return Err("target.base_url must be http(s)://host[:port][/path]".into());
        }
        if !self.base_url.username().is_empty() || self.base_url.password().is_some() {
            return Err("target.base_url must not carry credentials".into());
        }
        if self.base_url.query().is_some() || self.base_url.fragment().is_some() {
            return Err("target.base_url must not carry a query or fragment".into());
        }
        if self.login_name.trim().is_empty() {
            return Err("target.login_name must not be empty".into());
        }
        if self.max_concurrency == 0 {
            return Err("target.max_concurrency must be at least 1".into());
        }
        if self.retry.max_attempts == 0 {
            return Err("target.retry.max_attempts must be at least 1".into());
        }
        if self.connect_timeout_ms == 0 || self.response_timeout_ms == 0 {
            return Err(
                "target.connect_timeout_ms and target.response_timeout_ms must be positive".into(),
            );
        }
        Ok(())
    }
}

fn url_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let text = String::deserialize(d)?;
    // The parse error only, never the text: it might hold credentials.
    Url::parse(&text).map_err(|e| serde::de::Error::custom(format!("not a URL: {e}")))
}

/// A [`CredentialRef`], refusing anything else without echoing it: a
/// password written in clear would otherwise come back in serde's
/// "unknown variant `…`" message, and from there into a terminal or a log.
fn credential_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<CredentialRef, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = CredentialRef;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("{ env = \"NAME\" } or { file = \"/path\" }")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            map: A,
        ) -> Result<CredentialRef, A::Error> {
            CredentialRef::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<CredentialRef, E> {
            Err(E::custom(
                "password must be a reference, { env = \"NAME\" } or { file = \"/path\" }, \
                 never the password itself",
            ))
        }
    }
    d.deserialize_any(V)
}

fn default_domain() -> String {
    "openspecimen".to_owned()
}

fn default_connect_timeout_ms() -> u64 {
    10_000
}

fn default_response_timeout_ms() -> u64 {
    60_000
}

fn default_max_concurrency() -> usize {
    4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults_and_forms() {
        let c: OpenSpecimenConfig = toml::from_str(
            r#"
base_url = "https://os.example.org/openspecimen"
login_name = "ocsync"
password = { env = "OS_PW" }
[forms.F_VITALS]
form_id = 12
form_ctxt_id = 34
[forms.F_SPEC]
form_id = 13
form_ctxt_id = 35
level = "specimen"
"#,
        )
        .unwrap();
        assert_eq!(c.domain, "openspecimen");
        assert_eq!(c.max_concurrency, 4);
        assert_eq!(c.forms["F_VITALS"].level, FormLevel::Visit);
        assert_eq!(c.forms["F_SPEC"].level, FormLevel::Specimen);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn a_password_in_clear_or_in_the_url_is_refused() {
        let clear: Result<OpenSpecimenConfig, _> = toml::from_str(
            r#"base_url = "https://x/"
login_name = "u"
password = "hunter2""#,
        );
        assert!(clear.is_err());
        let mut c = OpenSpecimenConfig::new(
            Url::parse("https://u:p@os.example.org/").unwrap(),
            "u",
            CredentialRef::Env("X".into()),
        );
        let e = c.validate().unwrap_err();
        assert!(!e.contains(":p@"), "{e}");
        c.base_url = Url::parse("https://os.example.org/").unwrap();
        assert!(c.validate().is_ok());
    }
}
