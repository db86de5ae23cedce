//! The cut loop: every interval, each async consistency group that replicates is cut across
//! its production hosts, and its DR agents learn what the group committed (rule 3;
//! the state machines are `blockrep_core::replication::group_cut`, the argument is in
//! docs/GROUPS.md). A hypermetro group is cut only while it is not synchronous: a trip
//! cut when a pair lost its link, epoch cuts while its pairs journal, a direct cut once
//! every pair caught up, and epoch cuts until the group committed the direct cut's epoch (a
//! fresh cut state, which cannot know whether the group just went synchronous, cuts until
//! its first commit). A release says how its round ended: only a trip every host switched
//! at gives a tripped pair's answers, only a direct cut every host switched at ungates.
//! While a hypermetro group is not cut, a DR agent that reports an older commit gets the
//! commit again.
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

use blockrep_core::replication::group_cut::{
    CutCoordinator, CutMessage, CutMode, Live, PairMode, ROUND_TIMEOUT_MS, RoundOutcome,
    hypermetro_cut,
};
use blockrep_core::replication::{Epoch, GroupId};
use tokio::task::JoinSet;

use super::*;

/// How far above the highest epoch reported a fresh cut state starts: more than the cuts
/// that can happen between two reports.
const EPOCH_JUMP: u64 = 64;
/// The commit is sent again this often even if it did not move (a DR agent may have missed
/// it, or restarted).
const RESEND_COMMIT_EVERY: u32 = 5;
/// How often, between rounds, a group whose last completed cut is not committed asks what
/// its DR sides staged: this many times an interval, and no more often than
/// [`MIN_STAGED_ASK`].
const STAGED_ASKS_PER_INTERVAL: u32 = 8;
const MIN_STAGED_ASK: Duration = Duration::from_millis(20);
/// How long a group's first cut may wait for its production agents' reports before the
/// coordinator warns (and warns again).
const CUT_WAIT_WARN_EVERY: Duration = Duration::from_secs(30);

/// A pair of a group, as the cut loop needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Member {
    pair: PairId,
    production_node: String,
    dr_node: String,
}

impl Member {
    fn of(pair: &PairRecord) -> Self {
        Self {
            pair: pair.id,
            production_node: pair.production_node.clone(),
            dr_node: pair.dr_node.clone(),
        }
    }
}

/// A host's answer to a cut or a release.
type HostAnswer = (String, Epoch, Result<ClusterResponse, ApiError>);

/// What a group's cut rounds did since the coordinator started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutStats {
    /// Rounds every production host answered in time.
    pub completed: u64,
    /// Rounds abandoned: a host did not switch in time, the boundary is never committed.
    pub abandoned: u64,
    /// When the cut that ends the group's committed epoch was made (milliseconds since the
    /// Unix epoch, by the coordinator's wall clock; 0: none since the coordinator started).
    pub committed_cut_ms: u64,
}

/// A group's cuts.
impl GroupCuts {
    /// The next round sends the commit again (with the group's settings), moved or not.
    pub(super) fn send_commit_again(&mut self) {
        self.committed_sent = Epoch::ZERO;
    }
}

pub(super) struct GroupCuts {
    members: Vec<Member>,
    cut: CutCoordinator,
    committed_sent: Epoch,
    rounds: u32,
    /// When the cuts that completed made each boundary: the epoch that ended there, and
    /// the time (ms since the Unix epoch). Kept down to the committed epoch.
    cut_times: BTreeMap<Epoch, u64>,
    /// A hypermetro group went synchronous at this cut; it is cut until this commits. A fresh
    /// state starts with its first epoch here: the group may have gone synchronous just
    /// before (a restart forgot it), and its DR sides hold their direct writes until the
    /// journaled epochs before are applied.
    direct_at: Option<Epoch>,
}

/// A group to cut this round.
struct Eligible {
    group: GroupId,
    model: ReplicationModel,
    stopped: bool,
    members: Vec<Member>,
}

impl GroupCuts {
    /// Notes in `stats` when the cut that ends the committed epoch was made, and forgets
    /// the cut times below it.
    fn note_commit(&mut self, stats: &mut CutStats) {
        let committed = self.cut.committed();
        if let Some(&at) = self.cut_times.get(&committed) {
            stats.committed_cut_ms = at;
        }
        self.cut_times = self.cut_times.split_off(&committed);
    }

    /// The highest epoch the group committed since this state was made, if it was made for
    /// `pairs` as they are now (after a role change it is the other direction's, whose
    /// epochs mean nothing to the new DR sides).
    pub(super) fn committed_for(&self, pairs: &[PairRecord]) -> Option<Epoch> {
        let now: Vec<Member> = pairs.iter().map(Member::of).collect();
        (self.members == now).then(|| self.cut.committed())
    }
}

/// Whether the cut loop cuts `group` and moves its commit: available, or reversing (a reverse
/// drains through the cuts: its last epochs must commit); an async group not stopped.
/// Checked again, under the state's lock, wherever an answer moves the commit: a failover
/// fixes its plan's commit and sets the group's status under that lock, and no answer taken
/// after it may move the commit (a DR agent told of a later one before its promotion would
/// stop at a later epoch than the others).
fn is_cut(g: &GroupRecord) -> bool {
    use blockrep_core::replication::GroupStatus as S;
    matches!(g.status, S::Available | S::Reversing)
        && !(g.stopped && g.model == ReplicationModel::Async)
}

/// [`is_cut`] of the group `id` in `state`.
fn still_cut(state: &State, id: GroupId) -> bool {
    state.groups.get(&id).is_some_and(is_cut)
}

impl Coordinator {
    /// Cuts the groups' epochs every `interval` (and at once when a pair trips), until the
    /// daemon stops.
    pub async fn cut_groups(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ask_every = (interval / STAGED_ASKS_PER_INTERVAL).max(MIN_STAGED_ASK);
        let mut ask = tokio::time::interval(ask_every);
        ask.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A kick (a trip: writes wait for its cut) first, then the interval's round; the
            // asks only when neither is due, each waiting no longer than until the next.
            tokio::select! {
                biased;
                () = self.cut_kick.notified() => self.cut_round().await,
                _ = tick.tick() => self.cut_round().await,
                _ = ask.tick() => self.ask_staged(ask_every).await,
            }
        }
    }

    /// Between rounds: asks the production agents of each group whose last completed cut is
    /// not committed what their DR sides staged, so the commit follows the staging within a
    /// fraction of an interval instead of waiting for the next round's acks. The answers are
    /// taken as acks are (catch-up units first), one group at a time in this same task, so
    /// they never cross a round; one not back within `patience` is dropped (a host that does
    /// not answer holds up the other groups' rounds no longer than that).
    async fn ask_staged(&self, patience: Duration) {
        let trailing: Vec<(GroupId, Vec<Member>, Epoch)> = self
            .lock()
            .cuts
            .iter()
            .filter(|(_, c)| c.cut.commit_trails())
            .map(|(g, c)| (*g, c.members.clone(), c.cut.epoch()))
            .collect();
        for (group, members, epoch) in trailing {
            let hosts: BTreeSet<String> =
                members.iter().map(|m| m.production_node.clone()).collect();
            let asks = hosts
                .into_iter()
                .map(|host| CutMessage::Cut { host, to: epoch })
                .collect();
            let mut calls = self.call_hosts(&members, asks, |pair_ids, _| {
                Request::GroupStaged(proto::GroupCut {
                    pair_ids,
                    ..Default::default()
                })
            });
            let deadline = tokio::time::Instant::now() + patience;
            while let Ok(Some(Ok((host, _, answer)))) =
                tokio::time::timeout_at(deadline, calls.join_next()).await
            {
                let Ok(ClusterResponse {
                    response: Some(Response::CutAck(ack)),
                    ..
                }) = answer
                else {
                    // An agent of an older version does not know the question: its staged
                    // epochs come with the next round's acks, as before.
                    tracing::debug!(%group, host, "no staged epochs between cuts");
                    continue;
                };
                let mut state = self.lock();
                if !still_cut(&state, group) {
                    break;
                }
                let State {
                    cuts, cut_stats, ..
                } = &mut *state;
                if let Some(cuts) = cuts.get_mut(&group).filter(|c| c.members == members) {
                    cuts.cut.note_atomic(
                        &host,
                        ack.atomic
                            .iter()
                            .map(|s| (Epoch(s.from), (!s.open).then_some(Epoch(s.to)))),
                    );
                    cuts.cut.on_staged(&host, Epoch(ack.staged));
                    cuts.note_commit(cut_stats.entry(group).or_default());
                }
            }
            calls.abort_all();
            self.send_group_commit(group, &members, false).await;
        }
    }

    async fn cut_round(&self) {
        let (eligible, ungroup) = self.cut_plan();
        for (node, pairs, production) in ungroup {
            self.ungroup(&node, pairs, production).await;
        }
        for group in eligible {
            let id = group.group;
            if let Err(e) = self.cut_group(group).await {
                tracing::warn!(group = %id, error = %e, "group cut");
            }
        }
    }

    /// The groups to cut now (available or reversing, every pair available; a stopped
    /// hypermetro group only to trip), and the agents holding pairs under group cuts that
    /// belong to no group any more.
    #[allow(clippy::type_complexity)]
    fn cut_plan(&self) -> (Vec<Eligible>, Vec<(String, Vec<PairId>, bool)>) {
        let mut state = self.lock();
        let mut eligible = Vec::new();
        let mut in_group = BTreeSet::new();
        for g in state.groups.values() {
            in_group.extend(g.pairs.iter().copied());
            if !is_cut(g) {
                continue;
            }
            let members: Option<Vec<Member>> = g
                .pairs
                .iter()
                .map(|id| {
                    let p = state.pairs.get(id)?;
                    (p.status == PairStatus::Available && p.production_started)
                        .then(|| Member::of(p))
                })
                .collect();
            if let Some(members) = members
                && !members.is_empty()
            {
                eligible.push(Eligible {
                    group: g.id,
                    model: g.model,
                    stopped: g.stopped,
                    members,
                });
            }
        }
        let keep: BTreeSet<GroupId> = eligible.iter().map(|e| e.group).collect();
        state.cuts.retain(|g, _| keep.contains(g));
        state.cuts_waiting.retain(|g, _| keep.contains(g));
        // Pairs an agent still applies by group commits, or cuts by them, with no group.
        let mut ungroup: BTreeMap<(String, bool), Vec<PairId>> = BTreeMap::new();
        for node in state.nodes.values() {
            for s in node.report.pairs.iter().filter(|s| s.grouped) {
                let Ok(pair) = s.pair_id.parse::<PairId>() else {
                    continue;
                };
                if state.pairs.contains_key(&pair) && !in_group.contains(&pair) {
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
            retention: None,
        };
        let request = if production {
            Request::ProductionGrouping(message)
        } else {
            Request::GroupCommit(message)
        };
        if let Err(e) = self.call_agent(node, address, request).await {
            tracing::warn!(node, error = %e, "cannot take pairs out of group cuts");
        }
    }

    async fn cut_group(&self, eligible: Eligible) -> Result<(), ApiError> {
        let Eligible {
            group,
            model,
            stopped,
            members,
        } = eligible;
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
                self.send_commit(group, &m.dr_node, &[m.pair], committed)
                    .await;
            }
            return Ok(());
        }
        let mode = match model {
            ReplicationModel::Async => CutMode::Keep,
            ReplicationModel::Hypermetro => {
                // A synchronous pair trips only as its group's: it must know it is grouped.
                let loose: Vec<&Member> = members
                    .iter()
                    .filter(|m| reports.get(&(m.pair, true)).is_some_and(|s| !s.grouped))
                    .collect();
                for m in loose {
                    self.group_production(&m.production_node, m.pair).await;
                }
                // The last direct cut of these members (after a reverse they are others);
                // with no cut state yet, one may be uncommitted.
                let direct = {
                    let state = self.lock();
                    match state.cuts.get(&group).filter(|c| c.members == members) {
                        Some(c) => c.direct_at.map(|at| (at, c.cut.committed() >= at)),
                        None => Some((Epoch::ZERO, false)),
                    }
                };
                let mode = hypermetro_mode(&members, &reports, direct);
                if mode == Some(CutMode::Trip)
                    && let Some(cuts) = self.lock().cuts.get_mut(&group)
                {
                    cuts.direct_at = None;
                }
                match mode {
                    Some(mode) if !stopped || mode == CutMode::Trip => mode,
                    _ => {
                        // No cut: a DR agent that missed the last commit gets it again (its
                        // direct writes may wait for it).
                        self.resend_missed_commit(group, &members, &reports).await;
                        return Ok(());
                    }
                }
            }
        };
        let now = now_millis();
        let (messages, digests) = {
            let mut state = self.lock();
            let digests = state
                .groups
                .get(&group)
                .is_some_and(|g| g.retention.is_on());
            let fresh = match state.cuts.get(&group) {
                Some(c) => c.members != members,
                None => true,
            };
            if fresh {
                // Where the hosts admit is known only from their reports: a coordinator that
                // just started (its cut state is in memory only) waits for every production
                // agent's (a heartbeat), or it could cut to epochs the hosts passed long ago
                // and commit boundaries no cut made.
                let silent: BTreeSet<&str> = members
                    .iter()
                    .filter(|m| !reports.contains_key(&(m.pair, true)))
                    .map(|m| m.production_node.as_str())
                    .collect();
                if !silent.is_empty() {
                    // The group's consistent point stands still meanwhile: say so, once a
                    // wait has lasted, and again every so often while it lasts.
                    let now = self.now();
                    let (began, warned) = *state.cuts_waiting.entry(group).or_insert((now, now));
                    if now.saturating_duration_since(warned) >= CUT_WAIT_WARN_EVERY {
                        let waited = now.saturating_duration_since(began);
                        tracing::warn!(%group, waiting_for = ?silent, ?waited, "group cuts wait for every production agent's report; the group's consistent point does not move meanwhile");
                        state.cuts_waiting.insert(group, (began, now));
                    } else {
                        tracing::debug!(%group, waiting_for = ?silent, "group cuts wait for every production agent's report");
                    }
                    return Ok(());
                }
                state.cuts_waiting.remove(&group);
                // Above every epoch a host reported, and every one the group's last cut
                // state (of other members) reached: reports are up to a heartbeat old.
                let reported = members
                    .iter()
                    .filter_map(|m| reports.get(&(m.pair, true)))
                    .map(|s| s.current_epoch)
                    .chain(state.cuts.get(&group).map(|c| c.cut.epoch().0))
                    .max()
                    .unwrap_or(0);
                let hosts: BTreeSet<String> =
                    members.iter().map(|m| m.production_node.clone()).collect();
                let from = Epoch(reported + EPOCH_JUMP);
                tracing::info!(%group, hosts = hosts.len(), %from, "group cuts start");
                // Nothing of these members is committed yet.
                state.cut_stats.entry(group).or_default().committed_cut_ms = 0;
                state.cuts.insert(
                    group,
                    GroupCuts {
                        members: members.clone(),
                        cut: CutCoordinator::new(hosts, from, ROUND_TIMEOUT_MS),
                        committed_sent: Epoch::ZERO,
                        rounds: 0,
                        cut_times: BTreeMap::new(),
                        direct_at: (model == ReplicationModel::Hypermetro).then_some(from),
                    },
                );
            }
            let cuts = state.cuts.get_mut(&group).expect("inserted");
            cuts.rounds += 1;
            (cuts.cut.start_cut(now), digests)
        };
        // Cut every host in parallel; the round must complete within its timeout.
        let mut calls = self.call_hosts(&members, messages, |pair_ids, epoch| {
            Request::GroupCut(proto::GroupCut {
                pair_ids,
                epoch,
                mode: mode.code(),
                synchronous: false,
                tripped: false,
                digests,
                cut_ms: now,
            })
        });
        let mut synchronous = true;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ROUND_TIMEOUT_MS);
        let mut releases = Vec::new();
        let mut unanswered: BTreeSet<String> =
            members.iter().map(|m| m.production_node.clone()).collect();
        loop {
            let joined = tokio::time::timeout_at(deadline, calls.join_next()).await;
            let Ok(Some(Ok((host, to, answer)))) = joined else {
                break;
            };
            unanswered.remove(&host);
            match answer {
                Ok(ClusterResponse {
                    response: Some(Response::CutAck(ack)),
                    ..
                }) => {
                    synchronous &= ack.synchronous;
                    let mut state = self.lock();
                    if !still_cut(&state, group) {
                        break;
                    }
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
        // A trip every host switched at: the tripped pairs' answers may go. A direct cut every
        // host switched at: the gated writes may go once it commits.
        let outcome = RoundOutcome::of(mode, !releases.is_empty(), synchronous);
        self.count_round(group, !releases.is_empty(), now);
        if releases.is_empty() {
            if !unanswered.is_empty() {
                tracing::warn!(%group, ?unanswered, timeout_ms = ROUND_TIMEOUT_MS,
                    "a cut round got no answer in time from every host: abandoned");
            }
            // Not every host switched in time: the round is abandoned (its boundary is
            // never committed) and everyone is released.
            let mut state = self.lock();
            if let Some(cuts) = state.cuts.get_mut(&group) {
                releases = cuts.cut.on_tick(now + ROUND_TIMEOUT_MS);
            }
        }
        if outcome.synchronous {
            let mut state = self.lock();
            if let Some(cuts) = state.cuts.get_mut(&group) {
                cuts.direct_at = Some(cuts.cut.epoch());
                tracing::info!(%group, at = %cuts.cut.epoch(), "the hypermetro group is synchronous again");
            }
            // Its commit is what the gated writes wait for: cut again at once.
            self.cut_kick.notify_one();
        }
        self.send_releases(&members, releases, outcome).await;
        // The DR agents apply what the group committed; now and then again, for an agent
        // that missed it.
        let again = self
            .lock()
            .cuts
            .get(&group)
            .is_some_and(|c| c.rounds % RESEND_COMMIT_EVERY == 0);
        self.send_group_commit(group, &members, again).await;
        Ok(())
    }

    /// Sends the group's commit to its DR agents if it moved since it was last sent (or
    /// `again`).
    async fn send_group_commit(&self, group: GroupId, members: &[Member], again: bool) {
        let (committed, send) = {
            let state = self.lock();
            let Some(cuts) = state.cuts.get(&group) else {
                return;
            };
            (
                cuts.cut.committed(),
                cuts.committed_sent < cuts.cut.committed() || again,
            )
        };
        if send && committed > Epoch::ZERO {
            let mut by_node: BTreeMap<&str, Vec<PairId>> = BTreeMap::new();
            for m in members {
                by_node.entry(&m.dr_node).or_default().push(m.pair);
            }
            for (node, pairs) in by_node {
                self.send_commit(group, node, &pairs, committed).await;
            }
            if let Some(cuts) = self.lock().cuts.get_mut(&group) {
                cuts.committed_sent = committed;
            }
        }
    }

    /// Counts a round that completed (its boundary, made at `now_ms`, may commit) or was
    /// abandoned, and notes when the cut that ends the committed epoch was made.
    fn count_round(&self, group: GroupId, completed: bool, now_ms: u64) {
        let mut state = self.lock();
        let State {
            cuts, cut_stats, ..
        } = &mut *state;
        let stats = cut_stats.entry(group).or_default();
        let Some(cuts) = cuts.get_mut(&group) else {
            return;
        };
        if completed {
            stats.completed += 1;
            cuts.cut_times.insert(Epoch(cuts.cut.epoch().0 - 1), now_ms);
        } else {
            stats.abandoned += 1;
        }
        cuts.note_commit(stats);
    }

    /// What the cut rounds of the group `reference` (its id or name) did since the
    /// coordinator started.
    pub fn group_cut_stats(&self, reference: &str) -> Result<CutStats, ApiError> {
        let state = self.lock();
        let group = Self::find_group(&state, reference)?;
        Ok(state.cut_stats.get(&group).copied().unwrap_or_default())
    }

    async fn resend_missed_commit(
        &self,
        group: GroupId,
        members: &[Member],
        reports: &BTreeMap<(PairId, bool), proto::PairState>,
    ) {
        let committed = {
            let state = self.lock();
            match state.cuts.get(&group).filter(|c| c.members == members) {
                Some(c) => c.cut.committed(),
                None => return,
            }
        };
        let mut by_node: BTreeMap<&str, Vec<PairId>> = BTreeMap::new();
        for m in members {
            let behind = reports
                .get(&(m.pair, false))
                .is_some_and(|s| s.group_commit < committed.0);
            if behind {
                by_node.entry(&m.dr_node).or_default().push(m.pair);
            }
        }
        for (node, pairs) in by_node {
            self.send_commit(group, node, &pairs, committed).await;
        }
    }

    async fn send_releases(
        &self,
        members: &[Member],
        releases: Vec<CutMessage>,
        outcome: RoundOutcome,
    ) {
        // A release that does not arrive ends with the host's hold timeout.
        let mut calls = self.call_hosts(members, releases, |pair_ids, epoch| {
            Request::GroupRelease(proto::GroupCut {
                pair_ids,
                epoch,
                mode: 0,
                synchronous: outcome.synchronous,
                tripped: outcome.tripped,
                digests: false,
                cut_ms: 0,
            })
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
        request: impl Fn(Vec<String>, u64) -> Request,
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
            let request = self.command(request(pairs, to.0));
            calls.spawn(async move {
                let asked = std::time::Instant::now();
                let answer = agents.call(&host, address, request).await;
                tracing::debug!(host, %to, took_us = asked.elapsed().as_micros() as u64, ok = answer.is_ok(), "a host answered a cut call");
                (host, to, answer)
            });
        }
        calls
    }

    /// Tells a production agent its pair is in a (hypermetro) group: it trips as the group's.
    async fn group_production(&self, node: &str, pair: PairId) {
        let Some(address) = self.lock().nodes.get(node).map(|n| n.record.address) else {
            return;
        };
        let request = Request::ProductionGrouping(proto::GroupCommit {
            pair_ids: vec![pair.to_string()],
            epoch: 0,
            grouped: true,
            retention: None,
        });
        if let Err(e) = self.call_agent(node, address, request).await {
            tracing::warn!(node, error = %e, "cannot tell a production agent its pair is grouped");
        }
    }

    /// Sends group `group`'s commit, and its retention of points, to a DR agent.
    async fn send_commit(&self, group: GroupId, node: &str, pairs: &[PairId], epoch: Epoch) {
        let (address, retention) = {
            let state = self.lock();
            let Some(address) = state.nodes.get(node).map(|n| n.record.address) else {
                return;
            };
            let retention = state.groups.get(&group).map(|g| g.retention);
            (address, retention.unwrap_or_default())
        };
        let request = Request::GroupCommit(proto::GroupCommit {
            pair_ids: pairs.iter().map(PairId::to_string).collect(),
            epoch: epoch.0,
            grouped: true,
            retention: Some(super::groups::retention_to_proto(retention)),
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
                // A report from before a role change speaks of the other side: not this one.
                let side = if production { "production" } else { "dr" };
                if let Some(s) = state.nodes.get(node).and_then(|n| {
                    n.report
                        .pairs
                        .iter()
                        .find(|s| s.pair_id == m.pair.to_string() && s.side == side)
                }) {
                    out.insert((m.pair, production), s.clone());
                }
            }
        }
        out
    }
}

/// A hypermetro group's next cut, from its production sides' reports.
fn hypermetro_mode(
    members: &[Member],
    reports: &BTreeMap<(PairId, bool), proto::PairState>,
    direct: Option<(Epoch, bool)>,
) -> Option<CutMode> {
    let modes: Vec<Option<PairMode>> = members
        .iter()
        .map(|m| {
            reports.get(&(m.pair, true)).map(|s| PairMode {
                live: Live::from_report(&s.live),
                gated: s.gated,
                trip_wanted: s.trip_wanted,
                catching_up: s.catching_up,
                epoch: Epoch(s.current_epoch),
            })
        })
        .collect();
    hypermetro_cut(&modes, direct)
}

pub(super) fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::testing::*;

    /// A production agent's answer to a cut round or a staged ask: its DR side staged up to
    /// `staged`.
    fn cut_ack(staged: u64) -> Box<Response> {
        Box::new(Response::CutAck(proto::GroupCutAck {
            staged,
            ..Default::default()
        }))
    }

    /// A coordinator that starts (or restarts: its cut state is in memory only) starts its
    /// group's epochs above every epoch the production agents admit in. Until each of them
    /// has reported, it does not know where that is: cutting from 64 while the hosts admit
    /// in epoch 900 would "complete" cuts to epochs the hosts passed long ago (none switches,
    /// none holds), and commit boundaries no cut ever made.
    #[tokio::test]
    async fn no_group_cut_before_every_production_agent_has_reported() {
        let (h, _, a, b) = seeded_group_of_two();
        h.dr_reports(&[&a, &b], true, 0);
        let mut report = pair_state(&a, "production", ReplicationStatus::Active);
        report.grouped = true;
        report.current_epoch = 7;
        h.report(&a.production_node, "az1", vec![], vec![report]);

        h.coordinator.cut_round().await;
        assert!(
            h.agents.calls_of("GroupCut").is_empty(),
            "cut before b's production agent reported: {:?}",
            h.agents.log()
        );

        let mut report = pair_state(&b, "production", ReplicationStatus::Active);
        report.grouped = true;
        report.current_epoch = 900;
        h.report(&b.production_node, "az1", vec![], vec![report]);
        h.coordinator.cut_round().await;
        let cuts = h.agents.calls_of("GroupCut");
        assert_eq!(cuts.len(), 2, "{:?}", h.agents.log());
        for call in cuts {
            let Request::GroupCut(cut) = call.request else {
                unreachable!("a group cut");
            };
            assert!(
                cut.epoch > 900,
                "a cut to {} is below where a host admits",
                cut.epoch
            );
        }
    }

    /// Every host of a round records the coordinator's time of the cut as the epoch's cut
    /// time (so every DR volume puts the epoch in the same clock hour, and keeps the same
    /// hourly points), and is told to digest its epochs while the group keeps points.
    #[tokio::test]
    async fn every_host_of_a_cut_gets_the_same_cut_time_and_the_groups_digests() {
        use blockrep_core::replication::undo::Retention;
        let (h, group, a, b) = seeded_group_of_two();
        h.dr_reports(&[&a, &b], true, 0);
        for retention in [false, true] {
            if retention {
                let id = group.id;
                let mut state = h.coordinator.lock();
                let g = state.groups.get_mut(&id).unwrap();
                g.retention = Retention {
                    max_age_secs: 3600,
                    ..Retention::default()
                };
            }
            h.production_reports(&[&a, &b]);
            let before = h.agents.calls_of("GroupCut").len();
            let started = now_millis();
            h.coordinator.cut_round().await;
            let cuts: Vec<proto::GroupCut> = h.agents.calls_of("GroupCut")[before..]
                .iter()
                .map(|call| match &call.request {
                    Request::GroupCut(cut) => cut.clone(),
                    _ => unreachable!("a group cut"),
                })
                .collect();
            assert_eq!(cuts.len(), 2, "{:?}", h.agents.log());
            assert!(
                cuts.iter().all(|c| c.cut_ms == cuts[0].cut_ms
                    && c.cut_ms >= started
                    && c.cut_ms <= now_millis()),
                "{cuts:?}"
            );
            assert!(cuts.iter().all(|c| c.digests == retention), "{cuts:?}");
        }
    }

    /// Operators see how a group's cuts go: rounds completed and abandoned, and when the cut
    /// behind the group's consistent point was made.
    #[tokio::test]
    async fn cut_rounds_are_counted_and_the_commits_cut_time_is_kept() {
        let (h, group, a, b) = seeded_group_of_two();
        h.dr_reports(&[&a, &b], true, 0);
        h.production_reports(&[&a, &b]);
        // Every host has staged far ahead: each completed cut's boundary may commit. The
        // third round, b's production host does not answer.
        let ack = Answer::Respond(cut_ack(1 << 20));
        h.agents
            .script("GroupCut", Some(&a.production_node), ack.clone(), None);
        h.agents
            .script("GroupCut", Some(&b.production_node), ack, Some(2));
        h.agents.script(
            "GroupCut",
            Some(&b.production_node),
            Answer::Unreachable,
            Some(1),
        );
        let before = now_millis();
        h.coordinator.cut_round().await;
        h.coordinator.cut_round().await;
        let stats = h.coordinator.group_cut_stats(&group.name).unwrap();
        assert_eq!((stats.completed, stats.abandoned), (2, 0), "{stats:?}");
        assert!(
            stats.committed_cut_ms >= before && stats.committed_cut_ms <= now_millis(),
            "the committed epoch's cut time: {stats:?}"
        );

        // One host does not answer: the round is abandoned, the commit stays.
        h.coordinator.cut_round().await;
        let after = h.coordinator.group_cut_stats(&group.name).unwrap();
        assert_eq!((after.completed, after.abandoned), (2, 1), "{after:?}");
        assert_eq!(after.committed_cut_ms, stats.committed_cut_ms);

        // A fresh cut state (its pairs changed, or they were reversed) has committed
        // nothing yet: the old cut time is not the new direction's.
        h.coordinator.lock().cuts.remove(&group.id);
        h.production_reports(&[&a, &b]);
        h.agents.script(
            "GroupCut",
            Some(&b.production_node),
            Answer::Unreachable,
            Some(1),
        );
        h.coordinator.cut_round().await;
        let fresh = h.coordinator.group_cut_stats(&group.name).unwrap();
        assert_eq!(fresh.committed_cut_ms, 0, "{fresh:?}");
    }

    /// Between rounds, a group whose last completed cut is not committed asks its production
    /// agents what their DR sides staged: the commit moves and reaches the DR agents without
    /// waiting for the next round. Once it is committed, nothing is asked.
    #[tokio::test]
    async fn staged_epochs_asked_between_rounds_commit_the_last_cut() {
        let (h, group, a, b) = seeded_group_of_two();
        h.dr_reports(&[&a, &b], true, 0);
        h.production_reports(&[&a, &b]);
        let ack = |staged| Answer::Respond(cut_ack(staged));
        // The round completes before the DR sides staged its epoch.
        for node in [&a.production_node, &b.production_node] {
            h.agents.script("GroupCut", Some(node), ack(0), None);
            h.agents
                .script("GroupStaged", Some(node), ack(1 << 20), None);
        }
        h.coordinator.cut_round().await;
        let stats = h.coordinator.group_cut_stats(&group.name).unwrap();
        assert_eq!(
            (stats.completed, stats.committed_cut_ms),
            (1, 0),
            "{stats:?}"
        );
        let commits_before = h.agents.calls_of("GroupCommit").len();

        h.coordinator.ask_staged(Duration::from_secs(1)).await;
        assert_eq!(
            h.agents.calls_of("GroupStaged").len(),
            2,
            "{:?}",
            h.agents.log()
        );
        let stats = h.coordinator.group_cut_stats(&group.name).unwrap();
        assert!(stats.committed_cut_ms > 0, "not committed: {stats:?}");
        assert!(
            h.agents.calls_of("GroupCommit").len() > commits_before,
            "the DR agents did not hear of the commit: {:?}",
            h.agents.log()
        );

        h.coordinator.ask_staged(Duration::from_secs(1)).await;
        assert_eq!(
            h.agents.calls_of("GroupStaged").len(),
            2,
            "asked again with nothing to commit"
        );
    }

    /// A failover fixes the group's commit in its plan; no answer taken after that may move
    /// the commit a DR agent is told: one that heard of a later commit before its promotion
    /// would stop at a later epoch than the others. Neither a staged epoch asked between
    /// rounds nor the ack of a round that was in flight when the failover began.
    #[tokio::test]
    async fn no_answer_moves_the_commit_once_a_failover_fixed_it() {
        let (h, group, a, b) = seeded_group_of_two();
        h.dr_reports(&[&a, &b], true, 7);
        h.production_reports(&[&a, &b]);
        for node in [&a.production_node, &b.production_node] {
            h.agents
                .script("GroupCut", Some(node), Answer::Respond(cut_ack(0)), Some(1));
            h.agents.script(
                "GroupStaged",
                Some(node),
                Answer::Respond(cut_ack(1 << 20)),
                None,
            );
        }
        h.coordinator.cut_round().await;
        let committed = |h: &Harness| h.coordinator.lock().cuts[&group.id].cut.committed();
        let before = committed(&h);
        h.coordinator.failover_group(&group.name).unwrap();
        h.coordinator.ask_staged(Duration::from_secs(1)).await;
        assert_eq!(
            committed(&h),
            before,
            "a staged epoch asked after the failover moved the commit"
        );

        // A round in flight when the failover begins: its acks come after.
        let (h, group, a, b) = seeded_group_of_two();
        h.dr_reports(&[&a, &b], true, 7);
        h.production_reports(&[&a, &b]);
        for node in [&a.production_node, &b.production_node] {
            h.agents
                .script("GroupCut", Some(node), Answer::Respond(cut_ack(0)), Some(1));
        }
        h.coordinator.cut_round().await;
        let before = committed(&h);
        let go = Arc::new(tokio::sync::Notify::new());
        for node in [&a.production_node, &b.production_node] {
            h.agents.script(
                "GroupCut",
                Some(node),
                Answer::WaitThen(Arc::clone(&go), cut_ack(1 << 20)),
                None,
            );
        }
        let round = h.coordinator.cut_round();
        let failover = async {
            while h.agents.calls_of("GroupCut").len() < 4 {
                tokio::task::yield_now().await;
            }
            h.coordinator.failover_group(&group.name).unwrap();
            go.notify_waiters();
        };
        tokio::join!(round, failover);
        assert_eq!(
            committed(&h),
            before,
            "a round's ack after the failover moved the commit"
        );
    }

    /// A production host that does not answer the question what it staged holds the cut loop
    /// up no longer than the asks' patience (the other groups' rounds and trips wait behind).
    #[tokio::test(start_paused = true)]
    async fn a_host_that_does_not_answer_holds_the_asks_up_only_their_patience() {
        let (h, _group, a, b) = seeded_group_of_two();
        h.dr_reports(&[&a, &b], true, 0);
        h.production_reports(&[&a, &b]);
        let ack = Answer::Respond(Box::new(Response::CutAck(proto::GroupCutAck::default())));
        let never = Arc::new(tokio::sync::Notify::new());
        for node in [&a.production_node, &b.production_node] {
            h.agents.script("GroupCut", Some(node), ack.clone(), None);
            h.agents.script(
                "GroupStaged",
                Some(node),
                Answer::Wait(Arc::clone(&never)),
                None,
            );
        }
        h.coordinator.cut_round().await;
        let patience = Duration::from_millis(125);
        let started = tokio::time::Instant::now();
        h.coordinator.ask_staged(patience).await;
        let waited = started.elapsed();
        assert!(
            waited < patience + Duration::from_millis(10),
            "the asks waited {waited:?}"
        );
        assert_eq!(h.agents.calls_of("GroupStaged").len(), 2);
    }
}
