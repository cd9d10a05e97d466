//! The memory engine: the local tails are the whole truth. A publish appends under the
//! channel's lock and returns (on a busy channel once its subscribers have had their turn:
//! [`crate::hub::Paced`]); nothing outlives the process.

use std::future::ready;

use super::{Engine, EngineFuture};
use crate::hub::{ChannelStats, Hub, HubError, NewMessage, PublishReceipt};
use crate::model::ChannelName;

/// The default engine (no `[channels] store`, no `[cluster]`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Memory;

impl Engine for Memory {
    fn publish<'a>(
        &'a self,
        hub: &'a Hub,
        channel: &'a ChannelName,
        msg: NewMessage,
    ) -> EngineFuture<'a, Result<PublishReceipt, HubError>> {
        // All the work happens here, synchronously; the future carries the answer, and on a
        // busy channel waits for the fan-out first.
        let appended = hub.append_local(channel, msg);
        Box::pin(async move {
            let (receipt, paced) = appended?;
            if let Some(p) = paced {
                p.wait().await;
            }
            Ok(receipt)
        })
    }

    fn delete<'a>(
        &'a self,
        hub: &'a Hub,
        channel: &'a str,
    ) -> EngineFuture<'a, Result<(), HubError>> {
        Box::pin(ready(hub.delete_local(channel)))
    }

    fn stats<'a>(
        &'a self,
        hub: &'a Hub,
        channel: &'a str,
    ) -> EngineFuture<'a, Result<Option<ChannelStats>, HubError>> {
        Box::pin(ready(Ok(hub.local_stats(channel))))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::config::{BufferPolicy, Config};
    use crate::hub::store::contract::{engine_contract, MakeHub};
    use crate::hub::Hub;
    use crate::metrics::Metrics;

    struct MakeMemory;

    impl MakeHub for MakeMemory {
        fn make(&self, max_channels: usize, buffer: usize, ttl: Duration) -> Hub {
            let mut c = Config::default();
            c.channels.max_channels = max_channels;
            c.channels.buffer = BufferPolicy {
                buffer_messages: buffer,
                buffer_ttl: ttl,
            };
            Hub::new(Arc::new(c), Arc::new(Metrics::new()))
        }
    }

    engine_contract!(MakeMemory);
}
