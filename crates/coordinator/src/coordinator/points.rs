//! A group's points in time (docs/POINT-IN-TIME.md): an epoch is a point of the group when
//! every DR volume of the group holds it, so the group can be read, or rolled back, as of
//! it. Each DR agent says what its volumes hold; nothing is recorded here.

use std::collections::BTreeMap;
use std::time::Duration;

use blockrep_api::ApiError;
use blockrep_api::proto::{self, cluster_request::Request, cluster_response::Response};
use blockrep_core::replication::{Epoch, PairId, ReplicationModel};

use super::Coordinator;

impl Coordinator {
    /// The points every DR volume of group `reference` holds, oldest first. A DR agent
    /// that does not answer leaves the group with none it can vouch for, and says so.
    pub async fn group_points(
        &self,
        reference: &str,
    ) -> Result<proto::GroupPointsResponse, ApiError> {
        let (group, by_node) = {
            let state = self.lock();
            let id = Self::find_group(&state, reference)?;
            let group = state.groups[&id].clone();
            let mut by_node: BTreeMap<String, Vec<PairId>> = BTreeMap::new();
            for pid in &group.pairs {
                if let Some(pair) = state.pairs.get(pid) {
                    by_node.entry(pair.dr_node.clone()).or_default().push(*pid);
                }
            }
            (group, by_node)
        };
        let mut answer = proto::GroupPointsResponse {
            group_id: group.id.to_string(),
            ..Default::default()
        };
        if group.model == ReplicationModel::Hypermetro {
            answer.detail =
                "a hypermetro group keeps no points in time (its DR volumes are written directly)"
                    .into();
            return Ok(answer);
        }
        if group.pairs.is_empty() {
            answer.detail = "the group has no pairs".into();
            return Ok(answer);
        }
        let mut volumes = Vec::new();
        let mut problems = Vec::new();
        for (node, pairs) in by_node {
            let request = Request::ListPoints(proto::PairIds {
                pair_ids: pairs.iter().map(PairId::to_string).collect(),
            });
            match self.ask_agent(&node, request).await {
                Ok(Response::VolumePoints(found)) => {
                    for pair in found.pairs {
                        if !pair.detail.is_empty() {
                            problems.push(format!("pair {}: {}", pair.pair_id, pair.detail));
                        }
                        volumes.push(pair.points);
                    }
                }
                Ok(_) => problems.push(format!("node {node} answered with something unexpected")),
                Err(e) => problems.push(format!("node {node}: {e}")),
            }
        }
        if !problems.is_empty() {
            answer.detail = format!(
                "not every DR volume could say which points it holds: {}",
                problems.join("; ")
            );
            return Ok(answer);
        }
        answer.points = common_points(&volumes);
        if !group.retention.is_on() {
            answer.detail =
                "the group keeps no points in time (set one with `group update --retention`)"
                    .into();
        } else if answer.points.len() < 2 {
            answer.detail =
                "points are kept from the first unit each DR volume applies with the retention on"
                    .into();
        }
        Ok(answer)
    }
}

/// The point `asked` names among the group's `points`: an epoch of them, or a time (RFC
/// 3339), for the newest point cut at or before it.
pub(super) fn choose_point(points: &[proto::GroupPoint], asked: &str) -> Result<Epoch, ApiError> {
    let asked = asked.trim();
    let range = || {
        format!(
            "the group holds epochs {} to {} (cut {} to {})",
            points[0].epoch,
            points[points.len() - 1].epoch,
            points[0].cut_at,
            points[points.len() - 1].cut_at
        )
    };
    if let Ok(epoch) = asked.parse::<u64>() {
        return points
            .iter()
            .find(|p| p.epoch == epoch)
            .map(|p| Epoch(p.epoch))
            .ok_or_else(|| {
                ApiError::FailedPrecondition(format!(
                    "failover refused: epoch {epoch} is not a point of the group; {}",
                    range()
                ))
            });
    }
    let time = humantime::parse_rfc3339_weak(asked).map_err(|e| {
        ApiError::InvalidArgument(format!(
            "point {asked:?} is neither an epoch nor a time (RFC 3339, such as 2026-12-06T10:00:00Z): {e}"
        ))
    })?;
    let ms = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    points
        .iter()
        .rev()
        .find(|p| p.cut_ms <= ms)
        .map(|p| Epoch(p.epoch))
        .ok_or_else(|| {
            ApiError::FailedPrecondition(format!(
                "failover refused: no point of the group was cut at or before {asked}; {}",
                range()
            ))
        })
}

/// The points every volume holds (by epoch), oldest first, each with the undo behind it
/// summed over the volumes and its cut time in words.
fn common_points(volumes: &[Vec<proto::GroupPoint>]) -> Vec<proto::GroupPoint> {
    let Some((first, rest)) = volumes.split_first() else {
        return Vec::new();
    };
    let mut common: BTreeMap<u64, proto::GroupPoint> =
        first.iter().map(|p| (p.epoch, p.clone())).collect();
    for volume in rest {
        let held: BTreeMap<u64, &proto::GroupPoint> = volume.iter().map(|p| (p.epoch, p)).collect();
        common.retain(|epoch, point| match held.get(epoch) {
            Some(other) => {
                point.bytes_behind += other.bytes_behind;
                point.cut_ms = point.cut_ms.max(other.cut_ms);
                true
            }
            None => false,
        });
    }
    common
        .into_values()
        .map(|mut p| {
            p.cut_at = humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + Duration::from_millis(p.cut_ms),
            )
            .to_string();
            p
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(epoch: u64, bytes: u64) -> proto::GroupPoint {
        proto::GroupPoint {
            epoch,
            cut_ms: epoch * 1000,
            bytes_behind: bytes,
            ..Default::default()
        }
    }

    /// A point of the group is one every volume holds: one volume's unit that spanned two
    /// epochs (applied as one) leaves the epoch inside it out.
    #[test]
    fn a_group_point_is_held_by_every_volume() {
        let a = vec![point(3, 100), point(4, 50), point(5, 0)];
        let b = vec![point(3, 10), point(5, 0), point(6, 0)];
        let common = common_points(&[a, b]);
        let epochs: Vec<(u64, u64)> = common.iter().map(|p| (p.epoch, p.bytes_behind)).collect();
        assert_eq!(epochs, [(3, 110), (5, 0)]);
        assert_eq!(common[0].cut_at, "1970-01-01T00:00:03.000Z");
        assert!(common_points(&[]).is_empty());
    }

    /// A point is named by its epoch, or by a time: the newest point cut at or before it.
    #[test]
    fn a_point_is_chosen_by_epoch_or_by_time() {
        let points = common_points(&[vec![point(3, 0), point(5, 0), point(9, 0)]]);
        assert_eq!(choose_point(&points, "5").unwrap(), Epoch(5));
        assert!(choose_point(&points, "4").is_err());
        assert_eq!(
            choose_point(&points, "1970-01-01T00:00:08Z").unwrap(),
            Epoch(5)
        );
        assert_eq!(
            choose_point(&points, "1970-01-01T00:00:09Z").unwrap(),
            Epoch(9)
        );
        assert!(choose_point(&points, "1970-01-01T00:00:02Z").is_err());
        assert!(choose_point(&points, "yesterday").is_err());
    }
}
