//! The gRPC contract between tcpkit agents, the aggregator and `tcpkit-query`: the code
//! tonic and prost generate from `proto/tcpkit.proto`, and nothing else.

#![allow(clippy::all, missing_docs)]

/// Version 1 of the contract.
pub mod v1 {
    tonic::include_proto!("tcpkit.v1");
}
