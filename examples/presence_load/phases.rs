//! The phases of a run: logging the nodes in, then the steady phase of each mode, each
//! worker on a connection of its own, their counters merged at the end.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::StatusCode;
use tokio::task::JoinHandle;

use crate::cli::Options;
use crate::client::{Conn, Exchange, Target};
use crate::report::PhaseStats;

/// Sleep after a failed connect so a dead server is not hammered by a busy loop.
async fn connect_backoff(ex: &Exchange) {
    if ex.connect_failed() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Awaits worker tasks and merges their counters. A panicked worker is counted, not fatal.
async fn gather(
    name: &'static str,
    tasks: Vec<JoinHandle<PhaseStats>>,
    start: Instant,
) -> PhaseStats {
    let mut total = PhaseStats::new(name);
    for task in tasks {
        match task.await {
            Ok(stats) => total.merge(stats),
            Err(_) => total.transport_error("worker_panicked"),
        }
    }
    total.elapsed = start.elapsed();
    total
}

/// Logs in nodes `0..n` with `concurrency` workers pulling from a shared counter.
/// Returns each node's heartbeat request (None where the login failed).
pub async fn login(
    target: &Arc<Target>,
    n: usize,
    concurrency: usize,
) -> (PhaseStats, Vec<Option<Bytes>>) {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.min(n) {
        let (target, next) = (target.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(target);
            let mut stats = PhaseStats::new("login");
            let mut leases = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let (ex, heartbeat) = conn.login(i).await;
                stats.record(&ex);
                if let Some(body) = heartbeat {
                    leases.push((i, body));
                }
                connect_backoff(&ex).await;
            }
            stats.reconnects = conn.reconnects;
            (stats, leases)
        }));
    }
    let mut total = PhaseStats::new("login");
    let mut heartbeats = vec![None; n];
    for task in tasks {
        match task.await {
            Ok((stats, leases)) => {
                total.merge(stats);
                for (i, body) in leases {
                    heartbeats[i] = Some(body);
                }
            }
            Err(_) => total.transport_error("worker_panicked"),
        }
    }
    total.elapsed = start.elapsed();
    (total, heartbeats)
}

/// What a closed-loop worker sends.
enum Work {
    /// Heartbeat requests, cycled through (never empty).
    Heartbeats(Vec<Bytes>),
    /// `GET` of the node list.
    List(Bytes),
}

/// Sends requests back to back on one connection until `deadline`.
async fn closed_loop(target: Arc<Target>, work: Work, deadline: Instant) -> PhaseStats {
    let mut conn = Conn::new(target.clone());
    let mut stats = PhaseStats::new("steady");
    let mut next = 0;
    while Instant::now() < deadline {
        let req = match &work {
            Work::Heartbeats(requests) => {
                let req = requests[next].clone();
                next = (next + 1) % requests.len();
                req
            }
            Work::List(req) => req.clone(),
        };
        let ex = conn.exchange(&req, false).await;
        stats.record(&ex);
        connect_backoff(&ex).await;
    }
    stats.reconnects = conn.reconnects;
    stats
}

/// Heartbeat requests as `flood` sends them, with a made-up lease: the bare server
/// reads and ignores them.
pub fn bare_requests(target: &Target, nodes: usize) -> Vec<Bytes> {
    (0..nodes)
        .map(|i| target.heartbeat_request(i, "0123456789abcdef0123456789abcdef"))
        .collect()
}

/// `flood` / `bare`: each worker cycles over its own share of `requests` (never empty).
pub async fn flood(target: &Arc<Target>, requests: &[Bytes], opts: &Options) -> PhaseStats {
    let c = opts.concurrency;
    let start = Instant::now();
    let deadline = start + opts.duration;
    let tasks = (0..c)
        .map(|w| {
            let mine: Vec<Bytes> = if w < requests.len() {
                requests.iter().skip(w).step_by(c).cloned().collect()
            } else {
                // More connections than nodes: several connections share a node.
                vec![requests[w % requests.len()].clone()]
            };
            tokio::spawn(closed_loop(
                target.clone(),
                Work::Heartbeats(mine),
                deadline,
            ))
        })
        .collect();
    gather("steady", tasks, start).await
}

/// `list`: every worker lists back to back.
pub async fn list(target: &Arc<Target>, opts: &Options) -> PhaseStats {
    let start = Instant::now();
    let deadline = start + opts.duration;
    let req = target.list_request();
    let tasks = (0..opts.concurrency)
        .map(|_| {
            tokio::spawn(closed_loop(
                target.clone(),
                Work::List(req.clone()),
                deadline,
            ))
        })
        .collect();
    gather("steady", tasks, start).await
}

/// `nodes`: node `i` belongs to worker `i % workers`; each worker keeps a timer queue of
/// its nodes and sends their heartbeats on its one connection when they are due.
pub async fn nodes(
    target: &Arc<Target>,
    heartbeats: Vec<Option<Bytes>>,
    opts: &Options,
) -> PhaseStats {
    let n = heartbeats.len();
    let workers = opts.concurrency.min(n);
    let mut shares: Vec<Vec<(usize, Option<Bytes>)>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, body) in heartbeats.into_iter().enumerate() {
        shares[i % workers].push((i, body));
    }
    let start = Instant::now();
    let deadline = start + opts.duration;
    let interval = opts.interval;
    let tasks = shares
        .into_iter()
        .enumerate()
        .map(|(w, nodes)| {
            let rng = Rng::seeded(w as u64);
            tokio::spawn(node_worker(
                target.clone(),
                nodes,
                start,
                deadline,
                interval,
                rng,
            ))
        })
        .collect();
    let mut stats = gather("steady", tasks, start).await;
    stats.target_rps = Some(n as f64 / interval.as_secs_f64());
    stats
}

async fn node_worker(
    target: Arc<Target>,
    mut nodes: Vec<(usize, Option<Bytes>)>,
    start: Instant,
    deadline: Instant,
    interval: Duration,
    mut rng: Rng,
) -> PhaseStats {
    let mut conn = Conn::new(target.clone());
    let mut stats = PhaseStats::new("steady");
    // First heartbeats spread over one interval: the run starts at the steady rate, not a burst.
    let mut due: BinaryHeap<Reverse<(Instant, usize)>> = (0..nodes.len())
        .map(|k| Reverse((start + interval.mul_f64(rng.next_f64()), k)))
        .collect();
    let late_after = interval / 10;
    while let Some(Reverse((at, k))) = due.pop() {
        if at >= deadline {
            break;
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        let sent = Instant::now();
        let lag = sent.saturating_duration_since(at);
        stats.max_lag = stats.max_lag.max(lag);
        if lag > late_after {
            stats.late += 1;
        }
        let (i, heartbeat) = &mut nodes[k];
        let mut login = heartbeat.is_none();
        if let Some(req) = heartbeat.clone() {
            let ex = conn.exchange(&req, false).await;
            stats.record(&ex);
            // Like the client SDK: a node that is no longer online logs in again at once.
            login = ex.result == Ok(StatusCode::NOT_FOUND);
            connect_backoff(&ex).await;
        }
        if login {
            let (ex, body) = conn.login(*i).await;
            stats.record(&ex);
            stats.relogins += 1;
            *heartbeat = body;
            connect_backoff(&ex).await;
        }
        // Scheduled from the actual send time: a lagging worker does not burst to catch up.
        due.push(Reverse((
            sent + interval.mul_f64(0.9 + 0.2 * rng.next_f64()),
            k,
        )));
    }
    stats.reconnects = conn.reconnects;
    stats
}

/// Small SplitMix64 generator for jitter; quality needs are low and seeding from the
/// clock keeps two runs from being phase-locked.
struct Rng(u64);

impl Rng {
    fn seeded(stream: u64) -> Rng {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng(now ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
