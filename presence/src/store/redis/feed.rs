//! The Redis side of the change feed: the stream the scripts write, its one reader
//! per store, and the catch-up of a watcher whose cursor is older than what the
//! reader holds.
//!
//! Every script that changes a node appends its event to `{prefix}:feed` (a stream
//! trimmed by age, `MINID ~`) in the same call, so a change and its event are one
//! atomic write. Each server reads the stream over **one** connection of its own
//! (`XREAD BLOCK`, which would stall the multiplexed connection everything else
//! shares) and fans the events out to its watchers in-process ([`Hub`]): a thousand
//! watchers cost Redis one reader, not a thousand.

use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::{RedisError, Value};

use super::conn::{Connector, RedisConnection};
use super::record::{parse_u64, Record};
use super::scripts::FEED_STATE;
use super::{local_epoch_ms, unavailable, DeploymentKeys};
use crate::store::feed::{Change, ChangeKind, Hub, LeaveReason, Position};
use crate::store::json::write_node;
use crate::store::StoreError;

/// How long one `XREAD` blocks: how soon the reader notices its store is gone.
const BLOCK: Duration = Duration::from_secs(1);

/// Entries one `XREAD` or `XRANGE` returns at most.
const READ_COUNT: usize = 512;

/// Longest wait between two attempts to reach Redis again.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The feed as [`FEED_STATE`] reports it.
#[derive(Debug, Default)]
pub(super) struct FeedState {
    /// The epoch; 0 when the feed does not exist (yet).
    pub(super) epoch: u64,
    /// The id the stream generated last (0-0 for none).
    pub(super) last: Position,
    /// The highest id ever trimmed (Redis 7), if Redis reports it.
    pub(super) deleted: Option<Position>,
    /// The first entry held, if any.
    pub(super) first: Option<Position>,
}

impl FeedState {
    /// Whether every entry after `after` is still in the stream.
    pub(super) fn holds_after(&self, after: Position) -> bool {
        match (self.deleted, self.first) {
            (Some(deleted), _) => deleted <= after,
            // Redis 6.2: only the first entry tells.
            (None, Some(first)) => first <= after,
            (None, None) => after >= self.last,
        }
    }
}

/// Reads the epoch, last id, trimmed-up-to id and first entry of the feed.
pub(super) async fn feed_state(
    conn: &mut impl redis::aio::ConnectionLike,
    keys: &DeploymentKeys,
) -> Result<FeedState, RedisError> {
    let (epoch, last, deleted, first): (String, String, String, String) = FEED_STATE
        .key(&keys.epoch)
        .key(&keys.feed)
        .invoke_async(conn)
        .await?;
    let position = |s: &str| Position::parse_stream_id(s.as_bytes());
    Ok(FeedState {
        epoch: parse_u64(epoch.as_bytes()).unwrap_or(0),
        last: position(&last).unwrap_or_default(),
        deleted: position(&deleted),
        first: position(&first),
    })
}

/// Follows the feed for `hub` until the hub (its store) is gone: over a connection
/// of its own, reconnecting with backoff; after a reconnection it goes on from the
/// last entry it read, and if the stream lost entries in between (trimmed, or
/// deleted and created again) it resets the hub, so every watcher resumes with a
/// snapshot.
pub(super) async fn read_feed(
    connector: Connector,
    keys: DeploymentKeys,
    hub: Weak<Hub>,
    connection_timeout: Duration,
    response_timeout: Duration,
) {
    let mut last: Option<Position> = None;
    let mut backoff = Duration::from_millis(50);
    while hub.strong_count() > 0 {
        let outcome = match connector
            .dedicated(connection_timeout, BLOCK + response_timeout)
            .await
        {
            Ok(conn) => follow(conn, &keys, &hub, &mut last, &mut backoff).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(error = %e, "change feed reader lost Redis; reconnecting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One connection's worth of [`read_feed`]: `Ok` when the hub is gone.
async fn follow(
    mut conn: RedisConnection,
    keys: &DeploymentKeys,
    hub: &Weak<Hub>,
    last: &mut Option<Position>,
    backoff: &mut Duration,
) -> Result<(), RedisError> {
    let state = feed_state(&mut conn, keys).await?;
    let Some(strong) = hub.upgrade() else {
        return Ok(());
    };
    let from = match *last {
        // Entries after where this reader was are gone: start over.
        Some(at) if state.holds_after(at) && strong.epoch() == Some(state.epoch) => at,
        Some(_) => {
            strong.reset(state.epoch, state.last, true);
            state.last
        }
        None => {
            strong.reset(state.epoch, state.last, false);
            state.last
        }
    };
    *last = Some(from);
    drop(strong);
    *backoff = Duration::from_millis(50);
    loop {
        let Some(at) = *last else {
            return Ok(());
        };
        let (epoch, reply): (Option<String>, Value) = redis::pipe()
            .cmd("GET")
            .arg(&keys.epoch)
            .cmd("XREAD")
            .arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(crate::millis(BLOCK))
            .arg("STREAMS")
            .arg(&keys.feed)
            .arg(at.stream_id())
            .query_async(&mut conn)
            .await?;
        let Some(hub) = hub.upgrade() else {
            return Ok(());
        };
        let mut epoch = epoch.and_then(|e| parse_u64(e.as_bytes())).unwrap_or(0);
        if epoch == 0 && !matches!(reply, Value::Nil) {
            // The feed was created while this read waited: its epoch is new too.
            let now: Option<String> = redis::cmd("GET")
                .arg(&keys.epoch)
                .query_async(&mut conn)
                .await?;
            epoch = now.and_then(|e| parse_u64(e.as_bytes())).unwrap_or(0);
        }
        match hub.epoch() {
            // The feed was created since: adopt its epoch, keep going.
            Some(0) if epoch != 0 => hub.reset(epoch, at, false),
            Some(known) if known != epoch => {
                // Deleted (and perhaps created again): what watchers know is void.
                hub.reset(epoch, Position::default(), true);
                *last = Some(Position::default());
                continue;
            }
            _ => {}
        }
        let changes = xread_changes(&reply, epoch);
        if let Some(newest) = changes.last() {
            *last = Some(newest.position);
        }
        hub.publish(changes, local_epoch_ms());
    }
}

/// The changes of an `XREAD` reply of one stream (RESP2 `[[key, entries]]` or RESP3
/// `{key: entries}`; nil when nothing came).
pub(super) fn xread_changes(reply: &Value, epoch: u64) -> Vec<Change> {
    let entries = match reply {
        Value::Array(streams) => match streams.first() {
            Some(Value::Array(pair)) => pair.get(1),
            _ => None,
        },
        Value::Map(streams) => streams.first().map(|(_, entries)| entries),
        _ => None,
    };
    entries.map_or_else(Vec::new, |e| xrange_changes(e, epoch))
}

/// The changes of an `XRANGE` reply (an array of entries); entries that do not
/// parse are skipped (and logged).
pub(super) fn xrange_changes(reply: &Value, epoch: u64) -> Vec<Change> {
    let Value::Array(list) = reply else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|entry| {
            let change = entry_change(entry, epoch);
            if change.is_none() {
                tracing::warn!(?entry, "skipping a change feed entry that does not parse");
            }
            change
        })
        .collect()
}

fn entry_change(entry: &Value, epoch: u64) -> Option<Change> {
    let Value::Array(pair) = entry else {
        return None;
    };
    let [id, fields] = pair.as_slice() else {
        return None;
    };
    let position = Position::parse_stream_id(bulk(id)?)?;
    let fields: Vec<&[u8]> = match fields {
        Value::Array(fields) => fields.iter().map(bulk).collect::<Option<_>>()?,
        Value::Map(fields) => fields
            .iter()
            .flat_map(|(k, v)| [bulk(k), bulk(v)])
            .collect::<Option<_>>()?,
        _ => return None,
    };
    let field = |name: &[u8]| {
        fields
            .chunks_exact(2)
            .find(|kv| kv[0] == name)
            .map(|kv| kv[1])
    };
    let node_id = std::str::from_utf8(field(b"n")?).ok()?;
    let (kind, data) = match field(b"k")? {
        b"j" | b"u" => {
            let kind = if field(b"k")? == b"j" {
                ChangeKind::Join
            } else {
                ChangeKind::Update
            };
            let rec = Record::parse(field(b"r")?)?;
            let mut data = Vec::with_capacity(rec.meta.len() + node_id.len() + 128);
            write_node(
                &mut data,
                node_id,
                rec.status,
                rec.meta_json(node_id),
                rec.online_since,
                rec.last_seen,
                rec.expires_at,
            );
            (kind, data.into())
        }
        b"l" => {
            let reason = match field(b"w")? {
                b"logout" => LeaveReason::Logout,
                b"expired" => LeaveReason::Expired,
                _ => return None,
            };
            let leave = Change::leave(node_id, reason);
            (leave.kind, leave.data)
        }
        _ => return None,
    };
    Some(Change::new(epoch, position, kind, node_id, data))
}

fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The changes after `after` up to `upto` from the stream, for a watcher whose
/// cursor is older than what the reader holds; `None` if the stream no longer holds
/// all of them (or is another feed), so the watcher needs a snapshot.
///
/// The stream is read first and its trimming checked after: trimming only ever
/// removes the oldest entries, so if nothing after `after` had been removed by the
/// check, the read was complete.
pub(super) async fn changes_between(
    conn: &mut RedisConnection,
    keys: &DeploymentKeys,
    epoch: u64,
    after: Position,
    upto: Position,
) -> Result<Option<Vec<Arc<Change>>>, StoreError> {
    let mut changes = Vec::new();
    let mut from = after;
    while from < upto {
        let reply: Value = redis::cmd("XRANGE")
            .arg(&keys.feed)
            .arg(format!("({}", from.stream_id()))
            .arg(upto.stream_id())
            .arg("COUNT")
            .arg(READ_COUNT)
            .query_async(conn)
            .await
            .map_err(unavailable)?;
        let page = xrange_changes(&reply, epoch);
        let Some(newest) = page.last() else {
            break;
        };
        from = newest.position;
        let full = page.len() == READ_COUNT;
        changes.extend(page.into_iter().map(Arc::new));
        if !full {
            break;
        }
    }
    let state = feed_state(conn, keys).await.map_err(unavailable)?;
    Ok((state.epoch == epoch && state.holds_after(after)).then_some(changes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_xread_and_xrange_replies() {
        let rec = "001764600012000001764600003000001764600000000000026f{\"load\":0.1}";
        let entry = |id: &str, fields: &[&str]| {
            Value::Array(vec![
                bulk(id),
                Value::Array(fields.iter().map(|f| bulk(f)).collect()),
            ])
        };
        let list = Value::Array(vec![
            entry("5-1", &["k", "j", "n", "a", "r", rec]),
            entry("5-2", &["k", "l", "n", "a", "w", "expired"]),
            entry("5-3", &["k", "x", "n", "a"]),
        ]);
        let xread = Value::Array(vec![Value::Array(vec![bulk("{p}:feed"), list.clone()])]);
        for changes in [xrange_changes(&list, 9), xread_changes(&xread, 9)] {
            assert_eq!(changes.len(), 2);
            assert_eq!(changes[0].kind, ChangeKind::Join);
            assert_eq!(
                &changes[0].data[..],
                br#"{"node_id":"a","status":"up","meta":{"load":0.1},"online_since_ms":1764600000000,"last_seen_ms":1764600003000,"expires_at_ms":1764600012000}"#
            );
            assert_eq!(changes[1].position, Position { ms: 5, seq: 2 });
            assert_eq!(
                &changes[1].data[..],
                br#"{"node_id":"a","reason":"expired"}"#
            );
        }
        assert!(xread_changes(&Value::Nil, 1).is_empty());
    }

    #[test]
    fn a_feed_holds_what_was_not_trimmed() {
        let p = |seq| Position { ms: 1, seq };
        let redis7 = FeedState {
            epoch: 1,
            last: p(9),
            deleted: Some(p(3)),
            first: Some(p(4)),
        };
        assert!(redis7.holds_after(p(3)) && redis7.holds_after(p(5)));
        assert!(!redis7.holds_after(p(2)));
        let redis6 = FeedState {
            deleted: None,
            ..redis7
        };
        assert!(redis6.holds_after(p(4)) && !redis6.holds_after(p(3)));
    }
}
