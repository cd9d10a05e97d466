//! Inbound webhooks (`[[ingress]]`): signed requests from the test, made with the `hmac` crate
//! (not crier's code), published once verified; every bad request is refused and publishes
//! nothing.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use hmac::{Hmac, Mac};
use http::StatusCode;

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const GH_SECRET: &str = "It's a Secret to Everybody";

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn whsec_key() -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(WHSEC.strip_prefix("whsec_").expect("prefix"))
        .expect("base64")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Standard Webhooks headers for `body`, signed at `ts`.
fn standard_headers(id: &str, ts: u64, body: &str) -> Vec<(String, String)> {
    let sig = mac(
        &whsec_key(),
        &[format!("{id}.{ts}.").as_bytes(), body.as_bytes()],
    );
    vec![
        ("webhook-id".into(), id.into()),
        ("webhook-timestamp".into(), ts.to_string()),
        (
            "webhook-signature".into(),
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(sig)
            ),
        ),
        ("content-type".into(), "application/json".into()),
    ]
}

struct Setup {
    c: Crier,
    _up: Upstream,
    _dir: tempfile::TempDir,
}

async fn start() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write secret");
        p.display().to_string()
    };
    let std_secret = write("std.secret", WHSEC);
    let gh_secret = write("gh.secret", &format!("{GH_SECRET}\n"));
    let extra = format!(
        "[[ingress]]\npath = \"/hooks/std\"\nchannel = \"billing\"\nverify = \"standard\"\nsecret_file = \"{std_secret}\"\nmax_body = \"1KiB\"\n\
         [[ingress]]\npath = \"/hooks/github\"\nchannel = \"gh.{{header:X-GitHub-Event}}\"\nverify = \"github\"\nsecret_file = \"{gh_secret}\"\n\
         [[ingress]]\npath = \"/hooks/hmac\"\nchannel = \"{{json:/repo/full_name}}\"\nverify = \"hmac-sha256\"\nheader = \"X-Signature\"\nsecret_file = \"{gh_secret}\"\n\
         [[ingress]]\npath = \"/hooks/open\"\nchannel = \"open\"\nverify = \"none\"\n"
    );
    let up = Upstream::start().await;
    let c = Crier::start(&up.url(), &extra).await;
    Setup {
        c,
        _up: up,
        _dir: dir,
    }
}

async fn post(
    c: &Crier,
    path: &str,
    headers: &[(String, String)],
    body: impl Into<reqwest::Body>,
) -> (StatusCode, serde_json::Value) {
    let mut req = client().post(c.url(path)).body(body);
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let r = req.send().await.expect("post");
    let status = r.status();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// Messages published to `channel` so far (0 when it does not exist).
async fn published(c: &Crier, channel: &str) -> u64 {
    channel_info(c, channel).await.1["published"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
async fn standard_webhooks_verified_published_once_and_replays_refused() {
    let s = start().await;
    let c = &s.c;
    let mut sse = SseClient::connect(&c.url("/live/billing"), None).await;
    let body = r#"{"type":"invoice.paid","amount":42}"#;
    let h = standard_headers("msg_1", now(), body);
    let (st, v) = post(c, "/hooks/std", &h, body).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["channel"], "billing");
    assert_eq!(v["duplicate"], false);
    let id = v["id"].as_str().expect("id").to_string();
    let e = sse
        .next_within(Duration::from_secs(5))
        .await
        .expect("in time")
        .expect("event");
    assert_eq!(
        (e.id.as_deref(), e.data.as_str()),
        (Some(id.as_str()), body)
    );

    // The sender retries the same delivery: 202 with the first id, published once.
    let h2 = standard_headers("msg_1", now(), body);
    let (st, v) = post(c, "/hooks/std", &h2, body).await;
    assert_eq!(st, StatusCode::ACCEPTED);
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["duplicate"], true);
    assert_eq!(published(c, "billing").await, 1);

    // Refused, each with 401, and nothing published.
    let mut wrong_sig = standard_headers("msg_2", now(), body);
    wrong_sig[2].1 = standard_headers("msg_2", now(), "{}")[2].1.clone();
    let stale = standard_headers("msg_3", now() - 330, body);
    let future = standard_headers("msg_4", now() + 330, body);
    let mut no_sig = standard_headers("msg_5", now(), body);
    no_sig.remove(2);
    let mut other_key = standard_headers("msg_6", now(), body);
    other_key[2].1 = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".into();
    for (what, h) in [
        ("signature of another body", &wrong_sig),
        ("timestamp 330s old", &stale),
        ("timestamp 330s ahead", &future),
        ("no signature", &no_sig),
        ("a signature that is not ours", &other_key),
        ("no headers at all", &Vec::new()),
    ] {
        let (st, v) = post(c, "/hooks/std", h, body).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{what}: {v}");
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("not verified")),
            "{v}"
        );
    }
    let (_, v) = post(c, "/hooks/std", &stale, body).await;
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("5 minutes")),
        "{v}"
    );
    assert_eq!(
        published(c, "billing").await,
        1,
        "nothing unverified published"
    );

    // A body over max_body (1KiB) is 413, before anything else.
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(2000));
    let (st, _) = post(
        c,
        "/hooks/std",
        &standard_headers("msg_7", now(), &big),
        big,
    )
    .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    // Also when the length is not declared up front (chunked).
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(vec![b'x'; 800]), Ok(vec![b'x'; 800])];
    let stream = futures_util::stream::iter(chunks);
    let (st, _) = post(
        c,
        "/hooks/std",
        &standard_headers("msg_8", now(), ""),
        reqwest::Body::wrap_stream(stream),
    )
    .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(published(c, "billing").await, 1);

    // Not POST: 405 from crier (the app never sees ingress paths).
    let r = client().get(c.url("/hooks/std")).send().await.expect("get");
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "POST");
    s.c.shutdown().await;
}

#[tokio::test]
async fn github_signatures_and_header_channel() {
    let s = start().await;
    let c = &s.c;
    let body = r#"{"action":"deployed","repository":{"full_name":"acme/web"}}"#;
    let sig = format!(
        "sha256={}",
        hex(&mac(GH_SECRET.as_bytes(), &[body.as_bytes()]))
    );
    let h = |event: &str, sig: &str, delivery: &str| {
        vec![
            ("x-github-event".to_string(), event.to_string()),
            ("x-hub-signature-256".to_string(), sig.to_string()),
            ("x-github-delivery".to_string(), delivery.to_string()),
            ("content-type".to_string(), "application/json".to_string()),
        ]
    };
    let (st, v) = post(c, "/hooks/github", &h("deployment", &sig, "d-1"), body).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["channel"], "gh.deployment");
    let (st, v) = post(c, "/hooks/github", &h("deployment", &sig, "d-1"), body).await;
    assert_eq!((st, &v["duplicate"]), (StatusCode::ACCEPTED, &true.into()));
    assert_eq!(published(c, "gh.deployment").await, 1);

    let wrong = format!(
        "sha256={}",
        hex(&mac(b"another secret", &[body.as_bytes()]))
    );
    for (what, headers) in [
        ("wrong secret", h("deployment", &wrong, "d-2")),
        ("not hex", h("deployment", "sha256=nothex", "d-3")),
        ("empty", h("deployment", "", "d-4")),
    ] {
        let (st, v) = post(c, "/hooks/github", &headers, body).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{what}: {v}");
    }
    // Signed, but the body was changed on the way.
    let (st, _) = post(
        c,
        "/hooks/github",
        &h("deployment", &sig, "d-5"),
        body.replace("deployed", "destroyed"),
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // Verified but the channel header is missing or not a channel name: 400.
    let mut no_event = h("x", &sig, "d-6");
    no_event.remove(0);
    let (st, v) = post(c, "/hooks/github", &no_event, body).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let (st, _) = post(c, "/hooks/github", &h("bad name!", &sig, "d-7"), body).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(published(c, "gh.deployment").await, 1);
    s.c.shutdown().await;
}

#[tokio::test]
async fn hmac_sha256_header_and_json_channel() {
    let s = start().await;
    let c = &s.c;
    let body = r#"{"repo":{"full_name":"acme/api"},"ok":true}"#;
    let sig = hex(&mac(GH_SECRET.as_bytes(), &[body.as_bytes()]));
    let h = |sig: &str| {
        vec![
            ("x-signature".to_string(), sig.to_string()),
            ("content-type".to_string(), "application/json".to_string()),
        ]
    };
    let (st, v) = post(c, "/hooks/hmac", &h(&sig), body).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["channel"], "acme.api", "owner/repo becomes owner.repo");
    let (st, _) = post(c, "/hooks/hmac", &h(&sig.to_uppercase()), body).await;
    assert_eq!(st, StatusCode::ACCEPTED, "hex in either case");
    assert_eq!(
        published(c, "acme.api").await,
        2,
        "no delivery id: each is published"
    );

    let (st, _) = post(c, "/hooks/hmac", &h(&sig[2..]), body).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "truncated signature");
    let (st, _) = post(c, "/hooks/hmac", &[], body).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "no signature header");
    let other = r#"{"repo":{}}"#;
    let (st, _) = post(
        c,
        "/hooks/hmac",
        &h(&hex(&mac(GH_SECRET.as_bytes(), &[other.as_bytes()]))),
        other,
    )
    .await;
    assert_eq!(
        st,
        StatusCode::BAD_REQUEST,
        "verified, but no channel in the body"
    );
    assert_eq!(published(c, "acme.api").await, 2);
    s.c.shutdown().await;
}

#[tokio::test]
async fn verify_none_publishes_from_loopback() {
    let s = start().await;
    let c = &s.c;
    let (st, v) = post(c, "/hooks/open", &[], "plain").await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().expect("id");
    let (_, info) = channel_info(c, "open").await;
    assert_eq!(info["last_id"], id);
    // A path that is not an ingress still goes to the app.
    let r = client()
        .post(c.url("/hooks/other"))
        .body("x")
        .send()
        .await
        .expect("post");
    assert_ne!(r.status(), StatusCode::ACCEPTED);
    s.c.shutdown().await;
}

#[tokio::test]
async fn a_delivery_sent_twenty_times_at_once_is_published_once() {
    let s = start().await;
    let c = &s.c;
    let body = r#"{"n":1}"#;
    let h = standard_headers("msg_concurrent", now(), body);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (url, h) = (c.url("/hooks/std"), h.clone());
            tokio::spawn(async move {
                let mut req = client().post(url).body(body);
                for (k, v) in &h {
                    req = req.header(k.as_str(), v.as_str());
                }
                let r = req.send().await.expect("post");
                assert_eq!(r.status(), StatusCode::ACCEPTED);
                let v: serde_json::Value = r.json().await.expect("json");
                v["id"].as_str().expect("id").to_string()
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every copy answered with the one message id");
    assert_eq!(published(c, "billing").await, 1);
    s.c.shutdown().await;
}
