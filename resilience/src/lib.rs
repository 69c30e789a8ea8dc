//! placeholder docs (the lead writes the crate docs)

#![warn(missing_docs)]

pub mod circuit_breaker;
mod http_response;
pub mod key;
pub mod token_bucket;

pub use http_response::ResponseBody;

/// The boxed error type the layers return in their error mode, as in `tower`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

// --- circuit breaker re-exports (owned by the breaker author) ---
pub use circuit_breaker::{
    classify_fn, BreakerError, BreakerPermit, BreakerStats, CircuitBreaker, CircuitBreakerBuilder,
    CircuitBreakerLayer, CircuitBreakerService, CircuitOpen, CircuitState, Classifier,
    ErrIsFailure, FnClassifier, HttpClassifier, Transition, Window,
};
// --- end circuit breaker re-exports ---

// --- token bucket re-exports (owned by the token bucket author) ---
pub use key::{
    key_fn, Cidr, CidrParseError, FnKey, ForwardedHeader, GlobalKey, HeaderDigest, HeaderKey,
    KeyExtractor, PeerIp, TrustedProxyIp,
};
pub use token_bucket::{
    Acquired, InvalidRate, KeyedTokenBuckets, MissingKey, RateLimited, TokenBucket,
    TokenBucketLayer, TokenBucketService,
};
// --- end token bucket re-exports ---
