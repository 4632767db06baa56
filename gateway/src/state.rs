//! What every request handler of every API shares: the master (behind [`Master`]) and the
//! gateway's settings. No build state lives here; the metrics are the gateway's own.
use crate::config::{GatewayConfig, GatewayError};
use crate::cors::Cors;
use crate::master::{GrpcMaster, Master};
use crate::metrics::HttpMetrics;
use ish_core::auth::SecretInterceptor;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

/// Largest gRPC message the gateway accepts (a build list with many failed atoms is large).
const MAX_MESSAGE_BYTES: usize = ish_core::MAX_MESSAGE_BYTES;

/// The router's shared state. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The master is a trait object and the secret is not for logs.
        f.debug_struct("AppState")
            .field("listen", &self.0.listen)
            .field("session_id", &self.0.session_id)
            .finish_non_exhaustive()
    }
}

struct Inner {
    master: Arc<dyn Master>,
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
    /// digest too unless `cfg.rest_secret` is set). A `rest_secret` shorter than
    /// [`ish_core::auth::MIN_SECRET_LEN`] is accepted with a warning in the log, an empty one is
    /// refused. The master connection is lazy: the gateway
    /// starts even when the master is not up yet, and reconnects by itself. Must be called
    /// inside a tokio runtime.
    pub fn new(cfg: &GatewayConfig, secret: &str) -> Result<Self, GatewayError> {
        let auth = SecretInterceptor::new(secret)
            .map_err(|e| GatewayError::Config(format!("cluster secret: {e}")))?;
        let channel = Channel::from_shared(cfg.master.clone())
            .map_err(|e| GatewayError::Config(format!("invalid master URL {:?}: {e}", cfg.master)))?
            // An unreachable master should be a quick 503, not a hung request.
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        let master = GrpcMaster::new(channel, auth, MAX_MESSAGE_BYTES);
        Self::with_master(cfg, secret, Arc::new(master))
    }

    /// State over any [`Master`] (tests pass an in-memory fake). `secret` is the digest key
    /// unless `cfg.rest_secret` is set; `cfg.master` is not used.
    pub fn with_master(
        cfg: &GatewayConfig,
        secret: &str,
        master: Arc<dyn Master>,
    ) -> Result<Self, GatewayError> {
        let rest_secret = cfg
            .rest_secret
            .clone()
            .unwrap_or_else(|| secret.to_string());
        let weak = ish_core::auth::validate_rest_secret(&rest_secret)
            .map_err(|e| GatewayError::Config(format!("rest_secret: {e}")))?;
        if weak {
            tracing::warn!(
                length = rest_secret.len(),
                min = ish_core::auth::MIN_SECRET_LEN,
                "rest_secret is shorter than {} characters: accepted so that existing \
                 ClusterRunner clients keep working, but a short digest key is easy to guess; \
                 give the clients a long random one",
                ish_core::auth::MIN_SECRET_LEN
            );
        }
        let cors = Cors::new(cfg.cors_allowed_origins_regex.as_deref()).map_err(|e| {
            GatewayError::Config(format!("invalid cors_allowed_origins_regex: {e}"))
        })?;
        Ok(Self(Arc::new(Inner {
            master,
            rest_secret,
            require_auth_for_reads: cfg.require_auth_for_reads,
            cors,
            max_body_bytes: cfg.max_body_bytes,
            session_id: crate::session::new_session_id(),
            metrics: HttpMetrics::default(),
            listen: cfg.listen.clone(),
        })))
    }

    /// This gateway's session id (sent as `Session-Id` on every response).
    pub fn session_id(&self) -> &str {
        &self.0.session_id
    }

    /// The master.
    pub fn master(&self) -> &dyn Master {
        &*self.0.master
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Log output captured for the test's thread.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        fn take(&self) -> String {
            String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
        }
    }

    fn with_rest_secret(rest_secret: &str) -> Result<AppState, GatewayError> {
        let cfg = GatewayConfig {
            master: "http://127.0.0.1:1".into(),
            rest_secret: Some(rest_secret.into()),
            ..GatewayConfig::default()
        };
        AppState::new(&cfg, "the-cluster-secret")
    }

    #[tokio::test]
    async fn a_short_rest_secret_is_accepted_with_a_warning_an_empty_one_refused() {
        let logs = Logs::default();
        let w = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let state = with_rest_secret("abc").expect("a short rest_secret is refused");
        assert_eq!(state.rest_secret(), "abc");
        let out = logs.take();
        assert!(
            out.contains("WARN") && out.contains("rest_secret is shorter than 8 characters"),
            "{out:?}"
        );

        with_rest_secret("a-long-enough-secret").unwrap();
        assert_eq!(logs.take(), "", "a long rest_secret warned");

        let e = with_rest_secret("").unwrap_err().to_string();
        assert!(e.contains("rest_secret must not be empty"), "{e}");
    }
}
