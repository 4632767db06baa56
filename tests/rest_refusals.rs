//! Refusals of the REST gateway, over real HTTP to a real gateway in front of a real master
//! (an in-process cluster on 127.0.0.1, `support::cluster::Local`).
//!
//! A case lives here when its answer needs the whole path: a body the gateway accepts and the
//! master refuses (relative or `..` paths, bad hashes, deep or huge configs, too many atoms,
//! hostile remote_files), what reaches the wire (413 before `100 Continue`, malformed chunks,
//! the Host header in `artifacts` URLs), digests on every write route with the signed body then
//! accepted and built, and bad ids, routes, methods and parameters next to a real running
//! build that must stay untouched. Bodies the gateway refuses on their own shape, before any
//! master call, are checked one layer down, against a fake master that records every call:
//! `gateway/tests/clusterrunner_oneshot.rs`.
//!
//! Each test sends its bad requests, checks the documented 4xx and that nothing was stored,
//! then that the same cluster still runs a normal build to FINISHED / NO_FAILURES. Checks are
//! collected (`support::checks::Failures`) so one run reports every refusal that went wrong.
mod support;

use ish_core::proto;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;
use support::checks::Failures;
use support::cluster::Local;
use support::jobs::*;
use support::resp::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_bad_build_requests_are_refused_and_store_nothing() {
    let env = Local::new(1, 2)
        .gateway()
        .heartbeat_timeout_ms(60_000)
        .http_timeout(Duration::from_secs(60))
        .start()
        .await;
    let mut f = Failures::default();
    let project = tempfile::tempdir().unwrap();
    let pdir = project.path().display().to_string();
    let before = env.count_builds().await;

    // The bodies the gateway refuses before any master call (malformed JSON, JSON that is not
    // an object, wrong types, unknown and missing fields) are checked at the gateway's layer,
    // against a fake master that records every submit: gateway/tests/clusterrunner_oneshot.rs,
    // `build_bodies_the_gateway_refuses_reach_no_master`.

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
    env.a_normal_build_runs(&mut f).await;
    env.c.shutdown().await.unwrap();
    f.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_oversized_bodies_and_bad_digests_are_refused() {
    let env = Local::new(1, 2)
        .gateway()
        .heartbeat_timeout_ms(60_000)
        .http_timeout(Duration::from_secs(60))
        .start()
        .await;
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
    f.check(env.slaves().await.len() == 1, || {
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
    env.a_normal_build_runs(&mut f).await;
    env.c.shutdown().await.unwrap();
    f.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_malformed_chunks_hosts_timeouts_and_hostile_fields_are_refused() {
    let env = Local::new(1, 2)
        .gateway()
        .heartbeat_timeout_ms(60_000)
        .http_timeout(Duration::from_secs(60))
        .start()
        .await;
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

    env.a_normal_build_runs(&mut f).await;
    env.c.shutdown().await.unwrap();
    f.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_bad_routes_methods_params_and_cancel_bodies() {
    let env = Local::new(1, 2)
        .gateway()
        .heartbeat_timeout_ms(60_000)
        .http_timeout(Duration::from_secs(60))
        .start()
        .await;
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
    f.check(env.slaves().await.len() == 1, || {
        "a refused shutdown drained the slave".into()
    });

    env.a_normal_build_runs(&mut f).await;
    env.c.shutdown().await.unwrap();
    f.finish();
}
