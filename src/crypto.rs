//! Encryption at rest for token values: AES-256-GCM with a key ring.
//!
//! A sealed value is `v1.<key id>.<base64url(nonce ‖ ciphertext ‖ tag)>`: a fresh 96-bit random
//! nonce per value, and the key id so that values sealed under an older key stay readable after
//! the active key changes (rotation re-seals them, see `mcp-worker tokens reencrypt`). The caller
//! passes a context (collection, user, field) as associated data, so a ciphertext copied into
//! another user's document or another field does not decrypt.
//!
//! The ring also derives, from the active key, the key of [`TokenCipher::pseudonym`]: the form
//! in which a user id may appear in logs.

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::config::{ConfigError, EncryptionSettings};
use crate::secret::Secret;

const FORMAT: &str = "v1";
const NONCE_LEN: usize = 12;
/// Separates the pseudonym key from any other use of the encryption key.
const PSEUDONYM_LABEL: &str = "mcp-worker log pseudonym v1";
/// Hex digits of a pseudonym: 64 bits, enough to tell users apart in logs.
const PSEUDONYM_LEN: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum CryptoError {
    #[error("the value is not an encrypted token (or was encrypted in an unknown format)")]
    NotSealed,
    #[error("the value was encrypted with key `{0}`, which is not in the key ring")]
    UnknownKey(String),
    #[error("the value does not decrypt: wrong key, wrong document, or tampered with")]
    Corrupt,
}

/// The configured keys: one active for sealing, all of them for opening.
pub struct KeyRing {
    active: String,
    keys: BTreeMap<String, Aes256Gcm>,
    /// HMAC key of log pseudonyms, derived from the active key (so it is as secret as that key
    /// and needs no setting of its own).
    pseudonym_key: [u8; 32],
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing").field("active", &self.active).field("key_ids", &self.keys.keys()).finish()
    }
}

/// How token values are stored: sealed, or (development only) as plain text.
#[derive(Debug)]
pub enum TokenCipher {
    Sealed(KeyRing),
    Plaintext,
}

impl KeyRing {
    /// Builds the ring from config; `None` when no key is configured.
    pub(crate) fn from_settings(settings: &EncryptionSettings) -> Result<Option<Self>, ConfigError> {
        let invalid = |key: String, problem: &str| ConfigError::Invalid { key, problem: problem.to_owned() };
        if settings.keys.is_empty() && settings.active_key.is_empty() {
            return Ok(None);
        }
        let active = settings.active_key.to_ascii_lowercase();
        let mut keys = BTreeMap::new();
        let mut pseudonym_key = None;
        for (id, encoded) in &settings.keys {
            let key = format!("encryption.keys.{id}");
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(invalid(key, "key ids may hold only letters, digits, `_` and `-`"));
            }
            let bytes = STANDARD
                .decode(encoded.expose().trim())
                .map_err(|_| invalid(key.clone(), "must be base64 (e.g. from `openssl rand -base64 32`)"))?;
            if bytes.len() != 32 {
                return Err(invalid(key, "must be 32 bytes (256 bits) once base64-decoded"));
            }
            // Ids compare lower-case: keys set through the environment arrive lower-cased.
            let id = id.to_ascii_lowercase();
            if id == active {
                pseudonym_key = Some(hmac_sha256(&bytes, PSEUDONYM_LABEL.as_bytes()));
            }
            keys.insert(id, Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes)));
        }
        let Some(pseudonym_key) = pseudonym_key else {
            return Err(invalid("encryption.active_key".into(), "must name one of the keys in `encryption.keys`"));
        };
        Ok(Some(Self { active, keys, pseudonym_key }))
    }

    pub(crate) fn seal(&self, plaintext: &str, context: &str) -> String {
        let cipher = &self.keys[&self.active];
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ciphertext = cipher
            .encrypt(&nonce, Payload { msg: plaintext.as_bytes(), aad: context.as_bytes() })
            .expect("AES-GCM encryption cannot fail for inputs under 64 GiB");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ciphertext);
        format!("{FORMAT}.{}.{}", self.active, URL_SAFE_NO_PAD.encode(blob))
    }

    pub(crate) fn open(&self, sealed: &str, context: &str) -> Result<Secret<String>, CryptoError> {
        let (key_id, blob) = parse(sealed).ok_or(CryptoError::NotSealed)?;
        let cipher = self.keys.get(key_id).ok_or_else(|| CryptoError::UnknownKey(key_id.to_owned()))?;
        let blob = URL_SAFE_NO_PAD.decode(blob).map_err(|_| CryptoError::NotSealed)?;
        if blob.len() < NONCE_LEN {
            return Err(CryptoError::NotSealed);
        }
        let (nonce, ciphertext) = blob.split_at(NONCE_LEN);
        let plaintext = cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: context.as_bytes() })
            .map_err(|_| CryptoError::Corrupt)?;
        String::from_utf8(plaintext).map(Secret::new).map_err(|_| CryptoError::Corrupt)
    }

    /// Whether `sealed` was sealed with the active key (rotation skips those).
    pub(crate) fn is_current(&self, sealed: &str) -> bool {
        parse(sealed).is_some_and(|(key_id, _)| key_id == self.active)
    }
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        write!(text, "{b:02x}").expect("writing to a String does not fail");
    }
    text
}

fn parse(sealed: &str) -> Option<(&str, &str)> {
    let rest = sealed.strip_prefix(FORMAT)?.strip_prefix('.')?;
    rest.split_once('.')
}

impl TokenCipher {
    /// The cipher the settings ask for. No key configured is refused unless plaintext tokens are
    /// explicitly allowed (development only; logged as a warning).
    pub fn from_settings(settings: &EncryptionSettings) -> Result<Self, ConfigError> {
        match KeyRing::from_settings(settings)? {
            Some(ring) => Ok(TokenCipher::Sealed(ring)),
            None if settings.allow_plaintext_tokens => {
                tracing::warn!("no encryption key configured: tokens are stored in plain text (development only)");
                Ok(TokenCipher::Plaintext)
            }
            None => Err(ConfigError::Invalid {
                key: "encryption.keys".into(),
                problem: "is empty: configure a key (and encryption.active_key), or set \
                          encryption.allow_plaintext_tokens = true for development"
                    .into(),
            }),
        }
    }

    pub(crate) fn seal(&self, plaintext: &Secret<String>, context: &str) -> String {
        match self {
            TokenCipher::Sealed(ring) => ring.seal(plaintext.expose(), context),
            TokenCipher::Plaintext => plaintext.expose().clone(),
        }
    }

    /// The form of `user_id` that may be logged: the same for the same user (while the active
    /// key stays), and not reversible without the key. Without keys (plaintext development mode)
    /// it is an unkeyed hash, which anyone who can guess the id can match.
    pub(crate) fn pseudonym(&self, user_id: &str) -> String {
        match self {
            TokenCipher::Sealed(ring) => {
                hex(&hmac_sha256(&ring.pseudonym_key, user_id.as_bytes())[..PSEUDONYM_LEN / 2])
            }
            TokenCipher::Plaintext => hex(&Sha256::digest(user_id.as_bytes())[..PSEUDONYM_LEN / 2]),
        }
    }

    /// Opens a stored value. In plaintext mode a sealed value is still opened if it can be, which
    /// it cannot without keys, so that mode only reads values it wrote.
    pub(crate) fn open(&self, stored: &str, context: &str) -> Result<Secret<String>, CryptoError> {
        match self {
            TokenCipher::Sealed(ring) => ring.open(stored, context),
            TokenCipher::Plaintext if parse(stored).is_some() => {
                Err(CryptoError::UnknownKey("(no keys configured)".into()))
            }
            TokenCipher::Plaintext => Ok(Secret::new(stored.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(active: &str, keys: &[(&str, u8)]) -> KeyRing {
        let settings = EncryptionSettings {
            active_key: active.into(),
            keys: keys.iter().map(|(id, b)| (id.to_string(), Secret::new(STANDARD.encode([*b; 32])))).collect(),
            allow_plaintext_tokens: false,
        };
        KeyRing::from_settings(&settings).unwrap().unwrap()
    }

    #[test]
    fn seals_and_opens_with_a_fresh_nonce_each_time() {
        let ring = ring("k1", &[("k1", 1)]);
        let a = ring.seal("token", "qlik_tokens/u1/access_token");
        let b = ring.seal("token", "qlik_tokens/u1/access_token");
        assert_ne!(a, b, "the same plaintext must not seal to the same value");
        assert!(a.starts_with("v1.k1.") && !a.contains("token"));
        assert_eq!(ring.open(&a, "qlik_tokens/u1/access_token").unwrap().expose(), "token");
    }

    #[test]
    fn a_value_moved_to_another_context_or_tampered_with_does_not_open() {
        let ring = ring("k1", &[("k1", 1)]);
        let sealed = ring.seal("token", "qlik_tokens/u1/access_token");
        assert_eq!(ring.open(&sealed, "qlik_tokens/u2/access_token").unwrap_err(), CryptoError::Corrupt);
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        assert!(ring.open(std::str::from_utf8(&tampered).unwrap(), "qlik_tokens/u1/access_token").is_err());
        assert_eq!(ring.open("plain", "c").unwrap_err(), CryptoError::NotSealed);
    }

    #[test]
    fn older_keys_still_open_after_rotation() {
        let old = ring("k1", &[("k1", 1)]).seal("token", "c");
        let rotated = ring("k2", &[("k1", 1), ("k2", 2)]);
        assert_eq!(rotated.open(&old, "c").unwrap().expose(), "token");
        assert!(!rotated.is_current(&old));
        assert!(rotated.is_current(&rotated.seal("token", "c")));
        assert_eq!(ring("k2", &[("k2", 2)]).open(&old, "c").unwrap_err(), CryptoError::UnknownKey("k1".into()));
    }

    #[test]
    fn bad_key_configuration_names_the_key() {
        let mut settings = EncryptionSettings {
            active_key: "k1".into(),
            keys: [("k1".to_string(), Secret::new("c2hvcnQ=".to_string()))].into(),
            allow_plaintext_tokens: false,
        };
        assert!(KeyRing::from_settings(&settings).unwrap_err().to_string().contains("encryption.keys.k1"));
        settings.keys.insert("k1".into(), Secret::new(STANDARD.encode([0u8; 32])));
        settings.active_key = "k9".into();
        assert!(KeyRing::from_settings(&settings).unwrap_err().to_string().contains("encryption.active_key"));
    }

    #[test]
    fn no_key_is_refused_unless_plaintext_is_allowed() {
        let mut settings =
            EncryptionSettings { active_key: String::new(), keys: BTreeMap::new(), allow_plaintext_tokens: false };
        let err = TokenCipher::from_settings(&settings).unwrap_err().to_string();
        assert!(err.contains("encryption.keys"), "{err}");
        settings.allow_plaintext_tokens = true;
        let cipher = TokenCipher::from_settings(&settings).unwrap();
        assert_eq!(cipher.seal(&Secret::new("t".into()), "c"), "t");
        assert!(cipher.open(&ring("k1", &[("k1", 1)]).seal("t", "c"), "c").is_err(), "sealed values need a key");
    }

    #[test]
    fn a_pseudonym_is_stable_per_key_and_reveals_nothing_of_the_id() {
        let sealed = TokenCipher::Sealed(ring("k1", &[("k1", 1)]));
        let pseudonym = sealed.pseudonym("alice@example.com");
        assert_eq!(pseudonym.len(), PSEUDONYM_LEN);
        assert!(pseudonym.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(sealed.pseudonym("alice@example.com"), pseudonym);
        assert_ne!(sealed.pseudonym("bob@example.com"), pseudonym);
        // Another key gives another pseudonym: without the key, a guessed id cannot be matched.
        assert_ne!(TokenCipher::Sealed(ring("k2", &[("k2", 2)])).pseudonym("alice@example.com"), pseudonym);
        assert_ne!(TokenCipher::Plaintext.pseudonym("alice@example.com"), pseudonym);
    }

    #[test]
    fn debug_shows_key_ids_only() {
        let printed = format!("{:?}", ring("k1", &[("k1", 7)]));
        assert!(printed.contains("k1") && !printed.contains("BwcH"), "{printed}");
    }
}
