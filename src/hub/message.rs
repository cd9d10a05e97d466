//! A published message and its id.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Instant;

use bytes::Bytes;
use http::HeaderValue;

/// `<unix-millis>-<seq>`, strictly increasing within a channel (the shape of a Redis stream id,
/// so a Redis-backed hub can later share ids across nodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MessageId {
    pub ms: u64,
    pub seq: u64,
}

impl MessageId {
    /// Sorts before every real id: "from the start of the buffer".
    pub const ZERO: MessageId = MessageId { ms: 0, seq: 0 };

    /// The id that follows `last` at wall-clock time `now_ms`.
    pub fn next_after(last: Option<MessageId>, now_ms: u64) -> MessageId {
        match last {
            Some(l) if now_ms <= l.ms => MessageId {
                ms: l.ms,
                seq: l.seq + 1,
            },
            _ => MessageId { ms: now_ms, seq: 0 },
        }
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed message id {0:?} (expected <unix-millis>-<seq>, e.g. 1732400000123-0)")]
pub struct BadMessageId(pub String);

impl FromStr for MessageId {
    type Err = BadMessageId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadMessageId(s.chars().take(64).collect());
        let (ms, seq) = s.split_once('-').ok_or_else(bad)?;
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(bad());
        }
        Ok(MessageId {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// Number of wire-encoding slots a message carries (see [`Message::encoded`]).
pub const ENCODING_SLOTS: usize = 2;

/// One message. Its body is stored once and shared by every subscriber (`Bytes`); each
/// transport's wire encoding is built at most once per message, in [`Message::encoded`].
#[derive(Debug)]
pub struct Message {
    pub id: MessageId,
    pub event: Option<Box<str>>,
    pub content_type: HeaderValue,
    pub body: Bytes,
    /// The body is UTF-8 and its content type is textual (`text/*`, JSON): transports may send
    /// it as text. Checked once at publish.
    pub is_text: bool,
    /// When the hub accepted it: for the buffer TTL and the delivery-lag histogram.
    pub published_at: Instant,
    /// Where it stands in this process's order of appends across all channels (set when it
    /// is appended): a subscriber of several channels gets their messages in this order.
    order: std::sync::atomic::AtomicU64,
    /// Wire encodings, built lazily by the first subscriber that needs one and then shared.
    /// The hub knows no wire format: the slot numbers belong to `push::Encoding`.
    encodings: [OnceLock<Bytes>; ENCODING_SLOTS],
    /// Encodings that depend on a key (how a location names the channel: the length of its
    /// prefix), for the first key asked; boxed, as most messages never need them.
    keyed: OnceLock<Box<(usize, [Bytes; 2])>>,
}

impl Message {
    pub fn new(
        id: MessageId,
        event: Option<Box<str>>,
        content_type: HeaderValue,
        body: Bytes,
        published_at: Instant,
    ) -> Message {
        let is_text = is_textual(content_type.as_bytes()) && std::str::from_utf8(&body).is_ok();
        Message {
            id,
            event,
            content_type,
            body,
            is_text,
            published_at,
            order: Default::default(),
            encodings: Default::default(),
            keyed: OnceLock::new(),
        }
    }

    /// The pair of encodings for `key`, built by `encode` the first time a key is asked for
    /// and then shared; None for any other key (the caller builds its own).
    pub fn keyed_encoding(
        &self,
        key: usize,
        encode: impl FnOnce(&Message) -> [Bytes; 2],
    ) -> Option<&[Bytes; 2]> {
        let (k, e) = &**self.keyed.get_or_init(|| Box::new((key, encode(self))));
        (*k == key).then_some(e)
    }

    /// Its place among this process's appends (0 until appended).
    pub fn order(&self) -> u64 {
        self.order.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) fn set_order(&self, order: u64) {
        self.order
            .store(order, std::sync::atomic::Ordering::Relaxed);
    }

    /// The encoding in `slot`, built by `encode` the first time it is asked for.
    pub fn encoded(&self, slot: usize, encode: impl FnOnce(&Message) -> Bytes) -> &Bytes {
        self.encodings[slot].get_or_init(|| encode(self))
    }
}

fn is_textual(ct: &[u8]) -> bool {
    let ct = ct.split(|b| *b == b';').next().unwrap_or_default();
    let ct = ct.trim_ascii().to_ascii_lowercase();
    ct.starts_with(b"text/")
        || ct == b"application/json"
        || ct.ends_with(b"+json")
        || ct == b"application/javascript"
        || ct == b"application/xml"
        || ct.ends_with(b"+xml")
        // What `curl -d` / `--data-binary` sends when no type is given: a publish typed at a
        // shell is text, and a plain WebSocket should get it as a text frame.
        || ct == b"application/x-www-form-urlencoded"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_print() {
        let id: MessageId = "1732400000123-7".parse().expect("test setup");
        assert_eq!(
            id,
            MessageId {
                ms: 1732400000123,
                seq: 7
            }
        );
        assert_eq!(id.to_string(), "1732400000123-7");
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1",
            "a-1",
            "1-b",
            "1-2-3",
            "+1-2",
            "1 -2",
            "999999999999999999999-0",
        ] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_strictly_increase() {
        let a = MessageId::next_after(None, 100);
        let b = MessageId::next_after(Some(a), 100);
        let c = MessageId::next_after(Some(b), 99); // clock went back
        let d = MessageId::next_after(Some(c), 101);
        assert!(a < b && b < c && c < d);
        assert_eq!(d, MessageId { ms: 101, seq: 0 });
    }

    #[test]
    fn text_detection() {
        let m = |ct: &'static str, body: &'static [u8]| {
            Message::new(
                MessageId::ZERO,
                None,
                HeaderValue::from_static(ct),
                Bytes::from_static(body),
                Instant::now(),
            )
        };
        assert!(m("text/plain; charset=utf-8", b"hi").is_text);
        assert!(m("application/json", b"{}").is_text);
        assert!(m("application/ld+json", b"{}").is_text);
        assert!(!m("application/octet-stream", b"hi").is_text);
        assert!(m("application/x-www-form-urlencoded", b"hello").is_text);
        assert!(!m("text/plain", b"\xff\xfe").is_text);
    }

    #[test]
    fn encoding_is_built_once() {
        let msg = Message::new(
            MessageId::ZERO,
            None,
            HeaderValue::from_static("text/plain"),
            Bytes::from_static(b"x"),
            Instant::now(),
        );
        let mut calls = 0;
        let a = msg
            .encoded(0, |_| {
                calls += 1;
                Bytes::from_static(b"frame")
            })
            .clone();
        let b = msg
            .encoded(0, |_| {
                calls += 1;
                Bytes::from_static(b"other")
            })
            .clone();
        assert_eq!(calls, 1);
        assert_eq!(a.as_ptr(), b.as_ptr());
    }
}
