//! The ClusterRunner master API: one dispatcher over the route table (routes.rs), then one thin
//! function per route that calls the master and shapes its answer (json.rs).
//!
//! Order of checks on every request: route (404), session (412), body size (413), then for
//! writes body decoding (400), digest (401) and the handler's own validation; for reads the
//! digest only when `require_auth_for_reads` is on.
use crate::artifacts::{self, Format};
use crate::auth;
use crate::body;
use crate::error::ApiError;
use crate::json::{self, BuildJson};
use crate::params::Query;
use crate::request;
use crate::routes::{self, ChildRoutes, Matched, Node, Tree};
use crate::state::AppState;
use crate::version;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use ish_core::proto;
use serde::Serialize;
use serde::ser::SerializeMap;
use std::time::Instant;

/// Response header with the resolved API version.
pub const API_VERSION_HEADER: &str = "Api-Version";

/// One request, resolved.
struct Ctx<'a> {
    state: &'a AppState,
    method: &'a Method,
    matched: &'a Matched,
    version: u8,
    headers: &'a HeaderMap,
    uri: &'a Uri,
    query: Query,
}

/// A JSON object with one key, e.g. `{"build": {...}}`, keeping the value's field order.
struct Keyed<T>(&'static str, T);

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

#[derive(Serialize)]
struct MasterJson {
    status: &'static str,
    slaves: Vec<json::SlaveJson>,
}

#[derive(Serialize)]
struct VersionJson {
    version: &'static str,
    api_version: u8,
}

#[derive(Serialize)]
struct ConsoleJson {
    offset_line: u64,
    num_lines: u64,
    total_num_lines: u64,
    content: String,
}

#[derive(Serialize)]
struct NotImplementedJson {
    status: &'static str,
}

fn json_response<T: Serialize>(
    status: StatusCode,
    payload: &T,
    children: Option<&ChildRoutes>,
) -> Result<Response, ApiError> {
    let bytes = serde_json::to_vec(&WithChildRoutes {
        inner: payload,
        child_routes: children,
    })
    .map_err(|e| ApiError::Internal(format!("serializing a response: {e}")))?;
    Ok(crate::json_bytes(status, bytes))
}

/// Routes whose GET answers JSON (and therefore carries `child_routes`).
fn is_json_route(node: Node) -> bool {
    !matches!(
        node,
        Node::ArtifactsZip | Node::ArtifactsTarGz | Node::BuildResult | Node::Metrics
    )
}

/// Methods a route serves, for 405's `Allow`.
fn allowed(node: Node) -> &'static str {
    match node {
        Node::Builds | Node::SlaveShutdown | Node::SlavesShutdown => "GET, HEAD, OPTIONS, POST",
        Node::Build => "GET, HEAD, OPTIONS, PUT",
        _ => "GET, HEAD, OPTIONS",
    }
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

/// The fallback handler of the router: every ClusterRunner route goes through here.
pub async fn dispatch(State(state): State<AppState>, req: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let matched = routes::resolve(path);
    let accept = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let version = version::resolve(path, matched.as_ref(), accept);
    let mut resp = match &matched {
        None => ApiError::NotFound(format!("Not found: {path}")).into_response(),
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
            let children = (get && is_json_route(m.route.node))
                .then(|| routes::child_routes(m.route, version));
            match respond(&ctx, body, children.as_ref()).await {
                Ok(r) => r,
                Err(e) => e.into_response_with(children.as_ref()),
            }
        }
    };
    let h = resp.headers_mut();
    h.insert(API_VERSION_HEADER, HeaderValue::from(u16::from(version)));
    if let Ok(v) = HeaderValue::from_str(state.session_id()) {
        h.insert(auth::SESSION_HEADER, v);
    }
    state.cors().apply(&parts.headers, h);
    state.metrics().observe(
        method_label(&parts.method),
        routes::endpoint_label(matched.as_ref().map(|m| m.route)),
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

/// Whether `h` is `host[:port]` with a DNS name, an IPv4 address or a bracketed IPv6 address
/// as the host: nothing that could end the authority early (`/ ? # @`), quote or escape.
fn is_plain_authority(h: &str) -> bool {
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

/// Largest refused body still read to its end so the client gets its 413 (see `read_body`).
const DRAIN_LIMIT: u64 = 64 << 20;

async fn read_body(ctx: &Ctx<'_>, body: Body) -> Result<Bytes, ApiError> {
    let max = ctx.state.max_body_bytes();
    let declared = ctx
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > max as u64) {
        // A client that sends its whole body before reading the answer (no `Expect:
        // 100-continue`) would see a broken pipe instead of the 413 if the connection closed
        // with the body unread: read and drop it, up to a bound and a deadline.
        let expects_continue = ctx.headers.get(header::EXPECT).is_some();
        if !expects_continue && n <= DRAIN_LIMIT {
            use http_body_util::BodyExt;
            let mut body = body;
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                while let Some(Ok(_)) = body.frame().await {}
            })
            .await;
        }
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

async fn respond(
    ctx: &Ctx<'_>,
    body: Body,
    children: Option<&ChildRoutes>,
) -> Result<Response, ApiError> {
    auth::check_session(ctx.headers, ctx.state.session_id())?;
    let raw = read_body(ctx, body).await?;
    let node = ctx.matched.route.node;
    match *ctx.method {
        // CORS preflights carry no credentials: always answered.
        Method::OPTIONS => json_response(StatusCode::OK, &serde_json::Map::new(), None),
        Method::GET | Method::HEAD => {
            // `/` stays open: it is the liveness probe of ClusterRunner clients.
            if ctx.state.require_auth_for_reads() && node != Node::Root {
                auth::check_digest(ctx.headers, ctx.state.rest_secret(), &raw)?;
            }
            read(ctx, children).await
        }
        Method::POST | Method::PUT => write(ctx, &raw).await,
        _ => Err(ApiError::MethodNotAllowed(allowed(node))),
    }
}

async fn write(ctx: &Ctx<'_>, raw: &Bytes) -> Result<Response, ApiError> {
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
        .builds()
        .submit(proto::SubmitBuildRequest { request: Some(req) })
        .await
        .map_err(|e| match e.code() {
            tonic::Code::InvalidArgument => ApiError::Failure(Some(e.message().to_string())),
            _ => e.into(),
        })?
        .into_inner()
        .build_id;
    json_response(StatusCode::ACCEPTED, &StatusJson::success(Some(id)), None)
}

async fn cancel_build(ctx: &Ctx<'_>, raw: &Bytes) -> Result<Response, ApiError> {
    let value = authenticated_body(ctx, raw)?.value;
    let build_id = ctx.matched.id(0);
    // An unknown build is a 404 whatever the body says (ClusterRunner looked it up first).
    ctx.state
        .builds()
        .get(proto::GetBuildRequest { build_id })
        .await?;
    request::validate_cancel(&value)?;
    ctx.state
        .builds()
        .cancel(proto::CancelBuildRequest { build_id })
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
    ctx.state.cluster().drain_slaves(req).await?;
    // ClusterRunner answers 200 with an empty body.
    Ok(StatusCode::OK.into_response())
}

impl Ctx<'_> {
    fn json<T: Serialize>(
        &self,
        payload: &T,
        children: Option<&ChildRoutes>,
    ) -> Result<Response, ApiError> {
        json_response(StatusCode::OK, payload, children)
    }

    /// `<scheme>://<host>` as the client addressed the gateway.
    fn base_url(&self) -> String {
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
    fn page(&self) -> Result<Option<(u32, u32)>, ApiError> {
        match self.matched.route.tree {
            Tree::V2 => self.query.page().map(Some),
            Tree::V1 | Tree::Docs => Ok(None),
        }
    }

    fn builds_json(&self, builds: &[proto::Build]) -> Vec<BuildJson> {
        let base = self.base_url();
        builds.iter().map(|b| json::build(b, &base)).collect()
    }
}

async fn read(ctx: &Ctx<'_>, children: Option<&ChildRoutes>) -> Result<Response, ApiError> {
    let m = ctx.matched;
    match m.route.node {
        Node::Root | Node::SlaveHeartbeat | Node::SlaveShutdown | Node::SlavesShutdown => {
            ctx.json(&serde_json::Map::new(), children)
        }
        Node::ApiV1 => {
            let slaves = list_slaves(ctx.state).await?;
            let master = MasterJson {
                status: "Master service is up.",
                slaves: slaves.iter().map(json::slave).collect(),
            };
            ctx.json(&Keyed("master", master), children)
        }
        Node::Version => ctx.json(
            &VersionJson {
                version: ish_core::VERSION,
                api_version: ctx.version,
            },
            children,
        ),
        Node::Metrics => metrics(ctx).await,
        Node::Builds => list_builds(ctx, children, false).await,
        Node::Queue => list_builds(ctx, children, true).await,
        Node::Build => {
            let b = ctx
                .state
                .builds()
                .get(proto::GetBuildRequest { build_id: m.id(0) })
                .await?
                .into_inner();
            ctx.json(&Keyed("build", json::build(&b, &ctx.base_url())), children)
        }
        Node::BuildResult => {
            // Always the v1 path, as ClusterRunner does.
            let to = format!("/v1/build/{}/artifacts.tar.gz", m.id(0));
            let mut resp = StatusCode::FOUND.into_response();
            if let Ok(v) = HeaderValue::from_str(&to) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            Ok(resp)
        }
        Node::ArtifactsZip | Node::ArtifactsTarGz => {
            let format = if m.route.node == Node::ArtifactsZip {
                Format::Zip
            } else {
                Format::TarGz
            };
            artifacts::serve(
                ctx.state,
                m.id(0),
                format,
                *ctx.method == Method::HEAD,
                ctx.headers,
            )
            .await
        }
        Node::Subjobs => {
            let (offset, limit) = match ctx.page()? {
                // The build must still exist: ask for a page past any end.
                Some((_, 0)) => (u32::MAX, 1),
                Some(p) => p,
                None => (0, 0),
            };
            let resp = ctx
                .state
                .builds()
                .list_subjobs(proto::ListSubjobsRequest {
                    build_id: m.id(0),
                    offset,
                    limit,
                })
                .await?
                .into_inner();
            let subjobs: Vec<_> = resp
                .subjobs
                .iter()
                .filter(|_| offset != u32::MAX)
                .map(json::subjob)
                .collect();
            ctx.json(&Keyed("subjobs", subjobs), children)
        }
        Node::Subjob => {
            let s = one_subjob(ctx.state, m.id(0), m.id(1)).await?;
            ctx.json(&Keyed("subjob", json::subjob(&s)), children)
        }
        Node::SubjobResult => ctx.json(
            &NotImplementedJson {
                status: "not implemented",
            },
            children,
        ),
        Node::Atoms => {
            let s = one_subjob(ctx.state, m.id(0), m.id(1)).await?;
            let (offset, limit) = ctx.page()?.unwrap_or((0, u32::MAX));
            let atoms: Vec<_> = s
                .atoms
                .iter()
                .skip(offset as usize)
                .take(limit as usize)
                .map(json::atom)
                .collect();
            ctx.json(&Keyed("atoms", atoms), children)
        }
        Node::Atom => {
            let s = one_subjob(ctx.state, m.id(0), m.id(1)).await?;
            let a = usize::try_from(m.id(2))
                .ok()
                .and_then(|i| s.atoms.get(i))
                .ok_or_else(|| ApiError::NotFound("Invalid atom id.".into()))?;
            ctx.json(&Keyed("atom", json::atom(a)), children)
        }
        Node::Console => console(ctx, children).await,
        Node::Slaves => {
            let slaves = list_slaves(ctx.state).await?;
            let list: Vec<_> = slaves.iter().map(json::slave).collect();
            ctx.json(&Keyed("slaves", list), children)
        }
        Node::Slave => {
            let id = m.id(0);
            let slaves = list_slaves(ctx.state).await?;
            let s = slaves.iter().find(|s| s.id == id).ok_or_else(|| {
                ApiError::NotFound(format!("Requested slave (slave_id={id}) does not exist."))
            })?;
            ctx.json(&Keyed("slave", json::slave(s)), children)
        }
        Node::Eventlog => {
            let (since_id, since_timestamp) = ctx.query.events()?;
            let events = ctx
                .state
                .cluster()
                .list_events(proto::ListEventsRequest {
                    since_id,
                    since_timestamp,
                })
                .await?
                .into_inner()
                .events;
            let list: Vec<_> = events.iter().map(json::event).collect();
            ctx.json(&Keyed("events", list), children)
        }
    }
}

async fn list_slaves(state: &AppState) -> Result<Vec<proto::Slave>, ApiError> {
    Ok(state
        .cluster()
        .list_slaves(proto::ListSlavesRequest {})
        .await?
        .into_inner()
        .slaves)
}

async fn list_builds(
    ctx: &Ctx<'_>,
    children: Option<&ChildRoutes>,
    queue: bool,
) -> Result<Response, ApiError> {
    // The queue is never paginated (spec §1.5).
    let page = if queue { None } else { ctx.page()? };
    let mut builds = Vec::new();
    if !matches!(page, Some((_, 0))) {
        let (mut offset, limit) = page.unwrap_or((0, 0));
        // The master pages by size too: gather pages until the request's range is served.
        loop {
            let want = if limit == 0 {
                0
            } else {
                limit - builds.len() as u32
            };
            let resp = ctx
                .state
                .builds()
                .list(proto::ListBuildsRequest {
                    offset,
                    limit: want,
                    unfinished_only: queue,
                })
                .await?
                .into_inner();
            let got = resp.builds.len() as u32;
            builds.extend(resp.builds);
            offset += got;
            let done =
                got == 0 || offset >= resp.total || (limit > 0 && builds.len() as u32 >= limit);
            if done {
                break;
            }
        }
    }
    let key = if queue { "queue" } else { "builds" };
    ctx.json(&Keyed(key, ctx.builds_json(&builds)), children)
}

async fn one_subjob(
    state: &AppState,
    build_id: u64,
    subjob: u64,
) -> Result<proto::Subjob, ApiError> {
    let resp = state
        .builds()
        .list_subjobs(proto::ListSubjobsRequest {
            build_id,
            // An id past u32 exists nowhere; the call still checks the build.
            offset: u32::try_from(subjob).unwrap_or(u32::MAX),
            limit: 1,
        })
        .await?
        .into_inner();
    resp.subjobs
        .into_iter()
        .find(|s| u64::from(s.id) == subjob)
        .ok_or_else(|| ApiError::NotFound("Invalid subjob id.".into()))
}

async fn console(ctx: &Ctx<'_>, children: Option<&ChildRoutes>) -> Result<Response, ApiError> {
    let m = ctx.matched;
    let (max_lines, offset_line) = ctx.query.console()?;
    let subjob_id =
        u32::try_from(m.id(1)).map_err(|_| ApiError::NotFound("Invalid subjob id.".into()))?;
    let atom_id =
        u32::try_from(m.id(2)).map_err(|_| ApiError::NotFound("Invalid atom id.".into()))?;
    let page = ctx
        .state
        .builds()
        .get_console(proto::GetConsoleRequest {
            build_id: m.id(0),
            subjob_id,
            atom_id,
            max_lines,
            offset_line,
        })
        .await?
        .into_inner();
    ctx.json(
        &ConsoleJson {
            offset_line: page.offset_line,
            num_lines: page.num_lines,
            total_num_lines: page.total_num_lines,
            content: page.content,
        },
        children,
    )
}

async fn metrics(ctx: &Ctx<'_>) -> Result<Response, ApiError> {
    let master = ctx
        .state
        .cluster()
        .metrics(proto::MetricsRequest {})
        .await?
        .into_inner()
        .text;
    let mut text = master;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&ctx.state.metrics().render());
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GatewayConfig;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    const SECRET: &str = "unit-test-secret";

    /// A gateway whose master does not exist: everything that needs no master call can be tested.
    fn app(cfg: GatewayConfig) -> axum::Router {
        let cfg = GatewayConfig {
            master: "http://127.0.0.1:1".into(),
            ..cfg
        };
        crate::router(AppState::new(&cfg, SECRET).unwrap())
    }

    async fn call(
        router: &axum::Router,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, HeaderMap, String) {
        let mut req = axum::http::Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = router
            .clone()
            .oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
    }

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
    }

    #[tokio::test]
    async fn version_negotiation_over_http() {
        let r = app(GatewayConfig::default());
        for (path, accept, want) in [
            ("/v1/version", None, 1),
            (
                "/v1/version",
                Some("application/vnd.clusterrunner.v1+json"),
                1,
            ),
            (
                "/v1/version",
                Some("application/vnd.clusterrunner.v2+json"),
                2,
            ),
            (
                "/v1/version",
                Some("application/vnd.clusterrunner.v999+json"),
                1,
            ),
            ("/version/", None, 2),
            ("/version", Some("application/vnd.clusterrunner.v1+json"), 1),
        ] {
            let h: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
            let (st, headers, body) = call(&r, "GET", path, &h, "").await;
            assert_eq!(st, StatusCode::OK);
            assert_eq!(
                headers["api-version"],
                want.to_string(),
                "{path} {accept:?}"
            );
            let v = parse(&body);
            assert_eq!(v["api_version"], want, "{path} {accept:?}");
            assert_eq!(v["version"], ish_core::VERSION);
            assert_eq!(v["child_routes"], json!({}));
            assert!(
                headers[header::CONTENT_TYPE]
                    .to_str()
                    .unwrap()
                    .starts_with("application/json")
            );
            assert_eq!(headers["session-id"].len(), 36);
        }
    }

    #[tokio::test]
    async fn root_lists_child_routes_per_version() {
        let r = app(GatewayConfig::default());
        let (_, _, body) = call(&r, "GET", "/", &[], "").await;
        assert_eq!(parse(&body)["child_routes"]["builds"], "/builds");
        let (_, h, body) = call(
            &r,
            "GET",
            "/",
            &[("Accept", "application/vnd.clusterrunner.v1+json")],
            "",
        )
        .await;
        assert_eq!(parse(&body), json!({"child_routes": {"v1": "/v1"}}));
        assert_eq!(h["api-version"], "1");
        let (st, _, body) = call(&r, "OPTIONS", "/v1/build", &[], "").await;
        assert_eq!((st, body.as_str()), (StatusCode::OK, "{}"));
        let (st, _, body) = call(&r, "GET", "/healthz", &[], "").await;
        assert_eq!((st, body.as_str()), (StatusCode::OK, "ok"));
        let (st, h, body) = call(&r, "HEAD", "/v1/version", &[], "").await;
        assert_eq!(st, StatusCode::OK);
        assert!(body.is_empty());
        assert_ne!(h[header::CONTENT_LENGTH], "0");
    }

    #[tokio::test]
    async fn client_errors_are_json() {
        let r = app(GatewayConfig::default());
        for path in ["/v1/build/abc", "/nope", "/v2/builds", "/v1/build/1//"] {
            let (st, h, body) = call(&r, "GET", path, &[], "").await;
            assert_eq!(st, StatusCode::NOT_FOUND, "{path}");
            assert!(parse(&body)["error"].is_string(), "{path}");
            assert!(h.contains_key("api-version"));
        }
        let (st, h, body) = call(&r, "DELETE", "/v1/build/1", &[], "").await;
        assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(h[header::ALLOW], "GET, HEAD, OPTIONS, PUT");
        assert_eq!(
            parse(&body),
            json!({"error": "HTTP 405: Method Not Allowed"})
        );
        let (st, _, _) = call(&r, "POST", "/v1/queue", &[], "{}").await;
        assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
        let (st, _, body) = call(&r, "POST", "/v1/slave", &[], "{}").await;
        assert_eq!(st, StatusCode::NOT_IMPLEMENTED);
        assert!(parse(&body)["error"].as_str().unwrap().contains("gRPC"));
        let (st, _, body) = call(
            &r,
            "GET",
            "/v1/build/1/subjob/0/atom/0/console?max_lines=0",
            &[],
            "",
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        assert!(parse(&body)["child_routes"].is_object());
        let (st, _, _) = call(&r, "GET", "/builds?limit=x", &[], "").await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        let (st, _, _) = call(
            &r,
            "GET",
            "/v1/eventlog?since_id=1&since_timestamp=1",
            &[],
            "",
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn session_check() {
        let r = app(GatewayConfig::default());
        let (_, h, _) = call(&r, "GET", "/", &[], "").await;
        let session = h["session-id"].to_str().unwrap().to_string();
        let (st, _, _) = call(&r, "GET", "/", &[("Session-Id", &session)], "").await;
        assert_eq!(st, StatusCode::OK);
        let (st, _, body) = call(
            &r,
            "GET",
            "/v1/version",
            &[("Expected-Session-Id", "gone")],
            "",
        )
        .await;
        assert_eq!(st, StatusCode::PRECONDITION_FAILED);
        assert_eq!(
            parse(&body)["error"],
            "Specified session id: gone has expired and is invalid."
        );
    }

    #[tokio::test]
    async fn writes_need_the_digest_before_anything_else() {
        let r = app(GatewayConfig::default());
        let body = r#"{"type": "directory", "project_directory": "/tmp"}"#;
        for headers in [
            vec![],
            vec![(auth::DIGEST_HEADER, "00ff")],
            vec![(auth::DIGEST_HEADER, "not hex")],
        ] {
            let (st, _, resp) = call(&r, "POST", "/v1/build", &headers, body).await;
            assert_eq!(st, StatusCode::UNAUTHORIZED);
            assert_eq!(parse(&resp), json!({"error": auth::DIGEST_MISMATCH}));
        }
        let other = ish_core::auth::digest(SECRET, b"{}");
        let (st, _, _) = call(
            &r,
            "PUT",
            "/v1/build/1",
            &[(auth::DIGEST_HEADER, &other)],
            body,
        )
        .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        let (st, _, _) = call(
            &r,
            "POST",
            "/v1/slave/shutdown",
            &[],
            r#"{"shutdown_all": true}"#,
        )
        .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        let (st, _, _) = call(&r, "POST", "/v1/slave/3/shutdown", &[], "{}").await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        // Bad JSON is reported first (ClusterRunner decodes, then authenticates).
        let (st, _, resp) = call(&r, "POST", "/builds", &[], "{oops").await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        assert_eq!(
            parse(&resp),
            json!({"error": "Invalid JSON in request body."})
        );
        // A good digest gets to validation, which refuses unknown fields by name.
        let bad = r#"{"type": "directory", "project_directory": "/tmp", "colour": "red"}"#;
        let d = ish_core::auth::digest(SECRET, bad.as_bytes());
        let (st, _, resp) = call(&r, "POST", "/v1/build", &[(auth::DIGEST_HEADER, &d)], bad).await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        let v = parse(&resp);
        assert_eq!(
            (v["status"].clone(), v["STATUS"].clone()),
            (json!("FAILURE"), json!("FAILURE"))
        );
        assert!(v["error"].as_str().unwrap().contains("['colour']"), "{v}");
        // The form encoding: the digest covers the field's value.
        let form = format!(
            "__encoded_body__={}",
            bad.replace('{', "%7B")
                .replace('}', "%7D")
                .replace('"', "%22")
                .replace(' ', "+")
        );
        let (st, _, resp) = call(
            &r,
            "POST",
            "/v1/build",
            &[
                (auth::DIGEST_HEADER, &d),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            &form,
        )
        .await;
        assert_eq!(st, StatusCode::BAD_REQUEST);
        assert!(
            parse(&resp)["error"]
                .as_str()
                .unwrap()
                .contains("['colour']")
        );
    }

    #[test]
    fn only_plain_authorities_are_reflected() {
        for ok in [
            "gw.example.com",
            "gw.example.com:8080",
            "gw.example.com.",
            "localhost",
            "127.0.0.1:43000",
            "[::1]:43000",
            "[2001:db8::1]",
        ] {
            assert!(is_plain_authority(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "a..b",
            "evil\"><script>alert(1)</script>",
            "a/b",
            "a?b",
            "a#b",
            "user@evil.com",
            "a b",
            "a%2Fb",
            "a:",
            "a:99999",
            "a:1x",
            "a:80:80",
            "[::1",
            "[nope]:1",
            "[::1]x",
            "[::1]:",
        ] {
            assert!(!is_plain_authority(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_body_that_cannot_be_read_is_400_and_only_an_oversized_one_413() {
        let r = app(GatewayConfig {
            max_body_bytes: 16,
            ..GatewayConfig::default()
        });
        let post = |body: Body| {
            axum::http::Request::builder()
                .method("POST")
                .uri("/v1/build")
                .body(body)
                .unwrap()
        };
        // What hyper hands the handler for a malformed chunked body: a stream that fails.
        let broken = Body::from_stream(tokio_stream::iter(vec![
            Ok(Bytes::from_static(b"{\"type\"")),
            Err(std::io::Error::other("invalid chunk size line")),
        ]));
        let resp = r.clone().oneshot(post(broken)).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v = parse(std::str::from_utf8(&body).unwrap());
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
        let e = v["error"].as_str().unwrap();
        assert!(
            e.starts_with("The request body could not be read")
                && e.contains("invalid chunk size line"),
            "{e}"
        );
        // Past the limit with no declared length (chunked): still 413.
        let long = Body::from_stream(tokio_stream::iter(vec![
            Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 10])),
            Ok(Bytes::from(vec![b' '; 10])),
        ]));
        let resp = r.clone().oneshot(post(long)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn a_short_rest_secret_signs_writes() {
        let r = app(GatewayConfig {
            rest_secret: Some("abc".into()),
            ..GatewayConfig::default()
        });
        let bad = r#"{"type": "directory", "project_directory": "/tmp", "colour": "red"}"#;
        let d = ish_core::auth::digest("abc", bad.as_bytes());
        // Past the digest to validation (which refuses the unknown field): the key works.
        let (st, _, resp) = call(&r, "POST", "/v1/build", &[(auth::DIGEST_HEADER, &d)], bad).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{resp}");
        assert!(resp.contains("['colour']"), "{resp}");
        let d = ish_core::auth::digest(SECRET, bad.as_bytes());
        let (st, _, _) = call(&r, "POST", "/v1/build", &[(auth::DIGEST_HEADER, &d)], bad).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn unreachable_master_is_503() {
        let r = app(GatewayConfig::default());
        let (st, _, body) = call(&r, "GET", "/v1/build", &[], "").await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            parse(&body)["error"]
                .as_str()
                .unwrap()
                .contains("unavailable"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn body_limit_cors_and_read_auth() {
        let r = app(GatewayConfig {
            max_body_bytes: 16,
            cors_allowed_origins_regex: Some("https://dash".into()),
            require_auth_for_reads: true,
            ..GatewayConfig::default()
        });
        let (st, _, body) = call(&r, "POST", "/v1/build", &[], &"x".repeat(17)).await;
        assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(parse(&body)["error"].is_string());
        let (st, h, _) = call(
            &r,
            "OPTIONS",
            "/v1/build",
            &[("Origin", "https://dash.example")],
            "",
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            h[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://dash.example"
        );
        let (_, h, _) = call(
            &r,
            "OPTIONS",
            "/v1/build",
            &[("Origin", "https://other")],
            "",
        )
        .await;
        assert!(!h.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
        // Reads need the digest (of the empty body); `/` stays open.
        let (st, h, _) = call(&r, "GET", "/v1/version", &[("Origin", "https://dash")], "").await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert!(h.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
        let d = ish_core::auth::digest(SECRET, b"");
        let (st, _, _) = call(&r, "GET", "/v1/version", &[(auth::DIGEST_HEADER, &d)], "").await;
        assert_eq!(st, StatusCode::OK);
        let (st, _, _) = call(&r, "GET", "/", &[], "").await;
        assert_eq!(st, StatusCode::OK);
    }

    #[tokio::test]
    async fn gateway_metrics_count_requests_by_route_template() {
        let state = AppState::new(
            &GatewayConfig {
                master: "http://127.0.0.1:1".into(),
                ..GatewayConfig::default()
            },
            SECRET,
        )
        .unwrap();
        let r = crate::router(state.clone());
        call(&r, "GET", "/v1/build/5", &[], "").await;
        call(&r, "GET", "/nope", &[], "").await;
        let text = state.metrics().render();
        assert!(
            text.contains(r#"http_request_duration_seconds_count{endpoint="/v1/build/{build_id}",method="GET",status="503"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"endpoint="<unmatched>",method="GET",status="404""#),
            "{text}"
        );
    }
}
