//! The master as the REST handlers see it: one trait with the calls they make, so handlers are
//! tested with `Router::oneshot` against an in-memory fake instead of a running master.
//!
//! [`GrpcMaster`] is the real one, over the tonic clients with the cluster secret attached.
//! Methods return boxed futures rather than `async fn` so the trait stays object-safe: the
//! state holds an `Arc<dyn Master>` and the router keeps one concrete type whatever the master.
//! Errors stay `tonic::Status`: every API maps them to HTTP through [`crate::ApiError`].
use ish_core::auth::SecretInterceptor;
use ish_core::proto;
use std::future::Future;
use std::pin::Pin;
use tokio_stream::Stream;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// What a master call returns.
pub type MasterFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send + 'a>>;
/// A streamed archive: chunks in order, or the status that ended the stream.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<proto::DataChunk, Status>> + Send>>;

/// The master calls the gateway's REST APIs make (a subset of `Builds` and `Cluster`).
pub trait Master: Send + Sync + 'static {
    /// `Builds.Submit`.
    fn submit(
        &self,
        req: proto::SubmitBuildRequest,
    ) -> MasterFuture<'_, proto::SubmitBuildResponse>;
    /// `Builds.Get`.
    fn get_build(&self, req: proto::GetBuildRequest) -> MasterFuture<'_, proto::Build>;
    /// `Builds.List`.
    fn list_builds(
        &self,
        req: proto::ListBuildsRequest,
    ) -> MasterFuture<'_, proto::ListBuildsResponse>;
    /// `Builds.Cancel`.
    fn cancel_build(&self, req: proto::CancelBuildRequest) -> MasterFuture<'_, proto::Build>;
    /// `Builds.ListSubjobs`.
    fn list_subjobs(
        &self,
        req: proto::ListSubjobsRequest,
    ) -> MasterFuture<'_, proto::ListSubjobsResponse>;
    /// `Builds.GetConsole`.
    fn get_console(&self, req: proto::GetConsoleRequest) -> MasterFuture<'_, proto::ConsolePage>;
    /// `Builds.DownloadArtifacts`: the call's own status (unknown build, no archive yet) comes
    /// before any chunk, as gRPC answers it.
    fn download_artifacts(
        &self,
        req: proto::DownloadArtifactsRequest,
    ) -> MasterFuture<'_, ChunkStream>;
    /// `Cluster.ListSlaves`.
    fn list_slaves(
        &self,
        req: proto::ListSlavesRequest,
    ) -> MasterFuture<'_, proto::ListSlavesResponse>;
    /// `Cluster.DrainSlaves`.
    fn drain_slaves(
        &self,
        req: proto::DrainSlavesRequest,
    ) -> MasterFuture<'_, proto::DrainSlavesResponse>;
    /// `Cluster.ListEvents`.
    fn list_events(
        &self,
        req: proto::ListEventsRequest,
    ) -> MasterFuture<'_, proto::ListEventsResponse>;
    /// `Cluster.Metrics`: the master's Prometheus text.
    fn metrics(&self, req: proto::MetricsRequest) -> MasterFuture<'_, proto::MetricsResponse>;
}

/// gRPC client of the master's build service, with the cluster secret attached.
pub type BuildsClient =
    proto::builds_client::BuildsClient<InterceptedService<Channel, SecretInterceptor>>;
/// gRPC client of the master's cluster service, with the cluster secret attached.
pub type ClusterClient =
    proto::cluster_client::ClusterClient<InterceptedService<Channel, SecretInterceptor>>;

/// The real master, over one lazy gRPC channel.
#[derive(Debug, Clone)]
pub struct GrpcMaster {
    builds: BuildsClient,
    cluster: ClusterClient,
}

impl GrpcMaster {
    /// Clients over `channel` presenting `auth`, accepting messages up to `max_message_bytes`
    /// (a build list with many failed atoms is large).
    pub fn new(channel: Channel, auth: SecretInterceptor, max_message_bytes: usize) -> Self {
        Self {
            builds: proto::builds_client::BuildsClient::with_interceptor(
                channel.clone(),
                auth.clone(),
            )
            .max_decoding_message_size(max_message_bytes),
            cluster: proto::cluster_client::ClusterClient::with_interceptor(channel, auth)
                .max_decoding_message_size(max_message_bytes),
        }
    }
}

/// One unary call on a clone of the client (tonic clients are cheap handles to one channel and
/// need `&mut self`).
macro_rules! unary {
    ($self:ident . $client:ident . $rpc:ident ($req:ident)) => {{
        let mut c = $self.$client.clone();
        Box::pin(async move { Ok(c.$rpc($req).await?.into_inner()) })
    }};
}

impl Master for GrpcMaster {
    fn submit(
        &self,
        req: proto::SubmitBuildRequest,
    ) -> MasterFuture<'_, proto::SubmitBuildResponse> {
        unary!(self.builds.submit(req))
    }
    fn get_build(&self, req: proto::GetBuildRequest) -> MasterFuture<'_, proto::Build> {
        unary!(self.builds.get(req))
    }
    fn list_builds(
        &self,
        req: proto::ListBuildsRequest,
    ) -> MasterFuture<'_, proto::ListBuildsResponse> {
        unary!(self.builds.list(req))
    }
    fn cancel_build(&self, req: proto::CancelBuildRequest) -> MasterFuture<'_, proto::Build> {
        unary!(self.builds.cancel(req))
    }
    fn list_subjobs(
        &self,
        req: proto::ListSubjobsRequest,
    ) -> MasterFuture<'_, proto::ListSubjobsResponse> {
        unary!(self.builds.list_subjobs(req))
    }
    fn get_console(&self, req: proto::GetConsoleRequest) -> MasterFuture<'_, proto::ConsolePage> {
        unary!(self.builds.get_console(req))
    }
    fn download_artifacts(
        &self,
        req: proto::DownloadArtifactsRequest,
    ) -> MasterFuture<'_, ChunkStream> {
        let mut c = self.builds.clone();
        Box::pin(async move {
            let s = c.download_artifacts(req).await?.into_inner();
            Ok(Box::pin(s) as ChunkStream)
        })
    }
    fn list_slaves(
        &self,
        req: proto::ListSlavesRequest,
    ) -> MasterFuture<'_, proto::ListSlavesResponse> {
        unary!(self.cluster.list_slaves(req))
    }
    fn drain_slaves(
        &self,
        req: proto::DrainSlavesRequest,
    ) -> MasterFuture<'_, proto::DrainSlavesResponse> {
        unary!(self.cluster.drain_slaves(req))
    }
    fn list_events(
        &self,
        req: proto::ListEventsRequest,
    ) -> MasterFuture<'_, proto::ListEventsResponse> {
        unary!(self.cluster.list_events(req))
    }
    fn metrics(&self, req: proto::MetricsRequest) -> MasterFuture<'_, proto::MetricsResponse> {
        unary!(self.cluster.metrics(req))
    }
}
