//! The store the coordinator's tests run on.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::*;

/// A store in memory: the five tables of JSON records, as [`RedbStore`] keeps them (every
/// record goes through its JSON form, so a reopened coordinator reads what a restarted one
/// would). A commit applies every change or none. For tests, it counts its commits and can
/// be told to refuse them.
#[derive(Default)]
pub struct MemoryStore {
    tables: Mutex<BTreeMap<(Table, String), Vec<u8>>>,
    commits: AtomicUsize,
    refuse: AtomicBool,
    /// As an HA leader's store whose term is over: `check_leading` fails.
    deposed: AtomicBool,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many commits succeeded.
    pub fn commits(&self) -> usize {
        self.commits.load(Ordering::SeqCst)
    }

    /// From now on, every commit fails (`true`) or succeeds again (`false`).
    pub fn refuse_commits(&self, refuse: bool) {
        self.refuse.store(refuse, Ordering::SeqCst);
    }

    /// From now on, the coordinator no longer leads (`true`), as a deposed HA leader's
    /// store says, or leads again (`false`).
    pub fn depose(&self, deposed: bool) {
        self.deposed.store(deposed, Ordering::SeqCst);
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Table, String), Vec<u8>>> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for MemoryStore {
    fn check_leading(&self) -> Result<(), StoreError> {
        if self.deposed.load(Ordering::SeqCst) {
            return Err(StoreError::Deposed { term: 1 });
        }
        Ok(())
    }

    fn load(&self) -> Result<Snapshot, StoreError> {
        let mut snapshot = Snapshot::default();
        for ((table, key), value) in self.tables().iter() {
            snapshot.add(*table, key, value)?;
        }
        Ok(snapshot)
    }

    fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(StoreError::Backend(
                "the memory store refuses commits".into(),
            ));
        }
        let mut tables = self.tables();
        // Every change is encoded before any is applied: all or none.
        for entry in changes.iter().map(Change::entry).collect::<Vec<_>>() {
            match entry.value {
                Some(value) => {
                    tables.insert((entry.table, entry.key), value);
                }
                None => {
                    tables.remove(&(entry.table, entry.key));
                }
            }
        }
        self.commits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}
