//! [`KeyedTokenBuckets`]: one bucket per key, in a bounded, sharded map.

use std::{
    borrow::Borrow,
    collections::HashMap,
    fmt,
    hash::{BuildHasherDefault, Hash, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
    time::Duration,
};

use super::{
    bucket::{Acquired, Gcra, Rejected, Reservation},
    error::{InvalidTokenBucket, RateLimited},
    rate::{Burst, Rate},
};
use crate::clock::Elapsed;

/// The default hard cap on the number of keys.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// Upper bound on shards; enough that two threads rarely meet on one lock.
const MAX_SHARDS: usize = 64;
/// Fewer shards for small caps, so each shard still holds a useful number of keys.
const MIN_KEYS_PER_SHARD: usize = 32;
/// How many TATs an eviction pass samples to estimate the "closest to full" threshold.
const SAMPLE: usize = 256;

/// Token buckets per key (client IP, API key...), with a hard cap on the number of keys.
///
/// Every key gets its own bucket of the same [`Rate`] and [`Burst`]. A key's state is
/// created on its first request.
///
/// # Memory is bounded
///
/// At most [`max_keys`](KeyedTokenBuckets::max_keys) keys are kept (default
/// [`DEFAULT_MAX_KEYS`], 100 000; another cap with
/// [`with_max_keys`](KeyedTokenBuckets::with_max_keys)),
/// however many distinct keys arrive, so an attacker rotating through millions of IPs
/// cannot grow the map. The map is split into up to 64 shards, each with its share of
/// the cap. When a new key arrives at a full shard, one eviction pass runs over that
/// shard:
///
/// 1. Every bucket that has refilled to full is removed. A full bucket behaves exactly
///    like a missing one (a new key starts full), so this loses nothing.
/// 2. If that frees less than an eighth of the shard, the buckets *closest to full*
///    (earliest refill time) are removed too, until about an eighth is free. This is
///    the only lossy step: such a key gets a full bucket back early. Keys that are far
///    from full, i.e. the ones being throttled hardest, are the last to go, so flooding
///    the map with fresh keys does not reset an abuser's own empty bucket.
///
/// Freeing an eighth at a time keeps inserts amortised O(1) under a flood of new keys.
/// Each pass moves the survivors into a fresh table, so churn never leaves tombstones
/// that would make the table grow past its cap.
///
/// A slot costs `size_of::<K>()` + 12 bytes (4 of hash, 8 of state; rounded up to
/// alignment) plus one control byte, see [`slot_bytes`](Self::slot_bytes); tables keep
/// a load factor of at most 7/8. Measured (benches/token_bucket.rs): about 46 bytes per
/// `IpAddr` key at the default cap, 4.3 MB in all, the same after a million distinct
/// keys.
///
/// # Hot path
///
/// For a key that already has a bucket: one clock read (the time-stamp counter, see
/// [`TokenBucket`](crate::TokenBucket)), one aHash of the key, a read lock of its shard
/// and one compare-and-swap. No allocation.
///
/// Clones share the buckets.
///
/// ```
/// use resilience::{Burst, KeyedTokenBuckets, Rate};
/// use std::net::IpAddr;
///
/// let buckets = KeyedTokenBuckets::<IpAddr>::with_max_keys(Rate::per_second(1.0), Burst(2), 10_000);
/// assert_eq!(buckets.max_keys(), 10_000);
/// let a: IpAddr = "192.0.2.1".parse().unwrap();
/// let b: IpAddr = "192.0.2.2".parse().unwrap();
/// assert_eq!(buckets.try_acquire(&a).unwrap().remaining(), 1);
/// assert_eq!(buckets.try_acquire(&a).unwrap().remaining(), 0);
/// assert!(buckets.try_acquire(&a).is_err());
/// assert!(buckets.try_acquire(&b).is_ok()); // keys are independent
/// assert_eq!(buckets.len(), 2);
/// ```
pub struct KeyedTokenBuckets<K> {
    inner: Arc<KeyedInner<K>>,
}

struct KeyedInner<K> {
    gcra: Gcra,
    clock: Elapsed,
    /// aHash, keyed at random per map: a few nanoseconds for a key where SipHash takes
    /// about 20, and still not predictable by a client choosing keys to collide.
    hasher: ahash::RandomState,
    shards: Box<[Shard<K>]>,
    max_keys: usize,
}

/// One lock per shard; aligned so two shards never share a cache line.
#[repr(align(128))]
struct Shard<K> {
    map: RwLock<Map<K>>,
    cap: usize,
}

type Map<K> = HashMap<Stored<K>, AtomicU64, BuildHasherDefault<PreHashed>>;

/// A key with (part of) its hash, so the map never hashes the key a second time.
struct Stored<K> {
    hash: u32,
    key: K,
}

/// A borrowed view of a key and its hash: what lookups use, so a lookup does not need an
/// owned (cloned) key. `Stored<K>: Borrow<dyn Lookup<K>>` makes `HashMap::get` accept it.
trait Lookup<K> {
    fn hash32(&self) -> u32;
    fn key(&self) -> &K;
}

impl<K> Lookup<K> for Stored<K> {
    fn hash32(&self) -> u32 {
        self.hash
    }
    fn key(&self) -> &K {
        &self.key
    }
}

impl<K> Lookup<K> for (u32, &K) {
    fn hash32(&self) -> u32 {
        self.0
    }
    fn key(&self) -> &K {
        self.1
    }
}

impl<'a, K: 'a> Borrow<dyn Lookup<K> + 'a> for Stored<K> {
    fn borrow(&self) -> &(dyn Lookup<K> + 'a) {
        self
    }
}

impl<K> Hash for dyn Lookup<K> + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u32(self.hash32());
    }
}

impl<K: Eq> PartialEq for dyn Lookup<K> + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.hash32() == other.hash32() && self.key() == other.key()
    }
}

impl<K: Eq> Eq for dyn Lookup<K> + '_ {}

impl<K> Hash for Stored<K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Must match `dyn Lookup`'s impl: HashMap requires equal hashes through `Borrow`.
        state.write_u32(self.hash);
    }
}

impl<K: Eq> PartialEq for Stored<K> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.key == other.key
    }
}

impl<K: Eq> Eq for Stored<K> {}

/// The map's hasher: the key was hashed already, only spread the stored bits over 64.
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        // The multiply moves entropy into the top bits, which hashbrown uses for its
        // control bytes; the low bits (bucket index) stay a bijection of the input.
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u32` is ever called; stay correct anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n);
    }
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // A panic while holding the lock (in a user's `Hash`/`Eq`) cannot leave the map
    // inconsistent in a way that matters: every value is a self-contained atomic.
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl<K> KeyedTokenBuckets<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// Buckets of `rate` and `burst`, at most [`DEFAULT_MAX_KEYS`] keys.
    ///
    /// # Panics
    ///
    /// On the same parameters as [`TokenBucket::new`](crate::TokenBucket::new); see
    /// [`try_new`](KeyedTokenBuckets::try_new).
    #[track_caller]
    pub fn new(rate: Rate, burst: Burst) -> Self {
        Self::with_max_keys(rate, burst, DEFAULT_MAX_KEYS)
    }

    /// Like [`new`](KeyedTokenBuckets::new), but returns an error instead of panicking.
    pub fn try_new(rate: Rate, burst: Burst) -> Result<Self, InvalidTokenBucket> {
        Self::try_with_max_keys(rate, burst, DEFAULT_MAX_KEYS)
    }

    /// Buckets of `rate` and `burst`, at most `max_keys` keys (see the type's docs for
    /// what is evicted at the cap).
    ///
    /// # Panics
    ///
    /// When `max_keys` is 0, and on the parameters [`new`](KeyedTokenBuckets::new)
    /// panics on; see [`try_with_max_keys`](KeyedTokenBuckets::try_with_max_keys).
    #[track_caller]
    pub fn with_max_keys(rate: Rate, burst: Burst, max_keys: usize) -> Self {
        match Self::try_with_max_keys(rate, burst, max_keys) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`with_max_keys`](KeyedTokenBuckets::with_max_keys), but returns an error
    /// instead of panicking.
    pub fn try_with_max_keys(
        rate: Rate,
        burst: Burst,
        max_keys: usize,
    ) -> Result<Self, InvalidTokenBucket> {
        let gcra = Gcra::new(rate, burst)?;
        check_max_keys(max_keys)?;
        Ok(Self::with_gcra(gcra, max_keys))
    }

    /// `max_keys` is at least 1 (see `check_max_keys`).
    pub(crate) fn with_gcra(gcra: Gcra, max_keys: usize) -> Self {
        debug_assert!(max_keys >= 1);
        let max_keys = max_keys.max(1);
        let wanted = (max_keys / MIN_KEYS_PER_SHARD).clamp(1, MAX_SHARDS);
        // Largest power of two <= wanted, so the shard index is a mask.
        let shards = 1usize << (usize::BITS - 1 - wanted.leading_zeros());
        let (base, extra) = (max_keys / shards, max_keys % shards);
        let shards = (0..shards)
            .map(|i| Shard {
                map: RwLock::new(Map::default()),
                // Spread the remainder so the caps add up to exactly `max_keys`.
                cap: base + usize::from(i < extra),
            })
            .collect();
        KeyedTokenBuckets {
            inner: Arc::new(KeyedInner {
                gcra,
                clock: Elapsed::new(),
                hasher: ahash::RandomState::new(),
                shards,
                max_keys,
            }),
        }
    }

    #[inline]
    fn now(&self) -> u64 {
        self.inner.clock.nanos()
    }

    #[inline]
    fn locate(&self, key: &K) -> (u32, &Shard<K>) {
        let hash = self.inner.hasher.hash_one(key);
        let shards = &self.inner.shards;
        // Bits 48.. pick the shard; the map uses the low 32 (see `PreHashed`), so keys of
        // one shard still spread over its whole table.
        let index = (hash >> 48) as usize & (shards.len() - 1);
        (hash as u32, &shards[index])
    }

    /// Takes one token from `key`'s bucket.
    #[inline]
    pub fn try_acquire(&self, key: &K) -> Result<Acquired, RateLimited> {
        self.try_acquire_n(key, 1)
    }

    /// Takes `n` tokens from `key`'s bucket, or none. As
    /// [`TokenBucket::try_acquire_n`](crate::TokenBucket::try_acquire_n): `retry_after` is
    /// exact, and `n > burst` fails with `retry_after` = [`Duration::MAX`].
    #[inline]
    pub fn try_acquire_n(&self, key: &K, n: u32) -> Result<Acquired, RateLimited> {
        self.check(key, n).map_err(|r| r.limited)
    }

    /// Takes `n` tokens; the refusal also carries the bucket's fill state.
    #[inline]
    pub(crate) fn check(&self, key: &K, n: u32) -> Result<Acquired, Rejected> {
        let now = self.now();
        let gcra = &self.inner.gcra;
        let (hash, shard) = self.locate(key);
        {
            let map = read(&shard.map);
            if let Some(cell) = map.get(&(hash, key) as &dyn Lookup<K>) {
                return match gcra.acquire(cell, now, n) {
                    Ok(tat) => Ok(Acquired::new(gcra, tat, now)),
                    Err(d) => Err(Rejected::new(gcra, d, now)),
                };
            }
        }
        self.insert(
            key,
            hash,
            shard,
            now,
            |cell| gcra.acquire(cell, now, n),
            || {
                // A key without a bucket has a full one.
                (n <= gcra.burst()).then(|| gcra.fresh(now, n))
            },
        )
        .map(|tat| Acquired::new(gcra, tat, now))
        .map_err(|d| Rejected::new(gcra, d, now))
    }

    /// The slow path: the key has no bucket (or had none a moment ago).
    #[cold]
    fn insert(
        &self,
        key: &K,
        hash: u32,
        shard: &Shard<K>,
        now: u64,
        existing: impl FnOnce(&AtomicU64) -> Result<u64, super::bucket::Denied>,
        fresh: impl FnOnce() -> Option<u64>,
    ) -> Result<u64, super::bucket::Denied> {
        let mut map = write(&shard.map);
        if let Some(cell) = map.get(&(hash, key) as &dyn Lookup<K>) {
            // Another thread created it between our two locks.
            return existing(cell);
        }
        let Some(tat) = fresh() else {
            // Refused even on a full bucket: store nothing for it.
            return existing(&AtomicU64::new(0));
        };
        if map.len() >= shard.cap {
            evict(&mut map, now, shard.cap);
        }
        map.insert(
            Stored {
                hash,
                key: key.clone(),
            },
            AtomicU64::new(tat),
        );
        Ok(tat)
    }

    /// Books `n` tokens of `key`'s bucket if they are there within `max_wait`; returns
    /// the wait. For wait mode.
    pub(crate) fn reserve(
        &self,
        key: &K,
        n: u32,
        max_wait: Duration,
    ) -> Result<Duration, RateLimited> {
        let now = self.now();
        let gcra = &self.inner.gcra;
        let max_wait = u64::try_from(max_wait.as_nanos()).unwrap_or(u64::MAX);
        let (hash, shard) = self.locate(key);
        let result = {
            let map = read(&shard.map);
            map.get(&(hash, key) as &dyn Lookup<K>)
                .map(|cell| gcra.reserve(cell, now, n, max_wait))
        };
        let result = match result {
            Some(r) => r,
            None => self
                .insert(
                    key,
                    hash,
                    shard,
                    now,
                    |cell| gcra.reserve(cell, now, n, max_wait),
                    || (n <= gcra.burst()).then(|| gcra.fresh(now, n)),
                )
                // A fresh bucket grants at once.
                .map(|_| 0),
        };
        result
            .map(Duration::from_nanos)
            .map_err(|d| d.rate_limited())
    }

    /// A guard giving `n` booked tokens back to `key` unless committed.
    pub(crate) fn reservation(&self, key: &K, n: u32) -> Reservation {
        let this = self.clone();
        let key = key.clone();
        Reservation::new(move || {
            let (hash, shard) = this.locate(&key);
            let map = read(&shard.map);
            // If the bucket was evicted meanwhile it is gone or fresh; nothing to give back.
            if let Some(cell) = map.get(&(hash, &key) as &dyn Lookup<K>) {
                this.inner.gcra.refund(cell, n);
            }
        })
    }

    fn tat(&self, key: &K) -> Option<u64> {
        let (hash, shard) = self.locate(key);
        let map = read(&shard.map);
        map.get(&(hash, key) as &dyn Lookup<K>)
            .map(|cell| cell.load(Ordering::Relaxed))
    }

    /// Whole tokens `key` could take now (the burst for an unknown key).
    pub fn remaining(&self, key: &K) -> u32 {
        let now = self.now();
        match self.tat(key) {
            Some(tat) => self.inner.gcra.remaining(tat, now),
            None => self.inner.gcra.burst(),
        }
    }

    /// How long until `key`'s bucket is full again (zero for an unknown key).
    pub fn time_until_full(&self, key: &K) -> Duration {
        let now = self.now();
        let tat = self.tat(key).unwrap_or(0);
        Duration::from_nanos(self.inner.gcra.until_full(tat, now))
    }

    /// Removes every bucket that has refilled to full, which loses nothing; returns how
    /// many. Not needed for bounded memory (the cap does that), but lets a quiet server
    /// give memory back to its map (the tables keep their allocation).
    pub fn evict_full(&self) -> usize {
        let now = self.now();
        self.inner
            .shards
            .iter()
            .map(|shard| {
                let mut map = write(&shard.map);
                let before = map.len();
                let kept = map
                    .values()
                    .filter(|cell| cell.load(Ordering::Relaxed) > now)
                    .count();
                if kept < before {
                    rebuild(&mut map, kept, |tat| tat > now);
                }
                before - kept
            })
            .sum()
    }

    /// Number of keys that have a bucket. Never above [`max_keys`](Self::max_keys).
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| read(&s.map).len()).sum()
    }

    /// True when no key has a bucket.
    pub fn is_empty(&self) -> bool {
        self.inner.shards.iter().all(|s| read(&s.map).is_empty())
    }

    /// The hard cap on keys, as given to [`with_max_keys`](Self::with_max_keys)
    /// ([`DEFAULT_MAX_KEYS`] from [`new`](Self::new)).
    pub fn max_keys(&self) -> usize {
        self.inner.max_keys
    }

    /// The refill rate of every bucket.
    pub fn rate(&self) -> Rate {
        self.inner.gcra.rate()
    }

    /// The burst of every bucket.
    pub fn burst(&self) -> u32 {
        self.inner.gcra.burst()
    }

    /// Bytes one slot of the map takes: key, stored hash and state, padded, plus
    /// hashbrown's control byte. The table keeps its load at or under 7/8, and grows in
    /// powers of two, so a full map costs between `8/7` and `16/7` times this per key.
    pub fn slot_bytes() -> usize {
        std::mem::size_of::<(Stored<K>, AtomicU64)>() + 1
    }
}

/// One eviction pass over a full shard (see the type's docs for the rule).
fn evict<K: Eq>(map: &mut Map<K>, now: u64, cap: usize) {
    let target = (cap / 8).max(1);
    let mut sample = [0u64; SAMPLE];
    let mut sampled = 0;
    let mut full = 0;
    // hashbrown iterates in hash order, i.e. randomly: the first SAMPLE non-full TATs
    // are a fair sample.
    for cell in map.values() {
        let tat = cell.load(Ordering::Relaxed);
        if tat <= now {
            full += 1;
        } else if sampled < SAMPLE {
            sample[sampled] = tat;
            sampled += 1;
        }
    }
    let (threshold, mut budget) = if full >= target || sampled == 0 {
        (now, 0)
    } else {
        let need = target - full;
        let not_full = map.len() - full;
        // The sample's quantile for "the `need` earliest of the `not_full`".
        let rank = (need * sampled / not_full).min(sampled - 1);
        let sample = &mut sample[..sampled];
        let (_, &mut threshold, _) = sample.select_nth_unstable(rank);
        // The threshold is itself a TAT in the map, so at least one bucket goes.
        (threshold, need)
    };
    rebuild(map, cap, |tat| {
        if tat <= now {
            false
        } else if tat <= threshold && budget > 0 {
            budget -= 1;
            false
        } else {
            true
        }
    });
}

/// Moves the entries `keep` accepts into a fresh table sized for `capacity`.
///
/// `retain` would leave tombstones, and hashbrown answers an insert into a table with
/// no growth left by *doubling* it whenever it is over half full: a shard churning at its
/// cap would end up with twice the table it needs. A fresh table has no tombstones.
fn rebuild<K: Eq>(map: &mut Map<K>, capacity: usize, mut keep: impl FnMut(u64) -> bool) {
    let old = std::mem::replace(
        map,
        Map::with_capacity_and_hasher(capacity, Default::default()),
    );
    for (key, cell) in old {
        if keep(cell.load(Ordering::Relaxed)) {
            map.insert(key, cell);
        }
    }
}

impl<K> Clone for KeyedTokenBuckets<K> {
    fn clone(&self) -> Self {
        KeyedTokenBuckets {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K> fmt::Debug for KeyedTokenBuckets<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedTokenBuckets")
            .field("rate", &self.inner.gcra.rate())
            .field("burst", &self.inner.gcra.burst())
            .field("max_keys", &self.inner.max_keys)
            .field("shards", &self.inner.shards.len())
            .finish()
    }
}

/// The one check of a key cap, for [`KeyedTokenBuckets`] and the layer's builder.
pub(crate) fn check_max_keys(max_keys: usize) -> Result<(), InvalidTokenBucket> {
    if max_keys == 0 {
        return Err(InvalidTokenBucket::new(
            "max_keys 0".to_owned(),
            "the key cap must be at least 1",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_caps_add_up() {
        for max in [1, 3, 31, 32, 100, 1000, 100_000, 100_001] {
            let b = KeyedTokenBuckets::<u64>::with_max_keys(Rate::per_second(1.0), Burst(1), max);
            let total: usize = b.inner.shards.iter().map(|s| s.cap).sum();
            assert_eq!(total, max, "max_keys {max}");
            assert!(b.inner.shards.len().is_power_of_two());
        }
    }

    #[test]
    fn evict_prefers_full_then_earliest() {
        let mut map = Map::<u32>::default();
        for i in 0..16u32 {
            // TATs 1..=16; "now" = 4: keys 0..=3 are full.
            map.insert(Stored { hash: i, key: i }, AtomicU64::new(u64::from(i) + 1));
        }
        evict(&mut map, 4, 16);
        // cap 16 -> target 2; 4 are full, all of them go, nothing else.
        assert_eq!(map.len(), 12);
        evict(&mut map, 4, 16);
        // No full bucket left: the two earliest (TAT 5, 6) go.
        assert_eq!(map.len(), 10);
        let mut keys: Vec<u32> = map.keys().map(|s| s.key).collect();
        keys.sort_unstable();
        assert_eq!(keys, (6..16).collect::<Vec<_>>());
    }
}
