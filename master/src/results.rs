//! Where a build's result files live on the master, and the one task that changes them.
//!
//! Layout under `<data_dir>/results/<build_id>/`:
//! - `.attempts/<attempt>/artifact_<s>_<a>/` — console output and uploaded artifacts of an atom
//!   while it runs (or from an attempt that was abandoned);
//! - `artifact_<s>_<a>/` — the accepted attempt of each atom, promoted when its result is recorded,
//!   with `clusterrunner_command`, `_exit_code`, `_time` and `_console_output` written beside the
//!   atom's own files;
//! - `failures.txt`, `results.tar.gz`, `results.zip` — written once every atom is done.
//!
//! All changes go through one ordered queue ([`ResultsJob`]) so an archive is only written after
//! every promotion queued before it, without any lock.
use crate::archive;
use std::path::{Path, PathBuf};
use tokio::sync::{mpsc, oneshot};

/// Paths of the results tree.
#[derive(Debug, Clone)]
pub struct ResultsLayout {
    root: PathBuf,
}

/// Which archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// results.zip
    Zip,
    /// results.tar.gz
    TarGz,
}

impl ResultsLayout {
    /// Results kept under `root`.
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// `<root>/<build>`.
    pub fn build_dir(&self, build: u64) -> PathBuf {
        self.root.join(build.to_string())
    }

    /// Working directory of one attempt of one atom.
    pub fn attempt_atom_dir(&self, build: u64, attempt: u64, subjob: u32, atom: u32) -> PathBuf {
        self.build_dir(build)
            .join(".attempts")
            .join(attempt.to_string())
            .join(archive::artifact_dir_name(subjob, atom))
    }

    /// Accepted results of one atom.
    pub fn atom_dir(&self, build: u64, subjob: u32, atom: u32) -> PathBuf {
        self.build_dir(build)
            .join(archive::artifact_dir_name(subjob, atom))
    }

    /// One of the two archives.
    pub fn archive(&self, build: u64, kind: ArchiveKind) -> PathBuf {
        self.build_dir(build).join(match kind {
            ArchiveKind::Zip => "results.zip",
            ArchiveKind::TarGz => "results.tar.gz",
        })
    }
}

/// Name of the console file inside an atom directory.
pub const CONSOLE_FILE: &str = "clusterrunner_console_output";

/// One change to the results tree.
#[derive(Debug)]
pub enum ResultsJob {
    /// Make `attempt` the recorded result of an atom.
    Promote {
        /// Build.
        build: u64,
        /// Attempt whose files become the atom's.
        attempt: u64,
        /// Subjob.
        subjob: u32,
        /// Atom.
        atom: u32,
        /// `clusterrunner_command` content (without the newline).
        command: String,
        /// Exit code.
        exit_code: i32,
        /// Seconds.
        seconds: f64,
        /// Re-done after a master restart: an atom directory already in place is kept.
        recovering: bool,
    },
    /// Write failures.txt and both archives.
    Archive {
        /// Build.
        build: u64,
        /// Artifact directory names in (subjob, atom) order.
        dirs: Vec<String>,
        /// Names of the failed atoms' directories, same order.
        failures: Vec<String>,
        /// Told the outcome.
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// Runs the results queue until every sender is dropped. A promotion that fails (disk full,
/// I/O error) is reported to the core through `failures`, which fails the build.
pub async fn run(
    layout: ResultsLayout,
    mut rx: mpsc::UnboundedReceiver<ResultsJob>,
    failures: mpsc::WeakSender<crate::core::Command>,
) {
    while let Some(job) = rx.recv().await {
        let layout = layout.clone();
        match job {
            ResultsJob::Promote {
                build,
                attempt,
                subjob,
                atom,
                command,
                exit_code,
                seconds,
                recovering,
            } => {
                let res = tokio::task::spawn_blocking(move || {
                    let p = Promotion {
                        build,
                        attempt,
                        subjob,
                        atom,
                        command: &command,
                        exit_code,
                        seconds,
                    };
                    promote(&layout, &p, recovering)
                })
                .await;
                match res {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(build, subjob, atom, error = %e, "could not store an atom's results");
                        if let Some(tx) = failures.upgrade() {
                            let msg = format!(
                                "Could not store the results of {}: {e}",
                                archive::artifact_dir_name(subjob, atom)
                            );
                            let _ = tx
                                .send(crate::core::Command::ResultsFailed(build, msg))
                                .await;
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "results task panicked"),
                }
            }
            ResultsJob::Archive {
                build,
                dirs,
                failures,
                done,
            } => {
                let res = tokio::task::spawn_blocking(move || {
                    let dir = layout.build_dir(build);
                    std::fs::create_dir_all(&dir)?;
                    // Abandoned attempts are never part of the results.
                    let _ = std::fs::remove_dir_all(dir.join(".attempts"));
                    for d in &dirs {
                        std::fs::create_dir_all(dir.join(d))?;
                    }
                    archive::write_archives(&dir, &dirs, &failures)
                })
                .await;
                let outcome = match res {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let _ = done.send(outcome);
            }
        }
    }
}

struct Promotion<'a> {
    build: u64,
    attempt: u64,
    subjob: u32,
    atom: u32,
    command: &'a str,
    exit_code: i32,
    seconds: f64,
}

/// Makes an attempt's files the atom's results. The rename is atomic, so a reader finds the
/// console either in the attempt directory or in the atom directory, never half-moved.
fn promote(layout: &ResultsLayout, p: &Promotion<'_>, recovering: bool) -> std::io::Result<()> {
    let src = layout.attempt_atom_dir(p.build, p.attempt, p.subjob, p.atom);
    let dst = layout.atom_dir(p.build, p.subjob, p.atom);
    if src.exists() {
        if dst.exists() {
            // Left by an attempt whose result was lost in a crash: the recorded attempt wins.
            std::fs::remove_dir_all(&dst)?;
        }
        std::fs::rename(&src, &dst)?;
    } else if !(recovering && dst.exists()) {
        // The atom printed nothing and wrote no artifacts (or, when recovering, it was
        // promoted before the restart and only the bookkeeping files are rewritten).
        if dst.exists() {
            std::fs::remove_dir_all(&dst)?;
        }
        std::fs::create_dir_all(&dst)?;
    }
    write_atom_files(&dst, p.command, p.exit_code, p.seconds)
}

/// Writes ClusterRunner's per-atom bookkeeping files into an atom directory.
pub fn write_atom_files(
    dir: &Path,
    command: &str,
    exit_code: i32,
    seconds: f64,
) -> std::io::Result<()> {
    std::fs::write(dir.join("clusterrunner_command"), format!("{command}\n"))?;
    std::fs::write(
        dir.join("clusterrunner_exit_code"),
        format!("{exit_code}\n"),
    )?;
    std::fs::write(dir.join("clusterrunner_time"), format!("{seconds:.2}\n"))?;
    let console = dir.join(CONSOLE_FILE);
    if !console.exists() {
        std::fs::write(console, b"")?;
    }
    Ok(())
}
