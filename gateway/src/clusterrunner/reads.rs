//! ClusterRunner's reads: one arm per GET route, each a master call shaped by `json.rs`.
use super::artifacts::{self, Format};
use super::ctx::{Ctx, Keyed};
use super::json;
use super::routes::{ChildRoutes, Node};
use crate::error::ApiError;
use crate::state::AppState;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ish_core::proto;
use serde::Serialize;

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

pub(super) async fn read(
    ctx: &Ctx<'_>,
    children: Option<&ChildRoutes>,
) -> Result<Response, ApiError> {
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
                .master()
                .get_build(proto::GetBuildRequest { build_id: m.id(0) })
                .await?;
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
                .master()
                .list_subjobs(proto::ListSubjobsRequest {
                    build_id: m.id(0),
                    offset,
                    limit,
                })
                .await?;
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
                .master()
                .list_events(proto::ListEventsRequest {
                    since_id,
                    since_timestamp,
                })
                .await?
                .events;
            let list: Vec<_> = events.iter().map(json::event).collect();
            ctx.json(&Keyed("events", list), children)
        }
    }
}

async fn list_slaves(state: &AppState) -> Result<Vec<proto::Slave>, ApiError> {
    Ok(state
        .master()
        .list_slaves(proto::ListSlavesRequest {})
        .await?
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
                .master()
                .list_builds(proto::ListBuildsRequest {
                    offset,
                    limit: want,
                    unfinished_only: queue,
                })
                .await?;
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
        .master()
        .list_subjobs(proto::ListSubjobsRequest {
            build_id,
            // An id past u32 exists nowhere; the call still checks the build.
            offset: u32::try_from(subjob).unwrap_or(u32::MAX),
            limit: 1,
        })
        .await?;
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
        .master()
        .get_console(proto::GetConsoleRequest {
            build_id: m.id(0),
            subjob_id,
            atom_id,
            max_lines,
            offset_line,
        })
        .await?;
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
        .master()
        .metrics(proto::MetricsRequest {})
        .await?
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
