//! The engine's state as Prometheus text.
use super::Core;
use crate::metrics;
use ish_core::state::BuildState;
use std::collections::BTreeMap;

impl Core {
    /// Prometheus text: gauges read off the current state, counters and histograms kept as
    /// things happen. Durations per state are derived from the builds' state timestamps.
    pub(super) fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        metrics::header(&mut out, "ish_builds", "gauge", "Builds by state.");
        for st in BuildState::ALL {
            let n = self.builds.values().filter(|b| b.state == st).count();
            let _ = writeln!(out, "ish_builds{{state=\"{}\"}} {n}", st.name_lower());
        }
        metrics::header(
            &mut out,
            "ish_queue_depth",
            "gauge",
            "Builds not yet finished, errored or canceled.",
        );
        let _ = writeln!(out, "ish_queue_depth {}", self.active.len());
        metrics::header(
            &mut out,
            "ish_subjobs_pending",
            "gauge",
            "Subjobs waiting for an executor.",
        );
        let pending: usize = self
            .active
            .iter()
            .filter_map(|id| self.builds.get(id))
            .map(|b| b.pending.len())
            .sum();
        let _ = writeln!(out, "ish_subjobs_pending {pending}");
        metrics::header(
            &mut out,
            "slaves",
            "gauge",
            "Connected slaves by state (active = running work).",
        );
        let (mut active, mut idle, mut draining) = (0, 0, 0);
        for s in self.slaves.values() {
            if s.draining {
                draining += 1;
            } else if s.busy.is_empty() {
                idle += 1;
            } else {
                active += 1;
            }
        }
        let _ = writeln!(out, "slaves{{state=\"active\"}} {active}");
        let _ = writeln!(out, "slaves{{state=\"idle\"}} {idle}");
        let _ = writeln!(out, "slaves{{state=\"draining\"}} {draining}");
        metrics::header(
            &mut out,
            "ish_executors",
            "gauge",
            "Executors of connected slaves, and how many run work.",
        );
        let total: u32 = self.slaves.values().map(|s| s.executors).sum();
        let busy: usize = self.slaves.values().map(|s| s.busy.len()).sum();
        let _ = writeln!(out, "ish_executors{{state=\"total\"}} {total}");
        let _ = writeln!(out, "ish_executors{{state=\"busy\"}} {busy}");
        metrics::header(
            &mut out,
            "build_state_duration_seconds",
            "histogram",
            "Seconds builds spent in each state they left.",
        );
        let mut durations: BTreeMap<&'static str, metrics::Histogram> = BTreeMap::new();
        let mut serialized = metrics::Histogram::new(&metrics::DURATION_BUCKETS);
        for b in self.builds.values() {
            for w in b.timestamps.windows(2) {
                durations
                    .entry(w[0].0.name_lower())
                    .or_insert_with(|| metrics::Histogram::new(&metrics::DURATION_BUCKETS))
                    .observe((w[1].1 - w[0].1).max(0.0));
            }
            if b.state == BuildState::Finished
                && let Some(s) = &b.summary
            {
                serialized.observe(s.serialized_seconds);
            }
        }
        for (state, h) in &durations {
            h.render(
                &mut out,
                "build_state_duration_seconds",
                &format!("state=\"{state}\""),
            );
        }
        metrics::header(
            &mut out,
            "serialized_build_time_seconds",
            "histogram",
            "Sum of the atom times of each finished build.",
        );
        serialized.render(&mut out, "serialized_build_time_seconds", "");
        metrics::header(
            &mut out,
            "ish_dispatches_total",
            "counter",
            "Subjobs dispatched to slaves.",
        );
        let _ = writeln!(out, "ish_dispatches_total {}", self.metrics.dispatches);
        metrics::header(
            &mut out,
            "ish_atom_results_total",
            "counter",
            "Atom results recorded.",
        );
        let _ = writeln!(out, "ish_atom_results_total {}", self.metrics.atom_results);
        metrics::header(
            &mut out,
            "ish_slaves_lost_total",
            "counter",
            "Slaves removed because their stream ended or their heartbeats stopped.",
        );
        let _ = writeln!(out, "ish_slaves_lost_total {}", self.metrics.slaves_lost);
        metrics::header(
            &mut out,
            "internal_errors",
            "counter",
            "Internal errors by type.",
        );
        for (kind, n) in &self.metrics.internal_errors {
            let _ = writeln!(out, "internal_errors{{type=\"{kind}\"}} {n}");
        }
        out
    }
}
