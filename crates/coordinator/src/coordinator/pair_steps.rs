//! A pair's lifecycle as a planner: from its record (and where its agents are), the next
//! step — the agent calls to make, in order — and, from the record as it is once every
//! call was taken (or once the driver gives up), the changes to store. No I/O and no
//! clock: the driver (`driver.rs`) makes the calls, checks the record did not change
//! meanwhile, and stores what these functions return.
//!
//! ```text
//!  creating, DR not started ───────► BecomeDr (DR agent)          ─► dr_started
//!  creating, production not started ► BecomeProduction (production) ─► available
//!  a pending resolve or verify ────► KeepProduction | Verify | SwitchSide × 2 ─► pending cleared
//!  deleting ───────────────────────► LeavePair (production), LeavePair (DR) ─► removed, job SUCCESS
//!  no answer for AGENT_GIVE_UP ────► error (error_deleting), job FAIL
//! ```

use std::net::SocketAddr;

use blockrep_api::proto::{self, cluster_request::Request};
use blockrep_core::replication::{IllegalPairStatus, JobStatus, PairStatus};

use super::State;
use crate::records::{JobRecord, PairRecord, PendingStep};
use crate::store::Change;

/// A side of a pair.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Production,
    Dr,
}

/// What the agent on `side` of `p` is told; `peer_address` is the other side's endpoint.
pub(super) fn assignment(
    p: &PairRecord,
    side: Side,
    peer_address: SocketAddr,
) -> proto::PairAssignment {
    let (local, peer, peer_node) = match side {
        Side::Production => (p.production_volume, p.dr_volume, &p.dr_node),
        Side::Dr => (p.dr_volume, p.production_volume, &p.production_node),
    };
    proto::PairAssignment {
        pair_id: p.id.to_string(),
        replication_model: p.model.to_string(),
        local_volume_id: local.to_string(),
        peer_volume_id: peer.to_string(),
        peer_node: peer_node.clone(),
        peer_address: peer_address.to_string(),
        size_bytes: p.size,
        side: match side {
            Side::Production => "production".into(),
            Side::Dr => "dr".into(),
        },
        discard_peer: false,
        generation: 0,
        term: p.term,
        grouped: p.group.is_some(),
        max_bytes_per_sec: p.max_bytes_per_sec.unwrap_or(0),
    }
}

/// The record of `seen`'s pair as it is now, if it is still the one the driver took its
/// step from (same status, job and pending step): a request or another step may have
/// changed it while the driver waited for an agent.
pub(super) fn still_current(state: &State, seen: &PairRecord) -> Option<PairRecord> {
    state
        .pairs
        .get(&seen.id)
        .filter(|now| {
            now.status == seen.status && now.job == seen.job && now.pending == seen.pending
        })
        .cloned()
}

/// One agent call of a step.
#[derive(Debug)]
pub(super) struct Call {
    pub node: String,
    pub address: SocketAddr,
    pub request: Request,
}

/// What a step records once every one of its calls was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Done {
    /// The DR agent took its role.
    DrStarted,
    /// The production agent took its role: the pair is available.
    ProductionStarted,
    /// The agents were told the pending step of a resolve or a verify.
    PendingTold,
    /// Both agents left the pair: it is gone.
    Deleted,
}

/// The next step of a pair's lifecycle.
#[derive(Debug)]
pub(super) struct Step {
    /// Made in order; a call not taken stops the step (it is taken again next round).
    pub calls: Vec<Call>,
    pub done: Done,
}

/// Why a step cannot be taken now (the driver retries it, then gives up).
pub(super) const NOT_REGISTERED: &str = "a node of the pair is not registered";

/// The next step for `pair`, its agents at `production` and `dr` (if registered): `None`
/// if it has none (its job, if any, follows the agents' reports).
pub(super) fn next_step(
    pair: &PairRecord,
    production: Option<SocketAddr>,
    dr: Option<SocketAddr>,
) -> Option<Result<Step, &'static str>> {
    let creating = pair.status == PairStatus::Creating;
    let wanted = pair.status == PairStatus::Deleting
        || (creating && !(pair.dr_started && pair.production_started))
        || pair.pending.is_some();
    if !wanted {
        return None;
    }
    let (Some(production), Some(dr)) = (production, dr) else {
        return Some(Err(NOT_REGISTERED));
    };
    let to_production = |request| Call {
        node: pair.production_node.clone(),
        address: production,
        request,
    };
    let to_dr = |request| Call {
        node: pair.dr_node.clone(),
        address: dr,
        request,
    };
    let step = |calls, done| Some(Ok(Step { calls, done }));
    if creating && !pair.dr_started {
        let assignment = assignment(pair, Side::Dr, production);
        return step(vec![to_dr(Request::BecomeDr(assignment))], Done::DrStarted);
    }
    if creating && !pair.production_started {
        let assignment = assignment(pair, Side::Production, dr);
        return step(
            vec![to_production(Request::BecomeProduction(assignment))],
            Done::ProductionStarted,
        );
    }
    if pair.status == PairStatus::Deleting {
        let leave_production = assignment(pair, Side::Production, dr);
        let leave_dr = assignment(pair, Side::Dr, production);
        return step(
            vec![
                to_production(Request::LeavePair(leave_production)),
                to_dr(Request::LeavePair(leave_dr)),
            ],
            Done::Deleted,
        );
    }
    let command = |repair| proto::PairCommand {
        pair_id: pair.id.to_string(),
        job_id: pair.job.map(|j| j.to_string()).unwrap_or_default(),
        repair,
    };
    let calls = match pair.pending.expect("checked above") {
        PendingStep::KeepProduction => {
            vec![to_production(Request::KeepProduction(command(false)))]
        }
        PendingStep::Verify { repair } => vec![to_production(Request::Verify(command(repair)))],
        PendingStep::SwitchSides => {
            // The record already names the kept side as production: the old production
            // agent steps down first, then the kept side takes over.
            let step_down = assignment(pair, Side::Dr, production);
            let take_over = proto::PairAssignment {
                discard_peer: true,
                ..assignment(pair, Side::Production, dr)
            };
            vec![
                to_dr(Request::SwitchSide(step_down)),
                to_production(Request::SwitchSide(take_over)),
            ]
        }
    };
    step(calls, Done::PendingTold)
}

/// The changes a step that was taken stores, onto `record` as it is now and its `job`;
/// `now` is the records' timestamp.
pub(super) fn step_taken(
    mut record: PairRecord,
    job: Option<JobRecord>,
    done: Done,
    now: &str,
) -> Result<Vec<Change>, IllegalPairStatus> {
    match done {
        Done::DrStarted => record.dr_started = true,
        Done::ProductionStarted => {
            record.production_started = true;
            record
                .status
                .become_(PairStatus::Available, "both sides took their roles")?;
            record.updated_at = Some(now.to_owned());
        }
        Done::PendingTold => record.pending = None,
        Done::Deleted => {
            let mut changes = vec![Change::DeletePair(record.id.to_string())];
            if let Some(mut job) = job {
                job.status = JobStatus::Success;
                job.progress = 1.0;
                job.end_time = Some(now.to_owned());
                changes.push(Change::PutJob(job));
            }
            return Ok(changes);
        }
    }
    Ok(vec![Change::PutPair(record)])
}

/// The changes when the driver gives up on `record`'s step: the pair is in error
/// (`error_deleting` while deleting) with `reason`, its job failed, its pending step
/// dropped.
pub(super) fn give_up(
    mut record: PairRecord,
    job: Option<JobRecord>,
    reason: &str,
    now: &str,
) -> Result<Vec<Change>, IllegalPairStatus> {
    let failed = match record.status {
        PairStatus::Deleting => PairStatus::ErrorDeleting,
        _ => PairStatus::Error,
    };
    record.status.become_(failed, "a step that got no answer")?;
    record.failure_detail = Some(reason.to_owned());
    record.updated_at = Some(now.to_owned());
    // The step is over with its job: an agent that comes back is not told it later.
    record.job = None;
    record.pending = None;
    let mut changes = vec![];
    if let Some(mut job) = job {
        job.status = JobStatus::Fail;
        job.end_time = Some(now.to_owned());
        job.fail_reason = Some(reason.to_owned());
        changes.push(Change::PutJob(job));
    }
    changes.push(Change::PutPair(record));
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::testing::{address, kind_of, pair_record, running_job};
    use blockrep_core::replication::JobType;

    fn kinds(step: &Step) -> Vec<String> {
        step.calls
            .iter()
            .map(|c| format!("{}:{}", c.node, kind_of(&c.request)))
            .collect()
    }

    fn planned(pair: &PairRecord) -> Step {
        next_step(pair, Some(address("n1")), Some(address("n2")))
            .expect("a step")
            .expect("registered")
    }

    #[test]
    fn each_lifecycle_state_plans_its_calls_in_order() {
        let mut pair = pair_record("web", ("n1", 1), ("n2", 2));
        assert!(next_step(&pair, None, None).is_none(), "available, idle");

        pair.status = PairStatus::Creating;
        pair.dr_started = false;
        pair.production_started = false;
        let step = planned(&pair);
        assert_eq!(
            (kinds(&step), step.done),
            (vec!["n2:BecomeDr".to_owned()], Done::DrStarted)
        );
        pair.dr_started = true;
        let step = planned(&pair);
        assert_eq!(
            (kinds(&step), step.done),
            (
                vec!["n1:BecomeProduction".to_owned()],
                Done::ProductionStarted
            )
        );

        // Both sides started (the record says available with it): a pending step goes.
        pair.production_started = true;
        pair.pending = Some(PendingStep::Verify { repair: true });
        assert_eq!(kinds(&planned(&pair)), ["n1:Verify"]);

        pair.status = PairStatus::Available;
        pair.pending = Some(PendingStep::SwitchSides);
        let step = planned(&pair);
        assert_eq!(kinds(&step), ["n2:SwitchSide", "n1:SwitchSide"]);
        let Request::SwitchSide(take_over) = &step.calls[1].request else {
            unreachable!()
        };
        assert!(
            take_over.discard_peer,
            "the kept side discards the other's changes"
        );

        pair.pending = None;
        pair.status = PairStatus::Deleting;
        let step = planned(&pair);
        assert_eq!(
            (kinds(&step), step.done),
            (
                vec!["n1:LeavePair".to_owned(), "n2:LeavePair".to_owned()],
                Done::Deleted
            )
        );
        assert_eq!(
            next_step(&pair, Some(address("n1")), None).map(|s| s.err()),
            Some(Some(NOT_REGISTERED))
        );
    }

    #[test]
    fn a_step_taken_or_given_up_stores_the_pair_and_its_job_together() {
        let mut pair = pair_record("web", ("n1", 1), ("n2", 2));
        pair.status = PairStatus::Creating;
        let changes = step_taken(pair.clone(), None, Done::ProductionStarted, "t").unwrap();
        let [Change::PutPair(available)] = changes.as_slice() else {
            panic!("{changes:?}")
        };
        assert_eq!(available.status, PairStatus::Available);

        pair.status = PairStatus::Deleting;
        let job = running_job(JobType::DeletePair, Some(pair.id), None);
        pair.job = Some(job.id);
        let changes = step_taken(pair.clone(), Some(job.clone()), Done::Deleted, "t").unwrap();
        assert!(matches!(&changes[0], Change::DeletePair(id) if *id == pair.id.to_string()));
        assert!(matches!(&changes[1], Change::PutJob(j) if j.status == JobStatus::Success));

        let changes = give_up(pair.clone(), Some(job), "node n2 does not answer", "t").unwrap();
        let [Change::PutJob(failed), Change::PutPair(record)] = changes.as_slice() else {
            panic!("{changes:?}")
        };
        assert_eq!(failed.status, JobStatus::Fail);
        assert_eq!(
            (record.status, record.job),
            (PairStatus::ErrorDeleting, None)
        );

        // A pair already deleting cannot be made available by a stale creation step.
        assert!(step_taken(pair, None, Done::ProductionStarted, "t").is_err());
    }
}
