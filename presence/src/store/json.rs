//! Writing the `GET /presence` body straight from store records.
//!
//! A listing is the hottest large response: 100 000 nodes are about 13.6 MB of JSON.
//! Building a `Vec<Node>` first means decoding every stored meta into a
//! `serde_json::Map` (a tree of small allocations) only to encode it again. Both
//! stores keep the meta as its serialized JSON text, so [`ListWriter`] copies that text
//! as it is and writes the rest of each node by hand into one buffer, in exactly the
//! bytes `serde_json::to_vec(&Vec<Node>)` would produce.

use bytes::Bytes;
use serde::de::IgnoredAny;

use super::NodeListJson;
use crate::model::Status;

/// Bytes a node costs in the listing besides its id and meta: the field names,
/// punctuation and three 13-digit timestamps (an over-estimate is fine; it only sizes
/// the buffer).
pub(crate) const NODE_OVERHEAD: usize =
    r#"{"node_id":"","status":"draining","meta":,"online_since_ms":,"last_seen_ms":,"expires_at_ms":},"#
        .len()
        + 3 * 13;

/// Builds the JSON array of a listing, one node at a time, in `node_id` order, in
/// pieces of about [`NodeListJson::CHUNK`] bytes.
#[derive(Debug)]
pub(crate) struct ListWriter {
    done: Vec<Bytes>,
    buf: Vec<u8>,
    count: usize,
    len: usize,
}

impl ListWriter {
    /// A writer for a listing of about `bytes` bytes (only sizes the list of pieces).
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(NodeListJson::CHUNK.min(bytes.max(64)));
        buf.push(b'[');
        ListWriter {
            done: Vec::with_capacity(bytes / NodeListJson::CHUNK + 1),
            buf,
            count: 0,
            len: 0,
        }
    }

    /// Appends one node. `meta` is its meta as serialized JSON (a JSON object, as
    /// written by `serde_json`); `None` stands for `{}`.
    pub(crate) fn push(
        &mut self,
        node_id: &str,
        status: Status,
        meta: Option<&[u8]>,
        online_since_ms: u64,
        last_seen_ms: u64,
        expires_at_ms: u64,
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
        write_node(
            buf,
            node_id,
            status,
            meta,
            online_since_ms,
            last_seen_ms,
            expires_at_ms,
        );
    }

    /// Ends the current piece and starts one with room for at least `room` bytes.
    fn cut(&mut self, room: usize) {
        let next = Vec::with_capacity(NodeListJson::CHUNK.max(room + 1));
        let full = std::mem::replace(&mut self.buf, next);
        if !full.is_empty() {
            self.len += full.len();
            self.done.push(Bytes::from(full));
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

    /// Closes the array.
    pub(crate) fn finish(mut self) -> NodeListJson {
        if self.buf.len() == self.buf.capacity() {
            self.cut(1);
        }
        self.buf.push(b']');
        self.done.push(Bytes::from(self.buf));
        NodeListJson {
            count: self.count,
            chunks: self.done,
        }
    }
}

/// Writes one node as `GET /presence/{node_id}` answers it (`meta` as JSON text,
/// `None` for `{}`): an element of a listing, or a feed event's data.
pub(crate) fn write_node(
    buf: &mut Vec<u8>,
    node_id: &str,
    status: Status,
    meta: Option<&[u8]>,
    online_since_ms: u64,
    last_seen_ms: u64,
    expires_at_ms: u64,
) {
    buf.extend_from_slice(br#"{"node_id":"#);
    write_str(buf, node_id);
    buf.extend_from_slice(br#","status":""#);
    buf.extend_from_slice(status.as_str().as_bytes());
    buf.extend_from_slice(br#"","meta":"#);
    buf.extend_from_slice(meta.unwrap_or(b"{}"));
    buf.extend_from_slice(br#","online_since_ms":"#);
    write_u64(buf, online_since_ms);
    buf.extend_from_slice(br#","last_seen_ms":"#);
    write_u64(buf, last_seen_ms);
    buf.extend_from_slice(br#","expires_at_ms":"#);
    write_u64(buf, expires_at_ms);
    buf.push(b'}');
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
