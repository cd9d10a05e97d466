//! The DTLS of crier's sessions: dimpl, the DTLS that str0m's own (aws-lc-rs) provider runs,
//! set up once per process instead of once per session, and keeping the SRTP keys to itself.
//!
//! str0m's provider builds and validates a dimpl `Config` for every session (a key exchange and a
//! signature check each time), and dimpl parses the certificate's private key into every
//! session's state: a 360-byte `Config` and 560 bytes of aws-lc key objects kept by every idle
//! session, the same for all of them (heaptrack, 200 idle sessions). Here every session gets the
//! one `Config` and a handle on the one parsed key; the handshake is otherwise str0m's.
//!
//! A browser always offers DTLS-SRTP, so at the end of every handshake the DTLS layer hands
//! str0m the SRTP keying material, and str0m builds two SRTP contexts from it (four AES-GCM
//! keys and two receive buffers: about 9 KB per session). crier's sessions carry data channels
//! only — no codec is ever negotiated, so no RTP packet is ever sent or accepted — and those
//! contexts would sit unused for the session's whole life. Without them str0m drops any
//! SRTP packet a peer sends, which is what a data-only session should do anyway.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use dimpl::crypto::{Buf, HashAlgorithm, KeyProvider, SignatureAlgorithm, SigningKey};
use str0m::config::{CryptoProvider, DtlsCert};
use str0m::crypto::dtls::{
    DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, DtlsVersion, ProtocolVersion,
};
use str0m::crypto::CryptoError;

/// The provider for session `Rtc`s.
pub(crate) fn provider() -> CryptoProvider {
    let mut p = str0m::crypto::from_feature_flags();
    p.dtls_provider = data_only(p.dtls_provider);
    p
}

/// `inner` (for certificates) with crier's DTLS; one per process (str0m wants a `&'static`).
fn data_only(inner: &'static dyn DtlsProvider) -> &'static dyn DtlsProvider {
    static DATA_ONLY: OnceLock<DataOnly> = OnceLock::new();
    DATA_ONLY.get_or_init(|| DataOnly {
        inner,
        config: Mutex::new(None),
    })
}

/// A mutex whose holder cannot leave its value half-changed: a poisoned one is as good.
/// std's, not parking_lot's: dimpl's `KeyProvider` must be `RefUnwindSafe`.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct DataOnly {
    /// str0m's own provider: makes the certificate.
    inner: &'static dyn DtlsProvider,
    /// The sessions' dimpl config, for the MTU it was built for (str0m asks with the same one
    /// every time: it comes from the `RtcConfig`, which is the same for every session).
    config: Mutex<Option<(Option<usize>, Arc<dimpl::Config>)>>,
}

impl DataOnly {
    fn config(&self, mtu: Option<usize>) -> Result<Arc<dimpl::Config>, CryptoError> {
        let mut cached = lock(&self.config);
        if let Some((m, c)) = cached.as_ref() {
            if *m == mtu {
                return Ok(c.clone());
            }
        }
        let mut crypto = dimpl::crypto::aws_lc_rs::default_provider();
        crypto.key_provider = shared_keys();
        // As str0m's provider: ICE has verified return routability before DTLS starts, so
        // a server cookie adds a round trip and nothing else.
        let mut b = dimpl::Config::builder()
            .use_server_cookie(false)
            .with_crypto_provider(crypto);
        if let Some(mtu) = mtu {
            b = b.mtu(mtu);
        }
        let c = Arc::new(
            b.build()
                .map_err(|e| CryptoError::Other(format!("dimpl config: {e}")))?,
        );
        *cached = Some((mtu, c.clone()));
        Ok(c)
    }
}

impl DtlsProvider for DataOnly {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        self.inner.generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        dtls_version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let config = self.config(mtu)?;
        let cert = dimpl::DtlsCertificate {
            certificate: cert.certificate.clone(),
            private_key: cert.private_key.clone(),
        };
        let dtls = match dtls_version {
            DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, cert, now),
            DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, cert, now),
            DtlsVersion::Auto => dimpl::Dtls::new_auto(config, cert, now),
            v => return Err(CryptoError::Other(format!("unsupported DTLS version {v}"))),
        };
        Ok(Box::new(NoSrtp(dtls)))
    }

    fn is_test(&self) -> bool {
        self.inner.is_test()
    }
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

/// A session's DTLS: dimpl's, except that it never reports SRTP keying material.
struct NoSrtp(dimpl::Dtls);

impl std::fmt::Debug for NoSrtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoSrtp").finish_non_exhaustive()
    }
}

impl DtlsInstance for NoSrtp {
    fn set_active(&mut self, active: bool) {
        self.0.set_active(active)
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.0.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        match self.0.poll_output(buf) {
            // The keys come right after `Connected`, in the same poll cycle (dimpl, 1.2 and
            // 1.3 alike); str0m takes a repeated `Connected` as the no-op it is. Answering
            // with another output keeps str0m polling, so nothing queued behind it waits.
            DtlsOutput::KeyingMaterial(..) => DtlsOutput::Connected,
            o => o,
        }
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.0.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.0.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.0.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.0.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.0.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.0.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one side of a handshake said: every output until its timeout.
    #[derive(Default)]
    struct Heard {
        packets: Vec<Vec<u8>>,
        connected: bool,
        keys: bool,
        data: Vec<Vec<u8>>,
    }

    fn drain(d: &mut dyn DtlsInstance, heard: &mut Heard) {
        let mut buf = vec![0u8; 2000];
        loop {
            match d.poll_output(&mut buf) {
                DtlsOutput::Packet(p) => heard.packets.push(p.to_vec()),
                DtlsOutput::Connected => heard.connected = true,
                DtlsOutput::KeyingMaterial(..) => heard.keys = true,
                DtlsOutput::ApplicationData(a) => heard.data.push(a.to_vec()),
                DtlsOutput::Timeout(_) => return,
                _ => {}
            }
        }
    }

    /// Every session's DTLS gets the one config and the one parsed key, not copies of its own.
    #[test]
    fn sessions_share_one_config_and_one_parsed_key() {
        let only = DataOnly {
            inner: str0m::crypto::from_feature_flags().dtls_provider,
            config: Mutex::new(None),
        };
        let cert = only.generate_certificate().expect("a cert");
        let (a, b) = (
            only.config(Some(1200)).expect("config"),
            only.config(Some(1200)).expect("config"),
        );
        assert!(Arc::ptr_eq(&a, &b), "a second session built its own config");
        let keys = shared_keys();
        let (k1, k2) = (
            keys.key(&cert.private_key).expect("key"),
            keys.key(&cert.private_key).expect("key"),
        );
        assert!(Arc::ptr_eq(&k1, &k2), "a second session parsed its own key");
    }

    /// A client with str0m's plain provider against a server with ours, in memory: the
    /// handshake completes and data flows, the client gets SRTP keys (so SRTP was negotiated)
    /// and the server never reports any.
    #[test]
    fn the_server_connects_and_carries_data_but_never_reports_srtp_keys() {
        let plain = str0m::crypto::from_feature_flags();
        let ours = provider();
        let cert_c = plain.dtls_provider.generate_certificate().expect("a cert");
        let cert_s = ours.dtls_provider.generate_certificate().expect("a cert");
        let now = Instant::now();
        let v = DtlsVersion::Dtls12;
        let mut client = plain
            .dtls_provider
            .new_dtls(&cert_c, now, v, None)
            .expect("client dtls");
        let mut server = ours
            .dtls_provider
            .new_dtls(&cert_s, now, v, None)
            .expect("server dtls");
        client.set_active(true);
        server.set_active(false);
        let (mut c, mut s) = (Heard::default(), Heard::default());
        // Both start on their first timeout (the client sends its hello then).
        client.handle_timeout(now).expect("client start");
        server.handle_timeout(now).expect("server start");
        for _ in 0..20 {
            drain(client.as_mut(), &mut c);
            for p in c.packets.drain(..) {
                let _ = server.handle_packet(&p);
            }
            drain(server.as_mut(), &mut s);
            for p in s.packets.drain(..) {
                let _ = client.handle_packet(&p);
            }
            if c.connected && s.connected {
                break;
            }
        }
        assert!(c.connected && s.connected, "the handshake did not complete");
        assert!(
            c.keys,
            "the client got no SRTP keys: SRTP was not negotiated"
        );
        assert!(!s.keys, "the server reported SRTP keys");
        let n = client
            .send_application_data(b"hello")
            .expect("client sends");
        assert_eq!(n, 5);
        drain(client.as_mut(), &mut c);
        for p in c.packets.drain(..) {
            server.handle_packet(&p).expect("server reads");
        }
        drain(server.as_mut(), &mut s);
        assert_eq!(s.data, vec![b"hello".to_vec()]);
    }
}
