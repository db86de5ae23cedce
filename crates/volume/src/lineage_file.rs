//! A volume's data generations on disk (`lineage.json` in its state directory), and the
//! mark that records, before the first write of a generation is submitted, that the
//! application wrote the volume in it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use blockrep_core::replication::{GenerationId, Lineage};

use crate::durable_file::write_file_durably;

pub struct LineageFile {
    path: PathBuf,
    lineage: Mutex<Lineage>,
    /// The current generation is marked written on disk: the writes' fast path.
    written: AtomicBool,
}

impl LineageFile {
    pub const NAME: &'static str = "lineage.json";

    /// The lineage recorded in `dir`, or a new one starting at `fresh` (recorded at once).
    pub fn open(dir: &Path, fresh: GenerationId) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(Self::NAME);
        let lineage = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let lineage = Lineage::new(fresh);
                save(&path, &lineage)?;
                lineage
            }
            Err(e) => return Err(e),
        };
        Ok(Self {
            written: AtomicBool::new(lineage.current.written),
            lineage: Mutex::new(lineage),
            path,
        })
    }

    pub fn get(&self) -> Lineage {
        self.lock().clone()
    }

    /// Begins generation `id` (a role change or a promotion), durably.
    pub fn begin(&self, id: GenerationId) -> io::Result<()> {
        self.change(|l| l.begin(id))
    }

    /// Takes the production side's generation `id`, durably, before its data is written.
    pub fn adopt(&self, id: GenerationId) -> io::Result<()> {
        self.change(|l| l.adopt(id))
    }

    /// The application is about to write the volume: the first time in a generation, this
    /// is recorded durably before it returns.
    pub fn note_written(&self) -> io::Result<()> {
        if self.written.load(Ordering::Acquire) {
            return Ok(());
        }
        self.change(|l| {
            l.mark_written();
        })
    }

    fn change(&self, f: impl FnOnce(&mut Lineage)) -> io::Result<()> {
        let mut lineage = self.lock();
        let mut next = lineage.clone();
        f(&mut next);
        if next != *lineage {
            save(&self.path, &next)?;
            *lineage = next;
        }
        self.written
            .store(lineage.current.written, Ordering::Release);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lineage> {
        self.lineage.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn save(path: &Path, lineage: &Lineage) -> io::Result<()> {
    write_file_durably(
        path,
        &serde_json::to_vec_pretty(lineage).expect("serialisable"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_and_marks_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let file = LineageFile::open(dir.path(), GenerationId(1)).unwrap();
        file.note_written().unwrap();
        file.begin(GenerationId(2)).unwrap();
        file.note_written().unwrap();
        file.adopt(GenerationId(3)).unwrap();
        drop(file);
        let again = LineageFile::open(dir.path(), GenerationId(9)).unwrap();
        let l = again.get();
        assert_eq!(l.current.id, GenerationId(3));
        assert!(
            l.current.written,
            "an adopted generation holds production's data"
        );
        let history: Vec<_> = l.history.iter().map(|g| (g.id.0, g.written)).collect();
        assert_eq!(history, vec![(1, true), (2, true)]);
    }
}
