//! A group reprotect's steps: per pair, the old production side's dirty blocks are marked on
//! the new production side, then the old production side becomes DR.

use super::*;
use crate::coordinator::pair_steps::Side;

impl Coordinator {
    pub(super) async fn drive_reprotect(
        &self,
        group: GroupRecord,
        plan: ReprotectPlan,
    ) -> Result<(), ApiError> {
        let members = {
            let state = self.lock();
            Self::members(&state, &group)
        };
        let mut plan = plan;
        let mut failed = Vec::new();
        for p in &members {
            let Some(step) = plan.pairs.get(&p.id).copied() else {
                continue;
            };
            if step.switched {
                continue;
            }
            // The record's DR side is the old production side since the failover.
            if step.handed_over.is_none() {
                match self.hand_over_dirty(p).await {
                    Ok(bytes) => {
                        plan.pairs.get_mut(&p.id).expect("present").handed_over = Some(bytes);
                        self.save_plan(&group, GroupOperation::Reprotect(plan.clone()))?;
                    }
                    Err(e) => {
                        failed.push((p.id, e));
                        continue;
                    }
                }
            }
            let Some(generation) = p.generation else {
                failed.push((
                    p.id,
                    ApiError::Internal(format!(
                        "pair {} has no generation recorded from its failover",
                        p.name
                    )),
                ));
                continue;
            };
            let to_dr = self.switch_assignment(p, Side::Dr, generation, plan.term);
            match self
                .call_agent_by_name(&p.dr_node, Request::SwitchSide(to_dr))
                .await
            {
                Ok(()) => {
                    plan.pairs.get_mut(&p.id).expect("present").switched = true;
                    self.save_plan(&group, GroupOperation::Reprotect(plan.clone()))?;
                }
                Err(e) => failed.push((p.id, e)),
            }
        }
        if !plan.pairs.values().all(|s| s.switched) {
            return self.operation_failed(&group, failed, GroupStatus::Failovered);
        }
        let handed: u64 = plan.pairs.values().filter_map(|s| s.handed_over).sum();
        tracing::info!(group = %group.id, handed_over = handed, "reprotect: every old production side is DR; catching up");
        self.finish_role_change(&group, plan.term, None, false)
    }

    /// Reads the old production side's dirty blocks and marks them on the new production
    /// side, durably. Returns their bytes.
    async fn hand_over_dirty(&self, p: &PairRecord) -> Result<u64, ApiError> {
        let command = proto::PairCommand {
            pair_id: p.id.to_string(),
            ..Default::default()
        };
        let runs = match self
            .ask_agent(&p.dr_node, Request::DirtyRuns(command))
            .await?
        {
            Response::Dirty(d) => d.runs,
            _ => return Err(ApiError::Internal("unexpected answer to dirty_runs".into())),
        };
        let bytes = runs.iter().map(|r| r.length).sum();
        self.call_agent_by_name(
            &p.production_node,
            Request::MarkDirty(proto::MarkDirty {
                pair_id: p.id.to_string(),
                runs,
            }),
        )
        .await?;
        Ok(bytes)
    }
}
