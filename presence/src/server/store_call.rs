//! The store-call policy: every store call of a handler runs under the store
//! timeout and the circuit breaker of each shard it concerns ([`StoreBreakers`]), is
//! counted in the metrics, and, after an outage, first gives the outage back to the
//! leases ([`OutageTracker`]).

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use resilience::circuit_breaker::{BreakerPermit, CircuitBreaker, CircuitOpen, CircuitState};

use super::deadline::{deadline, TimedOut};
use super::errors::ApiError;
use super::list::ListCoalescer;
use super::metrics::{Metrics, StoreErrorKind};
use super::outage::OutageTracker;
use super::watch::Watchers;
use crate::model::NodeId;
use crate::store::{Store, StoreError};

/// Everything the handlers share. One per [`PresenceService`](super::PresenceService).
pub(crate) struct State {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) breakers: StoreBreakers,
    pub(crate) outage: Arc<OutageTracker>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) store_timeout: Duration,
    /// How long a request body may take to arrive (`408` after it).
    pub(crate) body_timeout: Duration,
    pub(crate) ttl_ms: u64,
    pub(crate) heartbeat_ms: u64,
    pub(crate) max_meta_bytes: usize,
    /// Batches concurrent `GET /presence` into shared listings.
    pub(crate) list: ListCoalescer,
    /// The open watch streams.
    pub(crate) watchers: Arc<Watchers>,
}

/// How long a client should wait after a store failure that was not a breaker
/// rejection (the breaker knows better when it will let calls through again).
const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Consecutive store failures (errors or timeouts) that open a shard's breaker.
const BREAKER_FAILURES: u32 = 5;
/// How long a shard's breaker stays open before it lets one trial call through.
/// Short, because a Redis that is back should be used again within a heartbeat (and
/// the server serves again within 2 s of it, reconnection included).
const BREAKER_OPEN_FOR: Duration = Duration::from_secs(1);

/// The store's circuit breakers: one per shard, so that an outage of one shard (one
/// master of a Redis Cluster) fails fast for that shard's nodes alone while the
/// others carry on. A call about every shard (a listing, the stats) needs every
/// breaker to let it through and counts for each of them.
///
/// `presence_store_circuit_state` shows the worst shard's state.
pub(crate) struct StoreBreakers {
    shards: Box<[CircuitBreaker]>,
}

/// What the breakers let through: a call about one shard, or about every shard.
enum Permits {
    One(BreakerPermit),
    Every(Vec<BreakerPermit>),
}

impl Permits {
    fn record(self, failed: bool) {
        match self {
            Permits::One(permit) => permit.record(failed),
            Permits::Every(permits) => permits.into_iter().for_each(|p| p.record(failed)),
        }
    }
}

impl StoreBreakers {
    /// One breaker for each of `shards` shards, reporting to `metrics` and the log.
    pub(crate) fn new(shards: usize, metrics: Arc<Metrics>) -> Self {
        let count = shards.max(1);
        let states: Arc<[AtomicI64]> = (0..count).map(|_| AtomicI64::new(0)).collect();
        let shards = (0..count)
            .map(|shard| {
                let (metrics, states) = (metrics.clone(), states.clone());
                CircuitBreaker::builder()
                    .consecutive_failures(BREAKER_FAILURES)
                    .open_for(BREAKER_OPEN_FOR)
                    .on_state_change(move |t| {
                        let gauge = match t.to {
                            CircuitState::Closed | CircuitState::Disabled => 0,
                            CircuitState::HalfOpen => 1,
                            CircuitState::Open | CircuitState::ForcedOpen => 2,
                        };
                        states[shard].store(gauge, Ordering::Relaxed);
                        let worst = states.iter().map(|s| s.load(Ordering::Relaxed)).max();
                        metrics.set_circuit_state(worst.unwrap_or(0));
                        if t.to == CircuitState::Open {
                            tracing::warn!(shard, from = %t.from, "store circuit breaker opened: failing fast with 503");
                        } else {
                            tracing::info!(shard, from = %t.from, to = %t.to, "store circuit breaker changed state");
                        }
                    })
                    .build()
            })
            .collect();
        StoreBreakers { shards }
    }

    /// Permits for a call about `shard` (`None`: about every shard), or the first
    /// open breaker's rejection (the permits taken before it are dropped unused).
    fn acquire(&self, shard: Option<usize>) -> Result<Permits, CircuitOpen> {
        match shard.and_then(|i| self.shards.get(i)) {
            Some(breaker) => breaker.try_acquire().map(Permits::One),
            None => self
                .shards
                .iter()
                .map(CircuitBreaker::try_acquire)
                .collect::<Result<_, _>>()
                .map(Permits::Every),
        }
    }

    /// Whether the breaker of `shard` is closed.
    fn closed(&self, shard: usize) -> bool {
        self.shards
            .get(shard)
            .is_some_and(|b| b.state() == CircuitState::Closed)
    }
}

impl State {
    /// Runs one store call under the store timeout and the circuit breaker.
    ///
    /// `NotFound` and `LeaseMismatch` are answers, so they count as breaker successes;
    /// so does `Refused` (Redis out of memory or read-only: it still answers reads,
    /// so the breaker must not take reads and `/readyz` down with the writes). Only
    /// `Unavailable` and timeouts are failures. `node` names the node in a
    /// `404` message. After an outage, the first call gives the outage back to the
    /// leases ([`OutageTracker`]) before its own call, within the same timeout: for
    /// a call about `node`, the outage of its shard; otherwise, of every shard.
    pub(crate) async fn guarded<'s, T, F>(
        &'s self,
        node: Option<&NodeId>,
        call: impl FnOnce(&'s dyn Store) -> F,
    ) -> Result<T, ApiError>
    where
        F: Future<Output = Result<T, StoreError>> + 's,
    {
        let shard = node.map(|n| self.store.shard_of(n));
        let permits = match self.breakers.acquire(shard) {
            Ok(permits) => permits,
            Err(open) => {
                self.metrics.record_store_error(StoreErrorKind::CircuitOpen);
                return Err(ApiError::StoreUnavailable {
                    retry_after: open.retry_after,
                });
            }
        };
        // The store is only asked once the breaker has admitted the call.
        let attempt = async {
            self.outage.recover(&self.store, shard).await?;
            call(&*self.store).await
        };
        let attempt = deadline(self.store_timeout, attempt);
        tokio::pin!(attempt);
        let outcome = attempt.as_mut().await;
        let (result, kind) = match outcome {
            Ok(Ok(value)) => (Ok(value), None),
            Ok(Err(StoreError::NotFound)) => (
                Err(ApiError::NodeNotFound(
                    node.map(|n| n.as_str().to_owned()).unwrap_or_default(),
                )),
                None,
            ),
            Ok(Err(StoreError::LeaseMismatch)) => (Err(ApiError::LeaseMismatch), None),
            Ok(Err(StoreError::Refused(why))) => {
                self.metrics.record_store_error(StoreErrorKind::Refused);
                (Err(ApiError::StoreRefused(why)), None)
            }
            Ok(Err(StoreError::Unavailable(why))) => {
                tracing::warn!(reason = %why, shard, "store call failed");
                (
                    Err(ApiError::StoreUnavailable {
                        retry_after: STORE_RETRY_AFTER,
                    }),
                    Some(StoreErrorKind::Unavailable),
                )
            }
            Err(TimedOut { .. }) => {
                tracing::warn!(timeout = ?self.store_timeout, shard, "store call timed out");
                (
                    Err(ApiError::StoreUnavailable {
                        retry_after: STORE_RETRY_AFTER,
                    }),
                    Some(StoreErrorKind::Timeout),
                )
            }
        };
        match kind {
            None => permits.record(false),
            Some(kind) => {
                self.metrics.record_store_error(kind);
                // A call that failed at its first poll started just now.
                let started = attempt
                    .as_ref()
                    .armed_at()
                    .unwrap_or_else(tokio::time::Instant::now);
                self.outage.failed(started, shard);
                permits.record(true);
            }
        }
        result
    }

    /// Runs a store call of background work (the expiry sweep) on shard `shard`
    /// under the store timeout, marking the start of that shard's outage when it
    /// fails; but outside the circuit breakers, so that it neither takes a half-open
    /// trial call nor hides the API's failures behind its own successes. Not run at
    /// all while the shard's breaker is not closed. Background work must not see the
    /// leases an outage ran down, so a pending outage of the shard is given back
    /// first, as an API call would: a shard that no API call reaches (no node of it
    /// heartbeats) must not stay unswept, nor its outage grow. The other shards carry
    /// on meanwhile.
    pub(crate) async fn background<T, F>(
        &self,
        shard: usize,
        call: impl FnOnce(Arc<dyn Store>) -> F,
    ) -> Option<T>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        if !self.breakers.closed(shard) {
            return None;
        }
        let attempt = async {
            self.outage.recover(&self.store, Some(shard)).await?;
            call(crate::store::shard(&self.store, shard)).await
        };
        let started = tokio::time::Instant::now();
        match deadline(self.store_timeout, attempt).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(StoreError::Unavailable(why))) => {
                tracing::debug!(reason = %why, shard, "background store call failed");
                self.outage.failed(started, Some(shard));
                None
            }
            Ok(Err(_)) => None,
            Err(TimedOut { .. }) => {
                self.outage.failed(started, Some(shard));
                None
            }
        }
    }
}
