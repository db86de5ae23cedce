//! The agent's drill volumes on the NBD side: each is served on a socket of its own under
//! its export name (and on the TCP listener, if there is one), as a block device that reads
//! through the drill's layers and writes to its overlay (`blockrep_replication::drill`).

use std::path::PathBuf;
use std::sync::Arc;

use blockrep_api::ApiError;
use blockrep_nbd::{BlockDevice, ExportSet};
use blockrep_replication::drill::DrillVolume;
use blockrep_replication::pairs::Pairs;
use blockrep_volume::Volume;

use super::{Agent, remove_stale_socket};

/// A drill volume as NBD serves it.
pub struct DrillDevice(pub Arc<DrillVolume>);

impl BlockDevice for DrillDevice {
    fn name(&self) -> &str {
        self.0.export()
    }

    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.write_zeroes(offset, len)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A drill's own socket: it serves that drill under its export name or the empty name,
/// for as long as the drill is there.
struct DrillExport {
    pairs: Arc<Pairs>,
    export: String,
}

impl ExportSet for DrillExport {
    fn find(&self, _name: &str) -> Option<Arc<Volume>> {
        None
    }

    fn names(&self) -> Vec<String> {
        vec![self.export.clone()]
    }

    fn find_device(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        if !(name.is_empty() || name == self.export) {
            return None;
        }
        self.pairs
            .find_drill(&self.export)
            .map(|d| Arc::new(DrillDevice(d)) as Arc<dyn BlockDevice>)
    }
}

impl Agent {
    /// Serves drill `export` on its socket (again, if it was).
    pub fn serve_drill(self: &Arc<Self>, export: &str) -> Result<PathBuf, ApiError> {
        let socket = self.config.nbd_socket(export);
        if let Some(old) = self.drill_sockets().remove(export) {
            old.abort();
        }
        let exports: Arc<dyn ExportSet> = Arc::new(DrillExport {
            pairs: Arc::clone(&self.pairs),
            export: export.to_owned(),
        });
        let task = self.listen_unix(&socket, exports)?;
        self.drill_sockets().insert(export.to_owned(), task);
        Ok(socket)
    }

    /// Stops serving drill `export` and removes its socket (only a drill's: a volume's
    /// socket of the same name is not touched).
    pub fn stop_serving_drill(&self, export: &str) {
        if let Some(task) = self.drill_sockets().remove(export) {
            task.abort();
            let _ = remove_stale_socket(&self.config.nbd_socket(export));
        }
    }

    /// Stops serving the drills that ended (their volume left the DR side).
    pub fn stop_serving_ended_drills(&self) {
        let served: Vec<String> = self.drill_sockets().keys().cloned().collect();
        for export in served {
            if self.pairs.find_drill(&export).is_none() {
                self.stop_serving_drill(&export);
            }
        }
    }

    /// Serves every drill this agent's DR volumes have (at start).
    pub fn serve_drills(self: &Arc<Self>) {
        for drill in self.pairs.drills() {
            if let Err(e) = self.serve_drill(drill.export()) {
                tracing::error!(export = drill.export(), error = %e, "cannot serve a drill volume");
            }
        }
    }

    fn drill_sockets(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, tokio::task::JoinHandle<()>>>
    {
        self.drill_sockets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The drill volumes the agent serves, as `status` shows them.
pub fn drill_protos(agent: &Agent) -> Vec<blockrep_api::proto::DrillVolumeStatus> {
    agent
        .pairs
        .drills_by_pair()
        .into_iter()
        .map(|(pair, d)| blockrep_api::proto::DrillVolumeStatus {
            export: d.export().to_owned(),
            drill_id: d.record().drill.clone(),
            pair_id: pair.to_string(),
            point_epoch: d.record().point.0,
            size_bytes: d.size(),
            written_bytes: d.written_bytes(),
            lost: d.lost().unwrap_or_default(),
            nbd_socket: agent.config.nbd_socket(d.export()).display().to_string(),
        })
        .collect()
}
