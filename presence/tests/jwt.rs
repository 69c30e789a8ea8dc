//! JWT credentials, in-process: a table of tokens and calls with the status each
//! must get (expired, not yet valid, wrong algorithm, `none`, tampered, wrong `sub`,
//! missing scope, admin), the configuration errors, and the SDK's rotating token.
//! The keys in `tests/keys/` were generated for these tests only.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use presence::client::PresenceClient;
use presence::config::Config;
use presence::server::{JwtVerifier, PresenceService};
use presence::store::MemoryStore;
use serde_json::{json, Value};
use tower::ServiceExt;

const SECRET: &str = "test-secret-of-the-jwt-table";
const STATIC: &str = "static-admin-token";
const ED_PRIVATE: &[u8] = include_bytes!("keys/ed25519-private.pem");
const ED_PUBLIC: &[u8] = include_bytes!("keys/ed25519-public.pem");
const RSA_PRIVATE: &[u8] = include_bytes!("keys/rsa-private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("keys/rsa-public.pem");

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn config_with(public: &[u8]) -> Config {
    let dir = std::env::temp_dir().join(format!("presence-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("key-{}.pem", public.len()));
    std::fs::write(&path, public).expect("key file");
    let path = path.to_string_lossy().into_owned();
    Config::from_lookup(|var| match var {
        "PRESENCE_JWT_SECRET" => Some(SECRET.to_owned()),
        "PRESENCE_JWT_PUBLIC_KEY_FILE" => Some(path.clone()),
        "PRESENCE_AUTH_TOKEN" => Some(STATIC.to_owned()),
        "PRESENCE_RATE_LIMIT_RATE" => Some("1000000".to_owned()),
        "PRESENCE_RATE_LIMIT_CAPACITY" => Some("1000000".to_owned()),
        _ => None,
    })
    .expect("config")
}

fn service(public: &[u8]) -> PresenceService {
    PresenceService::new(Arc::new(MemoryStore::new()), &config_with(public))
        .with_default_peer(([127, 0, 0, 1], 40000).into())
}

fn hs256(claims: Value) -> String {
    let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("key");
    encode(&Header::new(Algorithm::HS256), &claims, &key).expect("token")
}

fn signed(alg: Algorithm, pem: &[u8], claims: Value) -> String {
    let key = match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem),
        _ => EncodingKey::from_rsa_pem(pem),
    }
    .expect("key");
    encode(&Header::new(alg), &claims, &key).expect("token")
}

fn claims(sub: &str, scope: &str) -> Value {
    json!({"sub": sub, "scope": scope, "exp": now() + 600})
}

/// The call, and the lease of the node it names (logged in with the static token).
async fn call(
    svc: &PresenceService,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let mut req = http::Request::builder().method(method).uri(path);
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    if method == "POST" {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let res = svc.clone().oneshot(req).await.expect("infallible");
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// One row of the table: a name, the token, and the status of each call.
type Row<'a> = (&'a str, Option<String>, Vec<(Call, u16)>);

/// The calls of the table: what each needs.
#[derive(Clone, Copy, Debug)]
enum Call {
    List,
    GetN1,
    LoginN1,
    HeartbeatN1,
    LoginN2,
}

async fn run(svc: &PresenceService, token: Option<&str>, c: Call) -> u16 {
    // A lease for n1 made with full access, so heartbeats are judged on the token.
    let (_, login) = call(
        svc,
        Some(STATIC),
        "POST",
        "/presence/login",
        json!({"node_id": "n1"}),
    )
    .await;
    let lease = login["lease_id"].as_str().unwrap_or_default().to_owned();
    let (status, _) = match c {
        Call::List => call(svc, token, "GET", "/presence", Value::Null).await,
        Call::GetN1 => call(svc, token, "GET", "/presence/n1", Value::Null).await,
        Call::LoginN1 => {
            call(
                svc,
                token,
                "POST",
                "/presence/login",
                json!({"node_id": "n1"}),
            )
            .await
        }
        Call::HeartbeatN1 => {
            call(
                svc,
                token,
                "POST",
                "/presence/heartbeat",
                json!({"node_id": "n1", "lease_id": lease}),
            )
            .await
        }
        Call::LoginN2 => {
            call(
                svc,
                token,
                "POST",
                "/presence/login",
                json!({"node_id": "n2"}),
            )
            .await
        }
    };
    status
}

#[tokio::test]
async fn every_token_gets_the_status_its_claims_allow() {
    use Call::*;
    let svc = service(ED_PUBLIC);
    let t = now();
    let tampered = {
        let token = hs256(claims("n1", "presence:read"));
        let parts: Vec<&str> = token.split('.').collect();
        let payload = URL_SAFE_NO_PAD
            .encode(json!({"sub": "n1", "scope": "presence:admin", "exp": t + 600}).to_string());
        format!("{}.{payload}.{}", parts[0], parts[2])
    };
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD
            .encode(json!({"sub": "n1", "scope": "presence:admin", "exp": t + 600}).to_string())
    );
    // HS256 keyed with the public key's bytes: the classic alg confusion.
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims("n1", "presence:admin"),
        &EncodingKey::from_secret(ED_PUBLIC).expect("key"),
    )
    .expect("token");
    let wrong_secret = encode(
        &Header::new(Algorithm::HS256),
        &claims("n1", "presence:admin"),
        &EncodingKey::from_secret(b"another secret").expect("key"),
    )
    .expect("token");
    let table: Vec<Row<'_>> = vec![
        ("no token", None, vec![(List, 401), (LoginN1, 401)]),
        (
            "garbage",
            Some("abc".into()),
            vec![(List, 401), (LoginN1, 401)],
        ),
        (
            "the static token",
            Some(STATIC.into()),
            vec![(List, 200), (LoginN2, 200), (HeartbeatN1, 200)],
        ),
        (
            "read",
            Some(hs256(claims("n1", "presence:read"))),
            vec![
                (List, 200),
                (GetN1, 200),
                (LoginN1, 403),
                (HeartbeatN1, 403),
            ],
        ),
        (
            "write for n1",
            Some(hs256(claims("n1", "presence:write"))),
            vec![
                (LoginN1, 200),
                (HeartbeatN1, 200),
                (LoginN2, 403),
                (List, 403),
                (GetN1, 403),
            ],
        ),
        (
            "write for n2 (wrong sub)",
            Some(hs256(claims("n2", "presence:write"))),
            vec![(HeartbeatN1, 403), (LoginN1, 403), (LoginN2, 200)],
        ),
        (
            "no scope",
            Some(hs256(json!({"sub": "n1", "exp": t + 600}))),
            vec![(List, 403), (LoginN1, 403)],
        ),
        (
            "admin",
            Some(hs256(claims("n9", "presence:admin"))),
            vec![
                (List, 200),
                (LoginN1, 200),
                (LoginN2, 200),
                (HeartbeatN1, 200),
            ],
        ),
        (
            "several scopes",
            Some(hs256(claims("n1", "other presence:read presence:write"))),
            vec![(List, 200), (LoginN1, 200), (LoginN2, 403)],
        ),
        (
            "expired",
            Some(hs256(
                json!({"sub": "n1", "scope": "presence:write", "exp": t - 120}),
            )),
            vec![(LoginN1, 401)],
        ),
        (
            "expired within the leeway",
            Some(hs256(
                json!({"sub": "n1", "scope": "presence:write", "exp": t - 10}),
            )),
            vec![(LoginN1, 200)],
        ),
        (
            "without exp",
            Some(hs256(json!({"sub": "n1", "scope": "presence:write"}))),
            vec![(LoginN1, 401)],
        ),
        (
            "nbf in the future",
            Some(hs256(
                json!({"sub": "n1", "scope": "presence:write", "exp": t + 600, "nbf": t + 120}),
            )),
            vec![(LoginN1, 401)],
        ),
        (
            "nbf within the leeway",
            Some(hs256(
                json!({"sub": "n1", "scope": "presence:write", "exp": t + 600, "nbf": t + 10}),
            )),
            vec![(LoginN1, 200)],
        ),
        (
            "tampered payload",
            Some(tampered),
            vec![(List, 401), (LoginN2, 401)],
        ),
        ("alg none", Some(none), vec![(List, 401), (LoginN2, 401)]),
        (
            "HS256 keyed with the public key",
            Some(confused),
            vec![(List, 401), (LoginN2, 401)],
        ),
        ("another secret", Some(wrong_secret), vec![(List, 401)]),
        (
            "EdDSA, write for n1",
            Some(signed(
                Algorithm::EdDSA,
                ED_PRIVATE,
                claims("n1", "presence:write"),
            )),
            vec![(LoginN1, 200), (LoginN2, 403)],
        ),
        (
            "RS256 with no RSA key configured",
            Some(signed(
                Algorithm::RS256,
                RSA_PRIVATE,
                claims("n1", "presence:admin"),
            )),
            vec![(List, 401)],
        ),
    ];
    for (name, token, calls) in &table {
        for &(c, want) in calls {
            let got = run(&svc, token.as_deref(), c).await;
            assert_eq!(got, want, "{name}: {c:?}");
        }
    }

    // The RSA key, configured instead of the Ed25519 one, takes RS256 tokens.
    let rsa = service(RSA_PUBLIC);
    let token = signed(
        Algorithm::RS256,
        RSA_PRIVATE,
        claims("n1", "presence:admin"),
    );
    assert_eq!(run(&rsa, Some(&token), Call::LoginN2).await, 200);
    let ed = signed(Algorithm::EdDSA, ED_PRIVATE, claims("n1", "presence:admin"));
    assert_eq!(run(&rsa, Some(&ed), Call::List).await, 401);

    // Errors say what, never which check failed beyond that.
    let (status, body) = call(
        &svc,
        Some(&hs256(claims("n1", "presence:read"))),
        "POST",
        "/presence/login",
        json!({"node_id": "n1"}),
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    let (status, body) = call(&svc, Some("abc"), "GET", "/presence", Value::Null).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
}

#[test]
fn bad_key_configuration_names_the_variable() {
    let dir = std::env::temp_dir().join(format!("presence-jwt-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ec = dir.join("p256.pem");
    std::fs::write(&ec, include_bytes!("keys/p256-public.pem")).expect("write");
    let private = dir.join("ed-private.pem");
    std::fs::write(&private, ED_PRIVATE).expect("write");
    let cases = [
        ("PRESENCE_JWT_SECRET", String::new()),
        (
            "PRESENCE_JWT_PUBLIC_KEY_FILE",
            dir.join("missing.pem").to_string_lossy().into_owned(),
        ),
        (
            "PRESENCE_JWT_PUBLIC_KEY_FILE",
            ec.to_string_lossy().into_owned(),
        ),
        (
            "PRESENCE_JWT_PUBLIC_KEY_FILE",
            private.to_string_lossy().into_owned(),
        ),
    ];
    for (var, value) in cases {
        let err = Config::from_lookup(|v| (v == var).then(|| value.clone()))
            .err()
            .unwrap_or_else(|| panic!("{var}={value:?} must be refused"));
        assert!(err.to_string().contains(var), "{err}");
        assert!(!err.to_string().contains(SECRET));
    }
}

#[tokio::test]
async fn the_sdk_asks_for_a_fresh_token_on_every_request() {
    let svc = service(ED_PUBLIC);
    let good = hs256(claims("n1", "presence:write"));
    let calls = Arc::new(AtomicUsize::new(0));
    let asked = calls.clone();
    let tokens = [good.clone(), good.clone(), "revoked".to_owned(), good];
    let pc = PresenceClient::builder("http://presence.test/presence")
        .service(svc)
        .no_rate_limit()
        .no_retry()
        .bearer_token_fn(move || {
            let n = asked.fetch_add(1, Ordering::SeqCst);
            tokens[n.min(tokens.len() - 1)].clone()
        })
        .build()
        .expect("client");
    pc.login("n1").await.expect("login with the first token");
    pc.heartbeat("n1").await.expect("heartbeat with the second");
    assert!(
        pc.heartbeat("n1").await.is_err(),
        "the third token is refused"
    );
    pc.heartbeat("n1").await.expect("the fourth works again");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

// The cache of verified tokens.

fn verifier() -> JwtVerifier {
    JwtVerifier::new(Some(SECRET.as_bytes()), None).expect("verifier")
}

/// `token` with the byte at `at` replaced by another base64url character.
fn with_byte_changed(token: &str, at: usize) -> String {
    let mut bytes = token.as_bytes().to_vec();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).expect("ascii")
}

#[test]
fn a_verified_token_is_answered_from_the_cache() {
    let v = verifier();
    let token = hs256(claims("n1", "presence:write"));
    let first = v.verify(&token).expect("valid");
    assert_eq!((v.cache_len(), v.cache_hits()), (1, 0));
    let second = v.verify(&token).expect("still valid");
    assert_eq!(first, second);
    assert!(second.can_write("n1") && !second.can_write("n2") && !second.can_read());
    assert_eq!((v.cache_len(), v.cache_hits()), (1, 1));
    // Another token is verified on its own.
    let read = v
        .verify(&hs256(claims("n2", "presence:read")))
        .expect("valid");
    assert!(read.can_read() && !read.can_write("n2"));
    assert_eq!((v.cache_len(), v.cache_hits()), (2, 1));
    // Disabled, nothing is stored.
    let off = verifier().with_cache_capacity(0);
    assert_eq!(off.cache_capacity(), 0);
    off.verify(&token).expect("valid");
    off.verify(&token).expect("valid");
    assert_eq!((off.cache_len(), off.cache_hits()), (0, 0));
}

#[test]
fn a_cached_token_expires_when_an_uncached_one_would() {
    let leeway = presence::server::JWT_LEEWAY_SECS;
    let t = now();
    let exp = t + 600;
    let nbf = t + 10;
    let token = hs256(json!({"sub": "n1", "scope": "presence:write", "exp": exp, "nbf": nbf}));
    let v = verifier();
    v.verify(&token).expect("valid (nbf within the leeway)");
    assert_eq!(v.cache_len(), 1);
    // The last second of `exp` plus the leeway, then the one after.
    assert!(v.verify_at(&token, exp + leeway).is_ok());
    let err = v.verify_at(&token, exp + leeway + 1).expect_err("expired");
    assert_eq!(err.to_string(), "ExpiredSignature");
    // `nbf` too: the first second allowed, and the one before.
    assert!(v.verify_at(&token, nbf - leeway).is_ok());
    let err = v.verify_at(&token, nbf - leeway - 1).expect_err("not yet");
    assert_eq!(err.to_string(), "ImmatureSignature");
    assert_eq!(v.cache_hits(), 4, "all answered by the cache");
    // And it still works now.
    assert!(v.verify(&token).is_ok());

    // On the system clock: a token at the end of its leeway, cached, then refused
    // once that second has passed, with the message of a full check.
    let exp = now() - leeway;
    let token = hs256(json!({"sub": "n1", "scope": "presence:write", "exp": exp}));
    v.verify(&token).expect("within the leeway");
    while now() <= exp + leeway {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let hits = v.cache_hits();
    let cached = v.verify(&token).expect_err("expired");
    assert_eq!(v.cache_hits(), hits + 1);
    let full = verifier()
        .with_cache_capacity(0)
        .verify(&token)
        .expect_err("expired");
    assert_eq!(cached, full);
}

#[test]
fn a_token_one_byte_off_a_cached_one_is_verified_in_full() {
    let v = verifier();
    let token = hs256(claims("n1", "presence:write"));
    v.verify(&token).expect("valid");
    let dots: Vec<usize> = token.match_indices('.').map(|(i, _)| i).collect();
    // A byte of the header, of the payload, of the signature, and the last one.
    for at in [1, dots[0] + 3, dots[1] + 3, token.len() - 2] {
        let changed = with_byte_changed(&token, at);
        assert_ne!(changed, token);
        assert!(v.verify(&changed).is_err(), "byte {at} changed");
    }
    // One more and one less byte.
    assert!(v.verify(&format!("{token}A")).is_err());
    assert!(v.verify(&token[..token.len() - 1]).is_err());
    assert_eq!(
        (v.cache_len(), v.cache_hits()),
        (1, 0),
        "refusals add nothing"
    );
    assert!(v.verify(&token).is_ok());
    assert_eq!(v.cache_hits(), 1);
}

#[test]
fn the_cache_never_grows_past_its_bound() {
    let v = verifier().with_cache_capacity(64);
    assert_eq!(v.cache_capacity(), 64);
    let exp = now() + 600;
    let tokens: Vec<String> = (0..1000)
        .map(|i| hs256(json!({"sub": format!("n{i}"), "scope": "presence:write", "exp": exp})))
        .collect();
    for (i, token) in tokens.iter().enumerate() {
        let access = v.verify(token).expect("valid");
        assert!(access.can_write(&format!("n{i}")));
        assert!(v.cache_len() <= 64, "{} entries", v.cache_len());
        // Just stored, so found.
        let hits = v.cache_hits();
        assert_eq!(v.verify(token).expect("valid"), access);
        assert_eq!(v.cache_hits(), hits + 1);
    }
    assert!(v.cache_len() > 0);
    // Garbage adds nothing, and evicts nothing.
    let len = v.cache_len();
    for (i, token) in tokens.iter().enumerate().take(200) {
        assert!(v.verify(&format!("garbage.{i}.x")).is_err());
        assert!(v
            .verify(&with_byte_changed(token, token.len() - 2))
            .is_err());
    }
    assert_eq!(v.cache_len(), len);
    // The default bound.
    assert_eq!(verifier().cache_capacity(), 16_384);
}
