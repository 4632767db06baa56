//! What the engine can be asked to do, and by whom: the messages of the actor's one queue.
//!
//! A leaf module: the engine, the actor, the gRPC services and the results queue all speak it,
//! and it depends on none of them.
use crate::error::Result;
use crate::ids::{AtomRef, AttemptId, BuildId, SlaveId};
use ish_core::proto::{self, slave_message::Msg as Up};
use std::path::PathBuf;
use tokio::sync::{mpsc, oneshot};

/// Sender half of a slave's control stream.
pub type SlaveTx = mpsc::Sender<proto::MasterMessage>;

/// Reply channel of a command.
pub type Reply<T> = oneshot::Sender<Result<T>>;

/// Where an atom's console output can be read.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsoleLocation {
    /// The console file (may not exist yet while the atom has printed nothing).
    pub path: PathBuf,
    /// Where the file may be until the results queue has moved it to `path` (completed atoms).
    pub pending: Vec<PathBuf>,
    /// True once the atom's result is recorded: the file will not grow any more.
    pub complete: bool,
}

/// A page of subjobs, or where to read it: a final build's atoms are in the store, and the
/// caller reads them there, off the engine's actor.
#[derive(Debug, Clone, PartialEq)]
pub enum SubjobsAnswer {
    /// The page, from the engine's memory.
    Page(proto::ListSubjobsResponse),
    /// A final build: read subjobs `start..end` of its `total` from the store.
    Stored {
        /// Build.
        build: BuildId,
        /// First subjob of the page.
        start: u32,
        /// End of the page (exclusive).
        end: u32,
        /// Subjobs the build has.
        total: u32,
        /// The job's command (every subjob shows it).
        command: String,
    },
}

/// Where an atom's console is, or which stored atom tells it (a final build's, read by the
/// caller off the engine's actor).
#[derive(Debug, Clone, PartialEq)]
pub enum ConsoleAnswer {
    /// Known from the engine's memory.
    Located(ConsoleLocation),
    /// A final build's atom: where its console is follows from its stored record.
    Stored(AtomRef),
}

/// Where an attempt's files go, and how much more the build may upload.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadGrant {
    /// The attempt's atom directory.
    pub dir: PathBuf,
    /// Where its console streams to (live reads only).
    pub live_console: PathBuf,
    /// Bytes the build may still upload (max_artifact_bytes_per_build minus what it used).
    pub budget: u64,
}

/// Everything the engine can be asked to do, grouped by who asks.
// Slave messages are most of the traffic and the largest variant: boxing them would cost an
// allocation per message to save queue bytes on the rarer calls.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Command {
    /// A client (the gRPC services, for the CLI, the gateway and programs).
    Client(ClientCall),
    /// A slave's session (its stream, its uploads).
    Slave(SlaveEvent),
    /// The master itself: timers, the results queue, the database flusher, shutdown.
    Internal(Internal),
}

/// Calls from clients. Each has an answer.
#[derive(Debug)]
pub enum ClientCall {
    /// Validate, store and queue a build; answered once it is on disk.
    Submit(Box<proto::BuildRequest>, Reply<BuildId>),
    /// Cancel a build.
    Cancel(BuildId, Reply<proto::Build>),
    /// One build.
    GetBuild(BuildId, Reply<proto::Build>),
    /// Builds, paginated.
    ListBuilds {
        /// Skip.
        offset: u32,
        /// Max (0 = all).
        limit: u32,
        /// Only unfinished.
        unfinished_only: bool,
        /// Answer.
        reply: Reply<proto::ListBuildsResponse>,
    },
    /// A build's subjobs, paginated.
    ListSubjobs {
        /// Build.
        build: BuildId,
        /// Skip.
        offset: u32,
        /// Max (0 = all).
        limit: u32,
        /// Answer.
        reply: Reply<SubjobsAnswer>,
    },
    /// Where an atom's console is.
    Console(AtomRef, Reply<ConsoleAnswer>),
    /// Results directory of a finished build whose archives are ready.
    Archive(BuildId, Reply<PathBuf>),
    /// Connected slaves.
    ListSlaves(Reply<proto::ListSlavesResponse>),
    /// Drain slaves.
    Drain {
        /// Slaves (ignored when `all`).
        ids: Vec<SlaveId>,
        /// Every slave.
        all: bool,
        /// Answer: the slaves told to drain.
        reply: Reply<Vec<SlaveId>>,
    },
    /// Events after an id or a time, oldest first.
    ListEvents {
        /// Only events with a larger id.
        since_id: Option<u64>,
        /// Only events after this time.
        since_timestamp: Option<f64>,
        /// Answer.
        reply: Reply<Vec<proto::Event>>,
    },
    /// The metrics, as Prometheus text.
    Metrics(Reply<String>),
}

/// Events of slave sessions.
#[derive(Debug)]
pub enum SlaveEvent {
    /// A slave opened a session and registered.
    Connected(proto::Register, SlaveTx, Reply<SlaveId>),
    /// A message from a registered slave.
    Message(SlaveId, Up),
    /// A slave's stream ended.
    Disconnected(SlaveId),
    /// May this slave upload artifacts for this attempt? Answers the attempt's atom directory
    /// and how many bytes the build may still upload.
    UploadTarget {
        /// Uploading slave.
        slave: SlaveId,
        /// The atom.
        atom: AtomRef,
        /// Attempt.
        attempt: AttemptId,
        /// Answer.
        reply: Reply<UploadGrant>,
    },
    /// An upload stored this many bytes for a build (counts against its artifact budget).
    ArtifactBytes {
        /// Build.
        build: BuildId,
        /// Bytes stored.
        bytes: u64,
    },
}

/// The master's own events.
#[derive(Debug)]
pub enum Internal {
    /// Storing an atom's results failed (e.g. the disk is full): the build ends in ERROR.
    ResultsFailed(BuildId, String),
    /// The results queue finished a build's archives.
    ArchivesWritten(BuildId, std::result::Result<(), String>),
    /// Periodic housekeeping at the engine clock's time: lose silent slaves, end the resume
    /// grace, retry storage writes.
    Tick,
    /// A commit of the engine's staged writes finished: send the answers that waited for it,
    /// or (on an error) stage the batch again.
    Flushed(
        Vec<Durable>,
        std::sync::Arc<crate::storage::BuildBatch>,
        std::result::Result<(), String>,
    ),
    /// The timing history of a build's atoms was read (after its preparation): group them.
    HistoryRead {
        /// Build.
        build: BuildId,
        /// The preparation's result.
        prepared: Box<proto::PrepareResult>,
        /// The job, with the master's defaults applied.
        job: Box<proto::JobConfig>,
        /// Recorded seconds by atom command string.
        timings: std::collections::HashMap<String, f64>,
    },
    /// The master is stopping: end every slave stream. Builds stay as stored and resume when
    /// the master starts again.
    Shutdown(oneshot::Sender<()>),
}

impl From<ClientCall> for Command {
    fn from(c: ClientCall) -> Self {
        Command::Client(c)
    }
}

impl From<SlaveEvent> for Command {
    fn from(e: SlaveEvent) -> Self {
        Command::Slave(e)
    }
}

impl From<Internal> for Command {
    fn from(i: Internal) -> Self {
        Command::Internal(i)
    }
}

/// Something answered only once the database is flushed.
#[derive(Debug)]
pub enum Durable {
    /// A submitted build: its id goes to the client.
    Submitted(BuildId, Reply<BuildId>),
    /// A finished attempt: the slave may forget it.
    Ack(SlaveId, AttemptId),
    /// A prepared build: its subjobs may be dispatched.
    Prepared(BuildId),
    /// A final build's last writes (its atoms' results) are durable: it may leave memory, and
    /// its attempt directories go.
    Retired(BuildId),
}
