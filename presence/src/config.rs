//! Server configuration from the environment (the README's Configuration section).
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `PRESENCE_REDIS_URI` | unset = in-memory store | `redis://...`, `rediss://...` or `memory://` |
//! | `PRESENCE_KEY_PREFIX` | `presence` | Redis key namespace (one deployment per prefix) |
//! | `PRESENCE_HTTP_HOST` | `0.0.0.0` | bind address (an IP address or a host name) |
//! | `PRESENCE_HTTP_PORT` | `8080` | server port (`0` = pick a free port) |
//! | `PRESENCE_HEARTBEAT_SEC` | `3` | advised heartbeat interval |
//! | `PRESENCE_TTL_SEC` | 3 x heartbeat | how long a node stays online without a heartbeat |
//! | `PRESENCE_RATE_LIMIT_RATE` | `30` | per-client refill, requests/s (fractions allowed) |
//! | `PRESENCE_RATE_LIMIT_CAPACITY` | `60` | per-client burst |
//! | `PRESENCE_RATE_LIMIT_SCOPE` | `server` | `server`: each server has its own buckets; `shared`: every server draws a client's tokens from one bucket in Redis (needs a Redis store), falling back to its own buckets when Redis does not answer within `PRESENCE_STORE_TIMEOUT_MS` |
//! | `PRESENCE_TRUSTED_PROXIES` | empty | comma-separated CIDRs whose `X-Forwarded-For` or `Forwarded` is believed (a request carrying both is keyed by its peer) |
//! | `PRESENCE_AUTH_TOKEN` | unset | if set, `/presence*` requires `Authorization: Bearer <token>` |
//! | `PRESENCE_JWT_SECRET` | unset | accept HS256 JWTs signed with this secret (scoped access, see the README) |
//! | `PRESENCE_JWT_PUBLIC_KEY_FILE` | unset | accept JWTs signed by this PEM public key's private half (Ed25519: EdDSA; RSA: RS256) |
//! | `PRESENCE_STORE_TIMEOUT_MS` | `1000` | a store call slower than this is a `503` |
//! | `PRESENCE_MAX_META_BYTES` | `4096` | meta size limit (serialized JSON) |
//! | `PRESENCE_HEADER_TIMEOUT_MS` | `5000` | request headers must arrive within this, and a connection without a request in flight for this long is closed (HTTP/1 and HTTP/2; slowloris guard) |
//! | `PRESENCE_REQUEST_TIMEOUT_MS` | `10000` | a request body must have arrived within this (`408` otherwise); the store call after it is bounded by `PRESENCE_STORE_TIMEOUT_MS` |
//! | `PRESENCE_SHUTDOWN_GRACE_MS` | `10000` | on SIGTERM/Ctrl-C, in-flight requests get this long to finish |
//! | `PRESENCE_WRITE_STALL_TIMEOUT_MS` | `30000` | a connection whose client has not taken any response bytes for this long, while a response waits to be written, is closed (a reader that keeps reading is never cut) |
//! | `PRESENCE_MAX_HEADER_BYTES` | `65536` | largest request head (HTTP/1) or header list (HTTP/2); at least 8192 |
//! | `PRESENCE_MAX_STREAMS_PER_CONNECTION` | `100` | concurrent HTTP/2 streams per connection |
//! | `PRESENCE_CORS_ORIGINS` | empty | comma-separated origins (`https://ops.example.com`) whose browser pages may call the API, or `*` for any; empty allows none |
//! | `PRESENCE_MAX_CONNECTIONS` | `10000` | open client connections; further ones wait in the listen backlog until one closes |
//! | `PRESENCE_WATCH_RETENTION_SEC` | `300` | how long the change feed keeps changes for watchers that resume; an older cursor gets a snapshot |
//! | `PRESENCE_WATCH_KEEPALIVE_SEC` | `15` | a `: keep-alive` comment on every watch stream this often |
//! | `PRESENCE_MAX_WATCHERS` | `10000` | open watch streams per server; past it `503 too_many_watchers` |
//! | `PRESENCE_WATCH_BACKLOG` | `1024` | changes waiting for one watcher at most; one that falls further behind is disconnected (it resumes from its cursor) |
//! | `PRESENCE_TLS_CERT_FILE` | unset | PEM certificate chain (the server's own first): with `PRESENCE_TLS_KEY_FILE`, the server speaks HTTPS only (HTTP/2 and HTTP/1.1 by ALPN) |
//! | `PRESENCE_TLS_KEY_FILE` | unset | PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1); set both or neither |
//! | `PRESENCE_REDIS_CA_FILE` | unset = system roots | PEM CA certificate(s) that a `rediss://` Redis's certificate must chain to, instead of the system's roots |
//!
//! `PRESENCE_HEADER_TIMEOUT_MS` and the variables after it bound how long (and how
//! much) a slow or malicious client can hold a connection, and how long a shutdown
//! may take.
//!
//! `NODE_ID` is read by the client, not by the server, and is ignored here.
//!
//! Rules: numbers must parse and be positive (the port may be `0`), durations at most
//! one year; the store URI must have a known scheme. A variable set to the empty
//! string counts as unset, except `PRESENCE_AUTH_TOKEN`: an empty token is an error,
//! because a `$SECRET` that expanded to nothing must not silently switch
//! authentication off.
//!
//! Tests use [`Config::from_lookup`] with a closure so they never touch the process
//! environment.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use resilience::{Burst, Rate, TokenBucket};

use crate::store::redact_uri;

/// Environment variable: the store URI.
pub const ENV_REDIS_URI: &str = "PRESENCE_REDIS_URI";
/// Environment variable: the Redis key prefix.
pub const ENV_KEY_PREFIX: &str = "PRESENCE_KEY_PREFIX";
/// Environment variable: the bind host.
pub const ENV_HTTP_HOST: &str = "PRESENCE_HTTP_HOST";
/// Environment variable: the bind port.
pub const ENV_HTTP_PORT: &str = "PRESENCE_HTTP_PORT";
/// Environment variable: the advised heartbeat interval in seconds.
pub const ENV_HEARTBEAT_SEC: &str = "PRESENCE_HEARTBEAT_SEC";
/// Environment variable: the node TTL in seconds.
pub const ENV_TTL_SEC: &str = "PRESENCE_TTL_SEC";
/// Environment variable: the per-client token refill rate (requests/s).
pub const ENV_RATE_LIMIT_RATE: &str = "PRESENCE_RATE_LIMIT_RATE";
/// Environment variable: the per-client burst.
pub const ENV_RATE_LIMIT_CAPACITY: &str = "PRESENCE_RATE_LIMIT_CAPACITY";
/// Environment variable: whose buckets the rate limit draws from (see [`RateLimitScope`]).
pub const ENV_RATE_LIMIT_SCOPE: &str = "PRESENCE_RATE_LIMIT_SCOPE";
/// Environment variable: the trusted proxy CIDRs (comma-separated).
pub const ENV_TRUSTED_PROXIES: &str = "PRESENCE_TRUSTED_PROXIES";
/// Environment variable: the bearer token.
pub const ENV_AUTH_TOKEN: &str = "PRESENCE_AUTH_TOKEN";
/// Environment variable: the HS256 JWT secret.
pub const ENV_JWT_SECRET: &str = "PRESENCE_JWT_SECRET";
/// Environment variable: the PEM file of the JWT public key.
pub const ENV_JWT_PUBLIC_KEY_FILE: &str = "PRESENCE_JWT_PUBLIC_KEY_FILE";
/// Environment variable: the store call timeout in milliseconds.
pub const ENV_STORE_TIMEOUT_MS: &str = "PRESENCE_STORE_TIMEOUT_MS";
/// Environment variable: the meta size limit in bytes.
pub const ENV_MAX_META_BYTES: &str = "PRESENCE_MAX_META_BYTES";
/// Environment variable: the HTTP/1 header read timeout in milliseconds.
pub const ENV_HEADER_TIMEOUT_MS: &str = "PRESENCE_HEADER_TIMEOUT_MS";
/// Environment variable: the per-request timeout in milliseconds.
pub const ENV_REQUEST_TIMEOUT_MS: &str = "PRESENCE_REQUEST_TIMEOUT_MS";
/// Environment variable: the graceful shutdown budget in milliseconds.
pub const ENV_SHUTDOWN_GRACE_MS: &str = "PRESENCE_SHUTDOWN_GRACE_MS";
/// Environment variable: how long a response may wait for the client to read, in ms.
pub const ENV_WRITE_STALL_TIMEOUT_MS: &str = "PRESENCE_WRITE_STALL_TIMEOUT_MS";
/// Environment variable: the largest request head / header list in bytes.
pub const ENV_MAX_HEADER_BYTES: &str = "PRESENCE_MAX_HEADER_BYTES";
/// Environment variable: concurrent HTTP/2 streams per connection.
pub const ENV_MAX_STREAMS_PER_CONNECTION: &str = "PRESENCE_MAX_STREAMS_PER_CONNECTION";
/// Environment variable: the origins allowed by CORS (comma-separated, or `*`).
pub const ENV_CORS_ORIGINS: &str = "PRESENCE_CORS_ORIGINS";
/// Environment variable: open client connections at most.
pub const ENV_MAX_CONNECTIONS: &str = "PRESENCE_MAX_CONNECTIONS";
/// Environment variable: the change feed's retention in seconds.
pub const ENV_WATCH_RETENTION_SEC: &str = "PRESENCE_WATCH_RETENTION_SEC";
/// Environment variable: the watch keep-alive interval in seconds.
pub const ENV_WATCH_KEEPALIVE_SEC: &str = "PRESENCE_WATCH_KEEPALIVE_SEC";
/// Environment variable: open watch streams per server at most.
pub const ENV_MAX_WATCHERS: &str = "PRESENCE_MAX_WATCHERS";
/// Environment variable: changes waiting for one watcher at most.
pub const ENV_WATCH_BACKLOG: &str = "PRESENCE_WATCH_BACKLOG";

/// Environment variable: the PEM certificate chain of HTTPS.
pub const ENV_TLS_CERT_FILE: &str = "PRESENCE_TLS_CERT_FILE";
/// Environment variable: the PEM private key of HTTPS.
pub const ENV_TLS_KEY_FILE: &str = "PRESENCE_TLS_KEY_FILE";
/// Environment variable: the PEM CA certificate(s) of a `rediss://` Redis.
pub const ENV_REDIS_CA_FILE: &str = "PRESENCE_REDIS_CA_FILE";
/// Environment variable: a standalone Redis or a Redis Cluster (see [`RedisMode`]).
pub const ENV_REDIS_MODE: &str = "PRESENCE_REDIS_MODE";
/// Environment variable: how many shards a deployment's keys are spread over.
pub const ENV_SHARDS: &str = "PRESENCE_SHARDS";

/// What `PRESENCE_REDIS_URI` names (`PRESENCE_REDIS_MODE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RedisMode {
    /// One Redis, or a replicated primary (`standalone`, the default).
    #[default]
    Standalone,
    /// A Redis Cluster, by comma-separated seed nodes (`cluster`).
    Cluster,
}

/// The smallest accepted `PRESENCE_MAX_HEADER_BYTES`: hyper's HTTP/1 read buffer
/// cannot be smaller.
pub const MIN_HEADER_BYTES: usize = 8192;

/// URI schemes accepted in `PRESENCE_REDIS_URI`.
pub const STORE_SCHEMES: [&str; 3] = ["redis://", "rediss://", "memory://"];

/// Whose token buckets the per-client rate limit draws from
/// (`PRESENCE_RATE_LIMIT_SCOPE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RateLimitScope {
    /// Each server its own (`server`, the default): behind a balancer that spreads a
    /// client over N servers, it gets up to N times its limit.
    #[default]
    Server,
    /// One bucket per client in the Redis store, for every server of the deployment
    /// (`shared`): one round trip per request; when Redis does not answer within
    /// the store timeout the server decides with its own buckets, and
    /// `presence_rate_limit_fallbacks_total` and a log line say so.
    Shared,
}

/// The presence server's configuration. Build it with [`Config::from_env`],
/// [`Config::from_lookup`] or [`Config::default`] (the documented defaults) and adjust
/// the public fields.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// `PRESENCE_REDIS_URI`: `None` means the in-memory store. When set it starts with
    /// one of [`STORE_SCHEMES`].
    pub store_uri: Option<String>,
    /// `PRESENCE_KEY_PREFIX`: the Redis key namespace.
    pub key_prefix: String,
    /// `PRESENCE_HTTP_HOST`: IP address or host name to bind (IPv6 without brackets).
    pub http_host: String,
    /// `PRESENCE_HTTP_PORT`: `0` picks a free port.
    pub http_port: u16,
    /// `PRESENCE_HEARTBEAT_SEC`: advised heartbeat interval, returned by login.
    pub heartbeat: Duration,
    /// `PRESENCE_TTL_SEC`: how long a node stays online without a heartbeat.
    pub ttl: Duration,
    /// `PRESENCE_RATE_LIMIT_RATE`: per-client refill in requests per second.
    pub rate_limit_rate: f64,
    /// `PRESENCE_RATE_LIMIT_CAPACITY`: per-client burst.
    pub rate_limit_capacity: u32,
    /// `PRESENCE_RATE_LIMIT_SCOPE`: each server's own buckets, or one set shared
    /// through Redis.
    pub rate_limit_scope: RateLimitScope,
    /// `PRESENCE_TRUSTED_PROXIES`: peers whose `X-Forwarded-For` / `Forwarded` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// `PRESENCE_AUTH_TOKEN`: if set, `/presence*` requires this bearer token.
    pub auth_token: Option<String>,
    /// `PRESENCE_JWT_SECRET`: HS256 JWTs signed with it are accepted.
    pub jwt_secret: Option<String>,
    /// `PRESENCE_JWT_PUBLIC_KEY_FILE`, read: the PEM of the public key JWTs may be
    /// signed for (Ed25519 or RSA), and the file it came from.
    pub jwt_public_key: Option<(std::path::PathBuf, Vec<u8>)>,
    /// `PRESENCE_STORE_TIMEOUT_MS`: a store call slower than this is a `503`.
    pub store_timeout: Duration,
    /// `PRESENCE_MAX_META_BYTES`: the largest accepted `meta`, serialized.
    pub max_meta_bytes: usize,
    /// `PRESENCE_HEADER_TIMEOUT_MS`: a connection (HTTP/1 or HTTP/2) with no request
    /// in flight for this long is closed, so request headers must arrive within it.
    pub header_timeout: Duration,
    /// `PRESENCE_REQUEST_TIMEOUT_MS`: a request body must have arrived within this
    /// (`408`); what follows is bounded by [`store_timeout`](Self::store_timeout).
    pub request_timeout: Duration,
    /// `PRESENCE_SHUTDOWN_GRACE_MS`: how long in-flight requests may take after a
    /// shutdown signal.
    pub shutdown_grace: Duration,
    /// `PRESENCE_WRITE_STALL_TIMEOUT_MS`: a connection whose client takes no response
    /// bytes for this long, while a response is waiting to be written, is closed.
    pub write_stall_timeout: Duration,
    /// `PRESENCE_MAX_HEADER_BYTES`: the largest request head (HTTP/1) or header list
    /// (HTTP/2); at least [`MIN_HEADER_BYTES`].
    pub max_header_bytes: usize,
    /// `PRESENCE_MAX_STREAMS_PER_CONNECTION`: concurrent HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// `PRESENCE_CORS_ORIGINS`: origins (`scheme://host[:port]`, or `*` for any) whose
    /// browser pages may call the API; empty allows none (no CORS headers at all).
    pub cors_origins: Vec<String>,
    /// `PRESENCE_MAX_CONNECTIONS`: open client connections at most; past it, new
    /// connections wait in the listen backlog while the open ones are served.
    pub max_connections: usize,
    /// `PRESENCE_WATCH_RETENTION_SEC`: how long the change feed keeps changes for
    /// watchers that resume.
    pub watch_retention: Duration,
    /// `PRESENCE_WATCH_KEEPALIVE_SEC`: how often a watch stream gets a keep-alive
    /// comment.
    pub watch_keepalive: Duration,
    /// `PRESENCE_MAX_WATCHERS`: open watch streams at most.
    pub max_watchers: usize,
    /// `PRESENCE_WATCH_BACKLOG`: changes waiting for one watcher at most.
    pub watch_backlog: usize,
    /// `PRESENCE_TLS_CERT_FILE` and `PRESENCE_TLS_KEY_FILE`, read: `Some` makes the
    /// server speak HTTPS.
    pub tls: Option<TlsFiles>,
    /// `PRESENCE_REDIS_CA_FILE`, read: the file and its PEM, the only roots a
    /// `rediss://` Redis is verified against (`None`: the system's roots).
    pub redis_ca: Option<(std::path::PathBuf, Vec<u8>)>,
    /// `PRESENCE_REDIS_MODE`: a standalone Redis or a cluster.
    pub redis_mode: RedisMode,
    /// `PRESENCE_SHARDS`: how many shards the deployment's keys are spread over (1
    /// to 1024; a deployment keeps the count it was created with).
    pub shards: usize,
}

/// The certificate chain and private key of HTTPS, as read from their files
/// (checked by [`Config::from_lookup`] to make a working configuration).
#[derive(Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `PRESENCE_TLS_CERT_FILE`.
    pub cert_file: std::path::PathBuf,
    /// Its PEM: the server's certificate first, then any intermediates.
    pub cert_pem: Vec<u8>,
    /// `PRESENCE_TLS_KEY_FILE`.
    pub key_file: std::path::PathBuf,
    /// Its PEM.
    pub key_pem: Vec<u8>,
}

impl fmt::Debug for TlsFiles {
    // The key's PEM is a secret: only the paths are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFiles")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl Default for Config {
    /// The documented defaults (in-memory store, `0.0.0.0:8080`, ...).
    fn default() -> Self {
        Config {
            store_uri: None,
            key_prefix: "presence".to_owned(),
            http_host: "0.0.0.0".to_owned(),
            http_port: 8080,
            heartbeat: Duration::from_secs(3),
            ttl: Duration::from_secs(9),
            rate_limit_rate: 30.0,
            rate_limit_capacity: 60,
            rate_limit_scope: RateLimitScope::Server,
            trusted_proxies: Vec::new(),
            auth_token: None,
            jwt_secret: None,
            jwt_public_key: None,
            store_timeout: Duration::from_millis(1000),
            max_meta_bytes: 4096,
            header_timeout: Duration::from_millis(5000),
            request_timeout: Duration::from_millis(10_000),
            shutdown_grace: Duration::from_millis(10_000),
            write_stall_timeout: Duration::from_millis(30_000),
            max_header_bytes: 64 * 1024,
            max_streams_per_connection: 100,
            max_connections: 10_000,
            cors_origins: Vec::new(),
            watch_retention: Duration::from_secs(300),
            watch_keepalive: Duration::from_secs(15),
            max_watchers: 10_000,
            watch_backlog: 1024,
            tls: None,
            redis_ca: None,
            redis_mode: RedisMode::Standalone,
            shards: 1,
        }
    }
}

impl fmt::Debug for Config {
    // Hand-written so the auth token and a Redis password never end up in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("store_uri", &self.store_uri.as_deref().map(redact_uri))
            .field("key_prefix", &self.key_prefix)
            .field("http_host", &self.http_host)
            .field("http_port", &self.http_port)
            .field("heartbeat", &self.heartbeat)
            .field("ttl", &self.ttl)
            .field("rate_limit_rate", &self.rate_limit_rate)
            .field("rate_limit_capacity", &self.rate_limit_capacity)
            .field("rate_limit_scope", &self.rate_limit_scope)
            .field("trusted_proxies", &self.trusted_proxies)
            .field(
                "auth_token",
                &self.auth_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "jwt_public_key_file",
                &self.jwt_public_key.as_ref().map(|(path, _)| path),
            )
            .field("store_timeout", &self.store_timeout)
            .field("max_meta_bytes", &self.max_meta_bytes)
            .field("header_timeout", &self.header_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("write_stall_timeout", &self.write_stall_timeout)
            .field("max_header_bytes", &self.max_header_bytes)
            .field(
                "max_streams_per_connection",
                &self.max_streams_per_connection,
            )
            .field("max_connections", &self.max_connections)
            .field("cors_origins", &self.cors_origins)
            .field("watch_retention", &self.watch_retention)
            .field("watch_keepalive", &self.watch_keepalive)
            .field("max_watchers", &self.max_watchers)
            .field("watch_backlog", &self.watch_backlog)
            .field("redis_mode", &self.redis_mode)
            .field("shards", &self.shards)
            .field("tls", &self.tls)
            .field(
                "redis_ca_file",
                &self.redis_ca.as_ref().map(|(path, _)| path),
            )
            .finish()
    }
}

/// A bad configuration value: which variable, what it held, and why it is wrong.
///
/// Displays as one line, e.g. `PRESENCE_TTL_SEC="abc": not a positive integer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The environment variable, e.g. `PRESENCE_TTL_SEC`.
    pub var: &'static str,
    /// Its value, secrets redacted: the auth token is never shown, URI credentials
    /// are replaced by `***`.
    pub value: String,
    /// Why the value was rejected.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:?}: {}", self.var, self.value, self.reason)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads the configuration from the process environment.
    ///
    /// # Errors
    /// The first variable with a bad value (see the module docs for the rules).
    pub fn from_env() -> Result<Config, ConfigError> {
        // A variable that is not valid Unicode cannot be any accepted value; passing
        // it on lossily makes the error name it instead of pretending it is unset.
        Config::from_lookup(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// Reads the configuration through `lookup` (variable name -> value), so tests can
    /// supply a map instead of mutating the process environment.
    ///
    /// ```
    /// use presence::config::Config;
    /// let cfg = Config::from_lookup(|name| match name {
    ///     "PRESENCE_HEARTBEAT_SEC" => Some("5".to_owned()),
    ///     _ => None,
    /// })
    /// .unwrap();
    /// assert_eq!(cfg.ttl.as_secs(), 15); // 3 x heartbeat
    /// ```
    ///
    /// # Errors
    /// The first variable with a bad value.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |var: &'static str| lookup(var).filter(|v| !v.is_empty());
        let d = Config::default();
        let heartbeat = value(&get, ENV_HEARTBEAT_SEC, d.heartbeat, duration_secs)?;
        let (rate_limit_rate, rate_limit_capacity) = rate_limit(&get, &d)?;
        let trusted_proxies = match get(ENV_TRUSTED_PROXIES) {
            Some(v) => parse_cidrs(&v)?,
            None => d.trusted_proxies,
        };
        let auth_token = match lookup(ENV_AUTH_TOKEN) {
            Some(v) => Some(parse_token(v)?),
            None => None,
        };
        let jwt_secret = lookup(ENV_JWT_SECRET);
        if jwt_secret.as_deref() == Some("") {
            return Err(err(
                ENV_JWT_SECRET,
                "",
                "must not be empty (unset the variable to accept no HS256 tokens)",
            ));
        }
        let jwt_public_key = match get(ENV_JWT_PUBLIC_KEY_FILE) {
            Some(path) => {
                let pem = std::fs::read(&path).map_err(|e| {
                    err(
                        ENV_JWT_PUBLIC_KEY_FILE,
                        &path,
                        format!("cannot read it: {e}"),
                    )
                })?;
                crate::server::JwtVerifier::new(None, Some(&pem))
                    .map_err(|why| err(ENV_JWT_PUBLIC_KEY_FILE, &path, why))?;
                Some((std::path::PathBuf::from(path), pem))
            }
            None => None,
        };
        let store_uri = get(ENV_REDIS_URI)
            .map(|v| parse_store_uri(&v))
            .transpose()?;
        let rate_limit_scope = match get(ENV_RATE_LIMIT_SCOPE) {
            Some(v) => parse_scope(&v, store_uri.as_deref())?,
            None => d.rate_limit_scope,
        };
        let redis_mode = match get(ENV_REDIS_MODE) {
            Some(v) => parse_mode(&v, store_uri.as_deref())?,
            None => d.redis_mode,
        };
        let tls = tls_files(&get)?;
        let redis_ca = match get(ENV_REDIS_CA_FILE) {
            Some(path) => {
                let pem = read_file(ENV_REDIS_CA_FILE, &path)?;
                crate::tls::roots(Some(&pem), false)
                    .map_err(|why| err(ENV_REDIS_CA_FILE, &path, why))?;
                Some((std::path::PathBuf::from(path), pem))
            }
            None => None,
        };
        Ok(Config {
            store_uri,
            key_prefix: value(&get, ENV_KEY_PREFIX, d.key_prefix, |_, v| parse_prefix(v))?,
            http_host: value(&get, ENV_HTTP_HOST, d.http_host, |_, v| parse_host(v))?,
            http_port: value(&get, ENV_HTTP_PORT, d.http_port, |var, v| {
                v.trim()
                    .parse::<u16>()
                    .map_err(|_| err(var, v, "not a port number (0-65535)"))
            })?,
            heartbeat,
            ttl: value(
                &get,
                ENV_TTL_SEC,
                heartbeat.saturating_mul(3),
                duration_secs,
            )?,
            rate_limit_rate,
            rate_limit_capacity,
            rate_limit_scope,
            trusted_proxies,
            auth_token,
            jwt_secret,
            jwt_public_key,
            store_timeout: value(&get, ENV_STORE_TIMEOUT_MS, d.store_timeout, millis)?,
            max_meta_bytes: value(&get, ENV_MAX_META_BYTES, d.max_meta_bytes, count)?,
            header_timeout: value(&get, ENV_HEADER_TIMEOUT_MS, d.header_timeout, millis)?,
            request_timeout: value(&get, ENV_REQUEST_TIMEOUT_MS, d.request_timeout, millis)?,
            shutdown_grace: value(&get, ENV_SHUTDOWN_GRACE_MS, d.shutdown_grace, millis)?,
            write_stall_timeout: value(
                &get,
                ENV_WRITE_STALL_TIMEOUT_MS,
                d.write_stall_timeout,
                millis,
            )?,
            max_header_bytes: value(&get, ENV_MAX_HEADER_BYTES, d.max_header_bytes, |var, v| {
                match count::<usize>(var, v)? {
                    n if n >= MIN_HEADER_BYTES => Ok(n),
                    _ => Err(err(var, v, format!("must be at least {MIN_HEADER_BYTES}"))),
                }
            })?,
            max_streams_per_connection: value(
                &get,
                ENV_MAX_STREAMS_PER_CONNECTION,
                d.max_streams_per_connection,
                count,
            )?,
            max_connections: value(&get, ENV_MAX_CONNECTIONS, d.max_connections, count)?,
            cors_origins: value(&get, ENV_CORS_ORIGINS, d.cors_origins, parse_origins)?,
            watch_retention: value(
                &get,
                ENV_WATCH_RETENTION_SEC,
                d.watch_retention,
                duration_secs,
            )?,
            watch_keepalive: value(
                &get,
                ENV_WATCH_KEEPALIVE_SEC,
                d.watch_keepalive,
                duration_secs,
            )?,
            max_watchers: value(&get, ENV_MAX_WATCHERS, d.max_watchers, count)?,
            watch_backlog: value(&get, ENV_WATCH_BACKLOG, d.watch_backlog, count)?,
            tls,
            redis_ca,
            redis_mode,
            shards: value(&get, ENV_SHARDS, d.shards, |var, v| {
                match count::<usize>(var, v)? {
                    n if (1..=crate::store::redis::MAX_SHARDS).contains(&n) => Ok(n),
                    _ => Err(err(
                        var,
                        v,
                        format!("must be 1 to {}", crate::store::redis::MAX_SHARDS),
                    )),
                }
            })?,
        })
    }

    /// The store URI with any password replaced by `***`, or `memory://` when unset:
    /// safe to log.
    pub fn store_uri_redacted(&self) -> String {
        match &self.store_uri {
            Some(uri) => redact_uri(uri),
            None => "memory://".to_owned(),
        }
    }
}

/// The contents of the file `path` that `var` names.
fn read_file(var: &'static str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| err(var, path, format!("cannot read it: {e}")))
}

/// `PRESENCE_TLS_CERT_FILE` and `PRESENCE_TLS_KEY_FILE`: both or neither, each
/// readable, together a configuration rustls accepts (the error names the file at
/// fault: a key that does not belong to the certificate is the key's).
fn tls_files(
    get: &impl Fn(&'static str) -> Option<String>,
) -> Result<Option<TlsFiles>, ConfigError> {
    let (cert_file, key_file) = match (get(ENV_TLS_CERT_FILE), get(ENV_TLS_KEY_FILE)) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(cert), None) => {
            return Err(err(
                ENV_TLS_CERT_FILE,
                &cert,
                format!("{ENV_TLS_KEY_FILE} must be set too (HTTPS needs both)"),
            ))
        }
        (None, Some(key)) => {
            return Err(err(
                ENV_TLS_KEY_FILE,
                &key,
                format!("{ENV_TLS_CERT_FILE} must be set too (HTTPS needs both)"),
            ))
        }
    };
    let cert_pem = read_file(ENV_TLS_CERT_FILE, &cert_file)?;
    let key_pem = read_file(ENV_TLS_KEY_FILE, &key_file)?;
    crate::tls::server_config(&cert_pem, &key_pem).map_err(|e| match e {
        crate::tls::TlsError::Certificate(why) => err(ENV_TLS_CERT_FILE, &cert_file, why),
        crate::tls::TlsError::Key(why) => err(ENV_TLS_KEY_FILE, &key_file, why),
    })?;
    Ok(Some(TlsFiles {
        cert_file: cert_file.into(),
        cert_pem,
        key_file: key_file.into(),
        key_pem,
    }))
}

fn err(var: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// The value of `var` read by `parse`, or `default` when it is unset.
fn value<T>(
    get: &impl Fn(&'static str) -> Option<String>,
    var: &'static str,
    default: T,
    parse: impl FnOnce(&'static str, &str) -> Result<T, ConfigError>,
) -> Result<T, ConfigError> {
    match get(var) {
        Some(v) => parse(var, &v),
        None => Ok(default),
    }
}

/// Comma-separated origins: `*`, or each `http(s)://host[:port]` with no path.
fn parse_origins(var: &'static str, v: &str) -> Result<Vec<String>, ConfigError> {
    v.split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(|origin| {
            let host = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            let valid = origin == "*"
                || host.is_some_and(|h| {
                    !h.is_empty() && !h.contains('/') && http::HeaderValue::from_str(origin).is_ok()
                });
            if valid {
                Ok(origin.to_owned())
            } else {
                Err(err(
                    var,
                    v,
                    format!("{origin:?} is not an origin like https://host[:port] (or *)"),
                ))
            }
        })
        .collect()
}

/// A positive integer that fits `T`.
fn count<T: TryFrom<u64>>(var: &'static str, v: &str) -> Result<T, ConfigError> {
    T::try_from(positive_int(var, v)?).map_err(|_| err(var, v, "too large"))
}

/// `PRESENCE_RATE_LIMIT_RATE` and `PRESENCE_RATE_LIMIT_CAPACITY`, which together
/// must make a workable bucket (e.g. not one that takes a century to refill):
/// checked here, so a bad pair is a config error naming a variable, not a panic when
/// the server starts.
fn rate_limit(
    get: &impl Fn(&'static str) -> Option<String>,
    d: &Config,
) -> Result<(f64, u32), ConfigError> {
    let rate_limit_rate = match get(ENV_RATE_LIMIT_RATE) {
        Some(v) => match v.trim().parse::<f64>() {
            Ok(r) if r.is_finite() && r > 0.0 => r,
            _ => return Err(err(ENV_RATE_LIMIT_RATE, &v, "not a positive number")),
        },
        None => d.rate_limit_rate,
    };
    let rate_limit_capacity = match get(ENV_RATE_LIMIT_CAPACITY) {
        Some(v) => u32::try_from(positive_int(ENV_RATE_LIMIT_CAPACITY, &v)?)
            .map_err(|_| err(ENV_RATE_LIMIT_CAPACITY, &v, "too large"))?,
        None => d.rate_limit_capacity,
    };
    // The rate and burst must also make a workable bucket (e.g. not one that takes
    // a century to refill); checked here so a bad value is a config error naming
    // the variable, not a panic when the server starts.
    if let Err(e) = Rate::try_per_second(rate_limit_rate)
        .and_then(|rate| TokenBucket::try_new(rate, Burst(rate_limit_capacity)))
    {
        let (var, value) = match get(ENV_RATE_LIMIT_RATE) {
            Some(v) => (ENV_RATE_LIMIT_RATE, v),
            None => (
                ENV_RATE_LIMIT_CAPACITY,
                get(ENV_RATE_LIMIT_CAPACITY).unwrap_or_default(),
            ),
        };
        return Err(err(var, &value, e.reason()));
    }
    Ok((rate_limit_rate, rate_limit_capacity))
}

fn positive_int(var: &'static str, v: &str) -> Result<u64, ConfigError> {
    match v.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(err(var, v, "not a positive integer")),
    }
}

/// Longest accepted duration. Anything longer is a typo, and keeping times well below
/// 2^53 ms keeps `expires_at_ms` arithmetic far from overflow and exact in JSON
/// consumers that use doubles.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn at_most_a_year(var: &'static str, v: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d > MAX_DURATION {
        Err(err(var, v, "too long (at most one year)"))
    } else {
        Ok(d)
    }
}

fn duration_secs(var: &'static str, v: &str) -> Result<Duration, ConfigError> {
    let d = Duration::from_secs(positive_int(var, v)?);
    at_most_a_year(var, v, d)
}

fn millis(var: &'static str, v: &str) -> Result<Duration, ConfigError> {
    let d = Duration::from_millis(positive_int(var, v)?);
    at_most_a_year(var, v, d)
}

/// `server` or `shared`; `shared` needs a Redis store to share the buckets through.
fn parse_scope(v: &str, store_uri: Option<&str>) -> Result<RateLimitScope, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "server" => Ok(RateLimitScope::Server),
        "shared" if store_uri.is_some_and(|u| !u.to_ascii_lowercase().starts_with("memory://")) => {
            Ok(RateLimitScope::Shared)
        }
        "shared" => Err(err(
            ENV_RATE_LIMIT_SCOPE,
            v,
            format!("needs a Redis store ({ENV_REDIS_URI}): the buckets are shared through it"),
        )),
        _ => Err(err(ENV_RATE_LIMIT_SCOPE, v, "must be `server` or `shared`")),
    }
}

/// `standalone` or `cluster`; `cluster` needs a Redis store URI (its seed nodes).
fn parse_mode(v: &str, store_uri: Option<&str>) -> Result<RedisMode, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "standalone" => Ok(RedisMode::Standalone),
        "cluster"
            if store_uri.is_some_and(|u| !u.to_ascii_lowercase().starts_with("memory://")) =>
        {
            Ok(RedisMode::Cluster)
        }
        "cluster" => Err(err(
            ENV_REDIS_MODE,
            v,
            format!("needs a Redis store ({ENV_REDIS_URI}): the cluster's seed nodes"),
        )),
        _ => Err(err(ENV_REDIS_MODE, v, "must be `standalone` or `cluster`")),
    }
}

fn parse_store_uri(v: &str) -> Result<String, ConfigError> {
    let lower = v.trim().to_ascii_lowercase();
    if STORE_SCHEMES.iter().any(|s| lower.starts_with(s)) {
        Ok(v.trim().to_owned())
    } else {
        Err(err(
            ENV_REDIS_URI,
            &redact_uri(v),
            "unknown scheme; expected redis://, rediss:// or memory://",
        ))
    }
}

fn parse_prefix(v: &str) -> Result<String, ConfigError> {
    // The prefix becomes the Redis hash tag `{prefix}`: braces would break the tag
    // (and with it the one-slot guarantee), whitespace and controls are mistakes.
    if v.chars()
        .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
    {
        Err(err(
            ENV_KEY_PREFIX,
            v,
            "must not contain braces, whitespace or control characters",
        ))
    } else {
        Ok(v.to_owned())
    }
}

fn parse_host(v: &str) -> Result<String, ConfigError> {
    let host = v.trim();
    // `[::1]` is how people write IPv6 in URLs; binding wants it bare.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(host.to_owned());
    }
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid_name {
        Ok(host.to_owned())
    } else {
        Err(err(ENV_HTTP_HOST, v, "not an IP address or host name"))
    }
}

fn parse_cidrs(v: &str) -> Result<Vec<IpNet>, ConfigError> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            parse_cidr(s).map_err(|why| {
                err(
                    ENV_TRUSTED_PROXIES,
                    v,
                    format!(
                        "{s:?} is not a CIDR (like 10.0.0.0/8 or ::1/128) or IP address: {why}"
                    ),
                )
            })
        })
        .collect()
}

/// `10.0.0.0/8`, `2001:db8::/32`, or a bare address as a single host (`/32`, `/128`).
/// A network with bits set past its prefix (`10.0.0.1/8`) is refused: in a trust list
/// it is more likely a typo than a network.
fn parse_cidr(s: &str) -> Result<IpNet, &'static str> {
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    let net = s
        .parse::<IpNet>()
        .map_err(|_| "not an address, or an address/prefix length")?;
    if net.addr() != net.network() {
        return Err("the address has bits set after the prefix length");
    }
    Ok(net)
}

fn parse_token(v: String) -> Result<String, ConfigError> {
    // The token travels in a header as `Bearer <token>`; a space or a control
    // character could never be sent (or compared) faithfully.
    if v.is_empty() {
        return Err(err(
            ENV_AUTH_TOKEN,
            "",
            "must not be empty (unset the variable to disable authentication)",
        ));
    }
    if !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err(
            ENV_AUTH_TOKEN,
            "<redacted>",
            "must be printable ASCII without spaces",
        ));
    }
    Ok(v)
}

impl Config {
    /// The JWT verifier of `PRESENCE_JWT_SECRET` and `PRESENCE_JWT_PUBLIC_KEY_FILE`
    /// (no key: JWTs are not accepted).
    ///
    /// # Errors
    /// A key [`Config::from_lookup`] would have refused (only a hand-edited
    /// `Config` can hold one).
    pub fn jwt_verifier(&self) -> Result<crate::server::JwtVerifier, String> {
        crate::server::JwtVerifier::new(
            self.jwt_secret.as_deref().map(str::as_bytes),
            self.jwt_public_key.as_ref().map(|(_, pem)| pem.as_slice()),
        )
    }

    /// The HTTPS configuration of [`tls`](Self::tls) (`None`: plain HTTP).
    ///
    /// # Errors
    /// Files [`Config::from_lookup`] would have refused (only a hand-edited `Config`
    /// can hold them).
    pub fn tls_server_config(
        &self,
    ) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, crate::tls::TlsError> {
        self.tls
            .as_ref()
            .map(|files| crate::tls::server_config(&files.cert_pem, &files.key_pem).map(Into::into))
            .transpose()
    }
}
