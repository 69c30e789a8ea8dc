//! [`TokenBucketService`]: the service [`TokenBucketLayer`](super::TokenBucketLayer)
//! wraps around yours.

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{header, HeaderValue, Request, Response, StatusCode};
use tower_service::Service;

use super::{
    bucket::{Acquired, Rejected, Reservation},
    error::MissingKey,
    future::{
        HttpResponseFuture, RateLimitHeaders, ResponseFuture, WaitFuture, RATELIMIT,
        RATELIMIT_POLICY,
    },
    layer::{Limiter, Settings, ShadowRejection},
};
use crate::{
    http_response::json_error,
    key::{GlobalKey, KeyExtractor, KeyType},
    mode::{ErrorMode, HttpMode, WaitMode},
    retry_after::retry_after_secs,
    BoxError, ResponseBody,
};

/// A service rate limited by token buckets; made by
/// [`TokenBucketLayer`](super::TokenBucketLayer), whose docs describe the modes.
///
/// `poll_ready` only asks the inner service and never fails on its own account; the
/// decision is made in `call`, so a rejected request never reaches the inner service.
/// Clones share the buckets.
pub struct TokenBucketService<S, E: KeyType = GlobalKey, M = ErrorMode> {
    inner: S,
    extractor: E,
    limiter: Limiter<E::Key>,
    settings: Arc<Settings>,
    _mode: std::marker::PhantomData<fn() -> M>,
}

impl<S: Clone, E: KeyType, M> Clone for TokenBucketService<S, E, M> {
    fn clone(&self) -> Self {
        TokenBucketService {
            inner: self.inner.clone(),
            extractor: self.extractor.clone(),
            limiter: self.limiter.clone(),
            settings: self.settings.clone(),
            _mode: std::marker::PhantomData,
        }
    }
}

/// Why a request was not let through.
enum Refusal {
    Limited(Rejected),
    Missing(MissingKey),
}

impl Refusal {
    fn into_shadow(self) -> ShadowRejection {
        match self {
            Refusal::Limited(r) => ShadowRejection::Limited(r.limited),
            Refusal::Missing(m) => ShadowRejection::MissingKey(m),
        }
    }

    fn into_error(self) -> BoxError {
        match self {
            Refusal::Limited(r) => Box::new(r.limited),
            Refusal::Missing(m) => Box::new(m),
        }
    }
}

impl<S, E: KeyType, M> TokenBucketService<S, E, M> {
    pub(crate) fn new(
        inner: S,
        extractor: E,
        limiter: Limiter<E::Key>,
        settings: Arc<Settings>,
    ) -> Self {
        TokenBucketService {
            inner,
            extractor,
            limiter,
            settings,
            _mode: std::marker::PhantomData,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Takes one token for `req`'s key.
    #[inline]
    fn admit<Req>(&self, req: &Req) -> Result<Acquired, Refusal>
    where
        E: KeyExtractor<Req>,
    {
        match &self.limiter {
            // Only a builder never given `.key(...)` builds a global limiter, and its
            // extractor is `GlobalKey`: there is no key to extract.
            Limiter::Global(bucket) => bucket.check(1).map_err(Refusal::Limited),
            Limiter::Keyed(buckets) => {
                let key = self.extractor.extract(req).map_err(Refusal::Missing)?;
                buckets.check(&key, 1).map_err(Refusal::Limited)
            }
        }
    }

    /// [`admit`](Self::admit), with shadow mode applied: `Ok(None)` is a refusal shadow
    /// mode counted and let through.
    #[inline]
    fn decide<Req>(&self, req: &Req) -> Result<Option<Acquired>, Refusal>
    where
        E: KeyExtractor<Req>,
    {
        match self.admit(req) {
            Ok(acquired) => Ok(Some(acquired)),
            Err(refusal) => match &self.settings.shadow {
                Some(shadow) => {
                    shadow.record(refusal.into_shadow());
                    Ok(None)
                }
                None => Err(refusal),
            },
        }
    }

    /// Books one token for `req`'s key, due within `max_wait`.
    fn reserve<Req>(
        &self,
        req: &Req,
        max_wait: Duration,
    ) -> Result<(Duration, Option<Reservation>), BoxError>
    where
        E: KeyExtractor<Req>,
    {
        let (wait, reservation) = match &self.limiter {
            Limiter::Global(bucket) => {
                let wait = bucket.reserve(1, max_wait)?;
                (wait, (!wait.is_zero()).then(|| bucket.reservation(1)))
            }
            Limiter::Keyed(buckets) => {
                let key = self.extractor.extract(req)?;
                let wait = buckets.reserve(&key, 1, max_wait)?;
                (
                    wait,
                    (!wait.is_zero()).then(|| buckets.reservation(&key, 1)),
                )
            }
        };
        Ok((wait, reservation))
    }
}

impl<S, E, Req> Service<Req> for TokenBucketService<S, E, ErrorMode>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    E: KeyExtractor<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.decide(&req) {
            Ok(_) => ResponseFuture::inner(self.inner.call(req)),
            Err(refusal) => ResponseFuture::rejected(refusal.into_error()),
        }
    }
}

impl<S, E, ReqBody, ResBody> Service<Request<ReqBody>> for TokenBucketService<S, E, HttpMode>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    E: KeyExtractor<Request<ReqBody>>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = HttpResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        match self.decide(&req) {
            Ok(acquired) => {
                let headers = acquired
                    .filter(|_| self.settings.headers_on_success)
                    .and_then(|a| ratelimit_value(a.remaining(), a.time_until_full()))
                    .map(|limit| RateLimitHeaders {
                        policy: self.settings.policy.clone(),
                        limit,
                    });
                HttpResponseFuture::inner(self.inner.call(req), headers)
            }
            Err(Refusal::Limited(rejected)) => {
                HttpResponseFuture::rejected(self.settings.too_many_requests(&rejected))
            }
            Err(Refusal::Missing(missing)) => {
                // Per request at `debug`: a missing header is the client's doing. A
                // missing peer address, a deployment mistake, is logged once at `warn`
                // by the extractor.
                tracing::debug!(
                    missing = missing.what(),
                    "rate limit key missing; answering 500"
                );
                HttpResponseFuture::rejected(internal_error(
                    "rate_limit_key_missing",
                    &missing.to_string(),
                ))
            }
        }
    }
}

impl<S, E, Req> Service<Req> for TokenBucketService<S, E, WaitMode>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    E: KeyExtractor<Req>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = WaitFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if self.settings.shadow.is_some() {
            // Shadow mode never delays: a token now, or a counted refusal.
            return match self.decide(&req) {
                Ok(_) => WaitFuture::calling(self.inner.call(req)),
                Err(refusal) => WaitFuture::failed(refusal.into_error()),
            };
        }
        match self.reserve(&req, self.settings.max_wait) {
            Err(error) => WaitFuture::failed(error),
            Ok((_, None)) => WaitFuture::calling(self.inner.call(req)),
            Ok((wait, Some(reservation))) => {
                // `self.inner` is the service that was polled ready: it goes into the
                // future and is called after the wait; a fresh clone, to be polled
                // before the next call, takes its place.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                let sleep = tokio::time::sleep(wait);
                WaitFuture::waiting(sleep, ready, req, reservation)
            }
        }
    }
}

impl Settings {
    /// The 429 for a refusal.
    pub(crate) fn too_many_requests<B>(&self, rejected: &Rejected) -> Response<ResponseBody<B>> {
        let secs = retry_after_secs(rejected.limited.retry_after);
        let (content_type, body) = match &self.body {
            Some((content_type, body)) => (content_type.clone(), body.clone()),
            None => (
                HeaderValue::from_static("application/json"),
                // `RateLimited`'s Display: "rate limited; retry after N s", N = `secs`.
                json_error("rate_limited", &rejected.limited.to_string()),
            ),
        };
        let mut response = Response::new(ResponseBody::rejection(body));
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, content_type);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        headers.insert(RATELIMIT_POLICY.clone(), self.policy.clone());
        if let Some(value) =
            ratelimit_value(rejected.state.remaining(), rejected.state.time_until_full())
        {
            headers.insert(RATELIMIT.clone(), value);
        }
        response
    }
}

/// `"default";r=<remaining>;t=<seconds until full, rounded up>`.
///
/// Written into a stack buffer: this runs for every request that passes, and
/// `format!` would allocate a `String` only to copy it into the header value.
pub(crate) fn ratelimit_value(remaining: u32, until_full: Duration) -> Option<HeaderValue> {
    use std::io::Write;

    let t = until_full.as_secs() + u64::from(until_full.subsec_nanos() > 0);
    // 12 + 10 + 3 + 20 bytes at most.
    let mut buf = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    write!(cursor, "\"default\";r={remaining};t={t}").ok()?;
    let len = usize::try_from(cursor.position()).ok()?;
    HeaderValue::from_bytes(buf.get(..len)?).ok()
}

/// A `500` with the JSON error body.
pub(crate) fn internal_error<B>(code: &str, message: &str) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::rejection(json_error(code, message)));
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

impl<S: fmt::Debug, E: KeyType + fmt::Debug, M> fmt::Debug for TokenBucketService<S, E, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBucketService")
            .field("inner", &self.inner)
            .field("key", &self.extractor)
            .field("limiter", &self.limiter)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}
