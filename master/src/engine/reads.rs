//! Reads of final builds, served off the engine's actor: the engine answers what to read
//! (`SubjobsAnswer::Stored`, `ConsoleAnswer::Stored`) and the caller (`MasterHandle`, the
//! engine's tests) reads it from the store, so a slow store never holds up dispatching.
//!
//! A build's atoms leave the engine's memory only once the commit holding their results is
//! durable (`Durable::Retired`), so what is read here is always the whole build.
use crate::command::{ConsoleAnswer, ConsoleLocation, SubjobsAnswer};
use crate::error::{MasterError, Result};
use crate::results::{CONSOLE_FILE, ResultsLayout};
use crate::storage::BuildStore;
use ish_core::proto;
use std::collections::HashMap;

pub(super) fn bad_subjob() -> MasterError {
    MasterError::NotFound("Invalid subjob id.".into())
}

pub(super) fn bad_atom() -> MasterError {
    MasterError::NotFound("Invalid atom id.".into())
}

pub(super) fn no_console(build: u64, subjob: u32, atom: u32) -> MasterError {
    MasterError::NotFound(format!(
        "Console output does not exist on this host for build {build}, subjob {subjob}, atom {atom}."
    ))
}

/// Where a completed atom's console is: its results directory, or (until the results queue
/// has promoted it) the attempt's uploaded copy or what streamed in.
pub(super) fn completed_console(
    layout: &ResultsLayout,
    build: u64,
    subjob: u32,
    atom: u32,
    attempt: u64,
) -> ConsoleLocation {
    let pending = if attempt > 0 {
        vec![
            layout
                .attempt_atom_dir(build, attempt, subjob, atom)
                .join(CONSOLE_FILE),
            layout.live_console(build, attempt, subjob, atom),
        ]
    } else {
        Vec::new()
    };
    ConsoleLocation {
        path: layout.atom_dir(build, subjob, atom).join(CONSOLE_FILE),
        pending,
        complete: true,
    }
}

/// The page the engine answered, read from the store when it says so.
pub async fn subjobs(
    store: &dyn BuildStore,
    answer: SubjobsAnswer,
) -> Result<proto::ListSubjobsResponse> {
    let (build, start, end, total, command) = match answer {
        SubjobsAnswer::Page(page) => return Ok(page),
        SubjobsAnswer::Stored {
            build,
            start,
            end,
            total,
            command,
        } => (build.0, start, end, total, command),
    };
    let attempts: HashMap<u32, u32> = store
        .load_attempts_range(build, start..end)
        .await?
        .into_iter()
        .collect();
    let mut subjobs: Vec<proto::Subjob> = (start..end)
        .map(|i| proto::Subjob {
            build_id: build,
            id: i,
            attempts: attempts.get(&i).copied().unwrap_or(0),
            command: command.clone(),
            ..Default::default()
        })
        .collect();
    for mut a in store.load_atoms_range(build, start..end).await? {
        let Some(s) = subjobs.get_mut((a.subjob_id - start) as usize) else {
            continue;
        };
        a.state = if a.exit_code.is_some() {
            proto::AtomState::Completed
        } else {
            proto::AtomState::NotStarted
        } as i32;
        if !a.slave.is_empty() {
            s.slave = a.slave.clone();
        }
        s.atoms.push(a);
    }
    for s in &mut subjobs {
        let done = !s.atoms.is_empty() && s.atoms.iter().all(|a| a.exit_code.is_some());
        // First dispatches are not stored: a subjob with results ran at least once.
        s.attempts = s.attempts.max(u32::from(done));
        s.state = if done {
            proto::SubjobState::Completed
        } else {
            proto::SubjobState::Pending
        } as i32;
    }
    Ok(proto::ListSubjobsResponse { subjobs, total })
}

/// The console the engine answered, from the stored atom when it says so.
pub async fn console(
    store: &dyn BuildStore,
    layout: &ResultsLayout,
    answer: ConsoleAnswer,
) -> Result<ConsoleLocation> {
    let at = match answer {
        ConsoleAnswer::Located(loc) => return Ok(loc),
        ConsoleAnswer::Stored(at) => at,
    };
    let (build, subjob, atom) = (at.build.0, at.subjob.0, at.atom.0);
    let a = store
        .get_atom(build, subjob, atom)
        .await?
        .ok_or_else(bad_atom)?;
    if a.exit_code.is_none() {
        // A final build's atom that never ran has no console.
        return Err(no_console(build, subjob, atom));
    }
    Ok(completed_console(layout, build, subjob, atom, a.attempt))
}
