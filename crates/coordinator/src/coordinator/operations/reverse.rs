//! A group reverse's steps: fence and drain production until every DR side holds every
//! write, then swap each pair's sides; and the records' role change a reverse and a
//! reprotect end with.

use super::*;
use crate::coordinator::pair_steps::{self, Side};

/// How long a reverse waits for the DR side to hold every write before it gives up (and
/// production takes writes again).
const DRAIN_GIVE_UP_MS: u64 = 60_000;

impl Coordinator {
    pub(super) async fn drive_reverse(
        &self,
        group: GroupRecord,
        plan: ReversePlan,
    ) -> Result<(), ApiError> {
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
        if self.drained_for(&group, &plan) < Duration::from_millis(DRAIN_GIVE_UP_MS) {
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

    /// How long the reverse has been draining, by the coordinator's clock. A coordinator
    /// that restarted mid-drain starts from the recorded wall-clock start (as far back as
    /// the clock reaches), then counts on its own clock.
    fn drained_for(&self, group: &GroupRecord, plan: &ReversePlan) -> Duration {
        let now = self.now();
        let mut state = self.lock();
        let since = match state.draining_since.get(&group.id) {
            Some(&(term, since)) if term == plan.term => since,
            _ => {
                let recorded = Duration::from_millis(
                    now_millis()
                        .saturating_sub(plan.draining_since_ms)
                        .min(DRAIN_GIVE_UP_MS),
                );
                let since = now.checked_sub(recorded).unwrap_or(now);
                state.draining_since.insert(group.id, (plan.term, since));
                since
            }
        };
        now.saturating_duration_since(since)
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

    /// The roles changed on every agent: the records follow (swapped for a reverse), the
    /// group is available and replicates; its job ends once every pair is active.
    pub(super) fn finish_role_change(
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
        changes.push(Change::PutGroup(updated));
        self.commit_into(&mut state, &changes)?;
        for change in &changes {
            if let Change::PutPair(p) = change {
                state.group_step_sent.remove(&p.id);
            }
        }
        state.group_stuck_since.remove(&group.id);
        state.draining_since.remove(&group.id);
        self.kick.notify_one();
        Ok(())
    }

    /// What a switch of sides tells the agent of `side` in `pair` (as the record will be
    /// once the switch is done).
    pub(super) fn switch_assignment(
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
            ..pair_steps::assignment(pair, side, peer_address)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::testing::*;

    /// A reverse whose DR side does not catch up gives up after `DRAIN_GIVE_UP_MS` on the
    /// coordinator's clock, not before, and takes the fence down.
    #[tokio::test]
    async fn a_reverse_that_does_not_drain_gives_up_on_the_coordinators_clock() {
        let (h, group, a, b) = seeded_group_of_two();
        h.production_reports(&[&a, &b]);
        h.dr_reports(&[&a, &b], true, 7);
        h.coordinator.reverse_group("g").unwrap();
        h.coordinator.drive_operations().await;
        h.clock
            .advance(Duration::from_millis(DRAIN_GIVE_UP_MS) - Duration::from_secs(1));
        h.coordinator.drive_operations().await;
        assert_eq!(
            h.stored_group(group.id).unwrap().status,
            GroupStatus::Reversing,
            "still draining"
        );
        h.clock.advance(Duration::from_secs(1));
        h.coordinator.drive_operations().await;
        let stored = h.stored_group(group.id).unwrap();
        assert_eq!(stored.status, GroupStatus::ErrorReversing);
        let detail = stored.failure_detail.unwrap();
        assert!(detail.contains("did not catch up"), "{detail}");
        let unfenced = h
            .agents
            .calls_of("Fence")
            .into_iter()
            .filter(|c| matches!(&c.request, Request::Fence(f) if f.fence.is_empty()))
            .count();
        assert_eq!(unfenced, 2, "{:?}", h.agents.log());
    }
}
