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

/// Bytes a node costs in the listing besides its id and meta: the field names,
/// punctuation and three 13-digit timestamps (an over-estimate is fine; it only sizes
/// the buffer).
pub(crate) const NODE_OVERHEAD: usize =
    r#"{"node_id":"","meta":,"online_since_ms":,"last_seen_ms":,"expires_at_ms":},"#.len()
        + 3 * 13;

/// Builds the JSON array of a listing, one node at a time, in `node_id` order.
#[derive(Debug)]
pub(crate) struct ListWriter {
    buf: Vec<u8>,
    count: usize,
}

impl ListWriter {
    /// A writer whose buffer holds `capacity` bytes before it has to grow.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(2));
        buf.push(b'[');
        ListWriter { buf, count: 0 }
    }

    /// Appends one node. `meta` is its meta as serialized JSON (a JSON object, as
    /// written by `serde_json`); `None` stands for `{}`.
    pub(crate) fn push(
        &mut self,
        node_id: &str,
        meta: Option<&[u8]>,
        online_since_ms: u64,
        last_seen_ms: u64,
        expires_at_ms: u64,
    ) {
        let buf = &mut self.buf;
        if self.count > 0 {
            buf.push(b',');
        }
        self.count += 1;
        buf.extend_from_slice(br#"{"node_id":"#);
        write_str(buf, node_id);
        buf.extend_from_slice(br#","meta":"#);
        buf.extend_from_slice(meta.unwrap_or(b"{}"));
        buf.extend_from_slice(br#","online_since_ms":"#);
        write_u64(buf, online_since_ms);
        buf.extend_from_slice(br#","last_seen_ms":"#);
        write_u64(buf, last_seen_ms);
        buf.extend_from_slice(br#","expires_at_ms":"#);
        write_u64(buf, expires_at_ms);
        buf.push(b'}');
    }

    /// Number of nodes written so far.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// Bytes written so far.
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// Closes the array.
    pub(crate) fn finish(mut self) -> NodeListJson {
        self.buf.push(b']');
        NodeListJson {
            count: self.count,
            json: Bytes::from(self.buf),
        }
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
fn write_str(buf: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f) {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else if serde_json::to_writer(&mut *buf, s).is_err() {
        // Writing a `str` into a `Vec` cannot fail; never leave the array broken.
        buf.extend_from_slice(b"\"\"");
    }
}

fn write_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        // `n % 10` is below 10, so the cast cannot truncate.
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Meta, Node};

    fn node(id: &str, meta: Meta, t: u64) -> Node {
        Node {
            node_id: id.to_owned(),
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
                meta.as_deref(),
                n.online_since_ms,
                n.last_seen_ms,
                n.expires_at_ms,
            );
        }
        assert_eq!(w.count(), 3);
        let list = w.finish();
        assert_eq!(list.count, 3);
        assert_eq!(list.json, serde_json::to_vec(&nodes).unwrap());
    }

    #[test]
    fn empty_list() {
        let list = ListWriter::with_capacity(0).finish();
        assert_eq!((list.count, &list.json[..]), (0, &b"[]"[..]));
    }

    #[test]
    fn json_object_check() {
        assert!(is_json_object(br#"{"a":[1,2,{"b":null}]}"#));
        assert!(is_json_object(b" {} "));
        for bad in [&b""[..], b"[]", b"1", b"{", b"{}}", b"{\"a\":}", b"null", b"{} x"] {
            assert!(!is_json_object(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
