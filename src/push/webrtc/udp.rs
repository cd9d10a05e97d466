//! The one task that owns the UDP socket: it reads every datagram and hands it to its
//! session's queue. A STUN request names its session by our ICE username fragment (the
//! first half of USERNAME); the peer address it came from is then remembered, so the DTLS and
//! SCTP datagrams that follow (no username) find the same session. Anything else — garbage,
//! a session that is gone, a stranger — is dropped here without touching any session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::{Datagram, Queue, Shared, MAX_ADDRS_PER_SESSION};

/// Larger than any datagram a WebRTC peer sends (its path MTU); a longer one is truncated
/// by the kernel and then fails to parse in the session, like any corrupt datagram.
const RECV_BUFFER: usize = 2048;

pub(super) async fn run(sh: Arc<Shared>) {
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let r = tokio::select! {
            _ = sh.stop.cancelled() => return,
            r = sh.socket.recv_from(&mut buf) => r,
        };
        match r {
            Ok((n, source)) => route(&sh, &buf[..n], source),
            // ICMP errors of earlier sends (port unreachable) surface here on Linux; they
            // say nothing about the datagrams still to come.
            Err(e) => tracing::debug!("webrtc: recv: {e}"),
        }
    }
}

fn route(sh: &Shared, data: &[u8], source: SocketAddr) {
    let Some(tx) = find(sh, data, source) else {
        return;
    };
    let d = Box::new(Datagram {
        at: Instant::now(),
        source,
        data: data.to_vec(),
    });
    // The session is behind on its input: drop, as the network would.
    if tx.push(d).is_err() {
        tracing::debug!("webrtc: session queue full; dropped");
    }
}

/// The session a datagram is for: by ufrag (STUN), else by the peer address.
fn find(sh: &Shared, data: &[u8], source: SocketAddr) -> Option<Queue> {
    let mut reg = sh.registry.lock();
    let Some(ufrag) = stun_local_ufrag(data) else {
        return reg.by_addr.get(&source).map(|(_, tx)| tx.clone());
    };
    let (id, tx) = reg.by_ufrag.get(ufrag).cloned()?;
    // Remember where this session's peer is (a few addresses at most). The ufrag is only ever
    // sent in the answer, so a stranger cannot claim a session's address; an address that a
    // dead session still holds (a port the client reused) goes to the session that asks now.
    let known = reg.by_addr.get(&source).is_some_and(|(u, _)| u == ufrag);
    if !known {
        let entry = reg.by_id.get_mut(&id);
        if let Some(e) = entry.filter(|e| e.addrs.len() < MAX_ADDRS_PER_SESSION) {
            e.addrs.push(source);
            reg.by_addr.insert(source, (ufrag.to_string(), tx.clone()));
        }
    }
    Some(tx)
}

/// The receiver's username fragment of a STUN message (RFC 8489): the part of USERNAME
/// before ':' — in a binding request to crier, crier's own ufrag. None for anything that is
/// not a well-formed STUN message with a USERNAME.
fn stun_local_ufrag(d: &[u8]) -> Option<&str> {
    const MAGIC: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
    const USERNAME: u16 = 0x0006;
    if d.len() < 20 || d[0] & 0xC0 != 0 || d[4..8] != MAGIC {
        return None;
    }
    let len = u16::from_be_bytes([d[2], d[3]]) as usize;
    let attrs = d.get(20..20 + len)?;
    let mut i = 0;
    while i + 4 <= attrs.len() {
        let kind = u16::from_be_bytes([attrs[i], attrs[i + 1]]);
        let n = u16::from_be_bytes([attrs[i + 2], attrs[i + 3]]) as usize;
        let value = attrs.get(i + 4..i + 4 + n)?;
        if kind == USERNAME {
            let name = std::str::from_utf8(value).ok()?;
            return name.split(':').next().filter(|u| !u.is_empty());
        }
        // Attributes are padded to 4 bytes.
        i += 4 + n.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stun(attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (kind, v) in attrs {
            body.extend_from_slice(&kind.to_be_bytes());
            body.extend_from_slice(&(v.len() as u16).to_be_bytes());
            body.extend_from_slice(v);
            body.resize(body.len().div_ceil(4) * 4, 0);
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(body.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
        m.extend_from_slice(&[7; 12]);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn finds_our_ufrag() {
        let m = stun(&[(0x0024, b"\0\0\0\x01"), (0x0006, b"srv1:cli")]);
        assert_eq!(stun_local_ufrag(&m), Some("srv1"));
        // Padding: a 3-byte attribute before USERNAME.
        let m = stun(&[(0x8022, b"abc"), (0x0006, b"s:c")]);
        assert_eq!(stun_local_ufrag(&m), Some("s"));
    }

    #[test]
    fn rejects_what_is_not_stun_with_a_username() {
        assert_eq!(stun_local_ufrag(b""), None);
        assert_eq!(stun_local_ufrag(&[0x16; 40]), None, "DTLS record");
        assert_eq!(stun_local_ufrag(&stun(&[(0x0024, b"1234")])), None);
        let mut m = stun(&[(0x0006, b"srv:cli")]);
        m.truncate(m.len() - 3);
        assert_eq!(stun_local_ufrag(&m), None, "truncated");
        let mut m = stun(&[(0x0006, b"srv:cli")]);
        m[3] = 200; // length past the end
        assert_eq!(stun_local_ufrag(&m), None);
        assert_eq!(stun_local_ufrag(&stun(&[(0x0006, b":cli")])), None);
    }
}
