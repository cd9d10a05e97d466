//! The pooled hyper-util client to the upstream app (TCP or a Unix socket, as configured):
//! the proxy and forward auth each make one, with their own body type and their own pool.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{UpstreamAddr, UpstreamConfig};
use crate::response::BoxError;

/// A pooled client to the upstream (TCP or Unix socket, as configured) and the base of its
/// request URIs: `http://host:port`, or `http://localhost` for a Unix socket. The proxy and
/// forward auth each make one, with their own body type and their own pool.
pub fn upstream_client<B>(cfg: &UpstreamConfig) -> (Client<UpstreamConnector, B>, String)
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let (connector, base) = match &cfg.url {
        UpstreamAddr::Http { authority } => {
            let mut c = HttpConnector::new();
            c.set_connect_timeout(Some(cfg.connect_timeout));
            c.set_nodelay(true);
            c.set_keepalive(Some(Duration::from_secs(60)));
            (UpstreamConnector::Tcp(c), format!("http://{authority}"))
        }
        UpstreamAddr::Unix(path) => (
            UpstreamConnector::Unix {
                path: Arc::new(path.clone()),
                timeout: cfg.connect_timeout,
            },
            "http://localhost".to_string(),
        ),
    };
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(cfg.pool_idle_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector);
    (client, base)
}

/// TCP or Unix socket: one pooled client type for both.
#[derive(Clone)]
pub enum UpstreamConnector {
    Tcp(HttpConnector),
    Unix {
        path: Arc<PathBuf>,
        timeout: Duration,
    },
}

pub enum UpstreamIo {
    Tcp(TokioIo<TcpStream>),
    Unix(TokioIo<UnixStream>),
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match self {
            UpstreamConnector::Tcp(c) => {
                let fut = c.call(uri);
                Box::pin(async move { Ok(UpstreamIo::Tcp(fut.await?)) })
            }
            UpstreamConnector::Unix { path, timeout } => {
                let (path, timeout) = (path.clone(), *timeout);
                Box::pin(async move {
                    let s = tokio::time::timeout(timeout, UnixStream::connect(path.as_path()))
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "connect timed out")
                        })??;
                    Ok(UpstreamIo::Unix(TokioIo::new(s)))
                })
            }
        }
    }
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        match self {
            UpstreamIo::Tcp(s) => s.connected(),
            UpstreamIo::Unix(_) => Connected::new(),
        }
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Tcp(s) => s.is_write_vectored(),
            UpstreamIo::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
