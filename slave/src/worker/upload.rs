//! An atom's upload to the master: wait for a session, retry an interrupted one, tell a refused
//! one apart from an attempt the master dropped.
use super::{Uploaded, Worker};
use crate::artifacts::{ArtifactFile, CONSOLE_FILE, UPLOAD_MANIFEST};
use crate::console::Console;
use crate::link::{UploadFile, UploadSource};
use ish_core::proto::{self, slave_message::Msg as Up};
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
        artifacts: Vec<ArtifactFile>,
        console: &Console,
        cancel: &CancellationToken,
    ) -> Option<Uploaded> {
        let mut sizes: Vec<(String, u64)> =
            artifacts.iter().map(|f| (f.name.clone(), f.size)).collect();
        let mut files: Vec<UploadFile> = artifacts
            .into_iter()
            .map(|f| UploadFile {
                name: f.name,
                source: UploadSource::Path(f.path),
            })
            .collect();
        let console = match console {
            Console::Empty => None,
            Console::Memory(bytes) => {
                Some((bytes.len() as u64, UploadSource::Bytes(bytes.clone())))
            }
            Console::File(path) => {
                let size = tokio::fs::metadata(path)
                    .await
                    .map(|m| m.len())
                    .unwrap_or(0);
                Some((size, UploadSource::Path(path.clone())))
            }
        };
        if let Some((size, source)) = console {
            sizes.push((CONSOLE_FILE.to_string(), size));
            files.push(UploadFile {
                name: CONSOLE_FILE.to_string(),
                source,
            });
        }
        if files.is_empty() {
            return Some(Uploaded::Files(0));
        }
        let count = files.len() as u32;
        let manifest = serde_json::to_vec(&sizes).expect("names and sizes serialize");
        files.insert(
            0,
            UploadFile {
                name: UPLOAD_MANIFEST.to_string(),
                source: UploadSource::Bytes(manifest),
            },
        );
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
