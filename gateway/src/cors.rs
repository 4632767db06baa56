//! CORS as ClusterRunner did it (spec §1.4): when `cors_allowed_origins_regex` matches the start
//! of the request's `Origin`, the response allows that origin to read it.
use axum::http::{HeaderMap, HeaderValue, header};
use regex::Regex;

/// The configured origin check.
#[derive(Debug, Clone, Default)]
pub struct Cors {
    allowed: Option<Regex>,
}

impl Cors {
    /// CORS for origins matching `pattern` at their start (Python's `re.match`); `None` = off.
    pub fn new(pattern: Option<&str>) -> Result<Self, regex::Error> {
        let allowed = pattern
            .map(|p| Regex::new(&format!("^(?:{p})")))
            .transpose()?;
        Ok(Self { allowed })
    }

    /// Adds the CORS headers to `out` when `request`'s Origin is allowed.
    pub fn apply(&self, request: &HeaderMap, out: &mut HeaderMap) {
        let (Some(re), Some(origin)) = (&self.allowed, request.get(header::ORIGIN)) else {
            return;
        };
        let Ok(o) = origin.to_str() else {
            return;
        };
        // The answer depends on Origin: caches must not serve it to another origin.
        out.append(header::VARY, HeaderValue::from_static("Origin"));
        if re.is_match(o) {
            out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            out.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(
                    "Content-Type, Accept, X-Requested-With, Session, Session-Id",
                ),
            );
            out.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_origin(o: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        h
    }

    #[test]
    fn matches_at_the_start_of_the_origin() {
        let c = Cors::new(Some(r"https?://dash\.example\.com")).unwrap();
        let mut out = HeaderMap::new();
        c.apply(&with_origin("https://dash.example.com"), &mut out);
        assert_eq!(
            out[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://dash.example.com"
        );
        assert_eq!(out[header::ACCESS_CONTROL_ALLOW_METHODS], "GET");
        // re.match anchors at the start only.
        let mut out = HeaderMap::new();
        c.apply(&with_origin("https://dash.example.com.evil.net"), &mut out);
        assert!(out.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
        let mut out = HeaderMap::new();
        c.apply(
            &with_origin("https://evil.net/https://dash.example.com"),
            &mut out,
        );
        assert!(!out.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
        let mut out = HeaderMap::new();
        c.apply(&HeaderMap::new(), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn off_by_default() {
        let mut out = HeaderMap::new();
        Cors::default().apply(&with_origin("https://a"), &mut out);
        assert!(out.is_empty());
        assert!(Cors::new(Some("(")).is_err());
    }
}
