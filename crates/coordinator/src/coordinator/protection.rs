//! SDRS protection groups: a consistency group bound to two zones (its source and target,
//! an active-active domain), created empty and stopped; and the pairs made for such a
//! group with their DR volume ([`Coordinator::add_group_pair`]) or taken out of it with
//! their DR volume ([`Coordinator::remove_group_pair`]).
//!
//! Making a pair is a membership change of several steps, recorded on the group before
//! each (`MembershipChange`), which the driver takes one round after another:
//!
//! ```text
//!  add:    DR volume made in a pool of the other zone ─► pair created (initial sync)
//!          ─► pair available and synced ─► joins the group ─► job SUCCESS
//!          any refusal or give-up ─► undoing: pair deleted, DR volume deleted ─► job FAIL
//!  remove: pair leaves the group ─► pair deleted ─► DR volume deleted (if asked) ─► SUCCESS
//! ```
//!
//! A step the coordinator has no answer for is asked again (making a pool volume is
//! idempotent by name; a pair made before a crash is found by its volumes), so a restart
//! at any point neither loses nor doubles what was made.

use blockrep_core::replication::GroupId;

use super::groups::refused;
use super::jobs::job_view;
use super::*;
use crate::records::{AddPairPlan, GroupRecord, MembershipChange, ProtectionSpec, RemovePairPlan};

const MAX_PROTECTION_TEXT_BYTES: usize = 64;

impl Coordinator {
    /// Checks a protection group's spec (names, zones, domain) and fills in what follows
    /// from it: the priority station is the source zone, the model hypermetro unless given.
    pub(super) fn check_protection(
        &self,
        req: &mut proto::CreateGroupRequest,
        spec: proto::ProtectionGroupSpec,
    ) -> Result<ProtectionSpec, ApiError> {
        check_sdrs_name(&req.name)?;
        check_sdrs_description(&req.description)?;
        let (source, target) = (spec.source_availability_zone, spec.target_availability_zone);
        for (field, zone) in [
            ("source_availability_zone", &source),
            ("target_availability_zone", &target),
        ] {
            if zone.is_empty() {
                return Err(ApiError::InvalidArgument(format!("{field} is required")));
            }
            let known = self
                .lock()
                .nodes
                .values()
                .any(|n| n.record.availability_zone == *zone);
            if !known {
                return Err(ApiError::InvalidArgument(format!(
                    "{field} {zone:?} is not a zone of the cluster"
                )));
            }
        }
        if source == target {
            return Err(ApiError::InvalidArgument(format!(
                "source and target availability zone are both {source}; a protection group needs two"
            )));
        }
        let domain = blockrep_api::domain_id(&source, &target);
        if spec.domain_id != domain {
            return Err(ApiError::InvalidArgument(format!(
                "domain_id {:?} is not the active-active domain of {source} and {target} ({domain})",
                spec.domain_id
            )));
        }
        if spec.source_vpc_id.is_empty() {
            return Err(ApiError::InvalidArgument(
                "source_vpc_id is required".into(),
            ));
        }
        let dr_type = if spec.dr_type.is_empty() {
            "migration".to_owned()
        } else {
            spec.dr_type
        };
        if dr_type != "migration" {
            return Err(ApiError::InvalidArgument(format!(
                "dr_type {dr_type:?}: only \"migration\" is served"
            )));
        }
        req.priority_station = source.clone();
        if req.replication_model.is_empty() {
            req.replication_model = ReplicationModel::Hypermetro.to_string();
        }
        Ok(ProtectionSpec {
            source_az: source,
            target_az: target,
            domain_id: domain,
            source_vpc_id: spec.source_vpc_id,
            dr_type,
        })
    }

    /// Starts making a pair for a protection group: checked now (nothing is made if it is
    /// refused), then taken step by step by the driver, followed by the job answered.
    pub fn add_group_pair(
        &self,
        req: proto::AddGroupPairRequest,
    ) -> Result<proto::GroupJobResponse, ApiError> {
        if !req.name.is_empty() {
            check_sdrs_name(&req.name)?;
        }
        check_sdrs_description(&req.description)?;
        self.settle_group_job(&req.group);
        let mut state = self.lock();
        let id = Self::find_group(&state, &req.group)?;
        let group = state.groups[&id].clone();
        if group.protection.is_none() {
            return Err(ApiError::InvalidArgument(format!(
                "group {} is not a protection group: add an existing pair with `group update`",
                group.name
            )));
        }
        self.check_members_may_change(&state, &group)?;
        let volume = self.find_volume_in(&state, &req.volume, &group.project)?;
        if volume.az != group.priority_station {
            return Err(ApiError::InvalidArgument(format!(
                "volume {} is in zone {}, not in the group's production zone {}",
                volume.volume.name, volume.az, group.priority_station
            )));
        }
        if let Some(p) = state.pairs.values().find(|p| {
            p.production_volume.to_string() == volume.volume.id
                || p.dr_volume.to_string() == volume.volume.id
        }) {
            return Err(ApiError::FailedPrecondition(format!(
                "volume {} is already in pair {} ({})",
                volume.volume.name, p.id, p.name
            )));
        }
        if state.claimed.contains(&volume.volume.id) || in_a_change(&state, &volume.volume.id) {
            return Err(ApiError::FailedPrecondition(format!(
                "volume {} is already in a pair being created",
                volume.volume.name
            )));
        }
        if !volume.alive {
            return Err(ApiError::FailedPrecondition(format!(
                "node {} of volume {} is not reachable",
                volume.node, volume.volume.name
            )));
        }
        let size = volume.volume.size_bytes;
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(ApiError::InvalidArgument(format!(
                "volume {} is {size} bytes: a pool makes volumes of whole 4 KiB blocks",
                volume.volume.name
            )));
        }
        let dr_zone = other_zone(&group);
        let dr_node = self.node_with_room(&state, &dr_zone, size)?;
        let production_volume = volume
            .volume
            .id
            .parse()
            .map_err(|e| ApiError::Internal(format!("volume id {}: {e}", volume.volume.id)))?;
        let plan = AddPairPlan {
            dr_volume_name: dr_volume_name(&req.name, &volume.volume.name),
            name: req.name,
            description: req.description,
            production_volume,
            size,
            dr_node,
            dr_volume: None,
            pair: None,
            undoing: None,
            job: None,
        };
        tracing::info!(group = %group.id, volume = %volume.volume.name, dr_node = %plan.dr_node, "making a pair for the group");
        self.start_membership_change(
            &mut state,
            group,
            JobType::AddGroupPair,
            MembershipChange::Add(plan),
            Vec::new(),
        )
    }

    /// Starts taking a pair out of its protection group and deleting it (and its DR
    /// volume, if asked and a pool made it).
    pub fn remove_group_pair(
        &self,
        req: proto::RemoveGroupPairRequest,
    ) -> Result<proto::GroupJobResponse, ApiError> {
        let group_of = {
            let state = self.lock();
            let pair = Self::find_pair(&state, &req.pair)?;
            state.pairs[&pair].group.map(|g| g.to_string())
        };
        if let Some(group) = &group_of {
            self.settle_group_job(group);
        }
        let mut state = self.lock();
        let pair_id = Self::find_pair(&state, &req.pair)?;
        let pair = state.pairs[&pair_id].clone();
        let Some(group) = pair.group.and_then(|g| state.groups.get(&g)).cloned() else {
            return Err(ApiError::FailedPrecondition(format!(
                "pair {} is in no group: delete it with `pair delete`",
                pair.name
            )));
        };
        self.check_members_may_change(&state, &group)?;
        if req.delete_dr_volume {
            let made_by_pool = group_steps::volume_on(&state, &pair.dr_node, &pair.dr_volume)
                .is_some_and(|v| v.pool);
            if !made_by_pool {
                return Err(ApiError::InvalidArgument(format!(
                    "pair {}'s DR volume {} was not made by a pool (or its node is not reporting): it is not deleted; remove the pair without deleting it",
                    pair.name, pair.dr_volume
                )));
            }
        }
        // Out of the group and deleting, in one transaction with the plan: a crash after
        // it finds all of it done, a refusal none of it.
        let (mut deleting, delete_job) = Self::deletion(&state, pair.id)?;
        deleting.group = None;
        let plan = RemovePairPlan {
            pair: pair.id,
            delete_dr_volume: req.delete_dr_volume,
            dr_node: pair.dr_node.clone(),
            dr_volume: pair.dr_volume,
            job: None,
        };
        let mut left = group;
        left.pairs.retain(|p| *p != pair.id);
        let answer = self.start_membership_change(
            &mut state,
            left,
            JobType::RemoveGroupPair,
            MembershipChange::Remove(plan),
            vec![Change::PutPair(deleting), Change::PutJob(delete_job)],
        )?;
        state.stuck_since.remove(&pair.id);
        Ok(answer)
    }

    /// Records a membership change on `group` with its job (and `also`, in the same
    /// transaction), and wakes the driver.
    fn start_membership_change(
        &self,
        state: &mut State,
        group: GroupRecord,
        job_type: JobType,
        change: MembershipChange,
        also: Vec<Change>,
    ) -> Result<proto::GroupJobResponse, ApiError> {
        let mut job = JobRecord::running(job_type, JobAbout::Group(&group));
        if let MembershipChange::Remove(plan) = &change {
            job.pair = Some(plan.pair);
        }
        let mut change = change;
        change.set_job(job.id);
        let mut updated = group;
        updated.job = Some(job.id);
        updated.membership = Some(change);
        updated.updated_at = Some(now_text());
        let mut changes = vec![
            Change::PutGroup(updated.clone()),
            Change::PutJob(job.clone()),
        ];
        changes.extend(also);
        self.commit_into(state, &changes)?;
        self.kick.notify_one();
        Ok(proto::GroupJobResponse {
            group: Some(self.group_view(state, &updated)),
            job: Some(job_view(&job)),
        })
    }

    /// Whether a pair may be made for `group` or taken out of it now: no job and no other
    /// membership change under way, and the group stopped or empty.
    fn check_members_may_change(&self, state: &State, group: &GroupRecord) -> Result<(), ApiError> {
        Self::check_not_busy(state, group)?;
        Self::check_no_membership_change(group)?;
        GroupAction::Update
            .begin(self.group_state(state, group))
            .map_err(refused)?;
        Ok(())
    }

    /// One membership change at a time (one may outlive the group's job: a failover goes
    /// ahead of it).
    fn check_no_membership_change(group: &GroupRecord) -> Result<(), ApiError> {
        match &group.membership {
            Some(change) => Err(ApiError::FailedPrecondition(format!(
                "group {} is busy with a pair's {} (job {})",
                group.name,
                match change {
                    MembershipChange::Add(_) => "creation",
                    MembershipChange::Remove(_) => "removal",
                },
                change
                    .job()
                    .map_or_else(|| "-".to_owned(), |j| j.to_string())
            ))),
            None => Ok(()),
        }
    }

    /// A failover goes ahead of a membership change: a pair being made is not a member
    /// yet, and is undone ("the group failed over first"); a pair being removed left the
    /// group already. Both go on beside the failover, each with its own job.
    pub(super) fn yield_to_failover(group: &mut GroupRecord) {
        if let Some(MembershipChange::Add(plan)) = &mut group.membership {
            plan.undoing
                .get_or_insert_with(|| "the group failed over before the pair joined it".into());
        }
    }

    /// A volume of `project` by id or unique name, wherever it is.
    fn find_volume_in(
        &self,
        state: &State,
        reference: &str,
        project: &str,
    ) -> Result<pairs::FoundVolume, ApiError> {
        let found = self.find_volume(state, reference)?;
        if pairs::volume_project(&found.volume) != project {
            return Err(ApiError::InvalidArgument(format!(
                "volume {} belongs to project {}, not to the group's {project}",
                found.volume.name,
                pairs::volume_project(&found.volume)
            )));
        }
        Ok(found)
    }

    /// The live node of `zone` whose pool has the most room, if it has `size` free.
    fn node_with_room(&self, state: &State, zone: &str, size: u64) -> Result<String, ApiError> {
        state
            .nodes
            .values()
            .filter(|n| n.record.availability_zone == zone && self.alive(n))
            .filter_map(|n| {
                let pool = n.report.pool?;
                let free = pool.capacity_bytes.saturating_sub(pool.used_bytes);
                (free >= size).then_some((free, n.record.name.clone()))
            })
            .max()
            .map(|(_, name)| name)
            .ok_or_else(|| {
                ApiError::FailedPrecondition(format!(
                    "no live node of zone {zone} has a storage pool with {} free for the DR volume",
                    blockrep_api::human_bytes(size)
                ))
            })
    }

    // ---- the driver ----

    /// Takes the next steps of every membership change under way.
    pub(super) async fn drive_membership_changes(&self) {
        let changing: Vec<GroupRecord> = self
            .lock()
            .groups
            .values()
            .filter(|g| g.membership.is_some())
            .cloned()
            .collect();
        for group in changing {
            let id = group.id;
            let outcome = match group.membership.clone() {
                Some(MembershipChange::Add(plan)) => self.drive_add(id, plan).await,
                Some(MembershipChange::Remove(plan)) => self.drive_remove(id, plan).await,
                None => Ok(()),
            };
            if let Err(e) = outcome {
                tracing::error!(group = %id, error = %e, "group membership change");
            }
        }
    }

    async fn drive_add(&self, group: GroupId, mut plan: AddPairPlan) -> Result<(), ApiError> {
        if plan.undoing.is_some() {
            return self.undo_add(group, plan).await;
        }
        // 1. The DR volume, in a pool of the other zone.
        if plan.dr_volume.is_none() {
            let request = Request::CreatePoolVolume(proto::CreateVolumeRequest {
                name: plan.dr_volume_name.clone(),
                size_bytes: plan.size,
                project_id: self.group_project(group),
            });
            match self.ask_live_agent(&plan.dr_node, request).await {
                Ok(Response::Volume(v)) => {
                    plan.dr_volume = Some(v.id.parse().map_err(|e| {
                        ApiError::Internal(format!("the agent's volume id {}: {e}", v.id))
                    })?);
                    self.save_membership(group, MembershipChange::Add(plan.clone()))?;
                    self.change_moved_on(group);
                }
                Ok(other) => {
                    return self.add_failed(group, plan, format!("unexpected answer {other:?}"));
                }
                Err(e) => return self.add_step_failed(group, plan, e),
            }
        }
        let dr_volume = plan.dr_volume.expect("made above");
        // 2. The pair (one made before a restart is found by its volumes).
        if plan.pair.is_none() {
            let existing = self
                .lock()
                .pairs
                .values()
                .find(|p| p.production_volume == plan.production_volume && p.dr_volume == dr_volume)
                .map(|p| p.id);
            let pair = match existing {
                Some(pair) => pair,
                None => {
                    let seen =
                        group_steps::volume_on(&self.lock(), &plan.dr_node, &dr_volume).is_some();
                    if !seen {
                        // Its node's next report carries it.
                        return self.add_waiting(
                            group,
                            plan,
                            "the DR volume's node to report it",
                            AGENT_GIVE_UP,
                        );
                    }
                    let (station, model) = {
                        let state = self.lock();
                        let g = &state.groups[&group];
                        (g.priority_station.clone(), g.model)
                    };
                    let request = proto::CreatePairRequest {
                        name: plan.name.clone(),
                        description: plan.description.clone(),
                        volumes: vec![plan.production_volume.to_string(), dr_volume.to_string()],
                        priority_station: station,
                        replication_model: model.to_string(),
                    };
                    match self.create_pair(request).await {
                        Ok(created) => {
                            created
                                .pair
                                .and_then(|p| p.id.parse().ok())
                                .ok_or_else(|| {
                                    ApiError::Internal("a created pair without an id".into())
                                })?
                        }
                        Err(e) => return self.add_step_failed(group, plan, e),
                    }
                }
            };
            plan.pair = Some(pair);
            self.save_membership(group, MembershipChange::Add(plan.clone()))?;
            self.change_moved_on(group);
            let mut state = self.lock();
            if let Some(mut job) = plan.job.and_then(|j| state.jobs.get(&j)).cloned() {
                job.pair = Some(pair);
                self.commit_into(&mut state, &[Change::PutJob(job)])?;
            }
        }
        let pair_id = plan.pair.expect("made above");
        // 3. Once available and synced, the pair joins the group.
        let mut state = self.lock();
        let Some(pair) = state.pairs.get(&pair_id).cloned() else {
            drop(state);
            return self.add_failed(group, plan, "the new pair is gone".into());
        };
        // What the pair's initial sync reached: waiting goes on while it moves.
        let progress = group_steps::report_on(&state, &pair.production_node, pair_id)
            .map(|s| (s.replication_status.clone(), (s.progress * 1000.0) as u64));
        match pair.status {
            status
                if status == PairStatus::Creating
                    || (status == PairStatus::Available && pair.job.is_some()) =>
            {
                let moved = state
                    .add_progress
                    .insert(group, (pair.status, progress.clone()))
                    != Some((pair.status, progress));
                drop(state);
                if moved {
                    self.change_moved_on(group);
                }
                return self.add_waiting(group, plan, "the pair's initial sync", ADD_PAIR_GIVE_UP);
            }
            PairStatus::Available => {}
            other => {
                drop(state);
                let why = pair.failure_detail.unwrap_or_else(|| other.to_string());
                return self.add_failed(group, plan, format!("pair {}: {why}", pair.name));
            }
        }
        let current = state.groups[&group].clone();
        if let Err(e) = self.check_joins(&state, &pair, &current.priority_station, current.model) {
            drop(state);
            return self.add_failed(group, plan, e.to_string());
        }
        let mut joined = current;
        joined.pairs.push(pair_id);
        joined.membership = None;
        joined.updated_at = Some(now_text());
        let mut member = pair.clone();
        member.group = Some(group);
        member.updated_at = Some(now_text());
        let mut changes = vec![Change::PutGroup(joined.clone()), Change::PutPair(member)];
        if let Some(mut job) = plan.job.and_then(|j| state.jobs.get(&j)).cloned() {
            job.end(Ok(()));
            changes.push(Change::PutJob(job));
        }
        self.commit_into(&mut state, &changes)?;
        state.group_stuck_since.remove(&group);
        state.add_progress.remove(&group);
        tracing::info!(%group, pair = %pair_id, "the new pair joined the group");
        Ok(())
    }

    /// Undoes an add that failed, in reverse: the pair is deleted (its driver takes both
    /// agents out), then the DR volume (by name if its id never came back); then the job
    /// fails with the reason. What cannot be undone within [`AGENT_GIVE_UP`] of the last
    /// step is left, and the job's reason says what and where.
    async fn undo_add(&self, group: GroupId, mut plan: AddPairPlan) -> Result<(), ApiError> {
        let reason = plan.undoing.clone().unwrap_or_default();
        let dr = plan
            .dr_volume
            .map_or_else(|| plan.dr_volume_name.clone(), |v| v.to_string());
        let (dr_node, made_pair) = (plan.dr_node.clone(), plan.pair);
        let left = |what: &str| {
            format!(
                "{reason}; {what} could not be undone: DR volume {dr} on node {dr_node} (`blockrep volume delete {dr}` there){}",
                made_pair
                    .map(|p| format!(", pair {p} (`blockrep pair delete {p}`)"))
                    .unwrap_or_default()
            )
        };
        if let Some(pair) = plan.pair {
            let record = self.lock().pairs.get(&pair).cloned();
            match record {
                Some(p) if p.group.is_some() => {
                    // Taken into a group meanwhile (not this one: joining it ends the change).
                    return self.end_membership(
                        group,
                        Err(format!("{reason}; the new pair {pair} joined another group meanwhile and is left there")),
                    );
                }
                Some(p) if p.status == PairStatus::ErrorDeleting => {
                    return self.end_membership(group, Err(left("the pair's delete")));
                }
                Some(p) if p.status.can_become(PairStatus::Deleting) => {
                    let started = {
                        let mut state = self.lock();
                        Self::deletion(&state, pair).and_then(|(record, job)| {
                            self.commit_into(
                                &mut state,
                                &[Change::PutPair(record), Change::PutJob(job)],
                            )
                        })
                    };
                    match started {
                        Ok(()) => {
                            self.change_moved_on(group);
                            self.kick.notify_one();
                        }
                        Err(e) if self.waited_too_long(group, AGENT_GIVE_UP) => {
                            return self.end_membership(
                                group,
                                Err(left(&format!("the pair's delete ({e})"))),
                            );
                        }
                        Err(_) => {}
                    }
                    return Ok(());
                }
                // Deleting, or still being created: wait for it.
                Some(_) => {
                    if self.waited_too_long(group, ADD_PAIR_GIVE_UP) {
                        return self.end_membership(group, Err(left("the pair's delete")));
                    }
                    return Ok(());
                }
                // Gone: the DR volume is next, with its own give-up.
                None => {
                    plan.pair = None;
                    self.save_membership(group, MembershipChange::Add(plan.clone()))?;
                    self.change_moved_on(group);
                }
            }
        }
        let request = Request::DeletePoolVolume(proto::VolumeRef { volume: dr.clone() });
        if let Err(e) = self.ask_live_agent(&plan.dr_node, request).await {
            if group_steps::is_final(&e) || self.waited_too_long(group, AGENT_GIVE_UP) {
                return self
                    .end_membership(group, Err(left(&format!("the DR volume's delete ({e})"))));
            }
            tracing::warn!(%group, volume = %dr, error = %e, "cannot delete the DR volume yet; retrying");
            return Ok(());
        }
        self.end_membership(group, Err(reason))
    }

    /// A step that waits: given up once nothing moved for `limit`.
    fn add_waiting(
        &self,
        group: GroupId,
        plan: AddPairPlan,
        what: &str,
        limit: Duration,
    ) -> Result<(), ApiError> {
        if self.waited_too_long(group, limit) {
            return self.add_failed(
                group,
                plan,
                format!("nothing moved for {} s waiting for {what}", limit.as_secs()),
            );
        }
        Ok(())
    }

    /// A step refused or unanswered: a final refusal undoes at once, anything else is
    /// tried again until [`AGENT_GIVE_UP`] has passed without progress.
    fn add_step_failed(
        &self,
        group: GroupId,
        plan: AddPairPlan,
        error: ApiError,
    ) -> Result<(), ApiError> {
        if group_steps::is_final(&error) || matches!(error, ApiError::AlreadyExists(_)) {
            return self.add_failed(group, plan, error.to_string());
        }
        tracing::warn!(%group, %error, "a step of a new pair failed; retrying");
        self.add_waiting(group, plan, &format!("an answer ({error})"), AGENT_GIVE_UP)
    }

    fn add_failed(
        &self,
        group: GroupId,
        mut plan: AddPairPlan,
        reason: String,
    ) -> Result<(), ApiError> {
        tracing::warn!(%group, %reason, "a new pair failed: undoing what was made");
        self.change_moved_on(group);
        plan.undoing = Some(reason);
        self.save_membership(group, MembershipChange::Add(plan))?;
        self.kick.notify_one();
        Ok(())
    }

    /// The change moved on: its give-up counts from now.
    fn change_moved_on(&self, group: GroupId) {
        self.lock().group_stuck_since.remove(&group);
    }

    /// A removal: the pair left the group and is being deleted (both recorded with the
    /// plan); once it is gone, its DR volume is deleted if asked.
    async fn drive_remove(&self, group: GroupId, plan: RemovePairPlan) -> Result<(), ApiError> {
        let status = self.lock().pairs.get(&plan.pair).map(|p| p.status);
        match status {
            Some(PairStatus::ErrorDeleting) => {
                let why = self.lock().pairs[&plan.pair]
                    .failure_detail
                    .clone()
                    .unwrap_or_default();
                return self.end_membership(group, Err(format!("the pair's delete failed: {why}")));
            }
            Some(_) => return Ok(()),
            None => {}
        }
        if plan.delete_dr_volume {
            let left = format!(
                "DR volume {} is left on node {}: delete it with `blockrep volume delete {}` there",
                plan.dr_volume, plan.dr_node, plan.dr_volume
            );
            let request = Request::DeletePoolVolume(proto::VolumeRef {
                volume: plan.dr_volume.to_string(),
            });
            if let Err(e) = self.ask_live_agent(&plan.dr_node, request).await {
                if group_steps::is_final(&e) || self.waited_too_long(group, AGENT_GIVE_UP) {
                    return self.end_membership(group, Err(format!("{e}; {left}")));
                }
                tracing::warn!(%group, error = %e, "cannot delete the DR volume yet; retrying");
                return Ok(());
            }
        }
        self.end_membership(group, Ok(()))
    }

    /// A call to `node`'s agent, not made while the node is not reporting (it would only
    /// hold the driver up until its timeout).
    async fn ask_live_agent(&self, node: &str, request: Request) -> Result<Response, ApiError> {
        let alive = self.lock().nodes.get(node).is_some_and(|n| self.alive(n));
        if !alive {
            return Err(ApiError::Unavailable(format!(
                "node {node} is not reporting"
            )));
        }
        self.ask_agent(node, request).await
    }

    /// Whether a membership change of `group` has waited `limit` since it last moved on.
    fn waited_too_long(&self, group: GroupId, limit: Duration) -> bool {
        let since = *self
            .lock()
            .group_stuck_since
            .entry(group)
            .or_insert_with(|| self.now());
        self.since(since) >= limit
    }

    fn save_membership(&self, group: GroupId, change: MembershipChange) -> Result<(), ApiError> {
        let mut state = self.lock();
        let Some(mut updated) = state.groups.get(&group).cloned() else {
            return Ok(());
        };
        updated.membership = Some(change);
        self.commit_into(&mut state, &[Change::PutGroup(updated)])
    }

    /// Ends a membership change: the plan is dropped and its job ends with `outcome`.
    fn end_membership(&self, group: GroupId, outcome: Result<(), String>) -> Result<(), ApiError> {
        let mut state = self.lock();
        let Some(mut updated) = state.groups.get(&group).cloned() else {
            return Ok(());
        };
        let job = updated
            .membership
            .take()
            .and_then(|m| m.job())
            .or(updated.job);
        updated.updated_at = Some(now_text());
        let mut changes = vec![Change::PutGroup(updated.clone())];
        if let Some(mut job) = job.and_then(|j| state.jobs.get(&j)).cloned() {
            job.end(outcome.clone());
            changes.push(Change::PutJob(job));
        }
        self.commit_into(&mut state, &changes)?;
        state.group_stuck_since.remove(&group);
        state.add_progress.remove(&group);
        tracing::info!(%group, ?outcome, "group membership change ended");
        Ok(())
    }

    fn group_project(&self, group: GroupId) -> String {
        self.lock()
            .groups
            .get(&group)
            .map_or_else(crate::records::default_project, |g| g.project.clone())
    }
}

/// An SDRS name (a protection group's, or its pairs'): 1 to 64 bytes of letters, digits,
/// '.', '_' and '-'.
pub(super) fn check_sdrs_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_PROTECTION_TEXT_BYTES {
        return Err(ApiError::InvalidArgument(format!(
            "name must be 1 to {MAX_PROTECTION_TEXT_BYTES} bytes"
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(ApiError::InvalidArgument(format!(
            "name {name:?} has {bad:?}; use letters, digits, '.', '_' and '-' only"
        )));
    }
    Ok(())
}

/// An SDRS description: at most 64 bytes, without '<' or '>'.
pub(super) fn check_sdrs_description(description: &str) -> Result<(), ApiError> {
    if description.len() > MAX_PROTECTION_TEXT_BYTES || description.contains(['<', '>']) {
        return Err(ApiError::InvalidArgument(format!(
            "description must be at most {MAX_PROTECTION_TEXT_BYTES} bytes, without '<' or '>'"
        )));
    }
    Ok(())
}

/// How long a new pair's creation and initial sync may go without progress before the
/// change fails and is undone.
const ADD_PAIR_GIVE_UP: Duration = Duration::from_secs(600);

/// The zone a group's DR volumes are in now: the other one of its two.
fn other_zone(group: &GroupRecord) -> String {
    match &group.protection {
        Some(p) if group.priority_station == p.source_az => p.target_az.clone(),
        Some(p) => p.source_az.clone(),
        None => String::new(),
    }
}

/// Whether a membership change under way makes a pair of `volume`.
fn in_a_change(state: &State, volume: &str) -> bool {
    state.groups.values().any(|g| {
        matches!(&g.membership, Some(MembershipChange::Add(p)) if p.production_volume.to_string() == volume)
    })
}

/// The DR volume's name: the pair's (or the production volume's) name and a random suffix,
/// as a volume name allows.
fn dr_volume_name(pair_name: &str, production: &str) -> String {
    let base: String = if pair_name.is_empty() {
        production
    } else {
        pair_name
    }
    .chars()
    .map(|c| {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            c
        } else {
            '-'
        }
    })
    .take(48)
    .collect();
    let base = base.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let suffix = &PairId::random().to_string()[..8];
    if base.is_empty() {
        format!("dr-{suffix}")
    } else {
        format!("{base}-dr-{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::testing::*;

    /// n1 in az1 with volume p1, n2 in az2 with a pool of 10 volumes' room; a protection
    /// group "pg" from az1 to az2.
    fn protection_group() -> (Harness, String) {
        let h = Harness::new();
        h.report("n1", "az1", vec![volume(1, "p1", SIZE)], vec![]);
        pool_report(&h, vec![]);
        let created = h
            .coordinator
            .create_group(
                proto::CreateGroupRequest {
                    name: "pg".into(),
                    protection: Some(proto::ProtectionGroupSpec {
                        source_availability_zone: "az1".into(),
                        target_availability_zone: "az2".into(),
                        domain_id: blockrep_api::domain_id("az1", "az2"),
                        source_vpc_id: "vpc-1".into(),
                        dr_type: String::new(),
                    }),
                    ..Default::default()
                },
                None,
            )
            .unwrap();
        let group = created.group.unwrap();
        assert_eq!(group.priority_station, "az1");
        assert_eq!(group.replication_model, "hypermetro");
        assert!(group.stopped, "a protection group starts unprotected");
        assert!(group.replication_ids.is_empty());
        (h, group.id)
    }

    /// n2 (az2) reports its pool and `volumes`.
    fn pool_report(h: &Harness, volumes: Vec<proto::Volume>) {
        h.coordinator
            .report(
                proto::NodeReport {
                    node: "n2".into(),
                    availability_zone: "az2".into(),
                    volumes,
                    pool: Some(proto::Pool {
                        capacity_bytes: 10 * SIZE,
                        used_bytes: 0,
                    }),
                    ..Default::default()
                },
                address("n2"),
            )
            .unwrap();
    }

    fn dr_volume() -> proto::Volume {
        let mut v = volume(7, "web-dr", SIZE);
        v.pool = true;
        v
    }

    fn add(h: &Harness, group: &str) -> Result<proto::GroupJobResponse, ApiError> {
        h.coordinator.add_group_pair(proto::AddGroupPairRequest {
            group: group.into(),
            volume: "p1".into(),
            name: "web".into(),
            description: String::new(),
        })
    }

    fn job_of(h: &Harness, group: &str) -> proto::Job {
        h.coordinator.get_group(group).unwrap().job.unwrap()
    }

    #[test]
    fn a_protection_group_is_checked_and_a_pair_for_it_refused_with_nothing_made() {
        let (h, group) = protection_group();
        let commits = h.store.commits();
        let spec = |f: fn(&mut proto::ProtectionGroupSpec)| {
            let mut s = proto::ProtectionGroupSpec {
                source_availability_zone: "az1".into(),
                target_availability_zone: "az2".into(),
                domain_id: blockrep_api::domain_id("az1", "az2"),
                source_vpc_id: "vpc".into(),
                dr_type: String::new(),
            };
            f(&mut s);
            proto::CreateGroupRequest {
                name: "pg2".into(),
                protection: Some(s),
                ..Default::default()
            }
        };
        for (request, words) in [
            (
                spec(|s| s.domain_id = "nope".into()),
                "not the active-active domain",
            ),
            (
                spec(|s| s.target_availability_zone = "az1".into()),
                "both az1",
            ),
            (
                spec(|s| s.target_availability_zone = "az9".into()),
                "not a zone",
            ),
            (
                spec(|s| s.source_vpc_id.clear()),
                "source_vpc_id is required",
            ),
            (spec(|s| s.dr_type = "cloud".into()), "only \"migration\""),
        ] {
            h.assert_refused(
                h.coordinator.create_group(request, None),
                400,
                words,
                commits,
            );
        }
        // No pool with room in az2; a volume of the wrong zone; not a protection group.
        let mut full = proto::NodeReport {
            node: "n2".into(),
            availability_zone: "az2".into(),
            pool: Some(proto::Pool {
                capacity_bytes: SIZE / 2,
                used_bytes: 0,
            }),
            ..Default::default()
        };
        h.coordinator.report(full.clone(), address("n2")).unwrap();
        h.assert_refused(
            add(&h, &group),
            409,
            "no live node of zone az2 has a storage pool",
            commits,
        );
        full.pool = None;
        full.volumes = vec![volume(2, "d1", SIZE)];
        h.coordinator.report(full, address("n2")).unwrap();
        let wrong_zone = h.coordinator.add_group_pair(proto::AddGroupPairRequest {
            group: group.clone(),
            volume: "d1".into(),
            ..Default::default()
        });
        h.assert_refused(
            wrong_zone,
            400,
            "not in the group's production zone az1",
            commits,
        );
    }

    #[tokio::test]
    async fn a_pair_is_made_for_the_group_step_by_step_across_a_restart() {
        let (h, group) = protection_group();
        h.agents.once(
            "CreatePoolVolume",
            Answer::Respond(Box::new(Response::Volume(dr_volume()))),
        );
        let started = add(&h, &group).unwrap();
        assert_eq!(started.job.unwrap().job_type, "createGroupReplicationPair");
        // Busy meanwhile.
        h.assert_refused(add(&h, &group), 409, "is busy with job", h.store.commits());

        h.coordinator.drive_membership_changes().await;
        let Request::CreatePoolVolume(asked) = &h.agents.calls_of("CreatePoolVolume")[0].request
        else {
            panic!()
        };
        assert_eq!(
            (asked.size_bytes, asked.project_id.as_str()),
            (SIZE, "default")
        );
        assert!(asked.name.starts_with("web-dr-"), "{}", asked.name);
        // The DR volume is not reported yet: nothing more happens.
        h.coordinator.drive_membership_changes().await;
        assert!(h.agents.calls_of("BecomeDr").is_empty());

        // A restart here carries on from the recorded plan.
        let h = h.reopen();
        h.report("n1", "az1", vec![volume(1, "p1", SIZE)], vec![]);
        pool_report(&h, vec![dr_volume()]);
        h.coordinator.drive_membership_changes().await;
        assert!(
            h.agents.calls_of("CreatePoolVolume").is_empty(),
            "not made twice"
        );
        assert_eq!(h.agents.log(), ["n2:BecomeDr"]);
        let pairs = h.coordinator.list_pairs();
        assert_eq!(pairs.len(), 1);
        assert_eq!(
            pairs[0].volume_ids,
            [volume_id(1).to_string(), volume_id(7).to_string()]
        );
        assert_eq!(job_of(&h, &group).pair_id, pairs[0].id);

        // Once the pair is available and synced, it joins the group.
        let id: PairId = pairs[0].id.parse().unwrap();
        h.coordinator.drive_membership_changes().await;
        assert!(
            h.coordinator
                .get_group(&group)
                .unwrap()
                .replication_ids
                .is_empty()
        );
        let mut synced = h.pair(id);
        synced.status = PairStatus::Available;
        synced.production_started = true;
        synced.job = None;
        {
            let mut state = h.coordinator.lock();
            h.coordinator
                .commit_into(&mut state, &[Change::PutPair(synced)])
                .unwrap();
        }
        h.coordinator.drive_membership_changes().await;
        let shown = h.coordinator.get_group(&group).unwrap();
        assert_eq!(shown.replication_ids, [id.to_string()]);
        assert_eq!(shown.job.unwrap().status, "SUCCESS");
        assert_eq!(h.pair(id).group.map(|g| g.to_string()), Some(group.clone()));
        assert!(
            h.stored_group(group.parse().unwrap())
                .unwrap()
                .membership
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_refused_step_undoes_what_was_made_and_the_job_fails() {
        // The pool refuses: nothing was made, the job fails with its reason.
        let (h, group) = protection_group();
        h.agents.once(
            "CreatePoolVolume",
            Answer::Refuse(409, "the pool of node n2 has 0 B free"),
        );
        add(&h, &group).unwrap();
        h.coordinator.drive_membership_changes().await;
        h.coordinator.drive_membership_changes().await;
        let job = job_of(&h, &group);
        assert_eq!(job.status, "FAIL");
        assert!(job.fail_reason.contains("0 B free"), "{}", job.fail_reason);
        // Its delete by name finds nothing to delete (a create whose answer was lost would
        // have left one).
        let Request::DeletePoolVolume(deleted) = &h.agents.calls_of("DeletePoolVolume")[0].request
        else {
            panic!()
        };
        assert!(deleted.volume.starts_with("web-dr-"), "{}", deleted.volume);

        // The DR agent refuses the pair: the DR volume made for it is deleted again.
        let (h, group) = protection_group();
        h.agents.once(
            "CreatePoolVolume",
            Answer::Respond(Box::new(Response::Volume(dr_volume()))),
        );
        h.agents
            .once("BecomeDr", Answer::Refuse(409, "DR volume has clients"));
        add(&h, &group).unwrap();
        h.coordinator.drive_membership_changes().await;
        pool_report(&h, vec![dr_volume()]);
        h.coordinator.drive_membership_changes().await;
        h.coordinator.drive_membership_changes().await;
        assert_eq!(
            h.agents.log(),
            ["n2:CreatePoolVolume", "n2:BecomeDr", "n2:DeletePoolVolume"]
        );
        let job = job_of(&h, &group);
        assert_eq!(job.status, "FAIL");
        assert!(
            job.fail_reason.contains("has clients"),
            "{}",
            job.fail_reason
        );
        assert!(h.coordinator.list_pairs().is_empty());
        assert!(
            h.stored_group(group.parse().unwrap())
                .unwrap()
                .membership
                .is_none()
        );
    }

    /// A create whose answer never comes is given up after a while without progress, and
    /// its volume deleted by name; an undo whose node is gone ends too, saying what is
    /// left where. Either way the group is free again.
    #[tokio::test]
    async fn a_change_that_cannot_go_on_gives_up_and_says_what_it_left() {
        let (h, group) = protection_group();
        h.agents.always("CreatePoolVolume", Answer::Unreachable);
        h.agents.always("DeletePoolVolume", Answer::Unreachable);
        add(&h, &group).unwrap();
        h.coordinator.drive_membership_changes().await;
        assert_eq!(job_of(&h, &group).status, "RUNNING");
        h.clock.advance(AGENT_GIVE_UP);
        pool_report(&h, vec![]);
        h.coordinator.drive_membership_changes().await;
        // Undoing: the delete by name is not answered either.
        h.coordinator.drive_membership_changes().await;
        assert_eq!(job_of(&h, &group).status, "RUNNING");
        h.clock.advance(AGENT_GIVE_UP);
        pool_report(&h, vec![]);
        h.coordinator.drive_membership_changes().await;
        let job = job_of(&h, &group);
        assert_eq!(job.status, "FAIL");
        assert!(
            job.fail_reason.contains("could not be undone"),
            "{}",
            job.fail_reason
        );
        assert!(
            job.fail_reason.contains("on node n2"),
            "{}",
            job.fail_reason
        );
        let group_id: GroupId = group.parse().unwrap();
        assert!(h.stored_group(group_id).unwrap().membership.is_none());
        // The group takes requests again.
        h.report("n1", "az1", vec![volume(1, "p1", SIZE)], vec![]);
        add(&h, &group).expect("a new add");
    }

    /// A removal takes the pair out of the group and starts its delete in one transaction;
    /// the DR volume is deleted once the pair is gone.
    #[tokio::test]
    async fn a_pair_leaves_its_protection_group_and_is_deleted_in_one_step() {
        let (h, group) = protection_group();
        let group_id: GroupId = group.parse().unwrap();
        let mut pair = pair_record("web", ("n1", 1), ("n2", 7));
        pair.model = ReplicationModel::Hypermetro;
        pair.group = Some(group_id);
        let mut g = h.stored_group(group_id).unwrap();
        g.pairs = vec![pair.id];
        {
            let mut state = h.coordinator.lock();
            h.coordinator
                .commit_into(
                    &mut state,
                    &[Change::PutGroup(g), Change::PutPair(pair.clone())],
                )
                .unwrap();
        }
        pool_report(&h, vec![dr_volume()]);
        let commits = h.store.commits();
        h.coordinator
            .remove_group_pair(proto::RemoveGroupPairRequest {
                pair: "web".into(),
                delete_dr_volume: true,
            })
            .unwrap();
        assert_eq!(h.store.commits(), commits + 1, "one transaction");
        let stored = h.stored_pair(pair.id).unwrap();
        assert_eq!((stored.status, stored.group), (PairStatus::Deleting, None));
        assert!(h.stored_group(group_id).unwrap().pairs.is_empty());
        // Nothing is deleted while the pair is.
        h.coordinator.drive_membership_changes().await;
        assert!(h.agents.calls_of("DeletePoolVolume").is_empty());
        {
            let mut state = h.coordinator.lock();
            h.coordinator
                .commit_into(&mut state, &[Change::DeletePair(pair.id.to_string())])
                .unwrap();
        }
        h.coordinator.drive_membership_changes().await;
        assert_eq!(h.agents.log(), ["n2:DeletePoolVolume"]);
        assert_eq!(job_of(&h, &group).status, "SUCCESS");
    }

    /// A protection group's rename keeps SDRS's name rules, and its last operation's job
    /// (its SDRS status follows that job).
    #[test]
    fn a_protection_group_is_renamed_by_its_rules_and_keeps_its_job() {
        let (h, group) = protection_group();
        let job = h.coordinator.get_group(&group).unwrap().job.unwrap().id;
        let rename = |name: &str| proto::UpdateGroupRequest {
            group: group.clone(),
            name: Some(name.into()),
            ..Default::default()
        };
        let commits = h.store.commits();
        for bad in ["", "<b>x", &"x".repeat(65)] {
            h.assert_refused(
                h.coordinator.update_group(rename(bad)),
                400,
                "name",
                commits,
            );
        }
        let renamed = h.coordinator.update_group(rename("pg-main")).unwrap();
        let shown = renamed.group.unwrap();
        assert_eq!(shown.name, "pg-main");
        assert_eq!(
            shown.job.unwrap().id,
            job,
            "the group's job stays its last operation's"
        );
    }

    /// A failover is not held up by a pair being made: the new pair is not a member yet,
    /// and its making is undone beside the failover, with its own job.
    #[tokio::test]
    async fn a_failover_goes_ahead_of_a_pair_being_made() {
        let (mut group, a, b) = group_of_two();
        let mut made = pair_record("new", ("n1", 5), ("n2", 6));
        made.status = PairStatus::Creating;
        let add_job = running_job(JobType::AddGroupPair, Some(made.id), Some(group.id));
        group.membership = Some(MembershipChange::Add(AddPairPlan {
            name: "new".into(),
            description: String::new(),
            production_volume: made.production_volume,
            size: SIZE,
            dr_node: "n2".into(),
            dr_volume_name: "new-dr".into(),
            dr_volume: Some(made.dr_volume),
            pair: Some(made.id),
            undoing: None,
            job: Some(add_job.id),
        }));
        group.job = Some(add_job.id);
        let h = Harness::seeded(&[
            Change::PutGroup(group.clone()),
            Change::PutPair(a.clone()),
            Change::PutPair(b.clone()),
            Change::PutPair(made.clone()),
            Change::PutJob(add_job.clone()),
        ]);
        h.dr_reports(&[&a, &b], true, 7);
        let started = h
            .coordinator
            .failover_group("g")
            .expect("the failover goes ahead");
        let failover_job = started.job.unwrap().id;
        assert_ne!(failover_job, add_job.id.to_string());
        let stored = h.stored_group(group.id).unwrap();
        let Some(MembershipChange::Add(plan)) = &stored.membership else {
            panic!("{:?}", stored.membership)
        };
        assert!(plan.undoing.as_deref().unwrap().contains("failed over"));
        // The making is undone on its own: the new pair's delete waits for its creation.
        h.coordinator.drive_membership_changes().await;
        assert_eq!(h.stored_job(add_job.id).unwrap().status, JobStatus::Running);
        // A second change is refused meanwhile.
        let refused = h.coordinator.add_group_pair(proto::AddGroupPairRequest {
            group: "g".into(),
            volume: "p1".into(),
            ..Default::default()
        });
        assert!(refused.is_err());
    }
}
