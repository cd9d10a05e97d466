//! The raw HTTP/1.1 client pieces the streaming clients share (SSE and WebSocket subscribers,
//! the slow reader, the WebSocket publisher): a socket bound to a loopback source address, one
//! read buffer per connection, a response-head reader, a chunked decoder and a line splitter.
//! Hand-written rather than hyper's client so that 19,000 connections cost one task, one socket
//! and one small buffer each.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;

use base64::Engine;
use hyper_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use hyper_tungstenite::WebSocketStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::subscriber::now_ns;

/// Opens a TCP connection, from `src` when given (bind before connect, the port picked at
/// connect time so each source address offers the whole ephemeral range), with SO_LINGER 0 so
/// closing at the end of a run resets instead of leaving tens of thousands of TIME_WAITs.
pub async fn connect(addr: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    connect_with(addr, src, None).await
}

/// [`connect`] with a receive buffer size set before connecting (a small one makes a slow
/// reader's slowness reach the server soon, not after the kernel's megabytes).
pub async fn connect_with(
    addr: SocketAddr,
    src: Option<Ipv4Addr>,
    recv_buffer: Option<u32>,
) -> io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if let Some(n) = recv_buffer {
        sock.set_recv_buffer_size(n)?;
    }
    let fd = sock.as_raw_fd();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: fd is a valid socket owned by `sock`; the option values are plain C structs.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    if let Some(ip) = src {
        let one: libc::c_int = 1;
        // SAFETY: as above.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(SocketAddr::from((ip, 0)))?;
    }
    let s = sock.connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A raw HTTP/1.1 connection with one read buffer.
pub struct Raw {
    pub s: TcpStream,
    pub buf: Vec<u8>,
    pub len: usize,
}

pub struct Head {
    pub status: u16,
    pub chunked: bool,
    /// Where the body starts in `buf`.
    pub body_at: usize,
    /// The head, lowercased (for the few headers a client looks at).
    lower: String,
}

impl Head {
    /// The value of the first header `name` (lowercase), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.lower.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim())
        })
    }
}

impl Raw {
    pub fn new(s: TcpStream, cap: usize) -> Self {
        Raw {
            s,
            buf: vec![0; cap],
            len: 0,
        }
    }

    pub async fn read_head(&mut self) -> io::Result<Head> {
        loop {
            if let Some(i) = self.buf[..self.len]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                let head = String::from_utf8_lossy(&self.buf[..i]).to_ascii_lowercase();
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let chunked = head.lines().any(|l| {
                    l.strip_prefix("transfer-encoding:")
                        .is_some_and(|v| v.contains("chunked"))
                });
                return Ok(Head {
                    status,
                    chunked,
                    body_at: i + 4,
                    lower: head,
                });
            }
            if self.len == self.buf.len() {
                if self.buf.len() >= 64 * 1024 {
                    return Err(io::Error::other("response head too large"));
                }
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let n = self.s.read(&mut self.buf[self.len..]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the response head",
                ));
            }
            self.len += n;
        }
    }
}

/// Chunked transfer-coding decoder state.
pub enum Dechunk {
    Identity,
    Size { n: u64, ext: bool },
    SizeLf { n: u64 },
    Data(u64),
    DataCr,
    DataLf,
    Done,
}

impl Dechunk {
    /// The decoder for a response with this head.
    pub fn for_head(h: &Head) -> Self {
        if h.chunked {
            Dechunk::Size { n: 0, ext: false }
        } else {
            Dechunk::Identity
        }
    }

    /// Feeds raw body bytes; calls `out` with decoded data. False once the body has ended.
    pub fn feed(&mut self, mut d: &[u8], out: &mut impl FnMut(&[u8])) -> bool {
        while !d.is_empty() {
            match self {
                Dechunk::Identity => {
                    out(d);
                    return true;
                }
                Dechunk::Data(n) => {
                    let take = (*n).min(d.len() as u64) as usize;
                    out(&d[..take]);
                    d = &d[take..];
                    *n -= take as u64;
                    if *n == 0 {
                        *self = Dechunk::DataCr;
                    }
                }
                Dechunk::Done => return false,
                _ => {
                    let b = d[0];
                    d = &d[1..];
                    *self = match std::mem::replace(self, Dechunk::Done) {
                        Dechunk::Size { n, ext } => match b {
                            b'\r' => Dechunk::SizeLf { n },
                            b'\n' if n == 0 => Dechunk::Done,
                            b'\n' => Dechunk::Data(n),
                            b';' => Dechunk::Size { n, ext: true },
                            _ if ext => Dechunk::Size { n, ext },
                            _ => match (b as char).to_digit(16) {
                                Some(v) => Dechunk::Size {
                                    n: n * 16 + u64::from(v),
                                    ext,
                                },
                                None => Dechunk::Size { n, ext: true },
                            },
                        },
                        Dechunk::SizeLf { n: 0 } => Dechunk::Done,
                        Dechunk::SizeLf { n } => Dechunk::Data(n),
                        Dechunk::DataCr if b == b'\n' => Dechunk::Size { n: 0, ext: false },
                        Dechunk::DataCr => Dechunk::DataLf,
                        Dechunk::DataLf => Dechunk::Size { n: 0, ext: false },
                        other => other,
                    };
                }
            }
        }
        !matches!(self, Dechunk::Done)
    }
}

/// Splits a byte stream into lines (LF, with an optional CR before it).
#[derive(Default)]
pub struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    pub fn feed(&mut self, d: &[u8], on_line: &mut impl FnMut(&[u8])) {
        let mut start = 0;
        while let Some(i) = d[start..].iter().position(|&b| b == b'\n') {
            let end = start + i;
            if self.partial.is_empty() {
                on_line(strip_cr(&d[start..end]));
            } else {
                self.partial.extend_from_slice(&d[start..end]);
                let line = std::mem::take(&mut self.partial);
                on_line(strip_cr(&line));
                self.partial = line;
                self.partial.clear();
            }
            start = end + 1;
        }
        self.partial.extend_from_slice(&d[start..]);
    }
}

fn strip_cr(l: &[u8]) -> &[u8] {
    l.strip_suffix(b"\r").unwrap_or(l)
}

/// The SSE request: `GET path` with `Accept: text/event-stream` and any extra header lines
/// (each ending in CRLF), e.g. `Last-Event-ID`.
pub fn sse_request(path: &str, host: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n{extra}\r\n"
    )
}

/// The WebSocket upgrade request.
pub fn ws_request(path: &str, host: &str) -> String {
    let key = base64::engine::general_purpose::STANDARD.encode(rand_key());
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
    )
}

/// Sends `req` and reads the response head.
pub async fn request(raw: &mut Raw, req: &str) -> io::Result<Head> {
    raw.s.write_all(req.as_bytes()).await?;
    raw.read_head().await
}

/// Turns a connection that answered 101 into a client WebSocket (small buffers: one per
/// subscriber; writes go out at once).
pub async fn into_ws(raw: Raw, head: &Head) -> WebSocketStream<TcpStream> {
    let rest = raw.buf[head.body_at..raw.len].to_vec();
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    WebSocketStream::from_partially_read(raw.s, rest, Role::Client, Some(cfg)).await
}

/// Reads more body bytes into the buffer's start; 0 at EOF.
pub async fn read_some(raw: &mut Raw) -> io::Result<usize> {
    raw.s.read(&mut raw.buf).await
}

fn rand_key() -> [u8; 16] {
    let n = now_ns().to_le_bytes();
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&n);
    k[8..].copy_from_slice(&(std::process::id() as u64).to_le_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunk_across_splits() {
        let wire = b"5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\n\r\n";
        for split in 0..wire.len() {
            let mut d = Dechunk::Size { n: 0, ext: false };
            let mut got = Vec::new();
            d.feed(&wire[..split], &mut |b: &[u8]| got.extend_from_slice(b));
            let more = d.feed(&wire[split..], &mut |b: &[u8]| got.extend_from_slice(b));
            assert_eq!(got, b"hello, world", "split at {split}");
            assert!(!more);
        }
    }
}
