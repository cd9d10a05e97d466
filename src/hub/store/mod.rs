//! The storage seam: where a hub's channel buffers live beyond this process's memory.
//!
//! Every engine keeps the same local state, the hub's [`Channel`]s: a bounded, time-limited
//! tail of messages per channel that subscribers read from their own position (so resume and
//! live delivery stay one code path and cost no I/O per delivery). What an engine decides is
//! how a message gets onto that tail and what "accepted" means:
//!
//! - **memory** ([`Memory`], the default): the hub assigns the id and appends; accepted means
//!   in this process's memory, gone on restart.
//! - **file** (`[channels] store`): the message is on disk (one commit and fsync shared by the
//!   concurrent publishes of a batch) before it is appended and acknowledged; a restart
//!   reloads the tails.
//! - **redis** (`[cluster] redis`): the message is in the channel's Redis stream and fanned
//!   out to every node; each node appends what the fan-out delivers, so all deliver one order.
//!
//! The contract every engine keeps, and the shared test suite checks: publish returns the id
//! (strictly increasing per channel, also across a channel's deletion); reading after a
//! position returns what followed it and whether a gap precedes it; subscribers are woken on
//! append; the buffer is trimmed by count and TTL; delete ends a channel's subscribers and
//! history; stats give the channel's figures.

#[cfg(test)]
pub(crate) mod contract;
mod file;
mod memory;
mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use file::{File, FileError};

/// What the fuzz targets reach inside the engines (src/fuzzing.rs).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fuzz {
    pub(crate) use super::file::fuzz::{frame_record, scan};
    pub(crate) use super::redis::fuzz::{parse_fanout, Entry, Fanout};
}
pub use memory::Memory;
pub use redis::{ClusterError, Redis, SharedTable, TableChange};

use super::{Channel, ChannelStats, Hub, HubError, NewMessage, PublishReceipt};
use crate::model::ChannelName;

/// A boxed future: engines are trait objects, and publishing allocates one per publish (a
/// few dozen bytes, next to an HTTP request's parsing) rather than per delivery.
pub type EngineFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One storage engine. Methods get the hub so an engine can use its local channels (create,
/// append, notify observers) without owning them.
pub trait Engine: Send + Sync + 'static {
    /// Accepts one message for `channel`: assigns its id, makes it as durable or shared as the
    /// engine promises, and puts it on the local tail (waking local subscribers) — or, for a
    /// fan-out engine, leaves that to the fan-out. Ok means the publish may be acknowledged.
    fn publish<'a>(
        &'a self,
        hub: &'a Hub,
        channel: &'a ChannelName,
        msg: NewMessage,
    ) -> EngineFuture<'a, Result<PublishReceipt, HubError>>;

    /// Called for every local subscriber once it is counted in, before it resolves its
    /// position: an engine whose history lives elsewhere loads the tail here and starts
    /// listening (and has every subscriber that joins meanwhile wait for that too). None:
    /// nothing to wait for (the local tail is the whole truth, or it is loaded already).
    fn open<'a>(
        &'a self,
        _hub: &'a Hub,
        _channel: &'a Arc<Channel>,
    ) -> Option<EngineFuture<'a, Result<(), HubError>>> {
        None
    }

    /// Deletes a channel everywhere the engine keeps it; its subscribers see `Closed(Deleted)`.
    fn delete<'a>(
        &'a self,
        hub: &'a Hub,
        channel: &'a str,
    ) -> EngineFuture<'a, Result<(), HubError>>;

    /// The channel's figures (None: no such channel).
    fn stats<'a>(
        &'a self,
        hub: &'a Hub,
        channel: &'a str,
    ) -> EngineFuture<'a, Result<Option<ChannelStats>, HubError>>;

    /// The hub is shutting down: finish what is in flight (a last commit), release files.
    /// Does not block: [`Engine::closed`] says when it is done.
    fn close(&self) {}

    /// Resolves once what [`Engine::close`] started is over (None: nothing to wait for).
    fn closed(&self) -> Option<EngineFuture<'_, ()>> {
        None
    }
}
