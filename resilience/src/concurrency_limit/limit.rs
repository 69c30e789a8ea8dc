//! The shared state of one limit: the in-flight count and its permits.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
};

use super::error::InvalidConcurrencyLimit;

/// The state every service made by one layer shares: created when the layer is built.
pub(crate) struct Limit {
    max: usize,
    in_flight: AtomicUsize,
    rejections: AtomicU64,
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
            max,
            in_flight: AtomicUsize::new(0),
            rejections: AtomicU64::new(0),
        }))
    }

    /// A permit if fewer than `max` are out; otherwise counts a rejection.
    ///
    /// A compare-and-swap loop rather than `fetch_add` and undo, so the count never
    /// exceeds `max`, not even for an instant: [`in_flight`](Limit::in_flight) is always
    /// a count of admitted calls.
    #[inline]
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut n = self.in_flight.load(Ordering::Relaxed);
        loop {
            if n >= self.max {
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
                    })
                }
                Err(actual) => n = actual,
            }
        }
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn rejections(&self) -> u64 {
        self.rejections.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limit")
            .field("max", &self.max)
            .field("in_flight", &self.in_flight())
            .field("rejections", &self.rejections())
            .finish()
    }
}

/// One admitted call's slot; dropping it frees the slot.
pub(crate) struct Permit {
    limit: Arc<Limit>,
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
