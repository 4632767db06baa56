//! B6 short atoms on a small cluster, as a client sees them: 2 slaves × 2 executors, atoms of
//! `echo` without timing history (a fresh project directory per build), submitted and polled
//! every 50 ms through the REST gateway, beside the same commands run by `xargs -P 4`.
use super::common::*;
use crate::client::api::BuildApi;
use crate::client::rest::RestApi;
use anyhow::{Context, bail};
use std::time::{Duration, Instant};

/// One size: (atoms, target ratio to the floor).
const SIZES: [(usize, f64); 2] = [(100, 2.0), (1_000, 1.5)];

/// B6: short atoms through REST beside the xargs floor.
pub async fn b6(scale: Scale) -> anyhow::Result<Vec<Row>> {
    let tmp = TempDir::new("b6")?;
    let mut opts = crate::local::LocalOptions::new(tmp.0.join("cluster"), 2, 2);
    opts.master.heartbeat_interval_ms = 1_000;
    opts.gateway_listen = Some("127.0.0.1:0".into());
    let c = crate::local::LocalCluster::start(opts).await?;
    let (_, mut cl) = c.clients().await?;
    wait_for_slaves(&mut cl, 2, Duration::from_secs(20)).await?;
    let gateway = c.gateway_addr.context("the gateway did not start")?;
    let mut api = RestApi::new(&format!("http://{gateway}"), &c.secret)?
        .poll_every(Duration::from_millis(50));
    let mut rows = Vec::new();
    for (i, (n, target)) in SIZES.into_iter().enumerate() {
        let n = if scale.quick { n / 50 } else { n };
        // A directory of its own: no timing history, every atom its own dispatch.
        let project = tmp.0.join(format!("project-{i}"));
        std::fs::create_dir_all(&project)?;
        std::fs::write(
            project.join("clusterrunner.yaml"),
            format!("B6:\n  commands: ['echo $X']\n  atomizers: [{{X: 'seq 1 {n}'}}]\n"),
        )?;
        let t0 = Instant::now();
        let id = api.submit(&dir_request(&project)).await?;
        let view = loop {
            let v = api.next_state(id).await?;
            if v.is_final() {
                break v;
            }
        };
        let ours = t0.elapsed();
        if !view.passed || view.num_atoms != Some(n as u64) {
            bail!(
                "B6: build {id} of {n} atoms ended {:?}: {}",
                view.state,
                view.error
            );
        }
        let t0 = Instant::now();
        let status = tokio::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "seq 1 {n} | xargs -P 4 -I{{}} bash -c 'export X=\"{{}}\"; echo $X' > /dev/null"
            ))
            .status()
            .await?;
        let floor = t0.elapsed();
        if !status.success() {
            bail!("the xargs floor failed");
        }
        let ratio = ours.as_secs_f64() / floor.as_secs_f64();
        rows.push(Row::new(
            format!("B6 {n} × `echo`, 2 slaves × 2, through REST, no history"),
            format!("{:.2} s", ours.as_secs_f64()),
            "",
            None,
        ));
        rows.push(Row::new(
            format!("B6 xargs -P 4 floor, same {n} commands"),
            format!("{:.2} s", floor.as_secs_f64()),
            "",
            None,
        ));
        rows.push(Row::new(
            format!("B6 {n} atoms: ratio to the floor"),
            format!("{ratio:.2}"),
            format!("≤ {target}"),
            Some(ratio <= target),
        ));
    }
    c.shutdown().await?;
    Ok(rows)
}
