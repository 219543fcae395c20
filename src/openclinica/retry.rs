//! How long to wait before the next attempt: exponential backoff with full
//! jitter, or what the server asked for with `Retry-After`.
//!
//! Full jitter (a uniform draw between zero and the exponential ceiling)
//! spreads the retries of many concurrent requests so that a server coming
//! back from an overload is not hit by all of them at the same instant.

use std::time::{Duration, SystemTime};

use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};

use super::config::RetryPolicy;

/// The longest `Retry-After` honoured; a larger value (or a date far ahead)
/// is treated as this, so one odd header cannot park a sync for hours.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// The ceiling of the backoff after failed attempt `attempt` (1-based):
/// `base · 2^(attempt-1)`, capped at `max`.
pub(crate) fn ceiling(policy: &RetryPolicy, attempt: u32) -> Duration {
    let factor = 1u64 << attempt.saturating_sub(1).min(32);
    let ms = policy
        .base_delay_ms
        .saturating_mul(factor)
        .min(policy.max_delay_ms);
    Duration::from_millis(ms)
}

/// A random delay in `[0, ceiling]` after failed attempt `attempt`.
pub(crate) fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let max = ceiling(policy, attempt).as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(0..=max))
}

/// The delay a `Retry-After` header asks for: delta-seconds or an HTTP
/// date; `None` when absent or unreadable.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base_delay_ms: 100,
            max_delay_ms: 1_000,
        }
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = policy();
        let got: Vec<u128> = (1..=6).map(|a| ceiling(&p, a).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(ceiling(&p, 200).as_millis(), 1000);
    }

    #[test]
    fn backoff_stays_under_the_ceiling() {
        let p = policy();
        for attempt in 1..8 {
            for _ in 0..50 {
                assert!(backoff(&p, attempt) <= ceiling(&p, attempt));
            }
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&date).unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&past).unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("999999"));
        assert_eq!(retry_after(&h, now), Some(MAX_RETRY_AFTER));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, now), None);
    }
}
