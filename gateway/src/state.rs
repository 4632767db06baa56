//! What every request handler shares: the master's gRPC clients and the gateway's settings. No
//! build state lives here; the metrics are the gateway's own.
use crate::cors::Cors;
use crate::metrics::HttpMetrics;
use crate::{GatewayConfig, GatewayError};
use ish_core::auth::SecretInterceptor;
use ish_core::proto;
use std::sync::Arc;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// gRPC client of the master's build service, with the cluster secret attached.
pub type BuildsClient =
    proto::builds_client::BuildsClient<InterceptedService<Channel, SecretInterceptor>>;
/// gRPC client of the master's cluster service, with the cluster secret attached.
pub type ClusterClient =
    proto::cluster_client::ClusterClient<InterceptedService<Channel, SecretInterceptor>>;

/// Largest gRPC message the gateway accepts (a build list with many failed atoms is large).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The router's shared state. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    builds: BuildsClient,
    cluster: ClusterClient,
    rest_secret: String,
    require_auth_for_reads: bool,
    cors: Cors,
    max_body_bytes: usize,
    session_id: String,
    metrics: HttpMetrics,
    listen: String,
}

impl AppState {
    /// State for a gateway with settings `cfg` and cluster secret `secret` (the key of the REST
    /// digest too unless `cfg.rest_secret` is set). The master connection is lazy: the gateway
    /// starts even when the master is not up yet, and reconnects by itself. Must be called
    /// inside a tokio runtime.
    pub fn new(cfg: &GatewayConfig, secret: &str) -> Result<Self, GatewayError> {
        let rest_secret = cfg
            .rest_secret
            .clone()
            .unwrap_or_else(|| secret.to_string());
        match ish_core::auth::validate_secret(&rest_secret) {
            // ClusterRunner secrets only had to be 8+ characters; spaces are fine in an HMAC key.
            Ok(()) | Err(ish_core::auth::SecretError::NotPrintable) => {}
            Err(e) => return Err(GatewayError::Config(format!("rest_secret: {e}"))),
        }
        let cors = Cors::new(cfg.cors_allowed_origins_regex.as_deref()).map_err(|e| {
            GatewayError::Config(format!("invalid cors_allowed_origins_regex: {e}"))
        })?;
        let auth = SecretInterceptor::new(secret)
            .map_err(|e| GatewayError::Config(format!("cluster secret: {e}")))?;
        let channel = Channel::from_shared(cfg.master.clone())
            .map_err(|e| GatewayError::Config(format!("invalid master URL {:?}: {e}", cfg.master)))?
            // An unreachable master should be a quick 503, not a hung request.
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        Ok(Self(Arc::new(Inner {
            builds: proto::builds_client::BuildsClient::with_interceptor(
                channel.clone(),
                auth.clone(),
            )
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
            cluster: proto::cluster_client::ClusterClient::with_interceptor(channel, auth)
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            rest_secret,
            require_auth_for_reads: cfg.require_auth_for_reads,
            cors,
            max_body_bytes: cfg.max_body_bytes,
            session_id: crate::auth::new_session_id(),
            metrics: HttpMetrics::default(),
            listen: cfg.listen.clone(),
        })))
    }

    /// This gateway's session id (sent as `Session-Id` on every response).
    pub fn session_id(&self) -> &str {
        &self.0.session_id
    }

    /// A client of the master's build service.
    pub fn builds(&self) -> BuildsClient {
        self.0.builds.clone()
    }

    /// A client of the master's cluster service.
    pub fn cluster(&self) -> ClusterClient {
        self.0.cluster.clone()
    }

    /// Key of the ClusterRunner message digest.
    pub fn rest_secret(&self) -> &str {
        &self.0.rest_secret
    }

    /// Whether GETs need the digest too.
    pub fn require_auth_for_reads(&self) -> bool {
        self.0.require_auth_for_reads
    }

    /// CORS settings.
    pub fn cors(&self) -> &Cors {
        &self.0.cors
    }

    /// Largest accepted request body.
    pub fn max_body_bytes(&self) -> usize {
        self.0.max_body_bytes
    }

    /// Request durations.
    pub fn metrics(&self) -> &HttpMetrics {
        &self.0.metrics
    }

    /// The configured listen address (the host of absolute URLs when a request has no `Host`).
    pub fn listen(&self) -> &str {
        &self.0.listen
    }
}
