//! OpenClinica 4.x REST: a bearer token from the user service, cached.
//!
//! OC 4.x tokens live 4 hours and the user service answers at most two
//! token requests per minute per address (429 beyond), so the client keeps
//! one token per account until 5 minutes before it expires (read from the
//! JWT's `exp` when the token is a JWT, else assumed to be 4 hours), and
//! paces its own token requests to two per rolling minute by waiting rather
//! than by being refused. A data call answered 401 drops the token and asks
//! for a new one once. A token request answered 400, 401 or 403 means the
//! credentials are wrong: never retried.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::Mutex;
use url::Url;

use super::body::Body;
use super::config::{NetworkConfig, QueryFlags, RetryPolicy};
use super::error::{Attempt, OcError};
use super::http::{Outcome, Sent, Server};
use super::source::SubjectListing;

/// Token requests allowed per [`TOKEN_WINDOW`] (the user service's limit).
const TOKENS_PER_WINDOW: usize = 2;
const TOKEN_WINDOW: Duration = Duration::from_secs(60);
/// Assumed lifetime of a token that does not say (OC's is 4 h).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(4 * 3600);
/// A token is replaced this long before it expires, so a long download that
/// starts with it does not outlive it.
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// A token or participant list larger than this is not what was asked for.
const SMALL_BODY_LIMIT: usize = 64 * 1024 * 1024;

/// An OC 4.x server and one account on it.
pub(crate) struct Oc4 {
    pub server: Server,
    auth: Server,
    username: String,
    password: SecretString,
    token: Mutex<TokenState>,
}

struct TokenState {
    current: Option<Arc<Token>>,
    pace: Pace,
    rejected: Option<String>,
}

struct Token {
    value: SecretString,
    refresh_at: Instant,
}

impl Token {
    fn header(&self) -> HeaderValue {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", self.value.expose_secret()))
            .expect("checked to be header text when received");
        v.set_sensitive(true);
        v
    }
}

impl Oc4 {
    pub fn new(
        base: Url,
        auth_base: Url,
        username: String,
        password: SecretString,
        net: &NetworkConfig,
    ) -> Result<Self, OcError> {
        // Token requests are rare and paced: one at a time is plenty.
        let auth_net = NetworkConfig {
            max_concurrency: 1,
            ..net.clone()
        };
        Ok(Self {
            server: Server::new(base, net)?,
            auth: Server::new(auth_base, &auth_net)?,
            username,
            password,
            token: Mutex::new(TokenState {
                current: None,
                pace: Pace::new(TOKENS_PER_WINDOW, TOKEN_WINDOW),
                rejected: None,
            }),
        })
    }

    /// `GET {base}/pages/auth/api/clinicaldata/{study}/{subject|*}/*/*`.
    pub fn clinical_url(&self, study: &str, subject: Option<&str>, flags: QueryFlags) -> Url {
        self.server.url(
            &[
                "pages",
                "auth",
                "api",
                "clinicaldata",
                study,
                subject.unwrap_or("*"),
                "*",
                "*",
            ],
            &[
                ("includeMetadata", yn(flags.include_metadata)),
                ("includeAudits", yn(flags.include_audits)),
                ("includeDNs", "n"),
                ("showArchived", yn(flags.show_archived)),
            ],
        )
    }

    /// The metadata: the clinical data call for one subject (`*`, the
    /// whole study, only when there is none) with metadata and nothing
    /// else that costs (4.x has no metadata-only REST call).
    pub fn metadata_url(&self, study: &str, subject: Option<&str>) -> Url {
        let flags = QueryFlags {
            include_metadata: true,
            include_audits: false,
            show_archived: false,
        };
        self.clinical_url(study, subject, flags)
    }

    pub fn participants_url(&self, study: &str) -> Url {
        self.server.url(
            &[
                "pages",
                "auth",
                "api",
                "clinicaldata",
                "studies",
                study,
                "participants",
            ],
            &[],
        )
    }

    pub async fn get_xml(&self, url: &Url, subject: Option<String>) -> Result<Body, OcError> {
        let sent = self.get(url, "application/xml").await?;
        Ok(self.server.body(sent, url, subject))
    }

    pub async fn participants(&self, study: &str) -> Result<Vec<SubjectListing>, OcError> {
        let url = self.participants_url(study);
        let sent = self.get(&url, "application/json").await?;
        let bytes = self.server.small_body(sent, &url, SMALL_BODY_LIMIT).await?;
        parse_participants(&bytes).map_err(|detail| self.server.unexpected(&url, detail))
    }

    /// A successful response to `GET url`, with one token refresh on 401.
    async fn get(&self, url: &Url, accept: &'static str) -> Result<Sent, OcError> {
        let mut refreshed = false;
        loop {
            let token = self.token().await?;
            let sent = self
                .server
                .send(&Method::GET, url, || {
                    self.server
                        .client
                        .get(url.clone())
                        .header(ACCEPT, accept)
                        .header(AUTHORIZATION, token.header())
                })
                .await?;
            let status = sent.response.status();
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                drop(sent);
                tracing::info!(server = %self.server.origin, path = url.path(), "OpenClinica token refused; fetching a new one");
                self.invalidate(&token).await;
                refreshed = true;
                continue;
            }
            if !status.is_success() {
                return Err(self
                    .server
                    .status_error(&Method::GET, url, status, sent.attempt));
            }
            return Ok(sent);
        }
    }

    /// The cached token, or a new one. The lock is held while fetching so
    /// concurrent callers share one token request.
    async fn token(&self) -> Result<Arc<Token>, OcError> {
        let mut state = self.token.lock().await;
        if let Some(detail) = &state.rejected {
            return Err(self.rejected(detail.clone()));
        }
        if let Some(t) = &state.current
            && Instant::now() < t.refresh_at
        {
            return Ok(t.clone());
        }
        state.current = None;
        match self.fetch_token(&mut state.pace).await {
            Ok(t) => {
                let t = Arc::new(t);
                state.current = Some(t.clone());
                Ok(t)
            }
            Err(OcError::AuthRejected { detail, .. }) => {
                state.rejected = Some(detail.clone());
                Err(self.rejected(detail))
            }
            Err(e) => Err(e),
        }
    }

    async fn invalidate(&self, stale: &Arc<Token>) {
        let mut state = self.token.lock().await;
        if state
            .current
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, stale))
        {
            state.current = None;
        }
    }

    fn token_url(&self) -> Url {
        self.auth
            .url(&["user-service", "api", "oauth", "token"], &[])
    }

    fn rejected(&self, detail: String) -> OcError {
        OcError::AuthRejected {
            server: self.auth.origin.clone(),
            path: self.token_url().path().to_owned(),
            username: self.username.clone(),
            detail,
        }
    }

    /// `POST {auth}/user-service/api/oauth/token`, each attempt paced.
    async fn fetch_token(&self, pace: &mut Pace) -> Result<Token, OcError> {
        let url = self.token_url();
        let body = SecretString::from(
            serde_json::json!({
                "username": self.username,
                "password": self.password.expose_secret(),
            })
            .to_string(),
        );
        let build = || {
            self.auth
                .client
                .post(url.clone())
                .header(CONTENT_TYPE, "application/json")
                .header(ACCEPT, "application/json, text/plain")
                .body(body.expose_secret().to_owned())
        };
        let RetryPolicy { max_attempts, .. } = self.auth.net.retry;
        for n in 1..=max_attempts {
            if let Some(wait) = pace.wait(Instant::now()) {
                tracing::info!(server = %self.auth.origin, wait_ms = wait.as_millis() as u64, "pacing OpenClinica token requests");
                tokio::time::sleep(wait).await;
            }
            pace.record(Instant::now());
            tracing::debug!(server = %self.auth.origin, user = %self.username, "requesting an OpenClinica 4.x token");
            let sent = match self
                .auth
                .try_once(
                    &Method::POST,
                    &url,
                    &build,
                    Attempt {
                        n,
                        of: max_attempts,
                    },
                )
                .await?
            {
                Outcome::Done(sent) => sent,
                Outcome::Retry(err, _) if n == max_attempts => return Err(err),
                Outcome::Retry(err, delay) => {
                    self.auth.pause(&url, &err, n, delay).await;
                    continue;
                }
            };
            let status = sent.response.status();
            if matches!(
                status,
                StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            ) {
                return Err(self.rejected(format!("HTTP {status}")));
            }
            if !status.is_success() {
                return Err(self
                    .auth
                    .status_error(&Method::POST, &url, status, sent.attempt));
            }
            let bytes = self.auth.small_body(sent, &url, SMALL_BODY_LIMIT).await?;
            let value = parse_token(&bytes).map_err(|detail| self.auth.unexpected(&url, detail))?;
            let lifetime =
                jwt_lifetime(value.expose_secret(), SystemTime::now()).unwrap_or(DEFAULT_LIFETIME);
            return Ok(Token {
                value,
                refresh_at: Instant::now() + refresh_after(lifetime),
            });
        }
        unreachable!("max_attempts is at least 1 and the last attempt returns")
    }
}

fn yn(b: bool) -> &'static str {
    if b { "y" } else { "n" }
}

/// A sliding-window pacer: at most `max` events per `window`.
struct Pace {
    max: usize,
    window: Duration,
    recent: VecDeque<Instant>,
}

impl Pace {
    fn new(max: usize, window: Duration) -> Self {
        Self {
            max,
            window,
            recent: VecDeque::with_capacity(max),
        }
    }

    /// How long to wait before the next event is allowed, if at all.
    fn wait(&mut self, now: Instant) -> Option<Duration> {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() < self.max {
            return None;
        }
        let oldest = *self.recent.front().expect("len >= max >= 1");
        Some(self.window - now.duration_since(oldest))
    }

    fn record(&mut self, now: Instant) {
        self.recent.push_back(now);
        while self.recent.len() > self.max {
            self.recent.pop_front();
        }
    }
}

/// How long to use a token that lives `lifetime`: until `REFRESH_MARGIN`
/// before its end, or half its life when that is shorter than two margins.
fn refresh_after(lifetime: Duration) -> Duration {
    if lifetime > 2 * REFRESH_MARGIN {
        lifetime - REFRESH_MARGIN
    } else {
        lifetime / 2
    }
}

/// The token in a token response: a bare JWT, a JSON string, or a JSON
/// object with `access_token` (or `accessToken`, `token`).
fn parse_token(body: &[u8]) -> Result<SecretString, String> {
    let text = std::str::from_utf8(body)
        .map_err(|_| "token response is not UTF-8".to_owned())?
        .trim();
    let token = if text.starts_with('{') || text.starts_with('"') {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Shape {
            Text(String),
            Object {
                #[serde(alias = "accessToken", alias = "token")]
                access_token: String,
            },
        }
        match serde_json::from_str::<Shape>(text) {
            Ok(Shape::Text(t) | Shape::Object { access_token: t }) => t,
            Err(_) => return Err("token response is JSON without an access_token".into()),
        }
    } else {
        text.to_owned()
    };
    let token = token.trim().to_owned();
    // RFC 6750's token68 alphabet: anything else (an HTML page, a message)
    // is not a token.
    let token68 = |b: u8| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b);
    if token.is_empty() || !token.bytes().all(token68) {
        return Err("token response holds no usable token".into());
    }
    Ok(SecretString::from(token))
}

/// The time left before a JWT's `exp`, read without checking the signature
/// (the server checks it; the client only wants to know when to refresh).
fn jwt_lifetime(token: &str, now: SystemTime) -> Option<Duration> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    #[derive(Deserialize)]
    struct Claims {
        exp: u64,
    }
    let exp = UNIX_EPOCH + Duration::from_secs(serde_json::from_slice::<Claims>(&bytes).ok()?.exp);
    Some(exp.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The participants list: a JSON array of objects (or an object holding
/// one) with `subjectKey`, `status`, `lastModified`; other fields ignored.
fn parse_participants(body: &[u8]) -> Result<Vec<SubjectListing>, String> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        format!(
            "participants are not JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    let list = match &value {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(o) => o
            .values()
            .find_map(|v| v.as_array())
            .ok_or("participants object holds no list")?,
        _ => return Err("participants are neither a list nor an object".into()),
    };
    let text = |v: Option<&serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            let subject_key = text(p.get("subjectKey"))
                .ok_or_else(|| format!("participant #{i} has no subjectKey"))?;
            Ok(SubjectListing {
                subject_key,
                status: text(p.get("status")),
                last_modified: text(p.get("lastModified")),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            e.encode(r#"{"alg":"RS256"}"#),
            e.encode(format!(r#"{{"sub":"u","exp":{exp}}}"#))
        )
    }

    #[test]
    fn tokens_in_every_shape() {
        let t = jwt(1);
        for body in [
            t.clone(),
            format!("\"{t}\""),
            format!(r#"{{"access_token":"{t}","expires_in":14400}}"#),
        ] {
            assert_eq!(
                parse_token(body.as_bytes()).unwrap().expose_secret(),
                t,
                "{body}"
            );
        }
        assert!(parse_token(b"{}").is_err());
        assert!(parse_token(b"  ").is_err());
        assert!(parse_token(b"<html>login</html>").is_err());
    }

    #[test]
    fn jwt_exp_gives_the_lifetime() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            jwt_lifetime(&jwt(1_000_000 + 14_400), now),
            Some(Duration::from_secs(14_400))
        );
        assert_eq!(jwt_lifetime(&jwt(10), now), Some(Duration::ZERO));
        assert_eq!(jwt_lifetime("opaque-token", now), None);
    }

    #[test]
    fn refresh_five_minutes_before_expiry() {
        assert_eq!(
            refresh_after(Duration::from_secs(14_400)),
            Duration::from_secs(14_100)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(300)),
            Duration::from_secs(150)
        );
    }

    #[test]
    fn pace_allows_two_per_window() {
        let mut p = Pace::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(p.wait(t0), None);
        p.record(t0);
        assert_eq!(p.wait(t0 + Duration::from_secs(1)), None);
        p.record(t0 + Duration::from_secs(1));
        assert_eq!(
            p.wait(t0 + Duration::from_secs(10)),
            Some(Duration::from_secs(50))
        );
        assert_eq!(p.wait(t0 + Duration::from_secs(60)), None);
    }

    #[test]
    fn participants_are_read_leniently() {
        let l = parse_participants(
            br#"[{"subjectKey":"SS_1","status":"available","lastModified":"2024-01-02 03:04:05","extra":1},
                 {"subjectKey":"SS_2"}]"#,
        )
        .unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].status.as_deref(), Some("available"));
        assert_eq!(l[1].last_modified, None);
        assert_eq!(
            parse_participants(br#"{"participants":[{"subjectKey":"SS_9"}]}"#).unwrap()[0]
                .subject_key,
            "SS_9"
        );
        assert!(parse_participants(br#"[{"label":"x"}]"#).is_err());
    }
}
