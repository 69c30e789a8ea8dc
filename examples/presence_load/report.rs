//! What a run measured: counters and latency histograms per phase ([`PhaseStats`]),
//! and the report printed at the end ([`Report`]: a table, and with `--json` one line).

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

fn latency_histogram() -> Histogram<u64> {
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
    pub note: Option<String>,
}

impl Report {
    /// True when the steady phase ran and had at least one successful request.
    pub fn success(&self) -> bool {
        self.phases.iter().any(|p| p.name() == "steady" && p.ok > 0)
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
            "note": self.note,
        })
        .to_string()
    }
}
