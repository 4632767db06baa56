//! Authentication primitives shared by every role.
//!
//! - The cluster secret: slaves, gateways and clients present it to the master as
//!   `authorization: Bearer <secret>` gRPC metadata; the master compares it in constant time.
//! - ClusterRunner's message digest: hex HMAC-SHA512(secret, raw body), used by the REST gateway.
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use sha2::Sha512;
use subtle::ConstantTimeEq;

/// gRPC metadata key that carries the cluster secret.
pub const AUTH_METADATA_KEY: &str = "authorization";

/// Shortest secret accepted (ClusterRunner's rule).
pub const MIN_SECRET_LEN: usize = 8;

/// SHA-512 of the empty string: the secret an old ClusterRunner bug produced (their issue #358).
const KNOWN_BAD_SECRET: &str = "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e";

/// Why a configured secret is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Too short to be a secret.
    #[error("the cluster secret must be at least {MIN_SECRET_LEN} characters long")]
    TooShort,
    /// A value known to be public.
    #[error("the cluster secret is a known-insecure value; choose another")]
    KnownBad,
    /// Not valid in an HTTP header.
    #[error("the cluster secret may only contain printable ASCII characters without spaces")]
    NotPrintable,
    /// An empty digest key: every client could sign with it.
    #[error("rest_secret must not be empty")]
    EmptyRestSecret,
}

/// Checks that `secret` can be used as the cluster secret.
pub fn validate_secret(secret: &str) -> Result<(), SecretError> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(SecretError::TooShort);
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SecretError::NotPrintable);
    }
    if secret.eq_ignore_ascii_case(KNOWN_BAD_SECRET) {
        return Err(SecretError::KnownBad);
    }
    Ok(())
}

/// Checks a key of ClusterRunner's message digest (the gateway's `rest_secret`). It is the
/// secret existing ClusterRunner clients were configured with, and ClusterRunner did not impose
/// [`MIN_SECRET_LEN`] on it, so a shorter one is accepted: `Ok(true)` tells the caller to warn
/// that it is weak. Spaces are fine in an HMAC key (it never travels in a header). Empty and
/// known-public keys are refused.
pub fn validate_rest_secret(secret: &str) -> Result<bool, SecretError> {
    if secret.is_empty() {
        return Err(SecretError::EmptyRestSecret);
    }
    match validate_secret(secret) {
        Ok(()) | Err(SecretError::NotPrintable) => Ok(false),
        Err(SecretError::TooShort) => Ok(true),
        Err(e) => Err(e),
    }
}

/// A fresh random secret: 64 characters of `[a-z0-9]` from the OS CSPRNG.
pub fn generate_secret() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..64)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Constant-time comparison of a presented secret with the expected one. Only the length can
/// leak, which is not secret (and the expected secret is random and long).
pub fn secrets_match(expected: &str, presented: &str) -> bool {
    expected.as_bytes().ct_eq(presented.as_bytes()).into()
}

/// The metadata value a client sends: `Bearer <secret>`.
pub fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

/// Checks the `authorization` metadata of an incoming gRPC request.
pub fn check_metadata(
    expected_secret: &str,
    metadata: &tonic::metadata::MetadataMap,
) -> Result<(), tonic::Status> {
    let presented = metadata
        .get(AUTH_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        None => Err(tonic::Status::unauthenticated(
            "missing cluster secret: send `authorization: Bearer <secret>` (ish --secret / ISH_SECRET)",
        )),
        Some(p) if secrets_match(expected_secret, p) => Ok(()),
        Some(_) => Err(tonic::Status::unauthenticated(
            "wrong cluster secret (check --secret / ISH_SECRET on both sides)",
        )),
    }
}

/// A client interceptor that adds the cluster secret to every call.
#[derive(Clone)]
pub struct SecretInterceptor {
    value: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl std::fmt::Debug for SecretInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretInterceptor(..)")
    }
}

impl SecretInterceptor {
    /// An interceptor presenting `secret`.
    pub fn new(secret: &str) -> Result<Self, SecretError> {
        let value = bearer(secret)
            .parse()
            .map_err(|_| SecretError::NotPrintable)?;
        Ok(Self { value })
    }
}

impl tonic::service::Interceptor for SecretInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert(AUTH_METADATA_KEY, self.value.clone());
        Ok(req)
    }
}

/// ClusterRunner's message digest: lower-case hex HMAC-SHA512 of `body` keyed by `secret`.
pub fn digest(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha512>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

/// Verifies a ClusterRunner digest header value in constant time.
pub fn verify_digest(secret: &str, body: &[u8], presented_hex: &str) -> bool {
    let Some(tag) = unhex(presented_hex.trim()) else {
        return false;
    };
    let mut mac =
        Hmac::<Sha512>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&tag).is_ok()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    // from_str_radix alone would accept a leading `+` ("+7" == "07").
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_rules() {
        assert_eq!(validate_secret("short"), Err(SecretError::TooShort));
        assert_eq!(
            validate_secret(KNOWN_BAD_SECRET),
            Err(SecretError::KnownBad)
        );
        assert_eq!(
            validate_secret("has space in it"),
            Err(SecretError::NotPrintable)
        );
        assert!(validate_secret(&generate_secret()).is_ok());
        assert_ne!(generate_secret(), generate_secret());
    }

    #[test]
    fn rest_secret_rules() {
        // Short keys of existing ClusterRunner clients work, with a warning.
        assert_eq!(validate_rest_secret("abc"), Ok(true));
        assert_eq!(validate_rest_secret("1234567"), Ok(true));
        assert_eq!(validate_rest_secret("12345678"), Ok(false));
        assert_eq!(validate_rest_secret("has space in it"), Ok(false));
        assert_eq!(validate_rest_secret(""), Err(SecretError::EmptyRestSecret));
        assert_eq!(
            validate_rest_secret(KNOWN_BAD_SECRET),
            Err(SecretError::KnownBad)
        );
    }

    #[test]
    fn secret_compare() {
        assert!(secrets_match("abcdefgh", "abcdefgh"));
        assert!(!secrets_match("abcdefgh", "abcdefgi"));
        assert!(!secrets_match("abcdefgh", "abcdefg"));
    }

    #[test]
    fn metadata_check() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(
            check_metadata("s3cr3t-xx", &md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        md.insert(AUTH_METADATA_KEY, bearer("wrong-one").parse().unwrap());
        assert_eq!(
            check_metadata("s3cr3t-xx", &md).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        md.insert(AUTH_METADATA_KEY, bearer("s3cr3t-xx").parse().unwrap());
        assert!(check_metadata("s3cr3t-xx", &md).is_ok());
    }

    /// RFC 4231 test case 2 (HMAC-SHA-512, key "Jefe").
    #[test]
    fn digest_matches_rfc4231() {
        let d = digest("Jefe", b"what do ya want for nothing?");
        assert_eq!(
            d,
            "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"
        );
        assert!(verify_digest("Jefe", b"what do ya want for nothing?", &d));
        assert!(verify_digest(
            "Jefe",
            b"what do ya want for nothing?",
            &d.to_uppercase()
        ));
        assert!(!verify_digest("Jefe", b"what do ya want for nothing!", &d));
        assert!(!verify_digest(
            "Jefe",
            b"what do ya want for nothing?",
            "zz"
        ));
        assert!(!verify_digest("Jefe", b"what do ya want for nothing?", ""));
    }
}
