//! The gRPC contract between tcpkit agents, the aggregator and `tcpkit-query`: the code
//! tonic and prost generate from `proto/tcpkit.proto`, and how clients connect (TLS, token).

pub mod client;

/// Version 1 of the contract.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("tcpkit.v1");
}
