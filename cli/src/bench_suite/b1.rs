//! B1 trivial atoms: N atoms of `true` on 2 slaves × 4 executors beside `xargs -P 8`, twice
//! (without and with timing history), and the master's footprint per build.
use super::common::*;
use super::footprint::Footprint;
use anyhow::bail;
use std::time::Instant;

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
