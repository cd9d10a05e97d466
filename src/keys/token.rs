//! The publish API's bearer token (`[publish] token_file`).

use std::path::Path;

use http::header::{self, HeaderMap};
use subtle::ConstantTimeEq;

use super::secret::read_secret_file;

/// Only the token's SHA-256 is kept, and a presented token is hashed and compared in constant
/// time: neither the token's bytes nor its length show in the time an answer takes.
#[derive(Clone)]
pub struct PublishToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for PublishToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PublishToken(..)")
    }
}

/// Shortest publish token accepted.
pub const MIN_PUBLISH_TOKEN: usize = 16;

impl PublishToken {
    /// Reads the token file; the token must be at least 16 visible ASCII characters (it
    /// travels in an HTTP header).
    pub fn load(path: &Path) -> Result<PublishToken, String> {
        let token = read_secret_file(path)?;
        if !token.iter().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "{}: the token must be visible ASCII characters without spaces",
                path.display()
            ));
        }
        if token.len() < MIN_PUBLISH_TOKEN {
            return Err(format!(
                "{}: the token needs at least {MIN_PUBLISH_TOKEN} characters; make one with: openssl rand -hex 32",
                path.display()
            ));
        }
        Ok(PublishToken {
            digest: sha256(&token),
        })
    }

    pub fn matches(&self, presented: &[u8]) -> bool {
        bool::from(sha256(presented).ct_eq(&self.digest))
    }

    /// Whether the request's `Authorization: Bearer` carries this token.
    pub fn authorizes(&self, h: &HeaderMap) -> bool {
        h.get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(bearer_token)
            .any(|t| self.matches(t.as_bytes()))
    }
}

/// `Bearer <token>` (the scheme is case-insensitive) → the token.
pub fn bearer_token(v: &str) -> Option<&str> {
    let (scheme, token) = v.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_token_compare() {
        let dir = tempfile::tempdir().expect("test setup");
        let p = dir.path().join("t");
        std::fs::write(&p, "0123456789abcdef0123\n").expect("test setup");
        let t = PublishToken::load(&p).expect("test setup");
        assert!(t.matches(b"0123456789abcdef0123"));
        assert!(!t.matches(b"0123456789abcdef012"));
        assert!(!t.matches(b""));
        std::fs::write(&p, "short\n").expect("test setup");
        assert!(PublishToken::load(&p).unwrap_err().contains("at least 16"));
        std::fs::write(&p, "\n").expect("test setup");
        assert!(PublishToken::load(&p).unwrap_err().contains("empty"));
        assert!(format!("{t:?}").contains(".."));
    }
}
