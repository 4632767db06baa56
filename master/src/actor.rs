//! The task that owns the [`Core`] and the handle everyone else uses to talk to it.
use crate::clock::SharedClock;
use crate::command::{
    ClientCall, Command, ConsoleLocation, Internal, Reply, SlaveEvent, SlaveTx, UploadGrant,
};
use crate::engine::{Core, CoreConfig, Flow, Stored, reads};
use crate::error::{MasterError, Result};
use crate::ids::{AtomRef, AttemptId, BuildId, SlaveId};
use crate::results::{self, ResultsLayout};
use crate::storage::BuildStore;
use ish_core::proto::{self, slave_message::Msg as Up};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

/// Commands waiting for the actor before senders wait (back-pressure on chatty slaves).
const QUEUE: usize = 16_384;

/// A cheap, cloneable handle to the running master core.
#[derive(Clone, Debug)]
pub struct MasterHandle {
    tx: mpsc::Sender<Command>,
    changes: broadcast::Sender<u64>,
    /// Reads of final builds are made here, off the actor (see `engine/reads.rs`).
    store: Arc<dyn BuildStore>,
    layout: ResultsLayout,
}

impl MasterHandle {
    /// Sends a command built around a reply channel and waits for the answer.
    async fn call<T, C: Into<Command>>(&self, make: impl FnOnce(Reply<T>) -> C) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx).into())
            .await
            .map_err(|_| MasterError::ShuttingDown)?;
        rx.await.map_err(|_| MasterError::ShuttingDown)?
    }

    /// Sends a command that has no answer.
    async fn tell(&self, cmd: impl Into<Command>) -> Result<()> {
        self.tx
            .send(cmd.into())
            .await
            .map_err(|_| MasterError::ShuttingDown)
    }

    // ----- client calls ----------------------------------------------------------------------

    /// Validates, stores and queues a build; answers once it is durable.
    pub async fn submit(&self, req: proto::BuildRequest) -> Result<BuildId> {
        self.call(|r| ClientCall::Submit(Box::new(req), r)).await
    }

    /// Cancels a build; answers its state after the cancel.
    pub async fn cancel(&self, id: BuildId) -> Result<proto::Build> {
        self.call(|r| ClientCall::Cancel(id, r)).await
    }

    /// One build as clients see it.
    pub async fn get_build(&self, id: BuildId) -> Result<proto::Build> {
        self.call(|r| ClientCall::GetBuild(id, r)).await
    }

    /// A page of builds (`limit` 0 = as many as one page carries).
    pub async fn list_builds(
        &self,
        offset: u32,
        limit: u32,
        unfinished_only: bool,
    ) -> Result<proto::ListBuildsResponse> {
        self.call(|reply| ClientCall::ListBuilds {
            offset,
            limit,
            unfinished_only,
            reply,
        })
        .await
    }

    /// A page of a build's subjobs with their atoms.
    pub async fn list_subjobs(
        &self,
        build: BuildId,
        offset: u32,
        limit: u32,
    ) -> Result<proto::ListSubjobsResponse> {
        let answer = self
            .call(|reply| ClientCall::ListSubjobs {
                build,
                offset,
                limit,
                reply,
            })
            .await?;
        reads::subjobs(&*self.store, answer).await
    }

    /// Where an atom's console can be read.
    pub async fn console(&self, atom: AtomRef) -> Result<ConsoleLocation> {
        let answer = self.call(|r| ClientCall::Console(atom, r)).await?;
        reads::console(&*self.store, &self.layout, answer).await
    }

    /// The results directory of a build whose archives are ready.
    pub async fn archive_dir(&self, id: BuildId) -> Result<PathBuf> {
        self.call(|r| ClientCall::Archive(id, r)).await
    }

    /// The connected slaves.
    pub async fn list_slaves(&self) -> Result<proto::ListSlavesResponse> {
        self.call(ClientCall::ListSlaves).await
    }

    /// Tells slaves (or all) to drain; answers the slaves told.
    pub async fn drain(&self, ids: Vec<SlaveId>, all: bool) -> Result<Vec<SlaveId>> {
        self.call(|reply| ClientCall::Drain { ids, all, reply })
            .await
    }

    /// Events after an id or a time, oldest first.
    pub async fn list_events(
        &self,
        since_id: Option<u64>,
        since_timestamp: Option<f64>,
    ) -> Result<Vec<proto::Event>> {
        self.call(|reply| ClientCall::ListEvents {
            since_id,
            since_timestamp,
            reply,
        })
        .await
    }

    /// The engine's metrics as Prometheus text.
    pub async fn metrics(&self) -> Result<String> {
        self.call(ClientCall::Metrics).await
    }

    // ----- slave sessions --------------------------------------------------------------------

    /// Registers a slave whose messages will go to `tx`; answers its session id.
    pub async fn slave_connected(&self, reg: proto::Register, tx: SlaveTx) -> Result<SlaveId> {
        self.call(|r| SlaveEvent::Connected(reg, tx, r)).await
    }

    /// Passes on a message of a registered slave.
    pub async fn from_slave(&self, slave: SlaveId, msg: Up) -> Result<()> {
        self.tell(SlaveEvent::Message(slave, msg)).await
    }

    /// A slave's stream ended.
    pub async fn slave_disconnected(&self, slave: SlaveId) -> Result<()> {
        self.tell(SlaveEvent::Disconnected(slave)).await
    }

    /// May `slave` upload files for `atom` of `attempt`? Answers where and how much.
    pub async fn upload_target(
        &self,
        slave: SlaveId,
        atom: AtomRef,
        attempt: AttemptId,
    ) -> Result<UploadGrant> {
        self.call(|reply| SlaveEvent::UploadTarget {
            slave,
            atom,
            attempt,
            reply,
        })
        .await
    }

    /// An upload stored `bytes` for `build` (counts against its artifact budget).
    pub async fn artifact_bytes(&self, build: BuildId, bytes: u64) -> Result<()> {
        self.tell(SlaveEvent::ArtifactBytes { build, bytes }).await
    }

    /// Storing a build's results failed: it ends in ERROR with `why`.
    pub async fn results_failed(&self, build: BuildId, why: String) -> Result<()> {
        self.tell(Internal::ResultsFailed(build, why)).await
    }

    // ----- the master ------------------------------------------------------------------------

    /// Stops the core: slave streams end, later calls fail with ShuttingDown.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tell(Internal::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Ids of builds as they change.
    pub fn subscribe(&self) -> broadcast::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// The running actor and results queue. Dropping it stops both.
#[derive(Debug)]
pub struct Actor {
    /// The actor task.
    pub task: JoinHandle<()>,
    /// The results queue task.
    pub results: JoinHandle<()>,
}

impl Drop for Actor {
    fn drop(&mut self) {
        self.task.abort();
        self.results.abort();
    }
}

/// Loads the stored builds and starts the actor.
pub async fn start(
    cfg: CoreConfig,
    clock: SharedClock,
    store: Arc<dyn BuildStore>,
    layout: ResultsLayout,
) -> Result<(MasterHandle, Actor)> {
    let stored = Stored::load(&*store).await?;
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let (changes, _) = broadcast::channel(1024);
    let (results_tx, results_rx) = mpsc::unbounded_channel();
    let results = tokio::spawn(results::run(layout.clone(), results_rx, tx.downgrade()));
    let tick_every =
        (cfg.heartbeat_interval / 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut core = Core::new(
        cfg,
        clock,
        store.clone(),
        layout.clone(),
        results_tx,
        changes.clone(),
        tx.downgrade(),
    );
    core.recover(stored)?;
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => {
                        if core.handle(cmd) == Flow::Stop {
                            break;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    core.handle(Internal::Tick.into());
                }
            }
        }
        tracing::debug!("master core stopped");
    });
    let handle = MasterHandle {
        tx,
        changes,
        store,
        layout,
    };
    Ok((handle, Actor { task, results }))
}
