//! What the proxy changes in the messages it relays, written once for both engines (the
//! hyper path's header maps, the fast path's raw heads): the hop-by-hop headers it drops
//! (RFC 9110 §7.6.1), the `X-Forwarded-*` it adds, and the framing headers it must not keep.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::model::ConnInfo;

/// The hop-by-hop headers every message drops, besides those its `Connection` names.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
];

/// The hop-by-hop headers of one message: the fixed list plus every header its `Connection`
/// names — never `Host`, which a client cannot ask a proxy to drop (`Connection: host` would
/// otherwise leave the upstream without one), nor `Content-Length`: it is the message's
/// framing, and the fast path relays the body by it (`Connection: content-length` on a
/// response made the client read until close while crier kept the connection for the next
/// response: a desync; found by the `http1_response` fuzz target).
pub struct HopByHop<'h> {
    named: Vec<&'h [u8]>,
}

impl<'h> HopByHop<'h> {
    /// From the values of the message's `Connection` headers.
    pub fn new(connection: impl Iterator<Item = &'h [u8]>) -> HopByHop<'h> {
        let named = connection
            .flat_map(|v| v.split(|&b| b == b','))
            .map(|t| t.trim_ascii())
            .filter(|t| {
                !t.is_empty()
                    && !t.eq_ignore_ascii_case(b"host")
                    && !t.eq_ignore_ascii_case(b"content-length")
            })
            .collect();
        HopByHop { named }
    }

    /// Of a head httparse parsed (the fast path).
    pub fn of_parsed(headers: &'h [httparse::Header<'h>]) -> HopByHop<'h> {
        Self::new(
            headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("connection"))
                .map(|h| h.value),
        )
    }

    pub fn of_map(h: &'h HeaderMap) -> HopByHop<'h> {
        Self::new(h.get_all(header::CONNECTION).iter().map(|v| v.as_bytes()))
    }

    /// Whether a header of this name is dropped.
    pub fn strips(&self, name: &str) -> bool {
        HOP_BY_HOP.iter().any(|f| name.eq_ignore_ascii_case(f))
            || self
                .named
                .iter()
                .any(|t| name.as_bytes().eq_ignore_ascii_case(t))
    }
}

/// Removes the hop-by-hop headers from a header map.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let names: Vec<HeaderName> = {
        let hop = HopByHop::of_map(h);
        h.keys()
            .filter(|n| hop.strips(n.as_str()))
            .cloned()
            .collect()
    };
    for n in names {
        h.remove(n);
    }
}

/// The `X-Forwarded-For` value: the prior values, then the client's address.
pub fn forwarded_for<'v>(prior: impl Iterator<Item = &'v [u8]>, conn: &ConnInfo) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    for v in prior {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    use std::io::Write;
    let _ = write!(out, "{}", conn.peer.ip());
    out
}

/// Appends the client's address to `X-Forwarded-For` and sets `X-Forwarded-Proto/-Host`.
pub fn add_forwarded_headers(h: &mut HeaderMap, conn: &ConnInfo) {
    let xff = forwarded_for(
        h.get_all("x-forwarded-for").iter().map(|v| v.as_bytes()),
        conn,
    );
    if let Ok(v) = HeaderValue::from_bytes(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static(conn.scheme()));
    if let Some(host) = h.get(header::HOST).cloned() {
        h.insert("x-forwarded-host", host);
    }
}

/// A comma-separated header lists `token` (case-insensitive).
pub fn header_has_token(h: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .any(|v| value_has_token(v.as_bytes(), token.as_bytes()))
}

/// A comma-separated header value lists `token` (case-insensitive).
pub fn value_has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_host_stays() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret, host"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::HOST, HeaderValue::from_static("app.example"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(h.contains_key("x-kept"));
        assert!(
            h.contains_key(header::HOST),
            "Connection: host never drops Host"
        );
        // Nor does it drop the framing.
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Content-Length"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[header::CONTENT_LENGTH], "5");
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        h.insert(header::HOST, HeaderValue::from_static("app.example"));
        let conn = ConnInfo {
            peer: "192.0.2.7:5555".parse().expect("test setup"),
            tls: true,
        };
        add_forwarded_headers(&mut h, &conn);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "app.example");
    }
}
