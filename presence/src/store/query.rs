//! [`Query`]: which online nodes a listing (or a watch) is about, and which page of
//! them; [`Filter::matches`] is the one definition of a match both stores use.
//!
//! ```
//! use presence::model::Status;
//! use presence::store::query::{Filter, Query};
//!
//! let filter = Filter::default()
//!     .prefix("eu-")
//!     .statuses([Status::Up, Status::Degraded])
//!     .meta("region", "eu")
//!     .meta("gpu", "true");
//! assert!(filter.matches("eu-1", Status::Up, Some(br#"{"region":"eu","gpu":true}"#)));
//! // A number or boolean matches its JSON text; a string matches itself, unquoted.
//! assert!(!filter.matches("eu-1", Status::Up, Some(br#"{"region":"eu","gpu":"yes"}"#)));
//! assert!(!filter.matches("us-1", Status::Up, Some(br#"{"region":"eu","gpu":true}"#)));
//! assert!(!filter.matches("eu-1", Status::Draining, Some(br#"{"region":"eu","gpu":true}"#)));
//!
//! let page = Query::new(filter).after("eu-1").limit(100);
//! assert_eq!(page.limit_value(), Some(100));
//! ```
//!
//! # Matching
//! The filters are ANDed:
//! - `prefix`: the node id starts with it;
//! - `statuses`: the node's status is one of them;
//! - `meta(key, value)`, repeatable: the node's meta has the top-level `key`, and its
//!   value is the JSON string `value`, or a number or boolean whose JSON text (as
//!   stored: the meta is kept as the JSON the node sent, re-serialized compactly) is
//!   `value`. `null`, arrays and objects match nothing.
//!
//! # Labels: the index of meta values
//! Both stores keep an index of every node's *labels*: each top-level meta key whose
//! value is a string or a boolean, with that value ([`labels_of`]). A `meta` pair
//! whose value is not the JSON text of a number selects exactly the nodes that carry
//! its label ([`Filter::label`]), so a store reads only those nodes instead of
//! every record. Numbers are not labels: they are what changes on every heartbeat
//! (load, queue depth), and indexing them would rewrite the index each time; a
//! filter on a number reads every record, as does one on a value with a control
//! character `\0` or `\x01`, or a key and value longer than [`MAX_LABEL`] bytes.

use std::collections::HashMap;

use memchr::memmem::Finder;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::model::{Meta, Status};

/// Largest page a [`Query`] may ask for (`limit=1..10000`).
pub const MAX_PAGE: usize = 10_000;

/// Longest label (key, a NUL byte, value) the index keeps, in bytes.
pub const MAX_LABEL: usize = 256;

/// The label of a top-level meta `key` with the string (or boolean text) `value`:
/// `key`, a NUL byte, `value`; `None` if it is too long for the index or contains
/// `\0` or `\x01` (the index's separators).
pub fn label(key: &str, value: &str) -> Option<String> {
    let fits = key.len() + 1 + value.len() <= MAX_LABEL;
    let plain = |s: &str| !s.bytes().any(|b| b <= 1);
    (fits && plain(key) && plain(value)).then(|| format!("{key}\0{value}"))
}

/// A meta's labels (see the [module docs](self#labels-the-index-of-meta-values)),
/// sorted and without repeats.
///
/// ```
/// let meta = serde_json::json!({"region": "eu", "gpu": true, "load": 0.5, "tags": ["a"]});
/// let meta = meta.as_object().cloned().unwrap_or_default();
/// assert_eq!(presence::store::query::labels_of(&meta), ["gpu\0true", "region\0eu"]);
/// ```
pub fn labels_of(meta: &Meta) -> Vec<String> {
    let mut labels: Vec<String> = meta
        .iter()
        .filter_map(|(key, value)| match value {
            serde_json::Value::String(s) => label(key, s),
            serde_json::Value::Bool(b) => label(key, if *b { "true" } else { "false" }),
            _ => None,
        })
        .collect();
    labels.sort_unstable();
    labels.dedup();
    labels
}

/// Which nodes: see the [module docs](self). The default selects every node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    prefix: Option<String>,
    /// Bit `s.index()` set: status `s` is selected; 0 selects every status.
    statuses: u8,
    meta: Vec<(String, String)>,
    /// What the stored meta contains for each meta pair to match (see
    /// [`Filter::meta_needles`]).
    needles: Vec<MetaNeedle>,
}

impl Filter {
    /// Only nodes whose id starts with `prefix` (an empty prefix is no filter).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Filter {
        let prefix = prefix.into();
        self.prefix = (!prefix.is_empty()).then_some(prefix);
        self
    }

    /// Only nodes whose status is one of `statuses` (replaces an earlier list; an
    /// empty list is no filter).
    pub fn statuses(mut self, statuses: impl IntoIterator<Item = Status>) -> Filter {
        self.statuses = statuses
            .into_iter()
            .fold(0, |mask, s| mask | (1 << s.index()));
        self
    }

    /// Only nodes whose meta has `key` with `value` (see the [module docs](self));
    /// repeatable, every pair must match.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Filter {
        let (key, value) = (key.into(), value.into());
        self.needles.push(MetaNeedle::new(&key, &value));
        self.meta.push((key, value));
        self
    }

    /// `true` for the filter that selects every node.
    pub fn is_all(&self) -> bool {
        self.prefix.is_none() && self.statuses == 0 && self.meta.is_empty()
    }

    /// The prefix, if any.
    pub fn prefix_value(&self) -> Option<&str> {
        self.prefix.as_deref()
    }

    /// Whether `status` is selected.
    pub fn selects_status(&self, status: Status) -> bool {
        self.statuses == 0 || self.statuses & (1 << status.index()) != 0
    }

    /// The statuses selected, in [`Status::ALL`] order (all three when there is no
    /// status filter).
    pub fn selected_statuses(&self) -> impl Iterator<Item = Status> + '_ {
        Status::ALL.into_iter().filter(|&s| self.selects_status(s))
    }

    /// Whether the filter has a status part.
    pub fn has_status_filter(&self) -> bool {
        self.statuses != 0
    }

    /// The meta pairs, in the order given.
    pub fn meta_pairs(&self) -> &[(String, String)] {
        &self.meta
    }

    /// For each meta pair, the text the stored meta (compact JSON) contains when it
    /// matches. A store may skip a record that lacks one without decoding its meta
    /// (a necessary condition, not a sufficient one: confirm with
    /// [`matches`](Self::matches)).
    pub fn meta_needles(&self) -> &[MetaNeedle] {
        &self.needles
    }

    /// The label of the first meta pair the label index can answer exactly (see the
    /// [module docs](self#labels-the-index-of-meta-values)): every node that
    /// matches the filter carries it. `None` when no pair can be looked up (no meta
    /// pair, or only numbers).
    pub fn label(&self) -> Option<String> {
        self.meta.iter().find_map(|(key, value)| {
            let number =
                serde_json::from_str::<serde_json::Value>(value).is_ok_and(|v| v.is_number());
            if number {
                None
            } else {
                label(key, value)
            }
        })
    }

    /// Whether a node matches: its id, status and stored meta (JSON text; `None` for
    /// `{}`).
    pub fn matches(&self, node_id: &str, status: Status, meta: Option<&[u8]>) -> bool {
        if self
            .prefix
            .as_deref()
            .is_some_and(|p| !node_id.starts_with(p))
        {
            return false;
        }
        if !self.selects_status(status) {
            return false;
        }
        if self.meta.is_empty() {
            return true;
        }
        let Some(meta) = meta else {
            return false;
        };
        // Cheap rejection first: most records of a selective filter fail here,
        // without their meta being decoded.
        if !self.needles.iter().all(|n| n.found_in(meta)) {
            return false;
        }
        let Ok(fields) = serde_json::from_slice::<TopLevel<'_>>(meta) else {
            return false;
        };
        self.meta.iter().all(|(key, want)| {
            fields
                .0
                .get(key)
                .is_some_and(|raw| value_matches(raw.get(), want))
        })
    }
}

/// A meta's top-level fields, each value as its JSON text.
#[derive(Deserialize)]
struct TopLevel<'a>(#[serde(borrow)] HashMap<String, &'a RawValue>);

fn value_matches(raw: &str, want: &str) -> bool {
    match raw.as_bytes().first() {
        Some(b'"') => {
            serde_json::from_str::<std::borrow::Cow<'_, str>>(raw).is_ok_and(|s| s == want)
        }
        Some(b't' | b'f' | b'-' | b'0'..=b'9') => raw == want,
        _ => false,
    }
}

/// What a stored meta (compact JSON, as `serde_json` writes it) must contain for
/// one `meta.<key>=<value>` pair to match: `"key":"value"` (the value as a JSON
/// string, escaped as `serde_json` escapes it), or, when the value is the JSON text
/// of a number or boolean, `"key":value`. A nested object can contain the same text,
/// and `"key":0.5` is in `"key":0.55`: a hit still needs
/// [`Filter::matches`].
#[derive(Clone, Debug)]
pub struct MetaNeedle {
    string: String,
    literal: Option<String>,
    /// Searchers for the two texts, built once: a filtered listing searches every
    /// record's meta, and building a searcher costs more than most searches.
    finders: [Option<Finder<'static>>; 2],
}

impl PartialEq for MetaNeedle {
    fn eq(&self, other: &MetaNeedle) -> bool {
        (&self.string, &self.literal) == (&other.string, &other.literal)
    }
}

impl Eq for MetaNeedle {}

impl MetaNeedle {
    fn new(key: &str, value: &str) -> MetaNeedle {
        // Serializing a `str` cannot fail.
        let key = serde_json::to_string(key).unwrap_or_default();
        let string = format!("{key}:{}", serde_json::to_string(value).unwrap_or_default());
        let literal = serde_json::from_str::<serde_json::Value>(value)
            .ok()
            .filter(|v| v.is_number() || v.is_boolean())
            .map(|_| format!("{key}:{value}"));
        let finders = [
            Some(Finder::new(string.as_bytes()).into_owned()),
            literal
                .as_deref()
                .map(|l| Finder::new(l.as_bytes()).into_owned()),
        ];
        MetaNeedle {
            string,
            literal,
            finders,
        }
    }

    /// The text a string value leaves in the meta: `"key":"value"`.
    pub fn string_text(&self) -> &str {
        &self.string
    }

    /// The text a number or boolean value leaves: `"key":value`, if the value is
    /// the JSON text of one.
    pub fn literal_text(&self) -> Option<&str> {
        self.literal.as_deref()
    }

    /// Whether `meta` contains either text.
    pub fn found_in(&self, meta: &[u8]) -> bool {
        self.finders
            .iter()
            .flatten()
            .any(|f| f.find(meta).is_some())
    }
}

/// A listing request: a [`Filter`], and optionally a page of it: the first `limit`
/// matching nodes after `after` (exclusive) in `node_id` order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    filter: Filter,
    after: Option<String>,
    limit: Option<usize>,
}

impl Query {
    /// Every node `filter` selects, unpaged.
    pub fn new(filter: Filter) -> Query {
        Query {
            filter,
            after: None,
            limit: None,
        }
    }

    /// Only nodes whose id sorts after `node_id` (exclusive).
    pub fn after(mut self, node_id: impl Into<String>) -> Query {
        self.after = Some(node_id.into());
        self
    }

    /// At most `limit` nodes (clamped to `1..=`[`MAX_PAGE`]).
    pub fn limit(mut self, limit: usize) -> Query {
        self.limit = Some(limit.clamp(1, MAX_PAGE));
        self
    }

    /// The filter.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// The exclusive lower bound, if any.
    pub fn after_value(&self) -> Option<&str> {
        self.after.as_deref()
    }

    /// The page size, if paged.
    pub fn limit_value(&self) -> Option<usize> {
        self.limit
    }

    /// `true` when this is the plain `GET /presence`: every node, unpaged.
    pub fn is_everything(&self) -> bool {
        self.filter.is_all() && self.after.is_none() && self.limit.is_none()
    }

    /// Whether a node id is past the lower bound and has the prefix (what an index in
    /// `node_id` order can decide alone).
    pub fn in_range(&self, node_id: &str) -> bool {
        self.after.as_deref().is_none_or(|a| node_id > a)
            && self
                .filter
                .prefix
                .as_deref()
                .is_none_or(|p| node_id.starts_with(p))
    }

    /// Where a scan in `node_id` order starts: the later of `after` (exclusive) and
    /// the prefix (inclusive). `(id, inclusive)`; `None` from the start.
    pub fn scan_start(&self) -> Option<(&str, bool)> {
        match (self.after.as_deref(), self.filter.prefix.as_deref()) {
            (None, None) => None,
            (Some(a), None) => Some((a, false)),
            (None, Some(p)) => Some((p, true)),
            (Some(a), Some(p)) if a >= p => Some((a, false)),
            (Some(_), Some(p)) => Some((p, true)),
        }
    }

    /// Whether a scan in `node_id` order that has reached `node_id` is past every
    /// possible match (it left the prefix).
    pub fn scan_done(&self, node_id: &str) -> bool {
        self.filter
            .prefix
            .as_deref()
            .is_some_and(|p| !node_id.starts_with(p) && node_id > p)
    }
}

/// One page of a [`Query`]: what [`Store::query_json`](super::Store::query_json)
/// returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// The nodes, as the JSON array `GET /presence` answers with.
    pub json: super::NodeListJson,
    /// When more nodes match after this page: the last node id of the page (the
    /// next page's `after`).
    pub next_after: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn needles_reject_without_decoding_and_never_miss_a_match() {
        let f = Filter::default().meta("on", "true").meta("name", "a\"b");
        let [on, name] = f.meta_needles() else {
            panic!("two needles")
        };
        assert_eq!(on.string_text(), r#""on":"true""#);
        assert_eq!(on.literal_text(), Some(r#""on":true"#));
        assert_eq!(name.string_text(), r#""name":"a\"b""#);
        assert_eq!(name.literal_text(), None);
        // Both forms of `true` match; the needle only pre-selects.
        for meta in [
            r#"{"on":true,"name":"a\"b"}"#,
            r#"{"name":"a\"b","on":"true"}"#,
        ] {
            assert!(f.matches("n", Status::Up, Some(meta.as_bytes())), "{meta}");
        }
        for meta in [
            r#"{"on":false,"name":"a\"b"}"#,
            r#"{"on":true,"name":"a\"bc"}"#,
            r#"{"x":{"on":true,"name":"a\"b"}}"#,
        ] {
            assert!(!f.matches("n", Status::Up, Some(meta.as_bytes())), "{meta}");
        }
        let n = Filter::default().meta("load", "0.5");
        assert!(n.matches("n", Status::Up, Some(br#"{"load":0.5}"#)));
        assert!(!n.matches("n", Status::Up, Some(br#"{"load":0.55}"#)));
        assert!(n.matches("n", Status::Up, Some(br#"{"load":"0.5"}"#)));
    }

    #[test]
    fn a_filter_label_is_one_only_when_it_is_exact() {
        assert_eq!(
            Filter::default().meta("region", "eu").label().as_deref(),
            Some("region\0eu")
        );
        // `true` matches the boolean and the string: both have that label.
        assert_eq!(
            Filter::default().meta("gpu", "true").label().as_deref(),
            Some("gpu\0true")
        );
        // A number is no label; the next pair is.
        let f = Filter::default().meta("load", "0.5").meta("zone", "a");
        assert_eq!(f.label().as_deref(), Some("zone\0a"));
        assert_eq!(Filter::default().meta("load", "5").label(), None);
        assert_eq!(Filter::default().meta("k", "a\u{1}b").label(), None);
        assert_eq!(
            Filter::default().meta("k", "v".repeat(MAX_LABEL)).label(),
            None
        );
        assert_eq!(Filter::default().prefix("a").label(), None);
    }

    proptest::proptest! {
        /// A meta pair with a label matches a node exactly when the node carries the
        /// label: the index never misses a match nor adds one.
        #[test]
        fn a_label_is_carried_exactly_by_the_matching_nodes(
            values in proptest::collection::vec(
                proptest::prop_oneof![
                    "[a-c\u{1}\u{0}\\\"é]{0,3}".prop_map(serde_json::Value::from),
                    proptest::bool::ANY.prop_map(serde_json::Value::from),
                    (-3i64..3).prop_map(serde_json::Value::from),
                    proptest::strategy::Just(serde_json::Value::Null),
                ],
                0..4,
            ),
            want in proptest::prop_oneof![
                "[a-c\u{1}\\\"é]{0,3}",
                proptest::strategy::Just("true".to_owned()),
                proptest::strategy::Just("false".to_owned()),
                proptest::strategy::Just("1".to_owned()),
            ],
        ) {
            let meta: Meta = values
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("k{}", i % 2), v))
                .collect();
            let json = serde_json::to_string(&meta).unwrap_or_default();
            let filter = Filter::default().meta("k0", want.clone());
            let matches = filter.matches("n", Status::Up, Some(json.as_bytes()));
            if let Some(label) = filter.label() {
                prop_assert_eq!(labels_of(&meta).contains(&label), matches, "{} {:?}", json, want);
            } else {
                prop_assert!(want == "1" || want.contains('\u{1}'), "{:?}", want);
            }
        }
    }
}
