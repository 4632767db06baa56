//! The task that owns the [`Core`] and the handle everyone else uses to talk to it.
use crate::core::{Command, Core, CoreConfig, Reply};
use crate::error::{MasterError, Result};
use crate::results::{self, ResultsLayout};
use crate::store::Store;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

/// Commands waiting for the actor before senders wait (back-pressure on chatty slaves).
const QUEUE: usize = 16_384;

/// A cheap, cloneable handle to the running master core.
#[derive(Clone, Debug)]
pub struct MasterHandle {
    tx: mpsc::Sender<Command>,
    changes: broadcast::Sender<u64>,
}

impl MasterHandle {
    /// Sends a command built around a reply channel and waits for the answer.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| MasterError::ShuttingDown)?;
        rx.await.map_err(|_| MasterError::ShuttingDown)?
    }

    /// Sends a command that has no answer.
    pub async fn tell(&self, cmd: Command) -> Result<()> {
        self.tx
            .send(cmd)
            .await
            .map_err(|_| MasterError::ShuttingDown)
    }

    /// Stops the core: slave streams end, later calls fail with ShuttingDown.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(tx)).await.is_ok() {
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
pub fn start(
    cfg: CoreConfig,
    store: Store,
    layout: ResultsLayout,
) -> Result<(MasterHandle, Actor)> {
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let (changes, _) = broadcast::channel(1024);
    let (results_tx, results_rx) = mpsc::unbounded_channel();
    let results = tokio::spawn(results::run(layout.clone(), results_rx, tx.downgrade()));
    let tick_every =
        (cfg.heartbeat_interval / 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut core = Core::new(
        cfg,
        store,
        layout,
        results_tx,
        changes.clone(),
        tx.downgrade(),
    );
    core.recover()?;
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd @ Command::Shutdown(_)) => {
                        core.handle(cmd);
                        break;
                    }
                    Some(cmd) => core.handle(cmd),
                    None => break,
                },
                _ = tick.tick() => core.handle(Command::Tick(Instant::now())),
            }
        }
        tracing::debug!("master core stopped");
    });
    Ok((MasterHandle { tx, changes }, Actor { task, results }))
}
