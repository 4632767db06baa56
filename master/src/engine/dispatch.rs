//! Work to executors: preparation of a build on one slave, setup on each slave that will run
//! it, and dispatch of subjobs to free executors in the same turn that freed them.
use super::Core;
use super::model::{Attempt, Slave, SlaveBuild, SlaveBuildState, Subjob, Work};
use crate::command::{Durable, Internal};
use crate::ids::BuildId;
use crate::storage::BuildWrite;
use ish_core::grouping;
use ish_core::proto::{self, master_message::Msg as Down};
use ish_core::state::{BuildEvent, BuildState};
use std::collections::{BTreeSet, HashMap};

/// Attempt ids reserved per store write.
pub(super) const ATTEMPT_BLOCK: u64 = 1 << 20;

impl Core {
    /// A fresh attempt id (unique for the data dir: attempt ids name directories).
    pub(super) fn new_attempt(&mut self) -> u64 {
        if self.next_attempt >= self.attempt_end {
            // Reserved with the next commit, before this attempt's result can be acknowledged.
            self.attempt_end = self.next_attempt + ATTEMPT_BLOCK;
            self.pending
                .push(BuildWrite::AttemptsReservedTo(self.attempt_end));
        }
        self.next_attempt += 1;
        self.next_attempt - 1
    }

    pub(super) fn prepared(&mut self, sid: u64, mut r: proto::PrepareResult) {
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
                b.transition(BuildEvent::Requeue, self.clock.epoch());
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
        let mut job = r.job.take().unwrap_or_default();
        if job.atom_timeout_seconds == 0 {
            job.atom_timeout_seconds = self.cfg.default_atom_timeout_s;
        }
        // The history is read off the actor; grouping goes on in `group` when it is back.
        let store = self.store.clone();
        let project_key = b.project_key.clone();
        let back = self.self_tx.clone();
        tokio::spawn(async move {
            let timings = match store.timings(&project_key, &job.name, &r.atoms).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(build = id, error = %e, "timing history unreadable; grouping without it");
                    HashMap::new()
                }
            };
            if let Some(tx) = back.upgrade() {
                let read = Internal::HistoryRead {
                    build: BuildId(id),
                    prepared: Box::new(r),
                    job: Box::new(job),
                    timings,
                };
                let _ = tx.send(read.into()).await;
            }
        });
    }

    /// Groups a prepared build's atoms with their timing history into subjobs, stores the
    /// grouping, and lets dispatching start once that is durable.
    pub(super) fn group(
        &mut self,
        id: u64,
        r: proto::PrepareResult,
        job: proto::JobConfig,
        timings: HashMap<String, f64>,
    ) {
        let Some(b) = self.builds.get_mut(&id) else {
            return;
        };
        // Canceled (or failed) while the history was read.
        if b.state != BuildState::Preparing || b.preparing_on.is_some() {
            return;
        }
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
        b.transition(BuildEvent::FinishPrepare, self.clock.epoch());
        tracing::info!(
            build = id,
            atoms = b.num_atoms,
            subjobs = b.subjobs.len(),
            "build prepared"
        );
        // Replaces whatever grouping a preparation redone after a crash left behind.
        let grouping = BuildWrite::grouping(id, b.subjobs.iter().flat_map(|s| &s.atoms));
        self.pending.push(grouping);
        self.persist(id);
        // Nothing is dispatched until the grouping is on disk: a master that crashes after a
        // dispatch must find the same subjobs (and the slaves' reports must match them).
        self.durable.push(Durable::Prepared(BuildId(id)));
        self.notify(id);
        self.check_complete(id);
    }

    pub(super) fn setup_done(&mut self, sid: u64, r: proto::SetupResult) {
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

    /// Starts every piece of work that can start now: preparations of queued builds, setups on
    /// slaves a build needs, and subjobs on free executors. Builds are served oldest first.
    pub(super) fn schedule(&mut self) {
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
    pub(super) fn check_free(&self) {
        let expected: BTreeSet<u64> = self
            .slaves
            .values()
            .filter(|s| !s.draining && !s.free_slots.is_empty())
            .map(|s| s.id)
            .collect();
        assert_eq!(self.free, expected, "free-slave index out of step");
    }

    /// Slave with the most free executors (ties: lowest id), optionally filtered.
    pub(super) fn pick_slave(&self, ok: impl Fn(&Slave) -> bool) -> Option<u64> {
        self.free
            .iter()
            .filter_map(|sid| self.slaves.get(sid))
            .filter(|s| ok(s))
            .max_by_key(|s| (s.free_slots.len(), std::cmp::Reverse(s.id)))
            .map(|s| s.id)
    }

    pub(super) fn start_prepare(&mut self, id: u64) {
        let excluded = self.builds[&id].prepare_excluded.clone();
        let Some(sid) = self.pick_slave(|s| !excluded.contains(&s.id)) else {
            return;
        };
        let b = self.builds.get_mut(&id).expect("active build");
        if !b.transition(BuildEvent::StartPrepare, self.clock.epoch()) {
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
            // The parsed config replaces its text (see `Prepare.job`).
            config_json: match b.inline_job {
                Some(_) => String::new(),
                None => req.config_json.clone(),
            },
            atoms_override: b.atoms_override.clone(),
            env: req.env.clone(),
            job: b.inline_job.clone(),
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

    pub(super) fn dispatch(&mut self, id: u64) {
        let b = &self.builds[&id];
        if !b.grouping_durable
            || (b.recovered && self.resume_until.is_some_and(|t| self.clock.now() < t))
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

    pub(super) fn start_setup(&mut self, id: u64, sid: u64) {
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

    pub(super) fn can_dispatch(&self, id: u64, sid: u64) -> bool {
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

    pub(super) fn dispatch_one(&mut self, id: u64, sid: u64) -> bool {
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
            b.transition(BuildEvent::StartBuilding, self.clock.epoch());
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
        if s.attempts > 1 {
            self.pending.push(BuildWrite::Attempts {
                build: id,
                subjob,
                attempts: s.attempts,
            });
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
