//! Human tables and JSON for the API's answers.

use crate::stdout::{say, sayln};
use blockrep_api::human_bytes;
use blockrep_api::proto;
use serde_json::{Value, json};

pub struct Output {
    pub json: bool,
}

pub trait Render {
    fn json(&self) -> Value;
    fn table(&self) -> String;
}

impl Output {
    pub fn print(&self, item: &impl Render) {
        if self.json {
            sayln!(
                "{}",
                serde_json::to_string_pretty(&item.json()).expect("JSON values serialise")
            );
        } else {
            say!("{}", item.table());
        }
    }
}

fn state_name(v: &proto::Volume) -> &'static str {
    match proto::VolumeState::try_from(v.state) {
        Ok(proto::VolumeState::Online) => "online",
        Ok(proto::VolumeState::Error) => "error",
        _ => "unknown",
    }
}

fn volume_json(v: &proto::Volume) -> Value {
    json!({
        "id": v.id,
        "name": v.name,
        "path": v.path,
        "size_bytes": v.size_bytes,
        "availability_zone": v.availability_zone,
        "node_name": v.node_name,
        "backing_kind": v.backing_kind,
        "direct_io": v.direct_io,
        "cache_mode": v.cache_mode,
        "state": state_name(v),
        "error": if v.error.is_empty() { Value::Null } else { json!(v.error) },
        "nbd_socket": v.nbd_socket,
        "nbd_tcp": if v.nbd_tcp.is_empty() { Value::Null } else { json!(v.nbd_tcp) },
        "dirty_tracking": v.dirty_tracking,
        "dirty_bytes": v.dirty_bytes,
        "bitmap_granularity": v.bitmap_granularity,
        "active_regions": v.active_regions,
        "connected_clients": v.connected_clients,
        "bytes_read": v.bytes_read,
        "bytes_written": v.bytes_written,
        "role": empty_null(&v.role),
        "pair_id": empty_null(&v.pair_id),
        "project_id": v.project_id,
        "pool": v.pool,
        "created_at": v.created_at,
    })
}

fn dirty_text(v: &proto::Volume) -> String {
    if v.dirty_tracking {
        human_bytes(v.dirty_bytes)
    } else {
        "off".into()
    }
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

impl Render for proto::Volume {
    fn json(&self) -> Value {
        volume_json(self)
    }

    fn table(&self) -> String {
        let mut rows = vec![
            ("id", self.id.clone()),
            ("name", self.name.clone()),
            ("state", state_name(self).into()),
            ("path", self.path.clone()),
            (
                "backing",
                format!(
                    "{}{}",
                    self.backing_kind,
                    if self.direct_io { ", O_DIRECT" } else { "" }
                ),
            ),
            ("cache", self.cache_mode.clone()),
            (
                "size",
                format!(
                    "{} ({} bytes)",
                    human_bytes(self.size_bytes),
                    self.size_bytes
                ),
            ),
            ("availability zone", self.availability_zone.clone()),
            ("node", self.node_name.clone()),
            ("nbd socket", self.nbd_socket.clone()),
            (
                "nbd tcp",
                if self.nbd_tcp.is_empty() {
                    "-".into()
                } else {
                    format!("{} (export {})", self.nbd_tcp, self.name)
                },
            ),
            (
                "dirty",
                if self.dirty_tracking {
                    format!(
                        "{} ({} bytes)",
                        human_bytes(self.dirty_bytes),
                        self.dirty_bytes
                    )
                } else {
                    "tracking off".into()
                },
            ),
            (
                "bitmap granularity",
                human_bytes(u64::from(self.bitmap_granularity)),
            ),
            ("active regions", self.active_regions.to_string()),
            ("connected clients", self.connected_clients.to_string()),
            (
                "client i/o",
                format!(
                    "{} read, {} written",
                    human_bytes(self.bytes_read),
                    human_bytes(self.bytes_written)
                ),
            ),
            ("created", self.created_at.clone()),
        ];
        if !self.error.is_empty() {
            rows.insert(3, ("error", self.error.clone()));
        }
        rows.iter()
            .map(|(k, v)| format!("{:<19} {v}\n", format!("{k}:")))
            .collect()
    }
}

impl Render for proto::ListVolumesResponse {
    fn json(&self) -> Value {
        Value::Array(self.volumes.iter().map(volume_json).collect())
    }

    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .volumes
            .iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    v.id.clone(),
                    state_name(v).into(),
                    human_bytes(v.size_bytes),
                    dirty_text(v),
                    v.connected_clients.to_string(),
                    v.path.clone(),
                ]
            })
            .collect();
        table(
            &["NAME", "ID", "STATE", "SIZE", "DIRTY", "CLIENTS", "PATH"],
            &rows,
        )
    }
}

impl Render for proto::StatusResponse {
    fn json(&self) -> Value {
        json!({
            "node_name": self.node_name,
            "availability_zone": self.availability_zone,
            "version": self.version,
            "clustered": self.clustered,
            "coordinator": self.coordinator,
            "pool": self.pool.map(|p| pool_json(&p)),
            "volumes": self.volumes.iter().map(volume_json).collect::<Vec<_>>(),
            "pairs": self.pairs.iter().map(pair_state_json).collect::<Vec<_>>(),
            "drills": self.drills.iter().map(|d| json!({
                "export": d.export,
                "drill_id": d.drill_id,
                "pair_id": d.pair_id,
                "point_epoch": d.point_epoch,
                "size_bytes": d.size_bytes,
                "written_bytes": d.written_bytes,
                "lost": empty_null(&d.lost),
                "nbd_socket": d.nbd_socket,
                "role": "drill",
            })).collect::<Vec<_>>(),
        })
    }

    fn table(&self) -> String {
        let mut out = String::new();
        for d in &self.drills {
            out.push_str(&format!(
                "{} role:drill point:{} pair:{} size:{} written:{} export:{}{}\n",
                d.export,
                d.point_epoch,
                short(&d.pair_id),
                human_bytes(d.size_bytes).replace(' ', ""),
                human_bytes(d.written_bytes).replace(' ', ""),
                d.nbd_socket,
                if d.lost.is_empty() {
                    String::new()
                } else {
                    format!(" lost:{:?}", d.lost)
                }
            ));
        }
        for v in &self.volumes {
            let state = state_name(v);
            if v.error.is_empty() {
                out.push_str(&format!(
                    "{} {state} role:{} size:{} dirty:{} clients:{} export:{}\n",
                    v.name,
                    if v.role.is_empty() { "-" } else { &v.role },
                    human_bytes(v.size_bytes).replace(' ', ""),
                    dirty_text(v).replace(' ', ""),
                    v.connected_clients,
                    v.nbd_socket
                ));
                for p in self.pairs.iter().filter(|p| p.volume_id == v.id) {
                    out.push_str(&format!(
                        "  pair:{} {} {}{} peer:{} replication:{} out-of-sync:{}{}{}\n",
                        short(&p.pair_id),
                        p.replication_model,
                        p.side,
                        if p.fence.is_empty() {
                            String::new()
                        } else {
                            format!(" fenced:{}", p.fence)
                        },
                        p.peer_node,
                        p.replication_status,
                        human_bytes(p.out_of_sync_bytes).replace(' ', ""),
                        if p.replication_status == "copying" {
                            format!(" progress:{:.0}%", p.progress * 100.0)
                        } else {
                            String::new()
                        },
                        if p.side == "production" && p.replication_model == "async" {
                            format!(" lag:{:.1}s", p.lag_seconds)
                        } else {
                            String::new()
                        },
                    ));
                    if p.replication_status != "active" && !p.status_detail.is_empty() {
                        out.push_str(&format!(
                            "    {} (since {})\n",
                            p.status_detail, p.status_since
                        ));
                    }
                }
            } else {
                out.push_str(&format!("{} {state} error:{:?}\n", v.name, v.error));
            }
        }
        if self.volumes.is_empty() {
            out.push_str(&format!(
                "no volumes on {} ({})\n",
                self.node_name, self.availability_zone
            ));
        }
        out
    }
}

impl Render for proto::RemoveVolumeResponse {
    fn json(&self) -> Value {
        json!({ "removed": self.id })
    }

    fn table(&self) -> String {
        format!("removed volume {}\n", self.id)
    }
}

impl Render for proto::SendLimit {
    fn json(&self) -> Value {
        json!({ "max_bytes_per_sec": (self.max_bytes_per_sec > 0).then_some(self.max_bytes_per_sec) })
    }

    fn table(&self) -> String {
        match self.max_bytes_per_sec {
            0 => "send limit: none\n".into(),
            rate => format!(
                "send limit: {}/s ({rate} bytes per second)\n",
                human_bytes(rate)
            ),
        }
    }
}

impl Render for proto::DirtyExtents {
    fn json(&self) -> Value {
        json!({
            "volume_id": self.volume_id,
            "dirty_bytes": self.dirty_bytes,
            "granularity": self.granularity,
            "extents": extents_json(&self.extents),
        })
    }

    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .extents
            .iter()
            .map(|e| {
                vec![
                    e.offset.to_string(),
                    e.length.to_string(),
                    human_bytes(e.length),
                ]
            })
            .collect();
        let mut out = table(&["OFFSET", "LENGTH", "SIZE"], &rows);
        out.push_str(&format!(
            "{} dirty in {} extents\n",
            human_bytes(self.dirty_bytes),
            self.extents.len()
        ));
        out
    }
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

fn empty_null(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { json!(s) }
}

fn counters_json(c: Option<&proto::PairCounters>) -> Value {
    let c = c.copied().unwrap_or_default();
    json!({
        "bytes_sent": c.bytes_sent,
        "extents_sent": c.extents_sent,
        "extents_rejected": c.extents_rejected,
        "resync_bytes_sent": c.resync_bytes_sent,
        "resync_bytes_copied": c.resync_bytes_copied,
        "resync_rate_bytes_per_second": c.resync_rate,
        "journal_bytes": c.journal_bytes,
        "journal_limit": c.journal_limit,
        "bytes_received": c.bytes_received,
        "journal_overflows": c.journal_overflows,
        "coalesced_bytes": c.coalesced_bytes,
    })
}

fn pair_state_json(p: &proto::PairState) -> Value {
    let mut v = json!({
        "pair_id": p.pair_id,
        "volume_id": p.volume_id,
        "volume_name": p.volume_name,
        "side": p.side,
        "replication_model": p.replication_model,
        "replication_status": p.replication_status,
        "status_detail": p.status_detail,
        "status_since": p.status_since,
        "progress": p.progress,
        "out_of_sync_bytes": p.out_of_sync_bytes,
        "lag_seconds": p.lag_seconds,
        "consistent_epoch": p.consistent_epoch,
        "consistent_at": empty_null(&p.consistent_at),
        "peer_node": p.peer_node,
        "counters": counters_json(p.counters.as_ref()),
        "staged_epoch": p.staged_epoch,
        "current_epoch": p.current_epoch,
        "grouped": p.grouped,
        "needs_resolve": p.needs_resolve,
        "max_bytes_per_sec": (p.max_bytes_per_sec > 0).then_some(p.max_bytes_per_sec),
        "generation": empty_null(&p.generation),
        "verify": p.verify.as_ref().map(|v| json!({
            "job_id": v.job_id,
            "progress": v.progress,
            "done": v.done,
            "error": empty_null(&v.error),
            "differing": extents_json(&v.differing),
            "differing_bytes": v.differing_bytes,
            "verified_bytes": v.verified_bytes,
            "unverified_bytes": v.unverified_bytes,
            "repairing": v.repairing,
            "repaired": v.repaired,
        })),
    });
    // The consistency group's side of the pair (kept apart: one macro call has a depth limit).
    for (key, value) in [
        ("state", empty_null(&p.state)),
        ("live", empty_null(&p.live)),
        ("gated", json!(p.gated)),
        ("trip_wanted", json!(p.trip_wanted)),
        ("catching_up", json!(p.catching_up)),
        (
            "hold",
            json!(
                p.hold
                    .map(|h| json!({"p50_us": h.p50_us, "p99_us": h.p99_us, "held": h.held}))
            ),
        ),
        ("group_commit", json!(p.group_commit)),
        ("fence", empty_null(&p.fence)),
        ("drained", json!(p.drained)),
        ("drained_epoch", json!(p.drained_epoch)),
        ("term", json!(p.term)),
    ] {
        v[key] = value;
    }
    v
}

/// The seed API's fields first, then what blockrep adds.
pub fn pair_json(p: &proto::Pair) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "description": p.description,
        "status": p.status,
        "replication_status": p.replication_status,
        "replication_consistency_group_id": empty_null(&p.replication_consistency_group_id),
        "volume_ids": p.volume_ids,
        "priority_station": p.priority_station,
        "replication_model": p.replication_model,
        "created_at": p.created_at,
        "updated_at": empty_null(&p.updated_at),
        "progress": p.progress,
        "out_of_sync_bytes": p.out_of_sync_bytes,
        "lag_seconds": p.lag_seconds,
        "status_detail": p.status_detail,
        "status_since": empty_null(&p.status_since),
        "failure_detail": empty_null(&p.failure_detail),
        "consistent_epoch": p.consistent_epoch,
        "consistent_at": empty_null(&p.consistent_at),
        "production_node": p.production_node,
        "dr_node": p.dr_node,
        "counters": counters_json(p.counters.as_ref()),
        "needs_resolve": p.needs_resolve,
        "max_bytes_per_sec": (p.max_bytes_per_sec > 0).then_some(p.max_bytes_per_sec),
        "production_generation": empty_null(&p.production_generation),
        "dr_generation": empty_null(&p.dr_generation),
    })
}

fn job_json(j: &proto::Job) -> Value {
    json!({
        "id": j.id,
        "job_type": j.job_type,
        "status": j.status,
        "begin_time": j.begin_time,
        "end_time": empty_null(&j.end_time),
        "progress": j.progress,
        "fail_reason": empty_null(&j.fail_reason),
        "pair_id": empty_null(&j.pair_id),
        "replication_consistency_group_id": empty_null(&j.group_id),
        "result": empty_null(&j.result),
    })
}

pub fn group_json(g: &proto::Group) -> Value {
    json!({
        "id": g.id,
        "name": g.name,
        "description": g.description,
        "status": g.status,
        "replication_status": g.replication_status,
        "fault_level": g.fault_level,
        "failure_detail": empty_null(&g.failure_detail),
        "replication_ids": g.replication_ids,
        "priority_station": g.priority_station,
        "replication_model": g.replication_model,
        "created_at": g.created_at,
        "updated_at": empty_null(&g.updated_at),
        "consistent_epoch": g.consistent_epoch,
        "consistent_at": empty_null(&g.consistent_at),
        "operation": empty_null(&g.operation),
        "retention": g.retention.map(|r| json!({
            "max_age_secs": r.max_age_secs,
            "max_bytes": r.max_bytes,
            "keep_hourly": r.keep_hourly,
        })),
    })
}

/// A group's retention of points in words.
fn retention_text(r: Option<proto::Retention>) -> String {
    let r = r.unwrap_or_default();
    let age = (r.max_age_secs > 0).then(|| {
        humantime::format_duration(std::time::Duration::from_secs(r.max_age_secs)).to_string()
    });
    let size = (r.max_bytes > 0)
        .then(|| format!("at most {} of undo per volume", human_bytes(r.max_bytes)));
    let text = match (age, size) {
        (None, None) => return "none kept".into(),
        (Some(a), None) => a,
        (None, Some(s)) => s,
        (Some(a), Some(s)) => format!("{a}, {s}"),
    };
    if r.keep_hourly > 0 {
        format!("{text}, then one an hour for {} hours", r.keep_hourly)
    } else {
        text
    }
}

fn drill_json(d: &proto::Drill) -> Value {
    json!({
        "id": d.id,
        "name": d.name,
        "group_id": d.group_id,
        "point_epoch": d.point_epoch,
        "point_cut_at": d.point_cut_at,
        "status": d.status,
        "created_at": d.created_at,
        "volumes": d.volumes.iter().map(|v| json!({
            "pair_id": v.pair_id,
            "node": v.node,
            "export": v.export,
            "dr_volume_id": v.dr_volume_id,
            "role": "drill",
        })).collect::<Vec<_>>(),
    })
}

impl Render for proto::Drill {
    fn json(&self) -> Value {
        drill_json(self)
    }

    fn table(&self) -> String {
        let mut out = key_values(&[
            ("id", self.id.clone()),
            ("name", self.name.clone()),
            ("group", self.group_id.clone()),
            (
                "point",
                format!("epoch {} cut at {}", self.point_epoch, self.point_cut_at),
            ),
            ("status", self.status.clone()),
            ("created", self.created_at.clone()),
        ]);
        let rows: Vec<Vec<String>> = self
            .volumes
            .iter()
            .map(|v| {
                vec![
                    v.export.clone(),
                    v.node.clone(),
                    v.pair_id.clone(),
                    "drill".into(),
                ]
            })
            .collect();
        out.push_str(&table(&["EXPORT", "NODE", "PAIR", "ROLE"], &rows));
        out
    }
}

/// Byte ranges as JSON: `[{"offset", "length"}]`.
fn extents_json(extents: &[proto::Extent]) -> Value {
    Value::Array(
        extents
            .iter()
            .map(|e| json!({"offset": e.offset, "length": e.length}))
            .collect(),
    )
}

impl Render for proto::DrillVerification {
    fn json(&self) -> Value {
        json!({
            "drill_id": self.drill_id,
            "name": self.name,
            "point_epoch": self.point_epoch,
            "done": self.done,
            "volumes": self.volumes.iter().map(|v| json!({
                "pair_id": v.pair_id,
                "node": v.node,
                "export": v.export,
                "state": v.state,
                "progress": v.progress,
                "compared_bytes": v.compared_bytes,
                "differing_bytes": v.differing_bytes,
                "not_comparable_bytes": v.not_comparable_bytes,
                "differing": extents_json(&v.differing),
                "not_comparable": extents_json(&v.not_comparable),
                "error": empty_null(&v.error),
                "finished_at": empty_null(&v.finished_at),
            })).collect::<Vec<_>>(),
        })
    }

    fn table(&self) -> String {
        let mut out = key_values(&[
            ("drill", format!("{} ({})", self.name, self.drill_id)),
            ("point", format!("epoch {}", self.point_epoch)),
            ("done", self.done.to_string()),
        ]);
        let rows: Vec<Vec<String>> = self
            .volumes
            .iter()
            .map(|v| {
                vec![
                    v.export.clone(),
                    v.node.clone(),
                    if v.state == "running" {
                        format!("running {:.0}%", v.progress * 100.0)
                    } else {
                        v.state.clone()
                    },
                    v.compared_bytes.to_string(),
                    v.differing_bytes.to_string(),
                    v.not_comparable_bytes.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "EXPORT",
                "NODE",
                "STATE",
                "COMPARED",
                "DIFFERING",
                "NOT COMPARABLE",
            ],
            &rows,
        ));
        for v in &self.volumes {
            if !v.error.is_empty() {
                out.push_str(&format!("{}: {}\n", v.export, v.error));
            }
            for e in &v.differing {
                out.push_str(&format!(
                    "{}: differs at {}+{}\n",
                    v.export, e.offset, e.length
                ));
            }
        }
        out
    }
}

/// A finished verification that found a difference, or could not verify a volume, is an
/// error (the command's status says so).
pub fn check_drill_verification(v: &proto::DrillVerification) -> anyhow::Result<()> {
    let differing: u64 = v.volumes.iter().map(|v| v.differing_bytes).sum();
    let failed: Vec<&str> = v
        .volumes
        .iter()
        .filter(|v| v.state != "done")
        .map(|v| v.export.as_str())
        .collect();
    if !failed.is_empty() {
        anyhow::bail!(
            "drill {} could not be verified on {}",
            v.name,
            failed.join(", ")
        );
    }
    if differing > 0 {
        anyhow::bail!(
            "drill {} differs from production's content at its point in {differing} bytes",
            v.name
        );
    }
    if v.volumes.iter().all(|v| v.compared_bytes == 0) {
        anyhow::bail!(
            "drill {} could not be compared at all: no digest of production's tells its point's content (see docs/POINT-IN-TIME.md)",
            v.name
        );
    }
    Ok(())
}

impl Render for proto::ListDrillsResponse {
    fn json(&self) -> Value {
        Value::Array(self.drills.iter().map(drill_json).collect())
    }

    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .drills
            .iter()
            .map(|d| {
                vec![
                    d.name.clone(),
                    d.id.clone(),
                    d.point_epoch.to_string(),
                    d.point_cut_at.clone(),
                    d.volumes.len().to_string(),
                ]
            })
            .collect();
        table(&["NAME", "ID", "POINT", "CUT AT", "VOLUMES"], &rows)
    }
}

impl Render for proto::GroupPointsResponse {
    fn json(&self) -> Value {
        json!({
            "group_id": self.group_id,
            "points": self.points.iter().map(|p| json!({
                "epoch": p.epoch,
                "cut_at": p.cut_at,
                "bytes_behind": p.bytes_behind,
            })).collect::<Vec<_>>(),
            "detail": empty_null(&self.detail),
        })
    }

    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .points
            .iter()
            .map(|p| {
                vec![
                    p.epoch.to_string(),
                    p.cut_at.clone(),
                    human_bytes(p.bytes_behind),
                ]
            })
            .collect();
        let mut out = table(&["EPOCH", "CUT AT", "UNDO BEHIND"], &rows);
        if !self.detail.is_empty() {
            out.push_str(&format!("{}\n", self.detail));
        }
        out
    }
}

impl Render for proto::Group {
    fn json(&self) -> Value {
        group_json(self)
    }

    fn table(&self) -> String {
        let mut rows = vec![
            ("id", self.id.clone()),
            ("name", self.name.clone()),
            ("status", self.status.clone()),
            ("replication", self.replication_status.clone()),
            ("fault level", fault_text(self.fault_level)),
            ("model", self.replication_model.clone()),
            ("priority station", self.priority_station.clone()),
            ("pairs", self.replication_ids.join(", ")),
            (
                "consistent point",
                if self.consistent_at.is_empty() {
                    format!("epoch {}", self.consistent_epoch)
                } else {
                    format!(
                        "epoch {} cut at {}",
                        self.consistent_epoch, self.consistent_at
                    )
                },
            ),
            ("points kept", retention_text(self.retention)),
            ("created", self.created_at.clone()),
        ];
        if !self.description.is_empty() {
            rows.insert(2, ("description", self.description.clone()));
        }
        if !self.operation.is_empty() {
            rows.push(("operation", self.operation.clone()));
        }
        if !self.failure_detail.is_empty() {
            rows.push(("failure", self.failure_detail.clone()));
        }
        key_values(&rows)
    }
}

fn fault_text(level: u32) -> String {
    match level {
        0 => "0 (no fault)".into(),
        2 => "2 (production volume lost: failover advised)".into(),
        5 => "5 (replication link down)".into(),
        n => n.to_string(),
    }
}

impl Render for proto::ListGroupsResponse {
    fn json(&self) -> Value {
        Value::Array(self.groups.iter().map(group_json).collect())
    }

    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .groups
            .iter()
            .map(|g| {
                vec![
                    g.name.clone(),
                    g.id.clone(),
                    g.status.clone(),
                    g.replication_status.clone(),
                    g.fault_level.to_string(),
                    g.replication_model.clone(),
                    g.replication_ids.len().to_string(),
                ]
            })
            .collect();
        table(
            &[
                "NAME",
                "ID",
                "STATUS",
                "REPLICATION",
                "FAULT",
                "MODEL",
                "PAIRS",
            ],
            &rows,
        )
    }
}

impl Render for proto::GroupJobResponse {
    fn json(&self) -> Value {
        json!({
            "replication_consistency_group": self.group.as_ref().map(group_json),
            "job_id": self.job.as_ref().map(|j| j.id.clone()),
        })
    }

    fn table(&self) -> String {
        let group = self.group.clone().unwrap_or_default();
        let job = self.job.clone().unwrap_or_default();
        format!(
            "group {} ({}) is {}; job {} {} ({})\n",
            group.id, group.name, group.status, job.id, job.status, job.job_type
        )
    }
}

fn node_json(n: &proto::Node) -> Value {
    json!({
        "name": n.name,
        "availability_zone": n.availability_zone,
        "address": n.address,
        "alive": n.alive,
        "last_seen": n.last_seen,
        "volumes": n.volumes,
        "coordinator": n.coordinator,
        "coordinator_role": n.coordinator_role,
        "peers_refused": n.peers_refused,
        "requests_refused": n.requests_refused,
        "pool": n.pool.map(|p| pool_json(&p)),
    })
}

fn pool_json(p: &proto::Pool) -> Value {
    json!({
        "capacity_bytes": p.capacity_bytes,
        "used_bytes": p.used_bytes,
        "free_bytes": p.capacity_bytes.saturating_sub(p.used_bytes),
    })
}

/// `used/capacity` of a pool, `-` without one.
fn pool_text(p: Option<&proto::Pool>) -> String {
    match p {
        Some(p) => format!(
            "{}/{}",
            human_bytes(p.used_bytes).replace(' ', ""),
            human_bytes(p.capacity_bytes).replace(' ', "")
        ),
        None => "-".into(),
    }
}

fn key_values(rows: &[(&str, String)]) -> String {
    rows.iter()
        .map(|(k, v)| format!("{:<19} {v}\n", format!("{k}:")))
        .collect()
}

impl Render for proto::Pair {
    fn json(&self) -> Value {
        pair_json(self)
    }

    fn table(&self) -> String {
        let c = self.counters.unwrap_or_default();
        let mut rows = vec![
            ("id", self.id.clone()),
            ("name", self.name.clone()),
            ("status", self.status.clone()),
            ("replication", self.replication_status.clone()),
            (
                "why",
                format!("{} (since {})", self.status_detail, self.status_since),
            ),
            ("model", self.replication_model.clone()),
            ("priority station", self.priority_station.clone()),
            (
                "production",
                format!(
                    "{} on {}",
                    self.volume_ids.first().cloned().unwrap_or_default(),
                    self.production_node
                ),
            ),
            (
                "dr",
                format!(
                    "{} on {}",
                    self.volume_ids.get(1).cloned().unwrap_or_default(),
                    self.dr_node
                ),
            ),
            ("progress", format!("{:.1}%", self.progress * 100.0)),
            ("out of sync", human_bytes(self.out_of_sync_bytes)),
            ("lag", format!("{:.1} s", self.lag_seconds)),
            (
                "consistent point",
                if self.consistent_at.is_empty() {
                    if self.consistent_epoch > 0 {
                        format!("epoch {}", self.consistent_epoch)
                    } else {
                        "none yet".into()
                    }
                } else {
                    format!(
                        "epoch {} cut at {}",
                        self.consistent_epoch, self.consistent_at
                    )
                },
            ),
            (
                "sent",
                format!(
                    "{} in {} extents ({} rejected), resync {} at {}/s",
                    human_bytes(c.bytes_sent),
                    c.extents_sent,
                    c.extents_rejected,
                    human_bytes(c.resync_bytes_sent),
                    human_bytes(c.resync_rate as u64)
                ),
            ),
            (
                "journal",
                format!(
                    "{} of {}, {} not sent (overwritten in their epoch)",
                    human_bytes(c.journal_bytes),
                    human_bytes(c.journal_limit),
                    human_bytes(c.coalesced_bytes)
                ),
            ),
            (
                "max rate",
                if self.max_bytes_per_sec == 0 {
                    "none of its own (the agent's send limit holds)".into()
                } else {
                    format!("{}/s", human_bytes(self.max_bytes_per_sec))
                },
            ),
            (
                "generations",
                format!(
                    "production {}, DR {}",
                    or_dash(&self.production_generation),
                    or_dash(&self.dr_generation)
                ),
            ),
            ("created", self.created_at.clone()),
        ];
        if self.needs_resolve {
            rows.insert(
                4,
                (
                    "action",
                    format!(
                        "the sides diverged: nothing is copied until `blockrep pair resolve {} --keep AZ`",
                        self.name
                    ),
                ),
            );
        }
        if !self.description.is_empty() {
            rows.insert(2, ("description", self.description.clone()));
        }
        if !self.replication_consistency_group_id.is_empty() {
            rows.push(("group", self.replication_consistency_group_id.clone()));
        }
        if !self.failure_detail.is_empty() {
            rows.insert(3, ("failure", self.failure_detail.clone()));
        }
        key_values(&rows)
    }
}

impl Render for proto::ListPairsResponse {
    fn json(&self) -> Value {
        Value::Array(self.pairs.iter().map(pair_json).collect())
    }

    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .pairs
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.id.clone(),
                    p.status.clone(),
                    p.replication_status.clone(),
                    p.replication_model.clone(),
                    format!("{:.0}%", p.progress * 100.0),
                    human_bytes(p.out_of_sync_bytes),
                    format!("{}→{}", p.production_node, p.dr_node),
                ]
            })
            .collect();
        table(
            &[
                "NAME",
                "ID",
                "STATUS",
                "REPLICATION",
                "MODEL",
                "PROGRESS",
                "OUT OF SYNC",
                "NODES",
            ],
            &rows,
        )
    }
}

impl Render for proto::CreatePairResponse {
    fn json(&self) -> Value {
        json!({
            "replication": self.pair.as_ref().map(pair_json),
            "job_id": self.job.as_ref().map(|j| j.id.clone()),
        })
    }

    fn table(&self) -> String {
        let pair = self.pair.clone().unwrap_or_default();
        let job = self.job.clone().unwrap_or_default();
        format!(
            "pair {} ({}) is {}; job {} follows it (blockrep job wait {})\n",
            pair.id, pair.name, pair.status, job.id, job.id
        )
    }
}

impl Render for proto::PairJobResponse {
    fn json(&self) -> Value {
        json!({
            "replication": self.pair.as_ref().map(pair_json),
            "job_id": self.job.as_ref().map(|j| j.id.clone()),
        })
    }

    fn table(&self) -> String {
        let pair = self.pair.clone().unwrap_or_default();
        let job = self.job.clone().unwrap_or_default();
        format!(
            "pair {}: {} started; job {}\n",
            pair.name, job.job_type, job.id
        )
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

impl Render for proto::DeletePairResponse {
    fn json(&self) -> Value {
        json!({
            "replication": self.pair.as_ref().map(pair_json),
            "job_id": self.job.as_ref().map(|j| j.id.clone()),
        })
    }

    fn table(&self) -> String {
        let pair = self.pair.clone().unwrap_or_default();
        let job = self.job.clone().unwrap_or_default();
        format!("pair {} is {}; job {}\n", pair.id, pair.status, job.id)
    }
}

impl Render for proto::Job {
    fn json(&self) -> Value {
        job_json(self)
    }

    fn table(&self) -> String {
        let mut rows = vec![
            ("id", self.id.clone()),
            ("type", self.job_type.clone()),
            ("status", self.status.clone()),
            ("progress", format!("{:.1}%", self.progress * 100.0)),
            (
                if self.group_id.is_empty() {
                    "pair"
                } else {
                    "group"
                },
                if self.group_id.is_empty() {
                    self.pair_id.clone()
                } else {
                    self.group_id.clone()
                },
            ),
            ("begin", self.begin_time.clone()),
            (
                "end",
                if self.end_time.is_empty() {
                    "-".into()
                } else {
                    self.end_time.clone()
                },
            ),
        ];
        if !self.fail_reason.is_empty() {
            rows.push(("fail reason", self.fail_reason.clone()));
        }
        if !self.result.is_empty() {
            rows.push(("result", self.result.clone()));
        }
        key_values(&rows)
    }
}

impl Render for proto::ListJobsResponse {
    fn json(&self) -> Value {
        Value::Array(self.jobs.iter().map(job_json).collect())
    }

    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .jobs
            .iter()
            .map(|j| {
                vec![
                    j.id.clone(),
                    j.job_type.clone(),
                    j.status.clone(),
                    format!("{:.0}%", j.progress * 100.0),
                    j.begin_time.clone(),
                    j.fail_reason.clone(),
                ]
            })
            .collect();
        table(
            &["ID", "TYPE", "STATUS", "PROGRESS", "BEGIN", "FAIL REASON"],
            &rows,
        )
    }
}

impl Render for proto::ListNodesResponse {
    fn json(&self) -> Value {
        Value::Array(self.nodes.iter().map(node_json).collect())
    }

    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .nodes
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    n.availability_zone.clone(),
                    n.address.clone(),
                    if n.alive {
                        "alive".into()
                    } else {
                        "down".into()
                    },
                    n.last_seen.clone(),
                    n.volumes.to_string(),
                    match n.coordinator_role.as_str() {
                        "leader" => "coordinator (leader)".into(),
                        "candidate" => "candidate".into(),
                        _ if n.coordinator => "coordinator".into(),
                        _ => String::new(),
                    },
                    n.peers_refused.to_string(),
                    n.requests_refused.to_string(),
                    pool_text(n.pool.as_ref()),
                ]
            })
            .collect();
        table(
            &[
                "NAME",
                "AZ",
                "ADDRESS",
                "STATE",
                "LAST SEEN",
                "VOLUMES",
                "ROLE",
                "PEERS REFUSED",
                "REQUESTS REFUSED",
                "POOL USED",
            ],
            &rows,
        )
    }
}

/// `blockrep status`: this node's volumes and pairs, and the groups its pairs are in.
pub struct NodeStatus {
    status: proto::StatusResponse,
    groups: Vec<proto::Group>,
}

impl NodeStatus {
    pub fn new(status: proto::StatusResponse, groups: Vec<proto::Group>) -> Self {
        let mine: Vec<&str> = status.pairs.iter().map(|p| p.pair_id.as_str()).collect();
        let groups = groups
            .into_iter()
            .filter(|g| {
                g.replication_ids
                    .iter()
                    .any(|id| mine.contains(&id.as_str()))
            })
            .collect();
        Self { status, groups }
    }
}

impl Render for NodeStatus {
    fn json(&self) -> Value {
        let mut v = self.status.json();
        v["groups"] = Value::Array(self.groups.iter().map(group_json).collect());
        v
    }

    fn table(&self) -> String {
        let mut out = self.status.table();
        for g in &self.groups {
            out.push_str(&format!(
                "group {} {} replication:{} fault-level:{} pairs:{}\n",
                g.name,
                g.status,
                g.replication_status,
                g.fault_level,
                g.replication_ids.len()
            ));
        }
        out
    }
}

fn token_json(t: &proto::ApiToken) -> Value {
    json!({
        "id": t.id,
        "name": empty_null(&t.name),
        "project_id": t.project_id,
        "created_at": t.created_at,
        "revoked_at": empty_null(&t.revoked_at),
    })
}

impl Render for proto::ApiToken {
    fn json(&self) -> Value {
        token_json(self)
    }

    fn table(&self) -> String {
        let rows = vec![
            ("id", self.id.clone()),
            ("name", self.name.clone()),
            ("project", self.project_id.clone()),
            ("created", self.created_at.clone()),
            (
                "revoked",
                if self.revoked_at.is_empty() {
                    "-".into()
                } else {
                    self.revoked_at.clone()
                },
            ),
        ];
        rows.into_iter()
            .map(|(k, v)| format!("{k:<9} {v}\n"))
            .collect()
    }
}

impl Render for proto::CreatedApiToken {
    fn json(&self) -> Value {
        let mut value = self.token.as_ref().map(token_json).unwrap_or(Value::Null);
        value["token"] = json!(self.secret);
        value
    }

    fn table(&self) -> String {
        let token = self.token.clone().unwrap_or_default();
        format!(
            "{}token     {}\n\nSend it as the X-Auth-Token header. It is shown only now: keep it.\n",
            token.table(),
            self.secret
        )
    }
}

impl Render for proto::ListApiTokensResponse {
    fn json(&self) -> Value {
        Value::Array(self.tokens.iter().map(token_json).collect())
    }

    fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .tokens
            .iter()
            .map(|t| {
                vec![
                    t.id.clone(),
                    t.name.clone(),
                    t.project_id.clone(),
                    t.created_at.clone(),
                    if t.revoked_at.is_empty() {
                        "-".into()
                    } else {
                        t.revoked_at.clone()
                    },
                ]
            })
            .collect();
        table(&["ID", "NAME", "PROJECT", "CREATED", "REVOKED"], &rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
