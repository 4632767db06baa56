//! A whole cluster in one process: master + gateway + N slaves on 127.0.0.1.
//!
//! Every role runs exactly as it does in its own process (same `serve`/`run` functions, real gRPC
//! over real sockets); only the process boundary is missing. Tests use it for in-process cluster
//! runs: `kill_slave` aborts a slave's task (its stream ends abruptly, like kill -9),
//! `stop_slave` shuts it down cleanly.
use anyhow::{Context, anyhow};
use ish_core::auth::SecretInterceptor;
use ish_core::proto;
use ish_master::MasterConfig;
use ish_slave::SlaveConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// gRPC clients of a master, with the secret attached.
pub type BuildsClient =
    proto::builds_client::BuildsClient<InterceptedService<Channel, SecretInterceptor>>;
/// gRPC cluster client.
pub type ClusterClient =
    proto::cluster_client::ClusterClient<InterceptedService<Channel, SecretInterceptor>>;

/// Connects to a master (waiting up to `timeout` for it to accept connections).
pub async fn connect(
    url: &str,
    secret: &str,
    timeout: Duration,
) -> anyhow::Result<(BuildsClient, ClusterClient)> {
    let auth = SecretInterceptor::new(secret)?;
    let endpoint = Channel::from_shared(url.to_string())
        .with_context(|| format!("invalid master URL {url:?}"))?
        .connect_timeout(Duration::from_secs(2));
    let deadline = tokio::time::Instant::now() + timeout;
    let channel = loop {
        match endpoint.connect().await {
            Ok(c) => break c,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(anyhow!("cannot reach the master at {url}: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    Ok((
        proto::builds_client::BuildsClient::with_interceptor(channel.clone(), auth.clone())
            .max_decoding_message_size(ish_core::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ish_core::MAX_MESSAGE_BYTES),
        proto::cluster_client::ClusterClient::with_interceptor(channel, auth)
            .max_decoding_message_size(ish_core::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ish_core::MAX_MESSAGE_BYTES),
    ))
}

/// Settings of `ish local` (`conf/local.toml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// Number of slaves. Default 2.
    pub slaves: u32,
    /// Executors per slave. Default 2.
    pub executors: u32,
    /// Data directory. Default `~/.ish/local`.
    pub data_dir: PathBuf,
    /// Master gRPC listen address. Default `127.0.0.1:43100`.
    pub master_listen: String,
    /// Gateway listen address. Default `127.0.0.1:43000`.
    pub gateway_listen: String,
    /// Cluster secret. Default: generated for this run and printed.
    pub secret: Option<String>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            slaves: 2,
            executors: 2,
            data_dir: ish_master::config::default_home().join("local"),
            master_listen: "127.0.0.1:43100".into(),
            gateway_listen: "127.0.0.1:43000".into(),
            secret: None,
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Number of slaves.
    pub slaves: u32,
    /// Executors per slave.
    pub executors: u32,
    /// Data directory: `master/`, `slave-<i>/` below it.
    pub data_dir: PathBuf,
    /// Cluster secret.
    pub secret: String,
    /// Master gRPC listen address (`127.0.0.1:0` for any free port).
    pub master_listen: String,
    /// Gateway listen address; `None` = no gateway.
    pub gateway_listen: Option<String>,
    /// Master settings (listen and data_dir are overridden).
    pub master: MasterConfig,
    /// Slave settings template (master, executors, data_dir and name are overridden).
    pub slave: SlaveConfig,
}

impl LocalOptions {
    /// `slaves` × `executors` on free ports under `data_dir`, no gateway, default settings.
    pub fn new(data_dir: PathBuf, slaves: u32, executors: u32) -> Self {
        Self {
            slaves,
            executors,
            data_dir,
            secret: ish_core::auth::generate_secret(),
            master_listen: "127.0.0.1:0".into(),
            gateway_listen: None,
            master: MasterConfig::default(),
            slave: SlaveConfig::default(),
        }
    }
}

#[derive(Debug)]
struct Role<T> {
    stop: CancellationToken,
    join: JoinHandle<T>,
}

impl<T> Role<T> {
    async fn stop(self) -> Option<T> {
        self.stop.cancel();
        self.join.await.ok()
    }
}

/// A running in-process cluster. Dropping it aborts every role; call [`LocalCluster::shutdown`]
/// for a clean stop.
#[derive(Debug)]
pub struct LocalCluster {
    /// gRPC URL of the master.
    pub master_url: String,
    /// Gateway address, when one was started.
    pub gateway_addr: Option<SocketAddr>,
    /// The cluster secret.
    pub secret: String,
    opts: LocalOptions,
    master_addr: SocketAddr,
    master: Option<Role<Result<(), ish_master::MasterError>>>,
    gateway: Option<Role<Result<(), ish_gateway::GatewayError>>>,
    slaves: Vec<Option<Role<Result<ish_slave::Exit, ish_slave::SlaveError>>>>,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for s in self.slaves.iter().flatten() {
            s.join.abort();
        }
        if let Some(m) = &self.master {
            m.join.abort();
        }
        if let Some(g) = &self.gateway {
            g.join.abort();
        }
    }
}

impl LocalCluster {
    /// Starts the master (and waits until it answers), the gateway and the slaves.
    pub async fn start(opts: LocalOptions) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(&opts.master_listen)
            .await
            .with_context(|| format!("binding the master to {}", opts.master_listen))?;
        let master_addr = listener.local_addr()?;
        let master_url = format!("http://{master_addr}");
        let mut cluster = Self {
            master_url,
            gateway_addr: None,
            secret: opts.secret.clone(),
            master_addr,
            master: None,
            gateway: None,
            slaves: Vec::new(),
            opts,
        };
        cluster.spawn_master(listener).await?;
        if let Some(addr) = cluster.opts.gateway_listen.clone() {
            let listener = TcpListener::bind(&addr)
                .await
                .with_context(|| format!("binding the gateway to {addr}"))?;
            cluster.gateway_addr = Some(listener.local_addr()?);
            let cfg = ish_gateway::GatewayConfig {
                listen: addr,
                master: cluster.master_url.clone(),
                secret: Some(cluster.secret.clone()),
                ..Default::default()
            };
            let stop = CancellationToken::new();
            let s = stop.clone();
            let secret = cluster.secret.clone();
            let join = tokio::spawn(async move {
                ish_gateway::serve(cfg, secret, listener, async move { s.cancelled().await }).await
            });
            cluster.gateway = Some(Role { stop, join });
        }
        for i in 0..cluster.opts.slaves as usize {
            cluster.slaves.push(None);
            cluster.start_slave(i);
        }
        Ok(cluster)
    }

    async fn spawn_master(&mut self, listener: TcpListener) -> anyhow::Result<()> {
        let mut cfg = self.opts.master.clone();
        cfg.listen = self.master_addr.to_string();
        cfg.data_dir = self.opts.data_dir.join("master");
        let stop = CancellationToken::new();
        let s = stop.clone();
        let secret = self.secret.clone();
        let join = tokio::spawn(async move {
            ish_master::serve(cfg, secret, listener, async move { s.cancelled().await }).await
        });
        let mut role = Role { stop, join };
        // Surface start-up errors (e.g. the database is locked by another master) here.
        tokio::select! {
            r = &mut role.join => {
                return Err(match r {
                    Ok(Err(e)) => anyhow!(e).context("the master did not start"),
                    Ok(Ok(())) => anyhow!("the master stopped at once"),
                    Err(e) => anyhow!(e).context("the master task failed"),
                });
            }
            c = connect(&self.master_url, &self.secret, Duration::from_secs(10)) => { c?; }
        }
        self.master = Some(role);
        Ok(())
    }

    /// Name of slave `i`.
    pub fn slave_name(i: usize) -> String {
        format!("local-{i}")
    }

    /// Starts (or restarts) slave `i`.
    pub fn start_slave(&mut self, i: usize) {
        let mut cfg = self.opts.slave.clone();
        cfg.master = self.master_url.clone();
        cfg.executors = self.opts.executors;
        cfg.data_dir = self.opts.data_dir.join(format!("slave-{i}"));
        cfg.name = Some(Self::slave_name(i));
        let stop = CancellationToken::new();
        let s = stop.clone();
        let secret = self.secret.clone();
        let join = tokio::spawn(async move {
            ish_slave::run(cfg, secret, async move { s.cancelled().await }).await
        });
        if i >= self.slaves.len() {
            self.slaves.resize_with(i + 1, || None);
        }
        if let Some(old) = self.slaves[i].replace(Role { stop, join }) {
            old.join.abort();
        }
    }

    /// Kills slave `i` abruptly: its task is aborted, its stream ends without a goodbye.
    pub fn kill_slave(&mut self, i: usize) {
        if let Some(role) = self.slaves.get_mut(i).and_then(Option::take) {
            role.join.abort();
        }
    }

    /// Stops slave `i` cleanly and returns how it ended.
    pub async fn stop_slave(
        &mut self,
        i: usize,
    ) -> Option<Result<ish_slave::Exit, ish_slave::SlaveError>> {
        let role = self.slaves.get_mut(i).and_then(Option::take)?;
        role.stop().await
    }

    /// Stops the master cleanly and starts it again on the same address and data dir.
    pub async fn restart_master(&mut self) -> anyhow::Result<()> {
        if let Some(m) = self.master.take()
            && let Some(Err(e)) = m.stop().await
        {
            return Err(anyhow!(e).context("the master failed while stopping"));
        }
        // The port may take a moment to be free again.
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.master_addr).await {
                Ok(l) => break l,
                Err(e) if tries > 100 => return Err(anyhow!(e).context("rebinding the master")),
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.spawn_master(listener).await
    }

    /// gRPC clients of the master.
    pub async fn clients(&self) -> anyhow::Result<(BuildsClient, ClusterClient)> {
        connect(&self.master_url, &self.secret, Duration::from_secs(10)).await
    }

    /// Stops every role cleanly: slaves first (they say goodbye), then gateway and master.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for i in 0..self.slaves.len() {
            if let Some(Err(e)) = self.stop_slave(i).await {
                tracing::warn!(slave = i, error = %e, "slave ended with an error");
            }
        }
        if let Some(g) = self.gateway.take() {
            g.stop().await.transpose()?;
        }
        if let Some(m) = self.master.take() {
            m.stop().await.transpose()?;
        }
        Ok(())
    }
}
