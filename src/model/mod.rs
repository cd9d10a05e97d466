//! Domain types every layer uses, below all logic: a channel's name and the patterns that
//! select channels, the subscriber transports, and what is known of a client connection.
//! Nothing here imports another crier module.

mod channel;
mod conn;
mod transport;

pub use channel::{
    is_channel_char, pattern_matches, BadChannelName, BadChannelPattern, ChannelName,
    ChannelPattern,
};
pub use conn::ConnInfo;
pub use transport::Transport;
