//! [`TokenBucket`]: one lock-free bucket, and the GCRA arithmetic every bucket of the
//! crate shares.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use super::{
    error::{InvalidTokenBucket, RateLimited},
    rate::{Burst, Rate},
};

/// `tau` must stay far from `u64::MAX` so `max(tat, now) + cost` cannot overflow for any
/// `now` a process will see (2^62 ns is 146 years).
const MAX_TAU: u64 = 1 << 62;

use crate::clock::Elapsed;

/// The generic cell rate algorithm, in integer nanoseconds.
///
/// A bucket is a single number, its *theoretical arrival time* (TAT): the instant at
/// which the bucket will be full again. `tat <= now` means full. Taking `n` tokens
/// moves it to `max(tat, now) + n * interval`; that is allowed while the result is at
/// most `tau = burst * interval` ahead of `now`. So the whole state fits in one
/// `AtomicU64` and an acquisition is a single compare-and-swap.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gcra {
    /// Nanoseconds per token, rounded *up* so the real rate never exceeds the
    /// configured one (rates above 10^9/s are therefore capped at 10^9/s).
    interval: u64,
    /// `burst * interval`.
    tau: u64,
    burst: u32,
    rate: Rate,
}

/// Why a request was refused: the state it saw, and how long until it would pass.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Denied {
    /// The TAT the decision was made on.
    pub(crate) tat: u64,
    /// Nanoseconds until the same request is granted; `u64::MAX`: never.
    pub(crate) retry_after: u64,
}

impl Denied {
    pub(crate) fn rate_limited(&self) -> RateLimited {
        RateLimited::new(nanos_to_duration(self.retry_after))
    }
}

/// `u64::MAX` nanoseconds stands for "never" and maps to `Duration::MAX`.
pub(crate) fn nanos_to_duration(nanos: u64) -> Duration {
    if nanos == u64::MAX {
        Duration::MAX
    } else {
        Duration::from_nanos(nanos)
    }
}

impl Gcra {
    pub(crate) fn new(rate: Rate, burst: Burst) -> Result<Gcra, InvalidTokenBucket> {
        if burst.0 == 0 {
            return Err(InvalidTokenBucket::new(
                format!("burst {burst}"),
                "the burst must be at least 1",
            ));
        }
        let interval = (1e9 / rate.as_per_second()).ceil();
        // Compared as f64 first: a tiny rate makes the interval too large for u64.
        if interval * f64::from(burst.0) > MAX_TAU as f64 {
            return Err(InvalidTokenBucket::new(
                format!("burst {burst} at {rate}"),
                "burst / rate must be below 146 years",
            ));
        }
        let interval = (interval as u64).max(1);
        Ok(Gcra {
            interval,
            tau: interval * u64::from(burst.0),
            burst: burst.0,
            rate,
        })
    }

    pub(crate) fn rate(&self) -> Rate {
        self.rate
    }

    /// Nanoseconds per token.
    #[cfg(feature = "redis")]
    pub(crate) fn interval(&self) -> u64 {
        self.interval
    }

    /// Nanoseconds a full burst takes to refill.
    #[cfg(feature = "redis")]
    pub(crate) fn tau(&self) -> u64 {
        self.tau
    }

    pub(crate) fn burst(&self) -> u32 {
        self.burst
    }

    /// Takes `n` tokens at `now` if they are there. `Ok` carries the new TAT.
    #[inline]
    pub(crate) fn acquire(&self, cell: &AtomicU64, now: u64, n: u32) -> Result<u64, Denied> {
        // Relaxed is enough: the cell is the only shared datum, and a CAS on one location
        // is totally ordered by itself.
        let mut tat = cell.load(Ordering::Relaxed);
        if n > self.burst {
            return Err(Denied {
                tat,
                retry_after: u64::MAX,
            });
        }
        let cost = u64::from(n) * self.interval;
        loop {
            let new_tat = tat.max(now).saturating_add(cost);
            let limit = now.saturating_add(self.tau);
            if new_tat > limit {
                return Err(Denied {
                    tat,
                    retry_after: new_tat - limit,
                });
            }
            match cell.compare_exchange_weak(tat, new_tat, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(new_tat),
                Err(actual) => tat = actual,
            }
        }
    }

    /// The TAT of a bucket that did not exist (so was full) after taking `n <= burst`
    /// tokens at `now`.
    #[inline]
    pub(crate) fn fresh(&self, now: u64, n: u32) -> u64 {
        now.saturating_add(u64::from(n) * self.interval)
    }

    /// Books `n` tokens even if they are not there yet, when they will be there within
    /// `max_wait` nanoseconds. `Ok` is how long the caller must wait before using them;
    /// nothing is booked on `Err`.
    pub(crate) fn reserve(
        &self,
        cell: &AtomicU64,
        now: u64,
        n: u32,
        max_wait: u64,
    ) -> Result<u64, Denied> {
        let mut tat = cell.load(Ordering::Relaxed);
        if n > self.burst {
            return Err(Denied {
                tat,
                retry_after: u64::MAX,
            });
        }
        let cost = u64::from(n) * self.interval;
        loop {
            let new_tat = tat.max(now).saturating_add(cost);
            let wait = new_tat.saturating_sub(now.saturating_add(self.tau));
            if wait > max_wait {
                return Err(Denied {
                    tat,
                    retry_after: wait,
                });
            }
            match cell.compare_exchange_weak(tat, new_tat, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(wait),
                Err(actual) => tat = actual,
            }
        }
    }

    /// Gives back `n` tokens booked by [`reserve`](Gcra::reserve) and never used.
    ///
    /// Moving the TAT back by their cost is exact even when later reservations were
    /// made on top: the TAT is the sum of everything booked, and any value at or before
    /// `now` already means "full", so saturating at 0 cannot over-fill the bucket.
    pub(crate) fn refund(&self, cell: &AtomicU64, n: u32) {
        let cost = u64::from(n) * self.interval;
        let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tat| {
            Some(tat.saturating_sub(cost))
        });
    }

    /// Whole tokens available at `now` for a bucket at `tat`.
    #[inline]
    pub(crate) fn remaining(&self, tat: u64, now: u64) -> u32 {
        remaining_tokens(self.interval, self.tau, tat, now)
    }

    /// Nanoseconds until a bucket at `tat` is full again.
    #[inline]
    pub(crate) fn until_full(&self, tat: u64, now: u64) -> u64 {
        tat.saturating_sub(now)
    }
}

/// Whole tokens free at `now` in a bucket at `tat`.
#[inline]
fn remaining_tokens(interval: u64, tau: u64, tat: u64, now: u64) -> u32 {
    let free = now.saturating_add(tau).saturating_sub(tat.max(now));
    // free <= tau = burst * interval, so the quotient fits in a u32.
    (free / interval) as u32
}

/// A token bucket: [`Rate`] tokens per second flow in, at most [`Burst`] are kept.
///
/// A full bucket allows a burst of `burst` requests; after that, one request per
/// `1 / rate` seconds. Fractional rates are fine:
/// `TokenBucket::new(Rate::per_second(0.5), Burst(1))` allows one request every two
/// seconds.
///
/// The whole state is one `AtomicU64` (GCRA: the instant the bucket will be full again),
/// so every operation is lock-free and allocation-free. Time comes from the CPU's
/// time-stamp counter (through `quanta`, as governor's), or from tokio's clock if tokio's
/// time is paused when the bucket is made: tests can run on paused time. Clones share
/// the bucket.
///
/// ```
/// use resilience::{Burst, Rate, TokenBucket};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let bucket = TokenBucket::new(Rate::per_second(10.0), Burst(2));
/// assert!(bucket.try_acquire().is_ok());
/// assert!(bucket.try_acquire().is_ok());
/// let limited = bucket.try_acquire().unwrap_err();
/// assert_eq!(limited.retry_after, Duration::from_millis(100));
///
/// // `acquire` waits instead: here 100 ms, for the next token.
/// bucket.acquire().await;
/// # }
/// ```
#[derive(Clone)]
pub struct TokenBucket {
    inner: Arc<Inner>,
}

struct Inner {
    tat: AtomicU64,
    gcra: Gcra,
    clock: Elapsed,
}

impl TokenBucket {
    /// A full bucket refilling at `rate` up to `burst` tokens.
    ///
    /// # Panics
    ///
    /// When `burst` is 0, or `burst / rate` is absurdly long (over a century). Use
    /// [`try_new`](TokenBucket::try_new) for parameters read at run time.
    #[track_caller]
    pub fn new(rate: Rate, burst: Burst) -> TokenBucket {
        match TokenBucket::try_new(rate, burst) {
            Ok(bucket) => bucket,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`new`](TokenBucket::new), but returns an error instead of panicking.
    pub fn try_new(rate: Rate, burst: Burst) -> Result<TokenBucket, InvalidTokenBucket> {
        Ok(TokenBucket::with_gcra(Gcra::new(rate, burst)?))
    }

    pub(crate) fn with_gcra(gcra: Gcra) -> TokenBucket {
        TokenBucket {
            inner: Arc::new(Inner {
                tat: AtomicU64::new(0),
                gcra,
                clock: Elapsed::new(),
            }),
        }
    }

    #[inline]
    fn now(&self) -> u64 {
        self.inner.clock.nanos()
    }

    /// Takes one token, or tells how long until one is there.
    #[inline]
    pub fn try_acquire(&self) -> Result<(), RateLimited> {
        self.try_acquire_n(1)
    }

    /// Takes `n` tokens at once, or none.
    ///
    /// `Err(RateLimited { retry_after })` is exact: the same call made `retry_after`
    /// later succeeds, if nobody else took tokens meanwhile. When `n > burst` it can
    /// never succeed, and `retry_after` is [`Duration::MAX`].
    #[inline]
    pub fn try_acquire_n(&self, n: u32) -> Result<(), RateLimited> {
        self.inner
            .gcra
            .acquire(&self.inner.tat, self.now(), n)
            .map(drop)
            .map_err(|d| d.rate_limited())
    }

    /// Takes one token, waiting (with [`tokio::time::sleep`]) until there is one.
    ///
    /// Waiters are served in the order they called: each books its token when it
    /// starts waiting. Dropping the future before it completes gives the booked token
    /// back, so cancelling is safe.
    pub async fn acquire(&self) {
        // A single token never exceeds the burst (at least 1), so this cannot fail.
        let _ = self.acquire_n(1).await;
    }

    /// Takes `n` tokens, waiting until they are there.
    ///
    /// `n > burst` returns `Err` at once (`retry_after` = [`Duration::MAX`]) instead
    /// of waiting forever. Like [`acquire`](TokenBucket::acquire), cancel-safe.
    pub async fn acquire_n(&self, n: u32) -> Result<(), RateLimited> {
        let now = self.now();
        let wait = self
            .inner
            .gcra
            .reserve(&self.inner.tat, now, n, u64::MAX)
            .map_err(|d| d.rate_limited())?;
        if wait == 0 {
            return Ok(());
        }
        let reservation = self.reservation(n);
        // The bucket's clock may be the time-stamp counter, which tokio's timer does not
        // know: sleep for the wait, from a tokio reading taken now (on paused time the
        // two agree exactly).
        tokio::time::sleep(Duration::from_nanos(wait)).await;
        reservation.commit();
        Ok(())
    }

    /// Books `n` tokens to be used within `max_wait`; returns the wait. For wait mode.
    pub(crate) fn reserve(&self, n: u32, max_wait: Duration) -> Result<Duration, RateLimited> {
        let max_wait = u64::try_from(max_wait.as_nanos()).unwrap_or(u64::MAX);
        self.inner
            .gcra
            .reserve(&self.inner.tat, self.now(), n, max_wait)
            .map(Duration::from_nanos)
            .map_err(|d| d.rate_limited())
    }

    /// A guard that refunds `n` booked tokens unless committed.
    pub(crate) fn reservation(&self, n: u32) -> Reservation {
        let bucket = self.clone();
        Reservation::new(move || bucket.inner.gcra.refund(&bucket.inner.tat, n))
    }

    /// Takes `n` tokens and reports what is left, for the layer's `RateLimit` header.
    #[inline]
    pub(crate) fn check(&self, n: u32) -> Result<Acquired, Rejected> {
        let now = self.now();
        let gcra = &self.inner.gcra;
        match gcra.acquire(&self.inner.tat, now, n) {
            Ok(tat) => Ok(Acquired::new(gcra, tat, now)),
            Err(d) => Err(Rejected::new(gcra, d, now)),
        }
    }

    /// Whole tokens available now.
    pub fn remaining(&self) -> u32 {
        let tat = self.inner.tat.load(Ordering::Relaxed);
        self.inner.gcra.remaining(tat, self.now())
    }

    /// How long until the bucket is full again (zero if it is full).
    pub fn time_until_full(&self) -> Duration {
        let tat = self.inner.tat.load(Ordering::Relaxed);
        Duration::from_nanos(self.inner.gcra.until_full(tat, self.now()))
    }

    /// The refill rate, as given to [`new`](TokenBucket::new).
    pub fn rate(&self) -> Rate {
        self.inner.gcra.rate()
    }

    /// The most tokens the bucket holds, as given to [`new`](TokenBucket::new).
    pub fn burst(&self) -> u32 {
        self.inner.gcra.burst()
    }
}

impl fmt::Debug for TokenBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBucket")
            .field("rate", &self.rate())
            .field("burst", &self.burst())
            .field("remaining", &self.remaining())
            .finish()
    }
}

/// What a successful acquisition left in the bucket.
///
/// The figures are computed when asked for, so a caller that only wants the grant pays
/// nothing for them.
#[derive(Clone, Copy)]
pub struct Acquired {
    interval: u64,
    tau: u64,
    tat: u64,
    now: u64,
}

impl Acquired {
    #[inline]
    pub(crate) fn new(gcra: &Gcra, tat: u64, now: u64) -> Acquired {
        Acquired {
            interval: gcra.interval,
            tau: gcra.tau,
            tat,
            now,
        }
    }

    /// Whole tokens still available right after the acquisition.
    pub fn remaining(&self) -> u32 {
        remaining_tokens(self.interval, self.tau, self.tat, self.now)
    }

    /// How long after the acquisition the bucket is full again.
    pub fn time_until_full(&self) -> Duration {
        Duration::from_nanos(self.tat.saturating_sub(self.now))
    }
}

impl fmt::Debug for Acquired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquired")
            .field("remaining", &self.remaining())
            .field("time_until_full", &self.time_until_full())
            .finish()
    }
}

/// A refusal with the bucket's fill state, for the layer's `RateLimit` header. Like
/// [`Acquired`], the state is computed only if asked for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rejected {
    pub(crate) limited: RateLimited,
    pub(crate) state: Acquired,
}

impl Rejected {
    #[inline]
    pub(crate) fn new(gcra: &Gcra, denied: Denied, now: u64) -> Rejected {
        Rejected {
            limited: denied.rate_limited(),
            state: Acquired::new(gcra, denied.tat, now),
        }
    }
}

/// Tokens booked ahead of time; given back when dropped without [`commit`].
///
/// [`commit`]: Reservation::commit
pub(crate) struct Reservation {
    refund: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Reservation {
    pub(crate) fn new(refund: impl FnOnce() + Send + Sync + 'static) -> Reservation {
        Reservation {
            refund: Some(Box::new(refund)),
        }
    }

    /// The tokens were used: keep them booked.
    pub(crate) fn commit(mut self) {
        self.refund = None;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(refund) = self.refund.take() {
            refund();
        }
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("armed", &self.refund.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NANOS_PER_SEC: u64 = 1_000_000_000;

    #[test]
    fn gcra_rejects_bad_parameters() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Rate::try_per_second(bad).is_err(), "{bad}");
        }
        let rate = |r| Rate::per_second(r);
        assert!(Gcra::new(rate(1.0), Burst(0)).is_err());
        assert!(Gcra::new(rate(1e-12), Burst(u32::MAX)).is_err());
        assert!(Gcra::new(rate(1e12), Burst(u32::MAX)).is_ok());
    }

    #[test]
    fn gcra_burst_then_rate() {
        let g = Gcra::new(Rate::per_second(10.0), Burst(3)).unwrap();
        let cell = AtomicU64::new(0);
        for _ in 0..3 {
            assert!(g.acquire(&cell, 0, 1).is_ok());
        }
        let d = g.acquire(&cell, 0, 1).unwrap_err();
        assert_eq!(d.retry_after, 100_000_000);
        assert!(g.acquire(&cell, 99_999_999, 1).is_err());
        assert!(g.acquire(&cell, 100_000_000, 1).is_ok());
    }

    #[test]
    fn refund_restores_tokens() {
        let g = Gcra::new(Rate::per_second(1.0), Burst(2)).unwrap();
        let cell = AtomicU64::new(0);
        assert_eq!(g.reserve(&cell, 0, 2, u64::MAX).unwrap(), 0);
        assert_eq!(g.reserve(&cell, 0, 1, u64::MAX).unwrap(), NANOS_PER_SEC);
        g.refund(&cell, 1);
        assert_eq!(g.remaining(cell.load(Ordering::Relaxed), 0), 0);
        assert_eq!(g.remaining(cell.load(Ordering::Relaxed), NANOS_PER_SEC), 1);
    }
}
