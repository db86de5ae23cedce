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
//!
//! This file holds the [`Coordinator`] and its in-memory `State`, how it opens on a
//! [`Store`] with a [`Clock`] (every timer reads it: liveness, give-ups, retries), and the dispatch of the cluster requests it serves ([`Coordinator::handle`]).
//! The rest is one module per aggregate, each an `impl Coordinator` block:
//!
//! | module | what it holds |
//! |---|---|
//! | `nodes` | reports (registration, liveness), the node list, the roles a report is answered with |
//! | `pairs` | a pair's requests (list, show, delete, resolve, verify) and its view; `pairs::create` its creation |
//! | `jobs` | the job list, a pair's job started and followed to its end |
//! | `pair_steps` | a pair's lifecycle as a planner: from its record, the agent calls of its next step and the changes once they were taken (or given up) |
//! | `driver` | the loop that moves pairs through their lifecycle (making `pair_steps`' calls, storing its changes), and the calls to agents |
//! | `groups` | consistency groups: create, list, show, update, delete, sync and stop |
//! | `group_steps` | a group operation as a planner: from its plan, each pair's next agent call, what an answer marks in the plan, the changes that end it |
//! | `operations` | a group's failover, reverse, reprotect and extend: the requests, their plans, and the driver's round that makes `group_steps`' calls and stores what they return |
//! | `cuts` | the cut loop of the groups' epochs |

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

use crate::records::{
    GroupRecord, JobAbout, JobRecord, NodeRecord, PairRecord, PendingStep, TokenRecord, now_text,
};

use crate::clock::Clock;
use crate::store::{Change, Store};

mod cuts;
pub use cuts::CutStats;
mod drills;
mod driver;
mod group_steps;
mod groups;
mod jobs;
mod nodes;
mod operations;
mod pair_steps;
mod pairs;
mod points;
mod projects;
pub use projects::Caller;
mod protection;
mod tokens;

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
    /// What each group's cut rounds did since the coordinator started (for its metrics).
    cut_stats: BTreeMap<blockrep_core::replication::GroupId, cuts::CutStats>,
    /// Groups whose first cut waits for reports: since when, and when it last warned.
    cuts_waiting: BTreeMap<blockrep_core::replication::GroupId, (Instant, Instant)>,
    /// When a group operation's step first failed to reach an agent.
    group_stuck_since: BTreeMap<blockrep_core::replication::GroupId, Instant>,
    /// When each reverse (group, term) began draining, by the coordinator's clock.
    draining_since: BTreeMap<blockrep_core::replication::GroupId, (u64, Instant)>,
    /// Failovers whose production sides were sent their fence.
    fences_sent: std::collections::BTreeSet<blockrep_core::replication::GroupId>,
    /// Volumes (by id) a pair creation has claimed and not yet recorded in `pairs`.
    claimed: std::collections::BTreeSet<String>,
    /// The REST API's tokens, by id.
    tokens: BTreeMap<String, TokenRecord>,
    /// Where each new pair of a group's membership change last stood (status, replication
    /// status and progress): waiting goes on while it moves.
    add_progress:
        BTreeMap<blockrep_core::replication::GroupId, (PairStatus, Option<(String, u64)>)>,
}

impl State {
    /// Mirrors changes the store took: the records in memory are the store's, never ahead
    /// of it (a running job's progress alone is kept in memory between its stored steps).
    fn apply(&mut self, changes: &[Change]) {
        for change in changes {
            match change {
                Change::PutPair(p) => {
                    self.pairs.insert(p.id, p.clone());
                }
                Change::DeletePair(id) => {
                    self.pairs.retain(|p, _| p.to_string() != *id);
                }
                Change::PutGroup(g) => {
                    self.groups.insert(g.id, g.clone());
                }
                Change::DeleteGroup(id) => {
                    self.groups.retain(|g, _| g.to_string() != *id);
                }
                Change::PutJob(j) => {
                    self.jobs.insert(j.id, j.clone());
                }
                Change::DeleteJob(id) => {
                    self.jobs.retain(|j, _| j.to_string() != *id);
                }
                Change::PutToken(t) => {
                    self.tokens.insert(t.id.clone(), t.clone());
                }
                Change::PutNode(n) => match self.nodes.get_mut(&n.name) {
                    Some(node) => node.record = n.clone(),
                    None => {
                        self.nodes.insert(
                            n.name.clone(),
                            Node {
                                record: n.clone(),
                                last_seen: None,
                                report: proto::NodeReport::default(),
                            },
                        );
                    }
                },
            }
        }
    }
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
    /// What every timer reads.
    clock: Arc<dyn Clock>,
    /// The leader term of an HA coordinator (0 with an embedded store): every command to an
    /// agent carries it, and agents refuse the commands of an older one.
    term: u64,
}

impl Coordinator {
    pub fn open(
        store: Arc<dyn Store>,
        agents: Arc<dyn Agents>,
        node: String,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, ApiError> {
        Self::open_as_leader(store, agents, node, clock, 0)
    }

    /// Opens the coordinator of an HA leader of `term` (its store fenced by that term).
    pub fn open_as_leader(
        store: Arc<dyn Store>,
        agents: Arc<dyn Agents>,
        node: String,
        clock: Arc<dyn Clock>,
        term: u64,
    ) -> Result<Arc<Self>, ApiError> {
        let snapshot = store.load().map_err(store_error)?;
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
            claimed: Default::default(),
            add_progress: BTreeMap::new(),
            tokens: snapshot
                .tokens
                .into_iter()
                .map(|t| (t.id.clone(), t))
                .collect(),
            group_step_sent: BTreeMap::new(),
            cuts: BTreeMap::new(),
            cut_stats: BTreeMap::new(),
            cuts_waiting: BTreeMap::new(),
            group_stuck_since: BTreeMap::new(),
            fences_sent: Default::default(),
            draining_since: BTreeMap::new(),
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
            clock,
            term,
        }))
    }

    /// This coordinator's leader term (0 with an embedded store).
    pub fn term(&self) -> u64 {
        self.term
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }

    /// How long ago `then` was, by the coordinator's clock.
    fn since(&self, then: Instant) -> Duration {
        self.now().saturating_duration_since(then)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `changes` (all or none), then mirrors them in `state`: a change the store
    /// refuses is in neither.
    fn commit_into(&self, state: &mut State, changes: &[Change]) -> Result<(), ApiError> {
        self.commit(changes)?;
        state.apply(changes);
        Ok(())
    }

    fn commit(&self, changes: &[Change]) -> Result<(), ApiError> {
        self.store.commit(changes).map_err(store_error)
    }

    /// Answers a cluster request addressed to the coordinator: for the operator (the local
    /// API, an agent), or for the project of a REST request's token.
    pub async fn handle(&self, request: ClusterRequest, peer: SocketAddr) -> ClusterResponse {
        let caller = self.caller(request.scope.as_ref());
        let answered_for_project = caller
            .as_ref()
            .ok()
            .and_then(Caller::project)
            .unwrap_or_default()
            .to_owned();
        let response = match caller {
            Ok(caller) => match request.request {
                Some(request) => match self.scope_request(&caller, request) {
                    Ok(request) => self
                        .dispatch(request, &caller, peer)
                        .await
                        .map(|r| caller.filter(r)),
                    Err(e) => Err(e),
                },
                None => Err(ApiError::InvalidArgument("an empty request".into())),
            },
            Err(e) => Err(e),
        };
        ClusterResponse {
            response: Some(response.unwrap_or_else(|e| Response::Error(e.into()))),
            answered_for_project,
        }
    }

    async fn dispatch(
        &self,
        request: Request,
        caller: &Caller,
        peer: SocketAddr,
    ) -> Result<Response, ApiError> {
        match Some(request) {
            Some(Request::Report(report)) => self
                .report(report, peer)
                .map(|ack| self.answer_while_leading(ack))
                .map(Response::ReportAck),
            Some(Request::CreatePair(req)) => self.create_pair(req).await.map(Response::Created),
            Some(Request::ListPairs(_)) => Ok(Response::Pairs(proto::ListPairsResponse {
                pairs: self.list_pairs(),
            })),
            Some(Request::GetPair(r)) => self.get_pair(&r.pair).map(Response::Pair),
            Some(Request::DeletePair(r)) => self.delete_pair(&r.pair).map(Response::Deleted),
            Some(Request::ResolvePair(r)) => {
                self.resolve_pair(&r.pair, &r.keep).map(Response::PairJob)
            }
            Some(Request::UpdatePair(r)) => self.update_pair(r).map(Response::Pair),
            Some(Request::VerifyPair(r)) => {
                self.verify_pair(&r.pair, r.repair).map(Response::PairJob)
            }
            Some(Request::CreateGroup(r)) => self
                .create_group(r, caller.project())
                .map(Response::GroupJob),
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
            Some(Request::AddGroupPair(r)) => self.add_group_pair(r).map(Response::GroupJob),
            Some(Request::RemoveGroupPair(r)) => self.remove_group_pair(r).map(Response::GroupJob),
            Some(Request::CreateGroupDrill(r)) => self.create_drill(r).await.map(Response::Drill),
            Some(Request::ListDrills(r)) => self.list_drills(&r.group).map(Response::Drills),
            Some(Request::GetDrill(r)) => self.get_drill(&r.drill).map(Response::Drill),
            Some(Request::UpdateDrill(r)) => self.update_drill(r).map(Response::Drill),
            Some(Request::VerifyGroupDrill(r)) => {
                self.verify_drill(r).await.map(Response::DrillVerification)
            }
            Some(Request::DeleteGroupDrill(r)) => {
                self.delete_drill(&r.drill).await.map(Response::Drill)
            }
            Some(Request::FailoverGroupToPoint(r)) => self
                .failover_group_to_point(r)
                .await
                .map(Response::GroupJob),
            Some(Request::GroupPoints(r)) => {
                self.group_points(&r.group).await.map(Response::GroupPoints)
            }
            Some(Request::CreateApiToken(r)) => {
                self.create_api_token(r).map(Response::CreatedApiToken)
            }
            Some(Request::ListApiTokens(_)) => Ok(Response::ApiTokens(self.list_api_tokens())),
            Some(Request::RevokeApiToken(r)) => {
                self.revoke_api_token(&r.token).map(Response::ApiToken)
            }
            Some(_) | None => Err(ApiError::InvalidArgument(
                "not a request the coordinator serves".into(),
            )),
        }
    }
}

/// A store's refusal as the caller sees it: a store without a quorum, or a coordinator no
/// longer leading, is unavailable for now (503); anything else is the coordinator's error.
fn store_error(e: crate::store::StoreError) -> ApiError {
    use crate::store::StoreError;
    match e {
        StoreError::NoQuorum(_) | StoreError::Deposed { .. } | StoreError::SteppedDown(_) => {
            ApiError::Unavailable(e.to_string())
        }
        _ => ApiError::Internal(e.to_string()),
    }
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

/// Test-only faults, compiled in only with the `fault-injection` feature.
mod fault {
    /// Aborts the process (as a `kill -9` would end it) once an operation has recorded a
    /// step whose description contains `BLOCKREP_FAULT_COORDINATOR_CRASH_AT`, or the text
    /// of the file `BLOCKREP_FAULT_COORDINATOR_CRASH_FILE`. The file is removed first, so it
    /// kills one coordinator once (of several candidates that share it), and a test can set
    /// the next step without restarting them.
    #[cfg(feature = "fault-injection")]
    pub fn crash_at(step: &str) {
        if let Ok(at) = std::env::var("BLOCKREP_FAULT_COORDINATOR_CRASH_AT")
            && !at.is_empty()
            && step.contains(&at)
        {
            tracing::error!(step, "fault injection: the coordinator dies here");
            std::process::abort();
        }
        if let Ok(file) = std::env::var("BLOCKREP_FAULT_COORDINATOR_CRASH_FILE")
            && let Ok(at) = std::fs::read_to_string(&file)
            && !at.trim().is_empty()
            && step.contains(at.trim())
            && std::fs::remove_file(&file).is_ok()
        {
            tracing::error!(step, "fault injection: the coordinator dies here");
            std::process::abort();
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    pub fn crash_at(_step: &str) {}
}

#[cfg(test)]
mod testing;
