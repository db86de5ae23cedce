//! A small tmpfs, for tests of a full file system (needs root).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::run;

/// A tmpfs of a given size mounted at a directory, unmounted when dropped, however the
/// test ends.
pub struct SmallFs {
    pub at: PathBuf,
}

impl SmallFs {
    pub fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at));
        Self { at: at.to_owned() }
    }

    /// Fills the file system: a file grows until no byte more fits. Returns its path.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.at.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xffu8; 64 << 10];
        while file.write_all(&chunk).is_ok() {}
        let small = [0xffu8; 512];
        while file.write_all(&small).is_ok() {}
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}
