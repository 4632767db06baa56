//! `ish bench suite`: the performance benchmarks of the dispatch engine (B1–B6), each on a
//! cluster started for it on 127.0.0.1, printed as one table beside the targets.
//!
//! - B1 trivial atoms: N atoms of `true` on 2 slaves × 4 executors, end to end, beside the same
//!   commands run by `xargs -P 8 bash -c` (the physical floor on this machine).
//! - B2 makespan: atoms with skewed (log-normal) durations on 8 executors, after a first build
//!   recorded their times: makespan ÷ max(total / executors, longest atom), for the queue
//!   dispatch and for ClusterRunner's fixed grouping.
//! - B3 master scale: many simulated slaves (in-process stream clients that answer at once) and
//!   zero-work atoms against a master process: dispatches/s, dispatch latency, master peak RSS.
//! - B4 console throughput: one atom writing a lot to stdout through a master and a slave
//!   process: MB/s into the master's console store, peak RSS of both.
//! - B5 latency: submit → first atom running with a warm repo cache, p50/p99.
//! - B6 short atoms as a client sees them: 2 slaves × 2 executors, `echo` atoms without
//!   timing history, submitted and polled through the REST gateway, beside `xargs -P 4`.
//!
//! `--quick` runs each with small numbers: a smoke test of correctness (CI), not of speed.

mod b1;
mod b2;
mod b3;
mod b4;
mod b5;
mod b6;
mod common;
mod footprint;
mod procs;

pub use b1::b1;
pub use b2::b2;
pub use b3::b3;
pub use b4::b4;
pub use b5::b5;
pub use b6::b6;
pub use common::{Row, Scale, print_rows};
