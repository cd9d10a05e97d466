//! A small table every node shares (one Redis hash on the first shard) and follows: a change
//! is written and announced in one script, and every node's follower hears it (and, after a
//! reconnect, is told to read the whole table again). Web Push keeps its subscriptions here in
//! cluster mode, so the node that takes a publish knows every node's subscribers.

use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{script, Shard};
use crate::hub::HubError;

/// HSET or HDEL, and PUBLISH the change with the writing node (which applied it already):
/// `+<node> <field length> <field><value>` or `-<node> <field length> <field>`.
static CHANGE: LazyLock<::redis::Script> = LazyLock::new(|| {
    ::redis::Script::new(
        r#"
local changed
local note
if ARGV[1] == '+' then
  changed = redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
  note = '+' .. ARGV[2] .. ' ' .. #ARGV[3] .. ' ' .. ARGV[3] .. ARGV[4]
else
  changed = redis.call('HDEL', KEYS[1], ARGV[3])
  note = '-' .. ARGV[2] .. ' ' .. #ARGV[3] .. ' ' .. ARGV[3]
end
redis.call('PUBLISH', KEYS[2], note)
return changed
"#,
    )
});

/// What a follower hears.
#[derive(Debug, PartialEq, Eq)]
pub enum TableChange {
    Put {
        field: Bytes,
        value: Bytes,
    },
    Remove {
        field: Bytes,
    },
    /// The connection was made again: changes may have been missed; read the table anew.
    Reload,
}

/// One shared table (see the module doc).
#[derive(Clone)]
pub struct SharedTable {
    shard: Arc<Shard>,
    key: String,
    pub(super) topic: String,
}

impl SharedTable {
    pub(super) fn new(shard: Arc<Shard>, name: &str) -> SharedTable {
        SharedTable {
            key: format!("{}{{{name}}}:table", shard.prefix),
            topic: format!("{}{{{name}}}:changes", shard.prefix),
            shard,
        }
    }

    /// Stores `value` under `field`; true when the field is new.
    pub async fn put(&self, field: &str, value: &[u8]) -> Result<bool, HubError> {
        self.change("+", field, value).await
    }

    /// Removes `field`; true when it was there.
    pub async fn remove(&self, field: &str) -> Result<bool, HubError> {
        self.change("-", field, b"").await
    }

    async fn change(&self, op: &str, field: &str, value: &[u8]) -> Result<bool, HubError> {
        let n: i64 = self
            .shard
            .eval(&CHANGE, &[&self.key, &self.topic], |c| {
                c.arg(op).arg(&*self.shard.node).arg(field).arg(value);
            })
            .await?;
        Ok(n > 0)
    }

    /// Every (field, value) of the table.
    pub async fn load(&self) -> Result<Vec<(Bytes, Bytes)>, HubError> {
        let v: ::redis::Value = self
            .shard
            .query(::redis::cmd("HGETALL").arg(&self.key))
            .await?;
        let items = match v {
            ::redis::Value::Array(items) => items,
            ::redis::Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            _ => Vec::new(),
        };
        Ok(items
            .chunks_exact(2)
            .filter_map(|kv| Some((script::bulk(&kv[0])?, script::bulk(&kv[1])?)))
            .collect())
    }

    /// The changes other nodes make, from now on (one follower per table).
    pub fn follow(&self) -> mpsc::UnboundedReceiver<TableChange> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shard.tables.lock().push((self.topic.clone(), tx));
        // The fan-out task subscribes to the topic on its next (re)connect; ask for one now
        // so a follower made after the start hears changes at once.
        let _ = self.shard.ops.send(super::Op::Follow);
        rx
    }
}

/// A change announced on a table's topic; None when it is this node's own or not understood.
pub(super) fn parse_change(payload: &[u8], me: &str) -> Option<TableChange> {
    let (op, rest) = payload.split_first()?;
    let sp = rest.iter().position(|b| *b == b' ')?;
    if &rest[..sp] == me.as_bytes() {
        return None;
    }
    let rest = &rest[sp + 1..];
    let sp = rest.iter().position(|b| *b == b' ')?;
    let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
    let rest = &rest[sp + 1..];
    if rest.len() < len {
        return None;
    }
    let field = Bytes::copy_from_slice(&rest[..len]);
    match op {
        b'+' => Some(TableChange::Put {
            field,
            value: Bytes::copy_from_slice(&rest[len..]),
        }),
        b'-' => Some(TableChange::Remove { field }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_parse_and_our_own_are_left_out() {
        assert_eq!(
            parse_change(b"+n2 9 a\nb c d e{\"k\":1}", "n1"),
            Some(TableChange::Put {
                field: Bytes::from_static(b"a\nb c d e"),
                value: Bytes::from_static(b"{\"k\":1}"),
            })
        );
        assert_eq!(
            parse_change(b"-n2 3 a\nb", "n1"),
            Some(TableChange::Remove {
                field: Bytes::from_static(b"a\nb")
            })
        );
        assert_eq!(parse_change(b"-n1 3 a\nb", "n1"), None, "ours");
        assert_eq!(parse_change(b"+n2 99 short", "n1"), None);
        assert_eq!(parse_change(b"", "n1"), None);
    }
}
