//! The request body limit (`max_body_bytes`), for every API: a layer over the whole router caps
//! each body, and [`read_body`] is how an API reads one, turning the overflow into
//! [`ApiError::TooLarge`] (413) that the API renders in its own format, after its own earlier
//! checks (ClusterRunner: route, then session).
use crate::error::ApiError;
use crate::state::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::Response;
use http_body_util::BodyExt;
use std::time::Duration;

/// Largest refused body still read to its end so the client gets its answer (see [`layer`]).
const DRAIN_LIMIT: u64 = 64 << 20;
/// How long a refused body is read before the answer goes out anyway.
const DRAIN_TIME: Duration = Duration::from_secs(10);

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Caps every request body at `max_body_bytes`, so a handler that forgets the limit still
/// cannot read more. A body declared larger never reaches the handler (it gets an empty one
/// and [`read_body`] refuses by the declared length); it is read and dropped after the answer
/// is made, up to a bound and a deadline: a client that sends its whole body before reading the
/// answer (no `Expect: 100-continue`) would see a broken pipe instead of the 413 if the
/// connection closed with the body unread.
pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let max = state.max_body_bytes();
    let (parts, body) = req.into_parts();
    let declared = declared_length(&parts.headers).filter(|&n| n > max as u64);
    let Some(n) = declared else {
        let body = Body::new(http_body_util::Limited::new(body, max));
        return next.run(Request::from_parts(parts, body)).await;
    };
    let drain = parts.headers.get(header::EXPECT).is_none() && n <= DRAIN_LIMIT;
    let resp = next.run(Request::from_parts(parts, Body::empty())).await;
    if drain {
        let mut body = body;
        let _ = tokio::time::timeout(DRAIN_TIME, async {
            while let Some(Ok(_)) = body.frame().await {}
        })
        .await;
    }
    resp
}

/// The whole body of a request with `headers`, or 413 past `max` (the state's
/// `max_body_bytes`: the same limit the layer enforces).
pub async fn read_body(headers: &HeaderMap, max: usize, body: Body) -> Result<Bytes, ApiError> {
    if declared_length(headers).is_some_and(|n| n > max as u64) {
        return Err(ApiError::TooLarge(max));
    }
    axum::body::to_bytes(body, max)
        .await
        .map_err(|e| body_error(&e, max))
}

/// A body that could not be read: 413 only when it went past the limit; anything else (a
/// malformed chunked encoding, a body cut short) is the client's malformed request.
fn body_error(e: &axum::Error, max: usize) -> ApiError {
    let mut causes = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return ApiError::TooLarge(max);
        }
        let text = s.to_string();
        if causes.last() != Some(&text) {
            causes.push(text);
        }
        source = s.source();
    }
    ApiError::BadRequest(format!(
        "The request body could not be read: {}.",
        causes.join(": ")
    ))
}
