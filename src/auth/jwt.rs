//! JWT subscriber tokens (`[push.jwt]`): the key and algorithm fixed by config, `exp` required,
//! `nbf` checked, and the claim `crier.subscribe` listing the channels a token may read.
//!
//! Verification is `jsonwebtoken` on aws-lc-rs (the crypto rustls already brings in): the
//! algorithm list holds exactly the configured algorithm, so `alg: none` (not even a variant of
//! its `Algorithm`) and algorithm confusion (an HS256 token "signed" with the RSA public key)
//! are refused before any signature is looked at.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, Validation};
use serde::Deserialize;

/// The algorithms a location may be configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    Hs256,
    Rs256,
    Es256,
}

impl JwtAlgorithm {
    pub fn parse(s: &str) -> Option<JwtAlgorithm> {
        match s {
            "HS256" => Some(JwtAlgorithm::Hs256),
            "RS256" => Some(JwtAlgorithm::Rs256),
            "ES256" => Some(JwtAlgorithm::Es256),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::Hs256 => "HS256",
            JwtAlgorithm::Rs256 => "RS256",
            JwtAlgorithm::Es256 => "ES256",
        }
    }

    fn jsonwebtoken(self) -> Algorithm {
        match self {
            JwtAlgorithm::Hs256 => Algorithm::HS256,
            JwtAlgorithm::Rs256 => Algorithm::RS256,
            JwtAlgorithm::Es256 => Algorithm::ES256,
        }
    }
}

/// An HS256 secret shorter than this is refused (RFC 7518 §3.2: at least the hash size).
pub const MIN_SECRET_BYTES: usize = 32;

/// Checks tokens for one location: its key, its one algorithm, its leeway.
#[derive(Clone)]
pub struct JwtVerifier {
    algorithm: JwtAlgorithm,
    key: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for JwtVerifier {
    /// Never prints the key: an HS256 secret must not end up in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithm", &self.algorithm)
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
}

impl JwtVerifier {
    /// Reads the key file of `algorithm` (a secret for HS256, a PEM public key or certificate
    /// for RS256/ES256). The error names the file and says what is wrong with it.
    pub fn load(
        algorithm: JwtAlgorithm,
        path: &Path,
        leeway: Duration,
    ) -> Result<JwtVerifier, String> {
        let file = path.display();
        let key = match algorithm {
            JwtAlgorithm::Hs256 => {
                let secret = super::read_secret_file(path)?;
                if secret.len() < MIN_SECRET_BYTES {
                    return Err(format!(
                        "{file}: an HS256 secret needs at least {MIN_SECRET_BYTES} bytes (it has {}); \
                         make one with: openssl rand -base64 48",
                        secret.len()
                    ));
                }
                DecodingKey::from_secret(&secret)
            }
            JwtAlgorithm::Rs256 | JwtAlgorithm::Es256 => {
                let pem = std::fs::read(path).map_err(|e| format!("cannot read {file}: {e}"))?;
                public_key(algorithm, &pem).map_err(|e| format!("{file}: {e}"))?
            }
        };
        let mut validation = Validation::new(algorithm.jsonwebtoken());
        validation.leeway = leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        // No audience is configured: a token's `aud` is the app's business, not a reason to refuse.
        validation.validate_aud = false;
        Ok(JwtVerifier {
            algorithm,
            key,
            validation,
        })
    }

    pub fn algorithm(&self) -> JwtAlgorithm {
        self.algorithm
    }

    /// Verifies `token` and checks that its claim allows `channel`.
    pub fn verify(&self, token: &str, channel: &str) -> Result<(), JwtRejection> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| JwtRejection::Invalid(reason(e.kind())))?;
        if data.claims.allows(channel) {
            Ok(())
        } else {
            Err(JwtRejection::ChannelNotAllowed)
        }
    }
}

/// A PEM public key (or certificate) for RS256/ES256, parsed and checked now so that a bad
/// file is a startup error rather than every token failing later.
fn public_key(algorithm: JwtAlgorithm, pem: &[u8]) -> Result<DecodingKey, String> {
    let text = String::from_utf8_lossy(pem);
    if text.contains("PRIVATE KEY-----") {
        return Err(
            "holds a private key; give crier only the public key (openssl pkey -pubout)".into(),
        );
    }
    let (key, check): (_, &'static dyn aws_lc_rs::signature::VerificationAlgorithm) =
        match algorithm {
            JwtAlgorithm::Rs256 => (
                DecodingKey::from_rsa_pem(pem),
                &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
            ),
            _ => (
                DecodingKey::from_ec_pem(pem),
                &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
            ),
        };
    let what = match algorithm {
        JwtAlgorithm::Rs256 => "an RSA public key (2048 to 8192 bits)",
        _ => "a P-256 EC public key",
    };
    let key =
        key.map_err(|_| format!("is not a PEM file with {what} for {}", algorithm.as_str()))?;
    // jsonwebtoken only unwraps the PEM; parsing the key itself catches a wrong curve, a short
    // RSA modulus or a damaged file.
    if let DecodingKeyKind::SecretOrDer(der) = key.kind() {
        let unusable = |why: &dyn fmt::Display| {
            format!("is not {what} usable for {} ({why})", algorithm.as_str())
        };
        aws_lc_rs::signature::ParsedPublicKey::new(check, der).map_err(|e| unusable(&e))?;
        // Parsing accepts any RSA size; verifying would then refuse every token.
        if algorithm == JwtAlgorithm::Rs256 {
            match rsa_modulus_bits(der) {
                Some(2048..=8192) => {}
                Some(bits) => return Err(unusable(&format!("{bits} bits"))),
                None => return Err(unusable(&"unreadable modulus")),
            }
        }
    }
    Ok(key)
}

/// Bits of the modulus of a PKCS#1 `RSAPublicKey` (`SEQUENCE { INTEGER n, INTEGER e }`), the
/// form jsonwebtoken keeps an RSA key in.
fn rsa_modulus_bits(der: &[u8]) -> Option<usize> {
    let (0x30, seq) = der_item(der)? else {
        return None;
    };
    let (0x02, n) = der_item(seq)? else {
        return None;
    };
    let start = n.iter().position(|b| *b != 0)?;
    let n = &n[start..];
    Some((n.len() - 1) * 8 + (8 - n[0].leading_zeros() as usize))
}

/// One DER item at the start of `b`: its tag and contents.
fn der_item(b: &[u8]) -> Option<(u8, &[u8])> {
    let tag = *b.first()?;
    let first = usize::from(*b.get(1)?);
    let (len, start) = if first < 0x80 {
        (first, 2)
    } else {
        let k = first & 0x7f;
        if k == 0 || k > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..k {
            len = (len << 8) | usize::from(*b.get(2 + i)?);
        }
        (len, 2 + k)
    };
    Some((tag, b.get(start..start.checked_add(len)?)?))
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

/// The claims crier reads; the others are the app's. Both spellings of the channel list are
/// accepted: a top-level key `"crier.subscribe"` and `{"crier": {"subscribe": [...]}}`.
/// A claim of another shape allows nothing.
#[derive(Deserialize)]
struct Claims {
    #[serde(rename = "crier.subscribe", default)]
    flat: Option<serde_json::Value>,
    #[serde(default)]
    crier: Option<serde_json::Value>,
}

impl Claims {
    fn allows(&self, channel: &str) -> bool {
        let nested = self.crier.as_ref().and_then(|c| c.get("subscribe"));
        [self.flat.as_ref(), nested]
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_array)
            .flatten()
            .filter_map(serde_json::Value::as_str)
            .any(|pattern| channel_matches(pattern, channel))
    }
}

/// A channel pattern: a name, or a name prefix followed by `*` (at least one character must
/// stand for the `*`): `orders.*` allows `orders.1` but neither `orders` nor `ordersX`; `*` alone
/// allows every channel. A `*` anywhere else is literal, and no channel holds one.
pub fn channel_matches(pattern: &str, channel: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => channel.len() > prefix.len() && channel.starts_with(prefix),
        None => pattern == channel,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_only_at_the_end() {
        assert!(channel_matches("orders.*", "orders.1"));
        assert!(channel_matches("orders.*", "orders.1.items"));
        assert!(!channel_matches("orders.*", "orders"));
        assert!(!channel_matches("orders.*", "orders."));
        assert!(!channel_matches("orders.*", "ordersX"));
        assert!(!channel_matches("orders.*", "xorders.1"));
        assert!(channel_matches("*", "anything"));
        assert!(!channel_matches("*", ""));
        assert!(channel_matches("news", "news"));
        assert!(!channel_matches("news", "news2"));
        assert!(!channel_matches("news", "new"));
        assert!(!channel_matches("or*ders", "orXders"));
        assert!(!channel_matches("", "x"));
    }

    #[test]
    fn both_claim_spellings() {
        let flat: Claims =
            serde_json::from_str(r#"{"crier.subscribe":["a","b.*"]}"#).expect("test setup");
        assert!(flat.allows("a") && flat.allows("b.1") && !flat.allows("c"));
        let nested: Claims =
            serde_json::from_str(r#"{"crier":{"subscribe":["orders.*"]}}"#).expect("test setup");
        assert!(nested.allows("orders.7") && !nested.allows("orders"));
        let none: Claims = serde_json::from_str(r#"{"sub":"u1"}"#).expect("test setup");
        assert!(!none.allows("a"));
        let wrong_shape: Claims =
            serde_json::from_str(r#"{"crier.subscribe":"*"}"#).expect("test setup");
        assert!(!wrong_shape.allows("a"), "a string is not a list");
    }
}
