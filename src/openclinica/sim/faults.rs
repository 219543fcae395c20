//! The faults the simulator injects into data requests (clinical data,
//! metadata, participants), and the decision, request by request, of which
//! one applies.
//!
//! Every fault is deterministic or seeded: "every Nth", "the next N", or a
//! rate drawn from a seeded RNG, so a test that sets a fault knows what the
//! client will meet. Login and token requests are never faulted here: the
//! 4.x token endpoint has its own rate limit and the 3.x login its lockout
//! ([`super::auth`]). This module knows nothing of HTTP or of the studies.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// What goes wrong, and how often. Every field defaults to "never";
/// changeable at runtime ([`SimHandle::set_faults`](super::SimHandle::set_faults)
/// or `PUT /_sim/faults` with this as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Delay before answering any data request, in milliseconds.
    pub latency_ms: u64,
    /// Share of data requests answered `error_status` (seeded RNG).
    pub error_rate: f64,
    /// Every Nth data request is answered `error_status` (0: never).
    pub error_every: u32,
    /// The next N data requests are answered `error_status`.
    pub error_next: u32,
    /// The status of injected errors (a 5xx).
    pub error_status: u16,
    /// Every Nth data request is answered 429 (0: never).
    pub too_many_every: u32,
    /// The next N data requests are answered 429: a burst.
    pub too_many_next: u32,
    /// `Retry-After` of injected 429s, in seconds.
    pub retry_after_secs: u64,
    /// Where a truncated body is cut (a body that ends sooner is cut in
    /// the middle of its last chunk instead).
    pub truncate_after_bytes: u64,
    /// Every Nth body is truncated (0: never).
    pub truncate_every: u32,
    /// The next N bodies are truncated.
    pub truncate_next: u32,
    /// Slow drip: bodies go out in pieces of this many bytes (0: off) …
    pub drip_bytes: usize,
    /// … one piece every this many milliseconds.
    pub drip_delay_ms: u64,
    /// OC 3.x: a session serves this many data requests, then it has
    /// expired and the next one is sent to the login page (0: never).
    pub session_expiry_every: u32,
    /// OC 4.x: a token serves this many data requests, then it is refused
    /// with 401 (0: never; its `exp` still counts).
    pub token_expiry_every: u32,
    /// A clinical data document that would hold more subjects than this is
    /// answered 500, as OpenClinica answers when a study is too large to
    /// build in memory (0: no limit).
    pub max_document_subjects: u32,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            error_rate: 0.0,
            error_every: 0,
            error_next: 0,
            error_status: 503,
            too_many_every: 0,
            too_many_next: 0,
            retry_after_secs: 1,
            truncate_after_bytes: 4096,
            truncate_every: 0,
            truncate_next: 0,
            drip_bytes: 0,
            drip_delay_ms: 0,
            session_expiry_every: 0,
            token_expiry_every: 0,
            max_document_subjects: 0,
        }
    }
}

impl Faults {
    /// Refuses values that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err("error_rate must be between 0 and 1".into());
        }
        if !(500..=599).contains(&self.error_status) {
            return Err("error_status must be a 5xx status".into());
        }
        Ok(())
    }
}

/// What happens to one data request before its authentication is checked
/// (a proxy or an overloaded server answers before the application does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Early {
    Pass,
    Status(u16),
    TooMany { retry_after_secs: u64 },
}

/// How one body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Shaping {
    /// Cut the body after this many bytes (or sooner, see
    /// [`Faults::truncate_after_bytes`]) and break the connection.
    pub truncate_after: Option<u64>,
    /// Send pieces of this size, this far apart.
    pub drip: Option<(usize, Duration)>,
}

/// The faults in force and the counters their "every Nth" and "next N"
/// rules run on.
pub(crate) struct FaultState {
    pub faults: Faults,
    rng: SmallRng,
    requests: u64,
    bodies: u64,
}

impl FaultState {
    pub fn new(faults: Faults, seed: u64) -> Self {
        Self {
            faults,
            rng: SmallRng::seed_from_u64(seed),
            requests: 0,
            bodies: 0,
        }
    }

    /// Replaces the faults; the "every Nth" counters start again.
    pub fn set(&mut self, faults: Faults) {
        self.faults = faults;
        self.requests = 0;
        self.bodies = 0;
    }

    pub fn latency(&self) -> Duration {
        Duration::from_millis(self.faults.latency_ms)
    }

    /// The fault, if any, for the next data request. A 429 burst goes
    /// before errors: a rate limiter sits in front of the application.
    pub fn early(&mut self) -> Early {
        self.requests += 1;
        let n = self.requests;
        let f = &mut self.faults;
        let every = |e: u32| e > 0 && n.is_multiple_of(u64::from(e));
        if f.too_many_next > 0 || every(f.too_many_every) {
            f.too_many_next = f.too_many_next.saturating_sub(1);
            return Early::TooMany {
                retry_after_secs: f.retry_after_secs,
            };
        }
        // Drawn for every request, so that the sequence of outcomes does
        // not depend on which other faults are set.
        let drawn = self.rng.random_bool(f.error_rate.clamp(0.0, 1.0));
        if f.error_next > 0 || every(f.error_every) || drawn {
            f.error_next = f.error_next.saturating_sub(1);
            return Early::Status(f.error_status);
        }
        Early::Pass
    }

    /// How the next body that is actually served goes out.
    pub fn shaping(&mut self) -> Shaping {
        self.bodies += 1;
        let n = self.bodies;
        let f = &mut self.faults;
        let truncate = f.truncate_next > 0
            || (f.truncate_every > 0 && n.is_multiple_of(u64::from(f.truncate_every)));
        f.truncate_next = f.truncate_next.saturating_sub(u32::from(truncate));
        Shaping {
            truncate_after: truncate.then_some(f.truncate_after_bytes),
            drip: (f.drip_bytes > 0)
                .then(|| (f.drip_bytes, Duration::from_millis(f.drip_delay_ms))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_and_every_rules_are_exact() {
        let mut s = FaultState::new(
            Faults {
                too_many_next: 1,
                error_every: 3,
                ..Faults::default()
            },
            1,
        );
        let got: Vec<Early> = (0..7).map(|_| s.early()).collect();
        let tm = Early::TooMany {
            retry_after_secs: 1,
        };
        let e = Early::Status(503);
        let p = Early::Pass;
        assert_eq!(got, [tm, p, e, p, p, e, p]);
    }

    #[test]
    fn an_error_rate_is_seeded() {
        let run = |seed| {
            let mut s = FaultState::new(
                Faults {
                    error_rate: 0.3,
                    ..Faults::default()
                },
                seed,
            );
            (0..200).map(|_| s.early()).collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        let errors = run(5).iter().filter(|e| **e != Early::Pass).count();
        assert!((30..=90).contains(&errors), "{errors}");
    }

    #[test]
    fn truncation_applies_to_the_next_bodies_only() {
        let mut s = FaultState::new(
            Faults {
                truncate_next: 2,
                truncate_after_bytes: 10,
                ..Faults::default()
            },
            1,
        );
        let cuts: Vec<Option<u64>> = (0..3).map(|_| s.shaping().truncate_after).collect();
        assert_eq!(cuts, [Some(10), Some(10), None]);
    }

    #[test]
    fn nonsense_is_refused() {
        for f in [
            Faults {
                error_rate: 1.5,
                ..Faults::default()
            },
            Faults {
                error_status: 404,
                ..Faults::default()
            },
        ] {
            assert!(f.validate().is_err());
        }
    }
}
