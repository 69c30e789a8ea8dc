//! A presence server running in the test's runtime on a real socket.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use presence::config::Config;
use presence::model::{Meta, NodeId};
use presence::server::{PresenceService, Server};
use presence::store::{MemoryStore, Store};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::within;

/// A presence server running in this runtime on a real socket. Dropping it stops
/// serving at once; [`stop`](Self::stop) drains first.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `http`, or `https` when the configuration has a certificate.
    pub scheme: &'static str,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl TestServer {
    /// Binds `config` (port 0) on `store` and spawns `run` with a oneshot shutdown.
    pub async fn start(config: &Config, store: Arc<dyn Store>) -> TestServer {
        TestServer::start_service(config, PresenceService::new(store, config)).await
    }

    /// Like [`start`](Self::start) with a service built by the caller.
    pub async fn start_service(config: &Config, service: PresenceService) -> TestServer {
        let server = within(10, Server::bind_service(config, service))
            .await
            .unwrap_or_else(|e| panic!("bind failed: {e}"));
        let addr = server.local_addr();
        let scheme = server.scheme();
        assert!(addr.ip().is_loopback(), "bound to {addr}");
        assert_ne!(addr.port(), 0, "port 0 must be resolved to the real port");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            // A dropped sender also means "stop".
            let _ = rx.await;
        }));
        TestServer {
            addr,
            scheme,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// A server on a fresh in-memory store.
    pub async fn memory(config: &Config) -> TestServer {
        TestServer::start(config, Arc::new(MemoryStore::new())).await
    }

    /// `http://<addr><path>` (`https://` for a TLS server).
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// The client SDK's base URL, `http://<addr>/presence` (or `https://`).
    pub fn base(&self) -> String {
        self.url("/presence")
    }

    /// Signals shutdown; call [`join`](Self::join) to wait for the drain.
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits (bounded) for `run` to return after [`signal_shutdown`](Self::signal_shutdown)
    /// and asserts it returned `Ok`.
    pub async fn join(&mut self) {
        if let Some(task) = self.task.take() {
            let result = within(15, task).await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("server run failed: {e}"),
                Err(e) => panic!("server task panicked: {e}"),
            }
        }
    }

    /// Graceful stop: signal, then wait for `run` to return `Ok`.
    pub async fn stop(mut self) {
        self.signal_shutdown();
        self.join().await;
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // A test that panicked before `stop`: stop serving at once.
        self.signal_shutdown();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// An in-memory store with `count` nodes `node-00000`, `node-00001`, ... online for
/// ten minutes, each with `meta`: a listing of a known size.
pub async fn memory_store_with_nodes(count: usize, meta: &Meta) -> Arc<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    for i in 0..count {
        let node = NodeId::parse(&format!("node-{i:05}")).expect("a valid node id");
        store
            .login(&node, &format!("lease-{i}"), 600_000, meta.clone())
            .await
            .expect("an in-memory login");
    }
    store
}
