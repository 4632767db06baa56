//! B2 makespan: skewed atom durations, queue dispatch against ClusterRunner's fixed grouping.
use super::common::*;
use anyhow::{Context, bail};
use ish_core::proto;

/// Deterministic log-normal-ish durations in [lo, hi] seconds (a fixed LCG: every run measures
/// the same work).
pub(super) fn skewed_durations(n: usize, lo: f64, hi: f64) -> Vec<f64> {
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

pub(super) fn makespan(b: &proto::Build) -> Option<f64> {
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
