//! A small volume for the NBD targets: a 1 MiB file in the temporary directory (unlinked at
//! once), with a dirty tracker, made once per fuzzing process.

use std::sync::{Arc, OnceLock};

use blockrep_nbd::ExportSet;
use blockrep_volume::{Backing, DirtyTracker, TrackerConfig, Volume};

pub const SIZE: u64 = 1 << 20;

pub fn volume() -> Arc<Volume> {
    static VOLUME: OnceLock<Arc<Volume>> = OnceLock::new();
    Arc::clone(VOLUME.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("blockrep-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("volume.img");
        std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
        let backing = Backing::open(&path, blockrep_core::CacheMode::Writeback).unwrap();
        let (tracker, _) = DirtyTracker::open(&dir.join("state"), SIZE, TrackerConfig::default())
            .unwrap();
        let volume = Arc::new(Volume::new("v".into(), backing, Some(Arc::new(tracker))));
        let _ = std::fs::remove_dir_all(&dir);
        volume
    }))
}

/// One export, `v` (or the default, empty name). (Only the handshake target asks for it.)
#[allow(dead_code)]
pub struct One;

impl ExportSet for One {
    fn find(&self, name: &str) -> Option<Arc<Volume>> {
        (name == "v" || name.is_empty()).then(volume)
    }

    fn names(&self) -> Vec<String> {
        vec!["v".into()]
    }
}
