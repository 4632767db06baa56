//! An atom's console on the slave's disk, kept bounded whatever the atom prints.
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// An atom's console on the slave's disk, bounded: it is written in two segment files of `cap / 2`
/// bytes used in turn, so past `cap` bytes only the last `cap / 2` to `cap` bytes are kept;
/// `finish` writes them (after a note saying how much was cut) to the console file.
pub(crate) struct ConsoleTail {
    pub(crate) path: PathBuf,
    pub(crate) cap: u64,
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

    pub(crate) async fn write(&mut self, mut data: &[u8]) {
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

    /// Writes the console file; true when output was cut.
    pub(crate) async fn finish(mut self) -> bool {
        if let Some(mut f) = self.file.take() {
            let _ = f.flush().await;
        }
        let cut = self.cut();
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
        cut
    }
}
