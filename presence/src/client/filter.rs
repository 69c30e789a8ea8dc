//! [`Filter`]: which nodes a [watch feed](super::watch) or a listing
//! ([`PresenceClient::list_nodes_with`](super::PresenceClient::list_nodes_with),
//! [`PresenceClient::pages`](super::PresenceClient::pages)) is about, rendered as the
//! query string the server reads.
//!
//! ```
//! use presence::client::Filter;
//!
//! let filter = Filter::all()
//!     .prefix("eu-west/")
//!     .status(["up", "degraded"])
//!     .meta("role", "edge cache");
//! assert_eq!(
//!     filter.query_string(),
//!     "prefix=eu-west%2F&status=up,degraded&meta.role=edge%20cache"
//! );
//! assert_eq!(Filter::all().query_string(), "");
//! ```
//!
//! The parameters: `prefix=<p>` (node ids starting with `p`), `status=<s>,<s>...`
//! (nodes whose status is one of the list) and `meta.<key>=<value>` (repeatable:
//! nodes whose meta has every such key with that value). Keys and values are
//! percent-encoded (everything but `A-Z a-z 0-9 - . _ ~`), so any string can be
//! given; the commas between statuses are the list's separators and stay as they are.

use std::fmt;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything but the unreserved characters of RFC 3986.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Which nodes to watch or list; [`Filter::all`] (the default) is every node.
///
/// Builder-style: each method returns the filter. A filter is sent as query
/// parameters (see [`query_string`](Self::query_string)); it is kept apart from the
/// watch call so listing can take the same value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    prefix: Option<String>,
    status: Vec<String>,
    meta: Vec<(String, String)>,
}

impl Filter {
    /// Every node (no parameter at all).
    pub fn all() -> Filter {
        Filter::default()
    }

    /// Only nodes whose id starts with `prefix` (replaces an earlier prefix; an empty
    /// prefix is no filter).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Filter {
        let prefix = prefix.into();
        self.prefix = (!prefix.is_empty()).then_some(prefix);
        self
    }

    /// Only nodes whose status is one of `statuses` (e.g. `["up", "degraded"]`;
    /// replaces an earlier list; an empty list is no filter). Empty strings are
    /// dropped.
    pub fn status<I, S>(mut self, statuses: I) -> Filter
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.status = statuses
            .into_iter()
            .map(Into::into)
            .filter(|s| !s.is_empty())
            .collect();
        self
    }

    /// Only nodes whose meta has `key` equal to `value` (as the server compares
    /// them); repeatable, every pair must match.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Filter {
        self.meta.push((key.into(), value.into()));
        self
    }

    /// `true` for the filter that selects every node.
    pub fn is_all(&self) -> bool {
        self.prefix.is_none() && self.status.is_empty() && self.meta.is_empty()
    }

    /// The prefix, if any.
    pub fn prefix_value(&self) -> Option<&str> {
        self.prefix.as_deref()
    }

    /// The statuses, in the order given.
    pub fn statuses(&self) -> &[String] {
        &self.status
    }

    /// The meta pairs, in the order given.
    pub fn meta_pairs(&self) -> &[(String, String)] {
        &self.meta
    }

    /// The query string, without the leading `?` (empty for [`all`](Self::all)):
    /// `prefix`, then `status`, then the `meta.<key>` pairs in the order given.
    pub fn query_string(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        if let Some(prefix) = &self.prefix {
            parts.push(format!("prefix={}", encode(prefix)));
        }
        if !self.status.is_empty() {
            let list: Vec<String> = self.status.iter().map(|s| encode(s)).collect();
            parts.push(format!("status={}", list.join(",")));
        }
        for (key, value) in &self.meta {
            parts.push(format!("meta.{}={}", encode(key), encode(value)));
        }
        parts.join("&")
    }

    /// `path` with the query string appended (`?` only when there is one).
    pub(crate) fn apply_to(&self, path: &str) -> String {
        let query = self.query_string();
        if query.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{query}")
        }
    }
}

impl fmt::Display for Filter {
    /// The query string, as [`query_string`](Self::query_string).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.query_string())
    }
}

pub(crate) fn encode(s: &str) -> String {
    utf8_percent_encode(s, QUERY_VALUE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_encodes_every_parameter() {
        let f = Filter::all()
            .prefix("a b&c=d")
            .status(["up", "", "de,graded"])
            .meta("zone", "eu/1")
            .meta("k&y", "ü");
        assert_eq!(
            f.query_string(),
            "prefix=a%20b%26c%3Dd&status=up,de%2Cgraded&meta.zone=eu%2F1&meta.k%26y=%C3%BC"
        );
        assert_eq!(f.apply_to("/watch"), format!("/watch?{f}"));
        assert!(!f.is_all());
    }

    #[test]
    fn all_is_empty_and_default() {
        assert_eq!(Filter::default(), Filter::all());
        assert!(Filter::all()
            .prefix("")
            .status(Vec::<String>::new())
            .is_all());
        assert_eq!(Filter::all().apply_to("/watch"), "/watch");
        assert_eq!(
            Filter::all().prefix("x").prefix("y-1.z_~").query_string(),
            "prefix=y-1.z_~"
        );
    }
}
