//! Where the DR side keeps its [`DrState`] (the core's: the last unit applied, and whether
//! the volume holds a consistent image): `dr.json` in the volume's directory, written
//! durably.

use std::path::Path;

pub use blockrep_core::pair::dr::DrState;

/// The state on disk, or the state of a DR volume that has received nothing.
pub fn load(path: &Path) -> std::io::Result<DrState> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DrState::default()),
        Err(e) => Err(e),
    }
}

pub fn save(state: &DrState, path: &Path) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).expect("serialisable");
    blockrep_volume::write_file_durably(path, &bytes)
}
