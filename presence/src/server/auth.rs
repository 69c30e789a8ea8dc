//! Bearer-token authentication for `/presence*` (`PRESENCE_AUTH_TOKEN`).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{ready, Either, Ready};
use http::header::AUTHORIZATION;
use tower::{Layer, Service};

use super::errors::ApiError;
use super::ResponseBody;

/// Requires `Authorization: Bearer <token>` when a token is configured; without one it
/// passes every request through. A missing or wrong token is `401 unauthorized`.
///
/// The comparison takes the same time wherever the first differing byte is, so the
/// token cannot be guessed byte by byte from response times.
#[derive(Clone)]
pub struct BearerAuthLayer {
    token: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for BearerAuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuthLayer")
            .field("enabled", &self.token.is_some())
            .finish()
    }
}

impl BearerAuthLayer {
    /// `Some(token)` requires it; `None` disables authentication.
    pub fn new(token: Option<&str>) -> Self {
        BearerAuthLayer {
            token: token.map(|t| Arc::from(t.as_bytes())),
        }
    }
}

impl<S> Layer<S> for BearerAuthLayer {
    type Service = BearerAuth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BearerAuth {
            inner,
            token: self.token.clone(),
        }
    }
}

/// The service of [`BearerAuthLayer`].
#[derive(Clone)]
pub struct BearerAuth<S> {
    inner: S,
    token: Option<Arc<[u8]>>,
}

impl<S> std::fmt::Debug for BearerAuth<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerAuth")
            .field("enabled", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

impl<S, B> Service<http::Request<B>> for BearerAuth<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResponseBody>, Error = Infallible>,
{
    type Response = http::Response<ResponseBody>;
    type Error = Infallible;
    type Future = Either<Ready<Result<http::Response<ResponseBody>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match &self.token {
            Some(token) if !authorized(&req, token) => {
                Either::Left(ready(Ok(ApiError::Unauthorized.into_response())))
            }
            _ => Either::Right(self.inner.call(req)),
        }
    }
}

fn authorized<B>(req: &http::Request<B>, token: &[u8]) -> bool {
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    // RFC 9110 §11.1: the scheme name is case-insensitive.
    let Some((scheme, credentials)) = value.split_at_checked(7) else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"bearer ") && constant_time_eq(credentials.trim_ascii(), token)
}

/// Compares in time that depends only on the lengths, never on where the inputs
/// differ. (The token's length is not secret enough to hide; its bytes are.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    // black_box keeps the optimizer from turning the loop into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn scheme_is_case_insensitive() {
        let req = |v: &str| {
            http::Request::builder()
                .header(AUTHORIZATION, v)
                .body(())
                .map_err(|e| e.to_string())
        };
        assert_eq!(req("bearer tok").map(|r| authorized(&r, b"tok")), Ok(true));
        assert_eq!(
            req("Bearer  tok ").map(|r| authorized(&r, b"tok")),
            Ok(true)
        );
        assert_eq!(req("Basic tok").map(|r| authorized(&r, b"tok")), Ok(false));
        assert_eq!(req("Bearer").map(|r| authorized(&r, b"tok")), Ok(false));
    }
}
