//! Ish CD slave: the hands of the cluster.
//!
//! It dials the master (no inbound port), opens one bidirectional `Session` stream, registers
//! (name, executors, labels, version) and then does the work pushed down the stream:
//! ```text
//! master ──Prepare──▶ fetch project (git2 cache → fresh workspace) → job config → atomizers ──▶ PrepareResult
//!        ──Setup────▶ fetch (or reuse) → setup_build once                                   ──▶ SetupResult
//!        ──RunSubjob▶ atoms in order: bash -o pipefail under a reaper (reaper.rs), env of spec §10.2
//!                      console chunks ─▶ stream; $ARTIFACT_DIR files ─▶ UploadArtifacts RPC ──▶ AtomResult
//!        ──Cancel───▶ TERM the build's process trees, KILL after a grace
//!        ──Teardown─▶ teardown_build once, delete the workspace                             ──▶ TeardownDone
//! ```
//! When the master goes away the slave stops its work (the master re-queues it) and reconnects
//! with jittered exponential back-off; it never exits on its own for that. It exits when told to
//! shut down (SIGTERM → `shutdown`), when drained, or when the master refuses its secret.
//!
//! Rooms: [`session`] is one connection (register, relay messages both ways); [`worker`] is what
//! the slave holds and does across sessions (the logic above); it runs commands through
//! [`runner::CommandRunner`] (processes under the [`reaper`] in production), uploads through
//! [`link::MasterLink`] (the UploadArtifacts RPC) and gets projects from [`project`] ([`git`]
//! cache and workspaces, [`remote`] files). `console` keeps an atom's console bounded on disk,
//! `artifacts` lists what an atom left in `$ARTIFACT_DIR`; [`error`] says why a step failed and
//! whether another slave could manage.
//!
//! Locks, and why each is one: the worker's `held` (its builds and unacknowledged attempts:
//! message handlers and work tasks change them, a new session reports them at one instant), a
//! build's `state` (workspace, job and env written by Prepare/Setup and read by the build's later
//! tasks), the free list of empty `$ARTIFACT_DIR`s (taken and given back by atoms of any build),
//! and the outbox receiver (an async lock: the current session's pump holds it, the next session's
//! waits until the old pump is gone, so messages never go out of order). None is held across an
//! `.await` except the outbox's.
mod artifacts;
pub mod config;
mod console;
pub mod error;
pub mod git;
pub mod link;
pub mod project;
pub mod reaper;
pub mod remote;
pub mod runner;
pub mod session;
pub mod worker;

pub use artifacts::{CONSOLE_FILE, UPLOAD_MANIFEST};
pub use config::SlaveConfig;

use rand::Rng;
use session::SessionEnd;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use worker::{Shared, Worker};

/// Why the slave stopped (on success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Told to shut down.
    Shutdown,
    /// Drained by the master.
    Drained,
}

/// Why the slave could not run.
#[derive(Debug, thiserror::Error)]
pub enum SlaveError {
    /// The master refused this slave; retrying will not help.
    #[error("the master refused this slave: {0}")]
    Refused(String),
    /// Bad settings.
    #[error("invalid slave configuration: {0}")]
    Config(String),
}

/// Runs the slave until `shutdown` completes, it is drained, or the master refuses it.
pub async fn run(
    mut cfg: SlaveConfig,
    secret: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Exit, SlaveError> {
    cfg.make_paths_absolute()
        .map_err(|e| SlaveError::Config(format!("resolving the slave's paths: {e}")))?;
    if cfg.executors == 0 {
        return Err(SlaveError::Config("executors must be at least 1".into()));
    }
    for name in &cfg.pass_env {
        runner::check_pass_env(name).map_err(SlaveError::Config)?;
    }
    // Atoms run as this user: without this, one could read the secret from /proc/<slave>/environ
    // or attach a debugger to the slave.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(%e, "could not make the slave non-dumpable");
    }
    let auth = ish_core::auth::SecretInterceptor::new(&secret)
        .map_err(|e| SlaveError::Config(e.to_string()))?;
    let workspaces = project::Workspaces::new(&cfg.data_dir, (&cfg.git).into());
    // Workspaces of a previous run of this slave are stale: their builds were re-queued.
    workspaces.clear();
    let shared = Arc::new(Shared {
        name: cfg.effective_name(),
        session_id: format!("{:016x}", rand::rng().random::<u64>()),
        workspaces,
        downloader: remote::Downloader::new(
            cfg.remote_file_max_bytes,
            Duration::from_millis(cfg.remote_file_timeout_ms),
        ),
        inherited_env: runner::inherited_env(&cfg.pass_env),
        runner: Arc::new(runner::Processes),
        auth,
        cfg,
    });
    let stop = CancellationToken::new();
    let trigger = stop.clone();
    let watcher = tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    let _abort_watcher = AbortOnDrop(watcher);
    let max_delay = Duration::from_millis(shared.cfg.max_reconnect_delay_ms.max(100));
    let worker = Worker::new(shared);
    // Owns every task of the slave: dropping `run` (an in-process kill) aborts them all, and with
    // them the atoms' processes (their reapers see their stdin close).
    let mut tasks = tokio::task::JoinSet::new();
    let mut delay = Duration::from_millis(100);
    let mut epoch = 0;
    loop {
        let started = std::time::Instant::now();
        epoch += 1;
        match session::run_session(&worker, &mut tasks, epoch, &stop).await {
            SessionEnd::Shutdown => {
                leave_offline(&worker, &mut tasks).await;
                return Ok(Exit::Shutdown);
            }
            SessionEnd::Drained => return Ok(Exit::Drained),
            SessionEnd::Refused(msg) => {
                worker.cancel_all();
                return Err(SlaveError::Refused(msg));
            }
            SessionEnd::Lost(why) => {
                if started.elapsed() > Duration::from_secs(10) {
                    // The session was healthy for a while: start backing off from scratch.
                    delay = Duration::from_millis(100);
                }
                tracing::warn!(%why, retry_in = ?delay, "lost the master; reconnecting");
            }
        }
        // Full jitter keeps a fleet of slaves from reconnecting in lock-step after a master restart.
        let wait = delay.mul_f64(rand::rng().random_range(0.5..1.0));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => {
                leave_offline(&worker, &mut tasks).await;
                return Ok(Exit::Shutdown);
            }
        }
        delay = (delay * 2).min(max_delay);
    }
}

/// Shutdown without a master to talk to: stop everything and clean up (a no-op after a session
/// that already left cleanly).
async fn leave_offline(worker: &std::sync::Arc<Worker>, tasks: &mut tokio::task::JoinSet<()>) {
    worker.cancel_all();
    let grace = Duration::from_millis(worker.shared.cfg.kill_grace_ms) + Duration::from_secs(5);
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    let budget = Duration::from_millis(worker.shared.cfg.shutdown_teardown_ms);
    let _ = tokio::time::timeout(budget, worker.teardown_all()).await;
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
