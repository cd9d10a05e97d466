//! The fast path's upstream connections: raw TCP or Unix sockets, pooled (LIFO, the warmest
//! first), each with the bytes read from it but not yet passed on.

use std::io;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{UpstreamAddr, UpstreamConfig};

/// The upstream read buffer: response heads and body pieces.
const UPSTREAM_BUF: usize = 16 * 1024;

pub(super) enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl AsyncRead for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Io::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Io::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Io::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Io::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Io {
    /// Nothing arrived while the connection sat in the pool: no EOF, and no unsolicited bytes
    /// (some servers write a `408` before closing an idle connection, which would otherwise
    /// be read as the answer to the next request). One non-blocking read, and only a real
    /// syscall when the reactor saw the socket readable.
    fn is_quiet(&self) -> bool {
        let mut probe = [0u8; 1];
        let r = match self {
            Io::Tcp(s) => s.try_read(&mut probe),
            Io::Unix(s) => s.try_read(&mut probe),
        };
        matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// One upstream connection and what has been read from it but not yet passed on.
pub(super) struct Upstream {
    pub(super) io: Io,
    pub(super) buf: Vec<u8>,
    /// `buf[pos..]` is unread.
    pub(super) pos: usize,
    idle_since: Instant,
}

impl Upstream {
    pub(super) fn unread(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Reads more into the buffer (compacting it first); 0 means the upstream closed.
    pub(super) async fn fill(&mut self, limit: usize) -> io::Result<usize> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.len() >= limit {
            return Err(io::Error::other("response head too large"));
        }
        if self.buf.capacity() == self.buf.len() {
            self.buf.reserve(UPSTREAM_BUF.min(limit - self.buf.len()));
        }
        self.io.read_buf(&mut self.buf).await
    }
}

/// Idle upstream connections of the fast path (LIFO: the warmest first), one list per event
/// loop and one for the runtime's workers: a connection goes back to the loop that used it, so
/// its socket stays on that loop's epoll (`crate::event_loop`).
pub struct Pool {
    idle: Box<[Mutex<Vec<Upstream>>]>,
    addr: UpstreamAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
}

impl Pool {
    /// `loops`: the number of event loops running.
    pub fn new(cfg: &UpstreamConfig, loops: usize) -> Pool {
        Pool {
            idle: (0..=loops).map(|_| Mutex::new(Vec::new())).collect(),
            addr: cfg.url.clone(),
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.pool_idle_timeout,
            max_idle: cfg.pool_max_idle,
        }
    }

    /// The caller's list: its loop's, or the workers' (index 0). `loops` is the number
    /// running, so every loop has its own; the modulo only keeps an index in range.
    fn idle(&self) -> &Mutex<Vec<Upstream>> {
        &self.idle[crate::event_loop::current() % self.idle.len()]
    }

    pub(super) fn checkout(&self) -> Option<Upstream> {
        loop {
            let u = {
                let mut idle = self.idle().lock();
                let u = idle.pop()?;
                if u.idle_since.elapsed() >= self.idle_timeout {
                    // Older ones are below it: drop them all.
                    idle.clear();
                    return None;
                }
                u
            };
            if u.io.is_quiet() {
                return Some(u);
            }
        }
    }

    pub(super) fn checkin(&self, mut u: Upstream) {
        u.idle_since = Instant::now();
        u.pos = 0;
        u.buf.clear();
        let mut idle = self.idle().lock();
        if idle.len() < self.max_idle {
            idle.push(u);
        }
    }

    pub(super) async fn connect(&self) -> io::Result<Upstream> {
        let io = tokio::time::timeout(self.connect_timeout, async {
            match &self.addr {
                UpstreamAddr::Http { authority } => {
                    let s = TcpStream::connect(authority.as_str()).await?;
                    s.set_nodelay(true)?;
                    Ok::<_, io::Error>(Io::Tcp(s))
                }
                UpstreamAddr::Unix(path) => Ok(Io::Unix(UnixStream::connect(path).await?)),
            }
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        Ok(Upstream {
            io,
            buf: Vec::with_capacity(UPSTREAM_BUF),
            pos: 0,
            idle_since: Instant::now(),
        })
    }
}
