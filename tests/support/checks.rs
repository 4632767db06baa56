//! Collected checks for the refusal suites: every mismatch is recorded (not stopped at the first)
//! so one run reports every refusal that went wrong; [`Failures::finish`] fails the test with
//! all of them and prints how many checks ran, so moving cases between suites can be counted.
//!
//! Shared, like `resp.rs`, with the gateway's oneshot tests (included there with `#[path]`): a
//! refusal checked against the fake master goes through the very same check as one checked
//! through a real cluster.
#![allow(dead_code)]

use super::StatusCode;
use super::resp::Resp;
use serde_json::Value;
use std::fmt::Debug;
use tonic::{Code, Status};

/// Mismatches found so far, and how many checks ran.
#[derive(Default)]
pub struct Failures {
    failed: Vec<String>,
    run: usize,
}

impl Failures {
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        self.run += 1;
        if !ok {
            let msg = what();
            eprintln!("CHECK FAILED: {msg}");
            self.failed.push(msg);
        }
    }

    pub fn finish(self) {
        println!(
            "CHECKS RUN: {} in {}",
            self.run,
            std::thread::current().name().unwrap_or("?")
        );
        assert!(
            self.failed.is_empty(),
            "{} check(s) failed:\n- {}",
            self.failed.len(),
            self.failed.join("\n- ")
        );
    }

    /// A gRPC result must be `want` (with `needle` in the message when given).
    pub fn status<T: Debug>(
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
    pub fn rest(&mut self, what: &str, r: &Resp, want: StatusCode, needle: &str) {
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
    pub fn refused(&mut self, what: &str, r: &Resp, needle: &str) {
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
