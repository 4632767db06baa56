//! Bad input to the REST gateway and the gRPC API (issue 4).
//!
//! Each test starts an in-process cluster (`LocalCluster`: real gRPC and, where needed, the
//! gateway over real HTTP on 127.0.0.1), sends it malformed, mistyped, oversized, hostile or
//! unauthenticated requests, checks that each gets the documented 4xx / gRPC status and stores
//! nothing, and then checks that the same cluster still runs a normal build to FINISHED /
//! NO_FAILURES. Checks are collected (not stopped at the first mismatch) so one run reports every
//! refusal that went wrong; the test fails if any did.
//!
//! The slave protocol is driven by hand: a fake slave registers over the real `Session` RPC,
//! answers Prepare and Setup, receives a RunSubjob and then uploads artifacts with hostile paths
//! for its real, current attempt.
mod support;

use ish_cli::local::{BuildsClient, LocalCluster, LocalOptions};
use ish_core::auth::SecretInterceptor;
use ish_core::proto::{
    self, artifact_chunk::Msg as Art, master_message::Msg as Down, slave_message::Msg as Up,
};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

const DIGEST: &str = "Clusterrunner-Message-Authentication-Digest";
const DIGEST_MISMATCH: &str = "Message digest does not match header, message not authenticated.";
const INVALID_JSON: &str = "Invalid JSON in request body.";
/// The gateway's default `max_body_bytes`.
const MAX_BODY: usize = 10 << 20;
/// `jobconfig::MAX_CONFIG_BYTES`.
const MAX_CONFIG: usize = 1 << 20;
/// The master's default `max_atoms_per_build`.
const MAX_ATOMS: usize = 100_000;
/// Every wait on an RPC or a message is bounded by this.
const STEP: Duration = Duration::from_secs(20);

type SlaveLinkClient =
    proto::slave_link_client::SlaveLinkClient<InterceptedService<Channel, SecretInterceptor>>;

// ---------------------------------------------------------------------------------------------
// Collected checks
// ---------------------------------------------------------------------------------------------

/// Mismatches found so far; [`Failures::finish`] fails the test with all of them.
#[derive(Default)]
struct Failures(Vec<String>, usize);

impl Failures {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.1 += 1;
        if !ok {
            let msg = what();
            eprintln!("CHECK FAILED: {msg}");
            self.0.push(msg);
        }
    }

    fn finish(self) {
        println!(
            "CHECKS RUN: {} in {}",
            self.1,
            std::thread::current().name().unwrap_or("?")
        );
        assert!(
            self.0.is_empty(),
            "{} check(s) failed:\n- {}",
            self.0.len(),
            self.0.join("\n- ")
        );
    }

    /// A gRPC result must be `want` (with `needle` in the message when given).
    fn status<T: Debug>(
        &mut self,
        what: &str,
        got: Result<T, Status>,
        want: Code,
        needle: Option<&str>,
    ) {
        match got {
            Err(s) if s.code() == want && needle.is_none_or(|n| s.message().contains(n)) => {
                self.check(true, String::new)
            }
            Err(s) => self.check(false, || {
                format!(
                    "{what}: expected {want:?}{}, got {:?} {:?}",
                    needle
                        .map(|n| format!(" mentioning {n:?}"))
                        .unwrap_or_default(),
                    s.code(),
                    s.message()
                )
            }),
            Ok(v) => self.check(false, || {
                let v = format!("{v:?}");
                let v = if v.len() > 300 {
                    format!("{}...", &v[..300])
                } else {
                    v
                };
                format!("{what}: expected {want:?}, got OK: {v}")
            }),
        }
    }

    /// An HTTP answer must be `want` with a JSON `{"error": ...}` containing `needle`.
    fn rest(&mut self, what: &str, r: &Resp, want: StatusCode, needle: &str) {
        let body = String::from_utf8_lossy(&r.body);
        let short = if body.len() > 300 {
            format!("{}...", &body[..300])
        } else {
            body.to_string()
        };
        let error = serde_json::from_slice::<Value>(&r.body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string));
        self.check(
            r.status == want && error.as_deref().is_some_and(|e| e.contains(needle)),
            || {
                format!(
                    "{what}: expected {want} with an error mentioning {needle:?}, got {} {short}",
                    r.status
                )
            },
        );
    }

    /// A refused build creation: 400 and ClusterRunner's status response with its `error`.
    fn refused(&mut self, what: &str, r: &Resp, needle: &str) {
        self.rest(what, r, StatusCode::BAD_REQUEST, needle);
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        self.check(v["status"] == "FAILURE" && v["STATUS"] == "FAILURE", || {
            format!(
                "{what}: expected a FAILURE status response, got {} {}",
                r.status,
                String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
            )
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster and HTTP helpers
// ---------------------------------------------------------------------------------------------

struct Env {
    c: LocalCluster,
    http: reqwest::Client,
    base: String,
    dir: tempfile::TempDir,
}

async fn start(slaves: u32, executors: u32, gateway: bool) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = LocalOptions::new(dir.path().to_path_buf(), slaves, executors);
    if gateway {
        opts.gateway_listen = Some("127.0.0.1:0".into());
    }
    opts.master.heartbeat_interval_ms = 200;
    // Fake slaves driven by hand send no heartbeats; no test runs long enough to miss them.
    opts.master.heartbeat_timeout_ms = 60_000;
    opts.slave.kill_grace_ms = 1_000;
    let c = LocalCluster::start(opts).await.unwrap();
    wait_slaves(&c, slaves as usize).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let base = c
        .gateway_addr
        .map(|a| format!("http://{a}"))
        .unwrap_or_default();
    Env { c, http, base, dir }
}

async fn slaves(c: &LocalCluster) -> Vec<proto::Slave> {
    let (_, mut cl) = c.clients().await.unwrap();
    cl.list_slaves(proto::ListSlavesRequest {})
        .await
        .unwrap()
        .into_inner()
        .slaves
}

async fn wait_slaves(c: &LocalCluster, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while slaves(c).await.len() != n {
        assert!(Instant::now() < deadline, "expected {n} slaves");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What an HTTP call returned.
struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Env {
    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<reqwest::Body>,
    ) -> Resp {
        let url = format!("{}{path}", self.base);
        let mut rb = self.http.request(method, &url);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.body(b);
        }
        let r = rb.send().await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
        Resp {
            status: r.status(),
            headers: r.headers().clone(),
            body: r.bytes().await.unwrap().to_vec(),
        }
    }

    /// [`Env::call`] that reports a failed exchange instead of panicking.
    async fn try_call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: reqwest::Body,
    ) -> Result<Resp, String> {
        let url = format!("{}{path}", self.base);
        let mut rb = self.http.request(method, &url).body(body);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let r = rb.send().await.map_err(|e| format!("{e:?}"))?;
        let status = r.status();
        let headers = r.headers().clone();
        let body = r.bytes().await.map_err(|e| format!("{e:?}"))?.to_vec();
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    /// A raw HTTP/1.1 request that declares a body of `length` bytes and waits for
    /// `100 Continue` before sending it (as curl does for large uploads): returns the status
    /// line and body of the final answer, or `None` if the server asked for the body.
    async fn expect_continue(
        &self,
        path: &str,
        length: usize,
        digest: &str,
    ) -> Option<(String, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.c.gateway_addr.unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {length}\r\n{DIGEST}: {digest}\r\nExpect: 100-continue\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let n = match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) | Err(_) => 0,
            };
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if text.starts_with("HTTP/1.1 100") {
                return None;
            }
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    let status = head.lines().next().unwrap_or_default().to_string();
                    return Some((status, body.to_string()));
                }
            }
        }
        Some((String::from_utf8_lossy(&got).to_string(), String::new()))
    }

    async fn get(&self, path: &str) -> Resp {
        self.call(Method::GET, path, &[], None).await
    }

    /// A request whose body carries its correct digest.
    async fn signed(&self, method: Method, path: &str, body: impl Into<Vec<u8>>) -> Resp {
        let body = body.into();
        let d = ish_core::auth::digest(&self.c.secret, &body);
        self.call(method, path, &[(DIGEST, &d)], Some(body.into()))
            .await
    }

    async fn post_build(&self, body: &Value) -> Resp {
        self.signed(Method::POST, "/v1/build", body.to_string())
            .await
    }

    async fn count_builds(&self) -> usize {
        let r = self.get("/v1/build").await;
        assert_eq!(r.status, StatusCode::OK);
        serde_json::from_slice::<Value>(&r.body).unwrap()["builds"]
            .as_array()
            .unwrap()
            .len()
    }

    async fn builds(&self) -> BuildsClient {
        self.c.clients().await.unwrap().0
    }

    /// A raw slave-link client presenting `secret` (the cluster's when `None`).
    async fn link(&self, secret: Option<&str>) -> SlaveLinkClient {
        let channel = Channel::from_shared(self.c.master_url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let auth = SecretInterceptor::new(secret.unwrap_or(&self.c.secret)).unwrap();
        proto::slave_link_client::SlaveLinkClient::with_interceptor(channel, auth)
    }
}

/// The check every test ends with: a directory project with a clusterrunner.yaml of 3 atoms
/// builds to FINISHED / NO_FAILURES on the same cluster.
async fn a_normal_build_runs(env: &Env, f: &mut Failures) {
    let project = project_with(
        "Normal:\n  commands:\n    - echo \"atom $N\" > \"$ARTIFACT_DIR/out\"\n    - echo \"done $N\"\n  atomizers:\n    - N: seq 3\n",
    );
    let mut b = env.builds().await;
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

/// A directory build request (REST) whose job is `config`.
fn dir_build(dir: &Path, config: Value) -> Value {
    json!({"type": "directory", "project_directory": dir.display().to_string(), "config": config})
}

/// A valid inline job.
fn simple_config() -> Value {
    json!({"commands": ["echo \"hi $X\""], "atomizers": [{"X": "printf 'a\\nb\\n'"}]})
}

/// A job config nested `depth` levels deep (the job mapping is the first level).
fn nested_config(depth: usize) -> Value {
    let mut v = json!("x");
    for _ in 0..depth.saturating_sub(2) {
        v = json!([v]);
    }
    json!({"commands": [v], "atomizers": [{"A": "echo 1"}]})
}

/// Text of a JSON config nested `depth` levels deep, without building the value (for depths a
/// recursive serializer would not survive).
fn nested_config_text(depth: usize) -> String {
    let n = depth.saturating_sub(2);
    format!(
        "{{\"commands\": [{}\"x\"{}], \"atomizers\": [{{\"A\": \"echo 1\"}}]}}",
        "[".repeat(n),
        "]".repeat(n)
    )
}

/// A job config over `jobconfig::MAX_CONFIG_BYTES`.
fn huge_config() -> Value {
    json!({"commands": ["x".repeat(MAX_CONFIG + 1)], "atomizers": [{"A": "echo 1"}]})
}

fn atoms(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("export A=\"{i}\";")).collect()
}

/// A shell loop that waits (at most 60 s) for `gate` to exist.
fn wait_for_gate(gate: &Path) -> String {
    format!(
        "for i in $(seq 1 1200); do [ -f '{}' ] && break; sleep 0.05; done",
        gate.display()
    )
}

// ---------------------------------------------------------------------------------------------
// REST: build requests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_bad_build_requests_are_refused_and_store_nothing() {
    let env = start(1, 2, true).await;
    let mut f = Failures::default();
    let project = tempfile::tempdir().unwrap();
    let pdir = project.path().display().to_string();
    let before = env.count_builds().await;

    // Malformed JSON: 400 {"error": "Invalid JSON in request body."}, digest or not.
    for body in [
        &b"{\"type\": "[..],
        b"{not json",
        b"[1,2",
        b"\"unterminated",
        b"{\"type\": \"git\",}",
        b"\xff\xfe{}",
        b"{} trailing",
    ] {
        let r = env.signed(Method::POST, "/v1/build", body).await;
        f.rest(
            &format!("malformed JSON {:?}", String::from_utf8_lossy(body)),
            &r,
            StatusCode::BAD_REQUEST,
            INVALID_JSON,
        );
        let r = env
            .call(Method::POST, "/v1/build", &[], Some(body.to_vec().into()))
            .await;
        f.rest(
            &format!(
                "malformed JSON without a digest {:?}",
                String::from_utf8_lossy(body)
            ),
            &r,
            StatusCode::BAD_REQUEST,
            INVALID_JSON,
        );
    }

    // JSON that is not an object.
    for body in ["[1,2]", "\"x\"", "42", "null", "true", "[]"] {
        let r = env.signed(Method::POST, "/v1/build", body).await;
        f.refused(&format!("non-object body {body}"), &r, "JSON object");
    }

    // Wrong types, unknown fields, missing fields: refused by the gateway, naming the field.
    let cases: Vec<(&str, Value, &str)> = vec![
        ("url: 5", json!({"type": "git", "url": 5}), "url"),
        (
            "url: object",
            json!({"type": "git", "url": {"x": 1}}),
            "url",
        ),
        (
            "branch: list",
            json!({"type": "git", "url": "/tmp/r", "branch": []}),
            "branch",
        ),
        (
            "hash: number",
            json!({"type": "git", "url": "/tmp/r", "hash": 1234567}),
            "hash",
        ),
        (
            "project_directory: bool",
            json!({"type": "directory", "project_directory": true}),
            "project_directory",
        ),
        (
            "job_name: number",
            json!({"type": "directory", "project_directory": pdir, "job_name": 7}),
            "job_name",
        ),
        (
            "atoms_override: string",
            json!({"type": "directory", "project_directory": pdir, "atoms_override": "x"}),
            "atoms_override",
        ),
        (
            "atoms_override: numbers",
            json!({"type": "directory", "project_directory": pdir, "atoms_override": [1, 2]}),
            "atoms_override",
        ),
        (
            "config: string",
            json!({"type": "directory", "project_directory": pdir, "config": "not an object"}),
            "config",
        ),
        (
            "config: list",
            json!({"type": "directory", "project_directory": pdir, "config": [simple_config()]}),
            "config",
        ),
        (
            "remote_files: list",
            json!({"type": "directory", "project_directory": pdir, "remote_files": ["a"]}),
            "remote_files",
        ),
        (
            "remote_files: URL not a string",
            json!({"type": "directory", "project_directory": pdir, "remote_files": {"a": 5}}),
            "remote_files",
        ),
        (
            "type: number",
            json!({"type": 5, "url": "/tmp/r"}),
            "Invalid build request type.",
        ),
        (
            "type: svn",
            json!({"type": "svn", "url": "/tmp/r"}),
            "Invalid build request type.",
        ),
        (
            "unknown field colour",
            json!({"type": "directory", "project_directory": pdir, "colour": "red"}),
            "['colour']",
        ),
        (
            "unknown field priority (git)",
            json!({"type": "git", "url": "/tmp/r", "priority": 1}),
            "['priority']",
        ),
        (
            "a git-only field on a directory build",
            json!({"type": "directory", "project_directory": pdir, "url": "/tmp/r"}),
            "['url']",
        ),
        (
            "missing type",
            json!({"project_directory": pdir}),
            "Invalid build request type.",
        ),
        ("empty object", json!({}), "Invalid build request type."),
        (
            "missing url",
            json!({"type": "git", "branch": "master"}),
            "Missing required parameter. Required parameters: ['url']",
        ),
        (
            "blank url",
            json!({"type": "git", "url": "  "}),
            "Missing required parameter. Required parameters: ['url']",
        ),
        (
            "missing project_directory",
            json!({"type": "directory", "config": simple_config()}),
            "Missing required parameter. Required parameters: ['project_directory']",
        ),
    ];
    for (what, body, needle) in &cases {
        let r = env.post_build(body).await;
        f.refused(what, &r, needle);
    }
    let r = env.signed(Method::POST, "/v1/build", "").await;
    f.refused("empty body", &r, "Invalid build request type.");

    // Refused by the master, with its message.
    let master_cases: Vec<(&str, Value, &str)> = vec![
        (
            "relative project_directory",
            json!({"type": "directory", "project_directory": "relative/dir"}),
            "absolute",
        ),
        (
            "git project_directory ../x",
            json!({"type": "git", "url": "/tmp/r", "project_directory": "../x"}),
            "project_directory",
        ),
        (
            "git hash not hex",
            json!({"type": "git", "url": "/tmp/r", "hash": "not-a-hash"}),
            "hash",
        ),
        (
            "config nested 100 levels deep",
            dir_build(project.path(), nested_config(100)),
            "nested too deeply",
        ),
        (
            "config over 1 MiB",
            dir_build(project.path(), huge_config()),
            // The limit, however the message words it.
            "1048576 bytes",
        ),
        (
            "config with a bad section",
            dir_build(
                project.path(),
                json!({"commands": "echo", "atomizers": [{"A": "ls"}]}),
            ),
            "commands",
        ),
        (
            "config with a bad atomizer variable",
            dir_build(
                project.path(),
                json!({"commands": ["echo"], "atomizers": [{"1-A": "ls"}]}),
            ),
            "1-A",
        ),
        (
            "an empty atom in atoms_override",
            json!({"type": "directory", "project_directory": pdir, "atoms_override": [""]}),
            "atoms_override",
        ),
        (
            "atoms_override of 200,001 entries",
            json!({"type": "directory", "project_directory": pdir,
                   "config": simple_config(), "atoms_override": atoms(2 * MAX_ATOMS + 1)}),
            "max_atoms_per_build",
        ),
    ];
    for (what, body, needle) in &master_cases {
        let r = env.post_build(body).await;
        f.refused(what, &r, needle);
    }

    // remote_files: traversal names and non-http URLs.
    for name in [
        "../x",
        "/etc/x",
        "a/../../x",
        "",
        "a//b",
        "./x",
        "x/..",
        "a\\b",
    ] {
        let body = json!({"type": "directory", "project_directory": pdir,
                          "remote_files": {name: "http://127.0.0.1:9/f"}});
        let r = env.post_build(&body).await;
        f.refused(&format!("remote_files name {name:?}"), &r, "remote_files");
    }
    for url in [
        "file:///etc/passwd",
        "ftp://127.0.0.1/x",
        "/etc/passwd",
        "gopher://x",
    ] {
        let body = json!({"type": "directory", "project_directory": pdir,
                          "remote_files": {"f.txt": url}});
        let r = env.post_build(&body).await;
        f.refused(&format!("remote_files URL {url:?}"), &r, "remote_files");
    }

    let after = env.count_builds().await;
    f.check(after == before, || {
        format!("refused requests stored builds: {before} before, {after} after")
    });
    a_normal_build_runs(&env, &mut f).await;
    env.c.shutdown().await.unwrap();
    f.finish();
}

// ---------------------------------------------------------------------------------------------
// REST: body size, digests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_oversized_bodies_and_bad_digests_are_refused() {
    let env = start(1, 2, true).await;
    let mut f = Failures::default();
    let project = tempfile::tempdir().unwrap();
    let before = env.count_builds().await;

    // A body of exactly max_body_bytes is read (and refused for its unknown field); one byte more
    // is 413, whether its length is declared or it comes chunked.
    let padded = |total: usize| -> Vec<u8> {
        let head = format!(
            "{{\"type\": \"directory\", \"project_directory\": \"{}\", \"padding\": \"",
            project.path().display()
        );
        let tail = "\"}";
        let mut body = head.into_bytes();
        body.resize(total - tail.len(), b'x');
        body.extend_from_slice(tail.as_bytes());
        body
    };
    let at_limit = padded(MAX_BODY);
    assert_eq!(at_limit.len(), MAX_BODY);
    let r = env.signed(Method::POST, "/v1/build", at_limit).await;
    f.refused("a body of exactly max_body_bytes", &r, "['padding']");
    let over = padded(MAX_BODY + 1);
    let d = ish_core::auth::digest(&env.c.secret, &over);
    // Declared too long and waiting for 100 Continue (curl): the 413 comes before any body.
    for path in ["/v1/build", "/v1/build/1", "/v1/slave/shutdown"] {
        let got = env.expect_continue(path, MAX_BODY + 1, &d).await;
        let ok = got.as_ref().is_some_and(|(status, body)| {
            status.starts_with("HTTP/1.1 413")
                && serde_json::from_str::<Value>(body).is_ok_and(|v| {
                    v["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("larger than the limit"))
                })
        });
        f.check(ok, || {
            format!("POST {path}, Content-Length max_body_bytes + 1, Expect: 100-continue: expected 413 with a JSON error, got {got:?}")
        });
    }
    // The whole body sent (reqwest, Python's requests): the client must still get the 413.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        over.chunks(256 << 10).map(|c| Ok(c.to_vec())).collect();
    for (what, method, path, body) in [
        (
            "a body of max_body_bytes + 1",
            Method::POST,
            "/v1/build",
            reqwest::Body::from(over.clone()),
        ),
        (
            "a chunked body of max_body_bytes + 1",
            Method::POST,
            "/v1/build",
            reqwest::Body::wrap_stream(tokio_stream::iter(chunks)),
        ),
        (
            "a cancel body of max_body_bytes + 1",
            Method::PUT,
            "/v1/build/1",
            reqwest::Body::from(over.clone()),
        ),
    ] {
        match env
            .try_call(method.clone(), path, &[(DIGEST, &d)], body)
            .await
        {
            Ok(r) => f.rest(
                what,
                &r,
                StatusCode::PAYLOAD_TOO_LARGE,
                "larger than the limit",
            ),
            Err(e) => f.check(false, || {
                format!("{what} ({method} {path}): expected 413, the exchange failed: {e}")
            }),
        }
    }

    // Digests: a valid body that would create a build, with every kind of bad digest.
    let secret = env.c.secret.clone();
    // Pick a job name whose digest has a byte starting with 0 (for the `+` case below).
    let (body, good) = (0..)
        .map(|i| {
            let body = dir_build(project.path(), simple_config());
            let mut body = body;
            body["job_name"] = format!("Signed{i}").into();
            let body = body.to_string();
            let d = ish_core::auth::digest(&secret, body.as_bytes());
            (body, d)
        })
        .find(|(_, d)| (0..d.len()).step_by(2).any(|j| &d[j..=j] == "0"))
        .unwrap();
    let other_body = body.replace("Signed", "Other");
    let zero_at = (0..good.len())
        .step_by(2)
        .find(|&j| &good[j..=j] == "0")
        .unwrap();
    let mut plus = good.clone();
    plus.replace_range(zero_at..=zero_at, "+");
    let flipped = {
        let last = good.chars().last().unwrap();
        let swapped = if last == '0' { '1' } else { '0' };
        format!("{}{swapped}", &good[..good.len() - 1])
    };
    let bad_digests: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("empty", Some(String::new())),
        ("wrong", Some("ab".repeat(64))),
        ("one digit changed", Some(flipped)),
        ("not hex", Some("zz".repeat(64))),
        ("odd length", Some(good[..127].to_string())),
        ("truncated", Some(good[..64].to_string())),
        ("too long", Some(format!("{good}00"))),
        (
            "digest of another body",
            Some(ish_core::auth::digest(&secret, other_body.as_bytes())),
        ),
        (
            "correct digest under another secret",
            Some(ish_core::auth::digest(
                "another-secret-value",
                body.as_bytes(),
            )),
        ),
        ("a '+' sign in place of a leading 0 digit", Some(plus)),
        ("the secret itself", Some(secret.clone())),
    ];
    for (what, digest) in &bad_digests {
        let headers: Vec<(&str, &str)> = digest
            .as_deref()
            .map(|d| vec![(DIGEST, d)])
            .unwrap_or_default();
        let r = env
            .call(
                Method::POST,
                "/v1/build",
                &headers,
                Some(body.clone().into()),
            )
            .await;
        f.rest(
            &format!("POST /v1/build with digest {what}"),
            &r,
            StatusCode::UNAUTHORIZED,
            DIGEST_MISMATCH,
        );
        let r = env
            .call(Method::POST, "/builds", &headers, Some(body.clone().into()))
            .await;
        f.rest(
            &format!("POST /builds with digest {what}"),
            &r,
            StatusCode::UNAUTHORIZED,
            DIGEST_MISMATCH,
        );
    }
    // The form encoding: the digest covers the field's value, not the form body.
    let form = format!(
        "__encoded_body__={}",
        body.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    );
    let over_form = ish_core::auth::digest(&secret, form.as_bytes());
    let r = env
        .call(
            Method::POST,
            "/v1/build",
            &[
                (DIGEST, &over_form),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            Some(form.clone().into()),
        )
        .await;
    f.rest(
        "a form body signed over the form instead of the field",
        &r,
        StatusCode::UNAUTHORIZED,
        DIGEST_MISMATCH,
    );
    // Cancel and slave shutdown need the digest too.
    for (method, path, body) in [
        (Method::PUT, "/v1/build/1", "{\"status\": \"canceled\"}"),
        (
            Method::POST,
            "/v1/slave/shutdown",
            "{\"shutdown_all\": true}",
        ),
        (Method::POST, "/v1/slave/1/shutdown", "{}"),
    ] {
        let r = env
            .call(
                method.clone(),
                path,
                &[(DIGEST, &"00".repeat(64))],
                Some(body.into()),
            )
            .await;
        f.rest(
            &format!("{method} {path} with a wrong digest"),
            &r,
            StatusCode::UNAUTHORIZED,
            DIGEST_MISMATCH,
        );
    }
    let after = env.count_builds().await;
    f.check(after == before, || {
        format!("unauthenticated requests stored builds: {before} before, {after} after")
    });
    f.check(slaves(&env.c).await.len() == 1, || {
        "an unauthenticated shutdown drained the slave".into()
    });

    // The same body with its correct digest is accepted: the refusals were the digest's.
    let r = env
        .call(
            Method::POST,
            "/v1/build",
            &[(DIGEST, &good)],
            Some(body.clone().into()),
        )
        .await;
    f.check(r.status == StatusCode::ACCEPTED, || {
        format!(
            "the correctly signed body was refused: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )
    });
    if let Some(id) = serde_json::from_slice::<Value>(&r.body)
        .ok()
        .and_then(|v| v["build_id"].as_u64())
    {
        let b = wait_final(&mut env.builds().await, id).await;
        f.check(state(&b) == proto::BuildState::Finished, || {
            format!("the signed build did not finish: {b:#?}")
        });
    }
    a_normal_build_runs(&env, &mut f).await;
    env.c.shutdown().await.unwrap();
    f.finish();
}

// ---------------------------------------------------------------------------------------------
// REST: the small mismatches of issue 9, item 11
// ---------------------------------------------------------------------------------------------

impl Env {
    /// Sends `request` as is on a new connection; the answer's status line and body.
    async fn raw(&self, request: &[u8]) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.c.gateway_addr.unwrap())
            .await
            .unwrap();
        s.write_all(request).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                });
                if len.is_some_and(|n| body.len() >= n) {
                    let status = head.lines().next().unwrap_or_default().to_string();
                    return (status, body.to_string());
                }
            }
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return (text, String::new()),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_malformed_chunks_hosts_timeouts_and_hostile_fields_are_refused() {
    let env = start(1, 2, true).await;
    let mut f = Failures::default();
    let project = tempfile::tempdir().unwrap();
    let pdir = project.path().display().to_string();
    let before = env.count_builds().await;

    // A malformed chunked body is a bad request, not a body over the limit.
    for (what, chunks) in [
        ("a chunk size that is not hex", "ZZ\r\nabc\r\n0\r\n\r\n"),
        ("a negative chunk size", "-1\r\nabc\r\n0\r\n\r\n"),
        (
            "a chunk longer than its size",
            "3\r\n{\"type\": \"git\"}\r\n0\r\n\r\n",
        ),
        (
            "a chunk size past 64 bits",
            "FFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n",
        ),
    ] {
        let req = format!(
            "POST /v1/build HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n{DIGEST}: 00\r\n\r\n{chunks}"
        );
        let (status, body) = env.raw(req.as_bytes()).await;
        let error = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string));
        f.check(
            status.starts_with("HTTP/1.1 400")
                && error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("The request body could not be read")),
            || format!("{what}: expected 400 with a JSON error, got {status:?} {body:?}"),
        );
    }

    // atom_timeout / build_timeout beyond their range are refused, naming the field and range.
    for (section, value, expected) in [
        (
            "atom_timeout",
            4_294_967_296_i64,
            "a number of seconds from 1 to 4294967295",
        ),
        (
            "build_timeout",
            4_294_967_296,
            "a number of seconds from 1 to 4294967295",
        ),
        ("atom_timeout", 0, "a positive integer"),
        ("build_timeout", -1, "a positive integer"),
    ] {
        let mut config = simple_config();
        config[section] = json!(value);
        let r = env.post_build(&dir_build(project.path(), config)).await;
        f.refused(
            &format!("{section}: {value}"),
            &r,
            &format!("config section \"{section}\". Expected {expected} but found {value}."),
        );
    }

    // A NUL in a path, URL, branch or job name; a git url git would read as an option.
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "a NUL in project_directory",
            json!({"type": "directory", "project_directory": format!("{pdir}\u{0}x"),
                   "config": simple_config()}),
            "NUL",
        ),
        (
            "a NUL in a git project_directory",
            json!({"type": "git", "url": "/tmp/r", "project_directory": "sub\u{0}dir"}),
            "NUL",
        ),
        (
            "a NUL in a git url",
            json!({"type": "git", "url": "/tmp/r\u{0}x"}),
            "NUL",
        ),
        (
            "a NUL in a branch",
            json!({"type": "git", "url": "/tmp/r", "branch": "mas\u{0}ter"}),
            "NUL",
        ),
        (
            "a NUL in job_name",
            json!({"type": "directory", "project_directory": pdir, "job_name": "J\u{0}",
                   "config": simple_config()}),
            "NUL",
        ),
        (
            "a git url starting with -",
            json!({"type": "git", "url": "-oProxyCommand=touch /tmp/pwned"}),
            "cannot start with '-'",
        ),
        (
            "a git url of --upload-pack",
            json!({"type": "git", "url": "--upload-pack=touch /tmp/pwned", "branch": "master"}),
            "cannot start with '-'",
        ),
    ];
    for (what, body, needle) in &cases {
        let r = env.post_build(body).await;
        f.refused(what, &r, needle);
    }
    let after = env.count_builds().await;
    f.check(after == before, || {
        format!("refused requests stored builds: {before} before, {after} after")
    });

    // The Host header goes into a finished build's `artifacts` URL only when it is a plain
    // host[:port]; anything else gives the gateway's own address.
    let r = env
        .post_build(&dir_build(project.path(), simple_config()))
        .await;
    let id = serde_json::from_slice::<Value>(&r.body).unwrap()["build_id"]
        .as_u64()
        .unwrap();
    let b = wait_final(&mut env.builds().await, id).await;
    f.check(state(&b) == proto::BuildState::Finished, || {
        format!("the build did not finish: {b:#?}")
    });
    let gw = env.c.gateway_addr.unwrap();
    let own = format!("http://{gw}/v1/build/{id}/artifacts.zip");
    for (host, want) in [
        (
            "gw.example.com:8080".to_string(),
            format!("http://gw.example.com:8080/v1/build/{id}/artifacts.zip"),
        ),
        (
            "[::1]:43000".to_string(),
            format!("http://[::1]:43000/v1/build/{id}/artifacts.zip"),
        ),
        ("evil\"><script>alert(1)</script>".to_string(), own.clone()),
        ("evil.example/steal?x=".to_string(), own.clone()),
        ("user@evil.example".to_string(), own.clone()),
        ("a b".to_string(), own.clone()),
        ("evil.example#".to_string(), own.clone()),
        ("gw:99999".to_string(), own.clone()),
    ] {
        let r = env
            .call(
                Method::GET,
                &format!("/v1/build/{id}"),
                &[("Host", &host)],
                None,
            )
            .await;
        let got = serde_json::from_slice::<Value>(&r.body)
            .ok()
            .and_then(|v| v["build"]["artifacts"].as_str().map(str::to_string));
        f.check(
            r.status == StatusCode::OK && got.as_deref() == Some(want.as_str()),
            || {
                format!(
                    "Host {host:?}: expected artifacts {want:?}, got {} {got:?}",
                    r.status
                )
            },
        );
    }

    a_normal_build_runs(&env, &mut f).await;
    env.c.shutdown().await.unwrap();
    f.finish();
}

// ---------------------------------------------------------------------------------------------
// REST: routes, methods, query parameters, cancel bodies, artifacts
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_bad_routes_methods_params_and_cancel_bodies() {
    let env = start(1, 2, true).await;
    let mut f = Failures::default();
    let project = tempfile::tempdir().unwrap();

    // A build that runs until its gate opens: bad cancels must leave it running.
    let gate = project.path().join("gate");
    let r = env
        .post_build(&dir_build(
            project.path(),
            json!({"commands": [wait_for_gate(&gate), "echo \"line one\"", "echo \"line two\""],
                   "atomizers": [{"X": "echo 1"}]}),
        ))
        .await;
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let id = serde_json::from_slice::<Value>(&r.body).unwrap()["build_id"]
        .as_u64()
        .unwrap();
    let mut b = env.builds().await;
    wait_for(&mut b, id, Duration::from_secs(60), |b| {
        state(b) == proto::BuildState::Building
    })
    .await;

    // Cancel bodies other than {"status": "canceled"}.
    let cancels: Vec<(&str, &str, Option<&str>)> = vec![
        ("{}", "empty object", None),
        (
            "{\"status\": \"done\"}",
            "another status",
            Some("Value (done)"),
        ),
        (
            "{\"status\": \"CANCELED\"}",
            "upper-case status",
            Some("Value (CANCELED)"),
        ),
        ("{\"status\": 1}", "numeric status", Some("Value (1)")),
        ("{\"colour\": \"x\"}", "another key", Some("Key (colour)")),
        (
            "{\"status\": \"canceled\", \"x\": 1}",
            "an extra key",
            Some("Key (x)"),
        ),
        ("[\"canceled\"]", "a list", Some("JSON object")),
        ("\"canceled\"", "a string", Some("JSON object")),
    ];
    for (body, what, needle) in &cancels {
        let r = env
            .signed(Method::PUT, &format!("/v1/build/{id}"), *body)
            .await;
        match needle {
            Some(n) => f.refused(&format!("cancel with {what}"), &r, n),
            None => {
                let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                f.check(
                    r.status == StatusCode::BAD_REQUEST
                        && v == json!({"status": "FAILURE", "STATUS": "FAILURE"}),
                    || {
                        format!(
                            "cancel with {what}: expected 400 {{\"status\": \"FAILURE\", ...}}, got {} {v}",
                            r.status
                        )
                    },
                );
            }
        }
    }
    let r = env
        .signed(Method::PUT, &format!("/v1/build/{id}"), "{\"status\": ")
        .await;
    f.rest(
        "cancel with malformed JSON",
        &r,
        StatusCode::BAD_REQUEST,
        INVALID_JSON,
    );
    let r = env
        .signed(Method::PUT, "/v1/build/999", "{\"status\": \"nope\"}")
        .await;
    f.rest(
        "cancel of an unknown build with a bad body",
        &r,
        StatusCode::NOT_FOUND,
        "Invalid build id: 999.",
    );
    let still = get(&mut b, id).await;
    f.check(state(&still) == proto::BuildState::Building, || {
        format!("a refused cancel changed the build: {still:#?}")
    });

    // Non-numeric ids and unknown routes: 404 {"error": "Not found: <path>"}.
    for path in [
        "/v1/build/abc",
        "/v1/build/-1",
        "/v1/build/1.5",
        "/v1/build/1e3",
        "/v1/build/0x1",
        "/v1/build/%20",
        "/v1/build/99999999999999999999999",
        "/v1/build/abc/subjob",
        "/v1/build/1/subjob/x",
        "/v1/build/1/subjob/0/atom/y/console",
        "/builds/abc",
        "/v1/slave/abc",
        "/v1/nope",
        "/v2/build",
        "/v1/build/1/nope",
        "/v1/build/1/subjob/0/atom/0/console/more",
        "/v1//build",
        "/v1/build//",
    ] {
        let r = env.get(path).await;
        f.rest(
            &format!("GET {path}"),
            &r,
            StatusCode::NOT_FOUND,
            "Not found",
        );
    }
    let r = env
        .signed(Method::PUT, "/v1/build/abc", "{\"status\": \"canceled\"}")
        .await;
    f.rest("PUT /v1/build/abc", &r, StatusCode::NOT_FOUND, "Not found");
    let r = env
        .signed(Method::POST, "/v1/builds", "{\"type\": \"git\"}")
        .await;
    f.rest("POST /v1/builds", &r, StatusCode::NOT_FOUND, "Not found");

    // Wrong methods on existing routes: 405 with Allow.
    for (method, path) in [
        (Method::DELETE, "/v1/build".to_string()),
        (Method::PUT, "/v1/build".to_string()),
        (Method::PATCH, format!("/v1/build/{id}")),
        (Method::DELETE, format!("/v1/build/{id}")),
        (Method::POST, format!("/v1/build/{id}")),
        (Method::POST, format!("/v1/build/{id}/subjob")),
        (Method::DELETE, "/v1/version".to_string()),
        (Method::PUT, "/v1/queue".to_string()),
        (Method::POST, format!("/v1/build/{id}/artifacts.zip")),
        (Method::DELETE, "/builds".to_string()),
    ] {
        let r = env
            .call(method.clone(), &path, &[], Some("{}".into()))
            .await;
        f.rest(
            &format!("{method} {path}"),
            &r,
            StatusCode::METHOD_NOT_ALLOWED,
            "HTTP 405: Method Not Allowed",
        );
        f.check(r.headers.contains_key("allow"), || {
            format!("{method} {path}: 405 without an Allow header")
        });
    }

    // Let the build finish, then page its console with bad parameters.
    std::fs::write(&gate, "").unwrap();
    let done = wait_final(&mut b, id).await;
    f.check(done.result == proto::BuildResult::NoFailures as i32, || {
        format!("the gated build did not pass: {done:#?}")
    });
    let console = format!("/v1/build/{id}/subjob/0/atom/0/console");
    let r = env.get(&format!("{console}?max_lines=5")).await;
    f.check(r.status == StatusCode::OK, || {
        format!(
            "{console}: the valid console read failed: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )
    });
    for q in [
        "max_lines=0",
        "max_lines=abc",
        "max_lines=-5",
        "max_lines=1.5",
        "max_lines=",
        "offset_line=-1",
        "offset_line=x",
        "offset_line=1e2",
        "offset_line=99999",
        "max_lines=0&offset_line=0",
    ] {
        for path in [
            format!("{console}?{q}"),
            format!("/builds/{id}/subjobs/0/atoms/0/console?{q}"),
        ] {
            let r = env.get(&path).await;
            f.rest(&format!("GET {path}"), &r, StatusCode::BAD_REQUEST, "");
        }
    }
    for (path, needle) in [
        (
            "/v1/build/999/subjob/0/atom/0/console".to_string(),
            "Invalid build id: 999.",
        ),
        (
            format!("/v1/build/{id}/subjob/99/atom/0/console"),
            "Invalid subjob id.",
        ),
        (
            format!("/v1/build/{id}/subjob/0/atom/99/console"),
            "Invalid atom id.",
        ),
        (
            format!("/v1/build/{id}/subjob/4294967296/atom/0/console"),
            "Invalid subjob id.",
        ),
    ] {
        let r = env.get(&path).await;
        f.rest(&format!("GET {path}"), &r, StatusCode::NOT_FOUND, needle);
    }
    // Other bad query parameters.
    for path in [
        "/builds?offset=x",
        "/builds?limit=1.5",
        "/v1/eventlog?since_id=abc",
        "/v1/eventlog?since_id=1&since_timestamp=2",
    ] {
        let r = env.get(path).await;
        f.rest(&format!("GET {path}"), &r, StatusCode::BAD_REQUEST, "");
    }

    // Artifacts of unknown builds: 404 with an empty body.
    for path in [
        "/v1/build/999/artifacts.zip",
        "/v1/build/999/artifacts.tar.gz",
        "/builds/999/artifacts.zip",
    ] {
        for method in [Method::GET, Method::HEAD] {
            let r = env.call(method.clone(), path, &[], None).await;
            f.check(
                r.status == StatusCode::NOT_FOUND && r.body.is_empty(),
                || {
                    format!(
                        "{method} {path}: expected 404 with an empty body, got {} {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    )
                },
            );
        }
    }
    // Unknown build, subjob, atom, slave on the JSON routes.
    for path in [
        "/v1/build/999".to_string(),
        "/v1/build/999/subjob".to_string(),
        format!("/v1/build/{id}/subjob/99"),
        format!("/v1/build/{id}/subjob/0/atom/99"),
        "/v1/slave/999".to_string(),
    ] {
        let r = env.get(&path).await;
        f.rest(&format!("GET {path}"), &r, StatusCode::NOT_FOUND, "");
    }
    let r = env
        .signed(Method::POST, "/v1/slave/shutdown", "{\"slaves\": [999]}")
        .await;
    f.rest(
        "shutdown of an unknown slave",
        &r,
        StatusCode::NOT_FOUND,
        "slave_id=999",
    );
    for body in [
        "{}",
        "{\"slaves\": \"all\"}",
        "{\"slaves\": [\"x\"]}",
        "[1]",
    ] {
        let r = env.signed(Method::POST, "/v1/slave/shutdown", body).await;
        f.rest(
            &format!("shutdown with {body}"),
            &r,
            StatusCode::BAD_REQUEST,
            "",
        );
    }
    f.check(slaves(&env.c).await.len() == 1, || {
        "a refused shutdown drained the slave".into()
    });

    a_normal_build_runs(&env, &mut f).await;
    env.c.shutdown().await.unwrap();
    f.finish();
}

// ---------------------------------------------------------------------------------------------
// gRPC: Builds and Cluster
// ---------------------------------------------------------------------------------------------

fn with_config(project: &Path, config: &str) -> proto::BuildRequest {
    proto::BuildRequest {
        config_json: config.into(),
        ..dir_request(project)
    }
}

fn with_env(project: &Path, env: &[(String, String)]) -> proto::BuildRequest {
    proto::BuildRequest {
        config_json: simple_config().to_string(),
        env: env.iter().cloned().collect(),
        ..dir_request(project)
    }
}

async fn submit_raw(
    b: &mut BuildsClient,
    request: Option<proto::BuildRequest>,
) -> Result<u64, Status> {
    match tokio::time::timeout(STEP, b.submit(proto::SubmitBuildRequest { request })).await {
        Ok(r) => r.map(|r| r.into_inner().build_id),
        Err(_) => Err(Status::deadline_exceeded("no answer to Submit in 20 s")),
    }
}

async fn build_total(b: &mut BuildsClient) -> u32 {
    b.list(proto::ListBuildsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .total
}

/// Reads a server stream to its end: the number of messages, or the status it failed with
/// (at the call or within the stream).
async fn drain<T>(
    r: Result<tonic::Response<tonic::Streaming<T>>, Status>,
) -> Result<usize, Status> {
    let mut s = r?.into_inner();
    let mut n = 0;
    loop {
        match tokio::time::timeout(STEP, s.message()).await {
            Ok(Ok(Some(_))) => n += 1,
            Ok(Ok(None)) => return Ok(n),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("stream silent for 20 s")),
        }
    }
}

/// GetConsole and TailConsole of an atom that does not exist: NOT_FOUND.
async fn unknown_console(
    f: &mut Failures,
    b: &mut BuildsClient,
    id: u64,
    subjob: u32,
    atom: u32,
    what: &str,
) {
    f.status(
        &format!("GetConsole of {what}"),
        b.get_console(proto::GetConsoleRequest {
            build_id: id,
            subjob_id: subjob,
            atom_id: atom,
            ..Default::default()
        })
        .await,
        Code::NotFound,
        None,
    );
    f.status(
        &format!("TailConsole of {what}"),
        drain(
            b.tail_console(proto::TailConsoleRequest {
                build_id: id,
                subjob_id: subjob,
                atom_id: atom,
                follow: true,
            })
            .await,
        )
        .await,
        Code::NotFound,
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_bad_requests_get_the_right_status_codes() {
    let env = start(1, 2, false).await;
    let mut f = Failures::default();
    let project = project_with("J:\n  commands: ['echo $N']\n  atomizers: [{N: 'seq 2'}]\n");
    let p = project.path();
    let mut b = env.builds().await;
    let before = build_total(&mut b).await;
    let ia = Code::InvalidArgument;

    // Sources and directories.
    f.status(
        "Submit without a request",
        submit_raw(&mut b, None).await,
        ia,
        None,
    );
    let cases: Vec<(&str, proto::BuildRequest, Option<&str>)> = vec![
        ("no source", proto::BuildRequest::default(), None),
        (
            "a source without a kind",
            proto::BuildRequest {
                source: Some(proto::ProjectSource { kind: None }),
                ..Default::default()
            },
            None,
        ),
        (
            "an empty directory path",
            dir_request(Path::new("")),
            Some("project_directory"),
        ),
        (
            "a relative directory path",
            dir_request(Path::new("rel/dir")),
            Some("absolute"),
        ),
        (
            "an empty git url",
            git_request("", "master", ""),
            Some("url"),
        ),
        (
            "a git hash that is not hex",
            git_request("/tmp/r", "master", "xyz1234"),
            Some("hash"),
        ),
        (
            "a git hash of 6 digits",
            git_request("/tmp/r", "master", "abcdef"),
            Some("hash"),
        ),
        (
            "a branch starting with -",
            git_request("/tmp/r", "--upload-pack=evil", ""),
            None,
        ),
        // Issue 9.11: git would read these as options, or C calls would cut them at the NUL.
        (
            "a git url starting with -",
            git_request("-oProxyCommand=touch /tmp/pwned", "master", ""),
            Some("cannot start with '-'"),
        ),
        (
            "a git url of --upload-pack",
            git_request("--upload-pack=touch /tmp/pwned", "master", ""),
            Some("cannot start with '-'"),
        ),
        (
            "a NUL in a directory path",
            dir_request(Path::new("/tmp/a\0b")),
            Some("NUL"),
        ),
        (
            "a NUL in a git project_directory",
            proto::BuildRequest {
                project_directory: "sub\0dir".into(),
                ..git_request("/tmp/r", "master", "")
            },
            Some("NUL"),
        ),
        (
            "a NUL in a git url",
            git_request("/tmp/r\0x", "master", ""),
            Some("NUL"),
        ),
        (
            "a NUL in a branch",
            git_request("/tmp/r", "mas\0ter", ""),
            Some("NUL"),
        ),
        (
            "a NUL in a job name",
            proto::BuildRequest {
                job_name: "J\0".into(),
                ..dir_request(p)
            },
            Some("NUL"),
        ),
    ];
    for (what, req, needle) in cases {
        f.status(what, submit_raw(&mut b, Some(req)).await, ia, needle);
    }
    for pd in ["../x", "a/../../x", "/abs", ".."] {
        let req = proto::BuildRequest {
            project_directory: pd.into(),
            ..git_request("/tmp/r", "master", "")
        };
        f.status(
            &format!("project_directory {pd:?}"),
            submit_raw(&mut b, Some(req)).await,
            ia,
            Some("project_directory"),
        );
    }

    // Inline configs.
    for (what, text, needle) in [
        (
            "config_json invalid JSON",
            "{\"commands\": ".to_string(),
            None,
        ),
        (
            "config_json a list",
            "[1]".to_string(),
            Some("not a dictionary"),
        ),
        (
            "config_json a string",
            "\"x\"".to_string(),
            Some("not a dictionary"),
        ),
        ("config_json null", "null".to_string(), None),
        (
            "config_json with trailing text",
            format!("{} x", simple_config()),
            None,
        ),
        (
            "config_json nested 100 levels deep",
            nested_config(100).to_string(),
            Some("nested too deeply"),
        ),
        (
            "config_json nested 100,000 levels deep",
            nested_config_text(100_000),
            None,
        ),
        (
            "config_json over 1 MiB",
            huge_config().to_string(),
            Some("1048576 bytes"),
        ),
        (
            "config_json without atomizers",
            "{\"commands\": [\"x\"]}".to_string(),
            Some("atomizers"),
        ),
    ] {
        f.status(
            what,
            submit_raw(&mut b, Some(with_config(p, &text))).await,
            ia,
            needle,
        );
    }

    // Atom counts.
    for n in [MAX_ATOMS + 1, 2 * MAX_ATOMS + 1] {
        let req = proto::BuildRequest {
            atoms_override: atoms(n),
            ..dir_request(p)
        };
        f.status(
            &format!("atoms_override of {n} entries"),
            submit_raw(&mut b, Some(req)).await,
            ia,
            Some("max_atoms_per_build"),
        );
    }
    // Atoms as a test suite's atomizer prints them (~50 bytes each): the count is what is wrong
    // with the request, whatever its size in bytes.
    let req = proto::BuildRequest {
        atoms_override: (0..2 * MAX_ATOMS + 1)
            .map(|i| format!("export TEST=\"tests/unit/module_{i:06}_test.py\";"))
            .collect(),
        ..dir_request(p)
    };
    f.status(
        "atoms_override of 200,001 test-file atoms (~10 MB)",
        submit_raw(&mut b, Some(req)).await,
        ia,
        Some("max_atoms_per_build"),
    );
    let req = proto::BuildRequest {
        atoms_override: vec!["export A=\"1\";".into(), "  ".into()],
        ..dir_request(p)
    };
    f.status(
        "a blank atom in atoms_override",
        submit_raw(&mut b, Some(req)).await,
        ia,
        None,
    );

    // Environment: names, count, sizes.
    for name in ["1X", "A-B", "", "A B", "A=B", "\u{c4}X", "X\0"] {
        f.status(
            &format!("env name {name:?}"),
            submit_raw(&mut b, Some(with_env(p, &[(name.into(), "v".into())]))).await,
            ia,
            Some("env"),
        );
    }
    let many: Vec<(String, String)> = (0..257).map(|i| (format!("V{i}"), "x".into())).collect();
    f.status(
        "env with 257 names",
        submit_raw(&mut b, Some(with_env(p, &many))).await,
        ia,
        Some("env"),
    );
    f.status(
        "an env value of 32 KiB + 1",
        submit_raw(
            &mut b,
            Some(with_env(p, &[("BIG".into(), "x".repeat((32 << 10) + 1))])),
        )
        .await,
        ia,
        Some("env"),
    );
    // 8 names of 2 bytes and values of 32766 bytes: exactly 256 KiB; one more byte is over.
    let exactly: Vec<(String, String)> = (0..8)
        .map(|i| (format!("V{i}"), "x".repeat((32 << 10) - 2)))
        .collect();
    let mut over = exactly.clone();
    over[0].1.push('x');
    f.status(
        "env of 256 KiB + 1 in all",
        submit_raw(&mut b, Some(with_env(p, &over))).await,
        ia,
        Some("env"),
    );

    // remote_files: traversal names and non-http URLs.
    for name in [
        "../x",
        "/etc/x",
        "a/../../x",
        "",
        "a//b",
        "./x",
        "a\\b",
        "..",
    ] {
        let req = proto::BuildRequest {
            remote_files: [(name.to_string(), "http://127.0.0.1:9/f".to_string())].into(),
            ..dir_request(p)
        };
        f.status(
            &format!("remote_files name {name:?}"),
            submit_raw(&mut b, Some(req)).await,
            ia,
            Some("remote_files"),
        );
    }
    for url in ["file:///etc/passwd", "ftp://127.0.0.1/x", "", "/etc/passwd"] {
        let req = proto::BuildRequest {
            remote_files: [("f".to_string(), url.to_string())].into(),
            ..dir_request(p)
        };
        f.status(
            &format!("remote_files URL {url:?}"),
            submit_raw(&mut b, Some(req)).await,
            ia,
            Some("remote_files"),
        );
    }
    let after = build_total(&mut b).await;
    f.check(after == before, || {
        format!("refused submits stored builds: {before} before, {after} after")
    });

    // The limits are exact: at them, builds are accepted and run.
    let at_limits: Vec<(&str, Vec<(String, String)>)> = vec![
        (
            "env with 256 names",
            (0..256).map(|i| (format!("V{i}"), "x".into())).collect(),
        ),
        (
            "an env value of 32 KiB",
            vec![("BIG".into(), "x".repeat(32 << 10))],
        ),
        ("env of exactly 256 KiB", exactly),
    ];
    for (what, vars) in at_limits {
        match submit_raw(&mut b, Some(with_env(p, &vars))).await {
            Ok(id) => {
                let build = wait_final(&mut b, id).await;
                f.check(
                    build.result == proto::BuildResult::NoFailures as i32,
                    || format!("{what}: the build did not pass: {build:#?}"),
                );
            }
            Err(e) => f.check(false, || format!("{what}: refused: {e:?}")),
        }
    }

    // Unknown ids.
    let nf = Code::NotFound;
    for id in [0, 999, u64::MAX] {
        f.status(
            &format!("Get {id}"),
            b.get(proto::GetBuildRequest { build_id: id }).await,
            nf,
            None,
        );
        f.status(
            &format!("Cancel {id}"),
            b.cancel(proto::CancelBuildRequest { build_id: id }).await,
            nf,
            None,
        );
        f.status(
            &format!("ListSubjobs {id}"),
            b.list_subjobs(proto::ListSubjobsRequest {
                build_id: id,
                ..Default::default()
            })
            .await,
            nf,
            None,
        );
        f.status(
            &format!("Watch {id}"),
            drain(b.watch(proto::WatchBuildRequest { build_id: id }).await).await,
            nf,
            None,
        );
        f.status(
            &format!("DownloadArtifacts {id}"),
            drain(
                b.download_artifacts(proto::DownloadArtifactsRequest {
                    build_id: id,
                    ..Default::default()
                })
                .await,
            )
            .await,
            nf,
            None,
        );
        unknown_console(&mut f, &mut b, id, 0, 0, &format!("build {id}")).await;
    }
    let (_, mut cl) = env.c.clients().await.unwrap();
    f.status(
        "DrainSlaves of an unknown slave",
        cl.drain_slaves(proto::DrainSlavesRequest {
            slave_ids: vec![999],
            all: false,
        })
        .await,
        nf,
        None,
    );

    // A running build: no artifacts yet; unknown subjob/atom; console offset past the end.
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("gate");
    let gated = with_config(
        p,
        &json!({"commands": [wait_for_gate(&gate), "echo \"out $X\""], "atomizers": [{"X": "echo 1"}]})
            .to_string(),
    );
    let id = submit_raw(&mut b, Some(gated)).await.expect("gated build");
    wait_for(&mut b, id, Duration::from_secs(60), |b| {
        state(b) == proto::BuildState::Building
    })
    .await;
    for format in [proto::ArchiveFormat::Zip, proto::ArchiveFormat::TarGz] {
        f.status(
            &format!("DownloadArtifacts ({format:?}) of a running build"),
            drain(
                b.download_artifacts(proto::DownloadArtifactsRequest {
                    build_id: id,
                    format: format as i32,
                    ..Default::default()
                })
                .await,
            )
            .await,
            Code::FailedPrecondition,
            None,
        );
    }
    std::fs::write(&gate, "").unwrap();
    let done = wait_final(&mut b, id).await;
    f.check(done.result == proto::BuildResult::NoFailures as i32, || {
        format!("the gated build did not pass: {done:#?}")
    });
    unknown_console(&mut f, &mut b, id, 99, 0, "an unknown subjob").await;
    unknown_console(&mut f, &mut b, id, 0, 99, "an unknown atom").await;
    f.status(
        "GetConsole past the end",
        b.get_console(proto::GetConsoleRequest {
            build_id: id,
            subjob_id: 0,
            atom_id: 0,
            max_lines: 5,
            offset_line: Some(1_000),
        })
        .await,
        ia,
        None,
    );
    f.status(
        "DownloadArtifacts past the end",
        drain(
            b.download_artifacts(proto::DownloadArtifactsRequest {
                build_id: id,
                offset: u64::MAX,
                ..Default::default()
            })
            .await,
        )
        .await,
        Code::OutOfRange,
        None,
    );

    // Without the secret, with a wrong one, or with a malformed header: UNAUTHENTICATED.
    let channel = Channel::from_shared(env.c.master_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let ua = Code::Unauthenticated;
    let mut bare = proto::builds_client::BuildsClient::new(channel.clone());
    f.status(
        "Get without the secret",
        bare.get(proto::GetBuildRequest { build_id: id }).await,
        ua,
        None,
    );
    f.status(
        "Submit without the secret",
        bare.submit(proto::SubmitBuildRequest {
            request: Some(dir_request(p)),
        })
        .await,
        ua,
        None,
    );
    let mut bare_cluster = proto::cluster_client::ClusterClient::new(channel.clone());
    f.status(
        "ListSlaves without the secret",
        bare_cluster.list_slaves(proto::ListSlavesRequest {}).await,
        ua,
        None,
    );
    for presented in [
        "wrong-secret-1234".to_string(),
        format!("{}x", env.c.secret),
        env.c.secret[..env.c.secret.len() - 1].to_string(),
    ] {
        let auth = SecretInterceptor::new(&presented).unwrap();
        let mut wrong =
            proto::builds_client::BuildsClient::with_interceptor(channel.clone(), auth.clone());
        f.status(
            "Get with a wrong secret",
            wrong.get(proto::GetBuildRequest { build_id: id }).await,
            ua,
            Some("wrong cluster secret"),
        );
        f.status(
            "Submit with a wrong secret",
            wrong
                .submit(proto::SubmitBuildRequest {
                    request: Some(dir_request(p)),
                })
                .await,
            ua,
            None,
        );
        let mut wrong_cluster =
            proto::cluster_client::ClusterClient::with_interceptor(channel.clone(), auth);
        f.status(
            "DrainSlaves with a wrong secret",
            wrong_cluster
                .drain_slaves(proto::DrainSlavesRequest {
                    slave_ids: vec![],
                    all: true,
                })
                .await,
            ua,
            None,
        );
    }
    for header in [
        format!("Basic {}", env.c.secret),
        format!("bearer {}", env.c.secret),
        env.c.secret.clone(),
        "Bearer ".to_string(),
    ] {
        let mut req = tonic::Request::new(proto::GetBuildRequest { build_id: id });
        req.metadata_mut()
            .insert("authorization", header.parse().unwrap());
        f.status(
            &format!(
                "Get with authorization {:?}",
                header.replace(&env.c.secret, "<secret>")
            ),
            bare.get(req).await,
            ua,
            None,
        );
    }
    let after = build_total(&mut b).await;
    f.check(after == before + 4, || {
        format!(
            "expected exactly the 4 accepted builds, got {} new",
            after - before
        )
    });
    f.check(slaves(&env.c).await.len() == 1, || {
        "an unauthenticated drain drained the slave".into()
    });
    a_normal_build_runs(&env, &mut f).await;
    env.c.shutdown().await.unwrap();
    f.finish();
}

// ---------------------------------------------------------------------------------------------
// Slave protocol
// ---------------------------------------------------------------------------------------------

/// Opens a Session whose first messages are `first`; the stream stays open while the returned
/// sender lives. An error is the status of the call or of the first message down.
async fn session(
    link: &mut SlaveLinkClient,
    first: Vec<proto::SlaveMessage>,
    keep_open: bool,
) -> (
    Option<mpsc::Sender<proto::SlaveMessage>>,
    Result<(proto::MasterMessage, tonic::Streaming<proto::MasterMessage>), Status>,
) {
    let (tx, rx) = mpsc::channel(64);
    for m in first {
        tx.send(m).await.unwrap();
    }
    let tx = keep_open.then_some(tx);
    let r = match tokio::time::timeout(STEP, link.session(ReceiverStream::new(rx))).await {
        Err(_) => Err(Status::deadline_exceeded("no answer to Session in 20 s")),
        Ok(Err(e)) => Err(e),
        Ok(Ok(resp)) => {
            let mut s = resp.into_inner();
            match tokio::time::timeout(STEP, s.message()).await {
                Err(_) => Err(Status::deadline_exceeded("no first message in 20 s")),
                Ok(Err(e)) => Err(e),
                Ok(Ok(None)) => Err(Status::unknown("the session ended without a status")),
                Ok(Ok(Some(m))) => Ok((m, s)),
            }
        }
    };
    (tx, r)
}

fn register(name: &str, executors: u32) -> proto::SlaveMessage {
    proto::SlaveMessage {
        msg: Some(Up::Register(proto::Register {
            name: name.into(),
            executors,
            version: ish_core::VERSION.into(),
            session_id: format!("{name}-session"),
            ..Default::default()
        })),
    }
}

fn up(m: Up) -> proto::SlaveMessage {
    proto::SlaveMessage { msg: Some(m) }
}

fn header(slave: u64, build: u64, subjob: u32, atom: u32, attempt: u64) -> proto::ArtifactChunk {
    proto::ArtifactChunk {
        msg: Some(Art::Header(proto::UploadHeader {
            slave_id: slave,
            build_id: build,
            subjob_id: subjob,
            atom_id: atom,
            attempt,
        })),
    }
}

fn file(path: &str, data: &[u8], last: bool) -> proto::ArtifactChunk {
    proto::ArtifactChunk {
        msg: Some(Art::File(proto::FileChunk {
            path: path.into(),
            data: data.to_vec(),
            last,
        })),
    }
}

async fn upload(
    link: &mut SlaveLinkClient,
    chunks: Vec<proto::ArtifactChunk>,
) -> Result<proto::UploadReceipt, Status> {
    match tokio::time::timeout(STEP, link.upload_artifacts(tokio_stream::iter(chunks))).await {
        Err(_) => Err(Status::deadline_exceeded(
            "no answer to UploadArtifacts in 20 s",
        )),
        Ok(r) => r.map(tonic::Response::into_inner),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slave_protocol_refusals() {
    let env = start(1, 2, false).await;
    let mut f = Failures::default();
    let ia = Code::InvalidArgument;
    let mut link = env.link(None).await;

    let heartbeat = up(Up::Heartbeat(proto::Heartbeat { sent_at: 1.0 }));
    let (_tx, r) = session(&mut link, vec![heartbeat.clone()], true).await;
    f.status(
        "a Session that starts with a Heartbeat",
        r,
        ia,
        Some("Register"),
    );
    let (_tx, r) = session(
        &mut link,
        vec![
            up(Up::GoingAway(proto::GoingAway {
                reason: "bye".into(),
            })),
            register("late", 1),
        ],
        true,
    )
    .await;
    f.status(
        "a Session that starts with GoingAway",
        r,
        ia,
        Some("Register"),
    );
    let (_tx, r) = session(&mut link, vec![proto::SlaveMessage { msg: None }], true).await;
    f.status("a Session that starts with an empty message", r, ia, None);
    let (_tx, r) = session(&mut link, vec![], false).await;
    f.status("a Session without any message", r, ia, None);
    let (_tx, r) = session(&mut link, vec![register("zero-executors", 0)], true).await;
    f.status("Register with 0 executors", r, ia, None);

    let mut b = env.builds().await;
    let sid = slaves(&env.c).await[0].id;
    f.status(
        "an upload that starts with a file",
        upload(&mut link, vec![file("a.txt", b"x", true)]).await,
        ia,
        None,
    );
    f.status(
        "an upload that starts with an empty message",
        upload(&mut link, vec![proto::ArtifactChunk { msg: None }]).await,
        ia,
        None,
    );
    f.status("an empty upload", upload(&mut link, vec![]).await, ia, None);
    f.status(
        "an upload for an unknown build",
        upload(
            &mut link,
            vec![header(sid, 999, 0, 0, 1), file("a.txt", b"x", true)],
        )
        .await,
        Code::FailedPrecondition,
        None,
    );
    // A finished build: none of its attempts is current any more.
    let project = project_with("J:\n  commands: ['echo $N']\n  atomizers: [{N: 'seq 2'}]\n");
    let id = submit(&mut b, dir_request(project.path())).await;
    let build = wait_final(&mut b, id).await;
    assert_eq!(state(&build), proto::BuildState::Finished);
    let attempt = subjobs(&mut b, id).await[0].atoms[0].attempt;
    for (what, h) in [
        (
            "its own (completed) attempt",
            header(sid, id, 0, 0, attempt),
        ),
        (
            "an attempt that never existed",
            header(sid, id, 0, 0, 999_999),
        ),
        ("another slave's id", header(sid + 100, id, 0, 0, attempt)),
    ] {
        f.status(
            &format!("an upload for a finished build, {what}"),
            upload(&mut link, vec![h, file("late.txt", b"x", true)]).await,
            Code::FailedPrecondition,
            None,
        );
    }
    // Unauthenticated slave-link calls.
    for secret in [
        "wrong-secret-1234".to_string(),
        format!("{}x", env.c.secret),
    ] {
        let mut wrong = env.link(Some(&secret)).await;
        let (_tx, r) = session(&mut wrong, vec![register("intruder", 2)], true).await;
        f.status(
            "a Session with a wrong secret",
            r,
            Code::Unauthenticated,
            None,
        );
        f.status(
            "an upload with a wrong secret",
            upload(
                &mut wrong,
                vec![header(sid, id, 0, 0, attempt), file("x", b"x", true)],
            )
            .await,
            Code::Unauthenticated,
            None,
        );
    }
    let channel = Channel::from_shared(env.c.master_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut bare = proto::slave_link_client::SlaveLinkClient::new(channel);
    let r = tokio::time::timeout(
        STEP,
        bare.session(tokio_stream::iter(vec![register("anonymous", 2)])),
    )
    .await
    .expect("an answer to an unauthenticated Session");
    f.status(
        "a Session without the secret",
        r.map(|_| ()),
        Code::Unauthenticated,
        None,
    );
    let r = tokio::time::timeout(
        STEP,
        bare.upload_artifacts(tokio_stream::iter(vec![header(sid, id, 0, 0, attempt)])),
    )
    .await
    .expect("an answer to an unauthenticated upload");
    f.status(
        "an upload without the secret",
        r,
        Code::Unauthenticated,
        None,
    );

    // None of it replaced or disturbed the real slave.
    let now = slaves(&env.c).await;
    f.check(
        now.len() == 1 && now[0].id == sid && now[0].name == LocalCluster::slave_name(0),
        || format!("the real slave changed: {now:#?}"),
    );
    a_normal_build_runs(&env, &mut f).await;
    env.c.shutdown().await.unwrap();
    f.finish();
}

/// The next work message down (heartbeats skipped).
async fn next_down(s: &mut tonic::Streaming<proto::MasterMessage>) -> Down {
    loop {
        let m = tokio::time::timeout(STEP, s.message())
            .await
            .expect("a message from the master within 20 s")
            .expect("the session stream failed")
            .expect("the master ended the session");
        match m.msg {
            Some(Down::Heartbeat(_)) | None => continue,
            Some(other) => return other,
        }
    }
}

/// Every path under `root` whose file name is one of `names`, skipping `skip`.
fn find_named(root: &Path, names: &[&str], skip: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let path = e.path();
        if path.starts_with(skip) {
            continue;
        }
        if names.iter().any(|n| e.file_name() == *n) {
            out.push(path.clone());
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            find_named(&path, names, skip, out);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fake_slave_cannot_upload_outside_its_attempt() {
    // No real slave: the fake one gets the work.
    let env = start(0, 2, false).await;
    let mut f = Failures::default();
    let ia = Code::InvalidArgument;
    let fp = Code::FailedPrecondition;
    let mut link = env.link(None).await;
    let (tx, r) = session(&mut link, vec![register("fake-slave", 1)], true).await;
    let tx = tx.unwrap();
    let (first, mut down) = r.expect("the fake slave registers");
    let Some(Down::Registered(reg)) = first.msg else {
        panic!("expected Registered, got {first:?}");
    };
    let sid = reg.slave_id;

    let project = project_with("Fake:\n  commands: ['true']\n  atomizers: [{A: 'echo 1'}]\n");
    let mut b = env.builds().await;
    let id = submit(&mut b, dir_request(project.path())).await;

    let Down::Prepare(prep) = next_down(&mut down).await else {
        panic!("expected Prepare");
    };
    assert_eq!(prep.build_id, id);
    let job = proto::JobConfig {
        name: "Fake".into(),
        commands: "true".into(),
        atomizers: vec![proto::Atomizer {
            variable: "A".into(),
            command: "echo 1".into(),
        }],
        ..Default::default()
    };
    tx.send(up(Up::Prepared(proto::PrepareResult {
        build_id: id,
        job: Some(job),
        atoms: vec!["export A=\"1\";".into()],
        project_dir: project.path().display().to_string(),
        ..Default::default()
    })))
    .await
    .unwrap();
    let Down::Setup(setup) = next_down(&mut down).await else {
        panic!("expected Setup");
    };
    assert_eq!(setup.build_id, id);
    tx.send(up(Up::Setup(proto::SetupResult {
        build_id: id,
        ok: true,
        error: String::new(),
    })))
    .await
    .unwrap();
    let Down::RunSubjob(run) = next_down(&mut down).await else {
        panic!("expected RunSubjob");
    };
    assert_eq!((run.build_id, run.subjob_id, run.atoms.len()), (id, 0, 1));
    let attempt = run.attempt;
    let atom = run.atoms[0].atom_id;
    tx.send(up(Up::AtomStarted(proto::AtomStarted {
        build_id: id,
        subjob_id: 0,
        atom_id: atom,
        attempt,
    })))
    .await
    .unwrap();

    // The build is running: no archive yet.
    f.status(
        "DownloadArtifacts of a running build",
        drain(
            b.download_artifacts(proto::DownloadArtifactsRequest {
                build_id: id,
                ..Default::default()
            })
            .await,
        )
        .await,
        fp,
        None,
    );

    // Hostile paths for the real, current attempt.
    let hostile = [
        "../escape",
        "/abs",
        "a/../../b",
        "a//b",
        "../../../../../../escape",
        "./escape",
        "escape/..",
        "escape/.",
        "",
        "a\\..\\..\\escape",
        "a/\0/escape",
    ];
    for path in hostile {
        f.status(
            &format!("an upload of {path:?}"),
            upload(
                &mut link,
                vec![
                    header(sid, id, 0, atom, attempt),
                    file(path, b"pwned", true),
                ],
            )
            .await,
            ia,
            None,
        );
    }
    // A hostile path after a valid file, and a second header.
    f.status(
        "a hostile path after a valid file",
        upload(
            &mut link,
            vec![
                header(sid, id, 0, atom, attempt),
                file("first.txt", b"1", true),
                file("../escape", b"pwned", true),
            ],
        )
        .await,
        ia,
        None,
    );
    f.status(
        "a second header",
        upload(
            &mut link,
            vec![
                header(sid, id, 0, atom, attempt),
                header(sid, id, 0, atom, attempt),
            ],
        )
        .await,
        ia,
        None,
    );
    // Headers that do not name this slave's current attempt.
    for (what, h) in [
        ("another attempt", header(sid, id, 0, atom, attempt + 1000)),
        ("another slave id", header(sid + 1, id, 0, atom, attempt)),
        ("another subjob", header(sid, id, 5, atom, attempt)),
        (
            "an atom out of range",
            header(sid, id, 0, atom + 7, attempt),
        ),
        ("another build", header(sid, id + 1, 0, atom, attempt)),
    ] {
        f.status(
            &format!("an upload for {what}"),
            upload(&mut link, vec![h, file("x.txt", b"x", true)]).await,
            fp,
            None,
        );
    }
    let mut found = Vec::new();
    let attempts = env
        .dir
        .path()
        .join("master")
        .join("results")
        .join(id.to_string())
        .join(".attempts");
    find_named(
        env.dir.path(),
        &["escape", "abs", "b"],
        &attempts,
        &mut found,
    );
    find_named(
        project.path(),
        &["escape", "abs", "b"],
        &attempts,
        &mut found,
    );
    if Path::new("/abs").exists() {
        found.push("/abs".into());
    }
    f.check(found.is_empty(), || {
        format!("hostile uploads created files outside the attempt directory: {found:?}")
    });

    // The attempt itself still works: a valid upload, then the atom's result.
    match upload(
        &mut link,
        vec![
            header(sid, id, 0, atom, attempt),
            file("ok/file.txt", b"hel", false),
            file("ok/file.txt", b"lo", true),
        ],
    )
    .await
    {
        Ok(r) => {
            f.check(r.files == 1 && r.bytes == 5, || {
                format!("the valid upload stored {r:?}")
            });
            // It landed in the attempt directory the search above skipped.
            let mut mine = Vec::new();
            find_named(
                &attempts,
                &["file.txt"],
                Path::new("/nonexistent"),
                &mut mine,
            );
            f.check(mine.len() == 1, || {
                format!(
                    "the valid upload is not under {}: {mine:?}",
                    attempts.display()
                )
            });
        }
        Err(e) => f.check(false, || format!("the valid upload was refused: {e:?}")),
    }
    for m in [
        Up::Console(proto::ConsoleChunk {
            build_id: id,
            subjob_id: 0,
            atom_id: atom,
            attempt,
            data: b"fake output\n".to_vec(),
        }),
        Up::AtomResult(proto::AtomResult {
            build_id: id,
            subjob_id: 0,
            atom_id: atom,
            attempt,
            exit_code: 0,
            seconds: 0.25,
            artifact_files: 1,
            tries: 1,
            timed_out: false,
        }),
        Up::SubjobDone(proto::SubjobDone {
            build_id: id,
            subjob_id: 0,
            attempt,
        }),
    ] {
        tx.send(up(m)).await.unwrap();
    }
    // Acknowledge what the master sends until it tears the build down.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no Teardown for build {id}");
        match next_down(&mut down).await {
            Down::Teardown(t) if t.build_id == id => {
                tx.send(up(Up::TeardownDone(proto::TeardownDone {
                    build_id: id,
                    ok: true,
                    error: String::new(),
                })))
                .await
                .unwrap();
                break;
            }
            _ => {}
        }
    }
    let build = wait_final(&mut b, id).await;
    f.check(
        state(&build) == proto::BuildState::Finished
            && build.result == proto::BuildResult::NoFailures as i32,
        || format!("the fake slave's build did not finish cleanly: {build:#?}"),
    );
    if state(&build) == proto::BuildState::Finished {
        let zip = zip_files(&download(&mut b, id, proto::ArchiveFormat::Zip).await);
        let names: Vec<&String> = zip.keys().collect();
        f.check(
            zip.get("artifact_0_0/ok/file.txt").map(Vec::as_slice) == Some(&b"hello"[..])
                && zip
                    .get("artifact_0_0/clusterrunner_console_output")
                    .map(Vec::as_slice)
                    == Some(&b"fake output\n"[..])
                && zip.keys().all(|k| k.starts_with("artifact_0_0/")),
            || format!("results.zip of the fake build: {names:?}"),
        );
    }
    tx.send(up(Up::GoingAway(proto::GoingAway {
        reason: "test over".into(),
    })))
    .await
    .unwrap();
    drop(tx);
    drop(down);
    wait_slaves(&env.c, 0).await;

    // A real slave joins the same cluster and builds normally.
    let mut c = env;
    c.c.start_slave(0);
    wait_slaves(&c.c, 1).await;
    a_normal_build_runs(&c, &mut f).await;
    c.c.shutdown().await.unwrap();
    f.finish();
}

// ---------------------------------------------------------------------------------------------
// Hostile projects: deep and huge YAML, huge atomizer output
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_projects_end_in_error_and_the_slave_survives() {
    let env = start(1, 2, false).await;
    let mut f = Failures::default();
    let mut b = env.builds().await;
    let sid = slaves(&env.c).await[0].id;

    let deep_flow = format!("J: {}x{}\n", "[".repeat(10_000), "]".repeat(10_000));
    let deep_block = format!("J:\n{}x\n", "- ".repeat(5_000));
    let mut bomb = String::from("a: &a [\"lolololololololololololololololol\"]\n");
    let mut prev = 'a';
    for name in "bcdefghijklm".chars() {
        bomb += &format!(
            "{name}: &{name} [{}]\n",
            vec![format!("*{prev}"); 10].join(",")
        );
        prev = name;
    }
    let huge = format!(
        "J:\n  commands: ['{}']\n  atomizers: [{{A: 'echo 1'}}]\n",
        "x".repeat(MAX_CONFIG)
    );
    let atomizer =
        |n: usize| format!("J:\n  commands: ['true']\n  atomizers: [{{N: 'seq 1 {n}'}}]\n");
    let projects: Vec<(&str, String, &[&str])> = vec![
        (
            "YAML nested 10,000 levels deep (flow)",
            deep_flow,
            &["nested too deeply"],
        ),
        (
            "YAML nested 5,000 levels deep (block)",
            deep_block,
            &["nested too deeply"],
        ),
        (
            "a YAML alias bomb",
            bomb,
            &["too large", "repetition limit"],
        ),
        (
            "a YAML file over 1 MiB",
            huge,
            &["too large", "the limit is 1048576 bytes"],
        ),
        (
            "an invalid YAML file",
            "J: [unclosed\n".into(),
            &["could not be parsed"],
        ),
        (
            "an atomizer printing 100,001 atoms",
            atomizer(MAX_ATOMS + 1),
            &["max_atoms_per_build"],
        ),
        (
            "an atomizer printing 200,001 atoms",
            atomizer(2 * MAX_ATOMS + 1),
            &["max_atoms_per_build"],
        ),
    ];
    for (what, yaml, needles) in projects {
        let project = project_with(&yaml);
        let id = match submit_raw(&mut b, Some(dir_request(project.path()))).await {
            Ok(id) => id,
            Err(e) => {
                f.check(false, || format!("{what}: Submit refused: {e:?}"));
                continue;
            }
        };
        let build = wait_final(&mut b, id).await;
        f.check(
            state(&build) == proto::BuildState::Error
                && needles.iter().any(|n| build.error_message.contains(n)),
            || {
                format!(
                    "{what}: expected ERROR mentioning one of {needles:?}, got {:?}: {:?}",
                    state(&build),
                    &build.error_message[..build.error_message.len().min(300)]
                )
            },
        );
    }
    // The slave's session survived all of it.
    let now = slaves(&env.c).await;
    f.check(now.len() == 1 && now[0].id == sid, || {
        format!("the slave was dropped or replaced: {now:#?}")
    });
    a_normal_build_runs(&env, &mut f).await;
    env.c.shutdown().await.unwrap();
    f.finish();
}
