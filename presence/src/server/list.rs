//! `GET /presence` under load: concurrent listings share one store call.
//!
//! A listing of 100 000 nodes is about 13.6 MB of JSON and tens of milliseconds of
//! work for the store. Sixty-four clients polling it at once must not cost sixty-four
//! times that (nor hold sixty-four copies in memory, nor time out the store and trip
//! its circuit breaker for everybody), so listings are batched:
//!
//! - At most one listing runs at a time.
//! - A request that arrives while none is queued queues a new one; requests that
//!   arrive while one is queued join it. The queued listing starts when the running
//!   one ends, and everybody in it gets the same response bytes (a shared
//!   `Bytes`, not a copy).
//!
//! Every response is still fresh: a request only ever joins a listing that has not
//! started yet, so what it gets was read from the store after it arrived (a node that
//! logged in before the request is in it, one that expired before it is not). The
//! price is a wait for the running listing, at most one listing's time.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::header::{HeaderValue, CONTENT_TYPE};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::errors::ApiError;
use super::router::State;
use super::ResponseBody;
use crate::store::NodeListJson;

type Listing = Shared<BoxFuture<'static, Result<NodeListJson, ApiError>>>;

/// Batches concurrent listings (see the [module docs](self)). One per service.
#[derive(Default)]
pub(crate) struct ListCoalescer {
    /// The listing new requests join; it leaves this slot when it starts.
    queued: Mutex<Option<Listing>>,
    /// Held by the running listing.
    running: Arc<tokio::sync::Mutex<()>>,
}

impl ListCoalescer {
    /// The online nodes as JSON, from a listing that starts after this call.
    pub(crate) async fn list(&self, state: &Arc<State>) -> Result<NodeListJson, ApiError> {
        let listing = {
            let mut queued = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
            queued
                .get_or_insert_with(|| {
                    run(Arc::downgrade(state), self.running.clone())
                        .boxed()
                        .shared()
                })
                .clone()
        };
        listing.await
    }
}

/// One listing: waits for the running one, leaves the queue (later requests queue the
/// next listing), asks the store.
///
/// Holds the state weakly while queued: the state owns the queue, and a queued
/// listing nobody polls any more must not keep it alive.
async fn run(
    state: Weak<State>,
    running: Arc<tokio::sync::Mutex<()>>,
) -> Result<NodeListJson, ApiError> {
    let _turn = running.lock_owned().await;
    let state = state
        .upgrade()
        .ok_or_else(|| ApiError::Internal("listing outlived its service".to_owned()))?;
    state
        .list
        .queued
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    state.guarded("", |s| s.list_json()).await
}

/// The `200` response of a listing: its pieces as the body, the length up front.
pub(crate) fn list_response(list: NodeListJson) -> http::Response<ResponseBody> {
    let body = ListBody {
        remaining: list.len() as u64,
        chunks: list.chunks.into_iter(),
    };
    let mut response = http::Response::new(body.boxed());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A body made of shared pieces, sent one frame each with an exact size hint (so
/// the response has a `Content-Length`, like a single buffer would).
struct ListBody {
    chunks: std::vec::IntoIter<Bytes>,
    remaining: u64,
}

impl Body for ListBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let chunk = self.chunks.find(|c| !c.is_empty());
        if let Some(chunk) = &chunk {
            self.remaining = self.remaining.saturating_sub(chunk.len() as u64);
        }
        Poll::Ready(chunk.map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}
