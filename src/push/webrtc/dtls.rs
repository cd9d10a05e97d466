//! The crypto provider of crier's sessions: str0m's own (aws-lc-rs), with a DTLS that keeps
//! the SRTP keys to itself.
//!
//! A browser always offers DTLS-SRTP, so at the end of every handshake the DTLS layer hands
//! str0m the SRTP keying material, and str0m builds two SRTP contexts from it (four AES-GCM
//! keys and two receive buffers: about 9 KB per session). crier's sessions carry data channels
//! only — no codec is ever negotiated, so no RTP packet is ever sent or accepted — and those
//! contexts would sit unused for the session's whole life. Without them str0m drops any
//! SRTP packet a peer sends, which is what a data-only session should do anyway.

use std::time::Instant;

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

/// `inner` made data-only; one per process (str0m wants a `&'static`).
fn data_only(inner: &'static dyn DtlsProvider) -> &'static dyn DtlsProvider {
    static DATA_ONLY: std::sync::OnceLock<DataOnly> = std::sync::OnceLock::new();
    DATA_ONLY.get_or_init(|| DataOnly(inner))
}

#[derive(Debug)]
struct DataOnly(&'static dyn DtlsProvider);

impl DtlsProvider for DataOnly {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        self.0.generate_certificate()
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        dtls_version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let inner = self.0.new_dtls(cert, now, dtls_version, mtu)?;
        Ok(Box::new(NoSrtp(inner)))
    }

    fn is_test(&self) -> bool {
        self.0.is_test()
    }
}

/// A DTLS instance that never reports SRTP keying material.
#[derive(Debug)]
struct NoSrtp(Box<dyn DtlsInstance>);

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
