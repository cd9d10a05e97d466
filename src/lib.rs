//! crier: a push sidecar. It sits in front of a web application as its reverse proxy, passes
//! ordinary traffic through, and on configured paths holds WebSocket, Server-Sent Events,
//! long-poll and WebRTC subscribers itself, fed by messages the application publishes to a
//! local socket.
//!
//! A request's path through the modules: `server` (accept, sniff the protocol, HTTP, route) →
//! `proxy` (the upstream app) or `push` (admission by the channel's owner, then one transport) →
//! `hub` (channels, ids, buffers; storage engines in `hub::store`) ← `publish` (the app's
//! publishes); the hub's observers feed `webhook` and `webpush`. Below them: `config` (plain
//! data), `keys` (key material), `model` (domain types).
//!
//! The whole map, the seams and how to extend them: `docs/ARCHITECTURE.md`, shown below.
#![doc = include_str!("../docs/ARCHITECTURE.md")]

pub(crate) mod access_log;
pub(crate) mod admin;
pub(crate) mod auth;
pub mod config;
pub mod demo;
pub mod event_loop;
/// The properties the fuzz targets in `fuzz/` check (see `fuzz/README.md`); not an API.
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod https_client;
pub mod hub;
pub mod keys;
pub(crate) mod log_limit;
pub mod metrics;
pub mod model;
pub(crate) mod proxy;
pub mod publish;
pub(crate) mod push;
pub(crate) mod query;
pub(crate) mod response;
pub mod sd_notify;
pub mod server;
pub(crate) mod tls;
pub mod webhook;
pub(crate) mod webpush;

pub use config::Config;
pub use server::{Addrs, Server, ServerHandle};
