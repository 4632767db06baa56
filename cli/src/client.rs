//! `ish build`: submit a build, show its progress, download its results.
use crate::local::{BuildsClient, LocalCluster, LocalOptions, connect};
use anyhow::{Context, bail};
use ish_core::proto::{self, project_source::Kind};
use serde::{Deserialize, Serialize};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

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
        return crate::rest_client::run_build(gw, &secret, &opts).await;
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
    let (mut builds, _) = connect(&url, &secret, Duration::from_secs(10)).await?;
    let code = drive(&mut builds, &url, &opts).await;
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

fn state_of(b: &proto::Build) -> proto::BuildState {
    proto::BuildState::try_from(b.state).unwrap_or_default()
}

fn progress_line(b: &proto::Build) -> String {
    let state = state_of(b).as_str_name().trim_start_matches("BUILD_STATE_");
    let mut s = format!("build {}: {state}", b.id);
    if b.num_subjobs > 0 {
        s += &format!(
            "  {}/{} subjobs  {}/{} atoms",
            b.completed_subjobs, b.num_subjobs, b.completed_atoms, b.num_atoms
        );
    }
    if b.failed_atom_count > 0 {
        s += &format!("  {} failed", b.failed_atom_count);
    }
    s
}

async fn drive(builds: &mut BuildsClient, url: &str, opts: &BuildOptions) -> anyhow::Result<i32> {
    let started = Instant::now();
    let id = builds
        .submit(proto::SubmitBuildRequest {
            request: Some(opts.request.clone()),
        })
        .await
        .map_err(|s| anyhow::anyhow!("the master refused the build: {}", s.message()))?
        .into_inner()
        .build_id;
    eprintln!("Submitted build {id} to {url}");
    let mut stream = builds
        .watch(proto::WatchBuildRequest { build_id: id })
        .await
        .map_err(|s| anyhow::anyhow!("watching build {id}: {}", s.message()))?
        .into_inner();
    let tty = std::io::stderr().is_terminal();
    let mut last_line = String::new();
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let mut last_state = proto::BuildState::Unspecified;
    let finalb = loop {
        let update = tokio::select! {
            u = stream.next() => u,
            _ = crate::shutdown_signal() => {
                eprintln!("\nInterrupted: canceling build {id}.");
                let _ = builds.cancel(proto::CancelBuildRequest { build_id: id }).await;
                return Ok(exit::INTERRUPTED);
            }
        };
        let b = match update {
            Some(Ok(u)) => u.build.unwrap_or_default(),
            Some(Err(s)) => bail!("lost the build's progress stream: {}", s.message()),
            None => bail!("the master ended the progress stream before the build ended"),
        };
        let line = progress_line(&b);
        let state = state_of(&b);
        let final_state = matches!(
            state,
            proto::BuildState::Finished | proto::BuildState::Error | proto::BuildState::Canceled
        );
        if line != last_line {
            if tty {
                eprint!("\r\x1b[2K{line}");
                let _ = std::io::stderr().flush();
            } else if state != last_state
                || final_state
                || last_print.elapsed() > Duration::from_secs(2)
            {
                eprintln!("{line}");
                last_print = Instant::now();
            }
            last_line = line;
        }
        last_state = state;
        if final_state {
            if tty {
                eprintln!();
            }
            break b;
        }
    };
    let secs = started.elapsed().as_secs_f64();
    match state_of(&finalb) {
        proto::BuildState::Finished => {
            let ok = finalb.result == proto::BuildResult::NoFailures as i32;
            eprintln!(
                "Build {id} finished in {secs:.1} s: {} ({} atoms, {} failed)",
                if ok { "NO_FAILURES" } else { "FAILURE" },
                finalb.num_atoms,
                finalb.failed_atom_count
            );
            for a in &finalb.failed_atoms {
                eprintln!(
                    "  failed: artifact_{}_{} exit {} — {}",
                    a.subjob_id,
                    a.id,
                    a.exit_code.unwrap_or_default(),
                    a.command_string
                );
            }
            if !opts.no_download {
                let dir = &opts.cfg.results_dir;
                download_results(builds, id, dir).await?;
                eprintln!("Results in {}/", dir.display());
            }
            Ok(if ok { exit::OK } else { exit::FAILED })
        }
        proto::BuildState::Error => {
            eprintln!("Build {id} aborted due to error: {}", finalb.error_message);
            Ok(exit::FAILED)
        }
        _ => {
            eprintln!("Build {id} was canceled.");
            Ok(exit::FAILED)
        }
    }
}

/// Downloads results.zip and unpacks it into `dir` (replacing what was there).
pub async fn download_results(
    builds: &mut BuildsClient,
    id: u64,
    dir: &Path,
) -> anyhow::Result<()> {
    let mut stream = builds
        .download_artifacts(proto::DownloadArtifactsRequest {
            build_id: id,
            format: proto::ArchiveFormat::Zip as i32,
            offset: 0,
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("downloading results: {}", s.message()))?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| anyhow::anyhow!("downloading results: {}", s.message()))?;
        bytes.extend_from_slice(&chunk.data);
    }
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || unzip(&bytes, &dir)).await??;
    Ok(())
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
