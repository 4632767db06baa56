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
    wait_for_slaves(&mut cl, slaves as usize, Duration::from_secs(20)).await?;
    Ok(c)
}

/// Waits until `n` slaves are registered with the master.
async fn wait_for_slaves(
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
    // The first build has no timing history: one atom per dispatch. The second has the
    // first's times: short atoms go in batches.
    let (build, ours) = run_build(&mut b, dir_request(&project)).await?;
    let (second, warm) = run_build(&mut b, dir_request(&project)).await?;
    c.shutdown().await?;
    let footprint = Footprint::of(
        &tmp.0.join("cluster").join("master"),
        &[build.id, second.id],
    );
    for build in [&build, &second] {
        if build.completed_atoms as usize != n || build.failed_atom_count != 0 {
            bail!(
                "B1: {} of {n} atoms completed, {} failed",
                build.completed_atoms,
                build.failed_atom_count
            );
        }
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
    let warm_ratio = warm.as_secs_f64() / floor.as_secs_f64();
    Ok(vec![
        Row::new(
            format!("B1 {n} atoms of `true`, 2 slaves × 4 executors"),
            format!("{:.2} s", ours.as_secs_f64()),
            "",
            None,
        ),
        Row::new(
            format!(
                "B1 again with timing history ({} batches for {n} atoms)",
                second.num_subjobs
            ),
            format!("{:.2} s", warm.as_secs_f64()),
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
        Row::new(
            "B1 ratio to the floor, with timing history",
            format!("{warm_ratio:.2}"),
            "≤ 1.5",
            Some(warm_ratio <= 1.5),
        ),
        Row::new(
            format!("B1 master database per build ({n} atoms, 2 builds)"),
            format!(
                "{:.0} KiB ({:.0} B/atom)",
                footprint.db as f64 / 2.0 / 1024.0,
                footprint.db as f64 / 2.0 / n as f64
            ),
            "",
            None,
        ),
        Row::new(
            "B1 results kept per build: atom files / archive index / stored archives",
            format!(
                "{:.0} / {:.0} / {:.0} KiB",
                footprint.plain as f64 / 2.0 / 1024.0,
                footprint.index as f64 / 2.0 / 1024.0,
                footprint.stored_archives as f64 / 2.0 / 1024.0
            ),
            "",
            None,
        ),
        Row::new(
            "B1 archives per build, written per download: results.zip / results.tar.gz",
            format!(
                "{:.0} / {:.0} KiB",
                footprint.zip as f64 / 2.0 / 1024.0,
                footprint.tar_gz as f64 / 2.0 / 1024.0
            ),
            "",
            None,
        ),
    ])
}

/// What a master keeps on disk: its database, and its builds' results — the atoms' own files
/// (the one copy of each console and artifact), the archive index with failures.txt and the
/// archive sizes, and stored archives (none: they are written again for each download, so
/// their sizes are reported apart, as measured by the master).
struct Footprint {
    db: u64,
    plain: u64,
    index: u64,
    stored_archives: u64,
    zip: u64,
    tar_gz: u64,
}

impl Footprint {
    fn of(master_dir: &Path, builds: &[u64]) -> Self {
        use ish_master::results::{ARCHIVE_INDEX, ARCHIVE_SIZES, ArchiveSizes};
        let layout = ish_master::results::ResultsLayout::new(master_dir.join("results"));
        let mut f = Self {
            db: tree_bytes(&master_dir.join("db")),
            plain: 0,
            index: 0,
            stored_archives: 0,
            zip: 0,
            tar_gz: 0,
        };
        for &id in builds {
            let dir = layout.build_dir(id);
            let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
            let index = [
                ARCHIVE_INDEX,
                ARCHIVE_SIZES,
                ish_master::archive::FAILURES_NAME,
            ]
            .map(size)
            .iter()
            .sum::<u64>();
            let stored =
                size(ish_master::archive::ZIP_NAME) + size(ish_master::archive::TAR_GZ_NAME);
            f.index += index;
            f.stored_archives += stored;
            f.plain += tree_bytes(&dir).saturating_sub(index + stored);
            if let Ok(Some(sizes)) = ArchiveSizes::read(&dir) {
                f.zip += sizes.zip.size;
                f.tar_gz += sizes.tar_gz.size;
            }
        }
        f
    }
}

/// Bytes of the regular files under `dir` (0 when it does not exist).
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => tree_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
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

/// Deterministic log-normal-ish durations in [lo, hi] seconds (a fixed LCG: every run measures
/// the same work).
fn skewed_durations(n: usize, lo: f64, hi: f64) -> Vec<f64> {
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut uniform = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 11) as f64 / (1u64 << 53) as f64).max(1e-12)
    };
    (0..n)
        .map(|_| {
            // Box-Muller normal, then exp: median 0.25 s, a long tail.
            let z = (-2.0 * uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * uniform()).cos();
            (0.25 * (0.9 * z).exp()).clamp(lo, hi)
        })
        .collect()
}

fn makespan(b: &proto::Build) -> Option<f64> {
    let at = |s: proto::BuildState| {
        b.state_timestamps
            .iter()
            .find(|t| t.state == s as i32)
            .map(|t| t.at)
    };
    Some(at(proto::BuildState::Finished)? - at(proto::BuildState::Building)?)
}

/// B2: makespan of skewed atoms against its lower bound, queue dispatch vs ClusterRunner's
/// grouping, with timing history recorded by a first build.
pub async fn b2(scale: Scale) -> anyhow::Result<Vec<Row>> {
    let (n, factor) = if scale.quick { (40, 0.1) } else { (400, 1.0) };
    let executors = 8.0;
    let durations: Vec<f64> = skewed_durations(n, 0.05, 2.0)
        .into_iter()
        .map(|d| d * factor)
        .collect();
    let tmp = TempDir::new("b2")?;
    let project = tmp.0.join("project");
    std::fs::create_dir_all(&project)?;
    let list: String = durations
        .iter()
        .enumerate()
        .map(|(i, d)| format!("{i}:{d:.3}\n"))
        .collect();
    std::fs::write(project.join("durations"), list)?;
    let yaml = |mode: &str| {
        format!(
            "B2:\n  dispatch: {mode}\n  max_executors: 8\n  commands: ['sleep ${{D#*:}}']\n  atomizers: [{{D: 'cat durations'}}]\n"
        )
    };
    let c = cluster(&tmp.0.join("cluster"), 2, 4).await?;
    let (mut b, _) = c.clients().await?;
    std::fs::write(project.join("clusterrunner.yaml"), yaml("queue"))?;
    run_build(&mut b, dir_request(&project)).await?;
    let mut rows = Vec::new();
    for (mode, label) in [
        ("queue", "queue dispatch"),
        ("clusterrunner", "ClusterRunner grouping"),
    ] {
        std::fs::write(project.join("clusterrunner.yaml"), yaml(mode))?;
        let (build, _) = run_build(&mut b, dir_request(&project)).await?;
        let id = build.id;
        let subjobs = b
            .list_subjobs(proto::ListSubjobsRequest {
                build_id: id,
                offset: 0,
                limit: 0,
            })
            .await?
            .into_inner()
            .subjobs;
        let times: Vec<f64> = subjobs
            .iter()
            .flat_map(|s| &s.atoms)
            .filter_map(|a| a.actual_time)
            .collect();
        if times.len() != n || build.completed_atoms as usize != n || build.failed_atom_count != 0 {
            bail!(
                "B2 ({mode}): {} atom times for {n} atoms, {} completed, {} failed",
                times.len(),
                build.completed_atoms,
                build.failed_atom_count
            );
        }
        let total: f64 = times.iter().sum();
        let longest = times.iter().copied().fold(0.0, f64::max);
        let lower = (total / executors).max(longest);
        let span = makespan(&build).context("state timestamps")?;
        let ratio = span / lower;
        let target = if mode == "queue" { "≤ 1.05" } else { "" };
        rows.push(Row::new(
            format!("B2 {n} skewed atoms, 8 executors, {label}: makespan ÷ lower bound ({span:.2} s ÷ {lower:.2} s)"),
            format!("{ratio:.3}"),
            target,
            (mode == "queue").then_some(ratio <= 1.05),
        ));
    }
    c.shutdown().await?;
    Ok(rows)
}

/// A role started as its own process (for memory measurements); killed on drop.
struct RoleProcess(std::process::Child);

impl RoleProcess {
    fn spawn(args: &[&str], secret: &str, log: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let out = std::fs::File::create(log)?;
        // ISH_BENCH_WRAPPER (e.g. "heaptrack" or "perf record -g -o /tmp/p.data") runs each
        // role process under a profiler; the RSS figures are then the wrapper's.
        let wrapper = std::env::var("ISH_BENCH_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(w) => {
                let mut c = std::process::Command::new(w);
                c.args(words).arg(exe);
                c
            }
            None => std::process::Command::new(exe),
        };
        let child = cmd
            .args(args)
            .env("ISH_SECRET", secret)
            .env("ISH_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Self(child))
    }

    /// Peak resident memory so far, in MiB (VmHWM).
    fn peak_rss_mib(&self) -> f64 {
        peak_rss_mib(self.0.id())
    }

    /// Waits until the process uses under 5% of a CPU over half a second (or `limit` passes).
    async fn wait_idle(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last = cpu_ticks(self.0.id());
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = cpu_ticks(self.0.id());
            // Clock ticks are 1/100 s: 2 ticks in 0.5 s is 4% of one CPU.
            if now.saturating_sub(last) <= 2 {
                return;
            }
            last = now;
        }
    }
}

/// User + system CPU time of a process, in clock ticks (`/proc/<pid>/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name (field 2) may hold spaces; fields after it follow the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3, so fields 14 and 15 are at 11 and 12.
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Starts a master process on a free port; returns it and its gRPC URL.
async fn master_process(
    dir: &Path,
    secret: &str,
    conf: &str,
) -> anyhow::Result<(RoleProcess, String)> {
    let data = dir.join("master");
    let conf_path = dir.join("master.toml");
    std::fs::write(&conf_path, conf)?;
    let p = RoleProcess::spawn(
        &[
            "master",
            "--config",
            conf_path.to_str().context("path")?,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().context("path")?,
        ],
        secret,
        &dir.join("master.log"),
    )?;
    let addr_file = data.join(ish_master::ADDR_FILE);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !addr_file.exists() {
        if Instant::now() > deadline {
            bail!("the master did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("http://{}", std::fs::read_to_string(addr_file)?.trim());
    Ok((p, url))
}

/// B4: one atom writing a lot to stdout, through a master and a slave process.
pub async fn b4(scale: Scale) -> anyhow::Result<Vec<Row>> {
    let bytes: u64 = if scale.quick { 5_000_000 } else { 200_000_000 };
    let tmp = TempDir::new("b4")?;
    let secret = ish_core::auth::generate_secret();
    let (master, url) = master_process(&tmp.0, &secret, "").await?;
    let slave_conf = tmp.0.join("slave.toml");
    // Keep the whole console (the default keeps the last 64 MiB of an atom's output).
    std::fs::write(
        &slave_conf,
        format!("max_console_bytes_per_atom = {}\n", bytes * 2),
    )?;
    let slave = RoleProcess::spawn(
        &[
            "slave",
            "--config",
            slave_conf.to_str().context("path")?,
            "--master",
            &url,
            "--executors",
            "1",
            "--data-dir",
            tmp.0.join("slave").to_str().context("path")?,
        ],
        &secret,
        &tmp.0.join("slave.log"),
    )?;
    let project = tmp.0.join("project");
    std::fs::create_dir_all(&project)?;
    // Atoms run under `bash -o pipefail`: `yes` ends by SIGPIPE when `head` has enough, which
    // is the plan here, not a failure.
    std::fs::write(
        project.join("clusterrunner.yaml"),
        format!(
            "B4:\n  commands: ['(yes 0123456789abcdef0123456789abcdef012345678 || true) | head -c {bytes}']\n  atomizers: [{{N: 'echo 1'}}]\n"
        ),
    )?;
    let (mut b, _) = crate::local::connect(&url, &secret, Duration::from_secs(10)).await?;
    let id = b
        .submit(proto::SubmitBuildRequest {
            request: Some(dir_request(&project)),
        })
        .await?
        .into_inner()
        .build_id;
    // Watch the master's console store grow: the live console file of the running atom.
    let attempts = tmp
        .0
        .join("master")
        .join("results")
        .join(id.to_string())
        .join(".attempts");
    let live_size = || -> u64 {
        let Ok(rd) = std::fs::read_dir(&attempts) else {
            return 0;
        };
        rd.flatten()
            .filter_map(|a| std::fs::read_dir(a.path()).ok())
            .flat_map(|rd| rd.flatten())
            .filter(|f| f.file_name().to_string_lossy().starts_with("console_"))
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .max()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first = None;
    let done = loop {
        let size = live_size();
        if size > 0 && first.is_none() {
            first = Some((Instant::now(), size));
        }
        if size >= bytes {
            break Instant::now();
        }
        if Instant::now() > deadline {
            bail!("B4: the console never reached {bytes} bytes on the master");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (t0, s0) = first.context("no console seen")?;
    let mbps = (bytes - s0) as f64 / 1e6 / done.duration_since(t0).as_secs_f64().max(1e-3);
    let mut watch = b
        .watch(proto::WatchBuildRequest { build_id: id })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(u) = watch.next().await {
        last = u?.build;
    }
    let (m_rss, s_rss) = (master.peak_rss_mib(), slave.peak_rss_mib());
    let build = last.context("no build update")?;
    if proto::BuildState::try_from(build.state) != Ok(proto::BuildState::Finished)
        || build.failed_atom_count != 0
    {
        bail!(
            "B4: build {id} ended in {:?}: {}",
            build.state,
            build.error_message
        );
    }
    // Every byte arrived, once: the atom's console in the results is exactly the output.
    let console = tmp
        .0
        .join("master")
        .join("results")
        .join(id.to_string())
        .join(ish_master::archive::artifact_dir_name(0, 0))
        .join(ish_master::results::CONSOLE_FILE);
    let stored = std::fs::metadata(&console)?.len();
    if stored != bytes {
        bail!("B4: the stored console has {stored} bytes, the atom wrote {bytes}");
    }
    drop(slave);
    drop(master);
    let mb = bytes as f64 / 1e6;
    Ok(vec![
        Row::new(
            format!("B4 console of one atom writing {mb:.0} MB: rate into the master's store"),
            format!("{mbps:.0} MB/s"),
            "≥ 100 MB/s",
            Some(mbps >= 100.0),
        ),
        Row::new(
            "B4 master peak RSS",
            format!("{m_rss:.0} MiB"),
            "< 100 MiB",
            Some(m_rss < 100.0),
        ),
        Row::new(
            "B4 slave peak RSS",
            format!("{s_rss:.0} MiB"),
            "< 100 MiB",
            Some(s_rss < 100.0),
        ),
    ])
}

/// B3: many simulated slaves (in-process stream clients) against a master process, in two
/// phases on the same cluster:
/// - saturation: zero-work atoms, every executor asks for more at once: the most dispatches/s
///   the master sustains. Here every executor waits its turn at the master, so the wait is
///   executors ÷ rate (Little's law), whatever the master's own latency is;
/// - offered load of 20,000 atoms/s: simulated atoms take executors ÷ 20,000 s on average
///   (spread over 0.5–1.5 × that), so the cluster asks for 20,000 dispatches/s; the wait between an executor reporting its atom done
///   and receiving the next one is the master's dispatch latency under that load.
pub async fn b3(scale: Scale) -> anyhow::Result<Vec<Row>> {
    use ish_core::proto::{master_message::Msg as Down, slave_message::Msg as Up};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let (slaves, atoms, loaded_atoms) = if scale.quick {
        (20usize, 2_000usize, 2_000usize)
    } else {
        (1_000, 200_000, 100_000)
    };
    let executors = 4u32;
    let offered_rate = 20_000.0;
    let tmp = TempDir::new("b3")?;
    let secret = ish_core::auth::generate_secret();
    let conf = format!(
        "max_atoms_per_build = {atoms}\nheartbeat_timeout_ms = 120000\nmax_concurrent_streams = 1024\n"
    );
    let (master, url) = master_process(&tmp.0, &secret, &conf).await?;
    let auth = ish_core::auth::SecretInterceptor::new(&secret)?;
    // Sessions share a few HTTP/2 connections, as many slaves behind one proxy would.
    let per_channel = 100;
    let mut channels = Vec::new();
    for _ in 0..slaves.div_ceil(per_channel) {
        channels.push(
            tonic::transport::Channel::from_shared(url.clone())?
                .connect()
                .await?,
        );
    }
    /// What the simulated slaves observe, shared by all of them.
    #[derive(Default)]
    struct Observed {
        /// Executor freed by a finished subjob → next work arrived.
        latencies: Vec<Duration>,
        /// Setup done → first work of each executor: every executor of the fleet is freed at
        /// once when a build starts, so this is the start-up wave, reported apart.
        ramp: Vec<Duration>,
        first_dispatch: Option<Instant>,
        last_done: Option<Instant>,
    }
    let observed = Arc::new(Mutex::new(Observed::default()));
    // Simulated time per atom, in microseconds (0: answer at once).
    let work_us = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..slaves {
        let mut link = proto::slave_link_client::SlaveLinkClient::with_interceptor(
            channels[i / per_channel].clone(),
            auth.clone(),
        )
        .max_decoding_message_size(ish_core::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(ish_core::MAX_MESSAGE_BYTES);
        let (observed, work_us) = (observed.clone(), work_us.clone());
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<proto::SlaveMessage>(1024);
            let send = |m: Up| proto::SlaveMessage { msg: Some(m) };
            tx.send(send(Up::Register(proto::Register {
                name: format!("sim-{i}"),
                executors,
                ..Default::default()
            })))
            .await?;
            let mut inbound = link
                .session(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            // When each executor slot became free (the latency of the next dispatch to it), and
            // whether by a finished subjob (steady state) or by the build's setup (start-up).
            let free_since = Arc::new(Mutex::new(vec![
                (Instant::now(), false);
                executors as usize
            ]));
            while let Some(m) = inbound.message().await? {
                match m.msg {
                    Some(Down::Prepare(p)) => {
                        let job = proto::JobConfig {
                            name: "B3".into(),
                            commands: "true".into(),
                            ..Default::default()
                        };
                        tx.send(send(Up::Prepared(proto::PrepareResult {
                            build_id: p.build_id,
                            job: Some(job),
                            atoms: p.atoms_override,
                            ..Default::default()
                        })))
                        .await?;
                    }
                    Some(Down::Setup(s)) => {
                        tx.send(send(Up::Setup(proto::SetupResult {
                            build_id: s.build_id,
                            ok: true,
                            error: String::new(),
                        })))
                        .await?;
                        free_since
                            .lock()
                            .expect("poisoned")
                            .fill((Instant::now(), false));
                    }
                    Some(Down::RunSubjob(r)) => {
                        let now = Instant::now();
                        let slot = r.executor_index as usize % executors as usize;
                        {
                            let (since, steady) = free_since.lock().expect("poisoned")[slot];
                            let mut o = observed.lock().expect("poisoned");
                            o.first_dispatch.get_or_insert(now);
                            let waited = now.duration_since(since);
                            if steady {
                                o.latencies.push(waited);
                            } else {
                                o.ramp.push(waited);
                            }
                        }
                        // Atom times spread evenly over 0.5–1.5 × the mean (deterministic), so
                        // executors do not all finish in the same instant wave after wave.
                        let spread = 0.5 + (f64::from(r.subjob_id) * 0.618_033_988_7).fract();
                        let work =
                            Duration::from_micros(work_us.load(Ordering::Relaxed)).mul_f64(spread);
                        let (tx, free_since, observed) =
                            (tx.clone(), free_since.clone(), observed.clone());
                        let run = async move {
                            if !work.is_zero() {
                                tokio::time::sleep(work).await;
                            }
                            for a in &r.atoms {
                                tx.send(send(Up::AtomResult(proto::AtomResult {
                                    build_id: r.build_id,
                                    subjob_id: r.subjob_id,
                                    atom_id: a.atom_id,
                                    attempt: r.attempt,
                                    exit_code: 0,
                                    seconds: work.as_secs_f64(),
                                    artifact_files: 0,
                                    tries: 1,
                                    timed_out: false,
                                })))
                                .await?;
                            }
                            let done = Instant::now();
                            free_since.lock().expect("poisoned")[slot] = (done, true);
                            tx.send(send(Up::SubjobDone(proto::SubjobDone {
                                build_id: r.build_id,
                                subjob_id: r.subjob_id,
                                attempt: r.attempt,
                            })))
                            .await?;
                            let mut o = observed.lock().expect("poisoned");
                            o.last_done = Some(o.last_done.map_or(done, |l| l.max(done)));
                            Ok::<(), anyhow::Error>(())
                        };
                        if work.is_zero() {
                            run.await?;
                        } else {
                            tokio::spawn(run);
                        }
                    }
                    Some(Down::Teardown(t)) => {
                        tx.send(send(Up::TeardownDone(proto::TeardownDone {
                            build_id: t.build_id,
                            ok: true,
                            error: String::new(),
                        })))
                        .await?;
                    }
                    _ => {}
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    let (mut b, mut cl) = crate::local::connect(&url, &secret, Duration::from_secs(10)).await?;
    wait_for_slaves(&mut cl, slaves, Duration::from_secs(120)).await?;
    let project = tmp.0.join("project");
    std::fs::create_dir_all(&project)?;
    // Each phase has atoms of its own (`var`): no timing history, so one atom per dispatch,
    // the dispatch engine's worst case (history would batch these zero-time atoms).
    let mut phase = async |var: &str,
                           n: usize,
                           work: Duration|
           -> anyhow::Result<(f64, Vec<Duration>, Vec<Duration>, f64)> {
        *observed.lock().expect("poisoned") = Observed::default();
        work_us.store(work.as_micros() as u64, Ordering::Relaxed);
        let mut req = dir_request(&project);
        req.atoms_override = (0..n).map(|i| format!("export {var}=\"{i}\";")).collect();
        let (build, _) = run_build(&mut b, req).await?;
        let finished = Instant::now();
        if build.completed_atoms as usize != n {
            bail!("B3: {} of {n} atoms completed", build.completed_atoms);
        }
        let o = std::mem::take(&mut *observed.lock().expect("poisoned"));
        let start = o.first_dispatch.context("no dispatch seen")?;
        // Dispatching ends with the last subjob done; the archives are written after it.
        let end = o.last_done.context("no subjob done")?;
        let seen = o.latencies.len() + o.ramp.len();
        if seen != n {
            bail!("B3: {seen} dispatches seen for {n} atoms");
        }
        let rate = n as f64 / end.duration_since(start).as_secs_f64();
        let (mut lat, mut ramp) = (o.latencies, o.ramp);
        lat.sort();
        ramp.sort();
        let archive_s = finished.duration_since(end).as_secs_f64();
        Ok((rate, lat, ramp, archive_s))
    };
    let (rate, lat, _, archive_s) = phase("A", atoms, Duration::ZERO).await?;
    // The phases are separate experiments: the second starts once the master has finished the
    // first's background work (sled writing out 200,000 results, freeing the build), which
    // otherwise shares the 2 CPUs with the measured dispatches.
    master.wait_idle(Duration::from_secs(60)).await;
    let total_executors = slaves as f64 * f64::from(executors);
    let work = Duration::from_secs_f64(total_executors / offered_rate);
    let (loaded_rate, loaded_lat, ramp, _) = phase("B", loaded_atoms, work).await?;
    let rss = master.peak_rss_mib();
    drop(master);
    for t in tasks {
        t.abort();
    }
    let p = |lat: &[Duration], q: f64| {
        lat.get(((q / 100.0) * (lat.len().max(1) - 1) as f64).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Ok(vec![
        Row::new(
            format!(
                "B3 {slaves} simulated slaves × {executors}, {atoms} zero-work atoms: dispatches/s"
            ),
            format!("{rate:.0}"),
            "≥ 20000",
            Some(rate >= 20_000.0),
        ),
        Row::new(
            "B3 saturated: executor free → next work, p50 / p99 (≈ executors ÷ rate)",
            format!("{:.1} / {:.1} ms", p(&lat, 50.0), p(&lat, 99.0)),
            "",
            None,
        ),
        Row::new(
            "B3 saturated: last atom done → build finished (archives of every atom)",
            format!("{archive_s:.1} s"),
            "",
            None,
        ),
        Row::new(
            format!(
                "B3 offered {offered_rate:.0} atoms/s ({loaded_atoms} atoms of {:.0} ms): achieved dispatches/s",
                work.as_secs_f64() * 1e3
            ),
            format!("{loaded_rate:.0}"),
            "",
            None,
        ),
        Row::new(
            "B3 offered load: dispatch latency p50",
            format!("{:.2} ms", p(&loaded_lat, 50.0)),
            "",
            None,
        ),
        Row::new(
            "B3 offered load: dispatch latency p99",
            format!("{:.2} ms", p(&loaded_lat, 99.0)),
            "< 20 ms",
            Some(p(&loaded_lat, 99.0) < 20.0),
        ),
        Row::new(
            format!(
                "B3 offered load: start-up wave, setup → first work of all {} executors, p50 / p99",
                total_executors
            ),
            format!("{:.1} / {:.1} ms", p(&ramp, 50.0), p(&ramp, 99.0)),
            "",
            None,
        ),
        Row::new(
            "B3 master peak RSS",
            format!("{rss:.0} MiB"),
            "< 300 MiB",
            Some(rss < 300.0),
        ),
    ])
}
