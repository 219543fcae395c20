//! What the 3.x and 4.x clients share: one reqwest client per server, the
//! per-server concurrency limit, URL building, and the retry loop.
//!
//! The split of retry duties: this loop retries everything that fails
//! *before* a body is handed over (connect errors, no response within the
//! response timeout, 5xx, 408, 429 honouring `Retry-After`), with
//! exponential backoff and full jitter. Once a 2xx body is handed over it is
//! the caller's: a body that breaks off mid-stream surfaces as a transient
//! [`OcError::Body`] and the sync job retries the whole document, because
//! only it knows how far it got.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{ACCEPT_LANGUAGE, HeaderMap, HeaderValue, USER_AGENT};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use url::Url;

use super::body::{Body, HttpChunks, ReadAhead};
use super::config::NetworkConfig;
use super::error::{Attempt, OcError, Origin, status_is_transient};
use super::retry;

/// Buffer of the reader over a response body; larger reads gain nothing
/// because chunks arrive at network pace.
const READ_BUFFER: usize = 64 * 1024;
/// Bytes of a whole-study document read ahead of its parser.
const READ_AHEAD: usize = 16 << 20;

/// What one attempt came to.
pub(crate) enum Outcome {
    Done(Sent),
    Retry(OcError, Duration),
}

/// A response with a status that is not worth retrying (2xx, 3xx or 4xx),
/// the concurrency permit it was sent under, and the attempt that got it.
pub(crate) struct Sent {
    pub response: Response,
    pub permit: OwnedSemaphorePermit,
    pub attempt: Attempt,
}

/// One OpenClinica server (an origin plus an application root).
pub(crate) struct Server {
    pub origin: Origin,
    pub base: Url,
    pub client: reqwest::Client,
    pub net: NetworkConfig,
    permits: Arc<Semaphore>,
}

impl Server {
    pub fn new(base: Url, net: &NetworkConfig) -> Result<Self, OcError> {
        net.validate()?;
        let base = checked_base(base)?;
        Ok(Self {
            origin: Origin::of(&base),
            client: build_client(net)?,
            net: net.clone(),
            permits: Arc::new(Semaphore::new(net.max_concurrency)),
            base,
        })
    }

    /// `base` followed by `segments` (each percent-encoded as one segment,
    /// so a `/` in a subject label cannot change the path) and `query`.
    pub fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        url_under(&self.base, segments, query)
    }

    /// Sends the request `build` makes, retrying transient failures.
    ///
    /// Returns the first response whose status is not transient, whatever
    /// it is: the caller interprets 2xx, redirects and 4xx (the 3.x login
    /// page, the 4.x 401) before calling [`Server::status_error`].
    pub async fn send(
        &self,
        method: &Method,
        url: &Url,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Sent, OcError> {
        let max = self.net.retry.max_attempts;
        for n in 1..=max {
            match self
                .try_once(method, url, &build, Attempt { n, of: max })
                .await?
            {
                Outcome::Done(sent) => return Ok(sent),
                Outcome::Retry(err, _) if n == max => return Err(err),
                Outcome::Retry(err, delay) => self.pause(url, &err, n, delay).await,
            }
        }
        unreachable!("max_attempts is at least 1 and the last attempt returns")
    }

    /// Logs a transient failure and waits `delay` before the next attempt.
    pub async fn pause(&self, url: &Url, err: &OcError, n: u32, delay: Duration) {
        tracing::warn!(
            server = %self.origin,
            path = url.path(),
            attempt = n,
            max_attempts = self.net.retry.max_attempts,
            delay_ms = delay.as_millis() as u64,
            error = %err,
            "transient failure; retrying"
        );
        tokio::time::sleep(delay).await;
    }

    /// One attempt: a response that is not transient, or the transient
    /// error with the delay to wait before trying again (`Retry-After` when
    /// the server sent one, else backoff). Permanent send errors are `Err`.
    pub async fn try_once(
        &self,
        method: &Method,
        url: &Url,
        build: &impl Fn() -> RequestBuilder,
        attempt: Attempt,
    ) -> Result<Outcome, OcError> {
        let method_name = method_name(method);
        let path = url.path();
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let backoff = || retry::backoff(&self.net.retry, attempt.n);
        let sent_at = std::time::Instant::now();
        let answer = tokio::time::timeout(self.net.response_timeout(), build().send()).await;
        crate::metrics::upstream_request(
            crate::metrics::Upstream::OpenClinica,
            sent_at.elapsed(),
            answer
                .as_ref()
                .ok()
                .and_then(|r| r.as_ref().ok())
                .map(|r| r.status().as_u16()),
            answer.is_err()
                || answer
                    .as_ref()
                    .is_ok_and(|r| r.as_ref().is_err_and(|e| e.is_timeout())),
        );
        let (err, delay) = match answer {
            Ok(Ok(response)) if !status_is_transient(response.status()) => {
                return Ok(Outcome::Done(Sent {
                    response,
                    permit,
                    attempt,
                }));
            }
            Ok(Ok(response)) => {
                let delay = retry::retry_after(response.headers(), SystemTime::now())
                    .unwrap_or_else(backoff);
                let err = OcError::Status {
                    server: self.origin.clone(),
                    method: method_name,
                    path: path.to_owned(),
                    status: response.status(),
                    attempt,
                };
                (err, delay)
            }
            Ok(Err(e)) if e.is_builder() || e.is_redirect() => {
                return Err(self.unexpected(
                    url,
                    format!("request could not be built: {}", e.without_url()),
                ));
            }
            Ok(Err(e)) => {
                let what = if e.is_connect() {
                    "could not connect"
                } else if e.is_timeout() {
                    "timed out"
                } else {
                    "request failed"
                };
                let err = OcError::Send {
                    server: self.origin.clone(),
                    method: method_name,
                    path: path.to_owned(),
                    what: what.to_owned(),
                    attempt,
                    source: Some(e.without_url()),
                };
                (err, backoff())
            }
            Err(_elapsed) => {
                let err = OcError::Send {
                    server: self.origin.clone(),
                    method: method_name,
                    path: path.to_owned(),
                    what: format!("no response within {} ms", self.net.response_timeout_ms),
                    attempt,
                    source: None,
                };
                (err, backoff())
            }
        };
        // The slot is freed here, before the caller waits: a backoff is
        // not work.
        drop(permit);
        Ok(Outcome::Retry(err, delay))
    }

    /// The error for a final status that is not success.
    pub fn status_error(
        &self,
        method: &Method,
        url: &Url,
        status: StatusCode,
        attempt: Attempt,
    ) -> OcError {
        OcError::Status {
            server: self.origin.clone(),
            method: method_name(method),
            path: url.path().to_owned(),
            status,
            attempt,
        }
    }

    /// The body of a successful response as a [`Body`]; the permit moves in
    /// and is released when the body ends, fails or is dropped.
    pub fn body(&self, sent: Sent, url: &Url, subject: Option<String>) -> Body {
        let chunks = HttpChunks::new(
            sent.response,
            sent.permit,
            self.net.idle_timeout(),
            self.origin.clone(),
            url.path().to_owned(),
        );
        if subject.is_some() {
            let reader = tokio::io::BufReader::with_capacity(
                READ_BUFFER,
                tokio_util::io::StreamReader::new(chunks),
            );
            return Body::new(reader, subject);
        }
        // A whole-study document: read ahead of the parser, so the server
        // keeps sending while a batch is mapped instead of waiting on a
        // full socket buffer.
        let reader = tokio::io::BufReader::with_capacity(
            READ_BUFFER,
            tokio_util::io::StreamReader::new(ReadAhead::spawn(chunks, READ_AHEAD)),
        );
        Body::new(reader, subject)
    }

    pub fn unexpected(&self, url: &Url, detail: impl Into<String>) -> OcError {
        OcError::Unexpected {
            server: self.origin.clone(),
            path: url.path().to_owned(),
            detail: detail.into(),
        }
    }

    /// Reads a small body (a token, a JSON list) whole, with a size cap so
    /// a misdirected request cannot fill the memory.
    pub async fn small_body(
        &self,
        sent: Sent,
        url: &Url,
        limit: usize,
    ) -> Result<bytes::Bytes, OcError> {
        use futures::StreamExt;
        let mut out = bytes::BytesMut::new();
        let mut chunks = HttpChunks::new(
            sent.response,
            sent.permit,
            self.net.idle_timeout(),
            self.origin.clone(),
            url.path().to_owned(),
        );
        while let Some(chunk) = chunks.next().await {
            let chunk =
                chunk.map_err(|e| match e.into_inner().map(|b| b.downcast::<OcError>()) {
                    Some(Ok(oc)) => *oc,
                    _ => self.unexpected(url, "body could not be read"),
                })?;
            if out.len() + chunk.len() > limit {
                return Err(self.unexpected(url, format!("body larger than {limit} bytes")));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.freeze())
    }
}

pub(crate) fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        _ => "GET",
    }
}

pub(crate) fn url_under(base: &Url, segments: &[&str], query: &[(&str, &str)]) -> Url {
    let mut url = base.clone();
    url.path_segments_mut()
        .expect("checked_base refused URLs that cannot be a base")
        .pop_if_empty()
        .extend(segments);
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    url
}

/// A base URL is http(s), has a host, and carries no credentials, query or
/// fragment (credentials belong in `username`/`password`, where they stay
/// secret; a URL ends up in logs).
pub(crate) fn checked_base(url: Url) -> Result<Url, OcError> {
    if !matches!(url.scheme(), "http" | "https")
        || url.cannot_be_a_base()
        || url.host_str().is_none()
    {
        return Err(OcError::Config(format!(
            "base URL {} must be http(s)://host[:port][/path]",
            Origin::of(&url)
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(OcError::Config(format!(
            "base URL for {} must not carry credentials; use username and password",
            Origin::of(&url)
        )));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(OcError::Config(format!(
            "base URL for {} must not carry a query or fragment",
            Origin::of(&url)
        )));
    }
    Ok(url)
}

/// A reqwest client for one server: connect timeout, gzip, no automatic
/// redirects (a redirect to the login page is how OC 3.x says "session
/// expired", so the client must see it), and `Accept-Language: en` on every
/// request because OC localises status words.
fn build_client(net: &NetworkConfig) -> Result<reqwest::Client, OcError> {
    crate::install_crypto_provider();
    let mut headers = HeaderMap::new();
    headers.insert(ACCEPT_LANGUAGE, HeaderValue::from_static("en"));
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("ocsync/", env!("CARGO_PKG_VERSION"))),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(net.connect_timeout())
        .redirect(reqwest::redirect::Policy::none())
        .gzip(true)
        // Tomcat drops idle keep-alive connections after about 20 s; a
        // shorter pool timeout avoids reusing a connection it just closed.
        .pool_idle_timeout(Duration::from_secs(15))
        .build()
        .map_err(|e| OcError::Config(format!("HTTP client: {}", e.without_url())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded_one_by_one() {
        let base = Url::parse("https://oc.example.org/OpenClinica").unwrap();
        let u = url_under(
            &base,
            &[
                "rest",
                "clinicaldata",
                "xml",
                "view",
                "S_1",
                "a/b c",
                "*",
                "*",
            ],
            &[("metadata", "n")],
        );
        assert_eq!(
            u.as_str(),
            "https://oc.example.org/OpenClinica/rest/clinicaldata/xml/view/S_1/a%2Fb%20c/*/*?metadata=n"
        );
        let slash = Url::parse("https://oc.example.org/OpenClinica/").unwrap();
        assert_eq!(url_under(&slash, &["x"], &[]).path(), "/OpenClinica/x");
    }

    #[test]
    fn base_urls_with_credentials_or_queries_are_refused() {
        for bad in [
            "https://u:p@oc.example.org/",
            "https://oc.example.org/?a=b",
            "ftp://oc.example.org/",
        ] {
            let e = checked_base(Url::parse(bad).unwrap())
                .unwrap_err()
                .to_string();
            assert!(!e.contains(":p@"), "{e}");
        }
        assert!(checked_base(Url::parse("http://127.0.0.1:8080/OpenClinica").unwrap()).is_ok());
    }
}
