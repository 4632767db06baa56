//! Job configs and build bodies for the suites: a valid inline job, REST build bodies, and the
//! oversized or hostile configs the refusal suites send, with the limits they are sized by.
#![allow(dead_code)]

use serde_json::{Value, json};
use std::path::Path;

/// `jobconfig::MAX_CONFIG_BYTES`.
pub const MAX_CONFIG: usize = 1 << 20;
/// The master's default `max_atoms_per_build`.
pub const MAX_ATOMS: usize = 100_000;

/// A directory build request (REST) whose job is `config` (inline, so the directory needs no
/// yaml).
pub fn dir_build(dir: &Path, config: Value) -> Value {
    json!({"type": "directory", "project_directory": dir.display().to_string(), "config": config})
}

/// A valid inline job.
pub fn simple_config() -> Value {
    json!({"commands": ["echo \"hi $X\""], "atomizers": [{"X": "printf 'a\\nb\\n'"}]})
}

/// A job config nested `depth` levels deep (the job mapping is the first level).
pub fn nested_config(depth: usize) -> Value {
    let mut v = json!("x");
    for _ in 0..depth.saturating_sub(2) {
        v = json!([v]);
    }
    json!({"commands": [v], "atomizers": [{"A": "echo 1"}]})
}

/// Text of a JSON config nested `depth` levels deep, without building the value (for depths a
/// recursive serializer would not survive).
pub fn nested_config_text(depth: usize) -> String {
    let n = depth.saturating_sub(2);
    format!(
        "{{\"commands\": [{}\"x\"{}], \"atomizers\": [{{\"A\": \"echo 1\"}}]}}",
        "[".repeat(n),
        "]".repeat(n)
    )
}

/// A job config over `jobconfig::MAX_CONFIG_BYTES`.
pub fn huge_config() -> Value {
    json!({"commands": ["x".repeat(MAX_CONFIG + 1)], "atomizers": [{"A": "echo 1"}]})
}

/// `n` atoms as an atoms_override lists them.
pub fn atoms(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("export A=\"{i}\";")).collect()
}

/// A shell loop that waits (at most 60 s) for `gate` to exist: keeps atoms running on demand.
pub fn wait_for_gate(gate: &Path) -> String {
    format!(
        "for i in $(seq 1 1200); do [ -f '{}' ] && break; sleep 0.05; done",
        gate.display()
    )
}
