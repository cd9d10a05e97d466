//! JWT subscriber tokens (`[push.jwt]`): where a token may come from, what makes one invalid
//! (401) or insufficient (403), algorithms fixed by config, and key files read at startup and
//! on reload.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;

const SECRET: &str = "test-secret-for-hs256-0123456789abcdef";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims valid for 10 minutes that allow `channels`.
fn claims(channels: &[&str]) -> Value {
    json!({ "sub": "u1", "exp": now() + 600, "crier.subscribe": channels })
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("sign")
}

fn hs(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

fn rs(claims: &Value) -> String {
    let pem = std::fs::read(fixture("rsa.key")).unwrap();
    sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&pem).unwrap(),
        claims,
    )
}

fn es(claims: &Value) -> String {
    let pem = std::fs::read(fixture("ec.key")).unwrap();
    sign(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(&pem).unwrap(),
        claims,
    )
}

/// `alg: none`: a header, claims and an empty signature.
fn unsigned(claims: &Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    )
}

/// A temp dir holding the HS256 secret (with the newline an editor adds).
fn secret_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("jwt.key");
    std::fs::write(&p, format!("{SECRET}\n")).unwrap();
    (dir, p)
}

fn hs_location(path: &str, secret: &Path, extra: &str) -> String {
    format!(
        "[[push]]\npath = \"{path}\"\nlongpoll_timeout = \"50ms\"\n{extra}\
         [push.jwt]\nsecret_file = \"{}\"\ncookie = \"crier_token\"\n",
        secret.display()
    )
}

/// A long-poll with `Authorization: Bearer token`: the status and the body.
async fn poll(c: &Crier, path: &str, token: Option<&str>) -> (u16, String, Option<String>) {
    let mut req = client().get(c.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("long-poll");
    let status = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    (status, r.text().await.unwrap(), challenge)
}

#[tokio::test]
async fn a_token_opens_every_transport_from_every_source() {
    let up = Upstream::start().await;
    let (_d, secret) = secret_dir();
    let c = Crier::start(&up.url(), &hs_location("/live/{channel}", &secret, "")).await;
    let token = hs(&claims(&["news"]));

    // SSE (fast path) with Authorization: Bearer.
    let mut conn = raw::RawConn::connect(c.public).await;
    conn.send(format!(
        "GET /live/news HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\n\r\n"
    ))
    .await;
    // SSE over HTTP/2 (through hyper).
    let h2 = h2_client()
        .get(c.url("/live/news"))
        .header("accept", "text/event-stream")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(h2.status(), 200);
    let mut h2 = SseClient::from_response(h2);
    // WebSocket with ?access_token= (browsers cannot set headers on a WebSocket).
    let (mut ws, _) = ws_connect(&c.ws_url(&format!("/live/news?access_token={token}")), &[]).await;
    wait_subscribers(&c, "news", 3).await;
    c.publish("news", "hello").await;
    let mut head = String::new();
    for _ in 0..20 {
        match conn.read_until_closed(Duration::from_millis(250)).await {
            raw::ReadEnd::StillOpen(b) => head.push_str(&String::from_utf8_lossy(&b)),
            raw::ReadEnd::Closed(b) => panic!("closed: {}", String::from_utf8_lossy(&b)),
        }
        if head.contains("data: hello") {
            break;
        }
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("data: hello"), "{head}");
    assert_eq!(
        h2.next_within(Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap()
            .data,
        "hello"
    );
    assert_eq!(
        ws_next(&mut ws)
            .await
            .unwrap()
            .into_text()
            .unwrap()
            .as_str(),
        "hello"
    );

    // Long-poll with the configured cookie.
    let r = client()
        .get(c.url("/live/news?last_event_id=earliest"))
        .header("cookie", format!("other=1; crier_token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello");
    assert_eq!(
        metric(
            &c,
            "crier_auth_checks_total{method=\"jwt\",result=\"allow\"}"
        )
        .await,
        Some(4.0)
    );
    c.shutdown().await;
}

#[tokio::test]
async fn missing_bad_expired_and_unsigned_tokens_are_401() {
    let up = Upstream::start().await;
    let (_d, secret) = secret_dir();
    let c = Crier::start(
        &up.url(),
        &format!(
            "{}[[push]]\npath = \"/nocookie/{{channel}}\"\nchannel_prefix = \"nc:\"\nlongpoll_timeout = \"50ms\"\n\
             [push.jwt]\nsecret_file = \"{}\"\n",
            hs_location("/live/{channel}", &secret, ""),
            secret.display()
        ),
    )
    .await;
    let ok = |v: &Value| hs(v);
    let (s, body, ch) = poll(&c, "/live/a", None).await;
    assert_eq!(
        (s, ch.as_deref()),
        (401, Some("Bearer realm=\"crier\"")),
        "{body}"
    );

    let cases: Vec<(&str, String)> = vec![
        ("garbage", "not.a.token".to_string()),
        (
            "wrong secret",
            sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(b"another-secret-another-secret-12345"),
                &claims(&["a"]),
            ),
        ),
        (
            "expired",
            ok(&json!({"exp": now() - 120, "crier.subscribe": ["a"]})),
        ),
        (
            "not yet valid",
            ok(&json!({"exp": now() + 600, "nbf": now() + 120, "crier.subscribe": ["a"]})),
        ),
        ("no exp", ok(&json!({"crier.subscribe": ["a"]}))),
        ("alg none", unsigned(&claims(&["a"]))),
        (
            "HS384 is not the configured algorithm",
            sign(
                Algorithm::HS384,
                &EncodingKey::from_secret(SECRET.as_bytes()),
                &claims(&["a"]),
            ),
        ),
    ];
    for (what, token) in &cases {
        let (s, body, ch) = poll(&c, "/live/a", Some(token)).await;
        assert_eq!(s, 401, "{what}: {body}");
        assert_eq!(
            ch.as_deref(),
            Some("Bearer realm=\"crier\", error=\"invalid_token\""),
            "{what}"
        );
        assert!(body.starts_with("invalid token: "), "{what}: {body}");
    }
    assert!(poll(&c, "/live/a", Some(&cases[2].1))
        .await
        .1
        .contains("expired"));
    assert!(poll(&c, "/live/a", Some(&cases[1].1))
        .await
        .1
        .contains("signature"));

    // Within the leeway (30 s by default) a token is still good.
    let late = ok(&json!({"exp": now() - 10, "nbf": now() + 10, "crier.subscribe": ["a"]}));
    assert_eq!(poll(&c, "/live/a", Some(&late)).await.0, 304);

    // The cookie counts only where it is configured.
    let token = ok(&claims(&["a"]));
    let with_cookie = |path: &str| {
        client()
            .get(c.url(path))
            .header("cookie", format!("crier_token={token}"))
            .send()
    };
    assert_eq!(with_cookie("/live/a").await.unwrap().status(), 304);
    assert_eq!(with_cookie("/nocookie/a").await.unwrap().status(), 401);

    // WebSocket and SSE are refused the same way.
    let expired = &cases[2].1;
    match ws_try_connect(&c.ws_url(&format!("/live/a?access_token={expired}")), &[]).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    let r = client()
        .get(c.url("/live/a"))
        .header("accept", "text/event-stream")
        .bearer_auth(&cases[5].1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "alg none over SSE");
    assert_eq!(channel_info(&c, "a").await.0, 404, "nothing was subscribed");
    c.shutdown().await;
}

#[tokio::test]
async fn the_claim_names_the_channels_with_trailing_wildcards() {
    let up = Upstream::start().await;
    let (_d, secret) = secret_dir();
    let c = Crier::start(
        &up.url(),
        &format!(
            "{}{}",
            hs_location("/live/{channel}", &secret, ""),
            hs_location("/app/{channel}", &secret, "channel_prefix = \"app:\"\n")
        ),
    )
    .await;
    let orders = hs(&claims(&["orders.*", "news"]));
    for (path, want) in [
        ("/live/orders.1", 304),
        ("/live/orders.1.items", 304),
        ("/live/news", 304),
        ("/live/orders", 403),
        ("/live/ordersX", 403),
        ("/live/orders.", 403),
        ("/live/news2", 403),
        ("/live/xorders.1", 403),
    ] {
        let (s, body, ch) = poll(&c, path, Some(&orders)).await;
        assert_eq!(s, want, "{path}: {body}");
        if want == 403 {
            assert_eq!(
                ch.as_deref(),
                Some("Bearer realm=\"crier\", error=\"insufficient_scope\"")
            );
        }
    }
    let nested = hs(&json!({"exp": now() + 600, "crier": {"subscribe": ["room.*"]}}));
    assert_eq!(poll(&c, "/live/room.7", Some(&nested)).await.0, 304);
    assert_eq!(poll(&c, "/live/lobby", Some(&nested)).await.0, 403);
    let all = hs(&claims(&["*"]));
    assert_eq!(poll(&c, "/live/anything", Some(&all)).await.0, 304);
    let no_claim = hs(&json!({"exp": now() + 600}));
    assert_eq!(poll(&c, "/live/news", Some(&no_claim)).await.0, 403);
    // The claim names channels as the hub knows them: with the location's channel_prefix.
    assert_eq!(
        poll(&c, "/app/x", Some(&hs(&claims(&["app:x"])))).await.0,
        304
    );
    assert_eq!(poll(&c, "/app/x", Some(&hs(&claims(&["x"])))).await.0, 403);
    c.shutdown().await;
}

#[tokio::test]
async fn public_key_algorithms_are_fixed_by_config() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        &format!(
            "[[push]]\npath = \"/rs/{{channel}}\"\nlongpoll_timeout = \"50ms\"\n\
             [push.jwt]\npublic_key_file = \"{}\"\nalgorithm = \"RS256\"\n\
             [[push]]\npath = \"/es/{{channel}}\"\nchannel_prefix = \"es:\"\nlongpoll_timeout = \"50ms\"\n\
             [push.jwt]\npublic_key_file = \"{}\"\nalgorithm = \"ES256\"\n",
            fixture("rsa.pub").display(),
            fixture("ec.pub").display()
        ),
    )
    .await;
    let cl = claims(&["*"]);
    assert_eq!(poll(&c, "/rs/a", Some(&rs(&cl))).await.0, 304);
    assert_eq!(poll(&c, "/es/a", Some(&es(&cl))).await.0, 304);
    assert_eq!(
        poll(&c, "/rs/a", Some(&es(&cl))).await.0,
        401,
        "ES256 at an RS256 location"
    );
    assert_eq!(
        poll(&c, "/es/a", Some(&rs(&cl))).await.0,
        401,
        "RS256 at an ES256 location"
    );
    assert_eq!(
        poll(&c, "/rs/a", Some(&hs(&cl))).await.0,
        401,
        "HS256 at an RS256 location"
    );
    for (path, key) in [("/rs/a", "rsa.pub"), ("/es/a", "ec.pub")] {
        // Algorithm confusion: an HS256 token whose "secret" is the public key itself.
        let public = std::fs::read(fixture(key)).unwrap();
        let forged = sign(Algorithm::HS256, &EncodingKey::from_secret(&public), &cl);
        let (s, body, _) = poll(&c, path, Some(&forged)).await;
        assert_eq!(s, 401, "{path}: {body}");
        assert_eq!(
            poll(&c, path, Some(&unsigned(&cl))).await.0,
            401,
            "alg none"
        );
    }
    c.shutdown().await;
}

#[tokio::test]
async fn jwt_and_forward_auth_must_both_pass() {
    let up = Upstream::start().await;
    let (_d, secret) = secret_dir();
    let c = Crier::start(
        &up.url(),
        &hs_location(
            "/live/{channel}",
            &secret,
            "auth_request = \"/auth/check\"\n",
        ),
    )
    .await;
    let token = hs(&claims(&["a", "secret-a"]));
    let req = |cookie: bool, token: Option<&str>, ch: &str| {
        let query = token.map_or(String::new(), |t| format!("?access_token={t}"));
        let mut r = client().get(c.url(&format!("/live/{ch}{query}")));
        if cookie {
            r = r.header("cookie", "session=good");
        }
        r.send()
    };
    assert_eq!(
        req(true, None, "a").await.unwrap().status(),
        401,
        "no token"
    );
    assert_eq!(up.auth.calls(), 0, "a bad token never reaches the app");
    let r = req(false, Some(&token), "a").await.unwrap();
    assert_eq!(r.status(), 401, "token but no session");
    assert_eq!(r.text().await.unwrap(), "log in first\n");
    assert_eq!(req(true, Some(&token), "a").await.unwrap().status(), 304);
    assert_eq!(
        req(true, Some(&token), "secret-a").await.unwrap().status(),
        403,
        "the app says no"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn key_files_are_read_on_reload() {
    let up = Upstream::start().await;
    let (d, secret) = secret_dir();
    let extra = hs_location("/live/{channel}", &secret, "");
    let c = Crier::start(&up.url(), &extra).await;
    let old = hs(&claims(&["a"]));
    assert_eq!(poll(&c, "/live/a", Some(&old)).await.0, 304);

    let new_secret = "rotated-secret-rotated-secret-rotated-0001";
    std::fs::write(&secret, new_secret).unwrap();
    let toml = base_config(&up.url(), &d.path().join("p2.sock"), &extra);
    c.handle
        .reload(crier::Config::from_toml(&toml, None).unwrap())
        .unwrap();
    assert_eq!(
        poll(&c, "/live/a", Some(&old)).await.0,
        401,
        "the old key is gone"
    );
    let new = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(new_secret.as_bytes()),
        &claims(&["a"]),
    );
    assert_eq!(poll(&c, "/live/a", Some(&new)).await.0, 304);

    // A key file that went missing makes the new config invalid: the old one keeps running.
    std::fs::remove_file(&secret).unwrap();
    let e = c
        .handle
        .reload(crier::Config::from_toml(&toml, None).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("push.jwt.secret_file") && e.contains("jwt.key"),
        "{e}"
    );
    assert_eq!(poll(&c, "/live/a", Some(&new)).await.0, 304);
    c.shutdown().await;
}

/// Config errors for [push.jwt] name the key, its line:col and the file.
#[test]
fn bad_key_files_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.key");
    std::fs::write(&short, "too-short\n").unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let err = |jwt: &str| {
        let text = format!("[[push]]\npath = \"/live/{{channel}}\"\n[push.jwt]\n{jwt}");
        crier::keys::load_str(&text, Some(Path::new("c.toml")))
            .expect_err(jwt)
            .to_string()
    };
    let missing = dir.path().join("nope.key");
    let e = err(&format!("secret_file = \"{}\"\n", missing.display()));
    assert!(
        e.starts_with("c.toml:4:15: push.jwt.secret_file: cannot read "),
        "{e}"
    );
    assert!(e.contains("nope.key"), "{e}");
    let e = err(&format!("secret_file = \"{}\"\n", short.display()));
    assert!(
        e.contains("push.jwt.secret_file") && e.contains("at least 32 bytes"),
        "{e}"
    );
    let e = err(&format!(
        "public_key_file = \"{}\"\nalgorithm = \"RS256\"\n",
        garbage.display()
    ));
    assert!(
        e.contains("c.toml:4:19: push.jwt.public_key_file") && e.contains("garbage.pem"),
        "{e}"
    );
    let e = err(&format!(
        "public_key_file = \"{}\"\nalgorithm = \"RS256\"\n",
        fixture("rsa.key").display()
    ));
    assert!(e.contains("private key"), "{e}");
    let e = err(&format!(
        "public_key_file = \"{}\"\nalgorithm = \"RS256\"\n",
        fixture("rsa1024.pub").display()
    ));
    assert!(e.contains("rsa1024.pub") && e.contains("2048"), "{e}");
    let e = err(&format!(
        "public_key_file = \"{}\"\nalgorithm = \"ES256\"\n",
        fixture("rsa.pub").display()
    ));
    assert!(e.contains("P-256"), "{e}");
    let e = err(&format!(
        "public_key_file = \"{}\"\n",
        fixture("rsa.pub").display()
    ));
    assert!(
        e.contains("push.jwt.algorithm: needed with public_key_file"),
        "{e}"
    );
    let e = err(&format!(
        "public_key_file = \"{}\"\nalgorithm = \"HS256\"\n",
        fixture("rsa.pub").display()
    ));
    assert!(
        e.contains("c.toml:5:13: push.jwt.algorithm: HS256 takes secret_file"),
        "{e}"
    );
    let e = err(&format!(
        "public_key_file = \"{}\"\nalgorithm = \"none\"\n",
        fixture("rsa.pub").display()
    ));
    assert!(
        e.contains("c.toml:5:13: push.jwt.algorithm: \"none\" is not one of"),
        "{e}"
    );
    let e = err("cookie = \"tok\"\n");
    assert!(e.contains("c.toml:3:1: push.jwt: needs secret_file"), "{e}");
    let e = err(&format!(
        "secret_file = \"{}\"\npublic_key_file = \"{}\"\n",
        short.display(),
        fixture("rsa.pub").display()
    ));
    assert!(e.contains("not both"), "{e}");
    let e = err(&format!(
        "public_key_file = \"{}\"\nalgorithm = \"RS256\"\nleeway = \"2h\"\ncookie = \"a b\"\nissuer = \"x\"\n",
        fixture("rsa.pub").display()
    ));
    let lines: Vec<_> = e.lines().collect();
    assert_eq!(lines.len(), 3, "{e}");
    assert!(
        lines[0].contains("c.toml:6:10: push.jwt.leeway: at most"),
        "{e}"
    );
    assert!(
        lines[1].contains("c.toml:7:10: push.jwt.cookie: is not a cookie name"),
        "{e}"
    );
    assert!(
        lines[2].contains("c.toml:8:1: push.jwt.issuer: unknown key"),
        "{e}"
    );
}

#[test]
fn crier_check_names_a_missing_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("crier.toml");
    std::fs::write(
        &conf,
        "[[push]]\npath = \"/live/{channel}\"\n[push.jwt]\nsecret_file = \"keys/jwt.key\"\n",
    )
    .unwrap();
    let out = process::run_cli(&["check", "--config", conf.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("crier.toml:4:15: push.jwt.secret_file: cannot read"),
        "{err}"
    );
    assert!(
        err.contains(&dir.path().join("keys/jwt.key").display().to_string()),
        "relative to the config file: {err}"
    );
}
