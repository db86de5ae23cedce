//! The registered volumes, kept in `state_dir/volumes.json` (written crash-safely).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use blockrep_api::model::ProjectId;
use blockrep_core::{CacheMode, VolumeId, VolumeName};
use blockrep_volume::write_file_durably;
use serde::{Deserialize, Serialize};

const FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: VolumeName,
    pub path: PathBuf,
    pub size: u64,
    #[serde(default)]
    pub cache: CacheMode,
    pub created_at: String,
    /// The project the volume belongs to (the REST API's tenant).
    #[serde(default = "blockrep_api::model::default_project")]
    pub project: String,
    /// The agent's pool made the volume's file (`volume create`): deleting the volume
    /// deletes it.
    #[serde(default)]
    pub pool: bool,
}

impl VolumeRecord {
    pub fn new(
        name: VolumeName,
        path: PathBuf,
        size: u64,
        cache: CacheMode,
        project: &ProjectId,
    ) -> Self {
        let created_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        Self {
            id: VolumeId::random(),
            name,
            path,
            size,
            cache,
            created_at,
            project: project.to_string(),
            pool: false,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct RegistryFile {
    format: u32,
    volumes: Vec<VolumeRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid volume registry: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} has format {found}; this blockrepd reads format {FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn registry_path(state_dir: &Path) -> PathBuf {
    state_dir.join("volumes.json")
}

pub fn load(state_dir: &Path) -> Result<Vec<VolumeRecord>, RegistryError> {
    let path = registry_path(state_dir);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(RegistryError::Read { path, source }),
    };
    let file: RegistryFile =
        serde_json::from_slice(&text).map_err(|source| RegistryError::Parse {
            path: path.clone(),
            source,
        })?;
    if file.format != FORMAT {
        return Err(RegistryError::Format {
            path,
            found: file.format,
        });
    }
    Ok(file.volumes)
}

pub fn save(state_dir: &Path, volumes: &[VolumeRecord]) -> Result<(), RegistryError> {
    let path = registry_path(state_dir);
    let file = RegistryFile {
        format: FORMAT,
        volumes: volumes.to_vec(),
    };
    let text = serde_json::to_vec_pretty(&file).expect("records serialise");
    write_file_durably(&path, &text).map_err(|source| RegistryError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_empty());
        let rec = VolumeRecord::new(
            "v1".parse().unwrap(),
            "/dev/loop0".into(),
            1 << 30,
            CacheMode::Writeback,
            &"tenant-1".parse().unwrap(),
        );
        save(dir.path(), std::slice::from_ref(&rec)).unwrap();
        assert_eq!(load(dir.path()).unwrap(), vec![rec]);
    }

    #[test]
    fn a_corrupt_registry_is_an_error_not_an_empty_list() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(registry_path(dir.path()), b"{ not json").unwrap();
        assert!(matches!(load(dir.path()), Err(RegistryError::Parse { .. })));
    }
}
