//! VAPID (RFC 8292): the application server's P-256 key, the ES256 JWT that every push
//! request carries, and a cache of those JWTs per push service.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::HeaderValue;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use p256::SecretKey;
use parking_lot::Mutex;

/// How long a VAPID JWT is valid (RFC 8292 allows at most 24 hours).
const JWT_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// A cached JWT is replaced when it has less than this left, so none expires in flight.
const JWT_RENEW_BEFORE: Duration = Duration::from_secs(3600);

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
    signing: SigningKey,
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
    fn from_secret(secret: SecretKey) -> VapidKey {
        let public_b64 =
            URL_SAFE_NO_PAD.encode(secret.public_key().to_encoded_point(false).as_bytes());
        VapidKey {
            signing: SigningKey::from(secret),
            public_b64,
        }
    }

    /// Reads a PEM private key: PKCS#8 (what `crier vapid generate` and `openssl genpkey`
    /// write) or SEC1 (`openssl ecparam -genkey`).
    pub fn load(path: &Path) -> Result<VapidKey, VapidError> {
        let pem = std::fs::read_to_string(path).map_err(VapidError::Read)?;
        Self::from_pem(&pem)
    }

    pub fn from_pem(pem: &str) -> Result<VapidKey, VapidError> {
        let secret = SecretKey::from_pkcs8_pem(pem)
            .or_else(|_| SecretKey::from_sec1_pem(pem))
            .map_err(|_| VapidError::BadKey)?;
        Ok(VapidKey::from_secret(secret))
    }

    /// A new key, written to `path` as PKCS#8 PEM with mode 0600 (never over an existing file).
    pub fn generate(path: &Path) -> Result<VapidKey, VapidError> {
        let secret =
            super::crypto::random_secret().map_err(|e| VapidError::Other(e.to_string()))?;
        let pem = secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| VapidError::Other(e.to_string()))?;
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
        f.write_all(pem.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| VapidError::Write(name, e))?;
        Ok(VapidKey::from_secret(secret))
    }

    pub fn public_key_b64(&self) -> &str {
        &self.public_b64
    }

    /// `vapid t=<ES256 JWT>, k=<public key>` for the push service at `audience` (its origin).
    pub fn authorization(&self, audience: &str, subject: &str, exp: u64) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = serde_json::json!({ "aud": audience, "exp": exp, "sub": subject });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{claims}");
        // JWS ES256 is the raw r || s (64 bytes), which is what `Signature::to_bytes` gives.
        let sig: Signature = self.signing.sign(signing_input.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(sig.to_bytes());
        format!("vapid t={signing_input}.{sig}, k={}", self.public_b64)
    }
}

/// JWTs by audience, reused until [`JWT_RENEW_BEFORE`] before they expire: signing is per
/// push service and hour, not per message.
pub struct VapidCache {
    key: VapidKey,
    subject: String,
    /// parking_lot: a map lookup or insert, never held while signing or across `.await`.
    by_audience: Mutex<HashMap<String, (HeaderValue, u64)>>,
}

impl VapidCache {
    pub fn new(key: VapidKey, subject: String) -> VapidCache {
        VapidCache {
            key,
            subject,
            by_audience: Mutex::new(HashMap::new()),
        }
    }

    pub fn key(&self) -> &VapidKey {
        &self.key
    }

    pub fn authorization(&self, audience: &str) -> Result<HeaderValue, VapidError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if let Some((v, exp)) = self.by_audience.lock().get(audience) {
            if *exp > now + JWT_RENEW_BEFORE.as_secs() {
                return Ok(v.clone());
            }
        }
        let exp = now + JWT_LIFETIME.as_secs();
        let v = HeaderValue::try_from(self.key.authorization(audience, &self.subject, exp))
            .map_err(|_| VapidError::Other("the subject makes an invalid header".into()))?;
        self.by_audience
            .lock()
            .insert(audience.to_string(), (v.clone(), exp));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    }

    #[test]
    fn the_cache_reuses_a_jwt_per_audience() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = VapidKey::generate(&dir.path().join("k.pem")).expect("generates");
        let c = VapidCache::new(k, "mailto:a@example.com".into());
        let a1 = c.authorization("https://a.example").expect("signs");
        let a2 = c.authorization("https://a.example").expect("signs");
        let b = c.authorization("https://b.example").expect("signs");
        assert_eq!(a1, a2, "same audience: the cached JWT");
        assert_ne!(a1, b);
    }
}
