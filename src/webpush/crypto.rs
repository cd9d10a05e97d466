//! RFC 8291 message encryption (aes128gcm, RFC 8188) for one subscription.
//!
//! The record layer is `ece-native` (the RFC 8188 code `web-push-native` is built on); the
//! RFC 8291 key agreement in front of it is the few lines below. It is ours rather than
//! `web_push_native::encrypt` because that one picks its salt and ephemeral key internally, so
//! the RFC's Appendix A vector could not be reproduced against the code that runs in
//! production. Every P-256 operation (checking the browser's key when it arrives; per message
//! and subscription a fresh key and the ECDH) runs on aws-lc-rs, crier's TLS crypto: about 5x
//! faster than RustCrypto's `p256` (196 µs per encryption with `p256` in a release build
//! here), and they are the whole cost of a large fan-out.

use aws_lc_rs::agreement::{self, ParsedPublicKey, PrivateKey, UnparsedPublicKey, ECDH_P256};
use hkdf::Hkdf;
use sha2::Sha256;

/// The record size written in every message header. One record always suffices: the
/// largest payload a push service must accept (4096 bytes) fits in it.
const RECORD_SIZE: u32 = 4096;

/// Bytes a message body adds to its plaintext: the header (salt 16, record size 4, key id
/// length 1, key id 65), the padding delimiter (1) and the AEAD tag (16).
pub const OVERHEAD: usize = 16 + 4 + 1 + 65 + 1 + 16;

/// The most a push service must accept as a message body (RFC 8030 section 7.2).
pub const MAX_BODY: usize = 4096;

/// The largest plaintext whose encrypted body stays within [`MAX_BODY`].
pub const MAX_PLAINTEXT: usize = MAX_BODY - OVERHEAD;

#[derive(Debug, thiserror::Error)]
pub enum EncryptError {
    #[error("payload of {0} bytes is larger than {MAX_PLAINTEXT}")]
    TooLarge(usize),
    #[error("encryption failed: {0}")]
    Ece(String),
}

/// A subscription's keys, as the browser gave them (`p256dh`, `auth`), already checked.
#[derive(Debug, Clone)]
pub struct UaKeys {
    /// The uncompressed point (65 bytes), checked to be on the curve.
    pub public: [u8; 65],
    pub auth: [u8; 16],
}

impl UaKeys {
    /// Checks the browser's raw keys: `p256dh` an uncompressed point on P-256 (65 bytes,
    /// leading 0x04), `auth` exactly 16 bytes.
    pub fn parse(p256dh: &[u8], auth: &[u8]) -> Result<UaKeys, &'static str> {
        if p256dh.len() != 65 || p256dh[0] != 0x04 {
            return Err("keys.p256dh must be an uncompressed P-256 point (65 bytes, base64url)");
        }
        ParsedPublicKey::try_from(&UnparsedPublicKey::new(&ECDH_P256, p256dh))
            .map_err(|_| "keys.p256dh is not a point on the P-256 curve")?;
        let public: [u8; 65] = p256dh
            .try_into()
            .map_err(|_| "keys.p256dh must be 65 bytes")?;
        let auth: [u8; 16] = auth
            .try_into()
            .map_err(|_| "keys.auth must be 16 bytes (base64url)")?;
        Ok(UaKeys { public, auth })
    }
}

/// Encrypts `plaintext` for one subscription with a fresh salt and ephemeral key.
pub fn encrypt(plaintext: &[u8], ua: &UaKeys) -> Result<Vec<u8>, EncryptError> {
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| EncryptError::Ece("no randomness".into()))?;
    let as_secret = PrivateKey::generate(&ECDH_P256)
        .map_err(|_| EncryptError::Ece("cannot make an ephemeral key".into()))?;
    encrypt_with(plaintext, ua, &as_secret, salt)
}

/// The encryption itself, with the salt and the application server's ephemeral key given
/// (the RFC's test vector fixes both).
pub fn encrypt_with(
    plaintext: &[u8],
    ua: &UaKeys,
    as_secret: &PrivateKey,
    salt: [u8; 16],
) -> Result<Vec<u8>, EncryptError> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(EncryptError::TooLarge(plaintext.len()));
    }
    let as_public = as_secret
        .compute_public_key()
        .map_err(|_| EncryptError::Ece("no public key".into()))?;
    // RFC 8291 section 3.4: IKM = HKDF(auth, ecdh_secret, "WebPush: info" 0 ua_public as_public).
    let mut info = Vec::with_capacity(14 + 65 + 65);
    info.extend_from_slice(b"WebPush: info\0");
    info.extend_from_slice(&ua.public);
    info.extend_from_slice(as_public.as_ref());
    let mut ikm = [0u8; 32];
    agreement::agree(
        as_secret,
        UnparsedPublicKey::new(&ECDH_P256, &ua.public),
        EncryptError::Ece("ECDH with the subscription's key failed".into()),
        |shared| {
            Hkdf::<Sha256>::new(Some(&ua.auth), shared)
                .expand(&info, &mut ikm)
                .map_err(|e| EncryptError::Ece(e.to_string()))
        },
    )?;
    ece_native::encrypt(
        ikm,
        salt,
        as_public.as_ref(),
        std::iter::once(plaintext.to_vec()),
        RECORD_SIZE,
    )
    .map_err(|e| EncryptError::Ece(e.to_string()))
}

/// A browser-like public key: a fresh uncompressed P-256 point.
#[cfg(test)]
pub(super) fn fresh_point() -> Vec<u8> {
    PrivateKey::generate(&ECDH_P256)
        .and_then(|k| k.compute_public_key())
        .map(|p| p.as_ref().to_vec())
        .expect("randomness")
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    fn b(s: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(s).expect("vector is base64url")
    }

    /// RFC 8291 Appendix A, byte for byte.
    #[test]
    fn rfc8291_appendix_a() {
        let ua = UaKeys::parse(
            &b("BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4"),
            &b("BTBZMqHH6r4Tts7J_aSIgg"),
        )
        .expect("the vector's keys are valid");
        let as_secret = PrivateKey::from_private_key(
            &ECDH_P256,
            &b("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw"),
        )
        .expect("the vector's key is valid");
        assert_eq!(
            URL_SAFE_NO_PAD.encode(as_secret.compute_public_key().expect("public")),
            "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8"
        );
        let salt: [u8; 16] = b("DGv6ra1nlYgDCS1FRnbzlw")
            .try_into()
            .expect("16-byte salt");
        let body = encrypt_with(
            b"When I grow up, I want to be a watermelon",
            &ua,
            &as_secret,
            salt,
        )
        .expect("encrypts");
        assert_eq!(
            URL_SAFE_NO_PAD.encode(&body),
            "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27ml\
             mlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPT\
             pK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN"
        );
        assert_eq!(body.len(), 41 + OVERHEAD);
    }

    #[test]
    fn bad_keys_and_sizes() {
        let good = fresh_point();
        assert!(UaKeys::parse(&good, &[0; 16]).is_ok());
        assert!(UaKeys::parse(&good, &[0; 15]).is_err());
        let mut compressed = vec![0x02 | (good[64] & 1)];
        compressed.extend_from_slice(&good[1..33]);
        assert!(UaKeys::parse(&compressed, &[0; 16]).is_err());
        let mut off_curve = good.clone();
        off_curve[64] ^= 1;
        assert!(UaKeys::parse(&off_curve, &[0; 16]).is_err());
        let ua = UaKeys::parse(&good, &[7; 16]).expect("valid");
        assert_eq!(
            encrypt(&vec![b'x'; MAX_PLAINTEXT], &ua)
                .expect("fits")
                .len(),
            MAX_BODY
        );
        assert!(matches!(
            encrypt(&vec![b'x'; MAX_PLAINTEXT + 1], &ua),
            Err(EncryptError::TooLarge(_))
        ));
    }
}
