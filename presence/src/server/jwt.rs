//! JWT bearer tokens (`PRESENCE_JWT_SECRET`, `PRESENCE_JWT_PUBLIC_KEY_FILE`): who a
//! token is, and what it may do ([`Access`]).
//!
//! ```
//! use jsonwebtoken::{encode, EncodingKey, Header};
//! use presence::server::{Access, JwtVerifier};
//!
//! let verifier = JwtVerifier::new(Some(b"s3cret"), None).unwrap();
//! let claims = serde_json::json!({"sub": "node-1", "scope": "presence:write", "exp": 4_102_444_800u64});
//! let token = encode(&Header::default(), &claims, &EncodingKey::from_secret(b"s3cret").unwrap()).unwrap();
//! let access = verifier.verify(&token).unwrap();
//! assert!(access.can_write("node-1") && !access.can_write("node-2") && !access.can_read());
//! ```
//!
//! - `exp` is required and `nbf` honoured, both with 30 s of leeway for clock skew.
//! - A token is checked only against the keys of its header's `alg`: an HS256 token
//!   is never checked with a public key as its secret (the "alg confusion" attack),
//!   and `none` is no algorithm at all.
//! - `scope` is space-separated: `presence:read` (list, get, watch), `presence:write`
//!   (login, heartbeat and logout of the node named by `sub` only), `presence:admin`
//!   (everything, any node). Other scopes are ignored.
//!
//! # Cache of verified tokens
//!
//! A node sends the same token on every heartbeat for the token's lifetime, and
//! checking a signature costs microseconds, so the verifier keeps what it learnt from
//! the tokens it accepted (as API gateways do, e.g. Envoy's `jwt_cache_config`):
//!
//! - The key is the token's hash under `ahash`'s keyed hasher, with keys drawn once
//!   per verifier, so a client cannot choose tokens that collide; on a hit the stored
//!   token is compared with the presented one in constant time, so a collision is just
//!   a miss. (`ahash` rather than std's SipHash: a 150-byte token took SipHash about
//!   480 instructions of every request, a quarter of what a JWT added to a heartbeat.)
//! - A token is looked up as the header's bytes; only a token the cache does not hold
//!   is checked for UTF-8 on its way to the full check.
//! - `exp` and `nbf` are checked again on every hit, against the current time with
//!   the same leeway and rule as the full check: a cached token stops working exactly
//!   when it would fail a full check.
//! - Only accepted tokens are stored: a bad token is verified in full, and refused,
//!   every time, and adds nothing.
//! - At most [`JWT_CACHE_ENTRIES`] tokens, in [`SHARDS`] independently locked shards
//!   (readers share a shard's lock, and different tokens mostly hit different shards).
//!   A full shard first drops its expired tokens, and if that frees nothing, half of
//!   its tokens (chosen by a bit of their random hashes).
//! - The keys never change, so nothing else can make a stored result stale.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Seconds of clock skew allowed on `exp` and `nbf`.
pub const JWT_LEEWAY_SECS: u64 = 30;

/// Verified tokens a [`JwtVerifier`] remembers: one per node of a large fleet
/// (each node heartbeats with its own token), and bounded memory: tokens are
/// typically a few hundred bytes and at most [`MAX_CACHED_TOKEN_LEN`] are stored,
/// so at most a few MB usually and 64 MiB in the worst case. Beyond it, a token
/// just costs a full check.
const JWT_CACHE_ENTRIES: usize = 16_384;

/// Longer tokens are verified in full every time, never stored.
const MAX_CACHED_TOKEN_LEN: usize = 4096;

/// Independently locked parts of the cache (a power of two: the low bits of a
/// token's hash pick its shard).
const SHARDS: usize = 16;

/// What a request's credentials allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Everything: no authentication configured, or the static
    /// `PRESENCE_AUTH_TOKEN`.
    Full,
    /// What a JWT's scopes grant.
    Scoped {
        /// `presence:read`.
        read: bool,
        /// `presence:write`: the node the token is for (`sub`). Shared, so that a
        /// token answered from the cache costs a reference count, not a copy.
        write: Option<Arc<str>>,
        /// `presence:admin`.
        admin: bool,
    },
}

impl Access {
    /// May list, get and watch nodes.
    pub fn can_read(&self) -> bool {
        match self {
            Access::Full => true,
            Access::Scoped { read, admin, .. } => *read || *admin,
        }
    }

    /// May log `node` in, heartbeat it and log it out.
    pub fn can_write(&self, node: &str) -> bool {
        match self {
            Access::Full => true,
            Access::Scoped { write, admin, .. } => *admin || write.as_deref() == Some(node),
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    /// Required and checked by `jsonwebtoken` (`None` only if it was not).
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    nbf: Option<u64>,
}

/// Whether a token with these claims is valid at `now`: the rule `jsonwebtoken`
/// applies with [`JWT_LEEWAY_SECS`] (expired when `exp < now - leeway`, not yet valid
/// when `nbf > now + leeway`), for the tokens it accepted before.
fn check_time(exp: u64, nbf: Option<u64>, now: u64) -> Result<(), InvalidToken> {
    if exp.saturating_add(JWT_LEEWAY_SECS) < now {
        return Err(InvalidToken(
            jsonwebtoken::errors::Error::from(ErrorKind::ExpiredSignature).to_string(),
        ));
    }
    if nbf.is_some_and(|nbf| nbf > now.saturating_add(JWT_LEEWAY_SECS)) {
        return Err(InvalidToken(
            jsonwebtoken::errors::Error::from(ErrorKind::ImmatureSignature).to_string(),
        ));
    }
    Ok(())
}

/// Seconds since the Unix epoch, as `jsonwebtoken` reads them.
fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Whether `a == b`, in a time that depends on their lengths only, not on where they
/// differ (lengths are not secret: a token's length is visible on the wire).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    // OR of the XORs of every word (then byte) pair: no early exit, no data-dependent
    // branch; `black_box` on the running OR keeps the optimiser from turning the
    // loop into a `memcmp` that stops at the first difference. (One `black_box` per
    // four words rather than per word: the optimiser cannot see through it either
    // way, and a 150-byte token costs a third of the instructions.)
    let word = |c: &[u8]| u64::from_ne_bytes(c.try_into().unwrap_or_default());
    let mut diff = 0u64;
    let (a_words, b_words) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_rest, b_rest) = (a_words.remainder(), b_words.remainder());
    for (n, (x, y)) in a_words.zip(b_words).enumerate() {
        diff |= word(x) ^ word(y);
        if n % 4 == 3 {
            diff = std::hint::black_box(diff);
        }
    }
    for (x, y) in a_rest.iter().zip(b_rest) {
        diff |= u64::from(x ^ y);
    }
    let diff = std::hint::black_box(diff);
    diff == 0
}

/// The key of the cache is already a keyed hash: hashing it again would be waste.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (keys are `u64`); this is for completeness.
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A token that was verified, and what it allows.
struct Entry {
    token: Box<[u8]>,
    access: Access,
    exp: u64,
    nbf: Option<u64>,
}

#[derive(Default)]
struct Shard {
    map: RwLock<HashMap<u64, Entry, BuildHasherDefault<IdentityHasher>>>,
    /// Hits, for the tests (on the shard's own cache line, which the lock touches
    /// anyway).
    hits: AtomicU64,
    /// Evictions of half the shard so far: picks the hash bit of the next one.
    halvings: AtomicU64,
}

/// The cache of verified tokens (see the [module docs](self)).
struct Cache {
    hasher: ahash::RandomState,
    shards: Box<[Shard]>,
    /// Entries per shard.
    per_shard: usize,
}

impl Cache {
    fn new(capacity: usize) -> Cache {
        Cache {
            hasher: ahash::RandomState::new(),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            per_shard: capacity / SHARDS,
        }
    }

    fn enabled(&self) -> bool {
        self.per_shard > 0
    }

    fn hash(&self, token: &[u8]) -> u64 {
        self.hasher.hash_one(token)
    }

    fn shard(&self, hash: u64) -> &Shard {
        // `SHARDS` is a power of two.
        &self.shards[(hash as usize) & (SHARDS - 1)]
    }

    /// What a stored `token` allows at `now`; `None` if it is not stored.
    fn get(&self, hash: u64, token: &[u8], now: u64) -> Option<Result<Access, InvalidToken>> {
        let shard = self.shard(hash);
        let map = shard.map.read().unwrap_or_else(PoisonError::into_inner);
        let entry = map.get(&hash)?;
        if !constant_time_eq(&entry.token, token) {
            return None;
        }
        shard.hits.fetch_add(1, Ordering::Relaxed);
        Some(check_time(entry.exp, entry.nbf, now).map(|()| entry.access.clone()))
    }

    fn insert(
        &self,
        hash: u64,
        token: &str,
        access: &Access,
        exp: u64,
        nbf: Option<u64>,
        now: u64,
    ) {
        if token.len() > MAX_CACHED_TOKEN_LEN {
            return;
        }
        let shard = self.shard(hash);
        let mut map = shard.map.write().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= self.per_shard && !map.contains_key(&hash) {
            map.retain(|_, e| check_time(e.exp, e.nbf, now).is_ok());
            if map.len() >= self.per_shard {
                // Half of them, by one bit of their random hashes: the bits above
                // the shard's, a different one each time.
                let bit = 32 + shard.halvings.fetch_add(1, Ordering::Relaxed) % 32;
                map.retain(|h, _| h & (1 << bit) == 0);
                if map.len() >= self.per_shard {
                    map.clear();
                }
            }
        }
        map.insert(
            hash,
            Entry {
                token: token.as_bytes().into(),
                access: access.clone(),
                exp,
                nbf,
            },
        );
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.map.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    fn hits(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.hits.load(Ordering::Relaxed))
            .sum()
    }
}

/// One key and the validation for tokens signed with it.
struct Key {
    key: DecodingKey,
    validation: Validation,
}

/// Checks JWTs against the configured keys (see the [module docs](self)).
pub struct JwtVerifier {
    keys: Vec<Key>,
    cache: Cache,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let algorithms: Vec<_> = self
            .keys
            .iter()
            .map(|k| k.validation.algorithms[0])
            .collect();
        f.debug_struct("JwtVerifier")
            .field("algorithms", &algorithms)
            .field("cache_capacity", &self.cache_capacity())
            .finish_non_exhaustive()
    }
}

/// Why a token was refused (for the log; the client only learns `401`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidToken(pub String);

impl fmt::Display for InvalidToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidToken {}

impl JwtVerifier {
    /// A verifier for HS256 tokens signed with `secret` and/or tokens signed with the
    /// private half of `public_pem` (a PEM public key: Ed25519 for `EdDSA`, or RSA for
    /// `RS256`).
    ///
    /// # Errors
    /// An empty secret, or a PEM that is neither an Ed25519 nor an RSA public key.
    pub fn new(secret: Option<&[u8]>, public_pem: Option<&[u8]>) -> Result<JwtVerifier, String> {
        let mut keys = Vec::new();
        if let Some(secret) = secret {
            if secret.is_empty() {
                return Err("the secret must not be empty".to_owned());
            }
            let key = DecodingKey::from_secret(secret).map_err(|e| e.to_string())?;
            keys.push(Key {
                key,
                validation: validation(Algorithm::HS256),
            });
        }
        if let Some(pem) = public_pem {
            let key = if let Ok(key) = DecodingKey::from_ed_pem(pem) {
                Key {
                    key,
                    validation: validation(Algorithm::EdDSA),
                }
            } else if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
                Key {
                    key,
                    validation: validation(Algorithm::RS256),
                }
            } else {
                return Err(
                    "not a PEM public key of a supported type (Ed25519 for EdDSA, RSA for RS256)"
                        .to_owned(),
                );
            };
            keys.push(key);
        }
        Ok(JwtVerifier {
            keys,
            cache: Cache::new(JWT_CACHE_ENTRIES),
        })
    }

    /// The same verifier remembering at most about `entries` verified tokens (rounded
    /// down to a multiple of the shard count; `0` disables the cache). For tests and
    /// benchmarks.
    #[doc(hidden)]
    #[must_use]
    pub fn with_cache_capacity(mut self, entries: usize) -> JwtVerifier {
        self.cache = Cache::new(entries);
        self
    }

    /// How many verified tokens the cache may hold.
    #[doc(hidden)]
    pub fn cache_capacity(&self) -> usize {
        self.cache.per_shard * SHARDS
    }

    /// How many verified tokens the cache holds now.
    #[doc(hidden)]
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// How many checks the cache has answered.
    #[doc(hidden)]
    pub fn cache_hits(&self) -> u64 {
        self.cache.hits()
    }

    /// Whether any key is configured.
    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// What `token` allows.
    ///
    /// # Errors
    /// The token is malformed, expired, not yet valid, signed with an algorithm no
    /// key is for, or its signature does not match.
    pub fn verify(&self, token: &str) -> Result<Access, InvalidToken> {
        self.verify_at(token, now_secs())
    }

    /// [`verify`](Self::verify) of a token as it came in a header: the cache is asked
    /// first, and only a token it does not hold must be UTF-8.
    pub(crate) fn verify_bytes(&self, token: &[u8]) -> Result<Access, InvalidToken> {
        self.verify_bytes_at(token, now_secs())
    }

    /// [`verify`](Self::verify), with `exp` and `nbf` of cached tokens, and of the
    /// token just verified, checked at `now` (seconds since the Unix epoch); the full
    /// check also uses the system clock. For tests.
    #[doc(hidden)]
    pub fn verify_at(&self, token: &str, now: u64) -> Result<Access, InvalidToken> {
        self.verify_bytes_at(token.as_bytes(), now)
    }

    fn verify_bytes_at(&self, token: &[u8], now: u64) -> Result<Access, InvalidToken> {
        let utf8 =
            |token| std::str::from_utf8(token).map_err(|_| InvalidToken("not UTF-8".to_owned()));
        if !self.cache.enabled() {
            return self.verify_uncached(utf8(token)?, now);
        }
        let hash = self.cache.hash(token);
        if let Some(result) = self.cache.get(hash, token, now) {
            return result;
        }
        let token = utf8(token)?;
        let (access, exp, nbf) = self.verify_full(token)?;
        check_time(exp, nbf, now)?;
        self.cache.insert(hash, token, &access, exp, nbf, now);
        Ok(access)
    }

    fn verify_uncached(&self, token: &str, now: u64) -> Result<Access, InvalidToken> {
        let (access, exp, nbf) = self.verify_full(token)?;
        check_time(exp, nbf, now)?;
        Ok(access)
    }

    /// The signature and claims of `token`: what it allows, its `exp` and `nbf`.
    fn verify_full(&self, token: &str) -> Result<(Access, u64, Option<u64>), InvalidToken> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| InvalidToken(format!("malformed token: {e}")))?;
        let key = self
            .keys
            .iter()
            .find(|k| k.validation.algorithms.contains(&header.alg))
            .ok_or_else(|| InvalidToken(format!("no key for algorithm {:?}", header.alg)))?;
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map_err(|e| InvalidToken(e.to_string()))?;
        let mut read = false;
        let mut write = false;
        let mut admin = false;
        for scope in data
            .claims
            .scope
            .as_deref()
            .unwrap_or("")
            .split_ascii_whitespace()
        {
            match scope {
                "presence:read" => read = true,
                "presence:write" => write = true,
                "presence:admin" => admin = true,
                _ => {}
            }
        }
        // `exp` is required by the validation: its absence is a bug, refused.
        let exp = data
            .claims
            .exp
            .ok_or_else(|| InvalidToken("missing exp".to_owned()))?;
        let access = Access::Scoped {
            read,
            write: data.claims.sub.filter(|_| write).map(Arc::from),
            admin,
        };
        Ok((access, exp, data.claims.nbf))
    }
}

fn validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = JWT_LEEWAY_SECS;
    v.validate_nbf = true;
    // Tokens for this API carry no audience.
    v.validate_aud = false;
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(node: &str) -> Access {
        Access::Scoped {
            read: false,
            write: Some(node.into()),
            admin: false,
        }
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"xbc"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        // Every byte of a token-sized input, in the words and in the rest.
        let a: Vec<u8> = (0..151u8).collect();
        assert!(constant_time_eq(&a, &a.clone()));
        for at in 0..a.len() {
            let mut b = a.clone();
            b[at] ^= 0x20;
            assert!(!constant_time_eq(&a, &b), "byte {at}");
        }
    }

    #[test]
    fn a_colliding_hash_is_a_miss() {
        let cache = Cache::new(64);
        cache.insert(7, "token-a", &write("a"), u64::MAX / 2, None, 0);
        assert_eq!(cache.get(7, b"token-a", 0), Some(Ok(write("a"))));
        assert_eq!(cache.get(7, b"token-b", 0), None);
        // The one verified last takes the slot.
        cache.insert(7, "token-b", &write("b"), u64::MAX / 2, None, 0);
        assert_eq!(cache.get(7, b"token-a", 0), None);
        assert_eq!(cache.get(7, b"token-b", 0), Some(Ok(write("b"))));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_full_shard_drops_expired_tokens_first() {
        let cache = Cache::new(SHARDS * 4);
        // Shard 0 only: hashes that are multiples of `SHARDS`.
        let hash = |i: u64| (i << 32) * SHARDS as u64;
        for i in 0..3 {
            cache.insert(hash(i), &format!("old-{i}"), &write("a"), 100, None, 0);
        }
        cache.insert(hash(3), "live", &write("b"), 10_000, None, 0);
        assert_eq!(cache.len(), 4);
        // Full: the three expired at 1000 go, the live one stays.
        cache.insert(hash(4), "new", &write("c"), 10_000, None, 1000);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(hash(3), b"live", 1000).is_some());
        // Full of live tokens: about half go, never more than the bound stays.
        for i in 5..100 {
            cache.insert(hash(i), &format!("t-{i}"), &write("d"), 10_000, None, 1000);
            assert!(cache.shards[0].map.read().unwrap().len() <= 4);
        }
        assert!(cache.get(hash(99), b"t-99", 1000).is_some());
    }

    #[test]
    fn the_time_rule_is_jsonwebtokens() {
        let l = JWT_LEEWAY_SECS;
        assert!(check_time(1000, None, 1000 + l).is_ok());
        assert!(check_time(1000, None, 1000 + l + 1).is_err());
        assert!(check_time(1000, Some(500), 500 - l).is_ok());
        assert!(check_time(1000, Some(500), 500 - l - 1).is_err());
    }
}
