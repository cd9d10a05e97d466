//! The message bodies every workload publishes, and how a client reads them back.
//!
//! A body is `<seq> <send-unix-nanos> <channel-index> ` padded with `x` to the size asked for:
//! `seq` counts per channel from 0 (so a client can tell loss, duplicates and order per channel),
//! the send time gives publish→delivery latency on one machine's clock, and the channel index
//! tells which channel a message came from even where the server does not say (Nchan's
//! multiplexed subscriber). A multiplexed crier stream wraps each body in a crier.json envelope
//! `{"channel","id","data"}`; [`unwrap`] takes the body and channel name out of it.

use crate::subscriber::now_ns;

pub fn body(seq: u64, channel: usize, size: usize) -> String {
    body_at(seq, channel, size, now_ns())
}

/// A body stamped with a send time the caller took (and recorded).
pub fn body_at(seq: u64, channel: usize, size: usize, sent_ns: u64) -> String {
    let mut b = format!("{seq} {sent_ns} {channel} ");
    if b.len() < size {
        b.extend(std::iter::repeat_n('x', size - b.len()));
    }
    b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    pub seq: u64,
    pub sent_ns: u64,
    /// The channel index, when the body carries one.
    pub channel: Option<u32>,
}

fn parse_u64(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    b.iter().try_fold(0u64, |n, &c| {
        c.is_ascii_digit()
            .then(|| n.wrapping_mul(10).wrapping_add(u64::from(c - b'0')))
    })
}

/// `<seq> <send-unix-nanos> [<channel-index> ]...`
pub fn parse(p: &[u8]) -> Option<Payload> {
    let mut it = p.splitn(4, |&b| b == b' ');
    let seq = parse_u64(it.next()?)?;
    let sent_ns = parse_u64(it.next()?)?;
    let channel = it
        .next()
        .and_then(parse_u64)
        .and_then(|c| u32::try_from(c).ok());
    Some(Payload {
        seq,
        sent_ns,
        channel,
    })
}

#[derive(serde::Deserialize)]
struct Envelope {
    channel: Option<String>,
    data: Option<String>,
}

/// A crier.json envelope → (channel name, body). Bodies of this benchmark start with a digit,
/// so anything starting with `{` is an envelope; `None` when it does not parse.
pub fn unwrap(p: &[u8]) -> Option<(Option<String>, Vec<u8>)> {
    let e: Envelope = serde_json::from_slice(p).ok()?;
    Some((e.channel, e.data?.into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let b = body(7, 42, 100);
        assert_eq!(b.len(), 100);
        let p = parse(b.as_bytes()).unwrap();
        assert_eq!((p.seq, p.channel), (7, Some(42)));
        // Bodies of older runs carry no channel.
        assert_eq!(parse(b"7 123 xx").unwrap().channel, None);
        assert_eq!(parse(b"7"), None);
        let env = br#"{"channel":"c3","id":"1-0","data":"5 9 3 xx"}"#;
        let (ch, data) = unwrap(env).unwrap();
        assert_eq!(ch.as_deref(), Some("c3"));
        assert_eq!(parse(&data).unwrap().channel, Some(3));
    }
}
