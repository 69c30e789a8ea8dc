//! The bare hyper server, the baseline of `--mode bare`: plain hyper, HTTP/1 keep-alive,
//! answering every request `200 {"ok":true}` after reading its body. It runs in the
//! generator's process, or on its own with `--serve-bare PORT`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const BODY: &[u8] = b"{\"ok\":true}";

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    // Read the request body like a real handler must, so the comparison is fair.
    req.into_body().collect().await?;
    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

/// Starts the bare server on `addr` (one task per connection).
/// Returns the bound address and the accept loop's task.
pub async fn spawn(addr: SocketAddr) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let accept = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                // Usually out of file descriptors: wait for some to be released.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer))
                    .await;
            });
        }
    });
    Ok((bound, accept))
}

/// `--serve-bare PORT`: serves on 127.0.0.1:PORT for `duration` if given, else until
/// Ctrl-C. The first line of stdout says where, once it is listening.
pub async fn serve(port: u16, duration: Option<Duration>) -> ExitCode {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (bound, server) = match spawn(addr).await {
        Ok(started) => started,
        Err(e) => {
            eprintln!("presence_load: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("bare hyper server on http://{bound}/ answering 200 {{\"ok\":true}}; Ctrl-C stops it");
    match duration {
        Some(d) => {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    server.abort();
    ExitCode::SUCCESS
}
