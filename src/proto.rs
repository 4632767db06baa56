//! The generated gRPC contract (`proto/ish/v1`). Hand-written conversions live next to the
//! domain types that use them, not here.
#![allow(
    missing_docs,
    clippy::all,
    missing_debug_implementations,
    unreachable_pub
)]
tonic::include_proto!("ish.v1");

/// Encoded `FileDescriptorSet` of the whole contract (for gRPC reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ish_descriptor.bin"));
