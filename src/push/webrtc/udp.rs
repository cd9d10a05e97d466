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
    let Some(ufrag) = super::stun::local_ufrag(data) else {
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
