//! `blockrepd.toml`: parsed, then validated, with errors that name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blockrep_coordinator::{EtcdSettings, EtcdTls};
use blockrep_core::Granularity;
use blockrep_replication::CongestionControl;
use blockrep_replication::production::ReplicationConfig;
use blockrep_tls::TlsFiles;
use blockrep_volume::TrackerConfig;
use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/blockrep/blockrepd.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node_name: String,
    availability_zone: String,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_runtime_dir")]
    runtime_dir: PathBuf,
    control_socket: Option<PathBuf>,
    control_socket_group: Option<String>,
    #[serde(default = "default_shutdown_grace_ms")]
    shutdown_grace_ms: u64,
    #[serde(default = "default_scheduling")]
    scheduling: String,
    #[serde(default)]
    bitmap: RawBitmap,
    #[serde(default)]
    nbd: RawNbd,
    cluster: Option<RawCluster>,
    coordinator: Option<RawCoordinator>,
    #[serde(default)]
    replication: RawReplication,
    metrics_listen: Option<String>,
    api: Option<RawApi>,
    pool: Option<RawPool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    path: PathBuf,
    capacity_bytes: ByteSize,
}

/// The `[pool]` section: a directory where the agent makes volumes on demand (`volume
/// create`, the DR volumes of SDRS replication pairs), as files preallocated with
/// `fallocate`, within a capacity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    pub path: PathBuf,
    pub capacity_bytes: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: String,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default = "default_quota_server_groups")]
    quota_server_groups: u64,
    #[serde(default = "default_quota_replications")]
    quota_replications: u64,
}

fn default_quota_server_groups() -> u64 {
    blockrep_rest::Quotas::default().server_groups
}

fn default_quota_replications() -> u64 {
    blockrep_rest::Quotas::default().replications
}

/// The `[api]` section: where the seed REST API (EVS v2, SDRS v1) is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// HTTPS with this PEM certificate chain and key; plain HTTP when `None`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// What each project may have (SDRS quotas).
    pub quotas: blockrep_rest::Quotas,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    listen: String,
    /// The coordinator (one), or
    coordinator: Option<String>,
    /// the coordinator candidates (an HA coordinator on etcd).
    coordinators: Option<Vec<String>>,
    ca_cert: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    coordinator_role: bool,
    #[serde(default = "default_peer_timeout_ms")]
    peer_timeout_ms: u64,
    #[serde(default = "default_congestion_control")]
    congestion_control: String,
    #[serde(default = "default_max_udp_payload")]
    max_udp_payload: i64,
}

/// The `[coordinator]` section, for a daemon with `cluster.coordinator_role`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCoordinator {
    #[serde(default = "default_store")]
    store: String,
    #[serde(default)]
    etcd_endpoints: Vec<String>,
    #[serde(default = "default_etcd_prefix")]
    etcd_prefix: String,
    etcd_ca: Option<PathBuf>,
    etcd_cert: Option<PathBuf>,
    etcd_key: Option<PathBuf>,
    #[serde(default = "default_lease_ttl_secs")]
    lease_ttl_secs: u64,
}

fn default_store() -> String {
    "redb".into()
}

fn default_etcd_prefix() -> String {
    EtcdSettings::DEFAULT_PREFIX.into()
}

fn default_lease_ttl_secs() -> u64 {
    5
}

fn default_congestion_control() -> String {
    "cubic".into()
}

fn default_max_udp_payload() -> i64 {
    blockrep_replication::MAX_UDP_PAYLOAD.into()
}

fn default_peer_timeout_ms() -> u64 {
    blockrep_replication::DEFAULT_PEER_TIMEOUT.as_millis() as u64
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplication {
    #[serde(default = "default_epoch_interval_ms")]
    epoch_interval_ms: u64,
    #[serde(default = "default_journal_bytes")]
    journal_bytes: ByteSize,
    #[serde(default = "default_apply_queue_bytes")]
    apply_queue_bytes: ByteSize,
    #[serde(default)]
    stage_log_max_bytes: Option<ByteSize>,
    #[serde(default)]
    max_bytes_per_sec: Option<ByteSize>,
    #[serde(default)]
    compression: Option<String>,
}

impl Default for RawReplication {
    fn default() -> Self {
        Self {
            epoch_interval_ms: default_epoch_interval_ms(),
            journal_bytes: default_journal_bytes(),
            apply_queue_bytes: default_apply_queue_bytes(),
            stage_log_max_bytes: None,
            max_bytes_per_sec: None,
            compression: None,
        }
    }
}

fn default_apply_queue_bytes() -> ByteSize {
    ByteSize::Bytes(ReplicationConfig::default().apply_queue_bytes)
}

fn default_epoch_interval_ms() -> u64 {
    ReplicationConfig::default().epoch_interval.as_millis() as u64
}

fn default_journal_bytes() -> ByteSize {
    ByteSize::Bytes(ReplicationConfig::default().journal_bytes)
}

/// The `[cluster]` section: this agent's QUIC endpoint, the coordinator's, and the
/// certificates every connection between hosts is authenticated with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    pub listen: SocketAddr,
    /// Where the coordinator is: the one, or every candidate of an HA coordinator (the
    /// agent follows whichever leads).
    pub coordinators: Vec<SocketAddr>,
    pub tls: TlsFiles,
    /// This daemon runs the coordinator, or is one of its candidates.
    pub coordinator_role: bool,
    /// Where this daemon's coordinator keeps its records (with `coordinator_role`).
    pub coordinator_store: CoordinatorStore,
    /// A peer silent this long is gone: its connection is dropped and its pairs leave
    /// `active`.
    pub peer_timeout: Duration,
    pub congestion: CongestionControl,
    /// The largest UDP payload the cluster's QUIC paths probe for and accept.
    pub max_udp_payload: u16,
}

/// Where the coordinator keeps its records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoordinatorStore {
    /// A redb file in the state directory: one coordinator.
    Redb,
    /// etcd: every daemon with `coordinator_role` is a candidate, one leads at a time.
    Etcd {
        settings: EtcdSettings,
        /// The leader's lease: a leader that does not renew it for this long is replaced.
        lease_ttl: Duration,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBitmap {
    #[serde(default = "default_true")]
    dirty_tracking: bool,
    #[serde(default = "default_granularity")]
    granularity: ByteSize,
    #[serde(default = "default_region_size")]
    region_size: ByteSize,
    #[serde(default = "default_active_regions")]
    active_regions: u64,
    #[serde(default = "default_flush_interval_ms")]
    flush_interval_ms: u64,
}

impl Default for RawBitmap {
    fn default() -> Self {
        Self {
            dirty_tracking: true,
            granularity: default_granularity(),
            region_size: default_region_size(),
            active_regions: default_active_regions(),
            flush_interval_ms: default_flush_interval_ms(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNbd {
    tcp_listen: Option<String>,
}

/// A size given as bytes (`4096`) or with a binary suffix (`"4KiB"`, `"4MiB"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ByteSize {
    fn bytes(&self) -> Result<u64, String> {
        match self {
            ByteSize::Bytes(n) => Ok(*n),
            ByteSize::Text(text) => blockrep_api::parse_size(text),
        }
    }
}

fn default_scheduling() -> String {
    "batch".into()
}

fn default_shutdown_grace_ms() -> u64 {
    20_000
}
fn default_true() -> bool {
    true
}
fn default_state_dir() -> PathBuf {
    "/var/lib/blockrep".into()
}
fn default_runtime_dir() -> PathBuf {
    "/run/blockrep".into()
}
fn default_granularity() -> ByteSize {
    ByteSize::Bytes(Granularity::DEFAULT.bytes())
}
fn default_region_size() -> ByteSize {
    ByteSize::Bytes(TrackerConfig::default().region_size)
}
fn default_active_regions() -> u64 {
    TrackerConfig::default().active_regions as u64
}
fn default_flush_interval_ms() -> u64 {
    TrackerConfig::default().flush_interval.as_millis() as u64
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    pub availability_zone: String,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub control_socket: PathBuf,
    /// The group that may use the control socket besides root (the package's `blockrep`).
    pub control_socket_group: Option<String>,
    /// How long clients get, at shutdown, to take the replies to their requests in flight.
    pub shutdown_grace: Duration,
    /// The scheduling policy of the agent's threads (`scheduling`).
    pub scheduling: Scheduling,
    /// `None` when dirty tracking is switched off (benchmarks only).
    pub tracker: Option<TrackerConfig>,
    pub nbd_tcp_listen: Option<SocketAddr>,
    /// `None`: the daemon works alone, as without replication.
    pub cluster: Option<ClusterConfig>,
    pub replication: ReplicationConfig,
    /// Where Prometheus text metrics are served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The REST API, if served here.
    pub api: Option<ApiConfig>,
    /// Where volumes are made on demand, if anywhere.
    pub pool: Option<PoolConfig>,
}

/// The scheduling policy of every thread of the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduling {
    /// `SCHED_BATCH`: a thread of the agent that another wakes does not preempt it, nor the
    /// applications beside it. On a busy CPU the connection thread queues every write it took
    /// in before the thread that sends them runs, and so on down the path: writes travel in
    /// batches instead of each with its own packets and wake-ups.
    Batch,
    /// As the agent was started (`SCHED_OTHER`, unless its unit says otherwise).
    Normal,
}

impl std::str::FromStr for Scheduling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "batch" => Ok(Self::Batch),
            "normal" => Ok(Self::Normal),
            other => Err(format!(
                "{other:?} is not a policy: \"batch\" or \"normal\""
            )),
        }
    }
}

/// The `[coordinator]` section, checked.
fn coordinator_store(
    raw: Option<RawCoordinator>,
    listen: SocketAddr,
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<CoordinatorStore, ConfigError> {
    let Some(raw) = raw else {
        return Ok(CoordinatorStore::Redb);
    };
    match raw.store.as_str() {
        "redb" => return Ok(CoordinatorStore::Redb),
        "etcd" => {}
        other => {
            return Err(invalid(
                "coordinator.store",
                format!("{other:?} is not a store: \"redb\" (one coordinator) or \"etcd\""),
            ));
        }
    }
    if raw.etcd_endpoints.is_empty() {
        return Err(invalid(
            "coordinator.etcd_endpoints",
            "lists no endpoint: give every etcd member's client URL".into(),
        ));
    }
    let https = raw.etcd_endpoints.iter().any(|e| e.starts_with("https://"));
    for endpoint in &raw.etcd_endpoints {
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(invalid(
                "coordinator.etcd_endpoints",
                format!("{endpoint:?} is not an http:// or https:// URL"),
            ));
        }
    }
    let tls = match (raw.etcd_ca, raw.etcd_cert, raw.etcd_key) {
        (None, None, None) if https => {
            return Err(invalid(
                "coordinator.etcd_ca",
                "https endpoints need etcd_ca, etcd_cert and etcd_key (mutual TLS)".into(),
            ));
        }
        (None, None, None) => None,
        (Some(ca), Some(cert), Some(key)) => {
            for (k, file) in [
                ("coordinator.etcd_ca", &ca),
                ("coordinator.etcd_cert", &cert),
                ("coordinator.etcd_key", &key),
            ] {
                if !file.is_absolute() {
                    return Err(invalid(
                        k,
                        format!("{} is not an absolute path", file.display()),
                    ));
                }
            }
            Some(EtcdTls { ca, cert, key })
        }
        _ => {
            return Err(invalid(
                "coordinator.etcd_ca",
                "give etcd_ca, etcd_cert and etcd_key together".into(),
            ));
        }
    };
    if !raw.etcd_prefix.starts_with('/') || raw.etcd_prefix.len() < 2 {
        return Err(invalid(
            "coordinator.etcd_prefix",
            format!("{:?} must start with / and name something", raw.etcd_prefix),
        ));
    }
    if !(2..=60).contains(&raw.lease_ttl_secs) {
        return Err(invalid(
            "coordinator.lease_ttl_secs",
            format!("{} must be from 2 to 60", raw.lease_ttl_secs),
        ));
    }
    if listen.ip().is_unspecified() {
        return Err(invalid(
            "cluster.listen",
            format!(
                "{listen}: a coordinator candidate gives its listen address to the others as the leader's, so it must be one they can reach"
            ),
        ));
    }
    Ok(CoordinatorStore::Etcd {
        settings: EtcdSettings {
            endpoints: raw.etcd_endpoints,
            prefix: raw.etcd_prefix,
            tls,
            request_timeout: EtcdSettings::DEFAULT_REQUEST_TIMEOUT,
        },
        lease_ttl: Duration::from_secs(raw.lease_ttl_secs),
    })
}

/// The largest single NBD write, which one admission must fit in the activity log.
const MAX_WRITE: u64 = 64 << 20;

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |key, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };

        check_label(&raw.node_name).map_err(|m| invalid("node_name", m))?;
        check_label(&raw.availability_zone).map_err(|m| invalid("availability_zone", m))?;
        for (key, dir) in [
            ("state_dir", &raw.state_dir),
            ("runtime_dir", &raw.runtime_dir),
        ] {
            if !dir.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{} is not an absolute path", dir.display()),
                ));
            }
        }
        let control_socket = raw
            .control_socket
            .unwrap_or_else(|| raw.runtime_dir.join("control.sock"));
        if !control_socket.is_absolute() {
            return Err(invalid(
                "control_socket",
                format!("{} is not an absolute path", control_socket.display()),
            ));
        }
        if let Some(group) = &raw.control_socket_group {
            check_label(group).map_err(|m| invalid("control_socket_group", m))?;
        }

        if raw.shutdown_grace_ms > 600_000 {
            return Err(invalid(
                "shutdown_grace_ms",
                format!("{} must be at most 600000", raw.shutdown_grace_ms),
            ));
        }
        let scheduling = raw
            .scheduling
            .parse()
            .map_err(|m| invalid("scheduling", m))?;
        let b = &raw.bitmap;
        let granularity = b
            .granularity
            .bytes()
            .map_err(|m| invalid("bitmap.granularity", m))?;
        let granularity = Granularity::new(granularity)
            .map_err(|e| invalid("bitmap.granularity", e.to_string()))?;
        let region_size = b
            .region_size
            .bytes()
            .map_err(|m| invalid("bitmap.region_size", m))?;
        if !region_size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&region_size) {
            return Err(invalid(
                "bitmap.region_size",
                format!("{region_size} must be a power of two from 1 MiB to 1 GiB"),
            ));
        }
        if region_size < granularity.bytes() {
            return Err(invalid(
                "bitmap.region_size",
                format!("{region_size} is smaller than bitmap.granularity"),
            ));
        }
        let min_regions = (MAX_WRITE / region_size + 2).max(16);
        if b.active_regions < min_regions || b.active_regions > 65536 {
            return Err(invalid(
                "bitmap.active_regions",
                format!(
                    "{} must be from {min_regions} to 65536 (a 64 MiB write must fit)",
                    b.active_regions
                ),
            ));
        }
        if !(10..=60_000).contains(&b.flush_interval_ms) {
            return Err(invalid(
                "bitmap.flush_interval_ms",
                format!("{} must be from 10 to 60000", b.flush_interval_ms),
            ));
        }
        let tracker = b.dirty_tracking.then_some(TrackerConfig {
            granularity,
            region_size,
            active_regions: b.active_regions as usize,
            flush_interval: Duration::from_millis(b.flush_interval_ms),
        });
        let nbd_tcp_listen = raw
            .nbd
            .tcp_listen
            .as_deref()
            .map(|a| {
                a.parse::<SocketAddr>()
                    .map_err(|e| invalid("nbd.tcp_listen", format!("{a:?}: {e}")))
            })
            .transpose()?;

        let raw_coordinator = raw.coordinator.take();
        if raw_coordinator.is_some() && !raw.cluster.as_ref().is_some_and(|c| c.coordinator_role) {
            return Err(invalid(
                "coordinator",
                "the [coordinator] section is for a daemon with cluster.coordinator_role = true"
                    .into(),
            ));
        }
        let cluster = raw
            .cluster
            .map(|c| -> Result<ClusterConfig, ConfigError> {
                let addr = |key, value: &str| {
                    value
                        .parse::<SocketAddr>()
                        .map_err(|e| invalid(key, format!("{value:?}: {e}")))
                };
                let listen = addr("cluster.listen", &c.listen)?;
                let (key, listed) = match (&c.coordinator, &c.coordinators) {
                    (Some(one), None) => ("cluster.coordinator", vec![one.clone()]),
                    (None, Some(many)) if !many.is_empty() => ("cluster.coordinators", many.clone()),
                    (None, Some(_)) => {
                        return Err(invalid("cluster.coordinators", "lists no address".into()));
                    }
                    (None, None) => {
                        return Err(invalid(
                            "cluster.coordinator",
                            "is required (or cluster.coordinators, the candidates of an HA coordinator)"
                                .into(),
                        ));
                    }
                    (Some(_), Some(_)) => {
                        return Err(invalid(
                            "cluster.coordinators",
                            "give cluster.coordinator or cluster.coordinators, not both".into(),
                        ));
                    }
                };
                let mut coordinators = Vec::new();
                for text in &listed {
                    let coordinator = addr(key, text)?;
                    if coordinator.ip().is_unspecified() {
                        return Err(invalid(
                            key,
                            format!("{coordinator} is not an address another host can reach"),
                        ));
                    }
                    coordinators.push(coordinator);
                }
                for (key, file) in [
                    ("cluster.ca_cert", &c.ca_cert),
                    ("cluster.cert", &c.cert),
                    ("cluster.key", &c.key),
                ] {
                    if !file.is_absolute() {
                        return Err(invalid(
                            key,
                            format!("{} is not an absolute path", file.display()),
                        ));
                    }
                }
                if !(500..=600_000).contains(&c.peer_timeout_ms) {
                    return Err(invalid(
                        "cluster.peer_timeout_ms",
                        format!("{} must be from 500 to 600000", c.peer_timeout_ms),
                    ));
                }
                let payloads = i64::from(blockrep_replication::MIN_UDP_PAYLOAD)
                    ..=i64::from(blockrep_replication::MAX_UDP_PAYLOAD);
                let max_udp_payload = u16::try_from(c.max_udp_payload)
                    .ok()
                    .filter(|bytes| payloads.contains(&i64::from(*bytes)))
                    .ok_or_else(|| {
                        invalid(
                            "cluster.max_udp_payload",
                            format!(
                                "{} must be from {} to {}",
                                c.max_udp_payload,
                                payloads.start(),
                                payloads.end()
                            ),
                        )
                    })?;
                let congestion = c
                    .congestion_control
                    .parse()
                    .map_err(|e| invalid("cluster.congestion_control", e))?;
                let coordinator_store =
                    coordinator_store(raw_coordinator, listen, &invalid)?;
                Ok(ClusterConfig {
                    peer_timeout: Duration::from_millis(c.peer_timeout_ms),
                    congestion,
                    max_udp_payload,
                    listen,
                    coordinators,
                    coordinator_store,
                    tls: TlsFiles {
                        ca_cert: c.ca_cert,
                        cert: c.cert,
                        key: c.key,
                    },
                    coordinator_role: c.coordinator_role,
                })
            })
            .transpose()?;
        let r = &raw.replication;
        if !(50..=60_000).contains(&r.epoch_interval_ms) {
            return Err(invalid(
                "replication.epoch_interval_ms",
                format!("{} must be from 50 to 60000", r.epoch_interval_ms),
            ));
        }
        let journal_bytes = r
            .journal_bytes
            .bytes()
            .map_err(|m| invalid("replication.journal_bytes", m))?;
        if !(1 << 20..=64 << 30).contains(&journal_bytes) {
            return Err(invalid(
                "replication.journal_bytes",
                format!("{journal_bytes} must be from 1 MiB to 64 GiB"),
            ));
        }
        let apply_queue_bytes = r
            .apply_queue_bytes
            .bytes()
            .map_err(|m| invalid("replication.apply_queue_bytes", m))?;
        if !(1 << 20..=4 << 30).contains(&apply_queue_bytes) {
            return Err(invalid(
                "replication.apply_queue_bytes",
                format!("{apply_queue_bytes} must be from 1 MiB to 4 GiB"),
            ));
        }
        let stage_log_max_bytes = r
            .stage_log_max_bytes
            .as_ref()
            .map(|b| b.bytes())
            .transpose()
            .map_err(|m| invalid("replication.stage_log_max_bytes", m))?;
        if let Some(cap) = stage_log_max_bytes
            && cap < 1 << 20
        {
            return Err(invalid(
                "replication.stage_log_max_bytes",
                format!("{cap} must be at least 1 MiB"),
            ));
        }
        let max_bytes_per_sec = r
            .max_bytes_per_sec
            .as_ref()
            .map(|b| b.bytes())
            .transpose()
            .map_err(|m| invalid("replication.max_bytes_per_sec", m))?;
        if let Some(rate) = max_bytes_per_sec {
            blockrep_replication::send_limit::SendLimit::new(Some(rate))
                .map_err(|m| invalid("replication.max_bytes_per_sec", m))?;
        }
        let compression = r
            .compression
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|m| invalid("replication.compression", m))?
            .unwrap_or_default();
        let replication = ReplicationConfig {
            compression,
            epoch_interval: Duration::from_millis(r.epoch_interval_ms),
            journal_bytes,
            apply_queue_bytes,
            stage_log_max_bytes,
            max_bytes_per_sec,
            peer_timeout: cluster
                .as_ref()
                .map_or(ReplicationConfig::default().peer_timeout, |c| {
                    c.peer_timeout
                }),
            ..ReplicationConfig::default()
        };
        let metrics_listen = raw
            .metrics_listen
            .as_deref()
            .map(|a| {
                a.parse::<SocketAddr>()
                    .map_err(|e| invalid("metrics_listen", format!("{a:?}: {e}")))
            })
            .transpose()?;
        if raw.api.is_some() && cluster.is_none() {
            return Err(invalid(
                "api",
                "the REST API's calls go to the coordinator: it needs a [cluster] section".into(),
            ));
        }
        let api = raw
            .api
            .map(|a| -> Result<ApiConfig, ConfigError> {
                let listen = a
                    .listen
                    .parse::<SocketAddr>()
                    .map_err(|e| invalid("api.listen", format!("{:?}: {e}", a.listen)))?;
                let tls = match (a.tls_cert, a.tls_key) {
                    (None, None) => None,
                    (Some(cert), Some(key)) => {
                        for (k, file) in [("api.tls_cert", &cert), ("api.tls_key", &key)] {
                            if !file.is_absolute() {
                                return Err(invalid(
                                    k,
                                    format!("{} is not an absolute path", file.display()),
                                ));
                            }
                        }
                        Some((cert, key))
                    }
                    (Some(_), None) => {
                        return Err(invalid(
                            "api.tls_key",
                            "is required with api.tls_cert".into(),
                        ));
                    }
                    (None, Some(_)) => {
                        return Err(invalid(
                            "api.tls_cert",
                            "is required with api.tls_key".into(),
                        ));
                    }
                };
                Ok(ApiConfig {
                    listen,
                    tls,
                    quotas: blockrep_rest::Quotas {
                        server_groups: a.quota_server_groups,
                        replications: a.quota_replications,
                    },
                })
            })
            .transpose()?;
        let pool = raw
            .pool
            .map(|p| -> Result<PoolConfig, ConfigError> {
                if !p.path.is_absolute() {
                    return Err(invalid(
                        "pool.path",
                        format!("{} is not an absolute path", p.path.display()),
                    ));
                }
                let capacity_bytes = p
                    .capacity_bytes
                    .bytes()
                    .map_err(|m| invalid("pool.capacity_bytes", m))?;
                if capacity_bytes < 1 << 20 {
                    return Err(invalid(
                        "pool.capacity_bytes",
                        format!("{capacity_bytes} must be at least 1 MiB"),
                    ));
                }
                Ok(PoolConfig {
                    path: p.path,
                    capacity_bytes,
                })
            })
            .transpose()?;

        Ok(Self {
            node_name: raw.node_name,
            availability_zone: raw.availability_zone,
            state_dir: raw.state_dir,
            runtime_dir: raw.runtime_dir,
            control_socket,
            control_socket_group: raw.control_socket_group,
            shutdown_grace: Duration::from_millis(raw.shutdown_grace_ms),
            scheduling,
            tracker,
            nbd_tcp_listen,
            cluster,
            replication,
            metrics_listen,
            api,
            pool,
        })
    }

    /// Where a volume's NBD socket lives.
    pub fn nbd_socket(&self, volume_name: &str) -> PathBuf {
        self.runtime_dir
            .join("nbd")
            .join(format!("{volume_name}.sock"))
    }
}

fn check_label(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > 255
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "{value:?} must be at most 255 letters, digits, '.', '_' or '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    const MINIMAL: &str = "node_name = \"host-a\"\navailability_zone = \"az1\"\n";

    #[test]
    fn minimal_file_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.control_socket, Path::new("/run/blockrep/control.sock"));
        assert_eq!(c.tracker, Some(TrackerConfig::default()));
        assert_eq!(c.nbd_tcp_listen, None);
        assert_eq!(c.scheduling, Scheduling::Batch);
    }

    #[test]
    fn the_scheduling_is_one_of_two() {
        let c = parse(&format!("{MINIMAL}scheduling = \"normal\"\n")).unwrap();
        assert_eq!(c.scheduling, Scheduling::Normal);
        assert!(
            error_of(&format!("{MINIMAL}scheduling = \"fifo\"\n"))
                .contains("scheduling: \"fifo\" is not a policy")
        );
    }

    #[test]
    fn sizes_take_suffixes() {
        let c = parse(&format!(
            "{MINIMAL}[bitmap]\ngranularity = \"64KiB\"\nregion_size = \"8MiB\"\n"
        ))
        .unwrap();
        let t = c.tracker.unwrap();
        assert_eq!((t.granularity.bytes(), t.region_size), (65536, 8 << 20));
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_api_and_the_pool_are_checked() {
        let cluster = "[cluster]\nlisten = \"127.0.0.1:7790\"\ncoordinator = \"127.0.0.1:7790\"\nca_cert = \"/c/ca.pem\"\ncert = \"/c/n.pem\"\nkey = \"/c/n.key\"\n";
        let api = "[api]\nlisten = \"127.0.0.1:8776\"\n";
        let c = parse(&format!("{MINIMAL}{api}{cluster}")).unwrap();
        assert_eq!(c.api.unwrap().quotas, blockrep_rest::Quotas::default());
        assert!(error_of(&format!("{MINIMAL}{api}")).contains("needs a [cluster] section"));
        assert!(
            error_of(&format!(
                "{MINIMAL}[api]\nlisten = \"127.0.0.1:8776\"\ntls_cert = \"/a.pem\"\n{cluster}"
            ))
            .contains("api.tls_key: is required with api.tls_cert")
        );
        assert!(
            error_of(&format!(
                "{MINIMAL}[pool]\npath = \"pool\"\ncapacity_bytes = \"1GiB\"\n"
            ))
            .contains("pool.path: pool is not an absolute path")
        );
        assert!(
            error_of(&format!(
                "{MINIMAL}[pool]\npath = \"/p\"\ncapacity_bytes = 100\n"
            ))
            .contains("pool.capacity_bytes")
        );
    }

    #[test]
    fn errors_name_the_key() {
        assert!(
            error_of(&format!("{MINIMAL}[bitmap]\ngranularity = 6000\n"))
                .contains("bitmap.granularity: bitmap granularity 6000")
        );
        assert!(
            error_of(&format!("{MINIMAL}[bitmap]\ngranularity = \"4XB\"\n"))
                .contains("unknown unit")
        );
        assert!(
            error_of(&format!("{MINIMAL}[bitmap]\nactive_regions = 3\n"))
                .contains("bitmap.active_regions")
        );
        assert!(
            error_of(&format!("{MINIMAL}[nbd]\ntcp_listen = \"nowhere\"\n"))
                .contains("nbd.tcp_listen")
        );
        assert!(
            error_of(&format!("{MINIMAL}state_dir = \"relative\"\n"))
                .contains("state_dir: relative is not an absolute path")
        );
        assert!(
            error_of("node_name = \"a b\"\navailability_zone = \"az1\"\n").contains("node_name:")
        );
        assert!(error_of("availability_zone = \"az1\"\n").contains("missing field `node_name`"));
        assert!(error_of(&format!("{MINIMAL}colour = 1\n")).contains("unknown field `colour`"));
    }

    #[test]
    fn the_largest_udp_payload_defaults_to_the_bound_and_stays_within_it() {
        let cluster = "[cluster]\nlisten = \"127.0.0.1:7790\"\ncoordinator = \"127.0.0.1:7790\"\nca_cert = \"/c/ca.pem\"\ncert = \"/c/n.pem\"\nkey = \"/c/n.key\"\n";
        let c = parse(&format!("{MINIMAL}{cluster}"))
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.max_udp_payload, 6500);
        let c = parse(&format!("{MINIMAL}{cluster}max_udp_payload = 1472\n"))
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.max_udp_payload, 1472);
        for refused in [-1, 1199, 6501, 70000] {
            assert!(
                error_of(&format!("{MINIMAL}{cluster}max_udp_payload = {refused}\n")).contains(
                    &format!("cluster.max_udp_payload: {refused} must be from 1200 to 6500")
                ),
                "{refused}"
            );
        }
    }

    #[test]
    fn an_ha_coordinator_is_configured_and_checked() {
        let cluster = "[cluster]\nlisten = \"10.0.1.5:7790\"\ncoordinators = [\"10.0.1.5:7790\", \"10.0.2.5:7790\", \"10.0.3.5:7790\"]\nca_cert = \"/c/ca.pem\"\ncert = \"/c/n.pem\"\nkey = \"/c/n.key\"\ncoordinator_role = true\n";
        let section = "[coordinator]\nstore = \"etcd\"\netcd_endpoints = [\"https://10.0.1.9:2379\", \"https://10.0.2.9:2379\", \"https://10.0.3.9:2379\"]\netcd_ca = \"/e/ca.pem\"\netcd_cert = \"/e/c.pem\"\netcd_key = \"/e/c.key\"\n";
        let c = parse(&format!("{MINIMAL}{cluster}{section}"))
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.coordinators.len(), 3);
        let CoordinatorStore::Etcd {
            settings,
            lease_ttl,
        } = &c.coordinator_store
        else {
            panic!("{:?}", c.coordinator_store);
        };
        assert_eq!(*lease_ttl, Duration::from_secs(5), "the default TTL");
        assert_eq!(settings.prefix, "/blockrep");
        assert!(settings.tls.is_some());
        // Without the section: the embedded store.
        let c = parse(&format!("{MINIMAL}{cluster}"))
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.coordinator_store, CoordinatorStore::Redb);

        for (bad, key) in [
            (
                section.replace("\"etcd\"", "\"zookeeper\""),
                "coordinator.store",
            ),
            (
                section.replace("etcd_ca = \"/e/ca.pem\"\n", ""),
                "coordinator.etcd_ca",
            ),
            (
                section.replace(
                    "etcd_ca = \"/e/ca.pem\"\netcd_cert = \"/e/c.pem\"\netcd_key = \"/e/c.key\"\n",
                    "",
                ),
                "https endpoints need etcd_ca",
            ),
            (
                format!("{section}lease_ttl_secs = 1\n"),
                "coordinator.lease_ttl_secs",
            ),
            (
                section.replace("https://10.0.1.9:2379", "10.0.1.9:2379"),
                "coordinator.etcd_endpoints",
            ),
            (
                format!("{section}etcd_prefix = \"blockrep\"\n"),
                "coordinator.etcd_prefix",
            ),
        ] {
            let error = error_of(&format!("{MINIMAL}{cluster}{bad}"));
            assert!(error.contains(key), "{key}: {error}");
        }
        // A candidate's listen address is the leader's address others are given.
        assert!(
            error_of(&format!(
                "{MINIMAL}{}{section}",
                cluster.replace("listen = \"10.0.1.5", "listen = \"0.0.0.0")
            ))
            .contains("cluster.listen")
        );
        // The section is for a coordinator's daemon only.
        assert!(
            error_of(&format!(
                "{MINIMAL}{}{section}",
                cluster.replace("coordinator_role = true", "coordinator_role = false")
            ))
            .contains("[coordinator] section is for a daemon with cluster.coordinator_role")
        );
        // One coordinator or a list, not both, and not none.
        assert!(
            error_of(&format!(
                "{MINIMAL}{}",
                cluster.replace(
                    "coordinators = [",
                    "coordinator = \"10.0.1.5:7790\"\ncoordinators = ["
                )
            ))
            .contains("not both")
        );
        assert!(
            error_of(&format!(
                "{MINIMAL}{}",
                cluster.replace(
                    "coordinators = [\"10.0.1.5:7790\", \"10.0.2.5:7790\", \"10.0.3.5:7790\"]",
                    "coordinators = []"
                )
            ))
            .contains("lists no address")
        );
    }

    #[test]
    fn the_cluster_section_is_checked() {
        let cluster = "[cluster]\nlisten = \"0.0.0.0:7790\"\ncoordinator = \"10.0.0.1:7790\"\nca_cert = \"/etc/blockrep/tls/ca.pem\"\ncert = \"/etc/blockrep/tls/node.pem\"\nkey = \"/etc/blockrep/tls/node.key\"\n";
        let c = parse(&format!("{MINIMAL}{cluster}")).unwrap();
        let cluster_config = c.cluster.unwrap();
        assert_eq!(cluster_config.listen.port(), 7790);
        assert!(!cluster_config.coordinator_role);
        assert!(
            parse(MINIMAL).unwrap().cluster.is_none(),
            "no section: alone"
        );
        assert!(
            error_of(&format!(
                "{MINIMAL}{}",
                cluster.replace("10.0.0.1", "0.0.0.0")
            ))
            .contains("cluster.coordinator")
        );
        assert!(
            error_of(&format!(
                "{MINIMAL}{}",
                cluster.replace("/etc/blockrep/tls/ca.pem", "ca.pem")
            ))
            .contains("cluster.ca_cert: ca.pem is not an absolute path")
        );
        assert!(
            error_of(&format!(
                "{MINIMAL}[replication]\njournal_bytes = \"1KiB\"\n"
            ))
            .contains("replication.journal_bytes")
        );
        assert!(
            error_of(&format!("{MINIMAL}{cluster}colour = 1\n")).contains("unknown field `colour`")
        );
    }

    #[test]
    fn a_send_limit_is_a_size_per_second_of_at_least_1_mib() {
        let limited = parse(&format!(
            "{MINIMAL}[replication]\nmax_bytes_per_sec = \"100MiB\"\n"
        ))
        .unwrap();
        assert_eq!(limited.replication.max_bytes_per_sec, Some(100 << 20));
        assert_eq!(parse(MINIMAL).unwrap().replication.max_bytes_per_sec, None);
        assert!(
            error_of(&format!(
                "{MINIMAL}[replication]\nmax_bytes_per_sec = \"100KiB\"\n"
            ))
            .contains("replication.max_bytes_per_sec: a send limit of 102400 bytes per second is below the least")
        );
    }

    #[test]
    fn compression_is_zstd_or_off_and_off_by_default() {
        use blockrep_replication::compression::Compression;
        let zstd = parse(&format!("{MINIMAL}[replication]\ncompression = \"zstd\"\n")).unwrap();
        assert_eq!(zstd.replication.compression, Compression::Zstd);
        assert_eq!(
            parse(MINIMAL).unwrap().replication.compression,
            Compression::Off
        );
        let error = error_of(&format!("{MINIMAL}[replication]\ncompression = \"lz4\"\n"));
        assert!(
            error.contains("replication.compression: \"lz4\" is not a compression"),
            "{error}"
        );
    }

    #[test]
    fn tracking_can_be_switched_off() {
        let c = parse(&format!("{MINIMAL}[bitmap]\ndirty_tracking = false\n")).unwrap();
        assert_eq!(c.tracker, None);
    }
}
