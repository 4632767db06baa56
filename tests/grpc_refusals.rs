//! Refusals of the gRPC API (Builds and Cluster services) with their status codes, against a
//! real master of an in-process cluster (`support::cluster::Local`, no gateway).
//!
//! A case lives here when what it checks is the gRPC answer itself: INVALID_ARGUMENT with the
//! field named for every malformed BuildRequest (sources, paths, NULs, inline configs, atom
//! counts, env names and sizes, remote_files), NOT_FOUND for unknown ids on every call and
//! stream, FAILED_PRECONDITION and OUT_OF_RANGE for archives and consoles of a real build, and
//! UNAUTHENTICATED for every way of presenting the secret wrongly. Limits are checked at the
//! limit too: those builds must be accepted and run. The same cluster then runs a normal build.
//! REST refusals are in `rest_refusals.rs`; the slave-link service is in `slave_protocol.rs`.
mod support;

use ish_cli::local::BuildsClient;
use ish_core::auth::SecretInterceptor;
use ish_core::proto;
use serde_json::json;
use std::path::Path;
use std::time::Duration;
use support::checks::Failures;
use support::cluster::Local;
use support::jobs::*;
use support::*;
use tonic::Code;
use tonic::transport::Channel;

fn with_config(project: &Path, config: &str) -> proto::BuildRequest {
    proto::BuildRequest {
        config_json: config.into(),
        ..dir_request(project)
    }
}

fn with_env(project: &Path, env: &[(String, String)]) -> proto::BuildRequest {
    proto::BuildRequest {
        config_json: simple_config().to_string(),
        env: env.iter().cloned().collect(),
        ..dir_request(project)
    }
}

async fn build_total(b: &mut BuildsClient) -> u32 {
    b.list(proto::ListBuildsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .total
}

/// GetConsole and TailConsole of an atom that does not exist: NOT_FOUND.
async fn unknown_console(
    f: &mut Failures,
    b: &mut BuildsClient,
    id: u64,
    subjob: u32,
    atom: u32,
    what: &str,
) {
    f.status(
        &format!("GetConsole of {what}"),
        b.get_console(proto::GetConsoleRequest {
            build_id: id,
            subjob_id: subjob,
            atom_id: atom,
            ..Default::default()
        })
        .await,
        Code::NotFound,
        None,
    );
    f.status(
        &format!("TailConsole of {what}"),
        drain(
            b.tail_console(proto::TailConsoleRequest {
                build_id: id,
                subjob_id: subjob,
                atom_id: atom,
                follow: true,
            })
            .await,
        )
        .await,
        Code::NotFound,
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_bad_requests_get_the_right_status_codes() {
    let env = Local::new(1, 2)
        .heartbeat_timeout_ms(60_000)
        .http_timeout(Duration::from_secs(60))
        .start()
        .await;
    let mut f = Failures::default();
    let project = project_with("J:\n  commands: ['echo $N']\n  atomizers: [{N: 'seq 2'}]\n");
    let p = project.path();
    let mut b = env.builds().await;
    let before = build_total(&mut b).await;
    let ia = Code::InvalidArgument;

    // Sources and directories.
    f.status(
        "Submit without a request",
        submit_raw(&mut b, None).await,
        ia,
        None,
    );
    let cases: Vec<(&str, proto::BuildRequest, Option<&str>)> = vec![
        ("no source", proto::BuildRequest::default(), None),
        (
            "a source without a kind",
            proto::BuildRequest {
                source: Some(proto::ProjectSource { kind: None }),
                ..Default::default()
            },
            None,
        ),
        (
            "an empty directory path",
            dir_request(Path::new("")),
            Some("project_directory"),
        ),
        (
            "a relative directory path",
            dir_request(Path::new("rel/dir")),
            Some("absolute"),
        ),
        (
            "an empty git url",
            git_request("", "master", ""),
            Some("url"),
        ),
        (
            "a git hash that is not hex",
            git_request("/tmp/r", "master", "xyz1234"),
            Some("hash"),
        ),
        (
            "a git hash of 6 digits",
            git_request("/tmp/r", "master", "abcdef"),
            Some("hash"),
        ),
        (
            "a branch starting with -",
            git_request("/tmp/r", "--upload-pack=evil", ""),
            None,
        ),
        // Issue 9.11: git would read these as options, or C calls would cut them at the NUL.
        (
            "a git url starting with -",
            git_request("-oProxyCommand=touch /tmp/pwned", "master", ""),
            Some("cannot start with '-'"),
        ),
        (
            "a git url of --upload-pack",
            git_request("--upload-pack=touch /tmp/pwned", "master", ""),
            Some("cannot start with '-'"),
        ),
        (
            "a NUL in a directory path",
            dir_request(Path::new("/tmp/a\0b")),
            Some("NUL"),
        ),
        (
            "a NUL in a git project_directory",
            proto::BuildRequest {
                project_directory: "sub\0dir".into(),
                ..git_request("/tmp/r", "master", "")
            },
            Some("NUL"),
        ),
        (
            "a NUL in a git url",
            git_request("/tmp/r\0x", "master", ""),
            Some("NUL"),
        ),
        (
            "a NUL in a branch",
            git_request("/tmp/r", "mas\0ter", ""),
            Some("NUL"),
        ),
        (
            "a NUL in a job name",
            proto::BuildRequest {
                job_name: "J\0".into(),
                ..dir_request(p)
            },
            Some("NUL"),
        ),
    ];
    for (what, req, needle) in cases {
        f.status(what, submit_raw(&mut b, Some(req)).await, ia, needle);
    }
    for pd in ["../x", "a/../../x", "/abs", ".."] {
        let req = proto::BuildRequest {
            project_directory: pd.into(),
            ..git_request("/tmp/r", "master", "")
        };
        f.status(
            &format!("project_directory {pd:?}"),
            submit_raw(&mut b, Some(req)).await,
            ia,
            Some("project_directory"),
        );
    }

    // Inline configs.
    for (what, text, needle) in [
        (
            "config_json invalid JSON",
            "{\"commands\": ".to_string(),
            None,
        ),
        (
            "config_json a list",
            "[1]".to_string(),
            Some("not a dictionary"),
        ),
        (
            "config_json a string",
            "\"x\"".to_string(),
            Some("not a dictionary"),
        ),
        ("config_json null", "null".to_string(), None),
        (
            "config_json with trailing text",
            format!("{} x", simple_config()),
            None,
        ),
        (
            "config_json nested 100 levels deep",
            nested_config(100).to_string(),
            Some("nested too deeply"),
        ),
        (
            "config_json nested 100,000 levels deep",
            nested_config_text(100_000),
            None,
        ),
        (
            "config_json over 1 MiB",
            huge_config().to_string(),
            Some("1048576 bytes"),
        ),
        (
            "config_json without atomizers",
            "{\"commands\": [\"x\"]}".to_string(),
            Some("atomizers"),
        ),
    ] {
        f.status(
            what,
            submit_raw(&mut b, Some(with_config(p, &text))).await,
            ia,
            needle,
        );
    }

    // Atom counts.
    for n in [MAX_ATOMS + 1, 2 * MAX_ATOMS + 1] {
        let req = proto::BuildRequest {
            atoms_override: atoms(n),
            ..dir_request(p)
        };
        f.status(
            &format!("atoms_override of {n} entries"),
            submit_raw(&mut b, Some(req)).await,
            ia,
            Some("max_atoms_per_build"),
        );
    }
    // Atoms as a test suite's atomizer prints them (~50 bytes each): the count is what is wrong
    // with the request, whatever its size in bytes.
    let req = proto::BuildRequest {
        atoms_override: (0..2 * MAX_ATOMS + 1)
            .map(|i| format!("export TEST=\"tests/unit/module_{i:06}_test.py\";"))
            .collect(),
        ..dir_request(p)
    };
    f.status(
        "atoms_override of 200,001 test-file atoms (~10 MB)",
        submit_raw(&mut b, Some(req)).await,
        ia,
        Some("max_atoms_per_build"),
    );
    let req = proto::BuildRequest {
        atoms_override: vec!["export A=\"1\";".into(), "  ".into()],
        ..dir_request(p)
    };
    f.status(
        "a blank atom in atoms_override",
        submit_raw(&mut b, Some(req)).await,
        ia,
        None,
    );

    // Environment: names, count, sizes.
    for name in ["1X", "A-B", "", "A B", "A=B", "\u{c4}X", "X\0"] {
        f.status(
            &format!("env name {name:?}"),
            submit_raw(&mut b, Some(with_env(p, &[(name.into(), "v".into())]))).await,
            ia,
            Some("env"),
        );
    }
    let many: Vec<(String, String)> = (0..257).map(|i| (format!("V{i}"), "x".into())).collect();
    f.status(
        "env with 257 names",
        submit_raw(&mut b, Some(with_env(p, &many))).await,
        ia,
        Some("env"),
    );
    f.status(
        "an env value of 32 KiB + 1",
        submit_raw(
            &mut b,
            Some(with_env(p, &[("BIG".into(), "x".repeat((32 << 10) + 1))])),
        )
        .await,
        ia,
        Some("env"),
    );
    // 8 names of 2 bytes and values of 32766 bytes: exactly 256 KiB; one more byte is over.
    let exactly: Vec<(String, String)> = (0..8)
        .map(|i| (format!("V{i}"), "x".repeat((32 << 10) - 2)))
        .collect();
    let mut over = exactly.clone();
    over[0].1.push('x');
    f.status(
        "env of 256 KiB + 1 in all",
        submit_raw(&mut b, Some(with_env(p, &over))).await,
        ia,
        Some("env"),
    );

    // remote_files: traversal names and non-http URLs.
    for name in [
        "../x",
        "/etc/x",
        "a/../../x",
        "",
        "a//b",
        "./x",
        "a\\b",
        "..",
    ] {
        let req = proto::BuildRequest {
            remote_files: [(name.to_string(), "http://127.0.0.1:9/f".to_string())].into(),
            ..dir_request(p)
        };
        f.status(
            &format!("remote_files name {name:?}"),
            submit_raw(&mut b, Some(req)).await,
            ia,
            Some("remote_files"),
        );
    }
    for url in ["file:///etc/passwd", "ftp://127.0.0.1/x", "", "/etc/passwd"] {
        let req = proto::BuildRequest {
            remote_files: [("f".to_string(), url.to_string())].into(),
            ..dir_request(p)
        };
        f.status(
            &format!("remote_files URL {url:?}"),
            submit_raw(&mut b, Some(req)).await,
            ia,
            Some("remote_files"),
        );
    }
    let after = build_total(&mut b).await;
    f.check(after == before, || {
        format!("refused submits stored builds: {before} before, {after} after")
    });

    // The limits are exact: at them, builds are accepted and run.
    let at_limits: Vec<(&str, Vec<(String, String)>)> = vec![
        (
            "env with 256 names",
            (0..256).map(|i| (format!("V{i}"), "x".into())).collect(),
        ),
        (
            "an env value of 32 KiB",
            vec![("BIG".into(), "x".repeat(32 << 10))],
        ),
        ("env of exactly 256 KiB", exactly),
    ];
    for (what, vars) in at_limits {
        match submit_raw(&mut b, Some(with_env(p, &vars))).await {
            Ok(id) => {
                let build = wait_final(&mut b, id).await;
                f.check(
                    build.result == proto::BuildResult::NoFailures as i32,
                    || format!("{what}: the build did not pass: {build:#?}"),
                );
            }
            Err(e) => f.check(false, || format!("{what}: refused: {e:?}")),
        }
    }

    // Unknown ids.
    let nf = Code::NotFound;
    for id in [0, 999, u64::MAX] {
        f.status(
            &format!("Get {id}"),
            b.get(proto::GetBuildRequest { build_id: id }).await,
            nf,
            None,
        );
        f.status(
            &format!("Cancel {id}"),
            b.cancel(proto::CancelBuildRequest { build_id: id }).await,
            nf,
            None,
        );
        f.status(
            &format!("ListSubjobs {id}"),
            b.list_subjobs(proto::ListSubjobsRequest {
                build_id: id,
                ..Default::default()
            })
            .await,
            nf,
            None,
        );
        f.status(
            &format!("Watch {id}"),
            drain(b.watch(proto::WatchBuildRequest { build_id: id }).await).await,
            nf,
            None,
        );
        f.status(
            &format!("DownloadArtifacts {id}"),
            drain(
                b.download_artifacts(proto::DownloadArtifactsRequest {
                    build_id: id,
                    ..Default::default()
                })
                .await,
            )
            .await,
            nf,
            None,
        );
        unknown_console(&mut f, &mut b, id, 0, 0, &format!("build {id}")).await;
    }
    let (_, mut cl) = env.c.clients().await.unwrap();
    f.status(
        "DrainSlaves of an unknown slave",
        cl.drain_slaves(proto::DrainSlavesRequest {
            slave_ids: vec![999],
            all: false,
        })
        .await,
        nf,
        None,
    );

    // A running build: no artifacts yet; unknown subjob/atom; console offset past the end.
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("gate");
    let gated = with_config(
        p,
        &json!({"commands": [wait_for_gate(&gate), "echo \"out $X\""], "atomizers": [{"X": "echo 1"}]})
            .to_string(),
    );
    let id = submit_raw(&mut b, Some(gated)).await.expect("gated build");
    wait_for(&mut b, id, Duration::from_secs(60), |b| {
        state(b) == proto::BuildState::Building
    })
    .await;
    for format in [proto::ArchiveFormat::Zip, proto::ArchiveFormat::TarGz] {
        f.status(
            &format!("DownloadArtifacts ({format:?}) of a running build"),
            drain(
                b.download_artifacts(proto::DownloadArtifactsRequest {
                    build_id: id,
                    format: format as i32,
                    ..Default::default()
                })
                .await,
            )
            .await,
            Code::FailedPrecondition,
            None,
        );
    }
    std::fs::write(&gate, "").unwrap();
    let done = wait_final(&mut b, id).await;
    f.check(done.result == proto::BuildResult::NoFailures as i32, || {
        format!("the gated build did not pass: {done:#?}")
    });
    unknown_console(&mut f, &mut b, id, 99, 0, "an unknown subjob").await;
    unknown_console(&mut f, &mut b, id, 0, 99, "an unknown atom").await;
    f.status(
        "GetConsole past the end",
        b.get_console(proto::GetConsoleRequest {
            build_id: id,
            subjob_id: 0,
            atom_id: 0,
            max_lines: 5,
            offset_line: Some(1_000),
        })
        .await,
        ia,
        None,
    );
    f.status(
        "DownloadArtifacts past the end",
        drain(
            b.download_artifacts(proto::DownloadArtifactsRequest {
                build_id: id,
                offset: u64::MAX,
                ..Default::default()
            })
            .await,
        )
        .await,
        Code::OutOfRange,
        None,
    );

    // Without the secret, with a wrong one, or with a malformed header: UNAUTHENTICATED.
    let channel = Channel::from_shared(env.c.master_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let ua = Code::Unauthenticated;
    let mut bare = proto::builds_client::BuildsClient::new(channel.clone());
    f.status(
        "Get without the secret",
        bare.get(proto::GetBuildRequest { build_id: id }).await,
        ua,
        None,
    );
    f.status(
        "Submit without the secret",
        bare.submit(proto::SubmitBuildRequest {
            request: Some(dir_request(p)),
        })
        .await,
        ua,
        None,
    );
    let mut bare_cluster = proto::cluster_client::ClusterClient::new(channel.clone());
    f.status(
        "ListSlaves without the secret",
        bare_cluster.list_slaves(proto::ListSlavesRequest {}).await,
        ua,
        None,
    );
    for presented in [
        "wrong-secret-1234".to_string(),
        format!("{}x", env.c.secret),
        env.c.secret[..env.c.secret.len() - 1].to_string(),
    ] {
        let auth = SecretInterceptor::new(&presented).unwrap();
        let mut wrong =
            proto::builds_client::BuildsClient::with_interceptor(channel.clone(), auth.clone());
        f.status(
            "Get with a wrong secret",
            wrong.get(proto::GetBuildRequest { build_id: id }).await,
            ua,
            Some("wrong cluster secret"),
        );
        f.status(
            "Submit with a wrong secret",
            wrong
                .submit(proto::SubmitBuildRequest {
                    request: Some(dir_request(p)),
                })
                .await,
            ua,
            None,
        );
        let mut wrong_cluster =
            proto::cluster_client::ClusterClient::with_interceptor(channel.clone(), auth);
        f.status(
            "DrainSlaves with a wrong secret",
            wrong_cluster
                .drain_slaves(proto::DrainSlavesRequest {
                    slave_ids: vec![],
                    all: true,
                })
                .await,
            ua,
            None,
        );
    }
    for header in [
        format!("Basic {}", env.c.secret),
        format!("bearer {}", env.c.secret),
        env.c.secret.clone(),
        "Bearer ".to_string(),
    ] {
        let mut req = tonic::Request::new(proto::GetBuildRequest { build_id: id });
        req.metadata_mut()
            .insert("authorization", header.parse().unwrap());
        f.status(
            &format!(
                "Get with authorization {:?}",
                header.replace(&env.c.secret, "<secret>")
            ),
            bare.get(req).await,
            ua,
            None,
        );
    }
    let after = build_total(&mut b).await;
    f.check(after == before + 4, || {
        format!(
            "expected exactly the 4 accepted builds, got {} new",
            after - before
        )
    });
    f.check(env.slaves().await.len() == 1, || {
        "an unauthenticated drain drained the slave".into()
    });
    env.a_normal_build_runs(&mut f).await;
    env.c.shutdown().await.unwrap();
    f.finish();
}
