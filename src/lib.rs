//! crier: a push sidecar. It sits in front of a web application as its reverse proxy and
//! holds WebSocket, SSE and long-poll subscribers on configured paths, fed by messages the
//! application publishes to a local socket. See `DESIGN.md` for the data path.
//!
//! The modules follow the data path: `server` (accept) → `router` → `proxy` or
//! `push::{sse, ws, longpoll}` ← `hub` ← `publish`.

pub mod admin;
pub mod auth;
pub mod config;
pub mod demo;
pub mod https_client;
pub mod hub;
pub mod metrics;
pub mod proxy;
pub mod publish;
pub mod push;
pub mod response;
pub mod router;
pub mod sd_notify;
pub mod server;
pub mod status;
pub mod tls;
pub mod webhook;
pub mod webpush;

pub use config::Config;
pub use server::{Addrs, Server, ServerHandle};
