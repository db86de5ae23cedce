//! A group's drills (docs/POINT-IN-TIME.md, "Drills"): for every DR volume of the group, a
//! writable drill volume at one retained point, made by the DR volume's agent and served
//! there over NBD; replication and the DR volumes go on untouched. A drill is made on every
//! DR volume or on none (what was made is deleted again), then recorded with the group.
//! A failover or a reverse ends a group's drills (their DR volumes become production).

use std::time::Duration;

use blockrep_api::ApiError;
use blockrep_api::proto::{self, cluster_request::Request, cluster_response::Response};
use blockrep_core::replication::{Epoch, JobType, ReplicationModel};

use super::Coordinator;
use crate::records::{DrillRecord, DrillVolumeRecord, GroupRecord, now_text};
use crate::store::Change;

/// The longest drill name.
const MAX_DRILL_NAME: usize = 64;

fn check_drill_name(name: &str) -> Result<(), ApiError> {
    let fine = !name.is_empty()
        && name.len() <= MAX_DRILL_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if fine {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(format!(
            "drill name {name:?}: 1 to {MAX_DRILL_NAME} letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

/// The export a drill volume is served under: the drill's name and the pair's, in the
/// characters a socket file name takes.
fn export_name(drill: &str, pair: &str) -> String {
    let pair: String = pair
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{drill}-{pair}")
}

impl Coordinator {
    /// Makes a drill of group `req.group` at a retained point (the newest, if none is
    /// named), on every DR volume or on none.
    pub async fn create_drill(
        &self,
        req: proto::CreateDrillRequest,
    ) -> Result<proto::Drill, ApiError> {
        check_drill_name(&req.name)?;
        let listed = self.group_points(&req.group).await?;
        if listed.points.is_empty() {
            return Err(ApiError::FailedPrecondition(format!(
                "group {} holds no points in time to drill{}",
                req.group,
                if listed.detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", listed.detail)
                }
            )));
        }
        let point = if req.point.is_empty() {
            Epoch(listed.points[listed.points.len() - 1].epoch)
        } else {
            super::points::choose_point(&listed.points, &req.point)?
        };
        let cut_ms = listed
            .points
            .iter()
            .find(|p| p.epoch == point.0)
            .map_or(0, |p| p.cut_ms);
        let drill = {
            let state = self.lock();
            let id = Self::find_group(&state, &req.group)?;
            let group = &state.groups[&id];
            if group.model != ReplicationModel::Async {
                return Err(ApiError::FailedPrecondition(
                    "drills need points in time: an async group with a retention".into(),
                ));
            }
            if state
                .groups
                .values()
                .flat_map(|g| &g.drills)
                .any(|d| d.name == req.name)
            {
                return Err(ApiError::AlreadyExists(format!(
                    "a drill named {} exists",
                    req.name
                )));
            }
            DrillRecord {
                id: uuid_text(),
                name: req.name.clone(),
                point,
                cut_ms,
                created_at: now_text(),
                vpc: req.drill_vpc_id.clone(),
                updated_at: None,
                job: None,
                volumes: group
                    .pairs
                    .iter()
                    .filter_map(|p| state.pairs.get(p))
                    .map(|p| DrillVolumeRecord {
                        pair: p.id,
                        node: p.dr_node.clone(),
                        export: export_name(&req.name, &p.name),
                        dr_volume: p.dr_volume,
                    })
                    .collect(),
            }
        };
        let mut made = Vec::new();
        for volume in &drill.volumes {
            let command = Request::CreateDrill(drill_command(&drill, volume));
            match self.ask_agent(&volume.node, command).await {
                Ok(_) => made.push(volume.clone()),
                Err(e) => {
                    self.undo_drill(&drill, &made).await;
                    return Err(ApiError::FailedPrecondition(format!(
                        "drill refused: node {} cannot make the drill of pair {}: {e}",
                        volume.node, volume.pair
                    )));
                }
            }
        }
        let recorded = {
            let mut state = self.lock();
            Self::find_group(&state, &req.group).and_then(|id| {
                let mut group = state.groups[&id].clone();
                let job = super::groups::finished_job(JobType::CreateDrill, &group);
                let mut drill = drill.clone();
                drill.job = Some(job.id);
                group.drills.push(drill.clone());
                self.commit_into(
                    &mut state,
                    &[Change::PutGroup(group.clone()), Change::PutJob(job)],
                )?;
                Ok((group, drill))
            })
        };
        match recorded {
            Ok((group, drill)) => {
                tracing::info!(group = %group.id, drill = %drill.name, point = %point, "drill created");
                Ok(drill_view(&group, &drill))
            }
            Err(e) => {
                self.undo_drill(&drill, &made).await;
                Err(e)
            }
        }
    }

    async fn undo_drill(&self, drill: &DrillRecord, made: &[DrillVolumeRecord]) {
        for volume in made {
            let command = Request::DeleteDrill(drill_command(drill, volume));
            if let Err(e) = self.ask_agent(&volume.node, command).await {
                tracing::warn!(drill = %drill.name, node = %volume.node, error = %e, "cannot delete a drill volume made for a drill that failed");
            }
        }
    }

    pub fn list_drills(&self, group: &str) -> Result<proto::ListDrillsResponse, ApiError> {
        let state = self.lock();
        let groups: Vec<&GroupRecord> = if group.is_empty() {
            state.groups.values().collect()
        } else {
            vec![&state.groups[&Self::find_group(&state, group)?]]
        };
        Ok(proto::ListDrillsResponse {
            drills: groups
                .iter()
                .flat_map(|g| g.drills.iter().map(|d| drill_view(g, d)))
                .collect(),
        })
    }

    pub fn get_drill(&self, reference: &str) -> Result<proto::Drill, ApiError> {
        let state = self.lock();
        let (group, drill) = find_drill(state.groups.values(), reference)?;
        Ok(drill_view(group, drill))
    }

    /// Deletes a drill: every drill volume, then the record. A DR agent that cannot be
    /// reached keeps the drill (delete it again).
    pub async fn delete_drill(&self, reference: &str) -> Result<proto::Drill, ApiError> {
        let (group_id, drill) = {
            let state = self.lock();
            let (group, drill) = find_drill(state.groups.values(), reference)?;
            (group.id, drill.clone())
        };
        for volume in &drill.volumes {
            let command = Request::DeleteDrill(drill_command(&drill, volume));
            self.ask_agent(&volume.node, command).await.map_err(|e| {
                ApiError::Unavailable(format!(
                    "node {} did not delete its drill volume {} ({e}); the drill stays: delete it again",
                    volume.node, volume.export
                ))
            })?;
        }
        let mut state = self.lock();
        let Some(mut group) = state.groups.get(&group_id).cloned() else {
            return Err(ApiError::NotFound(format!("no drill {reference}")));
        };
        group.drills.retain(|d| d.id != drill.id);
        let job = super::groups::finished_job(JobType::DeleteDrill, &group);
        let mut drill = drill;
        drill.job = Some(job.id);
        self.commit_into(
            &mut state,
            &[Change::PutGroup(group.clone()), Change::PutJob(job)],
        )?;
        tracing::info!(group = %group_id, drill = %drill.name, "drill deleted");
        let mut view = drill_view(&group, &drill);
        view.status = "deleted".into();
        Ok(view)
    }

    /// Starts verifying every drill volume of a drill against production's digests
    /// (`req.start`; one running goes on), and says how each verification goes. A DR agent
    /// that does not answer shows as failed, with why.
    pub async fn verify_drill(
        &self,
        req: proto::VerifyDrillRequest,
    ) -> Result<proto::DrillVerification, ApiError> {
        let drill = {
            let state = self.lock();
            find_drill(state.groups.values(), &req.drill)?.1.clone()
        };
        let mut volumes = Vec::new();
        for volume in &drill.volumes {
            let command = Request::CheckDrill(proto::DrillCheckCommand {
                drill: Some(drill_command(&drill, volume)),
                start: req.start,
            });
            let mut check = match self.ask_agent(&volume.node, command).await {
                Ok(Response::DrillCheck(check)) => check,
                Ok(_) => proto::DrillVolumeCheck {
                    state: "failed".into(),
                    error: format!("node {} answered with something unexpected", volume.node),
                    ..Default::default()
                },
                Err(e) => proto::DrillVolumeCheck {
                    state: "failed".into(),
                    error: format!("node {}: {e}", volume.node),
                    ..Default::default()
                },
            };
            if !req.start && check.state == "none" {
                // Asked after a start: the DR agent restarted since, and forgot it.
                check.state = "failed".into();
                check.error = format!(
                    "node {} restarted during the verification: verify the drill again",
                    volume.node
                );
            }
            check.pair_id = volume.pair.to_string();
            check.node = volume.node.clone();
            check.export = volume.export.clone();
            volumes.push(check);
        }
        if req.start {
            tracing::info!(drill = %drill.name, point = %drill.point, "drill verification started");
        }
        Ok(proto::DrillVerification {
            drill_id: drill.id.clone(),
            name: drill.name.clone(),
            point_epoch: drill.point.0,
            done: volumes
                .iter()
                .all(|v| matches!(v.state.as_str(), "done" | "failed")),
            volumes,
        })
    }

    /// Renames a drill (its drill volumes keep their export names).
    pub fn update_drill(&self, req: proto::UpdateDrillRequest) -> Result<proto::Drill, ApiError> {
        check_drill_name(&req.name)?;
        let mut state = self.lock();
        let (group_id, drill_id) = {
            let (group, drill) = find_drill(state.groups.values(), &req.drill)?;
            (group.id, drill.id.clone())
        };
        if state
            .groups
            .values()
            .flat_map(|g| &g.drills)
            .any(|d| d.name == req.name && d.id != drill_id)
        {
            return Err(ApiError::AlreadyExists(format!(
                "a drill named {} exists",
                req.name
            )));
        }
        let mut group = state.groups[&group_id].clone();
        let drill = group
            .drills
            .iter_mut()
            .find(|d| d.id == drill_id)
            .expect("found above");
        drill.name = req.name;
        drill.updated_at = Some(now_text());
        let drill = drill.clone();
        self.commit_into(&mut state, &[Change::PutGroup(group.clone())])?;
        Ok(drill_view(&group, &drill))
    }
}

fn find_drill<'a>(
    groups: impl Iterator<Item = &'a GroupRecord>,
    reference: &str,
) -> Result<(&'a GroupRecord, &'a DrillRecord), ApiError> {
    let found: Vec<(&GroupRecord, &DrillRecord)> = groups
        .flat_map(|g| g.drills.iter().map(move |d| (g, d)))
        .filter(|(_, d)| d.id == reference || d.name == reference)
        .collect();
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(ApiError::NotFound(format!("no drill {reference:?}"))),
        _ => Err(ApiError::InvalidArgument(format!(
            "{} drills match {reference:?}; give the drill id",
            found.len()
        ))),
    }
}

fn drill_command(drill: &DrillRecord, volume: &DrillVolumeRecord) -> proto::DrillCommand {
    proto::DrillCommand {
        drill_id: drill.id.clone(),
        pair_id: volume.pair.to_string(),
        export: volume.export.clone(),
        point: drill.point.0,
    }
}

fn drill_view(group: &GroupRecord, d: &DrillRecord) -> proto::Drill {
    proto::Drill {
        id: d.id.clone(),
        name: d.name.clone(),
        group_id: group.id.to_string(),
        point_epoch: d.point.0,
        point_cut_at: humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_millis(d.cut_ms),
        )
        .to_string(),
        status: "available".into(),
        created_at: d.created_at.clone(),
        drill_vpc_id: d.vpc.clone(),
        job_id: d.job.map(|j| j.to_string()).unwrap_or_default(),
        updated_at: d.updated_at.clone().unwrap_or_default(),
        project_id: group.project.clone(),
        volumes: d
            .volumes
            .iter()
            .map(|v| proto::DrillVolume {
                pair_id: v.pair.to_string(),
                node: v.node.clone(),
                export: v.export.clone(),
                dr_volume_id: v.dr_volume.to_string(),
            })
            .collect(),
    }
}

/// A new random id, in the form the other records' ids take.
fn uuid_text() -> String {
    blockrep_core::replication::JobId::random().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::testing::*;

    /// A DR agent that restarted during a verification has forgotten it ("none"): asked
    /// again, the volume shows failed, so a client waiting for the end gets one.
    #[tokio::test]
    async fn a_verification_the_dr_agent_forgot_shows_failed() {
        let (h, group, a, b) = seeded_group_of_two();
        h.dr_reports(&[&a, &b], true, 0);
        let drill = DrillRecord {
            id: "d-1".into(),
            name: "monday".into(),
            point: Epoch(7),
            cut_ms: 0,
            created_at: now_text(),
            volumes: vec![DrillVolumeRecord {
                pair: a.id,
                node: a.dr_node.clone(),
                export: "monday-a".into(),
                dr_volume: a.dr_volume,
            }],
            vpc: String::new(),
            updated_at: None,
            job: None,
        };
        h.coordinator
            .lock()
            .groups
            .get_mut(&group.id)
            .unwrap()
            .drills
            .push(drill);
        let answer = |state: &str| {
            Answer::Respond(Box::new(Response::DrillCheck(proto::DrillVolumeCheck {
                state: state.into(),
                ..Default::default()
            })))
        };
        h.agents
            .script("CheckDrill", Some(&a.dr_node), answer("running"), Some(1));
        let ask = |start| proto::VerifyDrillRequest {
            drill: "monday".into(),
            start,
        };
        let started = h.coordinator.verify_drill(ask(true)).await.unwrap();
        assert!(!started.done, "{started:?}");
        h.agents
            .script("CheckDrill", Some(&a.dr_node), answer("none"), None);
        let polled = h.coordinator.verify_drill(ask(false)).await.unwrap();
        assert!(polled.done, "{polled:?}");
        assert_eq!(polled.volumes[0].state, "failed");
        assert!(polled.volumes[0].error.contains("restarted"), "{polled:?}");
    }

    #[test]
    fn drill_names_and_exports_are_file_names() {
        assert!(check_drill_name("monday-drill_1.a").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_drill_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(export_name("d", "db/data 1"), "d-db_data_1");
    }
}
