//! What the coordinator stores: pairs, jobs and nodes.

use std::net::SocketAddr;

use blockrep_core::VolumeId;
use blockrep_core::replication::{JobId, JobStatus, JobType, PairId, PairStatus, ReplicationModel};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairRecord {
    pub id: PairId,
    pub name: String,
    pub description: String,
    pub status: PairStatus,
    pub model: ReplicationModel,
    pub production_volume: VolumeId,
    pub dr_volume: VolumeId,
    pub production_node: String,
    pub dr_node: String,
    pub priority_station: String,
    pub size: u64,
    pub created_at: String,
    pub updated_at: Option<String>,
    /// The production agent took its role (the initial sync runs from there).
    #[serde(default)]
    pub production_started: bool,
    /// Why the pair is in `error` or `error_deleting`.
    #[serde(default)]
    pub failure_detail: Option<String>,
    /// The job that follows the pair's current long operation.
    #[serde(default)]
    pub job: Option<JobId>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub job_type: JobType,
    pub status: JobStatus,
    pub begin_time: String,
    pub end_time: Option<String>,
    pub progress: f64,
    pub fail_reason: Option<String>,
    pub pair: Option<PairId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub availability_zone: String,
    /// Where the node's QUIC endpoint was seen from the coordinator.
    pub address: SocketAddr,
    pub registered_at: String,
}

pub fn now_text() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
