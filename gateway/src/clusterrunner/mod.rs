//! The ClusterRunner master API (spec §1, §3, §4, §11), wire-compatible: its route table, its
//! handlers, its JSON shapes, its digest auth and session check, its Api-Version negotiation
//! and its error bodies. Everything shared by every API (layers, state, master, error type)
//! lives at the crate level; this module is mounted as the router's fallback because
//! ClusterRunner's routes (trailing slashes, `/v1` aliases, docs paths) are resolved by its own
//! table rather than axum's.
//!
//! Order of checks on every request: route (404), session (412), body size (413), then for
//! writes body decoding (400), digest (401) and the handler's own validation; for reads the
//! digest only when `require_auth_for_reads` is on.
//!
//! ```text
//! dispatch ─▶ routes (table, child_routes) + version (Api-Version)
//!    │        auth (session, digest) · body (__encoded_body__) · params
//!    ├─▶ writes (request: JSON → BuildRequest) ─▶ Master
//!    ├─▶ reads ─▶ Master ─▶ json (Build → ClusterRunner objects) · artifacts (archives)
//!    └─▶ errors (ApiError → ClusterRunner's error JSON)
//! ```
use crate::error::ApiError;
use crate::layers::Endpoint;
use crate::state::AppState;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use ctx::{Ctx, json_response};
use params::Query;
use routes::{ChildRoutes, Node};

pub mod artifacts;
pub mod auth;
pub mod body;
mod ctx;
pub mod errors;
pub mod json;
pub mod params;
mod reads;
pub mod request;
pub mod routes;
pub mod version;
mod writes;

#[cfg(test)]
mod tests;

/// Response header with the resolved API version. ClusterRunner's own negotiation (an `Accept`
/// media type and the path decide it), so it stays in this module rather than in a layer.
pub const API_VERSION_HEADER: &str = "Api-Version";

/// The ClusterRunner API, for mounting on the gateway's router (as its fallback).
pub fn router() -> Router<AppState> {
    Router::new().fallback(dispatch)
}

/// Every ClusterRunner route goes through here.
async fn dispatch(State(state): State<AppState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let matched = routes::resolve(path);
    let accept = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let version = version::resolve(path, matched.as_ref(), accept);
    let mut resp = match &matched {
        None => errors::response(ApiError::NotFound(format!("Not found: {path}")), None),
        Some(m) => {
            let ctx = Ctx {
                state: &state,
                method: &parts.method,
                matched: m,
                version,
                headers: &parts.headers,
                uri: &parts.uri,
                query: Query::parse(parts.uri.query()),
            };
            let get = matches!(parts.method, Method::GET | Method::HEAD);
            let children = (get && routes::is_json_route(m.route.node))
                .then(|| routes::child_routes(m.route, version));
            match respond(&ctx, body, children.as_ref()).await {
                Ok(r) => r,
                Err(e) => errors::response(e, children.as_ref()),
            }
        }
    };
    resp.headers_mut()
        .insert(API_VERSION_HEADER, HeaderValue::from(u16::from(version)));
    // The metric layer's label: the route template, not the path (ids would explode it).
    resp.extensions_mut()
        .insert(Endpoint(routes::endpoint_label(
            matched.as_ref().map(|m| m.route),
        )));
    resp
}

async fn respond(
    ctx: &Ctx<'_>,
    body: Body,
    children: Option<&ChildRoutes>,
) -> Result<Response, ApiError> {
    auth::check_session(ctx.headers, ctx.state.session_id())?;
    let raw = crate::limits::read_body(ctx.headers, ctx.state.max_body_bytes(), body).await?;
    let node = ctx.matched.route.node;
    match *ctx.method {
        // CORS preflights carry no credentials: always answered.
        Method::OPTIONS => json_response(StatusCode::OK, &serde_json::Map::new(), None),
        Method::GET | Method::HEAD => {
            // `/` stays open: it is the liveness probe of ClusterRunner clients.
            if ctx.state.require_auth_for_reads() && node != Node::Root {
                auth::check_digest(ctx.headers, ctx.state.rest_secret(), &raw)?;
            }
            reads::read(ctx, children).await
        }
        Method::POST | Method::PUT => writes::write(ctx, &raw).await,
        _ => Err(ApiError::MethodNotAllowed(routes::allowed(node))),
    }
}
