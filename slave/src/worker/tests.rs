//! The worker's logic through its seams: a scripted [`CommandRunner`] instead of processes, a
//! recording [`MasterLink`] instead of the UploadArtifacts RPC, and the outbox read directly
//! instead of a session. Projects are "directory" projects in a temporary directory (no git).
use super::*;
use crate::artifacts::{CONSOLE_FILE, UPLOAD_MANIFEST};
use crate::link::{MasterLink, UploadFile, UploadSource};
use crate::runner::{BoxFuture, Outcome};
use ish_core::proto::project_source::Kind;
use std::path::{Path, PathBuf};

/// What a scripted command does.
#[derive(Debug, Clone)]
enum Script {
    /// Prints `out` (in two pieces), writes `artifact` (name, bytes) into `$ARTIFACT_DIR` when
    /// given, and exits with `code`.
    Exit {
        out: &'static str,
        code: i32,
        artifact: Option<(&'static str, &'static str)>,
    },
    /// Prints `out`, then runs until canceled.
    Hang { out: &'static str },
}

fn exit(out: &'static str, code: i32) -> Script {
    Script::Exit {
        out,
        code,
        artifact: None,
    }
}

/// Commands by a piece of their script; records every command it was asked to run, in order.
#[derive(Debug, Default)]
struct FakeRunner {
    scripts: Vec<(&'static str, Script)>,
    ran: Mutex<Vec<CommandSpec>>,
}

impl FakeRunner {
    fn ran(&self) -> Vec<String> {
        self.ran
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.script.clone())
            .collect()
    }
}

impl CommandRunner for FakeRunner {
    fn run(
        &self,
        spec: CommandSpec,
        output: Option<mpsc::Sender<Vec<u8>>>,
        cancel: CancellationToken,
        _grace: Duration,
    ) -> BoxFuture<std::io::Result<Outcome>> {
        self.ran.lock().unwrap().push(spec.clone());
        let script = self
            .scripts
            .iter()
            .find(|(needle, _)| spec.script.contains(needle))
            .map(|(_, s)| s.clone());
        Box::pin(async move {
            let say = |text: &str| {
                let output = output.clone();
                let text = text.as_bytes().to_vec();
                async move {
                    if let Some(tx) = output {
                        let _ = tx.send(text).await;
                    }
                }
            };
            match script {
                None => Err(std::io::Error::other(format!(
                    "no script for {:?}",
                    spec.script
                ))),
                Some(Script::Exit {
                    out,
                    code,
                    artifact,
                }) => {
                    let (a, b) = out.split_at(out.len() / 2);
                    say(a).await;
                    say(b).await;
                    if let Some((name, data)) = artifact {
                        let dir = env_of(&spec, "ARTIFACT_DIR").expect("atoms get an ARTIFACT_DIR");
                        std::fs::write(Path::new(&dir).join(name), data).unwrap();
                    }
                    Ok(Outcome {
                        exit_code: code,
                        seconds: 0.25,
                        canceled: false,
                    })
                }
                Some(Script::Hang { out }) => {
                    say(out).await;
                    cancel.cancelled().await;
                    Ok(Outcome {
                        exit_code: -15,
                        seconds: 1.0,
                        canceled: true,
                    })
                }
            }
        })
    }
}

fn env_of(spec: &CommandSpec, name: &str) -> Option<String> {
    spec.env
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// One upload as the master would have received it: the header and each file's name and bytes.
type Upload = (proto::UploadHeader, Vec<(String, Vec<u8>)>);

/// Records uploads (reading the files at once: the worker deletes its console afterwards).
#[derive(Debug, Default)]
struct FakeLink {
    uploads: Mutex<Vec<Upload>>,
}

impl MasterLink for FakeLink {
    fn upload_artifacts(
        &self,
        header: proto::UploadHeader,
        files: Vec<UploadFile>,
    ) -> BoxFuture<Result<u32, tonic::Status>> {
        let n = files.len() as u32;
        let files = files
            .into_iter()
            .map(|f| match f.source {
                UploadSource::Path(path) => (f.name, std::fs::read(&path).unwrap()),
                UploadSource::Bytes(data) => (f.name, data),
            })
            .collect();
        self.uploads.lock().unwrap().push((header, files));
        Box::pin(async move { Ok(n) })
    }
}

struct Rig {
    worker: Arc<Worker>,
    tasks: JoinSet<()>,
    runner: Arc<FakeRunner>,
    link: Arc<FakeLink>,
    project: PathBuf,
    data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

const BUILD: u64 = 7;
const SLAVE_ID: u64 = 3;

fn rig(scripts: Vec<(&'static str, Script)>) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    let cfg = SlaveConfig {
        data_dir: dir.path().join("data"),
        kill_grace_ms: 50,
        ..SlaveConfig::default()
    };
    let runner = Arc::new(FakeRunner {
        scripts,
        ..FakeRunner::default()
    });
    let shared = Shared {
        name: "fake-slave".into(),
        session_id: "0123456789abcdef".into(),
        workspaces: Workspaces::new(&cfg.data_dir, (&cfg.git).into()),
        downloader: crate::remote::Downloader::new(1 << 20, Duration::from_secs(5)),
        inherited_env: vec![("PATH".into(), "/usr/bin".into())],
        runner: runner.clone(),
        auth: SecretInterceptor::new("a-test-secret").unwrap(),
        cfg,
    };
    let data_dir = shared.cfg.data_dir.clone();
    let link = Arc::new(FakeLink::default());
    let worker = Worker::new(Arc::new(shared));
    worker.set_live(Some(Live {
        epoch: 1,
        slave_id: SLAVE_ID,
        link: link.clone(),
    }));
    Rig {
        worker,
        tasks: JoinSet::new(),
        runner,
        link,
        project,
        data_dir,
        _dir: dir,
    }
}

impl Rig {
    fn send(&mut self, msg: Down) {
        self.worker.handle(&mut self.tasks, msg);
    }

    /// The next message the slave sends to the master.
    async fn next(&self) -> Up {
        let mut outbox = self.worker.outbox_rx.lock().await;
        tokio::time::timeout(Duration::from_secs(10), outbox.recv())
            .await
            .expect("the worker said nothing within 10 s")
            .expect("the outbox closed")
    }

    fn spec(&self) -> proto::ProjectSpec {
        spec_of(&self.project)
    }

    fn job_file(&self, yaml: &str) {
        std::fs::write(self.project.join(project::JOB_FILE), yaml).unwrap();
    }

    async fn set_up(&mut self, job: proto::JobConfig) {
        let spec = self.spec();
        self.send(Down::Setup(proto::Setup {
            build_id: BUILD,
            project: Some(spec),
            job: Some(job),
            env: [("FROM_BUILD".to_string(), "yes".to_string())].into(),
        }));
        match self.next().await {
            Up::Setup(r) => assert!(r.ok, "setup failed: {}", r.error),
            other => panic!("expected a SetupResult, got {other:?}"),
        }
    }

    fn run(&mut self, attempt: u64, atoms: &[&str]) {
        self.send(Down::RunSubjob(proto::RunSubjob {
            build_id: BUILD,
            subjob_id: 2,
            attempt,
            atoms: atoms
                .iter()
                .enumerate()
                .map(|(i, c)| proto::AtomWork {
                    atom_id: i as u32,
                    command_string: c.to_string(),
                })
                .collect(),
            executor_index: 1,
            build_executor_index: 0,
        }));
    }

    /// Messages of one atom: it started, its console, its result.
    async fn atom(&self, atom_id: u32) -> (String, proto::AtomResult) {
        match self.next().await {
            Up::AtomStarted(s) => {
                assert_eq!((s.build_id, s.subjob_id, s.atom_id), (BUILD, 2, atom_id));
            }
            other => panic!("expected AtomStarted of atom {atom_id}, got {other:?}"),
        }
        let mut console = String::new();
        loop {
            match self.next().await {
                Up::Console(c) => {
                    assert_eq!(c.atom_id, atom_id);
                    console.push_str(&String::from_utf8(c.data).unwrap());
                }
                Up::AtomResult(r) => {
                    assert_eq!(r.atom_id, atom_id);
                    return (console, r);
                }
                other => panic!("expected console or AtomResult of atom {atom_id}, got {other:?}"),
            }
        }
    }

    async fn subjob_done(&self, attempt: u64) {
        match self.next().await {
            Up::SubjobDone(d) => assert_eq!((d.build_id, d.attempt), (BUILD, attempt)),
            other => panic!("expected SubjobDone, got {other:?}"),
        }
    }
}

fn spec_of(dir: &Path) -> proto::ProjectSpec {
    proto::ProjectSpec {
        source: Some(proto::ProjectSource {
            kind: Some(Kind::Directory(proto::DirectorySource {
                path: dir.display().to_string(),
            })),
        }),
        ..Default::default()
    }
}

fn prepare(spec: proto::ProjectSpec) -> Down {
    Down::Prepare(proto::Prepare {
        build_id: BUILD,
        project: Some(spec),
        ..Default::default()
    })
}

async fn prepared(rig: &Rig) -> proto::PrepareResult {
    match rig.next().await {
        Up::Prepared(r) => r,
        other => panic!("expected a PrepareResult, got {other:?}"),
    }
}

fn job(commands: &str) -> proto::JobConfig {
    proto::JobConfig {
        name: "job".into(),
        commands: commands.into(),
        setup_build: "set-it-up".into(),
        teardown_build: "tear-it-down".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn prepare_runs_the_atomizers_in_the_project_and_reports_the_atoms() {
    let mut rig = rig(vec![("list-tests", exit("a\nb\nc\n", 0))]);
    rig.job_file("Job:\n  commands:\n    - run-test $T\n  atomizers:\n    - T: list-tests\n");
    let spec = rig.spec();
    rig.send(prepare(spec));
    let r = prepared(&rig).await;
    assert_eq!(r.error, "");
    assert!(!r.retryable);
    assert_eq!(
        r.atoms,
        ["export T=\"a\";", "export T=\"b\";", "export T=\"c\";"]
    );
    assert_eq!(r.project_dir, rig.project.display().to_string());
    assert_eq!(r.commit, "", "a directory project has no commit");
    assert!(r.job.unwrap().commands.contains("run-test $T"));
    let ran = rig.runner.ran.lock().unwrap().clone();
    assert_eq!(ran.len(), 1);
    assert_eq!(ran[0].script, "list-tests");
    assert_eq!(ran[0].cwd, rig.project);
    assert_eq!(env_of(&ran[0], "ISH_BUILD_ID").as_deref(), Some("7"));
    assert_eq!(
        env_of(&ran[0], "ISH_SLAVE_NAME").as_deref(),
        Some("fake-slave")
    );
    let (_, builds) = rig.worker.report();
    assert_eq!(builds.len(), 1, "the prepared build is held");
    assert!(!builds[0].set_up);
}

#[tokio::test]
async fn a_project_that_cannot_be_got_fails_prepare_as_retryable() {
    let mut rig = rig(vec![]);
    let missing = rig.project.join("not-here");
    rig.send(prepare(spec_of(&missing)));
    let r = prepared(&rig).await;
    assert!(r.retryable, "another slave may have the directory");
    assert!(
        r.error.starts_with(&format!(
            "Could not find the directory \"{}\" on ",
            missing.display()
        )),
        "{}",
        r.error
    );
    assert!(rig.runner.ran().is_empty());
    assert!(rig.worker.report().1.is_empty(), "nothing is held");
}

/// The master sends an inline config already parsed: the slave runs it as given (no
/// clusterrunner.yaml is looked for, nothing is parsed again).
#[tokio::test]
async fn a_config_parsed_by_the_master_is_used_as_given() {
    let mut rig = rig(vec![("list-tests", exit("x\ny\n", 0))]);
    let spec = rig.spec();
    let mut given = job("run-test $T");
    given.atomizers = vec![proto::Atomizer {
        variable: "T".into(),
        command: "list-tests".into(),
    }];
    rig.send(Down::Prepare(proto::Prepare {
        build_id: BUILD,
        project: Some(spec),
        job: Some(given.clone()),
        ..Default::default()
    }));
    let r = prepared(&rig).await;
    assert_eq!(r.error, "", "no project yaml is needed");
    assert_eq!(r.atoms, ["export T=\"x\";", "export T=\"y\";"]);
    assert_eq!(r.job, Some(given));
}

#[tokio::test]
async fn a_missing_job_config_fails_prepare_as_not_retryable() {
    let mut rig = rig(vec![]);
    let spec = rig.spec();
    rig.send(prepare(spec));
    let r = prepared(&rig).await;
    assert!(!r.retryable, "the job config would be missing everywhere");
    assert_eq!(
        r.error,
        format!(
            "Could not find project yaml file {}",
            rig.project.join(project::JOB_FILE).display()
        )
    );
    assert_eq!(
        r.project_dir,
        rig.project.display().to_string(),
        "what was got is still reported"
    );
}

#[tokio::test]
async fn a_failing_atomizer_fails_prepare_as_not_retryable_with_its_output() {
    let mut rig = rig(vec![("list-tests", exit("no tests here\n", 3))]);
    rig.job_file("Job:\n  commands:\n    - run-test $T\n  atomizers:\n    - T: list-tests\n");
    let spec = rig.spec();
    rig.send(prepare(spec));
    let r = prepared(&rig).await;
    assert!(!r.retryable);
    assert_eq!(
        r.error,
        "Atomizer command failed! `list-tests` exited with code 3. Output:\nno tests here"
    );
    assert!(r.atoms.is_empty());
}

#[tokio::test]
async fn a_subjob_runs_its_atoms_in_order_streaming_console_and_uploading_artifacts() {
    let mut rig = rig(vec![
        ("set-it-up", exit("", 0)),
        (
            "N=\"1\"",
            Script::Exit {
                out: "one out\n",
                code: 0,
                artifact: Some(("report.xml", "<ok/>")),
            },
        ),
        ("N=\"2\"", exit("two out\n", 0)),
        ("N=\"3\"", exit("three out\n", 0)),
    ]);
    rig.set_up(job("run-atom")).await;
    rig.run(
        11,
        &["export N=\"1\";", "export N=\"2\";", "export N=\"3\";"],
    );
    let mut consoles = Vec::new();
    for atom in 0..3 {
        let (console, r) = rig.atom(atom).await;
        assert_eq!((r.exit_code, r.tries, r.timed_out), (0, 1, false));
        assert_eq!(r.attempt, 11);
        consoles.push(console);
    }
    rig.subjob_done(11).await;
    assert_eq!(consoles, ["one out\n", "two out\n", "three out\n"]);
    assert_eq!(
        rig.runner.ran(),
        [
            "set-it-up",
            "export N=\"1\"; run-atom",
            "export N=\"2\"; run-atom",
            "export N=\"3\"; run-atom"
        ]
    );
    // Each atom's command gets its own ARTIFACT_DIR and the executor's variables.
    let ran = rig.runner.ran.lock().unwrap().clone();
    assert_eq!(env_of(&ran[1], "ATOM_ID").as_deref(), Some("0"));
    assert_eq!(env_of(&ran[3], "ATOM_ID").as_deref(), Some("2"));
    assert_eq!(env_of(&ran[1], "EXECUTOR_INDEX").as_deref(), Some("1"));
    assert_eq!(env_of(&ran[1], "FROM_BUILD").as_deref(), Some("yes"));

    let uploads = rig.link.uploads.lock().unwrap().clone();
    assert_eq!(uploads.len(), 3, "one upload per atom");
    let (header, files) = &uploads[0];
    assert_eq!(
        (
            header.slave_id,
            header.build_id,
            header.atom_id,
            header.attempt
        ),
        (SLAVE_ID, BUILD, 0, 11)
    );
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, [UPLOAD_MANIFEST, "report.xml", CONSOLE_FILE]);
    assert_eq!(files[1].1, b"<ok/>");
    assert_eq!(
        files[2].1, b"one out\n",
        "the console of record is uploaded"
    );
    let manifest: Vec<(String, u64)> = serde_json::from_slice(&files[0].1).unwrap();
    assert_eq!(
        manifest,
        [("report.xml".to_string(), 5), (CONSOLE_FILE.to_string(), 8)]
    );
    let r1 = match &uploads[1].1[..] {
        [(m, _), (c, data)] => (m.as_str(), c.as_str(), data.clone()),
        other => panic!("unexpected upload {other:?}"),
    };
    assert_eq!(r1, (UPLOAD_MANIFEST, CONSOLE_FILE, b"two out\n".to_vec()));

    // Unacknowledged, the attempt is reported (with its results) to the next session.
    let (attempts, builds) = rig.worker.report();
    assert_eq!(attempts.len(), 1);
    assert!(attempts[0].done);
    assert_eq!(attempts[0].results.len(), 3);
    assert_eq!(attempts[0].results[2].atom_id, 2);
    assert_eq!(builds.len(), 1);
    assert!(builds[0].set_up);
    // Acknowledged, it is forgotten.
    rig.send(Down::SubjobAck(proto::SubjobAck { attempt: 11 }));
    assert!(rig.worker.report().0.is_empty());
}

#[tokio::test]
async fn a_failing_atom_is_retried_as_configured_and_the_subjob_goes_on() {
    let mut rig = rig(vec![
        ("set-it-up", exit("", 0)),
        ("N=\"1\"", exit("bad\n", 2)),
        ("N=\"2\"", exit("good\n", 0)),
    ]);
    rig.set_up(proto::JobConfig {
        retries: 1,
        ..job("run-atom")
    })
    .await;
    rig.run(12, &["export N=\"1\";", "export N=\"2\";"]);
    let (console, r) = rig.atom(0).await;
    assert_eq!((r.exit_code, r.tries), (2, 2));
    assert_eq!(
        console,
        "bad\n\n[ish] try 1 of 2 failed with exit code 2; running the atom again\nbad\n"
    );
    let (_, r) = rig.atom(1).await;
    assert_eq!((r.exit_code, r.tries), (0, 1));
    rig.subjob_done(12).await;
    let uploads = rig.link.uploads.lock().unwrap().clone();
    let console_of_record = &uploads[0].1.last().unwrap().1;
    assert_eq!(console_of_record, console.as_bytes());
}

#[tokio::test]
async fn an_atom_that_cannot_start_is_a_failure() {
    let mut rig = rig(vec![("set-it-up", exit("", 0))]);
    rig.set_up(job("unknown-command")).await;
    rig.run(13, &["export N=\"1\";"]);
    let (console, r) = rig.atom(0).await;
    assert_eq!(r.exit_code, -1);
    assert_eq!(console, "");
    rig.subjob_done(13).await;
}

#[tokio::test]
async fn cancel_stops_the_running_atom_and_the_rest_of_the_subjob() {
    let mut rig = rig(vec![
        ("set-it-up", exit("", 0)),
        ("N=\"1\"", Script::Hang { out: "working\n" }),
        ("N=\"2\"", exit("never\n", 0)),
    ]);
    rig.set_up(job("run-atom")).await;
    rig.run(14, &["export N=\"1\";", "export N=\"2\";"]);
    match rig.next().await {
        Up::AtomStarted(s) => assert_eq!(s.atom_id, 0),
        other => panic!("expected AtomStarted, got {other:?}"),
    }
    match rig.next().await {
        Up::Console(c) => assert_eq!(c.data, b"working\n"),
        other => panic!("expected console, got {other:?}"),
    }
    let (attempts, _) = rig.worker.report();
    assert_eq!(attempts.len(), 1);
    assert!(
        !attempts[0].done,
        "a running attempt is reported as not done"
    );
    assert!(attempts[0].results.is_empty());
    assert!(!rig.worker.idle());

    rig.send(Down::Cancel(proto::CancelBuild { build_id: BUILD }));
    match rig.next().await {
        Up::AtomResult(r) => assert_eq!((r.atom_id, r.exit_code), (0, -15)),
        other => panic!("expected the canceled atom's result, got {other:?}"),
    }
    rig.subjob_done(14).await;
    assert!(
        !rig.runner.ran().iter().any(|s| s.contains("N=\"2\"")),
        "no atom starts after a cancel"
    );
}

#[tokio::test]
async fn teardown_runs_teardown_build_once_and_deletes_the_workspace() {
    let mut rig = rig(vec![
        ("set-it-up", exit("", 0)),
        ("tear-it-down", exit("cleaned\n", 0)),
    ]);
    rig.set_up(job("run-atom")).await;
    let builds_dir = rig.data_dir.join("builds");
    let workspaces = || {
        std::fs::read_dir(&builds_dir)
            .unwrap()
            .filter(|e| {
                !e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .count()
    };
    assert_eq!(workspaces(), 1);
    rig.send(Down::Teardown(proto::Teardown { build_id: BUILD }));
    match rig.next().await {
        Up::TeardownDone(t) => assert!(t.ok && t.build_id == BUILD, "{t:?}"),
        other => panic!("expected TeardownDone, got {other:?}"),
    }
    assert_eq!(rig.runner.ran(), ["set-it-up", "tear-it-down"]);
    assert_eq!(workspaces(), 0, "the workspace is deleted");
    assert_eq!(rig.worker.report(), (vec![], vec![]), "nothing is held");
    // Tearing down again (a repeated message) runs nothing more.
    rig.send(Down::Teardown(proto::Teardown { build_id: BUILD }));
    match rig.next().await {
        Up::TeardownDone(t) => assert!(t.ok),
        other => panic!("expected TeardownDone, got {other:?}"),
    }
    assert_eq!(rig.runner.ran().len(), 2);
}

#[tokio::test]
async fn a_failing_teardown_build_is_reported_with_its_output() {
    let mut rig = rig(vec![
        ("set-it-up", exit("", 0)),
        ("tear-it-down", exit("could not clean\n", 4)),
    ]);
    rig.set_up(job("run-atom")).await;
    rig.send(Down::Teardown(proto::Teardown { build_id: BUILD }));
    match rig.next().await {
        Up::TeardownDone(t) => {
            assert!(!t.ok);
            assert_eq!(
                t.error,
                "teardown_build exited with code 4. Output:\ncould not clean"
            );
        }
        other => panic!("expected TeardownDone, got {other:?}"),
    }
}

#[tokio::test]
async fn a_failing_setup_build_fails_setup_and_the_build_is_not_reported_set_up() {
    let mut rig = rig(vec![("set-it-up", exit("no db\n", 1))]);
    let spec = rig.spec();
    rig.send(Down::Setup(proto::Setup {
        build_id: BUILD,
        project: Some(spec),
        job: Some(job("run-atom")),
        env: Default::default(),
    }));
    match rig.next().await {
        Up::Setup(r) => {
            assert!(!r.ok);
            assert_eq!(r.error, "setup_build exited with code 1. Output:\nno db");
        }
        other => panic!("expected a SetupResult, got {other:?}"),
    }
    let (_, builds) = rig.worker.report();
    assert_eq!(builds.len(), 1);
    assert!(!builds[0].set_up);
}
