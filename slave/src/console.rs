//! An atom's console on the slave, kept bounded whatever the atom prints: in memory while it is
//! small, on disk past that.
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// Consoles up to this size stay in memory and make no file.
pub(crate) const IN_MEMORY_CONSOLE: usize = 64 << 10;

/// An atom's finished console.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Console {
    /// It printed nothing.
    Empty,
    /// Small: its bytes.
    Memory(Vec<u8>),
    /// On disk at this path (past [`IN_MEMORY_CONSOLE`], or cut).
    File(PathBuf),
}

impl Console {
    /// Adds a note at the end (a note may be all an atom printed).
    pub(crate) async fn append(&mut self, note: &[u8]) {
        match self {
            Console::Empty => *self = Console::Memory(note.to_vec()),
            Console::Memory(m) => m.extend_from_slice(note),
            Console::File(p) => crate::artifacts::append_console(p, note).await,
        }
    }
}

/// An atom's console on the slave's disk, bounded: it is written in two segment files of `cap / 2`
/// bytes used in turn, so past `cap` bytes only the last `cap / 2` to `cap` bytes are kept;
/// `finish` writes them (after a note saying how much was cut) to the console file.
pub(crate) struct ConsoleTail {
    pub(crate) path: PathBuf,
    pub(crate) cap: u64,
    /// What was printed, while it is small and nothing went to disk.
    pub(crate) memory: Option<Vec<u8>>,
    pub(crate) segs: [PathBuf; 2],
    pub(crate) file: Option<tokio::fs::File>,
    pub(crate) live: usize,
    pub(crate) live_len: u64,
    pub(crate) total: u64,
    pub(crate) rotated: bool,
}

impl ConsoleTail {
    pub(crate) fn new(path: &Path, cap: u64) -> Self {
        let seg = |i: u32| path.with_extension(format!("seg{i}"));
        Self {
            path: path.to_path_buf(),
            cap: cap.max(2),
            memory: Some(Vec::new()),
            segs: [seg(0), seg(1)],
            file: None,
            live: 0,
            live_len: 0,
            total: 0,
            rotated: false,
        }
    }

    /// True once more than `cap` bytes were written.
    pub(crate) fn cut(&self) -> bool {
        self.total > self.cap
    }

    pub(crate) async fn write(&mut self, data: &[u8]) {
        let half = self.cap / 2;
        if let Some(m) = self.memory.as_mut() {
            let limit = (IN_MEMORY_CONSOLE as u64).min(half);
            if (m.len() + data.len()) as u64 <= limit {
                m.extend_from_slice(data);
                self.total += data.len() as u64;
                return;
            }
            // Too large for memory: what was kept goes to disk first, in order (counted once).
            let kept = self.memory.take().unwrap_or_default();
            self.total -= kept.len() as u64;
            self.write_to_disk(&kept).await;
        }
        self.write_to_disk(data).await;
    }

    async fn write_to_disk(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        let half = self.cap / 2;
        while !data.is_empty() {
            if self.live_len >= half {
                // The other segment is older than anything in this one: reuse it.
                self.live = 1 - self.live;
                self.live_len = 0;
                self.file = None;
                self.rotated = true;
            }
            if self.file.is_none() {
                if !self.rotated
                    && let Some(parent) = self.path.parent()
                {
                    let _ = tokio::fs::create_dir_all(parent).await;
                }
                self.file = tokio::fs::File::create(&self.segs[self.live]).await.ok();
            }
            let n = data.len().min((half - self.live_len) as usize);
            if let Some(f) = self.file.as_mut()
                && f.write_all(&data[..n]).await.is_err()
            {
                self.file = None;
            }
            self.live_len += n as u64;
            data = &data[n..];
        }
    }

    /// The finished console: its bytes when it stayed small, else its file (written with a note
    /// saying how much was cut, if any).
    pub(crate) async fn finish(mut self) -> Console {
        if let Some(m) = self.memory.take() {
            return if m.is_empty() {
                Console::Empty
            } else {
                Console::Memory(m)
            };
        }
        if let Some(mut f) = self.file.take() {
            let _ = f.flush().await;
        }
        let result: std::io::Result<()> = async {
            if !self.rotated {
                // No output, no file: nothing to create (or upload) for a silent atom.
                match tokio::fs::rename(&self.segs[self.live], &self.path).await {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    other => other,
                }
            } else {
                // Streamed, not read into memory: a tail can be tens of megabytes.
                let mut parts = Vec::new();
                if self.rotated {
                    parts.push(&self.segs[1 - self.live]);
                }
                parts.push(&self.segs[self.live]);
                let mut kept = 0;
                for p in &parts {
                    kept += tokio::fs::metadata(p).await.map(|m| m.len()).unwrap_or(0);
                }
                let mut out = tokio::fs::File::create(&self.path).await?;
                if kept < self.total {
                    let note = format!(
                        "[ish] console output cut: the first {} of {} bytes were dropped (max_console_bytes_per_atom)\n",
                        self.total - kept,
                        self.total
                    );
                    out.write_all(note.as_bytes()).await?;
                }
                for p in parts {
                    if let Ok(mut f) = tokio::fs::File::open(p).await {
                        tokio::io::copy(&mut f, &mut out).await?;
                    }
                }
                out.flush().await
            }
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not write an atom's console file");
        }
        for seg in &self.segs {
            let _ = tokio::fs::remove_file(seg).await;
        }
        Console::File(self.path.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// A small console makes no file at all: its bytes stay in memory.
    #[tokio::test]
    async fn a_small_console_stays_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consoles").join("7_artifact_0_0");
        let mut t = ConsoleTail::new(&path, 50 << 20);
        t.write(b"hello ").await;
        t.write(b"world\n").await;
        assert_eq!(t.finish().await, Console::Memory(b"hello world\n".to_vec()));
        assert!(
            !dir.path().join("consoles").exists(),
            "no directory, no file"
        );
        let silent = ConsoleTail::new(&path, 50 << 20);
        assert_eq!(silent.finish().await, Console::Empty);
    }

    /// Past the in-memory size the console goes to disk, whole and in order, and the segments
    /// are gone after.
    #[tokio::test]
    async fn a_large_console_goes_to_disk_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consoles").join("7_artifact_0_0");
        let mut t = ConsoleTail::new(&path, 50 << 20);
        let mut want = Vec::new();
        for i in 0..2000 {
            let line = format!("line {i} {}\n", "x".repeat(40));
            want.extend_from_slice(line.as_bytes());
            t.write(line.as_bytes()).await;
        }
        assert!(want.len() > IN_MEMORY_CONSOLE);
        assert_eq!(t.finish().await, Console::File(path.clone()));
        assert_eq!(std::fs::read(&path).unwrap(), want);
        assert_eq!(files_in(&dir.path().join("consoles")), ["7_artifact_0_0"]);
    }

    /// A cap below the in-memory size still keeps only the tail, with the note.
    #[tokio::test]
    async fn a_small_cap_keeps_the_tail_with_a_note() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let mut t = ConsoleTail::new(&path, 1000);
        for i in 0..150 {
            t.write(format!("{i:09}\n").as_bytes()).await;
        }
        assert!(t.cut());
        assert_eq!(t.finish().await, Console::File(path.clone()));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("[ish] console output cut: the first 500 of 1500 bytes were dropped"),
            "{text}"
        );
        assert!(text.ends_with("000000149\n"), "{text}");
        assert!(text.len() <= 1000 + 120, "{}", text.len());
    }

    #[tokio::test]
    async fn notes_are_added_to_any_console() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Console::Empty;
        c.append(b"note\n").await;
        assert_eq!(c, Console::Memory(b"note\n".to_vec()));
        c.append(b"more\n").await;
        assert_eq!(c, Console::Memory(b"note\nmore\n".to_vec()));
        let p = dir.path().join("f");
        std::fs::write(&p, b"a\n").unwrap();
        let mut f = Console::File(p.clone());
        f.append(b"b\n").await;
        assert_eq!(std::fs::read(&p).unwrap(), b"a\nb\n");
    }
}
