//! The build result archives, in ClusterRunner's exact layout (spec §11.1).
//!
//! A finished build's results directory holds one `artifact_<s>_<a>/` directory
//! per atom and an optional `failures.txt`; its two archives hold exactly those:
//! `results.tar.gz` (members `./`, `./artifact_0_0/`, …, `./failures.txt`) and
//! `results.zip` (file entries only: `artifact_0_0/clusterrunner_command`, …,
//! `failures.txt`). Clients and tests compare archive contents exactly, so
//! nothing else in the directory (staging dirs, the archive index, older
//! archives) may leak into them.
//!
//! The archives are not kept: [`write_archive`] is deterministic, so the master
//! writes each one again, byte for byte, for every download (see `results`).
//!
//! Choices where the original is unspecified or not reproducible:
//! * Entry order: artifact directories in the order the caller gives, each one
//!   walked depth first with the entries of every directory sorted by name
//!   (byte order), so a directory always precedes its contents; `failures.txt`
//!   comes last.
//! * Metadata is fixed so that archiving the same tree twice gives
//!   byte-identical archives: every entry gets the modification time
//!   1980-01-01T00:00:00 UTC (the earliest time a zip can record, used for the
//!   tar too so both archives agree), uid/gid 0 with no user/group names, and
//!   the entry's permission bits taken from the file system.
//! * Only regular files and directories are archived. Symlinks are never
//!   followed (an artifact directory that is itself a symlink is skipped) and
//!   other file types are skipped.
//! * Tar names of 100 bytes or more use the GNU long-name extension.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::zipstream::ZipStream;

/// File name of the gzip tar archive (served as the deprecated `artifacts.tar.gz`).
pub const TAR_GZ_NAME: &str = "results.tar.gz";
/// File name of the zip archive (served as `artifacts.zip`).
pub const ZIP_NAME: &str = "results.zip";
/// File name listing the failed atoms' artifact directories.
pub const FAILURES_NAME: &str = "failures.txt";

/// Prefix of every atom's artifact directory name.
const ARTIFACT_DIR_PREFIX: &str = "artifact_";
/// Prefix of in-progress files; never a valid artifact directory name.
const TEMP_PREFIX: &str = ".tmp-";
/// Unix time of 1980-01-01T00:00:00Z, the zip format's earliest timestamp.
const FIXED_MTIME: u64 = 315_532_800;
/// Tar header name field size; longer names need a GNU long-name entry.
const TAR_NAME_FIELD: usize = 100;
/// Compression level for both archives (zlib's default, a good speed/size balance).
const DEFLATE_LEVEL: u32 = 6;

/// Name of an atom's artifact directory: `artifact_<subjob_id>_<atom_id>`.
pub fn artifact_dir_name(subjob_id: u32, atom_id: u32) -> String {
    format!("{ARTIFACT_DIR_PREFIX}{subjob_id}_{atom_id}")
}

/// Sorts artifact directory names by (subjob id, atom id) numerically, so
/// `artifact_2_0` comes before `artifact_10_0`.
///
/// Callers use this order for `failures.txt` and for the archives. The
/// original wrote `failures.txt` in directory-listing order, which the file
/// system leaves unspecified; numeric order is the deterministic choice.
/// Names that do not parse as `artifact_<s>_<a>` sort after all that do, by
/// name; names with equal ids (e.g. `artifact_01_0` and `artifact_1_0`) are
/// ordered by name too, so the result never depends on the input order.
pub fn sort_artifact_dirs(names: &mut [String]) {
    names.sort_by(|a, b| {
        let key = |name: &str| {
            parse_artifact_dir_name(name).map_or((1, 0, 0), |(subjob, atom)| (0, subjob, atom))
        };
        key(a).cmp(&key(b)).then_with(|| a.cmp(b))
    });
}

fn parse_artifact_dir_name(name: &str) -> Option<(u64, u64)> {
    let (subjob, atom) = name.strip_prefix(ARTIFACT_DIR_PREFIX)?.split_once('_')?;
    let number = |s: &str| {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse::<u64>().ok()
        }
    };
    Some((number(subjob)?, number(atom)?))
}

/// Writes `failures.txt` into `results_dir`: `failures` joined by `\n` with no trailing
/// newline, in the given order (a name must not contain `\n`). When `failures` is empty, a
/// `failures.txt` left from an earlier call is removed so the directory matches the archives.
/// The file is written under a temporary name, fsynced and renamed into place, so a reader
/// sees either the previous complete file or the new one.
pub fn write_failures(results_dir: &Path, failures: &[String]) -> io::Result<()> {
    if let Some(bad) = failures.iter().find(|f| f.contains('\n')) {
        return Err(invalid_input(format!(
            "failure name {bad:?} contains a newline"
        )));
    }
    if failures.is_empty() {
        return match fs::remove_file(results_dir.join(FAILURES_NAME)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    let mut t = TempFile::create(results_dir, FAILURES_NAME)?;
    t.file.write_all(failures.join("\n").as_bytes())?;
    t.persist(FAILURES_NAME)
}

/// One artifact directory of the archives: what is on disk under `results_dir/<name>` (if
/// anything), plus files generated in memory (the per-atom bookkeeping files), which replace
/// files of the same name on disk. Generating them saves creating four files per atom on the
/// master, most of which hold a few bytes.
#[derive(Debug, Clone, Default)]
pub struct ArtifactDir {
    /// `artifact_<s>_<a>`.
    pub name: String,
    /// Top-level files of the directory given as content: (file name, bytes).
    pub generated: Vec<(String, Vec<u8>)>,
}

/// Which archive [`write_archive`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `results.zip`: file entries only.
    Zip,
    /// `results.tar.gz`: `./`, every directory, every file.
    TarGz,
}

/// Writes one archive of `results_dir` to `out`, streamed: each artifact directory is listed
/// and written before the next is looked at, and the zip's central directory waits in a
/// scratch file (created in `results_dir` and unlinked at once), so memory does not grow with
/// the number of atoms.
///
/// * `artifact_dirs`: the atom directories directly inside `results_dir`, in archive order
///   (see [`sort_artifact_dirs`]). Each name must be a single plain path component, unique,
///   and not one of the names this module uses. A listed directory that does not exist, or is
///   not a directory, contributes only its generated files. An `Err` item stops the archive.
/// * `failures`: a file archived last as `failures.txt`, if any.
///
/// The same tree, directory list and library versions always give the same bytes: metadata
/// is fixed (see the module comment), files are read in full buffers, and the gzip
/// compressor is fed fixed-size chunks, so neither short reads nor write sizes upstream can
/// change how deflate splits its input. This is what lets the master keep no archive at all
/// and write it again for each download (see `results::prepare_archives`).
pub fn write_archive<W: Write>(
    results_dir: &Path,
    format: Format,
    artifact_dirs: impl IntoIterator<Item = io::Result<ArtifactDir>>,
    failures: Option<&Path>,
    out: W,
) -> io::Result<W> {
    // The results directory itself is the caller's path, so it may be reached via a symlink.
    let root_mode = permission_bits(&fs::metadata(results_dir)?, true);
    let mut sink = match format {
        Format::TarGz => {
            // GzBuilder's defaults (mtime 0, no file name) keep the header reproducible.
            let gz = flate2::GzBuilder::new().write(out, flate2::Compression::new(DEFLATE_LEVEL));
            let mut tar = tar::Builder::new(FixedChunks::new(gz));
            append_tar(
                &mut tar,
                b"./",
                tar::EntryType::Directory,
                root_mode,
                0,
                io::empty(),
            )?;
            Sink::Tar(tar)
        }
        Format::Zip => {
            let spill = Spill {
                dir: results_dir.to_path_buf(),
                mem: io::Cursor::new(Vec::new()),
                file: None,
            };
            Sink::Zip(ZipStream::new(out, spill, DEFLATE_LEVEL))
        }
    };
    let mut seen = HashSet::new();
    let mut entries = Vec::new();
    for dir in artifact_dirs {
        let dir = dir?;
        check_artifact_dir(&dir.name, &mut seen)?;
        entries.clear();
        collect_artifact_dir(results_dir, &dir, &mut entries)?;
        for entry in &entries {
            sink.append(entry)?;
        }
    }
    if let Some(path) = failures {
        let meta = fs::symlink_metadata(path)?;
        sink.append(&Entry::file(
            FAILURES_NAME.as_bytes().to_vec(),
            path.to_path_buf(),
            &meta,
        ))?;
    }
    match sink {
        Sink::Tar(tar) => tar.into_inner()?.finish()?.finish(),
        Sink::Zip(zip) => zip.finish(),
    }
}

/// Central directory bytes a zip keeps in memory before it moves them to a scratch file: about
/// 80,000 entries. Ordinary downloads then need no disk, so a full disk does not stop them.
const SPILL_IN_MEMORY: usize = 8 << 20;

/// Where a zip's central directory waits for the archive's end: in memory up to
/// [`SPILL_IN_MEMORY`], then in a scratch file in the results directory, unlinked at once.
struct Spill {
    dir: PathBuf,
    mem: io::Cursor<Vec<u8>>,
    file: Option<File>,
}

impl Write for Spill {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.file.is_none() && self.mem.get_ref().len() + data.len() > SPILL_IN_MEMORY {
            let mut file = TempFile::create(&self.dir, "zip-directory")?.into_anonymous()?;
            file.write_all(self.mem.get_ref())?;
            self.mem = io::Cursor::new(Vec::new());
            self.file = Some(file);
        }
        match &mut self.file {
            Some(f) => f.write(data),
            None => self.mem.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Read for Spill {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.file {
            Some(f) => f.read(buf),
            None => self.mem.read(buf),
        }
    }
}

impl io::Seek for Spill {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        match &mut self.file {
            Some(f) => f.seek(pos),
            None => self.mem.seek(pos),
        }
    }
}

/// Bytes per chunk given to the gzip compressor.
const GZ_CHUNK: usize = 256 * 1024;

/// Hands its writer exactly [`GZ_CHUNK`] bytes per write (the last one excepted), whatever the
/// sizes written to it: the compressed bytes then depend on the data alone.
struct FixedChunks<W: Write> {
    buf: Vec<u8>,
    inner: W,
}

impl<W: Write> FixedChunks<W> {
    fn new(inner: W) -> Self {
        Self {
            buf: Vec::with_capacity(GZ_CHUNK),
            inner,
        }
    }

    /// Writes what is left and returns the writer.
    fn finish(mut self) -> io::Result<W> {
        self.inner.write_all(&self.buf)?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for FixedChunks<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let take = data.len().min(GZ_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() == GZ_CHUNK {
            self.inner.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The archive being written, entry by entry.
enum Sink<W: Write> {
    Tar(tar::Builder<FixedChunks<flate2::write::GzEncoder<W>>>),
    Zip(ZipStream<W, Spill>),
}

impl<W: Write> Sink<W> {
    /// Adds one entry (the zip holds files only, as the original's).
    fn append(&mut self, entry: &Entry) -> io::Result<()> {
        match self {
            Self::Tar(tar) => append_tar_entry(tar, entry),
            Self::Zip(zip) => match (entry.kind, &entry.content) {
                (Kind::Dir, _) => Ok(()),
                (Kind::File, Some(content)) => zip.add_file(
                    &entry.rel,
                    entry.mode,
                    content.len() as u64,
                    content.as_slice(),
                ),
                (Kind::File, None) => {
                    // The size seen first: a file that grows is cut there, one that shrinks
                    // is an error (see ExactReader).
                    let (file, len) = open_file(entry)?;
                    zip.add_file(
                        &entry.rel,
                        entry.mode,
                        len,
                        ExactReader::new(file, len, &entry.path),
                    )
                }
            },
        }
    }
}

fn append_tar_entry<W: Write>(tar: &mut tar::Builder<W>, entry: &Entry) -> io::Result<()> {
    let mut name = b"./".to_vec();
    name.extend_from_slice(&entry.rel);
    match (entry.kind, &entry.content) {
        (Kind::Dir, _) => {
            // Directory members end in '/', as Python's tarfile writes them.
            name.push(b'/');
            append_tar(
                tar,
                &name,
                tar::EntryType::Directory,
                entry.mode,
                0,
                io::empty(),
            )
        }
        (Kind::File, Some(content)) => append_tar(
            tar,
            &name,
            tar::EntryType::Regular,
            entry.mode,
            content.len() as u64,
            content.as_slice(),
        ),
        (Kind::File, None) => {
            let (file, len) = open_file(entry)?;
            append_tar(
                tar,
                &name,
                tar::EntryType::Regular,
                entry.mode,
                len,
                ExactReader::new(file, len, &entry.path),
            )
        }
    }
}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// Rejects a name that could escape `results_dir`, collide with the files this module writes,
/// or appear twice (which would duplicate archive entries).
fn check_artifact_dir(name: &str, seen: &mut HashSet<String>) -> io::Result<()> {
    let plain_component =
        !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0']);
    let reserved =
        // Dot names: temporary files and the master's archive index (see `results`).
        [TAR_GZ_NAME, ZIP_NAME, FAILURES_NAME].contains(&name) || name.starts_with('.');
    if !plain_component || reserved {
        return Err(invalid_input(format!(
            "{name:?} is not a valid artifact directory name"
        )));
    }
    if !seen.insert(name.to_owned()) {
        return Err(invalid_input(format!(
            "artifact directory {name:?} is listed twice"
        )));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
}

/// One archive member, collected before writing so both archives agree.
#[derive(Debug)]
struct Entry {
    /// Path relative to the results directory, `/`-separated, no trailing slash.
    rel: Vec<u8>,
    path: PathBuf,
    kind: Kind,
    mode: u32,
    /// Identity of the file when it was listed, to detect it being swapped
    /// (e.g. for a symlink) before it is read.
    identity: Option<(u64, u64)>,
    /// Content of a generated file (not on disk).
    content: Option<Vec<u8>>,
}

impl Entry {
    fn dir(rel: Vec<u8>, path: PathBuf, meta: &Metadata) -> Self {
        Self {
            rel,
            path,
            kind: Kind::Dir,
            mode: permission_bits(meta, true),
            identity: None,
            content: None,
        }
    }

    fn generated(rel: Vec<u8>, content: Vec<u8>) -> Self {
        Self {
            rel,
            path: PathBuf::new(),
            kind: Kind::File,
            mode: 0o644,
            identity: None,
            content: Some(content),
        }
    }

    fn file(rel: Vec<u8>, path: PathBuf, meta: &Metadata) -> Self {
        Self {
            rel,
            path,
            kind: Kind::File,
            mode: permission_bits(meta, false),
            identity: identity(meta),
            content: None,
        }
    }
}

#[cfg(unix)]
fn permission_bits(meta: &Metadata, _is_dir: bool) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

#[cfg(not(unix))]
fn permission_bits(meta: &Metadata, is_dir: bool) -> u32 {
    match (is_dir, meta.permissions().readonly()) {
        (true, _) => 0o755,
        (false, false) => 0o644,
        (false, true) => 0o444,
    }
}

#[cfg(unix)]
fn identity(meta: &Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn identity(_meta: &Metadata) -> Option<(u64, u64)> {
    None
}

#[cfg(unix)]
fn os_bytes(name: &OsStr) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    name.as_bytes().to_vec()
}

#[cfg(not(unix))]
fn os_bytes(name: &OsStr) -> Vec<u8> {
    name.to_string_lossy().into_owned().into_bytes()
}

fn join_rel(parent: &[u8], name: &OsStr) -> Vec<u8> {
    let mut rel = parent.to_vec();
    rel.push(b'/');
    rel.extend_from_slice(&os_bytes(name));
    rel
}

/// Lists one artifact directory (itself first, then its tree), with its generated files in
/// name order among the top-level entries (replacing files of the same name on disk).
fn collect_artifact_dir(
    results_dir: &Path,
    dir: &ArtifactDir,
    entries: &mut Vec<Entry>,
) -> io::Result<()> {
    let name = &dir.name;
    let root = results_dir.join(name);
    let meta = match fs::symlink_metadata(&root) {
        Ok(meta) if meta.file_type().is_dir() => Some(meta),
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    if meta.is_none() && dir.generated.is_empty() {
        return Ok(());
    }
    match &meta {
        Some(meta) => entries.push(Entry::dir(name.as_bytes().to_vec(), root.clone(), meta)),
        None => entries.push(Entry {
            rel: name.as_bytes().to_vec(),
            path: root.clone(),
            kind: Kind::Dir,
            mode: 0o755,
            identity: None,
            content: None,
        }),
    }
    let mut on_disk = Vec::new();
    if meta.is_some() {
        list_tree(&root, name.as_bytes(), &mut on_disk)?;
    }
    if dir.generated.is_empty() {
        entries.extend(on_disk);
        return Ok(());
    }
    // Group the on-disk listing by top-level child (a child and its subtree stay together),
    // drop the children that a generated file replaces, then merge by name.
    let top = |rel: &[u8]| -> Vec<u8> {
        let rest = &rel[name.len() + 1..];
        rest.split(|&b| b == b'/')
            .next()
            .unwrap_or_default()
            .to_vec()
    };
    let mut blocks: Vec<(Vec<u8>, Vec<Entry>)> = Vec::new();
    for e in on_disk {
        let child = top(&e.rel);
        match blocks.last_mut() {
            Some((c, block)) if *c == child => block.push(e),
            _ => blocks.push((child, vec![e])),
        }
    }
    let generated: HashSet<&[u8]> = dir.generated.iter().map(|(n, _)| n.as_bytes()).collect();
    blocks.retain(|(child, _)| !generated.contains(child.as_slice()));
    for (file, content) in &dir.generated {
        let mut rel = name.as_bytes().to_vec();
        rel.push(b'/');
        rel.extend_from_slice(file.as_bytes());
        blocks.push((
            file.as_bytes().to_vec(),
            vec![Entry::generated(rel, content.clone())],
        ));
    }
    blocks.sort_by(|a, b| a.0.cmp(&b.0));
    entries.extend(blocks.into_iter().flat_map(|(_, b)| b));
    Ok(())
}

/// Depth-first, name-sorted listing of everything below `dir` (excluding
/// `dir`), so a directory always precedes its contents. Uses an explicit stack
/// so a deeply nested artifact tree cannot overflow the thread's stack.
fn list_tree(dir: &Path, rel: &[u8], out: &mut Vec<Entry>) -> io::Result<()> {
    // Each stack item is a directory whose sorted children are yet to be
    // emitted; children are popped in order so output is depth first.
    struct Pending {
        rel: Vec<u8>,
        children: std::vec::IntoIter<(OsString, PathBuf, Metadata)>,
    }

    fn sorted_children(dir: &Path) -> io::Result<Vec<(OsString, PathBuf, Metadata)>> {
        let mut children = Vec::new();
        for child in fs::read_dir(dir)? {
            let child = child?;
            // DirEntry::metadata does not follow symlinks.
            let meta = child.metadata()?;
            children.push((child.file_name(), child.path(), meta));
        }
        children.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(children)
    }

    let mut stack = vec![Pending {
        rel: rel.to_vec(),
        children: sorted_children(dir)?.into_iter(),
    }];
    while let Some(top) = stack.last_mut() {
        let Some((name, path, meta)) = top.children.next() else {
            stack.pop();
            continue;
        };
        let child_rel = join_rel(&top.rel, &name);
        let file_type = meta.file_type();
        if file_type.is_dir() {
            out.push(Entry::dir(child_rel.clone(), path.clone(), &meta));
            stack.push(Pending {
                rel: child_rel,
                children: sorted_children(&path)?.into_iter(),
            });
        } else if file_type.is_file() {
            out.push(Entry::file(child_rel, path, &meta));
        }
    }
    Ok(())
}

/// Opens a listed file for reading, checking it is still the regular file
/// that was listed (not swapped for a symlink or something else meanwhile).
fn open_file(entry: &Entry) -> io::Result<(File, u64)> {
    let file = File::open(&entry.path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || identity(&meta) != entry.identity {
        return Err(io::Error::other(format!(
            "{} changed while the archives were being written",
            entry.path.display()
        )));
    }
    Ok((file, meta.len()))
}

/// Yields exactly the `remaining` bytes announced in an archive header: a file
/// that grows is cut at the announced size, one that shrinks is an error,
/// because a tar entry whose data does not match its header size corrupts
/// every following entry.
struct ExactReader<'a> {
    inner: File,
    remaining: u64,
    path: &'a Path,
}

impl<'a> ExactReader<'a> {
    fn new(inner: File, len: u64, path: &'a Path) -> Self {
        Self {
            inner,
            remaining: len,
            path,
        }
    }
}

impl Read for ExactReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let max = usize::try_from(self.remaining).map_or(buf.len(), |r| r.min(buf.len()));
        // The buffer is filled whole (a short read from the file system is read on), so the
        // chunks a compressor sees depend on the data alone: archives are reproducible.
        let mut n = 0;
        while n < max {
            match self.inner.read(&mut buf[n..max]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} shrank while the archives were being written",
                    self.path.display()
                ),
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// A file written under a unique temporary name in its final directory (so the rename into
/// place is atomic), removed unless it is persisted.
pub(crate) struct TempFile {
    path: PathBuf,
    pub(crate) file: File,
    persisted: bool,
}

impl TempFile {
    pub(crate) fn create(dir: &Path, final_name: &str) -> io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            "{TEMP_PREFIX}{final_name}.{}.{n}",
            std::process::id()
        ));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Self {
            path,
            file,
            persisted: false,
        })
    }

    /// Fsyncs (a crash must not leave a renamed but empty file) and renames into place.
    pub(crate) fn persist(mut self, final_name: &str) -> io::Result<()> {
        self.file.sync_all()?;
        fs::rename(&self.path, self.path.with_file_name(final_name))?;
        self.persisted = true;
        Ok(())
    }

    /// The open file, with no name left on disk (scratch space freed when it is closed).
    fn into_anonymous(mut self) -> io::Result<File> {
        fs::remove_file(&self.path)?;
        self.persisted = true;
        self.file.try_clone()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            // Best effort: the write already failed and that error is what matters.
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Builds a GNU header with `name` copied verbatim: tar's own path setters
/// would strip the leading `./` that ClusterRunner's member names carry.
fn tar_header(name: &[u8], entry_type: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    let field = &mut header.as_old_mut().name;
    let len = name.len().min(TAR_NAME_FIELD);
    field[..len].copy_from_slice(&name[..len]);
    header.set_entry_type(entry_type);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(FIXED_MTIME);
    header.set_size(size);
    header.set_cksum();
    header
}

fn append_tar<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &[u8],
    entry_type: tar::EntryType,
    mode: u32,
    size: u64,
    data: impl Read,
) -> io::Result<()> {
    if name.len() >= TAR_NAME_FIELD {
        let mut long_name = name.to_vec();
        long_name.push(0);
        let header = tar_header(
            b"././@LongLink",
            tar::EntryType::GNULongName,
            0o644,
            long_name.len() as u64,
        );
        tar.append(&header, long_name.as_slice())?;
    }
    tar.append(&tar_header(name, entry_type, mode, size), data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Writes failures.txt and both archives into `root` (as the master once kept them), or
    /// nothing at all when the input is refused.
    fn write_archives(root: &Path, dirs: &[String], failures: &[String]) -> io::Result<()> {
        if failures.iter().any(|f| f.contains('\n')) {
            return write_failures(root, failures);
        }
        let scratch = tempfile::tempdir()?;
        let failures_file = scratch.path().join(FAILURES_NAME);
        fs::write(&failures_file, failures.join("\n"))?;
        let failures_file = (!failures.is_empty()).then_some(failures_file.as_path());
        let list = || {
            dirs.iter().map(|name| {
                Ok(ArtifactDir {
                    name: name.clone(),
                    generated: Vec::new(),
                })
            })
        };
        let tar = write_archive(root, Format::TarGz, list(), failures_file, Vec::new())?;
        let zip = write_archive(root, Format::Zip, list(), failures_file, Vec::new())?;
        write_failures(root, failures)?;
        fs::write(root.join(TAR_GZ_NAME), tar)?;
        fs::write(root.join(ZIP_NAME), zip)
    }

    const LONG_DIR: &str =
        "a_rather_long_directory_name_that_pushes_the_member_path_over_one_hundred_bytes";

    fn write(path: &Path, content: &[u8]) {
        fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
        fs::write(path, content).expect("write");
    }

    fn binary_content() -> Vec<u8> {
        (0..=255_u8).chain((0..=255_u8).rev()).collect()
    }

    fn atom_files(dir: &Path, exit_code: i32) {
        write(
            &dir.join("clusterrunner_command"),
            b"export X=\"1\"; make\n",
        );
        write(&dir.join("clusterrunner_console_output"), b"building\n");
        write(
            &dir.join("clusterrunner_exit_code"),
            format!("{exit_code}\n").as_bytes(),
        );
        write(&dir.join("clusterrunner_time"), b"1.25\n");
    }

    /// A results dir with three atoms plus decoys that must stay out of the archives.
    fn build_results_dir() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        atom_files(&root.join("artifact_0_0"), 0);
        atom_files(&root.join("artifact_1_0"), 1);
        atom_files(&root.join("artifact_10_0"), 2);
        let a1 = root.join("artifact_1_0");
        write(&a1.join("out/nested/report.txt"), b"report\n");
        write(&a1.join("out/empty"), b"");
        write(&a1.join("bin.dat"), &binary_content());
        write(&a1.join("a/inner"), b"inner");
        write(&a1.join("a.txt"), b"a");
        fs::create_dir_all(a1.join("emptydir")).expect("mkdir");
        write(&a1.join(LONG_DIR).join("file.txt"), b"long");

        // Decoys.
        write(
            &root.join(".attempts/7/artifact_0_0/clusterrunner_command"),
            b"old",
        );
        write(&root.join("job.timing.json"), b"{}");
        write(&root.join(ZIP_NAME), b"stale, not a zip");
        #[cfg(unix)]
        {
            use std::os::unix::fs::symlink;
            symlink("clusterrunner_command", a1.join("link_to_file")).expect("symlink");
            symlink("../artifact_0_0", a1.join("link_to_dir")).expect("symlink");
            symlink("artifact_0_0", root.join("artifact_2_0")).expect("symlink");
            symlink("/etc", root.join("artifact_3_0")).expect("symlink");
        }
        tmp
    }

    fn artifact_dirs() -> Vec<String> {
        let mut dirs: Vec<String> = [
            "artifact_10_0",
            "artifact_2_0",
            "artifact_1_0",
            "artifact_0_0",
            "artifact_3_0",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        sort_artifact_dirs(&mut dirs);
        dirs
    }

    fn atom_members(dir: &str) -> Vec<(String, Option<Vec<u8>>)> {
        vec![
            (format!("{dir}/"), None),
            (
                format!("{dir}/clusterrunner_command"),
                Some(b"export X=\"1\"; make\n".to_vec()),
            ),
            (
                format!("{dir}/clusterrunner_console_output"),
                Some(b"building\n".to_vec()),
            ),
            (format!("{dir}/clusterrunner_exit_code"), None),
            (
                format!("{dir}/clusterrunner_time"),
                Some(b"1.25\n".to_vec()),
            ),
        ]
    }

    /// Expected members as (relative path, `/` suffix for dirs; content if checked).
    fn expected_members(with_failures: bool) -> Vec<(String, Option<Vec<u8>>)> {
        let mut out = atom_members("artifact_0_0");
        let a1 = "artifact_1_0";
        let mut a1_members = atom_members(a1);
        // Name-sorted, depth first: "a" < "a.txt" < "bin.dat" < "clusterrunner_*" < LONG_DIR ...
        let head = a1_members.remove(0);
        out.push(head);
        out.push((format!("{a1}/a/"), None));
        out.push((format!("{a1}/a/inner"), Some(b"inner".to_vec())));
        out.push((format!("{a1}/a.txt"), Some(b"a".to_vec())));
        out.push((format!("{a1}/{LONG_DIR}/"), None));
        out.push((format!("{a1}/{LONG_DIR}/file.txt"), Some(b"long".to_vec())));
        out.push((format!("{a1}/bin.dat"), Some(binary_content())));
        out.extend(a1_members);
        out.push((format!("{a1}/emptydir/"), None));
        out.push((format!("{a1}/out/"), None));
        out.push((format!("{a1}/out/empty"), Some(Vec::new())));
        out.push((format!("{a1}/out/nested/"), None));
        out.push((
            format!("{a1}/out/nested/report.txt"),
            Some(b"report\n".to_vec()),
        ));
        out.extend(atom_members("artifact_10_0"));
        if with_failures {
            out.push((
                FAILURES_NAME.to_owned(),
                Some(b"artifact_1_0\nartifact_10_0".to_vec()),
            ));
        }
        out
    }

    fn read_tar(path: &Path) -> Vec<(String, Vec<u8>)> {
        let file = File::open(path).expect("open tar");
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
        let mut out = Vec::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let name = String::from_utf8(entry.path_bytes().into_owned()).expect("utf8 name");
            let kind = entry.header().entry_type();
            assert!(
                kind == tar::EntryType::Regular || kind == tar::EntryType::Directory,
                "{name}: unexpected type {kind:?}"
            );
            assert_eq!(kind.is_dir(), name.ends_with('/'), "{name}");
            assert_eq!(entry.header().mtime().expect("mtime"), FIXED_MTIME);
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("read");
            out.push((name, data));
        }
        out
    }

    fn read_zip(path: &Path) -> Vec<(String, Vec<u8>)> {
        let file = File::open(path).expect("open zip");
        let mut archive = zip::ZipArchive::new(file).expect("zip");
        let mut out = Vec::new();
        for i in 0..archive.len() {
            let mut entry = archive.by_index(i).expect("entry");
            let name = String::from_utf8(entry.name_raw().to_vec()).expect("utf8 name");
            assert!(entry.is_file(), "{name}");
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("read");
            crate::zipstream::tests::assert_stored_iff_deflate_cannot_help(&entry, &data, &name);
            out.push((name, data));
        }
        out
    }

    fn check_archives(root: &Path, with_failures: bool) {
        let expected = expected_members(with_failures);

        let tar_members = read_tar(&root.join(TAR_GZ_NAME));
        let mut expected_tar_names = vec!["./".to_owned()];
        expected_tar_names.extend(expected.iter().map(|(n, _)| format!("./{n}")));
        let tar_names: Vec<&str> = tar_members.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(tar_names, expected_tar_names);
        for ((_, data), (name, want)) in tar_members[1..].iter().zip(&expected) {
            if let Some(want) = want {
                assert_eq!(data, want, "tar content of {name}");
            }
        }

        let zip_members = read_zip(&root.join(ZIP_NAME));
        let expected_files: Vec<&(String, Option<Vec<u8>>)> =
            expected.iter().filter(|(n, _)| !n.ends_with('/')).collect();
        let zip_names: Vec<&str> = zip_members.iter().map(|(n, _)| n.as_str()).collect();
        let expected_zip_names: Vec<&str> =
            expected_files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(zip_names, expected_zip_names);
        for ((_, data), (name, want)) in zip_members.iter().zip(expected_files) {
            if let Some(want) = want {
                assert_eq!(data, want, "zip content of {name}");
            }
        }
    }

    fn top_level_names(root: &Path) -> BTreeSet<String> {
        fs::read_dir(root)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }

    fn failures() -> Vec<String> {
        vec!["artifact_1_0".to_owned(), "artifact_10_0".to_owned()]
    }

    #[test]
    fn writes_exact_layout_with_failures() {
        let tmp = build_results_dir();
        let root = tmp.path();
        write_archives(root, &artifact_dirs(), &failures()).expect("archives");

        assert_eq!(
            fs::read(root.join(FAILURES_NAME)).expect("failures.txt"),
            b"artifact_1_0\nartifact_10_0"
        );
        check_archives(root, true);

        let mut expected_top: BTreeSet<String> = [
            ".attempts",
            "artifact_0_0",
            "artifact_1_0",
            "artifact_10_0",
            "job.timing.json",
            FAILURES_NAME,
            TAR_GZ_NAME,
            ZIP_NAME,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if cfg!(unix) {
            expected_top.insert("artifact_2_0".to_owned());
            expected_top.insert("artifact_3_0".to_owned());
        }
        // No temporary files left behind.
        assert_eq!(top_level_names(root), expected_top);
    }

    #[test]
    fn without_failures_there_is_no_failures_file() {
        let tmp = build_results_dir();
        let root = tmp.path();
        // A stale failures.txt from an earlier run must not survive.
        write(&root.join(FAILURES_NAME), b"artifact_0_0");
        write_archives(root, &artifact_dirs(), &[]).expect("archives");
        assert!(!root.join(FAILURES_NAME).exists());
        check_archives(root, false);
    }

    #[test]
    fn archives_are_reproducible() {
        let tmp = build_results_dir();
        let root = tmp.path();
        write_archives(root, &artifact_dirs(), &failures()).expect("first");
        let tar1 = fs::read(root.join(TAR_GZ_NAME)).expect("tar");
        let zip1 = fs::read(root.join(ZIP_NAME)).expect("zip");
        write_archives(root, &artifact_dirs(), &failures()).expect("second");
        // The second run sees the first run's archives in the directory and
        // must leave them out.
        assert_eq!(fs::read(root.join(TAR_GZ_NAME)).expect("tar"), tar1);
        assert_eq!(fs::read(root.join(ZIP_NAME)).expect("zip"), zip1);
        check_archives(root, true);
    }

    #[test]
    fn empty_results_dir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write_archives(tmp.path(), &[], &[]).expect("archives");
        let tar_members = read_tar(&tmp.path().join(TAR_GZ_NAME));
        assert_eq!(tar_members, vec![("./".to_owned(), Vec::new())]);
        assert!(read_zip(&tmp.path().join(ZIP_NAME)).is_empty());
    }

    #[test]
    fn rejects_bad_names() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            ZIP_NAME,
            FAILURES_NAME,
            ".tmp-x",
        ] {
            let err = write_archives(tmp.path(), &[bad.to_owned()], &[]).expect_err(bad);
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        let dup = vec!["artifact_0_0".to_owned(), "artifact_0_0".to_owned()];
        assert!(write_archives(tmp.path(), &dup, &[]).is_err());
        let err = write_archives(tmp.path(), &[], &["a\nb".to_owned()]).expect_err("newline");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        // Nothing was written for rejected input.
        assert!(top_level_names(tmp.path()).is_empty());
    }

    /// Names are checked while streaming: a bad one found after others were written still
    /// leaves the previous archives and failures.txt exactly as they were, and no scratch files.
    #[test]
    fn a_bad_name_late_in_the_stream_changes_nothing() {
        let tmp = build_results_dir();
        let root = tmp.path();
        write_archives(root, &artifact_dirs(), &failures()).expect("archives");
        let before: Vec<Vec<u8>> = [TAR_GZ_NAME, ZIP_NAME, FAILURES_NAME]
            .iter()
            .map(|n| fs::read(root.join(n)).expect("read"))
            .collect();
        let names_before = top_level_names(root);
        let mut dirs = artifact_dirs();
        dirs.push("../escape".to_owned());
        let err = write_archives(root, &dirs, &["artifact_0_0".to_owned()]).expect_err("bad");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let after: Vec<Vec<u8>> = [TAR_GZ_NAME, ZIP_NAME, FAILURES_NAME]
            .iter()
            .map(|n| fs::read(root.join(n)).expect("read"))
            .collect();
        assert!(before == after, "files changed by a rejected call");
        assert_eq!(top_level_names(root), names_before);
    }

    #[test]
    fn dir_names_and_sorting() {
        assert_eq!(artifact_dir_name(0, 0), "artifact_0_0");
        assert_eq!(artifact_dir_name(12, 3), "artifact_12_3");
        let mut names: Vec<String> = [
            "zzz",
            "artifact_10_0",
            "artifact_2_10",
            "artifact_2_9",
            "artifact_1_0",
            "artifact_x_0",
            "artifact_01_0",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        sort_artifact_dirs(&mut names);
        assert_eq!(
            names,
            [
                "artifact_01_0",
                "artifact_1_0",
                "artifact_2_9",
                "artifact_2_10",
                "artifact_10_0",
                "artifact_x_0",
                "zzz",
            ]
        );
    }

    /// A central directory too large for memory moves to an unlinked scratch file, whole.
    #[test]
    fn a_large_spill_moves_to_a_scratch_file_whole() {
        use std::io::Seek;
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut spill = Spill {
            dir: tmp.path().to_path_buf(),
            mem: io::Cursor::new(Vec::new()),
            file: None,
        };
        let data: Vec<u8> = (0..SPILL_IN_MEMORY as u32 + 300_000)
            .map(|i| (i % 251) as u8)
            .collect();
        for c in data.chunks(100_000) {
            spill.write_all(c).expect("write");
        }
        assert!(spill.file.is_some(), "still in memory");
        assert!(
            top_level_names(tmp.path()).is_empty(),
            "scratch file left a name"
        );
        spill.seek(io::SeekFrom::Start(0)).expect("seek");
        let mut back = Vec::new();
        spill.read_to_end(&mut back).expect("read");
        assert!(back == data, "spill changed the bytes");
    }

    /// The bytes do not depend on how the data reaches the compressor: chunks of any size
    /// give the same gzip stream.
    #[test]
    fn the_gzip_stream_depends_on_the_data_alone() {
        let data: Vec<u8> = (0..3u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 & 0x3f)
            .collect();
        let gz = |step: usize| {
            let enc = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::new(6));
            let mut w = FixedChunks::new(enc);
            for c in data.chunks(step) {
                w.write_all(c).unwrap();
            }
            w.finish().unwrap().finish().unwrap()
        };
        let whole = gz(data.len());
        for step in [1 << 10, 7_777, 300_001] {
            assert!(gz(step) == whole, "chunks of {step} changed the bytes");
        }
    }
}
