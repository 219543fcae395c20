//! The simulator's accounts and credentials, as OpenClinica behaves:
//!
//! - 3.x: a form login hands out a random `JSESSIONID`; one session per
//!   user (a new login ends the older session); a session dies after an
//!   idle time or after a number of data requests; failed logins are
//!   counted and the account is locked after [`AuthConfig::lock_after`]
//!   of them in a row, after which even the right password is refused.
//! - 4.x: the user service hands out JWT-shaped bearer tokens with an
//!   `exp`, at most [`AuthConfig::token_limit`] token requests per
//!   [`AuthConfig::token_window`] per client address (429 with
//!   `Retry-After` beyond); a token is refused once past its lifetime or
//!   its number of uses. The lockout is shared with 3.x: one account.
//!
//! Every function takes the time as an argument, so that expiry is tested
//! without waiting. The password is compared and dropped, never logged:
//! this module logs the username and the outcome only. It knows nothing
//! of HTTP.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use secrecy::{ExposeSecret, SecretString};

/// How the simulator's authentication behaves.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// 3.x: a session not used for this long has expired (`None`: never;
    /// Tomcat's default is 30 minutes).
    pub session_idle: Option<Duration>,
    /// Failed logins in a row that lock the account (OC: 3).
    pub lock_after: u32,
    /// 4.x: a token's lifetime, written into its `exp` (OC: 4 hours).
    pub token_lifetime: Duration,
    /// 4.x: token requests allowed per window per client address (OC: 2).
    pub token_limit: u32,
    /// 4.x: the rate limit's rolling window (OC: one minute).
    pub token_window: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            session_idle: Some(Duration::from_secs(30 * 60)),
            lock_after: 3,
            token_lifetime: Duration::from_secs(4 * 3600),
            token_limit: 2,
            token_window: Duration::from_secs(60),
        }
    }
}

/// What a login or token request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Granted {
    /// A session id or a token.
    Yes(String),
    /// Wrong username or password.
    Rejected,
    /// The account is locked by earlier failures.
    Locked,
    /// 4.x only: too many token requests from this address; retry after
    /// this many seconds.
    Limited(u64),
}

struct Session {
    id: String,
    last_used: Instant,
    uses: u32,
}

struct Token {
    expires: Instant,
    uses: u32,
}

pub(crate) struct Auth {
    config: AuthConfig,
    username: String,
    password: SecretString,
    failures: u32,
    locked: bool,
    /// The user's one session.
    session: Option<Session>,
    tokens: HashMap<String, Token>,
    /// Token requests per client address within the window.
    token_times: HashMap<IpAddr, VecDeque<Instant>>,
}

impl Auth {
    pub fn new(config: AuthConfig, username: String, password: SecretString) -> Self {
        Self {
            config,
            username,
            password,
            failures: 0,
            locked: false,
            session: None,
            tokens: HashMap::new(),
            token_times: HashMap::new(),
        }
    }

    /// Checks a username and password, counting failures toward the lock.
    fn check(&mut self, username: &str, password: &str) -> Result<(), Granted> {
        if username != self.username {
            // The name is not logged: a password typed into the username
            // field would otherwise land in the log.
            tracing::info!("oc-sim: login for an unknown user refused");
            return Err(Granted::Rejected);
        }
        if self.locked {
            tracing::info!(user = username, "oc-sim: login refused, account locked");
            return Err(Granted::Locked);
        }
        if password != self.password.expose_secret() {
            self.failures += 1;
            if self.failures >= self.config.lock_after {
                self.locked = true;
                tracing::warn!(
                    user = username,
                    failures = self.failures,
                    "oc-sim: wrong password; account now locked"
                );
            } else {
                tracing::info!(
                    user = username,
                    failures = self.failures,
                    "oc-sim: wrong password"
                );
            }
            return Err(Granted::Rejected);
        }
        self.failures = 0;
        Ok(())
    }

    /// 3.x `j_spring_security_check`: a new session that replaces the
    /// user's previous one.
    pub fn login(&mut self, username: &str, password: &str, now: Instant) -> Granted {
        if let Err(refused) = self.check(username, password) {
            return refused;
        }
        let id = format!("{:032X}", rand::random::<u128>());
        self.session = Some(Session {
            id: id.clone(),
            last_used: now,
            uses: 0,
        });
        tracing::info!(user = username, "oc-sim: 3.x login; older session ended");
        Granted::Yes(id)
    }

    /// Whether `cookie` is the live session, counting one use. `Err(true)`
    /// when it was the session but it has just expired (by idle time or
    /// after `max_uses` data requests; 0: no limit), `Err(false)` when it
    /// is unknown.
    pub fn use_session(
        &mut self,
        cookie: Option<&str>,
        max_uses: u32,
        now: Instant,
    ) -> Result<(), bool> {
        let Some(s) = self.session.as_mut() else {
            return Err(false);
        };
        if cookie != Some(s.id.as_str()) {
            return Err(false);
        }
        let idle = self
            .config
            .session_idle
            .is_some_and(|limit| now.saturating_duration_since(s.last_used) >= limit);
        if idle || (max_uses > 0 && s.uses >= max_uses) {
            self.session = None;
            return Err(true);
        }
        s.uses += 1;
        s.last_used = now;
        Ok(())
    }

    /// 4.x token endpoint: the rate limit first (it sits in front of the
    /// user service), then the credentials.
    pub fn token(
        &mut self,
        client: IpAddr,
        username: &str,
        password: &str,
        now: Instant,
        wall: SystemTime,
    ) -> Granted {
        let window = self.config.token_window;
        let times = self.token_times.entry(client).or_default();
        while times
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            times.pop_front();
        }
        if times.len() >= self.config.token_limit as usize {
            let oldest = *times.front().expect("len >= limit >= 1");
            let left = window.saturating_sub(now.saturating_duration_since(oldest));
            // Whole seconds, rounded up: waiting that long is always enough.
            let secs = left.as_millis().div_ceil(1000).max(1) as u64;
            tracing::info!(
                user = username,
                retry_after_secs = secs,
                "oc-sim: token request over the rate limit"
            );
            return Granted::Limited(secs);
        }
        times.push_back(now);
        if let Err(refused) = self.check(username, password) {
            return refused;
        }
        let exp = wall
            .checked_add(self.config.token_lifetime)
            .unwrap_or(wall)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let token = jwt(username, exp);
        self.tokens.insert(
            token.clone(),
            Token {
                expires: now + self.config.token_lifetime,
                uses: 0,
            },
        );
        tracing::info!(user = username, "oc-sim: 4.x token issued");
        Granted::Yes(token)
    }

    /// Whether `token` is live, counting one use; a token past its
    /// lifetime or its `max_uses` (0: no limit) is forgotten.
    pub fn use_token(&mut self, token: Option<&str>, max_uses: u32, now: Instant) -> bool {
        let Some(token) = token else { return false };
        let Some(t) = self.tokens.get_mut(token) else {
            return false;
        };
        if now >= t.expires || (max_uses > 0 && t.uses >= max_uses) {
            self.tokens.remove(token);
            return false;
        }
        t.uses += 1;
        true
    }

    /// Ends every session and token (an OC restart, or an admin).
    pub fn expire_all(&mut self) {
        self.session = None;
        self.tokens.clear();
    }

    /// Lifts the lock and forgets the failures (an administrator unlocking
    /// the account).
    pub fn unlock(&mut self) {
        self.locked = false;
        self.failures = 0;
    }
}

/// A JWT-shaped token: header, claims with `sub`, `iat`, `exp` and a
/// random `jti`, and a signature that is only random bytes (nobody checks
/// it but the simulator, by lookup).
fn jwt(subject: &str, exp: u64) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let claims = serde_json::json!({
        "sub": subject,
        "iat": exp.saturating_sub(1),
        "exp": exp,
        "jti": format!("{:032x}", rand::random::<u128>()),
    });
    format!(
        "{}.{}.{}",
        b64.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
        b64.encode(claims.to_string()),
        b64.encode(rand::random::<[u8; 32]>())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const PW: &str = "pw";

    fn auth(config: AuthConfig) -> Auth {
        Auth::new(config, "u".into(), SecretString::from(PW))
    }

    #[test]
    fn one_session_per_user_and_idle_expiry() {
        let mut a = auth(AuthConfig {
            session_idle: Some(Duration::from_secs(10)),
            ..AuthConfig::default()
        });
        let t0 = Instant::now();
        let Granted::Yes(first) = a.login("u", PW, t0) else {
            panic!("login")
        };
        assert_eq!(a.use_session(Some(&first), 0, t0), Ok(()));
        let Granted::Yes(second) = a.login("u", PW, t0) else {
            panic!("login")
        };
        assert_ne!(first, second);
        assert_eq!(a.use_session(Some(&first), 0, t0), Err(false));
        assert_eq!(
            a.use_session(Some(&second), 0, t0 + Duration::from_secs(9)),
            Ok(())
        );
        assert_eq!(
            a.use_session(Some(&second), 0, t0 + Duration::from_secs(19)),
            Err(true)
        );
        assert_eq!(a.use_session(Some(&second), 0, t0), Err(false));
    }

    #[test]
    fn sessions_expire_after_their_uses() {
        let mut a = auth(AuthConfig::default());
        let t0 = Instant::now();
        let Granted::Yes(s) = a.login("u", PW, t0) else {
            panic!("login")
        };
        assert_eq!(a.use_session(Some(&s), 2, t0), Ok(()));
        assert_eq!(a.use_session(Some(&s), 2, t0), Ok(()));
        assert_eq!(a.use_session(Some(&s), 2, t0), Err(true));
    }

    #[test]
    fn three_failures_lock_the_account_for_both_apis() {
        let mut a = auth(AuthConfig::default());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(a.login("u", "nope", t0), Granted::Rejected);
        }
        assert_eq!(a.login("u", PW, t0), Granted::Locked);
        let ip = IpAddr::from([127, 0, 0, 1]);
        assert_eq!(a.token(ip, "u", PW, t0, SystemTime::now()), Granted::Locked);
        a.unlock();
        assert!(matches!(a.login("u", PW, t0), Granted::Yes(_)));
    }

    #[test]
    fn token_rate_limit_per_address_with_retry_after() {
        let mut a = auth(AuthConfig::default());
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let ip = IpAddr::from([127, 0, 0, 1]);
        let other = IpAddr::from([127, 0, 0, 2]);
        assert!(matches!(a.token(ip, "u", PW, t0, wall), Granted::Yes(_)));
        assert!(matches!(
            a.token(ip, "u", PW, t0 + Duration::from_secs(20), wall),
            Granted::Yes(_)
        ));
        assert_eq!(
            a.token(ip, "u", PW, t0 + Duration::from_millis(30_500), wall),
            Granted::Limited(30)
        );
        assert!(matches!(a.token(other, "u", PW, t0, wall), Granted::Yes(_)));
        assert!(matches!(
            a.token(ip, "u", PW, t0 + Duration::from_secs(60), wall),
            Granted::Yes(_)
        ));
    }

    #[test]
    fn tokens_are_jwts_that_expire() {
        let mut a = auth(AuthConfig {
            token_lifetime: Duration::from_secs(100),
            ..AuthConfig::default()
        });
        let t0 = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_000);
        let Granted::Yes(t) = a.token(IpAddr::from([127, 0, 0, 1]), "u", PW, t0, wall) else {
            panic!("token")
        };
        let claims = t.split('.').nth(1).unwrap();
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .unwrap();
        let claims: serde_json::Value = serde_json::from_slice(&claims).unwrap();
        assert_eq!(claims["exp"], 1_100);
        assert!(a.use_token(Some(&t), 0, t0 + Duration::from_secs(99)));
        assert!(!a.use_token(Some(&t), 0, t0 + Duration::from_secs(100)));
        assert!(!a.use_token(Some(&t), 0, t0));
        assert!(!a.use_token(None, 0, t0));
    }
}
