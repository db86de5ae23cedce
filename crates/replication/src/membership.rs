//! A volume's part in a pair, recorded in its state directory (`pair.json`) so the agent
//! takes it up again after a restart without asking anyone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use blockrep_core::VolumeId;
use blockrep_core::replication::{Epoch, PairId, ReplicationModel, VolumeRole};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Production,
    Dr,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Production => "production",
            Side::Dr => "dr",
        }
    }
}

/// Why a production volume refuses the application's writes (its role is `Fenced`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fence {
    /// A planned reverse drains it: new writes are refused; what was admitted is still
    /// replicated, until the sides swap.
    Draining,
    /// Its group failed over: production is on the other side now. It takes no writes
    /// until reprotect makes it the DR side.
    Demoted,
}

impl Fence {
    pub fn as_str(self) -> &'static str {
        match self {
            Fence::Draining => "draining",
            Fence::Demoted => "demoted",
        }
    }
}

/// Where a promotion left the volume: its consistent point, and what it dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    /// The last unit applied (the group's commit, or earlier if nothing came after).
    pub epoch: Epoch,
    /// When production cut that unit (ms since the Unix epoch; 0 if unknown).
    pub cut_ms: u64,
    /// Bytes of staged writes beyond the commit, dropped and marked dirty.
    pub dropped_bytes: u64,
    /// Bytes written back from the undo journal to reach a retained point (marked dirty).
    #[serde(default)]
    pub rolled_back_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub pair: PairId,
    pub side: Side,
    pub model: ReplicationModel,
    pub local_volume: VolumeId,
    pub peer_volume: VolumeId,
    pub peer_node: String,
    pub peer_address: SocketAddr,
    pub size: u64,
    /// Production: the DR side received a whole copy once; later connections catch up
    /// from the bitmap instead of copying everything again.
    #[serde(default)]
    pub full_sync_done: bool,
    /// Production: the operator resolved a divergence keeping this side; the next
    /// connection copies the whole volume over the DR side's changes.
    #[serde(default)]
    pub discard_peer: bool,
    /// Production: the operator stopped replication (`group stop`); writes are tracked in
    /// the bitmap until it is resumed.
    #[serde(default)]
    pub paused: bool,
    /// Production: the pair's epochs are cut by its consistency group; after a restart it
    /// still never cuts on its own (a local cut would let the DR side apply writes the
    /// group did not commit).
    #[serde(default)]
    pub grouped: bool,
    /// Production: the last group epoch the pair switched to. A restarted agent admits
    /// writes in it or later, never in an earlier one (its next cut may be far off).
    #[serde(default)]
    pub group_epoch: Epoch,
    /// Production: the catch-up units the DR side may not have applied began after this
    /// epoch (recorded before a unit's end can be sealed; see
    /// `blockrep_core::pair::atomic_spans::unit_to_record`). A restarted agent reports a span
    /// from it, open, until it next goes live or ends a catch-up: a unit's end may have been
    /// staged before any cut ack told the group where the unit ended, and the group must not
    /// commit inside it. Never cleared: after a restart the group's commit waits for this
    /// pair to go live.
    #[serde(default)]
    pub catch_up_from: Option<Epoch>,
    /// The coordinator's term when this side took its role: a role command from an older
    /// term is refused (rule 5).
    #[serde(default)]
    pub term: u64,
    /// Production: the volume refuses writes, and why.
    #[serde(default)]
    pub fence: Option<Fence>,
    /// Production: this side became production by a failover, at this point.
    #[serde(default)]
    pub promotion: Option<Promotion>,
    /// The pair's own send limit (`pair update --max-rate`), beside the agent's; the
    /// coordinator's record is the source, this the copy a restarted agent starts with.
    #[serde(default)]
    pub max_bytes_per_sec: Option<u64>,
}

impl Membership {
    pub fn role(&self) -> VolumeRole {
        match self.side {
            Side::Production if self.fence.is_some() => VolumeRole::Fenced { pair: self.pair },
            Side::Production => VolumeRole::Primary { pair: self.pair },
            Side::Dr => VolumeRole::Secondary { pair: self.pair },
        }
    }

    /// The role to take up after a restart. A production side of a consistency group starts
    /// fenced: its group may have failed over while it was down, so it takes writes only once
    /// the coordinator confirms it is still production.
    pub fn role_at_start(&self) -> VolumeRole {
        match self.side {
            Side::Production if self.grouped => VolumeRole::Fenced { pair: self.pair },
            _ => self.role(),
        }
    }

    pub fn path(volume_dir: &Path) -> PathBuf {
        volume_dir.join("pair.json")
    }

    pub fn load(volume_dir: &Path) -> std::io::Result<Option<Self>> {
        let path = Self::path(volume_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, volume_dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(volume_dir)?;
        let bytes = serde_json::to_vec_pretty(self).expect("serialisable");
        blockrep_volume::write_file_durably(&Self::path(volume_dir), &bytes)
    }

    pub fn remove(volume_dir: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(Self::path(volume_dir)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// A side's membership as its runtime holds it: every change is saved before anyone sees
/// it, one change at a time, so the file always holds the latest record and a change that
/// cannot be saved is not made. Readers never wait for a save.
#[derive(Debug)]
pub struct MembershipRecord {
    volume_dir: PathBuf,
    current: Mutex<Membership>,
    /// Held through a change and its save: changes one at a time.
    changing: Mutex<()>,
}

impl MembershipRecord {
    pub fn new(volume_dir: &Path, membership: Membership) -> Self {
        Self {
            volume_dir: volume_dir.to_owned(),
            current: Mutex::new(membership),
            changing: Mutex::new(()),
        }
    }

    pub fn get(&self) -> Membership {
        self.lock().clone()
    }

    /// Applies `change` to the record and saves it, if it changed anything; on an error the
    /// record stays as it was. Returns the record after the change.
    pub fn update(&self, change: impl FnOnce(&mut Membership)) -> std::io::Result<Membership> {
        let _one_at_a_time = self.changing.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = self.get();
        change(&mut changed);
        if changed != self.get() {
            changed.save(&self.volume_dir)?;
            *self.lock() = changed.clone();
        }
        Ok(changed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A grouped async production side's membership.
    pub(crate) fn membership() -> Membership {
        Membership {
            pair: "6a1c6f0e-52d4-4c55-9b55-1f0d9a1b2c3d".parse().unwrap(),
            side: Side::Production,
            model: ReplicationModel::Async,
            local_volume: "0f3e4b6a-7d1c-4e2a-8b9c-0d1e2f3a4b5c".parse().unwrap(),
            peer_volume: "1a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d".parse().unwrap(),
            peer_node: "node-b".into(),
            peer_address: "127.0.0.1:7000".parse().unwrap(),
            size: 1 << 20,
            full_sync_done: false,
            discard_peer: false,
            paused: false,
            grouped: true,
            group_epoch: Epoch::ZERO,
            catch_up_from: None,
            term: 1,
            fence: None,
            promotion: None,
            max_bytes_per_sec: None,
        }
    }

    #[test]
    fn changes_from_many_threads_all_reach_the_file_and_the_last_wins() {
        let dir = tempfile::tempdir().unwrap();
        let record = std::sync::Arc::new(MembershipRecord::new(dir.path(), membership()));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let record = std::sync::Arc::clone(&record);
                std::thread::spawn(move || {
                    for i in 0..20 {
                        record
                            .update(|m| m.group_epoch = m.group_epoch.max(Epoch(t * 100 + i)))
                            .expect("every save succeeds");
                        if t == 0 && i == 10 {
                            record.update(|m| m.fence = Some(Fence::Draining)).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let saved = Membership::load(dir.path()).unwrap().unwrap();
        assert_eq!(saved, record.get());
        assert_eq!(saved.group_epoch, Epoch(719));
        assert_eq!(
            saved.fence,
            Some(Fence::Draining),
            "no later save lost the fence"
        );
    }

    #[test]
    fn a_change_that_cannot_be_saved_is_not_made() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, b"").unwrap();
        let record = MembershipRecord::new(&not_a_dir, membership());
        assert!(record.update(|m| m.fence = Some(Fence::Draining)).is_err());
        assert_eq!(record.get().fence, None);
    }
}
