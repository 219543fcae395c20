//! The web pages through the real router (tower `oneshot`) on a database
//! of the test's own, with a small cookie jar standing in for a browser:
//! sign-in and sign-out, the cookie's flags, sessions ended by expiry and
//! by revoking the token, CSRF and origin refusals, buttons by role and the
//! server's own 403s, a refused start that links to the run in the way,
//! an edit refused during a run, the Import Logs' filter and pages, the
//! run page, the progress JSON and the error report.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use ocsync::api::router_configured;
use ocsync::api::tokens::{self, Role};
use ocsync::config::{ApiConfig, Env, QueueConfig};
use ocsync::cp::{CpConfig, store};
use sqlx::PgPool;
use tower::ServiceExt;

use crate::harness::TestDb;

const HOST: &str = "ocsync.test";
const ORIGIN: &str = "http://ocsync.test";

fn cp(id: &str) -> CpConfig {
    CpConfig::from_toml(
        &format!(
            r#"
id = "{id}"
[source]
kind = "file"
path = "/nonexistent/study.xml"
"#
        ),
        "test",
    )
    .unwrap()
}

/// A migrated database with CPs CP-A and CP-B, a token of each role, and
/// the router built with `env` (e.g. `UI_COOKIE_SECURE`).
struct Site {
    t: TestDb,
    app: axum::Router,
    viewer: String,
    operator: String,
    admin: String,
}

async fn site_with(env: &[(&str, &str)]) -> Site {
    let t = TestDb::migrated().await;
    for id in ["CP-A", "CP-B"] {
        store::add(&t.pool, &cp(id)).await.unwrap();
    }
    let viewer = tokens::create(&t.pool, "vera", Role::Viewer).await.unwrap();
    let operator = tokens::create(&t.pool, "otto", Role::Operator)
        .await
        .unwrap();
    let admin = tokens::create(&t.pool, "ada", Role::Admin).await.unwrap();
    let env = Env::from_pairs(env.iter().copied());
    let app = router_configured(
        ocsync::api::AppState {
            pool: t.pool.clone(),
        },
        &ApiConfig::from_lookup(&env).unwrap(),
        &QueueConfig::from_lookup(&env).unwrap(),
    );
    Site {
        t,
        app,
        viewer,
        operator,
        admin,
    }
}

async fn site() -> Site {
    site_with(&[]).await
}

/// One answer, read whole.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Answer {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    /// The value of the first hidden field `name` on the page.
    fn field(&self, name: &str) -> String {
        let marker = format!("name=\"{name}\" value=\"");
        let start = self
            .body
            .find(&marker)
            .unwrap_or_else(|| panic!("no field {name} in {}", self.body))
            + marker.len();
        self.body[start..].split('"').next().unwrap().to_owned()
    }

    /// How many rows the Import Logs table has.
    fn rows(&self) -> usize {
        self.body.matches("<tr data-run-id=").count()
    }
}

/// A browser in miniature: a cookie jar, `Host` on every request, and
/// `Origin` on every POST (as browsers send it).
struct Browser {
    app: axum::Router,
    cookies: BTreeMap<String, String>,
}

impl Browser {
    fn new(site: &Site) -> Self {
        Self {
            app: site.app.clone(),
            cookies: BTreeMap::new(),
        }
    }

    async fn send(&mut self, req: axum::http::request::Builder, body: String) -> Answer {
        let mut req = req.header(header::HOST, HOST);
        if !self.cookies.is_empty() {
            let jar: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            req = req.header(header::COOKIE, jar.join("; "));
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22)
            .await
            .unwrap();
        let answer = Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        };
        for c in answer.set_cookies() {
            let (pair, attrs) = c.split_once(';').unwrap_or((&c, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if attrs.contains("Max-Age=0") || value.is_empty() {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
        answer
    }

    async fn get(&mut self, path: &str) -> Answer {
        self.send(Request::get(path), String::new()).await
    }

    async fn post_with(
        &mut self,
        path: &str,
        form: &[(&str, &str)],
        origin: Option<&str>,
    ) -> Answer {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(o) = origin {
            req = req.header(header::ORIGIN, o);
        }
        self.send(req, body).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Answer {
        self.post_with(path, form, Some(ORIGIN)).await
    }

    /// Submits CP-A's configuration form.
    async fn save_cp_a(&mut self, csrf: &str, expected_version: &str, config: &str) -> Answer {
        self.post(
            "/ui/cps/CP-A/config",
            &[
                ("csrf", csrf),
                ("expected_version", expected_version),
                ("config", config),
            ],
        )
        .await
    }

    /// Signs in with `token`; the page after sign-in.
    async fn sign_in(&mut self, token: &str) -> Answer {
        let form = self.get("/ui/signin").await;
        assert_eq!(form.status, StatusCode::OK, "{}", form.body);
        let csrf = form.field("csrf");
        let a = self
            .post(
                "/ui/signin",
                &[("token", token), ("csrf", &csrf), ("next", "")],
            )
            .await;
        assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
        let next = a.location().to_owned();
        self.get(&next).await
    }

    /// This session's CSRF secret (from the sign-out form of any page).
    async fn csrf(&mut self) -> String {
        self.get("/ui/cps").await.field("csrf")
    }
}

async fn enqueue(pool: &PgPool, cp: &str) -> String {
    sqlx::query_scalar("SELECT ocsync.enqueue_sync($1, 'all')")
        .bind(cp)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn status_of(pool: &PgPool, run: &str) -> String {
    sqlx::query_scalar("SELECT status FROM ocsync.import_logs WHERE run_id = $1")
        .bind(run)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn abort(pool: &PgPool, run: &str) {
    sqlx::query("SELECT ocsync.abort_run($1)")
        .bind(run)
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn sign_in_sets_a_safe_cookie_and_sign_out_ends_it() {
    let s = site().await;
    let mut b = Browser::new(&s);

    // Not signed in: pages send to the sign-in form, which comes back.
    let a = b.get("/ui/runs/01ARZ3NDEKTSV4RRFFQ69G5FAV?x=1").await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert_eq!(
        a.location(),
        "/ui/signin?next=%2Fui%2Fruns%2F01ARZ3NDEKTSV4RRFFQ69G5FAV%3Fx%3D1"
    );
    assert_eq!(b.get("/").await.location(), "/ui/runs");
    assert_eq!(b.get("/ui").await.location(), "/ui/runs");

    // The form has a secret of its own, in a cookie as strict as the session's.
    let form = b.get("/ui/signin?next=/ui/cps").await;
    assert_eq!(form.status, StatusCode::OK);
    let signin_cookie = form.set_cookies().join("\n");
    for flag in ["ocsync_signin=", "HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(signin_cookie.contains(flag), "{signin_cookie}");
    }
    let csrf = form.field("csrf");
    assert_eq!(form.field("next"), "/ui/cps");

    // Without the form's secret, or with a wrong token: refused.
    let a = b
        .post("/ui/signin", &[("token", &s.viewer), ("next", "/ui/cps")])
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    let form = b.get("/ui/signin?next=/ui/cps").await;
    let csrf2 = form.field("csrf");
    assert_ne!(csrf, csrf2, "every form gets a fresh secret");
    let a = b
        .post(
            "/ui/signin",
            &[("token", "ocs_0000"), ("csrf", &csrf2), ("next", "/ui/cps")],
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.body.contains("unknown or has been revoked"), "{}", a.body);
    assert!(!a.body.contains("ocs_0000"), "the token is not echoed");

    // The right token: a session cookie, HttpOnly, SameSite=Strict, /ui only.
    let csrf3 = a.field("csrf");
    let a = b
        .post(
            "/ui/signin",
            &[("token", &s.viewer), ("csrf", &csrf3), ("next", "/ui/cps")],
        )
        .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    assert_eq!(a.location(), "/ui/cps");
    let cookies = a.set_cookies();
    let session = cookies
        .iter()
        .find(|c| c.starts_with("ocsync_session="))
        .expect("a session cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=28800"] {
        assert!(session.contains(flag), "{session}");
    }
    assert!(!session.contains("Secure"), "{session}");
    let id = b.cookies["ocsync_session"].clone();
    assert_eq!(id.len(), 64, "256 bits in hex");
    assert!(
        !b.cookies.contains_key("ocsync_signin"),
        "cleared after use"
    );

    // Only the id's hash is stored; the token is nowhere.
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT id_hash, csrf_secret FROM ocsync.ui_sessions")
            .fetch_all(&s.t.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, tokens::hash(&id));
    let dump: String =
        sqlx::query_scalar("SELECT string_agg(t::text, ' ') FROM ocsync.ui_sessions t")
            .fetch_one(&s.t.pool)
            .await
            .unwrap();
    assert!(!dump.contains(&id) && !dump.contains(&s.viewer), "{dump}");

    let page = b.get("/ui/runs").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body
            .contains("Signed in as <strong>vera</strong> (viewer)"),
        "{}",
        page.body
    );
    // The pages' own headers.
    let csp = page.headers[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert_eq!(page.headers[header::CACHE_CONTROL], "no-store");
    // A signed-in visitor of the sign-in form goes straight on.
    assert_eq!(b.get("/ui/signin?next=/ui/cps").await.location(), "/ui/cps");

    // Sign-out: the row and the cookie go; pages send to sign-in again.
    let csrf = page.field("csrf");
    let a = b.post("/ui/signout", &[("csrf", &csrf)]).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert!(
        a.set_cookies()
            .iter()
            .any(|c| c.starts_with("ocsync_session=;") && c.contains("Max-Age=0"))
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM ocsync.ui_sessions")
        .fetch_one(&s.t.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert!(
        b.get(a.location())
            .await
            .body
            .contains("You are signed out.")
    );
    // The old cookie opens nothing any more.
    b.cookies.insert("ocsync_session".into(), id);
    assert_eq!(b.get("/ui/runs").await.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn sessions_end_with_their_expiry_or_their_token() {
    let s = site_with(&[("UI_COOKIE_SECURE", "true"), ("UI_SESSION_TTL_SECS", "600")]).await;
    let mut b = Browser::new(&s);
    let form = b.get("/ui/signin").await;
    let csrf = form.field("csrf");
    let a = b
        .post("/ui/signin", &[("token", &s.operator), ("csrf", &csrf)])
        .await;
    let session = a
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("ocsync_session="))
        .unwrap();
    assert!(
        session.contains("; Secure") && session.contains("Max-Age=600"),
        "{session}"
    );
    let expires: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM expires_at - created_at)::float8 FROM ocsync.ui_sessions",
    )
    .fetch_one(&s.t.pool)
    .await
    .unwrap();
    assert!((599.0..=601.0).contains(&expires), "{expires}");
    assert_eq!(b.get("/ui/runs").await.status, StatusCode::OK);

    // Expired: back to sign-in.
    sqlx::query("UPDATE ocsync.ui_sessions SET expires_at = now() - interval '1 second'")
        .execute(&s.t.pool)
        .await
        .unwrap();
    assert_eq!(b.get("/ui/runs").await.status, StatusCode::SEE_OTHER);

    // Revoking the token ends its sessions at the next request.
    let mut b = Browser::new(&s);
    assert_eq!(b.sign_in(&s.operator).await.status, StatusCode::OK);
    let csrf = b.csrf().await;
    tokens::revoke(&s.t.pool, "otto").await.unwrap();
    let a = b.get("/ui/runs").await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert!(a.location().starts_with("/ui/signin"));
    let run = enqueue(&s.t.pool, "CP-A").await;
    let a = b
        .post(
            &format!("/ui/runs/{run}/abort"),
            &[("csrf", &csrf), ("confirmed", "yes")],
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);
    assert_eq!(status_of(&s.t.pool, &run).await, "Queued");
    // And a revoked token cannot sign in.
    let mut b = Browser::new(&s);
    let csrf = b.get("/ui/signin").await.field("csrf");
    let a = b
        .post("/ui/signin", &[("token", &s.operator), ("csrf", &csrf)])
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_link_from_another_site_reloads_from_ours_before_asking_to_sign_in() {
    let s = site().await;
    let mut b = Browser::new(&s);
    // SameSite=Strict holds the cookie back on a link from elsewhere (an
    // e-mail): the page reloads itself from our origin, where it is sent.
    let a = b
        .send(
            Request::get("/ui/runs/01ARZ3NDEKTSV4RRFFQ69G5FAV")
                .header("sec-fetch-site", "cross-site"),
            String::new(),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        a.body.contains(
            r#"http-equiv="refresh" content="0;url=/ui/runs/01ARZ3NDEKTSV4RRFFQ69G5FAV""#
        ),
        "{}",
        a.body
    );
    // The reload (same origin) without a session goes to sign-in.
    let a = b
        .send(
            Request::get("/ui/runs/01ARZ3NDEKTSV4RRFFQ69G5FAV")
                .header("sec-fetch-site", "same-origin"),
            String::new(),
        )
        .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert!(a.location().starts_with("/ui/signin?next="));
}

#[tokio::test]
async fn forms_need_the_sessions_csrf_secret_and_our_origin() {
    let s = site().await;
    let mut b = Browser::new(&s);
    b.sign_in(&s.operator).await;
    let csrf = b.csrf().await;
    let mut other = Browser::new(&s);
    other.sign_in(&s.operator).await;
    let others = other.csrf().await;
    assert_ne!(csrf, others, "each session has its own secret");

    let run = enqueue(&s.t.pool, "CP-A").await;
    let path = format!("/ui/runs/{run}/abort");
    // (form fields, Origin header)
    type Attempt<'a> = (Vec<(&'a str, &'a str)>, Option<&'a str>);
    let refusals: Vec<Attempt> = vec![
        (vec![("confirmed", "yes")], Some(ORIGIN)),
        (vec![("csrf", ""), ("confirmed", "yes")], Some(ORIGIN)),
        (vec![("csrf", "0123"), ("confirmed", "yes")], Some(ORIGIN)),
        (vec![("csrf", &others), ("confirmed", "yes")], Some(ORIGIN)),
        (
            vec![("csrf", &csrf), ("confirmed", "yes")],
            Some("http://evil.example"),
        ),
        (vec![("csrf", &csrf), ("confirmed", "yes")], Some("null")),
    ];
    for (form, origin) in &refusals {
        let a = b.post_with(&path, form, *origin).await;
        assert_eq!(
            a.status,
            StatusCode::FORBIDDEN,
            "{form:?} {origin:?}: {}",
            a.body
        );
        assert_eq!(status_of(&s.t.pool, &run).await, "Queued", "{form:?}");
    }
    // A Referer from another site counts like its Origin.
    let a = b
        .send(
            Request::post(&path)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header(header::REFERER, "http://evil.example/page"),
            format!("csrf={csrf}&confirmed=yes"),
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);

    // Unconfirmed (no JavaScript): the server asks on a page of its own.
    let a = b.post(&path, &[("csrf", &csrf), ("confirmed", "no")]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("Abort the run") && a.body.contains(r#"name="confirmed" value="yes""#));
    assert_eq!(status_of(&s.t.pool, &run).await, "Queued");
    let a = b.get(&path).await;
    assert!(a.body.contains("Abort the run"), "{}", a.body);

    // With the secret, from our page (or with neither header): done.
    let a = b
        .post(
            &path,
            &[
                ("csrf", &csrf),
                ("confirmed", "yes"),
                ("back", "/ui/runs?cp=CP-A"),
            ],
        )
        .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    assert_eq!(a.location(), "/ui/runs?cp=CP-A");
    assert_eq!(status_of(&s.t.pool, &run).await, "Aborted");
    let by: Option<String> =
        sqlx::query_scalar("SELECT aborted_by FROM ocsync.import_logs WHERE run_id = $1")
            .bind(&run)
            .fetch_one(&s.t.pool)
            .await
            .unwrap();
    assert_eq!(by.as_deref(), Some("otto"));
    let run2 = enqueue(&s.t.pool, "CP-A").await;
    let a = b
        .post_with(
            &format!("/ui/runs/{run2}/abort"),
            &[
                ("csrf", &csrf),
                ("confirmed", "yes"),
                ("back", "https://evil.example/"),
            ],
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert_eq!(a.location(), "/ui/runs", "never back to another site");
    assert_eq!(status_of(&s.t.pool, &run2).await, "Aborted");
}

#[tokio::test]
async fn roles_decide_the_buttons_and_the_server_checks_again() {
    let s = site().await;
    let run = enqueue(&s.t.pool, "CP-A").await;
    let mut viewer = Browser::new(&s);
    viewer.sign_in(&s.viewer).await;
    let mut operator = Browser::new(&s);
    operator.sign_in(&s.operator).await;
    let mut admin = Browser::new(&s);
    admin.sign_in(&s.admin).await;

    let abort_button = format!(r#"action="/ui/runs/{run}/abort""#);
    let sync_form = r#"action="/ui/cps/CP-A/runs""#;
    let config_form = r#"action="/ui/cps/CP-A/config""#;
    for (b, abort, sync, edit) in [
        (&mut viewer, false, false, false),
        (&mut operator, true, true, false),
        (&mut admin, true, true, true),
    ] {
        let logs = b.get("/ui/runs").await;
        let run_page = b.get(&format!("/ui/runs/{run}")).await;
        let cp_page = b.get("/ui/cps/CP-A").await;
        assert_eq!(logs.body.contains(&abort_button), abort, "{}", logs.body);
        assert_eq!(run_page.body.contains(&abort_button), abort);
        assert_eq!(cp_page.body.contains(sync_form), sync, "{}", cp_page.body);
        assert_eq!(cp_page.body.contains(config_form), edit);
        // Everyone sees the configuration, credentials as references only.
        assert!(cp_page.body.contains("/nonexistent/study.xml"));
    }

    // The server does not trust the page: each POST checks the role.
    let csrf = viewer.csrf().await;
    let a = viewer
        .post(
            &format!("/ui/runs/{run}/abort"),
            &[("csrf", &csrf), ("confirmed", "yes")],
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.body.contains("needs the operator role"), "{}", a.body);
    assert_eq!(status_of(&s.t.pool, &run).await, "Queued");
    let a = viewer.get(&format!("/ui/runs/{run}/abort")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = viewer
        .post("/ui/cps/CP-B/runs", &[("csrf", &csrf), ("mode", "all")])
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let csrf = operator.csrf().await;
    let a = operator
        .post(
            "/ui/cps/CP-B/config",
            &[
                ("csrf", &csrf),
                ("expected_version", "1"),
                ("config", &cp("CP-B").to_toml()),
            ],
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.body.contains("needs the admin role"), "{}", a.body);
    let runs_b: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ocsync.import_logs WHERE cp = 'CP-B'")
            .fetch_one(&s.t.pool)
            .await
            .unwrap();
    assert_eq!(runs_b, 0);
}

#[tokio::test]
async fn a_refused_start_names_and_links_the_run_in_the_way() {
    let s = site().await;
    let mut b = Browser::new(&s);
    b.sign_in(&s.operator).await;
    let csrf = b.csrf().await;

    let a = b
        .post(
            "/ui/cps/CP-A/runs",
            &[("csrf", &csrf), ("mode", "all"), ("subjects", "")],
        )
        .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    let run = a.location().strip_prefix("/ui/runs/").unwrap().to_owned();
    let info = ocsync::queue::runs::get(&s.t.pool, &run)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((info.mode.as_str(), info.trigger.as_str()), ("all", "user"));
    assert_eq!(info.requested_by.as_deref(), Some("otto"));
    let page = b.get(a.location()).await;
    assert!(page.body.contains("All CRF records") && page.body.contains("Queued"));

    // A second start is refused, naming the run and linking to it; what
    // was typed is kept.
    let a = b
        .post(
            "/ui/cps/CP-A/runs",
            &[
                ("csrf", &csrf),
                ("mode", "subjects"),
                ("subjects", "SS_1, SS_2"),
            ],
        )
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert!(
        a.body.contains("already has a run that is Queued"),
        "{}",
        a.body
    );
    assert!(a.body.contains(&format!(r#"href="/ui/runs/{run}""#)));
    assert!(a.body.contains("SS_1, SS_2</textarea>"));
    assert!(a.body.contains(r#"value="subjects" checked"#));

    // The API's rules for subject lists hold here too.
    abort(&s.t.pool, &run).await;
    let a = b
        .post(
            "/ui/cps/CP-A/runs",
            &[("csrf", &csrf), ("mode", "subjects"), ("subjects", " ,\n")],
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(a.body.contains("non-empty subjects list"), "{}", a.body);
    let a = b
        .post(
            "/ui/cps/CP-A/runs",
            &[("csrf", &csrf), ("mode", "everything")],
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    let a = b
        .post(
            "/ui/cps/CP-A/runs",
            &[
                ("csrf", &csrf),
                ("mode", "subjects"),
                ("subjects", "SS_1,\tSS_2\nSS_3\r\nSS_1"),
            ],
        )
        .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    let run = a.location().strip_prefix("/ui/runs/").unwrap();
    // The payload's list, parsed as the API parses it: split on commas,
    // tabs and line breaks, trimmed, duplicates dropped.
    let (mode, subjects): (String, serde_json::Value) = sqlx::query_as(
        "SELECT l.mode, convert_from(j.job, 'UTF8')::jsonb -> 'subjects' \
           FROM apalis.jobs j JOIN ocsync.import_logs l ON l.run_id = j.id WHERE j.id = $1",
    )
    .bind(run)
    .fetch_one(&s.t.pool)
    .await
    .unwrap();
    assert_eq!(mode, "subjects");
    assert_eq!(subjects, serde_json::json!(["SS_1", "SS_2", "SS_3"]));
    // Unknown CP: a 404 page.
    let a = b
        .post("/ui/cps/NOPE/runs", &[("csrf", &csrf), ("mode", "all")])
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_edit_is_refused_while_a_run_is_active_and_kept_for_later() {
    let s = site().await;
    let mut b = Browser::new(&s);
    b.sign_in(&s.admin).await;
    let csrf = b.csrf().await;
    let edited = "id = \"CP-A\"\r\nbatch_size = 7\r\n\r\n[source]\r\nkind = \"file\"\r\npath = \"/nonexistent/other.xml\"\r\n";
    let run = enqueue(&s.t.pool, "CP-A").await;

    let page = b.get("/ui/cps/CP-A").await;
    assert!(
        page.body.contains("An edit is refused while a run"),
        "{}",
        page.body
    );
    let a = b.save_cp_a(&csrf, "1", edited).await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert!(a.body.contains("Not saved"), "{}", a.body);
    assert!(a.body.contains(&format!(r#"href="/ui/runs/{run}""#)));
    assert!(
        a.body.contains("/nonexistent/other.xml"),
        "the edit is kept"
    );
    assert_eq!(
        store::get(&s.t.pool, &ocsync::cp::CpId::parse("CP-A").unwrap())
            .await
            .unwrap()
            .version,
        1
    );

    // Bad TOML: the place is named, nothing is stored.
    abort(&s.t.pool, &run).await;
    let a = b
        .save_cp_a(&csrf, "1", "id = \"CP-A\"\nbatch_size = \"many\"\n")
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(a.body.contains("configuration:2:14"), "{}", a.body);
    let a = b.save_cp_a(&csrf, "1", &cp("CP-B").to_toml()).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);

    // After the run: saved, with a new version.
    let a = b.save_cp_a(&csrf, "1", edited).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    assert_eq!(a.location(), "/ui/cps/CP-A?saved=2");
    assert!(
        b.get(a.location())
            .await
            .body
            .contains("saved as version 2")
    );
    let stored = store::get(&s.t.pool, &ocsync::cp::CpId::parse("CP-A").unwrap())
        .await
        .unwrap();
    assert_eq!((stored.version, stored.config.batch_size), (2, 7));

    // Someone else's edit in between is not overwritten unseen.
    let a = b.save_cp_a(&csrf, "1", edited).await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert!(a.body.contains("someone else changed"), "{}", a.body);
    assert!(a.body.contains(r#"name="expected_version" value="1""#));
}

#[tokio::test]
async fn import_logs_filter_by_cp_and_status_a_page_at_a_time() {
    let s = site().await;
    let mut runs = Vec::new();
    for i in 0..30 {
        let cp = if i % 2 == 0 { "CP-A" } else { "CP-B" };
        let id = enqueue(&s.t.pool, cp).await;
        abort(&s.t.pool, &id).await;
        runs.push(id);
    }
    let queued = enqueue(&s.t.pool, "CP-B").await;
    runs.push(queued.clone());
    let newest_first: Vec<&String> = runs.iter().rev().collect();
    let mut b = Browser::new(&s);
    b.sign_in(&s.viewer).await;

    let first = b.get("/ui/runs").await;
    assert_eq!(first.rows(), 25);
    let order: Vec<usize> = newest_first
        .iter()
        .take(25)
        .map(|id| {
            first
                .body
                .find(&format!("data-run-id=\"{id}\""))
                .expect("listed")
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "newest first");
    assert!(first.body.contains("(Aborted)"));
    assert!(!first.body.contains("Newer runs"));
    let older = format!("/ui/runs?before={}", newest_first[24]);
    assert!(
        first.body.contains(&format!(r#"href="{older}""#)),
        "{}",
        first.body
    );

    let second = b.get(&older).await;
    assert_eq!(second.rows(), 6);
    assert!(!second.body.contains("Older runs"));
    let newer = format!("/ui/runs?after={}", newest_first[25]);
    assert!(
        second.body.contains(&format!(r#"href="{newer}""#)),
        "{}",
        second.body
    );
    let back = b.get(&newer).await;
    assert_eq!(back.rows(), 25);
    assert!(!back.body.contains("Newer runs"), "the first page again");

    // Filters, kept in the page links.
    let b_only = b.get("/ui/runs?cp=CP-B&limit=10").await;
    assert_eq!(b_only.rows(), 10);
    assert!(!b_only.body.contains(">CP-A</a></td>"));
    assert!(
        b_only.body.contains("cp=CP-B&amp;limit=10&amp;before="),
        "{}",
        b_only.body
    );
    let queued_page = b.get("/ui/runs?status=queued").await;
    assert_eq!(queued_page.rows(), 1);
    assert!(queued_page.body.contains(&queued));
    assert!(
        queued_page.body.contains(r#"data-live="1""#),
        "a live row for the script"
    );
    assert_eq!(b.get("/ui/runs?status=aborted").await.rows(), 25);
    let none = b.get("/ui/runs?cp=CP-A&status=queued").await;
    assert_eq!(none.rows(), 0);
    assert!(none.body.contains("No runs match this filter"));
    // Bad filters and pages: 400 pages, not errors.
    for bad in [
        "/ui/runs?status=done",
        "/ui/runs?before=x",
        "/ui/runs?limit=0",
        "/ui/runs?limit=5000",
    ] {
        assert_eq!(b.get(bad).await.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn run_page_progress_and_error_report() {
    let s = site().await;
    let run = enqueue(&s.t.pool, "CP-A").await;
    // An error row, as a sync writes it.
    sqlx::query(
        "INSERT INTO ocsync.run_errors (run_id, cp_id, subject_key, stage, message) \
         VALUES ($1, 'CP-A', 'SS_1', 'map', 'site S_X is not in site_map')",
    )
    .bind(&run)
    .execute(&s.t.pool)
    .await
    .unwrap();
    let mut b = Browser::new(&s);
    b.sign_in(&s.viewer).await;

    let page = b.get(&format!("/ui/runs/{run}")).await;
    assert_eq!(page.status, StatusCode::OK);
    for text in [
        "CP-A",
        "All CRF records",
        "Queued",
        r#"<th scope="row">Participants</th>"#,
        &format!(r#"href="/ui/runs/{run}/errors.csv""#),
    ] {
        assert!(page.body.contains(text), "{text}: {}", page.body);
    }

    let a = b
        .get(&format!(
            "/ui/progress?ids={run},01ARZ3NDEKTSV4RRFFQ69G5FAV,junk"
        ))
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["runs"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["runs"][0]["status"], "Queued");
    assert_eq!(v["runs"][0]["errors"], 1);
    assert_eq!(v["runs"][0]["counts"]["participants"]["created"], 0);

    let csv = b.get(&format!("/ui/runs/{run}/errors.csv")).await;
    assert_eq!(csv.status, StatusCode::OK);
    assert_eq!(csv.headers[header::CONTENT_TYPE], "text/csv; charset=utf-8");
    assert!(
        csv.headers[header::CONTENT_DISPOSITION]
            .to_str()
            .unwrap()
            .contains("attachment")
    );
    assert!(
        csv.body.starts_with(&ocsync::sync::CSV_HEADER.join(",")),
        "{}",
        csv.body
    );
    assert!(csv.body.contains("site S_X is not in site_map"));

    // Unknown runs and pages: 404 pages; assets need no session.
    assert_eq!(
        b.get("/ui/runs/01ARZ3NDEKTSV4RRFFQ69G5FAV").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(b.get("/ui/nowhere").await.status, StatusCode::NOT_FOUND);
    assert_eq!(b.get("/ui/cps/NOPE").await.status, StatusCode::NOT_FOUND);
    let mut anonymous = Browser::new(&s);
    let css = anonymous.get("/ui/assets/ui.css").await;
    assert_eq!(css.status, StatusCode::OK);
    assert_eq!(css.headers[header::CONTENT_TYPE], "text/css; charset=utf-8");
    let js = anonymous.get("/ui/assets/ui.js").await;
    assert!(js.body.contains("/ui/progress"));
    // Without a session, progress is 401 JSON (the script stops polling).
    let a = anonymous.get(&format!("/ui/progress?ids={run}")).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(!a.body.contains("Queued"));
}
