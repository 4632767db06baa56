//! Request bodies in ClusterRunner's two encodings (spec §1.3).
//!
//! The encoded body is the value of a `__encoded_body__` argument (form-urlencoded body field,
//! else query parameter) when there is one, otherwise the raw body bytes. The decoded body is its
//! JSON; an empty encoded body decodes to `{}`. The digest (spec §3) is checked over the encoded
//! body: the bytes that are actually decoded and acted on.
use super::params::Query;
use crate::error::ApiError;
use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use serde_json::Value;

/// Name of the form field / query parameter that carries a JSON body.
pub const ENCODED_BODY_FIELD: &str = "__encoded_body__";

/// A request body after ClusterRunner's decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The bytes the JSON came from (and the digest covers).
    pub encoded: Bytes,
    /// The JSON.
    pub value: Value,
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// The encoded body of a request (see the module docs).
pub fn encoded(headers: &HeaderMap, query: &Query, raw: &Bytes) -> Bytes {
    // Like Tornado's get_argument: body arguments come after query arguments and the last wins.
    // A raw JSON body sent as form data (`curl -d '{...}'`) has no such field and stays raw.
    if is_form(headers)
        && let Ok(fields) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(raw)
        && let Some((_, v)) = fields
            .into_iter()
            .rev()
            .find(|(k, _)| k == ENCODED_BODY_FIELD)
    {
        return Bytes::from(v);
    }
    match query.get(ENCODED_BODY_FIELD) {
        Some(v) => Bytes::from(v.to_string()),
        None => raw.clone(),
    }
}

/// Decodes a request body: `{}` when empty, 400 "Invalid JSON in request body." when not JSON.
pub fn decode(headers: &HeaderMap, query: &Query, raw: &Bytes) -> Result<Decoded, ApiError> {
    let encoded = encoded(headers, query, raw);
    let value = if encoded.is_empty() {
        Value::Object(Default::default())
    } else {
        serde_json::from_slice(&encoded)
            .map_err(|_| ApiError::BadRequest("Invalid JSON in request body.".into()))?
    };
    Ok(Decoded { encoded, value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use serde_json::json;

    fn form() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
        );
        h
    }

    #[test]
    fn raw_json_body() {
        let raw = Bytes::from_static(br#"{"type": "git"}"#);
        let d = decode(&HeaderMap::new(), &Query::default(), &raw).unwrap();
        assert_eq!(d.value, json!({"type": "git"}));
        assert_eq!(d.encoded, raw);
        // curl -d: form content type, but no __encoded_body__ field: the raw body is the JSON.
        let d = decode(&form(), &Query::default(), &raw).unwrap();
        assert_eq!(d.value, json!({"type": "git"}));
    }

    #[test]
    fn encoded_body_field() {
        let raw = Bytes::from_static(b"__encoded_body__=%7B%22type%22%3A+%22git%22%7D&x=1");
        let d = decode(&form(), &Query::default(), &raw).unwrap();
        assert_eq!(d.value, json!({"type": "git"}));
        assert_eq!(&d.encoded[..], br#"{"type": "git"}"#);
        // The field only counts in a form body.
        assert!(decode(&HeaderMap::new(), &Query::default(), &raw).is_err());
        // The query parameter works too; a body field wins over it.
        let q = Query::parse(Some("__encoded_body__=%7B%22a%22%3A1%7D"));
        let d = decode(&HeaderMap::new(), &q, &Bytes::new()).unwrap();
        assert_eq!(d.value, json!({"a": 1}));
        let d = decode(&form(), &q, &raw).unwrap();
        assert_eq!(d.value, json!({"type": "git"}));
    }

    #[test]
    fn empty_and_invalid() {
        let d = decode(&HeaderMap::new(), &Query::default(), &Bytes::new()).unwrap();
        assert_eq!(d.value, json!({}));
        let e = decode(
            &HeaderMap::new(),
            &Query::default(),
            &Bytes::from_static(b"{nope"),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "Invalid JSON in request body.");
    }
}
