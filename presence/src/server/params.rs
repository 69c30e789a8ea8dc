//! The query parameters of `GET /presence` and `GET /presence/watch`: which nodes
//! (`prefix`, `status`, `meta.<key>`) and, for the listing, which page (`limit`,
//! `after`), read into a [`Query`].
//!
//! Keys and values are percent-decoded as forms encode them (`+` is a space).
//! Parameters this server does not know are ignored (forward compatibility, and
//! `since` belongs to the watch's cursor); a known one that is malformed is a
//! `400 bad_request` naming it, never a silent "no filter": a client that asked for
//! a filter must not get the whole deployment by mistake.

use std::borrow::Cow;

use super::errors::ApiError;
use crate::model::Status;
use crate::store::query::{Filter, Query, MAX_PAGE};

/// Where the parameters come from: paging is for the listing only (a watch streams
/// every change, it has no pages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// `GET /presence`: filters and paging.
    List,
    /// `GET /presence/watch`: filters only (`limit`, `after` are a `400`).
    Watch,
}

/// A listing or watch request that names at least one known parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Params {
    /// What to ask the store.
    pub(crate) query: Query,
    /// The filter parameters re-encoded (`prefix=..&status=..&meta.k=..`, possibly
    /// empty): the start of the `Link` of the next page.
    filter_params: String,
}

impl Params {
    /// The `Link` header value of the page after one that ended at `next_after`:
    /// the same filter and page size from `next_after` on, relative to `path`.
    pub(crate) fn next_link(&self, path: &str, next_after: &str) -> String {
        let mut target = format!("{path}?{}", self.filter_params);
        if !self.filter_params.is_empty() {
            target.push('&');
        }
        // A paged query always has a limit; the store only pages when it does.
        let limit = self.query.limit_value().unwrap_or(MAX_PAGE);
        target.push_str(&format!("limit={limit}&after={}", encode(next_after)));
        format!("<{target}>; rel=\"next\"")
    }
}

/// The parameters as they are read, before they make a [`Query`].
#[derive(Default)]
struct Raw {
    prefix: Option<String>,
    statuses: Option<Vec<Status>>,
    meta: Vec<(String, String)>,
    limit: Option<usize>,
    after: Option<String>,
}

/// Reads the query string `query` of a `route` request: `Ok(None)` when it names no
/// known parameter (the plain listing or watch, kept on its own fast path).
///
/// # Errors
/// `400 bad_request` naming the first malformed parameter.
pub(crate) fn parse(query: Option<&str>, route: Route) -> Result<Option<Params>, ApiError> {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Ok(None);
    };
    let mut raw = Raw::default();
    let mut known = false;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        known |= read_pair(&mut raw, &key, value, route)?;
    }
    if !known {
        return Ok(None);
    }
    Ok(Some(raw.into_params()))
}

/// Reads one `key=value` into `raw`; `Ok(false)` for a key this server does not know.
fn read_pair(
    raw: &mut Raw,
    key: &str,
    value: Cow<'_, str>,
    route: Route,
) -> Result<bool, ApiError> {
    if let Some(meta_key) = key.strip_prefix("meta.") {
        if meta_key.is_empty() {
            return Err(bad("meta.", "needs a key: meta.<key>=<value>"));
        }
        raw.meta.push((meta_key.to_owned(), value.into_owned()));
        return Ok(true);
    }
    match key {
        "prefix" => {
            let prefix = non_empty("prefix", value)?;
            once(&mut raw.prefix, "prefix", prefix)?;
        }
        "status" => {
            let statuses = parse_statuses(&value)?;
            once(&mut raw.statuses, "status", statuses)?;
        }
        "limit" | "after" if route == Route::Watch => {
            return Err(bad(key, "is for listings only; a watch has no pages"));
        }
        "limit" => {
            let limit = parse_limit(&value)?;
            once(&mut raw.limit, "limit", limit)?;
        }
        "after" => {
            let after = non_empty("after", value)?;
            once(&mut raw.after, "after", after)?;
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Sets `slot` unless the parameter was given already.
fn once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), ApiError> {
    if slot.is_some() {
        return Err(bad(name, "may be given only once"));
    }
    *slot = Some(value);
    Ok(())
}

/// `value`, unless it is empty (a `400` naming `name`).
fn non_empty(name: &str, value: Cow<'_, str>) -> Result<String, ApiError> {
    if value.is_empty() {
        return Err(bad(name, "must not be empty"));
    }
    Ok(value.into_owned())
}

/// `up,degraded`: a comma list of statuses, any of which matches.
fn parse_statuses(value: &str) -> Result<Vec<Status>, ApiError> {
    if value.is_empty() {
        return Err(bad(
            "status",
            "must list at least one of up, degraded, draining",
        ));
    }
    value
        .split(',')
        .map(|s| {
            s.parse::<Status>()
                .map_err(|e| ApiError::BadRequest(format!("query parameter `status`: {e}")))
        })
        .collect()
}

/// `1..=10000`, in plain decimal digits.
fn parse_limit(value: &str) -> Result<usize, ApiError> {
    let limit = value
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| value.parse::<usize>().ok())
        .flatten()
        .filter(|n| (1..=MAX_PAGE).contains(n));
    limit.ok_or_else(|| {
        bad(
            "limit",
            &format!(
                "must be an integer from 1 to {MAX_PAGE}, not {:?}",
                value.chars().take(32).collect::<String>()
            ),
        )
    })
}

/// The `400` for parameter `name`: "query parameter `name` <why>".
fn bad(name: &str, why: &str) -> ApiError {
    ApiError::BadRequest(format!("query parameter `{name}` {why}"))
}

impl Raw {
    /// The query, and the filter re-encoded for the `Link` of the next page.
    fn into_params(self) -> Params {
        let mut filter = Filter::default();
        let mut filter_params = Vec::new();
        if let Some(prefix) = self.prefix {
            filter_params.push(format!("prefix={}", encode(&prefix)));
            filter = filter.prefix(prefix);
        }
        if let Some(statuses) = self.statuses {
            let names: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
            // Status names need no encoding, and a bare comma reads better than %2C.
            filter_params.push(format!("status={}", names.join(",")));
            filter = filter.statuses(statuses);
        }
        for (key, value) in self.meta {
            filter_params.push(format!("meta.{}={}", encode(&key), encode(&value)));
            filter = filter.meta(key, value);
        }
        let mut query = Query::new(filter);
        if let Some(after) = self.after {
            query = query.after(after);
        }
        if let Some(limit) = self.limit {
            query = query.limit(limit);
        }
        Params {
            query,
            filter_params: filter_params.join("&"),
        }
    }
}

/// `s` percent-encoded for a query string, as [`parse`] decodes it.
fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(q: &str) -> Result<Option<Params>, ApiError> {
        parse(Some(q), Route::List)
    }

    fn message(e: ApiError) -> String {
        match e {
            ApiError::BadRequest(m) => m,
            other => panic!("not a 400: {other:?}"),
        }
    }

    #[test]
    fn no_known_parameter_is_the_plain_listing() {
        assert_eq!(parse(None, Route::List), Ok(None));
        assert_eq!(list(""), Ok(None));
        assert_eq!(list("x=1&since=abc&metax=2"), Ok(None));
    }

    #[test]
    fn parameters_make_the_query_and_the_link() {
        let p =
            list("prefix=eu%2D&status=up,degraded&meta.region=eu+west&meta.gpu=true&limit=2&x=1")
                .expect("valid")
                .expect("known");
        let expected = Query::new(
            Filter::default()
                .prefix("eu-")
                .statuses([Status::Up, Status::Degraded])
                .meta("region", "eu west")
                .meta("gpu", "true"),
        )
        .limit(2);
        assert_eq!(p.query, expected);
        assert_eq!(
            p.next_link("/presence", "eu-1"),
            "</presence?prefix=eu-&status=up,degraded&meta.region=eu+west&meta.gpu=true&limit=2&after=eu-1>; rel=\"next\""
        );
        // The link reads back as the next page of the same query.
        let next = list(
            "prefix=eu-&status=up,degraded&meta.region=eu+west&meta.gpu=true&limit=2&after=eu-1",
        )
        .expect("valid")
        .expect("known");
        assert_eq!(next.query, expected.after("eu-1"));
    }

    #[test]
    fn a_page_without_filters_links_with_its_limit_only() {
        let p = list("limit=100").expect("valid").expect("known");
        assert_eq!(
            p.next_link("/presence", "a&b"),
            "</presence?limit=100&after=a%26b>; rel=\"next\""
        );
    }

    #[test]
    fn bad_parameters_are_400_naming_them() {
        for (q, name) in [
            ("limit=0", "`limit`"),
            ("limit=10001", "`limit`"),
            ("limit=x", "`limit`"),
            ("limit=-1", "`limit`"),
            ("limit=", "`limit`"),
            ("prefix=", "`prefix`"),
            ("status=down", "`status`"),
            ("status=", "`status`"),
            ("status=up,", "`status`"),
            ("meta.=x", "`meta.`"),
            ("after=", "`after`"),
            ("prefix=a&prefix=b", "`prefix`"),
            ("status=up&status=up", "`status`"),
            ("limit=1&limit=2", "`limit`"),
            ("after=a&after=b", "`after`"),
        ] {
            let m = message(list(q).expect_err(q));
            assert!(m.contains(name), "{q}: {m}");
        }
        let m = message(list("status=sleeping").expect_err("unknown"));
        assert!(m.contains("sleeping"), "{m}");
    }

    #[test]
    fn a_watch_takes_filters_but_no_pages() {
        let p = parse(Some("status=draining&since=abc"), Route::Watch)
            .expect("valid")
            .expect("known");
        assert_eq!(
            p.query,
            Query::new(Filter::default().statuses([Status::Draining]))
        );
        for q in ["limit=5", "after=a"] {
            assert!(parse(Some(q), Route::Watch).is_err(), "{q}");
        }
    }

    #[test]
    fn repeated_meta_keys_are_anded() {
        let p = list("meta.a=1&meta.a=2").expect("valid").expect("known");
        assert_eq!(p.query.filter().meta_pairs().len(), 2);
    }
}
