//! [`RedisTokenBucketService`]: the service [`RedisTokenBucketLayer`](super::RedisTokenBucketLayer)
//! wraps around yours.

use std::{
    fmt,
    marker::PhantomData,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tower_service::Service;

use super::{buckets::RedisBuckets, future::ResponseFuture};
use crate::{
    key::{KeyExtractor, KeyType},
    mode::{ErrorMode, HttpMode},
    token_bucket::{
        future::{RATELIMIT, RATELIMIT_POLICY},
        layer::Settings,
        service::{internal_error, ratelimit_value},
    },
    BoxError, ResponseBody,
};

/// A service rate limited by [`RedisBuckets`]; made by
/// [`RedisTokenBucketLayer`](super::RedisTokenBucketLayer).
pub struct RedisTokenBucketService<S, E: KeyType, M = ErrorMode> {
    inner: S,
    extractor: E,
    buckets: RedisBuckets<E::Key>,
    settings: Arc<Settings>,
    _mode: PhantomData<fn() -> M>,
}

impl<S, E: KeyType, M> RedisTokenBucketService<S, E, M> {
    pub(crate) fn new(
        inner: S,
        extractor: E,
        buckets: RedisBuckets<E::Key>,
        settings: Arc<Settings>,
    ) -> Self {
        RedisTokenBucketService {
            inner,
            extractor,
            buckets,
            settings,
            _mode: PhantomData,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The service that was polled ready, for the future to call after the round trip;
    /// a fresh clone takes its place, to be polled before the next call.
    fn take_ready(&mut self) -> S
    where
        S: Clone,
    {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }
}

impl<S, E, Req> Service<Req> for RedisTokenBucketService<S, E, ErrorMode>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: Into<BoxError>,
    E: KeyExtractor<Req>,
    E::Key: fmt::Display,
    Req: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = match self.extractor.extract(&req) {
            Ok(key) => key,
            Err(missing) => return Box::pin(async move { Err(Box::new(missing) as BoxError) }),
        };
        let buckets = self.buckets.clone();
        let mut ready = self.take_ready();
        Box::pin(async move {
            match buckets.check(&key, 1).await {
                Ok(_) => ready.call(req).await.map_err(Into::into),
                Err(rejected) => Err(Box::new(rejected.limited) as BoxError),
            }
        })
    }
}

impl<S, E, ReqBody, ResBody> Service<Request<ReqBody>> for RedisTokenBucketService<S, E, HttpMode>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    E: KeyExtractor<Request<ReqBody>>,
    E::Key: fmt::Display,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let key = match self.extractor.extract(&req) {
            Ok(key) => key,
            Err(missing) => {
                let response = internal_error("rate_limit_key_missing", &missing.to_string());
                return Box::pin(async move { Ok(response) });
            }
        };
        let buckets = self.buckets.clone();
        let settings = self.settings.clone();
        let mut ready = self.take_ready();
        Box::pin(async move {
            let acquired = match buckets.check(&key, 1).await {
                Ok(acquired) => acquired,
                Err(rejected) => return Ok(settings.too_many_requests(&rejected)),
            };
            let mut response = ready.call(req).await?.map(ResponseBody::inner);
            let headers = response.headers_mut();
            // As the local layer: the inner service's own fields win.
            let theirs =
                headers.contains_key(&RATELIMIT) || headers.contains_key(&RATELIMIT_POLICY);
            if settings.headers_on_success && !theirs {
                if let Some(value) =
                    ratelimit_value(acquired.remaining(), acquired.time_until_full())
                {
                    headers.insert(RATELIMIT_POLICY.clone(), settings.policy.clone());
                    headers.insert(RATELIMIT.clone(), value);
                }
            }
            Ok(response)
        })
    }
}

impl<S: Clone, E: KeyType, M> Clone for RedisTokenBucketService<S, E, M> {
    fn clone(&self) -> Self {
        RedisTokenBucketService {
            inner: self.inner.clone(),
            extractor: self.extractor.clone(),
            buckets: self.buckets.clone(),
            settings: self.settings.clone(),
            _mode: PhantomData,
        }
    }
}

impl<S: fmt::Debug, E: KeyType + fmt::Debug, M> fmt::Debug for RedisTokenBucketService<S, E, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTokenBucketService")
            .field("inner", &self.inner)
            .field("key", &self.extractor)
            .field("buckets", &self.buckets)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}
