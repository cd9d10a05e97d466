//! The sessions' DTLS: dimpl (DTLS 1.2, the version every browser speaks), set up once per
//! process — one certificate, one validated `Config`, one parsed private key — instead of once
//! per session: building a `Config` costs a key exchange and a signature check, and dimpl
//! would parse the key into every session's state (920 bytes that every idle session kept,
//! heaptrack, 200 sessions).
//!
//! A browser always offers DTLS-SRTP, so dimpl negotiates it and hands over SRTP keying
//! material at the end of each handshake; a data-only session has no use for it and drops it
//! on the spot.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use dimpl::crypto::{Buf, HashAlgorithm, KeyProvider, SignatureAlgorithm, SigningKey};

/// The DTLS records crier sends are at most this large (dimpl's default, which keeps a
/// record, its UDP and IP headers under the 1,280 bytes IPv6 guarantees).
pub(super) const MTU: usize = 1150;

#[derive(Debug, thiserror::Error)]
pub enum DtlsSetupError {
    #[error("webrtc: cannot make a DTLS certificate: {0}")]
    Certificate(String),
    #[error("webrtc: DTLS setup: {0}")]
    Config(String),
}

/// What every session's DTLS shares.
pub(super) struct Setup {
    pub(super) config: Arc<dimpl::Config>,
    pub(super) cert: dimpl::DtlsCertificate,
    /// SHA-256 of the certificate as an answer announces it (`AB:CD:...`).
    pub(super) fingerprint: String,
}

impl Setup {
    /// A fresh self-signed certificate and the config for it.
    pub(super) fn new() -> Result<Setup, DtlsSetupError> {
        let cert = dimpl::certificate::generate_self_signed_certificate()
            .map_err(|e| DtlsSetupError::Certificate(e.to_string()))?;
        let mut crypto = dimpl::crypto::aws_lc_rs::default_provider();
        crypto.key_provider = shared_keys();
        // ICE has verified return routability before DTLS starts, so a server cookie adds a
        // round trip and nothing else.
        let config = dimpl::Config::builder()
            .use_server_cookie(false)
            .mtu(MTU)
            .with_crypto_provider(crypto)
            .build()
            .map_err(|e| DtlsSetupError::Config(e.to_string()))?;
        Ok(Setup {
            config: Arc::new(config),
            fingerprint: cert.fingerprint_str(),
            cert,
        })
    }

    /// A session's DTLS, in the server role unless `active`.
    pub(super) fn session(&self, active: bool, now: std::time::Instant) -> dimpl::Dtls {
        let mut d = dimpl::Dtls::new_12(self.config.clone(), self.cert.clone(), now);
        d.set_active(active);
        d
    }
}

/// A mutex whose holder cannot leave its value half-changed: a poisoned one is as good.
/// std's, not parking_lot's: dimpl's `KeyProvider` must be `RefUnwindSafe`.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The key provider of the sessions' dimpl config: the key dimpl asks for again and again (the
/// one certificate's) is parsed once and shared; any other is parsed as dimpl would.
fn shared_keys() -> &'static SharedKeys {
    static KEYS: OnceLock<SharedKeys> = OnceLock::new();
    KEYS.get_or_init(|| SharedKeys {
        inner: dimpl::crypto::aws_lc_rs::default_provider().key_provider,
        last: Mutex::new(None),
    })
}

#[derive(Debug)]
struct SharedKeys {
    inner: &'static dyn KeyProvider,
    /// The last key parsed, by its DER.
    last: Mutex<Option<(Vec<u8>, Arc<SharedKey>)>>,
}

impl SharedKeys {
    fn key(&self, der: &[u8]) -> Result<Arc<SharedKey>, dimpl::CryptoError> {
        let mut last = lock(&self.last);
        if let Some((d, k)) = last.as_ref() {
            if d.as_slice() == der {
                return Ok(k.clone());
            }
        }
        let key = self.inner.load_private_key(der)?;
        let k = Arc::new(SharedKey {
            algorithm: key.algorithm(),
            hash: key.hash_algorithm(),
            hashes: key.supported_hash_algorithms().to_vec(),
            key: Mutex::new(key),
        });
        *last = Some((der.to_vec(), k.clone()));
        Ok(k)
    }
}

impl KeyProvider for SharedKeys {
    fn load_private_key(&self, der: &[u8]) -> Result<Box<dyn SigningKey>, dimpl::CryptoError> {
        Ok(Box::new(KeyHandle(self.key(der)?)))
    }
}

/// One parsed private key and what dimpl asks of it without signing (answered without the lock).
#[derive(Debug)]
struct SharedKey {
    algorithm: SignatureAlgorithm,
    hash: HashAlgorithm,
    hashes: Vec<HashAlgorithm>,
    /// dimpl signs through `&mut`; a handshake signs once, so sessions hardly ever wait here.
    key: Mutex<Box<dyn SigningKey>>,
}

/// A session's use of the shared key.
#[derive(Debug)]
struct KeyHandle(Arc<SharedKey>);

impl SigningKey for KeyHandle {
    fn sign(
        &mut self,
        data: &[u8],
        hash_alg: HashAlgorithm,
        out: &mut Buf,
    ) -> Result<(), dimpl::CryptoError> {
        lock(&self.0.key).sign(data, hash_alg, out)
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.0.algorithm
    }

    fn hash_algorithm(&self) -> HashAlgorithm {
        self.0.hash
    }

    fn supported_hash_algorithms(&self) -> &[HashAlgorithm] {
        &self.0.hashes
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// Drains one side: the packets it sends, whether it connected, the peer certificate
    /// it saw, the application data it read.
    #[derive(Default)]
    struct Heard {
        packets: Vec<Vec<u8>>,
        connected: bool,
        peer_cert: Option<Vec<u8>>,
        data: Vec<Vec<u8>>,
    }

    fn drain(d: &mut dimpl::Dtls, heard: &mut Heard) {
        let mut buf = vec![0u8; 2048];
        loop {
            match d.poll_output(&mut buf) {
                dimpl::Output::Packet(p) => heard.packets.push(p.to_vec()),
                dimpl::Output::Connected => heard.connected = true,
                dimpl::Output::PeerCert(c) => heard.peer_cert = Some(c.to_vec()),
                dimpl::Output::ApplicationData(a) => heard.data.push(a.to_vec()),
                dimpl::Output::Timeout(_) => return,
                _ => {}
            }
        }
    }

    /// Every session's DTLS gets the one config and the one parsed key, not copies of its own.
    #[test]
    fn sessions_share_one_config_and_one_parsed_key() {
        let setup = Setup::new().expect("setup");
        let keys = shared_keys();
        let (k1, k2) = (
            keys.key(&setup.cert.private_key).expect("key"),
            keys.key(&setup.cert.private_key).expect("key"),
        );
        assert!(Arc::ptr_eq(&k1, &k2), "a second session parsed its own key");
    }

    /// A plain dimpl client against a session's DTLS, in memory: the handshake completes,
    /// each side sees the other's certificate (whose fingerprint the answer announced) and
    /// data flows.
    #[test]
    fn a_session_handshakes_and_carries_data() {
        let server_setup = Setup::new().expect("setup");
        let client_setup = Setup::new().expect("setup");
        let now = Instant::now();
        let mut server = server_setup.session(false, now);
        let mut client = client_setup.session(true, now);
        let (mut c, mut s) = (Heard::default(), Heard::default());
        client.handle_timeout(now).expect("client start");
        server.handle_timeout(now).expect("server start");
        for _ in 0..20 {
            drain(&mut client, &mut c);
            for p in c.packets.drain(..) {
                let _ = server.handle_packet(&p);
            }
            drain(&mut server, &mut s);
            for p in s.packets.drain(..) {
                let _ = client.handle_packet(&p);
            }
            if c.connected && s.connected {
                break;
            }
        }
        assert!(c.connected && s.connected, "the handshake did not complete");
        let seen = c
            .peer_cert
            .take()
            .expect("the client saw the server's certificate");
        assert_eq!(
            dimpl::certificate::format_fingerprint(&dimpl::certificate::calculate_fingerprint(
                &seen
            )),
            server_setup.fingerprint
        );
        assert_eq!(
            s.peer_cert.as_deref(),
            Some(client_setup.cert.certificate.as_slice())
        );
        client
            .send_application_data(b"hello")
            .expect("client sends");
        drain(&mut client, &mut c);
        for p in c.packets.drain(..) {
            server.handle_packet(&p).expect("server reads");
        }
        drain(&mut server, &mut s);
        assert_eq!(s.data, vec![b"hello".to_vec()]);
    }
}
