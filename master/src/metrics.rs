//! The master's metrics, rendered in the Prometheus text format (0.0.4). Small on purpose: a
//! few counters, gauges and fixed-bucket histograms owned by the core, no global registry (several
//! masters in one test process must not share numbers).
use std::collections::BTreeMap;
use std::fmt::Write;

/// Upper bounds of the duration buckets, in seconds.
pub const DURATION_BUCKETS: [f64; 12] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
];

/// A histogram with fixed buckets.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending; +Inf is implicit).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one value.
    pub fn observe(&mut self, v: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    /// Appends the series of this histogram (`name_bucket`, `_sum`, `_count`) with `labels`.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Everything the core measures.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Seconds builds spent in each state, by lower-case state name.
    pub state_durations: BTreeMap<&'static str, Histogram>,
    /// Sum of atom times per finished build.
    pub serialized_build_time: Histogram,
    /// Internal errors by type.
    pub internal_errors: BTreeMap<&'static str, u64>,
    /// Subjobs dispatched.
    pub dispatches: u64,
    /// Atom results recorded.
    pub atom_results: u64,
    /// Slaves lost (stream ended or heartbeats stopped).
    pub slaves_lost: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            state_durations: BTreeMap::new(),
            serialized_build_time: Histogram::new(&DURATION_BUCKETS),
            internal_errors: BTreeMap::new(),
            dispatches: 0,
            atom_results: 0,
            slaves_lost: 0,
        }
    }
}

impl Metrics {
    /// Records that a build spent `seconds` in `state`.
    pub fn state_duration(&mut self, state: &'static str, seconds: f64) {
        self.state_durations
            .entry(state)
            .or_insert_with(|| Histogram::new(&DURATION_BUCKETS))
            .observe(seconds);
    }

    /// Counts an internal error of `kind`.
    pub fn internal_error(&mut self, kind: &'static str) {
        *self.internal_errors.entry(kind).or_default() += 1;
    }
}

/// Appends a `# HELP` / `# TYPE` header.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        static B: [f64; 2] = [1.0, 2.0];
        let mut h = Histogram::new(&B);
        h.observe(0.5);
        h.observe(1.5);
        h.observe(9.0);
        let mut s = String::new();
        h.render(&mut s, "x", "state=\"a\"");
        assert_eq!(
            s,
            "x_bucket{state=\"a\",le=\"1\"} 1\nx_bucket{state=\"a\",le=\"2\"} 2\nx_bucket{state=\"a\",le=\"+Inf\"} 3\nx_sum{state=\"a\"} 11\nx_count{state=\"a\"} 3\n"
        );
    }
}
