//! The coordinator's ed25519 key: it signs every entry's hash.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not {what} ({digits} hex digits expected)")]
    Hex { what: &'static str, digits: usize },
    #[error("not a valid ed25519 public key")]
    PublicKey,
    #[error("cannot draw a random key: {0}")]
    Random(String),
}

fn decode_hex<const N: usize>(text: &str, what: &'static str) -> Result<[u8; N], KeyError> {
    let bad = KeyError::Hex { what, digits: 2 * N };
    let text = text.trim();
    if text.len() != 2 * N || !text.is_ascii() {
        return Err(bad);
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad.clone())?;
    }
    Ok(out)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

/// The coordinator's private signing key (a 32-byte ed25519 seed). Never printed.
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_seed(seed))
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// Parses the seed from 64 hex digits (the format of a key file).
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        Ok(Self::from_seed(decode_hex::<32>(text, "an ed25519 private key")?))
    }

    /// The seed as 64 hex digits, for the key file only.
    pub fn to_hex(&self) -> String {
        self.0.to_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// 32 secret bytes for another purpose (`context` names it), derived from the seed one way:
    /// they reveal nothing of the key, and the key holder can always derive them again.
    pub fn derive_secret(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.0.to_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature(self.0.sign(message).to_bytes())
    }
}

/// An ed25519 public key (compressed, checked to be a valid point when parsed), shown as 64
/// hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Strict verification: rejects small-order keys and non-canonical signatures.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> bool {
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&self.0) else { return false };
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(message, &signature).is_ok() && key.verify(message, &signature).is_ok()
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(text: &str) -> Result<Self, KeyError> {
        let bytes = decode_hex::<32>(text, "an ed25519 public key")?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).map(|_| PublicKey(bytes)).map_err(|_| KeyError::PublicKey)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// An ed25519 signature, shown as 128 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl FromStr for Signature {
    type Err = KeyError;
    fn from_str(text: &str) -> Result<Self, KeyError> {
        Ok(Signature(decode_hex::<64>(text, "an ed25519 signature")?))
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

macro_rules! hex_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
hex_serde!(PublicKey);
hex_serde!(Signature);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies_and_round_trips_through_hex() {
        let key = SigningKey::from_seed([7; 32]);
        let again = SigningKey::from_hex(&key.to_hex()).unwrap();
        assert_eq!(again.public(), key.public());
        let sig = key.sign(b"round 1");
        assert!(key.public().verify(b"round 1", &sig));
        assert!(!key.public().verify(b"round 2", &sig));
        let parsed: Signature = sig.to_string().parse().unwrap();
        assert_eq!(parsed, sig);
        let public: PublicKey = key.public().to_string().parse().unwrap();
        assert!(public.verify(b"round 1", &parsed));
        let other = SigningKey::from_seed([8; 32]).public();
        assert!(!other.verify(b"round 1", &sig));
        assert!("zz".parse::<PublicKey>().is_err());
    }
}
