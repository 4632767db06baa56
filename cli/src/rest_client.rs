//! `ish build --gateway URL`: the same build, through the REST gateway's ClusterRunner API, the
//! way ClusterRunner's own CLI does it: `POST /v1/build` with the message digest, poll
//! `GET /v1/build/<id>`, download `artifacts.zip`. Useful where only the HTTP port is reachable.
use crate::client::{BuildOptions, exit, unzip};
use anyhow::{Context, bail};
use ish_core::proto::{self, project_source::Kind};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Name of ClusterRunner's digest header.
pub const DIGEST_HEADER: &str = "Clusterrunner-Message-Authentication-Digest";

/// The ClusterRunner request body for `req`.
pub fn request_json(req: &proto::BuildRequest) -> anyhow::Result<Value> {
    if !req.env.is_empty() {
        bail!(
            "--env is not part of the ClusterRunner API; use --master (gRPC) for builds with env"
        );
    }
    let mut m = serde_json::Map::new();
    match req.source.as_ref().and_then(|s| s.kind.as_ref()) {
        Some(Kind::Git(g)) => {
            m.insert("type".into(), "git".into());
            m.insert("url".into(), g.url.clone().into());
            for (k, v) in [
                ("remote", &g.remote),
                ("branch", &g.branch),
                ("hash", &g.hash),
            ] {
                if !v.is_empty() {
                    m.insert(k.into(), v.clone().into());
                }
            }
            if !req.project_directory.is_empty() {
                m.insert(
                    "project_directory".into(),
                    req.project_directory.clone().into(),
                );
            }
        }
        Some(Kind::Directory(d)) => {
            m.insert("type".into(), "directory".into());
            m.insert("project_directory".into(), d.path.clone().into());
        }
        None => bail!("no project source"),
    }
    if !req.job_name.is_empty() {
        m.insert("job_name".into(), req.job_name.clone().into());
    }
    if !req.config_json.is_empty() {
        m.insert("config".into(), serde_json::from_str(&req.config_json)?);
    }
    if !req.atoms_override.is_empty() {
        m.insert("atoms_override".into(), req.atoms_override.clone().into());
    }
    if !req.remote_files.is_empty() {
        m.insert("remote_files".into(), json!(req.remote_files));
    }
    Ok(Value::Object(m))
}

struct Rest {
    http: reqwest::Client,
    base: String,
    secret: String,
}

impl Rest {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let url = format!("{}{path}", self.base);
        let mut rb = self.http.request(method, &url);
        if let Some(body) = body {
            let bytes = serde_json::to_vec(body)?;
            rb = rb
                .header(DIGEST_HEADER, ish_core::auth::digest(&self.secret, &bytes))
                .header("Content-Type", "application/json")
                .body(bytes);
        }
        let resp = rb.send().await.with_context(|| format!("calling {url}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?.to_vec();
        Ok((status, bytes))
    }

    async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let (status, bytes) = self.send(method, path, body).await?;
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, v))
    }
}

fn error_text(v: &Value) -> String {
    v.get("error")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

/// Runs a build through the gateway at `base`; returns the exit code.
pub async fn run_build(base: &str, secret: &str, opts: &BuildOptions) -> anyhow::Result<i32> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rest = Rest {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?,
        base: base.trim_end_matches('/').to_string(),
        secret: secret.to_string(),
    };
    let body = request_json(&opts.request)?;
    let (status, v) = rest
        .json(reqwest::Method::POST, "/v1/build", Some(&body))
        .await?;
    if status != 202 {
        bail!(
            "the gateway refused the build ({status}): {}",
            error_text(&v)
        );
    }
    let id = v["build_id"]
        .as_u64()
        .context("the gateway's answer has no build_id")?;
    eprintln!("Submitted build {id} to {base}");
    let started = Instant::now();
    let mut last = String::new();
    let build = loop {
        let path = format!("/v1/build/{id}");
        let poll = rest.json(reqwest::Method::GET, &path, None);
        let (status, v) = tokio::select! {
            r = poll => r?,
            _ = crate::shutdown_signal() => {
                eprintln!("\nInterrupted: canceling build {id}.");
                let _ = rest.json(reqwest::Method::PUT, &format!("/v1/build/{id}"), Some(&json!({"status": "canceled"}))).await;
                return Ok(exit::INTERRUPTED);
            }
        };
        if status != 200 {
            bail!("polling build {id} failed ({status}): {}", error_text(&v));
        }
        let b = v["build"].clone();
        let line = format!(
            "build {id}: {}{}",
            b["status"].as_str().unwrap_or("?"),
            b["details"]
                .as_str()
                .map(|d| format!("  {d}"))
                .unwrap_or_default()
        );
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        if matches!(
            b["status"].as_str(),
            Some("FINISHED" | "ERROR" | "CANCELED")
        ) {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    match build["status"].as_str() {
        Some("FINISHED") => {
            let ok = build["result"] == "NO_FAILURES";
            eprintln!(
                "Build {id} finished in {secs:.1} s: {}",
                build["result"].as_str().unwrap_or("?")
            );
            for a in build["failed_atoms"].as_array().into_iter().flatten() {
                eprintln!(
                    "  failed: artifact_{}_{} exit {} — {}",
                    a["subjob_id"],
                    a["id"],
                    a["exit_code"],
                    a["command_string"].as_str().unwrap_or("")
                );
            }
            if !opts.no_download {
                let zip = download(&rest, id).await?;
                let dir = opts.cfg.results_dir.clone();
                tokio::task::spawn_blocking(move || unzip(&zip, &dir)).await??;
                eprintln!("Results in {}/", opts.cfg.results_dir.display());
            }
            Ok(if ok { exit::OK } else { exit::FAILED })
        }
        Some("ERROR") => {
            eprintln!(
                "Build {id} aborted due to error: {}",
                build["error_message"].as_str().unwrap_or("")
            );
            Ok(exit::FAILED)
        }
        _ => {
            eprintln!("Build {id} was canceled.");
            Ok(exit::FAILED)
        }
    }
}

/// `artifacts.zip`, waiting while the gateway answers 202 (archives not written yet).
async fn download(rest: &Rest, id: u64) -> anyhow::Result<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, bytes) = rest
            .send(
                reqwest::Method::GET,
                &format!("/v1/build/{id}/artifacts.zip"),
                None,
            )
            .await?;
        match status {
            200 => return Ok(bytes),
            202 if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            _ => bail!("downloading artifacts.zip failed ({status})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_become_clusterrunner_json() {
        let req = proto::BuildRequest {
            source: Some(proto::ProjectSource {
                kind: Some(Kind::Git(proto::GitSource {
                    url: "https://x/y.git".into(),
                    branch: "main".into(),
                    ..Default::default()
                })),
            }),
            job_name: "J".into(),
            config_json: r#"{"commands": ["true"]}"#.into(),
            ..Default::default()
        };
        assert_eq!(
            request_json(&req).unwrap(),
            json!({"type": "git", "url": "https://x/y.git", "branch": "main", "job_name": "J", "config": {"commands": ["true"]}})
        );
        let mut with_env = req;
        with_env.env.insert("A".into(), "b".into());
        assert!(request_json(&with_env).is_err());
    }
}
