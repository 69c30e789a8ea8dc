//! Hand-written HTTP/1.1 on a bare TCP connection, for what reqwest cannot send:
//! hostile framing, half requests, requests the server answers before reading them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::client::Reply;
use super::within;

/// Sends raw bytes on a fresh connection and reads the reply until the server closes
/// it. The request should say `Connection: close`. A reset after the reply arrived
/// (the server closing with part of a rejected body unread) is tolerated.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> Reply {
    within(15, async {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        // The server may answer (and stop reading) before all of a rejected body is
        // written; the reply is what matters.
        let _ = stream.write_all(request).await;
        let raw = read_to_close(&mut stream).await;
        assert!(!raw.is_empty(), "no reply from {addr}");
        let mut reply = parse_http_response(&raw);
        reply.elapsed = started.elapsed();
        reply
    })
    .await
}

/// Reads until the server closes the connection (or resets it); returns everything
/// that arrived before.
pub async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Parses one HTTP/1.1 response with a `Content-Length` body (what the server
/// sends); without one the body is everything after the head. `elapsed` is zero.
pub fn parse_http_response(raw: &[u8]) -> Reply {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "incomplete HTTP response: {:?}",
                String::from_utf8_lossy(raw)
            )
        });
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let rest = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("bad header line {line:?}"));
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .unwrap_or_else(|e| panic!("bad header name {name:?}: {e}"));
        let value = HeaderValue::from_str(value.trim())
            .unwrap_or_else(|e| panic!("bad header value {value:?}: {e}"));
        headers.append(name, value);
    }
    let body = match headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(len) => rest.get(..len).unwrap_or(rest),
        None => rest,
    };
    Reply {
        status,
        headers,
        body: Bytes::copy_from_slice(body),
        elapsed: Duration::ZERO,
    }
}
