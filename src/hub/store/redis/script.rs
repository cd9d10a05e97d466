//! What crier keeps in Redis, and the Lua scripts that change it atomically.
//!
//! Per channel, all under one hash tag (`{channel}`) so the layout also works on Redis Cluster:
//! - `<prefix>{<channel>}:s`, a stream: entry id = crier's message id (Redis assigns it:
//!   `<ms>-<seq>` is already crier's shape); fields `p` (the previous id of the channel: the
//!   chain every node checks for holes), `t` (content type), `b` (body), `e` (event name, if
//!   any). Trimmed by count (`MAXLEN ~`) and age (`MINID`), and expires with its TTL.
//! - `<prefix>{<channel>}:m`, a hash: `last` (the channel's head: its newest id, or the floor a
//!   node saw when it first opened the channel) and `n` (messages published since the last
//!   delete). It outlives the stream (a day more), so ids keep rising after a delete or expiry.
//! - `<prefix>{<channel>}:f`, the fan-out topic (pub/sub): one message per publish, carrying
//!   the entry, so a node costs one Redis message per publish, not one read per subscriber.

use std::sync::LazyLock;

use bytes::Bytes;

use crate::hub::MessageId;

/// XADD of every message of one call (a group of publishes to one channel, in order), trim,
/// expire, update the head and count, and PUBLISH the entries: one atomic step, so an id is
/// never published without being stored, nor stored unannounced. Each entry's `p` is the
/// previous entry's id, so the chain stays exact through the group. An id is Redis's `*`
/// (above the stream's last id, whatever the clock says) unless, for the first entry, the
/// clock (Redis's) has not passed the head: then the head's ms and seq + 1 (the stream may
/// have been deleted or expired while the head stayed). The
/// head is the meta's; when Redis has none (it lost its data, or the channel expired), the
/// highest of the stream's top and the publishing node's own head (`ARGV[5]`), so ids keep
/// rising for the nodes that still hold the old tail; the first entry's `p` is then `0-0`
/// (unknown), which every node reports as a gap.
///
/// KEYS: stream, meta. ARGV: topic, buffer_messages, stream TTL ms, meta TTL ms, node head,
/// then per message content type, body, event (`''`: none). Each `redis.call` from Lua costs
/// a few µs more than the command itself, so the script makes as few as it can: no per-entry
/// id arithmetic, the count trim folded into the last XADD. Returns the ids (in order), the
/// stream's length and the count. One message is announced as `m…` (see [`parse_fanout`]),
/// several as one `b…` message holding them all.
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
local last = redis.call('HGET', KEYS[2], 'last')
local prev = last
local base = last
if not last then
  prev = '0-0'
  base = ARGV[5]
  local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
  if top and above(top[1], base) then
    base = top[1]
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bms, bseq = split(base)
local count = math.floor((#ARGV - 5) / 3)
local ids = {}
local out = {}
for i = 0, count - 1 do
  local ct, body, ev = ARGV[6 + 3 * i], ARGV[7 + 3 * i], ARGV[8 + 3 * i]
  local id = '*'
  if i == 0 and now <= bms then
    id = string.format('%d', bms) .. '-' .. string.format('%d', bseq + 1)
  end
  -- The last one trims by count (about buffer_messages: whole nodes of the stream go).
  if i < count - 1 then
    if ev == '' then
      id = redis.call('XADD', KEYS[1], id, 'p', prev, 't', ct, 'b', body)
    else
      id = redis.call('XADD', KEYS[1], id, 'p', prev, 't', ct, 'b', body, 'e', ev)
    end
  elseif ev == '' then
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], id, 'p', prev, 't', ct, 'b', body)
  else
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], id, 'p', prev, 't', ct, 'b', body, 'e', ev)
  end
  ids[#ids + 1] = id
  if count == 1 then
    out[1] = 'm' .. id .. '\n' .. prev .. '\n' .. ev .. '\n' .. ct .. '\n' .. body
  else
    out[#out + 1] = id .. '\n' .. prev .. '\n' .. ev .. '\n' .. ct .. '\n' .. #body .. '\n' .. body
  end
  prev = id
end
local minid = now - tonumber(ARGV[3])
if minid > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d', minid) .. '-0')
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], 'last', prev)
local n = redis.call('HINCRBY', KEYS[2], 'n', count)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
if count == 1 then
  redis.call('PUBLISH', ARGV[1], out[1])
else
  redis.call('PUBLISH', ARGV[1], 'b' .. count .. '\n' .. table.concat(out))
end
return {ids, redis.call('XLEN', KEYS[1]), n}
"#,
    )
});

/// The head and the newest `ARGV[1]` entries, for a node that opens a channel. A channel
/// Redis knows nothing of gets a head of Redis's now: whatever a client names from before
/// (another Redis life, an expired channel) cannot be proven complete, so it is a gap.
pub(super) static LOAD: LazyLock<::redis::Script> = LazyLock::new(|| {
    ::redis::Script::new(
        r#"
local last = redis.call('HGET', KEYS[2], 'last')
if not last then
  local t = redis.call('TIME')
  last = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) .. '-0'
  redis.call('HSET', KEYS[2], 'last', last, 'n', 0)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
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
local n = tonumber(redis.call('HGET', KEYS[2], 'n') or '0')
local had = redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'n', 0)
end
redis.call('PUBLISH', ARGV[1], 'd' .. ARGV[2])
return n + had
"#,
    )
});

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

/// `m<id>\n<prev>\n<event>\n<content type>\n<body>` (one entry: the body runs to the end),
/// `b<n>\n` then n times `<id>\n<prev>\n<event>\n<content type>\n<body length>\n<body>`
/// (several, in order), or `d<node>`. None: not ours.
pub(crate) fn parse_fanout(payload: Bytes) -> Option<Fanout> {
    let kind = *payload.first()?;
    let mut r = Reader(payload.slice(1..));
    match kind {
        b'd' => Some(Fanout::Deleted(
            String::from_utf8_lossy(&payload[1..]).into_owned(),
        )),
        b'm' => {
            let (id, prev, event, content_type) = r.head()?;
            Some(Fanout::Messages(vec![Entry {
                id,
                prev,
                event,
                content_type,
                body: r.0,
            }]))
        }
        b'b' => {
            let n: usize = std::str::from_utf8(&r.field()?).ok()?.parse().ok()?;
            if n == 0 || n > MAX_ENTRIES {
                return None;
            }
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let (id, prev, event, content_type) = r.head()?;
                let len: usize = std::str::from_utf8(&r.field()?).ok()?.parse().ok()?;
                let body = r.take(len)?;
                entries.push(Entry {
                    id,
                    prev,
                    event,
                    content_type,
                    body,
                });
            }
            r.0.is_empty().then_some(Fanout::Messages(entries))
        }
        _ => None,
    }
}

/// What is left of a fan-out message.
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

    /// An entry's id, previous id, event and content type.
    fn head(&mut self) -> Option<(MessageId, MessageId, Option<Box<str>>, Bytes)> {
        let id = parse_id(&self.field()?)?;
        let prev = parse_id(&self.field()?)?;
        let event = event_name(&self.field()?);
        Some((id, prev, event, self.field()?))
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
    let mut e = Entry {
        id,
        prev: MessageId::ZERO,
        event: None,
        content_type: Bytes::from_static(b"application/octet-stream"),
        body: Bytes::new(),
    };
    for kv in fields.chunks_exact(2) {
        let value = bulk(&kv[1])?;
        match bulk(&kv[0])?.as_ref() {
            b"p" => e.prev = parse_id(&value)?,
            b"t" => e.content_type = value,
            b"b" => e.body = value,
            b"e" => e.event = event_name(&value),
            _ => {}
        }
    }
    Some(e)
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

    #[test]
    fn fanout_messages_parse() {
        let got = parse_fanout(Bytes::from_static(
            b"m1700000000000-3\n1700000000000-2\nnews\ntext/plain\nline 1\nline 2",
        ));
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
            b"m1-0\n",
            b"mjunk\n0-0\n\nt\nb",
            b"b0\n",
            b"bx\n",
            b"b2\n5-1\n5-0\n\nt\n1\nx",
            b"b1\n5-1\n5-0\n\nt\n3\nxy",
            b"b1\n5-1\n5-0\n\nt\n1\nxy",
        ] {
            assert_eq!(parse_fanout(Bytes::copy_from_slice(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn a_group_of_entries_parses_in_order() {
        let got = parse_fanout(Bytes::from_static(
            b"b3\n7-0\n6-4\n\ntext/plain\n3\na\nb7-1\n7-0\nev\nx/y\n0\n7-2\n7-1\n\nt\n2\n\n\n",
        ));
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
    fn topics_name_their_channel() {
        let t = topic("crier:", "chat:room-1");
        assert_eq!(t, "crier:{chat:room-1}:f");
        assert_eq!(channel_of_topic("crier:", &t), Some("chat:room-1"));
        assert_eq!(channel_of_topic("other:", &t), None);
        let k = Keys::of("p:", "a");
        assert_eq!((k.stream.as_str(), k.meta.as_str()), ("p:{a}:s", "p:{a}:m"));
    }
}
