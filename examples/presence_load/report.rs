//! What a run measured: counters and latency histograms per phase ([`PhaseStats`]),
//! what the watch streams saw in `watch` and `expiry` modes ([`WatchStats`]), and the
//! report printed at the end ([`Report`]: a table, and with `--json` one line).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::cli::Mode;
use crate::client::Exchange;

/// Latencies are recorded in nanoseconds and clamped at 2^40 ns (about 18 minutes, far
/// beyond any request timeout).
const LATENCY_MAX_NS: u64 = 1 << 40;
/// Two significant digits: every reported value is within 1/128 (< 0.8 %) of the true
/// one, in about 35 KB per histogram (one per connection); three digits would take
/// about 260 KB each.
const LATENCY_DIGITS: u8 = 2;

pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_NS, LATENCY_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// Counters of one phase (login or steady), merged over all workers.
#[derive(Clone, Debug)]
pub struct PhaseStats {
    name: &'static str,
    latency: Histogram<u64>,
    ok: u64,
    status_errors: BTreeMap<u16, u64>,
    transport_errors: BTreeMap<&'static str, u64>,
    bytes_in: u64,
    pub reconnects: u64,
    pub elapsed: Duration,
    /// `nodes` mode only: the intended request rate.
    pub target_rps: Option<f64>,
    pub late: u64,
    pub max_lag: Duration,
    pub relogins: u64,
}

impl PhaseStats {
    pub fn new(name: &'static str) -> PhaseStats {
        PhaseStats {
            name,
            latency: latency_histogram(),
            ok: 0,
            status_errors: BTreeMap::new(),
            transport_errors: BTreeMap::new(),
            bytes_in: 0,
            reconnects: 0,
            elapsed: Duration::ZERO,
            target_rps: None,
            late: 0,
            max_lag: Duration::ZERO,
            relogins: 0,
        }
    }

    /// Counts one request.
    pub fn record(&mut self, ex: &Exchange) {
        if let Some(latency) = ex.latency {
            let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
            self.latency.saturating_record(ns);
        }
        self.bytes_in += ex.bytes_in;
        match ex.result {
            Ok(status) if status.is_success() => self.ok += 1,
            Ok(status) => *self.status_errors.entry(status.as_u16()).or_default() += 1,
            Err(kind) => self.transport_error(kind),
        }
    }

    /// Counts a failure that is not a request's, like a worker that panicked.
    pub fn transport_error(&mut self, kind: &'static str) {
        *self.transport_errors.entry(kind).or_default() += 1;
    }

    /// Adds another worker's counters to these.
    pub fn merge(&mut self, other: PhaseStats) {
        self.latency
            .add(&other.latency)
            .expect("the histograms share their bounds");
        self.ok += other.ok;
        for (status, n) in other.status_errors {
            *self.status_errors.entry(status).or_default() += n;
        }
        for (kind, n) in other.transport_errors {
            *self.transport_errors.entry(kind).or_default() += n;
        }
        self.bytes_in += other.bytes_in;
        self.reconnects += other.reconnects;
        self.late += other.late;
        self.max_lag = self.max_lag.max(other.max_lag);
        self.relogins += other.relogins;
    }

    /// Phase name: `login` or `steady`.
    fn name(&self) -> &'static str {
        self.name
    }

    /// Requests attempted: successes plus errors of any kind.
    fn requests(&self) -> u64 {
        self.ok + self.errors()
    }

    /// Non-2xx responses plus transport failures (connect, timeout, broken connection).
    fn errors(&self) -> u64 {
        self.status_errors.values().sum::<u64>() + self.transport_errors.values().sum::<u64>()
    }

    /// Requests per second over the phase's wall-clock time.
    fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.requests() as f64 / secs
        } else {
            0.0
        }
    }

    /// p50, p99, p99.9, max and mean latency in ms (0 when nothing was recorded).
    fn latency_ms(&self) -> [f64; 5] {
        let h = &self.latency;
        [
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.value_at_quantile(0.999)),
            ms(h.max()),
            round3(h.mean() / 1e6),
        ]
    }

    fn error_summary(&self) -> String {
        let parts: Vec<String> = self
            .status_errors
            .iter()
            .map(|(status, n)| format!("HTTP {status} x {n}"))
            .chain(
                self.transport_errors
                    .iter()
                    .map(|(kind, n)| format!("{kind} x {n}")),
            )
            .collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let statuses: serde_json::Map<String, serde_json::Value> = self
            .status_errors
            .iter()
            .map(|(s, n)| (s.to_string(), (*n).into()))
            .collect();
        let transport: serde_json::Map<String, serde_json::Value> = self
            .transport_errors
            .iter()
            .map(|(k, n)| ((*k).to_owned(), (*n).into()))
            .collect();
        let [p50, p99, p999, max, mean] = self.latency_ms();
        let schedule = self.target_rps.map(|rps| {
            serde_json::json!({
                "target_rps": round3(rps),
                "late": self.late,
                "max_lag_ms": round3(self.max_lag.as_secs_f64() * 1e3),
                "relogins": self.relogins,
            })
        });
        serde_json::json!({
            "name": self.name,
            "elapsed_s": round3(self.elapsed.as_secs_f64()),
            "requests": self.requests(),
            "ok": self.ok,
            "errors": self.errors(),
            "status_errors": statuses,
            "transport_errors": transport,
            "throughput_rps": round3(self.throughput()),
            "latency_ms": {
                "p50": p50,
                "p99": p99,
                "p999": p999,
                "max": max,
                "mean": mean,
            },
            "bytes_in": self.bytes_in,
            "reconnects": self.reconnects,
            "schedule": schedule,
        })
    }
}

fn ms(ns: u64) -> f64 {
    round3(ns as f64 / 1e6)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Result of a run: one entry per phase, in order.
#[derive(Clone, Debug)]
pub struct Report {
    pub mode: Mode,
    pub url: String,
    pub addr: SocketAddr,
    pub nodes: usize,
    pub concurrency: usize,
    pub duration: Duration,
    pub phases: Vec<PhaseStats>,
    /// `watch` and `expiry` modes: what the watchers saw.
    pub watch: Option<WatchStats>,
    pub note: Option<String>,
}

impl Report {
    /// True when the steady phase ran and had at least one successful request.
    pub fn success(&self) -> bool {
        match &self.watch {
            Some(watch) => watch.success(),
            None => self.phases.iter().any(|p| p.name() == "steady" && p.ok > 0),
        }
    }

    /// The human-readable summary block. The README's scripts read the requests/s of
    /// the steady phase as the 5th field of the first line starting with `steady `.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "== presence_load: mode {}, {} ({}), {} nodes, {} connections, {:.1} s ==\n",
            self.mode.name(),
            self.url,
            self.addr,
            self.nodes,
            self.concurrency,
            self.duration.as_secs_f64(),
        );
        out.push_str(&format!(
            "{:<7} {:>10} {:>10} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
            "phase",
            "requests",
            "ok",
            "errors",
            "req/s",
            "p50 ms",
            "p99 ms",
            "p999 ms",
            "max ms",
            "mean ms"
        ));
        for p in &self.phases {
            let [p50, p99, p999, max, mean] = p.latency_ms();
            out.push_str(&format!(
                "{:<7} {:>10} {:>10} {:>8} {:>10.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}\n",
                p.name(),
                p.requests(),
                p.ok,
                p.errors(),
                p.throughput(),
                p50,
                p99,
                p999,
                max,
                mean,
            ));
        }
        for p in &self.phases {
            let avg = p.bytes_in.checked_div(p.latency.len()).unwrap_or(0);
            out.push_str(&format!(
                "{}: {:.2} s, avg response {} B, {} reconnects, errors: {}\n",
                p.name(),
                p.elapsed.as_secs_f64(),
                avg,
                p.reconnects,
                p.error_summary(),
            ));
            if let Some(rps) = p.target_rps {
                out.push_str(&format!(
                    "{}: schedule target {:.1} req/s, {} late (>10% of the interval), max lag {:.3} ms, {} re-logins\n",
                    p.name(),
                    rps,
                    p.late,
                    p.max_lag.as_secs_f64() * 1e3,
                    p.relogins,
                ));
            }
        }
        if self
            .phases
            .iter()
            .any(|p| p.status_errors.contains_key(&429))
        {
            out.push_str(
                "hint: 429 = the server's per-client rate limit; start it with \
                 PRESENCE_RATE_LIMIT_RATE=1000000 PRESENCE_RATE_LIMIT_CAPACITY=1000000\n",
            );
        }
        if let Some(watch) = &self.watch {
            out.push_str(&watch.summary());
        }
        if let Some(note) = &self.note {
            out.push_str(&format!("note: {note}\n"));
        }
        out
    }

    /// The report as one JSON line.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "mode": self.mode.name(),
            "url": self.url,
            "addr": self.addr.to_string(),
            "nodes": self.nodes,
            "concurrency": self.concurrency,
            "duration_s": self.duration.as_secs_f64(),
            "phases": self.phases.iter().map(PhaseStats::to_json).collect::<Vec<_>>(),
            "watch": self.watch.as_ref().map(WatchStats::to_json),
            "note": self.note,
        })
        .to_string()
    }
}

/// What the watch streams of a `watch` or `expiry` run saw, merged over all watchers.
/// Latencies (join latency, or expiry lateness clamped at 0) are in nanoseconds.
#[derive(Clone, Debug)]
pub struct WatchStats {
    /// `watch` or `expiry`.
    pub mode: Mode,
    /// Streams asked for.
    pub watchers: usize,
    /// Streams that got their snapshot.
    pub ready: u64,
    /// Streams that never got their snapshot, by why.
    pub open_failures: BTreeMap<&'static str, u64>,
    /// Streams that ended after their snapshot, before the run stopped them, by why.
    pub disconnects: BTreeMap<&'static str, u64>,
    /// How long opening the streams (up to the last snapshot) took.
    pub open_elapsed: Duration,
    /// Nodes logged in during the run (the logins that succeeded).
    pub nodes_logged_in: u64,
    /// Events read: snapshot, join, update, leave.
    pub events: [u64; 4],
    /// `: keep-alive` comments read.
    pub keepalives: u64,
    /// Bytes read on the streams after their response head.
    pub bytes_in: u64,
    /// From the first login (with no logins: from the last snapshot) to the last
    /// join / update / leave read.
    pub window: Duration,
    /// One sample per (watcher, node): join latency, or lateness of the expiry.
    pub latency: Histogram<u64>,
    /// Samples there would be if every ready watcher saw every node once.
    pub expected: u64,
    /// Events of the sampled kind seen again for the same (watcher, node).
    pub duplicates: u64,
    /// join / leave events of nodes this run did not log in (or not yet).
    pub foreign: u64,
    /// `expiry`: samples read before the node's `expires_at_ms`, and the earliest (ms,
    /// negative) of them.
    pub early: u64,
    pub min_lateness_ms: f64,
    /// `expiry`: `leave` events of this run's nodes with a reason other than `expired`.
    pub other_leaves: u64,
}

impl WatchStats {
    pub fn new(mode: Mode, watchers: usize) -> WatchStats {
        WatchStats {
            mode,
            watchers,
            ready: 0,
            open_failures: BTreeMap::new(),
            disconnects: BTreeMap::new(),
            open_elapsed: Duration::ZERO,
            nodes_logged_in: 0,
            events: [0; 4],
            keepalives: 0,
            bytes_in: 0,
            window: Duration::ZERO,
            latency: latency_histogram(),
            expected: 0,
            duplicates: 0,
            foreign: 0,
            early: 0,
            min_lateness_ms: 0.0,
            other_leaves: 0,
        }
    }

    /// Streams still open when the run stopped them.
    pub fn connected_at_end(&self) -> u64 {
        self.ready
            .saturating_sub(self.disconnects.values().sum::<u64>())
    }

    /// Samples that never arrived.
    pub fn missing(&self) -> u64 {
        self.expected.saturating_sub(self.latency.len())
    }

    /// join + update + leave events per second over [`window`](Self::window): what the
    /// server delivered across all its watchers (fan-out).
    pub fn events_per_s(&self) -> f64 {
        let live: u64 = self.events[1..].iter().sum();
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            live as f64 / secs
        } else {
            0.0
        }
    }

    /// Every watcher got its snapshot, and (with nodes) samples arrived.
    pub fn success(&self) -> bool {
        self.ready == self.watchers as u64 && (self.expected == 0 || !self.latency.is_empty())
    }

    /// p50, p90, p99, max and mean in ms.
    fn latency_ms(&self) -> [f64; 5] {
        let h = &self.latency;
        [
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.9)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
            round3(h.mean() / 1e6),
        ]
    }

    fn what(&self) -> &'static str {
        if self.mode == Mode::Expiry {
            "expiry lateness"
        } else {
            "join latency"
        }
    }

    fn summary(&self) -> String {
        let kinds = |m: &BTreeMap<&'static str, u64>| {
            if m.is_empty() {
                "none".to_owned()
            } else {
                m.iter()
                    .map(|(k, n)| format!("{k} x {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let [snapshot, join, update, leave] = self.events;
        let [p50, p90, p99, max, mean] = self.latency_ms();
        let mut out = format!(
            "watchers: {} asked, {} got the snapshot in {:.2} s, open failures: {}; \
             disconnected: {} ({}); {} connected at the end\n",
            self.watchers,
            self.ready,
            self.open_elapsed.as_secs_f64(),
            kinds(&self.open_failures),
            self.disconnects.values().sum::<u64>(),
            kinds(&self.disconnects),
            self.connected_at_end(),
        );
        out.push_str(&format!(
            "events: {snapshot} snapshot, {join} join, {update} update, {leave} leave, {} keep-alive, \
             {} B; {:.0} events/s across all watchers over {:.2} s\n",
            self.keepalives,
            self.bytes_in,
            self.events_per_s(),
            self.window.as_secs_f64(),
        ));
        if self.expected > 0 || !self.latency.is_empty() {
            out.push_str(&format!(
                "{}: {} samples of {} expected ({} missing, {} duplicates, {} foreign), \
                 p50 {p50:.3} p90 {p90:.3} p99 {p99:.3} max {max:.3} mean {mean:.3} ms\n",
                self.what(),
                self.latency.len(),
                self.expected,
                self.missing(),
                self.duplicates,
                self.foreign,
            ));
        }
        if self.mode == Mode::Expiry {
            out.push_str(&format!(
                "expiry: {} of {} nodes reported expired per watcher on average; {} before \
                 expires_at_ms (earliest {:.3} ms); {} other leaves\n",
                self.latency.len() / (self.ready.max(1)),
                self.nodes_logged_in,
                self.early,
                self.min_lateness_ms,
                self.other_leaves,
            ));
        }
        out
    }

    fn to_json(&self) -> serde_json::Value {
        let kinds =
            |m: &BTreeMap<&'static str, u64>| -> serde_json::Map<String, serde_json::Value> {
                m.iter()
                    .map(|(k, n)| ((*k).to_owned(), (*n).into()))
                    .collect()
            };
        let [p50, p90, p99, max, mean] = self.latency_ms();
        let [snapshot, join, update, leave] = self.events;
        serde_json::json!({
            "watchers": self.watchers,
            "ready": self.ready,
            "open_failures": kinds(&self.open_failures),
            "disconnected": self.disconnects.values().sum::<u64>(),
            "disconnects": kinds(&self.disconnects),
            "connected_at_end": self.connected_at_end(),
            "open_elapsed_s": round3(self.open_elapsed.as_secs_f64()),
            "nodes_logged_in": self.nodes_logged_in,
            "events": {
                "snapshot": snapshot,
                "join": join,
                "update": update,
                "leave": leave,
                "keepalive": self.keepalives,
            },
            "bytes_in": self.bytes_in,
            "window_s": round3(self.window.as_secs_f64()),
            "events_per_s": round3(self.events_per_s()),
            "latency_of": if self.mode == Mode::Expiry { "expiry_lateness" } else { "join" },
            "samples": self.latency.len(),
            "expected": self.expected,
            "missing": self.missing(),
            "duplicates": self.duplicates,
            "foreign": self.foreign,
            "early": self.early,
            "min_lateness_ms": round3(self.min_lateness_ms),
            "other_leaves": self.other_leaves,
            "latency_ms": {
                "p50": p50,
                "p90": p90,
                "p99": p99,
                "max": max,
                "mean": mean,
            },
        })
    }
}
