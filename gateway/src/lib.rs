//! Ish CD gateway: the stateless REST front.
//!
//! It will translate the ClusterRunner, Ish CD runs and ndscheduler JSON APIs into gRPC calls on
//! the master (issue 3 and later). Today it serves the liveness routes (`GET /`, `GET /healthz`)
//! and holds a lazily connected gRPC channel to the master; it keeps no build state of its own,
//! so several gateways can run behind a load balancer.
use axum::{Json, Router, routing::get};
use serde::{Deserialize, Serialize};
use std::future::Future;
use tokio::net::TcpListener;

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
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:43000".into(),
            master: "http://127.0.0.1:43100".into(),
            secret: None,
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

/// The REST routes.
pub fn router() -> Router {
    Router::new()
        .route("/", get(|| async { Json(serde_json::json!({})) }))
        .route("/healthz", get(|| async { "ok" }))
}

/// Serves the gateway on `listener` until `shutdown` completes.
pub async fn serve(
    cfg: GatewayConfig,
    _secret: String,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    // The channel connects on first use and reconnects by itself; the gateway starts even when
    // the master is not up yet.
    let _master = tonic::transport::Channel::from_shared(cfg.master.clone())
        .map_err(|e| GatewayError::Config(format!("invalid master URL {:?}: {e}", cfg.master)))?
        .connect_lazy();
    tracing::info!(addr = ?listener.local_addr().ok(), master = %cfg.master, "gateway listening");
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
