//! The pairs this agent's volumes are in: taking and leaving roles, restoring them after a
//! restart, routing incoming replication streams, and reporting their state.

use crate::drill::{DrillRecord, DrillVolume};
use crate::send_limit::SendLimit;
use crate::undo_journal::PointInfo;
use blockrep_core::replication::undo::Retention;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use blockrep_api::ApiError;
use blockrep_core::VolumeId;
use blockrep_core::replication::group_cut::{CutMode, RoundOutcome};
use blockrep_core::replication::{Epoch, GenerationId, PairId, VolumeRole};
use blockrep_volume::Volume;
use blockrep_wire::{Hello, RefuseKind};

use crate::clock::Clock;
use crate::dr::DrPair;
use crate::endpoint::{ClusterEndpoint, Peer, Refusal, ReplicationStream};
use crate::membership::{Membership, Side};
use crate::production::{AgentContext, ProductionPair, ReplicationConfig, Start};

mod report;
mod roles;
mod rollback;

pub use rollback::ROLLBACK_FILE;

pub use report::{FenceReport, PairReport, ReportCounters};

/// A production host's answer to its group's cut.
#[derive(Clone, Debug)]
pub struct CutAnswer {
    /// The lowest epoch the cut's pairs' DR sides staged.
    pub staged: Epoch,
    /// Spans their DR sides can only apply whole.
    pub atomic: Vec<blockrep_core::pair::atomic_spans::AtomicSpan>,
    /// Every one of them is synchronous after the cut.
    pub synchronous: bool,
}

#[derive(Clone)]
enum Runtime {
    Production(Arc<ProductionPair>),
    Dr(Arc<DrPair>),
}

pub struct Pairs {
    node: String,
    endpoint: OnceLock<Arc<ClusterEndpoint>>,
    config: ReplicationConfig,
    runtimes: Mutex<HashMap<PairId, Runtime>>,
    /// Told when a pair of a hypermetro group trips, or a production side's status changes:
    /// the heartbeat reports at once.
    report_now: Arc<tokio::sync::Notify>,
    /// The one clock every pair's link reads.
    clock: Arc<dyn Clock>,
    /// What the production pairs may send, together.
    send_limit: Arc<SendLimit>,
}

/// A volume as replication needs it.
pub struct VolumeHandle {
    pub volume: Arc<Volume>,
    pub dir: PathBuf,
    pub name: String,
}

impl Pairs {
    /// The pairs of agent `node`; their links read `clock`.
    pub fn new(node: String, config: ReplicationConfig, clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self {
            node,
            endpoint: OnceLock::new(),
            config,
            runtimes: Mutex::new(HashMap::new()),
            report_now: Arc::new(tokio::sync::Notify::new()),
            clock,
            send_limit: Arc::new(
                SendLimit::new(config.max_bytes_per_sec).unwrap_or_else(|e| {
                    tracing::error!(error = %e, "no send limit");
                    SendLimit::default()
                }),
            ),
        })
    }

    /// What the agent's production pairs may send, together: the limit set at start
    /// (`replication.max_bytes_per_sec`), changed while it runs with `blockrep send-limit`.
    pub fn send_limit(&self) -> &SendLimit {
        &self.send_limit
    }

    /// Wakes when the coordinator should hear of a pair at once (a hypermetro group's pair
    /// tripped, a production side's status changed).
    pub fn report_now(&self) -> &tokio::sync::Notify {
        &self.report_now
    }

    /// The endpoint production sides dial their DR agents through (set once it is bound).
    pub fn set_endpoint(&self, endpoint: Arc<ClusterEndpoint>) {
        let _ = self.endpoint.set(endpoint);
    }

    fn endpoint(&self) -> Result<Arc<ClusterEndpoint>, ApiError> {
        self.endpoint
            .get()
            .cloned()
            .ok_or_else(|| ApiError::Unavailable("the cluster endpoint is not up yet".into()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PairId, Runtime>> {
        self.runtimes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes up the role a volume had before a restart, if any.
    pub fn restore(&self, handle: VolumeHandle) -> Result<(), String> {
        let Some(membership) = Membership::load(&handle.dir).map_err(|e| e.to_string())? else {
            return Ok(());
        };
        handle
            .volume
            .gate()
            .restore_role(membership.role_at_start());
        tracing::info!(volume = %handle.name, pair = %membership.pair, side = membership.side.as_str(), "taking up pair role again");
        self.start(membership, handle, Start::FromRecord)
            .map_err(|e| e.to_string())
    }

    fn start(
        &self,
        membership: Membership,
        handle: VolumeHandle,
        start: Start,
    ) -> Result<(), ApiError> {
        let runtime = match membership.side {
            Side::Production => Runtime::Production(
                ProductionPair::start(
                    membership.clone(),
                    handle.volume,
                    handle.dir,
                    AgentContext {
                        endpoint: self.endpoint()?,
                        node: self.node.clone(),
                        config: self.config,
                        report_now: Arc::clone(&self.report_now),
                        clock: Arc::clone(&self.clock),
                        send_limit: Arc::clone(&self.send_limit),
                    },
                    start,
                )
                .map_err(ApiError::FailedPrecondition)?,
            ),
            Side::Dr => {
                let limits = crate::dr::DrLimits::of(&self.config, handle.volume.size());
                let dr = DrPair::new(membership.clone(), handle.volume, handle.dir, limits);
                // A DR side that cannot recover stays, refusing streams with the reason
                // (its status says it), its stage log kept as it is.
                if let Err(e) = dr.recover()
                    && dr.fault().is_none()
                {
                    dr.set_fault(format!(
                        "volume {}: completing the units sealed in the stage log failed: {e}",
                        handle.name
                    ));
                }
                Runtime::Dr(dr)
            }
        };
        self.lock().insert(membership.pair, runtime);
        Ok(())
    }

    /// The coordinator gives this volume a side in a pair (`membership.side`): a new
    /// membership, nothing replicated yet.
    pub fn take_role(&self, membership: Membership, handle: VolumeHandle) -> Result<(), ApiError> {
        let side = membership.side;
        if let Some(existing) =
            Membership::load(&handle.dir).map_err(|e| ApiError::Internal(e.to_string()))?
        {
            if existing.pair == membership.pair && existing.side == side {
                return Ok(());
            }
            return Err(ApiError::FailedPrecondition(format!(
                "volume {} is already the {} side of pair {}",
                handle.name,
                existing.side.as_str(),
                existing.pair
            )));
        }
        if handle.volume.tracker().is_none() {
            return Err(ApiError::FailedPrecondition(format!(
                "volume {}: replication needs dirty tracking (bitmap.dirty_tracking = true)",
                handle.name
            )));
        }
        if handle.volume.size() != membership.size {
            return Err(ApiError::FailedPrecondition(format!(
                "volume {} is {} bytes, the pair {}",
                handle.name,
                handle.volume.size(),
                membership.size
            )));
        }
        if side == Side::Dr && handle.volume.connected_clients() > 0 {
            return Err(ApiError::FailedPrecondition(format!(
                "DR volume {} has {} connected NBD client(s); disconnect them first",
                handle.name,
                handle.volume.connected_clients()
            )));
        }
        let lineage =
            handle.volume.gate().lineage().ok_or_else(|| {
                ApiError::Internal(format!("volume {} has no lineage", handle.name))
            })?;
        let old = handle
            .volume
            .gate()
            .set_role(membership.role())
            .map_err(|e| ApiError::FailedPrecondition(format!("volume {}: {e}", handle.name)))?;
        // A production volume's data begins a generation of its own with the role (rule 5).
        if side == Side::Production
            && let Err(e) = lineage.begin(GenerationId::random())
        {
            handle.volume.gate().restore_role(old);
            return Err(ApiError::Internal(format!("record a new generation: {e}")));
        }
        if let Err(e) = membership.save(&handle.dir) {
            handle.volume.gate().restore_role(old);
            return Err(ApiError::Internal(format!("record the pair: {e}")));
        }
        tracing::info!(volume = %handle.name, pair = %membership.pair, side = side.as_str(), "took a pair role");
        let dir = handle.dir.clone();
        let volume = Arc::clone(&handle.volume);
        self.start(membership, handle, Start::FromRecord)
            .inspect_err(|_| {
                let _ = Membership::remove(&dir);
                volume.gate().restore_role(old);
            })
    }

    /// The pair is deleted: this volume leaves it and is standalone (writable) again.
    pub fn leave(&self, pair: PairId, handle: VolumeHandle) -> Result<(), ApiError> {
        match self.lock().remove(&pair) {
            // Deleted: nothing depends on its DR side any more.
            Some(Runtime::Production(p)) => p.stop(None),
            Some(Runtime::Dr(d)) => {
                d.end_drills("the volume left its pair");
                d.close();
            }
            None => {}
        }
        match Membership::load(&handle.dir).map_err(|e| ApiError::Internal(e.to_string()))? {
            Some(m) if m.pair == pair => {}
            _ => return Ok(()),
        }
        // Writable on its own from now on: a new generation, so that writes to it are never
        // mistaken for the pair's (rule 5).
        if let Some(lineage) = handle.volume.gate().lineage() {
            lineage
                .begin(GenerationId::random())
                .map_err(|e| ApiError::Internal(format!("record a new generation: {e}")))?;
        }
        handle.volume.gate().set_link(None);
        handle.volume.gate().restore_role(VolumeRole::Standalone);
        for file in [
            "pair.json",
            "dr.json",
            "stage-log",
            "points.json",
            "undo",
            "drills",
            crate::undo_journal::HOLD_FILE,
        ] {
            remove_if_there(&handle.dir.join(file))
                .map_err(|e| ApiError::Internal(format!("remove {file}: {e}")))?;
        }
        tracing::info!(volume = %handle.name, %pair, "left the pair; the volume is standalone");
        Ok(())
    }

    /// A replication stream from a production agent. Only the pair's recorded peer may open
    /// one: any other node, whatever its `Hello` says, is refused and counted, and nothing
    /// changes (a `discard_peer` from it would overwrite the DR volume).
    pub async fn replication_stream(
        &self,
        hello: Hello,
        peer: Peer,
        mut stream: ReplicationStream,
    ) {
        if hello.pair == crate::link_test::link_test_pair() {
            // A link test touches no disk: any node of the cluster may run one.
            tracing::info!(%peer, "link test");
            return crate::link_test::sink(stream).await;
        }
        let dr = match self.lock().get(&hello.pair) {
            Some(Runtime::Dr(dr)) => Some(Arc::clone(dr)),
            _ => None,
        };
        if let Some(dr) = &dr
            && dr.membership().peer_node != peer.identity.node
        {
            let reason = format!(
                "pair {} replicates from node {}, not {}",
                hello.pair,
                dr.membership().peer_node,
                peer.identity.node
            );
            if let Some(endpoint) = self.endpoint.get() {
                endpoint.counters.refuse(&peer, Refusal::WrongPeer, &reason);
            }
            dr.streams_refused.fetch_add(1, Ordering::Relaxed);
            stream.writer.refuse(RefuseKind::Mismatch, reason).await;
            return;
        }
        match dr {
            Some(dr) => dr.serve(hello, stream).await,
            None => {
                tracing::warn!(%peer, pair = %hello.pair, "replication stream for a pair this node is not the DR side of");
                let reason = format!(
                    "node {} is not the DR side of pair {}",
                    self.node, hello.pair
                );
                stream.writer.refuse(RefuseKind::Mismatch, reason).await;
            }
        }
    }

    /// The pair a volume is in, if any, and its side.
    pub fn volume_pair(&self, volume: VolumeId) -> Option<(PairId, Side)> {
        self.lock().iter().find_map(|(id, r)| match r {
            Runtime::Production(p) if p.membership().local_volume == volume => {
                Some((*id, Side::Production))
            }
            Runtime::Dr(d) if d.membership().local_volume == volume => Some((*id, Side::Dr)),
            _ => None,
        })
    }

    /// This node's volume in `pair`, and its side.
    /// Sets the send limit of the production side of `pair` (`None`: none), if this agent
    /// holds it.
    pub fn set_max_bytes_per_sec(&self, pair: PairId, limit: Option<u64>) -> Result<(), String> {
        let production = match self.lock().get(&pair) {
            Some(Runtime::Production(p)) => Arc::clone(p),
            _ => return Ok(()),
        };
        production.set_max_bytes_per_sec(limit)
    }

    pub fn volume_pair_by_id(&self, pair: PairId) -> Option<(VolumeId, Side)> {
        self.lock().get(&pair).map(|r| match r {
            Runtime::Production(p) => (p.membership().local_volume, Side::Production),
            Runtime::Dr(d) => (d.membership().local_volume, Side::Dr),
        })
    }

    /// A volume of a pair grew: its pair is that size now (a production side says so in its
    /// next `Hello`).
    pub fn set_volume_size(&self, volume: VolumeId, dir: &Path, size: u64) -> std::io::Result<()> {
        let production = self.lock().values().find_map(|r| match r {
            Runtime::Production(p) if p.membership().local_volume == volume => Some(Arc::clone(p)),
            _ => None,
        });
        // The production side's record has one owner, its runtime.
        if let Some(p) = production {
            return p.set_size(size);
        }
        match Membership::load(dir)? {
            Some(mut membership) if membership.size != size => {
                membership.size = size;
                membership.save(dir)
            }
            _ => Ok(()),
        }
    }

    /// Every pair's state as this agent sees it.
    pub fn reports(&self) -> Vec<PairReport> {
        self.lock()
            .values()
            .map(|runtime| match runtime {
                Runtime::Production(p) => report::production_report(p),
                Runtime::Dr(d) => report::dr_report(d),
            })
            .collect()
    }

    fn production(&self, pair: PairId) -> Result<Arc<ProductionPair>, ApiError> {
        match self.lock().get(&pair) {
            Some(Runtime::Production(p)) => Ok(Arc::clone(p)),
            _ => Err(ApiError::FailedPrecondition(format!(
                "node {} is not the production side of pair {pair}",
                self.node
            ))),
        }
    }

    /// The operator keeps the production side of a diverged pair: its next connection
    /// copies the whole volume over the DR side's changes.
    pub fn keep_production(&self, pair: PairId) -> Result<(), ApiError> {
        self.production(pair)?
            .resolve_keeping_production()
            .map_err(|e| ApiError::Internal(format!("record the resolution: {e}")))
    }

    /// Pauses or resumes replication of `pair` (this node is its production side).
    pub fn set_paused(&self, pair: PairId, paused: bool) -> Result<(), ApiError> {
        self.production(pair)?
            .set_paused(paused)
            .map_err(|e| ApiError::Internal(format!("record the pause: {e}")))
    }

    /// A consistency group's cut to `to` on this node's production pairs among `pairs`
    /// (all of them must be here): each holds its answers and switches (and, by `mode`, a
    /// hypermetro pair trips or goes synchronous). Returns what the coordinator needs.
    pub fn group_cut(
        &self,
        pairs: &[PairId],
        to: Epoch,
        mode: CutMode,
        digests: bool,
        cut_ms: u64,
    ) -> Result<CutAnswer, ApiError> {
        let runtimes = pairs
            .iter()
            .map(|p| self.production(*p))
            .collect::<Result<Vec<_>, _>>()?;
        // The coordinator's time of the cut, the same on every host of the group.
        let now = if cut_ms > 0 {
            cut_ms
        } else {
            self.clock.wall_ms()
        };
        let mut answer = CutAnswer {
            staged: Epoch(u64::MAX),
            atomic: Vec::new(),
            synchronous: true,
        };
        for p in &runtimes {
            p.record_group_cut(to)
                .map_err(|e| ApiError::Internal(format!("record the group's cut: {e}")))?;
            p.link.set_digests(digests);
            let (staged, synchronous) = p.link.group_cut(to, mode, now);
            answer.staged = answer.staged.min(staged);
            answer.synchronous &= synchronous;
            answer.atomic.extend(p.link.atomic_spans());
        }
        if runtimes.is_empty() {
            answer.staged = Epoch::ZERO;
        }
        Ok(answer)
    }

    /// What the DR sides of `pairs` staged, asked between the group's cuts: the answer to a
    /// cut, with nothing switched or held (`synchronous` is false: it is a cut's to give).
    pub fn group_staged(&self, pairs: &[PairId]) -> Result<CutAnswer, ApiError> {
        let runtimes = pairs
            .iter()
            .map(|p| self.production(*p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut answer = CutAnswer {
            staged: if runtimes.is_empty() {
                Epoch::ZERO
            } else {
                Epoch(u64::MAX)
            },
            atomic: Vec::new(),
            synchronous: false,
        };
        for p in &runtimes {
            let (staged, spans) = p.link.staged_and_spans();
            answer.staged = answer.staged.min(staged);
            answer.atomic.extend(spans);
        }
        Ok(answer)
    }

    /// The group's release of the cut to `to`: the held answers are given (a trip's only if
    /// the round tripped); if it went synchronous, gated writes are let go.
    pub fn group_release(&self, pairs: &[PairId], to: Epoch, outcome: RoundOutcome) {
        let now = self.clock.wall_ms();
        for pair in pairs {
            if let Ok(p) = self.production(*pair) {
                p.link.group_release(to, outcome, now);
            }
        }
    }

    /// Gives answers a group cut has held longer than `timeout` (the coordinator is away).
    pub fn release_stale_holds(&self, timeout: std::time::Duration) {
        for runtime in self.lock().values() {
            if let Runtime::Production(p) = runtime {
                p.link.release_held_longer_than(timeout);
            }
        }
    }

    /// The pairs joined a group (a hypermetro one, which is not cut while synchronous) or
    /// left it (they cut on their own again).
    pub fn set_production_grouped(&self, pairs: &[PairId], grouped: bool) {
        for pair in pairs {
            if let Ok(p) = self.production(*pair)
                && let Err(e) = p.record_grouped(grouped)
            {
                tracing::warn!(%pair, error = %e, grouped, "cannot record the pair's group");
            }
        }
    }

    /// The group committed `epoch` (DR pairs among `pairs` apply up to it), or, with
    /// `None`, the pairs left it; its DR volumes keep points for `retention` (none once
    /// they left it).
    pub fn group_commit(
        &self,
        pairs: &[PairId],
        epoch: Option<Epoch>,
        retention: Retention,
    ) -> Result<(), ApiError> {
        for pair in pairs {
            let runtime = self.lock().get(pair).cloned();
            if let Some(Runtime::Dr(d)) = runtime {
                d.set_group_commit(epoch)
                    .map_err(|e| ApiError::Internal(format!("record the group's commit: {e}")))?;
                let retention = if epoch.is_some() {
                    retention
                } else {
                    Retention::default()
                };
                d.points().set_retention(retention).map_err(|e| {
                    ApiError::Internal(format!("record the group's retention of points: {e}"))
                })?;
            }
        }
        Ok(())
    }

    /// Makes a drill of the DR volume of `pair` (this node is its DR side) at `record.point`.
    pub fn create_drill(
        &self,
        pair: PairId,
        record: DrillRecord,
    ) -> Result<Arc<DrillVolume>, ApiError> {
        let dr = self.dr_of(pair)?;
        if self
            .find_drill(&record.export)
            .is_some_and(|d| d.record().drill != record.drill)
        {
            return Err(ApiError::AlreadyExists(format!(
                "an export named {} is served already",
                record.export
            )));
        }
        dr.create_drill(record).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                ApiError::FailedPrecondition(format!("pair {pair}: {e}"))
            }
            std::io::ErrorKind::AlreadyExists => ApiError::AlreadyExists(e.to_string()),
            _ => ApiError::Internal(format!("make the drill of pair {pair}: {e}")),
        })
    }

    /// Deletes drill `drill` of the DR volume of `pair` (done if either is gone).
    pub fn delete_drill(&self, pair: PairId, drill: &str) -> Result<(), ApiError> {
        match self.dr_of(pair) {
            Ok(dr) => dr
                .delete_drill(drill)
                .map_err(|e| ApiError::Internal(format!("delete drill {drill}: {e}"))),
            Err(_) => Ok(()),
        }
    }

    /// Starts verifying drill `drill` of the DR volume of `pair` (`start`; one running goes
    /// on), and says how its verification goes.
    pub fn check_drill(
        &self,
        pair: PairId,
        drill: &str,
        start: bool,
    ) -> Result<crate::drill::check::DrillCheck, ApiError> {
        let volume = self
            .dr_of(pair)?
            .drills()
            .into_iter()
            .find(|d| d.record().drill == drill)
            .ok_or_else(|| {
                ApiError::NotFound(format!("pair {pair} has no drill volume of drill {drill}"))
            })?;
        if start {
            crate::drill::check::start(&volume).map_err(|e| {
                ApiError::Internal(format!("verify drill {drill} of pair {pair}: {e}"))
            })?;
        }
        Ok(volume.last_check())
    }

    /// The drill served as `export`, if any.
    pub fn find_drill(&self, export: &str) -> Option<Arc<DrillVolume>> {
        self.drills().into_iter().find(|d| d.export() == export)
    }

    /// Every drill of this agent's DR volumes, with its pair.
    pub fn drills_by_pair(&self) -> Vec<(PairId, Arc<DrillVolume>)> {
        let runtimes: Vec<(PairId, Runtime)> =
            self.lock().iter().map(|(id, r)| (*id, r.clone())).collect();
        runtimes
            .iter()
            .filter_map(|(id, r)| match r {
                Runtime::Dr(d) => Some(d.drills().into_iter().map(|d| (*id, d))),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Every drill of this agent's DR volumes.
    pub fn drills(&self) -> Vec<Arc<DrillVolume>> {
        let runtimes: Vec<Runtime> = self.lock().values().cloned().collect();
        runtimes
            .iter()
            .filter_map(|r| match r {
                Runtime::Dr(d) => Some(d.drills()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn dr_of(&self, pair: PairId) -> Result<Arc<DrPair>, ApiError> {
        match self.lock().get(&pair).cloned() {
            Some(Runtime::Dr(d)) => Ok(d),
            _ => Err(ApiError::FailedPrecondition(format!(
                "this node is not the DR side of pair {pair}"
            ))),
        }
    }

    /// Keeps point `epoch` on the DR volumes of `pairs` for a while (a failover to it is
    /// about to start): refused, with nothing held, if one of them does not hold it.
    pub fn hold_point(&self, pairs: &[PairId], epoch: Epoch) -> Result<(), ApiError> {
        let mut held = Vec::new();
        for pair in pairs {
            let points = self.points(*pair)?;
            if !points.iter().any(|p| p.point.epoch == epoch) {
                return Err(ApiError::FailedPrecondition(format!(
                    "the DR volume of pair {pair} does not hold point {epoch}"
                )));
            }
            let runtime = self.lock().get(pair).cloned();
            if let Some(Runtime::Dr(d)) = runtime {
                held.push(d);
            }
        }
        for d in held {
            d.points().hold(epoch, HOLD_POINT_FOR).map_err(|e| {
                ApiError::Internal(format!("record the hold of point {epoch}: {e}"))
            })?;
        }
        Ok(())
    }

    /// The points the DR volume of `pair` holds (this node is its DR side). Blocking: the
    /// undo journal is read if no applier opened it yet.
    pub fn points(&self, pair: PairId) -> Result<Vec<PointInfo>, ApiError> {
        let runtime = self.lock().get(&pair).cloned();
        match runtime {
            Some(Runtime::Dr(d)) => d.points().list().map_err(|e| {
                ApiError::Internal(format!("read the undo journal of pair {pair}: {e}"))
            }),
            _ => Err(ApiError::FailedPrecondition(format!(
                "this node is not the DR side of pair {pair}"
            ))),
        }
    }

    /// Starts an online verify of `pair` (this node is its production side).
    pub fn start_verify(&self, pair: PairId, job: String, repair: bool) -> Result<(), ApiError> {
        self.production(pair)?
            .start_verify(job, repair)
            .map_err(ApiError::FailedPrecondition)
    }

    /// Moves this volume to the other side of its pair (a resolve that keeps the DR side's
    /// data). Becoming production begins a new generation and, with `discard_peer`, copies
    /// the whole volume over the old production side.
    ///
    /// `membership` is the side to take (its `discard_peer`, `grouped` and `term` as the
    /// coordinator gives them); `shared` names the generation the two sides share from now
    /// on, for a switch the coordinator orders for a reverse or a reprotect: the new
    /// production side begins it, the new DR side adopts it as a consistent image (the sides
    /// hold the same data, or differ only where production's bitmap says).
    pub fn switch_side(
        &self,
        mut membership: Membership,
        shared: Option<GenerationId>,
        handle: VolumeHandle,
    ) -> Result<(), ApiError> {
        let side = membership.side;
        membership.full_sync_done = shared.is_some();
        let existing = Membership::load(&handle.dir)
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .filter(|m| m.pair == membership.pair)
            .ok_or_else(|| {
                ApiError::FailedPrecondition(format!(
                    "volume {} is not in pair {}",
                    handle.name, membership.pair
                ))
            })?;
        if existing.side == side && existing.fence.is_none() {
            return Ok(());
        }
        if membership.term < existing.term {
            return Err(ApiError::FailedPrecondition(format!(
                "pair {}: a switch of term {} is older than this side's term {}",
                membership.pair, membership.term, existing.term
            )));
        }
        if side == Side::Dr && handle.volume.connected_clients() > 0 {
            return Err(ApiError::FailedPrecondition(format!(
                "volume {} has {} connected NBD client(s) and would become the DR side; disconnect them first",
                handle.name,
                handle.volume.connected_clients()
            )));
        }
        let runtime = self.lock().remove(&membership.pair);
        match runtime {
            Some(Runtime::Production(p)) => p.stop(Some(libc::EIO)),
            Some(Runtime::Dr(d)) => {
                if let Err(e) = d.shut_down(std::time::Duration::from_secs(30)) {
                    self.lock().insert(membership.pair, Runtime::Dr(d));
                    return Err(ApiError::Internal(format!("stop the DR applier: {e}")));
                }
                d.end_drills("the volume became its pair's production side");
            }
            None => {}
        }
        let gate = handle.volume.gate();
        gate.set_link(None);
        gate.set_role(membership.role())
            .map_err(|e| ApiError::FailedPrecondition(format!("volume {}: {e}", handle.name)))?;
        let internal = |what: &str, e: &dyn std::fmt::Display| {
            ApiError::Internal(format!("volume {}: {what}: {e}", handle.name))
        };
        // What it staged as the DR side, or what it recorded as one before, is not its data
        // any more.
        for file in DR_FILES {
            remove_if_there(&handle.dir.join(file)).map_err(|e| internal(file, &e))?;
        }
        if let Some(tracker) = handle.volume.tracker().filter(|_| shared.is_some()) {
            tracker
                .clear_durably(handle.volume.size())
                .map_err(|e| internal("clear the bitmap", &e))?;
        }
        let lineage = gate.lineage();
        match (side, shared, lineage) {
            (Side::Production, generation, Some(lineage)) => {
                let id = generation.unwrap_or_else(GenerationId::random);
                if lineage.get().current.id != id {
                    lineage
                        .begin(id)
                        .map_err(|e| internal("record a new generation", &e))?;
                }
            }
            (Side::Dr, Some(generation), Some(lineage)) => {
                lineage
                    .adopt(generation)
                    .map_err(|e| internal("adopt the production side's generation", &e))?;
                crate::dr_state::save(&roles::adopted_dr_state(), &handle.dir.join("dr.json"))
                    .map_err(|e| internal("record the DR state", &e))?;
            }
            _ => {}
        }
        if side == Side::Dr && membership.grouped {
            // It applies only what its group commits, from the first unit on.
            crate::dr::record_group_commit(&handle.dir, Epoch::ZERO)
                .map_err(|e| internal("record the group's commit", &e))?;
        }
        membership
            .save(&handle.dir)
            .map_err(|e| internal("record the pair", &e))?;
        tracing::info!(volume = %handle.name, pair = %membership.pair, side = side.as_str(), "switched sides");
        self.start(membership, handle, Start::FromRecord)
    }

    /// Stops every production side (the daemon is stopping): answers their groups held
    /// fail, so that the connections waiting for them end.
    pub fn stop_all(&self) {
        for runtime in self.lock().values() {
            if let Runtime::Production(p) = runtime {
                p.stop(Some(libc::EIO));
            }
        }
    }
}

/// How long a point held for a failover is kept from retention (across restarts).
const HOLD_POINT_FOR: std::time::Duration = std::time::Duration::from_secs(3600);

/// What a volume keeps as a pair's DR side: gone once it is not (promoted, switched).
const DR_FILES: [&str; 8] = [
    "dr.json",
    "stage-log",
    "group.json",
    "points.json",
    "undo",
    "drills",
    crate::undo_journal::HOLD_FILE,
    rollback::ROLLBACK_FILE,
];

/// Removes a file, or a directory and what it holds, if it is there.
fn remove_if_there(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        return std::fs::remove_dir_all(path);
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
