//! What the DR side of a pair records about its volume: the last unit applied and whether
//! the volume holds a consistent image at all (not before its first sync completes).

use std::path::Path;

use blockrep_core::replication::Epoch;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrState {
    /// The last unit applied whole.
    pub applied: Epoch,
    /// When production cut that unit (ms since the Unix epoch).
    pub applied_cut_ms: u64,
    /// The volume is a consistent image of production at `applied`.
    pub consistent: bool,
    /// The initial sync ended at this epoch: the volume is consistent once a unit at or
    /// after it is applied (at once, for hypermetro).
    pub sync_done_at: Option<Epoch>,
}

impl DrState {
    /// The state on disk, or the state of a DR volume that has received nothing.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("serialisable");
        blockrep_volume::write_file_durably(path, &bytes)
    }
}
