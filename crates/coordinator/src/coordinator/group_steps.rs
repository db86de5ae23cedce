//! A group operation as a planner: from its plan and its pairs' records, the agent call each
//! pair takes next; from an answer, the plan as it is after it (or a further call the
//! answer asks for); once every pair's part is done, the changes that end it. No I/O and no
//! clock: `operations` makes the calls (a failover's promotions in parallel, the other
//! operations pair by pair), stores the plan after each answer that moved it (a coordinator
//! killed in the middle carries on from it), and stores what these functions return.
//!
//! ```text
//!  failover   Fence(demoted) to every production side (answers not waited for)
//!             Promote ─► PromotedAt            per pair, in parallel   ─► sides swapped
//!  reverse    Fence(draining) until every production side drained and its DR side applied
//!             SwitchSide(old production → DR) ─► SwitchSide(old DR → production)
//!                                                per pair               ─► sides swapped
//!  reprotect  DirtyRuns (old production) ─► MarkDirty (new production) ─► SwitchSide(old
//!             production → DR)                   per pair               ─► available
//!  extend     Extend (DR volume) ─► Extend (production volume)         ─► the pair's size
//! ```
//!
//! Also the groups' sync and stop: which production agents to tell to pause or resume
//! a pair ([`pauses_due`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use blockrep_api::ApiError;
use blockrep_api::proto::{self, cluster_request::Request, cluster_response::Response};
use blockrep_core::replication::{
    Epoch, GenerationId, GroupStatus, PairId, PairStatus, ReplicationModel, ReplicationStatus,
};

use super::pair_steps::{Side, assignment};
use super::{NODE_TIMEOUT, State};
use crate::records::{
    FailoverPlan, GroupOperation, GroupRecord, PairRecord, PromotedAt, ReversePlan, ReverseStep,
};
use crate::store::Change;

/// One agent call of a group operation, for one pair.
#[derive(Debug, PartialEq)]
pub(super) struct GroupCall {
    pub pair: PairId,
    pub node: String,
    pub request: Request,
    pub expects: Expect,
}

/// What an answer to a call is, and what it marks done in the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Expect {
    /// A fence (a failover's or a reverse's): its answer is not read, and nothing is marked.
    Fenced,
    /// A failover's promotion: where the DR volume was left.
    Promoted,
    /// A reverse: the old production side is the DR side.
    OldProductionSwitched,
    /// A reverse: the old DR side is production.
    OldDrSwitched,
    /// A reprotect: the old production side's dirty runs, to be marked on `production_node`.
    DirtyRuns { production_node: String },
    /// A reprotect: the dirty runs (`bytes` of them) are marked on the new production side.
    DirtyMarked { bytes: u64 },
    /// A reprotect: the old production side is the DR side.
    SwitchedToDr,
    /// An extend: the DR volume grew.
    DrGrown,
    /// An extend: the production volume grew.
    ProductionGrown,
}

/// The call `pair` takes next in `operation`, or `None` if its part is done (or waits on
/// something else: a reverse's drain, see [`drain`]). `peer_address` gives a node's
/// endpoint, for the assignments of a switch of sides.
pub(super) fn next_call(
    operation: &GroupOperation,
    pair: &PairRecord,
    peer_address: &dyn Fn(&str) -> SocketAddr,
) -> Option<Result<GroupCall, ApiError>> {
    let call = |node: &str, request, expects| {
        Some(Ok(GroupCall {
            pair: pair.id,
            node: node.to_owned(),
            request,
            expects,
        }))
    };
    match operation {
        GroupOperation::Failover(plan) => {
            let step = plan.pairs.get(&pair.id).filter(|s| s.done.is_none())?;
            let promote = Request::Promote(proto::Promote {
                pair_id: pair.id.to_string(),
                volume_id: pair.dr_volume.to_string(),
                commit: plan.commit.map_or(0, |e| e.0),
                has_commit: plan.commit.is_some(),
                generation: step.generation.0,
                term: plan.term,
                point: plan.point.map_or(0, |e| e.0),
                has_point: plan.point.is_some(),
            });
            call(&pair.dr_node, promote, Expect::Promoted)
        }
        GroupOperation::Reverse(plan) => {
            if plan.step != ReverseStep::Swapping {
                return None;
            }
            let step = plan.pairs.get(&pair.id)?;
            // The assignments are as the record will be once both sides switched.
            let mut flipped = pair.clone();
            swap_sides(&mut flipped);
            let switch = |side| {
                Request::SwitchSide(switch_assignment(
                    &flipped,
                    side,
                    step.generation,
                    plan.term,
                    peer_address,
                ))
            };
            if !step.old_production_switched {
                return call(
                    &pair.production_node,
                    switch(Side::Dr),
                    Expect::OldProductionSwitched,
                );
            }
            if !step.old_dr_switched {
                return call(
                    &pair.dr_node,
                    switch(Side::Production),
                    Expect::OldDrSwitched,
                );
            }
            None
        }
        GroupOperation::Reprotect(plan) => {
            let step = plan.pairs.get(&pair.id).filter(|s| !s.switched)?;
            // The record's DR side is the old production side since the failover.
            if step.handed_over.is_none() {
                let command = proto::PairCommand {
                    pair_id: pair.id.to_string(),
                    ..Default::default()
                };
                return call(
                    &pair.dr_node,
                    Request::DirtyRuns(command),
                    Expect::DirtyRuns {
                        production_node: pair.production_node.clone(),
                    },
                );
            }
            let Some(generation) = pair.generation else {
                return Some(Err(ApiError::Internal(format!(
                    "pair {} has no generation recorded from its failover",
                    pair.name
                ))));
            };
            let to_dr = switch_assignment(pair, Side::Dr, generation, plan.term, peer_address);
            call(
                &pair.dr_node,
                Request::SwitchSide(to_dr),
                Expect::SwitchedToDr,
            )
        }
        GroupOperation::Extend(plan) => {
            if plan.pair != pair.id {
                return None;
            }
            let extend = |volume: blockrep_core::VolumeId| {
                Request::Extend(proto::Extend {
                    pair_id: pair.id.to_string(),
                    volume_id: volume.to_string(),
                    size_bytes: plan.size,
                })
            };
            // The DR volume first: a production write past its end would fail there.
            if !plan.dr_done {
                return call(&pair.dr_node, extend(pair.dr_volume), Expect::DrGrown);
            }
            if !plan.production_done {
                return call(
                    &pair.production_node,
                    extend(pair.production_volume),
                    Expect::ProductionGrown,
                );
            }
            None
        }
    }
}

/// Marks in `operation` what `answer` (to a call of `pair` that `expects` it) did; returns
/// the call the answer asks for next, if any. An answer of another kind is an error and
/// marks nothing.
pub(super) fn answered(
    operation: &mut GroupOperation,
    pair: PairId,
    expects: Expect,
    answer: Response,
) -> Result<Option<GroupCall>, ApiError> {
    let unexpected = || Err(ApiError::Internal(format!("unexpected answer: {answer:?}")));
    match (&expects, &answer, operation) {
        (Expect::Promoted, Response::Promoted(p), GroupOperation::Failover(plan)) => {
            if let Some(step) = plan.pairs.get_mut(&pair) {
                step.done = Some(PromotedAt {
                    epoch: Epoch(p.epoch),
                    cut_ms: p.cut_ms,
                    dropped_bytes: p.dropped_bytes,
                    rolled_back_bytes: p.rolled_back_bytes,
                });
            }
        }
        (Expect::DirtyRuns { production_node }, Response::Dirty(d), _) => {
            let bytes = d.runs.iter().map(|r| r.length).sum();
            return Ok(Some(GroupCall {
                pair,
                node: production_node.clone(),
                request: Request::MarkDirty(proto::MarkDirty {
                    pair_id: pair.to_string(),
                    runs: d.runs.clone(),
                }),
                expects: Expect::DirtyMarked { bytes },
            }));
        }
        (_, Response::Done(_), operation) => match (expects, operation) {
            (Expect::OldProductionSwitched, GroupOperation::Reverse(plan)) => {
                if let Some(step) = plan.pairs.get_mut(&pair) {
                    step.old_production_switched = true;
                }
            }
            (Expect::OldDrSwitched, GroupOperation::Reverse(plan)) => {
                if let Some(step) = plan.pairs.get_mut(&pair) {
                    step.old_dr_switched = true;
                }
            }
            (Expect::DirtyMarked { bytes }, GroupOperation::Reprotect(plan)) => {
                if let Some(step) = plan.pairs.get_mut(&pair) {
                    step.handed_over = Some(bytes);
                }
            }
            (Expect::SwitchedToDr, GroupOperation::Reprotect(plan)) => {
                if let Some(step) = plan.pairs.get_mut(&pair) {
                    step.switched = true;
                }
            }
            (Expect::DrGrown, GroupOperation::Extend(plan)) => plan.dr_done = true,
            (Expect::ProductionGrown, GroupOperation::Extend(plan)) => {
                plan.production_done = true;
            }
            _ => return unexpected(),
        },
        _ => return unexpected(),
    }
    Ok(None)
}

/// Every pair's part of `operation` is done: what ends it can be stored.
pub(super) fn all_done(operation: &GroupOperation) -> bool {
    match operation {
        GroupOperation::Failover(plan) => plan.pairs.values().all(|s| s.done.is_some()),
        GroupOperation::Reverse(plan) => {
            plan.step == ReverseStep::Swapping
                && plan
                    .pairs
                    .values()
                    .all(|s| s.old_production_switched && s.old_dr_switched)
        }
        GroupOperation::Reprotect(plan) => plan.pairs.values().all(|s| s.switched),
        GroupOperation::Extend(plan) => plan.dr_done && plan.production_done,
    }
}

/// The changes that end `operation`, done on every pair, onto the records as `state`
/// holds them now: a failover's and a reverse's sides swapped, the group available (a
/// reverse, a reprotect: its job ends once every pair is active, see `groups`) or
/// failovered with its job ended, an extend's size recorded. `now_ms` and `now` are the
/// wall clock (the failover's result, the records' timestamps).
pub(super) fn finished(
    operation: &GroupOperation,
    group: &GroupRecord,
    state: &State,
    now_ms: u64,
    now: &str,
) -> Vec<Change> {
    match operation {
        GroupOperation::Failover(plan) => failover_finished(plan, group, state, now_ms, now),
        GroupOperation::Reverse(plan) => {
            let generations = plan.pairs.iter().map(|(id, s)| (*id, s.generation));
            role_changed(group, state, plan.term, generations.collect(), true, now)
        }
        GroupOperation::Reprotect(plan) => {
            role_changed(group, state, plan.term, BTreeMap::new(), false, now)
        }
        GroupOperation::Extend(plan) => {
            let mut changes = Vec::new();
            // Onto the record as it is now: a job may have begun on the pair meanwhile.
            if let Some(mut record) = state.pairs.get(&plan.pair).cloned() {
                record.size = plan.size;
                record.updated_at = Some(now.to_owned());
                changes.push(Change::PutPair(record));
            }
            let current = state.groups.get(&group.id).unwrap_or(group);
            changes.extend(ended(current, state, GroupStatus::Available, Ok(()), now));
            changes
        }
    }
}

/// The changes that end `group`'s operation with `outcome`, leaving the group in `status`:
/// its job ended; a failed operation keeps its plan for a retry, except a reverse that
/// gave up before swapping anything (it starts afresh next time).
pub(super) fn ended(
    group: &GroupRecord,
    state: &State,
    status: GroupStatus,
    outcome: Result<(), String>,
    now: &str,
) -> Vec<Change> {
    let mut updated = group.clone();
    updated.status = status;
    updated.failure_detail = outcome.as_ref().err().cloned();
    let drain_given_up = matches!(
        updated.operation,
        Some(GroupOperation::Reverse(ReversePlan {
            step: ReverseStep::Draining,
            ..
        }))
    );
    if outcome.is_ok() || drain_given_up {
        updated.operation = None;
    }
    updated.updated_at = Some(now.to_owned());
    let mut changes = vec![];
    if let Some(mut job) = updated.job.and_then(|j| state.jobs.get(&j)).cloned() {
        job.end_at(outcome, now);
        changes.push(Change::PutJob(job));
    }
    changes.push(Change::PutGroup(updated));
    changes
}

/// A refusal no retry changes: the operation fails at once rather than after the give-up.
pub(super) fn is_final(error: &ApiError) -> bool {
    matches!(
        error,
        ApiError::FailedPrecondition(_) | ApiError::InvalidArgument(_) | ApiError::NotFound(_)
    )
}

/// A failover's fences: every production side refuses writes from the plan's term on. Sent
/// once and not waited for (the DR side does not need them); a production agent that is
/// down is demoted when it comes back (its report is answered with its new side).
pub(super) fn failover_fences(plan: &FailoverPlan, members: &[PairRecord]) -> Vec<GroupCall> {
    members
        .iter()
        .map(|p| fence(p, "demoted", plan.term))
        .collect()
}

/// Where a reverse's drain stands.
#[derive(Debug)]
pub(super) struct Drain {
    /// The production sides that did not report the fence: told (again).
    pub fence: Vec<GroupCall>,
    /// Why the swap cannot begin yet, per pair still waited for; empty once every DR side
    /// holds every write admitted before its fence.
    pub waiting: Vec<String>,
}

/// Where `plan`'s drain stands, from what each side of `members` last reported (`state`).
/// A report sent before the fence went up cannot say drained: the fence's term is checked.
pub(super) fn drain(plan: &ReversePlan, members: &[PairRecord], state: &State) -> Drain {
    let mut drain = Drain {
        fence: Vec::new(),
        waiting: Vec::new(),
    };
    for p in members {
        let production = report_on(state, &p.production_node, p.id)
            .filter(|s| s.fence == "draining" && s.term >= plan.term);
        let Some(production) = production else {
            drain.fence.push(fence(p, "draining", plan.term));
            drain.waiting.push(format!(
                "pair {}: the production side is not fenced",
                p.name
            ));
            continue;
        };
        if !production.drained {
            drain.waiting.push(format!(
                "pair {}: the production side has not drained (live {:?}, catching up {}, epoch {}, staged {})",
                p.name,
                production.live,
                production.catching_up,
                production.current_epoch,
                production.staged_epoch
            ));
            continue;
        }
        let applied = report_on(state, &p.dr_node, p.id).map_or(0, |d| d.consistent_epoch);
        if p.model == ReplicationModel::Async && applied < production.drained_epoch {
            drain.waiting.push(format!(
                "pair {}: the DR side applied epoch {applied} of {}",
                p.name, production.drained_epoch
            ));
        }
    }
    drain
}

/// The fences a reverse that gave up takes down: production takes writes again.
pub(super) fn unfences(plan: &ReversePlan, members: &[PairRecord]) -> Vec<GroupCall> {
    members.iter().map(|p| fence(p, "", plan.term)).collect()
}

fn fence(pair: &PairRecord, fence: &str, term: u64) -> GroupCall {
    GroupCall {
        pair: pair.id,
        node: pair.production_node.clone(),
        request: Request::Fence(proto::FenceCommand {
            pair_id: pair.id.to_string(),
            fence: fence.into(),
            term,
        }),
        expects: Expect::Fenced,
    }
}

/// A production agent told to stop (`pause`) or sync a pair of a group.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Pause {
    pub pair: PairId,
    pub node: String,
    pub address: SocketAddr,
    pub pause: bool,
}

/// The pairs of groups with no operation under way whose production agent (alive at `now`)
/// reports them replicating while their group is stopped, or stopped while it syncs, and
/// that were not told for `resend` (`State::group_step_sent`).
pub(super) fn pauses_due(state: &State, now: Instant, resend: Duration) -> Vec<Pause> {
    let mut due = Vec::new();
    let started = state
        .pairs
        .values()
        .filter(|p| p.status == PairStatus::Available && p.production_started);
    for pair in started {
        let group = pair.group.and_then(|g| state.groups.get(&g));
        if group.is_some_and(|g| g.operation.is_some()) {
            // The operation decides.
            continue;
        }
        let want_paused = group.is_some_and(|g| g.stopped);
        let Some(node) = state.nodes.get(&pair.production_node) else {
            continue;
        };
        let alive = node
            .last_seen
            .is_some_and(|seen| now.saturating_duration_since(seen) < NODE_TIMEOUT);
        let Some(report) = report_on(state, &pair.production_node, pair.id) else {
            continue;
        };
        let paused = report.replication_status == ReplicationStatus::ActiveStopped.as_str();
        let told_lately = state
            .group_step_sent
            .get(&pair.id)
            .is_some_and(|sent| now.saturating_duration_since(*sent) < resend);
        if alive && paused != want_paused && !told_lately {
            due.push(Pause {
                pair: pair.id,
                node: pair.production_node.clone(),
                address: node.record.address,
                pause: want_paused,
            });
        }
    }
    due
}

/// What `node` last reported of `pair`.
pub(super) fn report_on<'a>(
    state: &'a State,
    node: &str,
    pair: PairId,
) -> Option<&'a proto::PairState> {
    state.nodes.get(node).and_then(|n| {
        n.report
            .pairs
            .iter()
            .find(|s| s.pair_id == pair.to_string())
    })
}

/// What `node` last reported of one of its volumes.
pub(super) fn volume_on<'a>(
    state: &'a State,
    node: &str,
    volume: &blockrep_core::VolumeId,
) -> Option<&'a proto::Volume> {
    state
        .nodes
        .get(node)
        .and_then(|n| n.report.volumes.iter().find(|v| v.id == volume.to_string()))
}

/// The pair after its sides swap (a failover or a reverse).
pub(super) fn swap_sides(pair: &mut PairRecord) {
    std::mem::swap(&mut pair.production_volume, &mut pair.dr_volume);
    std::mem::swap(&mut pair.production_node, &mut pair.dr_node);
}

/// What a switch of sides tells the agent of `side` in `pair` (as the record will be once
/// the switch is done).
fn switch_assignment(
    pair: &PairRecord,
    side: Side,
    generation: GenerationId,
    term: u64,
    peer_address: &dyn Fn(&str) -> SocketAddr,
) -> proto::PairAssignment {
    let peer = match side {
        Side::Production => &pair.dr_node,
        Side::Dr => &pair.production_node,
    };
    proto::PairAssignment {
        generation: generation.0,
        term,
        grouped: pair.group.is_some(),
        ..assignment(pair, side, peer_address(peer))
    }
}

/// The availability zone of `node`, if it registered.
fn zone_of(state: &State, node: &str) -> Option<String> {
    state
        .nodes
        .get(node)
        .map(|n| n.record.availability_zone.clone())
}

/// Every DR side is production: the records follow, and the job says what was reached.
fn failover_finished(
    plan: &FailoverPlan,
    group: &GroupRecord,
    state: &State,
    now_ms: u64,
    now: &str,
) -> Vec<Change> {
    let pairs = plan.pairs.iter().map(|(id, s)| (*id, Some(s.generation)));
    let ended = Sides {
        swap: true,
        term: plan.term,
        status: GroupStatus::Failovered,
        stopped: true,
    };
    let (mut changes, mut updated) = sides_changed(group, state, pairs.collect(), ended, now);
    let reached: Vec<PromotedAt> = plan.pairs.values().filter_map(|s| s.done).collect();
    // The point reached, group-wide: the oldest of the pairs'.
    updated.failed_over_at = reached.iter().copied().min_by_key(|r| (r.epoch, r.cut_ms));
    let result = failover_result(plan, &reached, group.model, now_ms);
    if let Some(mut job) = updated.job.and_then(|j| state.jobs.get(&j)).cloned() {
        job.result = Some(result);
        job.end_at(Ok(()), now);
        changes.push(Change::PutJob(job));
    }
    changes.push(Change::PutGroup(updated));
    changes
}

/// The roles changed on every agent (a reverse, a reprotect): the records follow (swapped
/// for a reverse, with the generations both sides share), the group is available and
/// replicates.
fn role_changed(
    group: &GroupRecord,
    state: &State,
    term: u64,
    generations: BTreeMap<PairId, GenerationId>,
    swap: bool,
    now: &str,
) -> Vec<Change> {
    let pairs = group
        .pairs
        .iter()
        .map(|id| (*id, generations.get(id).copied()));
    let ended = Sides {
        swap,
        term,
        status: GroupStatus::Available,
        stopped: false,
    };
    let (mut changes, updated) = sides_changed(group, state, pairs.collect(), ended, now);
    changes.push(Change::PutGroup(updated));
    changes
}

/// How an operation that changed the pairs' roles leaves the records.
struct Sides {
    /// Production and DR swap in the records (a failover, a reverse).
    swap: bool,
    term: u64,
    status: GroupStatus,
    stopped: bool,
}

/// Each of `pairs` as `ended` leaves it (with its new generation, if any), the priority
/// station where production now is, onto the records as `state` holds them; and the group
/// record to store, its operation over.
fn sides_changed(
    group: &GroupRecord,
    state: &State,
    pairs: Vec<(PairId, Option<GenerationId>)>,
    ended: Sides,
    now: &str,
) -> (Vec<Change>, GroupRecord) {
    let mut changes = Vec::new();
    let mut station = group.priority_station.clone();
    for (id, generation) in pairs {
        let Some(mut pair) = state.pairs.get(&id).cloned() else {
            continue;
        };
        if ended.swap {
            swap_sides(&mut pair);
        }
        if let Some(zone) = zone_of(state, &pair.production_node) {
            station = zone;
        }
        pair.priority_station = station.clone();
        pair.term = ended.term;
        if let Some(g) = generation {
            pair.generation = Some(g);
        }
        pair.updated_at = Some(now.to_owned());
        changes.push(Change::PutPair(pair));
    }
    let mut updated = state.groups.get(&group.id).unwrap_or(group).clone();
    updated.status = ended.status;
    updated.failure_detail = None;
    updated.priority_station = station;
    updated.stopped = ended.stopped;
    updated.term = ended.term;
    updated.operation = None;
    updated.updated_at = Some(now.to_owned());
    if ended.swap {
        // The DR volumes the drills read are production now: their agents ended them.
        updated.drills.clear();
    }
    (changes, updated)
}

/// What a failover reached, in words: the consistent point and the writes it could not
/// keep.
fn failover_result(
    plan: &FailoverPlan,
    reached: &[PromotedAt],
    model: ReplicationModel,
    now_ms: u64,
) -> String {
    let dropped: u64 = reached.iter().map(|r| r.dropped_bytes).sum();
    let took_ms = now_ms.saturating_sub(plan.asked_ms);
    if let Some(point) = plan.point {
        let rolled: u64 = reached.iter().map(|r| r.rolled_back_bytes).sum();
        let at = reached
            .iter()
            .map(|r| r.cut_ms)
            .find(|c| *c > 0)
            .map_or_else(String::new, |c| {
                format!(
                    " (cut at {})",
                    humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(c)
                    )
                )
            });
        return format!(
            "rolled back to point: epoch {}{at} on every pair; {} written back from the undo and {} staged beyond the commit dropped (all marked dirty for reprotect); took {took_ms} ms",
            point.0,
            blockrep_api::human_bytes(rolled),
            blockrep_api::human_bytes(dropped)
        );
    }
    match (model, plan.commit) {
        (ReplicationModel::Async, Some(commit)) => {
            let cut_ms = reached.iter().map(|r| r.cut_ms).filter(|c| *c > 0).min();
            let seconds = |ms: u64| format!("{:.1} s", ms as f64 / 1000.0);
            let window = cut_ms.map_or_else(
                || "unknown before the failover call".to_owned(),
                |c| {
                    let heard = plan
                        .production_heard_ms
                        .filter(|&h| h >= c && h <= plan.asked_ms)
                        .map_or_else(String::new, |h| {
                            format!(
                                "; the production hosts were last heard from {} after the cut",
                                seconds(h - c)
                            )
                        });
                    format!(
                        "{} before the failover call{heard}",
                        seconds(plan.asked_ms.saturating_sub(c))
                    )
                },
            );
            let at = cut_ms.map_or_else(String::new, |c| {
                format!(
                    " (cut at {})",
                    humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(c)
                    )
                )
            });
            format!(
                "consistent point: epoch {}{at} on every pair; write window lost: {window}; {} staged beyond it dropped (marked dirty for reprotect); took {took_ms} ms",
                commit.0,
                blockrep_api::human_bytes(dropped)
            )
        }
        _ => format!(
            "consistent point: every write answered while the group replicated synchronously (hypermetro; if it tripped, up to the trip); {} staged beyond it dropped (marked dirty for reprotect); took {took_ms} ms",
            blockrep_api::human_bytes(dropped)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::testing::*;
    use crate::records::{ExtendPlan, ReprotectPlan, ReprotectStep, SwapStep};
    use blockrep_api::proto::cluster_response::Response;

    fn nowhere(_: &str) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 9], 7000))
    }

    fn done() -> Response {
        Response::Done(proto::Done::default())
    }

    /// Takes `pair`'s next call, checks where it goes and what it asks, and answers it.
    fn step(
        operation: &mut GroupOperation,
        pair: &PairRecord,
        node: &str,
        kind: &str,
        answer: Response,
    ) -> Option<GroupCall> {
        let call = next_call(operation, pair, &nowhere)
            .expect("a call")
            .unwrap();
        assert_eq!(
            (call.node.as_str(), kind_of(&call.request).as_str()),
            (node, kind)
        );
        answered(operation, call.pair, call.expects, answer).unwrap()
    }

    #[test]
    fn a_reprotect_hands_the_dirty_blocks_over_before_the_old_production_side_switches() {
        // After the failover the record's production side is n2, the old production n1.
        let mut pair = pair_record("a", ("n2", 2), ("n1", 1));
        pair.generation = Some(GenerationId(9));
        let mut operation = GroupOperation::Reprotect(ReprotectPlan {
            term: 3,
            pairs: [(pair.id, ReprotectStep::default())].into(),
        });
        let runs = vec![proto::Extent {
            offset: 0,
            length: 8192,
        }];
        let dirty = Response::Dirty(proto::DirtyRuns { runs: runs.clone() });
        let mark = step(&mut operation, &pair, "n1", "DirtyRuns", dirty).expect("then mark");
        assert_eq!(mark.node, "n2");
        let Request::MarkDirty(m) = &mark.request else {
            panic!("{mark:?}")
        };
        assert_eq!(m.runs, runs);
        assert!(!all_done(&operation));
        assert_eq!(
            answered(&mut operation, mark.pair, mark.expects, done()).unwrap(),
            None
        );
        let GroupOperation::Reprotect(plan) = &operation else {
            unreachable!()
        };
        assert_eq!(plan.pairs[&pair.id].handed_over, Some(8192));

        let call = next_call(&operation, &pair, &nowhere).unwrap().unwrap();
        let Request::SwitchSide(to_dr) = &call.request else {
            panic!("{call:?}")
        };
        assert_eq!(call.node, "n1");
        assert_eq!(
            (to_dr.side.as_str(), to_dr.generation, to_dr.term),
            ("dr", 9, 3)
        );
        answered(&mut operation, call.pair, call.expects, done()).unwrap();
        assert!(next_call(&operation, &pair, &nowhere).is_none());
        assert!(all_done(&operation));
    }

    #[test]
    fn a_reprotect_without_the_failovers_generation_is_refused_before_the_switch() {
        let pair = pair_record("a", ("n2", 2), ("n1", 1));
        let operation = GroupOperation::Reprotect(ReprotectPlan {
            term: 3,
            pairs: [(
                pair.id,
                ReprotectStep {
                    handed_over: Some(0),
                    switched: false,
                },
            )]
            .into(),
        });
        let refused = next_call(&operation, &pair, &nowhere).unwrap().unwrap_err();
        assert!(refused.to_string().contains("no generation"), "{refused}");
    }

    #[test]
    fn a_reverse_switches_nothing_while_draining_then_the_old_production_side_first() {
        let pair = pair_record("a", ("n1", 1), ("n2", 2));
        let mut plan = ReversePlan {
            term: 2,
            step: ReverseStep::Draining,
            draining_since_ms: 0,
            pairs: [(
                pair.id,
                SwapStep {
                    generation: GenerationId(5),
                    old_production_switched: false,
                    old_dr_switched: false,
                },
            )]
            .into(),
        };
        assert!(next_call(&GroupOperation::Reverse(plan.clone()), &pair, &nowhere).is_none());
        plan.step = ReverseStep::Swapping;
        let mut operation = GroupOperation::Reverse(plan);
        assert_eq!(
            step(&mut operation, &pair, "n1", "SwitchSide", done()),
            None
        );
        assert!(!all_done(&operation));
        assert_eq!(
            step(&mut operation, &pair, "n2", "SwitchSide", done()),
            None
        );
        assert!(all_done(&operation));
    }

    #[test]
    fn an_extend_grows_the_dr_volume_before_production() {
        let pair = pair_record("a", ("n1", 1), ("n2", 2));
        let other = pair_record("b", ("n3", 3), ("n4", 4));
        let mut operation = GroupOperation::Extend(ExtendPlan {
            pair: pair.id,
            size: 2 * SIZE,
            dr_done: false,
            production_done: false,
        });
        assert!(next_call(&operation, &other, &nowhere).is_none());
        step(&mut operation, &pair, "n2", "Extend", done());
        step(&mut operation, &pair, "n1", "Extend", done());
        assert!(next_call(&operation, &pair, &nowhere).is_none());
        assert!(all_done(&operation));
    }

    /// The window a failover lost is told against the failover call and against when the
    /// production hosts were last heard from: the call comes after their loss was noticed
    /// (seconds later), so the first alone overstates what the group trailed by.
    #[test]
    fn a_failovers_result_says_when_the_production_hosts_were_last_heard_from() {
        let plan = FailoverPlan {
            point: None,
            commit: Some(Epoch(4)),
            term: 1,
            asked_ms: 20_000,
            production_heard_ms: Some(15_700),
            pairs: BTreeMap::new(),
        };
        let reached = [PromotedAt {
            epoch: Epoch(4),
            cut_ms: 14_500,
            dropped_bytes: 0,
            rolled_back_bytes: 0,
        }];
        let result = failover_result(&plan, &reached, ReplicationModel::Async, 20_400);
        assert!(
            result.contains(
                "write window lost: 5.5 s before the failover call; the production hosts were last heard from 1.2 s after the cut"
            ),
            "{result}"
        );
    }

    #[test]
    fn an_answer_of_another_kind_marks_nothing() {
        let pair = pair_record("a", ("n1", 1), ("n2", 2));
        let mut operation = GroupOperation::Failover(FailoverPlan {
            point: None,
            commit: Some(Epoch(4)),
            term: 1,
            asked_ms: 0,
            production_heard_ms: None,
            pairs: [(
                pair.id,
                crate::records::PromoteStep {
                    generation: GenerationId(1),
                    done: None,
                },
            )]
            .into(),
        });
        let before = operation.clone();
        let call = next_call(&operation, &pair, &nowhere).unwrap().unwrap();
        assert!(answered(&mut operation, call.pair, call.expects, done()).is_err());
        assert_eq!(operation, before);
    }

    #[test]
    fn a_drain_fences_what_is_not_fenced_and_waits_for_the_dr_side_to_apply() {
        let (h, _, a, b) = seeded_group_of_two();
        let plan = ReversePlan {
            term: 1,
            step: ReverseStep::Draining,
            draining_since_ms: 0,
            pairs: BTreeMap::new(),
        };
        let members = [a.clone(), b.clone()];
        let report = |p: &PairRecord, fence: &str, drained: bool| {
            let mut s = pair_state(
                p,
                "production",
                blockrep_core::replication::ReplicationStatus::Active,
            );
            (s.fence, s.term, s.drained, s.drained_epoch) = (fence.into(), 1, drained, 6);
            h.report(&p.production_node, "az1", vec![], vec![s]);
        };
        report(&a, "", false);
        report(&b, "draining", false);
        let seen = drain(&plan, &members, &h.coordinator.lock());
        let fenced: Vec<_> = seen.fence.iter().map(|c| c.node.as_str()).collect();
        assert_eq!(fenced, ["n1"]);
        assert_eq!(seen.waiting.len(), 2, "{:?}", seen.waiting);

        report(&a, "draining", true);
        report(&b, "draining", true);
        h.dr_reports(&[&a, &b], true, 0);
        let seen = drain(&plan, &members, &h.coordinator.lock());
        assert!(seen.fence.is_empty());
        assert!(
            seen.waiting[0].contains("applied epoch 0 of 6"),
            "{:?}",
            seen.waiting
        );

        for p in [&a, &b] {
            let mut s = pair_state(
                p,
                "dr",
                blockrep_core::replication::ReplicationStatus::Active,
            );
            s.consistent_epoch = 6;
            h.report(&p.dr_node, "az2", vec![], vec![s]);
        }
        let seen = drain(&plan, &members, &h.coordinator.lock());
        assert!(seen.waiting.is_empty(), "{:?}", seen.waiting);
    }

    #[test]
    fn a_stopped_groups_replicating_pair_is_paused_once_per_resend_and_only_if_its_agent_is_up() {
        let (h, mut group, a, b) = seeded_group_of_two();
        h.production_reports(&[&a, &b]);
        let resend = Duration::from_secs(2);
        let now = crate::clock::Clock::now(&*h.clock);
        assert!(
            pauses_due(&h.coordinator.lock(), now, resend).is_empty(),
            "replicating as asked"
        );

        group.stopped = true;
        h.coordinator.lock().groups.insert(group.id, group.clone());
        let due = pauses_due(&h.coordinator.lock(), now, resend);
        let paused: Vec<_> = due.iter().map(|p| (p.node.as_str(), p.pause)).collect();
        assert_eq!(paused, [("n1", true), ("n3", true)]);

        h.coordinator.lock().group_step_sent.insert(a.id, now);
        let due = pauses_due(&h.coordinator.lock(), now, resend);
        assert_eq!(due.len(), 1, "a was told lately: {due:?}");
        let due = pauses_due(&h.coordinator.lock(), now + resend, resend);
        assert_eq!(due.len(), 2, "and is told again after the resend");

        let silent = now + NODE_TIMEOUT;
        let due = pauses_due(&h.coordinator.lock(), silent, resend);
        assert!(
            due.is_empty(),
            "no agent heard from for NODE_TIMEOUT: {due:?}"
        );

        group.operation = Some(GroupOperation::Reprotect(crate::records::ReprotectPlan {
            term: 1,
            pairs: BTreeMap::new(),
        }));
        h.coordinator.lock().groups.insert(group.id, group);
        assert!(
            pauses_due(&h.coordinator.lock(), now, resend).is_empty(),
            "the operation decides"
        );
    }
}
