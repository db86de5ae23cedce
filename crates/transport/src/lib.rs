//! The transport between hosts, below the pairs and the coordinator's calls.
//!
//! - [`endpoint`]: one QUIC endpoint per agent (quinn, mutual TLS): control calls, and
//!   replication streams opened with a `Hello`.
//! - [`framed`]: `blockrep-wire`'s frames over QUIC streams, payloads not copied on the
//!   way out.
//! - [`link_test`]: the raw throughput of the link between two agents (`blockrep cluster
//!   link-test`), the ceiling a pair's replication is measured against.

pub mod endpoint;
pub mod framed;
pub mod link_test;

pub use endpoint::{
    CongestionControl, DEFAULT_PEER_TIMEOUT, MAX_UDP_PAYLOAD, MIN_UDP_PAYLOAD, TransportSettings,
};
