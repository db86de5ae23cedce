//! Pairs in the coordinator: list, show, delete, resolve and verify, each checked against
//! the pair's status before anything is stored; a pair as the API shows it (its record with
//! what its agents last reported). What an agent is told of its side of a pair is
//! `pair_steps::assignment`. A pair's creation is in [`create`].

use super::jobs::job_view;
use super::pair_steps::{self, Side};
use super::*;
use blockrep_core::replication::check_send_limit;

mod create;
pub(super) use create::{FoundVolume, volume_project};

impl Coordinator {
    pub(super) fn find_pair(state: &State, reference: &str) -> Result<PairId, ApiError> {
        find_by_id_or_name(&state.pairs, reference, "pair", |p| &p.name)
    }

    pub fn list_pairs(&self) -> Vec<proto::Pair> {
        let state = self.lock();
        state
            .pairs
            .values()
            .map(|p| self.pair_view(&state, p))
            .collect()
    }

    pub fn get_pair(&self, reference: &str) -> Result<proto::Pair, ApiError> {
        let state = self.lock();
        let id = Self::find_pair(&state, reference)?;
        Ok(self.pair_view(&state, &state.pairs[&id]))
    }

    /// Changes a pair's settings: its own send limit, which its production agent takes up
    /// with its next heartbeat (within a second).
    pub fn update_pair(&self, req: proto::UpdatePairRequest) -> Result<proto::Pair, ApiError> {
        for text in [&req.name, &req.description].into_iter().flatten() {
            if text.len() > MAX_TEXT_BYTES {
                return Err(ApiError::InvalidArgument(format!(
                    "{} bytes; names and descriptions are at most {MAX_TEXT_BYTES}",
                    text.len()
                )));
            }
        }
        let limit = match req.max_bytes_per_sec {
            Some(0) => Some(None),
            Some(rate) => {
                check_send_limit(rate).map_err(ApiError::InvalidArgument)?;
                Some(Some(rate))
            }
            None => None,
        };
        let mut state = self.lock();
        let id = Self::find_pair(&state, &req.pair)?;
        let mut updated = state.pairs[&id].clone();
        if matches!(
            updated.status,
            PairStatus::Deleting | PairStatus::ErrorDeleting
        ) {
            return Err(ApiError::FailedPrecondition(format!(
                "pair {} is {}; it cannot be changed",
                updated.name, updated.status
            )));
        }
        if let Some(limit) = limit {
            updated.max_bytes_per_sec = limit;
        }
        let in_protection_group = updated
            .group
            .and_then(|g| state.groups.get(&g))
            .is_some_and(|g| g.protection.is_some());
        if in_protection_group {
            if let Some(name) = &req.name {
                super::protection::check_sdrs_name(name)?;
            }
            if let Some(description) = &req.description {
                super::protection::check_sdrs_description(description)?;
            }
        }
        if let Some(name) = req.name {
            updated.name = name;
        }
        if let Some(description) = req.description {
            updated.description = description;
        }
        if updated != state.pairs[&id] {
            updated.updated_at = Some(now_text());
            self.commit_into(&mut state, &[Change::PutPair(updated)])?;
            tracing::info!(pair = %id, max_bytes_per_sec = ?limit.flatten(), "pair updated");
        }
        Ok(self.pair_view(&state, &state.pairs[&id]))
    }

    pub fn delete_pair(&self, reference: &str) -> Result<proto::DeletePairResponse, ApiError> {
        let mut state = self.lock();
        let id = Self::find_pair(&state, reference)?;
        let pair = &state.pairs[&id];
        if let Some(group) = pair.group {
            let name = state
                .groups
                .get(&group)
                .map_or(group.to_string(), |g| g.name.clone());
            return Err(ApiError::FailedPrecondition(format!(
                "pair {} is in consistency group {name}; remove it from the group first (`group update --remove-pairs`)",
                pair.name
            )));
        }
        let (record, job) = Self::deletion(&state, id)?;
        self.commit_into(
            &mut state,
            &[Change::PutPair(record.clone()), Change::PutJob(job.clone())],
        )?;
        state.stuck_since.remove(&id);
        self.kick.notify_one();
        Ok(proto::DeletePairResponse {
            pair: Some(self.pair_view(&state, &record)),
            job: Some(job_view(&job)),
        })
    }

    /// A pair's delete, checked (only an available pair, or one in error, not busy with a
    /// verify or resolve): its record `deleting` with the delete's job, and that job. The
    /// caller stores both (with whatever else changes in the same transaction).
    pub(super) fn deletion(state: &State, id: PairId) -> Result<(PairRecord, JobRecord), ApiError> {
        let pair = &state.pairs[&id];
        if !pair.status.can_become(PairStatus::Deleting) {
            return Err(ApiError::FailedPrecondition(format!(
                "pair {} is {}; only an available pair, or one in error, can be deleted",
                pair.name, pair.status
            )));
        }
        // A verify or resolve under way keeps its job on the pair until it ends (a create
        // job waits for the initial sync; the delete takes its place, as before).
        if let Some(job) = pair.job
            && state.jobs.get(&job).is_some_and(|j| {
                j.status == JobStatus::Running && j.job_type != JobType::CreatePair
            })
        {
            return Err(ApiError::FailedPrecondition(format!(
                "pair {} is busy with job {job}; delete it once the job ends",
                pair.name
            )));
        }
        let job = JobRecord::running(JobType::DeletePair, JobAbout::Pair(pair));
        let mut record = pair.clone();
        record.status.become_(PairStatus::Deleting, "delete")?;
        record.updated_at = Some(now_text());
        record.job = Some(job.id);
        Ok((record, job))
    }

    /// Resolves a diverged pair keeping the data of availability zone `keep`.
    pub fn resolve_pair(
        &self,
        reference: &str,
        keep: &str,
    ) -> Result<proto::PairJobResponse, ApiError> {
        let mut state = self.lock();
        let id = Self::find_pair(&state, reference)?;
        let pair = state.pairs[&id].clone();
        let az_of = |node: &str| {
            state
                .nodes
                .get(node)
                .map(|n| n.record.availability_zone.clone())
                .unwrap_or_default()
        };
        let (production_az, dr_az) = (az_of(&pair.production_node), az_of(&pair.dr_node));
        if keep != production_az && keep != dr_az {
            return Err(ApiError::InvalidArgument(format!(
                "--keep {keep:?} is neither of pair {}'s availability zones ({production_az}, {dr_az})",
                pair.name
            )));
        }
        self.check_idle(&pair)?;
        let view = self.pair_view(&state, &pair);
        if !view.needs_resolve {
            return Err(ApiError::FailedPrecondition(format!(
                "pair {} has not diverged (replication {}); there is nothing to resolve",
                pair.name, view.replication_status
            )));
        }
        let mut record = pair.clone();
        if keep == production_az {
            record.pending = Some(PendingStep::KeepProduction);
        } else {
            // The side that will be overwritten must not be serving anyone.
            let clients = state
                .nodes
                .get(&pair.production_node)
                .and_then(|n| {
                    n.report
                        .volumes
                        .iter()
                        .find(|v| v.id == pair.production_volume.to_string())
                })
                .map_or(0, |v| v.connected_clients);
            if clients > 0 {
                return Err(ApiError::FailedPrecondition(format!(
                    "production volume of pair {} has {clients} connected NBD client(s) and would be overwritten; disconnect them first",
                    pair.name
                )));
            }
            std::mem::swap(&mut record.production_volume, &mut record.dr_volume);
            std::mem::swap(&mut record.production_node, &mut record.dr_node);
            record.priority_station = keep.to_owned();
            record.pending = Some(PendingStep::SwitchSides);
        }
        let job = self.start_job(&mut state, &mut record, JobType::ResolvePair)?;
        tracing::info!(pair = %id, keep, "resolving a diverged pair");
        Ok(proto::PairJobResponse {
            pair: Some(self.pair_view(&state, &record)),
            job: Some(job_view(&job)),
        })
    }

    /// Starts an online verify (and repair) of an active pair.
    pub fn verify_pair(
        &self,
        reference: &str,
        repair: bool,
    ) -> Result<proto::PairJobResponse, ApiError> {
        let mut state = self.lock();
        let id = Self::find_pair(&state, reference)?;
        let pair = state.pairs[&id].clone();
        self.check_idle(&pair)?;
        let view = self.pair_view(&state, &pair);
        if view.replication_status != ReplicationStatus::Active.to_string() {
            return Err(ApiError::FailedPrecondition(format!(
                "pair {} is {}, not active; verify compares an active pair",
                pair.name, view.replication_status
            )));
        }
        let mut record = pair.clone();
        record.pending = Some(PendingStep::Verify { repair });
        let job = self.start_job(&mut state, &mut record, JobType::VerifyPair)?;
        Ok(proto::PairJobResponse {
            pair: Some(self.pair_view(&state, &record)),
            job: Some(job_view(&job)),
        })
    }

    /// A pair takes a new operation only when it is available and none is running.
    pub(super) fn check_idle(&self, pair: &PairRecord) -> Result<(), ApiError> {
        if pair.status != PairStatus::Available {
            return Err(ApiError::FailedPrecondition(format!(
                "pair {} is {}; it must be available",
                pair.name, pair.status
            )));
        }
        if let Some(job) = pair.job {
            return Err(ApiError::FailedPrecondition(format!(
                "pair {} is busy with job {job}",
                pair.name
            )));
        }
        Ok(())
    }

    /// A pair as the API shows it: the record, with what its agents last reported.
    pub(super) fn pair_view(&self, state: &State, p: &PairRecord) -> proto::Pair {
        let report_of = |node: &str| {
            state.nodes.get(node).and_then(|n| {
                let alive = self.alive(n);
                n.report
                    .pairs
                    .iter()
                    .find(|s| s.pair_id == p.id.to_string())
                    .map(|s| (s.clone(), alive))
            })
        };
        // A report from before the sides last changed speaks of the other side: not this one.
        let production = report_of(&p.production_node).filter(|(s, _)| s.side == "production");
        let dr = report_of(&p.dr_node).filter(|(s, _)| s.side == "dr");
        let mut view = proto::Pair {
            id: p.id.to_string(),
            name: p.name.clone(),
            description: p.description.clone(),
            status: p.status.to_string(),
            replication_status: String::new(),
            replication_consistency_group_id: p.group.map(|g| g.to_string()).unwrap_or_default(),
            volume_ids: vec![p.production_volume.to_string(), p.dr_volume.to_string()],
            priority_station: p.priority_station.clone(),
            replication_model: p.model.to_string(),
            created_at: p.created_at.clone(),
            updated_at: p.updated_at.clone().unwrap_or_default(),
            production_node: p.production_node.clone(),
            dr_node: p.dr_node.clone(),
            failure_detail: p.failure_detail.clone().unwrap_or_default(),
            max_bytes_per_sec: p.max_bytes_per_sec.unwrap_or(0),
            project_id: p.project.clone(),
            ..Default::default()
        };
        match (&production, p.status) {
            (_, PairStatus::Creating) if !p.production_started => {
                view.replication_status = ReplicationStatus::Copying.to_string();
                view.status_detail = "starting the production side".into();
            }
            (Some((s, true)), _) => {
                view.replication_status = s.replication_status.clone();
                view.status_detail = s.status_detail.clone();
                view.status_since = s.status_since.clone();
                view.progress = s.progress;
                view.out_of_sync_bytes = s.out_of_sync_bytes;
                view.lag_seconds = s.lag_seconds;
                view.counters = s.counters;
            }
            (Some((s, false)), _) => {
                view.replication_status = ReplicationStatus::Inactive.to_string();
                view.status_detail = format!(
                    "production node {} is not reporting (last: {})",
                    p.production_node, s.replication_status
                );
                view.out_of_sync_bytes = s.out_of_sync_bytes;
            }
            (None, _) => {
                view.replication_status = ReplicationStatus::Inactive.to_string();
                view.status_detail =
                    format!("no report from production node {}", p.production_node);
            }
        }
        if let Some((s, _)) = &dr {
            view.consistent_epoch = s.consistent_epoch;
            view.consistent_at = s.consistent_at.clone();
            view.dr_generation = s.generation.clone();
        }
        if let Some((s, _)) = &production {
            view.production_generation = s.generation.clone();
        }
        view.needs_resolve = [&production, &dr]
            .iter()
            .any(|r| r.as_ref().is_some_and(|(s, _)| s.needs_resolve));
        if view.needs_resolve && view.replication_status != ReplicationStatus::Error.to_string() {
            // The DR side refused; production may not have reported it yet.
            if let Some((s, _)) = dr.as_ref().filter(|(s, _)| s.needs_resolve) {
                view.replication_status = ReplicationStatus::Error.to_string();
                view.status_detail = s.status_detail.clone();
                view.status_since = s.status_since.clone();
            }
        }
        if p.status == PairStatus::Error {
            view.replication_status = ReplicationStatus::Error.to_string();
        }
        view.size_bytes = p.size;
        // As a group's: its production host is lost (failover advised), or its link is
        // down while it should replicate (failover not possible).
        let production_lost = !state
            .nodes
            .get(&p.production_node)
            .is_some_and(|n| self.alive(n));
        let stopped = p
            .group
            .and_then(|g| state.groups.get(&g))
            .is_some_and(|g| g.stopped);
        let link_down = !stopped
            && (view.replication_status == ReplicationStatus::Inactive.as_str()
                || view.replication_status == ReplicationStatus::Error.as_str());
        view.fault_level = if production_lost {
            blockrep_core::replication::FaultLevel::ProductionLost
        } else if link_down {
            blockrep_core::replication::FaultLevel::LinkDown
        } else {
            blockrep_core::replication::FaultLevel::None
        }
        .code();
        view
    }
}

pub(super) struct PairPlan {
    record: PairRecord,
    production_address: SocketAddr,
    dr_address: SocketAddr,
    /// The volume ids claimed for it, as the agents report them.
    claimed: [String; 2],
}

impl PairPlan {
    fn assignment(&self, side: Side) -> proto::PairAssignment {
        let peer = match side {
            Side::Production => self.dr_address,
            Side::Dr => self.production_address,
        };
        pair_steps::assignment(&self.record, side, peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::testing::*;

    #[test]
    fn delete_is_refused_unless_the_pair_is_available_or_in_error() {
        let mut creating = pair_record("creating", ("n1", 1), ("n2", 2));
        creating.status = PairStatus::Creating;
        creating.production_started = false;
        let mut deleting = pair_record("deleting", ("n1", 3), ("n2", 4));
        deleting.status = PairStatus::Deleting;
        let mut grouped = pair_record("grouped", ("n1", 5), ("n2", 6));
        let group = group_record("g", &[&grouped]);
        grouped.group = Some(group.id);
        let available = pair_record("available", ("n1", 7), ("n2", 8));
        let mut failed = pair_record("failed", ("n1", 9), ("n2", 10));
        failed.status = PairStatus::Error;
        let h = Harness::seeded(&[
            Change::PutPair(creating.clone()),
            Change::PutPair(deleting.clone()),
            Change::PutPair(grouped.clone()),
            Change::PutPair(available.clone()),
            Change::PutPair(failed.clone()),
            Change::PutGroup(group),
        ]);
        let before = h.stored().pairs;
        for (name, words) in [
            (
                "creating",
                "pair creating is creating; only an available pair",
            ),
            ("deleting", "pair deleting is deleting"),
            ("grouped", "pair grouped is in consistency group g"),
        ] {
            h.assert_refused(h.coordinator.delete_pair(name), 409, words, 1);
        }
        assert_eq!(h.stored().pairs, before);
        assert!(h.stored().jobs.is_empty());

        for (n, pair) in [&available, &failed].into_iter().enumerate() {
            let answer = h.coordinator.delete_pair(&pair.id.to_string()).unwrap();
            assert_eq!(answer.pair.unwrap().status, "deleting");
            let job = answer.job.unwrap();
            assert_eq!(job.job_type, JobType::DeletePair.to_string());
            assert_eq!(job.status, JobStatus::Running.to_string());
            assert_eq!(h.store.commits(), 2 + n);
            let stored = h.stored_pair(pair.id).unwrap();
            assert_eq!(stored.status, PairStatus::Deleting);
            assert_eq!(stored.job.map(|j| j.to_string()), Some(job.id));
        }
        assert!(h.agents.calls().is_empty(), "the driver calls the agents");
    }

    /// A delete while a verify or resolve job runs would leave that job running for good
    /// (the delete job takes its place on the pair): refused until it ends.
    #[test]
    fn delete_is_refused_while_a_job_of_the_pair_runs() {
        let mut verifying = pair_record("verifying", ("n1", 1), ("n2", 2));
        let job = running_job(JobType::VerifyPair, Some(verifying.id), None);
        verifying.job = Some(job.id);
        let h = Harness::seeded(&[
            Change::PutPair(verifying.clone()),
            Change::PutJob(job.clone()),
        ]);
        h.assert_refused(
            h.coordinator.delete_pair("verifying"),
            409,
            "is busy with job",
            1,
        );
        assert_eq!(h.stored_job(job.id).unwrap().status, JobStatus::Running);
        assert_eq!(h.stored_pair(verifying.id).unwrap().job, Some(job.id));

        // An available pair whose initial sync still runs (its create job too) can go.
        let mut syncing = pair_record("syncing", ("n3", 3), ("n4", 4));
        let create = running_job(JobType::CreatePair, Some(syncing.id), None);
        syncing.job = Some(create.id);
        let h = Harness::seeded(&[Change::PutPair(syncing.clone()), Change::PutJob(create)]);
        let answer = h.coordinator.delete_pair("syncing").unwrap();
        assert_eq!(answer.pair.unwrap().status, "deleting");
    }

    #[test]
    fn a_pairs_send_limit_is_checked_stored_and_given_to_its_nodes() {
        let pair = pair_record("limited", ("n1", 1), ("n2", 2));
        let h = Harness::seeded(&[Change::PutPair(pair.clone())]);
        let update = |rate| proto::UpdatePairRequest {
            pair: "limited".into(),
            max_bytes_per_sec: rate,
            ..Default::default()
        };
        h.assert_refused(
            h.coordinator.update_pair(update(Some(100 << 10))),
            400,
            "below the least",
            1,
        );
        h.assert_refused(
            h.coordinator.update_pair(update(Some(5 << 40))),
            400,
            "past the most",
            1,
        );
        let shown = h.coordinator.update_pair(update(Some(100 << 20))).unwrap();
        assert_eq!(shown.max_bytes_per_sec, 100 << 20);
        assert_eq!(h.pair(pair.id).max_bytes_per_sec, Some(100 << 20));
        let roles = Coordinator::roles_of(&h.coordinator.lock(), "n1");
        assert_eq!(
            roles[0].max_bytes_per_sec,
            100 << 20,
            "told with the heartbeat"
        );
        let unchanged = h.coordinator.update_pair(update(None)).unwrap();
        assert_eq!(unchanged.max_bytes_per_sec, 100 << 20);
        h.coordinator.update_pair(update(Some(0))).unwrap();
        assert_eq!(h.pair(pair.id).max_bytes_per_sec, None, "0: none");
    }

    #[test]
    fn a_pair_is_found_by_its_id_or_a_name_no_other_pair_has() {
        let twin_a = pair_record("twin", ("n1", 1), ("n2", 2));
        let twin_b = pair_record("twin", ("n1", 3), ("n2", 4));
        let solo = pair_record("solo", ("n1", 5), ("n2", 6));
        let h = Harness::seeded(&[
            Change::PutPair(twin_a.clone()),
            Change::PutPair(twin_b.clone()),
            Change::PutPair(solo.clone()),
        ]);
        assert_eq!(
            h.coordinator.get_pair("solo").unwrap().id,
            solo.id.to_string()
        );
        assert_eq!(
            h.coordinator.get_pair(&twin_b.id.to_string()).unwrap().id,
            twin_b.id.to_string()
        );
        let ambiguous = h.coordinator.get_pair("twin").unwrap_err();
        assert_eq!(ambiguous.code(), 400, "{ambiguous}");
        assert!(
            ambiguous.to_string().contains("2 pairs are named"),
            "{ambiguous}"
        );
        assert_eq!(h.coordinator.get_pair("nope").unwrap_err().code(), 404);
        // An id no pair has is a name no pair has.
        let unknown = PairId::from_bytes([0xee; 16]).to_string();
        assert_eq!(h.coordinator.get_pair(&unknown).unwrap_err().code(), 404);
        h.assert_refused(
            h.coordinator.delete_pair("twin"),
            400,
            "give the pair id",
            1,
        );
    }

    #[test]
    fn verify_and_resolve_are_refused_unless_the_pair_can_take_them() {
        let mut busy = pair_record("busy", ("n1", 1), ("n2", 2));
        let job = running_job(JobType::VerifyPair, Some(busy.id), None);
        busy.job = Some(job.id);
        let idle = pair_record("idle", ("n1", 3), ("n2", 4));
        let h = Harness::seeded(&[
            Change::PutPair(busy.clone()),
            Change::PutPair(idle.clone()),
            Change::PutJob(job.clone()),
        ]);
        h.report("n1", "az1", vec![], vec![]);
        h.report("n2", "az2", vec![], vec![]);
        let commits = 3;
        let refusals: [(Result<proto::PairJobResponse, ApiError>, u32, &str); 5] = [
            (
                h.coordinator.verify_pair("busy", false),
                409,
                "busy with job",
            ),
            (
                h.coordinator.resolve_pair("busy", "az1"),
                409,
                "busy with job",
            ),
            (
                h.coordinator.verify_pair("idle", false),
                409,
                "is inactive, not active",
            ),
            (
                h.coordinator.resolve_pair("idle", "az9"),
                400,
                "is neither of pair idle's availability zones",
            ),
            (
                h.coordinator.resolve_pair("idle", "az1"),
                409,
                "has not diverged",
            ),
        ];
        for (result, code, words) in refusals {
            h.assert_refused(result, code, words, commits);
        }
        assert_eq!(h.pair(idle.id), idle);

        // Active: a verify starts, its step left to the driver.
        h.report(
            "n1",
            "az1",
            vec![],
            vec![pair_state(&idle, "production", ReplicationStatus::Active)],
        );
        let started = h.coordinator.verify_pair("idle", true).unwrap();
        let job = started.job.unwrap();
        assert_eq!(job.job_type, JobType::VerifyPair.to_string());
        let stored = h.stored_pair(idle.id).unwrap();
        assert_eq!(stored.pending, Some(PendingStep::Verify { repair: true }));
        assert_eq!(stored.job.map(|j| j.to_string()), Some(job.id));
        assert_eq!(h.store.commits(), commits + 1);
        assert!(h.agents.calls().is_empty());
    }
}
