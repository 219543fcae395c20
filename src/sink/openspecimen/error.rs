//! What can go wrong while talking to OpenSpecimen.
//!
//! Policy, as in [`crate::openclinica`]: every error names the server
//! (`scheme://host:port`), the method, the URL path (never the query, which
//! may hold a PPID or a label) and, where there was one, the HTTP status and
//! the attempt `n/m`; none carries the password or the session token.
//!
//! Three kinds, which the writer treats differently:
//! - [`OsError::Rejected`]: OpenSpecimen refused *this record* (400 with its
//!   application message, 404, 409, 422, …). One error row; the batch goes on.
//! - transient ([`OsError::is_transient`]): connect errors, timeouts, 5xx,
//!   408 and 429 still failing after the retries. The whole batch fails and
//!   the run retries later from its checkpoint.
//! - permanent: the login was rejected, the token is refused right after a
//!   fresh login, the configuration or the answer makes no sense. The whole
//!   batch fails and a person must act.

use reqwest::StatusCode;

pub use crate::openclinica::{Attempt, Origin};

#[derive(Debug, thiserror::Error)]
pub enum OsError {
    #[error("OpenSpecimen configuration: {0}")]
    Config(String),

    /// No answer: connection refused or reset, DNS, TLS, or no complete
    /// response within the response timeout.
    #[error("OpenSpecimen {server} {method} {path}: {what} ({attempt})")]
    Send {
        server: Origin,
        method: &'static str,
        path: String,
        what: String,
        attempt: Attempt,
        #[source]
        source: Option<reqwest::Error>,
    },

    /// A status this client does not expect here (5xx after the retries, a
    /// 2xx without the expected JSON, …).
    #[error("OpenSpecimen {server} {method} {path}: HTTP {status} ({attempt}){}", detail_suffix(.detail))]
    Status {
        server: Origin,
        method: &'static str,
        path: String,
        status: StatusCode,
        attempt: Attempt,
        detail: Option<String>,
    },

    /// OpenSpecimen refused the login name or password. Never retried:
    /// repeated failed logins lock an OpenSpecimen account.
    #[error(
        "OpenSpecimen {server} {path}: login rejected for user {login_name} (HTTP {status}: {message}); not retried, to keep the account from being locked"
    )]
    LoginRejected {
        server: Origin,
        path: String,
        login_name: String,
        status: StatusCode,
        message: String,
    },

    /// The token was refused (401) again right after a fresh login.
    #[error(
        "OpenSpecimen {server} {method} {path}: the session token was refused right after a fresh login; does user {login_name} lack access?"
    )]
    TokenRefused {
        server: Origin,
        method: &'static str,
        path: String,
        login_name: String,
    },

    /// OpenSpecimen refused one record: the message is OpenSpecimen's own
    /// (`[{"code","message"}]`), for the error report.
    #[error("{message} (OpenSpecimen {method} {path}: HTTP {status})")]
    Rejected {
        method: &'static str,
        path: String,
        status: StatusCode,
        /// OpenSpecimen's message(s), joined with `; `.
        message: String,
    },

    /// An answer this client does not understand.
    #[error("OpenSpecimen {server} {method} {path}: unexpected response: {detail}")]
    Unexpected {
        server: Origin,
        method: &'static str,
        path: String,
        detail: String,
    },
}

fn detail_suffix(detail: &Option<String>) -> String {
    detail
        .as_deref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default()
}

impl OsError {
    /// Whether the same request may succeed later without anyone changing
    /// anything.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Send { .. } => true,
            Self::Status { status, .. } => status_is_transient(*status),
            Self::Config(_)
            | Self::LoginRejected { .. }
            | Self::TokenRefused { .. }
            | Self::Rejected { .. }
            | Self::Unexpected { .. } => false,
        }
    }

    /// Whether this is OpenSpecimen refusing one record (as opposed to a
    /// failure of the connection, the session or the configuration).
    pub fn is_record_rejection(&self) -> bool {
        matches!(self, Self::Rejected { .. })
    }
}

/// 5xx, 429 and 408 may pass by themselves.
pub(crate) fn status_is_transient(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// OpenSpecimen's error body, `[{"code": "…", "message": "…"}]`, as one
/// line: the messages joined with `; ` (the code where a message is
/// missing). Anything else: a short, sanitised excerpt of the text.
pub(crate) fn os_message(body: &[u8]) -> String {
    if let Ok(serde_json::Value::Array(items)) = serde_json::from_slice::<serde_json::Value>(body) {
        let parts: Vec<String> = items
            .iter()
            .filter_map(|i| {
                i.get("message")
                    .and_then(|m| m.as_str())
                    .or_else(|| i.get("code").and_then(|c| c.as_str()))
                    .map(str::to_owned)
            })
            .collect();
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    let text = String::from_utf8_lossy(body);
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    let clean = clean.trim();
    if clean.is_empty() {
        "no message".to_owned()
    } else {
        clean.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_messages_are_joined_and_other_bodies_cut() {
        assert_eq!(
            os_message(br#"[{"code":"A","message":"Invalid site"},{"code":"B"}]"#),
            "Invalid site; B"
        );
        assert_eq!(os_message(b"<html>\nboom</html>"), "<html> boom</html>");
        assert_eq!(os_message(b""), "no message");
        assert_eq!(os_message(&[b'x'; 1000]).len(), 300);
    }
}
