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

/// A message's event name, wherever a publisher names one (the publish API's `Crier-Event`,
/// a WebSocket client's `"event"`): 1 to 64 characters of `A-Z a-z 0-9 . _ - :`, which every
/// transport can carry as they are (an SSE `event:` line included).
pub fn is_event_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}
