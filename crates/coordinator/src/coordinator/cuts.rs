//! The cut loop: every interval, each async consistency group that replicates is cut across
//! its production hosts, and its DR agents learn what the group committed (rule 3;
//! the state machines are `blockrep_core::replication::group_cut`, the argument is in
//! docs/GROUPS.md).
//!
//! ```text
//!  every interval, per group:
//!    DR agents not yet applying by the group's commits ─► GroupCommit(grouped) first
//!    GroupCut(to) to every production host, in parallel ─► acks (staged epochs)
//!    all acked within the round timeout ─► GroupRelease(to); else abandoned: released,
//!                                          its boundary never committed
//!    the commit moved ─► GroupCommit(epoch) to every DR agent
//! ```
//!
//! The cut state lives in memory. After a restart (or a change of the group's pairs) it
//! starts far enough above every epoch the hosts report that a cut left half-done cannot be
//! mistaken for a completed one; nothing below that is committed.

use std::collections::{BTreeMap, BTreeSet};

use blockrep_core::replication::group_cut::{CutCoordinator, CutMessage, ROUND_TIMEOUT_MS};
use blockrep_core::replication::{Epoch, GroupId};
use tokio::task::JoinSet;

use super::*;

/// How far above the highest epoch reported a fresh cut state starts: more than the cuts
/// that can happen between two reports.
const EPOCH_JUMP: u64 = 64;
/// The commit is sent again this often even if it did not move (a DR agent may have missed
/// it, or restarted).
const RESEND_COMMIT_EVERY: u32 = 5;

/// A pair of a group, as the cut loop needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Member {
    pair: PairId,
    production_node: String,
    dr_node: String,
}

/// A host's answer to a cut or a release.
type HostAnswer = (String, Epoch, Result<ClusterResponse, ApiError>);

/// A group's cuts.
pub(super) struct GroupCuts {
    members: Vec<Member>,
    cut: CutCoordinator,
    committed_sent: Epoch,
    rounds: u32,
}

impl GroupCuts {
    /// The highest epoch the group committed since this state was made.
    pub(super) fn committed(&self) -> Epoch {
        self.cut.committed()
    }
}

impl Coordinator {
    /// Cuts every async group's epochs every `interval`, until the daemon stops.
    pub async fn cut_groups(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.cut_round().await;
        }
    }

    async fn cut_round(&self) {
        let (eligible, ungroup) = self.cut_plan();
        for (node, pairs, production) in ungroup {
            self.ungroup(&node, pairs, production).await;
        }
        for (group, members) in eligible {
            if let Err(e) = self.cut_group(group, members).await {
                tracing::warn!(%group, error = %e, "group cut");
            }
        }
    }

    /// The groups to cut now (async, available, not stopped, every pair available), and
    /// the agents holding pairs under group cuts that belong to no such group any more.
    #[allow(clippy::type_complexity)]
    fn cut_plan(
        &self,
    ) -> (
        Vec<(GroupId, Vec<Member>)>,
        Vec<(String, Vec<PairId>, bool)>,
    ) {
        let mut state = self.lock();
        let mut eligible = Vec::new();
        let mut in_async_group = BTreeSet::new();
        for g in state.groups.values() {
            if g.model != ReplicationModel::Async {
                continue;
            }
            in_async_group.extend(g.pairs.iter().copied());
            // A reverse drains through the cuts: its last epochs must commit.
            use blockrep_core::replication::GroupStatus as S;
            if !matches!(g.status, S::Available | S::Reversing) || g.stopped {
                continue;
            }
            let members: Option<Vec<Member>> = g
                .pairs
                .iter()
                .map(|id| {
                    let p = state.pairs.get(id)?;
                    (p.status == PairStatus::Available && p.production_started).then(|| Member {
                        pair: p.id,
                        production_node: p.production_node.clone(),
                        dr_node: p.dr_node.clone(),
                    })
                })
                .collect();
            if let Some(members) = members
                && !members.is_empty()
            {
                eligible.push((g.id, members));
            }
        }
        let keep: BTreeSet<GroupId> = eligible.iter().map(|(g, _)| *g).collect();
        state.cuts.retain(|g, _| keep.contains(g));
        // Pairs an agent still applies by group commits, or cuts by them, with no group.
        let mut ungroup: BTreeMap<(String, bool), Vec<PairId>> = BTreeMap::new();
        for node in state.nodes.values() {
            for s in node.report.pairs.iter().filter(|s| s.grouped) {
                let Ok(pair) = s.pair_id.parse::<PairId>() else {
                    continue;
                };
                if state.pairs.contains_key(&pair) && !in_async_group.contains(&pair) {
                    ungroup
                        .entry((node.record.name.clone(), s.side == "production"))
                        .or_default()
                        .push(pair);
                }
            }
        }
        let ungroup = ungroup
            .into_iter()
            .map(|((node, production), pairs)| (node, pairs, production))
            .collect();
        (eligible, ungroup)
    }

    async fn ungroup(&self, node: &str, pairs: Vec<PairId>, production: bool) {
        let Some(address) = self.lock().nodes.get(node).map(|n| n.record.address) else {
            return;
        };
        let message = proto::GroupCommit {
            pair_ids: pairs.iter().map(PairId::to_string).collect(),
            epoch: 0,
            grouped: false,
        };
        let request = if production {
            Request::UngroupProduction(message)
        } else {
            Request::GroupCommit(message)
        };
        if let Err(e) = self.call_agent(node, address, request).await {
            tracing::warn!(node, error = %e, "cannot take pairs out of group cuts");
        }
    }

    async fn cut_group(&self, group: GroupId, members: Vec<Member>) -> Result<(), ApiError> {
        // Every DR agent applies by the group's commits before the first cut.
        let reports = self.member_reports(&members);
        let loose: Vec<&Member> = members
            .iter()
            .filter(|m| !reports.get(&(m.pair, false)).is_some_and(|s| s.grouped))
            .collect();
        if !loose.is_empty() {
            let committed = self
                .lock()
                .cuts
                .get(&group)
                .map_or(Epoch::ZERO, |c| c.cut.committed());
            for m in loose {
                self.send_commit(&m.dr_node, &[m.pair], committed).await;
            }
            return Ok(());
        }
        let now = now_millis();
        let messages = {
            let mut state = self.lock();
            let fresh = match state.cuts.get(&group) {
                Some(c) => c.members != members,
                None => true,
            };
            if fresh {
                let reported = members
                    .iter()
                    .filter_map(|m| reports.get(&(m.pair, true)))
                    .map(|s| s.current_epoch)
                    .max()
                    .unwrap_or(0);
                let hosts: BTreeSet<String> =
                    members.iter().map(|m| m.production_node.clone()).collect();
                tracing::info!(%group, hosts = hosts.len(), from = reported + EPOCH_JUMP, "group cuts start");
                state.cuts.insert(
                    group,
                    GroupCuts {
                        members: members.clone(),
                        cut: CutCoordinator::new(
                            hosts,
                            Epoch(reported + EPOCH_JUMP),
                            ROUND_TIMEOUT_MS,
                        ),
                        committed_sent: Epoch::ZERO,
                        rounds: 0,
                    },
                );
            }
            let cuts = state.cuts.get_mut(&group).expect("inserted");
            cuts.rounds += 1;
            cuts.cut.start_cut(now)
        };
        // Cut every host in parallel; the round must complete within its timeout.
        let mut calls = self.call_hosts(&members, messages, |pair_ids, epoch| {
            Request::GroupCut(proto::GroupCut { pair_ids, epoch })
        });
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ROUND_TIMEOUT_MS);
        let mut releases = Vec::new();
        loop {
            let joined = tokio::time::timeout_at(deadline, calls.join_next()).await;
            let Ok(Some(Ok((host, to, answer)))) = joined else {
                break;
            };
            match answer {
                Ok(ClusterResponse {
                    response: Some(Response::CutAck(ack)),
                }) => {
                    let mut state = self.lock();
                    if let Some(cuts) = state.cuts.get_mut(&group) {
                        // Catch-up units first: the ack may move the commit.
                        cuts.cut.note_atomic(
                            &host,
                            ack.atomic
                                .iter()
                                .map(|s| (Epoch(s.from), (!s.open).then_some(Epoch(s.to)))),
                        );
                        releases.extend(cuts.cut.on_ack(&host, to, Epoch(ack.staged)));
                    }
                }
                Ok(other) => {
                    tracing::warn!(%group, host, answer = ?other.response, "a host refused the cut")
                }
                Err(e) => tracing::warn!(%group, host, error = %e, "a host did not take the cut"),
            }
        }
        calls.abort_all();
        if releases.is_empty() {
            // Not every host switched in time: the round is abandoned (its boundary is
            // never committed) and everyone is released.
            let mut state = self.lock();
            if let Some(cuts) = state.cuts.get_mut(&group) {
                releases = cuts.cut.on_tick(now + ROUND_TIMEOUT_MS);
            }
        }
        self.send_releases(&members, releases).await;
        // The DR agents apply what the group committed.
        let (committed, resend) = {
            let state = self.lock();
            let Some(cuts) = state.cuts.get(&group) else {
                return Ok(());
            };
            (
                cuts.cut.committed(),
                cuts.committed_sent < cuts.cut.committed()
                    || cuts.rounds % RESEND_COMMIT_EVERY == 0,
            )
        };
        if resend && committed > Epoch::ZERO {
            let mut by_node: BTreeMap<&str, Vec<PairId>> = BTreeMap::new();
            for m in &members {
                by_node.entry(&m.dr_node).or_default().push(m.pair);
            }
            for (node, pairs) in by_node {
                self.send_commit(node, &pairs, committed).await;
            }
            if let Some(cuts) = self.lock().cuts.get_mut(&group) {
                cuts.committed_sent = committed;
            }
        }
        Ok(())
    }

    async fn send_releases(&self, members: &[Member], releases: Vec<CutMessage>) {
        // A release that does not arrive ends with the host's hold timeout.
        let mut calls = self.call_hosts(members, releases, |pair_ids, epoch| {
            Request::GroupRelease(proto::GroupCut { pair_ids, epoch })
        });
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ROUND_TIMEOUT_MS);
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, calls.join_next()).await {}
        calls.abort_all();
    }

    /// Sends each host its message (a cut or a release, made by `request` from the host's
    /// pairs and the epoch), all at once; the answers come back through the set.
    fn call_hosts(
        &self,
        members: &[Member],
        messages: Vec<CutMessage>,
        request: fn(Vec<String>, u64) -> Request,
    ) -> JoinSet<HostAnswer> {
        let mut calls = JoinSet::new();
        for message in messages {
            let (CutMessage::Cut { host, to } | CutMessage::Release { host, to }) = message;
            let pairs: Vec<String> = members
                .iter()
                .filter(|m| m.production_node == host)
                .map(|m| m.pair.to_string())
                .collect();
            let Some(address) = self.lock().nodes.get(&host).map(|n| n.record.address) else {
                continue;
            };
            let agents = Arc::clone(&self.agents);
            let request = ClusterRequest {
                request: Some(request(pairs, to.0)),
            };
            calls.spawn(async move {
                let answer = agents.call(&host, address, request).await;
                (host, to, answer)
            });
        }
        calls
    }

    async fn send_commit(&self, node: &str, pairs: &[PairId], epoch: Epoch) {
        let Some(address) = self.lock().nodes.get(node).map(|n| n.record.address) else {
            return;
        };
        let request = Request::GroupCommit(proto::GroupCommit {
            pair_ids: pairs.iter().map(PairId::to_string).collect(),
            epoch: epoch.0,
            grouped: true,
        });
        if let Err(e) = self.call_agent(node, address, request).await {
            tracing::warn!(node, error = %e, "cannot send the group's commit");
        }
    }

    /// What the members' agents last reported: keyed by (pair, production side).
    fn member_reports(&self, members: &[Member]) -> BTreeMap<(PairId, bool), proto::PairState> {
        let state = self.lock();
        let mut out = BTreeMap::new();
        for m in members {
            for (node, production) in [(&m.production_node, true), (&m.dr_node, false)] {
                if let Some(s) = state.nodes.get(node).and_then(|n| {
                    n.report
                        .pairs
                        .iter()
                        .find(|s| s.pair_id == m.pair.to_string())
                }) {
                    out.insert((m.pair, production), s.clone());
                }
            }
        }
        out
    }
}

pub(super) fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
