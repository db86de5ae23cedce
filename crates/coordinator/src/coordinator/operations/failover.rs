//! A group failover's steps: fence the production sides that answer, promote every DR side
//! (in parallel) to the plan's commit, then swap the records' sides.

use super::*;

/// How long the coordinator waits for a production agent to take a failover's fence; one
/// that is down is fenced when it comes back.
const FENCE_WAIT: Duration = Duration::from_secs(1);

impl Coordinator {
    pub(super) async fn drive_failover(
        &self,
        group: GroupRecord,
        plan: FailoverPlan,
    ) -> Result<(), ApiError> {
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
            changes.push(Change::PutJob(job));
        }
        self.commit_into(&mut state, &changes)?;
        state.group_stuck_since.remove(&group.id);
        state.fences_sent.remove(&group.id);
        tracing::info!(group = %group.id, %result, "failover done");
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::testing::*;

    fn promoted(epoch: u64) -> Answer {
        Answer::Respond(Box::new(Response::Promoted(proto::Promoted {
            epoch,
            cut_ms: 1_767_225_600_000,
            dropped_bytes: 4096,
        })))
    }

    fn plan_of(h: &Harness, group: &GroupRecord) -> FailoverPlan {
        match h.stored_group(group.id).unwrap().operation {
            Some(GroupOperation::Failover(plan)) => plan,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_failover_promotes_every_dr_side_and_swaps_the_records() {
        let (h, group, a, b) = seeded_group_of_two();
        h.dr_reports(&[&a, &b], true, 7);
        h.agents.always("Promote", promoted(7));
        let job = job_of(h.coordinator.failover_group("g").unwrap().job);
        let plan = plan_of(&h, &group);

        h.coordinator.drive_operations().await;
        let mut promotes = h.agents.calls_of("Promote");
        promotes.sort_by(|x, y| x.node.cmp(&y.node));
        assert_eq!(promotes.len(), 2, "{:?}", h.agents.log());
        for (call, pair) in promotes.iter().zip([&a, &b]) {
            assert_eq!(call.node, pair.dr_node);
            let Request::Promote(promote) = &call.request else {
                unreachable!()
            };
            assert_eq!(promote.pair_id, pair.id.to_string());
            assert_eq!(promote.volume_id, pair.dr_volume.to_string());
            assert_eq!(
                (promote.commit, promote.has_commit, promote.term),
                (7, true, 1)
            );
            assert_eq!(promote.generation, plan.pairs[&pair.id].generation.0);
        }

        let stored = h.stored_group(group.id).unwrap();
        assert_eq!(stored.status, GroupStatus::Failovered);
        assert_eq!((stored.term, stored.stopped), (1, true));
        assert_eq!(stored.operation, None);
        assert_eq!(stored.priority_station, "az2");
        assert_eq!(stored.failed_over_at.map(|p| p.epoch), Some(Epoch(7)));
        for pair in [&a, &b] {
            let swapped = h.stored_pair(pair.id).unwrap();
            assert_eq!(swapped.production_node, pair.dr_node);
            assert_eq!(swapped.dr_node, pair.production_node);
            assert_eq!(swapped.production_volume, pair.dr_volume);
            assert_eq!(swapped.term, 1);
            assert_eq!(swapped.generation, Some(plan.pairs[&pair.id].generation));
        }
        let ended = h.stored_job(job).unwrap();
        assert_eq!(ended.status, JobStatus::Success);
        let result = ended.result.unwrap();
        assert!(result.starts_with("consistent point: epoch 7"), "{result}");

        // A restarted coordinator sees the sides as the failover left them.
        let reopened = h.reopen();
        let view = reopened.coordinator.get_pair("a").unwrap();
        assert_eq!(
            (view.production_node.as_str(), view.dr_node.as_str()),
            ("n2", "n1")
        );
        assert_eq!(
            reopened.coordinator.get_group("g").unwrap().status,
            "failovered"
        );
    }

    #[tokio::test]
    async fn a_refused_promotion_fails_the_failover_and_a_retry_carries_on_from_its_plan() {
        let (h, group, a, b) = seeded_group_of_two();
        h.dr_reports(&[&a, &b], true, 7);
        h.agents.script(
            "Promote",
            Some("n4"),
            Answer::Refuse(409, "volume d is not a DR volume"),
            Some(1),
        );
        h.agents.always("Promote", promoted(7));
        let first = job_of(h.coordinator.failover_group("g").unwrap().job);
        h.coordinator.drive_operations().await;

        let stored = h.stored_group(group.id).unwrap();
        assert_eq!(stored.status, GroupStatus::ErrorFailovering);
        let failed = h.stored_job(first).unwrap();
        assert_eq!(failed.status, JobStatus::Fail);
        let reason = failed.fail_reason.unwrap();
        assert!(
            reason.contains("pair b: volume d is not a DR volume"),
            "{reason}"
        );
        let plan = plan_of(&h, &group);
        assert!(plan.pairs[&a.id].done.is_some(), "a's promotion is kept");
        assert!(plan.pairs[&b.id].done.is_none());
        // Nothing swapped yet.
        assert_eq!(h.stored_pair(a.id).unwrap().production_node, "n1");

        let second = job_of(h.coordinator.failover_group("g").unwrap().job);
        assert_ne!(first, second);
        assert_eq!(plan_of(&h, &group), plan, "the retry keeps the plan");
        h.coordinator.drive_operations().await;
        let nodes: Vec<String> = h
            .agents
            .calls_of("Promote")
            .into_iter()
            .map(|c| c.node)
            .collect();
        assert_eq!(nodes.len(), 3, "{nodes:?}");
        assert_eq!(nodes[2], "n4", "only b is promoted again");
        assert_eq!(
            h.stored_group(group.id).unwrap().status,
            GroupStatus::Failovered
        );
        assert_eq!(h.stored_job(second).unwrap().status, JobStatus::Success);
        assert_eq!(h.stored_pair(b.id).unwrap().production_node, "n4");
    }

    /// An agent that does not answer is retried until [`AGENT_GIVE_UP`] has passed on the
    /// coordinator's clock, not before; then the failover fails, its plan kept.
    #[tokio::test]
    async fn an_unreachable_dr_agent_fails_the_failover_only_after_the_give_up() {
        let (h, group, a, b) = seeded_group_of_two();
        h.dr_reports(&[&a, &b], true, 7);
        h.agents
            .script("Promote", Some("n4"), Answer::Unreachable, None);
        h.agents.always("Promote", promoted(7));
        h.coordinator.failover_group("g").unwrap();

        h.coordinator.drive_operations().await;
        h.clock.advance(AGENT_GIVE_UP - Duration::from_secs(1));
        h.dr_reports(&[&a, &b], true, 7);
        h.coordinator.drive_operations().await;
        assert_eq!(
            h.stored_group(group.id).unwrap().status,
            GroupStatus::Failovering,
            "still retried"
        );
        h.clock.advance(Duration::from_secs(1));
        h.dr_reports(&[&a, &b], true, 7);
        h.coordinator.drive_operations().await;
        let stored = h.stored_group(group.id).unwrap();
        assert_eq!(stored.status, GroupStatus::ErrorFailovering);
        let detail = stored.failure_detail.unwrap();
        assert!(detail.contains("pair b"), "{detail}");
        assert!(plan_of(&h, &group).pairs[&a.id].done.is_some());
        let to_b = h
            .agents
            .calls_of("Promote")
            .iter()
            .filter(|c| c.node == "n4")
            .count();
        assert_eq!(to_b, 3, "one call per round: {:?}", h.agents.log());
    }

    /// An operation's end the store does not take is not in memory either: the group stays
    /// failovering with its job running, and the next round ends it.
    #[tokio::test]
    async fn a_failover_end_that_is_not_stored_changes_nothing_in_memory() {
        let (h, group, a, b) = seeded_group_of_two();
        h.dr_reports(&[&a, &b], true, 7);
        h.agents.always("Promote", promoted(7));
        let job = job_of(h.coordinator.failover_group("g").unwrap().job);
        h.store.refuse_commits(true);
        h.coordinator.drive_operations().await;
        let in_memory = |h: &Harness| {
            let state = h.coordinator.lock();
            (
                state.groups[&group.id].status,
                state.jobs[&job].status,
                state.pairs[&a.id].production_node.clone(),
            )
        };
        assert_eq!(
            in_memory(&h),
            (
                GroupStatus::Failovering,
                JobStatus::Running,
                "n1".to_owned()
            )
        );
        assert_eq!(h.stored_job(job).unwrap().status, JobStatus::Running);
        h.store.refuse_commits(false);
        h.coordinator.drive_operations().await;
        assert_eq!(
            in_memory(&h),
            (GroupStatus::Failovered, JobStatus::Success, "n2".to_owned())
        );
    }
}
