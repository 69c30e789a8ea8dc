//! [`Record`]: a node as `{prefix}:records` stores it, read without copying.

use super::scripts::{LEASE_LEN_DIGITS, TIME_DIGITS};
use crate::model::{Node, Status};
use crate::store::json::{is_json_object, ListWriter, ListedMillis};

/// A node's record as `{prefix}:records` holds it (see the [module docs](self)),
/// borrowed from the stored bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Record<'a> {
    pub(super) expires_at_ms: u64,
    /// `expires_at_ms` as stored, and the other two times: a listing copies them.
    pub(super) expires_at: StoredMillis<'a>,
    pub(super) last_seen: StoredMillis<'a>,
    pub(super) online_since: StoredMillis<'a>,
    pub(super) lease: &'a [u8],
    /// From the mark after the lease: `d` degraded, `r` draining, none `up`.
    pub(super) status: Status,
    /// The meta as stored: JSON text, empty for none.
    pub(super) meta: &'a [u8],
}

impl<'a> Record<'a> {
    /// Parses `<expires_at><last_seen><online_since><lease length><lease>[status
    /// mark]<meta>` (fixed-width decimal numbers; the mark is `d` or `r`, absent for
    /// `up`, so that the records of `up` nodes are those of a server older than
    /// statuses); `None` if it is not that.
    pub(super) fn parse(rec: &'a [u8]) -> Option<Record<'a>> {
        let time = |at: usize| StoredMillis::new(rec.get(at..at + TIME_DIGITS)?);
        let t = TIME_DIGITS;
        let expires_at = time(0)?;
        let last_seen = time(t)?;
        let online_since = time(2 * t)?;
        let lease_len = parse_u64(rec.get(3 * t..3 * t + LEASE_LEN_DIGITS)?)?;
        let lease_len = usize::try_from(lease_len).ok()?;
        let rest = &rec[3 * t + LEASE_LEN_DIGITS..];
        if lease_len > rest.len() {
            return None;
        }
        let (lease, rest) = rest.split_at(lease_len);
        let (status, meta) = match rest.split_first() {
            Some((b'd', meta)) => (Status::Degraded, meta),
            Some((b'r', meta)) => (Status::Draining, meta),
            _ => (Status::Up, rest),
        };
        Some(Record {
            expires_at_ms: expires_at.value(),
            expires_at,
            last_seen,
            online_since,
            lease,
            status,
            meta,
        })
    }

    /// The stored meta if it is a JSON object; `None` for none (listed as `{}`). A
    /// meta that is not a JSON object is logged and listed as `{}`.
    pub(super) fn meta_json(&self, node_id: &str) -> Option<&'a [u8]> {
        match self.meta {
            b"" => None,
            json if is_json_object(json) => Some(json),
            _ => {
                tracing::warn!(
                    node_id,
                    "stored meta is not a JSON object; listing it as {{}}"
                );
                None
            }
        }
    }

    /// Writes the record as node `id` of a listing, with `meta` (its
    /// [`meta_json`](Self::meta_json)).
    pub(super) fn push_to(&self, list: &mut ListWriter, id: &str, meta: Option<&[u8]>) {
        list.push(
            id,
            self.status,
            meta,
            self.online_since,
            self.last_seen,
            self.expires_at,
        );
    }

    /// When the node's session began (epoch ms).
    pub(super) fn online_since_ms(&self) -> u64 {
        self.online_since.value()
    }

    /// When the node was last heard of (epoch ms).
    pub(super) fn last_seen_ms(&self) -> u64 {
        self.last_seen.value()
    }
}

/// Decimal digits only (at least one), no sign, no overflow.
pub(super) fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
            .flatten()
    })
}

/// A time as a Redis record stores it: zero-padded decimal digits, checked when
/// the record is read. A listing copies the digits without their leading zeros
/// instead of parsing them into a `u64` and formatting that again, which was
/// about a sixth of the server's time in a Redis listing (`perf`; README, Performance).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct StoredMillis<'a>(&'a [u8]);

impl<'a> StoredMillis<'a> {
    /// `digits` if they are decimal digits only, one to 19 of them (so that the
    /// value fits a `u64`).
    pub(super) fn new(digits: &'a [u8]) -> Option<StoredMillis<'a>> {
        // `fold`, not `all`: no early exit, so the check compiles to a few wide
        // compares instead of a byte loop.
        let digits_only = digits.iter().fold(true, |ok, b| ok & b.is_ascii_digit());
        (digits_only && (1..=19).contains(&digits.len())).then_some(StoredMillis(digits))
    }

    /// The value.
    pub(super) fn value(self) -> u64 {
        // Checked digits, at most 19 of them: `parse_u64` cannot fail here.
        parse_u64(self.0).unwrap_or(0)
    }
}

impl ListedMillis for StoredMillis<'_> {
    fn write_to(self, buf: &mut Vec<u8>) {
        let digits = self.0;
        let zeros = digits
            .iter()
            .take_while(|&&d| d == b'0')
            .count()
            .min(digits.len() - 1);
        buf.extend_from_slice(&digits[zeros..]);
    }
}

/// A [`Node`] from its record (the meta decoded; one that is not a JSON object is
/// `{}`, as in [`Store::list_json`]).
pub(super) fn to_node(id: &str, rec: &Record<'_>) -> Node {
    let meta = rec
        .meta_json(id)
        .and_then(|json| serde_json::from_slice(json).ok())
        .unwrap_or_default();
    Node {
        node_id: id.to_owned(),
        status: rec.status,
        meta,
        online_since_ms: rec.online_since_ms(),
        last_seen_ms: rec.last_seen_ms(),
        expires_at_ms: rec.expires_at_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::super::scripts::lease_header;
    use super::*;

    /// A record as the scripts write it.
    fn record(exp: u64, seen: u64, since: u64, lease: &str, meta: &str) -> Vec<u8> {
        format!(
            "{exp:015}{seen:015}{since:015}{}{meta}",
            lease_header(lease)
        )
        .into_bytes()
    }

    #[test]
    fn records_parse() {
        let rec = record(333, 22, 1, "abcd", r#"{"x":1}"#);
        assert_eq!(
            String::from_utf8_lossy(&rec),
            r#"00000000000033300000000000002200000000000000100004abcd{"x":1}"#
        );
        assert_eq!(
            Record::parse(&rec),
            Some(Record {
                expires_at_ms: 333,
                expires_at: StoredMillis::new(b"000000000000333").unwrap(),
                last_seen: StoredMillis::new(b"000000000000022").unwrap(),
                online_since: StoredMillis::new(b"000000000000001").unwrap(),
                lease: b"abcd",
                status: Status::Up,
                meta: br#"{"x":1}"#,
            })
        );
        for (mark, status) in [("d", Status::Degraded), ("r", Status::Draining)] {
            let marked = record(3, 2, 1, &format!("ab{mark}"), r#"{"x":1}"#);
            // The mark follows a lease of two: a header of 3 would hold it.
            let marked = String::from_utf8(marked)
                .unwrap()
                .replace("00003ab", "00002ab");
            let rec = Record::parse(marked.as_bytes()).expect("parses");
            assert_eq!(
                (rec.lease, rec.status, rec.meta),
                (&b"ab"[..], status, &br#"{"x":1}"#[..])
            );
        }
        let no_meta = record(3, 2, 1, "", "");
        assert_eq!(
            Record::parse(&no_meta).map(|r| (r.lease, r.meta)),
            Some((&b""[..], &b""[..]))
        );
        let short_lease = b"00000000000033300000000000002200000000000000100005abcd";
        let not_digits = b"00000000000033300000000000002200000000000000x00004abcd";
        for bad in [&b""[..], b"garbage", &rec[..49], short_lease, not_digits] {
            assert_eq!(
                Record::parse(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn to_node_decodes_meta() {
        let rec = record(11, 2, 1, "l", r#"{"x":1}"#);
        let n = to_node("a", &Record::parse(&rec).expect("parses"));
        assert_eq!((n.meta["x"].clone(), n.expires_at_ms), (1.into(), 11));
        let bad_meta = record(11, 2, 1, "l", "[");
        assert_eq!(
            to_node("a", &Record::parse(&bad_meta).expect("parses"))
                .meta
                .len(),
            0
        );
        let no_meta = record(11, 2, 1, "l", "");
        assert_eq!(
            to_node("a", &Record::parse(&no_meta).expect("parses"))
                .meta
                .len(),
            0
        );
    }

    proptest::proptest! {
        #[test]
        fn stored_times_are_written_as_their_numbers(n in proptest::prelude::any::<u64>(), width in 1usize..=19) {
            let padded = format!("{n:0width$}");
            let stored = StoredMillis::new(padded.as_bytes());
            if padded.len() > 19 {
                proptest::prop_assert_eq!(stored, None);
            } else {
                let stored = stored.expect("digits");
                proptest::prop_assert_eq!(stored.value(), n);
                let mut buf = Vec::new();
                stored.write_to(&mut buf);
                proptest::prop_assert_eq!(buf, n.to_string().into_bytes());
            }
        }
    }

    #[test]
    fn stored_times_are_digits_only() {
        for bad in [&b""[..], b"12a", b"-1", b" 1", b"00000000000000000001"] {
            assert_eq!(StoredMillis::new(bad), None, "{bad:?}");
        }
        let mut buf = Vec::new();
        StoredMillis::new(b"000000000000000")
            .expect("digits")
            .write_to(&mut buf);
        assert_eq!(buf, b"0");
    }
}
