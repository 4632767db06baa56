//! ClusterRunner's message digest (spec §3) and session check (spec §1.4). The check is
//! ClusterRunner's: it runs after route resolution (an unknown route is 404 whatever the session)
//! and its 412 carries `child_routes` on GETs, so it is not a router layer; the `Session-Id`
//! response header is (crate::session).
use crate::error::ApiError;
use crate::session::SESSION_HEADER;
use axum::http::HeaderMap;

/// Header carrying the hex HMAC-SHA512 of the body.
pub const DIGEST_HEADER: &str = "Clusterrunner-Message-Authentication-Digest";
/// Request header a client uses to insist on a session.
pub const EXPECTED_SESSION_HEADER: &str = "Expected-Session-Id";

/// ClusterRunner's 401 message.
pub const DIGEST_MISMATCH: &str =
    "Message digest does not match header, message not authenticated.";

/// 412 when the request names a session that is not this gateway's.
pub fn check_session(headers: &HeaderMap, session_id: &str) -> Result<(), ApiError> {
    for name in [SESSION_HEADER, EXPECTED_SESSION_HEADER] {
        if let Some(v) = headers.get(name) {
            let v = String::from_utf8_lossy(v.as_bytes());
            if v != session_id {
                return Err(ApiError::SessionExpired(v.into_owned()));
            }
        }
    }
    Ok(())
}

/// 401 unless the digest header is the HMAC-SHA512 of `body` under `secret` (constant-time
/// comparison; a missing header counts as empty and fails).
pub fn check_digest(headers: &HeaderMap, secret: &str, body: &[u8]) -> Result<(), ApiError> {
    let presented = headers
        .get(DIGEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ish_core::auth::verify_digest(secret, body, presented) {
        Ok(())
    } else {
        Err(ApiError::Unauthenticated(DIGEST_MISMATCH.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn session_check() {
        let mut h = HeaderMap::new();
        assert!(check_session(&h, "abc").is_ok());
        h.insert(SESSION_HEADER, HeaderValue::from_static("abc"));
        assert!(check_session(&h, "abc").is_ok());
        h.insert(EXPECTED_SESSION_HEADER, HeaderValue::from_static("old"));
        let e = check_session(&h, "abc").unwrap_err();
        assert_eq!(e.status().as_u16(), 412);
        assert_eq!(
            e.to_string(),
            "Specified session id: old has expired and is invalid."
        );
    }

    #[test]
    fn digest_check() {
        let secret = "s3cr3t-value";
        let body = br#"{"type": "directory"}"#;
        let mut h = HeaderMap::new();
        let e = check_digest(&h, secret, body).unwrap_err();
        assert_eq!(
            (e.status().as_u16(), e.to_string()),
            (401, DIGEST_MISMATCH.into())
        );
        h.insert(
            DIGEST_HEADER,
            HeaderValue::from_str(&ish_core::auth::digest(secret, body)).unwrap(),
        );
        assert!(check_digest(&h, secret, body).is_ok());
        assert!(check_digest(&h, secret, b"{}").is_err());
        assert!(check_digest(&h, "another-secret", body).is_err());
    }
}
