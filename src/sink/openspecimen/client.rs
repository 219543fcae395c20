//! [`OsClient`]: OpenSpecimen's REST API (`{base}/rest/ng`) with a session
//! token, JSON bodies, timeouts and retries.
//!
//! Session: the first request logs in (`POST /sessions` with
//! `{loginName, password, domainName}`), the token is cached and sent as
//! `X-OS-API-TOKEN` on every call. OpenSpecimen ends a session after an idle
//! timeout and then answers 401: the client logs in again, once, and repeats
//! the request; a second 401 right after a fresh login is an error
//! ([`OsError::TokenRefused`]). Concurrent requests share one login: the
//! token carries a generation number, and only the first request to see a
//! generation refused logs in again.
//!
//! A rejected login (401, 400 or 403 from `/sessions`) is never retried:
//! failed logins lock OpenSpecimen accounts.
//!
//! Retries: connect errors, timeouts, 5xx, 408 and 429 are retried with
//! exponential backoff and full jitter (`Retry-After` honoured up to 15
//! minutes), as the OpenClinica client does. Everything else is returned to
//! the caller: 2xx as JSON, 404 on a lookup as "absent", other 4xx as
//! [`OsError::Rejected`] carrying OpenSpecimen's message.
//!
//! Secrets: the password lives in a [`SecretString`] and only in the login
//! body; the token is a sensitive header value; neither is ever put in an
//! error or a log line. Logs name the server, method, path (no query),
//! status and attempt.
//!
//! This module knows HTTP and OpenSpecimen's session and error conventions,
//! not what the records mean (see `writer.rs`), not ODM, OpenClinica or the
//! queue.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue, USER_AGENT};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use url::Url;

use super::config::{OpenSpecimenConfig, RetryPolicy};
use super::error::{Attempt, Origin, OsError, os_message, status_is_transient};
use crate::openclinica::retry::{backoff, retry_after};

/// The header OpenSpecimen reads its session token from.
pub const TOKEN_HEADER: &str = "X-OS-API-TOKEN";

/// Responses larger than this are refused: OpenSpecimen's answers to the
/// calls made here are single records or short lists.
const MAX_BODY: usize = 8 * 1024 * 1024;

/// A client for one OpenSpecimen server and account.
pub struct OsClient {
    origin: Origin,
    /// `{base_url}/rest/ng`.
    api: Url,
    http: reqwest::Client,
    login_name: String,
    password: SecretString,
    domain: String,
    retry: RetryPolicy,
    response_timeout: Duration,
    session: Mutex<Session>,
}

impl std::fmt::Debug for OsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OsClient")
            .field("server", &self.origin)
            .field("login_name", &self.login_name)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Session {
    token: Option<SecretString>,
    /// Bumped by every login, so that a 401 seen by several requests at
    /// once leads to one new login.
    generation: u64,
    logins: u64,
}

/// A token and the generation it belongs to.
struct Token {
    value: SecretString,
    generation: u64,
}

impl OsClient {
    /// A client for `config`, with the password already resolved (see
    /// [`OpenSpecimenConfig::password`]).
    pub fn new(config: &OpenSpecimenConfig, password: SecretString) -> Result<Self, OsError> {
        config.validate().map_err(OsError::Config)?;
        crate::install_crypto_provider();
        let mut api = config.base_url.clone();
        api.path_segments_mut()
            .map_err(|()| OsError::Config("base_url cannot be a base".into()))?
            .pop_if_empty()
            .extend(["rest", "ng"]);
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("ocsync/", env!("CARGO_PKG_VERSION"))),
        );
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(config.connect_timeout())
            // A redirect would be to a login page or another host; neither
            // should receive the token.
            .redirect(reqwest::redirect::Policy::none())
            .gzip(true)
            .pool_idle_timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| OsError::Config(format!("HTTP client: {}", e.without_url())))?;
        Ok(Self {
            origin: Origin::of(&config.base_url),
            api,
            http,
            login_name: config.login_name.clone(),
            password,
            domain: config.domain.clone(),
            retry: config.retry.clone(),
            response_timeout: config.response_timeout(),
            session: Mutex::new(Session::default()),
        })
    }

    /// The server, as it appears in messages.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// How many logins this client has made (for tests and metrics).
    pub async fn logins(&self) -> u64 {
        self.session.lock().await.logins
    }

    /// `{base}/rest/ng/{segments…}?{query}`; each segment is encoded on its
    /// own, so a `/` in a value cannot change the path.
    pub fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.api.clone();
        url.path_segments_mut()
            .expect("api is a base URL")
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// `GET`: the JSON answer, or `None` when OpenSpecimen answers 404.
    pub async fn get(&self, url: &Url) -> Result<Option<Value>, OsError> {
        let (status, body) = self.call(Method::GET, url, None).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.json(Method::GET, url, status, &body).map(Some)
    }

    /// `POST` a JSON body; the JSON answer.
    pub async fn post(&self, url: &Url, body: &Value) -> Result<Value, OsError> {
        let (status, answer) = self.call(Method::POST, url, Some(body)).await?;
        self.json(Method::POST, url, status, &answer)
    }

    /// `PUT` a JSON body; the JSON answer.
    pub async fn put(&self, url: &Url, body: &Value) -> Result<Value, OsError> {
        let (status, answer) = self.call(Method::PUT, url, Some(body)).await?;
        self.json(Method::PUT, url, status, &answer)
    }

    /// `DELETE`; the JSON answer (`Null` when empty).
    pub async fn delete(&self, url: &Url) -> Result<Value, OsError> {
        let (status, answer) = self.call(Method::DELETE, url, None).await?;
        self.json(Method::DELETE, url, status, &answer)
    }

    /// Logs in now (whether or not a token is cached).
    pub async fn login(&self) -> Result<(), OsError> {
        let mut session = self.session.lock().await;
        self.login_locked(&mut session).await.map(drop)
    }

    /// A 2xx answer as JSON; a 4xx as [`OsError::Rejected`] with
    /// OpenSpecimen's message; anything else as a status error.
    fn json(
        &self,
        method: Method,
        url: &Url,
        status: StatusCode,
        body: &[u8],
    ) -> Result<Value, OsError> {
        let m = method_name(&method);
        if status.is_success() {
            if body.iter().all(u8::is_ascii_whitespace) {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(body).map_err(|e| OsError::Unexpected {
                server: self.origin.clone(),
                method: m,
                path: url.path().to_owned(),
                detail: format!("the body is not JSON: {e}"),
            });
        }
        if status.is_client_error() {
            return Err(OsError::Rejected {
                method: m,
                path: url.path().to_owned(),
                status,
                message: os_message(body),
            });
        }
        Err(OsError::Status {
            server: self.origin.clone(),
            method: m,
            path: url.path().to_owned(),
            status,
            attempt: Attempt {
                n: self.retry.max_attempts,
                of: self.retry.max_attempts,
            },
            detail: Some(os_message(body)),
        })
    }

    /// Sends with the session token, logging in first when there is none
    /// and again (once) on 401. Returns the final status that is neither
    /// transient nor 401, with its body.
    async fn call(
        &self,
        method: Method,
        url: &Url,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), OsError> {
        let body = body.map(|b| Bytes::from(serde_json::to_vec(b).expect("JSON values serialise")));
        let token = self.token().await?;
        let (status, answer) = self
            .send(&method, url, body.clone(), Some(&token.value))
            .await?;
        if status != StatusCode::UNAUTHORIZED {
            return Ok((status, answer));
        }
        tracing::info!(
            server = %self.origin,
            path = url.path(),
            "OpenSpecimen session expired; logging in again"
        );
        let fresh = self.relogin(token.generation).await?;
        let (status, answer) = self.send(&method, url, body, Some(&fresh.value)).await?;
        if status == StatusCode::UNAUTHORIZED {
            return Err(OsError::TokenRefused {
                server: self.origin.clone(),
                method: method_name(&method),
                path: url.path().to_owned(),
                login_name: self.login_name.clone(),
            });
        }
        Ok((status, answer))
    }

    /// The cached token, logging in when there is none.
    async fn token(&self) -> Result<Token, OsError> {
        let mut session = self.session.lock().await;
        if let Some(value) = &session.token {
            return Ok(Token {
                value: value.clone(),
                generation: session.generation,
            });
        }
        self.login_locked(&mut session).await
    }

    /// A token newer than `refused`: another request may have logged in
    /// again already; otherwise this one does.
    async fn relogin(&self, refused: u64) -> Result<Token, OsError> {
        let mut session = self.session.lock().await;
        if session.generation != refused
            && let Some(value) = &session.token
        {
            return Ok(Token {
                value: value.clone(),
                generation: session.generation,
            });
        }
        session.token = None;
        self.login_locked(&mut session).await
    }

    async fn login_locked(&self, session: &mut Session) -> Result<Token, OsError> {
        let url = self.url(&["sessions"], &[]);
        // Built only here and dropped right after sending.
        let body = Bytes::from(
            serde_json::to_vec(&json!({
                "loginName": self.login_name,
                "password": self.password.expose_secret(),
                "domainName": self.domain,
            }))
            .expect("JSON values serialise"),
        );
        session.logins += 1;
        let (status, answer) = self.send(&Method::POST, &url, Some(body), None).await?;
        if matches!(
            status,
            StatusCode::UNAUTHORIZED | StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN
        ) {
            return Err(OsError::LoginRejected {
                server: self.origin.clone(),
                path: url.path().to_owned(),
                login_name: self.login_name.clone(),
                status,
                message: os_message(&answer),
            });
        }
        if !status.is_success() {
            return Err(OsError::Status {
                server: self.origin.clone(),
                method: "POST",
                path: url.path().to_owned(),
                status,
                attempt: Attempt { n: 1, of: 1 },
                detail: Some("login failed; is base_url the OpenSpecimen application root?".into()),
            });
        }
        let token = serde_json::from_slice::<Value>(&answer)
            .ok()
            .and_then(|v| v.get("token").and_then(Value::as_str).map(str::to_owned))
            .filter(|t| !t.is_empty())
            .ok_or_else(|| OsError::Unexpected {
                server: self.origin.clone(),
                method: "POST",
                path: url.path().to_owned(),
                detail: "login answer without a token".into(),
            })?;
        session.generation += 1;
        let value = SecretString::from(token);
        session.token = Some(value.clone());
        Ok(Token {
            value,
            generation: session.generation,
        })
    }

    /// One request with retries of transient failures. Returns the first
    /// answer whose status is not transient.
    async fn send(
        &self,
        method: &Method,
        url: &Url,
        body: Option<Bytes>,
        token: Option<&SecretString>,
    ) -> Result<(StatusCode, Bytes), OsError> {
        let max = self.retry.max_attempts.max(1);
        let m = method_name(method);
        for n in 1..=max {
            let attempt = Attempt { n, of: max };
            let mut request = self.http.request(method.clone(), url.clone());
            if let Some(token) = token {
                let mut value = HeaderValue::from_str(token.expose_secret()).map_err(|_| {
                    OsError::Unexpected {
                        server: self.origin.clone(),
                        method: m,
                        path: url.path().to_owned(),
                        detail: "the session token is not a valid header value".into(),
                    }
                })?;
                value.set_sensitive(true);
                request = request.header(TOKEN_HEADER, value);
            }
            if let Some(body) = &body {
                request = request
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            let exchange = async {
                let response = request.send().await?;
                let status = response.status();
                let retry_after = retry_after(response.headers(), SystemTime::now());
                let bytes = read_capped(response).await?;
                Ok::<_, reqwest::Error>((status, retry_after, bytes))
            };
            let sent_at = std::time::Instant::now();
            let answer = tokio::time::timeout(self.response_timeout, exchange).await;
            crate::metrics::upstream_request(
                crate::metrics::Upstream::OpenSpecimen,
                sent_at.elapsed(),
                answer
                    .as_ref()
                    .ok()
                    .and_then(|r| r.as_ref().ok())
                    .map(|(status, ..)| status.as_u16()),
                answer.is_err()
                    || answer
                        .as_ref()
                        .is_ok_and(|r| r.as_ref().is_err_and(|e| e.is_timeout())),
            );
            let (err, delay) = match answer {
                Ok(Ok((status, _, bytes))) if !status_is_transient(status) => {
                    return Ok((status, bytes));
                }
                Ok(Ok((status, retry_after, bytes))) => (
                    OsError::Status {
                        server: self.origin.clone(),
                        method: m,
                        path: url.path().to_owned(),
                        status,
                        attempt,
                        detail: Some(os_message(&bytes)),
                    },
                    retry_after.unwrap_or_else(|| backoff(&self.retry, n)),
                ),
                Ok(Err(e)) if e.is_builder() || e.is_redirect() => {
                    return Err(OsError::Unexpected {
                        server: self.origin.clone(),
                        method: m,
                        path: url.path().to_owned(),
                        detail: format!("request could not be sent: {}", e.without_url()),
                    });
                }
                Ok(Err(e)) => {
                    let what = if e.is_connect() {
                        "could not connect"
                    } else if e.is_timeout() {
                        "timed out"
                    } else {
                        "request failed"
                    };
                    (
                        OsError::Send {
                            server: self.origin.clone(),
                            method: m,
                            path: url.path().to_owned(),
                            what: what.to_owned(),
                            attempt,
                            source: Some(e.without_url()),
                        },
                        backoff(&self.retry, n),
                    )
                }
                Err(_elapsed) => (
                    OsError::Send {
                        server: self.origin.clone(),
                        method: m,
                        path: url.path().to_owned(),
                        what: format!(
                            "no response within {} ms",
                            self.response_timeout.as_millis()
                        ),
                        attempt,
                        source: None,
                    },
                    backoff(&self.retry, n),
                ),
            };
            if n == max {
                return Err(err);
            }
            tracing::warn!(
                server = %self.origin,
                method = m,
                path = url.path(),
                attempt = n,
                max_attempts = max,
                delay_ms = delay.as_millis() as u64,
                error = %err,
                "OpenSpecimen: transient failure; retrying"
            );
            tokio::time::sleep(delay).await;
        }
        unreachable!("the last attempt returns")
    }
}

async fn read_capped(mut response: reqwest::Response) -> Result<Bytes, reqwest::Error> {
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        if out.len() + chunk.len() > MAX_BODY {
            // Keep what fits: callers only need a message or a small record,
            // and an oversized answer fails JSON parsing with a clear error.
            break;
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        _ => "GET",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_each_segment() {
        let mut c = OpenSpecimenConfig::new(
            Url::parse("http://127.0.0.1:1/openspecimen/").unwrap(),
            "u",
            super::super::config::CredentialRef::Env("X".into()),
        );
        c.retry.max_attempts = 1;
        let client = OsClient::new(&c, SecretString::from("pw")).unwrap();
        let u = client.url(&["visits", "a/b"], &[("visitName", "x y")]);
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:1/openspecimen/rest/ng/visits/a%2Fb?visitName=x+y"
        );
        assert!(!format!("{client:?}").contains("pw"));
    }
}
