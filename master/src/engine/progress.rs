//! Atom results and subjob completion: each result is recorded once, from the current attempt.
use super::Core;
use super::model::Attempt;
use crate::command::Durable;
use crate::ids::{AttemptId, SlaveId};
use crate::results::ResultsJob;
use crate::storage::BuildWrite;
use ish_core::proto::{self, master_message::Msg as Down};
use ish_core::state::BuildEvent;

impl Core {
    pub(super) fn current_attempt(
        &self,
        sid: u64,
        attempt: u64,
        build: u64,
        subjob: u32,
    ) -> Option<Attempt> {
        self.attempts
            .get(&attempt)
            .copied()
            .filter(|a| a.slave == sid && a.build == build && a.subjob == subjob)
    }

    pub(super) fn atom_started(&mut self, sid: u64, m: proto::AtomStarted) {
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

    pub(super) fn atom_result(&mut self, sid: u64, r: proto::AtomResult) {
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
        // A commit that fails ends the build in ERROR (see `flushed`).
        self.pending.push(BuildWrite::Atom {
            build: r.build_id,
            atom,
        });
        let _ = self.results.send(ResultsJob::Promote {
            build: r.build_id,
            attempt: r.attempt,
            subjob: r.subjob_id,
            atom: r.atom_id,
        });
        self.notify(r.build_id);
    }

    pub(super) fn subjob_done(&mut self, sid: u64, d: proto::SubjobDone) {
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
        self.durable
            .push(Durable::Ack(SlaveId(sid), AttemptId(d.attempt)));
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
    pub(super) fn release(&mut self, att: Attempt) {
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
    pub(super) fn settle_subjob(&mut self, id: u64, subjob: u32) {
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
}
