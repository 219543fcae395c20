//! The Study Data Importer: on each cron tick, enqueue an incremental run
//! for every enabled CP that is due.
//!
//! A CP is due at a tick when its own `schedule` matches it, or, for a CP
//! without one, when `SCHEDULE_CRON` (default hourly) does. Times are UTC,
//! to the minute. Every replica runs this loop; exactly one wins each tick:
//! `ocsync.fire_schedule_tick` inserts the tick into `ocsync.schedule_ticks`
//! (the primary key decides, no leader needed) and, in the same
//! transaction, enqueues each due CP, counting the CPs skipped for an
//! active run. Each run's idempotency key is derived from the tick too.
//!
//! It knows cron and clocks; it does not know how runs are queued beyond
//! that SQL function, nor what a run does.

use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::cp::{CpConfig, CronSchedule};

/// A parsed 5-field cron expression (minute hour day-of-month month
/// day-of-week), matched against UTC minutes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: Vec<bool>,
    hours: Vec<bool>,
    days: Vec<bool>,
    months: Vec<bool>,
    weekdays: Vec<bool>,
    /// Standard cron: when both day fields are restricted, either matches.
    days_restricted: bool,
    weekdays_restricted: bool,
}

impl Cron {
    /// Parses an expression `CronSchedule` has already checked.
    pub fn new(schedule: &CronSchedule) -> Result<Self, String> {
        let text = match schedule.as_str() {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            other => other,
        };
        let f: Vec<&str> = text.split_whitespace().collect();
        if f.len() != 5 {
            return Err(format!("{text:?} does not have 5 fields"));
        }
        const MONTHS: &[&str] = &[
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ];
        const DAYS: &[&str] = &["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
        let mut weekdays = field(f[4], 0, 7, DAYS, 0)?;
        // 7 is Sunday too.
        if weekdays[7] {
            weekdays[0] = true;
        }
        Ok(Self {
            minutes: field(f[0], 0, 59, &[], 0)?,
            hours: field(f[1], 0, 23, &[], 0)?,
            days: field(f[2], 1, 31, &[], 0)?,
            months: field(f[3], 1, 12, MONTHS, 1)?,
            weekdays,
            days_restricted: f[2] != "*",
            weekdays_restricted: f[4] != "*",
        })
    }

    /// The first minute after `t` that lies on the schedule; `None` when
    /// none does within eight years (an expression such as `0 0 31 2 *`
    /// names a day that never comes; any day that does exist, February 29
    /// included, comes within that).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let start = next_minute(t);
        let mut day = start.date_naive();
        for _ in 0..(366 * 8) {
            let first = day == start.date_naive();
            if self.day_matches(day) {
                let (h0, m0) = if first {
                    (start.hour(), start.minute())
                } else {
                    (0, 0)
                };
                for h in h0..24 {
                    if !self.hours[h as usize] {
                        continue;
                    }
                    let from = if h == h0 { m0 } else { 0 };
                    if let Some(m) = (from..60).find(|m| self.minutes[*m as usize]) {
                        return day.and_hms_opt(h, m, 0).map(|t| t.and_utc());
                    }
                }
            }
            day = day.succ_opt()?;
        }
        None
    }

    fn day_matches(&self, d: chrono::NaiveDate) -> bool {
        let day = self.days[d.day() as usize];
        let weekday = self.weekdays[d.weekday().num_days_from_sunday() as usize];
        let day_ok = match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => day || weekday,
            _ => day && weekday,
        };
        self.months[d.month() as usize] && day_ok
    }

    /// Whether the minute `t` falls in lies on the schedule.
    pub fn matches(&self, t: DateTime<Utc>) -> bool {
        self.minutes[t.minute() as usize]
            && self.hours[t.hour() as usize]
            && self.day_matches(t.date_naive())
    }
}

fn field(text: &str, lo: u32, hi: u32, names: &[&str], base: u32) -> Result<Vec<bool>, String> {
    let mut set = vec![false; hi as usize + 1];
    let value = |s: &str| -> Result<u32, String> {
        if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
            return Ok(i as u32 + base);
        }
        s.parse::<u32>()
            .ok()
            .filter(|n| (lo..=hi).contains(n))
            .ok_or_else(|| format!("`{s}` is not in {lo}-{hi}"))
    };
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().map_err(|_| format!("bad step `{s}`"))?),
            None => (item, 1),
        };
        if step == 0 {
            return Err("step 0".into());
        }
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            // `a/n` means from a to the end in steps of n.
            (v, if item.contains('/') { hi } else { v })
        };
        let mut v = a;
        while v <= b {
            set[v as usize] = true;
            v += step;
        }
    }
    Ok(set)
}

/// What one tick did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TickOutcome {
    /// This replica won the tick (and did the enqueuing).
    pub won: bool,
    pub enqueued: i32,
    /// CPs skipped because they had an active run.
    pub skipped: i32,
}

/// The schedule that applies to a CP: its own `schedule`, or the default
/// (also when its own cannot be read, which `CpConfig` prevents).
fn cron_of(own: Option<&str>, default: &Cron) -> Cron {
    own.and_then(|text| CronSchedule::parse(text).and_then(|s| Cron::new(&s)).ok())
        .unwrap_or_else(|| default.clone())
}

/// When the Study Data Importer next starts a run of a CP, after `now`:
/// `None` for a disabled CP (the scheduler skips it) or a schedule that
/// never comes. A tick that finds the CP with an active run skips it.
pub fn next_run(cp: &CpConfig, default: &Cron, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if !cp.enabled {
        return None;
    }
    cron_of(cp.schedule.as_ref().map(CronSchedule::as_str), default).next_after(now)
}

/// The enabled CPs due at `tick`.
pub async fn due_cps(
    pool: &PgPool,
    default: &Cron,
    tick: DateTime<Utc>,
) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT id, config ->> 'schedule' FROM ocsync.cps WHERE enabled ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter(|(_, own)| cron_of(own.as_deref(), default).matches(tick))
        .map(|(id, _)| id)
        .collect())
}

/// Fires tick `tick` (a whole minute) for the CPs due then; only the first
/// replica to get here enqueues.
pub async fn fire_tick(
    pool: &PgPool,
    default: &Cron,
    tick: DateTime<Utc>,
    fired_by: &str,
    max_attempts: u32,
) -> Result<TickOutcome, sqlx::Error> {
    let cps = due_cps(pool, default, tick).await?;
    if cps.is_empty() {
        return Ok(TickOutcome::default());
    }
    let (won, enqueued, skipped): (bool, i32, i32) =
        sqlx::query_as("SELECT * FROM ocsync.fire_schedule_tick($1, $2, $3, $4)")
            .bind(tick)
            .bind(&cps)
            .bind(fired_by)
            .bind(max_attempts as i32)
            .fetch_one(pool)
            .await?;
    if won {
        tracing::info!(tick = %tick, enqueued, skipped, "schedule tick fired");
    }
    Ok(TickOutcome {
        won,
        enqueued,
        skipped,
    })
}

/// The start of the minute after `t`.
fn next_minute(t: DateTime<Utc>) -> DateTime<Utc> {
    let floor = Utc
        .with_ymd_and_hms(t.year(), t.month(), t.day(), t.hour(), t.minute(), 0)
        .single()
        .unwrap_or(t);
    floor + chrono::Duration::minutes(1)
}

/// Fires every minute boundary until `stop` is cancelled.
pub async fn run(
    pool: PgPool,
    default: Cron,
    fired_by: String,
    max_attempts: u32,
    stop: CancellationToken,
) {
    loop {
        let tick = next_minute(Utc::now());
        let wait = (tick - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        if let Err(e) = fire_tick(&pool, &default, tick, &fired_by, max_attempts).await {
            tracing::warn!(error = %e, tick = %tick, "schedule tick failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cron(s: &str) -> Cron {
        Cron::new(&CronSchedule::parse(s).unwrap()).unwrap()
    }

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        // 2026-11-29 is a Sunday.
        Utc.with_ymd_and_hms(2026, 11, 29, h, m, 0).unwrap()
    }

    #[test]
    fn cron_matches_minutes() {
        let cases: &[(&str, (u32, u32), bool)] = &[
            ("0 * * * *", (5, 0), true),
            ("0 * * * *", (5, 1), false),
            ("@hourly", (7, 0), true),
            ("*/15 * * * *", (1, 45), true),
            ("*/15 * * * *", (1, 46), false),
            ("30 2 * * *", (2, 30), true),
            ("30 2 * * mon-fri", (2, 30), false),
            ("30 2 * * sun", (2, 30), true),
            ("30 2 * * 7", (2, 30), true),
            ("0 0 1 * sun", (0, 0), true),
            ("5,10 3-4 * * *", (4, 10), true),
            ("5/20 * * * *", (9, 45), true),
        ];
        for (expr, (h, m), want) in cases {
            assert_eq!(cron(expr).matches(at(*h, *m)), *want, "{expr} at {h}:{m}");
        }
    }

    #[test]
    fn next_after_finds_the_next_matching_minute() {
        let t = |y, mo, d, h, mi| Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap();
        type Case = (&'static str, DateTime<Utc>, Option<DateTime<Utc>>);
        let cases: &[Case] = &[
            // Strictly after: a matching `now` gives the next occurrence.
            (
                "0 * * * *",
                t(2026, 11, 29, 5, 0),
                Some(t(2026, 11, 29, 6, 0)),
            ),
            (
                "0 * * * *",
                t(2026, 11, 29, 23, 30),
                Some(t(2026, 11, 30, 0, 0)),
            ),
            (
                "*/15 * * * *",
                t(2026, 11, 29, 1, 46),
                Some(t(2026, 11, 29, 2, 0)),
            ),
            (
                "30 2 * * *",
                t(2026, 11, 29, 2, 29),
                Some(t(2026, 11, 29, 2, 30)),
            ),
            // 2026-11-29 is a Sunday: the next Monday is the 30th.
            (
                "0 9 * * mon",
                t(2026, 11, 29, 10, 0),
                Some(t(2026, 11, 30, 9, 0)),
            ),
            ("@monthly", t(2026, 12, 15, 0, 0), Some(t(2027, 1, 1, 0, 0))),
            // Both day fields restricted: either one matches.
            (
                "0 0 1 * sun",
                t(2026, 11, 29, 0, 0),
                Some(t(2026, 12, 1, 0, 0)),
            ),
            (
                "0 0 29 2 *",
                t(2026, 11, 29, 0, 0),
                Some(t(2028, 2, 29, 0, 0)),
            ),
            ("0 0 31 2 *", t(2026, 11, 29, 0, 0), None),
        ];
        for (expr, now, want) in cases {
            let got = cron(expr).next_after(*now);
            assert_eq!(got, *want, "{expr} after {now}");
            if let Some(g) = got {
                assert!(cron(expr).matches(g), "{expr}: {g} does not match");
            }
        }
    }

    #[test]
    fn next_minute_is_the_next_boundary() {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 10, 59, 30).unwrap();
        assert_eq!(
            next_minute(t),
            Utc.with_ymd_and_hms(2026, 1, 1, 11, 0, 0).unwrap()
        );
    }
}
