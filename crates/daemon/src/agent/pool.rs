//! The agent's storage pool (`[pool]`): volumes made on demand as files in one directory,
//! preallocated with `fallocate`, the sum of their sizes within the pool's capacity.
//!
//! A volume is made under the agent's change lock, so two creates cannot both take the last
//! room. Its file is made as `NAME.img.partial` and renamed to `NAME.img` once allocated
//! (an existing file is never reused), then registered; it is removed again if anything
//! after fails. Deleting a pool volume unregisters it, then removes its file. At start a
//! `.partial` file (a create a crash stopped) is removed; an `.img` file no volume has (a
//! crash between a rename and the registry, or between the registry and a removal) is
//! counted as used and left to the operator, never deleted: a lost registry must not
//! cost the volumes' data.

use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::Ordering;

use blockrep_api::model::ProjectId;
use blockrep_core::{CacheMode, VolumeName};

use super::*;
use crate::config::PoolConfig;

/// What the pool holds now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
}

impl Agent {
    fn pool_config(&self) -> Result<&PoolConfig, ApiError> {
        self.config.pool.as_ref().ok_or_else(|| {
            ApiError::FailedPrecondition(format!(
                "node {} has no storage pool: add a [pool] section (path, capacity_bytes) to its configuration",
                self.config.node_name
            ))
        })
    }

    /// The pool's capacity and what its volumes take; `None` without a pool.
    pub fn pool_usage(&self) -> Option<PoolUsage> {
        let pool = self.config.pool.as_ref()?;
        Some(PoolUsage {
            capacity_bytes: pool.capacity_bytes,
            used_bytes: self.pool_used(),
        })
    }

    fn pool_used(&self) -> u64 {
        let registered: u64 = self
            .lock()
            .values()
            .filter(|e| e.record.pool)
            .map(|e| e.record.size)
            .sum();
        registered + self.pool_stray_bytes.load(Ordering::Relaxed)
    }

    /// Whether growing pool volume `id` to `size` bytes fits in the pool (other volumes
    /// grow as their backing allows).
    pub(super) fn check_pool_room(&self, id: VolumeId, size: u64) -> Result<(), ApiError> {
        let (Some(pool), Some(record)) = (
            self.config.pool.as_ref(),
            self.lock().get(&id).map(|e| e.record.clone()),
        ) else {
            return Ok(());
        };
        if !record.pool || size <= record.size {
            return Ok(());
        }
        let used = self.pool_used();
        let after = (used - record.size).checked_add(size);
        if after.is_none_or(|after| after > pool.capacity_bytes) {
            return Err(ApiError::FailedPrecondition(format!(
                "the pool of node {} has {} free of {}; volume {} cannot grow by {}",
                self.config.node_name,
                blockrep_api::human_bytes(pool.capacity_bytes.saturating_sub(used)),
                blockrep_api::human_bytes(pool.capacity_bytes),
                record.name,
                blockrep_api::human_bytes(size - record.size)
            )));
        }
        Ok(())
    }

    /// Makes a volume of `size` bytes in the pool, named `name`, of `project`. `again`:
    /// the caller may be asking again (the coordinator, which had no answer): a pool volume
    /// of that name, size and project is the answer then, not a refusal.
    pub fn create_volume(
        self: &Arc<Self>,
        name: VolumeName,
        size: u64,
        project: ProjectId,
        again: bool,
    ) -> Result<VolumeView, ApiError> {
        let pool = self.pool_config()?.clone();
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(ApiError::InvalidArgument(format!(
                "size {size} must be a positive multiple of 4096 bytes"
            )));
        }
        let _changing = self.lock_changes();
        let existing = self
            .lock()
            .values()
            .find(|e| e.record.name == name)
            .map(|e| {
                (
                    e.record.id,
                    e.record.pool && e.record.size == size && e.record.project == project.as_str(),
                )
            });
        match existing {
            Some((id, true)) if again => return self.get(&id.to_string()),
            Some((id, _)) => {
                return Err(ApiError::AlreadyExists(format!(
                    "a volume named {name} already exists (id {id})"
                )));
            }
            None => {}
        }
        let used = self.pool_used();
        let free = pool.capacity_bytes.saturating_sub(used);
        if size > free {
            return Err(ApiError::FailedPrecondition(format!(
                "the pool of node {} has {} free of {}; a volume of {} does not fit",
                self.config.node_name,
                blockrep_api::human_bytes(free),
                blockrep_api::human_bytes(pool.capacity_bytes),
                blockrep_api::human_bytes(size)
            )));
        }
        std::fs::create_dir_all(&pool.path).map_err(|e| {
            ApiError::Internal(format!("pool directory {}: {e}", pool.path.display()))
        })?;
        let path = pool.path.join(format!("{name}.img"));
        make_file(&path, size)?;
        let added = self.add_volume_locked(
            AddVolume {
                name,
                path: path.clone(),
                cache: CacheMode::Direct,
                project,
            },
            true,
        );
        if added.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        let view = added?;
        tracing::info!(volume = %view.record.name, size, pool = %pool.path.display(), "pool volume created");
        Ok(view)
    }

    /// Looks through the pool's directory at start, before the agent takes calls: removes
    /// the `.partial` files of creates a crash stopped, and counts the `.img` files no
    /// volume has (by real path: the directory may be named through a symlink) as used,
    /// with a warning naming each, for the operator to add or remove.
    pub(super) fn tidy_pool(&self) {
        let Some(pool) = self.config.pool.as_ref() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(&pool.path) else {
            return;
        };
        let registered: Vec<PathBuf> = self
            .lock()
            .values()
            .filter_map(|e| std::fs::canonicalize(&e.record.path).ok())
            .collect();
        let mut stray = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let extension = path.extension().and_then(|x| x.to_str());
            if extension == Some("partial") {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::warn!(path = %path.display(), "removed the file of a pool create a crash stopped")
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove the file of a pool create a crash stopped")
                    }
                }
                continue;
            }
            let Ok(real) = std::fs::canonicalize(&path) else {
                continue;
            };
            if extension == Some("img") && !registered.contains(&real) {
                let size = entry.metadata().map_or(0, |m| m.len());
                stray += size;
                tracing::warn!(path = %path.display(), size, "a file in the pool that no volume has: counted as used; add it as a volume or remove it");
            }
        }
        self.pool_stray_bytes.store(stray, Ordering::Relaxed);
    }

    /// Unregisters a volume the pool made and removes its file (refused for any other
    /// volume, and while it is in a pair or has clients).
    pub fn delete_volume(&self, reference: &str) -> Result<VolumeId, ApiError> {
        let _changing = self.lock_changes();
        let record = self.remove_volume_locked(reference, true)?;
        if let Err(e) = std::fs::remove_file(&record.path) {
            // Unregistered already: the file is left over, not a volume.
            tracing::warn!(path = %record.path.display(), error = %e, "cannot remove a deleted pool volume's file");
        }
        tracing::info!(volume = %record.name, id = %record.id, "pool volume deleted");
        Ok(record.id)
    }
}

/// A new file of `size` bytes with its blocks allocated, made as `path.partial` and renamed
/// to `path` once allocated; nothing is left if that fails.
fn make_file(path: &Path, size: u64) -> Result<(), ApiError> {
    let exists = |path: &Path| {
        ApiError::AlreadyExists(format!(
            "{} exists already: the pool never reuses a file",
            path.display()
        ))
    };
    if path.exists() {
        return Err(exists(path));
    }
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => exists(&partial),
            _ => ApiError::Internal(format!("cannot create {}: {e}", partial.display())),
        })?;
    let allocated = nix::fcntl::fallocate(
        &file,
        nix::fcntl::FallocateFlags::empty(),
        0,
        size as libc::off_t,
    )
    .map_err(|e| {
        ApiError::FailedPrecondition(format!(
            "cannot allocate {} for {}: {e}",
            blockrep_api::human_bytes(size),
            path.display()
        ))
    })
    .and_then(|()| {
        std::fs::rename(&partial, path)
            .map_err(|e| ApiError::Internal(format!("cannot name {}: {e}", path.display())))
    });
    if allocated.is_err() {
        drop(file);
        let _ = std::fs::remove_file(&partial);
    }
    allocated
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const MIB: u64 = 1 << 20;

    /// An agent in `dir` with a pool of `capacity` bytes at `dir/pool`.
    fn agent_with_pool(dir: &Path, capacity: u64, runtime: &tokio::runtime::Runtime) -> Arc<Agent> {
        let text = format!(
            "node_name = \"host-a\"\navailability_zone = \"az1\"\nstate_dir = \"{0}/state\"\nruntime_dir = \"{0}/run\"\n[pool]\npath = \"{0}/pool\"\ncapacity_bytes = {capacity}\n",
            dir.display()
        );
        let config = Config::parse(&text, Path::new("test.toml")).unwrap();
        for d in [&config.state_dir, &config.runtime_dir.join("nbd")] {
            std::fs::create_dir_all(d).unwrap();
        }
        Agent::start(config, runtime.handle().clone()).unwrap()
    }

    fn name(n: &str) -> VolumeName {
        VolumeName::try_from(n.to_owned()).unwrap()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn pool_volumes_are_preallocated_within_the_capacity_and_deleted_with_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = runtime();
        let agent = agent_with_pool(dir.path(), 3 * MIB, &runtime);
        let project: ProjectId = "tenant-a".parse().unwrap();
        let a = agent
            .create_volume(name("a"), 2 * MIB, project.clone(), false)
            .unwrap();
        assert!(a.record.pool);
        assert_eq!(a.record.project, "tenant-a");
        let file = dir.path().join("pool/a.img");
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.len(), 2 * MIB);
        assert!(meta.blocks() * 512 >= 2 * MIB, "its blocks are allocated");
        assert_eq!(
            agent.pool_usage(),
            Some(PoolUsage {
                capacity_bytes: 3 * MIB,
                used_bytes: 2 * MIB
            })
        );

        // No room, a name taken, a bad size: refused, and nothing is left behind.
        let refused = agent
            .create_volume(name("b"), 2 * MIB, project.clone(), false)
            .err()
            .expect("refused");
        assert_eq!(refused.code(), 409, "{refused}");
        assert!(refused.to_string().contains("does not fit"), "{refused}");
        let taken = agent
            .create_volume(name("a"), MIB, project.clone(), false)
            .err()
            .expect("refused");
        assert_eq!(taken.code(), 409, "{taken}");
        let odd = agent
            .create_volume(name("c"), 1000, project.clone(), false)
            .err()
            .expect("refused");
        assert_eq!(odd.code(), 400, "{odd}");
        let files: Vec<_> = std::fs::read_dir(dir.path().join("pool"))
            .unwrap()
            .collect();
        assert_eq!(files.len(), 1, "only a.img");
        // Growing past the pool is refused too.
        let grow = agent.extend_volume("a", 4 * MIB).unwrap_err();
        assert!(grow.to_string().contains("cannot grow"), "{grow}");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 2 * MIB);

        // A volume the pool did not make is not deleted; a pool volume is, with its file.
        let outside = dir.path().join("outside.img");
        std::fs::File::create(&outside)
            .unwrap()
            .set_len(MIB)
            .unwrap();
        agent
            .add_volume(AddVolume {
                name: name("outside"),
                path: outside.clone(),
                cache: CacheMode::Writeback,
                project: Default::default(),
            })
            .unwrap();
        let kept = agent.delete_volume("outside").unwrap_err();
        assert_eq!(kept.code(), 409, "{kept}");
        assert!(outside.exists());
        agent.delete_volume("a").unwrap();
        assert!(!file.exists());
        assert_eq!(agent.pool_usage().unwrap().used_bytes, 0);
        agent.shut_down();
    }

    #[test]
    fn an_agent_without_a_pool_refuses_to_make_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = runtime();
        let text = format!(
            "node_name = \"host-a\"\navailability_zone = \"az1\"\nstate_dir = \"{0}/state\"\nruntime_dir = \"{0}/run\"\n",
            dir.path().display()
        );
        let config = Config::parse(&text, Path::new("test.toml")).unwrap();
        for d in [&config.state_dir, &config.runtime_dir.join("nbd")] {
            std::fs::create_dir_all(d).unwrap();
        }
        let agent = Agent::start(config, runtime.handle().clone()).unwrap();
        let refused = agent
            .create_volume(name("a"), MIB, Default::default(), false)
            .err()
            .expect("refused");
        assert!(refused.to_string().contains("no storage pool"), "{refused}");
        assert_eq!(agent.pool_usage(), None);
        agent.shut_down();
    }

    /// The coordinator asking again gets the volume made the first time; at the next start
    /// a create a crash stopped leaves nothing, and a file no volume has is counted, not
    /// deleted.
    #[test]
    fn a_create_asked_again_answers_the_first_and_stray_files_go_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = runtime();
        let agent = agent_with_pool(dir.path(), 8 * MIB, &runtime);
        let project: ProjectId = "tenant-a".parse().unwrap();
        let first = agent
            .create_volume(name("dr-1"), MIB, project.clone(), true)
            .unwrap();
        let again = agent
            .create_volume(name("dr-1"), MIB, project.clone(), true)
            .unwrap();
        assert_eq!(first.record.id, again.record.id);
        assert_eq!(agent.pool_usage().unwrap().used_bytes, MIB);
        let other = agent
            .create_volume(name("dr-1"), 2 * MIB, project, true)
            .err()
            .expect("another size is another volume");
        assert_eq!(other.code(), 409, "{other}");
        agent.shut_down();
        drop(agent);

        let partial = dir.path().join("pool/half-made.img.partial");
        std::fs::write(&partial, b"x").unwrap();
        let stray = dir.path().join("pool/unregistered.img");
        std::fs::File::create(&stray)
            .unwrap()
            .set_len(2 * MIB)
            .unwrap();
        let kept = dir.path().join("pool/notes.txt");
        std::fs::write(&kept, b"not the pool's").unwrap();
        let agent = agent_with_pool(dir.path(), 8 * MIB, &runtime);
        assert!(!partial.exists(), "a create a crash stopped leaves nothing");
        assert!(stray.exists(), "a file no volume has is never deleted");
        assert!(kept.exists());
        assert!(dir.path().join("pool/dr-1.img").exists());
        assert_eq!(
            agent.pool_usage().unwrap().used_bytes,
            3 * MIB,
            "the stray file counts as used"
        );
        agent.shut_down();
    }

    /// A pool directory named through a symlink (or any other non-canonical path) keeps
    /// its volumes' files at start: a file is stray only if no volume has it, by its real
    /// path.
    #[test]
    fn a_pool_named_through_a_symlink_keeps_its_volumes_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = runtime();
        std::fs::create_dir(dir.path().join("real-pool")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real-pool"), dir.path().join("pool")).unwrap();
        let agent = agent_with_pool(dir.path(), 8 * MIB, &runtime);
        agent
            .create_volume(name("kept"), MIB, Default::default(), false)
            .unwrap();
        agent.shut_down();
        drop(agent);
        let agent = agent_with_pool(dir.path(), 8 * MIB, &runtime);
        assert!(
            dir.path().join("real-pool/kept.img").exists(),
            "the volume's file stays"
        );
        assert!(agent.get("kept").unwrap().online.is_some());
        agent.shut_down();
    }
}
