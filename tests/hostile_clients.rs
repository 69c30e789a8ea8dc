//! Security properties of the presence server, through its HTTP surface:
//!
//! - lease ids: 128 bits from the OS CSPRNG, 32 lowercase hex characters, no repeats
//!   and no biased bit over thousands of logins;
//! - bearer auth on `/presence*` only, every malformed or wrong credential a `401`
//!   (the comparison itself is constant-time: `server/auth.rs`, unit-tested there);
//! - hostile node ids never reach a Redis key: they are `422 invalid_node_id`, and a
//!   scan of the deployment's keys after the attack finds only well-formed keys;
//! - trusted proxies: `X-Forwarded-For` is believed only from a trusted peer, and only
//!   its rightmost untrusted entry, so spoofing it neither evades the rate limit nor
//!   frames another client.

mod support;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use presence::config::Config;
use presence::model::{NodeId, LEASE_ID_LEN};
use presence::server::PresenceService;
use presence::store::redis::test_support::redis_for_tests;
use presence::store::MemoryStore;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use serde_json::json;
use support::in_process::ServiceRequest;
use support::redis::test_redis_connection;
use support::unlimited_config;

fn open_config() -> Config {
    unlimited_config(Config::default().store_timeout)
}

fn local_service(config: &Config) -> PresenceService {
    PresenceService::new(Arc::new(MemoryStore::new()), config)
        .with_default_peer(([127, 0, 0, 1], 40_000).into())
}

#[tokio::test]
async fn lease_ids_are_128_random_bits_never_repeated() {
    let service = local_service(&open_config());
    const N: usize = 4000;
    let mut seen = BTreeSet::new();
    let mut ones = [0usize; 128];
    for i in 0..N {
        // Half of them for the same node: a re-login gets a fresh lease too.
        let node = if i % 2 == 0 {
            "same".to_owned()
        } else {
            format!("n-{i}")
        };
        let (status, _, body) = ServiceRequest::new("POST", "/presence/login")
            .json(json!({ "node_id": node }))
            .send(&service)
            .await;
        assert_eq!(status, 200);
        let lease = body["lease_id"].as_str().expect("lease_id").to_owned();
        assert_eq!(lease.len(), LEASE_ID_LEN);
        assert!(
            lease
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{lease}"
        );
        let value = u128::from_str_radix(&lease, 16).expect("hex");
        for (bit, count) in ones.iter_mut().enumerate() {
            *count += usize::from(value >> bit & 1 == 1);
        }
        assert!(seen.insert(lease), "a lease id repeated");
    }
    // Each of the 128 bits is set in about half of the ids (±9 standard deviations):
    // a constant, a counter or a short seed would fail this.
    let (min, max) = (ones.iter().min().unwrap(), ones.iter().max().unwrap());
    assert!(
        *min > N * 2 / 5 && *max < N * 3 / 5,
        "bit frequencies {min}..{max} of {N}"
    );
    println!("lease ids: {N} distinct, each bit set in {min}..{max} of {N}");
}

#[tokio::test]
async fn bearer_token_guards_presence_routes_only() {
    let mut config = open_config();
    config.auth_token = Some("correct-horse-battery-staple".into());
    let service = local_service(&config);
    let good = "Bearer correct-horse-battery-staple";
    let bad = [
        None,
        Some("Bearer correct-horse-battery-stapl"), // one byte short
        Some("Bearer correct-horse-battery-staplf"), // last byte wrong
        Some("Bearer xorrect-horse-battery-staple"), // first byte wrong
        Some("Bearer correct-horse-battery-staple-and-more"),
        Some("Basic correct-horse-battery-staple"),
        Some("Bearer"),
        Some("Bearer "),
        Some("correct-horse-battery-staple"),
    ];
    for path in ["/presence", "/presence/n-1"] {
        for auth in bad {
            let mut req = ServiceRequest::new("GET", path);
            if let Some(auth) = auth {
                req = req.header("authorization", auth);
            }
            let (status, headers, body) = req.send(&service).await;
            assert_eq!(status, 401, "{path} with {auth:?}");
            assert_eq!(body["error"], "unauthorized");
            assert_eq!(
                headers.get("www-authenticate").map(|v| v.as_bytes()),
                Some(&b"Bearer"[..])
            );
        }
    }
    let (status, _, _) = ServiceRequest::new("GET", "/presence")
        .header("authorization", good)
        .send(&service)
        .await;
    assert_eq!(status, 200);
    let (status, _, _) = ServiceRequest::new("GET", "/presence")
        .header("authorization", "bearer correct-horse-battery-staple")
        .send(&service)
        .await;
    assert_eq!(status, 200, "the scheme is case-insensitive");
    // Probes and metrics stay open (load balancers and scrapers carry no token).
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, _, _) = ServiceRequest::new("GET", path).send(&service).await;
        assert_eq!(status, 200, "{path}");
    }
}

/// Ids that must never become (part of) a Redis key.
fn hostile_ids() -> Vec<String> {
    let mut ids: Vec<String> = [
        "",
        " ",
        "a b",
        "a\r\nSET pwned 1",
        "{presence}:nodes",
        "x}:node:y",
        "{",
        "}",
        "*",
        "?",
        "[a-z]",
        "a\\b",
        "../etc",
        "a/b",
        "é",
        "ß",
        "\u{0}",
        "a\u{7f}",
        "\u{202e}rtl",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "a,b",
        "a;b",
        "a\"b",
        "a'b",
        "$x",
        "%41",
        "#x",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    ids.push("a".repeat(257));
    ids.push("é".repeat(200));
    ids
}

#[tokio::test]
async fn hostile_node_ids_never_reach_a_redis_key() {
    let Some(store) = redis_for_tests("hostile_ids").await else {
        return;
    };
    let service = PresenceService::new(Arc::new(store.clone()), &open_config())
        .with_default_peer(([127, 0, 0, 1], 40_000).into());
    let mut ids = hostile_ids();
    // And a few hundred random strings.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for _ in 0..300 {
        ids.push(
            any::<String>()
                .new_tree(&mut runner)
                .expect("value")
                .current(),
        );
    }
    let mut rejected = 0;
    for id in &ids {
        let valid = NodeId::parse(id).is_ok();
        let lease = "0123456789abcdef0123456789abcdef";
        for (path, body) in [
            ("/presence/login", json!({ "node_id": id })),
            (
                "/presence/heartbeat",
                json!({ "node_id": id, "lease_id": lease }),
            ),
            (
                "/presence/logout",
                json!({ "node_id": id, "lease_id": lease }),
            ),
        ] {
            let (status, _, body) = ServiceRequest::new("POST", path)
                .json(body)
                .send(&service)
                .await;
            if valid {
                assert!(
                    matches!(status, 200 | 404 | 409),
                    "{id:?} {path}: {status} {body}"
                );
            } else {
                assert_eq!(
                    (status, body["error"].as_str()),
                    (422, Some("invalid_node_id")),
                    "{id:?} {path}"
                );
                rejected += 1;
            }
        }
    }
    // GET /presence/{id}: every id as a path segment that the URI accepts.
    for id in &ids {
        let path = format!("/presence/{id}");
        if http::Uri::try_from(path.as_str()).is_err() {
            continue;
        }
        let (status, _, _) = ServiceRequest::new("GET", &path).send(&service).await;
        let expected: &[u16] = if NodeId::parse(id).is_ok() {
            &[200, 404]
        } else {
            &[404, 422]
        };
        assert!(expected.contains(&status), "{path:?}: {status}");
    }

    // Every key of the deployment is one of the documented ones ...
    let prefix = store.prefix().to_owned();
    let mut conn = test_redis_connection().await;
    let mut keys: Vec<String> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{{{prefix}}}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("scan");
        keys.extend(page);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    for key in &keys {
        let ok = [
            "nodes",
            "records",
            "feed",
            "feed-epoch",
            "swept",
            "ids",
            "counts",
            "shards",
        ]
        .iter()
        .any(|k| *key == format!("{{{prefix}}}:{k}"));
        assert!(ok, "unexpected key {key:?}");
    }
    // ... and every record's field and every sorted set member is a valid id.
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{{{prefix}}}:records"))
        .query_async(&mut conn)
        .await
        .expect("hkeys");
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{{{prefix}}}:nodes"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .expect("zrange");
    let indexed: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{{{prefix}}}:ids"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .expect("zrange");
    assert_eq!(
        indexed.len(),
        fields.len(),
        "the id index holds every record"
    );
    for id in fields.iter().chain(&members).chain(&indexed) {
        assert!(NodeId::parse(id).is_ok(), "unexpected node id {id:?}");
    }
    println!(
        "hostile node ids: {rejected} requests rejected with 422, {} keys in Redis, all well-formed",
        keys.len()
    );
    assert!(store.delete_prefix().await.is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever `NodeId::parse` accepts is made only of the characters that are safe
    /// in a Redis key and a URL path segment.
    #[test]
    fn node_id_parse_accepts_only_key_safe_strings(s in any::<String>()) {
        if let Ok(id) = NodeId::parse(&s) {
            prop_assert!(!id.as_str().is_empty() && id.as_str().len() <= 256);
            prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b"._~:@+=-".contains(&b)));
        }
    }
}

async fn remaining(service: &PresenceService, ip: &str) -> u32 {
    service
        .rate_limiter()
        .remaining(&ip.parse::<IpAddr>().expect("ip"))
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let mut config = open_config();
    config.rate_limit_rate = 0.001; // no refill during the test
    config.rate_limit_capacity = 3;
    config.trusted_proxies = vec!["10.0.0.0/8".parse().expect("cidr")];
    let service = PresenceService::new(Arc::new(MemoryStore::new()), &config);
    let get = |peer: &'static str, xff: Option<String>| {
        let service = service.clone();
        async move {
            let mut req = ServiceRequest::new("GET", "/presence").peer(peer);
            if let Some(xff) = xff {
                req = req.header("x-forwarded-for", xff);
            }
            req.send(&service).await.0
        }
    };

    // An untrusted client rotating spoofed X-Forwarded-For values: one bucket, its own.
    let mut statuses = Vec::new();
    for i in 0..5 {
        statuses.push(get("203.0.113.5:1000", Some(format!("198.51.100.{i}"))).await);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429, 429],
        "spoofing does not evade the limit"
    );
    assert_eq!(
        remaining(&service, "198.51.100.0").await,
        3,
        "nor does it frame anyone"
    );

    // Behind a trusted proxy: the rightmost untrusted entry is the client; what the
    // client wrote to the left of it is ignored.
    for xff in [
        "198.51.100.7",
        "6.6.6.6, 198.51.100.7",
        "1.1.1.1, 2.2.2.2, 198.51.100.7, 10.9.9.9", // via a second trusted hop
    ] {
        assert_eq!(
            get("10.0.0.2:1000", Some(xff.to_owned())).await,
            200,
            "{xff}"
        );
    }
    assert_eq!(remaining(&service, "198.51.100.7").await, 0);
    assert_eq!(remaining(&service, "6.6.6.6").await, 3);
    assert_eq!(remaining(&service, "1.1.1.1").await, 3);
    assert_eq!(
        get("10.0.0.2:1000", Some("9.9.9.9, 198.51.100.7".into())).await,
        429,
        "the same client behind the proxy is limited whatever it prepends"
    );
    // Garbage in the header: the request falls back to the proxy's own bucket, never
    // to a fresh one.
    assert_eq!(get("10.0.0.3:1000", Some("not-an-ip".into())).await, 200);
    assert_eq!(remaining(&service, "10.0.0.3").await, 2);
    // A trusted peer without the header is itself the client (health checkers).
    assert_eq!(get("10.0.0.4:1000", None).await, 200);
    assert_eq!(remaining(&service, "10.0.0.4").await, 2);
    // Limits apply to /presence*, never to the probes.
    for _ in 0..10 {
        let (status, _, _) = ServiceRequest::new("GET", "/healthz")
            .peer("203.0.113.5:1000")
            .send(&service)
            .await;
        assert_eq!(status, 200);
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
}
