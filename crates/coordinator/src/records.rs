//! What the coordinator stores: pairs, groups, jobs and nodes.

use std::net::SocketAddr;

use std::collections::BTreeMap;

use blockrep_core::VolumeId;
use blockrep_core::replication::{
    Epoch, GenerationId, GroupId, GroupStatus, JobId, JobStatus, JobType, PairId, PairStatus,
    ReplicationModel,
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
    /// The DR agent took its role. A pair is recorded before its DR agent is asked, so a
    /// crash in between leaves a record the driver completes, never a DR role nobody knows.
    /// (Records from before this field existed were written after the DR agent's step.)
    #[serde(default = "taken")]
    pub dr_started: bool,
    /// The production agent took its role (the initial sync runs from there).
    #[serde(default)]
    pub production_started: bool,
    /// The pair's own send limit in bytes per second (`pair update --max-rate`), which its
    /// production agent applies beside its own.
    #[serde(default)]
    pub max_bytes_per_sec: Option<u64>,
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
    /// The term of the pair's current roles: it grows at every failover, reverse and
    /// reprotect, and agents refuse role commands of an older one.
    #[serde(default)]
    pub term: u64,
    /// The generation the coordinator issued to the production side at its last role change
    /// (failover, reverse): a reprotect's new DR side adopts it.
    #[serde(default)]
    pub generation: Option<GenerationId>,
    /// The project the pair belongs to: its volumes'.
    #[serde(default = "default_project")]
    pub project: String,
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
    /// The term of the group's roles (see [`PairRecord::term`]).
    #[serde(default)]
    pub term: u64,
    /// A failover, reverse, reprotect or extend under way: its plan and how far it got, so
    /// a restarted coordinator carries on where it stopped.
    #[serde(default)]
    pub operation: Option<GroupOperation>,
    /// The point the last failover rolled the DR volumes to (shown while failovered).
    #[serde(default)]
    pub failed_over_at: Option<PromotedAt>,
    /// The project the group belongs to: its pairs'.
    #[serde(default = "default_project")]
    pub project: String,
    /// An SDRS protection group: its zones and domain.
    #[serde(default)]
    pub protection: Option<ProtectionSpec>,
    /// A pair being made for the group or taken out of it (SDRS replication pairs): its
    /// plan and how far it got.
    #[serde(default)]
    pub membership: Option<MembershipChange>,
    /// How long the DR volumes keep points in time (async groups).
    #[serde(default)]
    pub retention: blockrep_core::replication::undo::Retention,
    /// The group's drills: writable images of its DR volumes at a point.
    #[serde(default)]
    pub drills: Vec<DrillRecord>,
}

/// A drill of a group: on each DR volume's agent, a drill volume at `point`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillRecord {
    pub id: String,
    pub name: String,
    pub point: Epoch,
    pub cut_ms: u64,
    pub created_at: String,
    pub volumes: Vec<DrillVolumeRecord>,
    /// Kept for the SDRS API.
    #[serde(default)]
    pub vpc: String,
    #[serde(default)]
    pub updated_at: Option<String>,
    /// The job that recorded its creation.
    #[serde(default)]
    pub job: Option<JobId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillVolumeRecord {
    pub pair: PairId,
    pub node: String,
    pub export: String,
    pub dr_volume: VolumeId,
}

/// What makes a group an SDRS protection group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectionSpec {
    pub source_az: String,
    pub target_az: String,
    pub domain_id: String,
    pub source_vpc_id: String,
    pub dr_type: String,
}

impl MembershipChange {
    pub fn job(&self) -> Option<JobId> {
        match self {
            MembershipChange::Add(p) => p.job,
            MembershipChange::Remove(p) => p.job,
        }
    }

    pub fn set_job(&mut self, job: JobId) {
        match self {
            MembershipChange::Add(p) => p.job = Some(job),
            MembershipChange::Remove(p) => p.job = Some(job),
        }
    }
}

/// A pair made for a group, or taken out of it, step by step (recorded before each step,
/// so a restarted coordinator carries on).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MembershipChange {
    Add(AddPairPlan),
    Remove(RemovePairPlan),
}

/// A new pair of the group: a DR volume made in a pool of the other zone, the pair, then
/// its joining the group. A failure undoes what was made, in reverse.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AddPairPlan {
    pub name: String,
    pub description: String,
    pub production_volume: VolumeId,
    pub size: u64,
    pub dr_node: String,
    pub dr_volume_name: String,
    /// The DR volume, once its agent made it.
    pub dr_volume: Option<VolumeId>,
    /// The pair, once created.
    pub pair: Option<PairId>,
    /// Why the change failed: what was made is being undone.
    pub undoing: Option<String>,
    /// The change's job (the group's own job may be a later failover's).
    #[serde(default)]
    pub job: Option<JobId>,
}

/// A pair taken out of the group and deleted, and its DR volume with it if asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemovePairPlan {
    pub pair: PairId,
    pub delete_dr_volume: bool,
    pub dr_node: String,
    pub dr_volume: VolumeId,
    /// The change's job (the group's own job may be a later failover's).
    #[serde(default)]
    pub job: Option<JobId>,
}

impl GroupOperation {
    /// The operation and its step, in words.
    pub fn describe(&self) -> String {
        let of = |done: usize, all: usize| format!("{done} of {all} pairs");
        match self {
            GroupOperation::Failover(p) => format!(
                "failover: promoting the DR sides ({} done)",
                of(
                    p.pairs.values().filter(|s| s.done.is_some()).count(),
                    p.pairs.len()
                )
            ),
            GroupOperation::Reverse(p) => match p.step {
                ReverseStep::Draining => {
                    "reverse: production refuses writes and drains to the DR side".to_owned()
                }
                ReverseStep::Swapping => format!(
                    "reverse: swapping sides ({} done)",
                    of(
                        p.pairs
                            .values()
                            .filter(|s| s.old_production_switched && s.old_dr_switched)
                            .count(),
                        p.pairs.len()
                    )
                ),
            },
            GroupOperation::Reprotect(p) => format!(
                "reprotect: the old production sides become DR ({} done)",
                of(
                    p.pairs.values().filter(|s| s.switched).count(),
                    p.pairs.len()
                )
            ),
            GroupOperation::Extend(p) => format!(
                "extend: pair {} to {} bytes ({})",
                p.pair,
                p.size,
                if p.dr_done {
                    "DR volume grown, production next"
                } else {
                    "DR volume first"
                }
            ),
        }
    }
}

/// A group operation of several steps, recorded before each step is taken.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GroupOperation {
    Failover(FailoverPlan),
    Reverse(ReversePlan),
    Reprotect(ReprotectPlan),
    Extend(ExtendPlan),
}

/// Failover: every DR side rolls to `commit` and becomes production.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailoverPlan {
    /// The group's commit the DR sides roll to; `None`: each applies what it sealed
    /// (hypermetro groups, whose DR volumes take writes as they come).
    pub commit: Option<Epoch>,
    pub term: u64,
    /// When the failover was asked for (ms since the Unix epoch).
    pub asked_ms: u64,
    /// When the coordinator last heard from the group's production hosts then (the latest
    /// of them, ms since the Unix epoch); `None`: not since it started.
    #[serde(default)]
    pub production_heard_ms: Option<u64>,
    /// Per pair: the generation its DR volume begins, and where its promotion left it.
    pub pairs: BTreeMap<PairId, PromoteStep>,
    /// A retained point every DR volume rolls back to, after applying up to the commit.
    #[serde(default)]
    pub point: Option<Epoch>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromoteStep {
    pub generation: GenerationId,
    pub done: Option<PromotedAt>,
}

/// Where a promotion left a DR volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotedAt {
    pub epoch: Epoch,
    pub cut_ms: u64,
    pub dropped_bytes: u64,
    /// Bytes written back from the undo to reach a point.
    #[serde(default)]
    pub rolled_back_bytes: u64,
}

/// Reverse: fence and drain production, then swap every pair's sides under `term`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReversePlan {
    pub term: u64,
    pub step: ReverseStep,
    /// When the drain began (ms since the Unix epoch): it gives up after a while.
    pub draining_since_ms: u64,
    /// Per pair: the generation both sides share after the swap, and whether it is done.
    pub pairs: BTreeMap<PairId, SwapStep>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReverseStep {
    /// Production sides refuse new writes and send what they have.
    Draining,
    /// Every DR side holds everything: the sides swap, pair by pair.
    Swapping,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapStep {
    pub generation: GenerationId,
    /// The old production side is the DR side now.
    pub old_production_switched: bool,
    /// The old DR side is production now.
    pub old_dr_switched: bool,
}

/// Reprotect: each old production side's dirty blocks go to the new production side's
/// bitmap, then the old side becomes the DR side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReprotectPlan {
    pub term: u64,
    /// Per pair: the bytes handed over (once marked), and whether the old side switched.
    pub pairs: BTreeMap<PairId, ReprotectStep>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReprotectStep {
    /// The old production side's dirty bytes, marked on the new production side.
    pub handed_over: Option<u64>,
    pub switched: bool,
}

/// Extend: both volumes of `pair` grow to `size`, the DR volume first (a production write
/// past the DR volume's end would fail there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtendPlan {
    pub pair: PairId,
    pub size: u64,
    pub dr_done: bool,
    /// The production volume grew too (absent in plans recorded before it was kept).
    #[serde(default)]
    pub production_done: bool,
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
    /// The project of the pair or group the job is about.
    #[serde(default = "default_project")]
    pub project: String,
}

impl JobRecord {
    /// A new job of `job_type`, running from now, about a pair or a group (`about`: its id
    /// and its project).
    pub fn running(job_type: JobType, about: JobAbout<'_>) -> Self {
        let (pair, group, project) = match about {
            JobAbout::Pair(p) => (Some(p.id), None, p.project.clone()),
            JobAbout::Group(g) => (None, Some(g.id), g.project.clone()),
        };
        Self {
            id: JobId::random(),
            job_type,
            status: JobStatus::Running,
            begin_time: now_text(),
            end_time: None,
            progress: 0.0,
            fail_reason: None,
            pair,
            group,
            result: None,
            project,
        }
    }

    /// Ends the job now: SUCCESS, or FAIL with the reason.
    pub fn end(&mut self, outcome: Result<(), String>) {
        self.end_at(outcome, &now_text());
    }

    /// Ends the job at `now` (a record's timestamp): SUCCESS, or FAIL with the reason.
    pub fn end_at(&mut self, outcome: Result<(), String>, now: &str) {
        self.end_time = Some(now.to_owned());
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

/// What a job is about.
#[derive(Clone, Copy, Debug)]
pub enum JobAbout<'a> {
    Pair(&'a PairRecord),
    Group(&'a GroupRecord),
}

/// A token of the REST API: only its SHA-256 is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub project: String,
    /// SHA-256 of the secret, hex.
    pub sha256: String,
    pub created_at: String,
    pub revoked_at: Option<String>,
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

fn taken() -> bool {
    true
}

pub use blockrep_api::model::default_project;
