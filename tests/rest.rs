//! REST gateway tests over real HTTP against an in-process cluster (filled in by issue 3's work).
mod support;
