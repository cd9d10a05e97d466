//! A raw HTTP/1.1 client over TCP, for what a real client library hides: the framing headers
//! of a response, hop-by-hop request headers, several requests on one connection, and
//! requests that never finish.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long any single read in this module may wait before the test fails.
const READ_LIMIT: Duration = Duration::from_secs(15);

pub struct RawConn {
    stream: BufReader<TcpStream>,
}

/// One response as it came over the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// The status line and headers, as received.
    pub head: String,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The decoded body (de-chunked).
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What a read on a connection found.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadEnd {
    /// The server closed the connection (EOF or reset); carries whatever came before.
    Closed(Vec<u8>),
    /// Nothing more within the wait.
    StillOpen(Vec<u8>),
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        RawConn {
            stream: BufReader::new(s),
        }
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream
            .get_mut()
            .write_all(bytes.as_ref())
            .await
            .expect("write request");
    }

    /// Sends what it can; false once the server has closed the connection.
    pub async fn try_send(&mut self, bytes: impl AsRef<[u8]>) -> bool {
        self.stream
            .get_mut()
            .write_all(bytes.as_ref())
            .await
            .is_ok()
    }

    /// Sends `GET path` with `Host: test` and reads the response.
    pub async fn get(&mut self, path: &str) -> RawResponse {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"))
            .await;
        self.read_response().await
    }

    /// Reads one response: head, then a body framed by Content-Length or chunked encoding
    /// (or, with neither, until the server closes).
    pub async fn read_response(&mut self) -> RawResponse {
        tokio::time::timeout(READ_LIMIT, self.read_response_inner())
            .await
            .expect("a response within the read limit")
    }

    async fn read_response_inner(&mut self) -> RawResponse {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            let n = self.stream.read_line(&mut line).await.expect("read head");
            assert!(n > 0, "connection closed inside a response head: {head:?}");
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut resp = RawResponse {
            status,
            head,
            headers,
            body: Vec::new(),
        };
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if status < 200 || status == 204 || status == 304 {
            return resp;
        }
        if chunked {
            resp.body = self.read_chunked().await;
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().expect("content-length");
            let mut body = vec![0; len];
            self.stream.read_exact(&mut body).await.expect("read body");
            resp.body = body;
        } else {
            self.stream
                .read_to_end(&mut resp.body)
                .await
                .expect("read body to end");
        }
        resp
    }

    async fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let mut size_line = String::new();
            self.stream
                .read_line(&mut size_line)
                .await
                .expect("chunk size");
            let size_hex = size_line.trim().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size_hex, 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {size_line:?}"));
            if size == 0 {
                // Trailers (none expected), then the final CRLF.
                loop {
                    let mut l = String::new();
                    self.stream.read_line(&mut l).await.expect("trailer");
                    if l == "\r\n" || l.is_empty() {
                        return body;
                    }
                }
            }
            let start = body.len();
            body.resize(start + size + 2, 0);
            self.stream
                .read_exact(&mut body[start..])
                .await
                .expect("chunk data");
            assert_eq!(&body[start + size..], b"\r\n", "chunk not followed by CRLF");
            body.truncate(start + size);
        }
    }

    /// Reads exactly `n` bytes (WebSocket frames after an upgrade).
    pub async fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        tokio::time::timeout(READ_LIMIT, self.stream.read_exact(&mut buf))
            .await
            .expect("bytes within the read limit")
            .expect("read bytes");
        buf
    }

    /// Reads until the server closes the connection or `within` passes.
    pub async fn read_until_closed(&mut self, within: Duration) -> ReadEnd {
        let mut got = Vec::new();
        let end = tokio::time::Instant::now() + within;
        loop {
            let mut buf = [0u8; 4096];
            match tokio::time::timeout_at(end, self.stream.read(&mut buf)).await {
                Err(_) => return ReadEnd::StillOpen(got),
                Ok(Ok(0)) | Ok(Err(_)) => return ReadEnd::Closed(got),
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
        }
    }
}

/// One request (head and a Content-Length body) read off a raw connection into `buf`, for
/// test upstreams that must see the bytes as sent; None when the peer closed.
pub async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let len: usize = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                return Some(head + &body);
            }
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
