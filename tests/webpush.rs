//! Web Push end to end: crier in front of a real upstream, browsers played by the test (P-256
//! keys, as a browser makes them), and an HTTPS push-service double on loopback that checks
//! every request the way a push service would: the VAPID JWT (ES256) against crier's public
//! key (jsonwebtoken), and the payload decrypted with the browser's private key by a
//! hand-written RFC 8291 decryption whose every primitive comes from another implementation
//! than crier's: ECDH from RustCrypto's p256 (crier: aws-lc-rs), HKDF and AES-128-GCM from
//! aws-lc-rs (crier: the hkdf crate and ece-native's aes-gcm).

mod common;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::agreement::{PrivateKey, ECDH_P256};
use aws_lc_rs::{aead, hkdf};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde_json::{json, Value};

const SUBJECT: &str = "mailto:ops@example.com";

// ---------------------------------------------------------------------------------------
// The push-service double.

/// One request the double received.
#[derive(Clone)]
struct Pushed {
    /// The endpoint's last path segment: which browser it is for.
    id: String,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

/// What the double answers, per endpoint id, in order; then 201.
#[derive(Clone)]
struct Reply {
    status: u16,
    retry_after: Option<&'static str>,
}

#[derive(Clone, Default)]
struct Log {
    pushed: Arc<Mutex<Vec<Pushed>>>,
    script: Arc<Mutex<HashMap<String, VecDeque<Reply>>>>,
    /// How long every answer takes (a slow push service).
    delay: Arc<Mutex<Duration>>,
}

struct PushService {
    addr: SocketAddr,
    log: Log,
    /// The double's certificate (self-signed): crier's `webpush.ca_file`.
    ca_file: PathBuf,
}

impl PushService {
    async fn start(dir: &Path) -> PushService {
        let ck = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "push.test".to_string(),
        ])
        .expect("certificate");
        let ca_file = dir.join("push-ca.pem");
        std::fs::write(&ca_file, ck.cert.pem()).expect("write CA");
        let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der())
            .expect("key der");
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .expect("server config");
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind push service");
        let addr = listener.local_addr().expect("addr");
        let log = Log::default();
        let l = log.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, log) = (acceptor.clone(), l.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let svc = service_fn(move |req| {
                        let log = log.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(req, &log).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        PushService { addr, log, ca_file }
    }

    fn endpoint(&self, id: &str) -> String {
        format!("https://127.0.0.1:{}/push/{id}", self.addr.port())
    }

    fn origin(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    fn script(&self, id: &str, replies: &[Reply]) {
        self.log
            .script
            .lock()
            .expect("script")
            .insert(id.to_string(), replies.iter().cloned().collect());
    }

    fn pushed(&self) -> Vec<Pushed> {
        self.log.pushed.lock().expect("log").clone()
    }

    fn pushed_to(&self, id: &str) -> Vec<Pushed> {
        self.pushed().into_iter().filter(|p| p.id == id).collect()
    }

    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Pushed> {
        let ok = eventually(within, async || self.pushed().len() >= n).await;
        let got = self.pushed();
        assert!(ok, "the push service got {} requests, not {n}", got.len());
        got
    }
}

async fn answer(req: Request<Incoming>, log: &Log) -> Response<Full<Bytes>> {
    let id = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string();
    let headers = req.headers().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    log.pushed.lock().expect("log").push(Pushed {
        id: id.clone(),
        headers,
        body,
        at: Instant::now(),
    });
    let delay = *log.delay.lock().expect("delay");
    tokio::time::sleep(delay).await;
    let reply = log
        .script
        .lock()
        .expect("script")
        .get_mut(&id)
        .and_then(VecDeque::pop_front)
        .unwrap_or(Reply {
            status: 201,
            retry_after: None,
        });
    let mut r = Response::builder().status(reply.status);
    if let Some(ra) = reply.retry_after {
        r = r.header("retry-after", ra);
    }
    r.body(Full::new(Bytes::new())).expect("response")
}

// ---------------------------------------------------------------------------------------
// A browser: its subscription keys and the RFC 8291 decryption of what it receives.

struct Browser {
    id: String,
    endpoint: String,
    key: p256::SecretKey,
    public: Vec<u8>,
    auth: [u8; 16],
}

impl Browser {
    fn new(ps: &PushService, id: &str) -> Browser {
        let key = loop {
            let mut d = [0u8; 32];
            aws_lc_rs::rand::fill(&mut d).expect("random");
            if let Ok(k) = p256::SecretKey::from_slice(&d) {
                break k;
            }
        };
        let public = key.public_key().to_encoded_point(false).as_bytes().to_vec();
        let mut auth = [0u8; 16];
        aws_lc_rs::rand::fill(&mut auth).expect("random");
        Browser {
            id: id.to_string(),
            endpoint: ps.endpoint(id),
            key,
            public,
            auth,
        }
    }

    /// `PushSubscription.toJSON()`.
    fn json(&self) -> Value {
        json!({
            "endpoint": self.endpoint,
            "expirationTime": null,
            "keys": {
                "p256dh": URL_SAFE_NO_PAD.encode(&self.public),
                "auth": URL_SAFE_NO_PAD.encode(self.auth),
            }
        })
    }

    /// RFC 8291 section 3 and RFC 8188, as the browser does it.
    fn decrypt(&self, body: &[u8]) -> Vec<u8> {
        assert!(body.len() > 21 + 65 + 17, "body too short: {}", body.len());
        let salt = &body[..16];
        let rs = u32::from_be_bytes(body[16..20].try_into().expect("4 bytes"));
        assert_eq!(rs, 4096, "record size");
        let idlen = body[20] as usize;
        assert_eq!(idlen, 65, "keyid is the sender's uncompressed P-256 key");
        let as_public = &body[21..21 + idlen];
        let ciphertext = &body[21 + idlen..];
        assert!(ciphertext.len() <= rs as usize, "one record");
        let as_public =
            p256::PublicKey::from_sec1_bytes(as_public).expect("keyid is a P-256 point");
        let shared =
            p256::ecdh::diffie_hellman(self.key.to_nonzero_scalar(), as_public.as_affine());
        let ecdh = shared.raw_secret_bytes().to_vec();
        let as_public = as_public.to_encoded_point(false);
        let as_public = as_public.as_bytes();
        let mut key_info = b"WebPush: info\0".to_vec();
        key_info.extend_from_slice(&self.public);
        key_info.extend_from_slice(as_public);
        let ikm = hkdf_sha256(&self.auth, &ecdh, &key_info, 32);
        let cek = hkdf_sha256(salt, &ikm, b"Content-Encoding: aes128gcm\0", 16);
        let nonce = hkdf_sha256(salt, &ikm, b"Content-Encoding: nonce\0", 12);
        let key = aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_128_GCM, &cek).expect("aes key"),
        );
        let mut buf = ciphertext.to_vec();
        let plain = key
            .open_in_place(
                aead::Nonce::try_assume_unique_for_key(&nonce).expect("nonce"),
                aead::Aad::empty(),
                &mut buf,
            )
            .expect("the payload decrypts with the browser's key");
        let end = plain.iter().rposition(|b| *b != 0).expect("a delimiter");
        assert_eq!(plain[end], 2, "last-record delimiter");
        plain[..end].to_vec()
    }

    fn envelope(&self, p: &Pushed) -> Value {
        serde_json::from_slice(&self.decrypt(&p.body)).expect("the payload is JSON")
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], len: usize) -> Vec<u8> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let mut out = vec![0u8; len];
    prk.expand(&[info], Len(len))
        .expect("expand")
        .fill(&mut out)
        .expect("fill");
    out
}

/// Checks the `Authorization: vapid t=<jwt>, k=<key>` of a push request as a push service
/// does: `k` is crier's key, the JWT is ES256 under it, for this service, from `SUBJECT`,
/// valid for at most 24 hours. Returns the JWT.
fn verify_vapid(p: &Pushed, crier_key: &str, audience: &str) -> String {
    let h = p
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .expect("an Authorization header");
    let rest = h.strip_prefix("vapid ").expect("the vapid scheme");
    let mut t = None;
    let mut k = None;
    for part in rest.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.to_string()),
            Some(("k", v)) => k = Some(v.to_string()),
            _ => {}
        }
    }
    let (t, k) = (t.expect("t="), k.expect("k="));
    assert_eq!(k, crier_key, "k= is crier's public key");
    let raw = URL_SAFE_NO_PAD.decode(&k).expect("k is base64url");
    let x = URL_SAFE_NO_PAD.encode(&raw[1..33]);
    let y = URL_SAFE_NO_PAD.encode(&raw[33..65]);
    let key = jsonwebtoken::DecodingKey::from_ec_components(&x, &y).expect("EC key");
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "aud", "sub"]);
    v.leeway = 0;
    let claims = jsonwebtoken::decode::<Value>(&t, &key, &v)
        .expect("the VAPID JWT verifies against crier's key")
        .claims;
    assert_eq!(claims["sub"], SUBJECT);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let exp = claims["exp"].as_u64().expect("exp");
    assert!(exp > now && exp <= now + 24 * 3600, "exp {exp}, now {now}");
    t
}

fn header<'a>(p: &'a Pushed, name: &str) -> Option<&'a str> {
    p.headers.get(name).and_then(|v| v.to_str().ok())
}

// ---------------------------------------------------------------------------------------
// crier with [webpush].

/// The files that outlive one crier (key, store), so a restart finds them.
struct Site {
    dir: tempfile::TempDir,
    upstream: Upstream,
}

impl Site {
    async fn new() -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        crier::keys::VapidKey::generate(&dir.path().join("vapid.pem")).expect("key");
        std::fs::write(
            dir.path().join("jwt.key"),
            "a-secret-for-the-webpush-tests-0123456789",
        )
        .expect("jwt secret");
        Site {
            dir,
            upstream: Upstream::start().await,
        }
    }

    fn toml(&self, ps: &PushService, extra: &str) -> String {
        let d = self.dir.path();
        format!(
            "[[push]]\npath = \"/live/{{channel}}\"\n\
             [[push]]\npath = \"/members/{{channel}}\"\nchannel_prefix = \"members:\"\nauth_request = \"/auth/check\"\n\
             [[push]]\npath = \"/secure/{{channel}}\"\nchannel_prefix = \"secure:\"\n\
             [push.jwt]\nsecret_file = \"{}\"\n\
             [webpush]\nvapid_key_file = \"{}\"\nsubject = \"{SUBJECT}\"\nstore = \"{}\"\n\
             push_hosts = [\"127.0.0.1\"]\nttl = \"2m\"\nca_file = \"{}\"\n\
             allow_addresses = [\"127.0.0.1\"]\n{ports}{extra}",
            d.join("jwt.key").display(),
            d.join("vapid.pem").display(),
            d.join("webpush.redb").display(),
            ps.ca_file.display(),
            // The double is on loopback and a port of its own: both must be allowed.
            ports = if extra.contains("push_ports") {
                String::new()
            } else {
                format!("push_ports = [{}]\n", ps.addr.port())
            },
        )
    }

    async fn crier(&self, ps: &PushService) -> Crier {
        Crier::start(&self.upstream.url(), &self.toml(ps, "")).await
    }
}

fn api(c: &Crier, rest: &str) -> String {
    c.url(&format!("/_crier/webpush/{rest}"))
}

async fn crier_key(c: &Crier) -> String {
    let r = client().get(api(c, "key")).send().await.expect("GET key");
    assert_eq!(r.status(), StatusCode::OK);
    let k = r.text().await.expect("key text").trim().to_string();
    assert_eq!(URL_SAFE_NO_PAD.decode(&k).expect("base64url").len(), 65);
    k
}

async fn subscribe(c: &Crier, channel: &str, b: &Browser) -> StatusCode {
    client()
        .post(api(c, channel))
        .json(&b.json())
        .send()
        .await
        .expect("POST subscription")
        .status()
}

async fn admin_webpush(c: &Crier) -> Value {
    client()
        .get(c.admin_url("/webpush"))
        .send()
        .await
        .expect("GET /webpush")
        .json()
        .await
        .expect("json")
}

async fn outcome(c: &Crier, o: &str) -> f64 {
    metric(
        c,
        &format!("crier_webpush_deliveries_total{{outcome=\"{o}\"}}"),
    )
    .await
    .unwrap_or(0.0)
}

async fn wait_outcome(c: &Crier, o: &str, n: f64) {
    let ok = eventually(Duration::from_secs(20), async || outcome(c, o).await >= n).await;
    assert!(
        ok,
        "outcome {o} never reached {n} (it is {})",
        outcome(c, o).await
    );
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn messages_arrive_encrypted_and_signed_with_their_options() {
    let site = Site::new().await;
    let ps = PushService::start(site.dir.path()).await;
    let c = site.crier(&ps).await;
    let key = crier_key(&c).await;
    let b = Browser::new(&ps, "b1");
    assert_eq!(subscribe(&c, "news", &b).await, StatusCode::CREATED);
    assert_eq!(
        subscribe(&c, "news", &b).await,
        StatusCode::OK,
        "already subscribed"
    );
    assert_eq!(metric(&c, "crier_webpush_subscriptions").await, Some(1.0));
    // Before its first message, the channel exists for the publisher: it has a subscriber.
    let (st, info) = channel_info(&c, "news").await;
    assert_eq!(st, StatusCode::OK, "{info}");
    assert_eq!(info["webpush_subscribers"], 1);
    assert_eq!(info["published"], 0);
    assert_eq!(channel_info(&c, "nobody").await.0, StatusCode::NOT_FOUND);

    // 1: options from the publish headers.
    let (st, receipt) = publish_with(
        &c,
        "news",
        &[
            ("crier-urgency", "high"),
            ("crier-topic", "scores"),
            ("crier-ttl", "60"),
            ("crier-event", "goal"),
        ],
        "3:1",
    )
    .await;
    assert_eq!(st, StatusCode::CREATED);
    let got = ps.wait_for(1, Duration::from_secs(10)).await;
    let p = &got[0];
    let jwt1 = verify_vapid(p, &key, &ps.origin());
    assert_eq!(header(p, "content-encoding"), Some("aes128gcm"));
    assert_eq!(header(p, "ttl"), Some("60"));
    assert_eq!(header(p, "urgency"), Some("high"));
    assert_eq!(header(p, "topic"), Some("scores"));
    assert_eq!(
        b.envelope(p),
        json!({"channel": "news", "id": receipt["id"], "event": "goal", "data": "3:1"})
    );
    let (_, info) = channel_info(&c, "news").await;
    assert_eq!(info["webpush_subscribers"], 1);

    // 2: the defaults (webpush.ttl, normal urgency, no topic), the same cached JWT.
    let id2 = c.publish("news", "plain").await;
    let got = ps.wait_for(2, Duration::from_secs(10)).await;
    let p = &got[1];
    assert_eq!(
        verify_vapid(p, &key, &ps.origin()),
        jwt1,
        "JWT cached per service"
    );
    assert_eq!(header(p, "ttl"), Some("120"));
    assert_eq!(header(p, "urgency"), Some("normal"));
    assert_eq!(header(p, "topic"), None);
    assert_eq!(
        b.envelope(p),
        json!({"channel": "news", "id": id2, "data": "plain"})
    );

    // 3: a binary body goes base64; 4: one too large for a push message goes without data.
    publish_with(
        &c,
        "news",
        &[("content-type", "application/octet-stream")],
        vec![0u8, 255, 1],
    )
    .await;
    let big = "x".repeat(5000);
    let (_, r4) = publish_with(&c, "news", &[], big).await;
    let got = ps.wait_for(4, Duration::from_secs(10)).await;
    assert_eq!(b.envelope(&got[2])["data_b64"], "AP8B");
    let e4 = b.envelope(&got[3]);
    assert_eq!(
        e4,
        json!({"channel": "news", "id": r4["id"], "truncated": true})
    );
    assert!(got[3].body.len() <= 4096);
    for p in &got {
        verify_vapid(p, &key, &ps.origin());
    }

    // A channel without Web Push subscriptions sends nothing.
    c.publish("other", "x").await;
    wait_outcome(&c, "delivered", 4.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ps.pushed().len(), 4);
    let a = admin_webpush(&c).await;
    assert_eq!(a["subscriptions"], 1);
    assert_eq!(a["channels"]["news"], 1);
    assert_eq!(a["deliveries"]["delivered"], 4);
    assert!(
        metric(&c, "crier_webpush_duration_seconds_count").await >= Some(4.0),
        "duration histogram observed"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn gone_subscriptions_are_deleted_and_not_tried_again() {
    let site = Site::new().await;
    let ps = PushService::start(site.dir.path()).await;
    let c = site.crier(&ps).await;
    let (a, b, g) = (
        Browser::new(&ps, "a"),
        Browser::new(&ps, "b"),
        Browser::new(&ps, "g"),
    );
    // 413 and another 4xx end a delivery but keep the subscription.
    let (big, no) = (Browser::new(&ps, "big"), Browser::new(&ps, "no"));
    for br in [&a, &b, &g, &big, &no] {
        assert_eq!(subscribe(&c, "room", br).await, StatusCode::CREATED);
    }
    ps.script(
        "big",
        &[Reply {
            status: 413,
            retry_after: None,
        }],
    );
    ps.script(
        "no",
        &[Reply {
            status: 403,
            retry_after: None,
        }],
    );
    ps.script(
        "a",
        &[Reply {
            status: 410,
            retry_after: None,
        }],
    );
    ps.script(
        "g",
        &[Reply {
            status: 404,
            retry_after: None,
        }],
    );
    c.publish("room", "one").await;
    wait_outcome(&c, "gone", 2.0).await;
    wait_outcome(&c, "too_large", 1.0).await;
    wait_outcome(&c, "rejected", 1.0).await;
    assert_eq!(channel_info(&c, "room").await.1["webpush_subscribers"], 3);
    assert_eq!(metric(&c, "crier_webpush_subscriptions").await, Some(3.0));
    let failures = admin_webpush(&c).await["recent_failures"].clone();
    assert_eq!(failures.as_array().map(Vec::len), Some(4), "{failures}");
    let mut outcomes: Vec<&str> = failures
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|f| f["outcome"].as_str())
        .collect();
    outcomes.sort();
    assert_eq!(outcomes, ["gone", "gone", "rejected", "too_large"]);

    c.publish("room", "two").await;
    wait_outcome(&c, "delivered", 4.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ps.pushed_to("a").len(),
        1,
        "a 410 endpoint is not tried again"
    );
    assert_eq!(
        ps.pushed_to("g").len(),
        1,
        "a 404 endpoint is not tried again"
    );
    assert_eq!(ps.pushed_to("b").len(), 2);
    assert_eq!(ps.pushed_to("big").len(), 2, "kept after a 413");
    assert_eq!(ps.pushed_to("no").len(), 2, "kept after a 403");
    assert_eq!(b.envelope(&ps.pushed_to("b")[1])["data"], "two");
    c.shutdown().await;
}

#[tokio::test]
async fn too_many_requests_is_retried_after_retry_after_and_bounded() {
    let site = Site::new().await;
    let ps = PushService::start(site.dir.path()).await;
    let c = site.crier(&ps).await;
    let (r, never, s5) = (
        Browser::new(&ps, "r"),
        Browser::new(&ps, "never"),
        Browser::new(&ps, "s5"),
    );
    for br in [&r, &never, &s5] {
        assert_eq!(subscribe(&c, "busy", br).await, StatusCode::CREATED);
    }
    ps.script(
        "r",
        &[Reply {
            status: 429,
            retry_after: Some("2"),
        }],
    );
    // Longer than crier ever waits: the delivery fails at once instead of waiting an hour.
    ps.script(
        "never",
        &[Reply {
            status: 429,
            retry_after: Some("3600"),
        }],
    );
    // A 5xx without Retry-After: backoff (1s), then delivered.
    ps.script(
        "s5",
        &[Reply {
            status: 503,
            retry_after: None,
        }],
    );
    c.publish("busy", "later").await;
    wait_outcome(&c, "delivered", 2.0).await;
    wait_outcome(&c, "failed", 1.0).await;
    let tries = ps.pushed_to("r");
    assert_eq!(tries.len(), 2);
    let gap = tries[1].at - tries[0].at;
    assert!(
        gap >= Duration::from_millis(1900) && gap < Duration::from_secs(6),
        "Retry-After: 2 honoured, waited {gap:?}"
    );
    assert_eq!(r.envelope(&tries[1])["data"], "later");
    let tries = ps.pushed_to("s5");
    assert_eq!(tries.len(), 2);
    assert!(tries[1].at - tries[0].at >= Duration::from_millis(900));
    assert_eq!(ps.pushed_to("never").len(), 1);
    assert_eq!(metric(&c, "crier_webpush_retries_total").await, Some(2.0));
    c.shutdown().await;
}

#[tokio::test]
async fn a_429_pauses_the_whole_push_service() {
    let site = Site::new().await;
    let ps = PushService::start(site.dir.path()).await;
    let c = site.crier(&ps).await;
    let (a, b) = (Browser::new(&ps, "a"), Browser::new(&ps, "b"));
    for br in [&a, &b] {
        assert_eq!(subscribe(&c, "rate", br).await, StatusCode::CREATED);
    }
    ps.script(
        "a",
        &[Reply {
            status: 429,
            retry_after: Some("2"),
        }],
    );
    c.publish("rate", "one").await;
    let ok = eventually(Duration::from_secs(10), async || {
        metric(&c, "crier_webpush_retries_total").await == Some(1.0)
    })
    .await;
    assert!(ok, "the 429 was seen");
    let limited_at = ps.pushed_to("a")[0].at;
    c.publish("rate", "two").await;
    wait_outcome(&c, "delivered", 4.0).await;
    let to_b = ps.pushed_to("b");
    assert_eq!(to_b.len(), 2);
    assert_eq!(b.envelope(&to_b[1])["data"], "two");
    let held = to_b[1].at - limited_at;
    assert!(
        held >= Duration::from_millis(1800),
        "a new request to the service waited for its Retry-After: {held:?}"
    );
    let to_a: Vec<Value> = ps
        .pushed_to("a")
        .iter()
        .map(|p| a.envelope(p)["data"].clone())
        .collect();
    assert_eq!(to_a.len(), 3, "one, one again, two");
    assert!(to_a.contains(&json!("two")));
    c.shutdown().await;
}

#[tokio::test]
async fn subscriptions_survive_a_restart() {
    let site = Site::new().await;
    let ps = PushService::start(site.dir.path()).await;
    let c = site.crier(&ps).await;
    let b = Browser::new(&ps, "kept");
    let gone = Browser::new(&ps, "dropped");
    assert_eq!(subscribe(&c, "news", &b).await, StatusCode::CREATED);
    assert_eq!(subscribe(&c, "news", &gone).await, StatusCode::CREATED);
    let r = client()
        .delete(api(&c, "news"))
        .json(&gone.json())
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let key = crier_key(&c).await;
    c.shutdown().await;

    let c = site.crier(&ps).await;
    assert_eq!(crier_key(&c).await, key, "the same VAPID key");
    let a = admin_webpush(&c).await;
    assert_eq!(a["subscriptions"], 1, "{a}");
    assert_eq!(metric(&c, "crier_webpush_subscriptions").await, Some(1.0));
    assert_eq!(
        subscribe(&c, "news", &b).await,
        StatusCode::OK,
        "still there"
    );
    let id = c.publish("news", "after restart").await;
    let got = ps.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].id, "kept");
    verify_vapid(&got[0], &key, &ps.origin());
    assert_eq!(b.envelope(&got[0])["id"], id.as_str());
    c.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_refused_and_nothing_is_stored() {
    let site = Site::new().await;
    let ps = PushService::start(site.dir.path()).await;
    let c = site.crier(&ps).await;
    let b = Browser::new(&ps, "x");
    let good = b.json();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v
    };
    let port = ps.addr.port();
    let compressed = {
        let mut k = vec![2 + (b.public[64] & 1)];
        k.extend_from_slice(&b.public[1..33]);
        URL_SAFE_NO_PAD.encode(k)
    };
    let off_curve = {
        let mut k = b.public.clone();
        k[64] ^= 1;
        URL_SAFE_NO_PAD.encode(k)
    };
    let cases: Vec<(&str, Value)> = vec![
        (
            "http endpoint",
            with(&|v| v["endpoint"] = format!("http://127.0.0.1:{port}/push/x").into()),
        ),
        (
            "host not in push_hosts",
            with(&|v| v["endpoint"] = "https://evil.example/push/x".into()),
        ),
        (
            "localhost not listed",
            with(&|v| v["endpoint"] = format!("https://localhost:{port}/push/x").into()),
        ),
        (
            "another loopback IP",
            with(&|v| v["endpoint"] = format!("https://127.0.0.2:{port}/push/x").into()),
        ),
        (
            "metadata IP",
            with(&|v| v["endpoint"] = "https://169.254.169.254/latest/meta-data".into()),
        ),
        (
            "user info",
            with(&|v| v["endpoint"] = format!("https://a@127.0.0.1:{port}/push/x").into()),
        ),
        ("not a URL", with(&|v| v["endpoint"] = "push me".into())),
        (
            "p256dh not base64url",
            with(&|v| v["keys"]["p256dh"] = "!!!".into()),
        ),
        (
            "p256dh compressed",
            with(&|v| v["keys"]["p256dh"] = compressed.clone().into()),
        ),
        (
            "p256dh off the curve",
            with(&|v| v["keys"]["p256dh"] = off_curve.clone().into()),
        ),
        (
            "p256dh short",
            with(&|v| v["keys"]["p256dh"] = URL_SAFE_NO_PAD.encode([4u8; 33]).into()),
        ),
        (
            "auth 15 bytes",
            with(&|v| v["keys"]["auth"] = URL_SAFE_NO_PAD.encode([1u8; 15]).into()),
        ),
        (
            "auth 17 bytes",
            with(&|v| v["keys"]["auth"] = URL_SAFE_NO_PAD.encode([1u8; 17]).into()),
        ),
        (
            "no keys",
            with(&|v| {
                v.as_object_mut()
                    .map(|o| o.remove("keys"))
                    .map(|_| ())
                    .unwrap_or(())
            }),
        ),
        (
            "no endpoint",
            with(&|v| {
                v.as_object_mut()
                    .map(|o| o.remove("endpoint"))
                    .map(|_| ())
                    .unwrap_or(())
            }),
        ),
        ("endpoint not a string", with(&|v| v["endpoint"] = 5.into())),
    ];
    for (what, body) in &cases {
        let r = client()
            .post(api(&c, "news"))
            .json(body)
            .send()
            .await
            .expect("POST");
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {text}");
        assert!(text.contains("error"), "{what}: a reason: {text}");
    }
    let raw = |body: &'static [u8]| {
        client()
            .post(api(&c, "news"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(raw(b"{not json").await.expect("POST").status(), 400);
    assert_eq!(raw(b"").await.expect("POST").status(), 400);
    let huge = format!("{{\"endpoint\":\"{}\"}}", "a".repeat(10_000));
    let r = client()
        .post(api(&c, "news"))
        .body(huge)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 400, "a body over 8 KiB");

    // The channel is checked as a subscriber's would be.
    let r = client()
        .post(api(&c, "news"))
        .header("origin", "https://evil.example")
        .json(&good)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "cross-site page");
    assert_eq!(
        subscribe(&c, "members:team", &b).await,
        StatusCode::UNAUTHORIZED,
        "forward auth says no"
    );
    assert_eq!(
        subscribe(&c, "secure:vault", &b).await,
        StatusCode::UNAUTHORIZED,
        "no JWT"
    );
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "u", "exp": SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() + 600,
                "crier.subscribe": ["secure:other"]}),
        &jsonwebtoken::EncodingKey::from_secret(b"a-secret-for-the-webpush-tests-0123456789"),
    )
    .expect("sign");
    let r = client()
        .post(api(&c, "secure:vault"))
        .bearer_auth(&token)
        .json(&good)
        .send()
        .await
        .expect("POST");
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "a JWT for another channel"
    );
    let r = client()
        .post(api(&c, "bad channel!"))
        .json(&good)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = client()
        .delete(api(&c, "news"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "DELETE names no endpoint"
    );
    let r = client()
        .put(api(&c, "news"))
        .json(&good)
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);

    assert_eq!(admin_webpush(&c).await["subscriptions"], 0);
    assert_eq!(metric(&c, "crier_webpush_subscriptions").await, Some(0.0));
    c.publish("news", "nobody").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(ps.pushed().is_empty());

    // The same checks let the right callers in.
    let r = client()
        .post(api(&c, "members:team"))
        .header("cookie", "session=good")
        .json(&good)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::CREATED, "forward auth says yes");
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "u", "exp": SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() + 600,
                "crier.subscribe": ["secure:*"]}),
        &jsonwebtoken::EncodingKey::from_secret(b"a-secret-for-the-webpush-tests-0123456789"),
    )
    .expect("sign");
    let r = client()
        .post(api(&c, "secure:vault"))
        .bearer_auth(&token)
        .json(&good)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), StatusCode::CREATED, "a JWT for the channel");
    // DELETE by ?endpoint= needs the same checks.
    let url = format!(
        "{}?endpoint={}",
        api(&c, "members:team"),
        b.endpoint.replace(':', "%3A").replace('/', "%2F")
    );
    assert_eq!(
        client().delete(&url).send().await.expect("DELETE").status(),
        StatusCode::UNAUTHORIZED
    );
    let r = client()
        .delete(&url)
        .header("cookie", "session=good")
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let a = admin_webpush(&c).await;
    assert_eq!(a["subscriptions"], 1, "{a}");
    assert_eq!(a["channels"]["secure:vault"], 1, "{a}");
    c.shutdown().await;
}

#[tokio::test]
async fn a_thousand_subscriptions_all_receive_a_publish() {
    raise_fd_limit();
    let site = Site::new().await;
    let ps = PushService::start(site.dir.path()).await;
    let c = site.crier(&ps).await;
    let browsers: Vec<Browser> = (0..1000)
        .map(|i| Browser::new(&ps, &format!("m{i}")))
        .collect();
    let started = Instant::now();
    let http = client();
    let url = api(&c, "crowd");
    let statuses: Vec<StatusCode> = futures_util::stream::iter(&browsers)
        .map(|b| {
            let req = http.post(&url).json(&b.json());
            async move { req.send().await.expect("POST subscription").status() }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let subscribe_time = started.elapsed();
    assert!(statuses.iter().all(|s| *s == StatusCode::CREATED));
    let published = Instant::now();
    let id = c.publish("crowd", "to everyone").await;
    let got = ps.wait_for(1000, Duration::from_secs(120)).await;
    let last = got.iter().map(|p| p.at).max().expect("some") - published;
    let by_id: HashMap<&str, &Browser> = browsers.iter().map(|b| (b.id.as_str(), b)).collect();
    let mut seen = std::collections::HashSet::new();
    for p in &got {
        let b = by_id[p.id.as_str()];
        assert_eq!(b.envelope(p)["id"], id.as_str());
        seen.insert(p.id.clone());
    }
    assert_eq!(seen.len(), 1000, "each browser exactly once");
    wait_outcome(&c, "delivered", 1000.0).await;
    eprintln!(
        "1000 subscriptions: stored in {subscribe_time:?} (16 at a time); one publish reached all 1000 in {last:?}"
    );
    c.shutdown().await;
}

#[tokio::test]
async fn a_slow_push_service_delays_only_its_own_subscribers() {
    let site = Site::new().await;
    let slow = PushService::start(site.dir.path()).await;
    *slow.log.delay.lock().expect("delay") = Duration::from_secs(3);
    let fast_dir = tempfile::tempdir().expect("tempdir");
    let fast = PushService::start(fast_dir.path()).await;
    // One ca_file for both doubles.
    let both = format!(
        "{}{}",
        std::fs::read_to_string(&slow.ca_file).expect("ca"),
        std::fs::read_to_string(&fast.ca_file).expect("ca")
    );
    std::fs::write(&slow.ca_file, both).expect("write ca");
    let c = Crier::start(
        &site.upstream.url(),
        &site.toml(
            &slow,
            &format!(
                "push_ports = [{}, {}]\n",
                slow.addr.port(),
                fast.addr.port()
            ),
        ),
    )
    .await;
    for i in 0..20 {
        let b = Browser::new(&slow, &format!("s{i}"));
        assert_eq!(subscribe(&c, "mixed", &b).await, StatusCode::CREATED);
    }
    let f = Browser::new(&fast, "f");
    assert_eq!(subscribe(&c, "mixed", &f).await, StatusCode::CREATED);
    let started = Instant::now();
    for i in 0..10 {
        let t = Instant::now();
        c.publish("mixed", format!("m{i}")).await;
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "publishing never waits for Web Push"
        );
    }
    fast.wait_for(10, Duration::from_secs(10)).await;
    let fast_done = started.elapsed();
    let in_flight = slow.pushed().len();
    assert!(
        fast_done < Duration::from_secs(3),
        "the fast service got all 10 in {fast_done:?}, before the slow one answered once"
    );
    assert!(
        in_flight <= 16,
        "at most 16 requests in flight to one service, saw {in_flight}"
    );
    let data: Vec<Value> = fast
        .pushed()
        .iter()
        .map(|p| f.envelope(p)["data"].clone())
        .collect();
    assert_eq!(data.len(), 10);
    c.shutdown().await;
}

#[tokio::test]
async fn max_subscriptions_is_a_limit() {
    let site = Site::new().await;
    let ps = PushService::start(site.dir.path()).await;
    let c = Crier::start(
        &site.upstream.url(),
        &site.toml(&ps, "max_subscriptions = 2\n"),
    )
    .await;
    let (a, b, x) = (
        Browser::new(&ps, "a"),
        Browser::new(&ps, "b"),
        Browser::new(&ps, "x"),
    );
    assert_eq!(subscribe(&c, "one", &a).await, StatusCode::CREATED);
    assert_eq!(subscribe(&c, "two", &b).await, StatusCode::CREATED);
    assert_eq!(
        subscribe(&c, "two", &x).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        subscribe(&c, "two", &b).await,
        StatusCode::OK,
        "renewing one is fine"
    );
    assert_eq!(admin_webpush(&c).await["subscriptions"], 2);
    c.shutdown().await;
}

#[tokio::test]
async fn a_reload_takes_a_new_key_and_ttl() {
    let site = Site::new().await;
    let ps = PushService::start(site.dir.path()).await;
    let c = site.crier(&ps).await;
    let old_key = crier_key(&c).await;
    let b = Browser::new(&ps, "r");
    assert_eq!(subscribe(&c, "news", &b).await, StatusCode::CREATED);
    c.publish("news", "before").await;
    let got = ps.wait_for(1, Duration::from_secs(10)).await;
    verify_vapid(&got[0], &old_key, &ps.origin());
    assert_eq!(header(&got[0], "ttl"), Some("120"));

    let mut cfg = c.handle.config().as_ref().clone();
    let w = cfg.webpush.as_mut().expect("webpush on");
    let key2 = site.dir.path().join("vapid2.pem");
    crier::keys::VapidKey::generate(&key2).expect("new key");
    w.vapid_key_file.path = key2;
    w.ttl = Duration::from_secs(300);
    c.handle.reload(cfg).expect("reload");
    let new_key = crier_key(&c).await;
    assert_ne!(new_key, old_key);
    c.publish("news", "after").await;
    let got = ps.wait_for(2, Duration::from_secs(10)).await;
    verify_vapid(&got[1], &new_key, &ps.origin());
    assert_eq!(header(&got[1], "ttl"), Some("300"));
    assert_eq!(b.envelope(&got[1])["data"], "after");
    c.shutdown().await;
}

/// `crier demo` without a `[webpush]` section: Web Push on with a throwaway key and store, the
/// service worker served, real push services accepted, and the throwaway files gone at exit.
#[tokio::test]
async fn the_demo_turns_web_push_on_by_itself() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("demo.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[publish]\nunix = \"{}\"\nlisten = [\"127.0.0.1:0\"]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("publish.sock").display()
        ),
    )
    .expect("config");
    let mut child = Command::new(common::process::crier_bin())
        .args(["demo", "--config"])
        .arg(&config)
        .env("CRIER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn crier demo");
    let throwaway = std::env::temp_dir().join(format!("crier-demo-{}", child.id()));
    let stdout = child.stdout.take().expect("stdout");
    // Read stdout to its end (a closed pipe would kill the demo at its next line).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(p) = l.trim().strip_prefix("1. open") {
                let _ = tx.send(p.trim().to_string());
            }
        }
    });
    let page = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20)))
        .await
        .expect("reader")
        .expect("crier demo prints the page address");
    let http = client();
    let up = eventually(Duration::from_secs(10), async || {
        http.get(&page).send().await.is_ok()
    })
    .await;
    assert!(up, "{page} never answered");
    let html = http
        .get(&page)
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("text");
    assert!(
        html.contains("id=\"notify\""),
        "the page has a Notify me button"
    );
    let sw = http
        .get(format!("{page}sw.js"))
        .send()
        .await
        .expect("sw.js");
    assert_eq!(sw.status(), StatusCode::OK);
    assert!(sw.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/javascript"));
    assert!(sw.text().await.expect("text").contains("showNotification"));
    let key = http
        .get(format!("{page}_crier/webpush/key"))
        .send()
        .await
        .expect("key")
        .text()
        .await
        .expect("text");
    assert_eq!(
        URL_SAFE_NO_PAD.decode(key.trim()).expect("base64url").len(),
        65
    );
    assert!(throwaway.join("vapid.pem").is_file());
    let ecdh = PrivateKey::generate(&ECDH_P256).expect("key");
    let p256dh = URL_SAFE_NO_PAD.encode(ecdh.compute_public_key().expect("public").as_ref());
    let sub = |endpoint: &str| json!({"endpoint": endpoint, "keys": {"p256dh": p256dh, "auth": URL_SAFE_NO_PAD.encode([9u8; 16])}});
    let post = |body: Value| {
        http.post(format!("{page}_crier/webpush/demo"))
            .json(&body)
            .send()
    };
    let r = post(sub("https://fcm.googleapis.com/fcm/send/abc:def"))
        .await
        .expect("POST");
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "a real push service is accepted"
    );
    let r = post(sub("https://127.0.0.1:9/push/x")).await.expect("POST");
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "loopback is not a push service here"
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("waiter")
        .expect("exit status");
    assert_eq!(status.code(), Some(0));
    assert!(
        !throwaway.exists(),
        "the throwaway key and store are removed"
    );
}

#[test]
fn vapid_generate_writes_a_private_key_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("vapid.pem");
    let run = || {
        std::process::Command::new(common::process::crier_bin())
            .args(["vapid", "generate"])
            .arg(&key)
            .output()
            .expect("run crier vapid generate")
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    let mode = std::fs::metadata(&key)
        .expect("written")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let pem = std::fs::read_to_string(&key).expect("read");
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
    let public = crier::keys::VapidKey::from_pem(&pem).expect("a P-256 key");
    assert!(
        printed.contains(public.public_key_b64()),
        "prints the public key: {printed}"
    );
    let again = run();
    assert_eq!(again.status.code(), Some(1), "never overwrites");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert_eq!(std::fs::read_to_string(&key).expect("read"), pem);
}

/// Web Push cannot be pointed at internal addresses. A name in `push_hosts` that resolves to
/// loopback (here through `resolve`, as a hostile DNS answer would) gets no connection and no
/// retries; an address or port outside the policy is refused at subscribe; only an explicit
/// `allow_addresses` lets the same subscription through.
#[tokio::test]
async fn endpoints_that_resolve_to_internal_addresses_get_nothing() {
    let site = Site::new().await;
    let ps = PushService::start(site.dir.path()).await;
    let port = ps.addr.port();
    let d = site.dir.path();
    let config = |allow: &str| {
        format!(
            "[webpush]\nvapid_key_file = \"{}\"\nsubject = \"{SUBJECT}\"\nstore = \"{}\"\n\
             push_hosts = [\"push.test\", \"127.0.0.1\"]\nca_file = \"{}\"\n\
             push_ports = [{port}]\nresolve = {{ \"push.test\" = [\"127.0.0.1\"] }}\n{allow}",
            d.join("vapid.pem").display(),
            d.join("webpush.redb").display(),
            ps.ca_file.display(),
        )
    };
    let c = Crier::start(&site.upstream.url(), &config("")).await;
    let mut b = Browser::new(&ps, "named");
    b.endpoint = format!("https://push.test:{port}/push/named");

    let refused = |endpoint: String, why: &'static str| {
        let body = {
            let mut v = b.json();
            v["endpoint"] = endpoint.into();
            v
        };
        let url = api(&c, "inside");
        async move {
            let r = client().post(url).json(&body).send().await.expect("POST");
            assert_eq!(r.status(), StatusCode::BAD_REQUEST);
            let v: Value = r.json().await.expect("json");
            let e = v["error"].as_str().unwrap_or_default().to_string();
            assert!(e.contains(why), "{e}");
        }
    };
    // An address that is not public, although listed in push_hosts.
    refused(ps.endpoint("literal"), "not a public address").await;
    // A port that push_ports does not list (443 is not, here).
    refused("https://push.test/push/x".into(), "port 443").await;

    // The name passes at subscribe (what it resolves to may change); crier refuses to connect.
    assert_eq!(subscribe(&c, "inside", &b).await, StatusCode::CREATED);
    c.publish("inside", "for the metadata service").await;
    assert!(
        eventually(Duration::from_secs(5), async || {
            admin_webpush(&c).await["deliveries"]["failed"] == 1
        })
        .await,
        "{}",
        admin_webpush(&c).await
    );
    let w = admin_webpush(&c).await;
    assert_eq!(w["retries"], 0, "a refused address is not retried: {w}");
    let reason = w["recent_failures"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(
        reason.contains("127.0.0.1") && reason.contains("not public"),
        "{w}"
    );
    assert!(
        ps.pushed().is_empty(),
        "nothing reached the internal address"
    );
    c.shutdown().await;

    // Allowed explicitly: the stored subscription gets the next message.
    let c = Crier::start(
        &site.upstream.url(),
        &config("allow_addresses = [\"127.0.0.0/8\"]\n"),
    )
    .await;
    c.publish("inside", "now allowed").await;
    let got = ps.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].id, "named");
    c.shutdown().await;
}

#[tokio::test]
async fn in_a_cluster_every_nodes_publish_reaches_every_nodes_subscriptions_once() {
    if let Some(why) = common::redis::absent() {
        eprintln!("skipped: {why}");
        return;
    }
    let redis = common::redis::RedisServer::start(false);
    let site = Site::new().await;
    let ps = PushService::start(site.dir.path()).await;
    let extra = format!("[cluster]\nredis = [\"{}\"]\n", redis.url());
    let a = Crier::start(&site.upstream.url(), &site.toml(&ps, &extra)).await;
    let b = Crier::start(&site.upstream.url(), &site.toml(&ps, &extra)).await;
    let browser = Browser::new(&ps, "one");
    assert_eq!(subscribe(&b, "news", &browser).await, StatusCode::CREATED);
    let known = eventually(Duration::from_secs(10), async || {
        admin_webpush(&a).await["subscriptions"] == 1
    })
    .await;
    assert!(known, "node A knows node B's subscription");
    assert_eq!(
        subscribe(&a, "news", &browser).await,
        StatusCode::OK,
        "one subscription, whichever node is asked"
    );
    let ids = [
        a.publish("news", "from a").await,
        b.publish("news", "from b").await,
    ];
    let got = ps.wait_for(2, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = ps.pushed();
    assert_eq!(all.len(), 2, "one push per message, not one per node");
    let mut pushed_ids: Vec<String> = got
        .iter()
        .map(|p| {
            browser.envelope(p)["id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    pushed_ids.sort();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(pushed_ids, want);
    // Unsubscribed on node A: node B stops pushing to it too.
    let r = client()
        .delete(api(&a, "news"))
        .json(&browser.json())
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let gone = eventually(Duration::from_secs(10), async || {
        admin_webpush(&b).await["subscriptions"] == 0
    })
    .await;
    assert!(gone, "node B forgot it");
    b.publish("news", "nobody").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ps.pushed().len(), 2);
}
