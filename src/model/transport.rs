//! The ways a subscriber can be connected.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    WebSocket,
    Sse,
    LongPoll,
    WebRtc,
}

impl Transport {
    pub const COUNT: usize = 4;
    pub const ALL: [Transport; Transport::COUNT] = [
        Transport::WebSocket,
        Transport::Sse,
        Transport::LongPoll,
        Transport::WebRtc,
    ];

    /// The name in config (`transports = [...]`), metric labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
            Transport::LongPoll => "longpoll",
            Transport::WebRtc => "webrtc",
        }
    }

    pub fn parse(s: &str) -> Option<Transport> {
        Transport::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Index into per-transport arrays (counters, gauges, flags).
    pub fn index(self) -> usize {
        self as usize
    }
}
