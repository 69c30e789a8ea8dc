//! The server's half of self-preservation (the rule is in the
//! [store docs](crate::store#outages-self-preservation)): noticing when the store became
//! unavailable and when it came back, and giving the outage back to the leases before
//! any other call reaches the store again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::store::{Store, StoreError, MAX_PRESERVED_OUTAGE, MIN_PRESERVED_OUTAGE};

/// Tracks the current store outage of each shard of the store, if any. One per
/// service; shared by its clones.
///
/// A call about one node concerns its shard alone; a call about every node (a
/// listing, the stats) concerns them all. An outage of one shard (one Redis master
/// of a cluster) is given back to that shard's leases alone, and calls to the other
/// shards carry on meanwhile.
pub(crate) struct OutageTracker {
    epoch: Instant,
    /// Start of each shard's current outage: milliseconds after `epoch`, plus one
    /// (0 = none).
    since: Vec<AtomicU64>,
    /// One recovery at a time; calls that arrive meanwhile wait for it.
    recovery: tokio::sync::Mutex<()>,
    ttl_ms: u64,
    store_timeout: Duration,
}

/// Longest a recovery may take (paging through every record of a large deployment);
/// a recovery cut off here leaves the leases it had not reached yet as they were.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

impl OutageTracker {
    pub(crate) fn new(shards: usize, ttl_ms: u64, store_timeout: Duration) -> Self {
        OutageTracker {
            epoch: Instant::now(),
            since: (0..shards.max(1)).map(|_| AtomicU64::new(0)).collect(),
            recovery: tokio::sync::Mutex::new(()),
            ttl_ms,
            store_timeout,
        }
    }

    fn stamp(&self, at: Instant) -> u64 {
        let ms = at.saturating_duration_since(self.epoch).as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX - 1) + 1
    }

    /// The shards a call of `shard` concerns (`None`: every one).
    fn scope(&self, shard: Option<usize>) -> &[AtomicU64] {
        match shard {
            Some(i) if i < self.since.len() => &self.since[i..=i],
            _ => &self.since,
        }
    }

    /// A store call of `shard` (`None`: of every shard) that started at `started`
    /// failed (error or timeout): the outage began no later than that.
    pub(crate) fn failed(&self, started: Instant, shard: Option<usize>) {
        let stamp = self.stamp(started);
        for since in self.scope(shard) {
            let mut current = since.load(Ordering::Relaxed);
            while current == 0 || stamp < current {
                match since.compare_exchange_weak(
                    current,
                    stamp,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(actual) => current = actual,
                }
            }
        }
    }

    /// Whether an outage of `shard` (`None`: of any shard) is pending recovery. One
    /// atomic load for a shard: the hot path.
    fn pending(&self, shard: Option<usize>) -> bool {
        self.scope(shard)
            .iter()
            .any(|since| since.load(Ordering::Relaxed) != 0)
    }

    /// Gives the pending outage of `shard` (`None`: of every shard) back to the
    /// leases (once, whoever asks first), then clears it; nothing when none is
    /// pending, which is one atomic load for a shard (the hot path). Runs in its own
    /// task, so a caller that gives up (its store timeout) cannot cut a recovery in
    /// half; later callers wait for it.
    ///
    /// # Errors
    /// The store failed during the recovery: the outage stays pending.
    pub(crate) async fn recover(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
        shard: Option<usize>,
    ) -> Result<(), StoreError> {
        if !self.pending(shard) {
            return Ok(());
        }
        let task = tokio::spawn(Self::run_recoveries(self.clone(), store.clone(), shard));
        match task.await {
            Ok(result) => result,
            Err(e) => Err(StoreError::Unavailable(format!(
                "outage recovery task failed: {e}"
            ))),
        }
    }

    /// Recovers each shard in the scope of `shard` that has an outage pending.
    async fn run_recoveries(
        this: Arc<Self>,
        store: Arc<dyn Store>,
        shard: Option<usize>,
    ) -> Result<(), StoreError> {
        let _one_at_a_time = this.recovery.lock().await;
        let shards = match shard {
            Some(i) => i..i + 1,
            None => 0..this.since.len(),
        };
        for i in shards {
            if let Some(since) = this.since.get(i) {
                this.run_recovery(i, since, &*crate::store::shard(&store, i))
                    .await?;
            }
        }
        Ok(())
    }

    async fn run_recovery(
        &self,
        shard: usize,
        outage_since: &AtomicU64,
        store: &dyn Store,
    ) -> Result<(), StoreError> {
        let since = outage_since.load(Ordering::Relaxed);
        if since == 0 {
            return Ok(()); // recovered by the call before us
        }
        // The outage ends when the store answers, not when we ask: a hung store
        // (paused, partitioned) runs queued commands when it comes back, and a length
        // measured before sending would be stale by then.
        tokio::time::timeout(self.store_timeout, store.ping())
            .await
            .map_err(|_| StoreError::Unavailable("ping timed out".into()))??;
        let outage = Duration::from_millis(self.stamp(Instant::now()).saturating_sub(since));
        if outage >= MIN_PRESERVED_OUTAGE {
            let given = outage.min(MAX_PRESERVED_OUTAGE);
            let moved = tokio::time::timeout(
                RECOVERY_TIMEOUT,
                store.extend_after_outage(given, self.ttl_ms),
            )
            .await
            .map_err(|_| StoreError::Unavailable("outage recovery timed out".into()))??;
            tracing::warn!(
                shard,
                outage = ?outage,
                extended_by = ?given,
                leases = moved,
                "store is back after an outage; leases it interrupted were extended by its length"
            );
        } else {
            tracing::info!(shard, outage = ?outage, "store is back after a short outage");
        }
        // Failures recorded meanwhile come from calls that were sent before the store
        // answered again: part of the outage just given back, so they are dropped.
        outage_since.store(0, Ordering::Relaxed);
        Ok(())
    }
}
