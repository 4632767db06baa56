//! What the worker calls on the master directly, besides the messages of its outbox.
//!
//! Messages to the master (AtomStarted, console, AtomResult, …) go through the worker's ordered
//! outbox, a channel the session drains, and messages from it arrive through
//! `Worker::handle`; both are plain values, so tests drive them directly. The
//! one call that is not a message is the UploadArtifacts RPC: it is behind [`MasterLink`], so a
//! worker test sees what would be uploaded without a network.
use crate::runner::BoxFuture;
use ish_core::auth::SecretInterceptor;
use ish_core::proto;
use std::path::PathBuf;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The gRPC client of the slave link, with the cluster secret attached.
pub type LinkClient =
    proto::slave_link_client::SlaveLinkClient<InterceptedService<Channel, SecretInterceptor>>;

/// Bytes per upload message.
const UPLOAD_CHUNK: usize = 256 * 1024;

/// One file of an upload: its name in the results and where its bytes are.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadFile {
    /// Relative name in the atom's results.
    pub name: String,
    /// Its bytes.
    pub source: UploadSource,
}

/// Where an uploaded file's bytes are.
#[derive(Debug, Clone, PartialEq)]
pub enum UploadSource {
    /// A file on the slave's disk (an artifact, a large console).
    Path(PathBuf),
    /// In memory: a small console, the manifest. No file is made for them (every file made and
    /// deleted per atom costs an inode allocation, a millisecond on a busy ext4).
    Bytes(Vec<u8>),
}

/// The master, as the worker's uploads see it (one per session).
pub trait MasterLink: Send + Sync + std::fmt::Debug {
    /// Uploads `files` for the attempt in `header`; resolves to the number of files sent, or
    /// the master's status (the worker decides from its code whether to retry, give up on the
    /// attempt or record the atom as failed).
    fn upload_artifacts(
        &self,
        header: proto::UploadHeader,
        files: Vec<UploadFile>,
    ) -> BoxFuture<Result<u32, tonic::Status>>;
}

/// The real link: the session's gRPC client.
#[derive(Debug, Clone)]
pub struct GrpcLink(pub LinkClient);

impl MasterLink for GrpcLink {
    fn upload_artifacts(
        &self,
        header: proto::UploadHeader,
        files: Vec<UploadFile>,
    ) -> BoxFuture<Result<u32, tonic::Status>> {
        Box::pin(upload(self.0.clone(), header, files))
    }
}

/// One upload of `files` for the attempt in `header`.
async fn upload(
    mut link: LinkClient,
    header: proto::UploadHeader,
    files: Vec<UploadFile>,
) -> Result<u32, tonic::Status> {
    use proto::artifact_chunk::Msg;
    let n = files.len() as u32;
    let (tx, rx) = mpsc::channel(4);
    let producer = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let send = |m: Msg| proto::ArtifactChunk { msg: Some(m) };
        if tx.send(send(Msg::Header(header))).await.is_err() {
            return Ok(());
        }
        for UploadFile { name: rel, source } in files {
            let path = match source {
                UploadSource::Bytes(data) => {
                    // One message: small by construction.
                    let whole = proto::FileChunk {
                        path: rel,
                        data,
                        last: true,
                    };
                    if tx.send(send(Msg::File(whole))).await.is_err() {
                        return Ok(());
                    }
                    continue;
                }
                UploadSource::Path(path) => path,
            };
            let mut f = tokio::fs::File::open(&path)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            let mut sent_any = false;
            loop {
                let k = f
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                if k == 0 {
                    if !sent_any {
                        let last = proto::FileChunk {
                            path: rel.clone(),
                            data: Vec::new(),
                            last: true,
                        };
                        if tx.send(send(Msg::File(last))).await.is_err() {
                            return Ok(());
                        }
                    }
                    break;
                }
                sent_any = true;
                let chunk = proto::FileChunk {
                    path: rel.clone(),
                    data: buf[..k].to_vec(),
                    last: false,
                };
                if tx.send(send(Msg::File(chunk))).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok::<(), String>(())
    });
    let res = link.upload_artifacts(ReceiverStream::new(rx)).await;
    match producer.await {
        Ok(Err(e)) => return Err(tonic::Status::data_loss(format!("reading artifacts: {e}"))),
        Err(e) => return Err(tonic::Status::internal(e.to_string())),
        Ok(Ok(())) => {}
    }
    res?;
    Ok(n)
}
