//! `ish build`: submit a build, show its progress, download its results.
//!
//! The flow is written once (`flow.rs`: submit, follow, cancel on Ctrl-C, report, unpack); what
//! carries it is a [`BuildApi`](api::BuildApi): gRPC to a master (`grpc.rs`, the default, with
//! an embedded cluster when no master answers) or a gateway's ClusterRunner REST API
//! (`rest.rs`, `--gateway`).
pub(crate) mod api;
mod flow;
mod grpc;
pub mod rest;

use crate::local::{LocalCluster, LocalOptions, connect};
use crate::settings::Paths;
use anyhow::{Context, bail};
use ish_core::proto::{self, project_source::Kind};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings of the client verbs (`conf/client.toml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// gRPC URL of the master. Default: `http://127.0.0.1:43100`, and when nothing answers there
    /// (and no master was named) an embedded local cluster is started for the build.
    pub master: Option<String>,
    /// URL of a REST gateway (e.g. `http://ci-gateway:43000`). When set, builds go through its
    /// ClusterRunner API (digest-signed) instead of gRPC to the master.
    pub gateway: Option<String>,
    /// Cluster secret (also `--secret` / `ISH_SECRET`). Default: the secret of a master on this
    /// host (`~/.ish/master/secret`).
    pub secret: Option<String>,
    /// Where results are unpacked. Default `build_results`.
    pub results_dir: PathBuf,
    /// Executors of the embedded cluster's slave. Default: the number of CPUs.
    pub embedded_executors: Option<u32>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            master: None,
            gateway: None,
            secret: None,
            results_dir: PathBuf::from("build_results"),
            embedded_executors: None,
        }
    }
}

impl Paths for ClientConfig {
    fn paths(&mut self) -> Vec<&mut PathBuf> {
        vec![&mut self.results_dir]
    }
}

/// Default master address probed when none is given.
pub const DEFAULT_MASTER: &str = "http://127.0.0.1:43100";

/// What `ish build` was asked for, after flags and settings are merged.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Client settings.
    pub cfg: ClientConfig,
    /// The request to submit.
    pub request: proto::BuildRequest,
    /// Skip downloading results.
    pub no_download: bool,
}

/// Exit codes of `ish build`.
pub mod exit {
    /// Finished with no failures.
    pub const OK: i32 = 0;
    /// Finished with failures, errored or canceled.
    pub const FAILED: i32 = 1;
    /// Interrupted (the build was canceled).
    pub const INTERRUPTED: i32 = 130;
}

/// A directory source (absolute path).
pub fn directory_source(dir: &Path) -> anyhow::Result<proto::ProjectSource> {
    let abs = std::fs::canonicalize(dir)
        .with_context(|| format!("project directory {}", dir.display()))?;
    Ok(proto::ProjectSource {
        kind: Some(Kind::Directory(proto::DirectorySource {
            path: abs.display().to_string(),
        })),
    })
}

/// Reads a job config file (YAML or JSON: one job's sections) into the request's JSON form.
pub fn job_config_json(file: &Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let value: serde_json::Value =
        serde_norway::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    Ok(value.to_string())
}

/// Runs `ish build`; returns the process exit code.
pub async fn run_build(opts: BuildOptions) -> anyhow::Result<i32> {
    if let Some(gw) = &opts.cfg.gateway {
        if opts.cfg.master.is_some() {
            bail!("give either a master (gRPC) or a gateway (REST), not both");
        }
        let secret = crate::settings::client_secret(opts.cfg.secret.clone())?;
        let mut api = rest::RestApi::new(gw, &secret)?;
        return flow::run(&mut api, &opts).await;
    }
    let mut embedded: Option<(LocalCluster, Option<tempfile_dir::TempDir>)> = None;
    let (url, secret) = match &opts.cfg.master {
        Some(url) => (
            url.clone(),
            crate::settings::client_secret(opts.cfg.secret.clone())?,
        ),
        None => {
            let secret = crate::settings::client_secret(opts.cfg.secret.clone());
            match secret {
                Ok(s)
                    if connect(DEFAULT_MASTER, &s, Duration::from_millis(300))
                        .await
                        .is_ok() =>
                {
                    (DEFAULT_MASTER.to_string(), s)
                }
                _ => {
                    let executors = opts.cfg.embedded_executors.unwrap_or_else(|| {
                        std::thread::available_parallelism()
                            .map(|n| n.get() as u32)
                            .unwrap_or(2)
                    });
                    let (cluster, tmp) = start_embedded(executors).await?;
                    let r = (cluster.master_url.clone(), cluster.secret.clone());
                    embedded = Some((cluster, tmp));
                    r
                }
            }
        }
    };
    let (builds, _) = connect(&url, &secret, Duration::from_secs(10)).await?;
    let mut api = grpc::GrpcApi::new(builds, &url);
    let code = flow::run(&mut api, &opts).await;
    if let Some((cluster, _tmp)) = embedded {
        cluster.shutdown().await?;
    }
    code
}

mod tempfile_dir {
    /// A directory deleted on drop (embedded clusters when the usual one is busy).
    #[derive(Debug)]
    pub struct TempDir(pub std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Starts a one-slave cluster for the duration of a build. It keeps its data (timing history)
/// in `~/.ish/embedded`, or in a temporary directory when another embedded cluster holds it.
async fn start_embedded(
    executors: u32,
) -> anyhow::Result<(LocalCluster, Option<tempfile_dir::TempDir>)> {
    eprintln!(
        "No master at {DEFAULT_MASTER}; starting an embedded local cluster (1 slave × {executors} executors)."
    );
    let home = ish_master::config::default_home().join("embedded");
    let opts = LocalOptions::new(home, 1, executors);
    match LocalCluster::start(opts.clone()).await {
        Ok(c) => Ok((c, None)),
        Err(_) => {
            let dir = std::env::temp_dir().join(format!("ish-embedded-{}", std::process::id()));
            let mut opts = opts;
            opts.data_dir = dir.clone();
            let c = LocalCluster::start(opts).await?;
            Ok((c, Some(tempfile_dir::TempDir(dir))))
        }
    }
}

/// Unpacks a results.zip into `dir` (replacing what was there); refuses entries that would land
/// outside it.
pub fn unzip(bytes: &[u8], dir: &PathBuf) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing old {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let mut zip =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).context("reading results.zip")?;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i)?;
        // enclosed_name refuses absolute paths and `..`: an archive cannot write outside `dir`.
        let Some(rel) = entry.enclosed_name() else {
            bail!("results.zip has an unsafe entry {:?}", entry.name());
        };
        let path = dir.join(rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&path)?;
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut out = std::fs::File::create(&path)?;
        std::io::copy(&mut entry, &mut out)?;
    }
    Ok(())
}
