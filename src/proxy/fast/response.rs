//! The response side of the fast path: the upstream's response head read and parsed once
//! (httparse), its framing decided, and the head the client gets written by the proxy's one
//! set of rewrite rules (`proxy::rewrite`).

use std::io;

use http::StatusCode;

use super::pool::Upstream;
use super::request::{put_header, MAX_HEADERS};
use super::Request;
use crate::proxy::rewrite::{value_has_token, HopByHop};

/// Largest response head accepted from the upstream.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// How the response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// No length: the body ends when the upstream closes (and the client connection with it).
    UntilClose,
}

/// A parsed response head.
pub(crate) struct ResponseHead {
    pub(crate) status: u16,
    pub(crate) framing: Framing,
    /// The upstream connection can carry another request after this response.
    pub(crate) reusable: bool,
    pub(crate) head_len: usize,
}

/// Reads until a whole response head is buffered, skipping interim (1xx) responses, and
/// writes the head the client gets into `client_head`. The outer Err is I/O (the request may
/// be retried on a fresh connection when nothing came back), the inner one a bad response.
pub(super) async fn read_head(
    up: &mut Upstream,
    req: &Request,
    client_head: &mut Vec<u8>,
) -> io::Result<Result<ResponseHead, &'static str>> {
    loop {
        if !up.unread().is_empty() {
            match parse_response(up.unread(), req, client_head) {
                Parsed::Head(h) => return Ok(Ok(h)),
                Parsed::Interim(n) => {
                    up.pos += n;
                    continue;
                }
                Parsed::Bad(what) => return Ok(Err(what)),
                Parsed::Partial => {}
            }
        }
        let got_some = !up.buf.is_empty();
        match up.fill(MAX_RESPONSE_HEAD).await {
            Ok(0) if got_some => return Ok(Err("connection closed mid-response")),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a response",
                ))
            }
            Ok(_) => {}
            Err(e) if got_some => {
                tracing::debug!("upstream read failed mid-head: {e}");
                return Ok(Err("response head too large or cut"));
            }
            Err(e) => return Err(e),
        }
    }
}

pub(crate) enum Parsed {
    Head(ResponseHead),
    /// A 1xx response of this many bytes, to skip.
    Interim(usize),
    Partial,
    Bad(&'static str),
}

pub(crate) fn parse_response(buf: &[u8], req: &Request, out: &mut Vec<u8>) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS * 2];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Bad("malformed response head"),
    };
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Parsed::Bad("malformed response head");
    };
    // httparse reads any three digits; below 100 is no status (RFC 9110 §15), and written
    // back it would not be three digits (found by the `http1_response` fuzz target).
    if status < 100 {
        return Parsed::Bad("malformed status code");
    }
    if status == 101 {
        return Parsed::Bad("101 Switching Protocols to a request without Upgrade");
    }
    if (100..200).contains(&status) {
        return Parsed::Interim(head_len);
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = version == 0;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let Some(n) = parse_content_length(h.value) else {
                return Parsed::Bad("invalid Content-Length");
            };
            if length.is_some_and(|l| l != n) {
                return Parsed::Bad("conflicting Content-Length headers");
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoding = true;
            // Chunked only counts as the last coding.
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            if value_has_token(h.value, b"close") {
                close = true;
            } else if version == 0 && value_has_token(h.value, b"keep-alive") {
                close = false;
            }
        }
    }
    let no_body = req.head_only || status == 204 || status == 304;
    let framing = if no_body {
        Framing::Empty
    } else if transfer_encoding {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if let Some(n) = length {
        if n == 0 {
            Framing::Empty
        } else {
            Framing::Length(n)
        }
    } else {
        Framing::UntilClose
    };
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    let code = StatusCode::from_u16(status).ok();
    let reason = code
        .and_then(|c| c.canonical_reason())
        .or(resp.reason)
        .unwrap_or("");
    {
        use std::io::Write;
        let _ = write!(out, "{status} {reason}\r\n");
    }
    let hop = HopByHop::of_parsed(resp.headers);
    for h in resp.headers.iter() {
        if hop.strips(h.name) {
            continue;
        }
        // A chunked body keeps its framing; a Content-Length beside it is void (RFC 9112 §6.3).
        if transfer_encoding && h.name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        put_header(out, h.name.as_bytes(), h.value);
    }
    if matches!(framing, Framing::Chunked) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if req.close || matches!(framing, Framing::UntilClose) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Parsed::Head(ResponseHead {
        status,
        framing,
        reusable: !close && !matches!(framing, Framing::UntilClose),
        head_len,
    })
}

/// `Content-Length`, allowing the repeated-equal-values list form (`5, 5`).
fn parse_content_length(v: &[u8]) -> Option<u64> {
    let mut n: Option<u64> = None;
    for part in v.split(|&b| b == b',') {
        let p = part.trim_ascii();
        if p.is_empty() || p.len() > 19 || !p.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let x: u64 = std::str::from_utf8(p).ok()?.parse().ok()?;
        if n.is_some_and(|m| m != x) {
            return None;
        }
        n = Some(x);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::fast::Request;

    #[test]
    fn response_framing() {
        let get = Request {
            head_len: 0,
            head_only: false,
            close: false,
        };
        let head = Request {
            head_only: true,
            ..get
        };
        let mut out = Vec::new();
        let framing =
            |raw: &[u8], req: &Request, out: &mut Vec<u8>| match parse_response(raw, req, out) {
                Parsed::Head(h) => format!(
                    "{:?} reusable={}",
                    match h.framing {
                        Framing::Empty => "empty".to_string(),
                        Framing::Length(n) => format!("len {n}"),
                        Framing::Chunked => "chunked".to_string(),
                        Framing::UntilClose => "close".to_string(),
                    },
                    h.reusable
                ),
                Parsed::Interim(n) => format!("interim {n}"),
                Parsed::Partial => "partial".into(),
                Parsed::Bad(w) => format!("bad {w}"),
            };
        assert_eq!(
            framing(
                b"HTTP/1.0 002 OK\r\nContent-Length: 0\r\n\r\n",
                &get,
                &mut out
            ),
            "bad malformed status code"
        );
        assert_eq!(
            framing(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                &get,
                &mut out
            ),
            "\"len 5\" reusable=true"
        );
        assert_eq!(
            framing(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                &head,
                &mut out
            ),
            "\"empty\" reusable=true"
        );
        assert_eq!(
            framing(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n",
                &get,
                &mut out
            ),
            "\"chunked\" reusable=true"
        );
        assert!(!String::from_utf8_lossy(&out)
            .to_ascii_lowercase()
            .contains("content-length"));
        assert_eq!(
            framing(b"HTTP/1.0 200 OK\r\n\r\n", &get, &mut out),
            "\"close\" reusable=false"
        );
        assert_eq!(
            framing(b"HTTP/1.1 204 No Content\r\n\r\n", &get, &mut out),
            "\"empty\" reusable=true"
        );
        assert_eq!(
            framing(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                &get,
                &mut out
            ),
            "\"len 1\" reusable=false"
        );
        assert_eq!(
            framing(
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
                &get,
                &mut out
            ),
            "interim 40"
        );
        assert_eq!(
            framing(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
                &get,
                &mut out
            ),
            "bad invalid Content-Length"
        );
        assert_eq!(
            framing(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                &get,
                &mut out
            ),
            "bad conflicting Content-Length headers"
        );
        assert_eq!(
            framing(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", &get, &mut out),
            "bad 101 Switching Protocols to a request without Upgrade"
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nContent-Le", &get, &mut out),
            "partial"
        );
        // Hop-by-hop headers do not reach the client.
        let _ = framing(b"HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nX-Kept: 2\r\nContent-Length: 0\r\n\r\n", &get, &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 OK\r\nX-Kept: 2\r\nContent-Length: 0\r\n\r\n"
        );
    }
}
