//! Client calls: submit, cancel and the reads of builds, subjobs, consoles and slaves.
//! Final builds keep only a summary in memory: for their subjobs and consoles the answer says
//! what to read from the store, and the caller reads it off the actor (`reads.rs`).
use super::Core;
use super::model::{Build, SlaveBuildState};
use super::reads::{bad_atom, bad_subjob, completed_console, no_console};
use super::validate::{MAX_REQUEST_PARAMS_BYTES, request_params_json, validate_request};
use super::{LIST_PAGE_BYTES, invalid, unknown_build};
use crate::command::{ClientCall, ConsoleAnswer, ConsoleLocation, Durable, SubjobsAnswer};
use crate::error::{MasterError, Result};
use crate::ids::{AtomRef, BuildId, SlaveId};
use crate::storage::BuildWrite;
use ish_core::proto::{self, master_message::Msg as Down};
use ish_core::state::BuildEvent;

impl Core {
    /// One client call; every call is answered (a submission only once it is on disk).
    pub(super) fn on_client(&mut self, call: ClientCall) {
        match call {
            ClientCall::Submit(req, reply) => match self.submit(*req) {
                // Answered once the build is on disk (see `start_flush`).
                Ok(id) => self.durable.push(Durable::Submitted(BuildId(id), reply)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            ClientCall::Cancel(id, reply) => {
                let _ = reply.send(self.cancel(id.0));
            }
            ClientCall::GetBuild(id, reply) => {
                let r = self
                    .builds
                    .get(&id.0)
                    .map(|b| b.to_proto(true))
                    .ok_or_else(|| unknown_build(id.0));
                let _ = reply.send(r);
            }
            ClientCall::ListBuilds {
                offset,
                limit,
                unfinished_only,
                reply,
            } => {
                let _ = reply.send(Ok(self.list_builds(offset, limit, unfinished_only)));
            }
            ClientCall::ListSubjobs {
                build,
                offset,
                limit,
                reply,
            } => {
                let _ = reply.send(self.list_subjobs(build.0, offset, limit));
            }
            ClientCall::Console(at, reply) => {
                let _ = reply.send(self.console(at.build.0, at.subjob.0, at.atom.0));
            }
            ClientCall::Archive(id, reply) => {
                let r = match self.builds.get(&id.0) {
                    None => Err(unknown_build(id.0)),
                    Some(b) if b.artifacts_ready => Ok(self.layout.build_dir(id.0)),
                    Some(b) => Err(MasterError::FailedPrecondition(format!(
                        "Build {id} has no artifacts yet (state {:?}).",
                        b.state
                    ))),
                };
                let _ = reply.send(r);
            }
            ClientCall::ListSlaves(reply) => {
                let _ = reply.send(Ok(self.list_slaves()));
            }
            ClientCall::Drain { ids, all, reply } => {
                let ids = ids.into_iter().map(|s| s.0).collect();
                let r = self
                    .drain(ids, all)
                    .map(|v| v.into_iter().map(SlaveId).collect());
                let _ = reply.send(r);
            }
            ClientCall::ListEvents {
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
            ClientCall::Metrics(reply) => {
                let _ = reply.send(Ok(self.render_metrics()));
            }
        }
    }

    fn list_builds(
        &self,
        offset: u32,
        limit: u32,
        unfinished_only: bool,
    ) -> proto::ListBuildsResponse {
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
        proto::ListBuildsResponse { builds, total }
    }
    pub(super) fn submit(&mut self, mut req: proto::BuildRequest) -> Result<u64> {
        let inline_job = validate_request(&req, self.cfg.max_atoms_per_build)?;
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
        self.last_build_id += 1;
        let id = self.last_build_id;
        let mut b = Build::new(id, req, self.clock.epoch());
        b.inline_job = inline_job;
        self.pending.push(BuildWrite::LastBuildId(id));
        if !b.atoms_override.is_empty() {
            self.pending.push(BuildWrite::AtomsOverride {
                build: id,
                atoms: b.atoms_override.clone(),
            });
        }
        self.pending
            .push(BuildWrite::Build(Box::new(b.to_record())));
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

    pub(super) fn cancel(&mut self, id: u64) -> Result<proto::Build> {
        let b = self.builds.get(&id).ok_or_else(|| unknown_build(id))?;
        if !b.state.is_final() {
            self.end_build(id, BuildEvent::Cancel, String::new());
        }
        Ok(self.builds[&id].to_proto(true))
    }

    pub(super) fn list_subjobs(&self, id: u64, offset: u32, limit: u32) -> Result<SubjobsAnswer> {
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
            let start = offset.min(sum.num_subjobs);
            let end = (u64::from(start) + take as u64).min(u64::from(sum.num_subjobs)) as u32;
            return Ok(SubjobsAnswer::Stored {
                build: BuildId(id),
                start,
                end,
                total: sum.num_subjobs,
                command,
            });
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
        Ok(SubjobsAnswer::Page(proto::ListSubjobsResponse {
            subjobs,
            total: b.subjobs.len() as u32,
        }))
    }

    pub(super) fn console(&self, id: u64, subjob: u32, atom: u32) -> Result<ConsoleAnswer> {
        let b = self.builds.get(&id).ok_or_else(|| unknown_build(id))?;
        if let Some(sum) = &b.summary {
            if subjob >= sum.num_subjobs {
                return Err(bad_subjob());
            }
            return Ok(ConsoleAnswer::Stored(AtomRef::new(id, subjob, atom)));
        }
        let s = b.subjobs.get(subjob as usize).ok_or_else(bad_subjob)?;
        let a = s.atoms.get(atom as usize).ok_or_else(bad_atom)?;
        if a.exit_code.is_some() {
            return Ok(ConsoleAnswer::Located(completed_console(
                &self.layout,
                id,
                subjob,
                atom,
                a.attempt,
            )));
        }
        match s.running {
            Some(attempt) if !b.state.is_final() => Ok(ConsoleAnswer::Located(ConsoleLocation {
                path: self.layout.live_console(id, attempt, subjob, atom),
                pending: Vec::new(),
                complete: false,
            })),
            _ => Err(no_console(id, subjob, atom)),
        }
    }

    pub(super) fn list_slaves(&self) -> proto::ListSlavesResponse {
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

    pub(super) fn drain(&mut self, ids: Vec<u64>, all: bool) -> Result<Vec<u64>> {
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
}
