//! Scheduler tests with channel-backed fake slaves: no network, no processes.
use super::*;
use crate::clock::ManualClock;
use crate::command::{ClientCall, Internal, Reply, SlaveEvent};
use crate::error::Result;
use crate::ids::{AtomRef, BuildId, SlaveId};
use crate::results::CONSOLE_FILE;
use crate::storage::Store;
use ish_core::proto::slave_message::Msg as Up;
use ish_core::state::BuildState;
use proto::master_message::Msg as D;
use std::sync::Arc;
use tokio::sync::oneshot;

/// A slave's message as its session passes it on.
fn from_slave(sid: u64, msg: Up) -> Command {
    SlaveEvent::Message(SlaveId(sid), msg).into()
}

/// The actor's periodic tick.
fn tick() -> Command {
    Internal::Tick.into()
}

struct Harness {
    core: Core,
    /// The core's database (reads of final builds and recovery go to it directly).
    store: Store,
    /// The core's clock: tests move it instead of sleeping.
    clock: Arc<ManualClock>,
    results: mpsc::UnboundedReceiver<ResultsJob>,
    cmds: mpsc::Receiver<Command>,
    _cmd_tx: mpsc::Sender<Command>,
    _dir: tempfile::TempDir,
}

struct FakeSlave {
    id: u64,
    rx: mpsc::Receiver<proto::MasterMessage>,
}

impl FakeSlave {
    fn next(&mut self) -> Option<D> {
        loop {
            match self.rx.try_recv() {
                // Liveness and bookkeeping, not work.
                Ok(proto::MasterMessage {
                    msg: Some(D::Heartbeat(_) | D::SubjobAck(_)),
                }) => continue,
                Ok(m) => return m.msg,
                Err(_) => return None,
            }
        }
    }

    fn all(&mut self) -> Vec<D> {
        std::iter::from_fn(|| self.next()).collect()
    }
}

fn dir_request(config: &str) -> proto::BuildRequest {
    proto::BuildRequest {
        source: Some(proto::ProjectSource {
            kind: Some(proto::project_source::Kind::Directory(
                proto::DirectorySource {
                    path: "/tmp/p".into(),
                },
            )),
        }),
        config_json: config.into(),
        job_name: "Job".into(),
        ..Default::default()
    }
}

const CONFIG: &str = r#"{"commands": ["echo $TOKEN"], "atomizers": [{"TOKEN": "seq 1 4"}]}"#;

fn job(max_executors: u32, per_slave: u32) -> proto::JobConfig {
    proto::JobConfig {
        name: "Job".into(),
        commands: "echo $TOKEN".into(),
        atomizers: vec![],
        setup_build: "true".into(),
        teardown_build: String::new(),
        max_executors,
        max_executors_per_slave: per_slave,
        ..Default::default()
    }
}

/// A job grouped ClusterRunner's way (the default is queue dispatch: one atom per subjob).
fn cr_job(max_executors: u32, per_slave: u32) -> proto::JobConfig {
    proto::JobConfig {
        dispatch: proto::DispatchMode::Clusterrunner as i32,
        ..job(max_executors, per_slave)
    }
}

fn atoms(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("export TOKEN=\"{i}\";")).collect()
}

impl Harness {
    fn new() -> Self {
        Self::with_store(Store::temporary().unwrap())
    }

    fn with_store(store: Store) -> Self {
        let db = store.clone();
        let dir = tempfile::tempdir().unwrap();
        let (results_tx, results) = mpsc::unbounded_channel();
        let (changes, _) = broadcast::channel(1024);
        let (cmd_tx, cmds) = mpsc::channel(1024);
        let clock = ManualClock::new();
        let core = Core::new(
            CoreConfig::default(),
            clock.clone(),
            Arc::new(store),
            ResultsLayout::new(dir.path().to_path_buf()),
            results_tx,
            changes,
            cmd_tx.downgrade(),
        );
        Self {
            core,
            store: db,
            clock,
            results,
            cmds,
            _cmd_tx: cmd_tx,
            _dir: dir,
        }
    }

    fn call<T, C: Into<Command>>(&mut self, make: impl FnOnce(Reply<T>) -> C) -> Result<T> {
        let (tx, mut rx) = oneshot::channel();
        self.core.handle(make(tx).into());
        rx.try_recv().expect("core answers synchronously")
    }

    fn slave(&mut self, name: &str, executors: u32) -> FakeSlave {
        let (tx, rx) = mpsc::channel(1024);
        let reg = proto::Register {
            name: name.into(),
            executors,
            ..Default::default()
        };
        let id = self.call(|r| SlaveEvent::Connected(reg, tx, r)).unwrap().0;
        let mut s = FakeSlave { id, rx };
        assert!(matches!(s.next(), Some(D::Registered(_))));
        s
    }

    /// Submits and waits for the answer, which comes after the database flush (handled here
    /// like the actor would).
    async fn submit(&mut self, req: proto::BuildRequest) -> u64 {
        let (tx, mut rx) = oneshot::channel();
        self.core
            .handle(ClientCall::Submit(Box::new(req), tx).into());
        loop {
            if let Ok(r) = rx.try_recv() {
                return r.unwrap().0;
            }
            self.pump().await;
        }
    }

    /// Handles the next command the core sent itself (flush and archive completions).
    async fn pump(&mut self) {
        let cmd = tokio::time::timeout(Duration::from_secs(5), self.cmds.recv())
            .await
            .expect("a command from the core")
            .unwrap();
        self.core.handle(cmd);
    }

    fn build(&mut self, id: u64) -> proto::Build {
        self.call(|r| ClientCall::GetBuild(BuildId(id), r)).unwrap()
    }

    fn from(&mut self, s: &FakeSlave, msg: Up) {
        self.core.handle(from_slave(s.id, msg));
    }

    /// Reports a preparation and waits (like the actor) for the flush that makes its grouping
    /// durable, after which dispatching may start.
    async fn prepared(
        &mut self,
        s: &FakeSlave,
        build: u64,
        job: proto::JobConfig,
        atoms: Vec<String>,
    ) {
        self.prepared_from(s.id, build, job, atoms).await;
    }

    async fn prepared_from(
        &mut self,
        sid: u64,
        build: u64,
        job: proto::JobConfig,
        atoms: Vec<String>,
    ) {
        self.core.handle(from_slave(
            sid,
            Up::Prepared(proto::PrepareResult {
                build_id: build,
                job: Some(job),
                atoms,
                project_dir: "/tmp/p".into(),
                ..Default::default()
            }),
        ));
        self.settle_durable(build).await;
    }

    /// Pumps the core's own commands until the build's grouping is made (its timing history
    /// read) and durable, or it ended.
    async fn settle_durable(&mut self, build: u64) {
        while self.core.builds.get(&build).is_some_and(|b| {
            (b.state == BuildState::Preparing && b.preparing_on.is_none())
                || (!b.grouping_durable && !b.state.is_final() && !b.subjobs.is_empty())
        }) {
            self.pump().await;
        }
    }

    /// Pumps the core's own commands until no commit is running (every staged write and every
    /// answer waiting for one has been through the store).
    async fn commit_all(&mut self) {
        while self.core.flushing {
            self.pump().await;
        }
    }

    /// Restarts the engine's state from the store, as a starting master does.
    async fn recover(&mut self) {
        let stored = Stored::load(&self.store).await.unwrap();
        self.core.recover(stored).unwrap();
    }

    /// A page of subjobs, read off the actor when the engine says so (like `MasterHandle`).
    async fn subjob_page(
        &mut self,
        id: u64,
        offset: u32,
        limit: u32,
    ) -> Result<proto::ListSubjobsResponse> {
        let answer = self.call(|reply| ClientCall::ListSubjobs {
            build: BuildId(id),
            offset,
            limit,
            reply,
        })?;
        reads::subjobs(&self.store, answer).await
    }

    /// Where an atom's console is, read off the actor when the engine says so.
    async fn console(&mut self, at: AtomRef) -> Result<crate::command::ConsoleLocation> {
        let answer = self.call(|reply| ClientCall::Console(at, reply))?;
        reads::console(&self.store, &self.core.layout, answer).await
    }

    fn setup_ok(&mut self, s: &FakeSlave, build: u64) {
        self.from(
            s,
            Up::Setup(proto::SetupResult {
                build_id: build,
                ok: true,
                error: String::new(),
            }),
        );
    }

    /// Reports one atom of `r`.
    fn atom_done(
        &mut self,
        s: &FakeSlave,
        r: &proto::RunSubjob,
        atom_id: u32,
        exit_code: i32,
        tries: u32,
        seconds: f64,
    ) {
        self.from(
            s,
            Up::AtomResult(proto::AtomResult {
                build_id: r.build_id,
                subjob_id: r.subjob_id,
                atom_id,
                attempt: r.attempt,
                exit_code,
                tries,
                seconds,
                ..Default::default()
            }),
        );
    }

    /// Reports every atom of `r` with `exit_code`, then the subjob done.
    fn complete(&mut self, s: &FakeSlave, r: &proto::RunSubjob, exit_code: i32, seconds: f64) {
        for a in &r.atoms {
            self.from(
                s,
                Up::AtomResult(proto::AtomResult {
                    build_id: r.build_id,
                    subjob_id: r.subjob_id,
                    atom_id: a.atom_id,
                    attempt: r.attempt,
                    exit_code,
                    seconds,
                    artifact_files: 0,
                    ..Default::default()
                }),
            );
        }
        self.from(
            s,
            Up::SubjobDone(proto::SubjobDone {
                build_id: r.build_id,
                subjob_id: r.subjob_id,
                attempt: r.attempt,
            }),
        );
    }

    /// Every subjob of a build, with its atoms.
    async fn subjobs(&mut self, id: u64) -> Vec<proto::Subjob> {
        self.subjob_page(id, 0, 0).await.unwrap().subjobs
    }

    /// Takes the results queue's pending promotions and cleanups (nothing else is queued).
    fn promotions_and_cleanups(&mut self) -> (Vec<(u64, u32, u32)>, Vec<u64>) {
        let (mut promoted, mut cleaned) = (Vec::new(), Vec::new());
        while let Ok(job) = self.results.try_recv() {
            match job {
                ResultsJob::Promote {
                    build,
                    subjob,
                    atom,
                    ..
                } => promoted.push((build, subjob, atom)),
                ResultsJob::Cleanup { build } => cleaned.push(build),
                _ => panic!("unexpected results job"),
            }
        }
        (promoted, cleaned)
    }

    /// Plays the results queue: promotions succeed, archives succeed, and the completion comes back.
    async fn run_results(&mut self) -> Vec<(u64, Vec<String>, Vec<String>)> {
        let mut archives = Vec::new();
        while let Ok(job) = self.results.try_recv() {
            if let ResultsJob::Archive {
                build,
                history,
                atoms,
                failures,
                done,
                ..
            } = job
            {
                history.record(&atoms).await.unwrap();
                let names = atoms
                    .iter()
                    .map(|a| crate::archive::artifact_dir_name(a.subjob, a.atom))
                    .collect();
                archives.push((build, names, failures));
                done.send(Ok(())).unwrap();
            }
        }
        let mut written = 0;
        while written < archives.len() {
            let cmd = tokio::time::timeout(Duration::from_secs(5), self.cmds.recv())
                .await
                .expect("archive completion")
                .unwrap();
            written += usize::from(matches!(
                cmd,
                Command::Internal(Internal::ArchivesWritten(..))
            ));
            self.core.handle(cmd);
        }
        self.commit_all().await;
        archives
    }
}

fn run_subjobs(msgs: &[D]) -> Vec<proto::RunSubjob> {
    msgs.iter()
        .filter_map(|m| match m {
            D::RunSubjob(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn state(b: &proto::Build) -> proto::BuildState {
    proto::BuildState::try_from(b.state).unwrap()
}

#[tokio::test]
async fn a_build_runs_from_queue_to_finished() {
    let mut h = Harness::new();
    let mut s = h.slave("s1", 2);
    let id = h.submit(dir_request(CONFIG)).await;
    let D::Prepare(p) = s.next().expect("prepare") else {
        panic!("expected Prepare")
    };
    assert_eq!(p.build_id, id);
    assert_eq!(state(&h.build(id)), proto::BuildState::Preparing);
    h.prepared(&s, id, job(0, 0), atoms(4)).await;
    assert_eq!(h.build(id).num_subjobs, 4);
    let D::Setup(setup) = s.next().expect("setup") else {
        panic!("expected Setup")
    };
    assert_eq!(setup.job.unwrap().setup_build, "true");
    assert!(s.next().is_none(), "nothing runs before setup completes");
    h.setup_ok(&s, id);
    let runs = run_subjobs(&s.all());
    assert_eq!(runs.len(), 2, "one subjob per executor");
    let mut slots: Vec<u32> = runs.iter().map(|r| r.executor_index).collect();
    slots.sort();
    assert_eq!(slots, [0, 1]);
    let mut build_slots: Vec<u32> = runs.iter().map(|r| r.build_executor_index).collect();
    build_slots.sort();
    assert_eq!(build_slots, [0, 1]);
    assert_eq!(state(&h.build(id)), proto::BuildState::Building);
    let mut pending = runs;
    let mut done = 0;
    while let Some(r) = pending.pop() {
        h.complete(&s, &r, if r.subjob_id == 2 { 1 } else { 0 }, 0.5);
        done += 1;
        pending.extend(run_subjobs(&s.all()));
    }
    assert_eq!(done, 4);
    let archives = h.run_results().await;
    assert_eq!(archives.len(), 1);
    let (_, dirs, failures) = &archives[0];
    assert_eq!(
        dirs,
        &[
            "artifact_0_0",
            "artifact_1_0",
            "artifact_2_0",
            "artifact_3_0"
        ]
    );
    assert_eq!(failures, &["artifact_2_0"]);
    let b = h.build(id);
    assert_eq!(state(&b), proto::BuildState::Finished);
    assert_eq!(b.result, proto::BuildResult::Failure as i32);
    assert!(b.artifacts_ready);
    assert_eq!(b.failed_atoms.len(), 1);
    assert!(
        matches!(s.next(), Some(D::Teardown(_))),
        "teardown once the build ended"
    );
    assert!(s.next().is_none());
}

#[tokio::test]
async fn max_executors_and_per_slave_caps_hold() {
    let mut h = Harness::new();
    let mut a = h.slave("a", 4);
    let mut b = h.slave("b", 4);
    let id = h.submit(dir_request(CONFIG)).await;
    let preparer_is_a = matches!(a.next(), Some(D::Prepare(_)));
    let (prep, other) = if preparer_is_a {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    if !preparer_is_a {
        assert!(matches!(prep.next(), Some(D::Prepare(_))));
    }
    let prep_id = prep.id;
    h.prepared_from(prep_id, id, job(3, 2), atoms(10)).await;
    // Both slaves are set up (cap 2 each covers max_executors 3).
    let mut setups = 0;
    for s in [&mut *prep, &mut *other] {
        if matches!(s.next(), Some(D::Setup(_))) {
            setups += 1;
            let sid = s.id;
            h.core.handle(from_slave(
                sid,
                Up::Setup(proto::SetupResult {
                    build_id: id,
                    ok: true,
                    error: String::new(),
                }),
            ));
        }
    }
    assert_eq!(setups, 2);
    let ra = run_subjobs(&prep.all());
    let rb = run_subjobs(&other.all());
    assert!(
        ra.len() <= 2 && rb.len() <= 2,
        "per-slave cap: {} {}",
        ra.len(),
        rb.len()
    );
    assert_eq!(ra.len() + rb.len(), 3, "max_executors");
    let mut idx: Vec<u32> = ra
        .iter()
        .chain(&rb)
        .map(|r| r.build_executor_index)
        .collect();
    idx.sort();
    idx.dedup();
    assert_eq!(idx.len(), 3, "build executor indices are distinct");
    assert!(
        idx.iter().all(|&i| i < 4),
        "indices stay inside the allocated ranges: {idx:?}"
    );
}

#[tokio::test]
async fn a_lost_slave_requeues_only_unreported_atoms_and_late_results_are_ignored() {
    let mut h = Harness::new();
    let mut a = h.slave("a", 1);
    let id = h.submit(dir_request(CONFIG)).await;
    assert!(matches!(a.next(), Some(D::Prepare(_))));
    h.prepared(&a, id, job(0, 0), atoms(2)).await;
    assert!(matches!(a.next(), Some(D::Setup(_))));
    h.setup_ok(&a, id);
    let r = run_subjobs(&a.all()).pop().expect("dispatched");
    // The atom reports its result, then the slave disappears before SubjobDone.
    h.from(
        &a,
        Up::AtomResult(proto::AtomResult {
            build_id: id,
            subjob_id: r.subjob_id,
            atom_id: 0,
            attempt: r.attempt,
            exit_code: 0,
            seconds: 0.1,
            artifact_files: 0,
            ..Default::default()
        }),
    );
    let mut b = h.slave("b", 1);
    h.core
        .handle(SlaveEvent::Disconnected(SlaveId(a.id)).into());
    // b gets set up and receives the remaining subjob only.
    assert!(matches!(b.next(), Some(D::Setup(_))));
    h.setup_ok(&b, id);
    let rb = run_subjobs(&b.all());
    assert_eq!(rb.len(), 1);
    assert_ne!(
        rb[0].subjob_id, r.subjob_id,
        "the reported subjob is complete and not re-run"
    );
    // A late result from the lost slave's attempt changes nothing.
    h.core.handle(from_slave(
        a.id,
        Up::AtomResult(proto::AtomResult {
            build_id: id,
            subjob_id: rb[0].subjob_id,
            atom_id: 0,
            attempt: r.attempt,
            exit_code: 7,
            seconds: 1.0,
            artifact_files: 0,
            ..Default::default()
        }),
    ));
    h.complete(&b, &rb[0], 0, 0.2);
    h.run_results().await;
    let built = h.build(id);
    assert_eq!(state(&built), proto::BuildState::Finished);
    assert_eq!(built.result, proto::BuildResult::NoFailures as i32);
    assert_eq!(built.completed_atoms, 2);
}

#[tokio::test]
async fn a_subjob_interrupted_midway_resends_only_its_missing_atoms() {
    let mut h = Harness::new();
    let store = h.store.clone();
    // Timing history + max_executors = 1 groups two of the three atoms into subjob 0.
    store
        .merge_timings(
            "dir:/tmp/p//",
            "Job",
            [
                ("export TOKEN=\"0\";", 1.0),
                ("export TOKEN=\"1\";", 1.0),
                ("export TOKEN=\"2\";", 1.0),
            ],
        )
        .unwrap();
    let mut a = h.slave("a", 1);
    let id = h.submit(dir_request(CONFIG)).await;
    assert!(matches!(a.next(), Some(D::Prepare(_))));
    h.prepared(&a, id, cr_job(1, 0), atoms(3)).await;
    assert_eq!(h.build(id).num_subjobs, 2);
    assert!(matches!(a.next(), Some(D::Setup(_))));
    h.setup_ok(&a, id);
    let r = run_subjobs(&a.all()).pop().unwrap();
    assert_eq!((r.subjob_id, r.atoms.len()), (0, 2));
    h.from(
        &a,
        Up::AtomResult(proto::AtomResult {
            build_id: id,
            subjob_id: 0,
            atom_id: r.atoms[0].atom_id,
            attempt: r.attempt,
            exit_code: 0,
            seconds: 1.0,
            artifact_files: 0,
            ..Default::default()
        }),
    );
    let mut b = h.slave("b", 1);
    h.core
        .handle(SlaveEvent::Disconnected(SlaveId(a.id)).into());
    assert!(matches!(b.next(), Some(D::Setup(_))));
    h.setup_ok(&b, id);
    let rb = run_subjobs(&b.all()).pop().unwrap();
    assert_eq!(rb.subjob_id, 0, "the interrupted subjob goes first");
    let resent: Vec<u32> = rb.atoms.iter().map(|a| a.atom_id).collect();
    let expected: Vec<u32> = r.atoms[1..].iter().map(|a| a.atom_id).collect();
    assert_eq!(resent, expected);
    assert_ne!(rb.attempt, r.attempt);
}

#[tokio::test]
async fn cancel_kills_running_work_and_tears_down() {
    let mut h = Harness::new();
    let mut s = h.slave("s", 2);
    let id = h.submit(dir_request(CONFIG)).await;
    assert!(matches!(s.next(), Some(D::Prepare(_))));
    h.prepared(&s, id, job(0, 0), atoms(4)).await;
    assert!(matches!(s.next(), Some(D::Setup(_))));
    h.setup_ok(&s, id);
    let runs = run_subjobs(&s.all());
    assert_eq!(runs.len(), 2);
    let b = h.call(|r| ClientCall::Cancel(BuildId(id), r)).unwrap();
    assert_eq!(state(&b), proto::BuildState::Canceled);
    assert_eq!(b.result, proto::BuildResult::Failure as i32);
    let msgs = s.all();
    assert!(matches!(msgs[0], D::Cancel(_)), "{msgs:?}");
    assert!(matches!(msgs[1], D::Teardown(_)), "{msgs:?}");
    assert_eq!(msgs.len(), 2);
    // Canceling again is a no-op.
    let again = h.call(|r| ClientCall::Cancel(BuildId(id), r)).unwrap();
    assert_eq!(state(&again), proto::BuildState::Canceled);
    assert!(s.all().is_empty());
    // While the killed subjobs are out, their atoms show as running.
    let sjs = h.subjobs(id).await;
    let ran: Vec<u32> = runs.iter().map(|r| r.subjob_id).collect();
    for sj in &sjs {
        let want = if ran.contains(&sj.id) {
            proto::AtomState::InProgress
        } else {
            proto::AtomState::NotStarted
        };
        assert!(sj.atoms.iter().all(|a| a.state == want as i32), "{sjs:#?}");
    }
    // Executors come back when the killed subjobs report done; a new build can use them. What
    // the killed atoms did is kept: killed by SIGTERM, with their time (and console).
    for r in &runs {
        h.complete(&s, r, -15, 0.1);
    }
    let sjs = h.subjobs(id).await;
    for sj in &sjs {
        for a in &sj.atoms {
            if ran.contains(&sj.id) {
                assert_eq!(a.state, proto::AtomState::Completed as i32, "{a:?}");
                assert_eq!((a.exit_code, a.actual_time), (Some(-15), Some(0.1)));
            } else {
                assert_eq!(a.state, proto::AtomState::NotStarted as i32, "{a:?}");
                assert_eq!(a.exit_code, None);
            }
        }
    }
    let (mut promoted, _) = h.promotions_and_cleanups();
    promoted.sort();
    let mut want: Vec<(u64, u32, u32)> = runs
        .iter()
        .flat_map(|r| r.atoms.iter().map(|a| (id, r.subjob_id, a.atom_id)))
        .collect();
    want.sort();
    assert_eq!(
        promoted, want,
        "the killed atoms' files (console so far) are kept"
    );
    // Once the last killed subjob is in, the build's attempt directories are cleaned up.
    let mut cleaned = Vec::new();
    for _ in 0..100 {
        h.commit_all().await;
        cleaned.extend(h.promotions_and_cleanups().1);
        if !cleaned.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cleaned, [id]);
    let id2 = h.submit(dir_request(CONFIG)).await;
    assert!(matches!(s.next(), Some(D::Prepare(p)) if p.build_id == id2));
    assert_eq!(
        state(&h.build(id)),
        proto::BuildState::Canceled,
        "late results do not revive it"
    );
}

#[tokio::test]
async fn cancel_while_preparing() {
    let mut h = Harness::new();
    let mut s = h.slave("s", 1);
    let id = h.submit(dir_request(CONFIG)).await;
    assert!(matches!(s.next(), Some(D::Prepare(_))));
    h.call(|r| ClientCall::Cancel(BuildId(id), r)).unwrap();
    assert!(matches!(s.next(), Some(D::Cancel(_))));
    // The preparation's answer arrives anyway: ignored, and the workspace is torn down.
    h.from(
        &s,
        Up::Prepared(proto::PrepareResult {
            build_id: id,
            error: "Atomizer canceled.".into(),
            ..Default::default()
        }),
    );
    assert!(matches!(s.next(), Some(D::Teardown(_))));
    assert_eq!(state(&h.build(id)), proto::BuildState::Canceled);
}

#[tokio::test]
async fn failing_setup_errors_the_build_but_keeps_the_slave() {
    let mut h = Harness::new();
    let mut s = h.slave("s", 2);
    let id = h.submit(dir_request(CONFIG)).await;
    assert!(matches!(s.next(), Some(D::Prepare(_))));
    h.prepared(&s, id, job(0, 0), atoms(2)).await;
    assert!(matches!(s.next(), Some(D::Setup(_))));
    h.from(
        &s,
        Up::Setup(proto::SetupResult {
            build_id: id,
            ok: false,
            error: "setup_build exited with code 1".into(),
        }),
    );
    let b = h.build(id);
    assert_eq!(state(&b), proto::BuildState::Error);
    assert!(
        b.error_message.contains("setup_build exited with code 1"),
        "{}",
        b.error_message
    );
    assert!(matches!(s.next(), Some(D::Teardown(_))));
    // The slave is still registered and gets the next build.
    let id2 = h.submit(dir_request(CONFIG)).await;
    assert!(matches!(s.next(), Some(D::Prepare(p)) if p.build_id == id2));
}

#[tokio::test]
async fn setup_failure_on_one_slave_moves_work_to_another() {
    let mut h = Harness::new();
    let mut a = h.slave("a", 1);
    let mut b = h.slave("b", 1);
    let id = h.submit(dir_request(CONFIG)).await;
    let prep_a = matches!(a.next(), Some(D::Prepare(_)));
    if !prep_a {
        assert!(matches!(b.next(), Some(D::Prepare(_))));
    }
    let (p, q) = if prep_a {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let pid = p.id;
    h.prepared_from(pid, id, job(0, 0), atoms(2)).await;
    // Both get set up (2 subjobs, 1 executor each).
    assert!(matches!(p.next(), Some(D::Setup(_))));
    assert!(matches!(q.next(), Some(D::Setup(_))));
    h.core.handle(from_slave(
        pid,
        Up::Setup(proto::SetupResult {
            build_id: id,
            ok: false,
            error: "boom".into(),
        }),
    ));
    assert!(matches!(p.next(), Some(D::Teardown(_))));
    let qid = q.id;
    h.core.handle(from_slave(
        qid,
        Up::Setup(proto::SetupResult {
            build_id: id,
            ok: true,
            error: String::new(),
        }),
    ));
    assert_eq!(state(&h.build(id)), proto::BuildState::Building);
    let mut total = 0;
    loop {
        let runs = run_subjobs(&q.all());
        if runs.is_empty() {
            break;
        }
        for r in runs {
            total += 1;
            h.core.handle(from_slave(
                qid,
                Up::AtomResult(proto::AtomResult {
                    build_id: id,
                    subjob_id: r.subjob_id,
                    atom_id: 0,
                    attempt: r.attempt,
                    exit_code: 0,
                    seconds: 0.1,
                    artifact_files: 0,
                    ..Default::default()
                }),
            ));
            h.core.handle(from_slave(
                qid,
                Up::SubjobDone(proto::SubjobDone {
                    build_id: id,
                    subjob_id: r.subjob_id,
                    attempt: r.attempt,
                }),
            ));
        }
    }
    assert_eq!(total, 2);
    assert!(p.all().is_empty(), "the failed slave got no subjob");
    h.run_results().await;
    assert_eq!(state(&h.build(id)), proto::BuildState::Finished);
}

#[tokio::test]
async fn the_second_build_is_grouped_by_recorded_times() {
    let mut h = Harness::new();
    let mut s = h.slave("s", 1);
    let times = [1.0, 10.0, 11.0, 2.0, 10.0, 5.0, 2.0, 8.0, 10.0, 3.0];
    for round in 0..2 {
        let id = h.submit(dir_request(CONFIG)).await;
        assert!(matches!(s.next(), Some(D::Prepare(_))));
        h.prepared(&s, id, cr_job(2, 0), atoms(10)).await;
        let subjobs = h.subjob_page(id, 0, 0).await.unwrap();
        if round == 0 {
            assert_eq!(subjobs.total, 10, "no history: one atom per subjob");
            assert!(
                subjobs
                    .subjobs
                    .iter()
                    .all(|s| s.atoms[0].expected_time.is_none())
            );
        } else {
            // Spec §10.5's first vector (a1..a10 = TOKEN 0..9).
            let groups: Vec<Vec<String>> = subjobs
                .subjobs
                .iter()
                .map(|s| {
                    let mut g: Vec<String> =
                        s.atoms.iter().map(|a| a.command_string.clone()).collect();
                    g.sort();
                    g
                })
                .collect();
            let tok = |is: &[usize]| {
                let mut g: Vec<String> = is
                    .iter()
                    .map(|i| format!("export TOKEN=\"{i}\";"))
                    .collect();
                g.sort();
                g
            };
            assert_eq!(
                groups,
                vec![
                    tok(&[2, 1, 9]),
                    tok(&[4, 8, 3, 6]),
                    tok(&[7]),
                    tok(&[5]),
                    tok(&[0])
                ]
            );
            assert!(
                subjobs
                    .subjobs
                    .iter()
                    .all(|s| s.atoms.iter().all(|a| a.expected_time.is_some()))
            );
        }
        assert!(matches!(s.next(), Some(D::Setup(_))));
        h.setup_ok(&s, id);
        loop {
            let runs = run_subjobs(&s.all());
            if runs.is_empty() {
                break;
            }
            for r in runs {
                for a in &r.atoms {
                    let sj = &subjobs.subjobs[r.subjob_id as usize];
                    let token: usize = sj.atoms[a.atom_id as usize]
                        .command_string
                        .trim_start_matches("export TOKEN=\"")
                        .trim_end_matches("\";")
                        .parse()
                        .unwrap();
                    h.from(
                        &s,
                        Up::AtomResult(proto::AtomResult {
                            build_id: id,
                            subjob_id: r.subjob_id,
                            atom_id: a.atom_id,
                            attempt: r.attempt,
                            exit_code: 0,
                            seconds: times[token],
                            artifact_files: 0,
                            ..Default::default()
                        }),
                    );
                }
                h.from(
                    &s,
                    Up::SubjobDone(proto::SubjobDone {
                        build_id: id,
                        subjob_id: r.subjob_id,
                        attempt: r.attempt,
                    }),
                );
            }
        }
        h.run_results().await;
        assert_eq!(state(&h.build(id)), proto::BuildState::Finished);
        assert!(matches!(s.next(), Some(D::Teardown(_))));
    }
}

#[tokio::test]
async fn bad_requests_are_refused_and_nothing_is_stored() {
    let mut h = Harness::new();
    let cases: Vec<(proto::BuildRequest, &str)> = vec![
        (proto::BuildRequest::default(), "Invalid build request type"),
        (
            proto::BuildRequest {
                source: Some(proto::ProjectSource {
                    kind: Some(proto::project_source::Kind::Git(proto::GitSource::default())),
                }),
                ..Default::default()
            },
            "Required parameters: ['url']",
        ),
        (
            dir_request(r#"{"commands": ["x"]}"#),
            "missing required config sections",
        ),
        (dir_request("[1]"), "not a dictionary"),
        (
            proto::BuildRequest {
                project_directory: "../up".into(),
                ..dir_request(CONFIG)
            },
            "without \"..\"",
        ),
    ];
    for (req, needle) in cases {
        let err = h
            .call(|r| ClientCall::Submit(Box::new(req), r))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.to_string().contains(needle),
            "{err} should contain {needle}"
        );
    }
    let list = h
        .call(|reply| ClientCall::ListBuilds {
            offset: 0,
            limit: 0,
            unfinished_only: false,
            reply,
        })
        .unwrap();
    assert_eq!(list.total, 0);
    assert!(h.store.load_builds().unwrap().is_empty());
}

#[tokio::test]
async fn a_silent_slave_is_lost_after_the_heartbeat_deadline() {
    let mut h = Harness::new();
    let mut s = h.slave("s", 1);
    let id = h.submit(dir_request(CONFIG)).await;
    assert!(matches!(s.next(), Some(D::Prepare(_))));
    h.core.handle(tick());
    assert_eq!(h.call(ClientCall::ListSlaves).unwrap().slaves.len(), 1);
    h.clock.advance(Duration::from_secs(60));
    h.core.handle(tick());
    assert!(h.call(ClientCall::ListSlaves).unwrap().slaves.is_empty());
    // Its preparation went back to the queue.
    assert_eq!(state(&h.build(id)), proto::BuildState::Queued);
}

#[tokio::test]
async fn builds_resume_after_a_restart() {
    let store = Store::temporary().unwrap();
    let id;
    {
        let mut h = Harness::with_store(store.clone());
        let mut s = h.slave("s", 1);
        id = h.submit(dir_request(CONFIG)).await;
        assert!(matches!(s.next(), Some(D::Prepare(_))));
        h.prepared(&s, id, job(0, 0), atoms(2)).await;
        assert!(matches!(s.next(), Some(D::Setup(_))));
        h.setup_ok(&s, id);
        let r = run_subjobs(&s.all()).pop().unwrap();
        h.complete(&s, &r, 0, 0.3);
        // The result is acknowledged to the slave once committed: then it survives.
        h.commit_all().await;
    }
    // A new core over the same database: one subjob done, one to run.
    let mut h = Harness::with_store(store);
    h.recover().await;
    let b = h.build(id);
    assert_eq!(state(&b), proto::BuildState::Building);
    assert_eq!(b.completed_subjobs, 1);
    let mut s = h.slave("s", 1);
    // Within the resume grace nothing is dispatched: the slave that ran it may still report it.
    assert!(s.next().is_none());
    h.clock.advance(Duration::from_secs(6));
    h.core.handle(tick());
    assert!(matches!(s.next(), Some(D::Setup(_))));
    h.setup_ok(&s, id);
    let runs = run_subjobs(&s.all());
    assert_eq!(runs.len(), 1);
    h.complete(&s, &runs[0], 0, 0.3);
    h.run_results().await;
    let b = h.build(id);
    assert_eq!(state(&b), proto::BuildState::Finished);
    assert_eq!(b.completed_atoms, 2);
}

/// A storage error while a build runs ends it in ERROR with the reason; a final state the disk
/// refused is written again once storage works, so a restart finds the same final state (it
/// used to find the build still BUILDING and finish it: ERROR became FINISHED).
#[tokio::test]
async fn a_storage_error_fails_the_build_and_its_final_state_reaches_the_disk() {
    let store = Store::temporary().unwrap();
    let id;
    let stored_state = |store: &Store, id: u64| {
        store
            .load_builds()
            .unwrap()
            .into_iter()
            .find_map(|r| r.build.filter(|b| b.id == id))
            .map(|b| proto::BuildState::try_from(b.state).unwrap())
    };
    {
        let mut h = Harness::with_store(store.clone());
        let mut s = h.slave("s", 1);
        id = h.submit(dir_request(CONFIG)).await;
        assert!(matches!(s.next(), Some(D::Prepare(_))));
        h.prepared(&s, id, job(0, 0), atoms(2)).await;
        assert!(matches!(s.next(), Some(D::Setup(_))));
        h.setup_ok(&s, id);
        let r = run_subjobs(&s.all()).pop().unwrap();
        h.commit_all().await;
        assert_eq!(stored_state(&store, id), Some(proto::BuildState::Building));
        store.fail_writes(true);
        h.complete(&s, &r, 0, 0.3);
        // The commit holding the result fails: the build ends in ERROR with the reason.
        h.commit_all().await;
        let b = h.build(id);
        assert_eq!(state(&b), proto::BuildState::Error, "{b:#?}");
        assert!(b.error_message.contains("Too many open files"), "{b:#?}");
        assert_eq!(stored_state(&store, id), Some(proto::BuildState::Building));
        // No retry at the rate commands arrive: the next is at the next tick.
        h.build(id);
        assert!(!h.core.flushing);
        // Still failing: still not on disk, and the core keeps answering.
        h.core.handle(tick());
        h.commit_all().await;
        assert_eq!(stored_state(&store, id), Some(proto::BuildState::Building));
        assert_eq!(state(&h.build(id)), proto::BuildState::Error);
        store.fail_writes(false);
        h.core.handle(tick());
        h.commit_all().await;
        assert_eq!(stored_state(&store, id), Some(proto::BuildState::Error));
    }
    let mut h = Harness::with_store(store);
    h.recover().await;
    let b = h.build(id);
    assert_eq!(state(&b), proto::BuildState::Error);
    assert!(b.error_message.contains("Too many open files"), "{b:#?}");
}

/// An inline config is parsed once, at submit: the preparing slave gets the parsed job, not the
/// text to parse again — after a restart too.
#[tokio::test]
async fn the_preparing_slave_gets_the_inline_config_parsed() {
    let store = Store::temporary().unwrap();
    let expected = ish_core::jobconfig::parse_inline_config_str(CONFIG, Some("Job")).unwrap();
    let id = {
        let mut h = Harness::with_store(store.clone());
        let id = h.submit(dir_request(CONFIG)).await;
        let mut s = h.slave("s", 1);
        match s.next() {
            Some(D::Prepare(p)) => {
                assert_eq!(p.job.as_ref(), Some(&expected));
                assert_eq!(p.config_json, "", "the text is not sent beside it");
            }
            other => panic!("expected Prepare, got {other:?}"),
        }
        id
    };
    let mut h = Harness::with_store(store);
    h.recover().await;
    let mut s = h.slave("s", 1);
    match s.next() {
        Some(D::Prepare(p)) => {
            assert_eq!(p.build_id, id);
            assert_eq!(p.job, Some(expected));
            assert_eq!(p.config_json, "");
        }
        other => panic!("expected Prepare, got {other:?}"),
    }
}

/// `atoms_override` is kept apart from the build record: not echoed by status reads (which are
/// made on every poll), yet still sent to the preparing slave after a restart, and forgotten
/// once the build is final.
#[tokio::test]
async fn atoms_override_survives_a_restart_but_is_not_echoed() {
    let store = Store::temporary().unwrap();
    let mut req = dir_request(CONFIG);
    req.atoms_override = atoms(3);
    let id = {
        let mut h = Harness::with_store(store.clone());
        h.submit(req).await
    };
    let mut h = Harness::with_store(store.clone());
    h.recover().await;
    let b = h.build(id);
    let echoed = b.request.unwrap();
    assert!(echoed.atoms_override.is_empty());
    assert!(!echoed.request_params_json.contains("atoms_override"));
    let mut s = h.slave("s", 1);
    match s.next() {
        Some(D::Prepare(p)) => assert_eq!(p.atoms_override, atoms(3)),
        other => panic!("expected Prepare, got {other:?}"),
    }
    assert_eq!(store.atoms_override(id).unwrap(), atoms(3));
    h.call(|r| ClientCall::Cancel(BuildId(id), r)).unwrap();
    h.commit_all().await;
    assert!(store.atoms_override(id).unwrap().is_empty());
}

/// A slave that kept running through a master restart reports its attempt on reconnecting: the
/// master adopts it (no second dispatch, no second setup), records what it finished meanwhile,
/// and the build completes with each atom counted once.
#[tokio::test]
async fn a_restarted_master_adopts_work_a_slave_kept_running() {
    let store = Store::temporary().unwrap();
    let (id, r0, r1);
    {
        let mut h = Harness::with_store(store.clone());
        let mut s = h.slave("s", 2);
        id = h.submit(dir_request(CONFIG)).await;
        assert!(matches!(s.next(), Some(D::Prepare(_))));
        h.prepared(&s, id, job(0, 0), atoms(3)).await;
        assert!(matches!(s.next(), Some(D::Setup(_))));
        h.setup_ok(&s, id);
        let runs = run_subjobs(&s.all());
        assert_eq!(runs.len(), 2);
        (r0, r1) = (runs[0].clone(), runs[1].clone());
    }
    let mut h = Harness::with_store(store);
    h.recover().await;
    // The slave reconnects: attempt r0 finished meanwhile, r1 is still running.
    let (tx, rx) = mpsc::channel(1024);
    let result = |r: &proto::RunSubjob| proto::AtomResult {
        build_id: id,
        subjob_id: r.subjob_id,
        atom_id: r.atoms[0].atom_id,
        attempt: r.attempt,
        exit_code: 0,
        seconds: 0.5,
        artifact_files: 0,
        ..Default::default()
    };
    let reg = proto::Register {
        name: "s".into(),
        executors: 2,
        attempts: vec![
            proto::AttemptReport {
                build_id: id,
                subjob_id: r0.subjob_id,
                attempt: r0.attempt,
                executor_index: r0.executor_index,
                build_executor_index: r0.build_executor_index,
                results: vec![result(&r0)],
                done: true,
            },
            proto::AttemptReport {
                build_id: id,
                subjob_id: r1.subjob_id,
                attempt: r1.attempt,
                executor_index: r1.executor_index,
                build_executor_index: r1.build_executor_index,
                results: vec![],
                done: false,
            },
        ],
        builds: vec![proto::HeldBuild {
            build_id: id,
            set_up: true,
        }],
        ..Default::default()
    };
    let sid = h.call(|r| SlaveEvent::Connected(reg, tx, r)).unwrap().0;
    let mut s = FakeSlave { id: sid, rx };
    assert!(matches!(s.next(), Some(D::Registered(_))));
    // The third subjob waits for the grace; nothing is set up again.
    assert!(s.next().is_none(), "adopted work is not dispatched again");
    let b = h.build(id);
    assert_eq!((b.completed_atoms, b.completed_subjobs), (1, 1));
    h.clock.advance(Duration::from_secs(6));
    h.core.handle(tick());
    let third = run_subjobs(&s.all());
    assert_eq!(
        third.len(),
        1,
        "the free executor gets the remaining subjob, without a new setup"
    );
    assert_ne!(third[0].subjob_id, r0.subjob_id);
    assert_ne!(third[0].subjob_id, r1.subjob_id);
    h.complete(&s, &r1, 0, 0.5);
    h.complete(&s, &third[0], 0, 0.5);
    // A duplicate report of r0's result changes nothing.
    h.from(&s, Up::AtomResult(result(&r0)));
    h.run_results().await;
    let b = h.build(id);
    assert_eq!(state(&b), proto::BuildState::Finished);
    assert_eq!(b.completed_atoms, 3);
    let subjobs = h.subjob_page(id, 0, 0).await.unwrap();
    assert!(
        subjobs.subjobs.iter().all(|s| s.attempts == 1),
        "{subjobs:?}"
    );
}

/// Work a reconnecting slave holds that the master gave to someone else, or for a build that
/// ended, is dropped; a workspace of an ended build is torn down.
#[tokio::test]
async fn unwanted_reported_work_is_dropped() {
    let mut h = Harness::new();
    let mut a = h.slave("a", 1);
    let id = h.submit(dir_request(CONFIG)).await;
    assert!(matches!(a.next(), Some(D::Prepare(_))));
    h.prepared(&a, id, job(0, 0), atoms(1)).await;
    assert!(matches!(a.next(), Some(D::Setup(_))));
    h.setup_ok(&a, id);
    let r = run_subjobs(&a.all()).pop().unwrap();
    // Another slave ("b") comes back claiming a stale attempt of the same subjob, and a build
    // that does not exist.
    let (tx, rx) = mpsc::channel(1024);
    let reg = proto::Register {
        name: "b".into(),
        executors: 1,
        attempts: vec![proto::AttemptReport {
            build_id: id,
            subjob_id: r.subjob_id,
            attempt: r.attempt + 1000,
            done: false,
            ..Default::default()
        }],
        builds: vec![
            proto::HeldBuild {
                build_id: id,
                set_up: true,
            },
            proto::HeldBuild {
                build_id: 999,
                set_up: true,
            },
        ],
        ..Default::default()
    };
    let sid = h.call(|rp| SlaveEvent::Connected(reg, tx, rp)).unwrap().0;
    let mut b = FakeSlave { id: sid, rx };
    let msgs = b.all();
    assert!(
        msgs.iter()
            .any(|m| matches!(m, D::Teardown(t) if t.build_id == 999)),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| matches!(m, D::DropAttempt(d) if d.attempt == r.attempt + 1000)),
        "{msgs:?}"
    );
}

#[tokio::test]
async fn a_draining_slave_gets_no_new_work() {
    let mut h = Harness::new();
    let mut s = h.slave("s", 2);
    let ids = h
        .call(|reply| ClientCall::Drain {
            ids: vec![SlaveId(s.id)],
            all: false,
            reply,
        })
        .unwrap();
    assert_eq!(ids, [SlaveId(s.id)]);
    assert!(matches!(s.next(), Some(D::Drain(_))));
    h.submit(dir_request(CONFIG)).await;
    assert!(s.next().is_none());
    let err = h
        .call(|reply| ClientCall::Drain {
            ids: vec![SlaveId(99)],
            all: false,
            reply,
        })
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

/// The slave forgets an attempt when acknowledged, so the ack must follow the flush that makes
/// its results durable.
#[tokio::test]
async fn subjob_acks_wait_for_the_flush() {
    let mut h = Harness::new();
    let mut s = h.slave("s", 1);
    let id = h.submit(dir_request(CONFIG)).await;
    assert!(matches!(s.next(), Some(D::Prepare(_))));
    h.prepared(&s, id, job(0, 0), atoms(1)).await;
    assert!(matches!(s.next(), Some(D::Setup(_))));
    h.setup_ok(&s, id);
    let r = run_subjobs(&s.all()).pop().unwrap();
    h.complete(&s, &r, 0, 0.1);
    let raw = |s: &mut FakeSlave| {
        std::iter::from_fn(|| s.rx.try_recv().ok().and_then(|m| m.msg)).collect::<Vec<_>>()
    };
    assert!(
        !raw(&mut s).iter().any(|m| matches!(m, D::SubjobAck(_))),
        "no ack before the flush"
    );
    h.commit_all().await;
    assert!(
        raw(&mut s)
            .iter()
            .any(|m| matches!(m, D::SubjobAck(a) if a.attempt == r.attempt)),
        "ack after the flush"
    );
}

/// A subjob whose slaves keep dying is retried on other slaves up to the budget, then the build
/// errors instead of burning the fleet forever.
#[tokio::test]
async fn lost_subjobs_are_retried_up_to_the_budget() {
    let mut h = Harness::new();
    let id = {
        let mut s = h.slave("s0", 1);
        let id = h.submit(dir_request(CONFIG)).await;
        assert!(matches!(s.next(), Some(D::Prepare(_))));
        h.prepared(&s, id, job(0, 0), atoms(1)).await;
        h.core
            .handle(SlaveEvent::Disconnected(SlaveId(s.id)).into());
        id
    };
    for i in 1..=5 {
        let mut s = h.slave(&format!("s{i}"), 1);
        assert!(matches!(s.next(), Some(D::Setup(_))), "try {i}");
        h.setup_ok(&s, id);
        assert_eq!(run_subjobs(&s.all()).len(), 1, "try {i}");
        h.core
            .handle(SlaveEvent::Disconnected(SlaveId(s.id)).into());
    }
    let b = h.build(id);
    assert_eq!(state(&b), proto::BuildState::Error);
    assert!(
        b.error_message.contains("interrupted 5 times"),
        "{}",
        b.error_message
    );
}

/// A slave that cannot get the project (fetch, disk) hands the preparation to another slave; a
/// config error is the project's and ends the build at once.
#[tokio::test]
async fn a_failed_fetch_is_retried_on_another_slave() {
    let mut h = Harness::new();
    let mut a = h.slave("a", 1);
    let mut b = h.slave("b", 1);
    let id = h.submit(dir_request(CONFIG)).await;
    let (first, mut second) = if matches!(a.next(), Some(D::Prepare(_))) {
        (a, b)
    } else {
        assert!(matches!(b.next(), Some(D::Prepare(_))));
        (b, a)
    };
    h.from(
        &first,
        Up::Prepared(proto::PrepareResult {
            build_id: id,
            error: "failed to fetch https://x: No space left on device".into(),
            retryable: true,
            ..Default::default()
        }),
    );
    assert!(
        matches!(second.next(), Some(D::Prepare(_))),
        "the other slave prepares it"
    );
    assert_eq!(state(&h.build(id)), proto::BuildState::Preparing);
    h.from(
        &second,
        Up::Prepared(proto::PrepareResult {
            build_id: id,
            error: "No jobs found in the config.".into(),
            ..Default::default()
        }),
    );
    let b = h.build(id);
    assert_eq!(state(&b), proto::BuildState::Error);
    assert_eq!(b.error_message, "No jobs found in the config.");
}

/// A final build keeps only a summary in memory: its atoms live in the store, and every read
/// (status with failed and flaky atoms, subjob pages, console paths) answers from there, the
/// same before and after a restart.
#[tokio::test]
async fn a_final_build_is_evicted_and_still_answers_from_the_store() {
    let store = Store::temporary().unwrap();
    let mut h = Harness::with_store(store.clone());
    let mut s = h.slave("s", 3);
    let id = h.submit(dir_request(CONFIG)).await;
    assert!(matches!(s.next(), Some(D::Prepare(_))));
    h.prepared(&s, id, job(0, 0), atoms(3)).await;
    assert!(matches!(s.next(), Some(D::Setup(_))));
    h.setup_ok(&s, id);
    let runs = run_subjobs(&s.all());
    assert_eq!(runs.len(), 3);
    // Subjob 0 fails, subjob 1 passes on its second try (flaky), subjob 2 passes.
    for (r, (exit_code, tries)) in runs.iter().zip([(3, 1), (0, 2), (0, 1)]) {
        h.atom_done(&s, r, r.atoms[0].atom_id, exit_code, tries, 0.5);
        h.from(
            &s,
            Up::SubjobDone(proto::SubjobDone {
                build_id: id,
                subjob_id: r.subjob_id,
                attempt: r.attempt,
            }),
        );
    }
    h.run_results().await;
    assert!(h.core.builds[&id].subjobs.is_empty(), "atoms evicted");

    async fn answers(
        h: &mut Harness,
        id: u64,
    ) -> (
        proto::Build,
        proto::ListSubjobsResponse,
        proto::ListSubjobsResponse,
        std::path::PathBuf,
        bool,
    ) {
        let b = h.build(id);
        let all = h.subjob_page(id, 0, 0).await.unwrap();
        let page = h.subjob_page(id, 1, 1).await.unwrap();
        let console = h.console(AtomRef::new(id, 2, 0)).await.unwrap();
        let bad_subjob = h.console(AtomRef::new(id, 3, 0)).await;
        let bad_atom = h.console(AtomRef::new(id, 0, 1)).await;
        assert!(matches!(bad_subjob, Err(MasterError::NotFound(_))));
        assert!(matches!(bad_atom, Err(MasterError::NotFound(_))));
        (b, all, page, console.path, console.complete)
    }
    let before = answers(&mut h, id).await;
    let (b, all, page, path, complete) = before.clone();
    assert_eq!(state(&b), proto::BuildState::Finished);
    assert_eq!(b.num_subjobs, 3);
    assert_eq!(b.completed_atoms, 3);
    assert_eq!(b.failed_atom_count, 1);
    assert_eq!(b.flaky_atom_count, 1);
    let ids = |v: &[proto::Atom]| v.iter().map(|a| (a.subjob_id, a.id)).collect::<Vec<_>>();
    assert_eq!(ids(&b.failed_atoms), [(0, 0)]);
    assert_eq!(b.failed_atoms[0].exit_code, Some(3));
    assert_eq!(ids(&b.flaky_atoms), [(1, 0)]);
    assert_eq!(all.total, 3);
    assert_eq!(all.subjobs.len(), 3);
    for (i, sj) in all.subjobs.iter().enumerate() {
        assert_eq!(sj.id, i as u32);
        assert_eq!(sj.state, proto::SubjobState::Completed as i32);
        assert_eq!(sj.slave, "s");
        assert_eq!(sj.atoms.len(), 1);
        assert_eq!(sj.atoms[0].state, proto::AtomState::Completed as i32);
    }
    assert_eq!(all.subjobs[0].atoms[0].exit_code, Some(3));
    assert_eq!(page.total, 3);
    assert_eq!(page.subjobs, all.subjobs[1..2]);
    assert_eq!(path, h.core.layout.atom_dir(id, 2, 0).join(CONSOLE_FILE));
    assert!(complete);

    // A new master over the same database answers the same, without loading the atoms.
    drop(h);
    let mut h = Harness::with_store(store);
    h.recover().await;
    assert!(h.core.builds[&id].subjobs.is_empty());
    let after = answers(&mut h, id).await;
    assert_eq!(after.0, before.0);
    assert_eq!(after.1, before.1);
    assert_eq!(after.2, before.2);
    assert_eq!(after.4, before.4);
    assert_eq!(after.3, h.core.layout.atom_dir(id, 2, 0).join(CONSOLE_FILE));
}

/// Queue dispatch batches short atoms (by their recorded times); a slave lost mid-batch hands
/// back only the atoms it had not reported, and every atom is counted exactly once.
#[tokio::test]
async fn queue_batches_of_short_atoms_survive_a_slave_lost_mid_batch() {
    let mut h = Harness::new();
    let names = atoms(40);
    h.store
        .merge_timings(
            "dir:/tmp/p//",
            "Job",
            names.iter().map(|n| (n.as_str(), 0.001)),
        )
        .unwrap();
    let mut a = h.slave("a", 1);
    let id = h.submit(dir_request(CONFIG)).await;
    assert!(matches!(a.next(), Some(D::Prepare(_))));
    h.prepared(&a, id, job(0, 0), names.clone()).await;
    let subjobs = h.build(id).num_subjobs;
    assert!(
        (2..40).contains(&subjobs),
        "{subjobs} subjobs for 40 short atoms"
    );
    assert!(matches!(a.next(), Some(D::Setup(_))));
    h.setup_ok(&a, id);
    let r = run_subjobs(&a.all()).pop().unwrap();
    assert!(r.atoms.len() > 1, "a batch, not one atom");
    for w in &r.atoms[..2] {
        h.atom_done(&a, &r, w.atom_id, 0, 1, 0.001);
    }
    let mut b = h.slave("b", 1);
    h.core
        .handle(SlaveEvent::Disconnected(SlaveId(a.id)).into());
    assert!(matches!(b.next(), Some(D::Setup(_))));
    h.setup_ok(&b, id);
    let mut first = true;
    loop {
        let runs = run_subjobs(&b.all());
        if runs.is_empty() {
            break;
        }
        for rb in runs {
            if first {
                assert_eq!(
                    rb.subjob_id, r.subjob_id,
                    "the interrupted batch goes first"
                );
                let rest: Vec<u32> = r.atoms[2..].iter().map(|w| w.atom_id).collect();
                let resent: Vec<u32> = rb.atoms.iter().map(|w| w.atom_id).collect();
                assert_eq!(resent, rest);
                first = false;
            }
            h.complete(&b, &rb, 0, 0.001);
        }
    }
    let archives = h.run_results().await;
    let bld = h.build(id);
    assert_eq!(state(&bld), proto::BuildState::Finished);
    assert_eq!(bld.completed_atoms, 40);
    let (_, mut dirs, failures) = archives.into_iter().next().unwrap();
    assert!(failures.is_empty());
    dirs.sort();
    dirs.dedup();
    assert_eq!(dirs.len(), 40, "every atom archived once");
}

/// A shutdown lets go of every slave stream (so the slaves reconnect to the next master),
/// answers, and stops the actor; commands before it go on.
#[tokio::test]
async fn shutdown_releases_the_slaves_and_stops_the_actor() {
    let mut h = Harness::new();
    let mut s = h.slave("s", 1);
    assert_eq!(h.core.handle(tick()), Flow::Continue);
    let (tx, mut done) = oneshot::channel();
    assert_eq!(h.core.handle(Internal::Shutdown(tx).into()), Flow::Stop);
    assert!(done.try_recv().is_ok(), "the shutdown is answered");
    assert!(h.core.slaves.is_empty());
    assert!(s.next().is_none());
    assert_eq!(
        s.rx.try_recv().unwrap_err(),
        mpsc::error::TryRecvError::Disconnected,
        "the slave's stream ends"
    );
}

/// Attempt ids name directories and let slaves report work after a restart: ids handed out
/// before a crash whose reservation never reached the disk are not handed out again.
#[tokio::test]
async fn attempt_ids_never_repeat_across_a_restart_before_their_reservation_is_stored() {
    let store = Store::temporary().unwrap();
    let before = {
        let mut h = Harness::with_store(store.clone());
        let mut s = h.slave("s", 2);
        let id = h.submit(dir_request(CONFIG)).await;
        assert!(matches!(s.next(), Some(D::Prepare(_))));
        h.prepared(&s, id, job(0, 0), atoms(2)).await;
        assert!(matches!(s.next(), Some(D::Setup(_))));
        h.setup_ok(&s, id);
        // Dispatched; the master "crashes" before the commit with the reservation.
        run_subjobs(&s.all())
            .iter()
            .map(|r| r.attempt)
            .collect::<Vec<_>>()
    };
    assert_eq!(before.len(), 2);
    let mut h = Harness::with_store(store);
    h.recover().await;
    let mut s = h.slave("s2", 2);
    // Its slave never came back: once the resume grace is over, the work is dispatched again.
    h.clock
        .advance(h.core.cfg.resume_grace + Duration::from_millis(1));
    h.core.handle(tick());
    assert!(matches!(s.next(), Some(D::Setup(_))));
    let id = h.core.active.first().copied().unwrap();
    h.setup_ok(&s, id);
    let after: Vec<u64> = run_subjobs(&s.all()).iter().map(|r| r.attempt).collect();
    assert_eq!(after.len(), 2, "both subjobs dispatched again");
    assert!(
        after.iter().all(|a| !before.contains(a)),
        "{before:?} then {after:?}"
    );
}
