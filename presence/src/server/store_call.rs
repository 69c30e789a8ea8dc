//! The store-call policy: every store call of a handler runs under the store
//! timeout and the store circuit breaker, is counted in the metrics, and, after an
//! outage, first gives the outage back to the leases ([`OutageTracker`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use resilience::circuit_breaker::CircuitBreaker;

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
    pub(crate) breaker: CircuitBreaker,
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
        let permit = match self.breaker.try_acquire() {
            Ok(permit) => permit,
            Err(open) => {
                self.metrics.record_store_error(StoreErrorKind::CircuitOpen);
                return Err(ApiError::StoreUnavailable {
                    retry_after: open.retry_after,
                });
            }
        };
        let shard = node.map(|n| self.store.shard_of(n));
        // The store is only asked once the breaker has admitted the call.
        let attempt = async {
            if self.outage.pending(shard) {
                self.outage.recover(&self.store, shard).await?;
            }
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
                tracing::warn!(reason = %why, "store call failed");
                (
                    Err(ApiError::StoreUnavailable {
                        retry_after: STORE_RETRY_AFTER,
                    }),
                    Some(StoreErrorKind::Unavailable),
                )
            }
            Err(TimedOut { .. }) => {
                tracing::warn!(timeout = ?self.store_timeout, "store call timed out");
                (
                    Err(ApiError::StoreUnavailable {
                        retry_after: STORE_RETRY_AFTER,
                    }),
                    Some(StoreErrorKind::Timeout),
                )
            }
        };
        match kind {
            None => permit.success(),
            Some(kind) => {
                self.metrics.record_store_error(kind);
                // A call that failed at its first poll started just now.
                let started = attempt
                    .as_ref()
                    .armed_at()
                    .unwrap_or_else(tokio::time::Instant::now);
                self.outage.failed(started, shard);
                permit.failure();
            }
        }
        result
    }

    /// Runs a store call of background work (the expiry sweep) under the store
    /// timeout, marking the start of an outage when it fails; but outside the circuit
    /// breaker, so that it neither takes the half-open trial call nor hides the API's
    /// failures behind its own successes. Not run at all while the breaker is not
    /// closed or an outage is still to be given back (the next API call does that
    /// first; background work must not see the leases the outage ran down).
    pub(crate) async fn background<'s, T, F>(
        &'s self,
        call: impl FnOnce(&'s dyn Store) -> F,
    ) -> Option<T>
    where
        F: Future<Output = Result<T, StoreError>> + 's,
    {
        if self.outage.pending(None)
            || self.breaker.state() != resilience::circuit_breaker::CircuitState::Closed
        {
            return None;
        }
        let started = tokio::time::Instant::now();
        match deadline(self.store_timeout, call(&*self.store)).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(StoreError::Unavailable(why))) => {
                tracing::debug!(reason = %why, "background store call failed");
                self.outage.failed(started, None);
                None
            }
            Ok(Err(_)) => None,
            Err(TimedOut { .. }) => {
                self.outage.failed(started, None);
                None
            }
        }
    }
}
