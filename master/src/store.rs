//! The master's database (sled). Every durable fact of the cluster lives here; everything else
//! the master holds in memory is derived from it at start-up.
//!
//! Trees:
//! - `builds`: build id (BE u64) -> `StoredBuild` (prost)
//! - `atoms`: build id (BE u64) + subjob id (BE u32) + atom id (BE u32) -> `Atom` (prost)
//! - `attempts`: build id (BE u64) + subjob id (BE u32) -> dispatch count (BE u32)
//! - `overrides`: build id (BE u64) -> JSON list of the request's `atoms_override`, kept apart
//!   from the build record, which is rewritten on every state change and read on every poll
//! - `timings`: project key + `\0` + job name -> JSON `{"<atom command string>": seconds}`
//! - `meta`: counters (`next_build_id`)
//!
//! sled is synchronous: small point reads/writes are called directly (microseconds, page cache),
//! flushes go through `flush_async` so the actor is not blocked on the disk.
use crate::error::{MasterError, Result};
use ish_core::proto;
use prost::Message;
use std::collections::HashMap;
use std::path::Path;

/// Handle to the database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    builds: sled::Tree,
    atoms: sled::Tree,
    attempts: sled::Tree,
    overrides: sled::Tree,
    timings: sled::Tree,
    meta: sled::Tree,
}

/// sled's in-memory page cache.
const DB_CACHE_BYTES: u64 = 16 << 20;

/// Atoms written per sled batch.
const ATOM_BATCH: usize = 1024;

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
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(DB_CACHE_BYTES)
            .open()?;
        Self::from_db(db)
    }

    /// A throw-away database (unit tests).
    pub fn temporary() -> Result<Self> {
        Self::from_db(sled::Config::new().temporary(true).open()?)
    }

    fn from_db(db: sled::Db) -> Result<Self> {
        Ok(Self {
            builds: db.open_tree("builds")?,
            atoms: db.open_tree("atoms")?,
            attempts: db.open_tree("attempts")?,
            overrides: db.open_tree("overrides")?,
            timings: db.open_tree("timings")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    /// Reserves the next build id (ids start at 1 and never repeat for this database).
    pub fn next_build_id(&self) -> Result<u64> {
        let v = self.meta.update_and_fetch(NEXT_BUILD_ID, |old| {
            let n = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        let bytes = v
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .unwrap_or_default();
        Ok(u64::from_be_bytes(bytes))
    }

    /// Reserves `count` consecutive attempt ids and returns the first. Attempt ids name
    /// directories on disk, so they must not repeat after a restart; reserving blocks keeps
    /// that to one write per block.
    pub fn reserve_attempts(&self, count: u64) -> Result<u64> {
        let v = self.meta.fetch_and_update(NEXT_ATTEMPT, |old| {
            let n = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(1);
            Some((n + count).to_be_bytes().to_vec())
        })?;
        let start = v
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(1);
        Ok(start)
    }

    /// Writes a build record.
    pub fn put_build(&self, rec: &proto::StoredBuild) -> Result<()> {
        let id = rec.build.as_ref().map(|b| b.id).unwrap_or_default();
        self.builds.insert(id.to_be_bytes(), rec.encode_to_vec())?;
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
        self.atoms.insert(
            atom_key(build, atom.subjob_id, atom.id),
            atom.encode_to_vec(),
        )?;
        Ok(())
    }

    /// Writes many atoms (a prepared build's atoms), in batches of `ATOM_BATCH`: one sled batch
    /// pins every page it touches until it is applied, so a 200,000-atom batch took 700 MB.
    /// Not atomic as a whole; callers make the atoms count only once the build record says so
    /// (a build recovered before that is prepared again, and its partial atoms cleared).
    pub fn put_atoms<'a>(
        &self,
        build: u64,
        atoms: impl IntoIterator<Item = &'a proto::Atom>,
    ) -> Result<()> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for a in atoms {
            batch.insert(&atom_key(build, a.subjob_id, a.id)[..], a.encode_to_vec());
            n += 1;
            if n % ATOM_BATCH == 0 {
                self.atoms.apply_batch(std::mem::take(&mut batch))?;
            }
        }
        self.atoms.apply_batch(batch)?;
        Ok(())
    }

    /// A build's atoms, ordered by (subjob, atom).
    pub fn load_atoms(&self, build: u64) -> Result<Vec<proto::Atom>> {
        self.load_atoms_range(build, 0..u32::MAX)
    }

    /// The atoms of subjobs `subjobs` of a build, ordered by (subjob, atom).
    pub fn load_atoms_range(
        &self,
        build: u64,
        subjobs: std::ops::Range<u32>,
    ) -> Result<Vec<proto::Atom>> {
        self.atoms
            .range(atom_key(build, subjobs.start, 0)..atom_key(build, subjobs.end, 0))
            .map(|kv| {
                let (_, v) = kv?;
                proto::Atom::decode(v.as_ref()).map_err(|e| MasterError::Corrupt(e.to_string()))
            })
            .collect()
    }

    /// One atom of a build.
    pub fn get_atom(&self, build: u64, subjob: u32, atom: u32) -> Result<Option<proto::Atom>> {
        self.atoms
            .get(atom_key(build, subjob, atom))?
            .map(|v| {
                proto::Atom::decode(v.as_ref()).map_err(|e| MasterError::Corrupt(e.to_string()))
            })
            .transpose()
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
        for tree in [&self.atoms, &self.attempts] {
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

    /// Recorded atom times of a job: atom command string -> seconds.
    pub fn timings(&self, project_key: &str, job: &str) -> Result<HashMap<String, f64>> {
        match self.timings.get(timing_key(project_key, job))? {
            None => Ok(HashMap::new()),
            Some(v) => serde_json::from_slice(&v).map_err(|e| MasterError::Corrupt(e.to_string())),
        }
    }

    /// Merges new atom times into a job's timing history (new values replace old ones).
    pub fn merge_timings(
        &self,
        project_key: &str,
        job: &str,
        new: &HashMap<String, f64>,
    ) -> Result<()> {
        if new.is_empty() {
            return Ok(());
        }
        let mut all = self.timings(project_key, job)?;
        all.extend(new.iter().map(|(k, v)| (k.clone(), *v)));
        let bytes = serde_json::to_vec(&all).map_err(|e| MasterError::Corrupt(e.to_string()))?;
        self.timings.insert(timing_key(project_key, job), bytes)?;
        Ok(())
    }

    /// Waits until everything written so far is on disk.
    pub async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }
}

fn timing_key(project_key: &str, job: &str) -> Vec<u8> {
    let mut k = project_key.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(job.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.next_build_id().unwrap(), 1);
            assert_eq!(s.next_build_id().unwrap(), 2);
            s.db.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.next_build_id().unwrap(), 3);
    }

    #[test]
    fn attempt_blocks_never_overlap_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let s = Store::open(dir.path()).unwrap();
            let a = s.reserve_attempts(10).unwrap();
            assert_eq!(s.reserve_attempts(10).unwrap(), a + 10);
            s.db.flush().unwrap();
            a
        };
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.reserve_attempts(5).unwrap(), first + 20);
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
        s.put_atoms(7, &[mk(1, 0), mk(0, 1), mk(0, 0), mk(10, 0)])
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

    #[test]
    fn timings_merge() {
        let s = Store::temporary().unwrap();
        s.merge_timings(
            "p",
            "job",
            &HashMap::from([("a".into(), 1.0), ("b".into(), 2.0)]),
        )
        .unwrap();
        s.merge_timings("p", "job", &HashMap::from([("b".into(), 3.0)]))
            .unwrap();
        let t = s.timings("p", "job").unwrap();
        assert_eq!(t, HashMap::from([("a".into(), 1.0), ("b".into(), 3.0)]));
        assert!(s.timings("p", "other").unwrap().is_empty());
    }
}
