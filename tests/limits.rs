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
