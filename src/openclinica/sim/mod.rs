//! An OpenClinica simulator: an HTTP server that speaks OC 3.x and 4.x
//! REST well enough for the client in [`crate::openclinica`] to be tested,
//! demonstrated and benchmarked against it, in process
//! ([`Simulator::start`]) or as `ocsync oc-sim` ([`cli`]).
//!
//! What it serves, for every configured study (a seeded
//! [`GeneratorConfig`]), under one address:
//!
//! | URL | what |
//! | --- | --- |
//! | `POST /OpenClinica/j_spring_security_check` | 3.x form login: `JSESSIONID`, or a redirect to `…/pages/login/login?action=errorLogin` |
//! | `GET /OpenClinica/pages/login/login` | the login page (HTML, 200) where expired sessions are sent |
//! | `GET /OpenClinica/rest/clinicaldata/xml/view/{Study}/{Subject\|*}/*/*` | 3.x clinical data (`includeAudits`, `includeDNs`, `metadata`) |
//! | `GET /OpenClinica/rest/metadata/xml/view/{Study}/*/*` | 3.x metadata |
//! | `POST /user-service/api/oauth/token` | 4.x token (JWT with `exp`), rate limited per client address |
//! | `GET /OpenClinica/pages/auth/api/clinicaldata/{Study}/{Subject\|*}/*/*` | 4.x clinical data (`includeMetadata`, `includeAudits`, `includeDNs`) |
//! | `GET /OpenClinica/pages/auth/api/clinicaldata/studies/{Study}/participants` | 4.x participants (JSON) |
//! | `GET /_sim/counters`, `GET`/`PUT /_sim/faults` | counters; faults at runtime |
//! | `POST /_sim/studies/{Study}/edit` | edit subjects: `{"subjects": K}` or `{"keys": [...]}` |
//! | `POST /_sim/expire`, `POST /_sim/unlock` | end every session and token; unlock the account |
//!
//! So the client's base URL is `http://{addr}/OpenClinica` for both
//! schemes and the 4.x `auth_url` is `http://{addr}`. `{Study}` may be a
//! site OID; `{Subject}` a `SubjectKey` or a label. The `/_sim` routes are
//! the simulator's own and need no credentials.
//!
//! Documents are generated while they are sent, never held whole: a 1 GB
//! study costs the memory of one generator buffer per request.
//! Authentication ([`AuthConfig`], `auth.rs`) and faults ([`Faults`]) behave as
//! their docs say; `model.rs` says what the simulator decides where OC's
//! behaviour is unknown (unknown subjects, `showArchived`).
//!
//! What it does not know: event and form filters (only `*`), discrepancy
//! note content beyond the generator's, TLS, more than one account. It
//! never logs a password, session id or token, and logs no clinical
//! values: requests are logged by route and status only.

mod auth;
pub mod cli;
mod faults;
mod model;
mod routes;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::serve::ListenerExt;
use secrecy::SecretString;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use url::Url;

pub use self::auth::AuthConfig;
pub use self::faults::Faults;
pub use self::model::{Participant, Scheme, subject_index};
use crate::odm::generate::GeneratorConfig;

/// Everything the simulator is started with.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    pub studies: Vec<GeneratorConfig>,
    /// The one account both APIs accept.
    pub username: String,
    pub password: SecretString,
    pub auth: AuthConfig,
    pub faults: Faults,
    /// Seeds the fault RNG and the choice of subjects to edit.
    pub seed: u64,
}

impl SimConfig {
    /// A simulator on `127.0.0.1:0` with one study and one account, no
    /// faults, OC's own auth limits.
    pub fn new(study: GeneratorConfig, username: &str, password: SecretString) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            studies: vec![study],
            username: username.to_owned(),
            password,
            auth: AuthConfig::default(),
            faults: Faults::default(),
            seed: 1,
        }
    }
}

/// What the simulator refuses.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("oc-sim configuration: {0}")]
    Config(String),
    #[error("no study or site {0}")]
    UnknownStudy(String),
    #[error("study {study} has no subject {subject}")]
    UnknownSubject { study: String, subject: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What the simulator has seen, for tests and for `GET /_sim/counters`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Responses by route (`oc3.clinicaldata`, `oc4.token`, …) and status.
    pub requests: BTreeMap<&'static str, BTreeMap<u16, u64>>,
    /// 3.x login attempts, and those that got a session.
    pub logins: u64,
    pub logins_ok: u64,
    /// Login or token requests refused because the account was locked.
    pub locked_refusals: u64,
    /// 4.x token requests, those that got a token, and those over the
    /// rate limit.
    pub token_requests: u64,
    pub tokens_issued: u64,
    pub token_rate_limited: u64,
    /// 3.x sessions found expired by a data request.
    pub sessions_expired: u64,
    pub bodies_truncated: u64,
    /// Body bytes sent.
    pub body_bytes: u64,
    /// Data requests being answered now (bodies included), and the most
    /// at once.
    pub in_flight: u64,
    pub max_in_flight: u64,
}

impl Counters {
    /// Responses of `route` with `status`.
    pub fn count(&self, route: &str, status: u16) -> u64 {
        self.requests
            .get(route)
            .and_then(|m| m.get(&status))
            .copied()
            .unwrap_or(0)
    }

    /// Responses of `route`, whatever their status.
    pub fn total(&self, route: &str) -> u64 {
        self.requests.get(route).map_or(0, |m| m.values().sum())
    }
}

/// The simulator's state, shared by the handlers and the handle. Each lock
/// is taken alone and never held across an await.
pub(crate) struct Shared {
    studies: Mutex<model::Studies>,
    auth: Mutex<auth::Auth>,
    faults: Mutex<faults::FaultState>,
    counters: Mutex<Counters>,
}

/// A handler that panicked cannot leave these structures half-updated in
/// a way that matters to a simulator: recover the lock.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn studies(&self) -> MutexGuard<'_, model::Studies> {
        lock(&self.studies)
    }
    fn auth(&self) -> MutexGuard<'_, auth::Auth> {
        lock(&self.auth)
    }
    fn faults(&self) -> MutexGuard<'_, faults::FaultState> {
        lock(&self.faults)
    }
    fn counters(&self) -> MutexGuard<'_, Counters> {
        lock(&self.counters)
    }
}

/// Starts simulators.
pub struct Simulator;

impl Simulator {
    /// Binds `config.listen` and serves until the handle is shut down or
    /// dropped. Must be called inside a tokio runtime.
    pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
        config.faults.validate().map_err(SimError::Config)?;
        if config.studies.is_empty() {
            return Err(SimError::Config("no study to serve".into()));
        }
        if config.username.is_empty() {
            return Err(SimError::Config("the username is empty".into()));
        }
        let shared = Arc::new(Shared {
            studies: Mutex::new(model::Studies::new(config.studies, config.seed)?),
            auth: Mutex::new(auth::Auth::new(
                config.auth,
                config.username,
                config.password,
            )),
            faults: Mutex::new(faults::FaultState::new(config.faults, config.seed)),
            counters: Mutex::new(Counters::default()),
        });
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| SimError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SimError::Bind {
            addr: config.listen,
            source,
        })?;
        // Without TCP_NODELAY a small response written in pieces (headers,
        // then chunks) waits on the client's delayed ACK: 40 ms per request
        // on Linux loopback, which would be measured as the client's.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "oc-sim: cannot set TCP_NODELAY");
            }
        });
        let app = routes::router(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "oc-sim: server stopped");
            }
        });
        tracing::info!(%addr, "oc-sim: listening");
        Ok(SimHandle {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }
}

/// A running simulator. Dropping it stops the server (requests in flight
/// finish); [`SimHandle::shutdown`] also waits for that.
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn url(&self, path: &str) -> Url {
        Url::parse(&format!("http://{}{path}", self.addr)).expect("a socket address is a host")
    }

    /// The 3.x client's `base_url`: `http://{addr}/OpenClinica`.
    pub fn base_url_oc3(&self) -> Url {
        self.url("/OpenClinica")
    }

    /// The 4.x client's `base_url`: `http://{addr}/OpenClinica`.
    pub fn base_url_oc4(&self) -> Url {
        self.url("/OpenClinica")
    }

    /// The 4.x client's `auth_url`: `http://{addr}`.
    pub fn auth_url(&self) -> Url {
        self.url("")
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        self.shared.counters().clone()
    }

    /// The faults in force (the "next N" ones count down as they strike).
    pub fn faults(&self) -> Faults {
        self.shared.faults().faults.clone()
    }

    /// Replaces the faults; "every Nth" counting starts again.
    pub fn set_faults(&self, faults: Faults) -> Result<(), SimError> {
        faults.validate().map_err(SimError::Config)?;
        self.shared.faults().set(faults);
        Ok(())
    }

    /// A study as it is now served: its configuration with the edits made
    /// so far (`oc4_dates`, metadata and audit flags are set per request).
    pub fn study(&self, oid: &str) -> Option<GeneratorConfig> {
        self.shared.studies().config(oid).cloned()
    }

    /// Edits these subjects (keys or labels): some of their values change,
    /// their audit-log IDs and timestamps move past every existing one, and
    /// their 4.x `UpdatedDate` and participant `lastModified` follow.
    /// Other subjects stay byte for byte as they were. Returns the keys.
    pub fn edit_subjects(&self, study: &str, subjects: &[&str]) -> Result<Vec<String>, SimError> {
        self.shared.studies().edit(study, subjects)
    }

    /// Edits `k` subjects picked at random (seeded); returns their keys.
    pub fn edit_random_subjects(&self, study: &str, k: u32) -> Result<Vec<String>, SimError> {
        self.shared.studies().edit_random(study, k)
    }

    /// Ends every 3.x session and 4.x token now.
    pub fn expire_sessions(&self) {
        self.shared.auth().expire_all();
    }

    /// Unlocks the account after failed logins locked it.
    pub fn unlock(&self) {
        self.shared.auth().unlock();
    }

    /// Stops accepting connections and waits (up to 5 s) for the requests
    /// in flight; a body nobody reads is cut after that.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
