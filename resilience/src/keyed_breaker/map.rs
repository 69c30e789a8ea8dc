//! [`KeyedCircuitBreakers`]: one breaker per key, in a bounded, sharded map.

use std::{
    collections::HashMap,
    fmt,
    hash::Hash,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
};

use super::error::InvalidKeyedBreaker;
use crate::circuit_breaker::{
    BreakerPermit, CircuitBreaker, CircuitBreakerBuilder, CircuitOpen, CircuitState,
};

/// The default hard cap on the number of keys.
pub const DEFAULT_MAX_BREAKERS: usize = 10_000;

/// Upper bound on shards; enough that two threads rarely meet on one lock.
const MAX_SHARDS: usize = 16;
/// Fewer shards for small caps, so each shard still holds a useful number of keys.
const MIN_KEYS_PER_SHARD: usize = 32;

/// A circuit breaker per key (an upstream host, a tenant...), all built from one
/// [`CircuitBreakerBuilder`], with a hard cap on the number of keys.
///
/// A key's breaker is built on its first call, closed. Each key trips and recovers on
/// its own: one failing upstream does not open the breaker of another. The template's
/// [`on_state_change`](CircuitBreakerBuilder::on_state_change) hook, if any, is shared
/// by every key's breaker; it may run while the map holds a shard's lock, so it must
/// not call back into the map.
///
/// # Memory is bounded
///
/// At most [`max_keys`](Self::max_keys) breakers are kept (default
/// [`DEFAULT_MAX_BREAKERS`]), however many distinct keys arrive. The map is split into
/// up to 16 shards, each with its share of the cap. When a new key arrives at a full
/// shard, an eighth of that shard is evicted, in this order:
///
/// 1. Closed breakers that are idle (no call in flight, no handle held outside the
///    map), least recently used first. A closed breaker with its count of failures
///    dropped behaves like a new one, except that those few failures are forgotten.
///    (Uses are dated by a count of the keys added so far rather than by a clock: it
///    orders them just as well for a pass that only runs when a key is added, and costs
///    a load instead of a clock read.)
/// 2. Only if there are not enough of those: the least recently used of the rest (open
///    or half-open ones, or ones in use). Such a key gets a fresh, closed breaker on its
///    next call: lossy, but the cap is a hard one.
///
/// Freeing an eighth at a time keeps inserts amortised O(1) under a flood of new keys;
/// each pass moves the survivors into a fresh table, so churn cannot grow the table.
///
/// # Hot path
///
/// For a key that has a breaker: one hash, a read lock of its shard, a relaxed load
/// (and, after keys were added, a store) of the date of use, then, under the read lock,
/// the breaker's own lock-free closed-state path: about 2.3× a lone breaker layer in
/// `benches/breaker.rs` (10 000 keys cycled; each key's breaker is an allocation of its
/// own, so the walk misses the caches more).
///
/// Clones share the map.
///
/// ```
/// use resilience::{keyed_breaker::KeyedCircuitBreakers, CircuitBreaker, CircuitState};
///
/// let breakers = KeyedCircuitBreakers::<String>::new(
///     CircuitBreaker::builder().consecutive_failures(1),
///     100,
/// );
/// breakers.breaker(&"a.example".to_owned()).try_acquire().unwrap().failure();
/// assert_eq!(breakers.breaker(&"a.example".to_owned()).state(), CircuitState::Open);
/// assert_eq!(breakers.breaker(&"b.example".to_owned()).state(), CircuitState::Closed);
/// assert_eq!(breakers.len(), 2);
/// ```
pub struct KeyedCircuitBreakers<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    template: CircuitBreakerBuilder,
    shards: Box<[Shard<K>]>,
    /// Picks the shard; each shard's map hashes with its own random state too.
    hasher: ahash::RandomState,
    max_keys: usize,
    /// Keys added so far: the date of a use.
    added: AtomicU64,
    evicted: AtomicU64,
}

/// One lock per shard; aligned so two shards never share a cache line.
#[repr(align(128))]
struct Shard<K> {
    map: RwLock<Map<K>>,
    cap: usize,
}

type Map<K> = HashMap<K, Entry, ahash::RandomState>;

struct Entry {
    breaker: CircuitBreaker,
    /// The map's count of added keys at the last call through this breaker.
    last_used: AtomicU64,
}

impl Entry {
    fn touch(&self, now: u64) {
        // Most calls find the date current: a load, and no write to share the line.
        if self.last_used.load(Ordering::Relaxed) != now {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }

    /// Closed and held by no one but the map.
    fn idle(&self) -> bool {
        // The stored state: `state()` could make a transition and run the user's hook
        // under the shard's lock.
        !self.breaker.in_use() && self.breaker.stored_state() == CircuitState::Closed
    }
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // A panic while holding the lock (in a user's `Hash`/`Eq`) leaves every entry a
    // self-contained breaker: keep serving.
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl<K> KeyedCircuitBreakers<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// Breakers built from `template`, at most `max_keys` of them.
    ///
    /// # Panics
    ///
    /// When `max_keys` is 0; see [`try_new`](Self::try_new).
    #[track_caller]
    pub fn new(template: CircuitBreakerBuilder, max_keys: usize) -> Self {
        match Self::try_new(template, max_keys) {
            Ok(breakers) => breakers,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`new`](Self::new), but returns an error instead of panicking.
    pub fn try_new(
        template: CircuitBreakerBuilder,
        max_keys: usize,
    ) -> Result<Self, InvalidKeyedBreaker> {
        if max_keys == 0 {
            return Err(InvalidKeyedBreaker::new(
                "max_keys 0".to_owned(),
                "the key cap must be at least 1",
            ));
        }
        let wanted = (max_keys / MIN_KEYS_PER_SHARD).clamp(1, MAX_SHARDS);
        // Largest power of two <= wanted, so the shard index is a mask.
        let shards = 1usize << (usize::BITS - 1 - wanted.leading_zeros());
        let (base, extra) = (max_keys / shards, max_keys % shards);
        let shards = (0..shards)
            .map(|i| Shard {
                map: RwLock::new(Map::with_hasher(ahash::RandomState::new())),
                // Spread the remainder so the caps add up to exactly `max_keys`.
                cap: base + usize::from(i < extra),
            })
            .collect();
        Ok(KeyedCircuitBreakers {
            inner: Arc::new(Inner {
                template,
                shards,
                hasher: ahash::RandomState::new(),
                max_keys,
                added: AtomicU64::new(0),
                evicted: AtomicU64::new(0),
            }),
        })
    }

    fn shard(&self, key: &K) -> &Shard<K> {
        let shards = &self.inner.shards;
        let index = (self.inner.hasher.hash_one(key) >> 48) as usize & (shards.len() - 1);
        &shards[index]
    }

    /// `key`'s breaker, built (closed) if it has none. The handle shares the breaker's
    /// state; while it is held the breaker counts as in use and is evicted last.
    pub fn breaker(&self, key: &K) -> CircuitBreaker {
        let now = self.inner.added.load(Ordering::Relaxed);
        let shard = self.shard(key);
        if let Some(entry) = read(&shard.map).get(key) {
            entry.touch(now);
            return entry.breaker.clone();
        }
        self.insert(key, shard)
    }

    /// Asks `key`'s breaker (built if it has none) to make one call: what the layer
    /// does per request. A closed breaker admits under the shard's read lock, without
    /// the `Arc` clone of [`breaker`](Self::breaker).
    pub fn try_acquire(&self, key: &K) -> Result<BreakerPermit, CircuitOpen> {
        let now = self.inner.added.load(Ordering::Relaxed);
        let shard = self.shard(key);
        let breaker = {
            let map = read(&shard.map);
            match map.get(key) {
                Some(entry) => {
                    entry.touch(now);
                    if entry.breaker.stored_state() == CircuitState::Closed {
                        return entry.breaker.try_acquire();
                    }
                    // Other states may take the breaker's lock and run the hook: not
                    // under ours.
                    entry.breaker.clone()
                }
                None => {
                    drop(map);
                    self.insert(key, shard)
                }
            }
        };
        breaker.try_acquire()
    }

    /// The slow path: the key has no breaker (or had none a moment ago).
    #[cold]
    fn insert(&self, key: &K, shard: &Shard<K>) -> CircuitBreaker {
        let mut map = write(&shard.map);
        let now = self.inner.added.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(entry) = map.get(key) {
            // Another thread built it between our two locks.
            entry.touch(now);
            return entry.breaker.clone();
        }
        if map.len() >= shard.cap {
            let evicted = evict(&mut map, shard.cap);
            self.inner
                .evicted
                .fetch_add(evicted as u64, Ordering::Relaxed);
        }
        let breaker = self.inner.template.clone().build();
        map.insert(
            key.clone(),
            Entry {
                breaker: breaker.clone(),
                last_used: AtomicU64::new(now),
            },
        );
        breaker
    }

    /// `key`'s breaker if it has one; builds nothing.
    pub fn get(&self, key: &K) -> Option<CircuitBreaker> {
        read(&self.shard(key).map)
            .get(key)
            .map(|entry| entry.breaker.clone())
    }

    /// Number of keys that have a breaker. Never above [`max_keys`](Self::max_keys).
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| read(&s.map).len()).sum()
    }

    /// True when no key has a breaker.
    pub fn is_empty(&self) -> bool {
        self.inner.shards.iter().all(|s| read(&s.map).is_empty())
    }

    /// The hard cap on keys, as given to [`new`](Self::new).
    pub fn max_keys(&self) -> usize {
        self.inner.max_keys
    }

    /// How many breakers the cap has evicted since the map was made.
    pub fn evicted(&self) -> u64 {
        self.inner.evicted.load(Ordering::Relaxed)
    }
}

/// One eviction pass over a full shard (see the type's docs for the order); returns
/// how many went.
fn evict<K: Hash + Eq>(map: &mut Map<K>, cap: usize) -> usize {
    let target = (cap / 8).max(1).min(map.len());
    let (mut idle, mut busy): (Vec<u64>, Vec<u64>) = (Vec::new(), Vec::new());
    for entry in map.values() {
        let t = entry.last_used.load(Ordering::Relaxed);
        if entry.idle() {
            idle.push(t);
        } else {
            busy.push(t);
        }
    }
    // The last-use time at or before which entries of each class go, and how many may.
    let (idle_until, mut idle_budget, busy_until, mut busy_budget) = if idle.len() >= target {
        (nth_smallest(&mut idle, target - 1), target, 0, 0)
    } else {
        let need = target - idle.len();
        (
            u64::MAX,
            idle.len(),
            nth_smallest(&mut busy, need - 1),
            need,
        )
    };
    let hasher = map.hasher().clone();
    let old = std::mem::replace(map, Map::with_capacity_and_hasher(cap, hasher));
    let mut evicted = 0;
    for (key, entry) in old {
        let t = entry.last_used.load(Ordering::Relaxed);
        let budget = if entry.idle() {
            (t <= idle_until).then_some(&mut idle_budget)
        } else {
            (t <= busy_until).then_some(&mut busy_budget)
        };
        match budget {
            Some(left) if *left > 0 => {
                *left -= 1;
                evicted += 1;
            }
            _ => {
                map.insert(key, entry);
            }
        }
    }
    evicted
}

fn nth_smallest(values: &mut [u64], n: usize) -> u64 {
    match values.get(n) {
        Some(_) => *values.select_nth_unstable(n).1,
        None => u64::MAX,
    }
}

impl<K> Clone for KeyedCircuitBreakers<K> {
    fn clone(&self) -> Self {
        KeyedCircuitBreakers {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K> fmt::Debug for KeyedCircuitBreakers<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedCircuitBreakers")
            .field("template", &self.inner.template)
            .field("max_keys", &self.inner.max_keys)
            .field("shards", &self.inner.shards.len())
            .field("evicted", &self.inner.evicted.load(Ordering::Relaxed))
            .finish()
    }
}
