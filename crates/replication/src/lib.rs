//! Replication between hosts: the QUIC endpoint, and each pair's two halves.
//!
//! - [`endpoint`]: one QUIC endpoint per agent (quinn, mutual TLS); control calls and
//!   replication streams.
//! - [`framed`]: frames over QUIC streams, payloads not copied on the way out.
//! - The production half: [`link::PairLink`] sits in the volume's write gate; the pair's
//!   tasks send what it queues and handle the DR side's answers.
//! - The DR half: [`applier::Applier`] writes incoming frames to the DR volume, through the
//!   [`stage_log`] for units that must apply whole.
//! - [`verify`]: online verify, comparing both sides' CRCs while the pair replicates.

pub mod applier;
pub mod clock;
pub mod dr;
pub mod dr_state;
pub mod endpoint;
pub mod framed;
pub mod link;
pub mod link_test;
pub mod membership;
pub mod pairs;
pub mod production;
pub mod stage_log;
pub mod verify;

pub use endpoint::{CongestionControl, DEFAULT_PEER_TIMEOUT, TransportSettings};
