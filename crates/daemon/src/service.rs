//! The gRPC control service over the agent.

use std::sync::Arc;

use blockrep_api::ApiError;
use blockrep_api::model::AddVolume;
use blockrep_api::proto::{self, agent_server, cluster_request, cluster_response};
use tonic::{Request, Response, Status};

use crate::agent::{Agent, VolumeView};
use crate::cluster::Cluster;

pub struct AgentService {
    pub agent: Arc<Agent>,
    pub cluster: Option<Arc<Cluster>>,
}

impl AgentService {
    fn to_proto(&self, v: VolumeView) -> proto::Volume {
        crate::agent::volume_proto(&self.agent.config, v)
    }

    /// A cluster call: answered by the coordinator, wherever it runs.
    async fn cluster_call(
        &self,
        request: cluster_request::Request,
    ) -> Result<cluster_response::Response, Status> {
        let Some(cluster) = &self.cluster else {
            return Err(ApiError::FailedPrecondition(
                "this daemon is not in a cluster: add a [cluster] section to its configuration"
                    .into(),
            )
            .into());
        };
        cluster
            .coordinator_call(request)
            .await
            .map_err(Status::from)
    }

    /// A cluster call answered with a group and its job.
    async fn group_job(
        &self,
        request: cluster_request::Request,
    ) -> Result<Response<proto::GroupJobResponse>, Status> {
        match self.cluster_call(request).await? {
            cluster_response::Response::GroupJob(answer) => Ok(Response::new(answer)),
            _ => Err(unexpected()),
        }
    }

    async fn drill_call(
        &self,
        request: cluster_request::Request,
    ) -> Result<Response<proto::Drill>, Status> {
        match self.cluster_call(request).await? {
            cluster_response::Response::Drill(drill) => Ok(Response::new(drill)),
            _ => Err(unexpected()),
        }
    }

    /// Runs blocking agent work (file and device I/O) off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(Arc<Agent>) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, Status> {
        let agent = Arc::clone(&self.agent);
        tokio::task::spawn_blocking(move || work(agent))
            .await
            .map_err(|e| Status::internal(format!("request task failed: {e}")))?
            .map_err(Status::from)
    }
}

impl AgentService {
    fn send_limit(&self) -> proto::SendLimit {
        proto::SendLimit {
            max_bytes_per_sec: self.agent.pairs().send_limit().bytes_per_sec().unwrap_or(0),
        }
    }
}

#[tonic::async_trait]
impl agent_server::Agent for AgentService {
    async fn add_volume(
        &self,
        request: Request<proto::AddVolumeRequest>,
    ) -> Result<Response<proto::Volume>, Status> {
        let req = AddVolume::try_from(request.into_inner())?;
        let view = self.blocking(move |agent| agent.add_volume(req)).await?;
        Ok(Response::new(self.to_proto(view)))
    }

    async fn list_volumes(
        &self,
        _: Request<proto::ListVolumesRequest>,
    ) -> Result<Response<proto::ListVolumesResponse>, Status> {
        let views = self.blocking(|agent| Ok(agent.list())).await?;
        Ok(Response::new(proto::ListVolumesResponse {
            volumes: views.into_iter().map(|v| self.to_proto(v)).collect(),
        }))
    }

    async fn get_volume(
        &self,
        request: Request<proto::VolumeRef>,
    ) -> Result<Response<proto::Volume>, Status> {
        let reference = request.into_inner().volume;
        let view = self.blocking(move |agent| agent.get(&reference)).await?;
        Ok(Response::new(self.to_proto(view)))
    }

    async fn remove_volume(
        &self,
        request: Request<proto::VolumeRef>,
    ) -> Result<Response<proto::RemoveVolumeResponse>, Status> {
        let reference = request.into_inner().volume;
        let id = self
            .blocking(move |agent| agent.remove_volume(&reference))
            .await?;
        Ok(Response::new(proto::RemoveVolumeResponse {
            id: id.to_string(),
        }))
    }

    async fn create_volume(
        &self,
        request: Request<proto::CreateVolumeRequest>,
    ) -> Result<Response<proto::Volume>, Status> {
        let req = request.into_inner();
        let name = blockrep_core::VolumeName::try_from(req.name).map_err(ApiError::BadName)?;
        let project = blockrep_api::model::ProjectId::or_default(req.project_id)?;
        let size = req.size_bytes;
        let view = self
            .blocking(move |agent| agent.create_volume(name, size, project, false))
            .await?;
        Ok(Response::new(self.to_proto(view)))
    }

    async fn delete_volume(
        &self,
        request: Request<proto::VolumeRef>,
    ) -> Result<Response<proto::RemoveVolumeResponse>, Status> {
        let reference = request.into_inner().volume;
        let id = self
            .blocking(move |agent| agent.delete_volume(&reference))
            .await?;
        Ok(Response::new(proto::RemoveVolumeResponse {
            id: id.to_string(),
        }))
    }

    async fn get_dirty_extents(
        &self,
        request: Request<proto::VolumeRef>,
    ) -> Result<Response<proto::DirtyExtents>, Status> {
        let reference = request.into_inner().volume;
        let (id, granularity, runs) = self
            .blocking(move |agent| agent.dirty_extents(&reference))
            .await?;
        Ok(Response::new(proto::DirtyExtents {
            volume_id: id.to_string(),
            dirty_bytes: runs.iter().map(|r| r.len).sum(),
            granularity: granularity as u32,
            extents: runs
                .into_iter()
                .map(|r| proto::Extent {
                    offset: r.offset,
                    length: r.len,
                })
                .collect(),
        }))
    }

    async fn status(
        &self,
        _: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        let views = self.blocking(|agent| Ok(agent.list())).await?;
        let config = &self.agent.config;
        Ok(Response::new(proto::StatusResponse {
            node_name: config.node_name.clone(),
            availability_zone: config.availability_zone.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            volumes: views.into_iter().map(|v| self.to_proto(v)).collect(),
            pairs: crate::pair_proto::pair_states(self.agent.pairs()),
            clustered: self.cluster.is_some(),
            coordinator: self
                .cluster
                .as_ref()
                .is_some_and(|c| c.coordinator().is_some()),
            pool: crate::agent::pool_proto(&self.agent),
            drills: crate::agent::drill_protos(&self.agent),
        }))
    }

    async fn get_send_limit(
        &self,
        _: Request<proto::GetSendLimitRequest>,
    ) -> Result<Response<proto::SendLimit>, Status> {
        Ok(Response::new(self.send_limit()))
    }

    async fn set_send_limit(
        &self,
        request: Request<proto::SendLimit>,
    ) -> Result<Response<proto::SendLimit>, Status> {
        let rate = request.into_inner().max_bytes_per_sec;
        self.agent
            .pairs()
            .send_limit()
            .set((rate > 0).then_some(rate))
            .map_err(Status::invalid_argument)?;
        tracing::info!(max_bytes_per_sec = rate, "send limit changed (0: none)");
        Ok(Response::new(self.send_limit()))
    }

    async fn create_pair(
        &self,
        request: Request<proto::CreatePairRequest>,
    ) -> Result<Response<proto::CreatePairResponse>, Status> {
        match self
            .cluster_call(cluster_request::Request::CreatePair(request.into_inner()))
            .await?
        {
            cluster_response::Response::Created(created) => Ok(Response::new(created)),
            _ => Err(unexpected()),
        }
    }

    async fn list_pairs(
        &self,
        request: Request<proto::ListPairsRequest>,
    ) -> Result<Response<proto::ListPairsResponse>, Status> {
        match self
            .cluster_call(cluster_request::Request::ListPairs(request.into_inner()))
            .await?
        {
            cluster_response::Response::Pairs(pairs) => Ok(Response::new(pairs)),
            _ => Err(unexpected()),
        }
    }

    async fn get_pair(
        &self,
        request: Request<proto::PairRef>,
    ) -> Result<Response<proto::Pair>, Status> {
        match self
            .cluster_call(cluster_request::Request::GetPair(request.into_inner()))
            .await?
        {
            cluster_response::Response::Pair(pair) => Ok(Response::new(pair)),
            _ => Err(unexpected()),
        }
    }

    async fn delete_pair(
        &self,
        request: Request<proto::PairRef>,
    ) -> Result<Response<proto::DeletePairResponse>, Status> {
        match self
            .cluster_call(cluster_request::Request::DeletePair(request.into_inner()))
            .await?
        {
            cluster_response::Response::Deleted(deleted) => Ok(Response::new(deleted)),
            _ => Err(unexpected()),
        }
    }

    async fn create_group(
        &self,
        request: Request<proto::CreateGroupRequest>,
    ) -> Result<Response<proto::GroupJobResponse>, Status> {
        self.group_job(cluster_request::Request::CreateGroup(request.into_inner()))
            .await
    }

    async fn list_groups(
        &self,
        request: Request<proto::ListGroupsRequest>,
    ) -> Result<Response<proto::ListGroupsResponse>, Status> {
        match self
            .cluster_call(cluster_request::Request::ListGroups(request.into_inner()))
            .await?
        {
            cluster_response::Response::Groups(groups) => Ok(Response::new(groups)),
            _ => Err(unexpected()),
        }
    }

    async fn get_group(
        &self,
        request: Request<proto::GroupRef>,
    ) -> Result<Response<proto::Group>, Status> {
        match self
            .cluster_call(cluster_request::Request::GetGroup(request.into_inner()))
            .await?
        {
            cluster_response::Response::Group(group) => Ok(Response::new(group)),
            _ => Err(unexpected()),
        }
    }

    async fn group_points(
        &self,
        request: Request<proto::GroupRef>,
    ) -> Result<Response<proto::GroupPointsResponse>, Status> {
        match self
            .cluster_call(cluster_request::Request::GroupPoints(request.into_inner()))
            .await?
        {
            cluster_response::Response::GroupPoints(points) => Ok(Response::new(points)),
            _ => Err(unexpected()),
        }
    }

    async fn update_group(
        &self,
        request: Request<proto::UpdateGroupRequest>,
    ) -> Result<Response<proto::GroupJobResponse>, Status> {
        self.group_job(cluster_request::Request::UpdateGroup(request.into_inner()))
            .await
    }

    async fn delete_group(
        &self,
        request: Request<proto::GroupRef>,
    ) -> Result<Response<proto::GroupJobResponse>, Status> {
        self.group_job(cluster_request::Request::DeleteGroup(request.into_inner()))
            .await
    }

    async fn sync_group(
        &self,
        request: Request<proto::GroupRef>,
    ) -> Result<Response<proto::GroupJobResponse>, Status> {
        self.group_job(cluster_request::Request::SyncGroup(request.into_inner()))
            .await
    }

    async fn stop_group(
        &self,
        request: Request<proto::GroupRef>,
    ) -> Result<Response<proto::GroupJobResponse>, Status> {
        self.group_job(cluster_request::Request::StopGroup(request.into_inner()))
            .await
    }

    async fn failover_group(
        &self,
        request: Request<proto::GroupRef>,
    ) -> Result<Response<proto::GroupJobResponse>, Status> {
        self.group_job(cluster_request::Request::FailoverGroup(
            request.into_inner(),
        ))
        .await
    }

    async fn create_drill(
        &self,
        request: Request<proto::CreateDrillRequest>,
    ) -> Result<Response<proto::Drill>, Status> {
        self.drill_call(cluster_request::Request::CreateGroupDrill(
            request.into_inner(),
        ))
        .await
    }

    async fn list_drills(
        &self,
        request: Request<proto::ListDrillsRequest>,
    ) -> Result<Response<proto::ListDrillsResponse>, Status> {
        match self
            .cluster_call(cluster_request::Request::ListDrills(request.into_inner()))
            .await?
        {
            cluster_response::Response::Drills(drills) => Ok(Response::new(drills)),
            _ => Err(unexpected()),
        }
    }

    async fn get_drill(
        &self,
        request: Request<proto::DrillRef>,
    ) -> Result<Response<proto::Drill>, Status> {
        self.drill_call(cluster_request::Request::GetDrill(request.into_inner()))
            .await
    }

    async fn delete_drill(
        &self,
        request: Request<proto::DrillRef>,
    ) -> Result<Response<proto::Drill>, Status> {
        self.drill_call(cluster_request::Request::DeleteGroupDrill(
            request.into_inner(),
        ))
        .await
    }

    async fn verify_drill(
        &self,
        request: Request<proto::VerifyDrillRequest>,
    ) -> Result<Response<proto::DrillVerification>, Status> {
        match self
            .cluster_call(cluster_request::Request::VerifyGroupDrill(
                request.into_inner(),
            ))
            .await?
        {
            cluster_response::Response::DrillVerification(v) => Ok(Response::new(v)),
            _ => Err(unexpected()),
        }
    }

    async fn failover_group_to_point(
        &self,
        request: Request<proto::FailoverGroupRequest>,
    ) -> Result<Response<proto::GroupJobResponse>, Status> {
        self.group_job(cluster_request::Request::FailoverGroupToPoint(
            request.into_inner(),
        ))
        .await
    }

    async fn reverse_group(
        &self,
        request: Request<proto::GroupRef>,
    ) -> Result<Response<proto::GroupJobResponse>, Status> {
        self.group_job(cluster_request::Request::ReverseGroup(request.into_inner()))
            .await
    }

    async fn reprotect_group(
        &self,
        request: Request<proto::GroupRef>,
    ) -> Result<Response<proto::GroupJobResponse>, Status> {
        self.group_job(cluster_request::Request::ReprotectGroup(
            request.into_inner(),
        ))
        .await
    }

    async fn extend_group(
        &self,
        request: Request<proto::ExtendGroupRequest>,
    ) -> Result<Response<proto::GroupJobResponse>, Status> {
        self.group_job(cluster_request::Request::ExtendGroup(request.into_inner()))
            .await
    }

    async fn add_group_pair(
        &self,
        request: Request<proto::AddGroupPairRequest>,
    ) -> Result<Response<proto::GroupJobResponse>, Status> {
        self.group_job(cluster_request::Request::AddGroupPair(request.into_inner()))
            .await
    }

    async fn remove_group_pair(
        &self,
        request: Request<proto::RemoveGroupPairRequest>,
    ) -> Result<Response<proto::GroupJobResponse>, Status> {
        self.group_job(cluster_request::Request::RemoveGroupPair(
            request.into_inner(),
        ))
        .await
    }

    async fn resolve_pair(
        &self,
        request: Request<proto::ResolvePairRequest>,
    ) -> Result<Response<proto::PairJobResponse>, Status> {
        match self
            .cluster_call(cluster_request::Request::ResolvePair(request.into_inner()))
            .await?
        {
            cluster_response::Response::PairJob(answer) => Ok(Response::new(answer)),
            _ => Err(unexpected()),
        }
    }

    async fn update_pair(
        &self,
        request: Request<proto::UpdatePairRequest>,
    ) -> Result<Response<proto::Pair>, Status> {
        match self
            .cluster_call(cluster_request::Request::UpdatePair(request.into_inner()))
            .await?
        {
            cluster_response::Response::Pair(pair) => Ok(Response::new(pair)),
            _ => Err(unexpected()),
        }
    }

    async fn verify_pair(
        &self,
        request: Request<proto::VerifyPairRequest>,
    ) -> Result<Response<proto::PairJobResponse>, Status> {
        match self
            .cluster_call(cluster_request::Request::VerifyPair(request.into_inner()))
            .await?
        {
            cluster_response::Response::PairJob(answer) => Ok(Response::new(answer)),
            _ => Err(unexpected()),
        }
    }

    async fn get_job(
        &self,
        request: Request<proto::JobRef>,
    ) -> Result<Response<proto::Job>, Status> {
        match self
            .cluster_call(cluster_request::Request::GetJob(request.into_inner()))
            .await?
        {
            cluster_response::Response::Job(job) => Ok(Response::new(job)),
            _ => Err(unexpected()),
        }
    }

    async fn list_jobs(
        &self,
        request: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        match self
            .cluster_call(cluster_request::Request::ListJobs(request.into_inner()))
            .await?
        {
            cluster_response::Response::Jobs(jobs) => Ok(Response::new(jobs)),
            _ => Err(unexpected()),
        }
    }

    async fn list_nodes(
        &self,
        request: Request<proto::ListNodesRequest>,
    ) -> Result<Response<proto::ListNodesResponse>, Status> {
        match self
            .cluster_call(cluster_request::Request::ListNodes(request.into_inner()))
            .await?
        {
            cluster_response::Response::Nodes(nodes) => Ok(Response::new(nodes)),
            _ => Err(unexpected()),
        }
    }

    async fn create_api_token(
        &self,
        request: Request<proto::CreateApiTokenRequest>,
    ) -> Result<Response<proto::CreatedApiToken>, Status> {
        match self
            .cluster_call(cluster_request::Request::CreateApiToken(
                request.into_inner(),
            ))
            .await?
        {
            cluster_response::Response::CreatedApiToken(created) => Ok(Response::new(created)),
            _ => Err(unexpected()),
        }
    }

    async fn list_api_tokens(
        &self,
        request: Request<proto::ListApiTokensRequest>,
    ) -> Result<Response<proto::ListApiTokensResponse>, Status> {
        match self
            .cluster_call(cluster_request::Request::ListApiTokens(
                request.into_inner(),
            ))
            .await?
        {
            cluster_response::Response::ApiTokens(tokens) => Ok(Response::new(tokens)),
            _ => Err(unexpected()),
        }
    }

    async fn revoke_api_token(
        &self,
        request: Request<proto::ApiTokenRef>,
    ) -> Result<Response<proto::ApiToken>, Status> {
        match self
            .cluster_call(cluster_request::Request::RevokeApiToken(
                request.into_inner(),
            ))
            .await?
        {
            cluster_response::Response::ApiToken(token) => Ok(Response::new(token)),
            _ => Err(unexpected()),
        }
    }
}

fn unexpected() -> Status {
    Status::internal("the coordinator answered with something unexpected")
}
