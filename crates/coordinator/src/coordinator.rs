//! The coordinator: the cluster's nodes (from their reports), its pairs and jobs (in the
//! store), and the driver that moves pairs through their lifecycle.
//!
//! ```text
//!  create ─► DR agent takes its role ─► stored: creating, job RUNNING
//!        ─► production agent takes its role ─► available; initial sync (copying)
//!        ─► production reports active ─► job SUCCESS
//!  delete (available | error) ─► deleting ─► both agents leave ─► removed, job SUCCESS
//! ```
//!
//! Every refusal carries the EVS code (400, 404, 409) and names the rule; nothing is stored
//! or changed on any agent when a request is refused.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blockrep_api::ApiError;
use blockrep_api::proto::{
    self, ClusterRequest, ClusterResponse, cluster_request::Request, cluster_response::Response,
};
use blockrep_core::VolumeId;
use blockrep_core::replication::{
    GroupAction, JobId, JobStatus, JobType, PairId, PairStatus, ReplicationModel, ReplicationStatus,
};

use crate::records::{GroupRecord, JobRecord, NodeRecord, PairRecord, PendingStep, now_text};

mod cuts;
mod groups;
mod operations;
use crate::store::{Change, Store};

/// A node that has not reported for this long is down.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(5);
/// A report received this soon after a step may have been written before it.
const HEARTBEAT_SLACK: Duration = Duration::from_millis(300);
/// How long the driver keeps trying an agent before a pair's operation fails.
const AGENT_GIVE_UP: Duration = Duration::from_secs(60);
const MAX_TEXT_BYTES: usize = 255;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How the coordinator reaches an agent (over QUIC in the daemon; directly for its own).
pub trait Agents: Send + Sync {
    fn call(
        &self,
        node: &str,
        address: SocketAddr,
        request: ClusterRequest,
    ) -> BoxFuture<'_, Result<ClusterResponse, ApiError>>;
}

struct Node {
    record: NodeRecord,
    last_seen: Option<Instant>,
    report: proto::NodeReport,
}

struct State {
    nodes: BTreeMap<String, Node>,
    pairs: BTreeMap<PairId, PairRecord>,
    groups: BTreeMap<blockrep_core::replication::GroupId, GroupRecord>,
    jobs: BTreeMap<JobId, JobRecord>,
    /// When the driver first failed to reach an agent for a pair's pending step.
    stuck_since: BTreeMap<PairId, Instant>,
    /// When a pair's last step was taken: its job follows only reports sent after it.
    step_taken: BTreeMap<PairId, Instant>,
    /// Pairs deleted lately: an agent's report written before the delete may still name
    /// them for a heartbeat or two.
    deleted: BTreeMap<PairId, Instant>,
    /// When the driver last told a pair's production agent to pause or resume.
    group_step_sent: BTreeMap<PairId, Instant>,
    /// The cuts of the async groups being cut.
    cuts: BTreeMap<blockrep_core::replication::GroupId, cuts::GroupCuts>,
    /// When a group operation's step first failed to reach an agent.
    group_stuck_since: BTreeMap<blockrep_core::replication::GroupId, Instant>,
    /// Failovers whose production sides were sent their fence.
    fences_sent: std::collections::BTreeSet<blockrep_core::replication::GroupId>,
}

pub struct Coordinator {
    state: Mutex<State>,
    /// Wakes the driver at once when a request gives it work.
    kick: tokio::sync::Notify,
    /// Wakes the cut loop at once (a pair tripped, or a group went synchronous).
    cut_kick: tokio::sync::Notify,
    store: Arc<dyn Store>,
    agents: Arc<dyn Agents>,
    /// This daemon's node name (it runs the coordinator).
    node: String,
}

impl Coordinator {
    pub fn open(
        store: Arc<dyn Store>,
        agents: Arc<dyn Agents>,
        node: String,
    ) -> Result<Arc<Self>, ApiError> {
        let snapshot = store
            .load()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let state = State {
            nodes: snapshot
                .nodes
                .into_iter()
                .map(|record| {
                    (
                        record.name.clone(),
                        Node {
                            record,
                            last_seen: None,
                            report: proto::NodeReport::default(),
                        },
                    )
                })
                .collect(),
            pairs: snapshot.pairs.into_iter().map(|p| (p.id, p)).collect(),
            groups: snapshot.groups.into_iter().map(|g| (g.id, g)).collect(),
            jobs: snapshot.jobs.into_iter().map(|j| (j.id, j)).collect(),
            stuck_since: BTreeMap::new(),
            step_taken: BTreeMap::new(),
            deleted: BTreeMap::new(),
            group_step_sent: BTreeMap::new(),
            cuts: BTreeMap::new(),
            group_stuck_since: BTreeMap::new(),
            fences_sent: Default::default(),
        };
        tracing::info!(
            pairs = state.pairs.len(),
            groups = state.groups.len(),
            jobs = state.jobs.len(),
            nodes = state.nodes.len(),
            "coordinator state loaded"
        );
        Ok(Arc::new(Self {
            state: Mutex::new(state),
            kick: tokio::sync::Notify::new(),
            cut_kick: tokio::sync::Notify::new(),
            store,
            agents,
            node,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn commit(&self, changes: &[Change]) -> Result<(), ApiError> {
        self.store
            .commit(changes)
            .map_err(|e| ApiError::Internal(e.to_string()))
    }

    /// Answers a cluster request addressed to the coordinator.
    pub async fn handle(&self, request: ClusterRequest, peer: SocketAddr) -> ClusterResponse {
        let response = match request.request {
            Some(Request::Report(report)) => self.report(report, peer).map(Response::ReportAck),
            Some(Request::CreatePair(req)) => self.create_pair(req).await.map(Response::Created),
            Some(Request::ListPairs(_)) => Ok(Response::Pairs(proto::ListPairsResponse {
                pairs: self.list_pairs(),
            })),
            Some(Request::GetPair(r)) => self.get_pair(&r.pair).map(Response::Pair),
            Some(Request::DeletePair(r)) => self.delete_pair(&r.pair).map(Response::Deleted),
            Some(Request::ResolvePair(r)) => {
                self.resolve_pair(&r.pair, &r.keep).map(Response::PairJob)
            }
            Some(Request::VerifyPair(r)) => {
                self.verify_pair(&r.pair, r.repair).map(Response::PairJob)
            }
            Some(Request::CreateGroup(r)) => self.create_group(r).map(Response::GroupJob),
            Some(Request::ListGroups(_)) => Ok(Response::Groups(proto::ListGroupsResponse {
                groups: self.list_groups(),
            })),
            Some(Request::GetGroup(r)) => self.get_group(&r.group).map(Response::Group),
            Some(Request::UpdateGroup(r)) => self.update_group(r).map(Response::GroupJob),
            Some(Request::DeleteGroup(r)) => self.delete_group(&r.group).map(Response::GroupJob),
            Some(Request::SyncGroup(r)) => self
                .sync_or_stop_group(&r.group, GroupAction::Sync)
                .map(Response::GroupJob),
            Some(Request::StopGroup(r)) => self
                .sync_or_stop_group(&r.group, GroupAction::Stop)
                .map(Response::GroupJob),
            Some(Request::FailoverGroup(r)) => {
                self.failover_group(&r.group).map(Response::GroupJob)
            }
            Some(Request::ReverseGroup(r)) => self.reverse_group(&r.group).map(Response::GroupJob),
            Some(Request::ReprotectGroup(r)) => {
                self.reprotect_group(&r.group).map(Response::GroupJob)
            }
            Some(Request::ExtendGroup(r)) => self.extend_group(r).map(Response::GroupJob),
            Some(Request::GetJob(r)) => self.get_job(&r.job).map(Response::Job),
            Some(Request::ListJobs(_)) => Ok(Response::Jobs(proto::ListJobsResponse {
                jobs: self.list_jobs(),
            })),
            Some(Request::ListNodes(_)) => Ok(Response::Nodes(proto::ListNodesResponse {
                nodes: self.list_nodes(),
            })),
            Some(_) | None => Err(ApiError::InvalidArgument(
                "not a request the coordinator serves".into(),
            )),
        };
        ClusterResponse {
            response: Some(response.unwrap_or_else(|e| Response::Error(e.into()))),
        }
    }

    // ---- nodes ----

    /// A node's heartbeat: registers it (first time, or moved) and records what it
    /// reported. Answers with the pairs the coordinator knows the node is in.
    pub fn report(
        &self,
        report: proto::NodeReport,
        peer: SocketAddr,
    ) -> Result<proto::ReportAck, ApiError> {
        let mut state = self.lock();
        let changed = match state.nodes.get(&report.node) {
            Some(node) => {
                node.record.address != peer
                    || node.record.availability_zone != report.availability_zone
            }
            None => true,
        };
        if changed {
            let record = NodeRecord {
                name: report.node.clone(),
                availability_zone: report.availability_zone.clone(),
                address: peer,
                registered_at: now_text(),
            };
            self.commit(&[Change::PutNode(record.clone())])?;
            tracing::info!(node = %record.name, az = %record.availability_zone, address = %peer, "node registered");
            state.nodes.insert(
                record.name.clone(),
                Node {
                    record,
                    last_seen: None,
                    report: proto::NodeReport::default(),
                },
            );
        }
        let name = report.node.clone();
        if report.pairs.iter().any(|p| p.trip_wanted) {
            // Its writes wait for the trip cut.
            self.cut_kick.notify_one();
        }
        let node = state.nodes.get_mut(&name).expect("inserted above");
        node.last_seen = Some(Instant::now());
        node.report = report;
        let pair_ids = state
            .pairs
            .values()
            .filter(|p| p.production_node == name || p.dr_node == name)
            .map(|p| p.id.to_string())
            .collect();
        Ok(proto::ReportAck {
            pair_ids,
            roles: Self::roles_of(&state, &name),
        })
    }

    fn alive(node: &Node) -> bool {
        node.last_seen
            .is_some_and(|seen| seen.elapsed() < NODE_TIMEOUT)
    }

    pub fn list_nodes(&self) -> Vec<proto::Node> {
        let state = self.lock();
        state
            .nodes
            .values()
            .map(|n| proto::Node {
                name: n.record.name.clone(),
                availability_zone: n.record.availability_zone.clone(),
                address: n.record.address.to_string(),
                alive: Self::alive(n),
                last_seen: n
                    .last_seen
                    .map(|seen| format!("{:.1} s ago", seen.elapsed().as_secs_f64()))
                    .unwrap_or_else(|| "not since the coordinator started".into()),
                volumes: n.report.volumes.len() as u32,
                coordinator: n.record.name == self.node,
                peers_refused: n.report.peers_refused,
                requests_refused: n.report.requests_refused,
            })
            .collect()
    }

    // ---- pairs ----

    pub async fn create_pair(
        &self,
        req: proto::CreatePairRequest,
    ) -> Result<proto::CreatePairResponse, ApiError> {
        let plan = self.plan_pair(&req)?;
        let job = JobRecord {
            id: JobId::random(),
            job_type: JobType::CreatePair,
            status: JobStatus::Running,
            begin_time: now_text(),
            end_time: None,
            progress: 0.0,
            fail_reason: None,
            pair: Some(plan.record.id),
            group: None,
            result: None,
        };
        let assignment = plan.assignment(Side::Dr);
        let mut record = plan.record;
        record.job = Some(job.id);
        // Recorded before any agent acts: a crash after the DR agent took its role leaves a
        // record the driver completes (it asks again; taking a role is idempotent), never a
        // DR role nobody knows.
        self.commit(&[Change::PutPair(record.clone()), Change::PutJob(job.clone())])?;
        fault::crash_at("pair recorded");
        // The DR agent takes its role first: it refuses if the DR volume has clients, and
        // then nothing is created.
        let asked = self
            .agents
            .call(
                &record.dr_node,
                plan.dr_address,
                ClusterRequest {
                    request: Some(Request::BecomeDr(assignment)),
                },
            )
            .await;
        match asked.map(|answer| Self::answer_of(&record.dr_node, answer)) {
            Ok(Ok(())) => {
                fault::crash_at("DR role taken");
                record.dr_started = true;
                if let Err(e) = self.commit(&[Change::PutPair(record.clone())]) {
                    // The record says the DR agent was not asked yet: the driver asks again.
                    tracing::warn!(pair = %record.id, error = %e, "cannot record the DR agent's step; the driver repeats it");
                    record.dr_started = false;
                }
            }
            Ok(Err(refused)) => {
                let forgotten = self.commit(&[
                    Change::DeletePair(record.id.to_string()),
                    Change::DeleteJob(job.id.to_string()),
                ]);
                if let Err(store) = forgotten {
                    // Left for the driver, which asks the DR agent again.
                    tracing::error!(pair = %record.id, error = %store, "cannot forget a pair its DR agent refused; the driver retries it");
                    let mut state = self.lock();
                    state.pairs.insert(record.id, record);
                    state.jobs.insert(job.id, job);
                }
                return Err(refused);
            }
            // No answer: the DR agent may have taken its role all the same. The record stays
            // (creating, its job running) and the driver asks again, as after a crash here,
            // until the agent answers or the job fails after AGENT_GIVE_UP. Forgetting it
            // could leave a DR role nobody knows.
            Err(unanswered) => {
                tracing::warn!(pair = %record.id, error = %unanswered, "the DR agent did not answer; the driver asks it again");
            }
        }
        tracing::info!(pair = %record.id, name = %record.name, model = %record.model, "pair created");
        let mut state = self.lock();
        state.pairs.insert(record.id, record.clone());
        state.jobs.insert(job.id, job.clone());
        self.kick.notify_one();
        Ok(proto::CreatePairResponse {
            pair: Some(self.pair_view(&state, &record)),
            job: Some(job_view(&job)),
        })
    }

    /// Checks a create request against the seed's rules and the cluster's state.
    fn plan_pair(&self, req: &proto::CreatePairRequest) -> Result<PairPlan, ApiError> {
        if req.name.len() > MAX_TEXT_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "name is {} bytes; the limit is {MAX_TEXT_BYTES}",
                req.name.len()
            )));
        }
        if req.description.len() > MAX_TEXT_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "description is {} bytes; the limit is {MAX_TEXT_BYTES}",
                req.description.len()
            )));
        }
        let model: ReplicationModel = req.replication_model.parse().map_err(
            |e: blockrep_core::replication::UnknownValue| {
                ApiError::InvalidArgument(format!("replication_model: {e}"))
            },
        )?;
        if req.volumes.len() != 2 {
            return Err(ApiError::InvalidArgument(format!(
                "a pair needs exactly two volumes (production, then DR); {} given",
                req.volumes.len()
            )));
        }
        let state = self.lock();
        let production = self.find_volume(&state, &req.volumes[0])?;
        let dr = self.find_volume(&state, &req.volumes[1])?;
        if production.volume.id == dr.volume.id {
            return Err(ApiError::InvalidArgument(
                "the production and DR volumes are the same volume".into(),
            ));
        }
        if production.az == dr.az {
            return Err(ApiError::InvalidArgument(format!(
                "both volumes are in availability zone {}; a pair needs two zones",
                production.az
            )));
        }
        if production.volume.size_bytes != dr.volume.size_bytes {
            return Err(ApiError::InvalidArgument(format!(
                "volume sizes differ: {} is {} bytes, {} is {} bytes",
                production.volume.name,
                production.volume.size_bytes,
                dr.volume.name,
                dr.volume.size_bytes
            )));
        }
        if req.priority_station != production.az {
            return Err(ApiError::InvalidArgument(format!(
                "priority_station {:?} is not the production volume's availability zone {}",
                req.priority_station, production.az
            )));
        }
        for v in [&production, &dr] {
            if let Some(p) = state.pairs.values().find(|p| {
                p.production_volume.to_string() == v.volume.id
                    || p.dr_volume.to_string() == v.volume.id
            }) {
                return Err(ApiError::FailedPrecondition(format!(
                    "volume {} is already in pair {} ({})",
                    v.volume.name, p.id, p.name
                )));
            }
            let deleted_lately = v
                .volume
                .pair_id
                .parse::<PairId>()
                .is_ok_and(|id| state.deleted.contains_key(&id));
            if !v.volume.pair_id.is_empty() && !deleted_lately {
                return Err(ApiError::FailedPrecondition(format!(
                    "volume {} is already in pair {} (its agent says so)",
                    v.volume.name, v.volume.pair_id
                )));
            }
            if !v.alive {
                return Err(ApiError::FailedPrecondition(format!(
                    "node {} of volume {} is not reachable",
                    v.node, v.volume.name
                )));
            }
        }
        if dr.volume.connected_clients > 0 {
            return Err(ApiError::FailedPrecondition(format!(
                "DR volume {} has {} connected NBD client(s); disconnect them first",
                dr.volume.name, dr.volume.connected_clients
            )));
        }
        let parse_id = |id: &str| {
            id.parse::<VolumeId>()
                .map_err(|e| ApiError::Internal(format!("volume id {id}: {e}")))
        };
        let record = PairRecord {
            id: PairId::random(),
            name: req.name.clone(),
            description: req.description.clone(),
            status: PairStatus::Creating,
            model,
            production_volume: parse_id(&production.volume.id)?,
            dr_volume: parse_id(&dr.volume.id)?,
            production_node: production.node.clone(),
            dr_node: dr.node.clone(),
            priority_station: req.priority_station.clone(),
            size: production.volume.size_bytes,
            created_at: now_text(),
            updated_at: None,
            dr_started: false,
            production_started: false,
            failure_detail: None,
            job: None,
            pending: None,
            group: None,
            term: 0,
            generation: None,
        };
        let plan = PairPlan {
            production_address: production.address,
            dr_address: dr.address,
            record,
        };
        Ok(plan)
    }

    /// A volume by id, or by a name unique in the cluster.
    fn find_volume(&self, state: &State, reference: &str) -> Result<FoundVolume, ApiError> {
        let mut found = Vec::new();
        for node in state.nodes.values() {
            for v in &node.report.volumes {
                if v.id == reference || v.name == reference {
                    found.push(FoundVolume {
                        volume: v.clone(),
                        node: node.record.name.clone(),
                        az: node.record.availability_zone.clone(),
                        address: node.record.address,
                        alive: Self::alive(node),
                    });
                }
            }
        }
        match found.len() {
            0 => Err(ApiError::NotFound(format!(
                "no volume {reference:?} on any node of the cluster (give a volume id, or a name unique in the cluster)"
            ))),
            1 => Ok(found.pop().expect("one")),
            n => Err(ApiError::InvalidArgument(format!(
                "{n} volumes are named {reference:?}; give the volume id"
            ))),
        }
    }

    fn find_pair(state: &State, reference: &str) -> Result<PairId, ApiError> {
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
        if !matches!(
            pair.status,
            PairStatus::Available | PairStatus::Error | PairStatus::ErrorDeleting
        ) {
            return Err(ApiError::FailedPrecondition(format!(
                "pair {} is {}; only an available pair, or one in error, can be deleted",
                pair.name, pair.status
            )));
        }
        let job = JobRecord {
            id: JobId::random(),
            job_type: JobType::DeletePair,
            status: JobStatus::Running,
            begin_time: now_text(),
            end_time: None,
            progress: 0.0,
            fail_reason: None,
            pair: Some(id),
            group: None,
            result: None,
        };
        let mut record = pair.clone();
        record.status = PairStatus::Deleting;
        record.updated_at = Some(now_text());
        record.job = Some(job.id);
        self.commit(&[Change::PutPair(record.clone()), Change::PutJob(job.clone())])?;
        state.pairs.insert(id, record.clone());
        state.jobs.insert(job.id, job.clone());
        state.stuck_since.remove(&id);
        self.kick.notify_one();
        Ok(proto::DeletePairResponse {
            pair: Some(self.pair_view(&state, &record)),
            job: Some(job_view(&job)),
        })
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
    fn check_idle(&self, pair: &PairRecord) -> Result<(), ApiError> {
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

    /// Stores `record` with a new running job of `job_type`, and wakes the driver.
    fn start_job(
        &self,
        state: &mut State,
        record: &mut PairRecord,
        job_type: JobType,
    ) -> Result<JobRecord, ApiError> {
        let job = JobRecord {
            id: JobId::random(),
            job_type,
            status: JobStatus::Running,
            begin_time: now_text(),
            end_time: None,
            progress: 0.0,
            fail_reason: None,
            pair: Some(record.id),
            group: None,
            result: None,
        };
        record.job = Some(job.id);
        record.updated_at = Some(now_text());
        self.commit(&[Change::PutPair(record.clone()), Change::PutJob(job.clone())])?;
        state.pairs.insert(record.id, record.clone());
        state.jobs.insert(job.id, job.clone());
        state.stuck_since.remove(&record.id);
        self.kick.notify_one();
        Ok(job)
    }

    /// A pair as the API shows it: the record, with what its agents last reported.
    fn pair_view(&self, state: &State, p: &PairRecord) -> proto::Pair {
        let report_of = |node: &str| {
            state.nodes.get(node).and_then(|n| {
                let alive = Self::alive(n);
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
        view
    }

    // ---- jobs ----

    pub fn list_jobs(&self) -> Vec<proto::Job> {
        self.lock().jobs.values().map(job_view).collect()
    }

    pub fn get_job(&self, reference: &str) -> Result<proto::Job, ApiError> {
        let state = self.lock();
        reference
            .parse::<JobId>()
            .ok()
            .and_then(|id| state.jobs.get(&id))
            .map(job_view)
            .ok_or_else(|| ApiError::NotFound(format!("no job {reference:?}")))
    }

    // ---- the driver ----

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
        }
    }

    async fn drive_pair(&self, pair: PairRecord) -> Result<(), ApiError> {
        match pair.status {
            PairStatus::Creating if !pair.dr_started => {
                self.creation_step(pair, Side::Dr, |record| record.dr_started = true)
                    .await
            }
            PairStatus::Creating if !pair.production_started => {
                self.creation_step(pair, Side::Production, |record| {
                    record.production_started = true;
                    record.status = PairStatus::Available;
                    record.updated_at = Some(now_text());
                })
                .await
            }
            PairStatus::Deleting => self.drive_delete(pair).await,
            _ if pair.pending.is_some() => self.drive_pending(pair).await,
            _ => self.follow_job(&pair),
        }
    }

    /// A step of a pair's creation: the agent of `side` takes its role (again, if it did
    /// before: that is idempotent); once it has, `taken` is recorded.
    async fn creation_step(
        &self,
        pair: PairRecord,
        side: Side,
        taken: impl FnOnce(&mut PairRecord),
    ) -> Result<(), ApiError> {
        let (production, dr) = self.addresses(&pair);
        let (Some(production), Some(dr)) = (production, dr) else {
            return self.stuck(&pair, "a node of the pair is not registered");
        };
        let (node, address, request) = match side {
            Side::Dr => (
                &pair.dr_node,
                dr,
                Request::BecomeDr(PairPlan::assignment_of(&pair, Side::Dr, production)),
            ),
            Side::Production => (
                &pair.production_node,
                production,
                Request::BecomeProduction(PairPlan::assignment_of(&pair, Side::Production, dr)),
            ),
        };
        if let Err(e) = self.call_agent(node, address, request).await {
            return self.stuck(&pair, &e.to_string());
        }
        let mut record = pair.clone();
        taken(&mut record);
        self.commit(&[Change::PutPair(record.clone())])?;
        let mut state = self.lock();
        state.stuck_since.remove(&pair.id);
        state.pairs.insert(pair.id, record);
        Ok(())
    }

    /// Where the pair's production and DR agents are, if they registered.
    fn addresses(&self, pair: &PairRecord) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let state = self.lock();
        let address = |node: &str| state.nodes.get(node).map(|n| n.record.address);
        (address(&pair.production_node), address(&pair.dr_node))
    }

    /// Tells the agents the step a resolve or a verify starts with.
    async fn drive_pending(&self, pair: PairRecord) -> Result<(), ApiError> {
        let (production, dr) = self.addresses(&pair);
        let (Some(production), Some(dr)) = (production, dr) else {
            return self.stuck(&pair, "a node of the pair is not registered");
        };
        let command = |repair| proto::PairCommand {
            pair_id: pair.id.to_string(),
            job_id: pair.job.map(|j| j.to_string()).unwrap_or_default(),
            repair,
        };
        let done = match pair.pending.expect("filtered") {
            PendingStep::KeepProduction => {
                self.call_agent(
                    &pair.production_node,
                    production,
                    Request::KeepProduction(command(false)),
                )
                .await
            }
            PendingStep::Verify { repair } => {
                self.call_agent(
                    &pair.production_node,
                    production,
                    Request::Verify(command(repair)),
                )
                .await
            }
            PendingStep::SwitchSides => {
                // The record already names the kept side as production: the old
                // production agent steps down first, then the kept side takes over.
                let step_down = PairPlan::assignment_of(&pair, Side::Dr, production);
                let take_over = proto::PairAssignment {
                    discard_peer: true,
                    ..PairPlan::assignment_of(&pair, Side::Production, dr)
                };
                async {
                    self.call_agent(&pair.dr_node, dr, Request::SwitchSide(step_down))
                        .await?;
                    self.call_agent(
                        &pair.production_node,
                        production,
                        Request::SwitchSide(take_over),
                    )
                    .await
                }
                .await
            }
        };
        if let Err(e) = done {
            return self.stuck(&pair, &e.to_string());
        }
        let mut record = pair.clone();
        record.pending = None;
        self.commit(&[Change::PutPair(record.clone())])?;
        let mut state = self.lock();
        state.stuck_since.remove(&pair.id);
        state.step_taken.insert(pair.id, Instant::now());
        state.pairs.insert(pair.id, record);
        Ok(())
    }

    /// A pair's job follows what its agents report: a create or resolve is done once the
    /// pair is active (and fails if its sides diverged); a verify once the production agent
    /// says it ended.
    fn follow_job(&self, pair: &PairRecord) -> Result<(), ApiError> {
        let Some(job_id) = pair.job else {
            return Ok(());
        };
        let (view, verify, fresh, production_diverged) = {
            let state = self.lock();
            let production_diverged = state
                .nodes
                .get(&pair.production_node)
                .and_then(|n| {
                    n.report
                        .pairs
                        .iter()
                        .find(|s| s.pair_id == pair.id.to_string())
                })
                .is_some_and(|s| s.needs_resolve);
            // A report sent before the last step speaks of the pair as it was.
            let fresh = match state.step_taken.get(&pair.id) {
                Some(taken) => state
                    .nodes
                    .get(&pair.production_node)
                    .and_then(|n| n.last_seen)
                    .is_some_and(|seen| seen > *taken + HEARTBEAT_SLACK),
                None => true,
            };
            let verify = state
                .nodes
                .get(&pair.production_node)
                .and_then(|n| {
                    n.report
                        .pairs
                        .iter()
                        .find(|s| s.pair_id == pair.id.to_string())
                })
                .and_then(|s| s.verify.clone())
                .filter(|v| v.job_id == job_id.to_string());
            (
                self.pair_view(&state, pair),
                verify,
                fresh,
                production_diverged,
            )
        };
        if !fresh {
            return Ok(());
        }
        let mut state = self.lock();
        let Some(job) = state.jobs.get(&job_id).cloned() else {
            return Ok(());
        };
        if job.status.is_finished() {
            return Ok(());
        }
        let mut job = job;
        let outcome = match job.job_type {
            JobType::VerifyPair => match verify {
                Some(v) if v.done && v.error.is_empty() => {
                    job.result = Some(verify_result(&v));
                    Some(Ok(()))
                }
                Some(v) if v.done => Some(Err(v.error)),
                Some(v) => {
                    job.progress = v.progress.max(job.progress);
                    None
                }
                None => None,
            },
            _ if production_diverged => Some(Err(view.status_detail.clone())),
            _ if view.replication_status == ReplicationStatus::Active.to_string() => Some(Ok(())),
            _ => {
                job.progress = view.progress.max(job.progress);
                None
            }
        };
        let Some(outcome) = outcome else {
            state.jobs.insert(job.id, job);
            return Ok(());
        };
        job.end(outcome);
        let mut record = pair.clone();
        record.job = None;
        self.commit(&[Change::PutJob(job.clone()), Change::PutPair(record.clone())])?;
        tracing::info!(pair = %pair.id, job = %job.id, job_type = %job.job_type, status = %job.status, "job ended");
        state.jobs.insert(job.id, job);
        state.pairs.insert(record.id, record);
        Ok(())
    }

    async fn drive_delete(&self, pair: PairRecord) -> Result<(), ApiError> {
        let addresses = {
            let state = self.lock();
            (
                state
                    .nodes
                    .get(&pair.production_node)
                    .map(|n| n.record.address),
                state.nodes.get(&pair.dr_node).map(|n| n.record.address),
            )
        };
        let (Some(production), Some(dr)) = addresses else {
            return self.stuck(&pair, "a node of the pair is not registered");
        };
        let leave_production = PairPlan::assignment_of(&pair, Side::Production, dr);
        let leave_dr = PairPlan::assignment_of(&pair, Side::Dr, production);
        let left = async {
            self.call_agent(
                &pair.production_node,
                production,
                Request::LeavePair(leave_production),
            )
            .await?;
            self.call_agent(&pair.dr_node, dr, Request::LeavePair(leave_dr))
                .await
        }
        .await;
        if let Err(e) = left {
            return self.stuck(&pair, &e.to_string());
        }
        let mut changes = vec![Change::DeletePair(pair.id.to_string())];
        let mut state = self.lock();
        if let Some(job) = pair.job.and_then(|j| state.jobs.get(&j)).cloned() {
            let mut job = job;
            job.status = JobStatus::Success;
            job.progress = 1.0;
            job.end_time = Some(now_text());
            changes.push(Change::PutJob(job.clone()));
            state.jobs.insert(job.id, job);
        }
        self.commit(&changes)?;
        state.pairs.remove(&pair.id);
        state.stuck_since.remove(&pair.id);
        state.step_taken.remove(&pair.id);
        state
            .deleted
            .retain(|_, at| at.elapsed() < Duration::from_secs(60));
        state.deleted.insert(pair.id, Instant::now());
        tracing::info!(pair = %pair.id, "pair deleted");
        Ok(())
    }

    /// A pending step failed: keep trying, and after a while fail the operation.
    fn stuck(&self, pair: &PairRecord, reason: &str) -> Result<(), ApiError> {
        let mut state = self.lock();
        let since = *state
            .stuck_since
            .entry(pair.id)
            .or_insert_with(Instant::now);
        if since.elapsed() < AGENT_GIVE_UP {
            tracing::debug!(pair = %pair.id, %reason, "pair step pending; retrying");
            return Ok(());
        }
        let mut record = pair.clone();
        record.status = match pair.status {
            PairStatus::Deleting => PairStatus::ErrorDeleting,
            _ => PairStatus::Error,
        };
        record.failure_detail = Some(reason.to_owned());
        record.updated_at = Some(now_text());
        let mut changes = vec![];
        if let Some(job) = pair.job.and_then(|j| state.jobs.get(&j)).cloned() {
            let mut job = job;
            job.status = JobStatus::Fail;
            job.end_time = Some(now_text());
            job.fail_reason = Some(reason.to_owned());
            changes.push(Change::PutJob(job.clone()));
            state.jobs.insert(job.id, job);
        }
        record.job = None;
        changes.push(Change::PutPair(record.clone()));
        self.commit(&changes)?;
        tracing::error!(pair = %pair.id, %reason, status = %record.status, "pair operation failed");
        state.pairs.insert(pair.id, record);
        state.stuck_since.remove(&pair.id);
        Ok(())
    }

    async fn call_agent(
        &self,
        node: &str,
        address: SocketAddr,
        request: Request,
    ) -> Result<(), ApiError> {
        let response = self
            .agents
            .call(
                node,
                address,
                ClusterRequest {
                    request: Some(request),
                },
            )
            .await?;
        Self::answer_of(node, response)
    }

    /// What an agent's answer says: done, or refused and why.
    fn answer_of(node: &str, response: ClusterResponse) -> Result<(), ApiError> {
        match response.response {
            Some(Response::Done(_)) => Ok(()),
            Some(Response::Error(e)) => Err(e.into()),
            _ => Err(ApiError::Internal(format!(
                "node {node} answered with something unexpected"
            ))),
        }
    }
}

/// A finished verify in words: what was compared, and the ranges that differ.
fn verify_result(v: &proto::VerifyState) -> String {
    let mut text = format!(
        "{} compared, {} differing, {} not compared (dirty or written throughout)",
        blockrep_api::human_bytes(v.verified_bytes),
        blockrep_api::human_bytes(v.differing_bytes),
        blockrep_api::human_bytes(v.unverified_bytes)
    );
    if !v.differing.is_empty() {
        let listed: Vec<String> = v
            .differing
            .iter()
            .take(20)
            .map(|e| format!("{}+{}", e.offset, e.length))
            .collect();
        text.push_str(&format!("; differing: {}", listed.join(", ")));
        if v.differing.len() > 20 {
            text.push_str(&format!(" and {} more", v.differing.len() - 20));
        }
        if v.repaired {
            text.push_str("; copied again from production");
        }
    }
    text
}

/// A record by its id, or by a name no other record of its kind has.
fn find_by_id_or_name<Id, R>(
    records: &BTreeMap<Id, R>,
    reference: &str,
    kind: &str,
    name_of: impl Fn(&R) -> &str,
) -> Result<Id, ApiError>
where
    Id: Copy + Ord + std::str::FromStr,
{
    if let Ok(id) = reference.parse::<Id>()
        && records.contains_key(&id)
    {
        return Ok(id);
    }
    let named: Vec<Id> = records
        .iter()
        .filter(|(_, r)| name_of(r) == reference)
        .map(|(id, _)| *id)
        .collect();
    match named.as_slice() {
        [id] => Ok(*id),
        [] => Err(ApiError::NotFound(format!("no {kind} {reference:?}"))),
        _ => Err(ApiError::InvalidArgument(format!(
            "{} {kind}s are named {reference:?}; give the {kind} id",
            named.len()
        ))),
    }
}

fn job_view(j: &JobRecord) -> proto::Job {
    proto::Job {
        id: j.id.to_string(),
        job_type: j.job_type.to_string(),
        status: j.status.to_string(),
        begin_time: j.begin_time.clone(),
        end_time: j.end_time.clone().unwrap_or_default(),
        progress: j.progress,
        fail_reason: j.fail_reason.clone().unwrap_or_default(),
        pair_id: j.pair.map(|p| p.to_string()).unwrap_or_default(),
        result: j.result.clone().unwrap_or_default(),
        group_id: j.group.map(|g| g.to_string()).unwrap_or_default(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Production,
    Dr,
}

struct FoundVolume {
    volume: proto::Volume,
    node: String,
    az: String,
    address: SocketAddr,
    alive: bool,
}

struct PairPlan {
    record: PairRecord,
    production_address: SocketAddr,
    dr_address: SocketAddr,
}

impl PairPlan {
    fn assignment(&self, side: Side) -> proto::PairAssignment {
        let peer = match side {
            Side::Production => self.dr_address,
            Side::Dr => self.production_address,
        };
        Self::assignment_of(&self.record, side, peer)
    }

    /// What the agent on `side` needs; `peer_address` is the other side's endpoint.
    fn assignment_of(
        p: &PairRecord,
        side: Side,
        peer_address: SocketAddr,
    ) -> proto::PairAssignment {
        let (local, peer, peer_node) = match side {
            Side::Production => (p.production_volume, p.dr_volume, &p.dr_node),
            Side::Dr => (p.dr_volume, p.production_volume, &p.production_node),
        };
        proto::PairAssignment {
            pair_id: p.id.to_string(),
            replication_model: p.model.to_string(),
            local_volume_id: local.to_string(),
            peer_volume_id: peer.to_string(),
            peer_node: peer_node.clone(),
            peer_address: peer_address.to_string(),
            size_bytes: p.size,
            side: match side {
                Side::Production => "production".into(),
                Side::Dr => "dr".into(),
            },
            discard_peer: false,
            generation: 0,
            term: p.term,
            grouped: p.group.is_some(),
        }
    }
}

/// Test-only faults, compiled in only with the `fault-injection` feature.
mod fault {
    /// Aborts the process (as a `kill -9` would end it) once an operation has recorded a
    /// step whose description contains `BLOCKREP_FAULT_COORDINATOR_CRASH_AT`.
    #[cfg(feature = "fault-injection")]
    pub fn crash_at(step: &str) {
        if let Ok(at) = std::env::var("BLOCKREP_FAULT_COORDINATOR_CRASH_AT")
            && !at.is_empty()
            && step.contains(&at)
        {
            tracing::error!(step, "fault injection: the coordinator dies here");
            std::process::abort();
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    pub fn crash_at(_step: &str) {}
}
