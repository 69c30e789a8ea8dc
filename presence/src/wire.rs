//! The wire types of the POST bodies, and the heartbeat's hand-made fast paths.
//!
//! `meta` and `status` are raw `Value`s here (not the model's `Option<Meta>` and
//! `Option<Status>`) so that a non-object meta is a `422 invalid_meta` and an unknown
//! status a `422 invalid_status`, as docs/http-api.md says, rather than a `400` from
//! the deserializer.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;

use crate::store::json::write_u64;

#[derive(Deserialize)]
pub(crate) struct LoginWire {
    pub(crate) node_id: String,
    #[serde(default)]
    pub(crate) meta: Option<serde_json::Value>,
    #[serde(default)]
    pub(crate) status: Option<serde_json::Value>,
}

#[derive(Deserialize)]
pub(crate) struct HeartbeatWire<'a> {
    #[serde(borrow)]
    pub(crate) node_id: Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) lease_id: Cow<'a, str>,
    #[serde(default)]
    pub(crate) meta: Option<serde_json::Value>,
    #[serde(default)]
    pub(crate) status: Option<serde_json::Value>,
}

/// A heartbeat body of exactly the form the SDK (and any `serde_json` client)
/// sends, `{"node_id":"<id>","lease_id":"<lease>"}` with no escapes, no whitespace,
/// no meta and no status, taken apart by hand; `None` for anything else, which the JSON parser
/// then reads (and judges). For the bodies it accepts, the result is what the parser
/// would give (a property test checks this).
pub(crate) fn plain_heartbeat(body: &[u8]) -> Option<HeartbeatWire<'_>> {
    let inner = body
        .strip_prefix(br#"{"node_id":""#)?
        .strip_suffix(br#""}"#)?;
    // The node id is the short part: it ends at the first quote.
    let end = inner.iter().position(|&b| b == b'"')?;
    let (node_id, rest) = inner.split_at(end);
    let lease_id = rest.strip_prefix(br#"","lease_id":""#)?;
    // No quote in the lease either, so the `"}` stripped above closed it.
    if !plain_json_text(node_id) || !plain_json_text(lease_id) {
        return None;
    }
    Some(HeartbeatWire {
        node_id: Cow::Borrowed(std::str::from_utf8(node_id).ok()?),
        lease_id: Cow::Borrowed(std::str::from_utf8(lease_id).ok()?),
        meta: None,
        status: None,
    })
}

/// Whether `s` is the same inside a JSON string as outside: no quote, no backslash,
/// no control character. Without an early exit, so the loop runs on whole words.
pub(crate) fn plain_json_text(s: &[u8]) -> bool {
    s.iter().fold(true, |plain, &b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    })
}

/// The [`HeartbeatResponse`](crate::model::HeartbeatResponse) JSON, written by hand
/// into a buffer of exactly its size (so `Bytes` takes it without another
/// allocation): every heartbeat answers with it. The node id never needs escaping
/// (see [`NodeId`]); the lease does only if the client sent an odd one.
pub(crate) fn heartbeat_reply(node_id: &str, lease_id: &str, expires_at_ms: u64) -> Bytes {
    if !plain_json_text(lease_id.as_bytes()) {
        return match serde_json::to_vec(&crate::model::HeartbeatResponse {
            node_id: node_id.to_owned(),
            lease_id: lease_id.to_owned(),
            expires_at_ms,
        }) {
            Ok(json) => Bytes::from(json),
            // A struct of strings and a number always serializes.
            Err(_) => Bytes::from_static(b"{}"),
        };
    }
    let head: [&[u8]; 5] = [
        br#"{"node_id":""#,
        node_id.as_bytes(),
        br#"","lease_id":""#,
        lease_id.as_bytes(),
        br#"","expires_at_ms":"#,
    ];
    let digits = expires_at_ms.checked_ilog10().map_or(1, |d| d as usize + 1);
    let mut out = Vec::with_capacity(head.iter().map(|p| p.len()).sum::<usize>() + digits + 1);
    for part in head {
        out.extend_from_slice(part);
    }
    write_u64(&mut out, expires_at_ms);
    out.push(b'}');
    Bytes::from(out)
}

#[derive(Deserialize)]
pub(crate) struct LogoutWire {
    pub(crate) node_id: String,
    pub(crate) lease_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_heartbeats_are_read_by_hand_and_the_rest_by_serde() {
        let ok = plain_heartbeat(br#"{"node_id":"n-1","lease_id":"abc"}"#).expect("plain");
        assert_eq!((&*ok.node_id, &*ok.lease_id), ("n-1", "abc"));
        for other in [
            &br#"{"node_id":"n","lease_id":"a","meta":{}}"#[..],
            // A status after the lease, or before it, is for the parser.
            br#"{"node_id":"n","lease_id":"a","status":"draining"}"#,
            br#"{"node_id":"n","status":"up","lease_id":"a"}"#,
            br#"{ "node_id":"n","lease_id":"a"}"#,
            br#"{"lease_id":"a","node_id":"n"}"#,
            br#"{"node_id":"n\u0041","lease_id":"a"}"#,
            br#"{"node_id":"n","lease_id":"a"} "#,
            br#"{"node_id":"n","lease_id":"a""#,
            b"{\"node_id\":\"n\x01\",\"lease_id\":\"a\"}",
        ] {
            assert!(
                plain_heartbeat(other).is_none(),
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
    }

    proptest::proptest! {
        /// Whatever the hand reader accepts, serde reads the same way.
        #[test]
        fn plain_heartbeats_agree_with_serde(
            node in "[ -~]{0,12}|.{0,6}",
            lease in "[ -~]{0,40}|.{0,6}",
            tail in proptest::sample::select(vec!["}", "} ", ",\"x\":1}", ",\"status\":\"degraded\"}", ""]),
        ) {
            let body = format!(r#"{{"node_id":"{node}","lease_id":"{lease}"{tail}"#);
            if let Some(fast) = plain_heartbeat(body.as_bytes()) {
                let slow: HeartbeatWire<'_> = serde_json::from_str(&body).expect("valid JSON");
                proptest::prop_assert_eq!(&*fast.node_id, &*slow.node_id);
                proptest::prop_assert_eq!(&*fast.lease_id, &*slow.lease_id);
                proptest::prop_assert!(slow.meta.is_none());
                proptest::prop_assert!(slow.status.is_none());
            }
        }
    }

    #[test]
    fn heartbeat_replies_are_what_serde_writes() {
        for (id, lease, exp) in [
            ("n-1", "0123456789abcdef0123456789abcdef", 1_764_600_000_123),
            ("a", "", 0),
            ("b", "we\"ird\\lease\u{1}é", u64::MAX),
        ] {
            let expected = serde_json::to_vec(&crate::model::HeartbeatResponse {
                node_id: id.to_owned(),
                lease_id: lease.to_owned(),
                expires_at_ms: exp,
            })
            .unwrap();
            assert_eq!(heartbeat_reply(id, lease, exp), expected, "{lease:?}");
        }
    }
}
