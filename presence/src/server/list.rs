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

use std::sync::{Arc, Mutex, PoisonError, Weak};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::header::{HeaderValue, CONTENT_TYPE};

use super::errors::ApiError;
use super::store_call::State;
use super::ResponseBody;
use crate::store::NodeListJson;

/// One listing: the nodes as JSON, and the change feed's cursor from before the
/// store was read (`Presence-Cursor`: watching from it misses nothing changed after
/// the listing).
#[derive(Clone, Debug)]
pub(crate) struct Listing {
    pub(crate) cursor: Option<String>,
    pub(crate) json: NodeListJson,
}

type SharedListing = Shared<BoxFuture<'static, Result<Listing, ApiError>>>;

/// Batches concurrent listings (see the [module docs](self)). One per service.
#[derive(Default)]
pub(crate) struct ListCoalescer {
    /// The listing new requests join; it leaves this slot when it starts.
    queued: Mutex<Option<SharedListing>>,
    /// Held by the running listing.
    running: Arc<tokio::sync::Mutex<()>>,
}

impl ListCoalescer {
    /// The online nodes as JSON, from a listing that starts after this call.
    pub(crate) async fn list(&self, state: &Arc<State>) -> Result<Listing, ApiError> {
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
) -> Result<Listing, ApiError> {
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
    let cursor = state.store.feed_cursor().map(|c| c.encode());
    let json = state.guarded(None, |s| s.list_json()).await?;
    Ok(Listing { cursor, json })
}

/// The `200` response of a listing: its pieces as the body, the length up front.
pub(crate) fn list_response(list: Listing) -> http::Response<ResponseBody> {
    let mut response = http::Response::new(ResponseBody::pieces(list.json.chunks));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(cursor) = list.cursor.and_then(|c| HeaderValue::try_from(c).ok()) {
        headers.insert(PRESENCE_CURSOR, cursor);
    }
    response
}

/// The header of a listing that names the change feed's cursor.
pub(crate) const PRESENCE_CURSOR: &str = "presence-cursor";
