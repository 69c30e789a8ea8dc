//! The Redis store over TLS (`rediss://`): a `redis-server` child that speaks only
//! TLS, its certificate from a throwaway CA given as `PRESENCE_REDIS_CA_FILE`, and a
//! login / heartbeat / list / watch round trip through a server on that store (the
//! listing goes over the store's own TLS connection, see `store::redis::bulk`); and
//! the same on a local Redis Cluster that speaks only TLS, with 16 shards.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use presence::client::{Filter, PresenceClient, Watch, WatchEvent};
use presence::config::Config;
use presence::model::{Meta, NodeId};
use presence::store::redis::test_support::{ClusterTls, LocalCluster};
use presence::store::redis::{RedisOptions, RedisStore};
use presence::store::Store;
use support::redis::{redis_required, RedisTlsChild};
use support::server::TestServer;
use support::tls::TestCerts;
use support::{config, within};

/// The store of `cfg` (a `rediss://` one) once it answers, a server on it, an SDK
/// client of that server, and a watch of everything past its snapshot.
async fn serve_on_tls_redis(cfg: &Config) -> (Arc<dyn Store>, TestServer, PresenceClient, Watch) {
    let store = presence::store::open_for(cfg)
        .await
        .expect("open rediss://");
    within(20, async {
        while store.ping().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let server = TestServer::start(cfg, store.clone()).await;
    let pc = PresenceClient::builder(server.base())
        .timeout(Duration::from_secs(3))
        .build()
        .expect("client");
    let mut watch = pc.watch(Filter::all());
    let first = within(10, watch.next())
        .await
        .expect("the feed does not end")
        .expect("a snapshot");
    assert!(first.event.is_snapshot(), "{first:?}");
    (store, server, pc, watch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_works_over_tls_with_a_private_ca() {
    let Some(redis) =
        RedisTlsChild::start("the_redis_store_works_over_tls_with_a_private_ca").await
    else {
        return;
    };
    within(60, async {
        // The CA as the server reads it: PRESENCE_REDIS_CA_FILE through the config.
        let ca_file = redis.certs.ca_file.display().to_string();
        let uri = redis.uri();
        let cfg = config(&[
            ("PRESENCE_REDIS_URI", uri.as_str()),
            ("PRESENCE_REDIS_CA_FILE", ca_file.as_str()),
        ]);
        let (_, server, pc, mut watch) = serve_on_tls_redis(&cfg).await;

        pc.login("tls-a").await.expect("login");
        pc.login("tls-b").await.expect("login");
        pc.heartbeat("tls-a").await.expect("heartbeat");
        let mut ids: Vec<String> = pc
            .list_nodes()
            .await
            .expect("list over the TLS listing connection")
            .into_iter()
            .map(|n| n.node_id)
            .collect();
        ids.sort();
        assert_eq!(ids, ["tls-a", "tls-b"]);
        // A second listing reuses the open TLS connection.
        assert_eq!(pc.list_nodes().await.expect("list again").len(), 2);

        let joined = within(10, async {
            loop {
                let item = watch.next().await.expect("feed").expect("event");
                if matches!(&item.event, WatchEvent::Join(n) if n.node_id == "tls-b") {
                    return item;
                }
            }
        })
        .await;
        assert!(matches!(joined.event, WatchEvent::Join(_)));
        assert!(pc.logout("tls-a").await.expect("logout"));
        assert_eq!(pc.list_nodes().await.expect("list").len(), 1);
        server.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_with_sixteen_shards_serves_through_the_server() {
    let certs = TestCerts::generate();
    let tls = ClusterTls {
        ca_file: certs.ca_file.clone(),
        cert_file: certs.cert_file.clone(),
        key_file: certs.key_file.clone(),
    };
    let cluster = match tokio::task::spawn_blocking(move || LocalCluster::start_tls(tls)).await {
        Ok(Ok(cluster)) => cluster,
        Ok(Err(e)) if redis_required() => {
            panic!("PRESENCE_REQUIRE_REDIS=1 but no TLS Redis Cluster: {e}")
        }
        other => {
            eprintln!(
                "skipping a_tls_cluster_with_sixteen_shards: no TLS Redis Cluster ({other:?})"
            );
            return;
        }
    };
    within(60, async {
        let seeds = cluster.seeds();
        assert!(seeds.starts_with("rediss://"), "{seeds}");
        let ca_file = certs.ca_file.display().to_string();
        let prefix = presence::store::redis::test_support::unique_prefix("tls_cluster");
        let cfg = config(&[
            ("PRESENCE_REDIS_MODE", "cluster"),
            ("PRESENCE_SHARDS", "16"),
            ("PRESENCE_REDIS_URI", seeds.as_str()),
            ("PRESENCE_REDIS_CA_FILE", ca_file.as_str()),
            ("PRESENCE_KEY_PREFIX", prefix.as_str()),
        ]);
        let (store, server, pc, mut watch) = serve_on_tls_redis(&cfg).await;
        store
            .check_deployment()
            .await
            .expect("a new deployment of 16 shards");
        // Enough nodes that every master holds some of them.
        let ids: Vec<String> = (0..48).map(|i| format!("tls-node-{i:02}")).collect();
        for id in &ids {
            pc.login(id).await.expect("login");
        }
        pc.heartbeat(&ids[0]).await.expect("heartbeat");
        let listed: Vec<String> = pc
            .list_nodes()
            .await
            .expect("the listing merges the 16 shards")
            .into_iter()
            .map(|n| n.node_id)
            .collect();
        assert_eq!(listed, ids, "in node_id order, every one");
        let joined = within(10, async {
            let mut joined = 0;
            while joined < ids.len() {
                let item = watch.next().await.expect("feed").expect("event");
                if matches!(&item.event, WatchEvent::Join(_)) {
                    joined += 1;
                }
            }
            joined
        })
        .await;
        assert_eq!(joined, ids.len(), "the merged feed carries every join");
        for &port in &cluster.masters() {
            assert!(
                cluster.keys_starting(port, &format!("{{{prefix}.")) > 0,
                "master {port} holds keys of the deployment"
            );
        }
        // The cluster is this test's own and goes with it.
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_rediss_store_refuses_a_server_its_roots_do_not_know() {
    let Some(redis) =
        RedisTlsChild::start("a_rediss_store_refuses_a_server_its_roots_do_not_know").await
    else {
        return;
    };
    within(30, async {
        let other = support::tls::TestCerts::generate();
        let options = RedisOptions::default()
            .connection_timeout(Duration::from_secs(2))
            .tls_ca_pem(other.ca_pem.clone());
        let refused = RedisStore::connect_with(&redis.uri(), "tls-refused", options).await;
        assert!(
            refused.is_err(),
            "a certificate from another CA was accepted"
        );

        let options = RedisOptions::default().tls_ca_pem(redis.certs.ca_pem.clone());
        let store = RedisStore::connect_with(&redis.uri(), "tls-ok", options)
            .await
            .expect("the right CA connects");
        assert!(store.list().await.expect("list").is_empty());
    })
    .await;
}

/// Prints what TLS costs a listing: 10 000 nodes listed through the store's own
/// listing connection, over `rediss://` and over `redis://` (two children of the same
/// `redis-server`), in interleaved rounds (`cargo test --test redis_tls -- --nocapture`
/// shows the figures; debug build, so the ratio is what to read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_over_tls_next_to_plain() {
    const NODES: usize = 10_000;
    const ROUNDS: usize = 7;
    let test = "listing_over_tls_next_to_plain";
    let Some(tls) = RedisTlsChild::start(test).await else {
        return;
    };
    let Some(plain) = support::redis::RedisChild::start(test).await else {
        return;
    };
    within(120, async {
        let stores = [
            (
                "redis://",
                RedisStore::connect_with(&plain.uri(), "tls-bench", RedisOptions::default())
                    .await
                    .expect("plain store"),
            ),
            (
                "rediss://",
                RedisStore::connect_with(
                    &tls.uri(),
                    "tls-bench",
                    RedisOptions::default().tls_ca_pem(tls.certs.ca_pem.clone()),
                )
                .await
                .expect("TLS store"),
            ),
        ];
        for (_, store) in &stores {
            let logins = (0..NODES).map(|i| async move {
                let node = NodeId::parse(&format!("node-{i:05}")).expect("node id");
                store
                    .login(&node, &format!("lease-{i}"), 600_000, Meta::new())
                    .await
                    .expect("login");
            });
            futures_util::future::join_all(logins).await;
        }
        let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..ROUNDS {
            for (k, (_, store)) in stores.iter().enumerate() {
                let started = Instant::now();
                let listed = store.list_json().await.expect("list");
                times[k].push(started.elapsed());
                assert_eq!(listed.count, NODES);
            }
        }
        let median = |t: &mut Vec<Duration>| {
            t.sort();
            t[t.len() / 2]
        };
        let (plain_ms, tls_ms) = (median(&mut times[0]), median(&mut times[1]));
        println!(
            "listing {NODES} nodes, median of {ROUNDS}: redis:// {plain_ms:?}, rediss:// {tls_ms:?} ({:.0} %)",
            100.0 * tls_ms.as_secs_f64() / plain_ms.as_secs_f64()
        );
    })
    .await;
}
