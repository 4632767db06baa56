//! `ish bench suite`: the performance benchmarks of the dispatch engine (B1–B5), each on a
//! cluster started for it on 127.0.0.1, printed as one table beside the targets.
//!
//! - B1 trivial atoms: N atoms of `true` on 2 slaves × 4 executors, end to end, beside the same
//!   commands run by `xargs -P 8 bash -c` (the physical floor on this machine).
//! - B2 makespan: atoms with skewed (log-normal) durations on 8 executors, after a first build
//!   recorded their times: makespan ÷ max(total / executors, longest atom), for the queue
//!   dispatch and for ClusterRunner's fixed grouping.
//! - B3 master scale: many simulated slaves (in-process stream clients that answer at once) and
//!   zero-work atoms against a master process: dispatches/s, dispatch latency, master peak RSS.
//! - B4 console throughput: one atom writing a lot to stdout through a master and a slave
//!   process: MB/s into the master's console store, peak RSS of both.
//! - B5 latency: submit → first atom running with a warm repo cache, p50/p99.
//!
//! `--quick` runs each with small numbers: a smoke test of correctness (CI), not of speed.
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
    fn new(
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

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> anyhow::Result<Self> {
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

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}

fn dir_request(dir: &Path) -> proto::BuildRequest {
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

async fn cluster(data: &Path, slaves: u32, executors: u32) -> anyhow::Result<LocalCluster> {
    let mut opts = LocalOptions::new(data.to_path_buf(), slaves, executors);
    opts.master.heartbeat_interval_ms = 1_000;
    let c = LocalCluster::start(opts).await?;
    let (_, mut cl) = c.clients().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while cl
        .list_slaves(proto::ListSlavesRequest {})
        .await?
        .into_inner()
        .slaves
        .len()
        < slaves as usize
    {
        if Instant::now() > deadline {
            bail!("slaves did not register");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(c)
}

/// Submits and waits for the end; returns the build and the wall time.
async fn run_build(
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

/// B1: trivial atoms beside the xargs floor.
pub async fn b1(scale: Scale) -> anyhow::Result<Vec<Row>> {
    let n = if scale.quick { 100 } else { 2_000 };
    let tmp = TempDir::new("b1")?;
    let project = tmp.0.join("project");
    std::fs::create_dir_all(&project)?;
    std::fs::write(
        project.join("clusterrunner.yaml"),
        format!("B1:\n  commands: ['true']\n  atomizers: [{{N: 'seq 1 {n}'}}]\n"),
    )?;
    let c = cluster(&tmp.0.join("cluster"), 2, 4).await?;
    let (mut b, _) = c.clients().await?;
    let (build, ours) = run_build(&mut b, dir_request(&project)).await?;
    c.shutdown().await?;
    if build.completed_atoms as usize != n || build.failed_atom_count != 0 {
        bail!(
            "B1: {} of {n} atoms completed, {} failed",
            build.completed_atoms,
            build.failed_atom_count
        );
    }
    let t0 = Instant::now();
    let status = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!("seq 1 {n} | xargs -P 8 -I{{}} bash -c true"))
        .status()
        .await?;
    let floor = t0.elapsed();
    if !status.success() {
        bail!("the xargs floor failed");
    }
    let ratio = ours.as_secs_f64() / floor.as_secs_f64();
    Ok(vec![
        Row::new(
            format!("B1 {n} atoms of `true`, 2 slaves × 4 executors"),
            format!("{:.2} s", ours.as_secs_f64()),
            "",
            None,
        ),
        Row::new(
            format!("B1 xargs -P 8 floor, same {n} commands"),
            format!("{:.2} s", floor.as_secs_f64()),
            "",
            None,
        ),
        Row::new(
            "B1 ratio to the floor",
            format!("{ratio:.2}"),
            "≤ 1.5",
            Some(ratio <= 1.5),
        ),
    ])
}

/// B5: submit → first atom running, warm cache.
pub async fn b5(scale: Scale) -> anyhow::Result<Vec<Row>> {
    let n = if scale.quick { 5 } else { 100 };
    let tmp = TempDir::new("b5")?;
    let project = tmp.0.join("project");
    std::fs::create_dir_all(&project)?;
    let started = tmp.0.join("started");
    std::fs::write(
        project.join("clusterrunner.yaml"),
        format!(
            "B5:\n  commands: ['date +%s.%N > {}/$ISH_BUILD_ID']\n  atomizers: [{{N: 'echo 1'}}]\n",
            started.display()
        ),
    )?;
    std::fs::create_dir_all(&started)?;
    let c = cluster(&tmp.0.join("cluster"), 1, 4).await?;
    let (mut b, _) = c.clients().await?;
    // Warm-up build (caches, first connections).
    run_build(&mut b, dir_request(&project)).await?;
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = ish_core::now_epoch();
        let (build, _) = run_build(&mut b, dir_request(&project)).await?;
        let at: f64 = std::fs::read_to_string(started.join(build.id.to_string()))?
            .trim()
            .parse()?;
        lat.push((at - t0).max(0.0));
    }
    c.shutdown().await?;
    lat.sort_by(f64::total_cmp);
    let p = |q: f64| lat[((q / 100.0) * (lat.len() - 1) as f64).round() as usize] * 1e3;
    Ok(vec![
        Row::new(
            format!("B5 submit → first atom running, p50 of {n}"),
            format!("{:.1} ms", p(50.0)),
            "< 30 ms",
            Some(p(50.0) < 30.0),
        ),
        Row::new(
            format!("B5 submit → first atom running, p99 of {n}"),
            format!("{:.1} ms", p(99.0)),
            "< 100 ms",
            Some(p(99.0) < 100.0),
        ),
    ])
}
