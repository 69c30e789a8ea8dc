//! The `watch` and `expiry` modes: watch streams (`GET /presence/watch`, Server-Sent
//! Events over a chunked HTTP/1.1 response) read by a small reader of their own, and
//! the logins whose events they time.
//!
//! A watcher is one raw TCP connection: it writes the request, reads the response head,
//! then decodes the chunked framing ([`Chunked`]) and the SSE lines ([`Sse`])
//! incrementally, whatever the chunk and read boundaries. Memory per watcher is
//! bounded: reads go to one buffer per runtime thread, an SSE line is kept up to
//! [`MAX_LINE`] bytes (the rest of a longer one, like a big snapshot's data, is skipped
//! without being stored), so ten thousand idle watchers cost the generator little.
//!
//! Node ids are `load-<i>` as elsewhere in the generator, so the run's own nodes are
//! found by index: `watch` keeps each login's send instant (ns since the run's start, in
//! an atomic per node), `expiry` each login reply's `expires_at_ms`. Each watcher keeps
//! a bit per node to count a node's first event as the sample and any later one as a
//! duplicate.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::cli::{Mode, Options};
use crate::client::{self, connect, BodyLength, Conn, Target};
use crate::report::{PhaseStats, WatchStats};

/// Bytes of one SSE line kept; the rest of a longer line is skipped.
const MAX_LINE: usize = 4096;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line accepted (`<hex>[;ext]`).
const MAX_CHUNK_LINE: usize = 1024;
/// The read buffer, one per runtime thread.
const READ_BUF: usize = 64 * 1024;
/// Watchers connecting (up to their snapshot) at the same time.
const OPENING_AT_ONCE: usize = 128;
/// How often the run looks at its counters while waiting.
const POLL: Duration = Duration::from_millis(10);

thread_local! {
    static READ: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUF]);
}

// ---------------------------------------------------------------------------------------
// Decoding: chunked framing, then SSE lines.

/// One parsed piece of an SSE stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Item<'a> {
    /// A dispatched event: its `event:` name (`message` when none) and its data
    /// (the `data:` lines joined by `\n`, at most [`MAX_LINE`] bytes each).
    Event { name: &'a [u8], data: &'a [u8] },
    /// A comment line (`: keep-alive`), without its colon.
    Comment(&'a [u8]),
}

/// Incremental SSE parser (the WHATWG rules: lines end with LF, CR LF or CR; a blank
/// line dispatches; `field: value` with one optional space; `:` starts a comment).
#[derive(Default)]
pub struct Sse {
    line: Vec<u8>,
    /// The current line had more than [`MAX_LINE`] bytes (the rest was skipped).
    long: bool,
    /// The last byte was a CR: an LF right after it ends no further line.
    cr: bool,
    event: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
}

impl Sse {
    /// Parses `input`, calling `on` for each complete event or comment.
    pub fn feed(&mut self, mut input: &[u8], on: &mut impl FnMut(Item<'_>)) {
        while !input.is_empty() {
            if self.cr {
                self.cr = false;
                if input[0] == b'\n' {
                    input = &input[1..];
                    continue;
                }
            }
            match input.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(at) => {
                    self.push(&input[..at]);
                    self.cr = input[at] == b'\r';
                    input = &input[at + 1..];
                    self.end_line(on);
                }
                None => {
                    self.push(input);
                    break;
                }
            }
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = MAX_LINE - self.line.len();
        if bytes.len() > room {
            self.long = true;
        }
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn end_line(&mut self, on: &mut impl FnMut(Item<'_>)) {
        let line = &self.line[..];
        if line.is_empty() {
            if self.has_data {
                let name: &[u8] = if self.event.is_empty() {
                    b"message"
                } else {
                    &self.event
                };
                on(Item::Event {
                    name,
                    data: &self.data,
                });
            }
            self.event.clear();
            self.data.clear();
            self.has_data = false;
        } else if line[0] == b':' {
            on(Item::Comment(&line[1..]));
        } else {
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(c) => {
                    let value = &line[c + 1..];
                    (&line[..c], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (line, &[][..]),
            };
            match field {
                b"event" => {
                    self.event.clear();
                    self.event.extend_from_slice(&value[..value.len().min(64)]);
                }
                b"data" => {
                    if self.has_data && self.data.len() < MAX_LINE {
                        self.data.push(b'\n');
                    }
                    let room = MAX_LINE.saturating_sub(self.data.len());
                    self.data.extend_from_slice(&value[..value.len().min(room)]);
                    self.has_data = true;
                }
                // `id`, `retry` and unknown fields: nothing the generator needs.
                _ => {}
            }
        }
        self.line.clear();
        self.long = false;
    }
}

/// Where the chunked decoder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// Reading a `<hex size>[;ext]\r\n` line.
    Size,
    /// Inside a chunk's data, with this many bytes left.
    Data(usize),
    /// The CR LF after a chunk's data: the CR (2) or the LF (1) is next.
    DataEnd(u8),
    /// The last chunk (size 0) was read: the body is complete.
    Done,
}

/// How a watch response body is framed.
pub enum Framing {
    /// `Transfer-Encoding: chunked` (what the presence server sends).
    Chunked(Chunked),
    /// `Content-Length`: this many bytes left.
    Exact(usize),
}

/// Incremental decoder of a chunked body.
pub struct Chunked {
    state: ChunkState,
    size_line: Vec<u8>,
}

impl Chunked {
    pub fn new() -> Chunked {
        Chunked {
            state: ChunkState::Size,
            size_line: Vec::new(),
        }
    }

    /// Decodes `input`, passing the data on to `data`; `Ok(true)` once the last chunk
    /// was read (anything after it is ignored).
    pub fn feed(
        &mut self,
        mut input: &[u8],
        data: &mut impl FnMut(&[u8]),
    ) -> Result<bool, &'static str> {
        while !input.is_empty() {
            match self.state {
                ChunkState::Size => match input.iter().position(|&b| b == b'\n') {
                    Some(at) => {
                        if self.size_line.len() + at > MAX_CHUNK_LINE {
                            return Err("bad_chunk_size");
                        }
                        self.size_line.extend_from_slice(&input[..at]);
                        input = &input[at + 1..];
                        let line =
                            std::str::from_utf8(&self.size_line).map_err(|_| "bad_chunk_size")?;
                        let hex = line.split(';').next().unwrap_or("").trim();
                        let size = usize::from_str_radix(hex, 16).map_err(|_| "bad_chunk_size")?;
                        self.size_line.clear();
                        self.state = if size == 0 {
                            ChunkState::Done
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    None => {
                        if self.size_line.len() + input.len() > MAX_CHUNK_LINE {
                            return Err("bad_chunk_size");
                        }
                        self.size_line.extend_from_slice(input);
                        input = &[];
                    }
                },
                ChunkState::Data(left) => {
                    let take = left.min(input.len());
                    data(&input[..take]);
                    input = &input[take..];
                    self.state = if take == left {
                        ChunkState::DataEnd(2)
                    } else {
                        ChunkState::Data(left - take)
                    };
                }
                ChunkState::DataEnd(k) => {
                    let want = if k == 2 { b'\r' } else { b'\n' };
                    if input[0] != want {
                        return Err("bad_chunk_end");
                    }
                    input = &input[1..];
                    self.state = if k == 2 {
                        ChunkState::DataEnd(1)
                    } else {
                        ChunkState::Size
                    };
                }
                ChunkState::Done => return Ok(true),
            }
        }
        Ok(self.state == ChunkState::Done)
    }
}

impl Framing {
    /// Decodes `input`; `Ok(true)` once the body is complete.
    fn feed(&mut self, input: &[u8], data: &mut impl FnMut(&[u8])) -> Result<bool, &'static str> {
        match self {
            Framing::Chunked(chunked) => chunked.feed(input, data),
            Framing::Exact(left) => {
                let take = (*left).min(input.len());
                data(&input[..take]);
                *left -= take;
                Ok(*left == 0)
            }
        }
    }
}

/// The value of the JSON string member `key` in `data` (a flat search: the members the
/// generator reads, `node_id` and `reason`, come first and carry no escapes).
fn json_str<'a>(data: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let mut from = 0;
    while let Some(at) = find(&data[from..], key) {
        let start = from + at;
        from = start + key.len();
        // `"key"` as a whole, then `:` and the opening quote.
        if start == 0 || data[start - 1] != b'"' || data.get(from) != Some(&b'"') {
            continue;
        }
        let rest = data[from + 1..].trim_ascii_start();
        let rest = rest.strip_prefix(b":")?.trim_ascii_start();
        let rest = rest.strip_prefix(b"\"")?;
        let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
        return Some(&rest[..end]);
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The index `i` of a node id `load-<i>`.
fn node_index(id: &[u8]) -> Option<usize> {
    let digits = id.strip_prefix(b"load-")?;
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// One watcher.

/// What all watchers of a run share: the run's nodes and the counters the run waits on.
struct Ctx {
    mode: Mode,
    t0: Instant,
    /// `watch`: when each node's login was sent, ns since `t0` plus 1 (0: not sent).
    sent: Vec<AtomicU64>,
    /// `expiry`: each node's `expires_at_ms` from its login reply (0: none yet).
    expires: Vec<AtomicU64>,
    /// Watchers that got their snapshot / that failed before it.
    ready: AtomicUsize,
    failed: AtomicUsize,
    /// Samples recorded, over all watchers.
    samples: AtomicU64,
    /// Streams that ended after their snapshot.
    dropped: AtomicUsize,
}

impl Ctx {
    fn new(mode: Mode, nodes: usize) -> Ctx {
        let zeros = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect();
        Ctx {
            mode,
            t0: Instant::now(),
            sent: if mode == Mode::Watch {
                zeros(nodes)
            } else {
                Vec::new()
            },
            expires: if mode == Mode::Expiry {
                zeros(nodes)
            } else {
                Vec::new()
            },
            ready: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            samples: AtomicU64::new(0),
            dropped: AtomicUsize::new(0),
        }
    }

    fn nodes(&self) -> usize {
        self.sent.len().max(self.expires.len())
    }

    fn since_t0_ns(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.t0).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// How a watcher ended.
enum End {
    /// Stopped by the run (after its snapshot, or before it when `ready` is false).
    Stopped,
    /// Failed or closed by the server, and why.
    Failed(&'static str),
}

/// One watch stream's state and counters.
struct Watcher {
    framing: Option<Framing>,
    sse: Sse,
    ended: bool,
    ready: bool,
    events: [u64; 4],
    keepalives: u64,
    bytes_in: u64,
    last_event: Option<Instant>,
    /// Latency samples in ns, put into the run's histogram at the end: a push per
    /// event is cheaper than a histogram per watcher (1 000 of them, ~200 KB each,
    /// cost the generator 6 % of its CPU in cache misses, on the cores it shares
    /// with the server).
    latency: Vec<u64>,
    /// One bit per node: its sample was taken.
    seen: Vec<u64>,
    duplicates: u64,
    foreign: u64,
    early: u64,
    min_lateness_ns: i64,
    other_leaves: u64,
}

impl Watcher {
    fn new(nodes: usize) -> Watcher {
        Watcher {
            framing: None,
            sse: Sse::default(),
            ended: false,
            ready: false,
            events: [0; 4],
            keepalives: 0,
            bytes_in: 0,
            last_event: None,
            latency: Vec::new(),
            seen: vec![0; nodes.div_ceil(64)],
            duplicates: 0,
            foreign: 0,
            early: 0,
            min_lateness_ns: 0,
            other_leaves: 0,
        }
    }

    /// Takes the node's sample unless it was taken already (then: a duplicate).
    fn first_time(&mut self, i: usize) -> bool {
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            false
        } else {
            self.seen[word] |= bit;
            true
        }
    }

    fn record(&mut self, ctx: &Ctx, ns: u64) {
        self.latency.push(ns.max(1));
        ctx.samples.fetch_add(1, Ordering::Relaxed);
    }

    /// Decodes bytes of the body; `Err` on a framing error.
    fn feed(&mut self, input: &[u8], ctx: &Ctx) -> Result<(), &'static str> {
        let Some(mut framing) = self.framing.take() else {
            return Err("no_framing");
        };
        let mut sse = std::mem::take(&mut self.sse);
        let result = framing.feed(input, &mut |data| {
            sse.feed(data, &mut |item| self.on_item(item, ctx));
        });
        self.sse = sse;
        self.framing = Some(framing);
        self.ended = result?;
        Ok(())
    }

    fn on_item(&mut self, item: Item<'_>, ctx: &Ctx) {
        let (name, data) = match item {
            Item::Comment(_) => {
                self.keepalives += 1;
                return;
            }
            Item::Event { name, data } => (name, data),
        };
        let kind = match name {
            b"snapshot" => 0,
            b"join" => 1,
            b"update" => 2,
            b"leave" => 3,
            _ => return,
        };
        self.events[kind] += 1;
        if kind == 0 {
            if !self.ready {
                self.ready = true;
                ctx.ready.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let now = Instant::now();
        self.last_event = Some(now);
        if !self.ready {
            return;
        }
        let node = json_str(data, b"node_id").and_then(node_index);
        match (ctx.mode, kind) {
            (Mode::Watch, 1) => {
                let sent = node
                    .and_then(|i| ctx.sent.get(i).map(|s| (i, s.load(Ordering::Acquire))))
                    .filter(|&(_, sent)| sent != 0);
                match sent {
                    Some((i, sent)) => {
                        if self.first_time(i) {
                            let ns = ctx.since_t0_ns(now).saturating_sub(sent - 1);
                            self.record(ctx, ns);
                        }
                    }
                    None => self.foreign += 1,
                }
            }
            (Mode::Expiry, 3) => {
                let expires = node
                    .and_then(|i| ctx.expires.get(i).map(|e| (i, e.load(Ordering::Acquire))))
                    .filter(|&(_, e)| e != 0);
                let Some((i, expires_ms)) = expires else {
                    self.foreign += 1;
                    return;
                };
                if json_str(data, b"reason") != Some(&b"expired"[..]) {
                    self.other_leaves += 1;
                    return;
                }
                if self.first_time(i) {
                    let now_ns = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_nanos() as i64)
                        .unwrap_or(0);
                    let late_ns = now_ns - expires_ms as i64 * 1_000_000;
                    if late_ns < 0 {
                        self.early += 1;
                        self.min_lateness_ns = self.min_lateness_ns.min(late_ns);
                    }
                    self.record(ctx, late_ns.max(0) as u64);
                }
            }
            _ => {}
        }
    }

    /// Opens the stream, reads it up to its snapshot (within `open_by`), then until
    /// `stop`. `opening` is released once the snapshot arrived (or the opening failed).
    async fn run(
        &mut self,
        target: &Target,
        ctx: &Ctx,
        opening: OwnedSemaphorePermit,
        open_by: Instant,
        mut stop: oneshot::Receiver<()>,
    ) -> End {
        let mut opening = Some(opening);
        let mut stream = match connect(target.addr, target.timeout()).await {
            Ok(stream) => stream,
            Err(e) => return End::Failed(e.kind()),
        };
        if stream.write_all(&target.watch_request()).await.is_err() {
            return End::Failed("request");
        }
        // The head, into a buffer of its own (bounded), the rest of the read fed on.
        let mut head = Vec::with_capacity(1024);
        let mut scanned = 0;
        let head_len = loop {
            if let Some(at) = client::find_head_end(&head, scanned) {
                break at;
            }
            scanned = head.len().saturating_sub(3);
            if head.len() > MAX_HEAD {
                return End::Failed("response_head_too_large");
            }
            let read = tokio::select! {
                biased;
                _ = &mut stop => return End::Stopped,
                _ = tokio::time::sleep_until(open_by.into()) => return End::Failed("head_timeout"),
                r = stream.readable() => r,
            };
            if read.is_err() {
                return End::Failed("read_error");
            }
            match READ.with_borrow_mut(|buf| {
                stream.try_read(buf).inspect(|&n| {
                    head.extend_from_slice(&buf[..n]);
                })
            }) {
                Ok(0) => return End::Failed("closed_before_head"),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return End::Failed("read_error"),
            }
        };
        let parsed = match client::parse_head(&head[..head_len]) {
            Ok(h) => h,
            Err(kind) => return End::Failed(kind),
        };
        if parsed.status != hyper::StatusCode::OK {
            return End::Failed(status_kind(parsed.status.as_u16()));
        }
        self.framing = Some(match parsed.length {
            BodyLength::Chunked => Framing::Chunked(Chunked::new()),
            BodyLength::Exact(len) => Framing::Exact(len),
        });
        let rest = head.split_off(head_len);
        drop(head);
        self.bytes_in += rest.len() as u64;
        if let Err(kind) = self.feed(&rest, ctx) {
            return End::Failed(kind);
        }
        drop(rest);
        loop {
            if self.ready {
                opening.take();
            }
            if self.ended {
                return End::Failed("stream_ended");
            }
            let read = tokio::select! {
                biased;
                _ = &mut stop => return End::Stopped,
                _ = tokio::time::sleep_until(open_by.into()), if !self.ready => {
                    return End::Failed("snapshot_timeout")
                }
                r = stream.readable() => r,
            };
            if read.is_err() {
                return End::Failed("read_error");
            }
            // Drain what is there (a few reads at most, then let other watchers run).
            for _ in 0..8 {
                let res = READ.with_borrow_mut(|buf| match stream.try_read(buf) {
                    Ok(0) => Err("closed"),
                    Ok(n) => {
                        self.bytes_in += n as u64;
                        self.feed(&buf[..n], ctx).map(|()| n)
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Err("reset"),
                    Err(_) => Err("read_error"),
                });
                match res {
                    Ok(0) => break,
                    Ok(n) if n < READ_BUF || self.ended => break,
                    Ok(_) => {}
                    Err(kind) => return End::Failed(kind),
                }
            }
        }
    }
}

fn status_kind(status: u16) -> &'static str {
    match status {
        400 => "http_400",
        401 => "http_401",
        404 => "http_404",
        429 => "http_429",
        500 => "http_500",
        503 => "http_503",
        _ => "http_other",
    }
}

/// What one watcher task hands back.
struct Outcome {
    watcher: Watcher,
    end: End,
}

/// The watchers of a run, while they are open.
struct Watchers {
    ctx: Arc<Ctx>,
    tasks: Vec<JoinHandle<Outcome>>,
    /// One per watcher: a oneshot each rather than one shared `watch`, whose
    /// `changed()` takes the channel's lock on every poll of every watcher.
    stop: Vec<oneshot::Sender<()>>,
    opened: Instant,
    open_elapsed: Duration,
}

/// Opens `opts.watchers` streams on `target` and waits (bounded) until each got its
/// snapshot or failed.
async fn open_watchers(target: &Arc<Target>, ctx: &Arc<Ctx>, opts: &Options) -> Watchers {
    let mut stop = Vec::with_capacity(opts.watchers);
    let gate = Arc::new(Semaphore::new(OPENING_AT_ONCE));
    let start = Instant::now();
    let nodes = ctx.nodes();
    let tasks: Vec<JoinHandle<Outcome>> = (0..opts.watchers)
        .map(|_| {
            let (stop_tx, stop_rx) = oneshot::channel();
            stop.push(stop_tx);
            let (target, ctx, gate) = (target.clone(), ctx.clone(), gate.clone());
            tokio::spawn(async move {
                let mut watcher = Watcher::new(nodes);
                let permit = gate
                    .acquire_owned()
                    .await
                    .expect("the gate is never closed");
                // Connect, head and snapshot within one timeout from the turn to open.
                let open_by = Instant::now() + target.timeout();
                let end = watcher.run(&target, &ctx, permit, open_by, stop_rx).await;
                if !watcher.ready {
                    ctx.failed.fetch_add(1, Ordering::Relaxed);
                } else if matches!(end, End::Failed(_)) {
                    ctx.dropped.fetch_add(1, Ordering::Relaxed);
                }
                // Nothing of the stream is needed any more: free its buffers.
                watcher.sse = Sse::default();
                watcher.framing = None;
                Outcome { watcher, end }
            })
        })
        .collect();
    let w = opts.watchers;
    while ctx.ready.load(Ordering::Relaxed) + ctx.failed.load(Ordering::Relaxed) < w {
        tokio::time::sleep(POLL).await;
    }
    let open_elapsed = start.elapsed();
    Watchers {
        ctx: ctx.clone(),
        tasks,
        stop,
        opened: Instant::now(),
        open_elapsed,
    }
}

impl Watchers {
    /// Stops every stream and merges what they saw.
    async fn close(self, mode: Mode, window_from: Instant) -> WatchStats {
        for stop in self.stop {
            let _ = stop.send(());
        }
        let mut stats = WatchStats::new(mode, self.tasks.len());
        stats.open_elapsed = self.open_elapsed;
        let mut last_event: Option<Instant> = None;
        for task in self.tasks {
            let Outcome { watcher, end } = match task.await {
                Ok(outcome) => outcome,
                Err(_) => {
                    *stats.open_failures.entry("watcher_panicked").or_default() += 1;
                    continue;
                }
            };
            if watcher.ready {
                stats.ready += 1;
                if let End::Failed(kind) = end {
                    *stats.disconnects.entry(kind).or_default() += 1;
                }
            } else {
                let kind = match end {
                    End::Failed(kind) => kind,
                    End::Stopped => "stopped_before_snapshot",
                };
                *stats.open_failures.entry(kind).or_default() += 1;
            }
            for (total, n) in stats.events.iter_mut().zip(watcher.events) {
                *total += n;
            }
            stats.keepalives += watcher.keepalives;
            stats.bytes_in += watcher.bytes_in;
            for &ns in &watcher.latency {
                stats.latency.saturating_record(ns);
            }
            stats.duplicates += watcher.duplicates;
            stats.foreign += watcher.foreign;
            stats.early += watcher.early;
            stats.min_lateness_ms = stats
                .min_lateness_ms
                .min(watcher.min_lateness_ns as f64 / 1e6);
            stats.other_leaves += watcher.other_leaves;
            last_event = last_event.max(watcher.last_event);
        }
        stats.window = last_event
            .map(|at| at.saturating_duration_since(window_from))
            .unwrap_or_default();
        stats
    }

    fn ready(&self) -> usize {
        self.ctx.ready.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------
// The modes.

/// Sleep after a failed connect so a dead server is not hammered by a busy loop.
async fn connect_backoff(ex: &client::Exchange) {
    if ex.connect_failed() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `done()` or `until`.
async fn wait_for(until: Instant, done: impl Fn() -> bool) {
    while !done() && Instant::now() < until {
        tokio::time::sleep(POLL).await;
    }
}

/// `watch`: see the mode's help. Returns the login phase (if any) and the watch figures.
pub async fn watch(
    login: &Arc<Target>,
    watched: &Arc<Target>,
    opts: &Options,
) -> (Vec<PhaseStats>, WatchStats) {
    let ctx = Arc::new(Ctx::new(Mode::Watch, opts.nodes));
    eprintln!(
        "presence_load: watch: opening {} watchers on {}",
        opts.watchers, watched.url
    );
    let watchers = open_watchers(watched, &ctx, opts).await;
    eprintln!(
        "presence_load: watch: {} of {} watchers got their snapshot in {:.2} s",
        watchers.ready(),
        opts.watchers,
        watchers.open_elapsed.as_secs_f64()
    );
    let mut phases = Vec::new();
    let window_from;
    let mut logged_in = 0;
    if opts.nodes == 0 {
        eprintln!(
            "presence_load: watch: holding {} watchers for {:.1} s",
            watchers.ready(),
            opts.duration.as_secs_f64()
        );
        window_from = watchers.opened;
        tokio::time::sleep(opts.duration).await;
    } else {
        let workers = opts.login_concurrency.min(opts.nodes);
        eprintln!(
            "presence_load: login: {} nodes at {} /s over {} connections for at most {:.1} s",
            opts.nodes,
            opts.rate,
            workers,
            opts.duration.as_secs_f64()
        );
        let (stats, ok, first) = paced_login(login, &ctx, opts).await;
        window_from = first;
        logged_in = ok;
        phases.push(stats);
        // The joins still on their way: until each watcher has them all, or a timeout.
        let ready = watchers.ready() as u64;
        let until = Instant::now() + opts.timeout;
        wait_for(until, || {
            let open = ready.saturating_sub(ctx.dropped.load(Ordering::Relaxed) as u64);
            ctx.samples.load(Ordering::Relaxed) >= ok * open
        })
        .await;
    }
    let mut stats = watchers.close(Mode::Watch, window_from).await;
    stats.nodes_logged_in = logged_in;
    stats.expected = logged_in * stats.ready;
    (phases, stats)
}

/// Logs nodes `0..N` in at `opts.rate` per second (open loop) until `opts.duration`;
/// returns the phase, the logins that succeeded, and when the first was due.
async fn paced_login(
    target: &Arc<Target>,
    ctx: &Arc<Ctx>,
    opts: &Options,
) -> (PhaseStats, u64, Instant) {
    let n = opts.nodes;
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + opts.duration;
    let interval = Duration::from_secs_f64(1.0 / opts.rate);
    let tasks: Vec<_> = (0..opts.login_concurrency.min(n))
        .map(|_| {
            let (target, ctx, next) = (target.clone(), ctx.clone(), next.clone());
            tokio::spawn(async move {
                let mut conn = Conn::new(target);
                let mut stats = PhaseStats::new("login");
                let mut ok = 0u64;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let at = start + interval.mul_f64(i as f64);
                    if at >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(at.into()).await;
                    let sent = ctx.since_t0_ns(Instant::now()) + 1;
                    ctx.sent[i].store(sent, Ordering::Release);
                    let (ex, lease) = conn.login_lease(i).await;
                    stats.record(&ex);
                    ok += u64::from(lease.is_some());
                    connect_backoff(&ex).await;
                }
                stats.reconnects = conn.reconnects;
                (stats, ok)
            })
        })
        .collect();
    let mut total = PhaseStats::new("login");
    let mut ok = 0;
    for task in tasks {
        match task.await {
            Ok((stats, n)) => {
                total.merge(stats);
                ok += n;
            }
            Err(_) => total.transport_error("worker_panicked"),
        }
    }
    total.elapsed = start.elapsed();
    (total, ok, start)
}

/// `expiry`: see the mode's help.
pub async fn expiry(
    login: &Arc<Target>,
    watched: &Arc<Target>,
    opts: &Options,
) -> (Vec<PhaseStats>, WatchStats) {
    let ctx = Arc::new(Ctx::new(Mode::Expiry, opts.nodes));
    eprintln!(
        "presence_load: expiry: opening {} watchers on {}",
        opts.watchers, watched.url
    );
    let watchers = open_watchers(watched, &ctx, opts).await;
    let n = opts.nodes;
    let workers = opts.login_concurrency.min(n);
    eprintln!("presence_load: login: {n} nodes over {workers} connections");
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (target, ctx, next) = (login.clone(), ctx.clone(), next.clone());
            tokio::spawn(async move {
                let mut conn = Conn::new(target);
                let mut stats = PhaseStats::new("login");
                let (mut ok, mut ttl_ms) = (0u64, 0u64);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let (ex, lease) = conn.login_lease(i).await;
                    stats.record(&ex);
                    if let Some(lease) = lease {
                        ctx.expires[i].store(lease.expires_at_ms, Ordering::Release);
                        ttl_ms = ttl_ms.max(lease.ttl_ms);
                        ok += 1;
                    }
                    connect_backoff(&ex).await;
                }
                stats.reconnects = conn.reconnects;
                (stats, ok, ttl_ms)
            })
        })
        .collect();
    let mut total = PhaseStats::new("login");
    let (mut ok, mut ttl_ms) = (0, 0);
    for task in tasks {
        match task.await {
            Ok((stats, n, ttl)) => {
                total.merge(stats);
                ok += n;
                ttl_ms = ttl_ms.max(ttl);
            }
            Err(_) => total.transport_error("worker_panicked"),
        }
    }
    total.elapsed = start.elapsed();
    let bound = Duration::from_millis(ttl_ms) + Duration::from_secs(10);
    eprintln!(
        "presence_load: expiry: {ok} nodes logged in in {:.2} s, TTL {ttl_ms} ms; waiting for \
         their expiries (at most {:.1} s)",
        total.elapsed.as_secs_f64(),
        bound.as_secs_f64()
    );
    let ready = watchers.ready() as u64;
    if ok > 0 {
        wait_for(Instant::now() + bound, || {
            let open = ready.saturating_sub(ctx.dropped.load(Ordering::Relaxed) as u64);
            ctx.samples.load(Ordering::Relaxed) >= ok * open
        })
        .await;
    }
    let mut stats = watchers.close(Mode::Expiry, start).await;
    stats.nodes_logged_in = ok;
    stats.expected = ok * stats.ready;
    (vec![total], stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `stream` in pieces of `step` bytes; returns events as (name, data) and comments.
    fn decode(stream: &[u8], step: usize) -> (Vec<(String, String)>, usize, bool) {
        let mut chunked = Chunked::new();
        let mut sse = Sse::default();
        let (mut events, mut comments, mut done) = (Vec::new(), 0, false);
        for piece in stream.chunks(step) {
            done = chunked
                .feed(piece, &mut |data| {
                    sse.feed(data, &mut |item| match item {
                        Item::Event { name, data } => events.push((
                            String::from_utf8_lossy(name).into_owned(),
                            String::from_utf8_lossy(data).into_owned(),
                        )),
                        Item::Comment(_) => comments += 1,
                    })
                })
                .unwrap();
        }
        (events, comments, done)
    }

    fn chunk(data: &str) -> String {
        format!("{:x}\r\n{data}\r\n", data.len())
    }

    #[test]
    fn events_survive_any_boundaries() {
        let big = "x".repeat(3 * MAX_LINE);
        let body = [
            chunk("id: 1\nevent: snapshot\ndata: {\"nodes\":["),
            chunk(&big),
            chunk("]}\n\n"),
            chunk(": keep-alive\n\n"),
            chunk("id: 2\r\nevent: join\r\ndata: {\"node_id\":\"load-7\",\"meta\":{}}\r\n\r\n"),
            chunk("event: leave\rdata: {\"node_id\":\"load-8\",\"reason\":\"expired\"}\r\r"),
            "0\r\n\r\n".to_owned(),
        ]
        .concat();
        for step in [1, 2, 3, 7, 64, 4096, body.len()] {
            let (events, comments, done) = decode(body.as_bytes(), step);
            assert!(done, "step {step}");
            assert_eq!(comments, 1);
            let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["snapshot", "join", "leave"], "step {step}");
            assert_eq!(events[0].1.len(), MAX_LINE, "a long line is cut, not kept");
            let data = events[2].1.as_bytes();
            assert_eq!(json_str(data, b"node_id"), Some(&b"load-8"[..]));
            assert_eq!(json_str(data, b"reason"), Some(&b"expired"[..]));
            assert_eq!(
                node_index(json_str(events[1].1.as_bytes(), b"node_id").unwrap()),
                Some(7)
            );
        }
    }

    #[test]
    fn bad_framing_is_an_error() {
        assert!(Chunked::new().feed(b"zz\r\n", &mut |_| {}).is_err());
        assert!(Chunked::new().feed(b"2\r\nabXY", &mut |_| {}).is_err());
        let long = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert!(Chunked::new().feed(&long, &mut |_| {}).is_err());
    }

    #[test]
    fn node_ids_and_members() {
        assert_eq!(node_index(b"load-0"), Some(0));
        assert_eq!(node_index(b"load-"), None);
        assert_eq!(node_index(b"other-1"), None);
        assert_eq!(
            json_str(br#"{"x_node_id":"a","node_id" : "b"}"#, b"node_id"),
            Some(&b"b"[..])
        );
        assert_eq!(json_str(br#"{"node_id":1}"#, b"node_id"), None);
    }
}
