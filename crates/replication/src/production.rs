//! The production half of a pair: its connection to the DR agent, the tasks that send the
//! link's frames and take the answers, the epoch ticker, and the resync reader.
//!
//! ```text
//!  connect ─► Hello ─► Welcome { applied, consistent } ─► decide:
//!     DR side never had a copy      ─► initial sync (every extent, direct) ─► SyncDone
//!     DR side consistent, bits set  ─► catch-up (dirty extents, staged as one unit)
//!     nothing to send               ─► live
//!  stream breaks ─► writes tracked by the bitmap ─► reconnect with backoff and jitter
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use blockrep_core::pair::atomic_spans::unit_to_record;
use blockrep_core::pair::probes::VERIFY_BLOCK;
use blockrep_core::pair::production::Transmit;
use blockrep_core::replication::group_cut::Live;
use blockrep_core::replication::lineage::{self, DrView, Plan, ProductionView};
use blockrep_core::replication::{Epoch, Payload, ReplicationModel, ReplicationStatus, WriteFrame};
use blockrep_core::{ByteRange, read_spans};
use blockrep_volume::{AlignedBuf, DIRECT_IO_ALIGN, ReplicaLink, Volume, Waker};
use blockrep_wire::{
    Frame, Hello, HelloFlags, ProtocolVersion, RefuseKind, WriteFlags, WriteHeader, payload_crc,
};
use bytes::Bytes;

use crate::clock::Clock;
use crate::endpoint::{CallError, ClusterEndpoint, ReplicationStream};
use crate::framed::{FrameReader, FrameWriter, StreamError};
use crate::link::{Data, PairLink};
use crate::membership::{Fence, Membership, MembershipRecord};
use crate::verify::{VerifyRunner, VerifyStatus};

/// The smallest extent a resync reads (a journal bound too small for more still moves).
pub const MIN_EXTENT: u64 = 64 << 10;

/// A catch-up reads clean blocks between dirty ones when the gap is at most this: one read
/// of a span instead of one per dirty run (only the dirty runs are sent).
const MAX_READ_GAP: u64 = 128 << 10;

/// How a pair replicates; from the agent's `[replication]` configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// How often async writes are cut into a new epoch.
    pub epoch_interval: Duration,
    /// The most data queued for the DR side before an async pair falls back to bitmap mode.
    pub journal_bytes: u64,
    /// The largest extent a resync reads at once.
    pub resync_extent: u64,
    /// Frames the DR side acknowledges one by one may wait this long before the link is
    /// dropped as dead (the cluster's `peer_timeout_ms`).
    pub peer_timeout: Duration,
    /// DR side: the most payload bytes received and not yet handled by the applier, per
    /// pair; the stream is read no further until there is room.
    pub apply_queue_bytes: u64,
    /// DR side: the most bytes of writes a pair's stage log holds staged and not yet applied
    /// (`None`: half the volume, at least [`MIN_STAGE_LOG_BYTES`]). Past it the pair falls
    /// back to the bitmap; a catch-up bigger than the cap cannot apply until it is raised.
    pub stage_log_max_bytes: Option<u64>,
}

/// The smallest default stage log cap.
pub const MIN_STAGE_LOG_BYTES: u64 = 1 << 30;

impl ReplicationConfig {
    /// The stage log cap for a DR volume of `volume_size` bytes.
    pub fn stage_log_cap(&self, volume_size: u64) -> u64 {
        self.stage_log_max_bytes
            .unwrap_or((volume_size / 2).max(MIN_STAGE_LOG_BYTES))
    }
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            epoch_interval: Duration::from_secs(1),
            journal_bytes: 256 << 20,
            resync_extent: 4 << 20,
            peer_timeout: crate::endpoint::DEFAULT_PEER_TIMEOUT,
            apply_queue_bytes: 64 << 20,
            stage_log_max_bytes: None,
        }
    }
}

/// Where the pair is, for `pair show` and the coordinator.
#[derive(Clone, Debug)]
pub struct ProductionStatus {
    pub replication_status: ReplicationStatus,
    pub detail: String,
    pub since: SystemTime,
    /// Progress of the running resync, 0 to 1.
    pub progress: f64,
    /// The DR side's last consistent point: the epoch applied and when it was cut.
    pub consistent: Option<(Epoch, u64)>,
    /// The DR side holds a consistent image.
    pub dr_consistent: bool,
    pub resync_rate: f64,
}

struct Resync {
    total: u64,
    started: Instant,
}

pub struct ProductionPair {
    membership: Arc<MembershipRecord>,
    volume: Arc<Volume>,
    pub link: Arc<PairLink>,
    endpoint: Arc<ClusterEndpoint>,
    node: String,
    config: ReplicationConfig,
    status: Mutex<ProductionStatus>,
    resync: Mutex<Option<Resync>>,
    /// What the resync thread reports when it ends.
    resync_done: Arc<Mutex<Option<Result<ResyncOutcome, String>>>>,
    /// Wakes the tick loop when a resync ends.
    resync_ended: Arc<tokio::sync::Notify>,
    /// The sides diverged; the pair waits for `resolve`.
    diverged: AtomicBool,
    resolved: tokio::sync::Notify,
    /// The last stream was accepted (its backoff starts over).
    accepted: AtomicBool,
    /// The current or last online verify.
    verify: Mutex<Option<RunningVerify>>,
    /// Replication paused by the operator (recorded in the membership too).
    paused: tokio::sync::watch::Sender<bool>,
    /// The coordinator confirmed, since this agent started, that this side is still
    /// production (a grouped pair waits for it: its group may have failed over meanwhile).
    confirmed: tokio::sync::watch::Sender<bool>,
    /// Fenced for a reverse: the epoch writes were admitted in when the fence went up.
    drain_from: Mutex<Option<Epoch>>,
    /// Told when the pair trips (so the coordinator cuts) or its status changes: its agent
    /// reports at once.
    report_now: Arc<tokio::sync::Notify>,
    stop: tokio::sync::watch::Sender<bool>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("peer unreachable: {0}")]
    Unreachable(#[from] CallError),
    #[error("link lost: {0}")]
    Stream(#[from] StreamError),
    #[error("peer refused: {0}")]
    Refused(String),
    /// The two sides' data diverged: nothing moves until the operator resolves it.
    #[error("{0}")]
    Diverged(String),
    #[error("peer silent: the DR agent answered nothing for {0:?}")]
    Silent(Duration),
    /// A synchronous pair of a group leaves synchronous replication as when its link
    /// breaks, so that its group trips.
    #[error("{0}: the stream ends so that the group trips, then catches up")]
    Trip(&'static str),
    #[error("peer broke the protocol: {0}")]
    Protocol(String),
    #[error("resync failed: {0}")]
    Resync(String),
    #[error("paused")]
    Paused,
    #[error("stopped")]
    Stopped,
}

/// What the production pairs of an agent share.
pub struct AgentContext {
    pub endpoint: Arc<ClusterEndpoint>,
    /// This node's name, told to the DR side.
    pub node: String,
    pub config: ReplicationConfig,
    /// Wakes the heartbeat to report at once.
    pub report_now: Arc<tokio::sync::Notify>,
    /// The one clock the pairs' links read.
    pub clock: Arc<dyn Clock>,
}

impl ProductionPair {
    /// Takes up the production side of a pair: installs the link in the volume's write gate
    /// and starts connecting to the DR agent.
    pub fn start(
        membership: Membership,
        volume: Arc<Volume>,
        volume_dir: PathBuf,
        agent: AgentContext,
    ) -> Result<Arc<Self>, String> {
        let AgentContext {
            endpoint,
            node,
            config,
            report_now,
            clock,
        } = agent;
        let tracker = volume.tracker().cloned().ok_or_else(|| {
            "replication needs dirty tracking (bitmap.dirty_tracking = true)".to_owned()
        })?;
        let link = Arc::new(PairLink::new(
            membership.model,
            tracker,
            config.journal_bytes,
            Epoch::ZERO,
            clock,
        ));
        link.set_grouped(membership.grouped);
        if membership.grouped {
            // Never admit in an epoch the group has left, nor answer before the last cut's
            // round is over (rule 3).
            link.start_in_group(membership.group_epoch);
            if membership.model == ReplicationModel::Hypermetro && !membership.paused {
                // The group's other pairs may still write their DR sides directly: this
                // one's answers wait for the group's trip (docs/GROUPS.md).
                link.start_tripped();
                report_now.notify_one();
            }
        }
        if let Some(from) = membership.catch_up_from {
            link.resume_unit(from);
        }
        volume
            .gate()
            .set_link(Some(Arc::clone(&link) as Arc<dyn ReplicaLink>));
        let (stop, _) = tokio::sync::watch::channel(false);
        let (paused, _) = tokio::sync::watch::channel(membership.paused);
        let (confirmed, _) =
            tokio::sync::watch::channel(membership.role_at_start() == membership.role());
        let drain_from = (membership.fence == Some(Fence::Draining)).then(|| link.current_epoch());
        let pair = Arc::new(Self {
            membership: Arc::new(MembershipRecord::new(&volume_dir, membership)),
            volume,
            link,
            endpoint,
            node,
            config,
            status: Mutex::new(ProductionStatus {
                replication_status: ReplicationStatus::Copying,
                detail: "connecting to the DR agent".into(),
                since: SystemTime::now(),
                progress: 0.0,
                consistent: None,
                dr_consistent: false,
                resync_rate: 0.0,
            }),
            resync: Mutex::new(None),
            resync_done: Arc::new(Mutex::new(None)),
            resync_ended: Arc::new(tokio::sync::Notify::new()),
            diverged: AtomicBool::new(false),
            resolved: tokio::sync::Notify::new(),
            accepted: AtomicBool::new(false),
            verify: Mutex::new(None),
            paused,
            confirmed,
            drain_from: Mutex::new(drain_from),
            report_now,
            stop,
        });
        tokio::spawn(Arc::clone(&pair).run());
        Ok(pair)
    }

    pub fn membership(&self) -> Membership {
        self.membership.get()
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Stops replicating: the link leaves the write gate (writes go on, tracked), the
    /// connection ends.
    pub fn stop(&self) {
        self.volume.gate().set_link(None);
        self.link.disconnected();
        let _ = self.stop.send(true);
        if let Some(v) = self
            .verify
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            v.stop.store(true, Ordering::SeqCst);
        }
    }

    pub fn status(&self) -> ProductionStatus {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(resync) = self
            .resync
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let acked = self.link.resync_acked();
            if resync.total > 0 {
                status.progress = (acked as f64 / resync.total as f64).min(1.0);
            }
            let secs = resync.started.elapsed().as_secs_f64();
            if secs > 0.0 {
                status.resync_rate = acked as f64 / secs;
                self.status
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .resync_rate = status.resync_rate;
            }
        } else if status.replication_status == ReplicationStatus::Active {
            status.progress = 1.0;
        }
        // A pair of a hypermetro group that journals (after a trip, until its whole group goes
        // synchronous again) is not at RPO 0.
        if status.replication_status == ReplicationStatus::Active
            && self.link.model() == ReplicationModel::Hypermetro
            && (self.link.live() != Live::Sync || self.link.gated())
        {
            status.replication_status = ReplicationStatus::Copying;
            status.detail = if self.link.live() == Live::Sync {
                "going synchronous again with its group: writes wait until the group's DR sides hold everything before".into()
            } else {
                "journaled to the DR side until its whole group goes synchronous again (after a trip)".into()
            };
        }
        status
    }

    /// Seconds the DR side's consistent image trails production.
    pub fn lag_seconds(&self) -> f64 {
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match (status.replication_status, self.membership().model) {
            (ReplicationStatus::Active, ReplicationModel::Hypermetro) => 0.0,
            _ => match status.consistent {
                Some((_, cut_ms)) if cut_ms > 0 => {
                    (self.link.wall_ms().saturating_sub(cut_ms)) as f64 / 1000.0
                }
                _ => 0.0,
            },
        }
    }

    /// The last epoch the DR side said it applied (its `Welcome`, then `Applied` frames).
    fn dr_applied(&self) -> Epoch {
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.consistent.map_or(Epoch::ZERO, |(epoch, _)| epoch)
    }

    fn set_status(&self, replication_status: ReplicationStatus, detail: impl Into<String>) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let detail = detail.into();
        if status.replication_status != replication_status || status.detail != detail {
            if status.replication_status != replication_status {
                tracing::info!(pair = %self.membership().pair, status = %replication_status, %detail, "pair status");
                // The coordinator's jobs wait on statuses: it hears of this one at once.
                self.report_now.notify_one();
            }
            status.replication_status = replication_status;
            status.detail = detail;
            status.since = SystemTime::now();
        }
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    async fn run(self: Arc<Self>) {
        let mut backoff = Backoff::new(self.membership().pair.as_bytes()[0] as u64);
        let mut stop = self.stop.subscribe();
        let mut paused = self.paused.subscribe();
        let mut confirmed = self.confirmed.subscribe();
        loop {
            if self.stopped() {
                return;
            }
            if !*confirmed.borrow_and_update() {
                self.set_status(
                    ReplicationStatus::Inactive,
                    "restarted: waiting for the coordinator to confirm this side is still production (its group may have failed over)",
                );
                tokio::select! {
                    _ = confirmed.wait_for(|c| *c) => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
            if self.membership().fence == Some(Fence::Demoted) {
                self.set_status(
                    ReplicationStatus::Inactive,
                    "demoted: its group failed over; the volume takes no writes until `group reprotect`",
                );
                let _ = stop.changed().await;
                return;
            }
            if *paused.borrow_and_update() {
                self.set_status(
                    ReplicationStatus::ActiveStopped,
                    "stopped (group stop, or a failover): writes are tracked in the bitmap until `group sync` or `group reprotect`",
                );
                tokio::select! {
                    _ = paused.wait_for(|p| !*p) => {}
                    _ = stop.changed() => return,
                }
                backoff = Backoff::new(self.membership().pair.as_bytes()[0] as u64);
                continue;
            }
            let result = self.session().await;
            self.link.disconnected();
            if self.link.trip_wanted() && !self.stopped() {
                tracing::warn!(pair = %self.membership().pair, "the link is down: its writes' answers are held until the group trips");
                self.report_now.notify_one();
            }
            *self.resync.lock().unwrap_or_else(|e| e.into_inner()) = None;
            if self.accepted.swap(false, Ordering::SeqCst) {
                backoff = Backoff::new(self.membership().pair.as_bytes()[0] as u64);
            }
            match result {
                Err(SessionError::Stopped) | Ok(()) => return,
                Err(SessionError::Paused) => continue,
                Err(SessionError::Diverged(reason)) => {
                    tracing::error!(pair = %self.membership().pair, %reason, "the pair's sides diverged; waiting for `pair resolve`");
                    self.diverged.store(true, Ordering::SeqCst);
                    self.set_status(ReplicationStatus::Error, reason);
                    tokio::select! {
                        _ = self.resolved.notified() => {}
                        _ = stop.changed() => return,
                    }
                    continue;
                }
                Err(e) => {
                    let status = match e {
                        SessionError::Refused(_) => ReplicationStatus::Error,
                        _ => ReplicationStatus::Inactive,
                    };
                    tracing::warn!(pair = %self.membership().pair, error = %e, "replication stream ended");
                    self.set_status(status, e.to_string());
                }
            }
            let wait = backoff.next();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Starts an online verify (a job of the coordinator's): compares every block with the
    /// DR side's while the pair replicates; with `repair`, copies the differing ones again.
    pub fn start_verify(&self, job_id: String, repair: bool) -> Result<(), String> {
        let mut running = self.verify.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = running.as_ref() {
            let status = v.status.lock().unwrap_or_else(|e| e.into_inner());
            if status.job_id == job_id {
                return Ok(());
            }
            if !status.done {
                return Err(format!("verify job {} is still running", status.job_id));
            }
        }
        let status = Arc::new(Mutex::new(VerifyStatus {
            job_id,
            ..VerifyStatus::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let runner = VerifyRunner {
            volume: Arc::clone(&self.volume),
            link: Arc::clone(&self.link),
            status: Arc::clone(&status),
            repair,
            stop: Arc::clone(&stop),
        };
        std::thread::Builder::new()
            .name(format!(
                "verify-{}",
                &self.membership().pair.to_string()[..8]
            ))
            .spawn(move || runner.run())
            .map_err(|e| format!("start the verify: {e}"))?;
        *running = Some(RunningVerify { status, stop });
        Ok(())
    }

    /// The current or last verify.
    pub fn verify_status(&self) -> Option<VerifyStatus> {
        self.verify
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|v| v.status.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// The last epoch the DR side reported staged (durable, maybe not yet applied).
    pub fn staged_epoch(&self) -> Epoch {
        self.link.staged_epoch()
    }

    /// The sides diverged and the pair waits for the operator.
    pub fn needs_resolve(&self) -> bool {
        self.diverged.load(Ordering::SeqCst)
    }

    /// The operator keeps this side: the next connection copies the whole volume over the
    /// DR side's changes.
    pub fn resolve_keeping_production(&self) -> std::io::Result<()> {
        self.membership.update(|m| m.discard_peer = true)?;
        self.diverged.store(false, Ordering::SeqCst);
        self.set_status(
            ReplicationStatus::Copying,
            "resolved: copying production over the DR side's changes",
        );
        self.resolved.notify_one();
        Ok(())
    }

    /// Records whether the pair's epochs are cut by its consistency group (durably first:
    /// a restart must not cut on its own), and tells the link.
    pub fn record_grouped(&self, grouped: bool) -> std::io::Result<()> {
        self.membership.update(|m| m.grouped = grouped)?;
        self.link.set_grouped(grouped);
        Ok(())
    }

    /// Records, durably, that the pair switches to group epoch `to` (before the switch is
    /// acknowledged: after a crash the agent admits writes in no earlier epoch).
    pub fn record_group_cut(&self, to: Epoch) -> std::io::Result<()> {
        self.membership.update(|m| {
            m.grouped = true;
            m.group_epoch = m.group_epoch.max(to);
        })?;
        Ok(())
    }

    /// Pauses or resumes replication (the operator's `group stop` and `group sync`). Paused,
    /// the stream ends and writes are tracked in the bitmap; resumed, the pair reconnects
    /// and catches up. Recorded in the membership, so a restart keeps it.
    pub fn set_paused(&self, paused: bool) -> std::io::Result<()> {
        if self.membership().paused == paused {
            return Ok(());
        }
        let membership = self.membership.update(|m| m.paused = paused)?;
        tracing::info!(pair = %membership.pair, paused, "replication paused or resumed by the operator");
        if !paused {
            self.set_status(
                ReplicationStatus::Copying,
                "resumed: connecting to the DR agent",
            );
        }
        self.paused.send_replace(paused);
        Ok(())
    }

    /// The pair's volumes grew: recorded, and the next `Hello` says so.
    pub fn set_size(&self, size: u64) -> std::io::Result<()> {
        self.membership.update(|m| m.size = size).map(drop)
    }

    /// The coordinator confirmed that this side is still production: the volume takes
    /// writes again (unless fenced) and the pair starts replicating.
    pub fn confirm(&self) {
        if *self.confirmed.borrow() {
            return;
        }
        let role = self.membership().role();
        self.volume.gate().restore_role(role);
        tracing::info!(pair = %self.membership().pair, %role, "the coordinator confirmed this side's role");
        self.confirmed.send_replace(true);
    }

    /// Whether the coordinator has confirmed this side since the agent started.
    pub fn confirmed(&self) -> bool {
        *self.confirmed.borrow()
    }

    /// Puts up or takes down a fence, recorded before the gate changes: `Draining` refuses new
    /// writes while what was admitted still replicates; `Demoted` also stops replicating.
    pub fn set_fence(&self, fence: Option<Fence>, term: u64) -> std::io::Result<()> {
        let membership = self.membership.update(|m| {
            m.fence = fence;
            m.term = m.term.max(term);
        })?;
        // An unconfirmed side stays fenced whatever it is told; confirmation applies it.
        if self.confirmed() || fence.is_some() {
            self.volume.gate().restore_role(membership.role());
        }
        // Read once the gate refuses writes: every write admitted is in this epoch or an
        // earlier one.
        *self.drain_from.lock().unwrap_or_else(|e| e.into_inner()) =
            (fence == Some(Fence::Draining)).then(|| self.link.current_epoch());
        tracing::info!(pair = %membership.pair, fence = fence.map_or("none", Fence::as_str), "fence changed");
        if fence == Some(Fence::Demoted) {
            self.set_status(
                ReplicationStatus::Inactive,
                "demoted: its group failed over; the volume takes no writes until `group reprotect`",
            );
            self.confirmed.send_replace(true);
            self.stop();
            // Writes a trip held were never acknowledged, and the group failed over without
            // them: they fail, and their connections can finish.
            self.link.fail_held(libc::EIO);
        }
        Ok(())
    }

    /// Fenced for a reverse, and everything admitted before is on the DR side: no write holds
    /// its blocks in the gate (each is answered, so a hypermetro one was acknowledged), nothing
    /// waits for an acknowledgement or to be sent, and the DR side staged every epoch up to
    /// the one the fence went up in. Returns that epoch (the DR side applies up to it).
    pub fn drained(&self) -> Option<Epoch> {
        let from = (*self.drain_from.lock().unwrap_or_else(|e| e.into_inner()))?;
        if !self.volume.gate().idle() || !self.link.idle() {
            return None;
        }
        match self.link.live() {
            Live::Sync => Some(from),
            Live::Journal if self.link.staged_epoch() >= from => Some(from),
            _ => None,
        }
    }

    async fn session(&self) -> Result<(), SessionError> {
        let membership = self.membership();
        let lineage = self
            .volume
            .gate()
            .lineage()
            .ok_or_else(|| SessionError::Protocol("the volume has no lineage".into()))?
            .get();
        let flags = HelloFlags {
            dirty: self.link.tracker().dirty_bytes() > 0,
            full_sync_done: membership.full_sync_done,
            discard_peer: membership.discard_peer,
        };
        let hello = Hello {
            version: ProtocolVersion::CURRENT,
            pair: membership.pair,
            volume: membership.peer_volume,
            size: membership.size,
            model: membership.model,
            node: self.node.clone(),
            lineage: lineage.clone(),
            flags,
        };
        let ReplicationStream {
            mut reader,
            mut writer,
        } = self
            .endpoint
            .open_replication(membership.peer_address, &membership.peer_node, hello)
            .await?;
        let (applied, staged, consistent, dr_lineage) = match reader.next().await? {
            Some(Frame::Welcome {
                applied,
                staged,
                consistent,
                lineage,
            }) => (applied, staged, consistent, lineage),
            Some(Frame::Refuse {
                kind: RefuseKind::Diverged,
                reason,
            }) => return Err(SessionError::Diverged(reason)),
            Some(Frame::Refuse { reason, .. }) => return Err(SessionError::Refused(reason)),
            Some(_) => return Err(SessionError::Protocol("expected Welcome".into())),
            None => return Err(SessionError::Protocol("stream closed during Hello".into())),
        };
        // The same decision the DR side made before it answered.
        let plan = lineage::plan(
            ProductionView {
                lineage: &lineage,
                dirty: flags.dirty,
                full_sync_done: flags.full_sync_done,
                discard_peer: flags.discard_peer,
            },
            DrView {
                lineage: &dr_lineage,
                consistent,
            },
        );
        let plan = match plan {
            Plan::Diverged(d) => return Err(SessionError::Diverged(d.to_string())),
            Plan::FullSync(reason) => {
                // Until this copy ends, a reconnect must copy everything again.
                self.membership
                    .update(|m| m.full_sync_done = false)
                    .map_err(|e| SessionError::Resync(format!("record the pair: {e}")))?;
                tracing::info!(pair = %membership.pair, %reason, "copying the whole volume");
                ResyncKind::Full
            }
            Plan::FinishSync => ResyncKind::DirtyDirect,
            Plan::CatchUp if self.link.tracker().dirty_bytes() > 0 => ResyncKind::CatchUp,
            Plan::CatchUp => ResyncKind::None,
        };
        tracing::info!(pair = %membership.pair, peer = %membership.peer_address, %applied, consistent, ?plan, "DR agent accepted the stream");
        self.accepted.store(true, Ordering::SeqCst);
        self.link.connected(staged);
        {
            let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
            status.dr_consistent = consistent;
            if consistent {
                status.consistent = Some((applied, 0));
            }
        }

        let stop_resync = Arc::new(AtomicBool::new(false));
        let resync_thread = self.start_resync(plan, Arc::clone(&stop_resync))?;

        let mut stop = self.stop.subscribe();
        let mut paused = self.paused.subscribe();
        let result = tokio::select! {
            r = send_loop(&self.link, &mut writer) => r,
            r = self.receive_loop(&mut reader) => r,
            r = self.tick_loop(&stop_resync) => r,
            _ = stop.changed() => Err(SessionError::Stopped),
            _ = paused.wait_for(|p| *p) => Err(SessionError::Paused),
        };
        stop_resync.store(true, Ordering::SeqCst);
        writer.finish();
        if let Some(thread) = resync_thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        result
    }

    /// Starts the resync reader for `plan`, if there is anything to resync.
    fn start_resync(
        &self,
        plan: ResyncKind,
        stop: Arc<AtomicBool>,
    ) -> Result<Option<std::thread::JoinHandle<()>>, SessionError> {
        let status_detail = match plan {
            ResyncKind::None => {
                self.link.go_live();
                self.set_status(ReplicationStatus::Active, "replicating");
                return Ok(None);
            }
            ResyncKind::Full => "initial sync: copying the volume",
            ResyncKind::DirtyDirect => "completing the first sync",
            ResyncKind::CatchUp => "catching up from the bitmap",
        };
        match plan {
            ResyncKind::CatchUp => {
                self.link.begin_catch_up();
                // Recorded before the unit's end can be sealed: a restarted agent reports
                // its span again (docs/GROUPS.md, "Catch-up units are atomic").
                let recorded = self.membership().catch_up_from;
                let from = self
                    .link
                    .unit_in_progress()
                    .map(|new| unit_to_record(recorded, new, self.dr_applied()));
                if from.is_some() && recorded != from {
                    self.membership
                        .update(|m| m.catch_up_from = from)
                        .map_err(|e| {
                            SessionError::Resync(format!("record the catch-up's start: {e}"))
                        })?;
                }
            }
            _ => self.link.go_live(),
        }
        self.link.reset_resync_progress();
        self.set_status(ReplicationStatus::Copying, status_detail);
        let reader = ResyncReader {
            volume: Arc::clone(&self.volume),
            link: Arc::clone(&self.link),
            // An extent never takes more than half the journal's room.
            extent: self
                .config
                .resync_extent
                .min((self.config.journal_bytes / 2).max(MIN_EXTENT)),
            stop,
            final_pass_bytes: (self.config.journal_bytes / 2).min(64 << 20),
        };
        let total = match plan {
            ResyncKind::Full => self.volume.size(),
            _ => self.link.tracker().dirty_bytes(),
        };
        *self.resync.lock().unwrap_or_else(|e| e.into_inner()) = Some(Resync {
            total,
            started: Instant::now(),
        });
        let pair = self.membership().pair;
        let report = ResyncReport {
            membership: Arc::clone(&self.membership),
            done: Arc::clone(&self.resync_done),
            ended: Arc::clone(&self.resync_ended),
        };
        let thread = std::thread::Builder::new()
            .name(format!("resync-{}", &pair.to_string()[..8]))
            .spawn(move || {
                let outcome = match plan {
                    ResyncKind::Full => reader.initial_sync(true),
                    ResyncKind::DirtyDirect => reader.initial_sync(false),
                    _ => reader.catch_up(),
                };
                report.finish(outcome);
            })
            .map_err(|e| SessionError::Resync(e.to_string()))?;
        Ok(Some(thread))
    }

    async fn receive_loop(&self, reader: &mut FrameReader) -> Result<(), SessionError> {
        // The counters run across streams; each stream counts from zero.
        let mut counted = reader.bytes_received;
        loop {
            let frame = reader.next().await?;
            self.link
                .counters
                .bytes_received
                .fetch_add(reader.bytes_received - counted, Ordering::Relaxed);
            counted = reader.bytes_received;
            match frame {
                Some(Frame::WriteAck { seq } | Frame::FlushAck { seq }) => {
                    self.link.handle_ack(seq)
                }
                Some(Frame::Staged { epoch }) => self.link.handle_staged(epoch),
                Some(Frame::SyncDoneAck { epoch }) => self.link.handle_sync_done_ack(epoch),
                Some(Frame::Applied { epoch, cut_ms }) => {
                    let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
                    status.consistent = Some((epoch, cut_ms));
                }
                Some(Frame::Reject { seq, reason }) => self.link.handle_reject(seq, reason),
                Some(Frame::Verified { id, differing }) => {
                    self.link.handle_verified(id, &differing)
                }
                Some(Frame::Refuse { reason, .. }) => return Err(SessionError::Refused(reason)),
                Some(_) => {
                    return Err(SessionError::Protocol(
                        "unexpected frame from the DR side".into(),
                    ));
                }
                None => {
                    return Err(SessionError::Protocol(
                        "the DR side closed the stream".into(),
                    ));
                }
            }
        }
    }

    /// Cuts epochs, notices the end of a resync, and starts a catch-up when the journal
    /// overflowed.
    async fn tick_loop(&self, stop_resync: &Arc<AtomicBool>) -> Result<(), SessionError> {
        let mut interval =
            tokio::time::interval(self.config.epoch_interval.min(Duration::from_millis(200)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_cut = Instant::now();
        let mut catch_up_thread: Option<std::thread::JoinHandle<()>> = None;
        // For the watchdog: a session ticks at least every 200 ms.
        let beat = blockrep_volume::liveness::Liveness::global()
            .register(format!("session of pair {}", self.membership().pair));
        beat.expect(true);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = self.resync_ended.notified() => {}
            }
            beat.progress();
            if let Some(waited) = self.link.unanswered_for()
                && waited > self.config.peer_timeout
            {
                return Err(SessionError::Silent(waited));
            }
            if let Some(why) = self.link.stream_must_end() {
                return Err(SessionError::Trip(why));
            }
            // A pair in a consistency group is cut by its group, never on its own.
            let grouped = self.link.grouped();
            if last_cut.elapsed() >= self.config.epoch_interval {
                last_cut = Instant::now();
                if self.link.live() != Live::Sync && !grouped {
                    self.link.advance_epoch();
                }
            }
            let outcome = self
                .resync_done
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(outcome) = outcome {
                if let Some(resync) = self.resync.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let secs = resync.started.elapsed().as_secs_f64();
                    if secs > 0.0 {
                        self.status
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .resync_rate = self.link.resync_acked() as f64 / secs;
                    }
                }
                match outcome {
                    Ok(ResyncOutcome::Stopped) => {}
                    Ok(outcome) => {
                        // Cut at once after an initial sync: the DR side is consistent
                        // when the unit after `SyncDone` is applied, not an interval later.
                        if outcome != ResyncOutcome::CaughtUp
                            && self.link.live() != Live::Sync
                            && !grouped
                        {
                            last_cut = Instant::now();
                            self.link.advance_epoch();
                        }
                        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
                        status.dr_consistent = true;
                        status.progress = 1.0;
                        drop(status);
                        self.set_status(ReplicationStatus::Active, "replicating");
                    }
                    Err(e) => return Err(SessionError::Resync(e)),
                }
            }
            let resync_running = self
                .resync
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some();
            if self.link.needs_catch_up() && !resync_running {
                if self
                    .link
                    .stage_full_for()
                    .is_some_and(|since| since < STAGE_FULL_RETRY)
                {
                    self.set_status(
                        ReplicationStatus::Copying,
                        format!(
                            "the DR side's stage log is full (replication.stage_log_max_bytes on the DR agent): writes are tracked in the bitmap, the DR volume stays at its last consistent point, and a catch-up is tried again every {} s",
                            STAGE_FULL_RETRY.as_secs()
                        ),
                    );
                    continue;
                }
                if let Some(thread) = catch_up_thread.take() {
                    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
                }
                tracing::info!(pair = %self.membership().pair, "falling back to bitmap mode; catching up");
                catch_up_thread =
                    self.start_resync(ResyncKind::CatchUp, Arc::clone(stop_resync))?;
            }
        }
    }
}

/// A verify thread and its handles.
struct RunningVerify {
    status: Arc<Mutex<VerifyStatus>>,
    stop: Arc<AtomicBool>,
}

/// How the resync thread reports its end.
struct ResyncReport {
    membership: Arc<MembershipRecord>,
    done: Arc<Mutex<Option<Result<ResyncOutcome, String>>>>,
    ended: Arc<tokio::sync::Notify>,
}

impl ResyncReport {
    fn finish(self, outcome: Result<ResyncOutcome, String>) {
        match &outcome {
            Ok(ResyncOutcome::FullSyncDone) => {
                let recorded = self.membership.update(|m| {
                    m.full_sync_done = true;
                    m.discard_peer = false;
                });
                if let Err(e) = recorded {
                    tracing::error!(error = %e, "cannot record the end of the initial sync");
                }
            }
            Ok(ResyncOutcome::CaughtUp | ResyncOutcome::Stopped) => {}
            Err(e) => tracing::error!(error = %e, "resync failed"),
        }
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        self.ended.notify_one();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResyncKind {
    None,
    /// Every extent of the volume, direct: the DR side never had a copy.
    Full,
    /// The dirty extents, direct: the first sync did not complete its last step.
    DirtyDirect,
    /// The dirty extents, staged as one unit: the DR side keeps its consistent image.
    CatchUp,
}

#[derive(Debug, PartialEq, Eq)]
enum ResyncOutcome {
    FullSyncDone,
    CaughtUp,
    Stopped,
}

/// Reads extents with their blocks locked and queues them on the link.
struct ResyncReader {
    volume: Arc<Volume>,
    link: Arc<PairLink>,
    extent: u64,
    stop: Arc<AtomicBool>,
    final_pass_bytes: u64,
}

impl ResyncReader {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Copies every extent (`whole`) or the dirty ones, written direct on the DR side, then
    /// marks the sync done.
    fn initial_sync(&self, whole: bool) -> Result<ResyncOutcome, String> {
        let waker = Arc::new(Waker::new().map_err(|e| e.to_string())?);
        let runs = if whole {
            vec![ByteRange::new(0, self.volume.size())]
        } else {
            self.link.tracker().dirty_runs()
        };
        for run in runs {
            let mut at = run.offset;
            while at < run.end() {
                if self.stopped() {
                    return Ok(ResyncOutcome::Stopped);
                }
                // Holes are cheap to send (no payload): take them in big pieces.
                let piece = ByteRange::new(at, (run.end() - at).min(1 << 30));
                let consumed = self.sync_piece(piece, &waker)?;
                at += consumed;
            }
        }
        if !self.link.wait_for_extents(&|| self.stopped()) {
            return Ok(ResyncOutcome::Stopped);
        }
        // The pair counts as synced only once the DR side recorded it durably.
        let end = self.link.push_sync_done();
        if !self.link.wait_for_sync_done(end, &|| self.stopped()) {
            return Ok(ResyncOutcome::Stopped);
        }
        Ok(ResyncOutcome::FullSyncDone)
    }

    /// Sends the start of `piece`: a hole whole, or one data extent. Returns the bytes it
    /// covered.
    fn sync_piece(&self, piece: ByteRange, waker: &Arc<Waker>) -> Result<u64, String> {
        if !self.link.wait_for_room(self.extent, &|| self.stopped()) {
            return Ok(piece.len);
        }
        let gate = self.volume.gate();
        let lock = gate
            .lock_blocking(piece, waker)
            .map_err(|e| e.to_string())?;
        // Allocation is read with the blocks locked: no write can fill a hole meanwhile.
        let first = self
            .volume
            .allocation(piece, 1)
            .map_err(|e| e.to_string())
            .map(|extents| extents.first().copied());
        let result = match first {
            Ok(Some(e)) if e.hole => {
                let range = ByteRange::new(piece.offset, e.len);
                let ticket = self.link.tracker().issue_ticket(range);
                self.link.push_sync_extent(range, Payload::Zeroes, ticket);
                Ok(e.len)
            }
            Ok(Some(e)) => {
                let range = ByteRange::new(piece.offset, e.len.min(self.extent));
                self.read_extent(range).map(|payload| {
                    let ticket = self.link.tracker().issue_ticket(range);
                    self.count_sent(range, &payload);
                    self.link.push_sync_extent(range, payload, ticket);
                    range.len
                })
            }
            Ok(None) => Ok(piece.len),
            Err(e) => Err(e),
        };
        gate.leave(lock);
        result
    }

    /// Sends the extents dirtied and not yet sent, pass after pass, staged as one unit;
    /// once little is left, live writes join the unit and its seal ends the catch-up.
    fn catch_up(&self) -> Result<ResyncOutcome, String> {
        let waker = Arc::new(Waker::new().map_err(|e| e.to_string())?);
        let mut final_pass = false;
        loop {
            let runs = self.link.tracker().unsent_runs();
            let bytes: u64 = runs.iter().map(|r| r.len).sum();
            if !final_pass && bytes <= self.final_pass_bytes {
                if !self.link.begin_final_pass() {
                    return Ok(ResyncOutcome::Stopped);
                }
                final_pass = true;
                continue;
            }
            for span in read_spans(&runs, self.extent, MAX_READ_GAP) {
                if self.stopped() {
                    return Ok(ResyncOutcome::Stopped);
                }
                if !self
                    .link
                    .wait_for_room(span.piece_bytes(), &|| self.stopped())
                {
                    return Ok(ResyncOutcome::Stopped);
                }
                let lock = self
                    .volume
                    .gate()
                    .lock_blocking(span.range, &waker)
                    .map_err(|e| e.to_string())?;
                let admitted: Vec<_> = span
                    .pieces
                    .iter()
                    .map(|_| self.link.admit_catch_up_extent())
                    .collect();
                let read = self.read_range(span.range);
                let mut tickets = Vec::with_capacity(span.pieces.len());
                self.link
                    .tracker()
                    .issue_tickets(span.pieces.iter().copied(), &mut tickets);
                self.volume.gate().leave(lock);
                let data = match read {
                    Ok(data) => data,
                    Err(e) => {
                        for admitted in admitted {
                            self.link.abandon_catch_up_extent(admitted);
                        }
                        self.link.tracker().forget(tickets);
                        return Err(e);
                    }
                };
                // Every piece goes to the link, even once the catch-up is given up: each
                // leaves its epoch there.
                let mut given_up = false;
                for ((piece, admitted), ticket) in span.pieces.iter().zip(admitted).zip(tickets) {
                    let start = (piece.offset - span.range.offset) as usize;
                    let payload = payload_of(data.slice(start..start + piece.len as usize));
                    self.count_sent(*piece, &payload);
                    given_up |= !self
                        .link
                        .push_catch_up_extent(admitted, *piece, payload, ticket);
                }
                if given_up {
                    return Ok(ResyncOutcome::Stopped);
                }
            }
            if final_pass {
                let Some(end) = self.link.finish_catch_up() else {
                    return Ok(ResyncOutcome::Stopped);
                };
                // The unit applies whole once its seal is staged; live writes then go on
                // as the model says (direct again, for hypermetro).
                if !self.link.wait_for_catch_up_end(end, &|| self.stopped()) {
                    return Ok(ResyncOutcome::Stopped);
                }
                self.link.go_live();
                return Ok(ResyncOutcome::CaughtUp);
            }
        }
    }

    fn count_sent(&self, range: ByteRange, payload: &Payload<Data>) {
        let counters = &self.link.counters;
        if let Payload::Data(data) = payload {
            counters
                .resync_bytes_sent
                .fetch_add(data.0.len() as u64, Ordering::Relaxed);
        }
        counters
            .resync_bytes_copied
            .fetch_add(range.len, Ordering::Relaxed);
    }

    /// Reads an extent (its blocks locked by the caller): zeroes are sent as a zero range.
    fn read_extent(&self, range: ByteRange) -> Result<Payload<Data>, String> {
        self.read_range(range).map(payload_of)
    }

    /// Reads `range` (its blocks locked by the caller) with one I/O.
    fn read_range(&self, range: ByteRange) -> Result<Bytes, String> {
        let aligned = range.align_out(DIRECT_IO_ALIGN);
        let mut buf = AlignedBuf::new(aligned.len as usize);
        self.volume
            .backing()
            .read_exact_at(&mut buf, aligned.offset)
            .map_err(|e| format!("read {range}: {e}"))?;
        let start = (range.offset - aligned.offset) as usize;
        Ok(Bytes::from_owner(buf).slice(start..start + range.len as usize))
    }
}

/// Data to send: all zeroes go as a zero range, without payload.
fn payload_of(data: Bytes) -> Payload<Data> {
    if is_zero(&data) {
        Payload::Zeroes
    } else {
        Payload::Data(Data(data))
    }
}

fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: any bytes are valid u128s; align_to splits off what is not aligned.
    let (head, body, tail) = unsafe { buf.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Sends the link's frames, payloads as their own chunks.
async fn send_loop(link: &PairLink, writer: &mut FrameWriter) -> Result<(), SessionError> {
    let mut frames = Vec::new();
    let mut chunks: Vec<Bytes> = Vec::new();
    let counters = Arc::clone(&link.counters);
    let fault = fault::CorruptExtent::from_env();
    // The counters run across streams; each stream counts from zero.
    let mut counted = writer.bytes_sent;
    loop {
        let notified = link.wake_sender.notified();
        link.take_frames(8 << 20, &mut frames);
        if frames.is_empty() {
            notified.await;
            continue;
        }
        for frame in frames.drain(..) {
            match frame {
                Transmit::Write(WriteFrame {
                    epoch,
                    seq,
                    range,
                    payload,
                    direct,
                    fua,
                    gated,
                }) => {
                    let mut flags = 0;
                    if direct {
                        flags |= WriteFlags::DIRECT | WriteFlags::ACK;
                    }
                    if gated {
                        flags |= WriteFlags::GATED;
                    }
                    if fua {
                        flags |= WriteFlags::FUA;
                    }
                    let bytes = match payload {
                        Payload::Data(Data(bytes)) => bytes,
                        Payload::Zeroes => {
                            flags |= WriteFlags::ZEROES;
                            Bytes::new()
                        }
                    };
                    let header = WriteHeader {
                        flags: WriteFlags(flags),
                        epoch,
                        seq,
                        offset: range.offset,
                        len: range.len as u32,
                        crc: payload_crc(&bytes),
                    };
                    let bytes = fault.apply(bytes);
                    counters.extents_sent.fetch_add(1, Ordering::Relaxed);
                    writer.push_write(&header, bytes, &mut chunks);
                }
                Transmit::Flush { seq } => writer.push_frame(&Frame::Flush { seq }, &mut chunks),
                Transmit::Seal { epoch, cut_ms } => {
                    writer.push_frame(&Frame::Seal { epoch, cut_ms }, &mut chunks)
                }
                Transmit::Discard { after } => {
                    writer.push_frame(&Frame::Discard { after }, &mut chunks)
                }
                Transmit::SyncDone { epoch } => {
                    writer.push_frame(&Frame::SyncDone { epoch }, &mut chunks)
                }
                Transmit::Ungate { epoch } => {
                    writer.push_frame(&Frame::Ungate { epoch }, &mut chunks)
                }
                Transmit::Verify {
                    id,
                    offset,
                    after,
                    crcs,
                } => writer.push_frame(
                    &Frame::Verify {
                        id,
                        offset,
                        block: VERIFY_BLOCK,
                        after,
                        crcs,
                    },
                    &mut chunks,
                ),
            }
        }
        writer.send_chunks(&mut chunks).await?;
        counters
            .bytes_sent
            .fetch_add(writer.bytes_sent - counted, Ordering::Relaxed);
        counted = writer.bytes_sent;
    }
}

/// How long a pair whose DR stage log was full waits before it tries a catch-up again.
const STAGE_FULL_RETRY: Duration = Duration::from_secs(5);

/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Reconnect delays: doubling from 200 ms up to [`MAX_BACKOFF`], with ±25% jitter from a
/// seeded generator (the seed is the pair's, so two pairs do not retry in step).
struct Backoff {
    next: Duration,
    rng: u64,
}

impl Backoff {
    fn new(seed: u64) -> Self {
        Self {
            next: Duration::from_millis(200),
            rng: seed | 1,
        }
    }

    fn next(&mut self) -> Duration {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let jitter = 0.75 + (self.rng % 1000) as f64 / 2000.0;
        let wait = self.next.mul_f64(jitter);
        self.next = (self.next * 2).min(MAX_BACKOFF);
        wait
    }
}

/// Test-only faults, compiled in only with the `fault-injection` feature.
mod fault {
    use bytes::Bytes;

    /// Corrupts the payload of the N-th data extent sent (N from
    /// `BLOCKREP_FAULT_CORRUPT_EXTENT`), after its CRC was computed.
    pub struct CorruptExtent {
        /// Extents left before the one to corrupt; 0 when none is.
        #[cfg(feature = "fault-injection")]
        countdown: std::sync::atomic::AtomicU64,
    }

    impl CorruptExtent {
        #[cfg(feature = "fault-injection")]
        pub fn from_env() -> Self {
            let n = std::env::var("BLOCKREP_FAULT_CORRUPT_EXTENT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            Self {
                countdown: std::sync::atomic::AtomicU64::new(n),
            }
        }

        #[cfg(not(feature = "fault-injection"))]
        pub fn from_env() -> Self {
            Self {}
        }

        #[cfg(feature = "fault-injection")]
        pub fn apply(&self, bytes: Bytes) -> Bytes {
            use std::sync::atomic::Ordering;
            let n = self.countdown.load(Ordering::Relaxed);
            if n == 0 || bytes.is_empty() {
                return bytes;
            }
            self.countdown.store(n - 1, Ordering::Relaxed);
            if n > 1 {
                return bytes;
            }
            let mut bad = bytes.to_vec();
            bad[0] ^= 0xff;
            tracing::warn!("fault injection: corrupting an extent in flight");
            Bytes::from(bad)
        }

        #[cfg(not(feature = "fault-injection"))]
        pub fn apply(&self, bytes: Bytes) -> Bytes {
            bytes
        }
    }
}
