//! Key extractors: what each one keys on, what it refuses to believe, and what a missing
//! key turns into.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use ipnet::IpNet;
use resilience::{
    key::ForwardedHeader, key_fn, Burst, GlobalKey, HeaderKey, KeyExtractor, MissingKey, PeerIp,
    Rate, TokenBucketLayer, TrustedProxyIp,
};
use tower::{service_fn, Layer, ServiceExt};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn request(peer: Option<&str>, header: &str, lines: &[&[u8]]) -> Request<()> {
    let mut req = Request::new(());
    if let Some(peer) = peer {
        req.extensions_mut()
            .insert(peer.parse::<SocketAddr>().unwrap());
    }
    for line in lines {
        req.headers_mut().append(
            HeaderName::from_bytes(header.as_bytes()).unwrap(),
            HeaderValue::from_bytes(line).unwrap(),
        );
    }
    req
}

fn trusted() -> Vec<IpNet> {
    ["10.0.0.0/8", "2001:db8:ffff::/48", "192.168.1.1/32"]
        .iter()
        .map(|net| net.parse().unwrap())
        .collect()
}

const XFF: &str = "x-forwarded-for";
const FWD: &str = "forwarded";

/// (what, header mode, peer, header name, header lines, expected key)
type Case<'a> = (
    &'a str,
    ForwardedHeader,
    &'a str,
    &'a str,
    &'a [&'a [u8]],
    &'a str,
);

#[test]
fn trusted_proxy_ip_table() {
    let x = ForwardedHeader::XForwardedFor;
    let f = ForwardedHeader::Forwarded;
    let e = ForwardedHeader::Either;
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("spoofed header from an untrusted peer is ignored",
            x, "203.0.113.9:1000", XFF, &[b"1.2.3.4"], "203.0.113.9"),
        ("spoofed chain of 'trusted' addresses from an untrusted peer is ignored",
            x, "203.0.113.9:1000", XFF, &[b"10.0.0.2, 10.0.0.3"], "203.0.113.9"),
        ("one trusted proxy",
            x, "10.0.0.1:1000", XFF, &[b"198.51.100.7"], "198.51.100.7"),
        ("what the client prepended is not believed",
            x, "10.0.0.1:1000", XFF, &[b"6.6.6.6, 198.51.100.7"], "198.51.100.7"),
        ("chain of trusted proxies is skipped from the right",
            x, "10.0.0.1:1000", XFF, &[b"6.6.6.6, 198.51.100.7, 10.1.1.1, 192.168.1.1"], "198.51.100.7"),
        ("all hops trusted: the leftmost is the origin",
            x, "10.0.0.1:1000", XFF, &[b"10.2.2.2, 10.1.1.1"], "10.2.2.2"),
        ("trusted peer without header: the peer",
            x, "10.0.0.1:1000", XFF, &[], "10.0.0.1"),
        ("several header lines are one list, in order",
            x, "10.0.0.1:1000", XFF, &[b"6.6.6.6, 198.51.100.7", b"10.1.1.1"], "198.51.100.7"),
        ("several header lines: the last line's rightmost untrusted wins",
            x, "10.0.0.1:1000", XFF, &[b"198.51.100.7", b"10.1.1.1, 203.0.113.5"], "203.0.113.5"),
        ("IPv4 with port",
            x, "10.0.0.1:1000", XFF, &[b"198.51.100.7:5555"], "198.51.100.7"),
        ("bracketed IPv6 with port",
            x, "10.0.0.1:1000", XFF, &[b"[2001:db8::7]:443"], "2001:db8::7"),
        ("bare IPv6 through an IPv6 proxy",
            x, "[2001:db8:ffff::1]:443", XFF, &[b"2001:db8::7, 2001:db8:ffff::2"], "2001:db8::7"),
        ("IPv4-mapped peer is trusted as its IPv4 address",
            x, "[::ffff:10.0.0.1]:443", XFF, &[b"198.51.100.7"], "198.51.100.7"),
        ("IPv4-mapped client is keyed as IPv4",
            x, "10.0.0.1:1000", XFF, &[b"::ffff:198.51.100.7"], "198.51.100.7"),
        ("untrusted IPv4-mapped peer is keyed as IPv4",
            x, "[::ffff:203.0.113.9]:443", XFF, &[b"1.2.3.4"], "203.0.113.9"),
        ("empty list element after a trusted hop is malformed: key on that hop",
            x, "10.0.0.1:1000", XFF, &[b"198.51.100.7, , 10.1.1.1"], "10.1.1.1"),
        ("empty last element is malformed: key on the peer",
            x, "10.0.0.1:1000", XFF, &[b"198.51.100.7, "], "10.0.0.1"),
        ("malformed rightmost entry: the peer wrote it, key on the peer",
            x, "10.0.0.1:1000", XFF, &[b"198.51.100.7, garbage"], "10.0.0.1"),
        ("malformed entry after a trusted hop: key on that hop",
            x, "10.0.0.1:1000", XFF, &[b"198.51.100.7, unknown, 10.1.1.1"], "10.1.1.1"),
        ("truncated address is malformed",
            x, "10.0.0.1:1000", XFF, &[b"198.51.100"], "10.0.0.1"),
        ("empty header: the peer",
            x, "10.0.0.1:1000", XFF, &[b""], "10.0.0.1"),
        ("header that is not text stops the walk",
            x, "10.0.0.1:1000", XFF, &[b"198.51.100.7", b"\xff\xfe"], "10.0.0.1"),
        ("malformed header from an untrusted peer: the peer",
            x, "203.0.113.9:1000", XFF, &[b"garbage"], "203.0.113.9"),
        ("X-Forwarded-For mode ignores Forwarded",
            x, "10.0.0.1:1000", FWD, &[b"for=198.51.100.7"], "10.0.0.1"),

        ("Forwarded: one trusted proxy",
            f, "10.0.0.1:1000", FWD, &[b"for=198.51.100.7;proto=https"], "198.51.100.7"),
        ("Forwarded: quoted bracketed IPv6 with port",
            f, "10.0.0.1:1000", FWD, &[b"for=\"[2001:db8::1]:4711\""], "2001:db8::1"),
        ("Forwarded: quoted IPv4 with port, parameter names in any case",
            f, "10.0.0.1:1000", FWD, &[b"proto=http;For=\"198.51.100.7:80\""], "198.51.100.7"),
        ("Forwarded: chain of trusted proxies",
            f, "10.0.0.1:1000", FWD, &[b"for=6.6.6.6, for=198.51.100.7, for=10.1.1.1;by=10.0.0.1"], "198.51.100.7"),
        ("Forwarded: several lines",
            f, "10.0.0.1:1000", FWD, &[b"for=198.51.100.7", b"for=10.1.1.1"], "198.51.100.7"),
        ("Forwarded: unknown stops at the peer",
            f, "10.0.0.1:1000", FWD, &[b"for=unknown"], "10.0.0.1"),
        ("Forwarded: obfuscated node stops at the hop that wrote it",
            f, "10.0.0.1:1000", FWD, &[b"for=_hidden, for=10.1.1.1"], "10.1.1.1"),
        ("Forwarded: element without for= is malformed",
            f, "10.0.0.1:1000", FWD, &[b"for=198.51.100.7, proto=https"], "10.0.0.1"),
        ("Forwarded: duplicate for= is malformed",
            f, "10.0.0.1:1000", FWD, &[b"for=198.51.100.7;for=198.51.100.8"], "10.0.0.1"),
        ("Forwarded: unterminated quote is malformed",
            f, "10.0.0.1:1000", FWD, &[b"for=\"198.51.100.7"], "10.0.0.1"),
        ("Forwarded: spoofed by an untrusted peer is ignored",
            f, "203.0.113.9:1000", FWD, &[b"for=198.51.100.7"], "203.0.113.9"),
        ("Forwarded mode ignores X-Forwarded-For",
            f, "10.0.0.1:1000", XFF, &[b"198.51.100.7"], "10.0.0.1"),

        ("Either: X-Forwarded-For alone is read",
            e, "10.0.0.1:1000", XFF, &[b"198.51.100.7"], "198.51.100.7"),
        ("Either: Forwarded alone is read",
            e, "10.0.0.1:1000", FWD, &[b"for=5.6.0.2"], "5.6.0.2"),
        ("Either: Forwarded quoted, with proto, For=, IPv6 with port",
            e, "10.0.0.1:1000", FWD, &[b"proto=https;For=\"[2001:db8::9]:80\""], "2001:db8::9"),
        ("Either: spoofed by an untrusted peer is ignored",
            e, "203.0.113.9:1000", FWD, &[b"for=5.6.0.2"], "203.0.113.9"),
    ];
    for (what, mode, peer, header, lines, want) in cases {
        let extractor = TrustedProxyIp::new(trusted()).header(*mode);
        let req = request(Some(peer), header, lines);
        let got = extractor.extract(&req).unwrap();
        assert_eq!(got, ip(want), "{what}");
    }
}

#[test]
fn trusted_proxy_ip_either_believes_neither_header_when_both_are_sent() {
    let extractor = TrustedProxyIp::new(trusted()).header(ForwardedHeader::Either);
    let mut req = request(Some("10.0.0.1:1000"), XFF, &[b"198.51.100.7"]);
    req.headers_mut()
        .insert("forwarded", HeaderValue::from_static("for=198.51.100.8"));
    assert_eq!(extractor.extract(&req).unwrap(), ip("10.0.0.1"));
}

#[test]
fn trusted_proxy_ip_with_no_trusted_proxies_is_the_peer() {
    let extractor = TrustedProxyIp::new(Vec::new());
    let req = request(Some("10.0.0.1:1"), XFF, &[b"198.51.100.7"]);
    assert_eq!(extractor.extract(&req).unwrap(), ip("10.0.0.1"));
    assert!(extractor.forwarded().trusted().is_empty());
}

#[test]
fn trusted_proxy_ip_without_peer_is_missing_the_peer() {
    let extractor = TrustedProxyIp::new(trusted());
    let err = extractor
        .extract(&request(None, XFF, &[b"198.51.100.7"]))
        .unwrap_err();
    assert!(err.what().starts_with("peer address"), "{err}");
}

#[test]
fn peer_ip_reads_the_socket_addr_and_ignores_the_port() {
    let a = PeerIp
        .extract(&request(Some("192.0.2.1:1000"), XFF, &[]))
        .unwrap();
    let b = PeerIp
        .extract(&request(Some("192.0.2.1:2000"), XFF, &[]))
        .unwrap();
    assert_eq!((a, b), (ip("192.0.2.1"), ip("192.0.2.1")));
    let mapped = PeerIp
        .extract(&request(Some("[::ffff:192.0.2.1]:1000"), XFF, &[]))
        .unwrap();
    assert_eq!(mapped, ip("192.0.2.1"));
    let v6 = PeerIp
        .extract(&request(Some("[2001:db8::1]:1"), XFF, &[]))
        .unwrap();
    assert_eq!(v6, ip("2001:db8::1"));
    // A forwarding header means nothing to PeerIp.
    let spoof = PeerIp
        .extract(&request(Some("192.0.2.1:1"), XFF, &[b"1.2.3.4"]))
        .unwrap();
    assert_eq!(spoof, ip("192.0.2.1"));
}

#[test]
fn peer_ip_without_peer_names_what_is_missing() {
    let err: MissingKey = PeerIp.extract(&Request::new(())).unwrap_err();
    assert!(
        err.what()
            .starts_with("peer address (a std::net::SocketAddr"),
        "{err}"
    );
    assert!(
        err.to_string().contains("in the request extensions"),
        "{err}"
    );
}

#[cfg(feature = "axum")]
#[test]
fn peer_ip_reads_axum_connect_info() {
    let mut req = Request::new(());
    req.extensions_mut().insert(axum::extract::ConnectInfo(
        "192.0.2.9:1234".parse::<SocketAddr>().unwrap(),
    ));
    assert_eq!(PeerIp.extract(&req).unwrap(), ip("192.0.2.9"));
    assert!(PeerIp
        .extract(&Request::new(()))
        .unwrap_err()
        .what()
        .contains("ConnectInfo"));
}

#[test]
fn header_key_keys_by_value_and_names_a_missing_header() {
    let key = HeaderKey::new(HeaderName::from_static("x-api-key"));
    let a1 = key
        .extract(&request(None, "x-api-key", &[b"alpha"]))
        .unwrap();
    let a2 = key
        .extract(&request(None, "x-api-key", &[b"alpha"]))
        .unwrap();
    let b = key
        .extract(&request(None, "x-api-key", &[b"beta"]))
        .unwrap();
    assert_eq!(a1, a2);
    assert_ne!(a1, b);
    // Clones agree (the layer clones its extractor into every service).
    assert_eq!(
        key.clone()
            .extract(&request(None, "x-api-key", &[b"alpha"]))
            .unwrap(),
        a1
    );
    // A long value is still a 16-byte key.
    let long = vec![b'x'; 8192];
    assert!(key.extract(&request(None, "x-api-key", &[&long])).is_ok());
    assert_eq!(std::mem::size_of_val(&a1), 16);

    let err = key
        .extract(&request(None, "x-other", &[b"alpha"]))
        .unwrap_err();
    assert_eq!(err.what(), "header `x-api-key`");
}

#[test]
fn key_fn_uses_the_closure_and_its_missing_description() {
    let by_path = key_fn(|req: &Request<()>| {
        req.uri()
            .path()
            .strip_prefix("/t/")
            .map(|tenant| tenant.to_owned())
    });
    let req = Request::get("/t/acme").body(()).unwrap();
    assert_eq!(by_path.extract(&req).unwrap(), "acme");
    let root = Request::get("/").body(()).unwrap();
    assert!(by_path
        .extract(&root)
        .unwrap_err()
        .what()
        .contains("key function"));
    let named = by_path.missing("tenant in the path");
    assert_eq!(
        named.extract(&root).unwrap_err().what(),
        "tenant in the path"
    );
}

#[test]
fn global_key_is_one_key_for_everything() {
    assert_eq!(
        KeyExtractor::<Request<()>>::extract(&GlobalKey, &Request::new(())),
        Ok(())
    );
    assert_eq!(KeyExtractor::<u32>::extract(&GlobalKey, &7), Ok(()));
}

#[test]
fn trusted_networks_are_ipnets() {
    let net: IpNet = "192.168.0.0/16".parse().unwrap();
    let host = IpNet::from(ip("::1"));
    assert_eq!(host.prefix_len(), 128);
    let key = TrustedProxyIp::new([net, host]);
    assert_eq!(key.trusted(), &[net, host]);
    assert!(key.is_trusted(ip("192.168.44.1")));
    assert!(!key.is_trusted(ip("192.169.0.1")));
    assert!(key.is_trusted(ip("::1")));
    assert!(!key.is_trusted(ip("::2")));
    // What dual-stack sockets report for an IPv4 peer.
    assert!(key.is_trusted(ip("::ffff:192.168.1.1")));
    assert!("10.0.0.0/8, nope".parse::<IpNet>().is_err());
}

fn hello() -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
    })
}

#[tokio::test]
async fn http_mode_missing_peer_is_a_500_naming_it() {
    let svc = TokenBucketLayer::builder(Rate::per_second(1.0), Burst(1))
        .key(PeerIp)
        .build()
        .http()
        .layer(hello());
    let res = svc.oneshot(Request::new(Full::default())).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(res.headers()["content-type"], "application/json");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let body = std::str::from_utf8(&body).unwrap();
    assert!(
        body.starts_with(r#"{"error":"rate_limit_key_missing","message":"rate limit key missing: no peer address (a std::net::SocketAddr"#),
        "{body}"
    );
    // It says what to do.
    assert!(
        body.contains("`into_make_service_with_connect_info::<SocketAddr>()`"),
        "{body}"
    );
}

#[tokio::test]
async fn http_mode_missing_header_is_a_500_naming_the_header() {
    let svc = TokenBucketLayer::builder(Rate::per_second(1.0), Burst(1))
        .key(HeaderKey::new(HeaderName::from_static("x-api-key")))
        .build()
        .http()
        .layer(hello());
    let res = svc
        .clone()
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(
        std::str::from_utf8(&body)
            .unwrap()
            .contains("no header `x-api-key`"),
        "{body:?}"
    );
    let mut req = Request::new(Full::default());
    req.headers_mut()
        .insert("x-api-key", HeaderValue::from_static("k1"));
    assert_eq!(svc.oneshot(req).await.unwrap().status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn http_mode_behind_a_trusted_proxy_limits_each_client() {
    let svc = TokenBucketLayer::builder(Rate::per_second(1.0), Burst(1))
        .key(TrustedProxyIp::new(trusted()))
        .build()
        .http()
        .layer(hello());
    let via_proxy = |client: &'static str| {
        let mut req = Request::new(Full::default());
        req.extensions_mut()
            .insert("10.0.0.1:443".parse::<SocketAddr>().unwrap());
        req.headers_mut()
            .insert(XFF, HeaderValue::from_static(client));
        req
    };
    let status = |res: Response<_>| res.status();
    assert_eq!(
        status(
            svc.clone()
                .oneshot(via_proxy("198.51.100.1"))
                .await
                .unwrap()
        ),
        StatusCode::OK
    );
    assert_eq!(
        status(
            svc.clone()
                .oneshot(via_proxy("198.51.100.2"))
                .await
                .unwrap()
        ),
        StatusCode::OK
    );
    assert_eq!(
        status(
            svc.clone()
                .oneshot(via_proxy("198.51.100.1"))
                .await
                .unwrap()
        ),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Spoofing a new address from behind the proxy does not help: the proxy appends the
    // real one, which is what counts.
    assert_eq!(
        status(
            svc.clone()
                .oneshot(via_proxy("1.2.3.4, 198.51.100.1"))
                .await
                .unwrap()
        ),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[cfg(feature = "axum")]
#[tokio::test(start_paused = true)]
async fn drops_into_axum_with_a_plain_layer_call() {
    use axum::{body::Body, extract::ConnectInfo, routing::get, Router};

    let app: Router = Router::new().route("/", get(|| async { "hello" })).layer(
        TokenBucketLayer::builder(Rate::per_second(1.0), Burst(1))
            .key(PeerIp)
            .build()
            .http(),
    );
    let req = || {
        let mut req = Request::new(Body::empty());
        req.extensions_mut()
            .insert(ConnectInfo("192.0.2.1:5000".parse::<SocketAddr>().unwrap()));
        req
    };
    assert_eq!(
        app.clone().oneshot(req()).await.unwrap().status(),
        StatusCode::OK
    );
    let limited = app.clone().oneshot(req()).await.unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers()["retry-after"], "1");
}
