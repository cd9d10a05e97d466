//! The VAPID key (RFC 8292): the application server's P-256 key pair, read from a PEM file
//! or made by `crier vapid generate`, and the ES256 JWT it signs. Everything P-256 runs on
//! aws-lc-rs (the TLS crypto): the key pair and public point here, the JWT through
//! jsonwebtoken's aws-lc-rs encoder, and the per-message ECDH in `webpush::crypto`.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

#[derive(Debug, thiserror::Error)]
pub enum VapidError {
    #[error("cannot read it: {0}")]
    Read(std::io::Error),
    #[error("not a P-256 private key in PEM (PKCS#8 \"PRIVATE KEY\" or SEC1 \"EC PRIVATE KEY\"); `crier vapid generate PATH` writes one")]
    BadKey,
    #[error("{0}: already exists; not overwriting a key (subscriptions made with it would stop working)")]
    Exists(String),
    #[error("{0}: {1}")]
    Write(String, std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// The VAPID key pair. Cheap to clone.
#[derive(Clone)]
pub struct VapidKey {
    /// The private key as PKCS#8 DER, which jsonwebtoken's ES256 encoder takes.
    signing: Arc<EncodingKey>,
    /// The uncompressed public point, base64url: the page's `applicationServerKey` and the
    /// `k=` of every Authorization header.
    public_b64: String,
}

impl fmt::Debug for VapidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VapidKey({})", self.public_b64)
    }
}

impl VapidKey {
    fn from_pair(pair: &EcdsaKeyPair) -> Result<VapidKey, VapidError> {
        let pkcs8 = pair.to_pkcs8v1().map_err(|_| VapidError::BadKey)?;
        Ok(VapidKey {
            signing: Arc::new(EncodingKey::from_ec_der(pkcs8.as_ref())),
            public_b64: URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
        })
    }

    /// Reads a PEM private key: PKCS#8 (what `crier vapid generate` and `openssl genpkey`
    /// write) or SEC1 (`openssl ecparam -genkey`).
    pub fn load(path: &Path) -> Result<VapidKey, VapidError> {
        let pem = std::fs::read_to_string(path).map_err(VapidError::Read)?;
        Self::from_pem(&pem)
    }

    pub fn from_pem(pem: &str) -> Result<VapidKey, VapidError> {
        let der = ["PRIVATE KEY", "EC PRIVATE KEY"]
            .iter()
            .find_map(|label| pem_body(pem, label))
            .ok_or(VapidError::BadKey)?;
        let pair = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
            .map_err(|_| VapidError::BadKey)?;
        Self::from_pair(&pair)
    }

    /// A new key, written to `path` as PKCS#8 PEM with mode 0600 (never over an existing file).
    pub fn generate(path: &Path) -> Result<VapidKey, VapidError> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| VapidError::Other("cannot make a P-256 key".into()))?;
        let der = pair
            .to_pkcs8v1()
            .map_err(|_| VapidError::Other("cannot encode the key".into()))?;
        let name = path.display().to_string();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => VapidError::Exists(name.clone()),
                _ => VapidError::Write(name.clone(), e),
            })?;
        f.write_all(pem_encode("PRIVATE KEY", der.as_ref()).as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| VapidError::Write(name, e))?;
        Self::from_pair(&pair)
    }

    pub fn public_key_b64(&self) -> &str {
        &self.public_b64
    }

    /// `vapid t=<ES256 JWT>, k=<public key>` for the push service at `audience` (its origin).
    pub fn authorization(
        &self,
        audience: &str,
        subject: &str,
        exp: u64,
    ) -> Result<String, VapidError> {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("JWT".into());
        let claims = serde_json::json!({ "aud": audience, "exp": exp, "sub": subject });
        let jwt = jsonwebtoken::encode(&header, &claims, &self.signing)
            .map_err(|e| VapidError::Other(format!("cannot sign the VAPID JWT: {e}")))?;
        Ok(format!("vapid t={jwt}, k={}", self.public_b64))
    }
}

/// The DER inside `-----BEGIN {label}-----` … `-----END {label}-----`, if the text has it.
fn pem_body(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let b64: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    STANDARD.decode(b64).ok().filter(|d| !d.is_empty())
}

/// PEM with 64-character lines.
fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generate_writes_0600_and_loads_back_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("vapid.pem");
        let k = VapidKey::generate(&p).expect("generates");
        let mode = std::fs::metadata(&p).expect("exists").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = VapidKey::load(&p).expect("loads");
        assert_eq!(back.public_key_b64(), k.public_key_b64());
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(k.public_key_b64())
                .expect("base64url")
                .len(),
            65
        );
        assert!(matches!(VapidKey::generate(&p), Err(VapidError::Exists(_))));
        assert!(matches!(
            VapidKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            Err(VapidError::BadKey)
        ));
        assert!(matches!(
            VapidKey::from_pem("hello"),
            Err(VapidError::BadKey)
        ));
    }

    /// A SEC1 key as `openssl ecparam -name prime256v1 -genkey -noout` writes it.
    #[test]
    fn reads_sec1_keys() {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("key");
        let sec1_der = pair.private_key().as_der().expect("der");
        let pem = pem_encode("EC PRIVATE KEY", sec1_der.as_ref());
        let k = VapidKey::from_pem(&pem).expect("SEC1 loads");
        assert_eq!(
            k.public_key_b64(),
            URL_SAFE_NO_PAD.encode(pair.public_key().as_ref())
        );
    }
}
