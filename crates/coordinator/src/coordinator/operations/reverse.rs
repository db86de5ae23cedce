//! A group reverse's drain: the production sides are fenced (draining) until every DR side
//! holds every write; then the plan moves on to swapping the sides (the planner's calls,
//! pair by pair), or, after [`DRAIN_GIVE_UP_MS`], the fences come down and the reverse
//! fails with nothing swapped.

use super::*;

/// How long a reverse waits for the DR side to hold every write before it gives up (and
/// production takes writes again).
const DRAIN_GIVE_UP_MS: u64 = 60_000;

impl Coordinator {
    /// Fences every production side (draining) until each says so, then waits until every
    /// DR side holds every write admitted before its fence (`group_steps::drain`).
    pub(super) async fn drive_drain(
        &self,
        group: GroupRecord,
        mut plan: ReversePlan,
    ) -> Result<(), ApiError> {
        let (members, drain) = {
            let state = self.lock();
            let members = Self::members(&state, &group);
            let drain = group_steps::drain(&plan, &members, &state);
            (members, drain)
        };
        let mut failed = Vec::new();
        for fence in drain.fence {
            if let Err(e) = self.ask_agent(&fence.node, fence.request).await {
                failed.push((fence.pair, e));
            }
        }
        if drain.waiting.is_empty() {
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
        } else if let Some(waiting) = drain.waiting.first() {
            reason.push_str(&format!(" ({waiting})"));
        }
        // Taking the fence down lets production take writes: only while this coordinator
        // still leads (a leader deposed while it waited sends nothing).
        self.store.check_leading().map_err(store_error)?;
        for unfence in group_steps::unfences(&plan, &members) {
            if let Err(e) = self.ask_agent(&unfence.node, unfence.request).await {
                tracing::warn!(pair = %unfence.pair, error = %e, "cannot take the reverse's fence down");
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

    /// Taking the fence down lets production take writes: a coordinator that no longer
    /// leads (deposed while the drain waited) does not, and records nothing.
    #[tokio::test]
    async fn a_reverse_given_up_by_a_deposed_leader_takes_no_fence_down() {
        let (h, group, a, b) = seeded_group_of_two();
        h.production_reports(&[&a, &b]);
        h.dr_reports(&[&a, &b], true, 7);
        h.coordinator.reverse_group("g").unwrap();
        h.coordinator.drive_operations().await;
        h.store.depose(true);
        h.clock.advance(Duration::from_millis(DRAIN_GIVE_UP_MS));
        h.coordinator.drive_operations().await;
        let unfenced = h
            .agents
            .calls_of("Fence")
            .into_iter()
            .filter(|c| matches!(&c.request, Request::Fence(f) if f.fence.is_empty()))
            .count();
        assert_eq!(unfenced, 0, "{:?}", h.agents.log());
        assert_eq!(
            h.stored_group(group.id).unwrap().status,
            GroupStatus::Reversing
        );
    }
}
