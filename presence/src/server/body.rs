//! [`RequestBody`] and [`ResponseBody`]: the body types inside the server's stack.
//!
//! Both are concrete types rather than boxes: every request would otherwise pay an
//! allocation to box hyper's body on the way in and another to box the response's
//! one buffer on the way out. Anything else (a body type of an in-process caller, a
//! body of a layer) is boxed as before.

use std::any::Any;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use resilience::BoxError;
use tower_http::body::UnsyncBoxBody as CatchPanicBody;
use tower_http::compression::CompressionBody;

/// The request body inside the stack: whatever the caller sent. hyper's
/// [`Incoming`] (what [`Server`](super::Server) serves) is kept as it is; any other
/// body type is boxed.
pub struct RequestBody {
    kind: RequestKind,
    /// The most bytes the handlers read of it (`413` past it): what the
    /// [`BodyLimit`](super::BodyLimit) in front of them set, else
    /// [`MAX_BODY_BYTES`](super::MAX_BODY_BYTES).
    limit: usize,
    /// The request's route, once the metrics layer resolved it.
    resolved: Option<super::routes::Resolved>,
}

enum RequestKind {
    Incoming(Incoming),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl RequestBody {
    /// Wraps `body`: without a box if it is hyper's [`Incoming`].
    pub fn new<B>(body: B) -> RequestBody
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // Type-erased check for the one body type that needs no box; `B` is known
        // statically, so this folds to one branch per instantiation.
        let mut slot = Some(body);
        let any: &mut dyn Any = &mut slot;
        if let Some(incoming) = any
            .downcast_mut::<Option<Incoming>>()
            .and_then(Option::take)
        {
            return RequestBody {
                kind: RequestKind::Incoming(incoming),
                limit: super::MAX_BODY_BYTES,
                resolved: None,
            };
        }
        let kind = match slot {
            Some(body) => RequestKind::Boxed(body.map_err(Into::into).boxed_unsync()),
            // Only taken above, where this function returned.
            None => RequestKind::Boxed(
                http_body_util::Empty::new()
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            ),
        };
        RequestBody {
            kind,
            limit: super::MAX_BODY_BYTES,
            resolved: None,
        }
    }

    /// The most bytes of this body a handler reads; a longer body is `413`.
    pub fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    pub(crate) fn resolved(&self) -> Option<super::routes::Resolved> {
        self.resolved
    }

    pub(crate) fn set_resolved(&mut self, resolved: super::routes::Resolved) {
        self.resolved = Some(resolved);
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("hyper", &matches!(self.kind, RequestKind::Incoming(_)))
            .finish_non_exhaustive()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            RequestKind::Incoming(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(Into::into))),
            RequestKind::Boxed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Incoming(body) => body.is_end_stream(),
            RequestKind::Boxed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Incoming(body) => body.size_hint(),
            RequestKind::Boxed(body) => body.size_hint(),
        }
    }
}

/// The response body of [`PresenceService`](super::PresenceService): one buffer (every
/// JSON answer), the pieces of a listing, the answer as the outer layers made it
/// (compressed when the client asked), or any other body, boxed.
pub struct ResponseBody {
    kind: ResponseKind,
}

enum ResponseKind {
    Full(Option<Bytes>),
    Pieces {
        pieces: std::vec::IntoIter<Bytes>,
        remaining: u64,
    },
    /// A listing, compressed (tower-http's compression body is large: boxed).
    Compressed(Box<CompressionBody<ResponseBody>>),
    /// What tower-http's catch-panic layer made of an answer (it boxes every body).
    Caught(CatchPanicBody<Bytes, BoxError>),
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
}

impl Default for ResponseBody {
    /// An empty body.
    fn default() -> Self {
        ResponseBody::full(Bytes::new())
    }
}

impl ResponseBody {
    /// Any body, boxed.
    pub fn new<B>(body: B) -> ResponseBody
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        ResponseBody {
            kind: ResponseKind::Boxed(body.map_err(Into::into).boxed_unsync()),
        }
    }

    pub(crate) fn compressed(body: CompressionBody<ResponseBody>) -> ResponseBody {
        ResponseBody {
            kind: ResponseKind::Compressed(Box::new(body)),
        }
    }

    pub(crate) fn caught(body: CatchPanicBody<Bytes, BoxError>) -> ResponseBody {
        ResponseBody {
            kind: ResponseKind::Caught(body),
        }
    }

    /// A body of one buffer.
    pub fn full(bytes: Bytes) -> ResponseBody {
        ResponseBody {
            kind: ResponseKind::Full(Some(bytes)),
        }
    }

    /// A body of several buffers sent one frame each, with an exact size hint (so the
    /// response has a `Content-Length`, as one buffer would).
    pub(crate) fn pieces(pieces: Vec<Bytes>) -> ResponseBody {
        let remaining = pieces.iter().map(|p| p.len() as u64).sum();
        ResponseBody {
            kind: ResponseKind::Pieces {
                pieces: pieces.into_iter(),
                remaining,
            },
        }
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("size_hint", &self.size_hint())
            .finish_non_exhaustive()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            ResponseKind::Full(bytes) => Poll::Ready(
                bytes
                    .take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            ResponseKind::Pieces { pieces, remaining } => {
                let piece = pieces.find(|p| !p.is_empty());
                if let Some(piece) = &piece {
                    *remaining = remaining.saturating_sub(piece.len() as u64);
                }
                Poll::Ready(piece.map(|p| Ok(Frame::data(p))))
            }
            ResponseKind::Compressed(body) => Pin::new(&mut **body).poll_frame(cx),
            ResponseKind::Caught(body) => Pin::new(body).poll_frame(cx),
            ResponseKind::Boxed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Full(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            ResponseKind::Pieces { remaining, .. } => *remaining == 0,
            ResponseKind::Compressed(body) => body.is_end_stream(),
            ResponseKind::Caught(body) => body.is_end_stream(),
            ResponseKind::Boxed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ResponseKind::Pieces { remaining, .. } => SizeHint::with_exact(*remaining),
            ResponseKind::Compressed(body) => body.size_hint(),
            ResponseKind::Caught(body) => body.size_hint(),
            ResponseKind::Boxed(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[tokio::test]
    async fn bodies_deliver_their_bytes_with_exact_sizes() {
        let full = ResponseBody::full(Bytes::from_static(b"abc"));
        assert_eq!(full.size_hint().exact(), Some(3));
        assert_eq!(&full.collect().await.unwrap().to_bytes()[..], b"abc");

        let pieces = ResponseBody::pieces(vec![
            Bytes::from_static(b"a"),
            Bytes::new(),
            Bytes::from_static(b"bc"),
        ]);
        assert_eq!(pieces.size_hint().exact(), Some(3));
        assert_eq!(&pieces.collect().await.unwrap().to_bytes()[..], b"abc");

        let empty = ResponseBody::full(Bytes::new());
        assert!(empty.is_end_stream());

        let boxed = ResponseBody::new(Full::new(Bytes::from_static(b"xy")));
        assert_eq!(&boxed.collect().await.unwrap().to_bytes()[..], b"xy");

        let request = RequestBody::new(Full::new(Bytes::from_static(b"req")));
        assert_eq!(request.size_hint().exact(), Some(3));
        assert_eq!(&request.collect().await.unwrap().to_bytes()[..], b"req");
    }
}
