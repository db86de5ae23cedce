//! This daemon in its cluster: the QUIC endpoint, the coordinator if this daemon runs it,
//! its pairs, and its heartbeat to the coordinator.
//!
//! Every daemon serves the whole API on its local socket. Calls about pairs, jobs and
//! nodes go to the coordinator: handled here if this daemon runs it, forwarded over QUIC
//! otherwise.

use blockrep_core::replication::undo::Retention;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use blockrep_api::ApiError;
use blockrep_api::proto::{
    self, ClusterRequest, ClusterResponse, cluster_request::Request, cluster_response::Response,
};
use blockrep_coordinator::{Agents, Coordinator, RedbStore};
use blockrep_core::ByteRange;
use blockrep_core::replication::group_cut::{CutMode, RoundOutcome};
use blockrep_core::replication::{Epoch, GenerationId, PairId};
use blockrep_replication::TransportSettings;
use blockrep_replication::endpoint::{
    BoxFuture, ClusterEndpoint, Inbound, Peer, Refusal, ReplicationStream, error_response,
};
use blockrep_replication::membership::{Fence, Side};
use blockrep_tls::NodeTls;
use blockrep_volume::DIRECT_IO_ALIGN;
use blockrep_wire::Hello;
use std::sync::Mutex;

use crate::agent::Agent;
use crate::config::{ClusterConfig, CoordinatorStore};
use crate::pair_proto::{self, pair_states};

mod authority;
use authority::Sender;
mod leader_term;
use leader_term::LeaderTerm;
mod leadership;
use leadership::CoordinatorRole;

/// How often this node reports to the coordinator.
const HEARTBEAT: Duration = Duration::from_secs(1);
const GROUP_HOLD_TIMEOUT: Duration =
    Duration::from_millis(blockrep_core::replication::group_cut::HOLD_TIMEOUT_MS);

pub struct Cluster {
    pub config: ClusterConfig,
    pub endpoint: Arc<ClusterEndpoint>,
    /// The coordinator this daemon runs now, if any.
    role: CoordinatorRole,
    /// The coordinator this daemon's calls go to first: the one that answered last.
    leader_hint: Mutex<SocketAddr>,
    /// The highest coordinator term this agent has seen.
    leader_term: LeaderTerm,
    agent: Arc<Agent>,
}

/// What the endpoint's streams reach: set once everything is built.
struct Handler {
    cluster: OnceLock<Arc<Cluster>>,
}

/// The coordinator's way to an agent: its own in-process, others over QUIC.
struct AgentsOverQuic {
    cluster: OnceLock<Arc<Cluster>>,
}

impl Cluster {
    /// Binds the endpoint, opens the coordinator's store if this daemon runs it, takes up
    /// the volumes' pair roles, and starts the heartbeat.
    pub fn start(agent: Arc<Agent>, config: ClusterConfig) -> anyhow::Result<Arc<Self>> {
        let tls = NodeTls::load(&config.tls)?;
        // Peers know this node by its certificate: its name and role must be the ones this
        // daemon acts in.
        let identity = tls.identity()?;
        if identity.node != agent.config.node_name {
            anyhow::bail!(
                "node_name is {:?}, but the certificate {} is node {:?}: issue this node's certificate with --node {}",
                agent.config.node_name,
                config.tls.cert.display(),
                identity.node,
                agent.config.node_name
            );
        }
        if config.coordinator_role && !identity.is_coordinator() {
            anyhow::bail!(
                "coordinator_role is on, but the certificate {} is not a coordinator's: issue it with `blockrep cluster issue-cert --coordinator`",
                config.tls.cert.display()
            );
        }
        let handler = Arc::new(Handler {
            cluster: OnceLock::new(),
        });
        let endpoint = ClusterEndpoint::bind(
            config.listen,
            &tls,
            Arc::clone(&handler) as Arc<dyn Inbound>,
            TransportSettings {
                peer_timeout: config.peer_timeout,
                congestion: config.congestion,
                max_udp_payload: config.max_udp_payload,
            },
        )?;
        agent.pairs().set_endpoint(Arc::clone(&endpoint));
        let agents = Arc::new(AgentsOverQuic {
            cluster: OnceLock::new(),
        });
        let role = CoordinatorRole::default();
        let mut candidate_of = None;
        if config.coordinator_role {
            match &config.coordinator_store {
                CoordinatorStore::Redb => {
                    let path = agent.config.state_dir.join("coordinator.redb");
                    let store = RedbStore::open(&path).map_err(|e| {
                        anyhow::anyhow!("open the coordinator store {}: {e}", path.display())
                    })?;
                    let coordinator = Coordinator::open(
                        Arc::new(store),
                        Arc::clone(&agents) as Arc<dyn Agents>,
                        agent.config.node_name.clone(),
                        Arc::new(blockrep_coordinator::SystemClock),
                    )
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                    tokio::spawn(Arc::clone(&coordinator).drive());
                    // Async consistency groups are cut at the interval lone pairs cut at.
                    tokio::spawn(
                        Arc::clone(&coordinator)
                            .cut_groups(agent.config.replication.epoch_interval),
                    );
                    role.set_single(coordinator);
                }
                CoordinatorStore::Etcd {
                    settings,
                    lease_ttl,
                } => candidate_of = Some((settings.clone(), *lease_ttl)),
            }
        }
        let leader_term = LeaderTerm::load(&agent.config.state_dir)?;
        let cluster = Arc::new(Self {
            leader_hint: Mutex::new(config.coordinators[0]),
            config,
            endpoint,
            role,
            leader_term,
            agent: Arc::clone(&agent),
        });
        if let Some((settings, ttl)) = candidate_of {
            tokio::spawn(Arc::clone(&cluster).lead(settings, ttl));
        }
        let _ = handler.cluster.set(Arc::clone(&cluster));
        let _ = agents.cluster.set(Arc::clone(&cluster));
        agent.restore_pairs();
        agent.serve_drills();
        tokio::spawn(Arc::clone(&cluster).heartbeat());
        tracing::info!(listen = %cluster.config.listen, coordinators = ?cluster.config.coordinators,
            coordinator_role = cluster.config.coordinator_role, "cluster endpoint up");
        Ok(cluster)
    }

    /// A cluster call, answered by the coordinator wherever it runs.
    pub async fn coordinator_call(&self, request: Request) -> Result<Response, ApiError> {
        self.coordinator_call_as(None, request).await
    }

    /// A cluster call on behalf of the REST API's caller (`scope`: its token and the
    /// project it names), or of the operator (`None`: the local API).
    pub async fn coordinator_call_as(
        &self,
        scope: Option<blockrep_api::proto::ApiScope>,
        request: Request,
    ) -> Result<Response, ApiError> {
        let project = scope.as_ref().map(|s| s.project_id.clone());
        let request = ClusterRequest {
            request: Some(request),
            scope,
            leader_term: 0,
        };
        // A heartbeat does not wait for an election: it comes again in a second.
        let patient = !matches!(request.request, Some(Request::Report(_)));
        let response = match self.role.leading() {
            Some(coordinator) => coordinator.handle(request, self.config.listen).await,
            None => self.call_coordinator(&request, patient).await?,
        };
        answer_for(project.as_deref(), response)
    }

    /// Reports this node to the coordinator every second: registration and liveness.
    async fn heartbeat(self: Arc<Self>) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reachable = true;
        loop {
            // A pair of a hypermetro group that trips is reported at once (its writes wait),
            // and a production side whose status changed (jobs wait on it).
            tokio::select! {
                _ = tick.tick() => {}
                () = self.agent.pairs().report_now().notified() => {}
            }
            // A group cut whose release never came (the coordinator is away) ends here.
            self.agent.pairs().release_stale_holds(GROUP_HOLD_TIMEOUT);
            let report = self.report();
            match self.coordinator_call(Request::Report(report)).await {
                Ok(Response::ReportAck(ack)) => {
                    // The roles of a coordinator whose term is over are not taken up. Taking
                    // a newer term waits for the commands of the current one: off the
                    // runtime's workers.
                    let cluster = Arc::clone(&self);
                    let taken = tokio::task::spawn_blocking(move || {
                        let _term = cluster
                            .leader_term
                            .admit(ack.leader_term, "a report's answer")?;
                        cluster.take_up_roles(&ack.roles);
                        Ok::<(), ApiError>(())
                    })
                    .await;
                    match taken {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "the roles a report's answer gives are not taken up")
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "taking up the roles a report's answer gives failed")
                        }
                    }
                    if !reachable {
                        tracing::info!("coordinator reachable again");
                    }
                    reachable = true;
                }
                Ok(_) => {}
                Err(e) => {
                    if reachable {
                        tracing::warn!(error = %e, "cannot report to the coordinator; replication goes on");
                    }
                    reachable = false;
                }
            }
        }
    }

    /// What the coordinator's records say of this node's sides: a production side waiting for
    /// confirmation takes writes again, or, if its group failed over while it was away, is
    /// demoted (it takes no writes until reprotect).
    fn take_up_roles(&self, roles: &[proto::PairRole]) {
        let pairs = self.agent.pairs();
        for role in roles {
            let Ok(pair) = role.pair_id.parse::<PairId>() else {
                continue;
            };
            let Some((_, Side::Production)) = pairs.volume_pair_by_id(pair) else {
                continue;
            };
            let limit = (role.max_bytes_per_sec > 0).then_some(role.max_bytes_per_sec);
            if let Err(e) = pairs.set_max_bytes_per_sec(pair, limit) {
                tracing::warn!(%pair, error = %e, "cannot take up the pair's send limit");
            }
            let outcome = match role.side.as_str() {
                "production" => {
                    pairs.confirm(pair);
                    Ok(())
                }
                _ => pairs.set_fence(pair, Some(Fence::Demoted), role.term),
            };
            if let Err(e) = outcome {
                tracing::warn!(%pair, error = %e, "cannot take up the role the coordinator gives");
            }
        }
    }

    fn report(&self) -> proto::NodeReport {
        proto::NodeReport {
            node: self.agent.config.node_name.clone(),
            availability_zone: self.agent.config.availability_zone.clone(),
            volumes: self.agent.volume_protos(),
            pairs: pair_states(self.agent.pairs()),
            peers_refused: self
                .endpoint
                .counters
                .peers_refused
                .load(std::sync::atomic::Ordering::Relaxed),
            requests_refused: self.endpoint.counters.refused_total(),
            pool: crate::agent::pool_proto(&self.agent),
            coordinator_candidate: matches!(
                self.config.coordinator_store,
                CoordinatorStore::Etcd { .. }
            ) && self.config.coordinator_role,
        }
    }

    /// The coordinator this daemon runs now, if any.
    pub fn coordinator(&self) -> Option<Arc<Coordinator>> {
        self.role.leading()
    }

    /// The highest coordinator term this agent has seen.
    pub fn followed_term(&self) -> u64 {
        self.leader_term.highest()
    }

    /// Commits etcd refused because this daemon's leader term was over.
    pub fn fenced_commits(&self) -> u64 {
        self.role.fenced_commits()
    }

    /// Runs a coordinator's command on this agent, if its term is not older than the
    /// highest this agent has seen; the term is held while the command runs.
    fn command(
        &self,
        request: Request,
        term: u64,
        peer: Option<SocketAddr>,
    ) -> Result<Response, AgentRefusal> {
        let started = std::time::Instant::now();
        let newer = term > self.leader_term.highest();
        let (name, _) = authority::classify(&request);
        let _term = self
            .leader_term
            .admit(term, name)
            .map_err(AgentRefusal::StaleTerm)?;
        let admitted = started.elapsed();
        if newer && let Some(peer) = peer {
            self.follow(peer);
        }
        let answer = self.agent_request(request);
        tracing::debug!(
            command = name,
            admit_us = admitted.as_micros() as u64,
            took_us = started.elapsed().as_micros() as u64,
            "coordinator command"
        );
        answer
    }

    /// Makes a pool volume for the coordinator. Asking again for a volume the pool made
    /// already (same name, size and project) answers it: the coordinator repeats a step it
    /// has no answer for.
    fn create_pool_volume(&self, c: proto::CreateVolumeRequest) -> Result<Response, ApiError> {
        let name = blockrep_core::VolumeName::try_from(c.name).map_err(ApiError::BadName)?;
        let project = blockrep_api::model::ProjectId::or_default(c.project_id)?;
        let view = self
            .agent
            .create_volume(name, c.size_bytes, project, true)?;
        Ok(Response::Volume(crate::agent::volume_proto(
            &self.agent.config,
            view,
        )))
    }

    /// A call the coordinator makes to this agent.
    fn agent_request(&self, request: Request) -> Result<Response, AgentRefusal> {
        let pair_ids = |ids: &[String]| -> Result<Vec<PairId>, ApiError> {
            ids.iter()
                .map(|id| {
                    id.parse()
                        .map_err(|e| ApiError::InvalidArgument(format!("pair id: {e}")))
                })
                .collect()
        };
        let pairs = self.agent.pairs();
        let pair_id = |id: &str| {
            id.parse()
                .map_err(|e| ApiError::InvalidArgument(format!("pair id: {e}")))
        };
        let (assignment, side) = match request {
            Request::BecomeDr(a) => (a, Some(Side::Dr)),
            Request::BecomeProduction(a) => (a, Some(Side::Production)),
            Request::LeavePair(a) => (a, None),
            Request::SwitchSide(a) => {
                let handle = self.agent.volume_handle(&a.local_volume_id)?;
                let (membership, shared) = pair_proto::switch_of(&a)?;
                pairs.switch_side(membership, shared, handle)?;
                self.agent.stop_serving_ended_drills();
                return Ok(Response::Done(proto::Done {}));
            }
            Request::KeepProduction(c) => {
                pairs.keep_production(pair_id(&c.pair_id)?)?;
                return Ok(Response::Done(proto::Done {}));
            }
            Request::Verify(c) => {
                pairs.start_verify(pair_id(&c.pair_id)?, c.job_id, c.repair)?;
                return Ok(Response::Done(proto::Done {}));
            }
            Request::GroupCut(c) => {
                let ids = pair_ids(&c.pair_ids)?;
                let mode = CutMode::from_code(c.mode).ok_or_else(|| {
                    ApiError::InvalidArgument(format!("cut mode {} is not known", c.mode))
                })?;
                let answer = pairs.group_cut(&ids, Epoch(c.epoch), mode, c.digests, c.cut_ms)?;
                return Ok(Response::CutAck(cut_ack(answer)));
            }
            Request::GroupStaged(c) => {
                let answer = pairs.group_staged(&pair_ids(&c.pair_ids)?)?;
                return Ok(Response::CutAck(cut_ack(answer)));
            }
            Request::GroupRelease(c) => {
                let outcome = RoundOutcome {
                    tripped: c.tripped,
                    synchronous: c.synchronous,
                };
                pairs.group_release(&pair_ids(&c.pair_ids)?, Epoch(c.epoch), outcome);
                return Ok(Response::Done(proto::Done {}));
            }
            Request::GroupCommit(c) => {
                let epoch = c.grouped.then_some(Epoch(c.epoch));
                let retention = c.retention.map_or_else(Retention::default, |r| Retention {
                    max_age_secs: r.max_age_secs,
                    max_bytes: r.max_bytes,
                    keep_hourly: r.keep_hourly,
                });
                pairs.group_commit(&pair_ids(&c.pair_ids)?, epoch, retention)?;
                return Ok(Response::Done(proto::Done {}));
            }
            Request::ListPoints(c) => {
                let mut answer = proto::VolumePoints::default();
                for pair in pair_ids(&c.pair_ids)? {
                    let (points, detail) = match pairs.points(pair) {
                        Ok(points) => (points, String::new()),
                        Err(e) => (Vec::new(), e.to_string()),
                    };
                    answer.pairs.push(proto::PairPoints {
                        pair_id: pair.to_string(),
                        points: points
                            .iter()
                            .map(|p| proto::GroupPoint {
                                epoch: p.point.epoch.0,
                                cut_at: String::new(),
                                cut_ms: p.point.cut_ms,
                                bytes_behind: p.bytes_behind,
                            })
                            .collect(),
                        detail,
                    });
                }
                return Ok(Response::VolumePoints(answer));
            }
            Request::ProductionGrouping(c) => {
                pairs.set_production_grouped(&pair_ids(&c.pair_ids)?, c.grouped);
                return Ok(Response::Done(proto::Done {}));
            }
            Request::PausePair(c) => {
                pairs.set_paused(pair_id(&c.pair_id)?, true)?;
                return Ok(Response::Done(proto::Done {}));
            }
            Request::ResumePair(c) => {
                pairs.set_paused(pair_id(&c.pair_id)?, false)?;
                return Ok(Response::Done(proto::Done {}));
            }
            Request::Promote(c) => {
                let handle = self.agent.volume_handle(&c.volume_id)?;
                let promotion = pairs.promote(
                    pair_id(&c.pair_id)?,
                    c.has_commit.then_some(Epoch(c.commit)),
                    c.has_point.then_some(Epoch(c.point)),
                    GenerationId(c.generation),
                    c.term,
                    handle,
                )?;
                self.agent.stop_serving_ended_drills();
                return Ok(Response::Promoted(proto::Promoted {
                    epoch: promotion.epoch.0,
                    cut_ms: promotion.cut_ms,
                    dropped_bytes: promotion.dropped_bytes,
                    rolled_back_bytes: promotion.rolled_back_bytes,
                }));
            }
            Request::CreateDrill(c) => {
                let record = blockrep_replication::drill::DrillRecord {
                    drill: c.drill_id,
                    export: c.export,
                    point: Epoch(c.point),
                };
                check_export_name(&record.export)?;
                check_export_name(&record.drill)?;
                // Drills and volumes share the socket directory.
                if self.agent.get(&record.export).is_ok() {
                    return Err(ApiError::AlreadyExists(format!(
                        "export {} is a volume's name",
                        record.export
                    ))
                    .into());
                }
                let drill = pairs.create_drill(pair_id(&c.pair_id)?, record)?;
                if let Err(e) = self.agent.serve_drill(drill.export()) {
                    let _ = pairs.delete_drill(pair_id(&c.pair_id)?, &drill.record().drill);
                    return Err(e.into());
                }
                return Ok(Response::Done(proto::Done {}));
            }
            Request::DeleteDrill(c) => {
                check_export_name(&c.export)?;
                check_export_name(&c.drill_id)?;
                pairs.delete_drill(pair_id(&c.pair_id)?, &c.drill_id)?;
                self.agent.stop_serving_drill(&c.export);
                return Ok(Response::Done(proto::Done {}));
            }
            Request::CheckDrill(c) => {
                let drill = c.drill.unwrap_or_default();
                let check =
                    pairs.check_drill(pair_id(&drill.pair_id)?, &drill.drill_id, c.start)?;
                return Ok(Response::DrillCheck(drill_check_proto(&check)));
            }
            Request::HoldPoint(c) => {
                pairs.hold_point(&pair_ids(&c.pair_ids)?, Epoch(c.epoch))?;
                return Ok(Response::Done(proto::Done {}));
            }
            Request::Fence(c) => {
                let fence = match c.fence.as_str() {
                    "" => None,
                    "draining" => Some(Fence::Draining),
                    "demoted" => Some(Fence::Demoted),
                    other => {
                        return Err(ApiError::InvalidArgument(format!(
                            "fence {other:?} is not draining, demoted or empty"
                        ))
                        .into());
                    }
                };
                pairs.set_fence(pair_id(&c.pair_id)?, fence, c.term)?;
                return Ok(Response::Done(proto::Done {}));
            }
            Request::DirtyRuns(c) => {
                let pair = pair_id(&c.pair_id)?;
                let handle = self.agent.pair_volume_handle(pair)?;
                let runs = pairs.dirty_runs(pair, &handle)?;
                return Ok(Response::Dirty(proto::DirtyRuns {
                    runs: runs
                        .into_iter()
                        .map(|r| proto::Extent {
                            offset: r.offset,
                            length: r.len,
                        })
                        .collect(),
                }));
            }
            Request::Extend(c) => {
                let current = self.agent.volume_handle(&c.volume_id)?.volume.size();
                check_extend(c.size_bytes, current)?;
                self.agent.extend_volume(&c.volume_id, c.size_bytes)?;
                return Ok(Response::Done(proto::Done {}));
            }
            Request::CreatePoolVolume(c) => return self.create_pool_volume(c).map_err(Into::into),
            Request::DeletePoolVolume(v) => {
                // Deleting what is gone already is done (the coordinator may ask again).
                match self.agent.get(&v.volume) {
                    Err(ApiError::VolumeNotFound(_)) => {}
                    _ => {
                        self.agent.delete_volume(&v.volume)?;
                    }
                }
                return Ok(Response::Done(proto::Done {}));
            }
            // The term the request carries was taken as the command was admitted.
            Request::AdoptTerm(_) => return Ok(Response::Done(proto::Done {})),
            Request::MarkDirty(c) => {
                let pair = pair_id(&c.pair_id)?;
                let size = self.agent.pair_volume_handle(pair)?.volume.size();
                let ranges = checked_runs(&c.runs, size)?;
                pairs.mark_dirty(pair, &ranges)?;
                return Ok(Response::Done(proto::Done {}));
            }
            other => {
                return Err(ApiError::InvalidArgument(format!(
                    "{} is not a command agents serve",
                    authority::classify(&other).0
                ))
                .into());
            }
        };
        let handle = self.agent.volume_handle(&assignment.local_volume_id)?;
        match side {
            Some(side) => self
                .agent
                .pairs()
                .take_role(pair_proto::membership_of(&assignment, side)?, handle)?,
            None => {
                let pair = assignment
                    .pair_id
                    .parse()
                    .map_err(|e| ApiError::InvalidArgument(format!("pair id: {e}")))?;
                self.agent.pairs().leave(pair, handle)?;
                self.agent.stop_serving_ended_drills();
            }
        }
        Ok(Response::Done(proto::Done {}))
    }
}

/// Why an agent command was not carried out.
enum AgentRefusal {
    /// A range or size in it does not fit the volume: refused (400) and counted as
    /// `bad_range`, before anything is marked or grown.
    OutOfBounds(String),
    /// The command's coordinator term is older than the highest this node has seen:
    /// refused (409) and counted as `stale_term`.
    StaleTerm(ApiError),
    /// Anything else, as the API answers it.
    Api(ApiError),
}

impl From<ApiError> for AgentRefusal {
    fn from(e: ApiError) -> Self {
        AgentRefusal::Api(e)
    }
}

impl From<AgentRefusal> for ApiError {
    fn from(refusal: AgentRefusal) -> Self {
        match refusal {
            AgentRefusal::OutOfBounds(what) => ApiError::InvalidArgument(what),
            AgentRefusal::StaleTerm(e) | AgentRefusal::Api(e) => e,
        }
    }
}

/// A production host's answer to a cut, or to the question what it staged, on the wire.
fn cut_ack(answer: blockrep_replication::pairs::CutAnswer) -> proto::GroupCutAck {
    proto::GroupCutAck {
        staged: answer.staged.0,
        synchronous: answer.synchronous,
        atomic: answer
            .atomic
            .into_iter()
            .map(|s| proto::AtomicSpan {
                from: s.from.0,
                to: s.to.map_or(0, |t| t.0),
                open: s.to.is_none(),
            })
            .collect(),
    }
}

/// A `MarkDirty`'s runs, each built checked against a volume of `size` bytes (no wrap past
/// u64::MAX, nothing past the end).
fn checked_runs(runs: &[proto::Extent], size: u64) -> Result<Vec<ByteRange>, AgentRefusal> {
    runs.iter()
        .map(|e| ByteRange::within(e.offset, e.length, size))
        .collect::<Result<_, _>>()
        .map_err(|e| AgentRefusal::OutOfBounds(format!("mark dirty: {e}")))
}

/// An `Extend` to `size` bytes of a volume of `current`: a multiple of the block size, and
/// no smaller (the same size again is a retry, and changes nothing). Whether the backing
/// can hold it, the volume says before anything grows.
fn check_extend(size: u64, current: u64) -> Result<(), AgentRefusal> {
    if !size.is_multiple_of(DIRECT_IO_ALIGN) {
        return Err(AgentRefusal::OutOfBounds(format!(
            "extend: {size} bytes is not a multiple of {DIRECT_IO_ALIGN}"
        )));
    }
    if size < current {
        return Err(AgentRefusal::OutOfBounds(format!(
            "extend: the volume is {current} bytes; a volume grows, it never shrinks (asked for {size})"
        )));
    }
    Ok(())
}

impl Inbound for Handler {
    /// Each request is authorised by the sender's certificate first ([`authority`]): a
    /// refusal is logged, counted and answered 403, and nothing else happens. Agent commands
    /// go to this agent; everything else to the coordinator, if this daemon runs it.
    fn request(&self, request: ClusterRequest, peer: Peer) -> BoxFuture<'_, ClusterResponse> {
        Box::pin(async move {
            let Some(cluster) = self.cluster.get() else {
                return error_response(503, "the node is starting".into());
            };
            let (scope, leader_term) = (request.scope, request.leader_term);
            let Some(request) = request.request else {
                return error_response(400, "empty request".into());
            };
            let counters = &cluster.endpoint.counters;
            if let Err(refused) = authority::authorise(&request, &peer.identity) {
                counters.refuse(&peer, refused.reason, &refused.what);
                return error_response(403, format!("refused: {}", refused.what));
            }
            match authority::classify(&request).1 {
                Sender::Coordinator => {
                    let owner = Arc::clone(cluster);
                    let (term, from) = (leader_term, peer.address);
                    let answer = tokio::task::spawn_blocking(move || {
                        owner.command(request, term, Some(from))
                    })
                    .await
                    .unwrap_or_else(|e| Err(ApiError::Internal(e.to_string()).into()))
                    .map_err(|refusal| {
                        match &refusal {
                            AgentRefusal::OutOfBounds(what) => {
                                counters.refuse(&peer, Refusal::BadRange, what);
                            }
                            AgentRefusal::StaleTerm(e) => {
                                counters.refuse(&peer, Refusal::StaleTerm, &e.to_string());
                            }
                            AgentRefusal::Api(_) => {}
                        }
                        ApiError::from(refusal)
                    });
                    ClusterResponse {
                        response: Some(answer.unwrap_or_else(|e| Response::Error(e.into()))),
                        answered_for_project: String::new(),
                    }
                }
                Sender::ItsOwnNode | Sender::AnyNode => match cluster.role.leading() {
                    Some(coordinator) => {
                        // A REST call keeps its caller's token: the coordinator answers for
                        // that project only.
                        let request = ClusterRequest {
                            request: Some(request),
                            scope,
                            leader_term: 0,
                        };
                        coordinator.handle(request, peer.address).await
                    }
                    None if cluster.role.is_candidate() => ClusterResponse {
                        response: Some(Response::NotLeader(cluster.role.not_leader().await)),
                        answered_for_project: String::new(),
                    },
                    None => error_response(
                        503,
                        format!(
                            "node {} does not run the coordinator (it is at {:?})",
                            cluster.agent.config.node_name, cluster.config.coordinators
                        ),
                    ),
                },
            }
        })
    }

    fn replication(
        &self,
        hello: Hello,
        peer: Peer,
        stream: ReplicationStream,
    ) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(cluster) = self.cluster.get() {
                cluster
                    .agent
                    .pairs()
                    .replication_stream(hello, peer, stream)
                    .await;
            }
        })
    }
}

impl Agents for AgentsOverQuic {
    fn call(
        &self,
        node: &str,
        address: SocketAddr,
        request: ClusterRequest,
    ) -> BoxFuture<'_, Result<ClusterResponse, ApiError>> {
        let node = node.to_owned();
        Box::pin(async move {
            let cluster = self
                .cluster
                .get()
                .ok_or_else(|| ApiError::Unavailable("the node is starting".into()))?;
            if node == cluster.agent.config.node_name {
                let term = request.leader_term;
                let Some(request) = request.request else {
                    return Err(ApiError::InvalidArgument("empty request".into()));
                };
                let cluster = Arc::clone(cluster);
                let answer =
                    tokio::task::spawn_blocking(move || cluster.command(request, term, None))
                        .await
                        .unwrap_or_else(|e| Err(ApiError::Internal(e.to_string()).into()))
                        .map_err(ApiError::from);
                return Ok(ClusterResponse {
                    response: Some(answer.unwrap_or_else(|e| Response::Error(e.into()))),
                    answered_for_project: String::new(),
                });
            }
            cluster
                .endpoint
                .call(address, &node, &request)
                .await
                .map_err(|e| ApiError::Unavailable(format!("node {node}: {e}")))
        })
    }
}

/// What a coordinator's answer says. A REST call's (`project`: the project it named) is
/// taken only if the coordinator says it answered for that project: one that does not check
/// tokens (an older version drops the scope it does not know) would have answered as for
/// the operator, so its answer is refused.
fn answer_for(project: Option<&str>, response: ClusterResponse) -> Result<Response, ApiError> {
    match response.response {
        Some(Response::Error(e)) => Err(e.into()),
        Some(_)
            if project.is_some_and(|p| p.is_empty() || p != response.answered_for_project) =>
        {
            Err(ApiError::Internal(
                "the coordinator answered without checking the REST API's token (is it an older blockrepd?): the call is refused".into(),
            ))
        }
        Some(other) => Ok(other),
        None => Err(ApiError::Internal(
            "empty answer from the coordinator".into(),
        )),
    }
}

/// An export name a socket file can take (the coordinator makes them so; checked all the
/// same, since it names a file).
fn check_export_name(export: &str) -> Result<(), ApiError> {
    let fine = !export.is_empty()
        && export.len() <= 200
        && !export.starts_with('.')
        && export
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if fine {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(format!(
            "export name {export:?} is not a file name"
        )))
    }
}

/// A drill volume's verification, as the coordinator gathers it.
fn drill_check_proto(
    check: &blockrep_replication::drill::check::DrillCheck,
) -> proto::DrillVolumeCheck {
    proto::DrillVolumeCheck {
        state: check.state.name().into(),
        progress: check.progress,
        compared_bytes: check.compared_bytes,
        differing_bytes: check.differing.bytes,
        not_comparable_bytes: check.not_comparable.bytes,
        differing: extents(&check.differing.ranges),
        not_comparable: extents(&check.not_comparable.ranges),
        error: check.error.clone(),
        finished_at: if check.finished_ms == 0 {
            String::new()
        } else {
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(check.finished_ms),
            )
            .to_string()
        },
        ..Default::default()
    }
}

fn extents(ranges: &[blockrep_core::ByteRange]) -> Vec<proto::Extent> {
    ranges
        .iter()
        .map(|r| proto::Extent {
            offset: r.offset,
            length: r.len,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out_of_bounds<T>(result: Result<T, AgentRefusal>) -> String {
        match result {
            Err(AgentRefusal::OutOfBounds(what)) => what,
            Err(AgentRefusal::Api(e) | AgentRefusal::StaleTerm(e)) => {
                panic!("refused for another reason: {e}")
            }
            Ok(_) => panic!("not refused"),
        }
    }

    /// A REST call's answer from a coordinator that did not say it answered for the call's
    /// project (one that does not know tokens) is refused; the operator's calls, and
    /// refusals, are taken as they come.
    #[test]
    fn a_rest_answer_not_given_for_its_project_is_refused() {
        let listed = |answered_for: &str| ClusterResponse {
            response: Some(Response::Pairs(proto::ListPairsResponse::default())),
            answered_for_project: answered_for.into(),
        };
        assert!(answer_for(Some("tenant-a"), listed("tenant-a")).is_ok());
        let old_coordinator = answer_for(Some("tenant-a"), listed("")).unwrap_err();
        assert!(
            old_coordinator.to_string().contains("without checking"),
            "{old_coordinator}"
        );
        assert!(answer_for(Some("tenant-a"), listed("tenant-b")).is_err());
        assert!(answer_for(None, listed("")).is_ok());
        // A call that named no project is answered for none, as an old coordinator's is.
        assert!(answer_for(Some(""), listed("")).is_err());
        let refused = ClusterResponse {
            response: Some(Response::Error(proto::ClusterError {
                code: 401,
                message: "unknown token".into(),
            })),
            answered_for_project: String::new(),
        };
        assert_eq!(
            answer_for(Some("tenant-a"), refused).unwrap_err().code(),
            401
        );
    }

    #[test]
    fn mark_dirty_runs_must_fit_the_volume() {
        let run = |offset, length| proto::Extent { offset, length };
        let size = 1 << 20;
        assert_eq!(
            checked_runs(&[run(0, 4096), run(size - 4096, 4096)], size).ok(),
            Some(vec![
                ByteRange::new(0, 4096),
                ByteRange::new(size - 4096, 4096)
            ])
        );
        let past_end = out_of_bounds(checked_runs(&[run(0, 4096), run(0, u64::MAX)], size));
        assert!(past_end.contains("past the end"), "{past_end}");
        let wraps = out_of_bounds(checked_runs(&[run(u64::MAX - 1, 2)], size));
        assert!(wraps.contains("overflows"), "{wraps}");
    }

    #[test]
    fn an_extend_is_aligned_and_never_shrinks() {
        let current = 64 << 20;
        assert!(check_extend(current, current).is_ok(), "a retry");
        assert!(check_extend(2 * current, current).is_ok());
        assert!(out_of_bounds(check_extend(current + 512, current)).contains("multiple"));
        assert!(out_of_bounds(check_extend(current / 2, current)).contains("never shrinks"));
        assert!(out_of_bounds(check_extend(u64::MAX, current)).contains("multiple"));
    }
}
