//! An atom's upload to the master: wait for a session, retry an interrupted one, tell a refused
//! one apart from an attempt the master dropped.
use super::{Uploaded, Worker};
use crate::artifacts::{ArtifactFile, CONSOLE_FILE, UPLOAD_MANIFEST};
use ish_core::proto::{self, slave_message::Msg as Up};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

impl Worker {
    /// Uploads an atom's files, waiting for a session when there is none and retrying when one
    /// fails. `None` when the master refused the attempt (it was dropped) or the attempt was
    /// canceled; an upload the master cannot store (over a limit, disk full) is reported in the
    /// console, not retried, and makes the atom a failure.
    ///
    /// A manifest of every file and its size goes first, so that the master can tell a file an
    /// interrupted or refused upload cut short from a whole one and leave it out of the results.
    pub(super) async fn upload_with_retry(
        &self,
        mut header: proto::UploadHeader,
        mut files: Vec<ArtifactFile>,
        console: Option<&Path>,
        manifest_path: &Path,
        cancel: &CancellationToken,
    ) -> Option<Uploaded> {
        if let Some(c) = console {
            let size = tokio::fs::metadata(c).await.map(|m| m.len()).unwrap_or(0);
            files.push(ArtifactFile {
                name: CONSOLE_FILE.to_string(),
                path: c.to_path_buf(),
                size,
            });
        }
        if files.is_empty() {
            return Some(Uploaded::Files(0));
        }
        let count = files.len() as u32;
        let manifest: Vec<(&str, u64)> = files.iter().map(|f| (f.name.as_str(), f.size)).collect();
        let manifest = serde_json::to_vec(&manifest).expect("names and sizes serialize");
        let mut files: Vec<(String, PathBuf)> =
            files.into_iter().map(|f| (f.name, f.path)).collect();
        match tokio::fs::write(manifest_path, manifest).await {
            Ok(()) => files.insert(
                0,
                (UPLOAD_MANIFEST.to_string(), manifest_path.to_path_buf()),
            ),
            // Without it the upload still works; only a cut file could not be told apart.
            Err(e) => tracing::warn!(error = %e, "could not write an upload manifest"),
        }
        let mut live_rx = self.live.subscribe();
        loop {
            let live = loop {
                if let Some(l) = live_rx.borrow_and_update().clone() {
                    break l;
                }
                tokio::select! {
                    r = live_rx.changed() => if r.is_err() { return None },
                    _ = cancel.cancelled() => return None,
                }
            };
            header.slave_id = live.slave_id;
            match live.link.upload_artifacts(header, files.clone()).await {
                Ok(_) => return Some(Uploaded::Files(count)),
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    tracing::info!(
                        attempt = header.attempt,
                        "the master no longer wants this attempt's upload"
                    );
                    return None;
                }
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) =>
                {
                    tracing::warn!(attempt = header.attempt, error = %s.message(), "upload interrupted; retrying in the next session");
                    // Wait for another session (or this one to be declared gone).
                    tokio::select! {
                        r = live_rx.changed() => if r.is_err() { return None },
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
                Err(s) => {
                    tracing::warn!(attempt = header.attempt, error = %s.message(), "artifact upload refused");
                    let note = format!(
                        "\n[ish] artifact upload refused: {}; the atom is recorded as failed\n",
                        s.message()
                    );
                    // The master keeps the streamed console when no uploaded one arrives.
                    self.send(Up::Console(proto::ConsoleChunk {
                        build_id: header.build_id,
                        subjob_id: header.subjob_id,
                        atom_id: header.atom_id,
                        attempt: header.attempt,
                        data: note.into_bytes(),
                    }))
                    .await;
                    return Some(Uploaded::Refused);
                }
            }
        }
    }
}
