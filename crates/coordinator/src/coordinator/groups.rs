//! Consistency groups in the coordinator: create, list, show, update and delete, each
//! checked against the seed API's rules and the group state machine
//! ([`GroupAction::begin`]) before anything is stored. A refusal carries the EVS code and
//! names the rule; nothing changes.

use blockrep_core::replication::undo::Retention;
use blockrep_core::replication::{
    FaultLevel, GroupId, GroupStatus, GroupView, Refused, group_replication,
};

use super::group_steps;
use super::jobs::job_view;
use super::*;
use crate::records::{GroupOperation, GroupRecord, MembershipChange};

/// How long the driver waits for a report to agree before it tells an agent again.
const GROUP_STEP_RESEND: Duration = Duration::from_secs(2);

fn check_text(what: &str, text: &str) -> Result<(), ApiError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(ApiError::InvalidArgument(format!(
            "{what} is {} bytes; the limit is {MAX_TEXT_BYTES}",
            text.len()
        )));
    }
    Ok(())
}

pub(super) fn refused(e: Refused) -> ApiError {
    ApiError::FailedPrecondition(e.to_string())
}

impl Coordinator {
    /// Creates a group of the pairs named. Its project is theirs (they must share one);
    /// `project` is the caller's (the operator's: `None`), which they must belong to.
    pub fn create_group(
        &self,
        req: proto::CreateGroupRequest,
        project: Option<&str>,
    ) -> Result<proto::GroupJobResponse, ApiError> {
        let mut req = req;
        let protection = match req.protection.take() {
            Some(spec) => {
                let spec = self.check_protection(&mut req, spec)?;
                Some(spec)
            }
            None => None,
        };
        check_text("name", &req.name)?;
        check_text("description", &req.description)?;
        let model: ReplicationModel = req
            .replication_model
            .parse()
            .map_err(|e| ApiError::InvalidArgument(format!("replication_model: {e}")))?;
        if req.priority_station.is_empty() {
            return Err(ApiError::InvalidArgument(
                "priority_station (the production volumes' availability zone) is required".into(),
            ));
        }
        if req.pairs.is_empty() && protection.is_none() {
            return Err(ApiError::InvalidArgument(
                "a consistency group needs at least one pair".into(),
            ));
        }
        let retention = check_retention(req.retention, model)?;
        let mut state = self.lock();
        let pairs = Self::find_pairs(&state, &req.pairs)?;
        for id in &pairs {
            self.check_joins(&state, &state.pairs[id], &req.priority_station, model)?;
            Self::check_not_being_made(&state, &state.pairs[id])?;
        }
        let project = Self::project_of_pairs(&state, &pairs, project)?;
        let now = now_text();
        let mut group = GroupRecord {
            id: GroupId::random(),
            name: req.name,
            description: req.description,
            status: GroupStatus::Available,
            model,
            priority_station: req.priority_station,
            pairs: pairs.clone(),
            created_at: now,
            updated_at: None,
            failure_detail: None,
            job: None,
            term: 0,
            operation: None,
            failed_over_at: None,
            project,
            // A protection group starts unprotected: its pairs replicate once it starts.
            stopped: protection.is_some(),
            protection,
            membership: None,
            retention,
            drills: Vec::new(),
        };
        let job = finished_job(JobType::CreateGroup, &group);
        group.job = Some(job.id);
        let mut changes = vec![Change::PutGroup(group.clone()), Change::PutJob(job.clone())];
        for id in &pairs {
            let mut pair = state.pairs[id].clone();
            pair.group = Some(group.id);
            pair.updated_at = Some(now_text());
            changes.push(Change::PutPair(pair));
        }
        self.commit_into(&mut state, &changes)?;
        tracing::info!(group = %group.id, name = %group.name, pairs = pairs.len(), "group created");
        Ok(proto::GroupJobResponse {
            group: Some(self.group_view(&state, &group)),
            job: Some(job_view(&job)),
        })
    }

    pub fn list_groups(&self) -> Vec<proto::Group> {
        let state = self.lock();
        state
            .groups
            .values()
            .map(|g| self.group_view(&state, g))
            .collect()
    }

    pub fn get_group(&self, reference: &str) -> Result<proto::Group, ApiError> {
        let state = self.lock();
        let id = Self::find_group(&state, reference)?;
        Ok(self.group_view(&state, &state.groups[&id]))
    }

    /// Renames, describes, adds and removes pairs: only while the group is stopped (or
    /// empty). The group is `updating` for the one transaction that makes the change.
    pub fn update_group(
        &self,
        req: proto::UpdateGroupRequest,
    ) -> Result<proto::GroupJobResponse, ApiError> {
        if let Some(name) = &req.name {
            check_text("name", name)?;
        }
        if let Some(description) = &req.description {
            check_text("description", description)?;
        }
        self.settle_group_job(&req.group);
        let mut state = self.lock();
        let id = Self::find_group(&state, &req.group)?;
        let group = state.groups[&id].clone();
        Self::check_not_busy(&state, &group)?;
        // A protection group's name and description change at any time (SDRS); its pairs,
        // as any group's, only while it is stopped.
        let renaming_only = req.add_pairs.is_empty() && req.remove_pairs.is_empty();
        let protection = group.protection.is_some();
        // The retention of points changes at any time too, and a protection group's name.
        let any_time = |renaming_only: bool, protection: bool, retention_only: bool| {
            retention_only || (renaming_only && protection)
        };
        let retention_only = renaming_only
            && req.retention.is_some()
            && req.name.is_none()
            && req.description.is_none();
        let retention = match req.retention {
            Some(r) => Some(check_retention(Some(r), group.model)?),
            None => None,
        };
        if retention.is_some_and(|r| r != group.retention)
            && matches!(group.operation, Some(GroupOperation::Failover(_)))
        {
            return Err(ApiError::FailedPrecondition(format!(
                "group {} is failing over: its retention of points changes once the failover is done",
                group.name
            )));
        }
        if !any_time(renaming_only, protection, retention_only) {
            GroupAction::Update
                .begin(self.group_state(&state, &group))
                .map_err(refused)?;
        }
        if protection {
            if let Some(name) = &req.name {
                super::protection::check_sdrs_name(name)?;
            }
            if let Some(description) = &req.description {
                super::protection::check_sdrs_description(description)?;
            }
        }
        let add = Self::find_pairs(&state, &req.add_pairs)?;
        let remove = Self::find_pairs(&state, &req.remove_pairs)?;
        if let Some(both) = add.iter().find(|p| remove.contains(p)) {
            return Err(ApiError::InvalidArgument(format!(
                "pair {} is both added and removed",
                state.pairs[both].name
            )));
        }
        for pid in &add {
            self.check_joins(
                &state,
                &state.pairs[pid],
                &group.priority_station,
                group.model,
            )?;
            Self::check_not_being_made(&state, &state.pairs[pid])?;
        }
        Self::project_of_pairs(&state, &add, Some(&group.project))?;
        for pid in &remove {
            if state.pairs[pid].group != Some(id) {
                return Err(ApiError::InvalidArgument(format!(
                    "pair {} is not in group {}",
                    state.pairs[pid].name, group.name
                )));
            }
        }
        let mut updated = group.clone();
        if let Some(name) = req.name {
            updated.name = name;
        }
        if let Some(description) = req.description {
            updated.description = description;
        }
        if let Some(retention) = retention {
            updated.retention = retention;
        }
        updated.pairs.retain(|p| !remove.contains(p));
        updated.pairs.extend(add.iter().copied());
        updated.updated_at = Some(now_text());
        let job = finished_job(JobType::UpdateGroup, &updated);
        // A protection group's status follows its last operation's job: a rename keeps it,
        // and so does a change of any group's retention.
        if !any_time(renaming_only, protection, retention_only) {
            updated.job = Some(job.id);
        }
        let mut changes = vec![
            Change::PutGroup(updated.clone()),
            Change::PutJob(job.clone()),
        ];
        for (pid, member) in add
            .iter()
            .map(|p| (p, true))
            .chain(remove.iter().map(|p| (p, false)))
        {
            let mut pair = state.pairs[pid].clone();
            pair.group = member.then_some(id);
            pair.updated_at = Some(now_text());
            changes.push(Change::PutPair(pair));
        }
        self.commit_into(&mut state, &changes)?;
        if updated.retention != group.retention
            && let Some(cuts) = state.cuts.get_mut(&id)
        {
            // The next round sends the commit again, and the retention with it.
            cuts.send_commit_again();
        }
        tracing::info!(group = %id, added = add.len(), removed = remove.len(), "group updated");
        Ok(proto::GroupJobResponse {
            group: Some(self.group_view(&state, &updated)),
            job: Some(job_view(&job)),
        })
    }

    /// Starts `group sync` (resume every pair; the job ends when all are active) or `group
    /// stop` (pause every pair; the job ends when all are active-stopped). The driver tells
    /// the production agents, and keeps telling them until their reports agree.
    pub fn sync_or_stop_group(
        &self,
        reference: &str,
        action: GroupAction,
    ) -> Result<proto::GroupJobResponse, ApiError> {
        self.settle_group_job(reference);
        let mut state = self.lock();
        let id = Self::find_group(&state, reference)?;
        let group = state.groups[&id].clone();
        if let Some(job) = group
            .job
            .and_then(|j| state.jobs.get(&j))
            .filter(|j| !j.status.is_finished())
        {
            return Err(ApiError::FailedPrecondition(format!(
                "group {} is busy with job {} ({})",
                group.name, job.id, job.job_type
            )));
        }
        action
            .begin(self.group_state(&state, &group))
            .map_err(refused)?;
        let job_type = match action {
            GroupAction::Stop => JobType::StopGroup,
            _ => JobType::SyncGroup,
        };
        let mut job = finished_job(job_type, &group);
        job.status = JobStatus::Running;
        job.end_time = None;
        job.progress = 0.0;
        let mut updated = group;
        updated.stopped = action == GroupAction::Stop;
        updated.job = Some(job.id);
        updated.updated_at = Some(now_text());
        self.commit_into(
            &mut state,
            &[
                Change::PutGroup(updated.clone()),
                Change::PutJob(job.clone()),
            ],
        )?;
        tracing::info!(group = %id, %action, job = %job.id, "group action started");
        for pair in &updated.pairs {
            state.group_step_sent.remove(pair);
        }
        self.kick.notify_one();
        Ok(proto::GroupJobResponse {
            group: Some(self.group_view(&state, &updated)),
            job: Some(job_view(&job)),
        })
    }

    /// Brings every production agent's pause in line with its pair's group (a pair outside
    /// a group, or in a group not stopped, replicates), and ends the groups' sync and stop
    /// jobs once the agents' reports agree.
    pub(super) async fn drive_groups(&self) {
        let due = {
            let mut state = self.lock();
            let now = self.now();
            let due = group_steps::pauses_due(&state, now, GROUP_STEP_RESEND);
            for pause in &due {
                state.group_step_sent.insert(pause.pair, now);
            }
            due
        };
        for pause in due {
            let command = proto::PairCommand {
                pair_id: pause.pair.to_string(),
                ..Default::default()
            };
            let request = if pause.pause {
                Request::PausePair(command)
            } else {
                Request::ResumePair(command)
            };
            if let Err(e) = self.call_agent(&pause.node, pause.address, request).await {
                tracing::warn!(pair = %pause.pair, error = %e, pause = pause.pause, "cannot reach the production agent to pause or resume");
            }
        }
        let running: Vec<GroupRecord> = {
            let state = self.lock();
            state
                .groups
                .values()
                .filter(|g| {
                    // An operation under way ends its job itself, or hands it back here.
                    g.operation.is_none()
                        && g.job
                            .and_then(|j| state.jobs.get(&j))
                            .is_some_and(|j| !j.status.is_finished())
                })
                .cloned()
                .collect()
        };
        for group in running {
            if let Err(e) = self.follow_group_job(&group) {
                tracing::error!(group = %group.id, error = %e, "coordinator driver");
            }
        }
    }

    /// Ends a group's sync or stop job now if the reports already show its outcome: a
    /// request that follows what the group shows (an update once it shows stopped) is not
    /// refused as busy until the driver's next round notices.
    pub(super) fn settle_group_job(&self, reference: &str) {
        let group = {
            let state = self.lock();
            Self::find_group(&state, reference)
                .ok()
                .map(|id| state.groups[&id].clone())
        };
        if let Some(group) = group.filter(|g| g.operation.is_none())
            && let Err(e) = self.follow_group_job(&group)
        {
            tracing::warn!(group = %group.id, error = %e, "cannot end the group's job");
        }
    }

    /// Ends a sync or stop job once every pair's production agent reports the state asked
    /// for (a production agent that is down replicates nothing: it counts as stopped); a
    /// reverse or reprotect once its roles changed and every pair is active in the new
    /// direction.
    fn follow_group_job(&self, group: &GroupRecord) -> Result<(), ApiError> {
        let mut state = self.lock();
        let Some(mut job) = group.job.and_then(|j| state.jobs.get(&j)).cloned() else {
            return Ok(());
        };
        // A job that ended stays as it ended.
        if job.status.is_finished() {
            return Ok(());
        }
        let members = self.member_views(&state, group);
        let production_down = |p: &proto::Pair| {
            !state
                .nodes
                .get(&p.production_node)
                .is_some_and(|n| self.alive(n))
        };
        let outcome: Option<Result<(), String>> = match job.job_type {
            JobType::StopGroup => members
                .iter()
                .all(|p| {
                    production_down(p)
                        || p.replication_status == ReplicationStatus::ActiveStopped.as_str()
                })
                .then_some(Ok(())),
            JobType::SyncGroup | JobType::ReverseGroup | JobType::ReprotectGroup => {
                if let Some(p) = members.iter().find(|p| p.needs_resolve) {
                    Some(Err(format!(
                        "pair {} needs `pair resolve`: {}",
                        p.name, p.status_detail
                    )))
                } else {
                    let active = members
                        .iter()
                        .filter(|p| p.replication_status == ReplicationStatus::Active.as_str())
                        .count();
                    job.progress = active as f64 / members.len().max(1) as f64;
                    if active == members.len() && job.job_type == JobType::ReprotectGroup {
                        job.result = Some(reprotect_result(&members));
                    }
                    (active == members.len()).then_some(Ok(()))
                }
            }
            _ => None,
        };
        let Some(outcome) = outcome else {
            state.jobs.insert(job.id, job);
            return Ok(());
        };
        job.end(outcome);
        let (id, job_type, status) = (job.id, job.job_type, job.status);
        self.commit_into(&mut state, &[Change::PutJob(job)])?;
        tracing::info!(group = %group.id, job = %id, %job_type, %status, "group job ended");
        Ok(())
    }

    /// Deletes a group that has no pairs left.
    pub fn delete_group(&self, reference: &str) -> Result<proto::GroupJobResponse, ApiError> {
        self.settle_group_job(reference);
        let mut state = self.lock();
        let id = Self::find_group(&state, reference)?;
        let group = state.groups[&id].clone();
        Self::check_not_busy(&state, &group)?;
        GroupAction::Delete
            .begin(self.group_state(&state, &group))
            .map_err(refused)?;
        let job = finished_job(JobType::DeleteGroup, &group);
        self.commit_into(
            &mut state,
            &[
                Change::DeleteGroup(id.to_string()),
                Change::PutJob(job.clone()),
            ],
        )?;
        tracing::info!(group = %id, name = %group.name, "group deleted");
        let mut view = self.group_view(&state, &group);
        view.status = GroupStatus::Deleting.to_string();
        Ok(proto::GroupJobResponse {
            group: Some(view),
            job: Some(job_view(&job)),
        })
    }

    /// The one project `pairs` belong to, which must be `project` when one is given (an
    /// empty list belongs to `project`, or to the default one).
    fn project_of_pairs(
        state: &State,
        pairs: &[PairId],
        project: Option<&str>,
    ) -> Result<String, ApiError> {
        let mut found: Option<&str> = project;
        for id in pairs {
            let pair = &state.pairs[id];
            match found {
                Some(p) if p != pair.project => {
                    return Err(ApiError::InvalidArgument(format!(
                        "pair {} belongs to project {}, not {p}; a group's pairs share one project",
                        pair.name, pair.project
                    )));
                }
                _ => found = Some(&pair.project),
            }
        }
        Ok(found
            .map(str::to_owned)
            .unwrap_or_else(crate::records::default_project))
    }

    /// Pairs by id or unique name, each once.
    fn find_pairs(state: &State, references: &[String]) -> Result<Vec<PairId>, ApiError> {
        let mut ids: Vec<PairId> = Vec::new();
        for reference in references {
            let id = Self::find_pair(state, reference)?;
            if ids.contains(&id) {
                return Err(ApiError::InvalidArgument(format!(
                    "pair {reference:?} is listed twice"
                )));
            }
            ids.push(id);
        }
        Ok(ids)
    }

    pub(super) fn find_group(state: &State, reference: &str) -> Result<GroupId, ApiError> {
        find_by_id_or_name(&state.groups, reference, "consistency group", |g| &g.name)
    }

    /// Whether `pair` may join a group of `station` and `model`.
    pub(super) fn check_joins(
        &self,
        state: &State,
        pair: &PairRecord,
        station: &str,
        model: ReplicationModel,
    ) -> Result<(), ApiError> {
        if let Some(g) = pair.group {
            let name = state
                .groups
                .get(&g)
                .map_or(g.to_string(), |g| g.name.clone());
            return Err(ApiError::FailedPrecondition(format!(
                "pair {} is already in consistency group {name}",
                pair.name
            )));
        }
        if pair.status != PairStatus::Available {
            return Err(ApiError::FailedPrecondition(format!(
                "pair {} is {}; only available pairs join a consistency group",
                pair.name, pair.status
            )));
        }
        self.check_idle(pair)?;
        if pair.priority_station != station {
            return Err(ApiError::InvalidArgument(format!(
                "pair {}'s priority station is {}, not {station}: a group's pairs share one",
                pair.name, pair.priority_station
            )));
        }
        if pair.model != model {
            return Err(ApiError::InvalidArgument(format!(
                "pair {} is {}, not {model}: a group's pairs share one model",
                pair.name, pair.model
            )));
        }
        Ok(())
    }

    /// A pair a protection group's membership change is making joins that group only.
    fn check_not_being_made(state: &State, pair: &PairRecord) -> Result<(), ApiError> {
        let making = state.groups.values().find(|g| {
            matches!(&g.membership, Some(MembershipChange::Add(plan)) if plan.pair == Some(pair.id))
        });
        match making {
            Some(g) => Err(ApiError::FailedPrecondition(format!(
                "pair {} is being made for protection group {}: it joins that group",
                pair.name, g.name
            ))),
            None => Ok(()),
        }
    }

    /// What the group state machine looks at.
    pub(super) fn group_state(&self, state: &State, group: &GroupRecord) -> GroupView {
        let stopping = group
            .job
            .and_then(|j| state.jobs.get(&j))
            .is_some_and(|j| j.job_type == JobType::StopGroup && !j.status.is_finished());
        let replication = group_replication(
            group.stopped,
            stopping,
            self.member_views(state, group).iter().map(|p| {
                p.replication_status
                    .parse()
                    .unwrap_or(ReplicationStatus::Inactive)
            }),
        );
        GroupView {
            status: group.status,
            replication,
            pairs: group.pairs.len(),
        }
    }

    pub(super) fn member_views(&self, state: &State, group: &GroupRecord) -> Vec<proto::Pair> {
        group
            .pairs
            .iter()
            .filter_map(|id| state.pairs.get(id))
            .map(|p| self.pair_view(state, p))
            .collect()
    }

    /// A group as the API shows it: its record, with its pairs' reported state.
    pub(super) fn group_view(&self, state: &State, g: &GroupRecord) -> proto::Group {
        let members = self.member_views(state, g);
        let view = self.group_state(state, g);
        let production_lost = g
            .pairs
            .iter()
            .filter_map(|id| state.pairs.get(id))
            .any(|p| {
                !state
                    .nodes
                    .get(&p.production_node)
                    .is_some_and(|n| self.alive(n))
            });
        let link_down = !g.stopped
            && members.iter().any(|p| {
                p.replication_status == ReplicationStatus::Inactive.as_str()
                    || p.replication_status == ReplicationStatus::Error.as_str()
            });
        let fault = if production_lost {
            FaultLevel::ProductionLost
        } else if link_down {
            FaultLevel::LinkDown
        } else {
            FaultLevel::None
        };
        let oldest = members.iter().min_by_key(|p| p.consistent_epoch);
        // An async group's consistent point is its commit: what a failover rolls every DR
        // side to (none before the first, nor before every pair joined the group: a lone
        // pair's own epochs are not group-wide). A hypermetro group has one once every pair
        // joined it; its commit is the point after a trip (synchronous, it is every answered
        // write).
        let joined = Self::joined(state, &Self::members(state, g));
        let mut consistent_epoch = match g.model {
            ReplicationModel::Async if joined => self.group_commit(state, g).map_or(0, |e| e.0),
            ReplicationModel::Async => 0,
            ReplicationModel::Hypermetro if joined => {
                self.group_commit(state, g).map_or(1, |e| e.0.max(1))
            }
            ReplicationModel::Hypermetro => 0,
        };
        let mut consistent_at = oldest.map(|p| p.consistent_at.clone()).unwrap_or_default();
        if let Some(point) = g
            .failed_over_at
            .filter(|_| g.status == GroupStatus::Failovered)
        {
            consistent_epoch = point.epoch.0;
            consistent_at = if point.cut_ms == 0 {
                String::new()
            } else {
                humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + Duration::from_millis(point.cut_ms),
                )
                .to_string()
            };
        }
        proto::Group {
            id: g.id.to_string(),
            name: g.name.clone(),
            description: g.description.clone(),
            status: g.status.to_string(),
            replication_status: view.replication.to_string(),
            fault_level: fault.code(),
            failure_detail: g.failure_detail.clone().unwrap_or_default(),
            replication_ids: g.pairs.iter().map(PairId::to_string).collect(),
            priority_station: g.priority_station.clone(),
            replication_model: g.model.to_string(),
            created_at: g.created_at.clone(),
            updated_at: g.updated_at.clone().unwrap_or_default(),
            consistent_epoch,
            consistent_at,
            operation: g
                .operation
                .as_ref()
                .map(|o| o.describe())
                .unwrap_or_default(),
            project_id: g.project.clone(),
            protection: g.protection.as_ref().map(|p| proto::ProtectionGroupSpec {
                source_availability_zone: p.source_az.clone(),
                target_availability_zone: p.target_az.clone(),
                domain_id: p.domain_id.clone(),
                source_vpc_id: p.source_vpc_id.clone(),
                dr_type: p.dr_type.clone(),
            }),
            job: g.job.and_then(|j| state.jobs.get(&j)).map(job_view),
            stopped: g.stopped,
            retention: Some(retention_to_proto(g.retention)),
            drills: g.drills.len() as u32,
        }
    }
}

/// The most hourly points: a year's.
const MAX_KEEP_HOURLY: u32 = 366 * 24;

/// The longest retention of points in time: a year.
const MAX_RETENTION_SECS: u64 = 366 * 24 * 3600;

/// A group's retention of points as asked (unset: none), refused for a hypermetro group:
/// its DR volumes are written directly, outside units, so they have no points to keep
/// (docs/POINT-IN-TIME.md).
fn check_retention(
    asked: Option<proto::Retention>,
    model: ReplicationModel,
) -> Result<Retention, ApiError> {
    let asked = asked.unwrap_or_default();
    let retention = Retention {
        max_age_secs: asked.max_age_secs,
        max_bytes: asked.max_bytes,
        keep_hourly: asked.keep_hourly,
    };
    if retention.keep_hourly > 0 && retention.max_age_secs == 0 {
        return Err(ApiError::InvalidArgument(
            "hourly points are kept beyond a retention by age: give --retention too".into(),
        ));
    }
    if retention.keep_hourly > MAX_KEEP_HOURLY {
        return Err(ApiError::InvalidArgument(format!(
            "{} hourly points is more than a year's",
            retention.keep_hourly
        )));
    }
    if retention.max_age_secs > MAX_RETENTION_SECS {
        return Err(ApiError::InvalidArgument(format!(
            "a retention of {} s is longer than a year",
            retention.max_age_secs
        )));
    }
    if retention.is_on() && model == ReplicationModel::Hypermetro {
        return Err(ApiError::InvalidArgument(
            "points in time are kept for async groups only: a hypermetro group's DR volumes are written directly, outside the units whose undo makes a point".into(),
        ));
    }
    Ok(retention)
}

pub(super) fn retention_to_proto(r: Retention) -> proto::Retention {
    proto::Retention {
        max_age_secs: r.max_age_secs,
        max_bytes: r.max_bytes,
        keep_hourly: r.keep_hourly,
    }
}

/// What a reprotect copied: the bytes each new production side sent in its catch-up.
fn reprotect_result(members: &[proto::Pair]) -> String {
    let counters: Vec<proto::PairCounters> = members.iter().filter_map(|p| p.counters).collect();
    let copied: u64 = counters.iter().map(|c| c.resync_bytes_copied).sum();
    let sent: u64 = counters.iter().map(|c| c.resync_bytes_sent).sum();
    format!(
        "copied {} to the old production side (the union of both sides' dirty blocks; {} of it data, the rest zeroes)",
        blockrep_api::human_bytes(copied),
        blockrep_api::human_bytes(sent)
    )
}

/// A job for an operation the one store transaction completes, about `group`.
pub(super) fn finished_job(job_type: JobType, group: &GroupRecord) -> JobRecord {
    let now = now_text();
    JobRecord {
        id: JobId::random(),
        job_type,
        status: JobStatus::Success,
        begin_time: now.clone(),
        end_time: Some(now),
        progress: 1.0,
        fail_reason: None,
        pair: None,
        group: Some(group.id),
        result: None,
        project: group.project.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::testing::*;

    /// A group that shows stopped takes an update at once: its stop job ends as the request
    /// comes, not at the driver's next round (a REST client has no job to wait for).
    #[tokio::test]
    async fn a_group_whose_reports_show_it_stopped_takes_an_update_at_once() {
        let (h, group, a, b) = seeded_group_of_two();
        let stopping = h
            .coordinator
            .sync_or_stop_group(&group.id.to_string(), GroupAction::Stop)
            .unwrap();
        assert_eq!(stopping.job.unwrap().status, "RUNNING");
        for (node, pair) in [("n1", &a), ("n3", &b)] {
            let mut state = pair_state(pair, "production", ReplicationStatus::ActiveStopped);
            state.grouped = true;
            h.report(node, "az1", vec![], vec![state]);
        }
        let shown = h.coordinator.get_group(&group.id.to_string()).unwrap();
        assert_eq!(shown.replication_status, "active-stopped");
        let updated = h
            .coordinator
            .update_group(proto::UpdateGroupRequest {
                group: group.id.to_string(),
                name: Some("renamed".into()),
                ..Default::default()
            })
            .expect("the stopped group takes the update");
        assert_eq!(updated.group.unwrap().name, "renamed");
    }

    /// A group being stopped shows stopped only once its pairs are: until then an update
    /// would be refused as busy, so a client that waits for the group to show stopped
    /// (the seed's flow: stop, then update) must not see it early.
    #[tokio::test]
    async fn a_group_shows_stopped_only_once_its_pairs_are() {
        let (h, group, a, b) = seeded_group_of_two();
        h.production_reports(&[&a, &b]);
        h.coordinator
            .sync_or_stop_group(&group.id.to_string(), GroupAction::Stop)
            .unwrap();
        let shown = h.coordinator.get_group(&group.id.to_string()).unwrap();
        assert_ne!(
            shown.replication_status, "active-stopped",
            "its pairs still replicate"
        );
        let mut state = pair_state(&a, "production", ReplicationStatus::ActiveStopped);
        state.grouped = true;
        h.report("n1", "az1", vec![], vec![state]);
        let shown = h.coordinator.get_group(&group.id.to_string()).unwrap();
        assert_ne!(
            shown.replication_status, "active-stopped",
            "one pair still replicates"
        );
    }

    /// A finished job stays as it ended: a later request (here one refused) neither ends it
    /// again nor stores anything.
    #[tokio::test]
    async fn a_request_leaves_a_finished_job_as_it_ended() {
        let (h, group, a, b) = seeded_group_of_two();
        h.production_reports(&[&a, &b]);
        let synced = h
            .coordinator
            .sync_or_stop_group(&group.id.to_string(), GroupAction::Sync)
            .unwrap();
        let job: JobId = synced.job.unwrap().id.parse().unwrap();
        h.coordinator.settle_group_job(&group.id.to_string());
        let ended = h.stored_job(job).unwrap();
        assert_eq!(ended.status, JobStatus::Success);
        // Later a pair needs resolving; a refused delete (the group has pairs) follows.
        let mut diverged = pair_state(&a, "production", ReplicationStatus::Error);
        diverged.grouped = true;
        diverged.needs_resolve = true;
        h.report("n1", "az1", vec![], vec![diverged]);
        let commits = h.store.commits();
        let refused = h.coordinator.delete_group(&group.id.to_string());
        assert!(refused.is_err());
        assert_eq!(
            h.store.commits(),
            commits,
            "a refused request stores nothing"
        );
        assert_eq!(
            h.stored_job(job).unwrap(),
            ended,
            "the sync job stays as it ended"
        );
    }
}
