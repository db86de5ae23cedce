//! Replication between hosts: each pair's two halves, over the transport of
//! `blockrep-transport` (its `endpoint` and `framed` are re-exported here).
//!
//! - The production half: [`link::PairLink`] sits in the volume's write gate; the pair's
//!   tasks send what it queues and handle the DR side's answers.
//! - The DR half: [`applier::Applier`] writes incoming frames to the DR volume, through the
//!   [`stage_log`] for units that must apply whole.
//! - [`verify`]: online verify, comparing both sides' CRCs while the pair replicates.

pub mod applier;
pub mod clock;
pub mod compression;
pub mod dr;
pub mod dr_state;
pub mod drill;
pub mod link;
pub mod membership;
pub mod memory_release;
pub mod pairs;
pub mod production;
pub mod send_limit;
pub mod stage_log;
pub mod undo_journal;
pub mod verify;

pub use blockrep_transport::{
    CongestionControl, DEFAULT_PEER_TIMEOUT, MAX_UDP_PAYLOAD, MIN_UDP_PAYLOAD, TransportSettings,
    endpoint, framed, link_test,
};
