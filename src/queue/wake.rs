//! When a worker looks for work: on every NOTIFY of a new run, and on a
//! fixed tick as the fallback (NOTIFY is lost across reconnects and never
//! fires for a run whose `run_at` is in the future, such as a retry after
//! its backoff).
//!
//! apalis 1.0's own combination (`Strategy::new().stream(..).interval(..)`)
//! stops waking the worker: its interval strategy replaces its timer when
//! it fires without polling the new one, so no waker is registered for the
//! next tick, and its combinator returns at the first ready strategy
//! without polling the rest. What that did, measured: with four worker
//! processes taking 300 short runs, every worker went quiet at the same
//! moment with the completions of its last runs dispatched but not
//! recorded, until the heartbeat woke it ~28 s later; the queue's
//! throughput fell from ~100 runs/s (one process) to ~10. [`Wake`] polls
//! both sources every time until each is pending, so a waker is always
//! registered for the next notification and the next tick; the trap's test
//! is `many_short_runs_on_four_workers_all_end_without_waiting_for_a_heartbeat`
//! in `tests/it/queue.rs`.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis_core::backend::ext::poll_strategy::{PollSnapshot, PollStrategy};
use futures::Stream;
use tokio::time::{Interval, MissedTickBehavior};

/// Notifications first, then the tick; ready when either fired.
pub struct Wake<S> {
    notifications: Option<S>,
    tick: Interval,
}

impl<S> Wake<S> {
    pub fn new(notifications: S, every: Duration) -> Self {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            notifications: Some(notifications),
            tick,
        }
    }
}

impl<S: Stream + Unpin> PollStrategy for Wake<S> {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let mut fired = false;
        // Drain what is ready so the stream's waker is registered again.
        while let Some(stream) = self.notifications.as_mut() {
            match Pin::new(stream).poll_next(cx) {
                Poll::Ready(Some(_)) => fired = true,
                Poll::Ready(None) => {
                    // The listener is gone for good: the tick carries on.
                    tracing::warn!("the queue's notification stream ended; polling only");
                    self.notifications = None;
                }
                Poll::Pending => break,
            }
        }
        // `poll_tick` registers the waker whenever it is pending.
        while self.tick.poll_tick(cx).is_ready() {
            fired = true;
        }
        if fired {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    #[tokio::test(start_paused = true)]
    async fn keeps_ticking_after_it_fires() {
        let (_tx, rx) = futures::channel::mpsc::unbounded::<()>();
        let mut wake = Wake::new(rx, Duration::from_millis(100));
        let snapshot = PollSnapshot::default();
        let mut fired = 0;
        for _ in 0..10 {
            // Each wait ends only because the tick re-armed itself.
            futures::future::poll_fn(|cx| wake.poll_drive(cx, &snapshot)).await;
            fired += 1;
        }
        assert_eq!(fired, 10);
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(wake.poll_drive(&mut cx, &snapshot).is_pending());
    }

    #[tokio::test(start_paused = true)]
    async fn a_notification_wakes_it_at_once_and_an_ended_stream_leaves_the_tick() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<()>();
        let mut wake = Wake::new(rx, Duration::from_secs(3600));
        let snapshot = PollSnapshot::default();
        let mut cx = Context::from_waker(noop_waker_ref());
        // The first tick of an interval is immediate.
        assert!(wake.poll_drive(&mut cx, &snapshot).is_ready());
        assert!(wake.poll_drive(&mut cx, &snapshot).is_pending());
        tx.unbounded_send(()).unwrap();
        assert!(wake.poll_drive(&mut cx, &snapshot).is_ready());
        drop(tx);
        assert!(wake.poll_drive(&mut cx, &snapshot).is_pending());
        assert!(wake.notifications.is_none());
    }
}
