//! The clock of the per-call paths (an adaptive limit's latency samples, a retry
//! budget's deposits, every token bucket's decisions): the CPU's time-stamp counter
//! (through `quanta`), or tokio's clock when tokio's time is paused (tests).
//!
//! An adaptive limit reads the clock twice per call, a retry budget and a token bucket
//! once, so its cost is on the hot path: on x86-64
//! `quanta`'s raw read is one `rdtsc`, against the ~20 ns of `clock_gettime` behind
//! `std::time::Instant` (and `tokio::time::Instant`, which adds an atomic load). The
//! raw reads are only scaled to nanoseconds once per call, as a difference.
//!
//! Tests drive the layers on paused tokio time (`start_paused`, `advance`), which a
//! hardware counter cannot follow. So the clock is chosen when the layer is built: if
//! the current tokio runtime's clock is paused then, samples are taken on
//! `tokio::time::Instant`, exactly as before; otherwise on the counter.

use std::time::Duration;

/// A monotonic source of stamps; [`nanos`](Clock::nanos) turns two stamps into the
/// nanoseconds between them.
#[derive(Clone, Debug)]
pub(crate) enum Clock {
    /// `tokio::time::Instant`, stamps in nanoseconds since `base`: follows paused time.
    Tokio { base: tokio::time::Instant },
    /// The time-stamp counter (or the OS's monotonic clock where there is none), stamps
    /// in raw ticks.
    Counter(quanta::Clock),
}

impl Clock {
    /// tokio's clock if it is paused now, the counter otherwise.
    pub(crate) fn new() -> Clock {
        if tokio_time_is_paused() {
            Clock::Tokio {
                base: tokio::time::Instant::now(),
            }
        } else {
            // The first `quanta::Clock` of a process calibrates the counter against the
            // OS clock (at least 0.5 ms, at most 200 ms), once.
            Clock::Counter(quanta::Clock::new())
        }
    }

    /// A stamp of now.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        match self {
            Clock::Tokio { base } => u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Clock::Counter(clock) => clock.raw(),
        }
    }

    /// Nanoseconds from stamp `start` to stamp `end` (0 if `end` is not later: counters
    /// of different cores may disagree by a few ticks).
    #[inline]
    pub(crate) fn nanos(&self, start: u64, end: u64) -> u64 {
        match self {
            Clock::Tokio { .. } => end.saturating_sub(start),
            Clock::Counter(clock) => clock.delta_as_nanos(start, end),
        }
    }
}

/// Nanoseconds since it was made, on a [`Clock`]: the time line of the token buckets.
///
/// A bucket keeps its state as nanoseconds on this line, so it needs a reading that is
/// meaningful on its own, not only as a difference: one raw read and one scaling, which
/// is what `quanta::Clock::now` costs too.
#[derive(Clone, Debug)]
pub(crate) struct Elapsed {
    clock: Clock,
    start: u64,
}

impl Elapsed {
    /// Starts at 0 now, on tokio's clock if it is paused now, on the counter otherwise.
    pub(crate) fn new() -> Elapsed {
        let clock = Clock::new();
        let start = clock.now();
        Elapsed { clock, start }
    }

    /// Nanoseconds since [`new`](Elapsed::new).
    #[inline]
    pub(crate) fn nanos(&self) -> u64 {
        // One match for both the read and the scaling: this runs on every decision.
        match &self.clock {
            Clock::Counter(clock) => clock.delta_as_nanos(self.start, clock.raw()),
            Clock::Tokio { base } => u64::try_from(base.elapsed().as_nanos())
                .unwrap_or(u64::MAX)
                .saturating_sub(self.start),
        }
    }
}

/// `true` if the current tokio runtime's clock is paused.
///
/// tokio has no getter for it, but a paused clock does not move while the thread runs
/// (it only advances by `advance` or when the runtime is idle), whereas an unpaused one
/// follows `std::time::Instant`: two reads a few microseconds apart tell them apart,
/// deterministically.
fn tokio_time_is_paused() -> bool {
    if tokio::runtime::Handle::try_current().is_err() {
        return false;
    }
    let before = tokio::time::Instant::now();
    let spin = std::time::Instant::now();
    while spin.elapsed() < Duration::from_micros(5) {
        std::hint::spin_loop();
    }
    tokio::time::Instant::now() == before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_a_runtime_the_counter_is_used_and_moves() {
        let clock = Clock::new();
        assert!(matches!(clock, Clock::Counter(_)));
        let start = clock.now();
        std::thread::sleep(Duration::from_millis(2));
        let nanos = clock.nanos(start, clock.now());
        assert!(nanos >= 1_000_000, "{nanos}");
        assert_eq!(clock.nanos(clock.now(), start), 0);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn on_paused_time_tokio_s_clock_is_used() {
        let clock = Clock::new();
        assert!(matches!(clock, Clock::Tokio { .. }));
        let start = clock.now();
        tokio::time::advance(Duration::from_millis(3)).await;
        assert_eq!(clock.nanos(start, clock.now()), 3_000_000);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn elapsed_follows_paused_time_exactly() {
        let elapsed = Elapsed::new();
        assert_eq!(elapsed.nanos(), 0);
        tokio::time::advance(Duration::from_nanos(1_234_567)).await;
        assert_eq!(elapsed.nanos(), 1_234_567);
    }

    #[test]
    fn elapsed_on_the_counter_starts_near_zero_and_moves() {
        let elapsed = Elapsed::new();
        assert!(elapsed.nanos() < 1_000_000_000);
        std::thread::sleep(Duration::from_millis(2));
        assert!(elapsed.nanos() >= 1_000_000);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn on_running_time_the_counter_is_used() {
        assert!(matches!(Clock::new(), Clock::Counter(_)));
    }
}
