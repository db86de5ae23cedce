//! The logic of replication that does no I/O: ids and statuses, volume roles, clear
//! tickets, consistency groups' statuses and actions, the async journal with its epochs and bound, data generations and what a
//! connection does about them, and resync plans. The agent's
//! replication crate drives these with real disks and QUIC; tests drive them synchronously
//! and in seeded simulations.

pub mod answer_hold;
pub mod digests;
pub mod direct_gate;
pub mod durability;
pub mod group;
pub mod group_cut;
pub mod ids;
pub mod journal;
pub mod lineage;
pub mod reject;
pub mod resync;
pub mod role;
mod send_queue;
pub mod status;
pub mod tickets;
pub mod undo;

pub use durability::{AckBarrier, SyncTicket};
pub use group::{
    FaultLevel, GroupAction, GroupStatus, GroupView, Refused, Transition, group_replication,
};
pub use ids::{AnswerToken, Epoch, GroupId, JobId, PairId, ProbeId, WriteSeq};
pub use journal::{Admitted, Completed, Journal, Mode, Outgoing, Payload, PayloadLen, WriteFrame};
pub use lineage::{
    Divergence, DrView, FullSyncReason, Generation, GenerationId, Lineage, Plan, ProductionView,
};
pub use reject::RejectReason;

/// The least send limit an agent or a pair takes: 1 MiB/s.
pub const MIN_SEND_LIMIT: u64 = 1 << 20;
/// The most: the limiter counts 1 KiB cells in a `u32` per second (just under 4 TiB/s).
pub const MAX_SEND_LIMIT: u64 = (u32::MAX as u64) * 1024;

/// Whether `rate` (bytes per second) is a send limit an agent takes; why not if it is not.
pub fn check_send_limit(rate: u64) -> Result<(), String> {
    if rate < MIN_SEND_LIMIT {
        Err(format!(
            "a send limit of {rate} bytes per second is below the least, {MIN_SEND_LIMIT} (1 MiB/s)"
        ))
    } else if rate > MAX_SEND_LIMIT {
        Err(format!(
            "a send limit of {rate} bytes per second is past the most, {MAX_SEND_LIMIT} (4 TiB/s)"
        ))
    } else {
        Ok(())
    }
}
pub use resync::ResyncPlan;
pub use role::{IllegalTransition, VolumeRole, WriteVerdict};
pub use status::{
    IllegalPairStatus, JobStatus, JobType, PairStatus, ReplicationModel, ReplicationStatus,
    UnknownValue,
};
pub use tickets::{Redeemed, Ticket, TicketRegistry};
