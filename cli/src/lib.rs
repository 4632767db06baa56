//! The `ish` binary's library: wiring the role crates together.
//!
//! - [`settings`]: config files (TOML, `deny_unknown_fields`) merged with `ISH_*` env and flags;
//!   the cluster secret's sources.
//! - [`local`]: a whole cluster in one process (master + gateway + N slaves), used by `ish local`,
//!   by `ish build` when no master is running, and by the in-process tests.
//! - [`bench`]: `ish bench`, benchmarks that start their own cluster and print a table.
//! - [`client`]: the client verbs (`ish build`): one flow over gRPC to a master or a
//!   gateway's ClusterRunner REST API ([`client::rest`]).
pub mod bench;
pub mod bench_suite;
pub mod client;
pub mod local;
pub mod settings;

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
