//! Where the coordinator keeps the cluster's metadata: a small interface ([`Store`]) that a
//! transactional key-value store implements. The embedded default is redb, a file in the
//! coordinator's state directory; etcd (transactions over keys) fits the same interface.
//!
//! Five tables of JSON records keyed by id: pairs, groups, jobs, nodes, and the REST API's
//! tokens. A change of several
//! records commits in one transaction, or not at all. The tests keep the same tables in
//! memory (`MemoryStore`).

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};

use crate::records::{GroupRecord, JobRecord, NodeRecord, PairRecord, TokenRecord};

#[cfg(test)]
mod memory;
#[cfg(test)]
pub use memory::MemoryStore;

const PAIRS: TableDefinition<&str, &[u8]> = TableDefinition::new("pairs");
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_tokens");

/// One change in a transaction.
// A transaction holds a few changes for a moment: their size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Change {
    PutPair(PairRecord),
    DeletePair(String),
    PutGroup(GroupRecord),
    DeleteGroup(String),
    PutJob(JobRecord),
    DeleteJob(String),
    PutNode(NodeRecord),
    PutToken(TokenRecord),
}

/// Everything the store holds, as read at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub pairs: Vec<PairRecord>,
    pub groups: Vec<GroupRecord>,
    pub jobs: Vec<JobRecord>,
    pub nodes: Vec<NodeRecord>,
    pub tokens: Vec<TokenRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("coordinator store: {0}")]
    Backend(String),
    #[error("coordinator store: record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

pub trait Store: Send + Sync {
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Applies every change, atomically and durably, or none.
    fn commit(&self, changes: &[Change]) -> Result<(), StoreError>;
}

fn backend<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The embedded store: a redb database file.
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(backend)?;
        // Create the tables so that reads find them.
        let txn = db.begin_write().map_err(backend)?;
        for table in [PAIRS, GROUPS, JOBS, NODES, TOKENS] {
            txn.open_table(table).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        Ok(Self { db })
    }
}

fn read_all<T: serde::de::DeserializeOwned>(
    txn: &redb::ReadTransaction,
    table: TableDefinition<&str, &[u8]>,
) -> Result<Vec<T>, StoreError> {
    let table = txn.open_table(table).map_err(backend)?;
    let mut out = Vec::new();
    for entry in table.iter().map_err(backend)? {
        let (key, value) = entry.map_err(backend)?;
        let record = serde_json::from_slice(value.value()).map_err(|e| StoreError::Corrupt {
            key: key.value().to_owned(),
            reason: e.to_string(),
        })?;
        out.push(record);
    }
    Ok(out)
}

impl Store for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        Ok(Snapshot {
            pairs: read_all(&txn, PAIRS)?,
            groups: read_all(&txn, GROUPS)?,
            jobs: read_all(&txn, JOBS)?,
            nodes: read_all(&txn, NODES)?,
            tokens: read_all(&txn, TOKENS)?,
        })
    }

    fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        {
            let mut pairs = txn.open_table(PAIRS).map_err(backend)?;
            let mut groups = txn.open_table(GROUPS).map_err(backend)?;
            let mut jobs = txn.open_table(JOBS).map_err(backend)?;
            let mut nodes = txn.open_table(NODES).map_err(backend)?;
            let mut tokens = txn.open_table(TOKENS).map_err(backend)?;
            for change in changes {
                match change {
                    Change::PutPair(p) => {
                        let bytes = serde_json::to_vec(p).expect("serialisable");
                        pairs
                            .insert(p.id.to_string().as_str(), bytes.as_slice())
                            .map_err(backend)?;
                    }
                    Change::DeletePair(id) => {
                        pairs.remove(id.as_str()).map_err(backend)?;
                    }
                    Change::PutGroup(g) => {
                        let bytes = serde_json::to_vec(g).expect("serialisable");
                        groups
                            .insert(g.id.to_string().as_str(), bytes.as_slice())
                            .map_err(backend)?;
                    }
                    Change::DeleteGroup(id) => {
                        groups.remove(id.as_str()).map_err(backend)?;
                    }
                    Change::DeleteJob(id) => {
                        jobs.remove(id.as_str()).map_err(backend)?;
                    }
                    Change::PutJob(j) => {
                        let bytes = serde_json::to_vec(j).expect("serialisable");
                        jobs.insert(j.id.to_string().as_str(), bytes.as_slice())
                            .map_err(backend)?;
                    }
                    Change::PutNode(n) => {
                        let bytes = serde_json::to_vec(n).expect("serialisable");
                        nodes
                            .insert(n.name.as_str(), bytes.as_slice())
                            .map_err(backend)?;
                    }
                    Change::PutToken(t) => {
                        let bytes = serde_json::to_vec(t).expect("serialisable");
                        tokens
                            .insert(t.id.as_str(), bytes.as_slice())
                            .map_err(backend)?;
                    }
                }
            }
        }
        txn.commit().map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use blockrep_core::replication::{JobId, JobStatus, JobType, PairId};

    use super::*;
    use crate::records::JobRecord;

    #[test]
    fn changes_commit_together_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.redb");
        let job = JobRecord {
            id: JobId::random(),
            job_type: JobType::CreatePair,
            status: JobStatus::Running,
            begin_time: "2026-11-25T00:00:00Z".into(),
            end_time: None,
            progress: 0.5,
            fail_reason: None,
            pair: Some(PairId::random()),
            group: None,
            result: None,
            project: "default".into(),
        };
        {
            let store = RedbStore::open(&path).unwrap();
            store.commit(&[Change::PutJob(job.clone())]).unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        let snapshot = store.load().unwrap();
        assert_eq!(snapshot.jobs, vec![job]);
        assert!(snapshot.pairs.is_empty());
    }

    fn job(progress: f64) -> JobRecord {
        JobRecord {
            id: JobId::random(),
            job_type: JobType::CreatePair,
            status: JobStatus::Running,
            begin_time: "2026-11-25T00:00:00Z".into(),
            end_time: None,
            progress,
            fail_reason: None,
            pair: None,
            group: None,
            result: None,
            project: "default".into(),
        }
    }

    #[test]
    fn memory_store_commits_every_change_or_none() {
        let store = MemoryStore::new();
        let (a, b) = (job(0.1), job(0.2));
        store
            .commit(&[Change::PutJob(a.clone()), Change::PutJob(b.clone())])
            .unwrap();
        assert_eq!(store.commits(), 1);
        let mut jobs = store.load().unwrap().jobs;
        jobs.sort_by(|x, y| x.progress.total_cmp(&y.progress));
        assert_eq!(jobs, vec![a.clone(), b.clone()]);

        // A refused commit changes nothing, not even its first change.
        store.refuse_commits(true);
        let refused = store.commit(&[
            Change::DeleteJob(a.id.to_string()),
            Change::PutJob(job(0.3)),
        ]);
        assert!(
            matches!(refused, Err(StoreError::Backend(_))),
            "{refused:?}"
        );
        assert_eq!(store.commits(), 1);
        assert_eq!(store.load().unwrap().jobs.len(), 2);

        store.refuse_commits(false);
        store
            .commit(&[Change::DeleteJob(a.id.to_string())])
            .unwrap();
        assert_eq!(store.load().unwrap().jobs, vec![b]);
        assert_eq!(store.commits(), 2);
    }
}
