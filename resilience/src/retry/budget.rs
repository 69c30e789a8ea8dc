//! [`RetryBudget`]: retries as a fraction of requests, plus a floor per second.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use crate::clock::Clock;

/// Fixed-point units of one retry. Deposits and the floor are rounded *down* to a unit,
/// so rounding can only make the budget stricter than the real-valued inequality.
const UNIT: u64 = 1_000_000;
/// Slots of the sliding window.
const SLOTS: usize = 10;
/// Largest `ratio` accepted, as tower's `TpsBudget`.
const MAX_RATIO: f64 = 1000.0;
/// Largest `min_per_sec` accepted.
const MAX_MIN_PER_SEC: f64 = 1_000_000.0;
/// The default `initial`: no start-up allowance.
pub const DEFAULT_INITIAL: u32 = 0;

/// The default `ratio`: 20 % of requests may be retried (Finagle's default).
pub const DEFAULT_RATIO: f64 = 0.2;
/// The default `min_per_sec`: 10 retries per second (Finagle's default).
pub const DEFAULT_MIN_PER_SEC: f64 = 10.0;
/// The default sliding window: 10 s (Finagle's default TTL).
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

/// A retry budget: every request deposits `ratio` of a retry, every retry withdraws
/// one, and a floor of `min_per_sec` retries per second accrues on top, over a sliding
/// `window`; as Finagle's `RetryBudget` and Envoy's `retry_budget`. An optional
/// start-up allowance of [`initial`](RetryBudgetBuilder::initial) retries is there from
/// the moment the budget is built.
///
/// # The bound
///
/// With `t` the time since the budget was built, `requests(t)` the calls made through
/// it and `retries(t)` the retries it allowed, at every instant:
///
/// ```text
/// retries(t) ≤ ratio × requests(t) + min_per_sec × t + initial
/// ```
///
/// It is a hard inequality, not an average: a retry is allowed only when a whole retry
/// of unspent credit is there, credit is kept in fixed point (millionths) rounded down,
/// and the floor starts empty when the budget is built. So without `initial` (the
/// default, 0) a process's very first failing call is not retried: nothing has been
/// deposited and no floor has accrued yet. A client that must ride out a dependency
/// that is still starting (its first calls at boot) sets `initial` to a few retries. It
/// is also stricter than that:
///
/// * a deposit expires after the window (it counts for between `window × 9/10` and
///   `window`: the window is 10 slots), so old traffic cannot bank retries for later;
/// * the floor's unspent credit is capped at `min_per_sec × window`, so a quiet spell
///   does not bank a burst of retries either.
///
/// Withdrawals spend the oldest deposits first, then the floor, then what is left of
/// the start-up allowance (which never expires and never refills: `initial` retries
/// over the budget's whole life).
///
/// # Cost
///
/// A deposit (every call) takes no lock: one clock read (the time-stamp counter, see
/// below) and two relaxed atomic additions; the lock is taken when a slot of the window
/// ends (at most ten times per window) and by withdrawals (retries only). A deposit
/// racing with the end of its slot may land in the slot just before; a thread stalled
/// for most of a window between reading the slot and adding to it could even make its
/// deposit live one window longer. Neither can break the bound: every unit of credit is
/// still one request's deposit.
///
/// # Time
///
/// The clock is chosen when the budget is built: `tokio::time` if tokio's clock is
/// paused then (tests: `advance` moves the window and the floor), otherwise the
/// time-stamp counter (`quanta`).
///
/// The handle is cheap to clone: clones share one state behind an `Arc`, made when the
/// budget is built. A [`RetryLayer`](super::RetryLayer) holds one, so every service it
/// makes and every clone of those draw from the same budget; give one budget to several
/// layers to share it wider.
///
/// ```
/// use std::time::Duration;
/// use resilience::retry::RetryBudget;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let budget = RetryBudget::builder().ratio(0.5).min_per_sec(0.0).build();
/// budget.deposit();
/// assert!(!budget.try_withdraw()); // half a retry is not a retry
/// budget.deposit();
/// assert!(budget.try_withdraw());
/// assert!(!budget.try_withdraw());
///
/// // Deposits expire with the window.
/// budget.deposit();
/// budget.deposit();
/// tokio::time::advance(Duration::from_secs(10)).await;
/// assert!(!budget.try_withdraw());
/// assert_eq!(budget.stats().retries, 1);
/// # }
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    shared: Arc<Shared>,
}

struct Shared {
    ratio: f64,
    min_per_sec: f64,
    window: Duration,
    initial: u32,
    /// `ratio` in units.
    deposit: u64,
    /// `min_per_sec` in units.
    floor_per_sec: u64,
    /// `min_per_sec × window` in units.
    floor_cap: u64,
    /// `window / SLOTS`, in nanoseconds (at least 1).
    slot_nanos: u64,
    clock: Clock,
    /// The clock's stamp when the budget was built.
    start: u64,
    // Lock-free, for deposits.
    /// Unspent deposits per slot; `slots[head]` is the current slot.
    slots: [AtomicU64; SLOTS],
    head: AtomicUsize,
    /// When the current slot ends, in nanoseconds since `start`.
    slot_end: AtomicU64,
    requests: AtomicU64,
    /// The rest, for slot changes and withdrawals.
    state: Mutex<State>,
}

struct State {
    /// Slots that have begun since `start`, counting the current one from 0.
    slot_no: u64,
    /// Unspent floor credit.
    floor: u64,
    /// Floor credit generated since `start`, all of it (spent, capped away or not).
    floor_generated: u64,
    /// What is left of the start-up allowance, in units.
    reserve: u64,
    retries: u64,
    denied: u64,
}

/// What a [`RetryBudget`] has counted since it was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetStats {
    /// Deposits: requests made through the budget.
    pub requests: u64,
    /// Withdrawals allowed: retries.
    pub retries: u64,
    /// Withdrawals refused: retries the budget stopped.
    pub denied: u64,
}

impl RetryBudget {
    /// A budget with the defaults: [`DEFAULT_RATIO`] (0.2), [`DEFAULT_MIN_PER_SEC`] (10)
    /// and [`DEFAULT_WINDOW`] (10 s).
    pub fn new() -> Self {
        RetryBudgetBuilder::new().build()
    }

    /// A builder, starting from the defaults.
    pub fn builder() -> RetryBudgetBuilder {
        RetryBudgetBuilder::new()
    }

    /// Records a request: adds `ratio` of a retry to the current slot. Takes no lock,
    /// except at the first deposit of a new slot.
    #[inline]
    pub fn deposit(&self) {
        let shared = &*self.shared;
        let now = shared.elapsed();
        if now >= shared.slot_end.load(Ordering::Acquire) {
            let mut state = self.lock();
            shared.advance(&mut state, now);
        }
        let head = shared.head.load(Ordering::Acquire);
        // A `u64` of millionths: 18 × 10⁹ requests of `ratio` 1000 in one slot to
        // overflow.
        shared.slots[head].fetch_add(shared.deposit, Ordering::Relaxed);
        shared.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if a whole one is there: `true` if the retry
    /// may go ahead.
    pub fn try_withdraw(&self) -> bool {
        let shared = &*self.shared;
        let mut state = self.lock();
        shared.advance(&mut state, shared.elapsed());
        let deposits: u64 = shared
            .slots
            .iter()
            .fold(0, |a, s| a.saturating_add(s.load(Ordering::Acquire)));
        if deposits
            .saturating_add(state.floor)
            .saturating_add(state.reserve)
            < UNIT
        {
            state.denied += 1;
            return false;
        }
        // Oldest slot first: the one after the head, round to the head. Deposits only
        // add to a slot while the lock is held here (slots are zeroed under it), so a
        // slot never holds less than was read: the subtraction cannot wrap.
        let head = shared.head.load(Ordering::Acquire);
        let mut need = UNIT;
        for i in 1..=SLOTS {
            let slot = &shared.slots[(head + i) % SLOTS];
            let take = need.min(slot.load(Ordering::Acquire));
            slot.fetch_sub(take, Ordering::AcqRel);
            need -= take;
            if need == 0 {
                break;
            }
        }
        let from_floor = need.min(state.floor);
        state.floor -= from_floor;
        state.reserve -= need - from_floor;
        state.retries += 1;
        true
    }

    /// The counts so far.
    pub fn stats(&self) -> BudgetStats {
        let state = self.lock();
        BudgetStats {
            requests: self.shared.requests.load(Ordering::Relaxed),
            retries: state.retries,
            denied: state.denied,
        }
    }

    /// The start-up allowance, in retries, as built.
    pub fn initial(&self) -> u32 {
        self.shared.initial
    }

    /// The fraction of requests that may be retried.
    pub fn ratio(&self) -> f64 {
        self.shared.ratio
    }

    /// The floor, in retries per second.
    pub fn min_per_sec(&self) -> f64 {
        self.shared.min_per_sec
    }

    /// The sliding window.
    pub fn window(&self) -> Duration {
        self.shared.window
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements; a panic elsewhere cannot break it.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Shared {
    /// Nanoseconds since the budget was built.
    #[inline]
    fn elapsed(&self) -> u64 {
        self.clock.nanos(self.start, self.clock.now())
    }

    /// Brings the slots and the floor up to `now` (nanoseconds since `start`); under the
    /// lock.
    fn advance(&self, state: &mut State, now: u64) {
        let slot_no = now / self.slot_nanos;
        let passed = slot_no.saturating_sub(state.slot_no);
        if passed > 0 {
            let mut head = self.head.load(Ordering::Acquire);
            for _ in 0..passed.min(SLOTS as u64) {
                head = (head + 1) % SLOTS;
                self.slots[head].store(0, Ordering::Release);
            }
            // After a whole window or more every slot is zero; only the head's position
            // must still move on by the slots passed, as it did before.
            if passed > SLOTS as u64 {
                head = (head + ((passed - SLOTS as u64) % SLOTS as u64) as usize) % SLOTS;
            }
            self.head.store(head, Ordering::Release);
            state.slot_no = slot_no;
            self.slot_end.store(
                slot_no.saturating_add(1).saturating_mul(self.slot_nanos),
                Ordering::Release,
            );
        }

        // Floor credit generated from `start` to `now`, rounded down: computed from the
        // start each time, so frequent calls lose nothing to rounding.
        let generated =
            u128::from(now).saturating_mul(u128::from(self.floor_per_sec)) / 1_000_000_000;
        let generated = u64::try_from(generated).unwrap_or(u64::MAX);
        if generated > state.floor_generated {
            let fresh = generated - state.floor_generated;
            state.floor_generated = generated;
            state.floor = state.floor.saturating_add(fresh).min(self.floor_cap);
        }
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new()
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &self.shared.ratio)
            .field("min_per_sec", &self.shared.min_per_sec)
            .field("window", &self.shared.window)
            .field("initial", &self.shared.initial)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Builds a [`RetryBudget`]; from [`RetryBudget::builder`].
#[derive(Clone, Debug)]
pub struct RetryBudgetBuilder {
    ratio: f64,
    min_per_sec: f64,
    window: Duration,
    initial: u32,
}

impl RetryBudgetBuilder {
    fn new() -> Self {
        RetryBudgetBuilder {
            ratio: DEFAULT_RATIO,
            min_per_sec: DEFAULT_MIN_PER_SEC,
            window: DEFAULT_WINDOW,
            initial: DEFAULT_INITIAL,
        }
    }

    /// Each request deposits `ratio` of a retry: 0.2 lets one request in five be
    /// retried; more than 1 lets each request be retried several times.
    ///
    /// # Panics
    ///
    /// When `ratio` is negative, not finite, or above 1000.
    #[track_caller]
    pub fn ratio(mut self, ratio: f64) -> Self {
        assert!(
            ratio.is_finite() && (0.0..=MAX_RATIO).contains(&ratio),
            "retry budget ratio must be in [0, 1000], got {ratio}"
        );
        self.ratio = ratio;
        self
    }

    /// The floor: `min_per_sec` retries per second are allowed whatever the traffic, for
    /// clients that send few requests. 0 turns it off.
    ///
    /// # Panics
    ///
    /// When `min_per_sec` is negative, not finite, or above 1 000 000.
    #[track_caller]
    pub fn min_per_sec(mut self, min_per_sec: f64) -> Self {
        assert!(
            min_per_sec.is_finite() && (0.0..=MAX_MIN_PER_SEC).contains(&min_per_sec),
            "retry budget min_per_sec must be in [0, 1000000], got {min_per_sec}"
        );
        self.min_per_sec = min_per_sec;
        self
    }

    /// How long a deposit counts; also caps the unspent floor at
    /// `min_per_sec × window`.
    ///
    /// # Panics
    ///
    /// When `window` is zero.
    #[track_caller]
    pub fn window(mut self, window: Duration) -> Self {
        assert!(!window.is_zero(), "retry budget window must not be zero");
        self.window = window;
        self
    }

    /// A start-up allowance: `initial` retries available from the moment the budget is
    /// built, before any request has deposited and before the floor has accrued (by
    /// default [`DEFAULT_INITIAL`], none). Spent last, after the deposits and the floor;
    /// it never expires and never refills, so it adds at most `initial` retries to the
    /// budget's whole life: `retries ≤ ratio × requests + min_per_sec × t + initial`.
    ///
    /// ```
    /// use resilience::retry::RetryBudget;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let budget = RetryBudget::builder().ratio(0.0).min_per_sec(0.0).initial(2).build();
    /// budget.deposit();
    /// assert!(budget.try_withdraw()); // the first failing call at start-up is retried
    /// assert!(budget.try_withdraw());
    /// assert!(!budget.try_withdraw()); // and the allowance is spent
    /// # }
    /// ```
    pub fn initial(mut self, initial: u32) -> Self {
        self.initial = initial;
        self
    }

    /// The budget; its state is created now, and time starts now.
    pub fn build(self) -> RetryBudget {
        let units = |x: f64| (x * UNIT as f64).floor() as u64;
        let floor_cap = (self.min_per_sec * self.window.as_secs_f64() * UNIT as f64).floor();
        let clock = Clock::new();
        let start = clock.now();
        let slot_nanos = u64::try_from(self.window.as_nanos() / SLOTS as u128)
            .unwrap_or(u64::MAX)
            .max(1);
        RetryBudget {
            shared: Arc::new(Shared {
                ratio: self.ratio,
                min_per_sec: self.min_per_sec,
                window: self.window,
                initial: self.initial,
                deposit: units(self.ratio),
                floor_per_sec: units(self.min_per_sec),
                // `as` saturates at u64::MAX.
                floor_cap: floor_cap as u64,
                slot_nanos,
                clock,
                start,
                slots: Default::default(),
                head: AtomicUsize::new(0),
                slot_end: AtomicU64::new(slot_nanos),
                requests: AtomicU64::new(0),
                state: Mutex::new(State {
                    slot_no: 0,
                    floor: 0,
                    floor_generated: 0,
                    reserve: u64::from(self.initial) * UNIT,
                    retries: 0,
                    denied: 0,
                }),
            }),
        }
    }
}
