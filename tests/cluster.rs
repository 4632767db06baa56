//! In-process cluster tests: a real master, real slaves and real gRPC over 127.0.0.1 in one
//! process (`support::cluster::Local`), building real git repositories made in temp dirs and real
//! directories.
mod support;

use ish_core::proto;
use std::time::{Duration, Instant};
use support::cluster::Local;
use support::*;

/// A job with setup and teardown that leave one line per run in $MARKER/setup and
/// $MARKER/teardown, 20 atoms that each write an artifact (atom 7 fails).
const GIT_JOB: &str = r#"
Build:
  setup_build:
    - echo "$ISH_SLAVE_NAME" >> "$MARKER/setup"
    - echo prepared > "$PROJECT_DIR/setup_done"
  commands:
    - test -f "$PROJECT_DIR/setup_done"
    - mkdir -p "$ARTIFACT_DIR/nested"
    - echo "token $TOKEN" > "$ARTIFACT_DIR/out.txt"
    - printf 'x%.0s' $(seq 1 $TOKEN) > "$ARTIFACT_DIR/nested/xs"
    - echo "hello $TOKEN"
    - echo "stderr $TOKEN" >&2
    - test "$TOKEN" != 7
  atomizers:
    - TOKEN: seq 1 20
  teardown_build:
    - echo "$ISH_SLAVE_NAME" >> "$MARKER/teardown"
"#;

fn git_job_expect(t: &str) -> AtomExpect {
    let n: usize = t.parse().unwrap();
    AtomExpect {
        console: format!("hello {t}\nstderr {t}\n"),
        exit_code: if n == 7 { 1 } else { 0 },
        files: vec![
            ("nested/xs".into(), "x".repeat(n).into_bytes()),
            ("out.txt".into(), format!("token {t}\n").into_bytes()),
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn git_build_with_setup_atoms_artifacts_and_teardown() {
    let c = Local::new(2, 2).start().await;
    let repo = Repo::new();
    repo.commit(&[("clusterrunner.yaml", GIT_JOB)], "job");
    let marker = tempfile::tempdir().unwrap();
    let (mut b, mut cl) = c.clients().await.unwrap();
    let mut req = git_request(&repo.url(), "master", "");
    req.env
        .insert("MARKER".into(), marker.path().display().to_string());
    let id = submit(&mut b, req).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished, "{build:#?}");
    assert_eq!(build.result, proto::BuildResult::Failure as i32);
    assert_eq!(
        (build.num_atoms, build.num_subjobs, build.failed_atom_count),
        (20, 20, 1)
    );
    assert_eq!(build.failed_atoms.len(), 1);
    assert_eq!(build.failed_atoms[0].command_string, "export TOKEN=\"7\";");
    assert_eq!(build.commit.len(), 40);
    check_archives(&mut b, id, git_job_expect).await;
    // Setup ran once on every slave that ran atoms; teardown once on each of those.
    let sjs = subjobs(&mut b, id).await;
    let mut ran_on: Vec<String> = sjs
        .iter()
        .flat_map(|s| s.atoms.iter().map(|a| a.slave.clone()))
        .collect();
    ran_on.sort();
    ran_on.dedup();
    assert_eq!(ran_on, ["local-0", "local-1"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while marker_lines(&marker.path().join("teardown")).len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(marker_lines(&marker.path().join("setup")), ran_on);
    assert_eq!(marker_lines(&marker.path().join("teardown")), ran_on);
    // Both slaves are free again.
    let slaves = cl
        .list_slaves(proto::ListSlavesRequest {})
        .await
        .unwrap()
        .into_inner()
        .slaves;
    assert!(
        slaves.iter().all(|s| s.executors_in_use == 0),
        "{slaves:#?}"
    );
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn directory_build_runs_setup_and_teardown_once_per_slave_in_the_project() {
    let c = Local::new(2, 2).start().await;
    let project = project_with(
        r#"
Dir:
  setup_build: ['echo "$ISH_SLAVE_NAME" >> "$PROJECT_DIR/setup.log"']
  commands: ['echo "dir $TOKEN" > "$ARTIFACT_DIR/r.txt"', 'echo "in $(pwd)"']
  atomizers: [{TOKEN: 'for i in a b c d e f; do echo $i; done'}]
  teardown_build: ['echo "$ISH_SLAVE_NAME" >> "$PROJECT_DIR/teardown.log"']
"#,
    );
    let (mut b, _) = c.clients().await.unwrap();
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished, "{build:#?}");
    assert_eq!(build.result, proto::BuildResult::NoFailures as i32);
    assert_eq!(build.project_dir, project.path().display().to_string());
    let pwd = project.path().display().to_string();
    check_archives(&mut b, id, |t| AtomExpect {
        console: format!("in {pwd}\n"),
        exit_code: 0,
        files: vec![("r.txt".into(), format!("dir {t}\n").into_bytes())],
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while marker_lines(&project.path().join("teardown.log")).len() < 2 && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        marker_lines(&project.path().join("setup.log")),
        ["local-0", "local-1"]
    );
    assert_eq!(
        marker_lines(&project.path().join("teardown.log")),
        ["local-0", "local-1"]
    );
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inline_config_job_name_selection_and_atoms_override() {
    let c = Local::new(1, 2).start().await;
    let repo = Repo::new();
    repo.commit(
        &[(
            "clusterrunner.yaml",
            r#"
First:
  commands: ['echo first $V']
  atomizers: [{V: 'echo 1'}]
Second:
  commands: ['echo second $V']
  atomizers: [{V: 'printf "p\nq\n"'}]
Third:
  commands: ['echo third $V']
  atomizers: [{V: 'exit 1'}]
"#,
        )],
        "jobs",
    );
    let (mut b, _) = c.clients().await.unwrap();

    // job_name selects one job among several.
    let mut req = git_request(&repo.url(), "", "");
    req.job_name = "Second".into();
    let id = submit(&mut b, req).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(build.job_name, "Second");
    assert_eq!(build.command, "echo second $V");
    check_archives(&mut b, id, |t| AtomExpect {
        console: format!("second {t}\n"),
        exit_code: 0,
        files: vec![],
    })
    .await;

    // Without job_name: ClusterRunner's message, build in ERROR.
    let id = submit(&mut b, git_request(&repo.url(), "", "")).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Error);
    assert_eq!(
        build.error_message,
        "Multiple jobs are defined in this project but you did not specify one. Specify one of the following job names: ['First', 'Second', 'Third']"
    );

    // atoms_override: the atomizer (which would fail) is not run.
    let mut req = git_request(&repo.url(), "", "");
    req.job_name = "Third".into();
    req.atoms_override = vec!["export V=\"x\";".into(), "export V=\"y\";".into()];
    let id = submit(&mut b, req).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished, "{build:#?}");
    check_archives(&mut b, id, |t| AtomExpect {
        console: format!("third {t}\n"),
        exit_code: 0,
        files: vec![],
    })
    .await;

    // Inline config replaces clusterrunner.yaml (a directory without any yaml file).
    let empty = tempfile::tempdir().unwrap();
    let mut req = dir_request(empty.path());
    req.job_name = "Inline".into();
    req.config_json =
        r#"{"commands": ["echo inline $N > $ARTIFACT_DIR/n"], "atomizers": [{"N": "seq 3"}]}"#
            .into();
    let id = submit(&mut b, req).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished, "{build:#?}");
    assert_eq!(build.job_name, "Inline");
    check_archives(&mut b, id, |t| AtomExpect {
        console: String::new(),
        exit_code: 0,
        files: vec![("n".into(), format!("inline {t}\n").into_bytes())],
    })
    .await;
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hash_that_is_not_the_branch_head_is_built() {
    let c = Local::new(1, 1).start().await;
    let repo = Repo::new();
    let job = |v: &str| {
        format!("J:\n  commands: ['cat version.txt']\n  atomizers: [{{A: 'echo {v}'}}]\n")
    };
    let old = repo.commit(
        &[
            ("clusterrunner.yaml", &job("old")),
            ("version.txt", "old\n"),
        ],
        "old",
    );
    let head = repo.commit(
        &[
            ("clusterrunner.yaml", &job("new")),
            ("version.txt", "new\n"),
        ],
        "new",
    );
    let (mut b, _) = c.clients().await.unwrap();
    for (hash, want, commit) in [(&old[..10], "old", &old), ("", "new", &head)] {
        let id = submit(&mut b, git_request(&repo.url(), "master", hash)).await;
        let build = wait_final(&mut b, id).await;
        assert_eq!(state(&build), proto::BuildState::Finished, "{build:#?}");
        assert_eq!(&build.commit, commit);
        check_archives(&mut b, id, |t| {
            assert_eq!(t, want);
            AtomExpect {
                console: format!("{want}\n"),
                exit_code: 0,
                files: vec![],
            }
        })
        .await;
    }
    // A hash that does not exist: a clear error.
    let id = submit(
        &mut b,
        git_request(&repo.url(), "master", "deadbeefdeadbeef"),
    )
    .await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Error);
    assert!(
        build.error_message.contains("deadbeefdeadbeef"),
        "{}",
        build.error_message
    );
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_job_config_error_is_reported() {
    let c = Local::new(1, 1).start().await;
    let (mut b, _) = c.clients().await.unwrap();
    let cases: &[(&str, &str)] = &[
        (
            "- a\n- b\n",
            "The yaml config file could not be parsed to a dictionary",
        ),
        ("{}\n", "No jobs found in the config."),
        (
            "J:\n  commands: ['x']\n  atomizers: [{A: 'echo 1'}]\n  bogus: 1\n",
            "Definition for job \"J\" contains an invalid config section \"bogus\".",
        ),
        (
            "J:\n  setup_build: ['x']\n",
            "Definition for job \"J\" is missing required config sections: {'commands', 'atomizers'}",
        ),
        (
            "J:\n  commands: 'not a list'\n  atomizers: [{A: 'echo 1'}]\n",
            "Definition for job \"J\" contains an invalid value for config section \"commands\".",
        ),
        (
            "J:\n",
            "Passed in configuration is not a dictionary for job: \"J\".",
        ),
    ];
    for (yaml, message) in cases {
        let project = tempfile::tempdir().unwrap();
        write_job(project.path(), yaml);
        let id = submit(&mut b, dir_request(project.path())).await;
        let build = wait_final(&mut b, id).await;
        assert_eq!(state(&build), proto::BuildState::Error, "{yaml}");
        assert!(
            build.error_message.starts_with(message),
            "for {yaml:?}: got {:?}, want {message:?}",
            build.error_message
        );
        // The same config given inline is refused at submission, and nothing is stored.
        if !yaml.starts_with('-') && *yaml != "{}\n" && *yaml != "J:\n" {
            let value: serde_json::Value = serde_norway::from_str(yaml).unwrap();
            let mut req = dir_request(project.path());
            req.job_name = "J".into();
            req.config_json = value["J"].to_string();
            let before = b
                .list(proto::ListBuildsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .total;
            let err = b
                .submit(proto::SubmitBuildRequest { request: Some(req) })
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(
                err.message().starts_with(message),
                "{} vs {message}",
                err.message()
            );
            let after = b
                .list(proto::ListBuildsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .total;
            assert_eq!(before, after, "a refused build is not stored");
        }
    }
    // No clusterrunner.yaml, unknown job, missing directory.
    let project = tempfile::tempdir().unwrap();
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert!(
        build
            .error_message
            .starts_with("Could not find project yaml file"),
        "{}",
        build.error_message
    );
    write_job(
        project.path(),
        "A:\n  commands: [x]\n  atomizers: [{V: 'echo'}]\n",
    );
    let mut req = dir_request(project.path());
    req.job_name = "Nope".into();
    let id = submit(&mut b, req).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(
        build.error_message,
        "The job \"Nope\" was not found in the loaded config. Valid jobs are: ['A']"
    );
    let id = submit(&mut b, dir_request(&project.path().join("missing"))).await;
    let build = wait_final(&mut b, id).await;
    assert!(
        build
            .error_message
            .starts_with("Could not find the directory"),
        "{}",
        build.error_message
    );
    // A failing atomizer.
    write_job(
        project.path(),
        "A:\n  commands: [x]\n  atomizers: [{V: 'echo oops; exit 4'}]\n",
    );
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert!(
        build.error_message.starts_with("Atomizer command failed!"),
        "{}",
        build.error_message
    );
    assert!(
        build.error_message.contains("oops"),
        "{}",
        build.error_message
    );
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slave_dying_mid_build_loses_nothing() {
    let mut c = Local::new(2, 2).start().await;
    let project = project_with(
        "K:\n  commands: ['sleep 0.2', 'echo $T > $ARTIFACT_DIR/t']\n  atomizers: [{T: 'seq 1 24'}]\n",
    );
    let (mut b, _) = c.clients().await.unwrap();
    let id = submit(&mut b, dir_request(project.path())).await;
    // Kill a slave once some atoms are done and others are running.
    wait_for(&mut b, id, Duration::from_secs(30), |b| {
        b.completed_atoms >= 4
    })
    .await;
    c.kill_slave(1);
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished, "{build:#?}");
    assert_eq!(build.result, proto::BuildResult::NoFailures as i32);
    check_archives(&mut b, id, |t| AtomExpect {
        console: String::new(),
        exit_code: 0,
        files: vec![("t".into(), format!("{t}\n").into_bytes())],
    })
    .await;
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_during_atomizing_and_during_building() {
    let c = Local::new(1, 2).start().await;
    let marker = tempfile::tempdir().unwrap();
    let m = marker.path().display().to_string();
    let (mut b, _) = c.clients().await.unwrap();

    // During atomizing.
    let project = project_with(&format!(
        "A:\n  commands: ['true']\n  atomizers: [{{V: 'echo $$ > {m}/pid_atomizer; sleep 30; echo 1'}}]\n"
    ));
    let id = submit(&mut b, dir_request(project.path())).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids_in(marker.path()).is_empty() {
        assert!(Instant::now() < deadline, "atomizer never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    b.cancel(proto::CancelBuildRequest { build_id: id })
        .await
        .unwrap();
    let build = wait_for(&mut b, id, Duration::from_secs(2), is_final).await;
    assert_eq!(state(&build), proto::BuildState::Canceled);
    let pid = pids_in(marker.path())[0];
    while !process_gone(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "atomizer {pid} still running 2 s after cancel"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::remove_file(marker.path().join("pid_atomizer")).unwrap();

    // During building.
    write_job(
        project.path(),
        &format!(
            "B:\n  commands: ['echo $$ > {m}/pid_$V', 'echo started $V', 'sleep 30']\n  atomizers: [{{V: 'seq 1 6'}}]\n"
        ),
    );
    let id = submit(&mut b, dir_request(project.path())).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids_in(marker.path()).len() < 2 {
        assert!(Instant::now() < deadline, "atoms never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    let canceled = b
        .cancel(proto::CancelBuildRequest { build_id: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&canceled), proto::BuildState::Canceled);
    assert_eq!(canceled.result, proto::BuildResult::Failure as i32);
    for pid in pids_in(marker.path()) {
        while !process_gone(pid) {
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "atom {pid} still running 2 s after cancel"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // What the killed atoms did is kept: killed by a signal, their console so far; the atoms
    // that never started are still not started.
    let started: Vec<String> = pids_in(marker.path())
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(started.len(), 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    let killed = loop {
        let sjs = subjobs(&mut b, id).await;
        let killed: Vec<proto::Atom> = sjs
            .iter()
            .flat_map(|s| &s.atoms)
            .filter(|a| a.exit_code.is_some())
            .cloned()
            .collect();
        if killed.len() == 2 {
            let rest = sjs
                .iter()
                .flat_map(|s| &s.atoms)
                .filter(|a| a.exit_code.is_none());
            assert!(
                rest.clone()
                    .all(|a| a.state == proto::AtomState::NotStarted as i32)
            );
            assert_eq!(rest.count(), 4);
            break killed;
        }
        assert!(
            Instant::now() < deadline,
            "killed atoms not recorded: {sjs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for a in &killed {
        assert_eq!(a.state, proto::AtomState::Completed as i32, "{a:?}");
        assert!(a.exit_code.unwrap() < 0, "killed by a signal: {a:?}");
        let page = b
            .get_console(proto::GetConsoleRequest {
                build_id: id,
                subjob_id: a.subjob_id,
                atom_id: a.id,
                max_lines: 10,
                offset_line: None,
            })
            .await
            .expect("the killed atom's console is kept")
            .into_inner();
        assert_eq!(
            page.content,
            format!("started {}\n", token(&a.command_string)),
            "{a:?}"
        );
    }
    assert_eq!(state(&get(&mut b, id).await), proto::BuildState::Canceled);
    // The executors are free again: the next build runs.
    write_job(
        project.path(),
        "C:\n  commands: ['true']\n  atomizers: [{V: 'seq 2'}]\n",
    );
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished);
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_setup_errors_the_build_and_the_slave_stays_usable() {
    let c = Local::new(1, 2).start().await;
    let project = project_with(
        "S:\n  setup_build: ['echo broken setup; exit 9']\n  commands: ['true']\n  atomizers: [{V: 'seq 3'}]\n",
    );
    let (mut b, mut cl) = c.clients().await.unwrap();
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Error);
    assert!(
        build.error_message.contains("exited with code 9"),
        "{}",
        build.error_message
    );
    assert!(
        build.error_message.contains("broken setup"),
        "{}",
        build.error_message
    );
    let slaves = cl
        .list_slaves(proto::ListSlavesRequest {})
        .await
        .unwrap()
        .into_inner()
        .slaves;
    assert_eq!(slaves.len(), 1, "the slave is still connected");
    write_job(
        project.path(),
        "S:\n  commands: ['true']\n  atomizers: [{V: 'seq 3'}]\n",
    );
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished);
    assert_eq!(build.result, proto::BuildResult::NoFailures as i32);
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_build_survives_a_master_restart() {
    let mut c = Local::new(1, 2).start().await;
    let project = project_with(
        "R:\n  commands: ['echo kept $V | tee $ARTIFACT_DIR/k']\n  atomizers: [{V: 'seq 4'}]\n",
    );
    let (mut b, _) = c.clients().await.unwrap();
    let id = submit(&mut b, dir_request(project.path())).await;
    let before = wait_final(&mut b, id).await;
    assert_eq!(state(&before), proto::BuildState::Finished);
    let zip_before = download(&mut b, id, proto::ArchiveFormat::Zip).await;
    let subjobs_before = subjobs(&mut b, id).await;
    c.restart_master().await.unwrap();
    let (mut b, _) = c.clients().await.unwrap();
    let after = get(&mut b, id).await;
    assert_eq!(after, before);
    assert_eq!(subjobs(&mut b, id).await, subjobs_before);
    assert_eq!(
        download(&mut b, id, proto::ArchiveFormat::Zip).await,
        zip_before
    );
    check_archives(&mut b, id, |t| AtomExpect {
        console: format!("kept {t}\n"),
        exit_code: 0,
        files: vec![("k".into(), format!("kept {t}\n").into_bytes())],
    })
    .await;
    // Build ids keep increasing after the restart, and the slave reconnects and works.
    let id2 = submit(&mut b, dir_request(project.path())).await;
    assert_eq!(id2, id + 1);
    assert_eq!(
        state(&wait_final(&mut b, id2).await),
        proto::BuildState::Finished
    );
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_second_build_uses_timing_history() {
    let c = Local::new(1, 2).start().await;
    let project = tempfile::tempdir().unwrap();
    // Atom N sleeps N/10 s; max_executors 2 makes ClusterRunner's time-based grouping visible.
    write_job(
        project.path(),
        "T:\n  dispatch: clusterrunner\n  max_executors: 2\n  commands: ['sleep 0.$N']\n  atomizers: [{N: 'seq 1 8'}]\n",
    );
    let (mut b, _) = c.clients().await.unwrap();
    let first = submit(&mut b, dir_request(project.path())).await;
    wait_final(&mut b, first).await;
    let sj1 = subjobs(&mut b, first).await;
    assert_eq!(sj1.len(), 8, "no history: one atom per subjob");
    assert!(sj1.iter().all(|s| s.atoms[0].expected_time.is_none()));
    let second = submit(&mut b, dir_request(project.path())).await;
    wait_final(&mut b, second).await;
    let sj2 = subjobs(&mut b, second).await;
    assert!(
        sj2.len() < 8,
        "grouped by recorded times: {} subjobs",
        sj2.len()
    );
    // Every expected time is the time recorded by the first build, and the groups are ordered
    // slowest first as ClusterRunner's grouping makes them.
    let recorded: std::collections::HashMap<String, f64> = sj1
        .iter()
        .flat_map(|s| &s.atoms)
        .map(|a| (a.command_string.clone(), a.actual_time.unwrap()))
        .collect();
    for a in sj2.iter().flat_map(|s| &s.atoms) {
        assert_eq!(a.expected_time, Some(recorded[&a.command_string]));
    }
    let firsts: Vec<f64> = sj2
        .iter()
        .map(|s| s.atoms[0].expected_time.unwrap())
        .collect();
    assert!(firsts[0] >= firsts[firsts.len() - 1]);
    // Queue dispatch (the default) uses the same history to hand out the longest atoms first:
    // one atom per subjob, in descending recorded time.
    write_job(
        project.path(),
        "T:\n  max_executors: 2\n  commands: ['sleep 0.$N']\n  atomizers: [{N: 'seq 1 8'}]\n",
    );
    let third = submit(&mut b, dir_request(project.path())).await;
    wait_final(&mut b, third).await;
    let sj3 = subjobs(&mut b, third).await;
    assert_eq!(sj3.len(), 8);
    let expected: Vec<f64> = sj3
        .iter()
        .map(|s| s.atoms[0].expected_time.unwrap())
        .collect();
    assert!(
        expected.windows(2).all(|w| w[0] >= w[1]),
        "longest first: {expected:?}"
    );
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_secret_is_refused() {
    let c = Local::new(1, 1).start().await;
    let err = ish_cli::local::connect(&c.master_url, "not-the-secret", Duration::from_secs(5))
        .await
        .unwrap()
        .0
        .list(proto::ListBuildsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(
        err.message().contains("wrong cluster secret"),
        "{}",
        err.message()
    );
    // A slave with the wrong secret stops with a clear error instead of retrying forever.
    let cfg = ish_slave::SlaveConfig {
        master: c.master_url.clone(),
        executors: 1,
        data_dir: c.data_dir.join("bad-slave"),
        name: Some("intruder".into()),
        ..Default::default()
    };
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        ish_slave::run(cfg, "not-the-secret".into(), std::future::pending()),
    )
    .await
    .expect("the slave gives up");
    let e = r.unwrap_err();
    assert!(e.to_string().contains("wrong cluster secret"), "{e}");
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn console_output_is_served_live_while_the_atom_runs() {
    use tokio_stream::StreamExt;
    let c = Local::new(1, 1).start().await;
    let marker = tempfile::tempdir().unwrap();
    let go = marker.path().join("go");
    let project = project_with(&format!(
        "C:\n  commands: ['for i in 0 1 2 3 4; do echo line_$i; done', 'while [ ! -f {} ]; do sleep 0.02; done', 'echo last']\n  atomizers: [{{V: 'echo 1'}}]\n",
        go.display()
    ));
    let (mut b, _) = c.clients().await.unwrap();
    let id = submit(&mut b, dir_request(project.path())).await;
    let console = |offset_line: Option<u64>, max_lines: u32| proto::GetConsoleRequest {
        build_id: id,
        subjob_id: 0,
        atom_id: 0,
        max_lines,
        offset_line,
    };
    // While the atom waits for `go`, the first five lines are already on the master.
    let deadline = Instant::now() + Duration::from_secs(20);
    let page = loop {
        match b.get_console(console(None, 50)).await {
            Ok(p) if p.get_ref().total_num_lines == 5 => break p.into_inner(),
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "live console never showed 5 lines"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(page.content, "line_0\nline_1\nline_2\nline_3\nline_4\n");
    let p = b
        .get_console(console(Some(1), 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (p.offset_line, p.num_lines, p.content.as_str()),
        (1, 2, "line_1\nline_2\n")
    );
    let err = b.get_console(console(Some(155), 5)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(state(&get(&mut b, id).await), proto::BuildState::Building);
    // A follower sees everything up to the end of the atom, then the stream ends.
    let mut tail = b
        .tail_console(proto::TailConsoleRequest {
            build_id: id,
            subjob_id: 0,
            atom_id: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    std::fs::write(&go, "").unwrap();
    let mut all = Vec::new();
    let collected = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = tail.next().await {
            all.extend_from_slice(&chunk.unwrap().data);
        }
    })
    .await;
    assert!(collected.is_ok(), "the tail did not end with the atom");
    assert_eq!(
        String::from_utf8(all).unwrap(),
        "line_0\nline_1\nline_2\nline_3\nline_4\nlast\n"
    );
    wait_final(&mut b, id).await;
    let p = b.get_console(console(None, 2)).await.unwrap().into_inner();
    assert_eq!(
        (p.offset_line, p.total_num_lines, p.content.as_str()),
        (4, 6, "line_4\nlast\n")
    );
    // Unknown atoms are NOT_FOUND.
    let mut bad = console(None, 5);
    bad.atom_id = 3;
    assert_eq!(
        b.get_console(bad).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    c.shutdown().await.unwrap();
}

/// Serves `files` (path → content) over HTTP on 127.0.0.1; answers 404 for anything else.
async fn http_files(files: Vec<(&'static str, Vec<u8>)>) -> (String, tokio::task::JoinHandle<()>) {
    let mut router = axum::Router::new();
    for (path, body) in files {
        router = router.route(
            path,
            axum::routing::get(move || async move { body.clone() }),
        );
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remote_files_are_downloaded_into_the_project_before_anything_runs() {
    let c = Local::new(1, 2)
        .tune(|o| o.slave.remote_file_max_bytes = 1 << 20)
        .start()
        .await;
    let (base, server) = http_files(vec![
        ("/input.txt", b"remote content\n".to_vec()),
        ("/big", vec![b'x'; 2 << 20]),
    ])
    .await;
    let repo = Repo::new();
    repo.commit(
        &[(
            "clusterrunner.yaml",
            "R:\n  setup_build: ['test -f data/input.txt']\n  commands: ['cat data/input.txt | tee $ARTIFACT_DIR/copy']\n  atomizers: [{V: 'cat data/input.txt'}]\n",
        )],
        "job",
    );
    let (mut b, _) = c.clients().await.unwrap();
    let mut req = git_request(&repo.url(), "", "");
    req.remote_files
        .insert("data/input.txt".into(), format!("{base}/input.txt"));
    let id = submit(&mut b, req).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished, "{build:#?}");
    check_archives(&mut b, id, |t| {
        assert_eq!(t, "remote content");
        AtomExpect {
            console: "remote content\n".into(),
            exit_code: 0,
            files: vec![("copy".into(), b"remote content\n".to_vec())],
        }
    })
    .await;
    // A name escaping the project, or a URL that is not http(s), is refused at submission.
    for (name, url) in [
        ("../evil", format!("{base}/input.txt")),
        ("ok", "file:///etc/passwd".to_string()),
    ] {
        let mut req = git_request(&repo.url(), "", "");
        req.remote_files.insert(name.into(), url);
        let err = b
            .submit(proto::SubmitBuildRequest { request: Some(req) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
    // A missing file or one over the slave's size cap ends the build in ERROR with the reason.
    for (path, reason) in [("/nope", "404"), ("/big", "larger than the limit")] {
        let mut req = git_request(&repo.url(), "", "");
        req.remote_files
            .insert("data/input.txt".into(), format!("{base}{path}"));
        let id = submit(&mut b, req).await;
        let build = wait_final(&mut b, id).await;
        assert_eq!(state(&build), proto::BuildState::Error);
        assert!(
            build.error_message.contains(reason),
            "{}",
            build.error_message
        );
    }
    c.shutdown().await.unwrap();
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_atom_over_its_timeout_is_killed_and_recorded() {
    let c = Local::new(1, 2).start().await;
    let marker = tempfile::tempdir().unwrap();
    let m = marker.path().display().to_string();
    let project = project_with(&format!(
        "T:\n  atom_timeout: 1\n  commands: ['echo start $V', 'if [ $V = slow ]; then echo $$ > {m}/pid_$V; sleep 30; fi', 'echo end $V']\n  atomizers: [{{V: 'printf \"fast\\nslow\\n\"'}}]\n"
    ));
    let (mut b, _) = c.clients().await.unwrap();
    let t0 = Instant::now();
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "the timeout did not fire"
    );
    assert_eq!(state(&build), proto::BuildState::Finished, "{build:#?}");
    assert_eq!(build.result, proto::BuildResult::Failure as i32);
    let atoms: Vec<proto::Atom> = subjobs(&mut b, id)
        .await
        .into_iter()
        .flat_map(|s| s.atoms)
        .collect();
    let slow = atoms
        .iter()
        .find(|a| a.command_string.contains("slow"))
        .unwrap();
    let fast = atoms
        .iter()
        .find(|a| a.command_string.contains("fast"))
        .unwrap();
    assert!(slow.timed_out && !fast.timed_out);
    assert!(
        slow.exit_code.unwrap() < 0,
        "killed by a signal: {:?}",
        slow.exit_code
    );
    assert_eq!(fast.exit_code, Some(0));
    for pid in pids_in(marker.path()) {
        assert!(
            process_gone(pid),
            "the timed-out atom's process {pid} survived"
        );
    }
    let page = b
        .get_console(proto::GetConsoleRequest {
            build_id: id,
            subjob_id: slow.subjob_id,
            atom_id: slow.id,
            max_lines: 50,
            offset_line: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(page.content.starts_with("start slow\n"), "{}", page.content);
    assert!(
        page.content.contains("[ish] the atom timed out after 1 s"),
        "{}",
        page.content
    );
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_build_over_its_timeout_errors_and_stops_its_atoms() {
    let c = Local::new(1, 2).start().await;
    let marker = tempfile::tempdir().unwrap();
    let m = marker.path().display().to_string();
    let project = project_with(&format!(
        "B:\n  build_timeout: 2\n  commands: ['echo $$ > {m}/pid_$V', 'sleep 30']\n  atomizers: [{{V: 'seq 3'}}]\n"
    ));
    let (mut b, _) = c.clients().await.unwrap();
    let t0 = Instant::now();
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(state(&build), proto::BuildState::Error);
    assert_eq!(
        build.error_message,
        "Build timed out: it ran longer than its build_timeout of 2 s."
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    for pid in pids_in(marker.path()) {
        while !process_gone(pid) {
            assert!(
                Instant::now() < deadline,
                "atom {pid} survived the build timeout"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_rerun_failing_atoms_and_report_flaky_ones() {
    let c = Local::new(1, 2).start().await;
    let marker = tempfile::tempdir().unwrap();
    let m = marker.path().display().to_string();
    // Atoms 1-3 fail on their first try only; atom 4 always fails.
    let project = project_with(&format!(
        "F:\n  retries: 2\n  commands: ['echo try $V', 'echo $V > $ARTIFACT_DIR/v', 'if [ $V = 4 ]; then exit 4; fi', 'if [ ! -f {m}/seen_$V ]; then touch {m}/seen_$V; exit 1; fi']\n  atomizers: [{{V: 'seq 4'}}]\n"
    ));
    let (mut b, _) = c.clients().await.unwrap();
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished, "{build:#?}");
    assert_eq!(
        build.result,
        proto::BuildResult::Failure as i32,
        "atom 4 always fails"
    );
    assert_eq!((build.failed_atom_count, build.flaky_atom_count), (1, 3));
    assert_eq!(build.flaky_atoms.len(), 3);
    let note = |tries: u32, code: i32| {
        format!("\n[ish] try {tries} of 3 failed with exit code {code}; running the atom again\n")
    };
    check_archives(&mut b, id, |t| {
        let n: u32 = t.parse().unwrap();
        if n == 4 {
            AtomExpect {
                console: format!("try 4\n{}try 4\n{}try 4\n", note(1, 4), note(2, 4)),
                exit_code: 4,
                files: vec![("v".into(), b"4\n".to_vec())],
            }
        } else {
            AtomExpect {
                console: format!("try {t}\n{}try {t}\n", note(1, 1)),
                exit_code: 0,
                files: vec![("v".into(), format!("{t}\n").into_bytes())],
            }
        }
    })
    .await;
    let atoms: Vec<proto::Atom> = subjobs(&mut b, id)
        .await
        .into_iter()
        .flat_map(|s| s.atoms)
        .collect();
    for a in atoms {
        let four = a.command_string.contains("\"4\"");
        assert_eq!(
            (a.tries, a.flaky),
            if four { (3, false) } else { (2, true) },
            "{a:?}"
        );
    }
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_console_over_its_cap_keeps_the_tail_and_says_so() {
    let c = Local::new(1, 1)
        .tune(|o| o.slave.max_console_bytes_per_atom = 10_000)
        .start()
        .await;
    // 2000 numbered lines of 12 bytes: 24000 bytes, more than twice the cap.
    let project = project_with(
        "C:\n  commands: ['for i in $(seq 1000 2999); do echo \"line $i..\"; done']\n  atomizers: [{V: 'echo 1'}]\n",
    );
    let (mut b, _) = c.clients().await.unwrap();
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(
        build.result,
        proto::BuildResult::NoFailures as i32,
        "{build:#?}"
    );
    let zip = zip_files(&download(&mut b, id, proto::ArchiveFormat::Zip).await);
    let console =
        String::from_utf8(zip["artifact_0_0/clusterrunner_console_output"].clone()).unwrap();
    let (note, kept) = console.split_once('\n').unwrap();
    let kept_len = kept.len();
    assert!(
        (5_000..=10_000).contains(&kept_len),
        "kept {kept_len} bytes"
    );
    assert_eq!(
        note,
        format!(
            "[ish] console output cut: the first {} of 24000 bytes were dropped (max_console_bytes_per_atom)",
            24000 - kept_len
        )
    );
    assert!(kept.ends_with("line 2999..\n"), "the tail is kept");
    let all: String = (1000..3000).map(|i| format!("line {i}..\n")).collect();
    assert!(
        all.ends_with(kept),
        "the tail is the exact end of the output"
    );
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_build_limits_on_atoms_and_artifact_bytes() {
    let c = Local::new(1, 1)
        .tune(|o| {
            o.master.max_atoms_per_build = 5;
            o.master.max_artifact_bytes_per_build = 100_000;
        })
        .start()
        .await;
    let (mut b, _) = c.clients().await.unwrap();
    // Too many atoms from the atomizer: ERROR with the reason.
    let project = project_with("A:\n  commands: ['true']\n  atomizers: [{V: 'seq 6'}]\n");
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Error);
    assert_eq!(
        build.error_message,
        "The atomizers produced 6 atoms; the limit is 5 (max_atoms_per_build)."
    );
    // Too many in atoms_override: refused at submission.
    let mut req = dir_request(project.path());
    req.atoms_override = (0..6).map(|i| format!("export V=\"{i}\";")).collect();
    let err = b
        .submit(proto::SubmitBuildRequest { request: Some(req) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // 40 kB of artifacts per atom, 100 kB per build: the third atom's upload is refused and the
    // atom is recorded as failed, with the reason in its console.
    write_job(
        project.path(),
        "B:\n  commands: ['head -c 40000 /dev/zero > $ARTIFACT_DIR/blob']\n  atomizers: [{V: 'seq 3'}]\n",
    );
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished, "{build:#?}");
    assert_eq!(build.failed_atom_count, 1);
    let failed = &build.failed_atoms[0];
    let page = b
        .get_console(proto::GetConsoleRequest {
            build_id: id,
            subjob_id: failed.subjob_id,
            atom_id: failed.id,
            max_lines: 10,
            offset_line: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        page.content.contains("max_artifact_bytes_per_build"),
        "{}",
        page.content
    );
    c.shutdown().await.unwrap();
}

/// A master whose disk fills up fails the affected build with a clear error, stays up, and
/// still serves what it stored before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_on_the_master_fails_the_build_and_keeps_what_was_stored() {
    let dir = tempfile::tempdir().unwrap();
    let master_dir = dir.path().join("master");
    std::fs::create_dir_all(&master_dir).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(&master_dir)
        .status()
        .expect("mount runs");
    assert!(
        mounted.success(),
        "this test needs root to mount a small tmpfs as the master's disk"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(master_dir.clone());
    let c = Local::with_defaults(1, 2)
        .data_dir(dir.path().to_path_buf())
        .tune(|o| o.master.heartbeat_interval_ms = 200)
        .start()
        .await;
    let (mut b, mut cl) = c.clients().await.unwrap();
    let project = project_with(
        "S:\n  commands: ['echo small $V > $ARTIFACT_DIR/s']\n  atomizers: [{V: 'seq 3'}]\n",
    );
    let ok = submit(&mut b, dir_request(project.path())).await;
    assert_eq!(
        wait_final(&mut b, ok).await.result,
        proto::BuildResult::NoFailures as i32
    );
    let zip_before = download(&mut b, ok, proto::ArchiveFormat::Zip).await;
    // 8 atoms × 4 MB of artifacts do not fit in what is left of 24 MB.
    write_job(
        project.path(),
        "F:\n  commands: ['head -c 4000000 /dev/urandom > $ARTIFACT_DIR/big']\n  atomizers: [{V: 'seq 8'}]\n",
    );
    let full = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, full).await;
    assert_eq!(state(&build), proto::BuildState::Error, "{build:#?}");
    assert!(
        build.error_message.contains("disk is full")
            || build.error_message.contains("No space left on device"),
        "{}",
        build.error_message
    );
    // The master is up, its slave still connected, the earlier build intact.
    assert_eq!(
        cl.list_slaves(proto::ListSlavesRequest {})
            .await
            .unwrap()
            .into_inner()
            .slaves
            .len(),
        1
    );
    assert_eq!(
        get(&mut b, ok).await.result,
        proto::BuildResult::NoFailures as i32
    );
    assert_eq!(
        download(&mut b, ok, proto::ArchiveFormat::Zip).await,
        zip_before
    );
    c.shutdown().await.unwrap();
}

/// A slave whose disk is full fails the build it cannot fetch with a clear error, stays
/// connected, and runs the next build that fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_on_a_slave_fails_the_build_and_the_slave_stays() {
    let dir = tempfile::tempdir().unwrap();
    let slave_dir = dir.path().join("slave-0");
    std::fs::create_dir_all(&slave_dir).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&slave_dir)
        .status()
        .expect("mount runs");
    assert!(
        mounted.success(),
        "this test needs root to mount a small tmpfs as the slave's disk"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(slave_dir);
    let c = Local::with_defaults(1, 1)
        .data_dir(dir.path().to_path_buf())
        .start()
        .await;
    let (mut b, mut cl) = c.clients().await.unwrap();
    // A repository with 3 MB of content does not fit in the slave's 2 MB.
    let repo = Repo::new();
    let big: String = (0..300_000u64)
        .map(|i| format!("{:09}\n", i * 7919 % 1_000_003))
        .collect();
    repo.commit(
        &[
            (
                "clusterrunner.yaml",
                "B:\n  commands: ['true']\n  atomizers: [{V: 'seq 2'}]\n",
            ),
            ("big.txt", &big),
        ],
        "big",
    );
    let id = submit(&mut b, git_request(&repo.url(), "", "")).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Error);
    assert!(
        build.error_message.to_lowercase().contains("space"),
        "the reason names the full disk: {}",
        build.error_message
    );
    assert_eq!(
        cl.list_slaves(proto::ListSlavesRequest {})
            .await
            .unwrap()
            .into_inner()
            .slaves
            .len(),
        1
    );
    let small = project_with("S:\n  commands: ['true']\n  atomizers: [{V: 'seq 2'}]\n");
    let id = submit(&mut b, dir_request(small.path())).await;
    assert_eq!(
        wait_final(&mut b, id).await.result,
        proto::BuildResult::NoFailures as i32
    );
    c.shutdown().await.unwrap();
}
