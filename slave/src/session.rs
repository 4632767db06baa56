//! One connection to the master: register, then do what comes down the stream.
//!
//! The session task reads master messages in order and never blocks on work: every Prepare,
//! Setup, RunSubjob and Teardown runs in its own task, tracked per build so a teardown can wait
//! for the build's running work and a cancel can stop it. Everything the slave says goes up one
//! ordered channel; an atom's messages are sent by a single task, so the master sees
//! AtomStarted → console → AtomResult in that order.
use crate::config::SlaveConfig;
use crate::project::{self, Workspace, Workspaces};
use crate::runner::{self, CommandSpec};
use ish_core::auth::SecretInterceptor;
use ish_core::jobconfig;
use ish_core::proto::{self, master_message::Msg as Down, slave_message::Msg as Up};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
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

/// Why a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The slave was told to stop (SIGTERM): it left cleanly.
    Shutdown,
    /// The master drained this slave: it finished its work and left.
    Drained,
    /// The master refused this slave (wrong secret, bad registration). Retrying will not help.
    Refused(String),
    /// The connection failed or ended; try again.
    Lost(String),
}

/// What every session of this slave process shares.
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
}

/// A build on this slave.
#[derive(Debug)]
struct BuildCtx {
    id: u64,
    /// Stops the build's processes.
    cancel: CancellationToken,
    /// Its prepare/setup/subjob tasks.
    tasks: TaskTracker,
    ws: Mutex<Option<Workspace>>,
    job: Mutex<Option<proto::JobConfig>>,
    env: Mutex<Vec<(String, String)>>,
    /// setup_build was started on this slave, so teardown_build must run.
    setup_ran: AtomicBool,
}

impl BuildCtx {
    fn new(id: u64) -> Self {
        Self {
            id,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            ws: Mutex::new(None),
            job: Mutex::new(None),
            env: Mutex::new(Vec::new()),
            setup_ran: AtomicBool::new(false),
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

/// State of one live session.
#[derive(Clone, Debug)]
struct Ctx {
    shared: Arc<Shared>,
    slave_id: u64,
    tx: mpsc::Sender<proto::SlaveMessage>,
    link: LinkClient,
    builds: Arc<Mutex<HashMap<u64, Arc<BuildCtx>>>>,
    grace: Duration,
}

impl Ctx {
    async fn send(&self, msg: Up) -> bool {
        self.tx
            .send(proto::SlaveMessage { msg: Some(msg) })
            .await
            .is_ok()
    }

    fn build(&self, id: u64) -> Arc<BuildCtx> {
        self.builds
            .lock()
            .expect("poisoned")
            .entry(id)
            .or_insert_with(|| Arc::new(BuildCtx::new(id)))
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
}

/// Connects, registers and serves one session until it ends.
pub async fn run_session(shared: Arc<Shared>, shutdown: CancellationToken) -> SessionEnd {
    let endpoint = match Channel::from_shared(shared.cfg.master.clone()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20)),
        Err(e) => {
            return SessionEnd::Refused(format!("invalid master URL {:?}: {e}", shared.cfg.master));
        }
    };
    let channel = tokio::select! {
        c = endpoint.connect() => match c {
            Ok(c) => c,
            Err(e) => return SessionEnd::Lost(format!("cannot reach the master at {}: {e}", shared.cfg.master)),
        },
        _ = shutdown.cancelled() => return SessionEnd::Shutdown,
    };
    let mut link =
        proto::slave_link_client::SlaveLinkClient::with_interceptor(channel, shared.auth.clone());
    let (tx, rx) = mpsc::channel::<proto::SlaveMessage>(1024);
    let register = proto::SlaveMessage {
        msg: Some(Up::Register(proto::Register {
            name: shared.name.clone(),
            executors: shared.cfg.executors,
            labels: shared.cfg.labels.clone(),
            version: ish_core::VERSION.into(),
            session_id: shared.session_id.clone(),
        })),
    };
    let _ = tx.send(register).await;
    let mut inbound = match link.session(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::Unauthenticated | tonic::Code::InvalidArgument
            ) =>
        {
            return SessionEnd::Refused(s.message().to_string());
        }
        Err(s) => return SessionEnd::Lost(format!("session refused: {}", s.message())),
    };
    let registered = match inbound.message().await {
        Ok(Some(proto::MasterMessage {
            msg: Some(Down::Registered(r)),
        })) => r,
        Ok(_) => return SessionEnd::Lost("the master did not answer the registration".into()),
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::Unauthenticated | tonic::Code::InvalidArgument
            ) =>
        {
            return SessionEnd::Refused(s.message().to_string());
        }
        Err(s) => return SessionEnd::Lost(format!("registration failed: {}", s.message())),
    };
    tracing::info!(slave_id = registered.slave_id, master = %shared.cfg.master, "registered with the master");
    let ctx = Ctx {
        grace: Duration::from_millis(shared.cfg.kill_grace_ms),
        shared,
        slave_id: registered.slave_id,
        tx,
        link,
        builds: Arc::default(),
    };
    // The session owns every task it starts: dropping the session (the slave is aborted) aborts
    // them, and with them the atoms' process groups.
    let mut tasks: JoinSet<()> = JoinSet::new();
    let heartbeat_every =
        Duration::from_millis(registered.heartbeat_interval_ms.clamp(100, 60_000));
    let master_timeout = Duration::from_millis(ctx.shared.cfg.master_timeout_ms);
    let drained = CancellationToken::new();
    let mut beat = tokio::time::interval(heartbeat_every);
    let mut last_heard = Instant::now();
    let end = loop {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(proto::MasterMessage { msg: Some(msg) })) => {
                    last_heard = Instant::now();
                    handle(&ctx, &mut tasks, &drained, msg);
                }
                Ok(Some(_)) => last_heard = Instant::now(),
                Ok(None) => break SessionEnd::Lost("the master ended the session".into()),
                Err(s) => break SessionEnd::Lost(format!("the session failed: {}", s.message())),
            },
            _ = beat.tick() => {
                if last_heard.elapsed() > master_timeout {
                    break SessionEnd::Lost(format!("no word from the master for {master_timeout:?}"));
                }
                let hb = Up::Heartbeat(proto::Heartbeat { sent_at: ish_core::now_epoch() });
                if !ctx.send(hb).await {
                    break SessionEnd::Lost("the session's send queue closed".into());
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = drained.cancelled() => break SessionEnd::Drained,
            _ = shutdown.cancelled() => {
                ctx.send(Up::GoingAway(proto::GoingAway { reason: "shutting down".into() })).await;
                break SessionEnd::Shutdown;
            }
        }
    };
    // Whatever ended the session, nothing of it may keep running: the master re-queues our work.
    for b in ctx.all_builds() {
        b.cancel.cancel();
    }
    let _ = tokio::time::timeout(ctx.grace + Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let leftovers = ctx.all_builds();
    if matches!(end, SessionEnd::Shutdown) {
        let budget = Duration::from_millis(ctx.shared.cfg.shutdown_teardown_ms);
        let _ = tokio::time::timeout(budget, async {
            for b in &leftovers {
                teardown(&ctx, b).await;
            }
        })
        .await;
    }
    for b in leftovers {
        ctx.shared.workspaces.remove(b.id);
    }
    end
}

fn handle(ctx: &Ctx, tasks: &mut JoinSet<()>, drained: &CancellationToken, msg: Down) {
    match msg {
        Down::Registered(_) | Down::Heartbeat(_) => {}
        Down::Prepare(p) => {
            let b = ctx.build(p.build_id);
            let ctx = ctx.clone();
            tasks.spawn(b.tasks.clone().track_future(async move {
                let result = prepare(&ctx, &b, p).await;
                ctx.send(Up::Prepared(result)).await;
            }));
        }
        Down::Setup(s) => {
            let b = ctx.build(s.build_id);
            let ctx = ctx.clone();
            tasks.spawn(b.tasks.clone().track_future(async move {
                let result = setup(&ctx, &b, s).await;
                ctx.send(Up::Setup(result)).await;
            }));
        }
        Down::RunSubjob(r) => {
            let b = ctx.build(r.build_id);
            let ctx = ctx.clone();
            tasks.spawn(b.tasks.clone().track_future(async move {
                run_subjob(&ctx, &b, r).await;
            }));
        }
        Down::Cancel(c) => {
            if let Some(b) = ctx.existing(c.build_id) {
                tracing::info!(build = c.build_id, "canceling build");
                b.cancel.cancel();
            }
        }
        Down::Teardown(t) => {
            let ctx = ctx.clone();
            tasks.spawn(async move {
                let Some(b) = ctx.existing(t.build_id) else {
                    ctx.send(Up::TeardownDone(proto::TeardownDone {
                        build_id: t.build_id,
                        ok: true,
                        error: String::new(),
                    }))
                    .await;
                    return;
                };
                let result = teardown(&ctx, &b).await;
                ctx.send(Up::TeardownDone(result)).await;
            });
        }
        Down::Drain(_) => {
            tracing::info!("draining: finishing current work, then leaving");
            let ctx = ctx.clone();
            let drained = drained.clone();
            tasks.spawn(async move {
                // The master sends no new work to a draining slave; wait for what runs.
                loop {
                    let builds = ctx.all_builds();
                    for b in &builds {
                        b.tasks.close();
                        b.tasks.wait().await;
                    }
                    if builds.iter().all(|b| b.tasks.is_empty()) {
                        break;
                    }
                }
                for b in ctx.all_builds() {
                    let r = teardown(&ctx, &b).await;
                    if !r.ok {
                        tracing::warn!(build = b.id, error = %r.error, "teardown failed while draining");
                    }
                }
                ctx.send(Up::GoingAway(proto::GoingAway { reason: "drained".into() })).await;
                drained.cancel();
            });
        }
    }
}

/// Environment of every command of a build: the build's own `env`, then what Ish CD sets.
fn base_env(ctx: &Ctx, b: &BuildCtx, ws: &Workspace) -> Vec<(String, String)> {
    let mut env = b.env();
    env.push(("PROJECT_DIR".into(), ws.project_dir.display().to_string()));
    env.push(("ISH_BUILD_ID".into(), b.id.to_string()));
    env.push(("ISH_SLAVE_NAME".into(), ctx.shared.name.clone()));
    env
}

async fn materialize(
    ctx: &Ctx,
    b: &BuildCtx,
    spec: proto::ProjectSpec,
) -> Result<Workspace, String> {
    if let Some(ws) = b.workspace()
        && (spec.commit.is_empty() || ws.commit == spec.commit || ws.commit.is_empty())
    {
        return Ok(ws);
    }
    let workspaces = ctx.shared.workspaces.clone();
    let id = b.id;
    let remote_files = spec.remote_files.clone();
    let ws = tokio::task::spawn_blocking(move || workspaces.materialize(id, &spec))
        .await
        .map_err(|e| format!("fetching the project failed: {e}"))??;
    ctx.shared
        .downloader
        .fetch_all(&ws.project_dir, &remote_files)
        .await?;
    *b.ws.lock().expect("poisoned") = Some(ws.clone());
    Ok(ws)
}

fn tail_text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).trim_end().to_string()
}

async fn prepare(ctx: &Ctx, b: &BuildCtx, p: proto::Prepare) -> proto::PrepareResult {
    let mut result = proto::PrepareResult {
        build_id: p.build_id,
        ..Default::default()
    };
    *b.env.lock().expect("poisoned") = p.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let ws = match materialize(ctx, b, p.project.unwrap_or_default()).await {
        Ok(ws) => ws,
        Err(e) => {
            result.error = e;
            return result;
        }
    };
    result.commit = ws.commit.clone();
    result.project_dir = ws.project_dir.display().to_string();
    let dir = ws.project_dir.clone();
    let (job_name, config_json) = (p.job_name, p.config_json);
    let job =
        match tokio::task::spawn_blocking(move || project::load_job(&dir, &job_name, &config_json))
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
                env: base_env(ctx, b, &ws),
            };
            let limit = ctx.shared.cfg.max_atomizer_output;
            match runner::run_collect(spec, b.cancel.child_token(), ctx.grace, limit).await {
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
                    let tail: String = out
                        .chars()
                        .rev()
                        .take(ERROR_TAIL)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    result.error = format!(
                        "Atomizer command failed! `{}` exited with code {}. Output:\n{}",
                        a.command,
                        o.exit_code,
                        tail.trim_end()
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

async fn setup(ctx: &Ctx, b: &BuildCtx, s: proto::Setup) -> proto::SetupResult {
    let fail = |error: String| proto::SetupResult {
        build_id: s.build_id,
        ok: false,
        error,
    };
    *b.env.lock().expect("poisoned") = s.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let job = s.job.clone().unwrap_or_default();
    *b.job.lock().expect("poisoned") = Some(job.clone());
    let ws = match materialize(ctx, b, s.project.clone().unwrap_or_default()).await {
        Ok(ws) => ws,
        Err(e) => return fail(e),
    };
    b.setup_ran.store(true, Ordering::SeqCst);
    if !job.setup_build.is_empty() {
        let spec = CommandSpec {
            script: job.setup_build.clone(),
            cwd: ws.project_dir.clone(),
            env: base_env(ctx, b, &ws),
        };
        match runner::run_capture(spec, b.cancel.child_token(), ctx.grace, ERROR_TAIL).await {
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
    proto::SetupResult {
        build_id: s.build_id,
        ok: true,
        error: String::new(),
    }
}

async fn teardown(ctx: &Ctx, b: &Arc<BuildCtx>) -> proto::TeardownDone {
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
            env: base_env(ctx, b, &ws),
        };
        // Teardown is not stopped by the build's cancel: it is the clean-up after one.
        match runner::run_capture(spec, CancellationToken::new(), ctx.grace, ERROR_TAIL).await {
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
    let workspaces = ctx.shared.workspaces.clone();
    let id = b.id;
    let _ = tokio::task::spawn_blocking(move || workspaces.remove(id)).await;
    ctx.builds.lock().expect("poisoned").remove(&b.id);
    result
}

async fn run_subjob(ctx: &Ctx, b: &BuildCtx, r: proto::RunSubjob) {
    let (Some(ws), Some(job)) = (b.workspace(), b.job()) else {
        tracing::warn!(
            build = r.build_id,
            "subjob for a build that is not set up here; handing it back"
        );
        ctx.send(Up::SubjobDone(proto::SubjobDone {
            build_id: r.build_id,
            subjob_id: r.subjob_id,
            attempt: r.attempt,
        }))
        .await;
        return;
    };
    for atom in &r.atoms {
        if b.cancel.is_cancelled() {
            break;
        }
        if !run_atom(ctx, b, &ws, &job, &r, atom).await {
            break;
        }
    }
    ctx.send(Up::SubjobDone(proto::SubjobDone {
        build_id: r.build_id,
        subjob_id: r.subjob_id,
        attempt: r.attempt,
    }))
    .await;
}

/// Runs one atom and reports it. False when the session is gone.
async fn run_atom(
    ctx: &Ctx,
    b: &BuildCtx,
    ws: &Workspace,
    job: &proto::JobConfig,
    r: &proto::RunSubjob,
    atom: &proto::AtomWork,
) -> bool {
    let art_dir = ws
        .build_dir
        .join("artifacts")
        .join(r.attempt.to_string())
        .join(format!("artifact_{}_{}", r.subjob_id, atom.atom_id));
    let _ = tokio::fs::remove_dir_all(&art_dir).await;
    if let Err(e) = tokio::fs::create_dir_all(&art_dir).await {
        tracing::error!(error = %e, dir = %art_dir.display(), "cannot create ARTIFACT_DIR");
    }
    let started = Up::AtomStarted(proto::AtomStarted {
        build_id: r.build_id,
        subjob_id: r.subjob_id,
        atom_id: atom.atom_id,
        attempt: r.attempt,
    });
    if !ctx.send(started).await {
        return false;
    }
    let mut env = base_env(ctx, b, ws);
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
    let (otx, mut orx) = mpsc::channel::<Vec<u8>>(64);
    let chunk_of = |data: Vec<u8>| {
        Up::Console(proto::ConsoleChunk {
            build_id: r.build_id,
            subjob_id: r.subjob_id,
            atom_id: atom.atom_id,
            attempt: r.attempt,
            data,
        })
    };
    let forward = {
        let ctx = ctx.clone();
        async move {
            while let Some(mut data) = orx.recv().await {
                // Batch whatever is already waiting into one message.
                while data.len() < runner::CHUNK {
                    match orx.try_recv() {
                        Ok(more) => data.extend_from_slice(&more),
                        Err(_) => break,
                    }
                }
                if !ctx.send(chunk_of(data)).await {
                    return;
                }
            }
        }
    };
    let (outcome, ()) = tokio::join!(
        runner::run(spec, Some(otx), b.cancel.child_token(), ctx.grace),
        forward
    );
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            let msg = format!("[ish] could not start the atom: {e}\n");
            ctx.send(chunk_of(msg.into_bytes())).await;
            runner::Outcome {
                exit_code: -1,
                seconds: 0.0,
                canceled: false,
            }
        }
    };
    let header = proto::UploadHeader {
        slave_id: ctx.slave_id,
        build_id: r.build_id,
        subjob_id: r.subjob_id,
        atom_id: atom.atom_id,
        attempt: r.attempt,
    };
    let artifact_files = match upload(ctx, header, &art_dir).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(build = r.build_id, error = %e, "artifact upload failed");
            ctx.send(chunk_of(
                format!("\n[ish] artifact upload failed: {e}\n").into_bytes(),
            ))
            .await;
            0
        }
    };
    let _ = tokio::fs::remove_dir_all(&art_dir).await;
    ctx.send(Up::AtomResult(proto::AtomResult {
        build_id: r.build_id,
        subjob_id: r.subjob_id,
        atom_id: atom.atom_id,
        attempt: r.attempt,
        exit_code: outcome.exit_code,
        seconds: outcome.seconds,
        artifact_files,
    }))
    .await
}

/// Regular files under `dir` (symlinks are not followed and not uploaded), as paths relative to
/// `dir`, sorted.
fn artifact_files(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
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
                && let Some(rel) = rel.to_str()
            {
                out.push((rel.to_string(), p));
            }
        }
    }
    out.sort();
    out
}

/// Uploads the atom's artifact files; returns how many.
async fn upload(ctx: &Ctx, header: proto::UploadHeader, dir: &Path) -> Result<u32, String> {
    use proto::artifact_chunk::Msg;
    let dir = dir.to_path_buf();
    let files = tokio::task::spawn_blocking(move || artifact_files(&dir))
        .await
        .map_err(|e| e.to_string())?;
    if files.is_empty() {
        return Ok(0);
    }
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
    let mut link = ctx.link.clone();
    let res = link.upload_artifacts(ReceiverStream::new(rx)).await;
    let produced = producer.await.map_err(|e| e.to_string())?;
    produced?;
    res.map_err(|s| s.message().to_string())?;
    Ok(n)
}
