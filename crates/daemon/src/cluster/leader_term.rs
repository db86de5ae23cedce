//! The highest coordinator term this agent has seen, kept in the state directory: the agent
//! refuses the commands of an older term, so a deposed coordinator that wakes from a pause
//! changes nothing here (docs/HA-COORDINATOR.md, "Fencing").
//!
//! A command of the current term runs while holding the term shared; taking a newer term
//! waits for those to end. So a command an older leader sent either ran wholly before this
//! agent took the newer term, or is refused: it never runs among the new leader's commands.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use blockrep_api::ApiError;

const FILE: &str = "leader-term";

pub struct LeaderTerm {
    path: PathBuf,
    highest: RwLock<u64>,
    /// The same, for readers that must not wait behind a newer term being taken (metrics,
    /// reports).
    seen: AtomicU64,
}

/// The largest term there is: etcd's revisions are signed 64-bit.
const MAX_TERM: u64 = i64::MAX as u64;

impl LeaderTerm {
    /// Reads the term kept in `state_dir` (0 if none was ever taken).
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join(FILE);
        let highest = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().map_err(|e| {
                anyhow::anyhow!(
                    "{} holds {:?}, not a coordinator term: {e}",
                    path.display(),
                    text.trim()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => anyhow::bail!("read {}: {e}", path.display()),
        };
        Ok(Self {
            path,
            highest: RwLock::new(highest),
            seen: AtomicU64::new(highest),
        })
    }

    pub fn highest(&self) -> u64 {
        self.seen.load(Ordering::SeqCst)
    }

    /// Admits a command of `term`: refused if older than the highest seen; a newer term is
    /// kept (durably) first. The guard holds the term while the command runs.
    pub fn admit(&self, term: u64, what: &str) -> Result<RwLockReadGuard<'_, u64>, ApiError> {
        if term > MAX_TERM {
            return Err(ApiError::InvalidArgument(format!(
                "{what} of coordinator term {term} refused: no coordinator has a term above {MAX_TERM}"
            )));
        }
        loop {
            {
                let highest = self.highest.read().unwrap_or_else(|e| e.into_inner());
                if term < *highest {
                    return Err(ApiError::FailedPrecondition(format!(
                        "{what} of coordinator term {term} refused: this node follows term {}, and the coordinator that sent it no longer leads",
                        *highest
                    )));
                }
                if term == *highest {
                    return Ok(highest);
                }
            }
            let mut highest = self.highest.write().unwrap_or_else(|e| e.into_inner());
            if term > *highest {
                self.keep(term).map_err(|e| {
                    ApiError::Internal(format!(
                        "cannot keep coordinator term {term} in {}: {e}",
                        self.path.display()
                    ))
                })?;
                tracing::info!(
                    term,
                    previous = *highest,
                    "following a new coordinator term"
                );
                *highest = term;
                self.seen.store(term, Ordering::SeqCst);
            }
        }
    }

    /// Writes `term` to the file durably: a new file, synced, renamed over the old one, and
    /// the directory synced.
    fn keep(&self, term: u64) -> std::io::Result<()> {
        let temporary = self.path.with_extension("new");
        let mut file = std::fs::File::create(&temporary)?;
        writeln!(file, "{term}")?;
        file.sync_all()?;
        std::fs::rename(&temporary, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_term_is_refused_and_the_highest_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let terms = LeaderTerm::load(dir.path()).unwrap();
        assert_eq!(terms.highest(), 0);
        drop(terms.admit(0, "a command").unwrap());
        drop(terms.admit(7, "a command").unwrap());
        assert_eq!(terms.highest(), 7);
        let refused = terms.admit(5, "GroupCut").unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("GroupCut of coordinator term 5 refused: this node follows term 7"),
            "{refused}"
        );

        // No term is above what etcd's signed revisions reach: such a command is refused, and
        // the term kept does not move.
        assert!(terms.admit(u64::MAX, "a command").is_err());
        assert_eq!(terms.highest(), 7);

        let restarted = LeaderTerm::load(dir.path()).unwrap();
        assert_eq!(restarted.highest(), 7);
        assert!(restarted.admit(6, "a command").is_err());
        drop(restarted.admit(7, "a command").unwrap());
    }

    #[test]
    fn a_newer_term_waits_for_the_commands_of_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let terms = std::sync::Arc::new(LeaderTerm::load(dir.path()).unwrap());
        let running = terms.admit(3, "an old command").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let newer = std::sync::Arc::clone(&terms);
        let taker = std::thread::spawn(move || {
            drop(newer.admit(4, "AdoptTerm").unwrap());
            tx.send(()).unwrap();
        });
        // The newer term is not taken while the command of term 3 runs.
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err()
        );
        assert_eq!(*running, 3);
        drop(running);
        rx.recv().unwrap();
        taker.join().unwrap();
        assert_eq!(terms.highest(), 4);
    }

    #[test]
    fn a_damaged_file_is_an_error_not_term_zero() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "seven\n").unwrap();
        let error = LeaderTerm::load(dir.path()).err().unwrap().to_string();
        assert!(error.contains("not a coordinator term"), "{error}");
    }
}
