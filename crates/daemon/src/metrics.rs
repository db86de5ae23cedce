//! Prometheus text metrics on `metrics_listen`: per volume, per pair, per endpoint, and (on
//! the coordinator's daemon) per consistency group. Built at each scrape from the same
//! figures `blockrep status`, `pair show` and `group show` read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::agent::Agent;
use crate::cluster::Cluster;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DrillLabels {
    export: String,
    drill: String,
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PairLabels {
    pair: String,
    volume: String,
    side: String,
    model: String,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CutRoundLabels {
    group: String,
    model: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupStatusLabels {
    group: String,
    status: String,
    replication_status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    pair: String,
    side: String,
    status: String,
}

type CounterFamily<L> = Family<L, Counter>;
type GaugeFamily<L> = Family<L, Gauge<f64, std::sync::atomic::AtomicU64>>;

/// The metrics text, as of now.
pub fn render(agent: &Agent, cluster: Option<&Cluster>) -> String {
    let mut registry = Registry::with_prefix("blockrep");

    let read = CounterFamily::<VolumeLabels>::default();
    let written = CounterFamily::<VolumeLabels>::default();
    let dirty = GaugeFamily::<VolumeLabels>::default();
    for v in agent.volume_protos() {
        let labels = VolumeLabels { volume: v.name };
        read.get_or_create(&labels).inc_by(v.bytes_read);
        written.get_or_create(&labels).inc_by(v.bytes_written);
        dirty.get_or_create(&labels).set(v.dirty_bytes as f64);
    }
    registry.register("volume_read_bytes", "Bytes NBD clients read", read);
    registry.register("volume_written_bytes", "Bytes NBD clients wrote", written);
    registry.register(
        "volume_dirty_bytes",
        "Bytes marked dirty in the bitmap",
        dirty,
    );
    if let Some(pool) = agent.pool_usage() {
        let capacity = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        capacity.set(pool.capacity_bytes as f64);
        let used = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        used.set(pool.used_bytes as f64);
        registry.register(
            "pool_capacity_bytes",
            "What the storage pool may hold",
            capacity,
        );
        registry.register(
            "pool_used_bytes",
            "What the storage pool's volumes take",
            used,
        );
    }

    // Drill volumes: role drill, never a pair's.
    let drill_written = GaugeFamily::<DrillLabels>::default();
    for d in crate::agent::drill_protos(agent) {
        drill_written
            .get_or_create(&DrillLabels {
                export: d.export,
                drill: d.drill_id,
                role: "drill".into(),
            })
            .set(d.written_bytes as f64);
    }
    registry.register(
        "drill_written_bytes",
        "Bytes a drill volume's clients wrote (to its overlay)",
        drill_written,
    );

    let sent = CounterFamily::<PairLabels>::default();
    let extents = CounterFamily::<PairLabels>::default();
    let rejected = CounterFamily::<PairLabels>::default();
    let received = CounterFamily::<PairLabels>::default();
    let resync_sent = CounterFamily::<PairLabels>::default();
    let coalesced = CounterFamily::<PairLabels>::default();
    let out_of_sync = GaugeFamily::<PairLabels>::default();
    let lag = GaugeFamily::<PairLabels>::default();
    let journal = GaugeFamily::<PairLabels>::default();
    let journal_limit = GaugeFamily::<PairLabels>::default();
    let resync_rate = GaugeFamily::<PairLabels>::default();
    let progress = GaugeFamily::<PairLabels>::default();
    let status = GaugeFamily::<StatusLabels>::default();
    for p in crate::pair_proto::pair_states(agent.pairs()) {
        let labels = PairLabels {
            pair: p.pair_id.clone(),
            volume: p.volume_name.clone(),
            side: p.side.clone(),
            model: p.replication_model.clone(),
            peer: p.peer_node.clone(),
        };
        let c = p.counters.unwrap_or_default();
        sent.get_or_create(&labels).inc_by(c.bytes_sent);
        extents.get_or_create(&labels).inc_by(c.extents_sent);
        rejected.get_or_create(&labels).inc_by(c.extents_rejected);
        received.get_or_create(&labels).inc_by(c.bytes_received);
        resync_sent
            .get_or_create(&labels)
            .inc_by(c.resync_bytes_sent);
        coalesced.get_or_create(&labels).inc_by(c.coalesced_bytes);
        out_of_sync
            .get_or_create(&labels)
            .set(p.out_of_sync_bytes as f64);
        lag.get_or_create(&labels).set(p.lag_seconds);
        journal.get_or_create(&labels).set(c.journal_bytes as f64);
        journal_limit
            .get_or_create(&labels)
            .set(c.journal_limit as f64);
        resync_rate.get_or_create(&labels).set(c.resync_rate);
        progress.get_or_create(&labels).set(p.progress);
        status
            .get_or_create(&StatusLabels {
                pair: p.pair_id,
                side: p.side,
                status: p.replication_status,
            })
            .set(1.0);
    }
    registry.register("pair_sent_bytes", "Bytes sent to the DR side", sent);
    registry.register("pair_extents_sent", "Extents sent to the DR side", extents);
    registry.register(
        "pair_extents_rejected",
        "Extents the DR side rejected (CRC mismatch); each is sent again",
        rejected,
    );
    registry.register(
        "pair_received_bytes",
        "Bytes received from the peer (DR side: bytes written)",
        received,
    );
    registry.register(
        "pair_resync_sent_bytes",
        "Bytes of initial sync and catch-up extents sent",
        resync_sent,
    );
    registry.register(
        "pair_coalesced_bytes",
        "Bytes of async writes not sent: a later write of the same epoch to the same range replaced them",
        coalesced,
    );
    registry.register(
        "pair_out_of_sync_bytes",
        "Bytes that may differ from the DR side",
        out_of_sync,
    );
    registry.register(
        "pair_lag_seconds",
        "How far the DR side's consistent image trails production",
        lag,
    );
    registry.register(
        "pair_journal_bytes",
        "Bytes queued for the DR side",
        journal,
    );
    registry.register(
        "pair_journal_limit_bytes",
        "Bytes the queue may hold before an async pair falls back to bitmap mode",
        journal_limit,
    );
    registry.register(
        "pair_resync_rate_bytes_per_second",
        "Rate of the running or last resync",
        resync_rate,
    );
    registry.register("pair_progress", "Resync progress, 0 to 1", progress);
    registry.register(
        "pair_replication_status",
        "1 for the pair's current replication status",
        status,
    );

    if let Some(cluster) = cluster {
        let refused = Counter::<u64>::default();
        refused.inc_by(
            cluster
                .endpoint
                .counters
                .peers_refused
                .load(Ordering::Relaxed),
        );
        registry.register(
            "peers_refused",
            "QUIC peers refused (no certificate, or one another CA signed)",
            refused,
        );
        let streams = Counter::<u64>::default();
        streams.inc_by(
            cluster
                .endpoint
                .counters
                .streams_refused
                .load(Ordering::Relaxed),
        );
        registry.register(
            "streams_refused",
            "Streams refused for a malformed or unexpected first frame",
            streams,
        );
        let requests = CounterFamily::<RefusalLabels>::default();
        for reason in blockrep_replication::endpoint::Refusal::ALL {
            requests
                .get_or_create(&RefusalLabels {
                    reason: reason.as_str().into(),
                })
                .inc_by(cluster.endpoint.counters.refused(reason));
        }
        registry.register(
            "requests_refused",
            "Requests and streams of authenticated peers refused for what they asked (a role command not from the coordinator, a report for another node, a stream from another node than the pair's peer, a range past the volume, a command of a coordinator term older than the node follows)",
            requests,
        );
        register_coordinator_role(&mut registry, cluster);
        if let Some(coordinator) = cluster.coordinator() {
            register_groups(&mut registry, &coordinator);
        }
    }

    let mut out = String::new();
    if let Err(e) = encode(&mut out, &registry) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    out
}

/// Whether this daemon leads the coordinator, in which term, and the term its agent follows.
fn register_coordinator_role(registry: &mut Registry, cluster: &Cluster) {
    let leading = Gauge::<i64>::default();
    let term = Gauge::<i64>::default();
    if let Some(coordinator) = cluster.coordinator() {
        leading.set(1);
        term.set(coordinator.term() as i64);
    }
    registry.register(
        "coordinator_leading",
        "1 if this daemon runs the coordinator now (the leader, for an HA coordinator)",
        leading,
    );
    registry.register(
        "coordinator_term",
        "The leader term of the coordinator this daemon runs (0 with the embedded store)",
        term,
    );
    let followed = Gauge::<i64>::default();
    followed.set(cluster.followed_term() as i64);
    registry.register(
        "coordinator_term_followed",
        "The highest coordinator term this agent has seen: commands of older terms are refused",
        followed,
    );
    let fenced = Counter::<u64>::default();
    fenced.inc_by(cluster.fenced_commits());
    registry.register(
        "coordinator_commits_fenced",
        "Times etcd refused a commit or a check of this daemon's leader term (it had been deposed): each ends a leadership",
        fenced,
    );
}

/// The consistency groups, on the daemon that runs the coordinator: fault level, pairs and
/// consistent epoch per group, its status and replication status as a 1, and its cut
/// rounds (completed, abandoned) and when the cut behind its consistent point was made.
fn register_groups(registry: &mut Registry, coordinator: &blockrep_coordinator::Coordinator) {
    let fault = GaugeFamily::<GroupLabels>::default();
    let pairs = GaugeFamily::<GroupLabels>::default();
    let consistent = GaugeFamily::<GroupLabels>::default();
    let cut_time = GaugeFamily::<GroupLabels>::default();
    let rounds = CounterFamily::<CutRoundLabels>::default();
    let status = GaugeFamily::<GroupStatusLabels>::default();
    for g in coordinator.list_groups() {
        let labels = GroupLabels {
            group: g.name.clone(),
            model: g.replication_model.clone(),
        };
        if let Ok(stats) = coordinator.group_cut_stats(&g.id) {
            for (outcome, count) in [
                ("completed", stats.completed),
                ("abandoned", stats.abandoned),
            ] {
                rounds
                    .get_or_create(&CutRoundLabels {
                        group: g.name.clone(),
                        model: g.replication_model.clone(),
                        outcome: outcome.into(),
                    })
                    .inc_by(count);
            }
            // Only while an async group replicates is its commit's age its recovery point
            // (a synchronous hypermetro group's is zero; a failed-over group is not cut).
            if stats.committed_cut_ms > 0
                && g.replication_model == "async"
                && g.status == "available"
            {
                cut_time
                    .get_or_create(&labels)
                    .set(stats.committed_cut_ms as f64 / 1000.0);
            }
        }
        fault.get_or_create(&labels).set(f64::from(g.fault_level));
        pairs
            .get_or_create(&labels)
            .set(g.replication_ids.len() as f64);
        consistent
            .get_or_create(&labels)
            .set(g.consistent_epoch as f64);
        status
            .get_or_create(&GroupStatusLabels {
                group: g.name,
                status: g.status,
                replication_status: g.replication_status,
            })
            .set(1.0);
    }
    registry.register(
        "group_fault_level",
        "0 no fault, 2 production volume lost (failover advised), 5 replication link down",
        fault,
    );
    registry.register("group_pairs", "Pairs in the consistency group", pairs);
    registry.register(
        "group_consistent_epoch",
        "The lowest epoch the group's DR volumes are consistent at",
        consistent,
    );
    registry.register(
        "group_status",
        "1 for the group's current status and replication status",
        status,
    );
    registry.register(
        "group_cut_rounds",
        "Cut rounds since the coordinator started: completed (every production host switched in time) or abandoned (the boundary is never committed)",
        rounds,
    );
    registry.register(
        "group_consistent_cut_time_seconds",
        "When the cut that ends the group's committed epoch was made (Unix time, the coordinator's clock; since it started)",
        cut_time,
    );
}

/// Serves `GET /metrics` (any path) on `addr` until the daemon stops.
pub async fn serve(
    addr: SocketAddr,
    agent: Arc<Agent>,
    cluster: Option<Arc<Cluster>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on metrics_listen {addr}: {e}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let agent = Arc::clone(&agent);
            let cluster = cluster.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let body = render(&agent, cluster.as_deref());
                        async move {
                            Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(body)))
                        }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection ended");
                }
            });
        }
    }))
}
