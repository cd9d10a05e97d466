//! Forward auth (`auth_request`): the upstream app decides who may subscribe, for every
//! transport, including the SSE fast path; and the Origin check still comes first.

mod common;

use std::time::{Duration, Instant};

use common::raw::RawConn;
use common::*;
use tokio_tungstenite::tungstenite;

const AUTH: &str = "[[push]]\npath = \"/live/{channel}\"\nauth_request = \"/auth/check\"\n";

/// An SSE request head written in one piece, so the fast path (not hyper) parses it.
fn sse_head(path: &str, extra: &[(&str, &str)]) -> String {
    let mut h = format!("GET {path} HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n");
    for (k, v) in extra {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    h
}

async fn sse_fast(c: &Crier, path: &str, extra: &[(&str, &str)]) -> raw::RawResponse {
    let mut conn = RawConn::connect(c.public).await;
    conn.send(sse_head(path, extra)).await;
    conn.read_response().await
}

async fn get(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    sse: bool,
) -> reqwest::Response {
    let mut req = client.get(url);
    if sse {
        req = req.header("accept", "text/event-stream");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    tokio::time::timeout(Duration::from_secs(10), req.send())
        .await
        .expect("an answer within 10s")
        .expect("request")
}

/// The HTTP status (and response) of a refused WebSocket handshake.
async fn ws_refused(
    url: &str,
    headers: &[(&str, &str)],
) -> tungstenite::http::Response<Option<Vec<u8>>> {
    match ws_try_connect(url, headers).await {
        Err(tungstenite::Error::Http(resp)) => *resp,
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("the websocket handshake succeeded"),
    }
}

fn body_text(r: &tungstenite::http::Response<Option<Vec<u8>>>) -> String {
    String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned()
}

#[tokio::test]
async fn sse_fast_path_asks_the_app_once_and_passes_its_denial_on() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), AUTH).await;

    // No credentials: the app's 401 as it sent it, written by the fast path itself.
    let r = sse_fast(&c, "/live/news", &[]).await;
    assert_eq!(r.status, 401, "{}", r.head);
    assert_eq!(r.text(), "log in first\n");
    assert_eq!(r.header("www-authenticate"), Some("Cookie realm=\"app\""));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert!(
        !r.has_header("x-app-internal"),
        "only the listed headers pass"
    );
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(up.auth.calls(), 1, "a denial is not asked for twice");

    // Logged in, but not this channel: the app's 403.
    let r = sse_fast(&c, "/live/secret-1", &[("Cookie", "session=good")]).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.text(), "not your channel\n");
    assert_eq!(up.auth.calls(), 2);

    // Logged in: the stream starts, once.
    let resp = get(
        &client(),
        &c.url("/live/news"),
        &[("cookie", "session=good")],
        true,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut sse = SseClient::from_response(resp);
    wait_subscribers(&c, "news", 1).await;
    assert_eq!(up.auth.calls(), 3);
    for i in 0..3 {
        c.publish("news", format!("m{i}")).await;
    }
    for i in 0..3 {
        let ev = sse
            .next_within(Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ev.data, format!("m{i}"));
    }
    assert_eq!(
        up.auth.calls(),
        3,
        "SSE is checked at connect, not per message"
    );
    assert_eq!(
        channel_info(&c, "secret-1").await.0,
        404,
        "a denial subscribes nothing"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn sse_over_http2_is_checked_too() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), AUTH).await;
    let h2 = h2_client();
    let r = get(&h2, &c.url("/live/h2"), &[], true).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Cookie realm=\"app\"");
    assert_eq!(r.text().await.unwrap(), "log in first\n");

    let r = get(&h2, &c.url("/live/h2"), &[("cookie", "session=good")], true).await;
    assert_eq!(r.status(), 200);
    let mut sse = SseClient::from_response(r);
    wait_subscribers(&c, "h2", 1).await;
    c.publish("h2", "over h2").await;
    let ev = sse
        .next_within(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.data, "over h2");
    assert_eq!(up.auth.calls(), 2);
    c.shutdown().await;
}

#[tokio::test]
async fn websocket_is_checked_once_at_connect() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), AUTH).await;

    let r = ws_refused(&c.ws_url("/live/room"), &[]).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Cookie realm=\"app\"");
    assert_eq!(body_text(&r), "log in first\n");
    let r = ws_refused(
        &c.ws_url("/live/secret-room"),
        &[("cookie", "session=good")],
    )
    .await;
    assert_eq!(r.status(), 403);
    assert_eq!(up.auth.calls(), 2);

    let (mut ws, _) = ws_connect(&c.ws_url("/live/room"), &[("cookie", "session=good")]).await;
    wait_subscribers(&c, "room", 1).await;
    for i in 0..3 {
        c.publish("room", format!("w{i}")).await;
    }
    for i in 0..3 {
        let m = ws_next(&mut ws).await.expect("a frame");
        assert_eq!(m.into_text().unwrap().as_str(), format!("w{i}"));
    }
    assert_eq!(up.auth.calls(), 3, "once per connection, not per message");
    c.shutdown().await;
}

#[tokio::test]
async fn longpoll_is_checked_at_every_request() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), AUTH).await;
    let cl = client();
    let url = c.url("/live/lp");

    let r = get(&cl, &url, &[], false).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.text().await.unwrap(), "log in first\n");

    c.publish("lp", "one").await;
    c.publish("lp", "two").await;
    let first = get(
        &cl,
        &format!("{url}?last_event_id=earliest"),
        &[("cookie", "session=good")],
        false,
    )
    .await;
    assert_eq!(first.status(), 200);
    let etag = first.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(first.text().await.unwrap(), "one");
    let second = get(
        &cl,
        &url,
        &[("cookie", "session=good"), ("if-none-match", &etag)],
        false,
    )
    .await;
    assert_eq!(second.text().await.unwrap(), "two");
    assert_eq!(up.auth.calls(), 3, "every long-poll request is asked about");

    // The session ends: the very next poll is refused.
    let r = get(&cl, &url, &[("if-none-match", &etag)], false).await;
    assert_eq!(r.status(), 401);
    c.shutdown().await;
}

#[tokio::test]
async fn auth_request_carries_credentials_and_context_and_nothing_else() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[[push]]\npath = \"/rooms/{channel}\"\nchannel_prefix = \"room:\"\n\
         auth_request = \"/auth/check?from=crier\"\n",
    )
    .await;
    let r = get(
        &client(),
        &c.url("/rooms/a1?last_event_id=earliest&x=1"),
        &[
            ("cookie", "session=good; theme=dark"),
            ("authorization", "Bearer good-token"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-evil", "smuggled"),
            ("x-crier-channel", "forged"),
        ],
        true,
    )
    .await;
    assert_eq!(r.status(), 200);
    let seen = up.auth.last().expect("the app was asked");
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.uri, "/auth/check?from=crier");
    let h = |n: &str| {
        let all: Vec<_> = seen
            .headers
            .get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        all.join(" | ")
    };
    assert_eq!(h("cookie"), "session=good; theme=dark");
    assert_eq!(h("authorization"), "Bearer good-token");
    assert_eq!(h("x-forwarded-for"), "203.0.113.9, 127.0.0.1");
    assert_eq!(h("x-forwarded-proto"), "http");
    assert_eq!(h("x-forwarded-host"), c.public.to_string());
    assert_eq!(h("host"), c.public.to_string());
    assert_eq!(
        h("x-crier-channel"),
        "room:a1",
        "crier's value, not the client's"
    );
    assert_eq!(h("x-original-uri"), "/rooms/a1?last_event_id=earliest&x=1");
    assert_eq!(h("x-crier-action"), "subscribe");
    assert!(
        seen.headers.get("x-evil").is_none(),
        "no other client header"
    );
    assert!(seen.headers.get("accept").is_none());
    c.shutdown().await;
}

#[tokio::test]
async fn upstream_down_is_503_for_every_transport() {
    let dead = dead_addr().await;
    let c = Crier::start(&format!("http://{dead}"), AUTH).await;
    let good = [("cookie", "session=good")];

    let r = sse_fast(&c, "/live/x", &good).await;
    assert_eq!(r.status, 503, "SSE fast path");
    assert_eq!(r.header("retry-after"), Some("5"));
    let r = get(&h2_client(), &c.url("/live/x"), &good, true).await;
    assert_eq!(r.status(), 503, "SSE over h2");
    let r = get(&client(), &c.url("/live/x"), &good, false).await;
    assert_eq!(r.status(), 503, "long-poll");
    let r = ws_refused(&c.ws_url("/live/x"), &good).await;
    assert_eq!(r.status(), 503, "websocket");
    assert_eq!(channel_info(&c, "x").await.0, 404, "nothing subscribed");
    assert_eq!(
        metric(
            &c,
            "crier_auth_checks_total{method=\"forward\",result=\"error\"}"
        )
        .await,
        Some(4.0)
    );
    c.shutdown().await;
}

#[tokio::test]
async fn slow_or_unexpected_answers_are_503() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[[push]]\npath = \"/live/{channel}\"\nauth_request = \"/auth/check\"\nauth_timeout = \"300ms\"\n",
    )
    .await;
    let good = [("cookie", "session=good")];
    let started = Instant::now();
    let r = sse_fast(&c, "/live/slow-1", &good).await;
    assert_eq!(r.status, 503, "an app slower than auth_timeout");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "bounded by auth_timeout: {took:?}"
    );
    let r = get(&client(), &c.url("/live/slow-2"), &good, false).await;
    assert_eq!(r.status(), 503);

    for ch in ["boom-1", "moved-1"] {
        let r = get(&client(), &c.url(&format!("/live/{ch}")), &good, true).await;
        assert_eq!(r.status(), 503, "{ch}");
        let body = r.text().await.unwrap();
        assert!(
            !body.contains("exploded") && !body.contains("log in"),
            "{body}"
        );
        let r = ws_refused(&c.ws_url(&format!("/live/{ch}")), &good).await;
        assert_eq!(r.status(), 503, "{ch} websocket");
    }
    c.shutdown().await;
}

#[tokio::test]
async fn a_large_denial_body_is_replaced_not_passed_on() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), AUTH).await;
    let r = sse_fast(&c, "/live/huge-1", &[]).await;
    assert_eq!(r.status, 401);
    assert!(r.body.len() < 1024, "{} bytes", r.body.len());
    let r = get(&client(), &c.url("/live/huge-1"), &[], false).await;
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().len() < 1024);
    c.shutdown().await;
}

#[tokio::test]
async fn cache_is_keyed_by_credentials_and_channel_and_expires() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[[push]]\npath = \"/live/{channel}\"\nauth_request = \"/auth/check\"\n\
         auth_cache_ttl = \"2s\"\nlongpoll_timeout = \"50ms\"\n\
         [[push]]\npath = \"/nocache/{channel}\"\nchannel_prefix = \"nc:\"\n\
         auth_request = \"/auth/check\"\nlongpoll_timeout = \"50ms\"\n",
    )
    .await;
    let cl = client();
    let poll = |path: &'static str, h: &'static [(&'static str, &'static str)]| {
        let cl = cl.clone();
        let url = c.url(path);
        async move { get(&cl, &url, h, false).await.status().as_u16() }
    };
    const COOKIE: &[(&str, &str)] = &[("cookie", "session=good")];
    const BEARER: &[(&str, &str)] = &[("authorization", "Bearer good-token")];
    const NONE: &[(&str, &str)] = &[];

    assert_eq!(poll("/live/c1", COOKIE).await, 304);
    assert_eq!(poll("/live/c1", COOKIE).await, 304);
    assert_eq!(
        up.auth.calls(),
        1,
        "the second poll was answered from the cache"
    );
    assert_eq!(poll("/live/c1", BEARER).await, 304);
    assert_eq!(up.auth.calls(), 2, "other credentials, another question");
    assert_eq!(poll("/live/c2", COOKIE).await, 304);
    assert_eq!(up.auth.calls(), 3, "another channel, another question");
    assert_eq!(poll("/live/c1", NONE).await, 401);
    assert_eq!(
        poll("/live/c1", NONE).await,
        401,
        "a cached denial is still a denial"
    );
    assert_eq!(up.auth.calls(), 4);
    assert_eq!(poll("/live/boom-1", COOKIE).await, 503);
    assert_eq!(poll("/live/boom-1", COOKIE).await, 503);
    assert_eq!(up.auth.calls(), 6, "errors are never cached");
    assert_eq!(metric(&c, "crier_auth_cache_hits_total").await, Some(2.0));

    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(poll("/live/c1", COOKIE).await, 304);
    assert_eq!(up.auth.calls(), 7, "expired after auth_cache_ttl");

    // Off by default: every request asks.
    assert_eq!(poll("/nocache/c1", COOKIE).await, 304);
    assert_eq!(poll("/nocache/c1", COOKIE).await, 304);
    assert_eq!(up.auth.calls(), 9);
    c.shutdown().await;
}

#[tokio::test]
async fn origin_is_checked_before_auth_and_denials_carry_cors() {
    let up = Upstream::start().await;
    let c = Crier::start(
        &up.url(),
        "[[push]]\npath = \"/live/{channel}\"\nauth_request = \"/auth/check\"\n\
         allow_origins = [\"https://app.example\"]\n",
    )
    .await;
    let evil = [
        ("origin", "https://evil.example"),
        ("cookie", "session=good"),
    ];
    // Cross-site WebSocket hijacking: the victim's browser sends its cookie; crier refuses
    // before the cookie ever reaches the app.
    let r = ws_refused(&c.ws_url("/live/feed"), &evil).await;
    assert_eq!(r.status(), 403);
    let r = sse_fast(
        &c,
        "/live/feed",
        &[
            ("Origin", "https://evil.example"),
            ("Cookie", "session=good"),
        ],
    )
    .await;
    assert_eq!(r.status, 403);
    let r = get(&client(), &c.url("/live/feed"), &evil, false).await;
    assert_eq!(r.status(), 403);
    assert_eq!(up.auth.calls(), 0, "the app was never asked");

    // An allowed page that is not logged in: the 401 carries CORS headers so its script can
    // read it.
    let r = sse_fast(&c, "/live/feed", &[("Origin", "https://app.example")]).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    let r = ws_refused(
        &c.ws_url("/live/feed"),
        &[("origin", "https://app.example")],
    )
    .await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );

    let (_ws, resp) = ws_connect(
        &c.ws_url("/live/feed"),
        &[
            ("origin", "https://app.example"),
            ("cookie", "session=good"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 101);
    assert_eq!(up.auth.calls(), 3);
    c.shutdown().await;
}

#[tokio::test]
async fn reload_turns_auth_on_without_a_restart() {
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), "").await;
    c.publish("r", "open").await;
    let r = get(
        &client(),
        &c.url("/live/r?last_event_id=earliest"),
        &[],
        false,
    )
    .await;
    assert_eq!(r.status(), 200);
    let dir = tempfile::tempdir().unwrap();
    let toml = base_config(&up.url(), &dir.path().join("p.sock"), AUTH);
    c.handle
        .reload(crier::Config::from_toml(&toml, None).unwrap())
        .unwrap();
    let r = get(
        &client(),
        &c.url("/live/r?last_event_id=earliest"),
        &[],
        false,
    )
    .await;
    assert_eq!(r.status(), 401, "the reloaded location asks the app");
    c.shutdown().await;
}
