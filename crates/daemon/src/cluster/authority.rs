//! Who may send what. Every request between daemons is authorised by the certificate of the
//! peer that sent it (the endpoint reads it from the TLS handshake), never by what the
//! request says about its sender:
//!
//! | request | who may send it |
//! |---|---|
//! | an agent command: take, leave or switch a pair's side, promote, fence, pause, resume, verify, a group's cut, release or commit, what a group's pairs staged, dirty blocks, extend, make or delete a pool volume, points and drills, a new leader's term | a coordinator's certificate, of a term not older than the highest the agent has seen |
//! | a heartbeat (`Report`) | any node, for the node its certificate names |
//! | an operator's call forwarded to the coordinator (pairs, groups, jobs, nodes, API tokens), or a REST API call (which also carries its token, checked by the coordinator) | any node |
//!
//! Each request is classified by an exhaustive match: a new request cannot be added without
//! saying who may send it.

use blockrep_api::proto::cluster_request::Request;
use blockrep_replication::endpoint::Refusal;
use blockrep_tls::PeerIdentity;

/// Who may send a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// Only a peer whose certificate has the coordinator's role: the request commands an
    /// agent (its volumes' roles, terms, data).
    Coordinator,
    /// Any node, about itself only: the request's node is the certificate's.
    ItsOwnNode,
    /// Any node of the cluster: an operator's call, forwarded to the coordinator.
    AnyNode,
}

/// A request's name (for the log) and who may send it.
pub fn classify(request: &Request) -> (&'static str, Sender) {
    use Sender::{AnyNode, Coordinator, ItsOwnNode};
    match request {
        Request::BecomeDr(_) => ("BecomeDr", Coordinator),
        Request::BecomeProduction(_) => ("BecomeProduction", Coordinator),
        Request::LeavePair(_) => ("LeavePair", Coordinator),
        Request::SwitchSide(_) => ("SwitchSide", Coordinator),
        Request::KeepProduction(_) => ("KeepProduction", Coordinator),
        Request::Verify(_) => ("Verify", Coordinator),
        Request::PausePair(_) => ("PausePair", Coordinator),
        Request::ResumePair(_) => ("ResumePair", Coordinator),
        Request::GroupCut(_) => ("GroupCut", Coordinator),
        Request::GroupRelease(_) => ("GroupRelease", Coordinator),
        Request::GroupStaged(_) => ("GroupStaged", Coordinator),
        Request::GroupCommit(_) => ("GroupCommit", Coordinator),
        Request::ProductionGrouping(_) => ("ProductionGrouping", Coordinator),
        Request::Promote(_) => ("Promote", Coordinator),
        Request::Fence(_) => ("Fence", Coordinator),
        Request::DirtyRuns(_) => ("DirtyRuns", Coordinator),
        Request::MarkDirty(_) => ("MarkDirty", Coordinator),
        Request::Extend(_) => ("Extend", Coordinator),
        Request::CreatePoolVolume(_) => ("CreatePoolVolume", Coordinator),
        Request::DeletePoolVolume(_) => ("DeletePoolVolume", Coordinator),
        Request::ListPoints(_) => ("ListPoints", Coordinator),
        Request::HoldPoint(_) => ("HoldPoint", Coordinator),
        Request::CreateDrill(_) => ("CreateDrill", Coordinator),
        Request::DeleteDrill(_) => ("DeleteDrill", Coordinator),
        Request::CheckDrill(_) => ("CheckDrill", Coordinator),
        Request::AdoptTerm(_) => ("AdoptTerm", Coordinator),
        Request::Report(_) => ("Report", ItsOwnNode),
        Request::CreatePair(_) => ("CreatePair", AnyNode),
        Request::ListPairs(_) => ("ListPairs", AnyNode),
        Request::GetPair(_) => ("GetPair", AnyNode),
        Request::DeletePair(_) => ("DeletePair", AnyNode),
        Request::ResolvePair(_) => ("ResolvePair", AnyNode),
        Request::VerifyPair(_) => ("VerifyPair", AnyNode),
        Request::UpdatePair(_) => ("UpdatePair", AnyNode),
        Request::GetJob(_) => ("GetJob", AnyNode),
        Request::ListJobs(_) => ("ListJobs", AnyNode),
        Request::ListNodes(_) => ("ListNodes", AnyNode),
        Request::CreateGroup(_) => ("CreateGroup", AnyNode),
        Request::ListGroups(_) => ("ListGroups", AnyNode),
        Request::GetGroup(_) => ("GetGroup", AnyNode),
        Request::UpdateGroup(_) => ("UpdateGroup", AnyNode),
        Request::DeleteGroup(_) => ("DeleteGroup", AnyNode),
        Request::SyncGroup(_) => ("SyncGroup", AnyNode),
        Request::StopGroup(_) => ("StopGroup", AnyNode),
        Request::FailoverGroup(_) => ("FailoverGroup", AnyNode),
        Request::ReverseGroup(_) => ("ReverseGroup", AnyNode),
        Request::ReprotectGroup(_) => ("ReprotectGroup", AnyNode),
        Request::ExtendGroup(_) => ("ExtendGroup", AnyNode),
        Request::AddGroupPair(_) => ("AddGroupPair", AnyNode),
        Request::RemoveGroupPair(_) => ("RemoveGroupPair", AnyNode),
        Request::GroupPoints(_) => ("GroupPoints", AnyNode),
        Request::FailoverGroupToPoint(_) => ("FailoverGroupToPoint", AnyNode),
        Request::CreateGroupDrill(_) => ("CreateGroupDrill", AnyNode),
        Request::ListDrills(_) => ("ListDrills", AnyNode),
        Request::GetDrill(_) => ("GetDrill", AnyNode),
        Request::DeleteGroupDrill(_) => ("DeleteGroupDrill", AnyNode),
        Request::UpdateDrill(_) => ("UpdateDrill", AnyNode),
        Request::VerifyGroupDrill(_) => ("VerifyGroupDrill", AnyNode),
        Request::CreateApiToken(_) => ("CreateApiToken", AnyNode),
        Request::ListApiTokens(_) => ("ListApiTokens", AnyNode),
        Request::RevokeApiToken(_) => ("RevokeApiToken", AnyNode),
    }
}

/// A request refused for who sent it: counted by `reason`, logged and answered with `what`.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub reason: Refusal,
    pub what: String,
}

/// Whether the peer whose certificate is `peer` may send `request`.
pub fn authorise(request: &Request, peer: &PeerIdentity) -> Result<(), Refused> {
    let (name, sender) = classify(request);
    match sender {
        Sender::Coordinator if !peer.is_coordinator() => Err(Refused {
            reason: Refusal::NotCoordinator,
            what: format!(
                "only the coordinator sends {name}; node {}'s certificate is not a coordinator's",
                peer.node
            ),
        }),
        Sender::ItsOwnNode => match request {
            Request::Report(report) if report.node != peer.node => Err(Refused {
                reason: Refusal::WrongNode,
                what: format!(
                    "a report for node {:?} from node {}: a node reports only itself",
                    report.node, peer.node
                ),
            }),
            _ => Ok(()),
        },
        Sender::Coordinator | Sender::AnyNode => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use blockrep_api::proto;
    use blockrep_tls::CertRole;

    use super::*;

    fn peer(node: &str, role: CertRole) -> PeerIdentity {
        PeerIdentity {
            node: node.into(),
            role,
        }
    }

    /// One request of each kind an agent commands with.
    fn agent_commands() -> Vec<Request> {
        vec![
            Request::BecomeDr(Default::default()),
            Request::BecomeProduction(Default::default()),
            Request::LeavePair(Default::default()),
            Request::SwitchSide(Default::default()),
            Request::KeepProduction(Default::default()),
            Request::Verify(Default::default()),
            Request::PausePair(Default::default()),
            Request::ResumePair(Default::default()),
            Request::GroupCut(Default::default()),
            Request::GroupRelease(Default::default()),
            Request::GroupStaged(Default::default()),
            Request::GroupCommit(Default::default()),
            Request::ProductionGrouping(Default::default()),
            Request::Promote(Default::default()),
            Request::Fence(Default::default()),
            Request::DirtyRuns(Default::default()),
            Request::MarkDirty(Default::default()),
            Request::Extend(Default::default()),
        ]
    }

    /// One request of each kind an operator's call is forwarded as.
    fn operator_calls() -> Vec<Request> {
        vec![
            Request::CreatePair(Default::default()),
            Request::ListPairs(Default::default()),
            Request::GetPair(Default::default()),
            Request::DeletePair(Default::default()),
            Request::ResolvePair(Default::default()),
            Request::VerifyPair(Default::default()),
            Request::UpdatePair(Default::default()),
            Request::GetJob(Default::default()),
            Request::ListJobs(Default::default()),
            Request::ListNodes(Default::default()),
            Request::CreateGroup(Default::default()),
            Request::ListGroups(Default::default()),
            Request::GetGroup(Default::default()),
            Request::UpdateGroup(Default::default()),
            Request::DeleteGroup(Default::default()),
            Request::SyncGroup(Default::default()),
            Request::StopGroup(Default::default()),
            Request::FailoverGroup(Default::default()),
            Request::ReverseGroup(Default::default()),
            Request::ReprotectGroup(Default::default()),
            Request::ExtendGroup(Default::default()),
        ]
    }

    #[test]
    fn only_a_coordinators_certificate_commands_an_agent() {
        let agent = peer("node-a", CertRole::Agent);
        let coordinator = peer("node-co", CertRole::Coordinator);
        for request in agent_commands() {
            let (name, sender) = classify(&request);
            assert_eq!(sender, Sender::Coordinator, "{name}");
            let refused = authorise(&request, &agent).expect_err(name);
            assert_eq!(refused.reason, Refusal::NotCoordinator);
            assert!(refused.what.contains(name), "{}", refused.what);
            assert_eq!(authorise(&request, &coordinator), Ok(()), "{name}");
        }
    }

    #[test]
    fn a_node_reports_only_itself() {
        let report = |node: &str| {
            Request::Report(proto::NodeReport {
                node: node.into(),
                ..Default::default()
            })
        };
        for role in [CertRole::Agent, CertRole::Coordinator] {
            let sender = peer("node-b", role);
            assert_eq!(authorise(&report("node-b"), &sender), Ok(()));
            for other in ["node-a", "", "node-b "] {
                let refused = authorise(&report(other), &sender).expect_err(other);
                assert_eq!(refused.reason, Refusal::WrongNode);
            }
        }
    }

    #[test]
    fn any_node_forwards_its_operators_calls() {
        let agent = peer("node-a", CertRole::Agent);
        for request in operator_calls() {
            let (name, sender) = classify(&request);
            assert_eq!(sender, Sender::AnyNode, "{name}");
            assert_eq!(authorise(&request, &agent), Ok(()), "{name}");
        }
    }
}
