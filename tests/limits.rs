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

/// Open file descriptors of a process.
fn open_fds(pid: nix::unistd::Pid) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Three times more connections than the master has file descriptors, none of which ever
/// sends a byte, while a build runs: the master holds a bounded number of them, the build
/// finishes whole, a connected client is answered throughout, a new client gets in during the
/// flood, the descriptors come back after it, and SIGTERM still stops the master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_neither_exhausts_nor_wedges_the_master() {
    const NOFILE: u32 = 1024;
    const FLOOD: usize = 3 * NOFILE as usize;
    let c = Cluster::start_with_file_limit(NOFILE, "", 1, 2).await;
    let pid = c.master.pid();
    let addr = c.url.trim_start_matches("http://").to_string();
    let project = project_with(
        "F:\n  commands: ['sleep 0.25', 'echo $T > $ARTIFACT_DIR/t', 'echo done $T']\n  atomizers: [{T: 'seq 1 24'}]\n",
    );
    let (mut b, _) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    let fds_before = open_fds(pid);

    let mut flood = Vec::with_capacity(FLOOD);
    let mut refused = 0;
    let mut worst_call = Duration::ZERO;
    let mut peak_fds = 0;
    let started = std::time::Instant::now();
    for i in 0..FLOOD {
        let connect = tokio::net::TcpStream::connect(&addr);
        match tokio::time::timeout(Duration::from_millis(500), connect).await {
            Ok(Ok(s)) => flood.push(s),
            _ => refused += 1,
        }
        // A master that stopped accepting makes every connect wait: bound the flood's time.
        if started.elapsed() > Duration::from_secs(30) {
            break;
        }
        if i % 256 == 0 {
            // The connected client keeps being answered.
            let t = std::time::Instant::now();
            let got = tokio::time::timeout(Duration::from_secs(10), get(&mut b, id)).await;
            assert!(
                got.is_ok(),
                "the master stopped answering after {i} connections"
            );
            worst_call = worst_call.max(t.elapsed());
            peak_fds = peak_fds.max(open_fds(pid));
        }
    }
    // A new client gets in while the flood's connections are still open.
    let t = std::time::Instant::now();
    let (mut fresh, _) = tokio::time::timeout(Duration::from_secs(20), c.clients())
        .await
        .expect("a new client connects during the flood");
    get(&mut fresh, id).await;
    let new_client = t.elapsed();
    peak_fds = peak_fds.max(open_fds(pid));
    println!(
        "flood of {FLOOD} silent connections in {:.1?} ({refused} not accepted): master fds \
         {fds_before} before, peak {peak_fds} (limit {NOFILE}); worst call of a connected client \
         {worst_call:.1?}; new client in {new_client:.1?}",
        started.elapsed()
    );
    assert!(
        peak_fds < NOFILE as usize - 100,
        "the master held {peak_fds} descriptors of {NOFILE}"
    );

    let build = wait_final(&mut b, id).await;
    assert_eq!(
        state(&build),
        proto::BuildState::Finished,
        "{build:#?}\n{}",
        c.logs()
    );
    assert_eq!(build.result, proto::BuildResult::NoFailures as i32);
    check_archives(&mut b, id, |t| AtomExpect {
        console: format!("done {t}\n"),
        exit_code: 0,
        files: vec![("t".into(), format!("{t}\n").into_bytes())],
    })
    .await;

    drop(flood);
    // Descriptors come back once the flood is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while open_fds(pid) > fds_before + 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "the master still holds {} descriptors",
            open_fds(pid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = submit(&mut b, dir_request(project.path())).await;
    let again = wait_final(&mut b, again).await;
    assert_eq!(again.result, proto::BuildResult::NoFailures as i32);
    drop((b, fresh));
    c.stop();
}

/// When the master does run out of descriptors (here: a cap set above its file limit, and a
/// flood), the build whose files cannot be written ends in ERROR with the reason, the master
/// keeps answering, works again once the flood is gone, stops on SIGTERM, and the build's final
/// state is the same after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_errors_fail_the_build_cleanly_and_its_final_state_stays() {
    const NOFILE: u32 = 256;
    let mut c = Cluster::start_with_file_limit(
        NOFILE,
        "max_connections = 4000\nhandshake_timeout_ms = 120000\n",
        1,
        2,
    )
    .await;
    let pid = c.master.pid();
    let addr = c.url.trim_start_matches("http://").to_string();
    let project = project_with(
        "F:\n  commands: ['sleep 0.2', 'echo $T > $ARTIFACT_DIR/t', 'echo done $T']\n  atomizers: [{T: 'seq 1 30'}]\n",
    );
    let (mut b, _) = c.clients().await;
    let id = submit(&mut b, dir_request(project.path())).await;
    wait_for(&mut b, id, Duration::from_secs(30), |b| {
        b.completed_atoms >= 2
    })
    .await;
    let mut flood = Vec::new();
    while open_fds(pid) < NOFILE as usize - 2 && flood.len() < 4 * NOFILE as usize {
        let connect = tokio::net::TcpStream::connect(&addr);
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(500), connect).await {
            flood.push(s);
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(60), wait_final(&mut b, id))
        .await
        .expect("the master keeps answering while out of descriptors");
    assert_eq!(state(&ended), proto::BuildState::Error, "{ended:#?}");
    assert!(
        ended.error_message.contains("Too many open files"),
        "{ended:#?}"
    );
    drop(flood);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while open_fds(pid) > 64 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} fds",
            open_fds(pid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Working again: a new build passes, and a new client gets in.
    let next = submit(&mut b, dir_request(project.path())).await;
    let next = wait_final(&mut b, next).await;
    assert_eq!(
        next.result,
        proto::BuildResult::NoFailures as i32,
        "{next:#?}"
    );
    drop(b);
    let (mut b, _) = c.clients().await;
    assert_eq!(get(&mut b, id).await.state, ended.state);
    drop(b);

    c.crash_and_restart_master(Duration::ZERO);
    let (mut b, _) = c.clients().await;
    let after = get(&mut b, id).await;
    assert_eq!(
        (after.state, after.result, &after.error_message),
        (ended.state, ended.result, &ended.error_message),
        "a final build's state changed across a restart"
    );
    drop(b);
    c.stop();
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// A build's record holds its parameters, not the body's bytes: eight signed bodies padded
/// with 9 MiB of whitespace each barely grow the store and are echoed normalized (atoms
/// apart); and builds whose records together pass the message limit are still listed whole,
/// by gRPC in pages and by `GET /v1/build` in one answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_records_hold_parameters_not_bodies_and_every_listing_pages() {
    let c = Cluster::start(1, 2).await;
    let (gw, _gw_proc) = c.start_gateway();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let project = project_with("J:\n  commands: ['true']\n  atomizers: [{T: 'seq 1 1'}]\n");
    let dir = project.path().display().to_string();
    let db = c.dir.path().join("master").join("db");
    let before = dir_bytes(&db);
    let (mut b, _) = c.clients().await;
    let padding = " ".repeat(9 << 19);
    for i in 0..8 {
        let body = format!(
            "{{{padding}\"type\": \"directory\",{padding}\"project_directory\": \"{dir}\", \"atoms_override\": [\"export T=\\\"{i}\\\";\"]}}"
        );
        let r = http
            .post(format!("{gw}/v1/build"))
            .header(
                "Clusterrunner-Message-Authentication-Digest",
                ish_core::auth::digest(&c.secret, body.as_bytes()),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    }
    for id in 1..=8 {
        let build = wait_final(&mut b, id).await;
        assert_eq!(
            build.result,
            proto::BuildResult::NoFailures as i32,
            "{build:#?}"
        );
    }
    let grown = dir_bytes(&db).saturating_sub(before);
    println!(
        "store growth after 8 bodies padded to 9 MiB: {:.1} MiB",
        grown as f64 / 1048576.0
    );
    assert!(grown < 16 << 20, "the store grew by {grown} bytes");
    let listed: serde_json::Value = http
        .get(format!("{gw}/v1/build"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let builds = listed["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 8);
    for build in builds {
        let params = &build["request_params"];
        assert_eq!(params["type"], "directory", "{params}");
        assert_eq!(params["project_directory"], dir.as_str());
        assert!(params.get("atoms_override").is_none(), "{params}");
    }

    // 26 builds with a 0.95 MiB inline config each: their records (config and parameters, each
    // holding it) are about 75 MB in all, past the 64 MiB message limit.
    let long = "x".repeat(950 << 10);
    for _ in 0..26 {
        let mut req = dir_request(project.path());
        req.config_json =
            format!(r#"{{"commands": ["true # {long}"], "atomizers": [{{"T": "echo 1"}}]}}"#);
        req.job_name = "Big".into();
        submit(&mut b, req).await;
    }
    for id in 9..=34 {
        wait_final(&mut b, id).await;
    }
    let page = b
        .list(proto::ListBuildsRequest {
            offset: 0,
            limit: 0,
            unfinished_only: false,
        })
        .await
        .expect("a listing fits in one message")
        .into_inner();
    assert_eq!(page.total, 34);
    assert!(
        !page.builds.is_empty() && page.builds.len() < 34,
        "{} builds in one page",
        page.builds.len()
    );
    let r = http.get(format!("{gw}/v1/build")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let listed: serde_json::Value = r.json().await.unwrap();
    let ids: Vec<u64> = listed["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, (1..=34).collect::<Vec<_>>());
    drop(b);
    c.stop();
}

/// Range of an archive download: `length` bytes from `offset` (0: to the end).
async fn download_range(
    b: &mut ish_cli::local::BuildsClient,
    id: u64,
    format: proto::ArchiveFormat,
    offset: u64,
    length: u64,
) -> (u64, Vec<u8>) {
    use tokio_stream::StreamExt;
    let mut s = b
        .download_artifacts(proto::DownloadArtifactsRequest {
            build_id: id,
            format: format as i32,
            offset,
            length,
            size_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    let (mut total, mut out) = (0, Vec::new());
    while let Some(chunk) = s.next().await {
        let chunk = chunk.unwrap();
        total = chunk.total_size;
        out.extend_from_slice(&chunk.data);
    }
    (total, out)
}

/// A large console and artifact are kept once: a build whose atom prints 20 MB and leaves a
/// 4 MB artifact keeps little more than those 24 MB under its results directory (before: the
/// plain files plus a deflated copy in results.zip and another in results.tar.gz, ~60 MB),
/// and nothing is lost: both archives hold exactly what they held, every download of one is
/// the same bytes, a range of it is that range of the whole, and console pages still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_console_is_stored_once_and_every_archive_is_whole() {
    let c = Cluster::start(1, 1).await;
    // 15 MB of random bytes in base64: 20.2 MB of text that deflate shrinks to ~15 MB.
    let project = project_with(
        "J:\n  commands: ['head -c 15000000 /dev/urandom | base64 && head -c 4000000 /dev/urandom > $ARTIFACT_DIR/blob.bin']\n  atomizers: [{T: 'seq 1 1'}]\n",
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
    let results = c.dir.path().join("master/results").join(id.to_string());
    let atom = results.join("artifact_0_0");
    let console = std::fs::read(atom.join("clusterrunner_console_output")).unwrap();
    let blob = std::fs::read(atom.join("blob.bin")).unwrap();
    assert!(console.len() > 20_000_000, "{}", console.len());
    assert_eq!(blob.len(), 4_000_000);
    let kept = dir_bytes(&results);
    let payload = (console.len() + blob.len()) as u64;
    println!(
        "results of a build with a {:.1} MB console and a {:.1} MB artifact: {:.1} MB on disk ({:.2}x)",
        console.len() as f64 / 1e6,
        blob.len() as f64 / 1e6,
        kept as f64 / 1e6,
        kept as f64 / payload as f64
    );
    assert!(
        kept < payload + payload / 20,
        "{kept} bytes kept for {payload} bytes of console and artifact"
    );

    // Nothing lost: the archives' contents, exactly.
    let text = String::from_utf8(console.clone()).unwrap();
    check_archives(&mut b, id, |_| AtomExpect {
        console: text.clone(),
        exit_code: 0,
        files: vec![("blob.bin".into(), blob.clone())],
    })
    .await;
    for format in [proto::ArchiveFormat::Zip, proto::ArchiveFormat::TarGz] {
        let whole = download(&mut b, id, format).await;
        assert!(
            download(&mut b, id, format).await == whole,
            "{format:?}: two downloads differ"
        );
        let (total, _) = download_range(&mut b, id, format, 0, 1).await;
        assert_eq!(total, whole.len() as u64, "{format:?}: announced size");
        let n = whole.len() as u64;
        for (offset, length) in [(0, 1000), (n / 3, 300_000), (n - 5000, 0), (n - 1, 1)] {
            let (_, part) = download_range(&mut b, id, format, offset, length).await;
            let end = if length == 0 { n } else { offset + length };
            assert!(
                part == whole[offset as usize..end as usize],
                "{format:?}: bytes {offset}..{end} are not those of the whole archive"
            );
        }
    }

    // Console pages read from the one copy.
    let sj = subjobs(&mut b, id).await.remove(0);
    let page = b
        .get_console(proto::GetConsoleRequest {
            build_id: id,
            subjob_id: sj.id,
            atom_id: sj.atoms[0].id,
            max_lines: 3,
            offset_line: None,
        })
        .await
        .unwrap()
        .into_inner();
    let tail: Vec<&str> = text.lines().rev().take(3).collect();
    let want: String = tail.iter().rev().map(|l| format!("{l}\n")).collect();
    assert_eq!(page.content, want);
    c.stop();
}
