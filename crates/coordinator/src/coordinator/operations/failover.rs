//! A group failover's promotions: the production sides that answer are fenced, every DR
//! side is promoted to the plan's commit, in parallel; the planner (`group_steps`) makes
//! the calls and reads the answers.

use tokio::task::JoinSet;

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
        if self.lock().fences_sent.insert(group.id) {
            for fence in group_steps::failover_fences(&plan, &members) {
                self.fire_and_forget(&fence.node, fence.request, FENCE_WAIT);
            }
        }
        let before = GroupOperation::Failover(plan.clone());
        let mut operation = before.clone();
        let mut failed = Vec::new();
        let mut calls = JoinSet::new();
        for p in &members {
            let next = {
                let state = self.lock();
                group_steps::next_call(&operation, p, &|node| Self::address_of(&state, node))
            };
            match next {
                None => {}
                Some(Err(e)) => failed.push((p.id, e)),
                Some(Ok(call)) => {
                    let answer = self.ask_agent(&call.node, call.request);
                    let (pair, expects) = (call.pair, call.expects);
                    calls.spawn(async move { (pair, expects, answer.await) });
                }
            }
        }
        while let Some(joined) = calls.join_next().await {
            let Ok((pair, expects, answer)) = joined else {
                continue;
            };
            match answer.and_then(|a| group_steps::answered(&mut operation, pair, expects, a)) {
                Ok(None) => {}
                Ok(Some(then)) => failed.push((
                    pair,
                    ApiError::Internal(format!("a promotion asks for more: {then:?}")),
                )),
                Err(e) => failed.push((pair, e)),
            }
        }
        if group_steps::all_done(&operation) {
            return self.finish_operation(&group, &operation);
        }
        if operation != before {
            self.moved_on(&group);
        }
        self.save_plan(&group, operation)?;
        self.operation_failed(&group, failed, GroupStatus::ErrorFailovering)
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
            rolled_back_bytes: 0,
        })))
    }

    /// A failover of [`seeded_group_of_two`] whose DR agent of b (n4) never answers and
    /// whose DR agent of a (n2) misses its first `a_misses` calls; its first round taken.
    async fn failover_with_b_away(
        a_misses: usize,
    ) -> (Harness, GroupRecord, PairRecord, PairRecord) {
        let (h, group, a, b) = seeded_group_of_two();
        h.dr_reports(&[&a, &b], true, 7);
        if a_misses > 0 {
            h.agents
                .script("Promote", Some("n2"), Answer::Unreachable, Some(a_misses));
        }
        h.agents
            .script("Promote", Some("n4"), Answer::Unreachable, None);
        h.agents.always("Promote", promoted(7));
        h.coordinator.failover_group("g").unwrap();
        h.coordinator.drive_operations().await;
        (h, group, a, b)
    }

    /// The coordinator's clock moves on by `by`, both DR agents report again, and the
    /// driver takes a round.
    async fn round_after(h: &Harness, pairs: [&PairRecord; 2], by: Duration) {
        h.clock.advance(by);
        h.dr_reports(&pairs, true, 7);
        h.coordinator.drive_operations().await;
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

    /// Each DR agent holds points 3, 5 and 7.
    fn points_held(h: &Harness) {
        let point = |epoch| proto::GroupPoint {
            epoch,
            cut_ms: epoch * 1000,
            ..Default::default()
        };
        h.agents.always(
            "ListPoints",
            Answer::Respond(Box::new(Response::VolumePoints(proto::VolumePoints {
                pairs: vec![proto::PairPoints {
                    pair_id: String::new(),
                    points: vec![point(3), point(5), point(7)],
                    detail: String::new(),
                }],
            }))),
        );
    }

    fn to_point(point: &str) -> proto::FailoverGroupRequest {
        proto::FailoverGroupRequest {
            group: "g".into(),
            point: point.into(),
        }
    }

    /// A failover to a point is refused, with nothing started, unless every DR agent holds
    /// the point (asked, then held); once they do, each promotion rolls back to it.
    #[tokio::test]
    async fn a_failover_to_a_point_starts_only_once_every_dr_agent_holds_it() {
        let (h, group, a, b) = seeded_group_of_two();
        h.dr_reports(&[&a, &b], true, 7);
        let refused = h
            .coordinator
            .failover_group_to_point(to_point("5"))
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("holds no points"), "{refused}");
        points_held(&h);
        let refused = h
            .coordinator
            .failover_group_to_point(to_point("4"))
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("epoch 4 is not a point"),
            "{refused}"
        );
        h.agents.script(
            "HoldPoint",
            Some("n4"),
            Answer::Refuse(409, "the DR volume of pair b does not hold point 5"),
            Some(1),
        );
        let refused = h
            .coordinator
            .failover_group_to_point(to_point("5"))
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("does not hold point 5"),
            "{refused}"
        );
        assert_eq!(h.stored_group(group.id).unwrap().operation, None);
        assert!(h.agents.calls_of("Promote").is_empty());

        h.agents.always("Promote", promoted(5));
        let job = job_of(
            h.coordinator
                .failover_group_to_point(to_point("1970-01-01T00:00:06Z"))
                .await
                .unwrap()
                .job,
        );
        assert_eq!(plan_of(&h, &group).point, Some(Epoch(5)));
        h.coordinator.drive_operations().await;
        let promotes = h.agents.calls_of("Promote");
        assert_eq!(promotes.len(), 2);
        for call in promotes {
            let Request::Promote(promote) = &call.request else {
                unreachable!()
            };
            assert_eq!((promote.point, promote.has_point), (5, true));
        }
        let result = h.stored_job(job).unwrap().result.unwrap();
        assert!(
            result.starts_with("rolled back to point: epoch 5"),
            "{result}"
        );
    }

    /// A failover to a point that failed part way is carried on by asking for the same
    /// point again: its promoted pairs are not asked to hold the point (they are DR sides
    /// no more), and the retention cannot change meanwhile.
    #[tokio::test]
    async fn a_failover_to_a_point_retried_carries_on_from_its_plan() {
        let (h, group, a, b) = seeded_group_of_two();
        h.dr_reports(&[&a, &b], true, 7);
        points_held(&h);
        h.agents.script(
            "Promote",
            Some("n4"),
            Answer::Refuse(409, "volume d is not a DR volume"),
            Some(1),
        );
        h.agents.always("Promote", promoted(5));
        h.coordinator
            .failover_group_to_point(to_point("5"))
            .await
            .unwrap();
        h.coordinator.drive_operations().await;
        assert_eq!(
            h.stored_group(group.id).unwrap().status,
            GroupStatus::ErrorFailovering
        );
        let retention = h.coordinator.update_group(proto::UpdateGroupRequest {
            group: "g".into(),
            retention: Some(proto::Retention {
                max_age_secs: 60,
                max_bytes: 0,
                keep_hourly: 0,
            }),
            ..Default::default()
        });
        assert!(
            retention.is_err_and(|e| e.to_string().contains("failing over")),
            "the retention changed mid-failover"
        );
        // The promoted pair's agent would refuse to hold the point.
        h.agents.always(
            "HoldPoint",
            Answer::Refuse(409, "this node is not the DR side of pair a"),
        );
        let holds_before = h.agents.calls_of("HoldPoint").len();
        h.coordinator
            .failover_group_to_point(to_point("5"))
            .await
            .unwrap();
        assert_eq!(h.agents.calls_of("HoldPoint").len(), holds_before);
        h.coordinator.drive_operations().await;
        assert_eq!(
            h.stored_group(group.id).unwrap().status,
            GroupStatus::Failovered
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
        let (h, group, a, b) = failover_with_b_away(0).await;
        round_after(&h, [&a, &b], AGENT_GIVE_UP - Duration::from_secs(1)).await;
        assert_eq!(
            h.stored_group(group.id).unwrap().status,
            GroupStatus::Failovering,
            "still retried"
        );
        round_after(&h, [&a, &b], Duration::from_secs(1)).await;
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

    /// The give-up counts from the operation's last progress, not from its first failed
    /// call: a failover whose promotions go on answering is not failed for a silence that
    /// ended long ago.
    #[tokio::test]
    async fn a_failover_that_moves_on_is_given_up_only_after_agent_give_up_without_progress() {
        let (h, group, a, b) = failover_with_b_away(1).await;
        round_after(&h, [&a, &b], AGENT_GIVE_UP - Duration::from_secs(1)).await;
        assert!(
            plan_of(&h, &group).pairs[&a.id].done.is_some(),
            "a moved on"
        );
        round_after(&h, [&a, &b], Duration::from_secs(2)).await;
        assert_eq!(
            h.stored_group(group.id).unwrap().status,
            GroupStatus::Failovering,
            "{} s since the last progress",
            2
        );
        round_after(&h, [&a, &b], AGENT_GIVE_UP).await;
        assert_eq!(
            h.stored_group(group.id).unwrap().status,
            GroupStatus::ErrorFailovering
        );
    }
}
