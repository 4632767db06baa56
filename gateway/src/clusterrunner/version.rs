//! `Api-Version` negotiation (spec §1.2).
//!
//! The version only picks the `api_version` of `/version` and which `child_routes` are listed;
//! what a handler does (pagination) follows the URL.
use super::routes::Matched;
use regex::Regex;
use std::sync::LazyLock;

/// API versions ClusterRunner knows.
pub const KNOWN: [u8; 2] = [1, 2];

static ACCEPT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)application/vnd\.clusterrunner\.v(\d+)\+json").expect("valid regex")
});

/// The API version of a request: the one its `Accept` header names when known, else the URL's
/// default (1 under `/v1`, 2 at the root).
pub fn resolve(path: &str, matched: Option<&Matched>, accept: Option<&str>) -> u8 {
    let default = match matched {
        Some(m) => m.route.tree.default_version(),
        None if path.split('/').find(|s| !s.is_empty()) == Some("v1") => 1,
        None => 2,
    };
    accept
        .and_then(|a| ACCEPT.captures(a))
        .and_then(|c| c[1].parse::<u8>().ok())
        .filter(|v| KNOWN.contains(v))
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::super::routes::resolve as route;
    use super::*;

    fn v(path: &str, accept: Option<&str>) -> u8 {
        resolve(path, route(path).as_ref(), accept)
    }

    /// The functional-test vectors of spec §1.2, on both version routes.
    #[test]
    fn negotiation_vectors() {
        let v1 = Some("application/vnd.clusterrunner.v1+json");
        let v2 = Some("application/vnd.clusterrunner.v2+json");
        let v999 = Some("application/vnd.clusterrunner.v999+json");
        assert_eq!(
            [None, v1, v2, v999].map(|a| v("/v1/version", a)),
            [1, 1, 2, 1]
        );
        assert_eq!([None, v1, v2, v999].map(|a| v("/version", a)), [2, 1, 2, 2]);
        assert_eq!(v("/", None), 2);
        assert_eq!(v("/v1/nothing/here", None), 1);
        assert_eq!(v("/nothing", None), 2);
        assert_eq!(
            v(
                "/version",
                Some("text/html, APPLICATION/VND.CLUSTERRUNNER.V1+JSON;q=0.9")
            ),
            1
        );
        assert_eq!(v("/build", None), 1);
    }
}
