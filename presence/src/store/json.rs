//! Writing the `GET /presence` body straight from store records.
//!
//! A listing is the hottest large response: 100 000 nodes are about 13.6 MB of JSON.
//! Building a `Vec<Node>` first means decoding every stored meta into a
//! `serde_json::Map` (a tree of small allocations) only to encode it again. Both
//! stores keep the meta as its serialized JSON text, so [`ListWriter`] copies that text
//! as it is and writes the rest of each node by hand into one buffer, in exactly the
//! bytes `serde_json::to_vec(&Vec<Node>)` would produce.

use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use serde::de::IgnoredAny;

use super::{sort_key, NodeListJson};
use crate::model::Status;

/// Bytes a node costs in the listing besides its id and meta: the field names,
/// punctuation and three 13-digit timestamps (an over-estimate is fine; it only sizes
/// the buffer).
pub(crate) const NODE_OVERHEAD: usize =
    r#"{"node_id":"","status":"draining","meta":,"online_since_ms":,"last_seen_ms":,"expires_at_ms":},"#
        .len()
        + 3 * 13;

/// Buffers of [`NodeListJson::CHUNK`] bytes whose pieces were sent and dropped, for
/// the next listings to write into. A listing of 100 000 nodes is about 480 pieces;
/// freshly allocated, each of their pages is a page fault when first written, and
/// jemalloc (the server's allocator) hands a listing fresh pages every time: that
/// was 4 000 faults and about 14 % of the server's time per listing (README,
/// Performance).
static SPARE_PIECES: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Most buffers kept in [`SPARE_PIECES`]: 16 MiB, a listing of 100 000 nodes with a
/// small meta. Pieces dropped beyond it are freed.
const MAX_SPARE_PIECES: usize = 512;

/// A buffer for a piece with room for `room` bytes: a spare one if it fits.
fn piece_buffer(room: usize) -> Vec<u8> {
    if room <= NodeListJson::CHUNK {
        let spare = SPARE_PIECES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        if let Some(buf) = spare {
            return buf;
        }
    }
    Vec::with_capacity(NodeListJson::CHUNK.max(room))
}

/// A written piece, which gives its buffer back to [`SPARE_PIECES`] when the last
/// [`Bytes`] of it is dropped (the response was sent).
struct Piece(Vec<u8>);

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Piece {
    fn drop(&mut self) {
        if self.0.capacity() != NodeListJson::CHUNK {
            return;
        }
        let mut buf = std::mem::take(&mut self.0);
        buf.clear();
        let mut spare = SPARE_PIECES.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.len() < MAX_SPARE_PIECES {
            spare.push(buf);
        }
    }
}

/// `buf` as a piece of a listing (see [`Piece`]).
fn freeze(buf: Vec<u8>) -> Bytes {
    Bytes::from_owner(Piece(buf))
}

/// Builds the JSON array of a listing, one node at a time, in `node_id` order, in
/// pieces of about [`NodeListJson::CHUNK`] bytes.
#[derive(Debug)]
pub(crate) struct ListWriter {
    done: Vec<Bytes>,
    buf: Vec<u8>,
    count: usize,
    len: usize,
    /// Where each node is, when the listing is to be merged with others
    /// ([`ListWriter::spanned`]).
    spans: Option<Vec<Span>>,
}

/// Where one node of a listing is: its piece, and its bytes in it.
#[derive(Clone, Copy, Debug)]
struct Span {
    piece: usize,
    start: usize,
    end: usize,
}

/// A listing that knows where each of its nodes is, to be merged with the listings
/// of other shards ([`merge_lists`]).
#[derive(Debug)]
pub(crate) struct SpannedList {
    pieces: Vec<Bytes>,
    spans: Vec<Span>,
}

impl SpannedList {
    /// The JSON text of node `i`.
    fn node(&self, i: usize) -> &[u8] {
        let span = self.spans[i];
        &self.pieces[span.piece][span.start..span.end]
    }

    /// The id of node `i` (ids need no escaping: see [`crate::model::NodeId`]).
    fn id(&self, i: usize) -> &[u8] {
        let rest = self
            .node(i)
            .get(br#"{"node_id":""#.len()..)
            .unwrap_or_default();
        let end = memchr::memchr(b'"', rest).unwrap_or(rest.len());
        &rest[..end]
    }

    /// Number of nodes.
    pub(crate) fn count(&self) -> usize {
        self.spans.len()
    }
}

/// The nodes of `lists` (each in `node_id` order) in one listing in `node_id` order,
/// at most `limit` of them. Also says whether nodes were left out for the limit, and
/// the last node id taken.
pub(crate) fn merge_lists(
    lists: &[SpannedList],
    limit: Option<usize>,
) -> (NodeListJson, bool, Option<String>) {
    let total: usize = lists.iter().map(SpannedList::count).sum();
    let bytes: usize = lists
        .iter()
        .map(|l| l.pieces.iter().map(Bytes::len).sum::<usize>())
        .sum();
    let mut out = ListWriter::with_capacity(bytes);
    let mut next = vec![0usize; lists.len()];
    // Each list's next id as a sort key: most comparisons end on it.
    let key = |list: &SpannedList, i: usize| (i < list.count()).then(|| sort_key(list.id(i)));
    let mut heads: Vec<Option<u128>> = lists.iter().map(|l| key(l, 0)).collect();
    let limit = limit.unwrap_or(usize::MAX);
    let mut last = None;
    while out.count() < limit {
        let mut best: Option<usize> = None;
        for (l, head) in heads.iter().enumerate() {
            let Some(k) = head else { continue };
            best = match best {
                Some(b) => {
                    let bk = heads[b].unwrap_or(u128::MAX);
                    let better =
                        *k < bk || (*k == bk && lists[l].id(next[l]) < lists[b].id(next[b]));
                    Some(if better { l } else { b })
                }
                None => Some(l),
            };
        }
        let Some(b) = best else { break };
        out.push_node(lists[b].node(next[b]));
        last = Some((b, next[b]));
        next[b] += 1;
        heads[b] = key(&lists[b], next[b]);
    }
    let cut = out.count() < total;
    let last = last.map(|(l, i)| String::from_utf8_lossy(lists[l].id(i)).into_owned());
    (out.finish(), cut, last)
}

impl ListWriter {
    /// A writer for a listing of about `bytes` bytes (only sizes the list of pieces).
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        let mut buf = if bytes >= NodeListJson::CHUNK {
            piece_buffer(NodeListJson::CHUNK)
        } else {
            Vec::with_capacity(bytes.max(64))
        };
        buf.push(b'[');
        ListWriter {
            done: Vec::with_capacity(bytes / NodeListJson::CHUNK + 1),
            buf,
            count: 0,
            len: 0,
            spans: None,
        }
    }

    /// A writer that also keeps where each node is ([`ListWriter::finish_spanned`]).
    pub(crate) fn spanned(bytes: usize) -> Self {
        let mut writer = Self::with_capacity(bytes);
        writer.spans = Some(Vec::new());
        writer
    }

    /// Appends one node already written as JSON (a node of another listing).
    fn push_node(&mut self, node: &[u8]) {
        if self.buf.len() + node.len() + 1 > self.buf.capacity() {
            self.cut(node.len() + 1);
        }
        if self.count > 0 {
            self.buf.push(b',');
        }
        self.count += 1;
        self.buf.extend_from_slice(node);
    }

    /// Appends one node. `meta` is its meta as serialized JSON (a JSON object, as
    /// written by `serde_json`); `None` stands for `{}`.
    pub(crate) fn push<M: ListedMillis>(
        &mut self,
        node_id: &str,
        status: Status,
        meta: Option<&[u8]>,
        online_since_ms: M,
        last_seen_ms: M,
        expires_at_ms: M,
    ) {
        // Room for the worst case (every id byte escaped as \u00XX, 20-digit times),
        // so that a piece never reallocates.
        let most = 6 * node_id.len() + meta.map_or(2, <[u8]>::len) + NODE_OVERHEAD + 3 * 7 + 1;
        if self.buf.len() + most > self.buf.capacity() {
            self.cut(most);
        }
        let buf = &mut self.buf;
        if self.count > 0 {
            buf.push(b',');
        }
        self.count += 1;
        let start = buf.len();
        write_node(
            buf,
            node_id,
            status,
            meta,
            online_since_ms,
            last_seen_ms,
            expires_at_ms,
        );
        if let Some(spans) = &mut self.spans {
            spans.push(Span {
                piece: self.done.len(),
                start,
                end: self.buf.len(),
            });
        }
    }

    /// Ends the current piece and starts one with room for at least `room` bytes.
    fn cut(&mut self, room: usize) {
        let next = piece_buffer(room + 1);
        let full = std::mem::replace(&mut self.buf, next);
        if !full.is_empty() {
            self.len += full.len();
            self.done.push(freeze(full));
        }
    }

    /// Number of nodes written so far.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// Bytes written so far.
    pub(crate) fn len(&self) -> usize {
        self.len + self.buf.len()
    }

    /// Closes the array, keeping where each node is (a writer made by
    /// [`ListWriter::spanned`]; otherwise no node is found).
    pub(crate) fn finish_spanned(mut self) -> SpannedList {
        let spans = self.spans.take().unwrap_or_default();
        SpannedList {
            pieces: self.finish().chunks,
            spans,
        }
    }

    /// Closes the array.
    pub(crate) fn finish(mut self) -> NodeListJson {
        if self.buf.len() == self.buf.capacity() {
            self.cut(1);
        }
        self.buf.push(b']');
        self.done.push(freeze(self.buf));
        NodeListJson {
            count: self.count,
            chunks: self.done,
        }
    }
}

/// Writes one node as `GET /presence/{node_id}` answers it (`meta` as JSON text,
/// `None` for `{}`): an element of a listing, or a feed event's data.
pub(crate) fn write_node<M: ListedMillis>(
    buf: &mut Vec<u8>,
    node_id: &str,
    status: Status,
    meta: Option<&[u8]>,
    online_since_ms: M,
    last_seen_ms: M,
    expires_at_ms: M,
) {
    buf.extend_from_slice(br#"{"node_id":"#);
    write_str(buf, node_id);
    buf.extend_from_slice(br#","status":""#);
    buf.extend_from_slice(status.as_str().as_bytes());
    buf.extend_from_slice(br#"","meta":"#);
    buf.extend_from_slice(meta.unwrap_or(b"{}"));
    buf.extend_from_slice(br#","online_since_ms":"#);
    online_since_ms.write_to(buf);
    buf.extend_from_slice(br#","last_seen_ms":"#);
    last_seen_ms.write_to(buf);
    buf.extend_from_slice(br#","expires_at_ms":"#);
    expires_at_ms.write_to(buf);
    buf.push(b'}');
}

/// A time in epoch ms as [`write_node`] writes it: a number, or the digits a Redis
/// record stores it as.
pub(crate) trait ListedMillis: Copy {
    /// Appends it as a JSON number.
    fn write_to(self, buf: &mut Vec<u8>);
}

impl ListedMillis for u64 {
    fn write_to(self, buf: &mut Vec<u8>) {
        write_u64(buf, self);
    }
}

/// `true` when `json` is one syntactically valid JSON object (surrounding whitespace
/// allowed): what may be copied into a listing as a node's meta. Validates without
/// building anything.
pub(crate) fn is_json_object(json: &[u8]) -> bool {
    json.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{')
        && serde_json::from_slice::<IgnoredAny>(json).is_ok()
}

/// Writes `s` as a JSON string. Node ids never need escaping (their alphabet is
/// `A-Z a-z 0-9 . _ ~ : @ + = -`); anything else goes through `serde_json`.
pub(crate) fn write_str(buf: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else if serde_json::to_writer(&mut *buf, s).is_err() {
        // Writing a `str` into a `Vec` cannot fail; never leave the array broken.
        buf.extend_from_slice(b"\"\"");
    }
}

/// Appends `n` in decimal.
pub(crate) fn write_u64(buf: &mut Vec<u8>, mut n: u64) {
    // Two digits at a time: listings write three 13-digit times per node.
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    while n >= 10 {
        // `n % 100` is below 100, so the cast cannot truncate.
        let pair = 2 * (n % 100) as usize;
        n /= 100;
        i -= 2;
        digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n > 0 || i == digits.len() {
        i -= 1;
        // `n` is a single digit here.
        digits[i] = b'0' + n as u8;
    }
    buf.extend_from_slice(&digits[i..]);
}

/// The listing writer next to the same listing written by `serde_json` (meta as a
/// borrowed `RawValue`, numbers by `serde_json`'s own `itoa`), for the benchmark that
/// decides between them (`cargo bench -p presence --bench list_writer`) and the test
/// that they write the same bytes. Not part of the library's API.
#[cfg(feature = "test-util")]
pub mod compare {
    use serde::Serialize;
    use serde_json::value::RawValue;

    use super::ListWriter;
    use crate::model::Status;

    /// One node as the writers take it: id, meta JSON text, three times.
    pub type Row = (String, String, u64, u64, u64);

    /// The listing of `rows` by [`ListWriter`], in the pieces the server sends.
    pub fn by_hand(rows: &[Row]) -> Vec<bytes::Bytes> {
        let mut w = ListWriter::with_capacity(rows.len() * 128);
        for (id, meta, a, b, c) in rows {
            w.push(id, Status::Up, Some(meta.as_bytes()), *a, *b, *c);
        }
        w.finish().chunks
    }

    #[derive(Serialize)]
    struct Listed<'a> {
        node_id: &'a str,
        status: Status,
        meta: &'a RawValue,
        online_since_ms: u64,
        last_seen_ms: u64,
        expires_at_ms: u64,
    }

    /// The listing of `rows` by `serde_json`; returns its bytes.
    pub fn by_serde(rows: &[Row]) -> Vec<u8> {
        let mut out = Vec::with_capacity(rows.len() * 128);
        out.push(b'[');
        for (i, (id, meta, a, b, c)) in rows.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            // A borrowed `RawValue` can only be had by parsing the text: the check
            // the hand-written writer does once, when the meta is stored.
            let Ok(meta) = serde_json::from_str::<&RawValue>(meta) else {
                continue;
            };
            let node = Listed {
                node_id: id,
                status: Status::Up,
                meta,
                online_since_ms: *a,
                last_seen_ms: *b,
                expires_at_ms: *c,
            };
            if serde_json::to_writer(&mut out, &node).is_err() {
                return Vec::new();
            }
        }
        out.push(b']');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Meta, Node};

    /// A listing of `n` nodes, in pieces.
    fn pieces_of(n: usize) -> Vec<Bytes> {
        let mut list = ListWriter::with_capacity(n * 160);
        for i in 0..n {
            let id = format!("node-{i:06}");
            list.push(&id, Status::Up, Some(br#"{"load":0.5,"hp":90}"#), 1, 2, 3);
        }
        list.finish().chunks
    }

    #[test]
    fn a_sent_listings_buffers_are_written_into_by_the_next() {
        let first = pieces_of(2_000);
        assert!(first.len() >= 8, "{} pieces", first.len());
        let addresses: Vec<usize> = first.iter().map(|p| p.as_ptr() as usize).collect();
        let text: Vec<u8> = first.concat();
        drop(first);
        let second = pieces_of(2_000);
        // Other tests may take some spare buffers meanwhile, not all of them.
        let reused = second
            .iter()
            .filter(|p| addresses.contains(&(p.as_ptr() as usize)))
            .count();
        assert!(
            reused >= second.len() / 2,
            "{reused} of {} reused",
            second.len()
        );
        assert_eq!(
            second.concat(),
            text,
            "a reused buffer holds only its new piece"
        );
        assert!(
            SPARE_PIECES.lock().map_or(0, |spare| spare.len()) <= MAX_SPARE_PIECES,
            "the pool is bounded"
        );
    }

    fn node(id: &str, meta: Meta, t: u64) -> Node {
        Node {
            node_id: id.to_owned(),
            status: Status::ALL[(t % 3) as usize],
            meta,
            online_since_ms: t,
            last_seen_ms: t + 1,
            expires_at_ms: u64::MAX,
        }
    }

    #[test]
    fn writes_what_serde_json_writes() {
        let mut meta = Meta::new();
        meta.insert("load".into(), 0.25.into());
        meta.insert("name".into(), "a \"quoted\" \\ name\n".into());
        meta.insert("tags".into(), serde_json::json!(["x", {"y": null}]));
        let nodes = vec![
            node("a", Meta::new(), 0),
            node("b.c~d:e@f+g=h-i_j", meta, 1_764_424_123_456),
            node("we\"ird\u{1}", Meta::new(), 9),
        ];
        let mut w = ListWriter::with_capacity(0);
        for n in &nodes {
            let meta = (!n.meta.is_empty()).then(|| serde_json::to_vec(&n.meta).unwrap());
            w.push(
                &n.node_id,
                n.status,
                meta.as_deref(),
                n.online_since_ms,
                n.last_seen_ms,
                n.expires_at_ms,
            );
        }
        assert_eq!(w.count(), 3);
        let list = w.finish();
        assert_eq!(list.count, 3);
        assert_eq!(list.to_bytes(), serde_json::to_vec(&nodes).unwrap());
    }

    #[cfg(feature = "test-util")]
    #[test]
    fn both_writers_write_the_same_listing() {
        let rows: Vec<compare::Row> = (0..300)
            .map(|i| {
                (
                    format!("node-{i:05}"),
                    format!(r#"{{"load":0.{i},"hp":{i},"name":"n\"{i}"}}"#),
                    1_764_424_123_456 + i,
                    1_764_424_123_999 + i,
                    1_764_424_133_456 + i,
                )
            })
            .collect();
        assert_eq!(compare::by_hand(&rows).concat(), compare::by_serde(&rows));
    }

    #[test]
    fn numbers() {
        for n in [0, 1, 9, 10, 99, 100, 101, 1_764_424_123_456, u64::MAX] {
            let mut buf = Vec::new();
            write_u64(&mut buf, n);
            assert_eq!(buf, n.to_string().as_bytes());
        }
    }

    #[test]
    fn empty_list() {
        let list = ListWriter::with_capacity(0).finish();
        assert_eq!((list.count, &list.to_bytes()[..]), (0, &b"[]"[..]));
    }

    #[test]
    fn large_lists_come_in_pieces_that_never_grow() {
        let meta = format!(r#"{{"pad":"{}"}}"#, "x".repeat(3000));
        let mut w = ListWriter::with_capacity(1 << 20);
        let mut nodes = Vec::new();
        for i in 0..500 {
            let id = format!("node-{i:04}");
            let meta = (i % 3 == 0).then_some(meta.as_bytes());
            w.push(&id, Status::Draining, meta, i, i + 1, u64::MAX - i);
            let meta = meta.map_or_else(Meta::new, |m| serde_json::from_slice(m).unwrap());
            nodes.push(Node {
                node_id: id,
                status: Status::Draining,
                meta,
                online_since_ms: i,
                last_seen_ms: i + 1,
                expires_at_ms: u64::MAX - i,
            });
        }
        let len = w.len();
        let list = w.finish();
        assert_eq!(list.len(), len + 1);
        assert!(list.chunks.len() > 10, "{} pieces", list.chunks.len());
        for chunk in &list.chunks {
            assert!(chunk.len() <= NodeListJson::CHUNK + 4200, "{}", chunk.len());
        }
        assert_eq!(list.to_bytes(), serde_json::to_vec(&nodes).unwrap());
    }

    #[test]
    fn json_object_check() {
        assert!(is_json_object(br#"{"a":[1,2,{"b":null}]}"#));
        assert!(is_json_object(b" {} "));
        for bad in [
            &b""[..],
            b"[]",
            b"1",
            b"{",
            b"{}}",
            b"{\"a\":}",
            b"null",
            b"{} x",
        ] {
            assert!(!is_json_object(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
