//! The crash-safe dirty tracker: the core's dirty map and activity log, kept on disk.
//!
//! Two files in the volume's state directory:
//!
//! - `bitmap`: a 4 KiB header page, then the dirty map's pages. Changed pages are written
//!   back by [`DirtyTracker::flush`] (periodically, on pressure and at shutdown).
//! - `activity-log`: two fixed-size slots written alternately, each a CRC-checked record of
//!   the regions that may hold writes the bitmap file does not show yet. A torn write spoils
//!   one slot; recovery takes the valid slot with the higher generation.
//!
//! [`DirtyTracker::admit`] is called before a write is submitted; it returns only once the
//! on-disk state covers the write (rule 2 of the design brief). Opening the tracker replays a
//! crash: bitmap file ∪ every block of every logged region.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use blockrep_core::activity_log::RetirePolicy;
use blockrep_core::replication::{Redeemed, Ticket, TicketRegistry};
use blockrep_core::{
    ActivityLog, Admission, AlVersion, BITMAP_PAGE_BYTES, ByteRange, DirtyMap, Granularity,
    PageIndex, RegionIndex,
};

const BITMAP_MAGIC: &[u8; 8] = b"BRDIRTY1";
const AL_MAGIC: &[u8; 8] = b"BRACTLG1";
const FORMAT_VERSION: u32 = 1;
const HEADER_BYTES: u64 = BITMAP_PAGE_BYTES as u64;

/// How a volume's dirty tracking is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackerConfig {
    pub granularity: Granularity,
    /// Bytes per activity-log region (a power of two).
    pub region_size: u64,
    /// Most regions the activity log holds at once.
    pub active_regions: usize,
    /// How often changed bitmap pages are written and idle regions retired.
    pub flush_interval: Duration,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            granularity: Granularity::DEFAULT,
            region_size: 4 << 20,
            active_regions: 1024,
            flush_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("a write of {len} bytes spans more regions than the activity log holds ({capacity})")]
    ActivityLogTooSmall { len: u64, capacity: usize },
}

impl TrackerError {
    /// The errno a write this error refused is answered with: `ENOSPC` when the state
    /// directory's file system is full (the client learns what is wrong), else `EIO`.
    pub fn errno(&self) -> i32 {
        match self {
            TrackerError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                libc::ENOSPC
            }
            _ => libc::EIO,
        }
    }
}

/// What opening the tracker found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Regions found in the activity log and marked dirty whole (non-zero after a crash).
    pub replayed_regions: usize,
    /// The on-disk state could not be read; everything was marked dirty.
    pub marked_all_dirty: Option<String>,
    pub dirty_bytes: u64,
}

struct State {
    map: DirtyMap,
    log: ActivityLog,
    /// Data on its way to the peer: cleared on acknowledgement unless written again since.
    tickets: TicketRegistry,
}

struct AlFile {
    file: File,
    slot_bytes: u64,
    generation: u64,
    buf: Vec<u8>,
}

pub struct DirtyTracker {
    state: Mutex<State>,
    /// Serialises activity-log writes so the newest version is the last one on disk.
    al_file: Mutex<AlFile>,
    /// Serialises bitmap flushes.
    bitmap_file: Mutex<File>,
    dir: PathBuf,
    config: TrackerConfig,
}

impl DirtyTracker {
    /// Opens (or creates) the tracker in `dir` for a volume of `volume_size` bytes and replays
    /// whatever a crash left behind.
    pub fn open(
        dir: &Path,
        volume_size: u64,
        config: TrackerConfig,
    ) -> Result<(Self, RecoveryReport), TrackerError> {
        let io_err = |what, path: &Path| {
            let path = path.to_owned();
            move |source| TrackerError::Io { what, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let bitmap_path = dir.join("bitmap");
        let al_path = dir.join("activity-log");
        let bitmap_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&bitmap_path)
            .map_err(io_err("open", &bitmap_path))?;
        let al = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&al_path)
            .map_err(io_err("open", &al_path))?;

        let mut map = DirtyMap::new(volume_size, config.granularity);
        let mut marked_all_dirty = None;
        if let Err(reason) = load_bitmap(&bitmap_file, &mut map) {
            tracing::warn!(path = %bitmap_path.display(), %reason, "bitmap unreadable; marking the whole volume dirty");
            map.set_range(ByteRange::new(0, volume_size));
            marked_all_dirty = Some(reason);
        }
        let (generation, regions) = match load_activity_log(&al) {
            Ok(found) => found,
            Err(reason) => {
                tracing::warn!(path = %al_path.display(), %reason, "activity log unreadable; marking the whole volume dirty");
                map.set_range(ByteRange::new(0, volume_size));
                marked_all_dirty.get_or_insert(reason);
                (0, Vec::new())
            }
        };
        let replayed_regions = regions.len();
        for (region_size, region) in &regions {
            let start = region * region_size;
            if start < volume_size {
                map.set_range(ByteRange::new(
                    start,
                    (*region_size).min(volume_size - start),
                ));
            }
        }

        // Make the recovered state the on-disk state: whole bitmap written, log emptied.
        let slot_bytes = al_slot_bytes(config.active_regions);
        bitmap_file
            .set_len(HEADER_BYTES + map.page_count() * BITMAP_PAGE_BYTES as u64)
            .map_err(io_err("resize", &bitmap_path))?;
        bitmap_file
            .write_all_at(&bitmap_header(&map), 0)
            .map_err(io_err("write header of", &bitmap_path))?;
        map.mark_all_pages_changed();
        let pages = map.take_changed_pages();
        write_page_bytes(&bitmap_file, &pages, &copy_pages(&map, &pages))
            .map_err(io_err("write", &bitmap_path))?;
        bitmap_file
            .sync_all()
            .map_err(io_err("sync", &bitmap_path))?;
        // Allocate both slots with real zeroes so later writes need no metadata update.
        al.write_all_at(&vec![0; 2 * slot_bytes as usize], 0)
            .map_err(io_err("write", &al_path))?;
        al.set_len(2 * slot_bytes)
            .map_err(io_err("resize", &al_path))?;
        let mut al_file = AlFile {
            file: al,
            slot_bytes,
            generation,
            buf: Vec::new(),
        };
        al_file
            .write(AlVersion(0), config.region_size, &[])
            .map_err(io_err("write", &al_path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync", dir))?;

        let report = RecoveryReport {
            replayed_regions,
            marked_all_dirty,
            dirty_bytes: map.dirty_bytes(),
        };
        let tracker = Self {
            state: Mutex::new(State {
                map,
                log: ActivityLog::new(config.region_size, config.active_regions),
                tickets: TicketRegistry::new(),
            }),
            al_file: Mutex::new(al_file),
            bitmap_file: Mutex::new(bitmap_file),
            dir: dir.to_owned(),
            config,
        };
        Ok((tracker, report))
    }

    pub fn config(&self) -> TrackerConfig {
        self.config
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.lock_state().map.dirty_bytes()
    }

    /// The dirty runs, in order.
    pub fn dirty_runs(&self) -> Vec<ByteRange> {
        self.lock_state().map.runs().collect()
    }

    /// Whether any block `range` touches is dirty.
    pub fn any_dirty(&self, range: ByteRange) -> bool {
        let state = self.lock_state();
        let granule = state.map.granularity().bytes();
        let mut at = range.offset - range.offset % granule;
        while at < range.end() {
            if state.map.is_dirty(at) {
                return true;
            }
            at += granule;
        }
        false
    }

    pub fn active_regions(&self) -> usize {
        self.lock_state().log.len()
    }

    /// Records writes into `ranges`; returns once they may be submitted, that is once the
    /// on-disk bitmap or activity log covers each of them.
    pub fn admit(&self, ranges: &[ByteRange]) -> Result<(), TrackerError> {
        let mut ready = Vec::new();
        match self.admit_batch(ranges, &mut ready)? {
            Some(version) => self.make_durable(version),
            None => Ok(()),
        }
    }

    /// Records a batch of writes without waiting for the activity log where it can.
    /// Afterwards `ready[i]` says whether `ranges[i]` may be submitted now (every region it
    /// touches is in the on-disk log). The others may be submitted once
    /// [`DirtyTracker::make_durable`] has returned for the version this returns.
    pub fn admit_batch(
        &self,
        ranges: &[ByteRange],
        ready: &mut Vec<bool>,
    ) -> Result<Option<AlVersion>, TrackerError> {
        ready.clear();
        let mut needed = AlVersion(0);
        let mut refused = Vec::new();
        {
            let mut state = self.lock_state();
            let State { map, log, tickets } = &mut *state;
            for (i, &range) in ranges.iter().enumerate() {
                let admission = log.admit(range);
                if admission != Admission::Full {
                    map.set_range(range);
                    tickets.spoil(range);
                }
                match admission {
                    Admission::Ready => ready.push(true),
                    Admission::PersistFirst(v) => {
                        needed = needed.max(v);
                        ready.push(false);
                    }
                    Admission::Full => {
                        refused.push(i);
                        ready.push(false);
                    }
                }
            }
        }
        // The log is full: the rare slow path flushes the bitmap, then admits these.
        for i in refused {
            self.admit_into_full_log(ranges[i])?;
            ready[i] = true;
        }
        Ok((needed > AlVersion(0)).then_some(needed))
    }

    /// Returns once the activity log is durable at `version` (writing it if no one has).
    pub fn make_durable(&self, version: AlVersion) -> Result<(), TrackerError> {
        self.persist_log(Some(version))
    }

    fn admit_into_full_log(&self, range: ByteRange) -> Result<(), TrackerError> {
        for _ in 0..8 {
            self.flush(RetirePolicy::ToLowWater)?;
            let admission = {
                let mut state = self.lock_state();
                let admission = state.log.admit(range);
                if admission != Admission::Full {
                    state.map.set_range(range);
                    state.tickets.spoil(range);
                }
                admission
            };
            match admission {
                Admission::Ready => return Ok(()),
                Admission::PersistFirst(v) => return self.persist_log(Some(v)),
                Admission::Full => continue,
            }
        }
        Err(TrackerError::ActivityLogTooSmall {
            len: range.len,
            capacity: self.config.active_regions,
        })
    }

    /// Clears a range outright (no ticket): for a pair's first full sync, where nothing
    /// else writes the volume. Cleared bits reach the disk lazily; a crash before then
    /// leaves them dirty, which is safe.
    pub fn clear(&self, range: ByteRange) {
        self.lock_state().map.clear_range(range);
    }

    /// Marks `ranges` dirty and returns once the bitmap on disk shows them: for blocks that
    /// may differ from the peer without a write of this volume's having said so (the units a
    /// promotion drops, the other side's dirty blocks at reprotect).
    pub fn mark_durably(&self, ranges: &[ByteRange]) -> Result<(), TrackerError> {
        let pieces: Vec<ByteRange> = ranges
            .iter()
            .flat_map(|r| {
                (0..r.len.div_ceil(crate::gate::ADMIT_CHUNK)).map(move |i| {
                    let at = r.offset + i * crate::gate::ADMIT_CHUNK;
                    ByteRange::new(at, (r.end() - at).min(crate::gate::ADMIT_CHUNK))
                })
            })
            .collect();
        for batch in pieces.chunks(256) {
            self.admit(batch)?;
        }
        self.flush(RetirePolicy::All)
    }

    /// Grows the tracker to a volume of `size` bytes (an extend; a smaller size changes
    /// nothing). The new blocks are clean. Returns once the bitmap on disk covers them.
    pub fn grow(&self, size: u64) -> Result<(), TrackerError> {
        let path = self.dir.join("bitmap");
        let file = self.bitmap_file.lock().unwrap_or_else(|e| e.into_inner());
        let header = {
            let mut state = self.lock_state();
            if size <= state.map.volume_size() {
                return Ok(());
            }
            state.map.grow(size);
            (
                bitmap_header(&state.map),
                HEADER_BYTES + state.map.page_count() * BITMAP_PAGE_BYTES as u64,
            )
        };
        // The file grows first: a header read after a crash never names pages it lacks.
        file.set_len(header.1)
            .and_then(|()| file.write_all_at(&header.0, 0))
            .map_err(|source| TrackerError::Io {
                what: "grow",
                path,
                source,
            })?;
        drop(file);
        self.flush(RetirePolicy::Idle)
    }

    /// Clears every bit and writes the bitmap: the volume and its peer hold the same data
    /// (a side that becomes DR once its dirty blocks were handed to the other side).
    pub fn clear_durably(&self, size: u64) -> Result<(), TrackerError> {
        self.clear(ByteRange::new(0, size));
        self.flush(RetirePolicy::All)
    }

    /// Tickets for ranges whose data goes to the peer; the caller holds their blocks through
    /// the write gate (so no write can come between the data and the ticket).
    pub fn issue_tickets(
        &self,
        ranges: impl IntoIterator<Item = ByteRange>,
        out: &mut Vec<Ticket>,
    ) {
        let mut state = self.lock_state();
        out.extend(ranges.into_iter().map(|r| state.tickets.issue(r)));
    }

    pub fn issue_ticket(&self, range: ByteRange) -> Ticket {
        self.lock_state().tickets.issue(range)
    }

    /// The peer acknowledged these tickets' data: clear each range nothing wrote since.
    /// Returns the bytes cleared.
    pub fn redeem(&self, tickets: impl IntoIterator<Item = Ticket>) -> u64 {
        let mut state = self.lock_state();
        let State {
            map,
            tickets: registry,
            ..
        } = &mut *state;
        let before = map.dirty_bytes();
        for ticket in tickets {
            if let Redeemed::Clear(parts) = registry.redeem(ticket) {
                for part in parts {
                    map.clear_range(part);
                }
            }
        }
        before - map.dirty_bytes()
    }

    /// These tickets' data will not reach the peer: their ranges stay dirty.
    pub fn forget(&self, tickets: impl IntoIterator<Item = Ticket>) {
        let mut state = self.lock_state();
        for ticket in tickets {
            state.tickets.forget(ticket);
        }
    }

    /// The dirty runs not covered by a live, unspoiled ticket: what a resync pass still has
    /// to send (the rest is on its way and unchanged since it was read).
    pub fn unsent_runs(&self) -> Vec<ByteRange> {
        let state = self.lock_state();
        let sent = state.tickets.unspoiled_ranges();
        let mut out = Vec::new();
        let mut sent = sent.into_iter().peekable();
        for run in state.map.runs() {
            let mut at = run.offset;
            let end = run.end();
            while at < end {
                while sent.peek().is_some_and(|s| s.end() <= at) {
                    sent.next();
                }
                match sent.peek() {
                    Some(s) if s.offset <= at => at = s.end().min(end),
                    Some(s) if s.offset < end => {
                        out.push(ByteRange::new(at, s.offset - at));
                        at = s.end().min(end);
                    }
                    _ => {
                        out.push(ByteRange::new(at, end - at));
                        at = end;
                    }
                }
            }
        }
        out
    }

    /// Tickets waiting for the peer.
    pub fn live_tickets(&self) -> usize {
        self.lock_state().tickets.len()
    }

    /// Writes the changed bitmap pages, then retires regions by `policy`.
    pub fn flush(&self, policy: RetirePolicy) -> Result<(), TrackerError> {
        let file = self.bitmap_file.lock().unwrap_or_else(|e| e.into_inner());
        let (ticket, pages, bytes) = {
            let state = &mut *self.lock_state();
            let ticket = state.log.begin_flush();
            let pages = state.map.take_changed_pages();
            let bytes = copy_pages(&state.map, &pages);
            (ticket, pages, bytes)
        };
        let written = write_page_bytes(&file, &pages, &bytes).and_then(|()| file.sync_data());
        if let Err(source) = written {
            self.lock_state().map.mark_pages_changed(&pages);
            return Err(TrackerError::Io {
                what: "flush",
                path: self.dir.join("bitmap"),
                source,
            });
        }
        let changed = self.lock_state().log.finish_flush(ticket, policy);
        if changed {
            self.persist_log(None)?;
        }
        Ok(())
    }

    /// Clean shutdown: every change on disk and an empty activity log.
    pub fn close(&self) -> Result<(), TrackerError> {
        self.flush(RetirePolicy::All)?;
        self.persist_log(None)
    }

    /// Writes the activity log unless it is already durable at `needed`.
    fn persist_log(&self, needed: Option<AlVersion>) -> Result<(), TrackerError> {
        let mut al = self.al_file.lock().unwrap_or_else(|e| e.into_inner());
        let (version, regions) = {
            let state = self.lock_state();
            if needed.is_some_and(|v| state.log.is_durable(v)) {
                return Ok(());
            }
            state.log.snapshot()
        };
        al.write(version, self.config.region_size, &regions)
            .map_err(|source| TrackerError::Io {
                what: "write",
                path: self.dir.join("activity-log"),
                source,
            })?;
        self.lock_state().log.mark_durable(version);
        Ok(())
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl AlFile {
    /// Writes a record into the slot after the current one and syncs it.
    fn write(
        &mut self,
        version: AlVersion,
        region_size: u64,
        regions: &[RegionIndex],
    ) -> io::Result<()> {
        let generation = self.generation + 1;
        let buf = &mut self.buf;
        buf.clear();
        buf.extend_from_slice(AL_MAGIC);
        buf.extend_from_slice(&generation.to_le_bytes());
        buf.extend_from_slice(&version.0.to_le_bytes());
        buf.extend_from_slice(&region_size.to_le_bytes());
        buf.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        for r in regions {
            buf.extend_from_slice(&r.0.to_le_bytes());
        }
        let crc = crc32fast::hash(buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        if buf.len() as u64 > self.slot_bytes {
            return Err(io::Error::other(format!(
                "activity log record of {} bytes does not fit its {}-byte slot",
                buf.len(),
                self.slot_bytes
            )));
        }
        self.file
            .write_all_at(buf, (generation % 2) * self.slot_bytes)?;
        self.file.sync_data()?;
        self.generation = generation;
        Ok(())
    }
}

fn al_slot_bytes(capacity: usize) -> u64 {
    let record = 8 + 8 + 8 + 8 + 4 + 8 * capacity as u64 + 4;
    record.div_ceil(4096) * 4096
}

fn bitmap_header(map: &DirtyMap) -> Vec<u8> {
    let mut header = Vec::with_capacity(HEADER_BYTES as usize);
    header.extend_from_slice(BITMAP_MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&(map.granularity().bytes() as u32).to_le_bytes());
    header.extend_from_slice(&map.volume_size().to_le_bytes());
    header.extend_from_slice(&map.page_count().to_le_bytes());
    let crc = crc32fast::hash(&header);
    header.extend_from_slice(&crc.to_le_bytes());
    header.resize(HEADER_BYTES as usize, 0);
    header
}

/// Adds the on-disk bitmap into `map`. A new (empty) file adds nothing. A file written for
/// another size or granularity is converted, rounding out.
fn load_bitmap(file: &File, map: &mut DirtyMap) -> Result<(), String> {
    let len = file.metadata().map_err(|e| format!("stat: {e}"))?.len();
    if len == 0 {
        return Ok(());
    }
    let mut header = [0u8; 36];
    file.read_exact_at(&mut header, 0)
        .map_err(|e| format!("read header: {e}"))?;
    let field = |at: usize, n: usize| &header[at..at + n];
    if field(0, 8) != BITMAP_MAGIC {
        return Err("bad magic in header".into());
    }
    let crc = u32::from_le_bytes(field(32, 4).try_into().expect("4 bytes"));
    if crc != crc32fast::hash(&header[..32]) {
        return Err("header checksum mismatch".into());
    }
    let version = u32::from_le_bytes(field(8, 4).try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, expected {FORMAT_VERSION}"
        ));
    }
    let granularity = u32::from_le_bytes(field(12, 4).try_into().expect("4 bytes"));
    let granularity = Granularity::new(u64::from(granularity)).map_err(|e| e.to_string())?;
    let volume_size = u64::from_le_bytes(field(16, 8).try_into().expect("8 bytes"));
    let pages = u64::from_le_bytes(field(24, 8).try_into().expect("8 bytes"));
    let mut stored = DirtyMap::new(volume_size, granularity);
    if stored.page_count() != pages || len < HEADER_BYTES + pages * BITMAP_PAGE_BYTES as u64 {
        return Err(format!(
            "header says {pages} pages but the file is {len} bytes"
        ));
    }
    let mut page = vec![0u8; BITMAP_PAGE_BYTES];
    for p in 0..pages {
        let index = PageIndex(p);
        file.read_exact_at(&mut page, HEADER_BYTES + index.byte_offset())
            .map_err(|e| format!("read page {p}: {e}"))?;
        if page.iter().any(|&b| b != 0) {
            stored.merge_page(index, &page);
        }
    }
    if granularity == map.granularity() && volume_size == map.volume_size() {
        *map = stored;
    } else {
        for run in stored.runs() {
            map.set_range(run);
        }
        if volume_size < map.volume_size() {
            // Grown while stopped: the new tail was never tracked.
            map.set_range(ByteRange::new(volume_size, map.volume_size() - volume_size));
        }
    }
    Ok(())
}

/// The regions in the newest valid activity-log slot, with the slot's generation.
fn load_activity_log(file: &File) -> Result<(u64, Vec<(u64, u64)>), String> {
    let len = file.metadata().map_err(|e| format!("stat: {e}"))?.len();
    if len == 0 {
        return Ok((0, Vec::new()));
    }
    if len % 2 != 0 {
        return Err(format!("activity log is {len} bytes, not two slots"));
    }
    let slot_bytes = len / 2;
    let mut best: Option<(u64, Vec<(u64, u64)>)> = None;
    let mut any_content = false;
    let mut slot = vec![0u8; slot_bytes as usize];
    for i in 0..2 {
        file.read_exact_at(&mut slot, i * slot_bytes)
            .map_err(|e| format!("read slot {i}: {e}"))?;
        any_content |= slot.iter().any(|&b| b != 0);
        if let Some((generation, regions)) = parse_al_slot(&slot)
            && best.as_ref().is_none_or(|(g, _)| generation > *g)
        {
            best = Some((generation, regions));
        }
    }
    match best {
        Some(found) => Ok(found),
        None if !any_content => Ok((0, Vec::new())),
        None => Err("no valid slot".into()),
    }
}

fn parse_al_slot(slot: &[u8]) -> Option<(u64, Vec<(u64, u64)>)> {
    let u64_at = |at: usize| {
        slot.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
    };
    if slot.get(..8)? != AL_MAGIC {
        return None;
    }
    let generation = u64_at(8)?;
    let region_size = u64_at(24)?;
    let count = u32::from_le_bytes(slot.get(32..36)?.try_into().ok()?) as usize;
    let end = 36 + 8 * count;
    let crc = u32::from_le_bytes(slot.get(end..end + 4)?.try_into().ok()?);
    if crc != crc32fast::hash(&slot[..end]) || !region_size.is_power_of_two() {
        return None;
    }
    let regions = (0..count)
        .map(|i| u64_at(36 + 8 * i).map(|r| (region_size, r)))
        .collect::<Option<_>>()?;
    Some((generation, regions))
}

/// The bytes of `pages`, one after the other.
fn copy_pages(map: &DirtyMap, pages: &[PageIndex]) -> Vec<u8> {
    let mut bytes = vec![0u8; pages.len() * BITMAP_PAGE_BYTES];
    for (page, chunk) in pages.iter().zip(bytes.chunks_exact_mut(BITMAP_PAGE_BYTES)) {
        map.copy_page(*page, chunk);
    }
    bytes
}

/// Writes each run of consecutive pages with one call.
fn write_page_bytes(file: &File, pages: &[PageIndex], bytes: &[u8]) -> io::Result<()> {
    let mut i = 0;
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j].0 == pages[j - 1].0 + 1 {
            j += 1;
        }
        let chunk = &bytes[i * BITMAP_PAGE_BYTES..j * BITMAP_PAGE_BYTES];
        file.write_all_at(chunk, HEADER_BYTES + pages[i].byte_offset())?;
        i = j;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const BLOCK: u64 = 4096;
    const SIZE: u64 = 64 << 20;

    #[test]
    fn a_grown_tracker_keeps_its_bits_and_reopens_with_the_new_blocks_clean() {
        let dir = tempfile::tempdir().unwrap();
        let (t, _) = DirtyTracker::open(dir.path(), SIZE, config(16)).unwrap();
        t.admit(&[ByteRange::new(BLOCK, BLOCK)]).unwrap();
        t.grow(4 * SIZE).unwrap();
        t.admit(&[ByteRange::new(3 * SIZE, BLOCK)]).unwrap();
        assert_eq!(t.dirty_bytes(), 2 * BLOCK);
        t.close().unwrap();
        drop(t);
        let (t, report) = DirtyTracker::open(dir.path(), 4 * SIZE, config(16)).unwrap();
        assert!(report.marked_all_dirty.is_none());
        assert_eq!(
            t.dirty_runs(),
            vec![
                ByteRange::new(BLOCK, BLOCK),
                ByteRange::new(3 * SIZE, BLOCK)
            ]
        );
    }

    fn config(active_regions: usize) -> TrackerConfig {
        TrackerConfig {
            region_size: 1 << 20,
            active_regions,
            ..TrackerConfig::default()
        }
    }

    fn blocks(range: ByteRange) -> impl Iterator<Item = u64> {
        range.offset / BLOCK..range.end().div_ceil(BLOCK)
    }

    fn dirty_blocks(tracker: &DirtyTracker) -> BTreeSet<u64> {
        tracker.dirty_runs().into_iter().flat_map(blocks).collect()
    }

    #[test]
    fn clean_close_keeps_exactly_the_dirty_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let (tracker, report) = DirtyTracker::open(dir.path(), SIZE, config(64)).unwrap();
        assert_eq!(
            report,
            RecoveryReport {
                replayed_regions: 0,
                marked_all_dirty: None,
                dirty_bytes: 0
            }
        );
        tracker
            .admit(&[ByteRange::new(0, 4096), ByteRange::new(10 << 20, 8192)])
            .unwrap();
        tracker.clear(ByteRange::new(0, 4096));
        tracker.close().unwrap();
        drop(tracker);
        let (tracker, report) = DirtyTracker::open(dir.path(), SIZE, config(64)).unwrap();
        assert_eq!(report.replayed_regions, 0);
        assert_eq!(tracker.dirty_runs(), vec![ByteRange::new(10 << 20, 8192)]);
    }

    #[test]
    fn a_batch_reports_writes_into_logged_regions_ready_and_the_rest_after_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (tracker, _) = DirtyTracker::open(dir.path(), SIZE, config(64)).unwrap();
        tracker.admit(&[ByteRange::new(0, 4096)]).unwrap();
        let mut ready = Vec::new();
        let batch = [ByteRange::new(4096, 4096), ByteRange::new(5 << 20, 4096)];
        let needed = tracker.admit_batch(&batch, &mut ready).unwrap();
        assert_eq!(ready, vec![true, false]);
        assert!(needed.is_some(), "a new region needs a log write");
        // A crash now: only the ready write may have been submitted, and it is covered.
        drop(tracker);
        let (tracker, _) = DirtyTracker::open(dir.path(), SIZE, config(64)).unwrap();
        assert!(
            tracker
                .dirty_runs()
                .iter()
                .any(|r| r.offset <= 4096 && 8192 <= r.end())
        );
        let needed = tracker.admit_batch(&batch, &mut ready).unwrap();
        assert_eq!(
            ready,
            vec![false, false],
            "after recovery the log starts empty"
        );
        tracker.make_durable(needed.unwrap()).unwrap();
        drop(tracker);
        let (tracker, _) = DirtyTracker::open(dir.path(), SIZE, config(64)).unwrap();
        assert!(
            tracker
                .dirty_runs()
                .iter()
                .any(|r| r.offset <= 5 << 20 && (5 << 20) + 4096 <= r.end())
        );
    }

    #[test]
    fn an_acknowledgement_clears_only_blocks_not_written_since_the_data_was_taken() {
        let dir = tempfile::tempdir().unwrap();
        let (tracker, _) = DirtyTracker::open(dir.path(), SIZE, config(64)).unwrap();
        let a = ByteRange::new(0, 8192);
        tracker.admit(&[a]).unwrap();
        let ticket = tracker.issue_ticket(a);
        // Written again while the first data is on its way.
        tracker.admit(&[ByteRange::new(4096, 4096)]).unwrap();
        assert_eq!(
            tracker.redeem([ticket]),
            4096,
            "only the block not written again"
        );
        assert_eq!(tracker.dirty_runs(), vec![ByteRange::new(4096, 4096)]);
        let again = tracker.issue_ticket(a);
        assert_eq!(tracker.redeem([again]), 4096);
        assert_eq!(tracker.dirty_bytes(), 0);
        assert_eq!(tracker.live_tickets(), 0);
    }

    #[test]
    fn unsent_runs_leave_out_what_is_on_its_way_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let (tracker, _) = DirtyTracker::open(dir.path(), SIZE, config(64)).unwrap();
        tracker.admit(&[ByteRange::new(0, 16 * BLOCK)]).unwrap();
        let _sent = tracker.issue_ticket(ByteRange::new(4 * BLOCK, 8 * BLOCK));
        assert_eq!(
            tracker.unsent_runs(),
            vec![
                ByteRange::new(0, 4 * BLOCK),
                ByteRange::new(12 * BLOCK, 4 * BLOCK)
            ]
        );
        // Written again after it was read: that block is to be sent again.
        tracker.admit(&[ByteRange::new(6 * BLOCK, BLOCK)]).unwrap();
        assert_eq!(
            tracker.unsent_runs(),
            vec![
                ByteRange::new(0, 4 * BLOCK),
                ByteRange::new(6 * BLOCK, BLOCK),
                ByteRange::new(12 * BLOCK, 4 * BLOCK)
            ]
        );
    }

    #[test]
    fn crash_replays_logged_regions_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (tracker, _) = DirtyTracker::open(dir.path(), SIZE, config(64)).unwrap();
        tracker.admit(&[ByteRange::new(3 << 20, 4096)]).unwrap();
        drop(tracker); // no close: as after kill -9
        let (tracker, report) = DirtyTracker::open(dir.path(), SIZE, config(64)).unwrap();
        assert_eq!(report.replayed_regions, 1);
        assert_eq!(tracker.dirty_runs(), vec![ByteRange::new(3 << 20, 1 << 20)]);
    }

    #[test]
    fn a_torn_activity_log_slot_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let (tracker, _) = DirtyTracker::open(dir.path(), SIZE, config(64)).unwrap();
        tracker.admit(&[ByteRange::new(0, 4096)]).unwrap();
        tracker.admit(&[ByteRange::new(5 << 20, 4096)]).unwrap();
        drop(tracker);
        // A torn newest slot means its sync never returned, so the write it was to admit
        // was never submitted: recovery must use the older slot.
        let al = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join("activity-log"))
            .unwrap();
        let (generation, _) = load_activity_log(&al).unwrap();
        let slot_bytes = al.metadata().unwrap().len() / 2;
        al.write_all_at(b"garbage!", (generation % 2) * slot_bytes + 12)
            .unwrap();
        let (older, regions) = load_activity_log(&al).unwrap();
        assert_eq!(older, generation - 1);
        assert_eq!(regions, vec![(1 << 20, 0)]);
    }

    #[test]
    fn a_corrupt_bitmap_header_marks_everything_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let (tracker, _) = DirtyTracker::open(dir.path(), SIZE, config(64)).unwrap();
        tracker.close().unwrap();
        drop(tracker);
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join("bitmap"))
            .unwrap();
        file.write_all_at(b"XX", 0).unwrap();
        let (tracker, report) = DirtyTracker::open(dir.path(), SIZE, config(64)).unwrap();
        assert_eq!(
            report.marked_all_dirty.as_deref(),
            Some("bad magic in header")
        );
        assert_eq!(tracker.dirty_bytes(), SIZE);
    }

    #[test]
    fn changed_granularity_converts_by_rounding_out() {
        let dir = tempfile::tempdir().unwrap();
        let (tracker, _) = DirtyTracker::open(dir.path(), SIZE, config(64)).unwrap();
        tracker.admit(&[ByteRange::new(70_000 * 4, 4096)]).unwrap();
        tracker.close().unwrap();
        drop(tracker);
        let coarse = TrackerConfig {
            granularity: Granularity::new(65536).unwrap(),
            ..config(64)
        };
        let (tracker, _) = DirtyTracker::open(dir.path(), SIZE, coarse).unwrap();
        assert_eq!(tracker.dirty_runs(), vec![ByteRange::new(262_144, 65536)]);
    }

    /// Random admits, clears and flushes, then a crash at a seeded moment: every block
    /// admitted since it was last cleared must come back dirty.
    #[test]
    fn seeded_crashes_never_lose_an_admitted_write() {
        let base_seed: u64 = std::env::var("BLOCKREP_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed);
        eprintln!("seed: BLOCKREP_SEED={base_seed}");
        for round in 0..40u64 {
            let seed = base_seed.wrapping_add(round);
            let mut rng = SmallRng::seed_from_u64(seed);
            let dir = tempfile::tempdir().unwrap();
            let active = rng.random_range(4..24);
            let (tracker, _) = DirtyTracker::open(dir.path(), SIZE, config(active)).unwrap();
            let mut must_be_dirty = BTreeSet::new();
            for _ in 0..rng.random_range(1..300) {
                let offset = rng.random_range(0..SIZE / BLOCK) * BLOCK;
                let len = (rng.random_range(1..64) * BLOCK).min(SIZE - offset);
                let range = ByteRange::new(offset, len);
                match rng.random_range(0..10) {
                    0 => {
                        tracker.clear(range);
                        for b in blocks(range) {
                            must_be_dirty.remove(&b);
                        }
                    }
                    1 => tracker.flush(RetirePolicy::Idle).unwrap(),
                    2 => tracker.flush(RetirePolicy::ToLowWater).unwrap(),
                    _ => {
                        tracker.admit(&[range]).unwrap();
                        must_be_dirty.extend(blocks(range));
                    }
                }
            }
            assert!(
                tracker.active_regions() <= active,
                "seed {seed}: log over capacity"
            );
            drop(tracker);
            let (recovered, _) = DirtyTracker::open(dir.path(), SIZE, config(active)).unwrap();
            let dirty = dirty_blocks(&recovered);
            let lost: Vec<_> = must_be_dirty.difference(&dirty).take(5).collect();
            assert!(
                lost.is_empty(),
                "seed {seed}: blocks {lost:?} lost their dirty bit (replay with BLOCKREP_SEED={seed})"
            );
        }
    }
}
