//! The undo journal on disk: units kept and read back through the index at every point,
//! across reopening, trimming, a torn tail, a trim a crash interrupted, corruption.

use std::collections::BTreeMap;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;
use blockrep_core::replication::undo::hour_of;

const SIZE: u64 = 64 * BLOCK;

/// A volume in memory, its journal on disk, and the image at every point it should hold.
struct Harness {
    dir: tempfile::TempDir,
    volume: Vec<u8>,
    journal: UndoJournal,
    images: BTreeMap<Epoch, Vec<u8>>,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = UndoJournal::open(&dir.path().join("undo")).unwrap();
        journal
            .start(Point {
                epoch: Epoch(1),
                cut_ms: 1000,
            })
            .unwrap();
        let volume = vec![0; SIZE as usize];
        Self {
            dir,
            images: BTreeMap::from([(Epoch(1), volume.clone())]),
            volume,
            journal,
        }
    }

    fn undo_dir(&self) -> PathBuf {
        self.dir.path().join("undo")
    }

    /// Applies unit `epoch` of `writes` (block, blocks, byte), keeping its undo first.
    fn apply(&mut self, epoch: Epoch, writes: &[(u64, u64, u8)]) {
        self.apply_at(epoch, epoch.0 * 1000, writes);
    }

    /// [`Harness::apply`], the unit cut at `cut_ms`.
    fn apply_at(&mut self, epoch: Epoch, cut_ms: u64, writes: &[(u64, u64, u8)]) {
        let ranges = blockrep_core::replication::undo::undo_ranges(
            writes
                .iter()
                .map(|&(b, n, _)| ByteRange::new(b * BLOCK, n * BLOCK)),
            BLOCK,
            2 * BLOCK,
        );
        let volume = &self.volume;
        self.journal
            .keep_unit(epoch, cut_ms, &ranges, |r, out| {
                out.copy_from_slice(&volume[r.offset as usize..r.end() as usize]);
                Ok(())
            })
            .unwrap();
        for &(b, n, value) in writes {
            self.volume[(b * BLOCK) as usize..((b + n) * BLOCK) as usize].fill(value);
        }
        self.images.insert(epoch, self.volume.clone());
    }

    fn read(&mut self, point: Epoch) -> Vec<u8> {
        let view = self.journal.view(point).unwrap();
        let mut out = Vec::new();
        for piece in view.pieces(ByteRange::new(0, SIZE)) {
            match piece {
                Piece::Undo { range, .. } => {
                    let mut buf = vec![0; range.len as usize];
                    self.journal.read_piece(piece, &mut buf).unwrap();
                    out.extend_from_slice(&buf);
                }
                Piece::Volume { range } => {
                    out.extend_from_slice(&self.volume[range.offset as usize..range.end() as usize])
                }
            }
        }
        out
    }

    fn check(&mut self, seed: u64) {
        let points: Vec<Epoch> = self
            .journal
            .points()
            .iter()
            .map(|p| p.point.epoch)
            .collect();
        let expected: Vec<Epoch> = self.images.keys().copied().collect();
        assert_eq!(points, expected, "seed {seed}");
        for p in points {
            assert!(
                self.read(p) == self.images[&p],
                "seed {seed}: the image at {p}"
            );
        }
    }

    fn reopen(&mut self) {
        self.journal =
            UndoJournal::open_sized(&self.undo_dir(), self.journal.segment_bytes).unwrap();
    }
}

fn random_writes(rng: &mut SmallRng) -> Vec<(u64, u64, u8)> {
    (0..rng.random_range(0..5))
        .map(|_| {
            let b = rng.random_range(0..SIZE / BLOCK);
            let n = rng.random_range(1..=(SIZE / BLOCK - b).min(6));
            // Some writes of zeroes: kept as zero ranges.
            (
                b,
                n,
                if rng.random_bool(0.2) {
                    0
                } else {
                    rng.random()
                },
            )
        })
        .collect()
}

/// Seeded histories of units, reopenings and trims by size: every point the journal says
/// it holds reads back as the image the volume had then.
#[test]
fn every_point_held_reads_back_after_reopening_and_trimming() {
    let first: u64 = std::env::var("BLOCKREP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    eprintln!("seeds {first}..{}", first + 40);
    let mut total_trimmed = 0;
    for seed in first..first + 40 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut h = Harness::new();
        h.journal.segment_bytes = rng.random_range(8..64) << 10;
        let mut trimmed = 0;
        for e in 2..rng.random_range(3..60u64) {
            let writes = random_writes(&mut rng);
            h.apply(Epoch(e), &writes);
            if rng.random_bool(0.1) {
                h.reopen();
            }
            if rng.random_bool(0.1) {
                let keep = rng.random_range(0..SIZE);
                trimmed += h
                    .journal
                    .trim(
                        Retention {
                            max_age_secs: 0,
                            max_bytes: keep,
                            keep_hourly: 0,
                        },
                        0,
                        None,
                    )
                    .unwrap();
                let oldest = h.journal.points()[0].point.epoch;
                h.images.retain(|e, _| *e >= oldest);
            }
            h.check(seed);
        }
        total_trimmed += trimmed;
    }
    assert!(total_trimmed > 0, "no history trimmed anything");
}

/// Segments roll at their size; trimming by age drops whole segments whose points are all
/// older than the bound, never the one being appended to, and never past a pinned point.
#[test]
fn trimming_by_age_drops_whole_old_segments_but_not_pinned_points() {
    let mut h = Harness::new();
    h.journal.segment_bytes = 64 << 10;
    let mut rng = SmallRng::seed_from_u64(7);
    for e in 2..200u64 {
        let writes = random_writes(&mut rng);
        h.apply(Epoch(e), &writes);
    }
    let age = Retention {
        max_age_secs: 50,
        max_bytes: 0,
        keep_hourly: 0,
    };
    // Points are cut at epoch × 1 s: at 200 s, those before 150 s are out of the bound.
    assert!(segment_files(&h.undo_dir()).unwrap().len() > 5);
    h.journal.trim(age, 200_000, Some(Epoch(20))).unwrap();
    let oldest = h.journal.points()[0].point.epoch;
    assert!(
        oldest > Epoch(1) && oldest <= Epoch(20),
        "pinned at 20, the oldest is {oldest}"
    );
    h.journal.trim(age, 200_000, None).unwrap();
    let oldest = h.journal.points()[0].point;
    assert!(
        oldest.cut_ms <= 150_000,
        "{oldest:?}: a point inside the bound was dropped"
    );
    assert!(
        oldest.cut_ms > 100_000,
        "{oldest:?}: old segments were kept"
    );
    h.images.retain(|e, _| *e >= oldest.epoch);
    h.check(0);
    h.reopen();
    h.check(0);
}

/// A crash before a unit's seal was durable: its records are a torn tail, cut at open;
/// the unit's point is not there and the points before it read as they were.
#[test]
fn a_unit_whose_seal_was_not_durable_is_not_a_point() {
    let mut h = Harness::new();
    h.apply(Epoch(2), &[(4, 4, 0xaa)]);
    let seg = segment_files(&h.undo_dir()).unwrap();
    let (_, path) = seg.iter().next().unwrap();
    let len_after_2 = std::fs::metadata(path).unwrap().len();
    h.apply(Epoch(3), &[(4, 4, 0xbb)]);
    // Unit 3's seal block never reached the disk (its undo is 16 KiB of 0xaa).
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len_after_2 + (len - len_after_2) / 2).unwrap();
    drop(file);
    h.reopen();
    h.images.remove(&Epoch(3));
    // The volume is still at 2 for what the test reads (unit 3 never applied).
    h.volume = h.images[&Epoch(2)].clone();
    h.check(0);
    // Unit 3 is kept again, from the volume as it is.
    h.apply(Epoch(3), &[(4, 4, 0xbb)]);
    h.reopen();
    h.check(0);
}

/// A trim a crash interrupted after `base.json` named the new oldest point: the segment it
/// was dropping is removed at the next open.
#[test]
fn a_trim_cut_short_is_finished_at_open() {
    let mut h = Harness::new();
    h.apply(Epoch(2), &[(0, 1, 0x11)]);
    h.apply(Epoch(3), &[(1, 1, 0x22)]);
    let base = Point {
        epoch: Epoch(3),
        cut_ms: 3000,
    };
    blockrep_volume::write_file_durably(
        &base_path(&h.undo_dir()),
        &serde_json::to_vec(&base).unwrap(),
    )
    .unwrap();
    h.reopen();
    assert!(segment_files(&h.undo_dir()).unwrap().is_empty());
    h.images.retain(|e, _| *e >= Epoch(3));
    h.check(0);
    h.apply(Epoch(4), &[(1, 1, 0x33)]);
    h.reopen();
    h.check(0);
}

/// Cleared, the journal holds no points, durably; segments a crash left behind a removed
/// base are removed at open.
#[test]
fn a_cleared_journal_holds_no_points_after_a_crash() {
    let mut h = Harness::new();
    h.apply(Epoch(2), &[(0, 1, 0x11)]);
    std::fs::remove_file(base_path(&h.undo_dir())).unwrap();
    h.reopen();
    assert!(h.journal.points().is_empty());
    assert_eq!(h.journal.newest(), None);
    assert!(segment_files(&h.undo_dir()).unwrap().is_empty());
    assert!(
        h.journal
            .keep_unit(Epoch(3), 0, &[], |_, _| Ok(()))
            .is_err()
    );
}

/// A bad record with whole batches after it was durable: the journal is refused (its
/// files kept), and set aside for an empty one.
#[test]
fn a_corrupt_segment_refuses_the_journal_and_is_set_aside() {
    let mut h = Harness::new();
    for e in 2..6 {
        h.apply(Epoch(e), &[(e, 1, e as u8)]);
    }
    let seg = segment_files(&h.undo_dir()).unwrap();
    let (_, path) = seg.iter().next().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(&[0xff; 16], 20)
        .unwrap();
    let err = UndoJournal::open(&h.undo_dir()).err().expect("refused");
    assert!(err.to_string().contains("corrupt"), "{err}");
    let (journal, aside) = UndoJournal::set_aside(&h.undo_dir()).unwrap();
    assert!(journal.points().is_empty());
    assert!(aside.exists() && segment_files(&aside).unwrap().len() == 1);
}

/// A unit's point is not listed (so neither drilled nor held for a failover) until the unit
/// is applied: between its undo and the end of its apply the volume is between two images,
/// and a drill at that point would read the unit half applied.
#[test]
fn a_point_is_listed_only_once_its_unit_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let points = Points::new(
        dir.path(),
        Retention {
            max_age_secs: 3600,
            max_bytes: 0,
            keep_hourly: 0,
        },
    );
    points
        .journal()
        .unwrap()
        .as_mut()
        .unwrap()
        .start(Point {
            epoch: Epoch(1),
            cut_ms: 1000,
        })
        .unwrap();
    points.set_applied(Epoch(1));
    points
        .journal()
        .unwrap()
        .as_mut()
        .unwrap()
        .keep_unit(Epoch(2), 2000, &[ByteRange::new(0, BLOCK)], |_, out| {
            out.fill(7);
            Ok(())
        })
        .unwrap();
    let listed =
        |p: &Points| -> Vec<u64> { p.list().unwrap().iter().map(|i| i.point.epoch.0).collect() };
    assert_eq!(
        listed(&points),
        [1],
        "a point listed while its unit applies"
    );
    points.set_applied(Epoch(2));
    assert_eq!(listed(&points), [1, 2]);
}

/// A pin can only keep points the journal still holds: one below its oldest point (a lost
/// drill's, after the journal started again) does not stop retention, and neither does a
/// drill whose view is lost.
#[test]
fn pins_of_points_gone_and_lost_drills_do_not_stop_retention() {
    let mut h = Harness::new();
    h.journal.segment_bytes = 8 << 10;
    let mut rng = SmallRng::seed_from_u64(3);
    for e in 2..40u64 {
        let writes = random_writes(&mut rng);
        h.apply(Epoch(e), &writes);
    }
    let segments = segment_files(&h.undo_dir()).unwrap().len();
    assert!(segments > 3, "{segments} segments");
    let keep_little = Retention {
        max_age_secs: 0,
        max_bytes: 1,
        keep_hourly: 0,
    };
    // Point 0 is not held (the oldest is 1): it keeps nothing.
    h.journal.trim(keep_little, 0, Some(Epoch(0))).unwrap();
    assert!(
        segment_files(&h.undo_dir()).unwrap().len() < segments,
        "a pin below the oldest point stopped retention"
    );

    let points = Points::new(h.dir.path(), keep_little);
    let view = std::sync::Arc::new(LiveView::new(Epoch(5)));
    points.add_view(std::sync::Arc::clone(&view));
    assert_eq!(points.pinned(), Some(Epoch(5)));
    points.lose_views("the journal was emptied");
    assert_eq!(points.pinned(), None, "a lost drill still pins its point");
}

/// A point held for a failover stays held across a restart of the agent, until the hold
/// runs out.
#[test]
fn a_failovers_hold_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let points = Points::load(dir.path()).unwrap();
    points
        .hold(Epoch(7), std::time::Duration::from_secs(3600))
        .unwrap();
    drop(points);
    assert_eq!(Points::load(dir.path()).unwrap().pinned(), Some(Epoch(7)));
    let points = Points::load(dir.path()).unwrap();
    points.hold(Epoch(8), std::time::Duration::ZERO).unwrap();
    assert_eq!(
        Points::load(dir.path()).unwrap().pinned(),
        None,
        "a hold ran out"
    );
}

/// Beyond the retention, one point per clock hour is kept for `keep_hourly` hours: each
/// hour's units are merged into one step (its last point), whose image reads back as it
/// was, after reopening too, and after a crash that left the merged hour's old segments.
#[test]
fn hourly_points_beyond_the_retention_read_back_as_they_were() {
    const MINUTE: u64 = 60_000;
    let mut h = Harness::new();
    let mut rng = SmallRng::seed_from_u64(11);
    // A unit every 10 minutes for 12 hours.
    let cut = |e: u64| e * 10 * MINUTE;
    for e in 2..=72u64 {
        let writes = random_writes(&mut rng);
        h.apply_at(Epoch(e), cut(e), &writes);
    }
    let now = cut(72);
    let retention = Retention {
        max_age_secs: 2 * 3600,
        max_bytes: 0,
        keep_hourly: 4,
    };
    // The segments of the first hour merged, kept aside: a crash after the rename leaves them.
    let before: BTreeMap<u64, Vec<u8>> = segment_files(&h.undo_dir())
        .unwrap()
        .into_iter()
        .map(|(seq, path)| (seq, std::fs::read(path).unwrap()))
        .collect();
    h.journal.trim(retention, now, None).unwrap();
    let points: Vec<Epoch> = h.journal.points().iter().map(|p| p.point.epoch).collect();
    // The hour of the age bound and later: every point (the bound's hour is not over yet).
    // The 4 hours before it: each hour's last point. The hour before those: its last, the
    // oldest point now. Older: none.
    let bound_hour = hour_of(now - 2 * 3600 * 1000);
    let last_of_hour = |e: u64| e == 72 || hour_of(cut(e + 1)) != hour_of(cut(e));
    for e in h.images.keys().copied().collect::<Vec<_>>() {
        let hour = hour_of(cut(e.0));
        let kept = hour >= bound_hour || (hour + 5 >= bound_hour && last_of_hour(e.0));
        assert_eq!(
            points.contains(&e),
            kept,
            "point {e} (cut at {} min)",
            cut(e.0) / MINUTE
        );
        if !kept {
            h.images.remove(&e);
        }
    }
    assert!(points.len() < 30, "{points:?}");
    h.check(0);
    h.reopen();
    h.check(0);
    // The merged hours' old segments come back (their unlink never reached the disk).
    let now_files = segment_files(&h.undo_dir()).unwrap();
    for (seq, bytes) in &before {
        if !now_files.contains_key(seq) {
            std::fs::write(segment_path(&h.undo_dir(), *seq), bytes).unwrap();
        }
    }
    h.reopen();
    h.check(0);
}

/// Units go to the newest segment only, even when an older one has room and the clock
/// went back into its hour: otherwise an older segment would hold the newest unit, and the
/// next open would take the units after it for a merge's leftovers.
#[test]
fn units_go_to_the_newest_segment_even_when_the_clock_went_back() {
    const HOUR: u64 = 3_600_000;
    let mut h = Harness::new();
    h.journal.segment_bytes = 8192;
    // Hour 10's segment: a zero range, one block of file. Hour 11's: 4 KiB of old data
    // each, closed past 8 KiB.
    h.apply_at(Epoch(2), 10 * HOUR, &[(0, 1, 2)]);
    h.apply_at(Epoch(3), 11 * HOUR, &[(0, 1, 3)]);
    h.apply_at(Epoch(4), 11 * HOUR + 1, &[(0, 1, 4)]);
    // Opened again, the segment of hour 10 has room; the newest (hour 11) has none.
    h.reopen();
    // The clock went back into hour 10.
    h.apply_at(Epoch(5), 10 * HOUR + 5, &[(3, 1, 5)]);
    h.reopen();
    h.check(0);
}

#[test]
fn digest_records_come_back_after_a_restart_and_go_with_the_journal() {
    let mut h = Harness::new();
    h.apply(Epoch(2), &[(0, 1, 7)]);
    h.journal
        .record_digests(Epoch(2), [(0u64, 42u32)].into_iter());
    h.journal.save_digests(true).unwrap();
    let expected = h.journal.expected_digests(Epoch(2));
    assert_eq!(expected.get(&0), Some(&42));
    let reopened = UndoJournal::open(&h.undo_dir()).unwrap();
    assert_eq!(reopened.expected_digests(Epoch(2)), expected);
    // A file that cannot be read is only logged: the journal opens without records.
    std::fs::write(h.undo_dir().join("digests.bin"), b"garbage").unwrap();
    let reopened = UndoJournal::open(&h.undo_dir()).unwrap();
    assert!(reopened.expected_digests(Epoch(2)).is_empty());
    // The records go with the journal's points.
    h.journal.save_digests(true).unwrap();
    h.journal.clear().unwrap();
    assert!(!h.undo_dir().join("digests.bin").exists());
}

#[test]
fn saved_records_beside_no_points_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let undo = dir.path().join("undo");
    std::fs::create_dir_all(&undo).unwrap();
    let mut records = DigestRecords::default();
    records.record(Epoch(5), 0, 42);
    std::fs::write(undo.join("digests.bin"), records.to_bytes()).unwrap();
    // No base: a journal being emptied, or one a start was cut short in. Records left
    // here would be read back beside the next history's base.
    let journal = UndoJournal::open(&undo).unwrap();
    assert!(journal.newest().is_none());
    assert!(!undo.join("digests.bin").exists());
}
