//! Start-up: every stored build is reloaded and unfinished ones resume. What is needed is read
//! from the store before the actor starts ([`Stored::load`]); the engine then rebuilds its
//! state from it without touching the store.
use super::Core;
use super::model::{Build, FinalSummary, Subjob};
use crate::error::{MasterError, Result};
use crate::results::ResultsJob;
use crate::storage::{BuildStore, Counters};
use ish_core::proto::{self};
use ish_core::state::{BuildEvent, BuildState};
use std::collections::HashMap;

/// What a starting engine reads from the store.
#[derive(Debug, Default)]
pub struct Stored {
    counters: Counters,
    records: Vec<proto::StoredBuild>,
    /// Atoms, dispatch counts and `atoms_override` of the builds that need them: unfinished
    /// ones, and final ones stored before their summary was.
    details: HashMap<u64, Details>,
}

#[derive(Debug, Default)]
struct Details {
    atoms: Vec<proto::Atom>,
    attempts: Vec<(u32, u32)>,
    atoms_override: Vec<String>,
}

impl Stored {
    /// Reads every build record, and the details of the builds that need them.
    pub async fn load(store: &dyn BuildStore) -> Result<Self> {
        let counters = store.load_counters().await?;
        let records = store.load_builds().await?;
        let mut details = HashMap::new();
        for rec in &records {
            let Some(pb) = &rec.build else { continue };
            let is_final = proto::BuildState::try_from(pb.state)
                .ok()
                .and_then(|s| BuildState::try_from(s).ok())
                .is_some_and(|s| s.is_final());
            if is_final && rec.serialized_seconds.is_some() {
                continue;
            }
            let mut d = Details::default();
            if pb.num_subjobs > 0 {
                d.atoms = store.load_atoms_range(pb.id, 0..u32::MAX).await?;
                d.attempts = store.load_attempts_range(pb.id, 0..u32::MAX).await?;
            }
            if !is_final {
                d.atoms_override = store.atoms_override(pb.id).await?;
            }
            details.insert(pb.id, d);
        }
        Ok(Self {
            counters,
            records,
            details,
        })
    }
}

impl Core {
    /// Rebuilds the engine's state from what was stored. Unfinished builds resume: a build that
    /// was queued or preparing is prepared again; a building build re-queues every subjob that
    /// still lacks results; a build whose atoms were all done gets its archives (re)written.
    pub fn recover(&mut self, stored: Stored) -> Result<()> {
        self.event(
            "SERVICE_STARTED",
            serde_json::json!({ "service": "master" }),
        );
        let Stored {
            counters,
            records,
            mut details,
        } = stored;
        self.last_build_id = counters.last_build_id;
        // The block after the stored reservation may have been in use without its reservation
        // reaching the disk (ids go out before the next commit): start past it, so no id a
        // slave may still report is handed out again.
        self.next_attempt = counters.next_attempt + super::dispatch::ATTEMPT_BLOCK;
        self.attempt_end = self.next_attempt;
        for rec in records {
            let Some(pb) = rec.build else { continue };
            let mut b = Build::new(pb.id, pb.request.unwrap_or_default(), self.clock.epoch());
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
            // Accepted at submit, so it parses; a config this version refuses is the slave's
            // to report, from the text.
            if !b.request.config_json.is_empty() && !b.state.is_final() {
                let job = (!b.request.job_name.is_empty()).then_some(b.request.job_name.as_str());
                b.inline_job =
                    ish_core::jobconfig::parse_inline_config_str(&b.request.config_json, job).ok();
            }
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
            let d = details.remove(&b.id).unwrap_or_default();
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
                for a in d.atoms {
                    if let Some(s) = subjobs.get_mut(a.subjob_id as usize) {
                        s.atoms.push(a);
                    }
                }
                for (sj, n) in d.attempts {
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
                    b.transition(BuildEvent::Requeue, self.clock.epoch());
                }
                s if s.is_final() => {}
                _ => {}
            }
            if !b.state.is_final() {
                b.atoms_override = d.atoms_override;
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
                    self.resume_until = Some(self.clock.now() + self.cfg.resume_grace);
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
}
