//! The shared state of one limit: the in-flight count, its permits and, for an adaptive
//! limit, the algorithm that moves the limit.

use std::{
    fmt,
    sync::{
        atomic::{AtomicBool, AtomicIsize, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
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
    in_flight: AtomicUsize,
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
    pub(crate) fn try_new(max: usize) -> Result<Arc<Limit>, InvalidConcurrencyLimit> {
        if max == 0 {
            return Err(InvalidConcurrencyLimit::new(
                max,
                "the maximum must be at least 1",
            ));
        }
        Ok(Arc::new(Limit {
            min: max,
            max,
            current: AtomicUsize::new(max),
            in_flight: AtomicUsize::new(0),
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
    ) -> Arc<Limit> {
        let timeout_nanos = match algorithm {
            Algorithm::Aimd(a) => Some(u64::try_from(a.timeout().as_nanos()).unwrap_or(u64::MAX)),
            Algorithm::Gradient2(_) => None,
        };
        Arc::new(Limit {
            min,
            max,
            current: AtomicUsize::new(initial),
            in_flight: AtomicUsize::new(0),
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

    /// A permit if fewer than the current limit are out; otherwise counts a rejection.
    ///
    /// A compare-and-swap loop rather than `fetch_add` and undo, so the count never
    /// exceeds the limit read at admission, not even for an instant:
    /// [`in_flight`](Limit::in_flight) is always a count of admitted calls. When an
    /// adaptive limit shrinks below the calls in flight, those finish; new calls are
    /// rejected until fewer than the new limit are in flight.
    #[inline]
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut n = self.in_flight.load(Ordering::Relaxed);
        loop {
            if n >= self.current.load(Ordering::Relaxed) {
                self.rejections.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            // Acquire pairs with the Release of `Permit::drop`: what a finished call did
            // happens before the call admitted in its slot.
            match self.in_flight.compare_exchange_weak(
                n,
                n + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(Permit {
                        limit: Arc::clone(self),
                        sample: self.adaptive.as_ref().map(|a| (a.clock.now(), n + 1)),
                    })
                }
                Err(actual) => n = actual,
            }
        }
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

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
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

impl fmt::Debug for Limit {
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

/// One admitted call's slot; dropping it frees the slot.
pub(crate) struct Permit {
    limit: Arc<Limit>,
    /// For an adaptive limit until the call is sampled: when it was admitted, and the
    /// calls in flight with it.
    sample: Option<(u64, usize)>,
}

impl Permit {
    /// The call's response is ready: `dropped` if it counts as a drop. Feeds its latency
    /// to an adaptive limit (once; later calls do nothing). The slot stays taken.
    #[inline]
    pub(crate) fn complete(&mut self, dropped: bool) {
        if let Some((start, in_flight)) = self.sample.take() {
            self.limit.record(start, in_flight, dropped);
        }
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        self.limit.in_flight.fetch_sub(1, Ordering::Release);
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
}
