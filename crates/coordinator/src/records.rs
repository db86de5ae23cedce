//! What the coordinator stores: pairs, groups, jobs and nodes.

use std::net::SocketAddr;

use blockrep_core::VolumeId;
use blockrep_core::replication::{
    GroupId, GroupStatus, JobId, JobStatus, JobType, PairId, PairStatus, ReplicationModel,
};
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
    /// A step the driver still has to take to an agent for that operation.
    #[serde(default)]
    pub pending: Option<PendingStep>,
    /// The consistency group the pair belongs to.
    #[serde(default)]
    pub group: Option<GroupId>,
}

/// A replication consistency group: pairs that replicate, fail over, reverse and reprotect
/// together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub id: GroupId,
    pub name: String,
    pub description: String,
    pub status: GroupStatus,
    pub model: ReplicationModel,
    pub priority_station: String,
    /// In the order they were added.
    pub pairs: Vec<PairId>,
    /// Stopped by the operator: replication paused, writes tracked.
    pub stopped: bool,
    pub created_at: String,
    pub updated_at: Option<String>,
    pub failure_detail: Option<String>,
    /// The job that follows the group's current long operation.
    pub job: Option<JobId>,
}

/// What the driver still has to tell an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingStep {
    /// Resolve keeping production: it copies the whole volume over the DR side.
    KeepProduction,
    /// Resolve keeping the DR side: the two agents switch sides (already swapped in the
    /// record), and the new production side copies over the old one.
    SwitchSides,
    /// Start an online verify on the production agent.
    Verify { repair: bool },
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
    #[serde(default)]
    pub group: Option<GroupId>,
    /// What the job found (a verify's differing ranges), in words.
    #[serde(default)]
    pub result: Option<String>,
}

impl JobRecord {
    /// Ends the job: SUCCESS, or FAIL with the reason.
    pub fn end(&mut self, outcome: Result<(), String>) {
        self.end_time = Some(now_text());
        match outcome {
            Ok(()) => {
                self.status = JobStatus::Success;
                self.progress = 1.0;
            }
            Err(reason) => {
                self.status = JobStatus::Fail;
                self.fail_reason = Some(reason);
            }
        }
    }
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
