//! [`Rate`] and [`Burst`]: the two numbers of every token bucket, named at the call site.

use std::fmt;

use super::error::InvalidTokenBucket;

/// How fast tokens flow into a bucket, in tokens per second.
///
/// The unit is in the constructor's name, so a call site reads unambiguously:
/// `Rate::per_second(100.0)` is 100 tokens per second (where tower's
/// `RateLimitLayer::new(100, Duration::from_secs(60))` would be 100 per minute). Every
/// type of the crate that has a rate takes and returns this type: [`TokenBucket`],
/// [`KeyedTokenBuckets`] and [`TokenBucketLayer`].
///
/// Fractional rates are fine: `Rate::per_second(0.5)` is one token every two seconds.
/// Rates above 10^9 per second are served as 10^9 per second (one token per
/// nanosecond, the clock's resolution).
///
/// ```
/// use resilience::Rate;
///
/// let rate = Rate::per_second(2.5);
/// assert_eq!(rate.as_per_second(), 2.5);
/// assert_eq!(rate.to_string(), "2.5/s");
/// assert!(Rate::try_per_second(0.0).is_err());
/// ```
///
/// [`TokenBucket`]: crate::TokenBucket
/// [`KeyedTokenBuckets`]: crate::KeyedTokenBuckets
/// [`TokenBucketLayer`]: crate::TokenBucketLayer
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Rate(f64);

impl Rate {
    /// `tokens` per second.
    ///
    /// # Panics
    ///
    /// When `tokens` is not a finite number above 0 (NaN, infinite, zero, negative). Use
    /// [`try_per_second`](Rate::try_per_second) for a value read at run time.
    #[track_caller]
    pub fn per_second(tokens: f64) -> Rate {
        match Rate::try_per_second(tokens) {
            Ok(rate) => rate,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`per_second`](Rate::per_second), but returns an error instead of panicking.
    pub fn try_per_second(tokens: f64) -> Result<Rate, InvalidTokenBucket> {
        if tokens.is_finite() && tokens > 0.0 {
            Ok(Rate(tokens))
        } else {
            Err(InvalidTokenBucket::new(
                format!("rate {tokens}/s"),
                "the rate must be a finite number above 0",
            ))
        }
    }

    /// The rate in tokens per second, as given to [`per_second`](Rate::per_second).
    pub fn as_per_second(self) -> f64 {
        self.0
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", self.0)
    }
}

/// The most tokens a bucket holds: how many requests a full bucket lets through at
/// once, before the [`Rate`] paces them.
///
/// A newtype so that the number is named where it is passed:
/// `TokenBucket::new(Rate::per_second(100.0), Burst(60))`. It must be at least 1; the
/// constructors that take it panic on 0 (their `try_` twins return an error).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Burst(pub u32);

impl fmt::Display for Burst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
