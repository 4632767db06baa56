//! Where a build's result files live on the master, and the one task that changes them.
//!
//! Layout under `<data_dir>/results/<build_id>/`:
//! - `.attempts/<attempt>/console_artifact_<s>_<a>` — an atom's console as it streams in, for
//!   live reads (held in memory by the session reader first, and never written for a short atom
//!   whose upload brought its console: see `grpc.rs`, `ConsoleFiles`);
//! - `.attempts/<attempt>/artifact_<s>_<a>/` — the files an attempt uploaded when its atom ended
//!   (its `$ARTIFACT_DIR` and its whole console);
//! - `artifact_<s>_<a>/` — the accepted attempt of each atom, promoted when its result is recorded,
//!   with `clusterrunner_command`, `_exit_code`, `_time` and `_console_output` written beside the
//!   atom's own files;
//! - `failures.txt`, `.archive-index`, `.archive-sizes` — written once every atom is done.
//!
//! `results.zip` and `results.tar.gz` are not stored: each download writes them again from the
//! atom directories, `failures.txt` and the index, a compact record of what the archives
//! generate for each atom (command, exit code, time). [`archive::write_archive`] is
//! deterministic, so every download is byte for byte the same archive, whose size and CRC-32
//! were measured once (`.archive-sizes`) before the build was marked FINISHED: HEAD, the ETag
//! and Range answers stay those of a static file. An atom's console and files are therefore
//! stored once, where console pages read them, instead of three times (plain, deflated in the
//! zip, deflated in the tar). The cost moves to the downloads: each one deflates the archive
//! again, and a Range request writes it from the start and skips to the range (the skipped
//! part is not sent, only written). Builds archived by older masters keep their stored
//! archives, which are still served as files.
//!
//! All changes go through one ordered queue ([`ResultsJob`]) so an archive is only written after
//! every promotion queued before it, without any lock.
use crate::archive;
use crate::command::{Command, Internal};
use crate::ids::BuildId;
use ish_core::jobconfig;
use std::path::{Path, PathBuf};
use tokio::sync::{mpsc, oneshot};

/// Paths of the results tree.
#[derive(Debug, Clone)]
pub struct ResultsLayout {
    root: PathBuf,
}

/// What the archives need of one atom.
#[derive(Debug, Clone)]
pub struct ArchivedAtom {
    /// Subjob id.
    pub subjob: u32,
    /// Atom id.
    pub atom: u32,
    /// The atom's own command string (`export X="1";`).
    pub command_string: String,
    /// Exit code (-1 when it has none).
    pub exit_code: i32,
    /// Run time in seconds.
    pub seconds: f64,
}

/// A job's timing history, as the results queue updates it at build end.
#[derive(Debug, Clone)]
pub struct TimingHistory {
    /// The database.
    pub store: std::sync::Arc<dyn crate::storage::BuildStore>,
    /// Project the job belongs to.
    pub project_key: String,
    /// Job name.
    pub job: String,
}

impl TimingHistory {
    /// Records the times of the passing atoms: good history even when other atoms failed.
    pub async fn record(&self, atoms: &[ArchivedAtom]) -> crate::error::Result<()> {
        let times = atoms
            .iter()
            .filter(|a| a.exit_code == 0)
            .map(|a| (a.command_string.clone(), a.seconds))
            .collect();
        self.store
            .merge_timings(self.project_key.clone(), self.job.clone(), times)
            .await
    }
}

/// Which archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// results.zip
    Zip,
    /// results.tar.gz
    TarGz,
}

impl ArchiveKind {
    fn format(self) -> archive::Format {
        match self {
            Self::Zip => archive::Format::Zip,
            Self::TarGz => archive::Format::TarGz,
        }
    }

    fn file_name(self) -> &'static str {
        match self {
            Self::Zip => archive::ZIP_NAME,
            Self::TarGz => archive::TAR_GZ_NAME,
        }
    }
}

/// What regenerating a build's archives needs beyond its files: the job's commands (first
/// line, a JSON string) and one JSON line per atom, in archive order:
/// `[subjob, atom, exit_code, "time", "command_string"]`.
pub const ARCHIVE_INDEX: &str = ".archive-index";
/// The archives' sizes and CRC-32s as measured when they were first written (JSON): a build
/// has archives once this file is in place.
pub const ARCHIVE_SIZES: &str = ".archive-sizes";

/// Size and CRC-32 of one archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArchiveStat {
    /// Bytes.
    pub size: u64,
    /// CRC-32 of all the bytes.
    pub crc: u32,
}

/// Contents of [`ARCHIVE_SIZES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArchiveSizes {
    /// results.zip
    pub zip: ArchiveStat,
    /// results.tar.gz
    pub tar_gz: ArchiveStat,
}

impl ArchiveSizes {
    /// The stat of one archive.
    pub fn of(&self, kind: ArchiveKind) -> ArchiveStat {
        match kind {
            ArchiveKind::Zip => self.zip,
            ArchiveKind::TarGz => self.tar_gz,
        }
    }

    /// Reads a build directory's sizes; `None` when it has none (no archives yet, or archived
    /// by an older master that stored them).
    pub fn read(build_dir: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::read(build_dir.join(ARCHIVE_SIZES)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Where a download's bytes come from.
#[derive(Debug, Clone)]
pub enum ArchiveSource {
    /// Written again from the build directory; this is what it measured.
    Generated(ArchiveStat),
    /// A stored archive (builds archived before archives were generated).
    Stored(PathBuf),
}

/// Where to read one archive of a build whose archives are ready.
pub fn archive_source(build_dir: &Path, kind: ArchiveKind) -> std::io::Result<ArchiveSource> {
    match ArchiveSizes::read(build_dir)? {
        Some(sizes) => Ok(ArchiveSource::Generated(sizes.of(kind))),
        None => Ok(ArchiveSource::Stored(build_dir.join(kind.file_name()))),
    }
}

/// Writes `failures.txt` and the archive index of a finished build, then writes both archives
/// once, to nothing, to measure them, and stores the measures last ([`ARCHIVE_SIZES`]): the
/// build has archives from then on. Nothing is ever removed that a redo after a crash needs:
/// every step writes a whole new file and renames it into place, and the atom directories are
/// only read.
pub fn prepare_archives(
    build_dir: &Path,
    commands: &str,
    atoms: &[ArchivedAtom],
    failures: &[String],
) -> std::io::Result<ArchiveSizes> {
    use std::io::Write;
    std::fs::create_dir_all(build_dir)?;
    archive::write_failures(build_dir, failures)?;
    let index = archive::TempFile::create(build_dir, ARCHIVE_INDEX)?;
    let mut w = std::io::BufWriter::new(&index.file);
    serde_json::to_writer(&mut w, commands)?;
    w.write_all(b"\n")?;
    for a in atoms {
        let time = format!("{:.2}", a.seconds);
        serde_json::to_writer(
            &mut w,
            &(a.subjob, a.atom, a.exit_code, time, &a.command_string),
        )?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    drop(w);
    index.persist(ARCHIVE_INDEX)?;
    // Both at once: each is mostly deflate, one core each.
    let (zip, tar_gz) = std::thread::scope(|s| {
        let zip = s.spawn(|| measure(build_dir, ArchiveKind::Zip));
        let tar_gz = measure(build_dir, ArchiveKind::TarGz);
        let zip = zip
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("archive writer panicked")));
        (zip, tar_gz)
    });
    let sizes = ArchiveSizes {
        zip: zip?,
        tar_gz: tar_gz?,
    };
    let mut t = archive::TempFile::create(build_dir, ARCHIVE_SIZES)?;
    serde_json::to_writer(&mut t.file, &sizes)?;
    t.persist(ARCHIVE_SIZES)?;
    // Left by an older master that crashed while archiving: superseded by the sizes.
    for kind in [ArchiveKind::Zip, ArchiveKind::TarGz] {
        match std::fs::remove_file(build_dir.join(kind.file_name())) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(sizes)
}

fn measure(build_dir: &Path, kind: ArchiveKind) -> std::io::Result<ArchiveStat> {
    let sink = write_archive(build_dir, kind, Measure::default())?;
    Ok(ArchiveStat {
        size: sink.size,
        crc: sink.crc.sum(),
    })
}

/// Counts and checksums what is written to it.
#[derive(Default)]
struct Measure {
    size: u64,
    crc: flate2::Crc,
}

impl std::io::Write for Measure {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.size += data.len() as u64;
        self.crc.update(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes one archive of a build with an archive index to `out` (whole: a caller that wants
/// only part of it stops by returning an error from its writer).
pub fn write_archive<W: std::io::Write>(
    build_dir: &Path,
    kind: ArchiveKind,
    out: W,
) -> std::io::Result<W> {
    use std::io::BufRead;
    let index = std::fs::File::open(build_dir.join(ARCHIVE_INDEX))?;
    let mut lines = std::io::BufReader::new(index).lines();
    let bad = |e: serde_json::Error| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{ARCHIVE_INDEX}: {e}"),
        )
    };
    let commands: String = match lines.next() {
        Some(line) => serde_json::from_str(&line?).map_err(bad)?,
        None => return Err(bad(serde::de::Error::custom("empty"))),
    };
    let dirs = lines.map(|line| {
        let (subjob, atom, exit_code, time, command_string): (u32, u32, i32, String, String) =
            serde_json::from_str(&line?).map_err(bad)?;
        let name = archive::artifact_dir_name(subjob, atom);
        let command = jobconfig::atom_command(&command_string, &commands);
        let mut generated = atom_files(&command, exit_code, &time);
        // An atom that printed nothing has no console file: an empty one.
        if !build_dir.join(&name).join(CONSOLE_FILE).exists() {
            generated.push((CONSOLE_FILE.to_string(), Vec::new()));
        }
        Ok(archive::ArtifactDir { name, generated })
    });
    let failures = build_dir.join(archive::FAILURES_NAME);
    let failures = failures.exists().then_some(failures.as_path());
    archive::write_archive(build_dir, kind.format(), dirs, failures, out)
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

    /// The console of one attempt of one atom as it streams in (for live reads). It lives beside
    /// the atom's directory, not in it: the authoritative console arrives with the atom's upload.
    pub fn live_console(&self, build: u64, attempt: u64, subjob: u32, atom: u32) -> PathBuf {
        self.build_dir(build)
            .join(".attempts")
            .join(attempt.to_string())
            .join(format!(
                "console_{}",
                archive::artifact_dir_name(subjob, atom)
            ))
    }

    /// Accepted results of one atom.
    pub fn atom_dir(&self, build: u64, subjob: u32, atom: u32) -> PathBuf {
        self.build_dir(build)
            .join(archive::artifact_dir_name(subjob, atom))
    }
}

/// Name of the console file inside an atom directory.
pub const CONSOLE_FILE: &str = "clusterrunner_console_output";

/// Name of the first file of a slave's upload: a JSON list of `[name, size]` of the files that
/// follow (the slave's `ish_slave::UPLOAD_MANIFEST`). A file whose size differs was cut short (a
/// refused or interrupted upload) and must not look whole in the results. The master keeps it in
/// memory and writes it here only for an upload that is not whole (`grpc.rs`, `KeptManifest`).
pub const UPLOAD_MANIFEST: &str = ".ish-upload-manifest";

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
    },
    /// The build's final state is on disk: its attempt directories (abandoned attempts, live
    /// consoles, promotion markers) are no longer needed. Before that they are: a master that
    /// crashed while writing the archives redoes its promotions from them.
    Cleanup {
        /// Build.
        build: u64,
    },
    /// Write failures.txt and both archives.
    Archive {
        /// Build.
        build: u64,
        /// The job's commands (the bookkeeping `clusterrunner_command` is atom + commands).
        commands: String,
        /// Where the passing atoms' times go (before `done`: the next build sees them).
        history: Box<TimingHistory>,
        /// Every atom, in (subjob, atom) order: compact, its files are generated as written.
        atoms: Vec<ArchivedAtom>,
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
    failures: mpsc::WeakSender<Command>,
) {
    while let Some(job) = rx.recv().await {
        let layout = layout.clone();
        match job {
            ResultsJob::Promote {
                build,
                attempt,
                subjob,
                atom,
            } => {
                let res = tokio::task::spawn_blocking(move || {
                    promote(&layout, build, attempt, subjob, atom)
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
                                .send(Internal::ResultsFailed(BuildId(build), msg).into())
                                .await;
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "results task panicked"),
                }
            }
            ResultsJob::Cleanup { build } => {
                let dir = layout.build_dir(build).join(".attempts");
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
            }
            ResultsJob::Archive {
                build,
                commands,
                history,
                atoms,
                failures,
                done,
            } => {
                let runtime = tokio::runtime::Handle::current();
                let res = tokio::task::spawn_blocking(move || {
                    // Off the core and off the async workers: an embedded store does its work
                    // inside the future, and a 200,000-atom build's history took 100 ms.
                    if let Err(e) = runtime.block_on(history.record(&atoms)) {
                        tracing::warn!(build, error = %e, "could not update timing history");
                    }
                    prepare_archives(&layout.build_dir(build), &commands, &atoms, &failures)
                        .map(|_| ())
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

/// Makes an attempt's files the atom's results. The rename is atomic, so a reader finds the
/// console either in the attempt directory or in the atom directory, never half-moved. A
/// marker beside the attempt's directory records that its files are in the atom directory, so
/// doing it again (after a restart) keeps them. The bookkeeping files are generated at archive
/// time; an atom that uploaded nothing and printed nothing has no directory at all.
fn promote(
    layout: &ResultsLayout,
    build: u64,
    attempt: u64,
    subjob: u32,
    atom: u32,
) -> std::io::Result<()> {
    let src = layout.attempt_atom_dir(build, attempt, subjob, atom);
    let dst = layout.atom_dir(build, subjob, atom);
    let marker = src.with_file_name(format!(
        "promoted_{}",
        archive::artifact_dir_name(subjob, atom)
    ));
    let mark = || -> std::io::Result<()> {
        if let Some(dir) = marker.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&marker, b"")
    };
    let mut left_out = Vec::new();
    if src.exists() {
        left_out = drop_cut_files(&src)?;
        if dst.exists() {
            // Left by an attempt whose result was lost in a crash: the recorded attempt wins.
            std::fs::remove_dir_all(&dst)?;
        }
        std::fs::rename(&src, &dst)?;
        mark()?;
    } else if !marker.exists() && dst.exists() {
        // Another attempt's files: this one uploaded nothing.
        std::fs::remove_dir_all(&dst)?;
    }
    // No console came with the upload (or no upload): keep what streamed in.
    let live = layout.live_console(build, attempt, subjob, atom);
    if live.exists() && !dst.join(CONSOLE_FILE).exists() {
        std::fs::create_dir_all(&dst)?;
        std::fs::rename(&live, dst.join(CONSOLE_FILE))?;
        mark()?;
    }
    if !left_out.is_empty() {
        use std::io::Write;
        let mut console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dst.join(CONSOLE_FILE))?;
        for (name, size) in &left_out {
            writeln!(
                console,
                "[ish] artifact {name:?} ({size} bytes) is not in the results: its upload did not complete"
            )?;
        }
    }
    Ok(())
}

/// Removes the manifest of an upload in `dir` and every file it lists that is not there whole;
/// returns those (name, size) — the console excepted: the streamed one takes its place. Without
/// a manifest (nothing was uploaded, or an older slave) nothing is removed.
fn drop_cut_files(dir: &std::path::Path) -> std::io::Result<Vec<(String, u64)>> {
    let path = dir.join(UPLOAD_MANIFEST);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    std::fs::remove_file(&path)?;
    // A manifest cut short itself means nothing after it arrived.
    let listed: Vec<(String, u64)> = serde_json::from_slice(&text).unwrap_or_default();
    let mut left_out = Vec::new();
    for (name, size) in listed {
        let Some(rel) = ish_core::paths::safe_relative_path(&name) else {
            continue;
        };
        let file = dir.join(rel);
        let whole = std::fs::symlink_metadata(&file).is_ok_and(|m| m.is_file() && m.len() == size);
        if whole {
            continue;
        }
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        if name != CONSOLE_FILE {
            left_out.push((name, size));
        }
    }
    Ok(left_out)
}

/// ClusterRunner's per-atom bookkeeping files: command, exit code and time (the console is
/// the atom's own file).
pub fn atom_files(command: &str, exit_code: i32, time: &str) -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "clusterrunner_command".into(),
            format!("{command}\n").into_bytes(),
        ),
        (
            "clusterrunner_exit_code".into(),
            format!("{exit_code}\n").into_bytes(),
        ),
        (
            "clusterrunner_time".into(),
            format!("{time}\n").into_bytes(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upload cut short leaves its files as far as they came: the manifest tells a cut file
    /// from a whole one, and promotion keeps only whole ones and says so in the console.
    #[test]
    fn promotion_leaves_out_files_an_upload_cut_short() {
        let root = tempfile::tempdir().unwrap();
        let layout = ResultsLayout::new(root.path().to_path_buf());
        let src = layout.attempt_atom_dir(1, 7, 0, 0);
        std::fs::create_dir_all(src.join("d")).unwrap();
        let manifest = serde_json::json!([
            ["a.txt", 3],
            ["d/big.bin", 1000],
            ["later.txt", 5],
            [CONSOLE_FILE, 10]
        ]);
        std::fs::write(src.join(UPLOAD_MANIFEST), manifest.to_string()).unwrap();
        std::fs::write(src.join("a.txt"), b"abc").unwrap();
        std::fs::write(src.join("d/big.bin"), vec![0u8; 400]).unwrap();
        let live = layout.live_console(1, 7, 0, 0);
        std::fs::write(&live, b"streamed\n").unwrap();
        promote(&layout, 1, 7, 0, 0).unwrap();
        let dst = layout.atom_dir(1, 0, 0);
        assert_eq!(std::fs::read(dst.join("a.txt")).unwrap(), b"abc");
        assert!(!dst.join("d/big.bin").exists());
        assert!(!dst.join(UPLOAD_MANIFEST).exists());
        let console = std::fs::read_to_string(dst.join(CONSOLE_FILE)).unwrap();
        assert_eq!(
            console,
            "streamed\n[ish] artifact \"d/big.bin\" (1000 bytes) is not in the results: its upload did not complete\n[ish] artifact \"later.txt\" (5 bytes) is not in the results: its upload did not complete\n"
        );
    }

    fn zip_entries(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        use std::io::Read;
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        (0..z.len())
            .map(|i| {
                let mut e = z.by_index(i).unwrap();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (e.name().unwrap().to_string(), data)
            })
            .collect()
    }

    /// The archives are measured by the same writer that serves downloads, so a download is
    /// exactly the archive measured; a redo after a crash (here: the sizes never written, an
    /// older master's half-written archive left behind) measures the same archives again and
    /// leaves every atom file in place.
    #[test]
    fn downloads_are_the_measured_archives_and_a_redo_changes_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("5");
        let atom0 = dir.join("artifact_0_0");
        std::fs::create_dir_all(atom0.join("out")).unwrap();
        let console: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        std::fs::write(atom0.join(CONSOLE_FILE), &console).unwrap();
        std::fs::write(atom0.join("out/r.txt"), b"report").unwrap();
        let atoms = [
            ArchivedAtom {
                subjob: 0,
                atom: 0,
                command_string: "export X=\"1\";".into(),
                exit_code: 0,
                seconds: 1.254,
            },
            ArchivedAtom {
                subjob: 0,
                atom: 1,
                command_string: "export X=\"2\";".into(),
                exit_code: 3,
                seconds: 0.5,
            },
        ];
        let failures = vec!["artifact_0_1".to_string()];
        let sizes = prepare_archives(&dir, "make", &atoms, &failures).unwrap();
        let mut served = Vec::new();
        for kind in [ArchiveKind::Zip, ArchiveKind::TarGz] {
            let bytes = write_archive(&dir, kind, Vec::new()).unwrap();
            let mut crc = flate2::Crc::new();
            crc.update(&bytes);
            assert_eq!(
                sizes.of(kind),
                ArchiveStat {
                    size: bytes.len() as u64,
                    crc: crc.sum()
                },
                "{kind:?}"
            );
            served.push(bytes);
        }
        let names: Vec<(String, Vec<u8>)> = zip_entries(&served[0]);
        let command = |s: &str| format!("{}\n", jobconfig::atom_command(s, "make")).into_bytes();
        let want: Vec<(String, Vec<u8>)> = vec![
            (
                "artifact_0_0/clusterrunner_command".into(),
                command("export X=\"1\";"),
            ),
            (
                "artifact_0_0/clusterrunner_console_output".into(),
                console.clone(),
            ),
            (
                "artifact_0_0/clusterrunner_exit_code".into(),
                b"0\n".to_vec(),
            ),
            ("artifact_0_0/clusterrunner_time".into(), b"1.25\n".to_vec()),
            ("artifact_0_0/out/r.txt".into(), b"report".to_vec()),
            (
                "artifact_0_1/clusterrunner_command".into(),
                command("export X=\"2\";"),
            ),
            (
                "artifact_0_1/clusterrunner_console_output".into(),
                Vec::new(),
            ),
            (
                "artifact_0_1/clusterrunner_exit_code".into(),
                b"3\n".to_vec(),
            ),
            ("artifact_0_1/clusterrunner_time".into(), b"0.50\n".to_vec()),
            ("failures.txt".into(), b"artifact_0_1".to_vec()),
        ];
        assert_eq!(names, want);

        // A crash before the sizes were stored: no archives; the redo finds what it needs.
        std::fs::remove_file(dir.join(ARCHIVE_SIZES)).unwrap();
        assert_eq!(ArchiveSizes::read(&dir).unwrap(), None);
        std::fs::write(dir.join(archive::ZIP_NAME), b"half an old archive").unwrap();
        let again = prepare_archives(&dir, "make", &atoms, &failures).unwrap();
        assert_eq!(again, sizes);
        assert_eq!(ArchiveSizes::read(&dir).unwrap(), Some(sizes));
        assert!(!dir.join(archive::ZIP_NAME).exists());
        assert_eq!(std::fs::read(atom0.join(CONSOLE_FILE)).unwrap(), console);
        assert!(write_archive(&dir, ArchiveKind::Zip, Vec::new()).unwrap() == served[0]);
        assert!(write_archive(&dir, ArchiveKind::TarGz, Vec::new()).unwrap() == served[1]);
    }

    /// A whole upload: the manifest goes, everything else stays as it came.
    #[test]
    fn promotion_of_a_whole_upload_only_drops_the_manifest() {
        let root = tempfile::tempdir().unwrap();
        let layout = ResultsLayout::new(root.path().to_path_buf());
        let src = layout.attempt_atom_dir(1, 7, 0, 0);
        std::fs::create_dir_all(&src).unwrap();
        let manifest = serde_json::json!([["a.txt", 3], [CONSOLE_FILE, 4]]);
        std::fs::write(src.join(UPLOAD_MANIFEST), manifest.to_string()).unwrap();
        std::fs::write(src.join("a.txt"), b"abc").unwrap();
        std::fs::write(src.join(CONSOLE_FILE), b"out\n").unwrap();
        promote(&layout, 1, 7, 0, 0).unwrap();
        let dst = layout.atom_dir(1, 0, 0);
        let mut names: Vec<String> = std::fs::read_dir(&dst)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a.txt", CONSOLE_FILE]);
        assert_eq!(std::fs::read(dst.join(CONSOLE_FILE)).unwrap(), b"out\n");
    }
}
