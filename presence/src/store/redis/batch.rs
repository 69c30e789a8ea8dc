//! Heartbeats batched into calls of the [`HEARTBEATS`] script, and the hand-built
//! `EVALSHA` commands the store uses for every script.

use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, Script, ServerErrorKind};
use tokio::sync::{mpsc, oneshot};

use super::conn::RedisConnection;
use super::scripts::{status_arg, HEARTBEATS, SCRIPT_KEYS};
use super::{grace_ms, unavailable, DeploymentKeys};
use crate::model::{NodeId, Status};
use crate::store::StoreError;

/// One heartbeat waiting for [`batch_heartbeats`].
pub(super) struct HeartbeatJob {
    pub(super) node: NodeId,
    /// The lease, as [`lease_header`] writes it.
    pub(super) lease: String,
    pub(super) ttl_ms: u64,
    /// The new meta, serialized; `None` keeps the stored one.
    pub(super) meta: Option<String>,
    /// The new meta's labels (see [`labels_arg`](super::scripts::labels_arg)), with
    /// a new meta.
    pub(super) labels: Option<String>,
    /// The new status; `None` keeps the stored one.
    pub(super) status: Option<Status>,
    /// The [`HEARTBEATS`] code of this heartbeat.
    pub(super) reply: oneshot::Sender<Result<i64, StoreError>>,
}

/// Heartbeats in one [`HEARTBEATS`] call at most: bounds the call's argument list
/// and how long it keeps Redis busy.
const MAX_HEARTBEAT_BATCH: usize = 128;

/// [`HEARTBEATS`] calls in flight at once. While they are, new heartbeats wait in
/// the queue and go out together in the next call: under load the batches grow with
/// the load instead of the calls multiplying (each call costs Redis and the server a
/// fixed overhead: the script call, a command to encode, a reply to parse, a read
/// and a write on each side). Two rather than one, so that Redis works on the next
/// batch while the server answers the last one (measured: 5% more heartbeats per
/// second than one call at a time, and a shorter wait for each).
const MAX_CALLS_IN_FLIGHT: usize = 2;

/// The outcome of one [`HEARTBEATS`] call, with the heartbeats it carried.
type Call = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Vec<HeartbeatJob>, Result<Vec<i64>, StoreError>)> + Send>,
>;

/// Sends the heartbeats that wait in `queue` to Redis: as many as are waiting (up
/// to [`MAX_HEARTBEAT_BATCH`]) in one [`HEARTBEATS`] call, at most
/// [`MAX_CALLS_IN_FLIGHT`] calls at a time, pipelined on the multiplexed connection.
/// Ends when the store (every sender) is gone and the last call has answered.
///
/// Under load this is what makes a heartbeat cheap: Redis pays the call and its
/// three commands once per batch, not per heartbeat, and the server one command to
/// encode and one reply to parse per batch. A lone heartbeat goes out at once,
/// alone: batching costs it one task switch.
///
/// A batch holds heartbeats with one TTL (the script takes it once) and at most one
/// per node (so none has to see another's write); the first heartbeat that does not
/// fit starts the next batch, so each node's heartbeats stay in order (the
/// connection keeps the calls in order).
pub(super) async fn batch_heartbeats(
    conn: RedisConnection,
    keys: DeploymentKeys,
    mut queue: mpsc::UnboundedReceiver<HeartbeatJob>,
) {
    let mut calls: FuturesUnordered<Call> = FuturesUnordered::new();
    let mut next: Option<HeartbeatJob> = None;
    let mut open = true;
    loop {
        let room = calls.len() < MAX_CALLS_IN_FLIGHT;
        tokio::select! {
            biased;
            Some((jobs, codes)) = calls.next(), if !calls.is_empty() => answer(jobs, codes),
            first = next_job(&mut next, &mut queue), if room && open => match first {
                Some(first) => {
                    // Let the other ready requests queue theirs before the call goes out.
                    tokio::task::yield_now().await;
                    let jobs = fill_batch(first, &mut queue, &mut next);
                    calls.push(call(conn.clone(), &keys, jobs));
                }
                None => open = false,
            },
            else => return,
        }
    }
}

/// The heartbeat that starts the next batch: the one left over, or the next queued.
async fn next_job(
    next: &mut Option<HeartbeatJob>,
    queue: &mut mpsc::UnboundedReceiver<HeartbeatJob>,
) -> Option<HeartbeatJob> {
    match next.take() {
        Some(job) => Some(job),
        None => queue.recv().await,
    }
}

/// `first` and the queued heartbeats that fit in its batch; the first one that does
/// not goes to `next`.
fn fill_batch(
    first: HeartbeatJob,
    queue: &mut mpsc::UnboundedReceiver<HeartbeatJob>,
    next: &mut Option<HeartbeatJob>,
) -> Vec<HeartbeatJob> {
    let ttl_ms = first.ttl_ms;
    let mut jobs = vec![first];
    while jobs.len() < MAX_HEARTBEAT_BATCH {
        match queue.try_recv() {
            // Linear, but over at most MAX_HEARTBEAT_BATCH short ids.
            Ok(job) if job.ttl_ms == ttl_ms && jobs.iter().all(|j| j.node != job.node) => {
                jobs.push(job);
            }
            Ok(job) => {
                *next = Some(job);
                break;
            }
            Err(_) => break,
        }
    }
    jobs
}

/// One [`HEARTBEATS`] call for `jobs`. The command is built by hand rather than
/// through `Script::key/arg`, which allocates every argument on its own before
/// copying it into the command.
fn call(mut conn: RedisConnection, keys: &DeploymentKeys, jobs: Vec<HeartbeatJob>) -> Call {
    // Three numbers (grace, TTL, retention) and two strings per heartbeat, five
    // for one that changes meta or status (see `HEARTBEATS`).
    let bytes = jobs
        .iter()
        .map(|j| {
            let meta = j.meta.as_ref().map_or(0, String::len);
            let labels = j.labels.as_ref().map_or(0, String::len);
            j.node.as_str().len() + j.lease.len() + meta + labels + 1
        })
        .sum::<usize>()
        + 40;
    let mut cmd = evalsha(&HEARTBEATS, keys, 3 + 2 * jobs.len(), bytes);
    cmd.arg(grace_ms())
        .arg(jobs.first().map_or(0, |j| j.ttl_ms));
    for job in &jobs {
        cmd.arg(job.node.as_str());
        if job.meta.is_none() && job.status.is_none() {
            cmd.arg(&job.lease);
        } else {
            cmd.arg(format!("+{}", job.lease))
                .arg(job.meta.as_deref().unwrap_or(""))
                .arg(job.status.map_or("", status_arg))
                .arg(job.labels.as_deref().unwrap_or(""));
        }
    }
    cmd.arg(keys.retention_ms());
    Box::pin(async move {
        let codes = eval(&mut conn, &HEARTBEATS, &cmd)
            .await
            .map_err(unavailable);
        (jobs, codes)
    })
}

/// Hands each heartbeat of a call its result.
fn answer(jobs: Vec<HeartbeatJob>, codes: Result<Vec<i64>, StoreError>) {
    let codes = match codes {
        Ok(codes) if codes.len() == jobs.len() => codes.into_iter().map(Ok).collect(),
        Ok(codes) => {
            let e = StoreError::Unavailable(format!(
                "redis: {} heartbeat results for {} heartbeats",
                codes.len(),
                jobs.len()
            ));
            vec![Err(e); jobs.len()]
        }
        Err(e) => vec![Err(e); jobs.len()],
    };
    for (job, code) in jobs.into_iter().zip(codes) {
        // The caller may have given up (timeout); nobody to tell.
        let _ = job.reply.send(code);
    }
}

/// `EVALSHA <script> 5 <nodes> <records> <feed> <epoch> <watermark>` (see
/// [`SCRIPT_KEYS`]), to which the caller adds the arguments.
///
/// `args` and `bytes` are how many more arguments, of how many bytes in all, the
/// caller adds: the command's buffers are allocated once at that size instead of
/// growing argument by argument.
pub(super) fn evalsha(script: &Script, keys: &DeploymentKeys, args: usize, bytes: usize) -> Cmd {
    let fixed = [
        "EVALSHA",
        script.get_hash(),
        "9",
        &keys.nodes,
        &keys.records,
        &keys.feed,
        &keys.epoch,
        &keys.swept,
        &keys.index,
        &keys.counts,
        &keys.labels,
        &keys.labelled,
    ];
    debug_assert_eq!(fixed.len(), 3 + SCRIPT_KEYS);
    let mut cmd = Cmd::with_capacity(
        fixed.len() + args,
        fixed.iter().map(|a| a.len()).sum::<usize>() + bytes,
    );
    for arg in fixed {
        cmd.arg(arg);
    }
    cmd
}

/// Runs an [`evalsha`] command; on `NOSCRIPT` (a Redis restarted or after `SCRIPT
/// FLUSH`) loads the script and runs it again.
///
/// A connection that turns out to be dead (Redis closed it for idleness, `CLIENT
/// KILL`, a failover) is replaced and the call sent once more: the manager only
/// notices a dead connection when a call fails on it, and the first call after an
/// idle period must not be a `503` for that. Sending again is safe: every script
/// either did not run, or runs again to the same state (a login or heartbeat
/// under the same lease writes the same record; a logout already done answers
/// `removed: false`).
pub(super) async fn eval<T: FromRedisValue>(
    conn: &mut RedisConnection,
    script: &Script,
    cmd: &Cmd,
) -> Result<T, RedisError> {
    let first = match cmd.query_async(conn).await {
        Err(e) if e.is_unrecoverable_error() => {
            tracing::debug!(error = %e, "redis connection lost; reconnecting and sending again");
            cmd.query_async(conn).await
        }
        other => other,
    };
    match first {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        other => other,
    }
}
