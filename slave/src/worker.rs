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
use crate::config::SlaveConfig;
use crate::project::{self, Workspace, Workspaces};
use crate::runner::{self, CommandSpec};
use ish_core::auth::SecretInterceptor;
use ish_core::jobconfig;
use ish_core::proto::{self, master_message::Msg as Down, slave_message::Msg as Up};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The gRPC client of the slave link, with the cluster secret attached.
pub type LinkClient =
    proto::slave_link_client::SlaveLinkClient<InterceptedService<Channel, SecretInterceptor>>;

/// Bytes per upload message.
const UPLOAD_CHUNK: usize = 256 * 1024;
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
}

/// The live session, as the worker's tasks see it.
#[derive(Debug, Clone)]
pub struct Live {
    /// Increases with every session; console chunks are only sent within their atom's session.
    pub epoch: u64,
    /// Id the master gave this slave in this session.
    pub slave_id: u64,
    /// Client for uploads.
    pub link: LinkClient,
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
    ws: Mutex<Option<Workspace>>,
    job: Mutex<Option<proto::JobConfig>>,
    env: Mutex<Vec<(String, String)>>,
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
            ws: Mutex::new(None),
            job: Mutex::new(None),
            env: Mutex::new(Vec::new()),
            setup_ran: AtomicBool::new(false),
            held: AtomicBool::new(false),
            set_up: AtomicBool::new(false),
        }
    }

    fn workspace(&self) -> Option<Workspace> {
        self.ws.lock().expect("poisoned").clone()
    }

    fn job(&self) -> Option<proto::JobConfig> {
        self.job.lock().expect("poisoned").clone()
    }

    fn env(&self) -> Vec<(String, String)> {
        self.env.lock().expect("poisoned").clone()
    }
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
    builds: Mutex<HashMap<u64, Arc<BuildCtx>>>,
    attempts: Mutex<BTreeMap<u64, AttemptState>>,
    outbox: mpsc::Sender<Up>,
    /// Taken by the current session's pump.
    pub outbox_rx: tokio::sync::Mutex<mpsc::Receiver<Up>>,
    live: watch::Sender<Option<Live>>,
    grace: Duration,
    next_seq: std::sync::atomic::AtomicU64,
    art_dirs: DirPool,
}

/// Empty directories handed out as `$ARTIFACT_DIR`, taken back while still empty: most atoms
/// write no artifact, and creating and deleting a directory per atom was a large share of a
/// trivial atom's cost (ext4 inode allocation, seen with perf).
#[derive(Debug)]
struct DirPool {
    root: PathBuf,
    free: Mutex<Vec<PathBuf>>,
    next: std::sync::atomic::AtomicU64,
}

impl DirPool {
    async fn take(&self) -> PathBuf {
        if let Some(d) = self.free.lock().expect("poisoned").pop() {
            return d;
        }
        let d = self
            .root
            .join(self.next.fetch_add(1, Ordering::SeqCst).to_string());
        if let Err(e) = tokio::fs::create_dir_all(&d).await {
            tracing::error!(error = %e, dir = %d.display(), "cannot create ARTIFACT_DIR");
        }
        d
    }

    /// Keeps an empty directory for the next atom; deletes one with files (already uploaded).
    async fn give(&self, d: PathBuf) {
        if dir_is_empty(&d).await {
            self.free.lock().expect("poisoned").push(d);
        } else {
            let _ = tokio::fs::remove_dir_all(&d).await;
        }
    }
}

async fn dir_is_empty(d: &Path) -> bool {
    match tokio::fs::read_dir(d).await {
        Ok(mut rd) => matches!(rd.next_entry().await, Ok(None)),
        Err(_) => false,
    }
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
            builds: Mutex::default(),
            attempts: Mutex::default(),
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
        self.builds
            .lock()
            .expect("poisoned")
            .entry(id)
            .or_insert_with(|| {
                let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
                Arc::new(BuildCtx::new(id, seq))
            })
            .clone()
    }

    fn existing(&self, id: u64) -> Option<Arc<BuildCtx>> {
        self.builds.lock().expect("poisoned").get(&id).cloned()
    }

    fn all_builds(&self) -> Vec<Arc<BuildCtx>> {
        self.builds
            .lock()
            .expect("poisoned")
            .values()
            .cloned()
            .collect()
    }

    /// What this slave holds, for its Register: attempts not acknowledged yet, and builds with a
    /// workspace.
    pub fn report(&self) -> (Vec<proto::AttemptReport>, Vec<proto::HeldBuild>) {
        let attempts = self
            .attempts
            .lock()
            .expect("poisoned")
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
        let builds = self
            .all_builds()
            .into_iter()
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
                self.attempts.lock().expect("poisoned").insert(
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
                let ctx = self.builds.lock().expect("poisoned").remove(&t.build_id);
                if let Some(b) = &ctx {
                    // The master wants nothing more of this build here.
                    self.attempts
                        .lock()
                        .expect("poisoned")
                        .retain(|_, a| a.run.build_id != b.id);
                }
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
                self.attempts.lock().expect("poisoned").remove(&a.attempt);
            }
            Down::DropAttempt(d) => {
                if let Some(a) = self.attempts.lock().expect("poisoned").remove(&d.attempt) {
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
    ) -> Result<Workspace, String> {
        if let Some(ws) = b.workspace()
            && (spec.commit.is_empty() || ws.commit == spec.commit || ws.commit.is_empty())
        {
            return Ok(ws);
        }
        let workspaces = self.shared.workspaces.clone();
        let id = b.id;
        let remote_files = spec.remote_files.clone();
        let seq = b.seq;
        let ws = tokio::task::spawn_blocking(move || workspaces.materialize(id, seq, &spec))
            .await
            .map_err(|e| format!("fetching the project failed: {e}"))??;
        self.shared
            .downloader
            .fetch_all(&ws.project_dir, &remote_files)
            .await?;
        *b.ws.lock().expect("poisoned") = Some(ws.clone());
        Ok(ws)
    }

    async fn prepare(&self, b: &BuildCtx, p: proto::Prepare) -> proto::PrepareResult {
        let mut result = proto::PrepareResult {
            build_id: p.build_id,
            ..Default::default()
        };
        *b.env.lock().expect("poisoned") =
            p.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let ws = match self.materialize(b, p.project.unwrap_or_default()).await {
            Ok(ws) => ws,
            Err(e) => {
                // Getting the project is infrastructure: another slave may manage.
                result.error = e;
                result.retryable = true;
                return result;
            }
        };
        b.held.store(true, Ordering::SeqCst);
        result.commit = ws.commit.clone();
        result.project_dir = ws.project_dir.display().to_string();
        let dir = ws.project_dir.clone();
        let (job_name, config_json) = (p.job_name, p.config_json);
        let job = match tokio::task::spawn_blocking(move || {
            project::load_job(&dir, &job_name, &config_json)
        })
        .await
        {
            Ok(Ok(job)) => job,
            Ok(Err(e)) => {
                result.error = e;
                return result;
            }
            Err(e) => {
                result.error = format!("loading the job config failed: {e}");
                return result;
            }
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
                match runner::run_collect(spec, b.cancel.child_token(), self.grace, limit).await {
                    Err(e) => {
                        result.error = format!("Atomizer command failed! Could not start it: {e}");
                        return result;
                    }
                    Ok((o, _)) if o.canceled => {
                        result.error = "Atomizer canceled.".into();
                        return result;
                    }
                    Ok((_, Err(total))) => {
                        result.error = format!(
                            "Atomizer command failed! Its output ({total} bytes) is larger than the limit of {limit} bytes."
                        );
                        return result;
                    }
                    Ok((o, Ok(out))) if o.exit_code != 0 => {
                        let out = String::from_utf8_lossy(&out);
                        let start = out.len().saturating_sub(ERROR_TAIL);
                        let start = (start..out.len())
                            .find(|&i| out.is_char_boundary(i))
                            .unwrap_or(out.len());
                        result.error = format!(
                            "Atomizer command failed! `{}` exited with code {}. Output:\n{}",
                            a.command,
                            o.exit_code,
                            out[start..].trim_end()
                        );
                        return result;
                    }
                    Ok((_, Ok(out))) => {
                        let out = String::from_utf8_lossy(&out);
                        result.atoms.extend(jobconfig::atoms_from_output(
                            &a.variable,
                            &out,
                            &project_dir,
                        ));
                    }
                }
            }
        }
        *b.job.lock().expect("poisoned") = Some(job.clone());
        result.job = Some(job);
        result
    }

    async fn setup(&self, b: &BuildCtx, s: proto::Setup) -> proto::SetupResult {
        let fail = |error: String| proto::SetupResult {
            build_id: s.build_id,
            ok: false,
            error,
        };
        *b.env.lock().expect("poisoned") =
            s.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let job = s.job.clone().unwrap_or_default();
        *b.job.lock().expect("poisoned") = Some(job.clone());
        let ws = match self
            .materialize(b, s.project.clone().unwrap_or_default())
            .await
        {
            Ok(ws) => ws,
            Err(e) => return fail(e),
        };
        b.held.store(true, Ordering::SeqCst);
        b.setup_ran.store(true, Ordering::SeqCst);
        if !job.setup_build.is_empty() {
            let spec = CommandSpec {
                script: job.setup_build.clone(),
                cwd: ws.project_dir.clone(),
                env: self.base_env(b, &ws),
            };
            match runner::run_capture(spec, b.cancel.child_token(), self.grace, ERROR_TAIL).await {
                Err(e) => return fail(format!("setup_build could not start: {e}")),
                Ok((o, out)) if o.exit_code != 0 => {
                    return fail(format!(
                        "setup_build exited with code {}. Output:\n{}",
                        o.exit_code,
                        tail_text(&out)
                    ));
                }
                Ok(_) => {}
            }
        }
        b.set_up.store(true, Ordering::SeqCst);
        proto::SetupResult {
            build_id: s.build_id,
            ok: true,
            error: String::new(),
        }
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
            match runner::run_capture(spec, CancellationToken::new(), self.grace, ERROR_TAIL).await
            {
                Err(e) => {
                    result.ok = false;
                    result.error = format!("teardown_build could not start: {e}");
                }
                Ok((o, out)) if o.exit_code != 0 => {
                    result.ok = false;
                    result.error = format!(
                        "teardown_build exited with code {}. Output:\n{}",
                        o.exit_code,
                        tail_text(&out)
                    );
                }
                Ok(_) => {}
            }
        }
        let workspaces = self.shared.workspaces.clone();
        let id = b.id;
        let seq = b.seq;
        let _ = tokio::task::spawn_blocking(move || workspaces.remove(id, seq)).await;
        {
            // Only this workspace's record: new work for the build may already have its own.
            let mut builds = self.builds.lock().expect("poisoned");
            if builds.get(&b.id).is_some_and(|cur| Arc::ptr_eq(cur, b)) {
                builds.remove(&b.id);
            }
        }
        self.attempts
            .lock()
            .expect("poisoned")
            .retain(|_, a| a.run.build_id != b.id);
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
            if let Some(a) = self.attempts.lock().expect("poisoned").get_mut(&r.attempt) {
                a.results.push(result);
            }
            self.send(Up::AtomResult(result)).await;
        }
        if let Some(a) = self.attempts.lock().expect("poisoned").get_mut(&r.attempt) {
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
        let console_path = ws
            .build_dir
            .join("consoles")
            .join(format!("{}_{name}", r.attempt));
        if let Some(parent) = console_path.parent() {
            let _ = tokio::fs::create_dir_all(parent).await;
        }
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
        // Output goes to a local file (the whole console, for an upload after an interruption)
        // and, while the atom's session lasts, to the master as it is written.
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
            tail.finish().await;
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
                let run = runner::run(
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
        let ((outcome, tries, timed_out), ()) = tokio::join!(runs, forward);
        let listing = {
            let dir = art_dir.clone();
            tokio::task::spawn_blocking(move || artifact_files(&dir))
                .await
                .unwrap_or_default()
        };
        if !listing.notes.is_empty() {
            let notes = listing.notes.concat();
            append_console(&console_path, notes.as_bytes()).await;
            self.send(chunk_of(notes.into_bytes())).await;
        }
        // The streamed console is for watching; the console of record goes with the artifacts,
        // so a session lost while chunks were in flight loses nothing.
        let has_output = tokio::fs::metadata(&console_path)
            .await
            .is_ok_and(|m| m.len() > 0);
        let console = has_output.then_some(console_path.as_path());
        let header = proto::UploadHeader {
            slave_id: 0,
            build_id: r.build_id,
            subjob_id: r.subjob_id,
            atom_id: atom.atom_id,
            attempt: r.attempt,
        };
        let manifest_path = console_path.with_extension("manifest");
        let uploaded = self
            .upload_with_retry(header, listing.files, console, &manifest_path, cancel)
            .await;
        self.art_dirs.give(art_dir).await;
        let _ = tokio::fs::remove_file(&console_path).await;
        let _ = tokio::fs::remove_file(&manifest_path).await;
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

    /// Uploads an atom's files, waiting for a session when there is none and retrying when one
    /// fails. `None` when the master refused the attempt (it was dropped) or the attempt was
    /// canceled; an upload the master cannot store (over a limit, disk full) is reported in the
    /// console, not retried, and makes the atom a failure.
    ///
    /// A manifest of every file and its size goes first, so that the master can tell a file an
    /// interrupted or refused upload cut short from a whole one and leave it out of the results.
    async fn upload_with_retry(
        &self,
        mut header: proto::UploadHeader,
        mut files: Vec<ArtifactFile>,
        console: Option<&Path>,
        manifest_path: &Path,
        cancel: &CancellationToken,
    ) -> Option<Uploaded> {
        if let Some(c) = console {
            let size = tokio::fs::metadata(c).await.map(|m| m.len()).unwrap_or(0);
            files.push(ArtifactFile {
                name: crate::CONSOLE_FILE.to_string(),
                path: c.to_path_buf(),
                size,
            });
        }
        if files.is_empty() {
            return Some(Uploaded::Files(0));
        }
        let count = files.len() as u32;
        let manifest: Vec<(&str, u64)> = files.iter().map(|f| (f.name.as_str(), f.size)).collect();
        let manifest = serde_json::to_vec(&manifest).expect("names and sizes serialize");
        let mut files: Vec<(String, PathBuf)> =
            files.into_iter().map(|f| (f.name, f.path)).collect();
        match tokio::fs::write(manifest_path, manifest).await {
            Ok(()) => files.insert(
                0,
                (
                    crate::UPLOAD_MANIFEST.to_string(),
                    manifest_path.to_path_buf(),
                ),
            ),
            // Without it the upload still works; only a cut file could not be told apart.
            Err(e) => tracing::warn!(error = %e, "could not write an upload manifest"),
        }
        let mut live_rx = self.live.subscribe();
        loop {
            let live = loop {
                if let Some(l) = live_rx.borrow_and_update().clone() {
                    break l;
                }
                tokio::select! {
                    r = live_rx.changed() => if r.is_err() { return None },
                    _ = cancel.cancelled() => return None,
                }
            };
            header.slave_id = live.slave_id;
            match upload(live.link.clone(), header, files.clone()).await {
                Ok(_) => return Some(Uploaded::Files(count)),
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    tracing::info!(
                        attempt = header.attempt,
                        "the master no longer wants this attempt's upload"
                    );
                    return None;
                }
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) =>
                {
                    tracing::warn!(attempt = header.attempt, error = %s.message(), "upload interrupted; retrying in the next session");
                    // Wait for another session (or this one to be declared gone).
                    tokio::select! {
                        r = live_rx.changed() => if r.is_err() { return None },
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
                Err(s) => {
                    tracing::warn!(attempt = header.attempt, error = %s.message(), "artifact upload refused");
                    let note = format!(
                        "\n[ish] artifact upload refused: {}; the atom is recorded as failed\n",
                        s.message()
                    );
                    // The master keeps the streamed console when no uploaded one arrives.
                    self.send(Up::Console(proto::ConsoleChunk {
                        build_id: header.build_id,
                        subjob_id: header.subjob_id,
                        atom_id: header.atom_id,
                        attempt: header.attempt,
                        data: note.into_bytes(),
                    }))
                    .await;
                    return Some(Uploaded::Refused);
                }
            }
        }
    }
}

/// What became of an atom's upload.
#[derive(Debug, Clone, Copy)]
enum Uploaded {
    /// Stored: this many files.
    Files(u32),
    /// The master could not store it.
    Refused,
}

/// An atom's console on the slave's disk, bounded: it is written in two segment files of `cap / 2`
/// bytes used in turn, so past `cap` bytes only the last `cap / 2` to `cap` bytes are kept;
/// `finish` writes them (after a note saying how much was cut) to the console file.
struct ConsoleTail {
    path: PathBuf,
    cap: u64,
    segs: [PathBuf; 2],
    file: Option<tokio::fs::File>,
    live: usize,
    live_len: u64,
    total: u64,
    rotated: bool,
}

impl ConsoleTail {
    fn new(path: &Path, cap: u64) -> Self {
        let seg = |i: u32| path.with_extension(format!("seg{i}"));
        Self {
            path: path.to_path_buf(),
            cap: cap.max(2),
            segs: [seg(0), seg(1)],
            file: None,
            live: 0,
            live_len: 0,
            total: 0,
            rotated: false,
        }
    }

    /// True once more than `cap` bytes were written.
    fn cut(&self) -> bool {
        self.total > self.cap
    }

    async fn write(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        let half = self.cap / 2;
        while !data.is_empty() {
            if self.live_len >= half {
                // The other segment is older than anything in this one: reuse it.
                self.live = 1 - self.live;
                self.live_len = 0;
                self.file = None;
                self.rotated = true;
            }
            if self.file.is_none() {
                self.file = tokio::fs::File::create(&self.segs[self.live]).await.ok();
            }
            let n = data.len().min((half - self.live_len) as usize);
            if let Some(f) = self.file.as_mut()
                && f.write_all(&data[..n]).await.is_err()
            {
                self.file = None;
            }
            self.live_len += n as u64;
            data = &data[n..];
        }
    }

    /// Writes the console file; true when output was cut.
    async fn finish(mut self) -> bool {
        if let Some(mut f) = self.file.take() {
            let _ = f.flush().await;
        }
        let cut = self.cut();
        let result: std::io::Result<()> = async {
            if !self.rotated {
                // No output, no file: nothing to create (or upload) for a silent atom.
                match tokio::fs::rename(&self.segs[self.live], &self.path).await {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    other => other,
                }
            } else {
                // Streamed, not read into memory: a tail can be tens of megabytes.
                let mut parts = Vec::new();
                if self.rotated {
                    parts.push(&self.segs[1 - self.live]);
                }
                parts.push(&self.segs[self.live]);
                let mut kept = 0;
                for p in &parts {
                    kept += tokio::fs::metadata(p).await.map(|m| m.len()).unwrap_or(0);
                }
                let mut out = tokio::fs::File::create(&self.path).await?;
                if kept < self.total {
                    let note = format!(
                        "[ish] console output cut: the first {} of {} bytes were dropped (max_console_bytes_per_atom)\n",
                        self.total - kept,
                        self.total
                    );
                    out.write_all(note.as_bytes()).await?;
                }
                for p in parts {
                    if let Ok(mut f) = tokio::fs::File::open(p).await {
                        tokio::io::copy(&mut f, &mut out).await?;
                    }
                }
                out.flush().await
            }
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not write an atom's console file");
        }
        for seg in &self.segs {
            let _ = tokio::fs::remove_file(seg).await;
        }
        cut
    }
}

fn tail_text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).trim_end().to_string()
}

/// One file an atom left in `$ARTIFACT_DIR`.
#[derive(Debug, Clone, PartialEq)]
struct ArtifactFile {
    /// Name in the results (relative to `$ARTIFACT_DIR`, `/`-separated, UTF-8).
    name: String,
    /// Where it is.
    path: PathBuf,
    /// Its size when the atom ended.
    size: u64,
}

/// An atom's artifacts and the console notes about them.
#[derive(Debug, Default)]
struct ArtifactListing {
    files: Vec<ArtifactFile>,
    notes: Vec<String>,
}

/// Appends `data` to an atom's console file (creating it: a note may be all an atom printed).
async fn append_console(path: &Path, data: &[u8]) {
    let res = async {
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        f.write_all(data).await?;
        f.flush().await
    }
    .await;
    if let Err(e) = res {
        tracing::warn!(error = %e, "could not add a note to an atom's console");
    }
}

/// A relative path as a name for the results. Names travel as protobuf strings (UTF-8), so a
/// name that is not UTF-8 keeps its valid parts and has each invalid byte written `%XX`: the
/// file is kept and its name stays recognizable; `None` when it already was UTF-8.
fn escaped_name(rel: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = rel.as_os_str().as_bytes();
    if std::str::from_utf8(bytes).is_ok() {
        return None;
    }
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Some(out)
}

/// Regular files under `dir` (symlinks are not followed and not uploaded), as paths relative to
/// `dir`, sorted by name. A name that is not UTF-8 is escaped (see [`escaped_name`]) with a note;
/// when its escaped form is another file's name, or it is the upload manifest's reserved name, it
/// is left out with a note.
fn artifact_files(dir: &Path) -> ArtifactListing {
    let mut plain = Vec::new();
    let mut escaped = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let p = e.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file()
                && let Ok(rel) = p.strip_prefix(dir)
            {
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                match (rel.to_str(), escaped_name(rel)) {
                    (Some(name), _) => plain.push(ArtifactFile {
                        name: name.to_string(),
                        path: p,
                        size,
                    }),
                    (None, Some(name)) => escaped.push((
                        ArtifactFile {
                            name,
                            path: p.clone(),
                            size,
                        },
                        rel.to_string_lossy().into_owned(),
                    )),
                    (None, None) => {}
                }
            }
        }
    }
    let mut notes = Vec::new();
    if let Some(i) = plain.iter().position(|f| f.name == crate::UPLOAD_MANIFEST) {
        plain.remove(i);
        notes.push(format!(
            "[ish] artifact {} left out of the results: the name is reserved for Ish CD's upload manifest\n",
            crate::UPLOAD_MANIFEST
        ));
    }
    let mut taken: std::collections::HashSet<String> =
        plain.iter().map(|f| f.name.clone()).collect();
    escaped.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    for (f, lossy) in escaped {
        if f.name == crate::UPLOAD_MANIFEST || !taken.insert(f.name.clone()) {
            notes.push(format!(
                "[ish] artifact {lossy:?} left out of the results: its name is not UTF-8 and its escaped form {:?} is another file's name\n",
                f.name
            ));
        } else {
            notes.push(format!(
                "[ish] artifact {lossy:?}: its name is not UTF-8; it is in the results as {:?} (each invalid byte written %XX)\n",
                f.name
            ));
            plain.push(f);
        }
    }
    plain.sort_by(|a, b| a.name.cmp(&b.name));
    ArtifactListing {
        files: plain,
        notes,
    }
}

/// One upload of `files` (relative name, local path) for the attempt in `header`.
async fn upload(
    mut link: LinkClient,
    header: proto::UploadHeader,
    files: Vec<(String, PathBuf)>,
) -> Result<u32, tonic::Status> {
    use proto::artifact_chunk::Msg;
    let n = files.len() as u32;
    let (tx, rx) = mpsc::channel(4);
    let producer = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let send = |m: Msg| proto::ArtifactChunk { msg: Some(m) };
        if tx.send(send(Msg::Header(header))).await.is_err() {
            return Ok(());
        }
        for (rel, path) in files {
            let mut f = tokio::fs::File::open(&path)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            let mut sent_any = false;
            loop {
                let k = f
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                if k == 0 {
                    if !sent_any {
                        let last = proto::FileChunk {
                            path: rel.clone(),
                            data: Vec::new(),
                            last: true,
                        };
                        if tx.send(send(Msg::File(last))).await.is_err() {
                            return Ok(());
                        }
                    }
                    break;
                }
                sent_any = true;
                let chunk = proto::FileChunk {
                    path: rel.clone(),
                    data: buf[..k].to_vec(),
                    last: false,
                };
                if tx.send(send(Msg::File(chunk))).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok::<(), String>(())
    });
    let res = link.upload_artifacts(ReceiverStream::new(rx)).await;
    match producer.await {
        Ok(Err(e)) => return Err(tonic::Status::data_loss(format!("reading artifacts: {e}"))),
        Err(e) => return Err(tonic::Status::internal(e.to_string())),
        Ok(Ok(())) => {}
    }
    res?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn names_that_are_not_utf8_are_kept_escaped_and_noted() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("ok.txt"), b"1").unwrap();
        std::fs::write(d.join(std::ffi::OsStr::from_bytes(b"a\xffb")), b"22").unwrap();
        std::fs::write(
            d.join("sub").join(std::ffi::OsStr::from_bytes(b"\xc0x")),
            b"333",
        )
        .unwrap();
        // Its escaped form is taken by a real file: left out, not merged with it.
        std::fs::write(d.join("c%FE"), b"4").unwrap();
        std::fs::write(d.join(std::ffi::OsStr::from_bytes(b"c\xfe")), b"5").unwrap();
        std::fs::write(d.join(crate::UPLOAD_MANIFEST), b"mine").unwrap();
        let l = artifact_files(d);
        let got: Vec<(&str, u64)> = l.files.iter().map(|f| (f.name.as_str(), f.size)).collect();
        assert_eq!(
            got,
            [("a%FFb", 2), ("c%FE", 1), ("ok.txt", 1), ("sub/%C0x", 3)]
        );
        assert_eq!(l.notes.len(), 4, "{:?}", l.notes);
        let notes = l.notes.concat();
        assert!(notes.contains("in the results as \"a%FFb\""), "{notes}");
        assert!(notes.contains("in the results as \"sub/%C0x\""), "{notes}");
        assert!(
            notes.contains(
                "left out of the results: its name is not UTF-8 and its escaped form \"c%FE\""
            ),
            "{notes}"
        );
        assert!(notes.contains(".ish-upload-manifest left out"), "{notes}");
    }

    #[test]
    fn utf8_names_are_not_escaped() {
        assert_eq!(escaped_name(Path::new("dir/naïve %41.txt")), None);
        assert_eq!(
            escaped_name(Path::new(std::ffi::OsStr::from_bytes(b"x/\xe2\x82y"))),
            Some("x/%E2%82y".into())
        );
    }
}
