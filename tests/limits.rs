//! Limits that must hold against very large or hostile input, on real `ish` processes on
//! 127.0.0.1: message sizes between roles, connection floods, console reads in bounded memory,
//! bounded build records. Every process a test starts is stopped when the test ends.
mod support;

use ish_core::proto;
use std::time::Duration;
use support::procs::*;
use support::*;

/// A valid build far over tonic's default 4 MiB message (50,000 atoms, ~4.8 MB of atom strings
/// in the one Prepare message every slave gets) reaches the slaves whole: it runs on both
/// slaves without a session being dropped, and cancels cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50000_atom_build_reaches_the_slaves_whole() {
    let c = Cluster::start(2, 2).await;
    let project =
        project_with("J:\n  commands: ['test -n \"$T\"']\n  atomizers: [{T: 'seq 1 2'}]\n");
    let mut req = dir_request(project.path());
    req.atoms_override = (0..50_000)
        .map(|i| format!("export T=\"{i:0>80}\";"))
        .collect();
    let bytes: usize = req.atoms_override.iter().map(String::len).sum();
    assert!(bytes > 4 << 20, "{bytes} bytes: over tonic's default limit");
    let (mut b, mut cl) = c.clients().await;
    let id = submit(&mut b, req).await;
    let build = wait_for(&mut b, id, Duration::from_secs(60), |b| {
        b.completed_atoms >= 40 || is_final(b)
    })
    .await;
    assert_eq!(
        state(&build),
        proto::BuildState::Building,
        "{build:#?}\n{}",
        c.logs()
    );
    assert_eq!(build.num_atoms, 50_000);
    let sjs = subjobs(&mut b, id).await;
    let on: std::collections::BTreeSet<&str> = sjs
        .iter()
        .flat_map(|s| &s.atoms)
        .filter(|a| a.exit_code == Some(0))
        .map(|a| a.slave.as_str())
        .collect();
    assert_eq!(on.len(), 2, "atoms ran on both slaves: {on:?}");
    let slaves = cl
        .list_slaves(proto::ListSlavesRequest {})
        .await
        .unwrap()
        .into_inner()
        .slaves;
    assert_eq!(slaves.len(), 2);
    b.cancel(proto::CancelBuildRequest { build_id: id })
        .await
        .unwrap();
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Canceled, "{build:#?}");
    let logs = c.logs();
    for bad in ["message length too large", "session lost", "reconnect"] {
        assert!(!logs.to_lowercase().contains(bad), "{bad}:\n{logs}");
    }
    c.stop();
}

/// Peak resident memory of a process so far (VmHWM), in MiB.
fn peak_rss_mib(pid: nix::unistd::Pid) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

/// Console pages are read from the file in bounded memory: 48 concurrent 50-line reads of a
/// 60 MB console barely move the master's peak RSS (each read used to load the whole file), the
/// pages are right, and a page larger than one answer may carry is refused with a message that
/// says what to do instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_are_read_in_bounded_memory() {
    let c = Cluster::start(1, 1).await;
    // 600,000 lines of 100 bytes: "<6-digit line number>" + 93 x's + "\n".
    let project = project_with(
        "J:\n  commands: ['seq -f %06.0f 0 599999 | sed \"s/$/$(printf \"%093d\" 0 | tr 0 x)/\"']\n  atomizers: [{T: 'seq 1 1'}]\n",
    );
    let (mut b, _) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(
        build.result,
        proto::BuildResult::NoFailures as i32,
        "{build:#?}"
    );
    let sj = subjobs(&mut b, id).await.remove(0);
    let line = |i: u64| format!("{i:06}{}\n", "x".repeat(93));
    let req = |max_lines: u32, offset_line: Option<u64>| proto::GetConsoleRequest {
        build_id: id,
        subjob_id: sj.id,
        atom_id: sj.atoms[0].id,
        max_lines,
        offset_line,
    };

    let before = peak_rss_mib(c.master.pid());
    let mut reads = tokio::task::JoinSet::new();
    for i in 0..48u64 {
        let mut b = b.clone();
        let r = req(50, (i % 2 == 0).then_some(i * 10_000));
        reads.spawn(async move { (i, b.get_console(r).await.unwrap().into_inner()) });
    }
    while let Some(done) = reads.join_next().await {
        let (i, page) = done.unwrap();
        let first = if i % 2 == 0 { i * 10_000 } else { 600_000 - 50 };
        assert_eq!(page.offset_line, first);
        assert_eq!(page.num_lines, 50);
        assert_eq!(page.total_num_lines, 600_000);
        assert_eq!(
            page.content,
            (first..first + 50).map(line).collect::<String>()
        );
    }
    let after = peak_rss_mib(c.master.pid());
    println!(
        "master peak RSS: {before:.0} MiB before 48 concurrent page reads, {after:.0} MiB after"
    );
    assert!(
        after - before < 64.0,
        "48 page reads of a 60 MB console took the master from {before:.0} to {after:.0} MiB"
    );

    // The whole console in one page is more than one answer may carry.
    let err = b.get_console(req(u32::MAX, Some(0))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("max_lines") && err.message().contains("TailConsole"),
        "{err:?}"
    );
    // Past the end: the ClusterRunner message.
    let err = b.get_console(req(10, Some(600_001))).await.unwrap_err();
    assert_eq!(
        err.message(),
        "offset 600001 is higher than the total number of lines: 600000"
    );
    c.stop();
}
