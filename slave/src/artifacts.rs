//! An atom's artifacts: the `$ARTIFACT_DIR`s handed out and the files found in one (their
//! upload is `link.rs`'s).
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use tokio::io::AsyncWriteExt;

/// Name of an atom's console file in its results.
pub const CONSOLE_FILE: &str = "clusterrunner_console_output";

/// Name of the first file of every artifact upload: the names and sizes of the files that follow,
/// so the master can leave out a file the upload cut short. The same name is in
/// `ish_master::results::UPLOAD_MANIFEST`; an atom's own file of that name is left out.
pub const UPLOAD_MANIFEST: &str = ".ish-upload-manifest";

/// Empty directories handed out as `$ARTIFACT_DIR`, taken back while still empty: most atoms
/// write no artifact, and creating and deleting a directory per atom was a large share of a
/// trivial atom's cost (ext4 inode allocation, seen with perf).
#[derive(Debug)]
pub(crate) struct DirPool {
    pub(crate) root: PathBuf,
    pub(crate) free: Mutex<Vec<PathBuf>>,
    pub(crate) next: std::sync::atomic::AtomicU64,
}

impl DirPool {
    pub(crate) async fn take(&self) -> PathBuf {
        if let Some(d) = self.free.lock().expect("poisoned").pop() {
            return d;
        }
        let d = self
            .root
            .join(self.next.fetch_add(1, Ordering::SeqCst).to_string());
        if let Err(e) = tokio::fs::create_dir_all(&d).await {
            tracing::error!(error = %e, dir = %d.display(), "cannot create ARTIFACT_DIR");
        }
        d
    }

    /// Keeps an empty directory for the next atom; deletes one with files (already uploaded).
    pub(crate) async fn give(&self, d: PathBuf) {
        if dir_is_empty(&d).await {
            self.free.lock().expect("poisoned").push(d);
        } else {
            let _ = tokio::fs::remove_dir_all(&d).await;
        }
    }
}

pub(crate) async fn dir_is_empty(d: &Path) -> bool {
    match tokio::fs::read_dir(d).await {
        Ok(mut rd) => matches!(rd.next_entry().await, Ok(None)),
        Err(_) => false,
    }
}

/// One file an atom left in `$ARTIFACT_DIR`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ArtifactFile {
    /// Name in the results (relative to `$ARTIFACT_DIR`, `/`-separated, UTF-8).
    pub(crate) name: String,
    /// Where it is.
    pub(crate) path: PathBuf,
    /// Its size when the atom ended.
    pub(crate) size: u64,
}

/// An atom's artifacts and the console notes about them.
#[derive(Debug, Default)]
pub(crate) struct ArtifactListing {
    pub(crate) files: Vec<ArtifactFile>,
    pub(crate) notes: Vec<String>,
}

/// Appends `data` to an atom's console file (creating it: a note may be all an atom printed).
pub(crate) async fn append_console(path: &Path, data: &[u8]) {
    let res = async {
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        f.write_all(data).await?;
        f.flush().await
    }
    .await;
    if let Err(e) = res {
        tracing::warn!(error = %e, "could not add a note to an atom's console");
    }
}

/// A relative path as a name for the results. Names travel as protobuf strings (UTF-8), so a
/// name that is not UTF-8 keeps its valid parts and has each invalid byte written `%XX`: the
/// file is kept and its name stays recognizable; `None` when it already was UTF-8.
pub(crate) fn escaped_name(rel: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = rel.as_os_str().as_bytes();
    if std::str::from_utf8(bytes).is_ok() {
        return None;
    }
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Some(out)
}

/// Regular files under `dir` (symlinks are not followed and not uploaded), as paths relative to
/// `dir`, sorted by name. A name that is not UTF-8 is escaped (see [`escaped_name`]) with a note;
/// when its escaped form is another file's name, or it is the upload manifest's reserved name, it
/// is left out with a note.
pub(crate) fn artifact_files(dir: &Path) -> ArtifactListing {
    let mut plain = Vec::new();
    let mut escaped = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let p = e.path();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file()
                && let Ok(rel) = p.strip_prefix(dir)
            {
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                match (rel.to_str(), escaped_name(rel)) {
                    (Some(name), _) => plain.push(ArtifactFile {
                        name: name.to_string(),
                        path: p,
                        size,
                    }),
                    (None, Some(name)) => escaped.push((
                        ArtifactFile {
                            name,
                            path: p.clone(),
                            size,
                        },
                        rel.to_string_lossy().into_owned(),
                    )),
                    (None, None) => {}
                }
            }
        }
    }
    let mut notes = Vec::new();
    if let Some(i) = plain.iter().position(|f| f.name == UPLOAD_MANIFEST) {
        plain.remove(i);
        notes.push(format!(
            "[ish] artifact {} left out of the results: the name is reserved for Ish CD's upload manifest\n",
            UPLOAD_MANIFEST
        ));
    }
    let mut taken: std::collections::HashSet<String> =
        plain.iter().map(|f| f.name.clone()).collect();
    escaped.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    for (f, lossy) in escaped {
        if f.name == UPLOAD_MANIFEST || !taken.insert(f.name.clone()) {
            notes.push(format!(
                "[ish] artifact {lossy:?} left out of the results: its name is not UTF-8 and its escaped form {:?} is another file's name\n",
                f.name
            ));
        } else {
            notes.push(format!(
                "[ish] artifact {lossy:?}: its name is not UTF-8; it is in the results as {:?} (each invalid byte written %XX)\n",
                f.name
            ));
            plain.push(f);
        }
    }
    plain.sort_by(|a, b| a.name.cmp(&b.name));
    ArtifactListing {
        files: plain,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn names_that_are_not_utf8_are_kept_escaped_and_noted() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("ok.txt"), b"1").unwrap();
        std::fs::write(d.join(std::ffi::OsStr::from_bytes(b"a\xffb")), b"22").unwrap();
        std::fs::write(
            d.join("sub").join(std::ffi::OsStr::from_bytes(b"\xc0x")),
            b"333",
        )
        .unwrap();
        // Its escaped form is taken by a real file: left out, not merged with it.
        std::fs::write(d.join("c%FE"), b"4").unwrap();
        std::fs::write(d.join(std::ffi::OsStr::from_bytes(b"c\xfe")), b"5").unwrap();
        std::fs::write(d.join(UPLOAD_MANIFEST), b"mine").unwrap();
        let l = artifact_files(d);
        let got: Vec<(&str, u64)> = l.files.iter().map(|f| (f.name.as_str(), f.size)).collect();
        assert_eq!(
            got,
            [("a%FFb", 2), ("c%FE", 1), ("ok.txt", 1), ("sub/%C0x", 3)]
        );
        assert_eq!(l.notes.len(), 4, "{:?}", l.notes);
        let notes = l.notes.concat();
        assert!(notes.contains("in the results as \"a%FFb\""), "{notes}");
        assert!(notes.contains("in the results as \"sub/%C0x\""), "{notes}");
        assert!(
            notes.contains(
                "left out of the results: its name is not UTF-8 and its escaped form \"c%FE\""
            ),
            "{notes}"
        );
        assert!(notes.contains(".ish-upload-manifest left out"), "{notes}");
    }

    #[test]
    fn utf8_names_are_not_escaped() {
        assert_eq!(escaped_name(Path::new("dir/naïve %41.txt")), None);
        assert_eq!(
            escaped_name(Path::new(std::ffi::OsStr::from_bytes(b"x/\xe2\x82y"))),
            Some("x/%E2%82y".into())
        );
    }
}
