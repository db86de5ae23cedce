//! Human tables and JSON for the API's answers.

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
            println!(
                "{}",
                serde_json::to_string_pretty(&item.json()).expect("JSON values serialise")
            );
        } else {
            print!("{}", item.table());
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
        "created_at": v.created_at,
    })
}

/// `1.5 GiB`-style sizes.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
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
            "volumes": self.volumes.iter().map(volume_json).collect::<Vec<_>>(),
        })
    }

    fn table(&self) -> String {
        let mut out = String::new();
        for v in &self.volumes {
            let state = state_name(v);
            if v.error.is_empty() {
                out.push_str(&format!(
                    "{} {state} size:{} dirty:{} clients:{} export:{}\n",
                    v.name,
                    human_bytes(v.size_bytes).replace(' ', ""),
                    dirty_text(v).replace(' ', ""),
                    v.connected_clients,
                    v.nbd_socket
                ));
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

impl Render for proto::DirtyExtents {
    fn json(&self) -> Value {
        json!({
            "volume_id": self.volume_id,
            "dirty_bytes": self.dirty_bytes,
            "granularity": self.granularity,
            "extents": self.extents.iter().map(|e| json!({"offset": e.offset, "length": e.length})).collect::<Vec<_>>(),
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
