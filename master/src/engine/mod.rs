//! The scheduler: the one owner of the master's mutable state.
//!
//! [`Core`] is driven by [`Command`]s, one at a time, from the actor task (`actor.rs`). It knows
//! slaves only as channel senders of [`proto::MasterMessage`], so tests drive it with plain
//! channels and no network. It never blocks and never awaits the store: its writes are staged
//! in a [`BuildBatch`] and committed by the group commit; what it must read while running (the
//! timing history at prepare) comes back as an internal event; reads of final builds are the
//! caller's (`SubjobsAnswer::Stored`); file work goes to the results queue (`results.rs`).
//!
//! Work flow per build: QUEUED → a slave with a free executor prepares it (fetch, job config,
//! atomizers) → atoms grouped into subjobs with timing history → PREPARED → each slave that will
//! run subjobs is set up once (setup_build) → subjobs dispatched to free executors → results
//! recorded per atom → archives → FINISHED → teardown on every slave of the build.
//!
//! Every dispatch has an attempt id. A message about an attempt the core no longer tracks (a
//! slave declared lost, a canceled build) is ignored, so each atom's result comes from exactly
//! one attempt.
//!
//! Rooms (one `impl Core` block each, all on the same state):
//! - `model.rs` — builds, subjobs, slaves and attempts as the core holds them, and their
//!   conversions to the wire and to stored records;
//! - `validate.rs` — what a build request may be, checked before anything is stored;
//! - `client.rs` — client calls: submit, cancel, reads of builds, subjobs, consoles, slaves;
//! - `sessions.rs` — slave sessions: register, adoption after a restart, messages, loss;
//! - `dispatch.rs` — preparation, setup and dispatch of work to free executors;
//! - `progress.rs` — atom results and subjob completion;
//! - `finish.rs` — build end, archives, teardown, retirement;
//! - `recovery.rs` — reloading stored builds at start;
//! - `reads.rs` — reads of final builds from the store, made by the caller off the actor;
//! - `prometheus.rs` — the metrics text.
//!
//! Durability (group commit, `Durable`) and the command loop (`handle`) live here.
mod client;
mod dispatch;
mod finish;
mod model;
mod progress;
mod prometheus;
pub mod reads;
mod recovery;
mod sessions;
mod validate;

pub use recovery::Stored;
pub use validate::validate_request;

use crate::clock::SharedClock;
use crate::command::{Command, Durable, Internal};
use crate::error::MasterError;
use crate::metrics::Metrics;
use crate::results::{ResultsJob, ResultsLayout};
use crate::storage::{BuildBatch, BuildStore, BuildWrite};
use ish_core::proto::{self, master_message::Msg as Down};
use ish_core::state::BuildEvent;
use model::{Attempt, Build, Slave};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Slaves heartbeat this often.
    pub heartbeat_interval: Duration,
    /// A slave silent this long is lost.
    pub heartbeat_timeout: Duration,
    /// Setup failures before a build errors.
    pub max_setup_failures: u32,
    /// Lost preparations before a build errors.
    pub max_prepare_attempts: u32,
    /// After a restart, how long subjobs of resumed builds wait for their slaves to reconnect
    /// and report them before they are dispatched again.
    pub resume_grace: Duration,
    /// Dispatches of one subjob (after lost slaves) before its build errors.
    pub max_subjob_attempts: u32,
    /// Most atoms one build may have (atomizer output or atoms_override).
    pub max_atoms_per_build: usize,
    /// Most artifact bytes one build may upload in all.
    pub max_artifact_bytes_per_build: u64,
    /// Atom timeout for jobs that set none, in seconds (0 = none).
    pub default_atom_timeout_s: u32,
    /// Build timeout for jobs that set none, in seconds (0 = none).
    pub default_build_timeout_s: u32,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(15),
            max_setup_failures: 3,
            max_prepare_attempts: 3,
            resume_grace: Duration::from_secs(5),
            max_subjob_attempts: 5,
            max_atoms_per_build: 100_000,
            max_artifact_bytes_per_build: 10 << 30,
            default_atom_timeout_s: 0,
            default_build_timeout_s: 0,
        }
    }
}

/// Whether the actor handles more commands after this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on.
    Continue,
    /// Shut down: the core has let go of its slaves and answered the shutdown.
    Stop,
}

/// The master's state and scheduling logic. See the module docs.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    /// The one source of time (a manual clock in tests).
    clock: SharedClock,
    store: Arc<dyn BuildStore>,
    layout: ResultsLayout,
    results: mpsc::UnboundedSender<ResultsJob>,
    /// Told the id of every build that changed (watchers re-read it).
    changes: broadcast::Sender<u64>,
    /// Where archive completions are sent back.
    self_tx: mpsc::WeakSender<Command>,
    builds: BTreeMap<u64, Build>,
    /// Builds not in a final state, in FIFO order.
    active: BTreeSet<u64>,
    slaves: BTreeMap<u64, Slave>,
    /// Slaves that can take work now (not draining, an executor free): scheduling looks only
    /// here, so a cluster of thousands of busy slaves costs nothing per command.
    free: BTreeSet<u64>,
    attempts: HashMap<u64, Attempt>,
    next_attempt: u64,
    /// End of the block of attempt ids reserved in the store.
    attempt_end: u64,
    /// The highest build id given out.
    last_build_id: u64,
    next_slave_id: u64,
    /// Slaves whose channel failed during this command; dropped once it is handled.
    doomed: BTreeSet<u64>,
    /// Recent events, oldest first (ClusterRunner's eventlog).
    events: VecDeque<proto::Event>,
    next_event_id: u64,
    metrics: Metrics,
    /// Until then, resumed builds dispatch nothing: their slaves may still report them.
    resume_until: Option<Instant>,
    /// Answers that wait for the next commit.
    durable: Vec<Durable>,
    /// Writes not yet committed, in order.
    pending: BuildBatch,
    /// The last commit failed (a storage error): the next is tried at the next tick, so a
    /// state clients saw (a final one above all) reaches the disk and a restart does not bring
    /// back an older one, without retrying at the rate commands arrive.
    storage_down: bool,
    /// A commit is running.
    flushing: bool,
}

/// Encoded bytes of builds one listing page carries at most (at least one build): far below
/// the message limit, whatever the history holds. `total` tells the caller there is more.
const LIST_PAGE_BYTES: usize = 16 << 20;

/// Events kept in memory for the eventlog.
const MAX_EVENTS: usize = 10_000;

pub(super) fn invalid(msg: impl Into<String>) -> MasterError {
    MasterError::InvalidArgument(msg.into())
}

pub(super) fn unknown_build(id: u64) -> MasterError {
    MasterError::NotFound(format!("Invalid build id: {id}."))
}

impl Core {
    /// A core over `store`, writing results under `layout` through the `results` queue.
    pub fn new(
        cfg: CoreConfig,
        clock: SharedClock,
        store: Arc<dyn BuildStore>,
        layout: ResultsLayout,
        results: mpsc::UnboundedSender<ResultsJob>,
        changes: broadcast::Sender<u64>,
        self_tx: mpsc::WeakSender<Command>,
    ) -> Self {
        Self {
            cfg,
            clock,
            store,
            layout,
            results,
            changes,
            self_tx,
            builds: BTreeMap::new(),
            active: BTreeSet::new(),
            slaves: BTreeMap::new(),
            free: BTreeSet::new(),
            attempts: HashMap::new(),
            // Attempt 0 means "none" on the wire; `recover` sets these from the store.
            next_attempt: 1,
            attempt_end: 1,
            last_build_id: 0,
            next_slave_id: 1,
            doomed: BTreeSet::new(),
            events: VecDeque::new(),
            next_event_id: 1,
            metrics: Metrics::default(),
            resume_until: None,
            durable: Vec::new(),
            pending: BuildBatch::default(),
            storage_down: false,
            flushing: false,
        }
    }

    /// Appends to the event log (bounded: the oldest events fall off).
    fn event(&mut self, tag: &str, fields: serde_json::Value) {
        let e = proto::Event {
            id: self.next_event_id,
            tag: tag.into(),
            timestamp: self.clock.epoch(),
            fields_json: fields.to_string(),
        };
        self.next_event_id += 1;
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    /// Handles one command, then schedules what it made possible. Says whether the actor goes
    /// on (it stops after a shutdown).
    pub fn handle(&mut self, cmd: Command) -> Flow {
        let flow = match cmd {
            Command::Client(call) => {
                self.on_client(call);
                Flow::Continue
            }
            Command::Slave(event) => {
                self.on_slave_event(event);
                Flow::Continue
            }
            Command::Internal(event) => self.on_internal(event),
        };
        if flow == Flow::Continue {
            self.settle();
        }
        flow
    }

    fn on_internal(&mut self, event: Internal) -> Flow {
        match event {
            Internal::Flushed(durable, batch, outcome) => self.flushed(durable, &batch, outcome),
            Internal::HistoryRead {
                build,
                prepared,
                job,
                timings,
            } => self.group(build.0, *prepared, *job, timings),
            Internal::ArchivesWritten(id, outcome) => self.archives_written(id.0, outcome),
            Internal::ResultsFailed(id, msg) => {
                self.metrics.internal_error("ResultsWriteFailure");
                if self.builds.get(&id.0).is_some_and(|b| !b.state.is_final()) {
                    self.end_build(id.0, BuildEvent::Fail, msg);
                }
            }
            Internal::Tick => {
                // Storage gets another try once per tick after an error.
                self.storage_down = false;
                self.sweep(self.clock.now());
            }
            Internal::Shutdown(done) => {
                // Dropping the senders ends the slaves' streams; they reconnect to the next
                // master. Nothing is scheduled after this.
                self.slaves.clear();
                let _ = done.send(());
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    /// Drops slaves whose channel failed and schedules until nothing more can be started.
    fn settle(&mut self) {
        self.schedule();
        while let Some(sid) = self.doomed.pop_first() {
            if self.slaves.contains_key(&sid) {
                self.lose_slave(sid, "its message queue is full or closed");
            }
            self.schedule();
        }
        self.start_flush();
    }

    /// Group commit: one commit at a time covers every staged write and every answer that
    /// waits to be durable; what arrives meanwhile rides on the next one. Answers go out when
    /// the commit is done.
    fn start_flush(&mut self) {
        if self.flushing
            || self.storage_down
            || (self.durable.is_empty() && self.pending.is_empty())
        {
            return;
        }
        self.flushing = true;
        let durable = std::mem::take(&mut self.durable);
        let batch = Arc::new(std::mem::take(&mut self.pending));
        let store = self.store.clone();
        let back = self.self_tx.clone();
        tokio::spawn(async move {
            let outcome = store.commit(batch.clone()).await.map_err(|e| e.to_string());
            match back.upgrade() {
                Some(tx) => {
                    let _ = tx
                        .send(Internal::Flushed(durable, batch, outcome).into())
                        .await;
                }
                None => {
                    for d in durable {
                        if let Durable::Submitted(_, reply) = d {
                            let _ = reply.send(Err(MasterError::ShuttingDown));
                        }
                    }
                }
            }
        });
    }

    fn flushed(
        &mut self,
        durable: Vec<Durable>,
        batch: &BuildBatch,
        outcome: std::result::Result<(), String>,
    ) {
        self.flushing = false;
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "could not store the engine's writes; retrying");
            self.metrics.internal_error("StorageWriteFailure");
            self.storage_down = true;
            self.pending.requeue(batch);
            // A build whose results could not be stored ends in ERROR with the reason (its
            // final state is stored once storage works again).
            for id in batch.builds_with_results() {
                if self.builds.get(&id).is_some_and(|b| !b.state.is_final()) {
                    let msg = format!("Could not store an atom's result: {e}");
                    self.end_build(id, BuildEvent::Fail, msg);
                }
            }
        }
        for d in durable {
            match (d, &outcome) {
                (Durable::Submitted(id, reply), Ok(())) => {
                    let _ = reply.send(Ok(id));
                }
                (Durable::Submitted(_, reply), Err(e)) => {
                    // The build may not survive a crash: say so rather than acknowledge it.
                    let _ = reply.send(Err(MasterError::Io {
                        context: "storing the build".into(),
                        source: std::io::Error::other(e.clone()),
                    }));
                }
                (Durable::Ack(sid, attempt), Ok(())) => {
                    let attempt = attempt.0;
                    self.send(sid.0, Down::SubjobAck(proto::SubjobAck { attempt }));
                }
                // Without an ack the slave keeps the attempt and reports it again.
                (Durable::Ack(..), Err(_)) => {}
                (Durable::Prepared(id), Ok(())) => {
                    if let Some(b) = self.builds.get_mut(&id.0) {
                        b.grouping_durable = true;
                    }
                }
                (Durable::Retired(id), Ok(())) => self.evict(id.0),
                // Try again with the next commit.
                (d @ (Durable::Prepared(_) | Durable::Retired(_)), Err(_)) => self.durable.push(d),
            }
        }
    }

    fn notify(&self, build: u64) {
        let _ = self.changes.send(build);
    }

    /// Stages a build's record for the next commit.
    fn persist(&mut self, id: u64) {
        if let Some(b) = self.builds.get(&id) {
            self.pending
                .push(BuildWrite::Build(Box::new(b.to_record())));
        }
    }

    fn send(&mut self, sid: u64, msg: Down) -> bool {
        let Some(s) = self.slaves.get(&sid) else {
            return false;
        };
        match s.tx.try_send(proto::MasterMessage { msg: Some(msg) }) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(slave = sid, error = %e, "cannot send to slave");
                self.doomed.insert(sid);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests;
