//! `ish build` over gRPC to a master: progress from the `Watch` stream, results from
//! `DownloadArtifacts`.
use super::api::{BuildApi, BuildView, FailedAtom};
use crate::local::BuildsClient;
use anyhow::bail;
use ish_core::proto;
use tokio_stream::StreamExt;

/// A master's Builds service.
pub(crate) struct GrpcApi {
    builds: BuildsClient,
    url: String,
    watch: Option<tonic::Streaming<proto::BuildUpdate>>,
}

impl GrpcApi {
    /// The builds service at `url`, already connected.
    pub fn new(builds: BuildsClient, url: &str) -> Self {
        Self {
            builds,
            url: url.to_string(),
            watch: None,
        }
    }
}

fn view(b: &proto::Build) -> BuildView {
    let mut detail = String::new();
    if b.num_subjobs > 0 {
        detail = format!(
            "{}/{} subjobs  {}/{} atoms",
            b.completed_subjobs, b.num_subjobs, b.completed_atoms, b.num_atoms
        );
    }
    if b.failed_atom_count > 0 {
        detail += &format!("  {} failed", b.failed_atom_count);
    }
    BuildView {
        id: b.id,
        state: proto::BuildState::try_from(b.state).unwrap_or_default(),
        passed: b.result == proto::BuildResult::NoFailures as i32,
        detail: detail.trim_start().to_string(),
        num_atoms: Some(u64::from(b.num_atoms)),
        failed: b
            .failed_atoms
            .iter()
            .map(|a| FailedAtom {
                subjob: u64::from(a.subjob_id),
                atom: u64::from(a.id),
                exit: a.exit_code.unwrap_or_default().to_string(),
                command: a.command_string.clone(),
            })
            .collect(),
        error: b.error_message.clone(),
    }
}

impl BuildApi for GrpcApi {
    fn target(&self) -> &str {
        &self.url
    }

    async fn submit(&mut self, req: &proto::BuildRequest) -> anyhow::Result<u64> {
        Ok(self
            .builds
            .submit(proto::SubmitBuildRequest {
                request: Some(req.clone()),
            })
            .await
            .map_err(|s| anyhow::anyhow!("the master refused the build: {}", s.message()))?
            .into_inner()
            .build_id)
    }

    async fn next_state(&mut self, id: u64) -> anyhow::Result<BuildView> {
        if self.watch.is_none() {
            let stream = self
                .builds
                .watch(proto::WatchBuildRequest { build_id: id })
                .await
                .map_err(|s| anyhow::anyhow!("watching build {id}: {}", s.message()))?
                .into_inner();
            self.watch = Some(stream);
        }
        let Some(stream) = self.watch.as_mut() else {
            bail!("no progress stream");
        };
        match stream.next().await {
            Some(Ok(u)) => Ok(view(&u.build.unwrap_or_default())),
            Some(Err(s)) => bail!("lost the build's progress stream: {}", s.message()),
            None => bail!("the master ended the progress stream before the build ended"),
        }
    }

    async fn cancel(&mut self, id: u64) -> anyhow::Result<()> {
        self.builds
            .cancel(proto::CancelBuildRequest { build_id: id })
            .await
            .map_err(|s| anyhow::anyhow!("canceling build {id}: {}", s.message()))?;
        Ok(())
    }

    async fn results_zip(&mut self, id: u64) -> anyhow::Result<Vec<u8>> {
        let mut stream = self
            .builds
            .download_artifacts(proto::DownloadArtifactsRequest {
                build_id: id,
                format: proto::ArchiveFormat::Zip as i32,
                offset: 0,
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow::anyhow!("downloading results: {}", s.message()))?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|s| anyhow::anyhow!("downloading results: {}", s.message()))?;
            bytes.extend_from_slice(&chunk.data);
        }
        Ok(bytes)
    }
}
