//! What the presence service stack costs per request, in-process (no sockets, no
//! HTTP parsing): a heartbeat through the whole `PresenceService` on the memory
//! store and on Redis (when `PRESENCE_TEST_REDIS_URI`, default
//! `redis://127.0.0.1:6379`, answers; that run includes a Redis round trip), next to
//! a bare `service_fn` that answers the same request with a fixed `200`, in the same
//! run.
//!
//! Each iteration sends one request through a clone of the service and reads the
//! whole response body.
//!
//! Also, in the same run: the heartbeat with JWT (HS256) authentication, and the JWT
//! check alone.
//!
//! Run: `cargo bench -p presence --bench service -- --warm-up-time 1 --measurement-time 3`

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
use presence::store::{MemoryStore, Store};
use tower::{service_fn, Service, ServiceExt};

const NODES: usize = 1000;

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
    let secret = "bench-secret";
    let mut jwt_config = config.clone();
    jwt_config.jwt_secret = Some(secret.to_owned());
    let jwt_service = rt.block_on(async {
        PresenceService::new(store.clone(), &jwt_config)
            .with_default_peer(([127, 0, 0, 1], 4000).into())
    });
    let claims =
        serde_json::json!({"sub": "bench", "scope": "presence:admin", "exp": 4_102_444_800u64});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).expect("key"),
    )
    .expect("token");
    let bearer = HeaderValue::try_from(format!("Bearer {token}")).expect("header");
    group.bench_function("heartbeat_memory_store_jwt_hs256", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % NODES;
            let mut req = heartbeat_request(&bodies[i]);
            req.headers_mut()
                .insert(http::header::AUTHORIZATION, bearer.clone());
            let service = &jwt_service;
            async move { black_box(send(service, req).await) }
        })
    });
    let verifier = JwtVerifier::new(Some(secret.as_bytes()), None).expect("verifier");
    group.bench_function("jwt_hs256_check", |b| {
        b.iter(|| black_box(verifier.verify(black_box(&token)).is_ok()))
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

criterion_group!(benches, stack);
criterion_main!(benches);
