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
//! `Arc<dyn …Store>` picked at start-up. The build engine still calls the sled [`Store`]'s
//! synchronous methods from inside its actor; moving its reads off the actor and its writes into
//! staged batches committed by the group commit is the step that lets it run on
//! [`BuildStore`] alone (see `docs/architecture.md`, "Storage").
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

/// Builds, their atoms and results, dispatch counts and the timing history.
pub trait BuildStore: Send + Sync + std::fmt::Debug {
    /// Reserves the next build id (from 1; never repeats for this database).
    fn next_build_id(&self) -> BoxFuture<'_, u64>;
    /// Reserves `count` consecutive attempt ids and returns the first (attempt ids name
    /// directories on disk, so they never repeat after a restart).
    fn reserve_attempts(&self, count: u64) -> BoxFuture<'_, u64>;
    /// Writes (or replaces) a build record, keyed by its build's id.
    fn put_build(&self, rec: proto::StoredBuild) -> BoxFuture<'_, ()>;
    /// Every build record, ascending id.
    fn load_builds(&self) -> BoxFuture<'_, Vec<proto::StoredBuild>>;
    /// Writes a build's grouping: all its atoms, in (subjob, atom) order.
    fn put_grouping(&self, build: u64, atoms: Vec<proto::Atom>) -> BoxFuture<'_, ()>;
    /// Writes one atom (its result), superseding the grouping's copy.
    fn put_atom(&self, build: u64, atom: proto::Atom) -> BoxFuture<'_, ()>;
    /// The atoms of subjobs `subjobs`, ordered by (subjob, atom), results over grouping.
    fn load_atoms_range(&self, build: u64, subjobs: Range<u32>) -> BoxFuture<'_, Vec<proto::Atom>>;
    /// One atom of a build.
    fn get_atom(&self, build: u64, subjob: u32, atom: u32) -> BoxFuture<'_, Option<proto::Atom>>;
    /// Records how many times a subjob has been dispatched.
    fn put_attempts(&self, build: u64, subjob: u32, attempts: u32) -> BoxFuture<'_, ()>;
    /// Dispatch counts of subjobs `subjobs`: (subjob id, count), ascending.
    fn load_attempts_range(
        &self,
        build: u64,
        subjobs: Range<u32>,
    ) -> BoxFuture<'_, Vec<(u32, u32)>>;
    /// Deletes a build's atoms and dispatch counts (before a new grouping is stored).
    fn clear_build_details(&self, build: u64) -> BoxFuture<'_, ()>;
    /// Stores a build's `atoms_override` (needed until the build is prepared).
    fn put_atoms_override(&self, build: u64, atoms: Vec<String>) -> BoxFuture<'_, ()>;
    /// A build's `atoms_override` (empty when it has none).
    fn atoms_override(&self, build: u64) -> BoxFuture<'_, Vec<String>>;
    /// Forgets a build's `atoms_override`.
    fn remove_atoms_override(&self, build: u64) -> BoxFuture<'_, ()>;
    /// Recorded seconds of the given atoms of a job (atoms without a record are left out).
    fn timings(
        &self,
        project_key: String,
        job: String,
        atoms: Vec<String>,
    ) -> BoxFuture<'_, HashMap<String, f64>>;
    /// Merges new atom times into a job's history (new values replace old ones).
    fn merge_timings(
        &self,
        project_key: String,
        job: String,
        times: Vec<(String, f64)>,
    ) -> BoxFuture<'_, ()>;
    /// Waits until everything written so far is durable (the group commit's barrier).
    fn flush(&self) -> BoxFuture<'_, ()>;
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
