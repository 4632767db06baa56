//! The ClusterRunner REST API through the whole router (`Router::oneshot`), against an in-memory
//! fake master: every route's status, body and headers without a master process, a network or
//! a slave. The end-to-end counterparts, through a real master, are the workspace's
//! `tests/rest.rs` and `tests/rest_refusals.rs`.
//!
//! A refusal lives here when the gateway makes it on its own, before any master call: the fake
//! master records every submit, cancel and drain, so each such test also proves the refused
//! request reached no master. The answer types and the collected checks are the cross-role
//! suites' own (`tests/support/resp.rs`, `checks.rs`, `jobs.rs`, included below), so a case
//! moved here from there is checked by the very same code.
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use ish_core::proto;
use ish_gateway::master::{ChunkStream, Master, MasterFuture};
use ish_gateway::{AppState, GatewayConfig};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use tonic::Status;
use tower::ServiceExt;

#[path = "../../tests/support/checks.rs"]
mod checks;
#[path = "../../tests/support/jobs.rs"]
mod jobs;
#[path = "../../tests/support/resp.rs"]
mod resp;

use checks::Failures;
use jobs::simple_config;
use resp::{DIGEST, DIGEST_MISMATCH, INVALID_JSON, Resp};

const SECRET: &str = "oneshot-test-secret";

/// What the fake master holds and what it was asked.
#[derive(Default)]
struct Data {
    builds: Vec<proto::Build>,
    subjobs: Vec<proto::Subjob>,
    slaves: Vec<proto::Slave>,
    events: Vec<proto::Event>,
    /// The archive of every build that has one.
    archive: Vec<u8>,
    submitted: Vec<proto::BuildRequest>,
    canceled: Vec<u64>,
    drained: Vec<proto::DrainSlavesRequest>,
    list_calls: Vec<(u32, u32, bool)>,
}

/// A master in memory. Like the real one it pages builds by size too: at most 2 a page, so the
/// gateway's gathering of pages is exercised.
#[derive(Default)]
struct Fake(Mutex<Data>);

const PAGE_CAP: usize = 2;

fn ready<T: Send + 'static>(r: Result<T, Status>) -> MasterFuture<'static, T> {
    Box::pin(std::future::ready(r))
}

fn no_build(id: u64) -> Status {
    Status::not_found(format!("Invalid build id: {id}."))
}

impl Fake {
    fn data(&self) -> std::sync::MutexGuard<'_, Data> {
        self.0.lock().unwrap()
    }

    fn build(&self, id: u64) -> Result<proto::Build, Status> {
        self.data()
            .builds
            .iter()
            .find(|b| b.id == id)
            .cloned()
            .ok_or_else(|| no_build(id))
    }
}

impl Master for Fake {
    fn submit(
        &self,
        req: proto::SubmitBuildRequest,
    ) -> MasterFuture<'_, proto::SubmitBuildResponse> {
        let mut d = self.data();
        let id = d.builds.len() as u64 + 1;
        let request = req.request.unwrap_or_default();
        d.builds.push(proto::Build {
            id,
            state: proto::BuildState::Queued as i32,
            request: Some(request.clone()),
            ..Default::default()
        });
        d.submitted.push(request);
        ready(Ok(proto::SubmitBuildResponse { build_id: id }))
    }

    fn get_build(&self, req: proto::GetBuildRequest) -> MasterFuture<'_, proto::Build> {
        ready(self.build(req.build_id))
    }

    fn list_builds(
        &self,
        req: proto::ListBuildsRequest,
    ) -> MasterFuture<'_, proto::ListBuildsResponse> {
        let mut d = self.data();
        d.list_calls
            .push((req.offset, req.limit, req.unfinished_only));
        let matching: Vec<_> = d
            .builds
            .iter()
            .filter(|b| {
                !req.unfinished_only
                    || !matches!(
                        proto::BuildState::try_from(b.state),
                        Ok(proto::BuildState::Finished | proto::BuildState::Canceled)
                    )
            })
            .cloned()
            .collect();
        let take = if req.limit == 0 {
            PAGE_CAP
        } else {
            (req.limit as usize).min(PAGE_CAP)
        };
        let builds = matching
            .iter()
            .skip(req.offset as usize)
            .take(take)
            .cloned()
            .collect();
        ready(Ok(proto::ListBuildsResponse {
            builds,
            total: matching.len() as u32,
        }))
    }

    fn cancel_build(&self, req: proto::CancelBuildRequest) -> MasterFuture<'_, proto::Build> {
        let mut d = self.data();
        d.canceled.push(req.build_id);
        let r = match d.builds.iter_mut().find(|b| b.id == req.build_id) {
            Some(b) => {
                b.state = proto::BuildState::Canceled as i32;
                Ok(b.clone())
            }
            None => Err(no_build(req.build_id)),
        };
        ready(r)
    }

    fn list_subjobs(
        &self,
        req: proto::ListSubjobsRequest,
    ) -> MasterFuture<'_, proto::ListSubjobsResponse> {
        if let Err(e) = self.build(req.build_id) {
            return ready(Err(e));
        }
        let d = self.data();
        let all: Vec<_> = d
            .subjobs
            .iter()
            .filter(|s| s.build_id == req.build_id)
            .cloned()
            .collect();
        let limit = if req.limit == 0 {
            usize::MAX
        } else {
            req.limit as usize
        };
        ready(Ok(proto::ListSubjobsResponse {
            subjobs: all
                .iter()
                .skip(req.offset as usize)
                .take(limit)
                .cloned()
                .collect(),
            total: all.len() as u32,
        }))
    }

    fn get_console(&self, req: proto::GetConsoleRequest) -> MasterFuture<'_, proto::ConsolePage> {
        if let Err(e) = self.build(req.build_id) {
            return ready(Err(e));
        }
        let lines = ["line one", "line two", "line three"];
        let max = if req.max_lines == 0 {
            50
        } else {
            u64::from(req.max_lines)
        };
        let total = lines.len() as u64;
        let first = req.offset_line.unwrap_or(total.saturating_sub(max));
        let page: Vec<_> = lines
            .iter()
            .skip(first as usize)
            .take(max as usize)
            .collect();
        let content = page.iter().map(|l| format!("{l}\n")).collect();
        ready(Ok(proto::ConsolePage {
            offset_line: first,
            num_lines: page.len() as u64,
            total_num_lines: total,
            content,
        }))
    }

    fn download_artifacts(
        &self,
        req: proto::DownloadArtifactsRequest,
    ) -> MasterFuture<'_, ChunkStream> {
        let b = match self.build(req.build_id) {
            Ok(b) => b,
            Err(e) => return ready(Err(e)),
        };
        if !b.artifacts_ready {
            return ready(Err(Status::failed_precondition("no archive yet")));
        }
        let data = self.data().archive.clone();
        let total_size = data.len() as u64;
        let chunk = if req.size_only {
            Vec::new()
        } else {
            let start = req.offset as usize;
            data[start..start + req.length as usize].to_vec()
        };
        let s: ChunkStream = Box::pin(tokio_stream::iter(vec![Ok(proto::DataChunk {
            data: chunk,
            total_size,
        })]));
        ready(Ok(s))
    }

    fn list_slaves(
        &self,
        _req: proto::ListSlavesRequest,
    ) -> MasterFuture<'_, proto::ListSlavesResponse> {
        ready(Ok(proto::ListSlavesResponse {
            slaves: self.data().slaves.clone(),
        }))
    }

    fn drain_slaves(
        &self,
        req: proto::DrainSlavesRequest,
    ) -> MasterFuture<'_, proto::DrainSlavesResponse> {
        self.data().drained.push(req);
        ready(Ok(proto::DrainSlavesResponse::default()))
    }

    fn list_events(
        &self,
        _req: proto::ListEventsRequest,
    ) -> MasterFuture<'_, proto::ListEventsResponse> {
        ready(Ok(proto::ListEventsResponse {
            events: self.data().events.clone(),
        }))
    }

    fn metrics(&self, _req: proto::MetricsRequest) -> MasterFuture<'_, proto::MetricsResponse> {
        ready(Ok(proto::MetricsResponse {
            text: "ish_master_up 1".into(),
        }))
    }
}

fn atom(subjob_id: u32, id: u32, command: &str) -> proto::Atom {
    proto::Atom {
        id,
        subjob_id,
        command_string: command.into(),
        state: proto::AtomState::Completed as i32,
        exit_code: Some(0),
        ..Default::default()
    }
}

/// A fake master with builds 1..=5 (1 and 2 finished, 5 canceled), two subjobs of build 1,
/// one slave and one event.
fn seeded() -> Arc<Fake> {
    let fake = Fake::default();
    {
        let mut d = fake.data();
        for id in 1..=5u64 {
            let state = match id {
                1 | 2 => proto::BuildState::Finished,
                5 => proto::BuildState::Canceled,
                _ => proto::BuildState::Queued,
            };
            d.builds.push(proto::Build {
                id,
                state: state as i32,
                result: if id <= 2 {
                    proto::BuildResult::NoFailures as i32
                } else {
                    0
                },
                artifacts_ready: id == 1,
                num_subjobs: if id == 1 { 2 } else { 0 },
                ..Default::default()
            });
        }
        for s in 0..2u32 {
            d.subjobs.push(proto::Subjob {
                build_id: 1,
                id: s,
                atoms: vec![atom(s, 0, "export X=a;"), atom(s, 1, "export X=b;")],
                command: "echo $X".into(),
                ..Default::default()
            });
        }
        d.slaves.push(proto::Slave {
            id: 7,
            name: "host-a".into(),
            executors: 4,
            executors_in_use: 1,
            state: proto::SlaveState::Idle as i32,
            session_id: "slave-session".into(),
            ..Default::default()
        });
        d.events.push(proto::Event {
            id: 1,
            tag: "BUILD_REQUEST_QUEUED".into(),
            timestamp: 1.5,
            fields_json: r#"{"build_id": 3}"#.into(),
        });
        d.archive = (0u8..100).collect();
    }
    Arc::new(fake)
}

fn app_with(fake: &Arc<Fake>, cfg: GatewayConfig) -> axum::Router {
    let master: Arc<dyn Master> = fake.clone();
    ish_gateway::router(AppState::with_master(&cfg, SECRET, master).unwrap())
}

fn app(fake: &Arc<Fake>) -> axum::Router {
    app_with(fake, GatewayConfig::default())
}

async fn call(
    r: &axum::Router,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> Resp {
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = r
        .clone()
        .oneshot(req.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap()
        .to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

async fn get(r: &axum::Router, path: &str) -> Resp {
    call(r, "GET", path, &[], Body::empty()).await
}

/// A write signed with the test secret.
async fn signed(r: &axum::Router, method: &str, path: &str, body: impl AsRef<[u8]>) -> Resp {
    let body = body.as_ref().to_vec();
    let d = ish_core::auth::digest(SECRET, &body);
    call(r, method, path, &[(DIGEST, &d)], body).await
}

fn error_of(r: &Resp) -> String {
    r.error()
}

#[tokio::test]
async fn a_signed_build_request_is_submitted_and_a_bad_digest_is_401() {
    let fake = Arc::new(Fake::default());
    let r = app(&fake);
    let body = r#"{"type": "directory", "project_directory": "/tmp/p", "job_name": "unit"}"#;
    let resp = signed(&r, "POST", "/v1/build", body).await;
    assert_eq!(resp.status, StatusCode::ACCEPTED, "{}", resp.text());
    assert_eq!(
        resp.json(),
        json!({"status": "SUCCESS", "STATUS": "SUCCESS", "build_id": 1})
    );
    {
        let d = fake.data();
        assert_eq!(d.submitted.len(), 1);
        // The client's own text is what `request_params` echoes later.
        assert_eq!(d.submitted[0].request_params_json, body);
    }
    // The same body signed with another key, with a digest of other bytes, without a digest.
    let other = ish_core::auth::digest("another-secret", body.as_bytes());
    let of_other_bytes = ish_core::auth::digest(SECRET, b"{}");
    for headers in [
        vec![(DIGEST, other.as_str())],
        vec![(DIGEST, of_other_bytes.as_str())],
        vec![(DIGEST, "not hex")],
        vec![],
    ] {
        let resp = call(&r, "POST", "/v1/build", &headers, body).await;
        assert_eq!(resp.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(resp.json(), json!({"error": DIGEST_MISMATCH}));
    }
    assert_eq!(
        fake.data().submitted.len(),
        1,
        "a refused build was submitted"
    );
}

#[tokio::test]
async fn a_master_refusal_of_a_build_is_a_failure_status_response() {
    struct Refusing;
    impl Master for Refusing {
        fn submit(
            &self,
            _req: proto::SubmitBuildRequest,
        ) -> MasterFuture<'_, proto::SubmitBuildResponse> {
            ready(Err(Status::invalid_argument("no such job: nope")))
        }
        fn get_build(&self, r: proto::GetBuildRequest) -> MasterFuture<'_, proto::Build> {
            ready(Err(no_build(r.build_id)))
        }
        fn list_builds(
            &self,
            _r: proto::ListBuildsRequest,
        ) -> MasterFuture<'_, proto::ListBuildsResponse> {
            ready(Err(Status::unavailable("down")))
        }
        fn cancel_build(&self, _r: proto::CancelBuildRequest) -> MasterFuture<'_, proto::Build> {
            ready(Err(Status::unavailable("down")))
        }
        fn list_subjobs(
            &self,
            _r: proto::ListSubjobsRequest,
        ) -> MasterFuture<'_, proto::ListSubjobsResponse> {
            ready(Err(Status::unavailable("down")))
        }
        fn get_console(
            &self,
            _r: proto::GetConsoleRequest,
        ) -> MasterFuture<'_, proto::ConsolePage> {
            ready(Err(Status::unavailable("down")))
        }
        fn download_artifacts(
            &self,
            _r: proto::DownloadArtifactsRequest,
        ) -> MasterFuture<'_, ChunkStream> {
            ready(Err(Status::unavailable("down")))
        }
        fn list_slaves(
            &self,
            _r: proto::ListSlavesRequest,
        ) -> MasterFuture<'_, proto::ListSlavesResponse> {
            ready(Err(Status::internal("secret detail")))
        }
        fn drain_slaves(
            &self,
            _r: proto::DrainSlavesRequest,
        ) -> MasterFuture<'_, proto::DrainSlavesResponse> {
            ready(Err(Status::unavailable("down")))
        }
        fn list_events(
            &self,
            _r: proto::ListEventsRequest,
        ) -> MasterFuture<'_, proto::ListEventsResponse> {
            ready(Err(Status::unavailable("down")))
        }
        fn metrics(&self, _r: proto::MetricsRequest) -> MasterFuture<'_, proto::MetricsResponse> {
            ready(Err(Status::unavailable("down")))
        }
    }
    let r = ish_gateway::router(
        AppState::with_master(&GatewayConfig::default(), SECRET, Arc::new(Refusing)).unwrap(),
    );
    let body = r#"{"type": "directory", "project_directory": "/tmp/p"}"#;
    let resp = signed(&r, "POST", "/v1/build", body).await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.json(),
        json!({"status": "FAILURE", "STATUS": "FAILURE", "error": "no such job: nope"})
    );
    let resp = get(&r, "/v1/build").await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(error_of(&resp).contains("down"), "{}", resp.text());
    // An internal error shows no detail, and a GET error keeps its child routes.
    let resp = get(&r, "/v1/slave").await;
    assert_eq!(resp.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(error_of(&resp), "internal error");
    assert!(resp.json()["child_routes"].is_object(), "{}", resp.text());
}

#[tokio::test]
async fn get_a_build_and_unknown_ones() {
    let fake = seeded();
    let r = app(&fake);
    let resp = call(&r, "GET", "/v1/build/1", &[("Host", "gw.example:8080")], "").await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let v = resp.json();
    assert_eq!(v["build"]["id"], 1);
    assert_eq!(v["build"]["status"], "FINISHED");
    assert_eq!(v["build"]["result"], "NO_FAILURES");
    assert_eq!(v["build"]["num_subjobs"], 2);
    assert!(
        v["build"]["artifacts"]
            .as_str()
            .is_some_and(|a| a.starts_with("http://gw.example:8080/")),
        "{v}"
    );
    assert!(v["child_routes"].is_object(), "{v}");
    assert!(
        resp.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let resp = get(&r, "/v1/build/99").await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&resp), "Invalid build id: 99.");
    assert!(resp.json()["child_routes"].is_object());
    // Not an id: no such route.
    let resp = get(&r, "/v1/build/abc").await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert!(error_of(&resp).starts_with("Not found"), "{}", resp.text());
}

#[tokio::test]
async fn build_lists_page_on_v2_and_gather_the_masters_pages() {
    let fake = seeded();
    let r = app(&fake);
    let ids = |resp: &Resp, key: &str| -> Vec<u64> {
        resp.json()[key]
            .as_array()
            .unwrap_or_else(|| panic!("{}", resp.text()))
            .iter()
            .map(|b| b["id"].as_u64().unwrap())
            .collect()
    };
    // v1 lists everything, over as many master pages as it takes (2 builds a page).
    let resp = get(&r, "/v1/build").await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(ids(&resp, "builds"), vec![1, 2, 3, 4, 5]);
    assert_eq!(
        fake.data().list_calls,
        vec![(0, 0, false), (2, 0, false), (4, 0, false)]
    );
    // v2 pages: offset and limit from the query.
    fake.data().list_calls.clear();
    let resp = get(&r, "/builds?offset=1&limit=3").await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(ids(&resp, "builds"), vec![2, 3, 4]);
    assert_eq!(fake.data().list_calls, vec![(1, 3, false), (3, 1, false)]);
    let resp = get(&r, "/builds?offset=10&limit=3").await;
    assert_eq!(ids(&resp, "builds"), Vec::<u64>::new());
    // Bad paging is the client's error, before any master call.
    fake.data().list_calls.clear();
    for q in ["limit=x", "offset=abc", "limit=1.5"] {
        let resp = get(&r, &format!("/builds?{q}")).await;
        assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{q}");
        assert!(resp.json()["error"].is_string(), "{q}");
    }
    assert!(fake.data().list_calls.is_empty());
    // A negative offset counts from the start, as ClusterRunner clamped it.
    let resp = get(&r, "/builds?offset=-1&limit=2").await;
    assert_eq!(ids(&resp, "builds"), vec![1, 2]);
    // The queue: unfinished builds, never paged (even on v2).
    fake.data().list_calls.clear();
    let resp = get(&r, "/queue?offset=1&limit=1").await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(ids(&resp, "queue"), vec![3, 4]);
    assert!(
        fake.data().list_calls.iter().all(|c| c.2 && c.1 == 0),
        "the queue asked for finished builds or for a page"
    );
}

#[tokio::test]
async fn cancel_needs_the_digest_a_known_build_and_the_canceled_body() {
    let fake = seeded();
    let r = app(&fake);
    let ok = r#"{"status": "canceled"}"#;
    let resp = signed(&r, "PUT", "/v1/build/3", ok).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(
        resp.json(),
        json!({"status": "SUCCESS", "STATUS": "SUCCESS"})
    );
    assert_eq!(fake.data().canceled, vec![3]);
    // Refused: unsigned, unknown build (whatever the body), bodies other than the canceled one.
    let resp = call(&r, "PUT", "/v1/build/4", &[], ok).await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    let resp = signed(&r, "PUT", "/v1/build/99", r#"{"status": "done"}"#).await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&resp), "Invalid build id: 99.");
    for (body, needle) in [
        (r#"{"status": "done"}"#, "Value (done)"),
        (r#"{"status": "CANCELED"}"#, "Value (CANCELED)"),
        (r#"{"status": 1}"#, "Value (1)"),
        (r#"{"colour": "x"}"#, "Key (colour)"),
        (r#"{"status": "canceled", "x": 1}"#, "Key (x)"),
        (r#"["canceled"]"#, "JSON object"),
    ] {
        let resp = signed(&r, "PUT", "/v1/build/4", body).await;
        assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{body}");
        let v = resp.json();
        assert_eq!(
            (&v["status"], &v["STATUS"]),
            (&json!("FAILURE"), &json!("FAILURE"))
        );
        assert!(error_of(&resp).contains(needle), "{body}: {v}");
    }
    let resp = signed(&r, "PUT", "/v1/build/4", "{}").await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.json(),
        json!({"status": "FAILURE", "STATUS": "FAILURE"})
    );
    let resp = signed(&r, "PUT", "/v1/build/4", "{oops").await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&resp), INVALID_JSON);
    assert_eq!(
        fake.data().canceled,
        vec![3],
        "a refused cancel reached the master"
    );
}

#[tokio::test]
async fn subjobs_atoms_and_consoles() {
    let fake = seeded();
    let r = app(&fake);
    let resp = get(&r, "/v1/build/1/subjob").await;
    assert_eq!(resp.status, StatusCode::OK);
    let v = resp.json();
    assert_eq!(v["subjobs"].as_array().unwrap().len(), 2);
    assert_eq!(v["subjobs"][1]["id"], 1);
    assert_eq!(v["subjobs"][1]["command"], "echo $X");
    assert_eq!(v["subjobs"][1]["atoms"][0]["command_string"], "export X=a;");
    // v2 pages subjobs and atoms.
    let resp = get(&r, "/builds/1/subjobs?offset=1&limit=1").await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let subjobs = resp.json()["subjobs"].clone();
    assert_eq!(subjobs.as_array().unwrap().len(), 1);
    assert_eq!(subjobs[0]["id"], 1);
    let resp = get(&r, "/v1/build/1/subjob/0").await;
    assert_eq!(resp.json()["subjob"]["id"], 0);
    let resp = get(&r, "/v1/build/1/subjob/9").await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&resp), "Invalid subjob id.");
    let resp = get(&r, "/v1/build/1/subjob/1/atom").await;
    let atoms = resp.json()["atoms"].clone();
    assert_eq!(atoms.as_array().unwrap().len(), 2);
    assert_eq!(atoms[1]["command_string"], "export X=b;");
    assert_eq!(atoms[1]["state"], "COMPLETED");
    assert_eq!(atoms[1]["exit_code"], 0);
    let resp = get(&r, "/v1/build/1/subjob/1/atom/1").await;
    assert_eq!(resp.json()["atom"]["id"], 1);
    let resp = get(&r, "/v1/build/1/subjob/1/atom/5").await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&resp), "Invalid atom id.");
    let resp = get(&r, "/v1/build/99/subjob").await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&resp), "Invalid build id: 99.");
    // Console pages: the last lines by default, or from an offset.
    let resp = get(&r, "/v1/build/1/subjob/0/atom/0/console?max_lines=2").await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(
        resp.json(),
        json!({"offset_line": 1, "num_lines": 2, "total_num_lines": 3,
               "content": "line two\nline three\n", "child_routes": {}})
    );
    let resp = get(
        &r,
        "/v1/build/1/subjob/0/atom/0/console?max_lines=1&offset_line=0",
    )
    .await;
    assert_eq!(resp.json()["content"], "line one\n");
    let resp = get(&r, "/v1/build/1/subjob/0/atom/0/console?max_lines=0").await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    let resp = get(&r, "/v1/build/99/subjob/0/atom/0/console").await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn slaves_drains_events_and_metrics() {
    let fake = seeded();
    let r = app(&fake);
    let resp = get(&r, "/v1/slave").await;
    assert_eq!(resp.status, StatusCode::OK);
    let s = resp.json()["slaves"][0].clone();
    assert_eq!(s["id"], 7);
    assert_eq!(s["num_executors"], 4);
    assert_eq!(s["num_executors_in_use"], 1);
    assert_eq!(resp.json()["slaves"].as_array().unwrap().len(), 1);
    let resp = get(&r, "/v1/slave/7").await;
    assert_eq!(resp.json()["slave"]["id"], 7);
    let resp = get(&r, "/v1/slave/8").await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert_eq!(
        error_of(&resp),
        "Requested slave (slave_id=8) does not exist."
    );
    let resp = get(&r, "/v1").await;
    assert_eq!(resp.json()["master"]["status"], "Master service is up.");
    assert_eq!(resp.json()["master"]["slaves"][0]["id"], 7);
    // Drains: signed, one slave or all.
    let resp = signed(&r, "POST", "/v1/slave/7/shutdown", "{}").await;
    assert_eq!((resp.status, resp.body.len()), (StatusCode::OK, 0));
    let resp = signed(
        &r,
        "POST",
        "/v1/slave/shutdown",
        r#"{"shutdown_all": true}"#,
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let resp = call(
        &r,
        "POST",
        "/v1/slave/shutdown",
        &[],
        r#"{"shutdown_all": true}"#,
    )
    .await;
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    {
        let d = fake.data();
        assert_eq!(d.drained.len(), 2);
        assert_eq!(
            (d.drained[0].slave_ids.clone(), d.drained[0].all),
            (vec![7], false)
        );
        assert!(d.drained[1].all);
    }
    let resp = get(&r, "/v1/eventlog").await;
    let e = resp.json()["events"][0].clone();
    assert_eq!(
        (
            e["__id__"].clone(),
            e["__tag__"].clone(),
            e["build_id"].clone()
        ),
        (json!(1), json!("BUILD_REQUEST_QUEUED"), json!(3))
    );
    // /metrics: the master's text, then the gateway's own histogram.
    get(&r, "/v1/build/1").await;
    let resp = get(&r, "/metrics").await;
    assert_eq!(resp.status, StatusCode::OK);
    let text = resp.text();
    assert!(text.starts_with("ish_master_up 1\n"), "{text}");
    assert!(
        text.contains(
            r#"http_request_duration_seconds_count{endpoint="/v1/build/{build_id}",method="GET",status="200"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn artifacts_are_streamed_with_ranges_and_not_ready_is_202() {
    let fake = seeded();
    let r = app(&fake);
    let resp = get(&r, "/v1/build/1/artifacts.zip").await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.body, (0u8..100).collect::<Vec<_>>());
    assert_eq!(resp.headers[header::CONTENT_TYPE], "application/zip");
    let resp = call(
        &r,
        "GET",
        "/v1/build/1/artifacts.tar.gz",
        &[("Range", "bytes=10-19")],
        "",
    )
    .await;
    assert_eq!(resp.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.body, (10u8..20).collect::<Vec<_>>());
    assert_eq!(resp.headers[header::CONTENT_RANGE], "bytes 10-19/100");
    let resp = call(
        &r,
        "GET",
        "/v1/build/1/artifacts.zip",
        &[("Range", "bytes=200-")],
        "",
    )
    .await;
    assert_eq!(resp.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(resp.headers[header::CONTENT_RANGE], "bytes */100");
    // Build 3 is queued (202, empty), build 5 was canceled (404 JSON), 99 never existed (404, empty).
    let resp = get(&r, "/v1/build/3/artifacts.zip").await;
    assert_eq!((resp.status, resp.body.len()), (StatusCode::ACCEPTED, 0));
    let resp = get(&r, "/v1/build/5/artifacts.zip").await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    assert!(error_of(&resp).contains("CANCELED"), "{}", resp.text());
    let resp = get(&r, "/v1/build/99/artifacts.zip").await;
    assert_eq!((resp.status, resp.body.len()), (StatusCode::NOT_FOUND, 0));
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let fake = seeded();
    let r = app(&fake);
    for path in ["/nope", "/v1/nope", "/v2/builds", "/v1/build/1/subjob/x"] {
        let resp = get(&r, path).await;
        assert_eq!(resp.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(error_of(&resp), format!("Not found: {path}"), "{path}");
        assert!(resp.headers.contains_key("api-version"), "{path}");
    }
    let resp = call(&r, "DELETE", "/v1/build/1", &[], "").await;
    assert_eq!(resp.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers[header::ALLOW], "GET, HEAD, OPTIONS, PUT");
    assert_eq!(
        resp.json(),
        json!({"error": "HTTP 405: Method Not Allowed"})
    );
}

#[tokio::test]
async fn bad_build_bodies_are_400_and_reach_no_master() {
    let fake = Arc::new(Fake::default());
    let r = app(&fake);
    // Malformed JSON: the same answer with a digest or without (decoding comes first).
    for body in [
        &b"{\"type\": "[..],
        b"{not json",
        b"[1,2",
        b"\"unterminated",
        b"{\"type\": \"git\",}",
        b"\xff\xfe{}",
        b"{} trailing",
    ] {
        let d = ish_core::auth::digest(SECRET, body);
        for headers in [vec![(DIGEST, d.as_str())], vec![]] {
            let resp = call(&r, "POST", "/v1/build", &headers, body.to_vec()).await;
            assert_eq!(resp.status, StatusCode::BAD_REQUEST, "{body:?}");
            assert_eq!(resp.json(), json!({"error": INVALID_JSON}), "{body:?}");
        }
    }
    // Well-formed but refused: a FAILURE status response naming what is wrong.
    for (body, needle) in [
        ("[1,2]", "JSON object"),
        ("42", "JSON object"),
        ("null", "JSON object"),
        (r#"{"type": "git", "url": 5}"#, "url"),
        (
            r#"{"type": "git", "url": "/tmp/r", "branch": []}"#,
            "branch",
        ),
        (
            r#"{"type": "directory", "project_directory": true}"#,
            "project_directory",
        ),
        (
            r#"{"type": "directory", "project_directory": "/p", "job_name": 7}"#,
            "job_name",
        ),
        (
            r#"{"type": "directory", "project_directory": "/p", "atoms_override": "x"}"#,
            "atoms_override",
        ),
        (
            r#"{"type": "directory", "project_directory": "/p", "config": "x"}"#,
            "config",
        ),
        (
            r#"{"type": 5, "url": "/tmp/r"}"#,
            "Invalid build request type.",
        ),
        (
            r#"{"type": "svn", "url": "/tmp/r"}"#,
            "Invalid build request type.",
        ),
        (
            r#"{"type": "directory", "project_directory": "/p", "colour": "red"}"#,
            "['colour']",
        ),
        (
            r#"{"type": "directory", "project_directory": "/p", "url": "/r"}"#,
            "['url']",
        ),
        ("{}", "Invalid build request type."),
    ] {
        let resp = signed(&r, "POST", "/v1/build", body).await;
        assert_eq!(
            resp.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            resp.text()
        );
        let v = resp.json();
        assert_eq!(
            (&v["status"], &v["STATUS"]),
            (&json!("FAILURE"), &json!("FAILURE")),
            "{body}"
        );
        assert!(error_of(&resp).contains(needle), "{body}: {v}");
    }
    assert!(
        fake.data().submitted.is_empty(),
        "a refused build was submitted"
    );
}

/// The build bodies the gateway refuses on their shape, before any master call: malformed JSON
/// (with a digest or without), JSON that is not an object, wrong types, unknown and missing
/// fields. Moved here from the end-to-end refusal suite (`tests/rest_refusals.rs`) with the same
/// collected checks; that a refusal reached no master is checked on the fake's record of
/// submits, not just on a count of stored builds.
#[tokio::test]
async fn build_bodies_the_gateway_refuses_reach_no_master() {
    let fake = Arc::new(Fake::default());
    let r_ = app(&fake);
    let mut f = Failures::default();
    let pdir = "/tmp/ish-oneshot-project";

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
        let r = signed(&r_, "POST", "/v1/build", body).await;
        f.rest(
            &format!("malformed JSON {:?}", String::from_utf8_lossy(body)),
            &r,
            StatusCode::BAD_REQUEST,
            INVALID_JSON,
        );
        let r = call(&r_, "POST", "/v1/build", &[], body.to_vec()).await;
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
        let r = signed(&r_, "POST", "/v1/build", body).await;
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
        let r = signed(&r_, "POST", "/v1/build", body.to_string()).await;
        f.refused(what, &r, needle);
    }
    let r = signed(&r_, "POST", "/v1/build", "").await;
    f.refused("empty body", &r, "Invalid build request type.");

    let submitted = fake.data().submitted.len();
    f.check(submitted == 0, || {
        format!("{submitted} refused build request(s) reached the master")
    });
    f.finish();
}

#[tokio::test]
async fn oversized_bodies_are_413_on_every_write_route() {
    let fake = seeded();
    let r = app_with(
        &fake,
        GatewayConfig {
            max_body_bytes: 64,
            ..GatewayConfig::default()
        },
    );
    let big = format!(
        r#"{{"type": "directory", "project_directory": "{}"}}"#,
        "x".repeat(100)
    );
    for (method, path) in [
        ("POST", "/v1/build"),
        ("PUT", "/v1/build/3"),
        ("POST", "/v1/slave/shutdown"),
    ] {
        // Declared too large, and too large without a declared length (chunked).
        let resp = signed(&r, method, path, &big).await;
        assert_eq!(
            resp.status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{method} {path}"
        );
        assert_eq!(
            error_of(&resp),
            "The request body is larger than the limit of 64 bytes.",
        );
        let chunks: Vec<Result<_, std::io::Error>> = vec![
            Ok(axum::body::Bytes::from(big[..50].to_string())),
            Ok(axum::body::Bytes::from(big[50..].to_string())),
        ];
        let resp = call(
            &r,
            method,
            path,
            &[],
            Body::from_stream(tokio_stream::iter(chunks)),
        )
        .await;
        assert_eq!(
            resp.status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{method} {path} chunked"
        );
    }
    // The limit itself is accepted.
    let exact = format!(r#"{{"status": "canceled"{}}}"#, " ".repeat(64 - 22));
    assert_eq!(exact.len(), 64);
    let resp = signed(&r, "PUT", "/v1/build/3", &exact).await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    // An unknown route is still 404 first, whatever the body.
    let resp = call(
        &r,
        "POST",
        "/nope",
        &[("Content-Length", "1000")],
        "x".repeat(1000),
    )
    .await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    let d = fake.data();
    assert!(d.submitted.is_empty() && d.drained.is_empty());
    assert_eq!(d.canceled, vec![3]);
}

#[tokio::test]
async fn cors_preflight_and_headers_on_every_route() {
    let fake = seeded();
    let r = app_with(
        &fake,
        GatewayConfig {
            cors_allowed_origins_regex: Some(r"https://dash\.example".into()),
            ..GatewayConfig::default()
        },
    );
    let origin = [("Origin", "https://dash.example")];
    let resp = call(&r, "OPTIONS", "/v1/build", &origin, "").await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.text(), "{}");
    assert_eq!(
        resp.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://dash.example"
    );
    assert_eq!(resp.headers[header::ACCESS_CONTROL_ALLOW_METHODS], "GET");
    assert_eq!(resp.headers[header::VARY], "Origin");
    // On errors, on the ClusterRunner fallback's 404 and on routes outside ClusterRunner too.
    for path in ["/v1/build/99", "/nope", "/healthz"] {
        let resp = call(&r, "GET", path, &origin, "").await;
        assert_eq!(
            resp.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://dash.example",
            "{path}"
        );
    }
    let resp = call(
        &r,
        "OPTIONS",
        "/v1/build",
        &[("Origin", "https://evil")],
        "",
    )
    .await;
    assert!(
        !resp
            .headers
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
    );
    assert_eq!(resp.headers[header::VARY], "Origin");
}

#[tokio::test]
async fn session_id_and_request_id_on_every_response() {
    let fake = seeded();
    let r = app(&fake);
    let first = get(&r, "/v1/version").await;
    let session = first.headers["session-id"].to_str().unwrap().to_string();
    assert_eq!(session.len(), 36);
    for path in ["/v1/build/1", "/nope", "/healthz", "/v1/build/99"] {
        let resp = get(&r, path).await;
        assert_eq!(resp.headers["session-id"], session.as_str(), "{path}");
        let id = resp.headers["x-request-id"].to_str().unwrap();
        assert_eq!(id.len(), 32, "{path}");
        assert_ne!(id, first.headers["x-request-id"], "{path}: ids repeat");
    }
    // A client's own sane request id is echoed; a hostile one is replaced.
    let resp = call(
        &r,
        "GET",
        "/v1/version",
        &[("X-Request-Id", "ci-run-42.7")],
        "",
    )
    .await;
    assert_eq!(resp.headers["x-request-id"], "ci-run-42.7");
    let resp = call(
        &r,
        "GET",
        "/v1/version",
        &[("X-Request-Id", "a b<script>")],
        "",
    )
    .await;
    assert_ne!(resp.headers["x-request-id"], "a b<script>");
    // Naming this gateway's session passes, another one is 412 (after route resolution).
    let resp = call(&r, "GET", "/v1/build/1", &[("Session-Id", &session)], "").await;
    assert_eq!(resp.status, StatusCode::OK);
    let resp = call(
        &r,
        "GET",
        "/v1/build/1",
        &[("Expected-Session-Id", "old")],
        "",
    )
    .await;
    assert_eq!(resp.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        error_of(&resp),
        "Specified session id: old has expired and is invalid."
    );
    assert!(resp.json()["child_routes"].is_object());
    let resp = call(&r, "GET", "/nope", &[("Session-Id", "old")], "").await;
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    // Another gateway process, another session.
    let other = get(&app(&fake), "/").await;
    assert_ne!(other.headers["session-id"], session.as_str());
}
