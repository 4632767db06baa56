//! B4 console throughput: one atom writing a lot to stdout through a master and a slave process.
use super::common::*;
use super::procs::*;
use anyhow::{Context, bail};
use ish_core::proto;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

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
