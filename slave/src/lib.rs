//! placeholder
pub mod git;
