//! The adaptive limit: its algorithms ([`Aimd`], [`Gradient2`]), their configuration,
//! the sample window and the [`AdaptiveLimitBuilder`].

use std::{fmt, sync::Arc, time::Duration};

use super::{
    error::InvalidAdaptiveLimit,
    layer::{ConcurrencyLimitLayer, DEFAULT_RETRY_AFTER},
    limit::Limit,
};

/// A change hook: called with `(old, new)` each time the limit changes.
pub(crate) type Hook = Arc<dyn Fn(usize, usize) + Send + Sync>;

// ---------------------------------------------------------------------------------------
// AIMD

/// Additive increase, multiplicative decrease: the limit grows by 1 after each window
/// without overload and shrinks to `limit × backoff_ratio` (rounded down) after a window
/// with one.
///
/// A window is *overloaded* when one of its samples was a drop: the inner service
/// returned `Err` (in HTTP mode also a `5xx` response), or the call took longer than
/// [`timeout`](Self::timeout). A window without overload grows the limit only if the
/// limit was in use: its most calls in flight were at least half the limit (otherwise a
/// quiet service would ratchet its limit up to `max` for nothing).
///
/// Defaults: `backoff_ratio` [`0.9`](Aimd::DEFAULT_BACKOFF_RATIO), `timeout`
/// [`5 s`](Aimd::DEFAULT_TIMEOUT), as in Netflix's `AIMDLimit`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Aimd {
    backoff_ratio: f64,
    timeout: Duration,
}

impl Aimd {
    /// The default `backoff_ratio`: 0.9.
    pub const DEFAULT_BACKOFF_RATIO: f64 = 0.9;
    /// The default `timeout`: 5 s.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// A builder with the defaults.
    pub fn builder() -> AimdBuilder {
        AimdBuilder {
            aimd: Aimd::default(),
        }
    }

    /// The factor applied to the limit after an overloaded window.
    pub fn backoff_ratio(&self) -> f64 {
        self.backoff_ratio
    }

    /// The latency over which a sample counts as a drop.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl Default for Aimd {
    fn default() -> Self {
        Aimd {
            backoff_ratio: Aimd::DEFAULT_BACKOFF_RATIO,
            timeout: Aimd::DEFAULT_TIMEOUT,
        }
    }
}

/// Builder of [`Aimd`], from [`Aimd::builder`].
#[derive(Clone, Copy, Debug)]
pub struct AimdBuilder {
    aimd: Aimd,
}

impl AimdBuilder {
    /// The factor applied to the limit after an overloaded window; in `(0, 1)`.
    pub fn backoff_ratio(mut self, backoff_ratio: f64) -> Self {
        self.aimd.backoff_ratio = backoff_ratio;
        self
    }

    /// The latency over which a sample counts as a drop; more than 0.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.aimd.timeout = timeout;
        self
    }

    /// The algorithm.
    ///
    /// # Panics
    ///
    /// When `backoff_ratio` is not in `(0, 1)` or `timeout` is 0. Use
    /// [`try_build`](Self::try_build) for values read at run time.
    #[track_caller]
    pub fn build(self) -> Aimd {
        self.try_build().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`build`](Self::build), but returns an error instead of panicking.
    pub fn try_build(self) -> Result<Aimd, InvalidAdaptiveLimit> {
        let a = self.aimd;
        if !(a.backoff_ratio > 0.0 && a.backoff_ratio < 1.0) {
            return Err(InvalidAdaptiveLimit::new(
                "the backoff ratio must be in (0, 1)",
            ));
        }
        if a.timeout.is_zero() {
            return Err(InvalidAdaptiveLimit::new("the timeout must be more than 0"));
        }
        Ok(a)
    }
}

// ---------------------------------------------------------------------------------------
// Gradient2

/// The headroom a [`Gradient2`] limit adds on each update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum QueueSize {
    /// `√limit` (the default): more headroom for larger limits.
    #[default]
    Sqrt,
    /// A fixed number of calls.
    Fixed(usize),
}

impl QueueSize {
    fn of(self, limit: f64) -> f64 {
        match self {
            QueueSize::Sqrt => limit.sqrt(),
            QueueSize::Fixed(n) => n as f64,
        }
    }
}

/// Netflix's `Gradient2Limit`: the limit follows the ratio of a long-term to a
/// short-term latency.
///
/// After each window, with `short` the window's mean latency and `long` an exponential
/// moving average of the `short`s over [`long_window`](Self::long_window) windows (a
/// plain mean for its first 10):
///
/// ```text
/// if long / short > 2 { long = long × 0.95 }        // latency fell: forget faster
/// if max_in_flight < limit / 2 { no change }        // the limit is not in use
/// gradient  = clamp(rtt_tolerance × long / short, 0.5, 1.0)
/// new_limit = limit × gradient + queue_size(limit)  // queue_size: √limit by default
/// limit     = limit × (1 − smoothing) + new_limit × smoothing
/// limit     = clamp(limit, min, max)
/// ```
///
/// The limit is kept as a real number; the one admissions use is its integer part. So
/// while latency stays near its long-term level the limit grows by about
/// `smoothing × queue_size` per window, and when latency rises above
/// `rtt_tolerance × long` it shrinks, by up to half of `smoothing` per window. Drops
/// (errors) do not enter: this algorithm only reads latency.
///
/// Defaults: `smoothing` 0.2, `rtt_tolerance` 1.5, `long_window` 600, `queue_size`
/// [`QueueSize::Sqrt`], as in Netflix's (which has a fixed queue size of 4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gradient2 {
    smoothing: f64,
    rtt_tolerance: f64,
    long_window: usize,
    queue_size: QueueSize,
}

impl Gradient2 {
    /// The default `smoothing`: 0.2.
    pub const DEFAULT_SMOOTHING: f64 = 0.2;
    /// The default `rtt_tolerance`: 1.5.
    pub const DEFAULT_RTT_TOLERANCE: f64 = 1.5;
    /// The default `long_window`: 600 windows.
    pub const DEFAULT_LONG_WINDOW: usize = 600;

    /// A builder with the defaults.
    pub fn builder() -> Gradient2Builder {
        Gradient2Builder {
            gradient2: Gradient2::default(),
        }
    }

    /// How much of each new estimate enters the limit, in `(0, 1]`.
    pub fn smoothing(&self) -> f64 {
        self.smoothing
    }

    /// How much above the long-term latency the short-term one may go before the limit
    /// shrinks; at least 1.
    pub fn rtt_tolerance(&self) -> f64 {
        self.rtt_tolerance
    }

    /// The windows the long-term latency averages over.
    pub fn long_window(&self) -> usize {
        self.long_window
    }

    /// The headroom added on each update.
    pub fn queue_size(&self) -> QueueSize {
        self.queue_size
    }
}

impl Default for Gradient2 {
    fn default() -> Self {
        Gradient2 {
            smoothing: Gradient2::DEFAULT_SMOOTHING,
            rtt_tolerance: Gradient2::DEFAULT_RTT_TOLERANCE,
            long_window: Gradient2::DEFAULT_LONG_WINDOW,
            queue_size: QueueSize::Sqrt,
        }
    }
}

/// Builder of [`Gradient2`], from [`Gradient2::builder`].
#[derive(Clone, Copy, Debug)]
pub struct Gradient2Builder {
    gradient2: Gradient2,
}

impl Gradient2Builder {
    /// How much of each new estimate enters the limit; in `(0, 1]`.
    pub fn smoothing(mut self, smoothing: f64) -> Self {
        self.gradient2.smoothing = smoothing;
        self
    }

    /// How much above the long-term latency the short-term one may go before the limit
    /// shrinks; at least 1.
    pub fn rtt_tolerance(mut self, rtt_tolerance: f64) -> Self {
        self.gradient2.rtt_tolerance = rtt_tolerance;
        self
    }

    /// The windows the long-term latency averages over; at least 1.
    pub fn long_window(mut self, long_window: usize) -> Self {
        self.gradient2.long_window = long_window;
        self
    }

    /// The headroom added on each update.
    pub fn queue_size(mut self, queue_size: QueueSize) -> Self {
        self.gradient2.queue_size = queue_size;
        self
    }

    /// The algorithm.
    ///
    /// # Panics
    ///
    /// When `smoothing` is not in `(0, 1]`, `rtt_tolerance` is below 1 (or not finite),
    /// or `long_window` is 0. Use [`try_build`](Self::try_build) for values read at run
    /// time.
    #[track_caller]
    pub fn build(self) -> Gradient2 {
        self.try_build().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`build`](Self::build), but returns an error instead of panicking.
    pub fn try_build(self) -> Result<Gradient2, InvalidAdaptiveLimit> {
        let g = self.gradient2;
        if !(g.smoothing > 0.0 && g.smoothing <= 1.0) {
            return Err(InvalidAdaptiveLimit::new("the smoothing must be in (0, 1]"));
        }
        if !(g.rtt_tolerance >= 1.0 && g.rtt_tolerance.is_finite()) {
            return Err(InvalidAdaptiveLimit::new(
                "the RTT tolerance must be at least 1",
            ));
        }
        if g.long_window == 0 {
            return Err(InvalidAdaptiveLimit::new(
                "the long window must be at least 1",
            ));
        }
        Ok(g)
    }
}

// ---------------------------------------------------------------------------------------
// Algorithm, window

/// The algorithm of an adaptive limit: [`Aimd`] or [`Gradient2`] (both convert into
/// it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Algorithm {
    /// Additive increase, multiplicative decrease.
    Aimd(Aimd),
    /// Netflix's gradient algorithm, second version.
    Gradient2(Gradient2),
}

impl From<Aimd> for Algorithm {
    fn from(a: Aimd) -> Self {
        Algorithm::Aimd(a)
    }
}

impl From<Gradient2> for Algorithm {
    fn from(g: Gradient2) -> Self {
        Algorithm::Gradient2(g)
    }
}

/// How many latency samples make one update of an adaptive limit.
///
/// A sample is one admitted call, from `call` to the completion of its response future
/// (a future dropped before completing gives none). The window is checked as each
/// sample arrives; no timer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleWindow {
    /// An update every `n` samples (the default: 10).
    Samples(usize),
    /// An update at the first sample that arrives at least this long after the
    /// window's first sample.
    Time(Duration),
}

impl Default for SampleWindow {
    fn default() -> Self {
        SampleWindow::Samples(10)
    }
}

// ---------------------------------------------------------------------------------------
// Builder

/// Builder of an adaptive [`ConcurrencyLimitLayer`], from
/// [`ConcurrencyLimitLayer::adaptive`].
///
/// Defaults: `min` 1, `max` 200, `initial` 20, `window`
/// [`SampleWindow::Samples(10)`](SampleWindow::Samples), no hook.
pub struct AdaptiveLimitBuilder {
    algorithm: Algorithm,
    min: usize,
    max: usize,
    initial: usize,
    window: SampleWindow,
    hook: Option<Hook>,
}

impl AdaptiveLimitBuilder {
    pub(crate) fn new(algorithm: Algorithm) -> Self {
        AdaptiveLimitBuilder {
            algorithm,
            min: 1,
            max: 200,
            initial: 20,
            window: SampleWindow::default(),
            hook: None,
        }
    }

    /// The lowest the limit goes; at least 1.
    pub fn min(mut self, min: usize) -> Self {
        self.min = min;
        self
    }

    /// The highest the limit goes; at least `min`.
    pub fn max(mut self, max: usize) -> Self {
        self.max = max;
        self
    }

    /// The limit before the first update; between `min` and `max`.
    pub fn initial(mut self, initial: usize) -> Self {
        self.initial = initial;
        self
    }

    /// The samples per update.
    pub fn window(mut self, window: SampleWindow) -> Self {
        self.window = window;
        self
    }

    /// Calls `hook(old, new)` each time the limit changes, to export it as a metric. It
    /// runs on the task that completed the window's last call, under the limit's lock:
    /// every change is seen, in order, each `old` the previous `new`. Keep it short; it
    /// may read the layer's getters.
    pub fn on_limit_change<F>(mut self, hook: F) -> Self
    where
        F: Fn(usize, usize) + Send + Sync + 'static,
    {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// The layer, in error mode, with `retry_after` = [`DEFAULT_RETRY_AFTER`].
    ///
    /// # Panics
    ///
    /// When `min` is 0, `max` is below `min`, `initial` is outside `min..=max`, or the
    /// window is `Samples(0)` or `Time(0)`. Use [`try_build`](Self::try_build) for values
    /// read at run time.
    #[track_caller]
    pub fn build(self) -> ConcurrencyLimitLayer {
        self.try_build().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`build`](Self::build), but returns an error instead of panicking.
    pub fn try_build(self) -> Result<ConcurrencyLimitLayer, InvalidAdaptiveLimit> {
        if self.min == 0 {
            return Err(InvalidAdaptiveLimit::new("the minimum must be at least 1"));
        }
        if self.max < self.min {
            return Err(InvalidAdaptiveLimit::new(
                "the maximum must be at least the minimum",
            ));
        }
        if !(self.min..=self.max).contains(&self.initial) {
            return Err(InvalidAdaptiveLimit::new(
                "the initial limit must be between the minimum and the maximum",
            ));
        }
        match self.window {
            SampleWindow::Samples(0) => {
                return Err(InvalidAdaptiveLimit::new(
                    "the window must be at least 1 sample",
                ))
            }
            SampleWindow::Time(d) if d.is_zero() => {
                return Err(InvalidAdaptiveLimit::new(
                    "the window must be longer than 0",
                ))
            }
            _ => {}
        }
        let limit = Limit::adaptive(
            self.algorithm,
            self.min,
            self.max,
            self.initial,
            self.window,
            self.hook,
        );
        Ok(ConcurrencyLimitLayer::from_limit(
            limit,
            DEFAULT_RETRY_AFTER,
        ))
    }
}

impl fmt::Debug for AdaptiveLimitBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveLimitBuilder")
            .field("algorithm", &self.algorithm)
            .field("min", &self.min)
            .field("max", &self.max)
            .field("initial", &self.initial)
            .field("window", &self.window)
            .field("on_limit_change", &self.hook.is_some())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------
// State

/// The mutable part of an adaptive limit, behind the limit's mutex: taken only when a
/// sample window closes (the samples themselves are added lock-free, in
/// [`Limit`](super::limit::Limit)).
pub(crate) struct State {
    algorithm: Algorithm,
    min: usize,
    max: usize,
    /// Gradient2's limit as a real number (AIMD keeps it whole).
    estimated: f64,
    /// Gradient2's long-term latency, in seconds, and the windows it has seen.
    long_rtt: f64,
    long_count: usize,
}

/// What one closed window saw.
pub(crate) struct WindowSummary {
    /// The mean latency of its samples, in seconds.
    pub(crate) mean_rtt: f64,
    /// Whether one of its samples was a drop.
    pub(crate) dropped: bool,
    /// Its most calls in flight.
    pub(crate) max_in_flight: usize,
}

impl State {
    pub(crate) fn new(algorithm: Algorithm, min: usize, max: usize, initial: usize) -> Self {
        State {
            algorithm,
            min,
            max,
            estimated: initial as f64,
            long_rtt: 0.0,
            long_count: 0,
        }
    }

    pub(crate) fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The new limit after a window that saw `w`, the limit being `limit`.
    pub(crate) fn update(&mut self, w: WindowSummary, limit: usize) -> usize {
        match self.algorithm {
            Algorithm::Aimd(a) => {
                let new = if w.dropped {
                    (limit as f64 * a.backoff_ratio) as usize
                } else if w.max_in_flight * 2 >= limit {
                    limit + 1
                } else {
                    limit
                };
                new.clamp(self.min, self.max)
            }
            Algorithm::Gradient2(g) => self.gradient2(g, w.mean_rtt, w.max_in_flight),
        }
    }

    fn gradient2(&mut self, g: Gradient2, short: f64, max_in_flight: usize) -> usize {
        // The long-term latency: a plain mean over the first 10 windows, then an EMA.
        self.long_count += 1;
        if self.long_count <= 10.min(g.long_window) {
            self.long_rtt += (short - self.long_rtt) / self.long_count as f64;
        } else {
            let factor = 2.0 / (g.long_window as f64 + 1.0);
            self.long_rtt = self.long_rtt * (1.0 - factor) + short * factor;
        }
        let long = self.long_rtt;
        if short > 0.0 && long / short > 2.0 {
            self.long_rtt *= 0.95;
        }
        let limit = self.estimated;
        if (max_in_flight as f64) >= limit / 2.0 {
            let gradient = if short > 0.0 {
                (g.rtt_tolerance * long / short).clamp(0.5, 1.0)
            } else {
                1.0
            };
            let new = limit * gradient + g.queue_size.of(limit);
            let new = limit * (1.0 - g.smoothing) + new * g.smoothing;
            self.estimated = new.clamp(self.min as f64, self.max as f64);
        }
        (self.estimated as usize).clamp(self.min, self.max)
    }
}
