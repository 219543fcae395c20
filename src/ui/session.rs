//! Signing in to the web pages with an API token, the session cookie, and
//! the checks every form goes through.
//!
//! - **Sign-in**: the form takes an API token (`ocsync token create`) and
//!   checks it with [`tokens::authenticate`], the function the JSON API
//!   uses. A new session gets a random 256-bit id, sent once as the
//!   cookie `ocsync_session` (`HttpOnly; SameSite=Strict; Path=/ui`, and
//!   `Secure` with `UI_COOKIE_SECURE`); `ocsync.ui_sessions` keeps only its
//!   SHA-256, the token it was opened with, a CSRF secret and its expiry
//!   (`UI_SESSION_TTL_SECS` after sign-in). The token itself is never
//!   stored or logged, and a new sign-in always gets a new id.
//! - **Every request** reads the session joined to its token, so the name
//!   and role are the token's as they are now: a revoked token ends its
//!   sessions at the next click. An expired or unknown session sends a page
//!   request to the sign-in page, which returns to the page after sign-in.
//! - **Every POST** ([`Posted`]) needs a live session, a form field `csrf`
//!   equal to the session's secret (compared in constant time), and, when
//!   the browser sends `Origin` (or, lacking it, `Referer`), the same host
//!   the request came to (`Host`, or `X-Forwarded-Host` behind a proxy).
//!   The sign-in form, which has no session yet, is protected the same way
//!   by a secret in a short-lived cookie of its own (`ocsync_signin`).
//! - **Sign-out** deletes the session's row and the cookie.
//!
//! `SameSite=Strict` keeps the cookie off requests that other sites start,
//! including a click on a link in an e-mail. Such a page request, arriving
//! without a cookie, gets a page that reloads the same address from our own
//! origin (a `<meta>` refresh, which the browser treats as same-site), so
//! a signed-in user lands on the page rather than on the sign-in form.
//!
//! Roles are the API's: [`Session::require`] turns a role below the least
//! one into a 403 page.

use axum::extract::{Form, FromRequest, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{DOCTYPE, html};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sqlx::PgPool;

use super::page::{self, Fail, Nav};
use super::{UiState, assets, query};
use crate::api::tokens::{self, Role};

/// The session cookie.
pub const COOKIE: &str = "ocsync_session";
/// The sign-in form's own CSRF cookie (there is no session yet).
const SIGNIN_COOKIE: &str = "ocsync_signin";
/// How long a sign-in form may be left open before it is sent.
const SIGNIN_FORM_SECS: u64 = 3600;

/// Who is signed in, as the token stands now.
#[derive(Debug, Clone)]
pub struct Session {
    /// The token's name (what the Import Logs show as who started a run).
    pub name: String,
    pub role: Role,
    /// The secret every form of this session carries.
    pub csrf: String,
    id_hash: String,
}

impl Session {
    /// A 403 page unless the role is at least `least`; `what` completes
    /// "… needs the operator role".
    pub fn require(&self, least: Role, what: &str) -> Result<(), Fail> {
        if self.role >= least {
            Ok(())
        } else {
            Err(Fail::forbidden(format!(
                "{what} needs the {least} role; you are signed in as {} ({}). \
                 Sign in with a token that has the {least} role.",
                self.name, self.role
            )))
        }
    }
}

/// 64 hex digits from 32 bytes of the thread RNG (a CSPRNG seeded from
/// the OS).
fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal, in time that does not depend on where the inputs differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The value of cookie `name`, if the request carries it.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// A `Set-Cookie` value for one of our cookies.
fn set_cookie(name: &str, value: &str, max_age_secs: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::try_from(format!(
        "{name}={value}; Path=/ui; Max-Age={max_age_secs}; HttpOnly; SameSite=Strict{secure}"
    ))
    .expect("cookie values are hex")
}

/// The session a cookie value stands for, if it is live: not expired, and
/// its token not revoked.
pub async fn lookup(pool: &PgPool, cookie_value: &str) -> Result<Option<Session>, sqlx::Error> {
    let id_hash = tokens::hash(cookie_value);
    let row: Option<(String, String, String)> = sqlx::query_as(
        "SELECT t.name, t.role, s.csrf_secret \
           FROM ocsync.ui_sessions s JOIN ocsync.api_tokens t ON t.id = s.token_id \
          WHERE s.id_hash = $1 AND s.expires_at > now() AND t.revoked_at IS NULL",
    )
    .bind(&id_hash)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|(name, role, csrf)| {
        Some(Session {
            name,
            role: role.parse().ok()?,
            csrf,
            id_hash,
        })
    }))
}

/// The session of a request, if it has a live one.
pub async fn current(state: &UiState, headers: &HeaderMap) -> Result<Option<Session>, Fail> {
    match cookie(headers, COOKIE) {
        Some(value) => Ok(lookup(&state.pool, value).await?),
        None => Ok(None),
    }
}

impl FromRequestParts<UiState> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &UiState) -> Result<Self, Response> {
        match current(state, &parts.headers).await {
            Ok(Some(session)) => Ok(session),
            Ok(None) => Err(not_signed_in(parts)),
            Err(fail) => Err(fail.into_response()),
        }
    }
}

/// What a request without a live session gets.
fn not_signed_in(parts: &Parts) -> Response {
    if parts.method != Method::GET {
        return Fail::new(
            StatusCode::UNAUTHORIZED,
            "Signed out",
            "You are not signed in (or your sign-in has ended), so nothing was done. \
             Sign in again and repeat what you were doing.",
        )
        .into_response();
    }
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/ui/runs");
    let cross_site = parts
        .headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site");
    if cross_site && cookie(&parts.headers, COOKIE).is_none() {
        // A link from elsewhere: the cookie, if any, was held back. Load
        // the page again from here, where it is sent.
        return reopen(target);
    }
    Redirect::to(&format!("/ui/signin?{}", query([("next", Some(target))]))).into_response()
}

/// A page that loads `target` again, from our origin.
fn reopen(target: &str) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content=(format!("0;url={target}"));
                title { "Opening · ocsync" }
                link rel="stylesheet" href=(assets::css_url());
            }
            body { main #main { p { "Opening " a href=(target) { "the page" } "…" } } }
        }
    };
    markup.into_response()
}

/// A form that carries the CSRF secret of the session it was served to.
pub trait CsrfForm {
    fn csrf(&self) -> &str;
}

/// A POST form from a signed-in user: the session, then the form, after
/// the origin and CSRF checks. Each handler still checks the role.
pub struct Posted<T>(pub Session, pub T);

impl<T> FromRequest<UiState> for Posted<T>
where
    T: DeserializeOwned + CsrfForm + Send,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &UiState) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let session = Session::from_request_parts(&mut parts, state).await?;
        if !same_origin(&parts.headers, &parts.uri) {
            return Err(cross_origin().into_response());
        }
        let Form(form) = Form::<T>::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(|e| {
                Fail::new(e.status(), "Bad request", "The form could not be read.").into_response()
            })?;
        if !same_secret(form.csrf(), &session.csrf) {
            return Err(Fail::forbidden(
                "This form does not belong to your current sign-in (it may be from an \
                 older sign-in, or from another site), so nothing was done. \
                 Reload the page and try again.",
            )
            .into_response());
        }
        Ok(Self(session, form))
    }
}

fn cross_origin() -> Fail {
    Fail::forbidden("This form was sent from another site, so nothing was done.")
}

/// Whether the page that sent a form is ours: its `Origin` (or `Referer`)
/// names the host the request came to. A request with neither passes this
/// check (older browsers, privacy settings); the CSRF secret still applies.
fn same_origin(headers: &HeaderMap, uri: &axum::http::Uri) -> bool {
    let sender = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER));
    let Some(sender) = sender else {
        return true;
    };
    let Some(sender) = sender.to_str().ok().and_then(|s| url::Url::parse(s).ok()) else {
        // `Origin: null` (sandboxed frames, some redirects) or garbage.
        return false;
    };
    let hosts = [
        headers
            .get("x-forwarded-host")
            .and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
        uri.authority().map(|a| a.as_str()),
    ];
    hosts
        .into_iter()
        .flatten()
        .any(|authority| authority_is(&sender, authority))
}

/// Whether `authority` (`host[:port]`) is the host and port of `url`.
fn authority_is(url: &url::Url, authority: &str) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let authority = authority.trim();
    // `[v6]:port` or `host:port` or a bare host.
    let (a_host, a_port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], Some(&authority[i + 1..])),
        _ => (authority, None),
    };
    // A bare host means the default port of the sender's scheme.
    let a_port = match a_port {
        Some(p) => p.parse::<u16>().ok(),
        None => match url.scheme() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        },
    };
    host.eq_ignore_ascii_case(a_host) && a_port.is_some() && a_port == url.port_or_known_default()
}

/// Where to go after sign-in: a page of ours, never another site.
pub(crate) fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if (n == "/ui" || n.starts_with("/ui/"))
                && !n.starts_with("/ui/signin")
                && !n.contains(['\\', '\r', '\n'])
                && !n.contains("//") =>
        {
            n
        }
        _ => "/ui/runs",
    }
}

#[derive(Debug, Deserialize)]
pub struct SigninQuery {
    next: Option<String>,
    /// Set after sign-out, to say so.
    signed_out: Option<String>,
}

/// The sign-in form; a signed-in visitor goes straight on to `next`.
pub async fn signin_form(
    State(state): State<UiState>,
    headers: HeaderMap,
    Query(q): Query<SigninQuery>,
) -> Result<Response, Fail> {
    let next = safe_next(q.next.as_deref());
    if current(&state, &headers).await?.is_some() {
        return Ok(Redirect::to(next).into_response());
    }
    let notice = q
        .signed_out
        .is_some()
        .then_some((false, "You are signed out."));
    Ok(signin_page(&state, StatusCode::OK, next, notice))
}

/// The form, with a fresh sign-in secret in its cookie and its field.
fn signin_page(
    state: &UiState,
    status: StatusCode,
    next: &str,
    notice: Option<(bool, &str)>,
) -> Response {
    let secret = random_hex();
    let body = html! {
        h1 { "Sign in" }
        @if let Some((error, text)) = notice {
            @if error {
                p.notice.error role="alert" { (text) }
            } @else {
                p.notice role="status" { (text) }
            }
        }
        p {
            "Paste an API token. Tokens are made with "
            code { "ocsync token create NAME --role viewer|operator|admin" }
            "; its role decides what you may do here: viewers see runs and CPs, "
            "operators also start and abort runs, admins also edit CP configurations."
        }
        form.signin method="post" action="/ui/signin" {
            input type="hidden" name="csrf" value=(secret);
            input type="hidden" name="next" value=(next);
            label for="token" { "API token" }
            input #token type="password" name="token" required autocomplete="off"
                spellcheck="false" autofocus;
            button type="submit" { "Sign in" }
        }
    };
    let mut res = (status, page::layout("Sign in", None, Nav::None, body)).into_response();
    res.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(
            SIGNIN_COOKIE,
            &secret,
            SIGNIN_FORM_SECS,
            state.api.ui.cookie_secure,
        ),
    );
    res
}

#[derive(Deserialize)]
pub struct SigninForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
    #[serde(default)]
    csrf: String,
}

/// Checks the token and opens a session.
pub async fn signin(
    State(state): State<UiState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Form(form): Form<SigninForm>,
) -> Result<Response, Fail> {
    if !same_origin(&headers, &uri) {
        return Err(cross_origin());
    }
    let expected = cookie(&headers, SIGNIN_COOKIE).unwrap_or("");
    if expected.is_empty() || !same_secret(&form.csrf, expected) {
        return Err(Fail::forbidden(
            "The sign-in form had expired or came from another site. Load the sign-in page and try again.",
        ));
    }
    let next = safe_next(Some(&form.next));
    let token = form.token.trim();
    let Some(caller) = tokens::authenticate(&state.pool, token).await? else {
        return Ok(signin_page(
            &state,
            StatusCode::UNAUTHORIZED,
            next,
            Some((true, "That token is unknown or has been revoked.")),
        ));
    };
    let id = random_hex();
    let ttl = state.api.ui.session_ttl.as_secs();
    // Expired sessions go now; there is no other sweeper.
    sqlx::query("DELETE FROM ocsync.ui_sessions WHERE expires_at < now()")
        .execute(&state.pool)
        .await?;
    let opened = sqlx::query(
        "INSERT INTO ocsync.ui_sessions (id_hash, token_id, csrf_secret, expires_at) \
         SELECT $1, id, $2, now() + make_interval(secs => $3) FROM ocsync.api_tokens \
          WHERE token_hash = $4 AND revoked_at IS NULL",
    )
    .bind(tokens::hash(&id))
    .bind(random_hex())
    .bind(ttl as f64)
    .bind(tokens::hash(token))
    .execute(&state.pool)
    .await?;
    if opened.rows_affected() != 1 {
        // Revoked between the two statements.
        return Ok(signin_page(
            &state,
            StatusCode::UNAUTHORIZED,
            next,
            Some((true, "That token is unknown or has been revoked.")),
        ));
    }
    tracing::info!(token.name = %caller.name, token.role = %caller.role, "web sign-in");
    let mut res = Redirect::to(next).into_response();
    let secure = state.api.ui.cookie_secure;
    let h = res.headers_mut();
    h.append(header::SET_COOKIE, set_cookie(COOKIE, &id, ttl, secure));
    h.append(header::SET_COOKIE, set_cookie(SIGNIN_COOKIE, "", 0, secure));
    Ok(res)
}

/// A form with nothing but the CSRF secret.
#[derive(Deserialize)]
pub struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

impl CsrfForm for CsrfOnly {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// Ends the session: its row and its cookie.
pub async fn signout(
    State(state): State<UiState>,
    Posted(session, _): Posted<CsrfOnly>,
) -> Result<Response, Fail> {
    sqlx::query("DELETE FROM ocsync.ui_sessions WHERE id_hash = $1")
        .bind(&session.id_hash)
        .execute(&state.pool)
        .await?;
    tracing::info!(token.name = %session.name, "web sign-out");
    let mut res = Redirect::to("/ui/signin?signed_out=1").into_response();
    res.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(COOKIE, "", 0, state.api.ui.cookie_secure),
    );
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    #[test]
    fn origins_match_their_authority() {
        let cases: &[(&str, &str, bool)] = &[
            ("http://127.0.0.1:8080", "127.0.0.1:8080", true),
            ("http://127.0.0.1:8080/ui/runs", "127.0.0.1:8080", true),
            ("https://ocsync.example.org", "ocsync.example.org", true),
            ("https://ocsync.example.org", "OCSYNC.example.org:443", true),
            ("http://ocsync.example.org", "ocsync.example.org:443", false),
            ("http://127.0.0.1:8081", "127.0.0.1:8080", false),
            ("http://evil.example", "127.0.0.1:8080", false),
            ("http://[::1]:8080", "[::1]:8080", true),
            ("http://[::1]:8080", "[::1]", false),
        ];
        for (origin, authority, want) in cases {
            assert_eq!(
                authority_is(&url(origin), authority),
                *want,
                "{origin} vs {authority}"
            );
        }
    }

    #[test]
    fn next_stays_on_our_pages() {
        for (next, want) in [
            (Some("/ui/runs/01J?x=1"), "/ui/runs/01J?x=1"),
            (Some("/ui"), "/ui"),
            (Some("https://evil.example/ui/"), "/ui/runs"),
            (Some("//evil.example"), "/ui/runs"),
            (Some("/ui//evil.example"), "/ui/runs"),
            (Some("/ui/\\evil"), "/ui/runs"),
            (Some("/ui/signin?next=/ui/signin"), "/ui/runs"),
            (Some("/api/v1/runs"), "/ui/runs"),
            (None, "/ui/runs"),
        ] {
            assert_eq!(safe_next(next), want, "{next:?}");
        }
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; ocsync_session=abc"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "ocsync"), None);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
        assert!(!same_secret("", "a"));
    }
}
