//! Jobs in the coordinator: the list, a job by id, a pair's job started with its operation,
//! and followed by what the pair's agents report until it ends.

use super::*;

impl Coordinator {
    pub fn list_jobs(&self) -> Vec<proto::Job> {
        self.lock().jobs.values().map(job_view).collect()
    }

    pub fn get_job(&self, reference: &str) -> Result<proto::Job, ApiError> {
        let state = self.lock();
        reference
            .parse::<JobId>()
            .ok()
            .and_then(|id| state.jobs.get(&id))
            .map(job_view)
            .ok_or_else(|| ApiError::NotFound(format!("no job {reference:?}")))
    }

    /// Stores `record` with a new running job of `job_type`, and wakes the driver.
    pub(super) fn start_job(
        &self,
        state: &mut State,
        record: &mut PairRecord,
        job_type: JobType,
    ) -> Result<JobRecord, ApiError> {
        let job = JobRecord::running(job_type, JobAbout::Pair(record));
        record.job = Some(job.id);
        record.updated_at = Some(now_text());
        self.commit_into(
            state,
            &[Change::PutPair(record.clone()), Change::PutJob(job.clone())],
        )?;
        state.stuck_since.remove(&record.id);
        self.kick.notify_one();
        Ok(job)
    }

    /// A pair's job follows what its agents report: a create or resolve is done once the
    /// pair is active (and fails if its sides diverged); a verify once the production agent
    /// says it ended.
    pub(super) fn follow_job(&self, pair: &PairRecord) -> Result<(), ApiError> {
        let Some(job_id) = pair.job else {
            return Ok(());
        };
        let (view, verify, fresh, production_diverged) = {
            let state = self.lock();
            let reported = super::group_steps::report_on(&state, &pair.production_node, pair.id);
            let production_diverged = reported.is_some_and(|s| s.needs_resolve);
            // A report sent before the last step speaks of the pair as it was.
            let fresh = match state.step_taken.get(&pair.id) {
                Some(taken) => state
                    .nodes
                    .get(&pair.production_node)
                    .and_then(|n| n.last_seen)
                    .is_some_and(|seen| seen > *taken + HEARTBEAT_SLACK),
                None => true,
            };
            let verify = reported
                .and_then(|s| s.verify.clone())
                .filter(|v| v.job_id == job_id.to_string());
            (
                self.pair_view(&state, pair),
                verify,
                fresh,
                production_diverged,
            )
        };
        if !fresh {
            return Ok(());
        }
        let mut state = self.lock();
        let Some(job) = state.jobs.get(&job_id).cloned() else {
            return Ok(());
        };
        if job.status.is_finished() {
            return Ok(());
        }
        let mut job = job;
        let outcome = match job.job_type {
            JobType::VerifyPair => match verify {
                Some(v) if v.done && v.error.is_empty() => {
                    job.result = Some(verify_result(&v));
                    Some(Ok(()))
                }
                Some(v) if v.done => Some(Err(v.error)),
                Some(v) => {
                    job.progress = v.progress.max(job.progress);
                    None
                }
                None => None,
            },
            _ if production_diverged => Some(Err(view.status_detail.clone())),
            _ if view.replication_status == ReplicationStatus::Active.to_string() => Some(Ok(())),
            _ => {
                job.progress = view.progress.max(job.progress);
                None
            }
        };
        let Some(outcome) = outcome else {
            state.jobs.insert(job.id, job);
            return Ok(());
        };
        // Onto the pair as it is now, if it is still the one the driver saw.
        let Some(mut record) = super::pair_steps::still_current(&state, pair) else {
            return Ok(());
        };
        job.end(outcome);
        record.job = None;
        let (id, job_type, status) = (job.id, job.job_type, job.status);
        self.commit_into(&mut state, &[Change::PutJob(job), Change::PutPair(record)])?;
        tracing::info!(pair = %pair.id, job = %id, %job_type, %status, "job ended");
        Ok(())
    }
}

pub(super) fn job_view(j: &JobRecord) -> proto::Job {
    proto::Job {
        id: j.id.to_string(),
        job_type: j.job_type.to_string(),
        status: j.status.to_string(),
        begin_time: j.begin_time.clone(),
        end_time: j.end_time.clone().unwrap_or_default(),
        progress: j.progress,
        fail_reason: j.fail_reason.clone().unwrap_or_default(),
        pair_id: j.pair.map(|p| p.to_string()).unwrap_or_default(),
        result: j.result.clone().unwrap_or_default(),
        group_id: j.group.map(|g| g.to_string()).unwrap_or_default(),
        project_id: j.project.clone(),
    }
}

/// A finished verify in words: what was compared, and the ranges that differ.
fn verify_result(v: &proto::VerifyState) -> String {
    let mut text = format!(
        "{} compared, {} differing, {} not compared (dirty or written throughout)",
        blockrep_api::human_bytes(v.verified_bytes),
        blockrep_api::human_bytes(v.differing_bytes),
        blockrep_api::human_bytes(v.unverified_bytes)
    );
    if !v.differing.is_empty() {
        let listed: Vec<String> = v
            .differing
            .iter()
            .take(20)
            .map(|e| format!("{}+{}", e.offset, e.length))
            .collect();
        text.push_str(&format!("; differing: {}", listed.join(", ")));
        if v.differing.len() > 20 {
            text.push_str(&format!(" and {} more", v.differing.len() - 20));
        }
        if v.repaired {
            text.push_str("; copied again from production");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::testing::*;

    #[test]
    fn a_job_is_found_by_its_id_only() {
        let job = running_job(JobType::CreatePair, None, None);
        let h = Harness::seeded(&[Change::PutJob(job.clone())]);
        let found = h.coordinator.get_job(&job.id.to_string()).unwrap();
        assert_eq!(found.id, job.id.to_string());
        assert_eq!(found.status, JobStatus::Running.to_string());
        let unknown = JobId::from_bytes([0xee; 16]).to_string();
        for reference in [unknown.as_str(), "not-an-id", ""] {
            let error = h.coordinator.get_job(reference).unwrap_err();
            assert_eq!(error.code(), 404, "{reference:?}: {error}");
        }
    }

    /// The job's end is recorded on the pair as it is now: a change made after the driver
    /// took its copy stays.
    #[tokio::test]
    async fn a_job_ending_does_not_write_an_older_record_of_its_pair_back() {
        let mut pair = pair_record("web", ("n1", 1), ("n2", 2));
        let job = running_job(JobType::VerifyPair, Some(pair.id), None);
        pair.job = Some(job.id);
        let h = Harness::seeded(&[Change::PutPair(pair.clone()), Change::PutJob(job.clone())]);
        let mut state = pair_state(&pair, "production", ReplicationStatus::Active);
        state.verify = Some(proto::VerifyState {
            job_id: job.id.to_string(),
            progress: 1.0,
            done: true,
            ..Default::default()
        });
        h.report("n1", "az1", vec![], vec![state]);
        let seen = h.pair(pair.id);
        let mut changed = seen.clone();
        changed.description = "changed meanwhile".into();
        h.store.commit(&[Change::PutPair(changed.clone())]).unwrap();
        h.coordinator.lock().pairs.insert(pair.id, changed);

        h.coordinator.follow_job(&seen).unwrap();
        assert_eq!(h.stored_job(job.id).unwrap().status, JobStatus::Success);
        let stored = h.stored_pair(pair.id).unwrap();
        assert_eq!(stored.job, None);
        assert_eq!(stored.description, "changed meanwhile");
    }

    #[tokio::test]
    async fn a_verify_job_follows_what_production_reports_until_it_ends() {
        let mut pair = pair_record("web", ("n1", 1), ("n2", 2));
        let job = running_job(JobType::VerifyPair, Some(pair.id), None);
        pair.job = Some(job.id);
        let h = Harness::seeded(&[Change::PutPair(pair.clone()), Change::PutJob(job.clone())]);
        let report = |verify: proto::VerifyState| {
            let mut state = pair_state(&pair, "production", ReplicationStatus::Active);
            state.verify = Some(verify);
            h.report("n1", "az1", vec![], vec![state]);
        };
        let follow = || h.coordinator.follow_job(&h.pair(pair.id)).unwrap();

        // Another job's verify says nothing of this one.
        report(proto::VerifyState {
            job_id: JobId::from_bytes([0xee; 16]).to_string(),
            done: true,
            ..Default::default()
        });
        follow();
        assert_eq!(
            h.coordinator.lock().jobs[&job.id].status,
            JobStatus::Running
        );

        report(proto::VerifyState {
            job_id: job.id.to_string(),
            progress: 0.5,
            ..Default::default()
        });
        follow();
        let running = h.coordinator.get_job(&job.id.to_string()).unwrap();
        assert_eq!(
            (running.status.as_str(), running.progress),
            ("RUNNING", 0.5)
        );
        assert_eq!(h.stored_job(job.id).unwrap().status, JobStatus::Running);

        report(proto::VerifyState {
            job_id: job.id.to_string(),
            progress: 1.0,
            done: true,
            differing: vec![proto::Extent {
                offset: 4096,
                length: 8192,
            }],
            differing_bytes: 8192,
            verified_bytes: SIZE,
            ..Default::default()
        });
        follow();
        let ended = h.stored_job(job.id).unwrap();
        assert_eq!(ended.status, JobStatus::Success);
        let result = ended.result.unwrap();
        assert!(result.contains("differing: 4096+8192"), "{result}");
        assert_eq!(h.stored_pair(pair.id).unwrap().job, None);
        assert!(h.agents.calls().is_empty());
    }

    #[tokio::test]
    async fn a_verify_that_could_not_finish_fails_its_job() {
        let mut pair = pair_record("web", ("n1", 1), ("n2", 2));
        let job = running_job(JobType::VerifyPair, Some(pair.id), None);
        pair.job = Some(job.id);
        let h = Harness::seeded(&[Change::PutPair(pair.clone()), Change::PutJob(job.clone())]);
        let mut state = pair_state(&pair, "production", ReplicationStatus::Active);
        state.verify = Some(proto::VerifyState {
            job_id: job.id.to_string(),
            done: true,
            error: "the DR side went away".into(),
            ..Default::default()
        });
        h.report("n1", "az1", vec![], vec![state]);
        h.coordinator.follow_job(&pair).unwrap();
        let failed = h.stored_job(job.id).unwrap();
        assert_eq!(failed.status, JobStatus::Fail);
        assert_eq!(failed.fail_reason.as_deref(), Some("the DR side went away"));
    }
}
