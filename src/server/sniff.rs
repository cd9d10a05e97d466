//! The first bytes of a plain-TCP connection, looked at without consuming them: the h2
//! preface (prior knowledge), an SSE subscription the fast path takes, or anything else for
//! HTTP/1.1 (the proxy fast path, then hyper). hyper's connections then get the socket
//! directly; hyper-util's auto builder would re-feed the sniffed bytes and grow its buffer.

use tokio::net::TcpStream;

use super::fast_sse::{self, FastSse};
use super::{Live, State};
use crate::model::ConnInfo;

/// What the first bytes of a plain-TCP connection say.
pub(super) enum FirstBytes {
    /// Nothing arrived within the header timeout, or the peer closed.
    Nothing,
    H2,
    /// An SSE subscription the fast path serves (its request head already consumed).
    Sse(Box<FastSse>),
    /// The fast path answered the request itself (a refusal) and closed.
    Answered,
    H1,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The fast path needs the whole request head in one peek; larger heads go to hyper.
const PEEK: usize = 4096;

/// Waits (bounded by the header timeout) for the first bytes and looks at them without
/// consuming them, unless the SSE fast path takes the connection.
pub(super) async fn first_bytes(
    stream: &mut TcpStream,
    state: &State,
    live: &Live,
    conn: &ConnInfo,
) -> FirstBytes {
    let timeout = live.http.header_timeout;
    let mut buf = vec![0u8; PEEK];
    // The timeout bounds the peek itself: tokio reports a fresh socket readable before any
    // byte has arrived, so `readable()` alone does not wait for a silent client.
    let n = match tokio::time::timeout(timeout, stream.peek(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => n,
        _ => return FirstBytes::Nothing,
    };
    let head = &buf[..n];
    if head.len() >= 3 && H2_PREFACE.starts_with(&head[..head.len().min(H2_PREFACE.len())]) {
        return FirstBytes::H2;
    }
    let Some(sse) = fast_sse::parse_head(head, live) else {
        return FirstBytes::H1;
    };
    // Boxed: the admission (perhaps a whole upstream auth request) takes memory only while it
    // runs, not in every connection's task for as long as the connection lives.
    Box::pin(fast_sse::admit(stream, state, live, conn, sse, buf)).await
}
