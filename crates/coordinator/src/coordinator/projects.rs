//! Projects: whom a request acts for, and what it may see.
//!
//! The local API acts for the operator and sees every record. A request of the REST API
//! carries its token (as SHA-256) and the project its path names ([`proto::ApiScope`]): it
//! acts for the token's project, sees only that project's volumes, pairs, groups and jobs
//! (another project's are "not found", never listed), and may not make the operator's calls
//! (tokens) nor the agents' (reports, role commands).
//!
//! Scoping happens before a request reaches its handler: every reference it carries is
//! resolved among the caller's records and replaced by the record's id
//! ([`Coordinator::scope_request`]), and lists are filtered after
//! ([`Caller::filter`]). A request kind not named there is refused, so a new one cannot
//! reach its handler unscoped. The handlers check, besides, that what they tie together
//! shares a project (a pair's volumes, a group's pairs), for the operator's calls too.

use std::collections::BTreeMap;

use super::pairs::volume_project;
use super::*;

/// The most records one REST request may name (it is resolved under the coordinator's
/// lock).
const MAX_REFERENCES: usize = 1000;

/// Whom a cluster request acts for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The local API (or an agent): every project.
    Operator,
    /// The REST API, authenticated for one project.
    Project(String),
}

impl Caller {
    pub fn project(&self) -> Option<&str> {
        match self {
            Caller::Operator => None,
            Caller::Project(p) => Some(p),
        }
    }

    /// An answer with only what the caller may see.
    pub fn filter(&self, response: Response) -> Response {
        let Caller::Project(project) = self else {
            return response;
        };
        let mine = |p: &str| p == project;
        match response {
            Response::Pairs(mut list) => {
                list.pairs.retain(|p| mine(&p.project_id));
                Response::Pairs(list)
            }
            Response::Groups(mut list) => {
                list.groups.retain(|g| mine(&g.project_id));
                Response::Groups(list)
            }
            Response::Jobs(mut list) => {
                list.jobs.retain(|j| mine(&j.project_id));
                Response::Jobs(list)
            }
            Response::Drills(mut list) => {
                list.drills.retain(|d| mine(&d.project_id));
                Response::Drills(list)
            }
            // The zones and whether they are up: not the hosts' names, addresses or counters.
            Response::Nodes(mut list) => {
                for node in &mut list.nodes {
                    *node = proto::Node {
                        availability_zone: std::mem::take(&mut node.availability_zone),
                        alive: node.alive,
                        ..Default::default()
                    };
                }
                Response::Nodes(list)
            }
            other => other,
        }
    }
}

impl Coordinator {
    /// Whom a request acts for: the operator, or the project its token authenticates.
    pub(super) fn caller(&self, scope: Option<&proto::ApiScope>) -> Result<Caller, ApiError> {
        match scope {
            None => Ok(Caller::Operator),
            Some(scope) => self.authenticate(scope).map(Caller::Project),
        }
    }

    /// A REST request with every reference it carries resolved among the caller's records
    /// (and replaced by the record's id); the operator's requests as they are. A reference
    /// to another project's record is refused as if there were no such record.
    pub(super) fn scope_request(
        &self,
        caller: &Caller,
        request: Request,
    ) -> Result<Request, ApiError> {
        let Caller::Project(project) = caller else {
            return Ok(request);
        };
        let references = match &request {
            Request::CreatePair(r) => r.volumes.len(),
            Request::CreateGroup(r) => r.pairs.len(),
            Request::UpdateGroup(r) => r.add_pairs.len() + r.remove_pairs.len(),
            _ => 0,
        };
        if references > MAX_REFERENCES {
            return Err(ApiError::InvalidArgument(format!(
                "{references} references in one request; at most {MAX_REFERENCES}"
            )));
        }
        let state = self.lock();
        let pair = |r: &mut String| -> Result<(), ApiError> {
            *r = visible(&state.pairs, project, r, "pair", |p| (&p.name, &p.project))?;
            Ok(())
        };
        let group = |r: &mut String| -> Result<(), ApiError> {
            *r = visible(&state.groups, project, r, "consistency group", |g| {
                (&g.name, &g.project)
            })?;
            Ok(())
        };
        // A drill of one of the project's groups, by id or by a name unique among them.
        let drill = |r: &mut String| -> Result<(), ApiError> {
            let found: Vec<&str> = state
                .groups
                .values()
                .filter(|g| g.project == *project)
                .flat_map(|g| &g.drills)
                .filter(|d| d.id == *r || d.name == *r)
                .map(|d| d.id.as_str())
                .collect();
            match found.as_slice() {
                [id] => {
                    *r = (*id).to_owned();
                    Ok(())
                }
                [] => Err(ApiError::NotFound(format!("no drill {r:?}"))),
                _ => Err(ApiError::InvalidArgument(format!(
                    "{} drills are named {r:?}; give the drill id",
                    found.len()
                ))),
            }
        };
        let mut request = request;
        match &mut request {
            Request::CreateGroupDrill(r) => group(&mut r.group)?,
            Request::ListDrills(r) if !r.group.is_empty() => group(&mut r.group)?,
            Request::ListDrills(_) => {}
            Request::GetDrill(r) | Request::DeleteGroupDrill(r) => drill(&mut r.drill)?,
            Request::UpdateDrill(r) => drill(&mut r.drill)?,
            Request::CreatePair(r) => {
                for v in &mut r.volumes {
                    *v = self.visible_volume(&state, project, v)?;
                }
            }
            Request::GetPair(r) | Request::DeletePair(r) => pair(&mut r.pair)?,
            // A name and a description; the send limit is the operator's.
            Request::UpdatePair(r) if r.max_bytes_per_sec.is_none() => pair(&mut r.pair)?,
            Request::CreateGroup(r) => {
                for p in &mut r.pairs {
                    pair(p)?;
                }
            }
            Request::UpdateGroup(r) => {
                group(&mut r.group)?;
                for p in r.add_pairs.iter_mut().chain(r.remove_pairs.iter_mut()) {
                    pair(p)?;
                }
            }
            Request::GetGroup(r)
            | Request::DeleteGroup(r)
            | Request::SyncGroup(r)
            | Request::StopGroup(r)
            | Request::FailoverGroup(r)
            | Request::ReverseGroup(r)
            | Request::ReprotectGroup(r) => group(&mut r.group)?,
            Request::ExtendGroup(r) => {
                group(&mut r.group)?;
                pair(&mut r.pair)?;
            }
            Request::AddGroupPair(r) => {
                group(&mut r.group)?;
                r.volume = self.visible_volume(&state, project, &r.volume)?;
            }
            Request::RemoveGroupPair(r) => pair(&mut r.pair)?,
            Request::GetJob(r) => {
                let id = r.job.parse::<JobId>().ok();
                match id.and_then(|id| state.jobs.get(&id)) {
                    Some(job) if job.project == *project => {}
                    _ => return Err(ApiError::NotFound(format!("no job {:?}", r.job))),
                }
            }
            Request::ListPairs(_)
            | Request::ListGroups(_)
            | Request::ListJobs(_)
            | Request::ListNodes(_) => {}
            _ => {
                return Err(ApiError::Forbidden(
                    "only the operator (the local API) or an agent may make this call".into(),
                ));
            }
        }
        Ok(request)
    }

    /// A volume of `project` by id, or by a name unique among the project's volumes: its id.
    fn visible_volume(
        &self,
        state: &State,
        project: &str,
        reference: &str,
    ) -> Result<String, ApiError> {
        let found: Vec<&proto::Volume> = state
            .nodes
            .values()
            .flat_map(|n| &n.report.volumes)
            .filter(|v| volume_project(v) == project && (v.id == reference || v.name == reference))
            .collect();
        match found.as_slice() {
            [v] => Ok(v.id.clone()),
            [] => Err(ApiError::NotFound(format!(
                "no volume {reference:?} on any node of the cluster (give a volume id, or a name unique in the cluster)"
            ))),
            _ => Err(ApiError::InvalidArgument(format!(
                "{} volumes are named {reference:?}; give the volume id",
                found.len()
            ))),
        }
    }
}

/// A record of `project` by id, or by a name unique among the project's records: its id.
fn visible<Id, R>(
    records: &BTreeMap<Id, R>,
    project: &str,
    reference: &str,
    kind: &str,
    name_and_project: impl Fn(&R) -> (&String, &String),
) -> Result<String, ApiError>
where
    Id: Copy + Ord + std::str::FromStr + std::fmt::Display,
{
    let mine: BTreeMap<Id, &R> = records
        .iter()
        .filter(|(_, r)| name_and_project(r).1 == project)
        .map(|(id, r)| (*id, r))
        .collect();
    find_by_id_or_name(&mine, reference, kind, |r| name_and_project(r).0).map(|id| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::testing::*;

    fn in_project(mut v: proto::Volume, project: &str) -> proto::Volume {
        v.project_id = project.into();
        v
    }

    /// Two projects' volumes on n1 (az1) and n2 (az2), a token for each, and a revoked one.
    fn two_projects() -> (Harness, String, String, String) {
        let h = Harness::new();
        h.report(
            "n1",
            "az1",
            vec![
                in_project(volume(1, "a-prod", SIZE), "tenant-a"),
                in_project(volume(3, "b-prod", SIZE), "tenant-b"),
            ],
            vec![],
        );
        h.report(
            "n2",
            "az2",
            vec![
                in_project(volume(2, "a-dr", SIZE), "tenant-a"),
                in_project(volume(4, "b-dr", SIZE), "tenant-b"),
            ],
            vec![],
        );
        let token = |project: &str, name: &str| {
            h.coordinator
                .create_api_token(proto::CreateApiTokenRequest {
                    project_id: project.into(),
                    name: name.into(),
                })
                .unwrap()
                .secret
        };
        let (a, b, revoked) = (
            token("tenant-a", "a"),
            token("tenant-b", "b"),
            token("tenant-a", "old"),
        );
        h.coordinator.revoke_api_token("old").unwrap();
        (h, a, b, revoked)
    }

    async fn call(
        h: &Harness,
        secret: &str,
        project: &str,
        request: Request,
    ) -> Result<Response, ApiError> {
        let answer = h
            .coordinator
            .handle(
                ClusterRequest {
                    request: Some(request),
                    scope: Some(proto::ApiScope {
                        token_sha256: blockrep_api::token::sha256(secret),
                        project_id: project.into(),
                    }),
                    leader_term: 0,
                },
                address("n9"),
            )
            .await;
        match answer.response {
            Some(Response::Error(e)) => Err(e.into()),
            Some(other) => {
                assert_eq!(
                    answer.answered_for_project, project,
                    "answered for its project"
                );
                Ok(other)
            }
            None => panic!("no answer"),
        }
    }

    fn create(volumes: [&str; 2]) -> Request {
        Request::CreatePair(proto::CreatePairRequest {
            name: "web".into(),
            volumes: volumes.iter().map(|v| v.to_string()).collect(),
            priority_station: "az1".into(),
            replication_model: "async".into(),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_token_acts_for_its_project_alone() {
        let (h, a, b, revoked) = two_projects();
        let Response::Created(created) = call(&h, &a, "tenant-a", create(["a-prod", "a-dr"]))
            .await
            .unwrap()
        else {
            panic!("not created")
        };
        let pair = created.pair.unwrap();
        assert_eq!(pair.project_id, "tenant-a");
        assert_eq!(created.job.unwrap().project_id, "tenant-a");
        let commits = h.store.commits();
        let calls = h.agents.calls().len();

        // Another project's token sees nothing of it, by id or name, and cannot act on it.
        for reference in [pair.id.clone(), "web".into()] {
            let refused = call(
                &h,
                &b,
                "tenant-b",
                Request::GetPair(proto::PairRef {
                    pair: reference.clone(),
                }),
            )
            .await
            .unwrap_err();
            assert_eq!(refused.code(), 404, "{refused}");
            let refused = call(
                &h,
                &b,
                "tenant-b",
                Request::DeletePair(proto::PairRef { pair: reference }),
            )
            .await
            .unwrap_err();
            assert_eq!(refused.code(), 404, "{refused}");
        }
        let Response::Pairs(listed) = call(
            &h,
            &b,
            "tenant-b",
            Request::ListPairs(proto::ListPairsRequest {}),
        )
        .await
        .unwrap() else {
            panic!()
        };
        assert!(listed.pairs.is_empty(), "{listed:?}");
        let Response::Jobs(jobs) = call(
            &h,
            &b,
            "tenant-b",
            Request::ListJobs(proto::ListJobsRequest {}),
        )
        .await
        .unwrap() else {
            panic!()
        };
        assert!(jobs.jobs.is_empty());
        // Nor can it pair its volume with another project's.
        let refused = call(&h, &b, "tenant-b", create(["b-prod", "a-dr"]))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), 404, "{refused}");
        assert!(
            refused.to_string().contains("no volume \"a-dr\""),
            "{refused}"
        );

        // Its own project sees it.
        let Response::Pairs(listed) = call(
            &h,
            &a,
            "tenant-a",
            Request::ListPairs(proto::ListPairsRequest {}),
        )
        .await
        .unwrap() else {
            panic!()
        };
        assert_eq!(listed.pairs.len(), 1);

        // A path of another project: 403; a revoked or unknown token: 401.
        let refused = call(
            &h,
            &a,
            "tenant-b",
            Request::ListPairs(proto::ListPairsRequest {}),
        )
        .await
        .unwrap_err();
        assert_eq!(refused.code(), 403, "{refused}");
        for secret in [revoked.as_str(), "brt_nothing"] {
            let refused = call(
                &h,
                secret,
                "tenant-a",
                Request::ListPairs(proto::ListPairsRequest {}),
            )
            .await
            .unwrap_err();
            assert_eq!(refused.code(), 401, "{refused}");
        }
        // Nor may a token make the operator's calls.
        let refused = call(
            &h,
            &a,
            "tenant-a",
            Request::ListApiTokens(proto::ListApiTokensRequest {}),
        )
        .await
        .unwrap_err();
        assert_eq!(refused.code(), 403, "{refused}");
        assert_eq!(h.store.commits(), commits, "no refusal stored anything");
        assert_eq!(h.agents.calls().len(), calls, "nor called an agent");
    }

    #[tokio::test]
    async fn tokens_are_kept_as_hashes_and_survive_a_restart() {
        let (h, a, _, revoked) = two_projects();
        let stored = h.stored().tokens;
        assert_eq!(stored.len(), 3);
        for t in &stored {
            assert_ne!(t.sha256, a);
            assert!(!serde_json::to_string(t).unwrap().contains(&a[4..]));
        }
        let reopened = h.reopen();
        assert!(
            call(
                &reopened,
                &a,
                "tenant-a",
                Request::ListPairs(proto::ListPairsRequest {})
            )
            .await
            .is_ok()
        );
        let refused = call(
            &reopened,
            &revoked,
            "tenant-a",
            Request::ListPairs(proto::ListPairsRequest {}),
        )
        .await
        .unwrap_err();
        assert_eq!(refused.code(), 401);
        // Names are unique; a bad project id is refused.
        let dup = reopened
            .coordinator
            .create_api_token(proto::CreateApiTokenRequest {
                project_id: "tenant-a".into(),
                name: "a".into(),
            })
            .unwrap_err();
        assert_eq!(dup.code(), 409);
        let bad = reopened
            .coordinator
            .create_api_token(proto::CreateApiTokenRequest {
                project_id: "a/b".into(),
                name: String::new(),
            })
            .unwrap_err();
        assert_eq!(bad.code(), 400);
    }

    /// A token makes only the calls the REST API needs: no resolve or verify, no send
    /// limit; a list of too many references is refused before anything is resolved; the
    /// node list shows zones, not hosts.
    #[tokio::test]
    async fn a_token_is_held_to_what_the_rest_api_needs() {
        let (h, a, _, _) = two_projects();
        call(&h, &a, "tenant-a", create(["a-prod", "a-dr"]))
            .await
            .unwrap();
        let commits = h.store.commits();
        for request in [
            Request::ResolvePair(proto::ResolvePairRequest {
                pair: "web".into(),
                keep: "az1".into(),
            }),
            Request::VerifyPair(proto::VerifyPairRequest {
                pair: "web".into(),
                repair: true,
            }),
            Request::UpdatePair(proto::UpdatePairRequest {
                pair: "web".into(),
                max_bytes_per_sec: Some(1 << 20),
                ..Default::default()
            }),
        ] {
            let refused = call(&h, &a, "tenant-a", request).await.unwrap_err();
            assert_eq!(refused.code(), 403, "{refused}");
        }
        let many = Request::CreateGroup(proto::CreateGroupRequest {
            pairs: vec!["web".into(); MAX_REFERENCES + 1],
            ..Default::default()
        });
        assert_eq!(
            call(&h, &a, "tenant-a", many).await.unwrap_err().code(),
            400
        );
        assert_eq!(h.store.commits(), commits);
        let Response::Nodes(nodes) = call(
            &h,
            &a,
            "tenant-a",
            Request::ListNodes(proto::ListNodesRequest {}),
        )
        .await
        .unwrap() else {
            panic!()
        };
        assert!(
            nodes
                .nodes
                .iter()
                .all(|n| n.name.is_empty() && n.address.is_empty())
        );
        let mut zones: Vec<&str> = nodes
            .nodes
            .iter()
            .map(|n| n.availability_zone.as_str())
            .collect();
        zones.sort();
        assert_eq!(zones, ["az1", "az2"]);
    }
}
