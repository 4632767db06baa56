//! `artifacts.zip` / `artifacts.tar.gz` with static-file semantics (spec §4.2, §11.1): streamed
//! from the master's `DownloadArtifacts` to the HTTP body without buffering, `HEAD`, single
//! byte ranges, a strong `ETag` (the archives never change once written).
//!
//! Status codes: 404 with an empty body for an unknown build, 202 with an empty body until the
//! archives exist, 404 with a JSON error for a build that ended in ERROR or CANCELED (it never
//! gets archives; ClusterRunner answered 202 forever).
use crate::error::ApiError;
use crate::state::AppState;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use ish_core::proto;
use tokio_stream::StreamExt;

/// Which archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `artifacts.zip` (results.zip).
    Zip,
    /// `artifacts.tar.gz` (results.tar.gz).
    TarGz,
}

impl Format {
    fn proto(self) -> proto::ArchiveFormat {
        match self {
            Self::Zip => proto::ArchiveFormat::Zip,
            Self::TarGz => proto::ArchiveFormat::TarGz,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::Zip => "application/zip",
            Self::TarGz => "application/x-tar",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::Zip => "zip",
            Self::TarGz => "tgz",
        }
    }
}

/// What a `Range` header asks for, given the file size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// The whole file (no Range, or one this server ignores: invalid or several ranges).
    Full,
    /// Bytes `start..=end`.
    Partial(u64, u64),
    /// Nothing of the file is in the range: 416.
    Unsatisfiable,
}

/// Parses a single `bytes=a-b`, `bytes=a-` or `bytes=-n` range against `size`.
pub fn parse_range(value: &str, size: u64) -> RangeRequest {
    let Some(spec) = value
        .trim()
        .strip_prefix("bytes=")
        .or_else(|| value.trim().strip_prefix("Bytes="))
    else {
        return RangeRequest::Full;
    };
    // Multipart/byteranges answers are not supported; serving the whole file is allowed.
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    if a.is_empty() {
        return match num(b) {
            None => RangeRequest::Full,
            Some(0) => RangeRequest::Unsatisfiable,
            Some(_) if size == 0 => RangeRequest::Unsatisfiable,
            Some(n) => RangeRequest::Partial(size.saturating_sub(n), size - 1),
        };
    }
    let Some(start) = num(a) else {
        return RangeRequest::Full;
    };
    let end = if b.is_empty() {
        u64::MAX
    } else {
        match num(b) {
            Some(e) if e >= start => e,
            _ => return RangeRequest::Full,
        }
    };
    if start >= size {
        return RangeRequest::Unsatisfiable;
    }
    RangeRequest::Partial(start, end.min(size - 1))
}

/// Size of the archive, or why there is none.
async fn probe(state: &AppState, build_id: u64, format: Format) -> Result<u64, ApiError> {
    let req = proto::DownloadArtifactsRequest {
        build_id,
        format: format.proto() as i32,
        size_only: true,
        ..Default::default()
    };
    match state.master().download_artifacts(req).await {
        Ok(mut s) => match s.next().await {
            Some(Ok(chunk)) => Ok(chunk.total_size),
            Some(Err(e)) => Err(e.into()),
            None => Err(ApiError::Internal(
                "the master sent no size for the archive".into(),
            )),
        },
        Err(e) if e.code() == tonic::Code::NotFound => Err(ApiError::FileNotFound),
        Err(e) if e.code() == tonic::Code::FailedPrecondition => {
            let b = state
                .master()
                .get_build(proto::GetBuildRequest { build_id })
                .await
                .map_err(|e| match e.code() {
                    tonic::Code::NotFound => ApiError::FileNotFound,
                    _ => e.into(),
                })?;
            match proto::BuildState::try_from(b.state) {
                Ok(s @ (proto::BuildState::Error | proto::BuildState::Canceled)) => {
                    Err(ApiError::NotFound(format!(
                        "Build {build_id} has no artifacts: it ended in {}",
                        super::json::status_name(s)
                    )))
                }
                _ => Err(ApiError::NotReady),
            }
        }
        Err(e) => Err(e.into()),
    }
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Answers a GET (or HEAD, `head = true`) of an archive.
pub async fn serve(
    state: &AppState,
    build_id: u64,
    format: Format,
    head: bool,
    request: &HeaderMap,
) -> Result<Response, ApiError> {
    let size = probe(state, build_id, format).await?;
    let etag = format!("\"ish-{build_id}-{}-{size}\"", format.tag());
    let mut resp = Response::new(Body::empty());
    let h = resp.headers_mut();
    h.insert(header::ETAG, header_value(&etag));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    let matches_etag = |name| {
        request
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    };
    if matches_etag(header::IF_NONE_MATCH) {
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        return Ok(resp);
    }
    // If-Range with another validator means "the file changed: send all of it".
    let range_applies =
        !head && (!request.contains_key(header::IF_RANGE) || matches_etag(header::IF_RANGE));
    let range = match request.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) if range_applies => parse_range(r, size),
        _ => RangeRequest::Full,
    };
    let (offset, length) = match range {
        RangeRequest::Unsatisfiable => return Err(ApiError::RangeNotSatisfiable(size)),
        RangeRequest::Full => (0, size),
        RangeRequest::Partial(start, end) => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes {start}-{end}/{size}")),
            );
            (start, end - start + 1)
        }
    };
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, header_value(&length.to_string()));
    if head || length == 0 {
        return Ok(resp);
    }
    let stream = state
        .master()
        .download_artifacts(proto::DownloadArtifactsRequest {
            build_id,
            format: format.proto() as i32,
            offset,
            length,
            size_only: false,
        })
        .await?;
    *resp.body_mut() = Body::from_stream(stream.map(|r| r.map(|c| Bytes::from(c.data))));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeRequest::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Partial(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), Partial(90, 99));
        assert_eq!(parse_range("bytes=90-1000", 100), Partial(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), Partial(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), Partial(0, 99));
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=100-200", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=-5", 0), Unsatisfiable);
        // Ignored: the whole file is served.
        assert_eq!(parse_range("bytes=5-1", 100), Full);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Full);
        assert_eq!(parse_range("items=0-1", 100), Full);
        assert_eq!(parse_range("bytes=x-1", 100), Full);
        assert_eq!(parse_range("bytes=1", 100), Full);
    }
}
