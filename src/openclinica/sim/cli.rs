//! `ocsync oc-sim`: the simulator in the foreground, configured by flags,
//! printing the URLs and settings a client needs.
//!
//! The password is read from an environment variable (`--password-env`,
//! default `OC_SIM_PASSWORD`), never from a flag: flags show in process
//! lists and shell history. It is never printed.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use secrecy::SecretString;

use super::{AuthConfig, Faults, SimConfig, Simulator};
use crate::odm::generate::{GeneratorConfig, site_oid};

/// The study served when no `--study` is given.
pub const DEFAULT_STUDY: &str = "S_DEMO:subjects=200:sites=2:seed=42";

/// Flags of `ocsync oc-sim`.
#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// A study to serve, `OID[:subjects=N][:sites=N][:seed=N][:visits=N]
    /// [:specimens=N][:nulls=RATE]`; repeatable. Default:
    /// S_DEMO:subjects=200:sites=2:seed=42.
    #[arg(long = "study", value_name = "SPEC")]
    pub studies: Vec<String>,
    /// The username both APIs accept.
    #[arg(long, default_value = "ocsync")]
    pub user: String,
    /// Environment variable holding the password both APIs accept.
    #[arg(long, default_value = "OC_SIM_PASSWORD")]
    pub password_env: String,
    /// Seed of the fault RNG and of the choice of subjects to edit.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// 3.x: seconds a session may stay unused (0: forever).
    #[arg(long, default_value_t = 1800)]
    pub session_idle_secs: u64,
    /// Failed logins in a row that lock the account.
    #[arg(long, default_value_t = 3)]
    pub lock_after: u32,
    /// 4.x: token lifetime in seconds.
    #[arg(long, default_value_t = 4 * 3600)]
    pub token_lifetime_secs: u64,
    /// 4.x: token requests allowed per window per client address.
    #[arg(long, default_value_t = 2)]
    pub token_limit: u32,
    /// 4.x: the token rate limit's window in seconds.
    #[arg(long, default_value_t = 60)]
    pub token_window_secs: u64,

    /// Delay before answering each data request, in ms.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Share of data requests answered with --error-status (0 to 1, seeded).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Every Nth data request is answered with --error-status.
    #[arg(long, default_value_t = 0)]
    pub error_every: u32,
    /// Status of injected errors.
    #[arg(long, default_value_t = 503)]
    pub error_status: u16,
    /// Every Nth data request is answered 429.
    #[arg(long, default_value_t = 0)]
    pub too_many_every: u32,
    /// The first N data requests are answered 429 (a burst).
    #[arg(long, default_value_t = 0)]
    pub too_many_first: u32,
    /// Retry-After of injected 429s, in seconds.
    #[arg(long, default_value_t = 1)]
    pub retry_after_secs: u64,
    /// Every Nth body is cut after --truncate-after-bytes.
    #[arg(long, default_value_t = 0)]
    pub truncate_every: u32,
    /// Where truncated bodies are cut.
    #[arg(long, default_value_t = 4096)]
    pub truncate_after_bytes: u64,
    /// Send bodies in pieces of this many bytes (0: off) …
    #[arg(long, default_value_t = 0)]
    pub drip_bytes: usize,
    /// … one piece every this many ms.
    #[arg(long, default_value_t = 10)]
    pub drip_delay_ms: u64,
    /// 3.x: a session expires after this many data requests (0: never).
    #[arg(long, default_value_t = 0)]
    pub session_expiry_every: u32,
    /// 4.x: a token is refused after this many data requests (0: never).
    #[arg(long, default_value_t = 0)]
    pub token_expiry_every: u32,
    /// Clinical data documents of more subjects than this are answered
    /// 500, like a study too large for OC to build (0: no limit)
    #[arg(long, default_value_t = 0)]
    pub max_document_subjects: u32,
}

impl SimArgs {
    /// The simulator configuration these flags describe, with the password
    /// taken from the environment.
    pub fn config(&self) -> anyhow::Result<SimConfig> {
        let specs: Vec<&str> = if self.studies.is_empty() {
            vec![DEFAULT_STUDY]
        } else {
            self.studies.iter().map(String::as_str).collect()
        };
        let studies = specs
            .into_iter()
            .map(|s| parse_study(s).map_err(|e| anyhow::anyhow!("--study {s}: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let password = std::env::var(&self.password_env)
            .ok()
            .filter(|p| !p.is_empty())
            .with_context(|| {
                format!(
                    "{} is not set: the simulator needs a password (--password-env)",
                    self.password_env
                )
            })?;
        let faults = Faults {
            latency_ms: self.latency_ms,
            error_rate: self.error_rate,
            error_every: self.error_every,
            error_next: 0,
            error_status: self.error_status,
            too_many_every: self.too_many_every,
            too_many_next: self.too_many_first,
            retry_after_secs: self.retry_after_secs,
            truncate_after_bytes: self.truncate_after_bytes,
            truncate_every: self.truncate_every,
            truncate_next: 0,
            drip_bytes: self.drip_bytes,
            drip_delay_ms: self.drip_delay_ms,
            session_expiry_every: self.session_expiry_every,
            token_expiry_every: self.token_expiry_every,
            max_document_subjects: self.max_document_subjects,
        };
        faults.validate().map_err(|e| anyhow::anyhow!(e))?;
        Ok(SimConfig {
            listen: self.listen,
            studies,
            username: self.user.clone(),
            password: SecretString::from(password),
            auth: AuthConfig {
                session_idle: (self.session_idle_secs > 0)
                    .then(|| Duration::from_secs(self.session_idle_secs)),
                lock_after: self.lock_after.max(1),
                token_lifetime: Duration::from_secs(self.token_lifetime_secs),
                token_limit: self.token_limit.max(1),
                token_window: Duration::from_secs(self.token_window_secs),
            },
            faults,
            seed: self.seed,
        })
    }
}

/// Parses `OID[:key=value]*` into a generator configuration.
pub fn parse_study(spec: &str) -> Result<GeneratorConfig, String> {
    let mut parts = spec.split(':');
    let oid = parts.next().unwrap_or_default().trim();
    if oid.is_empty() || oid.contains(['/', '=']) {
        return Err("begins with the study OID, e.g. S_DEMO:subjects=200".into());
    }
    let mut config = GeneratorConfig {
        study_oid: oid.to_owned(),
        ..GeneratorConfig::default()
    };
    for part in parts {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not key=value"))?;
        let number = || {
            value
                .parse::<u32>()
                .map_err(|_| format!("{key}={value:?} is not a whole number"))
        };
        match key {
            "subjects" => config.subjects = number()?,
            "sites" => config.sites = number()?,
            "visits" => config.max_visit_repeats = number()?.max(1),
            "specimens" => config.max_specimens = number()?.max(1),
            "seed" => {
                config.seed = value
                    .parse()
                    .map_err(|_| format!("seed={value:?} is not a number"))?;
            }
            "nulls" => {
                config.null_rate = value
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| format!("nulls={value:?} is not a rate between 0 and 1"))?;
            }
            other => {
                return Err(format!(
                    "unknown key {other:?} (subjects, sites, seed, visits, specimens, nulls)"
                ));
            }
        }
    }
    Ok(config)
}

/// Runs the simulator until `shutdown` resolves, after printing where it
/// listens and how to point a client at it.
pub async fn run(args: SimArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let config = args.config()?;
    let studies = config.studies.clone();
    let handle = Simulator::start(config).await?;
    let base = handle.base_url_oc3();
    println!("OpenClinica simulator on http://{}", handle.addr());
    println!("  OC 3.x  base_url: {base}");
    println!(
        "  OC 4.x  base_url: {}  auth_url: {}",
        handle.base_url_oc4(),
        handle.auth_url()
    );
    println!(
        "  account: {} (password from ${})",
        args.user, args.password_env
    );
    for s in &studies {
        let sites: Vec<String> = (0..s.sites).map(|i| site_oid(s, i)).collect();
        println!(
            "  study {}: {} subjects, seed {}, sites [{}]",
            s.study_oid,
            s.subjects,
            s.seed,
            sites.join(", ")
        );
    }
    println!(
        "  admin: GET /_sim/counters, GET|PUT /_sim/faults, POST /_sim/studies/{{oid}}/edit {{\"subjects\":K}}, POST /_sim/expire, POST /_sim/unlock"
    );
    shutdown.await;
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn study_specs_parse() {
        let c = parse_study("S_X:subjects=20:sites=3:seed=9:visits=2:nulls=0.1").unwrap();
        assert_eq!(
            (c.study_oid.as_str(), c.subjects, c.sites, c.seed),
            ("S_X", 20, 3, 9)
        );
        assert_eq!(c.max_visit_repeats, 2);
        assert_eq!(c.null_rate, 0.1);
        assert_eq!(parse_study("S_Y").unwrap().subjects, 10);
        for bad in [
            "",
            "subjects=3",
            "S:subjects",
            "S:subjects=x",
            "S:nulls=2",
            "S:colour=red",
        ] {
            assert!(parse_study(bad).is_err(), "{bad}");
        }
    }
}
