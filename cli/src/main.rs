//! `ish`: one binary, one subcommand per role, plus the client verbs.
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ish_cli::client::{self, BuildOptions, ClientConfig};
use ish_cli::local::{LocalCluster, LocalConfig, LocalOptions};
use ish_cli::settings::{self, expand_tilde};
use ish_core::proto::{self, project_source::Kind};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "ish",
    version,
    about = "Ish CD: a gRPC-first distributed build and job cluster"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `ish_master=debug`. Default: `info`
    /// for the roles, `warn` for client verbs (an embedded cluster stays quiet).
    #[arg(long, global = true, env = "ISH_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the master (control plane, gRPC).
    Master(MasterArgs),
    /// Run a slave (executes work; dials the master).
    Slave(SlaveArgs),
    /// Run the REST gateway.
    Gateway(GatewayArgs),
    /// Run master + gateway + N slaves in one process.
    Local(LocalArgs),
    /// Submit a build, show its progress and download its results into ./build_results/.
    Build(Box<BuildArgs>),
    /// Run a benchmark on a cluster started for it on 127.0.0.1 and print a table.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(subcommand)]
    which: BenchCmd,
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// REST gateway overhead: GET /v1/build/{id} and POST /v1/build vs direct gRPC.
    Gateway {
        /// Concurrent clients.
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Seconds per measured operation.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// The dispatch engine's benchmarks (B1–B6, see docs/benchmarks.md), or some of them.
    Suite {
        /// Which to run (b1..b6); all when none is given.
        only: Vec<String>,
        /// Small numbers: a smoke test of correctness, not of speed.
        #[arg(long)]
        quick: bool,
    },
}

#[derive(Args, Debug)]
struct MasterArgs {
    /// TOML settings file (see conf/master.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "ISH_MASTER_LISTEN")]
    listen: Option<String>,
    /// Data directory.
    #[arg(long, env = "ISH_MASTER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Cluster secret.
    #[arg(long, env = "ISH_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Print the merged settings as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args, Debug)]
struct SlaveArgs {
    /// TOML settings file (see conf/slave.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC URL of the master.
    #[arg(long, env = "ISH_MASTER")]
    master: Option<String>,
    /// Number of executors.
    #[arg(long, env = "ISH_EXECUTORS")]
    executors: Option<u32>,
    /// Data directory.
    #[arg(long, env = "ISH_SLAVE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Name in the cluster.
    #[arg(long, env = "ISH_SLAVE_NAME")]
    name: Option<String>,
    /// Cluster secret.
    #[arg(long, env = "ISH_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Print the merged settings as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args, Debug)]
struct GatewayArgs {
    /// TOML settings file (see conf/gateway.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// HTTP listen address.
    #[arg(long, env = "ISH_GATEWAY_LISTEN")]
    listen: Option<String>,
    /// gRPC URL of the master.
    #[arg(long, env = "ISH_MASTER")]
    master: Option<String>,
    /// Cluster secret.
    #[arg(long, env = "ISH_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Print the merged settings as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args, Debug)]
struct LocalArgs {
    /// TOML settings file (see conf/local.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Number of slaves.
    #[arg(long, env = "ISH_SLAVES")]
    slaves: Option<u32>,
    /// Executors per slave.
    #[arg(long, env = "ISH_EXECUTORS")]
    executors: Option<u32>,
    /// Data directory.
    #[arg(long, env = "ISH_LOCAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Cluster secret.
    #[arg(long, env = "ISH_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Print the merged settings as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args, Debug)]
struct BuildArgs {
    /// TOML settings file (see conf/client.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC URL of the master. Without it, a master on the default address is used, or an
    /// embedded local cluster is started for the build.
    #[arg(long, env = "ISH_MASTER")]
    master: Option<String>,
    /// URL of a REST gateway: build through its ClusterRunner API instead of gRPC.
    #[arg(long, env = "ISH_GATEWAY", conflicts_with = "master")]
    gateway: Option<String>,
    /// Cluster secret (for --gateway: the gateway's digest secret).
    #[arg(long, env = "ISH_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Download this URL into the project as NAME before the build (repeatable): NAME=URL.
    #[arg(long = "remote-file", value_parser = parse_env)]
    remote_files: Vec<(String, String)>,
    /// Job to run among those in clusterrunner.yaml.
    #[arg(long, short = 'j')]
    job_name: Option<String>,
    /// Use this job config (YAML or JSON: one job's sections) instead of clusterrunner.yaml.
    #[arg(long)]
    job_config: Option<PathBuf>,
    /// Use these atoms instead of running the atomizers (repeatable), e.g. 'export TOKEN="a";'.
    #[arg(long = "atom")]
    atoms: Vec<String>,
    /// Extra environment for every command of the build (repeatable), NAME=VALUE.
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Where to unpack the results.
    #[arg(long)]
    results_dir: Option<PathBuf>,
    /// Do not download the results.
    #[arg(long)]
    no_download: bool,
    #[command(subcommand)]
    project: Option<ProjectCmd>,
}

#[derive(Subcommand, Debug)]
enum ProjectCmd {
    /// A directory present on every slave (default: the current directory).
    Directory {
        /// The directory.
        #[arg(long)]
        project_directory: Option<PathBuf>,
    },
    /// A git repository.
    Git {
        /// Clone URL (https, ssh, file:// or a local path).
        #[arg(long)]
        url: String,
        /// Branch (default master).
        #[arg(long)]
        branch: Option<String>,
        /// Commit to build instead of the branch head.
        #[arg(long)]
        hash: Option<String>,
        /// Remote name.
        #[arg(long)]
        remote: Option<String>,
        /// Sub-directory of the repository with clusterrunner.yaml.
        #[arg(long)]
        project_directory: Option<String>,
    },
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))?;
    Ok((k.to_string(), v.to_string()))
}

fn print_config<T: Serialize>(cfg: &T) -> anyhow::Result<i32> {
    print!("{}", toml::to_string(cfg)?);
    Ok(0)
}

async fn master(a: MasterArgs) -> anyhow::Result<i32> {
    let mut cfg: ish_master::MasterConfig = settings::load(a.config.as_deref())?;
    cfg.listen = a.listen.unwrap_or(cfg.listen);
    cfg.data_dir = expand_tilde(&a.data_dir.unwrap_or(cfg.data_dir));
    cfg.secret = a.secret.or(cfg.secret);
    settings::resolve_paths(&mut cfg)?;
    if a.print_config {
        return print_config(&cfg);
    }
    let secret = settings::master_secret(cfg.secret.clone(), &cfg.data_dir)?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    ish_master::serve(cfg, secret, listener, ish_cli::shutdown_signal()).await?;
    Ok(0)
}

async fn slave(a: SlaveArgs) -> anyhow::Result<i32> {
    let mut cfg: ish_slave::SlaveConfig = settings::load(a.config.as_deref())?;
    cfg.master = a.master.unwrap_or(cfg.master);
    cfg.executors = a.executors.unwrap_or(cfg.executors);
    cfg.data_dir = expand_tilde(&a.data_dir.unwrap_or(cfg.data_dir));
    cfg.name = a.name.or(cfg.name);
    cfg.secret = a.secret.or(cfg.secret);
    settings::resolve_paths(&mut cfg)?;
    if a.print_config {
        return print_config(&cfg);
    }
    let secret = settings::client_secret(cfg.secret.clone())?;
    match ish_slave::run(cfg, secret, ish_cli::shutdown_signal()).await {
        Ok(exit) => {
            tracing::info!(?exit, "slave stopped");
            Ok(0)
        }
        Err(e) => {
            eprintln!("ish slave: {e}");
            Ok(2)
        }
    }
}

async fn gateway(a: GatewayArgs) -> anyhow::Result<i32> {
    let mut cfg: ish_gateway::GatewayConfig = settings::load(a.config.as_deref())?;
    cfg.listen = a.listen.unwrap_or(cfg.listen);
    cfg.master = a.master.unwrap_or(cfg.master);
    cfg.secret = a.secret.or(cfg.secret);
    settings::resolve_paths(&mut cfg)?;
    if a.print_config {
        return print_config(&cfg);
    }
    let secret = settings::client_secret(cfg.secret.clone())?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    ish_gateway::serve(cfg, secret, listener, ish_cli::shutdown_signal()).await?;
    Ok(0)
}

async fn local(a: LocalArgs) -> anyhow::Result<i32> {
    let mut cfg: LocalConfig = settings::load(a.config.as_deref())?;
    cfg.slaves = a.slaves.unwrap_or(cfg.slaves);
    cfg.executors = a.executors.unwrap_or(cfg.executors);
    cfg.data_dir = expand_tilde(&a.data_dir.unwrap_or(cfg.data_dir));
    cfg.secret = a.secret.or(cfg.secret);
    settings::resolve_paths(&mut cfg)?;
    if a.print_config {
        return print_config(&cfg);
    }
    let mut opts = LocalOptions::new(cfg.data_dir.clone(), cfg.slaves, cfg.executors);
    if let Some(s) = cfg.secret.clone() {
        ish_core::auth::validate_secret(&s)?;
        opts.secret = s;
    }
    opts.master_listen = cfg.master_listen.clone();
    opts.gateway_listen = Some(cfg.gateway_listen.clone());
    let cluster = LocalCluster::start(opts).await?;
    println!(
        "Ish CD local cluster: {} slave(s) × {} executor(s)",
        cfg.slaves, cfg.executors
    );
    println!("  master (gRPC): {}", cluster.master_url);
    if let Some(g) = cluster.gateway_addr {
        println!("  gateway (REST): http://{g}");
    }
    println!("  secret: {}", cluster.secret);
    println!("  data: {}", cfg.data_dir.display());
    println!(
        "Try: ISH_SECRET={} ish build --master {} directory --project-directory conf/examples/basic",
        cluster.secret, cluster.master_url
    );
    ish_cli::shutdown_signal().await;
    cluster.shutdown().await?;
    Ok(0)
}

async fn build(a: BuildArgs) -> anyhow::Result<i32> {
    let mut cfg: ClientConfig = settings::load(a.config.as_deref())?;
    cfg.master = a.master.or(cfg.master);
    cfg.gateway = a.gateway.or(cfg.gateway);
    cfg.secret = a.secret.or(cfg.secret);
    cfg.results_dir = a.results_dir.unwrap_or(cfg.results_dir);
    settings::resolve_paths(&mut cfg)?;
    let (source, project_directory) = match a.project {
        None => (
            client::directory_source(&std::env::current_dir()?)?,
            String::new(),
        ),
        Some(ProjectCmd::Directory { project_directory }) => {
            let dir = project_directory
                .map(Ok)
                .unwrap_or_else(std::env::current_dir)?;
            (client::directory_source(&dir)?, String::new())
        }
        Some(ProjectCmd::Git {
            url,
            branch,
            hash,
            remote,
            project_directory,
        }) => {
            // A local path is made absolute: the slaves resolve it, not this shell.
            let url = if !url.contains("://")
                && !url.contains('@')
                && std::path::Path::new(&url).exists()
            {
                std::fs::canonicalize(&url)?.display().to_string()
            } else {
                url
            };
            let git = proto::GitSource {
                url,
                remote: remote.unwrap_or_default(),
                branch: branch.unwrap_or_default(),
                hash: hash.unwrap_or_default(),
            };
            (
                proto::ProjectSource {
                    kind: Some(Kind::Git(git)),
                },
                project_directory.unwrap_or_default(),
            )
        }
    };
    let config_json = a
        .job_config
        .as_deref()
        .map(client::job_config_json)
        .transpose()?
        .unwrap_or_default();
    let request = proto::BuildRequest {
        source: Some(source),
        project_directory,
        job_name: a.job_name.unwrap_or_default(),
        config_json,
        atoms_override: a.atoms,
        env: a.env.into_iter().collect(),
        remote_files: a.remote_files.into_iter().collect(),
        ..Default::default()
    };
    client::run_build(BuildOptions {
        cfg,
        request,
        no_download: a.no_download,
    })
    .await
}

async fn bench(a: BenchArgs) -> anyhow::Result<i32> {
    match a.which {
        BenchCmd::Gateway { clients, seconds } => {
            let cpus = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0);
            println!(
                "ish bench gateway: {clients} clients, {seconds} s per operation, {cpus} CPUs, 127.0.0.1\n"
            );
            let samples =
                ish_cli::bench::gateway(&ish_cli::bench::GatewayBench { clients, seconds }).await?;
            ish_cli::bench::print_table(&samples);
            let errors: usize = samples.iter().map(|s| s.errors).sum();
            Ok(if errors == 0 { 0 } else { 1 })
        }
        BenchCmd::Suite { only, quick } => {
            use ish_cli::bench_suite as b;
            let cpus = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0);
            println!(
                "ish bench suite{}: {cpus} CPUs, 127.0.0.1\n",
                if quick { " --quick" } else { "" }
            );
            let scale = b::Scale { quick };
            let want =
                |name: &str| only.is_empty() || only.iter().any(|o| o.eq_ignore_ascii_case(name));
            let mut rows = Vec::new();
            if want("b1") {
                rows.extend(b::b1(scale).await?);
            }
            if want("b2") {
                rows.extend(b::b2(scale).await?);
            }
            if want("b3") {
                rows.extend(b::b3(scale).await?);
            }
            if want("b4") {
                rows.extend(b::b4(scale).await?);
            }
            if want("b5") {
                rows.extend(b::b5(scale).await?);
            }
            if want("b6") {
                rows.extend(b::b6(scale).await?);
            }
            b::print_rows(&rows);
            Ok(0)
        }
    }
}

fn main() {
    // Before anything else: the slave runs each command under this binary as its reaper.
    ish_slave::reaper::main_if_reaper();
    let cli = Cli::parse();
    let default_log = if matches!(cli.cmd, Cmd::Build(_) | Cmd::Bench(_)) {
        "warn"
    } else {
        "info"
    };
    let filter = cli.log.as_deref().unwrap_or(default_log);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| default_log.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ish: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Master(a) => master(a).await,
            Cmd::Slave(a) => slave(a).await,
            Cmd::Gateway(a) => gateway(a).await,
            Cmd::Local(a) => local(a).await,
            Cmd::Build(a) => build(*a).await,
            Cmd::Bench(a) => bench(a).await,
        }
    });
    // Leftover tasks (e.g. a reconnecting gRPC channel) must not delay the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ish: {e:#}");
            std::process::exit(2);
        }
    }
}
