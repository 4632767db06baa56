//! The gateway's one error type and its one conversion to an HTTP response.
//!
//! ClusterRunner's bodies: JSON routes answer `{"error": "<message>"}`, file routes answer an
//! empty body, and "status" failures (create/cancel a build) answer
//! `{"status": "FAILURE", "error": ...}`. GET errors on JSON routes also carry `child_routes`,
//! which is why [`ApiError::into_response_with`] takes them.
use crate::routes::ChildRoutes;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tonic::Code;

/// Everything a REST call can end with other than success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A malformed request (bad JSON, bad query parameter, invalid field): 400.
    #[error("{0}")]
    BadRequest(String),
    /// A refused build creation or update, answered as a ClusterRunner status response: 400
    /// `{"status": "FAILURE", "STATUS": "FAILURE"[, "error": ...]}`.
    #[error("{}", .0.as_deref().unwrap_or("request refused"))]
    Failure(Option<String>),
    /// Missing or wrong message digest (or the master refused the gateway's secret): 401.
    #[error("{0}")]
    Unauthenticated(String),
    /// No such build, subjob, atom, slave or route: 404 with a JSON error.
    #[error("{0}")]
    NotFound(String),
    /// No such build on a file route: 404 with an empty body (ClusterRunner's static-file 404).
    #[error("not found")]
    FileNotFound,
    /// The archive is not written yet: 202 with an empty body.
    #[error("not ready yet")]
    NotReady,
    /// The route exists but not with this method: 405.
    #[error("HTTP 405: Method Not Allowed")]
    MethodNotAllowed(&'static str),
    /// A `Session-Id` / `Expected-Session-Id` of another gateway process: 412.
    #[error("Specified session id: {0} has expired and is invalid.")]
    SessionExpired(String),
    /// The body is larger than `max_body_bytes`: 413.
    #[error("The request body is larger than the limit of {0} bytes.")]
    TooLarge(usize),
    /// A `Range` outside the file: 416 with `Content-Range: bytes */<size>`.
    #[error("range not satisfiable")]
    RangeNotSatisfiable(u64),
    /// A ClusterRunner route that Ish CD serves another way (slave registration, heartbeats,
    /// result uploads: slaves use gRPC): 501.
    #[error("{0}")]
    NotImplemented(String),
    /// The master cannot be reached or is shutting down: 503.
    #[error("the master is unavailable: {0}")]
    Unavailable(String),
    /// Anything else: 500 "internal error" (the detail goes to the log only).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Body of an error on a JSON route.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    child_routes: Option<&'a ChildRoutes>,
}

/// Body of a failed status response.
#[derive(Serialize)]
struct FailureBody<'a> {
    status: &'static str,
    #[serde(rename = "STATUS")]
    status_upper: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::Failure(_) => StatusCode::BAD_REQUEST,
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) | Self::FileNotFound => StatusCode::NOT_FOUND,
            Self::NotReady => StatusCode::ACCEPTED,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::SessionExpired(_) => StatusCode::PRECONDITION_FAILED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RangeNotSatisfiable(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The response, with `child_routes` added to a JSON error body when given (GET requests).
    pub fn into_response_with(self, child_routes: Option<&ChildRoutes>) -> Response {
        let status = self.status();
        let body = match &self {
            // File routes answer these with an empty body, like a static file server.
            Self::FileNotFound | Self::NotReady | Self::RangeNotSatisfiable(_) => None,
            Self::Failure(msg) => Some(serde_json::to_vec(&FailureBody {
                status: "FAILURE",
                status_upper: "FAILURE",
                error: msg.as_deref(),
            })),
            Self::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Some(serde_json::to_vec(&ErrorBody {
                    error: "internal error",
                    child_routes,
                }))
            }
            other => Some(serde_json::to_vec(&ErrorBody {
                error: &other.to_string(),
                child_routes,
            })),
        };
        let mut resp = match body {
            Some(Ok(bytes)) => crate::json_bytes(status, bytes),
            Some(Err(e)) => {
                tracing::error!(error = %e, "cannot serialize an error body");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
            None => status.into_response(),
        };
        match self {
            Self::MethodNotAllowed(allow) => {
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            Self::RangeNotSatisfiable(size) => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    resp.headers_mut().insert(header::CONTENT_RANGE, v);
                }
            }
            _ => {}
        }
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.into_response_with(None)
    }
}

impl From<tonic::Status> for ApiError {
    /// FAILED_PRECONDITION has a per-route meaning; routes that can get it map it themselves
    /// before this generic conversion (which treats it as a bad request).
    fn from(s: tonic::Status) -> Self {
        let msg = s.message().to_string();
        match s.code() {
            Code::NotFound => Self::NotFound(msg),
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                Self::BadRequest(msg)
            }
            Code::Unauthenticated => Self::Unauthenticated(format!(
                "the master refused the gateway's cluster secret: {msg}"
            )),
            Code::Unavailable => Self::Unavailable(msg),
            code => Self::Internal(format!("gRPC {code:?}: {msg}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(resp: Response) -> (StatusCode, String) {
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn status_mapping() {
        let cases = [
            (tonic::Status::not_found("Invalid build id: 9."), 404),
            (tonic::Status::invalid_argument("bad"), 400),
            (tonic::Status::unauthenticated("no"), 401),
            (tonic::Status::unavailable("down"), 503),
            (tonic::Status::internal("boom"), 500),
            (tonic::Status::unknown("?"), 500),
        ];
        for (s, code) in cases {
            assert_eq!(ApiError::from(s).status().as_u16(), code);
        }
        let (st, b) =
            body(ApiError::from(tonic::Status::internal("secret detail")).into_response()).await;
        assert_eq!(
            (st.as_u16(), b.as_str()),
            (500, r#"{"error":"internal error"}"#)
        );
        let (st, b) =
            body(ApiError::from(tonic::Status::not_found("Invalid build id: 9.")).into_response())
                .await;
        assert_eq!(
            (st.as_u16(), b.as_str()),
            (404, r#"{"error":"Invalid build id: 9."}"#)
        );
    }

    #[tokio::test]
    async fn failure_and_file_bodies() {
        let (st, b) = body(ApiError::Failure(None).into_response()).await;
        assert_eq!(
            (st.as_u16(), b.as_str()),
            (400, r#"{"status":"FAILURE","STATUS":"FAILURE"}"#)
        );
        let (st, b) = body(ApiError::Failure(Some("x".into())).into_response()).await;
        assert_eq!(
            (st.as_u16(), b.as_str()),
            (
                400,
                r#"{"status":"FAILURE","STATUS":"FAILURE","error":"x"}"#
            )
        );
        let (st, b) = body(ApiError::NotReady.into_response()).await;
        assert_eq!((st.as_u16(), b.as_str()), (202, ""));
        let resp = ApiError::RangeNotSatisfiable(10).into_response();
        assert_eq!(resp.headers()[header::CONTENT_RANGE], "bytes */10");
        let resp = ApiError::MethodNotAllowed("GET, OPTIONS").into_response();
        assert_eq!(resp.headers()[header::ALLOW], "GET, OPTIONS");
        let (st, b) = body(resp).await;
        assert_eq!(
            (st.as_u16(), b.as_str()),
            (405, r#"{"error":"HTTP 405: Method Not Allowed"}"#)
        );
    }
}
