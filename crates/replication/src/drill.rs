//! A drill volume (docs/POINT-IN-TIME.md, "Drills"): a writable image of a DR volume at a
//! retained point, made in an instant, with no copy. A read goes through three layers:
//!
//! 1. the drill's **overlay**, a private sparse file of the volume's size, for the blocks
//!    the drill wrote;
//! 2. else the drill's live view: the undo record that holds the point's image there;
//! 3. else the DR volume as it is now.
//!
//! Replication goes on underneath: before each unit applies, its undo is added to the view
//! where the view had nothing (see `undo_journal::Points::extend_views`). The drill's
//! writes go to the overlay only, whole 4 KiB blocks (a partial block is read through the
//! layers first), and never reach the DR volume. The blocks written are the overlay's
//! allocated blocks, so they are found again after a restart.
//!
//! A drill is recorded in the DR volume's directory, `drills/ID.json` and `drills/ID.overlay`.
//! Its image at the point can be verified against production's digests ([`check`]).

pub mod check;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use blockrep_core::ByteRange;
use blockrep_core::replication::Epoch;
use blockrep_core::replication::undo::Piece;
use blockrep_volume::{AlignedBuf, DIRECT_IO_ALIGN, Volume};
use rangemap::RangeSet;
use serde::{Deserialize, Serialize};

use crate::undo_journal::{LiveView, Points};

const BLOCK: u64 = 4096;

/// What is recorded of a drill on its DR volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillRecord {
    /// The coordinator's drill id.
    pub drill: String,
    /// The export the drill volume is served under.
    pub export: String,
    pub point: Epoch,
}

pub struct DrillVolume {
    record: DrillRecord,
    size: u64,
    /// The DR volume.
    volume: Arc<Volume>,
    points: Arc<Points>,
    view: Arc<LiveView>,
    overlay: File,
    overlay_path: PathBuf,
    /// The blocks the drill wrote (in the overlay).
    written: Mutex<RangeSet<u64>>,
    /// Taken by each write for all of it.
    writing: Mutex<()>,
    /// The last verification against production's digests.
    check: Mutex<check::DrillCheck>,
}

fn drills_dir(volume_dir: &Path) -> PathBuf {
    volume_dir.join("drills")
}

impl DrillVolume {
    /// Makes a drill of `volume` at `point` (which `points` must hold): its record and an
    /// empty overlay, durably; its view is pinned at once.
    pub fn create(
        record: DrillRecord,
        volume: Arc<Volume>,
        volume_dir: &Path,
        points: Arc<Points>,
    ) -> io::Result<Arc<Self>> {
        // The point is kept from retention first, then checked: no trim can drop it in
        // between.
        let view = Arc::new(LiveView::new(record.point));
        points.add_view(Arc::clone(&view));
        let made = Self::make(&record, &volume, volume_dir, &points);
        let drill = made.map(|(overlay, overlay_path)| {
            Self::with(
                record,
                volume,
                Arc::clone(&points),
                overlay,
                overlay_path,
                RangeSet::new(),
            )
        });
        // The drill's own view keeps the point from here.
        points.remove_view(&view);
        drill
    }

    /// The drill's record and its empty overlay, durably, once its point is known held.
    fn make(
        record: &DrillRecord,
        volume: &Volume,
        volume_dir: &Path,
        points: &Points,
    ) -> io::Result<(File, PathBuf)> {
        if !points.list()?.iter().any(|p| p.point.epoch == record.point) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the DR volume does not hold point {}", record.point),
            ));
        }
        let dir = drills_dir(volume_dir);
        std::fs::create_dir_all(&dir)?;
        let overlay_path = dir.join(format!("{}.overlay", record.drill));
        let overlay = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&overlay_path)?;
        overlay.set_len(volume.size())?;
        overlay.sync_all()?;
        blockrep_volume::write_file_durably(
            &dir.join(format!("{}.json", record.drill)),
            &serde_json::to_vec(record).expect("serialisable"),
        )?;
        Ok((overlay, overlay_path))
    }

    /// The drills recorded on the DR volume in `volume_dir`, opened again.
    pub fn open_all(
        volume: &Arc<Volume>,
        volume_dir: &Path,
        points: &Arc<Points>,
    ) -> io::Result<Vec<Arc<Self>>> {
        let dir = drills_dir(volume_dir);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut drills = Vec::new();
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let record: DrillRecord =
                serde_json::from_slice(&std::fs::read(&path)?).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: {e}", path.display()),
                    )
                })?;
            let overlay_path = dir.join(format!("{}.overlay", record.drill));
            let overlay = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&overlay_path)?;
            let written = allocated(&overlay, volume.size())?;
            drills.push(Self::with(
                record,
                Arc::clone(volume),
                Arc::clone(points),
                overlay,
                overlay_path,
                written,
            ));
        }
        Ok(drills)
    }

    fn with(
        record: DrillRecord,
        volume: Arc<Volume>,
        points: Arc<Points>,
        overlay: File,
        overlay_path: PathBuf,
        written: RangeSet<u64>,
    ) -> Arc<Self> {
        let view = Arc::new(LiveView::new(record.point));
        points.add_view(Arc::clone(&view));
        Arc::new(Self {
            size: volume.size(),
            record,
            volume,
            points,
            view,
            overlay,
            overlay_path,
            written: Mutex::new(written),
            writing: Mutex::new(()),
            check: Mutex::new(check::DrillCheck::default()),
        })
    }

    /// How the last verification goes.
    pub fn last_check(&self) -> check::DrillCheck {
        self.check.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads `range` of the image at the point, without the drill's own writes.
    pub(crate) fn read_point(&self, range: ByteRange, out: &mut [u8]) -> io::Result<()> {
        let range = self.check(range.offset, range.len)?;
        self.read_below(range, out)
    }

    /// Production's CRC at the drill's point of every 64 KiB block a record tells it of.
    pub(crate) fn expected_digests(&self) -> io::Result<std::collections::HashMap<u64, u32>> {
        let journal = self.points.journal()?;
        Ok(journal
            .as_ref()
            .map(|j| j.expected_digests(self.record.point))
            .unwrap_or_default())
    }

    pub fn record(&self) -> &DrillRecord {
        &self.record
    }

    pub fn export(&self) -> &str {
        &self.record.export
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Why the drill cannot be read any more, if it cannot.
    pub fn lost(&self) -> Option<String> {
        self.view.lost()
    }

    /// Bytes the drill wrote (held in its overlay).
    pub fn written_bytes(&self) -> u64 {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|r| r.end - r.start)
            .sum()
    }

    /// Removes the drill: its view (retention may drop its point) and its files.
    pub fn delete(&self, volume_dir: &Path) -> io::Result<()> {
        self.end(&format!("drill {} was deleted", self.record.drill));
        let dir = drills_dir(volume_dir);
        for path in [
            dir.join(format!("{}.json", self.record.drill)),
            self.overlay_path.clone(),
        ] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        File::open(&dir)?.sync_all()
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<ByteRange> {
        if let Some(why) = self.lost() {
            return Err(io::Error::other(format!(
                "drill {} is lost: {why}",
                self.record.drill
            )));
        }
        ByteRange::within(offset, len, self.size)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    }

    /// Ends the drill, for `why`: its reads and writes fail from now on (a client still
    /// connected gets errors, not an image nobody keeps current), and its point is no
    /// longer kept.
    pub fn end(&self, why: &str) {
        *self.view.lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_owned());
        self.points.remove_view(&self.view);
    }

    /// Reads `buf.len()` bytes of the drill volume at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let range = self.check(offset, buf.len() as u64)?;
        let end = range.end();
        let overlay: Vec<std::ops::Range<u64>> = self
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .overlapping(range.offset..end)
            .cloned()
            .collect();
        let mut at = range.offset;
        // Overlay pieces and the gaps between them, in order.
        for w in overlay {
            let (s, e) = (w.start.max(at), w.end.min(end));
            if s > at {
                self.read_below(
                    ByteRange::new(at, s - at),
                    &mut buf[(at - offset) as usize..(s - offset) as usize],
                )?;
            }
            self.overlay
                .read_exact_at(&mut buf[(s - offset) as usize..(e - offset) as usize], s)?;
            at = e;
        }
        if at < end {
            self.read_below(
                ByteRange::new(at, end - at),
                &mut buf[(at - offset) as usize..],
            )?;
        }
        Ok(())
    }

    /// Reads `range` of the image at the point (under the overlay): undo records, and the
    /// volume, while the view is held.
    fn read_below(&self, range: ByteRange, out: &mut [u8]) -> io::Result<()> {
        self.points.build_view(&self.view)?;
        let view = self.view.coverage.read().unwrap_or_else(|e| e.into_inner());
        let coverage = view
            .as_ref()
            .ok_or_else(|| io::Error::other("the drill's view is not built"))?;
        for piece in coverage.pieces(range) {
            let (piece_range, into) = match piece {
                Piece::Undo { range: r, .. } | Piece::Volume { range: r } => {
                    let from = (r.offset - range.offset) as usize;
                    (r, from..from + r.len as usize)
                }
            };
            match piece {
                Piece::Undo { .. } => {
                    let mut journal = self.points.journal()?;
                    journal
                        .as_mut()
                        .ok_or_else(|| io::Error::other("the undo journal is not open"))?
                        .read_piece(piece, &mut out[into])?;
                }
                Piece::Volume { .. } => self.read_volume(piece_range, &mut out[into])?,
            }
        }
        if let Some(why) = self.lost() {
            return Err(io::Error::other(format!(
                "drill {} is lost: {why}",
                self.record.drill
            )));
        }
        Ok(())
    }

    /// Reads the DR volume (whose file may be open with `O_DIRECT`: whole blocks into an
    /// aligned buffer).
    fn read_volume(&self, range: ByteRange, out: &mut [u8]) -> io::Result<()> {
        let outer = range.align_out(DIRECT_IO_ALIGN);
        let outer = ByteRange::new(outer.offset, outer.len.min(self.size - outer.offset));
        let mut buf = AlignedBuf::new(outer.len.next_multiple_of(BLOCK) as usize);
        buf.set_len(outer.len as usize);
        self.volume
            .backing()
            .read_exact_at(&mut buf, outer.offset)?;
        let from = (range.offset - outer.offset) as usize;
        out.copy_from_slice(&buf[from..from + range.len as usize]);
        Ok(())
    }

    /// Writes `data` at `offset` of the drill volume: to the overlay, whole blocks.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let range = self.check(offset, data.len() as u64)?;
        if range.is_empty() {
            return Ok(());
        }
        // One write at a time: two writes to different bytes of one block each rewrite the
        // whole block.
        let _one_at_a_time = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let outer = range.align_out(BLOCK);
        let outer = ByteRange::new(outer.offset, outer.len.min(self.size - outer.offset));
        let mut whole = vec![0u8; outer.len as usize];
        if outer != range {
            // The partial blocks at either end, as the drill has them.
            self.read(outer.offset, &mut whole)?;
        }
        let from = (range.offset - outer.offset) as usize;
        whole[from..from + data.len()].copy_from_slice(data);
        self.overlay.write_all_at(&whole, outer.offset)?;
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(outer.offset..outer.end());
        Ok(())
    }

    /// Writes `len` zero bytes at `offset`.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeroes.len() as u64);
            self.write(at, &zeroes[..n as usize])?;
            at += n;
        }
        Ok(())
    }

    pub fn flush(&self) -> io::Result<()> {
        self.overlay.sync_data()
    }
}

impl Drop for DrillVolume {
    fn drop(&mut self) {
        self.points.remove_view(&self.view);
    }
}

/// The allocated ranges of `file` (the blocks a drill wrote), by `SEEK_DATA`/`SEEK_HOLE`.
fn allocated(file: &File, size: u64) -> io::Result<RangeSet<u64>> {
    use nix::unistd::{Whence, lseek};
    let mut set = RangeSet::new();
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    let mut at: i64 = 0;
    while at < size {
        let data = match lseek(file, at, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(file, data, Whence::SeekHole)?;
        let (s, e) = (
            data as u64 / BLOCK * BLOCK,
            (hole.min(size) as u64).div_ceil(BLOCK) * BLOCK,
        );
        if e > s {
            set.insert(s..e);
        }
        at = hole;
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use blockrep_core::replication::undo::{Retention, undo_ranges};
    use blockrep_volume::Backing;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::undo_journal::Point;

    const SIZE: u64 = 64 * BLOCK;

    struct Dr {
        dir: tempfile::TempDir,
        path: PathBuf,
        volume: Arc<Volume>,
        points: Arc<Points>,
        images: Vec<Vec<u8>>,
    }

    impl Dr {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("dr.img");
            File::create(&path).unwrap().set_len(SIZE).unwrap();
            let volume = Arc::new(Volume::new(
                "dr".into(),
                Backing::open(&path, blockrep_core::CacheMode::Writeback).unwrap(),
                None,
            ));
            let retention = Retention {
                max_age_secs: 3600,
                max_bytes: 0,
                keep_hourly: 0,
            };
            let points = Arc::new(Points::new(dir.path(), retention));
            points
                .journal()
                .unwrap()
                .as_mut()
                .unwrap()
                .start(Point {
                    epoch: Epoch(0),
                    cut_ms: 0,
                })
                .unwrap();
            Self {
                images: vec![std::fs::read(&path).unwrap()],
                dir,
                path,
                volume,
                points,
            }
        }

        /// Unit `epoch` as the applier applies it: its undo kept, the views extended, then
        /// its writes (block, blocks, byte).
        fn apply(&mut self, epoch: u64, writes: &[(u64, u64, u8)]) {
            let ranges = undo_ranges(
                writes
                    .iter()
                    .map(|&(b, n, _)| ByteRange::new(b * BLOCK, n * BLOCK)),
                BLOCK,
                1 << 20,
            );
            let image = std::fs::read(&self.path).unwrap();
            let undo = self
                .points
                .journal()
                .unwrap()
                .as_mut()
                .unwrap()
                .keep_unit(Epoch(epoch), epoch * 1000, &ranges, |r, out| {
                    out.copy_from_slice(&image[r.offset as usize..r.end() as usize]);
                    Ok(())
                })
                .unwrap();
            self.points.extend_views(&undo);
            for &(b, n, v) in writes {
                self.volume
                    .backing()
                    .write_all_at(&vec![v; (n * BLOCK) as usize], b * BLOCK)
                    .unwrap();
            }
            self.points.set_applied(Epoch(epoch));
            self.images.push(std::fs::read(&self.path).unwrap());
        }

        /// A drill `id` of the volume at `point`.
        fn drill(&self, id: &str, point: u64) -> Arc<DrillVolume> {
            DrillVolume::create(
                DrillRecord {
                    drill: id.into(),
                    export: format!("{id}-dr"),
                    point: Epoch(point),
                },
                Arc::clone(&self.volume),
                self.dir.path(),
                Arc::clone(&self.points),
            )
            .unwrap()
        }

        fn read_all(drill: &DrillVolume) -> Vec<u8> {
            let mut out = vec![0u8; SIZE as usize];
            drill.read(0, &mut out).unwrap();
            out
        }
    }

    fn writes(rng: &mut SmallRng) -> Vec<(u64, u64, u8)> {
        (0..rng.random_range(1..5))
            .map(|_| {
                let b = rng.random_range(0..SIZE / BLOCK);
                (
                    b,
                    rng.random_range(1..=(SIZE / BLOCK - b).min(4)),
                    rng.random(),
                )
            })
            .collect()
    }

    /// A drill reads as the image at its point whatever units apply after it was made
    /// (built before or after them); its own writes, whole or partial blocks, read back,
    /// reach neither the DR volume nor another drill, and are there after it is opened
    /// again.
    #[test]
    fn a_drill_is_its_point_under_replication_and_keeps_its_writes_to_itself() {
        let first: u64 = std::env::var("BLOCKREP_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        eprintln!("seeds {first}..{}", first + 30);
        for seed in first..first + 30 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut dr = Dr::new();
            for e in 1..=5 {
                let w = writes(&mut rng);
                dr.apply(e, &w);
            }
            let point = rng.random_range(0..=5u64);
            let record = |id: &str| DrillRecord {
                drill: id.into(),
                export: format!("{id}-dr"),
                point: Epoch(point),
            };
            let drill = DrillVolume::create(
                record("a"),
                Arc::clone(&dr.volume),
                dr.dir.path(),
                Arc::clone(&dr.points),
            )
            .unwrap();
            let other = DrillVolume::create(
                record("b"),
                Arc::clone(&dr.volume),
                dr.dir.path(),
                Arc::clone(&dr.points),
            )
            .unwrap();
            // Drill a is read (its view built) before more units apply; drill b after.
            let image = dr.images[point as usize].clone();
            assert!(
                Dr::read_all(&drill) == image,
                "seed {seed}: drill at {point}"
            );
            for e in 6..=9 {
                let w = writes(&mut rng);
                dr.apply(e, &w);
                assert!(
                    Dr::read_all(&drill) == image,
                    "seed {seed}: drill at {point} after unit {e}"
                );
            }
            assert!(Dr::read_all(&other) == image, "seed {seed}: drill b");
            let volume_before = std::fs::read(&dr.path).unwrap();
            let mut expected = image.clone();
            for _ in 0..6 {
                let offset = rng.random_range(0..SIZE - 9000);
                let len = rng.random_range(1..9000u64);
                let byte: u8 = rng.random();
                drill.write(offset, &vec![byte; len as usize]).unwrap();
                expected[offset as usize..(offset + len) as usize].fill(byte);
            }
            assert!(
                Dr::read_all(&drill) == expected,
                "seed {seed}: drill writes"
            );
            assert!(
                Dr::read_all(&other) == image,
                "seed {seed}: b saw a's writes"
            );
            assert!(
                std::fs::read(&dr.path).unwrap() == volume_before,
                "seed {seed}: a drill write reached the DR volume"
            );
            drop((drill, other));
            let again = DrillVolume::open_all(&dr.volume, dr.dir.path(), &dr.points).unwrap();
            let a = again.iter().find(|d| d.record.drill == "a").unwrap();
            assert!(
                Dr::read_all(a) == expected,
                "seed {seed}: after opening again"
            );
            a.delete(dr.dir.path()).unwrap();
        }
    }

    /// Writes to different bytes of one block, at once from many connections, all land:
    /// each rewrites the whole block in the overlay, one at a time.
    #[test]
    fn concurrent_writes_to_parts_of_one_block_all_land() {
        let mut dr = Dr::new();
        dr.apply(1, &[(0, 1, 9)]);
        let drill = dr.drill("d", 1);
        for round in 0..50u8 {
            std::thread::scope(|scope| {
                for part in 0..8u64 {
                    let drill = &drill;
                    scope.spawn(move || {
                        drill
                            .write(part * 512, &[round.wrapping_add(part as u8); 512])
                            .unwrap();
                    });
                }
            });
            let mut block = vec![0u8; 4096];
            drill.read(0, &mut block).unwrap();
            for part in 0..8usize {
                assert!(
                    block[part * 512..(part + 1) * 512]
                        .iter()
                        .all(|&b| b == round.wrapping_add(part as u8)),
                    "round {round}: part {part} of the block was lost"
                );
            }
        }
    }

    /// Many first reads of a drill at once (an NBD client's queue), whose view reads undo
    /// records, while units go on applying: no reader waits forever on another (building a
    /// view and reading through one take the view and the journal in the same order).
    #[test]
    fn first_reads_at_once_while_units_apply_never_deadlock() {
        let mut dr = Dr::new();
        for e in 1..=4 {
            dr.apply(e, &[(0, 64, e as u8)]);
        }
        let (done, finished) = std::sync::mpsc::channel();
        let dr = Arc::new(Mutex::new(dr));
        let worker = {
            let dr = Arc::clone(&dr);
            std::thread::spawn(move || {
                for round in 0..200u64 {
                    let (volume, dir, points) = {
                        let dr = dr.lock().unwrap();
                        (
                            Arc::clone(&dr.volume),
                            dr.dir.path().to_owned(),
                            Arc::clone(&dr.points),
                        )
                    };
                    let drill = DrillVolume::create(
                        DrillRecord {
                            drill: format!("d{round}"),
                            export: format!("d{round}-dr"),
                            point: Epoch(1),
                        },
                        volume,
                        &dir,
                        points,
                    )
                    .unwrap();
                    std::thread::scope(|scope| {
                        for _ in 0..8 {
                            scope.spawn(|| {
                                let mut buf = vec![0u8; 64 * 1024];
                                drill.read(0, &mut buf).unwrap();
                                assert!(buf.iter().all(|&b| b == 1));
                            });
                        }
                        scope.spawn(|| {
                            let mut dr = dr.lock().unwrap();
                            let epoch = dr.images.len() as u64;
                            dr.apply(epoch, &[(0, 1, epoch as u8)]);
                        });
                    });
                    drill.delete(&dir).unwrap();
                }
                done.send(()).unwrap();
            })
        };
        assert!(
            finished
                .recv_timeout(std::time::Duration::from_secs(60))
                .is_ok(),
            "readers of a drill deadlocked"
        );
        worker.join().unwrap();
    }

    /// A client still connected to a drill that was deleted (or ended by a failover) gets
    /// errors, not an image nobody keeps current any more.
    #[test]
    fn a_deleted_drill_answers_errors() {
        let mut dr = Dr::new();
        dr.apply(1, &[(0, 1, 1)]);
        dr.apply(2, &[(0, 1, 2)]);
        let drill = dr.drill("d", 1);
        let mut block = vec![0u8; 4096];
        drill.read(0, &mut block).unwrap();
        drill.delete(dr.dir.path()).unwrap();
        let err = drill.read(0, &mut block).unwrap_err();
        assert!(err.to_string().contains("deleted"), "{err}");
        assert!(drill.write(0, &block).is_err());
    }

    /// While a drill exists its point is kept: retention trims nothing at or after it.
    #[test]
    fn a_drills_point_is_kept_from_retention() {
        let mut dr = Dr::new();
        for e in 1..=3 {
            dr.apply(e, &[(e, 1, e as u8)]);
        }
        let drill = dr.drill("d", 1);
        assert_eq!(dr.points.pinned(), Some(Epoch(1)));
        drill.delete(dr.dir.path()).unwrap();
        drop(drill);
        assert_eq!(dr.points.pinned(), None);
    }
}
