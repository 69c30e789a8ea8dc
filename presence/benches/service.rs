//! What the presence service stack costs per request, in-process (no sockets, no
//! HTTP parsing): a heartbeat through the whole `PresenceService` on the memory
//! store and on Redis (when `PRESENCE_TEST_REDIS_URI`, default
//! `redis://127.0.0.1:6379`, answers; that run includes a Redis round trip), next to
//! a bare `service_fn` that answers the same request with a fixed `200`, in the same
//! run.
//!
//! Each iteration sends one request through a clone of the service and reads the
//! whole response body. Every request carries the same `Authorization: Bearer` JWT,
//! which only the JWT service checks, so the pair with and without JWT
//! authentication differs by the server's work alone.
//!
//! Also, in the same run: the heartbeat with JWT (HS256) authentication (the same
//! token on every request, as a node sends it: answered by the verifier's cache), and
//! the JWT check alone, cached and uncached.
//!
//! And the reads of a large deployment (100 000 nodes with meta
//! `{"load":0.5,"hp":90,"region":"eu"|"us"}`, 1 % in `eu`), on the memory store
//! (`queries`: through [`Store`] and one page through the HTTP service) and on Redis
//! (`redis_query`, only when Redis answers; under a unique prefix, deleted at the
//! end): a page of 100 from the middle, the stats, the whole listing as JSON, the
//! 1 % meta filter and a 1 % prefix, both unpaged.
//!
//! Run: `cargo bench -p presence --bench service -- --warm-up-time 1 --measurement-time 3`
//! (the read groups have their own short times: `-- 'query|stats|list_json'`).

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use presence::config::Config;
use presence::model::{new_lease_id, Meta, NodeId};
use presence::server::{JwtVerifier, PresenceService};
use presence::store::query::{Filter, Query};
use presence::store::{MemoryStore, Store};
use tower::{service_fn, Service, ServiceExt};

const NODES: usize = 1000;

/// Nodes of the read benchmarks: `node-000000` to `node-099999`; every hundredth is
/// in region `eu`, and the prefix `node-012` selects the thousand from 12 000.
const LARGE: usize = 100_000;

fn large_id(i: usize) -> NodeId {
    NodeId::parse(&format!("node-{i:06}")).expect("id")
}

fn large_meta(i: usize) -> Meta {
    let region = if i % 100 == 0 { "eu" } else { "us" };
    match serde_json::json!({"load": 0.5, "hp": 90, "region": region}) {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("an object"),
    }
}

/// Logs in the [`LARGE`] nodes, `concurrency` logins in flight.
async fn log_in_large(store: &dyn Store, concurrency: usize) {
    use futures_util::stream::{self, StreamExt};
    stream::iter(0..LARGE)
        .map(|i| async move {
            store
                .login(&large_id(i), &new_lease_id(), 3_600_000, large_meta(i))
                .await
                .expect("login")
        })
        .buffer_unordered(concurrency)
        .for_each(|_| async {})
        .await;
}

/// The queries of the read benchmarks: a page of 100 from the middle, the 1 % meta
/// filter and the 1 % prefix (both unpaged), with how many nodes each returns.
fn large_queries() -> [(&'static str, Query, usize); 3] {
    [
        (
            "query_page_100",
            Query::new(Filter::default())
                .after("node-050000")
                .limit(100),
            100,
        ),
        (
            "query_meta_region_eu",
            Query::new(Filter::default().meta("region", "eu")),
            LARGE / 100,
        ),
        (
            "query_prefix_1pct",
            Query::new(Filter::default().prefix("node-012")),
            LARGE / 100,
        ),
    ]
}

/// The read benchmarks of one store.
fn bench_reads(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    store: &dyn Store,
) {
    for (name, query, expected) in large_queries() {
        let page = rt.block_on(store.query_json(&query)).expect("query");
        assert_eq!(page.json.count, expected, "{name}");
        group.bench_function(name, |b| {
            b.to_async(rt).iter(|| async {
                black_box(store.query_json(&query).await.expect("query").json.len())
            })
        });
    }
    let stats = rt.block_on(store.stats()).expect("stats");
    assert_eq!(stats.online, LARGE as u64);
    group.bench_function("stats", |b| {
        b.to_async(rt)
            .iter(|| async { black_box(store.stats().await.expect("stats")) })
    });
    group.bench_function("list_json_full", |b| {
        b.to_async(rt).iter(|| async {
            let list = store.list_json().await.expect("list_json");
            assert_eq!(list.count, LARGE);
            black_box(list.len())
        })
    });
}

fn short_group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    group
}

/// Reads of [`LARGE`] nodes on the memory store, through [`Store`] and (one page)
/// through the HTTP service.
fn queries(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = Arc::new(MemoryStore::new());
    rt.block_on(log_in_large(&*store, 1));
    let mut group = short_group(c, "queries");
    bench_reads(&mut group, &rt, &*store);
    // `GET /presence?limit=100&after=...` through the whole service.
    let mut config = Config::default();
    config.rate_limit_rate = 1e9;
    config.rate_limit_capacity = 1_000_000_000;
    let service = rt.block_on(async {
        PresenceService::new(store.clone(), &config)
            .with_default_peer(([127, 0, 0, 1], 4000).into())
    });
    let page_request = || {
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = http::Uri::from_static("/presence?limit=100&after=node-050000");
        req
    };
    let bytes = rt.block_on(send(&service, page_request()));
    let direct = rt
        .block_on(store.query_json(&large_queries()[0].1))
        .expect("query");
    assert_eq!(bytes, direct.json.len(), "the service answers the page");
    group.bench_function("http_query_page_100", |b| {
        b.to_async(&rt).iter(|| {
            let service = &service;
            async move { black_box(send(service, page_request()).await) }
        })
    });
    group.finish();
}

/// The same reads on Redis, when it answers (a skip line otherwise).
fn redis_queries(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let Some(store) = rt.block_on(async {
        let store = presence::store::redis::test_support::redis_for_tests("bench_query").await?;
        log_in_large(&store, 256).await;
        Some(store)
    }) else {
        eprintln!("redis_query: skipped, Redis does not answer");
        return;
    };
    let mut group = short_group(c, "redis_query");
    bench_reads(&mut group, &rt, &store);
    group.finish();
    let _ = rt.block_on(store.delete_prefix());
}

fn heartbeat_request(body: &Bytes) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(body.clone()));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = http::Uri::from_static("/presence/heartbeat");
    req.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    req
}

/// Logs in `NODES` nodes; returns their heartbeat bodies.
async fn log_in(store: &dyn Store) -> Vec<Bytes> {
    let mut bodies = Vec::with_capacity(NODES);
    for i in 0..NODES {
        let id = NodeId::parse(&format!("load-{i}")).expect("id");
        let lease = new_lease_id();
        store
            .login(&id, &lease, 3_600_000, Meta::new())
            .await
            .expect("login");
        bodies.push(Bytes::from(format!(
            r#"{{"node_id":"load-{i}","lease_id":"{lease}"}}"#
        )));
    }
    bodies
}

async fn send<S>(svc: &S, req: Request<Full<Bytes>>) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<presence::server::ResponseBody>> + Clone,
    S::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await.expect("infallible");
    assert_eq!(res.status(), 200);
    res.into_body()
        .collect()
        .await
        .map_or(0, |b| b.to_bytes().len())
}

fn stack(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = Arc::new(MemoryStore::new());
    let mut config = Config::default();
    config.rate_limit_rate = 1e9;
    config.rate_limit_capacity = 1_000_000_000;
    config.ttl = std::time::Duration::from_secs(3600);
    let bodies = rt.block_on(log_in(&*store));
    let service = rt.block_on(async {
        PresenceService::new(store.clone(), &config)
            .with_default_peer(([127, 0, 0, 1], 4000).into())
    });
    let bare = service_fn(|req: Request<Full<Bytes>>| async move {
        let _ = req.into_body().collect().await;
        let mut res = Response::new(presence::server::ResponseBody::new(Full::new(
            Bytes::from_static(b"{\"ok\":true}"),
        )));
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok::<_, Infallible>(res)
    });

    // Every heartbeat carries the same bearer JWT, so that the heartbeats with and
    // without JWT authentication differ only by what the server does with it (the
    // service without keys passes the header by).
    let secret = "bench-secret";
    let claims =
        serde_json::json!({"sub": "bench", "scope": "presence:admin", "exp": 4_102_444_800u64});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).expect("key"),
    )
    .expect("token");
    let bearer = HeaderValue::try_from(format!("Bearer {token}")).expect("header");
    let heartbeat_request = |body: &Bytes| {
        let mut req = heartbeat_request(body);
        req.headers_mut()
            .insert(http::header::AUTHORIZATION, bearer.clone());
        req
    };

    let mut group = c.benchmark_group("in_process");
    let mut i = 0;
    group.bench_function("bare_service_fn", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % NODES;
            let req = heartbeat_request(&bodies[i]);
            let bare = &bare;
            async move { black_box(send(bare, req).await) }
        })
    });
    group.bench_function("heartbeat_memory_store", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % NODES;
            let req = heartbeat_request(&bodies[i]);
            let service = &service;
            async move { black_box(send(service, req).await) }
        })
    });
    // The same with a JWT checked on every request.
    let mut jwt_config = config.clone();
    jwt_config.jwt_secret = Some(secret.to_owned());
    let jwt_service = rt.block_on(async {
        PresenceService::new(store.clone(), &jwt_config)
            .with_default_peer(([127, 0, 0, 1], 4000).into())
    });
    group.bench_function("heartbeat_memory_store_jwt_hs256", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % NODES;
            let req = heartbeat_request(&bodies[i]);
            let service = &jwt_service;
            async move { black_box(send(service, req).await) }
        })
    });
    // The check alone: a cache hit (the same token every time, as a node sends it),
    // and the full check (signature and claims) with the cache disabled.
    let verifier = JwtVerifier::new(Some(secret.as_bytes()), None).expect("verifier");
    group.bench_function("jwt_hs256_check", |b| {
        b.iter(|| black_box(verifier.verify(black_box(&token)).is_ok()))
    });
    let uncached = JwtVerifier::new(Some(secret.as_bytes()), None)
        .expect("verifier")
        .with_cache_capacity(0);
    group.bench_function("jwt_hs256_check_uncached", |b| {
        b.iter(|| black_box(uncached.verify(black_box(&token)).is_ok()))
    });
    // The same on Redis, if there is one (one heartbeat at a time: no batching).
    let redis = rt.block_on(async {
        let store = presence::store::redis::test_support::redis_for_tests("bench_service").await?;
        let bodies = log_in(&store).await;
        let service = PresenceService::new(Arc::new(store.clone()), &config)
            .with_default_peer(([127, 0, 0, 1], 4000).into());
        Some((store, service, bodies))
    });
    if let Some((store, service, bodies)) = &redis {
        group.bench_function("heartbeat_redis_store", |b| {
            b.to_async(&rt).iter(|| {
                i = (i + 1) % NODES;
                let req = heartbeat_request(&bodies[i]);
                async move { black_box(send(service, req).await) }
            })
        });
        let _ = rt.block_on(store.delete_prefix());
    }
    group.finish();
}

criterion_group!(benches, stack, queries, redis_queries);
criterion_main!(benches);
