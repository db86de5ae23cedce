//! The store on etcd: the five tables as keys `PREFIX/v1/TABLE/ID`, each holding the record's
//! JSON, and one commit as one etcd transaction.
//!
//! A leader's store is fenced ([`LeaderFence`]): its transaction commits only while the
//! leader's election key still has the creation revision it was elected with (its term).
//! A deposed leader, however long it was paused, writes nothing: etcd checks the compare
//! when the transaction commits (docs/HA-COORDINATOR.md, "Fencing").
//!
//! The [`Store`] interface is synchronous (the coordinator commits under its state's lock,
//! as redb does). The etcd client runs on a runtime of its own, on one thread the store
//! owns, so a commit can wait for it from any thread, async or not.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn,
    TxnOp,
};

use std::sync::Mutex;

use super::{Change, Snapshot, Store, StoreError, Table};

/// etcd refuses a transaction of more operations than its `--max-txn-ops` (128 unless
/// configured otherwise). A commit over it is refused whole, never split.
pub const MAX_TXN_OPS: usize = 128;
/// Records read per page at load.
const LOAD_PAGE: i64 = 500;
/// How long a request that found no quorum waits before it is made again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Where etcd is and how to reach it (`[coordinator]`: `etcd_endpoints`, `etcd_prefix`,
/// `etcd_ca`, `etcd_cert`, `etcd_key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdSettings {
    /// `http://host:port`, or `https://host:port` with [`EtcdTls`].
    pub endpoints: Vec<String>,
    /// Every key blockrep writes starts with it (`/blockrep` unless configured).
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// How long one request may take before it fails (a member without a quorum answers
    /// at once; an unreachable one is waited for this long).
    pub request_timeout: Duration,
}

/// Mutual TLS to etcd: the CA that signed the members' certificates, and this client's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl EtcdSettings {
    pub const DEFAULT_PREFIX: &'static str = "/blockrep";
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: Self::DEFAULT_PREFIX.into(),
            tls: None,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// The client's options: its timeouts, that a member without a leader refuses at once
    /// (rather than serve a read it cannot vouch for), and its TLS. One attempt takes at
    /// most a quarter of the request's time, so a request meets a member that is down and
    /// is made again to another within it.
    pub fn connect_options(&self) -> Result<ConnectOptions, StoreError> {
        Ok(self
            .options_for_long_calls()?
            .with_timeout(self.attempt_timeout()))
    }

    /// The options without a time limit per request, for calls that wait by design (an
    /// election campaign waits until it leads): their callers bound the others.
    pub fn options_for_long_calls(&self) -> Result<ConnectOptions, StoreError> {
        let attempt = self.attempt_timeout();
        let mut options = ConnectOptions::new()
            .with_connect_timeout(attempt)
            .with_keep_alive(Duration::from_secs(2), attempt)
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            let read = |what: &str, path: &PathBuf| {
                std::fs::read(path).map_err(|e| {
                    StoreError::Backend(format!("read the etcd {what} {}: {e}", path.display()))
                })
            };
            let ca = read("CA certificate", &tls.ca)?;
            let cert = read("client certificate", &tls.cert)?;
            let key = read("client key", &tls.key)?;
            options = options.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .identity(Identity::from_pem(cert, key)),
            );
        }
        Ok(options)
    }

    fn attempt_timeout(&self) -> Duration {
        (self.request_timeout / 4).max(Duration::from_millis(250))
    }

    /// The prefix of every record's key.
    fn records_prefix(&self) -> String {
        format!("{}/v1/", self.prefix.trim_end_matches('/'))
    }

    /// The election's name: candidates' keys are `PREFIX/leader/LEASE`.
    pub fn election_name(&self) -> String {
        format!("{}/leader", self.prefix.trim_end_matches('/'))
    }
}

/// What a leader's commits are conditioned on: its election key, and the creation revision
/// that key had when it was elected (the leader's term).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderFence {
    pub key: Vec<u8>,
    pub term: u64,
}

/// What a leader's store calls when the leader must step down, with why.
pub type StepDown = Box<dyn Fn(&StoreError) + Send + Sync>;

pub struct EtcdStore {
    client: Client,
    runtime: tokio::runtime::Handle,
    /// Ends the runtime's thread when the store is dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
    settings: EtcdSettings,
    /// A leader's store: its fence and where its commits stand.
    leader: Option<Mutex<LeaderCommits>>,
    /// Called when a fenced commit finds its term over, or cannot tell whether it committed:
    /// either way the leader steps down.
    on_step_down: Option<StepDown>,
    /// Commits refused because the term was over.
    refused: AtomicU64,
}

/// Where a leader's commits stand. Each commit also puts the commit key
/// (`PREFIX/commit`), naming the commit, under a compare of that key's revision as this
/// leader's last commit left it. So of the attempts of one commit (a request is made again
/// when its answer is lost) at most one goes in, and an attempt that lands late, after a later
/// commit, goes in not at all: it cannot write back records a later commit changed.
struct LeaderCommits {
    fence: LeaderFence,
    /// The commit key's revision after this leader's last commit (at first, as it found it).
    last_revision: i64,
    /// Commits made in this term: the next one's name is `TERM.MADE`.
    made: u64,
    /// Why this leader stepped down, once it did: every later commit is refused unsent.
    stepped_down: Option<String>,
}

impl EtcdStore {
    /// Connects to etcd. Unfenced: for moving records between stores while no coordinator
    /// runs ([`super::transfer`]); a coordinator's store is [`EtcdStore::fenced`].
    pub fn connect(settings: EtcdSettings) -> Result<Self, StoreError> {
        let options = settings.connect_options()?;
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("etcd-store".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| StoreError::Backend(format!("start the etcd client's thread: {e}")))?;
        let runtime = handle_rx
            .recv()
            .map_err(|_| StoreError::Backend("the etcd client's thread ended".into()))?
            .map_err(|e| StoreError::Backend(format!("the etcd client's runtime: {e}")))?;
        let endpoints = settings.endpoints.clone();
        let client = wait_on(&runtime, settings.request_timeout, move || {
            let (endpoints, options) = (endpoints.clone(), options.clone());
            async move {
                Client::connect(endpoints, Some(options))
                    .await
                    .map_err(etcd_error)
            }
        })?;
        Ok(Self {
            client,
            runtime,
            _stop: stop,
            settings,
            leader: None,
            on_step_down: None,
            refused: AtomicU64::new(0),
        })
    }

    /// Every commit from now on is conditioned on `fence`, and follows the commit key from
    /// where the store has it now.
    pub fn fenced(mut self, fence: LeaderFence) -> Result<Self, StoreError> {
        let client = self.client.clone();
        let key = self.commit_key();
        let last_revision = wait_on(&self.runtime, self.settings.request_timeout, move || {
            let (mut client, key) = (client.clone(), key.clone());
            async move {
                let found = client.get(key, None).await.map_err(etcd_error)?;
                Ok(found.kvs().first().map_or(0, |kv| kv.mod_revision()))
            }
        })?;
        self.leader = Some(Mutex::new(LeaderCommits {
            fence,
            last_revision,
            made: 0,
            stepped_down: None,
        }));
        Ok(self)
    }

    /// The key every fenced commit puts last, naming the commit.
    fn commit_key(&self) -> String {
        format!("{}/commit", self.settings.prefix.trim_end_matches('/'))
    }

    /// `step_down` is called when a commit finds the term over, or cannot tell whether it
    /// committed.
    pub fn on_step_down(mut self, step_down: StepDown) -> Self {
        self.on_step_down = Some(step_down);
        self
    }

    /// The leader steps down: from now on its commits are refused unsent, and its owner is
    /// told.
    fn step_down(&self, leader: &mut LeaderCommits, why: &StoreError) {
        if leader.stepped_down.is_none() {
            leader.stepped_down = Some(why.to_string());
            if let Some(step_down) = &self.on_step_down {
                step_down(why);
            }
        }
    }

    /// Commits refused because this store's leader was deposed.
    pub fn refused_commits(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Whether a coordinator leads on this store now (an election key exists).
    pub fn has_leader(&self) -> Result<bool, StoreError> {
        let client = self.client.clone();
        let name = format!("{}/", self.settings.election_name());
        wait_on(&self.runtime, self.settings.request_timeout, move || {
            let (mut client, name) = (client.clone(), name.clone());
            async move {
                let options = GetOptions::new().with_prefix().with_count_only();
                let found = client.get(name, Some(options)).await.map_err(etcd_error)?;
                Ok(found.count() > 0)
            }
        })
    }

    fn key(&self, table: Table, id: &str) -> String {
        format!("{}{}/{id}", self.settings.records_prefix(), table.name())
    }
}

impl Store for EtcdStore {
    /// Every record, read page by page at one revision (the first page's), so the snapshot
    /// is one moment of the store.
    fn load(&self) -> Result<Snapshot, StoreError> {
        let client = self.client.clone();
        let prefix = self.settings.records_prefix();
        wait_on(
            &self.runtime,
            self.settings.request_timeout * 4,
            move || {
                let (mut client, prefix) = (client.clone(), prefix.clone());
                async move {
                    let end = prefix_end(prefix.as_bytes());
                    let mut snapshot = Snapshot::default();
                    let mut from = prefix.clone().into_bytes();
                    let mut revision = 0;
                    loop {
                        let mut options = GetOptions::new()
                            .with_range(end.clone())
                            .with_limit(LOAD_PAGE);
                        if revision > 0 {
                            options = options.with_revision(revision);
                        }
                        let page = client
                            .get(from.clone(), Some(options))
                            .await
                            .map_err(etcd_error)?;
                        if revision == 0 {
                            revision = page.header().map_or(0, |h| h.revision());
                        }
                        for kv in page.kvs() {
                            let key = String::from_utf8_lossy(kv.key());
                            let Some((table, id)) = key
                                .strip_prefix(&prefix)
                                .and_then(|rest| rest.split_once('/'))
                                .and_then(|(table, id)| Some((Table::from_name(table)?, id)))
                            else {
                                tracing::warn!(%key, "a key under the coordinator's prefix that is no record; ignored");
                                continue;
                            };
                            snapshot.add(table, id, kv.value())?;
                        }
                        match page.kvs().last() {
                            Some(last) if page.more() => {
                                from = last.key().to_vec();
                                from.push(0);
                            }
                            _ => return Ok(snapshot),
                        }
                    }
                }
            },
        )
    }

    fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        // A later change of a key replaces an earlier one (etcd refuses a transaction that
        // names a key twice).
        let mut entries = std::collections::BTreeMap::new();
        for entry in changes.iter().map(Change::entry) {
            entries.insert(self.key(entry.table, &entry.key), entry.value);
        }
        // A leader's commit puts the commit key too.
        let room = MAX_TXN_OPS - usize::from(self.leader.is_some());
        if entries.len() > room {
            return Err(StoreError::TooLarge {
                changes: entries.len(),
                limit: room,
            });
        }
        let operations: Vec<TxnOp> = entries
            .into_iter()
            .map(|(key, value)| match value {
                Some(value) => TxnOp::put(key, value, None),
                None => TxnOp::delete(key, None),
            })
            .collect();
        match &self.leader {
            None => self.commit_unfenced(operations),
            Some(leader) => {
                let mut leader = leader.lock().unwrap_or_else(|e| e.into_inner());
                self.commit_fenced(&mut leader, operations)
            }
        }
    }

    fn check_leading(&self) -> Result<(), StoreError> {
        let Some(leader) = &self.leader else {
            return Ok(());
        };
        // The fence is read under the lock, the network is asked without it: commits do not
        // wait behind a check.
        let fence = {
            let leader = leader.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(why) = &leader.stepped_down {
                return Err(StoreError::SteppedDown(why.clone()));
            }
            leader.fence.clone()
        };
        let client = self.client.clone();
        let leading = wait_on(&self.runtime, self.settings.request_timeout, move || {
            let mut client = client.clone();
            let txn = Txn::new().when([fence_compare(&fence)]);
            async move { Ok(client.txn(txn).await.map_err(etcd_error)?.succeeded()) }
        })?;
        if leading {
            return Ok(());
        }
        let mut leader = leader.lock().unwrap_or_else(|e| e.into_inner());
        let deposed = StoreError::Deposed {
            term: leader.fence.term,
        };
        self.step_down(&mut leader, &deposed);
        Err(deposed)
    }
}

impl EtcdStore {
    fn commit_unfenced(&self, operations: Vec<TxnOp>) -> Result<(), StoreError> {
        let client = self.client.clone();
        wait_on(&self.runtime, self.settings.request_timeout, move || {
            let mut client = client.clone();
            let txn = Txn::new().and_then(operations.clone());
            async move { client.txn(txn).await.map(drop).map_err(etcd_error) }
        })
    }

    /// A leader's commit: its operations and the commit key, if its leader key still has
    /// its term and the commit key the revision its last commit left. When the compare
    /// fails, the same transaction reads both keys, to tell an earlier attempt of this commit
    /// that went in from a term that is over.
    fn commit_fenced(
        &self,
        leader: &mut LeaderCommits,
        mut operations: Vec<TxnOp>,
    ) -> Result<(), StoreError> {
        if let Some(why) = &leader.stepped_down {
            return Err(StoreError::SteppedDown(why.clone()));
        }
        let term = leader.fence.term;
        // A name is used once, whatever the commit's outcome: a later commit never finds an
        // earlier one's attempt under its own name.
        leader.made += 1;
        let name = format!("{term}.{}", leader.made);
        let commit_key = self.commit_key();
        operations.push(TxnOp::put(commit_key.clone(), name.clone(), None));
        let compares = [
            fence_compare(&leader.fence),
            Compare::mod_revision(commit_key.clone(), CompareOp::Equal, leader.last_revision),
        ];
        let reads = [
            TxnOp::get(commit_key, None),
            TxnOp::get(leader.fence.key.clone(), None),
        ];
        let client = self.client.clone();
        let answered = wait_on(&self.runtime, self.settings.request_timeout, move || {
            let mut client = client.clone();
            let txn = Txn::new()
                .when(compares.clone())
                .and_then(operations.clone())
                .or_else(reads.clone());
            async move { client.txn(txn).await.map_err(etcd_error) }
        });
        let outcome = match answered {
            Ok(response) => CommitOutcome::of(&response, &name, &leader.fence),
            // The attempts' answers were lost: any of them may have gone in.
            Err(e @ StoreError::NoQuorum(_)) => CommitOutcome::Unknown(e),
            // etcd refused the request itself (too large, not permitted), and no earlier
            // attempt may have gone in (`wait_on` says so otherwise): nothing went in.
            Err(e) => return Err(e),
        };
        match outcome {
            CommitOutcome::Committed { revision } => {
                leader.last_revision = revision;
                Ok(())
            }
            CommitOutcome::Deposed => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    term,
                    "a commit refused by etcd: this coordinator's term is over"
                );
                let deposed = StoreError::Deposed { term };
                self.step_down(leader, &deposed);
                Err(deposed)
            }
            CommitOutcome::Unknown(e) => {
                // The records in memory may be behind the store's: the leader steps down,
                // and whoever leads next loads them.
                tracing::warn!(term, error = %e, "a commit of unknown outcome: the coordinator steps down");
                self.step_down(leader, &e);
                Err(e)
            }
        }
    }
}

/// The compare that holds while `fence`'s leader leads: its key has the term's revision.
fn fence_compare(fence: &LeaderFence) -> Compare {
    Compare::create_revision(fence.key.clone(), CompareOp::Equal, fence.term as i64)
}

/// What a leader's commit transaction answered.
enum CommitOutcome {
    /// It went in (now, or in an earlier attempt): the commit key's revision after it.
    Committed { revision: i64 },
    /// The leader key is gone or newer: the term is over, and nothing went in.
    Deposed,
    /// It cannot be told whether it went in.
    Unknown(StoreError),
}

impl CommitOutcome {
    fn of(response: &etcd_client::TxnResponse, name: &str, fence: &LeaderFence) -> Self {
        if response.succeeded() {
            return match response.header() {
                Some(header) => CommitOutcome::Committed {
                    revision: header.revision(),
                },
                None => CommitOutcome::Unknown(StoreError::Backend(
                    "etcd answered a commit without its revision".into(),
                )),
            };
        }
        let mut found = response.op_responses().into_iter().map(|r| match r {
            etcd_client::TxnOpResponse::Get(got) => got.kvs().first().cloned(),
            _ => None,
        });
        let (commit, leader_key) = (found.next().flatten(), found.next().flatten());
        if let Some(commit) = &commit
            && commit.value() == name.as_bytes()
        {
            return CommitOutcome::Committed {
                revision: commit.mod_revision(),
            };
        }
        match leader_key {
            Some(key) if key.create_revision() == fence.term as i64 => {
                CommitOutcome::Unknown(StoreError::Backend(format!(
                    "the commit key moved under this leader (it names commit {:?})",
                    commit.map(|c| String::from_utf8_lossy(c.value()).into_owned())
                )))
            }
            _ => CommitOutcome::Deposed,
        }
    }
}

/// Runs `attempt` on the store's runtime and waits for it, at most `timeout` in all. An
/// attempt that could not reach a member with a quorum is made again (the client may have
/// picked a member that is down). Every request the store makes is safe to repeat: a read,
/// an import's puts (no coordinator runs), or a leader's commit, which goes in at most once
/// whatever its attempts do ([`LeaderCommits`]).
fn wait_on<T, F>(
    runtime: &tokio::runtime::Handle,
    timeout: Duration,
    mut attempt: impl FnMut() -> F + Send + 'static,
) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, StoreError>> + Send,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        // An attempt whose answer was lost may have gone in: a later attempt's definite
        // refusal then does not say that nothing did.
        let mut maybe_delivered = false;
        let outcome = loop {
            match tokio::time::timeout_at(deadline, attempt()).await {
                Ok(Err(StoreError::NoQuorum(why))) => {
                    maybe_delivered = true;
                    if tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                        break Err(StoreError::NoQuorum(why));
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Ok(Err(e)) if maybe_delivered => {
                    break Err(StoreError::NoQuorum(format!(
                        "an earlier attempt's answer was lost, then: {e}"
                    )));
                }
                Ok(outcome) => break outcome,
                Err(_) => {
                    break Err(StoreError::NoQuorum(format!(
                        "etcd did not answer in {timeout:?}"
                    )));
                }
            }
        };
        let _ = tx.send(outcome);
    });
    // On a worker of the daemon's runtime, the other tasks move to another worker while
    // this one waits.
    let wait = || rx.recv();
    let answer = match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    };
    answer.map_err(|_| StoreError::Backend("the etcd client's runtime ended".into()))?
}

/// An etcd error as the store's: a member that cannot reach a quorum (or is unreachable)
/// means the store cannot commit now; anything else is the backend's error.
pub(crate) fn etcd_error(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error;
    match &e {
        // What etcd refuses before it applies anything: a definite answer.
        Error::GRpcStatus(status)
            if matches!(
                status.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::OutOfRange
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::NotFound
                    | tonic::Code::AlreadyExists
                    | tonic::Code::Unimplemented
            ) =>
        {
            StoreError::Backend(format!("etcd: {}", status.message()))
        }
        // Anything else (unavailable, timed out, cut off, an internal error) may have been
        // applied or not: the store could not reach a quorum that answered.
        Error::GRpcStatus(status) => StoreError::NoQuorum(format!("etcd: {}", status.message())),
        Error::TransportError(_) | Error::IoError(_) => StoreError::NoQuorum(format!("etcd: {e}")),
        _ => StoreError::Backend(format!("etcd: {e}")),
    }
}

/// The end of the range of keys that start with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
