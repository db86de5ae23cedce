//! Nodes in the coordinator: each agent's report registers it (the first time, or when it
//! moved) and says it is alive; a node not heard from for [`NODE_TIMEOUT`] is down. A
//! report is answered with the pairs the records give the node, and its side in each.

use super::*;

impl Coordinator {
    /// An HA leader's first act, before its driver and cut loops start: tells every
    /// registered node its term, all at once, waiting at most `patience`. A node that took
    /// it refuses the commands of every older leader from then on. Answers the nodes that
    /// did not (down or unreachable): they take the term with the first command of it they
    /// receive.
    pub async fn adopt_term(&self, patience: Duration) -> Vec<String> {
        let nodes: Vec<String> = self.lock().nodes.keys().cloned().collect();
        let mut calls = tokio::task::JoinSet::new();
        for node in &nodes {
            let call = self.ask_agent(node, Request::AdoptTerm(proto::AdoptTerm {}));
            let node = node.clone();
            calls.spawn(async move { (node, call.await) });
        }
        let mut unreached: std::collections::BTreeSet<String> = nodes.into_iter().collect();
        let deadline = tokio::time::Instant::now() + patience;
        while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, calls.join_next()).await {
            match joined {
                Ok((node, Ok(_))) => {
                    unreached.remove(&node);
                }
                Ok((node, Err(e))) => {
                    tracing::warn!(node, term = self.term, error = %e, "a node did not take the new leader's term");
                }
                Err(_) => {}
            }
        }
        calls.abort_all();
        unreached.into_iter().collect()
    }

    /// A node's heartbeat: registers it (first time, or moved) and records what it
    /// reported. Answers with the pairs the coordinator knows the node is in.
    /// A report's answer gives roles from the records in memory, and a production role lets
    /// a restarted production side take writes: it is given only if the store says this
    /// coordinator still leads (otherwise the answer goes without it; the side waits for the
    /// next). (An answer checked so is as if it was delivered before any
    /// later leader took over: the node takes a newer term's commands only after it.)
    pub(super) fn answer_while_leading(&self, mut ack: proto::ReportAck) -> proto::ReportAck {
        if ack.roles.iter().any(|r| r.side == "production")
            && let Err(e) = self.store.check_leading()
        {
            tracing::debug!(error = %e, "a report answered without production roles: this coordinator may no longer lead");
            ack.roles.retain(|r| r.side != "production");
        }
        ack
    }

    pub fn report(
        &self,
        report: proto::NodeReport,
        peer: SocketAddr,
    ) -> Result<proto::ReportAck, ApiError> {
        let mut state = self.lock();
        let changed = match state.nodes.get(&report.node) {
            Some(node) => {
                node.record.address != peer
                    || node.record.availability_zone != report.availability_zone
            }
            None => true,
        };
        if changed {
            let record = NodeRecord {
                name: report.node.clone(),
                availability_zone: report.availability_zone.clone(),
                address: peer,
                registered_at: now_text(),
            };
            let (name, az) = (record.name.clone(), record.availability_zone.clone());
            self.commit_into(&mut state, &[Change::PutNode(record)])?;
            tracing::info!(node = %name, %az, address = %peer, "node registered");
        }
        let name = report.node.clone();
        if report.pairs.iter().any(|p| p.trip_wanted) {
            // Its writes wait for the trip cut.
            self.cut_kick.notify_one();
        }
        let node = state.nodes.get_mut(&name).expect("inserted above");
        node.last_seen = Some(self.now());
        node.report = report;
        let pair_ids = state
            .pairs
            .values()
            .filter(|p| p.production_node == name || p.dr_node == name)
            .map(|p| p.id.to_string())
            .collect();
        Ok(proto::ReportAck {
            pair_ids,
            roles: Self::roles_of(&state, &name),
            leader_term: self.term,
        })
    }

    pub(super) fn alive(&self, node: &Node) -> bool {
        node.last_seen
            .is_some_and(|seen| self.since(seen) < NODE_TIMEOUT)
    }

    pub fn list_nodes(&self) -> Vec<proto::Node> {
        let state = self.lock();
        state
            .nodes
            .values()
            .map(|n| proto::Node {
                name: n.record.name.clone(),
                availability_zone: n.record.availability_zone.clone(),
                address: n.record.address.to_string(),
                alive: self.alive(n),
                last_seen: n
                    .last_seen
                    .map(|seen| format!("{:.1} s ago", self.since(seen).as_secs_f64()))
                    .unwrap_or_else(|| "not since the coordinator started".into()),
                volumes: n.report.volumes.len() as u32,
                coordinator: n.record.name == self.node,
                coordinator_role: if n.record.name == self.node {
                    "leader".into()
                } else if n.report.coordinator_candidate {
                    "candidate".into()
                } else {
                    String::new()
                },
                peers_refused: n.report.peers_refused,
                requests_refused: n.report.requests_refused,
                pool: n.report.pool,
            })
            .collect()
    }

    /// The sides the records give `node` in its pairs, for its report's answer: a
    /// production side that restarted takes writes once confirmed, and one whose group
    /// failed over is demoted. Pairs of a group whose roles are changing are left out.
    pub(super) fn roles_of(state: &State, node: &str) -> Vec<proto::PairRole> {
        state
            .pairs
            .values()
            .filter(|p| p.production_node == node || p.dr_node == node)
            .filter(|p| {
                p.group
                    .and_then(|g| state.groups.get(&g))
                    .is_none_or(|g| g.operation.is_none())
            })
            .map(|p| proto::PairRole {
                pair_id: p.id.to_string(),
                side: if p.production_node == node {
                    "production".into()
                } else {
                    "dr".into()
                },
                term: p.term,
                max_bytes_per_sec: p.max_bytes_per_sec.unwrap_or(0),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use blockrep_core::replication::GroupId;

    use super::*;
    use crate::coordinator::testing::*;
    use crate::records::{ExtendPlan, GroupOperation};

    #[test]
    fn a_reporting_node_is_alive_until_it_is_silent_for_node_timeout() {
        let h = Harness::new();
        h.report("n2", "az2", vec![volume(1, "v1", SIZE)], vec![]);
        let nodes = h.coordinator.list_nodes();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].name, "n2");
        assert_eq!(nodes[0].availability_zone, "az2");
        assert_eq!(nodes[0].address, address("n2").to_string());
        assert_eq!(nodes[0].volumes, 1);
        assert!(nodes[0].alive);
        assert!(!nodes[0].coordinator, "n1 runs the coordinator, not n2");

        // The clock is not waited for: the last report is made older.
        h.heard_from("n2", NODE_TIMEOUT - Duration::from_secs(1));
        assert!(h.coordinator.list_nodes()[0].alive);
        h.heard_from("n2", NODE_TIMEOUT);
        assert!(!h.coordinator.list_nodes()[0].alive);

        h.report("n2", "az2", vec![], vec![]);
        assert!(h.coordinator.list_nodes()[0].alive);
    }

    /// A report's answer that gives a production role (a restarted production side takes
    /// writes on it) goes out only while the store says this coordinator leads; one that
    /// gives none does not ask. Answers carry the coordinator's term.
    #[tokio::test]
    async fn a_production_role_is_given_only_while_the_coordinator_leads() {
        let (h, _group, a, b) = seeded_group_of_two();
        let report = |node: &str, pair: &PairRecord, side: &str| {
            let mut state = pair_state(pair, side, ReplicationStatus::Active);
            state.grouped = true;
            ClusterRequest {
                request: Some(Request::Report(proto::NodeReport {
                    node: node.into(),
                    availability_zone: "az1".into(),
                    pairs: vec![state],
                    ..Default::default()
                })),
                scope: None,
                leader_term: 0,
            }
        };
        let answered = |node: &str, pair: &PairRecord, side: &str| {
            h.coordinator
                .handle(report(node, pair, side), address(node))
        };
        let answer = answered(&a.production_node, &a, "production").await;
        let Some(Response::ReportAck(ack)) = answer.response else {
            panic!("{answer:?}");
        };
        assert!(ack.roles.iter().any(|r| r.side == "production"));
        assert_eq!(ack.leader_term, h.coordinator.term());

        h.store.depose(true);
        let answer = answered(&a.production_node, &a, "production").await;
        assert!(
            matches!(&answer.response, Some(Response::ReportAck(ack)) if ack.roles.iter().all(|r| r.side != "production")),
            "{answer:?}"
        );
        // A DR side's report gives no production role: answered as before.
        let answer = h
            .coordinator
            .handle(report(&b.dr_node, &b, "dr"), address(&b.dr_node))
            .await;
        assert!(
            matches!(&answer.response, Some(Response::ReportAck(ack)) if ack.roles.iter().all(|r| r.side != "production")),
            "{answer:?}"
        );
    }

    #[test]
    fn a_node_is_stored_when_it_registers_or_moves_and_only_then() {
        let h = Harness::new();
        h.report("n2", "az2", vec![], vec![]);
        assert_eq!(h.store.commits(), 1);
        h.report("n2", "az2", vec![], vec![]);
        assert_eq!(
            h.store.commits(),
            1,
            "a heartbeat from where it was is not stored"
        );

        let moved: SocketAddr = "10.9.9.9:7001".parse().unwrap();
        h.coordinator
            .report(
                proto::NodeReport {
                    node: "n2".into(),
                    availability_zone: "az2".into(),
                    ..Default::default()
                },
                moved,
            )
            .unwrap();
        assert_eq!(h.store.commits(), 2);
        assert_eq!(h.stored().nodes.len(), 1);

        // A restarted coordinator knows the node where it moved, and has not heard from it.
        let reopened = h.reopen();
        let nodes = reopened.coordinator.list_nodes();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].address, moved.to_string());
        assert!(!nodes[0].alive);
        assert_eq!(nodes[0].last_seen, "not since the coordinator started");
    }

    #[test]
    fn a_report_that_cannot_be_stored_registers_nothing() {
        let h = Harness::new();
        h.store.refuse_commits(true);
        let refused = h.coordinator.report(
            proto::NodeReport {
                node: "n2".into(),
                availability_zone: "az2".into(),
                ..Default::default()
            },
            address("n2"),
        );
        assert_eq!(refused.unwrap_err().code(), 500);
        assert!(h.coordinator.list_nodes().is_empty());
    }

    #[test]
    fn a_report_is_answered_with_the_nodes_pairs_and_sides() {
        let lone = pair_record("lone", ("n1", 1), ("n2", 2));
        let mut grouped = pair_record("grouped", ("n2", 3), ("n3", 4));
        let mut group = group_record("g", &[&grouped]);
        grouped.group = Some(group.id);
        let other = pair_record("other", ("n1", 5), ("n3", 6));
        let h = Harness::seeded(&[
            Change::PutPair(lone.clone()),
            Change::PutPair(grouped.clone()),
            Change::PutPair(other.clone()),
            Change::PutGroup(group.clone()),
        ]);
        let ack = h.report("n2", "az2", vec![], vec![]);
        let mut pair_ids = ack.pair_ids.clone();
        pair_ids.sort();
        let mut expected = vec![lone.id.to_string(), grouped.id.to_string()];
        expected.sort();
        assert_eq!(pair_ids, expected, "not the pair n2 is not in");
        let side_of = |ack: &proto::ReportAck, pair: &PairRecord| {
            ack.roles
                .iter()
                .find(|r| r.pair_id == pair.id.to_string())
                .map(|r| r.side.clone())
        };
        assert_eq!(side_of(&ack, &lone).as_deref(), Some("dr"));
        assert_eq!(side_of(&ack, &grouped).as_deref(), Some("production"));
        assert_eq!(ack.roles.len(), 2);

        // While the group's roles may change, its pairs' sides are not confirmed.
        group.operation = Some(GroupOperation::Extend(ExtendPlan {
            pair: grouped.id,
            size: 2 * SIZE,
            dr_done: false,
            production_done: false,
        }));
        let g: GroupId = group.id;
        h.coordinator.lock().groups.insert(g, group);
        let ack = h.report("n2", "az2", vec![], vec![]);
        assert_eq!(ack.pair_ids.len(), 2);
        assert_eq!(side_of(&ack, &lone).as_deref(), Some("dr"));
        assert_eq!(side_of(&ack, &grouped), None);
    }
}
