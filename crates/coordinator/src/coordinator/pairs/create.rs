//! A pair's creation: the request checked against the seed's rules and the cluster's state
//! ([`Coordinator::plan_pair`]), the pair recorded, then its DR agent asked to take its role
//! (the driver takes the production side's step).

use super::*;

impl Coordinator {
    pub async fn create_pair(
        &self,
        req: proto::CreatePairRequest,
    ) -> Result<proto::CreatePairResponse, ApiError> {
        let plan = self.plan_pair(&req)?;
        // Its volumes are claimed from the check until the pair is in the records (or the
        // creation gave up): a second create of one of them is refused meanwhile.
        let mut claim = Claim {
            coordinator: self,
            volumes: plan.claimed.clone(),
            recorded: None,
        };
        let job = JobRecord::running(JobType::CreatePair, JobAbout::Pair(&plan.record));
        let assignment = plan.assignment(Side::Dr);
        let mut record = plan.record;
        record.job = Some(job.id);
        // Recorded before any agent acts: a crash after the DR agent took its role leaves a
        // record the driver completes (it asks again; taking a role is idempotent), never a
        // DR role nobody knows.
        self.commit(&[Change::PutPair(record.clone()), Change::PutJob(job.clone())])?;
        claim.recorded = Some((record.clone(), job.clone()));
        fault::crash_at("pair recorded");
        // The DR agent takes its role first: it refuses if the DR volume has clients, and
        // then nothing is created.
        let asked = self
            .agents
            .call(
                &record.dr_node,
                plan.dr_address,
                self.command(Request::BecomeDr(assignment)),
            )
            .await;
        match asked.map(|answer| Self::answer_of(&record.dr_node, answer)) {
            Ok(Ok(())) => {
                fault::crash_at("DR role taken");
                record.dr_started = true;
                if let Err(e) = self.commit(&[Change::PutPair(record.clone())]) {
                    // The record says the DR agent was not asked yet: the driver asks again.
                    tracing::warn!(pair = %record.id, error = %e, "cannot record the DR agent's step; the driver repeats it");
                    record.dr_started = false;
                }
            }
            Ok(Err(refused)) => {
                claim.recorded = None;
                let forgotten = self.commit(&[
                    Change::DeletePair(record.id.to_string()),
                    Change::DeleteJob(job.id.to_string()),
                ]);
                if let Err(store) = forgotten {
                    // Left for the driver, which asks the DR agent again.
                    tracing::error!(pair = %record.id, error = %store, "cannot forget a pair its DR agent refused; the driver retries it");
                    let mut state = self.lock();
                    state.pairs.insert(record.id, record);
                    state.jobs.insert(job.id, job);
                }
                return Err(refused);
            }
            // No answer: the DR agent may have taken its role all the same. The record stays
            // (creating, its job running) and the driver asks again, as after a crash here,
            // until the agent answers or the job fails after AGENT_GIVE_UP. Forgetting it
            // could leave a DR role nobody knows.
            Err(unanswered) => {
                tracing::warn!(pair = %record.id, error = %unanswered, "the DR agent did not answer; the driver asks it again");
            }
        }
        tracing::info!(pair = %record.id, name = %record.name, model = %record.model, "pair created");
        claim.recorded = None;
        let mut state = self.lock();
        state.pairs.insert(record.id, record.clone());
        state.jobs.insert(job.id, job.clone());
        self.kick.notify_one();
        Ok(proto::CreatePairResponse {
            pair: Some(self.pair_view(&state, &record)),
            job: Some(job_view(&job)),
        })
    }

    /// Checks a create request against the seed's rules and the cluster's state.
    fn plan_pair(&self, req: &proto::CreatePairRequest) -> Result<PairPlan, ApiError> {
        if req.name.len() > MAX_TEXT_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "name is {} bytes; the limit is {MAX_TEXT_BYTES}",
                req.name.len()
            )));
        }
        if req.description.len() > MAX_TEXT_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "description is {} bytes; the limit is {MAX_TEXT_BYTES}",
                req.description.len()
            )));
        }
        let model: ReplicationModel = req.replication_model.parse().map_err(
            |e: blockrep_core::replication::UnknownValue| {
                ApiError::InvalidArgument(format!("replication_model: {e}"))
            },
        )?;
        if req.volumes.len() != 2 {
            return Err(ApiError::InvalidArgument(format!(
                "a pair needs exactly two volumes (production, then DR); {} given",
                req.volumes.len()
            )));
        }
        let mut state = self.lock();
        let production = self.find_volume(&state, &req.volumes[0])?;
        let dr = self.find_volume(&state, &req.volumes[1])?;
        if production.volume.id == dr.volume.id {
            return Err(ApiError::InvalidArgument(
                "the production and DR volumes are the same volume".into(),
            ));
        }
        let project = volume_project(&production.volume);
        if project != volume_project(&dr.volume) {
            return Err(ApiError::InvalidArgument(format!(
                "volume {} belongs to project {project} and volume {} to project {}; a pair's volumes share one project",
                production.volume.name,
                dr.volume.name,
                volume_project(&dr.volume)
            )));
        }
        if production.az == dr.az {
            return Err(ApiError::InvalidArgument(format!(
                "both volumes are in availability zone {}; a pair needs two zones",
                production.az
            )));
        }
        if production.volume.size_bytes != dr.volume.size_bytes {
            return Err(ApiError::InvalidArgument(format!(
                "volume sizes differ: {} is {} bytes, {} is {} bytes",
                production.volume.name,
                production.volume.size_bytes,
                dr.volume.name,
                dr.volume.size_bytes
            )));
        }
        if req.priority_station != production.az {
            return Err(ApiError::InvalidArgument(format!(
                "priority_station {:?} is not the production volume's availability zone {}",
                req.priority_station, production.az
            )));
        }
        for v in [&production, &dr] {
            if state.claimed.contains(&v.volume.id) {
                return Err(ApiError::FailedPrecondition(format!(
                    "volume {} is already in a pair being created",
                    v.volume.name
                )));
            }
            if let Some(p) = state.pairs.values().find(|p| {
                p.production_volume.to_string() == v.volume.id
                    || p.dr_volume.to_string() == v.volume.id
            }) {
                return Err(ApiError::FailedPrecondition(format!(
                    "volume {} is already in pair {} ({})",
                    v.volume.name, p.id, p.name
                )));
            }
            let deleted_lately = v
                .volume
                .pair_id
                .parse::<PairId>()
                .is_ok_and(|id| state.deleted.contains_key(&id));
            if !v.volume.pair_id.is_empty() && !deleted_lately {
                return Err(ApiError::FailedPrecondition(format!(
                    "volume {} is already in pair {} (its agent says so)",
                    v.volume.name, v.volume.pair_id
                )));
            }
            if !v.alive {
                return Err(ApiError::FailedPrecondition(format!(
                    "node {} of volume {} is not reachable",
                    v.node, v.volume.name
                )));
            }
        }
        if dr.volume.connected_clients > 0 {
            return Err(ApiError::FailedPrecondition(format!(
                "DR volume {} has {} connected NBD client(s); disconnect them first",
                dr.volume.name, dr.volume.connected_clients
            )));
        }
        let parse_id = |id: &str| {
            id.parse::<VolumeId>()
                .map_err(|e| ApiError::Internal(format!("volume id {id}: {e}")))
        };
        let record = PairRecord {
            id: PairId::random(),
            name: req.name.clone(),
            description: req.description.clone(),
            status: PairStatus::Creating,
            model,
            production_volume: parse_id(&production.volume.id)?,
            dr_volume: parse_id(&dr.volume.id)?,
            production_node: production.node.clone(),
            dr_node: dr.node.clone(),
            priority_station: req.priority_station.clone(),
            size: production.volume.size_bytes,
            created_at: now_text(),
            updated_at: None,
            dr_started: false,
            production_started: false,
            failure_detail: None,
            max_bytes_per_sec: None,
            job: None,
            pending: None,
            group: None,
            term: 0,
            generation: None,
            project: project.to_owned(),
        };
        let claimed = [production.volume.id.clone(), dr.volume.id.clone()];
        state.claimed.extend(claimed.iter().cloned());
        let plan = PairPlan {
            production_address: production.address,
            dr_address: dr.address,
            record,
            claimed,
        };
        Ok(plan)
    }

    /// A volume by id, or by a name unique in the cluster.
    pub(in crate::coordinator) fn find_volume(
        &self,
        state: &State,
        reference: &str,
    ) -> Result<FoundVolume, ApiError> {
        let mut found = Vec::new();
        for node in state.nodes.values() {
            for v in &node.report.volumes {
                if v.id == reference || v.name == reference {
                    found.push(FoundVolume {
                        volume: v.clone(),
                        node: node.record.name.clone(),
                        az: node.record.availability_zone.clone(),
                        address: node.record.address,
                        alive: self.alive(node),
                    });
                }
            }
        }
        match found.len() {
            0 => Err(ApiError::NotFound(format!(
                "no volume {reference:?} on any node of the cluster (give a volume id, or a name unique in the cluster)"
            ))),
            1 => Ok(found.pop().expect("one")),
            n => Err(ApiError::InvalidArgument(format!(
                "{n} volumes are named {reference:?}; give the volume id"
            ))),
        }
    }
}

/// The project a volume belongs to, as its agent reports it (agents from before projects
/// report none: the default one).
pub(in crate::coordinator) fn volume_project(v: &proto::Volume) -> &str {
    if v.project_id.is_empty() {
        blockrep_api::model::ProjectId::DEFAULT
    } else {
        &v.project_id
    }
}

pub(in crate::coordinator) struct FoundVolume {
    pub volume: proto::Volume,
    pub node: String,
    pub az: String,
    pub address: SocketAddr,
    pub alive: bool,
}

/// Volumes a creation claimed (`plan_pair`), given back when the creation ends: by then
/// the pair is in the records, or it was not created.
/// A creation that stopped half way (its caller went away while the DR agent was asked)
/// leaves its pair `recorded`: it joins the records as after a coordinator restart, and the
/// driver completes it.
struct Claim<'a> {
    coordinator: &'a Coordinator,
    volumes: [String; 2],
    recorded: Option<(PairRecord, JobRecord)>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut state = self.coordinator.lock();
        if let Some((pair, job)) = self.recorded.take() {
            state.pairs.insert(pair.id, pair);
            state.jobs.insert(job.id, job);
            self.coordinator.kick.notify_one();
        }
        for v in &self.volumes {
            state.claimed.remove(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::testing::*;

    /// n1 and n3 in az1, n2 and n4 (down) in az2, with volumes for every rule.
    fn cluster() -> Harness {
        let h = Harness::new();
        let mut taken = volume(5, "taken", SIZE);
        taken.pair_id = PairId::from_bytes([9; 16]).to_string();
        let mut busy = volume(7, "busy", SIZE);
        busy.connected_clients = 1;
        h.report(
            "n1",
            "az1",
            vec![
                volume(1, "p1", SIZE),
                volume(3, "p2", SIZE),
                volume(9, "dup", SIZE),
            ],
            vec![],
        );
        h.report(
            "n2",
            "az2",
            vec![
                volume(2, "d1", SIZE),
                volume(4, "big", 2 * SIZE),
                taken,
                busy,
                volume(10, "dup", SIZE),
            ],
            vec![],
        );
        h.report("n3", "az1", vec![volume(6, "a1", SIZE)], vec![]);
        h.report("n4", "az2", vec![volume(8, "far", SIZE)], vec![]);
        h.heard_from("n4", NODE_TIMEOUT);
        assert_eq!(h.store.commits(), 4, "the nodes registered");
        h
    }

    fn request(name: &str, volumes: &[&str]) -> proto::CreatePairRequest {
        proto::CreatePairRequest {
            name: name.into(),
            description: String::new(),
            volumes: volumes.iter().map(|v| v.to_string()).collect(),
            priority_station: "az1".into(),
            replication_model: "async".into(),
        }
    }

    #[tokio::test]
    async fn a_refused_creation_stores_nothing_and_calls_no_agent() {
        let h = cluster();
        let with = |f: fn(&mut proto::CreatePairRequest)| {
            let mut r = request("pair", &["p1", "d1"]);
            f(&mut r);
            r
        };
        let cases: Vec<(&str, proto::CreatePairRequest, u32, &str)> = vec![
            (
                "no such volume",
                request("pair", &["p1", "nope"]),
                404,
                "no volume \"nope\"",
            ),
            (
                "ambiguous name",
                request("pair", &["dup", "d1"]),
                400,
                "2 volumes are named",
            ),
            (
                "one volume twice",
                request("pair", &["p1", "p1"]),
                400,
                "the same volume",
            ),
            (
                "one zone",
                request("pair", &["p1", "a1"]),
                400,
                "both volumes are in availability zone az1",
            ),
            (
                "sizes differ",
                request("pair", &["p1", "big"]),
                400,
                "volume sizes differ",
            ),
            (
                "in a pair, its agent says",
                request("pair", &["p1", "taken"]),
                409,
                "its agent says so",
            ),
            (
                "DR node down",
                request("pair", &["p1", "far"]),
                409,
                "node n4 of volume far is not reachable",
            ),
            (
                "DR volume in use",
                request("pair", &["p1", "busy"]),
                409,
                "connected NBD client",
            ),
            (
                "one volume",
                request("pair", &["p1"]),
                400,
                "exactly two volumes",
            ),
            (
                "priority station",
                with(|r| r.priority_station = "az2".into()),
                400,
                "priority_station",
            ),
            (
                "model",
                with(|r| r.replication_model = "sync".into()),
                400,
                "replication_model",
            ),
            (
                "long name",
                with(|r| r.name = "x".repeat(256)),
                400,
                "name is 256 bytes",
            ),
        ];
        for (case, req, code, words) in cases {
            let refused = h.coordinator.create_pair(req).await;
            assert!(refused.is_err(), "{case}: {refused:?}");
            h.assert_refused(refused, code, words, 4);
        }
        assert!(h.coordinator.list_pairs().is_empty());
        assert!(h.coordinator.list_jobs().is_empty());
        assert!(h.stored().pairs.is_empty() && h.stored().jobs.is_empty());
    }

    /// Two creates naming the same volume at once: the second is refused while the first
    /// waits for its DR agent (each used to check the pairs before either was recorded).
    #[tokio::test]
    async fn two_creates_of_one_volume_at_once_make_one_pair() {
        let h = cluster();
        let agent = Arc::new(tokio::sync::Notify::new());
        h.agents
            .always("BecomeDr", Answer::Wait(Arc::clone(&agent)));
        let first = h.coordinator.create_pair(request("one", &["p1", "d1"]));
        let second = async {
            tokio::task::yield_now().await;
            let second = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                h.coordinator.create_pair(request("two", &["p1", "d1"])),
            )
            .await;
            agent.notify_waiters();
            second
        };
        let (first, second) = tokio::join!(first, second);
        first.expect("the first create goes through");
        let refused = second
            .expect("the second create was answered at once")
            .expect_err("the second create is refused");
        assert!(
            refused
                .to_string()
                .contains("is already in a pair being created"),
            "{refused}"
        );
        assert_eq!(h.stored().pairs.len(), 1);
    }

    /// A create whose caller goes away while the DR agent is asked leaves its pair in the
    /// records (the driver completes it): its volumes stay taken.
    #[tokio::test]
    async fn a_create_abandoned_while_its_agent_is_asked_keeps_its_volumes() {
        let h = cluster();
        let agent = Arc::new(tokio::sync::Notify::new());
        h.agents.once("BecomeDr", Answer::Wait(Arc::clone(&agent)));
        let abandoned = tokio::time::timeout(
            std::time::Duration::from_millis(10),
            h.coordinator.create_pair(request("one", &["p1", "d1"])),
        )
        .await;
        assert!(abandoned.is_err(), "the create waited for its agent");
        let refused = h
            .coordinator
            .create_pair(request("two", &["p1", "d1"]))
            .await
            .expect_err("the volumes are taken");
        assert!(
            refused.to_string().contains("is already in pair"),
            "{refused}"
        );
        assert_eq!(h.coordinator.list_pairs().len(), 1);
    }

    #[tokio::test]
    async fn a_volume_already_in_a_pair_is_refused() {
        let h = cluster();
        let created = h
            .coordinator
            .create_pair(request("first", &["p1", "d1"]))
            .await
            .unwrap();
        let commits = h.store.commits();
        assert_eq!(h.agents.log(), ["n2:BecomeDr"]);
        for volumes in [["p2", "d1"], ["p1", "taken"]] {
            let refused = h.coordinator.create_pair(request("second", &volumes)).await;
            let error = refused.unwrap_err();
            assert_eq!(error.code(), 409, "{error}");
            assert!(error.to_string().contains("is already in pair"), "{error}");
        }
        assert_eq!(h.store.commits(), commits);
        assert_eq!(h.agents.log(), ["n2:BecomeDr"]);
        let pairs = h.coordinator.list_pairs();
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].id, created.pair.unwrap().id);
    }

    #[tokio::test]
    async fn a_created_pair_is_recorded_and_a_restarted_coordinator_lists_it() {
        let h = cluster();
        let created = h
            .coordinator
            .create_pair(request("web", &["p1", "d1"]))
            .await
            .unwrap();
        let view = created.pair.unwrap();
        let job = created.job.unwrap();
        assert_eq!(view.status, "creating");
        assert_eq!(job.status, JobStatus::Running.to_string());

        // Only the DR agent was asked, with its side of the pair.
        let calls = h.agents.calls();
        assert_eq!(calls.len(), 1, "{:?}", h.agents.log());
        assert_eq!(
            (calls[0].node.as_str(), calls[0].address),
            ("n2", address("n2"))
        );
        let Request::BecomeDr(assignment) = &calls[0].request else {
            panic!("{:?}", calls[0].request);
        };
        assert_eq!(assignment.pair_id, view.id);
        assert_eq!(assignment.side, "dr");
        assert_eq!(assignment.local_volume_id, volume_id(2).to_string());
        assert_eq!(assignment.peer_volume_id, volume_id(1).to_string());
        assert_eq!(assignment.peer_node, "n1");
        assert_eq!(assignment.peer_address, address("n1").to_string());
        assert_eq!(assignment.size_bytes, SIZE);

        // Recorded before the DR agent was asked, then its step: two commits.
        assert_eq!(h.store.commits(), 4 + 2);
        let stored = h.stored();
        assert_eq!(stored.pairs.len(), 1);
        let record = &stored.pairs[0];
        assert_eq!(record.id.to_string(), view.id);
        assert!(record.dr_started && !record.production_started);
        assert_eq!(record.status, PairStatus::Creating);
        assert_eq!(record.job.map(|j| j.to_string()), Some(job.id.clone()));

        let reopened = h.reopen();
        let listed = reopened.coordinator.list_pairs();
        let before = h.coordinator.list_pairs();
        assert_eq!(listed.len(), 1);
        for (after, before) in listed.iter().zip(&before) {
            assert_eq!(after.id, before.id);
            assert_eq!(after.name, "web");
            assert_eq!(after.status, before.status);
            assert_eq!(after.volume_ids, before.volume_ids);
            assert_eq!(
                after.volume_ids,
                [volume_id(1).to_string(), volume_id(2).to_string()]
            );
            assert_eq!(after.production_node, "n1");
            assert_eq!(after.dr_node, "n2");
            assert_eq!(after.priority_station, "az1");
            assert_eq!(after.replication_model, "async");
            assert_eq!(after.created_at, before.created_at);
        }
        let jobs = reopened.coordinator.list_jobs();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].id, job.id);
        assert_eq!(jobs[0].job_type, JobType::CreatePair.to_string());
        assert_eq!(jobs[0].pair_id, view.id);
        assert!(reopened.agents.calls().is_empty(), "opening calls no agent");
    }

    #[tokio::test]
    async fn a_pair_its_dr_agent_refuses_is_forgotten() {
        let h = cluster();
        h.agents
            .once("BecomeDr", Answer::Refuse(409, "DR volume d1 has clients"));
        let refused = h
            .coordinator
            .create_pair(request("web", &["p1", "d1"]))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), 409);
        assert!(refused.to_string().contains("has clients"), "{refused}");
        assert_eq!(h.agents.log(), ["n2:BecomeDr"]);
        // Recorded, then forgotten: nothing is left in the store or in memory.
        assert_eq!(h.store.commits(), 4 + 2);
        assert!(h.stored().pairs.is_empty() && h.stored().jobs.is_empty());
        assert!(h.coordinator.list_pairs().is_empty());
        assert!(h.coordinator.list_jobs().is_empty());
    }
}
