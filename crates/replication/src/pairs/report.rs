//! What this agent reports of each pair it holds a side of ([`PairReport`]), in the
//! domain's types: the daemon turns it into the protocol's `PairState` for the coordinator,
//! the local API and the metrics.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use blockrep_core::VolumeId;
use blockrep_core::pair::hold_times::HoldSummary;
use blockrep_core::pair::state::PairState;
use blockrep_core::replication::group_cut::Live;
use blockrep_core::replication::{
    Epoch, GenerationId, PairId, ReplicationModel, ReplicationStatus,
};
use blockrep_volume::Volume;

use crate::dr::DrPair;
use crate::membership::{Fence, Side};
use crate::production::ProductionPair;
use crate::verify::VerifyStatus;

/// One side of one pair, as this agent sees it.
#[derive(Clone, Debug)]
pub struct PairReport {
    pub pair: PairId,
    pub volume: VolumeId,
    pub volume_name: String,
    pub side: Side,
    pub model: ReplicationModel,
    pub status: ReplicationStatus,
    pub detail: String,
    pub since: SystemTime,
    /// Of the resync under way (1.0 once done).
    pub progress: f64,
    pub out_of_sync_bytes: u64,
    pub lag_seconds: f64,
    /// The DR side's last consistent point: its epoch and when production cut it (ms since
    /// the Unix epoch; 0 if unknown).
    pub consistent: Option<(Epoch, u64)>,
    pub peer_node: String,
    pub counters: ReportCounters,
    pub needs_resolve: bool,
    /// Production: the pair's own send limit.
    pub max_bytes_per_sec: Option<u64>,
    /// The generation the volume's data belongs to (rule 5).
    pub generation: Option<GenerationId>,
    pub verify: Option<VerifyStatus>,
    /// The production side's pair state (its machine's); `None` on the DR side.
    pub state: Option<PairState>,
    pub staged_epoch: Epoch,
    pub grouped: bool,
    pub current_epoch: Epoch,
    pub fence: FenceReport,
    /// Fenced for a reverse and drained up to this epoch.
    pub drained: Option<Epoch>,
    /// The group's commit the DR side applies up to.
    pub group_commit: Option<Epoch>,
    pub term: u64,
    /// How live writes reach the DR side; `None` on the DR side.
    pub live: Option<Live>,
    pub gated: bool,
    pub trip_wanted: bool,
    pub catching_up: bool,
    pub hold: Option<HoldSummary>,
}

/// What a side counted.
#[derive(Clone, Debug, Default)]
pub struct ReportCounters {
    pub bytes_sent: u64,
    pub extents_sent: u64,
    pub extents_rejected: u64,
    pub resync_bytes_sent: u64,
    pub resync_bytes_copied: u64,
    pub resync_rate: f64,
    pub journal_bytes: u64,
    pub journal_limit: u64,
    pub bytes_received: u64,
    pub journal_overflows: u64,
    /// Bytes of async writes a later write of the same epoch replaced before they were sent.
    pub coalesced_bytes: u64,
}

/// Whether the production side takes writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceReport {
    None,
    /// Restarted, waiting for the coordinator to confirm this side.
    Unconfirmed,
    Fenced(Fence),
}

pub(super) fn production_report(p: &ProductionPair) -> PairReport {
    let m = p.membership();
    let status = p.status();
    let counters = &p.link.counters;
    let (journal_bytes, journal_limit) = p.link.journal_fill();
    PairReport {
        pair: m.pair,
        volume: m.local_volume,
        volume_name: p.volume().name().to_owned(),
        side: Side::Production,
        model: m.model,
        status: status.replication_status,
        detail: status.detail,
        since: status.since,
        progress: status.progress,
        out_of_sync_bytes: p.link.tracker().dirty_bytes(),
        lag_seconds: p.lag_seconds(),
        consistent: status.consistent,
        peer_node: m.peer_node,
        counters: ReportCounters {
            bytes_sent: counters.bytes_sent.load(Ordering::Relaxed),
            extents_sent: counters.extents_sent.load(Ordering::Relaxed),
            extents_rejected: counters.extents_rejected.load(Ordering::Relaxed),
            resync_bytes_sent: counters.resync_bytes_sent.load(Ordering::Relaxed),
            resync_bytes_copied: counters.resync_bytes_copied.load(Ordering::Relaxed),
            resync_rate: status.resync_rate,
            journal_bytes,
            journal_limit,
            bytes_received: counters.bytes_received.load(Ordering::Relaxed),
            journal_overflows: counters.overflows.load(Ordering::Relaxed),
            coalesced_bytes: p.link.coalesced_bytes(),
        },
        needs_resolve: p.needs_resolve(),
        max_bytes_per_sec: p.max_bytes_per_sec(),
        generation: generation(p.volume()),
        verify: p.verify_status(),
        state: Some(p.link.state()),
        staged_epoch: p.staged_epoch(),
        grouped: p.link.grouped(),
        current_epoch: p.link.current_epoch(),
        fence: match (m.fence, p.confirmed()) {
            (Some(fence), _) => FenceReport::Fenced(fence),
            (None, false) => FenceReport::Unconfirmed,
            (None, true) => FenceReport::None,
        },
        drained: p.drained(),
        group_commit: None,
        term: m.term,
        live: Some(p.link.live()),
        gated: p.link.gated(),
        trip_wanted: p.link.trip_wanted(),
        catching_up: p.link.catching_up(),
        hold: Some(p.link.hold_summary()),
    }
}

pub(super) fn dr_report(d: &DrPair) -> PairReport {
    let m = d.membership();
    let status = d.status();
    let consistent = status.state.consistent;
    // Replicating, but not yet a consistent image: still copying.
    let replication_status = if consistent || status.replication_status != ReplicationStatus::Active
    {
        status.replication_status
    } else {
        ReplicationStatus::Copying
    };
    PairReport {
        pair: m.pair,
        volume: m.local_volume,
        volume_name: d.volume().name().to_owned(),
        side: Side::Dr,
        model: m.model,
        status: replication_status,
        detail: status.detail,
        since: status.since,
        progress: 0.0,
        out_of_sync_bytes: 0,
        lag_seconds: 0.0,
        consistent: consistent.then_some((status.state.applied, status.state.applied_cut_ms)),
        peer_node: m.peer_node.clone(),
        counters: ReportCounters {
            bytes_received: d.counters.bytes_written.load(Ordering::Relaxed),
            extents_rejected: d.counters.extents_rejected.load(Ordering::Relaxed),
            ..ReportCounters::default()
        },
        needs_resolve: d.needs_resolve(),
        max_bytes_per_sec: None,
        generation: generation(d.volume()),
        verify: None,
        state: None,
        staged_epoch: Epoch::ZERO,
        grouped: d.grouped(),
        current_epoch: Epoch::ZERO,
        fence: FenceReport::None,
        drained: None,
        group_commit: d.group_commit(),
        term: m.term,
        live: None,
        gated: false,
        trip_wanted: false,
        catching_up: false,
        hold: None,
    }
}

fn generation(volume: &Volume) -> Option<GenerationId> {
    volume.gate().lineage().map(|l| l.get().current.id)
}
