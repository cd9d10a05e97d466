//! The client crier uses to call out (webhooks, Web Push): hyper-util's pooled client over
//! rustls, HTTP/1.1 and HTTP/2 by ALPN. Trust is the system's root store plus an optional
//! PEM file of extra CAs (a private CA, or a test's). Names are resolved by [`vet::Resolver`],
//! which for Web Push also vets the addresses.

pub mod vet;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// A pooled outbound client; cheap to clone (the pool is shared).
pub type HttpsClient = Client<HttpsConnector<HttpConnector<vet::Resolver>>, Full<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCert { path: PathBuf },
    #[error("{path}: {reason}")]
    BadCert { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// What the client trusts and how long it waits to connect.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Extra CA certificates (PEM), trusted besides the system's roots.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Option<Duration>,
    /// Idle pooled connections per host (0: no pooling).
    pub pool_max_idle_per_host: usize,
    /// Resolves names and keeps only the addresses this allows (Web Push); None: any.
    pub vet: Option<std::sync::Arc<arc_swap::ArcSwap<vet::AddressPolicy>>>,
}

/// Builds a client. System roots that fail to parse are skipped (a broken bundle entry
/// must not stop crier); a bad `ca_file` is an error, since the operator asked for it.
pub fn build(opts: &ClientOptions) -> Result<HttpsClient, ClientError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "system root store: skipped an entry");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = &opts.ca_file {
        for cert in read_ca_file(path)? {
            roots.add(cert).map_err(|e| ClientError::BadCert {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let resolver = match &opts.vet {
        Some(policy) => vet::Resolver::vetting(policy.clone()),
        None => vet::Resolver::default(),
    };
    let mut http = HttpConnector::new_with_resolver(resolver);
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(opts.connect_timeout);
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(opts.pool_max_idle_per_host)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector))
}

/// An error and its causes on one line: hyper-util's own message says only "client error
/// (Connect)", and the operator needs the TLS or DNS reason under it.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A `Retry-After` value: delay-seconds or an HTTP date (a date in the past is zero).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let pem = std::fs::read(path).map_err(|source| ClientError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ClientError::BadCert {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(ClientError::NoCert {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_ca_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a certificate").expect("write");
        let Err(e) = build(&ClientOptions {
            ca_file: Some(p.clone()),
            ..Default::default()
        }) else {
            panic!("a file with no certificate must fail")
        };
        assert!(e.to_string().contains("ca.pem"), "{e}");
        let missing = dir.path().join("missing.pem");
        let Err(e) = build(&ClientOptions {
            ca_file: Some(missing),
            ..Default::default()
        }) else {
            panic!("a missing file must fail")
        };
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }
}
