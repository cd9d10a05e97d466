//! TLS listeners: h1, h2 (ALPN), wss, SSE multiplexed over one h2 connection, bad PEM files,
//! and the certificate re-read on reload.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use rustls::pki_types::{CertificateDer, ServerName};

struct Certs {
    dir: tempfile::TempDir,
    pem: String,
    der: Vec<u8>,
}

fn make_cert(dir: &Path) -> (String, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    (ck.cert.pem(), ck.cert.der().to_vec())
}

fn certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let (pem, der) = make_cert(dir.path());
    Certs { dir, pem, der }
}

fn tls_toml(c: &Certs) -> String {
    format!(
        "[server.tls]\nlisten = [\"127.0.0.1:0\"]\ncert = \"{}\"\nkey = \"{}\"\n[[push]]\npath = \"/live/{{channel}}\"\nkeepalive = \"1s\"\n",
        c.dir.path().join("cert.pem").display(),
        c.dir.path().join("key.pem").display()
    )
}

fn https_client(pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()])
        .build()
        .unwrap()
}

fn rustls_client(der: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(der.to_vec())).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

#[tokio::test]
async fn https_h1_and_h2_reach_the_upstream() {
    let up = Upstream::start().await;
    let certs = certs();
    let c = Crier::start(&up.url(), &tls_toml(&certs)).await;
    let port = c.handle.addrs().public_tls[0].port();
    let client = https_client(&certs.pem);
    let r = client
        .get(format!("https://localhost:{port}/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2, "ALPN picks h2");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-forwarded-proto"], "https");
    assert_eq!(v["headers"]["host"], format!("localhost:{port}"));
    assert_eq!(
        v["version"], "HTTP/1.1",
        "the upstream is spoken to in HTTP/1.1"
    );

    let h1 = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .tls_certs_only([reqwest::Certificate::from_pem(certs.pem.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let r = h1
        .get(format!("https://localhost:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_11);
    assert_eq!(r.text().await.unwrap(), "hello from upstream");
    c.shutdown().await;
}

#[tokio::test]
async fn sse_streams_multiplex_on_one_h2_connection() {
    let up = Upstream::start().await;
    let certs = certs();
    let c = Crier::start(&up.url(), &tls_toml(&certs)).await;
    let port = c.handle.addrs().public_tls[0].port();
    let client = https_client(&certs.pem);
    let mut streams = Vec::new();
    for _ in 0..5 {
        let r = client
            .get(format!("https://localhost:{port}/live/tls"))
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), http::Version::HTTP_2);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        streams.push(r.bytes_stream());
    }
    assert!(
        eventually(Duration::from_secs(5), async || {
            metric(&c, "crier_connections{transport=\"sse\"}").await == Some(5.0)
        })
        .await
    );
    assert_eq!(
        metric(&c, "crier_client_connections").await,
        Some(1.0),
        "five SSE streams, one TLS connection"
    );
    c.publish("tls", "over h2").await;
    for s in &mut streams {
        let mut seen = String::new();
        while !seen.contains("data: over h2\n") {
            let chunk = tokio::time::timeout(Duration::from_secs(5), s.next())
                .await
                .expect("event in time")
                .expect("stream open")
                .unwrap();
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    c.shutdown().await;
}

#[tokio::test]
async fn wss_subscriber_receives() {
    let up = Upstream::start().await;
    let certs = certs();
    let c = Crier::start(&up.url(), &tls_toml(&certs)).await;
    let addr = c.handle.addrs().public_tls[0];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = rustls_client(&certs.der)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let url = format!("wss://localhost:{}/live/secure", addr.port());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    assert_eq!(resp.status(), 101);
    c.publish("secure", "hello wss").await;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("frame in time")
            .unwrap()
            .unwrap();
        if m.is_text() {
            assert_eq!(m.into_text().unwrap().as_str(), "hello wss");
            break;
        }
    }
    c.shutdown().await;
}

#[tokio::test]
async fn bad_pem_is_a_startup_error_naming_the_file() {
    let up = Upstream::start().await;
    let certs = certs();
    std::fs::write(certs.dir.path().join("cert.pem"), "not a certificate\n").unwrap();
    let err = Crier::try_start(&up.url(), &tls_toml(&certs))
        .await
        .err()
        .expect("refused");
    assert!(err.contains("cert.pem"), "{err}");
    assert!(err.contains("CERTIFICATE"), "{err}");

    let certs = certs_missing_key();
    let err = Crier::try_start(&up.url(), &tls_toml(&certs))
        .await
        .err()
        .expect("refused");
    assert!(
        err.contains("key.pem") && err.contains("cannot read"),
        "{err}"
    );
}

fn certs_missing_key() -> Certs {
    let c = certs();
    std::fs::remove_file(c.dir.path().join("key.pem")).unwrap();
    c
}

#[tokio::test]
async fn reload_rereads_the_certificate() {
    let up = Upstream::start().await;
    let certs = certs();
    let c = Crier::start(&up.url(), &tls_toml(&certs)).await;
    let addr = c.handle.addrs().public_tls[0];
    let peer_cert = |der: Vec<u8>| async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = rustls_client(&der)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        Ok::<_, std::io::Error>(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
    };
    assert_eq!(peer_cert(certs.der.clone()).await.unwrap(), certs.der);

    // certbot renews in place; SIGHUP (here: reload) makes new connections use the new one.
    let (_, new_der) = make_cert(certs.dir.path());
    assert_ne!(new_der, certs.der);
    c.handle.reload(c.handle.config().as_ref().clone()).unwrap();
    assert_eq!(peer_cert(new_der.clone()).await.unwrap(), new_der);
    assert!(
        peer_cert(certs.der.clone()).await.is_err(),
        "the old certificate is no longer served"
    );
    c.shutdown().await;
}
