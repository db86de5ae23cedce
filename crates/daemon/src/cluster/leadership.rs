//! Which coordinator this daemon's calls go to, and whether it runs one.
//!
//! - **One coordinator** (the embedded redb store): the daemon with `coordinator_role` runs
//!   it from start to stop, with term 0.
//! - **An HA coordinator** (the etcd store): every daemon with `coordinator_role` is a
//!   candidate ([`Cluster::lead`]). While etcd elects it, it runs the coordinator on a store
//!   fenced by its term, after telling every agent that term; when its lease is lost, or a
//!   commit finds its term over or cannot tell whether it committed, it stops the
//!   coordinator's loops, drops its state, and campaigns again. A candidate that does not
//!   lead answers calls with where the leader is ([`proto::NotLeader`]).
//!
//! Every daemon forwards its cluster calls to the coordinator it last reached, and follows
//! "not the leader, try X" answers, or the next candidate listed, until one answers
//! ([`Cluster::call_coordinator`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use blockrep_api::ApiError;
use blockrep_api::proto::cluster_request::Request;
use blockrep_api::proto::{self, ClusterRequest, ClusterResponse, cluster_response::Response};
use blockrep_coordinator::election::{Candidate, Leader};
use blockrep_coordinator::{Agents, Coordinator, EtcdSettings, EtcdStore, StoreError};
use blockrep_replication::endpoint::CallError;
use blockrep_tls::COORDINATOR_NAME;

use super::{AgentsOverQuic, Cluster};

/// How long a call to a coordinator candidate may take before the next is tried.
const CANDIDATE_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an operator's call waits for a coordinator to be elected.
const ELECTION_WAIT: Duration = Duration::from_secs(10);
const ELECTION_POLL: Duration = Duration::from_millis(200);
/// How long a new leader waits for its agents to take its term before it starts.
const ADOPT_PATIENCE: Duration = Duration::from_secs(1);
/// How long a candidate waits before it campaigns again after etcd refused it.
const CAMPAIGN_RETRY: Duration = Duration::from_secs(1);
/// How long a daemon that stops waits for its candidate to give the leadership up.
const RESIGN_PATIENCE: Duration = Duration::from_secs(2);

/// The coordinator this daemon runs now, if any, and what it knows of the election.
pub struct CoordinatorRole {
    leading: RwLock<Option<Arc<Coordinator>>>,
    candidate: OnceLock<Candidate>,
    /// Why this candidate does not lead now (when it cannot campaign).
    why_not: Mutex<String>,
    /// Set when the daemon stops: the candidate resigns and campaigns no more.
    stopping: tokio::sync::watch::Sender<bool>,
    /// The candidate's life ended (it resigned, or never ran).
    ended: tokio::sync::Notify,
    /// Times etcd refused a commit or a check of this daemon's term (it led, and had been
    /// deposed): each ended a leadership.
    fenced_commits: Arc<AtomicU64>,
}

impl Default for CoordinatorRole {
    fn default() -> Self {
        Self {
            leading: RwLock::new(None),
            candidate: OnceLock::new(),
            why_not: Mutex::new(String::new()),
            stopping: tokio::sync::watch::Sender::new(false),
            ended: tokio::sync::Notify::new(),
            fenced_commits: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl CoordinatorRole {
    /// The coordinator this daemon runs now.
    pub fn leading(&self) -> Option<Arc<Coordinator>> {
        self.leading
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The one coordinator (embedded store), run from start to stop.
    pub fn set_single(&self, coordinator: Arc<Coordinator>) {
        self.set_leading(Some(coordinator));
    }

    fn set_leading(&self, coordinator: Option<Arc<Coordinator>>) {
        *self.leading.write().unwrap_or_else(|e| e.into_inner()) = coordinator;
    }

    /// Commits etcd refused because this daemon's term was over.
    pub fn fenced_commits(&self) -> u64 {
        self.fenced_commits.load(Ordering::Relaxed)
    }

    pub fn is_candidate(&self) -> bool {
        self.candidate.get().is_some()
    }

    fn set_why_not(&self, why: String) {
        *self.why_not.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// The answer of a candidate that does not lead: who does, as etcd says.
    pub async fn not_leader(&self) -> proto::NotLeader {
        let why_not = self
            .why_not
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(candidate) = self.candidate.get() else {
            return proto::NotLeader {
                why: "this node is not a coordinator candidate".into(),
                ..Default::default()
            };
        };
        match candidate.leader().await {
            Ok(Some(Leader { address, .. })) if address == candidate.address() => {
                proto::NotLeader {
                    why: "an earlier run of this node holds the leadership until its lease expires"
                        .into(),
                    ..Default::default()
                }
            }
            Ok(Some(Leader { address, term })) => proto::NotLeader {
                leader_address: address,
                leader_term: term,
                why: String::new(),
            },
            Ok(None) => proto::NotLeader {
                why: if why_not.is_empty() {
                    "no coordinator leads now (an election is under way)".into()
                } else {
                    why_not
                },
                ..Default::default()
            },
            Err(e) => proto::NotLeader {
                why: e.to_string(),
                ..Default::default()
            },
        }
    }
}

impl Cluster {
    /// A candidate's life: campaign, lead while elected, step down, campaign again.
    pub(super) async fn lead(self: Arc<Self>, settings: EtcdSettings, ttl: Duration) {
        Arc::clone(&self).campaign_and_lead(settings, ttl).await;
        self.role.ended.notify_one();
    }

    /// The daemon stops: a leading candidate resigns (its loops end, its key goes), so
    /// another leads without waiting for the lease to expire.
    pub async fn resign(&self) {
        let candidate = matches!(
            self.config.coordinator_store,
            crate::config::CoordinatorStore::Etcd { .. }
        ) && self.config.coordinator_role;
        if !candidate {
            return;
        }
        self.role.stopping.send_replace(true);
        if tokio::time::timeout(RESIGN_PATIENCE, self.role.ended.notified())
            .await
            .is_err()
        {
            tracing::warn!(
                "the coordinator candidate did not resign in time; its lease expires instead"
            );
        }
    }

    async fn campaign_and_lead(self: Arc<Self>, settings: EtcdSettings, ttl: Duration) {
        let mut stopping = self.role.stopping.subscribe();
        let address = self.config.listen.to_string();
        let connecting = async {
            loop {
                match Candidate::connect(&settings, address.clone(), ttl).await {
                    Ok(candidate) => break candidate,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reach etcd to campaign for the coordinator; trying again");
                        self.role.set_why_not(e.to_string());
                        tokio::time::sleep(CAMPAIGN_RETRY).await;
                    }
                }
            }
        };
        let candidate = tokio::select! {
            candidate = connecting => candidate,
            _ = stopping.wait_for(|stop| *stop) => return,
        };
        let candidate = self.role.candidate.get_or_init(|| candidate);
        loop {
            // A campaign given up when the daemon stops has its lease revoked by etcd's
            // expiry (it never led).
            let campaigned = tokio::select! {
                campaigned = candidate.campaign() => campaigned,
                _ = stopping.wait_for(|stop| *stop) => return,
            };
            let mut leadership = match campaigned {
                Ok(leadership) => leadership,
                Err(e) => {
                    tracing::warn!(error = %e, "the coordinator campaign failed; campaigning again");
                    self.role.set_why_not(e.to_string());
                    tokio::time::sleep(CAMPAIGN_RETRY).await;
                    continue;
                }
            };
            let term = leadership.term();
            tracing::info!(term, "elected: this daemon leads the coordinator");
            let step_down = Arc::new(tokio::sync::Notify::new());
            let opened = {
                let (cluster, settings, fence) = (
                    Arc::clone(&self),
                    settings.clone(),
                    leadership.fence.clone(),
                );
                let step_down = Arc::clone(&step_down);
                let fenced_commits = Arc::clone(&self.role.fenced_commits);
                tokio::task::spawn_blocking(move || -> anyhow::Result<Arc<Coordinator>> {
                    let store =
                        EtcdStore::connect(settings)?
                            .fenced(fence)?
                            .on_step_down(Box::new(move |why| {
                                if matches!(why, StoreError::Deposed { .. }) {
                                    fenced_commits.fetch_add(1, Ordering::Relaxed);
                                }
                                step_down.notify_one();
                            }));
                    let agents = Arc::new(AgentsOverQuic {
                        cluster: OnceLock::from(Arc::clone(&cluster)),
                    });
                    Coordinator::open_as_leader(
                        Arc::new(store),
                        agents as Arc<dyn Agents>,
                        cluster.agent.config.node_name.clone(),
                        Arc::new(blockrep_coordinator::SystemClock),
                        term,
                    )
                    .map_err(|e| anyhow::anyhow!("{e}"))
                })
                .await
                .map_err(anyhow::Error::from)
                .and_then(|opened| opened)
            };
            let coordinator = match opened {
                Ok(coordinator) => coordinator,
                Err(e) => {
                    tracing::warn!(term, error = %e, "elected, but cannot load the coordinator's records; stepping down");
                    self.role.set_why_not(e.to_string());
                    leadership.resign().await;
                    tokio::time::sleep(CAMPAIGN_RETRY).await;
                    continue;
                }
            };
            // It answers calls at once; its loops, which command agents unasked, start
            // once the agents took its term (or did not answer in time).
            self.role.set_leading(Some(Arc::clone(&coordinator)));
            self.role.set_why_not(String::new());
            let unreached = coordinator.adopt_term(ADOPT_PATIENCE).await;
            if !unreached.is_empty() {
                tracing::warn!(
                    term,
                    ?unreached,
                    "nodes that did not take the new term yet: they take it with its first command"
                );
            }
            let loops = [
                tokio::spawn(Arc::clone(&coordinator).drive()),
                tokio::spawn(
                    Arc::clone(&coordinator)
                        .cut_groups(self.agent.config.replication.epoch_interval),
                ),
            ];
            let why = tokio::select! {
                why = leadership.lost() => why,
                () = step_down.notified() => "a commit found the term over, or could not tell whether it committed".into(),
                _ = stopping.wait_for(|stop| *stop) => "the daemon stops".into(),
            };
            self.role.set_leading(None);
            for task in loops {
                task.abort();
            }
            if *stopping.borrow() {
                tracing::info!(
                    term,
                    "resigning the coordinator's leadership: the daemon stops"
                );
                leadership.resign().await;
                return;
            }
            tracing::warn!(term, %why, "no longer leading the coordinator; campaigning again");
            self.role
                .set_why_not(format!("the last leader stepped down: {why}"));
            leadership.resign().await;
        }
    }

    /// Sends `request` to the coordinator: the one this daemon reached last, then the
    /// leader a candidate names, then each candidate listed in turn. When candidates answer
    /// but none leads (an election under way), a `patient` call waits for one, up to
    /// [`ELECTION_WAIT`]; a heartbeat does not.
    pub(super) async fn call_coordinator(
        &self,
        request: &ClusterRequest,
        patient: bool,
    ) -> Result<ClusterResponse, ApiError> {
        let deadline = tokio::time::Instant::now() + ELECTION_WAIT;
        loop {
            let (answer, electing) = self.call_candidates(request).await;
            match answer {
                Err(e) if patient && electing && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "no coordinator leads yet; waiting for the election");
                    tokio::time::sleep(ELECTION_POLL).await;
                }
                answer => return answer,
            }
        }
    }

    /// One round of [`Cluster::call_coordinator`]; says too whether a candidate answered
    /// that none leads.
    async fn call_candidates(
        &self,
        request: &ClusterRequest,
    ) -> (Result<ClusterResponse, ApiError>, bool) {
        let listed = &self.config.coordinators;
        let mut target = *self.leader_hint.lock().unwrap_or_else(|e| e.into_inner());
        // The last answer of each candidate tried, for the error.
        let mut failures = std::collections::BTreeMap::new();
        let mut electing = false;
        // Leaders named by candidates: one that cannot be reached is likely dead, its lease
        // not yet run out, so an election is under way.
        let mut named = Vec::new();
        let repeatable = repeatable(request);
        for _ in 0..listed.len() * 2 + 1 {
            let call = self.endpoint.call(target, COORDINATOR_NAME, request);
            // A call that changes something is waited for to the end: after a timeout it
            // may have been carried out, so it is not made again elsewhere.
            let answer = if listed.len() > 1 && repeatable {
                tokio::time::timeout(CANDIDATE_CALL_TIMEOUT, call)
                    .await
                    .unwrap_or_else(|_| {
                        self.endpoint.forget(target);
                        Err(CallError::Timeout { addr: target })
                    })
            } else {
                call.await
            };
            match answer {
                Ok(ClusterResponse {
                    response: Some(Response::NotLeader(not)),
                    ..
                }) => {
                    let leader = not.leader_address.parse::<SocketAddr>().ok();
                    electing |= leader.is_none();
                    named.extend(leader);
                    let named = leader;
                    failures.insert(
                        target,
                        match named {
                            Some(leader) => format!("not the leader, try {leader}"),
                            None => format!("not the leader ({})", not.why),
                        },
                    );
                    target = match named {
                        Some(leader) if leader != target => leader,
                        _ => next_after(listed, target),
                    };
                }
                Ok(response) => {
                    *self.leader_hint.lock().unwrap_or_else(|e| e.into_inner()) = target;
                    return (Ok(response), false);
                }
                Err(e) if !repeatable && !matches!(e, CallError::Connect { .. }) => {
                    let error = ApiError::Unavailable(format!(
                        "the coordinator at {target} did not answer ({e}): the call may have been carried out; check before making it again"
                    ));
                    return (Err(error), false);
                }
                Err(e) => {
                    electing |= named.contains(&target);
                    failures.insert(target, e.to_string());
                    target = next_after(listed, target);
                }
            }
        }
        let tried: Vec<String> = failures
            .iter()
            .map(|(candidate, answer)| format!("{candidate}: {answer}"))
            .collect();
        let error = ApiError::Unavailable(format!(
            "no coordinator answers as the leader: {}",
            tried.join("; ")
        ));
        (Err(error), electing)
    }

    /// A command of a newer term came from `peer`: if it is a listed candidate, it leads
    /// now, and this daemon's calls go there first.
    pub(super) fn follow(&self, peer: SocketAddr) {
        if self.config.coordinators.contains(&peer) {
            *self.leader_hint.lock().unwrap_or_else(|e| e.into_inner()) = peer;
        }
    }
}

/// Whether a call may be made again after no answer came: it changes nothing (a read, or
/// a heartbeat, which comes again anyway).
fn repeatable(request: &ClusterRequest) -> bool {
    matches!(
        request.request,
        Some(
            Request::Report(_)
                | Request::ListPairs(_)
                | Request::GetPair(_)
                | Request::GetJob(_)
                | Request::ListJobs(_)
                | Request::ListNodes(_)
                | Request::ListGroups(_)
                | Request::GetGroup(_)
                | Request::GroupPoints(_)
                | Request::ListDrills(_)
                | Request::GetDrill(_)
                | Request::ListApiTokens(_)
        )
    )
}

/// The candidate listed after `current` (the first if `current` is not listed).
fn next_after(listed: &[SocketAddr], current: SocketAddr) -> SocketAddr {
    match listed.iter().position(|a| *a == current) {
        Some(i) => listed[(i + 1) % listed.len()],
        None => listed[0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_calls_that_change_nothing_are_made_again_after_no_answer() {
        let call = |request| ClusterRequest {
            request: Some(request),
            ..Default::default()
        };
        assert!(repeatable(&call(Request::Report(Default::default()))));
        assert!(repeatable(&call(Request::GetGroup(Default::default()))));
        assert!(!repeatable(&call(Request::FailoverGroup(
            Default::default()
        ))));
        assert!(!repeatable(&call(Request::CreatePair(Default::default()))));
        assert!(!repeatable(&call(Request::CreateApiToken(
            Default::default()
        ))));
    }

    #[test]
    fn candidates_are_tried_in_turn() {
        let listed: Vec<SocketAddr> = ["10.0.0.1:7790", "10.0.0.2:7790", "10.0.0.3:7790"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(next_after(&listed, listed[0]), listed[1]);
        assert_eq!(next_after(&listed, listed[2]), listed[0]);
        assert_eq!(
            next_after(&listed, "10.0.0.9:1".parse().unwrap()),
            listed[0]
        );
    }
}
