//! The offer/answer of a data-only ICE-lite endpoint (RFC 8829's rules, as much as a data
//! channel needs): from the browser's offer crier takes the ICE credentials, the certificate
//! fingerprints, the DTLS role and the data section; the answer accepts that section and
//! rejects every other (port 0), in the offer's order, as an answer must.

use std::fmt::Write as _;
use std::net::SocketAddr;

use aws_lc_rs::digest;

/// The largest message crier accepts from a client (it reads none it cares about).
pub(super) const LOCAL_MAX_MESSAGE_SIZE: u32 = 64 * 1024;
/// The peer's limit when the offer states none (RFC 8841 §6.1).
const DEFAULT_MAX_MESSAGE_SIZE: u32 = 64 * 1024;
/// The SCTP port crier answers with (and every browser uses).
pub(super) const SCTP_PORT: u16 = 5000;

/// What an offer says that a session needs.
#[derive(Debug)]
pub(super) struct Offer {
    pub(super) ice_ufrag: String,
    /// The certificate the peer's DTLS must present: any of these.
    pub(super) fingerprints: Vec<Fingerprint>,
    /// We are the DTLS client (the offer said `setup:passive`).
    pub(super) dtls_active: bool,
    /// The largest message the peer takes; 0 in the offer (no limit) is u32::MAX here.
    pub(super) max_message_size: u32,
    /// The peer's SCTP port (where crier's INIT goes when it is the DTLS client).
    pub(super) sctp_port: u16,
    /// Every media section, in order, for the answer.
    sections: Vec<Section>,
    /// Which of `sections` is the data channel's.
    data: usize,
    /// The data section's mid is in the offer's BUNDLE group.
    bundled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Fingerprint {
    pub(super) algorithm: &'static digest::Algorithm,
    pub(super) value: Vec<u8>,
}

impl Fingerprint {
    /// Whether `der` (a certificate) is the one this fingerprint names.
    pub(super) fn matches(&self, der: &[u8]) -> bool {
        digest::digest(self.algorithm, der).as_ref() == self.value.as_slice()
    }
}

#[derive(Debug)]
struct Section {
    /// The `m=` line's media, protocol and formats (for a rejected section's echo).
    media: String,
    proto: String,
    formats: String,
    mid: Option<String>,
}

/// Attributes that may sit at session level or in the data section (the section's win).
#[derive(Default)]
struct Level<'a> {
    ufrag: Option<&'a str>,
    pwd: Option<&'a str>,
    setup: Option<&'a str>,
    fingerprints: Vec<&'a str>,
    mid: Option<&'a str>,
    max_message_size: Option<&'a str>,
    sctp_port: Option<&'a str>,
}

impl<'a> Level<'a> {
    fn take(&mut self, attr: &'a str) {
        let (name, value) = attr.split_once(':').unwrap_or((attr, ""));
        let value = value.trim();
        match name {
            "ice-ufrag" => self.ufrag = Some(value),
            "ice-pwd" => self.pwd = Some(value),
            "setup" => self.setup = Some(value),
            "fingerprint" => self.fingerprints.push(value),
            "mid" => self.mid = Some(value),
            "max-message-size" => self.max_message_size = Some(value),
            "sctp-port" => self.sctp_port = Some(value),
            _ => {}
        }
    }
}

/// Parses an offer; the reason it cannot be answered is one line.
pub(super) fn parse_offer(text: &str) -> Result<Offer, String> {
    let bad = |why: &str| format!("malformed SDP offer: {why}");
    let mut lines = text.lines().map(str::trim_end).filter(|l| !l.is_empty());
    if lines.next() != Some("v=0") {
        return Err(bad("it does not start with v=0"));
    }
    let mut session = Level::default();
    let mut levels: Vec<Level> = Vec::new();
    let mut sections: Vec<Section> = Vec::new();
    let mut bundle: Vec<&str> = Vec::new();
    for line in lines {
        // Values are echoed into the answer (mids, protocols, formats): nothing there may
        // end a line or start another.
        if line.chars().any(char::is_control) {
            return Err(bad("a line has control characters"));
        }
        let Some((kind, value)) = line.split_once('=') else {
            return Err(bad(&format!("line {:?} is not <type>=<value>", clip(line))));
        };
        if kind.len() != 1 {
            return Err(bad(&format!("line {:?} is not <type>=<value>", clip(line))));
        }
        match kind {
            "m" => {
                let mut f = value.splitn(4, ' ');
                let (Some(media), Some(_port), Some(proto)) = (f.next(), f.next(), f.next()) else {
                    return Err(bad(&format!("m-line {:?} is incomplete", clip(line))));
                };
                sections.push(Section {
                    media: media.to_string(),
                    proto: proto.to_string(),
                    formats: f.next().unwrap_or("").to_string(),
                    mid: None,
                });
                levels.push(Level::default());
            }
            "a" => match levels.last_mut() {
                Some(l) => l.take(value),
                None => {
                    if let Some(g) = value.strip_prefix("group:BUNDLE") {
                        bundle.extend(g.split_whitespace());
                    }
                    session.take(value);
                }
            },
            _ => {}
        }
    }
    for (s, l) in sections.iter_mut().zip(&levels) {
        s.mid = l.mid.map(str::to_string);
    }
    let data = sections
        .iter()
        .position(|s| {
            s.media == "application"
                && s.proto.ends_with("DTLS/SCTP")
                && s.formats == "webrtc-datachannel"
        })
        .ok_or("the offer has no data channel section (m=application ... webrtc-datachannel)")?;
    // JSEP (RFC 8829 §5.2.1): every section has a mid, and the answer echoes each.
    if let Some(i) = sections
        .iter()
        .position(|s| s.mid.as_deref().is_none_or(str::is_empty))
    {
        return Err(bad(&format!("media section {} has no a=mid", i + 1)));
    }
    let l = &levels[data];
    let ufrag = l
        .ufrag
        .or(session.ufrag)
        .ok_or_else(|| bad("no a=ice-ufrag"))?;
    if !(4..=256).contains(&ufrag.len()) || !ufrag.bytes().all(ice_char) {
        return Err(bad("a=ice-ufrag is not 4-256 ice-chars"));
    }
    let pwd = l.pwd.or(session.pwd).ok_or_else(|| bad("no a=ice-pwd"))?;
    if !(22..=256).contains(&pwd.len()) || !pwd.bytes().all(ice_char) {
        return Err(bad("a=ice-pwd is not 22-256 ice-chars"));
    }
    let fps = if l.fingerprints.is_empty() {
        &session.fingerprints
    } else {
        &l.fingerprints
    };
    let fingerprints: Vec<Fingerprint> = fps.iter().filter_map(|f| fingerprint(f)).collect();
    if fingerprints.is_empty() {
        return Err(bad("no a=fingerprint with sha-256, sha-384 or sha-512"));
    }
    let dtls_active = match l.setup.or(session.setup) {
        // RFC 8842: an offer says actpass; crier then waits for the client's hello.
        Some("actpass") | Some("active") | None => false,
        Some("passive") => true,
        Some(other) => return Err(bad(&format!("a=setup:{} is not a DTLS role", clip(other)))),
    };
    let max_message_size = match l.max_message_size {
        None => DEFAULT_MAX_MESSAGE_SIZE,
        Some(v) => match v.parse::<u64>() {
            Ok(0) => u32::MAX,
            Ok(n) => u32::try_from(n).unwrap_or(u32::MAX),
            Err(_) => return Err(bad("a=max-message-size is not a number")),
        },
    };
    let sctp_port = match l.sctp_port {
        None => SCTP_PORT,
        Some(v) => match v.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(bad("a=sctp-port is not a port")),
        },
    };
    let bundled = sections[data]
        .mid
        .as_deref()
        .is_some_and(|m| bundle.contains(&m));
    Ok(Offer {
        ice_ufrag: ufrag.to_string(),
        fingerprints,
        dtls_active,
        max_message_size,
        sctp_port,
        sections,
        data,
        bundled,
    })
}

/// `<algorithm> <hex:hex:...>`, for the algorithms crier can check.
fn fingerprint(f: &str) -> Option<Fingerprint> {
    let (alg, hex) = f.split_once(' ')?;
    let algorithm = match alg.to_ascii_lowercase().as_str() {
        "sha-256" => &digest::SHA256,
        "sha-384" => &digest::SHA384,
        "sha-512" => &digest::SHA512,
        _ => return None,
    };
    let value = hex
        .trim()
        .split(':')
        .map(|b| match b.len() {
            2 => u8::from_str_radix(b, 16).ok(),
            _ => None,
        })
        .collect::<Option<Vec<u8>>>()?;
    (value.len() == algorithm.output_len()).then_some(Fingerprint { algorithm, value })
}

/// RFC 8839's ice-char: ALPHA / DIGIT / "+" / "/".
fn ice_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
}

/// A line's first 40 characters, for an error message.
fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

/// What crier puts in an answer of its own.
pub(super) struct Local<'a> {
    pub(super) ufrag: &'a str,
    pub(super) pwd: &'a str,
    /// SHA-256 of the certificate, `AB:CD:...`.
    pub(super) fingerprint: &'a str,
    pub(super) candidates: &'a [SocketAddr],
}

/// The answer to `offer`: ICE lite, the data section accepted, every other rejected.
pub(super) fn answer(offer: &Offer, local: &Local, session_id: u64) -> String {
    let mut a = String::with_capacity(640);
    // Writing to a String cannot fail.
    let _ = write!(
        a,
        "v=0\r\no=crier {session_id} 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=ice-lite\r\n"
    );
    let data = &offer.sections[offer.data];
    if offer.bundled {
        if let Some(mid) = &data.mid {
            let _ = write!(a, "a=group:BUNDLE {mid}\r\n");
        }
    }
    for (i, s) in offer.sections.iter().enumerate() {
        if i != offer.data {
            let _ = write!(
                a,
                "m={} 0 {} {}\r\nc=IN IP4 0.0.0.0\r\n",
                s.media, s.proto, s.formats
            );
            if let Some(mid) = &s.mid {
                let _ = write!(a, "a=mid:{mid}\r\n");
            }
            a.push_str("a=inactive\r\n");
            continue;
        }
        let _ = write!(
            a,
            "m=application 9 {} webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\n",
            s.proto
        );
        if let Some(mid) = &s.mid {
            let _ = write!(a, "a=mid:{mid}\r\n");
        }
        let setup = if offer.dtls_active {
            "active"
        } else {
            "passive"
        };
        let _ = write!(
            a,
            "a=ice-ufrag:{}\r\na=ice-pwd:{}\r\na=fingerprint:sha-256 {}\r\na=setup:{setup}\r\n\
             a=sctp-port:{SCTP_PORT}\r\na=max-message-size:{LOCAL_MAX_MESSAGE_SIZE}\r\n",
            local.ufrag, local.pwd, local.fingerprint
        );
        for (n, c) in local.candidates.iter().enumerate() {
            // RFC 8445 §5.1.2.1: host type preference 126, local preference falling with the
            // order given, component 1.
            let priority = (126u32 << 24) | ((65535 - n as u32) << 8) | 255;
            let _ = write!(
                a,
                "a=candidate:{} 1 udp {priority} {} {} typ host\r\n",
                n + 1,
                c.ip(),
                c.port()
            );
        }
        a.push_str("a=end-of-candidates\r\n");
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF";

    fn chrome_like() -> String {
        format!(
            "v=0\r\no=- 46117 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n\
             a=extmap-allow-mixed\r\na=msid-semantic: WMS\r\n\
             m=audio 9 UDP/TLS/RTP/SAVPF 111 63\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\n\
             a=ice-ufrag:aud1\r\na=ice-pwd:audiopasswordaudiopasswd\r\na=rtpmap:111 opus/48000/2\r\n\
             m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\n\
             a=ice-ufrag:Ab+/\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=ice-options:trickle\r\n\
             a=fingerprint:sha-1 00:11\r\na=fingerprint:sha-256 {FP}\r\na=setup:actpass\r\n\
             a=mid:1\r\na=sctp-port:5000\r\na=max-message-size:262144\r\n"
        )
    }

    fn local() -> Local<'static> {
        Local {
            ufrag: "srvU",
            pwd: "serverpasswordserverpas",
            fingerprint: "AA:BB",
            candidates: &[],
        }
    }

    #[test]
    fn takes_the_data_sections_credentials_role_and_fingerprints() {
        let o = parse_offer(&chrome_like()).expect("answerable");
        assert_eq!(o.ice_ufrag, "Ab+/");
        assert!(!o.dtls_active);
        assert_eq!(o.max_message_size, 262_144);
        assert_eq!(o.fingerprints.len(), 1, "sha-1 is not checkable");
        assert_eq!(o.fingerprints[0].value.len(), 32);
        assert_eq!(o.data, 1);
        assert!(o.bundled);
        let passive = chrome_like().replace("setup:actpass", "setup:passive");
        assert!(parse_offer(&passive).expect("answerable").dtls_active);
        let unlimited = chrome_like().replace("max-message-size:262144", "max-message-size:0");
        assert_eq!(
            parse_offer(&unlimited).expect("ok").max_message_size,
            u32::MAX
        );
        assert_eq!(o.sctp_port, 5000);
        let port = chrome_like().replace("sctp-port:5000", "sctp-port:5001");
        assert_eq!(parse_offer(&port).expect("ok").sctp_port, 5001);
        let bad = chrome_like().replace("sctp-port:5000", "sctp-port:0");
        assert!(parse_offer(&bad).expect_err("port 0").contains("sctp-port"));
    }

    #[test]
    fn answers_in_the_offers_order_rejecting_what_is_not_data() {
        let o = parse_offer(&chrome_like()).expect("answerable");
        let cands = [
            "192.0.2.1:3478".parse().expect("a"),
            "[2001:db8::1]:9".parse().expect("a"),
        ];
        let l = Local {
            candidates: &cands,
            ..local()
        };
        let a = answer(&o, &l, 7);
        let m: Vec<&str> = a.lines().filter(|l| l.starts_with("m=")).collect();
        assert_eq!(
            m,
            [
                "m=audio 0 UDP/TLS/RTP/SAVPF 111 63",
                "m=application 9 UDP/DTLS/SCTP webrtc-datachannel"
            ]
        );
        for want in [
            "a=ice-lite",
            "a=group:BUNDLE 1",
            "a=mid:0",
            "a=mid:1",
            "a=ice-ufrag:srvU",
            "a=setup:passive",
            "a=fingerprint:sha-256 AA:BB",
            "a=sctp-port:5000",
            "a=candidate:1 1 udp 2130706431 192.0.2.1 3478 typ host",
            "a=candidate:2 1 udp 2130706175 2001:db8::1 9 typ host",
            "a=end-of-candidates",
        ] {
            assert!(a.lines().any(|l| l == want), "{want} missing from\n{a}");
        }
        assert!(a.ends_with("\r\n") && !a.contains("\n\n"));
    }

    #[test]
    fn refuses_what_cannot_be_answered_with_one_line() {
        let cases = [
            ("hello", "does not start with v=0"),
            (
                "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:d\r\n",
                "no a=ice-ufrag",
            ),
            (
                "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n",
                "has no a=mid",
            ),
            (
                "v=0\r\nm=audio 9 RTP/AVP 0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:d\r\n",
                "has no a=mid",
            ),
            ("v=0\r\nnonsense\r\n", "is not <type>=<value>"),
            ("v=0\r\nm=audio\r\n", "incomplete"),
            ("v=0\r\na=mid:0\rm=audio 9 x y\r\n", "control characters"),
        ];
        for (offer, want) in cases {
            let e = parse_offer(offer).expect_err(offer);
            assert!(e.contains(want) && !e.contains('\n'), "{offer:?}: {e}");
        }
        let o = chrome_like();
        let e = parse_offer(&o.replace("webrtc-datachannel", "bfcp")).expect_err("no data");
        assert!(e.contains("no data channel section"), "{e}");
        let e = parse_offer(&o.replace(&format!("sha-256 {FP}"), "sha-256 00:11")).expect_err("x");
        assert!(e.contains("no a=fingerprint"), "{e}");
        let e = parse_offer(&o.replace("setup:actpass", "setup:holdconn")).expect_err("x");
        assert!(e.contains("not a DTLS role"), "{e}");
        let e = parse_offer(&o.replace("Ab+/", "A b")).expect_err("x");
        assert!(e.contains("ice-ufrag"), "{e}");
    }

    #[test]
    fn a_fingerprint_matches_its_certificate_only() {
        let der = b"not really a certificate";
        let hex: Vec<String> = digest::digest(&digest::SHA384, der)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let f = fingerprint(&format!("SHA-384 {}", hex.join(":"))).expect("parses");
        assert!(f.matches(der));
        assert!(!f.matches(b"another"));
        assert!(fingerprint("sha-256 zz").is_none());
        assert!(fingerprint("md5 00:11").is_none());
    }
}
