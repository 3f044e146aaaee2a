//! Encryption at rest for model checkpoints and stored updates: AES-256-GCM. Pure: the
//! binaries read the key (a 0600 key file or an environment variable) and the files; this
//! module only turns bytes into sealed bytes and back.
//!
//! # Sealed format
//!
//! ```text
//! "FPSEAL1" (7 bytes) | key id (8 bytes) | nonce (12 bytes) | ciphertext | GCM tag (16 bytes)
//! ```
//!
//! - key id: the first 8 bytes of SHA-256(`"fedpriv seal key id\0"` ‖ key), so a file opened
//!   with another key is reported as such instead of as damage (it reveals nothing usable
//!   about a 256-bit key);
//! - nonce: 96 random bits from the OS (`ring::rand::SystemRandom`) per file; random nonces
//!   are safe for well over a million files per key (the limit is about 2^32);
//! - the GCM associated data is the 27-byte header followed by the caller's `aad`, which
//!   binds a file to its purpose (e.g. `b"checkpoint/study-7/round-12"`): a file copied
//!   into another slot, a changed header byte, a changed or missing ciphertext byte all fail
//!   authentication. Nothing is ever returned that did not authenticate.
//!
//! # Key material
//!
//! 64 hex characters (surrounding whitespace, such as a trailing newline, ignored): what
//! [`generate_key_hex`] makes and what a key file or environment variable holds.

use std::fmt;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// First bytes of every sealed file.
pub const MAGIC: &[u8; 7] = b"FPSEAL1";

/// Bytes of the key id.
pub const KEY_ID_LEN: usize = 8;

/// Bytes before the ciphertext.
pub const HEADER_LEN: usize = MAGIC.len() + KEY_ID_LEN + NONCE_LEN;

/// Bytes of the GCM tag after the ciphertext.
pub const TAG_LEN: usize = 16;

/// Bytes of an AES-256 key.
pub const KEY_LEN: usize = 32;

const KEY_ID_DOMAIN: &[u8] = b"fedpriv seal key id\0";

/// Errors of sealing and opening. None of them carries key or plaintext bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("seal key must be {} hex characters (got {got} characters after trimming whitespace)", KEY_LEN * 2)]
    KeyLength { got: usize },
    #[error("seal key contains a character that is not a hex digit")]
    KeyNotHex,
    #[error("seal key is all zeros (a placeholder, not a key)")]
    KeyAllZero,
    #[error(
        "not a sealed file (no FPSEAL1 header): plaintext, another format, or damaged at the start"
    )]
    NotSealed,
    #[error("sealed file is truncated: {len} bytes, shorter than the {} of an empty sealed file", HEADER_LEN + TAG_LEN)]
    Truncated { len: usize },
    #[error("sealed with another key (key id {file_key_id}, ours is {our_key_id})")]
    WrongKey {
        file_key_id: String,
        our_key_id: String,
    },
    #[error("sealed file does not authenticate: it was altered or truncated, or it belongs to another purpose (associated data differs); nothing was decrypted")]
    Authentication,
    #[error("the operating system's random generator failed")]
    Random,
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// An AES-256-GCM key. `Debug` shows only its key id.
pub struct SealKey {
    key: LessSafeKey,
    id: [u8; KEY_ID_LEN],
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealKey")
            .field("id", &hex(&self.id))
            .finish()
    }
}

impl SealKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Result<Self, SealError> {
        if bytes.iter().all(|&b| b == 0) {
            return Err(SealError::KeyAllZero);
        }
        let unbound = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| SealError::Internal("AES-256-GCM refused a 32-byte key"))?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(KEY_ID_DOMAIN);
        ctx.update(bytes);
        let digest = ctx.finish();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest.as_ref()[..KEY_ID_LEN]);
        Ok(SealKey {
            key: LessSafeKey::new(unbound),
            id,
        })
    }

    /// A key from key material as read from a key file or an environment variable: 64 hex
    /// characters, surrounding whitespace ignored.
    pub fn from_material(material: &[u8]) -> Result<Self, SealError> {
        let text = material.trim_ascii();
        if text.len() != KEY_LEN * 2 {
            return Err(SealError::KeyLength { got: text.len() });
        }
        let mut bytes = [0u8; KEY_LEN];
        for (out, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            *out = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
        }
        let key = Self::from_bytes(&bytes);
        // Do not leave the key on the stack longer than needed.
        bytes.fill(0);
        key
    }

    /// The key id written in every file this key seals (hex), for messages and key
    /// rotation bookkeeping.
    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }
}

/// Fresh key material (64 hex characters) from the OS random generator.
pub fn generate_key_hex() -> Result<String, SealError> {
    let mut bytes = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| SealError::Random)?;
    let out = hex(&bytes);
    bytes.fill(0);
    Ok(out)
}

/// Whether `bytes` start like a sealed file (not whether they open).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Encrypts `plaintext` for the purpose named by `aad`.
pub fn seal(key: &SealKey, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| SealError::Random)?;
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&key.id);
    out.extend_from_slice(&nonce);
    let full_aad = [&out[..HEADER_LEN], aad].concat();
    out.extend_from_slice(plaintext);
    let tag = key
        .key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&full_aad),
            &mut out[HEADER_LEN..],
        )
        .map_err(|_| SealError::Internal("AES-256-GCM refused to seal"))?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Decrypts a sealed file for the purpose named by `aad`. Returns the plaintext only if
/// the key, the purpose and every byte are right.
pub fn open(key: &SealKey, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
    if !is_sealed(sealed) {
        return Err(SealError::NotSealed);
    }
    if sealed.len() < HEADER_LEN + TAG_LEN {
        return Err(SealError::Truncated { len: sealed.len() });
    }
    let file_id = &sealed[MAGIC.len()..MAGIC.len() + KEY_ID_LEN];
    if file_id != key.id {
        return Err(SealError::WrongKey {
            file_key_id: hex(file_id),
            our_key_id: hex(&key.id),
        });
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[MAGIC.len() + KEY_ID_LEN..HEADER_LEN]);
    let full_aad = [&sealed[..HEADER_LEN], aad].concat();
    let mut buf = sealed[HEADER_LEN..].to_vec();
    let plain_len = key
        .key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&full_aad),
            &mut buf,
        )
        .map_err(|_| SealError::Authentication)?
        .len();
    buf.truncate(plain_len);
    Ok(buf)
}

fn hex_digit(c: u8) -> Result<u8, SealError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(SealError::KeyNotHex),
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const AAD: &[u8] = b"checkpoint/study-7/round-12";

    fn key(byte: u8) -> SealKey {
        SealKey::from_bytes(&[byte; KEY_LEN]).expect("key")
    }

    #[test]
    fn round_trip_and_fresh_nonces() {
        let k = key(7);
        let msg = b"weights: 0.25 0.5 0.75".repeat(100);
        let a = seal(&k, &msg, AAD).expect("seal");
        let b = seal(&k, &msg, AAD).expect("seal");
        assert_ne!(a, b, "each seal draws a fresh nonce");
        assert!(a.starts_with(MAGIC));
        assert_eq!(a.len(), HEADER_LEN + msg.len() + TAG_LEN);
        assert!(
            !a.windows(8).any(|w| w == b"weights:"),
            "ciphertext leaks plaintext"
        );
        assert_eq!(open(&k, &a, AAD).expect("open"), msg);
        assert_eq!(
            open(&k, &seal(&k, b"", AAD).expect("seal"), AAD).expect("open"),
            b""
        );
    }

    #[test]
    fn wrong_key_is_named() {
        let sealed = seal(&key(1), b"secret", AAD).expect("seal");
        let err = open(&key(2), &sealed, AAD).expect_err("wrong key");
        assert!(matches!(err, SealError::WrongKey { .. }), "{err}");
    }

    #[test]
    fn wrong_aad_fails() {
        let k = key(3);
        let sealed = seal(&k, b"secret", AAD).expect("seal");
        assert_eq!(
            open(&k, &sealed, b"checkpoint/study-7/round-13"),
            Err(SealError::Authentication)
        );
        assert_eq!(open(&k, &sealed, b""), Err(SealError::Authentication));
    }

    #[test]
    fn every_tampered_byte_fails() {
        let k = key(4);
        let sealed = seal(&k, b"0123456789abcdef", AAD).expect("seal");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            let err = open(&k, &bad, AAD).expect_err("tampered byte must fail");
            let expected = if i < MAGIC.len() {
                SealError::NotSealed
            } else if i < MAGIC.len() + KEY_ID_LEN {
                // A changed key id reads as another key; either way nothing decrypts.
                match err {
                    SealError::WrongKey { .. } => continue,
                    other => panic!("byte {i}: {other}"),
                }
            } else {
                SealError::Authentication
            };
            assert_eq!(err, expected, "byte {i}");
        }
    }

    #[test]
    fn truncation_fails() {
        let k = key(5);
        let sealed = seal(&k, b"0123456789abcdef", AAD).expect("seal");
        for len in 0..sealed.len() {
            let err = open(&k, &sealed[..len], AAD).expect_err("truncated must fail");
            assert!(
                matches!(
                    err,
                    SealError::NotSealed | SealError::Truncated { .. } | SealError::Authentication
                ),
                "len {len}: {err}"
            );
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert_eq!(open(&k, &longer, AAD), Err(SealError::Authentication));
    }

    #[test]
    fn plaintext_is_not_sealed() {
        let err = open(&key(6), b"\x93NUMPY or safetensors bytes", AAD).expect_err("plain");
        assert_eq!(err, SealError::NotSealed);
    }

    #[test]
    fn key_material_parsing() {
        let hex_key = generate_key_hex().expect("rng");
        assert_eq!(hex_key.len(), 64);
        let a = SealKey::from_material(format!("  {hex_key}\n").as_bytes()).expect("parse");
        let b = SealKey::from_material(hex_key.to_uppercase().as_bytes()).expect("parse");
        assert_eq!(a.id_hex(), b.id_hex());
        let sealed = seal(&a, b"x", AAD).expect("seal");
        assert_eq!(open(&b, &sealed, AAD).expect("open"), b"x");

        assert_eq!(
            SealKey::from_material(&hex_key.as_bytes()[..32]).map(|_| ()),
            Err(SealError::KeyLength { got: 32 })
        );
        let mut not_hex = hex_key.clone().into_bytes();
        not_hex[10] = b'g';
        assert_eq!(
            SealKey::from_material(&not_hex).map(|_| ()),
            Err(SealError::KeyNotHex)
        );
        assert_eq!(
            SealKey::from_material("0".repeat(64).as_bytes()).map(|_| ()),
            Err(SealError::KeyAllZero)
        );
        // Raw bytes are not key material: only hex text is accepted.
        assert!(SealKey::from_material(&[0x41u8; 32]).is_err());
        // Debug never shows the key.
        let dbg = format!("{a:?}");
        assert!(
            !dbg.contains(&hex_key) && dbg.contains(&a.id_hex()),
            "{dbg}"
        );
    }
}
