//! Key extractors: what a rate limiter counts requests by.
//!
//! A [`KeyExtractor`] looks at a request and returns the key of the bucket it draws
//! from: nothing ([`GlobalKey`], one bucket for all), the peer IP ([`PeerIp`]), the
//! client IP behind trusted proxies ([`TrustedProxyIp`]), a header ([`HeaderKey`]), the
//! host a client request goes to ([`UriHost`], for the keyed circuit breakers), or
//! anything a closure computes ([`key_fn`]).
//!
//! When there is no key (no peer address, no such header), `extract` returns
//! [`MissingKey`] naming what is missing, and the layer refuses the request rather than
//! rate limit it in some shared bucket.
//!
//! ```
//! use resilience::{KeyExtractor, PeerIp, TrustedProxyIp};
//! use std::net::{IpAddr, SocketAddr};
//!
//! let mut req = http::Request::new(());
//! let missing = PeerIp.extract(&req).unwrap_err();
//! assert!(missing.to_string().starts_with("rate limit key missing: no peer address"));
//!
//! // Servers put the peer address into the request extensions.
//! req.extensions_mut().insert("203.0.113.7:50000".parse::<SocketAddr>().unwrap());
//! assert_eq!(PeerIp.extract(&req).unwrap(), "203.0.113.7".parse::<IpAddr>().unwrap());
//!
//! // Trusted networks are `ipnet::IpNet`s.
//! let behind_proxy = TrustedProxyIp::new(vec!["203.0.113.0/24".parse().unwrap()]);
//! req.headers_mut().insert("x-forwarded-for", "198.51.100.23".parse().unwrap());
//! assert_eq!(behind_proxy.extract(&req).unwrap(), "198.51.100.23".parse::<IpAddr>().unwrap());
//! ```
//!
//! # Two traits: the key type, and the extraction
//!
//! [`KeyType`] names an extractor's key type, once, independent of the request type;
//! [`KeyExtractor<Req>`] extracts that key from a `Req`. The split is what lets the
//! layer create its typed [`KeyedTokenBuckets<E::Key>`](crate::KeyedTokenBuckets) when
//! it is built, before it has seen a request, and hand out that very map from
//! [`TokenBucketLayer::keyed_buckets`](crate::TokenBucketLayer::keyed_buckets): there is
//! no map per request type to look up at run time, and no way to ask for a map that no
//! request uses.
//!
//! `KeyExtractor` stays generic in the request so that extractors are not tied to
//! HTTP: [`GlobalKey`] works on any request, and a [`key_fn`] closure on whatever its
//! argument is (a `u32`, a tonic request, an `http::Request`). The HTTP extractors
//! implement it for every `http::Request<B>`. (`tower_governor`'s
//! `KeyExtractor { type Key; fn extract<B>(&self, req: &Request<B>) }` is the same
//! idea fixed to `http::Request`.)
//!
//! To write your own, implement both:
//!
//! ```
//! use resilience::{KeyExtractor, KeyType, MissingKey};
//!
//! /// Keys by the tenant, the first path segment.
//! #[derive(Clone)]
//! struct Tenant;
//!
//! impl KeyType for Tenant {
//!     type Key = String;
//! }
//!
//! impl<B> KeyExtractor<http::Request<B>> for Tenant {
//!     fn extract(&self, req: &http::Request<B>) -> Result<String, MissingKey> {
//!         match req.uri().path().split('/').nth(1) {
//!             Some(tenant) if !tenant.is_empty() => Ok(tenant.to_owned()),
//!             _ => Err(MissingKey::new("tenant in the path")),
//!         }
//!     }
//! }
//!
//! let req = http::Request::get("/acme/items").body(()).unwrap();
//! assert_eq!(Tenant.extract(&req).unwrap(), "acme");
//! ```
//!
//! # Peer address convention
//!
//! The peer address is a [`std::net::SocketAddr`] in the request extensions, inserted by
//! the server (for hyper: `req.extensions_mut().insert(remote_addr)` in the service you
//! hand to `serve_connection`). With the crate feature `axum`, axum's
//! `ConnectInfo<SocketAddr>` (from
//! `into_make_service_with_connect_info::<SocketAddr>()`) works too.

mod trusted_proxy;

use std::{
    borrow::Cow,
    fmt,
    hash::{BuildHasher, Hash, RandomState},
    marker::PhantomData,
    net::{IpAddr, SocketAddr},
    sync::Once,
};

use http::{HeaderName, Request};

pub use self::trusted_proxy::{ForwardedHeader, TrustedProxyIp};
pub use crate::token_bucket::MissingKey;

/// The key type of an extractor: what its buckets are kept by, the same for every
/// request type the extractor handles.
///
/// A layer reads it when it is built, to create its
/// [`KeyedTokenBuckets<Self::Key>`](crate::KeyedTokenBuckets); see the [module
/// docs](self) for why it is a trait of its own.
pub trait KeyType: Clone + Send + Sync + 'static {
    /// The key buckets are kept by. It is stored for every client that is in the map,
    /// so keep it small (an `IpAddr` is 17 bytes); avoid keys that borrow a large
    /// buffer, such as a `HeaderValue` sliced from a request (it keeps the whole read
    /// buffer alive).
    type Key: Hash + Eq + Clone + Send + Sync + 'static;
}

/// Finds the rate-limit key of a request of type `Req`.
///
/// The key's type is [`KeyType::Key`], fixed by the extractor, not by `Req`.
/// Implementations must be cheap (they run on every request) and must not trust
/// anything a client can forge unless told to (see [`TrustedProxyIp`]).
pub trait KeyExtractor<Req>: KeyType {
    /// The key of `req`, or what is missing to compute it.
    fn extract(&self, req: &Req) -> Result<Self::Key, MissingKey>;
}

/// One bucket for all requests (key `()`); works on any request type.
///
/// This is what [`TokenBucketLayer::new`](crate::TokenBucketLayer::new) and a builder
/// without [`.key(...)`](crate::token_bucket::TokenBucketLayerBuilder::key) make: a
/// global rate limit, e.g. for a client that must not exceed a server's quota.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalKey;

impl KeyType for GlobalKey {
    type Key = ();
}

impl<Req> KeyExtractor<Req> for GlobalKey {
    #[inline]
    fn extract(&self, _req: &Req) -> Result<(), MissingKey> {
        Ok(())
    }
}

/// What a missing peer address is, and what to do about it: the text of the
/// [`MissingKey`] (and so of the `500` body in HTTP mode) of [`PeerIp`] and
/// [`TrustedProxyIp`].
#[cfg(feature = "axum")]
pub(crate) const PEER_MISSING: &str = "peer address (a std::net::SocketAddr or axum \
    ConnectInfo<SocketAddr> in the request extensions). With axum (resilience's `axum` \
    feature, on in this build), serve the router with \
    `into_make_service_with_connect_info::<SocketAddr>()`; with hyper, insert the \
    connection's peer SocketAddr into each request's extensions";
/// What a missing peer address is, and what to do about it: the text of the
/// [`MissingKey`] (and so of the `500` body in HTTP mode) of [`PeerIp`] and
/// [`TrustedProxyIp`].
#[cfg(not(feature = "axum"))]
pub(crate) const PEER_MISSING: &str = "peer address (a std::net::SocketAddr in the \
    request extensions). With axum, enable resilience's `axum` feature and serve the \
    router with `into_make_service_with_connect_info::<SocketAddr>()`; with hyper, insert \
    the connection's peer SocketAddr into each request's extensions";

/// The [`MissingKey`] for a request without a peer address. Logged once per process at
/// `warn`: it is a deployment mistake that fails every request, so one line says what
/// to fix without flooding the log.
pub(crate) fn missing_peer() -> MissingKey {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            "rate limit key missing: no {PEER_MISSING} (every such request is refused; \
             logged once)"
        );
    });
    MissingKey::new(PEER_MISSING)
}

/// The peer address a server put into the request extensions.
pub(crate) fn peer_addr<B>(req: &Request<B>) -> Option<SocketAddr> {
    if let Some(addr) = req.extensions().get::<SocketAddr>() {
        return Some(*addr);
    }
    #[cfg(feature = "axum")]
    if let Some(info) = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(info.0);
    }
    None
}

/// Keys `http::Request`s by the IP of the connection's peer.
///
/// The address comes from the request extensions: a [`std::net::SocketAddr`], or with
/// the crate feature `axum`, axum's `ConnectInfo<SocketAddr>`. Without one the request
/// fails with [`MissingKey`] (HTTP mode: `500`), never a shared bucket; its message says
/// what to do (with axum: the `axum` feature and
/// `into_make_service_with_connect_info::<SocketAddr>()`; with hyper: insert the peer's
/// `SocketAddr`), and the first such request per process logs it at `warn`. The port is
/// ignored, and IPv4-mapped IPv6 (`::ffff:1.2.3.4`, what dual-stack sockets report) is
/// keyed as the IPv4 address.
///
/// Behind a reverse proxy every request has the proxy's address: use
/// [`TrustedProxyIp`] there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerIp;

impl KeyType for PeerIp {
    type Key = IpAddr;
}

impl<B> KeyExtractor<Request<B>> for PeerIp {
    #[inline]
    fn extract(&self, req: &Request<B>) -> Result<IpAddr, MissingKey> {
        peer_addr(req)
            .map(|addr| addr.ip().to_canonical())
            .ok_or_else(missing_peer)
    }
}

/// Keys client requests by the host they go to, from the request URI: `host` or
/// `host:port` when the URI names a port, the host lowercased. What a
/// [`KeyedCircuitBreakerLayer`](crate::KeyedCircuitBreakerLayer) in front of an HTTP
/// client uses, so that one failing upstream does not open the breaker of the others.
///
/// Works on `http::Request<B>` and, with the crate feature `reqwest`, on
/// `reqwest::Request`. A request whose URI has no host (a server-side, origin-form
/// request such as `/items`) fails with [`MissingKey`].
///
/// ```
/// use resilience::{KeyExtractor, UriHost};
///
/// let req = http::Request::get("https://API.example.com/v1/items").body(()).unwrap();
/// assert_eq!(UriHost.extract(&req).unwrap(), "api.example.com");
/// let req = http::Request::get("http://10.0.0.7:8080/health").body(()).unwrap();
/// assert_eq!(UriHost.extract(&req).unwrap(), "10.0.0.7:8080");
/// let req = http::Request::get("/items").body(()).unwrap();
/// assert!(UriHost.extract(&req).is_err());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UriHost;

impl KeyType for UriHost {
    type Key = String;
}

/// `host` or `host:port`, lowercased.
fn host_key(host: Option<&str>, port: Option<u16>) -> Result<String, MissingKey> {
    let host = host
        .filter(|h| !h.is_empty())
        .ok_or_else(|| MissingKey::new("host in the request URI"))?;
    let mut key = host.to_ascii_lowercase();
    if let Some(port) = port {
        key.push(':');
        key.push_str(&port.to_string());
    }
    Ok(key)
}

impl<B> KeyExtractor<Request<B>> for UriHost {
    fn extract(&self, req: &Request<B>) -> Result<String, MissingKey> {
        host_key(req.uri().host(), req.uri().port_u16())
    }
}

#[cfg(feature = "reqwest")]
impl KeyExtractor<reqwest::Request> for UriHost {
    fn extract(&self, req: &reqwest::Request) -> Result<String, MissingKey> {
        // `port()` is only the explicit one, as for `http::Uri`: the same key for both.
        host_key(req.url().host_str(), req.url().port())
    }
}

/// Keys `http::Request`s by the value of a header, e.g. an API key.
///
/// The key is a 128-bit keyed digest of the value ([`HeaderDigest`]), not the value:
/// it is 16 bytes however long the header is, the map does not keep secrets such as
/// API keys in memory, and it does not pin hyper's read buffer the way a stored
/// `HeaderValue` slice would. The digest is SipHash with a random per-extractor key, so
/// clients cannot craft collisions; accidental ones are about 2^-128 likely.
///
/// If the header appears several times, the first line counts. A request without
/// the header fails with [`MissingKey`] naming it.
#[derive(Clone, Debug)]
pub struct HeaderKey {
    name: HeaderName,
    hasher: RandomState,
    missing: Cow<'static, str>,
}

impl HeaderKey {
    /// Keys by the header `name`.
    pub fn new(name: HeaderName) -> Self {
        let missing = format!("header `{name}`").into();
        HeaderKey {
            name,
            hasher: RandomState::new(),
            missing,
        }
    }

    /// The header name.
    pub fn name(&self) -> &HeaderName {
        &self.name
    }

    /// The key for a header value.
    pub fn digest(&self, value: &[u8]) -> HeaderDigest {
        // Two domain-separated 64-bit SipHashes make 128 bits.
        let hi = self.hasher.hash_one((0u8, value));
        let lo = self.hasher.hash_one((1u8, value));
        HeaderDigest(u128::from(hi) << 64 | u128::from(lo))
    }
}

/// The key [`HeaderKey`] produces: a keyed 128-bit digest of a header value.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeaderDigest(u128);

impl fmt::Debug for HeaderDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HeaderDigest({:032x})", self.0)
    }
}

/// 32 hex digits, e.g. for the Redis key of a shared bucket. The digest is keyed per
/// [`HeaderKey`], so two processes digest one value differently: to share buckets across
/// servers, key by the value itself with [`key_fn`].
impl fmt::Display for HeaderDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl KeyType for HeaderKey {
    type Key = HeaderDigest;
}

impl<B> KeyExtractor<Request<B>> for HeaderKey {
    fn extract(&self, req: &Request<B>) -> Result<HeaderDigest, MissingKey> {
        req.headers()
            .get(&self.name)
            .map(|value| self.digest(value.as_bytes()))
            .ok_or_else(|| MissingKey::new(self.missing.clone()))
    }
}

/// A key extractor from a closure `Fn(&Req) -> Option<K>`; `None` is a missing key.
///
/// The closure's argument type is the request type, and its `K` is the extractor's
/// [`KeyType::Key`]; annotate the argument (`|req: &http::Request<Body>|`) so both are
/// known here. Works for any request type, not only HTTP.
///
/// ```
/// use resilience::{key_fn, KeyExtractor};
///
/// // Key by the first path segment, e.g. a tenant.
/// let tenant = key_fn(|req: &http::Request<()>| {
///     req.uri().path().split('/').nth(1).filter(|s| !s.is_empty()).map(str::to_owned)
/// })
/// .missing("tenant in the path");
///
/// let req = http::Request::get("/acme/items").body(()).unwrap();
/// assert_eq!(tenant.extract(&req).unwrap(), "acme");
/// let req = http::Request::get("/").body(()).unwrap();
/// assert_eq!(tenant.extract(&req).unwrap_err().what(), "tenant in the path");
///
/// // Not HTTP: requests are plain numbers here, keyed by their remainder.
/// let shard = key_fn(|req: &u32| Some(req % 4));
/// assert_eq!(shard.extract(&10).unwrap(), 2);
/// ```
pub fn key_fn<Req, K, F>(f: F) -> FnKey<F, K>
where
    F: Fn(&Req) -> Option<K>,
{
    FnKey {
        f,
        missing: Cow::Borrowed("key (the key function returned None)"),
        _key: PhantomData,
    }
}

/// The extractor [`key_fn`] makes; `K` is its key type.
pub struct FnKey<F, K> {
    f: F,
    missing: Cow<'static, str>,
    _key: PhantomData<fn() -> K>,
}

impl<F, K> FnKey<F, K> {
    /// What the [`MissingKey`] error names when the closure returns `None`.
    pub fn missing(mut self, what: impl Into<Cow<'static, str>>) -> Self {
        self.missing = what.into();
        self
    }
}

impl<F: Clone, K> Clone for FnKey<F, K> {
    fn clone(&self) -> Self {
        FnKey {
            f: self.f.clone(),
            missing: self.missing.clone(),
            _key: PhantomData,
        }
    }
}

impl<F, K> fmt::Debug for FnKey<F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnKey")
            .field("key", &std::any::type_name::<K>())
            .field("missing", &self.missing)
            .finish_non_exhaustive()
    }
}

impl<F, K> KeyType for FnKey<F, K>
where
    F: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Key = K;
}

impl<Req, F, K> KeyExtractor<Req> for FnKey<F, K>
where
    F: Fn(&Req) -> Option<K> + Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    #[inline]
    fn extract(&self, req: &Req) -> Result<K, MissingKey> {
        (self.f)(req).ok_or_else(|| MissingKey::new(self.missing.clone()))
    }
}
