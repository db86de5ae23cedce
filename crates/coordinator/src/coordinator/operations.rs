//! A consistency group's operations of several steps: failover, reverse and reprotect
//! (docs/GROUPS.md argues each). The plan and its progress are recorded in the group's
//! record before each step is taken to an agent, so a coordinator killed in the middle
//! carries on where it stopped; every agent command is idempotent and carries the group's
//! new term.
//!
//! ```text
//!  failover   plan (commit E, a generation per pair) ─► promote every DR side (in parallel;
//!             production sides fenced where reachable) ─► sides swapped: failovered
//!  reverse    fence production (draining) ─► drained: every DR side holds every write
//!             ─► per pair: old production becomes DR, old DR production (one generation)
//!             ─► available, replicating the other way
//!  reprotect  per pair: old production's dirty blocks marked on the new production side
//!             ─► old production becomes DR (adopting production's generation)
//!             ─► available; the catch-ups copy the union of both bitmaps
//! ```

use std::collections::BTreeMap;

use blockrep_core::replication::{Epoch, GenerationId, GroupStatus};
use tokio::task::JoinSet;

use super::cuts::now_millis;
use super::groups::refused;
use super::*;
use crate::records::{
    ExtendPlan, FailoverPlan, GroupOperation, GroupRecord, PromoteStep, PromotedAt, ReprotectPlan,
    ReprotectStep, ReversePlan, ReverseStep, SwapStep,
};

/// How long a reverse waits for the DR side to hold every write before it gives up (and
/// production takes writes again).
const DRAIN_GIVE_UP_MS: u64 = 60_000;
/// How long the coordinator waits for a production agent to take a failover's fence; one
/// that is down is fenced when it comes back.
const FENCE_WAIT: Duration = Duration::from_secs(1);

impl Coordinator {
    // ---- the API ----

    /// Unplanned failover: every DR side rolls to the group's last consistent point and
    /// takes writes. Works with the production agents down; every DR agent must answer.
    pub fn failover_group(&self, reference: &str) -> Result<proto::GroupJobResponse, ApiError> {
        let mut state = self.lock();
        let id = Self::find_group(&state, reference)?;
        let group = state.groups[&id].clone();
        Self::check_not_busy(&state, &group)?;
        GroupAction::Failover
            .begin(self.group_state(&state, &group))
            .map_err(refused)?;
        let members = Self::members(&state, &group);
        for p in &members {
            if !state.nodes.get(&p.dr_node).is_some_and(Self::alive) {
                return Err(ApiError::FailedPrecondition(format!(
                    "failover refused: DR node {} of pair {} is not reachable; failover needs every DR agent",
                    p.dr_node, p.name
                )));
            }
        }
        // A failover retried after it failed keeps its plan: pairs promoted stay so.
        let plan = match &group.operation {
            Some(GroupOperation::Failover(plan)) => plan.clone(),
            _ => {
                let commit = self.group_commit(&state, &group);
                if group.model == ReplicationModel::Async && commit.is_none() {
                    return Err(ApiError::FailedPrecondition(format!(
                        "failover refused: group {} has no consistent point yet (no epoch committed on every pair); wait until `group show` gives one",
                        group.name
                    )));
                }
                if !Self::joined(&state, &members) {
                    return Err(ApiError::FailedPrecondition(format!(
                        "failover refused: the pairs of group {} are still joining it (not every agent replicates them as the group's yet); wait until `group show` gives a consistent point",
                        group.name
                    )));
                }
                FailoverPlan {
                    commit,
                    term: group.term + 1,
                    asked_ms: now_millis(),
                    pairs: members
                        .iter()
                        .map(|p| {
                            (
                                p.id,
                                PromoteStep {
                                    generation: GenerationId::random(),
                                    done: None,
                                },
                            )
                        })
                        .collect(),
                }
            }
        };
        let commit = plan.commit;
        let response = self.start_operation(
            &mut state,
            group,
            JobType::FailoverGroup,
            GroupStatus::Failovering,
            GroupOperation::Failover(plan),
        )?;
        tracing::info!(group = %id, commit = ?commit, "failover started");
        Ok(response)
    }

    /// Planned switchover: production refuses new writes and drains, the DR side catches
    /// up, the sides swap and replication runs the other way. No data is lost.
    pub fn reverse_group(&self, reference: &str) -> Result<proto::GroupJobResponse, ApiError> {
        let mut state = self.lock();
        let id = Self::find_group(&state, reference)?;
        let group = state.groups[&id].clone();
        Self::check_not_busy(&state, &group)?;
        GroupAction::Reverse
            .begin(self.group_state(&state, &group))
            .map_err(refused)?;
        let members = Self::members(&state, &group);
        for p in &members {
            for node in [&p.production_node, &p.dr_node] {
                if !state.nodes.get(node).is_some_and(Self::alive) {
                    return Err(ApiError::FailedPrecondition(format!(
                        "reverse refused: node {node} of pair {} is not reachable; a planned reverse needs both sides (use failover if a side is lost)",
                        p.name
                    )));
                }
            }
        }
        let plan = match &group.operation {
            Some(GroupOperation::Reverse(plan)) => plan.clone(),
            _ => ReversePlan {
                term: group.term + 1,
                step: ReverseStep::Draining,
                draining_since_ms: now_millis(),
                pairs: members
                    .iter()
                    .map(|p| {
                        (
                            p.id,
                            SwapStep {
                                generation: GenerationId::random(),
                                old_production_switched: false,
                                old_dr_switched: false,
                            },
                        )
                    })
                    .collect(),
            },
        };
        let response = self.start_operation(
            &mut state,
            group,
            JobType::ReverseGroup,
            GroupStatus::Reversing,
            GroupOperation::Reverse(plan),
        )?;
        tracing::info!(group = %id, "reverse started");
        Ok(response)
    }

    /// After a failover, with the old production zone back: the old production volumes
    /// become the DR side and receive only the blocks that may differ.
    pub fn reprotect_group(&self, reference: &str) -> Result<proto::GroupJobResponse, ApiError> {
        let mut state = self.lock();
        let id = Self::find_group(&state, reference)?;
        let group = state.groups[&id].clone();
        Self::check_not_busy(&state, &group)?;
        GroupAction::Reprotect
            .begin(self.group_state(&state, &group))
            .map_err(refused)?;
        let members = Self::members(&state, &group);
        for p in &members {
            // The old production side (the record's DR side since the failover) must be
            // back, and know the pair.
            let back = state.nodes.get(&p.dr_node).is_some_and(|n| {
                Self::alive(n) && n.report.pairs.iter().any(|s| s.pair_id == p.id.to_string())
            });
            if !back {
                return Err(ApiError::FailedPrecondition(format!(
                    "reprotect refused: the old production agent of pair {} (node {}) is not back; reprotect needs it",
                    p.name, p.dr_node
                )));
            }
        }
        let plan = match &group.operation {
            Some(GroupOperation::Reprotect(plan)) => plan.clone(),
            _ => ReprotectPlan {
                term: group.term + 1,
                pairs: members
                    .iter()
                    .map(|p| (p.id, ReprotectStep::default()))
                    .collect(),
            },
        };
        let response = self.start_operation(
            &mut state,
            group,
            JobType::ReprotectGroup,
            GroupStatus::Failovered,
            GroupOperation::Reprotect(plan),
        )?;
        tracing::info!(group = %id, "reprotect started");
        Ok(response)
    }

    /// Grows both volumes of a pair of the group, online: the DR volume, then production.
    pub fn extend_group(
        &self,
        req: proto::ExtendGroupRequest,
    ) -> Result<proto::GroupJobResponse, ApiError> {
        let mut state = self.lock();
        let id = Self::find_group(&state, &req.group)?;
        let group = state.groups[&id].clone();
        let pair_id = Self::find_pair(&state, &req.pair)?;
        let pair = state.pairs[&pair_id].clone();
        if pair.group != Some(id) {
            return Err(ApiError::InvalidArgument(format!(
                "pair {} is not in group {}",
                pair.name, group.name
            )));
        }
        if req.size_bytes <= pair.size {
            return Err(ApiError::InvalidArgument(format!(
                "pair {} is {} bytes; extend takes a larger size (volumes never shrink)",
                pair.name, pair.size
            )));
        }
        if !req.size_bytes.is_multiple_of(4096) {
            return Err(ApiError::InvalidArgument(format!(
                "{} bytes is not a multiple of 4096",
                req.size_bytes
            )));
        }
        Self::check_not_busy(&state, &group)?;
        GroupAction::Extend
            .begin(self.group_state(&state, &group))
            .map_err(refused)?;
        for node in [&pair.production_node, &pair.dr_node] {
            if !state.nodes.get(node).is_some_and(Self::alive) {
                return Err(ApiError::FailedPrecondition(format!(
                    "extend refused: node {node} of pair {} is not reachable; both volumes grow together",
                    pair.name
                )));
            }
        }
        let plan = ExtendPlan {
            pair: pair_id,
            size: req.size_bytes,
            dr_done: false,
        };
        let response = self.start_operation(
            &mut state,
            group,
            JobType::ExtendGroup,
            GroupStatus::Available,
            GroupOperation::Extend(plan),
        )?;
        tracing::info!(group = %id, pair = %pair_id, size = req.size_bytes, "extend started");
        Ok(response)
    }

    fn check_not_busy(state: &State, group: &GroupRecord) -> Result<(), ApiError> {
        match group
            .job
            .and_then(|j| state.jobs.get(&j))
            .filter(|j| !j.status.is_finished())
        {
            Some(job) => Err(ApiError::FailedPrecondition(format!(
                "group {} is busy with job {} ({})",
                group.name, job.id, job.job_type
            ))),
            None => Ok(()),
        }
    }

    /// Every member's agents replicate it as the group's: its DR side applies by the group's
    /// commits, and its production side (async: cut by the group; hypermetro: trips with
    /// it) knows it is grouped, as far as the coordinator heard from it since it started (a
    /// production agent that is down does nothing more). Until then the group has no
    /// consistent point.
    pub(super) fn joined(state: &State, members: &[PairRecord]) -> bool {
        members.iter().all(|p| {
            let dr = Self::report_on(state, &p.dr_node, p.id)
                .is_some_and(|s| s.side == "dr" && s.grouped);
            let production = Self::report_on(state, &p.production_node, p.id)
                .is_none_or(|s| s.side != "production" || s.grouped);
            dr && production
        })
    }

    pub(super) fn members(state: &State, group: &GroupRecord) -> Vec<PairRecord> {
        group
            .pairs
            .iter()
            .filter_map(|p| state.pairs.get(p))
            .cloned()
            .collect()
    }

    /// The group's last commit: the highest the cut loop made or any DR agent recorded
    /// (each was, when made, staged on every pair). `None` before the first.
    pub(super) fn group_commit(&self, state: &State, group: &GroupRecord) -> Option<Epoch> {
        let members = Self::members(state, group);
        let cut = state
            .cuts
            .get(&group.id)
            .and_then(|c| c.committed_for(&members))
            .unwrap_or(Epoch::ZERO);
        let reported = members
            .iter()
            .filter_map(|p| Self::report_on(state, &p.dr_node, p.id))
            .filter(|s| s.side == "dr" && s.grouped)
            .map(|s| Epoch(s.group_commit))
            .max()
            .unwrap_or(Epoch::ZERO);
        Some(cut.max(reported)).filter(|e| *e > Epoch::ZERO)
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

    /// Records the operation with the group's running status and its job, and wakes the
    /// driver.
    fn start_operation(
        &self,
        state: &mut State,
        group: GroupRecord,
        job_type: JobType,
        running: GroupStatus,
        operation: GroupOperation,
    ) -> Result<proto::GroupJobResponse, ApiError> {
        let job = JobRecord {
            id: JobId::random(),
            job_type,
            status: JobStatus::Running,
            begin_time: now_text(),
            end_time: None,
            progress: 0.0,
            fail_reason: None,
            pair: None,
            group: Some(group.id),
            result: None,
        };
        let mut updated = group;
        updated.status = running;
        updated.failure_detail = None;
        updated.job = Some(job.id);
        updated.operation = Some(operation);
        updated.updated_at = Some(now_text());
        self.commit(&[
            Change::PutGroup(updated.clone()),
            Change::PutJob(job.clone()),
        ])?;
        state.group_stuck_since.remove(&updated.id);
        state.groups.insert(updated.id, updated.clone());
        state.jobs.insert(job.id, job.clone());
        if let Some(op) = &updated.operation {
            super::fault::crash_at(&op.describe());
        }
        self.kick.notify_one();
        Ok(proto::GroupJobResponse {
            group: Some(self.group_view(state, &updated)),
            job: Some(job_view(&job)),
        })
    }

    // ---- the driver ----

    /// Takes the next step of every group operation under way.
    pub(super) async fn drive_operations(&self) {
        let running: Vec<GroupRecord> = self
            .lock()
            .groups
            .values()
            .filter(|g| g.operation.is_some())
            .cloned()
            .collect();
        for group in running {
            let id = group.id;
            let outcome = match group.operation.clone() {
                Some(GroupOperation::Failover(plan)) => self.drive_failover(group, plan).await,
                Some(GroupOperation::Reverse(plan)) => self.drive_reverse(group, plan).await,
                Some(GroupOperation::Reprotect(plan)) => self.drive_reprotect(group, plan).await,
                Some(GroupOperation::Extend(plan)) => self.drive_extend(group, plan).await,
                None => Ok(()),
            };
            if let Err(e) = outcome {
                tracing::error!(group = %id, error = %e, "group operation");
            }
        }
    }

    async fn drive_failover(&self, group: GroupRecord, plan: FailoverPlan) -> Result<(), ApiError> {
        let members = {
            let state = self.lock();
            Self::members(&state, &group)
        };
        // Production sides still reachable refuse writes from now on; one that is down is
        // demoted when it comes back (its report is answered with its new side). Not
        // waited for: the DR side does not need it.
        if self.lock().fences_sent.insert(group.id) {
            for p in &members {
                let fence = Request::Fence(proto::FenceCommand {
                    pair_id: p.id.to_string(),
                    fence: "demoted".into(),
                    term: plan.term,
                });
                self.fire_and_forget(&p.production_node, fence, FENCE_WAIT);
            }
        }
        let mut calls = JoinSet::new();
        for p in &members {
            let Some(step) = plan.pairs.get(&p.id).filter(|s| s.done.is_none()) else {
                continue;
            };
            let request = Request::Promote(proto::Promote {
                pair_id: p.id.to_string(),
                volume_id: p.dr_volume.to_string(),
                commit: plan.commit.map_or(0, |e| e.0),
                has_commit: plan.commit.is_some(),
                generation: step.generation.0,
                term: plan.term,
            });
            let call = self.ask_agent(&p.dr_node, request);
            let pair = p.id;
            calls.spawn(async move { (pair, call.await) });
        }
        let mut plan = plan;
        let mut failed = Vec::new();
        while let Some(joined) = calls.join_next().await {
            let Ok((pair, answer)) = joined else { continue };
            match answer {
                Ok(Response::Promoted(p)) => {
                    if let Some(step) = plan.pairs.get_mut(&pair) {
                        step.done = Some(PromotedAt {
                            epoch: Epoch(p.epoch),
                            cut_ms: p.cut_ms,
                            dropped_bytes: p.dropped_bytes,
                        });
                    }
                }
                Ok(_) => failed.push((pair, ApiError::Internal("unexpected answer".into()))),
                Err(e) => failed.push((pair, e)),
            }
        }
        let done = plan.pairs.values().all(|s| s.done.is_some());
        if done {
            return self.finish_failover(group, plan);
        }
        self.save_plan(&group, GroupOperation::Failover(plan))?;
        self.operation_failed(&group, failed, GroupStatus::ErrorFailovering)
    }

    /// Every DR side is production: the records follow, and the job says what was reached.
    fn finish_failover(&self, group: GroupRecord, plan: FailoverPlan) -> Result<(), ApiError> {
        let mut state = self.lock();
        let mut changes = Vec::new();
        let mut new_station = group.priority_station.clone();
        for (id, step) in &plan.pairs {
            let Some(mut pair) = state.pairs.get(id).cloned() else {
                continue;
            };
            swap_sides(&mut pair);
            if let Some(node) = state.nodes.get(&pair.production_node) {
                new_station = node.record.availability_zone.clone();
            }
            pair.priority_station = new_station.clone();
            pair.term = plan.term;
            pair.generation = Some(step.generation);
            pair.updated_at = Some(now_text());
            changes.push(Change::PutPair(pair));
        }
        let mut updated = group.clone();
        updated.status = GroupStatus::Failovered;
        updated.priority_station = new_station;
        updated.stopped = true;
        updated.term = plan.term;
        updated.operation = None;
        updated.updated_at = Some(now_text());
        let reached: Vec<PromotedAt> = plan.pairs.values().filter_map(|s| s.done).collect();
        // The point reached, group-wide: the oldest of the pairs'.
        updated.failed_over_at = reached.iter().copied().min_by_key(|r| (r.epoch, r.cut_ms));
        let result = failover_result(&plan, &reached, group.model, now_millis());
        let job = updated.job.and_then(|j| state.jobs.get(&j)).cloned();
        changes.push(Change::PutGroup(updated.clone()));
        if let Some(mut job) = job.clone() {
            job.result = Some(result.clone());
            job.end(Ok(()));
            changes.push(Change::PutJob(job.clone()));
            state.jobs.insert(job.id, job);
        }
        self.commit(&changes)?;
        for change in changes {
            if let Change::PutPair(p) = change {
                state.pairs.insert(p.id, p);
            }
        }
        state.groups.insert(updated.id, updated);
        state.group_stuck_since.remove(&group.id);
        state.fences_sent.remove(&group.id);
        tracing::info!(group = %group.id, %result, "failover done");
        Ok(())
    }

    async fn drive_reverse(&self, group: GroupRecord, plan: ReversePlan) -> Result<(), ApiError> {
        let members = {
            let state = self.lock();
            Self::members(&state, &group)
        };
        match plan.step {
            ReverseStep::Draining => self.drive_drain(group, plan, members).await,
            ReverseStep::Swapping => self.drive_swap(group, plan, members).await,
        }
    }

    /// Fences every production side (draining) until each says so, then waits until every
    /// DR side holds every write admitted before its fence.
    async fn drive_drain(
        &self,
        group: GroupRecord,
        plan: ReversePlan,
        members: Vec<PairRecord>,
    ) -> Result<(), ApiError> {
        let (unfenced, waiting) = {
            let state = self.lock();
            let mut unfenced = Vec::new();
            let mut waiting = Vec::new();
            for p in &members {
                let production = Self::report_on(&state, &p.production_node, p.id);
                let dr = Self::report_on(&state, &p.dr_node, p.id);
                if production.is_none_or(|s| s.fence != "draining" || s.term < plan.term) {
                    unfenced.push(p.clone());
                    waiting.push(format!(
                        "pair {}: the production side is not fenced",
                        p.name
                    ));
                    continue;
                }
                let production = production.expect("checked");
                if !production.drained {
                    waiting.push(format!(
                        "pair {}: the production side has not drained (live {:?}, catching up {}, epoch {}, staged {})",
                        p.name,
                        production.live,
                        production.catching_up,
                        production.current_epoch,
                        production.staged_epoch
                    ));
                    continue;
                }
                let applied = dr.map_or(0, |d| d.consistent_epoch);
                if p.model == ReplicationModel::Async && applied < production.drained_epoch {
                    waiting.push(format!(
                        "pair {}: the DR side applied epoch {applied} of {}",
                        p.name, production.drained_epoch
                    ));
                }
            }
            (unfenced, waiting)
        };
        let mut failed = Vec::new();
        for p in &unfenced {
            let fence = Request::Fence(proto::FenceCommand {
                pair_id: p.id.to_string(),
                fence: "draining".into(),
                term: plan.term,
            });
            if let Err(e) = self.ask_agent(&p.production_node, fence).await {
                failed.push((p.id, e));
            }
        }
        if waiting.is_empty() {
            // Reports sent before the fence went up cannot say drained: this one is after.
            let mut plan = plan;
            plan.step = ReverseStep::Swapping;
            tracing::info!(group = %group.id, "reverse: drained; swapping sides");
            self.save_plan(&group, GroupOperation::Reverse(plan))?;
            self.kick.notify_one();
            return Ok(());
        }
        if now_millis().saturating_sub(plan.draining_since_ms) < DRAIN_GIVE_UP_MS {
            return Ok(());
        }
        // The DR side did not catch up: production takes writes again, nothing swapped.
        let mut reason = format!(
            "the DR side did not catch up within {} s of the fence; production takes writes again",
            DRAIN_GIVE_UP_MS / 1000
        );
        if let Some((pair, e)) = failed.first() {
            reason.push_str(&format!(" (pair {pair}: {e})"));
        } else if let Some(waiting) = waiting.first() {
            reason.push_str(&format!(" ({waiting})"));
        }
        for p in &members {
            let unfence = Request::Fence(proto::FenceCommand {
                pair_id: p.id.to_string(),
                fence: String::new(),
                term: plan.term,
            });
            if let Err(e) = self.ask_agent(&p.production_node, unfence).await {
                tracing::warn!(pair = %p.id, error = %e, "cannot take the reverse's fence down");
            }
        }
        self.end_operation(&group, GroupStatus::ErrorReversing, Err(reason))
    }

    /// Swaps each pair's sides: the old production side becomes DR first (adopting the
    /// shared generation as a consistent image), then the old DR side production.
    async fn drive_swap(
        &self,
        group: GroupRecord,
        plan: ReversePlan,
        members: Vec<PairRecord>,
    ) -> Result<(), ApiError> {
        let mut plan = plan;
        let mut failed = Vec::new();
        for p in &members {
            let Some(step) = plan.pairs.get(&p.id).copied() else {
                continue;
            };
            let mut flipped = p.clone();
            swap_sides(&mut flipped);
            if !step.old_production_switched {
                let to_dr = self.switch_assignment(&flipped, Side::Dr, step.generation, plan.term);
                match self
                    .call_agent_by_name(&p.production_node, Request::SwitchSide(to_dr))
                    .await
                {
                    Ok(()) => {
                        plan.pairs
                            .get_mut(&p.id)
                            .expect("present")
                            .old_production_switched = true;
                        self.save_plan(&group, GroupOperation::Reverse(plan.clone()))?;
                    }
                    Err(e) => {
                        failed.push((p.id, e));
                        continue;
                    }
                }
            }
            if !step.old_dr_switched {
                let to_production =
                    self.switch_assignment(&flipped, Side::Production, step.generation, plan.term);
                match self
                    .call_agent_by_name(&p.dr_node, Request::SwitchSide(to_production))
                    .await
                {
                    Ok(()) => {
                        plan.pairs.get_mut(&p.id).expect("present").old_dr_switched = true;
                        self.save_plan(&group, GroupOperation::Reverse(plan.clone()))?;
                    }
                    Err(e) => failed.push((p.id, e)),
                }
            }
        }
        let done = plan
            .pairs
            .values()
            .all(|s| s.old_production_switched && s.old_dr_switched);
        if !done {
            return self.operation_failed(&group, failed, GroupStatus::ErrorReversing);
        }
        let generations = plan
            .pairs
            .iter()
            .map(|(id, s)| (*id, s.generation))
            .collect();
        self.finish_role_change(&group, plan.term, Some(generations), true)
    }

    async fn drive_reprotect(
        &self,
        group: GroupRecord,
        plan: ReprotectPlan,
    ) -> Result<(), ApiError> {
        let members = {
            let state = self.lock();
            Self::members(&state, &group)
        };
        let mut plan = plan;
        let mut failed = Vec::new();
        for p in &members {
            let Some(step) = plan.pairs.get(&p.id).copied() else {
                continue;
            };
            if step.switched {
                continue;
            }
            // The record's DR side is the old production side since the failover.
            if step.handed_over.is_none() {
                match self.hand_over_dirty(p).await {
                    Ok(bytes) => {
                        plan.pairs.get_mut(&p.id).expect("present").handed_over = Some(bytes);
                        self.save_plan(&group, GroupOperation::Reprotect(plan.clone()))?;
                    }
                    Err(e) => {
                        failed.push((p.id, e));
                        continue;
                    }
                }
            }
            let Some(generation) = p.generation else {
                failed.push((
                    p.id,
                    ApiError::Internal(format!(
                        "pair {} has no generation recorded from its failover",
                        p.name
                    )),
                ));
                continue;
            };
            let to_dr = self.switch_assignment(p, Side::Dr, generation, plan.term);
            match self
                .call_agent_by_name(&p.dr_node, Request::SwitchSide(to_dr))
                .await
            {
                Ok(()) => {
                    plan.pairs.get_mut(&p.id).expect("present").switched = true;
                    self.save_plan(&group, GroupOperation::Reprotect(plan.clone()))?;
                }
                Err(e) => failed.push((p.id, e)),
            }
        }
        if !plan.pairs.values().all(|s| s.switched) {
            return self.operation_failed(&group, failed, GroupStatus::Failovered);
        }
        let handed: u64 = plan.pairs.values().filter_map(|s| s.handed_over).sum();
        tracing::info!(group = %group.id, handed_over = handed, "reprotect: every old production side is DR; catching up");
        self.finish_role_change(&group, plan.term, None, false)
    }

    /// Grows the DR volume, then the production volume; then the record. A refusal (no room)
    /// fails the job at once and changes nothing more (a volume already grown keeps its
    /// size: it never shrinks, and a retry grows the other).
    async fn drive_extend(&self, group: GroupRecord, plan: ExtendPlan) -> Result<(), ApiError> {
        let Some(pair) = self.lock().pairs.get(&plan.pair).cloned() else {
            return self.end_operation(
                &group,
                GroupStatus::Available,
                Err(format!("pair {} is gone", plan.pair)),
            );
        };
        let extend = |volume: VolumeId| {
            Request::Extend(proto::Extend {
                pair_id: pair.id.to_string(),
                volume_id: volume.to_string(),
                size_bytes: plan.size,
            })
        };
        let mut plan = plan;
        if !plan.dr_done {
            if let Err(e) = self
                .call_agent_by_name(&pair.dr_node, extend(pair.dr_volume))
                .await
            {
                return self.operation_failed(&group, vec![(pair.id, e)], GroupStatus::Available);
            }
            plan.dr_done = true;
            self.save_plan(&group, GroupOperation::Extend(plan))?;
        }
        if let Err(e) = self
            .call_agent_by_name(&pair.production_node, extend(pair.production_volume))
            .await
        {
            return self.operation_failed(&group, vec![(pair.id, e)], GroupStatus::Available);
        }
        let mut record = pair.clone();
        record.size = plan.size;
        record.updated_at = Some(now_text());
        self.commit(&[Change::PutPair(record.clone())])?;
        self.lock().pairs.insert(record.id, record);
        tracing::info!(group = %group.id, pair = %pair.id, size = plan.size, "extended");
        self.end_operation(&group, GroupStatus::Available, Ok(()))
    }

    /// Reads the old production side's dirty blocks and marks them on the new production
    /// side, durably. Returns their bytes.
    async fn hand_over_dirty(&self, p: &PairRecord) -> Result<u64, ApiError> {
        let command = proto::PairCommand {
            pair_id: p.id.to_string(),
            ..Default::default()
        };
        let runs = match self
            .ask_agent(&p.dr_node, Request::DirtyRuns(command))
            .await?
        {
            Response::Dirty(d) => d.runs,
            _ => return Err(ApiError::Internal("unexpected answer to dirty_runs".into())),
        };
        let bytes = runs.iter().map(|r| r.length).sum();
        self.call_agent_by_name(
            &p.production_node,
            Request::MarkDirty(proto::MarkDirty {
                pair_id: p.id.to_string(),
                runs,
            }),
        )
        .await?;
        Ok(bytes)
    }

    /// The roles changed on every agent: the records follow (swapped for a reverse), the
    /// group is available and replicates; its job ends once every pair is active.
    fn finish_role_change(
        &self,
        group: &GroupRecord,
        term: u64,
        generations: Option<BTreeMap<PairId, GenerationId>>,
        swap: bool,
    ) -> Result<(), ApiError> {
        let mut state = self.lock();
        let mut changes = Vec::new();
        let mut station = group.priority_station.clone();
        for id in &group.pairs {
            let Some(mut pair) = state.pairs.get(id).cloned() else {
                continue;
            };
            if swap {
                swap_sides(&mut pair);
            }
            if let Some(node) = state.nodes.get(&pair.production_node) {
                station = node.record.availability_zone.clone();
            }
            pair.priority_station = station.clone();
            pair.term = term;
            if let Some(g) = generations.as_ref().and_then(|g| g.get(id)) {
                pair.generation = Some(*g);
            }
            pair.updated_at = Some(now_text());
            changes.push(Change::PutPair(pair));
        }
        let mut updated = group.clone();
        updated.status = GroupStatus::Available;
        updated.priority_station = station;
        updated.stopped = false;
        updated.term = term;
        updated.operation = None;
        updated.updated_at = Some(now_text());
        changes.push(Change::PutGroup(updated.clone()));
        self.commit(&changes)?;
        for change in changes {
            if let Change::PutPair(p) = change {
                state.group_step_sent.remove(&p.id);
                state.pairs.insert(p.id, p);
            }
        }
        state.groups.insert(updated.id, updated);
        state.group_stuck_since.remove(&group.id);
        self.kick.notify_one();
        Ok(())
    }

    /// What a switch of sides tells the agent of `side` in `pair` (as the record will be
    /// once the switch is done).
    fn switch_assignment(
        &self,
        pair: &PairRecord,
        side: Side,
        generation: GenerationId,
        term: u64,
    ) -> proto::PairAssignment {
        let state = self.lock();
        let peer = match side {
            Side::Production => &pair.dr_node,
            Side::Dr => &pair.production_node,
        };
        let peer_address = state.nodes.get(peer).map_or_else(
            || "0.0.0.0:0".parse().expect("address"),
            |n| n.record.address,
        );
        proto::PairAssignment {
            generation: generation.0,
            term,
            grouped: pair.group.is_some(),
            ..PairPlan::assignment_of(pair, side, peer_address)
        }
    }

    fn save_plan(&self, group: &GroupRecord, operation: GroupOperation) -> Result<(), ApiError> {
        let mut state = self.lock();
        let Some(mut updated) = state.groups.get(&group.id).cloned() else {
            return Ok(());
        };
        if updated.operation.as_ref() == Some(&operation) {
            return Ok(());
        }
        updated.operation = Some(operation);
        self.commit(&[Change::PutGroup(updated.clone())])?;
        let step = updated.operation.as_ref().map(|o| o.describe());
        state.groups.insert(updated.id, updated);
        drop(state);
        if let Some(step) = step {
            super::fault::crash_at(&step);
        }
        Ok(())
    }

    /// Some agents did not take their step: try again on the next round, unless the refusal
    /// is final or the agents stayed away too long; then the operation fails, its plan kept
    /// (a retry carries on from it).
    fn operation_failed(
        &self,
        group: &GroupRecord,
        failed: Vec<(PairId, ApiError)>,
        failed_status: GroupStatus,
    ) -> Result<(), ApiError> {
        let Some((pair, error)) = failed.into_iter().next() else {
            return Ok(());
        };
        let final_refusal = matches!(
            error,
            ApiError::FailedPrecondition(_) | ApiError::InvalidArgument(_) | ApiError::NotFound(_)
        );
        let since = *self
            .lock()
            .group_stuck_since
            .entry(group.id)
            .or_insert_with(Instant::now);
        if !final_refusal && since.elapsed() < AGENT_GIVE_UP {
            tracing::debug!(group = %group.id, %pair, %error, "group step pending; retrying");
            return Ok(());
        }
        let name = self
            .lock()
            .pairs
            .get(&pair)
            .map_or(pair.to_string(), |p| p.name.clone());
        self.end_operation(group, failed_status, Err(format!("pair {name}: {error}")))
    }

    /// Ends the group's job with `outcome` and leaves the group in `status`; a failed
    /// operation keeps its plan for a retry.
    fn end_operation(
        &self,
        group: &GroupRecord,
        status: GroupStatus,
        outcome: Result<(), String>,
    ) -> Result<(), ApiError> {
        let mut state = self.lock();
        let Some(mut updated) = state.groups.get(&group.id).cloned() else {
            return Ok(());
        };
        updated.status = status;
        updated.failure_detail = outcome.as_ref().err().cloned();
        if outcome.is_ok()
            || matches!(
                updated.operation,
                Some(GroupOperation::Reverse(ReversePlan {
                    step: ReverseStep::Draining,
                    ..
                }))
            )
        {
            // A reverse that gave up before swapping anything starts afresh next time.
            updated.operation = None;
        }
        updated.updated_at = Some(now_text());
        let mut changes = vec![];
        if let Some(mut job) = updated.job.and_then(|j| state.jobs.get(&j)).cloned() {
            job.end(outcome.clone());
            changes.push(Change::PutJob(job.clone()));
            state.jobs.insert(job.id, job);
        }
        changes.push(Change::PutGroup(updated.clone()));
        self.commit(&changes)?;
        tracing::warn!(group = %group.id, %status, outcome = ?outcome, "group operation ended");
        state.groups.insert(updated.id, updated);
        state.group_stuck_since.remove(&group.id);
        state.fences_sent.remove(&group.id);
        Ok(())
    }

    // ---- calling agents ----

    /// Calls `node` (by its registered address) and returns its answer.
    fn ask_agent(
        &self,
        node: &str,
        request: Request,
    ) -> BoxFuture<'static, Result<Response, ApiError>> {
        let address = self.lock().nodes.get(node).map(|n| n.record.address);
        let agents = Arc::clone(&self.agents);
        let node = node.to_owned();
        Box::pin(async move {
            let address = address
                .ok_or_else(|| ApiError::Unavailable(format!("node {node} is not registered")))?;
            let answer = agents
                .call(
                    &node,
                    address,
                    ClusterRequest {
                        request: Some(request),
                    },
                )
                .await?;
            match answer.response {
                Some(Response::Error(e)) => Err(e.into()),
                Some(response) => Ok(response),
                None => Err(ApiError::Internal(format!("node {node} answered nothing"))),
            }
        })
    }

    async fn call_agent_by_name(&self, node: &str, request: Request) -> Result<(), ApiError> {
        match self.ask_agent(node, request).await? {
            Response::Done(_) => Ok(()),
            _ => Err(ApiError::Internal(format!(
                "node {node} answered with something unexpected"
            ))),
        }
    }

    /// Sends `request` to `node` without waiting for more than `wait` (or at all).
    fn fire_and_forget(&self, node: &str, request: Request, wait: Duration) {
        let call = self.ask_agent(node, request);
        let node = node.to_owned();
        tokio::spawn(async move {
            match tokio::time::timeout(wait, call).await {
                Ok(Ok(_)) => tracing::info!(node, "fenced"),
                Ok(Err(e)) => {
                    tracing::info!(node, error = %e, "not fenced now (it is fenced when it comes back)")
                }
                Err(_) => tracing::info!(
                    node,
                    "no answer to the fence (it is fenced when it comes back)"
                ),
            }
        });
    }

    /// The sides the records give `node` in its pairs, for its report's answer: a
    /// production side that restarted takes writes once confirmed, and one whose group
    /// failed over is demoted. Pairs of a group whose roles are changing are left out.
    pub(super) fn roles_of(state: &State, node: &str) -> Vec<proto::PairRole> {
        state
            .pairs
            .values()
            .filter(|p| p.production_node == node || p.dr_node == node)
            .filter(|p| {
                p.group
                    .and_then(|g| state.groups.get(&g))
                    .is_none_or(|g| g.operation.is_none())
            })
            .map(|p| proto::PairRole {
                pair_id: p.id.to_string(),
                side: if p.production_node == node {
                    "production".into()
                } else {
                    "dr".into()
                },
                term: p.term,
            })
            .collect()
    }
}

/// The pair after its sides swap (a failover or a reverse).
fn swap_sides(pair: &mut PairRecord) {
    std::mem::swap(&mut pair.production_volume, &mut pair.dr_volume);
    std::mem::swap(&mut pair.production_node, &mut pair.dr_node);
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
    match (model, plan.commit) {
        (ReplicationModel::Async, Some(commit)) => {
            let cut_ms = reached.iter().map(|r| r.cut_ms).filter(|c| *c > 0).min();
            let window = cut_ms.map_or_else(
                || "unknown".to_owned(),
                |c| format!("{:.1} s", plan.asked_ms.saturating_sub(c) as f64 / 1000.0),
            );
            let at = cut_ms.map_or_else(String::new, |c| {
                format!(
                    " (cut at {})",
                    humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH + Duration::from_millis(c)
                    )
                )
            });
            format!(
                "consistent point: epoch {}{at} on every pair; write window lost: {window} before the failover call; {} staged beyond it dropped (marked dirty for reprotect); took {took_ms} ms",
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
