//! The command line (`clap`, derive): flags, their checks, and what a run is told to do.

use std::time::Duration;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, ValueEnum};
use hyper::header::HeaderValue;

use crate::client::split_url;

const DEFAULT_URL: &str = "http://127.0.0.1:8080/presence";
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// What the generator does after the (optional) login phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Log the N nodes in, then each heartbeats every --interval-ms (open loop, at most C
    /// connections); a heartbeat answered 404 logs the node in again
    Nodes,
    /// Log the N nodes in, then C workers send heartbeats back to back (closed loop)
    Flood,
    /// Log the N nodes in (none with --nodes 0), then C workers GET the list back to back;
    /// the nodes are not kept alive, so they expire after the server's TTL
    List,
    /// Flood a bare hyper server (fixed 200 {"ok":true}) exactly like `flood`, as a
    /// baseline for the presence server's figures: an in-process one, or with an explicit
    /// --url the one at that address (`--serve-bare PORT` in another process)
    Bare,
    /// Open --watchers W streams of `GET /presence/watch` on --watch-url, wait for each
    /// snapshot, then log the N nodes in through --url at --rate R logins/s (for at most
    /// --duration); every watcher's `join` of a node gives a latency sample (now - the
    /// login's send time). With --nodes 0 it only holds the W streams open for --duration
    Watch,
    /// Open --watchers streams (default 1) on --watch-url, log the N nodes in through
    /// --url as fast as --login-concurrency allows, never heartbeat them, and time each
    /// `leave` `expired` event against the node's `expires_at_ms`; stops once every
    /// node was reported, or TTL + 10 s after the last login
    Expiry,
}

impl Mode {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Nodes => "nodes",
            Mode::Flood => "flood",
            Mode::List => "list",
            Mode::Bare => "bare",
            Mode::Watch => "watch",
            Mode::Expiry => "expiry",
        }
    }
}

const AFTER_HELP: &str = "\
Phases are reported separately (login, steady): requests, errors by status and by
transport failure, throughput, and latency p50 / p99 / p99.9 / max / mean in ms (time
from sending the request to the end of the response body, connect time excluded).
watch: the watchers that got their snapshot, failed or disconnected; the events delivered
per second across all watchers (fan-out: joins, updates, leaves from the first login to the
last event); the join latency p50 / p90 / p99 / max / mean in ms (login sent through --url
to the `join` read on a watcher); samples expected, missing and duplicated.
expiry: how many of the N nodes each watcher saw leave as `expired` (duplicates and
missing ones too), and the lateness p50 / p90 / p99 / max / mean in ms (wall clock when
the event was read, minus the node's `expires_at_ms` from its login reply).
Exit status: 0 when the steady phase had successful requests (watch: every watcher got
its snapshot and, with nodes, join samples arrived; expiry: expiries were reported),
1 otherwise, 2 on bad usage.";

/// The flags as given; [`parse`] turns them into a [`Command`].
#[derive(Debug, Parser)]
#[command(
    name = "presence_load",
    about = "presence_load: load generator for the presence HTTP API (meant for loopback use)",
    override_usage = "presence_load [OPTIONS]\n       presence_load --serve-bare PORT [--duration SECS]",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Base URL of the API (plain http) [default: http://127.0.0.1:8080/presence]
    #[arg(long, value_name = "URL", value_parser = url)]
    url: Option<String>,
    /// What to do after the login phase
    #[arg(long, value_enum, value_name = "MODE", default_value_t = Mode::Nodes)]
    mode: Mode,
    /// Simulated nodes, ids load-0 .. load-<N-1>
    #[arg(long, value_name = "N", default_value_t = 100)]
    nodes: usize,
    /// Keep-alive HTTP/1 connections, one worker each
    #[arg(long, value_name = "C", default_value_t = 64, value_parser = at_least_one::<usize>)]
    concurrency: usize,
    /// Connections for the login phase [default: --concurrency]; e.g. log 100000 nodes in
    /// over 64, then list over 1 (watch, expiry: the logins' connections)
    #[arg(long, value_name = "C", value_parser = at_least_one::<usize>)]
    login_concurrency: Option<usize>,
    /// Length of the steady phase in seconds, fractions allowed [default: 10]
    #[arg(long, value_name = "SECS", value_parser = seconds, allow_negative_numbers = true)]
    duration: Option<Duration>,
    /// Per-node heartbeat interval in `nodes` mode, +-10% jitter
    #[arg(long, value_name = "MS", default_value = "1000", value_parser = millis)]
    interval_ms: Duration,
    /// Per-request (and per-connect) timeout
    #[arg(long, value_name = "MS", default_value = "5000", value_parser = millis)]
    timeout_ms: Duration,
    /// `watch`, `expiry`: watch streams (`GET /presence/watch`) to open on --watch-url
    #[arg(long, value_name = "W", default_value_t = 1, value_parser = at_least_one::<usize>)]
    watchers: usize,
    /// `watch`, `expiry`: base URL the watchers connect to [default: --url]; another
    /// server on the same store measures the cross-server path
    #[arg(long, value_name = "URL", value_parser = url)]
    watch_url: Option<String>,
    /// `watch`: logins per second through --url (open loop)
    #[arg(long, value_name = "R", default_value = "200", value_parser = positive_rate)]
    rate: f64,
    /// Send `Authorization: Bearer TOKEN`
    #[arg(long, value_name = "TOKEN", value_parser = header_token)]
    auth: Option<String>,
    /// For `https://` URLs: the PEM file of the CA that signed the server's
    /// certificate (trusted alone; HTTP/1.1 is asked for by ALPN)
    #[arg(long, value_name = "FILE")]
    cacert: Option<std::path::PathBuf>,
    /// `list` mode: send `Accept-Encoding: ENC` (e.g. gzip, br, zstd) with each listing
    #[arg(long, value_name = "ENC", value_parser = header_token)]
    accept_encoding: Option<String>,
    /// Also print the report as one JSON line (the last line of stdout)
    #[arg(long)]
    json: bool,
    /// Only run the bare hyper server on 127.0.0.1:PORT, until Ctrl-C (or for --duration
    /// when given); 0 picks a free port
    #[arg(long, value_name = "PORT")]
    serve_bare: Option<u16>,
}

/// Options of a load run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Base URL of the presence API, e.g. `http://127.0.0.1:8080/presence`.
    pub url: String,
    /// What to do.
    pub mode: Mode,
    /// Number of simulated nodes.
    pub nodes: usize,
    /// Number of keep-alive connections (one worker each).
    pub concurrency: usize,
    /// Connections for the login phase.
    pub login_concurrency: usize,
    /// `bare` mode only: flood the bare server at `url` instead of starting one in
    /// this process (set when `--url` is given with `--mode bare`).
    pub bare_external: bool,
    /// Length of the steady phase.
    pub duration: Duration,
    /// Per-node heartbeat interval in `nodes` mode.
    pub interval: Duration,
    /// Per-request and per-connect timeout.
    pub timeout: Duration,
    /// Bearer token, if the server requires one.
    pub auth: Option<String>,
    /// The CA to trust for `https` URLs.
    pub cacert: Option<std::path::PathBuf>,
    /// `Accept-Encoding` of the listings, if any.
    pub accept_encoding: Option<String>,
    /// Print a JSON line after the summary.
    pub json: bool,
    /// `watch`, `expiry`: watch streams to open.
    pub watchers: usize,
    /// `watch`, `expiry`: base URL of the server the watchers connect to.
    pub watch_url: String,
    /// `watch`: logins per second.
    pub rate: f64,
}

/// What the command line asks for (`--help` is answered by clap itself).
#[derive(Clone, Debug)]
pub enum Command {
    /// Run a load test.
    Run(Options),
    /// Only run the bare server on this port, for `duration` if given, else until Ctrl-C.
    ServeBare {
        /// Port on 127.0.0.1 (0 picks a free one).
        port: u16,
        /// How long to serve; `None` means until Ctrl-C.
        duration: Option<Duration>,
    },
}

/// Reads the process's arguments. On bad usage, prints why and exits with status 2
/// (clap's convention); `--help` prints the help and exits 0.
pub fn parse() -> Command {
    Cli::parse().into_command().unwrap_or_else(|e| e.exit())
}

impl Cli {
    /// The checks that involve more than one flag.
    fn into_command(self) -> Result<Command, clap::Error> {
        if let Some(port) = self.serve_bare {
            return Ok(Command::ServeBare {
                port,
                duration: self.duration,
            });
        }
        // `list` may run without logging anyone in, `watch` then only holds its streams
        // open; the other modes need somebody to heartbeat (or to expire).
        if self.nodes == 0 && !matches!(self.mode, Mode::List | Mode::Watch) {
            return Err(Cli::command().error(
                ErrorKind::ValueValidation,
                format!("--nodes must be at least 1 in {} mode", self.mode.name()),
            ));
        }
        let bare_external = self.url.is_some() && self.mode == Mode::Bare;
        let url = self.url.unwrap_or_else(|| DEFAULT_URL.to_owned());
        let watch_url = self.watch_url.unwrap_or_else(|| url.clone());
        // Both URLs passed `split_url` already (their value parser).
        let https = |u: &str| split_url(u).is_ok_and(|p| p.is_https());
        let watches = matches!(self.mode, Mode::Watch | Mode::Expiry);
        if watches && https(&watch_url) {
            return Err(Cli::command().error(
                ErrorKind::ArgumentConflict,
                "watch streams are read over plain http only (--watch-url, or --url)",
            ));
        }
        if self.cacert.is_none() && https(&url) {
            return Err(Cli::command().error(
                ErrorKind::MissingRequiredArgument,
                "an https --url needs --cacert FILE (the CA of the server's certificate)",
            ));
        }
        Ok(Command::Run(Options {
            bare_external,
            watch_url,
            url,
            watchers: self.watchers,
            rate: self.rate,
            mode: self.mode,
            nodes: self.nodes,
            concurrency: self.concurrency,
            login_concurrency: self.login_concurrency.unwrap_or(self.concurrency),
            duration: self.duration.unwrap_or(DEFAULT_DURATION),
            interval: self.interval_ms,
            timeout: self.timeout_ms,
            auth: self.auth,
            cacert: self.cacert,
            accept_encoding: self.accept_encoding,
            json: self.json,
        }))
    }
}

fn url(v: &str) -> Result<String, String> {
    split_url(v).map(|_| v.to_owned())
}

/// A whole number of at least 1.
fn at_least_one<T>(v: &str) -> Result<T, String>
where
    T: std::str::FromStr<Err = std::num::ParseIntError> + Default + PartialEq,
{
    match v.parse::<T>() {
        Ok(n) if n == T::default() => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn seconds(v: &str) -> Result<Duration, String> {
    let secs: f64 = v.parse().map_err(|e| format!("{e}"))?;
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err("must be a positive number of seconds".to_owned()),
    }
}

/// A finite rate above 0.
fn positive_rate(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        Ok(_) => Err("must be a positive number".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

fn millis(v: &str) -> Result<Duration, String> {
    at_least_one::<u64>(v).map(Duration::from_millis)
}

fn header_token(v: &str) -> Result<String, String> {
    match HeaderValue::from_str(v) {
        Ok(_) => Ok(v.to_owned()),
        Err(_) => Err("the token has characters not allowed in a header".to_owned()),
    }
}
