//! The gRPC API of the key management service: generated message types, client and server
//! stubs, and the encoded descriptor set for server reflection.
//!
//! Only the server's transport layer and the SDK's client touch these types.

#![allow(missing_docs)] // generated code
#![allow(clippy::all)]

/// Version 1 of the `kms` package.
pub mod v1 {
    tonic::include_proto!("kms.v1");
}

/// The encoded `FileDescriptorSet` of every `.proto` file, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/kms_descriptor.bin"));

pub mod context;
pub mod share;
