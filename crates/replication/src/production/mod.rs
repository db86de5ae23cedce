//! The production half of a pair: [`ProductionPair`], the owner task that runs its sessions
//! as its state (the link's `PairState`) allows, its status, and the calls of the operator
//! and the coordinator (pause, fence, confirm, resolve, verify).
//!
//! - `session`: one session: the handshake and its plan, then the sender, receiver and
//!   epoch ticker until one ends; the backoff between sessions.
//! - `resync`: the resync reader (initial sync, catch-up);
//! - `extent_reads`: an initial sync's reads in flight, on the resync thread's io_uring.
//!
//! ```text
//!  connect ─► Hello ─► Welcome { applied, consistent } ─► decide:
//!     DR side never had a copy      ─► initial sync (every extent, direct) ─► SyncDone
//!     DR side consistent, bits set  ─► catch-up (dirty extents, staged as one unit)
//!     nothing to send               ─► live
//!  stream breaks ─► writes tracked by the bitmap ─► reconnect with backoff and jitter
//! ```

use crate::send_limit::SendLimit;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use blockrep_core::pair::state::PairState;
use blockrep_core::replication::group_cut::Live;
use blockrep_core::replication::{Epoch, ReplicationModel, ReplicationStatus};
use blockrep_volume::{ReplicaLink, Volume};

use crate::clock::Clock;
use crate::endpoint::ClusterEndpoint;
use crate::link::PairLink;
use crate::membership::{Fence, Membership, MembershipRecord};
use crate::verify::{VerifyRunner, VerifyStatus};

mod digests;
mod error;
mod extent_reads;
mod resync;
mod session;

use error::SessionError;
pub use resync::MIN_EXTENT;
use resync::{Resync, ResyncOutcome};
use session::Backoff;

/// What a demoted pair's status says.
const DEMOTED: &str =
    "demoted: its group failed over; the volume takes no writes until `group reprotect`";

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
    /// Production side: the most bytes per second the agent sends to its peers, every pair
    /// together (`None`: no limit); changed while it runs through [`crate::pairs::Pairs`].
    pub max_bytes_per_sec: Option<u64>,
    /// Production side: how write payloads go on the wire.
    pub compression: crate::compression::Compression,
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
            apply_queue_bytes: 16 << 20,
            stage_log_max_bytes: None,
            max_bytes_per_sec: None,
            compression: crate::compression::Compression::Off,
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
    /// The current or last online verify.
    verify: Mutex<Option<RunningVerify>>,
    /// Fenced for a reverse: the epoch writes were admitted in when the fence went up.
    drain_from: Mutex<Option<Epoch>>,
    /// Told when the pair trips (so the coordinator cuts) or its status changes: its agent
    /// reports at once.
    report_now: Arc<tokio::sync::Notify>,
    /// What the agent's pairs may send, together, and what this pair may.
    send_limits: SendLimits,
    /// When the sender last waited on a send limit.
    throttled_at: Mutex<Option<std::time::Instant>>,
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
    /// What the agent's pairs may send, together.
    pub send_limit: Arc<SendLimit>,
}

/// The limits a pair's sender goes by: the agent's, shared by all its pairs, and the pair's
/// own.
#[derive(Clone)]
pub(crate) struct SendLimits {
    pub agent: Arc<SendLimit>,
    pub pair: Arc<SendLimit>,
}

impl SendLimits {
    pub fn is_set(&self) -> bool {
        self.agent.is_set() || self.pair.is_set()
    }

    /// Waits until `bytes` more may be sent under both; `waiting` as in [`SendLimit::take`].
    pub async fn take(&self, bytes: u64, mut waiting: impl FnMut()) {
        self.pair.take(bytes, &mut waiting).await;
        self.agent.take(bytes, &mut waiting).await;
    }
}

/// How a production side comes up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// From its record: the agent restarted, or the side was given or switched to. A side of
    /// a consistency group waits for the coordinator to confirm it (the group may have failed
    /// over meanwhile) and holds its answers as for its last recorded cut.
    FromRecord,
    /// The coordinator's failover promoted it, under the term of that command: confirmed by
    /// it, and under no cut until the group's reprotect.
    Promoted,
}

impl Start {
    /// The pair's state when it comes up this way with `membership`.
    fn state(self, membership: &Membership) -> PairState {
        if membership.fence == Some(Fence::Demoted) {
            PairState::Demoted
        } else if self == Start::FromRecord && membership.role_at_start() != membership.role() {
            // Its group may have failed over while this agent was down: it waits for the
            // coordinator to confirm this side is still production.
            PairState::Unconfirmed
        } else if membership.paused {
            PairState::Paused
        } else {
            PairState::Connecting
        }
    }
}

impl ProductionPair {
    /// The pair's own send limit in bytes per second, if it has one.
    pub fn max_bytes_per_sec(&self) -> Option<u64> {
        self.send_limits.pair.bytes_per_sec()
    }

    /// Sets the pair's own send limit (`None`: none), recorded so a restarted agent starts
    /// with it; it holds from the next bytes sent. Nothing changes if it is out of range or
    /// cannot be recorded.
    pub fn set_max_bytes_per_sec(&self, limit: Option<u64>) -> Result<(), String> {
        if self.membership().max_bytes_per_sec == limit {
            return Ok(());
        }
        SendLimit::new(limit)?;
        self.membership
            .update(|m| m.max_bytes_per_sec = limit)
            .map_err(|e| format!("cannot record the pair's send limit: {e}"))?;
        self.send_limits.pair.set(limit)
    }

    /// Whether the sender waited on a send limit in the last `span`.
    fn throttled_within(&self, span: Duration) -> bool {
        self.throttled_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < span)
    }

    /// Takes up the production side of a pair: installs the link in the volume's write gate
    /// and starts connecting to the DR agent.
    pub fn start(
        membership: Membership,
        volume: Arc<Volume>,
        volume_dir: PathBuf,
        agent: AgentContext,
        start: Start,
    ) -> Result<Arc<Self>, String> {
        let AgentContext {
            endpoint,
            node,
            config,
            report_now,
            clock,
            send_limit,
        } = agent;
        // Checked before anything is installed: a limit out of range leaves the volume as it was.
        let pair_limit = Arc::new(SendLimit::new(membership.max_bytes_per_sec)?);
        let tracker = volume.tracker().cloned().ok_or_else(|| {
            "replication needs dirty tracking (bitmap.dirty_tracking = true)".to_owned()
        })?;
        let state = start.state(&membership);
        let link = Arc::new(PairLink::new(
            membership.model,
            tracker,
            config.journal_bytes,
            Epoch::ZERO,
            state,
            clock,
        ));
        link.set_grouped(membership.grouped);
        if membership.grouped && start == Start::Promoted {
            link.promoted_in_group(membership.group_epoch);
        } else if membership.grouped {
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
        let drain_from = (membership.fence == Some(Fence::Draining)).then(|| link.current_epoch());
        let send_limits = SendLimits {
            agent: send_limit,
            pair: pair_limit,
        };
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
            verify: Mutex::new(None),
            drain_from: Mutex::new(drain_from),
            report_now,
            send_limits,
            throttled_at: Mutex::new(None),
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
    /// connection ends. Answers its group held are given if the pair is deleted
    /// (`fail: None`), else failed with that errno (it switches sides, or the agent stops:
    /// its DR side is still the group's image).
    pub fn stop(&self, fail: Option<i32>) {
        self.volume.gate().set_link(None);
        self.link.stop(fail);
        self.stop_verify();
    }

    fn stop_verify(&self) {
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
        self.link.state() == PairState::Stopped
    }

    /// The pair's owner: waits while the pair's state has no session, runs one session
    /// at a time while it is connecting, and waits between attempts with backoff.
    async fn run(self: Arc<Self>) {
        let seed = self.membership().pair.as_bytes()[0] as u64;
        let mut backoff = Backoff::new(seed);
        let mut states = self.link.states();
        loop {
            let state = *states.borrow_and_update();
            match state {
                PairState::Stopped => return,
                PairState::Demoted => {
                    self.set_status(ReplicationStatus::Inactive, DEMOTED);
                    return;
                }
                PairState::Unconfirmed | PairState::Paused | PairState::Diverged => {
                    match state {
                        PairState::Unconfirmed => self.set_status(
                            ReplicationStatus::Inactive,
                            "restarted: waiting for the coordinator to confirm this side is still production (its group may have failed over)",
                        ),
                        PairState::Paused => {
                            self.set_status(
                                ReplicationStatus::ActiveStopped,
                                "stopped (group stop, or a failover): writes are tracked in the bitmap until `group sync` or `group reprotect`",
                            );
                            backoff = Backoff::new(seed);
                        }
                        // Its status says why (the DR side's refusal).
                        _ => {}
                    }
                    if states.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                PairState::Resyncing | PairState::Live => {
                    // No session runs, so no stream is up: the machine hears so.
                    self.link.disconnected();
                    continue;
                }
                PairState::Connecting => {}
            }
            // An outcome left by a resync of an earlier session is not this one's.
            *self.resync_done.lock().unwrap_or_else(|e| e.into_inner()) = None;
            let mut accepted = false;
            let result = self.session(&mut accepted).await;
            self.link.disconnected();
            if self.link.trip_wanted() && !self.stopped() {
                tracing::warn!(pair = %self.membership().pair, "the link is down: its writes' answers are held until the group trips");
                self.report_now.notify_one();
            }
            *self.resync.lock().unwrap_or_else(|e| e.into_inner()) = None;
            if accepted {
                backoff = Backoff::new(seed);
            }
            if !self.link.state().in_session() {
                // Paused, demoted or stopped meanwhile: the top of the loop says so.
                continue;
            }
            match result {
                // Resolved while this handshake ran: the next Hello asks the DR side to take
                // production's copy.
                Err(SessionError::Diverged(reason)) if self.membership().discard_peer => {
                    tracing::info!(pair = %self.membership().pair, %reason, "diverged, but resolved meanwhile: connecting again");
                }
                Err(SessionError::Diverged(reason)) => {
                    tracing::error!(pair = %self.membership().pair, %reason, "the pair's sides diverged; waiting for `pair resolve`");
                    if let Err(e) = self.link.diverged() {
                        tracing::error!(pair = %self.membership().pair, error = %e, "the pair's state refused the divergence");
                    }
                    self.set_status(ReplicationStatus::Error, reason);
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
                Ok(()) => {}
            }
            let wait = backoff.next();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = states.wait_for(|s| !s.in_session()) => {}
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
        self.link.state() == PairState::Diverged
    }

    /// The operator keeps this side: the next connection copies the whole volume over the
    /// DR side's changes.
    pub fn resolve_keeping_production(&self) -> std::io::Result<()> {
        let membership = self.membership.update(|m| m.discard_peer = true)?;
        self.set_status(
            ReplicationStatus::Copying,
            "resolved: copying production over the DR side's changes",
        );
        self.link
            .resolved(membership.paused)
            .map_err(std::io::Error::other)?;
        self.keep_recorded_pause();
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
        self.link.pause(paused);
        Ok(())
    }

    /// The pair's volumes grew: recorded, and the next `Hello` says so.
    pub fn set_size(&self, size: u64) -> std::io::Result<()> {
        self.membership.update(|m| m.size = size).map(drop)
    }

    /// The coordinator confirmed that this side is still production: the volume takes
    /// writes again (unless fenced) and the pair starts replicating.
    pub fn confirm(&self) {
        if self.confirmed() {
            return;
        }
        let membership = self.membership();
        let role = membership.role();
        self.volume.gate().restore_role(role);
        tracing::info!(pair = %membership.pair, %role, "the coordinator confirmed this side's role");
        if let Err(e) = self.link.confirm(membership.paused) {
            tracing::error!(pair = %membership.pair, error = %e, "the pair's state refused the confirmation");
        }
        self.keep_recorded_pause();
    }

    /// A pause recorded while the machine could not take it (unconfirmed, diverged) and
    /// read before it was: the machine takes it now.
    fn keep_recorded_pause(&self) {
        if self.membership().paused {
            self.link.pause(true);
        }
    }

    /// Whether the coordinator has confirmed this side since the agent started.
    pub fn confirmed(&self) -> bool {
        self.link.state() != PairState::Unconfirmed
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
            self.set_status(ReplicationStatus::Inactive, DEMOTED);
            self.volume.gate().set_link(None);
            // Writes a trip held were never acknowledged, and the group failed over without
            // them: they fail, and their connections can finish.
            self.link.demote(libc::EIO);
            self.stop_verify();
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
}

/// A verify thread and its handles.
struct RunningVerify {
    status: Arc<Mutex<VerifyStatus>>,
    stop: Arc<AtomicBool>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::tests::membership;

    /// A grouped production side that comes back from its record waits for the coordinator
    /// (its group may have failed over meanwhile); the same side just promoted by the
    /// coordinator's failover does not, and stays paused until its reprotect.
    #[test]
    fn a_grouped_side_waits_for_confirmation_after_a_restart_and_not_after_its_promotion() {
        let mut promoted = membership();
        promoted.paused = true;
        assert_eq!(Start::FromRecord.state(&promoted), PairState::Unconfirmed);
        assert_eq!(Start::Promoted.state(&promoted), PairState::Paused);
        let mut lone = promoted.clone();
        lone.grouped = false;
        assert_eq!(Start::FromRecord.state(&lone), PairState::Paused);
        let mut demoted = promoted;
        demoted.fence = Some(Fence::Demoted);
        assert_eq!(Start::FromRecord.state(&demoted), PairState::Demoted);
        assert_eq!(Start::Promoted.state(&demoted), PairState::Demoted);
    }
}
