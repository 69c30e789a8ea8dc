//! The query side of the client SDK, end to end against the server's own service
//! in-process (no sockets), on paused time: statuses in login, heartbeat and
//! keep-alive, filtered listings, pages and counts.

use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use presence::client::{Filter, PresenceClient};
use presence::config::Config;
use presence::model::{Meta, Stats, Status};
use presence::server::PresenceService;
use presence::store::MemoryStore;
use serde_json::json;

fn client() -> PresenceClient {
    let mut config = Config::default();
    // Hundreds of logins in a moment: not what the per-client limit is about here.
    config.rate_limit_rate = 1e9;
    config.rate_limit_capacity = 1_000_000;
    let service = PresenceService::new(Arc::new(MemoryStore::new()), &config)
        .with_default_peer(([127, 0, 0, 1], 40000).into());
    PresenceClient::builder("http://in-process/presence")
        .service(service)
        .no_rate_limit()
        .build()
        .expect("client")
}

fn meta(v: serde_json::Value) -> Meta {
    serde_json::from_value(v).expect("a JSON object")
}

fn ids(nodes: &[presence::model::Node]) -> Vec<&str> {
    nodes.iter().map(|n| n.node_id.as_str()).collect()
}

#[tokio::test(start_paused = true)]
async fn status_is_sent_with_login_and_heartbeat_and_kept_across_a_relogin() {
    let pc = client();
    pc.login_with_status("a", Meta::new(), Status::Degraded)
        .await
        .expect("login");
    let a = pc.get_node("a").await.expect("get").expect("online");
    assert_eq!(a.status, Status::Degraded);

    pc.heartbeat("a").await.expect("heartbeat");
    let a = pc.get_node("a").await.expect("get").expect("online");
    assert_eq!(
        a.status,
        Status::Degraded,
        "a heartbeat without status keeps it"
    );

    pc.heartbeat_with_status("a", Status::Draining)
        .await
        .expect("heartbeat");
    let a = pc.get_node("a").await.expect("get").expect("online");
    assert_eq!(a.status, Status::Draining);

    // The server forgets the node (its TTL runs out); the next heartbeat logs in
    // again as the node last was: draining.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(pc.heartbeat("a").await.expect("heartbeat").relogged());
    let a = pc.get_node("a").await.expect("get").expect("online");
    assert_eq!(a.status, Status::Draining);
}

#[tokio::test(start_paused = true)]
async fn keep_alive_carries_a_status_change() {
    let pc = client();
    let keep = pc
        .keep_alive_with_status("k", Meta::new(), Status::Up)
        .await
        .expect("keep alive");
    keep.set_status(Status::Draining);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let k = pc.get_node("k").await.expect("get").expect("online");
    assert_eq!(k.status, Status::Draining);
    assert!(keep.stop().await.expect("stop"));
}

#[tokio::test(start_paused = true)]
async fn list_nodes_with_a_filter_and_stats() {
    let pc = client();
    for (id, region, status) in [
        ("eu-1", "eu", Status::Up),
        ("eu-2", "eu", Status::Degraded),
        ("us-1", "us", Status::Up),
        ("us-2", "eu", Status::Draining),
    ] {
        pc.login_with_status(id, meta(json!({"region": region, "hp": 9})), status)
            .await
            .expect("login");
    }
    let eu = pc
        .list_nodes_with(&Filter::all().meta("region", "eu"))
        .await
        .expect("list");
    assert_eq!(ids(&eu), ["eu-1", "eu-2", "us-2"]);
    let up_or_degraded = Filter::all()
        .prefix("eu-")
        .status([Status::Up, Status::Degraded]);
    let listed = pc.list_nodes_with(&up_or_degraded).await.expect("list");
    assert_eq!(ids(&listed), ["eu-1", "eu-2"]);
    let hp = pc
        .list_nodes_with(&Filter::all().meta("hp", "9").status(["draining"]))
        .await
        .expect("list");
    assert_eq!(ids(&hp), ["us-2"], "a number matches its JSON text");

    let stats: Stats = pc.stats().await.expect("stats");
    assert_eq!(stats, Stats::from_counts([2, 1, 1]));
    assert!(pc.logout("eu-2").await.expect("logout"));
    assert_eq!(
        pc.stats().await.expect("stats"),
        Stats::from_counts([2, 0, 1])
    );
}

#[tokio::test(start_paused = true)]
async fn pages_walk_every_node_once_in_order() {
    let pc = client();
    let mut all = Vec::new();
    for i in 0..250 {
        let id = format!("n-{i:03}");
        pc.login(&id).await.expect("login");
        all.push(id);
    }
    pc.login("other").await.expect("login");

    let pages: Vec<Vec<presence::model::Node>> = pc
        .pages(Filter::all().prefix("n-"), 100)
        .try_collect()
        .await
        .expect("pages");
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [100, 100, 50]);
    let walked: Vec<String> = pages.concat().into_iter().map(|n| n.node_id).collect();
    assert_eq!(walked, all);

    // A page size that divides the matches exactly still ends (no empty page after
    // the server says there is no next one).
    let exact: Vec<_> = pc
        .pages(Filter::all().prefix("n-"), 125)
        .try_collect()
        .await
        .expect("pages");
    assert_eq!(exact.iter().map(Vec::len).collect::<Vec<_>>(), [125, 125]);

    let none: Vec<_> = pc
        .pages(Filter::all().prefix("zzz"), 10)
        .try_collect()
        .await
        .expect("pages");
    assert_eq!(
        none,
        vec![Vec::new()],
        "one empty page when nothing matches"
    );
}
