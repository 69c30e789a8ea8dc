//! The Redis store over TLS (`rediss://`): a `redis-server` child that speaks only
//! TLS, its certificate from a throwaway CA given as `PRESENCE_REDIS_CA_FILE`, and a
//! login / heartbeat / list / watch round trip through a server on that store (the
//! listing goes over the store's own TLS connection, see `store::redis::bulk`).

mod support;

use std::time::Duration;

use futures_util::StreamExt;

use presence::client::{Filter, PresenceClient, WatchEvent};
use presence::store::redis::{RedisOptions, RedisStore};
use presence::store::Store;
use support::redis::RedisTlsChild;
use support::server::TestServer;
use support::{config, within};

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
        let store = presence::store::open_for(&cfg)
            .await
            .expect("open rediss://");
        within(10, async {
            while store.ping().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let server = TestServer::start(&cfg, store).await;
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
