//! Publishing: the publish API that the app (or a script, or `crier publish`) calls to put
//! a message on a channel (`api`), and the client `crier publish` uses (`client`); and the
//! messages crier makes from the app's own traffic: `publish_on` (proxied writes) and `poll`
//! (upstream URLs polled for their subscribers).

pub mod api;
pub mod client;
pub mod poll;
pub mod publish_on;

pub use api::{handle, hub_error};
pub use client::{client_request, ClientError, Target};

/// The request header (or `?event=`) that names a message's SSE event.
pub const EVENT_HEADER: &str = "crier-event";
