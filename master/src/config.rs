//! Master settings. Every field has a documented default; `conf/master.toml` shows them all.
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Settings of the master role.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MasterConfig {
    /// gRPC listen address. Default `127.0.0.1:43100` (43000 is the REST gateway, ClusterRunner's port).
    pub listen: String,
    /// Directory for the database, results and archives. Default `~/.ish/master`.
    pub data_dir: PathBuf,
    /// Cluster secret (also `--secret` / `ISH_SECRET`). Default: generated once and kept in
    /// `<data_dir>/secret` (mode 0600).
    pub secret: Option<String>,
    /// How often slaves send heartbeats, in milliseconds. Default 2000.
    pub heartbeat_interval_ms: u64,
    /// A slave that sends nothing for this long is declared lost and its work re-queued, in
    /// milliseconds. Default 15000.
    pub heartbeat_timeout_ms: u64,
    /// Setup failures (across slaves) after which a build ends in ERROR. Default 3.
    pub max_setup_failures: u32,
    /// Preparation attempts (a preparing slave lost) after which a build ends in ERROR. Default 3.
    pub max_prepare_attempts: u32,
    /// After a restart, how long subjobs of resumed builds wait for the slaves that ran them to
    /// reconnect and report, before they are dispatched again, in milliseconds. Default 5000.
    pub resume_grace_ms: u64,
    /// Dispatches of one subjob (each interrupted by a lost slave) before its build ends in
    /// ERROR. Default 5.
    pub max_subjob_attempts: u32,
    /// Most atoms one build may have (atomizer output or atoms_override). Default 100000.
    pub max_atoms_per_build: usize,
    /// Most artifact bytes (files atoms write to $ARTIFACT_DIR, and consoles) one build may
    /// upload in all; beyond it uploads are refused and the atom is recorded as failed.
    /// Default 10 GiB.
    pub max_artifact_bytes_per_build: u64,
    /// Connections the gRPC port holds open at once (slaves, gateways, clients, and connections
    /// still in their handshake); 0 = half the process's file limit, which the master raises to
    /// its hard limit at start (the other half is for the database, consoles and archives). At
    /// the cap the oldest connection still in its handshake is closed for a new one, so a flood
    /// of silent connections cannot keep a real client out. Default 0.
    pub max_connections: usize,
    /// A new connection that has not begun HTTP/2 (sent its preface) within this time is closed,
    /// in milliseconds. Default 10000.
    pub handshake_timeout_ms: u64,
    /// HTTP/2 streams one connection may have open at once (every client, slave and gateway
    /// call is a stream). Default 256.
    pub max_concurrent_streams: u32,
    /// Atom timeout for jobs whose config sets no `atom_timeout`, in seconds; 0 = none.
    /// Default 0.
    pub default_atom_timeout_s: u32,
    /// Build timeout for jobs whose config sets no `build_timeout`, in seconds (counted from
    /// submission); 0 = none. Default 0.
    pub default_build_timeout_s: u32,
    /// Messages queued to one slave before it is considered stuck and dropped. Default 4096.
    pub slave_queue_capacity: usize,
    /// Largest artifact file a slave may upload for one atom, in bytes. Default 1 GiB.
    pub max_artifact_bytes_per_atom: u64,
}

impl Default for MasterConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:43100".into(),
            data_dir: default_home().join("master"),
            secret: None,
            heartbeat_interval_ms: 2_000,
            heartbeat_timeout_ms: 15_000,
            max_setup_failures: 3,
            max_prepare_attempts: 3,
            resume_grace_ms: 5_000,
            max_subjob_attempts: 5,
            max_atoms_per_build: 100_000,
            max_artifact_bytes_per_build: 10 << 30,
            max_connections: 0,
            handshake_timeout_ms: 10_000,
            max_concurrent_streams: 256,
            default_atom_timeout_s: 0,
            default_build_timeout_s: 0,
            slave_queue_capacity: 4_096,
            max_artifact_bytes_per_atom: 1 << 30,
        }
    }
}

/// `~/.ish`, or `./.ish` when there is no home directory.
pub fn default_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".ish")
}
