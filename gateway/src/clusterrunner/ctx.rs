//! One resolved ClusterRunner request ([`Ctx`]) and how its JSON answers are written.
use super::json::{self, BuildJson};
use super::params::Query;
use super::routes::{ChildRoutes, Matched, Tree};
use crate::error::ApiError;
use crate::state::AppState;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use ish_core::proto;
use serde::Serialize;
use serde::ser::SerializeMap;

/// One request, resolved.
pub(super) struct Ctx<'a> {
    pub(super) state: &'a AppState,
    pub(super) method: &'a Method,
    pub(super) matched: &'a Matched,
    pub(super) version: u8,
    pub(super) headers: &'a HeaderMap,
    pub(super) uri: &'a Uri,
    pub(super) query: Query,
}

/// A JSON object with one key, e.g. `{"build": {...}}`, keeping the value's field order.
pub(super) struct Keyed<T>(pub(super) &'static str, pub(super) T);

impl<T: Serialize> Serialize for Keyed<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(self.0, &self.1)?;
        m.end()
    }
}

#[derive(Serialize)]
struct WithChildRoutes<'a, T> {
    #[serde(flatten)]
    inner: &'a T,
    #[serde(skip_serializing_if = "Option::is_none")]
    child_routes: Option<&'a ChildRoutes>,
}

pub(super) fn json_response<T: Serialize>(
    status: StatusCode,
    payload: &T,
    children: Option<&ChildRoutes>,
) -> Result<Response, ApiError> {
    let bytes = serde_json::to_vec(&WithChildRoutes {
        inner: payload,
        child_routes: children,
    })
    .map_err(|e| ApiError::Internal(format!("serializing a response: {e}")))?;
    Ok(crate::respond::json_bytes(status, bytes))
}

impl Ctx<'_> {
    pub(super) fn json<T: Serialize>(
        &self,
        payload: &T,
        children: Option<&ChildRoutes>,
    ) -> Result<Response, ApiError> {
        json_response(StatusCode::OK, payload, children)
    }

    /// `<scheme>://<host>` as the client addressed the gateway.
    pub(super) fn base_url(&self) -> String {
        let https = self
            .headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p.eq_ignore_ascii_case("https"));
        // The client's Host goes into URLs it and others follow: reflected only when it is a
        // plain `host[:port]`, else the gateway's own address stands in.
        let host = self
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| self.uri.authority().map(|a| a.to_string()))
            .filter(|h| is_plain_authority(h))
            .unwrap_or_else(|| self.state.listen().to_string());
        format!("{}://{host}", if https { "https" } else { "http" })
    }

    /// v2 routes are paginated, v1 (and the docs aliases) return everything.
    pub(super) fn page(&self) -> Result<Option<(u32, u32)>, ApiError> {
        match self.matched.route.tree {
            Tree::V2 => self.query.page().map(Some),
            Tree::V1 | Tree::Docs => Ok(None),
        }
    }

    pub(super) fn builds_json(&self, builds: &[proto::Build]) -> Vec<BuildJson> {
        let base = self.base_url();
        builds.iter().map(|b| json::build(b, &base)).collect()
    }
}

/// Whether `h` is `host[:port]` with a DNS name, an IPv4 address or a bracketed IPv6 address
/// as the host: nothing that could end the authority early (`/ ? # @`), quote or escape.
pub(super) fn is_plain_authority(h: &str) -> bool {
    let (host, port) = match h.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            // The address was checked: the name check below sees a placeholder.
            Some((v6, after)) if v6.parse::<std::net::Ipv6Addr>().is_ok() => {
                match after.strip_prefix(':') {
                    Some(p) => ("ipv6", Some(p)),
                    None if after.is_empty() => ("ipv6", None),
                    None => return false,
                }
            }
            _ => return false,
        },
        None => match h.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (h, None),
        },
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok()
    });
    // One trailing dot (a fully qualified name) is allowed.
    let name = host.strip_suffix('.').unwrap_or(host);
    let host_ok = name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    port_ok && host_ok
}
