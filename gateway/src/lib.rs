//! Ish CD gateway: the stateless REST front.
//!
//! It serves ClusterRunner's master REST API, wire-compatible (spec §1, §3, §4, §11), by
//! translating every call into gRPC calls on the master; it keeps no build state of its own, so
//! several gateways can run behind a load balancer. `docs/rest.md` is the route reference,
//! `docs/deviations.md` lists where it differs from ClusterRunner on purpose.
//!
//! ```text
//! HTTP ─▶ handlers::dispatch ─▶ routes (table, child_routes) + version (Api-Version)
//!              │                 auth (session, digest) · body (__encoded_body__) · params
//!              ├─▶ request (JSON → BuildRequest) ─▶ gRPC Builds/Cluster on the master
//!              └─◀ json (Build → ClusterRunner objects) · artifacts (streamed archives)
//! ```
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Router, routing::get};
use serde::{Deserialize, Serialize};
use std::future::Future;
use tokio::net::TcpListener;

pub mod artifacts;
pub mod auth;
pub mod body;
pub mod cors;
pub mod error;
mod handlers;
pub mod json;
mod listener;
pub mod metrics;
pub mod params;
pub mod request;
pub mod routes;
pub mod state;
pub mod version;

pub use error::ApiError;
pub use state::AppState;

/// Settings of the gateway role.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// HTTP listen address. Default `127.0.0.1:43000` (ClusterRunner's master port, so existing
    /// ClusterRunner clients find the API where they expect it).
    pub listen: String,
    /// gRPC URL of the master. Default `http://127.0.0.1:43100`.
    pub master: String,
    /// Cluster secret (also `--secret` / `ISH_SECRET`).
    pub secret: Option<String>,
    /// Key of ClusterRunner's message digest (`Clusterrunner-Message-Authentication-Digest`),
    /// i.e. the `secret` of the ClusterRunner clients. Default: the cluster secret.
    pub rest_secret: Option<String>,
    /// Require the digest on reads (GET/HEAD) too; it is then computed over the (usually empty)
    /// request body. `/` and `/healthz` stay open. Default `false` (dashboards read without
    /// credentials, as with ClusterRunner).
    pub require_auth_for_reads: bool,
    /// Origins allowed to read the API from a browser: a regex matched at the start of the
    /// `Origin` header. Default none (CORS off).
    pub cors_allowed_origins_regex: Option<String>,
    /// Largest request body accepted; larger ones get 413. Default 10 MiB.
    pub max_body_bytes: usize,
    /// A connection must deliver a complete request head within this many milliseconds of
    /// connecting, and of the first byte of each later request. Default 10 s.
    pub header_read_timeout_ms: u64,
    /// A kept-alive connection with no request in progress is closed after this many
    /// milliseconds. Default 60 s.
    pub idle_timeout_ms: u64,
    /// Most connections open at once. At the cap, a new connection replaces the one waiting
    /// longest without a request in progress; when all are busy, new ones wait in the kernel's
    /// accept queue. Keep it well under the open-file limit (`ulimit -n`; the gateway raises
    /// its soft limit to the hard one at start). Default 512.
    pub max_connections: u32,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:43000".into(),
            master: "http://127.0.0.1:43100".into(),
            secret: None,
            rest_secret: None,
            require_auth_for_reads: false,
            cors_allowed_origins_regex: None,
            max_body_bytes: 10 << 20,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 512,
        }
    }
}

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Bad settings.
    #[error("invalid gateway configuration: {0}")]
    Config(String),
    /// Serving failed.
    #[error("serving HTTP failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// A JSON response from already serialized bytes, with ClusterRunner's content type.
pub(crate) fn json_bytes(status: StatusCode, bytes: Vec<u8>) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=UTF-8"),
        )],
        bytes,
    )
        .into_response()
}

/// The REST routes: `/healthz` for load balancers, everything else is ClusterRunner's API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .fallback(handlers::dispatch)
        .with_state(state)
}

/// Serves the gateway on `listener` until `shutdown` completes. `secret` is the cluster secret
/// the gateway presents to the master (and the digest key unless `rest_secret` is set).
pub async fn serve(
    cfg: GatewayConfig,
    secret: String,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let limits = listener_limits(&cfg)?;
    // The address absolute URLs fall back to: the bound one, with the port `:0` stood for.
    let cfg = match listener.local_addr() {
        Ok(addr) => GatewayConfig {
            listen: addr.to_string(),
            ..cfg
        },
        Err(_) => cfg,
    };
    let state = AppState::new(&cfg, &secret)?;
    tracing::info!(addr = ?listener.local_addr().ok(), master = %cfg.master, "gateway listening");
    listener::serve(listener, router(state), limits, shutdown).await?;
    Ok(())
}

fn listener_limits(cfg: &GatewayConfig) -> Result<listener::Limits, GatewayError> {
    // Zero would mean "close every connection at once" or "serve nobody": never what is meant.
    for (key, value) in [
        ("header_read_timeout_ms", cfg.header_read_timeout_ms),
        ("idle_timeout_ms", cfg.idle_timeout_ms),
        ("max_connections", u64::from(cfg.max_connections)),
    ] {
        if value == 0 {
            return Err(GatewayError::Config(format!(
                "{key} must be at least 1 (got 0)"
            )));
        }
    }
    // 64: the master channel, the log and the runtime's own descriptors, with room to spare.
    if let Some(limit) = listener::raise_file_limit()
        && u64::from(cfg.max_connections) + 64 > limit
    {
        tracing::warn!(
            max_connections = cfg.max_connections,
            open_file_limit = limit,
            "max_connections is not well below the open-file limit (ulimit -n): a flood can \
             exhaust the gateway's descriptors before the cap; raise the limit or lower the cap"
        );
    }
    Ok(listener::Limits {
        header_read_timeout: std::time::Duration::from_millis(cfg.header_read_timeout_ms),
        idle_timeout: std::time::Duration::from_millis(cfg.idle_timeout_ms),
        max_connections: cfg.max_connections,
    })
}
