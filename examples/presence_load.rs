//! `presence_load`: load generator for the presence HTTP API (README, Performance).
//!
//! Start the server with rate limiting effectively off (all the load comes from one IP,
//! and the default per-client bucket is 30 requests/s), then point the generator at it:
//!
//! ```text
//! PRESENCE_HTTP_PORT=8080 PRESENCE_RATE_LIMIT_RATE=1000000 PRESENCE_RATE_LIMIT_CAPACITY=1000000 \
//!     cargo run --release --example presence_server
//!
//! cargo run --release --example presence_load -- --mode nodes --nodes 10000 --interval-ms 1000
//! cargo run --release --example presence_load -- --mode flood --nodes 1000 --concurrency 64 --duration 10
//! cargo run --release --example presence_load -- --mode list --nodes 100000 --login-concurrency 64 --concurrency 1 --duration 5
//! cargo run --release --example presence_load -- --mode bare --duration 3   # in-process bare hyper baseline
//! cargo run --release --example presence_load -- --serve-bare 8081          # bare server only, in its own process
//! cargo run --release --example presence_load -- --mode bare --url http://127.0.0.1:8081/presence --duration 10
//! cargo run --release --example presence_load -- --help
//! ```
//!
//! Build with `--release`: a debug build mostly measures the generator itself. The generator
//! and the server share the machine's cores, so compare modes within one machine only. To
//! take little of that shared CPU, the generator speaks HTTP/1.1 through a small client of
//! its own (`Conn`: one keep-alive connection, requests written from ready-made bytes,
//! responses framed by `Content-Length`), as `wrk` does, rather than through hyper's client;
//! the bare server (`--serve-bare`) is plain hyper.
//! The run is bounded: the steady phase stops after `--duration`, every request has a
//! timeout, and the only address contacted is the one in `--url` (meant for loopback).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Command-line help, printed by `--help`.
pub const USAGE: &str = "\
presence_load: load generator for the presence HTTP API (meant for loopback use)

USAGE:
    presence_load [OPTIONS]
    presence_load --serve-bare PORT [--duration SECS]

OPTIONS:
    --url URL           base URL of the API [default: http://127.0.0.1:8080/presence]
    --mode MODE         nodes | flood | list | bare [default: nodes]
    --nodes N           simulated nodes, ids load-0 .. load-<N-1> [default: 100]
    --concurrency C     keep-alive HTTP/1 connections, one worker each [default: 64]
    --login-concurrency C
                        connections for the login phase [default: --concurrency]; e.g.
                        log 100000 nodes in over 64, then list over 1
    --duration SECS     length of the steady phase, fractions allowed [default: 10]
    --interval-ms MS    per-node heartbeat interval in `nodes` mode, +-10% jitter [default: 1000]
    --timeout-ms MS     per-request (and per-connect) timeout [default: 5000]
    --auth TOKEN        send `Authorization: Bearer TOKEN`
    --json              also print the report as one JSON line (the last line of stdout)
    --serve-bare PORT   only run the bare hyper server on 127.0.0.1:PORT, until Ctrl-C
                        (or for --duration when given); 0 picks a free port
    -h, --help          print this help

MODES:
    nodes   log the N nodes in, then each heartbeats every --interval-ms (open loop,
            at most C connections); a heartbeat answered 404 logs the node in again
    flood   log the N nodes in, then C workers send heartbeats back to back (closed loop)
    list    log the N nodes in (none with --nodes 0), then C workers GET the list back to
            back; the nodes are not kept alive, so they expire after the server's TTL
    bare    flood a bare hyper server (fixed 200 {\"ok\":true}) exactly like `flood`, as a
            baseline for the presence server's figures: an in-process one, or with an
            explicit --url the one at that address (`--serve-bare PORT` in another
            process, like the presence server)

Phases are reported separately (login, steady): requests, errors by status and by
transport failure, throughput, and latency p50 / p99 / p99.9 / max in ms (time from
sending the request to the end of the response body, connect time excluded).
Exit status: 0 when the steady phase had successful requests, 1 otherwise, 2 on bad usage.
";

/// What the generator does after the (optional) login phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every node heartbeats on its own schedule (open loop).
    Nodes,
    /// Heartbeats back to back on every connection (closed loop).
    Flood,
    /// `GET /presence` back to back on every connection (closed loop).
    List,
    /// Like `Flood`, against an in-process bare hyper server.
    Bare,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        match s {
            "nodes" => Some(Mode::Nodes),
            "flood" => Some(Mode::Flood),
            "list" => Some(Mode::List),
            "bare" => Some(Mode::Bare),
            _ => None,
        }
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Nodes => "nodes",
            Mode::Flood => "flood",
            Mode::List => "list",
            Mode::Bare => "bare",
        }
    }
}

/// Options of a load run (see [`USAGE`]).
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
    /// Connections for the login phase; `None` means `concurrency`.
    pub login_concurrency: Option<usize>,
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
    /// Print a JSON line after the summary.
    pub json: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            url: "http://127.0.0.1:8080/presence".to_owned(),
            mode: Mode::Nodes,
            nodes: 100,
            concurrency: 64,
            login_concurrency: None,
            bare_external: false,
            duration: Duration::from_secs(10),
            interval: Duration::from_millis(1000),
            timeout: Duration::from_millis(5000),
            auth: None,
            json: false,
        }
    }
}

/// What the command line asks for.
#[derive(Clone, Debug)]
pub enum Command {
    /// Print [`USAGE`].
    Help,
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

/// Parses the arguments (without the program name). Accepts `--flag value` and `--flag=value`.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    let mut opts = Options::default();
    let mut serve_bare = None;
    let mut duration_given = false;
    let mut url_given = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, mut inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg, None),
        };
        let mut value = || -> Result<String, String> {
            match inline.take() {
                Some(v) => Ok(v),
                None => args.next().ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--json" => opts.json = true,
            "--url" => {
                opts.url = value()?;
                url_given = true;
            }
            "--mode" => {
                let v = value()?;
                opts.mode = Mode::parse(&v).ok_or_else(|| {
                    format!("--mode: unknown mode `{v}` (expected nodes, flood, list or bare)")
                })?;
            }
            "--nodes" => opts.nodes = parse_number("--nodes", &value()?)?,
            "--concurrency" => opts.concurrency = parse_number("--concurrency", &value()?)?,
            "--login-concurrency" => {
                let c = parse_number("--login-concurrency", &value()?)?;
                if c == 0 {
                    return Err("--login-concurrency must be at least 1".to_owned());
                }
                opts.login_concurrency = Some(c);
            }
            "--duration" => {
                opts.duration = parse_seconds("--duration", &value()?)?;
                duration_given = true;
            }
            "--interval-ms" => opts.interval = parse_millis("--interval-ms", &value()?)?,
            "--timeout-ms" => opts.timeout = parse_millis("--timeout-ms", &value()?)?,
            "--auth" => opts.auth = Some(value()?),
            "--serve-bare" => serve_bare = Some(parse_number::<u16>("--serve-bare", &value()?)?),
            other => return Err(format!("unknown argument `{other}`")),
        }
        if inline.is_some() {
            return Err(format!("{flag} takes no value"));
        }
    }
    if let Some(port) = serve_bare {
        let duration = duration_given.then_some(opts.duration);
        return Ok(Command::ServeBare { port, duration });
    }
    if opts.concurrency == 0 {
        return Err("--concurrency must be at least 1".to_owned());
    }
    opts.bare_external = url_given && opts.mode == Mode::Bare;
    // `list` may run without logging anyone in; the other modes need somebody to heartbeat.
    if opts.nodes == 0 && opts.mode != Mode::List {
        return Err(format!(
            "--nodes must be at least 1 in {} mode",
            opts.mode.name()
        ));
    }
    split_url(&opts.url)?;
    Ok(Command::Run(opts))
}

fn parse_number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{flag}: `{v}` is not a valid number"))
}

fn parse_seconds(flag: &str, v: &str) -> Result<Duration, String> {
    let secs: f64 = parse_number(flag, v)?;
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(format!(
            "{flag}: `{v}` must be a positive number of seconds"
        )),
    }
}

fn parse_millis(flag: &str, v: &str) -> Result<Duration, String> {
    match parse_number::<u64>(flag, v)? {
        0 => Err(format!("{flag} must be at least 1")),
        ms => Ok(Duration::from_millis(ms)),
    }
}

/// `--url` taken apart: what to connect to, the `Host` header, and the base path.
struct UrlParts {
    connect: String,
    authority: String,
    base: String,
}

fn split_url(url: &str) -> Result<UrlParts, String> {
    let uri: Uri = url.parse().map_err(|e| format!("--url `{url}`: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "--url `{url}`: scheme `{other}` is not supported (plain http only)"
            ))
        }
        None => {
            return Err(format!(
                "--url `{url}` must be absolute, like http://127.0.0.1:8080/presence"
            ))
        }
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("--url `{url}` has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("--url `{url}`: user info is not supported"));
    }
    if uri.query().is_some() {
        return Err(format!("--url `{url}`: a query string is not supported"));
    }
    let port = authority.port_u16().unwrap_or(80);
    Ok(UrlParts {
        // `host()` keeps the brackets of an IPv6 literal, so this parses as a socket address.
        connect: format!("{}:{port}", authority.host()),
        authority: authority.as_str().to_owned(),
        base: uri.path().trim_end_matches('/').to_owned(),
    })
}

/// Where requests go, with everything a request needs prepared once.
struct Target {
    addr: SocketAddr,
    url: String,
    /// `Host: ...\r\n` and, with `--auth`, `Authorization: Bearer ...\r\n`.
    headers: String,
    login: String,
    heartbeat: String,
    list: String,
    timeout: Duration,
}

impl Target {
    fn new(
        addr: SocketAddr,
        url: String,
        parts: &UrlParts,
        opts: &Options,
    ) -> Result<Target, String> {
        let path = |suffix: &str| -> Result<String, String> {
            let p = format!("{}{suffix}", parts.base);
            let p = if p.is_empty() { "/".to_owned() } else { p };
            // Validated like a URI path: the request line must not be broken by it.
            p.parse::<Uri>()
                .map(|_| p.clone())
                .map_err(|e| format!("bad path `{p}`: {e}"))
        };
        let mut headers = format!("Host: {}\r\n", parts.authority);
        if let Some(token) = &opts.auth {
            if HeaderValue::from_str(token).is_err() {
                return Err("--auth: the token has characters not allowed in a header".to_owned());
            }
            headers.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        Ok(Target {
            addr,
            url,
            headers,
            login: path("/login")?,
            heartbeat: path("/heartbeat")?,
            list: path("")?,
            timeout: opts.timeout,
        })
    }

    async fn resolve(opts: &Options) -> Result<Target, String> {
        let parts = split_url(&opts.url)?;
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(parts.connect.as_str())
            .await
            .map_err(|e| format!("cannot resolve `{}`: {e}", parts.connect))?
            .collect();
        // `localhost` often resolves to ::1 first while servers commonly bind 0.0.0.0 only.
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .ok_or_else(|| format!("`{}` resolved to no address", parts.connect))?;
        if !addr.ip().is_loopback() {
            eprintln!("presence_load: warning: {addr} is not a loopback address; this tool is meant for local servers");
        }
        Target::new(addr, opts.url.clone(), &parts, opts)
    }

    /// The whole HTTP/1.1 request, ready to write: a `POST` of `body` as JSON, or a
    /// `GET` without one.
    fn request(&self, path: &str, body: Option<&[u8]>) -> Bytes {
        let mut req = Vec::with_capacity(128 + body.map_or(0, <[u8]>::len));
        match body {
            Some(body) => {
                req.extend_from_slice(
                    format!(
                        "POST {path} HTTP/1.1\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        self.headers,
                        body.len()
                    )
                    .as_bytes(),
                );
                req.extend_from_slice(body);
            }
            None => req.extend_from_slice(
                format!("GET {path} HTTP/1.1\r\n{}\r\n", self.headers).as_bytes(),
            ),
        }
        Bytes::from(req)
    }
}

/// Node ids are `load-<i>`; the login body carries a small meta object like a real node.
fn login_body(i: usize) -> Bytes {
    Bytes::from(format!(
        "{{\"node_id\":\"load-{i}\",\"meta\":{{\"load\":0.1}}}}"
    ))
}

fn heartbeat_body(i: usize, lease_id: &str) -> Bytes {
    // Value's Display escapes the lease as a JSON string and cannot fail.
    let lease = serde_json::Value::from(lease_id);
    Bytes::from(format!("{{\"node_id\":\"load-{i}\",\"lease_id\":{lease}}}"))
}

#[derive(serde::Deserialize)]
struct LoginReply {
    lease_id: String,
}

/// The outcome of one request.
struct Exchange {
    /// Status of the response, or the kind of transport failure.
    result: Result<StatusCode, &'static str>,
    /// Set when a complete response arrived.
    latency: Option<Duration>,
    /// The response body, only when asked for.
    body: Bytes,
    bytes_in: u64,
}

impl Exchange {
    fn failed(kind: &'static str) -> Exchange {
        Exchange {
            result: Err(kind),
            latency: None,
            body: Bytes::new(),
            bytes_in: 0,
        }
    }

    fn connect_failed(&self) -> bool {
        matches!(self.result, Err("connect" | "connect_timeout"))
    }
}

/// One keep-alive HTTP/1.1 connection, re-established when it breaks.
///
/// A client written for this tool rather than hyper's: it writes requests prepared
/// once and reads only what it needs of the response (the status, `Content-Length`,
/// `Connection: close`), so it costs the shared CPU a fraction of what a general
/// client does, and leaves that to the server under test, as `wrk` does. Responses
/// must carry a `Content-Length` (the presence server and the bare server do).
struct Conn {
    target: Arc<Target>,
    stream: Option<TcpStream>,
    buf: BytesMut,
    connected_before: bool,
    reconnects: u64,
}

/// A response as far as the generator cares.
struct RawResponse {
    status: StatusCode,
    body: Bytes,
    bytes_in: u64,
    close: bool,
}

impl Conn {
    fn new(target: Arc<Target>) -> Conn {
        Conn {
            target,
            stream: None,
            buf: BytesMut::with_capacity(16 * 1024),
            connected_before: false,
            reconnects: 0,
        }
    }

    async fn connect(&self) -> Result<TcpStream, &'static str> {
        let connect = async {
            let stream = TcpStream::connect(self.target.addr)
                .await
                .map_err(|_| "connect")?;
            // Small request/response pairs: Nagle plus delayed ACKs could add 40 ms stalls.
            stream.set_nodelay(true).map_err(|_| "connect")?;
            Ok(stream)
        };
        tokio::time::timeout(self.target.timeout, connect)
            .await
            .unwrap_or(Err("connect_timeout"))
    }

    /// Sends `req` (a whole request from [`Target::request`]) and reads the response.
    async fn exchange(&mut self, req: &[u8], keep_body: bool) -> Exchange {
        // A reused connection may have been closed by the server while idle: then the
        // request is sent again, once, on a fresh one.
        for attempt in 0..2 {
            let reused = self.stream.is_some();
            if self.stream.is_none() {
                match self.connect().await {
                    Ok(stream) => {
                        if self.connected_before {
                            self.reconnects += 1;
                        }
                        self.connected_before = true;
                        self.buf.clear();
                        self.stream = Some(stream);
                    }
                    Err(kind) => return Exchange::failed(kind),
                }
            }
            let start = Instant::now();
            let timeout = self.target.timeout;
            let result = tokio::time::timeout(timeout, self.roundtrip(req, keep_body)).await;
            match result {
                Ok(Ok(res)) => {
                    if res.close {
                        self.stream = None;
                    }
                    return Exchange {
                        result: Ok(res.status),
                        latency: Some(start.elapsed()),
                        body: res.body,
                        bytes_in: res.bytes_in,
                    };
                }
                // The connection's state is unknown after a failure: start afresh.
                Ok(Err((kind, nothing_read))) => {
                    self.stream = None;
                    if !(reused && nothing_read && attempt == 0) {
                        return Exchange::failed(kind);
                    }
                }
                Err(_) => {
                    self.stream = None;
                    return Exchange::failed("timeout");
                }
            }
        }
        Exchange::failed("request")
    }

    /// Writes the request and reads one response; on failure, the kind and whether
    /// no byte of a response had arrived.
    async fn roundtrip(
        &mut self,
        req: &[u8],
        keep_body: bool,
    ) -> Result<RawResponse, (&'static str, bool)> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(("request", true));
        };
        stream.write_all(req).await.map_err(|_| ("request", true))?;
        // The head: up to the blank line.
        let mut scanned = 0;
        let head_len = loop {
            if let Some(at) = find_head_end(&self.buf, scanned) {
                break at;
            }
            if self.buf.len() > 64 * 1024 {
                return Err(("response_head_too_large", false));
            }
            scanned = self.buf.len().saturating_sub(3);
            self.buf.reserve(16 * 1024);
            match stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Err(("response_closed", self.buf.is_empty())),
                Ok(_) => {}
            }
        };
        let head = parse_head(&self.buf[..head_len]).map_err(|kind| (kind, false))?;
        self.buf.advance(head_len);
        // The body: exactly Content-Length bytes, kept only when asked for.
        let mut left = head.content_length;
        let mut kept = BytesMut::new();
        loop {
            let take = self.buf.len().min(left);
            if keep_body {
                kept.extend_from_slice(&self.buf[..take]);
            }
            self.buf.advance(take);
            left -= take;
            if left == 0 {
                break;
            }
            self.buf.reserve(64 * 1024);
            match stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Err(("response_body", false)),
                Ok(_) => {}
            }
        }
        Ok(RawResponse {
            status: head.status,
            body: kept.freeze(),
            bytes_in: (head_len + head.content_length) as u64,
            close: head.close,
        })
    }

    /// Logs node `i` in; returns its heartbeat request when that worked.
    async fn login(&mut self, i: usize) -> (Exchange, Option<Bytes>) {
        let req = self
            .target
            .request(&self.target.login, Some(&login_body(i)));
        let mut ex = self.exchange(&req, true).await;
        let mut heartbeat = None;
        if matches!(ex.result, Ok(status) if status.is_success()) {
            match serde_json::from_slice::<LoginReply>(&ex.body) {
                Ok(reply) => {
                    let body = heartbeat_body(i, &reply.lease_id);
                    heartbeat = Some(self.target.request(&self.target.heartbeat, Some(&body)));
                }
                Err(_) => ex.result = Err("bad_login_reply"),
            }
        }
        (ex, heartbeat)
    }
}

/// Where the response head in `buf` ends (after its blank line), looking from `from`.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| from + at + 4)
}

/// What the generator reads from a response head.
struct Head {
    status: StatusCode,
    content_length: usize,
    close: bool,
}

fn parse_head(head: &[u8]) -> Result<Head, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "bad_response_head")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next(), parts.next());
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err("bad_status_line");
    }
    let status = code
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or("bad_status_line")?;
    let mut content_length = None;
    let mut close = version == Some("HTTP/1.0");
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or("bad_header")?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse::<usize>().map_err(|_| "bad_content_length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked_response_unsupported");
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    Ok(Head {
        status,
        content_length: content_length.ok_or("no_content_length")?,
        close,
    })
}

/// Sleep after a failed connect so a dead server is not hammered by a busy loop.
async fn connect_backoff(ex: &Exchange) {
    if ex.connect_failed() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const SUB_BITS: u32 = 7;
const SUB: usize = 1 << SUB_BITS;
/// Values are clamped at 2^40 ns (about 18 minutes), far beyond any request timeout.
const MAX_SHIFT: u32 = 40 - SUB_BITS;
const BUCKETS: usize = (MAX_SHIFT as usize + 2) * SUB;

/// Log-linear latency histogram in nanoseconds: 128 linear buckets per power of two, so
/// any reported value is within 1/128 (< 0.8%) of the true one. Exact min/max/mean.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum: u64,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < SUB as u64 {
            return v as usize;
        }
        let shift = 63 - v.leading_zeros() - SUB_BITS;
        if shift > MAX_SHIFT {
            return BUCKETS - 1;
        }
        ((shift as usize + 1) << SUB_BITS) + ((v >> shift) as usize - SUB)
    }

    /// The largest value that lands in bucket `index`.
    fn bucket_high(index: usize) -> u64 {
        if index < SUB {
            return index as u64;
        }
        let shift = (index >> SUB_BITS) - 1;
        let sub = (index & (SUB - 1)) + SUB;
        ((sub as u64 + 1) << shift) - 1
    }

    /// Records one value in nanoseconds.
    pub fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(ns);
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    /// Adds another histogram's values to this one.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.sum = self.sum.saturating_add(other.sum);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value at quantile `q` (0.0..=1.0), in nanoseconds; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::bucket_high(i).clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// Largest recorded value in nanoseconds; 0 when empty.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean in nanoseconds; 0 when empty.
    pub fn mean(&self) -> u64 {
        self.sum.checked_div(self.count).unwrap_or(0)
    }
}

/// Counters of one phase (login or steady), merged over all workers.
#[derive(Clone, Debug)]
pub struct PhaseStats {
    name: &'static str,
    latency: Histogram,
    ok: u64,
    status_errors: BTreeMap<u16, u64>,
    transport_errors: BTreeMap<&'static str, u64>,
    bytes_in: u64,
    reconnects: u64,
    elapsed: Duration,
    /// `nodes` mode only: the intended request rate.
    target_rps: Option<f64>,
    late: u64,
    max_lag: Duration,
    relogins: u64,
}

impl PhaseStats {
    fn new(name: &'static str) -> PhaseStats {
        PhaseStats {
            name,
            latency: Histogram::default(),
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

    fn record(&mut self, ex: &Exchange) {
        if let Some(latency) = ex.latency {
            self.latency
                .record(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
        }
        self.bytes_in += ex.bytes_in;
        match ex.result {
            Ok(status) if status.is_success() => self.ok += 1,
            Ok(status) => *self.status_errors.entry(status.as_u16()).or_default() += 1,
            Err(kind) => *self.transport_errors.entry(kind).or_default() += 1,
        }
    }

    fn merge(&mut self, other: PhaseStats) {
        self.latency.merge(&other.latency);
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
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Requests attempted: successes plus errors of any kind.
    pub fn requests(&self) -> u64 {
        self.ok + self.errors()
    }

    /// Requests answered with a 2xx status.
    pub fn ok(&self) -> u64 {
        self.ok
    }

    /// Non-2xx responses plus transport failures (connect, timeout, broken connection).
    pub fn errors(&self) -> u64 {
        self.status_errors.values().sum::<u64>() + self.transport_errors.values().sum::<u64>()
    }

    /// Requests per second over the phase's wall-clock time.
    pub fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.requests() as f64 / secs
        } else {
            0.0
        }
    }

    /// Latencies of the requests that got a complete response.
    pub fn latency(&self) -> &Histogram {
        &self.latency
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
        let h = &self.latency;
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
                "p50": ms(h.quantile(0.5)),
                "p99": ms(h.quantile(0.99)),
                "p999": ms(h.quantile(0.999)),
                "max": ms(h.max()),
                "mean": ms(h.mean()),
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
    mode: Mode,
    url: String,
    addr: SocketAddr,
    nodes: usize,
    concurrency: usize,
    duration: Duration,
    phases: Vec<PhaseStats>,
    note: Option<String>,
}

impl Report {
    /// The phase called `name` (`login` or `steady`), if it ran.
    pub fn phase(&self, name: &str) -> Option<&PhaseStats> {
        self.phases.iter().find(|p| p.name() == name)
    }

    /// True when the steady phase ran and had at least one successful request.
    pub fn success(&self) -> bool {
        self.phase("steady").is_some_and(|p| p.ok() > 0)
    }

    /// The human-readable summary block.
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
            let h = p.latency();
            out.push_str(&format!(
                "{:<7} {:>10} {:>10} {:>8} {:>10.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}\n",
                p.name(),
                p.requests(),
                p.ok(),
                p.errors(),
                p.throughput(),
                ms(h.quantile(0.5)),
                ms(h.quantile(0.99)),
                ms(h.quantile(0.999)),
                ms(h.max()),
                ms(h.mean()),
            ));
        }
        for p in &self.phases {
            let avg = p.bytes_in.checked_div(p.latency.count()).unwrap_or(0);
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
            Err(_) => *total.transport_errors.entry("worker_panicked").or_default() += 1,
        }
    }
    total.elapsed = start.elapsed();
    total
}

/// Logs in nodes `0..n` with `concurrency` workers pulling from a shared counter.
/// Returns each node's heartbeat request (None where the login failed).
async fn login_phase(
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
            Err(_) => *total.transport_errors.entry("worker_panicked").or_default() += 1,
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

/// `flood` / `bare`: each worker cycles over its own share of the nodes.
async fn flood_phase(target: &Arc<Target>, requests: &[Bytes], opts: &Options) -> PhaseStats {
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

async fn list_phase(target: &Arc<Target>, opts: &Options) -> PhaseStats {
    let start = Instant::now();
    let deadline = start + opts.duration;
    let req = target.request(&target.list, None);
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
async fn nodes_phase(
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

const BARE_BODY: &[u8] = b"{\"ok\":true}";

/// Heartbeat requests as `flood` sends them, with a made-up lease: the bare server
/// reads and ignores them.
fn bare_requests(target: &Target, nodes: usize) -> Vec<Bytes> {
    (0..nodes)
        .map(|i| {
            let body = heartbeat_body(i, "0123456789abcdef0123456789abcdef");
            target.request(&target.heartbeat, Some(&body))
        })
        .collect()
}

async fn bare_answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    // Read the request body like a real handler must, so the comparison is fair.
    req.into_body().collect().await?;
    let mut resp = Response::new(Full::new(Bytes::from_static(BARE_BODY)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

/// Starts the bare hyper server (HTTP/1, keep-alive, one task per connection).
/// Returns the bound address and the accept loop's task.
pub async fn spawn_bare_server(addr: SocketAddr) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let accept = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                // Usually out of file descriptors: wait for some to be released.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(
                        TokioIo::new(stream),
                        hyper::service::service_fn(bare_answer),
                    )
                    .await;
            });
        }
    });
    Ok((bound, accept))
}

/// Runs one load test as described by `opts`.
pub async fn run(opts: &Options) -> Result<Report, String> {
    let mut phases = Vec::new();
    let mut note = None;
    let target = match opts.mode {
        Mode::Bare if opts.bare_external => {
            let target = Arc::new(Target::resolve(opts).await?);
            match tokio::time::timeout(opts.timeout, TcpStream::connect(target.addr)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("cannot connect to {}: {e}", target.addr)),
                Err(_) => return Err(format!("cannot connect to {}: timed out", target.addr)),
            }
            let requests = bare_requests(&target, opts.nodes);
            eprintln!(
                "presence_load: bare: flooding {} for {:.1} s over {} connections",
                target.addr,
                opts.duration.as_secs_f64(),
                opts.concurrency
            );
            phases.push(flood_phase(&target, &requests, opts).await);
            note = Some(
                "bare server at --url (start it with --serve-bare PORT in another process)"
                    .to_owned(),
            );
            target
        }
        Mode::Bare => {
            let (addr, server) = spawn_bare_server(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .map_err(|e| format!("cannot start the bare server: {e}"))?;
            let url = format!("http://{addr}/presence");
            let parts = split_url(&url)?;
            let target = Arc::new(Target::new(addr, url, &parts, opts)?);
            let requests = bare_requests(&target, opts.nodes);
            eprintln!(
                "presence_load: bare: flooding {addr} for {:.1} s over {} connections",
                opts.duration.as_secs_f64(),
                opts.concurrency
            );
            phases.push(flood_phase(&target, &requests, opts).await);
            server.abort();
            note = Some(
                "bare hyper server in this process: it shares the cores with the generator"
                    .to_owned(),
            );
            target
        }
        mode => {
            let target = Arc::new(Target::resolve(opts).await?);
            // Fail fast on a dead server instead of timing out node after node.
            match tokio::time::timeout(opts.timeout, TcpStream::connect(target.addr)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("cannot connect to {}: {e}", target.addr)),
                Err(_) => return Err(format!("cannot connect to {}: timed out", target.addr)),
            }
            let mut heartbeats = Vec::new();
            if opts.nodes > 0 {
                eprintln!(
                    "presence_load: login: {} nodes over {} connections",
                    opts.nodes,
                    opts.login_concurrency
                        .unwrap_or(opts.concurrency)
                        .min(opts.nodes)
                );
                let login_concurrency = opts.login_concurrency.unwrap_or(opts.concurrency);
                let (stats, requests) = login_phase(&target, opts.nodes, login_concurrency).await;
                phases.push(stats);
                heartbeats = requests;
            }
            eprintln!(
                "presence_load: steady: {} for {:.1} s over at most {} connections",
                mode.name(),
                opts.duration.as_secs_f64(),
                opts.concurrency
            );
            match mode {
                Mode::Nodes => phases.push(nodes_phase(&target, heartbeats, opts).await),
                Mode::List => phases.push(list_phase(&target, opts).await),
                _ => {
                    let requests: Vec<Bytes> = heartbeats.into_iter().flatten().collect();
                    if requests.is_empty() {
                        note =
                            Some("no node could log in; the steady phase was skipped".to_owned());
                    } else {
                        phases.push(flood_phase(&target, &requests, opts).await);
                    }
                }
            }
            target
        }
    };
    Ok(Report {
        mode: opts.mode,
        url: target.url.clone(),
        addr: target.addr,
        nodes: opts.nodes,
        concurrency: opts.concurrency,
        duration: opts.duration,
        phases,
        note,
    })
}

async fn serve_bare(port: u16, duration: Option<Duration>) -> ExitCode {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (bound, server) = match spawn_bare_server(addr).await {
        Ok(started) => started,
        Err(e) => {
            eprintln!("presence_load: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("bare hyper server on http://{bound}/ answering 200 {{\"ok\":true}}; Ctrl-C stops it");
    match duration {
        Some(d) => {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    server.abort();
    ExitCode::SUCCESS
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned());
    let command = match parse_args(args) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("presence_load: {e}\nrun with --help for usage");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Command::ServeBare { port, duration } => serve_bare(port, duration).await,
        Command::Run(opts) => match run(&opts).await {
            Ok(report) => {
                print!("{}", report.summary());
                if opts.json {
                    println!("{}", report.to_json());
                }
                if report.success() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("presence_load: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
