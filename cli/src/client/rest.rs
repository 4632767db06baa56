//! `ish build --gateway URL`: the same build flow, through the REST gateway's ClusterRunner API, the
//! way ClusterRunner's own CLI does it: `POST /v1/build` with the message digest, poll
//! `GET /v1/build/<id>`, download `artifacts.zip`. Useful where only the HTTP port is reachable.
use super::api::{BuildApi, BuildView, FailedAtom};
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

/// A gateway's ClusterRunner API, digest-signed.
pub(crate) struct RestApi {
    rest: Rest,
    /// A poll was made: the next one waits the polling interval first.
    polled: bool,
    /// Between two polls of a build (ClusterRunner's own CLI waits 500 ms).
    poll_every: Duration,
}

impl RestApi {
    /// The gateway at `base`, signing with `secret`.
    pub fn new(base: &str, secret: &str) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Self {
            rest: Rest {
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .build()?,
                base: base.trim_end_matches('/').to_string(),
                secret: secret.to_string(),
            },
            polled: false,
            poll_every: Duration::from_millis(500),
        })
    }

    /// Polls this often instead (a benchmark polls like an eager client).
    pub fn poll_every(mut self, every: Duration) -> Self {
        self.poll_every = every;
        self
    }
}

/// The client's view of ClusterRunner's build JSON.
fn view(id: u64, b: &Value) -> BuildView {
    let status = b["status"].as_str().unwrap_or("?");
    let failed = b["failed_atoms"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| FailedAtom {
            subjob: a["subjob_id"].as_u64().unwrap_or_default(),
            atom: a["id"].as_u64().unwrap_or_default(),
            exit: a["exit_code"].to_string(),
            command: a["command_string"].as_str().unwrap_or("").to_string(),
        })
        .collect();
    BuildView {
        id,
        state: proto::BuildState::from_str_name(&format!("BUILD_STATE_{status}"))
            .unwrap_or_default(),
        passed: b["result"] == "NO_FAILURES",
        detail: b["details"].as_str().unwrap_or("").to_string(),
        num_atoms: b["num_atoms"].as_u64(),
        failed,
        error: b["error_message"].as_str().unwrap_or("").to_string(),
    }
}

impl BuildApi for RestApi {
    fn target(&self) -> &str {
        &self.rest.base
    }

    async fn submit(&mut self, req: &proto::BuildRequest) -> anyhow::Result<u64> {
        let body = request_json(req)?;
        let (status, v) = self
            .rest
            .json(reqwest::Method::POST, "/v1/build", Some(&body))
            .await?;
        if status != 202 {
            bail!(
                "the gateway refused the build ({status}): {}",
                error_text(&v)
            );
        }
        v["build_id"]
            .as_u64()
            .context("the gateway's answer has no build_id")
    }

    async fn next_state(&mut self, id: u64) -> anyhow::Result<BuildView> {
        // ClusterRunner has no watch: poll, as its own CLI does.
        if self.polled {
            tokio::time::sleep(self.poll_every).await;
        }
        self.polled = true;
        let (status, v) = self
            .rest
            .json(reqwest::Method::GET, &format!("/v1/build/{id}"), None)
            .await?;
        if status != 200 {
            bail!("polling build {id} failed ({status}): {}", error_text(&v));
        }
        Ok(view(id, &v["build"]))
    }

    async fn cancel(&mut self, id: u64) -> anyhow::Result<()> {
        let body = json!({"status": "canceled"});
        let (status, v) = self
            .rest
            .json(
                reqwest::Method::PUT,
                &format!("/v1/build/{id}"),
                Some(&body),
            )
            .await?;
        if status != 200 {
            bail!("canceling build {id} failed ({status}): {}", error_text(&v));
        }
        Ok(())
    }

    /// `artifacts.zip`, waiting while the gateway answers 202 (archives not written yet).
    async fn results_zip(&mut self, id: u64) -> anyhow::Result<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (status, bytes) = self
                .rest
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusterrunner_builds_become_the_clients_view() {
        let b = json!({"status": "FINISHED", "result": "FAILURE", "num_atoms": 2,
                       "details": "1 of 1 subjobs are complete (100.0%).", "error_message": null,
                       "failed_atoms": [{"subjob_id": 0, "id": 1, "exit_code": 3,
                                         "command_string": "export X=\"b\";"}]});
        let v = view(7, &b);
        assert_eq!(v.state, proto::BuildState::Finished);
        assert!(!v.passed);
        assert_eq!(v.num_atoms, Some(2));
        assert_eq!(
            v.failed,
            [FailedAtom {
                subjob: 0,
                atom: 1,
                exit: "3".into(),
                command: "export X=\"b\";".into()
            }]
        );
        assert_eq!(
            v.progress_line(),
            "build 7: FINISHED  1 of 1 subjobs are complete (100.0%)."
        );
        let queued = view(8, &json!({"status": "QUEUED", "num_atoms": null}));
        assert_eq!(queued.state, proto::BuildState::Queued);
        assert_eq!(queued.num_atoms, None);
        assert!(!queued.is_final());
    }

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
