//! Reading a request body: the content checks (`415`), the size limit (`413`), the
//! arrival bound (`408`) and JSON deserialization (`400`).

use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::deadline::deadline;
use super::errors::ApiError;
use super::RequestBody;

/// The request's body framing and type, or the `415` that says what is wrong: one
/// `Content-Type` of `application/json` or any `application/*+json`
/// (case-insensitive), in UTF-8 (no `charset`, or `charset=utf-8`), and no transfer
/// coding but `chunked` (a `gzip` body would otherwise be read as if it were JSON).
///
/// `framed` says whether the body has no declared length: only then can it carry a
/// transfer coding (hyper refuses `Content-Length` with `Transfer-Encoding`), so a
/// heartbeat with a `Content-Length` is spared the header lookup.
pub(crate) fn check_json_content(headers: &http::HeaderMap, framed: bool) -> Result<(), ApiError> {
    let refuse = |why: &str| Err(ApiError::UnsupportedMediaType(why.to_owned()));
    let mut types = headers.get_all(CONTENT_TYPE).iter();
    let value = match (types.next(), types.next()) {
        (Some(value), None) => value,
        (None, _) => {
            return refuse("the request body must be JSON (`Content-Type: application/json`)")
        }
        (Some(_), Some(_)) => return refuse("the request has more than one `Content-Type`"),
    };
    if let Some(coding) = framed
        .then(|| headers.get(http::header::TRANSFER_ENCODING))
        .flatten()
    {
        if !coding.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return refuse("no transfer coding but `chunked` is supported");
        }
    }
    // What every heartbeat carries, compared as it is.
    if value.as_bytes() == b"application/json" {
        return Ok(());
    }
    let mut parts = value.to_str().unwrap_or_default().split(';');
    let essence = parts.next().unwrap_or_default().trim();
    // Compared in place: every heartbeat passes through here.
    let is_json = essence
        .get(.."application/".len())
        .filter(|t| t.eq_ignore_ascii_case("application/"))
        .map(|t| &essence[t.len()..])
        .is_some_and(|subtype| {
            subtype.eq_ignore_ascii_case("json")
                || subtype
                    .len()
                    .checked_sub("+json".len())
                    .and_then(|at| subtype.get(at..))
                    .is_some_and(|tail| tail.eq_ignore_ascii_case("+json"))
        });
    if !is_json {
        return refuse("the request body must be JSON (`Content-Type: application/json`)");
    }
    let utf8 = parts.all(|param| match param.split_once('=') {
        Some((name, value)) if name.trim().eq_ignore_ascii_case("charset") => {
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8")
        }
        _ => true,
    });
    if utf8 {
        Ok(())
    } else {
        refuse("the request body must be UTF-8 JSON (no `charset` other than `utf-8`)")
    }
}

/// Checks the content type (`415`), reads the body (`413` over the limit) and
/// deserializes it (`400`).
pub(crate) async fn read_json<T: DeserializeOwned>(
    headers: &http::HeaderMap,
    body: RequestBody,
    timeout: Duration,
) -> Result<T, ApiError> {
    let bytes = read_body(headers, body, timeout).await?;
    parse_json(&bytes)
}

/// Checks the content type (`415`) and reads the body (`413` past
/// the body's limit (default [`MAX_BODY_BYTES`](super::MAX_BODY_BYTES)), `408` if it has not arrived within `timeout`: a client that
/// trickles its body).
///
/// A body that arrives as one piece (as a small request body does) is taken as it
/// is, without the buffer list of `collect`; and if it is there already, no timer is
/// set at all (see [`deadline`]).
pub(crate) async fn read_body(
    headers: &http::HeaderMap,
    body: RequestBody,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let framed = http_body::Body::size_hint(&body).exact().is_none();
    check_json_content(headers, framed)?;
    deadline(timeout, collect_body(body))
        .await
        .unwrap_or(Err(ApiError::RequestTimeout))
}

/// The body's bytes (`413` past its [`limit`](RequestBody::limit)).
pub(crate) async fn collect_body(mut body: RequestBody) -> Result<Bytes, ApiError> {
    let limit = body.limit();
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::BadRequest(format!("could not read the request body: {e}")))?;
        // Trailers carry nothing a JSON body needs.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        // A body without a declared length (chunked) stops here; a declared one over
        // the limit was refused before it was read (`BodyLimit`).
        read = read.saturating_add(data.len());
        if read > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        match &first {
            None => first = Some(data),
            Some(head) => {
                if rest.is_empty() {
                    rest.extend_from_slice(head);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    Ok(if rest.is_empty() {
        first.unwrap_or_default()
    } else {
        Bytes::from(rest)
    })
}

/// Deserializes a request body (`400` if it is not the expected JSON object).
pub(crate) fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    // The hot path (heartbeats) deserializes straight into the wire type, without a
    // `serde_json::Value` tree in between; the first byte tells it is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        return serde_json::from_slice(bytes).map_err(|e| {
            ApiError::BadRequest(match e.classify() {
                serde_json::error::Category::Data => format!("invalid body: {e}"),
                _ => format!("the body is not valid JSON: {e}"),
            })
        });
    }
    // Not an object. Say whether it is JSON at all. (serde's derived structs would
    // also accept a JSON array of the fields in order; the API takes objects only.)
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?;
    Err(ApiError::BadRequest(
        "the body must be a JSON object".to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_str(v) {
                m.insert(CONTENT_TYPE, v);
            }
            check_json_content(&m, false).is_ok()
        };
        assert!(h("application/json"));
        assert!(h("Application/JSON; charset=utf-8"));
        assert!(h("application/json; charset=\"UTF-8\""));
        assert!(h("application/merge-patch+json"));
        assert!(!h("text/plain"));
        assert!(!h("application/jsonx"));
        assert!(!h("application/json; charset=utf-16"));
        assert!(!h("application/json; charset=iso-8859-1"));
        assert!(check_json_content(&http::HeaderMap::new(), false).is_err());

        let mut two = http::HeaderMap::new();
        two.append(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        two.append(CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
        assert!(check_json_content(&two, false).is_err());

        let mut gzip = http::HeaderMap::new();
        gzip.insert(
            CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        gzip.insert(
            http::header::TRANSFER_ENCODING,
            http::HeaderValue::from_static("gzip, chunked"),
        );
        assert!(check_json_content(&gzip, true).is_err());
        gzip.insert(
            http::header::TRANSFER_ENCODING,
            http::HeaderValue::from_static("chunked"),
        );
        assert!(check_json_content(&gzip, true).is_ok());
    }
}
