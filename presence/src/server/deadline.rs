//! [`Deadline`]: `tokio::time::timeout` that only sets a timer when it is needed.
//!
//! Most calls the server bounds finish the first time they are polled (every call on
//! the memory store; a request whose body has already arrived). For those, a timer is
//! pure cost: `tokio::time::timeout` reads the clock, looks up the runtime's timer
//! and initialises an entry for every call, and the server bounds two phases of each
//! request (the body and the store call). [`Deadline`] polls the inner future
//! first and arms the timer only if it is still pending; the time limit then counts
//! from that first poll, microseconds after the call began.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

pin_project! {
    /// Completes with the inner future's output, or with `Err(TimedOut)` once it has
    /// been pending for `limit`. See the [module docs](self).
    pub(crate) struct Deadline<F> {
        #[pin]
        inner: F,
        limit: Duration,
        #[pin]
        timer: Option<Sleep>,
    }
}

/// The inner future did not complete within the limit; it was armed at `started`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimedOut {
    pub(crate) started: Instant,
}

/// Bounds `inner` to `limit` (counted from its first poll).
pub(crate) fn deadline<F: Future>(limit: Duration, inner: F) -> Deadline<F> {
    Deadline {
        inner,
        limit,
        timer: None,
    }
}

impl<F> Deadline<F> {
    /// When the timer was armed: `None` while the inner future has not been pending.
    pub(crate) fn armed_at(self: Pin<&Self>) -> Option<Instant> {
        self.project_ref()
            .timer
            .as_pin_ref()
            .map(|t| t.deadline() - *self.project_ref().limit)
    }
}

impl<F: Future> Future for Deadline<F> {
    type Output = Result<F::Output, TimedOut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if this.timer.is_none() {
            this.timer.set(Some(tokio::time::sleep(*this.limit)));
        }
        match this.timer.as_pin_mut() {
            Some(timer) => {
                let started = timer.deadline() - *this.limit;
                timer.poll(cx).map(|()| Err(TimedOut { started }))
            }
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ready_futures_need_no_timer_and_pending_ones_time_out() {
        let ready = deadline(Duration::from_secs(1), async { 7 });
        tokio::pin!(ready);
        assert_eq!(ready.as_mut().await, Ok(7));
        assert_eq!(ready.as_ref().armed_at(), None);

        let start = Instant::now();
        let slow = deadline(
            Duration::from_millis(500),
            tokio::time::sleep(Duration::from_secs(2)),
        );
        assert_eq!(slow.await, Err(TimedOut { started: start }));
        assert_eq!(start.elapsed(), Duration::from_millis(500));

        let in_time = deadline(
            Duration::from_millis(500),
            tokio::time::sleep(Duration::from_millis(499)),
        );
        assert_eq!(in_time.await, Ok(()));
    }
}
