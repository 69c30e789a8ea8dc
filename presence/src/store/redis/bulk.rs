//! [`BulkConnection`]: a plain Redis connection for the few large replies of a
//! listing, decoded without copying.
//!
//! A listing of N nodes reads 2N strings (the ids from `ZRANGE`, the records from
//! `HMGET`). The `redis` crate turns each into a `Value` with its own allocation,
//! through a general parser: about half a microsecond per string, 7 ms for the
//! `ZRANGE` of 10 000 ids that Redis answers in 1.3 ms. This connection sends the
//! listing's pipelined commands as the `redis` crate encodes them, reads the replies
//! into one buffer and hands out arrays of bulk strings as slices of it ([`Bulks`]):
//! a few tens of nanoseconds per string.
//!
//! Only what a listing needs is decoded (RESP2 arrays of bulk strings or nils,
//! integers, errors; simple strings for the handshake); anything else is a protocol error
//! that drops the connection. Every other command goes through the `redis` crate.
//!
//! The connection is opened on first use with what the store's URI says (address,
//! TLS for `rediss://` with the store's roots, `AUTH`, `SELECT`), and dropped on any
//! I/O error, timeout or unexpected reply; the next listing opens a new one. Listings
//! take turns on it ([`Session`]; the server runs at most one listing at a time
//! anyway).

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use redis::{ConnectionAddr, ConnectionInfo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, MutexGuard};

use super::record::parse_u64;
use crate::store::StoreError;

/// Largest bulk string accepted, in bytes: far above any id (256 bytes) or record
/// (about 4 KiB of meta), and low enough that a corrupt length cannot make the
/// buffer grow without bound.
const MAX_BULK: usize = 1 << 20;

/// Largest array accepted, in elements.
const MAX_ARRAY: usize = 1 << 26;

/// How much the read buffer grows by at least, per read.
const READ_CHUNK: usize = 64 * 1024;

/// Where and how to connect, from the store's URI.
#[derive(Clone)]
struct Target {
    addr: ConnectionAddr,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    /// For a TLS address: the client configuration and the name to verify.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open connection and what it has read but not yet handed out.
struct Open {
    io: Box<dyn Io>,
    buf: BytesMut,
}

/// A plain connection for large read-only replies (see the [module docs](self)).
pub(super) struct BulkConnection {
    target: Target,
    connect_timeout: Duration,
    response_timeout: Duration,
    conn: Mutex<Option<Open>>,
}

/// Exclusive use of a [`BulkConnection`]: send pipelined commands, read their
/// replies in order. Any failure drops the connection (its state is unknown), and so
/// does dropping a session with replies still unread.
pub(super) struct Session<'a> {
    slot: MutexGuard<'a, Option<Open>>,
    /// Replies sent for and not read yet.
    pending: usize,
    response_timeout: Duration,
}

impl Session<'_> {
    /// Sends `commands`, `count` packed commands (e.g. from
    /// `redis::Pipeline::get_packed_pipeline`), whose replies [`reply`](Self::reply)
    /// then reads in order.
    pub(super) async fn send(&mut self, commands: &[u8], count: usize) -> Result<(), StoreError> {
        let timeout = self.response_timeout;
        let result = match self.slot.as_mut() {
            // Flushed: TLS may hold the last record back (a no-op on a TCP socket).
            Some(open) => match tokio::time::timeout(timeout, async {
                open.io.write_all(commands).await?;
                open.io.flush().await
            })
            .await
            {
                Ok(written) => written.map_err(io_error),
                Err(_) => Err(timed_out("send the commands", timeout)),
            },
            None => Err(closed()),
        };
        self.pending += count;
        self.check(result)
    }

    /// The next reply, which must be an array of bulk strings or nils; a Redis error
    /// reply is an error.
    pub(super) async fn reply(&mut self) -> Result<Bulks, StoreError> {
        let reply = self.next().await.and_then(Decoded::bulks);
        self.check(reply)
    }

    /// The next reply, which must be an integer; a Redis error reply is an error.
    pub(super) async fn reply_integer(&mut self) -> Result<i64, StoreError> {
        let reply = self.next().await.and_then(Decoded::integer);
        self.check(reply)
    }

    /// The next reply, whatever it is, within the response timeout.
    async fn next(&mut self) -> Result<Decoded, StoreError> {
        let timeout = self.response_timeout;
        let result = match self.slot.as_mut() {
            Some(open) if self.pending > 0 => {
                match tokio::time::timeout(timeout, open.next_decoded()).await {
                    Ok(reply) => reply,
                    Err(_) => Err(timed_out("answer", timeout)),
                }
            }
            Some(_) => Err(protocol("a reply was read that was not asked for")),
            None => Err(closed()),
        };
        self.pending = self.pending.saturating_sub(1);
        result
    }

    fn check<T>(&mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if result.is_err() {
            *self.slot = None;
        }
        result
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if self.pending > 0 {
            *self.slot = None;
        }
    }
}

/// One reply: an array of bulk strings (or nils), as slices of one buffer.
#[derive(Debug)]
pub(super) struct Bulks {
    data: Bytes,
    items: Vec<Option<Range<usize>>>,
}

impl Bulks {
    /// Number of elements.
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    /// Element `i`: `None` for a nil (or past the end).
    pub(super) fn get(&self, i: usize) -> Option<&[u8]> {
        let range = self.items.get(i)?.clone()?;
        self.data.get(range)
    }

    /// An array of bulk strings or nils as the `redis` crate parsed it (the listing
    /// on a cluster); `None` for anything else.
    pub(super) fn from_value(value: redis::Value) -> Option<Bulks> {
        let redis::Value::Array(values) = value else {
            return None;
        };
        let mut data = Vec::new();
        let mut items = Vec::with_capacity(values.len());
        for value in values {
            match value {
                redis::Value::BulkString(bytes) => {
                    items.push(Some(data.len()..data.len() + bytes.len()));
                    data.extend_from_slice(&bytes);
                }
                redis::Value::Nil => items.push(None),
                _ => return None,
            }
        }
        Some(Bulks {
            data: data.into(),
            items,
        })
    }

    /// The elements in order, `None` for nils.
    pub(super) fn iter(&self) -> impl Iterator<Item = Option<&[u8]>> + '_ {
        self.items
            .iter()
            .map(|r| r.clone().and_then(|r| self.data.get(r)))
    }
}

impl BulkConnection {
    /// A connection to what `info` names (TLS addresses with `tls`), or `None` if
    /// it is neither a TCP, a TLS (with `tls` given) nor a Unix socket address.
    pub(super) fn new(
        info: &ConnectionInfo,
        tls: Option<Arc<rustls::ClientConfig>>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Option<BulkConnection> {
        let (addr, tls) = match info.addr() {
            addr @ ConnectionAddr::Tcp(..) => (addr.clone(), None),
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                ..
            } => {
                let name = rustls::pki_types::ServerName::try_from(host.clone()).ok()?;
                let connector = tokio_rustls::TlsConnector::from(tls?);
                (
                    ConnectionAddr::Tcp(host.clone(), *port),
                    Some((connector, name)),
                )
            }
            #[cfg(unix)]
            addr @ ConnectionAddr::Unix(..) => (addr.clone(), None),
            _ => return None,
        };
        let redis = info.redis_settings();
        Some(BulkConnection {
            target: Target {
                addr,
                username: redis.username().map(str::to_owned),
                password: redis.password().map(str::to_owned),
                db: redis.db(),
                tls,
            },
            connect_timeout,
            response_timeout,
            conn: Mutex::new(None),
        })
    }

    /// The connection, for one exchange at a time: opened (or reopened) if need be.
    pub(super) async fn session(&self) -> Result<Session<'_>, StoreError> {
        let mut slot = self.conn.lock().await;
        if slot.as_mut().is_some_and(|open| !open.is_alive()) {
            // Closed by Redis while idle (its `timeout`, `CLIENT KILL`, a failover):
            // open a new one rather than fail the listing on the old one.
            *slot = None;
        }
        if slot.is_none() {
            *slot = Some(self.open().await?);
        }
        Ok(Session {
            slot,
            pending: 0,
            response_timeout: self.response_timeout,
        })
    }

    async fn open(&self) -> Result<Open, StoreError> {
        let connect = async {
            let io: Box<dyn Io> = match &self.target.addr {
                ConnectionAddr::Tcp(host, port) => {
                    let stream = tokio::net::TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(io_error)?;
                    stream.set_nodelay(true).map_err(io_error)?;
                    match &self.target.tls {
                        Some((connector, name)) => {
                            Box::new(connector.connect(name.clone(), stream).await.map_err(
                                |e| StoreError::Unavailable(format!("redis: TLS handshake: {e}")),
                            )?)
                        }
                        None => Box::new(stream),
                    }
                }
                #[cfg(unix)]
                ConnectionAddr::Unix(path) => Box::new(
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map_err(io_error)?,
                ),
                _ => {
                    return Err(StoreError::Unavailable(
                        "redis: an address this connection cannot open".into(),
                    ))
                }
            };
            let mut open = Open {
                io,
                buf: BytesMut::with_capacity(READ_CHUNK),
            };
            let t = &self.target;
            let mut handshake = redis::pipe();
            let mut expected = 0;
            if let Some(password) = &t.password {
                let auth = handshake.cmd("AUTH");
                if let Some(user) = &t.username {
                    auth.arg(user);
                }
                auth.arg(password);
                expected += 1;
            }
            if t.db != 0 {
                handshake.cmd("SELECT").arg(t.db);
                expected += 1;
            }
            if expected > 0 {
                open.io
                    .write_all(&handshake.get_packed_pipeline())
                    .await
                    .map_err(io_error)?;
                open.io.flush().await.map_err(io_error)?;
                for _ in 0..expected {
                    open.next_decoded().await?.status()?;
                }
            }
            Ok(open)
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!(
                "redis: cannot connect within {:?}",
                self.connect_timeout
            ))),
        }
    }
}

impl Open {
    /// Whether the connection is still open, as far as can be told without waiting:
    /// Redis sends nothing unasked, so a readable socket means it closed (or sent an
    /// error and closed).
    fn is_alive(&mut self) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        matches!(
            std::pin::Pin::new(&mut self.io).poll_read(&mut cx, &mut buf),
            std::task::Poll::Pending
        )
    }

    /// The next reply, reading until it is complete.
    async fn next_decoded(&mut self) -> Result<Decoded, StoreError> {
        let mut decoder = Decoder::default();
        loop {
            match decoder.decode(&mut self.buf) {
                Ok(Some(reply)) => return Ok(reply),
                Ok(None) => self.fill().await?,
                Err(e) => return Err(protocol(e)),
            }
        }
    }

    /// Reads what the server has sent so far (at least one byte).
    async fn fill(&mut self) -> Result<(), StoreError> {
        self.buf.reserve(READ_CHUNK);
        match self.io.read_buf(&mut self.buf).await {
            Ok(0) => Err(StoreError::Unavailable(
                "redis: connection closed mid-reply".into(),
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(io_error(e)),
        }
    }
}

/// A complete reply.
#[derive(Debug)]
enum Decoded {
    Bulks(Bulks),
    Status(String),
    Error(String),
    Integer(i64),
}

impl Decoded {
    /// An array of bulk strings or nils.
    fn bulks(self) -> Result<Bulks, StoreError> {
        match self {
            Decoded::Bulks(bulks) => Ok(bulks),
            Decoded::Error(e) => Err(server_error(&e)),
            Decoded::Status(s) => Err(protocol(&format!("status {s:?} where an array was due"))),
            Decoded::Integer(_) => Err(protocol("integer where an array was due")),
        }
    }

    /// An integer.
    fn integer(self) -> Result<i64, StoreError> {
        match self {
            Decoded::Integer(n) => Ok(n),
            Decoded::Error(e) => Err(server_error(&e)),
            Decoded::Status(_) | Decoded::Bulks(_) => {
                Err(protocol("not an integer where one was due"))
            }
        }
    }

    /// A simple string (`+OK`).
    fn status(self) -> Result<(), StoreError> {
        match self {
            Decoded::Status(_) => Ok(()),
            Decoded::Error(e) => Err(server_error(&e)),
            Decoded::Bulks(_) | Decoded::Integer(_) => Err(protocol("not OK where OK was due")),
        }
    }
}

/// Decodes one reply from a buffer that fills up over several reads, resuming where
/// it stopped instead of starting over (a 100 000-element array arrives in many
/// pieces).
#[derive(Debug, Default)]
struct Decoder {
    /// Bytes of the buffer already decoded (the reply so far).
    pos: usize,
    /// Elements of the array, once its header is read.
    expected: Option<usize>,
    items: Vec<Option<Range<usize>>>,
}

impl Decoder {
    /// `Ok(Some(reply))` once a whole reply is in `buf` (and removes it from `buf`),
    /// `Ok(None)` if more bytes are needed, `Err` on anything but an array of bulk
    /// strings, a simple string, an integer or an error.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, &'static str> {
        let expected = match self.expected {
            Some(n) => n,
            None => {
                let Some((line, next)) = line_at(buf, 0) else {
                    return Ok(None);
                };
                let (kind, rest) = line.split_first().ok_or("empty reply line")?;
                match kind {
                    b'+' | b'-' => {
                        let status = *kind == b'+';
                        let text = String::from_utf8_lossy(rest).into_owned();
                        buf.advance(next);
                        return Ok(Some(if status {
                            Decoded::Status(text)
                        } else {
                            Decoded::Error(text)
                        }));
                    }
                    b':' => {
                        let n = std::str::from_utf8(rest)
                            .ok()
                            .and_then(|digits| digits.parse().ok())
                            .ok_or("bad integer")?;
                        buf.advance(next);
                        return Ok(Some(Decoded::Integer(n)));
                    }
                    b'*' => {}
                    _ => return Err("reply is not an array"),
                }
                // `*-1`, the nil array, is not a reply any listing command gives.
                let n = parse_len(rest).ok_or("bad array length")?;
                if n > MAX_ARRAY {
                    return Err("array too long");
                }
                self.pos = next;
                self.expected = Some(n);
                // Grown as elements arrive: a corrupt length must not allocate.
                self.items = Vec::with_capacity(n.min(1 << 16));
                n
            }
        };
        while self.items.len() < expected {
            let Some((line, next)) = line_at(buf, self.pos) else {
                return Ok(None);
            };
            let (kind, rest) = line.split_first().ok_or("empty element line")?;
            if *kind != b'$' {
                return Err("array element is not a bulk string");
            }
            if rest == b"-1" {
                self.items.push(None);
                self.pos = next;
                continue;
            }
            let len = parse_len(rest).ok_or("bad bulk length")?;
            if len > MAX_BULK {
                return Err("bulk string too long");
            }
            let end = next + len;
            match buf.get(end..end + 2) {
                None => return Ok(None),
                Some(b"\r\n") => {}
                Some(_) => return Err("bulk string not terminated by CRLF"),
            }
            self.items.push(Some(next..end));
            self.pos = end + 2;
        }
        let data = buf.split_to(self.pos).freeze();
        let items = std::mem::take(&mut self.items);
        *self = Decoder::default();
        Ok(Some(Decoded::Bulks(Bulks { data, items })))
    }
}

/// The line starting at `at` (without its CRLF) and where the next one starts;
/// `None` if it is not complete yet.
fn line_at(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(at..)?;
    let cr = rest.iter().position(|&b| b == b'\r')?;
    // A lone CR inside a header line would be a protocol error; it shows up as a
    // bad length right after.
    (rest.get(cr + 1) == Some(&b'\n')).then(|| (&rest[..cr], at + cr + 2))
}

/// A non-negative decimal length (at most 18 digits).
fn parse_len(digits: &[u8]) -> Option<usize> {
    if digits.len() > 18 {
        return None;
    }
    usize::try_from(parse_u64(digits)?).ok()
}

/// A Redis error reply.
fn server_error(e: &str) -> StoreError {
    let code = e.split_ascii_whitespace().next();
    if super::refuses_writes(code) {
        StoreError::Refused(format!("redis: {e}"))
    } else {
        StoreError::Unavailable(format!("redis: {e}"))
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("redis: the listing connection is closed".into())
}

fn timed_out(what: &str, timeout: Duration) -> StoreError {
    StoreError::Unavailable(format!("redis: did not {what} within {timeout:?}"))
}

fn io_error(e: std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

fn protocol(what: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "redis: unexpected reply on the listing connection: {what}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(bytes: &[u8]) -> Result<Option<Decoded>, &'static str> {
        let mut buf = BytesMut::from(bytes);
        Decoder::default().decode(&mut buf)
    }

    fn bulks(d: Option<Decoded>) -> Vec<Option<Vec<u8>>> {
        match d {
            Some(Decoded::Bulks(b)) => b.iter().map(|x| x.map(<[u8]>::to_vec)).collect(),
            other => panic!("not an array: {other:?}"),
        }
    }

    #[test]
    fn arrays_of_bulks_and_nils() {
        let d = decode_all(b"*3\r\n$3\r\nabc\r\n$-1\r\n$0\r\n\r\n").expect("valid");
        assert_eq!(
            bulks(d),
            vec![Some(b"abc".to_vec()), None, Some(Vec::new())]
        );
        // Binary-safe: CR and LF inside a bulk string are data.
        let d = decode_all(b"*1\r\n$4\r\na\r\nb\r\n").expect("valid");
        assert_eq!(bulks(d), vec![Some(b"a\r\nb".to_vec())]);
        assert_eq!(
            bulks(decode_all(b"*0\r\n").expect("valid")),
            Vec::<Option<Vec<u8>>>::new()
        );
    }

    #[test]
    fn statuses_and_errors() {
        assert!(matches!(decode_all(b"+OK\r\n"), Ok(Some(Decoded::Status(s))) if s == "OK"));
        assert!(matches!(
            decode_all(b"-WRONGTYPE Operation against a key\r\n"),
            Ok(Some(Decoded::Error(e))) if e.starts_with("WRONGTYPE")
        ));
    }

    #[test]
    fn integers() {
        assert!(matches!(
            decode_all(b":100000\r\n"),
            Ok(Some(Decoded::Integer(100_000)))
        ));
        assert!(matches!(
            decode_all(b":-3\r\n"),
            Ok(Some(Decoded::Integer(-3)))
        ));
        assert!(decode_all(b":12x\r\n").is_err());
        assert!(matches!(decode_all(b":12"), Ok(None)));
    }

    #[test]
    fn incomplete_replies_wait_for_more() {
        for cut in [
            &b"*"[..],
            b"*2\r",
            b"*2\r\n$3\r\nab",
            b"*2\r\n$3\r\nabc\r\n",
            b"*2\r\n$3\r\nabc\r\n$1\r\nx\r",
        ] {
            assert!(matches!(decode_all(cut), Ok(None)), "{cut:?}");
        }
    }

    #[test]
    fn malformed_replies_are_errors() {
        for bad in [
            &b"*1\r\n:5\r\n"[..],
            b"*1\r\n*1\r\n",
            b"*x\r\n",
            b"*-1\r\n",
            b"*1\r\n$3\r\nabcd\r\n",
            b"*1\r\n$99999999999\r\n",
            b"*1\r\n$-2\r\n",
        ] {
            assert!(
                decode_all(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn consecutive_replies_come_one_at_a_time() {
        let mut buf = BytesMut::from(&b"*1\r\n$1\r\na\r\n*1\r\n$1\r\nb\r\n"[..]);
        let first = Decoder::default().decode(&mut buf).expect("valid");
        let second = Decoder::default().decode(&mut buf).expect("valid");
        assert_eq!(bulks(first), vec![Some(b"a".to_vec())]);
        assert_eq!(bulks(second), vec![Some(b"b".to_vec())]);
        assert!(buf.is_empty());
    }

    fn encode(items: &[Option<Vec<u8>>]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", items.len()).into_bytes();
        for item in items {
            match item {
                None => out.extend_from_slice(b"$-1\r\n"),
                Some(b) => {
                    out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                    out.extend_from_slice(b);
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
        out
    }

    proptest! {
        /// Whatever the pieces the bytes arrive in, the decoder resumes and yields
        /// exactly the array that was encoded, and leaves what follows in the buffer.
        #[test]
        fn decodes_across_any_split(
            items in proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)), 0..30),
            cuts in proptest::collection::vec(0usize..2000, 0..8),
        ) {
            let mut wire = encode(&items);
            let len = wire.len();
            wire.extend_from_slice(b"+NEXT\r\n");
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (len + 1)).collect();
            cuts.sort_unstable();
            cuts.push(len);
            let mut buf = BytesMut::new();
            let mut decoder = Decoder::default();
            let mut fed = 0;
            let mut decoded = None;
            for cut in cuts {
                buf.extend_from_slice(&wire[fed..cut]);
                fed = cut;
                if let Some(d) = decoder.decode(&mut buf).expect("valid") {
                    decoded = Some(d);
                    break;
                }
            }
            prop_assert_eq!(fed, len, "decoded before all bytes arrived");
            prop_assert_eq!(bulks(decoded), items);
            buf.extend_from_slice(&wire[fed..]);
            prop_assert_eq!(&buf[..], b"+NEXT\r\n");
        }

        /// Garbage never panics: it is an error or a request for more bytes.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = Decoder::default().decode(&mut buf);
        }
    }
}
