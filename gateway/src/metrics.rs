//! The gateway's own metric: `http_request_duration_seconds{method, endpoint, status}`, appended
//! to the master's text on `/metrics`. Hand-rolled and owned by the router state, so several
//! gateways in one process (tests) keep separate numbers.
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Bucket upper bounds in seconds (ClusterRunner's, which are the Prometheus client defaults
/// extended to 50 s).
pub const BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 25.0, 50.0,
];

#[derive(Debug, Clone, Default)]
struct Series {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// Request durations by (method, endpoint, status).
#[derive(Debug, Default)]
pub struct HttpMetrics {
    series: Mutex<BTreeMap<(String, String, u16), Series>>,
}

/// Python's float formatting for bucket bounds (`1.0`, not `1`), as ClusterRunner printed them.
fn le(b: f64) -> String {
    if b.fract() == 0.0 {
        format!("{b:.1}")
    } else {
        b.to_string()
    }
}

/// Label values may not hold `\`, `"` or newlines unescaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl HttpMetrics {
    /// Records one request.
    pub fn observe(&self, method: &str, endpoint: String, status: u16, seconds: f64) {
        let mut map = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let s = map
            .entry((method.to_string(), endpoint, status))
            .or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                s.counts[i] += 1;
            }
        }
        s.sum += seconds;
        s.count += 1;
    }

    /// The histogram in the Prometheus text format (0.0.4).
    pub fn render(&self) -> String {
        let map = self
            .series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = String::new();
        let name = "http_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Latency of HTTP requests to the gateway, by route template."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for ((method, endpoint, status), s) in &map {
            let labels = format!(
                "endpoint=\"{}\",method=\"{}\",status=\"{status}\"",
                escape(endpoint),
                escape(method)
            );
            for (b, c) in BUCKETS.iter().zip(s.counts) {
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{}\"}} {c}", le(*b));
            }
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", s.count);
            let _ = writeln!(out, "{name}_count{{{labels}}} {}", s.count);
            let _ = writeln!(out, "{name}_sum{{{labels}}} {}", s.sum);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_text() {
        let m = HttpMetrics::default();
        m.observe("GET", "/v1/build/{build_id}".into(), 200, 0.02);
        m.observe("GET", "/v1/build/{build_id}".into(), 200, 3.0);
        let t = m.render();
        let l = r#"endpoint="/v1/build/{build_id}",method="GET",status="200""#;
        assert!(
            t.contains("# TYPE http_request_duration_seconds histogram\n"),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "http_request_duration_seconds_bucket{{{l},le=\"0.01\"}} 0\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "http_request_duration_seconds_bucket{{{l},le=\"0.025\"}} 1\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "http_request_duration_seconds_bucket{{{l},le=\"2.5\"}} 1\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "http_request_duration_seconds_bucket{{{l},le=\"5.0\"}} 2\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!(
                "http_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} 2\n"
            )),
            "{t}"
        );
        assert!(
            t.contains(&format!("http_request_duration_seconds_count{{{l}}} 2\n")),
            "{t}"
        );
        assert_eq!(BUCKETS.len(), 16);
    }
}
