//! The gateway's one error type, shared by every API: what went wrong, its HTTP status and
//! headers, and its mapping from the master's `tonic::Status`. The body is the API's business:
//! each API module renders it in its own format and hands it to [`ApiError::respond`]
//! (ClusterRunner's: `clusterrunner/errors.rs`).
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
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

    /// The response: this error's status and headers (`Allow`, `Content-Range`) around `body`,
    /// which the API module renders in its own format (JSON with the gateway's content type;
    /// `None` for an empty body). The detail of an internal error goes to the log here, once,
    /// whatever the API shows the client.
    pub fn respond(self, body: Option<Vec<u8>>) -> Response {
        let status = self.status();
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let mut resp = match body {
            Some(bytes) => crate::respond::json_bytes(status, bytes),
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

impl From<tonic::Status> for ApiError {
    /// FAILED_PRECONDITION has a per-route meaning; routes that can get it map it themselves
    /// before this generic conversion (which treats it as a bad request).
    fn from(s: tonic::Status) -> Self {
        let msg = s.message().to_string();
        // A status with a source error was made by the gateway's own gRPC client from a
        // transport failure (the connection reset or the stream cut by a master killed mid-call);
        // one the master sent has none. Either way the master is not reachable: 503, whatever
        // code tonic chose for the failure (Internal, Unknown or Cancelled for h2 resets).
        if std::error::Error::source(&s).is_some() && s.code() != Code::Unauthenticated {
            return Self::Unavailable(msg);
        }
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
