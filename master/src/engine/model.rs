//! The build model as the engine holds it: builds, subjobs, slaves, attempts, and the
//! conversions of a build to the wire (`to_proto`), to its stored record and to archive records.
use super::validate::project_key;
use crate::command::SlaveTx;
use crate::results::ArchivedAtom;
use ish_core::proto::{self};
use ish_core::state::{BuildEvent, BuildState};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SlaveBuildState {
    /// The slave prepared the build: it has the workspace but has not run setup.
    Prepared,
    /// Setup sent, no answer yet.
    SettingUp,
    /// Setup succeeded: subjobs may be dispatched.
    Ready,
    /// Setup failed: this slave gets no more work of this build.
    Failed,
    /// Teardown sent.
    TornDown,
}

#[derive(Debug)]
pub(super) struct SlaveBuild {
    pub(super) state: SlaveBuildState,
    /// First BUILD_EXECUTOR_INDEX of this slave for this build.
    pub(super) start_index: u32,
    /// Executors of this slave the build may use.
    pub(super) cap: u32,
    /// Build-local executor indices (0..cap) not in use.
    pub(super) free_local: BTreeSet<u32>,
}

#[derive(Debug)]
pub(super) struct Subjob {
    pub(super) atoms: Vec<proto::Atom>,
    /// Attempt running it now.
    pub(super) running: Option<u64>,
    pub(super) completed: bool,
    pub(super) attempts: u32,
    /// Slave it was last dispatched to.
    pub(super) slave: String,
}

#[derive(Debug)]
pub(super) struct Build {
    pub(super) id: u64,
    /// The request without `atoms_override`: it is copied into every status read and record.
    pub(super) request: proto::BuildRequest,
    /// The request's atoms, until the build ends (stored apart; see `Store`).
    pub(super) atoms_override: Vec<String>,
    pub(super) state: BuildState,
    pub(super) result: proto::BuildResult,
    pub(super) error: String,
    pub(super) timestamps: Vec<(BuildState, f64)>,
    pub(super) job: Option<proto::JobConfig>,
    /// The request's inline job config as validation parsed it (sent to the preparing slave,
    /// so the text is parsed once); `None` when the config comes from the project.
    pub(super) inline_job: Option<proto::JobConfig>,
    pub(super) commit: String,
    pub(super) project_key: String,
    pub(super) project_dir: String,
    pub(super) subjobs: Vec<Subjob>,
    /// Subjobs waiting for an executor, in dispatch order.
    pub(super) pending: VecDeque<u32>,
    pub(super) completed_subjobs: u32,
    pub(super) completed_atoms: u32,
    pub(super) failed_atoms: u32,
    pub(super) flaky_atoms: u32,
    pub(super) num_atoms: u32,
    pub(super) artifacts_ready: bool,
    pub(super) archiving: bool,
    pub(super) setup_failures: u32,
    pub(super) prepare_attempts: u32,
    pub(super) preparing_on: Option<u64>,
    pub(super) slaves: BTreeMap<u64, SlaveBuild>,
    pub(super) next_executor_index: u32,
    pub(super) executors_in_use: u32,
    /// Resumed after a master restart: its subjobs wait for `Core::resume_until`.
    pub(super) recovered: bool,
    /// Artifact bytes uploaded so far (since this master started).
    pub(super) artifact_bytes: u64,
    /// Its subjobs and atoms are on disk: dispatching may start.
    pub(super) grouping_durable: bool,
    /// Slaves that failed to get the project (not asked to prepare it again).
    pub(super) prepare_excluded: BTreeSet<u64>,
    /// Set once the build is final: then `subjobs` is emptied and its atoms are read from the
    /// store on demand, so memory does not grow with the history of builds.
    pub(super) summary: Option<FinalSummary>,
    /// Ended (canceled or failed) while subjobs ran: its atoms stay in memory until the slaves
    /// report what the killed atoms did (exit code, console so far), then it is retired.
    pub(super) killing: bool,
}

/// What a final build keeps in memory of its atoms.
#[derive(Debug, Default)]
pub(super) struct FinalSummary {
    pub(super) num_subjobs: u32,
    /// Failed and flaky atoms of a FINISHED build (empty otherwise), in (subjob, atom) order.
    pub(super) failed: Vec<proto::Atom>,
    pub(super) flaky: Vec<proto::Atom>,
    /// Sum of the atoms' run times.
    pub(super) serialized_seconds: f64,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Work {
    Prepare(u64),
    Subjob(u64),
}

#[derive(Debug)]
pub(super) struct Slave {
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) session_id: String,
    pub(super) executors: u32,
    pub(super) labels: HashMap<String, String>,
    pub(super) version: String,
    pub(super) tx: SlaveTx,
    pub(super) free_slots: BTreeSet<u32>,
    pub(super) busy: BTreeMap<u32, Work>,
    pub(super) draining: bool,
    pub(super) last_seen: Instant,
    pub(super) last_heartbeat: f64,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Attempt {
    pub(super) build: u64,
    pub(super) subjob: u32,
    pub(super) slave: u64,
    pub(super) slot: u32,
    pub(super) local: u32,
}

impl Build {
    /// A build submitted (or reloaded) with its QUEUED time `at` (epoch seconds).
    pub(super) fn new(id: u64, mut request: proto::BuildRequest, at: f64) -> Self {
        let project_key = project_key(&request);
        let atoms_override = std::mem::take(&mut request.atoms_override);
        Self {
            id,
            request,
            atoms_override,
            state: BuildState::Queued,
            result: proto::BuildResult::Unspecified,
            error: String::new(),
            timestamps: vec![(BuildState::Queued, at)],
            job: None,
            inline_job: None,
            commit: String::new(),
            project_key,
            project_dir: String::new(),
            subjobs: Vec::new(),
            pending: VecDeque::new(),
            completed_subjobs: 0,
            completed_atoms: 0,
            failed_atoms: 0,
            flaky_atoms: 0,
            num_atoms: 0,
            artifacts_ready: false,
            archiving: false,
            setup_failures: 0,
            prepare_attempts: 0,
            preparing_on: None,
            slaves: BTreeMap::new(),
            next_executor_index: 0,
            executors_in_use: 0,
            recovered: false,
            artifact_bytes: 0,
            grouping_durable: false,
            prepare_excluded: BTreeSet::new(),
            summary: None,
            killing: false,
        }
    }

    pub(super) fn num_subjobs(&self) -> u32 {
        self.summary
            .as_ref()
            .map_or(self.subjobs.len() as u32, |s| s.num_subjobs)
    }

    /// Drops a final build's atoms from memory, keeping what status reads need.
    pub(super) fn evict(&mut self) {
        if !self.state.is_final() || self.summary.is_some() {
            return;
        }
        let atoms = || self.subjobs.iter().flat_map(|s| &s.atoms);
        let finished = self.state == BuildState::Finished;
        let summary = FinalSummary {
            num_subjobs: self.subjobs.len() as u32,
            failed: atoms()
                .filter(|a| finished && a.exit_code.is_some_and(|c| c != 0))
                .cloned()
                .collect(),
            flaky: atoms().filter(|a| finished && a.flaky).cloned().collect(),
            serialized_seconds: atoms().filter_map(|a| a.actual_time).sum(),
        };
        self.summary = Some(summary);
        self.subjobs = Vec::new();
        self.pending = VecDeque::new();
    }

    /// Applies an event through the state machine. An illegal event is logged and refused.
    pub(super) fn transition(&mut self, event: BuildEvent, at: f64) -> bool {
        match self.state.on(event) {
            Ok(next) => {
                self.state = next;
                self.timestamps.push((next, at));
                true
            }
            Err(e) => {
                tracing::warn!(build = self.id, error = %e, "refused build state transition");
                false
            }
        }
    }

    pub(super) fn job_name(&self) -> String {
        self.job
            .as_ref()
            .map(|j| j.name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| self.request.job_name.clone())
    }

    pub(super) fn max_executors(&self) -> u32 {
        self.job
            .as_ref()
            .map(|j| j.max_executors)
            .filter(|&n| n > 0)
            .unwrap_or(u32::MAX)
    }

    pub(super) fn max_per_slave(&self) -> u32 {
        self.job
            .as_ref()
            .map(|j| j.max_executors_per_slave)
            .filter(|&n| n > 0)
            .unwrap_or(u32::MAX)
    }

    pub(super) fn to_proto(&self, with_failed_atoms: bool) -> proto::Build {
        let list = |pick: fn(&proto::Atom) -> bool| -> Vec<proto::Atom> {
            if with_failed_atoms && self.state == BuildState::Finished {
                self.subjobs
                    .iter()
                    .flat_map(|s| &s.atoms)
                    .filter(|a| pick(a))
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            }
        };
        let (failed_atoms, flaky_atoms) = match &self.summary {
            Some(s) if with_failed_atoms => (s.failed.clone(), s.flaky.clone()),
            Some(_) => (Vec::new(), Vec::new()),
            None => (
                list(|a| a.exit_code.is_some_and(|c| c != 0)),
                list(|a| a.flaky),
            ),
        };
        proto::Build {
            id: self.id,
            state: proto::BuildState::from(self.state) as i32,
            result: self.result as i32,
            error_message: self.error.clone(),
            request: Some(self.request.clone()),
            job_name: self.job_name(),
            commit: self.commit.clone(),
            num_subjobs: self.num_subjobs(),
            completed_subjobs: self.completed_subjobs,
            num_atoms: self.num_atoms,
            completed_atoms: self.completed_atoms,
            failed_atom_count: self.failed_atoms,
            failed_atoms,
            state_timestamps: self
                .timestamps
                .iter()
                .map(|&(s, at)| proto::StateTimestamp {
                    state: proto::BuildState::from(s) as i32,
                    at,
                })
                .collect(),
            artifacts_ready: self.artifacts_ready,
            command: self
                .job
                .as_ref()
                .map(|j| j.commands.clone())
                .unwrap_or_default(),
            project_dir: self.project_dir.clone(),
            flaky_atom_count: self.flaky_atoms,
            flaky_atoms,
        }
    }

    pub(super) fn to_record(&self) -> proto::StoredBuild {
        proto::StoredBuild {
            build: Some(self.to_proto(self.summary.is_some())),
            job: self.job.clone(),
            project_key: self.project_key.clone(),
            setup_failures: self.setup_failures,
            prepare_attempts: self.prepare_attempts,
            serialized_seconds: self.summary.as_ref().map(|s| s.serialized_seconds),
        }
    }

    /// Artifact directory names of every atom, and of the failed ones, in (subjob, atom) order.
    /// Every atom's artifact directory with its bookkeeping files (generated, not stored per
    /// atom), and the names of the failed atoms' directories, in (subjob, atom) order.
    pub(super) fn archived_atoms(&self) -> (Vec<ArchivedAtom>, Vec<String>) {
        let mut all = Vec::with_capacity(self.num_atoms as usize);
        let mut failed = Vec::new();
        for (sid, s) in self.subjobs.iter().enumerate() {
            for a in &s.atoms {
                let exit_code = a.exit_code.unwrap_or(-1);
                if exit_code != 0 {
                    failed.push(crate::archive::artifact_dir_name(sid as u32, a.id));
                }
                all.push(ArchivedAtom {
                    subjob: sid as u32,
                    atom: a.id,
                    command_string: a.command_string.clone(),
                    exit_code,
                    seconds: a.actual_time.unwrap_or_default(),
                });
            }
        }
        (all, failed)
    }
}
