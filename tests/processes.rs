//! Multi-process tests of the real `ish` binary: one master and two slaves as separate processes
//! on 127.0.0.1, killed for real. Every process a test starts is stopped when the test ends.
mod support;

use ish_core::proto;
use nix::sys::signal::{Signal, kill};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::procs::*;
use support::*;

const JOB: &str = r#"
Build:
  setup_build:
    - echo "$ISH_SLAVE_NAME" >> "$MARKER/setup"
  commands:
    - sleep 0.1
    - echo "artifact $TOKEN" > "$ARTIFACT_DIR/a.txt"
    - echo "console $TOKEN"
    - test "$TOKEN" != 13
  atomizers:
    - TOKEN: seq 1 20
  teardown_build:
    - echo "$ISH_SLAVE_NAME" >> "$MARKER/teardown"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_binaries_build_a_git_repo_with_the_ish_build_client() {
    let c = Cluster::start(2, 2).await;
    let repo = Repo::new();
    repo.commit(&[("clusterrunner.yaml", JOB)], "job");
    let marker = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    // The client as a user runs it, from a work directory: exit 1 because atom 13 fails,
    // results unpacked into ./build_results.
    let out = Command::new(ISH)
        .args([
            "build",
            "--master",
            &c.url,
            "--env",
            &format!("MARKER={}", marker.path().display()),
            "git",
            "--url",
            &repo.url(),
        ])
        .env("ISH_SECRET", &c.secret)
        .current_dir(work.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "ish build must fail because atom 13 fails:\n{stderr}"
    );
    assert!(stderr.contains("FAILURE"), "{stderr}");
    let (mut b, _) = c.clients().await;
    let builds = b
        .list(proto::ListBuildsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .builds;
    let id = builds.last().unwrap().id;
    let build = get(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished);
    assert_eq!((build.num_atoms, build.failed_atom_count), (20, 1));
    check_archives(&mut b, id, |t| AtomExpect {
        console: format!("console {t}\n"),
        exit_code: if t == "13" { 1 } else { 0 },
        files: vec![("a.txt".into(), format!("artifact {t}\n").into_bytes())],
    })
    .await;
    // ./build_results holds exactly what results.zip holds.
    let zip = zip_files(&download(&mut b, id, proto::ArchiveFormat::Zip).await);
    let results = work.path().join("build_results");
    let mut on_disk = std::collections::BTreeMap::new();
    let mut stack = vec![results.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e
                    .path()
                    .strip_prefix(&results)
                    .unwrap()
                    .display()
                    .to_string();
                on_disk.insert(rel, std::fs::read(e.path()).unwrap());
            }
        }
    }
    assert_eq!(on_disk, zip);
    assert!(on_disk.contains_key("failures.txt"));
    // Setup and teardown ran exactly once on each slave that ran atoms.
    let deadline = Instant::now() + Duration::from_secs(10);
    while marker_lines(&marker.path().join("teardown")).len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        marker_lines(&marker.path().join("setup")),
        ["slave-0", "slave-1"]
    );
    assert_eq!(
        marker_lines(&marker.path().join("teardown")),
        ["slave-0", "slave-1"]
    );
    c.stop();
}

/// The cluster secret and the slave's own `ISH_*` settings never reach a user command: setup,
/// atomizer, atoms and teardown each dump their environment, and the secret is found in no
/// console, no archive, no file a command wrote and no log of the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_of_a_job_sees_the_cluster_secret() {
    let c = Cluster::start(1, 2).await;
    let marker = tempfile::tempdir().unwrap();
    let project = project_with(
        r#"
E:
  setup_build:
    - env > "$MARKER/setup.env"
  commands:
    - env
    - env > "$ARTIFACT_DIR/env.txt"
  atomizers:
    - T: env > "$MARKER/atomizer.env"; seq 1 3
  teardown_build:
    - env > "$MARKER/teardown.tmp" && mv "$MARKER/teardown.tmp" "$MARKER/teardown.env"
"#,
    );
    let (mut b, _) = c.clients().await;
    let mut req = dir_request(project.path());
    req.env
        .insert("MARKER".into(), marker.path().display().to_string());
    let id = submit(&mut b, req).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished, "{build:#?}");
    assert_eq!(build.result, proto::BuildResult::NoFailures as i32);
    assert_eq!(build.num_atoms, 3);

    // Every environment a command saw: the ISH_ variables in it are the documented ones, the
    // allow-listed slave variables and the build's own env are there.
    let check_env = |what: &str, dump: &str| {
        assert!(!dump.contains(&c.secret), "{what} saw the secret:\n{dump}");
        let names: Vec<&str> = dump
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .collect();
        let ish: Vec<&&str> = names.iter().filter(|n| n.starts_with("ISH_")).collect();
        assert_eq!(
            ish,
            [&"ISH_BUILD_ID", &"ISH_SLAVE_NAME"]
                .into_iter()
                .filter(|n| names.contains(n))
                .collect::<Vec<_>>(),
            "{what}: only the documented ISH_ variables:\n{dump}"
        );
        assert!(names.contains(&"PATH"), "{what} has PATH:\n{dump}");
        assert!(
            names.contains(&"MARKER"),
            "{what} has the build's env:\n{dump}"
        );
    };
    // Teardown runs once the build has ended: give it a moment (it appears whole, by a rename).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marker.path().join("teardown.env").exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for name in ["setup.env", "atomizer.env", "teardown.env"] {
        let dump = std::fs::read_to_string(marker.path().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        check_env(name, &dump);
        assert!(dump.contains("ISH_BUILD_ID="), "{name}:\n{dump}");
    }
    for sj in subjobs(&mut b, id).await {
        for a in &sj.atoms {
            let page = b
                .get_console(proto::GetConsoleRequest {
                    build_id: id,
                    subjob_id: sj.id,
                    atom_id: a.id,
                    max_lines: 10_000,
                    offset_line: Some(0),
                })
                .await
                .unwrap()
                .into_inner();
            check_env(
                &format!("console of atom {}/{}", sj.id, a.id),
                &page.content,
            );
            assert!(page.content.contains("ARTIFACT_DIR="), "{}", page.content);
        }
    }
    let zip = zip_files(&download(&mut b, id, proto::ArchiveFormat::Zip).await);
    let env_files: Vec<_> = zip.keys().filter(|k| k.ends_with("/env.txt")).collect();
    assert_eq!(env_files.len(), 3, "{:?}", zip.keys());
    for (name, data) in &zip {
        let text = String::from_utf8_lossy(data);
        assert!(
            !text.contains(&c.secret),
            "results.zip {name} holds the secret"
        );
        if name.ends_with("/env.txt") {
            check_env(name, &text);
        }
    }
    let (_, tar) = tar_entries(&download(&mut b, id, proto::ArchiveFormat::TarGz).await);
    for (name, data) in &tar {
        assert!(
            !String::from_utf8_lossy(data).contains(&c.secret),
            "results.tar.gz {name} holds the secret"
        );
    }
    drop(b);
    let logs = c.logs();
    assert!(
        !logs.contains(&c.secret),
        "a log of the cluster holds the secret"
    );
    assert!(logs.contains("slave-0"), "the logs were read:\n{logs}");
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_slave_mid_build_loses_nothing() {
    let mut c = Cluster::start(2, 2).await;
    let project = project_with(
        "K:\n  commands: ['sleep 0.3', 'echo $T > $ARTIFACT_DIR/t', 'echo done $T']\n  atomizers: [{T: 'seq 1 24'}]\n",
    );
    let (mut b, mut cl) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    wait_for(&mut b, id, Duration::from_secs(30), |b| {
        b.completed_atoms >= 4
    })
    .await;
    kill(c.slaves[1].pid(), Signal::SIGKILL).unwrap();
    c.slaves[1].wait_exit(Duration::from_secs(5));
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished, "{build:#?}");
    assert_eq!(build.result, proto::BuildResult::NoFailures as i32);
    check_archives(&mut b, id, |t| AtomExpect {
        console: format!("done {t}\n"),
        exit_code: 0,
        files: vec![("t".into(), format!("{t}\n").into_bytes())],
    })
    .await;
    let sjs = subjobs(&mut b, id).await;
    assert!(
        sjs.iter().any(|s| s.attempts >= 2),
        "the killed slave's running subjobs were dispatched again"
    );
    assert!(
        sjs.iter()
            .flat_map(|s| &s.atoms)
            .all(|a| a.slave == "slave-0" || a.slave == "slave-1")
    );
    let slaves = cl
        .list_slaves(proto::ListSlavesRequest {})
        .await
        .unwrap()
        .into_inner()
        .slaves;
    assert_eq!(
        slaves.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["slave-0"]
    );
    c.slaves.remove(1);
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_with_the_wrong_secret_exits_with_a_clear_error() {
    let c = Cluster::start(1, 1).await;
    let data = c.dir.path().join("intruder");
    let out = Command::new(ISH)
        .args([
            "slave",
            "--master",
            &c.url,
            "--executors",
            "1",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .env("ISH_SECRET", "definitely-wrong")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("wrong cluster secret"), "{stderr}");
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_outlives_its_master_and_rejoins_the_restarted_one() {
    let mut c = Cluster::start(1, 1).await;
    let master_dir = c.dir.path().join("master");
    let addr = std::fs::read_to_string(master_dir.join("master.addr")).unwrap();
    assert_eq!(
        c.master
            .signal_and_wait(Signal::SIGKILL, Duration::from_secs(5)),
        None
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        c.slaves[0]
            .child
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "the slave must keep running"
    );
    c.master = Proc::spawn(
        "master2",
        &[
            "master",
            "--listen",
            addr.trim(),
            "--data-dir",
            master_dir.to_str().unwrap(),
        ],
        &c.secret,
        c.dir.path(),
    );
    c.wait_slaves(1).await;
    let project = project_with("R:\n  commands: ['echo $T']\n  atomizers: [{T: 'seq 3'}]\n");
    let (mut b, _) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    assert_eq!(
        state(&wait_final(&mut b, id).await),
        proto::BuildState::Finished
    );
    c.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_slave_finishes_its_work_leaves_and_exits_0() {
    let mut c = Cluster::start(2, 1).await;
    let project = project_with(
        "D:\n  commands: ['sleep 0.3', 'echo $T > $ARTIFACT_DIR/t']\n  atomizers: [{T: 'seq 1 8'}]\n",
    );
    let (mut b, mut cl) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    wait_for(&mut b, id, Duration::from_secs(30), |b| {
        b.completed_atoms >= 1
    })
    .await;
    let slaves = cl
        .list_slaves(proto::ListSlavesRequest {})
        .await
        .unwrap()
        .into_inner()
        .slaves;
    let victim = slaves.iter().find(|s| s.name == "slave-1").unwrap().id;
    let drained = cl
        .drain_slaves(proto::DrainSlavesRequest {
            slave_ids: vec![victim],
            all: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(drained.slave_ids, [victim]);
    assert_eq!(
        c.slaves[1].wait_exit(Duration::from_secs(20)),
        0,
        "{}",
        c.slaves[1].log()
    );
    let build = wait_final(&mut b, id).await;
    assert_eq!(
        build.result,
        proto::BuildResult::NoFailures as i32,
        "{build:#?}"
    );
    check_archives(&mut b, id, |t| AtomExpect {
        console: String::new(),
        exit_code: 0,
        files: vec![("t".into(), format!("{t}\n").into_bytes())],
    })
    .await;
    let names: Vec<String> = cl
        .list_slaves(proto::ListSlavesRequest {})
        .await
        .unwrap()
        .into_inner()
        .slaves
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["slave-0"]);
    c.slaves.remove(1);
    c.stop();
}

/// `ish local`: master, gateway and slaves in one process; the gateway answers `GET /`, a build
/// runs, and SIGTERM stops it all with exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ish_local_serves_builds_and_the_gateway_and_stops_on_sigterm() {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("local.toml");
    std::fs::write(
        &conf,
        format!(
            "slaves = 1\nexecutors = 2\nmaster_listen = \"127.0.0.1:0\"\ngateway_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(ISH)
        .args(["local", "--config", conf.to_str().unwrap()])
        .env("ISH_SECRET", "local-test-secret")
        .env("ISH_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Proc {
        name: "local".into(),
        child: None,
        log: dir.path().join("none"),
    };
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let (mut master, mut gateway) = (String::new(), String::new());
    while master.is_empty() || gateway.is_empty() {
        let line = lines
            .next()
            .expect("ish local printed its addresses")
            .unwrap();
        if let Some(u) = line.trim().strip_prefix("master (gRPC): ") {
            master = u.to_string();
        }
        if let Some(u) = line.trim().strip_prefix("gateway (REST): http://") {
            gateway = u.to_string();
        }
    }
    guard.child = Some(child);
    // The gateway answers GET / with 200 and a JSON object.
    let mut s = std::net::TcpStream::connect(&gateway).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"child_routes\""), "{resp}");
    // A build through the master.
    let (mut b, _) = ish_cli::local::connect(&master, "local-test-secret", Duration::from_secs(10))
        .await
        .unwrap();
    let project = project_with("L:\n  commands: ['echo $X']\n  atomizers: [{X: 'seq 4'}]\n");
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(build.result, proto::BuildResult::NoFailures as i32);
    assert_eq!(
        guard.signal_and_wait(Signal::SIGTERM, Duration::from_secs(15)),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_stops_on_sigterm_with_exit_code_0() {
    let c = Cluster::start(0, 1).await;
    let mut gw = Proc::spawn(
        "gateway",
        &["gateway", "--listen", "127.0.0.1:0", "--master", &c.url],
        &c.secret,
        c.dir.path(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.log().contains("gateway listening") {
        assert!(
            Instant::now() < deadline,
            "gateway did not start:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        gw.signal_and_wait(Signal::SIGTERM, Duration::from_secs(15)),
        Some(0)
    );
    c.stop();
}

/// kill -9 of the master in the middle of a build, then a restart on the same address and data:
/// the slaves keep running their atoms, reconnect, report them, and the build finishes with every
/// atom run exactly once (each atom appends its token to a shared file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_master_mid_build_loses_and_repeats_nothing() {
    let mut c = Cluster::start(2, 2).await;
    let marker = tempfile::tempdir().unwrap();
    let runs = marker.path().join("runs");
    let project = project_with(&format!(
        "M:\n  commands: ['sleep 0.3', 'echo $T >> {}', 'echo $T > $ARTIFACT_DIR/t', 'echo out $T']\n  atomizers: [{{T: 'seq 1 40'}}]\n",
        runs.display()
    ));
    let (mut b, _) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    wait_for(&mut b, id, Duration::from_secs(30), |b| {
        b.completed_atoms >= 10
    })
    .await;
    let master_dir = c.dir.path().join("master");
    let addr = std::fs::read_to_string(master_dir.join("master.addr")).unwrap();
    assert_eq!(
        c.master
            .signal_and_wait(Signal::SIGKILL, Duration::from_secs(5)),
        None
    );
    c.master = Proc::spawn(
        "master2",
        &[
            "master",
            "--listen",
            addr.trim(),
            "--data-dir",
            master_dir.to_str().unwrap(),
        ],
        &c.secret,
        c.dir.path(),
    );
    let (mut b, _) = c.clients().await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(
        state(&build),
        proto::BuildState::Finished,
        "{build:#?}\n{}",
        c.master.log()
    );
    assert_eq!(build.result, proto::BuildResult::NoFailures as i32);
    check_archives(&mut b, id, |t| AtomExpect {
        console: format!("out {t}\n"),
        exit_code: 0,
        files: vec![("t".into(), format!("{t}\n").into_bytes())],
    })
    .await;
    let mut lines: Vec<u32> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        (1..=40).collect::<Vec<u32>>(),
        "every atom ran exactly once"
    );
    c.stop();
}

/// SIGTERM on a slave mid-build: it finishes the subjobs it runs (nothing is run twice), gets
/// no new work, leaves the master's list and exits 0; the build finishes on the other slave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_slave_without_losing_or_repeating_work() {
    let mut c = Cluster::start(2, 2).await;
    let marker = tempfile::tempdir().unwrap();
    let runs = marker.path().join("runs");
    let project = project_with(&format!(
        "S:\n  commands: ['sleep 0.4', 'echo $T-$ISH_SLAVE_NAME >> {}', 'echo $T > $ARTIFACT_DIR/t']\n  atomizers: [{{T: 'seq 1 24'}}]\n",
        runs.display()
    ));
    let (mut b, mut cl) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    wait_for(&mut b, id, Duration::from_secs(30), |b| {
        b.completed_atoms >= 4
    })
    .await;
    let t0 = Instant::now();
    assert_eq!(
        c.slaves[1].signal_and_wait(Signal::SIGTERM, Duration::from_secs(20)),
        Some(0),
        "{}",
        c.slaves[1].log()
    );
    // It only finished what it was running (0.4 s atoms), it did not work through the queue.
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "drain took {:?}",
        t0.elapsed()
    );
    let build = wait_final(&mut b, id).await;
    assert_eq!(
        build.result,
        proto::BuildResult::NoFailures as i32,
        "{build:#?}"
    );
    check_archives(&mut b, id, |t| AtomExpect {
        console: String::new(),
        exit_code: 0,
        files: vec![("t".into(), format!("{t}\n").into_bytes())],
    })
    .await;
    let mut tokens: Vec<u32> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(|l| l.split('-').next().unwrap().parse().unwrap())
        .collect();
    tokens.sort();
    assert_eq!(
        tokens,
        (1..=24).collect::<Vec<u32>>(),
        "every atom ran exactly once"
    );
    let names: Vec<String> = cl
        .list_slaves(proto::ListSlavesRequest {})
        .await
        .unwrap()
        .into_inner()
        .slaves
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["slave-0"]);
    c.slaves.remove(1);
    c.stop();
}

/// A frozen slave (SIGSTOP) is declared lost after the heartbeat deadline and its work moves;
/// after SIGCONT its late results are ignored: every atom's result comes from one attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_slave_loses_its_work_and_its_late_results_are_ignored() {
    let c = Cluster::start_with(
        2,
        2,
        "heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 1500\n",
    )
    .await;
    let project = project_with(
        "Z:\n  commands: ['sleep 0.3', 'echo $T-$ISH_SLAVE_NAME > $ARTIFACT_DIR/t']\n  atomizers: [{T: 'seq 1 24'}]\n",
    );
    let (mut b, mut cl) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    wait_for(&mut b, id, Duration::from_secs(30), |b| {
        b.completed_atoms >= 4
    })
    .await;
    let frozen = c.slaves[1].pid();
    kill(frozen, Signal::SIGSTOP).unwrap();
    let t0 = Instant::now();
    // The master notices within the deadline and the build goes on without it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let names: Vec<String> = cl
            .list_slaves(proto::ListSlavesRequest {})
            .await
            .unwrap()
            .into_inner()
            .slaves
            .into_iter()
            .map(|s| s.name)
            .collect();
        if names == ["slave-0"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the frozen slave was not declared lost"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "declared lost after {:?}",
        t0.elapsed()
    );
    let build = wait_final(&mut b, id).await;
    kill(frozen, Signal::SIGCONT).unwrap();
    assert_eq!(
        build.result,
        proto::BuildResult::NoFailures as i32,
        "{build:#?}"
    );
    // Let the thawed slave send its late results and reconnect; nothing may change.
    let before = subjobs(&mut b, id).await;
    c.wait_slaves(2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        subjobs(&mut b, id).await,
        before,
        "late results changed the build"
    );
    let moved: Vec<&proto::Subjob> = before.iter().filter(|s| s.attempts >= 2).collect();
    assert!(
        !moved.is_empty(),
        "the frozen slave's subjobs were dispatched again"
    );
    for s in &moved {
        assert!(s.atoms.iter().all(|a| a.slave == "slave-0"), "{s:?}");
    }
    check_archives(&mut b, id, |t| {
        AtomExpect {
            console: String::new(),
            exit_code: 0,
            // Which slave ran it is in the file; read it back from the recorded atom instead.
            files: vec![("t".into(), Vec::new())],
        }
        .with_file_from_slave(t, &before)
    })
    .await;
    c.stop();
}

/// kill -9 of the master at five points of one 200-atom build across three slaves (right after
/// submission, at about 25, 50 and 75 %, and once every atom is done): the build finishes with
/// correct archives and every atom ran exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_killed_at_five_points_of_a_200_atom_build() {
    let mut c = Cluster::start_with(3, 2, "resume_grace_ms = 3000\n").await;
    let marker = tempfile::tempdir().unwrap();
    let runs = marker.path().join("runs");
    let project = project_with(&format!(
        "P:\n  commands: ['sleep 0.05', 'echo $T >> {}', 'echo $T > $ARTIFACT_DIR/t', 'echo atom $T']\n  atomizers: [{{T: 'seq 1 200'}}]\n",
        runs.display()
    ));
    let (mut b, _) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    for (i, at) in [0u32, 50, 100, 150, 200].into_iter().enumerate() {
        if at > 0 {
            wait_for(&mut b, id, Duration::from_secs(120), |b| {
                b.completed_atoms >= at || is_final(b)
            })
            .await;
        }
        c.crash_and_restart_master(Duration::from_millis(200 + 100 * i as u64));
        b = c.clients().await.0;
    }
    let build = wait_final(&mut b, id).await;
    if state(&build) != proto::BuildState::Finished {
        let path = std::env::temp_dir().join("ish-five-points.log");
        std::fs::write(&path, c.logs()).unwrap();
        panic!("{build:#?}\nevery process's log is in {}", path.display());
    }
    assert_eq!(
        (build.num_atoms, build.result),
        (200, proto::BuildResult::NoFailures as i32)
    );
    check_archives(&mut b, id, |t| AtomExpect {
        console: format!("atom {t}\n"),
        exit_code: 0,
        files: vec![("t".into(), format!("{t}\n").into_bytes())],
    })
    .await;
    let mut lines: Vec<u32> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        (1..=200).collect::<Vec<u32>>(),
        "every atom ran exactly once"
    );
    c.stop();
}

/// The gateway rides out a master restart: 503 with a JSON error while the master is down, the
/// same builds and states once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_answers_503_while_the_master_restarts() {
    let mut c = Cluster::start(1, 1).await;
    let (gw, mut gw_proc) = c.start_gateway();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().build().unwrap();
    let project = project_with("G:\n  commands: ['true']\n  atomizers: [{V: 'seq 2'}]\n");
    let (mut b, _) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    let before = wait_final(&mut b, id).await;
    let get = |url: String| {
        let http = http.clone();
        async move {
            let r = http.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            (
                status,
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    let (status, v) = get(format!("{gw}/v1/build/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(v["build"]["status"], "FINISHED");
    let master_dir = c.dir.path().join("master");
    let addr = std::fs::read_to_string(master_dir.join("master.addr")).unwrap();
    assert_eq!(
        c.master
            .signal_and_wait(Signal::SIGKILL, Duration::from_secs(5)),
        None
    );
    let (status, v) = get(format!("{gw}/v1/build/{id}")).await;
    assert_eq!(status, 503, "{v}");
    assert!(v["error"].is_string(), "{v}");
    c.master = Proc::spawn(
        "master",
        &[
            "master",
            "--listen",
            addr.trim(),
            "--data-dir",
            master_dir.to_str().unwrap(),
        ],
        &c.secret,
        c.dir.path(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let v = loop {
        let (status, v) = get(format!("{gw}/v1/build/{id}")).await;
        if status == 200 {
            break v;
        }
        assert_eq!(status, 503, "only 503 while the master comes back: {v}");
        assert!(Instant::now() < deadline, "the gateway never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(v["build"]["status"], "FINISHED");
    assert_eq!(v["build"]["id"], id);
    let mut b = c.clients().await.0;
    assert_eq!(get_build_state(&mut b, id).await, state(&before));
    assert_eq!(
        gw_proc.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10)),
        Some(0)
    );
    c.stop();
}

async fn get_build_state(b: &mut ish_cli::local::BuildsClient, id: u64) -> proto::BuildState {
    state(&get(b, id).await)
}

/// What the load test saw.
#[derive(Default)]
struct LoadStats {
    accepted: Vec<u64>,
    submit_latency: Vec<Duration>,
    poll_latency: Vec<Duration>,
    /// (when, method, status or 0 for a transport error)
    failures: Vec<(Instant, &'static str, u16)>,
    finished: Vec<(u64, String)>,
}

fn percentile(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    if v.is_empty() {
        return 0.0;
    }
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize].as_secs_f64() * 1e3
}

/// 50 clients submit builds through the gateway and poll them for 60 s (ISH_LOAD_SECONDS) while
/// a slave is killed and restarted twice and the master once: no build is lost or duplicated,
/// every accepted build finishes, and no 5xx is seen outside the master's restart window.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_50_clients_through_slave_and_master_failures() {
    use std::sync::{Arc, Mutex};
    let seconds: u64 = std::env::var("ISH_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut c = Cluster::start_with(3, 2, "resume_grace_ms = 2000\n").await;
    let (gw, mut gw_proc) = c.start_gateway();
    let project = project_with(
        "L:\n  commands: ['echo $V > $ARTIFACT_DIR/v']\n  atomizers: [{V: 'seq 2'}]\n",
    );
    let body = serde_json::to_vec(&serde_json::json!({
        "type": "directory",
        "project_directory": project.path().display().to_string(),
    }))
    .unwrap();
    let digest = ish_core::auth::digest(&c.secret, &body);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let stats = Arc::new(Mutex::new(LoadStats::default()));
    let start = Instant::now();
    let stop_submitting = start + Duration::from_secs(seconds);
    let mut clients = Vec::new();
    for _ in 0..50 {
        let (http, gw, body, digest, stats) = (
            http.clone(),
            gw.clone(),
            body.clone(),
            digest.clone(),
            stats.clone(),
        );
        clients.push(tokio::spawn(async move {
            while Instant::now() < stop_submitting {
                let t0 = Instant::now();
                let r = http
                    .post(format!("{gw}/v1/build"))
                    .header("Clusterrunner-Message-Authentication-Digest", &digest)
                    .body(body.clone())
                    .send()
                    .await;
                let id = match r {
                    Ok(r) if r.status().as_u16() == 202 => {
                        let v: serde_json::Value = r.json().await.unwrap();
                        let id = v["build_id"].as_u64().unwrap();
                        let mut s = stats.lock().unwrap();
                        s.accepted.push(id);
                        s.submit_latency.push(t0.elapsed());
                        id
                    }
                    Ok(r) => {
                        stats.lock().unwrap().failures.push((
                            Instant::now(),
                            "POST",
                            r.status().as_u16(),
                        ));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Err(_) => {
                        stats
                            .lock()
                            .unwrap()
                            .failures
                            .push((Instant::now(), "POST", 0));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Poll until the build ends (bounded).
                let give_up = Instant::now() + Duration::from_secs(120);
                loop {
                    assert!(Instant::now() < give_up, "build {id} never ended");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let t0 = Instant::now();
                    match http.get(format!("{gw}/v1/build/{id}")).send().await {
                        Ok(r) if r.status().is_success() => {
                            let v: serde_json::Value = r.json().await.unwrap();
                            stats.lock().unwrap().poll_latency.push(t0.elapsed());
                            let st = v["build"]["status"].as_str().unwrap_or("").to_string();
                            if matches!(st.as_str(), "FINISHED" | "ERROR" | "CANCELED") {
                                let res = v["build"]["result"].as_str().unwrap_or("").to_string();
                                stats
                                    .lock()
                                    .unwrap()
                                    .finished
                                    .push((id, format!("{st}/{res}")));
                                break;
                            }
                        }
                        Ok(r) => stats.lock().unwrap().failures.push((
                            Instant::now(),
                            "GET",
                            r.status().as_u16(),
                        )),
                        Err(_) => stats
                            .lock()
                            .unwrap()
                            .failures
                            .push((Instant::now(), "GET", 0)),
                    }
                }
            }
        }));
    }
    // Chaos, at fixed fractions of the run.
    let at = |f: f64| start + Duration::from_secs_f64(seconds as f64 * f);
    let sleep_until = |t: Instant| tokio::time::sleep_until(t.into());
    sleep_until(at(0.15)).await;
    kill(c.slaves[0].pid(), Signal::SIGKILL).unwrap();
    c.slaves[0].wait_exit(Duration::from_secs(5));
    sleep_until(at(0.25)).await;
    c.slaves[0] = c.spawn_slave(0, 2, "slave-0-b");
    sleep_until(at(0.4)).await;
    let master_down = Instant::now();
    c.crash_and_restart_master(Duration::from_secs(1));
    let master_up = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{gw}/v1/build")).send().await
                && r.status().is_success()
            {
                break Instant::now();
            }
            assert!(Instant::now() < deadline, "the master did not come back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    sleep_until(at(0.6)).await;
    kill(c.slaves[1].pid(), Signal::SIGKILL).unwrap();
    c.slaves[1].wait_exit(Duration::from_secs(5));
    sleep_until(at(0.7)).await;
    c.slaves[1] = c.spawn_slave(1, 2, "slave-1-b");
    for t in clients {
        t.await.unwrap();
    }
    let elapsed = start.elapsed();
    let mut s = Arc::try_unwrap(stats).ok().unwrap().into_inner().unwrap();
    // No duplicates, nothing lost: every accepted build ended, and finished without failures.
    let mut ids = s.accepted.clone();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        s.accepted.len(),
        "a build id was handed out twice"
    );
    assert_eq!(
        s.finished.len(),
        s.accepted.len(),
        "some accepted builds never ended"
    );
    let bad: Vec<&(u64, String)> = s
        .finished
        .iter()
        .filter(|(_, r)| r != "FINISHED/NO_FAILURES")
        .collect();
    assert!(
        bad.is_empty(),
        "builds that did not finish cleanly: {bad:?}"
    );
    // The master knows exactly the accepted builds, plus at most the POSTs cut off by its crash.
    let (mut b, _) = c.clients().await;
    let total = b
        .list(proto::ListBuildsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .total as usize;
    let window = |t: &Instant| *t >= master_down && *t <= master_up + Duration::from_secs(1);
    let cut_posts = s
        .failures
        .iter()
        .filter(|(t, m, _)| *m == "POST" && window(t))
        .count();
    assert!(
        total >= s.accepted.len() && total <= s.accepted.len() + cut_posts,
        "master has {total} builds, {} accepted, {cut_posts} submissions cut by the restart",
        s.accepted.len()
    );
    // Errors only while the master was down.
    let outside: Vec<&(Instant, &str, u16)> =
        s.failures.iter().filter(|(t, _, _)| !window(t)).collect();
    assert!(
        outside.is_empty(),
        "{} failures outside the master's restart window: {:?}",
        outside.len(),
        outside
            .iter()
            .map(|(t, m, c)| (t.duration_since(start), *m, *c))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "load: {} builds in {:.1} s = {:.1} builds/s; POST p50 {:.1} ms p99 {:.1} ms; GET p50 {:.1} ms p99 {:.1} ms; {} requests refused during the {:.1} s master restart window",
        s.accepted.len(),
        elapsed.as_secs_f64(),
        s.accepted.len() as f64 / elapsed.as_secs_f64(),
        percentile(&mut s.submit_latency, 50.0),
        percentile(&mut s.submit_latency, 99.0),
        percentile(&mut s.poll_latency, 50.0),
        percentile(&mut s.poll_latency, 99.0),
        s.failures.len(),
        (master_up - master_down).as_secs_f64() + 1.0,
    );
    assert_eq!(
        gw_proc.signal_and_wait(Signal::SIGTERM, Duration::from_secs(10)),
        Some(0)
    );
    c.stop();
}

/// With real binaries: a slave whose setup fails is kept out of that build (the other slave runs
/// everything) and stays connected; an atom over its timeout is killed and recorded; an atom that
/// fails once is rerun and reported flaky; a build over its timeout ends in ERROR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_exclusion_timeouts_and_flaky_atoms_with_real_binaries() {
    let c = Cluster::start(2, 2).await;
    let marker = tempfile::tempdir().unwrap();
    let m = marker.path().display().to_string();
    let project = project_with(&format!(
        "X:\n  retries: 1\n  atom_timeout: 2\n  setup_build: ['test \"$ISH_SLAVE_NAME\" != slave-1']\n  commands: ['echo $V > $ARTIFACT_DIR/v', 'if [ $V = slow ]; then sleep 30; fi', 'if [ $V = flaky ] && [ ! -f {m}/once ]; then touch {m}/once; exit 1; fi']\n  atomizers: [{{V: 'printf \"a\\nb\\nflaky\\nslow\\nc\\nd\\n\"'}}]\n"
    ));
    let (mut b, mut cl) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished, "{build:#?}");
    assert_eq!(
        (build.failed_atom_count, build.flaky_atom_count),
        (1, 1),
        "{build:#?}"
    );
    let atoms: Vec<proto::Atom> = subjobs(&mut b, id)
        .await
        .into_iter()
        .flat_map(|s| s.atoms)
        .collect();
    assert!(
        atoms.iter().all(|a| a.slave == "slave-0"),
        "slave-1 failed setup and got no atom"
    );
    let slow = atoms
        .iter()
        .find(|a| a.command_string.contains("slow"))
        .unwrap();
    assert!(slow.timed_out && slow.tries == 2, "{slow:?}");
    let flaky = atoms
        .iter()
        .find(|a| a.command_string.contains("flaky"))
        .unwrap();
    assert!(
        flaky.flaky && flaky.tries == 2 && flaky.exit_code == Some(0),
        "{flaky:?}"
    );
    assert_eq!(
        cl.list_slaves(proto::ListSlavesRequest {})
            .await
            .unwrap()
            .into_inner()
            .slaves
            .len(),
        2
    );
    // A build over its build_timeout.
    write_job(
        project.path(),
        "Y:\n  build_timeout: 2\n  commands: ['sleep 30']\n  atomizers: [{V: 'seq 2'}]\n",
    );
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Error);
    assert!(
        build.error_message.contains("build_timeout of 2 s"),
        "{}",
        build.error_message
    );
    c.stop();
}

/// Queue dispatch with timing history sends short atoms in batches; a slave killed while it runs
/// a batch loses nothing: each atom's console and artifact exactly once, in its own directory.
/// On slave-1 every atom past the first of its subjob (`ATOM_ID` ≥ 1) waits for a release file,
/// so the kill comes at a moment the master's API shows slave-1 running a subjob of several atoms
/// and slave-1 is inside it: no timing decides whether a batch was cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_slave_mid_batch_loses_nothing() {
    let mut c = Cluster::start(2, 2).await;
    let marker = tempfile::tempdir().unwrap();
    let go = marker.path().join("go");
    let started = marker.path().join("started");
    let job = |wait: bool| {
        format!(
            "K:\n  commands: [{}'echo $T > $ARTIFACT_DIR/t', 'echo done $T']\n  atomizers: [{{T: 'seq 1 400'}}]\n",
            if wait {
                format!(
                    "'if [ $ATOM_ID -ge 1 ] && [ $ISH_SLAVE_NAME = slave-1 ]; then echo $T >> {}; while [ ! -e {} ]; do sleep 0.02; done; fi', ",
                    started.display(),
                    go.display()
                )
            } else {
                String::new()
            }
        )
    };
    let project = project_with(&job(false));
    let (mut b, _) = c.clients().await;
    // The first build records the atoms' times (the command string is the key, not the commands).
    let first = submit(&mut b, dir_request(project.path())).await;
    let first = wait_final(&mut b, first).await;
    assert_eq!(first.result, proto::BuildResult::NoFailures as i32);
    assert_eq!(first.num_subjobs, 400, "no history: one atom per subjob");
    write_job(project.path(), &job(true));
    let id = submit(&mut b, dir_request(project.path())).await;
    // Wait until slave-1 provably holds a batch: the master lists a running subjob of several
    // atoms on it, and its second atom has started on slave-1 (it now waits for `go`).
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = loop {
        let sjs = subjobs(&mut b, id).await;
        let starts = std::fs::read_to_string(&started).unwrap_or_default();
        let held = sjs.iter().find(|s| {
            s.slave == "slave-1"
                && s.state == proto::SubjobState::Running as i32
                && s.atoms.len() > 1
                && starts
                    .lines()
                    .any(|l| l == token(&s.atoms[1].command_string))
        });
        if let Some(s) = held {
            break s.id;
        }
        assert!(
            Instant::now() < deadline,
            "slave-1 never ran a batch: {sjs:#?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    kill(c.slaves[1].pid(), Signal::SIGKILL).unwrap();
    c.slaves[1].wait_exit(Duration::from_secs(5));
    std::fs::write(&go, b"").unwrap();
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished, "{build:#?}");
    assert_eq!(build.result, proto::BuildResult::NoFailures as i32);
    assert!(
        build.num_subjobs < 400,
        "{} subjobs: no batches",
        build.num_subjobs
    );
    assert_eq!(build.completed_atoms, 400);
    check_archives(&mut b, id, |t| AtomExpect {
        console: format!("done {t}\n"),
        exit_code: 0,
        files: vec![("t".into(), format!("{t}\n").into_bytes())],
    })
    .await;
    let sjs = subjobs(&mut b, id).await;
    let again = sjs.iter().find(|s| s.id == held).unwrap();
    assert!(
        again.attempts >= 2 && again.atoms.len() > 1,
        "a batch the killed slave was running was dispatched again: {again:#?}"
    );
    c.slaves.remove(1);
    c.stop();
}

/// A slave started with a relative `--data-dir` from some working directory: its atoms (which
/// run in the project directory) get an absolute `$ARTIFACT_DIR` under that working directory,
/// write their artifacts there, and the artifacts arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_with_a_relative_data_dir_runs_atoms_whose_artifacts_arrive() {
    let mut c = Cluster::start(0, 1).await;
    let cwd = tempfile::tempdir().unwrap();
    let slave = Proc::spawn_in(
        "slave-rel",
        &[
            "slave",
            "--master",
            &c.url,
            "--executors",
            "2",
            "--data-dir",
            "rel/data",
            "--name",
            "slave-rel",
        ],
        &c.secret,
        c.dir.path(),
        cwd.path(),
    );
    c.slaves.push(slave);
    c.wait_slaves(1).await;
    let project = project_with(
        "R:\n  commands: ['echo $T > $ARTIFACT_DIR/t', 'echo \"$ARTIFACT_DIR\" > $ARTIFACT_DIR/dir', 'echo ok $T']\n  atomizers: [{T: 'seq 1 4'}]\n",
    );
    let (mut b, _) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(
        build.result,
        proto::BuildResult::NoFailures as i32,
        "{build:#?}\n{}",
        c.logs()
    );
    let zip = zip_files(&download(&mut b, id, proto::ArchiveFormat::Zip).await);
    let data = cwd.path().join("rel/data");
    let mut seen = 0;
    for (name, content) in &zip {
        if name.ends_with("/dir") {
            let dir = String::from_utf8_lossy(content);
            assert!(
                dir.trim().starts_with(&data.display().to_string()),
                "$ARTIFACT_DIR {dir} is not under {}",
                data.display()
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 4, "{:?}", zip.keys());
    for sj in subjobs(&mut b, id).await {
        for a in &sj.atoms {
            let t = token(&a.command_string);
            let dir = format!("artifact_{}_{}", sj.id, a.id);
            assert_eq!(zip[&format!("{dir}/t")], format!("{t}\n").into_bytes());
        }
    }
    c.stop();
}

/// Processes an atom started in a new session (`setsid`) and through a double fork (their parent
/// gone, so they are nobody's descendants) are killed when the atom ends, when it is killed for
/// its timeout, and when its slave dies: an atom's processes never outlive it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_an_atom_started_with_setsid_or_a_double_fork_do_not_outlive_it() {
    let mut c = Cluster::start(1, 2).await;
    let marker = tempfile::tempdir().unwrap();
    let m = marker.path().display().to_string();
    let project = project_with(&format!(
        "S:\n  commands: ['setsid sh -c \"echo \\$\\$ > {m}/pid_s$T; exec sleep 300\" & (setsid sh -c \"sleep 300 & echo \\$! > {m}/pid_d$T\" &); while [ ! -s {m}/pid_s$T ] || [ ! -s {m}/pid_d$T ]; do sleep 0.01; done', 'echo started $T']\n  atomizers: [{{T: 'seq 1 2'}}]\n"
    ));
    let (mut b, _) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(
        build.result,
        proto::BuildResult::NoFailures as i32,
        "{build:#?}"
    );
    let pids = pids_in(marker.path());
    assert_eq!(pids.len(), 4, "{pids:?}");
    // The atoms' results are recorded after their processes are gone: no waiting here.
    let alive: Vec<&i32> = pids.iter().filter(|p| !process_gone(**p)).collect();
    for p in &alive {
        let _ = kill(nix::unistd::Pid::from_raw(**p), Signal::SIGKILL);
    }
    assert!(
        alive.is_empty(),
        "outlived their atoms: {alive:?} of {pids:?}"
    );

    // Killed for its timeout: the same.
    let marker = tempfile::tempdir().unwrap();
    let m = marker.path().display().to_string();
    write_job(
        project.path(),
        &format!(
            "S:\n  atom_timeout: 3\n  commands: ['setsid sh -c \"echo \\$\\$ > {m}/pid_s$T; exec sleep 300\" & (setsid sh -c \"sleep 300 & echo \\$! > {m}/pid_d$T\" &); sleep 300']\n  atomizers: [{{T: 'seq 1 2'}}]\n"
        ),
    );
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(build.failed_atom_count, 2, "{build:#?}");
    let pids = pids_in(marker.path());
    assert_eq!(pids.len(), 4, "{pids:?}");
    let alive: Vec<&i32> = pids.iter().filter(|p| !process_gone(**p)).collect();
    for p in &alive {
        let _ = kill(nix::unistd::Pid::from_raw(**p), Signal::SIGKILL);
    }
    assert!(
        alive.is_empty(),
        "outlived their timed-out atoms: {alive:?} of {pids:?}"
    );

    // The slave killed -9 mid-atom: its atoms' processes are stopped too (TERM, KILL after
    // kill_grace_ms), their work is run again elsewhere.
    let marker = tempfile::tempdir().unwrap();
    let m = marker.path().display().to_string();
    write_job(
        project.path(),
        &format!(
            "S:\n  commands: ['setsid sh -c \"trap \\\"\\\" TERM; echo \\$\\$ > {m}/pid_s$T; while :; do sleep 0.1; done\" & echo $$ > {m}/pid_m$T; sleep 300']\n  atomizers: [{{T: 'seq 1 2'}}]\n"
        ),
    );
    let id = submit(&mut b, dir_request(project.path())).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids_in(marker.path()).len() < 4 {
        assert!(Instant::now() < deadline, "the atoms did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pids = pids_in(marker.path());
    kill(c.slaves[0].pid(), Signal::SIGKILL).unwrap();
    c.slaves[0].wait_exit(Duration::from_secs(5));
    // One process ignores TERM: it is killed (KILL) with the rest once the atom's shell is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut alive: Vec<i32> = pids.clone();
    while !alive.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        alive.retain(|p| !process_gone(*p));
    }
    for p in &alive {
        let _ = kill(nix::unistd::Pid::from_raw(*p), Signal::SIGKILL);
    }
    assert!(
        alive.is_empty(),
        "outlived their killed slave: {alive:?} of {pids:?}"
    );
    let (mut cl_b, _) = c.clients().await;
    let _ = cl_b
        .cancel(proto::CancelBuildRequest { build_id: id })
        .await;
    c.slaves.clear();
    c.stop();
}

/// Reads the whole console of one atom through the API.
async fn console_of(
    b: &mut ish_cli::local::BuildsClient,
    id: u64,
    subjob: u32,
    atom: u32,
) -> String {
    b.get_console(proto::GetConsoleRequest {
        build_id: id,
        subjob_id: subjob,
        atom_id: atom,
        max_lines: 10_000,
        offset_line: Some(0),
    })
    .await
    .unwrap()
    .into_inner()
    .content
}

/// An artifact over `max_artifact_bytes_per_atom` is cut short by the master's refusal: it is
/// left out of the results (a truncated file would look whole), the files that arrived whole
/// are kept, the console says what happened, and the atom is a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_cut_by_the_size_limit_is_left_out_with_a_note() {
    let c = Cluster::start_with(1, 1, "max_artifact_bytes_per_atom = 300000\n").await;
    let project = project_with(
        "A:\n  commands: ['echo small > $ARTIFACT_DIR/a.txt', 'head -c 1000000 /dev/zero > $ARTIFACT_DIR/big.bin', 'echo printed $T']\n  atomizers: [{T: 'seq 1'}]\n",
    );
    let (mut b, _) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished, "{build:#?}");
    assert_eq!(build.failed_atom_count, 1, "{build:#?}");
    let zip = zip_files(&download(&mut b, id, proto::ArchiveFormat::Zip).await);
    let names: Vec<&String> = zip.keys().collect();
    assert!(
        !zip.contains_key("artifact_0_0/big.bin"),
        "a cut file is in the results: {names:?}"
    );
    assert_eq!(
        zip.get("artifact_0_0/a.txt").map(Vec::as_slice),
        Some(&b"small\n"[..]),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|n| n.contains(".ish-upload-manifest")),
        "{names:?}"
    );
    let console = console_of(&mut b, id, 0, 0).await;
    assert!(console.contains("printed 1"), "{console}");
    assert!(
        console.contains("max_artifact_bytes_per_atom"),
        "the console says why: {console}"
    );
    assert!(
        console.contains("\"big.bin\" (1000000 bytes) is not in the results"),
        "the console names the file left out: {console}"
    );
    assert_eq!(
        String::from_utf8_lossy(&zip["artifact_0_0/clusterrunner_console_output"]),
        console
    );
    c.stop();
}

/// Artifact names that are not UTF-8 (protobuf strings must be) are kept under a name with each
/// invalid byte written %XX, with a note in the console; nothing is dropped silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_whose_name_is_not_utf8_is_kept_under_an_escaped_name() {
    let c = Cluster::start(1, 1).await;
    let project = project_with(
        "U:\n  commands: ['mkdir -p $ARTIFACT_DIR/d', 'echo one > \"$ARTIFACT_DIR/$(printf ''bad\\377name'')\"', 'echo two > \"$ARTIFACT_DIR/d/$(printf ''x\\300y.txt'')\"', 'echo fine > $ARTIFACT_DIR/ok.txt']\n  atomizers: [{T: 'seq 1'}]\n",
    );
    let (mut b, _) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(
        build.result,
        proto::BuildResult::NoFailures as i32,
        "{build:#?}"
    );
    let zip = zip_files(&download(&mut b, id, proto::ArchiveFormat::Zip).await);
    let names: Vec<&String> = zip.keys().collect();
    assert_eq!(
        zip.get("artifact_0_0/bad%FFname").map(Vec::as_slice),
        Some(&b"one\n"[..]),
        "{names:?}"
    );
    assert_eq!(
        zip.get("artifact_0_0/d/x%C0y.txt").map(Vec::as_slice),
        Some(&b"two\n"[..]),
        "{names:?}"
    );
    assert_eq!(
        zip.get("artifact_0_0/ok.txt").map(Vec::as_slice),
        Some(&b"fine\n"[..])
    );
    let console = console_of(&mut b, id, 0, 0).await;
    assert!(
        console.contains("is in the results as \"bad%FFname\"")
            && console.contains("is in the results as \"d/x%C0y.txt\""),
        "{console}"
    );
    c.stop();
}

/// The benchmark suite in its small form, as CI's smoke test: every benchmark runs end to end
/// with its correctness checks (each atom ran once, consoles arrive whole, builds finish); the
/// figures are printed, never asserted (speed is measured by `ish bench suite` itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_suite_runs_in_its_quick_form() {
    let child = tokio::process::Command::new(ISH)
        .args(["bench", "suite", "--quick"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .expect("the quick suite finishes within 5 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "ish bench suite --quick failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in [
        "| B1 100 atoms of `true`",
        "| B1 xargs -P 8 floor",
        "| B1 ratio to the floor",
        "| B1 again with timing history",
        "| B1 ratio to the floor, with timing history",
        "| B2 40 skewed atoms, 8 executors, queue dispatch",
        "| B2 40 skewed atoms, 8 executors, ClusterRunner grouping",
        "| B3 20 simulated slaves × 4, 2000 zero-work atoms: dispatches/s",
        "| B3 offered load: dispatch latency p99",
        "| B3 master peak RSS",
        "| B4 console of one atom writing 5 MB",
        "| B4 slave peak RSS",
        "| B5 submit → first atom running, p99 of 5",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in:\n{stdout}");
    }
}

/// The slave names its upload manifest, the master recognizes it: the two must agree.
#[test]
fn slave_and_master_agree_on_the_upload_manifest_name() {
    assert_eq!(
        ish_slave::UPLOAD_MANIFEST,
        ish_master::results::UPLOAD_MANIFEST
    );
}
