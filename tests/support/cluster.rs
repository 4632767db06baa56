//! The in-process cluster every in-process suite starts: a real master, real slaves and, when
//! asked, the REST gateway, over real gRPC and HTTP on 127.0.0.1 in the test's own process
//! (`ish_cli::local::LocalCluster`). [`Local`] says what to start; the [`TestCluster`] it gives
//! waits until every slave registered, derefs to the `LocalCluster` (clients, slaves, restarts)
//! and carries the HTTP helpers of the REST suites. The real-binary counterpart is `procs.rs`.
#![allow(dead_code)]

use super::http;
use super::resp::{DIGEST, Resp};
use super::{checks::Failures, dir_request, project_with, state, wait_final};
use ish_cli::local::{BuildsClient, LocalCluster, LocalOptions};
use ish_core::auth::SecretInterceptor;
use ish_core::proto;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Every wait of the refusal suites on an RPC, a message or a raw answer is bounded by this.
pub const STEP: Duration = Duration::from_secs(20);

pub type SlaveLinkClient =
    proto::slave_link_client::SlaveLinkClient<InterceptedService<Channel, SecretInterceptor>>;

/// A change to the options, applied in order just before the cluster starts.
type Tune = Box<dyn FnOnce(&mut LocalOptions)>;

/// What to start.
pub struct Local {
    slaves: u32,
    executors: u32,
    gateway: bool,
    test_timings: bool,
    heartbeat_timeout_ms: Option<u64>,
    http_timeout: Duration,
    data_dir: Option<PathBuf>,
    tune: Vec<Tune>,
}

impl Local {
    /// `slaves` × `executors`, no gateway, with the timings the suites share: heartbeats every
    /// 200 ms, a slave lost after 3 s of silence, 1 s between SIGTERM and SIGKILL of a command.
    pub fn new(slaves: u32, executors: u32) -> Self {
        Self {
            slaves,
            executors,
            gateway: false,
            test_timings: true,
            heartbeat_timeout_ms: None,
            http_timeout: Duration::from_secs(30),
            data_dir: None,
            tune: Vec::new(),
        }
    }

    /// Like [`Local::new`] but with `LocalOptions`' own defaults for every timing.
    pub fn with_defaults(slaves: u32, executors: u32) -> Self {
        Self {
            test_timings: false,
            ..Self::new(slaves, executors)
        }
    }

    /// Starts the REST gateway too, on a free port of 127.0.0.1.
    pub fn gateway(mut self) -> Self {
        self.gateway = true;
        self
    }

    /// Heartbeat silence after which the master drops a slave (hand-driven fake slaves send
    /// none).
    pub fn heartbeat_timeout_ms(mut self, ms: u64) -> Self {
        self.heartbeat_timeout_ms = Some(ms);
        self
    }

    /// How long one HTTP call of the cluster's client may take (30 s unless set).
    pub fn http_timeout(mut self, t: Duration) -> Self {
        self.http_timeout = t;
        self
    }

    /// Puts the cluster's data under `dir` (which the test owns, e.g. to mount a small disk
    /// below it first) instead of a temp dir of its own.
    pub fn data_dir(mut self, dir: PathBuf) -> Self {
        self.data_dir = Some(dir);
        self
    }

    /// Any other setting of the master or the slaves.
    pub fn tune(mut self, f: impl FnOnce(&mut LocalOptions) + 'static) -> Self {
        self.tune.push(Box::new(f));
        self
    }

    /// Starts the cluster and waits (10 s at most) until exactly its slaves are registered.
    pub async fn start(self) -> TestCluster {
        let (dir, data_dir) = match self.data_dir {
            Some(d) => (None, d),
            None => {
                let d = tempfile::tempdir().unwrap();
                let p = d.path().to_path_buf();
                (Some(d), p)
            }
        };
        let mut opts = LocalOptions::new(data_dir.clone(), self.slaves, self.executors);
        if self.gateway {
            opts.gateway_listen = Some("127.0.0.1:0".into());
        }
        if self.test_timings {
            opts.master.heartbeat_interval_ms = 200;
            opts.master.heartbeat_timeout_ms = 3_000;
            opts.slave.kill_grace_ms = 1_000;
        }
        if let Some(ms) = self.heartbeat_timeout_ms {
            opts.master.heartbeat_timeout_ms = ms;
        }
        for f in self.tune {
            f(&mut opts);
        }
        let c = LocalCluster::start(opts).await.unwrap();
        let base = c
            .gateway_addr
            .map(|a| format!("http://{a}"))
            .unwrap_or_default();
        let tc = TestCluster {
            c,
            http: http::client(self.http_timeout),
            base,
            data_dir,
            _dir: dir,
        };
        tc.wait_slaves(self.slaves as usize).await;
        tc
    }
}

/// A running in-process cluster and an HTTP client for its gateway. Dropping it aborts every
/// role; [`TestCluster::shutdown`] stops them cleanly.
pub struct TestCluster {
    pub c: LocalCluster,
    pub http: reqwest::Client,
    /// `http://<gateway>`, empty without a gateway.
    pub base: String,
    /// The cluster's data: `master/`, `slave-<i>/`.
    pub data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl std::ops::Deref for TestCluster {
    type Target = LocalCluster;
    fn deref(&self) -> &LocalCluster {
        &self.c
    }
}

impl std::ops::DerefMut for TestCluster {
    fn deref_mut(&mut self) -> &mut LocalCluster {
        &mut self.c
    }
}

impl TestCluster {
    /// Stops every role cleanly, then removes the data.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.c.shutdown().await
    }

    /// A Builds client of the master.
    pub async fn builds(&self) -> BuildsClient {
        self.c.clients().await.unwrap().0
    }

    /// The slaves the master lists.
    pub async fn slaves(&self) -> Vec<proto::Slave> {
        let (_, mut cl) = self.c.clients().await.unwrap();
        cl.list_slaves(proto::ListSlavesRequest {})
            .await
            .unwrap()
            .into_inner()
            .slaves
    }

    /// Waits (10 s at most) until the master lists exactly `n` slaves.
    pub async fn wait_slaves(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.slaves().await.len();
            if got == n {
                return;
            }
            assert!(Instant::now() < deadline, "{got} of {n} slaves registered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A raw slave-link client presenting `secret` (the cluster's when `None`).
    pub async fn link(&self, secret: Option<&str>) -> SlaveLinkClient {
        let channel = Channel::from_shared(self.c.master_url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let auth = SecretInterceptor::new(secret.unwrap_or(&self.c.secret)).unwrap();
        proto::slave_link_client::SlaveLinkClient::with_interceptor(channel, auth)
    }

    /// The check every refusal test ends with: a directory project with a clusterrunner.yaml of
    /// 3 atoms builds to FINISHED / NO_FAILURES on the same cluster.
    pub async fn a_normal_build_runs(&self, f: &mut Failures) {
        let project = project_with(
            "Normal:\n  commands:\n    - echo \"atom $N\" > \"$ARTIFACT_DIR/out\"\n    - echo \"done $N\"\n  atomizers:\n    - N: seq 3\n",
        );
        let mut b = self.builds().await;
        let id = match tokio::time::timeout(
            STEP,
            b.submit(proto::SubmitBuildRequest {
                request: Some(dir_request(project.path())),
            }),
        )
        .await
        {
            Ok(Ok(r)) => r.into_inner().build_id,
            other => {
                f.check(false, || {
                    format!("the normal build after bad input was not accepted: {other:?}")
                });
                return;
            }
        };
        let build = wait_final(&mut b, id).await;
        f.check(
            state(&build) == proto::BuildState::Finished
                && build.result == proto::BuildResult::NoFailures as i32
                && build.num_atoms == 3,
            || format!("the normal build after bad input did not finish cleanly: {build:#?}"),
        );
    }

    // --- HTTP to the gateway ------------------------------------------------------------------

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn gateway(&self) -> std::net::SocketAddr {
        self.c
            .gateway_addr
            .expect("a cluster started with .gateway()")
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<reqwest::Body>,
    ) -> Resp {
        http::call(&self.http, method, &self.url(path), headers, body).await
    }

    /// [`TestCluster::call`] that reports a failed exchange instead of panicking.
    pub async fn try_call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: reqwest::Body,
    ) -> Result<Resp, String> {
        http::try_call(&self.http, method, &self.url(path), headers, body).await
    }

    /// A request with a text body (or none).
    pub async fn req(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Resp {
        self.call(method, path, headers, body.map(|b| b.to_owned().into()))
            .await
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.call(Method::GET, path, &[], None).await
    }

    /// A request whose body carries its correct digest under the cluster secret.
    pub async fn signed(&self, method: Method, path: &str, body: impl AsRef<[u8]>) -> Resp {
        let body = body.as_ref().to_vec();
        let d = ish_core::auth::digest(&self.c.secret, &body);
        self.call(method, path, &[(DIGEST, &d)], Some(body.into()))
            .await
    }

    /// POST /v1/build of `body`, signed.
    pub async fn post_build(&self, body: &Value) -> Resp {
        self.signed(Method::POST, "/v1/build", body.to_string())
            .await
    }

    /// POST /v1/build of `body`, signed, which must be accepted: the new build's id.
    pub async fn submit(&self, body: &Value) -> u64 {
        let r = self.post_build(body).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
        let v = r.json();
        assert_eq!(
            (&v["status"], &v["STATUS"]),
            (&json!("SUCCESS"), &json!("SUCCESS"))
        );
        v["build_id"].as_u64().unwrap()
    }

    /// GET /v1/build/<id>: the `build` object.
    pub async fn build(&self, id: u64) -> Value {
        let r = self.get(&format!("/v1/build/{id}")).await;
        assert_eq!(r.status, StatusCode::OK);
        r.json()["build"].clone()
    }

    /// Polls the build over REST (90 s at most) until `pred` holds.
    pub async fn wait(&self, id: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let b = self.build(id).await;
            if pred(&b) {
                return b;
            }
            assert!(Instant::now() < deadline, "build {id}: {what}: {b:#}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Polls the build over REST until it is FINISHED, ERROR or CANCELED.
    pub async fn wait_final(&self, id: u64) -> Value {
        self.wait(id, "not final", |b| {
            matches!(
                b["status"].as_str(),
                Some("FINISHED" | "ERROR" | "CANCELED")
            )
        })
        .await
    }

    /// How many builds GET /v1/build lists.
    pub async fn count_builds(&self) -> usize {
        let r = self.get("/v1/build").await;
        assert_eq!(r.status, StatusCode::OK);
        r.json()["builds"].as_array().unwrap().len()
    }

    /// Polls `path` (60 s at most) until `pred` holds on its answer.
    pub async fn poll(&self, path: &str, what: &str, pred: impl Fn(&Resp) -> bool) -> Resp {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.get(path).await;
            if pred(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "{path}: {what}: {} {}",
                r.status,
                r.text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Sends `request` as is to the gateway on a new connection: status line and body.
    pub async fn raw(&self, request: &[u8]) -> (String, String) {
        http::raw(self.gateway(), request, STEP).await
    }

    /// A POST that declares `length` bytes and waits for `100 Continue`; see
    /// [`http::expect_continue`].
    pub async fn expect_continue(
        &self,
        path: &str,
        length: usize,
        digest: &str,
    ) -> Option<(String, String)> {
        http::expect_continue(self.gateway(), path, length, digest, STEP).await
    }
}
