//! The slave protocol driven by hand: a fake slave speaks the real `SlaveLink` service
//! (`Session` and `UploadArtifacts` RPCs) of a real master in an in-process cluster
//! (`support::cluster::Local`).
//!
//! A case lives here when only a slave could send it: sessions that do not start with a
//! Register, uploads without or with a second header, for unknown or finished builds, with
//! hostile paths or for an attempt that is not the sender's own current one, and every slave-link
//! call without or with a wrong secret. The fake slave answers Prepare and Setup, receives a
//! RunSubjob and uploads for its real, current attempt, so each refusal is checked against an
//! attempt that would otherwise be accepted; no file may land outside the attempt directory.
//! Afterwards the real slave is unchanged (or a real slave joins) and a normal build runs.
mod support;

use ish_cli::local::LocalCluster;
use ish_core::proto::{
    self, artifact_chunk::Msg as Art, master_message::Msg as Down, slave_message::Msg as Up,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::checks::Failures;
use support::cluster::{Local, STEP, SlaveLinkClient};
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Opens a Session whose first messages are `first`; the stream stays open while the returned
/// sender lives. An error is the status of the call or of the first message down.
async fn session(
    link: &mut SlaveLinkClient,
    first: Vec<proto::SlaveMessage>,
    keep_open: bool,
) -> (
    Option<mpsc::Sender<proto::SlaveMessage>>,
    Result<(proto::MasterMessage, tonic::Streaming<proto::MasterMessage>), Status>,
) {
    let (tx, rx) = mpsc::channel(64);
    for m in first {
        tx.send(m).await.unwrap();
    }
    let tx = keep_open.then_some(tx);
    let r = match tokio::time::timeout(STEP, link.session(ReceiverStream::new(rx))).await {
        Err(_) => Err(Status::deadline_exceeded("no answer to Session in 20 s")),
        Ok(Err(e)) => Err(e),
        Ok(Ok(resp)) => {
            let mut s = resp.into_inner();
            match tokio::time::timeout(STEP, s.message()).await {
                Err(_) => Err(Status::deadline_exceeded("no first message in 20 s")),
                Ok(Err(e)) => Err(e),
                Ok(Ok(None)) => Err(Status::unknown("the session ended without a status")),
                Ok(Ok(Some(m))) => Ok((m, s)),
            }
        }
    };
    (tx, r)
}

fn register(name: &str, executors: u32) -> proto::SlaveMessage {
    proto::SlaveMessage {
        msg: Some(Up::Register(proto::Register {
            name: name.into(),
            executors,
            version: ish_core::VERSION.into(),
            session_id: format!("{name}-session"),
            ..Default::default()
        })),
    }
}

fn up(m: Up) -> proto::SlaveMessage {
    proto::SlaveMessage { msg: Some(m) }
}

fn header(slave: u64, build: u64, subjob: u32, atom: u32, attempt: u64) -> proto::ArtifactChunk {
    proto::ArtifactChunk {
        msg: Some(Art::Header(proto::UploadHeader {
            slave_id: slave,
            build_id: build,
            subjob_id: subjob,
            atom_id: atom,
            attempt,
        })),
    }
}

fn file(path: &str, data: &[u8], last: bool) -> proto::ArtifactChunk {
    proto::ArtifactChunk {
        msg: Some(Art::File(proto::FileChunk {
            path: path.into(),
            data: data.to_vec(),
            last,
        })),
    }
}

async fn upload(
    link: &mut SlaveLinkClient,
    chunks: Vec<proto::ArtifactChunk>,
) -> Result<proto::UploadReceipt, Status> {
    match tokio::time::timeout(STEP, link.upload_artifacts(tokio_stream::iter(chunks))).await {
        Err(_) => Err(Status::deadline_exceeded(
            "no answer to UploadArtifacts in 20 s",
        )),
        Ok(r) => r.map(tonic::Response::into_inner),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slave_protocol_refusals() {
    let env = Local::new(1, 2)
        .heartbeat_timeout_ms(60_000)
        .http_timeout(Duration::from_secs(60))
        .start()
        .await;
    let mut f = Failures::default();
    let ia = Code::InvalidArgument;
    let mut link = env.link(None).await;

    let heartbeat = up(Up::Heartbeat(proto::Heartbeat { sent_at: 1.0 }));
    let (_tx, r) = session(&mut link, vec![heartbeat.clone()], true).await;
    f.status(
        "a Session that starts with a Heartbeat",
        r,
        ia,
        Some("Register"),
    );
    let (_tx, r) = session(
        &mut link,
        vec![
            up(Up::GoingAway(proto::GoingAway {
                reason: "bye".into(),
            })),
            register("late", 1),
        ],
        true,
    )
    .await;
    f.status(
        "a Session that starts with GoingAway",
        r,
        ia,
        Some("Register"),
    );
    let (_tx, r) = session(&mut link, vec![proto::SlaveMessage { msg: None }], true).await;
    f.status("a Session that starts with an empty message", r, ia, None);
    let (_tx, r) = session(&mut link, vec![], false).await;
    f.status("a Session without any message", r, ia, None);
    let (_tx, r) = session(&mut link, vec![register("zero-executors", 0)], true).await;
    f.status("Register with 0 executors", r, ia, None);

    let mut b = env.builds().await;
    let sid = env.slaves().await[0].id;
    f.status(
        "an upload that starts with a file",
        upload(&mut link, vec![file("a.txt", b"x", true)]).await,
        ia,
        None,
    );
    f.status(
        "an upload that starts with an empty message",
        upload(&mut link, vec![proto::ArtifactChunk { msg: None }]).await,
        ia,
        None,
    );
    f.status("an empty upload", upload(&mut link, vec![]).await, ia, None);
    f.status(
        "an upload for an unknown build",
        upload(
            &mut link,
            vec![header(sid, 999, 0, 0, 1), file("a.txt", b"x", true)],
        )
        .await,
        Code::FailedPrecondition,
        None,
    );
    // A finished build: none of its attempts is current any more.
    let project = project_with("J:\n  commands: ['echo $N']\n  atomizers: [{N: 'seq 2'}]\n");
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished);
    let attempt = subjobs(&mut b, id).await[0].atoms[0].attempt;
    for (what, h) in [
        (
            "its own (completed) attempt",
            header(sid, id, 0, 0, attempt),
        ),
        (
            "an attempt that never existed",
            header(sid, id, 0, 0, 999_999),
        ),
        ("another slave's id", header(sid + 100, id, 0, 0, attempt)),
    ] {
        f.status(
            &format!("an upload for a finished build, {what}"),
            upload(&mut link, vec![h, file("late.txt", b"x", true)]).await,
            Code::FailedPrecondition,
            None,
        );
    }
    // Unauthenticated slave-link calls.
    for secret in [
        "wrong-secret-1234".to_string(),
        format!("{}x", env.c.secret),
    ] {
        let mut wrong = env.link(Some(&secret)).await;
        let (_tx, r) = session(&mut wrong, vec![register("intruder", 2)], true).await;
        f.status(
            "a Session with a wrong secret",
            r,
            Code::Unauthenticated,
            None,
        );
        f.status(
            "an upload with a wrong secret",
            upload(
                &mut wrong,
                vec![header(sid, id, 0, 0, attempt), file("x", b"x", true)],
            )
            .await,
            Code::Unauthenticated,
            None,
        );
    }
    let channel = Channel::from_shared(env.c.master_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut bare = proto::slave_link_client::SlaveLinkClient::new(channel);
    let r = tokio::time::timeout(
        STEP,
        bare.session(tokio_stream::iter(vec![register("anonymous", 2)])),
    )
    .await
    .expect("an answer to an unauthenticated Session");
    f.status(
        "a Session without the secret",
        r.map(|_| ()),
        Code::Unauthenticated,
        None,
    );
    let r = tokio::time::timeout(
        STEP,
        bare.upload_artifacts(tokio_stream::iter(vec![header(sid, id, 0, 0, attempt)])),
    )
    .await
    .expect("an answer to an unauthenticated upload");
    f.status(
        "an upload without the secret",
        r,
        Code::Unauthenticated,
        None,
    );

    // None of it replaced or disturbed the real slave.
    let now = env.slaves().await;
    f.check(
        now.len() == 1 && now[0].id == sid && now[0].name == LocalCluster::slave_name(0),
        || format!("the real slave changed: {now:#?}"),
    );
    env.a_normal_build_runs(&mut f).await;
    env.c.shutdown().await.unwrap();
    f.finish();
}

/// The next work message down (heartbeats skipped).
async fn next_down(s: &mut tonic::Streaming<proto::MasterMessage>) -> Down {
    loop {
        let m = tokio::time::timeout(STEP, s.message())
            .await
            .expect("a message from the master within 20 s")
            .expect("the session stream failed")
            .expect("the master ended the session");
        match m.msg {
            Some(Down::Heartbeat(_)) | None => continue,
            Some(other) => return other,
        }
    }
}

/// Every path under `root` whose file name is one of `names`, skipping `skip`.
fn find_named(root: &Path, names: &[&str], skip: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let path = e.path();
        if path.starts_with(skip) {
            continue;
        }
        if names.iter().any(|n| e.file_name() == *n) {
            out.push(path.clone());
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            find_named(&path, names, skip, out);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fake_slave_cannot_upload_outside_its_attempt() {
    // No real slave: the fake one gets the work.
    let env = Local::new(0, 2)
        .heartbeat_timeout_ms(60_000)
        .http_timeout(Duration::from_secs(60))
        .start()
        .await;
    let mut f = Failures::default();
    let ia = Code::InvalidArgument;
    let fp = Code::FailedPrecondition;
    let mut link = env.link(None).await;
    let (tx, r) = session(&mut link, vec![register("fake-slave", 1)], true).await;
    let tx = tx.unwrap();
    let (first, mut down) = r.expect("the fake slave registers");
    let Some(Down::Registered(reg)) = first.msg else {
        panic!("expected Registered, got {first:?}");
    };
    let sid = reg.slave_id;

    let project = project_with("Fake:\n  commands: ['true']\n  atomizers: [{A: 'echo 1'}]\n");
    let mut b = env.builds().await;
    let id = submit(&mut b, dir_request(project.path())).await;

    let Down::Prepare(prep) = next_down(&mut down).await else {
        panic!("expected Prepare");
    };
    assert_eq!(prep.build_id, id);
    let job = proto::JobConfig {
        name: "Fake".into(),
        commands: "true".into(),
        atomizers: vec![proto::Atomizer {
            variable: "A".into(),
            command: "echo 1".into(),
        }],
        ..Default::default()
    };
    tx.send(up(Up::Prepared(proto::PrepareResult {
        build_id: id,
        job: Some(job),
        atoms: vec!["export A=\"1\";".into()],
        project_dir: project.path().display().to_string(),
        ..Default::default()
    })))
    .await
    .unwrap();
    let Down::Setup(setup) = next_down(&mut down).await else {
        panic!("expected Setup");
    };
    assert_eq!(setup.build_id, id);
    tx.send(up(Up::Setup(proto::SetupResult {
        build_id: id,
        ok: true,
        error: String::new(),
    })))
    .await
    .unwrap();
    let Down::RunSubjob(run) = next_down(&mut down).await else {
        panic!("expected RunSubjob");
    };
    assert_eq!((run.build_id, run.subjob_id, run.atoms.len()), (id, 0, 1));
    let attempt = run.attempt;
    let atom = run.atoms[0].atom_id;
    tx.send(up(Up::AtomStarted(proto::AtomStarted {
        build_id: id,
        subjob_id: 0,
        atom_id: atom,
        attempt,
    })))
    .await
    .unwrap();

    // The build is running: no archive yet.
    f.status(
        "DownloadArtifacts of a running build",
        drain(
            b.download_artifacts(proto::DownloadArtifactsRequest {
                build_id: id,
                ..Default::default()
            })
            .await,
        )
        .await,
        fp,
        None,
    );

    // Hostile paths for the real, current attempt.
    let hostile = [
        "../escape",
        "/abs",
        "a/../../b",
        "a//b",
        "../../../../../../escape",
        "./escape",
        "escape/..",
        "escape/.",
        "",
        "a\\..\\..\\escape",
        "a/\0/escape",
    ];
    for path in hostile {
        f.status(
            &format!("an upload of {path:?}"),
            upload(
                &mut link,
                vec![
                    header(sid, id, 0, atom, attempt),
                    file(path, b"pwned", true),
                ],
            )
            .await,
            ia,
            None,
        );
    }
    // A hostile path after a valid file, and a second header.
    f.status(
        "a hostile path after a valid file",
        upload(
            &mut link,
            vec![
                header(sid, id, 0, atom, attempt),
                file("first.txt", b"1", true),
                file("../escape", b"pwned", true),
            ],
        )
        .await,
        ia,
        None,
    );
    f.status(
        "a second header",
        upload(
            &mut link,
            vec![
                header(sid, id, 0, atom, attempt),
                header(sid, id, 0, atom, attempt),
            ],
        )
        .await,
        ia,
        None,
    );
    // Headers that do not name this slave's current attempt.
    for (what, h) in [
        ("another attempt", header(sid, id, 0, atom, attempt + 1000)),
        ("another slave id", header(sid + 1, id, 0, atom, attempt)),
        ("another subjob", header(sid, id, 5, atom, attempt)),
        (
            "an atom out of range",
            header(sid, id, 0, atom + 7, attempt),
        ),
        ("another build", header(sid, id + 1, 0, atom, attempt)),
    ] {
        f.status(
            &format!("an upload for {what}"),
            upload(&mut link, vec![h, file("x.txt", b"x", true)]).await,
            fp,
            None,
        );
    }
    let mut found = Vec::new();
    let attempts = env
        .data_dir
        .join("master")
        .join("results")
        .join(id.to_string())
        .join(".attempts");
    find_named(
        &env.data_dir,
        &["escape", "abs", "b"],
        &attempts,
        &mut found,
    );
    find_named(
        project.path(),
        &["escape", "abs", "b"],
        &attempts,
        &mut found,
    );
    if Path::new("/abs").exists() {
        found.push("/abs".into());
    }
    f.check(found.is_empty(), || {
        format!("hostile uploads created files outside the attempt directory: {found:?}")
    });

    // The attempt itself still works: a valid upload, then the atom's result.
    match upload(
        &mut link,
        vec![
            header(sid, id, 0, atom, attempt),
            file("ok/file.txt", b"hel", false),
            file("ok/file.txt", b"lo", true),
        ],
    )
    .await
    {
        Ok(r) => {
            f.check(r.files == 1 && r.bytes == 5, || {
                format!("the valid upload stored {r:?}")
            });
            // It landed in the attempt directory the search above skipped.
            let mut mine = Vec::new();
            find_named(
                &attempts,
                &["file.txt"],
                Path::new("/nonexistent"),
                &mut mine,
            );
            f.check(mine.len() == 1, || {
                format!(
                    "the valid upload is not under {}: {mine:?}",
                    attempts.display()
                )
            });
        }
        Err(e) => f.check(false, || format!("the valid upload was refused: {e:?}")),
    }
    for m in [
        Up::Console(proto::ConsoleChunk {
            build_id: id,
            subjob_id: 0,
            atom_id: atom,
            attempt,
            data: b"fake output\n".to_vec(),
        }),
        Up::AtomResult(proto::AtomResult {
            build_id: id,
            subjob_id: 0,
            atom_id: atom,
            attempt,
            exit_code: 0,
            seconds: 0.25,
            artifact_files: 1,
            tries: 1,
            timed_out: false,
        }),
        Up::SubjobDone(proto::SubjobDone {
            build_id: id,
            subjob_id: 0,
            attempt,
        }),
    ] {
        tx.send(up(m)).await.unwrap();
    }
    // Acknowledge what the master sends until it tears the build down.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no Teardown for build {id}");
        match next_down(&mut down).await {
            Down::Teardown(t) if t.build_id == id => {
                tx.send(up(Up::TeardownDone(proto::TeardownDone {
                    build_id: id,
                    ok: true,
                    error: String::new(),
                })))
                .await
                .unwrap();
                break;
            }
            _ => {}
        }
    }
    let build = wait_final(&mut b, id).await;
    f.check(
        state(&build) == proto::BuildState::Finished
            && build.result == proto::BuildResult::NoFailures as i32,
        || format!("the fake slave's build did not finish cleanly: {build:#?}"),
    );
    if state(&build) == proto::BuildState::Finished {
        let zip = zip_files(&download(&mut b, id, proto::ArchiveFormat::Zip).await);
        let names: Vec<&String> = zip.keys().collect();
        f.check(
            zip.get("artifact_0_0/ok/file.txt").map(Vec::as_slice) == Some(&b"hello"[..])
                && zip
                    .get("artifact_0_0/clusterrunner_console_output")
                    .map(Vec::as_slice)
                    == Some(&b"fake output\n"[..])
                && zip.keys().all(|k| k.starts_with("artifact_0_0/")),
            || format!("results.zip of the fake build: {names:?}"),
        );
    }
    tx.send(up(Up::GoingAway(proto::GoingAway {
        reason: "test over".into(),
    })))
    .await
    .unwrap();
    drop(tx);
    drop(down);
    env.wait_slaves(0).await;

    // A real slave joins the same cluster and builds normally.
    let mut c = env;
    c.start_slave(0);
    c.wait_slaves(1).await;
    c.a_normal_build_runs(&mut f).await;
    c.c.shutdown().await.unwrap();
    f.finish();
}
