//! The end of a build: completion, archives, teardown on its slaves, retirement to a summary.
use super::Core;
use super::model::SlaveBuildState;
use crate::command::{Durable, Internal};
use crate::ids::BuildId;
use crate::results::{ResultsJob, TimingHistory};
use crate::storage::BuildWrite;
use ish_core::proto::{self, master_message::Msg as Down};
use ish_core::state::{BuildEvent, BuildState};
use std::collections::BTreeSet;
use tokio::sync::oneshot;

impl Core {
    /// Starts post-build work once every subjob is complete.
    pub(super) fn check_complete(&mut self, id: u64) {
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
                let _ = tx
                    .send(Internal::ArchivesWritten(BuildId(id), outcome).into())
                    .await;
            }
        });
    }

    pub(super) fn archives_written(&mut self, id: u64, outcome: std::result::Result<(), String>) {
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
    pub(super) fn end_build(&mut self, id: u64, event: BuildEvent, error: String) {
        let Some(b) = self.builds.get_mut(&id) else {
            return;
        };
        if !b.transition(event, self.clock.epoch()) {
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

    pub(super) fn has_attempts(&self, build: u64) -> bool {
        self.attempts.values().any(|a| a.build == build)
    }

    /// A final build's last step: its final state is stored; once that commit (which holds
    /// its atoms' results too) is durable, it leaves memory (`evict`).
    pub(super) fn retire(&mut self, id: u64) {
        if let Some(b) = self.builds.get_mut(&id) {
            b.killing = false;
            // A final build is never prepared again; its atoms (if any) are stored as atoms.
            if !std::mem::take(&mut b.atoms_override).is_empty() {
                self.pending.push(BuildWrite::AtomsOverride {
                    build: id,
                    atoms: Vec::new(),
                });
            }
        }
        self.persist(id);
        self.durable.push(Durable::Retired(BuildId(id)));
        self.notify(id);
    }

    /// A retired build's atoms are durable: they leave memory (reads of the build are served
    /// from the store from now on), its record gets its summary, and its attempt directories go.
    pub(super) fn evict(&mut self, id: u64) {
        let Some(b) = self.builds.get_mut(&id) else {
            return;
        };
        b.evict();
        self.persist(id);
        let _ = self.results.send(ResultsJob::Cleanup { build: id });
        self.notify(id);
    }
}
