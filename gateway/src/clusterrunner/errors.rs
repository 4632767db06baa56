//! ClusterRunner's error bodies: JSON routes answer `{"error": "<message>"}`, file routes answer
//! an empty body, and "status" failures (create/cancel a build) answer
//! `{"status": "FAILURE", "STATUS": "FAILURE", "error": ...}`. GET errors on JSON routes also
//! carry `child_routes`, which is why [`response`] takes them.
use super::routes::ChildRoutes;
use crate::error::ApiError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

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

/// `err` as ClusterRunner answers it, with `child_routes` added to a JSON error body when given
/// (GET requests).
pub fn response(err: ApiError, child_routes: Option<&ChildRoutes>) -> Response {
    let body = match &err {
        // File routes answer these with an empty body, like a static file server.
        ApiError::FileNotFound | ApiError::NotReady | ApiError::RangeNotSatisfiable(_) => None,
        ApiError::Failure(msg) => Some(serde_json::to_vec(&FailureBody {
            status: "FAILURE",
            status_upper: "FAILURE",
            error: msg.as_deref(),
        })),
        // The detail is logged by `ApiError::respond`, never shown.
        ApiError::Internal(_) => Some(serde_json::to_vec(&ErrorBody {
            error: "internal error",
            child_routes,
        })),
        other => Some(serde_json::to_vec(&ErrorBody {
            error: &other.to_string(),
            child_routes,
        })),
    };
    match body.transpose() {
        Ok(body) => err.respond(body),
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize an error body");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{StatusCode, header};
    use axum::response::Response;

    fn render(e: ApiError) -> Response {
        response(e, None)
    }

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
        // What the gateway's own client makes of a connection cut by a dying master carries the
        // transport error as its source: unreachable, not an internal error of the master's.
        let cut = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset",
        )));
        assert_ne!(cut.code(), tonic::Code::Unavailable);
        assert_eq!(ApiError::from(cut).status().as_u16(), 503);
        let (st, b) = body(render(ApiError::from(tonic::Status::internal(
            "secret detail",
        ))))
        .await;
        assert_eq!(
            (st.as_u16(), b.as_str()),
            (500, r#"{"error":"internal error"}"#)
        );
        let (st, b) = body(render(ApiError::from(tonic::Status::not_found(
            "Invalid build id: 9.",
        ))))
        .await;
        assert_eq!(
            (st.as_u16(), b.as_str()),
            (404, r#"{"error":"Invalid build id: 9."}"#)
        );
    }

    #[tokio::test]
    async fn failure_and_file_bodies() {
        let (st, b) = body(render(ApiError::Failure(None))).await;
        assert_eq!(
            (st.as_u16(), b.as_str()),
            (400, r#"{"status":"FAILURE","STATUS":"FAILURE"}"#)
        );
        let (st, b) = body(render(ApiError::Failure(Some("x".into())))).await;
        assert_eq!(
            (st.as_u16(), b.as_str()),
            (
                400,
                r#"{"status":"FAILURE","STATUS":"FAILURE","error":"x"}"#
            )
        );
        let (st, b) = body(render(ApiError::NotReady)).await;
        assert_eq!((st.as_u16(), b.as_str()), (202, ""));
        let resp = render(ApiError::RangeNotSatisfiable(10));
        assert_eq!(resp.headers()[header::CONTENT_RANGE], "bytes */10");
        let resp = render(ApiError::MethodNotAllowed("GET, OPTIONS"));
        assert_eq!(resp.headers()[header::ALLOW], "GET, OPTIONS");
        let (st, b) = body(resp).await;
        assert_eq!(
            (st.as_u16(), b.as_str()),
            (405, r#"{"error":"HTTP 405: Method Not Allowed"}"#)
        );
    }
}
