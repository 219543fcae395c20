//! Configuration: one typed tree read from the environment (12-factor).
//!
//! Every setting is an environment variable. Start-up reads them all before
//! anything else happens and stops at the first bad one with a message that
//! names the variable, so a typo fails in milliseconds instead of surfacing as
//! a connection error minutes later. Secrets (the database URL may carry a
//! password) are held in [`SecretString`] and never printed.
//!
//! | variable | default | meaning |
//! | --- | --- | --- |
//! | `DATABASE_URL` | `postgres://postgres@127.0.0.1:5432/ocsync` | Postgres holding the queue, the CP configuration and the `ocsync_data` tables. Secret. |
//! | `DATABASE_MAX_CONNECTIONS` | `10` | Pool size per process (1–1000). |
//! | `DATABASE_CONNECT_TIMEOUT_SECS` | `5` | How long to wait for a connection before failing (1–600). |
//! | `API_LISTEN` | `0.0.0.0:8080` | Address the HTTP API binds (`host:port`). |
//! | `API_MAX_BODY_BYTES` | `65536` | Largest request body the API reads; larger ones get 413 (1024–16777216). |
//! | `API_MAX_SUBJECTS` | `1000` | Most subjects one `subjects` run may list; more get 422 (1–100000). |
//! | `API_PAGE_LIMIT_MAX` | `1000` | Largest `limit` a list request may ask for; larger ones get 422 (1–1000). |
//! | `UI_COOKIE_SECURE` | `false` | `true` marks the web pages' session cookie `Secure` (sent over HTTPS only); set it wherever the pages are served over HTTPS. |
//! | `UI_SESSION_TTL_SECS` | `28800` | How long a web sign-in lasts, counted from sign-in (60–2592000); revoking its token ends it at once. |
//! | `METRICS_LISTEN` | `0.0.0.0:9464` | Address of the metrics and probe server (`/metrics`, `/healthz`, `/readyz`) that `serve`, `worker` and `api` start (`host:port`). |
//! | `RUST_LOG` | `info,sqlx=warn` | Log filter, in `tracing-subscriber`'s `EnvFilter` syntax. |
//! | `LOG_FORMAT` | `text` | `text` (human, coloured on a terminal) or `json` (one object per line). |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | unset | OTLP/HTTP collector base URL (e.g. `http://otel-collector:4318`); traces are exported only when set. |
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | unset | Full traces URL; overrides the one derived from the endpoint above. |
//! | `OTEL_SERVICE_NAME` | `ocsync` | `service.name` of exported spans. |
//! | `OTEL_SDK_DISABLED` | `false` | `true` turns exporting off even when an endpoint is set. |
//! | `WORKER_CONCURRENCY` | `2` | Sync runs one `ocsync worker` process runs at once (1–64); also its fetch batch size. |
//! | `WORKER_HEARTBEAT_SECS` | `30` | How often a worker proves it is alive (1–3600). |
//! | `WORKER_MISSED_HEARTBEATS` | `10` | Heartbeats a worker may miss before its runs are taken up again elsewhere (1–100). |
//! | `WORKER_POLL_INTERVAL_MS` | `2000` | Fallback poll for due runs; new runs are noticed at once through LISTEN/NOTIFY (50–600000). |
//! | `RUN_MAX_ATTEMPTS` | `5` | Attempts a run gets before it ends Failed after transient errors (1–100). |
//! | `RUN_RETRY_BASE_SECS` | `30` | First retry delay; doubled per attempt, at most one hour (0–3600). |
//! | `RUN_TIMEOUT_SECS` | `21600` | One attempt longer than this fails (and is retried from its checkpoint) (1–604800). |
//! | `SCHEDULE_CRON` | `0 * * * *` | When the Study Data Importer enqueues an incremental run of every enabled CP (5-field cron, UTC); a CP's own `schedule` overrides it. |
//! | `RETENTION_DAYS` | `30` | Finished runs and their error reports are deleted after this many days (1–3650). |
//! | `SMTP_HOST` | unset | SMTP server for notification emails; unset turns email off (a CP that asks for email gets a recorded delivery failure). |
//! | `SMTP_PORT` | `587` | SMTP port (1–65535); the default follows `SMTP_TLS`: 587 for `starttls`, 465 for `tls`, 25 for `none`. |
//! | `SMTP_TLS` | `starttls` | `starttls` (upgrade required), `tls` (TLS from the first byte) or `none` (plain text: a relay on a trusted network only). |
//! | `SMTP_USERNAME` | unset | SMTP login; set it with `SMTP_PASSWORD`, or neither. |
//! | `SMTP_PASSWORD` | unset | SMTP password. Secret. |
//! | `SMTP_FROM` | unset | Sender of notification emails (`ocsync@example.org` or `ocsync <ocsync@example.org>`); required with `SMTP_HOST`. |
//! | `PUBLIC_URL` | `http://localhost:8080` | Where people reach ocsync; notifications link to `{PUBLIC_URL}/ui/runs/{id}`. |
//! | `NOTIFY_MAX_ATTEMPTS` | `8` | Delivery attempts per notification before it is recorded failed (1–100). |
//! | `NOTIFY_RETRY_BASE_SECS` | `30` | First delay before a notification is tried again; doubled per attempt, at most one hour, each drawn at random between half and all of it (0–3600). |
//! | `NOTIFY_TIMEOUT_SECS` | `30` | Longest one delivery (an SMTP conversation, a webhook request) may take (1–600). |
//!
//! The OpenTelemetry SDK reads its other standard variables itself
//! (`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, …).
//!
//! An empty variable counts as unset, as Kubernetes and shells often produce
//! `VAR=` where they mean "no value".

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;

/// A configuration variable that is present but unusable.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {var}: {reason}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub var: &'static str,
    /// What is wrong with it, without echoing secrets.
    pub reason: String,
}

impl ConfigError {
    fn new(var: &'static str, reason: impl Into<String>) -> Self {
        Self {
            var,
            reason: reason.into(),
        }
    }
}

/// The whole configuration of one process.
#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub api: ApiConfig,
    pub metrics: MetricsConfig,
    pub telemetry: TelemetryConfig,
    pub queue: QueueConfig,
    pub notify: NotifyConfig,
}

impl Config {
    /// Reads every variable from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&Env::process())
    }

    /// Reads every variable through `env`, so tests need not touch the
    /// process environment.
    pub fn from_lookup(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            telemetry: TelemetryConfig::from_lookup(env)?,
            database: DatabaseConfig::from_lookup(env)?,
            api: ApiConfig::from_lookup(env)?,
            metrics: MetricsConfig::from_lookup(env)?,
            queue: QueueConfig::from_lookup(env)?,
            notify: NotifyConfig::from_lookup(env)?,
        })
    }
}

/// The job queue, the workers, the schedule and retention.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub concurrency: usize,
    pub heartbeat: Duration,
    pub missed_heartbeats: usize,
    pub poll_interval: Duration,
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub run_timeout: Duration,
    /// The default schedule, already checked (a 5-field cron expression).
    pub schedule_cron: crate::cp::CronSchedule,
    pub retention: Duration,
}

impl QueueConfig {
    /// Every default, without reading the environment.
    pub fn defaults() -> Self {
        Self::from_lookup(&Env::Fixed(Default::default())).expect("the defaults are valid")
    }

    pub fn from_lookup(env: &Env) -> Result<Self, ConfigError> {
        let cron = env
            .get("SCHEDULE_CRON")
            .unwrap_or_else(|| "0 * * * *".to_owned());
        let schedule_cron = crate::cp::CronSchedule::parse(cron)
            .map_err(|e| ConfigError::new("SCHEDULE_CRON", e))?;
        Ok(Self {
            concurrency: env.ranged("WORKER_CONCURRENCY", 2, 1..=64)? as usize,
            heartbeat: Duration::from_secs(env.ranged("WORKER_HEARTBEAT_SECS", 30, 1..=3600)?),
            missed_heartbeats: env.ranged("WORKER_MISSED_HEARTBEATS", 10, 1..=100)? as usize,
            poll_interval: Duration::from_millis(env.ranged(
                "WORKER_POLL_INTERVAL_MS",
                2000,
                50..=600_000,
            )?),
            max_attempts: env.ranged("RUN_MAX_ATTEMPTS", 5, 1..=100)? as u32,
            retry_base: Duration::from_secs(env.ranged("RUN_RETRY_BASE_SECS", 30, 0..=3600)?),
            run_timeout: Duration::from_secs(env.ranged("RUN_TIMEOUT_SECS", 21600, 1..=604_800)?),
            schedule_cron,
            retention: Duration::from_secs(env.ranged("RETENTION_DAYS", 30, 1..=3650)? * 86_400),
        })
    }
}

/// Notifications of ended runs: the SMTP server, the base of the run page
/// link, and how deliveries are retried. Which runs notify whom is each
/// CP's `[notify]` section.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// `None` when `SMTP_HOST` is unset: email is off.
    pub smtp: Option<SmtpConfig>,
    /// The base of run page links, without a trailing slash.
    pub public_url: url::Url,
    pub max_attempts: u32,
    pub retry_base: Duration,
    /// The longest one delivery may take.
    pub timeout: Duration,
}

impl NotifyConfig {
    /// Every default, without reading the environment (email off).
    pub fn defaults() -> Self {
        Self::from_lookup(&Env::Fixed(Default::default())).expect("the defaults are valid")
    }

    pub fn from_lookup(env: &Env) -> Result<Self, ConfigError> {
        let raw = env
            .get("PUBLIC_URL")
            .unwrap_or_else(|| "http://localhost:8080".to_owned());
        let mut public_url = http_url("PUBLIC_URL", &raw)?;
        if public_url.query().is_some() || public_url.fragment().is_some() {
            return Err(ConfigError::new(
                "PUBLIC_URL",
                "must not have a query or a fragment: links are built by appending /ui/runs/{id}",
            ));
        }
        let path = public_url.path().trim_end_matches('/').to_owned();
        public_url.set_path(&path);
        Ok(Self {
            smtp: SmtpConfig::from_lookup(env)?,
            public_url,
            max_attempts: env.ranged("NOTIFY_MAX_ATTEMPTS", 8, 1..=100)? as u32,
            retry_base: Duration::from_secs(env.ranged("NOTIFY_RETRY_BASE_SECS", 30, 0..=3600)?),
            timeout: Duration::from_secs(env.ranged("NOTIFY_TIMEOUT_SECS", 30, 1..=600)?),
        })
    }

    /// The page of run `id`: `{PUBLIC_URL}/ui/runs/{id}`.
    pub fn run_url(&self, id: &str) -> String {
        format!(
            "{}/ui/runs/{id}",
            self.public_url.as_str().trim_end_matches('/')
        )
    }
}

/// How the SMTP connection is protected (`SMTP_TLS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain text; for a relay on a trusted network.
    None,
    /// Plain connect, then STARTTLS, which the server must offer.
    StartTls,
    /// TLS from the first byte (SMTPS).
    Tls,
}

impl FromStr for SmtpTls {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "starttls" => Ok(Self::StartTls),
            "tls" => Ok(Self::Tls),
            _ => Err("expected starttls, tls or none".into()),
        }
    }
}

/// The SMTP server notification emails go through.
#[derive(Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<String>,
    password: Option<SecretString>,
    /// The sender, already checked.
    pub from: lettre::message::Mailbox,
}

impl fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("from", &self.from.to_string())
            .finish()
    }
}

impl SmtpConfig {
    /// `None` when `SMTP_HOST` is unset.
    pub fn from_lookup(env: &Env) -> Result<Option<Self>, ConfigError> {
        let Some(host) = env.get("SMTP_HOST").map(|h| h.trim().to_owned()) else {
            return Ok(None);
        };
        if host.contains("://") || host.contains(['/', ' ']) {
            return Err(ConfigError::new(
                "SMTP_HOST",
                "expected a host name or address (without scheme or port), e.g. smtp.example.org",
            ));
        }
        let tls: SmtpTls = env.parse_or("SMTP_TLS", SmtpTls::StartTls)?;
        let default_port = match tls {
            SmtpTls::None => 25,
            SmtpTls::StartTls => 587,
            SmtpTls::Tls => 465,
        };
        let port = env.ranged("SMTP_PORT", default_port, 1..=65_535)? as u16;
        let username = env.get("SMTP_USERNAME");
        let password = env.get("SMTP_PASSWORD").map(SecretString::from);
        match (&username, &password) {
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "SMTP_PASSWORD",
                    "is unset while SMTP_USERNAME is set; set both or neither",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "SMTP_USERNAME",
                    "is unset while SMTP_PASSWORD is set; set both or neither",
                ));
            }
            _ => {}
        }
        let from = env.get("SMTP_FROM").ok_or_else(|| {
            ConfigError::new(
                "SMTP_FROM",
                "is required with SMTP_HOST (the sender, e.g. ocsync@example.org)",
            )
        })?;
        let from = from.trim().parse().map_err(|e| {
            ConfigError::new("SMTP_FROM", format!("not an email address or mailbox: {e}"))
        })?;
        Ok(Some(Self {
            host,
            port,
            tls,
            username,
            password,
            from,
        }))
    }

    /// The password, when there is one. Secret.
    pub fn password(&self) -> Option<&SecretString> {
        self.password.as_ref()
    }
}

/// Where configuration values come from: the process environment, or a fixed
/// list (tests).
pub enum Env {
    Process,
    Fixed(std::collections::HashMap<String, String>),
}

impl Env {
    pub fn process() -> Self {
        Self::Process
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self::Fixed(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    /// The value of `var`, with empty treated as unset.
    pub fn get(&self, var: &str) -> Option<String> {
        let value = match self {
            Self::Process => std::env::var(var).ok(),
            Self::Fixed(map) => map.get(var).cloned(),
        };
        value.filter(|v| !v.trim().is_empty())
    }

    fn parse_or<T: FromStr>(&self, var: &'static str, default: T) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        match self.get(var) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|e| ConfigError::new(var, format!("cannot parse {raw:?}: {e}"))),
        }
    }

    fn ranged(
        &self,
        var: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let v: u64 = self.parse_or(var, default)?;
        if range.contains(&v) {
            Ok(v)
        } else {
            Err(ConfigError::new(
                var,
                format!("{v} is out of range ({}–{})", range.start(), range.end()),
            ))
        }
    }

    fn bool_or(&self, var: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(var).map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) => match v.as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(ConfigError::new(var, format!("{v:?} is not true or false"))),
            },
        }
    }
}

/// The default database: the local development server with a database of
/// our own.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/ocsync";

/// Connection settings for the Postgres that holds everything ocsync keeps.
#[derive(Clone)]
pub struct DatabaseConfig {
    url: SecretString,
    pub options: PgConnectOptions,
    pub max_connections: u32,
    pub connect_timeout: Duration,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &"[redacted]")
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl DatabaseConfig {
    pub fn from_lookup(env: &Env) -> Result<Self, ConfigError> {
        const VAR: &str = "DATABASE_URL";
        let raw = env
            .get(VAR)
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
        let options = parse_database_url(&raw).map_err(|reason| ConfigError::new(VAR, reason))?;
        Ok(Self {
            url: SecretString::from(raw),
            options,
            max_connections: env.ranged("DATABASE_MAX_CONNECTIONS", 10, 1..=1000)? as u32,
            connect_timeout: Duration::from_secs(env.ranged(
                "DATABASE_CONNECT_TIMEOUT_SECS",
                5,
                1..=600,
            )?),
        })
    }

    /// The URL as configured. Secret: it may hold a password.
    pub fn url(&self) -> &SecretString {
        &self.url
    }

    /// The same server with another database name; the test harness and the
    /// demo use it to create databases of their own.
    pub fn with_database(&self, name: &str) -> Self {
        let mut url = url::Url::parse(self.url.expose_secret()).expect("validated at load");
        url.set_path(name);
        Self {
            options: self.options.clone().database(name),
            url: SecretString::from(url.to_string()),
            ..self.clone()
        }
    }

    /// The database name this configuration points at.
    pub fn database_name(&self) -> Option<&str> {
        self.options.get_database()
    }
}

/// Checks a database URL without ever echoing it: the reason names the part
/// that is wrong, never the password.
fn parse_database_url(raw: &str) -> Result<PgConnectOptions, String> {
    let url = url::Url::parse(raw.trim()).map_err(|e| {
        format!("not a URL ({e}); expected postgres://user[:password]@host[:port]/database")
    })?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "scheme {:?} is not postgres:// or postgresql://",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) && !url.query_pairs().any(|(k, _)| k == "host") {
        return Err("the URL names no host".into());
    }
    PgConnectOptions::from_str(raw.trim()).map_err(|e| {
        // sqlx's messages describe the option at fault; they do not repeat the URL.
        format!("invalid connection options: {e}")
    })
}

/// The HTTP API's own settings.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Request bodies larger than this are refused (413) before parsing.
    pub max_body_bytes: usize,
    /// The longest subject list one run may carry (422 beyond).
    pub max_subjects: usize,
    /// The largest page a list request may ask for (422 beyond).
    pub page_limit_max: u32,
    /// The web pages served beside the API.
    pub ui: UiConfig,
}

/// The web pages' sessions (`crate::ui`).
#[derive(Debug, Clone)]
pub struct UiConfig {
    /// Mark the session cookie `Secure` (behind HTTPS).
    pub cookie_secure: bool,
    /// A session ends this long after sign-in.
    pub session_ttl: Duration,
}

impl ApiConfig {
    /// Every default, without reading the environment.
    pub fn defaults() -> Self {
        Self::from_lookup(&Env::Fixed(Default::default())).expect("the defaults are valid")
    }

    pub fn from_lookup(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            listen: env.parse_or("API_LISTEN", SocketAddr::from(([0, 0, 0, 0], 8080)))?,
            max_body_bytes: env.ranged("API_MAX_BODY_BYTES", 65_536, 1024..=16_777_216)? as usize,
            max_subjects: env.ranged("API_MAX_SUBJECTS", 1000, 1..=100_000)? as usize,
            page_limit_max: env.ranged("API_PAGE_LIMIT_MAX", 1000, 1..=1000)? as u32,
            ui: UiConfig {
                cookie_secure: env.bool_or("UI_COOKIE_SECURE", false)?,
                session_ttl: Duration::from_secs(env.ranged(
                    "UI_SESSION_TTL_SECS",
                    28_800,
                    60..=2_592_000,
                )?),
            },
        })
    }
}

/// The metrics and probe server every long-running process starts.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Not Prometheus's own 9090, so both can run on one host.
    pub listen: SocketAddr,
}

impl MetricsConfig {
    pub fn from_lookup(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            listen: env.parse_or("METRICS_LISTEN", SocketAddr::from(([0, 0, 0, 0], 9464)))?,
        })
    }
}

/// How the process reports what it does: logs and traces.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub log_filter: String,
    pub log_format: LogFormat,
    /// Where spans go; `None` exports nothing.
    pub otlp_traces_endpoint: Option<url::Url>,
    pub service_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err("expected text or json".into()),
        }
    }
}

impl TelemetryConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(&Env::process())
    }

    pub fn from_lookup(env: &Env) -> Result<Self, ConfigError> {
        let log_filter = env
            .get("RUST_LOG")
            .unwrap_or_else(|| "info,sqlx=warn".to_owned());
        tracing_subscriber::EnvFilter::try_new(&log_filter)
            .map_err(|e| ConfigError::new("RUST_LOG", format!("invalid filter: {e}")))?;
        let disabled = env.bool_or("OTEL_SDK_DISABLED", false)?;
        let otlp_traces_endpoint = match (
            env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            env.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            _ if disabled => None,
            (Some(full), _) => Some(http_url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &full)?),
            (None, Some(base)) => {
                // The OTLP/HTTP specification: signal paths are appended to the base.
                let mut url = http_url("OTEL_EXPORTER_OTLP_ENDPOINT", &base)?;
                let path = format!("{}/v1/traces", url.path().trim_end_matches('/'));
                url.set_path(&path);
                Some(url)
            }
            (None, None) => None,
        };
        Ok(Self {
            log_filter,
            log_format: env.parse_or("LOG_FORMAT", LogFormat::Text)?,
            otlp_traces_endpoint,
            service_name: env
                .get("OTEL_SERVICE_NAME")
                .unwrap_or_else(|| "ocsync".to_owned()),
        })
    }
}

fn http_url(var: &'static str, raw: &str) -> Result<url::Url, ConfigError> {
    let url = url::Url::parse(raw.trim())
        .map_err(|e| ConfigError::new(var, format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::new(
            var,
            format!("scheme {:?} is not http or https", url.scheme()),
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_lookup(&Env::from_pairs(pairs.iter().copied()))
    }

    #[test]
    fn defaults_when_nothing_is_set() {
        let c = load(&[]).unwrap();
        assert_eq!(c.database.database_name(), Some("ocsync"));
        assert_eq!(c.database.max_connections, 10);
        assert_eq!(c.api.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.telemetry.log_format, LogFormat::Text);
        assert!(c.telemetry.otlp_traces_endpoint.is_none());
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases: &[(&str, &str, &str)] = &[
            ("DATABASE_URL", "nonsense", "not a URL"),
            ("DATABASE_URL", "mysql://h/db", "is not postgres://"),
            ("DATABASE_MAX_CONNECTIONS", "0", "out of range"),
            ("DATABASE_MAX_CONNECTIONS", "ten", "cannot parse"),
            ("API_LISTEN", "8080", "cannot parse"),
            ("LOG_FORMAT", "xml", "expected text or json"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318", "scheme"),
            ("OTEL_SDK_DISABLED", "maybe", "not true or false"),
            ("RUST_LOG", "info,[", "invalid filter"),
            ("WORKER_CONCURRENCY", "0", "out of range"),
            ("RUN_MAX_ATTEMPTS", "many", "cannot parse"),
            ("SCHEDULE_CRON", "every hour", "5 fields"),
            ("PUBLIC_URL", "ocsync.example.org", "not a URL"),
            ("PUBLIC_URL", "https://x/?a=b", "query"),
            ("NOTIFY_MAX_ATTEMPTS", "0", "out of range"),
            ("NOTIFY_TIMEOUT_SECS", "soon", "cannot parse"),
            ("UI_COOKIE_SECURE", "sometimes", "not true or false"),
            ("UI_SESSION_TTL_SECS", "30", "out of range"),
        ];
        for (var, value, want) in cases {
            let err = load(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, *var, "{var}={value}");
            assert!(err.reason.contains(want), "{var}={value}: {err}");
        }
    }

    #[test]
    fn database_url_password_never_appears_in_errors_or_debug() {
        let err = load(&[("DATABASE_URL", "postgres://u:hunter2@h:99999/db")]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let ok = load(&[("DATABASE_URL", "postgres://u:hunter2@h/db")]).unwrap();
        assert!(!format!("{ok:?}").contains("hunter2"));
    }

    #[test]
    fn smtp_is_off_without_a_host_and_checked_with_one() {
        let c = load(&[]).unwrap();
        assert!(c.notify.smtp.is_none());
        assert_eq!(c.notify.max_attempts, 8);
        assert_eq!(
            c.notify.run_url("01J0000000000000000000000A"),
            "http://localhost:8080/ui/runs/01J0000000000000000000000A"
        );
        let c = load(&[
            ("SMTP_HOST", "smtp.example.org"),
            ("SMTP_FROM", "ocsync <ocsync@example.org>"),
            ("SMTP_USERNAME", "ocsync"),
            ("SMTP_PASSWORD", "hunter2"),
            ("PUBLIC_URL", "https://lab.example.org/ocsync/"),
        ])
        .unwrap();
        let smtp = c.notify.smtp.as_ref().unwrap();
        assert_eq!((smtp.port, smtp.tls), (587, SmtpTls::StartTls));
        assert_eq!(smtp.from.email.to_string(), "ocsync@example.org");
        assert_eq!(smtp.password().unwrap().expose_secret(), "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(
            c.notify.run_url("R1"),
            "https://lab.example.org/ocsync/ui/runs/R1"
        );
        let tls = load(&[
            ("SMTP_HOST", "h"),
            ("SMTP_FROM", "a@b.org"),
            ("SMTP_TLS", "tls"),
        ])
        .unwrap();
        assert_eq!(tls.notify.smtp.unwrap().port, 465);
        for (pairs, var, want) in [
            (vec![("SMTP_HOST", "h")], "SMTP_FROM", "required"),
            (
                vec![("SMTP_HOST", "h"), ("SMTP_FROM", "not an address")],
                "SMTP_FROM",
                "not an email address",
            ),
            (
                vec![("SMTP_HOST", "smtp://h"), ("SMTP_FROM", "a@b.org")],
                "SMTP_HOST",
                "host name",
            ),
            (
                vec![
                    ("SMTP_HOST", "h"),
                    ("SMTP_FROM", "a@b.org"),
                    ("SMTP_TLS", "ssl"),
                ],
                "SMTP_TLS",
                "starttls, tls or none",
            ),
            (
                vec![
                    ("SMTP_HOST", "h"),
                    ("SMTP_FROM", "a@b.org"),
                    ("SMTP_USERNAME", "u"),
                ],
                "SMTP_PASSWORD",
                "both or neither",
            ),
            (
                vec![
                    ("SMTP_HOST", "h"),
                    ("SMTP_FROM", "a@b.org"),
                    ("SMTP_PORT", "0"),
                ],
                "SMTP_PORT",
                "out of range",
            ),
        ] {
            let err = load(&pairs).unwrap_err();
            assert_eq!(err.var, var, "{pairs:?}");
            assert!(err.reason.contains(want), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn otlp_endpoint_gets_the_traces_path() {
        let c = load(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]).unwrap();
        assert_eq!(
            c.telemetry.otlp_traces_endpoint.unwrap().as_str(),
            "http://c:4318/v1/traces"
        );
        let c = load(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:1/x"),
        ])
        .unwrap();
        assert_eq!(
            c.telemetry.otlp_traces_endpoint.unwrap().as_str(),
            "http://t:1/x"
        );
        let c = load(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ])
        .unwrap();
        assert!(c.telemetry.otlp_traces_endpoint.is_none());
    }

    #[test]
    fn empty_counts_as_unset() {
        let c = load(&[("DATABASE_URL", ""), ("LOG_FORMAT", " ")]).unwrap();
        assert_eq!(c.database.database_name(), Some("ocsync"));
        assert_eq!(c.telemetry.log_format, LogFormat::Text);
    }

    #[test]
    fn with_database_keeps_the_server_and_credentials() {
        let c = load(&[("DATABASE_URL", "postgres://u:pw@h:5433/a?sslmode=disable")]).unwrap();
        let d = c.database.with_database("b");
        assert_eq!(d.database_name(), Some("b"));
        assert_eq!(
            d.url().expose_secret(),
            "postgres://u:pw@h:5433/b?sslmode=disable"
        );
    }
}
