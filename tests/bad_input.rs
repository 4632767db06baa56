//! Bad input to the REST gateway and the gRPC API (issue 4).
mod support;
