//! The crier.json envelope, one format for every transport that carries it (crier.json
//! WebSocket, WebRTC, multiplexed SSE and long-poll, Web Push): `{"id", "event", "data"}`
//! (`data_b64` for a body that is not UTF-8), plus `"channel"` on a multiplexed stream and
//! `"gap": true` on the first message after messages were lost to this subscriber.
//!
//! What every subscriber of a message gets is encoded once per message and shared
//! ([`Message::encoded`], [`Message::keyed_encoding`]); only a gap notice is per subscriber.

use base64::Engine;
use bytes::Bytes;

use super::encoding;
use crate::hub::Message;

/// The fields of the envelope: `id`, `event` when the message has one, and `data`, or
/// `data_b64` for a body that is not UTF-8.
pub fn fields(m: &Message) -> serde_json::Map<String, serde_json::Value> {
    let mut v = serde_json::Map::new();
    v.insert("id".into(), m.id.to_string().into());
    if let Some(e) = &m.event {
        v.insert("event".into(), e.to_string().into());
    }
    match std::str::from_utf8(&m.body) {
        Ok(s) => v.insert("data".into(), s.into()),
        Err(_) => v.insert(
            "data_b64".into(),
            base64::engine::general_purpose::STANDARD
                .encode(&m.body)
                .into(),
        ),
    };
    v
}

fn to_bytes(v: &serde_json::Map<String, serde_json::Value>) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

/// The single-channel envelope `{"id","event","data"}`.
pub fn encode(m: &Message) -> Bytes {
    to_bytes(&fields(m))
}

/// The shared single-channel envelope of `m` (built once per message).
pub fn single(m: &Message) -> Bytes {
    m.encoded(encoding::WS_JSON, encode).clone()
}

/// The envelope of `m` for one subscriber: `channel` when the stream is multiplexed (the
/// name without the location's `prefix_len` bytes), `gap` when messages before it were lost.
/// What several subscribers share is cached in the message.
pub fn for_subscriber(m: &Message, channel: Option<(&str, usize)>, gap: bool) -> Bytes {
    match (channel, gap) {
        (None, false) => single(m),
        (Some((name, key)), false) => {
            if let Some([json, _]) = m.keyed_encoding(key, |m| multiplexed_pair(m, name)) {
                return json.clone();
            }
            to_bytes(&with(m, channel, false))
        }
        (channel, true) => to_bytes(&with(m, channel, true)),
    }
}

/// `data: <envelope>\n\n` of a multiplexed SSE event (its `id:` line, the cursor, is the
/// subscriber's own), shared like the envelope.
pub fn sse_data(m: &Message, name: &str, key: usize, gap: bool) -> Bytes {
    if !gap {
        if let Some([_, sse]) = m.keyed_encoding(key, |m| multiplexed_pair(m, name)) {
            return sse.clone();
        }
    }
    sse_wrap(&to_bytes(&with(m, Some((name, key)), gap)))
}

fn with(
    m: &Message,
    channel: Option<(&str, usize)>,
    gap: bool,
) -> serde_json::Map<String, serde_json::Value> {
    let mut v = fields(m);
    if let Some((name, _)) = channel {
        v.insert("channel".into(), name.into());
    }
    if gap {
        v.insert("gap".into(), true.into());
    }
    v
}

/// The multiplexed envelope and its SSE `data:` line, for subscribers who call the channel
/// `name`. The cache is keyed by the length of the location's prefix: every subscriber with
/// the same key names this message's channel the same way.
fn multiplexed_pair(m: &Message, name: &str) -> [Bytes; 2] {
    let json = to_bytes(&with(m, Some((name, 0)), false));
    let sse = sse_wrap(&json);
    [json, sse]
}

/// serde_json writes no raw newline: the envelope is one `data:` line.
fn sse_wrap(json: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(json.len() + 8);
    b.extend_from_slice(b"data: ");
    b.extend_from_slice(json);
    b.extend_from_slice(b"\n\n");
    Bytes::from(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::MessageId;

    fn msg(body: &'static [u8]) -> Message {
        Message::new(
            MessageId { ms: 1, seq: 2 },
            Some("ev".into()),
            http::HeaderValue::from_static("text/plain"),
            Bytes::from_static(body),
            std::time::Instant::now(),
        )
    }

    fn json(b: &[u8]) -> serde_json::Value {
        serde_json::from_slice(b).expect("json")
    }

    #[test]
    fn envelopes() {
        let m = msg(b"a\nb");
        assert_eq!(
            json(&for_subscriber(&m, None, false)),
            serde_json::json!({"id": "1-2", "event": "ev", "data": "a\nb"})
        );
        assert_eq!(
            json(&for_subscriber(&m, Some(("room", 5)), false)),
            serde_json::json!({"id": "1-2", "event": "ev", "data": "a\nb", "channel": "room"})
        );
        // Another prefix is not the cached one: encoded for it.
        assert_eq!(
            json(&for_subscriber(&m, Some(("chat:room", 0)), true)),
            serde_json::json!({"id": "1-2", "event": "ev", "data": "a\nb", "channel": "chat:room", "gap": true})
        );
        let sse = sse_data(&m, "room", 5, false);
        assert!(sse.starts_with(b"data: {") && sse.ends_with(b"}\n\n"));
        let bin = msg(b"\xff\x00");
        assert_eq!(json(&for_subscriber(&bin, None, false))["data_b64"], "/wA=");
    }
}
