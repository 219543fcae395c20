//! The OpenClinica client against fake OC 3.x and 4.x servers on loopback:
//! every auth flow and every fault, asserting complete data or a clear error
//! after the configured retries.
//!
//! The fake (`Fake`) is one axum app that speaks both APIs under
//! `/OpenClinica` plus the 4.x user service, with switches for session and
//! token expiry and a queue of faults applied to the next data requests.
//! Delays inside it simulate a slow server; tests never sleep to wait for
//! work.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body as HttpBody, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, Response, StatusCode, header};
use axum::routing::{get, post};
use futures::StreamExt;
use ocsync::openclinica::{
    Body, CredentialRef, FileConfig, NetworkConfig, Oc3Config, Oc4Config, OcError, QueryFlags,
    RetryPolicy, Scope, Source, SourceConfig, SourceRegistry, Subjects, is_transient_io,
};
use tokio::io::AsyncReadExt;

use crate::harness::Captured;

const STUDY: &str = "S_TEST";
const USER: &str = "ocsync";
const PASSWORD: &str = "pw-Zq81-never-print-me";
const LOGIN_PAGE: &str = "/OpenClinica/pages/login/login";

/// A fault the fake applies to one data request.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Status(u16),
    TooMany {
        retry_after_secs: u64,
    },
    /// Announce the full length, send half, then cut the connection.
    Truncate,
    /// Send the body in 1 KiB chunks this far apart.
    Drip(Duration),
    /// Send half, then fall silent for 10 s.
    Stall,
}

#[derive(Default)]
struct Fake {
    password: String,
    /// Subject key → clinical data document; `*` is the whole study.
    docs: HashMap<String, Vec<u8>>,
    metadata: Vec<u8>,
    /// Delay before answering a data request (to make requests overlap).
    delay: Duration,
    /// Data requests a 3.x session or 4.x token serves; `None`: forever.
    uses_per_login: Option<u32>,
    /// 3.x: live session id → data requests left. One session per user,
    /// like OC: a login ends the others.
    sessions: Mutex<HashMap<String, u32>>,
    /// 4.x: live token → data requests left.
    tokens: Mutex<HashMap<String, u32>>,
    token_as_json: bool,
    token_times: Mutex<Vec<Instant>>,
    /// Faults for the next token requests.
    token_faults: Mutex<VecDeque<Fault>>,
    faults: Mutex<VecDeque<Fault>>,
    logins: AtomicU32,
    token_requests: AtomicU32,
    data_requests: AtomicU32,
    requests: AtomicU32,
    without_accept_language: AtomicU32,
    without_gzip: AtomicU32,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Every secret the fake handed out (session ids, tokens).
    issued: Mutex<Vec<String>>,
    seq: AtomicU32,
}

impl Fake {
    fn new(subjects: usize) -> Self {
        let mut docs = HashMap::new();
        let mut all = String::from("<ODM><ClinicalData StudyOID=\"S_TEST\">");
        for i in 1..=subjects {
            let key = subject(i);
            let sd = subject_data(&key);
            all.push_str(&sd);
            docs.insert(
                key,
                format!("<ODM><ClinicalData StudyOID=\"S_TEST\">{sd}</ClinicalData></ODM>")
                    .into_bytes(),
            );
        }
        all.push_str("</ClinicalData></ODM>");
        docs.insert("*".into(), all.into_bytes());
        Self {
            password: PASSWORD.into(),
            docs,
            metadata: b"<ODM><Study OID=\"S_TEST\"><MetaDataVersion OID=\"v1\"/></Study></ODM>"
                .to_vec(),
            ..Self::default()
        }
    }

    fn fault(&self, f: Fault, times: usize) {
        self.faults
            .lock()
            .unwrap()
            .extend(std::iter::repeat_n(f, times));
    }

    fn doc(&self, key: &str) -> Vec<u8> {
        self.docs[key].clone()
    }

    fn observe(&self, headers: &HeaderMap) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if headers
            .get(header::ACCEPT_LANGUAGE)
            .and_then(|v| v.to_str().ok())
            != Some("en")
        {
            self.without_accept_language.fetch_add(1, Ordering::SeqCst);
        }
        let gzip = headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("gzip"));
        if !gzip {
            self.without_gzip.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn issue(&self, prefix: &str) -> String {
        let s = format!(
            "{prefix}{}x{:08x}",
            self.seq.fetch_add(1, Ordering::SeqCst),
            rand::random::<u32>()
        );
        self.issued.lock().unwrap().push(s.clone());
        s
    }

    fn take(&self, live: &Mutex<HashMap<String, u32>>, secret: Option<&str>) -> bool {
        let mut live = live.lock().unwrap();
        match secret.and_then(|s| live.get_mut(s)) {
            Some(0) | None => false,
            Some(left) => {
                if self.uses_per_login.is_some() {
                    *left -= 1;
                }
                true
            }
        }
    }
}

fn subject(i: usize) -> String {
    format!("SS_{i:03}")
}

/// A subject's data, large enough to arrive in many chunks.
fn subject_data(key: &str) -> String {
    let mut s = format!("<SubjectData SubjectKey=\"{key}\">");
    for n in 0..300 {
        s.push_str(&format!(
            "<ItemData ItemOID=\"I_{n}\" Value=\"{key}-{n}\"/>"
        ));
    }
    s.push_str("</SubjectData>");
    s
}

/// Counts a request as in flight until its body has been sent or dropped.
struct InFlight(Arc<Fake>);

impl InFlight {
    fn new(fake: &Arc<Fake>) -> Self {
        let now = fake.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        fake.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(fake.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn redirect(to: &str) -> Response<HttpBody> {
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, to)
        .body(HttpBody::empty())
        .unwrap()
}

fn status(code: u16) -> Response<HttpBody> {
    Response::builder()
        .status(code)
        .body(HttpBody::from("<html>error page</html>"))
        .unwrap()
}

/// A document, with whatever fault is next in `faults`.
async fn serve(
    fake: &Arc<Fake>,
    doc: Vec<u8>,
    content_type: &str,
    faults: &Mutex<VecDeque<Fault>>,
) -> Response<HttpBody> {
    let guard = InFlight::new(fake);
    if !fake.delay.is_zero() {
        tokio::time::sleep(fake.delay).await;
    }
    let fault = faults.lock().unwrap().pop_front();
    let len = doc.len();
    let builder = Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, len);
    let doc = Bytes::from(doc);
    let body =
        match fault {
            Some(Fault::Status(code)) => return status(code),
            Some(Fault::TooMany { retry_after_secs }) => {
                return Response::builder()
                    .status(StatusCode::TOO_MANY_REQUESTS)
                    .header(header::RETRY_AFTER, retry_after_secs.to_string())
                    .body(HttpBody::empty())
                    .unwrap();
            }
            Some(Fault::Truncate) => {
                // The pause lets hyper flush the headers and the first half
                // before the cut; without it the cut comes before the headers.
                let half = doc.slice(..len / 2);
                let parts: Vec<io::Result<Bytes>> = vec![Ok(half), Err(io::Error::other("cut"))];
                HttpBody::from_stream(futures::stream::iter(parts).enumerate().then(
                    move |(i, p)| {
                        let _ = &guard;
                        async move {
                            if i == 1 {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            p
                        }
                    },
                ))
            }
            Some(Fault::Drip(gap)) => {
                let chunks: Vec<Bytes> = doc.chunks(1024).map(Bytes::copy_from_slice).collect();
                HttpBody::from_stream(futures::stream::iter(chunks).then(move |c| {
                    let _ = &guard;
                    async move {
                        tokio::time::sleep(gap).await;
                        Ok::<_, io::Error>(c)
                    }
                }))
            }
            Some(Fault::Stall) => {
                let (a, b) = (doc.slice(..len / 2), doc.slice(len / 2..));
                HttpBody::from_stream(futures::stream::iter([a, b]).enumerate().then(
                    move |(i, c)| {
                        let _ = &guard;
                        async move {
                            if i == 1 {
                                tokio::time::sleep(Duration::from_secs(10)).await;
                            }
                            Ok::<_, io::Error>(c)
                        }
                    },
                ))
            }
            None => {
                let chunks: Vec<io::Result<Bytes>> = doc
                    .chunks(4096)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                HttpBody::from_stream(futures::stream::iter(chunks).map(move |c| {
                    let _ = &guard;
                    c
                }))
            }
        };
    builder.body(body).unwrap()
}

fn cookie_session(headers: &HeaderMap) -> Option<String> {
    let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
    cookies
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == "JSESSIONID")
        .map(|(_, v)| v.to_owned())
}

async fn oc3_login(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> Response<HttpBody> {
    fake.observe(&headers);
    fake.logins.fetch_add(1, Ordering::SeqCst);
    if form.get("j_username").map(String::as_str) != Some(USER)
        || form.get("j_password") != Some(&fake.password)
    {
        return redirect("/OpenClinica/pages/login/login?action=errorLogin");
    }
    let sid = fake.issue("SID");
    {
        let mut sessions = fake.sessions.lock().unwrap();
        sessions.clear();
        sessions.insert(sid.clone(), fake.uses_per_login.unwrap_or(u32::MAX));
    }
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, "/OpenClinica/MainMenu")
        .header(
            header::SET_COOKIE,
            format!("JSESSIONID={sid}; Path=/OpenClinica; HttpOnly"),
        )
        .body(HttpBody::empty())
        .unwrap()
}

async fn oc3_clinical(
    State(fake): State<Arc<Fake>>,
    UrlPath((study, subject, _, _)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response<HttpBody> {
    fake.observe(&headers);
    fake.data_requests.fetch_add(1, Ordering::SeqCst);
    if !fake.take(&fake.sessions, cookie_session(&headers).as_deref()) {
        return redirect(LOGIN_PAGE);
    }
    match (study == STUDY, fake.docs.get(&subject)) {
        (true, Some(doc)) => {
            serve(
                &fake,
                doc.clone(),
                "application/xml;charset=UTF-8",
                &fake.faults,
            )
            .await
        }
        _ => status(404),
    }
}

async fn oc3_metadata(
    State(fake): State<Arc<Fake>>,
    UrlPath((study, _, _)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response<HttpBody> {
    fake.observe(&headers);
    fake.data_requests.fetch_add(1, Ordering::SeqCst);
    if !fake.take(&fake.sessions, cookie_session(&headers).as_deref()) {
        return redirect(LOGIN_PAGE);
    }
    if study != STUDY {
        return status(404);
    }
    serve(&fake, fake.metadata.clone(), "text/xml", &fake.faults).await
}

fn jwt(subject: &str, exp: u64) -> String {
    use base64::Engine;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        e.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
        e.encode(format!(r#"{{"sub":"{subject}","exp":{exp}}}"#)),
        e.encode("not-a-real-signature")
    )
}

async fn oc4_token(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<serde_json::Value>,
) -> Response<HttpBody> {
    fake.observe(&headers);
    fake.token_requests.fetch_add(1, Ordering::SeqCst);
    {
        // The user service's limit: 2 token requests per rolling minute.
        let mut times = fake.token_times.lock().unwrap();
        times.retain(|t| t.elapsed() < Duration::from_secs(60));
        if times.len() >= 2 {
            return Response::builder()
                .status(StatusCode::TOO_MANY_REQUESTS)
                .header(header::RETRY_AFTER, "60")
                .body(HttpBody::empty())
                .unwrap();
        }
        times.push(Instant::now());
    }
    if let Some(Fault::TooMany { retry_after_secs }) = fake.token_faults.lock().unwrap().pop_front()
    {
        return Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header(header::RETRY_AFTER, retry_after_secs.to_string())
            .body(HttpBody::empty())
            .unwrap();
    }
    if body["username"] != USER || body["password"] != fake.password.as_str() {
        return status(401);
    }
    let exp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 4 * 3600;
    let token = jwt(&fake.issue("user"), exp);
    fake.issued.lock().unwrap().push(token.clone());
    fake.tokens
        .lock()
        .unwrap()
        .insert(token.clone(), fake.uses_per_login.unwrap_or(u32::MAX));
    let body = if fake.token_as_json {
        serde_json::json!({ "access_token": token, "token_type": "bearer" }).to_string()
    } else {
        token
    };
    Response::builder().body(HttpBody::from(body)).unwrap()
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
    State(fake): State<Arc<Fake>>,
    UrlPath((study, subject, _, _)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response<HttpBody> {
    fake.observe(&headers);
    fake.data_requests.fetch_add(1, Ordering::SeqCst);
    if !fake.take(&fake.tokens, bearer(&headers).as_deref()) {
        return status(401);
    }
    if headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) != Some("application/xml") {
        return status(406);
    }
    match (study == STUDY, fake.docs.get(&subject)) {
        (true, Some(doc)) => serve(&fake, doc.clone(), "application/xml", &fake.faults).await,
        _ => status(404),
    }
}

async fn oc4_participants(
    State(fake): State<Arc<Fake>>,
    UrlPath(study): UrlPath<String>,
    headers: HeaderMap,
) -> Response<HttpBody> {
    fake.observe(&headers);
    fake.data_requests.fetch_add(1, Ordering::SeqCst);
    if !fake.take(&fake.tokens, bearer(&headers).as_deref()) {
        return status(401);
    }
    if study != STUDY {
        return status(404);
    }
    let mut keys: Vec<&String> = fake.docs.keys().filter(|k| *k != "*").collect();
    keys.sort();
    let list: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| {
            serde_json::json!({
                "subjectKey": k, "status": "available", "lastModified": "2024-05-06 07:08:09",
                "participantId": "label", "extra": { "nested": true }
            })
        })
        .collect();
    let json = serde_json::to_vec(&list).unwrap();
    serve(&fake, json, "application/json", &Mutex::default()).await
}

/// A running fake, and a secret file holding the password.
struct FakeOc {
    addr: SocketAddr,
    fake: Arc<Fake>,
    dir: tempfile::TempDir,
}

impl FakeOc {
    async fn start(fake: Fake) -> Self {
        let fake = Arc::new(fake);
        let app = Router::new()
            .route("/OpenClinica/j_spring_security_check", post(oc3_login))
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
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("password"), format!("{PASSWORD}\n")).unwrap();
        Self { addr, fake, dir }
    }

    fn password_ref(&self) -> CredentialRef {
        CredentialRef::File(self.dir.path().join("password"))
    }

    fn oc3(&self, network: NetworkConfig) -> Source {
        Source::new(&self.oc3_config(network)).unwrap()
    }

    fn oc3_config(&self, network: NetworkConfig) -> SourceConfig {
        SourceConfig::Oc3(Oc3Config {
            base_url: format!("http://{}/OpenClinica", self.addr).parse().unwrap(),
            study_oid: STUDY.into(),
            username: USER.into(),
            password: self.password_ref(),
            query: QueryFlags::default(),
            network,
        })
    }

    fn oc4(&self, network: NetworkConfig) -> Source {
        Source::new(&SourceConfig::Oc4(Oc4Config {
            base_url: format!("http://{}/OpenClinica", self.addr).parse().unwrap(),
            auth_url: format!("http://{}", self.addr).parse().unwrap(),
            study_oid: STUDY.into(),
            username: USER.into(),
            password: self.password_ref(),
            query: QueryFlags::default(),
            network,
            whole_study: true,
        }))
        .unwrap()
    }

    fn server(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn count(&self, c: &AtomicU32) -> u32 {
        c.load(Ordering::SeqCst)
    }
}

/// Network settings with backoffs of a few milliseconds.
pub(crate) fn net(max_attempts: u32, max_concurrency: usize) -> NetworkConfig {
    NetworkConfig {
        connect_timeout_ms: 2_000,
        response_timeout_ms: 5_000,
        idle_timeout_ms: 2_000,
        max_concurrency,
        retry: RetryPolicy {
            max_attempts,
            base_delay_ms: 2,
            max_delay_ms: 10,
        },
    }
}

pub(crate) async fn read_all(mut body: Body) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    body.read_to_end(&mut out).await?;
    Ok(out)
}

pub(crate) async fn one(source: &Source, scope: Scope) -> Result<Body, OcError> {
    let mut bodies = source.clinical_data(scope);
    let body = bodies.next().await.expect("one document");
    assert!(bodies.next().await.is_none(), "exactly one document");
    body
}

async fn fetch(source: &Source, key: &str) -> Vec<u8> {
    let body = one(source, Scope::Subject(key.into())).await.unwrap();
    assert_eq!(body.subject(), Some(key));
    read_all(body).await.unwrap()
}

fn assert_no_secrets(text: &str, fake: &Fake) {
    assert!(!text.contains(PASSWORD), "password leaked: {text}");
    for secret in fake.issued.lock().unwrap().iter() {
        assert!(
            !text.contains(secret.as_str()),
            "session id or token leaked: {text}"
        );
    }
}

// ---- OC 3.x ----

#[tokio::test]
async fn oc3_logs_in_once_and_reuses_the_session() {
    let oc = FakeOc::start(Fake::new(3)).await;
    let source = oc.oc3(net(5, 4));
    let meta = read_all(source.metadata().await.unwrap()).await.unwrap();
    assert_eq!(meta, oc.fake.metadata);
    let study = read_all(one(&source, Scope::Study).await.unwrap())
        .await
        .unwrap();
    assert_eq!(study, oc.fake.doc("*"));
    for i in 1..=3 {
        assert_eq!(fetch(&source, &subject(i)).await, oc.fake.doc(&subject(i)));
    }
    assert_eq!(oc.count(&oc.fake.logins), 1);
    assert!(oc.count(&oc.fake.requests) >= 6);
    assert_eq!(
        oc.count(&oc.fake.without_accept_language),
        0,
        "Accept-Language: en on every request"
    );
    assert_eq!(
        oc.count(&oc.fake.without_gzip),
        0,
        "gzip accepted on every request"
    );
}

#[tokio::test]
async fn oc3_wrong_password_is_one_login_and_a_permanent_error() {
    let oc = FakeOc::start(Fake {
        password: "another".into(),
        ..Fake::new(1)
    })
    .await;
    let source = oc.oc3(net(5, 4));
    for _ in 0..3 {
        let err = one(&source, Scope::Subject(subject(1))).await.unwrap_err();
        assert!(matches!(err, OcError::AuthRejected { .. }), "{err:?}");
        assert!(!err.is_transient());
        let msg = err.to_string();
        assert!(
            msg.contains(&oc.server())
                && msg.contains(USER)
                && msg.contains("j_spring_security_check"),
            "{msg}"
        );
        assert_no_secrets(&format!("{msg} {err:?}"), &oc.fake);
    }
    assert!(source.metadata().await.is_err());
    assert_eq!(
        oc.count(&oc.fake.logins),
        1,
        "a rejected password is never tried again"
    );
    assert_eq!(oc.count(&oc.fake.data_requests), 0);
}

#[tokio::test]
async fn oc3_expired_session_means_a_transparent_login() {
    let oc = FakeOc::start(Fake {
        uses_per_login: Some(2),
        ..Fake::new(5)
    })
    .await;
    let source = oc.oc3(net(5, 4));
    for i in 1..=5 {
        assert_eq!(fetch(&source, &subject(i)).await, oc.fake.doc(&subject(i)));
    }
    // Sessions serve subjects 1–2, 3–4 and 5.
    assert_eq!(oc.count(&oc.fake.logins), 3);
}

#[tokio::test]
async fn oc3_concurrent_requests_share_one_login_after_expiry() {
    let oc = FakeOc::start(Fake {
        delay: Duration::from_millis(20),
        ..Fake::new(8)
    })
    .await;
    let source = oc.oc3(net(5, 4));
    assert_eq!(fetch(&source, &subject(1)).await, oc.fake.doc(&subject(1)));
    oc.fake.sessions.lock().unwrap().clear();

    let keys: Vec<String> = (1..=8).map(subject).collect();
    let mut bodies = source.clinical_data(Scope::Subjects(keys.clone()));
    for key in &keys {
        // Each body holds a slot until read: read them as they come.
        let body = bodies.next().await.unwrap().unwrap();
        assert_eq!(body.subject(), Some(key.as_str()));
        assert_eq!(read_all(body).await.unwrap(), oc.fake.doc(key));
    }
    assert_eq!(
        oc.count(&oc.fake.logins),
        2,
        "one login, then one re-login for all"
    );
}

#[tokio::test]
async fn oc3_session_lost_again_after_a_fresh_login_is_an_error() {
    let oc = FakeOc::start(Fake {
        uses_per_login: Some(0),
        ..Fake::new(1)
    })
    .await;
    let err = one(&oc.oc3(net(5, 4)), Scope::Subject(subject(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, OcError::SessionLost { .. }), "{err:?}");
    assert_eq!(oc.count(&oc.fake.logins), 2);
}

// ---- retries and faults ----

#[tokio::test]
async fn server_errors_are_retried_until_the_data_is_complete() {
    let oc = FakeOc::start(Fake::new(1)).await;
    oc.fake.fault(Fault::Status(500), 1);
    oc.fake.fault(Fault::Status(503), 2);
    let source = oc.oc3(net(5, 4));
    assert_eq!(fetch(&source, &subject(1)).await, oc.fake.doc(&subject(1)));
    assert_eq!(oc.count(&oc.fake.data_requests), 4);
}

#[tokio::test]
async fn retries_end_in_an_error_naming_server_path_status_and_attempts() {
    let oc = FakeOc::start(Fake::new(1)).await;
    oc.fake.fault(Fault::Status(503), 10);
    let err = one(&oc.oc3(net(3, 4)), Scope::Subject(subject(1)))
        .await
        .unwrap_err();
    assert!(err.is_transient());
    let msg = err.to_string();
    for part in [
        oc.server().as_str(),
        "/OpenClinica/rest/clinicaldata/xml/view/S_TEST/SS_001/*/*",
        "503",
        "attempt 3/3",
    ] {
        assert!(msg.contains(part), "{part:?} missing from {msg}");
    }
    assert_eq!(oc.count(&oc.fake.data_requests), 3);
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let oc = FakeOc::start(Fake::new(1)).await;
    let err = one(&oc.oc3(net(5, 4)), Scope::Subject("SS_UNKNOWN".into()))
        .await
        .unwrap_err();
    assert!(!err.is_transient());
    let msg = err.to_string();
    assert!(
        msg.contains("404") && msg.contains("attempt 1/5") && msg.contains("SS_UNKNOWN"),
        "{msg}"
    );
    assert_eq!(oc.count(&oc.fake.data_requests), 1);
}

#[tokio::test]
async fn too_many_requests_waits_for_retry_after() {
    let oc = FakeOc::start(Fake::new(1)).await;
    oc.fake.fault(
        Fault::TooMany {
            retry_after_secs: 1,
        },
        1,
    );
    let source = oc.oc3(net(5, 4));
    let started = Instant::now();
    assert_eq!(fetch(&source, &subject(1)).await, oc.fake.doc(&subject(1)));
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(oc.count(&oc.fake.data_requests), 2);
}

#[tokio::test]
async fn a_truncated_body_is_a_transient_read_error_and_a_retry_completes() {
    let oc = FakeOc::start(Fake::new(1)).await;
    oc.fake.fault(Fault::Truncate, 1);
    let source = oc.oc3(net(5, 4));
    let body = one(&source, Scope::Subject(subject(1))).await.unwrap();
    let err = match read_all(body).await {
        Ok(all) => panic!("read all {} bytes without error", all.len()),
        Err(e) => e,
    };
    assert!(is_transient_io(&err), "{err:?}");
    let inner = OcError::from_io(&err).unwrap();
    assert!(inner.to_string().contains("SS_001"), "{inner}");
    assert_eq!(fetch(&source, &subject(1)).await, oc.fake.doc(&subject(1)));
}

#[tokio::test]
async fn a_slow_drip_completes() {
    let oc = FakeOc::start(Fake::new(1)).await;
    oc.fake.fault(Fault::Drip(Duration::from_millis(2)), 1);
    let source = oc.oc3(net(5, 4));
    assert_eq!(fetch(&source, &subject(1)).await, oc.fake.doc(&subject(1)));
}

#[tokio::test]
async fn a_stalled_body_fails_after_the_idle_timeout() {
    let oc = FakeOc::start(Fake::new(1)).await;
    oc.fake.fault(Fault::Stall, 1);
    let source = oc.oc3(NetworkConfig {
        idle_timeout_ms: 200,
        ..net(5, 4)
    });
    let started = Instant::now();
    let body = one(&source, Scope::Subject(subject(1))).await.unwrap();
    let err = read_all(body).await.unwrap_err();
    assert!(is_transient_io(&err), "{err:?}");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_slow_consumer_does_not_trip_the_idle_timeout() {
    let oc = FakeOc::start(Fake::new(1)).await;
    let source = oc.oc3(NetworkConfig {
        idle_timeout_ms: 100,
        ..net(5, 4)
    });
    let mut body = one(&source, Scope::Subject(subject(1))).await.unwrap();
    let mut first = [0u8; 16];
    body.read_exact(&mut first).await.unwrap();
    // The consumer is busy (a batch write) for longer than the idle timeout.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut rest = Vec::new();
    body.read_to_end(&mut rest).await.unwrap();
    assert_eq!([&first[..], &rest[..]].concat(), oc.fake.doc(&subject(1)));
}

#[tokio::test]
async fn connection_refused_is_retried_then_reported() {
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), PASSWORD).unwrap();
    let source = Source::new(&SourceConfig::Oc3(Oc3Config {
        base_url: format!("http://{closed}/OpenClinica").parse().unwrap(),
        study_oid: STUDY.into(),
        username: USER.into(),
        password: CredentialRef::File(dir.path().join("pw")),
        query: QueryFlags::default(),
        network: net(2, 4),
    }))
    .unwrap();
    let err = source.metadata().await.unwrap_err();
    assert!(err.is_transient());
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("http://{closed}"))
            && msg.contains("j_spring_security_check")
            && msg.contains("attempt 2/2"),
        "{msg}"
    );
    assert!(!msg.contains(PASSWORD));
}

#[tokio::test]
async fn concurrency_per_server_is_bounded() {
    let oc = FakeOc::start(Fake {
        delay: Duration::from_millis(30),
        ..Fake::new(12)
    })
    .await;
    let source = oc.oc3(net(5, 3));
    let keys: Vec<String> = (1..=12).map(subject).collect();
    let mut bodies = source.clinical_data(Scope::Subjects(keys.clone()));
    for key in &keys {
        let body = bodies.next().await.unwrap().unwrap();
        assert_eq!(body.subject(), Some(key.as_str()));
        assert_eq!(read_all(body).await.unwrap(), oc.fake.doc(key));
    }
    assert!(bodies.next().await.is_none());
    let max = oc.fake.max_in_flight.load(Ordering::SeqCst);
    assert!((2..=3).contains(&max), "max in flight {max}");
}

#[tokio::test]
async fn sources_from_one_registry_share_the_session() {
    let oc = FakeOc::start(Fake::new(2)).await;
    let registry = SourceRegistry::new();
    let a = registry.source(&oc.oc3_config(net(5, 4))).unwrap();
    let b = registry.source(&oc.oc3_config(net(5, 4))).unwrap();
    assert_eq!(fetch(&a, &subject(1)).await, oc.fake.doc(&subject(1)));
    assert_eq!(fetch(&b, &subject(2)).await, oc.fake.doc(&subject(2)));
    assert_eq!(oc.count(&oc.fake.logins), 1);
}

// ---- OC 4.x ----

#[tokio::test]
async fn oc4_token_is_cached_across_calls() {
    for token_as_json in [false, true] {
        let oc = FakeOc::start(Fake {
            token_as_json,
            ..Fake::new(4)
        })
        .await;
        let source = oc.oc4(net(5, 4));
        // 4.x metadata comes with the first listed participant's data.
        assert_eq!(
            read_all(source.metadata().await.unwrap()).await.unwrap(),
            oc.fake.doc(&subject(1))
        );
        for i in 1..=4 {
            assert_eq!(fetch(&source, &subject(i)).await, oc.fake.doc(&subject(i)));
        }
        assert_eq!(oc.count(&oc.fake.token_requests), 1);
        assert_eq!(oc.count(&oc.fake.without_accept_language), 0);
    }
}

#[tokio::test]
async fn oc4_expired_token_is_replaced_once() {
    let oc = FakeOc::start(Fake {
        uses_per_login: Some(3),
        ..Fake::new(5)
    })
    .await;
    let source = oc.oc4(net(5, 4));
    for i in 1..=5 {
        assert_eq!(fetch(&source, &subject(i)).await, oc.fake.doc(&subject(i)));
    }
    assert_eq!(oc.count(&oc.fake.token_requests), 2);
}

#[tokio::test]
async fn oc4_token_endpoint_429_waits_for_retry_after() {
    let oc = FakeOc::start(Fake::new(1)).await;
    oc.fake
        .token_faults
        .lock()
        .unwrap()
        .push_back(Fault::TooMany {
            retry_after_secs: 1,
        });
    let source = oc.oc4(net(5, 4));
    let started = Instant::now();
    assert_eq!(fetch(&source, &subject(1)).await, oc.fake.doc(&subject(1)));
    assert!(started.elapsed() >= Duration::from_millis(950));
    assert_eq!(oc.count(&oc.fake.token_requests), 2);
}

#[tokio::test]
async fn oc4_wrong_password_is_one_token_request_and_a_permanent_error() {
    let oc = FakeOc::start(Fake {
        password: "another".into(),
        ..Fake::new(1)
    })
    .await;
    let source = oc.oc4(net(5, 4));
    for _ in 0..2 {
        let err = one(&source, Scope::Subject(subject(1))).await.unwrap_err();
        assert!(matches!(err, OcError::AuthRejected { .. }), "{err:?}");
        assert!(!err.is_transient());
        assert!(
            err.to_string().contains("/user-service/api/oauth/token"),
            "{err}"
        );
        assert_no_secrets(&format!("{err} {err:?}"), &oc.fake);
    }
    assert_eq!(oc.count(&oc.fake.token_requests), 1);
}

#[tokio::test]
async fn oc4_participants_are_listed() {
    let oc = FakeOc::start(Fake::new(3)).await;
    let Subjects::Listed(list) = oc.oc4(net(5, 4)).subjects().await.unwrap() else {
        panic!("4.x lists participants");
    };
    let keys: Vec<&str> = list.iter().map(|s| s.subject_key.as_str()).collect();
    assert_eq!(keys, ["SS_001", "SS_002", "SS_003"]);
    assert_eq!(list[0].status.as_deref(), Some("available"));
    assert_eq!(
        list[0].last_modified.as_deref(),
        Some("2024-05-06 07:08:09")
    );
}

#[tokio::test]
async fn oc3_subjects_come_as_a_document() {
    let oc = FakeOc::start(Fake::new(2)).await;
    let Subjects::InDocument(body) = oc.oc3(net(5, 4)).subjects().await.unwrap() else {
        panic!("3.x has no participant list");
    };
    assert_eq!(read_all(body).await.unwrap(), oc.fake.doc("*"));
}

// ---- secrets ----

// A current-thread runtime (the default): the subscriber set for this
// thread sees the client, the fake server and hyper alike.
#[tokio::test]
async fn secrets_never_reach_logs_or_errors() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let mut seen = Vec::new();

    // 3.x: expiry and re-login, retries, a truncated body, a stall.
    let oc3 = FakeOc::start(Fake {
        uses_per_login: Some(2),
        ..Fake::new(3)
    })
    .await;
    oc3.fake.fault(Fault::Status(503), 1);
    let source = oc3.oc3(NetworkConfig {
        idle_timeout_ms: 200,
        ..net(3, 2)
    });
    seen.push(format!("{source:?} {}", source.describe()));
    for i in 1..=3 {
        assert_eq!(fetch(&source, &subject(i)).await, oc3.fake.doc(&subject(i)));
    }
    oc3.fake.fault(Fault::Truncate, 1);
    let err = read_all(one(&source, Scope::Study).await.unwrap())
        .await
        .unwrap_err();
    seen.push(format!("{err} {err:?}"));
    oc3.fake.fault(Fault::Status(500), 5);
    let err = one(&source, Scope::Subject(subject(1))).await.unwrap_err();
    seen.push(format!("{err} {err:?}"));
    assert!(oc3.count(&oc3.fake.logins) >= 2);

    // 3.x and 4.x with a wrong password.
    let bad = FakeOc::start(Fake {
        password: "another".into(),
        ..Fake::new(1)
    })
    .await;
    for source in [bad.oc3(net(3, 2)), bad.oc4(net(3, 2))] {
        let err = source.metadata().await.unwrap_err();
        seen.push(format!("{err} {err:?}"));
    }

    // 4.x: token, refresh on 401.
    let oc4 = FakeOc::start(Fake {
        uses_per_login: Some(2),
        ..Fake::new(3)
    })
    .await;
    let source = oc4.oc4(net(3, 2));
    seen.push(format!("{source:?}"));
    for i in 1..=3 {
        assert_eq!(fetch(&source, &subject(i)).await, oc4.fake.doc(&subject(i)));
    }
    assert_eq!(oc4.count(&oc4.fake.token_requests), 2);

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("retrying"),
        "the retries were logged:\n{logs}"
    );
    assert!(
        logs.contains("logging in again"),
        "the re-login was logged:\n{logs}"
    );
    let everything = format!("{logs}\n{}", seen.join("\n"));
    for fake in [&oc3.fake, &bad.fake, &oc4.fake] {
        assert_no_secrets(&everything, fake);
    }
}

// ---- extract files ----

fn touch(path: &Path, content: &str, age_secs: u64) {
    std::fs::write(path, content).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(age_secs))
        .unwrap();
}

fn file_source(path: PathBuf, pattern: &str) -> Source {
    Source::new(&SourceConfig::File(FileConfig {
        path,
        pattern: pattern.into(),
    }))
    .unwrap()
}

#[tokio::test]
async fn the_newest_matching_extract_is_read() {
    let dir = tempfile::tempdir().unwrap();
    touch(&dir.path().join("extract_S_TEST_1.xml"), "old", 300);
    touch(&dir.path().join("extract_S_TEST_2.xml"), "new", 100);
    touch(&dir.path().join("extract_S_OTHER_3.xml"), "other study", 10);
    touch(
        &dir.path().join("extract_S_TEST_4.xml.part"),
        "being written",
        0,
    );
    std::fs::create_dir(dir.path().join("extract_S_TEST_dir.xml")).unwrap();
    let source = file_source(dir.path().into(), "extract_S_TEST_*.xml");
    assert_eq!(
        read_all(source.metadata().await.unwrap()).await.unwrap(),
        b"new"
    );
    let mut bodies = source.clinical_data(Scope::Subjects(vec![subject(1), subject(2)]));
    assert_eq!(
        read_all(bodies.next().await.unwrap().unwrap())
            .await
            .unwrap(),
        b"new"
    );
    assert!(
        bodies.next().await.is_none(),
        "one document, the whole extract"
    );

    let single = file_source(dir.path().join("extract_S_TEST_1.xml"), "*.xml");
    assert_eq!(
        read_all(one(&single, Scope::Study).await.unwrap())
            .await
            .unwrap(),
        b"old"
    );
}

#[tokio::test]
async fn no_matching_extract_names_the_folder_and_pattern() {
    let dir = tempfile::tempdir().unwrap();
    touch(&dir.path().join("notes.txt"), "x", 0);
    let err = one(&file_source(dir.path().into(), "*.xml"), Scope::Study)
        .await
        .unwrap_err();
    assert!(!err.is_transient());
    let msg = err.to_string();
    assert!(
        msg.contains(&dir.path().display().to_string()) && msg.contains("*.xml"),
        "{msg}"
    );

    let missing = dir.path().join("nowhere");
    let err = file_source(missing, "*.xml").metadata().await.unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");
}
