//! API tokens: the store (`ocsync.api_tokens`) and `ocsync token
//! create|list|revoke`.
//!
//! A token is `ocs_` and 64 hex digits (32 random bytes from the OS). It is
//! printed once, by `create`, and never stored: the table keeps its SHA-256
//! in hex, and requests are matched by hashing what they present. Tokens are
//! named; the name is what the Import Logs show as who started or aborted a
//! run, so it must not be a secret.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

/// What a token may do; each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read runs, CPs and reports.
    Viewer,
    /// Also start and abort runs.
    Operator,
    /// Also edit CP configuration and manage tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Self::Viewer),
            "operator" => Ok(Self::Operator),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown role {other:?}: expected viewer, operator or admin"
            )),
        }
    }
}

/// A token as the store knows it (never the token itself).
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// Who called: the name and role of a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("a token named {0:?} already exists")]
    Exists(String),
    #[error("no token named {0:?}")]
    NoSuchToken(String),
    #[error(
        "invalid token name {0:?}: 1–100 of letters, digits, '.', '_', '@', '-', starting with a letter or digit"
    )]
    InvalidName(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// The SHA-256 of a presented token, in lower-case hex (what the table keeps).
pub fn hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 100
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c))
}

/// Creates a token; returns the token, which is not kept anywhere.
pub async fn create(pool: &PgPool, name: &str, role: Role) -> Result<String, TokenError> {
    if !valid_name(name) {
        return Err(TokenError::InvalidName(name.to_owned()));
    }
    // The thread RNG is a CSPRNG (ChaCha) seeded from the OS.
    let bytes: [u8; 32] = rand::random();
    let mut token = String::from("ocs_");
    for b in bytes {
        token.push_str(&format!("{b:02x}"));
    }
    let result =
        sqlx::query("INSERT INTO ocsync.api_tokens (name, role, token_hash) VALUES ($1, $2, $3)")
            .bind(name)
            .bind(role.as_str())
            .bind(hash(&token))
            .execute(pool)
            .await;
    match result {
        Ok(_) => {
            tracing::info!(token.name = %name, token.role = %role, "API token created");
            Ok(token)
        }
        Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("23505") => {
            Err(TokenError::Exists(name.to_owned()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Every token, revoked ones included (they stay for the audit trail).
pub async fn list(pool: &PgPool) -> Result<Vec<TokenInfo>, TokenError> {
    type Row = (
        String,
        String,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT name, role, created_at, revoked_at, last_used_at \
             FROM ocsync.api_tokens ORDER BY name",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(name, role, created_at, revoked_at, last_used_at)| TokenInfo {
                name,
                // The CHECK constraint keeps the column to the three words.
                role: role.parse().unwrap_or(Role::Viewer),
                created_at,
                revoked_at,
                last_used_at,
            },
        )
        .collect())
}

/// Revokes a token: requests with it get 401 from now on. Idempotent.
pub async fn revoke(pool: &PgPool, name: &str) -> Result<(), TokenError> {
    let done = sqlx::query(
        "UPDATE ocsync.api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE name = $1",
    )
    .bind(name)
    .execute(pool)
    .await?;
    if done.rows_affected() == 0 {
        return Err(TokenError::NoSuchToken(name.to_owned()));
    }
    tracing::info!(token.name = %name, "API token revoked");
    Ok(())
}

/// The caller a presented token stands for, if it is known and not revoked.
///
/// `last_used_at` is refreshed at most once a minute, so a burst of
/// requests with one token does not queue on that row's lock.
pub async fn authenticate(pool: &PgPool, token: &str) -> Result<Option<Caller>, sqlx::Error> {
    let row: Option<(i64, String, String, bool)> = sqlx::query_as(
        "SELECT id, name, role, \
                last_used_at IS NULL OR last_used_at < now() - interval '1 minute' \
           FROM ocsync.api_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
    )
    .bind(hash(token))
    .fetch_optional(pool)
    .await?;
    let Some((id, name, role, stale)) = row else {
        return Ok(None);
    };
    if stale {
        sqlx::query("UPDATE ocsync.api_tokens SET last_used_at = now() WHERE id = $1")
            .bind(id)
            .execute(pool)
            .await?;
    }
    Ok(role.parse().ok().map(|role| Caller { name, role }))
}

/// `ocsync token …`
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (once: only its hash is stored).
    Create {
        /// A name for the token, shown in the Import Logs as who started
        /// or aborted a run (e.g. `lims-integration`, `jane.doe`).
        name: String,
        /// What the token may do.
        #[arg(long, value_enum)]
        role: Role,
    },
    /// List tokens: name, role, created, last used, revoked.
    List,
    /// Revoke a token by name; requests with it get 401 from then on.
    Revoke {
        /// The token's name.
        name: String,
    },
}

/// Runs an `ocsync token` command; returns the exit status.
pub async fn cli(config: crate::config::Config, cmd: TokenCommand) -> anyhow::Result<u8> {
    let pool = crate::db::connect(&config.database).await?;
    match cmd {
        TokenCommand::Create { name, role } => {
            let token = create(&pool, &name, role).await?;
            println!("{token}");
        }
        TokenCommand::List => {
            println!(
                "{:<32} {:<9} {:<25} {:<25} revoked",
                "name", "role", "created", "last used"
            );
            let fmt = |t: Option<DateTime<Utc>>| {
                t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_else(|| "-".into())
            };
            for t in list(&pool).await? {
                println!(
                    "{:<32} {:<9} {:<25} {:<25} {}",
                    t.name,
                    t.role,
                    fmt(Some(t.created_at)),
                    fmt(t.last_used_at),
                    fmt(t.revoked_at)
                );
            }
        }
        TokenCommand::Revoke { name } => revoke(&pool, &name).await?,
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_round_trip() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        for r in [Role::Viewer, Role::Operator, Role::Admin] {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn the_hash_is_sha256_hex() {
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn names_are_checked() {
        for ok in ["ops", "jane.doe@example.org", "lims-1", "A_b"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-x", "a b", "naïve", &"x".repeat(101)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
