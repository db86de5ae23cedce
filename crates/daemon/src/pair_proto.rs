//! The one conversion between the pairs' domain types (`blockrep_replication::pairs`) and
//! the protocol's messages: a coordinator's `PairAssignment` into the `Membership` the
//! agent takes up, and a `PairReport` into the `PairState` the coordinator, the local API
//! and the metrics read.

use blockrep_api::ApiError;
use blockrep_api::proto;
use blockrep_core::replication::{Epoch, GenerationId};
use blockrep_replication::membership::{Membership, Side};
use blockrep_replication::pairs::{FenceReport, PairReport, Pairs};

/// The side a switch names.
pub fn side_of(name: &str) -> Result<Side, ApiError> {
    match name {
        "production" => Ok(Side::Production),
        "dr" => Ok(Side::Dr),
        other => Err(ApiError::InvalidArgument(format!(
            "pair assignment: side {other:?} is not production or dr"
        ))),
    }
}

/// The membership a coordinator's assignment gives this volume, on `side`; nothing
/// replicated yet.
pub fn membership_of(a: &proto::PairAssignment, side: Side) -> Result<Membership, ApiError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        ApiError::InvalidArgument(format!("pair assignment: {what}: {e}"))
    };
    Ok(Membership {
        pair: a.pair_id.parse().map_err(|e| bad("pair id", &e))?,
        side,
        model: a.replication_model.parse().map_err(|e| bad("model", &e))?,
        local_volume: a
            .local_volume_id
            .parse()
            .map_err(|e| bad("volume id", &e))?,
        peer_volume: a
            .peer_volume_id
            .parse()
            .map_err(|e| bad("peer volume id", &e))?,
        peer_node: a.peer_node.clone(),
        peer_address: a
            .peer_address
            .parse()
            .map_err(|e| bad("peer address", &e))?,
        size: a.size_bytes,
        full_sync_done: false,
        discard_peer: false,
        paused: false,
        grouped: false,
        group_epoch: Epoch::ZERO,
        catch_up_from: None,
        term: a.term,
        fence: None,
        promotion: None,
        max_bytes_per_sec: match a.max_bytes_per_sec {
            0 => None,
            rate => Some(
                blockrep_core::replication::check_send_limit(rate)
                    .map(|()| rate)
                    .map_err(|e| bad("the pair's send limit", &e))?,
            ),
        },
    })
}

/// A switch of side the coordinator orders: the membership to take, and the generation the
/// sides share from now on (none: the new production side begins one of its own).
pub fn switch_of(
    a: &proto::PairAssignment,
) -> Result<(Membership, Option<GenerationId>), ApiError> {
    let mut membership = membership_of(a, side_of(&a.side)?)?;
    membership.discard_peer = a.discard_peer;
    membership.grouped = a.grouped;
    let shared = (a.generation != 0).then_some(GenerationId(a.generation));
    Ok((membership, shared))
}

/// Every pair's state, as the protocol says it.
pub fn pair_states(pairs: &Pairs) -> Vec<proto::PairState> {
    pairs.reports().into_iter().map(pair_state).collect()
}

pub fn pair_state(r: PairReport) -> proto::PairState {
    let c = &r.counters;
    let (consistent_epoch, consistent_at) = match r.consistent {
        Some((epoch, cut_ms)) => (epoch.0, cut_text(cut_ms)),
        None => (0, String::new()),
    };
    proto::PairState {
        pair_id: r.pair.to_string(),
        volume_id: r.volume.to_string(),
        volume_name: r.volume_name,
        side: r.side.as_str().into(),
        replication_model: r.model.to_string(),
        replication_status: r.status.to_string(),
        status_detail: r.detail,
        status_since: humantime::format_rfc3339_seconds(r.since).to_string(),
        progress: r.progress,
        out_of_sync_bytes: r.out_of_sync_bytes,
        lag_seconds: r.lag_seconds,
        consistent_epoch,
        consistent_at,
        peer_node: r.peer_node,
        counters: Some(proto::PairCounters {
            bytes_sent: c.bytes_sent,
            extents_sent: c.extents_sent,
            extents_rejected: c.extents_rejected,
            resync_bytes_sent: c.resync_bytes_sent,
            resync_bytes_copied: c.resync_bytes_copied,
            resync_rate: c.resync_rate,
            journal_bytes: c.journal_bytes,
            journal_limit: c.journal_limit,
            bytes_received: c.bytes_received,
            journal_overflows: c.journal_overflows,
            coalesced_bytes: c.coalesced_bytes,
        }),
        needs_resolve: r.needs_resolve,
        max_bytes_per_sec: r.max_bytes_per_sec.unwrap_or(0),
        generation: r.generation.map(|g| g.to_string()).unwrap_or_default(),
        verify: r.verify.map(|v| proto::VerifyState {
            job_id: v.job_id,
            progress: v.progress,
            done: v.done,
            error: v.error,
            differing: v
                .differing
                .iter()
                .map(|r| proto::Extent {
                    offset: r.offset,
                    length: r.len,
                })
                .collect(),
            differing_bytes: v.differing_bytes,
            repairing: v.repairing,
            verified_bytes: v.verified_bytes,
            unverified_bytes: v.unverified_bytes,
            repaired: v.repaired,
        }),
        staged_epoch: r.staged_epoch.0,
        grouped: r.grouped,
        current_epoch: r.current_epoch.0,
        fence: match r.fence {
            FenceReport::Fenced(fence) => fence.as_str().into(),
            FenceReport::Unconfirmed => "unconfirmed".into(),
            FenceReport::None => String::new(),
        },
        drained: r.drained.is_some(),
        drained_epoch: r.drained.map_or(0, |e| e.0),
        group_commit: r.group_commit.map_or(0, |e| e.0),
        term: r.term,
        live: r.live.map(|l| l.as_str().into()).unwrap_or_default(),
        gated: r.gated,
        trip_wanted: r.trip_wanted,
        catching_up: r.catching_up,
        state: r.state.map(|s| s.as_str().into()).unwrap_or_default(),
        hold: r.hold.map(|h| proto::HoldTimes {
            p50_us: h.p50_us,
            p99_us: h.p99_us,
            held: h.held,
        }),
    }
}

/// When an epoch was cut, to the millisecond (epochs are often shorter than a second).
fn cut_text(cut_ms: u64) -> String {
    if cut_ms == 0 {
        return String::new();
    }
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(cut_ms),
    )
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment() -> proto::PairAssignment {
        proto::PairAssignment {
            pair_id: "5f0c6c1e-8a3b-4f57-9a41-2f6f4d6a7b10".into(),
            replication_model: "hypermetro".into(),
            local_volume_id: "0b7e1b52-3f0a-4a57-8e0c-6c2c1f9b2d11".into(),
            peer_volume_id: "7a9d2e44-1c6b-4d3f-b1e2-9f8a7c6d5e12".into(),
            peer_node: "dr-1".into(),
            peer_address: "127.0.0.1:7001".into(),
            size_bytes: 1 << 30,
            term: 7,
            side: "dr".into(),
            discard_peer: true,
            grouped: true,
            generation: 0x2a,
            max_bytes_per_sec: 8 << 20,
        }
    }

    #[test]
    fn a_switch_takes_the_side_term_and_shared_generation_it_names() {
        let (m, shared) = switch_of(&assignment()).unwrap();
        assert_eq!(m.side, Side::Dr);
        assert_eq!((m.term, m.discard_peer, m.grouped), (7, true, true));
        assert_eq!(m.peer_address.to_string(), "127.0.0.1:7001");
        assert_eq!(shared, Some(GenerationId(0x2a)));
        assert_eq!(
            m.max_bytes_per_sec,
            Some(8 << 20),
            "the pair's send limit goes along"
        );
        for rate in [1, 5 << 40] {
            let mut hostile = assignment();
            hostile.max_bytes_per_sec = rate;
            let error = switch_of(&hostile).unwrap_err().to_string();
            assert!(error.contains("send limit"), "{rate}: {error}");
        }

        let mut own = assignment();
        own.generation = 0;
        assert_eq!(switch_of(&own).unwrap().1, None);
    }

    #[test]
    fn a_malformed_assignment_is_refused_naming_the_field() {
        let mut a = assignment();
        a.peer_address = "dr-1".into();
        let err = membership_of(&a, Side::Production).unwrap_err();
        assert!(err.to_string().contains("peer address"), "{err}");
        let mut a = assignment();
        a.side = "sideways".into();
        let err = switch_of(&a).unwrap_err();
        assert!(err.to_string().contains("not production or dr"), "{err}");
    }
}
