//! Ish CD master: the control plane.
//!
//! It decides and never executes: it never clones a repository and never runs a user command.
//!
//! Data flow:
//! ```text
//! gRPC (grpc.rs) ─typed calls─▶ MasterHandle (actor.rs) ─Command─▶ engine actor, owns Core (engine/)
//!      ▲                                                            │ point writes   │ ResultsJob    │ MasterMessage
//!      └── snapshots / files                                        ▼                ▼               ▼
//!                                                        sled (storage/)   results queue     slave streams
//!                                                                          (results.rs, archive.rs)
//! ```
//! Commands are grouped by caller (`command.rs`), ids are typed where they cross modules
//! (`ids.rs`), and the engine reads time only from its `Clock` (`clock.rs`). Everything durable
//! is in sled under `<data_dir>/db`, behind one storage trait per domain (`storage/`); result files under `<data_dir>/results/<build>/`. On start
//! the engine reloads every build and resumes unfinished ones.
pub mod actor;
pub mod archive;
pub mod clock;
pub mod command;
pub mod config;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod ids;
pub mod listener;
pub mod metrics;
pub mod results;
pub mod storage;
/// Streaming ZIP writer for `results.zip`: constant memory whatever the entry count.
pub mod zipstream;

pub use config::MasterConfig;
pub use error::MasterError;

use ish_core::proto;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

/// Largest gRPC message accepted (tonic's default is 4 MiB, less than a 10 MiB REST body once the
/// gateway adds its request_params copy).
const MAX_MESSAGE: usize = ish_core::MAX_MESSAGE_BYTES;

/// File in the data dir that holds the address the master listens on.
pub const ADDR_FILE: &str = "master.addr";

/// Serves the master on `listener` until `shutdown` completes. `secret` is the cluster secret
/// every caller must present.
pub async fn serve(
    cfg: MasterConfig,
    secret: String,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MasterError> {
    let store = storage::Store::open(&cfg.data_dir.join("db"))?;
    let layout = results::ResultsLayout::new(cfg.data_dir.join("results"));
    let core_cfg = engine::CoreConfig {
        heartbeat_interval: Duration::from_millis(cfg.heartbeat_interval_ms),
        heartbeat_timeout: Duration::from_millis(cfg.heartbeat_timeout_ms),
        max_setup_failures: cfg.max_setup_failures,
        max_prepare_attempts: cfg.max_prepare_attempts,
        resume_grace: Duration::from_millis(cfg.resume_grace_ms),
        max_subjob_attempts: cfg.max_subjob_attempts,
        max_atoms_per_build: cfg.max_atoms_per_build,
        max_artifact_bytes_per_build: cfg.max_artifact_bytes_per_build,
        default_atom_timeout_s: cfg.default_atom_timeout_s,
        default_build_timeout_s: cfg.default_build_timeout_s,
    };
    let builds: std::sync::Arc<dyn storage::BuildStore> = std::sync::Arc::new(store.clone());
    let (handle, _actor) = actor::start(core_cfg, clock::system(), builds, layout).await?;
    let check = move |req: tonic::Request<()>| -> Result<tonic::Request<()>, tonic::Status> {
        ish_core::auth::check_metadata(&secret, req.metadata())?;
        Ok(req)
    };
    let link = grpc::SlaveLinkService::new(
        handle.clone(),
        cfg.slave_queue_capacity,
        cfg.max_artifact_bytes_per_atom,
    );
    let addr = listener.local_addr().ok();
    if let Some(addr) = addr {
        // Tools and tests on this host find a master started on port 0 here.
        let file = cfg.data_dir.join(ADDR_FILE);
        let tmp = cfg.data_dir.join(format!("{ADDR_FILE}.tmp"));
        // Written aside and renamed: a reader never sees a half-written address.
        std::fs::write(&tmp, addr.to_string())
            .and_then(|()| std::fs::rename(&tmp, &file))
            .map_err(|e| MasterError::io(format!("writing {}", file.display()), e))?;
    }
    let limits = listener::Limits {
        max_connections: listener::connection_cap(cfg.max_connections),
        handshake_timeout: Duration::from_millis(cfg.handshake_timeout_ms),
    };
    tracing::info!(?addr, data_dir = %cfg.data_dir.display(), max_connections = limits.max_connections, "master listening");
    let stop = handle.clone();
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(cfg.max_concurrent_streams))
        .add_service(InterceptedService::new(
            proto::slave_link_server::SlaveLinkServer::new(link)
                .max_decoding_message_size(MAX_MESSAGE),
            check.clone(),
        ))
        .add_service(InterceptedService::new(
            proto::builds_server::BuildsServer::new(grpc::BuildsService::new(handle.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
            check.clone(),
        ))
        .add_service(InterceptedService::new(
            proto::cluster_server::ClusterServer::new(grpc::ClusterService::new(handle.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
            check,
        ))
        .serve_with_incoming_shutdown(listener::incoming(listener, limits), async move {
            shutdown.await;
            tracing::info!("master shutting down");
            stop.shutdown().await;
        })
        .await
        .map_err(|e| MasterError::io("serving gRPC", std::io::Error::other(e)))?;
    store.flush().await?;
    Ok(())
}
