//! The builds domain on sled ([`BuildStore`]), and the owner of the database every sled store
//! shares. Every durable fact of a build lives here; everything else the master holds in memory
//! is derived from it at start-up.
//!
//! Trees:
//! - `builds`: build id (BE u64) -> `StoredBuild` (prost)
//! - `atoms`: build id (BE u64) + subjob id (BE u32) + atom id (BE u32) -> `Atom` (prost)
//! - `attempts`: build id (BE u64) + subjob id (BE u32) -> dispatch count (BE u32)
//! - `overrides`: build id (BE u64) -> JSON list of the request's `atoms_override`, kept apart
//!   from the build record, which is rewritten on every state change and read on every poll
//! - `groupings`: build id + first subjob id + first atom id -> `StoredAtoms` (1024 atoms)
//! - `timing_buckets`: project key + job name + bucket -> `StoredTimings` (see storage.proto)
//! - `meta`: counters (`next_build_id`)
//!
//! sled is synchronous: the build engine calls the inherent methods directly from its actor
//! (microseconds, page cache) and makes them durable with [`Store::flush`], its group commit.
//! The [`BuildStore`] impl is the same operations behind the async trait.
use crate::error::{MasterError, Result};
use crate::storage::{
    BoxFuture, BuildBatch, BuildStore, BuildWrite, Counters, GroupingChunk, Stores,
};
use ish_core::proto;
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

/// Handle to the database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    builds: sled::Tree,
    atoms: sled::Tree,
    groupings: sled::Tree,
    attempts: sled::Tree,
    overrides: sled::Tree,
    timings: sled::Tree,
    meta: sled::Tree,
    /// Unit tests of storage errors: build and atom writes fail while set.
    #[cfg(test)]
    fail_writes: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Buckets of a job's timing history (fixed: it is part of the on-disk format).
const TIMING_BUCKETS: usize = 256;

/// sled's in-memory page cache.
const DB_CACHE_BYTES: u64 = 16 << 20;

const NEXT_BUILD_ID: &[u8] = b"next_build_id";
const NEXT_ATTEMPT: &[u8] = b"next_attempt";

fn atom_key(build: u64, subjob: u32, atom: u32) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&build.to_be_bytes());
    k[8..12].copy_from_slice(&subjob.to_be_bytes());
    k[12..].copy_from_slice(&atom.to_be_bytes());
    k
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| MasterError::io(format!("creating {}", dir.display()), e))?;
        // sled's page cache defaults to 1 GiB and fills with every atom of a large build; the
        // hot data (recent builds) is far smaller, and the OS page cache backs the rest.
        let config = sled::Config::new().path(dir).cache_capacity(DB_CACHE_BYTES);
        // A database closed a moment ago in this process (a restart, a test) may still be held
        // by sled's flusher thread for a few milliseconds: its file lock is retried briefly.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e)) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "database busy; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        Self::from_db(db)
    }

    /// A throw-away database (unit tests).
    pub fn temporary() -> Result<Self> {
        Self::from_db(sled::Config::new().temporary(true).open()?)
    }

    fn from_db(db: sled::Db) -> Result<Self> {
        Self {
            builds: db.open_tree("builds")?,
            atoms: db.open_tree("atoms")?,
            groupings: db.open_tree("groupings")?,
            attempts: db.open_tree("attempts")?,
            overrides: db.open_tree("overrides")?,
            timings: db.open_tree("timing_buckets")?,
            meta: db.open_tree("meta")?,
            db,
            #[cfg(test)]
            fail_writes: Default::default(),
        }
        .migrated()
    }

    /// Databases written before the bucketed timing history kept a job's whole history in one
    /// JSON map (tree `timings`): its entries move into the buckets.
    fn migrated(self) -> Result<Self> {
        if !self
            .db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == b"timings")
        {
            return Ok(self);
        }
        let old = self.db.open_tree("timings")?;
        for entry in old.iter() {
            let (key, value) = entry?;
            let mut parts = key.splitn(2, |b| *b == 0);
            let (Some(project), Some(job)) = (parts.next(), parts.next()) else {
                continue;
            };
            let times: HashMap<String, f64> =
                serde_json::from_slice(&value).map_err(|e| MasterError::Corrupt(e.to_string()))?;
            self.merge_timings(
                &String::from_utf8_lossy(project),
                &String::from_utf8_lossy(job),
                times.iter().map(|(k, v)| (k.as_str(), *v)),
            )?;
        }
        self.db.drop_tree("timings")?;
        Ok(self)
    }

    /// Writes a build record.
    pub fn put_build(&self, rec: &proto::StoredBuild) -> Result<()> {
        self.injected_failure()?;
        let id = rec.build.as_ref().map(|b| b.id).unwrap_or_default();
        self.builds.insert(id.to_be_bytes(), rec.encode_to_vec())?;
        Ok(())
    }

    /// Makes build and atom writes fail (storage error tests).
    #[cfg(test)]
    pub fn fail_writes(&self, fail: bool) {
        self.fail_writes
            .store(fail, std::sync::atomic::Ordering::SeqCst);
    }

    #[cfg(test)]
    fn injected_failure(&self) -> Result<()> {
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(MasterError::io(
                "writing",
                std::io::Error::other("Too many open files (injected)"),
            ));
        }
        Ok(())
    }

    #[cfg(not(test))]
    fn injected_failure(&self) -> Result<()> {
        Ok(())
    }

    /// Every build record, ascending id.
    pub fn load_builds(&self) -> Result<Vec<proto::StoredBuild>> {
        self.builds
            .iter()
            .map(|kv| {
                let (_, v) = kv?;
                proto::StoredBuild::decode(v.as_ref())
                    .map_err(|e| MasterError::Corrupt(e.to_string()))
            })
            .collect()
    }

    /// Writes one atom.
    pub fn put_atom(&self, build: u64, atom: &proto::Atom) -> Result<()> {
        self.injected_failure()?;
        self.atoms.insert(
            atom_key(build, atom.subjob_id, atom.id),
            atom.encode_to_vec(),
        )?;
        Ok(())
    }

    /// Writes a prepared build's grouping (its atoms, in (subjob, atom) order: lookups find an
    /// atom's record by its position) as records of `GROUPING_CHUNK_ATOMS` atoms. Not atomic
    /// as a whole; callers make the atoms count only once the build record says so (a build
    /// recovered before that is prepared again, and its partial grouping cleared).
    pub fn put_atoms<'a>(
        &self,
        build: u64,
        atoms: impl IntoIterator<Item = &'a proto::Atom>,
    ) -> Result<()> {
        match BuildWrite::grouping(build, atoms) {
            BuildWrite::Grouping { chunks, .. } => self.put_chunks(build, &chunks),
            _ => unreachable!("grouping() makes a grouping"),
        }
    }

    fn put_chunks(&self, build: u64, chunks: &[GroupingChunk]) -> Result<()> {
        for c in chunks {
            let key = atom_key(build, c.first.0, c.first.1);
            self.groupings.insert(key, c.encoded.as_slice())?;
        }
        Ok(())
    }

    /// Applies one staged write of the engine.
    fn apply(&self, write: &BuildWrite) -> Result<()> {
        match write {
            BuildWrite::Build(rec) => self.put_build(rec),
            BuildWrite::Grouping { build, chunks } => {
                self.clear_build_details(*build)?;
                self.put_chunks(*build, chunks)
            }
            BuildWrite::Atom { build, atom } => self.put_atom(*build, atom),
            BuildWrite::Attempts {
                build,
                subjob,
                attempts,
            } => self.put_attempts(*build, *subjob, *attempts),
            BuildWrite::AtomsOverride { build, atoms } if atoms.is_empty() => {
                self.remove_atoms_override(*build)
            }
            BuildWrite::AtomsOverride { build, atoms } => self.put_atoms_override(*build, atoms),
            BuildWrite::LastBuildId(id) => {
                self.meta.insert(NEXT_BUILD_ID, &id.to_be_bytes())?;
                Ok(())
            }
            BuildWrite::AttemptsReservedTo(end) => {
                self.meta.insert(NEXT_ATTEMPT, &end.to_be_bytes())?;
                Ok(())
            }
        }
    }

    /// The stored counters.
    pub fn counters(&self) -> Result<Counters> {
        let read = |key: &[u8]| -> Result<Option<u64>> {
            Ok(self
                .meta
                .get(key)?
                .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
                .map(u64::from_be_bytes))
        };
        Ok(Counters {
            last_build_id: read(NEXT_BUILD_ID)?.unwrap_or(0),
            next_attempt: read(NEXT_ATTEMPT)?.unwrap_or(1),
        })
    }

    /// A build's atoms, ordered by (subjob, atom).
    pub fn load_atoms(&self, build: u64) -> Result<Vec<proto::Atom>> {
        self.load_atoms_range(build, 0..u32::MAX)
    }

    /// The atoms of subjobs `subjobs` of a build, ordered by (subjob, atom): the grouping's
    /// copies, each replaced by its own record once it has one.
    pub fn load_atoms_range(
        &self,
        build: u64,
        subjobs: std::ops::Range<u32>,
    ) -> Result<Vec<proto::Atom>> {
        let (lo, hi) = (
            atom_key(build, subjobs.start, 0),
            atom_key(build, subjobs.end, 0),
        );
        let mut atoms = BTreeMap::new();
        // The chunk holding the range's first atom may start before the range.
        let before = self.groupings.range(..lo).next_back().transpose()?;
        let chunks = before
            .filter(|(k, _)| k.starts_with(&build.to_be_bytes()))
            .into_iter()
            .map(Ok)
            .chain(self.groupings.range(lo..hi));
        for kv in chunks {
            let (_, v) = kv?;
            let chunk = proto::StoredAtoms::decode(v.as_ref()).map_err(corrupt)?;
            for a in chunk.atoms {
                if subjobs.contains(&a.subjob_id) {
                    atoms.insert((a.subjob_id, a.id), a);
                }
            }
        }
        for kv in self.atoms.range(lo..hi) {
            let (_, v) = kv?;
            let a = proto::Atom::decode(v.as_ref()).map_err(corrupt)?;
            atoms.insert((a.subjob_id, a.id), a);
        }
        Ok(atoms.into_values().collect())
    }

    /// One atom of a build.
    pub fn get_atom(&self, build: u64, subjob: u32, atom: u32) -> Result<Option<proto::Atom>> {
        let key = atom_key(build, subjob, atom);
        if let Some(v) = self.atoms.get(key)? {
            return Ok(Some(proto::Atom::decode(v.as_ref()).map_err(corrupt)?));
        }
        let Some((k, v)) = self.groupings.range(..=key).next_back().transpose()? else {
            return Ok(None);
        };
        if !k.starts_with(&build.to_be_bytes()) {
            return Ok(None);
        }
        let chunk = proto::StoredAtoms::decode(v.as_ref()).map_err(corrupt)?;
        Ok(chunk
            .atoms
            .into_iter()
            .find(|a| a.subjob_id == subjob && a.id == atom))
    }

    /// Dispatch counts of subjobs `subjobs` of a build: (subjob id, count).
    pub fn load_attempts_range(
        &self,
        build: u64,
        subjobs: std::ops::Range<u32>,
    ) -> Result<Vec<(u32, u32)>> {
        let (from, to) = (
            atom_key(build, subjobs.start, 0),
            atom_key(build, subjobs.end, 0),
        );
        self.attempts
            .range(from[..12].to_vec()..to[..12].to_vec())
            .map(|kv| {
                let (k, v) = kv?;
                let sj = k.get(8..12).and_then(|b| <[u8; 4]>::try_from(b).ok());
                let n = <[u8; 4]>::try_from(v.as_ref()).ok();
                match (sj, n) {
                    (Some(sj), Some(n)) => Ok((u32::from_be_bytes(sj), u32::from_be_bytes(n))),
                    _ => Err(MasterError::Corrupt("bad attempts record".into())),
                }
            })
            .collect()
    }

    /// Deletes a build's atoms and dispatch counts (before a new grouping is stored).
    pub fn clear_build_details(&self, build: u64) -> Result<()> {
        for tree in [&self.atoms, &self.groupings, &self.attempts] {
            let mut batch = sled::Batch::default();
            for kv in tree.scan_prefix(build.to_be_bytes()) {
                batch.remove(kv?.0);
            }
            tree.apply_batch(batch)?;
        }
        Ok(())
    }

    /// Stores a build's `atoms_override` (needed until the build is prepared).
    pub fn put_atoms_override(&self, build: u64, atoms: &[String]) -> Result<()> {
        let bytes = serde_json::to_vec(atoms).map_err(|e| MasterError::Corrupt(e.to_string()))?;
        self.overrides.insert(build.to_be_bytes(), bytes)?;
        Ok(())
    }

    /// A build's `atoms_override` (empty when it had none).
    pub fn atoms_override(&self, build: u64) -> Result<Vec<String>> {
        match self.overrides.get(build.to_be_bytes())? {
            None => Ok(Vec::new()),
            Some(v) => serde_json::from_slice(&v).map_err(|e| MasterError::Corrupt(e.to_string())),
        }
    }

    /// Forgets a finished build's `atoms_override` (its atoms are stored by then).
    pub fn remove_atoms_override(&self, build: u64) -> Result<()> {
        self.overrides.remove(build.to_be_bytes())?;
        Ok(())
    }

    /// Records how many times a subjob has been dispatched.
    pub fn put_attempts(&self, build: u64, subjob: u32, attempts: u32) -> Result<()> {
        self.attempts
            .insert(&atom_key(build, subjob, 0)[..12], &attempts.to_be_bytes())?;
        Ok(())
    }

    /// Dispatch counts of a build's subjobs: (subjob id, count).
    pub fn load_attempts(&self, build: u64) -> Result<Vec<(u32, u32)>> {
        self.load_attempts_range(build, 0..u32::MAX)
    }

    /// Recorded times of the given atoms of a job: atom command string -> seconds (atoms
    /// without a record are left out). Reads only the buckets those atoms fall in.
    pub fn timings<'a>(
        &self,
        project_key: &str,
        job: &str,
        atoms: impl IntoIterator<Item = &'a str>,
    ) -> Result<HashMap<String, f64>> {
        let mut times = HashMap::new();
        for (bucket, wanted) in by_bucket(atoms.into_iter().map(|a| (a, ()))) {
            let Some(v) = self.timings.get(timing_key(project_key, job, bucket))? else {
                continue;
            };
            let stored = proto::StoredTimings::decode(v.as_ref()).map_err(corrupt)?;
            for (atom, ()) in wanted {
                if let Some(s) = stored.seconds.get(atom) {
                    times.insert(atom.to_string(), *s);
                }
            }
        }
        Ok(times)
    }

    /// Merges new atom times into a job's timing history (new values replace old ones),
    /// rewriting one bucket at a time.
    pub fn merge_timings<'a>(
        &self,
        project_key: &str,
        job: &str,
        new: impl IntoIterator<Item = (&'a str, f64)>,
    ) -> Result<()> {
        for (bucket, entries) in by_bucket(new) {
            let key = timing_key(project_key, job, bucket);
            let mut stored = match self.timings.get(&key)? {
                Some(v) => proto::StoredTimings::decode(v.as_ref()).map_err(corrupt)?,
                None => proto::StoredTimings::default(),
            };
            for (atom, seconds) in entries {
                match stored.seconds.get_mut(atom) {
                    Some(s) => *s = seconds,
                    None => {
                        stored.seconds.insert(atom.to_string(), seconds);
                    }
                }
            }
            self.timings.insert(key, stored.encode_to_vec())?;
        }
        Ok(())
    }

    /// Waits until everything written so far is on disk.
    pub async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Every domain's store on this database.
    pub fn stores(&self) -> Result<Stores> {
        Ok(Stores {
            builds: std::sync::Arc::new(self.clone()),
            catalog: std::sync::Arc::new(super::SledCatalog::open(&self.db)?),
            schedules: std::sync::Arc::new(super::SledSchedules::open(&self.db)?),
            audit: std::sync::Arc::new(super::SledAudit::open(&self.db)?),
        })
    }
}

impl BuildStore for Store {
    fn commit(&self, batch: Arc<BuildBatch>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for w in batch.writes() {
                self.apply(w)?;
            }
            self.flush().await
        })
    }

    fn load_counters(&self) -> BoxFuture<'_, Counters> {
        Box::pin(async move { self.counters() })
    }

    fn load_builds(&self) -> BoxFuture<'_, Vec<proto::StoredBuild>> {
        Box::pin(async move { Store::load_builds(self) })
    }

    fn load_atoms_range(
        &self,
        build: u64,
        subjobs: std::ops::Range<u32>,
    ) -> BoxFuture<'_, Vec<proto::Atom>> {
        Box::pin(async move { Store::load_atoms_range(self, build, subjobs) })
    }

    fn get_atom(&self, build: u64, subjob: u32, atom: u32) -> BoxFuture<'_, Option<proto::Atom>> {
        Box::pin(async move { Store::get_atom(self, build, subjob, atom) })
    }

    fn load_attempts_range(
        &self,
        build: u64,
        subjobs: std::ops::Range<u32>,
    ) -> BoxFuture<'_, Vec<(u32, u32)>> {
        Box::pin(async move { Store::load_attempts_range(self, build, subjobs) })
    }

    fn atoms_override(&self, build: u64) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async move { Store::atoms_override(self, build) })
    }

    fn timings<'a>(
        &'a self,
        project_key: &'a str,
        job: &'a str,
        atoms: &'a [String],
    ) -> BoxFuture<'a, HashMap<String, f64>> {
        Box::pin(
            async move { Store::timings(self, project_key, job, atoms.iter().map(String::as_str)) },
        )
    }

    fn merge_timings(
        &self,
        project_key: String,
        job: String,
        times: Vec<(String, f64)>,
    ) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            Store::merge_timings(
                self,
                &project_key,
                &job,
                times.iter().map(|(a, s)| (a.as_str(), *s)),
            )?;
            self.flush().await
        })
    }
}

fn corrupt(e: prost::DecodeError) -> MasterError {
    MasterError::Corrupt(e.to_string())
}

/// Length-prefixed parts, so no project key or job name runs into another's.
fn timing_key(project_key: &str, job: &str, bucket: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(10 + project_key.len() + job.len());
    for part in [project_key, job] {
        k.extend_from_slice(&(part.len() as u32).to_be_bytes());
        k.extend_from_slice(part.as_bytes());
    }
    k.extend_from_slice(&bucket.to_be_bytes());
    k
}

/// An atom's timing bucket: FNV-1a of its command string, stable across versions and
/// platforms (std's hasher is not), since it decides where history is stored.
fn timing_bucket(atom: &str) -> u16 {
    let hash = atom.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash % TIMING_BUCKETS as u64) as u16
}

/// Entries grouped by their atom's timing bucket (non-empty buckets only).
fn by_bucket<'a, T>(
    entries: impl IntoIterator<Item = (&'a str, T)>,
) -> impl Iterator<Item = (u16, Vec<(&'a str, T)>)> {
    let mut buckets: Vec<Vec<(&str, T)>> = (0..TIMING_BUCKETS).map(|_| Vec::new()).collect();
    for (atom, value) in entries {
        buckets[usize::from(timing_bucket(atom))].push((atom, value));
    }
    buckets
        .into_iter()
        .enumerate()
        .filter(|(_, v)| !v.is_empty())
        .map(|(i, v)| (i as u16, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract every backend passes, on sled: the same database reopened in a temporary
    /// directory shows what was stored.
    #[tokio::test]
    async fn sled_passes_the_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let open = || Store::open(dir.path()).unwrap().stores().unwrap();
        crate::storage::contract::run_all(&open).await;
    }

    #[test]
    fn atoms_round_trip_in_order() {
        let s = Store::temporary().unwrap();
        let mk = |sj, id| proto::Atom {
            id,
            subjob_id: sj,
            command_string: format!("{sj}.{id}"),
            ..Default::default()
        };
        s.put_atoms(7, &[mk(0, 0), mk(0, 1), mk(1, 0), mk(10, 0)])
            .unwrap();
        s.put_atom(8, &mk(0, 0)).unwrap();
        let got: Vec<_> = s
            .load_atoms(7)
            .unwrap()
            .into_iter()
            .map(|a| a.command_string)
            .collect();
        assert_eq!(got, ["0.0", "0.1", "1.0", "10.0"]);
    }

    /// Range reads and single reads over a grouping spread across many chunk records, with some
    /// atoms superseded by their result records, neighbouring builds left untouched.
    #[test]
    fn chunked_groupings_read_like_one_record_per_atom() {
        let s = Store::temporary().unwrap();
        // Subjob i has i % 7 + 1 atoms: chunk boundaries fall inside subjobs.
        let grouping: Vec<proto::Atom> = (0..700u32)
            .flat_map(|sj| {
                (0..sj % 7 + 1).map(move |id| proto::Atom {
                    id,
                    subjob_id: sj,
                    command_string: format!("{sj}.{id}"),
                    ..Default::default()
                })
            })
            .collect();
        assert!(grouping.len() > 2 * crate::storage::GROUPING_CHUNK_ATOMS);
        for build in [6, 7, 8] {
            s.put_atoms(build, &grouping).unwrap();
        }
        let mut expected = grouping.clone();
        for a in expected
            .iter_mut()
            .filter(|a| (a.subjob_id + a.id) % 3 == 0)
        {
            a.exit_code = Some(a.subjob_id as i32);
            s.put_atom(7, a).unwrap();
        }
        assert_eq!(s.load_atoms(7).unwrap(), expected);
        assert_eq!(s.load_atoms(6).unwrap(), grouping);
        for (start, end) in [
            (0, 1),
            (145, 146),
            (146, 300),
            (299, 700),
            (650, 900),
            (700, 701),
        ] {
            let want: Vec<_> = expected
                .iter()
                .filter(|a| (start..end).contains(&a.subjob_id))
                .cloned()
                .collect();
            assert_eq!(
                s.load_atoms_range(7, start..end).unwrap(),
                want,
                "{start}..{end}"
            );
        }
        for a in &expected {
            assert_eq!(s.get_atom(7, a.subjob_id, a.id).unwrap().as_ref(), Some(a));
        }
        assert_eq!(s.get_atom(7, 1, 5).unwrap(), None);
        assert_eq!(s.get_atom(7, 700, 0).unwrap(), None);
        assert_eq!(s.get_atom(9, 0, 0).unwrap(), None);
        s.clear_build_details(7).unwrap();
        assert!(s.load_atoms(7).unwrap().is_empty());
        assert_eq!(s.get_atom(7, 0, 0).unwrap(), None);
        assert_eq!(s.load_atoms(8).unwrap(), grouping);
    }

    #[test]
    fn timings_merge() {
        let s = Store::temporary().unwrap();
        s.merge_timings("p", "job", [("a", 1.0), ("b", 2.0)])
            .unwrap();
        s.merge_timings("p", "job", [("b", 3.0)]).unwrap();
        let t = s.timings("p", "job", ["a", "b", "c"]).unwrap();
        assert_eq!(t, HashMap::from([("a".into(), 1.0), ("b".into(), 3.0)]));
        assert!(s.timings("p", "other", ["a"]).unwrap().is_empty());
        // Many atoms spread over every bucket, merged in two overlapping builds.
        let names: Vec<String> = (0..5000).map(|i| format!("export N=\"{i}\";")).collect();
        s.merge_timings("p", "big", names[..3000].iter().map(|n| (n.as_str(), 1.0)))
            .unwrap();
        s.merge_timings("p", "big", names[2000..].iter().map(|n| (n.as_str(), 2.0)))
            .unwrap();
        let t = s
            .timings("p", "big", names.iter().map(String::as_str))
            .unwrap();
        assert_eq!(t.len(), 5000);
        assert!(names[..2000].iter().all(|n| t[n] == 1.0));
        assert!(names[2000..].iter().all(|n| t[n] == 2.0));
    }

    /// The bucket of an atom is part of the on-disk format: it must never change.
    #[test]
    fn timing_buckets_are_stable() {
        assert_eq!(timing_bucket(""), (0xcbf2_9ce4_8422_2325u64 % 256) as u16);
        assert_eq!(timing_bucket("a"), (0xaf63_dc4c_8601_ec8cu64 % 256) as u16);
    }

    #[test]
    fn a_whole_history_map_is_migrated_into_buckets() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let old = db.open_tree("timings").unwrap();
            let map = HashMap::from([("a".to_string(), 1.5), ("b".to_string(), 2.5)]);
            old.insert(b"p\0job", serde_json::to_vec(&map).unwrap())
                .unwrap();
            db.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let t = s.timings("p", "job", ["a", "b"]).unwrap();
        assert_eq!(t, HashMap::from([("a".into(), 1.5), ("b".into(), 2.5)]));
        assert!(!s.db.tree_names().iter().any(|n| n.as_ref() == b"timings"));
    }
}
