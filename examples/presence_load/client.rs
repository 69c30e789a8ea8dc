//! The generator's HTTP/1.1 client: where requests go ([`Target`], with every request
//! prepared once) and one keep-alive connection per worker ([`Conn`]).
//!
//! A client written for this tool rather than hyper's: it writes requests prepared once
//! and reads only what it needs of the response (the status, `Content-Length`,
//! `Connection: close`), so it costs the shared CPU a fraction of what a general client
//! does, and leaves that to the server under test, as `wrk` does. Responses must carry a
//! `Content-Length` or be chunked (the presence server and the bare server do). The
//! watch streams have a reader of their own (`watch.rs`).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hyper::{StatusCode, Uri};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

use crate::cli::Options;

/// A base URL taken apart: what to connect to, the `Host` header, the base path, and
/// whether it is `https`.
pub struct UrlParts {
    connect: String,
    authority: String,
    base: String,
    host: String,
    https: bool,
}

/// Takes a base URL like `http://127.0.0.1:8080/presence` apart (`http` or `https`).
pub fn split_url(url: &str) -> Result<UrlParts, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{e}"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(other) => return Err(format!("scheme `{other}` is not supported (http or https)")),
        None => return Err("must be absolute, like http://127.0.0.1:8080/presence".to_owned()),
    };
    let authority = uri.authority().ok_or("the URL has no host")?;
    if authority.as_str().contains('@') {
        return Err("user info is not supported".to_owned());
    }
    if uri.query().is_some() {
        return Err("a query string is not supported".to_owned());
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok(UrlParts {
        // `host()` keeps the brackets of an IPv6 literal, so this parses as a socket address.
        connect: format!("{}:{port}", authority.host()),
        authority: authority.as_str().to_owned(),
        base: uri.path().trim_end_matches('/').to_owned(),
        host: authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        https,
    })
}

impl UrlParts {
    /// Whether the URL is `https`.
    pub fn is_https(&self) -> bool {
        self.https
    }
}

/// A connection to the server: plain TCP, or TLS over it for `https` URLs.
pub type Stream = Either<TcpStream, TlsStream<TcpStream>>;

/// The TLS side of an `https` target: the client configuration (trusting the CA of
/// `--cacert` alone, HTTP/1.1 by ALPN) and the name the certificate must carry.
struct Tls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl Tls {
    fn new(host: &str, cacert: Option<&Path>) -> Result<Tls, String> {
        let path = cacert.ok_or("an https URL needs --cacert FILE (the CA of its certificate)")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("--cacert {}: {e}", path.display()))?
        {
            let cert = cert.map_err(|e| format!("--cacert {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("--cacert {}: {e}", path.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("`{host}` is not a TLS server name: {e}"))?;
        Ok(Tls {
            connector: TlsConnector::from(Arc::new(config)),
            name,
        })
    }
}

/// Why a connection could not be opened.
pub enum ConnectError {
    Io(io::Error),
    /// The TLS handshake failed.
    Tls(io::Error),
    TimedOut,
}

impl ConnectError {
    /// The transport-failure kind counted in the report.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Io(_) => "connect",
            ConnectError::Tls(_) => "tls_handshake",
            ConnectError::TimedOut => "connect_timeout",
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Io(e) => e.fmt(f),
            ConnectError::Tls(e) => write!(f, "TLS handshake: {e}"),
            ConnectError::TimedOut => f.write_str("timed out"),
        }
    }
}

/// Opens a connection to `addr` within `timeout`, Nagle off. Every connection the
/// generator makes goes through here: the check before a run and the workers' own.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let connect = async {
        let stream = TcpStream::connect(addr).await.map_err(ConnectError::Io)?;
        // Small request/response pairs: Nagle plus delayed ACKs could add 40 ms stalls.
        stream.set_nodelay(true).map_err(ConnectError::Io)?;
        Ok(stream)
    };
    tokio::time::timeout(timeout, connect)
        .await
        .unwrap_or(Err(ConnectError::TimedOut))
}

/// Where requests go, with everything a request needs prepared once.
pub struct Target {
    pub addr: SocketAddr,
    pub url: String,
    /// `Host: ...\r\n` and, with `--auth`, `Authorization: Bearer ...\r\n`.
    headers: String,
    login: String,
    heartbeat: String,
    list: String,
    /// `GET /presence/watch`, the whole request.
    watch: Bytes,
    /// Extra headers of the listing (`Accept-Encoding` with `--accept-encoding`).
    list_headers: String,
    timeout: Duration,
    /// For an `https` URL.
    tls: Option<Tls>,
}

impl Target {
    /// The server at `addr`, addressed as `url` (a base URL `split_url` accepts).
    pub fn new(addr: SocketAddr, url: &str, opts: &Options) -> Result<Target, String> {
        let parts = split_url(url).map_err(|e| format!("--url `{url}`: {e}"))?;
        let path = |suffix: &str| -> Result<String, String> {
            let p = format!("{}{suffix}", parts.base);
            let p = if p.is_empty() { "/".to_owned() } else { p };
            // Validated like a URI path: the request line must not be broken by it.
            p.parse::<Uri>()
                .map(|_| p.clone())
                .map_err(|e| format!("bad path `{p}`: {e}"))
        };
        let mut headers = format!("Host: {}\r\n", parts.authority);
        if let Some(token) = &opts.auth {
            headers.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        let mut list_headers = String::new();
        if let Some(encoding) = &opts.accept_encoding {
            list_headers.push_str(&format!("Accept-Encoding: {encoding}\r\n"));
        }
        let watch = Bytes::from(format!(
            "GET {} HTTP/1.1\r\n{headers}Accept: text/event-stream\r\n\r\n",
            path("/watch")?
        ));
        let tls = if parts.https {
            Some(Tls::new(&parts.host, opts.cacert.as_deref())?)
        } else {
            None
        };
        Ok(Target {
            tls,
            addr,
            url: url.to_owned(),
            watch,
            headers,
            login: path("/login")?,
            heartbeat: path("/heartbeat")?,
            list: path("")?,
            list_headers,
            timeout: opts.timeout,
        })
    }

    /// The server at `--url`, its host name resolved.
    pub async fn resolve(opts: &Options) -> Result<Target, String> {
        Target::resolve_url(&opts.url, opts).await
    }

    /// The server at `url` (`--url` or `--watch-url`), its host name resolved.
    pub async fn resolve_url(url: &str, opts: &Options) -> Result<Target, String> {
        let parts = split_url(url).map_err(|e| format!("`{url}`: {e}"))?;
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(parts.connect.as_str())
            .await
            .map_err(|e| format!("cannot resolve `{}`: {e}", parts.connect))?
            .collect();
        // `localhost` often resolves to ::1 first while servers commonly bind 0.0.0.0 only.
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .ok_or_else(|| format!("`{}` resolved to no address", parts.connect))?;
        if !addr.ip().is_loopback() {
            eprintln!("presence_load: warning: {addr} is not a loopback address; this tool is meant for local servers");
        }
        Target::new(addr, url, opts)
    }

    /// Opens a connection within the timeout: TCP, and the TLS handshake for an
    /// `https` target.
    pub async fn open(&self) -> Result<Stream, ConnectError> {
        let tcp = connect(self.addr, self.timeout).await?;
        let Some(tls) = &self.tls else {
            return Ok(Either::Left(tcp));
        };
        let handshake = tls.connector.connect(tls.name.clone(), tcp);
        match tokio::time::timeout(self.timeout, handshake).await {
            Ok(Ok(stream)) => Ok(Either::Right(stream)),
            Ok(Err(e)) => Err(ConnectError::Tls(e)),
            Err(_) => Err(ConnectError::TimedOut),
        }
    }

    /// Fails fast on a dead server (or a certificate not trusted), instead of timing
    /// out request after request.
    pub async fn check_reachable(&self) -> Result<(), String> {
        match self.open().await {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("cannot connect to {}: {e}", self.addr)),
        }
    }

    /// The whole HTTP/1.1 request, ready to write: a `POST` of `body` as JSON, or a
    /// `GET` without one.
    fn request(&self, path: &str, body: Option<&[u8]>) -> Bytes {
        let mut req = Vec::with_capacity(128 + body.map_or(0, <[u8]>::len));
        match body {
            Some(body) => {
                req.extend_from_slice(
                    format!(
                        "POST {path} HTTP/1.1\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        self.headers,
                        body.len()
                    )
                    .as_bytes(),
                );
                req.extend_from_slice(body);
            }
            None => req.extend_from_slice(
                format!("GET {path} HTTP/1.1\r\n{}\r\n", self.headers).as_bytes(),
            ),
        }
        Bytes::from(req)
    }

    /// The heartbeat request of node `i` holding `lease_id`.
    pub fn heartbeat_request(&self, i: usize, lease_id: &str) -> Bytes {
        // Value's Display escapes the lease as a JSON string and cannot fail.
        let lease = serde_json::Value::from(lease_id);
        let body = format!("{{\"node_id\":\"load-{i}\",\"lease_id\":{lease}}}");
        self.request(&self.heartbeat, Some(body.as_bytes()))
    }

    /// `GET /presence/watch` (an SSE stream), ready to write.
    pub fn watch_request(&self) -> Bytes {
        self.watch.clone()
    }

    /// The per-request (and per-connect) timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `GET` of the node list.
    pub fn list_request(&self) -> Bytes {
        Bytes::from(format!(
            "GET {} HTTP/1.1\r\n{}{}\r\n",
            self.list, self.headers, self.list_headers
        ))
    }

    /// The login request of node `i`: ids are `load-<i>`, and the body carries a small
    /// meta object like a real node's.
    fn login_request(&self, i: usize) -> Bytes {
        let body = format!("{{\"node_id\":\"load-{i}\",\"meta\":{{\"load\":0.5,\"hp\":90}}}}");
        self.request(&self.login, Some(body.as_bytes()))
    }
}

#[derive(serde::Deserialize)]
struct LoginReply {
    lease_id: String,
    #[serde(default)]
    ttl_ms: u64,
    #[serde(default)]
    expires_at_ms: u64,
}

/// What a successful login gave a node.
pub struct Lease {
    /// Its heartbeat request, ready to send.
    pub heartbeat: Bytes,
    /// The server's TTL.
    pub ttl_ms: u64,
    /// When the node expires without a heartbeat (the store's clock, Unix ms).
    pub expires_at_ms: u64,
}

/// The outcome of one request.
pub struct Exchange {
    /// Status of the response, or the kind of transport failure.
    pub result: Result<StatusCode, &'static str>,
    /// Set when a complete response arrived.
    pub latency: Option<Duration>,
    /// The response body, only when asked for.
    body: Bytes,
    pub bytes_in: u64,
}

impl Exchange {
    fn failed(kind: &'static str) -> Exchange {
        Exchange {
            result: Err(kind),
            latency: None,
            body: Bytes::new(),
            bytes_in: 0,
        }
    }

    /// True when no connection could be opened for the request.
    pub fn connect_failed(&self) -> bool {
        matches!(self.result, Err("connect" | "connect_timeout"))
    }
}

/// One keep-alive HTTP/1.1 connection, re-established when it breaks.
pub struct Conn {
    target: Arc<Target>,
    stream: Option<Stream>,
    buf: BytesMut,
    connected_before: bool,
    /// How often a broken connection was replaced.
    pub reconnects: u64,
}

/// A response as far as the generator cares.
struct RawResponse {
    status: StatusCode,
    body: Bytes,
    bytes_in: u64,
    close: bool,
}

impl Conn {
    pub fn new(target: Arc<Target>) -> Conn {
        Conn {
            target,
            stream: None,
            buf: BytesMut::with_capacity(16 * 1024),
            connected_before: false,
            reconnects: 0,
        }
    }

    /// Sends `req` (a whole request from [`Target`]) and reads the response.
    pub async fn exchange(&mut self, req: &[u8], keep_body: bool) -> Exchange {
        // A reused connection may have been closed by the server while idle: then the
        // request is sent again, once, on a fresh one.
        for attempt in 0..2 {
            let reused = self.stream.is_some();
            if self.stream.is_none() {
                match self.target.open().await {
                    Ok(stream) => {
                        if self.connected_before {
                            self.reconnects += 1;
                        }
                        self.connected_before = true;
                        self.buf.clear();
                        self.stream = Some(stream);
                    }
                    Err(e) => return Exchange::failed(e.kind()),
                }
            }
            let start = Instant::now();
            let timeout = self.target.timeout;
            let result = tokio::time::timeout(timeout, self.roundtrip(req, keep_body)).await;
            match result {
                Ok(Ok(res)) => {
                    if res.close {
                        self.stream = None;
                    }
                    return Exchange {
                        result: Ok(res.status),
                        latency: Some(start.elapsed()),
                        body: res.body,
                        bytes_in: res.bytes_in,
                    };
                }
                // The connection's state is unknown after a failure: start afresh.
                Ok(Err((kind, nothing_read))) => {
                    self.stream = None;
                    if !(reused && nothing_read && attempt == 0) {
                        return Exchange::failed(kind);
                    }
                }
                Err(_) => {
                    self.stream = None;
                    return Exchange::failed("timeout");
                }
            }
        }
        Exchange::failed("request")
    }

    /// Writes the request and reads one response; on failure, the kind and whether
    /// no byte of a response had arrived.
    async fn roundtrip(
        &mut self,
        req: &[u8],
        keep_body: bool,
    ) -> Result<RawResponse, (&'static str, bool)> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(("request", true));
        };
        stream.write_all(req).await.map_err(|_| ("request", true))?;
        // The head: up to the blank line.
        let mut scanned = 0;
        let head_len = loop {
            if let Some(at) = find_head_end(&self.buf, scanned) {
                break at;
            }
            if self.buf.len() > 64 * 1024 {
                return Err(("response_head_too_large", false));
            }
            scanned = self.buf.len().saturating_sub(3);
            self.buf.reserve(16 * 1024);
            match stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Err(("response_closed", self.buf.is_empty())),
                Ok(_) => {}
            }
        };
        let head = parse_head(&self.buf[..head_len]).map_err(|kind| (kind, false))?;
        self.buf.advance(head_len);
        let mut kept = BytesMut::new();
        let body_len = match head.length {
            // The body: exactly Content-Length bytes, kept only when asked for.
            BodyLength::Exact(len) => {
                read_exact(stream, &mut self.buf, len, keep_body.then_some(&mut kept)).await?;
                len
            }
            // A compressed listing: chunks of `<hex size>\r\n<data>\r\n`, ending at 0.
            BodyLength::Chunked => {
                let mut total = 0;
                loop {
                    let line = read_line(stream, &mut self.buf).await?;
                    let size =
                        usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                            .map_err(|_| ("bad_chunk_size", false))?;
                    total += line.len() + 2;
                    if size == 0 {
                        // No trailers from the servers measured: the final CRLF.
                        read_exact(stream, &mut self.buf, 2, None).await?;
                        break total + 2;
                    }
                    read_exact(stream, &mut self.buf, size, keep_body.then_some(&mut kept)).await?;
                    read_exact(stream, &mut self.buf, 2, None).await?;
                    total += size + 2;
                }
            }
        };
        Ok(RawResponse {
            status: head.status,
            body: kept.freeze(),
            bytes_in: (head_len + body_len) as u64,
            close: head.close,
        })
    }

    /// Logs node `i` in; returns its heartbeat request when that worked.
    pub async fn login(&mut self, i: usize) -> (Exchange, Option<Bytes>) {
        let (ex, lease) = self.login_lease(i).await;
        (ex, lease.map(|l| l.heartbeat))
    }

    /// Logs node `i` in; returns what the login reply said when that worked.
    pub async fn login_lease(&mut self, i: usize) -> (Exchange, Option<Lease>) {
        let req = self.target.login_request(i);
        let mut ex = self.exchange(&req, true).await;
        let mut lease = None;
        if matches!(ex.result, Ok(status) if status.is_success()) {
            match serde_json::from_slice::<LoginReply>(&ex.body) {
                Ok(reply) => {
                    lease = Some(Lease {
                        heartbeat: self.target.heartbeat_request(i, &reply.lease_id),
                        ttl_ms: reply.ttl_ms,
                        expires_at_ms: reply.expires_at_ms,
                    })
                }
                Err(_) => ex.result = Err("bad_login_reply"),
            }
        }
        (ex, lease)
    }
}

/// Where the response head in `buf` ends (after its blank line), looking from `from`.
pub fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| from + at + 4)
}

/// Reads `len` bytes of the body from `buf` (filling it from `stream`), appending them
/// to `keep` if given.
async fn read_exact(
    stream: &mut Stream,
    buf: &mut BytesMut,
    mut left: usize,
    mut keep: Option<&mut BytesMut>,
) -> Result<(), (&'static str, bool)> {
    loop {
        let take = buf.len().min(left);
        if let Some(keep) = keep.as_deref_mut() {
            keep.extend_from_slice(&buf[..take]);
        }
        buf.advance(take);
        left -= take;
        if left == 0 {
            return Ok(());
        }
        buf.reserve(64 * 1024);
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(("response_body", false)),
            Ok(_) => {}
        }
    }
}

/// Reads one CRLF-terminated line (a chunk size) from `buf`, filling it from `stream`.
async fn read_line(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<String, (&'static str, bool)> {
    loop {
        if let Some(at) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..at]).into_owned();
            buf.advance(at + 2);
            return Ok(line);
        }
        if buf.len() > 1024 {
            return Err(("bad_chunk_size", false));
        }
        buf.reserve(16 * 1024);
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(("response_body", false)),
            Ok(_) => {}
        }
    }
}

/// How the response body is framed.
pub enum BodyLength {
    Exact(usize),
    Chunked,
}

/// What the generator reads from a response head.
pub struct Head {
    pub status: StatusCode,
    pub length: BodyLength,
    pub close: bool,
}

pub fn parse_head(head: &[u8]) -> Result<Head, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "bad_response_head")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next(), parts.next());
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err("bad_status_line");
    }
    let status = code
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or("bad_status_line")?;
    let mut content_length = None;
    let mut chunked = false;
    let mut close = version == Some("HTTP/1.0");
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or("bad_header")?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse::<usize>().map_err(|_| "bad_content_length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                return Err("transfer_coding_unsupported");
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let length = match (chunked, content_length) {
        (true, _) => BodyLength::Chunked,
        (false, Some(len)) => BodyLength::Exact(len),
        (false, None) => return Err("no_content_length"),
    };
    Ok(Head {
        status,
        length,
        close,
    })
}
