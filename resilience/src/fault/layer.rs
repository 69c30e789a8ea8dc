//! [`FaultLayer`], its builder, and the seeded decisions its services share.

use std::{
    fmt,
    marker::PhantomData,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use http::StatusCode;
use rand::{rngs::SmallRng, Rng, SeedableRng};
use tower_layer::Layer;

use super::{
    error::{InjectedFault, InvalidFault},
    service::FaultService,
};
use crate::{
    mode::{ErrorMode, HttpMode},
    BoxError,
};

/// How long an injected delay lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Latency {
    /// Always this long.
    Fixed(Duration),
    /// Uniformly distributed between the two bounds, both included, to the
    /// nanosecond.
    Uniform {
        /// The shortest delay.
        min: Duration,
        /// The longest delay.
        max: Duration,
    },
}

impl Latency {
    /// A delay of exactly `d`.
    pub fn fixed(d: Duration) -> Latency {
        Latency::Fixed(d)
    }

    /// A delay drawn uniformly from `min..=max`. `min > max` is refused by
    /// [`FaultLayerBuilder::build`].
    pub fn uniform(min: Duration, max: Duration) -> Latency {
        Latency::Uniform { min, max }
    }

    fn sample(self, rng: &mut SmallRng) -> Duration {
        match self {
            Latency::Fixed(d) => d,
            Latency::Uniform { min, max } => {
                let (lo, hi) = (nanos(min), nanos(max));
                Duration::from_nanos(rng.random_range(lo..=hi))
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What one call gets: drawn in [`call`](tower_service::Service::call), in call order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Decision {
    /// The injected delay, zero for none.
    pub(crate) delay: Duration,
    /// Whether the call fails instead of reaching the inner service.
    pub(crate) fail: bool,
}

type ErrorFn = Arc<dyn Fn() -> BoxError + Send + Sync>;

/// The state every service of one layer shares: the generator, so the sequence of
/// decisions is one sequence whatever the clones, and the counters.
pub(crate) struct Faults {
    rng: Mutex<SmallRng>,
    config: Config,
    error: ErrorFn,
    calls: AtomicU64,
    errors: AtomicU64,
    delayed: AtomicU64,
}

#[derive(Clone, Copy, Debug)]
struct Config {
    seed: u64,
    error_rate: f64,
    latency: Option<Latency>,
    latency_rate: f64,
    status: StatusCode,
}

impl Faults {
    /// The next call's fate. Each call draws the same numbers in the same order (the
    /// latency roll, a latency if delayed, the error roll), so a seed fixes the whole
    /// sequence.
    pub(crate) fn decide(&self) -> Decision {
        let config = &self.config;
        if config.error_rate == 0.0 && config.latency.is_none() {
            // Nothing to inject (a layer left in place, switched off): no draw can
            // change the outcome, so skip the lock; the sequence stays the seed's.
            self.calls.fetch_add(1, Ordering::Relaxed);
            return Decision {
                delay: Duration::ZERO,
                fail: false,
            };
        }
        let decision = {
            // Nothing here can panic while the lock is held; a poisoned lock still holds
            // a valid generator.
            let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
            let delay = match config.latency {
                Some(latency) if rng.random::<f64>() < config.latency_rate => {
                    latency.sample(&mut rng)
                }
                _ => Duration::ZERO,
            };
            let fail = rng.random::<f64>() < config.error_rate;
            Decision { delay, fail }
        };
        self.calls.fetch_add(1, Ordering::Relaxed);
        if decision.fail {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if !decision.delay.is_zero() {
            self.delayed.fetch_add(1, Ordering::Relaxed);
        }
        decision
    }

    pub(crate) fn error(&self) -> BoxError {
        (self.error)()
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.config.status
    }
}

/// Counters of a [`FaultLayer`] since it was built, over all its services and clones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Calls decided.
    pub calls: u64,
    /// Calls failed on purpose (the error, or the HTTP status).
    pub errors: u64,
    /// Calls given a delay above zero.
    pub delayed: u64,
}

/// Builds a [`FaultLayer`]; get one from [`FaultLayer::builder`].
#[derive(Clone)]
#[must_use = "call .build() to get a FaultLayer"]
pub struct FaultLayerBuilder {
    config: Config,
    error: Option<ErrorFn>,
}

impl FaultLayerBuilder {
    /// The fraction of calls, from 0 to 1, that fail on purpose (default 0): with the
    /// [`error`](Self::error) in error mode, with the [`status`](Self::status) in HTTP
    /// mode. A failed call never reaches the inner service.
    pub fn error_rate(mut self, rate: f64) -> Self {
        self.config.error_rate = rate;
        self
    }

    /// Delays calls by `latency` (default: none), before they reach the inner service
    /// or fail. Every call, unless [`latency_rate`](Self::latency_rate) says otherwise.
    pub fn latency(mut self, latency: Latency) -> Self {
        self.config.latency = Some(latency);
        self
    }

    /// The fraction of calls, from 0 to 1, that get the [`latency`](Self::latency)
    /// (default 1: all of them).
    pub fn latency_rate(mut self, rate: f64) -> Self {
        self.config.latency_rate = rate;
        self
    }

    /// The error of a failed call in error mode (default [`InjectedFault`]), made
    /// afresh for each.
    pub fn error<F, E>(mut self, make: F) -> Self
    where
        F: Fn() -> E + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        self.error = Some(Arc::new(move || make().into()));
        self
    }

    /// The status of a failed call in HTTP mode (default `503 Service Unavailable`),
    /// with an empty body and `x-injected-fault: 1`.
    pub fn status(mut self, status: StatusCode) -> Self {
        self.config.status = status;
        self
    }

    /// Creates the generator and the layer, in [error mode](ErrorMode).
    ///
    /// # Panics
    ///
    /// When a rate is not within `0..=1` (NaN included), or a uniform latency has
    /// `min > max`. Use [`try_build`](Self::try_build) for values read at run time.
    #[track_caller]
    pub fn build(self) -> FaultLayer {
        match self.try_build() {
            Ok(layer) => layer,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`build`](Self::build), but returns an error instead of panicking.
    pub fn try_build(self) -> Result<FaultLayer, InvalidFault> {
        let config = self.config;
        for (name, rate) in [
            ("error_rate", config.error_rate),
            ("latency_rate", config.latency_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(InvalidFault::new(
                    format!("{name} {rate}"),
                    "a rate must be within 0..=1",
                ));
            }
        }
        if let Some(Latency::Uniform { min, max }) = config.latency {
            if min > max {
                return Err(InvalidFault::new(
                    format!("latency {min:?}..={max:?}"),
                    "the shortest latency must not be above the longest",
                ));
            }
        }
        let error = self
            .error
            .unwrap_or_else(|| Arc::new(|| Box::new(InjectedFault) as BoxError));
        Ok(FaultLayer {
            faults: Arc::new(Faults {
                rng: Mutex::new(SmallRng::seed_from_u64(config.seed)),
                config,
                error,
                calls: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                delayed: AtomicU64::new(0),
            }),
            _mode: PhantomData,
        })
    }
}

impl fmt::Debug for FaultLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultLayerBuilder")
            .field("config", &self.config)
            .field("error", &self.error.is_some())
            .finish()
    }
}

/// A [`Layer`] that injects errors and latency into a service, decided by a seeded
/// generator: the same seed and the same calls give the same faults, run after run
/// (on paused tokio time, the same timings too). For tests and chaos drills.
///
/// See the [module docs](super) for an example.
///
/// # Modes
///
/// | mode | set with | a failed call is | `Error` |
/// |---|---|---|---|
/// | [`ErrorMode`] | (the default) | `Err`, the [`error`](FaultLayerBuilder::error) ([`InjectedFault`] by default) | [`BoxError`] |
/// | [`HttpMode`] | [`.http()`](Self::http) | `Ok` response with the [`status`](FaultLayerBuilder::status) (503 by default) | the inner service's |
///
/// # Sharing
///
/// The generator is made by [`build`](FaultLayerBuilder::build) and shared by every
/// service the layer makes and their clones, behind a mutex taken for a few
/// nanoseconds per call: the calls draw from one sequence, in the order they are made.
/// `poll_ready` only forwards to the inner service; the decision is made in `call`.
pub struct FaultLayer<M = ErrorMode> {
    faults: Arc<Faults>,
    _mode: PhantomData<fn() -> M>,
}

impl FaultLayer {
    /// Starts building a layer whose generator is seeded with `seed`: no faults until
    /// [`error_rate`](FaultLayerBuilder::error_rate) or
    /// [`latency`](FaultLayerBuilder::latency) is set.
    pub fn builder(seed: u64) -> FaultLayerBuilder {
        FaultLayerBuilder {
            config: Config {
                seed,
                error_rate: 0.0,
                latency: None,
                latency_rate: 1.0,
                status: StatusCode::SERVICE_UNAVAILABLE,
            },
            error: None,
        }
    }
}

impl<M> FaultLayer<M> {
    /// HTTP mode, for services of `http::Request` to `http::Response`: a failed call
    /// is a response with the [`status`](FaultLayerBuilder::status), and the service
    /// keeps the inner error type. Keeps the generator.
    pub fn http(self) -> FaultLayer<HttpMode> {
        FaultLayer {
            faults: self.faults,
            _mode: PhantomData,
        }
    }

    /// The seed, as given to [`builder`](FaultLayer::builder).
    pub fn seed(&self) -> u64 {
        self.faults.config.seed
    }

    /// The error rate, as given to [`error_rate`](FaultLayerBuilder::error_rate).
    pub fn error_rate(&self) -> f64 {
        self.faults.config.error_rate
    }

    /// The latency, as given to [`latency`](FaultLayerBuilder::latency) (`None`: none).
    pub fn latency(&self) -> Option<Latency> {
        self.faults.config.latency
    }

    /// The latency rate, as given to [`latency_rate`](FaultLayerBuilder::latency_rate).
    pub fn latency_rate(&self) -> f64 {
        self.faults.config.latency_rate
    }

    /// The status of a failed call in HTTP mode, as given to
    /// [`status`](FaultLayerBuilder::status).
    pub fn status(&self) -> StatusCode {
        self.faults.config.status
    }

    /// What has been injected so far.
    pub fn stats(&self) -> FaultStats {
        let f = &self.faults;
        FaultStats {
            calls: f.calls.load(Ordering::Relaxed),
            errors: f.errors.load(Ordering::Relaxed),
            delayed: f.delayed.load(Ordering::Relaxed),
        }
    }
}

impl<S, M> Layer<S> for FaultLayer<M> {
    type Service = FaultService<S, M>;

    fn layer(&self, inner: S) -> Self::Service {
        FaultService::new(inner, self.faults.clone())
    }
}

impl<M> Clone for FaultLayer<M> {
    fn clone(&self) -> Self {
        FaultLayer {
            faults: self.faults.clone(),
            _mode: PhantomData,
        }
    }
}

impl<M> fmt::Debug for FaultLayer<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultLayer")
            .field("config", &self.faults.config)
            .field("stats", &self.stats())
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}
