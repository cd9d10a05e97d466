//! JWT verification keys (`[push.jwt]`): an HS256 secret, or an RS256/ES256 public key, read
//! and checked when the config is loaded, so a bad key file is a config error and SIGHUP
//! re-reads it.

use std::fmt;
use std::path::Path;

use jsonwebtoken::{DecodingKey, DecodingKeyKind};

use super::secret::read_secret_file;
use crate::config::JwtAlgorithm;

/// An HS256 secret shorter than this is refused (RFC 7518 §3.2: at least the hash size).
pub const MIN_SECRET_BYTES: usize = 32;

/// The key one location checks tokens with, and its one algorithm.
#[derive(Clone)]
pub struct JwtKey {
    algorithm: JwtAlgorithm,
    key: DecodingKey,
}

impl fmt::Debug for JwtKey {
    /// Never prints the key: an HS256 secret must not end up in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl JwtKey {
    /// Reads the key file of `algorithm` (a secret for HS256, a PEM public key or certificate
    /// for RS256/ES256). The error names the file and says what is wrong with it.
    pub fn load(algorithm: JwtAlgorithm, path: &Path) -> Result<JwtKey, String> {
        let file = path.display();
        let key = match algorithm {
            JwtAlgorithm::Hs256 => {
                let secret = read_secret_file(path)?;
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
        Ok(JwtKey { algorithm, key })
    }

    pub fn algorithm(&self) -> JwtAlgorithm {
        self.algorithm
    }

    pub fn decoding_key(&self) -> &DecodingKey {
        &self.key
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
