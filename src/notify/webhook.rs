//! Webhooks: a signed JSON POST.
//!
//! Each request carries:
//!
//! | header | value |
//! | --- | --- |
//! | `Content-Type` | `application/json` |
//! | `X-Ocsync-Id` | the notification's id; the same on every retry, so a receiver can drop a repeat |
//! | `X-Ocsync-Timestamp` | seconds since the Unix epoch when this attempt was signed |
//! | `X-Ocsync-Signature` | `sha256=` and the lowercase hex HMAC-SHA256, keyed with the CP's `webhook_secret`, of `{timestamp}.{body}` |
//!
//! A receiver verifies by computing the same HMAC over the timestamp
//! header, a `.`, and the raw body bytes, comparing in constant time, and
//! refusing timestamps far from its clock (replays). The README has a
//! recipe.
//!
//! Answers: 2xx is delivered; 408, 429, 5xx, timeouts and network errors
//! are tried again later; any other answer (4xx, and 3xx: redirects are not
//! followed, so the body and signature never go elsewhere) is a permanent
//! failure. Error texts name the status, never the URL or the answer's body.

use std::time::Duration;

use hmac::{Hmac, Mac};
use reqwest::header::{CONTENT_TYPE, HeaderValue, USER_AGENT};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use super::Failure;

pub const ID_HEADER: &str = "x-ocsync-id";
pub const TIMESTAMP_HEADER: &str = "x-ocsync-timestamp";
pub const SIGNATURE_HEADER: &str = "x-ocsync-signature";

/// The signature header's value for `body` sent at `timestamp`:
/// `sha256=` + hex(HMAC-SHA256(secret, "{timestamp}.{body}")).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Sends webhooks; one client (and connection pool) per dispatcher.
#[derive(Clone)]
pub struct WebhookSender {
    http: reqwest::Client,
}

impl WebhookSender {
    /// A sender whose every request ends within `timeout`.
    pub fn new(timeout: Duration) -> Result<Self, String> {
        crate::install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("webhook HTTP client: {}", e.without_url()))?;
        Ok(Self { http })
    }

    /// POSTs `body` to `url`, signed with `secret`.
    pub async fn send(
        &self,
        url: &str,
        id: i64,
        secret: &SecretString,
        body: Vec<u8>,
    ) -> Result<(), Failure> {
        let timestamp = chrono::Utc::now().timestamp();
        let signature = sign(secret.expose_secret().as_bytes(), timestamp, &body);
        let answer = self
            .http
            .post(url)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(
                USER_AGENT,
                HeaderValue::from_static(concat!("ocsync/", env!("CARGO_PKG_VERSION"))),
            )
            .header(ID_HEADER, id.to_string())
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await;
        match answer {
            Ok(resp) => classify(resp.status()),
            Err(e) if e.is_timeout() => Err(Failure::retry("the webhook did not answer in time")),
            Err(e) if e.is_builder() => Err(Failure::permanent(format!(
                "the webhook request cannot be built: {}",
                e.without_url()
            ))),
            Err(e) => Err(Failure::retry(format!(
                "the webhook cannot be reached: {}",
                error_chain(&e.without_url())
            ))),
        }
    }
}

/// What an answer's status means for the delivery.
fn classify(status: reqwest::StatusCode) -> Result<(), Failure> {
    let code = status.as_u16();
    if status.is_success() {
        Ok(())
    } else if code == 408 || code == 429 || status.is_server_error() {
        Err(Failure::retry(format!(
            "the webhook answered HTTP {status}"
        )))
    } else if status.is_redirection() {
        Err(Failure::permanent(format!(
            "the webhook answered HTTP {status}; redirects are not followed"
        )))
    } else {
        Err(Failure::permanent(format!(
            "the webhook answered HTTP {status}"
        )))
    }
}

/// An error and its causes, one sentence (reqwest's own message is only
/// "error sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hmac_of_timestamp_dot_body() {
        let s = sign(b"secret", 1_700_000_000, br#"{"a":1}"#);
        // A known answer, computed independently (Python's hmac module).
        assert_eq!(
            s,
            "sha256=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(b"secret").unwrap();
        mac.update(br#"1700000000.{"a":1}"#);
        mac.verify_slice(&hex(&s[7..])).unwrap();
        // Any change to the key, time or body changes the signature.
        assert_ne!(s, sign(b"secreT", 1_700_000_000, br#"{"a":1}"#));
        assert_ne!(s, sign(b"secret", 1_700_000_001, br#"{"a":1}"#));
        assert_ne!(s, sign(b"secret", 1_700_000_000, br#"{"a":2}"#));
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn answers_are_delivered_retried_or_refused() {
        use reqwest::StatusCode as S;
        assert!(classify(S::OK).is_ok());
        assert!(classify(S::NO_CONTENT).is_ok());
        for retry in [
            S::REQUEST_TIMEOUT,
            S::TOO_MANY_REQUESTS,
            S::BAD_GATEWAY,
            S::SERVICE_UNAVAILABLE,
        ] {
            let f = classify(retry).unwrap_err();
            assert!(!f.permanent, "{retry}");
            assert!(f.reason.contains(retry.as_str()), "{}", f.reason);
        }
        for refuse in [
            S::BAD_REQUEST,
            S::UNAUTHORIZED,
            S::NOT_FOUND,
            S::GONE,
            S::MOVED_PERMANENTLY,
        ] {
            assert!(classify(refuse).unwrap_err().permanent, "{refuse}");
        }
    }
}
