//! The DR half of a pair: accepts the production agent's replication stream
//! (`handshake`), hands its frames to the applier in order and sends the applier's answers
//! back (`stream`); here, the pair itself: its status, its group's commit, recovery and
//! shut-down.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use blockrep_core::replication::{Epoch, ReplicationStatus};
use blockrep_volume::Volume;
use blockrep_wire::Hello;

use crate::applier::{Applier, ApplierSetup, ApplyCounters, ApplyEvent};
use crate::dr_state::{self, DrState};
use crate::drill::{DrillRecord, DrillVolume};
use crate::endpoint::ReplicationStream;
use crate::membership::Membership;
use crate::stage_log::StageLog;
use crate::undo_journal::Points;
use blockrep_core::replication::undo::Retention;

mod handshake;
mod received;
mod stream;

/// Where the DR side is, for `pair show`.
#[derive(Clone, Debug)]
pub struct DrStatus {
    pub replication_status: ReplicationStatus,
    pub detail: String,
    pub since: SystemTime,
    pub state: DrState,
}

pub struct DrPair {
    membership: Membership,
    volume: Arc<Volume>,
    volume_dir: PathBuf,
    status: Mutex<DrStatus>,
    /// Streams accepted; a newer one replaces the older (which sees the new number and
    /// stops).
    session: AtomicU64,
    newest: tokio::sync::watch::Sender<u64>,
    /// Whether an applier runs (one at a time: they share the stage log), and whether the
    /// pair was shut down for good (no applier starts again).
    running: Mutex<Running>,
    applier_stopped: tokio::sync::Notify,
    /// Signalled with `applier_stopped`, for threads that wait without a runtime.
    stopped_cv: std::sync::Condvar,
    pub counters: Arc<ApplyCounters>,
    pub streams_refused: AtomicU64,
    /// The last stream was refused as a divergence (split brain, newer or unrelated data).
    diverged: AtomicBool,
    /// The last epoch the pair's consistency group committed (`u64::MAX`: no group); kept
    /// in `group.json` so a restart applies no further.
    allowed: Arc<AtomicU64>,
    /// Wakes the running applier when `allowed` grows.
    nudge: Mutex<Option<crate::applier::Nudge>>,
    /// How much the applier may hold in memory and on disk.
    limits: DrLimits,
    /// The volume's points in time (its undo journal) and the group's retention.
    points: Arc<Points>,
    /// The drills of the volume, by drill id.
    drills: Mutex<std::collections::BTreeMap<String, Arc<DrillVolume>>>,
    /// Why the pair cannot be served here (a state file that cannot be read, a unit that
    /// could not be applied again): every stream is refused with it, and nothing is
    /// applied, until the agent restarts with the cause fixed.
    fault: Mutex<Option<String>>,
    /// Held while a commit is recorded: one at a time, so `group.json` and `allowed` only
    /// move forward.
    recording_commit: Mutex<()>,
}

/// What `group.json` holds: the epoch the group committed.
#[derive(serde::Serialize, serde::Deserialize)]
struct GroupCommit {
    committed: Epoch,
}

/// Records, durably, that the pair's group committed `committed`: its DR side applies
/// nothing beyond it.
pub fn record_group_commit(volume_dir: &std::path::Path, committed: Epoch) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(&GroupCommit { committed }).expect("serialisable");
    blockrep_volume::write_file_durably(&volume_dir.join("group.json"), &bytes)
}

/// The last epoch the pair's group committed (`u64::MAX`: the pair is in no group). A
/// `group.json` that is there but cannot be read is an error: taking it for "no group"
/// would apply units the group never committed (rule 3).
fn load_allowed(volume_dir: &std::path::Path) -> Result<u64, String> {
    let path = volume_dir.join("group.json");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice::<GroupCommit>(&bytes)
            .map(|g| g.committed.0)
            .map_err(|e| format!("{} is unreadable: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(u64::MAX),
        Err(e) => Err(format!("{} is unreadable: {e}", path.display())),
    }
}

/// The DR side's bounds (rule 6), from the agent's `[replication]` configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrLimits {
    pub queue_bytes: u64,
    pub stage_log_max_bytes: u64,
}

impl DrLimits {
    pub fn of(config: &crate::production::ReplicationConfig, volume_size: u64) -> Self {
        Self {
            queue_bytes: config.apply_queue_bytes,
            stage_log_max_bytes: config.stage_log_cap(volume_size),
        }
    }
}

impl DrPair {
    pub fn new(
        membership: Membership,
        volume: Arc<Volume>,
        volume_dir: PathBuf,
        limits: DrLimits,
    ) -> Arc<Self> {
        let mut faults = Vec::new();
        let state = dr_state::load(&volume_dir.join("dr.json")).unwrap_or_else(|e| {
            faults.push(format!("the DR state is unreadable: {e}"));
            DrState::default()
        });
        // Nothing applies beyond what is applied while the group's commit is unknown.
        let allowed = load_allowed(&volume_dir).unwrap_or_else(|e| {
            faults.push(format!("the group's commit is unknown: {e}"));
            0
        });
        let allowed = Arc::new(AtomicU64::new(allowed));
        if let Ok(bytes) = std::fs::read(volume_dir.join(crate::pairs::ROLLBACK_FILE)) {
            faults.push(format!(
                "a rollback to a point ({}) is under way for a failover: the volume takes no replication until the failover completes it",
                String::from_utf8_lossy(&bytes)
            ));
        }
        let points = Points::load(&volume_dir).unwrap_or_else(|e| {
            faults.push(format!(
                "the group's retention of points is unreadable: {e}"
            ));
            Points::new(&volume_dir, Retention::default())
        });
        let points = Arc::new(points);
        points.set_applied(state.applied);
        // A drill that cannot be opened again is left out (its files kept), not the pair.
        let drills = DrillVolume::open_all(&volume, &volume_dir, &points)
            .unwrap_or_else(|e| {
                tracing::error!(pair = %membership.pair, error = %e, "the volume's drills cannot be opened again; they are left out");
                Vec::new()
            })
            .into_iter()
            .map(|d| (d.record().drill.clone(), d))
            .collect();
        let fault = (!faults.is_empty()).then(|| faults.join("; "));
        if let Some(fault) = &fault {
            tracing::error!(pair = %membership.pair, %fault, "the DR side cannot serve its pair");
        }
        Arc::new(Self {
            membership,
            volume,
            volume_dir,
            status: Mutex::new(DrStatus {
                replication_status: if fault.is_some() {
                    ReplicationStatus::Error
                } else {
                    ReplicationStatus::Inactive
                },
                detail: fault
                    .clone()
                    .unwrap_or_else(|| "waiting for the production agent".into()),
                since: SystemTime::now(),
                state,
            }),
            session: AtomicU64::new(0),
            newest: tokio::sync::watch::channel(0).0,
            running: Mutex::new(Running::default()),
            applier_stopped: tokio::sync::Notify::new(),
            stopped_cv: std::sync::Condvar::new(),
            counters: Arc::new(ApplyCounters::default()),
            streams_refused: AtomicU64::new(0),
            diverged: AtomicBool::new(false),
            allowed,
            nudge: Mutex::new(None),
            recording_commit: Mutex::new(()),
            fault: Mutex::new(fault),
            limits,
            points,
            drills: Mutex::new(drills),
        })
    }

    /// Why the pair cannot be served here, if it cannot.
    pub fn fault(&self) -> Option<String> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The pair cannot be served here, for `reason`: streams are refused with it.
    pub fn set_fault(&self, reason: String) {
        tracing::error!(pair = %self.membership.pair, %reason, "the DR side cannot serve its pair");
        self.set_status(ReplicationStatus::Error, reason.clone());
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    }

    /// Completes what a crash interrupted, before any stream: units sealed in the stage log
    /// above the applied epoch are applied (rule 4: the DR volume is a consistent image
    /// again before anyone reads or promotes it). Blocking.
    pub fn recover(&self) -> std::io::Result<()> {
        if let Some(fault) = self.fault() {
            return Err(std::io::Error::other(fault));
        }
        let log_path = self.volume_dir.join("stage-log");
        if !log_path.exists() {
            return Ok(());
        }
        let state_path = self.volume_dir.join("dr.json");
        let state = dr_state::load(&state_path)?;
        let recovered = StageLog::open(&log_path, state.applied)?;
        if recovered.seals.is_empty() {
            return Ok(());
        }
        tracing::info!(pair = %self.membership.pair, units = recovered.seals.len(), applied = %state.applied, "applying units a crash left sealed in the stage log");
        let (events, mut answers) = tokio::sync::mpsc::unbounded_channel();
        let setup = ApplierSetup {
            label: self.membership.pair.to_string()[..8].to_owned(),
            volume: Arc::clone(&self.volume),
            log: recovered.log,
            replay: recovered.seals,
            state,
            state_path: state_path.clone(),
            allowed: Arc::clone(&self.allowed),
            queue_bytes: self.limits.queue_bytes,
            stage_log_max_bytes: self.limits.stage_log_max_bytes,
            compact_after_bytes: crate::applier::COMPACT_BYTES,
            points: Arc::clone(&self.points),
        };
        // Stopping finishes the replay queued at start.
        Applier::start(setup, events, Arc::clone(&self.counters))?.stop();
        while let Ok(event) = answers.try_recv() {
            if let ApplyEvent::Failed(reason) = event {
                // The stage log stays as it is: the units are still there to apply.
                return Err(std::io::Error::other(format!(
                    "applying the units sealed in the stage log failed: {reason}"
                )));
            }
        }
        let state = dr_state::load(&state_path)?;
        self.status.lock().unwrap_or_else(|e| e.into_inner()).state = state;
        Ok(())
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Whether the pair applies only what its consistency group committed.
    pub fn grouped(&self) -> bool {
        self.allowed.load(Ordering::SeqCst) != u64::MAX
    }

    /// The pair's group committed `committed` (its units up to it may apply), or, with
    /// `None`, the pair left its group (every sealed unit applies). Recorded durably before
    /// the applier may act on it; a commit never goes back.
    pub fn set_group_commit(&self, committed: Option<Epoch>) -> std::io::Result<()> {
        let _one_at_a_time = self
            .recording_commit
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let path = self.volume_dir.join("group.json");
        let now = self.allowed.load(Ordering::SeqCst);
        let next = match committed {
            None => u64::MAX,
            Some(e) if now == u64::MAX => e.0,
            Some(e) => now.max(e.0),
        };
        if next == now {
            return Ok(());
        }
        match committed {
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            },
            Some(_) => record_group_commit(&self.volume_dir, Epoch(next))?,
        }
        self.allowed.store(next, Ordering::SeqCst);
        if let Some(nudge) = self
            .nudge
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            nudge.nudge();
        }
        Ok(())
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// The volume's points in time and the group's retention.
    pub fn points(&self) -> &Arc<Points> {
        &self.points
    }

    /// Makes a drill of the volume at `record.point` (the same again if it exists).
    pub fn create_drill(&self, record: DrillRecord) -> std::io::Result<Arc<DrillVolume>> {
        let mut drills = self.drills.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = drills.get(&record.drill) {
            if *d.record() == record {
                return Ok(Arc::clone(d));
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("drill {} exists with another point or name", record.drill),
            ));
        }
        let drill = DrillVolume::create(
            record,
            Arc::clone(&self.volume),
            &self.volume_dir,
            Arc::clone(&self.points),
        )?;
        drills.insert(drill.record().drill.clone(), Arc::clone(&drill));
        Ok(drill)
    }

    /// Deletes drill `id` of the volume (done if it is gone).
    pub fn delete_drill(&self, id: &str) -> std::io::Result<()> {
        let drill = self
            .drills
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        match drill {
            Some(d) => d.delete(&self.volume_dir),
            None => Ok(()),
        }
    }

    /// Ends every drill of the volume (it leaves the DR side), for `why`.
    pub fn end_drills(&self, why: &str) {
        let drills = std::mem::take(&mut *self.drills.lock().unwrap_or_else(|e| e.into_inner()));
        for drill in drills.values() {
            drill.end(why);
        }
    }

    pub fn drills(&self) -> Vec<Arc<DrillVolume>> {
        self.drills
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn status(&self) -> DrStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_status(&self, replication_status: ReplicationStatus, detail: impl Into<String>) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.replication_status = replication_status;
        status.detail = detail.into();
        status.since = SystemTime::now();
    }

    /// Serves one replication stream until it ends: the handshake (is it this pair's,
    /// may its data be taken, the applier started), then the stream.
    pub async fn serve(self: Arc<Self>, hello: Hello, stream: ReplicationStream) {
        let ReplicationStream {
            mut reader,
            mut writer,
        } = stream;
        if let Some(accepted) = self.handshake(&hello, &mut writer).await {
            self.stream(accepted, &mut reader, &mut writer).await;
        }
    }

    /// Ends the stream being served, if any (the volume leaves this side).
    pub fn close(&self) {
        self.newest.send_replace(u64::MAX);
    }

    /// The last stream was refused because the two sides diverged.
    pub fn needs_resolve(&self) -> bool {
        self.diverged.load(Ordering::SeqCst)
    }

    fn applied(&self, epoch: Epoch, cut_ms: u64) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.state.applied = epoch;
        status.state.applied_cut_ms = cut_ms;
        if status.state.sync_done_at.is_none_or(|at| at <= epoch) {
            status.state.consistent = true;
        }
        if status.state.consistent && status.replication_status == ReplicationStatus::Copying {
            status.replication_status = ReplicationStatus::Active;
            status.since = SystemTime::now();
        }
    }

    async fn stop_applier(&self, applier: Applier) {
        *self.nudge.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let _ = tokio::task::spawn_blocking(move || applier.stop()).await;
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .applier = false;
        self.applier_stopped.notify_waiters();
        self.stopped_cv.notify_all();
        // Pick up what the applier recorded.
        if let Ok(state) = dr_state::load(&self.volume_dir.join("dr.json")) {
            self.status.lock().unwrap_or_else(|e| e.into_inner()).state = state;
        }
    }

    fn applier_running(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .applier
    }

    /// Ends the stream being served and waits (blocking, up to `timeout`) until its
    /// applier has stopped; no applier starts again. The stage log and the DR state are
    /// then the caller's (a promotion).
    pub fn shut_down(&self, timeout: std::time::Duration) -> std::io::Result<()> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.shut_down = true;
        self.close();
        let (running, waited) = self
            .stopped_cv
            .wait_timeout_while(running, timeout, |r| r.applier)
            .unwrap_or_else(|e| e.into_inner());
        drop(running);
        if waited.timed_out() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the DR applier did not stop within {timeout:?}"),
            ));
        }
        Ok(())
    }

    /// The directory of the volume's state (`dr.json`, `stage-log`, `group.json`).
    pub fn volume_dir(&self) -> &std::path::Path {
        &self.volume_dir
    }

    /// The last commit its group sent (`None`: the pair applies every sealed unit).
    pub fn group_commit(&self) -> Option<Epoch> {
        match self.allowed.load(Ordering::SeqCst) {
            u64::MAX => None,
            e => Some(Epoch(e)),
        }
    }
}

/// Whether an applier runs, and whether one may start.
#[derive(Debug, Default)]
struct Running {
    applier: bool,
    shut_down: bool,
}

#[cfg(test)]
mod tests {
    use blockrep_core::ByteRange;
    use blockrep_core::replication::{PairId, ReplicationModel};
    use blockrep_volume::Backing;
    use bytes::Bytes;

    use super::*;
    use crate::membership::Side;

    const SIZE: u64 = 1 << 20;

    fn dr_pair(dir: &std::path::Path) -> Arc<DrPair> {
        let path = dir.join("dr.img");
        std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
        let backing = Backing::open(&path, blockrep_core::CacheMode::Writeback).unwrap();
        let volume = Arc::new(Volume::new("dr".into(), backing, None));
        let membership = Membership {
            pair: PairId::random(),
            side: Side::Dr,
            model: ReplicationModel::Async,
            local_volume: blockrep_core::VolumeId::random(),
            peer_volume: blockrep_core::VolumeId::random(),
            peer_node: "node-a".into(),
            peer_address: "127.0.0.1:1".parse().unwrap(),
            size: SIZE,
            full_sync_done: false,
            discard_peer: false,
            paused: false,
            grouped: false,
            group_epoch: Epoch::ZERO,
            catch_up_from: None,
            term: 0,
            fence: None,
            promotion: None,
            max_bytes_per_sec: None,
        };
        let limits = DrLimits::of(&crate::production::ReplicationConfig::default(), SIZE);
        DrPair::new(membership, volume, dir.to_owned(), limits)
    }

    #[test]
    fn a_unit_that_cannot_be_applied_again_fails_recovery_and_keeps_the_stage_log() {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("stage-log");
        {
            let crate::stage_log::Recovered { mut log, .. } =
                StageLog::open(&log_path, Epoch::ZERO).unwrap();
            log.append_write(
                Epoch(1),
                ByteRange::new(0, 4096),
                false,
                &Bytes::from(vec![7; 4096]),
            )
            .unwrap();
            // Past the end of the volume: applying it fails.
            log.append_write(
                Epoch(1),
                ByteRange::new(SIZE, 4096),
                false,
                &Bytes::from(vec![8; 4096]),
            )
            .unwrap();
            log.seal(Epoch(1), 10).unwrap();
        }
        let before = std::fs::read(&log_path).unwrap();
        let dr = dr_pair(dir.path());
        let err = dr.recover().unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        assert_eq!(
            std::fs::read(&log_path).unwrap(),
            before,
            "the stage log is kept"
        );
        assert_eq!(
            dr_state::load(&dir.path().join("dr.json")).unwrap().applied,
            Epoch::ZERO
        );
    }

    #[test]
    fn an_unreadable_group_commit_applies_nothing_further_and_refuses_streams() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("group.json"), b"{\"commit").unwrap();
        let dr = dr_pair(dir.path());
        let fault = dr.fault().expect("a fault");
        assert!(fault.contains("group.json"), "{fault}");
        assert_eq!(
            dr.group_commit(),
            Some(Epoch::ZERO),
            "nothing beyond what is applied"
        );
        assert_eq!(dr.status().replication_status, ReplicationStatus::Error);
        assert!(dr.recover().is_err());
        // A missing one means the pair is in no group.
        let dir = tempfile::tempdir().unwrap();
        let dr = dr_pair(dir.path());
        assert!(dr.fault().is_none());
        assert_eq!(dr.group_commit(), None);
    }
}
