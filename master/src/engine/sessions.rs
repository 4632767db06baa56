//! Slave sessions: registration, adoption of the work a slave reports after a restart of
//! either side, its messages, and its loss (stream ended, heartbeats stopped, queue full).
use super::Core;
use super::invalid;
use super::model::{Attempt, Slave, SlaveBuild, SlaveBuildState, Work};
use crate::command::{SlaveEvent, SlaveTx, UploadGrant};
use crate::error::{MasterError, Result};
use crate::ids::{AtomRef, SlaveId};
use ish_core::proto::{self, master_message::Msg as Down, slave_message::Msg as Up};
use ish_core::state::{BuildEvent, BuildState};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

impl Core {
    /// One event of a slave's session.
    pub(super) fn on_slave_event(&mut self, event: SlaveEvent) {
        match event {
            SlaveEvent::Connected(reg, tx, reply) => {
                let _ = reply.send(self.slave_connected(reg, tx).map(SlaveId));
            }
            SlaveEvent::Message(sid, msg) => self.on_slave_message(sid.0, msg),
            SlaveEvent::Disconnected(sid) => {
                if self.slaves.contains_key(&sid.0) {
                    self.lose_slave(sid.0, "its stream ended");
                }
            }
            SlaveEvent::UploadTarget {
                slave,
                atom,
                attempt,
                reply,
            } => {
                let _ = reply.send(self.upload_grant(slave.0, atom, attempt.0));
            }
            SlaveEvent::ArtifactBytes { build, bytes } => {
                if let Some(b) = self.builds.get_mut(&build.0) {
                    b.artifact_bytes += bytes;
                }
            }
        }
    }

    /// Where an upload of `attempt` goes, if the attempt is this slave's and the atom exists.
    fn upload_grant(&self, slave: u64, at: AtomRef, attempt: u64) -> Result<UploadGrant> {
        let (build, subjob, atom) = (at.build.0, at.subjob.0, at.atom.0);
        let ok = self
            .attempts
            .get(&attempt)
            .is_some_and(|a| a.slave == slave && a.build == build && a.subjob == subjob)
            && self
                .builds
                .get(&build)
                .and_then(|b| b.subjobs.get(subjob as usize))
                .is_some_and(|s| (atom as usize) < s.atoms.len());
        if !ok {
            return Err(MasterError::FailedPrecondition(format!(
                "attempt {attempt} of build {build} subjob {subjob} is not assigned to this slave"
            )));
        }
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
    }
    pub(super) fn slave_connected(&mut self, reg: proto::Register, tx: SlaveTx) -> Result<u64> {
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
            last_seen: self.clock.now(),
            last_heartbeat: self.clock.epoch(),
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
    pub(super) fn adopt(
        &mut self,
        sid: u64,
        held: Vec<proto::HeldBuild>,
        reports: Vec<proto::AttemptReport>,
    ) {
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
    pub(super) fn adopt_attempt(&mut self, sid: u64, r: &proto::AttemptReport) -> bool {
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
            b.transition(BuildEvent::StartBuilding, self.clock.epoch());
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

    pub(super) fn on_slave_message(&mut self, sid: u64, msg: Up) {
        let Some(slave) = self.slaves.get_mut(&sid) else {
            tracing::debug!(
                slave = sid,
                "message from a slave that is no longer registered; ignored"
            );
            return;
        };
        slave.last_seen = self.clock.now();
        match msg {
            Up::Register(_) => tracing::warn!(slave = sid, "duplicate Register ignored"),
            Up::Heartbeat(_) => {
                slave.last_heartbeat = self.clock.epoch();
                self.send(
                    sid,
                    Down::Heartbeat(proto::Heartbeat {
                        sent_at: self.clock.epoch(),
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

    pub(super) fn free_slot(&mut self, sid: u64, slot: u32) {
        if let Some(s) = self.slaves.get_mut(&sid) {
            s.busy.remove(&slot);
            s.free_slots.insert(slot);
        }
        self.sync_free(sid);
    }

    /// Keeps `free` in step with one slave's executors and draining flag.
    pub(super) fn sync_free(&mut self, sid: u64) {
        match self.slaves.get(&sid) {
            Some(s) if !s.draining && !s.free_slots.is_empty() => self.free.insert(sid),
            _ => self.free.remove(&sid),
        };
    }

    /// Forgets a slave and puts its work back in the queue.
    pub(super) fn lose_slave(&mut self, sid: u64, why: &str) {
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
                        b.transition(BuildEvent::Requeue, self.clock.epoch());
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

    pub(super) fn sweep(&mut self, now: Instant) {
        if self.resume_until.is_some_and(|t| now >= t) {
            self.resume_until = None;
        }
        // Builds past their build_timeout (counted from submission, master downtime included).
        let epoch_now = self.clock.epoch();
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
}
