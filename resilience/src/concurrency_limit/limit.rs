//! The shared state of one limit: the in-flight count, its permits and, for an adaptive
//! limit, the algorithm that moves the limit.
//!
//! # One atomic word per admission
//!
//! [`SharedLimit`] is what `Arc<Limit>` would be, except that the one atomic word
//! that counts the handles (layers and services) also counts the permits (calls in
//! flight): its high 32 bits count handles, its low 32 bits permits. A permit keeps
//! the limit alive as a clone of an `Arc` would, but admitting a call is one
//! compare-and-swap and finishing it one subtraction, where an in-flight counter
//! beside an `Arc` clone took four atomic read-modify-writes per call (22.6 ns per
//! call over a pass-through, against 11 ns with this; `cargo bench -p resilience
//! --bench concurrency_limit`). The state is freed when the word reaches zero: no
//! handle and no permit left.

use std::{
    fmt,
    ops::Deref,
    ptr::NonNull,
    sync::{
        atomic::{fence, AtomicBool, AtomicIsize, AtomicU64, AtomicUsize, Ordering},
        Mutex,
    },
    time::Duration,
};

use super::{
    adaptive::{Algorithm, Hook, SampleWindow, State, WindowSummary},
    error::InvalidConcurrencyLimit,
};
use crate::clock::Clock;

/// The state every service made by one layer shares: created when the layer is built.
pub(crate) struct Limit {
    /// The bounds of the limit; both `max` for a static limit.
    min: usize,
    max: usize,
    /// The limit admissions are checked against; fixed at `max` for a static limit.
    current: AtomicUsize,
    rejections: AtomicU64,
    adaptive: Option<Adaptive>,
}

/// An adaptive limit's moving parts.
///
/// A call's sample is added to the open window with a few relaxed atomic operations, no
/// lock: the per-call cost is what the limit adds to every call. The mutex is taken
/// only by the sample that closes the window, to run the algorithm. Under concurrency a
/// sample that lands while a window closes may count in either window; the estimates
/// are means over many samples, so that is noise, and the bounds are enforced on every
/// update whatever the samples were.
struct Adaptive {
    clock: Clock,
    window: SampleWindow,
    /// An AIMD limit's timeout in nanoseconds: a slower sample is a drop.
    timeout_nanos: Option<u64>,
    // The open window.
    /// A `Samples(n)` window: the samples still to come before it closes (below 0
    /// while a close is under way); a `Time` window: the samples so far.
    samples: AtomicIsize,
    rtt_sum_nanos: AtomicU64,
    max_in_flight: AtomicUsize,
    dropped: AtomicBool,
    /// For a time window: the stamp of the window's first sample, 0 while none.
    started: AtomicU64,
    /// The algorithm's own state, updated when a window closes.
    state: Mutex<State>,
    hook: Option<Hook>,
}

impl Limit {
    pub(crate) fn try_new(max: usize) -> Result<SharedLimit, InvalidConcurrencyLimit> {
        if max == 0 {
            return Err(InvalidConcurrencyLimit::new(
                max,
                "the maximum must be at least 1",
            ));
        }
        Ok(SharedLimit::new(Limit {
            min: max,
            max,
            current: AtomicUsize::new(max),
            rejections: AtomicU64::new(0),
            adaptive: None,
        }))
    }

    /// An adaptive limit; the bounds were checked by the builder.
    pub(crate) fn adaptive(
        algorithm: Algorithm,
        min: usize,
        max: usize,
        initial: usize,
        window: SampleWindow,
        hook: Option<Hook>,
    ) -> SharedLimit {
        let timeout_nanos = match algorithm {
            Algorithm::Aimd(a) => Some(u64::try_from(a.timeout().as_nanos()).unwrap_or(u64::MAX)),
            Algorithm::Gradient2(_) => None,
        };
        SharedLimit::new(Limit {
            min,
            max,
            current: AtomicUsize::new(initial),
            rejections: AtomicU64::new(0),
            adaptive: Some(Adaptive {
                clock: Clock::new(),
                window,
                timeout_nanos,
                samples: AtomicIsize::new(match window {
                    SampleWindow::Samples(n) => isize::try_from(n).unwrap_or(isize::MAX),
                    SampleWindow::Time(_) => 0,
                }),
                rtt_sum_nanos: AtomicU64::new(0),
                max_in_flight: AtomicUsize::new(0),
                dropped: AtomicBool::new(false),
                started: AtomicU64::new(0),
                state: Mutex::new(State::new(algorithm, min, max, initial)),
                hook,
            }),
        })
    }

    /// Adds one sample (a call admitted at stamp `start`, with `in_flight` calls in
    /// flight, ending now) to the open window; the sample that closes it moves the
    /// limit.
    #[inline]
    fn record(&self, start: u64, in_flight: usize, dropped: bool) {
        let Some(a) = &self.adaptive else {
            return;
        };
        let now = a.clock.now();
        let rtt = a.clock.nanos(start, now);
        let dropped = dropped || a.timeout_nanos.is_some_and(|t| rtt > t);
        a.rtt_sum_nanos.fetch_add(rtt, Ordering::Relaxed);
        // A load first: the maximum rarely changes, and a load is cheaper than an RMW.
        if in_flight > a.max_in_flight.load(Ordering::Relaxed) {
            a.max_in_flight.fetch_max(in_flight, Ordering::Relaxed);
        }
        if dropped {
            a.dropped.store(true, Ordering::Relaxed);
        }
        match a.window {
            SampleWindow::Samples(_) => {
                // A countdown to the window's end, rather than a count and a modulo (a
                // division per call). AcqRel: the closing sample sees the sums of every
                // sample counted before it. The sample that takes it to 0 closes the
                // window; samples landing during a close take it below 0 and also try,
                // and the close itself re-checks under the lock.
                if a.samples.fetch_sub(1, Ordering::AcqRel) <= 1 {
                    self.close_window(a, None);
                }
            }
            SampleWindow::Time(d) => {
                a.samples.fetch_add(1, Ordering::AcqRel);
                let started = a.started.load(Ordering::Acquire);
                if started == 0 {
                    // The window's first sample; 0 means "none", so stamps start at 1.
                    let _ = a.started.compare_exchange(
                        0,
                        now.max(1),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                } else if u128::from(a.clock.nanos(started, now)) >= d.as_nanos() {
                    self.close_window(a, Some(started));
                }
            }
        }
    }

    /// Closes the open window and moves the limit. For a time window, `started` is the
    /// stamp the closing sample saw: a window another sample closed meanwhile is not
    /// closed twice.
    #[cold]
    fn close_window(&self, a: &Adaptive, started: Option<u64>) {
        let mut state = a.lock();
        let samples = match (a.window, started) {
            (SampleWindow::Time(_), Some(started)) => {
                if a.started
                    .compare_exchange(started, 0, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
                {
                    return;
                }
                a.samples.swap(0, Ordering::AcqRel).max(1)
            }
            (SampleWindow::Samples(n), _) => {
                // Another closer got here first and the countdown is running again.
                if a.samples.load(Ordering::Acquire) > 0 {
                    return;
                }
                // Samples counted past the end already belong to the next window.
                let n = isize::try_from(n).unwrap_or(isize::MAX);
                a.samples.fetch_add(n, Ordering::AcqRel);
                n
            }
            (SampleWindow::Time(_), None) => return,
        } as usize;
        let rtt_sum = a.rtt_sum_nanos.swap(0, Ordering::Relaxed);
        let summary = WindowSummary {
            mean_rtt: Duration::from_nanos(rtt_sum).as_secs_f64() / samples as f64,
            dropped: a.dropped.swap(false, Ordering::Relaxed),
            max_in_flight: a.max_in_flight.swap(0, Ordering::Relaxed),
        };
        let old = self.current.load(Ordering::Relaxed);
        let new = state.update(summary, old);
        if new != old {
            self.current.store(new, Ordering::Relaxed);
            if let Some(hook) = &a.hook {
                hook(old, new);
            }
        }
    }

    pub(crate) fn min(&self) -> usize {
        self.min
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    pub(crate) fn limit(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    pub(crate) fn algorithm(&self) -> Option<Algorithm> {
        self.adaptive.as_ref().map(|a| a.lock().algorithm())
    }

    pub(crate) fn window(&self) -> Option<SampleWindow> {
        self.adaptive.as_ref().map(|a| a.window)
    }

    pub(crate) fn rejections(&self) -> u64 {
        self.rejections.load(Ordering::Relaxed)
    }
}

impl Adaptive {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One handle's share of [`SharedLimit::refs`]; the rest of the word counts permits.
const HANDLE: u64 = 1 << 32;
/// The permits in [`SharedLimit::refs`] (and the most that may be out at once).
const PERMITS: u64 = HANDLE - 1;

/// The limit and the word that counts its handles and permits.
struct Counted {
    /// High 32 bits: [`SharedLimit`] handles; low 32 bits: [`Permit`]s.
    refs: AtomicU64,
    limit: Limit,
}

/// A handle on one limit, shared by the layer, its services and their clones, as
/// `Arc<Limit>` would be (see the [module docs](self)).
pub(crate) struct SharedLimit {
    counted: NonNull<Counted>,
}

// SAFETY: a `SharedLimit` only hands out `&Limit`, and `Limit` is `Send + Sync` (all
// atomics and a mutex), as `Arc<Limit>` would be.
unsafe impl Send for SharedLimit {}
unsafe impl Sync for SharedLimit {}

impl SharedLimit {
    fn new(limit: Limit) -> SharedLimit {
        let counted = Box::new(Counted {
            refs: AtomicU64::new(HANDLE),
            limit,
        });
        SharedLimit {
            counted: NonNull::from(Box::leak(counted)),
        }
    }

    fn counted(&self) -> &Counted {
        // SAFETY: this handle is counted in `refs`, so the allocation lives.
        unsafe { self.counted.as_ref() }
    }

    /// A permit if fewer than the current limit are out; otherwise counts a rejection.
    ///
    /// A compare-and-swap loop rather than `fetch_add` and undo, so the count never
    /// exceeds the limit read at admission, not even for an instant:
    /// [`in_flight`](Self::in_flight) is always a count of admitted calls. When an
    /// adaptive limit shrinks below the calls in flight, those finish; new calls are
    /// rejected until fewer than the new limit are in flight.
    #[inline]
    pub(crate) fn try_acquire(&self) -> Option<Permit> {
        let counted = self.counted();
        let limit = &counted.limit;
        // At most `PERMITS` out, whatever the limit: the count must not reach the
        // handles' bits.
        let cap = (limit.current.load(Ordering::Relaxed) as u64).min(PERMITS);
        let mut refs = counted.refs.load(Ordering::Relaxed);
        loop {
            let in_flight = refs & PERMITS;
            if in_flight >= cap {
                limit.rejections.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            // Acquire pairs with the Release of `Permit::drop`: what a finished call did
            // happens before the call admitted in its slot.
            match counted.refs.compare_exchange_weak(
                refs,
                refs + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(Permit {
                        counted: self.counted,
                        sample: limit
                            .adaptive
                            .as_ref()
                            .map(|a| (a.clock.now(), in_flight as usize + 1)),
                    })
                }
                Err(actual) => refs = actual,
            }
        }
    }

    /// Calls in flight now.
    pub(crate) fn in_flight(&self) -> usize {
        (self.counted().refs.load(Ordering::Relaxed) & PERMITS) as usize
    }
}

impl Deref for SharedLimit {
    type Target = Limit;

    fn deref(&self) -> &Limit {
        &self.counted().limit
    }
}

impl Clone for SharedLimit {
    fn clone(&self) -> SharedLimit {
        // Relaxed, as `Arc::clone`: a new handle is made from a live one.
        let old = self.counted().refs.fetch_add(HANDLE, Ordering::Relaxed);
        // 2^31 handles at once can only be a leak; abort, as `Arc` does on overflow,
        // rather than wrap the count.
        if old >= u64::MAX / 2 {
            std::process::abort();
        }
        SharedLimit {
            counted: self.counted,
        }
    }
}

impl Drop for SharedLimit {
    fn drop(&mut self) {
        // SAFETY: this handle's share is given up here, once.
        unsafe { release(self.counted, HANDLE) }
    }
}

impl fmt::Debug for SharedLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limit")
            .field("min", &self.min)
            .field("max", &self.max)
            .field("limit", &self.limit())
            .field("adaptive", &self.algorithm())
            .field("in_flight", &self.in_flight())
            .field("rejections", &self.rejections())
            .finish()
    }
}

/// Gives up `share` of `counted`'s word (a handle or a permit); the last one frees it.
///
/// # Safety
/// `share` must be a share the caller holds and gives up with this call.
unsafe fn release(counted: NonNull<Counted>, share: u64) {
    // SAFETY: the caller's share keeps the allocation alive until this subtraction.
    let refs = unsafe { &counted.as_ref().refs };
    // Release, then Acquire before freeing, as `Arc`'s drop: every use of the limit by
    // any holder happens before it is freed.
    if refs.fetch_sub(share, Ordering::Release) == share {
        fence(Ordering::Acquire);
        // SAFETY: the word was `share`, now 0: no handle and no permit is left, and
        // the allocation came from `Box::leak` in `SharedLimit::new`.
        drop(unsafe { Box::from_raw(counted.as_ptr()) });
    }
}

/// One admitted call's slot; dropping it frees the slot. It keeps the limit alive,
/// as a handle does.
pub(crate) struct Permit {
    counted: NonNull<Counted>,
    /// For an adaptive limit until the call is sampled: when it was admitted, and the
    /// calls in flight with it.
    sample: Option<(u64, usize)>,
}

// SAFETY: as for `SharedLimit`: a permit only reaches `&Limit`, which is `Sync`.
unsafe impl Send for Permit {}
unsafe impl Sync for Permit {}

impl Permit {
    /// The call's response is ready: `dropped` if it counts as a drop. Feeds its latency
    /// to an adaptive limit (once; later calls do nothing). The slot stays taken.
    #[inline]
    pub(crate) fn complete(&mut self, dropped: bool) {
        if let Some((start, in_flight)) = self.sample.take() {
            // SAFETY: this permit is counted in `refs`, so the allocation lives.
            let limit = unsafe { &self.counted.as_ref().limit };
            limit.record(start, in_flight, dropped);
        }
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: this permit's share is given up here, once.
        unsafe { release(self.counted, 1) }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_count_and_free() {
        let limit = Limit::try_new(2).unwrap();
        let a = limit.try_acquire().unwrap();
        let b = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none());
        assert_eq!((limit.in_flight(), limit.rejections()), (2, 1));
        drop(a);
        assert_eq!(limit.in_flight(), 1);
        let _c = limit.try_acquire().unwrap();
        drop(b);
        assert_eq!(limit.in_flight(), 1);
        assert!(Limit::try_new(0).is_err());
    }

    #[test]
    fn the_last_of_handles_and_permits_frees_the_limit() {
        // Permits outliving every handle, and handles outliving every permit, dropped
        // from several threads: a double free or a use after free here is what
        // valgrind (or a crash) shows.
        for permits_last in [false, true] {
            let limit = Limit::try_new(1000).unwrap();
            let handles: Vec<Held> = (0..8).map(|_| Held::Handle(limit.clone())).collect();
            let permits: Vec<Held> = (0..64)
                .map(|_| Held::Permit(limit.try_acquire().unwrap()))
                .collect();
            assert_eq!(limit.in_flight(), 64);
            drop(limit);
            let (first, second) = if permits_last {
                (handles, permits)
            } else {
                (permits, handles)
            };
            for mut group in [first, second] {
                std::thread::scope(|s| {
                    while !group.is_empty() {
                        let part: Vec<Held> = group.drain(..group.len().min(9)).collect();
                        s.spawn(move || drop(part));
                    }
                });
            }
        }
    }

    /// Something that holds a share of a limit.
    #[allow(dead_code)] // held only to be dropped
    enum Held {
        Handle(SharedLimit),
        Permit(Permit),
    }

    #[test]
    fn permits_are_capped_below_the_handles_bits() {
        let limit = Limit::try_new(usize::MAX).unwrap();
        let refs = &limit.counted().refs;
        // As if `PERMITS - 1` calls were in flight.
        refs.fetch_add(PERMITS - 1, Ordering::Relaxed);
        let last = limit.try_acquire().unwrap();
        assert!(
            limit.try_acquire().is_none(),
            "the count must not reach the handles' bits"
        );
        drop(last);
        refs.fetch_sub(PERMITS - 1, Ordering::Relaxed);
        assert_eq!(limit.in_flight(), 0);
    }
}
