//! The shared state of one limit: the in-flight count, its permits and, for an adaptive
//! limit, the algorithm that moves the limit.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{
    adaptive::{Algorithm, Hook, SampleWindow, State},
    error::InvalidConcurrencyLimit,
};

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

struct Adaptive {
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
        Arc::new(Limit {
            min,
            max,
            current: AtomicUsize::new(initial),
            in_flight: AtomicUsize::new(0),
            rejections: AtomicU64::new(0),
            adaptive: Some(Adaptive {
                state: Mutex::new(State::new(algorithm, min, max, initial, window)),
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
                        sample: self.adaptive.as_ref().map(|_| (Instant::now(), n + 1)),
                    })
                }
                Err(actual) => n = actual,
            }
        }
    }

    /// Feeds one sample to the algorithm; at the end of a window, moves the limit.
    fn record(&self, rtt: Duration, in_flight: usize, dropped: bool) {
        let Some(adaptive) = &self.adaptive else {
            return;
        };
        let mut state = adaptive.lock();
        let old = self.current.load(Ordering::Relaxed);
        if let Some(new) = state.sample(Instant::now(), rtt, in_flight, dropped, old) {
            if new != old {
                self.current.store(new, Ordering::Relaxed);
                if let Some(hook) = &adaptive.hook {
                    hook(old, new);
                }
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
        self.adaptive.as_ref().map(|a| a.lock().window())
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
    sample: Option<(Instant, usize)>,
}

impl Permit {
    /// The call's response is ready: `dropped` if it counts as a drop. Feeds its latency
    /// to an adaptive limit (once; later calls do nothing). The slot stays taken.
    #[inline]
    pub(crate) fn complete(&mut self, dropped: bool) {
        if let Some((start, in_flight)) = self.sample.take() {
            self.limit.record(start.elapsed(), in_flight, dropped);
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
