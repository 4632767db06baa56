//! Hostile projects: a real slave of an in-process cluster (`support::cluster::Local`) fetches
//! a project whose clusterrunner.yaml is nested 10,000 levels deep, an alias bomb, over 1 MiB or
//! not YAML, or whose atomizer prints more atoms than a build may have.
//!
//! A case lives here because the bad input is not in any request: it is only read on the slave,
//! after the master accepted the build, so what is checked is the whole path, a build in ERROR
//! with the reason, the slave's session surviving it, and a normal build after it. The
//! parsers' own bounds on any text are property-tested in `src/proptests.rs`.
mod support;

use ish_core::proto;
use std::time::Duration;
use support::checks::Failures;
use support::cluster::Local;
use support::jobs::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_projects_end_in_error_and_the_slave_survives() {
    let env = Local::new(1, 2)
        .heartbeat_timeout_ms(60_000)
        .http_timeout(Duration::from_secs(60))
        .start()
        .await;
    let mut f = Failures::default();
    let mut b = env.builds().await;
    let sid = env.slaves().await[0].id;

    let deep_flow = format!("J: {}x{}\n", "[".repeat(10_000), "]".repeat(10_000));
    let deep_block = format!("J:\n{}x\n", "- ".repeat(5_000));
    let mut bomb = String::from("a: &a [\"lolololololololololololololololol\"]\n");
    let mut prev = 'a';
    for name in "bcdefghijklm".chars() {
        bomb += &format!(
            "{name}: &{name} [{}]\n",
            vec![format!("*{prev}"); 10].join(",")
        );
        prev = name;
    }
    let huge = format!(
        "J:\n  commands: ['{}']\n  atomizers: [{{A: 'echo 1'}}]\n",
        "x".repeat(MAX_CONFIG)
    );
    let atomizer =
        |n: usize| format!("J:\n  commands: ['true']\n  atomizers: [{{N: 'seq 1 {n}'}}]\n");
    let projects: Vec<(&str, String, &[&str])> = vec![
        (
            "YAML nested 10,000 levels deep (flow)",
            deep_flow,
            &["nested too deeply"],
        ),
        (
            "YAML nested 5,000 levels deep (block)",
            deep_block,
            &["nested too deeply"],
        ),
        (
            "a YAML alias bomb",
            bomb,
            &["too large", "repetition limit"],
        ),
        (
            "a YAML file over 1 MiB",
            huge,
            &["too large", "the limit is 1048576 bytes"],
        ),
        (
            "an invalid YAML file",
            "J: [unclosed\n".into(),
            &["could not be parsed"],
        ),
        (
            "an atomizer printing 100,001 atoms",
            atomizer(MAX_ATOMS + 1),
            &["max_atoms_per_build"],
        ),
        (
            "an atomizer printing 200,001 atoms",
            atomizer(2 * MAX_ATOMS + 1),
            &["max_atoms_per_build"],
        ),
    ];
    for (what, yaml, needles) in projects {
        let project = project_with(&yaml);
        let id = match submit_raw(&mut b, Some(dir_request(project.path()))).await {
            Ok(id) => id,
            Err(e) => {
                f.check(false, || format!("{what}: Submit refused: {e:?}"));
                continue;
            }
        };
        let build = wait_final(&mut b, id).await;
        f.check(
            state(&build) == proto::BuildState::Error
                && needles.iter().any(|n| build.error_message.contains(n)),
            || {
                format!(
                    "{what}: expected ERROR mentioning one of {needles:?}, got {:?}: {:?}",
                    state(&build),
                    &build.error_message[..build.error_message.len().min(300)]
                )
            },
        );
    }
    // The slave's session survived all of it.
    let now = env.slaves().await;
    f.check(now.len() == 1 && now[0].id == sid, || {
        format!("the slave was dropped or replaced: {now:#?}")
    });
    env.a_normal_build_runs(&mut f).await;
    env.c.shutdown().await.unwrap();
    f.finish();
}
