//! REST gateway tests over real HTTP (reqwest) against an in-process cluster with its gateway
//! (`support::cluster::Local`): every ClusterRunner master route, the console vectors of spec §11.3, digests
//! made by an independent implementation (Python's `hmac`), slave shutdown mid-build, and the
//! curl script of `docs/`.
mod support;

use ish_core::proto;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::cluster::{Local, TestCluster};
use support::http::{call, form_encode};
use support::jobs::{dir_build, wait_for_gate};
use support::resp::*;
use support::*;

/// How long one HTTP call of a test's own client may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// The (subjob, atom) ids of the atom whose command string is `export <var>="<value>";`.
async fn find_atom(gw: &TestCluster, id: u64, var: &str, value: &str) -> (u64, u64) {
    let want = format!("export {var}=\"{value}\";");
    let sjs = gw.get(&format!("/v1/build/{id}/subjob")).await.json();
    for sj in sjs["subjobs"].as_array().unwrap() {
        for a in sj["atoms"].as_array().unwrap() {
            if a["command_string"] == want.as_str() {
                return (sj["id"].as_u64().unwrap(), a["id"].as_u64().unwrap());
            }
        }
    }
    panic!("no atom {want} in {sjs:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_get_list_and_browse_builds() {
    let gw = Local::new(1, 2).gateway().start().await;
    let project = tempfile::tempdir().unwrap();
    let config =
        json!({"commands": ["echo \"hi $X\""], "atomizers": [{"X": "printf 'a\\nb\\nc\\n'"}]});
    // Raw JSON body.
    let body = dir_build(project.path(), config.clone());
    let a = gw.submit(&body).await;
    // The form encoding: `__encoded_body__`, the digest over the field's value.
    let encoded =
        json!({"type": "Directory", "project_directory": project.path().display().to_string(),
                         "config": config, "job_name": "Formed"})
        .to_string();
    let form = format!("__encoded_body__={}", form_encode(&encoded));
    let d = ish_core::auth::digest(&gw.c.secret, encoded.as_bytes());
    let r = gw
        .req(
            Method::POST,
            "/builds",
            &[
                (DIGEST, &d),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            Some(&form),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let b_id = r.json()["build_id"].as_u64().unwrap();
    assert_eq!(b_id, a + 1);
    // A git build through REST, with the documented `hash`.
    let repo = Repo::new();
    let commit = repo.commit(
        &[(
            "clusterrunner.yaml",
            "G:\n  commands: ['echo git $V']\n  atomizers: [{V: 'echo 1'}]\n",
        )],
        "job",
    );
    let g = gw
        .submit(&json!({"type": "git", "url": repo.url(), "hash": commit}))
        .await;

    let build = gw.wait_final(a).await;
    assert_eq!(gw.wait_final(b_id).await["status"], "FINISHED");
    let gb = gw.wait_final(g).await;
    assert_eq!(
        (&gb["status"], &gb["result"]),
        (&json!("FINISHED"), &json!("NO_FAILURES")),
        "{gb:#}"
    );
    assert_eq!(build["id"], a);
    assert_eq!(build["status"], "FINISHED");
    assert_eq!(build["result"], "NO_FAILURES");
    assert_eq!(build["num_atoms"], 3);
    let n = build["num_subjobs"].as_u64().unwrap();
    assert!(n >= 1);
    assert_eq!(
        build["details"],
        format!("{n} of {n} subjobs are complete (100.0%).")
    );
    assert_eq!(build["failed_atoms"], json!([]));
    assert_eq!(build["error_message"], Value::Null);
    let mut params = body.clone();
    params["build_project_directory"] = project.path().display().to_string().into();
    assert_eq!(build["request_params"], params);
    let ts = build["state_timestamps"].as_object().unwrap();
    assert_eq!(ts.len(), 7);
    let (q, f) = (
        ts["queued"].as_f64().unwrap(),
        ts["finished"].as_f64().unwrap(),
    );
    assert!(q <= ts["building"].as_f64().unwrap() && ts["building"].as_f64().unwrap() <= f);
    assert_eq!(
        (&ts["error"], &ts["canceled"]),
        (&Value::Null, &Value::Null)
    );
    assert_eq!(
        build["artifacts"],
        gw.url(&format!("/v1/build/{a}/artifacts.zip"))
    );
    // Every GET carries the child routes of its node; the docs alias serves the same build.
    let r = gw.get(&format!("/v1/build/{a}")).await;
    assert_eq!(r.header("api-version"), "1");
    assert_eq!(r.header("session-id").len(), 36);
    assert!(r.header("content-type").starts_with("application/json"));
    assert_eq!(
        r.json()["child_routes"],
        json!({"result": "/v1/build/[build_id]/result",
               "artifacts.tar.gz": "/v1/build/[build_id]/artifacts.tar.gz",
               "artifacts.zip": "/v1/build/[build_id]/artifacts.zip",
               "subjobs": "/v1/build/[build_id]/subjob"})
    );
    for path in [format!("/build/{a}/"), format!("/builds/{a}")] {
        assert_eq!(gw.get(&path).await.json()["build"], build, "{path}");
    }
    let r = gw.get("/v1/build/999").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"], "Invalid build id: 999.");

    // Lists: v1 unpaginated, v2 paginated.
    let ids = |v: &Value, key: &str| -> Vec<u64> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_u64().unwrap())
            .collect()
    };
    let all = gw.get("/v1/build").await.json();
    assert_eq!(ids(&all, "builds"), [a, b_id, g]);
    assert_eq!(
        all["child_routes"],
        json!({"build": "/v1/build/[build_id]"})
    );
    assert_eq!(ids(&gw.get("/build").await.json(), "builds"), [a, b_id, g]);
    let v2 = gw.get("/builds").await.json();
    assert_eq!(ids(&v2, "builds"), [a, b_id, g]);
    assert_eq!(v2["child_routes"], json!({"build": "/builds/[build_id]"}));
    for (q, want) in [
        ("offset=1&limit=1", vec![b_id]),
        ("offset=1", vec![b_id, g]),
        ("limit=0", vec![]),
        ("limit=-4", vec![]),
        ("offset=-2&limit=2", vec![a, b_id]),
        ("limit=100000", vec![a, b_id, g]),
        ("offset=10", vec![]),
    ] {
        assert_eq!(
            ids(&gw.get(&format!("/builds?{q}")).await.json(), "builds"),
            want,
            "{q}"
        );
    }
    for q in ["offset=x", "limit=1.5"] {
        let r = gw.get(&format!("/builds?{q}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}");
        assert!(r.json()["error"].is_string());
    }
    assert_eq!(gw.get("/v1/queue").await.json()["queue"], json!([]));
    assert_eq!(gw.get("/queue").await.json()["queue"], json!([]));
    let formed = gw.build(b_id).await;
    assert_eq!(formed["request_params"]["job_name"], "Formed");

    // Subjobs and atoms.
    let sjs = gw.get(&format!("/v1/build/{a}/subjob")).await.json();
    assert_eq!(sjs["subjobs"].as_array().unwrap().len() as u64, n);
    assert_eq!(
        sjs["child_routes"],
        json!({"subjob": "/v1/build/[build_id]/subjob/[subjob_id]"})
    );
    let sj0 = &sjs["subjobs"][0];
    assert_eq!(sj0["command"], "echo \"hi $X\"");
    assert_eq!(sj0["slave"], "local-0");
    let r = gw.get(&format!("/builds/{a}/subjobs?limit=1")).await.json();
    assert_eq!(r["subjobs"].as_array().unwrap().len(), 1);
    assert_eq!(
        gw.get(&format!("/builds/{a}/subjobs?limit=0")).await.json()["subjobs"],
        json!([])
    );
    assert_eq!(
        gw.get("/builds/999/subjobs?limit=0").await.status,
        StatusCode::NOT_FOUND
    );
    let one = gw.get(&format!("/v1/build/{a}/subjob/0")).await.json();
    assert_eq!(&one["subjob"], sj0);
    assert_eq!(
        one["child_routes"],
        json!({"atoms": "/v1/build/[build_id]/subjob/[subjob_id]/atom",
               "result": "/v1/build/[build_id]/subjob/[subjob_id]/result"})
    );
    let r = gw.get(&format!("/v1/build/{a}/subjob/99")).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (StatusCode::NOT_FOUND, json!("Invalid subjob id."))
    );
    let atoms = gw.get(&format!("/v1/build/{a}/subjob/0/atom")).await.json();
    assert_eq!(atoms["atoms"], sj0["atoms"]);
    let atom = gw
        .get(&format!("/builds/{a}/subjobs/0/atoms/0"))
        .await
        .json();
    assert_eq!(atom["atom"], sj0["atoms"][0]);
    assert_eq!(atom["atom"]["state"], "COMPLETED");
    assert_eq!(atom["atom"]["exit_code"], 0);
    assert!(atom["atom"]["actual_time"].is_number());
    assert_eq!(
        atom["child_routes"],
        json!({"console": "/builds/[build_id]/subjobs/[subjob_id]/atoms/[atom_id]/console"})
    );
    assert_eq!(
        gw.get(&format!("/builds/{a}/subjobs/0/atoms?offset=50"))
            .await
            .json()["atoms"],
        json!([])
    );
    let r = gw.get(&format!("/v1/build/{a}/subjob/0/atom/99")).await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (StatusCode::NOT_FOUND, json!("Invalid atom id."))
    );
    assert_eq!(
        gw.get(&format!("/v1/build/{a}/subjob/0/result"))
            .await
            .json()["status"],
        "not implemented"
    );

    // Refusals store nothing.
    let before = gw.count_builds().await;
    let mut bad = body.clone();
    bad["colour"] = "red".into();
    let r = gw.signed(Method::POST, "/v1/build", &bad.to_string()).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let v = r.json();
    assert_eq!(v["status"], "FAILURE");
    assert!(v["error"].as_str().unwrap().contains("['colour']"), "{v}");
    for (body, msg) in [
        (json!({"type": "svn"}), "Invalid build request type."),
        (
            json!({"type": "git"}),
            "Missing required parameter. Required parameters: ['url']",
        ),
        (
            json!({"type": "directory"}),
            "Missing required parameter. Required parameters: ['project_directory']",
        ),
    ] {
        let r = gw
            .signed(Method::POST, "/v1/build", &body.to_string())
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.json()["error"], msg);
    }
    // Refused by the master: its message, same shape.
    let r = gw
        .signed(
            Method::POST,
            "/v1/build",
            &json!({"type": "directory", "project_directory": "relative/dir"}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.json()["error"].as_str().unwrap().contains("absolute"),
        "{}",
        r.json()
    );
    let r = gw.signed(Method::POST, "/v1/build", "{not json").await;
    assert_eq!(r.json(), json!({"error": "Invalid JSON in request body."}));
    assert_eq!(gw.count_builds().await, before);

    // The master summary lists the slaves.
    let v1 = gw.get("/v1").await.json();
    assert_eq!(v1["master"]["status"], "Master service is up.");
    assert_eq!(v1["master"]["slaves"][0]["url"], "local-0");
    assert_eq!(v1["child_routes"]["builds"], "/v1/build");
    gw.c.shutdown().await.unwrap();
}

/// Python's hmac: an implementation independent of ours.
fn python_digest(secret: &str, body: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import hmac,hashlib,sys; print(hmac.new(sys.argv[1].encode(), sys.stdin.buffer.read(), hashlib.sha512).hexdigest())",
            secret,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn digests_from_an_independent_implementation() {
    let gw = Local::new(1, 1).gateway().start().await;
    let project = tempfile::tempdir().unwrap();
    // Python's json.dumps style, as ClusterRunner's client sends it.
    let body = format!(
        "{{\"type\": \"directory\", \"project_directory\": \"{}\", \"config\": {{\"commands\": [\"true\"], \"atomizers\": [{{\"X\": \"echo 1\"}}]}}}}",
        project.path().display()
    );
    let other = body.replace("true", "false");
    let secret = gw.c.secret.clone();
    let good = python_digest(&secret, body.as_bytes());
    assert_eq!(good, ish_core::auth::digest(&secret, body.as_bytes()));
    let refused = [
        (
            "wrong key",
            vec![(DIGEST, python_digest("another-secret", body.as_bytes()))],
        ),
        ("missing", vec![]),
        (
            "other body",
            vec![(DIGEST, python_digest(&secret, other.as_bytes()))],
        ),
        (
            "upper-case header name, wrong",
            vec![(
                "CLUSTERRUNNER-MESSAGE-AUTHENTICATION-DIGEST",
                "ab".repeat(64),
            )],
        ),
    ];
    for (what, headers) in &refused {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = gw.req(Method::POST, "/v1/build", &h, Some(&body)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(
            r.json(),
            json!({"error": "Message digest does not match header, message not authenticated."}),
            "{what}"
        );
    }
    assert_eq!(gw.count_builds().await, 0);
    // The docs' spelling of the header name works too (headers are case-insensitive).
    let r = gw
        .req(
            Method::POST,
            "/v1/build",
            &[("ClusterRunner-Message-Authentication-Digest", &good)],
            Some(&body),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let id = r.json()["build_id"].as_u64().unwrap();
    assert_eq!(gw.count_builds().await, 1);
    assert_eq!(gw.wait_final(id).await["result"], "NO_FAILURES");
    gw.c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn console_paging_vectors() {
    let gw = Local::new(1, 2).gateway().start().await;
    let project = tempfile::tempdir().unwrap();
    let id = gw
        .submit(&dir_build(
            project.path(),
            json!({
                "commands": ["if [ \"$X\" = full ]; then printf 'line_%s\\n' 0 1 2 3 4 5 6 7 8 9; else printf 'line_%s\\n' 0 1 2 3 4 5 6 7 8; printf line_9; fi"],
                "atomizers": [{"X": "printf 'full\\npartial\\n'"}]
            }),
        ))
        .await;
    assert_eq!(gw.wait_final(id).await["result"], "NO_FAILURES");
    let lines = |r: std::ops::Range<u32>| -> String { r.map(|i| format!("line_{i}\n")).collect() };
    let (s, a) = find_atom(&gw, id, "X", "full").await;
    let console = |s: u64, a: u64, q: &str, v2: bool| {
        if v2 {
            format!("/builds/{id}/subjobs/{s}/atoms/{a}/console?{q}")
        } else {
            format!("/v1/build/{id}/subjob/{s}/atom/{a}/console?{q}")
        }
    };
    // (max_lines, offset_line) -> (offset_line, num_lines, total_num_lines, content)
    let full = [
        ("max_lines=5&offset_line=0", (0, 5, 10, lines(0..5))),
        (
            "max_lines=3&offset_line=4",
            (4, 3, 10, "line_4\nline_5\nline_6\n".to_string()),
        ),
        ("max_lines=5&offset_line=7", (7, 3, 10, lines(7..10))),
        ("max_lines=5", (5, 5, 10, lines(5..10))),
        ("max_lines=1", (9, 1, 10, "line_9\n".to_string())),
        ("max_lines=200", (0, 10, 10, lines(0..10))),
        ("", (0, 10, 10, lines(0..10))),
    ];
    for v2 in [false, true] {
        for (q, (off, num, total, content)) in &full {
            let r = gw.get(&console(s, a, q, v2)).await;
            assert_eq!(r.status, StatusCode::OK, "{q}");
            let v = r.json();
            assert_eq!(
                (
                    &v["offset_line"],
                    &v["num_lines"],
                    &v["total_num_lines"],
                    &v["content"]
                ),
                (&json!(off), &json!(num), &json!(total), &json!(content)),
                "full, {q}"
            );
            assert_eq!(v["child_routes"], json!({}));
        }
    }
    let r = gw
        .get(&console(s, a, "max_lines=5&offset_line=155", false))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["error"].is_string());
    // Nine complete lines and a partial tenth.
    let (s, a) = find_atom(&gw, id, "X", "partial").await;
    for (q, (off, num, total, content)) in [
        ("max_lines=15&offset_line=5", (5, 4, 9, lines(5..9))),
        ("max_lines=15", (0, 9, 9, lines(0..9))),
        ("max_lines=4", (5, 4, 9, lines(5..9))),
    ] {
        let v = gw.get(&console(s, a, q, false)).await.json();
        assert_eq!(
            (
                &v["offset_line"],
                &v["num_lines"],
                &v["total_num_lines"],
                &v["content"]
            ),
            (&json!(off), &json!(num), &json!(total), &json!(content)),
            "partial, {q}"
        );
    }
    // Bad parameters are 400s, unknown objects 404s with ClusterRunner's messages.
    for q in [
        "max_lines=0",
        "max_lines=-2",
        "offset_line=-1",
        "max_lines=ten",
    ] {
        let r = gw.get(&console(s, a, q, false)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}");
        assert!(r.json()["error"].is_string());
    }
    for (path, msg) in [
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
    ] {
        let r = gw.get(&path).await;
        assert_eq!(
            (r.status, r.json()["error"].clone()),
            (StatusCode::NOT_FOUND, json!(msg)),
            "{path}"
        );
    }
    gw.c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_console_artifacts_and_result_redirect() {
    let gw = Local::new(1, 1).gateway().start().await;
    let project = tempfile::tempdir().unwrap();
    let gate = project.path().join("go");
    let id = gw
        .submit(&dir_build(
            project.path(),
            json!({
                "commands": ["echo first", "echo second", wait_for_gate(&gate), "echo third",
                             "echo \"artifact $X\" > \"$ARTIFACT_DIR/out.txt\""],
                "atomizers": [{"X": "echo only"}]
            }),
        ))
        .await;
    // The running atom's output, live, with the atom IN_PROGRESS and the build in the queue.
    let console = format!("/v1/build/{id}/subjob/0/atom/0/console");
    gw.poll(&console, "live output", |r| {
        r.status == StatusCode::OK && r.json()["content"] == "first\nsecond\n"
    })
    .await;
    let v = gw.get(&console).await.json();
    assert_eq!(
        (&v["num_lines"], &v["total_num_lines"]),
        (&json!(2), &json!(2))
    );
    assert_eq!(
        gw.get(&format!("/v1/build/{id}/subjob/0/atom/0"))
            .await
            .json()["atom"]["state"],
        "IN_PROGRESS"
    );
    let b = gw.build(id).await;
    assert_eq!(
        (&b["status"], &b["num_atoms"], &b["result"]),
        (&json!("BUILDING"), &json!(1), &Value::Null)
    );
    assert_eq!(b["failed_atoms"], Value::Null);
    assert_eq!(b["artifacts"], Value::Null);
    assert_eq!(b["details"], "0 of 1 subjobs are complete (0.0%).");
    let queue = gw.get("/v1/queue").await.json();
    assert_eq!(queue["queue"][0]["id"], id);
    // Archives are not ready: 202 with an empty body.
    for path in [
        format!("/v1/build/{id}/artifacts.zip"),
        format!("/builds/{id}/artifacts.tar.gz"),
    ] {
        let r = gw.get(&path).await;
        assert_eq!(
            (r.status, r.body.len()),
            (StatusCode::ACCEPTED, 0),
            "{path}"
        );
    }
    std::fs::write(&gate, "").unwrap();
    let b = gw.wait_final(id).await;
    assert_eq!(b["result"], "NO_FAILURES");
    assert_eq!(
        gw.get(&console).await.json()["content"],
        "first\nsecond\nthird\n"
    );
    assert_eq!(gw.get("/queue").await.json()["queue"], json!([]));

    // The archives, byte for byte what the master's DownloadArtifacts streams.
    let (mut builds, _) = gw.c.clients().await.unwrap();
    let zip = download(&mut builds, id, proto::ArchiveFormat::Zip).await;
    let tgz = download(&mut builds, id, proto::ArchiveFormat::TarGz).await;
    assert_eq!(
        zip_files(&zip)["artifact_0_0/out.txt"],
        b"artifact only\n".to_vec()
    );
    let r = gw.get(&format!("/v1/build/{id}/artifacts.zip")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, zip);
    assert_eq!(r.header("content-type"), "application/zip");
    assert_eq!(r.header("content-length"), zip.len().to_string());
    assert_eq!(r.header("accept-ranges"), "bytes");
    assert_eq!(r.header("api-version"), "1");
    let etag = r.header("etag").to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let r = gw.get(&format!("/builds/{id}/artifacts.tar.gz")).await;
    assert_eq!(
        (r.status, r.header("content-type")),
        (StatusCode::OK, "application/x-tar")
    );
    assert_eq!(r.body, tgz);
    assert_ne!(r.header("etag"), etag);
    // HEAD, ranges, conditional requests.
    let path = format!("/v1/build/{id}/artifacts.zip");
    let r = gw.req(Method::HEAD, &path, &[], None).await;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, 0));
    assert_eq!(r.header("content-length"), zip.len().to_string());
    assert_eq!(r.header("etag"), etag);
    let size = zip.len();
    for (range, start, end) in [
        ("bytes=0-9".to_string(), 0, 9),
        ("bytes=-7".to_string(), size - 7, size - 1),
        ("bytes=10-".to_string(), 10, size - 1),
        (format!("bytes=5-{}", size + 100), 5, size - 1),
    ] {
        let r = gw.req(Method::GET, &path, &[("Range", &range)], None).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            r.header("content-range"),
            format!("bytes {start}-{end}/{size}")
        );
        assert_eq!(r.body, zip[start..=end], "{range}");
    }
    let r = gw
        .req(
            Method::GET,
            &path,
            &[("Range", &format!("bytes={size}-"))],
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.header("content-range"), format!("bytes */{size}"));
    let r = gw
        .req(Method::GET, &path, &[("If-None-Match", &etag)], None)
        .await;
    assert_eq!((r.status, r.body.len()), (StatusCode::NOT_MODIFIED, 0));
    // A stale If-Range: the whole (new) file.
    let r = gw
        .req(
            Method::GET,
            &path,
            &[("Range", "bytes=0-9"), ("If-Range", "\"old\"")],
            None,
        )
        .await;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, size));
    // Unknown build: 404, empty body.
    let r = gw.get("/v1/build/999/artifacts.zip").await;
    assert_eq!((r.status, r.body.len()), (StatusCode::NOT_FOUND, 0));
    // /result redirects to the tar.gz (always the v1 path).
    for p in [
        format!("/v1/build/{id}/result"),
        format!("/builds/{id}/result/"),
    ] {
        let r = gw.get(&p).await;
        assert_eq!(r.status, StatusCode::FOUND, "{p}");
        assert_eq!(
            r.header("location"),
            format!("/v1/build/{id}/artifacts.tar.gz")
        );
    }
    gw.c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_validation_and_canceled_builds() {
    let gw = Local::new(1, 1).gateway().start().await;
    let project = tempfile::tempdir().unwrap();
    let gate = project.path().join("never");
    let id = gw
        .submit(&dir_build(
            project.path(),
            json!({"commands": [wait_for_gate(&gate)], "atomizers": [{"X": "echo 1"}]}),
        ))
        .await;
    gw.wait(id, "building", |b| b["status"] == "BUILDING").await;
    let path = format!("/v1/build/{id}");
    for (body, want) in [
        ("{}", json!({"status": "FAILURE", "STATUS": "FAILURE"})),
        (
            r#"{"badkey": "foo"}"#,
            json!({"status": "FAILURE", "STATUS": "FAILURE",
                   "error": "Key (badkey) is not in list of allowed keys (status)"}),
        ),
        (
            r#"{"status": "foo"}"#,
            json!({"status": "FAILURE", "STATUS": "FAILURE",
                   "error": "Value (foo) is not in list of allowed values (['canceled']) for status"}),
        ),
        (
            r#"{"status": "CANCELED"}"#,
            json!({"status": "FAILURE", "STATUS": "FAILURE",
                   "error": "Value (CANCELED) is not in list of allowed values (['canceled']) for status"}),
        ),
    ] {
        let r = gw.signed(Method::PUT, &path, body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.json(), want, "{body}");
    }
    // Without the digest, or for an unknown build.
    let r = gw
        .req(Method::PUT, &path, &[], Some(r#"{"status": "canceled"}"#))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = gw
        .signed(Method::PUT, "/v1/build/999", r#"{"status": "canceled"}"#)
        .await;
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (StatusCode::NOT_FOUND, json!("Invalid build id: 999."))
    );
    assert_eq!(gw.build(id).await["status"], "BUILDING");
    // The cancel itself (v2 path), then again: a no-op that still succeeds.
    for p in [format!("/builds/{id}"), path.clone()] {
        let r = gw
            .signed(Method::PUT, &p, r#"{"status": "canceled"}"#)
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json(), json!({"status": "SUCCESS", "STATUS": "SUCCESS"}));
    }
    let b = gw.build(id).await;
    assert_eq!(
        (&b["status"], &b["result"]),
        (&json!("CANCELED"), &json!("FAILURE"))
    );
    assert_eq!(b["failed_atoms"], json!([]));
    assert!(b["state_timestamps"]["canceled"].is_number());
    assert_eq!(gw.get("/v1/queue").await.json()["queue"], json!([]));
    // A canceled build never gets archives: 404 with a reason, not 202 forever.
    let r = gw.get(&format!("/v1/build/{id}/artifacts.zip")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.json(),
        json!({"error": format!("Build {id} has no artifacts: it ended in CANCELED")})
    );
    gw.c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slave_shutdown_mid_build_lets_the_build_finish() {
    let gw = Local::new(2, 1).gateway().start().await;
    let project = tempfile::tempdir().unwrap();
    let gate = project.path().join("go");
    let id = gw
        .submit(&dir_build(
            project.path(),
            json!({"commands": [wait_for_gate(&gate), "echo done $X"],
                   "atomizers": [{"X": "seq 1 4"}]}),
        ))
        .await;
    // Both slaves are running a subjob.
    let r = gw
        .poll("/v1/slave", "both slaves busy", |r| {
            r.json()["slaves"]
                .as_array()
                .is_some_and(|s| s.len() == 2 && s.iter().all(|s| s["num_executors_in_use"] == 1))
        })
        .await;
    let slaves = r.json()["slaves"].clone();
    assert_eq!(
        r.json()["child_routes"],
        json!({"slave": "/v1/slave/[slave_id]", "shutdown": "/v1/slave/shutdown"})
    );
    let s0 = slaves[0].clone();
    let sid = s0["id"].as_u64().unwrap();
    assert_eq!(s0["is_alive"], true);
    assert_eq!(s0["is_in_shutdown_mode"], false);
    assert_eq!(s0["current_build_id"], id);
    assert_eq!(s0["num_executors"], 1);
    assert!(s0["session_id"].is_string());
    // Unknown ids: 404 and nothing drained; no digest: 401.
    let r = gw
        .signed(Method::POST, "/v1/slave/9999/shutdown", "{}")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = gw
        .signed(
            Method::POST,
            "/v1/slave/shutdown",
            &json!({"slaves": [sid, 9999]}).to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.json()["error"],
        "Requested slave (slave_id=9999) does not exist."
    );
    let r = gw
        .req(
            Method::POST,
            &format!("/v1/slave/{sid}/shutdown"),
            &[],
            Some("{}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let all = gw.get("/slaves").await.json();
    assert!(
        all["slaves"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["is_in_shutdown_mode"] == false)
    );
    // Drain slave 0: 200 with an empty body.
    let r = gw
        .signed(Method::POST, &format!("/v1/slave/{sid}/shutdown"), "{}")
        .await;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, 0));
    let one = gw.get(&format!("/v1/slave/{sid}")).await.json();
    assert_eq!(one["slave"]["is_in_shutdown_mode"], true);
    assert_eq!(
        one["child_routes"],
        json!({"shutdown": "/v1/slave/[slave_id]/shutdown",
               "heartbeat": "/v1/slave/[slave_id]/heartbeat"})
    );
    std::fs::write(&gate, "").unwrap();
    let b = gw.wait_final(id).await;
    assert_eq!(
        (&b["status"], &b["result"], &b["num_atoms"]),
        (&json!("FINISHED"), &json!("NO_FAILURES"), &json!(4))
    );
    // The drained slave finished its subjob, took no other, and left.
    let name = s0["url"].as_str().unwrap();
    let sjs = gw.get(&format!("/v1/build/{id}/subjob")).await.json();
    let on_drained = sjs["subjobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["slave"] == name)
        .count();
    assert_eq!(on_drained, 1, "{sjs:#}");
    let r = gw
        .poll(&format!("/v1/slave/{sid}"), "drained slave gone", |r| {
            r.status == StatusCode::NOT_FOUND
        })
        .await;
    assert_eq!(
        r.json()["error"],
        format!("Requested slave (slave_id={sid}) does not exist.")
    );
    assert_eq!(
        gw.get("/v1/slave").await.json()["slaves"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Shut down the rest with shutdown_all (v2 path).
    let r = gw
        .signed(
            Method::POST,
            "/slaves/shutdown",
            r#"{"shutdown_all": true}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    gw.poll("/v1/slave", "every slave gone", |r| {
        r.json()["slaves"] == json!([])
    })
    .await;
    gw.c.shutdown().await.unwrap();
}

/// A second gateway on the same master with its own settings; stops when dropped.
struct ExtraGateway {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<Result<(), ish_gateway::GatewayError>>,
}

impl ExtraGateway {
    async fn start(gw: &TestCluster, cfg: ish_gateway::GatewayConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let cfg = ish_gateway::GatewayConfig {
            master: gw.c.master_url.clone(),
            ..cfg
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let secret = gw.c.secret.clone();
        let join = tokio::spawn(ish_gateway::serve(cfg, secret, listener, async move {
            let _ = rx.await;
        }));
        Self {
            base,
            stop: Some(tx),
            join,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.join).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_eventlog_metrics_cors_and_read_auth() {
    let gw = Local::new(1, 1).gateway().start().await;
    // Version negotiation vectors (spec §1.2) on both version routes.
    for (path, want) in [("/v1/version", [1, 1, 2, 1]), ("/version", [2, 1, 2, 2])] {
        for (accept, want) in [
            None,
            Some(V1),
            Some(V2),
            Some("application/vnd.clusterrunner.v999+json"),
        ]
        .into_iter()
        .zip(want)
        {
            let h: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
            let r = gw.req(Method::GET, path, &h, None).await;
            assert_eq!(r.json()["api_version"], want, "{path} {accept:?}");
            assert_eq!(r.header("api-version"), want.to_string());
            assert_eq!(r.json()["version"], ish_core::VERSION);
        }
    }
    // The URL decides pagination; the version only the child routes.
    let r = gw
        .req(Method::GET, "/v1/build", &[("Accept", V2)], None)
        .await;
    assert_eq!(r.json(), json!({"builds": [], "child_routes": {}}));
    let r = gw.req(Method::GET, "/", &[("Accept", V1)], None).await;
    assert_eq!(r.json(), json!({"child_routes": {"v1": "/v1"}}));

    // Events of a build.
    let project = tempfile::tempdir().unwrap();
    let id = gw
        .submit(&dir_build(
            project.path(),
            json!({"commands": ["true"], "atomizers": [{"X": "echo 1"}]}),
        ))
        .await;
    gw.wait_final(id).await;
    let ev = gw.get("/v1/eventlog").await.json();
    let events = ev["events"].as_array().unwrap().clone();
    assert!(events.len() >= 3, "{ev:#}");
    assert!(
        events
            .iter()
            .any(|e| e["__tag__"] == "BUILD_REQUEST_QUEUED" && e["build_id"] == id),
        "{ev:#}"
    );
    for e in &events {
        assert!(e["__id__"].is_u64() && e["__timestamp__"].is_number() && e["__tag__"].is_string());
    }
    let first = events[0]["__id__"].as_u64().unwrap();
    let later = gw.get(&format!("/eventlog?since_id={first}")).await.json()["events"].clone();
    assert_eq!(later.as_array().unwrap().len(), events.len() - 1);
    assert!(
        later
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["__id__"].as_u64().unwrap() > first)
    );
    // A `t` between two events' times, far from both: serde_json's default float parsing may
    // be an ulp off, which made `t = <an event's time>` include or exclude that event at random.
    let ts = |e: &Value| e["__timestamp__"].as_f64().unwrap();
    let t = events
        .windows(2)
        .find(|w| ts(&w[1]) - ts(&w[0]) > 1e-3)
        .map(|w| (ts(&w[0]) + ts(&w[1])) / 2.0)
        .unwrap_or_else(|| panic!("no two events 1 ms apart: {ev:#}"));
    let after = gw
        .get(&format!("/v1/eventlog?since_timestamp={t}"))
        .await
        .json()["events"]
        .clone();
    let ids =
        |v: &[Value]| -> Vec<u64> { v.iter().map(|e| e["__id__"].as_u64().unwrap()).collect() };
    let want: Vec<Value> = events.iter().filter(|e| ts(e) > t).cloned().collect();
    // Events logged after the first read are not in `want`.
    let last = events.last().unwrap()["__id__"].as_u64().unwrap();
    let got: Vec<u64> = ids(after.as_array().unwrap())
        .into_iter()
        .filter(|&i| i <= last)
        .collect();
    assert_eq!(got, ids(&want), "since_timestamp={t}: {after:#}");
    assert!(!want.is_empty() && want.len() < events.len());
    let r = gw.get("/v1/eventlog?since_id=1&since_timestamp=1").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Metrics: the master's and the gateway's own.
    for path in ["/v1/metrics", "/metrics"] {
        let r = gw.get(path).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            r.header("content-type")
                .starts_with("text/plain; version=0.0.4")
        );
        let text = String::from_utf8(r.body).unwrap();
        for want in [
            "# TYPE http_request_duration_seconds histogram",
            r#"http_request_duration_seconds_bucket{endpoint="/v1/eventlog",method="GET",status="200",le="0.005"}"#,
            r#"http_request_duration_seconds_count{endpoint="/v1/build/{build_id}",method="GET",status="200"}"#,
            "build_state_duration_seconds_bucket{",
            "slaves{state=\"idle\"}",
            "ish_queue_depth",
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
    }

    // CORS is off by default.
    let r = gw
        .req(
            Method::GET,
            "/v1/version",
            &[("Origin", "http://dash.example")],
            None,
        )
        .await;
    assert!(r.headers.get("access-control-allow-origin").is_none());
    // A gateway with CORS, its own REST secret and authenticated reads.
    let rest_secret = "the-clusterrunner-secret";
    let extra = ExtraGateway::start(
        &gw,
        ish_gateway::GatewayConfig {
            cors_allowed_origins_regex: Some(r"http://dash\.example(:\d+)?$".into()),
            rest_secret: Some(rest_secret.into()),
            require_auth_for_reads: true,
            ..Default::default()
        },
    )
    .await;
    let http = http::client(HTTP_TIMEOUT);
    let url = |p: &str| format!("{}{p}", extra.base);
    let empty = ish_core::auth::digest(rest_secret, b"");
    let r = call(
        &http,
        Method::GET,
        &url("/v1/build"),
        &[("Origin", "http://dash.example:8080"), (DIGEST, &empty)],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("access-control-allow-origin"),
        "http://dash.example:8080"
    );
    assert_eq!(r.header("access-control-allow-methods"), "GET");
    assert!(
        r.header("access-control-allow-headers")
            .contains("Session-Id")
    );
    let r = call(
        &http,
        Method::GET,
        &url("/v1/build"),
        &[("Origin", "http://evil.example"), (DIGEST, &empty)],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers.get("access-control-allow-origin").is_none());
    // Preflight: open, with the CORS headers.
    let r = call(
        &http,
        Method::OPTIONS,
        &url("/v1/build/1"),
        &[("Origin", "http://dash.example")],
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.header("access-control-allow-origin")),
        (StatusCode::OK, "http://dash.example")
    );
    // Reads need the digest here; `/` stays open.
    let r = call(&http, Method::GET, &url("/v1/build"), &[], None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = call(&http, Method::GET, &url("/"), &[], None).await;
    assert_eq!(r.status, StatusCode::OK);
    // Writes use the REST secret, not the cluster secret.
    let body = dir_build(
        project.path(),
        json!({"commands": ["true"], "atomizers": [{"X": "echo 1"}]}),
    )
    .to_string();
    let with_cluster_secret = ish_core::auth::digest(&gw.c.secret, body.as_bytes());
    let r = call(
        &http,
        Method::POST,
        &url("/v1/build"),
        &[(DIGEST, &with_cluster_secret)],
        Some(body.clone().into()),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let with_rest_secret = ish_core::auth::digest(rest_secret, body.as_bytes());
    let r = call(
        &http,
        Method::POST,
        &url("/v1/build"),
        &[(DIGEST, &with_rest_secret)],
        Some(body.into()),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let id2 = r.json()["build_id"].as_u64().unwrap();
    // Gateways share nothing but the master: the build is visible through the first one.
    gw.wait_final(id2).await;
    // Each gateway has its own session.
    assert_ne!(
        r.header("session-id"),
        gw.get("/").await.header("session-id")
    );
    extra.stop().await;
    gw.c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remote_files_are_downloaded_into_the_project() {
    // A tiny HTTP server for the file.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/data.txt",
            axum::routing::get(|| async { "remote content\n" }),
        );
        axum::serve(listener, app).await
    });
    let gw = Local::new(1, 1).gateway().start().await;
    let project = tempfile::tempdir().unwrap();
    let mut body = dir_build(
        project.path(),
        json!({"commands": ["cp \"$PROJECT_DIR/fetched/data.txt\" \"$ARTIFACT_DIR/\""],
               "atomizers": [{"X": "echo 1"}]}),
    );
    body["remote_files"] = json!({"fetched/data.txt": format!("http://{addr}/data.txt")});
    let id = gw.submit(&body).await;
    let b = gw.wait_final(id).await;
    assert_eq!(b["result"], "NO_FAILURES", "{b:#}");
    let r = gw.get(&format!("/v1/build/{id}/artifacts.zip")).await;
    assert_eq!(
        zip_files(&r.body)["artifact_0_0/data.txt"],
        b"remote content\n".to_vec()
    );
    // Names that escape the project and non-http URLs are refused; nothing is stored.
    let before = gw.count_builds().await;
    for files in [
        json!({"../x": format!("http://{addr}/data.txt")}),
        json!({"x": "file:///etc/passwd"}),
        json!({"x": 3}),
    ] {
        let mut bad = body.clone();
        bad["remote_files"] = files.clone();
        let r = gw.signed(Method::POST, "/v1/build", &bad.to_string()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{files}");
        assert_eq!(r.json()["status"], "FAILURE");
    }
    assert_eq!(gw.count_builds().await, before);
    // atoms_override works for directory builds too: the atoms are used as given.
    let mut body = dir_build(
        project.path(),
        json!({"commands": ["echo \"o $X\""], "atomizers": [{"X": "exit 1"}]}),
    );
    body["atoms_override"] = json!(["export X=\"1\";", "export X=\"2\";"]);
    let id = gw.submit(&body).await;
    let b = gw.wait_final(id).await;
    assert_eq!(
        (&b["result"], &b["num_atoms"]),
        (&json!("NO_FAILURES"), &json!(2)),
        "{b:#}"
    );
    let (s, a) = find_atom(&gw, id, "X", "2").await;
    let c = gw
        .get(&format!("/v1/build/{id}/subjob/{s}/atom/{a}/console"))
        .await
        .json();
    assert_eq!(c["content"], "o 2\n");
    gw.c.shutdown().await.unwrap();
    server.abort();
}

fn curl_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/clusterrunner-curl.sh")
}

/// A PATH with only the tools the script's fallbacks need: no python3, so the digest comes from
/// openssl and the JSON fields from grep/sed.
fn path_without_python() -> tempfile::TempDir {
    let bin = tempfile::tempdir().unwrap();
    for tool in [
        "bash", "curl", "openssl", "grep", "sed", "head", "cut", "cat", "mktemp", "rm", "cp", "mv",
        "date", "sleep",
    ] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{tool} not found"));
        std::os::unix::fs::symlink(found, bin.path().join(tool)).unwrap();
    }
    bin
}

async fn run_script(
    gateway: &str,
    secret: &str,
    body: &Path,
    out: &Path,
    path: Option<&Path>,
) -> std::process::Output {
    let mut cmd = tokio::process::Command::new("bash");
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    let child = cmd
        .arg(curl_script())
        .arg(body)
        .arg(out)
        .env("GATEWAY", gateway)
        .env("SECRET", secret)
        .env("POLL_INTERVAL", "0.2")
        .env("TIMEOUT", "60")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(90), child)
        .await
        .expect("the curl script did not finish in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_curl_script_submits_polls_and_downloads() {
    let gw = Local::new(1, 2).gateway().start().await;
    let project = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let body_file = work.path().join("build.json");
    std::fs::write(
        &body_file,
        dir_build(
            project.path(),
            json!({"commands": ["echo \"curl $X\" > \"$ARTIFACT_DIR/out.txt\""],
                   "atomizers": [{"X": "printf 'a\\nb\\n'"}]}),
        )
        .to_string(),
    )
    .unwrap();
    let no_python = path_without_python();
    for (i, path) in [None, Some(no_python.path())].into_iter().enumerate() {
        let out = work.path().join(format!("artifacts-{i}.zip"));
        let o = run_script(&gw.base, &gw.c.secret, &body_file, &out, path).await;
        let log = format!(
            "stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "{log}");
        let files = zip_files(&std::fs::read(&out).unwrap());
        let outs: Vec<&Vec<u8>> = files
            .iter()
            .filter(|(k, _)| k.ends_with("/out.txt"))
            .map(|(_, v)| v)
            .collect();
        let mut got: Vec<String> = outs
            .iter()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        got.sort();
        assert_eq!(got, ["curl a\n", "curl b\n"], "{log}");
        assert!(
            files
                .keys()
                .any(|k| k.ends_with("/clusterrunner_console_output"))
        );
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            out.display().to_string()
        );
    }
    // A wrong secret: refused, the script fails, nothing is stored.
    let before = gw.count_builds().await;
    let o = run_script(
        &gw.base,
        "not-the-secret",
        &body_file,
        &work.path().join("x.zip"),
        None,
    )
    .await;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(gw.count_builds().await, before);
    gw.c.shutdown().await.unwrap();
}

/// `ish build --gateway`: the Ish CD client's REST mode works against this gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ish_build_client_works_through_the_gateway() {
    let gw = Local::new(1, 2).gateway().start().await;
    let project = tempfile::tempdir().unwrap();
    let results = tempfile::tempdir().unwrap();
    let config = json!({"commands": ["echo \"ish $X\" > \"$ARTIFACT_DIR/r.txt\""],
                        "atomizers": [{"X": "printf 'p\\nq\\n'"}]});
    let opts = ish_cli::client::BuildOptions {
        cfg: ish_cli::client::ClientConfig {
            gateway: Some(gw.base.clone()),
            secret: Some(gw.c.secret.clone()),
            results_dir: results.path().join("out"),
            ..Default::default()
        },
        request: proto::BuildRequest {
            config_json: config.to_string(),
            ..dir_request(project.path())
        },
        no_download: false,
    };
    let code = tokio::time::timeout(Duration::from_secs(90), ish_cli::client::run_build(opts))
        .await
        .expect("ish build did not finish")
        .unwrap();
    assert_eq!(code, ish_cli::client::exit::OK);
    let mut got: Vec<String> = ["artifact_0_0", "artifact_1_0", "artifact_0_1"]
        .iter()
        .filter_map(|d| {
            std::fs::read_to_string(results.path().join("out").join(d).join("r.txt")).ok()
        })
        .collect();
    got.sort();
    assert_eq!(got, ["ish p\n", "ish q\n"]);
    let builds = gw.get("/v1/build").await.json();
    assert_eq!(builds["builds"][0]["request_params"]["type"], "directory");
    gw.c.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Slowloris (issue 9, item 2): connections that never finish their headers
// ---------------------------------------------------------------------------------------------

/// Sockets this process holds as the server side of a TCP connection on `port` (the listener
/// excluded): the gateway's connection descriptors. Connections still in the kernel's accept
/// queue hold no descriptor of ours and are not counted.
fn server_fds(port: u16) -> usize {
    let mut inodes = std::collections::HashSet::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // State 0A is LISTEN.
            if local_port == Some(port) && f[3] != "0A" {
                inodes.insert(format!("socket:[{}]", f[9]));
            }
        }
    }
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| inodes.contains(l.to_string_lossy().as_ref()))
        .count()
}

/// How one flood connection misbehaves.
#[derive(Clone, Copy, Debug)]
enum Loris {
    /// Connects and sends nothing.
    Silent,
    /// Sends half an HTTP/1.1 request head, never the blank line.
    HalfHead,
    /// Sends part of the HTTP/2 connection preface.
    HalfPreface,
}

/// Opens `n` misbehaving connections to `addr` (each connect bounded by `limit`); returns them
/// and when the flood started.
async fn flood(
    addr: std::net::SocketAddr,
    n: usize,
    limit: Duration,
) -> (Vec<tokio::net::TcpStream>, Instant) {
    use tokio::io::AsyncWriteExt;
    let kinds = [Loris::Silent, Loris::HalfHead, Loris::HalfPreface];
    let mut socks = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let mut s = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        let bytes: &[u8] = match kinds[i % kinds.len()] {
            Loris::Silent => b"",
            Loris::HalfHead => b"GET /v1/version HTTP/1.1\r\nHost: x\r\nX-Slow: ",
            Loris::HalfPreface => b"PRI * HTTP/2.0\r\n",
        };
        // A socket not accepted yet (over the cap) takes its bytes into the kernel buffer.
        s.write_all(bytes).await.unwrap();
        socks.push(s);
    }
    (socks, started)
}

/// Waits until the peer closes each socket (EOF or reset); returns the times at which they
/// were closed, measured from `since`, `None` for those still open at `deadline`.
async fn closed_times(
    socks: Vec<tokio::net::TcpStream>,
    since: Instant,
    deadline: Duration,
) -> Vec<Option<Duration>> {
    use tokio::io::AsyncReadExt;
    let mut set = tokio::task::JoinSet::new();
    for (i, mut s) in socks.into_iter().enumerate() {
        set.spawn(async move {
            let mut buf = [0u8; 1024];
            let left = deadline.saturating_sub(since.elapsed());
            let closed = tokio::time::timeout(left, async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await
            .is_ok();
            (i, closed.then(|| since.elapsed()))
        });
    }
    let mut out = vec![None; set.len()];
    while let Some(r) = set.join_next().await {
        let (i, t) = r.unwrap();
        out[i] = t;
    }
    out
}

/// `GET <path>` on a new connection; the status and how long it took.
async fn timed_get(base: &str, path: &str) -> (StatusCode, Duration) {
    // No pooled connection: a kept-alive one would dodge the flood instead of going through it.
    static HTTP: std::sync::LazyLock<reqwest::Client> = std::sync::LazyLock::new(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    });
    let http = &*HTTP;
    let t = Instant::now();
    let r = http
        .get(format!("{base}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = r.status();
    r.bytes().await.unwrap();
    (status, t.elapsed())
}

fn port_of(base: &str) -> u16 {
    base.rsplit(':').next().unwrap().parse().unwrap()
}

fn slow_gateway(max_connections: u32) -> ish_gateway::GatewayConfig {
    ish_gateway::GatewayConfig {
        header_read_timeout_ms: 1_000,
        idle_timeout_ms: 3_000,
        max_connections,
        ..Default::default()
    }
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slowloris_flood_neither_wedges_nor_exhausts_the_gateway() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const FLOOD: usize = 1_500;
    const CAPPED_FLOOD: usize = 1_000;
    const CAP: u32 = 64;
    let header = Duration::from_millis(1_000);
    let idle = Duration::from_millis(3_000);
    let gw = Local::new(1, 2).gateway().start().await;
    let g1 = ExtraGateway::start(&gw, slow_gateway(4_096)).await;
    let g1_addr: std::net::SocketAddr = g1.base.trim_start_matches("http://").parse().unwrap();
    let project = tempfile::tempdir().unwrap();
    let job = json!({"commands": ["echo $N"], "atomizers": [{"N": "seq 4"}]});

    // A kept-alive connection that made one request and then idles.
    let mut keep = tokio::net::TcpStream::connect(g1_addr).await.unwrap();
    keep.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = keep.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    let keep_idle_since = Instant::now();
    let keep_closed = tokio::spawn(async move {
        let closed = tokio::time::timeout(idle + Duration::from_secs(10), async {
            loop {
                match keep.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        closed.is_ok().then(|| keep_idle_since.elapsed())
    });

    // (a) During the flood a normal request is answered at once, and a build goes through.
    let (socks, flood_started) = flood(g1_addr, FLOOD, Duration::from_secs(10)).await;
    let opened_in = flood_started.elapsed();
    // Connected is not yet accepted: give the gateway until just before the first header
    // timeout to take them all.
    let mut held_during = server_fds(port_of(&g1.base));
    while held_during < FLOOD && flood_started.elapsed() < header - Duration::from_millis(100) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        held_during = held_during.max(server_fds(port_of(&g1.base)));
    }
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let (st, took) = timed_get(&g1.base, "/v1/version").await;
        assert_eq!(st, StatusCode::OK);
        worst = worst.max(took);
    }
    let body = dir_build(project.path(), job.clone()).to_string();
    let d = ish_core::auth::digest(&gw.c.secret, body.as_bytes());
    let r = call(
        &http::client(HTTP_TIMEOUT),
        Method::POST,
        &format!("{}/v1/build", g1.base),
        &[(DIGEST, &d)],
        Some(body.into()),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let during_id = r.json()["build_id"].as_u64().unwrap();
    eprintln!(
        "flood of {FLOOD} opened in {opened_in:?}; gateway holds {held_during} connection fds; \
         slowest of 10 GET /v1/version during the flood: {worst:?}"
    );
    assert!(
        held_during >= FLOOD,
        "the flood did not reach the gateway: {held_during} fds"
    );
    assert!(worst < Duration::from_secs(2), "{worst:?}");

    // (b) Every flood connection is closed once the header timeout has passed.
    let closed = closed_times(socks, flood_started, header + Duration::from_secs(5)).await;
    let open = closed.iter().filter(|t| t.is_none()).count();
    let mut times: Vec<Duration> = closed.iter().flatten().copied().collect();
    times.sort();
    eprintln!(
        "flood connections closed by the gateway: {} of {FLOOD} (first {:?}, median {:?}, last {:?})",
        times.len(),
        times.first(),
        times.get(times.len() / 2),
        times.last()
    );
    assert_eq!(open, 0, "{open} flood connections still open");
    assert!(
        times[0] >= header - Duration::from_millis(100),
        "closed before the timeout: {:?}",
        times[0]
    );
    // The idle connection outlives the header timeout and goes at the idle timeout.
    let keep_closed = keep_closed.await.unwrap();
    eprintln!("idle kept-alive connection closed after {keep_closed:?}");
    assert!(
        keep_closed.is_some_and(|t| t >= idle - Duration::from_millis(100)),
        "the idle connection was closed before the idle timeout, or never: {keep_closed:?}"
    );

    // The cap: a flood larger than it never gets more descriptors than the cap (plus the one
    // being accepted), and normal requests are still answered at once: the connections that
    // waited longest without a request make room.
    let g2 = ExtraGateway::start(&gw, slow_gateway(CAP)).await;
    let g2_addr: std::net::SocketAddr = g2.base.trim_start_matches("http://").parse().unwrap();
    let port2 = port_of(&g2.base);
    let sampler = {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let join = tokio::spawn(async move {
            let mut most = 0;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                most = most.max(server_fds(port2));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            most
        });
        (stop, join)
    };
    let (socks, started) = flood(g2_addr, CAPPED_FLOOD, Duration::from_secs(10)).await;
    let opened_in = started.elapsed();
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let (st, took) = timed_get(&g2.base, "/v1/version").await;
        assert_eq!(st, StatusCode::OK);
        worst = worst.max(took);
    }
    let body = dir_build(project.path(), job.clone()).to_string();
    let d = ish_core::auth::digest(&gw.c.secret, body.as_bytes());
    let r = call(
        &http::client(HTTP_TIMEOUT),
        Method::POST,
        &format!("{}/v1/build", g2.base),
        &[(DIGEST, &d)],
        Some(body.into()),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let capped_id = r.json()["build_id"].as_u64().unwrap();
    let closed = closed_times(socks, started, header + Duration::from_secs(5)).await;
    sampler.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = sampler.1.await.unwrap();
    eprintln!(
        "cap {CAP}, flood of {CAPPED_FLOOD} opened in {opened_in:?}: at most {most} connection \
         fds; slowest of 10 GET /v1/version during the flood: {worst:?}; {} of {CAPPED_FLOOD} \
         flood connections closed",
        closed.iter().flatten().count()
    );
    assert!(
        most <= CAP as usize + 1,
        "{most} connection fds over a cap of {CAP}"
    );
    assert!(
        most >= CAP as usize / 2,
        "the capped flood did not reach the gateway"
    );
    assert!(worst < Duration::from_secs(2), "{worst:?}");
    assert!(
        closed.iter().all(Option::is_some),
        "flood connections left open"
    );

    // (c) Afterwards everything works, and nothing was lost.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..100 {
        let base = if i % 2 == 0 { &g1.base } else { &g2.base }.clone();
        set.spawn(async move { timed_get(&base, "/v1/version").await.0 });
    }
    while let Some(st) = set.join_next().await {
        assert_eq!(st.unwrap(), StatusCode::OK);
    }
    let after_id = gw.submit(&dir_build(project.path(), job)).await;
    for id in [during_id, capped_id, after_id] {
        let b = gw.wait_final(id).await;
        assert_eq!(
            (b["status"].as_str(), b["result"].as_str()),
            (Some("FINISHED"), Some("NO_FAILURES")),
            "{b:#}"
        );
    }
    assert_eq!(gw.count_builds().await, 3);
    // Once idle, the gateways hold no connection at all.
    let deadline = Instant::now() + idle + Duration::from_secs(5);
    while server_fds(port_of(&g1.base)) + server_fds(port_of(&g2.base)) > 0 {
        assert!(
            Instant::now() < deadline,
            "idle connections are never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    g1.stop().await;
    g2.stop().await;
    gw.c.shutdown().await.unwrap();
}

/// `ish gateway` as its own process under an open-file limit below its `max_connections`;
/// killed when dropped.
#[cfg(target_os = "linux")]
struct LimitedGateway {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

#[cfg(target_os = "linux")]
impl LimitedGateway {
    fn start(nofile: u32, config: &str) -> Self {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("gateway.toml");
        std::fs::write(&conf, config).unwrap();
        let mut child = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "ulimit -n {nofile} && exec \"$0\" gateway --listen 127.0.0.1:0 --master http://127.0.0.1:1 --config \"$1\""
            ))
            .arg(env!("CARGO_BIN_EXE_ish"))
            .arg(&conf)
            .env("ISH_SECRET", "a-secret-for-the-fd-limit-test")
            .env("ISH_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the gateway exited before listening")
                .unwrap();
            if line.contains("gateway listening") {
                let at = line.find("127.0.0.1:").unwrap();
                let end = line[at..]
                    .find(|c: char| c != '.' && c != ':' && !c.is_ascii_digit())
                    .map_or(line.len(), |e| at + e);
                break line[at..end].parse().unwrap();
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

#[cfg(target_os = "linux")]
impl Drop for LimitedGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_short_of_descriptors_still_answers_during_a_flood() {
    const NOFILE: u32 = 128;
    const FLOOD: usize = 300;
    let header = Duration::from_secs(5);
    // The default max_connections (512) is over the limit: a misconfiguration the gateway must
    // survive, not only warn about.
    let gw = LimitedGateway::start(NOFILE, "header_read_timeout_ms = 5000\n");
    let base = format!("http://{}", gw.addr);
    let (socks, started) = flood(gw.addr, FLOOD, Duration::from_secs(10)).await;
    let opened_in = started.elapsed();
    let held = gw.fds();
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let (st, took) = timed_get(&base, "/healthz").await;
        assert_eq!(st, StatusCode::OK);
        worst = worst.max(took);
    }
    eprintln!(
        "open-file limit {NOFILE}, flood of {FLOOD} opened in {opened_in:?}: the gateway holds \
         {held} fds; slowest of 5 GET /healthz during the flood: {worst:?}"
    );
    assert!(
        held as u32 >= NOFILE - 8,
        "the flood did not reach the limit: {held} fds"
    );
    // Well before the first flood connection's header timeout could free a descriptor.
    assert!(worst < header / 4, "{worst:?}");
    let closed = closed_times(socks, started, header + Duration::from_secs(5)).await;
    assert!(
        closed.iter().all(Option::is_some),
        "flood connections left open"
    );
    let (st, _) = timed_get(&base, "/healthz").await;
    assert_eq!(st, StatusCode::OK);
}
