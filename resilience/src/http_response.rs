//! The response body the layers return in HTTP mode: the inner service's body, or a
//! small rejection body the layer wrote itself.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// Body of a response from a layer in HTTP mode.
    ///
    /// Either the inner service's body, passed through untouched, or the body of a
    /// rejection (`429`, `503`, `500`) that the layer produced without calling the inner
    /// service. Keeping both in one type is what lets the layers drop into `axum` with a
    /// plain `.layer(...)`: the service stays infallible and the body stays a `Body`.
    // The variants' fields are documented by their variants; pin-project-lite does not
    // accept doc comments on them.
    #[allow(missing_docs)]
    #[project = ResponseBodyProj]
    pub enum ResponseBody<B> {
        /// The inner service's body.
        Inner {
            #[pin]
            body: B,
        },
        /// A rejection body produced by the layer.
        Rejection {
            body: Option<Bytes>,
        },
    }
}

impl<B> ResponseBody<B> {
    /// Wraps the inner service's body.
    pub fn inner(body: B) -> Self {
        ResponseBody::Inner { body }
    }

    /// A body holding a rejection produced by the layer.
    pub fn rejection(bytes: impl Into<Bytes>) -> Self {
        ResponseBody::Rejection {
            body: Some(bytes.into()),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project() {
            ResponseBodyProj::Inner { body } => body.poll_frame(cx),
            ResponseBodyProj::Rejection { body } => Poll::Ready(
                body.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Inner { body } => body.is_end_stream(),
            ResponseBody::Rejection { body } => body.as_ref().is_none_or(|b| b.is_empty()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Inner { body } => body.size_hint(),
            ResponseBody::Rejection { body } => {
                SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// The JSON error body every layer uses by default: `{"error": code, "message": message}`.
pub(crate) fn json_error(code: &str, message: &str) -> Bytes {
    let mut out = String::with_capacity(32 + code.len() + message.len());
    out.push_str("{\"error\":");
    push_json_string(&mut out, code);
    out.push_str(",\"message\":");
    push_json_string(&mut out, message);
    out.push('}');
    Bytes::from(out)
}

fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_error_escapes() {
        assert_eq!(
            &json_error("x", "a \"b\"\n")[..],
            br#"{"error":"x","message":"a \"b\"\u000a"}"#
        );
    }
}
