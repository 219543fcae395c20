//! The one interface over the three kinds of source (OC 3.x, OC 4.x,
//! extract files): [`Source`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;

use secrecy::SecretString;

use super::body::Body;
use super::config::{QueryFlags, SourceConfig};
use super::error::OcError;
use super::files::Files;
use super::oc3::Oc3;
use super::oc4::Oc4;

/// Which clinical data to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The whole study in one document. OC 3.x builds it in memory: large
    /// studies time out or fail there; prefer [`Scope::Subjects`].
    Study,
    /// One subject, by `SS_…` OID or label.
    Subject(String),
    /// Several subjects, one request each.
    Subjects(Vec<String>),
}

/// One entry of a subject list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectListing {
    /// `SS_…` OID.
    pub subject_key: String,
    /// OC's status word as sent (compare case-insensitively).
    pub status: Option<String>,
    /// When OC last changed the subject's data, as OC wrote it (no time
    /// zone is promised).
    pub last_modified: Option<String>,
}

/// What [`Source::subjects`] yields.
#[derive(Debug)]
pub enum Subjects {
    /// The source has a subject list (OC 4.x participants).
    Listed(Vec<SubjectListing>),
    /// The source has no list: this ODM document names the subjects
    /// (`SubjectData/@SubjectKey`, `OpenClinica:Status`), and the caller's
    /// ODM reader extracts them. OC 3.x: the whole study's clinical data
    /// without metadata, audits or notes, the cheapest REST call that names
    /// every subject; files: the extract itself.
    InDocument(Body),
}

/// A stream of documents, in the order asked for.
pub type Bodies = BoxStream<'static, Result<Body, OcError>>;

/// A source of ODM documents for one study. Cheap to clone; clones share
/// the server's session or token and its concurrency limit.
#[derive(Clone)]
pub struct Source {
    inner: Arc<Kind>,
    study_oid: String,
    flags: QueryFlags,
}

// One value per server, behind an `Arc`: variant sizes do not matter.
#[expect(
    clippy::large_enum_variant,
    reason = "lives once per server behind an Arc"
)]
enum Kind {
    Oc3(Oc3),
    Oc4(Oc4),
    Files(Files),
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password, token or cookie: only what the logs may say.
        f.write_str(&self.describe())
    }
}

impl Source {
    /// Builds a source with a session (or token) and concurrency limit of
    /// its own, resolving the password reference now.
    pub fn new(config: &SourceConfig) -> Result<Self, OcError> {
        let inner = Arc::new(build(config, None)?);
        Ok(Self::with(inner, config))
    }

    fn with(inner: Arc<Kind>, config: &SourceConfig) -> Self {
        let (study_oid, flags) = match config {
            SourceConfig::Oc3(c) => (c.study_oid.clone(), c.query),
            SourceConfig::Oc4(c) => (c.study_oid.clone(), c.query),
            SourceConfig::File(_) => (String::new(), QueryFlags::default()),
        };
        Self {
            inner,
            study_oid,
            flags,
        }
    }

    /// `oc3 https://host:443 study S_X`, for logs and messages.
    pub fn describe(&self) -> String {
        match &*self.inner {
            Kind::Oc3(c) => format!("oc3 {} study {}", c.server.origin, self.study_oid),
            Kind::Oc4(c) => format!("oc4 {} study {}", c.server.origin, self.study_oid),
            Kind::Files(f) => f.describe(),
        }
    }

    /// The study metadata document. For OC 4.x, the metadata with the first
    /// listed participant's data (one request for the list, one for that).
    /// For files, the whole extract (an extract carries its metadata).
    pub async fn metadata(&self) -> Result<Body, OcError> {
        match &*self.inner {
            Kind::Oc3(c) => c.get_xml(&c.metadata_url(&self.study_oid), None).await,
            Kind::Oc4(c) => {
                // 4.x has no metadata-only call: the metadata comes with one
                // participant's data, so OC never builds the whole study
                // (which a large study may not survive) just for it.
                let first = c.participants(&self.study_oid).await?.into_iter().next();
                let url = c.metadata_url(&self.study_oid, first.map(|l| l.subject_key).as_deref());
                c.get_xml(&url, None).await
            }
            Kind::Files(f) => f.open().await,
        }
    }

    /// Clinical data for `scope`, as a stream of documents:
    /// - [`Scope::Study`] and [`Scope::Subject`]: one document;
    /// - [`Scope::Subjects`]: one document per subject, in the order given,
    ///   fetched up to `max_concurrency` at a time ahead of the consumer
    ///   (each waiting document holds one of the server's slots until it is
    ///   read or dropped). A failed subject is an `Err` item; the stream
    ///   goes on with the next ones.
    /// - files: always one document, the whole extract; the caller picks
    ///   the subjects it wants.
    ///
    /// Every [`Body`] holds one of the server's `max_concurrency` slots
    /// until it is read to its end, fails or is dropped: read each body
    /// before asking for more than that many (collecting the whole stream
    /// first would wait forever for a slot).
    ///
    /// Nothing is sent before the stream is polled.
    pub fn clinical_data(&self, scope: Scope) -> Bodies {
        let this = self.clone();
        match scope {
            Scope::Study => futures::stream::once(async move { this.one(None).await }).boxed(),
            Scope::Subject(key) => {
                futures::stream::once(async move { this.one(Some(key)).await }).boxed()
            }
            Scope::Subjects(keys) => match &*self.inner {
                Kind::Files(_) => {
                    futures::stream::once(async move { this.one(None).await }).boxed()
                }
                Kind::Oc3(c) => self.each(keys, c.server.net.max_concurrency),
                Kind::Oc4(c) => self.each(keys, c.server.net.max_concurrency),
            },
        }
    }

    fn each(&self, keys: Vec<String>, ahead: usize) -> Bodies {
        let this = self.clone();
        futures::stream::iter(keys)
            .map(move |key| {
                let this = this.clone();
                async move { this.one(Some(key)).await }
            })
            .buffered(ahead)
            .boxed()
    }

    async fn one(&self, subject: Option<String>) -> Result<Body, OcError> {
        if let Some(key) = &subject {
            check_subject_key(key)?;
        }
        let s = subject.as_deref();
        match &*self.inner {
            Kind::Oc3(c) => {
                c.get_xml(&c.clinical_url(&self.study_oid, s, self.flags), subject)
                    .await
            }
            Kind::Oc4(c) => {
                c.get_xml(&c.clinical_url(&self.study_oid, s, self.flags), subject)
                    .await
            }
            Kind::Files(f) => f.open().await,
        }
    }

    /// The study's subjects: a list where the source has one (OC 4.x), else
    /// a document that names them (see [`Subjects::InDocument`]).
    pub async fn subjects(&self) -> Result<Subjects, OcError> {
        match &*self.inner {
            Kind::Oc4(c) => Ok(Subjects::Listed(c.participants(&self.study_oid).await?)),
            Kind::Oc3(c) => {
                let flags = QueryFlags {
                    include_metadata: false,
                    include_audits: false,
                    show_archived: self.flags.show_archived,
                };
                let url = c.clinical_url(&self.study_oid, None, flags);
                Ok(Subjects::InDocument(c.get_xml(&url, None).await?))
            }
            Kind::Files(f) => Ok(Subjects::InDocument(f.open().await?)),
        }
    }
}

/// A subject key goes into a URL path: refuse the wildcard (it would fetch
/// the whole study) and the dot segments (they would change the path).
fn check_subject_key(key: &str) -> Result<(), OcError> {
    if key.trim().is_empty() || key == "*" || key == "." || key == ".." {
        return Err(OcError::Config(format!(
            "{key:?} is not a usable subject key"
        )));
    }
    Ok(())
}

fn build(config: &SourceConfig, password: Option<SecretString>) -> Result<Kind, OcError> {
    let study = |oid: &str| {
        if oid.trim().is_empty() || oid.contains('/') {
            Err(OcError::Config(format!("study OID {oid:?} is not usable")))
        } else {
            Ok(())
        }
    };
    Ok(match config {
        SourceConfig::Oc3(c) => {
            study(&c.study_oid)?;
            Kind::Oc3(Oc3::new(
                c.base_url.clone(),
                c.username.clone(),
                password.map_or_else(|| c.password.resolve(), Ok)?,
                &c.network,
            )?)
        }
        SourceConfig::Oc4(c) => {
            study(&c.study_oid)?;
            Kind::Oc4(Oc4::new(
                c.base_url.clone(),
                c.auth_url.clone(),
                c.username.clone(),
                password.map_or_else(|| c.password.resolve(), Ok)?,
                &c.network,
            )?)
        }
        SourceConfig::File(c) => Kind::Files(Files::new(c)?),
    })
}

/// Hands out [`Source`]s that share one session (3.x) or token (4.x) and
/// one concurrency limit per server and account, whatever study they are
/// for: OC keeps one session per user, so two collection protocols on the
/// same OC account must not log in separately, or each login would end the
/// other's session.
///
/// The registry keeps each server's state between runs (a 4.x token lives
/// hours, and OC 4.x refuses more than two token requests a minute, so a
/// worker must not ask for one per run) until it has gone unused for
/// [`SourceRegistry::IDLE`]. The first configuration for a server and
/// account sets its network settings; a changed password (a rotated secret
/// file or variable) builds fresh state, so the next login uses it.
#[derive(Default)]
pub struct SourceRegistry {
    shared: Mutex<HashMap<String, Shared>>,
}

struct Shared {
    kind: Arc<Kind>,
    /// SHA-256 of the password the state was built with.
    password: [u8; 32],
    last_used: Instant,
}

impl SourceRegistry {
    /// How long a server's session or token is kept without a run using it.
    pub const IDLE: Duration = Duration::from_secs(30 * 60);

    pub fn new() -> Self {
        Self::default()
    }

    /// A source for `config`, sharing the server state of earlier sources
    /// with the same kind, URLs and username.
    pub fn source(&self, config: &SourceConfig) -> Result<Source, OcError> {
        let (key, password) = match config {
            SourceConfig::Oc3(c) => (
                format!("oc3 {} {}", c.base_url, c.username),
                c.password.resolve()?,
            ),
            SourceConfig::Oc4(c) => (
                format!("oc4 {} {} {}", c.base_url, c.auth_url, c.username),
                c.password.resolve()?,
            ),
            SourceConfig::File(_) => return Source::new(config),
        };
        let digest: [u8; 32] = {
            use secrecy::ExposeSecret;
            use sha2::Digest;
            sha2::Sha256::digest(password.expose_secret().as_bytes()).into()
        };
        let now = Instant::now();
        // A panic elsewhere cannot leave the map half-updated: recover it.
        let mut shared = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        shared.retain(|_, s| {
            now.duration_since(s.last_used) < Self::IDLE || Arc::strong_count(&s.kind) > 1
        });
        if let Some(s) = shared.get_mut(&key)
            && s.password == digest
        {
            s.last_used = now;
            return Ok(Source::with(s.kind.clone(), config));
        }
        let kind = Arc::new(build(config, Some(password))?);
        shared.insert(
            key,
            Shared {
                kind: kind.clone(),
                password: digest,
                last_used: now,
            },
        );
        Ok(Source::with(kind, config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_and_dot_subject_keys_are_refused() {
        for k in ["*", ".", "..", "", " "] {
            assert!(check_subject_key(k).is_err(), "{k:?}");
        }
        assert!(check_subject_key("SS_001").is_ok());
        assert!(check_subject_key("a/b").is_ok());
    }
}
