//! Ish CD shared core. See README.md.
pub mod console;
pub mod grouping;
pub mod jobconfig;
pub mod proto;
