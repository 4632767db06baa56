//! ClusterRunner's writes: create and cancel a build, drain slaves. Each decodes its body, then
//! checks the digest over it (in that order, as ClusterRunner does), then calls the master.
use super::auth;
use super::body;
use super::ctx::{Ctx, json_response};
use super::request;
use super::routes::{Node, allowed};
use crate::error::ApiError;
use axum::body::Bytes;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use ish_core::proto;
use serde::Serialize;

/// A ClusterRunner status response. The docs spell the key `STATUS`, the wire `status`: both.
#[derive(Serialize)]
struct StatusJson {
    status: &'static str,
    #[serde(rename = "STATUS")]
    status_upper: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    build_id: Option<u64>,
}

impl StatusJson {
    fn success(build_id: Option<u64>) -> Self {
        Self {
            status: "SUCCESS",
            status_upper: "SUCCESS",
            build_id,
        }
    }
}

pub(super) async fn write(ctx: &Ctx<'_>, raw: &Bytes) -> Result<Response, ApiError> {
    let node = ctx.matched.route.node;
    match (ctx.method.clone(), node) {
        (Method::POST, Node::Builds) => create_build(ctx, raw).await,
        (Method::PUT, Node::Build) => cancel_build(ctx, raw).await,
        (Method::POST, Node::SlaveShutdown) => {
            let id = ctx.matched.id(0);
            shutdown(ctx, raw, |_| Ok(Some(vec![id]))).await
        }
        (Method::POST, Node::SlavesShutdown) => shutdown(ctx, raw, request::shutdown_targets).await,
        (Method::POST, Node::Slaves | Node::SlaveHeartbeat | Node::SubjobResult)
        | (Method::PUT, Node::Slave) => Err(ApiError::NotImplemented(
            "ClusterRunner slaves are not supported: Ish CD slaves (`ish slave`) connect to the \
             master over gRPC."
                .into(),
        )),
        _ => Err(ApiError::MethodNotAllowed(allowed(node))),
    }
}

/// Decodes a write's body and checks its digest (in that order, as ClusterRunner does).
fn authenticated_body(ctx: &Ctx<'_>, raw: &Bytes) -> Result<body::Decoded, ApiError> {
    let d = body::decode(ctx.headers, &ctx.query, raw)?;
    auth::check_digest(ctx.headers, ctx.state.rest_secret(), &d.encoded)?;
    Ok(d)
}

async fn create_build(ctx: &Ctx<'_>, raw: &Bytes) -> Result<Response, ApiError> {
    let body = authenticated_body(ctx, raw)?;
    let mut req = request::build_request(&body.value)?;
    // Echoed as `request_params`: the client's own text keeps its key order.
    if let Ok(text) = std::str::from_utf8(&body.encoded) {
        req.request_params_json = text.trim().to_string();
    }
    let id = ctx
        .state
        .master()
        .submit(proto::SubmitBuildRequest { request: Some(req) })
        .await
        .map_err(|e| match e.code() {
            tonic::Code::InvalidArgument => ApiError::Failure(Some(e.message().to_string())),
            _ => e.into(),
        })?
        .build_id;
    json_response(StatusCode::ACCEPTED, &StatusJson::success(Some(id)), None)
}

async fn cancel_build(ctx: &Ctx<'_>, raw: &Bytes) -> Result<Response, ApiError> {
    let value = authenticated_body(ctx, raw)?.value;
    let build_id = ctx.matched.id(0);
    // An unknown build is a 404 whatever the body says (ClusterRunner looked it up first).
    ctx.state
        .master()
        .get_build(proto::GetBuildRequest { build_id })
        .await?;
    request::validate_cancel(&value)?;
    ctx.state
        .master()
        .cancel_build(proto::CancelBuildRequest { build_id })
        .await?;
    json_response(StatusCode::OK, &StatusJson::success(None), None)
}

async fn shutdown(
    ctx: &Ctx<'_>,
    raw: &Bytes,
    targets: impl FnOnce(&serde_json::Value) -> Result<Option<Vec<u64>>, ApiError>,
) -> Result<Response, ApiError> {
    let value = authenticated_body(ctx, raw)?.value;
    let req = match targets(&value)? {
        None => proto::DrainSlavesRequest {
            slave_ids: Vec::new(),
            all: true,
        },
        Some(slave_ids) => proto::DrainSlavesRequest {
            slave_ids,
            all: false,
        },
    };
    ctx.state.master().drain_slaves(req).await?;
    // ClusterRunner answers 200 with an empty body.
    Ok(StatusCode::OK.into_response())
}
