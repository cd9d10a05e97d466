//! Webhook signatures: Standard Webhooks (what crier sends, and one scheme it accepts),
//! GitHub's `X-Hub-Signature-256`, and a plain hex HMAC-SHA256 header. Every check goes
//! through `aws_lc_rs::hmac::verify`, which compares in constant time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use base64::Engine;
use http::HeaderMap;

/// How far a Standard Webhooks timestamp may be from our clock (the spec's tolerance).
pub const TOLERANCE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error("malformed {0} header")]
    Malformed(&'static str),
    #[error("webhook-timestamp is more than 5 minutes off (replayed or a wrong clock)")]
    Stale,
    #[error("signature does not match")]
    Mismatch,
}

fn key(secret: &[u8]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret)
}

/// The Standard Webhooks signed content: `id.timestamp.body`.
fn standard_content(id: &str, timestamp: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(id.len() + 22 + body.len());
    v.extend_from_slice(id.as_bytes());
    v.push(b'.');
    v.extend_from_slice(timestamp.to_string().as_bytes());
    v.push(b'.');
    v.extend_from_slice(body);
    v
}

/// `v1,<base64 HMAC-SHA256("id.timestamp.body")>`, the `webhook-signature` header value.
pub fn sign_standard(secret: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let tag = hmac::sign(&key(secret), &standard_content(id, timestamp, body));
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

fn header<'a>(h: &'a HeaderMap, name: &'static str) -> Result<&'a str, VerifyError> {
    h.get(name)
        .ok_or(VerifyError::Missing(name))?
        .to_str()
        .map_err(|_| VerifyError::Malformed(name))
}

/// Checks a Standard Webhooks request; returns its `webhook-id`. `webhook-signature` may list
/// several space-separated signatures (key rotation): one `v1` match is enough.
pub fn verify_standard<'a>(
    secret: &[u8],
    headers: &'a HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<&'a str, VerifyError> {
    let id = header(headers, "webhook-id")?;
    let ts: u64 = header(headers, "webhook-timestamp")?
        .trim()
        .parse()
        .map_err(|_| VerifyError::Malformed("webhook-timestamp"))?;
    let sigs = header(headers, "webhook-signature")?;
    if id.is_empty() || id.len() > 256 {
        return Err(VerifyError::Malformed("webhook-id"));
    }
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    if now.abs_diff(ts) > TOLERANCE.as_secs() {
        return Err(VerifyError::Stale);
    }
    let content = standard_content(id, ts, body);
    let k = key(secret);
    let matched = sigs
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .any(|tag| hmac::verify(&k, &content, &tag).is_ok());
    if matched {
        Ok(id)
    } else {
        Err(VerifyError::Mismatch)
    }
}

/// Checks a hex HMAC-SHA256 of the body in `name` (`sha256=` prefix optional; GitHub sends it).
pub fn verify_hex(
    secret: &[u8],
    headers: &HeaderMap,
    name: &'static str,
    body: &[u8],
) -> Result<(), VerifyError> {
    verify_hex_value(secret, headers.get(name), name, body)
}

/// Like [`verify_hex`] for a header named at runtime (`[[ingress]] header`).
pub fn verify_hex_value(
    secret: &[u8],
    value: Option<&http::HeaderValue>,
    name: &'static str,
    body: &[u8],
) -> Result<(), VerifyError> {
    let v = value
        .ok_or(VerifyError::Missing(name))?
        .to_str()
        .map_err(|_| VerifyError::Malformed(name))?
        .trim();
    let hex = v.strip_prefix("sha256=").unwrap_or(v);
    let tag = decode_hex(hex).ok_or(VerifyError::Malformed(name))?;
    hmac::verify(&key(secret), body, &tag).map_err(|_| VerifyError::Mismatch)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let nibble = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// RFC 3339 in UTC with milliseconds: `2026-11-25T18:26:57.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::decode_whsec;

    fn secret(s: &str) -> Vec<u8> {
        decode_whsec(s).expect("valid whsec").0.to_vec()
    }

    /// The vector the Standard Webhooks / Svix libraries test against (svix PHP
    /// `testSignFunctionWorks`), and the one in standard-webhooks' Rust library (`test_sign`).
    #[test]
    fn the_published_standard_webhooks_vectors_reproduce_exactly() {
        let key = secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        assert_eq!(
            sign_standard(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let key = secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD");
        assert_eq!(
            sign_standard(
                &key,
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1649367553,
                br#"{"email":"test@example.com","username":"test_user"}"#
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    #[test]
    fn standard_verification() {
        let key = secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let at = UNIX_EPOCH + Duration::from_secs(1614265330);
        let mut h = HeaderMap::new();
        h.insert(
            "webhook-id",
            "msg_p5jXN8AQM9LWM0D4loKWxJek".parse().expect("hv"),
        );
        h.insert("webhook-timestamp", "1614265330".parse().expect("hv"));
        h.insert(
            "webhook-signature",
            "v1,bm9wZQ== v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
                .parse()
                .expect("hv"),
        );
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            verify_standard(&key, &h, body, at),
            Ok("msg_p5jXN8AQM9LWM0D4loKWxJek")
        );
        assert_eq!(
            verify_standard(&key, &h, b"{}", at),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify_standard(&key, &h, body, at + Duration::from_secs(301)),
            Err(VerifyError::Stale)
        );
        assert_eq!(
            verify_standard(&key, &h, body, at - Duration::from_secs(301)),
            Err(VerifyError::Stale)
        );
        h.remove("webhook-id");
        assert_eq!(
            verify_standard(&key, &h, body, at),
            Err(VerifyError::Missing("webhook-id"))
        );
    }

    /// GitHub's documented example: secret "It's a Secret to Everybody", payload "Hello, World!".
    #[test]
    fn github_documented_example() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-hub-signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
                .parse()
                .expect("hv"),
        );
        let key = b"It's a Secret to Everybody";
        assert_eq!(
            verify_hex(key, &h, "x-hub-signature-256", b"Hello, World!"),
            Ok(())
        );
        assert_eq!(
            verify_hex(key, &h, "x-hub-signature-256", b"Hello, World?"),
            Err(VerifyError::Mismatch)
        );
        h.insert("x-hub-signature-256", "sha256=zz".parse().expect("hv"));
        assert_eq!(
            verify_hex(key, &h, "x-hub-signature-256", b"Hello, World!"),
            Err(VerifyError::Malformed("x-hub-signature-256"))
        );
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_614_265_330_042)),
            "2021-02-25T15:02:10.042Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
