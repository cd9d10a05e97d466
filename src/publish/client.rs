//! The client `crier publish` uses: one request to the publish API, over its Unix socket or
//! TCP.

use std::path::PathBuf;

use bytes::Bytes;
use http::header;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::EVENT_HEADER;

/// Where `crier publish` sends to.
pub enum Target {
    Socket(PathBuf),
    /// `http://127.0.0.1:8081`
    Url(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("{0} is not an http:// URL with host:port")]
    BadUrl(String),
    #[error("request failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
}

/// Sends one request to the publish API; returns the status and the body text. `token` goes
/// in `Authorization: Bearer` (TCP with `publish.token_file`).
pub async fn client_request(
    target: &Target,
    method: Method,
    channel: &str,
    event: Option<&str>,
    token: Option<&str>,
    body: Bytes,
) -> Result<(StatusCode, String), ClientError> {
    let (io, host): (Box<dyn IoStream>, String) = match target {
        Target::Socket(p) => {
            let s = tokio::net::UnixStream::connect(p)
                .await
                .map_err(|e| ClientError::Connect(p.display().to_string(), e))?;
            (Box::new(s), "localhost".into())
        }
        Target::Url(u) => {
            let authority = u
                .strip_prefix("http://")
                .map(|a| a.trim_end_matches('/'))
                .filter(|a| !a.is_empty() && !a.contains('/'))
                .ok_or_else(|| ClientError::BadUrl(u.clone()))?;
            let s = tokio::net::TcpStream::connect(authority)
                .await
                .map_err(|e| ClientError::Connect(authority.to_string(), e))?;
            (Box::new(s), authority.to_string())
        }
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(format!("/pub/{channel}"))
        .header(header::HOST, host);
    if let Some(e) = event {
        req = req.header(EVENT_HEADER, e);
    }
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = sender.send_request(req.body(Full::new(body))?).await?;
    let status = resp.status();
    let text = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> IoStream for T {}
