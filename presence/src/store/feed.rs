//! The change feed both stores keep: every login, meta change, logout and expiry as a
//! [`Change`] at a [`Position`], resumable from a [`Cursor`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), presence::store::StoreError> {
//! use presence::model::{Meta, NodeId};
//! use presence::store::feed::{ChangeKind, WatchOptions, WatchStart};
//! use presence::store::{MemoryStore, Store};
//!
//! let store = MemoryStore::new();
//! // No cursor: the watch starts from a snapshot (list the store after subscribing).
//! let mut watch = store.watch(None, WatchOptions::default()).await?;
//! assert!(matches!(watch.start, WatchStart::Snapshot));
//!
//! let node = NodeId::parse("n1").unwrap();
//! store.login(&node, "lease", 30_000, Meta::new()).await?;
//! let change = watch.changes.recv().await.expect("a change");
//! assert_eq!(change.kind, ChangeKind::Join);
//!
//! // Resuming from the last cursor replays what came after it (here: nothing).
//! let resumed = store.watch(Some(&change.cursor()), WatchOptions::default()).await?;
//! assert!(matches!(resumed.start, WatchStart::Resumed(ref replay) if replay.is_empty()));
//! # Ok(()) }
//! ```
//!
//! # Contract
//!
//! - Changes of one node are in the order they happened; positions only grow.
//! - A change is published by the write that made it (the same lock for
//!   [`MemoryStore`](super::MemoryStore), the same Lua script for
//!   [`RedisStore`](super::RedisStore)): there is never a change without its event or
//!   an event without its change.
//! - A heartbeat that moves only time is no change.
//! - [`Store::watch`](super::Store::watch) subscribes first and then decides where the
//!   watch starts: replaying the changes after the caller's cursor, or (no cursor, a
//!   cursor of another feed, one older than the retention, or one from the future) a
//!   snapshot. The caller then lists the store: everything up to [`Watch::cursor`] is
//!   in that listing, everything after it arrives through [`Watch::changes`], so
//!   nothing is missed (a change may show in both; applying by `node_id` is
//!   idempotent).
//! - Each watcher's backlog is bounded ([`WatchOptions::backlog`]): a watcher that
//!   falls that far behind is dropped (its [`Changes`] ends, and
//!   [`WatchOptions::on_overflow`] runs) and resumes from its cursor.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::json::write_node;
use super::StoreError;
use crate::model::Status;

/// A place in one shard's feed. [`RedisStore`](super::RedisStore): the stream entry id
/// `ms-seq`; [`MemoryStore`](super::MemoryStore): `0-seq`. Ordered like the feed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Milliseconds part (Redis stream id) or 0.
    pub ms: u64,
    /// Sequence part.
    pub seq: u64,
}

impl Position {
    /// Parses a Redis stream id, `ms-seq`.
    pub fn parse_stream_id(id: &[u8]) -> Option<Position> {
        let text = std::str::from_utf8(id).ok()?;
        let (ms, seq) = text.split_once('-')?;
        Some(Position {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// As a Redis stream id, `ms-seq`.
    pub fn stream_id(self) -> String {
        format!("{}-{}", self.ms, self.seq)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Where a watcher is in a feed: the feed's epoch (a new feed, e.g. a restarted memory
/// store or a Redis stream that was deleted, has another) and a [`Position`] per shard.
///
/// Encoded ([`Cursor::encode`]) as an opaque, versioned, checksummed token: clients
/// must not read anything into it. Version 1 holds any number of positions, so a
/// deployment spread over several shards extends it rather than replacing it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cursor {
    epoch: u64,
    positions: Vec<Position>,
}

/// Why [`Cursor::decode`] refused a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidCursor {
    /// Not base64url, too short, or not as long as it says.
    Malformed,
    /// A version this build does not know.
    Version,
    /// The checksum does not match: garbled or edited.
    Checksum,
}

impl fmt::Display for InvalidCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InvalidCursor::Malformed => "the cursor is malformed",
            InvalidCursor::Version => "the cursor has an unknown version",
            InvalidCursor::Checksum => "the cursor's checksum does not match",
        })
    }
}

impl std::error::Error for InvalidCursor {}

/// Version byte of the cursor encoding.
const CURSOR_V1: u8 = 1;
/// Most positions a cursor holds (shards of one deployment).
const MAX_CURSOR_POSITIONS: usize = 1024;

impl Cursor {
    /// A cursor at `positions` (one per shard) of the feed with `epoch`.
    pub fn new(epoch: u64, positions: Vec<Position>) -> Cursor {
        Cursor { epoch, positions }
    }

    /// The epoch of the feed it belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The position per shard.
    pub fn positions(&self) -> &[Position] {
        &self.positions
    }

    /// The position of a single-shard feed: `None` for a cursor with another number
    /// of positions.
    pub fn single(&self) -> Option<Position> {
        match self.positions.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// The token: base64url of `version, epoch, count, (ms, seq) * count,
    /// checksum` (big-endian; the checksum is FNV-1a 32 of what precedes it).
    pub fn encode(&self) -> String {
        let mut raw = Vec::with_capacity(14 + 16 * self.positions.len());
        raw.push(CURSOR_V1);
        raw.extend_from_slice(&self.epoch.to_be_bytes());
        let count = u16::try_from(self.positions.len()).unwrap_or(u16::MAX);
        raw.extend_from_slice(&count.to_be_bytes());
        for p in self.positions.iter().take(usize::from(count)) {
            raw.extend_from_slice(&p.ms.to_be_bytes());
            raw.extend_from_slice(&p.seq.to_be_bytes());
        }
        let sum = fnv1a(&raw);
        raw.extend_from_slice(&sum.to_be_bytes());
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Reads a token made by [`Cursor::encode`].
    ///
    /// # Errors
    /// [`InvalidCursor`] for anything else; never panics, whatever the input.
    pub fn decode(token: &str) -> Result<Cursor, InvalidCursor> {
        // 1024 positions in base64: the longest token worth reading.
        if token.len() > 22_000 {
            return Err(InvalidCursor::Malformed);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| InvalidCursor::Malformed)?;
        let (body, sum) = raw
            .split_last_chunk::<4>()
            .ok_or(InvalidCursor::Malformed)?;
        let (&version, rest) = body.split_first().ok_or(InvalidCursor::Malformed)?;
        if version != CURSOR_V1 {
            return Err(InvalidCursor::Version);
        }
        if fnv1a(body) != u32::from_be_bytes(*sum) {
            return Err(InvalidCursor::Checksum);
        }
        let (epoch, rest) = rest
            .split_first_chunk::<8>()
            .ok_or(InvalidCursor::Malformed)?;
        let (count, mut rest) = rest
            .split_first_chunk::<2>()
            .ok_or(InvalidCursor::Malformed)?;
        let count = usize::from(u16::from_be_bytes(*count));
        if count > MAX_CURSOR_POSITIONS || rest.len() != 16 * count {
            return Err(InvalidCursor::Malformed);
        }
        let mut positions = Vec::with_capacity(count);
        while let Some((ms, tail)) = rest.split_first_chunk::<8>() {
            let (seq, tail) = tail
                .split_first_chunk::<8>()
                .ok_or(InvalidCursor::Malformed)?;
            positions.push(Position {
                ms: u64::from_be_bytes(*ms),
                seq: u64::from_be_bytes(*seq),
            });
            rest = tail;
        }
        Ok(Cursor {
            epoch: u64::from_be_bytes(*epoch),
            positions,
        })
    }
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Why a node left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeaveReason {
    /// It logged out.
    Logout,
    /// Its lease ran out.
    Expired,
    /// It no longer matches the watch's filter (a filtered watch only).
    Unmatched,
}

impl LeaveReason {
    /// As the wire spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaveReason::Logout => "logout",
            LeaveReason::Expired => "expired",
            LeaveReason::Unmatched => "unmatched",
        }
    }
}

/// What happened to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// A login (a re-login with a new lease too).
    Join,
    /// A heartbeat or call that changed the node's meta.
    Update,
    /// The node is gone.
    Leave(LeaveReason),
}

impl ChangeKind {
    /// The SSE event name: `join`, `update` or `leave`.
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Join => "join",
            ChangeKind::Update => "update",
            ChangeKind::Leave(_) => "leave",
        }
    }
}

/// One change in the feed.
#[derive(Debug)]
pub struct Change {
    /// Where it is in its shard's feed.
    pub position: Position,
    /// The epoch of the feed.
    pub epoch: u64,
    /// What happened.
    pub kind: ChangeKind,
    /// The node it happened to.
    pub node_id: Box<str>,
    /// The event's data as JSON: the node (as `GET /presence/{id}` shows it) for a
    /// join or update, `{"node_id", "reason"}` for a leave.
    pub data: Bytes,
    /// The change as its consumer encodes it (an SSE frame), made once and shared by
    /// every watcher it is sent to.
    encoded: OnceLock<Bytes>,
    /// The cursor right after it, when that is more than its own shard's position
    /// (a watch over several shards: see [`merge`]).
    cursor: Option<Cursor>,
}

impl Change {
    /// A change of `node_id` with its JSON `data`.
    pub fn new(
        epoch: u64,
        position: Position,
        kind: ChangeKind,
        node_id: &str,
        data: Bytes,
    ) -> Change {
        Change {
            position,
            epoch,
            kind,
            node_id: node_id.into(),
            data,
            encoded: OnceLock::new(),
            cursor: None,
        }
    }

    /// A join or update of a node, its data written from the node's fields (`meta`
    /// as JSON text, `None` for `{}`).
    pub(crate) fn node(
        kind: ChangeKind,
        node_id: &str,
        status: Status,
        meta: Option<&[u8]>,
        online_since_ms: u64,
        last_seen_ms: u64,
        expires_at_ms: u64,
    ) -> PendingChange {
        let mut buf = Vec::with_capacity(node_id.len() + meta.map_or(2, <[u8]>::len) + 128);
        write_node(
            &mut buf,
            node_id,
            status,
            meta,
            online_since_ms,
            last_seen_ms,
            expires_at_ms,
        );
        PendingChange {
            kind,
            node_id: node_id.into(),
            data: buf.into(),
        }
    }

    /// A leave of `node_id`.
    pub(crate) fn leave(node_id: &str, reason: LeaveReason) -> PendingChange {
        let mut buf = Vec::with_capacity(node_id.len() + 40);
        buf.extend_from_slice(br#"{"node_id":"#);
        super::json::write_str(&mut buf, node_id);
        buf.extend_from_slice(br#","reason":""#);
        buf.extend_from_slice(reason.as_str().as_bytes());
        buf.extend_from_slice(br#""}"#);
        PendingChange {
            kind: ChangeKind::Leave(reason),
            node_id: node_id.into(),
            data: buf.into(),
        }
    }

    /// The cursor right after this change: its position in its feed, or, in a watch
    /// over several shards, every shard's position as of this change.
    pub fn cursor(&self) -> Cursor {
        self.cursor
            .clone()
            .unwrap_or_else(|| Cursor::new(self.epoch, vec![self.position]))
    }

    /// This change with `cursor` as its cursor (and a frame of its own).
    fn at(&self, cursor: Cursor) -> Change {
        Change {
            position: self.position,
            epoch: self.epoch,
            kind: self.kind,
            node_id: self.node_id.clone(),
            data: self.data.clone(),
            encoded: OnceLock::new(),
            cursor: Some(cursor),
        }
    }

    /// The change as `encode` makes it, made on first use and shared afterwards.
    pub fn encoded(&self, encode: impl FnOnce(&Change) -> Bytes) -> Bytes {
        self.encoded.get_or_init(|| encode(self)).clone()
    }
}

/// A change that has no position yet: a [`MemoryStore`](super::MemoryStore) write
/// hands it to its [`Hub`], which numbers it.
#[derive(Debug)]
pub(crate) struct PendingChange {
    pub(crate) kind: ChangeKind,
    pub(crate) node_id: Box<str>,
    pub(crate) data: Bytes,
}

/// How a watch subscribes.
#[derive(Clone)]
pub struct WatchOptions {
    /// Changes that may wait for the watcher before it is dropped (default 1024).
    pub backlog: usize,
    /// Called once if the watcher is dropped for being too slow, e.g. to close its
    /// connection (whose writes may be blocked, so that the watcher itself never
    /// notices).
    pub on_overflow: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            backlog: 1024,
            on_overflow: None,
        }
    }
}

impl fmt::Debug for WatchOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchOptions")
            .field("backlog", &self.backlog)
            .field("on_overflow", &self.on_overflow.is_some())
            .finish()
    }
}

/// Where a new watch starts.
#[derive(Debug)]
pub enum WatchStart {
    /// The cursor was good: these changes came after it (up to [`Watch::cursor`]);
    /// send them first.
    Resumed(Vec<Arc<Change>>),
    /// No usable cursor: list the store and send that as a snapshot at
    /// [`Watch::cursor`].
    Snapshot,
}

/// A subscription to a store's feed (see the [module docs](self)).
#[derive(Debug)]
pub struct Watch {
    /// How it starts.
    pub start: WatchStart,
    /// The feed's position when the watch subscribed: a snapshot's cursor, or where
    /// the replay ends.
    pub cursor: Cursor,
    /// Every change after [`Watch::cursor`], as it happens.
    pub changes: Changes,
}

/// The live changes of a [`Watch`]. Ends (`None`) when the watcher was dropped for
/// being too slow or the feed restarted; resume from the last cursor.
#[derive(Debug)]
pub struct Changes {
    source: Source,
}

#[derive(Debug)]
enum Source {
    /// One feed's subscription.
    Feed(mpsc::Receiver<Arc<Change>>),
    /// Several shards' (see [`merge`]).
    Merged(Box<Merged>),
}

/// The live changes of a watch over several shards, each given the cursor of every
/// shard's position as of it.
#[derive(Debug)]
struct Merged {
    shards: Vec<Changes>,
    epochs: Vec<u64>,
    positions: Vec<Position>,
    /// The shard polled first next time, so that a busy shard cannot starve the
    /// others.
    next: usize,
}

impl Merged {
    fn cursor(&self) -> Cursor {
        Cursor::new(combined_epoch(&self.epochs), self.positions.clone())
    }

    /// `change`, from shard `shard`, moved into the merged feed.
    fn advance(&mut self, shard: usize, change: &Change) -> Arc<Change> {
        self.epochs[shard] = change.epoch;
        self.positions[shard] = change.position;
        Arc::new(change.at(self.cursor()))
    }
}

impl Changes {
    /// The next change.
    pub async fn recv(&mut self) -> Option<Arc<Change>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next change.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Arc<Change>>> {
        match &mut self.source {
            Source::Feed(rx) => rx.poll_recv(cx),
            Source::Merged(merged) => {
                let n = merged.shards.len();
                for k in 0..n {
                    let shard = (merged.next + k) % n;
                    match merged.shards[shard].poll_recv(cx) {
                        Poll::Ready(Some(change)) => {
                            merged.next = (shard + 1) % n;
                            return Poll::Ready(Some(merged.advance(shard, &change)));
                        }
                        // One shard's subscription ended: the watcher resumes from
                        // its cursor, which covers every shard.
                        Poll::Ready(None) => return Poll::Ready(None),
                        Poll::Pending => {}
                    }
                }
                Poll::Pending
            }
        }
    }
}

/// The epoch of a feed merged from shards whose feeds have `epochs`: a cursor of the
/// merged feed is only good while every shard's feed is the one it was made on.
pub(crate) fn combined_epoch(epochs: &[u64]) -> u64 {
    // FNV-1a over the epochs' bytes: any change of any epoch changes the result
    // (up to collisions of a 64-bit hash).
    epochs
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// What a cursor of a merged feed says of each of its shards, given the shards'
/// current feeds (`heads`, one per shard): each shard's own cursor, or `None` for
/// every shard when the cursor is not of this merged feed (another shard count,
/// another feed of some shard, garbage), so that the watch starts with a snapshot.
pub(crate) fn split(after: Option<&Cursor>, heads: &[Option<Cursor>]) -> Vec<Option<Cursor>> {
    let epochs: Option<Vec<u64>> = heads
        .iter()
        .map(|h| h.as_ref().map(Cursor::epoch))
        .collect();
    let (Some(after), Some(epochs)) = (after, epochs) else {
        return vec![None; heads.len()];
    };
    if after.positions().len() != heads.len() {
        return vec![None; heads.len()];
    }
    // A shard whose feed did not exist yet when the cursor was made (epoch 0, nothing
    // read) may have one now: everything in it came after the cursor.
    let unborn: Vec<u64> = epochs
        .iter()
        .zip(after.positions())
        .map(|(&epoch, &at)| if at == Position::default() { 0 } else { epoch })
        .collect();
    if after.epoch() != combined_epoch(&epochs) && after.epoch() != combined_epoch(&unborn) {
        return vec![None; heads.len()];
    }
    epochs
        .iter()
        .zip(after.positions())
        .map(|(&epoch, &at)| Some(Cursor::new(epoch, vec![at])))
        .collect()
}

/// One watch over several shards from each shard's watch (in shard order): a
/// snapshot if any shard needs one, else every shard's replay; then the shards' live
/// changes as they come, each with the cursor of every shard's position as of it.
pub(crate) fn merge(watches: Vec<Watch>) -> Watch {
    let epochs: Vec<u64> = watches.iter().map(|w| w.cursor.epoch()).collect();
    let heads: Vec<Position> = watches
        .iter()
        .map(|w| w.cursor.single().unwrap_or_default())
        .collect();
    let snapshot = watches
        .iter()
        .any(|w| matches!(w.start, WatchStart::Snapshot));
    let mut replays = Vec::new();
    let mut shards = Vec::with_capacity(watches.len());
    for watch in watches {
        if let WatchStart::Resumed(changes) = watch.start {
            replays.push(changes);
        }
        shards.push(watch.changes);
    }
    let merged = Merged {
        shards,
        epochs,
        positions: heads,
        next: 0,
    };
    let cursor = merged.cursor();
    let start = if snapshot {
        WatchStart::Snapshot
    } else {
        // Each replay starts after the caller's position in its shard and ends at the
        // shard's head: replayed in shard order, the cursors rise from the caller's
        // to the head, shard by shard.
        let mut positions: Vec<Position> = replays
            .iter()
            .zip(&merged.positions)
            .map(|(replay, &head)| replay.first().map_or(head, |c| before(c, head)))
            .collect();
        let mut all = Vec::new();
        for (shard, replay) in replays.into_iter().enumerate() {
            for change in replay {
                positions[shard] = change.position;
                let at = Cursor::new(combined_epoch(&merged.epochs), positions.clone());
                all.push(Arc::new(change.at(at)));
            }
        }
        WatchStart::Resumed(all)
    };
    Watch {
        start,
        cursor,
        changes: Changes {
            source: Source::Merged(Box::new(merged)),
        },
    }
}

/// A position just before `change` in its shard (where a replay of it starts), no
/// later than `head`.
fn before(change: &Change, head: Position) -> Position {
    let p = change.position;
    let earlier = if p.seq > 0 {
        Position {
            ms: p.ms,
            seq: p.seq - 1,
        }
    } else {
        Position {
            ms: p.ms.saturating_sub(1),
            seq: u64::MAX,
        }
    };
    earlier.min(head)
}

/// Where the hub can start a new subscriber.
#[derive(Debug)]
pub(crate) enum HubStart {
    /// The changes after the cursor, all held by the hub.
    Replay(Vec<Arc<Change>>),
    /// The cursor is of this feed but older than what the hub holds: the store's own
    /// log may still have the changes after it, up to the head.
    Fetch(Position),
    /// No usable cursor.
    Snapshot,
}

/// A new subscriber: its channel, where it starts and the head it starts at.
#[derive(Debug)]
pub(crate) struct Subscribed {
    pub(crate) changes: Changes,
    pub(crate) start: HubStart,
    pub(crate) head: Cursor,
}

/// The in-process side of a feed: the recent changes and the subscribers they are
/// fanned out to. One per store; a [`RedisStore`](super::RedisStore) feeds it from its
/// one reader of the Redis stream, a [`MemoryStore`](super::MemoryStore) from its
/// writes.
pub(crate) struct Hub {
    state: Mutex<HubState>,
}

struct HubState {
    /// `None` until the feed is known (a Redis reader that has not reached Redis).
    epoch: Option<u64>,
    /// Whether the feed was created while this hub knew it as not there yet (epoch
    /// 0), with nothing lost since: the hub holds, or the store's log has, all of
    /// it, so a cursor of epoch 0 (made before the feed existed) comes before all
    /// of it.
    born_here: bool,
    head: Position,
    /// Every change after `floor` is in `recent`.
    floor: Position,
    recent: VecDeque<(u64, Arc<Change>)>,
    max_recent: usize,
    retention_ms: u64,
    subscribers: Vec<Subscriber>,
}

struct Subscriber {
    tx: mpsc::Sender<Arc<Change>>,
    on_overflow: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("Hub")
            .field("epoch", &state.epoch)
            .field("head", &state.head)
            .field("recent", &state.recent.len())
            .field("subscribers", &state.subscribers.len())
            .finish()
    }
}

/// Default retention of a feed (`PRESENCE_WATCH_RETENTION_SEC`).
pub const DEFAULT_RETENTION_MS: u64 = 300_000;

impl Hub {
    /// A hub for a feed with `epoch` (`None`: not known yet) at `head`, holding up to
    /// `max_recent` changes of at most the retention's age.
    pub(crate) fn new(epoch: Option<u64>, head: Position, max_recent: usize) -> Hub {
        Hub {
            state: Mutex::new(HubState {
                epoch,
                born_here: false,
                head,
                floor: head,
                recent: VecDeque::new(),
                max_recent,
                retention_ms: DEFAULT_RETENTION_MS,
                subscribers: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        // Every mutation is completed before anything that could panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets how long changes are kept.
    pub(crate) fn set_retention_ms(&self, ms: u64) {
        self.lock().retention_ms = ms;
    }

    /// The epoch, if known.
    pub(crate) fn epoch(&self) -> Option<u64> {
        self.lock().epoch
    }

    /// The cursor at the head: what a listing made now is at least as new as.
    pub(crate) fn head(&self) -> Option<Cursor> {
        let state = self.lock();
        state
            .epoch
            .map(|epoch| Cursor::new(epoch, vec![state.head]))
    }

    /// Watchers subscribed.
    #[cfg(test)]
    pub(crate) fn subscribers(&self) -> usize {
        self.lock().subscribers.len()
    }

    /// Numbers `change` as the next position (`0-n`) and publishes it; `now_ms` ages
    /// out old changes. For a feed that numbers its own changes (memory).
    pub(crate) fn publish_next(&self, change: PendingChange, now_ms: u64) {
        let mut state = self.lock();
        let position = Position {
            ms: 0,
            seq: state.head.seq + 1,
        };
        let change = Change {
            position,
            epoch: state.epoch.unwrap_or(0),
            kind: change.kind,
            node_id: change.node_id,
            data: change.data,
            encoded: OnceLock::new(),
            cursor: None,
        };
        state.publish(change, now_ms);
    }

    /// Publishes changes read from the store's log (Redis), in order; those at or
    /// before the head were published already and are skipped.
    pub(crate) fn publish(&self, changes: impl IntoIterator<Item = Change>, now_ms: u64) {
        let mut state = self.lock();
        for change in changes {
            if change.position > state.head {
                state.publish(change, now_ms);
            }
        }
    }

    /// Learns the feed's epoch and head (a Redis reader that reached Redis). If the
    /// epoch is not the one known (the feed was recreated) or `lost` (changes after
    /// the head are gone), every subscriber is dropped: they resume and get a
    /// snapshot.
    pub(crate) fn reset(&self, epoch: u64, head: Position, lost: bool) {
        let mut state = self.lock();
        let same = state.epoch == Some(epoch) || state.epoch == Some(0);
        if state.epoch.is_some() && same && !lost {
            state.born_here |= state.epoch == Some(0) && epoch != 0;
            state.epoch = Some(epoch);
            return;
        }
        state.born_here = false;
        state.epoch = Some(epoch);
        state.head = head;
        state.floor = head;
        state.recent.clear();
        state.subscribers.clear();
    }

    /// Subscribes a watcher that knows `after` (if anything), with a channel of
    /// `options.backlog` changes.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] while the feed's epoch is not known.
    pub(crate) fn subscribe(
        &self,
        after: Option<&Cursor>,
        options: WatchOptions,
    ) -> Result<Subscribed, StoreError> {
        let mut state = self.lock();
        let Some(epoch) = state.epoch else {
            return Err(StoreError::Unavailable(
                "the change feed has not reached the store yet".to_owned(),
            ));
        };
        let (tx, rx) = mpsc::channel(options.backlog.max(1));
        state.subscribers.push(Subscriber {
            tx,
            on_overflow: options.on_overflow,
        });
        // A cursor of epoch 0 is of this feed if it was born here: a merged feed's
        // cursor says 0 for a shard whose feed did not exist yet when it was made.
        let born_here = state.born_here;
        let at = after
            .filter(|c| c.epoch == epoch || (c.epoch == 0 && born_here))
            .and_then(Cursor::single)
            .filter(|&p| p <= state.head);
        let start = match at {
            None => HubStart::Snapshot,
            Some(p) if p >= state.floor => HubStart::Replay(
                state
                    .recent
                    .iter()
                    .filter(|(_, c)| c.position > p)
                    .map(|(_, c)| c.clone())
                    .collect(),
            ),
            Some(p) => HubStart::Fetch(p),
        };
        Ok(Subscribed {
            changes: Changes {
                source: Source::Feed(rx),
            },
            start,
            head: Cursor::new(epoch, vec![state.head]),
        })
    }
}

impl HubState {
    fn publish(&mut self, change: Change, now_ms: u64) {
        self.head = change.position;
        let change = Arc::new(change);
        self.subscribers
            .retain(|s| match s.tx.try_send(change.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if let Some(on_overflow) = &s.on_overflow {
                        on_overflow();
                    }
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        self.recent.push_back((now_ms, change));
        let oldest = now_ms.saturating_sub(self.retention_ms);
        while let Some((at, c)) = self.recent.front() {
            if self.recent.len() <= self.max_recent && *at >= oldest {
                break;
            }
            self.floor = c.position;
            self.recent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let c = Cursor::new(
            42,
            vec![
                Position {
                    ms: 1_764_600_000_000,
                    seq: 3,
                },
                Position::default(),
            ],
        );
        assert_eq!(Cursor::decode(&c.encode()), Ok(c.clone()));
        let mut token = c.encode().into_bytes();
        token[5] = if token[5] == b'A' { b'B' } else { b'A' };
        let garbled = String::from_utf8(token).unwrap();
        assert!(Cursor::decode(&garbled).is_err());
        assert_eq!(Cursor::decode(""), Err(InvalidCursor::Malformed));
        assert_eq!(Cursor::decode("not base64!"), Err(InvalidCursor::Malformed));
        assert_eq!(
            Cursor::decode(&URL_SAFE_NO_PAD.encode([9, 0, 0, 0, 0])),
            Err(InvalidCursor::Version)
        );
    }

    proptest! {
        #[test]
        fn any_token_decodes_or_errs_without_panicking(token in ".{0,200}") {
            let _ = Cursor::decode(&token);
        }

        #[test]
        fn any_cursor_round_trips(epoch: u64, positions in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..8)) {
            let c = Cursor::new(epoch, positions.into_iter().map(|(ms, seq)| Position { ms, seq }).collect());
            prop_assert_eq!(Cursor::decode(&c.encode()), Ok(c));
        }
    }

    fn pending(id: &str) -> PendingChange {
        Change::leave(id, LeaveReason::Logout)
    }

    #[tokio::test]
    async fn hub_replays_after_a_cursor_and_snapshots_otherwise() {
        let hub = Hub::new(Some(7), Position::default(), 3);
        hub.publish_next(pending("a"), 0);
        let first = hub.head().unwrap();
        hub.publish_next(pending("b"), 0);
        let s = hub
            .subscribe(Some(&first), WatchOptions::default())
            .unwrap();
        match s.start {
            HubStart::Replay(replay) => {
                assert_eq!(replay.len(), 1);
                assert_eq!(&*replay[0].node_id, "b");
            }
            other => panic!("{other:?}"),
        }
        // Another epoch, a cursor from the future: snapshot.
        let other = Cursor::new(8, first.positions().to_vec());
        assert!(matches!(
            hub.subscribe(Some(&other), WatchOptions::default())
                .unwrap()
                .start,
            HubStart::Snapshot
        ));
        let future = Cursor::new(7, vec![Position { ms: 0, seq: 99 }]);
        assert!(matches!(
            hub.subscribe(Some(&future), WatchOptions::default())
                .unwrap()
                .start,
            HubStart::Snapshot
        ));
        // Older than what is held.
        for id in ["c", "d", "e"] {
            hub.publish_next(pending(id), 0);
        }
        assert!(matches!(
            hub.subscribe(Some(&first), WatchOptions::default())
                .unwrap()
                .start,
            HubStart::Fetch(_)
        ));
    }

    fn starts_with_replay(hub: &Hub, after: &Cursor) -> Option<usize> {
        match hub
            .subscribe(Some(after), WatchOptions::default())
            .ok()?
            .start
        {
            HubStart::Replay(replay) => Some(replay.len()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_feed_born_while_watched_resumes_cursors_made_before_it() {
        // A reader that found no feed (epoch 0), then saw it created (epoch 5).
        let born = Hub::new(None, Position::default(), 10);
        born.reset(0, Position::default(), false);
        let before_it = born.head().unwrap();
        assert_eq!(before_it.epoch(), 0);
        born.reset(5, Position::default(), false);
        born.publish_next(pending("a"), 0);
        assert_eq!(starts_with_replay(&born, &before_it), Some(1));

        // A feed that already existed when the reader first saw it: an epoch-0
        // cursor is not of it.
        let found = Hub::new(None, Position::default(), 10);
        found.reset(5, Position::default(), false);
        found.publish_next(pending("a"), 0);
        assert_eq!(starts_with_replay(&found, &before_it), None);

        // Nor once changes were lost since the birth.
        born.reset(5, Position::default(), true);
        assert_eq!(starts_with_replay(&born, &before_it), None);
    }

    #[tokio::test]
    async fn a_full_backlog_drops_the_subscriber_and_tells_it() {
        let hub = Hub::new(Some(1), Position::default(), 100);
        let told = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = told.clone();
        let options = WatchOptions {
            backlog: 2,
            on_overflow: Some(Arc::new(move || {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })),
        };
        let mut slow = hub.subscribe(None, options).unwrap();
        let mut fast = hub.subscribe(None, WatchOptions::default()).unwrap();
        for id in ["a", "b", "c", "d"] {
            hub.publish_next(pending(id), 0);
        }
        assert_eq!(told.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(hub.subscribers(), 1);
        // The slow one gets what fitted, then the end.
        assert!(slow.changes.recv().await.is_some());
        assert!(slow.changes.recv().await.is_some());
        assert!(slow.changes.recv().await.is_none());
        for _ in 0..4 {
            assert!(fast.changes.recv().await.is_some());
        }
    }
}
