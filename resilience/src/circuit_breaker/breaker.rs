//! The breaker itself: shared state, policies, permits, and the builder.

use std::{
    collections::VecDeque,
    fmt,
    future::Future,
    num::NonZeroU64,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{
    classify::{Classifier, ErrIsFailure},
    error::{BreakerError, CircuitOpen},
    layer::CircuitBreakerLayer,
};

/// The state of a circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls pass through; outcomes are counted against the trip policy.
    Closed,
    /// Calls are rejected with [`CircuitOpen`] until `open_for` has passed.
    Open,
    /// A limited number of trial calls pass; the rest are rejected. Enough successes
    /// close the breaker, one failure opens it again.
    HalfOpen,
    /// Opened by hand with [`CircuitBreaker::force_open`]: every call is rejected, with
    /// no timed way out, until [`force_closed`](CircuitBreaker::force_closed),
    /// [`disable`](CircuitBreaker::disable) or [`reset`](CircuitBreaker::reset).
    ForcedOpen,
    /// Switched off with [`CircuitBreaker::disable`]: every call is admitted and its
    /// outcome counted in the [stats](CircuitBreaker::stats), but nothing trips the
    /// breaker, until another control call.
    Disabled,
}

impl CircuitState {
    /// The state's name as used in logs and metrics: `closed`, `open`, `half_open`,
    /// `forced_open`, `disabled`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
            CircuitState::ForcedOpen => "forced_open",
            CircuitState::Disabled => "disabled",
        }
    }

    fn code(self) -> u64 {
        match self {
            CircuitState::Closed => CLOSED,
            CircuitState::Open => OPEN,
            CircuitState::HalfOpen => HALF_OPEN,
            CircuitState::ForcedOpen => FORCED_OPEN,
            CircuitState::Disabled => DISABLED,
        }
    }

    fn of_word(word: u64) -> Self {
        match word & STATE_MASK {
            CLOSED => CircuitState::Closed,
            OPEN => CircuitState::Open,
            HALF_OPEN => CircuitState::HalfOpen,
            FORCED_OPEN => CircuitState::ForcedOpen,
            _ => CircuitState::Disabled,
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The sliding window of the failure-rate policy
/// ([`CircuitBreakerBuilder::failure_rate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The last `n` calls (`n >= 1`).
    Count(usize),
    /// The calls that finished within the last `d` (`d > 0`). The window slides in
    /// steps of `d / 32`, so a call drops out between `31/32 d` and `d` after it
    /// finished; that keeps memory constant whatever the call rate.
    Time(Duration),
}

/// Counters of a breaker since it was built, for metrics. Read with
/// [`CircuitBreaker::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakerStats {
    /// Admitted calls (closed or half-open) that have finished: `successes + failures +`
    /// the calls cancelled before they reported. Calls still running are not counted yet;
    /// counting at the end keeps the per-call cost to one atomic increment.
    pub calls: u64,
    /// Admitted calls that finished and were classified as successes.
    pub successes: u64,
    /// Admitted calls that finished and were classified as failures (slow calls
    /// included).
    pub failures: u64,
    /// Calls rejected with [`CircuitOpen`] without running.
    pub rejections: u64,
    /// State transitions.
    pub transitions: u64,
}

/// A change of state, passed to the [`on_state_change`](CircuitBreakerBuilder::on_state_change)
/// hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transition {
    /// The state before.
    pub from: CircuitState,
    /// The state after.
    pub to: CircuitState,
}

type Hook = Arc<dyn Fn(Transition) + Send + Sync>;

// The state word packs `generation << STATE_BITS | state`. Every transition bumps the
// generation, so a permit remembers exactly which closed / half-open period admitted it
// and a late result from an earlier period cannot count against the current one.
const STATE_BITS: u32 = 3;
const STATE_MASK: u64 = (1 << STATE_BITS) - 1;
const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const FORCED_OPEN: u64 = 3;
const DISABLED: u64 = 4;
const COUNT_MASK: u64 = 0xffff_ffff;
const TIME_BUCKETS: u64 = 32;

/// Default number of consecutive failures that trip the breaker.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// Default time the breaker stays open before it turns half-open.
pub const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(5);
/// Default number of half-open trial calls (and successes needed to close).
pub const DEFAULT_HALF_OPEN_CALLS: u32 = 1;

#[derive(Clone, Copy, Debug)]
struct RatePolicy {
    percent: f64,
    window: Window,
    min_calls: usize,
}

#[derive(Clone, Debug)]
struct Config {
    consecutive: Option<u32>,
    rate: Option<RatePolicy>,
    slow_call: Option<Duration>,
    open_for: Duration,
    growth: Option<(f64, Duration)>,
    half_open_calls: u32,
    max_wait_in_half_open: Option<Duration>,
}

/// A circuit breaker: stops calling a dependency that keeps failing, and probes it again
/// after a while.
///
/// Cloning is cheap and every clone shares one state (there is an `Arc` inside): clone it
/// into every task, service and layer that guards the same dependency. See the
/// [module docs](super) for the policies and a complete example.
///
/// # Concurrency
///
/// The closed-state fast path is lock-free: admitting a call is one atomic load of the
/// state word (plus the `Arc` clone the permit holds), and recording a success under the
/// consecutive-failures policy is one relaxed counter increment and an atomic load (plus
/// one compare-and-swap when it resets a non-zero failure count). A mutex is taken only
///
/// * for state transitions, and for admitting and recording half-open trial calls (rare
///   by construction), and
/// * by the failure-rate policy, to update its sliding window when a call finishes
///   (a short critical section: a ring-buffer push and a comparison).
///
/// The open state rejects without the lock until `open_for` has passed. The
/// state-change hook runs after the mutex is released.
#[derive(Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

/// Keeps `T` on a cache line of its own, so that counters written on every call do not
/// evict the read-mostly state word from other cores' caches.
#[repr(align(64))]
#[derive(Default)]
struct CacheLine<T>(T);

#[derive(Default)]
struct Counters {
    /// Admitted calls dropped without a report (and not slow).
    cancelled: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    rejections: AtomicU64,
    transitions: AtomicU64,
}

struct Inner {
    /// `generation << STATE_BITS | state`; written only with `shared` locked.
    state: CacheLine<AtomicU64>,
    /// `(generation as u32) << 32 | consecutive failures` of the current closed period.
    consecutive: AtomicU64,
    /// When the current open period ends, in nanoseconds since `epoch`.
    open_until: AtomicU64,
    /// When the current half-open period gives up on its trials and reopens, in
    /// nanoseconds since `epoch` (`u64::MAX` without `max_wait_in_half_open`).
    half_open_until: AtomicU64,
    counters: CacheLine<Counters>,
    shared: Mutex<Shared>,
    config: Config,
    epoch: Instant,
    hook: Option<Hook>,
}

/// State that only changes with the mutex held.
struct Shared {
    /// Trips since the breaker was last closed, for `open_for` growth.
    trips: u32,
    half_open_admitted: u32,
    half_open_successes: u32,
    window: Option<RateWindow>,
}

impl CircuitBreaker {
    /// A breaker with the default policy: trips after 5 consecutive failures, stays open
    /// 5 s, then admits 1 trial call.
    pub fn new() -> Self {
        CircuitBreakerBuilder::new().build()
    }

    /// Starts configuring a breaker.
    pub fn builder() -> CircuitBreakerBuilder {
        CircuitBreakerBuilder::new()
    }

    /// A layer that puts this breaker in front of a tower service (error mode, the
    /// mode's classifier). Same as [`CircuitBreakerLayer::new`].
    pub fn layer(&self) -> CircuitBreakerLayer {
        CircuitBreakerLayer::new(self.clone())
    }

    /// The current state.
    ///
    /// An open breaker whose `open_for` has passed reports (and becomes) half-open here,
    /// even before the next call arrives; so does a half-open one past
    /// [`max_wait_in_half_open`](CircuitBreakerBuilder::max_wait_in_half_open) reopen.
    pub fn state(&self) -> CircuitState {
        let inner = &*self.inner;
        let word = inner.state.0.load(Ordering::Acquire);
        let state = word & STATE_MASK;
        if state == HALF_OPEN || state == OPEN {
            let now = inner.now_nanos();
            if state == HALF_OPEN {
                inner.expire_half_open(now);
            }
            // A breaker reopened by `max_wait_in_half_open` is dated at the deadline, so
            // its `open_for` may be over too if nobody looked for that long.
            inner.expire_open(now);
        }
        CircuitState::of_word(inner.state.0.load(Ordering::Acquire))
    }

    /// The state as stored, without making a due transition (and so without running
    /// the hook): for the keyed breakers' eviction, which holds a lock of its own.
    pub(crate) fn stored_state(&self) -> CircuitState {
        CircuitState::of_word(self.inner.state.0.load(Ordering::Acquire))
    }

    /// Opens the breaker by hand and keeps it open: every call is rejected (with
    /// `retry_after` = `open_for`, a hint, as there is no timed way out) until
    /// [`force_closed`](Self::force_closed), [`disable`](Self::disable) or
    /// [`reset`](Self::reset). For an operator taking a dependency out of service.
    ///
    /// Like every control call it is a transition (to
    /// [`ForcedOpen`](CircuitState::ForcedOpen)), even from the state it is in: the
    /// [`on_state_change`](CircuitBreakerBuilder::on_state_change) hook runs and
    /// [`BreakerStats::transitions`] counts it, and calls admitted before it no longer
    /// count against any state.
    ///
    /// ```
    /// use resilience::{CircuitBreaker, CircuitState};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let breaker = CircuitBreaker::new();
    /// breaker.force_open();
    /// assert_eq!(breaker.state(), CircuitState::ForcedOpen);
    /// assert!(breaker.try_acquire().is_err());
    /// breaker.force_closed();
    /// assert!(breaker.try_acquire().is_ok());
    /// breaker.disable(); // admits everything, still counts
    /// assert_eq!(breaker.state(), CircuitState::Disabled);
    /// breaker.reset();
    /// assert_eq!(breaker.state(), CircuitState::Closed);
    /// assert_eq!(breaker.stats().transitions, 4);
    /// # }
    /// ```
    pub fn force_open(&self) {
        self.inner.control(CircuitState::ForcedOpen, false);
    }

    /// Closes the breaker by hand, from any state: the trip policy runs again from no
    /// failures (an empty failure-rate window). Unlike [`reset`](Self::reset) it keeps
    /// the [`open_for_growth`](CircuitBreakerBuilder::open_for_growth) of the trips so
    /// far, since a hand-made close shows nothing about the dependency: if it trips
    /// again at once, it stays open as long as the next trip in a row would have.
    /// A transition, as [`force_open`](Self::force_open) describes.
    pub fn force_closed(&self) {
        self.inner.control(CircuitState::Closed, false);
    }

    /// Switches the breaker off: every call is admitted, and its outcome is still
    /// counted in the [stats](Self::stats), but nothing trips it, until another control
    /// call. For watching what a policy would do, or for an incident where failing fast
    /// is worse than failing slowly. A transition (to
    /// [`Disabled`](CircuitState::Disabled)), as [`force_open`](Self::force_open)
    /// describes.
    pub fn disable(&self) {
        self.inner.control(CircuitState::Disabled, false);
    }

    /// Puts the breaker back as it was built: closed, no failures counted, no
    /// `open_for` growth. The [stats](Self::stats) are counters since the breaker was
    /// built and keep counting (a metric must not go backwards). A transition (to
    /// [`Closed`](CircuitState::Closed)), as [`force_open`](Self::force_open)
    /// describes.
    pub fn reset(&self) {
        self.inner.control(CircuitState::Closed, true);
    }

    /// The counters since the breaker was built. Each counter is exact; the five are
    /// read one after the other, not as one atomic snapshot.
    pub fn stats(&self) -> BreakerStats {
        let c = &self.inner.counters.0;
        let successes = c.successes.load(Ordering::Relaxed);
        let failures = c.failures.load(Ordering::Relaxed);
        let cancelled = c.cancelled.load(Ordering::Relaxed);
        BreakerStats {
            calls: successes + failures + cancelled,
            successes,
            failures,
            rejections: c.rejections.load(Ordering::Relaxed),
            transitions: c.transitions.load(Ordering::Relaxed),
        }
    }

    /// Asks to make one call.
    ///
    /// `Ok(permit)`: make the call, then report its outcome with
    /// [`BreakerPermit::success`], [`BreakerPermit::failure`] or
    /// [`BreakerPermit::record`]. `Err(CircuitOpen)`: do not make the call.
    ///
    /// This is the low-level interface the layer and [`call`](Self::call) are built on;
    /// use it to guard code that is neither a tower service nor a single future.
    #[inline]
    pub fn try_acquire(&self) -> Result<BreakerPermit, CircuitOpen> {
        let word = self.inner.state.0.load(Ordering::Acquire);
        if word & STATE_MASK == CLOSED {
            return Ok(self.permit(word));
        }
        self.acquire_slow(word)
    }

    /// Whether anything besides its owner holds this breaker: a clone, or the permit of
    /// a call in flight. What the keyed breakers' eviction calls "in use".
    pub(crate) fn in_use(&self) -> bool {
        Arc::strong_count(&self.inner) > 1
    }

    #[inline]
    fn permit(&self, word: u64) -> BreakerPermit {
        BreakerPermit {
            start: match self.inner.config.slow_call {
                Some(_) => self.inner.start_stamp(),
                None => None,
            },
            inner: Some(self.inner.clone()),
            word,
        }
    }

    #[inline(never)]
    fn acquire_slow(&self, mut word: u64) -> Result<BreakerPermit, CircuitOpen> {
        let inner = &*self.inner;
        match word & STATE_MASK {
            DISABLED => return Ok(self.permit(word)),
            FORCED_OPEN => return Err(inner.reject(inner.config.open_for)),
            _ => {}
        }
        let mut now = None;
        if word & STATE_MASK == HALF_OPEN {
            // Reopen first if the trials have had their `max_wait_in_half_open`: the open
            // period that follows may itself be over, which the branch below handles.
            let t = inner.now_nanos();
            if t >= inner.half_open_until.load(Ordering::Relaxed) {
                inner.expire_half_open(t);
                word = inner.state.0.load(Ordering::Acquire);
            }
            now = Some(t);
        }
        if word & STATE_MASK == OPEN {
            let t = now.unwrap_or_else(|| inner.now_nanos());
            let until = inner.open_until.load(Ordering::Relaxed);
            if t < until {
                return Err(inner.reject(Duration::from_nanos(until - t)));
            }
            now = Some(t);
        }
        let mut transition = None;
        let admitted = {
            let mut shared = inner.lock();
            let word = inner.state.0.load(Ordering::Acquire);
            match word & STATE_MASK {
                CLOSED | DISABLED => Ok(word),
                FORCED_OPEN => Err(inner.config.open_for),
                OPEN => {
                    let t = now.unwrap_or_else(|| inner.now_nanos());
                    let until = inner.open_until.load(Ordering::Relaxed);
                    if t < until {
                        Err(Duration::from_nanos(until - t))
                    } else {
                        transition =
                            Some(inner.transition(&mut shared, word, CircuitState::HalfOpen, t));
                        let word = inner.state.0.load(Ordering::Relaxed);
                        inner.admit_half_open(&mut shared, word)
                    }
                }
                _ => {
                    let t = now.unwrap_or_else(|| inner.now_nanos());
                    let deadline = inner.half_open_until.load(Ordering::Relaxed);
                    if t >= deadline {
                        // The deadline passed since the check above, in a race: the
                        // trials never reported, give up on them and reopen.
                        transition =
                            Some(inner.transition(&mut shared, word, CircuitState::Open, deadline));
                        let until = inner.open_until.load(Ordering::Relaxed);
                        Err(Duration::from_nanos(until.saturating_sub(t)))
                    } else {
                        inner.admit_half_open(&mut shared, word)
                    }
                }
            }
        };
        inner.notify(transition);
        match admitted {
            Ok(word) => Ok(self.permit(word)),
            Err(retry_after) => Err(inner.reject(retry_after)),
        }
    }

    /// Runs `f()` through the breaker: rejected at once with [`BreakerError::Open`] if
    /// the breaker is open, otherwise awaited, and an `Err` counted as a failure.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use resilience::{BreakerError, CircuitBreaker};
    ///
    /// let breaker = CircuitBreaker::builder().consecutive_failures(1).build();
    /// let r = breaker.call(|| async { Err::<(), _>("boom") }).await;
    /// assert_eq!(r, Err(BreakerError::Inner("boom")));
    /// let r = breaker.call(|| async { Ok::<_, &str>(1) }).await;
    /// assert!(matches!(r, Err(BreakerError::Open(_))));
    /// # }
    /// ```
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_classified(ErrIsFailure, f).await
    }

    /// Like [`call`](Self::call), with `classifier` deciding which outcomes are failures
    /// (an `Ok` can be one too, e.g. an HTTP `503`).
    pub async fn call_classified<C, F, Fut, T, E>(
        &self,
        classifier: C,
        f: F,
    ) -> Result<T, BreakerError<E>>
    where
        C: Classifier<T, E>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire()?;
        let outcome = f().await;
        permit.record(classifier.is_failure(outcome.as_ref()));
        outcome.map_err(BreakerError::Inner)
    }
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker::new()
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = self.inner.state.0.load(Ordering::Relaxed);
        f.debug_struct("CircuitBreaker")
            .field("state", &CircuitState::of_word(word))
            .field("stats", &self.stats())
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // No user code runs with the lock held (the hook runs after), so a poisoned lock
        // can only come from a panic in our own bookkeeping; the data is still coherent
        // enough to keep serving.
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_nanos(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.epoch))
    }

    /// The start of a call as `now_nanos() + 1`: one word that is never zero, so a permit
    /// stays three plain words and `Option` costs nothing.
    fn start_stamp(&self) -> Option<NonZeroU64> {
        NonZeroU64::new(self.now_nanos().saturating_add(1))
    }

    fn reject(&self, retry_after: Duration) -> CircuitOpen {
        self.counters.0.rejections.fetch_add(1, Ordering::Relaxed);
        CircuitOpen { retry_after }
    }

    fn notify(&self, transition: Option<Transition>) {
        if let (Some(t), Some(hook)) = (transition, &self.hook) {
            hook(t);
        }
    }

    /// A control call: a transition to `to` from whatever the state is. `forget_trips`
    /// also drops the `open_for` growth (which a transition to closed would otherwise
    /// drop only for a real recovery).
    fn control(&self, to: CircuitState, forget_trips: bool) {
        let transition = {
            let mut shared = self.lock();
            let word = self.state.0.load(Ordering::Acquire);
            let trips = shared.trips;
            let t = self.transition(&mut shared, word, to, self.now_nanos());
            shared.trips = if forget_trips { 0 } else { trips };
            t
        };
        self.notify(Some(transition));
    }

    /// Turns an open breaker whose `open_for` is over at `now` half-open.
    fn expire_open(&self, now: u64) {
        let word = self.state.0.load(Ordering::Acquire);
        if word & STATE_MASK != OPEN || now < self.open_until.load(Ordering::Relaxed) {
            return;
        }
        let transition = {
            let mut shared = self.lock();
            let word = self.state.0.load(Ordering::Acquire);
            let due = now >= self.open_until.load(Ordering::Relaxed);
            (word & STATE_MASK == OPEN && due)
                .then(|| self.transition(&mut shared, word, CircuitState::HalfOpen, now))
        };
        self.notify(transition);
    }

    /// Reopens a half-open breaker whose `max_wait_in_half_open` has passed at `now`,
    /// as of the deadline itself, so the times that follow do not depend on when it was
    /// noticed.
    fn expire_half_open(&self, now: u64) {
        if now < self.half_open_until.load(Ordering::Relaxed) {
            return;
        }
        let transition = {
            let mut shared = self.lock();
            let word = self.state.0.load(Ordering::Acquire);
            let deadline = self.half_open_until.load(Ordering::Relaxed);
            (word & STATE_MASK == HALF_OPEN && now >= deadline)
                .then(|| self.transition(&mut shared, word, CircuitState::Open, deadline))
        };
        self.notify(transition);
    }

    fn admit_half_open(&self, shared: &mut Shared, word: u64) -> Result<u64, Duration> {
        if shared.half_open_admitted < self.config.half_open_calls {
            shared.half_open_admitted += 1;
            Ok(word)
        } else {
            // Every trial slot is taken; one frees as soon as a trial finishes.
            Err(Duration::ZERO)
        }
    }

    /// Moves from the state in `from_word` to `to`. Caller holds the lock and has checked
    /// that `from_word` is still current.
    fn transition(
        &self,
        shared: &mut Shared,
        from_word: u64,
        to: CircuitState,
        now: u64,
    ) -> Transition {
        let generation = (from_word >> STATE_BITS).wrapping_add(1);
        match to {
            CircuitState::Closed => {
                shared.trips = 0;
                if let Some(window) = &mut shared.window {
                    window.clear();
                }
                self.consecutive
                    .store(consecutive_tag(generation << STATE_BITS), Ordering::Relaxed);
            }
            CircuitState::Open => {
                shared.trips = shared.trips.saturating_add(1);
                let open_for = self.open_duration(shared.trips);
                self.open_until
                    .store(now.saturating_add(nanos(open_for)), Ordering::Relaxed);
            }
            CircuitState::HalfOpen => {
                shared.half_open_admitted = 0;
                shared.half_open_successes = 0;
                let until = match self.config.max_wait_in_half_open {
                    Some(d) => now.saturating_add(nanos(d)),
                    None => u64::MAX,
                };
                self.half_open_until.store(until, Ordering::Relaxed);
            }
            // Held by hand: nothing to set up, nothing times out.
            CircuitState::ForcedOpen | CircuitState::Disabled => {}
        }
        // Release: whoever sees the new word also sees the fields set above.
        self.state
            .0
            .store((generation << STATE_BITS) | to.code(), Ordering::Release);
        self.counters.0.transitions.fetch_add(1, Ordering::Relaxed);
        Transition {
            from: CircuitState::of_word(from_word),
            to,
        }
    }

    /// `open_for` after the `trips`-th trip in a row: `open_for * factor^(trips - 1)`,
    /// capped.
    fn open_duration(&self, trips: u32) -> Duration {
        let base = self.config.open_for;
        let Some((factor, cap)) = self.config.growth else {
            return base;
        };
        let exp = i32::try_from(trips.saturating_sub(1)).unwrap_or(i32::MAX);
        let grown = base.as_nanos() as f64 * factor.powi(exp);
        if grown.is_finite() && grown < cap.as_nanos() as f64 {
            Duration::from_nanos(grown.round() as u64)
        } else {
            cap
        }
    }

    /// The common case inline: a closed-state success under the consecutive policy
    /// without slow-call detection is a counter increment and a load.
    #[inline]
    fn record(&self, word: u64, start: Option<NonZeroU64>, outcome: Option<bool>) {
        if outcome == Some(false)
            && start.is_none()
            && word & STATE_MASK == CLOSED
            && self.config.rate.is_none()
        {
            self.counters.0.successes.fetch_add(1, Ordering::Relaxed);
            self.reset_consecutive(word);
        } else {
            self.record_slow(word, start, outcome);
        }
    }

    /// A success in the closed period `word` resets its consecutive-failure count.
    #[inline]
    fn reset_consecutive(&self, word: u64) {
        if self.config.consecutive.is_none() {
            return;
        }
        let tag = consecutive_tag(word);
        let current = self.consecutive.load(Ordering::Relaxed);
        if current & COUNT_MASK != 0 && current & !COUNT_MASK == tag {
            // Losing this race to a concurrent failure is fine: the two calls
            // overlapped, so either order is a valid history.
            let _ = self.consecutive.compare_exchange(
                current,
                tag,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    #[inline(never)]
    fn record_slow(&self, word: u64, start: Option<NonZeroU64>, outcome: Option<bool>) {
        let slow = match (start, self.config.slow_call) {
            (Some(start), Some(limit)) => {
                let elapsed = self.now_nanos().saturating_sub(start.get() - 1);
                elapsed > nanos(limit)
            }
            _ => false,
        };
        // A call abandoned after it was already slow was certainly slow: count it, or a
        // timeout layered outside the breaker would hide a hanging dependency from it.
        let outcome = match outcome {
            Some(failed) => Some(failed || slow),
            None if slow => Some(true),
            None => None,
        };
        let counters = &self.counters.0;
        match outcome {
            Some(true) => counters.failures.fetch_add(1, Ordering::Relaxed),
            Some(false) => counters.successes.fetch_add(1, Ordering::Relaxed),
            None => counters.cancelled.fetch_add(1, Ordering::Relaxed),
        };
        match word & STATE_MASK {
            CLOSED => {
                if let Some(failed) = outcome {
                    self.record_closed(word, failed);
                }
            }
            HALF_OPEN => self.record_half_open(word, outcome),
            // Disabled: counted above, and nothing trips.
            _ => {}
        }
    }

    fn record_closed(&self, word: u64, failed: bool) {
        let mut tripped = false;
        if !failed {
            self.reset_consecutive(word);
        } else if let Some(threshold) = self.config.consecutive {
            let tag = consecutive_tag(word);
            let mut current = self.consecutive.load(Ordering::Relaxed);
            // Count only within this permit's closed period; stop at the threshold instead
            // of overflowing into the tag.
            while current & !COUNT_MASK == tag && current & COUNT_MASK < u64::from(threshold) {
                match self.consecutive.compare_exchange_weak(
                    current,
                    current + 1,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        tripped = (current & COUNT_MASK) + 1 >= u64::from(threshold);
                        break;
                    }
                    Err(actual) => current = actual,
                }
            }
        }
        if !tripped && self.config.rate.is_none() {
            return;
        }
        let transition = {
            let mut shared = self.lock();
            if self.state.0.load(Ordering::Acquire) != word {
                None
            } else {
                let rate_tripped = shared
                    .window
                    .as_mut()
                    .is_some_and(|window| window.push(|| self.now_nanos(), failed));
                (tripped || rate_tripped).then(|| {
                    let now = self.now_nanos();
                    self.transition(&mut shared, word, CircuitState::Open, now)
                })
            }
        };
        self.notify(transition);
    }

    fn record_half_open(&self, word: u64, outcome: Option<bool>) {
        let transition = {
            let mut shared = self.lock();
            if self.state.0.load(Ordering::Acquire) != word {
                return;
            }
            match outcome {
                None => {
                    shared.half_open_admitted = shared.half_open_admitted.saturating_sub(1);
                    None
                }
                Some(false) => {
                    shared.half_open_successes += 1;
                    (shared.half_open_successes >= self.config.half_open_calls).then(|| {
                        let now = self.now_nanos();
                        self.transition(&mut shared, word, CircuitState::Closed, now)
                    })
                }
                Some(true) => {
                    let now = self.now_nanos();
                    Some(self.transition(&mut shared, word, CircuitState::Open, now))
                }
            }
        };
        self.notify(transition);
    }
}

fn consecutive_tag(word: u64) -> u64 {
    // The low 32 bits of the generation are plenty to tell closed periods apart: a permit
    // would have to outlive 2^32 transitions to be confused.
    ((word >> STATE_BITS) & COUNT_MASK) << 32
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Permission to make one call, from [`CircuitBreaker::try_acquire`].
///
/// Report the outcome with [`success`](Self::success), [`failure`](Self::failure) or
/// [`record`](Self::record). A permit dropped without a report (the call was cancelled)
/// counts as neither, and frees its half-open trial slot; except that, with
/// [`slow_call`](CircuitBreakerBuilder::slow_call) set, a call abandoned after running
/// longer than the limit counts as a (slow) failure.
///
/// The permit belongs to the state period that admitted it: if the breaker has changed
/// state since, its outcome updates the counters but not the state.
#[must_use = "report the call's outcome with success(), failure() or record()"]
pub struct BreakerPermit {
    /// `None` once the outcome is reported.
    inner: Option<Arc<Inner>>,
    word: u64,
    /// Call start for slow-call detection, see `Inner::start_stamp`.
    start: Option<NonZeroU64>,
}

impl BreakerPermit {
    /// The call succeeded (it still counts as a failure if it was slower than
    /// `slow_call`).
    #[inline]
    pub fn success(self) {
        self.record(false);
    }

    /// The call failed.
    #[inline]
    pub fn failure(self) {
        self.record(true);
    }

    /// Reports the outcome: `failed == true` is a failure.
    #[inline]
    pub fn record(mut self, failed: bool) {
        self.report(failed);
    }

    /// Reports the outcome in place, for futures that hold the permit by value; later
    /// reports and the drop are no-ops.
    #[inline]
    pub(crate) fn report(&mut self, failed: bool) {
        if let Some(inner) = self.inner.take() {
            inner.record(self.word, self.start, Some(failed));
        }
    }

    /// The state that admitted the call: [`Closed`](CircuitState::Closed),
    /// [`HalfOpen`](CircuitState::HalfOpen) (a trial call) or
    /// [`Disabled`](CircuitState::Disabled).
    pub fn state(&self) -> CircuitState {
        CircuitState::of_word(self.word)
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.record(self.word, self.start, None);
        }
    }
}

impl fmt::Debug for BreakerPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerPermit")
            .field("state", &self.state())
            .field("generation", &(self.word >> STATE_BITS))
            .finish_non_exhaustive()
    }
}

/// The failure-rate policy's sliding window. Lives under the breaker's mutex.
enum RateWindow {
    Count {
        outcomes: VecDeque<bool>,
        size: usize,
        failures: usize,
        min_calls: usize,
        percent: f64,
    },
    Time {
        buckets: Box<[Bucket]>,
        width: u64,
        min_calls: usize,
        percent: f64,
    },
}

#[derive(Clone, Copy, Default)]
struct Bucket {
    index: u64,
    calls: u64,
    failures: u64,
}

impl RateWindow {
    fn new(policy: RatePolicy) -> Self {
        let min_calls = policy.min_calls.max(1);
        match policy.window {
            Window::Count(size) => {
                let size = size.max(1);
                RateWindow::Count {
                    outcomes: VecDeque::with_capacity(size),
                    size,
                    failures: 0,
                    // More than the window holds could never be reached.
                    min_calls: min_calls.min(size),
                    percent: policy.percent,
                }
            }
            Window::Time(d) => RateWindow::Time {
                buckets: vec![Bucket::default(); TIME_BUCKETS as usize].into_boxed_slice(),
                width: nanos(d).div_ceil(TIME_BUCKETS).max(1),
                min_calls,
                percent: policy.percent,
            },
        }
    }

    fn clear(&mut self) {
        match self {
            RateWindow::Count {
                outcomes, failures, ..
            } => {
                outcomes.clear();
                *failures = 0;
            }
            RateWindow::Time { buckets, .. } => buckets.fill(Bucket::default()),
        }
    }

    /// Adds one outcome; `true` if the failure rate now reaches the threshold. `now` is
    /// only read by time windows, so count windows cost no clock read.
    fn push(&mut self, now: impl FnOnce() -> u64, failed: bool) -> bool {
        let (calls, failures, min_calls, percent) = match self {
            RateWindow::Count {
                outcomes,
                size,
                failures,
                min_calls,
                percent,
            } => {
                if outcomes.len() == *size && outcomes.pop_front() == Some(true) {
                    *failures -= 1;
                }
                outcomes.push_back(failed);
                *failures += usize::from(failed);
                (
                    outcomes.len() as u64,
                    *failures as u64,
                    *min_calls,
                    *percent,
                )
            }
            RateWindow::Time {
                buckets,
                width,
                min_calls,
                percent,
            } => {
                // Index 0 is never used, so a default bucket is never mistaken for a
                // live one.
                let index = now() / *width + 1;
                let bucket = &mut buckets[(index % TIME_BUCKETS) as usize];
                if bucket.index != index {
                    *bucket = Bucket {
                        index,
                        ..Bucket::default()
                    };
                }
                bucket.calls += 1;
                bucket.failures += u64::from(failed);
                let (calls, failures) = buckets
                    .iter()
                    .filter(|b| b.index + TIME_BUCKETS > index)
                    .fold((0, 0), |(c, f), b| (c + b.calls, f + b.failures));
                (calls, failures, *min_calls, *percent)
            }
        };
        failures > 0
            && calls >= min_calls as u64
            && failures as f64 * 100.0 >= percent * calls as f64
    }
}

/// Configures a [`CircuitBreaker`]. Get one from [`CircuitBreaker::builder`].
///
/// Trip policies: [`consecutive_failures`](Self::consecutive_failures) (the default,
/// 5) and/or [`failure_rate`](Self::failure_rate). Setting only `failure_rate` replaces
/// the default; setting both trips on whichever fires first.
#[derive(Clone)]
#[must_use = "call .build() to get a CircuitBreaker"]
pub struct CircuitBreakerBuilder {
    consecutive: Option<u32>,
    rate: Option<RatePolicy>,
    slow_call: Option<Duration>,
    open_for: Duration,
    growth: Option<(f64, Duration)>,
    half_open_calls: u32,
    max_wait_in_half_open: Option<Duration>,
    hook: Option<Hook>,
}

impl CircuitBreakerBuilder {
    /// The defaults: 5 consecutive failures, open for 5 s, 1 half-open call.
    pub fn new() -> Self {
        CircuitBreakerBuilder {
            consecutive: None,
            rate: None,
            slow_call: None,
            open_for: DEFAULT_OPEN_FOR,
            growth: None,
            half_open_calls: DEFAULT_HALF_OPEN_CALLS,
            max_wait_in_half_open: None,
            hook: None,
        }
    }

    /// Trip after `n` failures in a row (a success resets the count).
    ///
    /// # Panics
    ///
    /// If `n` is 0: a breaker that trips before any failure has no sensible reading.
    #[track_caller]
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        assert!(n >= 1, "consecutive_failures: n must be at least 1, got 0");
        self.consecutive = Some(n);
        self
    }

    /// Trip when at least `percent` % of the calls in `window` failed, once the window
    /// holds at least `min_calls` calls (`0` and `1` both mean "any call").
    ///
    /// Every finished call updates the window under a short mutex (see
    /// [`CircuitBreaker`]'s concurrency notes). The window starts empty whenever the
    /// breaker closes.
    ///
    /// # Panics
    ///
    /// On values that are configuration bugs with no sensible reading: `percent` not in
    /// `(0, 100]` (NaN included), an empty window (`Window::Count(0)`,
    /// `Window::Time(Duration::ZERO)`), or a count window smaller than `min_calls`
    /// (it could never trip).
    #[track_caller]
    pub fn failure_rate(mut self, percent: f64, window: Window, min_calls: usize) -> Self {
        assert!(
            percent > 0.0 && percent <= 100.0,
            "failure_rate: percent must be in (0, 100], got {percent}"
        );
        match window {
            Window::Count(size) => {
                assert!(size >= 1, "failure_rate: Window::Count must be at least 1");
                assert!(
                    min_calls <= size,
                    "failure_rate: min_calls {min_calls} is more than Window::Count({size}) \
                     holds, so it could never trip"
                );
            }
            Window::Time(d) => assert!(
                !d.is_zero(),
                "failure_rate: Window::Time must be longer than zero"
            ),
        }
        self.rate = Some(RatePolicy {
            percent,
            window,
            min_calls,
        });
        self
    }

    /// Calls slower than `limit` count as failures even if they succeed. Costs one clock
    /// read per call.
    pub fn slow_call(mut self, limit: Duration) -> Self {
        self.slow_call = Some(limit);
        self
    }

    /// How long the breaker stays open before it turns half-open (default 5 s).
    pub fn open_for(mut self, d: Duration) -> Self {
        self.open_for = d;
        self
    }

    /// Grow `open_for` on repeated trips: the `k`-th trip in a row (a half-open trial
    /// failed again) stays open `open_for * factor^(k-1)`, at most `cap` (but at least
    /// `open_for`). Closing resets it.
    ///
    /// # Panics
    ///
    /// If `factor` is not a finite number `>= 1`.
    pub fn open_for_growth(mut self, factor: f64, cap: Duration) -> Self {
        assert!(
            factor.is_finite() && factor >= 1.0,
            "open_for_growth: factor must be finite and >= 1, got {factor}"
        );
        self.growth = Some((factor, cap));
        self
    }

    /// How many trial calls the half-open state admits at once, and how many of them
    /// must succeed to close the breaker (default 1).
    ///
    /// # Panics
    ///
    /// If `n` is 0: a half-open breaker that admits no trial could never close.
    #[track_caller]
    pub fn half_open_calls(mut self, n: u32) -> Self {
        assert!(n >= 1, "half_open_calls: n must be at least 1, got 0");
        self.half_open_calls = n;
        self
    }

    /// How long a half-open breaker waits for its trial calls to report: after `d`
    /// without enough successes or a failure (the trials hang, or their permits are
    /// held and never reported), it opens again, as if a trial had failed (the trip
    /// counts for [`open_for_growth`](Self::open_for_growth)). Without it (the default)
    /// a half-open breaker waits for its trials however long they take.
    ///
    /// The reopen is made by the next call or [`state`](CircuitBreaker::state) read at
    /// or after `d`, like the change from open to half-open, and is dated at `d`
    /// exactly: the open period that follows ends `open_for` after it, whenever it was
    /// noticed.
    ///
    /// ```
    /// use std::time::Duration;
    /// use resilience::{CircuitBreaker, CircuitState};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let breaker = CircuitBreaker::builder()
    ///     .consecutive_failures(1)
    ///     .open_for(Duration::from_secs(1))
    ///     .max_wait_in_half_open(Duration::from_secs(2))
    ///     .build();
    /// breaker.try_acquire().unwrap().failure();
    /// tokio::time::advance(Duration::from_secs(1)).await;
    /// let trial = breaker.try_acquire().unwrap(); // a trial that never reports
    /// tokio::time::advance(Duration::from_secs(2)).await;
    /// assert_eq!(breaker.state(), CircuitState::Open);
    /// # drop(trial);
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// If `d` is zero: the breaker would reopen the moment it turned half-open, admit no
    /// trial, and never close.
    #[track_caller]
    pub fn max_wait_in_half_open(mut self, d: Duration) -> Self {
        assert!(
            !d.is_zero(),
            "max_wait_in_half_open: the wait must be longer than zero"
        );
        self.max_wait_in_half_open = Some(d);
        self
    }

    /// Called on every state change, after the breaker's lock is released, on the task
    /// that caused the change. Keep it short (update a metric, log). Under concurrency two
    /// hooks for consecutive transitions can run at the same time on different threads.
    pub fn on_state_change<F>(mut self, hook: F) -> Self
    where
        F: Fn(Transition) + Send + Sync + 'static,
    {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Builds the breaker, closed.
    pub fn build(self) -> CircuitBreaker {
        let consecutive = match (self.consecutive, self.rate) {
            (None, None) => Some(DEFAULT_CONSECUTIVE_FAILURES),
            (n, _) => n,
        };
        let growth = self
            .growth
            .map(|(factor, cap)| (factor, cap.max(self.open_for)));
        let config = Config {
            consecutive,
            rate: self.rate,
            slow_call: self.slow_call,
            open_for: self.open_for,
            growth,
            half_open_calls: self.half_open_calls,
            max_wait_in_half_open: self.max_wait_in_half_open,
        };
        CircuitBreaker {
            inner: Arc::new(Inner {
                state: CacheLine(AtomicU64::new(CLOSED)),
                consecutive: AtomicU64::new(consecutive_tag(CLOSED)),
                open_until: AtomicU64::new(0),
                half_open_until: AtomicU64::new(u64::MAX),
                counters: CacheLine::default(),
                shared: Mutex::new(Shared {
                    trips: 0,
                    half_open_admitted: 0,
                    half_open_successes: 0,
                    window: self.rate.map(RateWindow::new),
                }),
                config,
                epoch: Instant::now(),
                hook: self.hook,
            }),
        }
    }
}

impl Default for CircuitBreakerBuilder {
    fn default() -> Self {
        CircuitBreakerBuilder::new()
    }
}

impl fmt::Debug for CircuitBreakerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerBuilder")
            .field("consecutive_failures", &self.consecutive)
            .field("failure_rate", &self.rate)
            .field("slow_call", &self.slow_call)
            .field("open_for", &self.open_for)
            .field("open_for_growth", &self.growth)
            .field("half_open_calls", &self.half_open_calls)
            .field("max_wait_in_half_open", &self.max_wait_in_half_open)
            .field("on_state_change", &self.hook.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_exact_and_capped() {
        let b = CircuitBreaker::builder()
            .open_for(Duration::from_millis(100))
            .open_for_growth(2.0, Duration::from_millis(500))
            .build();
        let d: Vec<_> = (1..=6).map(|k| b.inner.open_duration(k)).collect();
        let ms = Duration::from_millis;
        assert_eq!(d, [ms(100), ms(200), ms(400), ms(500), ms(500), ms(500)]);
        assert_eq!(b.inner.open_duration(u32::MAX), ms(500));
    }

    #[test]
    fn count_window_slides() {
        let mut w = RateWindow::new(RatePolicy {
            percent: 50.0,
            window: Window::Count(4),
            min_calls: 4,
        });
        assert!(!w.push(|| 0, true));
        assert!(!w.push(|| 0, true));
        assert!(!w.push(|| 0, false));
        assert!(w.push(|| 0, false)); // 2 of 4
        assert!(!w.push(|| 0, false)); // 1 of 4: the first failure slid out
    }

    #[test]
    fn time_window_forgets_old_buckets() {
        let sec = 1_000_000_000;
        let mut w = RateWindow::new(RatePolicy {
            percent: 100.0,
            window: Window::Time(Duration::from_secs(32)),
            min_calls: 2,
        });
        assert!(!w.push(|| 0, true));
        assert!(w.push(|| 31 * sec, true));
        assert!(!w.push(|| 64 * sec, true)); // both earlier failures are out of the window
    }
}
