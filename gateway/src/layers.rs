//! What every route of every API gets, as layers over the whole router (lib.rs `router`): a
//! request id, the body limit (`limits.rs`), the `Session-Id` header, CORS and the request metric. An API
//! module mounted on the router gets them without doing anything.
//!
//! Outermost first: request id (so everything below can log it), metrics (so the time covers
//! the others), then the response headers and the body limit. Nothing here answers a request
//! itself: refusals (412, 413) have per-API bodies and precedence, so the API renders them.
use crate::session::SESSION_HEADER;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use rand::Rng;
use std::time::Instant;

/// Request and response header carrying the request's id.
pub const REQUEST_ID_HEADER: &str = "X-Request-Id";

/// The id of one request: the client's `X-Request-Id` when it is a sane token (so a proxy's id
/// follows the request through), else a fresh random one. In the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub HeaderValue);

/// The route template an API names a request by, for the metric's `endpoint` label (a response
/// extension; `<unmatched>` without it). Every handler names its route this way, since the
/// ClusterRunner table resolves paths itself and axum's matched path never sees them.
#[derive(Debug, Clone)]
pub struct Endpoint(pub String);

fn sane_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
}

fn new_request_id() -> HeaderValue {
    let b: [u8; 16] = rand::rng().random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    HeaderValue::from_str(&h).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Names the request and echoes its id on the response.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .filter(|v| sane_request_id(v))
        .cloned()
        .unwrap_or_else(new_request_id);
    req.extensions_mut().insert(RequestId(id.clone()));
    let span =
        tracing::debug_span!("request", id = ?id, method = %req.method(), path = %req.uri().path());
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    resp.headers_mut().insert(REQUEST_ID_HEADER, id);
    resp
}

fn method_label(m: &Method) -> &'static str {
    // Arbitrary method names must not create arbitrary metric series.
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

/// Records `http_request_duration_seconds` for every request, by route template.
pub async fn metrics(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let resp = next.run(req).await;
    let endpoint = resp
        .extensions()
        .get::<Endpoint>()
        .map(|e| e.0.clone())
        .unwrap_or_else(|| "<unmatched>".into());
    state.metrics().observe(
        method,
        endpoint,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

/// `Session-Id` and CORS on every response.
pub async fn headers(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let request_headers = req.headers().clone();
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(state.session_id()) {
        h.insert(SESSION_HEADER, v);
    }
    state.cors().apply(&request_headers, h);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_from_clients_are_echoed_only_when_sane() {
        assert!(sane_request_id(&HeaderValue::from_static("abc-123_x.y:z")));
        assert!(!sane_request_id(&HeaderValue::from_static("")));
        assert!(!sane_request_id(&HeaderValue::from_static("a b")));
        assert!(!sane_request_id(
            &HeaderValue::from_str(&"a".repeat(129)).unwrap()
        ));
        let id = new_request_id();
        assert_eq!(id.len(), 32);
        assert!(sane_request_id(&id));
    }
}
