//! [`RedisBuckets`]: token buckets kept in Redis, shared by every process that uses the
//! same Redis and prefix.

use std::{
    fmt,
    hash::Hash,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use ::redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    Script,
};

use super::super::{
    bucket::{Acquired, Denied, Gcra, Rejected},
    error::{InvalidTokenBucket, RateLimited},
    keyed::{check_max_keys, KeyedTokenBuckets, DEFAULT_MAX_KEYS},
    rate::{Burst, Rate},
};

/// The local bucket's GCRA, on Redis: the state is the key's theoretical arrival time
/// (TAT), in microseconds of the server's clock (`TIME`), so every process decides on
/// one clock. Microseconds because Lua numbers are doubles: nanoseconds since 1970 are
/// past 2^53, microseconds are not. The key expires once the bucket is full again, so
/// idle clients cost Redis nothing.
///
/// KEYS[1]: the bucket. ARGV: microseconds per token, `burst * interval`, tokens taken.
/// Returns `{1, µs until full}` when granted, `{0, µs until it would be, µs until full}`
/// when refused; both rounded up, so a retry after `retry_after` is never early.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  tat = math.max(tonumber(stored), now)
end
local new_tat = tat + n * interval
local limit = now + tau
if new_tat > limit then
  return {0, math.ceil(new_tat - limit), math.ceil(tat - now)}
end
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.ceil(new_tat - now)}
";

/// What [`RedisBuckets`] does when Redis fails or does not answer within the
/// [timeout](RedisBucketsBuilder::timeout). Every time it runs is counted
/// ([`RedisBuckets::fallbacks`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisFallback {
    /// Decide on local buckets of the same rate and burst, one set per process: each
    /// process then allows up to the whole limit on its own, so N processes allow up to
    /// N times it while Redis is away. The default: a limit stays, traffic flows.
    Local,
    /// Let the request through: availability over the limit.
    Allow,
    /// Refuse the request (`retry_after` = one token's interval): the limit over
    /// availability.
    Deny,
}

/// Token buckets per key kept in Redis, so that several processes (the servers behind
/// one load balancer) share one limit per key.
///
/// Each decision is one round trip: an `EVALSHA` of one Lua script running the same
/// GCRA as [`KeyedTokenBuckets`] on the server's clock (`TIME`), so the processes'
/// clocks do not matter. Guarantee, over all processes together: at most
/// `burst + rate * t` tokens in any interval of length `t` (tested with three layers on
/// one bucket, under any interleaving).
///
/// Keys are `<prefix>{<key>}`: the key's `Display` form inside a hash tag, so a Redis
/// Cluster spreads clients over its slots while one client's bucket stays in one.
///
/// Each decision is bounded by a [timeout](RedisBucketsBuilder::timeout) (default 50
/// ms); on an error or a timeout the [fallback](RedisFallback) decides instead, and
/// [`fallbacks`](Self::fallbacks) counts it.
///
/// Clones share the connection, the counters and the local fallback buckets. Use it
/// through [`RedisTokenBucketLayer`](super::RedisTokenBucketLayer), or directly:
///
/// ```no_run
/// use std::time::Duration;
/// use resilience::{Burst, Rate, RedisBuckets, RedisFallback};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1:6379")?;
/// let buckets: RedisBuckets<String> = RedisBuckets::builder(client, Rate::per_second(10.0), Burst(20))
///     .prefix("myapp:rl:")
///     .timeout(Duration::from_millis(20))
///     .fallback(RedisFallback::Local)
///     .build();
/// match buckets.try_acquire(&"tenant-7".to_owned()).await {
///     Ok(acquired) => println!("{} left", acquired.remaining()),
///     Err(limited) => println!("retry after {:?}", limited.retry_after),
/// }
/// # Ok(())
/// # }
/// ```
pub struct RedisBuckets<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    conn: ConnectionManager,
    script: Script,
    gcra: Gcra,
    /// The script's ARGV[1] and ARGV[2]: microseconds per token, per burst.
    interval_us: String,
    tau_us: String,
    prefix: String,
    timeout: Duration,
    fallback: RedisFallback,
    local: KeyedTokenBuckets<K>,
    fallbacks: AtomicU64,
}

/// Builds [`RedisBuckets`]; get one from [`RedisBuckets::builder`].
#[must_use = "call .build() to get RedisBuckets"]
pub struct RedisBucketsBuilder {
    client: ::redis::Client,
    rate: Rate,
    burst: Burst,
    prefix: String,
    timeout: Duration,
    fallback: RedisFallback,
    max_keys: usize,
}

/// The default bound on one decision's round trip.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);

impl RedisBucketsBuilder {
    /// What every key starts with (default `resilience:tb:`): one prefix per limit,
    /// shared by every process that enforces it.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The bound on one decision, connecting included (default
    /// [`DEFAULT_REDIS_TIMEOUT`], 50 ms); past it the [fallback](Self::fallback)
    /// decides.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What decides when Redis fails or times out (default [`RedisFallback::Local`]).
    pub fn fallback(mut self, fallback: RedisFallback) -> Self {
        self.fallback = fallback;
        self
    }

    /// The key cap of the local fallback buckets (default [`DEFAULT_MAX_KEYS`]). Redis
    /// itself needs none: a key expires when its bucket is full again.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// The buckets. Connects lazily, on the first decision, from a task the `redis`
    /// connection manager spawns: so it must be called within a tokio runtime.
    ///
    /// # Panics
    ///
    /// On the parameters [`TokenBucket::new`](crate::TokenBucket::new) panics on, a key
    /// cap of 0, a Redis client the connection manager refuses, or outside a tokio
    /// runtime; see [`try_build`](Self::try_build).
    #[track_caller]
    pub fn build<K>(self) -> RedisBuckets<K>
    where
        K: Hash + Eq + Clone + fmt::Display + Send + Sync + 'static,
    {
        match self.try_build() {
            Ok(buckets) => buckets,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`build`](Self::build), but returns an error instead of panicking.
    pub fn try_build<K>(self) -> Result<RedisBuckets<K>, InvalidTokenBucket>
    where
        K: Hash + Eq + Clone + fmt::Display + Send + Sync + 'static,
    {
        let gcra = Gcra::new(self.rate, self.burst)?;
        check_max_keys(self.max_keys)?;
        if tokio::runtime::Handle::try_current().is_err() {
            // The connection manager would panic in `tokio::spawn`, less helpfully.
            return Err(InvalidTokenBucket::new(
                "RedisBuckets built outside a tokio runtime".to_owned(),
                "the Redis connection manager spawns a task: build within the runtime",
            ));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(self.client, config).map_err(|e| {
            InvalidTokenBucket::new(format!("redis client: {e}"), "the client was refused")
        })?;
        Ok(RedisBuckets {
            inner: Arc::new(Inner {
                conn,
                script: Script::new(GCRA),
                gcra,
                interval_us: (gcra.interval() as f64 / 1e3).to_string(),
                tau_us: (gcra.tau() as f64 / 1e3).to_string(),
                prefix: self.prefix,
                timeout: self.timeout,
                fallback: self.fallback,
                local: KeyedTokenBuckets::with_gcra(gcra, self.max_keys),
                fallbacks: AtomicU64::new(0),
            }),
        })
    }
}

impl fmt::Debug for RedisBucketsBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBucketsBuilder")
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("fallback", &self.fallback)
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

impl RedisBuckets<()> {
    /// Starts building buckets of `rate` and `burst` in the Redis of `client`; the key
    /// type is chosen by [`build`](RedisBucketsBuilder::build).
    pub fn builder(client: ::redis::Client, rate: Rate, burst: Burst) -> RedisBucketsBuilder {
        RedisBucketsBuilder {
            client,
            rate,
            burst,
            prefix: "resilience:tb:".to_owned(),
            timeout: DEFAULT_REDIS_TIMEOUT,
            fallback: RedisFallback::Local,
            max_keys: DEFAULT_MAX_KEYS,
        }
    }
}

impl<K> RedisBuckets<K>
where
    K: Hash + Eq + Clone + fmt::Display + Send + Sync + 'static,
{
    /// Takes one token from `key`'s bucket. As
    /// [`KeyedTokenBuckets::try_acquire`], on the shared bucket.
    pub async fn try_acquire(&self, key: &K) -> Result<Acquired, RateLimited> {
        self.check(key, 1).await.map_err(|r| r.limited)
    }

    /// Takes `n` tokens from `key`'s bucket, or none; `n > burst` fails at once with
    /// `retry_after` = [`Duration::MAX`], without a round trip.
    pub async fn try_acquire_n(&self, key: &K, n: u32) -> Result<Acquired, RateLimited> {
        self.check(key, n).await.map_err(|r| r.limited)
    }

    /// Takes `n` tokens; the refusal carries the bucket's fill state.
    pub(crate) async fn check(&self, key: &K, n: u32) -> Result<Acquired, Rejected> {
        let inner = &*self.inner;
        let gcra = &inner.gcra;
        if n > gcra.burst() {
            // Can never pass: no round trip for it.
            let denied = Denied {
                tat: 0,
                retry_after: u64::MAX,
            };
            return Err(Rejected::new(gcra, denied, 0));
        }
        let redis_key = format!("{}{{{}}}", inner.prefix, key);
        let mut conn = inner.conn.clone();
        let mut invocation = inner.script.key(redis_key);
        invocation.arg(&inner.interval_us).arg(&inner.tau_us).arg(n);
        let reply = tokio::time::timeout(
            inner.timeout,
            invocation.invoke_async::<Vec<i64>>(&mut conn),
        )
        .await;
        let failure = match reply {
            Ok(Ok(reply)) => match decode(gcra, &reply) {
                Some(decision) => return decision,
                None => format!("unexpected reply {reply:?}"),
            },
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", inner.timeout),
        };
        inner.fallbacks.fetch_add(1, Ordering::Relaxed);
        // Per decision at `debug`: a Redis outage would otherwise log once per request.
        tracing::debug!(error = %failure, fallback = ?inner.fallback, "shared rate limit: Redis failed");
        match inner.fallback {
            RedisFallback::Local => inner.local.check(key, n),
            // A full bucket's figures: the client is told nothing is used up.
            RedisFallback::Allow => Ok(Acquired::new(gcra, 0, 0)),
            RedisFallback::Deny => Err(Rejected::new(
                gcra,
                Denied {
                    tat: gcra.tau(),
                    retry_after: gcra.interval(),
                },
                0,
            )),
        }
    }

    /// How many decisions the [fallback](RedisFallback) made, Redis having failed or
    /// timed out, since the buckets were built.
    pub fn fallbacks(&self) -> u64 {
        self.inner.fallbacks.load(Ordering::Relaxed)
    }

    /// The refill rate of every bucket.
    pub fn rate(&self) -> Rate {
        self.inner.gcra.rate()
    }

    /// The burst of every bucket.
    pub fn burst(&self) -> u32 {
        self.inner.gcra.burst()
    }

    /// The key prefix, as given to [`prefix`](RedisBucketsBuilder::prefix).
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The bound on one decision, as given to
    /// [`timeout`](RedisBucketsBuilder::timeout).
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The fallback, as given to [`fallback`](RedisBucketsBuilder::fallback).
    pub fn fallback(&self) -> RedisFallback {
        self.inner.fallback
    }

    /// The local buckets [`RedisFallback::Local`] decides on.
    pub fn local_buckets(&self) -> &KeyedTokenBuckets<K> {
        &self.inner.local
    }
}

impl<K> RedisBuckets<K> {
    pub(crate) fn gcra(&self) -> &Gcra {
        &self.inner.gcra
    }
}

/// The script's reply as a decision; `None` if it is not one of the two shapes.
fn decode(gcra: &Gcra, reply: &[i64]) -> Option<Result<Acquired, Rejected>> {
    let micros = |v: i64| u64::try_from(v).ok().map(|v| v.saturating_mul(1000));
    match *reply {
        [1, until_full] => Some(Ok(Acquired::new(gcra, micros(until_full)?, 0))),
        [0, retry_after, until_full] => {
            let denied = Denied {
                tat: micros(until_full)?,
                retry_after: micros(retry_after)?,
            };
            Some(Err(Rejected::new(gcra, denied, 0)))
        }
        _ => None,
    }
}

impl<K> Clone for RedisBuckets<K> {
    fn clone(&self) -> Self {
        RedisBuckets {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K> fmt::Debug for RedisBuckets<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBuckets")
            .field("rate", &self.inner.gcra.rate())
            .field("burst", &self.inner.gcra.burst())
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("fallback", &self.inner.fallback)
            .field("fallbacks", &self.inner.fallbacks.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}
