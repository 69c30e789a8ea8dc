//! Heartbeats batched into calls of the [`HEARTBEATS`] script, and the hand-built
//! `EVALSHA` commands the store uses for every script.

use redis::aio::ConnectionManager;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, Script, ServerErrorKind};
use tokio::sync::{mpsc, oneshot};

use super::scripts::HEARTBEATS;
use super::{grace_ms, unavailable, DeploymentKeys};
use crate::model::NodeId;
use crate::store::StoreError;

/// One heartbeat waiting for [`batch_heartbeats`].
pub(super) struct HeartbeatJob {
    pub(super) node: NodeId,
    /// The lease, as [`lease_header`] writes it.
    pub(super) lease: String,
    pub(super) ttl_ms: u64,
    /// The new meta, serialized; `None` keeps the stored one.
    pub(super) meta: Option<String>,
    /// The [`HEARTBEATS`] code of this heartbeat.
    pub(super) reply: oneshot::Sender<Result<i64, StoreError>>,
}

/// Heartbeats in one [`HEARTBEATS`] call at most: bounds the call's argument list
/// and how long it keeps Redis busy.
const MAX_HEARTBEAT_BATCH: usize = 128;

/// Sends the heartbeats that wait in `queue` to Redis, as many as are waiting (up
/// to [`MAX_HEARTBEAT_BATCH`]) in one [`HEARTBEATS`] call, each call in its own
/// task so that calls overlap on the multiplexed connection. Ends when the store
/// (every sender) is gone.
///
/// Under load this is what makes a heartbeat cheap: Redis pays the call and its
/// three commands once per batch, not per heartbeat, and the server one command to
/// encode and one reply to parse per batch. A lone heartbeat goes out at once,
/// alone: batching costs it one task switch.
///
/// A batch holds heartbeats with one TTL (the script takes it once) and at most one
/// per node (so none has to see another's write); the first heartbeat that does not
/// fit starts the next batch, so each node's heartbeats stay in order.
pub(super) async fn batch_heartbeats(
    conn: ConnectionManager,
    keys: DeploymentKeys,
    mut queue: mpsc::UnboundedReceiver<HeartbeatJob>,
) {
    let grace = grace_ms();
    let mut next: Option<HeartbeatJob> = None;
    loop {
        let first = match next.take() {
            Some(job) => job,
            None => match queue.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let ttl_ms = first.ttl_ms;
        let mut jobs = vec![first];
        // Let the other ready requests queue theirs before the call goes out.
        tokio::task::yield_now().await;
        while jobs.len() < MAX_HEARTBEAT_BATCH {
            match queue.try_recv() {
                // Linear, but over at most MAX_HEARTBEAT_BATCH short ids.
                Ok(job) if job.ttl_ms == ttl_ms && jobs.iter().all(|j| j.node != job.node) => {
                    jobs.push(job);
                }
                Ok(job) => {
                    next = Some(job);
                    break;
                }
                Err(_) => break,
            }
        }
        // The command is built by hand rather than through `Script::key/arg`, which
        // allocates every argument on its own before copying it into the command.
        let mut call = evalsha(&HEARTBEATS, &keys);
        call.arg(grace).arg(ttl_ms);
        for job in &jobs {
            call.arg(job.node.as_str())
                .arg(&job.lease)
                .arg(job.meta.as_deref().unwrap_or(""));
        }
        let mut conn = conn.clone();
        tokio::spawn(async move {
            let codes: Result<Vec<i64>, StoreError> = eval(&mut conn, &HEARTBEATS, &call)
                .await
                .map_err(unavailable);
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
        });
    }
}

/// `EVALSHA <script> 2 <nodes> <records>`, to which the caller adds the arguments.
pub(super) fn evalsha(script: &Script, keys: &DeploymentKeys) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash())
        .arg(2)
        .arg(&keys.nodes)
        .arg(&keys.records);
    cmd
}

/// Runs an [`evalsha`] command; on `NOSCRIPT` (a Redis restarted or after `SCRIPT
/// FLUSH`) loads the script and runs it again.
pub(super) async fn eval<T: FromRedisValue>(
    conn: &mut ConnectionManager,
    script: &Script,
    cmd: &Cmd,
) -> Result<T, RedisError> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        other => other,
    }
}
