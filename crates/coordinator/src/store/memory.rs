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
    tables: Mutex<Tables>,
    commits: AtomicUsize,
    refuse: AtomicBool,
}

#[derive(Clone, Default)]
struct Tables {
    pairs: BTreeMap<String, Vec<u8>>,
    groups: BTreeMap<String, Vec<u8>>,
    jobs: BTreeMap<String, Vec<u8>>,
    nodes: BTreeMap<String, Vec<u8>>,
    tokens: BTreeMap<String, Vec<u8>>,
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

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for MemoryStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let tables = self.tables();
        Ok(Snapshot {
            pairs: decode_all(&tables.pairs)?,
            groups: decode_all(&tables.groups)?,
            jobs: decode_all(&tables.jobs)?,
            nodes: decode_all(&tables.nodes)?,
            tokens: decode_all(&tables.tokens)?,
        })
    }

    fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(StoreError::Backend(
                "the memory store refuses commits".into(),
            ));
        }
        let mut tables = self.tables();
        // Applied to a copy, which replaces the tables only once every change is in.
        let mut next = tables.clone();
        for change in changes {
            match change {
                Change::PutPair(p) => {
                    next.pairs.insert(p.id.to_string(), encode(p));
                }
                Change::DeletePair(id) => {
                    next.pairs.remove(id);
                }
                Change::PutGroup(g) => {
                    next.groups.insert(g.id.to_string(), encode(g));
                }
                Change::DeleteGroup(id) => {
                    next.groups.remove(id);
                }
                Change::PutJob(j) => {
                    next.jobs.insert(j.id.to_string(), encode(j));
                }
                Change::DeleteJob(id) => {
                    next.jobs.remove(id);
                }
                Change::PutNode(n) => {
                    next.nodes.insert(n.name.clone(), encode(n));
                }
                Change::PutToken(t) => {
                    next.tokens.insert(t.id.clone(), encode(t));
                }
            }
        }
        *tables = next;
        self.commits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn encode<T: serde::Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("serialisable")
}

fn decode_all<T: serde::de::DeserializeOwned>(
    table: &BTreeMap<String, Vec<u8>>,
) -> Result<Vec<T>, StoreError> {
    table
        .iter()
        .map(|(key, value)| {
            serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}
