//! The DR side's undo journal: before a unit applies, the old contents of every block it
//! changes, durably, so the DR volume as of any retained point can be read back (drills)
//! or restored (failover to a point). The design and its argument are in
//! docs/POINT-IN-TIME.md; which bytes of a point come from where is the core's
//! [`UndoIndex`].
//!
//! The journal is a directory, `undo/` beside the stage log:
//! - `base.json`: the oldest point (epoch and cut time). No base: the journal holds no
//!   points, and any segment there is a leftover, removed at open.
//! - `SEQ.undo` segments: each in the stage log's framing (batches written with `O_DIRECT`,
//!   a CRC per record, the torn-tail rule), holding whole units only. A unit is its undo
//!   records (a `Write` record of the unit's epoch per range: the old contents, or a zero
//!   range) and its seal; the seal's sync makes the unit's undo durable, and only then does
//!   the unit touch the volume. A new segment starts once the current one passes
//!   [`SEGMENT_BYTES`].
//!
//! Retention drops whole segments, oldest first: the index forgets them, `base.json` names
//! the new oldest point durably, then the file is unlinked. A crash in between leaves a
//! segment whose units are all at or before the base: skipped and removed at the next open.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use blockrep_core::ByteRange;
use blockrep_core::replication::Epoch;
use blockrep_core::replication::digests::DigestRecords;
use blockrep_core::replication::undo::{
    Coverage, Piece, RecordAt, Retention, UndoIndex, UndoRange, hour_of,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::stage_log::{Recovered, StageLog, Staged};

/// A segment is closed at the first unit boundary past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// The longest undo record: a unit's ranges are read and kept in pieces this long.
pub const PIECE_BYTES: u64 = 1 << 20;
/// The block the volume is read in (the unit's ranges are widened to it).
pub const BLOCK: u64 = 4096;

/// A retained point: the image of the volume right after unit `epoch` applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    pub epoch: Epoch,
    /// When production cut that epoch (ms since the Unix epoch).
    pub cut_ms: u64,
}

/// A point as `group points` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointInfo {
    pub point: Point,
    /// Bytes of undo the image at the point reads beside the volume.
    pub bytes_behind: u64,
}

/// A closed or open segment.
#[derive(Clone, Copy, Debug)]
struct Segment {
    /// Its newest unit.
    last: Epoch,
    /// Bytes of undo it holds (its records' ranges).
    bytes: u64,
    /// Its units, and the clock hour they were cut in (a segment holds one hour's units).
    units: usize,
    hour: u64,
}

pub struct UndoJournal {
    dir: PathBuf,
    /// The oldest point; `None`: no points are held.
    base: Option<Point>,
    index: UndoIndex,
    /// Cut times of the points after the base.
    cuts: BTreeMap<Epoch, u64>,
    segments: BTreeMap<u64, Segment>,
    /// The segment units are appended to, while it is under [`SEGMENT_BYTES`].
    open: Option<(u64, StageLog)>,
    /// Segments read from, opened once.
    readers: BTreeMap<u64, File>,
    /// [`SEGMENT_BYTES`], but in tests.
    segment_bytes: u64,
    /// Production's CRCs of blocks at points, for drill verification: saved to
    /// `digests.bin` every [`SAVE_DIGESTS_EVERY`] and at every trim (a crash loses those
    /// recorded since: their blocks are not comparable).
    digests: DigestRecords,
    /// When the digest records were last saved (or tried to be).
    digests_saved: std::time::Instant,
    /// The digest records changed since.
    digests_changed: bool,
}

/// A DR volume's points, shared by its applier (which keeps and trims them) and those who
/// read them (`group points`, drills, failover to a point). The journal is opened by the
/// first applier (opening reads every segment); the retention is the group's, recorded in
/// the volume's `points.json` as the coordinator sends it.
pub struct Points {
    dir: PathBuf,
    journal: Mutex<Option<UndoJournal>>,
    retention: Mutex<Retention>,
    /// Points in use (a failover's) and until when: retention keeps them and what is
    /// newer.
    pins: Mutex<Vec<(Epoch, std::time::Instant)>>,
    /// The live views of the drills on this volume: each unit's undo is added to them
    /// before the unit applies.
    views: Mutex<Vec<Arc<LiveView>>>,
    /// The volume's last unit applied whole: a point after it is the unit being applied.
    applied: std::sync::atomic::AtomicU64,
}

/// A drill's image of the volume at its point, kept current while units apply: where each
/// byte is read from (an undo record, or the volume). Reads hold it shared for as long as
/// they read the volume; a unit's ranges are added under it exclusively before the unit
/// applies, so no read sees the volume change under it.
pub struct LiveView {
    pub point: Epoch,
    /// `None` until the first read builds it from the journal.
    pub coverage: RwLock<Option<Coverage>>,
    /// Why the view cannot be read any more (the journal was emptied under it).
    pub lost: Mutex<Option<String>>,
}

impl LiveView {
    pub fn new(point: Epoch) -> Self {
        Self {
            point,
            coverage: RwLock::new(None),
            lost: Mutex::new(None),
        }
    }

    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Points {
    /// The points of the DR volume whose directory is `volume_dir`.
    /// The points of the DR volume whose directory is `volume_dir`, with the group's
    /// retention and a failover's hold (`hold.json`, if it has not run out) as recorded.
    pub fn load(volume_dir: &Path) -> io::Result<Self> {
        let points = Self::load_retention(volume_dir)?;
        match std::fs::read(volume_dir.join(HOLD_FILE)) {
            Ok(bytes) => {
                let hold: Hold = serde_json::from_slice(&bytes).map_err(|e| {
                    corrupt(format!("{}: {e}", volume_dir.join(HOLD_FILE).display()))
                })?;
                let left = hold.until_ms.saturating_sub(now_ms());
                if left > 0 {
                    points.pin(hold.epoch, std::time::Duration::from_millis(left));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(points)
    }

    fn load_retention(volume_dir: &Path) -> io::Result<Self> {
        let retention = match std::fs::read(volume_dir.join("points.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                corrupt(format!("{}: {e}", volume_dir.join("points.json").display()))
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Retention::default(),
            Err(e) => return Err(e),
        };
        Ok(Self::new(volume_dir, retention))
    }

    /// The points of the DR volume in `volume_dir`, kept for `retention`.
    pub fn new(volume_dir: &Path, retention: Retention) -> Self {
        Self {
            dir: volume_dir.join("undo"),
            journal: Mutex::new(None),
            retention: Mutex::new(retention),
            pins: Mutex::new(Vec::new()),
            views: Mutex::new(Vec::new()),
            applied: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The volume's last unit applied whole is `epoch`.
    pub fn set_applied(&self, epoch: Epoch) {
        self.applied
            .store(epoch.0, std::sync::atomic::Ordering::SeqCst);
    }

    /// Adds a drill's view: its point is kept from retention while it is there.
    pub fn add_view(&self, view: Arc<LiveView>) {
        self.views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(view);
    }

    pub fn remove_view(&self, view: &Arc<LiveView>) {
        self.views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|v| !Arc::ptr_eq(v, view));
    }

    /// Builds `view` from the journal if it is not built yet.
    ///
    /// Locks are taken in one order everywhere: a view, then the journal (a read holds its
    /// view while it reads undo records); the applier releases the journal before it
    /// extends the views. A unit whose undo is kept while the view is being built is in
    /// the journal's index then, or is added by `extend_views` after: either way once.
    pub fn build_view(&self, view: &LiveView) -> io::Result<()> {
        if view
            .coverage
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return Ok(());
        }
        let mut coverage = view.coverage.write().unwrap_or_else(|e| e.into_inner());
        if coverage.is_some() {
            return Ok(());
        }
        let guard = self.journal()?;
        let journal = guard
            .as_ref()
            .ok_or_else(|| io::Error::other("the undo journal is not open"))?;
        *coverage = Some(journal.view(view.point)?);
        Ok(())
    }

    /// A unit's undo is durable and the unit is about to apply: every built view takes the
    /// unit's ranges it does not cover yet (those bytes were the point's image until now).
    pub fn extend_views(&self, undo: &[UndoRange]) {
        let views = self.views.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for view in views {
            let mut coverage = view.coverage.write().unwrap_or_else(|e| e.into_inner());
            if let Some(coverage) = coverage.as_mut() {
                for r in undo {
                    coverage.add_gaps(*r);
                }
            }
        }
    }

    /// The journal is emptied (the volume changes outside units): every drill's view is
    /// lost, for `why`.
    pub fn lose_views(&self, why: &str) {
        for view in self.views.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            *view.lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_owned());
        }
    }

    /// Whether drills read through the journal (it must not be emptied without losing
    /// them).
    pub fn has_views(&self) -> bool {
        !self
            .views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// The oldest point in use (by a drill, or held for a failover), which retention
    /// keeps.
    pub fn pinned(&self) -> Option<Epoch> {
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        pins.retain(|(_, until)| *until > now);
        let drills = self.views.lock().unwrap_or_else(|e| e.into_inner());
        pins.iter()
            .map(|(e, _)| *e)
            .chain(
                drills
                    .iter()
                    .filter(|v| v.lost().is_none())
                    .map(|v| v.point),
            )
            .min()
    }

    /// Keeps `point` from retention for `how_long`, across restarts too (a failover to
    /// it is about to start: `hold.json` in the volume's directory).
    pub fn hold(&self, point: Epoch, how_long: std::time::Duration) -> io::Result<()> {
        let hold = Hold {
            epoch: point,
            until_ms: now_ms().saturating_add(how_long.as_millis() as u64),
        };
        blockrep_volume::write_file_durably(
            &self.dir.with_file_name(HOLD_FILE),
            &serde_json::to_vec(&hold).expect("serialisable"),
        )?;
        self.pin(point, how_long);
        Ok(())
    }

    /// Keeps `point` from retention for `how_long` (in memory).
    pub fn pin(&self, point: Epoch, how_long: std::time::Duration) {
        self.pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((point, std::time::Instant::now() + how_long));
    }

    pub fn retention(&self) -> Retention {
        *self.retention.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the group's retention durably; the applier acts on it at its next unit.
    pub fn set_retention(&self, retention: Retention) -> io::Result<()> {
        let mut held = self.retention.lock().unwrap_or_else(|e| e.into_inner());
        if *held == retention {
            return Ok(());
        }
        let path = self.dir.with_file_name("points.json");
        blockrep_volume::write_file_durably(
            &path,
            &serde_json::to_vec(&retention).expect("serialisable"),
        )?;
        *held = retention;
        Ok(())
    }

    /// The journal, opened if it is not yet (blocking: it reads every segment). One that
    /// does not read is set aside for the operator, with an error logged, and an empty one
    /// takes its place: replication goes on, and the volume's points start again.
    pub fn journal(&self) -> io::Result<MutexGuard<'_, Option<UndoJournal>>> {
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        if journal.is_none() {
            let opened = match UndoJournal::open(&self.dir) {
                Ok(j) => j,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    let (j, aside) = UndoJournal::set_aside(&self.dir)?;
                    tracing::error!(error = %e, kept = %aside.display(), "the undo journal is corrupt: its points are lost, and it starts again");
                    j
                }
                Err(e) => return Err(e),
            };
            *journal = Some(opened);
        }
        Ok(journal)
    }

    /// The points held whose units are applied (blocking: the journal is opened if it is
    /// not yet). The unit being applied has its undo kept already, but the volume is
    /// between two images until it is applied whole: its point is not one yet.
    pub fn list(&self) -> io::Result<Vec<PointInfo>> {
        let applied = Epoch(self.applied.load(std::sync::atomic::Ordering::SeqCst));
        Ok(self
            .journal()?
            .as_ref()
            .map(UndoJournal::points)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.point.epoch <= applied)
            .collect())
    }
}

/// Where a failover's hold of a point is recorded, in the volume's directory.
pub const HOLD_FILE: &str = "hold.json";

/// A point held for a failover, until a wall-clock time.
#[derive(Serialize, Deserialize)]
struct Hold {
    epoch: Epoch,
    until_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A unit's undo records as the index holds them: where each range's old contents are in
/// segment `seq` (a zero range has none).
fn undo_of(unit: &[Staged], seq: u64) -> Vec<UndoRange> {
    unit.iter()
        .map(|s| UndoRange {
            range: s.range,
            at: if s.zeroes {
                RecordAt::ZEROES
            } else {
                RecordAt {
                    segment: seq,
                    offset: s.data_at,
                }
            },
        })
        .collect()
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016}.undo"))
}

fn base_path(dir: &Path) -> PathBuf {
    dir.join("base.json")
}

/// Production's digest records, saved now and then (docs/POINT-IN-TIME.md).
fn digests_path(dir: &Path) -> PathBuf {
    dir.join("digests.bin")
}

/// How often the digest records are saved while units apply (and at every trim).
const SAVE_DIGESTS_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes the saved digest records, durably, if there are any.
fn remove_saved_digests(dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(digests_path(dir)) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The segments in `dir`, by sequence number.
fn segment_files(dir: &Path) -> io::Result<BTreeMap<u64, PathBuf>> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "undo")
            && let Some(seq) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
        {
            found.insert(seq, path);
        }
    }
    Ok(found)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn corrupt(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl UndoJournal {
    /// Opens the journal in `dir` (created if missing). A segment that does not read (not
    /// a torn tail: corruption) refuses the journal, and its files are left for the
    /// operator; the caller starts an empty one with [`UndoJournal::set_aside`].
    pub fn open(dir: &Path) -> io::Result<Self> {
        Self::open_sized(dir, SEGMENT_BYTES)
    }

    /// [`UndoJournal::open`], its segments closed past `segment_bytes` (tests make it small).
    fn open_sized(dir: &Path, segment_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let base: Option<Point> = match std::fs::read(base_path(dir)) {
            Ok(bytes) => Some(
                serde_json::from_slice(&bytes)
                    .map_err(|e| corrupt(format!("{}: {e}", base_path(dir).display())))?,
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut journal = Self {
            dir: dir.to_owned(),
            base,
            index: UndoIndex::new(base.map_or(Epoch::ZERO, |b| b.epoch)),
            cuts: BTreeMap::new(),
            segments: BTreeMap::new(),
            open: None,
            readers: BTreeMap::new(),
            segment_bytes,
            digests: DigestRecords::default(),
            // The first records are saved at the first chance, then once a minute.
            digests_saved: std::time::Instant::now()
                .checked_sub(SAVE_DIGESTS_EVERY)
                .unwrap_or_else(std::time::Instant::now),
            digests_changed: false,
        };
        // A merge a crash cut short before its rename: the segments it merged are there.
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "merge") {
                std::fs::remove_file(&path)?;
            }
        }
        let files = segment_files(dir)?;
        let Some(base) = base else {
            // No points: whatever is here was being emptied.
            for path in files.values() {
                std::fs::remove_file(path)?;
            }
            sync_dir(dir)?;
            remove_saved_digests(dir)?;
            return Ok(journal);
        };
        let last_seq = files.keys().next_back().copied();
        for (seq, path) in files {
            let Recovered { mut log, seals } = StageLog::open(&path, Epoch::ZERO)
                .map_err(|e| corrupt(format!("undo segment {}: {e}", path.display())))?;
            let mut bytes = 0;
            let mut last = None;
            let mut units = 0;
            let mut hour = 0;
            // A segment is kept whole or, every unit at or before the base or the newest
            // unit, left whole: what a trim (at or before the base) or a merge (at or
            // before the merged hour's unit) a crash interrupted leaves. Anything else is
            // not what this journal writes.
            let newest = journal.index.newest();
            let behind = seals.iter().filter(|s| s.epoch <= newest).count();
            if behind > 0 && behind < seals.len() {
                return Err(corrupt(format!(
                    "undo segment {} holds units both before and after the journal's newest",
                    path.display()
                )));
            }
            for seal in seals {
                let unit = log.take_unit(seal.epoch);
                if seal.epoch <= base.epoch || seal.epoch <= journal.index.newest() {
                    continue;
                }
                units += 1;
                hour = hour_of(seal.cut_ms);
                let ranges = undo_of(&unit, seq);
                journal
                    .index
                    .push_unit(seal.epoch, &ranges)
                    .map_err(|e| corrupt(format!("undo segment {}: {e}", path.display())))?;
                journal.cuts.insert(seal.epoch, seal.cut_ms);
                bytes += ranges.iter().map(|r| r.range.len).sum::<u64>();
                last = Some(seal.epoch);
            }
            match last {
                // Every unit of it is at or before the base (a trim a crash interrupted),
                // or it has none (a crash before its first seal).
                None => {
                    drop(log);
                    std::fs::remove_file(&path)?;
                    sync_dir(dir)?;
                }
                Some(last) => {
                    journal.segments.insert(
                        seq,
                        Segment {
                            last,
                            bytes,
                            units,
                            hour,
                        },
                    );
                    // Units are appended to the newest segment only.
                    if Some(seq) == last_seq && log.bytes() < segment_bytes {
                        journal.open = Some((seq, log));
                    }
                }
            }
        }
        journal.load_digests();
        Ok(journal)
    }

    /// Reads the saved digest records back: those at the points the journal holds. A file
    /// that cannot be read is only logged (its blocks are not comparable).
    fn load_digests(&mut self) {
        let path = digests_path(&self.dir);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the digest records; drill verification starts without them");
                return;
            }
        };
        match DigestRecords::from_bytes(&bytes) {
            Ok(mut records) => {
                records.retain_between(self.index.oldest(), self.index.newest());
                self.digests = records;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the digest records are corrupt; drill verification starts without them");
            }
        }
    }

    /// Saves the digest records, durably, if they changed and [`SAVE_DIGESTS_EVERY`]
    /// passed since the last try, or `now`. A failure is the caller's to log: replication
    /// does not depend on it (the records' blocks are only not comparable after a crash).
    pub fn save_digests(&mut self, now: bool) -> io::Result<()> {
        let due = now || self.digests_saved.elapsed() >= SAVE_DIGESTS_EVERY;
        if self.base.is_none() || !self.digests_changed || !due {
            return Ok(());
        }
        self.digests_saved = std::time::Instant::now();
        blockrep_volume::write_file_durably(&digests_path(&self.dir), &self.digests.to_bytes())?;
        self.digests_changed = false;
        Ok(())
    }

    /// Moves a journal that cannot be read aside (kept for the operator, under
    /// `undo.corrupt-N`) and opens an empty one in its place. Returns where it went.
    pub fn set_aside(dir: &Path) -> io::Result<(Self, PathBuf)> {
        let mut n = 0;
        let aside = loop {
            let candidate = dir.with_file_name(format!(
                "{}.corrupt-{n}",
                dir.file_name().and_then(|s| s.to_str()).unwrap_or("undo")
            ));
            if !candidate.exists() {
                break candidate;
            }
            n += 1;
        };
        std::fs::rename(dir, &aside)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok((Self::open(dir)?, aside))
    }

    /// The newest point held, if any: the image the volume is at (or is being rolled
    /// forward from, while its newest unit applies).
    pub fn newest(&self) -> Option<Epoch> {
        self.base.map(|_| self.index.newest())
    }

    /// The points held, oldest first.
    pub fn points(&self) -> Vec<PointInfo> {
        let Some(base) = self.base else {
            return Vec::new();
        };
        self.index
            .points()
            .into_iter()
            .map(|epoch| PointInfo {
                point: Point {
                    epoch,
                    cut_ms: if epoch == base.epoch {
                        base.cut_ms
                    } else {
                        self.cuts.get(&epoch).copied().unwrap_or(0)
                    },
                },
                bytes_behind: self.index.bytes_behind(epoch),
            })
            .collect()
    }

    /// Bytes of undo held.
    pub fn bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }

    /// Starts holding points from `point` (the volume is that image now), durably.
    pub fn start(&mut self, point: Point) -> io::Result<()> {
        debug_assert!(self.base.is_none(), "the journal holds points already");
        // Records of another history go before the new base is written.
        remove_saved_digests(&self.dir)?;
        self.clear_segments()?;
        blockrep_volume::write_file_durably(
            &base_path(&self.dir),
            &serde_json::to_vec(&point).expect("serialisable"),
        )?;
        self.base = Some(point);
        self.index = UndoIndex::new(point.epoch);
        self.digests.clear();
        Ok(())
    }

    /// Holds no points any more, durably: the base goes first, so a crash leaves a journal
    /// with no points whose segments the next open removes.
    pub fn clear(&mut self) -> io::Result<()> {
        if self.base.is_none() && self.segments.is_empty() {
            return Ok(());
        }
        // The records go first: ones left beside a later journal would be of another
        // history.
        remove_saved_digests(&self.dir)?;
        match std::fs::remove_file(base_path(&self.dir)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        sync_dir(&self.dir)?;
        self.base = None;
        self.index = UndoIndex::new(Epoch::ZERO);
        self.cuts.clear();
        self.digests.clear();
        self.clear_segments()
    }

    fn clear_segments(&mut self) -> io::Result<()> {
        self.open = None;
        self.readers.clear();
        self.segments.clear();
        for path in segment_files(&self.dir)?.values() {
            std::fs::remove_file(path)?;
        }
        sync_dir(&self.dir)
    }

    /// Keeps the undo of unit `epoch` (cut at `cut_ms`), whose writes change `ranges`
    /// (whole blocks, not overlapping: the core's `undo_ranges`): each range's current
    /// contents, read by `read_old`, are appended, then the unit's seal, and the segment is
    /// synced. When this returns the undo is durable and the unit may apply.
    pub fn keep_unit(
        &mut self,
        epoch: Epoch,
        cut_ms: u64,
        ranges: &[ByteRange],
        mut read_old: impl FnMut(ByteRange, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<Vec<UndoRange>> {
        if self.base.is_none() {
            return Err(io::Error::other(
                "the undo journal holds no points to add to",
            ));
        }
        // A segment holds one clock hour's units: hourly points are segment boundaries.
        let hour = hour_of(cut_ms);
        if let Some((seq, _)) = &self.open
            && self.segments.get(seq).is_some_and(|s| s.hour != hour)
        {
            self.open = None;
        }
        let (seq, log) = match &mut self.open {
            Some((seq, log)) => (*seq, log),
            None => {
                let seq = self.segments.keys().next_back().map_or(0, |s| s + 1);
                let Recovered { log, .. } =
                    StageLog::open(&segment_path(&self.dir, seq), Epoch::ZERO)?;
                let (seq, log) = self.open.insert((seq, log));
                (*seq, log)
            }
        };
        for &range in ranges {
            let mut buf = vec![0u8; range.len as usize];
            read_old(range, &mut buf)?;
            if buf.iter().all(|&b| b == 0) {
                log.append_write(epoch, range, true, &Bytes::new())?;
            } else {
                // The buffer read into is the record's data: no copy of it.
                log.append_write(epoch, range, false, &Bytes::from(buf))?;
            }
        }
        log.seal(epoch, cut_ms)?;
        let unit = log.take_unit(epoch);
        let undo = undo_of(&unit, seq);
        let full = log.bytes() >= self.segment_bytes;
        self.index
            .push_unit(epoch, &undo)
            .map_err(|e| io::Error::other(format!("the undo of unit {epoch}: {e}")))?;
        self.cuts.insert(epoch, cut_ms);
        let segment = self.segments.entry(seq).or_insert(Segment {
            last: epoch,
            bytes: 0,
            units: 0,
            hour,
        });
        segment.last = epoch;
        segment.units += 1;
        segment.bytes += ranges.iter().map(|r| r.len).sum::<u64>();
        if full {
            self.open = None;
        }
        Ok(undo)
    }

    /// Drops the oldest segments `retention` lets go, as of `now_ms`; never the one units
    /// are appended to, nor one holding a point at or after `pinned` (a drill's or a
    /// failover's). Returns the points dropped.
    pub fn trim(
        &mut self,
        retention: Retention,
        now_ms: u64,
        pinned: Option<Epoch>,
    ) -> io::Result<usize> {
        // A pin keeps only points still held: one below the oldest keeps nothing.
        let oldest = self.index.points()[0];
        let pinned = pinned.filter(|p| *p >= oldest);
        let mut dropped = 0;
        'pass: loop {
            let stuck = |journal: &Self, seq: &u64| {
                journal.open.as_ref().is_some_and(|(s, _)| s == seq)
                    || pinned.is_some_and(|p| p <= journal.segments[seq].last)
            };
            // Once per pass: a pass walks every hour kept.
            let total = self.bytes();
            let oldest_bytes = self.segments.values().next().map_or(0, |s| s.bytes);
            for hour in self.hours() {
                // The hour's oldest segment decides: dropped, or kept as the hour's point.
                let seq = hour[0];
                if stuck(self, &seq) {
                    break 'pass;
                }
                let segment = self.segments[&seq];
                let cut = self.cuts.get(&segment.last).copied().unwrap_or(0);
                if !retention.drops(now_ms, cut, total, oldest_bytes) {
                    break 'pass;
                }
                let too_big = retention.max_bytes > 0 && total > retention.max_bytes;
                if too_big || !retention.keeps_hourly(cut, now_ms) {
                    // Older than every hour kept (or over the size): the oldest segment.
                    dropped += self.drop_oldest()?;
                    continue 'pass;
                }
                // Kept an hour: once the whole hour is past the bound and free, its points
                // become one, the hour's last.
                let last = self.segments[hour.last().expect("an hour has a segment")].last;
                let last_cut = self.cuts.get(&last).copied().unwrap_or(0);
                if hour.iter().any(|s| stuck(self, s))
                    || !retention.drops(now_ms, last_cut, total, oldest_bytes)
                {
                    break 'pass;
                }
                if hour.len() > 1 || segment.units > 1 {
                    dropped += self.merge_hour(&hour)?;
                    continue 'pass;
                }
            }
            break;
        }
        Ok(dropped)
    }

    /// The segments by clock hour, oldest first.
    fn hours(&self) -> Vec<Vec<u64>> {
        let mut hours: Vec<Vec<u64>> = Vec::new();
        let mut at = None;
        for (seq, segment) in &self.segments {
            if at == Some(segment.hour)
                && let Some(h) = hours.last_mut()
            {
                h.push(*seq);
            } else {
                hours.push(vec![*seq]);
            }
            at = Some(segment.hour);
        }
        hours
    }

    /// Drops the oldest segment: its points are gone, the point it ends is the oldest.
    fn drop_oldest(&mut self) -> io::Result<usize> {
        let Some((&seq, &segment)) = self.segments.iter().next() else {
            return Ok(0);
        };
        let cut = self.cuts.get(&segment.last).copied().unwrap_or(0);
        let before = self.index.points().len();
        self.digests.trim(&self.index, segment.last);
        self.digests_changed = true;
        self.index
            .trim_through(segment.last)
            .map_err(|e| io::Error::other(format!("trimming the undo journal: {e}")))?;
        let dropped = before - self.index.points().len();
        let point = Point {
            epoch: segment.last,
            cut_ms: cut,
        };
        blockrep_volume::write_file_durably(
            &base_path(&self.dir),
            &serde_json::to_vec(&point).expect("serialisable"),
        )?;
        self.base = Some(point);
        self.cuts = self.cuts.split_off(&segment.last.next());
        self.segments.remove(&seq);
        self.readers.remove(&seq);
        std::fs::remove_file(segment_path(&self.dir, seq))?;
        sync_dir(&self.dir)?;
        Ok(dropped)
    }

    /// Merges one hour's segments (`seqs`, consecutive) into one step, the hour's last
    /// point: each byte keeps its first record after the point before the hour. The merged
    /// records are written to a new file, synced and renamed over the hour's first
    /// segment, then the others are unlinked. A crash before the rename leaves a `.merge`
    /// file (removed at open); after it, segments whose units are all at or before the
    /// merged one (skipped and removed at open).
    fn merge_hour(&mut self, seqs: &[u64]) -> io::Result<usize> {
        let first_seq = seqs[0];
        let last = self.segments[seqs.last().expect("an hour")].last;
        let from = self
            .segments
            .range(..first_seq)
            .next_back()
            .map(|(_, s)| s.last)
            .or(self.base.map(|b| b.epoch))
            .ok_or_else(|| io::Error::other("merging with no points"))?;
        let cut_ms = self.cuts.get(&last).copied().unwrap_or(0);
        let merged = self
            .index
            .merged(from, last)
            .map_err(|e| io::Error::other(format!("merging the undo journal: {e}")))?;
        let tmp = segment_path(&self.dir, first_seq).with_extension("merge");
        let _ = std::fs::remove_file(&tmp);
        let Recovered { mut log, .. } = StageLog::open(&tmp, Epoch::ZERO)?;
        let mut buf = Vec::new();
        for r in merged.ranges() {
            if r.at.is_zeroes() {
                log.append_write(last, r.range, true, &Bytes::new())?;
                continue;
            }
            buf.resize(r.range.len as usize, 0);
            self.read_piece(
                Piece::Undo {
                    range: r.range,
                    at: r.at,
                },
                &mut buf,
            )?;
            log.append_write(last, r.range, false, &Bytes::copy_from_slice(&buf))?;
        }
        log.seal(last, cut_ms)?;
        let unit = log.take_unit(last);
        drop(log);
        std::fs::rename(&tmp, segment_path(&self.dir, first_seq))?;
        // From here the hour's first segment is the merged one: a failure must not leave
        // the index pointing into the file it replaced. The journal is read again from
        // disk, where the merge is whole or its leftovers are skipped.
        match self.after_rename(seqs, from, last, &unit) {
            Ok(dropped) => Ok(dropped),
            Err(e) => {
                let dir = self.dir.clone();
                let digests = std::mem::take(&mut self.digests);
                *self = UndoJournal::open_sized(&dir, self.segment_bytes)?;
                // Records are checked against whatever steps the journal holds.
                self.digests = digests;
                Err(e)
            }
        }
    }

    /// The rest of [`UndoJournal::merge_hour`], once the merged file is in place.
    fn after_rename(
        &mut self,
        seqs: &[u64],
        from: Epoch,
        last: Epoch,
        unit: &[Staged],
    ) -> io::Result<usize> {
        let first_seq = seqs[0];
        sync_dir(&self.dir)?;
        let undo = undo_of(unit, first_seq);
        let before = self.index.points().len();
        self.index
            .merge_into(from, last, &undo)
            .map_err(|e| io::Error::other(format!("merging the undo journal: {e}")))?;
        let hour = self.segments[&first_seq].hour;
        for seq in seqs {
            self.segments.remove(seq);
            self.readers.remove(seq);
        }
        self.segments.insert(
            first_seq,
            Segment {
                last,
                bytes: undo.iter().map(|r| r.range.len).sum(),
                units: 1,
                hour,
            },
        );
        for seq in &seqs[1..] {
            std::fs::remove_file(segment_path(&self.dir, *seq))?;
        }
        sync_dir(&self.dir)?;
        self.cuts.retain(|e, _| *e <= from || *e >= last);
        Ok(before - self.index.points().len())
    }

    /// Production's CRCs of blocks (by 64 KiB index) at the newest point, `point`: kept
    /// only if it is the newest point held.
    pub fn record_digests(&mut self, point: Epoch, blocks: impl Iterator<Item = (u64, u32)>) {
        if self.base.is_none() || self.index.newest() != point {
            return;
        }
        for (block, crc) in blocks {
            self.digests.record(point, block, crc);
            self.digests_changed = true;
        }
    }

    /// Production's CRC at `point` of every 64 KiB block (by index) a record tells it of.
    pub fn expected_digests(&self, point: Epoch) -> std::collections::HashMap<u64, u32> {
        self.digests.expected_at(&self.index, point)
    }

    /// The image at `point`: which bytes come from undo records and which from the volume.
    pub fn view(&self, point: Epoch) -> io::Result<Coverage> {
        if self.base.is_none() {
            return Err(io::Error::other("no points are held"));
        }
        self.index
            .view(point)
            .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))
    }

    /// Reads the bytes of an undo piece into `out`.
    pub fn read_piece(&mut self, piece: Piece, out: &mut [u8]) -> io::Result<()> {
        let Piece::Undo { range, at } = piece else {
            return Err(io::Error::other("not an undo piece"));
        };
        debug_assert_eq!(out.len() as u64, range.len);
        if at.is_zeroes() {
            out.fill(0);
            return Ok(());
        }
        if let Some((seq, log)) = &mut self.open
            && *seq == at.segment
        {
            // What is still in its append buffer is written out first.
            log.flush()?;
        }
        let file = match self.readers.entry(at.segment) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(File::open(segment_path(&self.dir, at.segment))?)
            }
        };
        file.read_exact_at(out, at.offset)
    }

    /// The newest point held, with its cut time.
    pub fn newest_point(&self) -> Option<Point> {
        let base = self.base?;
        let epoch = self.index.newest();
        Some(Point {
            epoch,
            cut_ms: if epoch == base.epoch {
                base.cut_ms
            } else {
                self.cuts.get(&epoch).copied().unwrap_or(0)
            },
        })
    }
}

#[cfg(test)]
mod tests;
