//! The simulator's HTTP face: routes, the order in which a data request
//! meets latency, faults, authentication and the study, and the streaming
//! of generated documents with their body faults (truncation, slow drip).
//!
//! Order for a data request, as a real deployment would have it: latency,
//! then the faults a proxy or an overloaded server answers with (429, 5xx),
//! then the application's authentication, then the document. The document
//! is written by the generator on a blocking thread into a small channel,
//! so memory stays at a few generator buffers whatever the study's size,
//! and a client that goes away stops the generator.
//!
//! Bodies are sent with chunked framing (the length is not known before
//! the document is written): a truncated body ends without the final
//! chunk, on a connection that is then closed, which a client sees as a
//! body broken off, never as a short but complete document.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::auth::Granted;
use super::faults::{Early, Faults, Shaping};
use super::model::{DocRequest, Scheme};
use super::{Shared, SimError};
use crate::odm::generate::{GeneratorConfig, generate};

type App = Arc<Shared>;

const LOGIN_PAGE: &str = "/OpenClinica/pages/login/login";
const LOGIN_ERROR: &str = "/OpenClinica/pages/login/login?action=errorLogin";
/// Where a locked account's login is sent; the word "locked" is what a
/// client can recognise.
const LOGIN_LOCKED: &str = "/OpenClinica/pages/login/login?action=errorLogin&reason=locked";
const XML: &str = "application/xml;charset=UTF-8";
/// Bodies per request in the generator's channel: enough to keep the
/// socket busy, few enough that memory stays small.
const CHANNEL_CHUNKS: usize = 4;

pub(crate) fn router(shared: App) -> Router {
    Router::new()
        .route("/OpenClinica/j_spring_security_check", post(oc3_login))
        .route(LOGIN_PAGE, get(login_page))
        .route("/OpenClinica/MainMenu", get(login_page))
        .route(
            "/OpenClinica/rest/clinicaldata/xml/view/{study}/{subject}/{event}/{form}",
            get(oc3_clinical),
        )
        .route(
            "/OpenClinica/rest/metadata/xml/view/{study}/{event}/{form}",
            get(oc3_metadata),
        )
        .route("/user-service/api/oauth/token", post(oc4_token))
        .route(
            "/OpenClinica/pages/auth/api/clinicaldata/{study}/{subject}/{event}/{form}",
            get(oc4_clinical),
        )
        .route(
            "/OpenClinica/pages/auth/api/clinicaldata/studies/{study}/participants",
            get(oc4_participants),
        )
        .route("/_sim/counters", get(admin_counters))
        .route("/_sim/faults", get(admin_faults).put(admin_set_faults))
        .route("/_sim/studies/{study}/edit", post(admin_edit))
        .route("/_sim/expire", post(admin_expire))
        .route("/_sim/unlock", post(admin_unlock))
        .with_state(shared)
}

/// Counts the response under its route and logs route and status (never
/// the path: it names subjects).
fn reply(shared: &Shared, route: &'static str, response: Response<Body>) -> Response<Body> {
    let status = response.status().as_u16();
    *shared
        .counters()
        .requests
        .entry(route)
        .or_default()
        .entry(status)
        .or_default() += 1;
    tracing::debug!(route, status, "oc-sim: answered");
    response
}

fn plain(status: StatusCode, content_type: &'static str, body: impl Into<Body>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(body.into())
        .expect("static headers")
}

/// What Tomcat sends for an error: a small HTML page.
fn error_page(status: StatusCode) -> Response<Body> {
    plain(
        status,
        "text/html;charset=UTF-8",
        format!(
            "<html><body><h1>HTTP Status {}</h1></body></html>",
            status.as_u16()
        ),
    )
}

fn redirect(to: &'static str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, to)
        .body(Body::empty())
        .expect("static headers")
}

fn too_many(retry_after_secs: u64) -> Response<Body> {
    Response::builder()
        .status(StatusCode::TOO_MANY_REQUESTS)
        .header(header::RETRY_AFTER, retry_after_secs.to_string())
        .body(Body::empty())
        .expect("static headers")
}

fn yes(query: &HashMap<String, String>, name: &str, default: bool) -> bool {
    match query.get(name).map(|v| v.to_ascii_lowercase()) {
        Some(v) if v == "y" || v == "yes" || v == "true" => true,
        Some(v) if v == "n" || v == "no" || v == "false" => false,
        _ => default,
    }
}

// ---- 3.x ----

async fn login_page(State(shared): State<App>) -> Response<Body> {
    let page = plain(
        StatusCode::OK,
        "text/html;charset=UTF-8",
        "<!DOCTYPE html><html><head><title>OpenClinica</title></head><body>\
         <form action=\"/OpenClinica/j_spring_security_check\" method=\"post\">\
         <input name=\"j_username\"/><input name=\"j_password\" type=\"password\"/>\
         </form></body></html>",
    );
    reply(&shared, "oc3.login_page", page)
}

async fn oc3_login(
    State(shared): State<App>,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> Response<Body> {
    let field = |name: &str| form.get(name).map_or("", String::as_str);
    let granted = shared
        .auth()
        .login(field("j_username"), field("j_password"), Instant::now());
    let response = {
        let mut counters = shared.counters();
        counters.logins += 1;
        match granted {
            Granted::Yes(session) => {
                counters.logins_ok += 1;
                let cookie = format!("JSESSIONID={session}; Path=/OpenClinica; HttpOnly");
                let mut cookie = HeaderValue::from_str(&cookie).expect("hex session id");
                cookie.set_sensitive(true);
                Response::builder()
                    .status(StatusCode::FOUND)
                    .header(header::LOCATION, "/OpenClinica/MainMenu")
                    .header(header::SET_COOKIE, cookie)
                    .body(Body::empty())
                    .expect("valid headers")
            }
            Granted::Locked => {
                counters.locked_refusals += 1;
                redirect(LOGIN_LOCKED)
            }
            Granted::Rejected | Granted::Limited(_) => redirect(LOGIN_ERROR),
        }
    };
    reply(&shared, "oc3.login", response)
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == "JSESSIONID")
        .map(|(_, value)| value.to_owned())
}

async fn oc3_clinical(
    State(shared): State<App>,
    Path((study, subject, event, form)): Path<(String, String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response<Body> {
    let what = What::Clinical {
        study,
        subject,
        event,
        form,
        metadata: yes(&query, "metadata", true),
        audits: yes(&query, "includeAudits", false),
        notes: yes(&query, "includeDNs", false),
    };
    data(shared, "oc3.clinicaldata", Scheme::Oc3, &headers, what).await
}

async fn oc3_metadata(
    State(shared): State<App>,
    Path((study, event, form)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response<Body> {
    let what = What::Metadata { study, event, form };
    data(shared, "oc3.metadata", Scheme::Oc3, &headers, what).await
}

// ---- 4.x ----

#[derive(Deserialize)]
struct TokenRequest {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

async fn oc4_token(
    State(shared): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> Response<Body> {
    let Ok(request) = serde_json::from_slice::<TokenRequest>(&body) else {
        shared.counters().token_requests += 1;
        let bad = plain(
            StatusCode::BAD_REQUEST,
            "application/json",
            r#"{"error":"invalid_request"}"#,
        );
        return reply(&shared, "oc4.token", bad);
    };
    let granted = shared.auth().token(
        peer.ip(),
        &request.username,
        &request.password,
        Instant::now(),
        SystemTime::now(),
    );
    drop(request);
    let response = {
        let mut counters = shared.counters();
        counters.token_requests += 1;
        let unauthorized = || {
            plain(
                StatusCode::UNAUTHORIZED,
                "application/json",
                r#"{"error":"invalid_grant"}"#,
            )
        };
        match granted {
            Granted::Yes(token) => {
                counters.tokens_issued += 1;
                plain(StatusCode::OK, "text/plain;charset=UTF-8", token)
            }
            Granted::Limited(secs) => {
                counters.token_rate_limited += 1;
                too_many(secs)
            }
            Granted::Locked => {
                counters.locked_refusals += 1;
                unauthorized()
            }
            Granted::Rejected => unauthorized(),
        }
    };
    reply(&shared, "oc4.token", response)
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_owned)
}

async fn oc4_clinical(
    State(shared): State<App>,
    Path((study, subject, event, form)): Path<(String, String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response<Body> {
    let what = What::Clinical {
        study,
        subject,
        event,
        form,
        metadata: yes(&query, "includeMetadata", false),
        audits: yes(&query, "includeAudits", false),
        notes: yes(&query, "includeDNs", false),
    };
    data(shared, "oc4.clinicaldata", Scheme::Oc4, &headers, what).await
}

async fn oc4_participants(
    State(shared): State<App>,
    Path(study): Path<String>,
    headers: HeaderMap,
) -> Response<Body> {
    let what = What::Participants { study };
    data(shared, "oc4.participants", Scheme::Oc4, &headers, what).await
}

// ---- data requests ----

enum What {
    Clinical {
        study: String,
        subject: String,
        event: String,
        form: String,
        metadata: bool,
        audits: bool,
        notes: bool,
    },
    Metadata {
        study: String,
        event: String,
        form: String,
    },
    Participants {
        study: String,
    },
}

/// Counts a data request as in flight until its body is sent or dropped.
struct InFlight(App);

impl InFlight {
    fn enter(shared: &App) -> Self {
        let mut c = shared.counters();
        c.in_flight += 1;
        c.max_in_flight = c.max_in_flight.max(c.in_flight);
        Self(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.counters().in_flight -= 1;
    }
}

async fn data(
    shared: App,
    route: &'static str,
    scheme: Scheme,
    headers: &HeaderMap,
    what: What,
) -> Response<Body> {
    let flight = InFlight::enter(&shared);
    let latency = shared.faults().latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let early = shared.faults().early();
    match early {
        Early::Pass => {}
        Early::TooMany { retry_after_secs } => {
            return reply(&shared, route, too_many(retry_after_secs));
        }
        Early::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return reply(&shared, route, error_page(status));
        }
    }
    if let Some(refused) = authenticate(&shared, scheme, headers) {
        return reply(&shared, route, refused);
    }
    let response = match answer(&shared, scheme, what) {
        Ok(Answer::Document(config)) => {
            let shaping = shared.faults().shaping();
            let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
            tokio::task::spawn_blocking(move || {
                // An error here is the client going away: nothing to do.
                let _ = generate(&config, ChannelWriter(tx));
            });
            stream(&shared, rx, shaping, flight, XML)
        }
        Ok(Answer::Json(bytes)) => {
            let shaping = shared.faults().shaping();
            let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
            tokio::spawn(async move {
                let bytes = Bytes::from(bytes);
                for at in (0..bytes.len()).step_by(64 * 1024) {
                    let end = (at + 64 * 1024).min(bytes.len());
                    if tx.send(bytes.slice(at..end)).await.is_err() {
                        return;
                    }
                }
            });
            stream(&shared, rx, shaping, flight, "application/json")
        }
        Err(Refusal(status, message)) => plain(status, "text/plain", message),
    };
    reply(&shared, route, response)
}

/// `None` when the request's session or token is good; else the answer
/// OC gives: 3.x a redirect to the login page, 4.x 401.
fn authenticate(shared: &Shared, scheme: Scheme, headers: &HeaderMap) -> Option<Response<Body>> {
    let (session_every, token_every) = {
        let f = shared.faults();
        (f.faults.session_expiry_every, f.faults.token_expiry_every)
    };
    let now = Instant::now();
    match scheme {
        Scheme::Oc3 => {
            let used =
                shared
                    .auth()
                    .use_session(session_cookie(headers).as_deref(), session_every, now);
            match used {
                Ok(()) => None,
                Err(expired) => {
                    if expired {
                        shared.counters().sessions_expired += 1;
                    }
                    Some(redirect(LOGIN_PAGE))
                }
            }
        }
        Scheme::Oc4 => {
            if shared
                .auth()
                .use_token(bearer(headers).as_deref(), token_every, now)
            {
                None
            } else {
                let mut r = plain(
                    StatusCode::UNAUTHORIZED,
                    "application/json",
                    r#"{"error":"invalid_token"}"#,
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
                Some(r)
            }
        }
    }
}

enum Answer {
    Document(GeneratorConfig),
    Json(Vec<u8>),
}

/// Why a data request has no document: the status and message to send.
struct Refusal(StatusCode, String);

impl From<SimError> for Refusal {
    fn from(e: SimError) -> Self {
        Self(StatusCode::NOT_FOUND, e.to_string())
    }
}

fn answer(shared: &Shared, scheme: Scheme, what: What) -> Result<Answer, Refusal> {
    let wildcard_only = |parts: &[&str]| {
        if parts.iter().all(|p| *p == "*") {
            Ok(())
        } else {
            Err(Refusal(
                StatusCode::BAD_REQUEST,
                "the simulator serves only * for events and forms".into(),
            ))
        }
    };
    let studies = shared.studies();
    match what {
        What::Clinical {
            study,
            subject,
            event,
            form,
            metadata,
            audits,
            notes,
        } => {
            wildcard_only(&[&event, &form])?;
            let request = DocRequest {
                scheme,
                study: &study,
                subject: (subject != "*").then_some(subject.as_str()),
                metadata,
                audits,
                notes,
            };
            let document = studies.document(&request)?;
            let limit = shared.faults().faults.max_document_subjects;
            let subjects = document.subject_range.as_ref().map_or(0, |r| r.len());
            if limit > 0 && subjects > limit as usize {
                return Err(Refusal(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "java.lang.OutOfMemoryError: Java heap space".into(),
                ));
            }
            Ok(Answer::Document(document))
        }
        What::Metadata { study, event, form } => {
            wildcard_only(&[&event, &form])?;
            Ok(Answer::Document(studies.metadata(&study, scheme)?))
        }
        What::Participants { study } => {
            let list = studies.participants(&study)?;
            Ok(Answer::Json(
                serde_json::to_vec(&list).expect("plain strings serialise"),
            ))
        }
    }
}

/// The generator's output, chunk by chunk, into a channel.
struct ChannelWriter(mpsc::Sender<Bytes>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Bytes::copy_from_slice(buf))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A 200 response whose body is `source`, shaped by the body faults.
fn stream(
    shared: &App,
    source: mpsc::Receiver<Bytes>,
    shaping: Shaping,
    flight: InFlight,
    content_type: &'static str,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(2);
    let shared = shared.clone();
    tokio::spawn(async move {
        let _flight = flight;
        shape(&shared, source, tx, shaping).await;
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(body)
        .expect("static headers")
}

/// Moves chunks from the generator to the response, applying truncation
/// and drip. Returns when the body is complete, cut, or the client left.
async fn shape(
    shared: &Shared,
    mut source: mpsc::Receiver<Bytes>,
    out: mpsc::Sender<io::Result<Bytes>>,
    shaping: Shaping,
) {
    let Some(limit) = shaping.truncate_after else {
        while let Some(chunk) = source.recv().await {
            if !send(shared, &out, chunk, shaping.drip).await {
                return;
            }
        }
        return;
    };
    // One chunk is held back to know whether the body would end before
    // the limit: then it is cut inside that last chunk, so that a cut body
    // is never a complete one.
    let mut sent = 0u64;
    let mut held: Option<Bytes> = None;
    loop {
        match source.recv().await {
            Some(chunk) => {
                let Some(previous) = held.replace(chunk) else {
                    continue;
                };
                let room = limit.saturating_sub(sent);
                if room <= previous.len() as u64 {
                    let _ = send(shared, &out, previous.slice(..room as usize), shaping.drip).await;
                    break;
                }
                sent += previous.len() as u64;
                if !send(shared, &out, previous, shaping.drip).await {
                    return;
                }
            }
            None => {
                let last = held.take().unwrap_or_default();
                let room = limit.saturating_sub(sent);
                let keep = if room < last.len() as u64 {
                    room as usize
                } else {
                    last.len() / 2
                };
                let _ = send(shared, &out, last.slice(..keep), shaping.drip).await;
                break;
            }
        }
    }
    shared.counters().bodies_truncated += 1;
    // Let the server write out what was sent (headers included) before the
    // error makes it drop the connection; without the pause the cut can
    // come before the headers and look like a refused request instead.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let _ = out
        .send(Err(io::Error::other("oc-sim: body truncated on purpose")))
        .await;
}

/// Sends one chunk, in drip-sized pieces when dripping. False when the
/// client is gone.
async fn send(
    shared: &Shared,
    out: &mpsc::Sender<io::Result<Bytes>>,
    chunk: Bytes,
    drip: Option<(usize, Duration)>,
) -> bool {
    if chunk.is_empty() {
        return true;
    }
    let pieces: Vec<Bytes> = match drip {
        Some((size, _)) => (0..chunk.len())
            .step_by(size)
            .map(|at| chunk.slice(at..(at + size).min(chunk.len())))
            .collect(),
        None => vec![chunk],
    };
    for piece in pieces {
        if let Some((_, delay)) = drip {
            tokio::time::sleep(delay).await;
        }
        let n = piece.len() as u64;
        if out.send(Ok(piece)).await.is_err() {
            return false;
        }
        shared.counters().body_bytes += n;
    }
    true
}

// ---- admin ----

async fn admin_counters(State(shared): State<App>) -> Response<Body> {
    let counters = shared.counters().clone();
    let json = serde_json::to_vec(&counters).expect("counters serialise");
    plain(StatusCode::OK, "application/json", json)
}

async fn admin_faults(State(shared): State<App>) -> Response<Body> {
    let faults = shared.faults().faults.clone();
    let json = serde_json::to_vec(&faults).expect("faults serialise");
    plain(StatusCode::OK, "application/json", json)
}

async fn admin_set_faults(State(shared): State<App>, body: Bytes) -> Response<Body> {
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return plain(StatusCode::BAD_REQUEST, "text/plain", e.to_string()),
    };
    if let Err(e) = faults.validate() {
        return plain(StatusCode::BAD_REQUEST, "text/plain", e);
    }
    tracing::info!("oc-sim: faults changed");
    shared.faults().set(faults.clone());
    let json = serde_json::to_vec(&faults).expect("faults serialise");
    plain(StatusCode::OK, "application/json", json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EditRequest {
    /// Edit this many subjects, picked at random (seeded).
    subjects: Option<u32>,
    /// Or these subjects (keys or labels).
    keys: Option<Vec<String>>,
}

async fn admin_edit(
    State(shared): State<App>,
    Path(study): Path<String>,
    body: Bytes,
) -> Response<Body> {
    let request: EditRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return plain(StatusCode::BAD_REQUEST, "text/plain", e.to_string()),
    };
    let edited = match (request.subjects, request.keys) {
        (Some(k), None) => shared.studies().edit_random(&study, k),
        (None, Some(keys)) => {
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            shared.studies().edit(&study, &refs)
        }
        _ => {
            return plain(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "give either \"subjects\" (a number) or \"keys\" (a list)",
            );
        }
    };
    match edited {
        Ok(keys) => {
            tracing::info!(study = %study, subjects = keys.len(), "oc-sim: subjects edited");
            let json = serde_json::json!({ "edited": keys }).to_string();
            plain(StatusCode::OK, "application/json", json)
        }
        Err(e @ (SimError::UnknownStudy(_) | SimError::UnknownSubject { .. })) => {
            plain(StatusCode::NOT_FOUND, "text/plain", e.to_string())
        }
        Err(e) => plain(StatusCode::BAD_REQUEST, "text/plain", e.to_string()),
    }
}

async fn admin_expire(State(shared): State<App>) -> StatusCode {
    shared.auth().expire_all();
    tracing::info!("oc-sim: every session and token ended");
    StatusCode::NO_CONTENT
}

async fn admin_unlock(State(shared): State<App>) -> StatusCode {
    shared.auth().unlock();
    tracing::info!("oc-sim: account unlocked");
    StatusCode::NO_CONTENT
}
