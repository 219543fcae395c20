//! What can go wrong while talking to OpenClinica or reading an extract file.
//!
//! Policy: every error names where it happened (the server as
//! `scheme://host:port`, the URL path, the HTTP status and the attempt
//! `n/m`, or the file and pattern) and never carries a secret: no password,
//! token, cookie value or query string is ever put into a message, and the
//! `reqwest` errors kept as sources are stripped of their URL. The sync job
//! decides what to do with an error through [`OcError::is_transient`]: a
//! transient error is worth retrying later (the server was down, busy or cut
//! the connection), a permanent one needs a person (wrong password, unknown
//! study, bad configuration).

use std::fmt;
use std::io;
use std::path::PathBuf;

use reqwest::StatusCode;

/// A server's origin, `scheme://host:port`, as it appears in messages.
///
/// Built from the configured base URL without user info, path or query, so
/// it is always safe to print.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Origin(String);

impl Origin {
    /// The origin of `url`; user info, path, query and fragment are dropped.
    pub fn of(url: &url::Url) -> Self {
        let host = url.host_str().unwrap_or("?");
        match url.port_or_known_default() {
            Some(port) => Self(format!("{}://{host}:{port}", url.scheme())),
            None => Self(format!("{}://{host}", url.scheme())),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which attempt of how many an error happened on, shown as `attempt n/m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub n: u32,
    pub of: u32,
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "attempt {}/{}", self.n, self.of)
    }
}

/// The one error type of the `openclinica` module.
#[derive(Debug, thiserror::Error)]
pub enum OcError {
    /// The source configuration cannot work (bad URL, empty study OID, …).
    #[error("OpenClinica source configuration: {0}")]
    Config(String),

    /// A credential reference could not be resolved. Names the variable or
    /// file, never the value.
    #[error("credential {reference}: {reason}")]
    Credential { reference: String, reason: String },

    /// The request never got an answer: connection refused or reset, DNS,
    /// TLS, or no response headers within the response timeout.
    #[error("{server} {method} {path}: {what} ({attempt})")]
    Send {
        server: Origin,
        method: &'static str,
        path: String,
        what: String,
        attempt: Attempt,
        #[source]
        source: Option<reqwest::Error>,
    },

    /// The server answered with a status that is not success.
    #[error("{server} {method} {path}: HTTP {status} ({attempt})")]
    Status {
        server: Origin,
        method: &'static str,
        path: String,
        status: StatusCode,
        attempt: Attempt,
    },

    /// OpenClinica refused the username or password. Never retried: OC
    /// locks the account after a few failed logins.
    #[error(
        "{server} {path}: login rejected for user {username} ({detail}); not retried, to keep the account from being locked"
    )]
    AuthRejected {
        server: Origin,
        path: String,
        username: String,
        detail: String,
    },

    /// The 3.x session died again right after a fresh login, which happens
    /// when another client logs in with the same account (OC keeps one
    /// session per user).
    #[error(
        "{server} {path}: session ended again right after a fresh login; is another client using the same OpenClinica account?"
    )]
    SessionLost { server: Origin, path: String },

    /// The server answered something this client does not understand.
    #[error("{server} {path}: unexpected response: {detail}")]
    Unexpected {
        server: Origin,
        path: String,
        detail: String,
    },

    /// A response body broke off while it was being read: the connection
    /// closed before the announced length, a chunked stream was cut, or the
    /// server fell silent for longer than the idle timeout. Transient: the
    /// caller (the sync job) retries the whole document.
    #[error("{server} {path}: response body broken off after {bytes} bytes: {what}")]
    Body {
        server: Origin,
        path: String,
        bytes: u64,
        what: String,
        #[source]
        source: Option<reqwest::Error>,
    },

    /// No file in the extract folder matches the configured pattern.
    #[error("no file in {} matches {pattern:?}", folder.display())]
    NoMatchingFile { folder: PathBuf, pattern: String },

    /// An extract file or folder could not be read.
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The operation does not exist for this kind of source.
    #[error("{0}")]
    Unsupported(String),
}

impl OcError {
    /// Whether retrying later may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Send { .. } | Self::Body { .. } => true,
            Self::Status { status, .. } => status_is_transient(*status),
            Self::Config(_)
            | Self::Credential { .. }
            | Self::AuthRejected { .. }
            | Self::SessionLost { .. }
            | Self::Unexpected { .. }
            | Self::NoMatchingFile { .. }
            | Self::File { .. }
            | Self::Unsupported(_) => false,
        }
    }

    /// The `OcError` inside an `io::Error` produced while reading a
    /// [`Body`](super::Body), if there is one.
    pub fn from_io(err: &io::Error) -> Option<&OcError> {
        err.get_ref().and_then(|e| e.downcast_ref::<OcError>())
    }
}

/// Whether an `io::Error` from reading a [`Body`](super::Body) is worth a
/// retry: true for broken-off bodies, false for anything else (a local file
/// that cannot be read stays unreadable).
pub fn is_transient_io(err: &io::Error) -> bool {
    OcError::from_io(err).is_some_and(OcError::is_transient)
}

/// 5xx (the server or a proxy failed), 429 (too many requests) and 408
/// (request timeout) may pass; every other status needs a change first.
pub(crate) fn status_is_transient(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_drops_user_info_path_and_query() {
        let url = url::Url::parse("https://alice:pw@oc.example.org/OpenClinica/x?token=t").unwrap();
        assert_eq!(Origin::of(&url).to_string(), "https://oc.example.org:443");
    }

    #[test]
    fn transient_statuses() {
        for (code, transient) in [
            (500, true),
            (503, true),
            (429, true),
            (404, false),
            (400, false),
            (401, false),
        ] {
            assert_eq!(
                status_is_transient(StatusCode::from_u16(code).unwrap()),
                transient,
                "{code}"
            );
        }
    }
}
