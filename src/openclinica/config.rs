//! The typed configuration of one source, as a collection protocol's
//! configuration will carry it (serde, JSON or TOML alike).
//!
//! ```json
//! { "kind": "oc3", "base_url": "https://oc.example.org/OpenClinica",
//!   "study_oid": "S_DEMO", "username": "ocsync",
//!   "password": { "env": "OC_DEMO_PASSWORD" },
//!   "network": { "max_concurrency": 4, "retry": { "max_attempts": 5 } } }
//! ```
//!
//! Passwords are never stored in the configuration: it holds a
//! [`CredentialRef`] (an environment variable or a mounted secret file) that
//! is resolved when the source is built and then kept only in a
//! [`SecretString`].

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use super::error::OcError;

/// Where data comes from, for one study.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// OpenClinica 3.x REST with a session cookie.
    Oc3(Oc3Config),
    /// OpenClinica 4.x REST with a bearer token.
    Oc4(Oc4Config),
    /// ODM extract files on disk.
    File(FileConfig),
}

/// An OpenClinica 3.x server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Oc3Config {
    /// The application root, e.g. `https://oc.example.org/OpenClinica`.
    #[serde(deserialize_with = "url_field")]
    pub base_url: Url,
    /// Study (or site) OID.
    pub study_oid: String,
    pub username: String,
    pub password: CredentialRef,
    #[serde(default)]
    pub query: QueryFlags,
    #[serde(default)]
    pub network: NetworkConfig,
}

/// An OpenClinica 4.x server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Oc4Config {
    /// The study runner root, e.g. `https://acme.openclinica.io/OpenClinica`.
    #[serde(deserialize_with = "url_field")]
    pub base_url: Url,
    /// Root of the user service, e.g. `https://acme.build.openclinica.io`;
    /// the token is requested from `{auth_url}/user-service/api/oauth/token`.
    #[serde(deserialize_with = "url_field")]
    pub auth_url: Url,
    pub study_oid: String,
    pub username: String,
    pub password: CredentialRef,
    #[serde(default)]
    pub query: QueryFlags,
    #[serde(default)]
    pub network: NetworkConfig,
    /// Full runs (mode `all`) read the whole study in one document, as for
    /// OC 3.x, instead of one request per participant; when OpenClinica
    /// refuses or fails that document before its first subject, the run
    /// goes on a document per participant. `false`: always a document per
    /// participant (for studies too large for OC to build in one answer).
    #[serde(default = "yes")]
    pub whole_study: bool,
}

fn yes() -> bool {
    true
}

/// An ODM extract file, or a folder where scheduled extracts land.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// One file, or a folder in which the newest file matching `pattern` is
    /// taken.
    pub path: PathBuf,
    /// File name pattern for folders: `*` matches any run of characters,
    /// `?` one character; case-sensitive.
    #[serde(default = "default_pattern")]
    pub pattern: String,
}

/// A URL field; the parse error says what is wrong without echoing the
/// text, which might hold credentials.
fn url_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let text = String::deserialize(d)?;
    Url::parse(&text).map_err(|e| serde::de::Error::custom(format!("not a URL: {e}")))
}

fn default_pattern() -> String {
    "*.xml".to_owned()
}

/// Optional parts of the clinical data document. Discrepancy notes are
/// never asked for: ocsync has no use for them.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueryFlags {
    /// Ship the whole study metadata with every clinical data call.
    pub include_metadata: bool,
    /// Include audit logs (×3.4 the size; useful for incremental sync).
    pub include_audits: bool,
    /// Include archived (removed) data.
    pub show_archived: bool,
}

/// How a client behaves on a real network.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Time to establish a TCP (and TLS) connection.
    pub connect_timeout_ms: u64,
    /// Time from sending a request to receiving the response headers. OC
    /// builds a whole document in memory before answering, hence the
    /// generous default.
    pub response_timeout_ms: u64,
    /// Longest silence allowed while reading a body. Only time spent
    /// waiting for the server counts, not time the consumer spends between
    /// reads.
    pub idle_timeout_ms: u64,
    /// Requests in flight at once to this server, bodies included.
    pub max_concurrency: usize,
    pub retry: RetryPolicy,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 10_000,
            response_timeout_ms: 300_000,
            idle_timeout_ms: 60_000,
            max_concurrency: 4,
            retry: RetryPolicy::default(),
        }
    }
}

impl NetworkConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    pub(crate) fn validate(&self) -> Result<(), OcError> {
        if self.max_concurrency == 0 {
            return Err(OcError::Config(
                "network.max_concurrency must be at least 1".into(),
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(OcError::Config(
                "network.retry.max_attempts must be at least 1".into(),
            ));
        }
        for (name, ms) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("response_timeout_ms", self.response_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
        ] {
            if ms == 0 {
                return Err(OcError::Config(format!("network.{name} must be positive")));
            }
        }
        Ok(())
    }
}

/// Retries of transient failures (connect errors, timeouts, 5xx, 429)
/// before a body is handed over: exponential backoff with full jitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Ceiling of the first backoff; it doubles with every attempt.
    pub base_delay_ms: u64,
    /// Ceiling of any backoff (a server's `Retry-After` may ask for more,
    /// and is honoured up to 15 minutes).
    pub max_delay_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_delay_ms: 500,
            max_delay_ms: 30_000,
        }
    }
}

/// Where a secret lives: `{ "env": "NAME" }` or `{ "file": "/run/secrets/x" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialRef {
    Env(String),
    File(PathBuf),
}

// By hand, so that a password written in clear is refused without the
// deserializer's usual "unknown variant `…`" echoing it back into an error
// message (and from there into logs).
impl<'de> Deserialize<'de> for CredentialRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "lowercase", deny_unknown_fields)]
        enum Reference {
            Env(String),
            File(PathBuf),
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = CredentialRef;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#"a reference to the secret: { env = "NAME" } or { file = "/path" }"#)
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<CredentialRef, E> {
                Err(E::custom(
                    r#"a password may not be written in the configuration; refer to it with { env = "NAME" } or { file = "/path" }"#,
                ))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<CredentialRef, A::Error> {
                Ok(
                    match Reference::deserialize(serde::de::value::MapAccessDeserializer::new(map))?
                    {
                        Reference::Env(name) => CredentialRef::Env(name),
                        Reference::File(path) => CredentialRef::File(path),
                    },
                )
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl CredentialRef {
    /// Reads the secret. A secret file's trailing newline is dropped, as
    /// `echo pw > file` and most secret mounts leave one. Errors name the
    /// variable or file, never the content.
    pub fn resolve(&self) -> Result<SecretString, OcError> {
        let value = match self {
            Self::Env(name) => std::env::var(name).map_err(|e| OcError::Credential {
                reference: format!("env {name}"),
                reason: match e {
                    std::env::VarError::NotPresent => "not set".into(),
                    std::env::VarError::NotUnicode(_) => "not valid UTF-8".into(),
                },
            })?,
            Self::File(path) => {
                let mut s = std::fs::read_to_string(path).map_err(|e| OcError::Credential {
                    reference: format!("file {}", path.display()),
                    reason: e.kind().to_string(),
                })?;
                let kept = s.trim_end_matches(['\r', '\n']).len();
                s.truncate(kept);
                s
            }
        };
        if value.is_empty() {
            return Err(OcError::Credential {
                reference: self.describe(),
                reason: "empty".into(),
            });
        }
        Ok(SecretString::from(value))
    }

    fn describe(&self) -> String {
        match self {
            Self::Env(name) => format!("env {name}"),
            Self::File(path) => format!("file {}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn parses_an_oc3_source_with_defaults() {
        let c: SourceConfig = serde_json::from_str(
            r#"{"kind":"oc3","base_url":"https://oc.example.org/OpenClinica",
                "study_oid":"S_DEMO","username":"u","password":{"env":"OC_PW"}}"#,
        )
        .unwrap();
        let SourceConfig::Oc3(c) = c else {
            panic!("oc3 expected")
        };
        assert_eq!(c.password, CredentialRef::Env("OC_PW".into()));
        assert_eq!(c.network.max_concurrency, 4);
        assert_eq!(c.network.retry.max_attempts, 5);
    }

    #[test]
    fn parses_a_file_source_with_the_default_pattern() {
        let c: SourceConfig = serde_json::from_str(r#"{"kind":"file","path":"/data"}"#).unwrap();
        let SourceConfig::File(c) = c else {
            panic!("file expected")
        };
        assert_eq!(c.pattern, "*.xml");
    }

    #[test]
    fn a_password_in_clear_is_refused() {
        let r: Result<SourceConfig, _> = serde_json::from_str(
            r#"{"kind":"oc3","base_url":"https://x/","study_oid":"S","username":"u","password":"hunter2"}"#,
        );
        let e = r.unwrap_err().to_string();
        assert!(e.contains("may not be written in the configuration"), "{e}");
        assert!(!e.contains("hunter2"), "the error echoes the password: {e}");
        // Through TOML too, as `ocsync cp add|validate` read it.
        let e = toml::from_str::<SourceConfig>(
            "kind = \"oc3\"\nbase_url = \"https://x/\"\nstudy_oid = \"S\"\nusername = \"u\"\npassword = \"hunter2\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("hunter2"), "the error echoes the password: {e}");
        let ok: CredentialRef =
            toml::from_str::<std::collections::BTreeMap<String, CredentialRef>>(
                "p = { env = \"OC_PW\" }",
            )
            .unwrap()
            .remove("p")
            .unwrap();
        assert_eq!(ok, CredentialRef::Env("OC_PW".into()));
    }

    #[test]
    fn secret_file_loses_its_trailing_newline_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let s = CredentialRef::File(path.clone()).resolve().unwrap();
        assert_eq!(s.expose_secret(), "s3cret");

        let missing = dir.path().join("nope");
        let e = CredentialRef::File(missing)
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn missing_env_var_is_named() {
        let e = CredentialRef::Env("OCSYNC_TEST_SURELY_UNSET_VAR".into())
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("OCSYNC_TEST_SURELY_UNSET_VAR"), "{e}");
    }
}
