//! What a slave process holds and does, across connections to the master.
//!
//! The [`Worker`] outlives sessions: when the master goes away (restart, network blip) running
//! work keeps running. Everything the slave says goes through one ordered outbox that the current
//! session drains; while there is no session, control messages wait in it and console chunks are
//! dropped: streamed console is for watching, the console of record is uploaded with the atom's
//! artifacts, so nothing is lost with a session. On reconnection the slave reports the attempts and builds it holds
//! ([`Worker::report`]); the master adopts what it still wants and drops the rest.
//!
//! Every message of one atom is sent by one task, so the master sees AtomStarted → console →
//! AtomResult in order, and an AtomResult is only sent after the atom's upload has completed.
use crate::artifacts::{DirPool, artifact_files, dir_is_empty};
use crate::config::SlaveConfig;
use crate::console::{Console, ConsoleTail};
use crate::error::{AtomizerError, HookError, PrepareError, ProjectError, SetupError};
use crate::link::MasterLink;
use crate::project::{self, Workspace, Workspaces};
use crate::runner::{self, CommandRunner, CommandSpec};
use ish_core::auth::SecretInterceptor;
use ish_core::jobconfig;
use ish_core::proto::{self, master_message::Msg as Down, slave_message::Msg as Up};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bytes of setup/teardown/atomizer output kept for error messages.
const ERROR_TAIL: usize = 4 * 1024;
/// Messages waiting for a session before senders wait. Console chunks are up to 64 KiB, so
/// this bounds what a slow master makes the slave hold (16 MiB), whatever an atom prints.
const OUTBOX: usize = 256;

/// Settings and services every part of the slave shares.
#[derive(Debug)]
pub struct Shared {
    /// Settings.
    pub cfg: SlaveConfig,
    /// The secret interceptor.
    pub auth: SecretInterceptor,
    /// Name registered with the master.
    pub name: String,
    /// Random id of this process.
    pub session_id: String,
    /// Repo cache and workspaces.
    pub workspaces: Workspaces,
    /// Downloads of `remote_files`.
    pub downloader: crate::remote::Downloader,
    /// The slave's own variables every command gets (the allow-list, read at start).
    pub inherited_env: Vec<(String, String)>,
    /// What runs commands: processes under the reaper ([`runner::Processes`]), or a test's fake.
    pub runner: Arc<dyn CommandRunner>,
}

/// The live session, as the worker's tasks see it.
#[derive(Debug, Clone)]
pub struct Live {
    /// Increases with every session; console chunks are only sent within their atom's session.
    pub epoch: u64,
    /// Id the master gave this slave in this session.
    pub slave_id: u64,
    /// The master's end of uploads.
    pub link: Arc<dyn MasterLink>,
}

/// A build on this slave.
#[derive(Debug)]
pub struct BuildCtx {
    id: u64,
    /// Tells this workspace of the build apart from an earlier or later one on this slave.
    seq: u64,
    /// Stops the build's processes.
    cancel: CancellationToken,
    /// Its prepare/setup/subjob tasks.
    tasks: TaskTracker,
    /// What Prepare and Setup learnt, read by the build's later work.
    state: Mutex<BuildState>,
    /// setup_build was started here, so teardown_build must run.
    setup_ran: AtomicBool,
    /// The workspace exists (a Prepare or Setup finished).
    held: AtomicBool,
    /// Setup succeeded: subjobs may run.
    set_up: AtomicBool,
}

impl BuildCtx {
    fn new(id: u64, seq: u64) -> Self {
        Self {
            id,
            seq,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            state: Mutex::default(),
            setup_ran: AtomicBool::new(false),
            held: AtomicBool::new(false),
            set_up: AtomicBool::new(false),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BuildState> {
        self.state.lock().expect("poisoned")
    }

    fn workspace(&self) -> Option<Workspace> {
        self.state().ws.clone()
    }

    fn job(&self) -> Option<proto::JobConfig> {
        self.state().job.clone()
    }

    fn env(&self) -> Vec<(String, String)> {
        self.state().env.clone()
    }
}

/// A build's workspace, job config and `env` (later entries win), once Prepare or Setup set them.
#[derive(Debug, Default)]
struct BuildState {
    ws: Option<Workspace>,
    job: Option<proto::JobConfig>,
    env: Vec<(String, String)>,
}

/// What the slave holds for the master: its builds and the attempts it has not acknowledged.
/// One lock, so a report to a new session sees builds and attempts at one instant.
#[derive(Debug, Default)]
struct Held {
    builds: HashMap<u64, Arc<BuildCtx>>,
    attempts: BTreeMap<u64, AttemptState>,
}

/// An attempt this slave runs (or ran and the master has not acknowledged yet).
#[derive(Debug)]
struct AttemptState {
    run: proto::RunSubjob,
    /// Results of finished (and uploaded) atoms.
    results: Vec<proto::AtomResult>,
    done: bool,
    cancel: CancellationToken,
}

/// What one slave process holds across sessions. See the module docs.
#[derive(Debug)]
pub struct Worker {
    /// Settings and services.
    pub shared: Arc<Shared>,
    held: Mutex<Held>,
    outbox: mpsc::Sender<Up>,
    /// Taken by the current session's pump.
    pub outbox_rx: tokio::sync::Mutex<mpsc::Receiver<Up>>,
    live: watch::Sender<Option<Live>>,
    grace: Duration,
    next_seq: std::sync::atomic::AtomicU64,
    art_dirs: DirPool,
}

impl Worker {
    /// A worker with nothing held.
    pub fn new(shared: Arc<Shared>) -> Arc<Self> {
        let pool_root = shared.cfg.data_dir.join("builds").join(".artifact-dirs");
        let (outbox, rx) = mpsc::channel(OUTBOX);
        let (live, _) = watch::channel(None);
        Arc::new(Self {
            grace: Duration::from_millis(shared.cfg.kill_grace_ms),
            shared,
            held: Mutex::default(),
            outbox,
            outbox_rx: tokio::sync::Mutex::new(rx),
            live,
            next_seq: std::sync::atomic::AtomicU64::new(1),
            art_dirs: DirPool {
                root: pool_root,
                free: Mutex::default(),
                next: std::sync::atomic::AtomicU64::new(1),
            },
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().expect("poisoned")
    }

    /// Publishes the live session (or its end, with `None`).
    pub fn set_live(&self, live: Option<Live>) {
        self.live.send_replace(live);
    }

    fn epoch(&self) -> u64 {
        self.live.borrow().as_ref().map(|l| l.epoch).unwrap_or(0)
    }

    /// Queues a control message for the master (waits while the outbox is full).
    async fn send(&self, msg: Up) {
        let _ = self.outbox.send(msg).await;
    }

    /// True when nothing waits in the outbox.
    pub fn outbox_empty(&self) -> bool {
        self.outbox.capacity() == OUTBOX
    }

    fn build(&self, id: u64) -> Arc<BuildCtx> {
        self.held()
            .builds
            .entry(id)
            .or_insert_with(|| {
                let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
                Arc::new(BuildCtx::new(id, seq))
            })
            .clone()
    }

    fn existing(&self, id: u64) -> Option<Arc<BuildCtx>> {
        self.held().builds.get(&id).cloned()
    }

    fn all_builds(&self) -> Vec<Arc<BuildCtx>> {
        self.held().builds.values().cloned().collect()
    }

    /// What this slave holds, for its Register: attempts not acknowledged yet, and builds with a
    /// workspace.
    pub fn report(&self) -> (Vec<proto::AttemptReport>, Vec<proto::HeldBuild>) {
        let held = self.held();
        let attempts = held
            .attempts
            .values()
            .map(|a| proto::AttemptReport {
                build_id: a.run.build_id,
                subjob_id: a.run.subjob_id,
                attempt: a.run.attempt,
                executor_index: a.run.executor_index,
                build_executor_index: a.run.build_executor_index,
                results: a.results.clone(),
                done: a.done,
            })
            .collect();
        let builds = held
            .builds
            .values()
            .filter(|b| b.held.load(Ordering::SeqCst))
            .map(|b| proto::HeldBuild {
                build_id: b.id,
                set_up: b.set_up.load(Ordering::SeqCst),
            })
            .collect();
        (attempts, builds)
    }

    /// True when no prepare, setup or subjob runs.
    pub fn idle(&self) -> bool {
        self.all_builds().iter().all(|b| b.tasks.is_empty())
    }

    /// Stops every process of every build.
    pub fn cancel_all(&self) {
        for b in self.all_builds() {
            b.cancel.cancel();
        }
    }

    /// Tears down every build this slave holds (leaving the cluster).
    pub async fn teardown_all(self: &Arc<Self>) {
        for b in self.all_builds() {
            let r = self.teardown(&b).await;
            if !r.ok {
                tracing::warn!(build = b.id, error = %r.error, "teardown failed");
            }
        }
    }

    /// Reacts to one message of the master. Work runs in tasks of `tasks`; nothing here waits.
    pub fn handle(self: &Arc<Self>, tasks: &mut JoinSet<()>, msg: Down) {
        match msg {
            // Drain is the session's business; Registered and Heartbeat only prove liveness.
            Down::Registered(_) | Down::Heartbeat(_) | Down::Drain(_) => {}
            Down::Prepare(p) => {
                let b = self.build(p.build_id);
                let w = self.clone();
                tasks.spawn(b.tasks.clone().track_future(async move {
                    let result = w.prepare(&b, p).await;
                    w.send(Up::Prepared(result)).await;
                }));
            }
            Down::Setup(s) => {
                let b = self.build(s.build_id);
                let w = self.clone();
                tasks.spawn(b.tasks.clone().track_future(async move {
                    let result = w.setup(&b, s).await;
                    w.send(Up::Setup(result)).await;
                }));
            }
            Down::RunSubjob(r) => {
                let b = self.build(r.build_id);
                let cancel = b.cancel.child_token();
                self.held().attempts.insert(
                    r.attempt,
                    AttemptState {
                        run: r.clone(),
                        results: Vec::new(),
                        done: false,
                        cancel: cancel.clone(),
                    },
                );
                let w = self.clone();
                tasks.spawn(b.tasks.clone().track_future(async move {
                    w.run_subjob(&b, r, cancel).await;
                }));
            }
            Down::Cancel(c) => {
                if let Some(b) = self.existing(c.build_id) {
                    tracing::info!(build = c.build_id, "canceling build");
                    b.cancel.cancel();
                }
            }
            Down::Teardown(t) => {
                let w = self.clone();
                // Work that arrives for the build after this Teardown gets a fresh workspace;
                // this one is finished and deleted in the background.
                let ctx = {
                    let mut held = self.held();
                    let ctx = held.builds.remove(&t.build_id);
                    if ctx.is_some() {
                        // The master wants nothing more of this build here.
                        held.attempts.retain(|_, a| a.run.build_id != t.build_id);
                    }
                    ctx
                };
                tasks.spawn(async move {
                    let result = match ctx {
                        Some(b) => w.teardown(&b).await,
                        None => proto::TeardownDone {
                            build_id: t.build_id,
                            ok: true,
                            error: String::new(),
                        },
                    };
                    w.send(Up::TeardownDone(result)).await;
                });
            }
            Down::SubjobAck(a) => {
                self.held().attempts.remove(&a.attempt);
            }
            Down::DropAttempt(d) => {
                if let Some(a) = self.held().attempts.remove(&d.attempt) {
                    tracing::info!(
                        build = d.build_id,
                        attempt = d.attempt,
                        "the master dropped an attempt; stopping it"
                    );
                    a.cancel.cancel();
                }
            }
        }
    }

    /// Runs a build's setup or teardown command; a failure carries the end of its output.
    async fn run_hook(
        &self,
        hook: &'static str,
        spec: CommandSpec,
        cancel: CancellationToken,
    ) -> Result<(), HookError> {
        let run = runner::capture_with(&*self.shared.runner, spec, cancel, self.grace, ERROR_TAIL);
        match run.await {
            Err(source) => Err(HookError::Start { hook, source }),
            Ok((o, out)) if o.exit_code != 0 => Err(HookError::Exited {
                hook,
                code: o.exit_code,
                tail: tail_text(&out),
            }),
            Ok(_) => Ok(()),
        }
    }

    /// An atomizer's whole output (or its size when over `limit`).
    async fn run_collect(
        &self,
        spec: CommandSpec,
        cancel: CancellationToken,
        limit: usize,
    ) -> std::io::Result<runner::Collected> {
        runner::collect_with(&*self.shared.runner, spec, cancel, self.grace, limit).await
    }

    /// Environment of every command of a build: the allowed part of the slave's own, the build's
    /// `env`, then what Ish CD sets (later entries win).
    fn base_env(&self, b: &BuildCtx, ws: &Workspace) -> Vec<(String, String)> {
        let mut env = self.shared.inherited_env.clone();
        env.extend(b.env());
        env.push(("PROJECT_DIR".into(), ws.project_dir.display().to_string()));
        env.push(("ISH_BUILD_ID".into(), b.id.to_string()));
        env.push(("ISH_SLAVE_NAME".into(), self.shared.name.clone()));
        env
    }

    async fn materialize(
        &self,
        b: &BuildCtx,
        spec: proto::ProjectSpec,
    ) -> Result<Workspace, ProjectError> {
        if let Some(ws) = b.workspace()
            && (spec.commit.is_empty() || ws.commit == spec.commit || ws.commit.is_empty())
        {
            return Ok(ws);
        }
        let workspaces = self.shared.workspaces.clone();
        let id = b.id;
        let remote_files = spec.remote_files.clone();
        let seq = b.seq;
        let ws =
            tokio::task::spawn_blocking(move || workspaces.materialize(id, seq, &spec)).await??;
        self.shared
            .downloader
            .fetch_all(&ws.project_dir, &remote_files)
            .await
            .map_err(ProjectError::RemoteFile)?;
        b.state().ws = Some(ws.clone());
        Ok(ws)
    }

    async fn prepare(&self, b: &BuildCtx, p: proto::Prepare) -> proto::PrepareResult {
        let mut result = proto::PrepareResult {
            build_id: p.build_id,
            ..Default::default()
        };
        if let Err(e) = self.prepare_into(b, p, &mut result).await {
            result.retryable = e.retryable();
            result.error = e.to_string();
        }
        result
    }

    /// Fills `result` as far as it gets: the commit and project directory stay set when the
    /// job config or an atomizer fails afterwards.
    async fn prepare_into(
        &self,
        b: &BuildCtx,
        p: proto::Prepare,
        result: &mut proto::PrepareResult,
    ) -> Result<(), PrepareError> {
        b.state().env = p.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let ws = self.materialize(b, p.project.unwrap_or_default()).await?;
        b.held.store(true, Ordering::SeqCst);
        result.commit = ws.commit.clone();
        result.project_dir = ws.project_dir.display().to_string();
        let dir = ws.project_dir.clone();
        let (job_name, config_json) = (p.job_name, p.config_json);
        let job = match p.job {
            // Parsed and validated by the master at submit: used as is.
            Some(job) => job,
            None => tokio::task::spawn_blocking(move || {
                project::load_job(&dir, &job_name, &config_json)
            })
            .await
            .map_err(PrepareError::JobConfigTask)?
            .map_err(PrepareError::JobConfig)?,
        };
        if !p.atoms_override.is_empty() {
            result.atoms = p.atoms_override;
        } else {
            let project_dir = ws.project_dir.display().to_string();
            for a in &job.atomizers {
                let spec = CommandSpec {
                    script: a.command.clone(),
                    cwd: ws.project_dir.clone(),
                    env: self.base_env(b, &ws),
                };
                let limit = self.shared.cfg.max_atomizer_output;
                let out = match self.run_collect(spec, b.cancel.child_token(), limit).await {
                    Err(e) => return Err(AtomizerError::Start(e).into()),
                    Ok((o, _)) if o.canceled => return Err(AtomizerError::Canceled.into()),
                    Ok((_, Err(total))) => {
                        return Err(AtomizerError::TooMuchOutput { total, limit }.into());
                    }
                    Ok((o, Ok(out))) if o.exit_code != 0 => {
                        let out = String::from_utf8_lossy(&out);
                        let start = out.len().saturating_sub(ERROR_TAIL);
                        let start = (start..out.len())
                            .find(|&i| out.is_char_boundary(i))
                            .unwrap_or(out.len());
                        return Err(AtomizerError::Exited {
                            command: a.command.clone(),
                            code: o.exit_code,
                            tail: out[start..].trim_end().to_string(),
                        }
                        .into());
                    }
                    Ok((_, Ok(out))) => out,
                };
                let out = String::from_utf8_lossy(&out);
                result.atoms.extend(jobconfig::atoms_from_output(
                    &a.variable,
                    &out,
                    &project_dir,
                ));
            }
        }
        b.state().job = Some(job.clone());
        result.job = Some(job);
        Ok(())
    }

    async fn setup(&self, b: &BuildCtx, s: proto::Setup) -> proto::SetupResult {
        let build_id = s.build_id;
        let (ok, error) = match self.set_up(b, s).await {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e.to_string()),
        };
        proto::SetupResult {
            build_id,
            ok,
            error,
        }
    }

    async fn set_up(&self, b: &BuildCtx, s: proto::Setup) -> Result<(), SetupError> {
        b.state().env = s.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let job = s.job.clone().unwrap_or_default();
        b.state().job = Some(job.clone());
        let ws = self.materialize(b, s.project.unwrap_or_default()).await?;
        b.held.store(true, Ordering::SeqCst);
        b.setup_ran.store(true, Ordering::SeqCst);
        if !job.setup_build.is_empty() {
            let spec = CommandSpec {
                script: job.setup_build.clone(),
                cwd: ws.project_dir.clone(),
                env: self.base_env(b, &ws),
            };
            self.run_hook("setup_build", spec, b.cancel.child_token())
                .await?;
        }
        b.set_up.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn teardown(&self, b: &Arc<BuildCtx>) -> proto::TeardownDone {
        // Wait for the build's running work (after a cancel it is being killed).
        b.tasks.close();
        b.tasks.wait().await;
        let mut result = proto::TeardownDone {
            build_id: b.id,
            ok: true,
            error: String::new(),
        };
        let ran_setup = b.setup_ran.swap(false, Ordering::SeqCst);
        if let (true, Some(job), Some(ws)) = (ran_setup, b.job(), b.workspace())
            && !job.teardown_build.is_empty()
        {
            let spec = CommandSpec {
                script: job.teardown_build.clone(),
                cwd: ws.project_dir.clone(),
                env: self.base_env(b, &ws),
            };
            // Teardown is not stopped by the build's cancel: it is the clean-up after one.
            let hook = self.run_hook("teardown_build", spec, CancellationToken::new());
            if let Err(e) = hook.await {
                result.ok = false;
                result.error = e.to_string();
            }
        }
        let workspaces = self.shared.workspaces.clone();
        let id = b.id;
        let seq = b.seq;
        let _ = tokio::task::spawn_blocking(move || workspaces.remove(id, seq)).await;
        {
            // Only this workspace's record: new work for the build may already have its own.
            let mut held = self.held();
            let builds = &mut held.builds;
            if builds.get(&b.id).is_some_and(|cur| Arc::ptr_eq(cur, b)) {
                builds.remove(&b.id);
            }
        }
        self.held().attempts.retain(|_, a| a.run.build_id != b.id);
        result
    }

    async fn run_subjob(&self, b: &BuildCtx, r: proto::RunSubjob, cancel: CancellationToken) {
        let done = proto::SubjobDone {
            build_id: r.build_id,
            subjob_id: r.subjob_id,
            attempt: r.attempt,
        };
        let (Some(ws), Some(job)) = (b.workspace(), b.job()) else {
            tracing::warn!(
                build = r.build_id,
                "subjob for a build that is not set up here; handing it back"
            );
            self.send(Up::SubjobDone(done)).await;
            return;
        };
        for atom in &r.atoms {
            if cancel.is_cancelled() {
                break;
            }
            let Some(result) = self.run_atom(b, &ws, &job, &r, atom, &cancel).await else {
                break;
            };
            if let Some(a) = self.held().attempts.get_mut(&r.attempt) {
                a.results.push(result);
            }
            self.send(Up::AtomResult(result)).await;
        }
        if let Some(a) = self.held().attempts.get_mut(&r.attempt) {
            a.done = true;
        }
        self.send(Up::SubjobDone(done)).await;
    }

    /// Runs one atom and uploads its artifacts; returns its result, or `None` when the master
    /// no longer wants this attempt.
    async fn run_atom(
        &self,
        b: &BuildCtx,
        ws: &Workspace,
        job: &proto::JobConfig,
        r: &proto::RunSubjob,
        atom: &proto::AtomWork,
        cancel: &CancellationToken,
    ) -> Option<proto::AtomResult> {
        let name = format!("artifact_{}_{}", r.subjob_id, atom.atom_id);
        let art_dir = self.art_dirs.take().await;
        // Used only by a console too large for memory (the directory is made then).
        let console_path = ws
            .build_dir
            .join("consoles")
            .join(format!("{}_{name}", r.attempt));
        let epoch0 = self.epoch();
        self.send(Up::AtomStarted(proto::AtomStarted {
            build_id: r.build_id,
            subjob_id: r.subjob_id,
            atom_id: atom.atom_id,
            attempt: r.attempt,
        }))
        .await;
        let mut env = self.base_env(b, ws);
        env.extend([
            ("ARTIFACT_DIR".to_string(), art_dir.display().to_string()),
            ("ATOM_ID".to_string(), atom.atom_id.to_string()),
            ("EXECUTOR_INDEX".to_string(), r.executor_index.to_string()),
            (
                "MACHINE_EXECUTOR_INDEX".to_string(),
                r.executor_index.to_string(),
            ),
            (
                "BUILD_EXECUTOR_INDEX".to_string(),
                r.build_executor_index.to_string(),
            ),
        ]);
        let spec = CommandSpec {
            script: jobconfig::atom_command(&atom.command_string, &job.commands),
            cwd: ws.project_dir.clone(),
            env,
        };
        let chunk_of = |data: Vec<u8>| {
            Up::Console(proto::ConsoleChunk {
                build_id: r.build_id,
                subjob_id: r.subjob_id,
                atom_id: atom.atom_id,
                attempt: r.attempt,
                data,
            })
        };
        let (otx, mut orx) = mpsc::channel::<Vec<u8>>(64);
        // Output is kept (the whole console, for an upload after an interruption: in memory while
        // small, in a local file past that) and, while the atom's session lasts, goes to the
        // master as it is written.
        let cap = self.shared.cfg.max_console_bytes_per_atom;
        let forward = async {
            let mut tail = ConsoleTail::new(&console_path, cap);
            let mut interrupted = epoch0 == 0;
            while let Some(mut data) = orx.recv().await {
                while data.len() < runner::CHUNK {
                    match orx.try_recv() {
                        Ok(more) => data.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                tail.write(&data).await;
                interrupted = interrupted || self.epoch() != epoch0;
                // Past the cap only the tail is kept, and it goes up with the artifacts.
                if !interrupted && !tail.cut() {
                    self.send(chunk_of(data)).await;
                }
            }
            tail.finish().await
        };
        let timeout = (job.atom_timeout_seconds > 0)
            .then(|| Duration::from_secs(job.atom_timeout_seconds.into()));
        let max_tries = 1 + job.retries;
        // Tries run one after the other; their output (and our notes between them) go to the one
        // console of the atom. `otx` moves in, so the console ends when the last try does.
        let runs = async {
            let otx = otx;
            let mut tries = 0;
            loop {
                tries += 1;
                let run_cancel = cancel.child_token();
                let run = self.shared.runner.run(
                    spec.clone(),
                    Some(otx.clone()),
                    run_cancel.clone(),
                    self.grace,
                );
                tokio::pin!(run);
                let mut timed_out = false;
                let result = match timeout {
                    Some(t) => tokio::select! {
                        r = &mut run => r,
                        _ = tokio::time::sleep(t) => {
                            timed_out = true;
                            run_cancel.cancel();
                            run.await
                        }
                    },
                    None => run.await,
                };
                let outcome = result.unwrap_or_else(|e| {
                    tracing::error!(error = %e, "could not start an atom");
                    runner::Outcome {
                        exit_code: -1,
                        seconds: 0.0,
                        canceled: false,
                    }
                });
                if let (true, Some(t)) = (timed_out, timeout) {
                    let note = format!(
                        "\n[ish] the atom timed out after {} s; its processes were killed\n",
                        t.as_secs()
                    );
                    let _ = otx.send(note.into_bytes()).await;
                }
                if outcome.exit_code == 0 || tries >= max_tries || cancel.is_cancelled() {
                    break (outcome, tries, timed_out);
                }
                let note = format!(
                    "\n[ish] try {tries} of {max_tries} failed with exit code {}; running the atom again\n",
                    outcome.exit_code
                );
                let _ = otx.send(note.into_bytes()).await;
                // Each try starts with an empty ARTIFACT_DIR: only the last try's files count.
                if !dir_is_empty(&art_dir).await {
                    let _ = tokio::fs::remove_dir_all(&art_dir).await;
                    let _ = tokio::fs::create_dir_all(&art_dir).await;
                }
            }
        };
        let ((outcome, tries, timed_out), mut console) = tokio::join!(runs, forward);
        let listing = {
            let dir = art_dir.clone();
            tokio::task::spawn_blocking(move || artifact_files(&dir))
                .await
                .unwrap_or_default()
        };
        if !listing.notes.is_empty() {
            let notes = listing.notes.concat();
            console.append(notes.as_bytes()).await;
            self.send(chunk_of(notes.into_bytes())).await;
        }
        // The streamed console is for watching; the console of record goes with the artifacts,
        // so a session lost while chunks were in flight loses nothing.
        let header = proto::UploadHeader {
            slave_id: 0,
            build_id: r.build_id,
            subjob_id: r.subjob_id,
            atom_id: atom.atom_id,
            attempt: r.attempt,
        };
        let uploaded = self
            .upload_with_retry(header, listing.files, &console, cancel)
            .await;
        self.art_dirs.give(art_dir).await;
        if let Console::File(path) = &console {
            let _ = tokio::fs::remove_file(path).await;
        }
        let (artifact_files, exit_code) = match uploaded? {
            Uploaded::Files(n) => (n, outcome.exit_code),
            // Its results are incomplete: a passing atom must not count as a pass.
            Uploaded::Refused => (
                0,
                if outcome.exit_code == 0 {
                    1
                } else {
                    outcome.exit_code
                },
            ),
        };
        Some(proto::AtomResult {
            build_id: r.build_id,
            subjob_id: r.subjob_id,
            atom_id: atom.atom_id,
            attempt: r.attempt,
            exit_code,
            seconds: outcome.seconds,
            artifact_files,
            tries,
            timed_out,
        })
    }
}

fn tail_text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).trim_end().to_string()
}

// `upload_with_retry`, a method of the worker in a file of its own.
mod upload;

/// What became of an atom's upload.
#[derive(Debug, Clone, Copy)]
enum Uploaded {
    /// Stored: this many files.
    Files(u32),
    /// The master could not store it.
    Refused,
}

#[cfg(test)]
mod tests;
