//! The coordinator: a role of one blockrepd. It keeps the cluster's metadata (nodes, pairs, groups,
//! jobs) in a transactional store, answers the cluster calls every daemon forwards to it,
//! and drives each pair through its lifecycle by calling the agents.
//!
//! It is not in the data path: replication flows agent to agent, and goes on while the
//! coordinator is down.

pub mod clock;
pub mod coordinator;
pub mod election;
pub mod records;
pub mod store;

pub use clock::{Clock, SystemClock};
pub use coordinator::{Agents, BoxFuture, Coordinator, NODE_TIMEOUT};
pub use store::{
    Change, EtcdSettings, EtcdStore, EtcdTls, LeaderFence, RedbStore, Snapshot, Store, StoreError,
};
