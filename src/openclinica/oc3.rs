//! OpenClinica 3.x REST: a form login that yields a session cookie, shared
//! by every request to the server.
//!
//! OC 3.x keeps one session per user, so the client logs in once, reuses
//! the `JSESSIONID` cookie, and logs in again only when a data call ends at
//! the login page (a redirect to `…/pages/login/login`, or an HTML page
//! where XML was expected; OC never answers 401 for that). The re-login
//! happens under a lock: concurrent requests that all found the session dead
//! wait for the one login instead of each starting their own (which would
//! also kick the others' fresh session out). A password OC rejects is never
//! tried again by this client: repeated failed logins lock the account.

use std::sync::Arc;

use reqwest::header::{CONTENT_TYPE, COOKIE, HeaderMap, HeaderValue, LOCATION, SET_COOKIE};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;
use url::Url;

use super::body::Body;
use super::config::{NetworkConfig, QueryFlags};
use super::error::OcError;
use super::http::{Sent, Server};

/// An OC 3.x server and one account on it.
pub(crate) struct Oc3 {
    pub server: Server,
    username: String,
    password: SecretString,
    session: Mutex<SessionState>,
}

#[derive(Default)]
struct SessionState {
    current: Option<Arc<Session>>,
    /// Set once OC rejected the password: from then on every call fails
    /// without asking OC, so the account cannot be locked by this process.
    rejected: Option<String>,
}

/// The cookies of one login, ready to send as a `Cookie` header.
struct Session {
    cookie: SecretString,
}

impl Session {
    fn header(&self) -> HeaderValue {
        let mut v = HeaderValue::from_str(self.cookie.expose_secret())
            .expect("built only from cookie pairs that are valid header text");
        v.set_sensitive(true);
        v
    }
}

enum Verdict {
    Data,
    LoginPage,
    Fail(OcError),
}

impl Oc3 {
    pub fn new(
        base: Url,
        username: String,
        password: SecretString,
        net: &NetworkConfig,
    ) -> Result<Self, OcError> {
        Ok(Self {
            server: Server::new(base, net)?,
            username,
            password,
            session: Mutex::new(SessionState::default()),
        })
    }

    /// `GET {base}/rest/clinicaldata/xml/view/{study}/{subject|*}/*/*`.
    pub fn clinical_url(&self, study: &str, subject: Option<&str>, flags: QueryFlags) -> Url {
        self.server.url(
            &[
                "rest",
                "clinicaldata",
                "xml",
                "view",
                study,
                subject.unwrap_or("*"),
                "*",
                "*",
            ],
            &[
                ("includeAudits", yn(flags.include_audits)),
                ("includeDNs", "n"),
                ("metadata", yn(flags.include_metadata)),
                ("showArchived", yn(flags.show_archived)),
            ],
        )
    }

    /// `GET {base}/rest/metadata/xml/view/{study}/*/*`.
    pub fn metadata_url(&self, study: &str) -> Url {
        self.server
            .url(&["rest", "metadata", "xml", "view", study, "*", "*"], &[])
    }

    /// Fetches an XML document, logging in first when there is no session
    /// and once more when the session turns out to have expired.
    pub async fn get_xml(&self, url: &Url, subject: Option<String>) -> Result<Body, OcError> {
        let mut logged_in_again = false;
        loop {
            let session = self.session().await?;
            let sent = self
                .server
                .send(&Method::GET, url, || {
                    self.server
                        .client
                        .get(url.clone())
                        .header(COOKIE, session.header())
                })
                .await?;
            match self.verdict(&sent, url) {
                Verdict::Data => return Ok(self.server.body(sent, url, subject)),
                Verdict::Fail(e) => return Err(e),
                Verdict::LoginPage if logged_in_again => {
                    return Err(OcError::SessionLost {
                        server: self.server.origin.clone(),
                        path: url.path().to_owned(),
                    });
                }
                Verdict::LoginPage => {
                    drop(sent);
                    tracing::info!(server = %self.server.origin, path = url.path(), "OpenClinica session expired; logging in again");
                    self.invalidate(&session).await;
                    logged_in_again = true;
                }
            }
        }
    }

    fn verdict(&self, sent: &Sent, url: &Url) -> Verdict {
        let response = &sent.response;
        let status = response.status();
        if status.is_success() {
            let html = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| {
                    ct.trim_start()
                        .to_ascii_lowercase()
                        .starts_with("text/html")
                });
            // XML comes as application/xml or text/xml; HTML is the login
            // page that a proxy reached by following OC's redirect.
            return if html {
                Verdict::LoginPage
            } else {
                Verdict::Data
            };
        }
        if status.is_redirection() {
            return match location_path(response.headers()) {
                Some(p) if is_login_page(&p) => Verdict::LoginPage,
                Some(p) => Verdict::Fail(
                    self.server
                        .unexpected(url, format!("HTTP {status}, redirected to {p}")),
                ),
                None => Verdict::Fail(
                    self.server
                        .unexpected(url, format!("HTTP {status} without a Location")),
                ),
            };
        }
        if status == StatusCode::UNAUTHORIZED {
            return Verdict::LoginPage;
        }
        Verdict::Fail(
            self.server
                .status_error(&Method::GET, url, status, sent.attempt),
        )
    }

    /// The live session, logging in when there is none. The lock is held
    /// during the login so that concurrent callers wait for it.
    async fn session(&self) -> Result<Arc<Session>, OcError> {
        let mut state = self.session.lock().await;
        if let Some(detail) = &state.rejected {
            return Err(self.rejected(detail.clone()));
        }
        if let Some(s) = &state.current {
            return Ok(s.clone());
        }
        match self.login().await {
            Ok(s) => {
                let s = Arc::new(s);
                state.current = Some(s.clone());
                Ok(s)
            }
            Err(OcError::AuthRejected { detail, .. }) => {
                state.rejected = Some(detail.clone());
                Err(self.rejected(detail))
            }
            Err(e) => Err(e),
        }
    }

    /// Forgets `stale` unless another caller already replaced it.
    async fn invalidate(&self, stale: &Arc<Session>) {
        let mut state = self.session.lock().await;
        if state
            .current
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, stale))
        {
            state.current = None;
        }
    }

    fn rejected(&self, detail: String) -> OcError {
        OcError::AuthRejected {
            server: self.server.origin.clone(),
            path: self.login_url().path().to_owned(),
            username: self.username.clone(),
            detail,
        }
    }

    fn login_url(&self) -> Url {
        self.server.url(&["j_spring_security_check"], &[])
    }

    /// `POST {base}/j_spring_security_check`. Transient failures (OC down,
    /// 5xx) are retried like any request: no password was judged. A
    /// rejection never is.
    async fn login(&self) -> Result<Session, OcError> {
        let url = self.login_url();
        let form = SecretString::from(
            url::form_urlencoded::Serializer::new(String::new())
                .append_pair("j_username", &self.username)
                .append_pair("j_password", self.password.expose_secret())
                .finish(),
        );
        tracing::debug!(server = %self.server.origin, user = %self.username, "logging in to OpenClinica 3.x");
        let sent = self
            .server
            .send(&Method::POST, &url, || {
                self.server
                    .client
                    .post(url.clone())
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(form.expose_secret().to_owned())
            })
            .await?;
        let response = &sent.response;
        let status = response.status();
        if status.is_redirection() {
            // Spring Security answers a login with a redirect either way:
            // to the application on success, to the login page on failure.
            let target = location_path(response.headers()).unwrap_or_default();
            if is_login_page(&target) {
                let detail = if target.to_ascii_lowercase().contains("locked") {
                    "OpenClinica says the account is locked"
                } else {
                    "OpenClinica sent the login page back"
                };
                return Err(self.rejected(detail.into()));
            }
        } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self.rejected(format!("HTTP {status}")));
        } else if !status.is_success() {
            return Err(self
                .server
                .status_error(&Method::POST, &url, status, sent.attempt));
        }
        match session_cookie(response.headers()) {
            Some(cookie) => Ok(Session { cookie }),
            None => Err(self.server.unexpected(
                &url,
                format!("login answered HTTP {status} without a session cookie"),
            )),
        }
    }
}

fn yn(b: bool) -> &'static str {
    if b { "y" } else { "n" }
}

/// The path (and query) of a `Location`, relative or absolute. The query is
/// kept because OC puts the login outcome there (`?action=errorLogin`).
fn location_path(headers: &HeaderMap) -> Option<String> {
    let raw = headers.get(LOCATION)?.to_str().ok()?;
    let base = Url::parse("http://placeholder.invalid/").expect("valid");
    let url = base.join(raw).ok()?;
    Some(match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    })
}

/// OC's login page lives at `…/pages/login/login` (older versions
/// `…/Login` or `login.jsp`).
fn is_login_page(path_and_query: &str) -> bool {
    let path = path_and_query
        .split('?')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    path.split('/')
        .any(|seg| seg == "login" || seg == "login.jsp")
}

/// The `Cookie` header to send back: every `name=value` the login set
/// (cookie attributes are irrelevant for one server and one path).
fn session_cookie(headers: &HeaderMap) -> Option<SecretString> {
    let pairs: Vec<&str> = headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .map(str::trim)
        .filter(|pair| {
            pair.split_once('=')
                .is_some_and(|(n, v)| !n.is_empty() && !v.is_empty())
        })
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let cookie = pairs.join("; ");
    HeaderValue::from_str(&cookie).ok()?;
    Some(SecretString::from(cookie))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_pages_are_recognised() {
        for p in [
            "/OpenClinica/pages/login/login",
            "/OpenClinica/pages/login/login?action=errorLogin",
            "/OpenClinica/login.jsp",
        ] {
            assert!(is_login_page(p), "{p}");
        }
        for p in [
            "/OpenClinica/MainMenu",
            "/OpenClinica/loginHelp",
            "/x?next=/login",
        ] {
            assert!(!is_login_page(p), "{p}");
        }
    }

    #[test]
    fn cookies_are_collected_without_attributes() {
        let mut h = HeaderMap::new();
        h.append(
            SET_COOKIE,
            HeaderValue::from_static("JSESSIONID=ABC123; Path=/OpenClinica; HttpOnly"),
        );
        h.append(SET_COOKIE, HeaderValue::from_static("lb=node2; Path=/"));
        h.append(SET_COOKIE, HeaderValue::from_static("old=; Max-Age=0"));
        let c = session_cookie(&h).unwrap();
        assert_eq!(c.expose_secret(), "JSESSIONID=ABC123; lb=node2");
        assert!(session_cookie(&HeaderMap::new()).is_none());
    }

    #[test]
    fn locations_keep_the_query() {
        let mut h = HeaderMap::new();
        h.insert(
            LOCATION,
            HeaderValue::from_static("https://oc/OpenClinica/pages/login/login?action=errorLogin"),
        );
        assert_eq!(
            location_path(&h).unwrap(),
            "/OpenClinica/pages/login/login?action=errorLogin"
        );
        h.insert(LOCATION, HeaderValue::from_static("/OpenClinica/MainMenu"));
        assert_eq!(location_path(&h).unwrap(), "/OpenClinica/MainMenu");
    }
}
