//! The request side of the fast path: a request head parsed once (httparse) and, when the
//! fast path takes it, rewritten straight into the bytes the upstream gets, by the proxy's
//! one set of rewrite rules (`proxy::rewrite`).

use super::Request;
use crate::model::ConnInfo;
use crate::proxy::rewrite::{forwarded_for, value_has_token, HopByHop};

/// Most request headers the fast path parses; a request with more goes to hyper (which
/// applies `server.max_headers`).
pub(super) const MAX_HEADERS: usize = 64;

pub(crate) enum Prepared {
    Ready(Request),
    Partial,
    NotOurs,
}

/// Parses the request head at the start of `buf` and, when the fast path takes it, writes
/// the head the upstream gets into `out`.
pub(crate) fn prepare(
    buf: &[u8],
    conn: &ConnInfo,
    out: &mut Vec<u8>,
    (max_bytes, max_headers): (usize, usize),
    proxies: impl Fn(&str, &str) -> bool,
) -> Prepared {
    if buf.is_empty() {
        return Prepared::Partial;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Prepared::Partial,
        Err(_) => return Prepared::NotOurs,
    };
    // Over the configured limits: hyper answers 431.
    if head_len > max_bytes || req.headers.len() > max_headers {
        return Prepared::NotOurs;
    }
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Prepared::NotOurs;
    };
    let head_only = match method {
        "GET" | "OPTIONS" => false,
        "HEAD" => true,
        _ => return Prepared::NotOurs,
    };
    if !target.starts_with('/') {
        return Prepared::NotOurs;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let mut host: Option<&[u8]> = None;
    let mut close = false;
    for h in req.headers.iter() {
        let n = h.name;
        if n.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Prepared::NotOurs;
            }
            host = Some(h.value);
        } else if n.eq_ignore_ascii_case("content-length") {
            if h.value != b"0" {
                return Prepared::NotOurs;
            }
        } else if n.eq_ignore_ascii_case("transfer-encoding")
            || n.eq_ignore_ascii_case("upgrade")
            || n.eq_ignore_ascii_case("expect")
        {
            return Prepared::NotOurs;
        } else if n.eq_ignore_ascii_case("connection") && value_has_token(h.value, b"close") {
            close = true;
        }
    }
    let Some(host) = host else {
        return Prepared::NotOurs; // hyper answers 400
    };
    if !proxies(method, path) {
        return Prepared::NotOurs;
    }
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut prior_xff: Vec<&[u8]> = Vec::new();
    let hop = HopByHop::of_parsed(req.headers);
    for h in req.headers.iter() {
        if hop.strips(h.name) {
            continue;
        }
        if h.name.eq_ignore_ascii_case("x-forwarded-for") {
            prior_xff.push(h.value);
            continue;
        }
        if h.name.eq_ignore_ascii_case("x-forwarded-proto")
            || h.name.eq_ignore_ascii_case("x-forwarded-host")
        {
            continue;
        }
        put_header(out, h.name.as_bytes(), h.value);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    out.extend_from_slice(&forwarded_for(prior_xff.into_iter(), conn));
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(conn.scheme().as_bytes());
    out.extend_from_slice(b"\r\n");
    put_header(out, b"x-forwarded-host", host);
    out.extend_from_slice(b"\r\n");
    Prepared::Ready(Request {
        head_len,
        head_only,
        close,
    })
}

pub(super) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: (usize, usize) = (8192, 64);

    fn conn() -> ConnInfo {
        ConnInfo {
            peer: "10.1.2.3:5555".parse().expect("addr"),
            tls: false,
        }
    }

    #[test]
    fn request_head_is_rewritten() {
        let mut out = Vec::new();
        let raw = b"GET /a?b=1 HTTP/1.1\r\nHost: app.example\r\nConnection: keep-alive, x-secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Proto: https\r\nAccept: */*\r\n\r\nGET /next";
        let Prepared::Ready(r) = prepare(raw, &conn(), &mut out, LIMITS, |_, p| p == "/a") else {
            panic!("must be taken");
        };
        assert_eq!(r.head_len, raw.len() - 9);
        assert!(!r.close && !r.head_only);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "GET /a?b=1 HTTP/1.1\r\nHost: app.example\r\nAccept: */*\r\nx-forwarded-for: 1.1.1.1, 10.1.2.3\r\nx-forwarded-proto: http\r\nx-forwarded-host: app.example\r\n\r\n"
        );
    }

    #[test]
    fn requests_the_fast_path_leaves_to_hyper() {
        let mut out = Vec::new();
        let not_ours = |raw: &[u8]| {
            matches!(
                prepare(raw, &conn(), &mut out.clone(), LIMITS, |_, _| true),
                Prepared::NotOurs
            )
        };
        assert!(not_ours(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx"
        ));
        assert!(not_ours(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n"));
        assert!(not_ours(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(not_ours(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"));
        assert!(not_ours(
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
        ));
        assert!(not_ours(
            b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(not_ours(
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
        ));
        assert!(not_ours(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(not_ours(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n"));
        assert!(matches!(
            prepare(
                b"GET /live/x HTTP/1.1\r\nHost: a\r\n\r\n",
                &conn(),
                &mut out,
                LIMITS,
                |_, p| !p.starts_with("/live/")
            ),
            Prepared::NotOurs
        ));
        assert!(matches!(
            prepare(
                b"GET / HTTP/1.1\r\nHo",
                &conn(),
                &mut out,
                LIMITS,
                |_, _| true
            ),
            Prepared::Partial
        ));
        // Past server.max_headers / max_header_bytes: hyper answers 431.
        let many: String = (0..10).map(|i| format!("X-{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        for limits in [(8192, 5), (40, 64)] {
            assert!(matches!(
                prepare(raw.as_bytes(), &conn(), &mut out, limits, |_, _| true),
                Prepared::NotOurs
            ));
        }
        assert!(matches!(
            prepare(raw.as_bytes(), &conn(), &mut out, LIMITS, |_, _| true),
            Prepared::Ready(_)
        ));
    }
}
