//! `ish bench`: benchmarks that start their own cluster on 127.0.0.1 and print a table.
//!
//! - `gateway`: the REST gateway's overhead — requests/s and p50/p99 latency of
//!   `GET /v1/build/{id}` and `POST /v1/build` at N concurrent clients, beside the same operations
//!   as direct gRPC calls on the master (the difference is what the gateway costs).
use crate::client::rest::DIGEST_HEADER;
use crate::local::{LocalCluster, LocalOptions};
use anyhow::{Context, bail};
use ish_core::proto;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Latency samples of one measured operation.
#[derive(Debug, Clone)]
pub struct Sample {
    /// What was measured.
    pub name: String,
    /// Concurrent clients.
    pub clients: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Per-request latencies, sorted ascending.
    pub latencies: Vec<Duration>,
    /// Requests that failed.
    pub errors: usize,
}

impl Sample {
    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// The `p`-th percentile latency (0..=100).
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let idx = ((p / 100.0) * (self.latencies.len() - 1) as f64).round() as usize;
        self.latencies[idx.min(self.latencies.len() - 1)]
    }
}

/// Prints samples as a Markdown table.
pub fn print_table(samples: &[Sample]) {
    println!("| operation | clients | requests | errors | req/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for s in samples {
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} |",
            s.name,
            s.clients,
            s.latencies.len(),
            s.errors,
            s.rate(),
            s.percentile(50.0).as_secs_f64() * 1e3,
            s.percentile(99.0).as_secs_f64() * 1e3,
        );
    }
}

/// Runs `op` from `clients` concurrent tasks for `duration` and collects latencies.
async fn measure<F, Fut>(name: &str, clients: usize, duration: Duration, op: F) -> Sample
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut i = 0;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                if op(c * 1_000_000 + i).await {
                    lat.push(t0.elapsed());
                } else {
                    errors += 1;
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            latencies.extend(l);
            errors += e;
        }
    }
    latencies.sort();
    Sample {
        name: name.into(),
        clients,
        elapsed: start.elapsed(),
        latencies,
        errors,
    }
}

/// Options of `ish bench gateway`.
#[derive(Debug, Clone)]
pub struct GatewayBench {
    /// Concurrent clients.
    pub clients: usize,
    /// Seconds per operation.
    pub seconds: f64,
}

/// Measures the gateway against an in-process cluster (no slaves: submitted builds stay queued,
/// so nothing but the request path is measured).
pub async fn gateway(opts: &GatewayBench) -> anyhow::Result<Vec<Sample>> {
    let dir = std::env::temp_dir().join(format!("ish-bench-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(dir.clone());
    let mut lo = LocalOptions::new(dir.clone(), 0, 1);
    lo.gateway_listen = Some("127.0.0.1:0".into());
    let cluster = LocalCluster::start(lo).await?;
    let gw = format!(
        "http://{}",
        cluster.gateway_addr.context("gateway address")?
    );
    let secret = cluster.secret.clone();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.clients)
        .build()?;
    let project = dir.join("project");
    std::fs::create_dir_all(&project)?;
    let body = serde_json::json!({
        "type": "directory",
        "project_directory": project.display().to_string(),
        "config": {"commands": ["true"], "atomizers": [{"X": "echo 1"}]},
    });
    let body_bytes = Arc::new(serde_json::to_vec(&body)?);
    let digest = Arc::new(ish_core::auth::digest(&secret, &body_bytes));
    // One build to read back.
    let resp = http
        .post(format!("{gw}/v1/build"))
        .header(DIGEST_HEADER, digest.as_str())
        .body(body_bytes.to_vec())
        .send()
        .await?;
    if resp.status().as_u16() != 202 {
        bail!("the gateway refused the first build: {}", resp.status());
    }
    let first: serde_json::Value = resp.json().await?;
    let id = first["build_id"].as_u64().context("build_id")?;
    let duration = Duration::from_secs_f64(opts.seconds);
    // One connection per client on both sides (reqwest pools one per concurrent request), so
    // the comparison is not about HTTP/2 multiplexing on a single connection.
    let mut conns = Vec::with_capacity(opts.clients);
    for _ in 0..opts.clients {
        conns.push(cluster.clients().await?.0);
    }
    let conns = Arc::new(conns);
    let conn = |n: usize, conns: &Arc<Vec<crate::local::BuildsClient>>| {
        conns[(n / 1_000_000) % conns.len()].clone()
    };
    let mut samples = Vec::new();

    let b = conns.clone();
    samples.push(
        measure(
            "gRPC Builds.Get (direct to master)",
            opts.clients,
            duration,
            move |n| {
                let mut b = conn(n, &b);
                async move { b.get(proto::GetBuildRequest { build_id: id }).await.is_ok() }
            },
        )
        .await,
    );
    let (h, g) = (http.clone(), gw.clone());
    samples.push(
        measure(
            "REST GET /v1/build/{id} (gateway)",
            opts.clients,
            duration,
            move |_| {
                let (h, url) = (h.clone(), format!("{g}/v1/build/{id}"));
                async move {
                    match h.get(url).send().await {
                        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                        _ => false,
                    }
                }
            },
        )
        .await,
    );
    let b = conns.clone();
    let req = proto::BuildRequest {
        source: Some(proto::ProjectSource {
            kind: Some(proto::project_source::Kind::Directory(
                proto::DirectorySource {
                    path: project.display().to_string(),
                },
            )),
        }),
        config_json: body["config"].to_string(),
        ..Default::default()
    };
    samples.push(
        measure(
            "gRPC Builds.Submit (direct to master)",
            opts.clients,
            duration,
            move |n| {
                let (mut b, req) = (conn(n, &b), req.clone());
                async move {
                    b.submit(proto::SubmitBuildRequest { request: Some(req) })
                        .await
                        .is_ok()
                }
            },
        )
        .await,
    );
    let (h, g) = (http.clone(), gw.clone());
    samples.push(
        measure(
            "REST POST /v1/build (gateway)",
            opts.clients,
            duration,
            move |_| {
                let (h, url, body, digest) = (
                    h.clone(),
                    format!("{g}/v1/build"),
                    body_bytes.clone(),
                    digest.clone(),
                );
                async move {
                    let r = h
                        .post(url)
                        .header(DIGEST_HEADER, digest.as_str())
                        .body(body.to_vec())
                        .send()
                        .await;
                    matches!(r, Ok(r) if r.status().as_u16() == 202)
                }
            },
        )
        .await,
    );
    cluster.shutdown().await?;
    Ok(samples)
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
