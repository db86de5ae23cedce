//! A group extend's steps: the pair's DR volume grows, then its production volume, then the
//! record.

use super::*;

impl Coordinator {
    /// Grows the DR volume, then the production volume; then the record. A refusal (no room)
    /// fails the job at once and changes nothing more (a volume already grown keeps its
    /// size: it never shrinks, and a retry grows the other).
    pub(super) async fn drive_extend(
        &self,
        group: GroupRecord,
        plan: ExtendPlan,
    ) -> Result<(), ApiError> {
        let Some(pair) = self.lock().pairs.get(&plan.pair).cloned() else {
            return self.end_operation(
                &group,
                GroupStatus::Available,
                Err(format!("pair {} is gone", plan.pair)),
            );
        };
        let extend = |volume: VolumeId| {
            Request::Extend(proto::Extend {
                pair_id: pair.id.to_string(),
                volume_id: volume.to_string(),
                size_bytes: plan.size,
            })
        };
        let mut plan = plan;
        if !plan.dr_done {
            if let Err(e) = self
                .call_agent_by_name(&pair.dr_node, extend(pair.dr_volume))
                .await
            {
                return self.operation_failed(&group, vec![(pair.id, e)], GroupStatus::Available);
            }
            plan.dr_done = true;
            self.save_plan(&group, GroupOperation::Extend(plan))?;
        }
        if let Err(e) = self
            .call_agent_by_name(&pair.production_node, extend(pair.production_volume))
            .await
        {
            return self.operation_failed(&group, vec![(pair.id, e)], GroupStatus::Available);
        }
        {
            // Onto the record as it is now: a job may have begun on the pair meanwhile.
            let mut state = self.lock();
            if let Some(mut record) = state.pairs.get(&pair.id).cloned() {
                record.size = plan.size;
                record.updated_at = Some(now_text());
                self.commit_into(&mut state, &[Change::PutPair(record)])?;
            }
        }
        tracing::info!(group = %group.id, pair = %pair.id, size = plan.size, "extended");
        self.end_operation(&group, GroupStatus::Available, Ok(()))
    }
}
