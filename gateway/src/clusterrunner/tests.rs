//! The ClusterRunner routes that need no master (a master that does not exist stands in).
use super::auth;
use super::ctx::is_plain_authority;
use crate::{AppState, GatewayConfig};
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;

const SECRET: &str = "unit-test-secret";

/// A gateway whose master does not exist: everything that needs no master call can be tested.
fn app(cfg: GatewayConfig) -> axum::Router {
    let cfg = GatewayConfig {
        master: "http://127.0.0.1:1".into(),
        ..cfg
    };
    crate::router(AppState::new(&cfg, SECRET).unwrap())
}

async fn call(
    router: &axum::Router,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, HeaderMap, String) {
    let mut req = axum::http::Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = router
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

fn parse(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[tokio::test]
async fn version_negotiation_over_http() {
    let r = app(GatewayConfig::default());
    for (path, accept, want) in [
        ("/v1/version", None, 1),
        (
            "/v1/version",
            Some("application/vnd.clusterrunner.v1+json"),
            1,
        ),
        (
            "/v1/version",
            Some("application/vnd.clusterrunner.v2+json"),
            2,
        ),
        (
            "/v1/version",
            Some("application/vnd.clusterrunner.v999+json"),
            1,
        ),
        ("/version/", None, 2),
        ("/version", Some("application/vnd.clusterrunner.v1+json"), 1),
    ] {
        let h: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
        let (st, headers, body) = call(&r, "GET", path, &h, "").await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(
            headers["api-version"],
            want.to_string(),
            "{path} {accept:?}"
        );
        let v = parse(&body);
        assert_eq!(v["api_version"], want, "{path} {accept:?}");
        assert_eq!(v["version"], ish_core::VERSION);
        assert_eq!(v["child_routes"], json!({}));
        assert!(
            headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        assert_eq!(headers["session-id"].len(), 36);
    }
}

#[tokio::test]
async fn root_lists_child_routes_per_version() {
    let r = app(GatewayConfig::default());
    let (_, _, body) = call(&r, "GET", "/", &[], "").await;
    assert_eq!(parse(&body)["child_routes"]["builds"], "/builds");
    let (_, h, body) = call(
        &r,
        "GET",
        "/",
        &[("Accept", "application/vnd.clusterrunner.v1+json")],
        "",
    )
    .await;
    assert_eq!(parse(&body), json!({"child_routes": {"v1": "/v1"}}));
    assert_eq!(h["api-version"], "1");
    let (st, _, body) = call(&r, "OPTIONS", "/v1/build", &[], "").await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "{}"));
    let (st, _, body) = call(&r, "GET", "/healthz", &[], "").await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "ok"));
    let (st, h, body) = call(&r, "HEAD", "/v1/version", &[], "").await;
    assert_eq!(st, StatusCode::OK);
    assert!(body.is_empty());
    assert_ne!(h[header::CONTENT_LENGTH], "0");
}

#[tokio::test]
async fn client_errors_are_json() {
    let r = app(GatewayConfig::default());
    for path in ["/v1/build/abc", "/nope", "/v2/builds", "/v1/build/1//"] {
        let (st, h, body) = call(&r, "GET", path, &[], "").await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{path}");
        assert!(parse(&body)["error"].is_string(), "{path}");
        assert!(h.contains_key("api-version"));
    }
    let (st, h, body) = call(&r, "DELETE", "/v1/build/1", &[], "").await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h[header::ALLOW], "GET, HEAD, OPTIONS, PUT");
    assert_eq!(
        parse(&body),
        json!({"error": "HTTP 405: Method Not Allowed"})
    );
    let (st, _, _) = call(&r, "POST", "/v1/queue", &[], "{}").await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    let (st, _, body) = call(&r, "POST", "/v1/slave", &[], "{}").await;
    assert_eq!(st, StatusCode::NOT_IMPLEMENTED);
    assert!(parse(&body)["error"].as_str().unwrap().contains("gRPC"));
    let (st, _, body) = call(
        &r,
        "GET",
        "/v1/build/1/subjob/0/atom/0/console?max_lines=0",
        &[],
        "",
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(parse(&body)["child_routes"].is_object());
    let (st, _, _) = call(&r, "GET", "/builds?limit=x", &[], "").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _, _) = call(
        &r,
        "GET",
        "/v1/eventlog?since_id=1&since_timestamp=1",
        &[],
        "",
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn session_check() {
    let r = app(GatewayConfig::default());
    let (_, h, _) = call(&r, "GET", "/", &[], "").await;
    let session = h["session-id"].to_str().unwrap().to_string();
    let (st, _, _) = call(&r, "GET", "/", &[("Session-Id", &session)], "").await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, body) = call(
        &r,
        "GET",
        "/v1/version",
        &[("Expected-Session-Id", "gone")],
        "",
    )
    .await;
    assert_eq!(st, StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        parse(&body)["error"],
        "Specified session id: gone has expired and is invalid."
    );
}

#[tokio::test]
async fn writes_need_the_digest_before_anything_else() {
    let r = app(GatewayConfig::default());
    let body = r#"{"type": "directory", "project_directory": "/tmp"}"#;
    for headers in [
        vec![],
        vec![(auth::DIGEST_HEADER, "00ff")],
        vec![(auth::DIGEST_HEADER, "not hex")],
    ] {
        let (st, _, resp) = call(&r, "POST", "/v1/build", &headers, body).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert_eq!(parse(&resp), json!({"error": auth::DIGEST_MISMATCH}));
    }
    let other = ish_core::auth::digest(SECRET, b"{}");
    let (st, _, _) = call(
        &r,
        "PUT",
        "/v1/build/1",
        &[(auth::DIGEST_HEADER, &other)],
        body,
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _, _) = call(
        &r,
        "POST",
        "/v1/slave/shutdown",
        &[],
        r#"{"shutdown_all": true}"#,
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _, _) = call(&r, "POST", "/v1/slave/3/shutdown", &[], "{}").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // Bad JSON is reported first (ClusterRunner decodes, then authenticates).
    let (st, _, resp) = call(&r, "POST", "/builds", &[], "{oops").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(
        parse(&resp),
        json!({"error": "Invalid JSON in request body."})
    );
    // A good digest gets to validation, which refuses unknown fields by name.
    let bad = r#"{"type": "directory", "project_directory": "/tmp", "colour": "red"}"#;
    let d = ish_core::auth::digest(SECRET, bad.as_bytes());
    let (st, _, resp) = call(&r, "POST", "/v1/build", &[(auth::DIGEST_HEADER, &d)], bad).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let v = parse(&resp);
    assert_eq!(
        (v["status"].clone(), v["STATUS"].clone()),
        (json!("FAILURE"), json!("FAILURE"))
    );
    assert!(v["error"].as_str().unwrap().contains("['colour']"), "{v}");
    // The form encoding: the digest covers the field's value.
    let form = format!(
        "__encoded_body__={}",
        bad.replace('{', "%7B")
            .replace('}', "%7D")
            .replace('"', "%22")
            .replace(' ', "+")
    );
    let (st, _, resp) = call(
        &r,
        "POST",
        "/v1/build",
        &[
            (auth::DIGEST_HEADER, &d),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        &form,
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(
        parse(&resp)["error"]
            .as_str()
            .unwrap()
            .contains("['colour']")
    );
}

#[test]
fn only_plain_authorities_are_reflected() {
    for ok in [
        "gw.example.com",
        "gw.example.com:8080",
        "gw.example.com.",
        "localhost",
        "127.0.0.1:43000",
        "[::1]:43000",
        "[2001:db8::1]",
    ] {
        assert!(is_plain_authority(ok), "{ok}");
    }
    for bad in [
        "",
        ".",
        "a..b",
        "evil\"><script>alert(1)</script>",
        "a/b",
        "a?b",
        "a#b",
        "user@evil.com",
        "a b",
        "a%2Fb",
        "a:",
        "a:99999",
        "a:1x",
        "a:80:80",
        "[::1",
        "[nope]:1",
        "[::1]x",
        "[::1]:",
    ] {
        assert!(!is_plain_authority(bad), "{bad}");
    }
}

#[tokio::test]
async fn a_body_that_cannot_be_read_is_400_and_only_an_oversized_one_413() {
    let r = app(GatewayConfig {
        max_body_bytes: 16,
        ..GatewayConfig::default()
    });
    let post = |body: Body| {
        axum::http::Request::builder()
            .method("POST")
            .uri("/v1/build")
            .body(body)
            .unwrap()
    };
    // What hyper hands the handler for a malformed chunked body: a stream that fails.
    let broken = Body::from_stream(tokio_stream::iter(vec![
        Ok(Bytes::from_static(b"{\"type\"")),
        Err(std::io::Error::other("invalid chunk size line")),
    ]));
    let resp = r.clone().oneshot(post(broken)).await.unwrap();
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let v = parse(std::str::from_utf8(&body).unwrap());
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.starts_with("The request body could not be read")
            && e.contains("invalid chunk size line"),
        "{e}"
    );
    // Past the limit with no declared length (chunked): still 413.
    let long = Body::from_stream(tokio_stream::iter(vec![
        Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 10])),
        Ok(Bytes::from(vec![b' '; 10])),
    ]));
    let resp = r.clone().oneshot(post(long)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn a_short_rest_secret_signs_writes() {
    let r = app(GatewayConfig {
        rest_secret: Some("abc".into()),
        ..GatewayConfig::default()
    });
    let bad = r#"{"type": "directory", "project_directory": "/tmp", "colour": "red"}"#;
    let d = ish_core::auth::digest("abc", bad.as_bytes());
    // Past the digest to validation (which refuses the unknown field): the key works.
    let (st, _, resp) = call(&r, "POST", "/v1/build", &[(auth::DIGEST_HEADER, &d)], bad).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{resp}");
    assert!(resp.contains("['colour']"), "{resp}");
    let d = ish_core::auth::digest(SECRET, bad.as_bytes());
    let (st, _, _) = call(&r, "POST", "/v1/build", &[(auth::DIGEST_HEADER, &d)], bad).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn unreachable_master_is_503() {
    let r = app(GatewayConfig::default());
    let (st, _, body) = call(&r, "GET", "/v1/build", &[], "").await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        parse(&body)["error"]
            .as_str()
            .unwrap()
            .contains("unavailable"),
        "{body}"
    );
}

#[tokio::test]
async fn body_limit_cors_and_read_auth() {
    let r = app(GatewayConfig {
        max_body_bytes: 16,
        cors_allowed_origins_regex: Some("https://dash".into()),
        require_auth_for_reads: true,
        ..GatewayConfig::default()
    });
    let (st, _, body) = call(&r, "POST", "/v1/build", &[], &"x".repeat(17)).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(parse(&body)["error"].is_string());
    let (st, h, _) = call(
        &r,
        "OPTIONS",
        "/v1/build",
        &[("Origin", "https://dash.example")],
        "",
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        h[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://dash.example"
    );
    let (_, h, _) = call(
        &r,
        "OPTIONS",
        "/v1/build",
        &[("Origin", "https://other")],
        "",
    )
    .await;
    assert!(!h.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    // Reads need the digest (of the empty body); `/` stays open.
    let (st, h, _) = call(&r, "GET", "/v1/version", &[("Origin", "https://dash")], "").await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(h.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    let d = ish_core::auth::digest(SECRET, b"");
    let (st, _, _) = call(&r, "GET", "/v1/version", &[(auth::DIGEST_HEADER, &d)], "").await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, _) = call(&r, "GET", "/", &[], "").await;
    assert_eq!(st, StatusCode::OK);
}

#[tokio::test]
async fn gateway_metrics_count_requests_by_route_template() {
    let state = AppState::new(
        &GatewayConfig {
            master: "http://127.0.0.1:1".into(),
            ..GatewayConfig::default()
        },
        SECRET,
    )
    .unwrap();
    let r = crate::router(state.clone());
    call(&r, "GET", "/v1/build/5", &[], "").await;
    call(&r, "GET", "/nope", &[], "").await;
    let text = state.metrics().render();
    assert!(
        text.contains(r#"http_request_duration_seconds_count{endpoint="/v1/build/{build_id}",method="GET",status="503"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"endpoint="<unmatched>",method="GET",status="404""#),
        "{text}"
    );
}
