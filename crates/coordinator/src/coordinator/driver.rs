//! The driver: a loop that moves pairs through their lifecycle (creation, the pending step of
//! a resolve or a verify, deletion), follows their jobs, and runs the groups' work (sync and
//! stop, operations); a step an agent does not take is retried until [`AGENT_GIVE_UP`], then
//! the operation fails. Also how the coordinator calls an agent.

use super::pair_steps::{self, Done, still_current};
use super::*;

impl Coordinator {
    /// Moves pairs through their lifecycle; runs until the daemon stops.
    pub async fn drive(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.kick.notified() => {}
            }
            let pending: Vec<PairRecord> = self
                .lock()
                .pairs
                .values()
                .filter(|p| {
                    matches!(p.status, PairStatus::Creating | PairStatus::Deleting)
                        || p.job.is_some()
                        || p.pending.is_some()
                })
                .cloned()
                .collect();
            for pair in pending {
                if let Err(e) = self.drive_pair(pair).await {
                    tracing::error!(error = %e, "coordinator driver");
                }
            }
            self.drive_groups().await;
            self.drive_operations().await;
            self.drive_membership_changes().await;
        }
    }

    /// One round of a pair's lifecycle: its next step (`pair_steps`), whose calls are made
    /// in order, and what the step records, onto the record as it is then; or, with no
    /// step, its job followed.
    async fn drive_pair(&self, pair: PairRecord) -> Result<(), ApiError> {
        let (production, dr) = self.addresses(&pair);
        let step = match pair_steps::next_step(&pair, production, dr) {
            None => return self.follow_job(&pair),
            Some(Err(reason)) => return self.stuck(&pair, reason),
            Some(Ok(step)) => step,
        };
        for call in step.calls {
            if let Err(e) = self
                .call_agent(&call.node, call.address, call.request)
                .await
            {
                return self.stuck(&pair, &e.to_string());
            }
        }
        let mut state = self.lock();
        // The record may have changed while the agents answered: the step is done only on
        // the record it was taken for.
        let Some(record) = still_current(&state, &pair) else {
            return Ok(());
        };
        let job = record.job.and_then(|j| state.jobs.get(&j)).cloned();
        let changes = pair_steps::step_taken(record, job, step.done, &now_text())?;
        self.commit_into(&mut state, &changes)?;
        state.stuck_since.remove(&pair.id);
        let now = self.now();
        match step.done {
            Done::PendingTold => {
                state.step_taken.insert(pair.id, now);
            }
            Done::Deleted => {
                state.step_taken.remove(&pair.id);
                state
                    .deleted
                    .retain(|_, at| now.saturating_duration_since(*at) < Duration::from_secs(60));
                state.deleted.insert(pair.id, now);
                tracing::info!(pair = %pair.id, "pair deleted");
            }
            Done::DrStarted | Done::ProductionStarted => {}
        }
        Ok(())
    }

    /// Where the pair's production and DR agents are, if they registered.
    fn addresses(&self, pair: &PairRecord) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let state = self.lock();
        let address = |node: &str| state.nodes.get(node).map(|n| n.record.address);
        (address(&pair.production_node), address(&pair.dr_node))
    }

    /// A step was not taken: try again next round, and after [`AGENT_GIVE_UP`] fail the
    /// operation (`pair_steps::give_up`).
    fn stuck(&self, pair: &PairRecord, reason: &str) -> Result<(), ApiError> {
        let mut state = self.lock();
        // Changed meanwhile: the driver's next round looks at it again.
        let Some(current) = still_current(&state, pair) else {
            return Ok(());
        };
        let now = self.now();
        let since = *state.stuck_since.entry(pair.id).or_insert(now);
        if now.saturating_duration_since(since) < AGENT_GIVE_UP {
            tracing::debug!(pair = %pair.id, %reason, "pair step pending; retrying");
            return Ok(());
        }
        let job = current.job.and_then(|j| state.jobs.get(&j)).cloned();
        let changes = pair_steps::give_up(current, job, reason, &now_text())?;
        self.commit_into(&mut state, &changes)?;
        tracing::error!(pair = %pair.id, %reason, "pair operation failed");
        state.stuck_since.remove(&pair.id);
        Ok(())
    }

    // ---- calling agents ----

    /// A command to an agent, carrying this coordinator's term.
    pub(super) fn command(&self, request: Request) -> ClusterRequest {
        ClusterRequest {
            request: Some(request),
            scope: None,
            leader_term: self.term,
        }
    }

    pub(super) async fn call_agent(
        &self,
        node: &str,
        address: SocketAddr,
        request: Request,
    ) -> Result<(), ApiError> {
        let response = self
            .agents
            .call(node, address, self.command(request))
            .await?;
        Self::answer_of(node, response)
    }

    /// What an agent's answer says: done, or refused and why.
    pub(super) fn answer_of(node: &str, response: ClusterResponse) -> Result<(), ApiError> {
        match response.response {
            Some(Response::Done(_)) => Ok(()),
            Some(Response::Error(e)) => Err(e.into()),
            _ => Err(ApiError::Internal(format!(
                "node {node} answered with something unexpected"
            ))),
        }
    }

    /// Calls `node` (by its registered address) and returns its answer.
    pub(super) fn ask_agent(
        &self,
        node: &str,
        request: Request,
    ) -> BoxFuture<'static, Result<Response, ApiError>> {
        let address = self.lock().nodes.get(node).map(|n| n.record.address);
        let agents = Arc::clone(&self.agents);
        let node = node.to_owned();
        let request = self.command(request);
        Box::pin(async move {
            let address = address
                .ok_or_else(|| ApiError::Unavailable(format!("node {node} is not registered")))?;
            let answer = agents.call(&node, address, request).await?;
            match answer.response {
                Some(Response::Error(e)) => Err(e.into()),
                Some(response) => Ok(response),
                None => Err(ApiError::Internal(format!("node {node} answered nothing"))),
            }
        })
    }

    /// Sends `request` to `node` without waiting for more than `wait` (or at all).
    pub(super) fn fire_and_forget(&self, node: &str, request: Request, wait: Duration) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::testing::*;

    /// One driver step for the pair, as a round of [`Coordinator::drive`] takes it.
    async fn drive(h: &Harness, pair: PairId) {
        h.coordinator.drive_pair(h.pair(pair)).await.unwrap();
    }

    /// With the store refusing commits, a driver step fails and leaves the pair deleting
    /// and its job running, in memory as in the store.
    async fn a_refused_commit_changes_nothing(h: &Harness, pair: PairId, job: JobId) {
        h.store.refuse_commits(true);
        let refused = h.coordinator.drive_pair(h.pair(pair)).await;
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(h.stored_job(job).unwrap().status, JobStatus::Running);
        assert_eq!(
            h.coordinator.lock().jobs[&job].status,
            JobStatus::Running,
            "in memory as in the store"
        );
        assert_eq!(h.pair(pair).status, PairStatus::Deleting);
    }

    /// A pair being deleted whose DR agent does not answer, and the delete's job.
    fn deleting_with_its_dr_agent_away() -> (Harness, PairRecord, JobId) {
        let pair = pair_record("web", ("n1", 1), ("n2", 2));
        let h = Harness::seeded(&[Change::PutPair(pair.clone())]);
        two_nodes(&h);
        h.agents
            .script("LeavePair", Some("n2"), Answer::Unreachable, None);
        let job = job_of(h.coordinator.delete_pair("web").unwrap().job);
        (h, pair, job)
    }

    fn two_nodes(h: &Harness) {
        h.report("n1", "az1", vec![volume(1, "p1", SIZE)], vec![]);
        h.report("n2", "az2", vec![volume(2, "d1", SIZE)], vec![]);
    }

    /// A pair "web" (n1 → n2, both registered) whose verify job runs and whose agents are
    /// still to be told of it.
    fn a_verify_to_tell() -> (Harness, PairRecord, JobRecord) {
        let mut pair = pair_record("web", ("n1", 1), ("n2", 2));
        let job = running_job(JobType::VerifyPair, Some(pair.id), None);
        pair.job = Some(job.id);
        pair.pending = Some(PendingStep::Verify { repair: false });
        let h = Harness::seeded(&[Change::PutPair(pair.clone()), Change::PutJob(job.clone())]);
        two_nodes(&h);
        (h, pair, job)
    }

    /// The driver takes a step from its copy of the record, and the record may change while
    /// it waits for the agent: what it writes back must not undo that change.
    #[tokio::test]
    async fn a_step_taken_while_the_record_changed_does_not_write_the_old_record_back() {
        let (h, pair, _) = a_verify_to_tell();
        let seen = h.pair(pair.id);
        // Meanwhile the pair went to error, its job ended.
        let mut changed = seen.clone();
        changed.status = PairStatus::Error;
        changed.job = None;
        changed.pending = None;
        h.store.commit(&[Change::PutPair(changed.clone())]).unwrap();
        h.coordinator.lock().pairs.insert(pair.id, changed);

        h.coordinator.drive_pair(seen).await.unwrap();
        assert_eq!(h.agents.log(), ["n1:Verify"]);
        let stored = h.stored_pair(pair.id).unwrap();
        assert_eq!((stored.status, stored.job), (PairStatus::Error, None));
        assert_eq!(h.pair(pair.id).status, PairStatus::Error);
    }

    /// The same for a creation's step: a pair put in error while its DR agent answered
    /// stays in error.
    #[tokio::test]
    async fn a_creation_step_taken_while_the_record_changed_does_not_write_it_back() {
        let mut pair = pair_record("web", ("n1", 1), ("n2", 2));
        pair.status = PairStatus::Creating;
        pair.dr_started = false;
        pair.production_started = false;
        let h = Harness::seeded(&[Change::PutPair(pair.clone())]);
        two_nodes(&h);
        let seen = h.pair(pair.id);
        let mut changed = seen.clone();
        changed.status = PairStatus::Error;
        h.store.commit(&[Change::PutPair(changed.clone())]).unwrap();
        h.coordinator.lock().pairs.insert(pair.id, changed);

        h.coordinator.drive_pair(seen).await.unwrap();
        assert_eq!(h.agents.log(), ["n2:BecomeDr"]);
        let stored = h.stored_pair(pair.id).unwrap();
        assert_eq!(
            (stored.status, stored.dr_started),
            (PairStatus::Error, false)
        );
    }

    #[tokio::test]
    async fn a_creation_its_dr_agent_did_not_answer_is_finished_by_the_driver() {
        let h = Harness::new();
        two_nodes(&h);
        h.agents.once("BecomeDr", Answer::Unreachable);
        let created = h
            .coordinator
            .create_pair(proto::CreatePairRequest {
                name: "web".into(),
                volumes: vec!["p1".into(), "d1".into()],
                priority_station: "az1".into(),
                replication_model: "async".into(),
                ..Default::default()
            })
            .await
            .expect("no answer is not a refusal");
        let id: PairId = created.pair.unwrap().id.parse().unwrap();
        let job: JobId = created.job.unwrap().id.parse().unwrap();
        let stored = h.stored_pair(id).unwrap();
        assert!(!stored.dr_started, "the DR agent's step is not recorded");
        assert_eq!(stored.status, PairStatus::Creating);

        drive(&h, id).await;
        assert!(h.stored_pair(id).unwrap().dr_started);
        drive(&h, id).await;
        let stored = h.stored_pair(id).unwrap();
        assert!(stored.production_started);
        assert_eq!(stored.status, PairStatus::Available);
        assert_eq!(
            h.agents.log(),
            ["n2:BecomeDr", "n2:BecomeDr", "n1:BecomeProduction"]
        );
        let Request::BecomeProduction(assignment) = &h.agents.calls()[2].request else {
            panic!("{:?}", h.agents.log());
        };
        assert_eq!(assignment.side, "production");
        assert_eq!(assignment.local_volume_id, volume_id(1).to_string());
        assert_eq!(assignment.peer_address, address("n2").to_string());

        // The job runs until production reports the pair active.
        drive(&h, id).await;
        assert_eq!(h.stored_job(job).unwrap().status, JobStatus::Running);
        h.report(
            "n1",
            "az1",
            vec![],
            vec![pair_state(&stored, "production", ReplicationStatus::Active)],
        );
        drive(&h, id).await;
        let ended = h.stored_job(job).unwrap();
        assert_eq!(ended.status, JobStatus::Success);
        assert_eq!(ended.progress, 1.0);
        assert_eq!(h.stored_pair(id).unwrap().job, None);
        assert_eq!(h.agents.calls().len(), 3, "following a job calls no agent");
    }

    #[tokio::test]
    async fn a_deleted_pair_leaves_both_agents_then_the_store() {
        let pair = pair_record("web", ("n1", 1), ("n2", 2));
        let h = Harness::seeded(&[Change::PutPair(pair.clone())]);
        two_nodes(&h);
        let job = job_of(h.coordinator.delete_pair("web").unwrap().job);
        drive(&h, pair.id).await;
        assert_eq!(h.agents.log(), ["n1:LeavePair", "n2:LeavePair"]);
        let Request::LeavePair(leave) = &h.agents.calls()[1].request else {
            unreachable!()
        };
        assert_eq!(
            (leave.side.as_str(), leave.local_volume_id.clone()),
            ("dr", volume_id(2).to_string())
        );
        assert_eq!(h.stored_pair(pair.id), None);
        assert_eq!(h.stored_job(job).unwrap().status, JobStatus::Success);
        assert!(h.coordinator.list_pairs().is_empty());
        // Its volumes may be paired again though their agents still name it for a while.
        assert!(h.coordinator.lock().deleted.contains_key(&pair.id));
    }

    /// A step whose record the store does not take changes nothing in memory either: the
    /// coordinator never shows what a restart would not find.
    #[tokio::test]
    async fn a_delete_whose_end_is_not_stored_leaves_its_job_running_in_memory_too() {
        let pair = pair_record("web", ("n1", 1), ("n2", 2));
        let h = Harness::seeded(&[Change::PutPair(pair.clone())]);
        two_nodes(&h);
        let job = job_of(h.coordinator.delete_pair("web").unwrap().job);
        a_refused_commit_changes_nothing(&h, pair.id, job).await;
        // Once the store takes it, the next round ends the delete.
        h.store.refuse_commits(false);
        drive(&h, pair.id).await;
        assert_eq!(h.stored_job(job).unwrap().status, JobStatus::Success);
        assert_eq!(h.stored_pair(pair.id), None);
    }

    #[tokio::test]
    async fn a_give_up_that_is_not_stored_leaves_its_job_running_in_memory_too() {
        let (h, pair, job) = deleting_with_its_dr_agent_away();
        drive(&h, pair.id).await;
        h.clock.advance(AGENT_GIVE_UP);
        a_refused_commit_changes_nothing(&h, pair.id, job).await;
    }

    /// A verify whose agent stays away fails after the give-up, and then it is over: the
    /// agent that comes back is not told to start a verify whose job already failed.
    #[tokio::test]
    async fn a_pending_step_given_up_is_not_sent_later() {
        let (h, pair, job) = a_verify_to_tell();
        h.agents
            .script("Verify", Some("n1"), Answer::Unreachable, Some(2));
        drive(&h, pair.id).await;
        h.clock.advance(AGENT_GIVE_UP);
        drive(&h, pair.id).await;
        let stored = h.stored_pair(pair.id).unwrap();
        assert_eq!((stored.status, stored.job), (PairStatus::Error, None));
        assert_eq!(h.stored_job(job.id).unwrap().status, JobStatus::Fail);
        // The agent answers again: nothing is sent for the failed job.
        drive(&h, pair.id).await;
        assert_eq!(h.agents.calls_of("Verify").len(), 2, "{:?}", h.agents.log());
        assert_eq!(h.stored_pair(pair.id).unwrap().pending, None);
    }

    #[tokio::test]
    async fn a_step_no_agent_takes_fails_the_operation_after_agent_give_up() {
        let (h, pair, job) = deleting_with_its_dr_agent_away();
        let commits = h.store.commits();
        drive(&h, pair.id).await;
        drive(&h, pair.id).await;
        assert_eq!(h.store.commits(), commits, "retried, nothing recorded");
        assert_eq!(h.pair(pair.id).status, PairStatus::Deleting);
        assert_eq!(h.stored_job(job).unwrap().status, JobStatus::Running);

        // Just before the give-up, the driver still retries; at it, the delete fails.
        h.clock.advance(AGENT_GIVE_UP - Duration::from_secs(1));
        drive(&h, pair.id).await;
        assert_eq!(h.pair(pair.id).status, PairStatus::Deleting);
        h.clock.advance(Duration::from_secs(1));
        drive(&h, pair.id).await;
        let stored = h.stored_pair(pair.id).unwrap();
        assert_eq!(stored.status, PairStatus::ErrorDeleting);
        assert_eq!(stored.job, None);
        let detail = stored.failure_detail.unwrap();
        assert!(detail.contains("node n2 does not answer"), "{detail}");
        let failed = h.stored_job(job).unwrap();
        assert_eq!(failed.status, JobStatus::Fail);
        assert_eq!(failed.fail_reason.as_deref(), Some(detail.as_str()));
        assert_eq!(
            h.agents.log(),
            [
                "n1:LeavePair",
                "n2:LeavePair",
                "n1:LeavePair",
                "n2:LeavePair",
                "n1:LeavePair",
                "n2:LeavePair",
                "n1:LeavePair",
                "n2:LeavePair"
            ]
        );
        // A pair whose delete failed may be deleted again.
        assert!(h.coordinator.delete_pair("web").is_ok());
    }

    #[tokio::test]
    async fn a_resolve_keeping_the_dr_side_switches_the_old_production_side_first() {
        let pair = pair_record("web", ("n1", 1), ("n2", 2));
        let h = Harness::seeded(&[Change::PutPair(pair.clone())]);
        let mut diverged = pair_state(&pair, "dr", ReplicationStatus::Error);
        diverged.needs_resolve = true;
        h.report(
            "n1",
            "az1",
            vec![],
            vec![pair_state(&pair, "production", ReplicationStatus::Error)],
        );
        h.report("n2", "az2", vec![], vec![diverged]);
        let answer = h.coordinator.resolve_pair("web", "az2").unwrap();
        let view = answer.pair.unwrap();
        assert_eq!(
            (view.production_node.as_str(), view.dr_node.as_str()),
            ("n2", "n1")
        );
        assert_eq!(
            h.stored_pair(pair.id).unwrap().pending,
            Some(PendingStep::SwitchSides)
        );

        drive(&h, pair.id).await;
        assert_eq!(h.agents.log(), ["n1:SwitchSide", "n2:SwitchSide"]);
        let calls = h.agents.calls();
        let (Request::SwitchSide(down), Request::SwitchSide(up)) =
            (&calls[0].request, &calls[1].request)
        else {
            unreachable!()
        };
        assert_eq!((down.side.as_str(), down.discard_peer), ("dr", false));
        assert_eq!(down.local_volume_id, volume_id(1).to_string());
        assert_eq!((up.side.as_str(), up.discard_peer), ("production", true));
        assert_eq!(up.local_volume_id, volume_id(2).to_string());
        let stored = h.stored_pair(pair.id).unwrap();
        assert_eq!(stored.pending, None);
        assert_eq!(stored.priority_station, "az2");
        assert!(stored.job.is_some(), "the job follows the copy");
    }
}
