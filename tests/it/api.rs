//! The HTTP API's guard rails: every role on every route (allowed and
//! 403), missing, unknown and revoked tokens (401), the 409 and 422
//! problem shapes, body and page limits, the OpenAPI document, and the
//! token CLI. Requests go through the real router (tower `oneshot`) on a
//! database of the test's own.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use ocsync::api::tokens::{self, Role};
use ocsync::api::{AppState, router};
use ocsync::cp::{CpConfig, store};
use serde_json::Value;
use tower::ServiceExt;

use crate::harness::{TestDb, ocsync, output, stderr};

struct Api {
    t: TestDb,
    app: axum::Router,
    viewer: String,
    operator: String,
    admin: String,
}

async fn api() -> Api {
    let t = TestDb::migrated().await;
    let cp = CpConfig::from_toml(
        r#"
id = "CP-A"
[source]
kind = "file"
path = "/nonexistent/study.xml"
"#,
        "test",
    )
    .unwrap();
    store::add(&t.pool, &cp).await.unwrap();
    let viewer = tokens::create(&t.pool, "v", Role::Viewer).await.unwrap();
    let operator = tokens::create(&t.pool, "op", Role::Operator).await.unwrap();
    let admin = tokens::create(&t.pool, "adm", Role::Admin).await.unwrap();
    let app = router(AppState {
        pool: t.pool.clone(),
    });
    Api {
        t,
        app,
        viewer,
        operator,
        admin,
    }
}

struct Answer {
    status: StatusCode,
    content_type: String,
    www_authenticate: Option<String>,
    body: Value,
}

async fn call(
    app: &axum::Router,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Answer {
    let is_put = method == Method::PUT;
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if !body.is_empty() {
        // PUT /api/v1/cps/{cp} takes TOML; every other body is JSON.
        let ct = if is_put {
            "application/toml"
        } else {
            "application/json"
        };
        req = req.header(header::CONTENT_TYPE, ct);
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let h = |n| {
        resp.headers()
            .get(n)
            .map(|v: &axum::http::HeaderValue| v.to_str().unwrap().to_owned())
    };
    let content_type = h(header::CONTENT_TYPE).unwrap_or_default();
    let www_authenticate = h(header::WWW_AUTHENTICATE);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    Answer {
        status,
        content_type,
        www_authenticate,
        body,
    }
}

fn assert_problem(a: &Answer, status: StatusCode, kind: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.content_type, "application/problem+json", "{}", a.body);
    assert_eq!(
        a.body["type"],
        format!("https://ocsync.dev/problems/{kind}"),
        "{}",
        a.body
    );
    assert_eq!(a.body["status"], status.as_u16());
    assert!(a.body["title"].is_string() && a.body["detail"].is_string());
}

#[tokio::test]
async fn every_role_on_every_route() {
    let a = api().await;
    // A run to read, abort and report on (queued; no worker runs here).
    let run: String = sqlx::query_scalar("SELECT ocsync.enqueue_sync('CP-A', 'all')")
        .fetch_one(&a.t.pool)
        .await
        .unwrap();
    let routes: Vec<(Method, String, Role, &str)> = vec![
        (Method::GET, "/api/v1/runs".into(), Role::Viewer, ""),
        (Method::GET, format!("/api/v1/runs/{run}"), Role::Viewer, ""),
        (
            Method::GET,
            format!("/api/v1/runs/{run}/errors.csv"),
            Role::Viewer,
            "",
        ),
        (Method::GET, "/api/v1/cps".into(), Role::Viewer, ""),
        (Method::GET, "/api/v1/cps/CP-A".into(), Role::Viewer, ""),
        (
            Method::POST,
            format!("/api/v1/runs/{run}/abort"),
            Role::Operator,
            "",
        ),
        (
            Method::POST,
            "/api/v1/cps/CP-A/runs".into(),
            Role::Operator,
            r#"{"mode":"all"}"#,
        ),
        // Last: the runs above are aborted by now, so the edit may proceed.
        (
            Method::PUT,
            "/api/v1/cps/CP-A?expected_version=1".into(),
            Role::Admin,
            CP_A_EDITED,
        ),
    ];
    for (method, path, least, body) in &routes {
        // No token, a malformed header, an unknown token: 401 with the challenge.
        for token in [None, Some(""), Some("ocs_nope")] {
            let r = call(&a.app, method.clone(), path, token, body).await;
            assert_problem(&r, StatusCode::UNAUTHORIZED, "unauthorized");
            assert!(r.www_authenticate.as_deref().unwrap().starts_with("Bearer"));
        }
        for (role, token) in [
            (Role::Viewer, &a.viewer),
            (Role::Operator, &a.operator),
            (Role::Admin, &a.admin),
        ] {
            let r = call(&a.app, method.clone(), path, Some(token), body).await;
            if role >= *least {
                assert!(
                    r.status.is_success(),
                    "{role} on {method} {path}: {} {}",
                    r.status,
                    r.body
                );
                // The enqueue succeeded once; free the CP for the next role.
                if *method == Method::POST && path.ends_with("/runs") {
                    assert_eq!(r.body["requested_by"], role_name(role));
                    let id = r.body["id"].as_str().unwrap();
                    call(
                        &a.app,
                        Method::POST,
                        &format!("/api/v1/runs/{id}/abort"),
                        Some(&a.operator),
                        "",
                    )
                    .await;
                }
            } else {
                assert_problem(&r, StatusCode::FORBIDDEN, "forbidden");
            }
        }
    }
    // The aborted run records who aborted it, in the API and the Import Logs.
    let r = call(
        &a.app,
        Method::GET,
        &format!("/api/v1/runs/{run}"),
        Some(&a.viewer),
        "",
    )
    .await;
    assert_eq!(r.body["status"], "Aborted");
    assert_eq!(r.body["aborted_by"], "op");
    let by: Option<String> =
        sqlx::query_scalar("SELECT aborted_by FROM ocsync.import_logs WHERE run_id = $1")
            .bind(&run)
            .fetch_one(&a.t.pool)
            .await
            .unwrap();
    assert_eq!(by.as_deref(), Some("op"));
    // Probes and the document need no token.
    for path in ["/healthz", "/readyz", "/api/openapi.json"] {
        assert_eq!(
            call(&a.app, Method::GET, path, None, "").await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    // A revoked token is refused from then on.
    tokens::revoke(&a.t.pool, "v").await.unwrap();
    let r = call(&a.app, Method::GET, "/api/v1/runs", Some(&a.viewer), "").await;
    assert_problem(&r, StatusCode::UNAUTHORIZED, "unauthorized");
}

/// CP-A with a bigger batch and an oc3 source whose password is a reference.
const CP_A_EDITED: &str = r#"
id = "CP-A"
batch_size = 7

[source]
kind = "oc3"
base_url = "https://oc.example.org"
study_oid = "S_A"
username = "ocsync"
password = { env = "OC_PASSWORD" }
"#;

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Viewer => "v",
        Role::Operator => "op",
        Role::Admin => "adm",
    }
}

#[tokio::test]
async fn conflicts_and_invalid_requests_are_problem_documents() {
    let a = api().await;
    let op = Some(a.operator.as_str());
    let first = call(&a.app, Method::POST, "/api/v1/cps/CP-A/runs", op, "").await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert_eq!(first.body["mode"], "incremental");
    let id = first.body["id"].as_str().unwrap();
    let r = call(&a.app, Method::POST, "/api/v1/cps/CP-A/runs", op, "{}").await;
    assert_problem(&r, StatusCode::CONFLICT, "active-run");
    assert_eq!(r.body["run_id"], id);
    assert_eq!(r.body["run_status"], "Queued");

    let too_many = format!(
        r#"{{"mode":"subjects","subjects":[{}]}}"#,
        (0..1001)
            .map(|i| format!("\"SS_{i}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    for (path, body) in [
        ("/api/v1/cps/CP-A/runs", r#"{"mode":"everything"}"#),
        (
            "/api/v1/cps/CP-A/runs",
            r#"{"mode":"all","requested_by":"someone else"}"#,
        ),
        ("/api/v1/cps/CP-A/runs", r#"{"mode":"subjects"}"#),
        (
            "/api/v1/cps/CP-A/runs",
            r#"{"mode":"all","subjects":["SS_1"]}"#,
        ),
        (
            "/api/v1/cps/CP-A/runs",
            r#"{"mode":"subjects","subjects":[1]}"#,
        ),
        ("/api/v1/cps/CP-A/runs", too_many.as_str()),
        ("/api/v1/cps/%20/runs", "{}"),
    ] {
        let r = call(&a.app, Method::POST, path, op, body).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid-request");
        assert!(
            !r.body.to_string().to_lowercase().contains("sql"),
            "{}",
            r.body
        );
    }
    let r = call(
        &a.app,
        Method::POST,
        "/api/v1/cps/CP-A/runs",
        op,
        "{\"mode\":",
    )
    .await;
    assert_problem(&r, StatusCode::BAD_REQUEST, "bad-request");
    let big = format!(
        r#"{{"mode":"subjects","subjects":"{}"}}"#,
        "S,".repeat(40_000)
    );
    let r = call(&a.app, Method::POST, "/api/v1/cps/CP-A/runs", op, &big).await;
    assert_problem(&r, StatusCode::PAYLOAD_TOO_LARGE, "body-too-large");
    let r = call(&a.app, Method::POST, "/api/v1/cps/NOPE/runs", op, "{}").await;
    assert_problem(&r, StatusCode::NOT_FOUND, "not-found");
    for q in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "status=running",
        "bogus=1",
    ] {
        let r = call(&a.app, Method::GET, &format!("/api/v1/runs?{q}"), op, "").await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid-request");
    }
    let r = call(
        &a.app,
        Method::GET,
        "/api/v1/runs?limit=1000&status=queued&cp=CP-A",
        op,
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["runs"].as_array().unwrap().len(), 1);
    for path in [
        "/api/v1/runs/NOPE",
        "/api/v1/runs/01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "/api/v1/cps/NOPE",
    ] {
        let r = call(&a.app, Method::GET, path, op, "").await;
        assert_problem(&r, StatusCode::NOT_FOUND, "not-found");
    }
}

#[tokio::test]
async fn editing_a_cp_checks_the_body_the_version_and_active_runs() {
    let a = api().await;
    let adm = Some(a.admin.as_str());
    let put = async |path: &str, body: &str| call(&a.app, Method::PUT, path, adm, body).await;
    // Bad TOML: 422 naming line, column and key; a password is never echoed.
    for (body, expected) in [
        (
            "id = \"CP-A\"\nsource = { kind = \"file\", path = \"/d\" }\nbatchsize = 3\n",
            "body:3:",
        ),
        (
            "id = \"CP-A\"\nsource = { kind = \"oc3\", base_url = \"https://x/\", study_oid = \"S\", username = \"u\", password = \"hunter2-secret\" }\n",
            "body:2:",
        ),
        ("id = \"CP-A\"\n[source\n", "body:2:"),
    ] {
        let r = put("/api/v1/cps/CP-A?expected_version=1", body).await;
        assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid-request");
        let detail = r.body["detail"].as_str().unwrap();
        assert!(detail.contains(expected), "{detail}");
        assert!(!r.body.to_string().contains("hunter2"), "{}", r.body);
    }
    let r = put(
        "/api/v1/cps/CP-A?expected_version=1",
        "id = \"CP-A\"\nsource = { kind = \"file\", path = \"/d\" }\nbatchsize = 3\n",
    )
    .await;
    assert!(
        r.body["detail"].as_str().unwrap().contains("batchsize"),
        "{}",
        r.body
    );
    // An id other than the path's; a missing version; not TOML.
    let other = CP_A_EDITED.replace("\"CP-A\"", "\"CP-B\"");
    let r = put("/api/v1/cps/CP-A?expected_version=1", &other).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid-request");
    assert!(
        r.body["detail"].as_str().unwrap().contains("CP-B"),
        "{}",
        r.body
    );
    let r = put("/api/v1/cps/CP-A", CP_A_EDITED).await;
    assert_problem(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid-request");
    let r = call(&a.app, Method::POST, "/api/v1/cps/CP-A/runs", adm, "{}").await;
    assert_eq!(r.status, StatusCode::CREATED); // (JSON body: sanity of `call`)
    let run = r.body["id"].as_str().unwrap().to_owned();
    // An active run: 409 with its id and status, as the runs route says it.
    let r = put("/api/v1/cps/CP-A?expected_version=1", CP_A_EDITED).await;
    assert_problem(&r, StatusCode::CONFLICT, "active-run");
    assert_eq!(r.body["run_id"], run.as_str());
    assert_eq!(r.body["run_status"], "Queued");
    call(
        &a.app,
        Method::POST,
        &format!("/api/v1/runs/{run}/abort"),
        adm,
        "",
    )
    .await;
    // Unknown CP: 404.
    let r = put(
        "/api/v1/cps/NOPE?expected_version=1",
        &CP_A_EDITED.replace("\"CP-A\"", "\"NOPE\""),
    )
    .await;
    assert_problem(&r, StatusCode::NOT_FOUND, "not-found");
    // Success: 200 with the stored configuration and its new version.
    let r = put("/api/v1/cps/CP-A?expected_version=1", CP_A_EDITED).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["id"], "CP-A");
    assert_eq!(r.body["version"], 2);
    assert_eq!(r.body["config"]["batch_size"], 7);
    assert_eq!(r.body["config"]["source"]["password"]["env"], "OC_PASSWORD");
    let shown = call(&a.app, Method::GET, "/api/v1/cps/CP-A", adm, "").await;
    assert_eq!(shown.body, r.body);
    // The same edit again from version 1: 409 naming the current version.
    let r = put("/api/v1/cps/CP-A?expected_version=1", CP_A_EDITED).await;
    assert_problem(&r, StatusCode::CONFLICT, "version-conflict");
    assert_eq!(r.body["current_version"], 2);
    // An active run made in SQL (no worker runs here).
    let run: String = sqlx::query_scalar("SELECT ocsync.enqueue_sync('CP-A', 'all')")
        .fetch_one(&a.t.pool)
        .await
        .unwrap();
    let r = put("/api/v1/cps/CP-A?expected_version=2", CP_A_EDITED).await;
    assert_problem(&r, StatusCode::CONFLICT, "active-run");
    assert_eq!(r.body["run_id"], run.as_str());
    assert_eq!(r.body["run_status"], "Queued");
}

#[tokio::test]
async fn the_openapi_document_covers_every_route_and_the_run_shape() {
    let a = api().await;
    let doc = call(&a.app, Method::GET, "/api/openapi.json", None, "")
        .await
        .body;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths: BTreeSet<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for p in [
        "/healthz",
        "/readyz",
        "/api/v1/cps",
        "/api/v1/cps/{cp}",
        "/api/v1/cps/{cp}/runs",
        "/api/v1/runs",
        "/api/v1/runs/{id}",
        "/api/v1/runs/{id}/abort",
        "/api/v1/runs/{id}/errors.csv",
    ] {
        assert!(paths.contains(p), "{p} missing from {paths:?}");
    }
    let enqueue = &doc["paths"]["/api/v1/cps/{cp}/runs"]["post"]["responses"];
    for s in [
        "201", "400", "401", "403", "404", "409", "413", "415", "422", "500",
    ] {
        assert!(enqueue.get(s).is_some(), "enqueue lacks {s}");
    }
    let edit = &doc["paths"]["/api/v1/cps/{cp}"]["put"];
    assert!(
        edit["requestBody"]["content"]["application/toml"].is_object(),
        "{edit}"
    );
    for s in [
        "200", "400", "401", "403", "404", "409", "413", "415", "422", "500",
    ] {
        assert!(edit["responses"].get(s).is_some(), "edit lacks {s}");
    }
    // The documented run has exactly the keys a real one has.
    let run = call(
        &a.app,
        Method::POST,
        "/api/v1/cps/CP-A/runs",
        Some(&a.operator),
        "",
    )
    .await
    .body;
    let real: BTreeSet<&str> = run
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let documented: BTreeSet<&str> = doc["components"]["schemas"]["Run"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(real, documented);
}

#[tokio::test]
async fn the_token_cli_creates_lists_and_revokes_without_storing_the_token() {
    let t = TestDb::migrated().await;
    let mut cmd = ocsync();
    cmd.env("DATABASE_URL", t.url())
        .args(["token", "create", "ci-bot", "--role", "operator"]);
    let out = output(cmd).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("ocs_") && token.len() == 68, "{token}");
    // Stored hashed, never in clear.
    let stored: String = sqlx::query_scalar("SELECT row_to_json(t)::text FROM ocsync.api_tokens t")
        .fetch_one(&t.pool)
        .await
        .unwrap();
    assert!(!stored.contains(&token) && !stored.contains(&token[4..]));
    assert!(stored.contains(&tokens::hash(&token)));
    let caller = tokens::authenticate(&t.pool, &token)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (caller.name.as_str(), caller.role),
        ("ci-bot", Role::Operator)
    );

    let mut cmd = ocsync();
    cmd.env("DATABASE_URL", t.url()).args(["token", "list"]);
    let out = output(cmd).await;
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(
        listed.contains("ci-bot") && listed.contains("operator"),
        "{listed}"
    );
    assert!(!listed.contains(&token[4..]));

    let mut cmd = ocsync();
    cmd.env("DATABASE_URL", t.url())
        .args(["token", "revoke", "ci-bot"]);
    assert!(output(cmd).await.status.success());
    assert!(
        tokens::authenticate(&t.pool, &token)
            .await
            .unwrap()
            .is_none()
    );
}

/// One HTTP/1.1 request over a fresh connection (no client library: the
/// point is to see exactly what the API answers).
async fn http(addr: &str, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    let status = text[9..12].parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Every line a full sync logged (API and worker processes, at trace
/// level) is free of the OpenClinica password, the API token and the
/// OpenClinica session ids.
#[tokio::test]
async fn a_full_sync_logs_no_password_token_or_session() {
    use ocsync::odm::generate::GeneratorConfig;
    use ocsync::openclinica::sim::{SimConfig, Simulator};
    use std::time::{Duration, Instant};

    let t = TestDb::migrated().await;
    let dir = tempfile::tempdir().unwrap();
    let password = format!("oc-Pw-{:016x}", rand::random::<u64>());
    let study = GeneratorConfig {
        seed: 5,
        subjects: 6,
        sites: 1,
        study_oid: "S_SECRET".to_owned(),
        ..GeneratorConfig::default()
    };
    let sim = Simulator::start(SimConfig::new(
        study,
        "ocsync",
        secrecy::SecretString::from(password.clone()),
    ))
    .await
    .unwrap();
    let toml = format!(
        r#"
id = "SECRETS"
batch_size = 2
default_site = "Main"

[source]
kind = "oc3"
base_url = "{base}"
study_oid = "S_SECRET"
username = "ocsync"
password = {{ env = "OC_TEST_PASSWORD" }}

[event_map]
SE_VISIT = "Visit"
"#,
        base = sim.base_url_oc3().as_str().trim_end_matches('/')
    );
    store::add(
        &t.pool,
        &CpConfig::from_toml(&toml, "secrets.toml").unwrap(),
    )
    .await
    .unwrap();
    let token = tokens::create(&t.pool, "secrets-test", Role::Operator)
        .await
        .unwrap();

    let spawn = |args: &[&str]| {
        let log = dir.path().join(format!("{}.log", args[0]));
        let mut cmd = ocsync();
        cmd.args(args)
            .env("DATABASE_URL", t.url())
            .env("DATABASE_MAX_CONNECTIONS", "4")
            .env("WORKER_POLL_INTERVAL_MS", "200")
            .env("API_LISTEN", "127.0.0.1:0")
            .env("METRICS_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "trace")
            .env("OC_TEST_PASSWORD", &password)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        (cmd.spawn().expect("spawn ocsync"), log)
    };
    let (mut worker, worker_log) = spawn(&["worker", "--no-schedule"]);
    let (mut api, api_log) = spawn(&["api"]);
    let deadline = Instant::now() + Duration::from_secs(90);

    let addr = loop {
        let text = std::fs::read_to_string(&api_log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("API listening")) {
            let rest = line.split("addr=").nth(1).expect("addr field");
            break rest.split_whitespace().next().unwrap().to_owned();
        }
        assert!(api.try_wait().unwrap().is_none(), "the API exited:\n{text}");
        assert!(Instant::now() < deadline, "the API did not start:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (status, run) = http(
        &addr,
        "POST",
        "/api/v1/cps/SECRETS/runs",
        &token,
        r#"{"mode":"all"}"#,
    )
    .await;
    assert_eq!(status, 201, "{run}");
    assert_eq!(run["requested_by"], "secrets-test");
    let id = run["id"].as_str().unwrap().to_owned();
    let run = loop {
        let (_, run) = http(&addr, "GET", &format!("/api/v1/runs/{id}"), &token, "").await;
        if ["Success", "Failed", "Aborted"].contains(&run["status"].as_str().unwrap_or("")) {
            break run;
        }
        assert!(Instant::now() < deadline, "the run did not end: {run}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = worker.kill();
    let _ = api.kill();
    let _ = worker.wait();
    let _ = api.wait();
    let logs = format!(
        "{}\n{}",
        std::fs::read_to_string(&worker_log).unwrap(),
        std::fs::read_to_string(&api_log).unwrap()
    );
    assert_eq!(run["status"], "Success", "{run}\n{logs}");
    assert!(
        sim.counters().logins_ok > 0,
        "the sync logged in to OpenClinica"
    );
    assert!(logs.lines().count() > 100, "trace logging was captured");

    let mut leaks = Vec::new();
    if logs.contains(&password) {
        leaks.push("the OpenClinica password".to_owned());
    }
    if logs.contains(&token) || logs.contains(&token[4..]) {
        leaks.push("the API token".to_owned());
    }
    // Simulator session ids are 32 upper-case hex digits; nothing else the
    // process logs looks like that (trace ids are lower case, ULIDs 26
    // characters, apalis prints them as decimal u128s, which have no A-F).
    if let Some(line) = logs.lines().find(|l| {
        l.split(|c: char| !(c.is_ascii_digit() || ('A'..='F').contains(&c)))
            .any(|w| w.len() == 32 && w.bytes().any(|b| b.is_ascii_alphabetic()))
    }) {
        leaks.push(format!("an OpenClinica session id: {line}"));
    }
    if logs.contains("JSESSIONID=") {
        leaks.push("a JSESSIONID cookie".to_owned());
    }
    assert!(leaks.is_empty(), "the logs carry {leaks:?}");
}
