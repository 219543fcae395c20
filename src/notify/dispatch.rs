//! The dispatcher: claims due notifications, delivers them, records what
//! happened. One per `ocsync worker` / `ocsync serve` process; any number
//! share the outbox.
//!
//! [`Dispatcher::deliver_due`] is one step (claim, send, record), public so
//! that tests drive it without waiting; [`Dispatcher::run`] repeats it when
//! the database announces new rows ([`super::CHANNEL`]) and when the next
//! retry is due, and at least every [`IDLE`] (a missed announcement, a row
//! another replica leased and gave up).

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use super::email::Mailer;
use super::message::RunEnded;
use super::outbox::{self, Claimed, Outcome};
use super::webhook::WebhookSender;
use super::{CHANNEL, Channel, Failure};
use crate::config::NotifyConfig;
use crate::openclinica::CredentialRef;

/// Notifications one step claims at most (and sends at once).
pub const BATCH: i64 = 16;

/// The longest a dispatcher sleeps with nothing announced.
pub const IDLE: Duration = Duration::from_secs(30);

/// The delay before attempt `attempt + 1`: `base` × 2^(attempt−1), at most
/// an hour, times `jitter` ∈ [0, 1] mapped onto [½, 1] — so retries of many
/// notifications spread out instead of arriving together, and each delay
/// is still at least half the nominal one.
pub fn backoff(base: Duration, attempt: i32, jitter: f64) -> Duration {
    let exp = attempt.clamp(1, 20) as u32 - 1;
    let nominal = base.saturating_mul(1 << exp).min(Duration::from_secs(3600));
    nominal.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// Delivers notifications from the outbox.
pub struct Dispatcher {
    pool: PgPool,
    /// `None` when `SMTP_HOST` is unset.
    mailer: Option<Mailer>,
    webhooks: WebhookSender,
    config: NotifyConfig,
}

impl Dispatcher {
    /// A dispatcher with `config`'s SMTP server, link base and retry rules.
    /// Nothing connects yet; a bad TLS setup fails here, at start-up.
    pub fn new(pool: PgPool, config: &NotifyConfig) -> Result<Self, String> {
        let mailer = config
            .smtp
            .as_ref()
            .map(|smtp| Mailer::new(smtp, config.timeout))
            .transpose()?;
        Ok(Self {
            pool,
            mailer,
            webhooks: WebhookSender::new(config.timeout)?,
            config: config.clone(),
        })
    }

    /// How long a claim keeps a row from other dispatchers: longer than
    /// any delivery may take, with room for the database round trips.
    fn lease(&self) -> Duration {
        self.config.timeout + Duration::from_secs(60)
    }

    /// One step: claims the notifications due now (at most [`BATCH`]),
    /// delivers them at once, and records each outcome. Returns how many
    /// it claimed.
    pub async fn deliver_due(&self) -> Result<usize, sqlx::Error> {
        let claimed = outbox::claim(&self.pool, BATCH, self.lease()).await?;
        let n = claimed.len();
        let results = join_all(claimed.into_iter().map(|c| self.attempt(c))).await;
        // Every attempt was made; the first database error (if any) is
        // reported after all are recorded as far as they could be.
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(n)
    }

    /// One attempt of one claimed row, recorded.
    async fn attempt(&self, c: Claimed) -> Result<(), sqlx::Error> {
        let channel = Channel::parse(&c.channel);
        let span = tracing::info_span!(
            "notify.deliver",
            notification.id = c.id,
            run.id = %c.run_id,
            cp.id = %c.cp_id,
            channel = %c.channel,
            attempt = c.attempts,
        );
        let result = tracing::Instrument::instrument(self.send(&c, channel), span.clone()).await;
        let outcome = match result {
            Ok(Ok(())) => Outcome::Sent,
            Ok(Err(f)) if f.permanent => Outcome::Failed { reason: f.reason },
            Ok(Err(f)) if c.attempts >= self.config.max_attempts as i32 => Outcome::Failed {
                reason: format!("gave up after {} attempts: {}", c.attempts, f.reason),
            },
            Ok(Err(f)) => Outcome::Retry {
                reason: f.reason,
                after: backoff(self.config.retry_base, c.attempts, rand::random()),
            },
            Err(e) => {
                // The database failed while the message was being prepared:
                // nothing was sent; the lease brings the row back.
                tracing::warn!(parent: &span, error = %e, "notification not prepared; will retry");
                return Err(e);
            }
        };
        let recorded = outbox::record(&self.pool, c.id, c.attempts, &outcome).await?;
        let label = channel.map_or("other", Channel::as_str);
        match &outcome {
            Outcome::Sent => {
                crate::metrics::notification_attempt(&c.cp_id, label, "sent");
                tracing::info!(parent: &span, "notification sent");
            }
            Outcome::Retry { reason, after } => {
                crate::metrics::notification_attempt(&c.cp_id, label, "retry");
                tracing::warn!(
                    parent: &span,
                    error = %reason,
                    retry_in_ms = after.as_millis() as u64,
                    "notification not delivered; will retry"
                );
            }
            Outcome::Failed { reason } => {
                crate::metrics::notification_attempt(&c.cp_id, label, "failed");
                tracing::error!(parent: &span, error = %reason, "notification failed for good");
            }
        }
        if !recorded {
            tracing::warn!(parent: &span, "another dispatcher took the notification over; its record stands");
        }
        Ok(())
    }

    /// Builds (or reloads) the message and sends it on its channel. The
    /// outer error is the database's; the inner one the delivery's.
    async fn send(
        &self,
        c: &Claimed,
        channel: Option<Channel>,
    ) -> Result<Result<(), Failure>, sqlx::Error> {
        let message = match self.message(c).await? {
            Ok(m) => m,
            Err(f) => return Ok(Err(f)),
        };
        Ok(match channel {
            Some(Channel::Email) => match &self.mailer {
                Some(mailer) => mailer.send(&c.target, &message).await,
                None => Err(Failure::permanent(
                    "SMTP is not configured (SMTP_HOST is unset)",
                )),
            },
            Some(Channel::Webhook) => match webhook_secret(c) {
                Ok(secret) => {
                    self.webhooks
                        .send(&c.target, c.id, &secret, message.to_json())
                        .await
                }
                Err(f) => Err(f),
            },
            None => Err(Failure::permanent(format!(
                "unknown channel {:?}",
                c.channel
            ))),
        })
    }

    /// The message of `c`: kept from an earlier attempt, or built now from
    /// the run's Import Logs row and kept for the retries.
    async fn message(&self, c: &Claimed) -> Result<Result<RunEnded, Failure>, sqlx::Error> {
        if let Some(kept) = &c.payload {
            return Ok(serde_json::from_value(kept.clone())
                .map_err(|e| Failure::permanent(format!("the kept message cannot be read: {e}"))));
        }
        let Some(run) = crate::queue::runs::get(&self.pool, &c.run_id).await? else {
            return Ok(Err(Failure::permanent("the run no longer exists")));
        };
        let message = RunEnded::new(&run, self.config.run_url(&run.id));
        let json = serde_json::to_value(&message).expect("a RunEnded always serialises");
        outbox::keep_payload(&self.pool, c.id, &json).await?;
        Ok(Ok(message))
    }

    /// Delivers until `stop` is cancelled: at each announcement, when the
    /// next retry is due, and at least every [`IDLE`]. A step in progress
    /// finishes (its deliveries are bounded by `NOTIFY_TIMEOUT_SECS`), so a
    /// message is not left sent but unrecorded.
    pub async fn run(self, stop: CancellationToken) {
        let wake = Arc::new(tokio::sync::Notify::new());
        let listener = tokio::spawn(listen(self.pool.clone(), wake.clone()));
        tracing::info!(
            email = self.mailer.is_some(),
            "notification dispatcher started"
        );
        while !stop.is_cancelled() {
            let wait = match self.deliver_due().await {
                // A full batch: more may be due at once.
                Ok(n) if n as i64 == BATCH => continue,
                Ok(_) => match outbox::next_due_in(&self.pool).await {
                    Ok(next) => next.unwrap_or(IDLE).min(IDLE),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the notification outbox; will try again");
                        Duration::from_secs(5)
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "delivering notifications failed; will try again");
                    Duration::from_secs(5)
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        listener.abort();
        tracing::info!("notification dispatcher stopped");
    }
}

/// Resolves the webhook secret of `c` from its reference. A missing
/// secret may be a mount not there yet: tried again, like an outage.
fn webhook_secret(c: &Claimed) -> Result<secrecy::SecretString, Failure> {
    let reference: CredentialRef = c
        .secret_ref
        .clone()
        .ok_or_else(|| Failure::permanent("the webhook has no secret reference"))
        .and_then(|v| {
            serde_json::from_value(v).map_err(|e| {
                Failure::permanent(format!("the webhook secret reference cannot be read: {e}"))
            })
        })?;
    reference
        .resolve()
        .map_err(|e| Failure::retry(format!("the webhook secret: {e}")))
}

/// Wakes the dispatcher for every announcement on [`CHANNEL`], and once
/// after each (re)connection, since announcements made while it was away
/// are lost.
async fn listen(pool: PgPool, wake: Arc<tokio::sync::Notify>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "notification listener cannot connect; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "notification listener cannot LISTEN; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        wake.notify_one();
        loop {
            match listener.recv().await {
                Ok(_) => wake.notify_one(),
                Err(e) => {
                    tracing::warn!(error = %e, "notification listener lost its connection");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_jittered_within_half_to_all() {
        let b = Duration::from_secs(30);
        assert_eq!(backoff(b, 1, 1.0), Duration::from_secs(30));
        assert_eq!(backoff(b, 1, 0.0), Duration::from_secs(15));
        assert_eq!(backoff(b, 2, 1.0), Duration::from_secs(60));
        assert_eq!(backoff(b, 4, 1.0), Duration::from_secs(240));
        assert_eq!(backoff(b, 12, 1.0), Duration::from_secs(3600));
        assert_eq!(backoff(b, 12, 0.0), Duration::from_secs(1800));
        assert_eq!(backoff(Duration::ZERO, 5, 0.7), Duration::ZERO);
        // Out-of-range inputs stay in range.
        assert_eq!(backoff(b, 0, 2.0), Duration::from_secs(30));
        assert_eq!(backoff(b, i32::MAX, -1.0), Duration::from_secs(1800));
        for _ in 0..100 {
            let d = backoff(b, 3, rand::random());
            assert!(
                d >= Duration::from_secs(60) && d <= Duration::from_secs(120),
                "{d:?}"
            );
        }
    }

    #[test]
    fn a_secret_reference_resolves_and_its_absence_is_retried() {
        let claimed = |secret_ref| Claimed {
            id: 1,
            run_id: "R".into(),
            cp_id: "CP".into(),
            channel: "webhook".into(),
            target: "https://h.example.org/".into(),
            secret_ref,
            attempts: 1,
            payload: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hook");
        std::fs::write(&file, "s3cret\n").unwrap();
        let ok = webhook_secret(&claimed(Some(serde_json::json!({"file": file})))).unwrap();
        assert_eq!(secrecy::ExposeSecret::expose_secret(&ok), "s3cret");
        let missing = webhook_secret(&claimed(Some(
            serde_json::json!({"env": "OCSYNC_TEST_SURELY_UNSET_HOOK"}),
        )))
        .unwrap_err();
        assert!(!missing.permanent);
        assert!(
            missing.reason.contains("OCSYNC_TEST_SURELY_UNSET_HOOK"),
            "{}",
            missing.reason
        );
        assert!(webhook_secret(&claimed(None)).unwrap_err().permanent);
    }
}
