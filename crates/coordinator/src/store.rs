//! Where the coordinator keeps the cluster's metadata: a small interface ([`Store`]) that a
//! transactional key-value store implements.
//!
//! - [`RedbStore`], the embedded default: a redb file in the coordinator's state directory.
//! - [`EtcdStore`]: etcd, for coordinators that stand in for one another (one commit is one
//!   etcd transaction, fenced by the leader's term: docs/HA-COORDINATOR.md).
//!
//! Five tables of JSON records keyed by id: pairs, groups, jobs, nodes, and the REST API's
//! tokens. A change of several records commits in one transaction, or not at all. The
//! tests keep the same tables in memory (`MemoryStore`). [`transfer`] moves every record
//! from one store to another (`blockrep coordinator export` and `import`).

use crate::records::{GroupRecord, JobRecord, NodeRecord, PairRecord, TokenRecord};

pub(crate) mod etcd;
pub use etcd::{EtcdSettings, EtcdStore, EtcdTls, LeaderFence, MAX_TXN_OPS, StepDown};
#[cfg(test)]
mod memory;
#[cfg(test)]
pub use memory::MemoryStore;
mod redb;
pub use self::redb::RedbStore;
pub mod transfer;

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

/// The tables, each of one kind of record keyed by its id (a node by its name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    Pairs,
    Groups,
    Jobs,
    Nodes,
    Tokens,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Pairs,
        Table::Groups,
        Table::Jobs,
        Table::Nodes,
        Table::Tokens,
    ];

    /// The table's name in every store (redb's table, etcd's key segment, the export's).
    pub fn name(self) -> &'static str {
        match self {
            Table::Pairs => "pairs",
            Table::Groups => "groups",
            Table::Jobs => "jobs",
            Table::Nodes => "nodes",
            Table::Tokens => "api_tokens",
        }
    }

    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// What a change does to its table: puts the record's JSON under its key, or deletes the key.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub table: Table,
    pub key: String,
    /// The record's JSON; `None` deletes the key.
    pub value: Option<Vec<u8>>,
}

impl Change {
    pub fn entry(&self) -> Entry {
        fn put<T: serde::Serialize>(table: Table, key: String, record: &T) -> Entry {
            Entry {
                table,
                key,
                value: Some(serde_json::to_vec(record).expect("serialisable")),
            }
        }
        fn delete(table: Table, key: &str) -> Entry {
            Entry {
                table,
                key: key.to_owned(),
                value: None,
            }
        }
        match self {
            Change::PutPair(p) => put(Table::Pairs, p.id.to_string(), p),
            Change::DeletePair(id) => delete(Table::Pairs, id),
            Change::PutGroup(g) => put(Table::Groups, g.id.to_string(), g),
            Change::DeleteGroup(id) => delete(Table::Groups, id),
            Change::PutJob(j) => put(Table::Jobs, j.id.to_string(), j),
            Change::DeleteJob(id) => delete(Table::Jobs, id),
            Change::PutNode(n) => put(Table::Nodes, n.name.clone(), n),
            Change::PutToken(t) => put(Table::Tokens, t.id.clone(), t),
        }
    }
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

impl Snapshot {
    /// Decodes one stored record into its table's list.
    pub fn add(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        fn decode<T: serde::de::DeserializeOwned>(
            key: &str,
            value: &[u8],
        ) -> Result<T, StoreError> {
            serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
                key: key.to_owned(),
                reason: e.to_string(),
            })
        }
        match table {
            Table::Pairs => self.pairs.push(decode(key, value)?),
            Table::Groups => self.groups.push(decode(key, value)?),
            Table::Jobs => self.jobs.push(decode(key, value)?),
            Table::Nodes => self.nodes.push(decode(key, value)?),
            Table::Tokens => self.tokens.push(decode(key, value)?),
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.records() == 0
    }

    pub fn records(&self) -> usize {
        self.pairs.len()
            + self.groups.len()
            + self.jobs.len()
            + self.nodes.len()
            + self.tokens.len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("coordinator store: {0}")]
    Backend(String),
    #[error("coordinator store: record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// The store cannot commit now (etcd without a quorum, or unreachable).
    #[error("the coordinator's store has no quorum ({0})")]
    NoQuorum(String),
    /// A fenced commit found that this coordinator no longer leads: nothing was written.
    #[error(
        "this coordinator's term {term} is over: another coordinator leads, and nothing was written"
    )]
    Deposed { term: u64 },
    /// This leader stepped down (its term is over, or a commit's outcome is unknown): the
    /// commit was not sent.
    #[error(
        "this coordinator is stepping down ({0}): nothing was written; the next leader carries on from the records"
    )]
    SteppedDown(String),
    /// A commit larger than the store takes in one transaction.
    #[error(
        "coordinator store: a commit of {changes} changes is more than one etcd transaction takes ({limit}); nothing was written"
    )]
    TooLarge { changes: usize, limit: usize },
}

pub trait Store: Send + Sync {
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Applies every change, atomically and durably, or none.
    fn commit(&self, changes: &[Change]) -> Result<(), StoreError>;
    /// Whether this coordinator still leads, as the store says now (an HA leader's store
    /// checks its term; one coordinator always leads). For what the coordinator tells an
    /// agent from memory, without a commit: it is told only while it leads.
    fn check_leading(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

fn backend<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

#[cfg(test)]
pub(crate) mod tests {
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

    pub(super) fn job(progress: f64) -> JobRecord {
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
