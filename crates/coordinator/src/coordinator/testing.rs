//! What the coordinator's unit tests share: a fake agent set ([`FakeAgents`]) that records
//! every call and answers from a script (`Done` unless told otherwise), a coordinator on a
//! [`MemoryStore`] ([`Harness`]), and the records and reports the tests seed it with. Nothing
//! here is random: volume ids and addresses are made from small numbers and node names.

use std::sync::atomic::{AtomicU8, Ordering};

use blockrep_core::replication::{GroupId, GroupStatus};

use super::*;
use crate::clock::ManualClock;
use crate::store::MemoryStore;

/// A volume's size in the tests' clusters.
pub(super) const SIZE: u64 = 1 << 20;

/// One call the coordinator made to an agent.
#[derive(Clone, Debug)]
pub(super) struct Call {
    pub node: String,
    pub address: SocketAddr,
    /// The request's variant, as `BecomeDr`.
    pub kind: String,
    pub request: Request,
}

/// How the fake agent answers a call.
#[derive(Clone, Debug)]
pub(super) enum Answer {
    Done,
    /// Any other answer (a `Promoted`, a `Dirty`...).
    Respond(Box<Response>),
    /// A refusal with the EVS code (400, 404, 409...).
    Refuse(u32, &'static str),
    /// No answer: the call fails as an unreachable node's does.
    Unreachable,
    /// `Done`, once the test lets the call go (`notify_waiters`): the caller waits
    /// meanwhile, as on a slow agent.
    Wait(Arc<tokio::sync::Notify>),
    /// This answer, once the test lets the call go.
    WaitThen(Arc<tokio::sync::Notify>, Box<Response>),
}

struct Rule {
    kind: String,
    node: Option<String>,
    answer: Answer,
    /// How many calls the rule still answers; `None`: every one.
    left: Option<usize>,
}

/// Agents that answer from a script: the first rule that matches a call answers it (and is
/// used up after its count); a call no rule matches is `Done`.
#[derive(Default)]
pub(super) struct FakeAgents {
    calls: Mutex<Vec<Call>>,
    script: Mutex<Vec<Rule>>,
}

impl FakeAgents {
    /// Calls of `kind` to `node` (any node: `None`) answer `answer`, `times` times (every
    /// time: `None`).
    pub fn script(&self, kind: &str, node: Option<&str>, answer: Answer, times: Option<usize>) {
        self.script.lock().unwrap().push(Rule {
            kind: kind.to_owned(),
            node: node.map(str::to_owned),
            answer,
            left: times,
        });
    }

    /// Every call of `kind`, to any node, answers `answer`.
    pub fn always(&self, kind: &str, answer: Answer) {
        self.script(kind, None, answer, None);
    }

    /// The next call of `kind`, to any node, answers `answer`.
    pub fn once(&self, kind: &str, answer: Answer) {
        self.script(kind, None, answer, Some(1));
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The calls of `kind`.
    pub fn calls_of(&self, kind: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.kind == kind)
            .collect()
    }

    /// Every call as `node:Kind`, in order.
    pub fn log(&self) -> Vec<String> {
        self.calls()
            .iter()
            .map(|c| format!("{}:{}", c.node, c.kind))
            .collect()
    }

    fn answer_for(&self, node: &str, kind: &str) -> Answer {
        let mut script = self.script.lock().unwrap();
        let Some(at) = script.iter().position(|r| {
            r.kind == kind && r.node.as_deref().is_none_or(|n| n == node) && r.left != Some(0)
        }) else {
            return Answer::Done;
        };
        let rule = &mut script[at];
        if let Some(left) = &mut rule.left {
            *left -= 1;
        }
        rule.answer.clone()
    }
}

/// A request's variant name, as its `Debug` form begins.
pub(super) fn kind_of(request: &Request) -> String {
    let text = format!("{request:?}");
    text.split('(').next().unwrap_or_default().to_owned()
}

impl Agents for FakeAgents {
    fn call(
        &self,
        node: &str,
        address: SocketAddr,
        request: ClusterRequest,
    ) -> BoxFuture<'_, Result<ClusterResponse, ApiError>> {
        let request = request.request.expect("the coordinator sends a request");
        let kind = kind_of(&request);
        let answer = self.answer_for(node, &kind);
        self.calls.lock().unwrap().push(Call {
            node: node.to_owned(),
            address,
            kind,
            request,
        });
        let node = node.to_owned();
        Box::pin(async move {
            let response = match answer {
                Answer::Wait(until) => {
                    until.notified().await;
                    Response::Done(proto::Done {})
                }
                Answer::WaitThen(until, response) => {
                    until.notified().await;
                    *response
                }
                Answer::Done => Response::Done(proto::Done {}),
                Answer::Respond(response) => *response,
                Answer::Refuse(code, message) => Response::Error(proto::ClusterError {
                    code,
                    message: message.to_owned(),
                }),
                Answer::Unreachable => {
                    return Err(ApiError::Unavailable(format!(
                        "node {node} does not answer"
                    )));
                }
            };
            Ok(ClusterResponse {
                response: Some(response),
                answered_for_project: String::new(),
            })
        })
    }
}

/// The id of the job a request answered with.
pub(super) fn job_of(job: Option<proto::Job>) -> JobId {
    job.expect("the request started a job")
        .id
        .parse()
        .expect("a job id")
}

/// A coordinator on a memory store, with fake agents.
pub(super) struct Harness {
    pub store: Arc<MemoryStore>,
    pub agents: Arc<FakeAgents>,
    pub coordinator: Arc<Coordinator>,
    /// The coordinator's clock: it moves only when a test moves it.
    pub clock: Arc<ManualClock>,
}

impl Harness {
    pub fn new() -> Self {
        Self::on(Arc::new(MemoryStore::new()))
    }

    /// A coordinator opened on `store` (as a restarted one would be), with fresh agents.
    pub fn on(store: Arc<MemoryStore>) -> Self {
        let agents = Arc::new(FakeAgents::default());
        let clock = Arc::new(ManualClock::new());
        let coordinator = Coordinator::open(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::clone(&agents) as Arc<dyn Agents>,
            "n1".into(),
            Arc::clone(&clock) as Arc<dyn Clock>,
        )
        .expect("the coordinator opens");
        Self {
            store,
            agents,
            coordinator,
            clock,
        }
    }

    /// A coordinator on a store that holds `changes`.
    pub fn seeded(changes: &[Change]) -> Self {
        let store = Arc::new(MemoryStore::new());
        store.commit(changes).expect("seeded");
        let harness = Self::on(store);
        assert_eq!(harness.store.commits(), 1);
        harness
    }

    /// Another coordinator on the same store, as after a restart.
    pub fn reopen(&self) -> Self {
        Self::on(Arc::clone(&self.store))
    }

    /// `node` (in `az`) reports, from its own address.
    pub fn report(
        &self,
        node: &str,
        az: &str,
        volumes: Vec<proto::Volume>,
        pairs: Vec<proto::PairState>,
    ) -> proto::ReportAck {
        self.coordinator
            .report(
                proto::NodeReport {
                    node: node.into(),
                    availability_zone: az.into(),
                    volumes,
                    pairs,
                    ..Default::default()
                },
                address(node),
            )
            .expect("the report is taken")
    }

    /// Makes the coordinator's last word from `node` as old as `ago`.
    pub fn heard_from(&self, node: &str, ago: Duration) {
        let at = self
            .clock
            .now()
            .checked_sub(ago)
            .expect("the clock goes back that far");
        self.coordinator
            .lock()
            .nodes
            .get_mut(node)
            .expect("a known node")
            .last_seen = Some(at);
    }

    /// What the store holds now.
    pub fn stored(&self) -> crate::store::Snapshot {
        self.store.load().expect("the store loads")
    }

    pub fn stored_pair(&self, id: PairId) -> Option<PairRecord> {
        self.stored().pairs.into_iter().find(|p| p.id == id)
    }

    pub fn stored_group(&self, id: GroupId) -> Option<GroupRecord> {
        self.stored().groups.into_iter().find(|g| g.id == id)
    }

    pub fn stored_job(&self, id: JobId) -> Option<JobRecord> {
        self.stored().jobs.into_iter().find(|j| j.id == id)
    }

    /// The coordinator's own record of a pair.
    pub fn pair(&self, id: PairId) -> PairRecord {
        self.coordinator.lock().pairs[&id].clone()
    }

    /// Asserts that `result` is a refusal with `code` naming `words`, and that nothing was
    /// stored (the store saw `commits` commits) nor asked of any agent.
    #[track_caller]
    pub fn assert_refused<T: std::fmt::Debug>(
        &self,
        result: Result<T, ApiError>,
        code: u32,
        words: &str,
        commits: usize,
    ) {
        let error = result.expect_err("refused");
        assert_eq!(error.code(), code, "{error}");
        assert!(
            error.to_string().contains(words),
            "{error:?} names {words:?}"
        );
        assert_eq!(
            self.store.commits(),
            commits,
            "nothing stored after: {error}"
        );
        assert!(self.agents.calls().is_empty(), "{:?}", self.agents.log());
    }
}

/// Where `node` reports from: 10.0.0.<its number>:7000.
pub(super) fn address(node: &str) -> SocketAddr {
    let n: u8 = node
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or(99);
    SocketAddr::from(([10, 0, 0, n], 7000))
}

pub(super) fn volume_id(tag: u8) -> VolumeId {
    VolumeId::from_bytes([tag; 16])
}

/// A volume as an agent reports it.
pub(super) fn volume(tag: u8, name: &str, size: u64) -> proto::Volume {
    proto::Volume {
        id: volume_id(tag).to_string(),
        name: name.into(),
        size_bytes: size,
        ..Default::default()
    }
}

/// A pair of volume `production.1` on node `production.0` and `dr.1` on `dr.0`, available
/// (both sides took their roles), its priority station az1.
pub(super) fn pair_record(name: &str, production: (&str, u8), dr: (&str, u8)) -> PairRecord {
    PairRecord {
        id: PairId::from_bytes([
            production.1,
            dr.1,
            0,
            0,
            0,
            0,
            0x40,
            0,
            0x80,
            0,
            0,
            0,
            0,
            0,
            0,
            1,
        ]),
        name: name.into(),
        description: String::new(),
        status: PairStatus::Available,
        model: ReplicationModel::Async,
        production_volume: volume_id(production.1),
        dr_volume: volume_id(dr.1),
        production_node: production.0.into(),
        dr_node: dr.0.into(),
        priority_station: "az1".into(),
        size: SIZE,
        created_at: now_text(),
        updated_at: None,
        dr_started: true,
        production_started: true,
        failure_detail: None,
        max_bytes_per_sec: None,
        job: None,
        pending: None,
        group: None,
        term: 0,
        generation: None,
        project: "default".into(),
    }
}

/// An async group of `pairs`, available, its priority station az1.
pub(super) fn group_record(name: &str, pairs: &[&PairRecord]) -> GroupRecord {
    GroupRecord {
        id: GroupId::from_bytes([
            0x77,
            pairs.len() as u8,
            0,
            0,
            0,
            0,
            0x40,
            0,
            0x80,
            0,
            0,
            0,
            0,
            0,
            0,
            2,
        ]),
        name: name.into(),
        description: String::new(),
        status: GroupStatus::Available,
        model: ReplicationModel::Async,
        priority_station: "az1".into(),
        pairs: pairs.iter().map(|p| p.id).collect(),
        stopped: false,
        created_at: now_text(),
        updated_at: None,
        failure_detail: None,
        job: None,
        term: 0,
        operation: None,
        failed_over_at: None,
        project: "default".into(),
        protection: None,
        membership: None,
        retention: Default::default(),
        drills: Vec::new(),
    }
}

/// A running job of `job_type`.
pub(super) fn running_job(
    job_type: JobType,
    pair: Option<PairId>,
    group: Option<GroupId>,
) -> JobRecord {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    JobRecord {
        id: JobId::from_bytes([0x10, n, 0, 0, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0, 3]),
        job_type,
        status: JobStatus::Running,
        begin_time: now_text(),
        end_time: None,
        progress: 0.0,
        fail_reason: None,
        pair,
        group,
        result: None,
        project: "default".into(),
    }
}

/// What the agent of `side` (`production` or `dr`) reports of `pair`.
pub(super) fn pair_state(
    pair: &PairRecord,
    side: &str,
    status: ReplicationStatus,
) -> proto::PairState {
    proto::PairState {
        pair_id: pair.id.to_string(),
        side: side.into(),
        replication_status: status.to_string(),
        ..Default::default()
    }
}

/// An async group "g" of the pairs "a" (n1 → n2) and "b" (n3 → n4), available.
pub(super) fn group_of_two() -> (GroupRecord, PairRecord, PairRecord) {
    let mut a = pair_record("a", ("n1", 1), ("n2", 2));
    let mut b = pair_record("b", ("n3", 3), ("n4", 4));
    let group = group_record("g", &[&a, &b]);
    a.group = Some(group.id);
    b.group = Some(group.id);
    (group, a, b)
}

/// A coordinator whose store holds [`group_of_two`].
pub(super) fn seeded_group_of_two() -> (Harness, GroupRecord, PairRecord, PairRecord) {
    let (group, a, b) = group_of_two();
    let h = Harness::seeded(&[
        Change::PutGroup(group.clone()),
        Change::PutPair(a.clone()),
        Change::PutPair(b.clone()),
    ]);
    (h, group, a, b)
}

impl Harness {
    /// Each pair's DR agent (in az2) reports it active, applying by its group's commits
    /// (`grouped`), the last of which is `commit`.
    pub fn dr_reports(&self, pairs: &[&PairRecord], grouped: bool, commit: u64) {
        for p in pairs {
            let mut state = pair_state(p, "dr", ReplicationStatus::Active);
            state.grouped = grouped;
            state.group_commit = commit;
            self.report(&p.dr_node, "az2", vec![], vec![state]);
        }
    }

    /// Each pair's production agent (in az1) reports it active and grouped.
    pub fn production_reports(&self, pairs: &[&PairRecord]) {
        for p in pairs {
            let mut state = pair_state(p, "production", ReplicationStatus::Active);
            state.grouped = true;
            self.report(&p.production_node, "az1", vec![], vec![state]);
        }
    }
}
