//! B5 latency: submit → first atom running with a warm repo cache, p50/p99.
use super::common::*;

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
