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
//!
//! What each step is — the calls, what their answers mark in the plan, the changes that
//! end the operation — is decided by the planner, `group_steps`, which does no I/O. This
//! file holds the requests, the driver's round over the operations under way (making the
//! planner's calls pair by pair, storing the plan after each answer that moved it, ending
//! the operation) and the plan's bookkeeping (started, saved, failed, ended); two steps are
//! driven their own way: a failover's promotions, in parallel ([`failover`]), and a
//! reverse's drain, which waits on the agents' reports ([`reverse`]).

use blockrep_core::replication::{Epoch, GenerationId, GroupStatus};

use super::cuts::now_millis;
use super::group_steps::{self, GroupCall};
use super::groups::refused;
use super::jobs::job_view;
use super::*;
use crate::records::{
    ExtendPlan, FailoverPlan, GroupOperation, GroupRecord, PromoteStep, ReprotectPlan,
    ReprotectStep, ReversePlan, ReverseStep, SwapStep,
};

mod failover;
mod reverse;

impl Coordinator {
    // ---- the API ----

    /// Unplanned failover: every DR side rolls to the group's last consistent point and
    /// takes writes. Works with the production agents down; every DR agent must answer.
    pub fn failover_group(&self, reference: &str) -> Result<proto::GroupJobResponse, ApiError> {
        self.start_failover(reference, None)
    }

    /// Failover to a retained point (an epoch of `group points`, or a time: the newest
    /// point cut at or before it): the point is held on every DR volume first (retention
    /// keeps it), then every DR side rolls to the commit and back to the point.
    pub async fn failover_group_to_point(
        &self,
        req: proto::FailoverGroupRequest,
    ) -> Result<proto::GroupJobResponse, ApiError> {
        if req.point.is_empty() {
            return self.failover_group(&req.group);
        }
        let refused =
            |why: String| ApiError::FailedPrecondition(format!("failover refused: {why}"));
        let listed = self.group_points(&req.group).await?;
        if listed.points.is_empty() {
            return Err(refused(format!(
                "group {} holds no points in time{}",
                req.group,
                if listed.detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", listed.detail)
                }
            )));
        }
        let point = super::points::choose_point(&listed.points, &req.point)?;
        // A failover to this point under way (a retry after a part of it failed) carries
        // on from its plan: its pairs promoted already are DR sides no more.
        let under_way = {
            let state = self.lock();
            let id = Self::find_group(&state, &req.group)?;
            matches!(&state.groups[&id].operation,
                Some(GroupOperation::Failover(plan)) if plan.point == Some(point))
        };
        if under_way {
            return self.start_failover(&req.group, Some(point));
        }
        let by_node = {
            let state = self.lock();
            let id = Self::find_group(&state, &req.group)?;
            let mut by_node: BTreeMap<String, Vec<PairId>> = BTreeMap::new();
            for pid in &state.groups[&id].pairs {
                if let Some(pair) = state.pairs.get(pid) {
                    by_node.entry(pair.dr_node.clone()).or_default().push(*pid);
                }
            }
            by_node
        };
        for (node, pairs) in by_node {
            let hold = Request::HoldPoint(proto::HoldPoint {
                pair_ids: pairs.iter().map(PairId::to_string).collect(),
                epoch: point.0,
            });
            self.ask_agent(&node, hold)
                .await
                .map_err(|e| refused(format!("node {node} cannot hold point {point}: {e}")))?;
        }
        self.start_failover(&req.group, Some(point))
    }

    /// Starts a failover (to the newest point, or to `point`), or carries one on.
    fn start_failover(
        &self,
        reference: &str,
        point: Option<Epoch>,
    ) -> Result<proto::GroupJobResponse, ApiError> {
        self.settle_group_job(reference);
        let mut state = self.lock();
        let id = Self::find_group(&state, reference)?;
        let mut group = state.groups[&id].clone();
        // A pair's creation or removal does not hold a failover up (see
        // `protection::yield_to_failover`); any other job does.
        let membership_job = group.membership.as_ref().and_then(|m| m.job());
        if membership_job.is_none() || group.job != membership_job {
            Self::check_not_busy(&state, &group)?;
        }
        GroupAction::Failover
            .begin(self.group_state(&state, &group))
            .map_err(refused)?;
        Self::yield_to_failover(&mut group);
        let members = Self::members(&state, &group);
        for p in &members {
            if !state.nodes.get(&p.dr_node).is_some_and(|n| self.alive(n)) {
                return Err(ApiError::FailedPrecondition(format!(
                    "failover refused: DR node {} of pair {} is not reachable; failover needs every DR agent",
                    p.dr_node, p.name
                )));
            }
        }
        // A failover retried after it failed keeps its plan: pairs promoted stay so.
        let plan = match &group.operation {
            Some(GroupOperation::Failover(plan)) if point.is_some() && plan.point != point => {
                return Err(ApiError::FailedPrecondition(format!(
                    "failover refused: group {} is failing over to {}; retry that failover (no other point)",
                    group.name,
                    plan.point
                        .map_or_else(|| "its newest point".to_owned(), |p| format!("point {p}"))
                )));
            }
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
                if let (Some(p), Some(c)) = (point, commit)
                    && p > c
                {
                    return Err(ApiError::FailedPrecondition(format!(
                        "failover refused: point {p} is after the group's commit {c}"
                    )));
                }
                FailoverPlan {
                    point,
                    commit,
                    term: group.term + 1,
                    asked_ms: now_millis(),
                    production_heard_ms: self.last_heard_ms(&state, &members),
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
        self.settle_group_job(reference);
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
                if !state.nodes.get(node).is_some_and(|n| self.alive(n)) {
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
        self.settle_group_job(reference);
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
                self.alive(n) && n.report.pairs.iter().any(|s| s.pair_id == p.id.to_string())
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
        self.settle_group_job(&req.group);
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
            if !state.nodes.get(node).is_some_and(|n| self.alive(n)) {
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
            production_done: false,
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

    /// Refuses a request on a group while a job of the group runs.
    pub(super) fn check_not_busy(state: &State, group: &GroupRecord) -> Result<(), ApiError> {
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
            let dr = group_steps::report_on(state, &p.dr_node, p.id)
                .is_some_and(|s| s.side == "dr" && s.grouped);
            let production = group_steps::report_on(state, &p.production_node, p.id)
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

    /// When the coordinator last heard from any production host of `members` (ms since
    /// the Unix epoch, by its wall clock); `None`: from none since it started.
    fn last_heard_ms(&self, state: &State, members: &[PairRecord]) -> Option<u64> {
        members
            .iter()
            .filter_map(|p| state.nodes.get(&p.production_node)?.last_seen)
            .map(|seen| now_millis().saturating_sub(self.since(seen).as_millis() as u64))
            .max()
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
            .filter_map(|p| group_steps::report_on(state, &p.dr_node, p.id))
            .filter(|s| s.side == "dr" && s.grouped)
            .map(|s| Epoch(s.group_commit))
            .max()
            .unwrap_or(Epoch::ZERO);
        Some(cut.max(reported)).filter(|e| *e > Epoch::ZERO)
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
        let job = JobRecord::running(job_type, JobAbout::Group(&group));
        let mut updated = group;
        updated.status = running;
        updated.failure_detail = None;
        updated.job = Some(job.id);
        updated.operation = Some(operation);
        updated.updated_at = Some(now_text());
        self.commit_into(
            state,
            &[
                Change::PutGroup(updated.clone()),
                Change::PutJob(job.clone()),
            ],
        )?;
        state.group_stuck_since.remove(&updated.id);
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
                Some(GroupOperation::Reverse(plan)) if plan.step == ReverseStep::Draining => {
                    self.drive_drain(group, plan).await
                }
                Some(operation) => self.take_steps(group, operation).await,
                None => Ok(()),
            };
            if let Err(e) = outcome {
                tracing::error!(group = %id, error = %e, "group operation");
            }
        }
    }

    /// Takes each pair's calls of `operation` (`group_steps::next_call`), pair by pair and
    /// in order, storing the plan after every answer that moved it; ends the operation once
    /// every pair's part is done. A pair whose call failed waits for the next round (or
    /// fails the operation, see [`Self::operation_failed`]); the other pairs go on.
    async fn take_steps(
        &self,
        group: GroupRecord,
        mut operation: GroupOperation,
    ) -> Result<(), ApiError> {
        let members = {
            let state = self.lock();
            match &operation {
                // The pair being grown, whether or not it is still a member.
                GroupOperation::Extend(plan) => match state.pairs.get(&plan.pair) {
                    Some(pair) => vec![pair.clone()],
                    None => {
                        drop(state);
                        let gone = format!("pair {} is gone", plan.pair);
                        return self.end_operation(&group, GroupStatus::Available, Err(gone));
                    }
                },
                _ => Self::members(&state, &group),
            }
        };
        let before = operation.clone();
        let mut failed = Vec::new();
        for pair in &members {
            if let Err(e) = self.take_pair_steps(&group, &mut operation, pair).await? {
                failed.push((pair.id, e));
            }
        }
        if group_steps::all_done(&operation) {
            return self.finish_operation(&group, &operation);
        }
        if operation != before {
            self.moved_on(&group);
        }
        let failed_status = match operation {
            GroupOperation::Failover(_) => GroupStatus::ErrorFailovering,
            GroupOperation::Reverse(_) => GroupStatus::ErrorReversing,
            GroupOperation::Reprotect(_) => GroupStatus::Failovered,
            GroupOperation::Extend(_) => GroupStatus::Available,
        };
        self.operation_failed(&group, failed, failed_status)
    }

    /// Takes `pair`'s calls of `operation` until its part is done or an agent did not take
    /// one (the inner result); the outer one is the store's.
    async fn take_pair_steps(
        &self,
        group: &GroupRecord,
        operation: &mut GroupOperation,
        pair: &PairRecord,
    ) -> Result<Result<(), ApiError>, ApiError> {
        loop {
            let next = {
                let state = self.lock();
                group_steps::next_call(operation, pair, &|node| Self::address_of(&state, node))
            };
            let mut call = match next {
                None => return Ok(Ok(())),
                Some(Err(e)) => return Ok(Err(e)),
                Some(Ok(call)) => call,
            };
            loop {
                let GroupCall {
                    pair,
                    node,
                    request,
                    expects,
                } = call;
                let answer = self.ask_agent(&node, request).await;
                match answer.and_then(|a| group_steps::answered(operation, pair, expects, a)) {
                    Ok(Some(then)) => call = then,
                    Ok(None) => break,
                    Err(e) => return Ok(Err(e)),
                }
            }
            self.save_plan(group, operation.clone())?;
        }
    }

    /// Where `node` is reached (an unspecified address if it is not registered: its agent
    /// is not called then, and learns its peer's address from its next report's answer).
    fn address_of(state: &State, node: &str) -> SocketAddr {
        state
            .nodes
            .get(node)
            .map_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)), |n| n.record.address)
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
        let step = updated.operation.as_ref().map(|o| o.describe());
        self.commit_into(&mut state, &[Change::PutGroup(updated)])?;
        drop(state);
        if let Some(step) = step {
            super::fault::crash_at(&step);
        }
        Ok(())
    }

    /// Every pair's part of `operation` is done: stores what ends it
    /// (`group_steps::finished`).
    fn finish_operation(
        &self,
        group: &GroupRecord,
        operation: &GroupOperation,
    ) -> Result<(), ApiError> {
        let mut state = self.lock();
        let changes = group_steps::finished(operation, group, &state, now_millis(), &now_text());
        self.commit_into(&mut state, &changes)?;
        for change in &changes {
            if let Change::PutPair(p) = change {
                state.group_step_sent.remove(&p.id);
            }
        }
        state.group_stuck_since.remove(&group.id);
        state.draining_since.remove(&group.id);
        state.fences_sent.remove(&group.id);
        tracing::info!(group = %group.id, done = %operation.describe(), "group operation done");
        self.kick.notify_one();
        Ok(())
    }

    /// The operation's plan moved this round: its give-up counts from now.
    fn moved_on(&self, group: &GroupRecord) {
        self.lock().group_stuck_since.remove(&group.id);
    }

    /// Some agents did not take their step: try again on the next round, unless the refusal
    /// is final or the operation made no progress for [`AGENT_GIVE_UP`]; then the operation
    /// fails, its plan kept (a retry carries on from it).
    fn operation_failed(
        &self,
        group: &GroupRecord,
        failed: Vec<(PairId, ApiError)>,
        failed_status: GroupStatus,
    ) -> Result<(), ApiError> {
        let Some((pair, error)) = failed.into_iter().next() else {
            return Ok(());
        };
        let since = *self
            .lock()
            .group_stuck_since
            .entry(group.id)
            .or_insert_with(|| self.now());
        if !group_steps::is_final(&error) && self.since(since) < AGENT_GIVE_UP {
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

    /// Ends the group's job with `outcome` and leaves the group in `status`
    /// (`group_steps::ended`).
    fn end_operation(
        &self,
        group: &GroupRecord,
        status: GroupStatus,
        outcome: Result<(), String>,
    ) -> Result<(), ApiError> {
        let mut state = self.lock();
        let Some(current) = state.groups.get(&group.id).cloned() else {
            return Ok(());
        };
        let changes = group_steps::ended(&current, &state, status, outcome.clone(), &now_text());
        self.commit_into(&mut state, &changes)?;
        tracing::warn!(group = %group.id, %status, outcome = ?outcome, "group operation ended");
        state.draining_since.remove(&group.id);
        state.group_stuck_since.remove(&group.id);
        state.fences_sent.remove(&group.id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::testing::*;

    fn extend(size: u64) -> proto::ExtendGroupRequest {
        proto::ExtendGroupRequest {
            group: "g".into(),
            pair: "a".into(),
            size_bytes: size,
        }
    }

    /// The pair's record changes while its volumes grow (a verify begins): the extend
    /// records the new size onto the record as it is then, not over it.
    #[tokio::test]
    async fn an_extend_keeps_what_changed_on_the_pair_while_its_volumes_grew() {
        let (h, _, a, b) = seeded_group_of_two();
        h.production_reports(&[&a, &b]);
        h.dr_reports(&[&a, &b], true, 7);
        let release = Arc::new(tokio::sync::Notify::new());
        h.agents.script(
            "Extend",
            Some("n1"),
            Answer::Wait(Arc::clone(&release)),
            Some(1),
        );
        h.coordinator.extend_group(extend(2 * SIZE)).unwrap();
        let coordinator = Arc::clone(&h.coordinator);
        let driving = tokio::spawn(async move { coordinator.drive_operations().await });
        // The production agent is asked (the DR volume grew first); it answers once let go.
        for _ in 0..10_000 {
            if h.agents.calls_of("Extend").len() == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(h.agents.calls_of("Extend").len(), 2, "{:?}", h.agents.log());
        let verify = h.coordinator.verify_pair("a", false).unwrap();
        let job: JobId = verify.job.unwrap().id.parse().unwrap();
        release.notify_one();
        driving.await.unwrap();
        let stored = h.stored_pair(a.id).unwrap();
        assert_eq!(stored.size, 2 * SIZE);
        assert_eq!(
            (stored.job, stored.pending),
            (Some(job), Some(PendingStep::Verify { repair: false })),
            "the verify begun meanwhile is kept"
        );
        assert_eq!(h.pair(a.id), stored, "in memory as in the store");
    }

    #[test]
    fn an_operation_on_a_busy_group_is_refused_and_nothing_is_stored() {
        let (mut group, a, b) = group_of_two();
        // A stop under way: the production sides still report the pairs active.
        let job = running_job(JobType::StopGroup, None, Some(group.id));
        group.job = Some(job.id);
        let h = Harness::seeded(&[
            Change::PutGroup(group.clone()),
            Change::PutPair(a.clone()),
            Change::PutPair(b.clone()),
            Change::PutJob(job.clone()),
        ]);
        h.production_reports(&[&a, &b]);
        h.dr_reports(&[&a, &b], true, 7);
        let commits = h.store.commits();
        let busy = format!("group g is busy with job {}", job.id);
        h.assert_refused(h.coordinator.failover_group("g"), 409, &busy, commits);
        h.assert_refused(h.coordinator.reverse_group("g"), 409, &busy, commits);
        h.assert_refused(h.coordinator.reprotect_group("g"), 409, &busy, commits);
        h.assert_refused(
            h.coordinator.extend_group(extend(2 * SIZE)),
            409,
            &busy,
            commits,
        );
        assert_eq!(h.stored_group(group.id), Some(group));
        assert_eq!(h.stored_pair(a.id), Some(a));
        assert_eq!(h.stored().jobs, vec![job]);
    }

    #[test]
    fn group_operations_are_refused_in_the_wrong_status() {
        let (mut group, a, b) = group_of_two();
        group.status = GroupStatus::Failovered;
        let h = Harness::seeded(&[
            Change::PutGroup(group.clone()),
            Change::PutPair(a.clone()),
            Change::PutPair(b.clone()),
        ]);
        h.dr_reports(&[&a, &b], true, 7);
        let commits = h.store.commits();
        for (result, words) in [
            (
                h.coordinator.failover_group("g"),
                "failover refused: the group must be available (or a failover failed)",
            ),
            (
                h.coordinator.reverse_group("g"),
                "reverse refused: the group must be available (or a reverse failed)",
            ),
            (
                h.coordinator.extend_group(extend(2 * SIZE)),
                "extend refused: the group must be available",
            ),
        ] {
            h.assert_refused(result, 409, words, commits);
        }

        // Available: no reprotect without a failover; no reverse unless it replicates.
        let mut available = group.clone();
        available.status = GroupStatus::Available;
        h.coordinator.lock().groups.insert(group.id, available);
        h.assert_refused(
            h.coordinator.reprotect_group("g"),
            409,
            "reprotect only follows a failover",
            commits,
        );
        h.assert_refused(
            h.coordinator.reverse_group("g"),
            409,
            "a planned reverse needs the group replicating (active)",
            commits,
        );
        // Extend's own rules come first.
        h.assert_refused(
            h.coordinator.extend_group(extend(SIZE)),
            400,
            "never shrink",
            commits,
        );
        h.assert_refused(
            h.coordinator.extend_group(extend(SIZE + 512)),
            400,
            "multiple of 4096",
            commits,
        );
        assert_eq!(h.stored_group(group.id), Some(group));
    }

    #[test]
    fn failover_needs_every_dr_agent_and_a_consistent_point() {
        let (h, group, a, b) = seeded_group_of_two();
        let commits = 1;
        h.assert_refused(
            h.coordinator.failover_group("g"),
            409,
            "DR node n2 of pair a is not reachable",
            commits,
        );
        h.dr_reports(&[&a, &b], true, 0);
        let commits = commits + 2;
        h.assert_refused(
            h.coordinator.failover_group("g"),
            409,
            "has no consistent point yet",
            commits,
        );
        // One DR agent applies by the group's commits, the other does not yet.
        h.dr_reports(&[&a], true, 7);
        h.dr_reports(&[&b], false, 0);
        h.assert_refused(
            h.coordinator.failover_group("g"),
            409,
            "are still joining it",
            commits,
        );
        // A DR agent down is not waited for.
        h.dr_reports(&[&b], true, 7);
        h.heard_from("n4", NODE_TIMEOUT);
        h.assert_refused(
            h.coordinator.failover_group("g"),
            409,
            "DR node n4 of pair b is not reachable",
            commits,
        );
        assert_eq!(h.stored_group(group.id), Some(group.clone()));

        h.dr_reports(&[&b], true, 7);
        let started = h.coordinator.failover_group("g").unwrap();
        assert_eq!(started.group.unwrap().status, "failovering");
        let stored = h.stored_group(group.id).unwrap();
        assert_eq!(stored.status, GroupStatus::Failovering);
        let Some(GroupOperation::Failover(plan)) = &stored.operation else {
            panic!("{:?}", stored.operation);
        };
        assert_eq!(plan.commit, Some(Epoch(7)));
        assert_eq!(plan.term, 1);
        assert_eq!(plan.pairs.keys().copied().collect::<Vec<_>>(), {
            let mut ids = vec![a.id, b.id];
            ids.sort();
            ids
        });
        assert!(plan.pairs.values().all(|s| s.done.is_none()));
        let job = h.stored_job(stored.job.unwrap()).unwrap();
        assert_eq!(
            (job.job_type, job.status),
            (JobType::FailoverGroup, JobStatus::Running)
        );
        assert!(h.agents.calls().is_empty(), "the driver takes the steps");
    }

    /// An update while an extend runs would take the job's place in the group's record (the
    /// extend's job left running for good) or remove the pair being grown.
    #[test]
    fn an_update_of_a_group_busy_with_an_extend_is_refused_and_nothing_is_stored() {
        let (h, group, a, b) = seeded_group_of_two();
        h.production_reports(&[&a, &b]);
        h.dr_reports(&[&a, &b], true, 7);
        let mut stopped = group.clone();
        stopped.stopped = true;
        h.coordinator.commit(&[Change::PutGroup(stopped)]).unwrap();
        h.coordinator
            .lock()
            .groups
            .get_mut(&group.id)
            .unwrap()
            .stopped = true;
        let job = job_of(h.coordinator.extend_group(extend(2 * SIZE)).unwrap().job);
        let before = h.stored_group(group.id).unwrap();
        let commits = h.store.commits();
        let update = proto::UpdateGroupRequest {
            group: "g".into(),
            remove_pairs: vec!["a".into()],
            ..Default::default()
        };
        h.assert_refused(
            h.coordinator.update_group(update),
            409,
            &format!("group g is busy with job {job}"),
            commits,
        );
        assert_eq!(h.stored_group(group.id), Some(before));
        assert_eq!(h.stored_pair(a.id).unwrap().group, Some(group.id));
    }
}
