//! The properties the fuzz targets in `fuzz/` check, one `check_*` function per target: each
//! takes arbitrary bytes and panics when crier breaks the property. They live here, not in the
//! fuzz crate, so the same checks also run on stable over the committed corpora (the test at
//! the end of this file) and a crash found once stays checked by `cargo test`.
//!
//! Only built with the `fuzzing` feature (off by default) or for tests; not an API. Each
//! check compares crier against a reference where one exists: httparse for the HTTP/1 fast
//! path's heads and chunk sizes, an EventSource parser written from the WHATWG spec for SSE,
//! independent re-implementations of the documented grammar for ids, cursors and patterns.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;

use crate::hub::{Message, MessageId};
use crate::model::ConnInfo;
use crate::proxy::fast::chunked::scan_parts;
use crate::proxy::fast::request::{prepare, Prepared};
use crate::proxy::fast::response::{parse_response, Framing, Parsed};
use crate::proxy::fast::Request;
use crate::push::admission::{parse_position, position, Position};

/// A target's check: panics when the property fails for this input.
pub type Check = fn(&[u8]);

/// Every target: its name (the `fuzz/fuzz_targets/NAME.rs` and `fuzz/corpus/NAME/`) and check.
pub const TARGETS: &[(&str, Check)] = &[
    ("http1_request", check_http1_request),
    ("http1_response", check_http1_response),
    ("chunked", check_chunked),
    ("cursor", check_cursor),
    ("config", check_config),
    ("sse", check_sse),
    ("channel_pattern", check_channel_pattern),
    ("webhook_signature", check_webhook_signature),
    ("webpush_subscription", check_webpush_subscription),
    ("webrtc_offer", check_webrtc_offer),
    ("webrtc_stun", check_webrtc_stun),
    ("journal", check_journal),
    ("fanout", check_fanout),
];

/// Splits off the first byte (the target's knobs) from the rest.
fn knobs(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((k, rest)) => (*k, rest),
        None => (0, data),
    }
}

fn parse_req<'h, 'b>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>],
) -> (httparse::Request<'h, 'b>, Option<usize>) {
    let mut req = httparse::Request::new(headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => Some(n),
        _ => None,
    };
    (req, n)
}

fn header_count(h: &[httparse::Header<'_>], name: &str) -> usize {
    h.iter()
        .filter(|x| x.name.eq_ignore_ascii_case(name))
        .count()
}

const FORWARDED: [&str; 3] = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"];

fn is_forwarded(name: &str) -> bool {
    FORWARDED.iter().any(|f| name.eq_ignore_ascii_case(f))
}

/// Names the reference proxy drops: the RFC 9110 §7.6.1 list plus what `Connection` names
/// (never `Host` or `Content-Length`).
fn reference_dropped(h: &[httparse::Header<'_>], name: &str) -> bool {
    const FIXED: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
    ];
    if FIXED.iter().any(|f| name.eq_ignore_ascii_case(f)) {
        return true;
    }
    // `Host` and `Content-Length` stay whatever `Connection` names: dropping the framing
    // would leave the recipient reading to close.
    !name.eq_ignore_ascii_case("host")
        && !name.eq_ignore_ascii_case("content-length")
        && h.iter()
            .filter(|x| x.name.eq_ignore_ascii_case("connection"))
            .flat_map(|x| x.value.split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
}

/// The fast path's request head preparation. When it takes a request, what it writes must be
/// one well-formed HTTP/1.1 head (httparse reads it whole) with the same method and target,
/// exactly one `Host` (the client's), one of each `X-Forwarded-*` (the peer last), no
/// hop-by-hop header, and every other header of the client's, in order. It takes only
/// bodiless GET/HEAD/OPTIONS; bytes after the head change nothing.
pub fn check_http1_request(data: &[u8]) {
    let (k, buf) = knobs(data);
    let conn = ConnInfo {
        peer: if k & 1 == 0 {
            "10.1.2.3:5555".parse().expect("literal address")
        } else {
            "[2001:db8::1]:443".parse().expect("literal address")
        },
        tls: k & 2 != 0,
    };
    let limits = if k & 4 == 0 { (8192, 64) } else { (96, 4) };
    let refuse_live = k & 8 != 0;
    let proxies = |_: &str, path: &str| !(refuse_live && path.starts_with("/live/"));
    let mut out = Vec::new();
    let prepared = prepare(buf, &conn, &mut out, limits, proxies);
    let mut in_headers = [httparse::EMPTY_HEADER; 64];
    let (input, input_len) = parse_req(buf, &mut in_headers);
    match prepared {
        Prepared::Partial => assert!(
            buf.is_empty()
                || matches!(
                    httparse::Request::new(&mut [httparse::EMPTY_HEADER; 64]).parse(buf),
                    Ok(httparse::Status::Partial)
                ),
            "Partial for a head httparse reads whole or refuses"
        ),
        Prepared::NotOurs => {}
        Prepared::Ready(r) => {
            assert_eq!(
                input_len,
                Some(r.head_len),
                "head length differs from httparse"
            );
            assert!(r.head_len <= limits.0 && input.headers.len() <= limits.1);
            let method = input.method.expect("complete head has a method");
            let target = input.path.expect("complete head has a target");
            assert!(
                matches!(method, "GET" | "HEAD" | "OPTIONS"),
                "took {method}"
            );
            assert_eq!(r.head_only, method == "HEAD");
            assert!(target.starts_with('/'));
            assert!(proxies(method, target.split('?').next().unwrap_or(target)));
            let ih = &*input.headers;
            assert_eq!(header_count(ih, "transfer-encoding"), 0);
            assert!(ih
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
                .all(|h| h.value == b"0"));
            assert_eq!(
                header_count(ih, "host"),
                1,
                "took a request without one Host"
            );

            let mut out_headers = [httparse::EMPTY_HEADER; 80];
            let (outp, out_len) = parse_req(&out, &mut out_headers);
            assert_eq!(
                out_len,
                Some(out.len()),
                "upstream head is not one whole head"
            );
            assert_eq!(outp.method, Some(method));
            assert_eq!(outp.path, Some(target));
            assert_eq!(outp.version, Some(1));
            let oh = &*outp.headers;
            let host = ih.iter().find(|h| h.name.eq_ignore_ascii_case("host"));
            let host = host.expect("counted above").value;
            assert_eq!(header_count(oh, "host"), 1);
            for name in FORWARDED {
                assert_eq!(header_count(oh, name), 1, "{name}");
            }
            let get = |name: &str| oh.iter().find(|h| h.name.eq_ignore_ascii_case(name));
            assert_eq!(get("host").map(|h| h.value), Some(host));
            assert_eq!(get("x-forwarded-host").map(|h| h.value), Some(host));
            let scheme: &[u8] = if conn.tls { b"https" } else { b"http" };
            assert_eq!(get("x-forwarded-proto").map(|h| h.value), Some(scheme));
            let xff = get("x-forwarded-for").expect("counted above").value;
            assert!(xff.ends_with(conn.peer.ip().to_string().as_bytes()));
            for h in oh {
                assert!(
                    !reference_dropped(ih, h.name) || is_forwarded(h.name),
                    "hop-by-hop {} reached the upstream",
                    h.name
                );
            }
            // Everything else the client sent, in its order (its X-Forwarded-* are replaced).
            let kept: Vec<_> = ih
                .iter()
                .filter(|h| !reference_dropped(ih, h.name) && !is_forwarded(h.name))
                .map(|h| (h.name, h.value))
                .collect();
            let passed: Vec<_> = oh
                .iter()
                .filter(|h| !is_forwarded(h.name))
                .map(|h| (h.name, h.value))
                .collect();
            assert_eq!(kept, passed);
            // What follows the head does not change it.
            let mut more = buf[..r.head_len].to_vec();
            more.extend_from_slice(b"GET /next HTTP/1.1\r\n");
            let mut out2 = Vec::new();
            let again = prepare(&more, &conn, &mut out2, limits, proxies);
            assert!(matches!(again, Prepared::Ready(ref r2) if r2.head_len == r.head_len));
            assert_eq!(out, out2);
        }
    }
}

/// `Content-Length` as RFC 9110 §8.6 reads it, with the list form of repeated equal values.
fn reference_content_length(values: &[&[u8]]) -> Result<Option<u64>, ()> {
    let mut n = None;
    for v in values {
        for part in v.split(|&b| b == b',') {
            let p = part.trim_ascii();
            if p.is_empty() || !p.iter().all(u8::is_ascii_digit) {
                return Err(());
            }
            let mut x: u64 = 0;
            for d in p {
                x = x
                    .checked_mul(10)
                    .and_then(|x| x.checked_add(u64::from(d - b'0')))
                    .ok_or(())?;
            }
            if n.is_some_and(|m| m != x) {
                return Err(());
            }
            n = Some(x);
        }
    }
    Ok(n)
}

/// How a recipient delimits a response body (RFC 9112 §6.3) from its head alone.
fn reference_framing(head_only: bool, status: u16, h: &[httparse::Header<'_>]) -> Framing {
    if head_only || status == 204 || status == 304 {
        return Framing::Empty;
    }
    let te: Vec<&[u8]> = h
        .iter()
        .filter(|x| x.name.eq_ignore_ascii_case("transfer-encoding"))
        .map(|x| x.value)
        .collect();
    if let Some(last) = te.last() {
        let coding = last.rsplit(|&b| b == b',').next().unwrap_or_default();
        return if coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            Framing::Chunked
        } else {
            Framing::UntilClose
        };
    }
    let cl: Vec<&[u8]> = h
        .iter()
        .filter(|x| x.name.eq_ignore_ascii_case("content-length"))
        .map(|x| x.value)
        .collect();
    match reference_content_length(&cl) {
        Ok(Some(0)) => Framing::Empty,
        Ok(Some(n)) => Framing::Length(n),
        _ => Framing::UntilClose,
    }
}

/// The fast path's response head parsing. What the client gets must be one well-formed
/// HTTP/1.1 head with the upstream's status and no hop-by-hop header, and it must delimit the
/// body exactly as crier relays it: a client reading the rewritten head by RFC 9112 §6.3
/// arrives at the same framing (no response desync). Interim responses are skipped whole.
pub fn check_http1_response(data: &[u8]) {
    let (k, buf) = knobs(data);
    let req = Request {
        head_len: 0,
        head_only: k & 1 != 0,
        close: k & 2 != 0,
    };
    let mut out = Vec::new();
    let parsed = parse_response(buf, &req, &mut out);
    let mut in_headers = [httparse::EMPTY_HEADER; 128];
    let mut input = httparse::Response::new(&mut in_headers);
    let input_status = input.parse(buf);
    match parsed {
        Parsed::Partial => assert!(matches!(input_status, Ok(httparse::Status::Partial))),
        Parsed::Bad(_) => {}
        Parsed::Interim(n) => {
            assert!(matches!(input_status, Ok(httparse::Status::Complete(m)) if m == n));
            assert!(input
                .code
                .is_some_and(|c| (100..200).contains(&c) && c != 101));
        }
        Parsed::Head(h) => {
            assert!(matches!(input_status, Ok(httparse::Status::Complete(m)) if m == h.head_len));
            assert_eq!(input.code, Some(h.status));
            assert!(h.status >= 200);
            let ih = &*input.headers;
            let cls: Vec<&[u8]> = ih
                .iter()
                .filter(|x| x.name.eq_ignore_ascii_case("content-length"))
                .map(|x| x.value)
                .collect();
            // A length crier could not read is refused, never guessed.
            assert!(reference_content_length(&cls).is_ok());
            let expected = reference_framing(req.head_only, h.status, ih);
            assert_eq!(h.framing, expected, "framing differs from RFC 9112 §6.3");
            if h.reusable {
                assert!(!matches!(h.framing, Framing::UntilClose));
            }

            let mut out_headers = [httparse::EMPTY_HEADER; 140];
            let mut outp = httparse::Response::new(&mut out_headers);
            let out_len = outp.parse(&out);
            assert!(
                matches!(out_len, Ok(httparse::Status::Complete(n)) if n == out.len()),
                "client head is not one whole head: {out_len:?}"
            );
            assert_eq!(outp.code, Some(h.status));
            assert_eq!(outp.version, Some(1));
            let oh = &*outp.headers;
            for name in ["connection", "transfer-encoding"] {
                assert!(header_count(oh, name) <= 1, "{name} twice");
            }
            for h2 in oh {
                let ours = h2.name.eq_ignore_ascii_case("connection") && h2.value == b"close"
                    || h2.name.eq_ignore_ascii_case("transfer-encoding") && h2.value == b"chunked";
                assert!(
                    ours || !reference_dropped(ih, h2.name),
                    "hop-by-hop {} reached the client",
                    h2.name
                );
            }
            let client_view = reference_framing(req.head_only, h.status, oh);
            assert_eq!(
                client_view, h.framing,
                "client would frame the body otherwise"
            );
            if req.close || matches!(h.framing, Framing::UntilClose) {
                assert_eq!(header_count(oh, "connection"), 1);
            }
        }
    }
}

/// A chunked body's end as a reference decoder finds it: chunk-size lines by
/// `httparse::parse_chunk_size`, the trailer section by `httparse::parse_headers`.
enum RefChunked {
    Done(usize),
    Partial,
    Bad,
}

fn reference_chunked(b: &[u8]) -> RefChunked {
    let mut i = 0;
    loop {
        let (n, size) = match httparse::parse_chunk_size(&b[i..]) {
            Ok(httparse::Status::Complete(v)) => v,
            Ok(httparse::Status::Partial) => return RefChunked::Partial,
            Err(_) => return RefChunked::Bad,
        };
        i += n;
        if size == 0 {
            break;
        }
        let Some(end) = usize::try_from(size).ok().and_then(|s| s.checked_add(i)) else {
            return RefChunked::Partial;
        };
        if end > b.len() {
            return RefChunked::Partial;
        }
        i = end;
        match b.get(i..i + 2) {
            Some(b"\r\n") => i += 2,
            Some(_) => return RefChunked::Bad,
            None if b[i..].iter().all(|&c| c == b'\r') => return RefChunked::Partial,
            None => return RefChunked::Bad,
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    match httparse::parse_headers(&b[i..], &mut headers) {
        Ok(httparse::Status::Complete((n, _))) => RefChunked::Done(i + n),
        Ok(httparse::Status::Partial) => RefChunked::Partial,
        Err(_) => RefChunked::Bad,
    }
}

/// The chunk scanner. It finds the same end however the body is split across reads, and
/// wherever both it and the reference decoder come to an end of the body, the ends agree: no
/// input that one ends and the other reads on from (response desync). A body built valid
/// from the input (knob bit 0) is always read to its exact end.
pub fn check_chunked(data: &[u8]) {
    let (k, rest) = knobs(data);
    let built;
    let body: &[u8] = if k & 1 == 1 {
        built = valid_chunked(rest);
        &built
    } else {
        rest
    };
    let whole = scan_parts(&[body]);
    // The same at every split point (two reads), and one byte per read for short bodies.
    for split in 0..=body.len() {
        let (a, b) = body.split_at(split);
        assert_eq!(scan_parts(&[a, b]), whole, "split at {split}");
    }
    if body.len() <= 512 {
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(scan_parts(&bytes), whole, "byte by byte");
    }
    if k & 1 == 1 {
        assert_eq!(
            whole,
            Ok((body.len(), true)),
            "a valid body is not read to its end"
        );
        return;
    }
    match (whole, reference_chunked(body)) {
        (Ok((n, true)), RefChunked::Done(m)) => assert_eq!(n, m, "ends differ"),
        (Ok((n, true)), RefChunked::Partial) => panic!("crier ends at {n}, the reference reads on"),
        (Ok((n, false)), RefChunked::Done(m)) => {
            panic!("the reference ends at {m}, crier reads on past {n}")
        }
        _ => {}
    }
}

/// A valid chunked body from arbitrary bytes: each byte's low nibble is a chunk length, the
/// high bits choose an extension or a trailer.
fn valid_chunked(spec: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, b) in spec.iter().enumerate() {
        let len = usize::from(b & 0x0f) + 1;
        if b & 0x10 != 0 {
            out.extend_from_slice(format!("{len:X};ext={i}\r\n").as_bytes());
        } else {
            out.extend_from_slice(format!("{len:x}\r\n").as_bytes());
        }
        out.extend(std::iter::repeat_n(b"0123456789abcdef"[i % 16], len));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n");
    for (i, b) in spec
        .iter()
        .enumerate()
        .filter(|(_, b)| *b & 0x20 != 0)
        .take(4)
    {
        out.extend_from_slice(format!("x-t{i}: {b}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A message id as documented: `<unix-millis>-<seq>`, 1 to 20 ASCII digits each, both u64.
fn reference_id(s: &str) -> Option<MessageId> {
    let dash = s.find('-')?;
    let num = |p: &str| -> Option<u64> {
        if p.is_empty() || p.len() > 20 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.bytes().try_fold(0u64, |acc, d| {
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
    };
    Some(MessageId {
        ms: num(&s[..dash])?,
        seq: num(&s[dash + 1..])?,
    })
}

/// Message id and cursor parsing: `parse_position` agrees with the documented grammar (an
/// id, `earliest`, or a comma-separated compound cursor of ids), an id and a cursor written
/// the way crier writes them read back the same, and the query and header forms never panic.
pub fn check_cursor(data: &[u8]) {
    let (k, rest) = knobs(data);
    // Ids from raw bytes: written and read back.
    for w in rest.chunks_exact(16).take(8) {
        let id = MessageId {
            ms: u64::from_le_bytes(w[..8].try_into().expect("8 bytes")),
            seq: u64::from_le_bytes(w[8..].try_into().expect("8 bytes")),
        };
        assert_eq!(id.to_string().parse::<MessageId>(), Ok(id));
    }
    let ids: Vec<MessageId> = rest
        .chunks_exact(16)
        .take(8)
        .map(|w| MessageId {
            ms: u64::from_le_bytes(w[..8].try_into().expect("8 bytes")),
            seq: u64::from_le_bytes(w[8..].try_into().expect("8 bytes")),
        })
        .collect();
    if ids.len() > 1 {
        let cursor: Vec<String> = ids.iter().map(MessageId::to_string).collect();
        assert_eq!(
            parse_position(&cursor.join(",")),
            Ok(Position::Cursor(ids.clone()))
        );
    }
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    let expected = match s {
        "" => Some(Position::Unnamed),
        "earliest" => Some(Position::Earliest),
        c if c.contains(',') => c
            .split(',')
            .map(|p| reference_id(p.trim()))
            .collect::<Option<Vec<_>>>()
            .map(Position::Cursor),
        id => reference_id(id).map(Position::After),
    };
    let got = parse_position(s);
    assert_eq!(got.as_ref().ok(), expected.as_ref(), "{s:?}");
    if let Ok(Position::After(id)) = &got {
        assert_eq!(reference_id(&id.to_string()), Some(*id));
    }
    // The ways a client names it: the query (wins), Last-Event-ID, If-None-Match.
    let mut h = http::HeaderMap::new();
    let t = match k % 3 {
        0 => crate::model::Transport::Sse,
        1 => crate::model::Transport::LongPoll,
        _ => crate::model::Transport::WebSocket,
    };
    if let Ok(v) = http::HeaderValue::from_bytes(rest) {
        h.insert("last-event-id", v.clone());
        h.insert(http::header::IF_NONE_MATCH, v);
    }
    let q = if k & 4 != 0 { Some(s) } else { None };
    let got = position(q, &h, t);
    // A header that is not visible ASCII is refused before it is read as a position.
    let header = h.get("last-event-id").map(|v| v.to_str());
    if q.is_none() && t == crate::model::Transport::Sse {
        match header {
            Some(Ok(v)) => assert_eq!(got, parse_position(v.trim())),
            Some(Err(_)) => assert!(got.is_err()),
            None => {}
        }
    }
}

/// Config loading from arbitrary TOML: never panics, reports each problem as one non-empty
/// line, a config it builds without problems loads, and the same text gives the same answer.
pub fn check_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Key and secret paths are read at load: a device or /proc file would only test the
    // machine (an endless /dev/zero), not the parser.
    if ["/dev", "/proc", "/sys"].iter().any(|p| text.contains(p)) {
        return;
    }
    let (cfg, problems) = crate::config::Config::parse(text, None);
    for p in &problems {
        assert!(!p.trim().is_empty(), "an empty problem");
    }
    let (cfg2, problems2) = crate::config::Config::parse(text, None);
    assert_eq!(problems, problems2, "two loads of one text disagree");
    assert_eq!(cfg.is_some(), cfg2.is_some());
    let loaded = crate::config::Config::from_toml(text, None);
    assert_eq!(loaded.is_ok(), cfg.is_some() && problems.is_empty());
    if cfg.is_none() {
        assert!(!problems.is_empty(), "no config and no problem said");
    }
}

/// One event as an EventSource dispatches it.
#[derive(Debug, PartialEq, Eq)]
struct SseEvent {
    event_type: String,
    data: String,
    last_event_id: String,
}

/// An EventSource's parser, from the WHATWG HTML spec's "Interpreting an event stream"
/// (§9.2.6): UTF-8 with replacement, lines end at CRLF, LF or CR, `field: value` with one
/// leading space dropped, events dispatched at a blank line. Returns the events and the last
/// `retry` value.
fn eventsource_parse(stream: &[u8]) -> (Vec<SseEvent>, Option<u64>) {
    let text = String::from_utf8_lossy(stream);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut events = Vec::new();
    let mut retry = None;
    let (mut data, mut event_type, mut last_id) = (String::new(), String::new(), String::new());
    let mut rest = text;
    // A line is only complete with its end; a stream cut mid-line leaves it unread.
    while let Some(end) = rest.find(['\r', '\n']) {
        let line = &rest[..end];
        let skip = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
        if line.is_empty() {
            // Dispatch.
            if data.is_empty() {
                event_type.clear();
                continue;
            }
            if data.ends_with('\n') {
                data.pop();
            }
            events.push(SseEvent {
                event_type: if event_type.is_empty() {
                    "message".into()
                } else {
                    std::mem::take(&mut event_type)
                },
                data: std::mem::take(&mut data),
                last_event_id: last_id.clone(),
            });
            event_type.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.find(':') {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line, ""),
        };
        match field {
            "event" => event_type = value.to_string(),
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            "id" if !value.contains('\0') => last_id = value.to_string(),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                retry = value.parse().ok();
            }
            _ => {}
        }
    }
    (events, retry)
}

/// The SSE encoder: a message's frame, after the stream's `retry:` hint, reaches an
/// EventSource as exactly one event with the message's id, event name and body (its line
/// ends as EventSource normalises them, invalid UTF-8 replaced); a multiplexed stream's event
/// carries the compound cursor as its id and the crier.json envelope, whole, as its data.
pub fn check_sse(data: &[u8]) {
    let (k, rest) = knobs(data);
    let (head, body) = rest.split_at(rest.len().min(24));
    let num = |b: &[u8]| {
        b.iter()
            .fold(0u64, |a, &x| a.wrapping_mul(251).wrapping_add(x.into()))
    };
    let id = MessageId {
        ms: num(head.get(..8).unwrap_or_default()),
        seq: num(head.get(8..12).unwrap_or_default()),
    };
    let event = std::str::from_utf8(head.get(12..).unwrap_or_default())
        .ok()
        .filter(|e| crate::model::is_event_name(e))
        .map(Box::<str>::from);
    let ct = if k & 2 == 0 {
        "text/plain"
    } else {
        "application/octet-stream"
    };
    let msg = Message::new(
        id,
        event.clone(),
        http::HeaderValue::from_static(ct),
        Bytes::copy_from_slice(body),
        std::time::Instant::now(),
    );
    let mut stream = b"retry: 2000\n\n".to_vec();
    let cursor = [
        id,
        MessageId {
            ms: id.seq,
            seq: id.ms,
        },
    ];
    if k & 1 == 0 {
        stream.extend_from_slice(&crate::push::sse::encode_sse_frame(&msg));
    } else {
        let c: Vec<String> = cursor.iter().map(MessageId::to_string).collect();
        stream.extend_from_slice(format!("id: {}\n", c.join(",")).as_bytes());
        stream.extend_from_slice(&crate::push::envelope::sse_data(
            &msg,
            "room",
            3,
            k & 4 != 0,
        ));
    }
    let (events, retry) = eventsource_parse(&stream);
    assert_eq!(retry, Some(2000));
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = &events[0];
    if k & 1 == 0 {
        let want = String::from_utf8_lossy(body)
            .replace("\r\n", "\n")
            .replace('\r', "\n");
        assert_eq!(ev.data, want);
        assert_eq!(ev.last_event_id, id.to_string());
        assert_eq!(ev.event_type, event.as_deref().unwrap_or("message"));
        return;
    }
    assert_eq!(
        parse_position(&ev.last_event_id),
        Ok(Position::Cursor(cursor.to_vec()))
    );
    assert_eq!(ev.event_type, "message");
    let v: serde_json::Value = serde_json::from_str(&ev.data).expect("envelope is JSON");
    assert_eq!(v["id"], id.to_string());
    assert_eq!(v["channel"], "room");
    assert_eq!(v.get("event").and_then(|e| e.as_str()), event.as_deref());
    assert_eq!(v.get("gap").is_some(), k & 4 != 0);
    let got = match (v.get("data"), v.get("data_b64")) {
        (Some(d), None) => d.as_str().expect("data is a string").as_bytes().to_vec(),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b.as_str().expect("data_b64 is a string"))
            .expect("data_b64 is base64"),
        other => panic!("envelope has {other:?}"),
    };
    assert_eq!(got, body);
}

/// A channel pattern as documented: a channel name (`A-Z a-z 0-9 . _ - : ~`, 1 to 128), or
/// a name prefix of up to 128 such characters and a trailing `*` standing for one or more
/// characters.
fn reference_pattern_ok(p: &str) -> bool {
    let ok = |s: &str| s.len() <= 128 && s.chars().all(crate::model::is_channel_char);
    match p.strip_suffix('*') {
        Some(prefix) => ok(prefix),
        None => !p.is_empty() && ok(p),
    }
}

fn reference_pattern_matches(p: &str, c: &str) -> bool {
    match p.strip_suffix('*') {
        Some(prefix) => c.starts_with(prefix) && c.len() - prefix.len() >= 1,
        None => p == c,
    }
}

/// A directory with the key files the checks load (an HS256 secret, a webhook secret),
/// written once per process; one fixed name, so runs do not leave a directory each.
fn fixture_dir() -> Option<&'static std::path::Path> {
    static D: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    D.get_or_init(|| {
        let dir = std::env::temp_dir().join("crier-fuzzing");
        std::fs::create_dir_all(&dir).ok()?;
        std::fs::write(dir.join("jwt.secret"), JWT_SECRET).ok()?;
        std::fs::write(
            dir.join("webhook.secret"),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n",
        )
        .ok()?;
        Some(dir)
    })
    .as_deref()
}

const JWT_SECRET: &[u8] = b"fuzzing-secret-fuzzing-secret-fuzzing-secret";

fn jwt_fixture() -> Option<&'static crate::auth::jwt::JwtVerifier> {
    static V: OnceLock<Option<crate::auth::jwt::JwtVerifier>> = OnceLock::new();
    V.get_or_init(|| {
        let path = fixture_dir()?.join("jwt.secret");
        let key = crate::keys::JwtKey::load(crate::config::JwtAlgorithm::Hs256, &path).ok()?;
        Some(crate::auth::jwt::JwtVerifier::new(
            key,
            Duration::from_secs(0),
        ))
    })
    .as_ref()
}

/// Channel patterns: `ChannelPattern::new` accepts exactly the documented grammar and matches
/// as documented; a JWT whose `crier.subscribe` claim holds the pattern admits exactly the
/// channels it matches; a webhook with `channels = [pattern]` wants exactly those.
pub fn check_channel_pattern(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (p, c) = s.split_once('\n').unwrap_or((s, ""));
    let parsed = crate::model::ChannelPattern::new(p);
    assert_eq!(parsed.is_ok(), reference_pattern_ok(p), "{p:?}");
    let channel = crate::model::ChannelName::new(c).ok();
    let want = reference_pattern_matches(p, c);
    assert_eq!(crate::model::pattern_matches(p, c), want);
    if let Ok(pat) = &parsed {
        assert_eq!(pat.matches(c), want);
        assert_eq!(pat.as_str(), p);
    }
    let Some(channel) = channel else {
        return;
    };
    if let Some(verifier) = jwt_fixture() {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            + 3600;
        let claims = serde_json::json!({ "exp": exp, "crier.subscribe": [p] });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET),
        )
        .expect("HS256 signing");
        let r = verifier.verify(&token, &channel, crate::auth::Action::Subscribe);
        assert_eq!(r.is_ok(), want, "JWT claim {p:?} for {c:?}: {r:?}");
    }
    let Some(dir) = fixture_dir() else {
        return;
    };
    let secret = serde_json::to_string(&dir.join("webhook.secret")).expect("a path");
    let toml_str = serde_json::to_string(p).expect("a string");
    let text = format!(
        "[[webhook]]\nurl = \"https://hooks.example/x\"\nsecret_file = {secret}\nchannels = [{toml_str}]\n"
    );
    let (cfg, problems) = crate::config::Config::parse(&text, None);
    if parsed.is_ok() {
        let cfg = cfg.expect("config builds");
        assert!(problems.is_empty(), "{problems:?}");
        let hook = cfg.webhooks.first().expect("one webhook");
        assert_eq!(hook.wants_channel(&channel), want);
    } else {
        assert!(!problems.is_empty(), "bad pattern {p:?} accepted");
    }
}

/// Webhook signature checks: a signature crier makes verifies; any change to the body, id,
/// timestamp, signature or secret makes it fail; garbage headers are refused, never a panic.
pub fn check_webhook_signature(data: &[u8]) {
    use crate::webhook::sign::{sign_standard, verify_hex_value, verify_standard, VerifyError};
    let (k, rest) = knobs(data);
    let (secret, rest) = rest.split_at(rest.len().min(usize::from(k % 48) + 1));
    let cut = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let (id_bytes, body) = rest.split_at(cut);
    let now = SystemTime::now();
    let ts = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    // Arbitrary headers: never a panic, never a pass without the right signature.
    let mut raw = http::HeaderMap::new();
    for (name, part) in ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .iter()
        .zip(body.split(|&b| b == b'\n'))
    {
        if let Ok(v) = http::HeaderValue::from_bytes(part) {
            raw.insert(*name, v);
        }
    }
    if let Ok(id) = verify_standard(secret, &raw, body, now) {
        let ts: u64 = raw["webhook-timestamp"]
            .to_str()
            .expect("verified")
            .trim()
            .parse()
            .expect("verified");
        let good = sign_standard(secret, id, ts, body);
        let sigs = raw["webhook-signature"].to_str().expect("verified");
        assert!(
            sigs.split(' ').any(|s| s == good),
            "passed without the signature"
        );
    }
    let hex_value = body.split(|&b| b == b'\n').next().unwrap_or_default();
    if let Ok(v) = http::HeaderValue::from_bytes(hex_value) {
        let _ = verify_hex_value(secret, Some(&v), "x-signature", body);
    }
    let Ok(id) = std::str::from_utf8(id_bytes) else {
        return;
    };
    let sig = sign_standard(secret, id, ts, body);
    let headers = |id: &str, ts: u64, sig: &str| {
        let mut h = http::HeaderMap::new();
        let (Ok(i), Ok(s)) = (
            http::HeaderValue::from_str(id),
            http::HeaderValue::from_str(sig),
        ) else {
            return None;
        };
        h.insert("webhook-id", i);
        h.insert("webhook-timestamp", http::HeaderValue::from(ts));
        h.insert("webhook-signature", s);
        Some(h)
    };
    let Some(h) = headers(id, ts, &sig) else {
        return;
    };
    // A webhook-id that is not visible ASCII is malformed, like any such header.
    let valid_id = !id.is_empty() && id.len() <= 256 && h["webhook-id"].to_str().is_ok();
    let r = verify_standard(secret, &h, body, now);
    if valid_id {
        assert_eq!(r, Ok(id));
        // Another signature beside it (key rotation) still passes.
        let rotated = headers(id, ts, &format!("v1,AAAA {sig}")).expect("ascii");
        assert_eq!(verify_standard(secret, &rotated, body, now), Ok(id));
    } else {
        assert_eq!(r, Err(VerifyError::Malformed("webhook-id")));
        return;
    }
    let mut other_body = body.to_vec();
    other_body.push(b'x');
    assert_eq!(
        verify_standard(secret, &h, &other_body, now),
        Err(VerifyError::Mismatch)
    );
    // Not a zero byte appended: HMAC pads a short key with zeros, so that is the same key.
    let mut other_secret = secret.to_vec();
    match other_secret.first_mut() {
        Some(b) => *b ^= 1,
        None => other_secret.push(1),
    }
    assert_eq!(
        verify_standard(&other_secret, &h, body, now),
        Err(VerifyError::Mismatch)
    );
    let stale = now - Duration::from_secs(301);
    assert_eq!(
        verify_standard(secret, &h, body, stale),
        Err(VerifyError::Stale)
    );
    let moved = headers(id, ts + 1, &sig).expect("same id");
    assert_eq!(
        verify_standard(secret, &moved, body, now),
        Err(VerifyError::Mismatch)
    );
    // The hex form of the same HMAC.
    let tag = base64::engine::general_purpose::STANDARD
        .decode(&sig[3..])
        .expect("our own base64");
    let _ = tag;
    let hex: String = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret),
        body,
    )
    .as_ref()
    .iter()
    .map(|b| format!("{b:02x}"))
    .collect();
    let v = http::HeaderValue::from_str(&format!("sha256={hex}")).expect("ascii");
    assert_eq!(
        verify_hex_value(secret, Some(&v), "x-signature", body),
        Ok(())
    );
    assert_eq!(
        verify_hex_value(secret, Some(&v), "x-signature", &other_body),
        Err(VerifyError::Mismatch)
    );
}

/// Web Push subscription JSON: any body is read or refused with a message, never a panic; an
/// accepted subscription is https on an allowed host and port, its origin is its endpoint's
/// scheme and authority, and its keys are a P-256 point and 16 bytes.
pub fn check_webpush_subscription(data: &[u8]) {
    use crate::config::HostPattern;
    use crate::https_client::vet::AddressPolicy;
    use crate::webpush::api::{check_subscription, parse_json};
    let hosts = [
        HostPattern::parse("*.push.services.mozilla.com").expect("literal pattern"),
        HostPattern::parse("fcm.googleapis.com").expect("literal pattern"),
        HostPattern::parse("10.0.0.1").expect("literal pattern"),
    ];
    let policy = AddressPolicy {
        allow: Vec::new(),
        ports: vec![443],
        fixed: Default::default(),
    };
    let Ok(json) = parse_json(data) else {
        return;
    };
    let Ok((origin, keys)) = check_subscription(&json, &hosts, &policy) else {
        return;
    };
    let uri: http::Uri = json.endpoint.parse().expect("accepted endpoint is a URI");
    assert_eq!(uri.scheme_str(), Some("https"));
    assert!(uri.port_u16().unwrap_or(443) == 443);
    let host = uri
        .host()
        .expect("accepted endpoint has a host")
        .to_ascii_lowercase();
    let host = host.trim_end_matches('.');
    assert!(
        host == "fcm.googleapis.com" || host.ends_with(".push.services.mozilla.com"),
        "host {host:?} accepted"
    );
    let authority = uri.authority().expect("has a host").as_str();
    assert!(!authority.contains('@'));
    assert_eq!(
        origin,
        format!("https://{}", authority.to_ascii_lowercase())
    );
    assert_eq!(keys.public[0], 4);
}

/// The WebRTC offer path up to the network: an offer that crier answers gets an answer with
/// one media section per offered one, which crier's own parser reads back (the data section
/// in its place, crier's credentials in it), and which str0m's SDP parser (an independent
/// one) reads when the offer is data only (str0m wants codecs in any audio or video section,
/// even a rejected one). Never a panic, whatever the offer.
pub fn check_webrtc_offer(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let candidates = ["192.0.2.1:3478".parse().expect("literal address")];
    let Ok(answer) = crate::push::webrtc::answer_for_fuzzing(text, &candidates) else {
        return;
    };
    let m_lines = |sdp: &str| -> Vec<String> {
        sdp.lines()
            .filter(|l| l.starts_with("m="))
            .map(str::to_string)
            .collect()
    };
    let (offered, answered) = (m_lines(text), m_lines(&answer));
    assert_eq!(offered.len(), answered.len(), "{answer}");
    let accepted: Vec<&String> = answered.iter().filter(|m| !m.contains(" 0 ")).collect();
    assert_eq!(accepted.len(), 1, "one accepted section: {answer}");
    assert!(
        crate::push::webrtc::answer_for_fuzzing(&answer, &candidates).is_ok(),
        "our answer does not read back: {answer}"
    );
    if offered.iter().all(|m| m.starts_with("m=application")) {
        let parsed = str0m::change::SdpAnswer::from_sdp_string(&answer);
        assert!(
            parsed.is_ok(),
            "our answer does not parse: {answer}\n{parsed:?}"
        );
    }
}

/// A WebRTC session's ICE-lite checks (src/push/webrtc/stun.rs), on what anyone can send to
/// the UDP socket: any datagram is answered or dropped without a panic, an answer is a
/// binding success of the request's transaction; and the same bytes made into attributes of a
/// correctly signed request (the first byte's low bit: with FINGERPRINT) are answered unless
/// an attribute is malformed (its length past the end) or is MESSAGE-INTEGRITY or
/// FINGERPRINT itself, or a USERNAME (a request with two).
pub fn check_webrtc_stun(data: &[u8]) {
    let source = "192.0.2.9:40000".parse().expect("literal address");
    if let Some(r) = crate::push::webrtc::stun_answer_for_fuzzing(data, source) {
        assert_eq!(&r[..2], &[0x01, 0x01], "a binding success");
        assert_eq!(&r[8..20], &data[8..20], "the request's transaction");
    }
    let (k, rest) = knobs(data);
    // `rest` as attributes: type (2 bytes), a value of up to 255 bytes (1-byte length).
    let mut attrs: Vec<(u16, &[u8])> = Vec::new();
    let mut i = 0;
    while i + 3 <= rest.len() {
        let kind = u16::from_be_bytes([rest[i], rest[i + 1]]);
        let n = usize::from(rest[i + 2]);
        let Some(v) = rest.get(i + 3..i + 3 + n) else {
            break;
        };
        attrs.push((kind, v));
        i += 3 + n;
    }
    let req = crate::push::webrtc::stun_request_for_fuzzing(&attrs, k & 1 == 1);
    let answered = crate::push::webrtc::stun_answer_for_fuzzing(&req, source);
    let special = attrs
        .iter()
        .any(|(t, _)| matches!(*t, 0x0006 | 0x0008 | 0x8028));
    if !special && req.len() <= 65_535 {
        assert!(
            answered.is_some(),
            "a signed request was not answered: {req:?}"
        );
    }
}

/// The store's journal (src/hub/store/file/journal.rs), read back at start from a file that
/// a crash, a bad disk or anyone may have left in any state: reading never panics, gives a
/// chain that reads back the same once written again, and of records crier wrote, whatever
/// one byte of the file became, gives back a prefix of them, never anything else.
pub fn check_journal(data: &[u8]) {
    use crate::hub::store::fuzz::{frame_record, scan};
    const PAGE: usize = 4096;
    let (k, rest) = knobs(data);
    let applied = u64::from(k % 4);
    // Anything: the chain it reads, framed again from its first sequence, reads the same.
    let (records, end, last) = scan(rest, 0);
    assert!(end as usize <= rest.len().div_ceil(PAGE) * PAGE + PAGE);
    let first = last + 1 - records.len() as u64;
    let mut file = Vec::new();
    let mut rec = Vec::new();
    for (i, r) in records.iter().enumerate() {
        frame_record(first + i as u64, r, &mut rec).expect("small record");
        file.extend_from_slice(&rec);
    }
    let (again, _, again_last) = scan(&file, 0);
    assert_eq!(again, records);
    assert_eq!(again_last, last);
    // Records crier wrote (payloads: `rest` split at 0xff), then one byte changed.
    let payloads: Vec<&[u8]> = rest.split(|b| *b == 0xff).take(16).collect();
    let mut file = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        frame_record(10 + i as u64, p, &mut rec).expect("small record");
        file.extend_from_slice(&rec);
    }
    let (whole, _, _) = scan(&file, applied + 9);
    let want: Vec<&[u8]> = payloads.iter().skip(applied as usize).copied().collect();
    assert_eq!(whole, want, "every record back after the applied one");
    if !file.is_empty() {
        let at = (usize::from(k) * 7919 + rest.len()) % file.len();
        file[at] ^= k | 1;
        let (got, _, _) = scan(&file, 9);
        assert!(got.len() <= payloads.len());
        for (g, p) in got.iter().zip(&payloads) {
            assert_eq!(
                g.as_slice(),
                *p,
                "a damaged journal gave back something not written"
            );
        }
    }
}

/// The Redis fan-out messages (src/hub/store/redis/script.rs `parse_fanout`), which come
/// from the network: any bytes parse or are refused without a panic, and entries written
/// in the documented `b` format (a reference encoder here: consecutive ids from the first,
/// each one's previous id the one before) come back exactly.
pub fn check_fanout(data: &[u8]) {
    use crate::hub::store::fuzz::{parse_fanout, Entry, Fanout};
    let _ = parse_fanout(Bytes::copy_from_slice(data));
    let (k, rest) = knobs(data);
    let n = |c: &[u8], a: usize| c.get(a).copied().map_or(0, u64::from);
    let first = MessageId {
        ms: n(rest, 0) * 1000 + 1,
        seq: n(rest, 1),
    };
    let mut prev = MessageId {
        ms: n(rest, 2),
        seq: n(rest, 3),
    };
    let head = prev;
    let entries: Vec<Entry> = rest
        .chunks(24)
        .take(8)
        .enumerate()
        .map(|(i, c)| {
            let text: String = c
                .iter()
                .filter(|b| b.is_ascii_alphanumeric())
                .map(|b| *b as char)
                .collect();
            let id = MessageId {
                ms: first.ms,
                seq: first.seq + i as u64,
            };
            let e = Entry {
                id,
                prev,
                event: (k & 1 == 1 && !text.is_empty()).then(|| text.clone().into()),
                content_type: Bytes::from(if k & 2 == 2 {
                    "application/json"
                } else {
                    "text/plain"
                }),
                // Bodies are any bytes, newlines included: their length frames them.
                body: Bytes::copy_from_slice(c),
            };
            prev = id;
            e
        })
        .collect();
    if entries.is_empty() {
        return;
    }
    let mut wire = format!("b{}\n{}\n{}\n", entries.len(), first, head).into_bytes();
    for e in &entries {
        wire.extend_from_slice(
            format!(
                "{}\n{}\n{}\n",
                e.body.len(),
                e.event.as_deref().unwrap_or(""),
                std::str::from_utf8(&e.content_type).expect("ascii"),
            )
            .as_bytes(),
        );
        wire.extend_from_slice(&e.body);
    }
    assert_eq!(
        parse_fanout(Bytes::from(wire)),
        Some(Fanout::Messages(entries))
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed corpus file and regression input, through its target's check: the
    /// fuzzers' findings stay checked on stable, without cargo-fuzz.
    #[test]
    fn fuzz_corpora_pass() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut files = 0;
        let mut failed = Vec::new();
        for (name, check) in TARGETS {
            for dir in ["corpus", "regressions"] {
                let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                    continue;
                };
                for e in entries.flatten() {
                    let path = e.path();
                    let Ok(data) = std::fs::read(&path) else {
                        continue;
                    };
                    if std::panic::catch_unwind(|| check(&data)).is_err() {
                        failed.push(format!("{name}: {}", path.display()));
                    }
                    files += 1;
                }
            }
        }
        assert!(files > 0, "no corpus found under {}", root.display());
        assert!(failed.is_empty(), "inputs failing their check: {failed:#?}");
    }
}
