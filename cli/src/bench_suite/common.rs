//! What every benchmark shares: the result table, the scale, a cluster started for it, a
//! build run to its end with the time of its first atom.
use crate::local::{BuildsClient, LocalCluster, LocalOptions};
use anyhow::{Context, bail};
use ish_core::proto;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

/// One line of the result table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Benchmark id and what is measured.
    pub what: String,
    /// The measured value, formatted.
    pub value: String,
    /// The target, formatted ("" when there is none).
    pub target: String,
    /// Whether the target is met (None: no target).
    pub met: Option<bool>,
}

impl Row {
    pub(super) fn new(
        what: impl Into<String>,
        value: impl Into<String>,
        target: impl Into<String>,
        met: Option<bool>,
    ) -> Self {
        Self {
            what: what.into(),
            value: value.into(),
            target: target.into(),
            met,
        }
    }
}

/// Prints rows as a Markdown table.
pub fn print_rows(rows: &[Row]) {
    println!("| benchmark | measured | target | met |");
    println!("|---|---:|---|:-:|");
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "no",
            None => "",
        };
        println!("| {} | {} | {} | {met} |", r.what, r.value, r.target);
    }
}

/// Size of a run.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Small numbers (CI smoke test).
    pub quick: bool,
}

pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn new(tag: &str) -> anyhow::Result<Self> {
        let p = std::env::temp_dir().join(format!(
            "ish-bench-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}

pub(super) fn dir_request(dir: &Path) -> proto::BuildRequest {
    proto::BuildRequest {
        source: Some(proto::ProjectSource {
            kind: Some(proto::project_source::Kind::Directory(
                proto::DirectorySource {
                    path: dir.display().to_string(),
                },
            )),
        }),
        ..Default::default()
    }
}

pub(super) async fn cluster(
    data: &Path,
    slaves: u32,
    executors: u32,
) -> anyhow::Result<LocalCluster> {
    let mut opts = LocalOptions::new(data.to_path_buf(), slaves, executors);
    opts.master.heartbeat_interval_ms = 1_000;
    let c = LocalCluster::start(opts).await?;
    let (_, mut cl) = c.clients().await?;
    wait_for_slaves(&mut cl, slaves as usize, Duration::from_secs(20)).await?;
    Ok(c)
}

/// Waits until `n` slaves are registered with the master.
pub(super) async fn wait_for_slaves(
    cl: &mut crate::local::ClusterClient,
    n: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let registered = cl
            .list_slaves(proto::ListSlavesRequest {})
            .await?
            .into_inner()
            .slaves
            .len();
        if registered >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{registered} of {n} slaves registered within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Submits and waits for the end; returns the build and the wall time.
pub(super) async fn run_build(
    b: &mut BuildsClient,
    req: proto::BuildRequest,
) -> anyhow::Result<(proto::Build, Duration)> {
    let t0 = Instant::now();
    let id = b
        .submit(proto::SubmitBuildRequest { request: Some(req) })
        .await?
        .into_inner()
        .build_id;
    let mut watch = b
        .watch(proto::WatchBuildRequest { build_id: id })
        .await?
        .into_inner();
    let mut last: Option<proto::Build> = None;
    let mut phases = Vec::new();
    while let Some(u) = watch.next().await {
        let b = u?.build;
        if let Some(b) = &b
            && last.as_ref().is_none_or(|l| l.state != b.state)
        {
            phases.push(format!(
                "{:?}@{:.2}s",
                proto::BuildState::try_from(b.state).unwrap_or_default(),
                t0.elapsed().as_secs_f64()
            ));
        }
        last = b;
    }
    tracing::info!(phases = ?phases, "build phases");
    let build = last.context("no build update")?;
    let elapsed = t0.elapsed();
    if proto::BuildState::try_from(build.state) != Ok(proto::BuildState::Finished) {
        bail!(
            "build {id} ended in {:?}: {}",
            build.state,
            build.error_message
        );
    }
    Ok((build, elapsed))
}
