//! The status page: `GET /ui` (the page), `GET /ui/app.js` and `GET /ui/style.css`
//! (its script and style), and `GET /` (a redirect to the page). The three files are
//! in `ui/` beside this module, compiled into the binary: no CDN, no build step, and
//! the page works offline.
//!
//! The page is served **without authentication**, like `/healthz`: it holds no data.
//! Everything it shows comes from the API (`/presence/stats`, `/presence/watch`),
//! which stays behind the bearer token; with auth on, the page asks for a token,
//! keeps it in the tab's session storage and sends it as `Authorization: Bearer` (a
//! token never travels in a URL). So a browser can always load the page that asks
//! for the token, and the token is checked where the data is.
//!
//! Caching: every answer carries an `ETag` (a hash of the file, computed at compile
//! time) and `Cache-Control: no-cache`, so a browser revalidates each load and gets
//! `304 Not Modified` while the file is unchanged, and the new file at once after an
//! upgrade (a page and a script from two versions never mix for long).
//!
//! Every answer also carries a strict `Content-Security-Policy`: scripts, styles and
//! connections from this origin only, no inline script or style, no plugins, no
//! framing. Node ids and meta are set as text by the script, never as HTML; the
//! policy is the second line of defence should that ever break.

use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG,
    IF_NONE_MATCH, LOCATION, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use http::{HeaderMap, StatusCode};

use super::routes::Endpoint;
use super::ResponseBody;

/// The policy of every page answer: nothing but this origin's script, style and
/// API; no inline script or style (`'unsafe-inline'` is absent), no `eval`.
pub(crate) const CONTENT_SECURITY_POLICY_VALUE: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One static file of the page.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    /// The file's `ETag`, a quoted hash of its bytes.
    etag: &'static str,
}

const PAGE: Asset = Asset {
    body: include_str!("ui/index.html"),
    content_type: "text/html; charset=utf-8",
    etag: ETAG_PAGE,
};
const SCRIPT: Asset = Asset {
    body: include_str!("ui/app.js"),
    content_type: "text/javascript; charset=utf-8",
    etag: ETAG_SCRIPT,
};
const STYLE: Asset = Asset {
    body: include_str!("ui/style.css"),
    content_type: "text/css; charset=utf-8",
    etag: ETAG_STYLE,
};

const ETAG_PAGE: &str = etag_str(&ETAG_PAGE_BYTES);
const ETAG_SCRIPT: &str = etag_str(&ETAG_SCRIPT_BYTES);
const ETAG_STYLE: &str = etag_str(&ETAG_STYLE_BYTES);
const ETAG_PAGE_BYTES: [u8; 18] = etag_bytes(include_str!("ui/index.html"));
const ETAG_SCRIPT_BYTES: [u8; 18] = etag_bytes(include_str!("ui/app.js"));
const ETAG_STYLE_BYTES: [u8; 18] = etag_bytes(include_str!("ui/style.css"));

/// FNV-1a, 64 bits: a change of any byte changes the tag (this is a cache
/// validator, not a defence against anyone).
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// `"<16 hex digits>"`, the quoted entity tag of `text`.
const fn etag_bytes(text: &str) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hash = fnv1a(text.as_bytes());
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[1 + i] = HEX[((hash >> (60 - 4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

/// The tag as text (it is ASCII by construction; an empty tag if it ever were not,
/// which only makes every request a full answer).
const fn etag_str(bytes: &'static [u8]) -> &'static str {
    match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(_) => "",
    }
}

/// `GET /`: the page, one redirect away. `Location` is relative (`ui`), so the
/// redirect also works behind a proxy that mounts the server under a path.
pub(crate) fn redirect() -> http::Response<ResponseBody> {
    let mut response = http::Response::new(ResponseBody::full(Bytes::new()));
    *response.status_mut() = StatusCode::FOUND;
    let headers = response.headers_mut();
    headers.insert(LOCATION, HeaderValue::from_static("ui"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /ui`, `/ui/app.js`, `/ui/style.css`: the file, or `304` when the request's
/// `If-None-Match` names its current tag. `None` for an endpoint that is no file.
pub(crate) fn asset(
    endpoint: Endpoint,
    request_headers: &HeaderMap,
) -> Option<http::Response<ResponseBody>> {
    let asset = match endpoint {
        Endpoint::Ui => &PAGE,
        Endpoint::UiScript => &SCRIPT,
        Endpoint::UiStyle => &STYLE,
        _ => return None,
    };
    let fresh = not_modified(request_headers, asset.etag);
    let body = if fresh {
        Bytes::new()
    } else {
        Bytes::from_static(asset.body.as_bytes())
    };
    let mut response = http::Response::new(ResponseBody::full(body));
    if fresh {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
    }
    let headers = response.headers_mut();
    if !fresh {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    }
    headers.insert(ETAG, HeaderValue::from_static(asset.etag));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY_VALUE),
    );
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    Some(response)
}

/// Whether `If-None-Match` matches `etag` (RFC 9110 13.1.2: `*`, or a list of
/// tags compared weakly, so `W/"x"` matches `"x"`).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(endpoint: Endpoint, if_none_match: Option<&str>) -> http::Response<ResponseBody> {
        let mut headers = HeaderMap::new();
        if let Some(tag) = if_none_match {
            headers.insert(
                IF_NONE_MATCH,
                HeaderValue::from_str(tag).unwrap_or_else(|e| panic!("{tag}: {e}")),
            );
        }
        asset(endpoint, &headers).unwrap_or_else(|| panic!("{endpoint:?} is a file"))
    }

    #[test]
    fn tags_are_quoted_hex_and_differ_per_file() {
        for tag in [ETAG_PAGE, ETAG_SCRIPT, ETAG_STYLE] {
            assert_eq!(tag.len(), 18, "{tag}");
            assert!(tag.starts_with('"') && tag.ends_with('"'), "{tag}");
            assert!(tag[1..17].bytes().all(|b| b.is_ascii_hexdigit()), "{tag}");
        }
        assert_ne!(ETAG_PAGE, ETAG_SCRIPT);
        assert_ne!(ETAG_SCRIPT, ETAG_STYLE);
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
    }

    #[test]
    fn files_have_their_type_a_tag_and_the_policy() {
        for (endpoint, content_type) in [
            (Endpoint::Ui, "text/html; charset=utf-8"),
            (Endpoint::UiScript, "text/javascript; charset=utf-8"),
            (Endpoint::UiStyle, "text/css; charset=utf-8"),
        ] {
            let res = get(endpoint, None);
            assert_eq!(res.status(), StatusCode::OK);
            let h = res.headers();
            assert_eq!(h[CONTENT_TYPE], content_type);
            assert_eq!(h[CACHE_CONTROL], "no-cache");
            assert_eq!(h[X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert!(h[CONTENT_SECURITY_POLICY]
                .to_str()
                .is_ok_and(|p| p.contains("script-src 'self'") && !p.contains("unsafe")));
            assert!(h.contains_key(ETAG));
        }
        assert!(asset(Endpoint::List, &HeaderMap::new()).is_none());
    }

    #[test]
    fn a_matching_if_none_match_is_304_without_a_body() {
        use http_body::Body as _;
        let tag = ETAG_SCRIPT;
        for header in [
            tag.to_owned(),
            format!("W/{tag}"),
            format!("\"other\", {tag}"),
            "*".to_owned(),
        ] {
            let res = get(Endpoint::UiScript, Some(&header));
            assert_eq!(res.status(), StatusCode::NOT_MODIFIED, "{header}");
            assert_eq!(res.headers()[ETAG], tag);
            assert_eq!(res.body().size_hint().exact(), Some(0));
        }
        let stale = get(Endpoint::UiScript, Some("\"0000000000000000\""));
        assert_eq!(stale.status(), StatusCode::OK);
        // The page's tag does not validate the script.
        assert_eq!(
            get(Endpoint::UiScript, Some(ETAG_PAGE)).status(),
            StatusCode::OK
        );
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_and_sets_text_only() {
        let page = PAGE.body;
        assert!(page.contains(r#"<script src="ui/app.js" defer></script>"#));
        assert_eq!(page.matches("<script").count(), 1, "one external script");
        assert!(!page.contains("<style") && !page.contains(" style="));
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "no CDN"
        );
        let script = SCRIPT.body;
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!script.contains(sink), "app.js uses {sink}");
        }
        assert!(
            !script.contains("EventSource("),
            "the feed is read with fetch"
        );
        assert!(
            !script.contains("localStorage"),
            "the token stays in sessionStorage"
        );
    }

    #[test]
    fn the_root_redirects_relatively_to_the_page() {
        let res = redirect();
        assert_eq!(res.status(), StatusCode::FOUND);
        assert_eq!(res.headers()[LOCATION], "ui");
    }
}
