//! JWT subscriber tokens (`[push.jwt]`): the key and algorithm fixed by config, `exp` required,
//! `nbf` checked, and the claims `crier.subscribe` and `crier.publish` listing the channels a
//! token may read and those it may publish to (a WebSocket client's messages).
//!
//! Verification is `jsonwebtoken` on aws-lc-rs (the crypto rustls already brings in): the
//! algorithm list holds exactly the configured algorithm, so `alg: none` (not even a variant of
//! its `Algorithm`) and algorithm confusion (an HS256 token "signed" with the RSA public key)
//! are refused before any signature is looked at.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use super::Action;
use crate::config::JwtAlgorithm;
use crate::keys::JwtKey;
use crate::model::pattern_matches;

fn jsonwebtoken_algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::Hs256 => Algorithm::HS256,
        JwtAlgorithm::Rs256 => Algorithm::RS256,
        JwtAlgorithm::Es256 => Algorithm::ES256,
    }
}

/// Checks tokens for one location: its key, its one algorithm, its leeway.
#[derive(Clone)]
pub struct JwtVerifier {
    key: JwtKey,
    validation: Validation,
}

impl fmt::Debug for JwtVerifier {
    /// Never prints the key: an HS256 secret must not end up in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithm", &self.key.algorithm())
            .field("leeway_s", &self.validation.leeway)
            .finish_non_exhaustive()
    }
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtRejection {
    /// No token in the request (401).
    #[error("missing token")]
    Missing,
    /// A token that does not verify (401); the reason is one line for the client.
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    /// A valid token whose `crier.subscribe` claim does not name the channel (403).
    #[error("token does not allow this channel")]
    ChannelNotAllowed,
    /// A valid token whose `crier.publish` claim does not name the channel (403).
    #[error("token does not allow publishing to this channel (crier.publish)")]
    PublishNotAllowed,
}

impl JwtVerifier {
    /// Checks tokens with `key` (and only its algorithm), allowing `leeway` for `exp`/`nbf`.
    pub fn new(key: JwtKey, leeway: Duration) -> JwtVerifier {
        let mut validation = Validation::new(jsonwebtoken_algorithm(key.algorithm()));
        validation.leeway = leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        // No audience is configured: a token's `aud` is the app's business, not a reason to refuse.
        validation.validate_aud = false;
        JwtVerifier { key, validation }
    }

    /// Verifies `token` and checks that its claim for `action` allows `channel`. Returns when
    /// a stream opened with it must end: its `exp` plus the leeway.
    pub fn verify(
        &self,
        token: &str,
        channel: &str,
        action: Action,
    ) -> Result<SystemTime, JwtRejection> {
        let data = jsonwebtoken::decode::<Claims>(token, self.key.decoding_key(), &self.validation)
            .map_err(|e| JwtRejection::Invalid(reason(e.kind())))?;
        if data.claims.allows(channel, action) {
            Ok(UNIX_EPOCH + Duration::from_secs(data.claims.exp + self.validation.leeway))
        } else if action == Action::Publish {
            Err(JwtRejection::PublishNotAllowed)
        } else {
            Err(JwtRejection::ChannelNotAllowed)
        }
    }
}

/// The one-line reason a client sees for a token that does not verify.
fn reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "token expired",
        ErrorKind::ImmatureSignature => "token not valid yet (nbf)",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidKeyFormat => "algorithm not accepted here",
        ErrorKind::MissingRequiredClaim(_) => "token has no exp claim",
        ErrorKind::InvalidClaimFormat(_) => "malformed exp or nbf claim",
        _ => "malformed token",
    }
}

/// The claims crier reads; the others are the app's. Both spellings of each channel list are
/// accepted: a top-level key `"crier.subscribe"` (`"crier.publish"`) and
/// `{"crier": {"subscribe": [...], "publish": [...]}}`. A claim of another shape allows
/// nothing; a token may publish only where `crier.publish` says (subscribing does not imply it).
#[derive(Deserialize)]
struct Claims {
    /// Required by the validation: when the token (and a stream opened with it) ends.
    #[serde(default)]
    exp: u64,
    #[serde(rename = "crier.subscribe", default)]
    flat: Option<serde_json::Value>,
    #[serde(rename = "crier.publish", default)]
    flat_publish: Option<serde_json::Value>,
    #[serde(default)]
    crier: Option<serde_json::Value>,
}

impl Claims {
    fn allows(&self, channel: &str, action: Action) -> bool {
        let (flat, key) = match action {
            Action::Subscribe => (self.flat.as_ref(), "subscribe"),
            Action::Publish => (self.flat_publish.as_ref(), "publish"),
        };
        let nested = self.crier.as_ref().and_then(|c| c.get(key));
        [flat, nested]
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_array)
            .flatten()
            .filter_map(serde_json::Value::as_str)
            .any(|pattern| pattern_matches(pattern, channel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_claim_spellings() {
        let flat: Claims =
            serde_json::from_str(r#"{"crier.subscribe":["a","b.*"]}"#).expect("test setup");
        let sub = Action::Subscribe;
        assert!(flat.allows("a", sub) && flat.allows("b.1", sub) && !flat.allows("c", sub));
        let nested: Claims =
            serde_json::from_str(r#"{"crier":{"subscribe":["orders.*"]}}"#).expect("test setup");
        assert!(nested.allows("orders.7", sub) && !nested.allows("orders", sub));
        let none: Claims = serde_json::from_str(r#"{"sub":"u1"}"#).expect("test setup");
        assert!(!none.allows("a", sub));
        let wrong_shape: Claims =
            serde_json::from_str(r#"{"crier.subscribe":"*"}"#).expect("test setup");
        assert!(!wrong_shape.allows("a", sub), "a string is not a list");
    }

    #[test]
    fn publishing_needs_its_own_claim() {
        let pubs = Action::Publish;
        let read_only: Claims =
            serde_json::from_str(r#"{"crier.subscribe":["*"]}"#).expect("test setup");
        assert!(
            !read_only.allows("a", pubs),
            "subscribe does not imply publish"
        );
        let flat: Claims =
            serde_json::from_str(r#"{"crier.subscribe":["a"],"crier.publish":["chat.*"]}"#)
                .expect("test setup");
        assert!(flat.allows("chat.1", pubs) && !flat.allows("a", pubs));
        assert!(!flat.allows("chat.1", Action::Subscribe));
        let nested: Claims =
            serde_json::from_str(r#"{"crier":{"publish":["room"]}}"#).expect("test setup");
        assert!(nested.allows("room", pubs) && !nested.allows("room", Action::Subscribe));
    }
}
