//! Which coordinator candidate leads: etcd's election API (campaign, leader), on a lease
//! each candidate keeps alive. Nothing here is consensus of its own: etcd decides.
//!
//! A candidate campaigns under `PREFIX/leader` with its address as the value; etcd puts its
//! key `PREFIX/leader/LEASE`, bound to its lease, and answers the campaign once that key is
//! the oldest under the name. The key's creation revision is the leader's **term**: etcd's
//! revisions only grow, so every later leader's term is larger. The term fences the
//! leader's commits ([`crate::LeaderFence`]) and is carried by its agent commands.
//!
//! A leader's [`Leadership`] ends when its lease is not renewed for a TTL, or etcd says it
//! expired. It cannot tell the moment etcd expired it (a paused process outlives its lease
//! unknowing), so safety never rests on that moment: the fence does
//! (docs/HA-COORDINATOR.md).

use std::time::{Duration, Instant};

use etcd_client::{Client, ResignOptions};
use tokio::sync::watch;

use crate::store::etcd::etcd_error;
use crate::store::{EtcdSettings, LeaderFence, StoreError};

/// How long giving the leadership up may take (its lease expires anyway).
const RESIGN_TIMEOUT: Duration = Duration::from_secs(1);

/// A daemon that may lead.
pub struct Candidate {
    client: Client,
    name: String,
    /// What followers answer as the leader's address (this daemon's cluster address).
    address: String,
    ttl: Duration,
    /// How long a call that should answer at once may take (the campaign waits unbounded).
    request_timeout: Duration,
}

/// Who leads, as anyone reads it from etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    pub address: String,
    pub term: u64,
}

/// This candidate leads, until [`Leadership::lost`] answers.
pub struct Leadership {
    pub fence: LeaderFence,
    lease: i64,
    client: Client,
    keeper: tokio::task::JoinHandle<()>,
    lost: watch::Receiver<Option<String>>,
    leader_key: etcd_client::LeaderKey,
}

impl Candidate {
    /// `ttl`: the lease's, in whole seconds (etcd's unit), at least 2.
    pub async fn connect(
        settings: &EtcdSettings,
        address: String,
        ttl: Duration,
    ) -> Result<Self, StoreError> {
        let request_timeout = settings.request_timeout;
        let client = bounded(
            request_timeout,
            Client::connect(
                settings.endpoints.clone(),
                Some(settings.options_for_long_calls()?),
            ),
        )
        .await?;
        Ok(Self {
            client,
            name: settings.election_name(),
            address,
            ttl: ttl.max(Duration::from_secs(2)),
            request_timeout,
        })
    }

    /// The address this candidate campaigns with.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Campaigns until this candidate leads. Fails if etcd cannot be reached or the lease is
    /// lost while waiting; the caller campaigns again.
    pub async fn campaign(&self) -> Result<Leadership, StoreError> {
        let mut client = self.client.clone();
        self.end_earlier_runs().await?;
        let granted = bounded(
            self.request_timeout,
            client.lease_grant(self.ttl.as_secs() as i64, None),
        )
        .await?;
        let lease = granted.id();
        if granted.ttl() as u64 != self.ttl.as_secs() {
            // etcd raises a TTL below its minimum (one and a half election timeouts).
            tracing::warn!(
                asked = self.ttl.as_secs(),
                granted = granted.ttl(),
                "etcd granted the candidate's lease another TTL"
            );
        }
        let (lost_tx, mut lost) = watch::channel(None);
        // Ends the renewals if this campaign is given up (its future dropped): the lease
        // then expires, and its key with it.
        let mut keeper = AbortOnDrop(Some(tokio::spawn(keep_alive(
            client.clone(),
            lease,
            self.ttl,
            lost_tx,
        ))));
        let campaign = client.campaign(self.name.clone(), self.address.clone(), lease);
        let won = tokio::select! {
            won = campaign => won.map_err(etcd_error),
            _ = lost.changed() => Err(StoreError::NoQuorum(format!(
                "the candidate's lease was lost while it campaigned: {}",
                lost.borrow().clone().unwrap_or_default()
            ))),
        };
        let leader_key = match won.map(|mut r| r.take_leader()) {
            Ok(Some(key)) => key,
            Ok(None) => {
                drop(keeper);
                let _ = bounded(self.request_timeout, client.lease_revoke(lease)).await;
                return Err(StoreError::Backend(
                    "etcd answered the campaign without a leader key".into(),
                ));
            }
            Err(e) => {
                drop(keeper);
                let _ = bounded(self.request_timeout, client.lease_revoke(lease)).await;
                return Err(e);
            }
        };
        Ok(Leadership {
            fence: LeaderFence {
                key: leader_key.key().to_vec(),
                term: leader_key.rev() as u64,
            },
            lease,
            client,
            keeper: keeper.0.take().expect("the keeper runs"),
            lost,
            leader_key,
        })
    }

    /// Revokes the leases of this candidate's earlier runs (keys under the election with
    /// this candidate's address): a daemon that was killed and started again leads again at
    /// once instead of waiting for its old lease to expire. Only one process can listen on
    /// the address, so those runs are over.
    async fn end_earlier_runs(&self) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let keys = bounded(
            self.request_timeout,
            client.get(
                format!("{}/", self.name),
                Some(etcd_client::GetOptions::new().with_prefix()),
            ),
        )
        .await?;
        for kv in keys
            .kvs()
            .iter()
            .filter(|kv| kv.value() == self.address.as_bytes())
        {
            tracing::info!(
                lease = kv.lease(),
                "ending an earlier run's campaign for the coordinator"
            );
            bounded(self.request_timeout, client.lease_revoke(kv.lease())).await?;
        }
        Ok(())
    }

    /// Who leads now, if anyone.
    pub async fn leader(&self) -> Result<Option<Leader>, StoreError> {
        let mut client = self.client.clone();
        let asked = tokio::time::timeout(self.request_timeout, client.leader(self.name.clone()))
            .await
            .map_err(|_| {
                StoreError::NoQuorum(format!("etcd did not answer in {:?}", self.request_timeout))
            })?;
        match asked {
            Ok(response) => Ok(response.kv().map(|kv| Leader {
                address: String::from_utf8_lossy(kv.value()).into_owned(),
                term: kv.create_revision() as u64,
            })),
            // The election's own answer when no candidate leads ("etcdserver: no leader" is
            // etcd without a quorum, an error).
            Err(etcd_client::Error::GRpcStatus(status))
                if status.message().contains("election: no leader") =>
            {
                Ok(None)
            }
            Err(e) => Err(etcd_error(e)),
        }
    }
}

/// `call`, failing as etcd's unavailability if it takes longer than `timeout`.
async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(answer) => answer.map_err(etcd_error),
        Err(_) => Err(StoreError::NoQuorum(format!(
            "etcd did not answer in {timeout:?}"
        ))),
    }
}

impl Leadership {
    pub fn term(&self) -> u64 {
        self.fence.term
    }

    /// Waits until this leadership is over, and answers why.
    pub async fn lost(&mut self) -> String {
        loop {
            if let Some(why) = self.lost.borrow().clone() {
                return why;
            }
            if self.lost.changed().await.is_err() {
                return "the lease's keeper ended".into();
            }
        }
    }

    /// Gives the leadership up at once (another candidate leads without waiting for the
    /// lease to expire), as far as etcd can be reached.
    pub async fn resign(mut self) {
        self.keeper.abort();
        let leader = ResignOptions::new().with_leader(self.leader_key.clone());
        let _ = bounded(RESIGN_TIMEOUT, self.client.resign(Some(leader))).await;
        let _ = bounded(RESIGN_TIMEOUT, self.client.lease_revoke(self.lease)).await;
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Renews `lease` every third of its TTL. Says why once it is lost: etcd answers that it
/// expired, or no renewal got through for a whole TTL, counted from the last renewal sent
/// that etcd answered. That is noticed at the next failed renewal, up to two thirds of a
/// TTL later; nothing rests on the moment (a leader's writes are fenced by its term).
async fn keep_alive(
    mut client: Client,
    lease: i64,
    ttl: Duration,
    lost: watch::Sender<Option<String>>,
) {
    let mut last_renewed = Instant::now();
    let mut stream = None;
    loop {
        if stream.is_none() {
            stream = tokio::time::timeout(ttl / 3, client.lease_keep_alive(lease))
                .await
                .ok()
                .and_then(Result::ok);
        }
        let sent_at = Instant::now();
        let answer = match stream.as_mut() {
            Some((keeper, responses)) => match keeper.keep_alive().await {
                Ok(()) => tokio::time::timeout(ttl / 3, responses.message())
                    .await
                    .map_err(|_| "etcd did not answer a renewal".to_string())
                    .and_then(|r| r.map_err(|e| e.to_string())),
                Err(e) => Err(e.to_string()),
            },
            None => Err("cannot reach etcd to renew the lease".into()),
        };
        match &answer {
            Ok(Some(renewed)) if renewed.ttl() > 0 => last_renewed = sent_at,
            Ok(Some(_)) => {
                let _ = lost.send(Some("etcd says the leader's lease expired".into()));
                return;
            }
            Ok(None) | Err(_) => {
                stream = None;
                if last_renewed.elapsed() >= ttl {
                    let why = match answer {
                        Err(e) => e.clone(),
                        _ => "the renewal stream ended".into(),
                    };
                    let _ = lost.send(Some(format!(
                        "the lease was not renewed for {ttl:?}: {why}"
                    )));
                    return;
                }
            }
        }
        tokio::time::sleep((ttl / 3).saturating_sub(sent_at.elapsed())).await;
    }
}
