//! Ish CD gateway: the stateless REST front, a host of several REST APIs over one master.
//!
//! Today it serves ClusterRunner's master REST API, wire-compatible (spec §1, §3, §4, §11), in
//! [`clusterrunner`]; the Ish CD API (`/v1/projects`, `/v1/account`, `/v1/tokens`) and the
//! ndscheduler API (`/api/v1/...`) are to be mounted beside it, each in its own module. Every
//! call is translated into gRPC calls on the master; the gateway keeps no build state, so
//! several gateways can run behind a load balancer. `docs/rest.md` is the route reference,
//! `docs/deviations.md` lists where it differs from ClusterRunner on purpose.
//!
//! ```text
//! listener (bounded connections) ─▶ router (lib.rs)
//!   layers, every route: request id · metrics · Session-Id + CORS · body limit (limits)
//!   ├─ /healthz
//!   └─ clusterrunner (its routes, auth, JSON, error bodies) ─▶ state.master(): dyn Master
//!                                                               └─ GrpcMaster ─▶ gRPC master
//! ```
//! Shared by every API: [`ApiError`] (status and headers; each API renders the body),
//! [`AppState`] (settings, metrics, session, the [`master::Master`]), [`respond`].
use axum::{Router, routing::get};
use std::future::Future;
use tokio::net::TcpListener;

pub mod clusterrunner;
mod config;
pub mod cors;
pub mod error;
pub mod layers;
pub mod limits;
mod listener;
pub mod master;
pub mod metrics;
pub mod respond;
pub mod session;
pub mod state;

pub use config::{GatewayConfig, GatewayError};
pub use error::ApiError;
pub use state::AppState;

/// The REST routes: `/healthz` for load balancers, everything else is ClusterRunner's API.
/// A new API is one more `.merge(its_module::router())` before the fallback (its routes are
/// matched first, ClusterRunner's table gets what is left); the layers below cover it at once.
pub fn router(state: AppState) -> Router {
    use axum::middleware::{from_fn, from_fn_with_state};
    Router::new()
        .route("/healthz", get(healthz))
        .merge(clusterrunner::router())
        // Innermost first: the body limit, then the headers every response carries, then the
        // metric (timing all of the above), then the request id around everything.
        .layer(from_fn_with_state(state.clone(), limits::layer))
        .layer(from_fn_with_state(state.clone(), layers::headers))
        .layer(from_fn_with_state(state.clone(), layers::metrics))
        .layer(from_fn(layers::request_id))
        .with_state(state)
}

/// For load balancers: the gateway is up (it does not ask the master, which has its own probe).
async fn healthz() -> impl axum::response::IntoResponse {
    (axum::Extension(layers::Endpoint("/healthz".into())), "ok")
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
