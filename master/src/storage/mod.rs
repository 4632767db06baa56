//! Storage behind one trait per domain, so a networked backend (PostgreSQL, issue 16) can stand
//! beside the embedded one (sled).
//!
//! | domain | trait | owner that calls it | sled trees |
//! |---|---|---|---|
//! | builds and results (+ timing history) | [`BuildStore`] | the build engine (`engine/`), the results queue | `builds`, `atoms`, `groupings`, `attempts`, `overrides`, `timing_buckets`, `meta` |
//! | catalog: accounts, projects, jobs, tokens, members | [`CatalogStore`] | the catalog owner (runs API) | `catalog`, `catalog_names` |
//! | schedules, fires, executions | [`ScheduleStore`] | the scheduler owner | `schedules`, `fires`, `executions`, `executions_by_time` |
//! | audit log | [`AuditStore`] | whoever changes something an operator may ask about | `audit`, `meta` |
//!
//! Rules every backend keeps (the contract suite in [`contract`] checks them):
//! - A write that returned `Ok` is durable: it survives a crash of the process (sled: the write
//!   is followed by a flush; writes that arrive while one flush runs ride on the next, which is
//!   the group commit the build engine relies on).
//! - Records carry the fields a backend must index (ids, names, times) as typed columns and the
//!   rest as an opaque `body` the owning domain encodes (prost): a backend stores bodies, never
//!   interprets them, so a new field never needs a migration of the store.
//! - Uniqueness is the store's job, checked in the same atomic step as the write: machine names
//!   within their scope ([`CatalogStore::put`]) and one fire per (schedule, tick)
//!   ([`ScheduleStore::claim_fire`]) — two owners racing (two masters for a moment, issue 16)
//!   get one winner.
//! - Listings page with an exclusive cursor and a limit, so a long history stays fast.
//!
//! The traits are object safe (methods return [`BoxFuture`]) so an owner holds an
//! `Arc<dyn …Store>` picked at start-up.
pub mod contract;
pub mod sled;

pub use self::sled::Store;

use crate::error::Result;
use ish_core::proto;
use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

/// What the storage traits return: a boxed future, so the traits stay object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// The build engine's counters, as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// The highest build id ever given out (0 for a fresh database).
    pub last_build_id: u64,
    /// The first attempt id not yet reserved (1 for a fresh database): attempt ids name
    /// directories on disk, so they never repeat after a restart.
    pub next_attempt: u64,
}

/// One staged write of the build engine (see [`BuildBatch`]).
#[derive(Debug, Clone, PartialEq)]
pub enum BuildWrite {
    /// A build record, keyed by its build's id (replaces the stored one).
    Build(Box<proto::StoredBuild>),
    /// A prepared build's grouping (see [`BuildWrite::grouping`]). Replaces every atom and
    /// dispatch count the build had (a preparation redone after a crash).
    Grouping {
        /// Build.
        build: u64,
        /// Its atoms in (subjob, atom) order, as encoded records of at most
        /// [`GROUPING_CHUNK_ATOMS`] atoms: encoded when staged, so a 200,000-atom build's
        /// grouping waits for its commit in a few MB rather than as a copy of every atom.
        chunks: Vec<GroupingChunk>,
    },
    /// One atom's result, superseding the grouping's copy.
    Atom {
        /// Build.
        build: u64,
        /// The atom with its result.
        atom: proto::Atom,
    },
    /// How many times a subjob has been dispatched.
    Attempts {
        /// Build.
        build: u64,
        /// Subjob.
        subjob: u32,
        /// Dispatches so far.
        attempts: u32,
    },
    /// A build's `atoms_override`; empty removes it.
    AtomsOverride {
        /// Build.
        build: u64,
        /// The request's atoms.
        atoms: Vec<String>,
    },
    /// Build ids up to this one are given out.
    LastBuildId(u64),
    /// Attempt ids below this one are reserved.
    AttemptsReservedTo(u64),
}

/// Atoms per stored grouping record (sled's memory grows with the record count, not bytes).
pub const GROUPING_CHUNK_ATOMS: usize = 1024;

/// Consecutive atoms of a grouping, encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupingChunk {
    /// (subjob, atom) of its first atom: where it is found.
    pub first: (u32, u32),
    /// A `StoredAtoms` record.
    pub encoded: Vec<u8>,
}

impl BuildWrite {
    /// A build's grouping from its atoms, in (subjob, atom) order.
    pub fn grouping<'a>(build: u64, atoms: impl IntoIterator<Item = &'a proto::Atom>) -> Self {
        use prost::Message;
        let mut chunks = Vec::new();
        let mut chunk = proto::StoredAtoms::default();
        let mut seal = |chunk: &mut proto::StoredAtoms| {
            if let Some(a) = chunk.atoms.first() {
                chunks.push(GroupingChunk {
                    first: (a.subjob_id, a.id),
                    encoded: chunk.encode_to_vec(),
                });
                chunk.atoms.clear();
            }
        };
        for a in atoms {
            chunk.atoms.push(a.clone());
            if chunk.atoms.len() == GROUPING_CHUNK_ATOMS {
                seal(&mut chunk);
            }
        }
        seal(&mut chunk);
        Self::Grouping { build, chunks }
    }
}

/// The build engine's writes since its last commit, in the order they were made. A build
/// record supersedes an earlier one of the same build (only the latest is written, at the
/// position of the latest), so a build changing a thousand times between two commits costs one
/// write, and a record never lands before writes it was staged after.
#[derive(Debug, Default, Clone)]
pub struct BuildBatch {
    writes: Vec<Option<BuildWrite>>,
    /// Where each build's latest record is in `writes`.
    records: HashMap<u64, usize>,
}

impl BuildBatch {
    /// Stages a write.
    pub fn push(&mut self, write: BuildWrite) {
        if let BuildWrite::Build(rec) = &write {
            let id = rec.build.as_ref().map(|b| b.id).unwrap_or_default();
            if let Some(old) = self.records.insert(id, self.writes.len()) {
                self.writes[old] = None;
            }
        }
        self.writes.push(Some(write));
    }

    /// True when nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.writes.iter().all(Option::is_none)
    }

    /// The writes to apply, in order.
    pub fn writes(&self) -> impl Iterator<Item = &BuildWrite> {
        self.writes.iter().flatten()
    }

    /// Builds with an atom result among the writes.
    pub fn builds_with_results(&self) -> std::collections::BTreeSet<u64> {
        self.writes()
            .filter_map(|w| match w {
                BuildWrite::Atom { build, .. } => Some(*build),
                _ => None,
            })
            .collect()
    }

    /// Puts the writes of a batch that failed to commit back before these (newer) ones: they
    /// are committed again with the next batch, a build's newer record still winning.
    pub fn requeue(&mut self, failed: &BuildBatch) {
        let newer = std::mem::take(self);
        for w in failed.writes().chain(newer.writes()) {
            self.push(w.clone());
        }
    }
}

/// Builds, their atoms and results, dispatch counts and the timing history.
///
/// The build engine writes through [`BuildStore::commit`] only: its actor stages writes in a
/// [`BuildBatch`] and commits one batch at a time (its group commit); reads it needs while
/// running are served off the actor (final builds' atoms, the timing history at prepare) or
/// made once before it starts (recovery).
pub trait BuildStore: Send + Sync + std::fmt::Debug {
    /// Applies a batch, in order, and makes it durable: when this answers `Ok`, every write of
    /// the batch survives a crash. On `Err` some writes may be applied: every write is
    /// idempotent, so the engine commits the same writes again.
    fn commit(&self, batch: Arc<BuildBatch>) -> BoxFuture<'_, ()>;
    /// The stored counters.
    fn load_counters(&self) -> BoxFuture<'_, Counters>;
    /// Every build record, ascending id.
    fn load_builds(&self) -> BoxFuture<'_, Vec<proto::StoredBuild>>;
    /// The atoms of subjobs `subjobs`, ordered by (subjob, atom), results over grouping.
    fn load_atoms_range(&self, build: u64, subjobs: Range<u32>) -> BoxFuture<'_, Vec<proto::Atom>>;
    /// One atom of a build.
    fn get_atom(&self, build: u64, subjob: u32, atom: u32) -> BoxFuture<'_, Option<proto::Atom>>;
    /// Dispatch counts of subjobs `subjobs`: (subjob id, count), ascending.
    fn load_attempts_range(
        &self,
        build: u64,
        subjobs: Range<u32>,
    ) -> BoxFuture<'_, Vec<(u32, u32)>>;
    /// A build's `atoms_override` (empty when it has none).
    fn atoms_override(&self, build: u64) -> BoxFuture<'_, Vec<String>>;
    /// Recorded seconds of the given atoms of a job (atoms without a record are left out).
    fn timings<'a>(
        &'a self,
        project_key: &'a str,
        job: &'a str,
        atoms: &'a [String],
    ) -> BoxFuture<'a, HashMap<String, f64>>;
    /// Merges new atom times into a job's history (new values replace old ones), durably.
    /// Written by the results queue at a build's end, apart from the engine's batches.
    fn merge_timings(
        &self,
        project_key: String,
        job: String,
        times: Vec<(String, f64)>,
    ) -> BoxFuture<'_, ()>;
}

/// What a catalog record is. Scopes: accounts, projects and tokens are top level (scope `""`,
/// or the owning account's id for tokens); jobs and members are scoped by their project's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CatalogKind {
    /// A user or bot account.
    Account,
    /// An Ish CD project.
    Project,
    /// A job under a project.
    Job,
    /// An API token (its body holds a hash of the secret, never the secret).
    Token,
    /// A member of a project (name: the account id).
    Member,
}

impl CatalogKind {
    /// One byte in keys: part of the on-disk format, never renumbered.
    pub fn tag(self) -> u8 {
        match self {
            Self::Account => 1,
            Self::Project => 2,
            Self::Job => 3,
            Self::Token => 4,
            Self::Member => 5,
        }
    }
}

/// One catalog record: indexed columns plus the owner's encoded body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogRecord {
    /// What it is.
    pub kind: CatalogKind,
    /// Immutable id (a UUID for Ish CD objects), unique per kind.
    pub id: String,
    /// The parent's id (`""` for top-level records).
    pub scope: String,
    /// Machine name: unique per (kind, scope), may change.
    pub name: String,
    /// Everything else, encoded by the owning domain.
    pub body: Vec<u8>,
}

/// What a catalog write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// Written.
    Stored,
    /// A create with an id that is already used (the write changed nothing).
    IdTaken,
    /// Another record of the same kind and scope has this name (the write changed nothing).
    NameTaken,
    /// An update of a record that does not exist (or no longer does).
    Missing,
}

/// Accounts, projects, jobs, tokens and members.
pub trait CatalogStore: Send + Sync + std::fmt::Debug {
    /// Creates (`create`) or replaces a record, keeping names unique per (kind, scope) in the
    /// same atomic step. Replacing may rename; the scope of an existing record never changes.
    fn put(&self, rec: CatalogRecord, create: bool) -> BoxFuture<'_, PutOutcome>;
    /// A record by id.
    fn get(&self, kind: CatalogKind, id: String) -> BoxFuture<'_, Option<CatalogRecord>>;
    /// A record by machine name within a scope.
    fn find(
        &self,
        kind: CatalogKind,
        scope: String,
        name: String,
    ) -> BoxFuture<'_, Option<CatalogRecord>>;
    /// Records of a kind within a scope, by name, after the name `after` (exclusive), at most
    /// `limit`.
    fn list(
        &self,
        kind: CatalogKind,
        scope: String,
        after: String,
        limit: usize,
    ) -> BoxFuture<'_, Vec<CatalogRecord>>;
    /// Deletes a record and frees its name; false when there was none.
    fn delete(&self, kind: CatalogKind, id: String) -> BoxFuture<'_, bool>;
}

/// One execution of a schedule (a scheduled or manual run; it is a build too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionRecord {
    /// Unique id.
    pub id: String,
    /// The schedule it belongs to.
    pub schedule_id: String,
    /// When it was scheduled for (or asked for), Unix milliseconds: the listing's order.
    pub at_ms: i64,
    /// Everything else (state, build id, result), encoded by the scheduler.
    pub body: Vec<u8>,
}

/// Schedules, their fires, and executions.
pub trait ScheduleStore: Send + Sync + std::fmt::Debug {
    /// Writes (or replaces) a schedule.
    fn put_schedule(&self, id: String, body: Vec<u8>) -> BoxFuture<'_, ()>;
    /// A schedule's body.
    fn get_schedule(&self, id: String) -> BoxFuture<'_, Option<Vec<u8>>>;
    /// Every schedule: (id, body), by id.
    fn list_schedules(&self) -> BoxFuture<'_, Vec<(String, Vec<u8>)>>;
    /// Deletes a schedule (its executions stay for the history); false when there was none.
    fn delete_schedule(&self, id: String) -> BoxFuture<'_, bool>;
    /// Claims the fire of `schedule` at `tick_ms` and stores its execution in the same atomic
    /// step. True for the one caller that claimed it; false (nothing written) for every other.
    fn claim_fire(
        &self,
        schedule: String,
        tick_ms: i64,
        execution: ExecutionRecord,
    ) -> BoxFuture<'_, bool>;
    /// Writes (or replaces) an execution (a manual run, or a state change).
    fn put_execution(&self, execution: ExecutionRecord) -> BoxFuture<'_, ()>;
    /// An execution by id.
    fn get_execution(&self, id: String) -> BoxFuture<'_, Option<ExecutionRecord>>;
    /// Executions with `at_ms` in `range`, by (at_ms, id), after the cursor (exclusive), at
    /// most `limit`.
    fn list_executions(
        &self,
        range: Range<i64>,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> BoxFuture<'_, Vec<ExecutionRecord>>;
}

/// One audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Sequence number the store gave it (ascending, never reused); 0 before it is stored.
    pub seq: u64,
    /// When it happened, Unix milliseconds.
    pub at_ms: i64,
    /// Who did what to which object, encoded by the caller.
    pub body: Vec<u8>,
}

/// The append-only audit log.
pub trait AuditStore: Send + Sync + std::fmt::Debug {
    /// Appends an event and returns its sequence number.
    fn append(&self, at_ms: i64, body: Vec<u8>) -> BoxFuture<'_, u64>;
    /// Events with `at_ms` in `range`, by (at_ms, seq), after the cursor (exclusive), at most
    /// `limit`.
    fn list(
        &self,
        range: Range<i64>,
        after: Option<(i64, u64)>,
        limit: usize,
    ) -> BoxFuture<'_, Vec<AuditRecord>>;
}

/// Every domain's store of one database, as the master opens it at start-up.
#[derive(Debug, Clone)]
pub struct Stores {
    /// Builds and results.
    pub builds: Arc<dyn BuildStore>,
    /// Accounts, projects, jobs, tokens, members.
    pub catalog: Arc<dyn CatalogStore>,
    /// Schedules, fires, executions.
    pub schedules: Arc<dyn ScheduleStore>,
    /// The audit log.
    pub audit: Arc<dyn AuditStore>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, state: proto::BuildState) -> BuildWrite {
        BuildWrite::Build(Box::new(proto::StoredBuild {
            build: Some(proto::Build {
                id,
                state: state as i32,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    /// Only a build's latest record is written, at its latest position: never before writes
    /// staged ahead of it (a record saying PREPARED must not land before its grouping).
    #[test]
    fn a_newer_record_supersedes_and_moves_behind_what_came_between() {
        let mut b = BuildBatch::default();
        assert!(b.is_empty());
        b.push(record(1, proto::BuildState::Preparing));
        b.push(BuildWrite::grouping(1, &[proto::Atom::default()]));
        b.push(record(2, proto::BuildState::Queued));
        b.push(record(1, proto::BuildState::Prepared));
        let order: Vec<String> = b
            .writes()
            .map(|w| match w {
                BuildWrite::Build(r) => format!(
                    "build {} {}",
                    r.build.as_ref().unwrap().id,
                    r.build.as_ref().unwrap().state
                ),
                BuildWrite::Grouping { build, .. } => format!("grouping {build}"),
                other => format!("{other:?}"),
            })
            .collect();
        let prepared = proto::BuildState::Prepared as i32;
        let queued = proto::BuildState::Queued as i32;
        assert_eq!(
            order,
            [
                "grouping 1".to_string(),
                format!("build 2 {queued}"),
                format!("build 1 {prepared}")
            ]
        );
    }

    /// A failed batch goes back before the writes staged since, and a record staged since
    /// still wins over the failed batch's.
    #[test]
    fn a_requeued_batch_goes_first_and_newer_records_win() {
        let mut failed = BuildBatch::default();
        failed.push(record(1, proto::BuildState::Building));
        failed.push(BuildWrite::Atom {
            build: 1,
            atom: proto::Atom::default(),
        });
        failed.push(record(3, proto::BuildState::Building));
        let mut pending = BuildBatch::default();
        pending.push(record(1, proto::BuildState::Error));
        pending.push(BuildWrite::LastBuildId(4));
        pending.requeue(&failed);
        let got: Vec<BuildWrite> = pending.writes().cloned().collect();
        assert_eq!(
            got,
            [
                BuildWrite::Atom {
                    build: 1,
                    atom: proto::Atom::default()
                },
                record(3, proto::BuildState::Building),
                record(1, proto::BuildState::Error),
                BuildWrite::LastBuildId(4),
            ]
        );
        assert_eq!(
            failed.builds_with_results().into_iter().collect::<Vec<_>>(),
            [1]
        );
    }
}
