//! [`OsSim`]: an OpenSpecimen simulator, an axum server on `127.0.0.1:0`
//! that speaks enough of OpenSpecimen's REST API (`/openspecimen/rest/ng`)
//! for [`super::OsClient`] and [`super::OpenSpecimenSink`] to be tested,
//! demonstrated and benchmarked against it.
//!
//! | request | what it does |
//! | --- | --- |
//! | `POST /sessions` | `{loginName, password, domainName}` → `{token}`; 401 for a wrong password |
//! | `GET /collection-protocol-registrations?cpShortTitle=&ppid=` | registrations matching (a list) |
//! | `POST /collection-protocol-registrations`, `PUT …/{id}` | create, replace |
//! | `GET /visits/byname?visitName=` | the visit, or 404 |
//! | `POST /visits`, `PUT /visits/{id}` | create, replace |
//! | `GET /specimens?label=` | specimens with that label (a list) |
//! | `POST /specimens`, `PUT /specimens/{id}` | create, replace |
//! | `POST /forms/{formId}/data`, `PUT /forms/{formId}/data` | create, replace (the body's `id`) a form record |
//! | `DELETE /forms/{formId}/data/{recordId}` | soft delete (`activityStatus: Disabled`) |
//!
//! Every call but the login needs `X-OS-API-TOKEN` with a live token; a
//! token unused for longer than the configured idle time, or ended by
//! [`OsSim::expire_tokens`], answers 401 as OpenSpecimen does. Validation
//! failures answer 400 with OpenSpecimen's error shape
//! `[{"code": "…", "message": "…"}]`: unknown CP, site, event label or
//! parent, bad dates, genders or quantities, duplicate PPIDs, visit names or
//! labels, and PPIDs the test asked to reject ([`OsSim::reject_ppid`]).
//! [`OsSim::fail_next`] answers the next requests with given statuses (5xx,
//! 429 with `Retry-After: 0`) before any other processing.
//!
//! Tests read the store ([`OsSim::registrations`], …) and the request log
//! ([`OsSim::requests`]: method, path, query, headers, JSON body, status).
//! The log never holds the password: the login body's `password` is
//! replaced by `"<redacted>"`.
//!
//! What it does not know: OpenSpecimen's permissions, specimen
//! requirements, label generation, aliquots, CP events' own settings, and
//! the exact wording of OpenSpecimen's messages (the codes and shapes are
//! OpenSpecimen's; the sentences are the simulator's). It logs nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use url::Url;

use super::config::FormLevel;

/// The path prefix of the API, as on a default OpenSpecimen installation.
pub const API_PREFIX: &str = "/openspecimen/rest/ng/";

/// What the simulator is started with.
#[derive(Debug, Clone)]
pub struct OsSimConfig {
    pub login_name: String,
    pub password: SecretString,
    pub domain: String,
    /// CP short titles that exist.
    pub cps: Vec<String>,
    /// Site names that exist.
    pub sites: Vec<String>,
    /// Event labels that exist; empty means any label is accepted.
    pub event_labels: Vec<String>,
    /// Forms that exist.
    pub forms: Vec<SimForm>,
    /// A token unused for longer than this answers 401; `None`: never.
    pub token_idle: Option<Duration>,
}

/// A form with its context in the CP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimForm {
    pub form_id: i64,
    pub form_ctxt_id: i64,
    pub level: FormLevel,
}

impl Default for OsSimConfig {
    fn default() -> Self {
        Self {
            login_name: "ocsync".to_owned(),
            password: SecretString::from("os-sim-password"),
            domain: "openspecimen".to_owned(),
            cps: vec!["CP-TEST".to_owned()],
            sites: vec![
                "Main".to_owned(),
                "Site One".to_owned(),
                "Site one".to_owned(),
            ],
            event_labels: Vec::new(),
            forms: Vec::new(),
            token_idle: None,
        }
    }
}

/// One request as the simulator saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedRequest {
    pub method: String,
    /// The URL path, e.g. `/openspecimen/rest/ng/visits`.
    pub path: String,
    pub query: Option<String>,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The body as JSON (`None` when empty or not JSON).
    pub body: Option<Value>,
    pub status: u16,
}

impl LoggedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// The path below `/openspecimen/rest/ng`, e.g. `/visits`.
    pub fn api_path(&self) -> &str {
        self.path
            .strip_prefix(API_PREFIX.trim_end_matches('/'))
            .unwrap_or(&self.path)
    }
}

/// A running simulator; stops when dropped.
pub struct OsSim {
    /// The application root to configure as `base_url`
    /// (`http://127.0.0.1:{port}/openspecimen`).
    pub base_url: Url,
    pub addr: SocketAddr,
    state: Arc<Mutex<SimState>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct SimState {
    config: OsSimConfig,
    tokens: HashMap<String, Instant>,
    next_id: i64,
    cprs: BTreeMap<i64, Value>,
    visits: BTreeMap<i64, Value>,
    specimens: BTreeMap<i64, Value>,
    /// Record id → (form id, record).
    form_records: BTreeMap<i64, (i64, Value)>,
    log: Vec<LoggedRequest>,
    faults: VecDeque<u16>,
    rejected_ppids: HashMap<String, String>,
    logins: u64,
}

type Shared = Arc<Mutex<SimState>>;

fn lock(state: &Shared) -> MutexGuard<'_, SimState> {
    // A panic in a handler leaves the store as it was; keep serving.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl OsSim {
    /// A simulator with [`OsSimConfig::default`].
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(OsSimConfig::default()).await
    }

    pub async fn start_with(config: OsSimConfig) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let state: Shared = Arc::new(Mutex::new(SimState {
            config,
            next_id: 1,
            ..SimState::default()
        }));
        let app = Router::new().fallback(handle).with_state(state.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        let base_url = Url::parse(&format!("http://{addr}/openspecimen")).expect("valid URL");
        Ok(Self {
            base_url,
            addr,
            state,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        lock(&self.state).log.clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.state).log.clear();
    }

    /// Registrations (with their participant), by id.
    pub fn registrations(&self) -> Vec<Value> {
        lock(&self.state).cprs.values().cloned().collect()
    }

    pub fn visits(&self) -> Vec<Value> {
        lock(&self.state).visits.values().cloned().collect()
    }

    pub fn specimens(&self) -> Vec<Value> {
        lock(&self.state).specimens.values().cloned().collect()
    }

    /// Form records as `(form id, record)`.
    pub fn form_records(&self) -> Vec<(i64, Value)> {
        lock(&self.state).form_records.values().cloned().collect()
    }

    /// Answers the next requests (any route, login included) with these
    /// statuses, one each, before looking at them.
    pub fn fail_next(&self, statuses: &[u16]) {
        lock(&self.state).faults.extend(statuses.iter().copied());
    }

    /// Ends every session, as OpenSpecimen's idle timeout does.
    pub fn expire_tokens(&self) {
        lock(&self.state).tokens.clear();
    }

    /// Makes registrations with this PPID fail validation with `message`.
    pub fn reject_ppid(&self, ppid: &str, message: &str) {
        lock(&self.state)
            .rejected_ppids
            .insert(ppid.to_owned(), message.to_owned());
    }

    /// Login attempts so far (accepted or not).
    pub fn logins(&self) -> u64 {
        lock(&self.state).logins
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for OsSim {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

// ---------------------------------------------------------------------------
// Requests.

type Answer = (StatusCode, Value);

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Answer {
    (status, json!([{ "code": code, "message": message.into() }]))
}

fn bad(code: &str, message: impl Into<String>) -> Answer {
    error(StatusCode::BAD_REQUEST, code, message)
}

fn not_found(code: &str, message: impl Into<String>) -> Answer {
    error(StatusCode::NOT_FOUND, code, message)
}

async fn handle(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let json_body: Option<Value> = if body.is_empty() {
        None
    } else {
        serde_json::from_slice(&body).ok()
    };
    let path = uri.path().to_owned();
    let query: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let mut st = lock(&state);
    let mut logged_body = json_body.clone();
    if path.ends_with("/sessions")
        && let Some(Value::Object(m)) = &mut logged_body
        && m.contains_key("password")
    {
        m.insert("password".into(), json!("<redacted>"));
    }
    let mut entry = LoggedRequest {
        method: method.as_str().to_owned(),
        path: path.clone(),
        query: uri.query().map(str::to_owned),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: logged_body,
        status: 0,
    };
    let (status, answer, retry_after) = if let Some(fault) = st.faults.pop_front() {
        let status = StatusCode::from_u16(fault).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let (s, v) = error(status, "SIM_FAULT", "injected fault");
        (s, v, status == StatusCode::TOO_MANY_REQUESTS)
    } else if !body.is_empty() && json_body.is_none() {
        let (s, v) = bad("INVALID_REQUEST", "Malformed JSON request body");
        (s, v, false)
    } else {
        let (s, v) = route(&mut st, &method, &path, &query, &headers, json_body);
        (s, v, false)
    };
    entry.status = status.as_u16();
    st.log.push(entry);
    drop(st);
    let mut response = (status, axum::Json(answer)).into_response();
    if retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("0"));
    }
    response
}

fn route(
    st: &mut SimState,
    method: &Method,
    path: &str,
    query: &[(String, String)],
    headers: &HeaderMap,
    body: Option<Value>,
) -> Answer {
    let Some(rest) = path.strip_prefix(API_PREFIX) else {
        return not_found("NOT_FOUND", "No such resource");
    };
    let segments: Vec<&str> = rest.split('/').collect();
    if *method == Method::POST && segments == ["sessions"] {
        return login(st, body);
    }
    if let Err(answer) = authenticate(st, headers) {
        return answer;
    }
    let q = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let has_json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if matches!(*method, Method::POST | Method::PUT) && !has_json_type {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "INVALID_REQUEST",
            "Content type must be application/json",
        );
    }
    let id = |s: &str| s.parse::<i64>().ok();
    match (method.clone(), segments.as_slice()) {
        (Method::GET, ["collection-protocol-registrations"]) => {
            let found: Vec<Value> = st
                .cprs
                .values()
                .filter(|c| {
                    q("cpShortTitle").is_none_or(|t| c["cpShortTitle"] == t)
                        && q("ppid").is_none_or(|p| c["ppid"] == p)
                })
                .cloned()
                .collect();
            (StatusCode::OK, Value::Array(found))
        }
        (Method::POST, ["collection-protocol-registrations"]) => save_cpr(st, None, body),
        (Method::PUT, ["collection-protocol-registrations", i]) => match id(i) {
            Some(i) => save_cpr(st, Some(i), body),
            None => not_found("CPR_NOT_FOUND", "Participant registration not found"),
        },
        (Method::GET, ["visits", "byname"]) => {
            let name = q("visitName").unwrap_or("");
            match st.visits.values().find(|v| v["name"] == name) {
                Some(v) => (StatusCode::OK, v.clone()),
                None => not_found("VISIT_NOT_FOUND", "Visit not found"),
            }
        }
        (Method::POST, ["visits"]) => save_visit(st, None, body),
        (Method::PUT, ["visits", i]) => match id(i) {
            Some(i) => save_visit(st, Some(i), body),
            None => not_found("VISIT_NOT_FOUND", "Visit not found"),
        },
        (Method::GET, ["specimens"]) => {
            let label = q("label");
            let found: Vec<Value> = st
                .specimens
                .values()
                .filter(|s| label.is_none_or(|l| s["label"] == l))
                .cloned()
                .collect();
            (StatusCode::OK, Value::Array(found))
        }
        (Method::POST, ["specimens"]) => save_specimen(st, None, body),
        (Method::PUT, ["specimens", i]) => match id(i) {
            Some(i) => save_specimen(st, Some(i), body),
            None => not_found("SPECIMEN_NOT_FOUND", "Specimen not found"),
        },
        (Method::POST, ["forms", f, "data"]) => match id(f) {
            Some(f) => save_form_record(st, f, false, body),
            None => not_found("FORM_NOT_FOUND", "Form not found"),
        },
        (Method::PUT, ["forms", f, "data"]) => match id(f) {
            Some(f) => save_form_record(st, f, true, body),
            None => not_found("FORM_NOT_FOUND", "Form not found"),
        },
        (Method::DELETE, ["forms", f, "data", r]) => match (id(f), id(r)) {
            (Some(f), Some(r)) => match st.form_records.get_mut(&r) {
                Some((form, record)) if *form == f => {
                    record["activityStatus"] = json!("Disabled");
                    (StatusCode::OK, json!({ "id": r }))
                }
                _ => not_found("FORM_RECORD_NOT_FOUND", "Form data record not found"),
            },
            _ => not_found("FORM_RECORD_NOT_FOUND", "Form data record not found"),
        },
        _ => not_found("NOT_FOUND", "No such resource"),
    }
}

fn login(st: &mut SimState, body: Option<Value>) -> Answer {
    st.logins += 1;
    let body = body.unwrap_or(Value::Null);
    let field = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or("");
    if field("domainName") != st.config.domain {
        return bad("AUTH_INVALID_DOMAIN", "Invalid domain name");
    }
    if field("loginName") != st.config.login_name
        || field("password") != st.config.password.expose_secret()
    {
        return error(
            StatusCode::UNAUTHORIZED,
            "AUTH_INVALID_CREDENTIALS",
            "You have entered an incorrect login name or password",
        );
    }
    let token: String = (0..32)
        .map(|_| char::from(b"0123456789abcdef"[rand::random_range(0..16usize)]))
        .collect();
    st.tokens.insert(token.clone(), Instant::now());
    (
        StatusCode::OK,
        json!({ "id": 1, "loginName": st.config.login_name, "token": token }),
    )
}

fn authenticate(st: &mut SimState, headers: &HeaderMap) -> Result<(), Answer> {
    let refused = || {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "AUTH_INVALID_TOKEN",
            "Invalid or expired API token",
        ))
    };
    let Some(token) = headers.get("x-os-api-token").and_then(|v| v.to_str().ok()) else {
        return refused();
    };
    let idle = st.config.token_idle;
    match st.tokens.get_mut(token) {
        Some(last) if idle.is_none_or(|d| last.elapsed() <= d) => {
            *last = Instant::now();
            Ok(())
        }
        Some(_) => {
            st.tokens.remove(token);
            refused()
        }
        None => refused(),
    }
}

fn object(body: Option<Value>) -> Result<Map<String, Value>, Answer> {
    match body {
        Some(Value::Object(m)) => Ok(m),
        _ => Err(bad("INVALID_REQUEST", "A JSON object is required")),
    }
}

fn str_of<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

/// `yyyy-MM-dd` with a plausible month and day.
fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|t| t.parse::<u32>().ok());
    matches!(
        (num(0..4), num(5..7), num(8..10)),
        (Some(_), Some(1..=12), Some(1..=31))
    ) && b
        .iter()
        .enumerate()
        .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// `yyyy-MM-dd` or `yyyy-MM-dd HH:mm:ss`.
fn is_date_time(s: &str) -> bool {
    if s.len() == 10 {
        return is_date(s);
    }
    s.len() == 19
        && is_date(&s[..10])
        && s.as_bytes()[10] == b' '
        && s[11..].bytes().enumerate().all(|(i, c)| {
            if i == 2 || i == 5 {
                c == b':'
            } else {
                c.is_ascii_digit()
            }
        })
}

fn check_date(m: &Map<String, Value>, k: &str, what: &str) -> Result<(), Answer> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if is_date(s) => Ok(()),
        Some(v) => Err(bad("INVALID_DATE", format!("Invalid {what}: {v}"))),
    }
}

fn check_activity(m: &Map<String, Value>) -> Result<(), Answer> {
    match str_of(m, "activityStatus") {
        None | Some("Active" | "Disabled" | "Closed") => Ok(()),
        Some(other) => Err(bad(
            "INVALID_ACTIVITY_STATUS",
            format!("Invalid activity status: {other}"),
        )),
    }
}

fn next_id(st: &mut SimState) -> i64 {
    let id = st.next_id;
    st.next_id += 1;
    id
}

/// Stores `m` under `id` (a new id when `None`), answering the stored
/// record; 404 when `id` does not exist in `store`.
fn store(
    st: &mut SimState,
    which: fn(&mut SimState) -> &mut BTreeMap<i64, Value>,
    id: Option<i64>,
    mut m: Map<String, Value>,
    missing: (&str, &str),
) -> Answer {
    let id = match id {
        Some(id) if which(st).contains_key(&id) => id,
        Some(_) => return not_found(missing.0, missing.1),
        None => next_id(st),
    };
    m.insert("id".into(), json!(id));
    let v = Value::Object(m);
    which(st).insert(id, v.clone());
    (StatusCode::OK, v)
}

fn save_cpr(st: &mut SimState, id: Option<i64>, body: Option<Value>) -> Answer {
    let checked = (|| {
        let m = object(body)?;
        let cp = str_of(&m, "cpShortTitle").unwrap_or("");
        if !st.config.cps.iter().any(|c| c == cp) {
            return Err(bad(
                "CP_NOT_FOUND",
                format!("Collection protocol {cp} does not exist"),
            ));
        }
        let ppid = str_of(&m, "ppid").unwrap_or("");
        if ppid.is_empty() {
            return Err(bad(
                "CPR_PPID_REQUIRED",
                "Participant protocol ID is required",
            ));
        }
        if let Some(msg) = st.rejected_ppids.get(ppid) {
            return Err(bad("CPR_INVALID", msg.clone()));
        }
        if st
            .cprs
            .iter()
            .any(|(k, c)| Some(*k) != id && c["cpShortTitle"] == cp && c["ppid"] == ppid)
        {
            return Err(bad(
                "CPR_DUP_PPID",
                format!("Duplicate participant protocol ID: {ppid}"),
            ));
        }
        check_date(&m, "registrationDate", "registration date")?;
        check_activity(&m)?;
        let Some(Value::Object(p)) = m.get("participant") else {
            return Err(bad(
                "CPR_PARTICIPANT_REQUIRED",
                "Participant details are required",
            ));
        };
        check_date(p, "birthDate", "birth date")?;
        match str_of(p, "gender") {
            None | Some("Male" | "Female" | "Unknown" | "Unspecified") => {}
            Some(g) => {
                return Err(bad(
                    "PARTICIPANT_INVALID_GENDER",
                    format!("Invalid gender: {g}"),
                ));
            }
        }
        check_activity(p)?;
        Ok(m)
    })();
    match checked {
        Ok(m) => store(
            st,
            |s| &mut s.cprs,
            id,
            m,
            ("CPR_NOT_FOUND", "Participant registration not found"),
        ),
        Err(answer) => answer,
    }
}

fn save_visit(st: &mut SimState, id: Option<i64>, body: Option<Value>) -> Answer {
    let checked = (|| {
        let mut m = object(body)?;
        // `cprId`, or `ppid` + `cpShortTitle`, as OpenSpecimen accepts.
        let cpr = match m.get("cprId").and_then(Value::as_i64) {
            Some(c) => st.cprs.contains_key(&c).then_some(c),
            None => st
                .cprs
                .iter()
                .find(|(_, c)| {
                    str_of(&m, "ppid").is_some_and(|p| c["ppid"] == p)
                        && str_of(&m, "cpShortTitle").is_some_and(|t| c["cpShortTitle"] == t)
                })
                .map(|(k, _)| *k),
        };
        let Some(cpr) = cpr else {
            return Err(bad("CPR_NOT_FOUND", "Invalid participant registration"));
        };
        m.insert("cprId".into(), json!(cpr));
        let label = str_of(&m, "eventLabel").unwrap_or("");
        if label.is_empty()
            || (!st.config.event_labels.is_empty()
                && !st.config.event_labels.iter().any(|l| l == label))
        {
            return Err(bad(
                "CPE_NOT_FOUND",
                format!("Invalid event label: {label}"),
            ));
        }
        let name = str_of(&m, "name").unwrap_or("");
        if name.is_empty() {
            return Err(bad("VISIT_NAME_REQUIRED", "Visit name is required"));
        }
        if st
            .visits
            .iter()
            .any(|(k, v)| Some(*k) != id && v["name"] == name)
        {
            return Err(bad(
                "VISIT_DUP_NAME",
                format!("Visit name {name} is already in use"),
            ));
        }
        match str_of(&m, "site") {
            Some(site) if st.config.sites.iter().any(|s| s == site) => {}
            Some(site) => return Err(bad("SITE_NOT_FOUND", format!("Invalid site: {site}"))),
            None => return Err(bad("VISIT_SITE_REQUIRED", "Visit site is required")),
        }
        match str_of(&m, "status") {
            None | Some("Complete" | "Pending" | "Missed Collection") => {}
            Some(s) => {
                return Err(bad(
                    "VISIT_INVALID_STATUS",
                    format!("Invalid visit status: {s}"),
                ));
            }
        }
        check_date(&m, "visitDate", "visit date")?;
        check_activity(&m)?;
        Ok(m)
    })();
    match checked {
        Ok(m) => store(
            st,
            |s| &mut s.visits,
            id,
            m,
            ("VISIT_NOT_FOUND", "Visit not found"),
        ),
        Err(answer) => answer,
    }
}

fn save_specimen(st: &mut SimState, id: Option<i64>, body: Option<Value>) -> Answer {
    let checked = (|| {
        let m = object(body)?;
        let visit = m.get("visitId").and_then(Value::as_i64);
        if !visit.is_some_and(|v| st.visits.contains_key(&v)) {
            return Err(bad("VISIT_NOT_FOUND", "Invalid visit"));
        }
        if let Some(label) = str_of(&m, "label")
            && st
                .specimens
                .iter()
                .any(|(k, s)| Some(*k) != id && s["label"] == label)
        {
            return Err(bad(
                "SPECIMEN_DUP_LABEL",
                format!("Specimen label {label} is already in use"),
            ));
        }
        if str_of(&m, "type").is_none_or(str::is_empty) {
            return Err(bad("SPECIMEN_TYPE_REQUIRED", "Specimen type is required"));
        }
        match m.get("initialQty") {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.as_f64().is_some_and(|q| q >= 0.0) => {}
            Some(q) => {
                return Err(bad(
                    "SPECIMEN_INVALID_QTY",
                    format!("Invalid initial quantity: {q}"),
                ));
            }
        }
        match m.get("collectionEvent").and_then(|e| e.get("time")) {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if is_date_time(t) => {}
            Some(t) => return Err(bad("INVALID_DATE", format!("Invalid collection time: {t}"))),
        }
        check_activity(&m)?;
        Ok(m)
    })();
    match checked {
        Ok(m) => store(
            st,
            |s| &mut s.specimens,
            id,
            m,
            ("SPECIMEN_NOT_FOUND", "Specimen not found"),
        ),
        Err(answer) => answer,
    }
}

fn save_form_record(st: &mut SimState, form_id: i64, update: bool, body: Option<Value>) -> Answer {
    let Some(form) = st
        .config
        .forms
        .iter()
        .find(|f| f.form_id == form_id)
        .copied()
    else {
        return not_found("FORM_NOT_FOUND", format!("Form {form_id} not found"));
    };
    let mut m = match object(body) {
        Ok(m) => m,
        Err(answer) => return answer,
    };
    let app = m.get("appData").cloned().unwrap_or(Value::Null);
    if app.get("formCtxtId").and_then(Value::as_i64) != Some(form.form_ctxt_id) {
        return bad("FORM_INVALID_CTXT", "Invalid form context");
    }
    let object_id = app.get("objectId").and_then(Value::as_i64);
    let exists = object_id.is_some_and(|o| match form.level {
        FormLevel::Participant => st.cprs.contains_key(&o),
        FormLevel::Visit => st.visits.contains_key(&o),
        FormLevel::Specimen => st.specimens.contains_key(&o),
    });
    if !exists {
        return bad(
            "FORM_INVALID_OBJECT",
            format!("Invalid {} for form data", form.level.as_str()),
        );
    }
    let id = if update {
        match m.get("id").and_then(Value::as_i64) {
            Some(r) if st.form_records.get(&r).is_some_and(|(f, _)| *f == form_id) => r,
            _ => return not_found("FORM_RECORD_NOT_FOUND", "Form data record not found"),
        }
    } else {
        next_id(st)
    };
    m.insert("id".into(), json!(id));
    let v = Value::Object(m);
    st.form_records.insert(id, (form_id, v.clone()));
    (StatusCode::OK, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_checked_as_openspecimen_would() {
        assert!(is_date("2022-04-12"));
        assert!(!is_date("1987"));
        assert!(!is_date("2022-13-01"));
        assert!(!is_date("2022-04-12 10:00:00"));
        assert!(is_date_time("2022-04-12 10:00:00"));
        assert!(is_date_time("2022-04-12"));
        assert!(!is_date_time("2022-04-12T10:00:00"));
    }
}
