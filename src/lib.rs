//! Ish CD shared core: the pieces every role needs and none owns.
//!
//! - [`proto`]: the gRPC contract generated from `proto/ish/v1` (the slave link, the build and
//!   cluster services). It is THE interface between master, slaves, gateways and clients.
//! - [`jobconfig`]: `clusterrunner.yaml` / inline `config` parsing and validation, command joining.
//! - [`grouping`]: atoms -> subjobs from timing history (ClusterRunner's algorithm).
//! - [`console`]: ClusterRunner's console paging over an atom's output.
//! - [`state`]: the build state machine.
//! - [`auth`]: the cluster secret and ClusterRunner's HMAC-SHA512 message digest.
//! - [`jsontext`]: JSON objects normalized as text (request_params, in the client's key order).
//!
//! Nothing here does I/O; the role crates (`ish-master`, `ish-slave`, `ish-gateway`) do.
pub mod auth;
pub mod console;
pub mod grouping;
pub mod jobconfig;
pub mod jsontext;
pub mod paths;
#[cfg(test)]
mod proptests;
pub mod proto;
pub mod state;

/// Largest gRPC message any role sends or accepts, on both ends of every link: one constant so
/// the roles never disagree (a slave keeping tonic's 4 MiB default while the master sends a
/// 50,000-atom build made every slave drop its session). Requests are bounded by their own limits
/// (atoms, config, env); this only has to let the largest valid message through.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Version of every Ish CD binary built from this tree.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Current time as Unix epoch seconds (the unit of every timestamp in the APIs).
pub fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
