//! A session's SCTP association and its data channel (RFC 8831, DCEP of RFC 8832), on
//! sctp-proto. The DTLS client opens the association (the browser, unless its offer was
//! passive); the client always opens the channels: the first carries every message, and any
//! later one is acknowledged and left unused. What the client sends is read and dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use sctp_proto::{
    Association, AssociationHandle, ClientConfig, DatagramEvent, Endpoint, EndpointConfig, Event,
    Payload, PayloadProtocolIdentifier as Ppi, ReliabilityType, ServerConfig, StreamEvent,
    TransportConfig,
};

use super::sdp::LOCAL_MAX_MESSAGE_SIZE;

/// What crier lets wait in a channel's send buffer (unacknowledged or unsent) before it
/// holds back further messages: as a browser's `bufferedAmount` high-water mark.
const MAX_BUFFERED: usize = 128 * 1024;
/// DCEP message types (RFC 8832 §5).
const DATA_CHANNEL_OPEN: u8 = 0x03;
const DATA_CHANNEL_ACK: u8 = 0x02;
/// sctp-proto wants a peer address; the association's real one is the DTLS layer's business.
const PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 5000);

/// The configs every session's endpoint shares.
pub(super) struct Configs {
    endpoint: Arc<EndpointConfig>,
    server: Arc<ServerConfig>,
    /// For the association crier opens itself, as the DTLS client.
    transport: Arc<TransportConfig>,
}

/// WebRTC retransmits for as long as the association lives (ICE consent ends it).
fn transport() -> TransportConfig {
    TransportConfig::default()
        .with_max_init_retransmits(None)
        .with_max_data_retransmits(None)
        .with_max_receive_message_size(LOCAL_MAX_MESSAGE_SIZE)
}

impl Configs {
    /// For DTLS records of at most `mtu` bytes.
    pub(super) fn new(mtu: usize) -> Configs {
        // What DTLS 1.2 with AES-GCM adds (record header, explicit nonce, tag) and the SCTP
        // common and DATA chunk headers, rounded up (str0m measured 77 bytes).
        const OVERHEAD: usize = 88;
        let mut endpoint = EndpointConfig::default();
        endpoint.max_payload_size(mtu.saturating_sub(OVERHEAD) as u32);
        let mut server = ServerConfig::default();
        let transport = Arc::new(transport());
        server.transport = transport.clone();
        Configs {
            endpoint: Arc::new(endpoint),
            server: Arc::new(server),
            transport,
        }
    }
}

/// What the association tells the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChannelEvent {
    /// The client's first data channel is open.
    Opened,
    /// It was closed (a stream reset), or the association is gone.
    Closed,
}

/// Why a message was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriteError {
    /// Larger than the peer's `max-message-size`: it never will be.
    TooLarge,
    /// No channel to write to any more.
    Closed,
}

pub(super) struct Sctp {
    endpoint: Endpoint,
    assoc: Option<(AssociationHandle, Association)>,
    /// The stream id of the client's first data channel, once DCEP opened it.
    channel: Option<u16>,
    /// The peer's `max-message-size`.
    remote_max: u32,
}

impl Sctp {
    pub(super) fn new(cfg: &Configs, remote_max: u32) -> Sctp {
        Sctp {
            endpoint: Endpoint::new(cfg.endpoint.clone(), Some(cfg.server.clone())),
            assoc: None,
            channel: None,
            remote_max,
        }
    }

    pub(super) fn is_open(&self) -> bool {
        self.channel.is_some()
    }

    /// Opens the association (INIT) to the peer's `port`: the DTLS client's part, as
    /// libwebrtc and str0m expect (a browser that is the DTLS server waits for it).
    pub(super) fn connect(&mut self, cfg: &Configs, port: u16) {
        if self.assoc.is_some() {
            return;
        }
        let transport = if port == super::sdp::SCTP_PORT {
            cfg.transport.clone()
        } else {
            Arc::new(transport().with_remote_port(port))
        };
        let mut client = ClientConfig::new();
        client.transport = transport;
        match self.endpoint.connect(client, PEER) {
            Ok(a) => self.assoc = Some(a),
            Err(e) => tracing::debug!("webrtc: sctp connect: {e}"),
        }
    }

    /// One SCTP packet, from a DTLS record.
    pub(super) fn input(&mut self, now: Instant, packet: Bytes) {
        let Some((handle, event)) = self.endpoint.handle(now, PEER, None, None, packet) else {
            return;
        };
        match event {
            // A client that resends its INIT (a slow network) must not replace the
            // association it already has.
            DatagramEvent::NewAssociation(a) if self.assoc.is_none() => {
                self.assoc = Some((handle, a));
            }
            DatagramEvent::NewAssociation(_) => {}
            DatagramEvent::AssociationEvent(e) => {
                if let Some((h, a)) = self.assoc.as_mut() {
                    if *h == handle {
                        a.handle_event(e);
                    }
                }
            }
        }
        self.exchange();
    }

    pub(super) fn timeout(&mut self, now: Instant) {
        if let Some((_, a)) = self.assoc.as_mut() {
            a.handle_timeout(now);
        }
        self.exchange();
    }

    /// When [`Sctp::timeout`] is due.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.assoc.as_ref().and_then(|(_, a)| a.poll_timeout())
    }

    /// The association's bookkeeping with its endpoint (closing, ids).
    fn exchange(&mut self) {
        let Some((h, a)) = self.assoc.as_mut() else {
            return;
        };
        while let Some(e) = a.poll_endpoint_event() {
            if let Some(back) = self.endpoint.handle_event(*h, e) {
                a.handle_event(back);
            }
        }
    }

    /// The next SCTP packets to send (each goes in one DTLS record).
    pub(super) fn poll_transmit(&mut self, now: Instant) -> Option<Vec<Bytes>> {
        loop {
            let t = match self.endpoint.poll_transmit() {
                Some(t) => t,
                None => self.assoc.as_mut()?.1.poll_transmit(now)?,
            };
            if let Payload::RawEncode(packets) = t.payload {
                return Some(packets);
            }
        }
    }

    /// Handles what the association has to say: DCEP opens are answered here; the first
    /// open channel and its end are reported.
    pub(super) fn poll_event(&mut self) -> Option<ChannelEvent> {
        loop {
            let (_, a) = self.assoc.as_mut()?;
            // Streams the client opened, as they are accepted: read like any other.
            let ev = match a.accept_stream() {
                Some(s) => Event::Stream(StreamEvent::Readable {
                    id: s.stream_identifier(),
                }),
                None => a.poll()?,
            };
            match ev {
                Event::Connected => a.set_max_send_message_size(self.remote_max),
                Event::AssociationLost { .. } | Event::HandshakeFailed { .. } => {
                    self.channel = None;
                    self.assoc = None;
                    return Some(ChannelEvent::Closed);
                }
                Event::Stream(StreamEvent::Readable { id } | StreamEvent::Opened { id }) => {
                    if let Some(e) = self.read(id) {
                        return Some(e);
                    }
                }
                Event::Stream(StreamEvent::Finished { id } | StreamEvent::Stopped { id, .. })
                    if self.channel == Some(id) =>
                {
                    self.channel = None;
                    return Some(ChannelEvent::Closed);
                }
                _ => {}
            }
        }
    }

    /// Reads everything waiting on stream `id`: a DCEP open is acknowledged (and the first
    /// makes the channel), anything else is dropped.
    fn read(&mut self, id: u16) -> Option<ChannelEvent> {
        let (_, a) = self.assoc.as_mut()?;
        let mut opened = None;
        loop {
            let Ok(mut s) = a.stream(id) else {
                return opened;
            };
            let chunks = match s.read_sctp() {
                Ok(Some(c)) => c,
                _ => return opened,
            };
            if chunks.ppi != Ppi::Dcep {
                continue;
            }
            let mut msg = vec![0u8; chunks.len()];
            if chunks.read(&mut msg).is_err() || msg.first() != Some(&DATA_CHANNEL_OPEN) {
                continue;
            }
            let Some((unordered, kind, param)) = reliability(&msg) else {
                continue;
            };
            // The channel the client asked for: its ordering and reliability are ours to
            // keep when we send on it.
            if s.set_reliability_params(unordered, kind, param).is_err()
                || s.write_with_ppi(&[DATA_CHANNEL_ACK], Ppi::Dcep).is_err()
            {
                continue;
            }
            if self.channel.is_none() {
                self.channel = Some(id);
                opened = Some(ChannelEvent::Opened);
            }
        }
    }

    /// Sends `msg` as a text message on the channel: false when the send buffer is too full
    /// for it now (it is taken once the peer's acks drain it).
    pub(super) fn write(&mut self, msg: &[u8]) -> Result<bool, WriteError> {
        let (Some(id), Some((_, a))) = (self.channel, self.assoc.as_mut()) else {
            return Err(WriteError::Closed);
        };
        if msg.len() as u64 > u64::from(self.remote_max) {
            return Err(WriteError::TooLarge);
        }
        let mut s = a.stream(id).map_err(|_| WriteError::Closed)?;
        let buffered = s.buffered_amount().unwrap_or(0);
        // One message larger than the mark goes alone, on an empty buffer.
        if buffered > 0 && buffered + msg.len() > MAX_BUFFERED {
            return Ok(false);
        }
        let ppi = if msg.is_empty() {
            Ppi::StringEmpty
        } else {
            Ppi::String
        };
        // An empty message is sent as one zero byte with its own PPI (RFC 8831 §6.6).
        let payload: &[u8] = if msg.is_empty() { &[0] } else { msg };
        match s.write_with_ppi(payload, ppi) {
            Ok(_) => Ok(true),
            Err(sctp_proto::Error::ErrOutboundPacketTooLarge) => Err(WriteError::TooLarge),
            Err(_) => Err(WriteError::Closed),
        }
    }

    /// Starts the SCTP shutdown (what is in flight is delivered first).
    pub(super) fn shutdown(&mut self) {
        if let Some((_, a)) = self.assoc.as_mut() {
            if !a.is_closing() && !a.is_closed() {
                let _ = a.shutdown();
            }
        }
    }

    /// No association, or one that has ended.
    pub(super) fn is_closed(&self) -> bool {
        self.assoc.as_ref().is_none_or(|(_, a)| a.is_closed())
    }
}

/// A DATA_CHANNEL_OPEN's ordering and reliability (RFC 8832 §5.1): (unordered, type,
/// parameter). None when it is too short to be one.
fn reliability(open: &[u8]) -> Option<(bool, ReliabilityType, u32)> {
    let channel_type = *open.get(1)?;
    let param = u32::from_be_bytes(open.get(4..8)?.try_into().ok()?);
    Some((
        channel_type & 0x80 != 0,
        ReliabilityType::from(channel_type & 0x7f),
        param,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_dcep_opens_reliability() {
        let open = [0x03, 0x81, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0];
        assert_eq!(reliability(&open), Some((true, ReliabilityType::Rexmit, 3)));
        let open = [
            0x03, 0x00, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, b'c', b'r', b'i', b'e', b'r',
        ];
        assert_eq!(
            reliability(&open),
            Some((false, ReliabilityType::Reliable, 0))
        );
        assert_eq!(reliability(&[0x03, 0x00, 0, 0]), None);
    }
}
