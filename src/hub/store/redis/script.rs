//! What crier keeps in Redis, and the Lua scripts that change it atomically.
//!
//! Per channel, all under one hash tag (`{channel}`) so the layout also works on Redis Cluster:
//! - `<prefix>{<channel>}:s`, a stream: entry id = crier's message id (Redis assigns it:
//!   `<ms>-<seq>` is already crier's shape); fields `p` (the previous id of the channel: the
//!   chain every node checks for holes) and `x` (the message, [`Packed`]). Trimmed by count
//!   (`MAXLEN ~`) and age (`MINID`), and expires with its TTL.
//! - `<prefix>{<channel>}:m`, a string `<last> <n>`: the channel's head (its newest id, or the
//!   floor a node saw when it first opened the channel) and the messages published since the
//!   last delete. It outlives the stream (a day more), so ids keep rising after a delete or
//!   expiry.
//! - `<prefix>{<channel>}:f`, the fan-out topic (pub/sub): one message per publish call,
//!   carrying its entries, so a node costs one Redis message per call, not one read per
//!   subscriber.
//!
//! Redis 7.0 or later (Valkey too): the script gives the entries after the first of a call
//! ids of the form `<ms>-*`.
//!
//! Why the scripts look the way they do: every `redis.call` costs about a microsecond on top
//! of the command, and this Redis's Lua hashes every byte of every string it makes (a body
//! passed in is hashed once, each concatenation holding it once more). So a message goes in
//! as one argument already framed the way the stream and the fan-out keep it (no per-message
//! concatenation, no number formatting in Lua), the ids of one call are consecutive (the
//! fan-out names only the first), and the bookkeeping is as few calls as the contract allows.

use std::sync::LazyLock;

use bytes::Bytes;

use crate::hub::MessageId;

/// XADD of every message of one call (a group of publishes to one channel, in order), trim,
/// expire, update the head and count, and PUBLISH the entries: one atomic step, so an id is
/// never published without being stored, nor stored unannounced. Each entry's `p` is the
/// previous entry's id, so the chain stays exact through the group.
///
/// The first id is Redis's `*` (above the stream's last id, whatever the clock says) unless
/// that is not above the channel's head (the stream was deleted or expired while the head
/// stayed, and Redis's clock has not passed it): then that entry goes again as the head's ms
/// and seq + 1. The rest are `<first ms>-*`: the first's seq + 1, + 2, ..., so the ids of a
/// call are consecutive and the fan-out names only the first. The head is the meta's; when
/// Redis has none (it lost its data, or the channel expired), the highest of the stream's top
/// and the publishing node's own head (`ARGV[5]`), so ids keep rising for the nodes that
/// still hold the old tail; the first entry's `p` is then `0-0` (unknown), which every node
/// reports as a gap. Age trimming takes the first id's ms as now (Redis's clock, or just
/// above the head when that clock is behind).
///
/// KEYS: stream, meta. ARGV: topic, buffer_messages, stream TTL ms, meta TTL ms, node head,
/// the number of messages, then each message [`Packed`]. Returns the first id, the stream's
/// length and the count. The fan-out message is described at [`parse_fanout`].
pub(super) static PUBLISH: LazyLock<::redis::Script> = LazyLock::new(|| {
    ::redis::Script::new(
        r#"
local function split(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local function above(a, b)
  local am, as = split(a)
  local bm, bs = split(b)
  return am > bm or (am == bm and as > bs)
end
local meta = redis.call('GET', KEYS[2])
local last, n
if meta then
  local sp = string.find(meta, ' ', 1, true) or (#meta + 1)
  last, n = string.sub(meta, 1, sp - 1), tonumber(string.sub(meta, sp + 1)) or 0
end
local prev = last
local base = last
if not last then
  prev = '0-0'
  n = 0
  base = ARGV[5]
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
  if top and above(top[1], base) then
    base = top[1]
  end
end
local count = #ARGV - 6
-- The last XADD also trims by count (about buffer_messages: whole nodes of the stream go).
local first
if count == 1 then
  first = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'p', prev, 'x', ARGV[7])
else
  first = redis.call('XADD', KEYS[1], '*', 'p', prev, 'x', ARGV[7])
end
local ms = split(first)
if not above(first, base) then
  redis.call('XDEL', KEYS[1], first)
  local bseq
  ms, bseq = split(base)
  first = string.format('%d-%d', ms, bseq + 1)
  redis.call('XADD', KEYS[1], first, 'p', prev, 'x', ARGV[7])
end
local out = {'b' .. ARGV[6] .. '\n' .. first .. '\n' .. prev .. '\n', ARGV[7]}
prev = first
local auto = string.format('%d-*', ms)
for i = 8, #ARGV do
  if i < #ARGV then
    prev = redis.call('XADD', KEYS[1], auto, 'p', prev, 'x', ARGV[i])
  else
    prev = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], auto, 'p', prev, 'x', ARGV[i])
  end
  out[i - 5] = ARGV[i]
end
local minid = ms - tonumber(ARGV[3])
if minid > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-0', minid))
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
n = n + count
redis.call('SET', KEYS[2], prev .. ' ' .. string.format('%d', n), 'PX', ARGV[4])
redis.call('PUBLISH', ARGV[1], table.concat(out))
return {first, redis.call('XLEN', KEYS[1]), n}
"#,
    )
});

/// The head and the newest `ARGV[1]` entries, for a node that opens a channel. A channel
/// Redis knows nothing of gets a head of Redis's now: whatever a client names from before
/// (another Redis life, an expired channel) cannot be proven complete, so it is a gap.
pub(super) static LOAD: LazyLock<::redis::Script> = LazyLock::new(|| {
    ::redis::Script::new(
        r#"
local meta = redis.call('GET', KEYS[2])
local last
if meta then
  last = string.sub(meta, 1, (string.find(meta, ' ', 1, true) or (#meta + 1)) - 1)
else
  local t = redis.call('TIME')
  last = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) .. '-0'
  redis.call('SET', KEYS[2], last .. ' 0', 'PX', ARGV[2])
end
return {last, redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[1])}
"#,
    )
});

/// Drops the stream, keeps the head (ids keep rising), zeroes the count and tells every node
/// (`d<node>`: the deleting node has already closed its own subscribers). Returns the count
/// before.
pub(super) static DELETE: LazyLock<::redis::Script> = LazyLock::new(|| {
    ::redis::Script::new(
        r#"
local meta = redis.call('GET', KEYS[2])
local n = 0
local had = redis.call('DEL', KEYS[1])
if meta then
  local sp = string.find(meta, ' ', 1, true) or (#meta + 1)
  n = tonumber(string.sub(meta, sp + 1)) or 0
  redis.call('SET', KEYS[2], string.sub(meta, 1, sp - 1) .. ' 0', 'KEEPTTL')
end
redis.call('PUBLISH', ARGV[1], 'd' .. ARGV[2])
return n + had
"#,
    )
});

/// One message as the publish script takes it and the stream (`x`) and the fan-out keep it:
/// `<body length>\n<event>\n<content type>\n<body>` (event empty: none). Written straight
/// into the command, so a body is copied once on its way out.
pub(super) struct Packed<'a> {
    pub(super) event: &'a str,
    pub(super) content_type: &'a [u8],
    pub(super) body: &'a [u8],
}

impl ::redis::ToRedisArgs for Packed<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + ::redis::RedisWrite,
    {
        use std::io::Write;
        let mut w = out.writer_for_next_arg();
        // The writer is the command's own buffer: writing to it does not fail.
        let _ = write!(w, "{}\n{}\n", self.body.len(), self.event);
        let _ = w.write_all(self.content_type);
        let _ = w.write_all(b"\n");
        let _ = w.write_all(self.body);
    }
}

/// The head and count of a meta value (`<last> <n>`).
pub(super) fn parse_meta(meta: &str) -> (&str, u64) {
    match meta.split_once(' ') {
        Some((last, n)) => (last, n.parse().unwrap_or(0)),
        None => (meta, 0),
    }
}

/// The keys and topic of one channel.
pub(super) struct Keys {
    pub(super) stream: String,
    pub(super) meta: String,
    pub(super) topic: String,
}

impl Keys {
    pub(super) fn of(prefix: &str, channel: &str) -> Keys {
        Keys {
            stream: format!("{prefix}{{{channel}}}:s"),
            meta: format!("{prefix}{{{channel}}}:m"),
            topic: topic(prefix, channel),
        }
    }
}

pub(super) fn topic(prefix: &str, channel: &str) -> String {
    format!("{prefix}{{{channel}}}:f")
}

/// The channel a fan-out topic belongs to.
pub(super) fn channel_of_topic<'a>(prefix: &str, topic: &'a str) -> Option<&'a str> {
    topic
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix("}:f")
}

/// One stream entry, from the fan-out or from a stream read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) id: MessageId,
    /// The channel's previous id when this was published (`0-0`: Redis had no head).
    pub(crate) prev: MessageId,
    pub(crate) event: Option<Box<str>>,
    pub(crate) content_type: Bytes,
    pub(crate) body: Bytes,
}

/// What a fan-out message says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fanout {
    /// Entries of one publish call, in id order (each one's `prev` the one before's).
    Messages(Vec<Entry>),
    /// The channel was deleted by the node of that id.
    Deleted(String),
}

/// Most entries one `b` message is taken to hold (a bound on what a garbled count allocates;
/// the publishing side sends at most [`super::MAX_BATCH`]).
const MAX_ENTRIES: usize = 65536;

/// `b<n>\n<first id>\n<prev>\n` then n messages [`Packed`] (entry i, from 0, has the id
/// `<first ms>-<first seq + i>` and the one before as its previous id; the first's is
/// `<prev>`), or `d<node>`. None: not ours.
pub(crate) fn parse_fanout(payload: Bytes) -> Option<Fanout> {
    let kind = *payload.first()?;
    let mut r = Reader(payload.slice(1..));
    match kind {
        b'd' => Some(Fanout::Deleted(
            String::from_utf8_lossy(&payload[1..]).into_owned(),
        )),
        b'b' => {
            let n: usize = std::str::from_utf8(&r.field()?).ok()?.parse().ok()?;
            if n == 0 || n > MAX_ENTRIES {
                return None;
            }
            let first = parse_id(&r.field()?)?;
            let mut prev = parse_id(&r.field()?)?;
            let mut entries = Vec::with_capacity(n);
            for i in 0..n as u64 {
                let id = MessageId {
                    ms: first.ms,
                    seq: first.seq.checked_add(i)?,
                };
                let (event, content_type, body) = r.packed()?;
                entries.push(Entry {
                    id,
                    prev,
                    event,
                    content_type,
                    body,
                });
                prev = id;
            }
            r.0.is_empty().then_some(Fanout::Messages(entries))
        }
        _ => None,
    }
}

/// What is left of a fan-out message or a stream entry's `x`.
struct Reader(Bytes);

impl Reader {
    /// Up to the next newline (consumed).
    fn field(&mut self) -> Option<Bytes> {
        let i = self.0.iter().position(|b| *b == b'\n')?;
        let f = self.0.slice(..i);
        self.0 = self.0.slice(i + 1..);
        Some(f)
    }

    fn take(&mut self, len: usize) -> Option<Bytes> {
        (len <= self.0.len()).then(|| self.0.split_to(len))
    }

    /// One [`Packed`] message: its event, content type and body.
    fn packed(&mut self) -> Option<(Option<Box<str>>, Bytes, Bytes)> {
        let len: usize = std::str::from_utf8(&self.field()?).ok()?.parse().ok()?;
        let event = event_name(&self.field()?);
        let content_type = self.field()?;
        Some((event, content_type, self.take(len)?))
    }
}

fn event_name(b: &[u8]) -> Option<Box<str>> {
    (!b.is_empty())
        .then(|| std::str::from_utf8(b).ok().map(Into::into))
        .flatten()
}

pub(super) fn parse_id(b: &[u8]) -> Option<MessageId> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// A stream entry as XRANGE / XREVRANGE return it: `[id, [field, value, …]]`.
pub(super) fn entry_of(v: &::redis::Value) -> Option<Entry> {
    let ::redis::Value::Array(pair) = v else {
        return None;
    };
    let [id, ::redis::Value::Array(fields)] = pair.as_slice() else {
        return None;
    };
    let id = parse_id(&bulk(id)?)?;
    let mut prev = MessageId::ZERO;
    let mut message = None;
    for kv in fields.chunks_exact(2) {
        let value = bulk(&kv[1])?;
        match bulk(&kv[0])?.as_ref() {
            b"p" => prev = parse_id(&value)?,
            b"x" => {
                let mut r = Reader(value);
                message = r.packed().filter(|_| r.0.is_empty());
            }
            _ => {}
        }
    }
    let (event, content_type, body) = message?;
    Some(Entry {
        id,
        prev,
        event,
        content_type,
        body,
    })
}

pub(super) fn bulk(v: &::redis::Value) -> Option<Bytes> {
    match v {
        ::redis::Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
        ::redis::Value::SimpleString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        ::redis::Value::Int(n) => Some(Bytes::from(n.to_string())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(event: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
        use ::redis::ToRedisArgs;
        let mut args = Packed {
            event,
            content_type: content_type.as_bytes(),
            body,
        }
        .to_redis_args();
        assert_eq!(args.len(), 1, "one argument");
        args.remove(0)
    }

    #[test]
    fn a_message_is_one_framed_argument() {
        assert_eq!(
            packed("news", "text/plain", b"line 1\nline 2"),
            b"13\nnews\ntext/plain\nline 1\nline 2"
        );
        assert_eq!(packed("", "t", b""), b"0\n\nt\n");
    }

    #[test]
    fn fanout_messages_parse() {
        let mut wire = b"b1\n1700000000000-3\n1700000000000-2\n".to_vec();
        wire.extend(packed("news", "text/plain", b"line 1\nline 2"));
        let got = parse_fanout(Bytes::from(wire));
        assert_eq!(
            got,
            Some(Fanout::Messages(vec![Entry {
                id: MessageId {
                    ms: 1700000000000,
                    seq: 3
                },
                prev: MessageId {
                    ms: 1700000000000,
                    seq: 2
                },
                event: Some("news".into()),
                content_type: Bytes::from_static(b"text/plain"),
                body: Bytes::from_static(b"line 1\nline 2"),
            }]))
        );
        assert_eq!(
            parse_fanout(Bytes::from_static(b"dnode-1")),
            Some(Fanout::Deleted("node-1".into()))
        );
        for bad in [
            &b""[..],
            b"x",
            b"m1-0\n0-0\n1\n\nt\nb",
            b"b1\n",
            b"b0\n5-1\n5-0\n",
            b"bx\n5-1\n5-0\n1\n\nt\nx",
            b"b1\njunk\n5-0\n1\n\nt\nx",
            b"b1\n5-1\njunk\n1\n\nt\nx",
            b"b2\n5-1\n5-0\n1\n\nt\nx",
            b"b1\n5-1\n5-0\n3\n\nt\nxy",
            b"b1\n5-1\n5-0\n1\n\nt\nxy",
            b"b1\n5-1\n5-0\nx\n\nt\n",
            b"b2\n5-18446744073709551615\n5-0\n0\n\nt\n0\n\nt\n",
        ] {
            assert_eq!(parse_fanout(Bytes::copy_from_slice(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn a_group_of_entries_parses_in_order_with_consecutive_ids() {
        let mut wire = b"b3\n7-0\n6-4\n".to_vec();
        wire.extend(packed("", "text/plain", b"a\nb"));
        wire.extend(packed("ev", "x/y", b""));
        wire.extend(packed("", "t", b"\n\n"));
        let got = parse_fanout(Bytes::from(wire));
        let Some(Fanout::Messages(es)) = got else {
            panic!("{got:?}");
        };
        let seen: Vec<String> = es
            .iter()
            .map(|e| {
                format!(
                    "{} {} {:?} {:?} {:?}",
                    e.id, e.prev, e.event, e.content_type, e.body
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                r#"7-0 6-4 None b"text/plain" b"a\nb""#,
                r#"7-1 7-0 Some("ev") b"x/y" b"""#,
                r#"7-2 7-1 None b"t" b"\n\n""#,
            ]
        );
    }

    #[test]
    fn stream_entries_parse_and_a_damaged_one_is_refused() {
        use ::redis::Value::{Array, BulkString};
        let entry = |fields: Vec<(&str, Vec<u8>)>| {
            Array(vec![
                BulkString(b"9-1".to_vec()),
                Array(
                    fields
                        .into_iter()
                        .flat_map(|(k, v)| [BulkString(k.as_bytes().to_vec()), BulkString(v)])
                        .collect(),
                ),
            ])
        };
        let e = entry_of(&entry(vec![
            ("p", b"9-0".to_vec()),
            ("x", packed("ev", "text/plain", b"hi")),
        ]))
        .expect("parses");
        assert_eq!(
            (e.id.to_string(), e.prev.to_string(), e.event.as_deref()),
            ("9-1".into(), "9-0".into(), Some("ev"))
        );
        assert_eq!(
            (&e.content_type[..], &e.body[..]),
            (&b"text/plain"[..], &b"hi"[..])
        );
        for bad in [
            entry(vec![("p", b"9-0".to_vec())]),
            entry(vec![("p", b"9-0".to_vec()), ("x", b"3\n\nt\nhi".to_vec())]),
            entry(vec![("p", b"9-0".to_vec()), ("x", b"1\n\nt\nhi".to_vec())]),
            entry(vec![("p", b"junk".to_vec()), ("x", packed("", "t", b"hi"))]),
        ] {
            assert_eq!(entry_of(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn meta_values_parse() {
        assert_eq!(parse_meta("5-3 12"), ("5-3", 12));
        assert_eq!(parse_meta("5-3"), ("5-3", 0));
        assert_eq!(parse_meta("5-3 x"), ("5-3", 0));
    }

    #[test]
    fn topics_name_their_channel() {
        let t = topic("crier:", "chat:room-1");
        assert_eq!(t, "crier:{chat:room-1}:f");
        assert_eq!(channel_of_topic("crier:", &t), Some("chat:room-1"));
        assert_eq!(channel_of_topic("other:", &t), None);
        let k = Keys::of("p:", "a");
        assert_eq!((k.stream.as_str(), k.meta.as_str()), ("p:{a}:s", "p:{a}:m"));
    }
}
