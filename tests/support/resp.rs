//! What an HTTP call returned, and the ClusterRunner REST constants the tests check against.
//!
//! Shared by two layers that make their calls differently: the cross-role suites (`tests/`,
//! reqwest over real HTTP to a real gateway) and the gateway's oneshot tests
//! (`gateway/tests/`, `Router::oneshot` against a fake master), which include this file with
//! `#[path]`. The including module provides `StatusCode` and `HeaderMap` (both crates re-export
//! the same `http` types), so this file names no HTTP crate itself.
#![allow(dead_code)]

use super::{HeaderMap, StatusCode};
use serde_json::Value;

/// The ClusterRunner digest header.
pub const DIGEST: &str = "Clusterrunner-Message-Authentication-Digest";
/// The error of a request whose digest does not match.
pub const DIGEST_MISMATCH: &str =
    "Message digest does not match header, message not authenticated.";
/// The error of a body that is not JSON.
pub const INVALID_JSON: &str = "Invalid JSON in request body.";
pub const V1: &str = "application/vnd.clusterrunner.v1+json";
pub const V2: &str = "application/vnd.clusterrunner.v2+json";
/// The gateway's default `max_body_bytes`.
pub const MAX_BODY: usize = 10 << 20;

/// What an HTTP call returned.
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    /// The body as JSON (panics, with the body, when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), status {}: {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The value of header `name` (panics when it is missing).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `error` string of a JSON body, `""` when there is none.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}
