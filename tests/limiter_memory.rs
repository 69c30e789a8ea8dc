//! Limiter memory under a key-rotation attack: 1 000 000 requests from distinct client
//! IPs through the in-process server keep its per-client token buckets
//! ([`PresenceService::rate_limiter`]) at their cap. Bytes per key are measured with a
//! counting global allocator (this test binary only), RSS from `/proc/self/status`.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use presence::config::Config;
use presence::server::PresenceService;
use presence::store::MemoryStore;
use resilience::token_bucket::DEFAULT_MAX_KEYS;
use support::{rss_bytes, within};
use tower::ServiceExt;

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: defers to the system allocator and only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// The `i`-th distinct client address: IPv4 for the first half, IPv6 after (keys of
/// both kinds share one map).
fn client(i: u32) -> IpAddr {
    if i % 2 == 0 {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    } else {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0,
            0,
            0,
            0,
            (i >> 16) as u16,
            i as u16,
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_client_ips_keep_the_limiter_at_its_cap() {
    within(60, async {
        // The default burst; a slow refill so that the abuser check below does not
        // depend on how fast this machine runs the flood.
        let mut config = Config::default();
        config.rate_limit_rate = 1.0;
        let service = PresenceService::new(Arc::new(MemoryStore::new()), &config);
        let limiter = service.rate_limiter().clone();
        assert_eq!(limiter.max_keys(), DEFAULT_MAX_KEYS);
        assert!(limiter.is_empty());
        let before = live();

        // Every key through the whole HTTP stack, from 4 tasks: each request comes
        // from its own IP and so gets its own bucket in the service's map.
        const KEYS: u32 = 1_000_000;
        const TASKS: u32 = 4;
        let started = Instant::now();
        let workers: Vec<_> = (0..TASKS)
            .map(|t| {
                let service = service.clone();
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    let mut peak = 0;
                    for i in (t..KEYS).step_by(TASKS as usize) {
                        let mut req = http::Request::get("/presence/not:a/valid")
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                        req.extensions_mut()
                            .insert(SocketAddr::new(client(i), 40_000));
                        let res = service.clone().oneshot(req).await.unwrap();
                        // A fresh IP always has tokens; the route itself is a 404.
                        assert_eq!(res.status(), 404, "key {i}");
                        if i % 10_000 < TASKS {
                            peak = peak.max(limiter.len());
                        }
                    }
                    peak
                })
            })
            .collect();
        let mut peak = 0;
        for worker in workers {
            peak = peak.max(worker.await.unwrap());
        }
        let http_time = started.elapsed();
        let keys = limiter.len();
        peak = peak.max(keys);
        assert!(
            peak <= DEFAULT_MAX_KEYS && keys <= DEFAULT_MAX_KEYS,
            "the map outgrew its cap: peak {peak}, now {keys}"
        );
        assert!(
            keys > DEFAULT_MAX_KEYS / 2,
            "the map is used up to near its cap: {keys}"
        );

        // And a key that is being throttled is still throttled after the flood: the
        // flood evicts full buckets first, so it cannot reset an abuser's bucket.
        let abuser = SocketAddr::new(client(2_000_000), 40_000);
        let mut statuses = Vec::new();
        for _ in 0..70 {
            let mut req = http::Request::get("/presence")
                .body(Full::new(Bytes::new()))
                .unwrap();
            req.extensions_mut().insert(abuser);
            statuses.push(
                service
                    .clone()
                    .oneshot(req)
                    .await
                    .unwrap()
                    .status()
                    .as_u16(),
            );
        }
        assert_eq!(
            statuses.iter().filter(|s| **s == 429).count(),
            10,
            "burst 60 of 70"
        );
        for i in 3_000_000..3_200_000 {
            let _ = limiter.try_acquire(&client(i));
        }
        assert!(
            limiter.remaining(&abuser.ip()) < 5,
            "the flood of new keys did not refill the abuser's bucket"
        );

        let heap = live() - before;
        let per_key = heap as f64 / limiter.len() as f64;
        let rss = rss_bytes().unwrap_or(0);
        assert!(per_key < 200.0, "{per_key:.1} bytes per key");
        println!(
            "limiter: 1 000 000 distinct IPs -> {} keys (cap {DEFAULT_MAX_KEYS}, peak {peak}); \
             heap {:.1} MB = {per_key:.1} bytes per key (slot {} B); process RSS {:.1} MB; \
             {KEYS} requests in {http_time:?} ({:.1} us each)",
            limiter.len(),
            heap as f64 / 1e6,
            resilience::KeyedTokenBuckets::<IpAddr>::slot_bytes(),
            rss as f64 / 1e6,
            http_time.as_secs_f64() * 1e6 / f64::from(KEYS),
        );
    })
    .await;
}
