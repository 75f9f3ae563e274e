//! Generated protobuf messages and gRPC services of PairDB, one module per versioned package.
//!
//! These are wire types: the services convert them to domain types (`pairdb-core`) at their edge and
//! never pass them deeper. Every service uses [`codec::StrictCodec`]: a message that does not decode is
//! the caller's INVALID_ARGUMENT (reason MALFORMED_REQUEST), not the server's INTERNAL. [`status`]
//! holds the one reason → gRPC code table and the `ErrorDetail` every error status carries;
//! [`convert`] the wire enum ↔ domain conversions; [`transport`] the TCP connections every gRPC peer
//! uses (concurrent frames share one `writev`).

pub mod codec;
pub mod convert;
pub mod status;
pub mod transport;

#[allow(missing_debug_implementations, unused_qualifications, clippy::all, clippy::pedantic)]
pub mod common {
    pub mod v1 {
        tonic::include_proto!("pairdb.common.v1");
    }
}

#[allow(missing_debug_implementations, unused_qualifications, clippy::all, clippy::pedantic)]
pub mod kv {
    pub mod v1 {
        tonic::include_proto!("pairdb.kv.v1");
    }
}

#[allow(missing_debug_implementations, unused_qualifications, clippy::all, clippy::pedantic)]
pub mod admin {
    pub mod v1 {
        tonic::include_proto!("pairdb.admin.v1");
    }
}

#[allow(missing_debug_implementations, unused_qualifications, clippy::all, clippy::pedantic)]
pub mod cluster {
    pub mod v1 {
        tonic::include_proto!("pairdb.cluster.v1");
    }
}

#[allow(missing_debug_implementations, unused_qualifications, clippy::all, clippy::pedantic)]
pub mod storage {
    pub mod v1 {
        tonic::include_proto!("pairdb.storage.v1");
    }
}
