//! The scheduler: the one owner of the master's mutable state.
//!
//! [`Core`] is driven by [`Command`]s, one at a time, from the actor task (`actor.rs`). It knows
//! slaves only as channel senders of [`proto::MasterMessage`], so tests drive it with plain
//! channels and no network. It never blocks: database writes are point writes; file work goes to
//! the results queue (`results.rs`).
//!
//! Work flow per build: QUEUED → a slave with a free executor prepares it (fetch, job config,
//! atomizers) → atoms grouped into subjobs with timing history → PREPARED → each slave that will
//! run subjobs is set up once (setup_build) → subjobs dispatched to free executors → results
//! recorded per atom → archives → FINISHED → teardown on every slave of the build.
//!
//! Every dispatch has an attempt id. A message about an attempt the core no longer tracks (a
//! slave declared lost, a canceled build) is ignored, so each atom's result comes from exactly
//! one attempt.
use crate::error::{MasterError, Result};
use crate::metrics::{self, Metrics};
use crate::results::{ArchivedAtom, CONSOLE_FILE, ResultsJob, ResultsLayout, TimingHistory};
use crate::store::Store;
use ish_core::proto::{self, master_message::Msg as Down, slave_message::Msg as Up};
use ish_core::state::{BuildEvent, BuildState};
use ish_core::{grouping, jobconfig, now_epoch};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot};

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

/// Everything the core can be asked to do.
#[derive(Debug)]
pub enum Command {
    /// Validate, store and queue a build.
    Submit(proto::BuildRequest, Reply<u64>),
    /// Cancel a build.
    Cancel(u64, Reply<proto::Build>),
    /// One build.
    GetBuild(u64, Reply<proto::Build>),
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
        build: u64,
        /// Skip.
        offset: u32,
        /// Max (0 = all).
        limit: u32,
        /// Answer.
        reply: Reply<proto::ListSubjobsResponse>,
    },
    /// Where an atom's console is.
    Console {
        /// Build.
        build: u64,
        /// Subjob.
        subjob: u32,
        /// Atom.
        atom: u32,
        /// Answer.
        reply: Reply<ConsoleLocation>,
    },
    /// Results directory of a finished build whose archives are ready.
    Archive(u64, Reply<PathBuf>),
    /// Connected slaves.
    ListSlaves(Reply<proto::ListSlavesResponse>),
    /// Drain slaves.
    Drain {
        /// Slaves (ignored when `all`).
        ids: Vec<u64>,
        /// Every slave.
        all: bool,
        /// Answer: the ids told to drain.
        reply: Reply<Vec<u64>>,
    },
    /// A slave opened a session and registered.
    SlaveConnected(proto::Register, SlaveTx, Reply<u64>),
    /// A message from a registered slave.
    FromSlave(u64, Up),
    /// A slave's stream ended.
    SlaveDisconnected(u64),
    /// May this slave upload artifacts for this attempt? Answers the attempt's atom directory
    /// and how many bytes the build may still upload.
    UploadTarget {
        /// Uploading slave.
        slave: u64,
        /// Build.
        build: u64,
        /// Subjob.
        subjob: u32,
        /// Atom.
        atom: u32,
        /// Attempt.
        attempt: u64,
        /// Answer.
        reply: Reply<UploadGrant>,
    },
    /// Storing an atom's results failed (e.g. the disk is full): the build ends in ERROR.
    ResultsFailed(u64, String),
    /// An upload stored this many bytes for a build (counts against its artifact budget).
    ArtifactBytes(u64, u64),
    /// The results queue finished a build's archives.
    ArchivesWritten(u64, std::result::Result<(), String>),
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
    /// Periodic housekeeping: lose silent slaves.
    Tick(Instant),
    /// A database flush finished: send the answers that waited for it.
    Flushed(Vec<Durable>, std::result::Result<(), String>),
    /// The master is stopping: end every slave stream. Builds stay as stored and resume when
    /// the master starts again.
    Shutdown(oneshot::Sender<()>),
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlaveBuildState {
    /// The slave prepared the build: it has the workspace but has not run setup.
    Prepared,
    /// Setup sent, no answer yet.
    SettingUp,
    /// Setup succeeded: subjobs may be dispatched.
    Ready,
    /// Setup failed: this slave gets no more work of this build.
    Failed,
    /// Teardown sent.
    TornDown,
}

#[derive(Debug)]
struct SlaveBuild {
    state: SlaveBuildState,
    /// First BUILD_EXECUTOR_INDEX of this slave for this build.
    start_index: u32,
    /// Executors of this slave the build may use.
    cap: u32,
    /// Build-local executor indices (0..cap) not in use.
    free_local: BTreeSet<u32>,
}

#[derive(Debug)]
struct Subjob {
    atoms: Vec<proto::Atom>,
    /// Attempt running it now.
    running: Option<u64>,
    completed: bool,
    attempts: u32,
    /// Slave it was last dispatched to.
    slave: String,
}

#[derive(Debug)]
struct Build {
    id: u64,
    /// The request without `atoms_override`: it is copied into every status read and record.
    request: proto::BuildRequest,
    /// The request's atoms, until the build ends (stored apart; see `Store`).
    atoms_override: Vec<String>,
    state: BuildState,
    result: proto::BuildResult,
    error: String,
    timestamps: Vec<(BuildState, f64)>,
    job: Option<proto::JobConfig>,
    commit: String,
    project_key: String,
    project_dir: String,
    subjobs: Vec<Subjob>,
    /// Subjobs waiting for an executor, in dispatch order.
    pending: VecDeque<u32>,
    completed_subjobs: u32,
    completed_atoms: u32,
    failed_atoms: u32,
    flaky_atoms: u32,
    num_atoms: u32,
    artifacts_ready: bool,
    archiving: bool,
    setup_failures: u32,
    prepare_attempts: u32,
    preparing_on: Option<u64>,
    slaves: BTreeMap<u64, SlaveBuild>,
    next_executor_index: u32,
    executors_in_use: u32,
    /// Resumed after a master restart: its subjobs wait for `Core::resume_until`.
    recovered: bool,
    /// Artifact bytes uploaded so far (since this master started).
    artifact_bytes: u64,
    /// Its subjobs and atoms are on disk: dispatching may start.
    grouping_durable: bool,
    /// Slaves that failed to get the project (not asked to prepare it again).
    prepare_excluded: BTreeSet<u64>,
    /// Set once the build is final: then `subjobs` is emptied and its atoms are read from the
    /// store on demand, so memory does not grow with the history of builds.
    summary: Option<FinalSummary>,
    /// Ended (canceled or failed) while subjobs ran: its atoms stay in memory until the slaves
    /// report what the killed atoms did (exit code, console so far), then it is retired.
    killing: bool,
}

/// What a final build keeps in memory of its atoms.
#[derive(Debug, Default)]
struct FinalSummary {
    num_subjobs: u32,
    /// Failed and flaky atoms of a FINISHED build (empty otherwise), in (subjob, atom) order.
    failed: Vec<proto::Atom>,
    flaky: Vec<proto::Atom>,
    /// Sum of the atoms' run times.
    serialized_seconds: f64,
}

#[derive(Debug, Clone, Copy)]
enum Work {
    Prepare(u64),
    Subjob(u64),
}

#[derive(Debug)]
struct Slave {
    id: u64,
    name: String,
    session_id: String,
    executors: u32,
    labels: HashMap<String, String>,
    version: String,
    tx: SlaveTx,
    free_slots: BTreeSet<u32>,
    busy: BTreeMap<u32, Work>,
    draining: bool,
    last_seen: Instant,
    last_heartbeat: f64,
}

#[derive(Debug, Clone, Copy)]
struct Attempt {
    build: u64,
    subjob: u32,
    slave: u64,
    slot: u32,
    local: u32,
}

/// The master's state and scheduling logic. See the module docs.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    store: Store,
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
    next_slave_id: u64,
    /// Slaves whose channel failed during this command; dropped once it is handled.
    doomed: BTreeSet<u64>,
    /// Recent events, oldest first (ClusterRunner's eventlog).
    events: VecDeque<proto::Event>,
    next_event_id: u64,
    metrics: Metrics,
    /// Until then, resumed builds dispatch nothing: their slaves may still report them.
    resume_until: Option<Instant>,
    /// Answers that wait for the next database flush.
    durable: Vec<Durable>,
    /// Builds whose last change could not be written (a storage error): written again on every
    /// tick until it is, so a state clients saw (a final one above all) reaches the disk and a
    /// restart does not bring back an older one.
    unsaved: BTreeSet<u64>,
    /// A flush is running.
    flushing: bool,
}

/// Something answered only once the database is flushed.
#[derive(Debug)]
pub enum Durable {
    /// A submitted build: its id goes to the client.
    Submitted(u64, Reply<u64>),
    /// A finished attempt: the slave may forget it.
    Ack(u64, u64),
    /// A prepared build: its subjobs may be dispatched.
    Prepared(u64),
}

/// Most variables a build's `env` may set.
const MAX_ENV_VARS: usize = 256;
/// Longest value of one `env` variable, in bytes.
const MAX_ENV_VALUE: usize = 32 << 10;
/// Largest `env` in all (names and values), in bytes.
const MAX_ENV_BYTES: usize = 256 << 10;

/// Most `remote_files` one build may ask for.
const MAX_REMOTE_FILES: usize = 100;

/// Largest `request_params` a build may keep, once normalized (see `ish_core::jsontext`).
const MAX_REQUEST_PARAMS_BYTES: usize = 2 << 20;

/// Encoded bytes of builds one listing page carries at most (at least one build): far below
/// the message limit, whatever the history holds. `total` tells the caller there is more.
const LIST_PAGE_BYTES: usize = 16 << 20;

/// Events kept in memory for the eventlog.
const MAX_EVENTS: usize = 10_000;

fn invalid(msg: impl Into<String>) -> MasterError {
    MasterError::InvalidArgument(msg.into())
}

fn unknown_build(id: u64) -> MasterError {
    MasterError::NotFound(format!("Invalid build id: {id}."))
}

/// Checks a build request before anything is stored. Messages name the offending field.
pub fn validate_request(req: &proto::BuildRequest, max_atoms: usize) -> Result<()> {
    use proto::project_source::Kind;
    match req.source.as_ref().and_then(|s| s.kind.as_ref()) {
        None => {
            return Err(invalid(
                "Invalid build request type: give a git or directory source.",
            ));
        }
        Some(Kind::Git(g)) => {
            if g.url.trim().is_empty() {
                return Err(invalid(
                    "Missing required parameter. Required parameters: ['url']",
                ));
            }
            // git would read a leading '-' as an option, whatever the transport.
            if g.url.starts_with('-') {
                return Err(invalid(format!(
                    "Invalid url \"{}\": a repository URL or path cannot start with '-'.",
                    g.url
                )));
            }
            if !g.hash.is_empty()
                && (g.hash.len() < 7
                    || g.hash.len() > 40
                    || !g.hash.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(invalid(format!(
                    "Invalid hash \"{}\": expected 7 to 40 hexadecimal digits.",
                    g.hash
                )));
            }
            if g.branch.starts_with('-') || g.remote.starts_with('-') || g.remote.contains('/') {
                return Err(invalid("Invalid branch or remote name."));
            }
        }
        Some(Kind::Directory(d)) => {
            if d.path.trim().is_empty() {
                return Err(invalid(
                    "Missing required parameter. Required parameters: ['project_directory']",
                ));
            }
            if !d.path.starts_with('/') {
                return Err(invalid(format!(
                    "project_directory \"{}\" must be an absolute path (it is looked up on the slaves).",
                    d.path
                )));
            }
        }
    }
    let pd = &req.project_directory;
    let has_nul = |s: &str| s.contains('\0');
    if has_nul(pd)
        || has_nul(&req.job_name)
        || req
            .source
            .as_ref()
            .and_then(|s| s.kind.as_ref())
            .is_some_and(|k| match k {
                Kind::Git(g) => has_nul(&g.url) || has_nul(&g.branch) || has_nul(&g.remote),
                Kind::Directory(d) => has_nul(&d.path),
            })
    {
        return Err(invalid(
            "Invalid build request: a path, URL, branch or job name cannot contain a NUL character.",
        ));
    }
    if pd.starts_with('/') || pd.split('/').any(|p| p == "..") {
        return Err(invalid(format!(
            "project_directory \"{pd}\" must be a relative path inside the repository, without \"..\"."
        )));
    }
    if !req.config_json.is_empty() {
        let job = (!req.job_name.is_empty()).then_some(req.job_name.as_str());
        jobconfig::parse_inline_config_str(&req.config_json, job)
            .map_err(|e| invalid(e.to_string()))?;
    }
    if req.atoms_override.iter().any(|a| a.trim().is_empty()) {
        return Err(invalid("atoms_override entries must not be empty."));
    }
    for (name, url) in &req.remote_files {
        if ish_core::paths::safe_relative_path(name).is_none() {
            return Err(invalid(format!(
                "remote_files name \"{name}\" must be a relative path inside the project, without \"..\"."
            )));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(format!(
                "remote_files URL \"{url}\" for \"{name}\" must be http:// or https://."
            )));
        }
    }
    if req.remote_files.len() > MAX_REMOTE_FILES {
        return Err(invalid(format!(
            "at most {MAX_REMOTE_FILES} remote_files per build."
        )));
    }
    if req.atoms_override.len() > max_atoms {
        return Err(invalid(format!(
            "atoms_override has {} atoms; the limit is {max_atoms} (max_atoms_per_build).",
            req.atoms_override.len()
        )));
    }
    let env_bytes: usize = req.env.iter().map(|(k, v)| k.len() + v.len()).sum();
    if req.env.len() > MAX_ENV_VARS {
        return Err(invalid(format!(
            "env has {} names; the limit is {MAX_ENV_VARS}.",
            req.env.len()
        )));
    }
    if let Some((k, _)) = req.env.iter().find(|(_, v)| v.len() > MAX_ENV_VALUE) {
        return Err(invalid(format!(
            "env value of \"{k}\" is longer than {MAX_ENV_VALUE} bytes."
        )));
    }
    if env_bytes > MAX_ENV_BYTES {
        return Err(invalid(format!(
            "env is {env_bytes} bytes in all; the limit is {MAX_ENV_BYTES}."
        )));
    }
    for k in req.env.keys() {
        let ok = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(invalid(format!(
                "env name \"{k}\" is not a valid variable name."
            )));
        }
    }
    Ok(())
}

/// The request as ClusterRunner's `request_params` (used when the client sent no JSON of its own).
fn request_params_json(req: &proto::BuildRequest) -> String {
    use proto::project_source::Kind;
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: &str| {
        if !v.is_empty() {
            m.insert(k.into(), v.into());
        }
    };
    match req.source.as_ref().and_then(|s| s.kind.as_ref()) {
        Some(Kind::Git(g)) => {
            put("type", "git");
            put("url", &g.url);
            put("remote", &g.remote);
            put("branch", &g.branch);
            put("hash", &g.hash);
            put("project_directory", &req.project_directory);
        }
        Some(Kind::Directory(d)) => {
            put("type", "directory");
            put("project_directory", &d.path);
        }
        None => {}
    }
    put("job_name", &req.job_name);
    if !req.config_json.is_empty()
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&req.config_json)
    {
        m.insert("config".into(), v);
    }
    // atoms_override is left out: the echo is read on every poll, the atoms can be 100,000.
    serde_json::Value::Object(m).to_string()
}

/// Timing history key of a project: the same repository (or directory) and sub-directory share
/// history, whatever branch or commit is built.
fn project_key(req: &proto::BuildRequest) -> String {
    use proto::project_source::Kind;
    match req.source.as_ref().and_then(|s| s.kind.as_ref()) {
        Some(Kind::Git(g)) => format!(
            "git:{}//{}",
            g.url.trim_end_matches('/'),
            req.project_directory
        ),
        Some(Kind::Directory(d)) => format!(
            "dir:{}//{}",
            d.path.trim_end_matches('/'),
            req.project_directory
        ),
        None => String::new(),
    }
}

impl Build {
    fn new(id: u64, mut request: proto::BuildRequest) -> Self {
        let project_key = project_key(&request);
        let atoms_override = std::mem::take(&mut request.atoms_override);
        Self {
            id,
            request,
            atoms_override,
            state: BuildState::Queued,
            result: proto::BuildResult::Unspecified,
            error: String::new(),
            timestamps: vec![(BuildState::Queued, now_epoch())],
            job: None,
            commit: String::new(),
            project_key,
            project_dir: String::new(),
            subjobs: Vec::new(),
            pending: VecDeque::new(),
            completed_subjobs: 0,
            completed_atoms: 0,
            failed_atoms: 0,
            flaky_atoms: 0,
            num_atoms: 0,
            artifacts_ready: false,
            archiving: false,
            setup_failures: 0,
            prepare_attempts: 0,
            preparing_on: None,
            slaves: BTreeMap::new(),
            next_executor_index: 0,
            executors_in_use: 0,
            recovered: false,
            artifact_bytes: 0,
            grouping_durable: false,
            prepare_excluded: BTreeSet::new(),
            summary: None,
            killing: false,
        }
    }

    fn num_subjobs(&self) -> u32 {
        self.summary
            .as_ref()
            .map_or(self.subjobs.len() as u32, |s| s.num_subjobs)
    }

    /// Drops a final build's atoms from memory, keeping what status reads need.
    fn evict(&mut self) {
        if !self.state.is_final() || self.summary.is_some() {
            return;
        }
        let atoms = || self.subjobs.iter().flat_map(|s| &s.atoms);
        let finished = self.state == BuildState::Finished;
        let summary = FinalSummary {
            num_subjobs: self.subjobs.len() as u32,
            failed: atoms()
                .filter(|a| finished && a.exit_code.is_some_and(|c| c != 0))
                .cloned()
                .collect(),
            flaky: atoms().filter(|a| finished && a.flaky).cloned().collect(),
            serialized_seconds: atoms().filter_map(|a| a.actual_time).sum(),
        };
        self.summary = Some(summary);
        self.subjobs = Vec::new();
        self.pending = VecDeque::new();
    }

    /// Applies an event through the state machine. An illegal event is logged and refused.
    fn transition(&mut self, event: BuildEvent) -> bool {
        match self.state.on(event) {
            Ok(next) => {
                self.state = next;
                self.timestamps.push((next, now_epoch()));
                true
            }
            Err(e) => {
                tracing::warn!(build = self.id, error = %e, "refused build state transition");
                false
            }
        }
    }

    fn job_name(&self) -> String {
        self.job
            .as_ref()
            .map(|j| j.name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| self.request.job_name.clone())
    }

    fn max_executors(&self) -> u32 {
        self.job
            .as_ref()
            .map(|j| j.max_executors)
            .filter(|&n| n > 0)
            .unwrap_or(u32::MAX)
    }

    fn max_per_slave(&self) -> u32 {
        self.job
            .as_ref()
            .map(|j| j.max_executors_per_slave)
            .filter(|&n| n > 0)
            .unwrap_or(u32::MAX)
    }

    fn to_proto(&self, with_failed_atoms: bool) -> proto::Build {
        let list = |pick: fn(&proto::Atom) -> bool| -> Vec<proto::Atom> {
            if with_failed_atoms && self.state == BuildState::Finished {
                self.subjobs
                    .iter()
                    .flat_map(|s| &s.atoms)
                    .filter(|a| pick(a))
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            }
        };
        let (failed_atoms, flaky_atoms) = match &self.summary {
            Some(s) if with_failed_atoms => (s.failed.clone(), s.flaky.clone()),
            Some(_) => (Vec::new(), Vec::new()),
            None => (
                list(|a| a.exit_code.is_some_and(|c| c != 0)),
                list(|a| a.flaky),
            ),
        };
        proto::Build {
            id: self.id,
            state: proto::BuildState::from(self.state) as i32,
            result: self.result as i32,
            error_message: self.error.clone(),
            request: Some(self.request.clone()),
            job_name: self.job_name(),
            commit: self.commit.clone(),
            num_subjobs: self.num_subjobs(),
            completed_subjobs: self.completed_subjobs,
            num_atoms: self.num_atoms,
            completed_atoms: self.completed_atoms,
            failed_atom_count: self.failed_atoms,
            failed_atoms,
            state_timestamps: self
                .timestamps
                .iter()
                .map(|&(s, at)| proto::StateTimestamp {
                    state: proto::BuildState::from(s) as i32,
                    at,
                })
                .collect(),
            artifacts_ready: self.artifacts_ready,
            command: self
                .job
                .as_ref()
                .map(|j| j.commands.clone())
                .unwrap_or_default(),
            project_dir: self.project_dir.clone(),
            flaky_atom_count: self.flaky_atoms,
            flaky_atoms,
        }
    }

    fn to_record(&self) -> proto::StoredBuild {
        proto::StoredBuild {
            build: Some(self.to_proto(self.summary.is_some())),
            job: self.job.clone(),
            project_key: self.project_key.clone(),
            setup_failures: self.setup_failures,
            prepare_attempts: self.prepare_attempts,
            serialized_seconds: self.summary.as_ref().map(|s| s.serialized_seconds),
        }
    }

    /// Artifact directory names of every atom, and of the failed ones, in (subjob, atom) order.
    /// Every atom's artifact directory with its bookkeeping files (generated, not stored per
    /// atom), and the names of the failed atoms' directories, in (subjob, atom) order.
    fn archived_atoms(&self) -> (Vec<ArchivedAtom>, Vec<String>) {
        let mut all = Vec::with_capacity(self.num_atoms as usize);
        let mut failed = Vec::new();
        for (sid, s) in self.subjobs.iter().enumerate() {
            for a in &s.atoms {
                let exit_code = a.exit_code.unwrap_or(-1);
                if exit_code != 0 {
                    failed.push(crate::archive::artifact_dir_name(sid as u32, a.id));
                }
                all.push(ArchivedAtom {
                    subjob: sid as u32,
                    atom: a.id,
                    command_string: a.command_string.clone(),
                    exit_code,
                    seconds: a.actual_time.unwrap_or_default(),
                });
            }
        }
        (all, failed)
    }
}

impl Core {
    /// A core over `store`, writing results under `layout` through the `results` queue.
    pub fn new(
        cfg: CoreConfig,
        store: Store,
        layout: ResultsLayout,
        results: mpsc::UnboundedSender<ResultsJob>,
        changes: broadcast::Sender<u64>,
        self_tx: mpsc::WeakSender<Command>,
    ) -> Self {
        Self {
            cfg,
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
            next_attempt: 0,
            attempt_end: 0,
            next_slave_id: 1,
            doomed: BTreeSet::new(),
            events: VecDeque::new(),
            next_event_id: 1,
            metrics: Metrics::default(),
            resume_until: None,
            durable: Vec::new(),
            unsaved: BTreeSet::new(),
            flushing: false,
        }
    }

    /// Loads every stored build. Unfinished builds resume: a build that was queued or preparing
    /// is prepared again; a building build re-queues every subjob that still lacks results; a
    /// build whose atoms were all done gets its archives (re)written.
    pub fn recover(&mut self) -> Result<()> {
        self.event(
            "SERVICE_STARTED",
            serde_json::json!({ "service": "master" }),
        );
        for rec in self.store.load_builds()? {
            let Some(pb) = rec.build else { continue };
            let mut b = Build::new(pb.id, pb.request.unwrap_or_default());
            b.state = proto::BuildState::try_from(pb.state)
                .ok()
                .and_then(|s| BuildState::try_from(s).ok())
                .ok_or_else(|| MasterError::Corrupt(format!("build {} has no state", pb.id)))?;
            b.result = proto::BuildResult::try_from(pb.result).unwrap_or_default();
            b.error = pb.error_message;
            b.timestamps = pb
                .state_timestamps
                .iter()
                .filter_map(|t| {
                    let s = proto::BuildState::try_from(t.state).ok()?;
                    Some((BuildState::try_from(s).ok()?, t.at))
                })
                .collect();
            b.job = rec.job;
            b.commit = pb.commit;
            b.project_key = rec.project_key;
            b.project_dir = pb.project_dir;
            b.artifacts_ready = pb.artifacts_ready;
            // What was stored is durable by definition.
            b.grouping_durable = true;
            b.setup_failures = rec.setup_failures;
            b.prepare_attempts = rec.prepare_attempts;
            let n_subjobs = pb.num_subjobs as usize;
            // A final build stored with its summary needs none of its atoms in memory (older
            // records lack it: those are read and summarised below).
            if b.state.is_final()
                && let Some(serialized_seconds) = rec.serialized_seconds
            {
                b.num_atoms = pb.num_atoms;
                b.completed_atoms = pb.completed_atoms;
                b.completed_subjobs = pb.completed_subjobs;
                b.failed_atoms = pb.failed_atom_count;
                b.flaky_atoms = pb.flaky_atom_count;
                b.summary = Some(FinalSummary {
                    num_subjobs: pb.num_subjobs,
                    failed: pb.failed_atoms,
                    flaky: pb.flaky_atoms,
                    serialized_seconds,
                });
                self.builds.insert(b.id, b);
                continue;
            }
            if n_subjobs > 0 {
                let mut subjobs: Vec<Subjob> = (0..n_subjobs)
                    .map(|_| Subjob {
                        atoms: Vec::new(),
                        running: None,
                        completed: false,
                        attempts: 0,
                        slave: String::new(),
                    })
                    .collect();
                for a in self.store.load_atoms(b.id)? {
                    if let Some(s) = subjobs.get_mut(a.subjob_id as usize) {
                        s.atoms.push(a);
                    }
                }
                for (sj, n) in self.store.load_attempts(b.id)? {
                    if let Some(s) = subjobs.get_mut(sj as usize) {
                        s.attempts = n;
                    }
                }
                // First dispatches are not stored: a subjob with results ran at least once.
                for s in &mut subjobs {
                    let ran = s.atoms.iter().any(|a| a.exit_code.is_some());
                    s.attempts = s.attempts.max(u32::from(ran));
                }
                b.subjobs = subjobs;
            }
            b.num_atoms = b.subjobs.iter().map(|s| s.atoms.len() as u32).sum();
            for (sid, s) in b.subjobs.iter_mut().enumerate() {
                for a in &mut s.atoms {
                    if a.exit_code.is_some() {
                        a.state = proto::AtomState::Completed as i32;
                        b.completed_atoms += 1;
                        if a.exit_code != Some(0) {
                            b.failed_atoms += 1;
                        }
                        if a.flaky {
                            b.flaky_atoms += 1;
                        }
                    } else {
                        a.state = proto::AtomState::NotStarted as i32;
                    }
                }
                s.slave = s
                    .atoms
                    .iter()
                    .rev()
                    .find(|a| !a.slave.is_empty())
                    .map(|a| a.slave.clone())
                    .unwrap_or_default();
                s.completed = s.atoms.iter().all(|a| a.exit_code.is_some());
                if s.completed {
                    b.completed_subjobs += 1;
                } else if !b.state.is_final() {
                    b.pending.push_back(sid as u32);
                }
            }
            let id = b.id;
            match b.state {
                BuildState::Preparing => {
                    b.transition(BuildEvent::Requeue);
                }
                s if s.is_final() => {}
                _ => {}
            }
            if !b.state.is_final() {
                b.atoms_override = self.store.atoms_override(id)?;
                // A result may have been stored just before the crash, before its files were
                // moved into place: promotion is idempotent, so redo it for every result.
                for a in b.subjobs.iter().flat_map(|s| &s.atoms) {
                    if a.exit_code.is_some() && a.attempt > 0 {
                        let _ = self.results.send(ResultsJob::Promote {
                            build: id,
                            attempt: a.attempt,
                            subjob: a.subjob_id,
                            atom: a.id,
                        });
                    }
                }
                if matches!(b.state, BuildState::Prepared | BuildState::Building) {
                    b.recovered = true;
                    self.resume_until = Some(Instant::now() + self.cfg.resume_grace);
                }
                tracing::info!(build = id, state = ?b.state, pending = b.pending.len(), "resuming build after restart");
                self.active.insert(id);
            }
            let summarised = b.state.is_final();
            b.evict();
            self.builds.insert(id, b);
            if summarised {
                // An older record: store the summary so the next start skips the atoms.
                self.persist(id);
            }
        }
        let ids: Vec<u64> = self.active.iter().copied().collect();
        for id in ids {
            self.persist(id);
            self.check_complete(id);
        }
        Ok(())
    }

    /// Appends to the event log (bounded: the oldest events fall off).
    fn event(&mut self, tag: &str, fields: serde_json::Value) {
        let e = proto::Event {
            id: self.next_event_id,
            tag: tag.into(),
            timestamp: now_epoch(),
            fields_json: fields.to_string(),
        };
        self.next_event_id += 1;
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    /// Prometheus text: gauges read off the current state, counters and histograms kept as
    /// things happen. Durations per state are derived from the builds' state timestamps.
    fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        metrics::header(&mut out, "ish_builds", "gauge", "Builds by state.");
        for st in BuildState::ALL {
            let n = self.builds.values().filter(|b| b.state == st).count();
            let _ = writeln!(out, "ish_builds{{state=\"{}\"}} {n}", st.name_lower());
        }
        metrics::header(
            &mut out,
            "ish_queue_depth",
            "gauge",
            "Builds not yet finished, errored or canceled.",
        );
        let _ = writeln!(out, "ish_queue_depth {}", self.active.len());
        metrics::header(
            &mut out,
            "ish_subjobs_pending",
            "gauge",
            "Subjobs waiting for an executor.",
        );
        let pending: usize = self
            .active
            .iter()
            .filter_map(|id| self.builds.get(id))
            .map(|b| b.pending.len())
            .sum();
        let _ = writeln!(out, "ish_subjobs_pending {pending}");
        metrics::header(
            &mut out,
            "slaves",
            "gauge",
            "Connected slaves by state (active = running work).",
        );
        let (mut active, mut idle, mut draining) = (0, 0, 0);
        for s in self.slaves.values() {
            if s.draining {
                draining += 1;
            } else if s.busy.is_empty() {
                idle += 1;
            } else {
                active += 1;
            }
        }
        let _ = writeln!(out, "slaves{{state=\"active\"}} {active}");
        let _ = writeln!(out, "slaves{{state=\"idle\"}} {idle}");
        let _ = writeln!(out, "slaves{{state=\"draining\"}} {draining}");
        metrics::header(
            &mut out,
            "ish_executors",
            "gauge",
            "Executors of connected slaves, and how many run work.",
        );
        let total: u32 = self.slaves.values().map(|s| s.executors).sum();
        let busy: usize = self.slaves.values().map(|s| s.busy.len()).sum();
        let _ = writeln!(out, "ish_executors{{state=\"total\"}} {total}");
        let _ = writeln!(out, "ish_executors{{state=\"busy\"}} {busy}");
        metrics::header(
            &mut out,
            "build_state_duration_seconds",
            "histogram",
            "Seconds builds spent in each state they left.",
        );
        let mut durations: BTreeMap<&'static str, metrics::Histogram> = BTreeMap::new();
        let mut serialized = metrics::Histogram::new(&metrics::DURATION_BUCKETS);
        for b in self.builds.values() {
            for w in b.timestamps.windows(2) {
                durations
                    .entry(w[0].0.name_lower())
                    .or_insert_with(|| metrics::Histogram::new(&metrics::DURATION_BUCKETS))
                    .observe((w[1].1 - w[0].1).max(0.0));
            }
            if b.state == BuildState::Finished
                && let Some(s) = &b.summary
            {
                serialized.observe(s.serialized_seconds);
            }
        }
        for (state, h) in &durations {
            h.render(
                &mut out,
                "build_state_duration_seconds",
                &format!("state=\"{state}\""),
            );
        }
        metrics::header(
            &mut out,
            "serialized_build_time_seconds",
            "histogram",
            "Sum of the atom times of each finished build.",
        );
        serialized.render(&mut out, "serialized_build_time_seconds", "");
        metrics::header(
            &mut out,
            "ish_dispatches_total",
            "counter",
            "Subjobs dispatched to slaves.",
        );
        let _ = writeln!(out, "ish_dispatches_total {}", self.metrics.dispatches);
        metrics::header(
            &mut out,
            "ish_atom_results_total",
            "counter",
            "Atom results recorded.",
        );
        let _ = writeln!(out, "ish_atom_results_total {}", self.metrics.atom_results);
        metrics::header(
            &mut out,
            "ish_slaves_lost_total",
            "counter",
            "Slaves removed because their stream ended or their heartbeats stopped.",
        );
        let _ = writeln!(out, "ish_slaves_lost_total {}", self.metrics.slaves_lost);
        metrics::header(
            &mut out,
            "internal_errors",
            "counter",
            "Internal errors by type.",
        );
        for (kind, n) in &self.metrics.internal_errors {
            let _ = writeln!(out, "internal_errors{{type=\"{kind}\"}} {n}");
        }
        out
    }

    /// A fresh attempt id (unique for the data dir: attempt ids name directories).
    fn new_attempt(&mut self) -> u64 {
        const BLOCK: u64 = 1 << 20;
        if self.next_attempt >= self.attempt_end {
            match self.store.reserve_attempts(BLOCK) {
                Ok(start) => {
                    self.next_attempt = start;
                    self.attempt_end = start + BLOCK;
                }
                // Keep going in memory; ids only risk repeating after a restart.
                Err(e) => tracing::error!(error = %e, "could not reserve attempt ids"),
            }
        }
        self.next_attempt += 1;
        self.next_attempt - 1
    }

    /// Handles one command.
    pub fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(req, reply) => match self.submit(req) {
                // Answered once the build is on disk (see `start_flush`).
                Ok(id) => self.durable.push(Durable::Submitted(id, reply)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Flushed(batch, outcome) => self.flushed(batch, outcome),
            Command::Cancel(id, reply) => {
                let _ = reply.send(self.cancel(id));
            }
            Command::GetBuild(id, reply) => {
                let r = self
                    .builds
                    .get(&id)
                    .map(|b| b.to_proto(true))
                    .ok_or_else(|| unknown_build(id));
                let _ = reply.send(r);
            }
            Command::ListBuilds {
                offset,
                limit,
                unfinished_only,
                reply,
            } => {
                // ClusterRunner kept ERROR builds in its queue forever; an ended build is not queued.
                let matching = self
                    .builds
                    .values()
                    .filter(|b| !unfinished_only || !b.state.is_final());
                let total = matching.clone().count() as u32;
                let take = if limit == 0 {
                    usize::MAX
                } else {
                    limit as usize
                };
                let mut bytes = 0;
                let builds = matching
                    .skip(offset as usize)
                    .take(take)
                    .map(|b| b.to_proto(true))
                    .take_while(|b| {
                        let first = bytes == 0;
                        bytes += prost::Message::encoded_len(b);
                        first || bytes <= LIST_PAGE_BYTES
                    })
                    .collect();
                let _ = reply.send(Ok(proto::ListBuildsResponse { builds, total }));
            }
            Command::ListSubjobs {
                build,
                offset,
                limit,
                reply,
            } => {
                let _ = reply.send(self.list_subjobs(build, offset, limit));
            }
            Command::Console {
                build,
                subjob,
                atom,
                reply,
            } => {
                let _ = reply.send(self.console(build, subjob, atom));
            }
            Command::Archive(id, reply) => {
                let r = match self.builds.get(&id) {
                    None => Err(unknown_build(id)),
                    Some(b) if b.artifacts_ready => Ok(self.layout.build_dir(id)),
                    Some(b) => Err(MasterError::FailedPrecondition(format!(
                        "Build {id} has no artifacts yet (state {:?}).",
                        b.state
                    ))),
                };
                let _ = reply.send(r);
            }
            Command::ListSlaves(reply) => {
                let _ = reply.send(Ok(self.list_slaves()));
            }
            Command::Drain { ids, all, reply } => {
                let _ = reply.send(self.drain(ids, all));
            }
            Command::SlaveConnected(reg, tx, reply) => {
                let _ = reply.send(self.slave_connected(reg, tx));
            }
            Command::FromSlave(sid, msg) => self.on_slave_message(sid, msg),
            Command::SlaveDisconnected(sid) => {
                if self.slaves.contains_key(&sid) {
                    self.lose_slave(sid, "its stream ended");
                }
            }
            Command::UploadTarget {
                slave,
                build,
                subjob,
                atom,
                attempt,
                reply,
            } => {
                let ok =
                    self.attempts.get(&attempt).is_some_and(|a| {
                        a.slave == slave && a.build == build && a.subjob == subjob
                    }) && self
                        .builds
                        .get(&build)
                        .and_then(|b| b.subjobs.get(subjob as usize))
                        .is_some_and(|s| (atom as usize) < s.atoms.len());
                let r = if ok {
                    let used = self
                        .builds
                        .get(&build)
                        .map(|b| b.artifact_bytes)
                        .unwrap_or(0);
                    Ok(UploadGrant {
                        dir: self.layout.attempt_atom_dir(build, attempt, subjob, atom),
                        live_console: self.layout.live_console(build, attempt, subjob, atom),
                        budget: self.cfg.max_artifact_bytes_per_build.saturating_sub(used),
                    })
                } else {
                    Err(MasterError::FailedPrecondition(format!(
                        "attempt {attempt} of build {build} subjob {subjob} is not assigned to this slave"
                    )))
                };
                let _ = reply.send(r);
            }
            Command::ArchivesWritten(id, outcome) => self.archives_written(id, outcome),
            Command::ResultsFailed(id, msg) => {
                self.metrics.internal_error("ResultsWriteFailure");
                if self.builds.get(&id).is_some_and(|b| !b.state.is_final()) {
                    self.end_build(id, BuildEvent::Fail, msg);
                }
            }
            Command::ArtifactBytes(id, bytes) => {
                if let Some(b) = self.builds.get_mut(&id) {
                    b.artifact_bytes += bytes;
                }
            }
            Command::ListEvents {
                since_id,
                since_timestamp,
                reply,
            } => {
                let events = self
                    .events
                    .iter()
                    .filter(|e| since_id.is_none_or(|id| e.id > id))
                    .filter(|e| since_timestamp.is_none_or(|t| e.timestamp > t))
                    .cloned()
                    .collect();
                let _ = reply.send(Ok(events));
            }
            Command::Metrics(reply) => {
                let _ = reply.send(Ok(self.render_metrics()));
            }
            Command::Tick(now) => self.sweep(now),
            Command::Shutdown(done) => {
                // Dropping the senders ends the slaves' streams; they reconnect to the next master.
                self.slaves.clear();
                let _ = done.send(());
                return;
            }
        }
        self.settle();
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

    /// Group commit: one database flush at a time covers everything that waits to be durable;
    /// what arrives meanwhile rides on the next one. Answers go out when the flush is done.
    fn start_flush(&mut self) {
        if self.flushing || self.durable.is_empty() {
            return;
        }
        self.flushing = true;
        let batch = std::mem::take(&mut self.durable);
        let store = self.store.clone();
        let back = self.self_tx.clone();
        tokio::spawn(async move {
            let outcome = store.flush().await.map_err(|e| e.to_string());
            match back.upgrade() {
                Some(tx) => {
                    let _ = tx.send(Command::Flushed(batch, outcome)).await;
                }
                None => {
                    for d in batch {
                        if let Durable::Submitted(_, reply) = d {
                            let _ = reply.send(Err(MasterError::ShuttingDown));
                        }
                    }
                }
            }
        });
    }

    fn flushed(&mut self, batch: Vec<Durable>, outcome: std::result::Result<(), String>) {
        self.flushing = false;
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "database flush failed");
            self.metrics.internal_error("StorageFlushFailure");
        }
        for d in batch {
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
                    self.send(sid, Down::SubjobAck(proto::SubjobAck { attempt }));
                }
                // Without an ack the slave keeps the attempt and reports it again.
                (Durable::Ack(..), Err(_)) => {}
                (Durable::Prepared(id), Ok(())) => {
                    if let Some(b) = self.builds.get_mut(&id) {
                        b.grouping_durable = true;
                    }
                }
                // Try again with the next flush.
                (Durable::Prepared(id), Err(_)) => self.durable.push(Durable::Prepared(id)),
            }
        }
    }

    fn notify(&self, build: u64) {
        let _ = self.changes.send(build);
    }

    fn persist(&mut self, id: u64) {
        let Some(b) = self.builds.get(&id) else {
            return;
        };
        match self.store.put_build(&b.to_record()) {
            Ok(()) => {
                self.unsaved.remove(&id);
            }
            Err(e) => {
                if self.unsaved.insert(id) {
                    tracing::error!(build = id, error = %e, "could not store build; retrying");
                    self.metrics.internal_error("StorageWriteFailure");
                }
            }
        }
    }

    /// Writes again what a storage error kept from the disk.
    fn retry_unsaved(&mut self) {
        let ids: Vec<u64> = self.unsaved.iter().copied().collect();
        let mut stored = false;
        for id in ids {
            self.persist(id);
            if !self.unsaved.contains(&id) {
                tracing::info!(build = id, "build stored after an earlier storage error");
                stored = true;
            }
        }
        if stored {
            let store = self.store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.flush().await {
                    tracing::error!(error = %e, "could not flush the database");
                }
            });
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

    // ----- client commands -------------------------------------------------------------------

    fn submit(&mut self, mut req: proto::BuildRequest) -> Result<u64> {
        validate_request(&req, self.cfg.max_atoms_per_build)?;
        req.request_params_json = if req.request_params_json.is_empty() {
            request_params_json(&req)
        } else {
            // What is stored is the parameters, not the body's bytes: no padding, and the atoms
            // (up to 100,000) are kept once, apart from the record.
            ish_core::jsontext::compact_object(&req.request_params_json, &["atoms_override"])
                .ok_or_else(|| invalid("request_params_json must be a JSON object."))?
        };
        if req.request_params_json.len() > MAX_REQUEST_PARAMS_BYTES {
            return Err(invalid(format!(
                "The build parameters are too large: {} bytes once normalized, at most {MAX_REQUEST_PARAMS_BYTES}.",
                req.request_params_json.len()
            )));
        }
        let id = self.store.next_build_id()?;
        let b = Build::new(id, req);
        if !b.atoms_override.is_empty() {
            self.store.put_atoms_override(id, &b.atoms_override)?;
        }
        self.store.put_build(&b.to_record())?;
        tracing::info!(build = id, "build queued");
        self.builds.insert(id, b);
        self.event(
            "BUILD_REQUEST_QUEUED",
            serde_json::json!({ "build_id": id }),
        );
        self.active.insert(id);
        self.notify(id);
        Ok(id)
    }

    fn cancel(&mut self, id: u64) -> Result<proto::Build> {
        let b = self.builds.get(&id).ok_or_else(|| unknown_build(id))?;
        if !b.state.is_final() {
            self.end_build(id, BuildEvent::Cancel, String::new());
        }
        Ok(self.builds[&id].to_proto(true))
    }

    fn list_subjobs(&self, id: u64, offset: u32, limit: u32) -> Result<proto::ListSubjobsResponse> {
        let b = self.builds.get(&id).ok_or_else(|| unknown_build(id))?;
        let take = if limit == 0 {
            usize::MAX
        } else {
            limit as usize
        };
        let command = b
            .job
            .as_ref()
            .map(|j| j.commands.clone())
            .unwrap_or_default();
        if let Some(sum) = &b.summary {
            return self.list_stored_subjobs(id, sum.num_subjobs, offset, take, &command);
        }
        let subjobs = b
            .subjobs
            .iter()
            .enumerate()
            .skip(offset as usize)
            .take(take)
            .map(|(i, s)| proto::Subjob {
                build_id: id,
                id: i as u32,
                atoms: s.atoms.clone(),
                slave: s.slave.clone(),
                state: if s.completed {
                    proto::SubjobState::Completed
                } else if s.running.is_some() {
                    proto::SubjobState::Running
                } else {
                    proto::SubjobState::Pending
                } as i32,
                attempts: s.attempts,
                command: command.clone(),
            })
            .collect();
        Ok(proto::ListSubjobsResponse {
            subjobs,
            total: b.subjobs.len() as u32,
        })
    }

    /// `list_subjobs` of a final build: its atoms are read from the store.
    fn list_stored_subjobs(
        &self,
        id: u64,
        num_subjobs: u32,
        offset: u32,
        take: usize,
        command: &str,
    ) -> Result<proto::ListSubjobsResponse> {
        let start = offset.min(num_subjobs);
        let end = (u64::from(start) + take as u64).min(u64::from(num_subjobs)) as u32;
        let attempts: HashMap<u32, u32> = self
            .store
            .load_attempts_range(id, start..end)?
            .into_iter()
            .collect();
        let mut subjobs: Vec<proto::Subjob> = (start..end)
            .map(|i| proto::Subjob {
                build_id: id,
                id: i,
                attempts: attempts.get(&i).copied().unwrap_or(0),
                command: command.to_string(),
                ..Default::default()
            })
            .collect();
        for mut a in self.store.load_atoms_range(id, start..end)? {
            let Some(s) = subjobs.get_mut((a.subjob_id - start) as usize) else {
                continue;
            };
            a.state = if a.exit_code.is_some() {
                proto::AtomState::Completed
            } else {
                proto::AtomState::NotStarted
            } as i32;
            if !a.slave.is_empty() {
                s.slave = a.slave.clone();
            }
            s.atoms.push(a);
        }
        for s in &mut subjobs {
            let done = !s.atoms.is_empty() && s.atoms.iter().all(|a| a.exit_code.is_some());
            // First dispatches are not stored: a subjob with results ran at least once.
            s.attempts = s.attempts.max(u32::from(done));
            s.state = if done {
                proto::SubjobState::Completed
            } else {
                proto::SubjobState::Pending
            } as i32;
        }
        Ok(proto::ListSubjobsResponse {
            subjobs,
            total: num_subjobs,
        })
    }

    fn console(&self, id: u64, subjob: u32, atom: u32) -> Result<ConsoleLocation> {
        let b = self.builds.get(&id).ok_or_else(|| unknown_build(id))?;
        let bad_subjob = || MasterError::NotFound("Invalid subjob id.".into());
        let bad_atom = || MasterError::NotFound("Invalid atom id.".into());
        let (a, running) = match &b.summary {
            Some(sum) => {
                if subjob >= sum.num_subjobs {
                    return Err(bad_subjob());
                }
                let a = self
                    .store
                    .get_atom(id, subjob, atom)?
                    .ok_or_else(bad_atom)?;
                (std::borrow::Cow::Owned(a), None)
            }
            None => {
                let s = b.subjobs.get(subjob as usize).ok_or_else(bad_subjob)?;
                let a = s.atoms.get(atom as usize).ok_or_else(bad_atom)?;
                (std::borrow::Cow::Borrowed(a), s.running)
            }
        };
        if a.exit_code.is_some() {
            // Until promoted, the console is the attempt's uploaded one or what streamed in.
            let pending = if a.attempt > 0 {
                vec![
                    self.layout
                        .attempt_atom_dir(id, a.attempt, subjob, atom)
                        .join(CONSOLE_FILE),
                    self.layout.live_console(id, a.attempt, subjob, atom),
                ]
            } else {
                Vec::new()
            };
            return Ok(ConsoleLocation {
                path: self.layout.atom_dir(id, subjob, atom).join(CONSOLE_FILE),
                pending,
                complete: true,
            });
        }
        match running {
            Some(attempt) if !b.state.is_final() => Ok(ConsoleLocation {
                path: self.layout.live_console(id, attempt, subjob, atom),
                pending: Vec::new(),
                complete: false,
            }),
            _ => Err(MasterError::NotFound(format!(
                "Console output does not exist on this host for build {id}, subjob {subjob}, atom {atom}."
            ))),
        }
    }

    fn list_slaves(&self) -> proto::ListSlavesResponse {
        let slaves = self
            .slaves
            .values()
            .map(|s| {
                let in_use = s.busy.len() as u32;
                proto::Slave {
                    id: s.id,
                    name: s.name.clone(),
                    executors: s.executors,
                    executors_in_use: in_use,
                    state: if s.draining {
                        proto::SlaveState::Draining
                    } else if in_use > 0 {
                        proto::SlaveState::Busy
                    } else {
                        proto::SlaveState::Idle
                    } as i32,
                    build_ids: self
                        .builds
                        .values()
                        .filter(|b| {
                            b.slaves
                                .get(&s.id)
                                .is_some_and(|sb| sb.state != SlaveBuildState::TornDown)
                        })
                        .map(|b| b.id)
                        .collect(),
                    session_id: s.session_id.clone(),
                    labels: s.labels.clone(),
                    version: s.version.clone(),
                    last_heartbeat: s.last_heartbeat,
                }
            })
            .collect();
        proto::ListSlavesResponse { slaves }
    }

    fn drain(&mut self, ids: Vec<u64>, all: bool) -> Result<Vec<u64>> {
        let ids: Vec<u64> = if all {
            self.slaves.keys().copied().collect()
        } else {
            ids
        };
        if let Some(bad) = ids.iter().find(|id| !self.slaves.contains_key(id)) {
            return Err(MasterError::NotFound(format!(
                "Requested slave (slave_id={bad}) does not exist."
            )));
        }
        for &sid in &ids {
            if let Some(s) = self.slaves.get_mut(&sid) {
                s.draining = true;
            }
            self.sync_free(sid);
            self.send(sid, Down::Drain(proto::Drain { grace_ms: 0 }));
        }
        Ok(ids)
    }

    // ----- slave events ----------------------------------------------------------------------

    fn slave_connected(&mut self, reg: proto::Register, tx: SlaveTx) -> Result<u64> {
        if reg.executors == 0 || reg.executors > 1024 {
            return Err(invalid("executors must be between 1 and 1024"));
        }
        if reg.name.trim().is_empty() {
            return Err(invalid("a slave must register with a name"));
        }
        // The same slave reconnecting (or restarted) replaces its old record; its old work is
        // re-queued because the new session starts with nothing running.
        let old: Vec<u64> = self
            .slaves
            .values()
            .filter(|s| s.name == reg.name)
            .map(|s| s.id)
            .collect();
        for sid in old {
            self.lose_slave(sid, "it registered again");
        }
        let id = self.next_slave_id;
        self.next_slave_id += 1;
        let s = Slave {
            id,
            name: reg.name,
            session_id: reg.session_id,
            executors: reg.executors,
            labels: reg.labels,
            version: reg.version,
            tx,
            free_slots: (0..reg.executors).collect(),
            busy: BTreeMap::new(),
            draining: false,
            last_seen: Instant::now(),
            last_heartbeat: now_epoch(),
        };
        tracing::info!(slave = id, name = %s.name, executors = s.executors, "slave registered");
        self.event(
            "SLAVE_REGISTERED",
            serde_json::json!({ "slave_id": id, "name": s.name, "executors": s.executors }),
        );
        self.slaves.insert(id, s);
        self.sync_free(id);
        self.send(
            id,
            Down::Registered(proto::Registered {
                slave_id: id,
                heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u64,
            }),
        );
        self.adopt(id, reg.builds, reg.attempts);
        Ok(id)
    }

    /// Takes over the work a (re)connecting slave still holds: builds it is set up for and
    /// attempts it kept running while it was away from this master (a master restart, a network
    /// blip). Attempts whose subjob is still wanted continue where they are; the others are
    /// dropped, and workspaces of builds that no longer run are torn down.
    fn adopt(&mut self, sid: u64, held: Vec<proto::HeldBuild>, reports: Vec<proto::AttemptReport>) {
        let executors = self.slaves.get(&sid).map(|s| s.executors).unwrap_or(0);
        for h in held {
            let Some(b) = self
                .builds
                .get_mut(&h.build_id)
                .filter(|b| !b.state.is_final())
            else {
                self.send(
                    sid,
                    Down::Teardown(proto::Teardown {
                        build_id: h.build_id,
                    }),
                );
                continue;
            };
            if b.slaves.contains_key(&sid) {
                continue;
            }
            // A build being (re)prepared keeps the slave's workspace: teardown reaches it when
            // the build ends, and a Prepare or Setup sent to this slave reuses it.
            let usable = matches!(b.state, BuildState::Prepared | BuildState::Building);
            let sb = if h.set_up && usable {
                let cap = executors.min(b.max_per_slave());
                let start_index = b.next_executor_index;
                b.next_executor_index += cap;
                SlaveBuild {
                    state: SlaveBuildState::Ready,
                    start_index,
                    cap,
                    free_local: (0..cap).collect(),
                }
            } else {
                SlaveBuild {
                    state: SlaveBuildState::Prepared,
                    start_index: 0,
                    cap: 0,
                    free_local: BTreeSet::new(),
                }
            };
            b.slaves.insert(sid, sb);
        }
        for r in reports {
            if !self.adopt_attempt(sid, &r) {
                tracing::info!(
                    slave = sid,
                    build = r.build_id,
                    attempt = r.attempt,
                    "dropping an attempt the master no longer wants"
                );
                self.send(
                    sid,
                    Down::DropAttempt(proto::DropAttempt {
                        build_id: r.build_id,
                        attempt: r.attempt,
                    }),
                );
                continue;
            }
            tracing::info!(
                slave = sid,
                build = r.build_id,
                subjob = r.subjob_id,
                attempt = r.attempt,
                "adopted a running attempt"
            );
            for res in r.results {
                self.atom_result(sid, res);
            }
            if r.done {
                self.subjob_done(
                    sid,
                    proto::SubjobDone {
                        build_id: r.build_id,
                        subjob_id: r.subjob_id,
                        attempt: r.attempt,
                    },
                );
            }
        }
    }

    /// Records a reported attempt as running on `sid` if its subjob still needs it.
    fn adopt_attempt(&mut self, sid: u64, r: &proto::AttemptReport) -> bool {
        let Some(slave) = self.slaves.get(&sid) else {
            return false;
        };
        let slot = if slave.free_slots.contains(&r.executor_index) {
            r.executor_index
        } else if let Some(&s) = slave.free_slots.first() {
            s
        } else {
            return false;
        };
        let Some(b) = self.builds.get_mut(&r.build_id) else {
            return false;
        };
        if !matches!(b.state, BuildState::Prepared | BuildState::Building) {
            return false;
        }
        let Some(sb) = b
            .slaves
            .get_mut(&sid)
            .filter(|sb| sb.state == SlaveBuildState::Ready)
        else {
            return false;
        };
        let wanted_local = r.build_executor_index.checked_sub(sb.start_index);
        let local = match wanted_local.filter(|l| sb.free_local.contains(l)) {
            Some(l) => l,
            None => match sb.free_local.first() {
                Some(&l) => l,
                None => return false,
            },
        };
        let Some(s) = b.subjobs.get_mut(r.subjob_id as usize) else {
            return false;
        };
        if s.completed || s.running.is_some() {
            return false;
        }
        sb.free_local.remove(&local);
        s.running = Some(r.attempt);
        s.attempts = s.attempts.max(1);
        for a in s.atoms.iter_mut().filter(|a| a.exit_code.is_none()) {
            a.state = proto::AtomState::InProgress as i32;
        }
        b.pending.retain(|&p| p != r.subjob_id);
        b.executors_in_use += 1;
        if b.state == BuildState::Prepared {
            b.transition(BuildEvent::StartBuilding);
        }
        let slave = self.slaves.get_mut(&sid).expect("checked above");
        slave.free_slots.remove(&slot);
        slave.busy.insert(slot, Work::Subjob(r.attempt));
        self.sync_free(sid);
        self.attempts.insert(
            r.attempt,
            Attempt {
                build: r.build_id,
                subjob: r.subjob_id,
                slave: sid,
                slot,
                local,
            },
        );
        self.persist(r.build_id);
        self.notify(r.build_id);
        true
    }

    fn on_slave_message(&mut self, sid: u64, msg: Up) {
        let Some(slave) = self.slaves.get_mut(&sid) else {
            tracing::debug!(
                slave = sid,
                "message from a slave that is no longer registered; ignored"
            );
            return;
        };
        slave.last_seen = Instant::now();
        match msg {
            Up::Register(_) => tracing::warn!(slave = sid, "duplicate Register ignored"),
            Up::Heartbeat(_) => {
                slave.last_heartbeat = now_epoch();
                self.send(
                    sid,
                    Down::Heartbeat(proto::Heartbeat {
                        sent_at: now_epoch(),
                    }),
                );
            }
            Up::Prepared(r) => self.prepared(sid, r),
            Up::Setup(r) => self.setup_done(sid, r),
            Up::AtomStarted(a) => self.atom_started(sid, a),
            // Console bytes are written to disk by the session reader; nothing to track here.
            Up::Console(_) => {}
            Up::AtomResult(r) => self.atom_result(sid, r),
            Up::SubjobDone(d) => self.subjob_done(sid, d),
            Up::TeardownDone(t) => {
                if !t.ok {
                    tracing::warn!(slave = sid, build = t.build_id, error = %t.error, "teardown_build failed");
                }
            }
            Up::Draining(d) => {
                tracing::info!(slave = sid, reason = %d.reason, "slave is draining");
                slave.draining = true;
                self.sync_free(sid);
                self.event("SLAVE_DRAINING", serde_json::json!({ "slave_id": sid }));
            }
            Up::GoingAway(g) => {
                tracing::info!(slave = sid, reason = %g.reason, "slave is leaving");
                self.lose_slave(sid, "it left");
            }
        }
    }

    fn free_slot(&mut self, sid: u64, slot: u32) {
        if let Some(s) = self.slaves.get_mut(&sid) {
            s.busy.remove(&slot);
            s.free_slots.insert(slot);
        }
        self.sync_free(sid);
    }

    /// Keeps `free` in step with one slave's executors and draining flag.
    fn sync_free(&mut self, sid: u64) {
        match self.slaves.get(&sid) {
            Some(s) if !s.draining && !s.free_slots.is_empty() => self.free.insert(sid),
            _ => self.free.remove(&sid),
        };
    }

    fn prepared(&mut self, sid: u64, r: proto::PrepareResult) {
        let id = r.build_id;
        let slot = self.slaves.get(&sid).and_then(|s| {
            s.busy
                .iter()
                .find(|(_, w)| matches!(w, Work::Prepare(b) if *b == id))
                .map(|(slot, _)| *slot)
        });
        let Some(slot) = slot else {
            tracing::warn!(
                slave = sid,
                build = id,
                "PrepareResult for work this slave was not given; ignored"
            );
            return;
        };
        self.free_slot(sid, slot);
        let Some(b) = self.builds.get_mut(&id) else {
            return;
        };
        if b.state != BuildState::Preparing || b.preparing_on != Some(sid) {
            // Canceled (or reassigned) meanwhile: the slave still has a workspace to clean.
            self.send(sid, Down::Teardown(proto::Teardown { build_id: id }));
            return;
        }
        b.preparing_on = None;
        let ok = r.error.is_empty();
        // The preparing slave keeps the workspace; remember it so teardown reaches it.
        b.slaves.insert(
            sid,
            SlaveBuild {
                state: SlaveBuildState::Prepared,
                start_index: 0,
                cap: 0,
                free_local: BTreeSet::new(),
            },
        );
        self.event(
            "BUILD_PREPARE_FINISH",
            serde_json::json!({ "build_id": id, "is_success": ok }),
        );
        let Some(b) = self.builds.get_mut(&id) else {
            return;
        };
        if !ok {
            tracing::info!(build = id, error = %r.error, retryable = r.retryable, "preparation failed");
            b.prepare_excluded.insert(sid);
            b.prepare_attempts += 1;
            let excluded = b.prepare_excluded.clone();
            let others = self.slaves.keys().any(|s| !excluded.contains(s));
            let b = self.builds.get_mut(&id).expect("checked above");
            if r.retryable && others && b.prepare_attempts < self.cfg.max_prepare_attempts {
                // Another slave may fetch what this one could not.
                b.transition(BuildEvent::Requeue);
                self.persist(id);
                self.notify(id);
            } else {
                self.end_build(id, BuildEvent::Fail, r.error);
            }
            return;
        }
        if r.atoms.len() > self.cfg.max_atoms_per_build {
            let msg = format!(
                "The atomizers produced {} atoms; the limit is {} (max_atoms_per_build).",
                r.atoms.len(),
                self.cfg.max_atoms_per_build
            );
            self.end_build(id, BuildEvent::Fail, msg);
            return;
        }
        let mut job = r.job.unwrap_or_default();
        if job.atom_timeout_seconds == 0 {
            job.atom_timeout_seconds = self.cfg.default_atom_timeout_s;
        }
        let atoms = r.atoms.iter().map(String::as_str);
        let timings = match self.store.timings(&b.project_key, &job.name, atoms) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(build = id, error = %e, "timing history unreadable; grouping without it");
                HashMap::new()
            }
        };
        let max_exec = (job.max_executors > 0).then_some(u64::from(job.max_executors));
        let groups = match proto::DispatchMode::try_from(job.dispatch).unwrap_or_default() {
            proto::DispatchMode::Clusterrunner => {
                grouping::group_atoms(&r.atoms, &timings, max_exec)
            }
            proto::DispatchMode::Queue => {
                // Batches are sized for the executors the build can use now (more may join
                // later; batches then only get relatively smaller, never unfair).
                let per_slave = |n: u32| match job.max_executors_per_slave {
                    0 => n,
                    cap => n.min(cap),
                };
                let fleet: u64 = self
                    .slaves
                    .values()
                    .filter(|s| !s.draining)
                    .map(|s| u64::from(per_slave(s.executors)))
                    .sum();
                let executors = max_exec.map_or(fleet, |m| fleet.min(m));
                grouping::queue_order(&r.atoms, &timings, executors as usize)
            }
        };
        b.subjobs = groups
            .into_iter()
            .enumerate()
            .map(|(sid_, g)| Subjob {
                atoms: g
                    .into_iter()
                    .enumerate()
                    .map(|(aid, ga)| proto::Atom {
                        id: aid as u32,
                        subjob_id: sid_ as u32,
                        command_string: r.atoms[ga.index].clone(),
                        expected_time: ga.expected_time,
                        actual_time: None,
                        exit_code: None,
                        state: proto::AtomState::NotStarted as i32,
                        ..Default::default()
                    })
                    .collect(),
                running: None,
                completed: false,
                attempts: 0,
                slave: String::new(),
            })
            .collect();
        b.num_atoms = r.atoms.len() as u32;
        b.pending = (0..b.subjobs.len() as u32).collect();
        b.job = Some(job);
        b.commit = r.commit;
        b.project_dir = r.project_dir;
        b.transition(BuildEvent::FinishPrepare);
        tracing::info!(
            build = id,
            atoms = b.num_atoms,
            subjobs = b.subjobs.len(),
            "build prepared"
        );
        // A preparation redone after a crash may have left records of another grouping.
        let stored = self.store.clear_build_details(id).and_then(|()| {
            self.store
                .put_atoms(id, b.subjobs.iter().flat_map(|s| &s.atoms))
        });
        if let Err(e) = stored {
            let msg = format!("Could not store the build's atoms: {e}");
            self.end_build(id, BuildEvent::Fail, msg);
            return;
        }
        self.persist(id);
        // Nothing is dispatched until the grouping is on disk: a master that crashes after a
        // dispatch must find the same subjobs (and the slaves' reports must match them).
        self.durable.push(Durable::Prepared(id));
        self.notify(id);
        self.check_complete(id);
    }

    fn setup_done(&mut self, sid: u64, r: proto::SetupResult) {
        let id = r.build_id;
        let Some(b) = self.builds.get_mut(&id) else {
            return;
        };
        let Some(sb) = b.slaves.get_mut(&sid) else {
            return;
        };
        if sb.state != SlaveBuildState::SettingUp {
            return;
        }
        if r.ok {
            sb.state = SlaveBuildState::Ready;
            self.notify(id);
            self.event(
                "BUILD_SETUP_FINISH",
                serde_json::json!({ "build_id": id, "slave_id": sid, "is_success": true }),
            );
            return;
        }
        sb.state = SlaveBuildState::Failed;
        b.setup_failures += 1;
        let failures = b.setup_failures;
        tracing::warn!(build = id, slave = sid, error = %r.error, failures, "setup failed");
        self.event(
            "BUILD_SETUP_FINISH",
            serde_json::json!({ "build_id": id, "slave_id": sid, "is_success": false }),
        );
        self.send(sid, Down::Teardown(proto::Teardown { build_id: id }));
        let b = &self.builds[&id];
        // Out of tries, or no connected slave left that has not failed setup for this build.
        let candidates = self
            .slaves
            .values()
            .filter(|s| {
                !s.draining
                    && !b
                        .slaves
                        .get(&s.id)
                        .is_some_and(|sb| sb.state == SlaveBuildState::Failed)
            })
            .count();
        if failures >= self.cfg.max_setup_failures || candidates == 0 {
            let msg = format!(
                "Setup failed on {failures} slave(s); giving up. Last error: {}",
                r.error
            );
            self.end_build(id, BuildEvent::Fail, msg);
        } else {
            self.persist(id);
        }
    }

    fn current_attempt(&self, sid: u64, attempt: u64, build: u64, subjob: u32) -> Option<Attempt> {
        self.attempts
            .get(&attempt)
            .copied()
            .filter(|a| a.slave == sid && a.build == build && a.subjob == subjob)
    }

    fn atom_started(&mut self, sid: u64, m: proto::AtomStarted) {
        if self
            .current_attempt(sid, m.attempt, m.build_id, m.subjob_id)
            .is_none()
        {
            return;
        }
        let name = self.slaves[&sid].name.clone();
        if let Some(a) = self
            .builds
            .get_mut(&m.build_id)
            .and_then(|b| b.subjobs.get_mut(m.subjob_id as usize))
            .and_then(|s| s.atoms.get_mut(m.atom_id as usize))
        {
            a.slave = name;
            self.notify(m.build_id);
        }
    }

    fn atom_result(&mut self, sid: u64, r: proto::AtomResult) {
        if self
            .current_attempt(sid, r.attempt, r.build_id, r.subjob_id)
            .is_none()
        {
            tracing::info!(
                slave = sid,
                build = r.build_id,
                attempt = r.attempt,
                "result of a stale attempt ignored"
            );
            return;
        }
        let name = self.slaves[&sid].name.clone();
        let Some(b) = self.builds.get_mut(&r.build_id) else {
            return;
        };
        // A build that ended while this ran still records what the killed atom did.
        if b.state.is_final() && !b.killing {
            return;
        }
        let Some(a) = b
            .subjobs
            .get_mut(r.subjob_id as usize)
            .and_then(|s| s.atoms.get_mut(r.atom_id as usize))
        else {
            tracing::warn!(
                slave = sid,
                build = r.build_id,
                "result for an unknown atom ignored"
            );
            return;
        };
        if a.exit_code.is_some() {
            return;
        }
        a.exit_code = Some(r.exit_code);
        a.actual_time = Some(r.seconds);
        a.attempt = r.attempt;
        a.tries = r.tries.max(1);
        a.flaky = r.exit_code == 0 && r.tries > 1;
        a.timed_out = r.timed_out;
        a.state = proto::AtomState::Completed as i32;
        a.slave = name;
        let atom = a.clone();
        self.metrics.atom_results += 1;
        b.completed_atoms += 1;
        if r.exit_code != 0 {
            b.failed_atoms += 1;
        }
        if atom.flaky {
            b.flaky_atoms += 1;
        }
        if let Err(e) = self.store.put_atom(r.build_id, &atom) {
            tracing::error!(build = r.build_id, error = %e, "could not store atom result");
            self.metrics.internal_error("StorageWriteFailure");
            let msg = format!("Could not store an atom's result: {e}");
            self.end_build(r.build_id, BuildEvent::Fail, msg);
            return;
        }
        let _ = self.results.send(ResultsJob::Promote {
            build: r.build_id,
            attempt: r.attempt,
            subjob: r.subjob_id,
            atom: r.atom_id,
        });
        self.notify(r.build_id);
    }

    fn subjob_done(&mut self, sid: u64, d: proto::SubjobDone) {
        let Some(att) = self.current_attempt(sid, d.attempt, d.build_id, d.subjob_id) else {
            // Not ours (any more): tell the slave to forget it.
            self.send(
                sid,
                Down::DropAttempt(proto::DropAttempt {
                    build_id: d.build_id,
                    attempt: d.attempt,
                }),
            );
            return;
        };
        // The slave forgets an attempt once acknowledged, so the ack waits until its results are
        // on disk: a master crash before that makes the slave report them again.
        self.durable.push(Durable::Ack(sid, d.attempt));
        self.attempts.remove(&d.attempt);
        self.event(
            "MASTER_RECEIVED_RESULT",
            serde_json::json!({ "executor_id": att.slot, "build_id": att.build, "subjob_id": att.subjob, "slave_id": sid }),
        );
        self.release(att);
        self.settle_subjob(att.build, att.subjob);
        self.check_complete(att.build);
    }

    /// Frees the executor slot and build-local index of an attempt.
    fn release(&mut self, att: Attempt) {
        self.free_slot(att.slave, att.slot);
        if let Some(b) = self.builds.get_mut(&att.build) {
            b.executors_in_use = b.executors_in_use.saturating_sub(1);
            if let Some(sb) = b.slaves.get_mut(&att.slave) {
                sb.free_local.insert(att.local);
            }
        }
    }

    /// After an attempt ended (done or lost): the subjob is complete, or its remaining atoms go
    /// back to the front of the queue.
    fn settle_subjob(&mut self, id: u64, subjob: u32) {
        let Some(b) = self.builds.get_mut(&id) else {
            return;
        };
        let Some(s) = b.subjobs.get_mut(subjob as usize) else {
            return;
        };
        s.running = None;
        if b.state.is_final() || s.completed {
            return;
        }
        if s.atoms.iter().all(|a| a.exit_code.is_some()) {
            s.completed = true;
            b.completed_subjobs += 1;
        } else if s.attempts >= self.cfg.max_subjob_attempts {
            // Something about this subjob keeps killing slaves (or the fleet is failing): stop
            // throwing executors at it.
            let msg = format!(
                "Subjob {subjob} was interrupted {} times (slaves lost while running it); giving up.",
                s.attempts
            );
            self.end_build(id, BuildEvent::Fail, msg);
            return;
        } else {
            for a in s.atoms.iter_mut().filter(|a| a.exit_code.is_none()) {
                a.state = proto::AtomState::NotStarted as i32;
            }
            b.pending.push_front(subjob);
        }
        self.notify(id);
    }

    /// Starts post-build work once every subjob is complete.
    fn check_complete(&mut self, id: u64) {
        let running = self.has_attempts(id);
        let Some(b) = self.builds.get_mut(&id) else {
            return;
        };
        if b.killing {
            if !running {
                self.retire(id);
            }
            return;
        }
        if b.archiving || !matches!(b.state, BuildState::Prepared | BuildState::Building) {
            return;
        }
        if b.completed_subjobs as usize != b.subjobs.len() {
            return;
        }
        b.archiving = true;
        let (atoms, failures) = b.archived_atoms();
        let (tx, rx) = oneshot::channel();
        let _ = self.results.send(ResultsJob::Archive {
            build: id,
            commands: b
                .job
                .as_ref()
                .map(|j| j.commands.clone())
                .unwrap_or_default(),
            history: Box::new(TimingHistory {
                store: self.store.clone(),
                project_key: b.project_key.clone(),
                job: b.job_name(),
            }),
            atoms,
            failures,
            done: tx,
        });
        let back = self.self_tx.clone();
        tokio::spawn(async move {
            let outcome = rx
                .await
                .unwrap_or_else(|_| Err("results queue stopped".into()));
            if let Some(tx) = back.upgrade() {
                let _ = tx.send(Command::ArchivesWritten(id, outcome)).await;
            }
        });
    }

    fn archives_written(&mut self, id: u64, outcome: std::result::Result<(), String>) {
        let Some(b) = self.builds.get_mut(&id) else {
            return;
        };
        b.archiving = false;
        if b.state.is_final() {
            return;
        }
        if let Err(e) = outcome {
            self.metrics.internal_error("PostBuildFailure");
            let msg = format!("Postbuild tasks failed due to an internal error: \"{e}\"");
            self.end_build(id, BuildEvent::Fail, msg);
            return;
        }
        b.artifacts_ready = true;
        b.result = if b.failed_atoms == 0 {
            proto::BuildResult::NoFailures
        } else {
            proto::BuildResult::Failure
        };
        self.end_build(id, BuildEvent::Finish, String::new());
    }

    /// Moves a build to a final state and releases everything it holds on slaves.
    fn end_build(&mut self, id: u64, event: BuildEvent, error: String) {
        let Some(b) = self.builds.get_mut(&id) else {
            return;
        };
        if !b.transition(event) {
            return;
        }
        match event {
            BuildEvent::Cancel => b.result = proto::BuildResult::Failure,
            BuildEvent::Fail => {
                b.error = error;
                b.result = proto::BuildResult::Unspecified;
            }
            _ => {}
        }
        tracing::info!(build = id, state = ?b.state, "build ended");
        b.pending.clear();
        let (state, result) = (b.state.name_lower(), b.result.as_str_name());
        self.active.remove(&id);
        self.event(
            "BUILD_ENDED",
            serde_json::json!({ "build_id": id, "state": state, "result": result }),
        );
        // Kill what still runs; executor slots come back when the slaves report the subjobs done.
        let mut cancel_on: BTreeSet<u64> = self
            .attempts
            .values()
            .filter(|a| a.build == id)
            .map(|a| a.slave)
            .collect();
        let b = self.builds.get_mut(&id).expect("checked above");
        cancel_on.extend(b.preparing_on);
        let teardown_on: Vec<u64> = b
            .slaves
            .iter_mut()
            .filter(|(_, sb)| {
                matches!(
                    sb.state,
                    SlaveBuildState::Prepared | SlaveBuildState::SettingUp | SlaveBuildState::Ready
                )
            })
            .map(|(sid, sb)| {
                sb.state = SlaveBuildState::TornDown;
                *sid
            })
            .collect();
        if event != BuildEvent::Finish {
            for &sid in &cancel_on {
                self.send(sid, Down::Cancel(proto::CancelBuild { build_id: id }));
            }
        }
        for sid in teardown_on {
            self.send(sid, Down::Teardown(proto::Teardown { build_id: id }));
        }
        if event != BuildEvent::Finish && !cancel_on.is_empty() && self.has_attempts(id) {
            // The killed atoms' results (exit code, console so far) are still to come.
            if let Some(b) = self.builds.get_mut(&id) {
                b.killing = true;
            }
            self.persist(id);
            self.notify(id);
            return;
        }
        self.retire(id);
    }

    fn has_attempts(&self, build: u64) -> bool {
        self.attempts.values().any(|a| a.build == build)
    }

    /// A final build's last step: its atoms leave memory, its record gets its summary, and its
    /// attempt directories go once that is on disk.
    fn retire(&mut self, id: u64) {
        if let Some(b) = self.builds.get_mut(&id) {
            b.killing = false;
            b.evict();
        }
        self.persist(id);
        // A final build is never prepared again; its atoms (if any) are stored as atoms.
        if let Some(b) = self.builds.get_mut(&id)
            && !std::mem::take(&mut b.atoms_override).is_empty()
            && let Err(e) = self.store.remove_atoms_override(id)
        {
            tracing::warn!(build = id, error = %e, "could not forget atoms_override");
        }
        let store = self.store.clone();
        let results = self.results.clone();
        tokio::spawn(async move {
            match store.flush().await {
                Ok(()) => {
                    let _ = results.send(ResultsJob::Cleanup { build: id });
                }
                Err(e) => tracing::error!(build = id, error = %e, "could not flush the database"),
            }
        });
        self.notify(id);
    }

    /// Forgets a slave and puts its work back in the queue.
    fn lose_slave(&mut self, sid: u64, why: &str) {
        let Some(slave) = self.slaves.remove(&sid) else {
            return;
        };
        self.free.remove(&sid);
        if why != "it left" {
            self.metrics.slaves_lost += 1;
        }
        self.event(
            "SLAVE_REMOVED",
            serde_json::json!({ "slave_id": sid, "reason": why }),
        );
        if slave.busy.is_empty() {
            tracing::info!(slave = sid, name = %slave.name, why, "slave removed");
        } else {
            tracing::warn!(slave = sid, name = %slave.name, why, running = slave.busy.len(), "slave removed; re-queuing its work");
        }
        for (_, work) in slave.busy {
            match work {
                Work::Prepare(id) => {
                    let max = self.cfg.max_prepare_attempts;
                    let Some(b) = self.builds.get_mut(&id) else {
                        continue;
                    };
                    if b.state != BuildState::Preparing || b.preparing_on != Some(sid) {
                        continue;
                    }
                    b.preparing_on = None;
                    b.prepare_attempts += 1;
                    if b.prepare_attempts >= max {
                        let msg = format!(
                            "Preparation was interrupted {max} times (slaves lost); giving up."
                        );
                        self.end_build(id, BuildEvent::Fail, msg);
                    } else {
                        b.transition(BuildEvent::Requeue);
                        self.persist(id);
                        self.notify(id);
                    }
                }
                Work::Subjob(attempt) => {
                    if let Some(att) = self.attempts.remove(&attempt) {
                        if let Some(b) = self.builds.get_mut(&att.build) {
                            b.executors_in_use = b.executors_in_use.saturating_sub(1);
                        }
                        self.settle_subjob(att.build, att.subjob);
                        self.check_complete(att.build);
                    }
                }
            }
        }
        for b in self.builds.values_mut() {
            b.slaves.remove(&sid);
        }
    }

    fn sweep(&mut self, now: Instant) {
        if !self.unsaved.is_empty() {
            self.retry_unsaved();
        }
        if self.resume_until.is_some_and(|t| now >= t) {
            self.resume_until = None;
        }
        // Builds past their build_timeout (counted from submission, master downtime included).
        let epoch_now = now_epoch();
        let expired: Vec<(u64, u32)> = self
            .active
            .iter()
            .filter_map(|id| self.builds.get(id))
            .filter_map(|b| {
                let limit = b
                    .job
                    .as_ref()
                    .map(|j| j.build_timeout_seconds)
                    .filter(|&t| t > 0)
                    .unwrap_or(self.cfg.default_build_timeout_s);
                let queued = b.timestamps.first().map(|t| t.1)?;
                (limit > 0 && epoch_now - queued > f64::from(limit)).then_some((b.id, limit))
            })
            .collect();
        for (id, limit) in expired {
            let msg =
                format!("Build timed out: it ran longer than its build_timeout of {limit} s.");
            self.end_build(id, BuildEvent::Fail, msg);
        }
        let timeout = self.cfg.heartbeat_timeout;
        let silent: Vec<u64> = self
            .slaves
            .values()
            .filter(|s| now.saturating_duration_since(s.last_seen) > timeout)
            .map(|s| s.id)
            .collect();
        for sid in silent {
            self.lose_slave(sid, "its heartbeats stopped");
        }
    }

    // ----- scheduling ------------------------------------------------------------------------

    /// Starts every piece of work that can start now: preparations of queued builds, setups on
    /// slaves a build needs, and subjobs on free executors. Builds are served oldest first.
    fn schedule(&mut self) {
        // Most commands change nothing a free executor could use: check that first, so a long
        // queue costs nothing when the cluster is busy (or has no slaves).
        #[cfg(debug_assertions)]
        self.check_free();
        if self.free.is_empty() {
            return;
        }
        let ids: Vec<u64> = self.active.iter().copied().collect();
        for id in ids {
            if self.free.is_empty() {
                return;
            }
            match self.builds.get(&id).map(|b| b.state) {
                Some(BuildState::Queued) => self.start_prepare(id),
                Some(BuildState::Prepared | BuildState::Building) => self.dispatch(id),
                _ => {}
            }
        }
    }

    /// `free` must be exactly the slaves that can take work (checked in debug builds).
    #[cfg(debug_assertions)]
    fn check_free(&self) {
        let expected: BTreeSet<u64> = self
            .slaves
            .values()
            .filter(|s| !s.draining && !s.free_slots.is_empty())
            .map(|s| s.id)
            .collect();
        assert_eq!(self.free, expected, "free-slave index out of step");
    }

    /// Slave with the most free executors (ties: lowest id), optionally filtered.
    fn pick_slave(&self, ok: impl Fn(&Slave) -> bool) -> Option<u64> {
        self.free
            .iter()
            .filter_map(|sid| self.slaves.get(sid))
            .filter(|s| ok(s))
            .max_by_key(|s| (s.free_slots.len(), std::cmp::Reverse(s.id)))
            .map(|s| s.id)
    }

    fn start_prepare(&mut self, id: u64) {
        let excluded = self.builds[&id].prepare_excluded.clone();
        let Some(sid) = self.pick_slave(|s| !excluded.contains(&s.id)) else {
            return;
        };
        let b = self.builds.get_mut(&id).expect("active build");
        if !b.transition(BuildEvent::StartPrepare) {
            return;
        }
        b.preparing_on = Some(sid);
        let req = &b.request;
        let msg = proto::Prepare {
            build_id: id,
            project: Some(proto::ProjectSpec {
                source: req.source.clone(),
                project_directory: req.project_directory.clone(),
                commit: String::new(),
                remote_files: req.remote_files.clone(),
            }),
            job_name: req.job_name.clone(),
            config_json: req.config_json.clone(),
            atoms_override: b.atoms_override.clone(),
            env: req.env.clone(),
        };
        let slave = self.slaves.get_mut(&sid).expect("picked");
        let slot = slave
            .free_slots
            .pop_first()
            .expect("picked with a free slot");
        slave.busy.insert(slot, Work::Prepare(id));
        self.sync_free(sid);
        tracing::info!(build = id, slave = sid, "preparing build");
        self.persist(id);
        self.notify(id);
        self.event(
            "BUILD_PREPARE_START",
            serde_json::json!({ "build_id": id, "slave_id": sid }),
        );
        self.send(sid, Down::Prepare(msg));
    }

    fn dispatch(&mut self, id: u64) {
        let b = &self.builds[&id];
        if !b.grouping_durable
            || (b.recovered && self.resume_until.is_some_and(|t| Instant::now() < t))
        {
            return;
        }
        // 1. Fill free executors of slaves already set up for the build.
        let ready: Vec<u64> = self
            .free
            .iter()
            .filter(|sid| {
                b.slaves
                    .get(sid)
                    .is_some_and(|sb| sb.state == SlaveBuildState::Ready)
            })
            .copied()
            .collect();
        for sid in ready {
            while self.can_dispatch(id, sid) {
                if !self.dispatch_one(id, sid) {
                    break;
                }
            }
        }
        // 2. Set up more slaves while the build could use more executors than it has.
        loop {
            let b = &self.builds[&id];
            if b.pending.is_empty() {
                return;
            }
            // Cheap test first: a free slave this build has not set up yet.
            let Some(sid) = self.pick_slave(|s| {
                b.slaves
                    .get(&s.id)
                    .is_none_or(|sb| sb.state == SlaveBuildState::Prepared)
            }) else {
                return;
            };
            let running = u64::from(b.executors_in_use);
            let wanted = u64::from(b.max_executors()).min(b.pending.len() as u64 + running);
            let allocated: u64 = b
                .slaves
                .values()
                .filter(|sb| {
                    matches!(
                        sb.state,
                        SlaveBuildState::SettingUp | SlaveBuildState::Ready
                    )
                })
                .map(|sb| u64::from(sb.cap))
                .sum();
            if allocated >= wanted {
                return;
            }
            self.start_setup(id, sid);
        }
    }

    fn start_setup(&mut self, id: u64, sid: u64) {
        let slave_executors = self.slaves[&sid].executors;
        let b = self.builds.get_mut(&id).expect("active build");
        let cap = slave_executors.min(b.max_per_slave());
        let start_index = b.next_executor_index;
        b.next_executor_index += cap;
        b.slaves.insert(
            sid,
            SlaveBuild {
                state: SlaveBuildState::SettingUp,
                start_index,
                cap,
                free_local: (0..cap).collect(),
            },
        );
        let req = &b.request;
        let msg = proto::Setup {
            build_id: id,
            project: Some(proto::ProjectSpec {
                source: req.source.clone(),
                project_directory: req.project_directory.clone(),
                commit: b.commit.clone(),
                remote_files: req.remote_files.clone(),
            }),
            job: b.job.clone(),
            env: req.env.clone(),
        };
        tracing::info!(
            build = id,
            slave = sid,
            start_index,
            cap,
            "setting up slave"
        );
        self.event(
            "BUILD_SETUP_START",
            serde_json::json!({ "build_id": id, "slave_id": sid }),
        );
        self.send(sid, Down::Setup(msg));
    }

    fn can_dispatch(&self, id: u64, sid: u64) -> bool {
        let (Some(b), Some(s)) = (self.builds.get(&id), self.slaves.get(&sid)) else {
            return false;
        };
        let Some(sb) = b.slaves.get(&sid) else {
            return false;
        };
        !s.draining
            && !s.free_slots.is_empty()
            && !b.pending.is_empty()
            && sb.state == SlaveBuildState::Ready
            && !sb.free_local.is_empty()
            && b.executors_in_use < b.max_executors()
    }

    fn dispatch_one(&mut self, id: u64, sid: u64) -> bool {
        let attempt = self.new_attempt();
        let slave = self.slaves.get_mut(&sid).expect("checked");
        let slot = slave.free_slots.pop_first().expect("checked");
        slave.busy.insert(slot, Work::Subjob(attempt));
        let name = slave.name.clone();
        self.sync_free(sid);
        let b = self.builds.get_mut(&id).expect("checked");
        let subjob = b.pending.pop_front().expect("checked");
        let sb = b.slaves.get_mut(&sid).expect("checked");
        let local = sb.free_local.pop_first().expect("checked");
        let build_executor_index = sb.start_index + local;
        b.executors_in_use += 1;
        if b.state == BuildState::Prepared {
            b.transition(BuildEvent::StartBuilding);
            self.persist(id);
        }
        let b = self.builds.get_mut(&id).expect("checked");
        let s = &mut b.subjobs[subjob as usize];
        s.running = Some(attempt);
        s.attempts += 1;
        s.slave = name;
        // Only re-dispatches are written: they are what the retry budget counts after a
        // restart, and a write per dispatch was a third of the store's load at 200,000 atoms.
        // (A first dispatch lost in a master crash costs at most one extra try.)
        if s.attempts > 1
            && let Err(e) = self.store.put_attempts(id, subjob, s.attempts)
        {
            tracing::error!(build = id, error = %e, "could not store a dispatch");
        }
        let atoms = s
            .atoms
            .iter_mut()
            .filter(|a| a.exit_code.is_none())
            .map(|a| {
                a.state = proto::AtomState::InProgress as i32;
                proto::AtomWork {
                    atom_id: a.id,
                    command_string: a.command_string.clone(),
                }
            })
            .collect();
        self.attempts.insert(
            attempt,
            Attempt {
                build: id,
                subjob,
                slave: sid,
                slot,
                local,
            },
        );
        self.notify(id);
        self.metrics.dispatches += 1;
        self.event(
            "MASTER_TRIGGERED_SUBJOB",
            serde_json::json!({ "executor_id": slot, "build_id": id, "subjob_id": subjob, "slave_id": sid }),
        );
        self.send(
            sid,
            Down::RunSubjob(proto::RunSubjob {
                build_id: id,
                subjob_id: subjob,
                attempt,
                atoms,
                executor_index: slot,
                build_executor_index,
            }),
        )
    }
}

#[cfg(test)]
mod tests;
