//! The gateway's settings and why it could not run.
use serde::{Deserialize, Serialize};

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
