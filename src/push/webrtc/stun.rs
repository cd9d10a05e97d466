//! The STUN of an ICE-lite agent (RFC 8445 §2.5, RFC 8489): crier never sends checks, it
//! answers the browser's binding requests. A request is answered only when its USERNAME is
//! `<our ufrag>:<the offer's ufrag>` and its MESSAGE-INTEGRITY is keyed with our password, so
//! a success response (and the address it teaches the session) proves the peer read the
//! answer. Everything else is dropped without a reply: no error responses to reflect.

use std::net::{IpAddr, SocketAddr};

use aws_lc_rs::hmac;

const MAGIC: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const HEADER: usize = 20;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const USERNAME: u16 = 0x0006;
const MESSAGE_INTEGRITY: u16 = 0x0008;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
const USE_CANDIDATE: u16 = 0x0025;
const FINGERPRINT: u16 = 0x8028;
/// XORed into the CRC-32 of FINGERPRINT ("STUN").
const FINGERPRINT_XOR: u32 = 0x5354_554e;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
/// The largest response: header, XOR-MAPPED-ADDRESS (IPv6), MESSAGE-INTEGRITY, FINGERPRINT.
pub(super) const MAX_RESPONSE: usize = HEADER + 24 + 24 + 8;

/// Whether a datagram is STUN by its first byte (RFC 7983's demultiplexing: 0-3 STUN, 20-63
/// DTLS).
pub(super) fn is_stun(d: &[u8]) -> bool {
    d.first().is_some_and(|b| *b < 4)
}

/// The receiver's username fragment of a STUN message: the part of USERNAME before ':' — in
/// a binding request to crier, crier's own ufrag, which names the session. None for anything
/// that is not a well-formed STUN message with a USERNAME.
pub(super) fn local_ufrag(d: &[u8]) -> Option<&str> {
    let name = attributes(d)?.find(|(kind, _, _)| *kind == USERNAME)?.1;
    let name = std::str::from_utf8(name).ok()?;
    name.split(':').next().filter(|u| !u.is_empty())
}

/// A binding request that passed the checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Check {
    /// USE-CANDIDATE: the controlling agent chose this path.
    pub(super) nominated: bool,
}

/// The ICE credentials a session answers checks with.
pub(super) struct Credentials {
    /// `<our ufrag>:<their ufrag>`, what a request's USERNAME must be.
    username: Box<str>,
    /// Our password, the HMAC key (short-term credentials). Kept as the 24 bytes it is: a
    /// ready HMAC key is 1.2 KB, in every idle session, for a check every few seconds.
    pwd: Box<str>,
}

impl Credentials {
    pub(super) fn new(local_ufrag: &str, remote_ufrag: &str, local_pwd: &str) -> Credentials {
        Credentials {
            username: format!("{local_ufrag}:{remote_ufrag}").into(),
            pwd: local_pwd.into(),
        }
    }

    fn key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, self.pwd.as_bytes())
    }
}

/// Checks `req` as a binding request for `creds` and writes the success response (with the
/// request's `source` as XOR-MAPPED-ADDRESS) into `out`. None, and `out` untouched, for
/// anything else: not a binding request, another username, a bad MESSAGE-INTEGRITY or
/// FINGERPRINT.
pub(super) fn answer(
    req: &[u8],
    creds: &Credentials,
    source: SocketAddr,
    out: &mut [u8; MAX_RESPONSE],
) -> Option<(Check, usize)> {
    if u16::from_be_bytes([*req.first()?, *req.get(1)?]) != BINDING_REQUEST {
        return None;
    }
    let mut username = None;
    let mut integrity = None;
    let mut nominated = false;
    for (kind, value, at) in attributes(req)? {
        match kind {
            // After MESSAGE-INTEGRITY only FINGERPRINT counts (RFC 8489 §14.5).
            FINGERPRINT => {
                // It must be last and cover everything before it.
                if at + 8 != req.len() || value.len() != 4 {
                    return None;
                }
                let want = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
                if CRC.checksum(&req[..at]) ^ FINGERPRINT_XOR != want {
                    return None;
                }
            }
            _ if integrity.is_some() => {}
            USERNAME => username = Some(value),
            USE_CANDIDATE => nominated = true,
            MESSAGE_INTEGRITY if value.len() == 20 => integrity = Some((at, value)),
            _ => {}
        }
    }
    if username? != creds.username.as_bytes() {
        return None;
    }
    let (at, tag) = integrity?;
    // The HMAC covers the message up to the attribute, with the header's length as if the
    // message ended right after it.
    let key = creds.key();
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(&req[..2]);
    ctx.update(&((at + 24 - HEADER) as u16).to_be_bytes());
    ctx.update(&req[4..at]);
    // In constant time: the tag is what an off-path sender would have to guess.
    aws_lc_rs::constant_time::verify_slices_are_equal(ctx.sign().as_ref(), tag).ok()?;
    let n = write_success(&req[8..HEADER], &key, source, out);
    Some((Check { nominated }, n))
}

/// A binding success response for transaction `tid`, into `out`; its length.
fn write_success(
    tid: &[u8],
    key: &hmac::Key,
    source: SocketAddr,
    out: &mut [u8; MAX_RESPONSE],
) -> usize {
    out[..2].copy_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC);
    out[8..HEADER].copy_from_slice(tid);
    let mut n = HEADER;
    // XOR-MAPPED-ADDRESS: the port XORed with the cookie's top half, the address with the
    // cookie (and, for IPv6, the transaction id).
    let port = source.port() ^ 0x2112;
    let (family, len): (u8, u16) = match source.ip() {
        IpAddr::V4(_) => (1, 8),
        IpAddr::V6(_) => (2, 20),
    };
    out[n..n + 2].copy_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    out[n + 2..n + 4].copy_from_slice(&len.to_be_bytes());
    out[n + 4] = 0;
    out[n + 5] = family;
    out[n + 6..n + 8].copy_from_slice(&port.to_be_bytes());
    n += 8;
    match source.ip() {
        IpAddr::V4(ip) => {
            for (i, b) in ip.octets().iter().enumerate() {
                out[n + i] = b ^ MAGIC[i];
            }
            n += 4;
        }
        IpAddr::V6(ip) => {
            let mask = MAGIC.iter().chain(tid);
            for (i, (b, m)) in ip.octets().iter().zip(mask).enumerate() {
                out[n + i] = b ^ m;
            }
            n += 16;
        }
    }
    // MESSAGE-INTEGRITY over what is there, the length counting it.
    set_len(out, n + 24);
    let tag = hmac::sign(key, &out[..n]);
    out[n..n + 4].copy_from_slice(&[0x00, 0x08, 0x00, 0x14]);
    out[n + 4..n + 24].copy_from_slice(tag.as_ref());
    n += 24;
    // FINGERPRINT over everything before it, the length counting it.
    set_len(out, n + 8);
    let crc = CRC.checksum(&out[..n]) ^ FINGERPRINT_XOR;
    out[n..n + 4].copy_from_slice(&[0x80, 0x28, 0x00, 0x04]);
    out[n + 4..n + 8].copy_from_slice(&crc.to_be_bytes());
    n + 8
}

fn set_len(out: &mut [u8], total: usize) {
    out[2..4].copy_from_slice(&((total - HEADER) as u16).to_be_bytes());
}

/// The attributes of a well-formed STUN message: (type, value, offset of the attribute in
/// the message). None when the header is not STUN's or the length is not the datagram's.
fn attributes(d: &[u8]) -> Option<impl Iterator<Item = (u16, &[u8], usize)>> {
    if d.len() < HEADER || d[0] & 0xC0 != 0 || d[4..8] != MAGIC {
        return None;
    }
    let len = u16::from_be_bytes([d[2], d[3]]) as usize;
    if len % 4 != 0 || HEADER + len != d.len() {
        return None;
    }
    let mut at = HEADER;
    Some(std::iter::from_fn(move || {
        let head = d.get(at..at + 4)?;
        let kind = u16::from_be_bytes([head[0], head[1]]);
        let n = u16::from_be_bytes([head[2], head[3]]) as usize;
        let value = d.get(at + 4..at + 4 + n)?;
        let here = at;
        // Values are padded to 4 bytes.
        at += 4 + n.div_ceil(4) * 4;
        Some((kind, value, here))
    }))
}

#[cfg(any(test, feature = "fuzzing"))]
/// A request as an ICE agent makes it (RFC 8489's layout, built here by hand).
pub(super) fn request(attrs: &[(u16, &[u8])], key: Option<&str>, fingerprint: bool) -> Vec<u8> {
    let mut m = vec![0x00, 0x01, 0, 0];
    m.extend_from_slice(&MAGIC);
    m.extend_from_slice(&[7; 12]);
    for (kind, v) in attrs {
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&(v.len() as u16).to_be_bytes());
        m.extend_from_slice(v);
        m.resize(m.len().div_ceil(4) * 4, 0);
    }
    if let Some(pwd) = key {
        let n = m.len();
        set_len(&mut m, n + 24);
        let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, pwd.as_bytes());
        let tag = hmac::sign(&key, &m);
        m.extend_from_slice(&[0x00, 0x08, 0x00, 0x14]);
        m.extend_from_slice(tag.as_ref());
    }
    let n = m.len();
    set_len(&mut m, n);
    if fingerprint {
        set_len(&mut m, n + 8);
        let crc = CRC.checksum(&m) ^ FINGERPRINT_XOR;
        m.extend_from_slice(&[0x80, 0x28, 0x00, 0x04]);
        m.extend_from_slice(&crc.to_be_bytes());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials::new("srv1", "cli1", "0123456789abcdefghijkl")
    }

    #[test]
    fn finds_our_ufrag() {
        let m = request(
            &[(0x0024, b"\0\0\0\x01"), (USERNAME, b"srv1:cli")],
            None,
            false,
        );
        assert_eq!(local_ufrag(&m), Some("srv1"));
        // Padding: a 3-byte attribute before USERNAME.
        let m = request(&[(0x8022, b"abc"), (USERNAME, b"s:c")], None, true);
        assert_eq!(local_ufrag(&m), Some("s"));
    }

    #[test]
    fn what_is_not_stun_with_a_username_has_no_ufrag() {
        assert_eq!(local_ufrag(b""), None);
        assert_eq!(local_ufrag(&[0x16; 40]), None, "DTLS record");
        assert_eq!(
            local_ufrag(&request(&[(0x0024, b"1234")], None, false)),
            None
        );
        let mut m = request(&[(USERNAME, b"srv:cli")], None, false);
        m.truncate(m.len() - 4);
        assert_eq!(local_ufrag(&m), None, "truncated");
        let mut m = request(&[(USERNAME, b"srv:cli")], None, false);
        m[3] = 200; // length past the end
        assert_eq!(local_ufrag(&m), None);
        assert_eq!(
            local_ufrag(&request(&[(USERNAME, b":cli")], None, false)),
            None
        );
    }

    /// Reads a response back as a client would: its type, transaction, mapped address, and
    /// that its integrity and fingerprint verify.
    fn read_response(r: &[u8], pwd: &str) -> SocketAddr {
        assert_eq!(&r[..2], &BINDING_SUCCESS.to_be_bytes());
        assert_eq!(&r[8..20], &[7; 12], "the request's transaction");
        let attrs: Vec<_> = attributes(r).expect("well-formed").collect();
        let kinds: Vec<u16> = attrs.iter().map(|a| a.0).collect();
        assert_eq!(kinds, [XOR_MAPPED_ADDRESS, MESSAGE_INTEGRITY, FINGERPRINT]);
        let (_, tag, at) = attrs[1];
        let mut copy = r[..at].to_vec();
        set_len(&mut copy, at + 24);
        let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, pwd.as_bytes());
        hmac::verify(&key, &copy, tag).expect("MESSAGE-INTEGRITY verifies");
        let (_, fp, at) = attrs[2];
        assert_eq!(
            CRC.checksum(&r[..at]) ^ FINGERPRINT_XOR,
            u32::from_be_bytes([fp[0], fp[1], fp[2], fp[3]])
        );
        let a = attrs[0].1;
        let port = u16::from_be_bytes([a[2], a[3]]) ^ 0x2112;
        let ip: IpAddr = match a[1] {
            1 => {
                let o: Vec<u8> = a[4..8].iter().zip(MAGIC).map(|(b, m)| b ^ m).collect();
                IpAddr::from([o[0], o[1], o[2], o[3]])
            }
            _ => {
                let mask: Vec<u8> = MAGIC.iter().chain(&[7u8; 12]).copied().collect();
                let mut o = [0u8; 16];
                for i in 0..16 {
                    o[i] = a[4 + i] ^ mask[i];
                }
                IpAddr::from(o)
            }
        };
        SocketAddr::new(ip, port)
    }

    #[test]
    fn answers_a_valid_check_with_the_mapped_address_signed() {
        let c = creds();
        let pwd = "0123456789abcdefghijkl";
        for source in ["192.0.2.7:50123", "[2001:db8::5]:4444"] {
            let source: SocketAddr = source.parse().expect("addr");
            for fp in [true, false] {
                let req = request(
                    &[(USERNAME, b"srv1:cli1"), (0x8029, &[1; 8])],
                    Some(pwd),
                    fp,
                );
                let mut out = [0u8; MAX_RESPONSE];
                let (check, n) = answer(&req, &c, source, &mut out).expect("answered");
                assert!(!check.nominated);
                assert_eq!(read_response(&out[..n], pwd), source);
            }
        }
        let req = request(
            &[(USERNAME, b"srv1:cli1"), (USE_CANDIDATE, b"")],
            Some(pwd),
            true,
        );
        let mut out = [0u8; MAX_RESPONSE];
        let (check, _) =
            answer(&req, &c, "127.0.0.1:1".parse().expect("addr"), &mut out).expect("answered");
        assert!(check.nominated);
    }

    #[test]
    fn refuses_checks_that_are_not_for_us() {
        let c = creds();
        let pwd = "0123456789abcdefghijkl";
        let src: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let mut out = [0u8; MAX_RESPONSE];
        let mut refused = |req: Vec<u8>, why: &str| {
            assert!(answer(&req, &c, src, &mut out).is_none(), "{why}");
        };
        refused(
            request(&[(USERNAME, b"srv1:cli1")], Some("wrong password"), true),
            "bad key",
        );
        refused(
            request(&[(USERNAME, b"srv1:cli1")], None, true),
            "no integrity",
        );
        refused(
            request(&[(USERNAME, b"srv1:other")], Some(pwd), true),
            "another peer",
        );
        refused(
            request(&[(USERNAME, b"srv2:cli1")], Some(pwd), true),
            "another session",
        );
        refused(request(&[], Some(pwd), true), "no username");
        let mut bad_fp = request(&[(USERNAME, b"srv1:cli1")], Some(pwd), true);
        let last = bad_fp.len() - 1;
        bad_fp[last] ^= 1;
        refused(bad_fp, "bad fingerprint");
        let mut flipped = request(&[(USERNAME, b"srv1:cli1")], Some(pwd), false);
        flipped[10] ^= 1;
        refused(flipped, "changed after signing");
        let mut indication = request(&[(USERNAME, b"srv1:cli1")], Some(pwd), false);
        indication[1] = 0x11;
        refused(indication, "an indication");
        refused(vec![0x00, 0x01], "short");
        refused(Vec::new(), "empty");
    }
}
